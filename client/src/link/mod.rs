//! The transport edge: one module per transport, all moving whole message bodies (SPEC §1).
//!
//! A [`Link`] is one established connection. [`Link::recv`] returns the next message body and is
//! cancel-safe (partial input stays buffered in the link), so the client's task can wait on it in
//! `select!` next to its commands and its timer. [`Link::send`] writes a batch of messages and is
//! not: the task awaits it to completion (bounded by the keep-alive timeout).

mod tcp;
mod udp;
mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use imedge_protocol::session::Transport;
use imedge_protocol::Message;

use crate::{Error, Result};

/// How long a graceful close (TCP FIN, WebSocket close frame) may take before the socket is just
/// dropped: the server is not waited for, this only flushes what we wrote.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where and how to connect; cloned into every connection attempt.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) transport: Transport,
    pub(crate) server: SocketAddr,
    pub(crate) ws_path: String,
    /// Bound on one connection attempt.
    pub(crate) timeout: Duration,
}

/// One established connection to the server.
#[derive(Debug)]
pub(crate) enum Link {
    Tcp(tcp::TcpLink),
    Udp(udp::UdpLink),
    /// Boxed: tungstenite's stream state is several times the size of a socket.
    Ws(Box<ws::WsLink>),
}

impl Link {
    /// Opens a link to `target` (for WebSocket including the upgrade), within its timeout.
    pub(crate) async fn connect(target: Target) -> Result<Self> {
        let Target {
            transport,
            server,
            ws_path,
            timeout,
        } = target;
        let connect = async {
            Ok(match transport {
                Transport::Tcp => Self::Tcp(tcp::TcpLink::connect(server).await?),
                Transport::Udp => Self::Udp(udp::UdpLink::connect(server).await?),
                Transport::Ws => Self::Ws(Box::new(ws::WsLink::connect(server, &ws_path).await?)),
            })
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| Error::Timeout)?
    }

    /// The next message body from the server. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Result<BytesMut> {
        match self {
            Self::Tcp(link) => link.recv().await,
            Self::Udp(link) => link.recv().await,
            Self::Ws(link) => link.recv().await,
        }
    }

    /// Writes `messages` in order, each framed for the transport.
    pub(crate) async fn send(&mut self, messages: &[Message<'_>]) -> Result<()> {
        match self {
            Self::Tcp(link) => link.send(messages).await,
            Self::Udp(link) => link.send(messages).await,
            Self::Ws(link) => link.send(messages).await,
        }
    }

    /// Closes the link the way the SDK does after a logout: TCP FIN, WebSocket close frame; UDP has
    /// nothing to say. Errors are irrelevant at this point and ignored.
    pub(crate) async fn close(self) {
        let close = async {
            match self {
                Self::Tcp(link) => link.close().await,
                Self::Udp(_) => {}
                Self::Ws(link) => (*link).close().await,
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
    }
}
