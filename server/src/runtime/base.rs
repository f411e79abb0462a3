//! The half of a core's event loop that does not depend on the I/O backend: the shard, the
//! connections' transport state, the [`Outbox`] the shard answers through, the inbox, the
//! timers and the UDP dispatch. The epoll and io_uring loops each drive one [`Base`]; they differ
//! only in how bytes get in and out of the sockets.
//!
//! The loop turn is written once, in [`run`], over the small [`Backend`] trait both backends
//! implement (wait, handle the I/O found, resume accepting, adopt, flush, close all). Within
//! their I/O they call [`Base::process`] after appending received bytes to a connection's `rx`
//! (and perform the migration it may return), or [`Base::process_received`] on bytes parsed in
//! place, and [`Base::datagram`] per UDP datagram.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use imedge_protocol::frame::udp;
use imedge_protocol::Message;
use slab::Slab;

use super::admit::{Admission, Refusal, Ticket};
use super::conn::{ConnState, ConnStats, Next};
use super::mesh::{Mail, Mesh, Migrant, Outgoing};
use super::Limits;
use crate::shard::{Adopt, ConnId, CoreId, Endpoint, Now, Outbox, Shard, ShardMsg};
use crate::timer::{TimerKey, TimerWheel};

/// Mail taken from the inbox per loop turn, so that one busy sender cannot starve the sockets.
/// What is left is taken on the next turn without waiting.
pub const MAIL_PER_TURN: usize = 4096;

/// How long accepting pauses after the process runs out of file descriptors (EMFILE/ENFILE):
/// long enough not to spin on a listener that stays readable, short enough to resume promptly
/// once connections close.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A reply to a UDP source that is not logged in is at most this many times the size of the
/// request (SPEC S4): a spoofed datagram must not make the server send a victim more than it
/// was sent. The reference's 301 to a keep-alive is ~3× (98 → 297 bytes, the request reflected);
/// imedge's 301 reflects nothing (~110 bytes), so the Java UDP SDK's ~95-byte keep-alive still
/// gets the 301 it needs to log in again, while a 10-byte datagram gets none.
pub const UDP_REPLY_MAX_RATIO: usize = 3;

/// `EMFILE`: this process has no free file descriptor.
pub const EMFILE: i32 = 24;
/// `ENFILE`: the system has no free file descriptor.
pub const ENFILE: i32 = 23;

/// A TCP or WebSocket connection of this core.
#[derive(Debug)]
pub struct Conn<S> {
    /// The backend's handle on the socket (epoll: the stream; io_uring: its socket's key).
    pub sock: S,
    /// Framing, WebSocket phase, buffered input and queued output.
    pub state: ConnState,
    /// Distinguishes this connection from earlier ones in the same slab slot.
    pub generation: u32,
    /// Set by the shard: move to this core after the current message.
    pub migrate: Option<(CoreId, Adopt)>,
    /// Output has been waiting since then with no byte written (`None`: nothing waits): the
    /// write-stall clock.
    write_since: Option<Instant>,
    /// The write-stall check in the loop's wheel.
    write_timer: Option<TimerKey>,
    /// Its place among the connections not logged in (`None` once logged in, or if it came
    /// logged in from another core).
    ticket: Option<Ticket>,
    /// The login deadline in the loop's wheel.
    login_timer: Option<TimerKey>,
}

/// Why the loop set a timer on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnTimer {
    /// Check whether output has waited `--write-stall-timeout` without progress.
    Write,
    /// `--login-timeout` after the accept: close the connection unless it logged in.
    Login,
}

/// The backend-independent state of one core's loop.
pub struct Base<S> {
    /// This core.
    pub core: CoreId,
    /// The sessions of the users that hash to this core.
    pub shard: Shard,
    /// TCP and WebSocket connections; the slab index is half of their [`ConnId`].
    pub conns: Slab<Conn<S>>,
    /// The UDP gateway socket (non-blocking): both backends receive on it their own way and
    /// send datagrams with a direct `sendto`, which never waits.
    pub udp: Option<UdpSocket>,
    mesh: Arc<Mesh>,
    /// Mail for other cores, and whom to wake at the end of the turn.
    pub outgoing: Outgoing,
    /// Frame limits.
    pub limits: Limits,
    /// Encoding buffer for outgoing datagrams.
    udp_tx: BytesMut,
    /// Connections with output to write or a close to carry out (may repeat).
    pub dirty: Vec<usize>,
    /// The connections' own deadlines (write stalls), keyed by slab index and generation: a
    /// wheel beside the shard's, so that the transport's timers stay out of the sessions'.
    timers: TimerWheel<(usize, u32, ConnTimer)>,
    /// The limits this core's connections hit.
    pub stats: ConnStats,
    /// Admission of new connections, shared by the cores.
    admission: Arc<Admission>,
    next_generation: u32,
    /// Accepting is paused until then: the process ran out of file descriptors.
    pub accept_paused_until: Option<Instant>,
    /// Mail was left in the inbox: the next wait must not sleep.
    pub more: bool,
    /// A [`Mail::Shutdown`] was taken: the loop closes everything and ends.
    pub shutting_down: bool,
    /// Mail this turn may still take.
    mail_budget: usize,
}

impl<S> std::fmt::Debug for Base<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base")
            .field("core", &self.core)
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

/// What an I/O backend (epoll, io_uring) does in a loop turn; the turn itself is written once,
/// in [`run`].
pub trait Backend {
    /// The backend's handle on a connection's socket.
    type Sock;
    /// The backend-independent state.
    fn base(&mut self) -> &mut Base<Self::Sock>;
    /// Waits for I/O, at most `timeout` (`None`: until something happens). The backend may
    /// shorten it (epoll: datagrams left in the socket).
    ///
    /// # Errors
    /// The wait itself failed (not for a signal or a timeout): the loop ends.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Handles what the wait found: accepted connections, received bytes and datagrams (handed
    /// to the shard through the base), finished sends.
    fn handle_io(&mut self, now: Now);
    /// Accepting may go on after a pause ([`Base::pause_accept`]).
    fn resume_accepting(&mut self, now: Now);
    /// Registers a connection that migrated here (from [`Base::drain_inbox`]).
    fn adopt(&mut self, now: Now, migrant: Migrant);
    /// Writes (or issues sends for) the connections in [`Base::dirty`], and closes those whose
    /// close is due.
    fn flush(&mut self, now: Now);
    /// Shutdown: says goodbye on every connection and closes them.
    fn close_all(&mut self);
}

/// Runs a core's loop until a [`Mail::Shutdown`] has been handled. A turn: wait (until the
/// next timer, or not at all if work was left over) → I/O → flush what the I/O finished → resume
/// accepting after a pause → the inbox → due timers → flush → wake the cores mailed.
///
/// # Errors
/// The backend's wait failed.
pub fn run<B: Backend>(mut backend: B) -> io::Result<()> {
    while !backend.base().shutting_down {
        let timeout = backend.base().wait_timeout();
        backend.wait(timeout)?;
        let now = now();
        backend.handle_io(now);
        // Carry out what the I/O finished — a close that waited for its last send, the rest of
        // a partial send — before any mail is answered: a peer that saw its goodbye must not be
        // reported online by a question asked after it.
        backend.flush(now);
        if backend.base().accept_pause_over(now) {
            backend.resume_accepting(now);
        }
        while let Some(migrant) = backend.base().drain_inbox(now) {
            backend.adopt(now, *migrant);
        }
        backend.base().run_timers(now);
        backend.flush(now);
        backend.base().outgoing.flush();
    }
    backend.close_all();
    Ok(())
}

/// The time for this turn.
pub fn now() -> Now {
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
struct Io<'a, S> {
    core: CoreId,
    conns: &'a mut Slab<Conn<S>>,
    udp: Option<&'a UdpSocket>,
    udp_tx: &'a mut BytesMut,
    dirty: &'a mut Vec<usize>,
    outgoing: &'a mut Outgoing,
    /// `--max-send-buffer`.
    max_send: usize,
    stats: &'a mut ConnStats,
    admission: &'a Admission,
}

impl<S> Io<'_, S> {
    fn conn(&mut self, id: ConnId) -> Option<(usize, &mut Conn<S>)> {
        let (index, generation) = split_id(id);
        self.conns
            .get_mut(index)
            .filter(|c| c.generation == generation)
            .map(|c| (index, c))
    }

    fn send_datagram(&self, bytes: &[u8], to: SocketAddr) {
        send_datagram(self.udp, bytes, to);
    }

    /// Queues output on a connection (by `queue`), disconnecting a slow consumer whose unsent
    /// output passes its budget: its messages waiting for an ACK take the lost path (stored for
    /// its next login), rather than the server buffering without bound.
    fn queue(&mut self, id: ConnId, queue: impl FnOnce(&mut ConnState)) {
        let max_send = self.max_send;
        let Some((index, conn)) = self.conn(id) else {
            return;
        };
        queue(&mut conn.state);
        if !conn.state.aborted && conn.state.unsent() > max_send {
            tracing::debug!(peer = %conn.state.peer, "slow consumer: closing");
            conn.state.abort();
            self.stats.send_overflows += 1;
        }
        self.dirty.push(index);
    }
}

fn send_datagram(udp: Option<&UdpSocket>, bytes: &[u8], to: SocketAddr) {
    if let Some(socket) = udp {
        if let Err(error) = socket.send_to(bytes, to) {
            // UDP is lossy by nature; QoS resends cover what matters.
            tracing::debug!(%to, %error, "datagram not sent");
        }
    }
}

impl<S> Outbox for Io<'_, S> {
    fn send(&mut self, to: Endpoint, msg: &Message<'_>) {
        match to {
            Endpoint::Conn(id) => self.queue(id, |state| state.queue(msg)),
            Endpoint::Udp(addr) => {
                udp::encode(msg, self.udp_tx);
                self.send_datagram(self.udp_tx, addr);
                self.udp_tx.clear();
            }
        }
    }

    fn send_json(&mut self, to: Endpoint, json: &Bytes) {
        match to {
            Endpoint::Conn(id) => self.queue(id, |state| state.queue_json(json)),
            Endpoint::Udp(addr) => self.send_datagram(json, addr),
        }
    }

    fn send_unauthenticated(&mut self, to: SocketAddr, msg: &Message<'_>, request_len: usize) {
        udp::encode(msg, self.udp_tx);
        if self.udp_tx.len() > request_len.saturating_mul(UDP_REPLY_MAX_RATIO) {
            self.stats.udp_replies_too_large += 1;
        } else if !self.admission.udp_reply(to.ip(), Instant::now()) {
            self.stats.udp_replies_limited += 1;
        } else {
            self.send_datagram(self.udp_tx, to);
        }
        self.udp_tx.clear();
    }

    fn close(&mut self, id: ConnId) {
        if let Some((index, conn)) = self.conn(id) {
            conn.state.begin_close();
            self.dirty.push(index);
        }
    }

    fn migrate(&mut self, id: ConnId, core: CoreId, login: Adopt) {
        if let Some((index, conn)) = self.conn(id) {
            conn.migrate = Some((core, login));
            // Outside a frame's handling (a verify answered by mail) nothing else picks the
            // migration up: the backend's flush carries it out.
            self.dirty.push(index);
        }
    }

    fn mail(&mut self, core: CoreId, msg: ShardMsg) {
        debug_assert_ne!(core, self.core);
        // Refused mail is counted by the mesh and has a defined outcome for its sender (see
        // `mesh`): a relayed message stays unacknowledged, a datagram or UDP login is lost.
        let _ = self.outgoing.send(core, Mail::Shard(msg));
    }
}

impl<S> Base<S> {
    /// The loop state of `core`.
    pub fn new(
        core: CoreId,
        shard: Shard,
        udp: Option<UdpSocket>,
        mesh: Arc<Mesh>,
        (limits, admission): (Limits, Arc<Admission>),
    ) -> Self {
        Self {
            core,
            shard,
            conns: Slab::new(),
            udp,
            outgoing: Outgoing::new(Arc::clone(&mesh)),
            mesh,
            limits,
            udp_tx: BytesMut::new(),
            dirty: Vec::new(),
            timers: TimerWheel::new(Instant::now()),
            stats: ConnStats::default(),
            admission,
            next_generation: 0,
            accept_paused_until: None,
            more: false,
            shutting_down: false,
            mail_budget: MAIL_PER_TURN,
        }
    }

    /// How long the next wait may sleep: not at all if work was left over (this clears
    /// [`Base::more`]), else until the shard's next timer or the end of an accept pause (`None`:
    /// until something happens).
    pub fn wait_timeout(&mut self) -> Option<Duration> {
        if std::mem::take(&mut self.more) || self.outgoing.has_backlog() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        [
            self.shard.poll_timeout(),
            self.timers.next_expiry(),
            self.accept_paused_until,
        ]
        .into_iter()
        .flatten()
        .min()
        // Round up so a timer is never polled a hair early and spun on.
        .map(|at| at.saturating_duration_since(now) + Duration::from_micros(500))
    }

    /// Stops accepting for [`ACCEPT_PAUSE`] (counted): the process is out of descriptors, or
    /// accepting failed in a way that may persist. Accepting again at once would spin on a
    /// listener that stays readable (epoll) or an accept that fails at once (io_uring).
    pub fn pause_accept(&mut self, now: Now, error: &io::Error) {
        if self.accept_paused_until.is_some() {
            return;
        }
        self.stats.accept_pauses += 1;
        tracing::warn!(%error, pauses = self.stats.accept_pauses, "accept failed: pausing accept");
        self.accept_paused_until = Some(now.mono + ACCEPT_PAUSE);
    }

    /// Whether an accept pause ends at `now` (and clears it).
    pub fn accept_pause_over(&mut self, now: Now) -> bool {
        let over = self
            .accept_paused_until
            .is_some_and(|until| until <= now.mono);
        if over {
            self.accept_paused_until = None;
        }
        over
    }

    /// Calls the shard with this core's [`Outbox`].
    pub fn with_shard<R>(&mut self, f: impl FnOnce(&mut Shard, &mut dyn Outbox) -> R) -> R {
        let mut io = Io {
            core: self.core,
            conns: &mut self.conns,
            udp: self.udp.as_ref(),
            udp_tx: &mut self.udp_tx,
            dirty: &mut self.dirty,
            outgoing: &mut self.outgoing,
            max_send: self.limits.max_send_buffer,
            stats: &mut self.stats,
            admission: &self.admission,
        };
        f(&mut self.shard, &mut io)
    }

    /// Whether a connection from `peer`, just accepted, may stay: its ticket, or `None` (the
    /// refusal counted) if the backend must close it at once.
    pub fn admit(&mut self, now: Now, peer: SocketAddr) -> Option<Ticket> {
        match self.admission.admit(peer.ip(), now.mono) {
            Ok(ticket) => Some(ticket),
            Err(refusal) => {
                tracing::debug!(%peer, ?refusal, "connection refused");
                let counter = match refusal {
                    Refusal::Unauthenticated => &mut self.stats.refused_unauthenticated,
                    Refusal::PerIp => &mut self.stats.refused_per_ip,
                    Refusal::Rate => &mut self.stats.refused_rate,
                };
                *counter += 1;
                None
            }
        }
    }

    fn insert(&mut self, sock: S, state: ConnState) -> (usize, ConnId) {
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let index = self.conns.insert(Conn {
            sock,
            state,
            generation,
            migrate: None,
            write_since: None,
            write_timer: None,
            ticket: None,
            login_timer: None,
        });
        (index, conn_id(index, generation))
    }

    /// A connection accepted on this core and admitted ([`Base::admit`]): its session starts,
    /// and its login deadline. Returns its index.
    pub fn open(&mut self, now: Now, sock: S, state: ConnState, ticket: Ticket) -> usize {
        let (transport, peer) = (state.transport, state.peer);
        let (index, id) = self.insert(sock, state);
        let at = now.mono + self.limits.login_timeout;
        if let Some(conn) = self.conns.get_mut(index) {
            conn.ticket = Some(ticket);
            let timer = (index, conn.generation, ConnTimer::Login);
            conn.login_timer = Some(self.timers.insert(at, timer));
        }
        self.shard.on_open(now, id, transport, peer);
        index
    }

    /// Gives back the admission ticket of a connection that has logged in.
    fn check_login(&mut self, index: usize) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        if conn.ticket.is_some() && self.shard.is_logged_in(conn_id(index, conn.generation)) {
            conn.ticket = None;
            if let Some(key) = conn.login_timer.take() {
                self.timers.cancel(key);
            }
        }
    }

    /// A connection that migrated here with a verified login: the shard finishes the login.
    /// Returns its index; the backend then hands the bytes that came along to
    /// [`Base::process`].
    pub fn adopt(&mut self, now: Now, sock: S, state: ConnState, adopt: Adopt) -> usize {
        let (index, id) = self.insert(sock, state);
        self.with_shard(|shard, io| shard.on_adopted(now, id, adopt, io));
        self.dirty.push(index);
        index
    }

    /// Hands the complete messages in a connection's receive buffer to the shard, one by one,
    /// stopping if the connection closes or is to migrate. Returns the migration, which the
    /// backend carries out (the shard has already forgotten the connection).
    pub fn process(&mut self, now: Now, index: usize) -> Option<(CoreId, Adopt)> {
        let migrate = self.process_rx(now, index);
        if migrate.is_none() {
            self.check_login(index);
        }
        migrate
    }

    fn process_rx(&mut self, now: Now, index: usize) -> Option<(CoreId, Adopt)> {
        loop {
            let conn = self.conns.get_mut(index)?;
            if let Some(migrate) = conn.migrate.take() {
                return Some(migrate);
            }
            if conn.state.closing {
                // A closing connection reads no more: what it received is dropped.
                conn.state.rx.clear();
                self.dirty.push(index);
                return None;
            }
            let id = conn_id(index, conn.generation);
            match conn.state.next(self.limits.tcp_max_body) {
                Next::Body(body) if self.limits.echo => {
                    conn.state.queue_json(&body);
                    self.dirty.push(index);
                }
                Next::Body(mut body) => {
                    self.with_shard(|shard, io| shard.on_frame(now, id, &mut body, io));
                }
                Next::Wait => {
                    // The transport may have answered by itself (the WebSocket upgrade, a pong).
                    if !conn.state.tx.is_empty() {
                        self.dirty.push(index);
                    }
                    conn.state.release_empty_buffers();
                    return None;
                }
                Next::Close => {
                    self.shard.on_frame_error();
                    self.dirty.push(index);
                    return None;
                }
            }
        }
    }

    /// Whether bytes received on a connection may be parsed where they lie
    /// ([`Base::process_received`]) rather than appended to its `rx`: see
    /// [`ConnState::takes_in_place`]; also not while it migrates.
    pub fn takes_in_place(&self, index: usize) -> bool {
        self.conns
            .get(index)
            .is_some_and(|conn| conn.migrate.is_none() && conn.state.takes_in_place())
    }

    /// Hands the complete messages in `received` (bytes just received on connection `index`, for
    /// which [`Base::takes_in_place`] held) to the shard, each cut, unmasked (WebSocket) and
    /// decoded where it lies. Stops at what needs the buffered path (a partial frame, a frame
    /// error, a WebSocket control frame or fragment) or once the shard closes or migrates the
    /// connection: what is left is copied into the connection's `rx` and handled exactly as the
    /// copy path would ([`Base::process`]), so that it travels with a migrating connection.
    /// Returns the migration, which the backend carries out.
    pub fn process_received(
        &mut self,
        now: Now,
        index: usize,
        mut received: &mut [u8],
    ) -> Option<(CoreId, Adopt)> {
        let max = self.limits.tcp_max_body;
        loop {
            let conn = self.conns.get_mut(index)?;
            if conn.migrate.is_some() || conn.state.closing {
                break;
            }
            let Some(body) = conn.state.cut(&mut received, max) else {
                break;
            };
            if self.limits.echo {
                conn.state.queue_json(body);
                self.dirty.push(index);
                continue;
            }
            let id = conn_id(index, conn.generation);
            self.with_shard(|shard, io| shard.on_frame(now, id, body, io));
        }
        if !self.absorb(index, received) {
            return None;
        }
        self.process(now, index)
    }

    /// Appends bytes received on connection `index` to its `rx` ([`ConnState::absorb`]: a
    /// closing connection drops them). Returns `false` if that overflowed the receive bound and
    /// aborted the connection (counted; the backend closes it at its flush).
    pub fn absorb(&mut self, index: usize, received: &[u8]) -> bool {
        let Some(conn) = self.conns.get_mut(index) else {
            return false;
        };
        if conn.state.absorb(received, self.limits.tcp_max_body) {
            return true;
        }
        self.stats.receive_overflows += 1;
        self.dirty.push(index);
        false
    }

    /// The backend wrote to connection `index` (or handed it a send): `progressed` if any byte
    /// went out, `pending` if output still waits. Keeps the write-stall clock: it starts when
    /// output starts waiting and restarts at every progress.
    pub fn wrote(&mut self, now: Now, index: usize, progressed: bool, pending: bool) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        if !pending {
            conn.write_since = None;
            return;
        }
        if progressed || conn.write_since.is_none() {
            conn.write_since = Some(now.mono);
        }
        if conn.write_timer.is_none() {
            let at = now.mono + self.limits.write_stall;
            let key = self
                .timers
                .insert(at, (index, conn.generation, ConnTimer::Write));
            conn.write_timer = Some(key);
        }
    }

    /// A connection's timer is due.
    fn conn_timer(&mut self, now: Now, index: usize, generation: u32, timer: ConnTimer) {
        let Some(conn) = self
            .conns
            .get_mut(index)
            .filter(|conn| conn.generation == generation)
        else {
            return;
        };
        match timer {
            ConnTimer::Write => {
                conn.write_timer = None;
                let Some(since) = conn.write_since else {
                    return;
                };
                let deadline = since + self.limits.write_stall;
                if deadline > now.mono {
                    // Progress since the timer was set: check again at the new deadline.
                    let key = self.timers.insert(deadline, (index, generation, timer));
                    conn.write_timer = Some(key);
                    return;
                }
                tracing::debug!(peer = %conn.state.peer, "write stalled: closing");
                conn.state.abort();
                self.stats.write_stalls += 1;
                self.dirty.push(index);
            }
            ConnTimer::Login => {
                conn.login_timer = None;
                if conn.ticket.is_none() || self.shard.is_logged_in(conn_id(index, generation)) {
                    conn.ticket = None;
                    return;
                }
                tracing::debug!(peer = %conn.state.peer, "not logged in in time: closing");
                conn.state.abort();
                self.stats.login_timeouts += 1;
                self.dirty.push(index);
            }
        }
    }

    /// Forgets the loop's timers of a connection that leaves this core or closes.
    fn cancel_timers(&mut self, conn: &Conn<S>) {
        for key in [conn.write_timer, conn.login_timer].into_iter().flatten() {
            self.timers.cancel(key);
        }
    }

    /// Removes a connection that is leaving for another core (the shard already forgot it).
    pub fn take(&mut self, index: usize) -> Option<Conn<S>> {
        let conn = self.conns.try_remove(index)?;
        self.cancel_timers(&conn);
        Some(conn)
    }

    /// Removes a connection and tells the shard. Returns its socket for the backend to close.
    pub fn close(&mut self, now: Now, index: usize) -> Option<S> {
        let conn = self.conns.try_remove(index)?;
        self.cancel_timers(&conn);
        let id = conn_id(index, conn.generation);
        self.with_shard(|shard, io| shard.on_closed(now, id, io));
        Some(conn.sock)
    }

    /// One datagram of `received` bytes from `from` (`bytes` holds at most the receive buffer's
    /// worth of it, and is decoded where it lies unless it is forwarded to another core). An
    /// oversize datagram ends the sender's session, as in the reference.
    pub fn datagram(&mut self, now: Now, from: SocketAddr, received: usize, bytes: &mut [u8]) {
        if self.limits.echo {
            send_datagram(
                self.udp.as_ref(),
                bytes.get(..received).unwrap_or(bytes),
                from,
            );
        } else if udp::decode(received, self.limits.udp_max_datagram).is_err() {
            self.with_shard(|shard, io| shard.on_oversize_datagram(now, from, io));
        } else {
            self.with_shard(|shard, io| shard.on_datagram(now, from, bytes, io));
        }
    }

    /// Handles mail from the inbox, at most [`MAIL_PER_TURN`] per turn, until it meets a
    /// connection migrating here, which it returns for the backend to register (the backend
    /// then calls again: mail is handled in the order it was sent). `None` ends the turn's mail.
    pub fn drain_inbox(&mut self, now: Now) -> Option<Box<Migrant>> {
        while self.mail_budget > 0 {
            let Some(mail) = self.mesh.pop(self.core) else {
                self.mail_budget = MAIL_PER_TURN;
                return None;
            };
            self.mail_budget -= 1;
            match mail {
                Mail::Shard(msg) => self.with_shard(|shard, io| shard.on_mail(now, msg, io)),
                Mail::Adopt(migrant) => return Some(migrant),
                Mail::Query(query) => super::answer(&self.shard, &self.stats, query),
                Mail::Shutdown => {
                    // Messages still waiting for an ACK are kept for the recipients' next login.
                    self.shard.store_pending_for_shutdown(now);
                    self.shutting_down = true;
                    self.mail_budget = MAIL_PER_TURN;
                    return None;
                }
            }
        }
        // More mail may be waiting: come back without sleeping.
        self.more = true;
        self.mail_budget = MAIL_PER_TURN;
        None
    }

    /// Runs the connections' and the shard's timers that are due.
    pub fn run_timers(&mut self, now: Now) {
        while let Some((index, generation, timer)) = self.timers.poll(now.mono) {
            self.conn_timer(now, index, generation, timer);
        }
        if self.shard.poll_timeout().is_some_and(|at| at <= now.mono) {
            self.with_shard(|shard, io| shard.handle_timeout(now, io));
        }
    }

    /// Indices of every connection (for shutdown).
    pub fn indices(&self) -> Vec<usize> {
        self.conns.iter().map(|(index, _)| index).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_ids_carry_index_and_generation() {
        for (index, generation) in [(0, 0), (1, 1), (0xffff_ffff, u32::MAX), (42, 7)] {
            assert_eq!(split_id(conn_id(index, generation)), (index, generation));
        }
    }
}
