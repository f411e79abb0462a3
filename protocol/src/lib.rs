//! imedge-protocol: the MobileIMSDK wire protocol as data and pure functions — message model,
//! byte-exact codecs for the TCP, UDP and WebSocket transports, and the login, keep-alive and QoS
//! state machines. It does no I/O, reads no clock and has no async: time comes in as an argument
//! and bytes come in and go out as buffers, so everything here is tested on in-memory bytes and a
//! virtual clock.
//!
//! # Layout (in data-flow order)
//!
//! * [`frame`] — bytes → one message body per transport: [`frame::tcp`] (4-byte big-endian length
//!   prefix), [`frame::udp`] (one datagram), [`frame::ws`] (RFC 6455 text frames and the HTTP
//!   upgrade, on tungstenite's codec).
//! * [`codec`] — body → [`Message`] with simd-json, in place on the receive buffer
//!   ([`codec::Decoder`]); [`Message`] → bytes exactly as the reference (Gson) writes them
//!   ([`Message::encode`]).
//! * [`message`] — the envelope ([`Message`], [`Kind`], [`UserId`], [`Fingerprint`]) and the
//!   documents carried in `dataContent` ([`message::payload`]).
//! * [`session`] — the client's login / keep-alive / automatic re-login state machine and the sense
//!   modes (heartbeat interval, timeout) of client and server.
//! * [`qos`] — acknowledged delivery: the resend table of a sender and the de-duplication window of a
//!   receiver, with MobileIMSDK's timings as defaults.
//!
//! The wire format is specified in `shared/protocol/SPEC.md`; section numbers (§) below refer to it.

pub mod codec;
pub mod frame;
pub mod message;
pub mod qos;
pub mod session;

pub use codec::{DecodeError, Decoder};
pub use message::{Content, Fingerprint, Kind, Message, UserId};
