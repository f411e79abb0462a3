//! Asynchronous verify on the virtual clock: the shard posts the login to a real hook pool, the
//! test collects the pool's answers and hands them to the shard as mail when it chooses.

use std::sync::mpsc;

use super::*;
use crate::hooks::pool::HookPool;
use crate::hooks::VERIFY_UNAVAILABLE;

/// How long a test waits for the pool's answer before failing.
const PATIENCE: Duration = Duration::from_secs(20);

/// A verifier that answers each verify with the next code the test gives it (waiting for it).
struct Gated {
    codes: Mutex<mpsc::Receiver<i32>>,
}

impl ServerEvents for Gated {
    fn interests(&self) -> Interests {
        Interests::VERIFY
    }

    fn verify(&self, _login: &LoginRequest<'_>, _session: SessionInfo<'_>) -> i32 {
        // Bounded: a test that never answers gets VERIFY_UNAVAILABLE rather than a hang.
        self.codes
            .lock()
            .unwrap()
            .recv_timeout(PATIENCE)
            .unwrap_or(VERIFY_UNAVAILABLE)
    }
}

struct Pooled {
    w: World,
    codes: mpsc::Sender<i32>,
    answers: mpsc::Receiver<(CoreId, ShardMsg)>,
    pool: Arc<HookPool>,
}

impl Pooled {
    fn new(cores: usize, tune: impl Fn(&mut ShardConfig)) -> Self {
        let (codes, gate) = mpsc::channel();
        let hooks: Arc<dyn ServerEvents> = Arc::new(Gated {
            codes: Mutex::new(gate),
        });
        let (tx, answers) = mpsc::channel();
        let tx = Mutex::new(tx);
        let post: Post = Arc::new(move |core, msg| {
            let _ = tx.lock().unwrap().send((core, msg));
        });
        let pool = Arc::new(
            HookPool::new(
                1,
                16,
                Arc::clone(&hooks),
                post,
                Arc::new(Presence::new(cores)),
            )
            .unwrap(),
        );
        let mut w = World::with_config(cores, hooks, tune);
        w.shards = w
            .shards
            .into_iter()
            .map(|s| s.with_hook_pool(Arc::clone(&pool)))
            .collect();
        Self {
            w,
            codes,
            answers,
            pool,
        }
    }

    /// Lets the pending verify answer `code` and delivers the answer to its core.
    fn answer(&mut self, code: i32) {
        self.codes.send(code).unwrap();
        let (core, msg) = self.answers.recv_timeout(PATIENCE).unwrap();
        assert!(matches!(msg, ShardMsg::Verified { .. }));
        self.w
            .on(core, |shard, now, out| shard.on_mail(now, msg, out));
    }
}

#[test]
fn login_completes_when_the_verify_answers_and_other_sessions_go_on_meanwhile() {
    let mut p = Pooled::new(1, |_| {});
    // Bob logs in first (his verify answered at once).
    let bob = p.w.open(0, 2, Transport::Tcp);
    p.w.login(bob, "bob", 0);
    p.answer(0);
    assert!(p.w.shards[0].is_online("bob"));
    p.w.take(conn(bob));

    // Alice's verify is pending: nothing is sent to her, and Bob is served meanwhile.
    let alice = p.w.open(0, 1, Transport::Tcp);
    p.w.login(alice, "alice", 0);
    assert!(p.w.take(conn(alice)).is_empty());
    assert!(!p.w.shards[0].is_online("alice"));
    for _ in 0..5 {
        p.w.frame(bob, &Message::keep_alive(UserId::new("bob")));
        assert_eq!(p.w.take(conn(bob))[0].kind, Kind::KeepAliveResponse);
    }
    p.answer(0);
    let replies = p.w.take(conn(alice));
    assert_eq!(login_response(&replies[0]), LoginResponse::ok(T0_EPOCH_MS));
    assert!(p.w.shards[0].is_online("alice"));
    assert_eq!(p.w.shards[0].stats().logins, 2);
    assert_eq!(p.pool.stats().calls, 2);
}

#[test]
fn a_refusal_answered_later_closes_the_connection() {
    let mut p = Pooled::new(1, |_| {});
    let c = p.w.open(0, 1, Transport::Tcp);
    p.w.login(c, "alice", 0);
    assert!(p.w.closed.is_empty());
    p.answer(2000);
    let replies = p.w.take(conn(c));
    assert_eq!(login_response(&replies[0]).code, 2000);
    assert_eq!(p.w.closed, vec![c]);
    assert_eq!(p.w.shards[0].stats().logins_refused, 1);
}

#[test]
fn a_connection_closed_during_its_verify_ignores_the_answer() {
    let mut p = Pooled::new(1, |_| {});
    let c = p.w.open(0, 1, Transport::Tcp);
    p.w.login(c, "alice", 0);
    p.w.on(0, |shard, now, out| shard.on_closed(now, c, out));
    assert!(p.w.shards[0].verifying.is_empty());
    p.answer(0);
    assert!(p.w.take(conn(c)).is_empty());
    assert!(!p.w.shards[0].is_online("alice"));
    assert_eq!(p.w.shards[0].stats().verify_stale, 1);
    assert_eq!(p.w.shards[0].stats().logins, 0);
}

#[test]
fn a_verify_that_does_not_answer_in_time_refuses_and_its_late_answer_is_stale() {
    let mut p = Pooled::new(1, |c| c.verify_timeout = Duration::from_secs(3));
    let c = p.w.open(0, 1, Transport::Tcp);
    p.w.login(c, "alice", 0);
    p.w.advance(Duration::from_secs(2));
    assert!(p.w.take(conn(c)).is_empty());
    p.w.advance(Duration::from_secs(2));
    let replies = p.w.take(conn(c));
    assert_eq!(login_response(&replies[0]).code, VERIFY_UNAVAILABLE);
    assert_eq!(p.w.closed, vec![c]);
    assert_eq!(p.w.shards[0].stats().verify_timeouts, 1);
    p.answer(0);
    assert_eq!(p.w.shards[0].stats().verify_stale, 1);
    assert!(!p.w.shards[0].is_online("alice"));
}

#[test]
fn frames_during_a_verify_are_dropped_and_counted() {
    let mut p = Pooled::new(1, |_| {});
    let c = p.w.open(0, 1, Transport::Tcp);
    p.w.login(c, "alice", 0);
    p.w.frame(c, &Message::keep_alive(UserId::new("alice")));
    p.w.frame(c, &data("alice", "bob", "early", Some("fp1")));
    // A second login on the same connection is dropped too (one verify per session).
    p.w.login(c, "alice", 0);
    assert!(p.w.take(conn(c)).is_empty());
    assert!(p.w.closed.is_empty());
    assert_eq!(p.w.shards[0].stats().verify_frames_dropped, 3);
    p.answer(0);
    assert_eq!(
        login_response(&p.w.take(conn(c))[0]),
        LoginResponse::ok(T0_EPOCH_MS)
    );
    assert_eq!(p.pool.stats().calls, 1);
}

#[test]
fn past_max_pending_verifies_a_login_is_refused_at_once() {
    let mut p = Pooled::new(1, |c| c.max_pending_verifies = 1);
    let a = p.w.open(0, 1, Transport::Tcp);
    let b = p.w.open(0, 2, Transport::Tcp);
    p.w.login(a, "alice", 0);
    p.w.login(b, "bob", 0);
    let replies = p.w.take(conn(b));
    assert_eq!(login_response(&replies[0]).code, VERIFY_UNAVAILABLE);
    assert_eq!(p.w.closed, vec![b]);
    assert_eq!(p.w.shards[0].stats().verify_pending_full, 1);
    p.answer(0);
    assert!(p.w.shards[0].is_online("alice"));
}

#[test]
fn a_verified_login_migrates_to_its_users_shard() {
    let mut p = Pooled::new(2, |_| {});
    let uid = uid_on(1, 2, "u");
    let c = p.w.open(0, 1, Transport::Tcp);
    p.w.login(c, &uid, 0);
    assert_eq!(p.w.conn_core[&c], 0);
    p.answer(0);
    assert_eq!(p.w.conn_core[&c], 1);
    assert!(p.w.shards[1].is_online(&uid));
    assert_eq!(
        login_response(&p.w.take(conn(c))[0]),
        LoginResponse::ok(T0_EPOCH_MS)
    );
}

#[test]
fn a_udp_login_is_verified_asynchronously_and_routed() {
    let mut p = Pooled::new(2, |_| {});
    let uid = uid_on(1, 2, "u");
    let addr = peer(9);
    p.w.datagram(0, addr, &login(&uid, 0));
    // Its resend while the verify is pending is dropped, not verified twice.
    p.w.datagram(0, addr, &login(&uid, 0));
    assert!(p.w.take(Endpoint::Udp(addr)).is_empty());
    p.answer(0);
    assert!(p.w.shards[1].is_online(&uid));
    assert_eq!(p.w.shards[0].udp_routes.get(&addr), Some(&1));
    assert_eq!(
        login_response(&p.w.take(Endpoint::Udp(addr))[0]),
        LoginResponse::ok(T0_EPOCH_MS)
    );
    assert_eq!(p.w.shards[0].stats().verify_frames_dropped, 1);
}

#[test]
fn hooks_that_do_not_verify_are_not_posted() {
    // AllowAll: no pool call at all, the login completes in the same turn.
    let (tx, _answers) = mpsc::channel::<(CoreId, ShardMsg)>();
    let tx = Mutex::new(tx);
    let post: Post = Arc::new(move |core, msg| {
        let _ = tx.lock().unwrap().send((core, msg));
    });
    let hooks: Arc<dyn ServerEvents> = Arc::new(crate::hooks::AllowAll);
    let pool = Arc::new(
        HookPool::new(1, 4, Arc::clone(&hooks), post, Arc::new(Presence::new(1))).unwrap(),
    );
    let mut w = World::new(1, hooks);
    w.shards = w
        .shards
        .into_iter()
        .map(|s| s.with_hook_pool(Arc::clone(&pool)))
        .collect();
    let c = w.open(0, 1, Transport::Tcp);
    w.login(c, "alice", 0);
    assert!(w.shards[0].is_online("alice"));
    assert_eq!(pool.stats().calls, 0);
}
