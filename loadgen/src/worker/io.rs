//! The socket edge of a worker: connecting (TCP, UDP, WebSocket upgrade), reading frames into the
//! session, writing what it transmits, closing. Non-blocking throughout; mio is edge-triggered, so
//! reads go on until `WouldBlock` (or a per-event budget, after which the client is queued to be
//! read again next turn) — except that a stream read that fills less than the buffer has taken
//! everything the socket held, and data arriving later raises a new edge: when the event did not
//! also report the peer's close, that read ends the event without the extra `WouldBlock` call
//! (a third of a TCP client's system calls per message).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Buf;
use imedge_protocol::frame::{tcp, udp, ws as ws_frame};
use imedge_protocol::session::Transport;
use imedge_protocol::{Kind, Message};
use mio::net::{TcpStream, UdpSocket};
use mio::{Interest, Token};
use socket2::{Domain, Protocol, Socket, Type};

use super::timer::Kind as TimerKind;
use super::ws::{self, Frame, Handshake};
use super::{dur_ns, Client, Link, Phase, Sock, Worker, CONNECT_RETRY_DELAY, LOGIN_RETRY};

/// Token of the timerfd (clients use `gen << 32 | index`).
pub const TIMER_TOKEN: usize = usize::MAX;
/// Bytes read per `read` call; more than the largest frame (4 + 6144 bytes TCP, 65,536 + 10
/// WebSocket is refused anyway by the server's own limit on what it sends us).
pub const READ_CHUNK: usize = 64 * 1024;
/// Reads per readiness event before the client is re-queued, so one busy socket cannot starve the
/// others.
pub const MAX_READS_PER_EVENT: usize = 16;
/// Datagrams per readiness event before the client is re-queued.
pub const MAX_DATAGRAMS_PER_EVENT: usize = 64;
/// Unwritten bytes above which a link counts as dead: the server stopped reading. Bounds memory
/// at a few hundred messages per client.
pub const MAX_WBUF: usize = 256 * 1024;
/// Largest UDP datagram accepted (the reference's limit, SPEC §1.2).
const MAX_DATAGRAM: usize = udp::DEFAULT_MAX_DATAGRAM;
/// Largest WebSocket payload accepted (the reference's limit, SPEC §1.3).
const MAX_WS_PAYLOAD: usize = ws_frame::MAX_PAYLOAD;
/// Partial input held for one client beyond which the link is dropped (a frame is never larger
/// than the WebSocket limit plus its header).
const MAX_RBUF: usize = MAX_WS_PAYLOAD + 16;

fn token(idx: usize, gen: u32) -> Token {
    Token(((gen as usize) << 32) | (idx & 0xffff_ffff))
}

impl Worker<'_> {
    /// A readiness event for a client socket.
    pub(super) fn on_ready(&mut self, token: usize, event: &mio::event::Event, now: u64) {
        let idx = token & 0xffff_ffff;
        let gen = (token >> 32) as u32;
        let Some(c) = self.clients.get(idx) else {
            return;
        };
        if c.gen != gen {
            return;
        }
        match c.link {
            Link::Connecting => self.check_connect(idx, now),
            Link::Handshake | Link::Up => {
                if event.is_writable() && self.flush(idx, now) {
                    self.drive(idx, now);
                    return;
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    let short_read_drains = !(event.is_read_closed() || event.is_error());
                    self.read(idx, now, short_read_drains);
                }
            }
            Link::Down | Link::Closed => return,
        }
        self.drive(idx, now);
    }

    /// Opens a new link for `idx`. `initial` = a login of the login phase (retried by the worker);
    /// otherwise a re-login the session asked for (it retries on its own schedule).
    pub(super) fn start_connect(&mut self, idx: usize, now: u64, initial: bool) {
        self.close_link(idx);
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        c.gen = c.gen.wrapping_add(1);
        if initial {
            c.connect_started_ns = now;
            if self.logins.first_attempt_ns == 0 {
                self.logins.first_attempt_ns = now;
            }
            c.retry_gen = c.retry_gen.wrapping_add(1);
            self.timers.push(
                now + dur_ns(LOGIN_RETRY),
                idx as u32,
                TimerKind::Retry,
                c.retry_gen,
            );
        }
        let result = match c.transport {
            Transport::Udp => connect_udp(c.server, c.source).map(|s| (Sock::Dgram(s), Link::Up)),
            Transport::Tcp | Transport::Ws => {
                connect_tcp(c.server, c.source).map(|s| (Sock::Stream(s), Link::Connecting))
            }
        };
        let (mut sock, link) = match result {
            Ok(ok) => ok,
            Err(_) => return self.connect_failed(idx, now),
        };
        let tok = token(idx, c.gen);
        let registered = match &mut sock {
            Sock::Stream(s) => {
                self.poll
                    .registry()
                    .register(s, tok, Interest::READABLE | Interest::WRITABLE)
            }
            Sock::Dgram(s) => self.poll.registry().register(s, tok, Interest::READABLE),
            Sock::None => Ok(()),
        };
        if registered.is_err() {
            return self.connect_failed(idx, now);
        }
        c.sock = sock;
        c.link = link;
        if link == Link::Up {
            c.session.handle_connected(self.anchor.instant(now));
        }
    }

    /// A connecting TCP socket became ready: connected, or failed.
    fn check_connect(&mut self, idx: usize, now: u64) {
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        let Sock::Stream(s) = &c.sock else {
            return;
        };
        match s.take_error() {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return self.connect_failed(idx, now),
        }
        match s.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotConnected => return,
            Err(_) => return self.connect_failed(idx, now),
        }
        let _ = s.set_nodelay(true);
        match c.transport {
            Transport::Ws => {
                c.link = Link::Handshake;
                let host = self
                    .config
                    .hosts
                    .iter()
                    .position(|h| *h == c.server.ip())
                    .unwrap_or(0);
                if let Some(req) = self.ws_request.get(host) {
                    c.wbuf.extend_from_slice(req);
                }
                if self.flush(idx, now) {
                    self.drive(idx, now);
                }
            }
            _ => {
                c.link = Link::Up;
                c.session.handle_connected(self.anchor.instant(now));
            }
        }
    }

    fn connect_failed(&mut self, idx: usize, now: u64) {
        self.logins.connect_errors += 1;
        self.close_link(idx);
        let login_phase = self.phase == Phase::Login;
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        if login_phase && !c.logged_in_once {
            c.retry_gen = c.retry_gen.wrapping_add(1);
            self.timers.push(
                now + dur_ns(CONNECT_RETRY_DELAY),
                idx as u32,
                TimerKind::Retry,
                c.retry_gen,
            );
        }
        // A re-login: the session asks again at its next re-login tick.
    }

    /// Drops the socket without ceremony.
    pub(super) fn close_link(&mut self, idx: usize) {
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        match &mut c.sock {
            Sock::Stream(s) => {
                let _ = self.poll.registry().deregister(s);
            }
            Sock::Dgram(s) => {
                let _ = self.poll.registry().deregister(s);
            }
            Sock::None => {}
        }
        c.sock = Sock::None;
        if c.link != Link::Closed {
            c.link = Link::Down;
        }
        c.wbuf.clear();
        c.rbuf.clear();
    }

    /// The session's `Close`: write what is queued (and a WebSocket close), then close for good.
    pub(super) fn close_graceful(&mut self, idx: usize) {
        let mask = self.next_mask();
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        if let Sock::Stream(s) = &mut c.sock {
            if c.transport == Transport::Ws && c.link == Link::Up {
                ws::put_control(&mut c.wbuf, 0x8, &1000u16.to_be_bytes(), mask);
            }
            if c.link != Link::Connecting {
                let _ = s.write(&c.wbuf);
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        self.close_link(idx);
        if let Some(c) = self.clients.get_mut(idx) {
            c.link = Link::Closed;
        }
    }

    /// The link failed: tell the session (which starts its re-login).
    fn link_failed(&mut self, idx: usize, now: u64) {
        self.close_link(idx);
        if let Some(c) = self.clients.get_mut(idx) {
            c.session.handle_disconnected(self.anchor.instant(now));
        }
    }

    /// Encodes a message the session transmits: into the write buffer, or as a datagram.
    pub(super) fn transmit(&mut self, idx: usize, msg: &Message<'_>) {
        let mask = self.next_mask();
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        match (&c.sock, c.transport) {
            (Sock::Dgram(s), _) => {
                self.udp_out.clear();
                udp::encode(msg, &mut self.udp_out);
                // A full socket buffer or an ICMP "unreachable" loses the datagram, as on a real
                // network: the session's QoS and keep-alive deal with it.
                let _ = s.send(&self.udp_out);
            }
            (Sock::Stream(_), Transport::Tcp) => tcp::encode(msg, &mut c.wbuf),
            (Sock::Stream(_), _) => ws_frame::encode_message(msg, Some(mask), &mut c.wbuf),
            (Sock::None, _) => {}
        }
    }

    /// Writes the pending bytes of `idx`; true if the link failed (the session was told).
    pub(super) fn flush(&mut self, idx: usize, now: u64) -> bool {
        let Some(c) = self.clients.get_mut(idx) else {
            return false;
        };
        if c.wbuf.is_empty() || !matches!(c.link, Link::Up | Link::Handshake) {
            return false;
        }
        let Sock::Stream(s) = &mut c.sock else {
            c.wbuf.clear();
            return false;
        };
        let mut failed = false;
        while !c.wbuf.is_empty() {
            match s.write(&c.wbuf) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => c.wbuf.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if c.wbuf.len() > MAX_WBUF {
            failed = true;
        }
        if failed {
            self.link_failed(idx, now);
        }
        failed
    }

    /// Reads everything available on `idx` (up to the per-event budget). `short_read_drains`:
    /// the read follows a readable edge with no close or error reported, so a short stream read
    /// means the socket is empty (see the module documentation).
    pub(super) fn read(&mut self, idx: usize, now: u64, short_read_drains: bool) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let outcome = match self.clients.get(idx).map(|c| (c.transport, c.link)) {
            Some((Transport::Udp, Link::Up)) => self.read_datagrams(idx, &mut scratch, now),
            Some((_, Link::Up | Link::Handshake)) => {
                self.read_stream(idx, &mut scratch, now, short_read_drains)
            }
            _ => ReadOutcome::Done,
        };
        self.scratch = scratch;
        match outcome {
            ReadOutcome::Done => {}
            ReadOutcome::More => self.pending_read.push(idx),
            ReadOutcome::Failed => self.link_failed(idx, now),
        }
    }

    fn read_datagrams(&mut self, idx: usize, scratch: &mut [u8], now: u64) -> ReadOutcome {
        let cap = udp::recv_buffer_len(MAX_DATAGRAM);
        for _ in 0..MAX_DATAGRAMS_PER_EVENT {
            let Some(Client {
                sock: Sock::Dgram(s),
                ..
            }) = self.clients.get(idx)
            else {
                return ReadOutcome::Done;
            };
            let Some(buf) = scratch.get_mut(..cap) else {
                return ReadOutcome::Done;
            };
            match s.recv(buf) {
                Ok(n) => {
                    if udp::decode(n, MAX_DATAGRAM).is_err() {
                        continue;
                    }
                    if let Some(body) = buf.get_mut(..n) {
                        // A datagram that is not a message is dropped, as the SDK does.
                        let _ = self.on_body(idx, body, now);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return ReadOutcome::Done,
                // ICMP unreachable for an earlier send: the session's keep-alive decides.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionRefused | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return ReadOutcome::Done,
            }
        }
        ReadOutcome::More
    }

    fn read_stream(
        &mut self,
        idx: usize,
        scratch: &mut [u8],
        now: u64,
        short_read_drains: bool,
    ) -> ReadOutcome {
        for _ in 0..MAX_READS_PER_EVENT {
            let Some(Client {
                sock: Sock::Stream(s),
                ..
            }) = self.clients.get_mut(idx)
            else {
                return ReadOutcome::Done;
            };
            let Some(buf) = scratch.get_mut(..READ_CHUNK) else {
                return ReadOutcome::Done;
            };
            let n = match s.read(buf) {
                Ok(0) => return ReadOutcome::Failed,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return ReadOutcome::Done,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return ReadOutcome::Failed,
            };
            if self.consume(idx, scratch, n, now).is_err() {
                return ReadOutcome::Failed;
            }
            if short_read_drains && n < READ_CHUNK {
                return ReadOutcome::Done;
            }
            if !matches!(
                self.clients.get(idx).map(|c| c.link),
                Some(Link::Up | Link::Handshake)
            ) {
                return ReadOutcome::Done;
            }
        }
        ReadOutcome::More
    }

    /// Takes `scratch[..n]` after what `idx` had buffered and handles every whole frame.
    fn consume(&mut self, idx: usize, scratch: &mut [u8], n: usize, now: u64) -> Result<(), ()> {
        let Some(c) = self.clients.get_mut(idx) else {
            return Ok(());
        };
        if c.rbuf.is_empty() {
            let input = scratch.get_mut(..n).ok_or(())?;
            let used = self.frames(idx, input, now)?;
            let rest = input.get(used..).unwrap_or_default();
            if !rest.is_empty() {
                if let Some(c) = self.clients.get_mut(idx) {
                    c.rbuf.extend_from_slice(rest);
                }
            }
        } else {
            c.rbuf.extend_from_slice(scratch.get(..n).ok_or(())?);
            let mut buf = std::mem::take(&mut c.rbuf);
            let used = self.frames(idx, &mut buf, now)?;
            buf.drain(..used.min(buf.len()));
            if buf.len() > MAX_RBUF {
                return Err(());
            }
            if let Some(c) = self.clients.get_mut(idx) {
                c.rbuf = buf;
            }
        }
        Ok(())
    }

    /// Handles the whole frames at the front of `input`; returns the bytes used.
    fn frames(&mut self, idx: usize, input: &mut [u8], now: u64) -> Result<usize, ()> {
        let mut at = 0;
        // Bounded by the input: every iteration consumes at least one byte or returns.
        while at < input.len() {
            let Some(c) = self.clients.get_mut(idx) else {
                return Ok(at);
            };
            let rest = input.get_mut(at..).ok_or(())?;
            match (c.transport, c.link) {
                (Transport::Ws, Link::Handshake) => match ws::handshake(rest) {
                    Handshake::Incomplete => return Ok(at),
                    Handshake::Refused => return Err(()),
                    Handshake::Accepted { consumed } => {
                        c.link = Link::Up;
                        c.session.handle_connected(self.anchor.instant(now));
                        at += consumed;
                    }
                },
                (Transport::Tcp, Link::Up) => match tcp::decode(rest, tcp::DEFAULT_MAX_BODY) {
                    Ok(Some(len)) => {
                        let body = rest
                            .get_mut(tcp::PREFIX_LEN..tcp::PREFIX_LEN + len)
                            .ok_or(())?;
                        self.on_body(idx, body, now)?;
                        at += tcp::PREFIX_LEN + len;
                    }
                    Ok(None) => return Ok(at),
                    Err(_) => return Err(()),
                },
                (Transport::Ws, Link::Up) => match ws::parse_frame(rest, MAX_WS_PAYLOAD) {
                    Ok(Some((frame, len))) => {
                        match frame {
                            Frame::Text(range) => {
                                let body = rest.get_mut(range).ok_or(())?;
                                self.on_body(idx, body, now)?;
                            }
                            Frame::Ping(range) => {
                                let mask = self.next_mask();
                                let payload = rest.get(range).unwrap_or_default().to_vec();
                                if let Some(c) = self.clients.get_mut(idx) {
                                    ws::put_control(&mut c.wbuf, 0xA, &payload, mask);
                                }
                            }
                            Frame::Pong => {}
                            Frame::Close => return Err(()),
                        }
                        at += len;
                    }
                    Ok(None) => return Ok(at),
                    Err(_) => return Err(()),
                },
                _ => return Ok(input.len()),
            }
        }
        Ok(at)
    }

    /// One message body from the server: decoded, counted, handed to the session.
    fn on_body(&mut self, idx: usize, body: &mut [u8], now: u64) -> Result<(), ()> {
        let msg = self.decoder.decode(body).map_err(|_| ())?;
        if msg.kind == Kind::CommonData {
            if let Some(text) = msg.text() {
                self.on_data(idx, text, now);
            }
        }
        let inst = self.instant(now);
        if let Some(c) = self.clients.get_mut(idx) {
            c.session.handle_message(inst, &msg);
        }
        Ok(())
    }
}

enum ReadOutcome {
    Done,
    More,
    Failed,
}

fn unspecified(server: SocketAddr) -> IpAddr {
    match server {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// A non-blocking TCP connect, from `source` if given (the port is chosen at connect time with
/// IP_BIND_ADDRESS_NO_PORT, so one source address serves ~28k connections per destination).
fn connect_tcp(server: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(server),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        if ip.is_ipv4() {
            set_bind_address_no_port(&socket);
        }
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&server.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// A UDP socket of its own (the server tells clients apart by source port), connected to the
/// server.
fn connect_udp(server: SocketAddr, source: Option<IpAddr>) -> std::io::Result<UdpSocket> {
    let local = SocketAddr::new(source.unwrap_or_else(|| unspecified(server)), 0);
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(server)?;
    socket.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(socket))
}

/// IP_BIND_ADDRESS_NO_PORT: defer the port choice of a bound socket to `connect`, so the 4-tuple,
/// not the source port alone, must be unique. Best effort: without it a source serves fewer
/// connections.
fn set_bind_address_no_port(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the size passed.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast::<libc::c_void>(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
