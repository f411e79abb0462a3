//! The open-loop send schedule: message `k` is due at `start + k / rate`, whatever happened to
//! earlier messages, and goes to connection `k mod n` (round-robin). A client that falls behind
//! sends the late messages at once and keeps their intended times, so latency measured from the
//! intended time includes every stall (no coordinated omission).

const NANOS_PER_S: u128 = 1_000_000_000;

/// Intended send times of messages `0..limit` at `rate` messages per second.
#[derive(Debug, Clone)]
pub struct Schedule {
    start_ns: u64,
    rate: u64,
    next: u64,
    limit: u64,
}

impl Schedule {
    /// A schedule of `limit` messages at `rate` per second (at least 1) from `start_ns`.
    pub fn new(start_ns: u64, rate: u64, limit: u64) -> Self {
        Self {
            start_ns,
            rate: rate.max(1),
            next: 0,
            limit,
        }
    }

    /// Messages needed to cover `span_ns` at `rate` (rounded up).
    pub fn messages_in(rate: u64, span_ns: u64) -> u64 {
        let n = (u128::from(span_ns) * u128::from(rate)).div_ceil(NANOS_PER_S);
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// When message `k` is due.
    pub fn intended(&self, k: u64) -> u64 {
        let offset = u128::from(k) * NANOS_PER_S / u128::from(self.rate);
        self.start_ns
            .saturating_add(u64::try_from(offset).unwrap_or(u64::MAX))
    }

    /// The intended time of the next message, if any is left.
    pub fn next_due(&self) -> Option<u64> {
        (self.next < self.limit).then(|| self.intended(self.next))
    }

    /// The next message due at or before `now_ns`, with its intended time.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<(u64, u64)> {
        let due = self.next_due().filter(|&t| t <= now_ns)?;
        let k = self.next;
        self.next += 1;
        Some((k, due))
    }

    /// Messages handed out so far.
    pub fn taken(&self) -> u64 {
        self.next
    }
}

/// The connection message `k` goes to: round-robin over `connections` (at least 1).
pub fn connection_of(k: u64, connections: usize) -> usize {
    let n = u64::try_from(connections.max(1)).unwrap_or(u64::MAX);
    usize::try_from(k % n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_times_follow_the_rate() {
        let s = Schedule::new(1_000, 40_000, 10);
        assert_eq!(s.intended(0), 1_000);
        assert_eq!(s.intended(1), 1_000 + 25_000);
        assert_eq!(s.intended(4), 1_000 + 100_000);
    }

    #[test]
    fn late_pops_keep_intended_times() {
        let mut s = Schedule::new(0, 1_000, 5);
        assert_eq!(s.pop_due(0), Some((0, 0)));
        assert_eq!(s.pop_due(999_999), None);
        // 3.5 ms late: messages 1..=3 all come out at once with their own due times.
        assert_eq!(s.pop_due(3_500_000), Some((1, 1_000_000)));
        assert_eq!(s.pop_due(3_500_000), Some((2, 2_000_000)));
        assert_eq!(s.pop_due(3_500_000), Some((3, 3_000_000)));
        assert_eq!(s.pop_due(3_500_000), None);
        assert_eq!(s.pop_due(u64::MAX), Some((4, 4_000_000)));
        assert_eq!(s.pop_due(u64::MAX), None);
        assert_eq!(s.next_due(), None);
        assert_eq!(s.taken(), 5);
    }

    #[test]
    fn counts_and_round_robin() {
        assert_eq!(Schedule::messages_in(5_000, 10_000_000_000), 50_000);
        assert_eq!(Schedule::messages_in(3, 500_000_000), 2);
        assert_eq!(connection_of(1_001, 1_000), 1);
        assert_eq!(connection_of(5, 0), 0);
    }
}
