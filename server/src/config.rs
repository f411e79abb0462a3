//! The server's settings as a typed struct with the reference's defaults. Parsing flags, the
//! TOML file and `IMEDGE_*` variables is the binary's job (`main.rs`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use imedge_protocol::frame::{tcp, udp};
use imedge_protocol::qos::QosSenderConfig;
use imedge_protocol::session::Transport;

/// Which I/O backend the cores run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBackend {
    /// io_uring when the kernel and sandbox allow it, else epoll.
    #[default]
    Auto,
    /// io_uring; fail to start without it.
    Uring,
    /// epoll (through mio).
    Epoll,
}

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address every listener binds (default `0.0.0.0`, like the reference).
    pub bind: IpAddr,
    /// TCP gateway port (`None` = off). Default 8901.
    pub tcp_port: Option<u16>,
    /// UDP gateway port (`None` = off). Default 7901.
    pub udp_port: Option<u16>,
    /// WebSocket gateway port (`None` = off). Default 3000, path `/websocket`.
    pub ws_port: Option<u16>,
    /// Where durable state lives (offline store, later).
    pub data_dir: PathBuf,
    /// Number of cores (event loops, shards).
    pub threads: usize,
    /// I/O backend.
    pub io: IoBackend,
    /// Pin each event loop to its own CPU.
    pub pin_threads: bool,
    /// Idle timeout of TCP connections (SPEC §6.3: 20 s by default).
    pub tcp_idle: Duration,
    /// Idle timeout of UDP sessions (10 s).
    pub udp_idle: Duration,
    /// Idle timeout of WebSocket connections (20 s).
    pub ws_idle: Duration,
    /// The server's QoS resend schedule (SPEC §8.4): resends and check interval are settable
    /// (`--qos-resends`, `--qos-resend-interval`), the defaults are the reference's. The
    /// de-duplication window widens to cover it (`QosReceiverConfig::covering`).
    pub qos: QosSenderConfig,
    /// Largest C2C message relayed (`--max-message-bytes`), see
    /// [`crate::shard::ShardConfig::max_message_bytes`] for the rule.
    pub max_message_bytes: usize,
    /// Data messages per second a session may send (`--session-msg-rate`, 0 = no limit) and its
    /// burst (`--session-msg-burst`); see [`crate::shard::ShardConfig::session_msg_rate`].
    pub session_msg_rate: u32,
    /// See `session_msg_rate`.
    pub session_msg_burst: u32,
    /// Largest TCP frame body (SPEC §1.1: 6144).
    pub tcp_max_body: usize,
    /// Largest UDP datagram (SPEC §1.2: 2048).
    pub udp_max_datagram: usize,
    /// Write the server clock into `sm` of every server packet.
    pub server_timestamps: bool,
    /// Keep messages for users who are not online in the embedded store under `data_dir`
    /// (on by default). Off: the `on_offline` hook decides, as in the reference.
    pub offline_store: bool,
    /// Most messages stored per user; more are refused (the sender gets no ACK) and counted.
    pub offline_max_per_user: usize,
    /// Most messages one sender may have stored for others (the server, "0", is exempt); more
    /// are refused (no ACK) and counted.
    pub offline_max_per_sender: usize,
    /// Most bytes the offline store holds; more is refused (no ACK) and counted.
    pub offline_max_bytes: u64,
    /// Stored messages older than this are never delivered: the store writer sweeps them out
    /// (every minute) and counts them.
    pub offline_max_age: Duration,
    /// Most bytes a TCP or WebSocket connection may leave unsent; a slow consumer past it is
    /// disconnected (its unacknowledged QoS messages take the lost path to the offline store).
    pub max_send_buffer: usize,
    /// A write to a connection that makes no progress this long closes the connection (also
    /// the accepted sockets' `TCP_USER_TIMEOUT`).
    pub write_stall_timeout: Duration,
    /// A TCP or WebSocket connection not logged in this long after it was accepted is closed.
    pub login_timeout: Duration,
    /// Most connections not logged in, over all cores; more are refused at accept (0: no cap).
    pub max_unauthenticated: usize,
    /// Most connections not logged in from one source address (0: no cap).
    pub max_conns_per_ip: u32,
    /// Most new connections per second from one source address, with a burst of
    /// `runtime::admit::RATE_BURST_SECONDS` of it (0: no limit).
    pub max_conn_rate_per_ip: u32,
    /// Most replies per second (burst: 2 s of it) to one UDP source address that is not logged
    /// in — error 301, echo — so that spoofed datagrams cannot aim the server at a victim
    /// (SPEC S4; 0: no limit).
    pub udp_unauth_reply_rate: u32,
    /// Apply the per-address limits to loopback peers too (off: this host's own clients —
    /// benchmarks, a local proxy — are exempt).
    pub limit_loopback: bool,
    /// Benchmark mode: echo every frame and datagram back to its sender, bypassing the protocol
    /// (see `runtime::Limits::echo`). Never for production.
    pub bench_echo: bool,
    /// Worker threads of the hook pool, where login verifies run off the event loops.
    pub hook_threads: usize,
    /// Jobs each hook worker's queue holds; a verify past it is refused with
    /// `VERIFY_UNAVAILABLE` (1026), counted `hook_refused`.
    pub hook_queue: usize,
    /// How long a login waits for its verify before it is refused with `VERIFY_UNAVAILABLE`.
    pub verify_timeout: Duration,
    /// Logins one core may have waiting for their verify; more are refused with
    /// `VERIFY_UNAVAILABLE`, counted `verify_pending_full`.
    pub max_pending_verifies: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: IpAddr::from([0, 0, 0, 0]),
            tcp_port: Some(DEFAULT_TCP_PORT),
            udp_port: Some(DEFAULT_UDP_PORT),
            ws_port: Some(DEFAULT_WS_PORT),
            data_dir: PathBuf::from("data"),
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            io: IoBackend::Auto,
            pin_threads: true,
            tcp_idle: Transport::Tcp.default_server_idle_timeout(),
            udp_idle: Transport::Udp.default_server_idle_timeout(),
            ws_idle: Transport::Ws.default_server_idle_timeout(),
            qos: QosSenderConfig::SERVER,
            max_message_bytes: crate::shard::DEFAULT_MAX_MESSAGE_BYTES,
            session_msg_rate: crate::shard::DEFAULT_SESSION_MSG_RATE,
            session_msg_burst: crate::shard::DEFAULT_SESSION_MSG_BURST,
            tcp_max_body: tcp::DEFAULT_MAX_BODY,
            udp_max_datagram: udp::DEFAULT_MAX_DATAGRAM,
            server_timestamps: false,
            offline_store: true,
            offline_max_per_user: crate::store::DEFAULT_MAX_PER_USER,
            offline_max_per_sender: crate::store::DEFAULT_MAX_PER_SENDER,
            offline_max_bytes: crate::store::DEFAULT_MAX_BYTES,
            offline_max_age: crate::store::DEFAULT_MAX_AGE,
            max_send_buffer: DEFAULT_MAX_SEND_BUFFER,
            write_stall_timeout: DEFAULT_WRITE_STALL_TIMEOUT,
            login_timeout: DEFAULT_LOGIN_TIMEOUT,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            max_conns_per_ip: DEFAULT_MAX_CONNS_PER_IP,
            max_conn_rate_per_ip: DEFAULT_MAX_CONN_RATE_PER_IP,
            udp_unauth_reply_rate: DEFAULT_UDP_UNAUTH_REPLY_RATE,
            limit_loopback: false,
            bench_echo: false,
            hook_threads: crate::hooks::pool::DEFAULT_HOOK_THREADS,
            hook_queue: crate::hooks::pool::HOOK_QUEUE_CAPACITY,
            verify_timeout: crate::shard::DEFAULT_VERIFY_TIMEOUT,
            max_pending_verifies: crate::shard::DEFAULT_MAX_PENDING_VERIFIES,
        }
    }
}

/// The reference's TCP port (SPEC §1).
pub const DEFAULT_TCP_PORT: u16 = 8901;
/// The reference's UDP port.
pub const DEFAULT_UDP_PORT: u16 = 7901;
/// The reference's WebSocket port.
pub const DEFAULT_WS_PORT: u16 = 3000;

/// Default `--max-send-buffer`: 4 MiB holds a login page of stored messages of the largest size
/// (`shard::LOGIN_PAGE` × a 6 KiB frame ≈ 1.5 MiB, sent at once) with room for live traffic —
/// far more than a client that reads ever leaves waiting — while a client that never reads
/// pins at most that much.
pub const DEFAULT_MAX_SEND_BUFFER: usize = 4 << 20;

/// Default `--write-stall-timeout`: as long as the reference's TCP idle timeout is short (10 s
/// is half of its 20 s), so a peer that stops reading is dropped about when one that stops
/// sending would be.
pub const DEFAULT_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Default `--login-timeout`: a client logs in right after connecting (one round trip, and a
/// verify); 10 s leaves a slow mobile link ample time while a socket that never logs in is not
/// held for the 20 s idle timeout or longer.
pub const DEFAULT_LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Default `--max-unauthenticated`: connections waiting to log in, over all cores. A login takes
/// a round trip, so even a reconnect storm of tens of thousands of clients keeps far fewer than
/// this waiting at once; idle unauthenticated sockets beyond it are refused instead of eating
/// the descriptor limit that logged-in users need.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 8192;

/// Default `--max-conns-per-ip`: connections not logged in from one address. Room for a NAT
/// gateway's clients reconnecting together, not for one host holding thousands of idle sockets.
pub const DEFAULT_MAX_CONNS_PER_IP: u32 = 128;

/// Default `--max-conn-rate-per-ip`: new connections per second from one address (burst twice
/// that). A NAT gateway's clients reconnect over the SDK's back-off of seconds; one host
/// opening connections in a loop is held to this.
pub const DEFAULT_MAX_CONN_RATE_PER_IP: u32 = 50;

/// Default `--udp-unauth-reply-rate`: a UDP client that is not logged in needs one 301 to know it
/// must log in again (SPEC §9), and sends a keep-alive every few seconds; 2 per second (burst 4)
/// is plenty for it and bounds what a spoofer can aim at one victim address.
pub const DEFAULT_UDP_UNAUTH_REPLY_RATE: u32 = 2;
