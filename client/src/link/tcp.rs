//! TCP: 4-byte big-endian length prefix, then the JSON body (SPEC §1.1), via `frame::tcp`.

use std::net::SocketAddr;

use bytes::BytesMut;
use imedge_protocol::frame::tcp;
use imedge_protocol::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Error, Result};

/// Free space ensured before each read: more than the largest frame (4 + 6144 bytes), so a
/// frame never needs more than two reads.
const READ_CHUNK: usize = 8 * 1024;

#[derive(Debug)]
pub(crate) struct TcpLink {
    stream: TcpStream,
    /// Received bytes not yet split into frames.
    rbuf: BytesMut,
    /// Frames of the batch being written.
    wbuf: BytesMut,
}

impl TcpLink {
    pub(crate) async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| Error::Connect { addr, source })?;
        // Messages are small and latency-bound; the reference sets TCP_NODELAY too (SPEC §1.1).
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::new(),
        })
    }

    /// The next frame's body. Cancel-safe: `read_buf` either appends to `rbuf` or reads nothing.
    pub(crate) async fn recv(&mut self) -> Result<BytesMut> {
        loop {
            // The Java SDK refuses frames over the server's own limit (SPEC §1.1); so do we.
            if let Some(body) = tcp::split_frame(&mut self.rbuf, tcp::DEFAULT_MAX_BODY)? {
                return Ok(body);
            }
            self.rbuf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(Error::PeerClosed);
            }
        }
    }

    pub(crate) async fn send(&mut self, messages: &[Message<'_>]) -> Result<()> {
        self.wbuf.clear();
        for msg in messages {
            tcp::encode(msg, &mut self.wbuf);
        }
        self.stream.write_all(&self.wbuf).await?;
        Ok(())
    }

    pub(crate) async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}
