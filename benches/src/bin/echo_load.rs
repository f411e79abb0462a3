//! echo-load: the open-loop load client of the echo benchmark (`scripts/bench_echo.sh`). One
//! thread, one mio (epoll) loop over every socket, a timerfd for the send schedule.
//!
//! A *message* is two frames sent back-to-back on one connection (a C2C message and its QoS ACK)
//! and their two echoes. Message `k` is due at `start + k / rate` and goes to connection
//! `k mod connections`; its latency is the arrival of its second echo minus its intended send
//! time, so a stall anywhere — server or client — shows (no coordinated omission). Over the
//! measured window (after the warm-up) it reads the server's CPU time from `/proc/<pid>/stat` and
//! reports server CPU µs per message and per echoed frame, the achieved rate, latency
//! percentiles, losses and its own CPU use (a saturated client shows there and in the send lag).
//!
//! Run: `echo-load --addr 127.0.0.1:19001 --rate 40000 --server-pid $(pidof imedge)`.

#![allow(clippy::print_stdout)] // the results go to stdout

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use imedge_benches::echo::proc_stat::{machine_busy, net_counters, process_cpu, NetCounters};
use imedge_benches::echo::schedule::{connection_of, Schedule};
use imedge_benches::echo::wire::{
    next_frame, put_body, put_frame, stamp, Stamp, FRAMES_PER_MESSAGE, MAX_TCP_BODY,
    MAX_UDP_DATAGRAM, STAMP_LEN,
};
use imedge_loadgen::worker::timer::TimerFd;
use mio::net::{TcpStream, UdpSocket};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Most connections: below this machine's usual `RLIMIT_NOFILE` (20000) with room to spare.
const MAX_CONNECTIONS: usize = 16_000;
/// Highest rate accepted: far above what one client core can drive, so it only catches typos.
const MAX_RATE: u64 = 2_000_000;
/// Longest warm-up + measured window: every run is bounded in time.
const MAX_RUN: Duration = Duration::from_secs(600);
/// How long after the window replies may still arrive before the missing ones count as lost.
const GRACE: Duration = Duration::from_secs(1);
/// Time allowed for one TCP connect (loopback answers in microseconds; a full backlog in ~1 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Gap between set-up and the first message, so the loop is running when it is due.
const START_DELAY: Duration = Duration::from_millis(50);
/// Per-connection receive buffer: several of the largest frames.
const READ_BUF: usize = 64 * 1024;
/// Unsent bytes one connection may hold before further messages to it are dropped (counted as
/// lost): a server that stops reading must not grow the client without bound.
const MAX_PENDING_OUT: usize = 4 * 1024 * 1024;
/// Readiness events taken per poll.
const EVENTS_CAPACITY: usize = 1024;
/// Longest single poll: a safety net should a timer expiry be missed.
const POLL_CAP: Duration = Duration::from_millis(100);
/// Smallest latency the histograms tell apart, ns: 1 µs (loopback round trips take tens of µs).
const HIST_LOW_NS: u64 = 1_000;
/// Largest latency recorded, ns: 60 s, beyond any bounded run (larger values are clamped).
const HIST_HIGH_NS: u64 = 60_000_000_000;
/// Significant figures of the histograms: HdrHistogram's usual 3 (0.1 % resolution).
const HIST_SIGFIGS: u8 = 3;
/// Send-lag p99 above which the client is reported as behind its schedule.
const BEHIND_WARN: Duration = Duration::from_millis(1);
/// Achieved rate below this share of the target gets a warning.
const ACHIEVED_WARN_SHARE: f64 = 0.98;
/// CPU of other processes (% of one core) above which the run is flagged as noisy.
const OTHER_CPU_WARN_PCT: f64 = 10.0;
/// A poll that ends with no event this long after the timer's deadline means the timer did not
/// wake the loop (only POLL_CAP did): a client bug, reported as such.
const LATE_WAKEUP: Duration = Duration::from_millis(5);
/// The timerfd's token; connection `i` has token `i`.
const TIMER_TOKEN: Token = Token(usize::MAX);

/// Transport under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// 4-byte big-endian length-prefixed frames over TCP.
    Tcp,
    /// One frame per UDP datagram.
    Udp,
}

/// The command line.
#[derive(Debug, Parser)]
#[command(about = "Open-loop load client of the echo benchmark (loopback only)")]
struct Args {
    /// Echo server address; must be a loopback address.
    #[arg(long, default_value = "127.0.0.1:19001")]
    addr: SocketAddr,
    /// Transport.
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
    /// Connections (TCP) or sockets (UDP); messages go round-robin over them.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Messages per second, in total (each message = 2 frames out, 2 echoes back).
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Length of the measured window, e.g. `10s`, `500ms`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before the measured window (not measured), e.g. `2s`.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Body bytes per frame (at least 16: frame id and intended send time).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Server process whose CPU time (all threads) is measured.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Name of the server in the results (for tables).
    #[arg(long, default_value = "server")]
    label: String,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let value: f64 = digits.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => value,
        "ms" => value / 1e3,
        "m" => value * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (use s, ms or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s}: {e}"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    check(&args)?;
    raise_fd_limit();
    let report = run(&args)?;
    println!("{}", report.line());
    for warning in report.warnings() {
        eprintln!("echo-load: warning: {warning}");
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report.json()).context("encoding JSON")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn check(args: &Args) -> Result<()> {
    if !args.addr.ip().is_loopback() {
        bail!(
            "--addr {} is not a loopback address: this benchmark only runs on 127.0.0.1",
            args.addr
        );
    }
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        bail!("--connections must be 1..={MAX_CONNECTIONS}");
    }
    if args.rate == 0 || args.rate > MAX_RATE {
        bail!("--rate must be 1..={MAX_RATE}");
    }
    if args.duration.is_zero() || args.warmup + args.duration > MAX_RUN {
        bail!("--duration must be positive and --warmup + --duration at most {MAX_RUN:?}");
    }
    let max_size = match args.transport {
        Transport::Tcp => MAX_TCP_BODY,
        Transport::Udp => MAX_UDP_DATAGRAM,
    };
    if !(STAMP_LEN..=max_size).contains(&args.size) {
        bail!(
            "--size must be {STAMP_LEN}..={max_size} for {:?}",
            args.transport
        );
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard one (1000 connections need more than the common
/// soft default of 1024).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max
    {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit; failure only leaves the old limit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// Nanoseconds since the run's origin (CLOCK_MONOTONIC underneath).
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now_ns(self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A client socket.
#[derive(Debug)]
enum Sock {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

/// One connection (TCP) or connected socket (UDP) and its buffers.
#[derive(Debug)]
struct Conn {
    /// `None` once the connection failed; its messages count as lost.
    sock: Option<Sock>,
    /// TCP: bytes to send; `out[out_pos..]` is still unsent.
    out: Vec<u8>,
    out_pos: usize,
    /// TCP: received bytes; `inb[..in_len]` is filled.
    inb: Vec<u8>,
    in_len: usize,
    /// TCP: the last write hit EAGAIN; wait for a writable event before writing again.
    blocked: bool,
    /// Holds new output and is on the dirty list.
    dirty: bool,
}

/// Counters and histograms of a run.
#[derive(Debug)]
struct Stats {
    /// Echoes received per message (index = message number).
    replies: Vec<u8>,
    /// The measured window `[start, end)`, run clock.
    window: (u64, u64),
    /// Latency (intended send → second echo) of messages due in the window, ns.
    latency: Histogram<u64>,
    /// How late the client sent messages due in the window, ns.
    send_lag: Histogram<u64>,
    sent: u64,
    completed: u64,
    completed_in_window: u64,
    frames_in_window: u64,
    /// Messages not (fully) sent: full send buffer, closed connection, send error.
    dropped: u64,
    duplicates: u64,
    unexpected: u64,
    closed: u64,
    /// Polls that ended without the timer long after its deadline (see LATE_WAKEUP), and the
    /// worst lateness.
    missed_timers: u64,
    missed_timer_max_ns: u64,
}

impl Stats {
    fn new(messages: u64, window: (u64, u64)) -> Result<Self> {
        let hist = || Histogram::new_with_bounds(HIST_LOW_NS, HIST_HIGH_NS, HIST_SIGFIGS);
        Ok(Self {
            replies: vec![0; usize::try_from(messages).context("too many messages")?],
            window,
            latency: hist()?,
            send_lag: hist()?,
            sent: 0,
            completed: 0,
            completed_in_window: 0,
            frames_in_window: 0,
            dropped: 0,
            duplicates: 0,
            unexpected: 0,
            closed: 0,
            missed_timers: 0,
            missed_timer_max_ns: 0,
        })
    }

    fn in_window(&self, t_ns: u64) -> bool {
        (self.window.0..self.window.1).contains(&t_ns)
    }

    /// An echoed body arrived at `now_ns`.
    fn on_echo(&mut self, body: &[u8], now_ns: u64) {
        let Some(st) = stamp(body) else {
            self.unexpected += 1;
            return;
        };
        let Some(count) = usize::try_from(st.message())
            .ok()
            .and_then(|k| self.replies.get_mut(k))
        else {
            self.unexpected += 1;
            return;
        };
        *count = count.saturating_add(1);
        let count = u64::from(*count);
        let now_in_window = self.in_window(now_ns);
        if now_in_window {
            self.frames_in_window += 1;
        }
        if count > FRAMES_PER_MESSAGE {
            self.duplicates += 1;
        } else if count == FRAMES_PER_MESSAGE {
            self.completed += 1;
            if now_in_window {
                self.completed_in_window += 1;
            }
            if self.in_window(st.intended_ns) {
                self.latency
                    .saturating_record(now_ns.saturating_sub(st.intended_ns));
            }
        }
    }
}

/// CPU samples at the start and end of the window.
#[derive(Debug, Default, Clone, Copy)]
struct CpuSample {
    server: Option<Duration>,
    client: Option<Duration>,
    /// Busy time of all CPUs, to see what other processes took.
    machine: Option<Duration>,
    /// The machine's UDP drop and TCP retransmission counters.
    net: Option<NetCounters>,
}

fn sample(server_pid: Option<u32>) -> CpuSample {
    let server = server_pid.and_then(|pid| match process_cpu(Some(pid)) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("echo-load: warning: reading /proc/{pid}/stat: {e}");
            None
        }
    });
    CpuSample {
        server,
        client: process_cpu(None).ok(),
        machine: machine_busy().ok(),
        net: net_counters().ok(),
    }
}

/// How much a machine-wide network counter grew between two samples.
fn net_delta(a: CpuSample, b: CpuSample, field: fn(&NetCounters) -> u64) -> Option<u64> {
    Some(field(&b.net?).saturating_sub(field(&a.net?)))
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Measure,
    /// Sending is over; waiting (at most GRACE) for the last echoes.
    Drain,
}

fn connect(args: &Args, poll: &Poll) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let mut sock = match args.transport {
            Transport::Tcp => {
                let s = std::net::TcpStream::connect_timeout(&args.addr, CONNECT_TIMEOUT)
                    .with_context(|| format!("connection {i} to {}", args.addr))?;
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Sock::Tcp(TcpStream::from_std(s))
            }
            Transport::Udp => {
                let s = std::net::UdpSocket::bind((args.addr.ip(), 0))
                    .context("binding a UDP socket")?;
                s.connect(args.addr)?;
                s.set_nonblocking(true)?;
                Sock::Udp(UdpSocket::from_std(s))
            }
        };
        let token = Token(i);
        match &mut sock {
            Sock::Tcp(s) => {
                poll.registry()
                    .register(s, token, Interest::READABLE | Interest::WRITABLE)?
            }
            // UDP sends that would block are dropped, not retried: no writable interest.
            Sock::Udp(s) => poll.registry().register(s, token, Interest::READABLE)?,
        }
        let tcp = matches!(sock, Sock::Tcp(_));
        conns.push(Conn {
            sock: Some(sock),
            out: Vec::new(),
            out_pos: 0,
            inb: if tcp { vec![0; READ_BUF] } else { Vec::new() },
            in_len: 0,
            blocked: false,
            dirty: false,
        });
    }
    Ok(conns)
}

fn run(args: &Args) -> Result<Report> {
    let mut poll = Poll::new()?;
    let mut conns = connect(args, &poll)?;
    // The loadgen's timerfd (absolute CLOCK_MONOTONIC, 1 ns timer slack on this thread).
    let mut timer = TimerFd::new().context("timerfd")?;
    poll.registry().register(
        &mut SourceFd(&timer.as_raw_fd()),
        TIMER_TOKEN,
        Interest::READABLE,
    )?;

    let clock = Clock(Instant::now());
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let start = clock.now_ns() + ns(START_DELAY);
    let w0 = start + ns(args.warmup);
    let w1 = w0 + ns(args.duration);
    let stop = w1 + ns(GRACE);
    let messages = Schedule::messages_in(args.rate, w1 - start);
    let mut schedule = Schedule::new(start, args.rate, messages);
    let mut stats = Stats::new(messages, (w0, w1))?;
    let mut events = Events::with_capacity(EVENTS_CAPACITY);
    let mut dirty: Vec<usize> = Vec::with_capacity(args.connections);
    let mut scratch = vec![0u8; MAX_UDP_DATAGRAM + 1];
    let mut phase = Phase::Warmup;
    let (mut cpu0, mut cpu1) = (CpuSample::default(), CpuSample::default());

    loop {
        let now = clock.now_ns();
        while let Some((k, intended)) = schedule.pop_due(now) {
            if stats.in_window(intended) {
                stats.send_lag.saturating_record(now - intended);
            }
            stats.sent += 1;
            let c = connection_of(k, conns.len());
            if let Some(conn) = conns.get_mut(c) {
                if !enqueue(conn, k, intended, args.size, &mut scratch) {
                    stats.dropped += 1;
                } else if conn.out.len() > conn.out_pos && !conn.dirty {
                    conn.dirty = true;
                    dirty.push(c);
                }
            }
        }
        for c in dirty.drain(..) {
            if let Some(conn) = conns.get_mut(c) {
                conn.dirty = false;
                if !conn.blocked {
                    flush(conn, &poll, &mut stats);
                }
            }
        }

        if phase == Phase::Warmup && now >= w0 {
            cpu0 = sample(args.server_pid);
            phase = Phase::Measure;
        }
        if phase == Phase::Measure && now >= w1 {
            cpu1 = sample(args.server_pid);
            phase = Phase::Drain;
        }
        if phase == Phase::Drain
            && (now >= stop || stats.completed + stats.dropped >= schedule.taken())
        {
            break;
        }

        let deadline = match phase {
            Phase::Warmup => schedule.next_due().map_or(w0, |t| t.min(w0)),
            Phase::Measure => schedule.next_due().map_or(w1, |t| t.min(w1)),
            Phase::Drain => stop,
        };
        // Run clock → CLOCK_MONOTONIC. Re-arming resets the expiry count, so the fd never
        // needs reading: every expiry is a fresh edge for epoll.
        timer.arm(imedge_loadgen::clock::mono_ns() + deadline.saturating_sub(now));
        match poll.poll(&mut events, Some(POLL_CAP)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        if events.is_empty() {
            let late = clock.now_ns().saturating_sub(deadline);
            if late > ns(LATE_WAKEUP) {
                stats.missed_timers += 1;
                stats.missed_timer_max_ns = stats.missed_timer_max_ns.max(late);
            }
        }
        for event in &events {
            let Some(conn) = conns.get_mut(event.token().0) else {
                continue; // the timer: its expiry only ends the poll
            };
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                receive(conn, clock, &poll, &mut stats, &mut scratch);
            }
            if event.is_writable() && conn.blocked {
                conn.blocked = false;
                flush(conn, &poll, &mut stats);
            }
        }
    }

    Ok(Report::new(args, &stats, cpu0, cpu1, schedule.taken()))
}

/// Queues (TCP) or sends (UDP) the two frames of message `k`; false if it was dropped.
fn enqueue(conn: &mut Conn, k: u64, intended: u64, size: usize, scratch: &mut Vec<u8>) -> bool {
    match &conn.sock {
        None => false,
        Some(Sock::Tcp(_)) => {
            if conn.out.len() - conn.out_pos > MAX_PENDING_OUT {
                return false;
            }
            for part in 0..FRAMES_PER_MESSAGE {
                put_frame(Stamp::new(k, part, intended), size, &mut conn.out);
            }
            true
        }
        Some(Sock::Udp(sock)) => {
            let mut ok = true;
            for part in 0..FRAMES_PER_MESSAGE {
                scratch.clear();
                put_body(Stamp::new(k, part, intended), size, scratch);
                // EAGAIN (full send buffer) or ECONNREFUSED (no server): the message is lost.
                ok &= sock.send(scratch).is_ok_and(|n| n == scratch.len());
            }
            ok
        }
    }
}

/// Writes a TCP connection's queued bytes until done or EAGAIN.
fn flush(conn: &mut Conn, poll: &Poll, stats: &mut Stats) {
    let Some(Sock::Tcp(stream)) = &mut conn.sock else {
        return;
    };
    while let Some(pending) = conn.out.get(conn.out_pos..).filter(|p| !p.is_empty()) {
        match stream.write(pending) {
            Ok(n) => conn.out_pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.blocked = true;
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                close(conn, poll, stats, &e);
                return;
            }
        }
    }
    conn.out.clear();
    conn.out_pos = 0;
}

/// Reads everything a socket has and hands each echo to `stats`.
fn receive(conn: &mut Conn, clock: Clock, poll: &Poll, stats: &mut Stats, scratch: &mut [u8]) {
    match &mut conn.sock {
        None => {}
        Some(Sock::Udp(sock)) => loop {
            match sock.recv(scratch) {
                Ok(n) => stats.on_echo(scratch.get(..n).unwrap_or_default(), clock.now_ns()),
                // ECONNREFUSED: an earlier send met a closed port (reported once); read on.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionRefused
                    ) => {}
                // EAGAIN ends the batch.
                Err(_) => break,
            }
        },
        Some(Sock::Tcp(stream)) => loop {
            let Some(space) = conn.inb.get_mut(conn.in_len..) else {
                return;
            };
            let room = space.len();
            let n = match stream.read(space) {
                Ok(0) => {
                    let eof = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed the connection",
                    );
                    close(conn, poll, stats, &eof);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    close(conn, poll, stats, &e);
                    return;
                }
            };
            conn.in_len += n;
            let now = clock.now_ns();
            let mut used = 0;
            loop {
                let filled = conn.inb.get(used..conn.in_len).unwrap_or_default();
                match next_frame(filled) {
                    Ok(Some((body, len))) => {
                        stats.on_echo(body, now);
                        used += len;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let bad = io::Error::new(io::ErrorKind::InvalidData, e);
                        close(conn, poll, stats, &bad);
                        return;
                    }
                }
            }
            conn.inb.copy_within(used..conn.in_len, 0);
            conn.in_len -= used;
            // A short read emptied the socket; epoll reports the next bytes as a new edge.
            if n < room {
                return;
            }
        },
    }
}

fn close(conn: &mut Conn, poll: &Poll, stats: &mut Stats, why: &io::Error) {
    if let Some(Sock::Tcp(mut s)) = conn.sock.take() {
        let _ = poll.registry().deregister(&mut s);
    }
    stats.closed += 1;
    if stats.closed == 1 {
        eprintln!("echo-load: warning: a connection closed: {why}");
    }
}

/// The results of a run.
#[derive(Debug)]
struct Report {
    label: String,
    transport: Transport,
    connections: usize,
    size: usize,
    rate_target: u64,
    window_s: f64,
    achieved: f64,
    server_cpu_s: Option<f64>,
    server_us_per_msg: Option<f64>,
    server_us_per_frame: Option<f64>,
    client_cpu_pct: Option<f64>,
    /// CPU used by everything but the server and this client during the window, % of one core:
    /// other processes, and interrupts, on a shared machine make the figures noisy.
    other_cpu_pct: Option<f64>,
    /// Datagrams the kernel dropped for full UDP receive buffers during the window (any socket).
    udp_rcvbuf_drops: Option<u64>,
    /// TCP segments retransmitted during the window (any socket).
    tcp_retrans: Option<u64>,
    /// Latency percentiles in µs: p50, p90, p99, p99.9, max; and the mean.
    latency_us: [f64; 5],
    latency_mean_us: f64,
    latency_count: u64,
    send_lag_p99_us: f64,
    send_lag_max_us: f64,
    sent: u64,
    lost: u64,
    dropped: u64,
    duplicates: u64,
    unexpected: u64,
    closed: u64,
    missed_timers: u64,
    missed_timer_max_ms: f64,
}

impl Report {
    fn new(args: &Args, stats: &Stats, cpu0: CpuSample, cpu1: CpuSample, sent: u64) -> Self {
        let window_s = args.duration.as_secs_f64();
        let diff =
            |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?).as_secs_f64());
        let server_cpu_s = diff(cpu0.server, cpu1.server);
        let per = |count: u64| {
            server_cpu_s
                .filter(|_| count > 0)
                .map(|s| s * 1e6 / count as f64)
        };
        let us = |ns: u64| ns as f64 / 1e3;
        let q = |h: &Histogram<u64>, p: f64| us(h.value_at_quantile(p));
        Self {
            label: args.label.clone(),
            transport: args.transport,
            connections: args.connections,
            size: args.size,
            rate_target: args.rate,
            window_s,
            achieved: stats.completed_in_window as f64 / window_s,
            server_cpu_s,
            server_us_per_msg: per(stats.completed_in_window),
            server_us_per_frame: per(stats.frames_in_window),
            client_cpu_pct: diff(cpu0.client, cpu1.client).map(|s| s * 100.0 / window_s),
            udp_rcvbuf_drops: net_delta(cpu0, cpu1, |n| n.udp_rcvbuf_errors),
            tcp_retrans: net_delta(cpu0, cpu1, |n| n.tcp_retrans_segs),
            other_cpu_pct: diff(cpu0.machine, cpu1.machine).map(|machine| {
                let mine = diff(cpu0.client, cpu1.client).unwrap_or(0.0);
                (machine - server_cpu_s.unwrap_or(0.0) - mine).max(0.0) * 100.0 / window_s
            }),
            latency_us: [
                q(&stats.latency, 0.5),
                q(&stats.latency, 0.9),
                q(&stats.latency, 0.99),
                q(&stats.latency, 0.999),
                us(stats.latency.max()),
            ],
            latency_mean_us: stats.latency.mean() / 1e3,
            latency_count: stats.latency.len(),
            send_lag_p99_us: q(&stats.send_lag, 0.99),
            send_lag_max_us: us(stats.send_lag.max()),
            sent,
            lost: sent.saturating_sub(stats.completed),
            dropped: stats.dropped,
            duplicates: stats.duplicates,
            unexpected: stats.unexpected,
            closed: stats.closed,
            missed_timers: stats.missed_timers,
            missed_timer_max_ms: stats.missed_timer_max_ns as f64 / 1e6,
        }
    }

    fn line(&self) -> String {
        let opt = |v: Option<f64>, digits: usize| {
            v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
        };
        let [p50, p90, p99, p999, max] = self.latency_us;
        format!(
            "{} {:?} conns={} size={} | target {} msg/s achieved {:.0} | server {} µs/msg {} µs/frame \
             (cpu {} s) | latency µs p50 {p50:.0} p90 {p90:.0} p99 {p99:.0} p99.9 {p999:.0} max {max:.0} \
             | lost {}/{} | client cpu {}% send-lag p99 {:.0} µs | other cpu {}%",
            self.label,
            self.transport,
            self.connections,
            self.size,
            self.rate_target,
            self.achieved,
            opt(self.server_us_per_msg, 2),
            opt(self.server_us_per_frame, 2),
            opt(self.server_cpu_s, 2),
            self.lost,
            self.sent,
            opt(self.client_cpu_pct, 0),
            self.send_lag_p99_us,
            opt(self.other_cpu_pct, 0),
        )
    }

    fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.send_lag_p99_us > BEHIND_WARN.as_secs_f64() * 1e6 {
            w.push(format!(
                "client behind schedule: send-lag p99 {:.0} µs, max {:.0} µs (latency includes it)",
                self.send_lag_p99_us, self.send_lag_max_us
            ));
        }
        if self.achieved < self.rate_target as f64 * ACHIEVED_WARN_SHARE {
            w.push(format!(
                "achieved {:.0} msg/s of {} targeted",
                self.achieved, self.rate_target
            ));
        }
        if self.client_cpu_pct.is_some_and(|p| p > 90.0) {
            w.push("client CPU above 90%: the client may be the bottleneck".to_owned());
        }
        if self.other_cpu_pct.is_some_and(|p| p > OTHER_CPU_WARN_PCT) {
            w.push(format!(
                "other processes used {:.0}% of a core during the window: CPU figures are noisy",
                self.other_cpu_pct.unwrap_or(0.0)
            ));
        }
        if self.transport == Transport::Udp && self.udp_rcvbuf_drops.is_some_and(|d| d > 0) {
            w.push(format!(
                "the kernel dropped {} datagrams for full receive buffers during the window",
                self.udp_rcvbuf_drops.unwrap_or(0)
            ));
        }
        if self.transport == Transport::Tcp && self.tcp_retrans.is_some_and(|r| r > 0) {
            w.push(format!(
                "TCP retransmitted {} segments during the window: loopback loses nothing, so these \
                 are tail-loss probes after a stall of tens of ms somewhere (see the p99)",
                self.tcp_retrans.unwrap_or(0)
            ));
        }
        if self.missed_timers > 0 {
            w.push(format!(
                "the send timer failed to wake the client {} times (worst {:.1} ms late)",
                self.missed_timers, self.missed_timer_max_ms
            ));
        }
        if self.server_cpu_s.is_none() {
            w.push("no server CPU figures (give --server-pid)".to_owned());
        }
        if self.closed > 0 || self.unexpected > 0 || self.duplicates > 0 {
            w.push(format!(
                "{} connections closed, {} unexpected and {} duplicate echoes",
                self.closed, self.unexpected, self.duplicates
            ));
        }
        w
    }

    fn json(&self) -> serde_json::Value {
        let [p50, p90, p99, p999, max] = self.latency_us;
        serde_json::json!({
            "server": self.label,
            "transport": format!("{:?}", self.transport).to_lowercase(),
            "connections": self.connections,
            "size": self.size,
            "frames_per_message": FRAMES_PER_MESSAGE,
            "rate_target": self.rate_target,
            "window_s": self.window_s,
            "achieved": self.achieved,
            "server_cpu_s": self.server_cpu_s,
            "server_us_per_msg": self.server_us_per_msg,
            "server_us_per_frame": self.server_us_per_frame,
            "client_cpu_pct": self.client_cpu_pct,
            "other_cpu_pct": self.other_cpu_pct,
            "udp_rcvbuf_drops": self.udp_rcvbuf_drops,
            "tcp_retrans": self.tcp_retrans,
            "latency_us": {
                "p50": p50, "p90": p90, "p99": p99, "p99_9": p999, "max": max,
                "mean": self.latency_mean_us, "count": self.latency_count,
            },
            "send_lag_us": { "p99": self.send_lag_p99_us, "max": self.send_lag_max_us },
            "sent": self.sent,
            "lost": self.lost,
            "dropped": self.dropped,
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "closed": self.closed,
            "missed_timers": self.missed_timers,
            "warnings": self.warnings(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imedge_benches::echo::wire::LEN_PREFIX;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn second_echo_completes_a_message() {
        let mut stats = Stats::new(4, (100, 200)).unwrap();
        let mut body = Vec::new();
        put_body(Stamp::new(1, 0, 150), 32, &mut body);
        stats.on_echo(&body, 160);
        assert_eq!((stats.completed, stats.frames_in_window), (0, 1));
        body.clear();
        put_body(Stamp::new(1, 1, 150), 32, &mut body);
        stats.on_echo(&body, 2_150);
        // Completed after the window: counted as done, latency recorded (it was due inside),
        // but not in the window's throughput.
        assert_eq!((stats.completed, stats.completed_in_window), (1, 0));
        assert_eq!(stats.latency.len(), 1);
        stats.on_echo(&body, 2_200);
        assert_eq!(stats.duplicates, 1);
        stats.on_echo(&[1, 2, 3], 160);
        body.clear();
        put_body(Stamp::new(9, 0, 150), 32, &mut body);
        stats.on_echo(&body, 160);
        assert_eq!(stats.unexpected, 2);
    }

    #[test]
    fn frame_prefix_is_what_the_servers_expect() {
        let mut out = Vec::new();
        put_frame(Stamp::new(0, 0, 0), 100, &mut out);
        assert_eq!(out.get(..LEN_PREFIX), Some(&[0, 0, 0, 100][..]));
    }
}
