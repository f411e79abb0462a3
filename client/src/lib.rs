//! imedge-client: an async (tokio) client SDK with the semantics of MobileIMSDK's Java client, on
//! all three transports — TCP, UDP and WebSocket.
//!
//! It is not a re-implementation of the SDK's logic: login, keep-alive by sense mode, automatic
//! re-login with the stored `firstLoginTime`, QoS resends and receive-side de-duplication are the
//! sans-IO [`session::ClientSession`] of `imedge-protocol`, the same state machine that is tested
//! there on a virtual clock. This crate is only the I/O around it.
//!
//! # Design: one task per client
//!
//! [`Client::connect`] opens the link and spawns one tokio task that owns the socket and the
//! session. The task feeds the session what happens — decoded messages (`handle_message`), link up
//! and down (`handle_connected`, `handle_disconnected`), its timer firing at `poll_timeout()`
//! (`handle_timeout`), and the application's commands (`send`, `logout`) — and performs what the
//! session asks in return (`poll_output`): write these messages, reconnect, close. The session's
//! events (`poll_event`) go to the application through [`Events`].
//!
//! # Backpressure
//!
//! [`Events`] is bounded ([`ClientOptions::event_capacity`], default
//! [`DEFAULT_EVENT_CAPACITY`]) and the task never waits for the application (a stalled task would
//! miss its keep-alives). While the queue is full, a received data message is not handed to the
//! session at all: a QoS message is therefore not ACKed and its sender resends it, which is the
//! protocol's own flow control (the server keeps the message and resends it); a message without
//! QoS is dropped. Nothing received is buffered without bound.
//!
//! The application holds a [`Client`] (cheap to clone; commands reach the task over a bounded
//! channel and are answered once done) and the [`Events`] stream. Nothing is shared between
//! the task and the application but those two channels.
//!
//! Errors the server can cause — an oversize frame, a body that is not JSON, a binary WebSocket
//! frame, a reset — never panic: they close the link, which the session treats like any other
//! link loss ([`Event::LinkLost`], automatic re-login).
//!
//! # Layout
//!
//! * [`ClientOptions`] — transport, server address, uid, token, sense mode, QoS resend schedule,
//!   event queue capacity.
//! * `link` — one module per transport, each moving whole message bodies: TCP with the 4-byte
//!   length prefix of `frame::tcp`, UDP one datagram per message on a connected socket, WebSocket
//!   text frames through tokio-tungstenite.
//! * `driver` — the task: the select loop around the session.
//! * [`Client`] — the handle; [`Events`] / [`Notice`] — what comes back.
//!
//! # Example
//!
//! ```no_run
//! use imedge_client::{Client, ClientOptions, Event, SenseMode, Transport};
//!
//! # async fn demo() -> imedge_client::Result<()> {
//! let server = "127.0.0.1:8901".parse().expect("an address");
//! let options =
//!     ClientOptions::new(Transport::Tcp, server, "alice", "tokenA").with_sense_mode(SenseMode::S5);
//! let (client, mut events) = Client::login(options).await?;
//! let fp = client.send("bob", "hello", true).await?;
//! while let Some(event) = events.next().await {
//!     match event {
//!         Event::Delivered(acked) if Some(&acked) == fp.as_ref() => break,
//!         Event::Message(msg) => println!("{:?}: {:?}", msg.from, msg.text()),
//!         _ => {}
//!     }
//! }
//! client.logout().await;
//! # Ok(())
//! # }
//! ```

mod client;
mod driver;
mod error;
mod events;
mod link;
mod options;

pub use client::{new_fingerprint, Client, State};
pub use error::{Error, Result};
pub use events::{Events, Notice};
pub use options::{
    default_port, ClientOptions, DEFAULT_COMMAND_CAPACITY, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_EVENT_CAPACITY, DEFAULT_TCP_PORT, DEFAULT_UDP_PORT, DEFAULT_WS_PORT,
    MAX_OVERFLOW_NOTICES,
};

pub use imedge_protocol::qos;
pub use imedge_protocol::session;
pub use imedge_protocol::session::{Event, KeepAlive, SendError, SenseMode, Transport};
pub use imedge_protocol::{Fingerprint, Kind, Message, UserId};
