//! Running the workers — as threads of this process ([`run_in_process`], for tests and small
//! runs) or as child processes re-executing this binary ([`run_processes`], to get past the
//! per-process open-file limit) — and merging their snapshots into live progress and a
//! [`Report`].

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::clock;
use crate::config::{Config, Rate};
use crate::report::{Report, Tick};
use crate::server::ServerProbe;
use crate::stats::{self, Snapshot};
use crate::worker::{self, WorkerSpec, HARD_STOP_SLACK, LOGIN_SLACK, MAX_SEND_PHASE, STORM_SETTLE};

/// How often the merged progress is printed and the timeline sampled.
pub const TICK: Duration = Duration::from_secs(1);
/// Time given to the workers beyond their own hard stop before the parent gives up on them.
pub const PARENT_SLACK: Duration = Duration::from_secs(20);
/// Snapshots buffered between workers and the collector (a few seconds of progress).
const CHANNEL_BOUND: usize = 1024;

/// How the run is presented, and what else it measures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Print live progress on stderr (one line rewritten on a terminal, plain lines otherwise).
    pub progress: bool,
    /// Measure this local server process's CPU and memory (see [`crate::server`]).
    pub server_pid: Option<u32>,
}

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A worker thread or process could not be started.
    #[error("starting worker {worker}: {source}")]
    Spawn {
        /// Worker index.
        worker: usize,
        /// Cause.
        source: std::io::Error,
    },
}

/// The number of workers a configuration gets.
pub fn worker_count(config: &Config) -> usize {
    config
        .workers
        .unwrap_or_else(|| crate::plan::workers_needed(config.clients))
        .clamp(1, config.clients.max(1))
}

/// Runs the workers as threads of this process.
///
/// # Errors
/// A worker thread could not be spawned.
pub fn run_in_process(config: &Config, options: Options) -> Result<Report, RunError> {
    clock::raise_fd_limit();
    let config = &with_run_id(config);
    let count = worker_count(config);
    let (tx, rx) = mpsc::sync_channel::<Snapshot>(CHANNEL_BOUND);
    let mut handles = Vec::with_capacity(count);
    for index in 0..count {
        let tx = tx.clone();
        let config = config.clone();
        let handle = std::thread::Builder::new()
            .name(format!("loadgen-worker-{index}"))
            .spawn(move || {
                let mut sink = |s: Snapshot| tx.send(s).is_ok();
                if let Err(e) = worker::run(&config, WorkerSpec { index, count }, &mut sink) {
                    let _ = tx.send(failed_snapshot(index, &e.to_string()));
                }
            })
            .map_err(|source| RunError::Spawn {
                worker: index,
                source,
            })?;
        handles.push(handle);
    }
    drop(tx);
    let report = collect(config, count, &rx, options);
    drop(rx);
    for h in handles {
        let _ = h.join();
    }
    Ok(report)
}

/// Runs the workers as child processes of `exe` (this binary), which must serve
/// `exe --worker <index> <count>` with [`serve_worker`].
///
/// # Errors
/// A worker process could not be started.
pub fn run_processes(config: &Config, exe: &Path, options: Options) -> Result<Report, RunError> {
    let config = &with_run_id(config);
    let count = worker_count(config);
    let (tx, rx) = mpsc::sync_channel::<Snapshot>(CHANNEL_BOUND);
    let config_json = serde_json::to_string(config).unwrap_or_default();
    let mut children: Vec<Child> = Vec::with_capacity(count);
    let mut readers = Vec::with_capacity(count);
    for index in 0..count {
        let spawned = Command::new(exe)
            .arg("--worker")
            .arg(index.to_string())
            .arg(count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(source) => {
                for mut c in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(RunError::Spawn {
                    worker: index,
                    source,
                });
            }
        };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(config_json.as_bytes());
            let _ = stdin.write_all(b"\n");
        }
        if let Some(stdout) = child.stdout.take() {
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                let mut got_final = false;
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(s) = serde_json::from_str::<Snapshot>(&line) {
                        got_final |= s.is_final;
                        if tx.send(s).is_err() {
                            break;
                        }
                    }
                }
                if !got_final {
                    let _ = tx.send(failed_snapshot(
                        index,
                        "worker process ended without a result",
                    ));
                }
            }));
        }
        children.push(child);
    }
    drop(tx);
    let report = collect(config, count, &rx, options);
    drop(rx);
    for mut child in children {
        // Workers have reported their final snapshot or run past their deadline: either way
        // nothing more is expected of them.
        if !matches!(child.try_wait(), Ok(Some(_))) {
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
    for r in readers {
        let _ = r.join();
    }
    Ok(report)
}

/// The worker side of [`run_processes`]: reads the configuration (one JSON line) from stdin, runs
/// worker `index` of `count` and writes its snapshots to stdout as JSON lines.
///
/// # Errors
/// The configuration could not be read, or the worker could not start.
pub fn serve_worker(index: usize, count: usize) -> std::io::Result<()> {
    clock::raise_fd_limit();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let config: Config = serde_json::from_str(&line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let stdout = std::io::stdout();
    let mut sink = |s: Snapshot| {
        let mut out = stdout.lock();
        serde_json::to_writer(&mut out, &s).is_ok()
            && out.write_all(b"\n").is_ok()
            && out.flush().is_ok()
    };
    worker::run(&config, WorkerSpec { index, count }, &mut sink)
}

/// The configuration with a run id: the given one, or one derived from the clock and the process.
fn with_run_id(config: &Config) -> Config {
    let mut config = config.clone();
    if config.run_id == 0 {
        let mixed = clock::mono_ns() ^ (u64::from(std::process::id()) << 20);
        config.run_id = (mixed % u64::from(u32::MAX)) as u32 | 1;
    }
    config
}

fn failed_snapshot(worker: usize, error: &str) -> Snapshot {
    Snapshot {
        worker,
        is_final: true,
        phase: "failed".to_owned(),
        error: Some(error.to_owned()),
        ..Snapshot::default()
    }
}

/// How long the whole run may take before the parent stops waiting for workers.
fn run_deadline(config: &Config, workers: usize) -> Duration {
    let per_worker_clients = config.clients.div_ceil(workers.max(1)) as f64;
    let per_worker_rate = (config.login_rate / workers.max(1) as f64).max(1e-3);
    let login = Duration::from_secs_f64((per_worker_clients / per_worker_rate).min(86_400.0));
    let send = config.duration.unwrap_or(match config.rate {
        Rate::PerSecond(r) => {
            Duration::from_secs_f64(config.messages.unwrap_or(0) as f64 / r + 1.0)
        }
        Rate::Max => MAX_SEND_PHASE,
    });
    login + LOGIN_SLACK + STORM_SETTLE + send + config.grace + HARD_STOP_SLACK + PARENT_SLACK
}

/// Merges snapshots until every worker sent its final one (or the deadline passes).
fn collect(
    config: &Config,
    count: usize,
    rx: &mpsc::Receiver<Snapshot>,
    options: Options,
) -> Report {
    let start = Instant::now();
    let start_ns = clock::mono_ns();
    let deadline = start + run_deadline(config, count);
    let mut latest: Vec<Option<Snapshot>> = vec![None; count];
    let mut finals: Vec<Option<Snapshot>> = vec![None; count];
    let mut interval = stats::histogram();
    let mut intervals: Vec<(Duration, Duration, Histogram<u64>)> = Vec::new();
    let mut timeline: Vec<Tick> = Vec::new();
    let mut next_tick = start + TICK;
    let mut last_tick = start;
    let mut prev = (0u64, 0u64);
    let tty = std::io::stderr().is_terminal();
    let mut timed_out = false;
    let mut server = options.server_pid.and_then(ServerProbe::new);
    // Bounded by `deadline`: every wait below is at most one tick.
    while finals.iter().any(Option::is_none) {
        let now = Instant::now();
        if now >= deadline {
            timed_out = true;
            break;
        }
        let wait = next_tick.min(deadline).saturating_duration_since(now);
        match rx.recv_timeout(wait) {
            Ok(s) => {
                let _ = interval.add(stats::decode_histogram(&s.interval_latency));
                let w = s.worker;
                if s.is_final {
                    if let Some(slot) = finals.get_mut(w) {
                        *slot = Some(s.clone());
                    }
                }
                if let Some(slot) = latest.get_mut(w) {
                    *slot = Some(s);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        if now >= next_tick {
            let tick = make_tick(&latest, &interval, start, last_tick, now, &mut prev);
            if let Some(server) = &mut server {
                server.sample(prev.1, all_sending(&latest));
            }
            if options.progress {
                print_progress(&tick, &latest, tty);
            }
            intervals.push((
                last_tick.duration_since(start),
                now.duration_since(last_tick),
                std::mem::replace(&mut interval, stats::histogram()),
            ));
            timeline.push(tick);
            last_tick = now;
            next_tick = now + TICK;
        }
    }
    if !interval.is_empty() {
        let now = Instant::now();
        intervals.push((
            last_tick.duration_since(start),
            now.duration_since(last_tick),
            interval,
        ));
    }
    if options.progress && tty {
        eprintln!();
    }
    let snapshots: Vec<Snapshot> = finals
        .into_iter()
        .zip(latest)
        .enumerate()
        .map(|(w, (f, l))| {
            f.or(l)
                .unwrap_or_else(|| failed_snapshot(w, "no report from worker"))
        })
        .collect();
    let mut report = Report::build(config, &snapshots, timeline, intervals, start_ns);
    report.server = server.map(ServerProbe::finish);
    if timed_out {
        report
            .warnings
            .push("some workers did not finish before the run deadline".to_owned());
    }
    report
}

/// Whether every worker has reported, and each is in its send phase.
fn all_sending(latest: &[Option<Snapshot>]) -> bool {
    latest.iter().all(|s| {
        s.as_ref()
            .is_some_and(|s| s.send_start_ns != 0 && s.send_end_ns == 0 && !s.is_final)
    })
}

fn make_tick(
    latest: &[Option<Snapshot>],
    interval: &Histogram<u64>,
    start: Instant,
    last: Instant,
    now: Instant,
    prev: &mut (u64, u64),
) -> Tick {
    let mut sent = 0;
    let mut delivered = 0;
    let mut errors = 0;
    let mut logged_in = 0;
    let mut phase = String::new();
    for s in latest.iter().flatten() {
        for c in &s.counters {
            sent += c.sent;
            delivered += c.delivered;
            errors += c.unsent + c.qos_lost;
        }
        errors += s.logins.connect_errors + s.logins.failed;
        logged_in += s.logins.logged_in_now;
        phase.clone_from(&s.phase);
    }
    let secs = now.duration_since(last).as_secs_f64().max(1e-3);
    let tick = Tick {
        t_s: now.duration_since(start).as_secs_f64(),
        sent_per_s: sent.saturating_sub(prev.0) as f64 / secs,
        delivered_per_s: delivered.saturating_sub(prev.1) as f64 / secs,
        p50_us: interval.value_at_quantile(0.5),
        p99_us: interval.value_at_quantile(0.99),
        max_us: interval.max(),
        errors,
        logged_in,
        phase,
    };
    *prev = (sent, delivered);
    tick
}

fn print_progress(tick: &Tick, latest: &[Option<Snapshot>], tty: bool) {
    let delivered: u64 = latest
        .iter()
        .flatten()
        .flat_map(|s| s.counters.iter())
        .map(|c| c.delivered)
        .sum();
    let line = format!(
        "[{:>6.1}s] {:<6} online {:>6}  sent {:>8.0}/s  delivered {:>8.0}/s ({})  p50 {:>7} µs  p99 {:>7} µs  errors {}",
        tick.t_s,
        tick.phase,
        tick.logged_in,
        tick.sent_per_s,
        tick.delivered_per_s,
        delivered,
        tick.p50_us,
        tick.p99_us,
        tick.errors
    );
    if tty {
        eprint!("\r\x1b[2K{line}");
    } else {
        eprintln!("{line}");
    }
}
