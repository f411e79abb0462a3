//! The hook worker pool over real sockets: a verify that blocks holds up no other session of
//! its core, a panicking verify refuses the login and leaves the server up, a full queue
//! refuses at once. Progress is asserted, never timing; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod support;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imedge_protocol::message::payload::LoginRequest;
use imedge_protocol::{Decoder, Kind, Message, UserId};
use imedge_server::hooks::{Interests, ServerEvents, SessionInfo, VERIFY_UNAVAILABLE};
use support::*;

/// How long a blocked verify waits for the test before giving up (bounds a failing test).
const GATE_LIMIT: Duration = Duration::from_secs(30);

/// Verify: uid `slow` says it entered, then waits for the gate; `boom` panics; others pass.
struct Gate {
    entered: Mutex<mpsc::Sender<()>>,
    open: Mutex<mpsc::Receiver<()>>,
}

impl ServerEvents for Gate {
    fn interests(&self) -> Interests {
        Interests::VERIFY
    }

    fn verify(&self, login: &LoginRequest<'_>, _session: SessionInfo<'_>) -> i32 {
        match login.user_id.as_str() {
            "slow" => {
                let _ = self.entered.lock().unwrap().send(());
                match self.open.lock().unwrap().recv_timeout(GATE_LIMIT) {
                    Ok(()) => 0,
                    Err(_) => 2000,
                }
            }
            "boom" => panic!("verifier bug (expected by the test)"),
            _ => 0,
        }
    }
}

fn gated(
    tune: impl FnOnce(&mut imedge_server::config::ServerConfig),
) -> (Server, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (entered_tx, entered) = mpsc::channel();
    let (open, open_rx) = mpsc::channel();
    let hooks = Arc::new(Gate {
        entered: Mutex::new(entered_tx),
        open: Mutex::new(open_rx),
    });
    let mut config = config(1);
    tune(&mut config);
    (Server::with(config, hooks), entered, open)
}

fn login_code(reply: &Message<'_>) -> i32 {
    assert_eq!(reply.kind, Kind::LoginResponse);
    Decoder::new()
        .login_response(reply.text().unwrap())
        .unwrap()
        .code
}

#[test]
fn a_blocked_verify_does_not_hold_up_other_sessions_of_its_core() {
    for t in [T::Tcp, T::Udp] {
        let (server, entered, open) = gated(|_| {});
        let mut bob = server.connect(t);
        bob.login("bob");

        let mut slow = server.connect(t);
        slow.send(&login("slow", "tok", 0));
        entered.recv_timeout(GATE_LIMIT).unwrap();
        // The verify is running and blocked: Bob, on the same (only) core, is served.
        for i in 0..50 {
            if i % 2 == 0 {
                bob.send(&Message::keep_alive(UserId::new("bob")));
                bob.expect(Kind::KeepAliveResponse);
            } else {
                let mut echo = data("bob", "x", &format!("ping{i}"), None);
                echo.kind = Kind::Echo;
                bob.send(&echo);
                assert_eq!(
                    bob.expect(Kind::EchoResponse).text(),
                    Some(&*format!("ping{i}"))
                );
            }
        }
        slow.expect_quiet();
        open.send(()).unwrap();
        assert_eq!(login_code(&slow.recv()), 0, "{t:?}");
        slow.send(&Message::keep_alive(UserId::new("slow")));
        slow.expect(Kind::KeepAliveResponse);
        assert_eq!(server.api().stats().0.hook_calls, 2);
    }
}

#[test]
fn a_panicking_verify_refuses_the_login_and_the_server_stays_up() {
    let (server, _entered, _open) = gated(|_| {});
    let mut c = server.connect(T::Tcp);
    c.send(&login("boom", "tok", 0));
    let before = c.expect_closed();
    assert_eq!(login_code(&before[0]), VERIFY_UNAVAILABLE);
    let mut bob = server.connect(T::Tcp);
    bob.login("bob");
    let stats = server.api().stats().0;
    assert_eq!(stats.hook_panics, 1);
    assert_eq!(stats.logins_refused, 1);
}

#[test]
fn a_full_hook_queue_refuses_logins_with_1026_and_counts_them() {
    let (server, entered, open) = gated(|c| {
        c.hook_threads = 1;
        c.hook_queue = 1;
    });
    let mut slow = server.connect(T::Tcp);
    slow.send(&login("slow", "tok", 0));
    entered.recv_timeout(GATE_LIMIT).unwrap();
    // The worker is blocked: one login fits in its queue, the next is refused at once.
    let mut queued = server.connect(T::Tcp);
    queued.send(&login("queued", "tok", 0));
    // A frame behind a login being verified is dropped and counted: once it is, the login
    // before it has been posted to the pool.
    queued.send(&Message::keep_alive(UserId::new("queued")));
    let deadline = std::time::Instant::now() + GATE_LIMIT;
    while server.api().stats().0.verify_frames_dropped < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the queued login was never posted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut refused = server.connect(T::Tcp);
    refused.send(&login("refused", "tok", 0));
    let before = refused.expect_closed();
    assert_eq!(login_code(&before[0]), VERIFY_UNAVAILABLE);
    assert_eq!(server.api().stats().0.hook_refused, 1);
    queued.expect_quiet();

    open.send(()).unwrap();
    assert_eq!(login_code(&slow.recv()), 0);
    assert_eq!(login_code(&queued.recv()), 0);
}

/// `on_login` asks for a welcome message, `on_logout` records who left: both run on the pool.
struct Welcome {
    logouts: Mutex<Vec<String>>,
}

impl ServerEvents for Welcome {
    fn interests(&self) -> Interests {
        Interests::LOGIN | Interests::LOGOUT
    }

    fn on_login(
        &self,
        _extra: Option<&str>,
        session: SessionInfo<'_>,
        api: &mut imedge_server::hooks::Api,
    ) {
        api.send(session.uid, format!("welcome {}", session.uid), 5, false);
    }

    fn on_logout(&self, session: SessionInfo<'_>, _kickout_code: Option<i32>) {
        self.logouts.lock().unwrap().push(session.uid.to_owned());
    }
}

#[test]
fn notifications_run_on_the_pool_and_their_requests_reach_the_user() {
    let hooks = Arc::new(Welcome {
        logouts: Mutex::new(Vec::new()),
    });
    let server = Server::with(config(2), Arc::clone(&hooks) as Arc<dyn ServerEvents>);
    for (i, t) in [T::Tcp, T::Udp, T::Ws].into_iter().enumerate() {
        let uid = format!("user{i}");
        let mut c = server.connect(t);
        c.login(&uid);
        let welcome = c.expect(Kind::CommonData);
        assert_eq!(welcome.text(), Some(&*format!("welcome {uid}")));
        assert_eq!(welcome.typeu, 5);
        c.send(&Message::logout(UserId::from(uid.clone())));
        let deadline = std::time::Instant::now() + GATE_LIMIT;
        while !hooks.logouts.lock().unwrap().contains(&uid) {
            assert!(
                std::time::Instant::now() < deadline,
                "no on_logout for {uid}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let stats = server.api().stats().0;
    assert_eq!(stats.hook_calls, 6);
    assert_eq!(stats.hook_dropped, 0);
}

/// C2S hooks: a message with text `slow` waits for the gate; `drop` is refused by
/// `on_c2s_before`; everything else is accepted at once.
struct C2sGate {
    entered: Mutex<mpsc::Sender<()>>,
    open: Mutex<mpsc::Receiver<()>>,
    seen: Mutex<Vec<String>>,
}

impl ServerEvents for C2sGate {
    fn interests(&self) -> Interests {
        Interests::C2S
    }

    fn on_c2s_before(&self, msg: &Message<'_>, _session: SessionInfo<'_>) -> bool {
        match msg.text() {
            Some("slow") => {
                let _ = self.entered.lock().unwrap().send(());
                self.open.lock().unwrap().recv_timeout(GATE_LIMIT).is_ok()
            }
            Some("drop") => false,
            _ => true,
        }
    }

    fn on_c2s(
        &self,
        msg: &Message<'_>,
        _session: SessionInfo<'_>,
        _api: &mut imedge_server::hooks::Api,
    ) {
        self.seen
            .lock()
            .unwrap()
            .push(msg.text().unwrap_or_default().to_owned());
    }
}

#[test]
fn a_c2s_message_is_acked_once_its_blocked_hook_accepts_it_and_the_core_goes_on() {
    let (entered_tx, entered) = mpsc::channel();
    let (open, open_rx) = mpsc::channel();
    let hooks = Arc::new(C2sGate {
        entered: Mutex::new(entered_tx),
        open: Mutex::new(open_rx),
        seen: Mutex::new(Vec::new()),
    });
    let mut config = config(1);
    config.hook_threads = 2;
    let server = Server::with(config, Arc::clone(&hooks) as Arc<dyn ServerEvents>);
    // One core: Bob's session shares it with Alice's held message.
    let mut alice = server.connect(T::Tcp);
    alice.login("alice");
    let mut bob = server.connect(T::Udp);
    bob.login("bob");

    alice.send(&data("alice", "0", "slow", Some("fp-slow")));
    entered.recv_timeout(GATE_LIMIT).unwrap();
    for _ in 0..20 {
        bob.send(&Message::keep_alive(UserId::new("bob")));
        bob.expect(Kind::KeepAliveResponse);
    }
    // No ACK while the hook holds the message.
    alice.expect_quiet();
    open.send(()).unwrap();
    let ack = alice.expect(Kind::Ack);
    assert_eq!(ack.text(), Some("fp-slow"));

    // Refused by on_c2s_before: no ACK, the application never sees it.
    alice.send(&data("alice", "0", "drop", Some("fp-drop")));
    alice.send(&data("alice", "0", "after", Some("fp-after")));
    let ack = alice.expect(Kind::Ack);
    assert_eq!(ack.text(), Some("fp-after"));
    assert_eq!(*hooks.seen.lock().unwrap(), vec!["slow", "after"]);
}
