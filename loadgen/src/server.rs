//! The server's side of the bill, when it runs on this machine (`--server-pid`): its CPU time
//! and resident memory from `/proc/<pid>`, sampled on every progress tick. CPU per message is
//! taken only over ticks that lie wholly inside the send phase of every worker, so logins,
//! warm-up and the drain do not dilute or inflate it.

use std::time::Instant;

use crate::clock;

/// One reading of the server's counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    cpu_ns: u64,
    delivered: u64,
    at: Instant,
    sending: bool,
}

/// Samples the server's `/proc` entries during a run.
#[derive(Debug)]
pub struct ServerProbe {
    pid: u32,
    prev: Option<Sample>,
    cpu_ns: u64,
    msgs: u64,
    secs: f64,
    rss_first_kb: Option<u64>,
    rss_last_kb: Option<u64>,
    rss_max_kb: u64,
    fds_max: u64,
}

/// What the server spent, as measured by [`ServerProbe`].
#[derive(Debug, Clone, PartialEq)]
pub struct ServerReport {
    /// The process measured.
    pub pid: u32,
    /// Seconds of the measured window (ticks wholly inside the send phase).
    pub window_s: f64,
    /// Messages delivered in the window.
    pub msgs: u64,
    /// Server CPU (user + system, all threads) per delivered message, µs.
    pub cpu_us_per_msg: f64,
    /// Server CPU in the window as a fraction of one core.
    pub cpu_core: f64,
    /// Resident memory at the first and last sample, and the largest seen, KiB.
    pub rss_first_kb: u64,
    /// See `rss_first_kb`.
    pub rss_last_kb: u64,
    /// See `rss_first_kb`.
    pub rss_max_kb: u64,
    /// Most open file descriptors seen.
    pub fds_max: u64,
}

impl ServerProbe {
    /// A probe of process `pid`; `None` if it cannot be read.
    pub fn new(pid: u32) -> Option<Self> {
        read_cpu_ns(pid)?;
        Some(Self::empty(pid))
    }

    fn empty(pid: u32) -> Self {
        Self {
            pid,
            prev: None,
            cpu_ns: 0,
            msgs: 0,
            secs: 0.0,
            rss_first_kb: None,
            rss_last_kb: None,
            rss_max_kb: 0,
            fds_max: 0,
        }
    }

    /// Takes a sample: `delivered` is the run's cumulative delivered count, `sending` whether
    /// every worker is in its send phase right now.
    pub fn sample(&mut self, delivered: u64, sending: bool) {
        let Some(cpu_ns) = read_cpu_ns(self.pid) else {
            // The server is gone: keep what was measured.
            self.prev = None;
            return;
        };
        self.record(Sample {
            cpu_ns,
            delivered,
            at: Instant::now(),
            sending,
        });
        if let Some(rss) = read_rss_kb(self.pid) {
            self.rss_first_kb.get_or_insert(rss);
            self.rss_last_kb = Some(rss);
            self.rss_max_kb = self.rss_max_kb.max(rss);
        }
        if let Some(fds) = count_fds(self.pid) {
            self.fds_max = self.fds_max.max(fds);
        }
    }

    /// Counts the interval since the previous sample if both ends lie in the send phase.
    fn record(&mut self, now: Sample) {
        if let Some(prev) = self.prev.filter(|p| p.sending && now.sending) {
            self.add(prev, now);
        }
        self.prev = Some(now);
    }

    fn add(&mut self, from: Sample, to: Sample) {
        self.cpu_ns += to.cpu_ns.saturating_sub(from.cpu_ns);
        self.msgs += to.delivered.saturating_sub(from.delivered);
        self.secs += to.at.saturating_duration_since(from.at).as_secs_f64();
    }

    /// The figures, once the run is over.
    pub fn finish(self) -> ServerReport {
        let cpu_s = self.cpu_ns as f64 / 1e9;
        ServerReport {
            pid: self.pid,
            window_s: self.secs,
            msgs: self.msgs,
            cpu_us_per_msg: if self.msgs > 0 {
                cpu_s * 1e6 / self.msgs as f64
            } else {
                0.0
            },
            cpu_core: if self.secs > 0.0 {
                cpu_s / self.secs
            } else {
                0.0
            },
            rss_first_kb: self.rss_first_kb.unwrap_or(0),
            rss_last_kb: self.rss_last_kb.unwrap_or(0),
            rss_max_kb: self.rss_max_kb,
            fds_max: self.fds_max,
        }
    }
}

fn read_cpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    clock::cpu_ns_from_stat(&stat, clock::clock_ticks())
}

fn read_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    rss_kb_from_status(&status)
}

/// `VmRSS` of a `/proc/<pid>/status` text, in KiB.
pub fn rss_kb_from_status(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

fn count_fds(pid: u32) -> Option<u64> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(entries.count() as u64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rss_is_read_from_status() {
        let status = "Name:\timedge\nVmPeak:\t  100 kB\nVmRSS:\t   20188 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(rss_kb_from_status(status), Some(20188));
        assert_eq!(rss_kb_from_status("Name: x\n"), None);
    }

    #[test]
    fn only_intervals_inside_the_send_phase_count() {
        let mut probe = ServerProbe::empty(0);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let samples = [
            // (cpu ms, delivered, second, sending)
            (500, 0, 0, false),    // logins: not counted
            (900, 1_000, 1, true), // login → send: not counted
            (1_400, 6_000, 2, true),
            (1_900, 11_000, 3, true),
            (2_000, 11_500, 4, false), // drain: not counted
        ];
        for (cpu_ms, delivered, s, sending) in samples {
            probe.record(Sample {
                cpu_ns: cpu_ms * 1_000_000,
                delivered,
                at: at(s),
                sending,
            });
        }
        let report = probe.finish();
        assert_eq!(report.msgs, 10_000);
        assert!((report.window_s - 2.0).abs() < 1e-9);
        // 1000 ms of CPU for 10,000 messages: 100 µs each; half a core.
        assert!((report.cpu_us_per_msg - 100.0).abs() < 1e-9);
        assert!((report.cpu_core - 0.5).abs() < 1e-9);
    }
}
