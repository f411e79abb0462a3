//! UDP: one datagram per message on a connected socket (SPEC §1.2), via `frame::udp`.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BytesMut;
use imedge_protocol::frame::udp;
use imedge_protocol::Message;
use tokio::net::UdpSocket;

use crate::{Error, Result};

/// Largest datagram accepted from the server: the reference's own limit (SPEC §1.2). The Java UDP
/// SDK reads only 1024 bytes and truncates the rest; we take what the server may send.
const MAX_DATAGRAM: usize = udp::DEFAULT_MAX_DATAGRAM;

#[derive(Debug)]
pub(crate) struct UdpLink {
    socket: UdpSocket,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl UdpLink {
    /// Binds an ephemeral port of the server's address family and connects it to the server: a
    /// new link is a new source port, i.e. a new session for the server (SPEC §1.2).
    pub(crate) async fn connect(addr: SocketAddr) -> Result<Self> {
        let local = match addr {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let connect = async {
            let socket = UdpSocket::bind(local).await?;
            socket.connect(addr).await?;
            Ok(socket)
        };
        let socket = connect
            .await
            .map_err(|source| Error::Connect { addr, source })?;
        Ok(Self {
            socket,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        })
    }

    /// The next datagram. Cancel-safe: `recv_buf` either receives a whole datagram or nothing.
    ///
    /// "Connection refused" (an ICMP port-unreachable for an earlier send) is not a link failure
    /// on UDP: the SDK relies on its keep-alive timeout, and so do we.
    pub(crate) async fn recv(&mut self) -> Result<BytesMut> {
        loop {
            self.rbuf.clear();
            self.rbuf.reserve(udp::recv_buffer_len(MAX_DATAGRAM));
            match self.socket.recv_buf(&mut self.rbuf).await {
                Ok(len) => {
                    udp::decode(len, MAX_DATAGRAM)?;
                    return Ok(self.rbuf.split());
                }
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::debug!("udp: server port unreachable");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(crate) async fn send(&mut self, messages: &[Message<'_>]) -> Result<()> {
        for msg in messages {
            self.wbuf.clear();
            udp::encode(msg, &mut self.wbuf);
            match self.socket.send(&self.wbuf).await {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::debug!("udp: server port unreachable");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
