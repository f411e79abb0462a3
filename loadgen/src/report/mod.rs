//! The merged result of a run: [`Report::build`] from the workers' final snapshots, and its
//! renderings — [`table`] (human), [`json`] (`--json`), [`html`] (`--report`, with SVG charts)
//! and the HdrHistogram interval log (`--hdr-log`).

pub mod html;
pub mod json;
pub mod table;

use std::io::Write;
use std::time::{Duration, SystemTime};

use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::Histogram;

use crate::config::Config;
use crate::counters::Counters;
use crate::stats::{self, Logins, Snapshot};
use crate::worker::LATE_WARN_FRACTION;

/// A worker using more than this fraction of a core is the bottleneck it measures.
pub const SATURATION_CPU: f64 = 0.9;

/// One second of the run, as the parent saw it.
#[derive(Debug, Clone, Default)]
pub struct Tick {
    /// Seconds since the start.
    pub t_s: f64,
    /// Messages sent per second in the tick.
    pub sent_per_s: f64,
    /// Messages delivered per second in the tick.
    pub delivered_per_s: f64,
    /// Median latency of the tick (µs).
    pub p50_us: u64,
    /// 99th percentile latency of the tick (µs).
    pub p99_us: u64,
    /// Largest latency of the tick (µs).
    pub max_us: u64,
    /// Cumulative errors (unsent, QoS lost, connection errors, login refusals).
    pub errors: u64,
    /// Clients logged in.
    pub logged_in: u64,
    /// Phase of the last worker heard from.
    pub phase: String,
}

/// Counters and latencies of one transport (or all).
#[derive(Debug, Clone)]
pub struct TransportReport {
    /// Counts, with `lost` settled.
    pub counters: Counters,
    /// Delivery latency (C2C: receive − intended send; C2S: ACK − intended send), µs.
    pub latency: Histogram<u64>,
    /// Clients on this transport.
    pub clients: usize,
}

/// The loadgen's own CPU use.
#[derive(Debug, Clone, Default)]
pub struct Cpu {
    /// CPU seconds of all worker loops.
    pub total_s: f64,
    /// Busiest worker's CPU as a fraction of one core over its lifetime.
    pub max_worker_core: f64,
    /// All workers' CPU as a fraction of one core.
    pub total_core: f64,
    /// CPU microseconds per message sent or delivered.
    pub us_per_msg: f64,
}

/// The merged result of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The configuration that ran.
    pub config: Config,
    /// Workers used.
    pub workers: usize,
    /// All transports together.
    pub totals: TransportReport,
    /// By sender transport: tcp, udp, ws.
    pub transports: [TransportReport; 3],
    /// Logins and connections.
    pub logins: Logins,
    /// Login latency (connect start → login response), µs.
    pub login_latency: Histogram<u64>,
    /// Storm re-login latency (mass disconnect → login response), µs.
    pub relogin_latency: Histogram<u64>,
    /// Seconds of the send phase (longest worker).
    pub send_s: f64,
    /// Seconds of the whole run.
    pub elapsed_s: f64,
    /// Largest delay of a send behind its intended time, µs.
    pub max_lag_us: u64,
    /// The loadgen's CPU.
    pub cpu: Cpu,
    /// Per-second samples.
    pub timeline: Vec<Tick>,
    /// Interval histograms (start offset, length, latencies) for the interval log.
    pub intervals: Vec<(Duration, Duration, Histogram<u64>)>,
    /// Things the reader must know (saturation, failed workers).
    pub warnings: Vec<String>,
    /// The server's CPU and memory, when `--server-pid` named it.
    pub server: Option<crate::server::ServerReport>,
}

impl Report {
    /// Merges the workers' final snapshots.
    pub fn build(
        config: &Config,
        finals: &[Snapshot],
        timeline: Vec<Tick>,
        intervals: Vec<(Duration, Duration, Histogram<u64>)>,
        start_ns: u64,
    ) -> Self {
        let transports_of = crate::plan::transports(config.clients, config.weights);
        let mut transports: [TransportReport; 3] = std::array::from_fn(|t| TransportReport {
            counters: Counters::default(),
            latency: stats::histogram(),
            clients: transports_of
                .iter()
                .filter(|&&x| crate::plan::transport_index(x) == t)
                .count(),
        });
        let mut logins = Logins::default();
        let mut login_latency = stats::histogram();
        let mut relogin_latency = stats::histogram();
        let mut warnings = Vec::new();
        let mut cpu = Cpu::default();
        let mut send_s: f64 = 0.0;
        let mut max_lag_ns = 0;
        let mut end_ns = start_ns;
        for s in finals {
            for (t, report) in transports.iter_mut().enumerate() {
                if let Some(c) = s.counters.get(t) {
                    report.counters.add(c);
                }
                if let Some(h) = s.latency.get(t) {
                    let _ = report.latency.add(stats::decode_histogram(h));
                }
            }
            logins.add(&s.logins);
            let _ = login_latency.add(stats::decode_histogram(&s.login_latency));
            let _ = relogin_latency.add(stats::decode_histogram(&s.relogin_latency));
            if s.send_start_ns > 0 && s.send_end_ns >= s.send_start_ns {
                send_s = send_s.max((s.send_end_ns - s.send_start_ns) as f64 / 1e9);
            }
            max_lag_ns = max_lag_ns.max(s.max_lag_ns);
            end_ns = end_ns.max(s.at_ns);
            let life = s.at_ns.saturating_sub(s.started_ns) as f64 / 1e9;
            let used = s.cpu_ns as f64 / 1e9;
            cpu.total_s += used;
            if life > 0.0 {
                cpu.max_worker_core = cpu.max_worker_core.max(used / life);
            }
            if let Some(e) = &s.error {
                warnings.push(format!("worker {}: {e}", s.worker));
            }
        }
        let mut totals = TransportReport {
            counters: Counters::default(),
            latency: stats::histogram(),
            clients: config.clients,
        };
        for t in &transports {
            totals.counters.add(&t.counters);
            let _ = totals.latency.add(&t.latency);
        }
        let elapsed_s = end_ns.saturating_sub(start_ns) as f64 / 1e9;
        if elapsed_s > 0.0 {
            cpu.total_core = cpu.total_s / elapsed_s;
        }
        let msgs = totals.counters.sent + totals.counters.delivered;
        if msgs > 0 {
            cpu.us_per_msg = cpu.total_s * 1e6 / msgs as f64;
        }
        if cpu.max_worker_core > SATURATION_CPU {
            warnings.push(format!(
                "loadgen saturated: a worker used {:.0}% of a core (limit {:.0}%); add --workers",
                cpu.max_worker_core * 100.0,
                SATURATION_CPU * 100.0
            ));
        }
        let c = &totals.counters;
        if c.sent > 0 && c.late as f64 / c.sent as f64 > LATE_WARN_FRACTION {
            warnings.push(format!(
                "schedule fell behind: {} of {} sends were over {} ms late (max {:.1} ms); latencies include that wait",
                c.late,
                c.sent,
                crate::worker::LATE_THRESHOLD.as_millis(),
                max_lag_ns as f64 / 1e6
            ));
        }
        Self {
            config: config.clone(),
            workers: finals.len(),
            totals,
            transports,
            logins,
            login_latency,
            relogin_latency,
            send_s,
            elapsed_s,
            max_lag_us: max_lag_ns / 1000,
            cpu,
            timeline,
            intervals,
            warnings,
            server: None,
        }
    }

    /// Messages per second delivered during the send phase.
    pub fn msgs_per_s(&self, counters: &Counters) -> f64 {
        if self.send_s > 0.0 {
            counters.delivered as f64 / self.send_s
        } else {
            0.0
        }
    }

    /// Loss as `--max-loss` counts it: lost plus unsent, out of sent plus unsent.
    pub fn loss(&self) -> (u64, u64) {
        let c = &self.totals.counters;
        (c.lost + c.unsent, c.sent + c.unsent)
    }

    /// 0 when the run met its limits; 1 when loss exceeds `--max-loss` or no client logged in.
    pub fn exit_code(&self) -> i32 {
        let (lost, due) = self.loss();
        let no_logins = self.config.clients > 0 && self.logins.ok == 0;
        if self.config.max_loss.exceeded(lost, due) || no_logins {
            1
        } else {
            0
        }
    }

    /// Writes the interval histograms as an HdrHistogram interval log.
    ///
    /// # Errors
    /// Writing failed.
    pub fn write_hdr_log(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut serializer = V2Serializer::new();
        let mut builder = IntervalLogWriterBuilder::new();
        builder
            .add_comment("imedge-loadgen: delivery latency in microseconds")
            .with_base_time(SystemTime::now());
        let mut writer = builder.begin_log_with(out, &mut serializer)?;
        for (start, len, h) in &self.intervals {
            writer
                .write_histogram(h, *start, *len, None)
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        }
        Ok(())
    }
}

/// Percentiles of a latency histogram: p50, p90, p99, p99.9, max (µs).
pub fn percentiles(h: &Histogram<u64>) -> [u64; 5] {
    if h.is_empty() {
        return [0; 5];
    }
    [
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    ]
}
