//! The hook worker pool: where [`ServerEvents::verify`] runs, off the event loops.
//!
//! A shard that needs a verify posts a [`VerifyJob`] with [`HookPool::verify`] and goes on with
//! its other sessions; a worker runs the hook and mails the answer back to the shard's core as
//! [`ShardMsg::Verified`] through the same post function the store's writer uses, so a verify
//! that takes 200 ms (an HTTP call) delays no other session.
//!
//! * `threads` workers (`--hook-threads`, [`DEFAULT_HOOK_THREADS`]), each with its own bounded
//!   queue of [`HOOK_QUEUE_CAPACITY`] jobs; a job goes to the worker chosen by a hash of its uid,
//!   so one user's hook calls run in the order they were posted.
//! * A full queue never blocks a loop: [`HookPool::verify`] hands the job back and the shard
//!   refuses the login with [`VERIFY_UNAVAILABLE`] (counted in [`HookCounters::refused`]).
//! * A hook that panics is caught: the login is refused with [`VERIFY_UNAVAILABLE`], the worker
//!   goes on (counted in [`HookCounters::panics`]).
//! * [`HookPool::shutdown`] is called after the cores stopped: the queued jobs run, then the
//!   workers end and are joined.

use std::hash::BuildHasher;
use std::io;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use imedge_protocol::message::payload::LoginRequest;
use imedge_protocol::session::Transport;

use bytes::Bytes;
use imedge_protocol::{Fingerprint, UserId};

use super::{Api, Command, ServerEvents, SessionInfo, Undelivered, VERIFY_UNAVAILABLE};
use crate::shard::{shard_for, CoreId, Post, Presence, ShardMsg};

/// Default of `--hook-threads`: two workers keep one slow verify from holding up every other
/// login while costing little on a small machine; a verifier that waits on the network wants
/// more (each waiting call holds a worker).
pub const DEFAULT_HOOK_THREADS: usize = 2;

/// Jobs a worker's queue holds. A verify waits here while earlier ones run: 1,024 logins per
/// worker is a login storm's worth of seconds for a 1 ms verifier, and past it a login is refused
/// at once with [`VERIFY_UNAVAILABLE`] (the SDK retries) instead of waiting minutes. A job is
/// ~150 bytes plus its login document (uid and token are bounded by the frame size).
pub const HOOK_QUEUE_CAPACITY: usize = 1_024;

/// A job was refused: its worker's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// A login to verify, and where its answer goes.
#[derive(Debug)]
pub struct VerifyJob {
    /// The core whose shard posted it (the answer is mailed there).
    pub core: CoreId,
    /// The shard's ticket for this verification, echoed in [`ShardMsg::Verified`].
    pub ticket: u64,
    /// The login document.
    pub login: LoginRequest<'static>,
    /// The session's transport.
    pub transport: Transport,
    /// The peer's address.
    pub peer: SocketAddr,
}

/// A callback whose answer the shard does not wait for, run on the pool when it has one.
#[derive(Debug)]
pub enum Notice {
    /// [`ServerEvents::on_login`]; what it asks through its [`Api`] is mailed to the users'
    /// cores as [`ShardMsg::Command`].
    Login {
        /// The user.
        uid: UserId<'static>,
        /// The login's `extra`.
        extra: Option<String>,
        /// The session's transport.
        transport: Transport,
        /// The peer's address.
        peer: SocketAddr,
    },
    /// [`ServerEvents::on_logout`].
    Logout {
        /// The user.
        uid: UserId<'static>,
        /// The session's transport.
        transport: Transport,
        /// The peer's address.
        peer: SocketAddr,
        /// Set when the session was kicked.
        kickout_code: Option<i32>,
    },
    /// [`ServerEvents::on_c2c_after`].
    C2cAfter {
        /// Sender.
        from: UserId<'static>,
        /// Recipient.
        to: UserId<'static>,
        /// Fingerprint of a QoS message.
        fp: Option<Fingerprint<'static>>,
    },
    /// [`ServerEvents::on_offline`] when its answer does not matter (the built-in store keeps
    /// the message whatever it says).
    Offline {
        /// Sender.
        from: UserId<'static>,
        /// Recipient.
        to: Option<UserId<'static>>,
        /// Fingerprint of a QoS message.
        fp: Option<Fingerprint<'static>>,
        /// The message as it would have been sent.
        json: Bytes,
    },
    /// [`ServerEvents::on_s2c_delivered`].
    S2cDelivered {
        /// Recipient.
        to: UserId<'static>,
        /// Fingerprint.
        fp: Fingerprint<'static>,
    },
    /// [`ServerEvents::on_s2c_lost`].
    S2cLost {
        /// Recipient.
        to: UserId<'static>,
        /// Fingerprint.
        fp: Fingerprint<'static>,
        /// The message that was lost.
        json: Bytes,
    },
}

impl Notice {
    /// The uid whose worker runs it (one user's notices keep their order).
    fn uid(&self) -> &str {
        match self {
            Notice::Login { uid, .. } | Notice::Logout { uid, .. } => uid.as_str(),
            Notice::C2cAfter { from, .. } | Notice::Offline { from, .. } => from.as_str(),
            Notice::S2cDelivered { to, .. } | Notice::S2cLost { to, .. } => to.as_str(),
        }
    }

    /// Calls the hook; what it asks through `api` is left there.
    pub(crate) fn run(&self, hooks: &dyn ServerEvents, api: &mut Api) {
        match self {
            Notice::Login {
                uid,
                extra,
                transport,
                peer,
            } => {
                let info = SessionInfo {
                    uid: uid.as_str(),
                    transport: *transport,
                    peer: *peer,
                };
                hooks.on_login(extra.as_deref(), info, api);
            }
            Notice::Logout {
                uid,
                transport,
                peer,
                kickout_code,
            } => {
                let info = SessionInfo {
                    uid: uid.as_str(),
                    transport: *transport,
                    peer: *peer,
                };
                hooks.on_logout(info, *kickout_code);
            }
            Notice::C2cAfter { from, to, fp } => {
                hooks.on_c2c_after(from.as_str(), to.as_str(), fp.as_ref().map(|f| f.as_str()));
            }
            Notice::Offline { from, to, fp, json } => {
                let _ = hooks.on_offline(Undelivered {
                    from: from.as_str(),
                    to: to.as_ref().map(UserId::as_str),
                    fp: fp.as_ref().map(|f| f.as_str()),
                    json,
                });
            }
            Notice::S2cDelivered { to, fp } => hooks.on_s2c_delivered(to.as_str(), fp.as_str()),
            Notice::S2cLost { to, fp, json } => hooks.on_s2c_lost(to.as_str(), fp.as_str(), json),
        }
    }
}

enum Job {
    Verify(VerifyJob),
    Notice(Notice),
    /// Ends the worker once the jobs before it ran.
    Stop,
}

/// The pool's counters, as read by [`HookPool::stats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HookCounters {
    /// Hook calls run by the workers.
    pub calls: u64,
    /// Verifies refused because their worker's queue was full.
    pub refused: u64,
    /// Notifications dropped because their worker's queue was full.
    pub dropped: u64,
    /// Hook calls that panicked.
    pub panics: u64,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    panics: AtomicU64,
}

/// Worker threads that run the hooks, shared by every shard of a server.
pub struct HookPool {
    queues: Vec<SyncSender<Job>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<Counters>,
    /// Fixed keys: the same uid always picks the same worker.
    hasher: std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>,
}

impl std::fmt::Debug for HookPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookPool")
            .field("threads", &self.queues.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl HookPool {
    /// Starts `threads` workers (at least one) with queues of `capacity` jobs (at least one),
    /// running `hooks` and answering through `post`.
    ///
    /// # Errors
    /// A worker thread cannot be spawned.
    pub fn new(
        threads: usize,
        capacity: usize,
        hooks: Arc<dyn ServerEvents>,
        post: Post,
        presence: Arc<Presence>,
    ) -> io::Result<Self> {
        let counters = Arc::new(Counters::default());
        let mut queues = Vec::new();
        let mut handles = Vec::new();
        for n in 0..threads.max(1) {
            let (tx, rx) = sync_channel(capacity.max(1));
            let worker = Worker {
                hooks: Arc::clone(&hooks),
                post: Arc::clone(&post),
                counters: Arc::clone(&counters),
                api: Api::new(Arc::clone(&presence)),
                cores: presence.cores(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("imedge-hook-{n}"))
                .spawn(move || worker.work(&rx))?;
            queues.push(tx);
            handles.push(handle);
        }
        Ok(Self {
            queues,
            threads: Mutex::new(handles),
            counters,
            hasher: std::hash::BuildHasherDefault::default(),
        })
    }

    /// Posts a verify without waiting. A full queue refuses the job (counted): the caller
    /// refuses the login with [`VERIFY_UNAVAILABLE`].
    ///
    /// # Errors
    /// [`QueueFull`] when the uid's worker's queue is full (or the pool has shut down).
    pub fn verify(&self, job: VerifyJob) -> Result<(), QueueFull> {
        let uid = job.login.user_id.as_str();
        let queue = self.queue_for(uid).ok_or(QueueFull)?;
        queue.try_send(Job::Verify(job)).map_err(|_| {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            QueueFull
        })
    }

    /// Posts a notification without waiting; a full queue drops it (counted in
    /// [`HookCounters::dropped`]): a notification never holds up a loop.
    pub fn notify(&self, notice: Notice) {
        let posted = self
            .queue_for(notice.uid())
            .is_some_and(|queue| queue.try_send(Job::Notice(notice)).is_ok());
        if !posted {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn queue_for(&self, uid: &str) -> Option<&SyncSender<Job>> {
        let n = self.queues.len() as u64;
        // `hash % n` < n = queues.len(), a usize.
        let index = usize::try_from(self.hasher.hash_one(uid) % n).ok()?;
        self.queues.get(index)
    }

    /// The pool's counters.
    pub fn stats(&self) -> HookCounters {
        let c = &self.counters;
        HookCounters {
            calls: c.calls.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
        }
    }

    /// Runs what is queued, then ends and joins the workers. Call it after the cores stopped
    /// (a verify answered to a stopped core is dropped by the post function). Idempotent.
    pub fn shutdown(&self) {
        let handles = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        if handles.is_empty() {
            return;
        }
        for queue in &self.queues {
            // Blocks while the queue is full: the worker is draining it.
            let _ = queue.send(Job::Stop);
        }
        for handle in handles {
            if handle.join().is_err() {
                tracing::warn!("a hook worker panicked outside a hook");
            }
        }
    }
}

impl Drop for HookPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A worker's share of the pool.
struct Worker {
    hooks: Arc<dyn ServerEvents>,
    post: Post,
    counters: Arc<Counters>,
    /// Lent to `on_login`, whose commands are mailed to the users' cores.
    api: Api,
    cores: usize,
}

impl Worker {
    /// Runs the jobs of its queue until told to stop (or every sender is gone).
    fn work(mut self, rx: &Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Verify(job) => self.verify(&job),
                Job::Notice(notice) => self.notice(&notice),
                Job::Stop => break,
            }
        }
    }

    fn verify(&self, job: &VerifyJob) {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let info = SessionInfo {
            uid: job.login.user_id.as_str(),
            transport: job.transport,
            peer: job.peer,
        };
        let hooks = &*self.hooks;
        let code = match catch_unwind(AssertUnwindSafe(|| hooks.verify(&job.login, info))) {
            Ok(code) => code,
            Err(_) => {
                self.counters.panics.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    uid = job.login.user_id.as_str(),
                    "verify hook panicked: login refused"
                );
                VERIFY_UNAVAILABLE
            }
        };
        let answer = ShardMsg::Verified {
            ticket: job.ticket,
            code,
        };
        (self.post)(job.core, answer);
    }

    fn notice(&mut self, notice: &Notice) {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let (hooks, api) = (&*self.hooks, &mut self.api);
        if catch_unwind(AssertUnwindSafe(|| notice.run(hooks, api))).is_err() {
            self.counters.panics.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("hook panicked in a notification");
        }
        for command in self.api.commands.drain(..) {
            let uid = match &command {
                Command::Send { to, .. } => to,
                Command::Kick { uid, .. } => uid,
            };
            let core = shard_for(uid.as_str(), self.cores);
            (self.post)(core, ShardMsg::Command(command));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::mpsc;
    use std::time::Duration;

    use imedge_protocol::UserId;

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(20);

    fn job(uid: &str, ticket: u64) -> VerifyJob {
        VerifyJob {
            core: 3,
            ticket,
            login: LoginRequest {
                user_id: UserId::from(uid.to_owned()),
                token: Some(Cow::Borrowed("t")),
                extra: None,
                first_login_time: 0,
            },
            transport: Transport::Tcp,
            peer: "127.0.0.1:9".parse().unwrap(),
        }
    }

    /// A verifier that refuses uid "bad" (2000), panics for "boom", and waits on `gate` for
    /// "slow".
    struct Test {
        entered: Mutex<mpsc::Sender<()>>,
        open: Mutex<Receiver<()>>,
    }

    impl ServerEvents for Test {
        fn verify(&self, login: &LoginRequest<'_>, _: SessionInfo<'_>) -> i32 {
            match login.user_id.as_str() {
                "bad" => 2000,
                "boom" => panic!("verifier bug"),
                "slow" => {
                    let _ = self.entered.lock().unwrap().send(());
                    // Bounded: a failing test ends instead of hanging in the pool's shutdown.
                    let _ = self.open.lock().unwrap().recv_timeout(PATIENCE);
                    0
                }
                _ => 0,
            }
        }

        fn on_login(&self, _extra: Option<&str>, session: SessionInfo<'_>, api: &mut Api) {
            api.send(session.uid, "welcome", 7, false);
        }

        fn on_logout(&self, session: SessionInfo<'_>, _kickout_code: Option<i32>) {
            assert_ne!(session.uid, "boom", "logout hook bug");
        }
    }

    fn logout(uid: &str) -> Notice {
        Notice::Logout {
            uid: UserId::from(uid.to_owned()),
            transport: Transport::Udp,
            peer: "127.0.0.1:9".parse().unwrap(),
            kickout_code: None,
        }
    }

    #[test]
    fn on_login_commands_are_mailed_to_the_users_core() {
        let (pool, rx, _) = pool(2, 8);
        pool.notify(Notice::Login {
            uid: UserId::from("alice".to_owned()),
            extra: None,
            transport: Transport::Tcp,
            peer: "127.0.0.1:9".parse().unwrap(),
        });
        match rx.recv_timeout(PATIENCE).unwrap() {
            (
                0,
                ShardMsg::Command(Command::Send {
                    to,
                    text,
                    typeu,
                    qos,
                }),
            ) => {
                assert_eq!(
                    (to.as_str(), text.as_str(), typeu, qos),
                    ("alice", "welcome", 7, false)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_panicking_notification_is_counted_and_the_worker_goes_on() {
        let (pool, rx, _) = pool(1, 8);
        pool.notify(logout("boom"));
        pool.verify(job("alice", 1)).unwrap();
        assert_eq!(answer(&rx), (3, 1, 0));
        let stats = pool.stats();
        assert_eq!((stats.calls, stats.panics), (2, 1));
    }

    #[test]
    fn a_full_queue_drops_notifications_and_counts_them() {
        let (pool, rx, gate) = pool(1, 1);
        pool.verify(job("slow", 1)).unwrap();
        gate.entered.recv_timeout(PATIENCE).unwrap();
        // The worker holds "slow": the queue's one slot fits one notice, the rest are dropped.
        for _ in 0..4 {
            pool.notify(logout("bob"));
        }
        let dropped = pool.stats().dropped;
        assert_eq!(dropped, 3);
        gate.open.send(()).unwrap();
        assert_eq!(answer(&rx).1, 1);
        pool.shutdown();
        assert_eq!(pool.stats().calls + dropped, 5);
    }

    fn pool(threads: usize, capacity: usize) -> (HookPool, Receiver<(CoreId, ShardMsg)>, Gate) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let post: Post = Arc::new(move |core, msg| {
            let _ = tx.lock().unwrap().send((core, msg));
        });
        let (entered_tx, entered) = mpsc::channel();
        let (open, open_rx) = mpsc::channel();
        let gate = Gate { entered, open };
        let hooks = Arc::new(Test {
            entered: Mutex::new(entered_tx),
            open: Mutex::new(open_rx),
        });
        (
            HookPool::new(threads, capacity, hooks, post, Arc::new(Presence::new(1))).unwrap(),
            rx,
            gate,
        )
    }

    /// The test's side of the "slow" verify: told when it started, opened by the test.
    struct Gate {
        entered: Receiver<()>,
        open: mpsc::Sender<()>,
    }

    fn answer(rx: &Receiver<(CoreId, ShardMsg)>) -> (CoreId, u64, i32) {
        match rx.recv_timeout(PATIENCE).unwrap() {
            (core, ShardMsg::Verified { ticket, code }) => (core, ticket, code),
            (_, other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn answers_go_back_to_the_posting_core() {
        let (pool, rx, _) = pool(2, 8);
        pool.verify(job("alice", 1)).unwrap();
        assert_eq!(answer(&rx), (3, 1, 0));
        pool.verify(job("bad", 2)).unwrap();
        assert_eq!(answer(&rx), (3, 2, 2000));
        pool.shutdown();
        assert_eq!(pool.stats().calls, 2);
    }

    #[test]
    fn a_panicking_hook_refuses_and_the_worker_goes_on() {
        let (pool, rx, _) = pool(1, 8);
        pool.verify(job("boom", 1)).unwrap();
        assert_eq!(answer(&rx), (3, 1, VERIFY_UNAVAILABLE));
        pool.verify(job("alice", 2)).unwrap();
        assert_eq!(answer(&rx), (3, 2, 0));
        assert_eq!(pool.stats().panics, 1);
    }

    #[test]
    fn a_full_queue_hands_the_job_back_and_counts_it() {
        let (pool, rx, gate) = pool(1, 1);
        // The worker takes "slow" and blocks; the next job fills the queue of one.
        pool.verify(job("slow", 1)).unwrap();
        gate.entered.recv_timeout(PATIENCE).unwrap();
        let mut queued = 0;
        let mut refused = None;
        for ticket in 2..10 {
            match pool.verify(job("alice", ticket)) {
                Ok(()) => queued += 1,
                Err(QueueFull) => {
                    refused = Some(ticket);
                    break;
                }
            }
        }
        // The worker holds "slow": the queue's one slot fits one job.
        assert_eq!(queued, 1);
        assert!(refused.is_some());
        assert_eq!(pool.stats().refused, 1);
        gate.open.send(()).unwrap();
        assert_eq!(answer(&rx).1, 1);
        for _ in 0..queued {
            assert_eq!(answer(&rx).2, 0);
        }
        pool.shutdown();
    }

    #[test]
    fn one_users_jobs_keep_their_order() {
        let (pool, rx, _) = pool(4, 64);
        for ticket in 0..50 {
            pool.verify(job("carol", ticket)).unwrap();
        }
        let tickets: Vec<u64> = (0..50).map(|_| answer(&rx).1).collect();
        assert_eq!(tickets, (0..50).collect::<Vec<_>>());
    }
}
