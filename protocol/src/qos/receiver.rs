//! The de-duplication window of a QoS receiver (SPEC §8.5): fingerprints seen recently, with sweeps.
//!
//! The reference keeps `fp → time of last sighting` and, from a timer that fires every
//! `sweep_interval`, scans the whole map and drops entries whose last sighting is at least
//! `validity` old. A receiver ACKs every QoS message, duplicate or not, but passes only fresh ones
//! to the application.
//!
//! [`QosReceiver`] keeps the same schedule — sweeps at `origin + k·sweep_interval`, so an entry
//! expires only at a sweep, up to `validity + sweep_interval` after its last sighting — without the
//! scan: sightings are also appended to a FIFO in time order, and a sweep pops the FIFO front while
//! it is old enough. A refreshed entry leaves its older FIFO slot behind; such slots are recognised
//! (their time no longer matches the map) and skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Period of the sweeps: the reference's `QoS4ReciveDaemon.CHECH_INTERVAL` (SPEC §8.5, §14).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// A fingerprint not seen for this long is dropped at the next sweep (`MESSAGES_VALID_TIME`,
/// SPEC §8.5, §14). A sender gives up after at most ~20 s (§8.3), so this horizon is generous.
pub const VALIDITY: Duration = Duration::from_secs(10 * 60);
/// Most fingerprints remembered. The reference has no bound (hazard S10); entries live up to
/// `validity + sweep_interval` = 15 min, so 2^20 entries (~100 MiB) cover ~1 165 fresh QoS messages
/// per second sustained. When full the *oldest* sighting is forgotten first: a duplicate of it
/// arriving later would be delivered again, the least harmful choice.
pub const CAPACITY: usize = 1 << 20;

/// Smallest sweep interval accepted: a zero interval would make every instant a sweep.
pub const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(1);

/// Rebuild the FIFO once it holds more than this many stale slots *and* more stale slots than live
/// entries, so that a peer repeating one fingerprint cannot grow it without bound.
const COMPACT_MIN_STALE: usize = 1024;

/// Timing and size of a de-duplication window; the defaults are the reference's, the same at both
/// ends (SPEC §8.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QosReceiverConfig {
    /// Period of the sweeps, which fall at `origin + k·sweep_interval`, k ≥ 1.
    pub sweep_interval: Duration,
    /// A sweep drops fingerprints whose last sighting is at least this old.
    pub validity: Duration,
    /// Most fingerprints remembered; the oldest sighting is forgotten first.
    pub capacity: usize,
}

impl Default for QosReceiverConfig {
    fn default() -> Self {
        Self {
            sweep_interval: SWEEP_INTERVAL,
            validity: VALIDITY,
            capacity: CAPACITY,
        }
    }
}

/// Whether a QoS message was seen before, from [`QosReceiver::handle_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Seen {
    /// First sighting in the window: ACK it and deliver it.
    Fresh,
    /// Already seen (the sender resent it because our ACK was late or lost): ACK it again, do not
    /// deliver it.
    Duplicate,
}

/// The de-duplication window of a QoS receiver (see the module docs). Sans-IO: feed
/// [`Self::handle_message`] and [`Self::handle_timeout`]; arm a timer at [`Self::poll_timeout`].
#[derive(Debug)]
pub struct QosReceiver {
    config: QosReceiverConfig,
    /// Sweep 0; sweeps fall at `origin + k·sweep_interval`.
    origin: Instant,
    /// The next sweep that has not run.
    next_sweep: Instant,
    /// Time of last sighting, as recorded.
    seen: HashMap<Arc<str>, Instant>,
    /// Sightings in time order. A slot is live iff its time equals the map's for its fingerprint.
    fifo: VecDeque<(Instant, Arc<str>)>,
    /// Set by [`Self::restart`]: every sighting recorded before it counts as made at it.
    floor: Option<Instant>,
}

impl QosReceiver {
    /// An empty window whose sweeps fall at `origin + k·sweep_interval`, k ≥ 1.
    ///
    /// The reference also sweeps at `origin` itself (an immediate first run at start-up or login),
    /// which never finds an entry old enough; that sweep is skipped. A `sweep_interval` below
    /// [`MIN_SWEEP_INTERVAL`] is raised to it.
    pub fn new(mut config: QosReceiverConfig, origin: Instant) -> Self {
        config.sweep_interval = config.sweep_interval.max(MIN_SWEEP_INTERVAL);
        Self {
            config,
            origin,
            next_sweep: later(origin, config.sweep_interval),
            seen: HashMap::new(),
            fifo: VecDeque::new(),
            floor: None,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &QosReceiverConfig {
        &self.config
    }

    /// A QoS message with fingerprint `fp` arrived at `now`. Both outcomes record `now` as the
    /// time of last sighting; the caller ACKs in both cases and delivers only [`Seen::Fresh`].
    ///
    /// Sweeps due at or before `now` run first, so a late [`Self::handle_timeout`] cannot turn an
    /// expired fingerprint into a duplicate.
    pub fn handle_message(&mut self, now: Instant, fp: &str) -> Seen {
        self.handle_timeout(now);
        let known = self
            .seen
            .get_key_value(fp)
            .map(|(key, last)| (Arc::clone(key), *last));
        if let Some((key, last)) = known {
            if last != now {
                // `insert` on a present key keeps the key and replaces the time.
                self.seen.insert(Arc::clone(&key), now);
                self.fifo.push_back((now, key));
                self.compact();
            }
            return Seen::Duplicate;
        }
        while self.seen.len() >= self.config.capacity.max(1) {
            if !self.evict_oldest() {
                break;
            }
        }
        let key: Arc<str> = Arc::from(fp);
        self.seen.insert(Arc::clone(&key), now);
        self.fifo.push_back((now, key));
        Seen::Fresh
    }

    /// Whether `fp` is in the window, without recording a sighting (for callers that record only
    /// once the message has been handled, e.g. the server's C2C de-duplication).
    pub fn contains(&self, fp: &str) -> bool {
        self.seen.contains_key(fp)
    }

    /// Runs the sweep due at or before `now`, if any. Several missed sweeps collapse into the
    /// latest one, which drops everything the earlier ones would have.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        let interval = self.config.sweep_interval;
        let sweep = last_tick_at_or_before(self.origin, interval, now);
        self.next_sweep = later(sweep, interval);
        while let Some((time, fp)) = self.fifo.front() {
            let live = self.seen.get(fp) == Some(time);
            if live && later(self.effective(*time), self.config.validity) > sweep {
                break;
            }
            if live {
                self.seen.remove(fp);
            }
            self.fifo.pop_front();
        }
        if self.seen.is_empty() {
            self.fifo.clear();
        }
    }

    /// The next sweep; `None` while the window is empty (nothing could expire).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.seen.is_empty() {
            None
        } else {
            Some(self.next_sweep)
        }
    }

    /// Counts every remembered fingerprint as seen at `now` and restarts the sweeps from `now`.
    ///
    /// The Java SDK does this at every successful login (`QoS4ReciveDaemon.startup`: "kept across
    /// re-logins, timestamps refreshed", SPEC §8.5). O(1).
    pub fn restart(&mut self, now: Instant) {
        self.floor = Some(now);
        self.origin = now;
        self.next_sweep = later(now, self.config.sweep_interval);
    }

    /// Number of fingerprints remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no fingerprint is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Forgets everything (the SDK's logout / release, SPEC §8.5). The sweep schedule is kept.
    pub fn clear(&mut self) {
        self.seen.clear();
        self.fifo.clear();
        self.floor = None;
    }

    /// The time a sighting counts as made at, given [`Self::restart`].
    fn effective(&self, time: Instant) -> Instant {
        self.floor.map_or(time, |floor| time.max(floor))
    }

    /// Forgets the oldest live sighting. `false` if there was none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((time, fp)) = self.fifo.pop_front() {
            if self.seen.get(&fp) == Some(&time) {
                self.seen.remove(&fp);
                return true;
            }
        }
        false
    }

    /// Drops stale FIFO slots once they outnumber live entries.
    fn compact(&mut self) {
        let stale = self.fifo.len().saturating_sub(self.seen.len());
        if stale > COMPACT_MIN_STALE && stale > self.seen.len() {
            let seen = &self.seen;
            self.fifo.retain(|(time, fp)| seen.get(fp) == Some(time));
        }
    }
}

/// The last tick `origin + k·interval` (k ≥ 0) at or before `now` (`origin` if `now` precedes it).
fn last_tick_at_or_before(origin: Instant, interval: Duration, now: Instant) -> Instant {
    let since = now.saturating_duration_since(origin).as_nanos();
    let interval = interval.as_nanos().max(1);
    let offset = u64::try_from(since / interval * interval).unwrap_or(u64::MAX);
    origin
        .checked_add(Duration::from_nanos(offset))
        .unwrap_or(now)
}

/// `t + d`, or `t` if that is not representable (only with absurd configurations).
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn min(n: u64) -> Duration {
        Duration::from_secs(60 * n)
    }

    #[test]
    fn duplicate_is_suppressed_but_still_acked() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(QosReceiverConfig::default(), t0);
        let mut acks = 0;
        let mut delivered = 0;
        for at in [1, 2, 3] {
            let seen = r.handle_message(t0 + Duration::from_secs(at), "fp-1");
            acks += 1; // the caller ACKs in both cases
            if seen == Seen::Fresh {
                delivered += 1;
            }
        }
        assert_eq!((acks, delivered), (3, 1));
        assert_eq!(
            r.handle_message(t0 + Duration::from_secs(4), "fp-2"),
            Seen::Fresh
        );
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn entries_expire_only_at_a_sweep_after_validity() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(QosReceiverConfig::default(), t0);
        r.handle_message(t0 + min(1), "a");
        assert_eq!(r.poll_timeout(), Some(t0 + min(5)));
        r.handle_timeout(t0 + min(5));
        assert_eq!(r.poll_timeout(), Some(t0 + min(10)));
        // Age 9 min at the sweep at 10 min: kept.
        r.handle_timeout(t0 + min(10));
        assert_eq!(r.len(), 1);
        // 11 min old but no sweep yet: still a duplicate.
        assert_eq!(r.handle_message(t0 + min(12), "a"), Seen::Duplicate);
        // That sighting refreshed it: at 15 min it is 3 min old, at 20 min 8, at 25 min 13.
        r.handle_timeout(t0 + min(15));
        r.handle_timeout(t0 + min(20));
        assert_eq!(r.len(), 1);
        r.handle_timeout(t0 + min(25));
        assert!(r.is_empty());
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(r.handle_message(t0 + min(26), "a"), Seen::Fresh);
    }

    #[test]
    fn expiry_without_refresh() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(QosReceiverConfig::default(), t0);
        r.handle_message(t0 + min(1), "a");
        r.handle_message(t0 + min(6), "b");
        // At 15 min: a is 14 min old (dropped), b 9 min (kept).
        r.handle_timeout(t0 + min(15));
        assert_eq!(r.len(), 1);
        assert_eq!(r.handle_message(t0 + min(15), "b"), Seen::Duplicate);
        assert_eq!(r.handle_message(t0 + min(15), "a"), Seen::Fresh);
    }

    #[test]
    fn exactly_validity_old_is_dropped() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(QosReceiverConfig::default(), t0);
        r.handle_message(t0 + min(5), "a");
        r.handle_timeout(t0 + min(15));
        assert!(r.is_empty());
    }

    #[test]
    fn late_timeout_is_applied_before_a_sighting() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(QosReceiverConfig::default(), t0);
        r.handle_message(t0 + min(1), "a");
        // The sweep at 15 min was never run by the caller; the sighting at 16 min must see it.
        assert_eq!(r.handle_message(t0 + min(16), "a"), Seen::Fresh);
    }

    #[test]
    fn capacity_evicts_the_oldest_sighting_first() {
        let t0 = Instant::now();
        let config = QosReceiverConfig {
            capacity: 2,
            ..QosReceiverConfig::default()
        };
        let mut r = QosReceiver::new(config, t0);
        r.handle_message(t0, "a");
        r.handle_message(t0 + Duration::from_secs(1), "b");
        // Refresh a: b is now the oldest sighting.
        r.handle_message(t0 + Duration::from_secs(2), "a");
        assert_eq!(
            r.handle_message(t0 + Duration::from_secs(3), "c"),
            Seen::Fresh
        );
        assert_eq!(r.len(), 2);
        assert_eq!(
            r.handle_message(t0 + Duration::from_secs(4), "a"),
            Seen::Duplicate
        );
        assert_eq!(
            r.handle_message(t0 + Duration::from_secs(5), "b"),
            Seen::Fresh
        );
    }

    #[test]
    fn restart_refreshes_everything() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(QosReceiverConfig::default(), t0);
        r.handle_message(t0 + min(1), "a");
        r.restart(t0 + min(9));
        // Sweeps now at 14, 19, 24 min; a counts as seen at 9 min.
        r.handle_timeout(t0 + min(14));
        r.handle_timeout(t0 + min(15));
        assert_eq!(r.len(), 1);
        assert_eq!(r.poll_timeout(), Some(t0 + min(19)));
        r.handle_timeout(t0 + min(19));
        assert!(r.is_empty());
    }

    #[test]
    fn clear_forgets_everything() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(QosReceiverConfig::default(), t0);
        r.handle_message(t0, "a");
        r.clear();
        assert!(r.is_empty());
        assert_eq!(r.handle_message(t0, "a"), Seen::Fresh);
    }

    #[test]
    fn repeated_duplicates_do_not_grow_the_fifo() {
        let t0 = Instant::now();
        let mut r = QosReceiver::new(QosReceiverConfig::default(), t0);
        for i in 0..10_000u64 {
            r.handle_message(t0 + Duration::from_millis(i), "same");
        }
        assert_eq!(r.len(), 1);
        assert!(r.fifo.len() <= COMPACT_MIN_STALE + 2);
    }
}
