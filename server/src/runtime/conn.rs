//! One TCP or WebSocket connection's transport state, independent of the I/O backend: bytes in →
//! message bodies out (TCP framing, or the WebSocket upgrade and frames), messages in → framed
//! bytes queued for writing.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use imedge_protocol::frame::{tcp, ws};
use imedge_protocol::session::Transport;
use imedge_protocol::Message;

/// Output a peer may leave unread before we give up on it: a client that stops reading must not
/// make the server buffer without bound. 4 MiB is hundreds of messages of the largest size.
pub const MAX_TX_BUFFER: usize = 4 << 20;

/// Where a WebSocket connection is in its life.
#[derive(Debug)]
enum WsPhase {
    /// Waiting for the HTTP upgrade request.
    Handshake,
    /// Exchanging frames.
    Open(ws::FrameDecoder),
}

/// The transport state of one connection.
#[derive(Debug)]
pub struct ConnState {
    /// TCP or WebSocket.
    pub transport: Transport,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Received bytes not yet cut into messages. Allocated only when needed: whole frames are
    /// parsed where they were received, so an idle session that sent only whole frames (most)
    /// holds no receive buffer at all.
    pub rx: BytesMut,
    /// Bytes queued for the socket.
    pub tx: BytesMut,
    /// Close once `tx` is written.
    pub closing: bool,
    ws: Option<WsPhase>,
}

/// What [`ConnState::next`] found in the received bytes.
#[derive(Debug)]
pub enum Next {
    /// One message body for the shard.
    Body(BytesMut),
    /// Nothing complete yet.
    Wait,
    /// The peer broke the protocol or closed: close (after writing what is queued).
    Close,
}

impl ConnState {
    /// A new connection.
    pub fn new(transport: Transport, peer: SocketAddr) -> Self {
        Self {
            transport,
            peer,
            rx: BytesMut::new(),
            tx: BytesMut::new(),
            closing: false,
            ws: (transport == Transport::Ws).then_some(WsPhase::Handshake),
        }
    }

    /// Takes the next message body off the received bytes, answering what the transport answers
    /// by itself (the WebSocket upgrade, pings, close frames).
    pub fn next(&mut self, tcp_max_body: usize) -> Next {
        if self.closing {
            return Next::Close;
        }
        match &mut self.ws {
            None => match tcp::split_frame(&mut self.rx, tcp_max_body) {
                Ok(Some(body)) => Next::Body(body),
                Ok(None) => Next::Wait,
                Err(error) => {
                    // SPEC §1.1: the reference closes without a reply.
                    tracing::debug!(peer = %self.peer, %error, "oversize TCP frame");
                    self.closing = true;
                    Next::Close
                }
            },
            Some(WsPhase::Handshake) => match ws::accept(&self.rx, &mut self.tx) {
                None => Next::Wait,
                Some(ws::Handshake::Accepted { consumed }) => {
                    self.rx.advance(consumed);
                    self.ws = Some(WsPhase::Open(ws::FrameDecoder::new(
                        ws::Role::Server,
                        ws::MAX_PAYLOAD,
                    )));
                    self.next(tcp_max_body)
                }
                Some(ws::Handshake::Rejected { status, .. }) => {
                    tracing::debug!(peer = %self.peer, status, "WebSocket upgrade rejected");
                    self.rx.clear();
                    self.closing = true;
                    Next::Close
                }
            },
            Some(WsPhase::Open(decoder)) => loop {
                match decoder.decode(&mut self.rx) {
                    Ok(Some(ws::Unit::Text(body))) => return Next::Body(body),
                    Ok(Some(ws::Unit::Ping(payload))) => ws::encode_pong(&payload, &mut self.tx),
                    Ok(Some(ws::Unit::Pong)) => {}
                    Ok(Some(ws::Unit::Close(_))) => {
                        self.begin_close();
                        return Next::Close;
                    }
                    Ok(None) => return Next::Wait,
                    Err(error) => {
                        tracing::debug!(peer = %self.peer, %error, "WebSocket protocol error");
                        let reason = if error == ws::WsError::TooBig {
                            ws::CLOSE_TOO_BIG_REASON
                        } else {
                            ""
                        };
                        ws::encode_close(error.close_code(), reason, &mut self.tx);
                        self.closing = true;
                        return Next::Close;
                    }
                }
            },
        }
    }

    /// Gives back the memory of buffers that are empty, so that an idle connection holds none
    /// (a busy one allocates again on its next partial frame or write: one allocation against
    /// a system call's worth of work).
    pub fn release_empty_buffers(&mut self) {
        if self.rx.is_empty() && self.rx.capacity() > 0 {
            self.rx = BytesMut::new();
        }
        if self.tx.is_empty() && self.tx.capacity() > 0 {
            self.tx = BytesMut::new();
        }
    }

    /// Whether received bytes may be cut into message bodies where they lie ([`ConnState::cut`])
    /// instead of being appended to `rx`: nothing is buffered, the connection is not closing,
    /// and a WebSocket has finished its upgrade and is not reassembling a fragmented message.
    pub fn takes_in_place(&self) -> bool {
        self.rx.is_empty()
            && !self.closing
            && match &self.ws {
                None => true,
                Some(WsPhase::Open(decoder)) => decoder.is_idle(),
                Some(WsPhase::Handshake) => false,
            }
    }

    /// Cuts the next message body off the front of `received` where it lies (a WebSocket frame's
    /// payload is unmasked in place) and advances `received` past its frame. `None` for whatever
    /// needs the buffered path: a partial or oversize TCP frame; a WebSocket control frame,
    /// fragment, partial or invalid frame. Those bytes stay in `received`, for `rx` and
    /// [`ConnState::next`], which handles them as if they had been copied all along.
    pub fn cut<'a>(
        &self,
        received: &mut &'a mut [u8],
        tcp_max_body: usize,
    ) -> Option<&'a mut [u8]> {
        let (body, frame_len) = match &self.ws {
            None => {
                let len = tcp::decode(received, tcp_max_body).ok()??;
                (
                    tcp::PREFIX_LEN..tcp::PREFIX_LEN + len,
                    tcp::PREFIX_LEN + len,
                )
            }
            Some(WsPhase::Open(decoder)) => decoder.text_in_place(received)?,
            Some(WsPhase::Handshake) => return None,
        };
        let frame = std::mem::take(received);
        if frame_len > frame.len() {
            // Not reached: both decoders found the whole frame.
            *received = frame;
            return None;
        }
        let (frame, rest) = frame.split_at_mut(frame_len);
        *received = rest;
        frame.get_mut(body)
    }

    /// Whether the connection speaks frames yet (a WebSocket finished its upgrade).
    fn is_open(&self) -> bool {
        !matches!(self.ws, Some(WsPhase::Handshake))
    }

    /// Queues `msg`, framed for the transport.
    pub fn queue(&mut self, msg: &Message<'_>) {
        if self.closing || !self.is_open() {
            return;
        }
        match self.ws {
            None => tcp::encode(msg, &mut self.tx),
            Some(_) => ws::encode_message(msg, None, &mut self.tx),
        }
        self.check_tx();
    }

    /// Queues an encoded message body, framed for the transport.
    pub fn queue_json(&mut self, json: &[u8]) {
        if self.closing || !self.is_open() {
            return;
        }
        match self.ws {
            None => tcp::encode_body(json, &mut self.tx),
            Some(_) => ws::encode_text(json, None, &mut self.tx),
        }
        self.check_tx();
    }

    /// Asks for the connection to be closed once the queued bytes are written; a WebSocket says
    /// goodbye first (close 1000 "Bye", SPEC §1.3).
    pub fn begin_close(&mut self) {
        if self.closing {
            return;
        }
        if matches!(self.ws, Some(WsPhase::Open(_))) {
            self.tx.extend_from_slice(ws::CLOSE_BYE);
        }
        self.closing = true;
    }

    fn check_tx(&mut self) {
        if self.tx.len() > MAX_TX_BUFFER {
            tracing::debug!(peer = %self.peer, "peer does not read: closing");
            self.tx.clear();
            self.closing = true;
        }
    }
}
