//! What a worker reports to the parent: a [`Snapshot`] every second (cumulative counters and the
//! latencies of the last interval) and a final one (with the whole run's histograms). Snapshots
//! are JSON lines on a worker process's stdout, or values on a channel for in-process workers;
//! histograms travel as base64 of hdrhistogram's V2 serialization.

use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::counters::Counters;

/// Highest latency recorded, in microseconds: 10 minutes, far beyond any run's grace period;
/// longer values are clamped to it.
pub const LATENCY_MAX_US: u64 = 600_000_000;
/// Significant figures of every histogram (HdrHistogram's customary 3: 0.1 % resolution).
pub const SIGFIG: u8 = 3;

/// An empty latency histogram (µs).
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low ≥ 1, high ≥ 2·low, sigfig ≤ 5).
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, LATENCY_MAX_US, SIGFIG).expect("valid histogram bounds")
}

/// Records nanoseconds as microseconds (at least 1), clamped to the histogram's range.
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record((ns / 1000).max(1));
}

/// Base64 of the V2 serialization of `h`.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    if V2Serializer::new().serialize(h, &mut buf).is_err() {
        return String::new();
    }
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// The histogram of [`encode_histogram`]'s text; an empty one for empty or invalid text.
pub fn decode_histogram(text: &str) -> Histogram<u64> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .and_then(|bytes| {
            Deserializer::new()
                .deserialize::<u64, _>(&mut bytes.as_slice())
                .ok()
        });
    let mut out = histogram();
    if let Some(h) = decoded {
        let _ = out.add(&h);
    }
    out
}

/// Login and connection counts of a worker.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logins {
    /// First logins accepted.
    pub ok: u64,
    /// Login refusals (response code ≠ 0).
    pub failed: u64,
    /// Clients never logged in by the end of the login phase.
    pub timed_out: u64,
    /// Re-logins accepted after the storm.
    pub relogins_ok: u64,
    /// Clients dropped by the storm.
    pub stormed: u64,
    /// Connection attempts that failed (refused, reset, upgrade refused).
    pub connect_errors: u64,
    /// Links lost after login (closed by the server, keep-alive timeout), storm excluded.
    pub link_lost: u64,
    /// Kickouts received.
    pub kicked: u64,
    /// Error responses (type 52) received.
    pub server_errors: u64,
    /// Clients logged in at the time of the snapshot.
    pub logged_in_now: u64,
    /// Monotonic time of the first login attempt (0: none yet).
    pub first_attempt_ns: u64,
    /// Monotonic time of the last first-login accepted (0: none yet).
    pub last_ok_ns: u64,
}

impl Logins {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &Logins) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.timed_out += o.timed_out;
        self.relogins_ok += o.relogins_ok;
        self.stormed += o.stormed;
        self.connect_errors += o.connect_errors;
        self.link_lost += o.link_lost;
        self.kicked += o.kicked;
        self.server_errors += o.server_errors;
        self.logged_in_now += o.logged_in_now;
        self.first_attempt_ns = match (self.first_attempt_ns, o.first_attempt_ns) {
            (0, t) | (t, 0) => t,
            (a, b) => a.min(b),
        };
        self.last_ok_ns = self.last_ok_ns.max(o.last_ok_ns);
    }

    /// First logins accepted per second, from the first attempt to the last acceptance (the
    /// login phase as the server saw it; paced by `--login-rate`, so set that high to measure
    /// a burst).
    pub fn per_second(&self) -> f64 {
        let span = self.last_ok_ns.saturating_sub(self.first_attempt_ns);
        if self.ok == 0 || span == 0 || self.first_attempt_ns == 0 {
            return 0.0;
        }
        self.ok as f64 / (span as f64 / 1e9)
    }
}

/// One report of one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Worker index.
    pub worker: usize,
    /// The last snapshot of the worker, with whole-run histograms.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Phase the worker is in (`login`, `send`, `drain`, …).
    pub phase: String,
    /// Clients of the worker.
    pub clients: usize,
    /// Cumulative counters by sender transport (`[tcp, udp, ws]`); `lost` is set in the final one.
    pub counters: [Counters; 3],
    /// Logins and connections.
    pub logins: Logins,
    /// Latencies recorded since the previous snapshot, all transports.
    pub interval_latency: String,
    /// Whole-run latencies by sender transport (final snapshot only).
    pub latency: [String; 3],
    /// Whole-run login latencies (final snapshot only).
    pub login_latency: String,
    /// Whole-run storm re-login latencies (final snapshot only).
    pub relogin_latency: String,
    /// CPU time (user + system) of the worker's loop thread so far.
    pub cpu_ns: u64,
    /// Monotonic time of the snapshot.
    pub at_ns: u64,
    /// Monotonic time the worker started.
    pub started_ns: u64,
    /// Monotonic time the send phase started (0 before).
    pub send_start_ns: u64,
    /// Monotonic time the send phase ended (0 before).
    pub send_end_ns: u64,
    /// Largest delay of a send behind its intended time.
    pub max_lag_ns: u64,
    /// Why the worker stopped early, if it did.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_rate_spans_all_workers() {
        let a = Logins {
            ok: 1000,
            first_attempt_ns: 2_000_000_000,
            last_ok_ns: 2_400_000_000,
            ..Logins::default()
        };
        let b = Logins {
            ok: 1000,
            first_attempt_ns: 1_900_000_000,
            last_ok_ns: 2_900_000_000,
            ..Logins::default()
        };
        let mut total = Logins::default();
        total.add(&a);
        total.add(&b);
        assert_eq!(total.first_attempt_ns, 1_900_000_000);
        assert_eq!(total.last_ok_ns, 2_900_000_000);
        // 2000 logins in one second.
        assert!((total.per_second() - 2000.0).abs() < 1e-6);
        assert_eq!(Logins::default().per_second(), 0.0);
    }

    #[test]
    fn histograms_round_trip() {
        let mut h = histogram();
        record_ns(&mut h, 150_000);
        record_ns(&mut h, 10);
        record_ns(&mut h, u64::MAX);
        let back = decode_histogram(&encode_histogram(&h));
        assert_eq!(back.len(), 3);
        assert_eq!(back.min(), 1);
        assert!(back.max() >= LATENCY_MAX_US);
        assert_eq!(decode_histogram("not base64!").len(), 0);
    }

    #[test]
    fn snapshot_json_round_trip() {
        let s = Snapshot {
            worker: 1,
            is_final: true,
            ..Snapshot::default()
        };
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"final\":true"));
        let back: Snapshot = serde_json::from_str(&text).unwrap();
        assert_eq!(back.worker, 1);
    }
}
