//! The de-duplication window of a QoS receiver (SPEC §8.5): keys of messages seen recently.
//!
//! A receiver ACKs every QoS message, duplicate or not, but passes only fresh ones to the
//! application. The reference keeps `fp → time of last sighting` for 10–15 minutes (a sweep every
//! 5 min drops entries older than 10 min), with no bound: at a few thousand messages per second
//! that is hundreds of megabytes of fingerprints that no sender will ever resend.
//!
//! [`QosReceiver`] keeps compact [`QosKey`]s (16 bytes, no allocation) in *time buckets*: the
//! window is cut into `buckets` spans; a sighting goes into the newest bucket (a duplicate is moved
//! there, which refreshes it like the reference's new time of last sighting); a whole bucket is
//! dropped once its newest possible sighting is `window` old. A key is thus remembered for at least
//! `window` after its last sighting and at most `window + window / buckets`.
//!
//! # How long the window must be
//! A duplicate exists only while a sender may still send a copy. A copy can arrive until the
//! sender's resend table gives the message up ([`QosSenderConfig::holding_time`]), plus the time
//! the copy spends in transit (queues, a re-login in between): [`QosReceiverConfig::covering`].
//! Past that, no copy can come, and remembering the key is wasted memory.
//!
//! The table is also bounded in bytes (`max_bytes`): past it the *oldest* bucket is forgotten
//! early (counted in [`ReceiverStats::evicted_buckets`]) — a late duplicate of one of its messages
//! would be delivered again, the least harmful outcome.
//!
//! [`QosSenderConfig::holding_time`]: super::QosSenderConfig::holding_time

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::key::{KeyBuildHasher, QosKey};
use super::sender::{CLIENT_CHECK_INTERVAL, CLIENT_GRACE, CLIENT_MAX_RESENDS};
use super::sender::{SERVER_CHECK_INTERVAL, SERVER_GRACE, SERVER_MAX_RESENDS};

/// Time a copy of a message may spend between its sender's write and our read, on top of the
/// sender's resend schedule: kernel and proxy queues, a congested mobile link, a re-login in the
/// middle (the SDK's resend timer keeps running while its link is down and resends the rest at
/// the next login, SPEC §8.3/§6.4). Generous on purpose: each second costs only memory.
pub const TRANSIT_MARGIN: Duration = Duration::from_secs(20);

/// Buckets per window: a key outlives `window` by at most `window / buckets` (12.5 %), and a
/// lookup probes at most `buckets + 1` sets.
pub const BUCKETS: usize = 8;

/// Server window (C2S and C2C from clients): the Java SDK gives a message up at most
/// `grace + (resends + 1)·check_interval` = 3 + 3·5 = 18 s after its first send (SPEC §8.3;
/// observed 15.0 s), and sends its last copy before that. Plus [`TRANSIT_MARGIN`]: 38 s — against
/// the reference's 10–15 min, which only kept memory busy.
pub const SERVER_WINDOW: Duration = covering_const(
    holding(CLIENT_GRACE, CLIENT_CHECK_INTERVAL, CLIENT_MAX_RESENDS),
    TRANSIT_MARGIN,
);

/// Server byte budget, per table: at the measured 22–36 bytes per key, 64 MiB hold about two
/// million keys, i.e. ~50 000 fresh QoS messages per second per core over the 38-s window.
pub const SERVER_MAX_BYTES: usize = 64 << 20;

/// Client window (messages from the server): the server gives up a message at most
/// `2 + 2·5` = 12 s after its first write (SPEC §8.4); when the recipient is still online, imedge
/// then stores the message and delivers it again, one more such cycle: 24 s. Plus
/// [`TRANSIT_MARGIN`], 44 s, rounded up to 58 s so a server run with a couple more resends
/// (`--qos-resends`) is still covered. Memory is no concern on a client.
pub const CLIENT_WINDOW: Duration = Duration::from_secs(58);

/// Client byte budget: ~30 000 keys, far more than a chat client receives in a minute.
pub const CLIENT_MAX_BYTES: usize = 1 << 20;

/// Smallest bucket span accepted: a zero span would make every instant a new bucket.
pub const MIN_BUCKET_SPAN: Duration = Duration::from_millis(1);

/// Bytes a hash-set slot of one key costs: the key and hashbrown's control byte.
const SLOT_BYTES: usize = size_of::<QosKey>() + 1;

/// Timing and size of a de-duplication window. No `Default`: pick [`Self::SERVER`] or
/// [`Self::CLIENT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QosReceiverConfig {
    /// A key is remembered at least this long after its last sighting.
    pub window: Duration,
    /// Number of time buckets the window is cut into (at least 1).
    pub buckets: usize,
    /// Most bytes the table holds; past it the oldest bucket is dropped early.
    pub max_bytes: usize,
}

impl QosReceiverConfig {
    /// The server's window for messages from clients (see [`SERVER_WINDOW`]).
    pub const SERVER: Self = Self {
        window: SERVER_WINDOW,
        buckets: BUCKETS,
        max_bytes: SERVER_MAX_BYTES,
    };

    /// A client's window for messages from the server (see [`CLIENT_WINDOW`]).
    pub const CLIENT: Self = Self {
        window: CLIENT_WINDOW,
        buckets: BUCKETS,
        max_bytes: CLIENT_MAX_BYTES,
    };

    /// This configuration, with the window widened (never narrowed) to cover copies sent over
    /// `resend_span` after the first (a sender's [`holding_time`]) and `transit` on the way.
    ///
    /// [`holding_time`]: super::QosSenderConfig::holding_time
    pub fn covering(self, resend_span: Duration, transit: Duration) -> Self {
        Self {
            window: self.window.max(resend_span.saturating_add(transit)),
            ..self
        }
    }

    /// The span of one bucket.
    fn span(&self) -> Duration {
        let buckets = u32::try_from(self.buckets.max(1)).unwrap_or(u32::MAX);
        (self.window / buckets).max(MIN_BUCKET_SPAN)
    }
}

/// `holding_time` of a sender schedule, usable in constants.
const fn holding(grace: Duration, interval: Duration, resends: u32) -> Duration {
    let ticks = interval.as_millis() as u64 * (resends as u64 + 1);
    Duration::from_millis(grace.as_millis() as u64 + ticks)
}

/// [`QosReceiverConfig::covering`] for constants.
const fn covering_const(span: Duration, transit: Duration) -> Duration {
    Duration::from_millis(span.as_millis() as u64 + transit.as_millis() as u64)
}

/// The server's own S2C schedule gives a message up after this long (SPEC §8.4): 12 s.
pub const SERVER_HOLDING: Duration =
    holding(SERVER_GRACE, SERVER_CHECK_INTERVAL, SERVER_MAX_RESENDS);

/// Whether a QoS message was seen before, from [`QosReceiver::handle_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Seen {
    /// First sighting in the window: ACK it and deliver it.
    Fresh,
    /// Already seen (the sender resent it because our ACK was late or lost): ACK it again, do not
    /// deliver it.
    Duplicate,
}

/// Counters of a [`QosReceiver`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Sightings recorded as fresh.
    pub fresh: u64,
    /// Sightings recorded as duplicates.
    pub duplicates: u64,
    /// Buckets dropped before their time because the table reached `max_bytes`.
    pub evicted_buckets: u64,
    /// Keys in those buckets.
    pub evicted_keys: u64,
}

/// One time bucket: the keys last seen in `[start, start + span)`.
#[derive(Debug)]
struct Bucket {
    start: Instant,
    keys: HashSet<QosKey, KeyBuildHasher>,
}

/// The de-duplication window of a QoS receiver (see the module docs). Sans-IO: feed
/// [`Self::handle_message`] and [`Self::handle_timeout`]; arm a timer at [`Self::poll_timeout`].
#[derive(Debug)]
pub struct QosReceiver {
    config: QosReceiverConfig,
    /// Bucket starts fall at `origin + k·span`.
    origin: Instant,
    /// Oldest first; the back one takes new sightings.
    buckets: VecDeque<Bucket>,
    /// Set by [`Self::restart`]: every sighting recorded before it counts as made at it.
    floor: Option<Instant>,
    /// Keys in all buckets.
    len: usize,
    stats: ReceiverStats,
}

impl QosReceiver {
    /// An empty window; bucket boundaries fall at `origin + k·(window / buckets)`.
    pub fn new(config: QosReceiverConfig, origin: Instant) -> Self {
        Self {
            config,
            origin,
            buckets: VecDeque::new(),
            floor: None,
            len: 0,
            stats: ReceiverStats::default(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &QosReceiverConfig {
        &self.config
    }

    /// A QoS message with key `key` arrived at `now`. Both outcomes record `now` as the time of
    /// last sighting; the caller ACKs in both cases and delivers only [`Seen::Fresh`].
    ///
    /// Expiry due at or before `now` runs first, so a late [`Self::handle_timeout`] cannot turn an
    /// expired key into a duplicate.
    pub fn handle_message(&mut self, now: Instant, key: QosKey) -> Seen {
        self.handle_timeout(now);
        let start = self.bucket_start(now);
        let found = self.buckets.iter().position(|b| b.keys.contains(&key));
        let newest = self.buckets.len().checked_sub(1);
        let seen = match found {
            Some(index) if Some(index) == newest && self.newest_start() == Some(start) => {
                self.stats.duplicates += 1;
                return Seen::Duplicate;
            }
            Some(index) => {
                // Refresh: move it to the bucket of `now`.
                if let Some(bucket) = self.buckets.get_mut(index) {
                    bucket.keys.remove(&key);
                }
                self.len -= 1;
                self.stats.duplicates += 1;
                Seen::Duplicate
            }
            None => {
                self.stats.fresh += 1;
                Seen::Fresh
            }
        };
        self.insert(start, key);
        seen
    }

    /// Whether `key` is in the window, without recording a sighting (for callers that record only
    /// once the message has been handled, e.g. the server's C2C de-duplication).
    pub fn contains(&self, key: QosKey) -> bool {
        self.buckets.iter().any(|b| b.keys.contains(&key))
    }

    /// Drops the buckets whose every key has been remembered for `window` at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(front) = self.buckets.front() {
            if self.expiry(front.start) > now {
                break;
            }
            if let Some(bucket) = self.buckets.pop_front() {
                self.len -= bucket.keys.len();
            }
        }
    }

    /// When the oldest bucket expires; `None` while the window is empty.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        self.buckets.front().map(|b| self.expiry(b.start))
    }

    /// Counts every remembered key as seen at `now`.
    ///
    /// The Java SDK does this at every successful login (`QoS4ReciveDaemon.startup`: "kept across
    /// re-logins, timestamps refreshed", SPEC §8.5). O(1).
    pub fn restart(&mut self, now: Instant) {
        self.floor = Some(now);
    }

    /// Number of keys remembered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held: every bucket's hash-table allocation (estimated from its capacity as hashbrown
    /// lays it out: a power-of-two number of slots of one key and one control byte, plus one
    /// group of control bytes) and the bucket list.
    pub fn bytes(&self) -> usize {
        let sets: usize = self
            .buckets
            .iter()
            .map(|b| set_bytes(b.keys.capacity()))
            .sum();
        sets + self.buckets.capacity() * size_of::<Bucket>()
    }

    /// The counters.
    pub fn stats(&self) -> ReceiverStats {
        self.stats
    }

    /// Forgets everything (the SDK's logout / release, SPEC §8.5).
    pub fn clear(&mut self) {
        self.buckets = VecDeque::new();
        self.floor = None;
        self.len = 0;
    }

    /// Records `key` in the bucket starting at `start`, making room under `max_bytes` first.
    fn insert(&mut self, start: Instant, key: QosKey) {
        if self.newest_start() != Some(start) {
            if self.buckets.back().is_some_and(|b| b.keys.is_empty()) {
                self.buckets.pop_back();
            }
            self.buckets.push_back(Bucket {
                start,
                keys: HashSet::with_hasher(KeyBuildHasher),
            });
        }
        // What the newest set costs after this insert (it doubles when full).
        let (capacity, len) = self
            .buckets
            .back()
            .map_or((0, 0), |b| (b.keys.capacity(), b.keys.len()));
        let growth = if len < capacity {
            0
        } else {
            set_bytes(grown_capacity(capacity)).saturating_sub(set_bytes(capacity))
        };
        while self.bytes() + growth > self.config.max_bytes && self.buckets.len() > 1 {
            self.evict_front();
        }
        if self.bytes() + growth > self.config.max_bytes {
            // The newest bucket alone is over budget: start it afresh.
            if let Some(bucket) = self.buckets.back_mut() {
                self.stats.evicted_buckets += 1;
                self.stats.evicted_keys += bucket.keys.len() as u64;
                self.len -= bucket.keys.len();
                bucket.keys = HashSet::with_hasher(KeyBuildHasher);
            }
        }
        if let Some(bucket) = self.buckets.back_mut() {
            if bucket.keys.insert(key) {
                self.len += 1;
            }
        }
    }

    fn evict_front(&mut self) {
        if let Some(bucket) = self.buckets.pop_front() {
            self.stats.evicted_buckets += 1;
            self.stats.evicted_keys += bucket.keys.len() as u64;
            self.len -= bucket.keys.len();
        }
    }

    fn newest_start(&self) -> Option<Instant> {
        self.buckets.back().map(|b| b.start)
    }

    /// The start of the bucket holding sightings made at `now`.
    fn bucket_start(&self, now: Instant) -> Instant {
        let span = self.config.span().as_nanos();
        let since = now.saturating_duration_since(self.origin).as_nanos();
        let offset = u64::try_from(since / span * span).unwrap_or(u64::MAX);
        self.origin
            .checked_add(Duration::from_nanos(offset))
            .unwrap_or(now)
    }

    /// When a bucket starting at `start` expires: `window` after its last possible sighting, or
    /// after the last [`Self::restart`].
    fn expiry(&self, start: Instant) -> Instant {
        let end = later(start, self.config.span());
        let seen = self.floor.map_or(end, |floor| end.max(floor));
        later(seen, self.config.window)
    }
}

/// Allocation of a hash set of `capacity` usable keys (hashbrown: 7/8 of a power-of-two number of
/// slots, or all of them below 8 slots; a group of 16 trailing control bytes).
fn set_bytes(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let slots = if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity * 8 / 7).next_power_of_two()
    };
    slots * SLOT_BYTES + 16
}

/// The capacity a full set grows to on its next insert.
fn grown_capacity(capacity: usize) -> usize {
    if capacity < 3 {
        3
    } else if capacity < 7 {
        7
    } else {
        (capacity * 8 / 7).next_power_of_two() * 2 * 7 / 8
    }
}

/// `t + d`, or `t` if that is not representable (only with absurd configurations).
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn k(n: u128) -> QosKey {
        QosKey(n)
    }

    /// 8 buckets of 5 s over a 40-s window.
    fn config() -> QosReceiverConfig {
        QosReceiverConfig {
            window: s(40),
            buckets: 8,
            max_bytes: 1 << 20,
        }
    }

    #[test]
    fn presets_follow_the_senders_schedules() {
        assert_eq!(SERVER_WINDOW, s(38));
        assert_eq!(SERVER_HOLDING, s(12));
        assert!(CLIENT_WINDOW >= (SERVER_HOLDING * 2).saturating_add(TRANSIT_MARGIN));
        let wide = QosReceiverConfig::SERVER.covering(s(60), TRANSIT_MARGIN);
        assert_eq!(wide.window, s(80));
        let narrow = QosReceiverConfig::SERVER.covering(s(1), TRANSIT_MARGIN);
        assert_eq!(narrow.window, SERVER_WINDOW);
    }

    #[test]
    fn duplicate_is_suppressed_but_still_acked() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(config(), t0);
        let mut acks = 0;
        let mut delivered = 0;
        for at in [1, 2, 3, 9] {
            let seen = r.handle_message(t0 + s(at), k(1));
            acks += 1; // the caller ACKs in both cases
            if seen == Seen::Fresh {
                delivered += 1;
            }
        }
        assert_eq!((acks, delivered), (4, 1));
        assert_eq!(r.handle_message(t0 + s(9), k(2)), Seen::Fresh);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r.stats(),
            ReceiverStats {
                fresh: 2,
                duplicates: 3,
                ..ReceiverStats::default()
            }
        );
    }

    #[test]
    fn a_key_lives_at_least_window_and_at_most_one_span_more() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(config(), t0);
        // Seen at 7 s: bucket [5, 10) expires at 10 + 40 = 50 s.
        r.handle_message(t0 + s(7), k(1));
        assert_eq!(r.poll_timeout(), Some(t0 + s(50)));
        r.handle_timeout(t0 + s(47));
        assert!(r.contains(k(1)));
        r.handle_timeout(t0 + s(50));
        assert!(!r.contains(k(1)));
        assert!(r.is_empty());
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(r.handle_message(t0 + s(51), k(1)), Seen::Fresh);
    }

    #[test]
    fn a_duplicate_refreshes_its_key() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(config(), t0);
        r.handle_message(t0 + s(1), k(1));
        assert_eq!(r.handle_message(t0 + s(30), k(1)), Seen::Duplicate);
        // Moved to bucket [30, 35): kept until 75 s, and held once.
        assert_eq!(r.len(), 1);
        r.handle_timeout(t0 + s(74));
        assert!(r.contains(k(1)));
        r.handle_timeout(t0 + s(75));
        assert!(!r.contains(k(1)));
    }

    #[test]
    fn late_timeout_is_applied_before_a_sighting() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(config(), t0);
        r.handle_message(t0 + s(1), k(1));
        // The expiry at 45 s was never run by the caller; the sighting at 46 s must see it.
        assert_eq!(r.handle_message(t0 + s(46), k(1)), Seen::Fresh);
    }

    #[test]
    fn restart_refreshes_everything() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(config(), t0);
        r.handle_message(t0 + s(1), k(1));
        r.restart(t0 + s(30));
        assert_eq!(r.poll_timeout(), Some(t0 + s(70)));
        r.handle_timeout(t0 + s(69));
        assert_eq!(r.len(), 1);
        r.handle_timeout(t0 + s(70));
        assert!(r.is_empty());
    }

    #[test]
    fn clear_forgets_everything() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(config(), t0);
        r.handle_message(t0, k(1));
        r.clear();
        assert!(r.is_empty());
        assert_eq!(r.bytes(), 0);
        assert_eq!(r.handle_message(t0, k(1)), Seen::Fresh);
    }

    #[test]
    fn repeated_duplicates_hold_one_key() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(config(), t0);
        for i in 0..10_000u64 {
            r.handle_message(t0 + Duration::from_millis(i * 7), k(42));
        }
        assert_eq!(r.len(), 1);
        assert!(r.bytes() < 1024, "{} bytes", r.bytes());
    }

    #[test]
    fn max_bytes_evicts_the_oldest_bucket_first_and_counts_it() {
        let t0 = Instant::now();
        let config = QosReceiverConfig {
            max_bytes: 64 << 10,
            ..config()
        };
        let mut r = QosReceiver::new(config, t0);
        // One new key every millisecond for 20 s: ~20 000 keys, ~500 KiB unbounded.
        let mut next = 0u128;
        for ms in 0..20_000u64 {
            r.handle_message(t0 + Duration::from_millis(ms), k(next));
            next += 1;
            assert!(
                r.bytes() <= config.max_bytes,
                "{} bytes at {ms} ms",
                r.bytes()
            );
        }
        let stats = r.stats();
        assert!(stats.evicted_buckets > 0);
        assert_eq!(stats.fresh, 20_000);
        assert_eq!(stats.evicted_keys + r.len() as u64, 20_000);
        // The newest keys are still known, the oldest were forgotten.
        assert!(r.contains(k(next - 1)));
        assert!(!r.contains(k(0)));
    }

    #[test]
    fn a_single_bucket_over_budget_starts_afresh() {
        let t0 = Instant::now();
        let config = QosReceiverConfig {
            window: s(40),
            buckets: 1,
            max_bytes: 4096,
        };
        let mut r = QosReceiver::new(config, t0);
        for n in 0..1000u128 {
            r.handle_message(t0, k(n));
            assert!(r.bytes() <= 4096, "{} bytes", r.bytes());
        }
        assert!(r.stats().evicted_buckets > 0);
        assert!(r.contains(k(999)));
    }

    #[test]
    fn compact_keys_cost_tens_of_bytes_each() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(QosReceiverConfig::SERVER, t0);
        let n = 100_000u64;
        for i in 0..n {
            // 10 000 messages per second.
            r.handle_message(t0 + Duration::from_micros(i * 100), k(u128::from(i) * 7919));
        }
        assert_eq!(r.len() as u64, n);
        let per_key = r.bytes() as f64 / n as f64;
        assert!((17.0..=40.0).contains(&per_key), "{per_key} bytes per key");
    }
}
