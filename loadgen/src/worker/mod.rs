//! One worker: a single `mio` (epoll) loop owning all its clients' sockets, and for each client a
//! sans-IO [`ClientSession`] — the same state machine the SDK drives, so login, keep-alive, QoS
//! resends, ACKs and receive de-duplication follow the SDK's semantics.
//!
//! ```text
//! loop {
//!     wait for socket readiness or the timerfd (earliest of: session timers, the schedule,
//!     the next login, the phase deadline, the progress tick)
//!     sockets  → frames → decode → count (before the session's dedup) → session.handle_message
//!     timers   → session.handle_timeout
//!     schedule → session.send (intended time in the payload)
//!     drive(client): poll_output → write / reconnect / close; poll_event → count
//! }
//! ```
//!
//! Phases, each with a deadline: login (at the login rate) → [storm: settle, drop all links,
//! re-login] → send (duration / message budget) → drain (grace) → logout → done.

mod io;
pub mod timer;
pub mod ws;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use imedge_protocol::session::{ClientConfig, ClientSession, Event, Transport};
use imedge_protocol::{Decoder, Fingerprint, UserId};
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Poll};

use crate::clock::{self, Anchor};
use crate::config::{Config, Rate, Scenario};
use crate::counters::{count_arrival, Arrival, Counters, SeqTracker};
use crate::payload::{self, Stamp};
use crate::plan;
use crate::schedule::{self, Schedule};
use crate::stats::{self, Logins, Snapshot};
use timer::{Kind, TimerFd, Timers};

/// Interval of progress snapshots.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Time allowed for logins beyond what the login rate needs (slow servers, SYN retries).
pub const LOGIN_SLACK: Duration = Duration::from_secs(10);
/// A client not logged in this long after its connection attempt started is retried (login
/// phase only): a lost UDP login or a dropped SYN would otherwise leave it out for good.
pub const LOGIN_RETRY: Duration = Duration::from_secs(3);
/// Delay before retrying a refused connection in the login phase.
pub const CONNECT_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Storm: time between the end of the logins and the mass disconnect, so keep-alives settle.
pub const STORM_SETTLE: Duration = Duration::from_secs(1);
/// Closed loop: the send phase ends when nothing was delivered for this long (a dead server must
/// not hold the run until `--duration`, nor forever with `--messages` alone).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Send phase bound when only `--messages` is given in closed loop.
pub const MAX_SEND_PHASE: Duration = Duration::from_secs(3600);
/// Extra time past every phase deadline after which the loop stops whatever its state.
pub const HARD_STOP_SLACK: Duration = Duration::from_secs(15);
/// A send later than this behind its intended time counts as late; when more than
/// [`LATE_WARN_FRACTION`] of the sends are late the loadgen warns that it is saturated.
pub const LATE_THRESHOLD: Duration = Duration::from_millis(5);
/// Fraction of late sends above which the report warns.
pub const LATE_WARN_FRACTION: f64 = 0.01;
/// Most messages taken from the schedule in one turn, so reading is not starved by a catch-up.
pub const MAX_BURST: usize = 4096;
/// Most connection attempts started in one turn.
pub const MAX_CONNECTS_PER_TURN: usize = 1024;
/// Longest epoll wait: the timerfd does the precise wake-ups; this is only a safety net.
pub const MAX_POLL_WAIT: Duration = Duration::from_millis(100);
/// epoll events taken per turn.
pub const EVENTS_PER_TURN: usize = 1024;

/// Which worker this is.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSpec {
    /// Index from 0.
    pub index: usize,
    /// Number of workers.
    pub count: usize,
}

/// Where the worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Login,
    Settle,
    Storm,
    Send,
    Drain,
    Logout,
    Done,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Login => "login",
            Phase::Settle => "settle",
            Phase::Storm => "storm",
            Phase::Send => "send",
            Phase::Drain => "drain",
            Phase::Logout => "logout",
            Phase::Done => "done",
        }
    }
}

/// A client's socket.
#[derive(Debug)]
enum Sock {
    None,
    Stream(TcpStream),
    Dgram(UdpSocket),
}

/// A client's link state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    Connecting,
    /// WebSocket: TCP up, upgrade sent, waiting for `101`.
    Handshake,
    Up,
    /// Logged out: nothing more happens.
    Closed,
}

/// One simulated client.
#[derive(Debug)]
struct Client {
    session: ClientSession,
    transport: Transport,
    server: SocketAddr,
    source: Option<IpAddr>,
    sock: Sock,
    link: Link,
    /// Bumped with every new socket: events of an older socket are ignored.
    gen: u32,
    /// Bytes not yet written.
    wbuf: BytesMut,
    /// Bytes received and not yet a whole frame.
    rbuf: Vec<u8>,
    /// Deadline the heap holds for the session, if any.
    session_timer: Option<u64>,
    retry_gen: u32,
    connect_started_ns: u64,
    logged_in: bool,
    logged_in_once: bool,
    stormed: bool,
    /// Whom this client sends to (c2c partner or the server).
    to: Option<UserId<'static>>,
    next_seq: u64,
    /// Closed loop: messages sent and not yet delivered.
    in_flight: usize,
    /// Arrivals from this client's one sender.
    rx: SeqTracker,
    /// ACKs of this client's own messages.
    acks: SeqTracker,
    /// Messages the session passed to the application, after its de-duplication.
    app_rx: SeqTracker,
}

/// Runs one worker to the end, reporting through `sink` (which answers `false` when nobody listens
/// any more: the worker then logs out and stops).
///
/// # Errors
/// The event loop could not be created.
pub fn run(
    config: &Config,
    spec: WorkerSpec,
    sink: &mut dyn FnMut(Snapshot) -> bool,
) -> std::io::Result<()> {
    let mut worker = Worker::new(config, spec)?;
    worker.run(sink);
    Ok(())
}

struct Worker<'c> {
    config: &'c Config,
    index: usize,
    worker_count: usize,
    poll: Poll,
    events: Events,
    timerfd: TimerFd,
    timers: Timers,
    clients: Vec<Client>,
    anchor: Anchor,
    decoder: Decoder,
    /// Receive buffer shared by all clients of the worker.
    scratch: Vec<u8>,
    udp_out: BytesMut,
    counters: [Counters; 3],
    latency: [Histogram<u64>; 3],
    interval: Histogram<u64>,
    login_latency: Histogram<u64>,
    relogin_latency: Histogram<u64>,
    logins: Logins,
    phase: Phase,
    phase_deadline: u64,
    hard_stop: u64,
    started_ns: u64,
    login_rate: f64,
    login_next: usize,
    storm_start_ns: u64,
    schedule: Option<Schedule>,
    /// Closed loop: messages this worker may still send (`--messages` share).
    budget: Option<u64>,
    senders: Vec<usize>,
    cursor: usize,
    fanout_cursor: usize,
    /// Closed-loop senders whose window opened this turn.
    releases: Vec<usize>,
    /// Clients whose socket may still hold input (read budget exhausted).
    pending_read: Vec<usize>,
    send_start_ns: u64,
    send_end_ns: u64,
    last_delivery_ns: u64,
    max_lag_ns: u64,
    next_progress_ns: u64,
    mask_state: u32,
    ws_request: Vec<Vec<u8>>,
    error: Option<String>,
}

impl<'c> Worker<'c> {
    fn new(config: &'c Config, spec: WorkerSpec) -> std::io::Result<Self> {
        let anchor = Anchor::now();
        let now = clock::mono_ns();
        let ranges = plan::split(config.clients, spec.count);
        let range = ranges.get(spec.index).cloned().unwrap_or(0..0);
        let transports = plan::transports(config.clients, config.weights);
        let sources = plan::source_ips(config, &transports);
        let n = range.len();
        let now_i = anchor.instant(now);
        let mut clients = Vec::with_capacity(n);
        let hosts = config.hosts.len().max(1);
        for (local, global) in range.clone().enumerate() {
            let transport = transports.get(global).copied().unwrap_or(Transport::Tcp);
            let host = config
                .hosts
                .get(global % hosts)
                .copied()
                .unwrap_or(IpAddr::from([127, 0, 0, 1]));
            let port = match transport {
                Transport::Tcp => config.tcp_port,
                Transport::Udp => config.udp_port,
                Transport::Ws => config.ws_port,
            };
            let uid = format!("{}{}", config.uid_prefix, global);
            let mut session_config = ClientConfig::new(uid, config.token.clone(), transport);
            (session_config.qos, session_config.dedup) = config.qos_schedule();
            let to = match config.scenario {
                Scenario::C2s => Some(UserId::new("0")),
                Scenario::C2c => plan::partner(config.scenario, local, n)
                    .map(|p| UserId::from(format!("{}{}", config.uid_prefix, range.start + p))),
                _ => None,
            };
            clients.push(Client {
                session: ClientSession::new(session_config, now_i),
                transport,
                server: SocketAddr::new(host, port),
                source: (!sources.is_empty())
                    .then(|| sources.get(global % sources.len()).copied())
                    .flatten(),
                sock: Sock::None,
                link: Link::Down,
                gen: 0,
                wbuf: BytesMut::new(),
                rbuf: Vec::new(),
                session_timer: None,
                retry_gen: 0,
                connect_started_ns: 0,
                logged_in: false,
                logged_in_once: false,
                stormed: false,
                to,
                next_seq: 0,
                in_flight: 0,
                rx: SeqTracker::default(),
                acks: SeqTracker::default(),
                app_rx: SeqTracker::default(),
            });
        }
        let senders: Vec<usize> = (0..n)
            .filter(|&i| plan::is_sender(config.scenario, i, n))
            .collect();
        let login_rate = if config.clients == 0 {
            0.0
        } else {
            config.login_rate * n as f64 / config.clients as f64
        };
        let login_deadline = now
            + secs_ns(n as f64 / login_rate.max(f64::MIN_POSITIVE)).min(secs_ns(86_400.0))
            + dur_ns(LOGIN_SLACK);
        let send_phase = config.duration.map_or_else(
            || match config.rate {
                Rate::PerSecond(rate) => secs_ns(config.messages.unwrap_or(0) as f64 / rate + 1.0),
                Rate::Max => dur_ns(MAX_SEND_PHASE),
            },
            dur_ns,
        );
        let hard_stop = login_deadline
            + dur_ns(STORM_SETTLE)
            + send_phase
            + dur_ns(config.grace)
            + dur_ns(HARD_STOP_SLACK);
        let ws_request = config
            .hosts
            .iter()
            .map(|&h| ws::upgrade_request(SocketAddr::new(h, config.ws_port), &config.ws_path))
            .collect();
        Ok(Self {
            config,
            index: spec.index,
            worker_count: spec.count,
            poll: Poll::new()?,
            events: Events::with_capacity(EVENTS_PER_TURN),
            timerfd: TimerFd::new()?,
            timers: Timers::default(),
            clients,
            anchor,
            decoder: Decoder::new(),
            scratch: vec![0; io::READ_CHUNK + imedge_protocol::codec::PADDING],
            udp_out: BytesMut::with_capacity(4096),
            counters: [Counters::default(); 3],
            latency: [stats::histogram(), stats::histogram(), stats::histogram()],
            interval: stats::histogram(),
            login_latency: stats::histogram(),
            relogin_latency: stats::histogram(),
            logins: Logins::default(),
            phase: Phase::Login,
            phase_deadline: login_deadline,
            hard_stop,
            started_ns: now,
            login_rate,
            login_next: 0,
            storm_start_ns: 0,
            schedule: None,
            budget: None,
            senders,
            cursor: 0,
            fanout_cursor: 1,
            releases: Vec::new(),
            pending_read: Vec::new(),
            send_start_ns: 0,
            send_end_ns: 0,
            last_delivery_ns: now,
            max_lag_ns: 0,
            next_progress_ns: now + dur_ns(PROGRESS_INTERVAL),
            mask_state: 0x9e37_79b9 ^ (spec.index as u32).wrapping_mul(0x85eb_ca6b),
            ws_request,
            error: None,
        })
    }

    fn run(&mut self, sink: &mut dyn FnMut(Snapshot) -> bool) {
        set_timer_slack();
        if let Err(e) = self.poll.registry().register(
            &mut mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&self.timerfd)),
            mio::Token(io::TIMER_TOKEN),
            mio::Interest::READABLE,
        ) {
            self.error = Some(format!("timerfd: {e}"));
        }
        let mut events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        while self.phase != Phase::Done {
            let now = clock::mono_ns();
            if now >= self.hard_stop {
                self.error
                    .get_or_insert_with(|| "hard deadline reached".to_owned());
                self.start_logout(now);
                break;
            }
            let wake = self.next_wake(now);
            let timeout = if wake <= now {
                Some(Duration::ZERO)
            } else {
                self.timerfd.arm(wake);
                Some(MAX_POLL_WAIT)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    self.error = Some(format!("epoll: {e}"));
                    self.start_logout(clock::mono_ns());
                    break;
                }
            }
            let now = clock::mono_ns();
            for event in events.iter() {
                let token = event.token().0;
                if token == io::TIMER_TOKEN {
                    self.timerfd.drain();
                    continue;
                }
                self.on_ready(token, event, now);
            }
            let pending = std::mem::take(&mut self.pending_read);
            for idx in pending {
                self.read(idx, now, false);
                self.drive(idx, now);
            }
            self.run_timers(now);
            self.step(now);
            self.run_releases(now);
            if now >= self.next_progress_ns {
                self.next_progress_ns = now + dur_ns(PROGRESS_INTERVAL);
                let snapshot = self.snapshot(now, false);
                if !sink(snapshot) && self.phase < Phase::Logout {
                    self.error = Some("parent gone".to_owned());
                    self.start_logout(now);
                }
            }
        }
        self.events = events;
        let now = clock::mono_ns();
        let _ = sink(self.snapshot(now, true));
    }

    /// The earliest time something must happen.
    fn next_wake(&self, now: u64) -> u64 {
        if !self.pending_read.is_empty() || !self.releases.is_empty() {
            return now;
        }
        let mut wake = self.next_progress_ns.min(self.phase_deadline);
        if let Some(t) = self.timers.next() {
            wake = wake.min(t);
        }
        match self.phase {
            Phase::Login if self.login_next < self.clients.len() => {
                wake = wake.min(self.login_due(self.login_next));
            }
            Phase::Send => {
                if let Some(due) = self.schedule.as_ref().and_then(Schedule::next_due) {
                    wake = wake.min(due);
                }
            }
            _ => {}
        }
        wake
    }

    fn login_due(&self, k: usize) -> u64 {
        self.started_ns + secs_ns(k as f64 / self.login_rate.max(f64::MIN_POSITIVE))
    }

    /// Phase logic: logins, sends, transitions.
    fn step(&mut self, now: u64) {
        match self.phase {
            Phase::Login => {
                let mut started = 0;
                while self.login_next < self.clients.len()
                    && started < MAX_CONNECTS_PER_TURN
                    && self.login_due(self.login_next) <= now
                {
                    let idx = self.login_next;
                    self.login_next += 1;
                    started += 1;
                    self.start_connect(idx, now, true);
                    self.drive(idx, now);
                }
                let all_in = self.login_next == self.clients.len()
                    && self.logins.logged_in_now as usize == self.clients.len();
                if all_in || now >= self.phase_deadline {
                    self.logins.timed_out =
                        self.clients.iter().filter(|c| !c.logged_in_once).count() as u64;
                    self.end_login(now);
                }
            }
            Phase::Settle => {
                if now >= self.phase_deadline {
                    self.start_storm(now);
                }
            }
            Phase::Storm => {
                let done = self.logins.relogins_ok >= self.logins.stormed;
                if done || now >= self.phase_deadline {
                    self.start_logout(now);
                }
            }
            Phase::Send => {
                if let Some(mut schedule) = self.schedule.take() {
                    let mut burst = 0;
                    while burst < MAX_BURST {
                        let Some(intended) = schedule.pop_due(now) else {
                            break;
                        };
                        burst += 1;
                        self.send_next(intended, now);
                    }
                    let exhausted = schedule.next_due().is_none();
                    self.schedule = Some(schedule);
                    if exhausted {
                        self.start_drain(now);
                        return;
                    }
                }
                let stalled = matches!(self.config.rate, Rate::Max)
                    && self.outstanding() > 0
                    && now.saturating_sub(self.last_delivery_ns) > dur_ns(STALL_TIMEOUT);
                if now >= self.phase_deadline || stalled || self.budget == Some(0) {
                    self.start_drain(now);
                }
            }
            Phase::Drain => {
                if self.outstanding() == 0 || now >= self.phase_deadline {
                    self.start_logout(now);
                }
            }
            Phase::Logout => self.phase = Phase::Done,
            Phase::Done => {}
        }
    }

    fn end_login(&mut self, now: u64) {
        match self.config.scenario {
            Scenario::Storm => {
                self.phase = Phase::Settle;
                self.phase_deadline = now + dur_ns(STORM_SETTLE);
            }
            _ => self.start_send(now),
        }
    }

    fn start_send(&mut self, now: u64) {
        self.phase = Phase::Send;
        self.send_start_ns = now;
        self.last_delivery_ns = now;
        let send_phase = self.config.duration.map_or(dur_ns(MAX_SEND_PHASE), dur_ns);
        self.phase_deadline = now + send_phase;
        if !self.config.scenario.sends() || self.senders.is_empty() {
            return;
        }
        let ranges = plan::split(self.config.clients, self.worker_count);
        let per_worker = plan::senders_per_worker(self.config, &ranges);
        let all: usize = per_worker.iter().sum();
        let limit = self
            .config
            .messages
            .map(|m| schedule::worker_limit(m, self.index, &per_worker));
        match self.config.rate {
            Rate::PerSecond(rate) => {
                let mine = schedule::worker_rate(rate, self.senders.len(), all);
                self.schedule = Some(Schedule::new(now, mine, limit));
            }
            Rate::Max => {
                self.budget = limit;
                let window = self.config.window.max(1);
                for k in 0..self.senders.len() {
                    for _ in 0..window {
                        let Some(&idx) = self.senders.get(k) else {
                            break;
                        };
                        self.send_from(idx, now, now);
                    }
                }
            }
        }
    }

    fn start_storm(&mut self, now: u64) {
        self.phase = Phase::Storm;
        self.storm_start_ns = now;
        self.phase_deadline = now + self.config.duration.map_or(dur_ns(LOGIN_SLACK), dur_ns);
        let inst = self.anchor.instant(now);
        for idx in 0..self.clients.len() {
            let Some(c) = self.clients.get_mut(idx) else {
                continue;
            };
            if !c.logged_in {
                continue;
            }
            c.stormed = true;
            c.logged_in = false;
            self.logins.logged_in_now = self.logins.logged_in_now.saturating_sub(1);
            self.logins.stormed += 1;
            self.close_link(idx);
            if let Some(c) = self.clients.get_mut(idx) {
                c.session.handle_disconnected(inst);
            }
            self.drive(idx, now);
        }
    }

    fn start_drain(&mut self, now: u64) {
        self.phase = Phase::Drain;
        self.send_end_ns = now;
        self.phase_deadline = now + dur_ns(self.config.grace);
    }

    fn start_logout(&mut self, now: u64) {
        if self.send_start_ns != 0 && self.send_end_ns == 0 {
            self.send_end_ns = now;
        }
        self.phase = Phase::Logout;
        let inst = self.anchor.instant(now);
        for idx in 0..self.clients.len() {
            if let Some(c) = self.clients.get_mut(idx) {
                c.session.logout(inst);
            }
            self.drive(idx, now);
        }
    }

    /// Messages sent and not yet delivered or (with QoS) not yet ACKed; C2S without QoS: 0,
    /// nothing confirms those.
    fn outstanding(&self) -> u64 {
        if self.config.scenario == Scenario::C2s && !self.config.qos {
            return 0;
        }
        let qos = self.config.qos;
        self.counters
            .iter()
            .map(|c| {
                let undelivered = c.sent.saturating_sub(c.delivered);
                // With QoS the drain also waits for the ACKs, so `acked` is final too.
                let unacked = if qos {
                    c.sent.saturating_sub(c.acked)
                } else {
                    0
                };
                undelivered.max(unacked)
            })
            .sum()
    }

    /// Open loop: the next sender in turn sends the message intended at `intended`.
    fn send_next(&mut self, intended: u64, now: u64) {
        let Some(&idx) = self.senders.get(self.cursor) else {
            return;
        };
        self.cursor = (self.cursor + 1) % self.senders.len().max(1);
        self.send_from(idx, intended, now);
    }

    /// Sends one message from `idx`, intended at `intended`.
    fn send_from(&mut self, idx: usize, intended: u64, now: u64) {
        if let Some(budget) = &mut self.budget {
            if *budget == 0 {
                return;
            }
            *budget -= 1;
        }
        let to = match self.config.scenario {
            Scenario::Fanout => {
                let n = self.clients.len();
                if n < 2 {
                    return;
                }
                let r = self.fanout_cursor;
                self.fanout_cursor = if r + 1 >= n { 1 } else { r + 1 };
                let Some(rc) = self.clients.get(r) else {
                    return;
                };
                rc.session.config().user_id.clone()
            }
            _ => match self.clients.get(idx).and_then(|c| c.to.clone()) {
                Some(to) => to,
                None => return,
            },
        };
        let qos = self.config.qos;
        let size = self.config.message_size;
        let worker = self.index as u32;
        let inst = self.anchor.instant(now);
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        let t = plan::transport_index(c.transport);
        let stamp = Stamp {
            run: self.config.run_id,
            worker,
            sender: idx as u32,
            seq: c.next_seq,
            intended_ns: intended,
        };
        let text = payload::encode(&stamp, size);
        let fp = qos.then(|| Fingerprint::from(payload::fingerprint(&stamp)));
        let counters = counters_mut(&mut self.counters, t);
        match c.session.send(inst, to, text, fp, 0) {
            Ok(()) => {
                c.next_seq += 1;
                c.in_flight += 1;
                counters.sent += 1;
                let lag = now.saturating_sub(intended);
                self.max_lag_ns = self.max_lag_ns.max(lag);
                if lag > dur_ns(LATE_THRESHOLD) {
                    counters.late += 1;
                }
                self.drive(idx, now);
            }
            Err(_) => counters.unsent += 1,
        }
    }

    fn run_releases(&mut self, now: u64) {
        let releases = std::mem::take(&mut self.releases);
        for idx in releases {
            let Some(c) = self.clients.get_mut(idx) else {
                continue;
            };
            c.in_flight = c.in_flight.saturating_sub(1);
            if self.phase == Phase::Send
                && matches!(self.config.rate, Rate::Max)
                && c.in_flight < self.config.window.max(1)
            {
                self.send_from(idx, now, now);
            }
        }
    }

    fn run_timers(&mut self, now: u64) {
        while let Some((at, idx, kind, tag)) = self.timers.pop_due(now) {
            let idx = idx as usize;
            let Some(c) = self.clients.get_mut(idx) else {
                continue;
            };
            match kind {
                Kind::Session => {
                    if c.session_timer != Some(at) {
                        continue;
                    }
                    c.session_timer = None;
                    c.session.handle_timeout(self.anchor.instant(now));
                }
                Kind::Retry => {
                    if c.retry_gen != tag || c.logged_in_once || self.phase != Phase::Login {
                        continue;
                    }
                    if c.link == Link::Up {
                        c.session.handle_disconnected(self.anchor.instant(now));
                    }
                    self.close_link(idx);
                    // Drop whatever the abandoned session queued, then start over.
                    if let Some(c) = self.clients.get_mut(idx) {
                        while c.session.poll_output().is_some() {}
                        while c.session.poll_event().is_some() {}
                    }
                    self.start_connect(idx, now, true);
                }
            }
            self.drive(idx, now);
        }
    }

    /// Performs what the session asked and counts what it reported, until it asks nothing more.
    fn drive(&mut self, idx: usize, now: u64) {
        // Each round either empties the queues or handles a link failure; a handful of rounds is
        // always enough, the bound only guards against a livelock.
        const MAX_ROUNDS: usize = 16;
        for _ in 0..MAX_ROUNDS {
            let mut progressed = false;
            loop {
                let Some(c) = self.clients.get_mut(idx) else {
                    return;
                };
                let Some(output) = c.session.poll_output() else {
                    break;
                };
                progressed = true;
                match output {
                    imedge_protocol::session::Output::Transmit(msg) => self.transmit(idx, &msg),
                    imedge_protocol::session::Output::Reconnect => {
                        self.flush(idx, now);
                        self.close_link(idx);
                        self.start_connect(idx, now, false);
                    }
                    imedge_protocol::session::Output::Close => {
                        self.close_graceful(idx);
                    }
                }
            }
            if self.flush(idx, now) {
                progressed = true;
            }
            while let Some(event) = self
                .clients
                .get_mut(idx)
                .and_then(|c| c.session.poll_event())
            {
                progressed = true;
                self.on_event(idx, event, now);
            }
            if !progressed {
                break;
            }
        }
        self.rearm(idx);
    }

    fn rearm(&mut self, idx: usize) {
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        let next = c.session.poll_timeout().map(|t| self.anchor.ns(t));
        if next != c.session_timer {
            c.session_timer = next;
            if let Some(at) = next {
                self.timers.push(at, idx as u32, Kind::Session, 0);
            }
        }
    }

    fn on_event(&mut self, idx: usize, event: Event, now: u64) {
        let scenario = self.config.scenario;
        let phase = self.phase;
        let worker = self.index as u32;
        let run = self.config.run_id;
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        let t = plan::transport_index(c.transport);
        match event {
            Event::LoginOk { .. } => {
                if c.stormed {
                    c.stormed = false;
                    self.logins.relogins_ok += 1;
                    stats::record_ns(
                        &mut self.relogin_latency,
                        now.saturating_sub(self.storm_start_ns),
                    );
                } else if !c.logged_in_once {
                    self.logins.ok += 1;
                    self.logins.last_ok_ns = now;
                    stats::record_ns(
                        &mut self.login_latency,
                        now.saturating_sub(c.connect_started_ns),
                    );
                }
                c.logged_in_once = true;
                if !c.logged_in {
                    c.logged_in = true;
                    self.logins.logged_in_now += 1;
                }
            }
            Event::LoginFailed { .. } => self.logins.failed += 1,
            Event::LinkLost => {
                if c.logged_in {
                    c.logged_in = false;
                    self.logins.logged_in_now = self.logins.logged_in_now.saturating_sub(1);
                    self.logins.link_lost += 1;
                }
            }
            Event::Kicked { .. } => {
                self.logins.kicked += 1;
                if c.logged_in {
                    c.logged_in = false;
                    self.logins.logged_in_now = self.logins.logged_in_now.saturating_sub(1);
                }
            }
            Event::Delivered(fp) => {
                let Some(stamp) = payload::decode_fingerprint(fp.as_str()) else {
                    return;
                };
                if stamp.run != run || stamp.worker != worker || stamp.sender as usize != idx {
                    return;
                }
                if c.acks.observe(stamp.seq) == Arrival::Duplicate {
                    return;
                }
                let counters = counters_mut(&mut self.counters, t);
                counters.acked += 1;
                if scenario == Scenario::C2s {
                    counters.delivered += 1;
                    let latency = now.saturating_sub(stamp.intended_ns);
                    if let Some(h) = self.latency.get_mut(t) {
                        stats::record_ns(h, latency);
                    }
                    stats::record_ns(&mut self.interval, latency);
                    self.last_delivery_ns = now;
                    self.releases.push(idx);
                }
            }
            Event::Lost(..) => {
                if phase < Phase::Logout {
                    counters_mut(&mut self.counters, t).qos_lost += 1;
                    self.releases.push(idx);
                }
            }
            Event::Error { .. } => self.logins.server_errors += 1,
            Event::Message(msg) => {
                if let Some(text) = msg.text() {
                    self.on_app_message(idx, text);
                }
            }
            Event::EchoResponse(_) | Event::Malformed { .. } => {}
        }
    }

    /// The session passed a data message to the application of receiver `idx`: a second copy
    /// of one message is a duplicate the session's de-duplication let through.
    fn on_app_message(&mut self, idx: usize, text: &str) {
        let Some(stamp) = payload::decode(text) else {
            return;
        };
        if stamp.run != self.config.run_id || stamp.worker != self.index as u32 {
            return;
        }
        let Some(t) = self
            .clients
            .get(stamp.sender as usize)
            .map(|c| plan::transport_index(c.transport))
        else {
            return;
        };
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        if c.app_rx.observe(stamp.seq) == Arrival::Duplicate {
            counters_mut(&mut self.counters, t).app_duplicated += 1;
        }
    }

    /// A data message reached receiver `idx`: count it for its sender's transport, before the
    /// session's de-duplication.
    fn on_data(&mut self, idx: usize, text: &str, now: u64) {
        let Some(stamp) = payload::decode(text) else {
            return;
        };
        if stamp.run != self.config.run_id || stamp.worker != self.index as u32 {
            return;
        }
        let sender = stamp.sender as usize;
        let Some(t) = self
            .clients
            .get(sender)
            .map(|c| plan::transport_index(c.transport))
        else {
            return;
        };
        let Some(c) = self.clients.get_mut(idx) else {
            return;
        };
        let arrival = c.rx.observe(stamp.seq);
        if count_arrival(counters_mut(&mut self.counters, t), arrival) {
            let latency = now.saturating_sub(stamp.intended_ns);
            if let Some(h) = self.latency.get_mut(t) {
                stats::record_ns(h, latency);
            }
            stats::record_ns(&mut self.interval, latency);
            self.last_delivery_ns = now;
            self.releases.push(sender);
        }
    }

    fn snapshot(&mut self, now: u64, is_final: bool) -> Snapshot {
        let mut counters = self.counters;
        if is_final {
            let unverified = self.config.scenario == Scenario::C2s && !self.config.qos;
            for c in &mut counters {
                if !unverified {
                    c.settle();
                }
            }
        }
        let interval = stats::encode_histogram(&self.interval);
        self.interval.reset();
        let (latency, login_latency, relogin_latency) = if is_final {
            (
                self.latency.each_ref().map(stats::encode_histogram),
                stats::encode_histogram(&self.login_latency),
                stats::encode_histogram(&self.relogin_latency),
            )
        } else {
            Default::default()
        };
        Snapshot {
            worker: self.index,
            is_final,
            phase: self.phase.name().to_owned(),
            clients: self.clients.len(),
            counters,
            logins: self.logins,
            interval_latency: interval,
            latency,
            login_latency,
            relogin_latency,
            cpu_ns: clock::thread_cpu_ns().unwrap_or(0),
            at_ns: now,
            started_ns: self.started_ns,
            send_start_ns: self.send_start_ns,
            send_end_ns: self.send_end_ns,
            max_lag_ns: self.max_lag_ns,
            error: self.error.clone(),
        }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift32: masks need not be secret here, only present (RFC 6455 §5.3).
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        x.to_ne_bytes()
    }

    fn instant(&self, now: u64) -> Instant {
        self.anchor.instant(now)
    }
}

fn counters_mut(counters: &mut [Counters; 3], t: usize) -> &mut Counters {
    let [tcp, udp, ws] = counters;
    match t {
        0 => tcp,
        1 => udp,
        _ => ws,
    }
}

fn dur_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 4)
}

fn secs_ns(s: f64) -> u64 {
    (s.max(0.0) * 1e9) as u64
}

/// Asks the kernel for 1 ns timer slack on this thread: the default 50 µs would be added to
/// every timerfd wake-up, hence to measured latencies.
fn set_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}
