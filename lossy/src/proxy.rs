//! The proxy: [`Proxy::start`] with a [`Config`], one thread running a mio loop.
//!
//! ```text
//! client ──▶ listen socket ──(to_server faults)──▶ flow socket (one per client) ──▶ server
//! client ◀── listen socket ◀──(to_client faults)── flow socket ◀───────────────── server
//! ```
//!
//! A datagram's fate comes from [`decide`]; one to send later waits in a queue ordered by due
//! time (then arrival), which the loop drains between reads. Everything a peer could grow is
//! bounded: flows ([`Config::max_flows`], idle ones closed after [`Config::flow_idle`]) and
//! delayed datagrams ([`MAX_QUEUED`]).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::faults::{decide, Fate, Faults};
use crate::rng::Rng;

/// Flows kept at once. Each holds a socket (a file descriptor); 10,000 clients through one proxy
/// is more than any test here needs and stays under common descriptor limits.
pub const DEFAULT_MAX_FLOWS: usize = 10_000;

/// A flow without traffic either way for this long is closed: longer than any idle timeout of the
/// protocol (the server forgets a silent UDP session after 10 s; SDK keep-alives come every 3 s),
/// so a live client never loses its source address to the proxy.
pub const DEFAULT_FLOW_IDLE: Duration = Duration::from_secs(60);

/// Delayed datagrams held at once; more are dropped (counted in [`DirectionStats::overflow`]).
/// At 64 Ki datagrams of at most [`MAX_DATAGRAM`] a long delay at a high rate cannot take more
/// than a few hundred MB; test traffic (≤ 2 KiB datagrams) stays far below.
pub const MAX_QUEUED: usize = 1 << 16;

/// Largest datagram carried (the UDP maximum).
pub const MAX_DATAGRAM: usize = 65_536;

/// Consecutive read errors tolerated on one socket in one turn (each ICMP error is reported
/// once; a socket that keeps failing must not spin the loop).
const MAX_READ_ERRORS: u32 = 64;

/// How often idle flows are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

const CLIENTS: Token = Token(0);
const WAKER: Token = Token(1);
/// Tokens of flow sockets start here; flow `i` has token `FIRST_FLOW + i`.
const FIRST_FLOW: usize = 2;

/// What the proxy does. [`Config::new`] is a perfect link on an ephemeral loopback port.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where clients send (default `127.0.0.1:0`, an ephemeral port: see [`Proxy::addr`]).
    pub listen: SocketAddr,
    /// The server datagrams are relayed to.
    pub upstream: SocketAddr,
    /// Faults of client → server datagrams.
    pub to_server: Faults,
    /// Faults of server → client datagrams.
    pub to_client: Faults,
    /// Seed of the RNG behind every decision: the same seed and the same arrival order give the
    /// same fates.
    pub seed: u64,
    /// The first this-many datagrams of each flow in each direction go through untouched (so
    /// that, say, every client's login and its response get through).
    pub spare_first: u64,
    /// See [`DEFAULT_FLOW_IDLE`].
    pub flow_idle: Duration,
    /// See [`DEFAULT_MAX_FLOWS`]; datagrams from further clients are dropped and counted in
    /// [`Stats::refused_flows`].
    pub max_flows: usize,
}

impl Config {
    /// A perfect link to `upstream`, listening on an ephemeral port of 127.0.0.1.
    pub fn new(upstream: SocketAddr) -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            upstream,
            to_server: Faults::default(),
            to_client: Faults::default(),
            seed: 0,
            spare_first: 0,
            flow_idle: DEFAULT_FLOW_IDLE,
            max_flows: DEFAULT_MAX_FLOWS,
        }
    }
}

/// A direction through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → server.
    ToServer,
    /// Server → client.
    ToClient,
}

/// Counts of one direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams read.
    pub received: u64,
    /// Datagrams written (duplicates included).
    pub sent: u64,
    /// Dropped by the faults.
    pub dropped: u64,
    /// Sent twice by the faults.
    pub duplicated: u64,
    /// Held back to be overtaken.
    pub reordered: u64,
    /// Among the first of their flow, passed untouched.
    pub spared: u64,
    /// Dropped because the delay queue was full or the write failed.
    pub overflow: u64,
}

/// Counts of a proxy.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Client → server.
    pub to_server: DirectionStats,
    /// Server → client.
    pub to_client: DirectionStats,
    /// Flows opened (a client that changes its source address opens a new one).
    pub flows: u64,
    /// Flows open now.
    pub open_flows: u64,
    /// Datagrams of new clients dropped because [`Config::max_flows`] flows were open.
    pub refused_flows: u64,
}

impl Stats {
    fn dir(&mut self, dir: Direction) -> &mut DirectionStats {
        match dir {
            Direction::ToServer => &mut self.to_server,
            Direction::ToClient => &mut self.to_client,
        }
    }
}

/// A running proxy. Dropping it stops it.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    stats: Mutex<Stats>,
    /// New faults for the loop to take at its next turn.
    update: Mutex<Update>,
    /// Signalled when the loop has taken an update (or ended).
    updated: Condvar,
}

#[derive(Debug, Default)]
struct Update {
    /// Faults (to server, to client) not yet taken.
    pending: Option<(Faults, Faults)>,
    /// Updates taken so far.
    applied: u64,
}

impl Proxy {
    /// Binds `config.listen` and starts the proxy's thread.
    ///
    /// # Errors
    /// Binding the listening socket, or setting up the poll.
    pub fn start(config: Config) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut clients = UdpSocket::bind(config.listen)?;
        poll.registry()
            .register(&mut clients, CLIENTS, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let addr = clients.local_addr()?;
        let shared = Arc::new(Shared::default());
        let mut state = Loop {
            rng: Rng::new(config.seed),
            config,
            poll,
            clients,
            flows: Vec::new(),
            free: Vec::new(),
            by_client: HashMap::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            stats: Stats::default(),
            shared: Arc::clone(&shared),
            buf: vec![0; MAX_DATAGRAM],
        };
        let thread = std::thread::Builder::new()
            .name("imedge-lossy".to_owned())
            .spawn(move || state.run())?;
        Ok(Self {
            addr,
            shared,
            waker,
            thread: Some(thread),
        })
    }

    /// The address clients must send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the faults of both directions (a partition and its healing, say). Returns once
    /// the proxy's loop has taken them: every datagram read after that meets the new faults;
    /// datagrams already delayed keep their fate.
    pub fn set_faults(&self, to_server: Faults, to_client: Faults) {
        let mut update = self
            .shared
            .update
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        update.pending = Some((to_server, to_client));
        let target = update.applied + 1;
        let _ = self.waker.wake();
        while update.applied < target && !self.shared.stop.load(AtomicOrdering::SeqCst) {
            // Bounded waits: a loop that ended on a poll error never signals.
            update = self
                .shared
                .updated
                .wait_timeout(update, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                return;
            }
        }
    }

    /// The counts so far (updated after every turn of the loop).
    pub fn stats(&self) -> Stats {
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the proxy (delayed datagrams still queued are dropped) and returns its final counts.
    pub fn stop(mut self) -> Stats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, AtomicOrdering::SeqCst);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One client's path to the server.
#[derive(Debug)]
struct Flow {
    client: SocketAddr,
    socket: UdpSocket,
    last_active: Instant,
    /// Datagrams seen so far, per direction (for `spare_first`).
    seen: [u64; 2],
}

/// A datagram waiting for its due time.
#[derive(Debug)]
struct Delayed {
    at: Instant,
    /// Arrival order, so that equal due times keep it.
    seq: u64,
    dir: Direction,
    client: SocketAddr,
    bytes: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The proxy thread's state.
struct Loop {
    config: Config,
    rng: Rng,
    poll: Poll,
    clients: UdpSocket,
    /// Slot `i` is the flow of token `FIRST_FLOW + i`.
    flows: Vec<Option<Flow>>,
    free: Vec<usize>,
    by_client: HashMap<SocketAddr, usize>,
    queue: BinaryHeap<Delayed>,
    seq: u64,
    stats: Stats,
    shared: Arc<Shared>,
    buf: Vec<u8>,
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
        while !self.shared.stop.load(AtomicOrdering::SeqCst) {
            let now = Instant::now();
            let due = self
                .queue
                .peek()
                .map_or(next_sweep, |d| d.at.min(next_sweep));
            match self
                .poll
                .poll(&mut events, Some(due.saturating_duration_since(now)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Nothing sensible to do but stop; the owner sees the counts stop moving.
                Err(_) => break,
            }
            self.take_update();
            for event in &events {
                match event.token() {
                    CLIENTS => self.read_clients(),
                    WAKER => {}
                    Token(t) => self.read_flow(t.wrapping_sub(FIRST_FLOW)),
                }
            }
            let now = Instant::now();
            self.release(now);
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + SWEEP_INTERVAL;
            }
            self.stats.open_flows = self.by_client.len() as u64;
            *self
                .shared
                .stats
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = self.stats;
        }
    }

    /// Applies new faults from [`Proxy::set_faults`], if any.
    fn take_update(&mut self) {
        let mut update = self
            .shared
            .update
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((to_server, to_client)) = update.pending.take() {
            self.config.to_server = to_server;
            self.config.to_client = to_client;
            update.applied += 1;
            self.shared.updated.notify_all();
        }
    }

    fn read_clients(&mut self) {
        let mut errors = 0;
        loop {
            let (len, client) = match self.clients.recv_from(&mut self.buf) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // Interrupted, or an ICMP error reported on the socket: read on (a socket that
                // only fails is left for the next turn).
                Err(_) if errors < MAX_READ_ERRORS => {
                    errors += 1;
                    continue;
                }
                Err(_) => return,
            };
            let Some(slot) = self.flow_for(client) else {
                self.stats.refused_flows += 1;
                continue;
            };
            let bytes = self.buf.get(..len).unwrap_or_default().to_vec();
            self.route(Direction::ToServer, slot, bytes);
        }
    }

    fn read_flow(&mut self, slot: usize) {
        let mut errors = 0;
        loop {
            let Some(Some(flow)) = self.flows.get_mut(slot) else {
                return;
            };
            let len = match flow.socket.recv(&mut self.buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // ECONNREFUSED (the server is not there yet) is reported once: read on.
                Err(_) if errors < MAX_READ_ERRORS => {
                    errors += 1;
                    continue;
                }
                Err(_) => return,
            };
            let bytes = self.buf.get(..len).unwrap_or_default().to_vec();
            self.route(Direction::ToClient, slot, bytes);
        }
    }

    /// The flow of `client`, opened if new; `None` when too many are open or the socket cannot
    /// be made.
    fn flow_for(&mut self, client: SocketAddr) -> Option<usize> {
        if let Some(&slot) = self.by_client.get(&client) {
            return Some(slot);
        }
        if self.by_client.len() >= self.config.max_flows {
            return None;
        }
        let any = if self.config.upstream.is_ipv4() {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
        };
        let mut socket = UdpSocket::bind(any).ok()?;
        socket.connect(self.config.upstream).ok()?;
        let slot = self.free.pop().unwrap_or(self.flows.len());
        self.poll
            .registry()
            .register(&mut socket, Token(FIRST_FLOW + slot), Interest::READABLE)
            .ok()?;
        let flow = Flow {
            client,
            socket,
            last_active: Instant::now(),
            seen: [0; 2],
        };
        if slot == self.flows.len() {
            self.flows.push(Some(flow));
        } else if let Some(entry) = self.flows.get_mut(slot) {
            *entry = Some(flow);
        }
        self.by_client.insert(client, slot);
        self.stats.flows += 1;
        Some(slot)
    }

    /// Applies the faults of `dir` to a datagram of flow `slot`.
    fn route(&mut self, dir: Direction, slot: usize, bytes: Vec<u8>) {
        let Some(Some(flow)) = self.flows.get_mut(slot) else {
            return;
        };
        let now = Instant::now();
        flow.last_active = now;
        let client = flow.client;
        let index = usize::from(dir == Direction::ToClient);
        let seen = flow.seen.get_mut(index).map_or(0, |seen| {
            *seen += 1;
            *seen
        });
        let spared = seen <= self.config.spare_first;
        let faults = match dir {
            Direction::ToServer => self.config.to_server,
            Direction::ToClient => self.config.to_client,
        };
        let fate = decide(&mut self.rng, &faults, spared);
        let stats = self.stats.dir(dir);
        stats.received += 1;
        stats.spared += u64::from(spared);
        match fate {
            Fate::Dropped => stats.dropped += 1,
            Fate::Sent { delay, reordered } => {
                stats.reordered += u64::from(reordered);
                self.schedule(now + delay, dir, client, bytes);
            }
            Fate::Duplicated {
                first,
                second,
                reordered,
            } => {
                stats.duplicated += 1;
                stats.reordered += u64::from(reordered);
                // The held-back (or later) copy is queued second: equal times keep this order.
                self.schedule(now + first, dir, client, bytes.clone());
                self.schedule(now + second, dir, client, bytes);
            }
        }
    }

    /// Sends now if due now and nothing of the same due time waits; else queues.
    fn schedule(&mut self, at: Instant, dir: Direction, client: SocketAddr, bytes: Vec<u8>) {
        if at <= Instant::now() && self.queue.is_empty() {
            self.send(dir, client, &bytes);
            return;
        }
        if self.queue.len() >= MAX_QUEUED {
            self.stats.dir(dir).overflow += 1;
            return;
        }
        self.seq += 1;
        self.queue.push(Delayed {
            at,
            seq: self.seq,
            dir,
            client,
            bytes,
        });
    }

    /// Sends every queued datagram due by `now`.
    fn release(&mut self, now: Instant) {
        while self.queue.peek().is_some_and(|d| d.at <= now) {
            if let Some(d) = self.queue.pop() {
                self.send(d.dir, d.client, &d.bytes);
            }
        }
    }

    fn send(&mut self, dir: Direction, client: SocketAddr, bytes: &[u8]) {
        let sent = match dir {
            Direction::ToClient => self.clients.send_to(bytes, client).is_ok(),
            Direction::ToServer => {
                let flow = self
                    .by_client
                    .get(&client)
                    .and_then(|&slot| self.flows.get(slot))
                    .and_then(Option::as_ref);
                flow.is_some_and(|flow| flow.socket.send(bytes).is_ok())
            }
        };
        let stats = self.stats.dir(dir);
        if sent {
            stats.sent += 1;
        } else {
            stats.overflow += 1;
        }
    }

    /// Closes flows idle for `flow_idle`.
    fn sweep(&mut self, now: Instant) {
        let idle = self.config.flow_idle;
        for (slot, entry) in self.flows.iter_mut().enumerate() {
            let expired = entry
                .as_ref()
                .is_some_and(|flow| now.saturating_duration_since(flow.last_active) >= idle);
            if expired {
                if let Some(mut flow) = entry.take() {
                    let _ = self.poll.registry().deregister(&mut flow.socket);
                    self.by_client.remove(&flow.client);
                    self.free.push(slot);
                }
            }
        }
    }
}
