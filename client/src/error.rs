//! The SDK's error type.

use std::io;
use std::net::SocketAddr;

use imedge_protocol::frame::tcp::TooLarge;
use imedge_protocol::session::{SendError, UnsupportedSenseMode};
use imedge_protocol::DecodeError;
use tokio_tungstenite::tungstenite;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, from bad options to a server that sends garbage.
///
/// Errors caused by the server's input ([`Error::Decode`], [`Error::Frame`], …) never panic: they
/// close the link, are reported as [`crate::Notice::Disconnected`], and the session reacts as the
/// Java SDK does (link lost, automatic re-login).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The options ask for a sense mode the transport's SDK does not have.
    #[error("invalid options: {0}")]
    Options(#[from] UnsupportedSenseMode),
    /// The transport connection could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The server address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The WebSocket upgrade failed (wrong path, not a WebSocket server, …).
    #[error("WebSocket upgrade with {addr} failed: {source}")]
    Handshake {
        /// The server address.
        addr: SocketAddr,
        /// Why (boxed: tungstenite's error is large).
        #[source]
        source: Box<tungstenite::Error>,
    },
    /// An I/O error on an established link.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A WebSocket protocol error on an established link.
    #[error("WebSocket error: {0}")]
    WebSocket(#[source] Box<tungstenite::Error>),
    /// The server sent a frame larger than the transport allows (SPEC §1).
    #[error(transparent)]
    Frame(#[from] TooLarge),
    /// The server sent something that is not a message (SPEC §2.2).
    #[error("malformed message from the server: {0}")]
    Decode(#[from] DecodeError),
    /// The server sent a binary WebSocket frame; MobileIMSDK messages are text (SPEC §1.3).
    #[error("binary WebSocket frame from the server")]
    BinaryFrame,
    /// The server closed the connection.
    #[error("the server closed the connection")]
    PeerClosed,
    /// A write did not complete within the keep-alive timeout: the link is considered dead.
    #[error("write timed out")]
    WriteTimeout,
    /// The session refused to send: not logged in, or too many unacknowledged QoS messages.
    #[error(transparent)]
    Send(#[from] SendError),
    /// No link is up (between a link loss and the re-login's reconnection).
    #[error("not connected")]
    NotConnected,
    /// The server refused the login with this code ([`crate::Client::login`]).
    #[error("login refused with code {0}")]
    LoginFailed(i32),
    /// Kicked out while waiting for the login response ([`crate::Client::login`]).
    #[error("kicked out with code {0}")]
    Kicked(i32),
    /// A wait ([`crate::Client::login`], [`crate::Events::wait_for`]) or connection attempt ran out
    /// of time.
    #[error("timed out")]
    Timeout,
    /// The client's task has ended (logout, kickout, refused login, [`crate::Client::close`]).
    #[error("the client is closed")]
    Closed,
}
