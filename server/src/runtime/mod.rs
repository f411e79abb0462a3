//! The thread-per-core runtime: binds the listeners, starts one pinned event loop per core, and
//! stops them.
//!
//! * [`conn`] — one connection's transport state (framing, WebSocket), backend-independent.
//! * [`admit`] — admission of new connections (unauthenticated caps, per-address rate), shared
//!   by the cores.
//! * [`mesh`] — bounded lock-free inboxes between cores, with wake-ups.
//! * `base` — the backend-independent half of a core's loop (shard, connections, inbox, timers).
//! * [`epoll`] — the epoll backend (mio).
//! * [`uring`] — the io_uring backend (`io-uring`), chosen by `--io uring`, or by `--io auto`
//!   when [`uring::probe`] finds io_uring usable.
//!
//! Every core binds its own TCP, UDP and WebSocket socket on the same ports with `SO_REUSEPORT`;
//! the kernel spreads connections and UDP clients over them.

pub mod admit;
mod base;
pub mod conn;
pub mod epoll;
pub mod mesh;
pub mod orphan;
#[cfg(target_os = "linux")]
pub mod uring;

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{IoBackend, ServerConfig};
use imedge_protocol::qos::receiver::TRANSIT_MARGIN;
use imedge_protocol::UserId;

use crate::hooks::pool::HookPool;
use crate::hooks::{Command, Interests, ServerEvents};
use crate::shard::{CoreId, Shard, ShardConfig, ShardMsg, Stats};
use crate::shard::{OfflineStore, Post, Presence};
use crate::store::group::GroupCommit;
use crate::store::redb::RedbStore;
use crate::store::{Limits as StoreLimits, Store};
use mesh::{Mail, Mesh, Query, Wake};

/// Listen backlog of the TCP and WebSocket listeners (the reference's, SPEC §1.1).
pub const LISTEN_BACKLOG: i32 = 4096;

/// Frame limits the loops enforce, and what they do with a frame.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest TCP frame body.
    pub tcp_max_body: usize,
    /// Largest UDP datagram.
    pub udp_max_datagram: usize,
    /// Most bytes a connection may leave unsent (`--max-send-buffer`).
    pub max_send_buffer: usize,
    /// A write making no progress this long closes its connection (`--write-stall-timeout`).
    pub write_stall: std::time::Duration,
    /// A connection not logged in this long after it was accepted is closed
    /// (`--login-timeout`).
    pub login_timeout: std::time::Duration,
    /// Benchmark mode (`--bench-echo`): every frame (TCP, WebSocket) and datagram goes straight
    /// back to its sender instead of to the shard. The loops, buffers and writes are the server's
    /// own, so this measures their floor — the cost of the I/O without the protocol.
    pub echo: bool,
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    mesh: Arc<Mesh>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    /// Where the TCP gateway listens.
    pub tcp_addr: Option<SocketAddr>,
    /// Where the UDP gateway listens.
    pub udp_addr: Option<SocketAddr>,
    /// Where the WebSocket gateway listens.
    pub ws_addr: Option<SocketAddr>,
    /// The I/O backend in use: `"epoll"` or `"io_uring"`.
    pub backend: &'static str,
    /// The offline store's writer, drained after the cores stop.
    store_writer: Option<Arc<GroupCommit>>,
    /// Where verifies run; its workers are joined after the cores stop.
    hook_pool: Option<Arc<HookPool>>,
}

/// The sockets one core listens on, bound by [`start`] and handed to the core's loop.
#[derive(Debug, Default)]
pub struct Listeners {
    /// TCP gateway.
    pub tcp: Option<TcpListener>,
    /// WebSocket gateway.
    pub ws: Option<TcpListener>,
    /// UDP gateway.
    pub udp: Option<UdpSocket>,
}

/// The I/O backend the cores run, once chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Epoll,
    Uring,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Epoll => "epoll",
            Backend::Uring => "io_uring",
        }
    }
}

/// Whether the io_uring backend can run here (see `uring::probe`; on other systems than Linux,
/// never). This is what `--io auto` asks at start.
///
/// # Errors
/// Why io_uring cannot be used.
pub fn probe_io_uring() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    return uring::probe();
    #[cfg(not(target_os = "linux"))]
    return Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "io_uring is unavailable: not Linux",
    ));
}

/// Picks the backend: `uring` needs io_uring (or fails with the reason), `auto` probes for it
/// and falls back to epoll, `epoll` is epoll. Logs which one runs and why.
fn choose_backend(requested: IoBackend) -> io::Result<Backend> {
    let backend = match requested {
        IoBackend::Epoll => {
            tracing::info!(backend = "epoll", "I/O backend: epoll (requested)");
            Backend::Epoll
        }
        IoBackend::Uring => {
            probe_io_uring()?;
            tracing::info!(backend = "io_uring", "I/O backend: io_uring (requested)");
            Backend::Uring
        }
        IoBackend::Auto => match probe_io_uring() {
            Ok(()) => {
                tracing::info!(
                    backend = "io_uring",
                    "I/O backend: io_uring (auto: available)"
                );
                Backend::Uring
            }
            Err(reason) => {
                tracing::info!(
                    backend = "epoll",
                    %reason,
                    "I/O backend: epoll (auto: io_uring unavailable)"
                );
                Backend::Epoll
            }
        },
    };
    Ok(backend)
}

/// What a core's thread needs, besides its sockets, to build its loop: made before the threads
/// start because the mesh needs every core's waker.
enum Prepared {
    Epoll(mio::Poll),
    #[cfg(target_os = "linux")]
    Uring(Arc<uring::EventFd>),
}

impl Prepared {
    /// The poll or eventfd of a core, and the waker other cores use to wake it.
    fn new(backend: Backend) -> io::Result<(Self, Arc<dyn Wake>)> {
        match backend {
            #[cfg(target_os = "linux")]
            Backend::Uring => {
                let eventfd = Arc::new(uring::EventFd::new()?);
                let waker: Arc<dyn Wake> = eventfd.clone();
                Ok((Prepared::Uring(eventfd), waker))
            }
            _ => {
                let poll = mio::Poll::new()?;
                let waker = Arc::new(mio::Waker::new(poll.registry(), epoll::WAKER)?);
                Ok((Prepared::Epoll(poll), waker))
            }
        }
    }

    /// Builds the core's loop on the calling thread (an io_uring ring belongs to the thread that
    /// creates it), reports the outcome on `ready`, then runs the loop.
    fn run(
        self,
        core: CoreId,
        shard: Shard,
        listeners: Listeners,
        mesh: Arc<Mesh>,
        (limits, admission): (Limits, Arc<admit::Admission>),
        ready: mpsc::Sender<io::Result<()>>,
    ) -> io::Result<()> {
        fn report<C>(
            setup: io::Result<C>,
            ready: mpsc::Sender<io::Result<()>>,
            run: impl FnOnce(C) -> io::Result<()>,
        ) -> io::Result<()> {
            match setup {
                Ok(core) => {
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    run(core)
                }
                Err(error) => {
                    // `start` reports it and stops the other cores.
                    let _ = ready.send(Err(error));
                    Ok(())
                }
            }
        }
        match self {
            Prepared::Epoll(poll) => report(
                epoll::EpollCore::new(core, poll, shard, listeners, mesh, (limits, admission)),
                ready,
                epoll::EpollCore::run,
            ),
            #[cfg(target_os = "linux")]
            Prepared::Uring(waker) => report(
                uring::UringCore::new(core, shard, listeners, waker, mesh, (limits, admission)),
                ready,
                uring::UringCore::run,
            ),
        }
    }
}

impl ServerHandle {
    /// Asks every core to close its connections and stop, and waits for them.
    ///
    /// # Errors
    /// The first error a core's loop ended with.
    pub fn shutdown(self) -> io::Result<()> {
        self.mesh.shutdown_all();
        self.join()
    }

    /// Waits for the cores to stop.
    ///
    /// # Errors
    /// The first error a core's loop ended with.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for thread in self.threads {
            let outcome = thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a core panicked")));
            if result.is_ok() {
                result = outcome;
            }
        }
        // The cores are gone (and with them their handles on the writer): what is still queued
        // is committed now, before the process may exit.
        if let Some(pool) = self.hook_pool {
            pool.shutdown();
        }
        if let Some(writer) = self.store_writer {
            match Arc::try_unwrap(writer) {
                Ok(writer) => writer.shutdown(),
                Err(_) => tracing::warn!("offline store writer still shared at shutdown"),
            }
        }
        result
    }

    /// A handle that can stop the server from another thread (e.g. a signal handler's).
    pub fn stopper(&self) -> Stopper {
        Stopper(Arc::clone(&self.mesh))
    }

    /// The sending API for the application, usable from any thread.
    pub fn api(&self) -> ControlApi {
        ControlApi(Arc::clone(&self.mesh), self.hook_pool.clone())
    }
}

/// The server application's API outside the event loops (SPEC §10: send to a uid, kick a
/// session, is-online), usable from any thread. Requests travel to the user's core as mail.
#[derive(Debug, Clone)]
pub struct ControlApi(Arc<Mesh>, Option<Arc<HookPool>>);

impl ControlApi {
    fn core_of(&self, uid: &str) -> CoreId {
        crate::shard::shard_for(uid, self.0.cores())
    }

    /// Sends `text` from the server to `to` (S2C). With `qos` the message is resent until ACKed
    /// and its fate reported to the `on_s2c_delivered` / `on_s2c_lost` hooks; if `to` is not
    /// online it goes to `on_offline`.
    pub fn send(&self, to: &str, text: impl Into<String>, typeu: i32, qos: bool) {
        let command = Command::Send {
            to: UserId::from(to.to_owned()),
            text: text.into(),
            typeu,
            qos,
        };
        self.0
            .post(self.core_of(to), Mail::Shard(ShardMsg::Command(command)));
    }

    /// Kicks the current session of `uid` (kickout `code`, optional reason).
    pub fn kick(&self, uid: &str, code: i32, reason: Option<&str>) {
        let command = Command::Kick {
            uid: UserId::from(uid.to_owned()),
            code,
            reason: reason.map(str::to_owned),
        };
        self.0
            .post(self.core_of(uid), Mail::Shard(ShardMsg::Command(command)));
    }

    /// Whether `uid` is logged in (asks its core; `None` if the server is stopping).
    pub fn is_online(&self, uid: &str) -> Option<bool> {
        let (reply, answer) = mpsc::channel();
        self.0.post(
            self.core_of(uid),
            Mail::Query(Query::IsOnline(uid.to_owned(), reply)),
        );
        answer.recv_timeout(CONTROL_TIMEOUT).ok()
    }

    /// Every core's counters merged, and the number of users online.
    pub fn stats(&self) -> (Stats, usize) {
        let (reply, answers) = mpsc::channel();
        for core in 0..self.0.cores() {
            if let Ok(core) = CoreId::try_from(core) {
                self.0.post(core, Mail::Query(Query::Stats(reply.clone())));
            }
        }
        drop(reply);
        let mut total = (Stats::default(), 0);
        while let Ok((stats, online)) = answers.recv_timeout(CONTROL_TIMEOUT) {
            total.0.merge(&stats);
            total.1 += online;
        }
        let mesh = &self.0;
        total.0.mail_refused = mesh.refused.load(Ordering::Relaxed);
        total.0.mail_dropped = mesh.dropped.load(Ordering::Relaxed);
        total.0.mail_backlog_peak = mesh.control_backlog_peak.load(Ordering::Relaxed);
        if let Some(pool) = &self.1 {
            let hooks = pool.stats();
            total.0.hook_calls = hooks.calls;
            total.0.hook_refused = hooks.refused;
            total.0.hook_dropped = hooks.dropped;
            total.0.hook_panics = hooks.panics;
        }
        total
    }
}

/// How long the control API waits for a core's answer before giving up (a core answers within
/// one loop turn; only a stopping server leaves a question unanswered).
pub const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Answers a control-thread question on a core (`conn`: the loop's own counters).
fn answer(shard: &Shard, conn: &conn::ConnStats, query: Query) {
    // A closed channel means the asker stopped waiting: nothing to do.
    match query {
        Query::IsOnline(uid, reply) => {
            let _ = reply.send(shard.is_online(&uid));
        }
        Query::Stats(reply) => {
            let mut stats = shard.stats();
            stats.conn = *conn;
            let _ = reply.send((stats, shard.online_users()));
        }
    }
}

/// Stops a server from any thread.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<Mesh>);

impl Stopper {
    /// Asks every core to close its connections and stop.
    pub fn stop(&self) {
        self.0.shutdown_all();
    }
}

/// A TCP listener; `user_timeout` becomes the accepted sockets' `TCP_USER_TIMEOUT`.
fn bind_tcp(addr: SocketAddr, user_timeout: std::time::Duration) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // SPEC §1.1: TCP_NODELAY and SO_KEEPALIVE on, like the reference. Set on the listener, they
    // are inherited by every accepted connection (Linux copies the listening socket): two system
    // calls fewer per accepted connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_keepalive(true)?;
    // Bytes the peer does not acknowledge for `--write-stall-timeout` make the kernel drop the
    // connection by itself (what the loop's write-stall check does for output it still holds);
    // inherited by accepted sockets like the options above.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket.set_tcp_user_timeout(Some(user_timeout))?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = user_timeout;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Kernel buffer asked for each core's UDP socket, each way. One socket carries every UDP client
/// of its core, so the default (~208 KiB, ~1000 datagrams) overflows in a burst of a few
/// milliseconds at 100k datagrams/s and the kernel drops datagrams silently; 4 MiB absorbs ~40 ms.
/// The kernel caps it at `net.core.rmem_max` / `wmem_max` (raise those for more).
pub const UDP_SOCKET_BUFFER: usize = 4 << 20;

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Best effort: a smaller buffer only means earlier drops under bursts.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Fails with `AddrInUse` if anything is bound to `addr` already. Our own sockets share their
/// port through `SO_REUSEPORT`, and Linux lets any socket of the same user with that option join
/// the group: a second imedge started on the same port would silently take half the
/// connections and datagrams (a split that looks like message loss). A socket bound *without*
/// `SO_REUSEPORT` is refused if any socket holds the port, so binding one first and dropping it
/// tells a free port from a taken one. (`SO_REUSEADDR` on the TCP probe: connections of an
/// earlier run in TIME_WAIT do not count.)
///
/// With port 0 the probe's port, which the kernel picked among ports nobody holds, is returned
/// for the group to bind: a socket with `SO_REUSEPORT` asking for port 0 may be handed a port
/// that another process's group already shares.
///
/// A port held only by orphaned sockets — those of a run killed a moment ago, which close once
/// the process has exited and the kernel has torn its io_uring rings down ([`orphan`]) — is
/// waited for, at most [`ORPHAN_WAIT`], with a log line; a port a live process holds is refused
/// after [`HOLDER_GRACE`] (time for a process that is exiting to let go).
fn claim(addr: SocketAddr, ty: Type) -> io::Result<u16> {
    let start = Instant::now();
    let proto = if ty == Type::STREAM {
        orphan::Proto::Tcp
    } else {
        orphan::Proto::Udp
    };
    let mut logged = false;
    loop {
        let error = match claim_once(addr, ty) {
            Err(error) if error.kind() == io::ErrorKind::AddrInUse && addr.port() != 0 => error,
            other => {
                if logged {
                    tracing::info!(%addr, waited_ms = start.elapsed().as_millis() as u64, "port free");
                }
                return other;
            }
        };
        let waited = start.elapsed();
        let holders = orphan::holders(proto, addr.port()).unwrap_or_default();
        if waited >= ORPHAN_WAIT || (!holders.is_empty() && waited >= HOLDER_GRACE) {
            let who = match holders.as_slice() {
                [] => String::new(),
                pids => format!(" by process {pids:?}"),
            };
            return Err(io::Error::new(error.kind(), format!("{error}{who}")));
        }
        if !logged && holders.is_empty() {
            tracing::warn!(
                %addr,
                max_wait_ms = ORPHAN_WAIT.as_millis() as u64,
                "port held by sockets no process owns (a crashed run's, closing): waiting"
            );
            logged = true;
        }
        std::thread::sleep(ORPHAN_POLL);
    }
}

/// The longest start-up waits for a port held by orphaned sockets. The kernel closes them
/// within a fraction of a second of the crashed process's exit (measured: ~0.1 s on Linux 6.18,
/// io_uring or epoll); 10 s covers a loaded machine, and is still short next to a restart by a
/// supervisor.
pub const ORPHAN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long start-up waits for a port that a live process holds: one that is exiting may still
/// show its sockets; one that is not is another server, refused after this.
pub const HOLDER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// How often start-up looks at a held port again.
const ORPHAN_POLL: std::time::Duration = std::time::Duration::from_millis(20);

fn claim_once(addr: SocketAddr, ty: Type) -> io::Result<u16> {
    let protocol = if ty == Type::STREAM {
        Protocol::TCP
    } else {
        Protocol::UDP
    };
    let probe = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    if ty == Type::STREAM {
        probe.set_reuse_address(true)?;
    }
    probe.bind(&addr.into()).map_err(|error| {
        if error.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{addr} is already in use (another imedge on the same port?)"),
            )
        } else {
            error
        }
    })?;
    probe
        .local_addr()?
        .as_socket()
        .map(|a| a.port())
        .ok_or_else(|| io::Error::other("probe socket has no IP address"))
}

/// Binds one socket per core on the same port, which must be free; port 0 picks a free one.
fn bind_all<S>(
    bind: std::net::IpAddr,
    port: Option<u16>,
    cores: usize,
    (ty, open): (Type, impl Fn(SocketAddr) -> io::Result<S>),
    local: impl Fn(&S) -> io::Result<SocketAddr>,
) -> io::Result<(Vec<Option<S>>, Option<SocketAddr>)> {
    let Some(port) = port else {
        return Ok(((0..cores).map(|_| None).collect(), None));
    };
    let port = claim(SocketAddr::new(bind, port), ty)?;
    let first = open(SocketAddr::new(bind, port))?;
    let addr = local(&first)?;
    let mut sockets = vec![Some(first)];
    for _ in 1..cores {
        sockets.push(Some(open(addr)?));
    }
    Ok((sockets, Some(addr)))
}

/// Starts the server: binds every listener (errors surface here), then one loop per core.
///
/// Opens the embedded offline store under the data directory and starts its group-commit
/// writer, whose callbacks reach the cores through the mesh.
fn open_store(config: &ServerConfig, mesh: &Arc<Mesh>) -> io::Result<Option<OfflineStore>> {
    if !config.offline_store {
        tracing::info!("offline store: off (the on_offline hook decides, as in the reference)");
        return Ok(None);
    }
    let limits = StoreLimits {
        max_per_user: config.offline_max_per_user,
        max_age: config.offline_max_age,
        max_per_sender: config.offline_max_per_sender,
        max_bytes: config.offline_max_bytes,
    };
    // A run killed a moment ago may still hold the file's lock until it has fully exited, as it
    // may still hold its ports (`claim`): wait for it, bounded and logged, rather than fail.
    let started = Instant::now();
    let store: Arc<dyn Store> = loop {
        match RedbStore::open(&config.data_dir, limits) {
            Ok(store) => break Arc::new(store),
            Err(e) if RedbStore::is_locked(&e) && started.elapsed() < ORPHAN_WAIT => {
                if started.elapsed() < ORPHAN_POLL {
                    tracing::warn!(
                        dir = %config.data_dir.display(),
                        max_wait_ms = ORPHAN_WAIT.as_millis() as u64,
                        "offline store locked by another process (a killed run still exiting?): waiting"
                    );
                }
                std::thread::sleep(ORPHAN_POLL);
            }
            Err(e) => return Err(io::Error::other(format!("offline store: {e}"))),
        }
    };
    let writer = GroupCommit::start(Arc::clone(&store))
        .map_err(|e| io::Error::other(format!("offline store: {e}")))?;
    let reader = crate::store::read::Reader::start(Arc::clone(&store))
        .map_err(|e| io::Error::other(format!("offline store: {e}")))?;
    tracing::info!(
        dir = %config.data_dir.display(),
        max_per_user = limits.max_per_user,
        max_per_sender = limits.max_per_sender,
        max_bytes = limits.max_bytes,
        max_age_secs = limits.max_age.as_secs(),
        "offline store: on"
    );
    let mesh = Arc::clone(mesh);
    let post: Post = Arc::new(move |core, msg| mesh.post(core, Mail::Shard(msg)));
    Ok(Some(OfflineStore {
        writer: Arc::new(writer),
        reader: Arc::new(reader),
        post,
    }))
}

/// # Errors
/// A listener cannot be bound, the requested I/O backend is not available, the offline store
/// cannot be opened, or a core cannot set up its loop.
pub fn start(config: &ServerConfig, hooks: Arc<dyn ServerEvents>) -> io::Result<ServerHandle> {
    let cores = config.threads.clamp(1, usize::from(CoreId::MAX));
    let backend = choose_backend(config.io)?;

    let (tcp, tcp_addr) = bind_all(
        config.bind,
        config.tcp_port,
        cores,
        (Type::STREAM, |a| bind_tcp(a, config.write_stall_timeout)),
        TcpListener::local_addr,
    )?;
    let (ws, ws_addr) = bind_all(
        config.bind,
        config.ws_port,
        cores,
        (Type::STREAM, |a| bind_tcp(a, config.write_stall_timeout)),
        TcpListener::local_addr,
    )?;
    let (udp, udp_addr) = bind_all(
        config.bind,
        config.udp_port,
        cores,
        (Type::DGRAM, bind_udp),
        UdpSocket::local_addr,
    )?;

    let mut prepared = Vec::with_capacity(cores);
    let mut wakers: Vec<Arc<dyn Wake>> = Vec::with_capacity(cores);
    for _ in 0..cores {
        let (core, waker) = Prepared::new(backend)?;
        prepared.push(core);
        wakers.push(waker);
    }
    let mesh = Arc::new(Mesh::new(wakers));
    let offline = open_store(config, &mesh)?;
    let limits = Limits {
        tcp_max_body: config.tcp_max_body,
        udp_max_datagram: config.udp_max_datagram,
        max_send_buffer: config.max_send_buffer,
        write_stall: config.write_stall_timeout,
        login_timeout: config.login_timeout,
        echo: config.bench_echo,
    };
    let cpus = if config.pin_threads {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };

    let admission = Arc::new(admit::Admission::new(
        admit::AdmitLimits {
            max_unauthenticated: config.max_unauthenticated,
            max_per_ip: config.max_conns_per_ip,
            rate_per_ip: config.max_conn_rate_per_ip,
            udp_unauth_reply_rate: config.udp_unauth_reply_rate,
            limit_loopback: config.limit_loopback,
        },
        Instant::now(),
    ));
    let presence = Arc::new(Presence::new(cores));
    // Verifies and notifications run on the hook pool, if the hooks implement any.
    let hook_pool = if hooks.interests().intersects(Interests::POOLED) {
        let mesh = Arc::clone(&mesh);
        let post: Post = Arc::new(move |core, msg| mesh.post(core, Mail::Shard(msg)));
        let pool = HookPool::new(
            config.hook_threads,
            config.hook_queue,
            Arc::clone(&hooks),
            post,
            Arc::clone(&presence),
        )?;
        Some(Arc::new(pool))
    } else {
        None
    };
    // One secret for the QoS tables' keys per process, shared by every core.
    let qos_keys = imedge_protocol::qos::QosKeyHasher::random();
    let mut threads = Vec::with_capacity(cores);
    let (ready, setups) = mpsc::channel();
    let sockets = tcp.into_iter().zip(ws).zip(udp);
    for (core, (prepared, ((tcp, ws), udp))) in prepared.into_iter().zip(sockets).enumerate() {
        let core_id = CoreId::try_from(core).unwrap_or(CoreId::MAX);
        let mut shard_config = ShardConfig::new(core_id, cores);
        shard_config.tcp_idle = config.tcp_idle;
        shard_config.udp_idle = config.udp_idle;
        shard_config.ws_idle = config.ws_idle;
        shard_config.server_timestamps = config.server_timestamps;
        shard_config.qos_keys = qos_keys.clone();
        shard_config.qos = config.qos;
        shard_config.max_message_bytes = config.max_message_bytes;
        shard_config.session_msg_rate = config.session_msg_rate;
        shard_config.session_msg_burst = config.session_msg_burst;
        shard_config.verify_timeout = config.verify_timeout;
        shard_config.max_pending_verifies = config.max_pending_verifies;
        // The window covers the longest a copy can keep coming under this schedule, if longer
        // than the default (a deployment that resends more usually has clients that do too).
        shard_config.dedup = shard_config
            .dedup
            .covering(config.qos.holding_time(), TRANSIT_MARGIN);
        let listeners = Listeners { tcp, ws, udp };
        let ready = ready.clone();
        let hooks = Arc::clone(&hooks);
        let mesh = Arc::clone(&mesh);
        let offline = offline.clone();
        let presence = Arc::clone(&presence);
        let hook_pool = hook_pool.clone();
        let admission = Arc::clone(&admission);
        let cpu = cpus.get(core % cpus.len().max(1)).copied();
        let thread = std::thread::Builder::new()
            .name(format!("imedge-core-{core}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if !core_affinity::set_for_current(cpu) {
                        tracing::warn!(core, "could not pin the event loop to a CPU");
                    }
                }
                let mut shard =
                    Shard::new(shard_config, hooks, Instant::now()).with_presence(presence);
                if let Some(offline) = offline {
                    shard = shard.with_store(offline);
                }
                if let Some(pool) = hook_pool {
                    shard = shard.with_hook_pool(pool);
                }
                prepared.run(core_id, shard, listeners, mesh, (limits, admission), ready)
            })?;
        threads.push(thread);
    }
    drop(ready);
    let handle = ServerHandle {
        mesh,
        threads,
        tcp_addr,
        udp_addr,
        ws_addr,
        backend: backend.name(),
        store_writer: offline.map(|o| o.writer),
        hook_pool,
    };
    // Every core reports its set-up (a core that panics drops its sender instead).
    let mut failure = None;
    for _ in 0..cores {
        let error = match setups.recv() {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error,
            Err(_) => io::Error::other("a core stopped while setting up its loop"),
        };
        failure.get_or_insert(error);
    }
    if let Some(error) = failure {
        let _ = handle.shutdown();
        return Err(error);
    }
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accepted connections get the options SPEC §1.1 asks for from the listener.
    #[test]
    fn accepted_connections_inherit_nodelay_keepalive_and_user_timeout() {
        let stall = std::time::Duration::from_millis(7_500);
        let listener = bind_tcp(SocketAddr::from(([127, 0, 0, 1], 0)), stall).unwrap();
        listener.set_nonblocking(false).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
        let accepted = socket2::SockRef::from(&accepted);
        assert!(accepted.keepalive().unwrap());
        assert_eq!(accepted.tcp_user_timeout().unwrap(), Some(stall));
    }
}
