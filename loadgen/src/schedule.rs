//! The open-loop schedule (wrk2's model): message `k` of a worker is *intended* at
//! `start + k / rate`, whatever happened to the messages before it. When the loop falls behind it
//! sends the overdue messages at once but keeps their intended times, so the latency measured
//! from the intended time includes the wait — a stalled server cannot hide its stall by slowing
//! the sender down (coordinated omission).
//!
//! Sans-IO: time comes in as monotonic nanoseconds; tested on a virtual clock.

/// Nanoseconds per second.
const NS_PER_S: f64 = 1e9;

/// One worker's share of the schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    start_ns: u64,
    /// Nanoseconds between two intended sends (1e9 / this worker's rate).
    period_ns: f64,
    /// Index of the next message.
    next: u64,
    /// Messages this worker may send in all (`--messages` share), if bounded.
    limit: Option<u64>,
}

impl Schedule {
    /// A schedule of `rate` messages per second from `start_ns`, of at most `limit` messages.
    pub fn new(start_ns: u64, rate: f64, limit: Option<u64>) -> Self {
        Self {
            start_ns,
            period_ns: NS_PER_S / rate.max(f64::MIN_POSITIVE),
            next: 0,
            limit,
        }
    }

    /// The intended time of the next message, `None` once the limit is reached.
    pub fn next_due(&self) -> Option<u64> {
        if self.limit.is_some_and(|limit| self.next >= limit) {
            return None;
        }
        Some(self.intended(self.next))
    }

    /// Takes the next message if it is due at `now_ns`: its intended time.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<u64> {
        let due = self.next_due().filter(|&due| due <= now_ns)?;
        self.next += 1;
        Some(due)
    }

    /// How far behind the schedule is at `now_ns` (0 when nothing is overdue).
    pub fn lag_ns(&self, now_ns: u64) -> u64 {
        self.next_due().map_or(0, |due| now_ns.saturating_sub(due))
    }

    /// Messages taken so far.
    pub fn taken(&self) -> u64 {
        self.next
    }

    fn intended(&self, k: u64) -> u64 {
        // f64 holds k·period exactly enough: 1e9 messages at 1 µs apart is 1e15 ns < 2^53.
        self.start_ns
            .saturating_add((k as f64 * self.period_ns) as u64)
    }
}

/// This worker's share of a total rate, by its share of the senders: a worker with a third of
/// the senders sends a third of the messages.
pub fn worker_rate(total_rate: f64, worker_senders: usize, all_senders: usize) -> f64 {
    if all_senders == 0 {
        return 0.0;
    }
    total_rate * worker_senders as f64 / all_senders as f64
}

/// This worker's share of a message budget: `total` split by sender share, the remainder going to
/// the first workers so the shares add up to exactly `total`.
pub fn worker_limit(total: u64, worker: usize, per_worker_senders: &[usize]) -> u64 {
    let all: u64 = per_worker_senders.iter().map(|&s| s as u64).sum();
    if all == 0 {
        return 0;
    }
    let shares: Vec<u64> = per_worker_senders
        .iter()
        .map(|&s| total * s as u64 / all)
        .collect();
    let mut rest = total - shares.iter().sum::<u64>();
    let mut mine = 0;
    for (i, (share, &senders)) in shares.iter().zip(per_worker_senders).enumerate() {
        let extra = u64::from(rest > 0 && senders > 0);
        rest -= extra;
        if i == worker {
            mine = share + extra;
        }
    }
    mine
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn intended_times_follow_the_rate() {
        // 1000 msg/s from t=10 ms: one message every millisecond.
        let mut s = Schedule::new(10 * MS, 1000.0, None);
        assert_eq!(s.pop_due(10 * MS - 1), None, "nothing before the start");
        assert_eq!(s.pop_due(10 * MS), Some(10 * MS));
        assert_eq!(s.pop_due(10 * MS), None);
        assert_eq!(s.next_due(), Some(11 * MS));
        assert_eq!(s.pop_due(11 * MS + 1), Some(11 * MS));
    }

    #[test]
    fn catch_up_keeps_intended_times() {
        // The loop stalls for 5 ms: the five overdue messages go at once, each stamped with its
        // own intended time, so the stall shows in their latency (coordinated omission).
        let mut s = Schedule::new(0, 1000.0, None);
        let now = 5 * MS;
        assert_eq!(s.lag_ns(now), 5 * MS);
        let burst: Vec<u64> = std::iter::from_fn(|| s.pop_due(now)).collect();
        assert_eq!(burst, vec![0, MS, 2 * MS, 3 * MS, 4 * MS, 5 * MS]);
        assert_eq!(s.lag_ns(now), 0);
        // The latency of message 0 received at 5.2 ms is 5.2 ms, not 0.2 ms.
        let received = now + MS / 5;
        assert_eq!(received - burst[0], 5 * MS + MS / 5);
    }

    #[test]
    fn limit_stops_the_schedule() {
        let mut s = Schedule::new(0, 1e6, Some(3));
        let sent: Vec<u64> = std::iter::from_fn(|| s.pop_due(u64::MAX / 2)).collect();
        assert_eq!(sent.len(), 3);
        assert_eq!(s.next_due(), None);
        assert_eq!(s.taken(), 3);
        assert_eq!(s.lag_ns(u64::MAX / 2), 0);
    }

    #[test]
    fn shares_add_up() {
        assert!((worker_rate(900.0, 100, 300) - 300.0).abs() < 1e-9);
        assert_eq!(worker_rate(900.0, 0, 0), 0.0);
        let senders = [10, 10, 10];
        let limits: Vec<u64> = (0..3).map(|w| worker_limit(100, w, &senders)).collect();
        assert_eq!(limits.iter().sum::<u64>(), 100);
        assert_eq!(limits, vec![34, 33, 33]);
        assert_eq!(worker_limit(5, 1, &[1, 0]), 0);
    }
}
