//! The epoll backend (through mio): one loop per core, edge-triggered, owning its listeners,
//! connections, UDP socket and shard.
//!
//! A loop turn: wait (until the shard's next timer, or at once if work is left over) → accept,
//! read and receive everything ready, feeding whole message bodies to the shard → drain the
//! inbox → run due timers → write every connection that has queued output → wake the cores it
//! mailed. Bodies are decoded where they lie in the connection's receive buffer. What does not
//! depend on epoll is in [`super::base`].

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use imedge_protocol::frame::udp;
use imedge_protocol::session::Transport;
use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::admit::{Admission, Ticket};
use super::base::{self, Backend, Base, EMFILE, ENFILE};
use super::conn::ConnState;
use super::mesh::{Mail, Mesh, Migrant};
use super::{Limits, Listeners};
use crate::shard::{Adopt, CoreId, Now, Shard};

const TCP_LISTENER: Token = Token(usize::MAX - 1);
const WS_LISTENER: Token = Token(usize::MAX - 2);
const UDP_SOCKET: Token = Token(usize::MAX - 3);
/// Token of the waker other cores use to announce mail.
pub const WAKER: Token = Token(usize::MAX - 4);

/// Bytes read from a socket per `read` call.
const READ_CHUNK: usize = 64 * 1024;

/// Readiness events handled per wait.
const EVENTS_CAPACITY: usize = 1024;

/// Datagrams received per loop turn, so that a UDP flood cannot starve the connections. What is
/// left is taken on the next turn without waiting.
const DATAGRAMS_PER_TURN: usize = 1024;

/// One core's event loop.
pub struct EpollCore {
    base: Base<TcpStream>,
    poll: Poll,
    tcp: Option<TcpListener>,
    ws: Option<TcpListener>,
    scratch: Vec<u8>,
    /// Receive buffer of the UDP socket (one datagram and a byte more): a datagram is decoded
    /// where it lies, copied only if it is forwarded to another core.
    udp_rx: Vec<u8>,
    /// The UDP socket was left readable at the end of the last turn.
    udp_more: bool,
    /// What the last wait found.
    events: Events,
}

impl std::fmt::Debug for EpollCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpollCore")
            .field("core", &self.base.core)
            .finish_non_exhaustive()
    }
}

impl EpollCore {
    /// A loop for `core` with its listeners, registered with `poll`.
    pub fn new(
        core: CoreId,
        poll: Poll,
        shard: Shard,
        listeners: Listeners,
        mesh: Arc<Mesh>,
        (limits, admission): (Limits, Arc<Admission>),
    ) -> io::Result<Self> {
        let registry = poll.registry();
        let mut tcp = listeners.tcp.map(TcpListener::from_std);
        let mut ws = listeners.ws.map(TcpListener::from_std);
        if let Some(l) = &mut tcp {
            registry.register(l, TCP_LISTENER, Interest::READABLE)?;
        }
        if let Some(l) = &mut ws {
            registry.register(l, WS_LISTENER, Interest::READABLE)?;
        }
        if let Some(s) = &listeners.udp {
            registry.register(
                &mut SourceFd(&s.as_raw_fd()),
                UDP_SOCKET,
                Interest::READABLE,
            )?;
        }
        Ok(Self {
            base: Base::new(core, shard, listeners.udp, mesh, (limits, admission)),
            poll,
            tcp,
            ws,
            scratch: vec![0; READ_CHUNK],
            udp_rx: vec![0; udp::recv_buffer_len(limits.udp_max_datagram)],
            udp_more: false,
            events: Events::with_capacity(EVENTS_CAPACITY),
        })
    }

    /// Runs until a [`Mail::Shutdown`] has been handled.
    ///
    /// # Errors
    /// `epoll_wait` failed.
    pub fn run(self) -> io::Result<()> {
        base::run(self)
    }

    fn accept(&mut self, now: Now, transport: Transport) {
        if self.base.accept_paused_until.is_some() || self.base.shutting_down {
            return;
        }
        loop {
            let listener = match transport {
                Transport::Tcp => self.tcp.as_ref(),
                _ => self.ws.as_ref(),
            };
            let Some(listener) = listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    // Refused: closed at once (dropped).
                    let Some(ticket) = self.base.admit(now, peer) else {
                        continue;
                    };
                    // TCP_NODELAY and SO_KEEPALIVE come from the listener (`bind_tcp`).
                    let state = ConnState::new(transport, peer);
                    self.add_conn(now, stream, state, Err(ticket));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) => {
                    self.base.pause_accept(now, &e);
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

    /// Registers a connection: migrated here with a login to finish (`Ok`), or accepted here
    /// and admitted (`Err`: its ticket).
    fn add_conn(
        &mut self,
        now: Now,
        mut stream: TcpStream,
        state: ConnState,
        adopt: Result<Adopt, Ticket>,
    ) {
        let token = Token(self.base.conns.vacant_key());
        if let Err(error) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(%error, "cannot register a connection");
            return;
        }
        match adopt {
            Err(ticket) => {
                self.base.open(now, stream, state, ticket);
            }
            Ok(adopt) => {
                let index = self.base.adopt(now, stream, state, adopt);
                // Bytes that arrived behind the login came along in the receive buffer.
                self.process(now, index);
            }
        }
    }

    fn adopt(&mut self, now: Now, migrant: Migrant) {
        let Migrant {
            stream,
            conn,
            adopt,
        } = migrant;
        self.add_conn(now, TcpStream::from_std(stream), conn, Ok(adopt));
    }

    /// Reads everything available on a connection, handing its complete messages to the shard:
    /// parsed in the read buffer itself when the connection allows ([`Base::takes_in_place`]),
    /// else appended to its `rx` first.
    fn read(&mut self, now: Now, index: usize) {
        let mut eof = false;
        loop {
            let Some(conn) = self.base.conns.get_mut(index) else {
                return;
            };
            let n = match conn.sock.read(&mut self.scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    eof = true;
                    break;
                }
            };
            let received = self.scratch.get_mut(..n).unwrap_or_default();
            let migrate = if self.base.takes_in_place(index) {
                self.base.process_received(now, index, received)
            } else if self.base.absorb(index, received) {
                // Cut before the next read, so that `rx` never holds more than a partial frame
                // and one read.
                self.base.process(now, index)
            } else {
                // Over the receive bound: aborted, closed at the flush.
                return;
            };
            if let Some((core, adopt)) = migrate {
                self.migrate(index, core, adopt);
                return;
            }
        }
        self.process(now, index);
        if eof {
            self.close_now(now, index);
        }
    }

    fn process(&mut self, now: Now, index: usize) {
        if let Some((core, adopt)) = self.base.process(now, index) {
            self.migrate(index, core, adopt);
        }
    }

    /// Sends a connection to `core`: out of this poll, into the mail with its state.
    fn migrate(&mut self, index: usize, core: CoreId, adopt: Adopt) {
        let Some(mut conn) = self.base.take(index) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.sock);
        let migrant = Migrant {
            stream: OwnedFd::from(conn.sock).into(),
            conn: conn.state,
            adopt,
        };
        // A migrating connection is never refused (not refusable mail, see `mesh`).
        let _ = self
            .base
            .outgoing
            .send(core, Mail::Adopt(Box::new(migrant)));
    }

    fn receive(&mut self, now: Now) {
        self.udp_more = false;
        for _ in 0..DATAGRAMS_PER_TURN {
            let Some(socket) = self.base.udp.as_ref() else {
                return;
            };
            match socket.recv_from(&mut self.udp_rx) {
                Ok((n, from)) => {
                    if let Some(datagram) = self.udp_rx.get_mut(..n) {
                        self.base.datagram(now, from, n, datagram);
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

    /// Writes queued output; closes connections whose close was asked for once it is written.
    fn flush(&mut self, now: Now) {
        while let Some(index) = self.base.dirty.pop() {
            let Some(conn) = self.base.conns.get_mut(index) else {
                continue;
            };
            if let Some((core, adopt)) = conn.migrate.take() {
                // Asked for by mail (a verify's answer): the connection leaves now.
                self.migrate(index, core, adopt);
                continue;
            }
            if conn.state.aborted {
                self.close_now(now, index);
                continue;
            }
            let (mut failed, mut progressed) = (false, false);
            while !conn.state.tx.is_empty() {
                match conn.sock.write(&conn.state.tx) {
                    Ok(0) => {
                        failed = true;
                        break;
                    }
                    Ok(n) => {
                        progressed = true;
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
            } else {
                let pending = !conn.state.tx.is_empty();
                conn.state.release_empty_buffers();
                self.base.wrote(now, index, progressed, pending);
            }
        }
    }

    /// Drops a connection and tells the shard.
    fn close_now(&mut self, now: Now, index: usize) {
        if let Some(mut stream) = self.base.close(now, index) {
            let _ = self.poll.registry().deregister(&mut stream);
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Shutdown: say goodbye on every connection, write what can be written, close.
    fn close_all(&mut self) {
        let now = base::now();
        for index in self.base.indices() {
            if let Some(conn) = self.base.conns.get_mut(index) {
                conn.state.begin_close();
                let _ = conn.sock.write(&conn.state.tx);
            }
            self.close_now(now, index);
        }
        self.base.outgoing.flush();
    }
}

impl Backend for EpollCore {
    type Sock = TcpStream;

    fn base(&mut self) -> &mut Base<TcpStream> {
        &mut self.base
    }

    fn wait(&mut self, mut timeout: Option<Duration>) -> io::Result<()> {
        if self.udp_more {
            timeout = Some(Duration::ZERO);
        }
        match self.poll.poll(&mut self.events, timeout) {
            Err(error) if error.kind() != io::ErrorKind::Interrupted => Err(error),
            _ => Ok(()),
        }
    }

    fn handle_io(&mut self, now: Now) {
        // Taken out while its events are handled (an empty `Events` allocates nothing).
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
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
                        self.base.dirty.push(index);
                    }
                }
            }
        }
        self.events = events;
        if self.udp_more {
            self.receive(now);
        }
    }

    fn resume_accepting(&mut self, now: Now) {
        self.accept(now, Transport::Tcp);
        self.accept(now, Transport::Ws);
    }

    fn adopt(&mut self, now: Now, migrant: Migrant) {
        EpollCore::adopt(self, now, migrant);
    }

    fn flush(&mut self, now: Now) {
        EpollCore::flush(self, now);
    }

    fn close_all(&mut self) {
        EpollCore::close_all(self);
    }
}
