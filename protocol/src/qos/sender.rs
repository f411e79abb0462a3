//! The resend table of a QoS sender (SPEC §8.3 client, §8.4 server), with the reference's tick-based timing.
//!
//! The reference keeps `fp → message` in a map and scans the whole map from a timer that fires every
//! `check_interval`. At each tick, for each stored message: if it was already resent `max_resends`
//! times it is reported lost and dropped; else if it was first sent at most `grace` ago it is left
//! alone; else it is resent unchanged (same fp) and its retry count incremented — the send time is
//! *not* updated by a resend.
//!
//! [`QosSender`] reproduces exactly that schedule without scanning: since ticks fall at
//! `origin + k·check_interval`, the tick at which an entry next needs attention is known in advance
//! (the first tick strictly after `first_sent + grace`, then every following tick). Entries sit in a
//! min-heap keyed by that due tick; an ACK removes the entry from the map and leaves its heap slot
//! behind (lazy deletion), so a tick costs O(due entries · log n) whatever the table size.
//!
//! The table is bounded in entries and in bytes: the caller declares what each kept item holds
//! on the heap, and [`QosSender::insert`] refuses an item past either bound (counted in
//! [`SenderStats`]). The key type is generic: the client keys by fingerprint, the server by a
//! compact [`QosKey`](super::QosKey) of (recipient, fingerprint).

use std::borrow::Borrow;
use std::cmp::Reverse;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::message::Fingerprint;

/// Client check period: the SDK's `QoS4SendDaemon.CHECH_INTERVAL` (SPEC §8.3, §14).
pub const CLIENT_CHECK_INTERVAL: Duration = Duration::from_millis(5000);
/// Client grace: a message first sent at most this long before a tick is not resent at that tick,
/// its ACK may still be in flight (SDK `MESSAGES_JUST$NOW_TIME`, SPEC §8.3).
pub const CLIENT_GRACE: Duration = Duration::from_millis(3000);
/// Client resends before a message is reported lost (SDK `QOS_TRY_COUNT`, SPEC §8.3): resent at two
/// consecutive ticks, lost at the third — 10–20 s after the first send ("observed 15.0 s").
pub const CLIENT_MAX_RESENDS: u32 = 2;
/// Bound on unacknowledged client messages. The SDK has none; a message stays in the table at most
/// `grace + (max_resends + 1)·check_interval` = 18 s, so 4096 entries allow ~225 QoS messages/s
/// sustained — far beyond any chat client — while a client writing into a dead link cannot grow
/// its table without limit.
pub const CLIENT_MAX_PENDING: usize = 1 << 12;
/// Byte bound of the client's table: 4096 entries of messages up to the 6-KiB TCP frame limit
/// would be 24 MiB; 8 MiB still allows 4096 typical messages of ~1 KiB, and bounds a client
/// that queues large messages into a dead link.
pub const CLIENT_MAX_BYTES: usize = 8 << 20;

/// Server check period of the S2C resend queue (SPEC §8.4, §14).
pub const SERVER_CHECK_INTERVAL: Duration = Duration::from_millis(5000);
/// Server grace: a message written at most this long before a tick is not resent (SPEC §8.4).
pub const SERVER_GRACE: Duration = Duration::from_millis(2000);
/// Server resends before the message is reported lost one tick later (SPEC §8.4).
pub const SERVER_MAX_RESENDS: u32 = 1;
/// Bound on the server's S2C resend queue, per table (the reference has none, hazard S10). An entry
/// stays at most `grace + (max_resends + 1)·check_interval` = 12 s, so 2^20 entries cover ~87 000
/// QoS forwards per second per table; at a typical encoded message of ~200 bytes that is ~200 MiB.
/// Past the bound the caller must treat the message as not deliverable (the offline path, §7.2).
pub const SERVER_MAX_PENDING: usize = 1 << 20;
/// Byte bound of the server's S2C resend table, per table (one per core): what the entries keep
/// (the encoded message, the two user ids, the fingerprint) plus the table's own slots. 256 MiB
/// holds ~1 million entries of ~200 bytes, the entry bound. Past it the caller must treat the
/// message as not deliverable now (no ACK to the sender, or the offline path).
pub const SERVER_MAX_BYTES: usize = 256 << 20;

/// Smallest check interval accepted: a zero interval would make every instant a tick.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(1);

/// Rebuild the heap once it holds more than this many stale slots *and* more stale slots than live
/// entries: lazy deletion then costs at most twice the live size, and small tables never compact.
const COMPACT_MIN_STALE: usize = 1024;

/// Timing and size of a resend table. No `Default`: client and server differ, pick
/// [`QosSenderConfig::CLIENT`] or [`QosSenderConfig::SERVER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QosSenderConfig {
    /// Period of the check ticks, which fall at `origin + k·check_interval`.
    pub check_interval: Duration,
    /// A message first sent at most this long before a tick is left alone at that tick.
    pub grace: Duration,
    /// Resends before the message is reported lost (at the tick after the last resend).
    pub max_resends: u32,
    /// Most unacknowledged messages held; [`QosSender::insert`] refuses more.
    pub max_pending: usize,
    /// Most bytes held (kept items' declared heap bytes plus the table's slots);
    /// [`QosSender::insert`] refuses an item that would pass it.
    pub max_bytes: usize,
}

impl QosSenderConfig {
    /// The Java SDK's sender (SPEC §8.3): tick 5000 ms, grace 3000 ms, 2 resends.
    pub const CLIENT: Self = Self {
        check_interval: CLIENT_CHECK_INTERVAL,
        grace: CLIENT_GRACE,
        max_resends: CLIENT_MAX_RESENDS,
        max_pending: CLIENT_MAX_PENDING,
        max_bytes: CLIENT_MAX_BYTES,
    };

    /// The reference server's S2C resend queue (SPEC §8.4): tick 5000 ms, grace 2000 ms, 1 resend.
    pub const SERVER: Self = Self {
        check_interval: SERVER_CHECK_INTERVAL,
        grace: SERVER_GRACE,
        max_resends: SERVER_MAX_RESENDS,
        max_pending: SERVER_MAX_PENDING,
        max_bytes: SERVER_MAX_BYTES,
    };

    /// Longest time from a message's first send to its last resend: the first resend falls at the
    /// first tick after `grace` (at most `grace + check_interval`), the others one tick apart.
    /// Zero without resends.
    pub fn resend_span(&self) -> Duration {
        if self.max_resends == 0 {
            return Duration::ZERO;
        }
        self.grace
            .saturating_add(self.check_interval.saturating_mul(self.max_resends))
    }

    /// Longest time a message stays in the table unacknowledged: it is reported lost one tick
    /// after its last resend. Java SDK: 3 + 3·5 = 18 s; server: 2 + 2·5 = 12 s.
    pub fn holding_time(&self) -> Duration {
        self.grace.saturating_add(
            self.check_interval
                .saturating_mul(self.max_resends.saturating_add(1)),
        )
    }
}

/// Counters of a [`QosSender`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SenderStats {
    /// Items refused because the table held `max_pending` entries.
    pub refused_entries: u64,
    /// Items refused because they would have passed `max_bytes`.
    pub refused_bytes: u64,
    /// Resends asked for.
    pub resent: u64,
    /// Messages reported lost.
    pub lost: u64,
}

/// What the table asks of its owner, returned by [`QosSender::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QosEvent<T, K = Fingerprint<'static>> {
    /// Write `item` again, unchanged (same fingerprint). It stays in the table.
    Resend {
        /// The key of the message.
        key: K,
        /// A copy of what was kept for the resend.
        item: T,
    },
    /// No ACK after the last resend: the message is dropped from the table (the reference's
    /// `messagesLost`).
    Lost {
        /// The key of the message.
        key: K,
        /// What was kept for the resend, handed back.
        item: T,
    },
}

/// The resend table of a QoS sender: unacknowledged messages keyed by fingerprint, resent and
/// finally reported lost on the reference's tick schedule (see the module docs).
///
/// Generic over what is kept for a resend: the client keeps a `Message<'static>`, the server the
/// encoded bytes. Sans-IO: feed [`Self::insert`], [`Self::handle_ack`] and
/// [`Self::handle_timeout`]; drain [`Self::poll_event`] after each call; arm a timer at
/// [`Self::poll_timeout`].
#[derive(Debug)]
pub struct QosSender<T, K = Fingerprint<'static>> {
    config: QosSenderConfig,
    /// Tick 0; ticks fall at `origin + k·check_interval`, k ≥ 0.
    origin: Instant,
    entries: HashMap<K, Pending<T>>,
    /// `(due tick, entry seq, fp)`, earliest first. Every live entry has exactly one slot; slots
    /// whose seq no longer matches the map (ACKed, lost, drained) are stale and skipped.
    schedule: BinaryHeap<Reverse<(Instant, u64, K)>>,
    events: VecDeque<QosEvent<T, K>>,
    /// Insertion counter: identifies an entry's heap slot and orders resends within a tick.
    next_seq: u64,
    /// Bytes held: [`Self::entry_bytes`] plus the declared heap bytes of every entry.
    bytes: usize,
    stats: SenderStats,
}

/// One unacknowledged message.
#[derive(Debug)]
struct Pending<T> {
    item: T,
    /// Time of the original send; never updated by a resend (SPEC §8.3).
    first_sent: Instant,
    resends: u32,
    /// The tick at which this entry is next resent or reported lost.
    due: Instant,
    seq: u64,
    /// What `item` holds on the heap, as declared by the caller.
    heap_bytes: usize,
}

impl<T, K: Hash + Eq + Ord + Clone> QosSender<T, K> {
    /// An empty table whose check ticks fall at `origin + k·check_interval` (k ≥ 0).
    ///
    /// The reference starts its timer with an immediate first run: at login for the client (SPEC
    /// §8.3), at start-up for the server (§8.4). A `check_interval` below [`MIN_CHECK_INTERVAL`] is
    /// raised to it.
    pub fn new(mut config: QosSenderConfig, origin: Instant) -> Self {
        config.check_interval = config.check_interval.max(MIN_CHECK_INTERVAL);
        Self {
            config,
            origin,
            entries: HashMap::new(),
            schedule: BinaryHeap::new(),
            events: VecDeque::new(),
            next_seq: 0,
            bytes: 0,
            stats: SenderStats::default(),
        }
    }

    /// Bytes one entry costs in the table itself: its map slot (key, bookkeeping and control
    /// byte) and its schedule slot. Hash-table slack (up to half the slots empty) is not counted.
    pub const fn entry_bytes() -> usize {
        size_of::<(K, Pending<T>)>() + 1 + size_of::<(Instant, u64, K)>()
    }

    /// The configuration in force.
    pub fn config(&self) -> &QosSenderConfig {
        &self.config
    }

    /// Records a message written at `now` under `key`; `heap_bytes` is what `item` holds on the
    /// heap (counted against `max_bytes`).
    ///
    /// Re-inserting a fingerprint that is still pending replaces the kept item but keeps the
    /// entry's schedule (first send time, resend count): the reference does not re-register a
    /// fingerprint it already holds (SDK `LocalDataSender.sendCommonData` checks `exist(fp)`), so
    /// re-sending a message by hand cannot postpone its loss report.
    ///
    /// # Errors
    /// The item is handed back when the table already holds `max_pending` entries, or when it
    /// would pass `max_bytes`; a refused replacement leaves the kept item in place.
    pub fn insert(&mut self, now: Instant, key: K, item: T, heap_bytes: usize) -> Result<(), T> {
        let full = self.entries.len() >= self.config.max_pending;
        let cost = Self::entry_bytes().saturating_add(heap_bytes);
        match self.entries.entry(key) {
            MapEntry::Occupied(mut slot) => {
                let pending = slot.get_mut();
                let bytes = self.bytes - pending.heap_bytes + heap_bytes;
                if bytes > self.config.max_bytes {
                    self.stats.refused_bytes += 1;
                    return Err(item);
                }
                self.bytes = bytes;
                pending.item = item;
                pending.heap_bytes = heap_bytes;
                Ok(())
            }
            MapEntry::Vacant(_) if full => {
                self.stats.refused_entries += 1;
                Err(item)
            }
            MapEntry::Vacant(_) if self.bytes.saturating_add(cost) > self.config.max_bytes => {
                self.stats.refused_bytes += 1;
                Err(item)
            }
            MapEntry::Vacant(slot) => {
                self.bytes += cost;
                let due = first_due(&self.config, self.origin, now);
                let seq = self.next_seq;
                self.next_seq = self.next_seq.wrapping_add(1);
                self.schedule.push(Reverse((due, seq, slot.key().clone())));
                slot.insert(Pending {
                    item,
                    first_sent: now,
                    resends: 0,
                    due,
                    seq,
                    heap_bytes,
                });
                Ok(())
            }
        }
    }

    /// An ACK for `key` arrived: the entry is removed and its item handed back. `None` if `key`
    /// was not pending (already acknowledged, already reported lost, or never sent with QoS).
    pub fn handle_ack<Q>(&mut self, key: &Q) -> Option<T>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let pending = self.entries.remove(key)?;
        self.release(&pending);
        self.discard_stale();
        Some(pending.item)
    }

    /// Bytes held: the entries' slots and the kept items' declared heap bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The counters.
    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    /// Gives back the bytes of an entry that left the table.
    fn release(&mut self, pending: &Pending<T>) {
        self.bytes = self
            .bytes
            .saturating_sub(Self::entry_bytes() + pending.heap_bytes);
    }

    /// Runs every check tick at or before `now`, queueing [`QosEvent`]s.
    ///
    /// Ticks missed by a late call are run in order, as if the timer had fired on time.
    pub fn handle_timeout(&mut self, now: Instant)
    where
        T: Clone,
    {
        while let Some(Reverse((due, _, _))) = self.schedule.peek() {
            if *due > now {
                break;
            }
            let Some(Reverse((due, seq, key))) = self.schedule.pop() else {
                break;
            };
            let Some(pending) = self.entries.get_mut(&key) else {
                continue;
            };
            if pending.seq != seq || pending.due != due {
                continue;
            }
            if pending.resends >= self.config.max_resends {
                if let Some(pending) = self.entries.remove(&key) {
                    self.release(&pending);
                    self.stats.lost += 1;
                    self.events.push_back(QosEvent::Lost {
                        key,
                        item: pending.item,
                    });
                }
            } else {
                pending.resends += 1;
                // The entry was older than `grace` at this tick, so it is at every later one.
                pending.due = later(due, self.config.check_interval);
                self.stats.resent += 1;
                self.events.push_back(QosEvent::Resend {
                    key: key.clone(),
                    item: pending.item.clone(),
                });
                self.schedule.push(Reverse((pending.due, seq, key)));
            }
        }
        self.discard_stale();
    }

    /// Moves tick 0 to `origin` and reschedules every pending entry on the new ticks, keeping first
    /// send times and resend counts.
    ///
    /// The Java SDK restarts its check timer at every successful login, with an immediate first run
    /// (`QoS4SendDaemon.startup(true)`), so an entry already past its grace is handled at `origin`
    /// itself. O(n); meant for rare events such as a re-login.
    pub fn restart(&mut self, origin: Instant) {
        self.origin = origin;
        let config = self.config;
        let mut slots = Vec::with_capacity(self.entries.len());
        for (key, pending) in &mut self.entries {
            pending.due = first_due(&config, origin, pending.first_sent);
            slots.push(Reverse((pending.due, pending.seq, key.clone())));
        }
        self.schedule = BinaryHeap::from(slots);
    }

    /// The next queued event, in the order the ticks produced them.
    pub fn poll_event(&mut self) -> Option<QosEvent<T, K>> {
        self.events.pop_front()
    }

    /// The next tick at which an entry is due; `None` when the table is empty.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // `discard_stale` keeps the top of the heap live, so this is exact.
        self.schedule.peek().map(|Reverse((due, _, _))| *due)
    }

    /// Number of unacknowledged messages.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no message awaits an ACK.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `key` awaits an ACK.
    pub fn contains<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.contains_key(key)
    }

    /// Empties the table (shutdown, logout), handing every pending message to the caller in the
    /// order they were inserted. Queued [`QosEvent::Resend`]s are dropped with them; queued
    /// [`QosEvent::Lost`]s stay to be polled.
    pub fn drain(&mut self) -> impl Iterator<Item = (K, T)> {
        self.schedule.clear();
        self.bytes = 0;
        self.events
            .retain(|event| matches!(event, QosEvent::Lost { .. }));
        let mut pending: Vec<_> = self.entries.drain().collect();
        pending.sort_unstable_by_key(|(_, p)| p.seq);
        pending.into_iter().map(|(key, p)| (key, p.item))
    }

    /// Pops stale slots off the top of the heap, so that [`Self::poll_timeout`] never reports a
    /// removed entry, and compacts the heap when stale slots outnumber live ones.
    fn discard_stale(&mut self) {
        while let Some(Reverse((due, seq, key))) = self.schedule.peek() {
            let live = self
                .entries
                .get(key)
                .is_some_and(|p| p.seq == *seq && p.due == *due);
            if live {
                break;
            }
            self.schedule.pop();
        }
        let stale = self.schedule.len().saturating_sub(self.entries.len());
        if stale > COMPACT_MIN_STALE && stale > self.entries.len() {
            let entries = &self.entries;
            self.schedule.retain(|Reverse((due, seq, key))| {
                entries
                    .get(key)
                    .is_some_and(|p| p.seq == *seq && p.due == *due)
            });
        }
    }
}

/// The first tick (`origin + k·interval`, k ≥ 0) strictly after `first_sent + grace`: the first
/// tick at which "first sent ≤ grace ago" no longer holds.
fn first_due(config: &QosSenderConfig, origin: Instant, first_sent: Instant) -> Instant {
    let threshold = later(first_sent, config.grace);
    let Some(since) = threshold.checked_duration_since(origin) else {
        return origin;
    };
    let interval = config.check_interval.as_nanos().max(1);
    let ticks = since.as_nanos() / interval + 1;
    let offset = u64::try_from(ticks.saturating_mul(interval)).unwrap_or(u64::MAX);
    origin
        .checked_add(Duration::from_nanos(offset))
        .unwrap_or(threshold)
}

/// `t + d`, or `t` if that is not representable (only with absurd configurations).
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn fp(s: &str) -> Fingerprint<'static> {
        Fingerprint::from(s.to_owned())
    }

    /// Runs the table to `at` and collects its events as (kind, fp, item).
    fn run(q: &mut QosSender<u32>, at: Instant) -> Vec<(&'static str, String, u32)> {
        q.handle_timeout(at);
        let mut out = Vec::new();
        while let Some(event) = q.poll_event() {
            out.push(match event {
                QosEvent::Resend { key, item } => ("resend", key.to_string(), item),
                QosEvent::Lost { key, item } => ("lost", key.to_string(), item),
            });
        }
        out
    }

    #[test]
    fn client_preset_resends_twice_then_lost_at_15s() {
        let t0 = Instant::now();
        let mut q = QosSender::new(QosSenderConfig::CLIENT, t0);
        q.insert(t0 + ms(100), fp("a"), 7, 0).unwrap();
        // Age at tick 5000 is 4900 > 3000: the first tick is the first resend.
        assert_eq!(q.poll_timeout(), Some(t0 + ms(5000)));
        assert!(run(&mut q, t0 + ms(4999)).is_empty());
        assert_eq!(run(&mut q, t0 + ms(5000)), [("resend", "a".into(), 7)]);
        assert_eq!(q.poll_timeout(), Some(t0 + ms(10_000)));
        assert_eq!(run(&mut q, t0 + ms(10_000)), [("resend", "a".into(), 7)]);
        assert_eq!(q.poll_timeout(), Some(t0 + ms(15_000)));
        assert_eq!(run(&mut q, t0 + ms(15_000)), [("lost", "a".into(), 7)]);
        // Lost 14.9 s after the first send, like the captured 15.0 s (SPEC §8.3).
        assert!(q.is_empty());
        assert_eq!(q.poll_timeout(), None);
        assert!(run(&mut q, t0 + ms(60_000)).is_empty());
    }

    #[test]
    fn server_preset_resends_once_then_lost_at_next_tick() {
        let t0 = Instant::now();
        let mut q = QosSender::new(QosSenderConfig::SERVER, t0);
        q.insert(t0 + ms(2500), fp("s"), 1, 0).unwrap();
        // Age 2500 at tick 5000 > 2000: resent at the first tick.
        assert_eq!(run(&mut q, t0 + ms(5000)), [("resend", "s".into(), 1)]);
        assert_eq!(run(&mut q, t0 + ms(10_000)), [("lost", "s".into(), 1)]);
        assert!(q.is_empty());
    }

    #[test]
    fn grace_skips_a_tick_right_after_the_send() {
        let t0 = Instant::now();
        let mut client = QosSender::new(QosSenderConfig::CLIENT, t0);
        let mut server = QosSender::new(QosSenderConfig::SERVER, t0);
        // Sent 1 s before the tick at 5000: too young to resend there.
        client.insert(t0 + ms(4000), fp("c"), 0, 0).unwrap();
        server.insert(t0 + ms(4000), fp("s"), 0, 0).unwrap();
        assert_eq!(client.poll_timeout(), Some(t0 + ms(10_000)));
        assert_eq!(server.poll_timeout(), Some(t0 + ms(10_000)));
        assert!(run(&mut client, t0 + ms(5000)).is_empty());
        assert!(run(&mut server, t0 + ms(5000)).is_empty());
        assert_eq!(run(&mut client, t0 + ms(10_000)).len(), 1);
        assert_eq!(run(&mut server, t0 + ms(10_000)).len(), 1);
        // Client: resends at 10 s and 15 s, lost at 20 s; server: lost at 15 s.
        assert_eq!(run(&mut server, t0 + ms(15_000))[0].0, "lost");
        assert_eq!(run(&mut client, t0 + ms(15_000))[0].0, "resend");
        assert_eq!(run(&mut client, t0 + ms(20_000))[0].0, "lost");
    }

    #[test]
    fn age_exactly_grace_is_left_alone() {
        let t0 = Instant::now();
        let mut q = QosSender::new(QosSenderConfig::SERVER, t0);
        // Age at tick 5000 is exactly 2000: "≤ 2000 ms ago is not resent" (SPEC §8.4).
        q.insert(t0 + ms(3000), fp("x"), 0, 0).unwrap();
        assert_eq!(q.poll_timeout(), Some(t0 + ms(10_000)));
    }

    #[test]
    fn ack_removes_the_entry_and_silences_it() {
        let t0 = Instant::now();
        let mut q = QosSender::new(QosSenderConfig::CLIENT, t0);
        q.insert(t0 + ms(100), fp("a"), 1, 0).unwrap();
        q.insert(t0 + ms(200), fp("b"), 2, 0).unwrap();
        assert_eq!(q.handle_ack("a"), Some(1));
        assert_eq!(q.handle_ack("a"), None);
        assert_eq!(q.len(), 1);
        assert_eq!(run(&mut q, t0 + ms(5000)), [("resend", "b".into(), 2)]);
        assert_eq!(q.handle_ack("b"), Some(2));
        assert!(q.is_empty());
        assert_eq!(q.poll_timeout(), None);
        assert!(run(&mut q, t0 + ms(60_000)).is_empty());
    }

    #[test]
    fn max_pending_refuses_new_entries_but_not_replacements() {
        let t0 = Instant::now();
        let config = QosSenderConfig {
            max_pending: 2,
            ..QosSenderConfig::CLIENT
        };
        let mut q = QosSender::new(config, t0);
        q.insert(t0, fp("a"), 1, 0).unwrap();
        q.insert(t0, fp("b"), 2, 0).unwrap();
        assert_eq!(q.insert(t0, fp("c"), 3, 0), Err(3));
        assert_eq!(q.insert(t0, fp("a"), 10, 0), Ok(()));
        assert_eq!(q.len(), 2);
        q.handle_ack("b");
        assert_eq!(q.insert(t0, fp("c"), 3, 0), Ok(()));
    }

    #[test]
    fn reinsert_keeps_the_schedule() {
        let t0 = Instant::now();
        let mut q = QosSender::new(QosSenderConfig::CLIENT, t0);
        q.insert(t0 + ms(100), fp("a"), 1, 0).unwrap();
        assert_eq!(run(&mut q, t0 + ms(5000)).len(), 1);
        q.insert(t0 + ms(6000), fp("a"), 2, 0).unwrap();
        assert_eq!(run(&mut q, t0 + ms(10_000)), [("resend", "a".into(), 2)]);
        assert_eq!(run(&mut q, t0 + ms(15_000)), [("lost", "a".into(), 2)]);
    }

    #[test]
    fn late_call_runs_missed_ticks_in_order() {
        let t0 = Instant::now();
        let mut q = QosSender::new(QosSenderConfig::CLIENT, t0);
        q.insert(t0 + ms(100), fp("a"), 1, 0).unwrap();
        q.insert(t0 + ms(4000), fp("b"), 2, 0).unwrap();
        let events = run(&mut q, t0 + ms(16_000));
        let kinds: Vec<_> = events.iter().map(|(k, f, _)| (*k, f.as_str())).collect();
        assert_eq!(
            kinds,
            [
                ("resend", "a"),
                ("resend", "a"),
                ("resend", "b"),
                ("lost", "a"),
                ("resend", "b"),
            ]
        );
        assert_eq!(q.poll_timeout(), Some(t0 + ms(20_000)));
    }

    #[test]
    fn ticks_follow_the_origin_phase() {
        let t0 = Instant::now();
        let mut q = QosSender::new(QosSenderConfig::SERVER, t0 + ms(1234));
        q.insert(t0 + ms(2000), fp("a"), 0, 0).unwrap();
        // Ticks at 1234 + 5000k; 2000 + 2000 = 4000 < 6234.
        assert_eq!(q.poll_timeout(), Some(t0 + ms(6234)));
    }

    #[test]
    fn restart_reschedules_on_the_new_ticks() {
        let t0 = Instant::now();
        let mut q = QosSender::new(QosSenderConfig::CLIENT, t0);
        q.insert(t0 + ms(100), fp("old"), 1, 0).unwrap();
        assert_eq!(run(&mut q, t0 + ms(5000)).len(), 1);
        q.insert(t0 + ms(6000), fp("new"), 2, 0).unwrap();
        // Re-login at 7000: the old entry (past its grace) is due immediately, the new one at the
        // first new tick after 6000 + 3000.
        q.restart(t0 + ms(7000));
        assert_eq!(q.poll_timeout(), Some(t0 + ms(7000)));
        assert_eq!(run(&mut q, t0 + ms(7000)), [("resend", "old".into(), 1)]);
        assert_eq!(
            run(&mut q, t0 + ms(12_000)),
            [("lost", "old".into(), 1), ("resend", "new".into(), 2)]
        );
    }

    #[test]
    fn drain_hands_everything_back_in_insertion_order() {
        let t0 = Instant::now();
        let mut q = QosSender::new(QosSenderConfig::CLIENT, t0);
        for (i, name) in ["c", "a", "b"].iter().enumerate() {
            q.insert(t0, fp(name), i as u32, 0).unwrap();
        }
        q.handle_timeout(t0 + ms(5000));
        let drained: Vec<_> = q.drain().map(|(f, i)| (f.to_string(), i)).collect();
        assert_eq!(drained, [("c".into(), 0), ("a".into(), 1), ("b".into(), 2)]);
        assert!(q.is_empty());
        assert_eq!(q.poll_event(), None);
        assert_eq!(q.poll_timeout(), None);
    }

    #[test]
    fn stale_slots_are_compacted() {
        let t0 = Instant::now();
        let mut q = QosSender::new(QosSenderConfig::SERVER, t0);
        q.insert(t0, fp("keep"), 0, 0).unwrap();
        for i in 0..10_000u32 {
            let name = format!("fp-{i}");
            q.insert(t0 + ms(1), fp(&name), i, 0).unwrap();
            assert_eq!(q.handle_ack(name.as_str()), Some(i));
        }
        assert!(q.schedule.len() <= 2 * COMPACT_MIN_STALE + 2);
        assert_eq!(q.len(), 1);
        assert_eq!(run(&mut q, t0 + ms(5000)), [("resend", "keep".into(), 0)]);
    }

    #[test]
    fn max_bytes_refuses_and_counts() {
        let t0 = Instant::now();
        let entry = QosSender::<u32>::entry_bytes();
        let config = QosSenderConfig {
            max_bytes: 3 * entry + 250,
            ..QosSenderConfig::SERVER
        };
        let mut q = QosSender::new(config, t0);
        q.insert(t0, fp("a"), 1, 100).unwrap();
        q.insert(t0, fp("b"), 2, 100).unwrap();
        assert_eq!(q.bytes(), 2 * entry + 200);
        // A third entry of 100 heap bytes would pass the bound; one of 50 fits.
        assert_eq!(q.insert(t0, fp("c"), 3, 100), Err(3));
        assert_eq!(q.stats().refused_bytes, 1);
        // A larger replacement that does not fit keeps the old item.
        assert_eq!(q.insert(t0, fp("a"), 10, 400), Err(10));
        q.insert(t0, fp("c"), 3, 50).unwrap();
        assert_eq!(q.bytes(), 3 * entry + 250);
        // An ACK and a loss give their bytes back.
        assert_eq!(q.handle_ack("a"), Some(1));
        assert_eq!(q.bytes(), 2 * entry + 150);
        let events = run(&mut q, t0 + ms(10_000));
        assert_eq!(
            events.iter().filter(|(kind, ..)| *kind == "lost").count(),
            2
        );
        assert_eq!(q.bytes(), 0);
        assert_eq!(q.stats().lost, 2);
        assert_eq!(q.stats().resent, 2);
    }

    #[test]
    fn max_pending_is_counted() {
        let t0 = Instant::now();
        let config = QosSenderConfig {
            max_pending: 1,
            ..QosSenderConfig::SERVER
        };
        let mut q = QosSender::new(config, t0);
        q.insert(t0, fp("a"), 1, 0).unwrap();
        assert_eq!(q.insert(t0, fp("b"), 2, 0), Err(2));
        assert_eq!(q.stats().refused_entries, 1);
    }

    #[test]
    fn spans_follow_the_schedule() {
        assert_eq!(QosSenderConfig::CLIENT.resend_span(), ms(13_000));
        assert_eq!(QosSenderConfig::CLIENT.holding_time(), ms(18_000));
        assert_eq!(QosSenderConfig::SERVER.resend_span(), ms(7_000));
        assert_eq!(QosSenderConfig::SERVER.holding_time(), ms(12_000));
        let none = QosSenderConfig {
            max_resends: 0,
            ..QosSenderConfig::SERVER
        };
        assert_eq!(none.resend_span(), Duration::ZERO);
    }

    #[test]
    fn more_resends_on_a_shorter_interval_stay_within_the_holding_time() {
        let t0 = Instant::now();
        let config = QosSenderConfig {
            check_interval: ms(500),
            max_resends: 8,
            ..QosSenderConfig::SERVER
        };
        let mut q = QosSender::new(config, t0);
        q.insert(t0 + ms(100), fp("a"), 1, 0).unwrap();
        let mut resends = Vec::new();
        let mut lost_at = None;
        let mut at = t0;
        while let Some(due) = q.poll_timeout() {
            at = due;
            for (kind, ..) in run(&mut q, at) {
                if kind == "resend" {
                    resends.push(at);
                } else {
                    lost_at = Some(at);
                }
            }
        }
        assert_eq!(resends.len(), 8);
        let last = resends.last().copied().unwrap_or(at);
        assert!(last - (t0 + ms(100)) <= config.resend_span());
        assert!(lost_at.is_some_and(|l| l - (t0 + ms(100)) <= config.holding_time()));
    }

    #[test]
    fn compact_keys_work_as_keys() {
        use crate::qos::QosKey;
        let t0 = Instant::now();
        let mut q: QosSender<u32, QosKey> = QosSender::new(QosSenderConfig::SERVER, t0);
        q.insert(t0, QosKey(7), 1, 0).unwrap();
        assert!(q.contains(&QosKey(7)));
        assert_eq!(q.handle_ack(&QosKey(7)), Some(1));
        assert!(q.is_empty());
    }
}
