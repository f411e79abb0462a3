//! A shard: all session state of the users that hash to one core, and the logic that runs on it.
//!
//! Sans-IO like the protocol crate: the event loop feeds it decoded input with the time, and it
//! answers through an [`Outbox`] (write this message to that endpoint, close that connection,
//! hand this connection to another core, mail that core). Time comes in as [`Now`]; timers live
//! in one [`TimerWheel`] per shard.
//!
//! Where sessions live (see `docs/architecture.md`): every user's session state is on core
//! [`shard_for`]`(uid)`. A TCP or WebSocket connection is accepted by whichever core the kernel
//! picks; it stays there while it is not logged in, and after a successful verify it *migrates*
//! to its user's shard ([`Outbox::migrate`]), so everything a logged-in connection does runs on
//! one core with no hop. UDP datagrams from one address always arrive at the same core's socket,
//! which cannot be changed; that core forwards them to the address's shard ([`ShardMsg::Datagram`])
//! once the address has logged in, and the shard answers through its own socket on the same port.

mod c2s;
mod login;
mod offline;
mod presence;
mod route;

pub use login::{DEFAULT_MAX_PENDING_VERIFIES, DEFAULT_VERIFY_TIMEOUT};
pub use offline::{OfflineStore, Post, LOGIN_PAGE, STREAM_DRAIN_WINDOW, UDP_DRAIN_WINDOW};
pub use presence::Presence;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use imedge_protocol::message::payload::{
    ErrorResponse, LoginRequest, ERROR_INVALID_MESSAGE, ERROR_NOT_LOGGED_IN,
};
use imedge_protocol::qos::{
    QosEvent, QosKey, QosKeyHasher, QosReceiver, QosReceiverConfig, QosSender, QosSenderConfig,
};
use imedge_protocol::session::Transport;
use imedge_protocol::{Decoder, Fingerprint, Kind, Message, UserId};

use crate::hooks::pool::{HookPool, Notice};
use crate::hooks::{Api, Command, Interests, ServerEvents};
use crate::timer::{TimerKey, TimerWheel};

/// Room the relay encoding buffer wants before a message is encoded into it: a typical message
/// fits without growing (a larger one just grows the buffer).
const ENCODE_ROOM: usize = 1024;

/// Size of the allocations the relay encoding buffer takes. Messages encoded one after another
/// share one; a message kept for a resend keeps its whole chunk alive, so the chunk stays small.
const ENCODE_CHUNK: usize = 4096;

/// Default of `--max-message-bytes`: the reference's TCP frame limit (SPEC §1.1), which the Java
/// TCP SDK also applies to the frames it reads — a larger relay would be dropped by its SDK,
/// resent, reported lost and, once stored, redelivered at every login forever.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = imedge_protocol::frame::tcp::DEFAULT_MAX_BODY;

/// Default of `--session-msg-rate`: data messages (type 2) per second a session may send,
/// sustained. A person chatting sends a few per second at most and the Java SDK's resends add
/// at most two copies of each; 200/s is far above any client and still caps what one session can
/// make the server relay, store and de-duplicate.
pub const DEFAULT_SESSION_MSG_RATE: u32 = 200;

/// Default of `--session-msg-burst`: data messages a session may send at once before the rate
/// applies (an app flushing its outbox after a reconnect, the SDK resending a batch).
pub const DEFAULT_SESSION_MSG_BURST: u32 = 400;

/// Index of a core (and of its shard).
pub type CoreId = u16;

/// The core whose shard holds `uid`'s sessions: a fixed hash (FNV-1a) of the uid, so every core
/// computes the same answer without asking anyone.
pub fn shard_for(uid: &str, cores: usize) -> CoreId {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in uid.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let cores = cores.max(1) as u64;
    // `hash % cores` < cores ≤ u16::MAX + 1 since the core count is a u16-sized number.
    u16::try_from(hash % cores).unwrap_or(0)
}

/// A TCP or WebSocket connection on this core, as the event loop names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Where a session's messages go: a connection of this core, or a UDP client address (answered
/// from this core's UDP socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP or WebSocket connection.
    Conn(ConnId),
    /// A UDP client.
    Udp(SocketAddr),
}

/// The time, as the loop read it once for this turn.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time, for timers.
    pub mono: Instant,
    /// Wall-clock time in epoch milliseconds, for `firstLoginTime` and `sm`.
    pub epoch_ms: i64,
}

/// Per-shard settings.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// This shard's core.
    pub core: CoreId,
    /// Number of cores (shards).
    pub cores: usize,
    /// Read-idle timeout of TCP connections (SPEC §6.3).
    pub tcp_idle: Duration,
    /// Read-idle timeout of UDP sessions.
    pub udp_idle: Duration,
    /// Read-idle timeout of WebSocket connections.
    pub ws_idle: Duration,
    /// Write the server clock into `sm` of every packet the server sends (SPEC §2).
    pub server_timestamps: bool,
    /// Resend schedule of server-sent QoS messages (SPEC §8.4).
    pub qos: QosSenderConfig,
    /// De-duplication window of C2S and C2C fingerprints (SPEC §8.5).
    pub dedup: QosReceiverConfig,
    /// Largest C2C message relayed, in bytes of its encoding as it goes to the recipient (with
    /// `from` overwritten and `sm` stamped). One rule for every transport, checked at the
    /// sender's ingress whatever the recipient's transport, since the recipient may be offline
    /// or on another core: a larger message is refused — not relayed, not stored, no ACK (the
    /// sender's SDK reports it lost), an error 4 to the sender, counted in `too_large`. The
    /// default suits TCP and WebSocket recipients; Java UDP clients read only 1024 bytes per
    /// datagram (SPEC §1.2), so a deployment with them sets 1024.
    pub max_message_bytes: usize,
    /// Data messages (type 2) per second a session may send, sustained (0 = no limit). Past it
    /// they are dropped without an ACK — the SDK resends them later or reports them lost —
    /// and counted in `rate_limited`. Keep-alives, ACKs and logins do not count: ACKs answer
    /// what the server sends (a drain of stored messages), and refusing them would only cause
    /// resends.
    pub session_msg_rate: u32,
    /// Data messages a session may send in a burst before `session_msg_rate` applies.
    pub session_msg_burst: u32,
    /// Secret of the QoS tables' compact keys: one per process, drawn at start-up, so a client
    /// cannot choose fingerprints that collide.
    pub qos_keys: QosKeyHasher,
    /// Logins this core may have waiting for the hook pool's verify at once; past it a login is
    /// refused with `VERIFY_UNAVAILABLE` (counted `verify_pending_full`).
    pub max_pending_verifies: usize,
    /// How long a login waits for its verify before it is refused with `VERIFY_UNAVAILABLE`
    /// (counted `verify_timeouts`).
    pub verify_timeout: Duration,
}

impl ShardConfig {
    /// The reference server's defaults for a shard `core` of `cores`.
    pub fn new(core: CoreId, cores: usize) -> Self {
        Self {
            core,
            cores,
            tcp_idle: Transport::Tcp.default_server_idle_timeout(),
            udp_idle: Transport::Udp.default_server_idle_timeout(),
            ws_idle: Transport::Ws.default_server_idle_timeout(),
            server_timestamps: false,
            qos: QosSenderConfig::SERVER,
            dedup: QosReceiverConfig::SERVER,
            qos_keys: QosKeyHasher::random(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            session_msg_rate: DEFAULT_SESSION_MSG_RATE,
            session_msg_burst: DEFAULT_SESSION_MSG_BURST,
            max_pending_verifies: DEFAULT_MAX_PENDING_VERIFIES,
            verify_timeout: DEFAULT_VERIFY_TIMEOUT,
        }
    }

    fn idle(&self, transport: Transport) -> Duration {
        match transport {
            Transport::Tcp => self.tcp_idle,
            Transport::Udp => self.udp_idle,
            Transport::Ws => self.ws_idle,
        }
    }
}

/// How the shard acts on the world; implemented by the event loop (and by tests).
pub trait Outbox {
    /// Queues `msg` for `to`, framed for its transport.
    fn send(&mut self, to: Endpoint, msg: &Message<'_>);
    /// Queues a message that is already encoded (a relay or a resend).
    fn send_json(&mut self, to: Endpoint, json: &Bytes);
    /// Replies to a UDP source that is not logged in (error 301, echo): the loop may drop it, if
    /// the source got too many such replies lately or the reply is too large for a request of
    /// `request_len` bytes — SPEC S4: spoofed datagrams must not turn the server into an
    /// amplifier.
    fn send_unauthenticated(&mut self, to: SocketAddr, msg: &Message<'_>, request_len: usize) {
        let _ = request_len;
        self.send(Endpoint::Udp(to), msg);
    }
    /// Closes a connection once what is queued for it is written (WebSocket: after close
    /// 1000 "Bye"). Its [`Shard::on_closed`] follows.
    fn close(&mut self, conn: ConnId);
    /// Moves a connection to `core`, whose shard receives it with [`Shard::on_adopted`]. The
    /// shard here has already forgotten it.
    fn migrate(&mut self, conn: ConnId, core: CoreId, login: Adopt);
    /// Mail for the shard of `core` ([`Shard::on_mail`]).
    fn mail(&mut self, core: CoreId, msg: ShardMsg);
}

/// A verified login travelling with its connection or datagram to the user's shard.
#[derive(Debug, Clone)]
pub struct Adopt {
    /// The login document (verify already passed).
    pub login: LoginRequest<'static>,
    /// The transport of the session.
    pub transport: Transport,
    /// The peer's address.
    pub peer: SocketAddr,
    /// UDP: the core whose socket receives the client's datagrams.
    pub via: CoreId,
}

/// Mail between shards.
#[derive(Debug)]
pub enum ShardMsg {
    /// A datagram from a UDP client whose session lives on the receiving shard.
    Datagram {
        /// Client address.
        from: SocketAddr,
        /// The datagram as received.
        bytes: BytesMut,
        /// The core whose socket received it.
        via: CoreId,
    },
    /// A verified UDP login to register on the receiving shard.
    UdpLogin(Adopt),
    /// Datagrams from `addr` are now for the shard of `core` (this core: handle them here).
    UdpRoute {
        /// Client address.
        addr: SocketAddr,
        /// The shard that holds the address's session.
        core: CoreId,
    },
    /// The UDP session of `addr` ended: datagrams from it are no longer forwarded.
    UdpReleased {
        /// Client address.
        addr: SocketAddr,
    },
    /// Deliver an encoded message to a user of the receiving shard.
    Deliver(route::Delivery),
    /// The outcome of a [`ShardMsg::Deliver`], back to the sender's shard.
    Delivered(route::Receipt),
    /// A [`Command`] for a user of the receiving shard.
    Command(Command),
    /// A message lost by the resend table of the receiving shard is now stored: deliver `uid`'s
    /// stored messages again if the user is still online.
    Redrain(UserId<'static>),
    /// The hook pool's answer to a verify the receiving shard posted.
    Verified {
        /// The shard's ticket for the login.
        ticket: u64,
        /// The hook's code: 0 accepts the login.
        code: i32,
    },
    /// The hook pool's answer to a C2S message the receiving shard posted.
    C2sDone {
        /// The shard's ticket for the message.
        ticket: u64,
        /// `on_c2s_before` accepted it (and `on_c2s` ran): ACK it.
        accepted: bool,
        /// What `on_c2s` asked for, run after the ACK.
        commands: Vec<Command>,
    },
    /// A page of `uid`'s stored messages (after seq `after`) read by the store's reader for
    /// the drain of that `generation`.
    Page {
        uid: UserId<'static>,
        generation: u64,
        after: u64,
        page: Result<Vec<crate::store::Stored>, crate::store::StoreError>,
    },
}

/// Why a timer was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Check whether the session has been silent for its idle timeout.
    Idle(Endpoint),
    /// The QoS tables (resend table, de-duplication windows) have something due: their
    /// earliest deadline, kept as one entry of the wheel.
    Qos,
    /// A login's verify has not answered in time.
    Verify(u64),
    /// A C2S message's hooks have not answered in time.
    C2s(u64),
    /// Offline drains whose page request found the store's reader busy ask again.
    DrainRetry,
}

/// One session: a TCP or WebSocket connection on this core (logged in or not), or a logged-in
/// UDP client.
#[derive(Debug)]
struct Session {
    transport: Transport,
    peer: SocketAddr,
    /// Set once logged in.
    uid: Option<UserId<'static>>,
    /// The `firstLoginTime` this session was registered with (duplicate-login rules, §5.3).
    first_login_time: i64,
    /// Last time anything was received (any frame resets the idle timeout, SPEC §1.1).
    last_rx: Instant,
    /// The idle check in the wheel.
    idle_timer: TimerKey,
    /// Set when the session is being closed by a kickout (passed to `on_logout`).
    kickout_code: Option<i32>,
    /// UDP: the core whose socket receives this client's datagrams (replies go out from ours).
    via: CoreId,
    /// The session's data-message allowance (`session_msg_rate`).
    allowance: TokenBucket,
}

/// A token bucket: `burst` tokens, refilled at `rate` per second, one taken per message.
#[derive(Debug, Clone, Copy)]
struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket.
    fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            refilled: now,
        }
    }

    /// Takes a token if there is one. A `rate` of 0 means no limit.
    fn take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        if rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst.max(1)));
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// Per-shard counters, merged by the reporter.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Messages decoded from clients.
    pub messages_in: u64,
    /// Successful logins.
    pub logins: u64,
    /// Logins refused by verify.
    pub logins_refused: u64,
    /// Messages relayed to an online recipient (C2C and S2C).
    pub delivered: u64,
    /// Messages for recipients that were not online.
    pub offline: u64,
    /// Server QoS messages resent.
    pub resent: u64,
    /// Server QoS messages reported lost.
    pub lost: u64,
    /// Inputs that failed to decode.
    pub malformed: u64,
    /// QoS messages not written because the resend table was full (C2C: refused, no ACK; S2C:
    /// reported lost and stored).
    pub qos_table_full: u64,
    /// Data messages dropped (no ACK) because their session passed `session_msg_rate`.
    pub rate_limited: u64,
    /// Keys the de-duplication windows forgot early because a window reached its byte bound
    /// (`QosReceiverConfig::max_bytes`): a late duplicate of one of them would be delivered again.
    pub dedup_evicted: u64,
    /// Bytes held by the QoS tables (resend table and both windows) when the counters were
    /// read: a gauge, summed over shards by `merge`.
    pub qos_bytes: u64,
    /// C2C messages refused because their relay was larger than `max_message_bytes`.
    pub too_large: u64,
    /// Messages stored because the server's resends to a recipient who is still online ran
    /// out, and delivered again from the store.
    pub redrained: u64,
    /// Offline page reads refused because the store's reader queue was full (retried on a
    /// timer).
    pub read_busy: u64,
    /// Messages not stored because the offline store's write queue was full: the sender got
    /// no ACK (a server message reported lost was not kept).
    pub store_refused: u64,
    /// The offline store's counters (limits hit, expired, held bytes): carried by core 0's
    /// stats only, so that the merged report counts them once.
    pub store: crate::store::StoreStats,
    /// Appends and removals the store's writer refused because its queue was full (core 0's
    /// stats only, like `store`).
    pub store_busy: u64,
    /// Messages and logins refused because an id (`from`, `to`, `fp`, `loginUserId`) was longer
    /// than `MAX_USER_ID_LEN` / `MAX_FINGERPRINT_LEN`.
    pub ids_too_long: u64,
    /// Mail between cores refused because the target's inbox and the sender's overflow were
    /// full (relays unacknowledged, datagrams and UDP logins lost); server-wide, filled in by
    /// the control API.
    pub mail_refused: u64,
    /// Mail from outside the loops dropped after waiting for a full inbox; server-wide.
    pub mail_dropped: u64,
    /// The most mail any core held back for one target at once; server-wide.
    pub mail_backlog_peak: u64,
    /// Logins refused at once because `max_pending_verifies` logins were already waiting for
    /// their verify on this core.
    pub verify_pending_full: u64,
    /// Logins refused because their verify did not answer within `verify_timeout`.
    pub verify_timeouts: u64,
    /// Verify answers that came after their login was gone (connection closed, timed out).
    pub verify_stale: u64,
    /// Frames dropped because they arrived on a session whose login was being verified (a
    /// data message gets no ACK: its SDK resends it).
    pub verify_frames_dropped: u64,
    /// C2S messages not ACKed because `max_pending_verifies` messages were already waiting for
    /// their hooks on this core, or their hooks did not answer within `verify_timeout`.
    pub c2s_hook_refused: u64,
    /// Resends of a C2S message whose hooks were still running, dropped (the SDK resends again,
    /// and gets its ACK once the first copy was accepted).
    pub c2s_resend_pending: u64,
    /// Hook calls run by the hook pool; server-wide, filled in by the control API.
    pub hook_calls: u64,
    /// Verifies refused (`VERIFY_UNAVAILABLE`) because the hook pool's queue was full;
    /// server-wide.
    pub hook_refused: u64,
    /// Hook notifications dropped because the hook pool's queue was full; server-wide.
    pub hook_dropped: u64,
    /// Hook calls that panicked (a verify is then refused); server-wide.
    pub hook_panics: u64,
    /// The connection layer's limits hit on this core (filled in by the loop).
    pub conn: crate::runtime::conn::ConnStats,
}

impl Stats {
    /// Adds another shard's counters to these.
    pub fn merge(&mut self, other: &Stats) {
        self.messages_in += other.messages_in;
        self.store_refused += other.store_refused;
        self.logins += other.logins;
        self.logins_refused += other.logins_refused;
        self.delivered += other.delivered;
        self.offline += other.offline;
        self.resent += other.resent;
        self.lost += other.lost;
        self.malformed += other.malformed;
        self.qos_table_full += other.qos_table_full;
        self.redrained += other.redrained;
        self.read_busy += other.read_busy;
        self.store.merge(&other.store);
        self.store_busy += other.store_busy;
        self.too_large += other.too_large;
        self.rate_limited += other.rate_limited;
        self.dedup_evicted += other.dedup_evicted;
        self.qos_bytes += other.qos_bytes;
        self.ids_too_long += other.ids_too_long;
        self.verify_pending_full += other.verify_pending_full;
        self.verify_timeouts += other.verify_timeouts;
        self.verify_stale += other.verify_stale;
        self.verify_frames_dropped += other.verify_frames_dropped;
        self.c2s_hook_refused += other.c2s_hook_refused;
        self.c2s_resend_pending += other.c2s_resend_pending;
        self.conn.merge(&other.conn);
    }
}

/// A resend-table entry: what to send again, to whom.
#[derive(Debug, Clone)]
struct Pending {
    to: UserId<'static>,
    /// Sender (`"0"` for S2C): part of the store's de-duplication key.
    from: UserId<'static>,
    fp: Fingerprint<'static>,
    json: Bytes,
    /// Set when the message came from the offline store: removed there once ACKed.
    seq: Option<u64>,
}

/// The shard of one core.
pub struct Shard {
    config: ShardConfig,
    hooks: Arc<dyn ServerEvents>,
    /// What `hooks` implements: the others are neither called nor posted.
    interests: Interests,
    /// Where verifies run (without one, inline: embedders' and tests' shards).
    hook_pool: Option<Arc<HookPool>>,
    /// Logins waiting for their verify, by ticket.
    verifying: HashMap<u64, login::Verifying>,
    /// The ticket of the verify pending on each endpoint: frames arriving there meanwhile are
    /// dropped.
    verifying_endpoints: HashMap<Endpoint, u64>,
    /// Source of verify and C2S tickets.
    next_ticket: u64,
    /// C2S messages waiting for their hooks on the pool.
    c2s_pending: c2s::PendingC2s,
    decoder: Decoder,
    timers: TimerWheel<Timer>,
    sessions: HashMap<Endpoint, Session>,
    /// uid → its current session (last login wins, SPEC §5.2). Mirrored in `presence`.
    online: HashMap<UserId<'static>, Endpoint>,
    /// Every core's online users, for the hooks' `Api::is_online`.
    presence: Arc<Presence>,
    /// The hooks' [`Api`], kept between hook calls so that lending it out costs neither an
    /// allocation nor an update of `presence`'s shared reference count per message.
    spare_api: Option<Api>,
    /// UDP clients that reach this core's socket but whose sessions live on another shard.
    udp_routes: HashMap<SocketAddr, CoreId>,
    /// Server-sent QoS messages waiting for their ACK, keyed by recipient and fingerprint.
    resend: QosSender<Pending, QosKey>,
    /// C2S fingerprints already handled, keyed by sender and fingerprint (SPEC §8.5).
    dedup: QosReceiver,
    /// C2C fingerprints already delivered or stored, keyed by sender and fingerprint (hazard R2).
    c2c_done: QosReceiver,
    /// Source of S2C fingerprints: this core's id and a counter.
    next_fp: u64,
    /// The core that received the UDP datagram being handled (set by `on_udp`).
    udp_via: CoreId,
    /// The size of the UDP datagram being handled (set by `on_udp`): replies to a source that
    /// is not logged in are bounded by it.
    udp_request_len: usize,
    /// The durable offline store, if configured.
    offline: Option<OfflineStore>,
    /// The wheel entry standing for the QoS tables' earliest deadline, and that deadline.
    qos_timer: Option<(TimerKey, Instant)>,
    /// Where relayed messages (C2C, S2C) are encoded, once each: every encoded message is split
    /// off it and frozen, so its allocation is reused once the earlier messages are dropped.
    encoded: BytesMut,
    /// Users whose stored messages are being delivered: a window in flight, pages read ahead.
    drains: offline::Drains,
    /// Stored messages delivered and acknowledged whose removal the store may not have
    /// committed yet: a page read meanwhile (a quick re-login) must not send them again.
    removing: offline::Removing,
    stats: Stats,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("core", &self.config.core)
            .field("sessions", &self.sessions.len())
            .field("online", &self.online.len())
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// What the entry holds on the heap, for the resend table's byte bound. The encoded message
    /// may share a larger chunk with others (`ENCODE_CHUNK`); only its own length is counted.
    fn heap_bytes(&self) -> usize {
        self.to.as_str().len() + self.from.as_str().len() + self.fp.as_str().len() + self.json.len()
    }
}

impl Shard {
    /// Key of the resend and dedup tables: fingerprints are chosen by clients, so they are only
    /// unique per user (hazard S3: an ACK clears only messages addressed to the user who sends
    /// it).
    fn qos_key(&self, uid: &str, fp: &str) -> QosKey {
        self.config.qos_keys.key(uid, fp)
    }

    /// A shard with no sessions.
    pub fn new(config: ShardConfig, hooks: Arc<dyn ServerEvents>, now: Instant) -> Self {
        let (core, cores) = (config.core, config.cores);
        Self {
            resend: QosSender::new(config.qos, now),
            dedup: QosReceiver::new(config.dedup, now),
            c2c_done: QosReceiver::new(config.dedup, now),
            config,
            interests: hooks.interests(),
            hooks,
            hook_pool: None,
            verifying: HashMap::new(),
            verifying_endpoints: HashMap::new(),
            next_ticket: 0,
            c2s_pending: c2s::PendingC2s::default(),
            decoder: Decoder::new(),
            timers: TimerWheel::new(now),
            sessions: HashMap::new(),
            online: HashMap::new(),
            presence: Arc::new(Presence::new(cores)),
            spare_api: None,
            udp_routes: HashMap::new(),
            next_fp: 0,
            udp_via: core,
            udp_request_len: 0,
            offline: None,
            qos_timer: None,
            encoded: BytesMut::new(),
            drains: offline::Drains::default(),
            removing: offline::Removing::default(),
            stats: Stats::default(),
        }
    }

    /// Gives the shard a durable offline store (without one, the `on_offline` hook decides).
    pub fn with_store(mut self, offline: OfflineStore) -> Self {
        self.offline = Some(offline);
        self
    }

    /// Runs verifies on `pool` (answered by [`ShardMsg::Verified`]) instead of inline.
    pub fn with_hook_pool(mut self, pool: Arc<HookPool>) -> Self {
        self.hook_pool = Some(pool);
        self
    }

    /// Shares one presence table among the shards of a server (each has its own otherwise).
    pub fn with_presence(mut self, presence: Arc<Presence>) -> Self {
        self.presence = presence;
        self.spare_api = None;
        self
    }

    /// Makes `endpoint` the current session of `uid`.
    fn set_online(&mut self, uid: &UserId<'static>, endpoint: Endpoint) {
        if self.online.insert(uid.clone(), endpoint).is_none() {
            self.presence.insert(uid.as_str());
        }
    }

    /// Takes `uid` out of the online table.
    fn set_offline(&mut self, uid: &str) {
        if self.online.remove(uid).is_some() {
            self.presence.remove(uid);
        }
    }

    /// The hooks' API, which can see who is online; given back by `run_hook_commands`.
    fn api(&mut self) -> Api {
        self.spare_api
            .take()
            .unwrap_or_else(|| Api::new(Arc::clone(&self.presence)))
    }

    /// This shard's counters, with the QoS tables' own.
    pub fn stats(&self) -> Stats {
        let mut stats = self.stats;
        stats.dedup_evicted = self.dedup.stats().evicted_keys + self.c2c_done.stats().evicted_keys;
        let bytes = self.resend.bytes() + self.dedup.bytes() + self.c2c_done.bytes();
        stats.qos_bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        if let (0, Some(offline)) = (self.config.core, &self.offline) {
            stats.store = offline.writer.store_stats();
            stats.store_busy = offline.writer.stats().busy;
        }
        stats
    }

    /// Number of logged-in users whose session is on this shard.
    pub fn online_users(&self) -> usize {
        self.online.len()
    }

    /// Whether `uid` is logged in on this shard.
    pub fn is_online(&self, uid: &str) -> bool {
        self.online.contains_key(uid)
    }

    /// Whether connection `conn` of this core has logged in (the loop's login deadline asks).
    pub fn is_logged_in(&self, conn: ConnId) -> bool {
        self.sessions
            .get(&Endpoint::Conn(conn))
            .is_some_and(|session| session.uid.is_some())
    }

    /// A TCP or WebSocket connection was accepted on this core.
    pub fn on_open(&mut self, now: Now, conn: ConnId, transport: Transport, peer: SocketAddr) {
        self.add_session(now, Endpoint::Conn(conn), transport, peer);
    }

    /// A connection migrated here after a verified login ([`Outbox::migrate`] on another core).
    pub fn on_adopted(&mut self, now: Now, conn: ConnId, adopt: Adopt, out: &mut dyn Outbox) {
        let endpoint = Endpoint::Conn(conn);
        self.add_session(now, endpoint, adopt.transport, adopt.peer);
        self.register(now, endpoint, adopt.login, out);
    }

    /// One message body from a connection of this core (a TCP frame or WebSocket text message).
    /// It is decoded in place.
    pub fn on_frame(&mut self, now: Now, conn: ConnId, body: &mut [u8], out: &mut dyn Outbox) {
        let endpoint = Endpoint::Conn(conn);
        let Some(session) = self.sessions.get_mut(&endpoint) else {
            return;
        };
        session.last_rx = now.mono;
        match self.decoder.decode(body) {
            Ok(msg) => {
                self.stats.messages_in += 1;
                self.on_message(now, endpoint, &msg, out);
            }
            Err(error) => {
                // The reference closes the session without a reply (SPEC §2.2).
                self.stats.malformed += 1;
                tracing::debug!(?conn, %error, "malformed message, closing");
                out.close(conn);
            }
        }
    }

    /// A frame-level error on a connection (oversize, bad WebSocket frame): the loop closes it.
    pub fn on_frame_error(&mut self) {
        self.stats.malformed += 1;
    }

    /// One datagram received by this core's UDP socket, decoded in place in the receive buffer
    /// unless its sender's session lives on another shard: only then is it copied, to be mailed
    /// there.
    pub fn on_datagram(
        &mut self,
        now: Now,
        from: SocketAddr,
        bytes: &mut [u8],
        out: &mut dyn Outbox,
    ) {
        if let Some(&core) = self.udp_routes.get(&from) {
            let via = self.config.core;
            let bytes = BytesMut::from(&*bytes);
            out.mail(core, ShardMsg::Datagram { from, bytes, via });
            return;
        }
        self.on_udp(now, from, self.config.core, bytes, out);
    }

    /// A datagram is too large for the configured limit: like the reference (which truncated
    /// it and failed to parse it), the client's session is dropped.
    pub fn on_oversize_datagram(&mut self, now: Now, from: SocketAddr, out: &mut dyn Outbox) {
        self.stats.malformed += 1;
        if let Some(&core) = self.udp_routes.get(&from) {
            // Forward an empty datagram: it fails to decode there and ends the session.
            let via = self.config.core;
            out.mail(
                core,
                ShardMsg::Datagram {
                    from,
                    bytes: BytesMut::new(),
                    via,
                },
            );
            return;
        }
        self.end_session(now, Endpoint::Udp(from), out);
    }

    /// A datagram for this shard; `via` is the core whose socket received it.
    fn on_udp(
        &mut self,
        now: Now,
        from: SocketAddr,
        via: CoreId,
        bytes: &mut [u8],
        out: &mut dyn Outbox,
    ) {
        let endpoint = Endpoint::Udp(from);
        if let Some(session) = self.sessions.get_mut(&endpoint) {
            session.last_rx = now.mono;
            session.via = via;
        }
        self.udp_via = via;
        self.udp_request_len = bytes.len();
        match self.decoder.decode(bytes) {
            Ok(msg) => {
                self.stats.messages_in += 1;
                self.on_message(now, endpoint, &msg, out);
            }
            Err(error) => {
                self.stats.malformed += 1;
                tracing::debug!(%from, %error, "malformed datagram, dropping the session");
                self.end_session(now, endpoint, out);
            }
        }
    }

    /// A connection of this core was closed (by the peer, an error, or [`Outbox::close`]).
    pub fn on_closed(&mut self, now: Now, conn: ConnId, out: &mut dyn Outbox) {
        self.end_session(now, Endpoint::Conn(conn), out);
    }

    /// Mail from another shard.
    pub fn on_mail(&mut self, now: Now, msg: ShardMsg, out: &mut dyn Outbox) {
        match msg {
            ShardMsg::Datagram {
                from,
                mut bytes,
                via,
            } => self.on_udp(now, from, via, &mut bytes, out),
            ShardMsg::UdpLogin(adopt) => {
                let endpoint = Endpoint::Udp(adopt.peer);
                self.udp_via = adopt.via;
                self.register(now, endpoint, adopt.login, out);
            }
            ShardMsg::UdpRoute { addr, core } => {
                if core == self.config.core {
                    self.udp_routes.remove(&addr);
                } else {
                    self.udp_routes.insert(addr, core);
                }
            }
            ShardMsg::UdpReleased { addr } => {
                self.udp_routes.remove(&addr);
            }
            ShardMsg::Deliver(delivery) => self.deliver(now, delivery, out),
            ShardMsg::Delivered(receipt) => self.on_receipt(now, receipt, out),
            ShardMsg::Command(command) => self.run_command(now, command, out),
            ShardMsg::Redrain(uid) => self.redrain(now, &uid, out),
            ShardMsg::Verified { ticket, code } => self.on_verified(now, ticket, code, out),
            ShardMsg::C2sDone {
                ticket,
                accepted,
                commands,
            } => self.on_c2s_done(now, ticket, accepted, commands, out),
            ShardMsg::Page {
                uid,
                generation,
                after,
                page,
            } => self.on_page(now, &uid, generation, after, page, out),
        }
    }

    /// Runs a request of the server application (S2C send, kick) for a user of any shard.
    pub fn command(&mut self, now: Now, command: Command, out: &mut dyn Outbox) {
        let uid = match &command {
            Command::Send { to, .. } => to,
            Command::Kick { uid, .. } => uid,
        };
        let core = shard_for(uid.as_str(), self.config.cores);
        if core == self.config.core {
            self.run_command(now, command, out);
        } else {
            out.mail(core, ShardMsg::Command(command));
        }
    }

    /// When [`Self::handle_timeout`] must run next.
    ///
    /// Every timer of the shard is on its one wheel: session expiry entries, and one entry for
    /// the QoS tables' earliest deadline, which this call (made by the loop before every wait)
    /// keeps up to date.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.sync_qos_timer();
        self.timers.next_expiry()
    }

    /// Moves the wheel's QoS entry to the tables' earliest deadline (or removes it).
    fn sync_qos_timer(&mut self) {
        let due = [
            self.resend.poll_timeout(),
            self.dedup.poll_timeout(),
            self.c2c_done.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        if self.qos_timer.map(|(_, at)| at) == due {
            return;
        }
        if let Some((key, _)) = self.qos_timer.take() {
            self.timers.cancel(key);
        }
        self.qos_timer = due.map(|at| (self.timers.insert(at, Timer::Qos), at));
    }

    /// Runs the timers due at `now`: idle expiry, QoS resends, the dedup sweep.
    pub fn handle_timeout(&mut self, now: Now, out: &mut dyn Outbox) {
        let mut qos_due = false;
        while let Some(timer) = self.timers.poll(now.mono) {
            match timer {
                Timer::Idle(endpoint) => self.check_idle(now, endpoint, out),
                Timer::Qos => {
                    self.qos_timer = None;
                    qos_due = true;
                }
                Timer::Verify(ticket) => self.on_verify_timeout(now, ticket, out),
                Timer::C2s(ticket) => self.on_c2s_timeout(ticket),
                Timer::DrainRetry => self.retry_reads(now, out),
            }
        }
        if qos_due {
            self.run_qos(now, out);
        }
        self.sync_qos_timer();
    }

    /// The QoS tables' due work: de-duplication sweeps, resends, losses.
    fn run_qos(&mut self, now: Now, out: &mut dyn Outbox) {
        self.dedup.handle_timeout(now.mono);
        self.c2c_done.handle_timeout(now.mono);
        self.resend.handle_timeout(now.mono);
        while let Some(event) = self.resend.poll_event() {
            match event {
                QosEvent::Resend { item, .. } => {
                    // At most one resend, to whatever session the user has now (SPEC §8.4).
                    if let Some(&endpoint) = self.online.get(&item.to) {
                        self.stats.resent += 1;
                        out.send_json(endpoint, &item.json);
                    }
                }
                QosEvent::Lost { item, .. } => {
                    self.stats.lost += 1;
                    if self.interests.contains(Interests::S2C_OUTCOME) {
                        self.notify(Notice::S2cLost {
                            to: item.to.clone(),
                            fp: item.fp.clone(),
                            json: item.json.clone(),
                        });
                    }
                    self.store_lost(now, &item, out);
                }
            }
        }
    }

    fn add_session(
        &mut self,
        now: Now,
        endpoint: Endpoint,
        transport: Transport,
        peer: SocketAddr,
    ) {
        let idle_timer = self.timers.insert(
            now.mono + self.config.idle(transport),
            Timer::Idle(endpoint),
        );
        let previous = self.sessions.insert(
            endpoint,
            Session {
                transport,
                peer,
                uid: None,
                first_login_time: 0,
                last_rx: now.mono,
                idle_timer,
                kickout_code: None,
                via: self.config.core,
                allowance: TokenBucket::full(self.config.session_msg_burst, now.mono),
            },
        );
        if let Some(previous) = previous {
            self.timers.cancel(previous.idle_timer);
        }
    }

    fn check_idle(&mut self, now: Now, endpoint: Endpoint, out: &mut dyn Outbox) {
        let Some(session) = self.sessions.get_mut(&endpoint) else {
            return;
        };
        let deadline = session.last_rx + self.config.idle(session.transport);
        if deadline > now.mono {
            // Something arrived since the timer was set: check again at the new deadline.
            session.idle_timer = self.timers.insert(deadline, Timer::Idle(endpoint));
            return;
        }
        tracing::debug!(?endpoint, "idle timeout");
        match endpoint {
            Endpoint::Conn(conn) => out.close(conn),
            Endpoint::Udp(_) => self.end_session(now, endpoint, out),
        }
    }

    /// Forgets a session: unregisters its uid if it is still the user's current session
    /// (calling `on_logout`), and stops its timer (SPEC §5.5).
    fn end_session(&mut self, _now: Now, endpoint: Endpoint, out: &mut dyn Outbox) {
        if !self.verifying_endpoints.is_empty() {
            self.cancel_verify(endpoint);
        }
        let Some(session) = self.sessions.remove(&endpoint) else {
            return;
        };
        self.timers.cancel(session.idle_timer);
        if let Some(uid) = &session.uid {
            self.logout_uid(uid, endpoint, &session);
        }
        if let Endpoint::Udp(addr) = endpoint {
            self.release_udp_route(addr, session.via, out);
        }
    }

    /// Removes `uid` from the online table if `endpoint` is its current session.
    fn logout_uid(&mut self, uid: &UserId<'static>, endpoint: Endpoint, session: &Session) {
        if self.online.get(uid) == Some(&endpoint) {
            self.set_offline(uid.as_str());
            if !self.interests.contains(Interests::LOGOUT) {
                return;
            }
            self.notify(Notice::Logout {
                uid: uid.clone(),
                transport: session.transport,
                peer: session.peer,
                kickout_code: session.kickout_code,
            });
        }
    }

    /// Runs a notification hook: on the hook pool if the shard has one (a full queue drops it,
    /// counted `hook_dropped`), else here. Only `on_login` asks anything through its `Api`, and
    /// it runs inline through `register`'s own path.
    fn notify(&mut self, notice: Notice) {
        if let Some(pool) = &self.hook_pool {
            pool.notify(notice);
            return;
        }
        let mut api = self.api();
        notice.run(&*self.hooks, &mut api);
        api.commands.clear();
        self.spare_api = Some(api);
    }

    /// Tells the core that receives `addr`'s datagrams to stop forwarding them here.
    fn release_udp_route(&self, addr: SocketAddr, via: CoreId, out: &mut dyn Outbox) {
        if via != self.config.core {
            out.mail(via, ShardMsg::UdpReleased { addr });
        }
    }

    fn info(&self, endpoint: Endpoint) -> Option<(UserId<'static>, Transport, SocketAddr)> {
        let session = self.sessions.get(&endpoint)?;
        Some((session.uid.clone()?, session.transport, session.peer))
    }

    /// Dispatch by type; `endpoint` has a session unless it is an unauthenticated UDP client.
    fn on_message(
        &mut self,
        now: Now,
        endpoint: Endpoint,
        msg: &Message<'_>,
        out: &mut dyn Outbox,
    ) {
        if !self.verifying_endpoints.is_empty() && self.verifying_endpoints.contains_key(&endpoint)
        {
            // The session's login is being verified: what it sends meanwhile would be handled
            // under an identity that is about to change. Dropped: no ACK, its SDK resends.
            self.stats.verify_frames_dropped += 1;
            return;
        }
        let logged_in = self.info(endpoint);
        if let Err(error) = msg.check_id_lengths() {
            self.refuse_invalid(now, endpoint, logged_in.is_some(), &error.to_string(), out);
            self.stats.ids_too_long += 1;
            return;
        }
        if msg.kind == Kind::CommonData && logged_in.is_some() && !self.allow_data(now, endpoint) {
            // No ACK: the sender's SDK resends it later, or reports it lost.
            self.stats.rate_limited += 1;
            return;
        }
        match (msg.kind, logged_in) {
            (Kind::Login, _) => self.on_login(now, endpoint, msg, out),
            (Kind::Echo, _) => {
                // SPEC §4.7: type 53 with everything else unchanged; no login needed. Not put in
                // the resend queue even with QoS (hazard R9).
                let reply = msg.clone().echo_response();
                match endpoint {
                    Endpoint::Udp(addr) if !self.sessions.contains_key(&endpoint) => {
                        self.send_unauthenticated(now, addr, reply, out);
                    }
                    _ => self.send(now, endpoint, reply, out),
                }
            }
            (Kind::Logout, Some((uid, ..))) => {
                tracing::debug!(uid = uid.as_str(), "logout");
                self.close_session(now, endpoint, out);
            }
            (Kind::Logout, None) => self.close_session(now, endpoint, out),
            (Kind::KeepAlive, Some((uid, ..))) => {
                // Answered on this session, not through the online table (hazard R7).
                self.send(now, endpoint, Message::keep_alive_response(uid), out);
            }
            (Kind::CommonData, Some((uid, transport, peer))) => {
                self.on_data(now, endpoint, (uid, transport, peer), msg, out)
            }
            (Kind::Ack, Some((uid, ..))) => self.on_ack(now, uid, msg, out),
            (Kind::KeepAlive | Kind::CommonData | Kind::Ack, None) => {
                self.reply_not_logged_in(now, endpoint, msg, out)
            }
            // Any other type is ignored, session kept (SPEC §3).
            _ => {}
        }
    }

    /// Takes a token from the session's data-message allowance (`session_msg_rate`).
    fn allow_data(&mut self, now: Now, endpoint: Endpoint) -> bool {
        let (rate, burst) = (self.config.session_msg_rate, self.config.session_msg_burst);
        self.sessions
            .get_mut(&endpoint)
            .is_none_or(|s| s.allowance.take(now.mono, rate, burst))
    }

    /// Refuses a message the server will not take (an id too long, too large to relay): no ACK,
    /// an error 4 "invalid message object" with a short fixed reason (never the request's
    /// content), and for a TCP/WS connection that is not logged in, a close. A logged-in session
    /// stays: its SDK reports the message lost after its resends. An unauthenticated UDP source
    /// gets no reply at all (no reflection, SPEC S4).
    fn refuse_invalid(
        &mut self,
        now: Now,
        endpoint: Endpoint,
        logged_in: bool,
        reason: &str,
        out: &mut dyn Outbox,
    ) {
        tracing::debug!(?endpoint, reason, "message refused");
        if !logged_in && matches!(endpoint, Endpoint::Udp(_)) {
            return;
        }
        let reply = Message::error(ErrorResponse {
            code: ERROR_INVALID_MESSAGE,
            message: Some(reason.into()),
        });
        self.send(now, endpoint, reply, out);
        if let (false, Endpoint::Conn(conn)) = (logged_in, endpoint) {
            out.close(conn);
        }
    }

    /// Error 301 carrying the offending message, then close TCP/WS (SPEC §9).
    fn reply_not_logged_in(
        &mut self,
        now: Now,
        endpoint: Endpoint,
        msg: &Message<'_>,
        out: &mut dyn Outbox,
    ) {
        if let Endpoint::Udp(addr) = endpoint {
            // SPEC S4: over UDP the request is not reflected (its source may be spoofed).
            let reply = Message::error(ErrorResponse {
                code: ERROR_NOT_LOGGED_IN,
                message: None,
            });
            self.send_unauthenticated(now, addr, reply, out);
            return;
        }
        let json = msg.to_json();
        let text = String::from_utf8_lossy(&json);
        let reply = Message::error(ErrorResponse {
            code: ERROR_NOT_LOGGED_IN,
            message: Some(text),
        });
        self.send(now, endpoint, reply, out);
        if let Endpoint::Conn(conn) = endpoint {
            out.close(conn);
        }
    }

    /// A reply to a UDP source that is not logged in ([`Outbox::send_unauthenticated`]).
    fn send_unauthenticated(
        &self,
        now: Now,
        to: SocketAddr,
        mut msg: Message<'_>,
        out: &mut dyn Outbox,
    ) {
        if self.config.server_timestamps {
            msg.sm = now.epoch_ms;
        }
        out.send_unauthenticated(to, &msg, self.udp_request_len);
    }

    /// Closes a session on request (logout, refused login…): TCP/WS connections are closed
    /// (their `on_closed` cleans up), a UDP session is dropped silently.
    fn close_session(&mut self, now: Now, endpoint: Endpoint, out: &mut dyn Outbox) {
        match endpoint {
            Endpoint::Conn(conn) => out.close(conn),
            Endpoint::Udp(_) => self.end_session(now, endpoint, out),
        }
    }

    /// Sends a server-made message, stamping `sm` when server timestamps are on.
    fn send(&self, now: Now, endpoint: Endpoint, mut msg: Message<'_>, out: &mut dyn Outbox) {
        if self.config.server_timestamps {
            msg.sm = now.epoch_ms;
        }
        out.send(endpoint, &msg);
    }

    fn on_ack(&mut self, now: Now, uid: UserId<'static>, msg: &Message<'_>, out: &mut dyn Outbox) {
        let Some(fp) = msg.text() else {
            return;
        };
        if let Some(item) = self.resend.handle_ack(&self.qos_key(uid.as_str(), fp)) {
            if self.interests.contains(Interests::S2C_OUTCOME) {
                self.notify(Notice::S2cDelivered {
                    to: uid.clone(),
                    fp: Fingerprint::from(fp.to_owned()),
                });
            }
            self.stored_acked(now, &item, out);
        }
    }

    fn run_hook_commands(&mut self, now: Now, mut api: Api, out: &mut dyn Outbox) {
        for command in api.commands.drain(..) {
            self.command(now, command, out);
        }
        self.spare_api = Some(api);
    }

    fn run_command(&mut self, now: Now, command: Command, out: &mut dyn Outbox) {
        match command {
            Command::Send {
                to,
                text,
                typeu,
                qos,
            } => {
                let fp = qos.then(|| self.new_fingerprint());
                let mut msg = Message::data(UserId::SERVER, to.clone(), text, fp.clone());
                msg.typeu = typeu;
                if self.config.server_timestamps {
                    msg.sm = now.epoch_ms;
                }
                let json = self.encode_once(&msg);
                self.deliver(
                    now,
                    route::Delivery {
                        from: UserId::SERVER,
                        to: Some(to),
                        fp,
                        qos,
                        bridge: false,
                        json,
                        reply_to: None,
                    },
                    out,
                );
            }
            Command::Kick { uid, code, reason } => self.kick(now, &uid, code, reason, out),
        }
    }

    /// Encodes a relayed message into the shard's reusable buffer ([`Shard::encoded`]) and
    /// returns it as shared bytes (queued to the recipient, kept for resends).
    fn encode_once(&mut self, msg: &Message<'_>) -> Bytes {
        if self.encoded.capacity() < ENCODE_ROOM {
            // Reclaims the whole allocation if no earlier message still holds part of it, else
            // starts a new one.
            self.encoded.reserve(ENCODE_CHUNK);
        }
        msg.encode(&mut self.encoded);
        self.encoded.split().freeze()
    }

    /// A fingerprint for a server-sent message: unique per core and process run.
    fn new_fingerprint(&mut self) -> Fingerprint<'static> {
        self.next_fp += 1;
        Fingerprint::from(format!(
            "imedge-{}-{}-{}",
            std::process::id(),
            self.config.core,
            self.next_fp
        ))
    }

    /// Kicks `uid`'s current session with a kickout message: TCP/WS are closed after it is
    /// written; a UDP session is logged out (hazard S5: the reference left it authenticated).
    fn kick(
        &mut self,
        now: Now,
        uid: &UserId<'static>,
        code: i32,
        reason: Option<String>,
        out: &mut dyn Outbox,
    ) {
        let Some(&endpoint) = self.online.get(uid) else {
            return;
        };
        self.kick_session(now, endpoint, uid, code, reason, out);
    }

    /// Sends `endpoint` a kickout addressed to `uid` and closes it. `uid` is given rather than
    /// read from the session: a newcomer refused by the duplicate-login rules is kicked before it
    /// is registered (hazard R4's fix), and its kickout is still addressed to the uid it asked for.
    fn kick_session(
        &mut self,
        now: Now,
        endpoint: Endpoint,
        uid: &UserId<'static>,
        code: i32,
        reason: Option<String>,
        out: &mut dyn Outbox,
    ) {
        let Some(session) = self.sessions.get_mut(&endpoint) else {
            return;
        };
        session.kickout_code = Some(code);
        let uid = uid.clone();
        let kickout = imedge_protocol::message::payload::Kickout {
            code,
            reason: reason.map(Into::into),
        };
        self.send(now, endpoint, Message::kickout(uid, kickout), out);
        self.close_session(now, endpoint, out);
    }
}

#[cfg(test)]
mod tests;
