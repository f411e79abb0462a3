//! One TCP or WebSocket connection's transport state, independent of the I/O backend: bytes in →
//! message bodies out (TCP framing, or the WebSocket upgrade and frames), messages in → framed
//! bytes queued for writing.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use imedge_protocol::frame::{tcp, ws};
use imedge_protocol::session::Transport;
use imedge_protocol::Message;

/// Received bytes a connection may hold beyond its largest frame: what one read appends before
/// it is cut into frames (the epoll loop reads 64 KiB at a time, the io_uring loop one 4 KiB
/// provided buffer), so a peer that keeps within the frame limit never reaches the bound.
pub const RX_SLACK: usize = 64 * 1024;

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
    /// Close once `tx` is written. A closing connection takes no more input: what it receives
    /// is dropped unread into `rx` ([`ConnState::absorb`]).
    pub closing: bool,
    /// Close at once, without writing what is queued: the peer broke a limit (it does not read
    /// its output, overflowed its receive buffer, or stalled a write).
    pub aborted: bool,
    /// Bytes of `tx` handed to the kernel by a send still in flight (io_uring: they left `tx`
    /// but are not written yet); they count against the send budget.
    pub in_flight: usize,
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
            aborted: false,
            in_flight: 0,
            ws: (transport == Transport::Ws).then_some(WsPhase::Handshake),
        }
    }

    /// Takes the next message body off the received bytes, answering what the transport answers
    /// by itself (the WebSocket upgrade, pings, close frames).
    pub fn next(&mut self, tcp_max_body: usize) -> Next {
        if self.closing {
            self.rx.clear();
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

    /// Bytes queued for the peer and not yet written: `tx` and a send in flight.
    pub fn unsent(&self) -> usize {
        self.tx.len() + self.in_flight
    }

    /// Most bytes `rx` may hold: the largest frame of the transport (a WebSocket's largest
    /// message or upgrade request) and [`RX_SLACK`].
    pub fn rx_limit(&self, tcp_max_body: usize) -> usize {
        let frame = match self.ws {
            None => tcp::PREFIX_LEN + tcp_max_body,
            // The header of a frame is at most 14 bytes; fragments move into the decoder, which
            // bounds a message by `ws::MAX_PAYLOAD` itself.
            Some(_) => ws::MAX_HANDSHAKE.max(ws::MAX_PAYLOAD + 14),
        };
        frame + RX_SLACK
    }

    /// Appends received bytes to `rx` for [`ConnState::next`]. A closing connection drops them
    /// (it reads no more). Returns `false`, and aborts the connection, if `rx` would grow past
    /// [`ConnState::rx_limit`]: the peer sends more than any frame it may send.
    pub fn absorb(&mut self, received: &[u8], tcp_max_body: usize) -> bool {
        if self.closing {
            return true;
        }
        if self.rx.len() + received.len() > self.rx_limit(tcp_max_body) {
            tracing::debug!(peer = %self.peer, "receive buffer overflow: closing");
            self.rx.clear();
            self.abort();
            return false;
        }
        self.rx.extend_from_slice(received);
        true
    }

    /// Closes at once, dropping what is queued (see [`ConnState::abort`]).
    pub fn abort(&mut self) {
        self.tx.clear();
        self.closing = true;
        self.aborted = true;
    }
}

/// What the connection layer refused or cut short, per core (merged into the shard's
/// [`crate::shard::Stats`] by the stats query): one counter per limit a peer can hit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnStats {
    /// Connections closed because a write made no progress for `--write-stall-timeout`.
    pub write_stalls: u64,
    /// Slow consumers: connections closed because their unsent output passed
    /// `--max-send-buffer`.
    pub send_overflows: u64,
    /// Connections closed because they sent more than their largest frame could hold.
    pub receive_overflows: u64,
    /// Connections closed because they had not logged in within `--login-timeout`.
    pub login_timeouts: u64,
    /// Connections refused at accept: `--max-unauthenticated` reached.
    pub refused_unauthenticated: u64,
    /// Connections refused at accept: `--max-conns-per-ip` unauthenticated connections from
    /// the source address.
    pub refused_per_ip: u64,
    /// Connections refused at accept: the source address opened more than
    /// `--max-conn-rate-per-ip` connections per second.
    pub refused_rate: u64,
    /// Times accepting paused because the process ran out of file descriptors.
    pub accept_pauses: u64,
    /// Replies to UDP sources not logged in that were not sent: over
    /// `--udp-unauth-reply-rate` for the source address.
    pub udp_replies_limited: u64,
    /// Replies to UDP sources not logged in that were not sent: larger than
    /// `UDP_REPLY_MAX_RATIO` times the request.
    pub udp_replies_too_large: u64,
}

impl ConnStats {
    /// Adds another core's counters to these.
    pub fn merge(&mut self, other: &ConnStats) {
        self.write_stalls += other.write_stalls;
        self.send_overflows += other.send_overflows;
        self.receive_overflows += other.receive_overflows;
        self.login_timeouts += other.login_timeouts;
        self.refused_unauthenticated += other.refused_unauthenticated;
        self.refused_per_ip += other.refused_per_ip;
        self.refused_rate += other.refused_rate;
        self.accept_pauses += other.accept_pauses;
        self.udp_replies_limited += other.udp_replies_limited;
        self.udp_replies_too_large += other.udp_replies_too_large;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp() -> ConnState {
        ConnState::new(Transport::Tcp, SocketAddr::from(([127, 0, 0, 1], 1)))
    }

    #[test]
    fn a_closing_connection_reads_no_more() {
        let mut conn = tcp();
        assert!(conn.absorb(b"\0\0", 6144));
        conn.begin_close();
        assert!(conn.absorb(&[b'x'; 100_000], 6144));
        assert_eq!(conn.rx.len(), 2, "nothing appended once closing");
        assert!(matches!(conn.next(6144), Next::Close));
        assert!(conn.rx.is_empty());
    }

    #[test]
    fn the_receive_buffer_is_bounded_by_a_frame_and_one_read() {
        let mut conn = tcp();
        let limit = conn.rx_limit(6144);
        assert_eq!(limit, tcp::PREFIX_LEN + 6144 + RX_SLACK);
        assert!(conn.absorb(&vec![0; limit], 6144));
        assert!(!conn.aborted);
        assert!(!conn.absorb(b"x", 6144));
        assert!(conn.aborted && conn.closing && conn.rx.is_empty());
    }

    #[test]
    fn conn_stats_merge_into_the_shard_stats() {
        let mut a = crate::shard::Stats::default();
        a.conn.write_stalls = 1;
        a.conn.refused_rate = 2;
        let mut b = crate::shard::Stats::default();
        b.conn.write_stalls = 3;
        b.conn.accept_pauses = 4;
        a.merge(&b);
        assert_eq!(
            a.conn,
            ConnStats {
                write_stalls: 4,
                refused_rate: 2,
                accept_pauses: 4,
                ..ConnStats::default()
            }
        );
    }

    #[test]
    fn unsent_counts_a_send_in_flight() {
        let mut conn = tcp();
        conn.queue_json(b"{}");
        conn.in_flight = 10;
        assert_eq!(conn.unsent(), tcp::PREFIX_LEN + 2 + 10);
        conn.abort();
        assert_eq!(conn.unsent(), 10);
    }
}
