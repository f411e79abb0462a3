//! imedge: a MobileIMSDK-compatible IM transport server. This file is only the command line,
//! the configuration sources and logging; everything else is the `imedge_server` library.
//!
//! Settings come from, strongest first: flags, `IMEDGE_*` environment variables, the TOML file
//! given by `--config`, and the reference's defaults.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use imedge_protocol::session::{SenseMode, Transport};
use imedge_server::config::{IoBackend, ServerConfig};
use imedge_server::hooks::{AllowAll, ServerEvents, TokenTable};
use serde::Deserialize;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A port number, or `off` to disable the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PortText")]
struct Port(Option<u16>);

#[derive(Deserialize)]
#[serde(untagged)]
enum PortText {
    Number(u16),
    Text(String),
}

impl TryFrom<PortText> for Port {
    type Error = String;
    fn try_from(value: PortText) -> Result<Self, String> {
        match value {
            PortText::Number(n) => Ok(Self(Some(n))),
            PortText::Text(t) => t.parse(),
        }
    }
}

impl std::str::FromStr for Port {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|p| Self(Some(p)))
            .map_err(|_| format!("`{s}` is not a port number or `off`"))
    }
}

/// A sense mode (SPEC §6.3): `3s`, `5s`, `10s`, `15s`, `30s`, `60s` or `120s`.
fn parse_sense(s: &str) -> Result<SenseMode, String> {
    Ok(match s {
        "3s" => SenseMode::S3,
        "5s" => SenseMode::S5,
        "10s" => SenseMode::S10,
        "15s" => SenseMode::S15,
        "30s" => SenseMode::S30,
        "60s" => SenseMode::S60,
        "120s" => SenseMode::S120,
        _ => return Err(format!("`{s}`: expected one of 3s 5s 10s 15s 30s 60s 120s")),
    })
}

/// The server idle timeout for a sense mode on a transport, or an error for a mode the
/// transport does not have (UDP has no 5s or 15s mode).
fn sense_idle(mode: &str, transport: Transport) -> anyhow::Result<Duration> {
    let mode = parse_sense(mode).map_err(anyhow::Error::msg)?;
    mode.server_idle_timeout(transport)
        .with_context(|| format!("sense mode {mode:?} does not exist for {transport:?}"))
}

fn parse_io(s: &str) -> Result<IoBackend, String> {
    match s {
        "auto" => Ok(IoBackend::Auto),
        "uring" | "io_uring" | "io-uring" => Ok(IoBackend::Uring),
        "epoll" => Ok(IoBackend::Epoll),
        _ => Err(format!("`{s}`: expected auto, uring or epoll")),
    }
}

/// Command-line flags; each may also be set with an `IMEDGE_*` variable.
#[derive(Debug, Parser)]
#[command(
    name = "imedge",
    version,
    about = "MobileIMSDK-compatible IM server (TCP, UDP, WebSocket)"
)]
struct Args {
    /// TOML file with any of the settings below (keys as the flags, with `_` for `-`).
    #[arg(long, env = "IMEDGE_CONFIG")]
    config: Option<PathBuf>,
    /// TCP port, or `off` [default: 8901].
    #[arg(long, env = "IMEDGE_TCP_PORT")]
    tcp_port: Option<Port>,
    /// UDP port, or `off` [default: 7901].
    #[arg(long, env = "IMEDGE_UDP_PORT")]
    udp_port: Option<Port>,
    /// WebSocket port (path /websocket), or `off` [default: 3000].
    #[arg(long, env = "IMEDGE_WS_PORT")]
    ws_port: Option<Port>,
    /// Address to listen on [default: 0.0.0.0].
    #[arg(long, env = "IMEDGE_BIND")]
    bind: Option<IpAddr>,
    /// Directory for durable state [default: ./data].
    #[arg(long, env = "IMEDGE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Event loops (cores) [default: number of CPUs].
    #[arg(long, env = "IMEDGE_THREADS")]
    threads: Option<usize>,
    /// I/O backend: auto, uring or epoll [default: auto].
    #[arg(long, env = "IMEDGE_IO", value_parser = parse_io)]
    io: Option<IoBackend>,
    /// Sense mode of TCP clients (3s 5s 10s 15s 30s 60s 120s): sets the TCP idle timeout as
    /// the reference does (5s → 11 s, the demo's setting) [default: unset → 20 s].
    #[arg(long, env = "IMEDGE_TCP_SENSE_MODE")]
    tcp_sense_mode: Option<String>,
    /// Sense mode of UDP clients (3s 10s 30s 60s 120s) [default: unset → 10 s].
    #[arg(long, env = "IMEDGE_UDP_SENSE_MODE")]
    udp_sense_mode: Option<String>,
    /// Sense mode of WebSocket clients, as TCP [default: unset → 20 s].
    #[arg(long, env = "IMEDGE_WS_SENSE_MODE")]
    ws_sense_mode: Option<String>,
    /// Idle timeout of TCP connections, seconds; overrides the sense mode [default: 20].
    #[arg(long, env = "IMEDGE_TCP_IDLE")]
    tcp_idle: Option<u64>,
    /// Idle timeout of UDP sessions, seconds [default: 10].
    #[arg(long, env = "IMEDGE_UDP_IDLE")]
    udp_idle: Option<u64>,
    /// Idle timeout of WebSocket connections, seconds [default: 20].
    #[arg(long, env = "IMEDGE_WS_IDLE")]
    ws_idle: Option<u64>,
    /// Resends of a QoS message the server forwards before it counts as lost (and is stored
    /// for the recipient) [default: 1, the reference's].
    #[arg(long, env = "IMEDGE_QOS_RESENDS")]
    qos_resends: Option<u32>,
    /// Period of the server's QoS resend checks, milliseconds [default: 5000, the reference's].
    #[arg(long, env = "IMEDGE_QOS_RESEND_INTERVAL")]
    qos_resend_interval: Option<u64>,
    /// Largest C2C message relayed, in bytes as encoded for the recipient. Checked when the
    /// sender's message arrives, on every transport: a larger one is refused (not relayed, not
    /// stored, no ACK, error 4 to the sender) rather than sent in a form the recipient's SDK
    /// drops. The default is the TCP frame limit; with Java UDP clients use 1024
    /// [default: 6144].
    #[arg(long, env = "IMEDGE_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// Data messages per second one session may send; past it (and its burst) they are dropped
    /// without an ACK, so the SDK resends them later or reports them lost. 0 = no limit
    /// [default: 200].
    #[arg(long, env = "IMEDGE_SESSION_MSG_RATE")]
    session_msg_rate: Option<u32>,
    /// Data messages one session may send at once before --session-msg-rate applies
    /// [default: 400].
    #[arg(long, env = "IMEDGE_SESSION_MSG_BURST")]
    session_msg_burst: Option<u32>,
    /// Stamp every server packet with the server clock (`sm`).
    #[arg(long, env = "IMEDGE_SERVER_TIMESTAMPS")]
    server_timestamps: Option<bool>,
    /// Accept logins only with the token listed for the uid in this file (`uid token` lines);
    /// without it everyone may log in, like the reference demo.
    #[arg(long, env = "IMEDGE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Do not pin event loops to CPUs.
    #[arg(long, env = "IMEDGE_NO_PIN")]
    no_pin: Option<bool>,
    /// Store messages for users who are not online under --data-dir [default: true].
    #[arg(long, env = "IMEDGE_OFFLINE_STORE")]
    offline_store: Option<bool>,
    /// Most messages stored per user [default: 10000].
    #[arg(long, env = "IMEDGE_OFFLINE_MAX_PER_USER")]
    offline_max_per_user: Option<usize>,
    /// Most messages one sender may have stored for others; the server ("0") is exempt
    /// [default: 1000].
    #[arg(long, env = "IMEDGE_OFFLINE_MAX_PER_SENDER")]
    offline_max_per_sender: Option<usize>,
    /// Most bytes the offline store holds [default: 1073741824 = 1 GiB].
    #[arg(long, env = "IMEDGE_OFFLINE_MAX_BYTES")]
    offline_max_bytes: Option<u64>,
    /// Stored messages older than this many seconds are dropped [default: 604800 = 7 days].
    #[arg(long, env = "IMEDGE_OFFLINE_MAX_AGE")]
    offline_max_age: Option<u64>,
    /// Most bytes a TCP/WebSocket connection may leave unread before it is disconnected as a
    /// slow consumer [default: 4194304].
    #[arg(long, env = "IMEDGE_MAX_SEND_BUFFER")]
    max_send_buffer: Option<usize>,
    /// Seconds a write may make no progress before its connection is closed (also the
    /// sockets' TCP_USER_TIMEOUT) [default: 10].
    #[arg(long, env = "IMEDGE_WRITE_STALL_TIMEOUT")]
    write_stall_timeout: Option<u64>,
    /// Worker threads that run the login verify off the event loops [default: 2].
    #[arg(long, env = "IMEDGE_HOOK_THREADS")]
    hook_threads: Option<usize>,
    /// Verifies each hook worker may have queued; past it a login is refused with code 1026
    /// [default: 1024].
    #[arg(long, env = "IMEDGE_HOOK_QUEUE")]
    hook_queue: Option<usize>,
    /// Seconds a login waits for its verify before it is refused with code 1026 [default: 10].
    #[arg(long, env = "IMEDGE_VERIFY_TIMEOUT")]
    verify_timeout: Option<u64>,
    /// Logins one core may have waiting for their verify; more are refused with code 1026
    /// [default: 4096].
    #[arg(long, env = "IMEDGE_MAX_PENDING_VERIFIES")]
    max_pending_verifies: Option<usize>,
    /// Seconds a TCP/WebSocket connection may stay without logging in [default: 10].
    #[arg(long, env = "IMEDGE_LOGIN_TIMEOUT")]
    login_timeout: Option<u64>,
    /// Most connections not logged in, over all cores; 0 = no cap [default: 8192].
    #[arg(long, env = "IMEDGE_MAX_UNAUTHENTICATED")]
    max_unauthenticated: Option<usize>,
    /// Most connections not logged in from one source address; 0 = no cap [default: 128].
    #[arg(long, env = "IMEDGE_MAX_CONNS_PER_IP")]
    max_conns_per_ip: Option<u32>,
    /// Most new connections per second from one source address (burst: 2 s of it); 0 = no
    /// limit [default: 50].
    #[arg(long, env = "IMEDGE_MAX_CONN_RATE_PER_IP")]
    max_conn_rate_per_ip: Option<u32>,
    /// Replies per second to one UDP source address that is not logged in (error 301, echo);
    /// 0 = no limit [default: 2].
    #[arg(long, env = "IMEDGE_UDP_UNAUTH_REPLY_RATE")]
    udp_unauth_reply_rate: Option<u32>,
    /// Apply the per-address limits to loopback clients too [default: false].
    #[arg(long, env = "IMEDGE_LIMIT_LOOPBACK")]
    limit_loopback: Option<bool>,
    /// Benchmark mode: echo every TCP/WebSocket frame and UDP datagram back as it came, through
    /// the server's own event loops but without the protocol (the floor `scripts/bench.sh`
    /// compares against). Not a server: nobody can log in.
    #[arg(long, hide = true)]
    bench_echo: bool,
}

/// The `--config` file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    tcp_port: Option<Port>,
    udp_port: Option<Port>,
    ws_port: Option<Port>,
    bind: Option<IpAddr>,
    data_dir: Option<PathBuf>,
    threads: Option<usize>,
    io: Option<String>,
    tcp_idle: Option<u64>,
    udp_idle: Option<u64>,
    ws_idle: Option<u64>,
    qos_resends: Option<u32>,
    qos_resend_interval: Option<u64>,
    max_message_bytes: Option<usize>,
    session_msg_rate: Option<u32>,
    session_msg_burst: Option<u32>,
    tcp_sense_mode: Option<String>,
    udp_sense_mode: Option<String>,
    ws_sense_mode: Option<String>,
    server_timestamps: Option<bool>,
    token_file: Option<PathBuf>,
    no_pin: Option<bool>,
    offline_store: Option<bool>,
    offline_max_per_user: Option<usize>,
    offline_max_per_sender: Option<usize>,
    offline_max_bytes: Option<u64>,
    offline_max_age: Option<u64>,
    max_send_buffer: Option<usize>,
    write_stall_timeout: Option<u64>,
    hook_threads: Option<usize>,
    hook_queue: Option<usize>,
    verify_timeout: Option<u64>,
    max_pending_verifies: Option<usize>,
    login_timeout: Option<u64>,
    max_unauthenticated: Option<usize>,
    max_conns_per_ip: Option<u32>,
    max_conn_rate_per_ip: Option<u32>,
    udp_unauth_reply_rate: Option<u32>,
    limit_loopback: Option<bool>,
}

/// Turns transparent huge pages off for this process. mimalloc reserves its arena with
/// `MADV_HUGEPAGE`, so on kernels in THP `madvise` mode (the usual default) every first touch of
/// its memory faults in 2 MiB: measured here, an idle server sat at 12 MB instead of 5 MB and
/// each idle session cost ~3.7 KiB instead of ~0.5 KiB. The flag is checked at fault time, so
/// setting it first thing in `main` covers nearly all of the heap.
#[cfg(target_os = "linux")]
fn disable_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and affects this process alone.
    let result = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "PR_SET_THP_DISABLE failed");
    }
}

#[cfg(not(target_os = "linux"))]
fn disable_huge_pages() {}

fn main() -> anyhow::Result<()> {
    disable_huge_pages();
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IMEDGE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => FileConfig::default(),
    };

    let mut config = ServerConfig::default();
    if let Some(Port(p)) = args.tcp_port.or(file.tcp_port) {
        config.tcp_port = p;
    }
    if let Some(Port(p)) = args.udp_port.or(file.udp_port) {
        config.udp_port = p;
    }
    if let Some(Port(p)) = args.ws_port.or(file.ws_port) {
        config.ws_port = p;
    }
    config.bind = args.bind.or(file.bind).unwrap_or(config.bind);
    config.data_dir = args.data_dir.or(file.data_dir).unwrap_or(config.data_dir);
    config.threads = args.threads.or(file.threads).unwrap_or(config.threads);
    if let Some(io) = args.io {
        config.io = io;
    } else if let Some(io) = file.io {
        config.io = parse_io(&io).map_err(anyhow::Error::msg)?;
    }
    if let Some(mode) = args.tcp_sense_mode.or(file.tcp_sense_mode) {
        config.tcp_idle = sense_idle(&mode, Transport::Tcp)?;
    }
    if let Some(mode) = args.udp_sense_mode.or(file.udp_sense_mode) {
        config.udp_idle = sense_idle(&mode, Transport::Udp)?;
    }
    if let Some(mode) = args.ws_sense_mode.or(file.ws_sense_mode) {
        config.ws_idle = sense_idle(&mode, Transport::Ws)?;
    }
    let secs = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_secs);
    config.tcp_idle = secs(args.tcp_idle.or(file.tcp_idle), config.tcp_idle);
    config.udp_idle = secs(args.udp_idle.or(file.udp_idle), config.udp_idle);
    config.ws_idle = secs(args.ws_idle.or(file.ws_idle), config.ws_idle);
    if let Some(n) = args.qos_resends.or(file.qos_resends) {
        config.qos.max_resends = n;
    }
    if let Some(ms) = args.qos_resend_interval.or(file.qos_resend_interval) {
        if ms == 0 {
            bail!("--qos-resend-interval must be at least 1 ms");
        }
        config.qos.check_interval = Duration::from_millis(ms);
    }
    if let Some(n) = args.max_message_bytes.or(file.max_message_bytes) {
        config.max_message_bytes = n;
    }
    if let Some(n) = args.session_msg_rate.or(file.session_msg_rate) {
        config.session_msg_rate = n;
    }
    if let Some(n) = args.session_msg_burst.or(file.session_msg_burst) {
        config.session_msg_burst = n;
    }
    config.server_timestamps = args
        .server_timestamps
        .or(file.server_timestamps)
        .unwrap_or(false);
    config.pin_threads = !args.no_pin.or(file.no_pin).unwrap_or(false);
    config.offline_store = args.offline_store.or(file.offline_store).unwrap_or(true);
    if let Some(n) = args.offline_max_per_user.or(file.offline_max_per_user) {
        config.offline_max_per_user = n;
    }
    if let Some(n) = args.offline_max_per_sender.or(file.offline_max_per_sender) {
        config.offline_max_per_sender = n;
    }
    if let Some(n) = args.offline_max_bytes.or(file.offline_max_bytes) {
        config.offline_max_bytes = n;
    }
    if let Some(secs) = args.offline_max_age.or(file.offline_max_age) {
        config.offline_max_age = Duration::from_secs(secs);
    }
    if let Some(n) = args.max_send_buffer.or(file.max_send_buffer) {
        config.max_send_buffer = n;
    }
    config.write_stall_timeout = secs(
        args.write_stall_timeout.or(file.write_stall_timeout),
        config.write_stall_timeout,
    );
    if let Some(n) = args.hook_threads.or(file.hook_threads) {
        config.hook_threads = n;
    }
    if let Some(n) = args.hook_queue.or(file.hook_queue) {
        config.hook_queue = n;
    }
    config.verify_timeout = secs(
        args.verify_timeout.or(file.verify_timeout),
        config.verify_timeout,
    );
    if let Some(n) = args.max_pending_verifies.or(file.max_pending_verifies) {
        config.max_pending_verifies = n;
    }
    if config.hook_threads == 0 || config.hook_queue == 0 {
        bail!("--hook-threads and --hook-queue must be at least 1");
    }
    config.login_timeout = secs(
        args.login_timeout.or(file.login_timeout),
        config.login_timeout,
    );
    if let Some(n) = args.max_unauthenticated.or(file.max_unauthenticated) {
        config.max_unauthenticated = n;
    }
    if let Some(n) = args.max_conns_per_ip.or(file.max_conns_per_ip) {
        config.max_conns_per_ip = n;
    }
    if let Some(n) = args.max_conn_rate_per_ip.or(file.max_conn_rate_per_ip) {
        config.max_conn_rate_per_ip = n;
    }
    if let Some(n) = args.udp_unauth_reply_rate.or(file.udp_unauth_reply_rate) {
        config.udp_unauth_reply_rate = n;
    }
    config.limit_loopback = args.limit_loopback.or(file.limit_loopback).unwrap_or(false);
    config.bench_echo = args.bench_echo;
    if config.bench_echo {
        tracing::warn!("benchmark echo mode: frames are echoed, the protocol is off");
    }
    if config.threads == 0 {
        bail!("--threads must be at least 1");
    }

    let hooks: Arc<dyn ServerEvents> = match args.token_file.or(file.token_file) {
        Some(path) => {
            let table = TokenTable::from_file(&path).map_err(anyhow::Error::msg)?;
            tracing::info!(users = table.len(), file = %path.display(), "login verify: token table");
            Arc::new(table)
        }
        None => {
            tracing::info!(
                "login verify: allow all (demo behaviour; use --token-file to restrict)"
            );
            Arc::new(AllowAll)
        }
    };

    // Signals are taken over before anything is announced, so a SIGTERM that follows the
    // "listening" lines always gets the graceful path.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    let server = imedge_server::runtime::start(&config, hooks).context("starting the server")?;
    tracing::info!(
        backend = server.backend,
        threads = config.threads,
        "imedge running"
    );
    if let Some(addr) = server.tcp_addr {
        tracing::info!(%addr, idle_secs = config.tcp_idle.as_secs(), "TCP gateway listening");
    }
    if let Some(addr) = server.udp_addr {
        tracing::info!(%addr, idle_secs = config.udp_idle.as_secs(), "UDP gateway listening");
    }
    if let Some(addr) = server.ws_addr {
        tracing::info!(%addr, path = "/websocket", idle_secs = config.ws_idle.as_secs(), "WebSocket gateway listening");
    }

    // The control thread: wait for SIGINT/SIGTERM, then drain and stop the cores.
    let stopper = server.stopper();
    std::thread::Builder::new()
        .name("imedge-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!(signal, "shutting down");
                stopper.stop();
            }
        })
        .context("starting the signal thread")?;
    server.join().context("an event loop failed")?;
    tracing::info!("stopped");
    Ok(())
}
