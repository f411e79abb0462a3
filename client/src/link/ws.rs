//! WebSocket: one text frame per message (SPEC §1.3), on tokio-tungstenite's client.

use std::io;
use std::net::SocketAddr;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use imedge_protocol::frame::ws;
use imedge_protocol::Message;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::{Error, Result};

#[derive(Debug)]
pub(crate) struct WsLink {
    stream: WebSocketStream<TcpStream>,
    wbuf: BytesMut,
}

impl WsLink {
    /// TCP connect, then the upgrade `GET ws://{addr}{path}`.
    pub(crate) async fn connect(addr: SocketAddr, path: &str) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| Error::Connect { addr, source })?;
        stream.set_nodelay(true)?;
        // The reference refuses frames over 64 KiB (SPEC §1.3); the server's frames are bounded the
        // same way, and a bigger one is a broken or hostile server.
        let config = WebSocketConfig::default()
            .max_message_size(Some(ws::MAX_PAYLOAD))
            .max_frame_size(Some(ws::MAX_PAYLOAD));
        let url = format!("ws://{addr}{path}");
        let (stream, _response) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                .await
                .map_err(|source| Error::Handshake {
                    addr,
                    source: Box::new(source),
                })?;
        Ok(Self {
            stream,
            wbuf: BytesMut::new(),
        })
    }

    /// The next text message's payload. Cancel-safe: the stream keeps partial frames. Pings are
    /// answered by tungstenite.
    pub(crate) async fn recv(&mut self) -> Result<BytesMut> {
        loop {
            let msg = match self.stream.next().await {
                None => return Err(Error::PeerClosed),
                Some(Err(e)) => return Err(ws_error(e)),
                Some(Ok(msg)) => msg,
            };
            match msg {
                tungstenite::Message::Text(text) => return Ok(BytesMut::from(text.as_bytes())),
                tungstenite::Message::Binary(_) => return Err(Error::BinaryFrame),
                tungstenite::Message::Close(_) => return Err(Error::PeerClosed),
                tungstenite::Message::Ping(_)
                | tungstenite::Message::Pong(_)
                | tungstenite::Message::Frame(_) => {}
            }
        }
    }

    pub(crate) async fn send(&mut self, messages: &[Message<'_>]) -> Result<()> {
        for msg in messages {
            msg.encode(&mut self.wbuf);
            let text = Utf8Bytes::try_from(self.wbuf.split())
                .map_err(|e| Error::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            self.stream
                .feed(tungstenite::Message::Text(text))
                .await
                .map_err(ws_error)?;
        }
        self.stream.flush().await.map_err(ws_error)
    }

    /// Close 1000 (normal), not waiting for the server's answer.
    pub(crate) async fn close(mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: Utf8Bytes::default(),
        };
        let _ = self.stream.close(Some(frame)).await;
    }
}

/// I/O errors stay I/O errors; the rest are WebSocket protocol errors.
fn ws_error(e: tungstenite::Error) -> Error {
    match e {
        tungstenite::Error::Io(e) => Error::Io(e),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            Error::PeerClosed
        }
        e => Error::WebSocket(Box::new(e)),
    }
}
