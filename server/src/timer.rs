//! A hierarchical timer wheel: one per server core, for every timer that core owns (QoS resends,
//! session idle expiry, re-arming of lazy timers).
//!
//! The wheel is sans-IO: it never reads the clock. The event loop passes `now` into
//! [`TimerWheel::poll`], and asks [`TimerWheel::next_expiry`] how long it may sleep. There is no
//! task per timer and no scan over every timer or every slot.
//!
//! # Design
//!
//! Time is counted in *ticks* of [`RESOLUTION`] (1 ms) since the `origin` given to
//! [`TimerWheel::new`]. A due time is rounded *up* to a whole tick and `now` is rounded *down*, so
//! a timer never fires before its due time and fires at most one tick (1 ms) after it, provided
//! the loop polls in time.
//!
//! There are `LEVELS` levels of `SLOTS` slots each (the monoio/tokio layout):
//!
//! | level | one slot | the level covers |
//! | ----- | -------- | ---------------- |
//! | 0     | 1 ms     | 64 ms            |
//! | 1     | 64 ms    | ~4.1 s           |
//! | 2     | ~4.1 s   | ~4.4 min         |
//! | 3     | ~4.4 min | ~4.7 h           |
//! | 4     | ~4.7 h   | ~12.4 days       |
//!
//! A timer goes to the lowest level whose slot size is coarse enough to tell its due tick apart
//! from the wheel's current tick (`elapsed`): level `L` holds timers whose due tick shares every
//! bit above bit `6·(L+1)` with `elapsed` but differs in bits `6·L .. 6·(L+1)`. A timer further
//! away than the top level can tell (a different 2³⁰ ms ≈ 12.4 day block) goes to an *overflow*
//! list, which is re-examined whenever `elapsed` enters a new block — at most once every 12.4
//! days. Nothing is clamped, so a far timer still fires exactly on time.
//!
//! When time reaches the start of an occupied slot above level 0, the slot's timers *cascade*:
//! each is placed again relative to the new `elapsed`, which puts it on a lower level (or, if it is
//! due right now, on the ready list). A timer therefore moves at most `LEVELS` times in its life.
//! When time reaches an occupied level-0 slot, its timers move to the *ready* list, which
//! [`TimerWheel::poll`] drains one timer per call before it advances time any further.
//!
//! Timers live in a [`Slab`]; every slot, the overflow list and the ready list are intrusive
//! doubly-linked lists threaded through the slab entries, so insert, cancel and reset are O(1).
//! Each level keeps a `u64` occupancy bitmap (one bit per slot), so the next non-empty slot of a
//! level is one `rotate_right` and one `trailing_zeros` away.
//!
//! # Order
//!
//! Timers fire in order of their due tick. Timers due in the same millisecond fire in an
//! unspecified order (in practice mostly insertion order). A timer inserted or reset to a time at or
//! before the wheel's current tick (the last `now` it was polled with) is due at that tick: it fires
//! at the next poll, in unspecified order among the other timers due then.
//!
//! `now` is expected to be monotonic (as [`Instant`] is). A `now` earlier than a previous one is
//! treated as the previous one: timers already found due are still returned.

use std::fmt;
use std::time::{Duration, Instant};

use slab::Slab;

/// Length of one tick, the level-0 slot. MobileIMSDK's timings are whole seconds (QoS checks every
/// 5 s, keep-alive timeouts of tens of seconds), so 1 ms is more precision than any of them needs,
/// and fine enough that "up to one tick late" never matters; one tick per millisecond is still
/// cheap because idle slots are skipped through the occupancy bitmaps, never visited one by one.
pub const RESOLUTION: Duration = Duration::from_millis(1);

/// [`RESOLUTION`] in nanoseconds, for rounding `Instant` differences to ticks.
const NANOS_PER_TICK: u128 = RESOLUTION.as_nanos();

// Ticks are turned back into instants with `Duration::from_millis`, so a tick must be 1 ms.
const _: () = assert!(NANOS_PER_TICK == 1_000_000);

/// Bits of the tick that select a slot within one level.
const SLOT_BITS: u32 = 6;

/// Slots per level: 64, so that one level's occupancy is exactly one `u64` bitmap and the next
/// non-empty slot is found with a rotate and a `trailing_zeros` instead of a scan.
const SLOTS: usize = 1 << SLOT_BITS;

/// Mask selecting the slot bits of a tick.
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;

/// Number of levels: 64⁵ ms = 2³⁰ ms ≈ 12.4 days. Every timer imedge sets (resends in seconds,
/// idle expiry in minutes, at most hours) lands on a level; only the rare timer beyond 12.4 days
/// waits in the overflow list.
const LEVELS: usize = 5;

/// Ticks covered by all levels together: one rotation of the top level (2³⁰ ms).
const WHEEL_SPAN: u64 = 1 << (SLOT_BITS * LEVELS as u32);

/// Names one timer in its [`TimerWheel`], for [`TimerWheel::cancel`] and [`TimerWheel::reset`].
///
/// A key carries the generation of the timer it was issued for, so once that timer has fired or
/// been cancelled the key is *stale*: it never cancels or moves a newer timer that happens to
/// reuse the same storage. Keys are meaningful only to the wheel that issued them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerKey {
    /// Index of the entry in the wheel's slab.
    index: usize,
    /// Which insert this key came from; the slab index alone is reused after removal.
    generation: u64,
}

/// A hierarchical timer wheel holding values of type `T` until their due time.
///
/// See the [module documentation](self) for the design and guarantees.
pub struct TimerWheel<T> {
    /// Tick 0. Due times before it are due at tick 0.
    origin: Instant,
    /// The wheel's current tick: every timer due at or before it is on the ready list, every
    /// other timer is on a level or in the overflow list, placed relative to it.
    elapsed: u64,
    /// Storage for every timer; the lists below link entries by slab index.
    entries: Slab<Entry<T>>,
    /// Boxed so that moving a wheel moves a pointer, not 5 × 64 list heads.
    levels: Box<[Level; LEVELS]>,
    /// Timers due in a later 2³⁰ ms block than `elapsed`.
    overflow: List,
    /// Timers found due, waiting to be returned by `poll`.
    ready: List,
    /// A lower bound on the due times of the timers on `ready`, for `next_expiry`; `None` when
    /// `ready` is empty. It may be stale-low after a cancel, which only costs an early wake-up.
    ready_since: Option<Instant>,
    /// Generation for the next insert (see [`TimerKey`]).
    next_generation: u64,
}

/// One timer.
#[derive(Debug)]
struct Entry<T> {
    value: T,
    /// Due tick: the due time rounded up to a whole tick.
    tick: u64,
    /// Copied into the key; a key whose generation differs is stale.
    generation: u64,
    /// The list this entry is linked into.
    list: ListId,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Which intrusive list an entry is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListId {
    /// A slot of a level. Built only where `level < LEVELS` and `slot < SLOTS` hold by
    /// construction (`TimerWheel::place` and `TimerWheel::next_expiration`).
    Slot {
        level: usize,
        slot: usize,
    },
    Overflow,
    Ready,
}

/// Head and tail of an intrusive doubly-linked list of slab entries.
#[derive(Debug, Clone, Copy, Default)]
struct List {
    head: Option<usize>,
    tail: Option<usize>,
}

/// One level of the wheel.
#[derive(Debug)]
struct Level {
    /// Bit `s` is set iff `slots[s]` is non-empty.
    occupied: u64,
    slots: [List; SLOTS],
}

impl Level {
    const EMPTY: Level = Level {
        occupied: 0,
        slots: [List {
            head: None,
            tail: None,
        }; SLOTS],
    };
}

impl<T> TimerWheel<T> {
    /// Creates an empty wheel whose tick 0 is `origin` (typically the loop's start time).
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            elapsed: 0,
            entries: Slab::new(),
            levels: Box::new([Level::EMPTY; LEVELS]),
            overflow: List::default(),
            ready: List::default(),
            ready_since: None,
            next_generation: 0,
        }
    }

    /// Schedules `value` to fire at `at`, and returns the key that cancels or moves it.
    ///
    /// A time at or before the wheel's current time makes the timer fire at the next
    /// [`poll`](Self::poll).
    pub fn insert(&mut self, at: Instant, value: T) -> TimerKey {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let index = self.entries.insert(Entry {
            value,
            tick: self.tick_ceil(at),
            generation,
            list: ListId::Ready,
            prev: None,
            next: None,
        });
        self.place(index, at);
        TimerKey { index, generation }
    }

    /// Removes the timer named by `key` and returns its value, or `None` if the key is stale (the
    /// timer has already been returned by [`poll`](Self::poll) or cancelled).
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        if !self.is_live(key) {
            return None;
        }
        self.unlink(key.index);
        self.entries.try_remove(key.index).map(|entry| entry.value)
    }

    /// Moves the timer named by `key` to fire at `at` instead, keeping its key. Returns `false`
    /// (and changes nothing) if the key is stale.
    ///
    /// A timer that is already due but not yet returned by [`poll`](Self::poll) can be moved too.
    pub fn reset(&mut self, key: TimerKey, at: Instant) -> bool {
        if !self.is_live(key) {
            return false;
        }
        let tick = self.tick_ceil(at);
        self.unlink(key.index);
        if let Some(entry) = self.entries.get_mut(key.index) {
            entry.tick = tick;
        }
        self.place(key.index, at);
        true
    }

    /// Returns the value of one timer that is due at `now`, advancing the wheel as far as needed to
    /// find it; `None` when no timer is due. Call it until it returns `None`.
    ///
    /// Timers come out in order of their due millisecond (see the module documentation). A timer
    /// is never returned before its due time and is returned by any poll at least 1 ms after it.
    pub fn poll(&mut self, now: Instant) -> Option<T> {
        let now_tick = self.tick_floor(now);
        loop {
            if let Some(index) = self.pop_ready() {
                if let Some(entry) = self.entries.try_remove(index) {
                    return Some(entry.value);
                }
                // Unreachable: every linked index is a live entry. Skip it rather than stall.
                continue;
            }
            match self.next_expiration() {
                Some((list, deadline)) if deadline <= now_tick => self.expire(list, deadline),
                _ => {
                    // Nothing is due before `now_tick`, so no occupied slot starts at or before
                    // it and every timer stays correctly placed relative to the new `elapsed`.
                    self.elapsed = self.elapsed.max(now_tick);
                    return None;
                }
            }
        }
    }

    /// How long the event loop may wait: an instant no later than the earliest timer's due time
    /// plus [`RESOLUTION`], or `None` when the wheel is empty. Polling at the returned instant
    /// either fires a timer or moves far timers down a level, so a loop driven by it wakes at most
    /// a few extra times (`LEVELS`) for a far-off timer, and never late.
    ///
    /// When a timer is already due the returned instant is in the past: poll right away.
    pub fn next_expiry(&self) -> Option<Instant> {
        if self.ready.head.is_some() {
            return Some(self.ready_since.unwrap_or(self.origin));
        }
        self.next_expiration()
            .map(|(_, deadline)| self.instant_at(deadline))
    }

    /// Number of timers in the wheel, including due timers not yet returned by
    /// [`poll`](Self::poll).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the wheel holds no timer.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `key` names a timer still in the wheel.
    fn is_live(&self, key: TimerKey) -> bool {
        self.entries
            .get(key.index)
            .is_some_and(|entry| entry.generation == key.generation)
    }

    /// `at` as a tick, rounded up so that the timer never fires early.
    fn tick_ceil(&self, at: Instant) -> u64 {
        at.checked_duration_since(self.origin).map_or(0, |since| {
            u64::try_from(since.as_nanos().div_ceil(NANOS_PER_TICK)).unwrap_or(u64::MAX)
        })
    }

    /// `now` as a tick, rounded down so that a timer never fires early.
    fn tick_floor(&self, now: Instant) -> u64 {
        now.checked_duration_since(self.origin).map_or(0, |since| {
            u64::try_from(since.as_nanos() / NANOS_PER_TICK).unwrap_or(u64::MAX)
        })
    }

    /// The instant at which `tick` starts. A tick too far to be an `Instant` (hundreds of
    /// millions of years away) maps to `origin`, which is still a valid (very early) lower bound.
    fn instant_at(&self, tick: u64) -> Instant {
        self.origin
            .checked_add(Duration::from_millis(tick))
            .unwrap_or(self.origin)
    }

    /// The earliest occupied slot (or the overflow list) and the tick at which it must be
    /// processed: the slot's first tick, a lower bound on every due tick in it. Lower levels
    /// always hold earlier timers than higher ones (a level-`L` timer is in `elapsed`'s own
    /// level-`L+1` slot, a level-`L+1` timer in a later one), so the first occupied level wins.
    fn next_expiration(&self) -> Option<(ListId, u64)> {
        for (level, slots) in self.levels.iter().enumerate() {
            if slots.occupied == 0 {
                continue;
            }
            let shift = SLOT_BITS * level as u32;
            let now_slot = ((self.elapsed >> shift) & SLOT_MASK) as u32;
            // Rotate so that bit 0 is the current slot: the first set bit is the next slot.
            let ahead = slots.occupied.rotate_right(now_slot).trailing_zeros();
            let slot = (now_slot + ahead) & SLOT_MASK as u32;
            let level_start = self.elapsed & !((1u64 << (shift + SLOT_BITS)) - 1);
            // Placement keeps every occupied slot ahead of `elapsed`; if that ever failed, process
            // the slot now: re-placing its timers by their own due ticks cannot fire them early.
            let deadline = (level_start + (u64::from(slot) << shift)).max(self.elapsed);
            return Some((
                ListId::Slot {
                    level,
                    slot: slot as usize,
                },
                deadline,
            ));
        }
        if self.overflow.head.is_some() {
            // The start of the next top-level rotation: overflow timers are all in later blocks.
            let deadline = (self.elapsed | (WHEEL_SPAN - 1)).saturating_add(1);
            return Some((ListId::Overflow, deadline));
        }
        None
    }

    /// Advances to `deadline` and re-places every timer of `list`: cascading them to lower
    /// levels, or onto the ready list when they are due.
    fn expire(&mut self, list: ListId, deadline: u64) {
        self.elapsed = self.elapsed.max(deadline);
        let since = self.instant_at(self.elapsed);
        let mut cursor = std::mem::take(self.list_mut(list)).head;
        self.mark_empty(list);
        while let Some(index) = cursor {
            cursor = self.entries.get(index).and_then(|entry| entry.next);
            self.place(index, since);
        }
    }

    /// Links entry `index` (not on any list) into the list its due tick belongs to, relative to
    /// `elapsed`. `due` is a lower bound on its due time, kept for `next_expiry` if it is ready.
    fn place(&mut self, index: usize, due: Instant) {
        let Some(tick) = self.entries.get(index).map(|entry| entry.tick) else {
            return;
        };
        let list = if tick <= self.elapsed {
            self.ready_since = Some(self.ready_since.map_or(due, |since| since.min(due)));
            ListId::Ready
        } else {
            // The highest bit in which `tick` and `elapsed` differ picks the level; the slot bits
            // are or-ed in so that level 0 is the least a timer gets.
            let differ = (self.elapsed ^ tick) | SLOT_MASK;
            let level = ((u64::BITS - 1 - differ.leading_zeros()) / SLOT_BITS) as usize;
            if level < LEVELS {
                let slot = ((tick >> (SLOT_BITS * level as u32)) & SLOT_MASK) as usize;
                ListId::Slot { level, slot }
            } else {
                ListId::Overflow
            }
        };
        self.push_back(index, list);
    }

    /// Appends entry `index` to `list`.
    fn push_back(&mut self, index: usize, list: ListId) {
        let old_tail = self.list_mut(list).tail;
        if let Some(entry) = self.entries.get_mut(index) {
            entry.list = list;
            entry.prev = old_tail;
            entry.next = None;
        }
        match old_tail.and_then(|tail| self.entries.get_mut(tail)) {
            Some(tail) => tail.next = Some(index),
            None => self.list_mut(list).head = Some(index),
        }
        self.list_mut(list).tail = Some(index);
        if let ListId::Slot { level, slot } = list {
            if let Some(level) = self.levels.get_mut(level) {
                level.occupied |= 1 << slot;
            }
        }
    }

    /// Unlinks entry `index` from whatever list it is on.
    fn unlink(&mut self, index: usize) {
        let Some((list, prev, next)) = self
            .entries
            .get(index)
            .map(|entry| (entry.list, entry.prev, entry.next))
        else {
            return;
        };
        match prev.and_then(|prev| self.entries.get_mut(prev)) {
            Some(prev) => prev.next = next,
            None => self.list_mut(list).head = next,
        }
        match next.and_then(|next| self.entries.get_mut(next)) {
            Some(next) => next.prev = prev,
            None => self.list_mut(list).tail = prev,
        }
        if self.list_mut(list).head.is_none() {
            self.mark_empty(list);
        }
    }

    /// Unlinks and returns the first ready timer.
    fn pop_ready(&mut self) -> Option<usize> {
        let index = self.ready.head?;
        let next = self.entries.get(index).and_then(|entry| entry.next);
        self.ready.head = next;
        match next.and_then(|next| self.entries.get_mut(next)) {
            Some(next) => next.prev = None,
            None => {
                self.ready.tail = None;
                self.mark_empty(ListId::Ready);
            }
        }
        Some(index)
    }

    /// Bookkeeping once `list` has become empty.
    fn mark_empty(&mut self, list: ListId) {
        match list {
            ListId::Slot { level, slot } => {
                if let Some(level) = self.levels.get_mut(level) {
                    level.occupied &= !(1 << slot);
                }
            }
            ListId::Overflow => {}
            ListId::Ready => self.ready_since = None,
        }
    }

    #[allow(clippy::indexing_slicing)]
    fn list_mut(&mut self, list: ListId) -> &mut List {
        match list {
            // proof: `ListId::Slot` is only built in `place`, which checks `level < LEVELS` and
            // masks `slot` with `SLOT_MASK` (< SLOTS), and in `next_expiration`, whose `level`
            // enumerates `self.levels` and whose `slot` is masked the same way.
            ListId::Slot { level, slot } => &mut self.levels[level].slots[slot],
            ListId::Overflow => &mut self.overflow,
            ListId::Ready => &mut self.ready,
        }
    }
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let occupied: Vec<String> = self
            .levels
            .iter()
            .map(|level| format!("{:#018x}", level.occupied))
            .collect();
        f.debug_struct("TimerWheel")
            .field("origin", &self.origin)
            .field("elapsed_ms", &self.elapsed)
            .field("len", &self.entries.len())
            .field("occupied", &occupied)
            .field("overflow", &self.overflow.head.is_some())
            .field("ready", &self.ready.head.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Drives `wheel` the way the event loop will: sleep until `next_expiry`, then poll. Returns
    /// every fired value with the `now` at which it fired.
    fn run_loop<T>(wheel: &mut TimerWheel<T>, start: Instant) -> Vec<(T, Instant)> {
        let mut now = start;
        let mut fired = Vec::new();
        let mut wakeups = 0;
        while let Some(wake) = wheel.next_expiry() {
            now = now.max(wake);
            while let Some(value) = wheel.poll(now) {
                fired.push((value, now));
            }
            wakeups += 1;
            assert!(wakeups < 10_000, "loop does not converge");
        }
        fired
    }

    #[test]
    fn fires_in_order_at_the_right_time_on_every_level() {
        let t0 = Instant::now();
        let day = ms(24 * 3_600_000);
        let dues = [
            ms(1),
            ms(63),
            ms(64),
            ms(5_000),
            ms(10 * 60_000),
            ms(5 * 3_600_000),
            day * 20,
            // Beyond the top level, and sub-millisecond offsets.
            day * 40 + Duration::from_micros(300),
            ms(4_095) + Duration::from_nanos(1),
        ];
        let mut wheel = TimerWheel::new(t0);
        // Insert in reverse so that insertion order cannot explain firing order.
        for (i, due) in dues.iter().enumerate().rev() {
            wheel.insert(t0 + *due, i);
        }
        assert_eq!(wheel.len(), dues.len());

        let fired = run_loop(&mut wheel, t0);
        assert!(wheel.is_empty());
        let order: Vec<usize> = fired.iter().map(|(i, _)| *i).collect();
        let mut expected: Vec<usize> = (0..dues.len()).collect();
        expected.sort_by_key(|i| dues[*i]);
        assert_eq!(order, expected);
        for (i, at) in fired {
            let due = t0 + dues[i];
            assert!(at >= due, "timer {i} fired early");
            assert!(at - due <= MS, "timer {i} fired {:?} late", at - due);
        }
    }

    #[test]
    fn never_early_and_at_most_one_tick_late() {
        let t0 = Instant::now();
        let offsets = [
            ms(1),
            ms(63),
            ms(64),
            ms(5_000) + Duration::from_micros(300),
            ms(10 * 60_000) + Duration::from_nanos(999_999),
            ms(5 * 3_600_000) + Duration::from_nanos(1),
            ms(20 * 24 * 3_600_000),
        ];
        for offset in offsets {
            let mut wheel = TimerWheel::new(t0);
            let due = t0 + offset;
            wheel.insert(due, ());
            // Walk up to the due time with a few intermediate polls, as a loop would.
            for step in [
                offset / 2,
                offset - offset / 4,
                offset - Duration::from_nanos(1),
            ] {
                assert_eq!(wheel.poll(t0 + step), None, "{offset:?} fired at {step:?}");
            }
            let late = due + MS;
            let fired_at = [due, late]
                .into_iter()
                .find(|now| wheel.poll(*now).is_some());
            assert!(
                fired_at.is_some(),
                "{offset:?} not fired 1 ms after its due time"
            );
            assert!(wheel.is_empty());
        }
    }

    #[test]
    fn exact_millisecond_fires_at_that_millisecond() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0);
        wheel.insert(t0 + ms(100), 'a');
        assert_eq!(wheel.poll(t0 + ms(100) - Duration::from_nanos(1)), None);
        assert_eq!(wheel.poll(t0 + ms(100)), Some('a'));
        assert_eq!(wheel.poll(t0 + ms(100)), None);
    }

    #[test]
    fn cancel_and_stale_keys() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0);
        let a = wheel.insert(t0 + ms(10), "a");
        let b = wheel.insert(t0 + ms(20), "b");
        assert_eq!(wheel.cancel(a), Some("a"));
        assert_eq!(wheel.cancel(a), None);
        assert!(!wheel.reset(a, t0 + ms(5)));
        assert_eq!(wheel.len(), 1);

        // The slab reuses a's storage; a's key must not reach the new timer.
        let c = wheel.insert(t0 + ms(30), "c");
        assert_ne!(a, c);
        assert_eq!(wheel.cancel(a), None);
        assert!(!wheel.reset(a, t0 + ms(1)));
        assert_eq!(wheel.len(), 2);

        assert_eq!(wheel.poll(t0 + ms(25)), Some("b"));
        assert_eq!(wheel.poll(t0 + ms(25)), None);
        // Fired: its key is stale now.
        assert_eq!(wheel.cancel(b), None);
        assert!(!wheel.reset(b, t0 + ms(40)));
        assert_eq!(wheel.cancel(c), Some("c"));
        assert!(wheel.is_empty());
        assert_eq!(wheel.next_expiry(), None);
        assert_eq!(wheel.poll(t0 + ms(100)), None);
    }

    #[test]
    fn cancel_a_due_timer_before_it_is_polled() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0);
        let a = wheel.insert(t0 + ms(5), 1);
        wheel.insert(t0 + ms(5), 2);
        assert_eq!(wheel.poll(t0 + ms(5)), Some(1));
        // 2 is on the ready list now; cancelling it must still work.
        let late = wheel.insert(t0, 3);
        assert_eq!(wheel.cancel(late), Some(3));
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(wheel.poll(t0 + ms(5)), Some(2));
        assert_eq!(wheel.poll(t0 + ms(5)), None);
        assert!(wheel.is_empty());
    }

    #[test]
    fn reset_earlier_and_later() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0);
        let early = wheel.insert(t0 + ms(10 * 60_000), "was 10 min, now 2 s");
        let later = wheel.insert(t0 + ms(100), "was 100 ms, now 5 h");
        assert!(wheel.reset(early, t0 + ms(2_000)));
        assert!(wheel.reset(later, t0 + ms(5 * 3_600_000)));
        assert_eq!(wheel.len(), 2);

        assert_eq!(wheel.poll(t0 + ms(1_999)), None);
        assert_eq!(wheel.poll(t0 + ms(2_000)), Some("was 10 min, now 2 s"));
        assert_eq!(wheel.poll(t0 + ms(5 * 3_600_000 - 1)), None);
        // Reset after partial progress, then the key survives further resets.
        assert!(wheel.reset(later, t0 + ms(5 * 3_600_000 + 7)));
        assert_eq!(wheel.poll(t0 + ms(5 * 3_600_000 + 6)), None);
        assert_eq!(
            wheel.poll(t0 + ms(5 * 3_600_000 + 7)),
            Some("was 100 ms, now 5 h")
        );
        assert!(!wheel.reset(later, t0));
    }

    #[test]
    fn reset_a_due_timer_back_into_the_future() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0);
        let a = wheel.insert(t0 + ms(3), 'a');
        wheel.insert(t0 + ms(3), 'b');
        assert_eq!(wheel.poll(t0 + ms(3)), Some('a'));
        let b = wheel.insert(t0 + ms(1), 'c'); // Already due.
        assert!(!wheel.reset(a, t0 + ms(50)));
        assert!(wheel.reset(b, t0 + ms(50)));
        assert_eq!(wheel.poll(t0 + ms(3)), Some('b'));
        assert_eq!(wheel.poll(t0 + ms(49)), None);
        assert_eq!(wheel.poll(t0 + ms(50)), Some('c'));
    }

    #[test]
    fn many_timers_at_the_same_instant() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0);
        let at = t0 + ms(4_321);
        let n = 10_000;
        for i in 0..n {
            wheel.insert(at, i);
        }
        assert_eq!(wheel.len(), n);
        assert_eq!(wheel.poll(at - Duration::from_nanos(1)), None);
        let mut fired = Vec::new();
        while let Some(i) = wheel.poll(at) {
            fired.push(i);
        }
        fired.sort_unstable();
        assert_eq!(fired, (0..n).collect::<Vec<_>>());
        assert!(wheel.is_empty());
    }

    #[test]
    fn big_jump_fires_everything_due_in_order() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0);
        // A small LCG: deterministic spread over 0..30 days, with sub-millisecond parts.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut dues = Vec::new();
        for i in 0..5_000usize {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let span = [64, 4_096, 262_144, 16_777_216, 2_592_000_000][i % 5];
            let due = Duration::from_micros((seed >> 11) % (span * 1_000));
            dues.push(due);
            wheel.insert(t0 + due, i);
        }
        let limit = ms(20 * 24 * 3_600_000);
        let now = t0 + limit;
        let mut last = 0;
        let mut count = 0;
        while let Some(i) = wheel.poll(now) {
            let due = dues[i];
            assert!(due <= limit, "fired early");
            // Due ticks (rounded up to the millisecond) never go backwards.
            let tick = due.as_nanos().div_ceil(1_000_000);
            assert!(tick >= last, "out of order: {tick} after {last}");
            last = tick;
            count += 1;
        }
        let due_count = dues.iter().filter(|due| **due <= limit).count();
        assert_eq!(count, due_count);
        assert_eq!(wheel.len(), dues.len() - due_count);
        let rest = run_loop(&mut wheel, now);
        assert_eq!(rest.len(), dues.len() - due_count);
    }

    #[test]
    fn past_timers_fire_at_the_next_poll() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0);
        assert_eq!(wheel.poll(t0 + ms(10_000)), None);
        let past = t0 + ms(1_000);
        wheel.insert(past, "past");
        wheel.insert(t0, "origin");
        let next = wheel.next_expiry();
        assert!(next.is_some_and(|next| next <= t0));
        let mut fired = vec![wheel.poll(t0 + ms(10_000)), wheel.poll(t0 + ms(10_000))];
        fired.sort();
        assert_eq!(fired, [Some("origin"), Some("past")]);
        assert_eq!(wheel.poll(t0 + ms(10_000)), None);
        assert_eq!(wheel.next_expiry(), None);
    }

    #[test]
    fn before_origin_is_due_immediately() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0 + ms(50));
        wheel.insert(t0, 1);
        assert_eq!(wheel.poll(t0), Some(1));
    }

    #[test]
    fn next_expiry_is_a_lower_bound() {
        let t0 = Instant::now();
        let mut wheel: TimerWheel<u32> = TimerWheel::new(t0);
        assert_eq!(wheel.next_expiry(), None);
        let far = wheel.insert(t0 + ms(5 * 3_600_000), 1);
        let mid = wheel.insert(t0 + ms(10_000), 2);
        let soon = wheel.insert(t0 + ms(70) + Duration::from_micros(500), 3);
        let bounds =
            |next: Option<Instant>, due: Instant| next.is_some_and(|next| next <= due + MS);
        assert!(bounds(
            wheel.next_expiry(),
            t0 + ms(70) + Duration::from_micros(500)
        ));
        assert_eq!(wheel.cancel(soon), Some(3));
        assert!(bounds(wheel.next_expiry(), t0 + ms(10_000)));
        assert_eq!(wheel.cancel(mid), Some(2));
        assert!(bounds(wheel.next_expiry(), t0 + ms(5 * 3_600_000)));
        // Driving the loop by it fires the last timer on time.
        assert!(wheel.reset(far, t0 + ms(5 * 3_600_000)));
        let fired = run_loop(&mut wheel, t0);
        assert_eq!(fired.len(), 1);
        assert!(fired.iter().all(|(_, at)| *at == t0 + ms(5 * 3_600_000)));
        assert_eq!(wheel.next_expiry(), None);
        let far = wheel.insert(t0 + ms(6 * 3_600_000), 4);
        assert_eq!(wheel.cancel(far), Some(4));
        assert_eq!(wheel.next_expiry(), None);
    }

    #[test]
    fn debug_is_compact() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0);
        wheel.insert(t0 + ms(70), ());
        let text = format!("{wheel:?}");
        assert!(text.contains("len: 1"), "{text}");
    }

    /// One step of the model test.
    #[derive(Debug, Clone)]
    enum Op {
        /// Insert at `now + offset - 100 ms` (so some are already due).
        Insert { offset: Duration },
        /// Cancel the `pick`-th key ever issued (modulo), possibly a stale one.
        Cancel { pick: usize },
        /// Reset the `pick`-th key ever issued to `now + offset - 100 ms`.
        Reset { pick: usize, offset: Duration },
        /// Move the clock forward and drain every due timer.
        Advance { by: Duration },
    }

    /// Offsets that reach every level and the overflow list, with sub-millisecond parts.
    fn offset() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (0u64..300_000_000).prop_map(Duration::from_nanos),
            (0u64..10_000_000).prop_map(Duration::from_micros),
            (0u64..20_000_000).prop_map(Duration::from_millis),
            (0u64..3_000_000_000).prop_map(Duration::from_millis),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => offset().prop_map(|offset| Op::Insert { offset }),
            1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
            2 => (any::<usize>(), offset()).prop_map(|(pick, offset)| Op::Reset { pick, offset }),
            3 => offset().prop_map(|by| Op::Advance { by }),
        ]
    }

    /// The live timers of the model: id → (due time, effective due tick). The effective tick is
    /// the due time rounded up to a millisecond, or the wheel's tick at insert if that is later.
    type Model = BTreeMap<usize, (Instant, u128)>;

    fn tick_of(t0: Instant, at: Instant) -> u128 {
        at.checked_duration_since(t0)
            .map_or(0, |d| d.as_nanos().div_ceil(1_000_000))
    }

    proptest! {
        #[test]
        fn matches_a_btreemap_model(ops in prop::collection::vec(op(), 1..150)) {
            let t0 = Instant::now();
            let mut wheel = TimerWheel::new(t0);
            let mut model = Model::new();
            let mut keys: Vec<TimerKey> = Vec::new();
            let mut now = t0;
            let at_from = |now: Instant, offset: Duration| {
                (now + offset).checked_sub(ms(100)).unwrap_or(now)
            };
            for op in ops {
                // After a full drain the wheel's tick is `now` rounded down.
                let wheel_tick = (now - t0).as_nanos() / 1_000_000;
                match op {
                    Op::Insert { offset } => {
                        let at = at_from(now, offset);
                        let id = keys.len();
                        keys.push(wheel.insert(at, id));
                        model.insert(id, (at, tick_of(t0, at).max(wheel_tick)));
                    }
                    Op::Cancel { pick } => {
                        if keys.is_empty() { continue; }
                        let id = pick % keys.len();
                        let expected = model.remove(&id).map(|_| id);
                        prop_assert_eq!(wheel.cancel(keys[id]), expected);
                    }
                    Op::Reset { pick, offset } => {
                        if keys.is_empty() { continue; }
                        let id = pick % keys.len();
                        let at = at_from(now, offset);
                        let live = model.contains_key(&id);
                        prop_assert_eq!(wheel.reset(keys[id], at), live);
                        if live {
                            model.insert(id, (at, tick_of(t0, at).max(wheel_tick)));
                        }
                    }
                    Op::Advance { by } => {
                        now += by;
                        let mut last = 0;
                        while let Some(id) = wheel.poll(now) {
                            let entry = model.remove(&id);
                            prop_assert!(entry.is_some(), "fired {} twice or after cancel", id);
                            let (at, tick) = entry.unwrap_or((now, 0));
                            prop_assert!(at <= now, "fired {} early", id);
                            prop_assert!(tick >= last, "fired {} out of order", id);
                            last = tick;
                        }
                        for (id, (at, _)) in &model {
                            prop_assert!(*at + MS > now, "{} not fired 1 ms after due", id);
                        }
                    }
                }
                prop_assert_eq!(wheel.len(), model.len());
                prop_assert_eq!(wheel.is_empty(), model.is_empty());
                let earliest = model.values().map(|(at, _)| *at).min();
                match (wheel.next_expiry(), earliest) {
                    (None, None) => {}
                    (Some(next), Some(earliest)) => {
                        prop_assert!(next <= earliest + MS, "next_expiry after the earliest due");
                    }
                    (next, earliest) => {
                        prop_assert!(false, "next_expiry {:?} vs earliest {:?}", next, earliest);
                    }
                }
            }
            // Whatever is left fires, on time, when the loop follows `next_expiry`.
            let rest = run_loop(&mut wheel, now);
            prop_assert_eq!(rest.len(), model.len());
            for (id, fired_at) in rest {
                let entry = model.remove(&id);
                prop_assert!(entry.is_some());
                let (at, _) = entry.unwrap_or((fired_at, 0));
                prop_assert!(fired_at >= at && fired_at <= at.max(now) + MS);
            }
        }
    }
}
