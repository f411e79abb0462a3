//! The epoll backend (through mio): one loop per core, edge-triggered, owning its listeners,
//! connections, UDP socket and shard.
//!
//! A loop turn: wait (until the shard's next timer, or at once if work is left over) → accept,
//! read and receive everything ready, feeding whole message bodies to the shard → drain the
//! inbox → run due timers → write every connection that has queued output → wake the cores it
//! mailed. Bodies are decoded where they lie in the connection's receive buffer.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use imedge_protocol::frame::udp;
use imedge_protocol::session::Transport;
use imedge_protocol::Message;
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::conn::{ConnState, Next};
use super::mesh::{Mail, Mesh, Migrant, Outgoing};
use super::Limits;
use crate::shard::{Adopt, ConnId, CoreId, Endpoint, Now, Outbox, Shard, ShardMsg};

const TCP_LISTENER: Token = Token(usize::MAX - 1);
const WS_LISTENER: Token = Token(usize::MAX - 2);
const UDP_SOCKET: Token = Token(usize::MAX - 3);
/// Token of the waker other cores use to announce mail.
pub const WAKER: Token = Token(usize::MAX - 4);

/// Bytes read from a socket per `read` call.
const READ_CHUNK: usize = 64 * 1024;

/// Readiness events handled per wait.
const EVENTS_CAPACITY: usize = 1024;

/// Work bounds per loop turn, so that one busy source cannot starve the others: datagrams
/// received, mail taken from the inbox. What is left is taken on the next turn without waiting.
const DATAGRAMS_PER_TURN: usize = 1024;
const MAIL_PER_TURN: usize = 4096;

/// How long accepting pauses after the process runs out of file descriptors (EMFILE/ENFILE):
/// long enough not to spin on a listener that stays readable, short enough to resume promptly
/// once connections close.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The sockets one core listens on.
#[derive(Debug, Default)]
pub struct Listeners {
    /// TCP gateway.
    pub tcp: Option<TcpListener>,
    /// WebSocket gateway.
    pub ws: Option<TcpListener>,
    /// UDP gateway.
    pub udp: Option<UdpSocket>,
}

struct Conn {
    stream: TcpStream,
    state: ConnState,
    /// Distinguishes this connection from earlier ones in the same slab slot.
    generation: u32,
    /// Set by the shard: move to this core after the current message.
    migrate: Option<(CoreId, Adopt)>,
}

/// One core's event loop.
pub struct EpollCore {
    core: CoreId,
    poll: Poll,
    shard: Shard,
    conns: Slab<Conn>,
    listeners: Listeners,
    mesh: Arc<Mesh>,
    outgoing: Outgoing,
    limits: Limits,
    scratch: Vec<u8>,
    /// Receive buffer of the UDP socket; datagrams are split off it.
    udp_rx: BytesMut,
    /// Encoding buffer for outgoing datagrams.
    udp_tx: BytesMut,
    /// Connections with output to write (may repeat).
    dirty: Vec<usize>,
    next_generation: u32,
    accept_paused_until: Option<Instant>,
    /// A source was left with work at the end of the last turn.
    udp_more: bool,
    shutting_down: bool,
}

impl std::fmt::Debug for EpollCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpollCore")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

/// The time for this turn.
fn now() -> Now {
    let epoch_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Now {
        mono: Instant::now(),
        epoch_ms,
    }
}

fn conn_id(index: usize, generation: u32) -> ConnId {
    ConnId((u64::from(generation) << 32) | index as u64)
}

fn split_id(id: ConnId) -> (usize, u32) {
    // The low half is the slab index (always < 2^32 here), the high half the generation.
    ((id.0 & 0xffff_ffff) as usize, (id.0 >> 32) as u32)
}

/// The shard's [`Outbox`] on this core.
struct Io<'a> {
    core: CoreId,
    conns: &'a mut Slab<Conn>,
    udp: Option<&'a UdpSocket>,
    udp_tx: &'a mut BytesMut,
    dirty: &'a mut Vec<usize>,
    outgoing: &'a mut Outgoing,
}

impl Io<'_> {
    fn conn(&mut self, id: ConnId) -> Option<(usize, &mut Conn)> {
        let (index, generation) = split_id(id);
        self.conns
            .get_mut(index)
            .filter(|c| c.generation == generation)
            .map(|c| (index, c))
    }

    fn send_datagram(&mut self, to: SocketAddr) {
        if let Some(socket) = self.udp {
            if let Err(error) = socket.send_to(self.udp_tx, to) {
                // UDP is lossy by nature; QoS resends cover what matters.
                tracing::debug!(%to, %error, "datagram not sent");
            }
        }
        self.udp_tx.clear();
    }
}

impl Outbox for Io<'_> {
    fn send(&mut self, to: Endpoint, msg: &Message<'_>) {
        match to {
            Endpoint::Conn(id) => {
                if let Some((index, conn)) = self.conn(id) {
                    conn.state.queue(msg);
                    self.dirty.push(index);
                }
            }
            Endpoint::Udp(addr) => {
                udp::encode(msg, self.udp_tx);
                self.send_datagram(addr);
            }
        }
    }

    fn send_json(&mut self, to: Endpoint, json: &Bytes) {
        match to {
            Endpoint::Conn(id) => {
                if let Some((index, conn)) = self.conn(id) {
                    conn.state.queue_json(json);
                    self.dirty.push(index);
                }
            }
            Endpoint::Udp(addr) => {
                if let Some(socket) = self.udp {
                    if let Err(error) = socket.send_to(json, addr) {
                        tracing::debug!(to = %addr, %error, "datagram not sent");
                    }
                }
            }
        }
    }

    fn close(&mut self, id: ConnId) {
        if let Some((index, conn)) = self.conn(id) {
            conn.state.begin_close();
            self.dirty.push(index);
        }
    }

    fn migrate(&mut self, id: ConnId, core: CoreId, login: Adopt) {
        if let Some((_, conn)) = self.conn(id) {
            conn.migrate = Some((core, login));
        }
    }

    fn mail(&mut self, core: CoreId, msg: ShardMsg) {
        debug_assert_ne!(core, self.core);
        self.outgoing.send(core, Mail::Shard(msg));
    }
}

impl EpollCore {
    /// A loop for `core` with its listeners, registered with `poll`.
    pub fn new(
        core: CoreId,
        poll: Poll,
        shard: Shard,
        mut listeners: Listeners,
        mesh: Arc<Mesh>,
        limits: Limits,
    ) -> io::Result<Self> {
        let registry = poll.registry();
        if let Some(l) = &mut listeners.tcp {
            registry.register(l, TCP_LISTENER, Interest::READABLE)?;
        }
        if let Some(l) = &mut listeners.ws {
            registry.register(l, WS_LISTENER, Interest::READABLE)?;
        }
        if let Some(s) = &mut listeners.udp {
            registry.register(s, UDP_SOCKET, Interest::READABLE)?;
        }
        Ok(Self {
            core,
            poll,
            shard,
            conns: Slab::new(),
            listeners,
            outgoing: Outgoing::new(Arc::clone(&mesh)),
            mesh,
            limits,
            scratch: vec![0; READ_CHUNK],
            udp_rx: BytesMut::new(),
            udp_tx: BytesMut::new(),
            dirty: Vec::new(),
            next_generation: 0,
            accept_paused_until: None,
            udp_more: false,
            shutting_down: false,
        })
    }

    /// Runs until a [`Mail::Shutdown`] has been handled.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        while !self.shutting_down {
            let timeout = self.wait_timeout();
            if let Err(error) = self.poll.poll(&mut events, timeout) {
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
            let now = now();
            for event in &events {
                match event.token() {
                    TCP_LISTENER => self.accept(now, Transport::Tcp),
                    WS_LISTENER => self.accept(now, Transport::Ws),
                    UDP_SOCKET => self.udp_more = true,
                    WAKER => {}
                    Token(index) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read(now, index);
                        }
                        if event.is_writable() {
                            self.dirty.push(index);
                        }
                    }
                }
            }
            if self.udp_more {
                self.receive(now);
            }
            if self
                .accept_paused_until
                .is_some_and(|until| until <= now.mono)
            {
                self.accept_paused_until = None;
                self.accept(now, Transport::Tcp);
                self.accept(now, Transport::Ws);
            }
            self.drain_inbox(now);
            if self.shard.poll_timeout().is_some_and(|at| at <= now.mono) {
                self.with_shard(|shard, io| shard.handle_timeout(now, io));
            }
            self.flush(now);
            self.outgoing.flush();
        }
        self.close_all();
        Ok(())
    }

    fn wait_timeout(&self) -> Option<Duration> {
        if self.udp_more || self.outgoing.has_backlog() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        [self.shard.poll_timeout(), self.accept_paused_until]
            .into_iter()
            .flatten()
            .min()
            // Round up so a timer is never polled a hair early and spun on.
            .map(|at| at.saturating_duration_since(now) + Duration::from_micros(500))
    }

    /// Calls the shard with this core's [`Outbox`].
    fn with_shard<R>(&mut self, f: impl FnOnce(&mut Shard, &mut Io<'_>) -> R) -> R {
        let mut io = Io {
            core: self.core,
            conns: &mut self.conns,
            udp: self.listeners.udp.as_ref(),
            udp_tx: &mut self.udp_tx,
            dirty: &mut self.dirty,
            outgoing: &mut self.outgoing,
        };
        f(&mut self.shard, &mut io)
    }

    fn accept(&mut self, now: Now, transport: Transport) {
        if self.accept_paused_until.is_some() || self.shutting_down {
            return;
        }
        loop {
            let listener = match transport {
                Transport::Tcp => self.listeners.tcp.as_ref(),
                _ => self.listeners.ws.as_ref(),
            };
            let Some(listener) = listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.add_conn(now, stream, ConnState::new(transport, peer), None)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) => {
                    tracing::warn!(error = %e, "out of file descriptors: pausing accept");
                    self.accept_paused_until = Some(now.mono + ACCEPT_PAUSE);
                    return;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
    }

    /// Registers a connection (accepted here, or migrated here with a login to finish).
    fn add_conn(
        &mut self,
        now: Now,
        mut stream: TcpStream,
        state: ConnState,
        adopt: Option<Adopt>,
    ) {
        if adopt.is_none() {
            // SPEC §1.1: TCP_NODELAY and SO_KEEPALIVE on, like the reference.
            let _ = stream.set_nodelay(true);
            let _ = socket2::SockRef::from(&stream).set_keepalive(true);
        }
        let entry = self.conns.vacant_entry();
        let index = entry.key();
        if let Err(error) = self.poll.registry().register(
            &mut stream,
            Token(index),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(%error, "cannot register a connection");
            return;
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let transport = state.transport;
        let peer = state.peer;
        entry.insert(Conn {
            stream,
            state,
            generation,
            migrate: None,
        });
        let id = conn_id(index, generation);
        match adopt {
            None => self.shard.on_open(now, id, transport, peer),
            Some(adopt) => {
                self.with_shard(|shard, io| shard.on_adopted(now, id, adopt, io));
                // Bytes that arrived behind the login came along in the receive buffer.
                self.process(now, index);
                self.dirty.push(index);
            }
        }
    }

    /// Reads everything available on a connection, then hands its complete messages to the shard.
    fn read(&mut self, now: Now, index: usize) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        let mut eof = false;
        loop {
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => conn
                    .state
                    .rx
                    .extend_from_slice(self.scratch.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        self.process(now, index);
        if eof {
            self.close_now(now, index);
        }
    }

    /// Hands the complete messages in a connection's receive buffer to the shard, one by one,
    /// stopping if the connection closes or migrates.
    fn process(&mut self, now: Now, index: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(index) else {
                return;
            };
            if let Some((core, adopt)) = conn.migrate.take() {
                self.migrate(index, core, adopt);
                return;
            }
            let id = conn_id(index, conn.generation);
            let max_body = self.limits.tcp_max_body;
            match conn.state.next(max_body) {
                Next::Body(mut body) => {
                    self.with_shard(|shard, io| shard.on_frame(now, id, &mut body, io));
                }
                Next::Wait => return,
                Next::Close => {
                    self.shard.on_frame_error();
                    self.dirty.push(index);
                    return;
                }
            }
        }
    }

    fn migrate(&mut self, index: usize, core: CoreId, adopt: Adopt) {
        if !self.conns.contains(index) {
            return;
        }
        let mut conn = self.conns.remove(index);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        let migrant = Migrant {
            stream: conn.stream,
            conn: conn.state,
            adopt,
        };
        self.outgoing.send(core, Mail::Adopt(Box::new(migrant)));
    }

    fn receive(&mut self, now: Now) {
        self.udp_more = false;
        let max = self.limits.udp_max_datagram;
        for _ in 0..DATAGRAMS_PER_TURN {
            let Some(socket) = self.listeners.udp.as_ref() else {
                return;
            };
            self.udp_rx.clear();
            self.udp_rx.resize(udp::recv_buffer_len(max), 0);
            match socket.recv_from(&mut self.udp_rx) {
                Ok((n, from)) => {
                    if udp::decode(n, max).is_err() {
                        self.with_shard(|shard, io| shard.on_oversize_datagram(now, from, io));
                    } else {
                        let datagram = self.udp_rx.split_to(n);
                        self.with_shard(|shard, io| shard.on_datagram(now, from, datagram, io));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ICMP errors from earlier sends surface here; they concern one peer only.
                    tracing::debug!(error = %e, "UDP receive error");
                }
            }
        }
        self.udp_more = true;
    }

    fn drain_inbox(&mut self, now: Now) {
        for _ in 0..MAIL_PER_TURN {
            let Some(mail) = self.mesh.pop(self.core) else {
                return;
            };
            match mail {
                Mail::Shard(msg) => {
                    self.with_shard(|shard, io| shard.on_mail(now, msg, io));
                }
                Mail::Adopt(migrant) => {
                    let Migrant {
                        stream,
                        conn,
                        adopt,
                    } = *migrant;
                    self.add_conn(now, stream, conn, Some(adopt));
                }
                Mail::Query(query) => super::answer(&self.shard, query),
                Mail::Shutdown => {
                    self.shutting_down = true;
                    return;
                }
            }
        }
        // More mail is waiting: come back without sleeping.
        self.udp_more = true;
    }

    /// Writes queued output; closes connections whose close was asked for once it is written.
    fn flush(&mut self, now: Now) {
        while let Some(index) = self.dirty.pop() {
            let Some(conn) = self.conns.get_mut(index) else {
                continue;
            };
            if conn.migrate.is_some() {
                continue;
            }
            let mut failed = false;
            while !conn.state.tx.is_empty() {
                match conn.stream.write(&conn.state.tx) {
                    Ok(0) => {
                        failed = true;
                        break;
                    }
                    Ok(n) => {
                        let _ = conn.state.tx.split_to(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if failed || (conn.state.closing && conn.state.tx.is_empty()) {
                self.close_now(now, index);
            }
        }
    }

    /// Drops a connection and tells the shard.
    fn close_now(&mut self, now: Now, index: usize) {
        if !self.conns.contains(index) {
            return;
        }
        let mut conn = self.conns.remove(index);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        let id = conn_id(index, conn.generation);
        self.with_shard(|shard, io| shard.on_closed(now, id, io));
    }

    /// Shutdown: say goodbye on every connection, write what can be written, close.
    fn close_all(&mut self) {
        let now = now();
        let indices: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for index in indices {
            if let Some(conn) = self.conns.get_mut(index) {
                conn.state.begin_close();
                let _ = conn.stream.write(&conn.state.tx);
            }
            self.close_now(now, index);
        }
        self.outgoing.flush();
    }
}

/// `EMFILE`: this process has no free file descriptor.
const EMFILE: i32 = 24;
/// `ENFILE`: the system has no free file descriptor.
const ENFILE: i32 = 23;
