//! Client session logic: login, keep-alive by sense mode, automatic re-login (SPEC §5, §6).
//!
//! * [`sense`] — the sense modes: client keep-alive interval and timeout, server idle timeouts,
//!   re-login intervals, all named after the reference's tables (§6.2–§6.4).
//! * [`client`] — [`ClientSession`], the Java SDK's client state machine with its QoS tables
//!   (§5.1, §6, §8.3, §8.5), sans-IO.
//!
//! The server side of a session (login processing, duplicate-login rules, idle timeout) lives in
//! the server crate, which uses [`sense`] for its timeouts and [`crate::qos`] for its tables.

pub mod client;
pub mod sense;

pub use client::{ClientConfig, ClientSession, Event, Output, SendError, UnsupportedSenseMode};
pub use sense::{KeepAlive, SenseMode, Transport};
