//! [`GroupCommit`]: one writer thread that turns concurrent appends into one commit per batch.
//!
//! A durable commit costs an fsync (a millisecond or more); paying one per offline message would
//! cap the server at a few hundred stored messages a second and hold each sender's ACK behind
//! everyone else's fsync. Instead every core [`submit`](GroupCommit::submit)s its messages to a
//! bounded queue and goes on with its loop. The writer thread takes everything queued — up to
//! [`MAX_BATCH`] — appends it in ONE [`Store::append`] (one transaction, one fsync), and then runs
//! each message's `done` callback with its outcome, in submission order. While one commit is on the
//! disk, the next batch accumulates in the queue, so the batch size follows the load by itself:
//! one message when idle (no added latency), hundreds under load. There is no timer and no linger.
//!
//! The callback is the only way back: it runs on the writer thread, after the commit, and should
//! only post the outcome to the submitting core (a mail) — never block or do I/O. A callback that
//! panics is contained (logged), so one bad callback cannot stop durability for everyone.
//!
//! When the queue is full the disk is not keeping up: [`submit`](GroupCommit::submit) fails fast,
//! calling `done` with [`StoreError::Busy`] on the caller's thread before it returns, instead of
//! blocking an event loop. The message is then not stored and the sender gets no ACK; its QoS
//! resend is the retry.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Appended, Offline, Removal, Store, StoreError, StoreStats};

/// Requests the queue holds before [`GroupCommit::submit`] answers [`StoreError::Busy`]. At
/// [`MAX_BATCH`] per commit that is 16 commits (tens of milliseconds of disk time) of backlog —
/// far more than a healthy disk accumulates, and bounded memory (a request is an [`Offline`]
/// whose body is a shared `Bytes`). Beyond it, waiting longer would only push ACKs past the
/// client's resend timer.
pub const QUEUE_CAPACITY: usize = 16_384;

/// Messages appended in one transaction at most. Large enough that one fsync covers what arrives
/// during a commit under heavy load; bounded so that one transaction's memory and the ACK delay of
/// its first message stay small.
pub const MAX_BATCH: usize = 1_024;

/// How often the writer sweeps expired messages out of the store
/// ([`Limits::max_age`](super::Limits::max_age)): the age limit is days, so a minute's lateness
/// is nothing, and an idle store costs one small read transaction a minute.
pub const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// Expired messages deleted per transaction of a sweep: small enough that one chunk holds the
/// writer (and the appends queued behind it, i.e. senders' ACKs) for milliseconds only; a
/// larger backlog (the server was down for a week) is swept a chunk per writer turn, between
/// batches of appends.
pub const EXPIRE_CHUNK: usize = 512;

/// Shutdown hand-overs ([`GroupCommit::hand_over`]) the lane holds: one per core is needed.
const HAND_OVER_CAPACITY: usize = 1_024;

/// The writer thread's name (visible in `top -H`, panics and profiles).
const THREAD_NAME: &str = "imedge-store";

/// Called once per submitted message with its outcome, on the writer thread after the commit (or
/// on the submitting thread, before `submit` returns, for [`StoreError::Busy`] and
/// [`StoreError::Closed`]).
pub type Done = Box<dyn FnOnce(Result<Appended, StoreError>) + Send + 'static>;

/// Called once with the outcome of a [`GroupCommit::hand_over`] (on the writer thread, or at
/// once if the lane refused it).
pub type HandOverDone = Box<dyn FnOnce(Result<Vec<Appended>, StoreError>) + Send + 'static>;

/// A request [`GroupCommit::try_submit`] could not queue, handed back untouched: the caller
/// answers it on its own path (an event loop through its outbox) instead of `done` running on
/// the loop's thread.
pub struct Refused {
    /// The message, not stored.
    pub msg: Offline,
    /// Its callback, not called.
    pub done: Done,
    /// [`StoreError::Busy`] (queue full) or [`StoreError::Closed`].
    pub error: StoreError,
}

impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refused")
            .field("to", &self.msg.to)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// Sizes of the queue and of a batch, and the expiry sweep.
#[derive(Debug, Clone, Copy)]
pub struct GroupConfig {
    /// See [`QUEUE_CAPACITY`].
    pub queue_capacity: usize,
    /// See [`MAX_BATCH`].
    pub max_batch: usize,
    /// See [`EXPIRE_EVERY`].
    pub expire_every: Duration,
    /// See [`EXPIRE_CHUNK`].
    pub expire_chunk: usize,
    /// The wall clock (ms since the Unix epoch) the sweep compares `stored_at_ms` with; tests
    /// that store at a fixed virtual time give their own.
    pub clock: fn() -> i64,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            queue_capacity: QUEUE_CAPACITY,
            max_batch: MAX_BATCH,
            expire_every: EXPIRE_EVERY,
            expire_chunk: EXPIRE_CHUNK,
            clock: system_ms,
        }
    }
}

/// The system clock in ms since the Unix epoch (the server's `Now::epoch_ms`).
pub fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What the writer has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// `append` calls (each one transaction).
    pub batches: u64,
    /// Messages appended (successfully or not).
    pub messages: u64,
    /// The largest batch so far.
    pub largest_batch: u64,
    /// Messages whose batch failed (their callbacks got the error).
    pub failed: u64,
    /// Submits refused with [`StoreError::Busy`].
    pub busy: u64,
    /// Callbacks that panicked (contained).
    pub callback_panics: u64,
    /// Removal transactions (each covers every removal queued in one writer turn).
    pub removal_batches: u64,
    /// Expiry sweeps run (each one transaction of at most [`EXPIRE_CHUNK`]).
    pub sweeps: u64,
}

/// The group-commit front of a [`Store`]: a bounded queue and one writer thread.
///
/// Share it between cores as `Arc<GroupCommit>`; [`shutdown`](Self::shutdown) (or dropping it)
/// stops accepting, drains the queue — every queued message is appended and its callback run —
/// and joins the thread.
pub struct GroupCommit {
    /// `None` only while shutting down (dropping the sender is what stops the writer).
    queue: Option<Sender<Request>>,
    /// Shutdown hand-overs: a lane of their own, so a full `queue` cannot refuse them.
    lane: Option<Sender<HandOver>>,
    writer: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    /// For [`Self::store_stats`] (lock-free counters): the cores read them through the writer
    /// and hold no store handle of their own.
    store: Arc<dyn Store>,
}

/// Shutdown leftovers of a core, stored in one transaction of their own.
struct HandOver {
    msgs: Vec<Offline>,
    done: HandOverDone,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("queued", &self.queue.as_ref().map(Sender::len))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// One queued request.
enum Request {
    /// Store a message; tell `done` once it is durable (or failed).
    Append { msg: Offline, done: Done },
    /// Delete delivered messages of a user (batched with others of the same turn).
    Remove(Removal),
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    messages: AtomicU64,
    largest_batch: AtomicU64,
    failed: AtomicU64,
    busy: AtomicU64,
    callback_panics: AtomicU64,
    removal_batches: AtomicU64,
    sweeps: AtomicU64,
}

impl GroupCommit {
    /// Starts the writer thread with the default sizes.
    pub fn start(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        Self::start_with(store, GroupConfig::default())
    }

    /// Starts the writer thread.
    pub fn start_with(store: Arc<dyn Store>, config: GroupConfig) -> Result<Self, StoreError> {
        let (queue, requests) = crossbeam_channel::bounded(config.queue_capacity.max(1));
        let (lane, hand_overs) = crossbeam_channel::bounded(HAND_OVER_CAPACITY);
        let counters = Arc::new(Counters::default());
        let writer = {
            let (counters, store) = (Arc::clone(&counters), Arc::clone(&store));
            std::thread::Builder::new()
                .name(THREAD_NAME.to_owned())
                .spawn(move || {
                    write_loop(store.as_ref(), &requests, &hand_overs, &config, &counters);
                })
                .map_err(StoreError::backend)?
        };
        Ok(Self {
            queue: Some(queue),
            lane: Some(lane),
            writer: Some(writer),
            counters,
            store,
        })
    }

    /// Queues `msg` for the next commit; `done` gets its outcome on the writer thread. Never
    /// blocks: if the queue is full (or the writer stopped) the request is handed back, `done`
    /// not called.
    pub fn try_submit(&self, msg: Offline, done: Done) -> Result<(), Box<Refused>> {
        let refused = |msg, done, error| Err(Box::new(Refused { msg, done, error }));
        let Some(queue) = &self.queue else {
            return refused(msg, done, StoreError::Closed);
        };
        match queue.try_send(Request::Append { msg, done }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(Request::Append { msg, done })) => {
                self.counters.busy.fetch_add(1, Ordering::Relaxed);
                refused(msg, done, StoreError::Busy)
            }
            Err(TrySendError::Disconnected(Request::Append { msg, done })) => {
                refused(msg, done, StoreError::Closed)
            }
            Err(_) => unreachable!("an append comes back as an append"),
        }
    }

    /// Queues `msg` for the next commit; `done` gets its outcome. Never blocks: if the queue is
    /// full, `done` is called at once with [`StoreError::Busy`], on the caller's thread (an
    /// event loop uses [`Self::try_submit`] instead).
    pub fn submit(&self, msg: Offline, done: Done) {
        if let Err(refused) = self.try_submit(msg, done) {
            (refused.done)(Err(refused.error));
        }
    }

    /// Stores `msgs` — a core's leftovers at shutdown — in one transaction, on a lane of its own
    /// that a full append queue does not refuse; `done` gets the outcome on the writer thread.
    /// Never blocks: if even the lane is full or the writer stopped, `done` gets the error now.
    pub fn hand_over(&self, msgs: Vec<Offline>, done: HandOverDone) {
        let Some(lane) = &self.lane else {
            done(Err(StoreError::Closed));
            return;
        };
        match lane.try_send(HandOver { msgs, done }) {
            Ok(()) => {}
            Err(TrySendError::Full(h)) => (h.done)(Err(StoreError::Busy)),
            Err(TrySendError::Disconnected(h)) => (h.done)(Err(StoreError::Closed)),
        }
    }

    /// The store's own counters (lock-free; no disk access).
    pub fn store_stats(&self) -> StoreStats {
        self.store.stats()
    }

    /// Queues the removal of delivered messages of `to`. Removals of one batch are committed
    /// together, after its appends. If the queue is full the removal is dropped (and counted):
    /// the messages stay stored and are delivered again at the next login, where the client's
    /// de-duplication by fingerprint filters them — nothing is lost, at worst repeated.
    pub fn remove(&self, to: &str, seqs: Vec<u64>) {
        let Some(queue) = &self.queue else {
            return;
        };
        let request = Request::Remove(Removal {
            to: to.to_owned(),
            seqs,
        });
        if queue.try_send(request).is_err() {
            self.counters.busy.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(to, "offline store queue full: removal dropped");
        }
    }

    /// Requests waiting for the writer.
    pub fn queued(&self) -> usize {
        self.queue.as_ref().map_or(0, Sender::len)
    }

    /// Counters since start.
    pub fn stats(&self) -> GroupStats {
        let c = &self.counters;
        GroupStats {
            batches: c.batches.load(Ordering::Relaxed),
            messages: c.messages.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            busy: c.busy.load(Ordering::Relaxed),
            callback_panics: c.callback_panics.load(Ordering::Relaxed),
            removal_batches: c.removal_batches.load(Ordering::Relaxed),
            sweeps: c.sweeps.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, appends everything already queued, runs its callbacks and joins the
    /// writer.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Dropping the only senders disconnects the queues once they are empty: the writer drains
        // them and returns.
        self.queue = None;
        self.lane = None;
        if let Some(writer) = self.writer.take() {
            // Dropped by one of its own callbacks: the writer finishes the queue and exits by
            // itself; joining it from itself would deadlock.
            if writer.thread().id() == std::thread::current().id() {
                return;
            }
            if writer.join().is_err() {
                tracing::error!("offline store writer thread panicked");
            }
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The writer thread: batch, append once, answer each request; remove what was delivered (one
/// transaction per turn); sweep expired messages every [`GroupConfig::expire_every`]; until the
/// queue is disconnected and empty.
fn write_loop(
    store: &dyn Store,
    requests: &Receiver<Request>,
    hand_overs: &Receiver<HandOver>,
    config: &GroupConfig,
    c: &Counters,
) {
    let max_batch = config.max_batch.max(1);
    let mut msgs = Vec::with_capacity(max_batch);
    let mut dones = Vec::with_capacity(max_batch);
    let mut removals: Vec<Removal> = Vec::new();
    // Never zero: an idle writer must wait for something.
    let every = config.expire_every.max(Duration::from_millis(1));
    let mut next_sweep = Instant::now() + every;
    // The last sweep stopped at its chunk: the next one runs at the next turn.
    let mut sweep_more = false;
    // Until shutdown: hand-overs are taken beside the appends.
    let mut lane_open = true;
    loop {
        let wait = if sweep_more {
            Duration::ZERO
        } else {
            next_sweep.saturating_duration_since(Instant::now())
        };
        let first = if lane_open {
            crossbeam_channel::select! {
                recv(hand_overs) -> h => {
                    match h {
                        Ok(h) => hand_over(store, h, c),
                        // Shutting down and the lane is empty: appends still queued go on below.
                        Err(_) => lane_open = false,
                    }
                    continue;
                }
                recv(requests) -> r => match r {
                    Ok(first) => Some(first),
                    Err(_) => {
                        while let Ok(h) = hand_overs.try_recv() {
                            hand_over(store, h, c);
                        }
                        return;
                    }
                },
                default(wait) => None,
            }
        } else {
            match requests.recv_timeout(wait) {
                Ok(first) => Some(first),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
        };
        if sweep_more || Instant::now() >= next_sweep {
            c.sweeps.fetch_add(1, Ordering::Relaxed);
            let swept = catch_unwind(AssertUnwindSafe(|| {
                store.expire((config.clock)(), config.expire_chunk)
            }));
            sweep_more = matches!(swept, Ok(Ok(super::Expired { more: true, .. })));
            if !matches!(swept, Ok(Ok(_))) {
                tracing::warn!("offline store: the expiry sweep failed");
            }
            if !sweep_more {
                next_sweep = Instant::now() + every;
            }
        }
        let mut taken = 0;
        let mut next = first;
        while let Some(request) = next.take() {
            taken += 1;
            match request {
                Request::Append { msg, done } => {
                    msgs.push(msg);
                    dones.push(done);
                }
                Request::Remove(removal) => {
                    match removals.iter_mut().find(|r| r.to == removal.to) {
                        Some(r) => r.seqs.extend(removal.seqs),
                        None => removals.push(removal),
                    }
                }
            }
            if taken < max_batch {
                next = requests.try_recv().ok();
            }
        }
        if !removals.is_empty() {
            c.removal_batches.fetch_add(1, Ordering::Relaxed);
            let removed = catch_unwind(AssertUnwindSafe(|| store.remove(&removals)));
            if !matches!(removed, Ok(Ok(()))) {
                tracing::warn!(
                    users = removals.len(),
                    "offline store: removing delivered messages failed"
                );
            }
            removals.clear();
        }
        if msgs.is_empty() {
            continue;
        }
        let n = msgs.len() as u64;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.messages.fetch_add(n, Ordering::Relaxed);
        c.largest_batch.fetch_max(n, Ordering::Relaxed);

        // A panic inside the store must not kill the writer: it fails this batch like an error.
        let result = catch_unwind(AssertUnwindSafe(|| store.append(&msgs))).unwrap_or_else(|_| {
            Err(StoreError::backend(std::io::Error::other(
                "offline store panicked while appending",
            )))
        });
        let outcomes = match result {
            Ok(outcomes) if outcomes.len() == msgs.len() => outcomes.into_iter().map(Ok).collect(),
            Ok(outcomes) => {
                let err = StoreError::Corrupt {
                    what: "append result",
                    detail: format!("{} outcomes for {} messages", outcomes.len(), msgs.len()),
                };
                vec![Err(err); msgs.len()]
            }
            Err(err) => {
                tracing::warn!(messages = msgs.len(), error = %err, "offline append failed");
                vec![Err(err); msgs.len()]
            }
        };
        c.failed.fetch_add(
            outcomes.iter().filter(|o| o.is_err()).count() as u64,
            Ordering::Relaxed,
        );
        msgs.clear();
        for (done, outcome) in dones.drain(..).zip(outcomes) {
            if catch_unwind(AssertUnwindSafe(|| done(outcome))).is_err() {
                c.callback_panics.fetch_add(1, Ordering::Relaxed);
                tracing::error!("offline store callback panicked");
            }
        }
    }
}

/// Stores one core's shutdown leftovers in their own transaction and answers.
fn hand_over(store: &dyn Store, h: HandOver, c: &Counters) {
    let result = catch_unwind(AssertUnwindSafe(|| store.append(&h.msgs))).unwrap_or_else(|_| {
        Err(StoreError::backend(std::io::Error::other(
            "offline store panicked while appending",
        )))
    });
    if let Err(error) = &result {
        tracing::error!(%error, messages = h.msgs.len(), "offline hand-over failed");
    }
    let done = h.done;
    if catch_unwind(AssertUnwindSafe(|| done(result))).is_err() {
        c.callback_panics.fetch_add(1, Ordering::Relaxed);
        tracing::error!("offline store callback panicked");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::atomic::AtomicBool;
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use crossbeam_channel::RecvTimeoutError;

    use super::*;
    use crate::store::redb::RedbStore;
    use crate::store::testutil::{msg, n_of, TempDir};
    use crate::store::{Limits, StoreStats, Stored};

    /// How long any single wait in these tests may take before the test fails.
    const WAIT: Duration = Duration::from_secs(30);

    fn now_ms() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    fn unlimited() -> Limits {
        Limits {
            max_per_user: usize::MAX,
            max_per_sender: usize::MAX,
            ..Limits::default()
        }
    }

    /// Submits `msg`, retrying (as the sender's resend would) while the queue is full.
    fn submit_retrying(
        group: &GroupCommit,
        msg: &Offline,
        done: impl Fn(Result<Appended, StoreError>) + Send + Sync + 'static,
    ) -> u64 {
        let done = Arc::new(done);
        let mut busy_retries = 0;
        loop {
            let busy = Arc::new(AtomicBool::new(false));
            let (flag, cb) = (Arc::clone(&busy), Arc::clone(&done));
            group.submit(
                msg.clone(),
                Box::new(move |r| match r {
                    Err(StoreError::Busy) => flag.store(true, Ordering::SeqCst),
                    other => cb(other),
                }),
            );
            if !busy.load(Ordering::SeqCst) {
                return busy_retries;
            }
            busy_retries += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    #[test]
    fn twenty_thousand_from_two_threads_share_few_commits() {
        const THREADS: u64 = 2;
        const PER_THREAD: u64 = 10_000;
        const USERS: u64 = 8;
        let dir = TempDir::new("group20k");
        let store = Arc::new(RedbStore::open(dir.path(), unlimited()).unwrap());
        let group = Arc::new(GroupCommit::start(store.clone()).unwrap());
        let (tx, rx) = crossbeam_channel::unbounded();
        let submitters: Vec<_> = (0..THREADS)
            .map(|t| {
                let (group, tx) = (Arc::clone(&group), tx.clone());
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let n = t * PER_THREAD + i;
                        let m = msg(&format!("u{}", n % USERS), &format!("s{t}"), n, now_ms());
                        let (to, tx) = (m.to.clone(), tx.clone());
                        submit_retrying(&group, &m, move |r| {
                            tx.send((to.clone(), t, n, r)).unwrap();
                        });
                    }
                })
            })
            .collect();
        let mut results = Vec::new();
        while results.len() < (THREADS * PER_THREAD) as usize {
            results.push(rx.recv_timeout(WAIT).expect("a callback never ran"));
        }
        for s in submitters {
            s.join().unwrap();
        }

        // Every message stored; per user the seqs are distinct, and each submitter's messages
        // got ascending seqs in the order it submitted them (sending order = delivery order).
        let mut per_user: HashMap<String, Vec<(u64, u64, u64)>> = HashMap::new();
        for (to, t, n, r) in results {
            let Ok(Appended::Stored { seq }) = r else {
                panic!("message {n}: {r:?}")
            };
            per_user.entry(to).or_default().push((seq, t, n));
        }
        for (to, mut got) in per_user {
            got.sort_unstable();
            assert!(
                got.windows(2).all(|w| w[0].0 < w[1].0),
                "{to}: repeated seq"
            );
            for t in 0..THREADS {
                let ns: Vec<u64> = got.iter().filter(|g| g.1 == t).map(|g| g.2).collect();
                assert!(ns.windows(2).all(|w| w[0] < w[1]), "{to}/s{t} out of order");
            }
            // The store hands them back in the same order, bodies intact.
            let pending = store.pending(&to, 0, usize::MAX, now_ms()).unwrap();
            let stored: Vec<(u64, u64)> = pending.iter().map(|s| (s.seq, n_of(&s.json))).collect();
            let expected: Vec<(u64, u64)> = got.iter().map(|g| (g.0, g.2)).collect();
            assert_eq!(stored, expected, "{to}");
        }

        let group = Arc::into_inner(group).unwrap();
        let gstats = group.stats();
        group.shutdown();
        let stats = store.stats();
        let messages = THREADS * PER_THREAD;
        eprintln!(
            "group commit: {messages} messages, {} commits, largest batch {}, {} busy retries",
            stats.commits, gstats.largest_batch, gstats.busy
        );
        assert_eq!(stats.stored, messages);
        assert_eq!(gstats.messages, messages);
        assert_eq!(stats.commits, gstats.batches);
        // Not a timing assertion: a commit is an fsync (≥ tens of µs) while a submit is well
        // under a µs, so batches form whatever the machine; one commit per message would be 20k.
        assert!(stats.commits * 10 <= messages, "{stats:?}");
    }

    /// A store whose `append` waits until the test opens the gate, to hold the writer busy.
    struct Gate {
        entered: Sender<usize>,
        open: Mutex<bool>,
        opened: Condvar,
        next_seq: AtomicU64,
        fail: bool,
    }

    impl Gate {
        fn new(fail: bool) -> (Arc<Self>, Receiver<usize>) {
            let (entered, appends) = crossbeam_channel::unbounded();
            let gate = Self {
                entered,
                open: Mutex::new(false),
                opened: Condvar::new(),
                next_seq: AtomicU64::new(1),
                fail,
            };
            (Arc::new(gate), appends)
        }

        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    impl Store for Gate {
        fn append(&self, batch: &[Offline]) -> Result<Vec<Appended>, StoreError> {
            self.entered.send(batch.len()).unwrap();
            let open = self.open.lock().unwrap();
            let (_open, timeout) = self.opened.wait_timeout_while(open, WAIT, |o| !*o).unwrap();
            assert!(!timeout.timed_out(), "gate never opened");
            if self.fail {
                return Err(StoreError::backend(std::io::Error::other("disk on fire")));
            }
            Ok(batch
                .iter()
                .map(|_| Appended::Stored {
                    seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
                })
                .collect())
        }
        fn pending(&self, _: &str, _: u64, _: usize, _: i64) -> Result<Vec<Stored>, StoreError> {
            Ok(Vec::new())
        }
        fn remove(&self, _: &[Removal]) -> Result<(), StoreError> {
            Ok(())
        }
        fn expire(&self, _: i64, _: usize) -> Result<crate::store::Expired, StoreError> {
            Ok(crate::store::Expired::default())
        }
        fn stats(&self) -> StoreStats {
            StoreStats::default()
        }
    }

    type Outcomes = Receiver<(u64, Result<Appended, StoreError>)>;

    /// Submits message `n` and reports its outcome on `tx`.
    fn submit_n(group: &GroupCommit, n: u64, tx: &Sender<(u64, Result<Appended, StoreError>)>) {
        let tx = tx.clone();
        group.submit(
            msg("u", "s", n, 0),
            Box::new(move |r| tx.send((n, r)).unwrap()),
        );
    }

    /// The sweep's virtual clock: a week and a day after the messages were stored at 0.
    fn eight_days_later() -> i64 {
        8 * 24 * 60 * 60 * 1000
    }

    #[test]
    fn the_sweep_deletes_expired_messages_while_running() {
        let dir = TempDir::new("sweep");
        let limits = Limits {
            max_per_user: usize::MAX,
            max_per_sender: usize::MAX,
            ..Limits::default()
        };
        let store = Arc::new(RedbStore::open(dir.path(), limits).unwrap());
        // 1,000 old messages (more than one chunk) and one fresh, stored before the writer runs.
        let mut old: Vec<Offline> = (0..1_000)
            .map(|n| msg(&format!("u{}", n % 7), "s", n, 0))
            .collect();
        old.push(msg("u0", "s", 5_000, eight_days_later()));
        store.append(&old).unwrap();
        let config = GroupConfig {
            expire_every: Duration::from_millis(20),
            expire_chunk: 300,
            clock: eight_days_later,
            ..GroupConfig::default()
        };
        let group = GroupCommit::start_with(store.clone(), config).unwrap();
        let deadline = Instant::now() + WAIT;
        while store.stats().expired < 1_000 {
            assert!(Instant::now() < deadline, "swept {:?}", store.stats());
            std::thread::sleep(Duration::from_millis(10));
        }
        // Chunk by chunk (four transactions), and only what expired.
        assert!(group.stats().sweeps >= 4, "{:?}", group.stats());
        assert_eq!(store.stats().expired, 1_000);
        let left = store
            .pending("u0", 0, usize::MAX, eight_days_later())
            .unwrap();
        assert_eq!(
            left.iter().map(|s| n_of(&s.json)).collect::<Vec<_>>(),
            [5_000]
        );
        group.shutdown();
    }

    #[test]
    fn removals_of_one_turn_share_one_transaction() {
        let dir = TempDir::new("removals");
        let store = Arc::new(RedbStore::open(dir.path(), unlimited()).unwrap());
        let batch: Vec<Offline> = (0..60)
            .map(|n| msg(&format!("u{}", n % 30), "s", n, now_ms()))
            .collect();
        store.append(&batch).unwrap();
        let commits = store.stats().commits;
        let group = GroupCommit::start(store.clone()).unwrap();
        // The writer is held in a callback while 30 users' removals queue up: it takes
        // everything queued in one turn.
        let blocker = Arc::new((Mutex::new(false), Condvar::new()));
        let (entered, blocked) = crossbeam_channel::bounded(1);
        {
            let blocker = Arc::clone(&blocker);
            group.submit(
                msg("z", "s", 999, now_ms()),
                Box::new(move |_| {
                    entered.send(()).unwrap();
                    let (lock, cv) = &*blocker;
                    let mut go = lock.lock().unwrap();
                    while !*go {
                        go = cv.wait(go).unwrap();
                    }
                }),
            );
        }
        blocked.recv_timeout(WAIT).unwrap();
        for u in 0..30 {
            let to = format!("u{u}");
            let seqs: Vec<u64> = store
                .pending(&to, 0, usize::MAX, now_ms())
                .unwrap()
                .iter()
                .map(|s| s.seq)
                .collect();
            group.remove(&to, seqs);
        }
        *blocker.0.lock().unwrap() = true;
        blocker.1.notify_all();
        group.shutdown();
        for u in 0..30 {
            assert!(store
                .pending(&format!("u{u}"), 0, usize::MAX, now_ms())
                .unwrap()
                .is_empty());
        }
        assert_eq!(store.stats().removed, 60);
        // The blocker's append, then ONE transaction for all 30 users' removals.
        assert_eq!(store.stats().commits, commits + 2);
    }

    #[test]
    fn try_submit_hands_a_refused_request_back_and_hand_over_has_its_own_lane() {
        let (gate, appends) = Gate::new(false);
        let config = GroupConfig {
            queue_capacity: 1,
            ..GroupConfig::default()
        };
        let group = GroupCommit::start_with(gate.clone(), config).unwrap();
        let (tx, rx): (_, Outcomes) = crossbeam_channel::unbounded();
        submit_n(&group, 0, &tx);
        // The writer holds message 0 in the gate; message 1 fills the queue.
        assert_eq!(appends.recv_timeout(WAIT).unwrap(), 1);
        submit_n(&group, 1, &tx);
        let refused = group
            .try_submit(
                msg("u", "s", 2, 0),
                Box::new(|_| panic!("must not be called")),
            )
            .unwrap_err();
        assert!(matches!(refused.error, StoreError::Busy), "{refused:?}");
        assert_eq!(
            n_of(&refused.msg.json),
            2,
            "the request comes back untouched"
        );
        assert_eq!(group.stats().busy, 1);
        // The append queue is full; the hand-over lane is not.
        let (htx, hrx) = crossbeam_channel::unbounded();
        group.hand_over(
            vec![msg("u", "s", 3, 0), msg("u", "s", 4, 0)],
            Box::new(move |r| htx.send(r).unwrap()),
        );
        assert!(hrx.try_recv().is_err(), "queued, not refused");
        gate.open();
        assert_eq!(hrx.recv_timeout(WAIT).unwrap().unwrap().len(), 2);
        for _ in 0..2 {
            assert!(rx.recv_timeout(WAIT).unwrap().1.is_ok());
        }
        group.shutdown();
    }

    #[test]
    fn shutdown_stores_hand_overs_and_queued_appends() {
        let dir = TempDir::new("hand-over-shutdown");
        let store = Arc::new(RedbStore::open(dir.path(), Limits::default()).unwrap());
        let group = GroupCommit::start(store.clone()).unwrap();
        let (tx, rx): (_, Outcomes) = crossbeam_channel::unbounded();
        for n in 0..100 {
            submit_n(&group, n, &tx);
        }
        let (htx, hrx) = crossbeam_channel::unbounded();
        for core in 0..2u64 {
            let htx = htx.clone();
            group.hand_over(
                (0..10).map(|i| msg("v", "s", core * 10 + i, 0)).collect(),
                Box::new(move |r| htx.send(r).unwrap()),
            );
        }
        group.shutdown();
        assert_eq!(
            hrx.try_iter().count(),
            2,
            "every hand-over answered before shutdown returns"
        );
        assert_eq!(rx.try_iter().count(), 100);
        assert_eq!(store.pending("u", 0, usize::MAX, 0).unwrap().len(), 100);
        assert_eq!(store.pending("v", 0, usize::MAX, 0).unwrap().len(), 20);
    }

    #[test]
    fn full_queue_fails_fast_and_the_rest_drain_in_one_batch() {
        let (gate, appends) = Gate::new(false);
        let config = GroupConfig {
            queue_capacity: 2,
            max_batch: 64,
            ..GroupConfig::default()
        };
        let group = GroupCommit::start_with(gate.clone(), config).unwrap();
        let (tx, rx): (_, Outcomes) = crossbeam_channel::unbounded();
        submit_n(&group, 0, &tx);
        // The writer took message 0 and is stuck in the gate: the queue is empty again.
        assert_eq!(appends.recv_timeout(WAIT).unwrap(), 1);
        submit_n(&group, 1, &tx);
        submit_n(&group, 2, &tx);
        let started = Instant::now();
        submit_n(&group, 3, &tx); // queue full
        let (n, r) = rx
            .try_recv()
            .expect("Busy must be reported before submit returns");
        assert!(started.elapsed() < WAIT);
        assert_eq!(n, 3);
        assert!(matches!(r, Err(StoreError::Busy)), "{r:?}");
        assert_eq!(group.stats().busy, 1);

        gate.open();
        let mut done: Vec<_> = (0..3).map(|_| rx.recv_timeout(WAIT).unwrap()).collect();
        done.sort_by_key(|d| d.0);
        let seqs: Vec<_> = done.iter().map(|(_, r)| r.clone().unwrap()).collect();
        assert_eq!(
            seqs,
            [1, 2, 3].map(|seq| Appended::Stored { seq }).to_vec(),
            "submission order is append order"
        );
        // 1 and 2 waited together, so they shared one append.
        assert_eq!(appends.recv_timeout(WAIT).unwrap(), 2);
        group.shutdown();
    }

    #[test]
    fn a_failed_commit_reaches_every_callback_of_its_batch() {
        let (gate, appends) = Gate::new(true);
        let group = GroupCommit::start(gate.clone()).unwrap();
        let (tx, rx): (_, Outcomes) = crossbeam_channel::unbounded();
        submit_n(&group, 0, &tx);
        assert_eq!(appends.recv_timeout(WAIT).unwrap(), 1);
        for n in 1..5 {
            submit_n(&group, n, &tx);
        }
        gate.open();
        for _ in 0..5 {
            let (n, r) = rx.recv_timeout(WAIT).unwrap();
            assert!(matches!(r, Err(StoreError::Backend(_))), "{n}: {r:?}");
        }
        assert_eq!(group.stats().failed, 5);
        group.shutdown();
    }

    #[test]
    fn a_panicking_callback_does_not_stop_the_writer() {
        let dir = TempDir::new("panic-cb");
        let store = Arc::new(RedbStore::open(dir.path(), Limits::default()).unwrap());
        let group = GroupCommit::start(store).unwrap();
        group.submit(msg("u", "s", 0, 0), Box::new(|_| panic!("callback bug")));
        let (tx, rx): (_, Outcomes) = crossbeam_channel::unbounded();
        submit_n(&group, 1, &tx);
        let (_, r) = rx.recv_timeout(WAIT).unwrap();
        assert_eq!(r.unwrap(), Appended::Stored { seq: 2 });
        assert_eq!(group.stats().callback_panics, 1);
        group.shutdown();
    }

    #[test]
    fn shutdown_appends_everything_queued() {
        let dir = TempDir::new("shutdown");
        let store = Arc::new(RedbStore::open(dir.path(), Limits::default()).unwrap());
        let group = GroupCommit::start(store.clone()).unwrap();
        let (tx, rx): (_, Outcomes) = crossbeam_channel::unbounded();
        for n in 0..500 {
            submit_n(&group, n, &tx);
        }
        group.shutdown();
        drop(tx);
        let outcomes: Vec<_> = rx.iter().collect();
        assert_eq!(outcomes.len(), 500);
        assert!(outcomes
            .iter()
            .all(|(_, r)| r.as_ref().unwrap().is_durable()));
        assert_eq!(store.pending("u", 0, usize::MAX, 0).unwrap().len(), 500);
    }

    // --- crash durability: a writer process killed with SIGKILL ---------------------------------

    /// Set (to the store's directory) in the child process to select the writer mode.
    const CHILD_ENV: &str = "IMEDGE_STORE_CHILD";
    /// The child's first message number (so rounds never reuse one).
    const CHILD_FROM_ENV: &str = "IMEDGE_STORE_CHILD_FROM";
    /// Recipients the child spreads its messages over.
    const CRASH_USERS: u64 = 4;
    /// Messages the child submits before waiting for their callbacks (so batches form).
    const CHILD_BURST: u64 = 200;
    /// The child stops by itself after this long, should the parent never kill it.
    const CHILD_MAX_RUN: Duration = Duration::from_secs(60);
    /// One kill per round, after this many ACKs were read in that round (not multiples of the
    /// burst, so the kill lands while a batch's callbacks are still printing).
    const KILL_AFTER_ACKS: [usize; 3] = [1_111, 2_345, 777];

    /// Not a test on its own: with `IMEDGE_STORE_CHILD` set it is the child process of
    /// [`acked_messages_survive_sigkill`], appending through group commit and printing
    /// `ACK <to> <seq> <n>` as soon as each message's callback reported it durable.
    #[test]
    fn crash_child_writer() {
        let Ok(dir) = std::env::var(CHILD_ENV) else {
            return;
        };
        let mut n: u64 = std::env::var(CHILD_FROM_ENV).unwrap().parse().unwrap();
        let store = Arc::new(RedbStore::open(Path::new(&dir), unlimited()).unwrap());
        let group = GroupCommit::start(store).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let deadline = Instant::now() + CHILD_MAX_RUN;
        while Instant::now() < deadline {
            for _ in 0..CHILD_BURST {
                let m = msg(&format!("u{}", n % CRASH_USERS), "s", n, now_ms());
                let (to, tx) = (m.to.clone(), tx.clone());
                group.submit(
                    m,
                    Box::new(move |r| {
                        if let Ok(Appended::Stored { seq }) = r {
                            let mut out = std::io::stdout().lock();
                            writeln!(out, "ACK {to} {seq} {n}").unwrap();
                            out.flush().unwrap();
                        }
                        tx.send(()).unwrap();
                    }),
                );
                n += 1;
            }
            for _ in 0..CHILD_BURST {
                rx.recv_timeout(WAIT).unwrap();
            }
        }
    }

    /// `(to, seq, n)` from an `ACK` line (found anywhere in it: the harness may prefix output).
    fn parse_ack(line: &str) -> Option<(String, u64, u64)> {
        let mut it = line.get(line.find("ACK ")? + 4..)?.split_whitespace();
        let to = it.next()?.to_owned();
        Some((to, it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    }

    /// Runs the writer child on `dir` from message `from`, SIGKILLs it once `kill_after` ACKs
    /// were read, and returns every ACK it printed.
    fn run_and_kill_child(dir: &Path, from: u64, kill_after: usize) -> Vec<(String, u64, u64)> {
        let module = module_path!().split_once("::").unwrap().1;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                &format!("{module}::crash_child_writer"),
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(CHILD_ENV, dir)
            .env(CHILD_FROM_ENV, from.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, lines) = crossbeam_channel::unbounded();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let errors = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });

        let mut acks = Vec::new();
        let deadline = Instant::now() + WAIT;
        while acks.len() < kill_after && Instant::now() < deadline {
            match lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => acks.extend(parse_ack(&line)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let still_running = child.try_wait().unwrap().is_none();
        child.kill().unwrap(); // SIGKILL: no destructor, no flush, no clean close of the file
        child.wait().unwrap();
        // Whatever it printed before dying was acknowledged too.
        while let Ok(line) = lines.recv_timeout(WAIT) {
            acks.extend(parse_ack(&line));
        }
        reader.join().unwrap();
        let child_stderr = errors.join().unwrap();
        assert!(
            still_running && acks.len() >= kill_after,
            "child acked {} messages, running: {still_running}; its stderr:\n{child_stderr}",
            acks.len()
        );
        acks
    }

    #[test]
    fn acked_messages_survive_sigkill() {
        let dir = TempDir::new("crash");
        let mut acks = Vec::new();
        for (round, kill_after) in KILL_AFTER_ACKS.into_iter().enumerate() {
            // Each round reopens (and so recovers) what the previous kill left.
            let from = round as u64 * 1_000_000;
            let round_acks = run_and_kill_child(dir.path(), from, kill_after);
            acks.extend(round_acks);

            let store = RedbStore::open(dir.path(), unlimited()).unwrap();
            let mut max_seq = 0;
            for u in 0..CRASH_USERS {
                let to = format!("u{u}");
                let pending = store.pending(&to, 0, usize::MAX, now_ms()).unwrap();
                // At most once and in sending order (messages committed but not yet
                // acknowledged when the child died may be there too).
                let seqs: Vec<u64> = pending.iter().map(|s| s.seq).collect();
                let ns: Vec<u64> = pending.iter().map(|s| n_of(&s.json)).collect();
                assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{to}: seq order");
                assert!(
                    ns.windows(2).all(|w| w[0] < w[1]),
                    "{to}: repeated or reordered"
                );
                let present: HashMap<u64, u64> = seqs.iter().copied().zip(ns).collect();
                for (_, seq, n) in acks.iter().filter(|a| a.0 == to) {
                    assert_eq!(
                        present.get(seq),
                        Some(n),
                        "{to}: acked seq {seq} (n {n}) lost"
                    );
                }
                max_seq = max_seq.max(seqs.last().copied().unwrap_or(0));
            }
            eprintln!(
                "crash round {round}: killed after {kill_after} ACKs; all {} acked so far present",
                acks.len()
            );
            if round + 1 == KILL_AFTER_ACKS.len() {
                // Numbering goes on after the crash.
                let next = store.append(&[msg("u0", "s", u64::MAX, now_ms())]).unwrap();
                assert!(matches!(next.as_slice(), [Appended::Stored { seq }] if *seq > max_seq));
            }
        }
    }

    // --- throughput figure (run by name) ------------------------------------------------------

    /// Messages appended one commit at a time.
    const BENCH_SINGLE: u64 = 2_000;
    /// Messages appended through group commit from two threads.
    const BENCH_GROUP: u64 = 100_000;

    /// Offered load of the paced run (msg/s, both threads together) and its length.
    const PACED_RATE: u64 = 20_000;
    const PACED_FOR: Duration = Duration::from_secs(3);

    fn percentile(sorted: &[Duration], p: f64) -> Duration {
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i]
    }

    /// `cargo test --release -p imedge-server --lib store::group::tests::throughput -- --ignored
    /// --nocapture`
    #[test]
    #[ignore = "throughput figure: run by name with --ignored --nocapture"]
    fn throughput_group_commit_vs_commit_per_message() {
        // One commit (fsync) per message.
        let dir = TempDir::new("bench-single");
        let store = RedbStore::open(dir.path(), unlimited()).unwrap();
        let started = Instant::now();
        for n in 0..BENCH_SINGLE {
            store
                .append(&[msg(&format!("u{}", n % 100), "s", n, now_ms())])
                .unwrap();
        }
        let single = started.elapsed();
        assert_eq!(store.stats().commits, BENCH_SINGLE);
        drop(store);

        // Group commit, two submitting threads (the two cores), as fast as they can.
        let dir = TempDir::new("bench-group");
        let store = Arc::new(RedbStore::open(dir.path(), unlimited()).unwrap());
        let group = Arc::new(GroupCommit::start(store.clone()).unwrap());
        let (tx, rx) = crossbeam_channel::unbounded();
        let started = Instant::now();
        let submitters: Vec<_> = (0..2u64)
            .map(|t| {
                let (group, tx) = (Arc::clone(&group), tx.clone());
                std::thread::spawn(move || {
                    for i in 0..BENCH_GROUP / 2 {
                        let n = t * BENCH_GROUP / 2 + i;
                        let m = msg(&format!("u{}", n % 100), &format!("s{t}"), n, now_ms());
                        let (tx, sent) = (tx.clone(), Instant::now());
                        submit_retrying(&group, &m, move |r| {
                            assert!(r.unwrap().is_durable());
                            tx.send(sent.elapsed()).unwrap();
                        });
                    }
                })
            })
            .collect();
        let mut latencies: Vec<Duration> = (0..BENCH_GROUP)
            .map(|_| rx.recv_timeout(WAIT).unwrap())
            .collect();
        let grouped = started.elapsed();
        for s in submitters {
            s.join().unwrap();
        }
        latencies.sort_unstable();
        let gstats = group.stats();
        let commits = store.stats().commits;

        drop(group);

        // Paced, open loop: two threads each send at fixed intended times; latency counts from
        // the intended time, so a stalled commit cannot hide behind a stalled sender.
        let dir = TempDir::new("bench-paced");
        let paced_store = Arc::new(RedbStore::open(dir.path(), unlimited()).unwrap());
        let group = Arc::new(GroupCommit::start(paced_store.clone()).unwrap());
        let per_thread = PACED_RATE / 2 * PACED_FOR.as_secs();
        let interval = Duration::from_secs(1) / (PACED_RATE / 2) as u32;
        let (tx, rx) = crossbeam_channel::unbounded();
        let started = Instant::now();
        let senders: Vec<_> = (0..2u64)
            .map(|t| {
                let (group, tx) = (Arc::clone(&group), tx.clone());
                std::thread::spawn(move || {
                    for i in 0..per_thread {
                        let intended = started + interval * i as u32;
                        if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let n = t * per_thread + i;
                        let m = msg(&format!("u{}", n % 100), &format!("s{t}"), n, now_ms());
                        let tx = tx.clone();
                        submit_retrying(&group, &m, move |r| {
                            assert!(r.unwrap().is_durable());
                            tx.send(intended.elapsed()).unwrap();
                        });
                    }
                })
            })
            .collect();
        let mut paced: Vec<Duration> = (0..per_thread * 2)
            .map(|_| rx.recv_timeout(WAIT).unwrap())
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        paced.sort_unstable();
        let paced_commits = paced_store.stats().commits;

        let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
        eprintln!(
            "offline store throughput (durable: redb Durability::Immediate, fsync per commit)"
        );
        eprintln!(
            "  one commit per message : {BENCH_SINGLE:>7} msgs in {single:>9.3?} = {:>9.0} msg/s ({:.3?}/commit)",
            rate(BENCH_SINGLE, single),
            single / BENCH_SINGLE as u32,
        );
        eprintln!(
            "  group commit, 2 threads: {BENCH_GROUP:>7} msgs in {grouped:>9.3?} = {:>9.0} msg/s ({commits} commits, mean batch {:.0}, largest {}, {} busy retries)",
            rate(BENCH_GROUP, grouped),
            BENCH_GROUP as f64 / commits as f64,
            gstats.largest_batch,
            gstats.busy,
        );
        eprintln!(
            "    submit→done latency at saturation: p50 {:.3?} p99 {:.3?} p99.9 {:.3?} max {:.3?}",
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            percentile(&latencies, 0.999),
            percentile(&latencies, 1.0),
        );
        eprintln!(
            "  group commit, paced {PACED_RATE} msg/s for {PACED_FOR:?} ({} msgs, {paced_commits} commits, mean batch {:.1}):",
            per_thread * 2,
            (per_thread * 2) as f64 / paced_commits as f64,
        );
        eprintln!(
            "    intended-send→done latency: p50 {:.3?} p99 {:.3?} p99.9 {:.3?} max {:.3?}",
            percentile(&paced, 0.50),
            percentile(&paced, 0.99),
            percentile(&paced, 0.999),
            percentile(&paced, 1.0),
        );
    }
}
