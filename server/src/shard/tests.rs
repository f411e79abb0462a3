//! The shard on a virtual clock: a world of shards wired by in-memory mail, whose outboxes
//! record what would be written. No sockets: this is the sans-IO logic the event loop runs.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imedge_protocol::message::payload::{LoginRequest, LoginResponse};
use imedge_protocol::{Decoder, Kind};

use super::*;
use crate::hooks::{ServerEvents, SessionInfo, TokenTable, Undelivered};

mod verify;

/// What an outbox was asked to do.
#[derive(Debug)]
enum Action {
    Send(Endpoint, String),
    Close(ConnId),
    Migrate(ConnId, CoreId, Adopt),
    Mail(CoreId, ShardMsg),
}

#[derive(Debug, Default)]
struct Recorder(Vec<Action>);

impl Outbox for Recorder {
    fn send(&mut self, to: Endpoint, msg: &Message<'_>) {
        self.0
            .push(Action::Send(to, String::from_utf8(msg.to_json()).unwrap()));
    }
    fn send_json(&mut self, to: Endpoint, json: &Bytes) {
        self.0
            .push(Action::Send(to, String::from_utf8(json.to_vec()).unwrap()));
    }
    fn close(&mut self, conn: ConnId) {
        self.0.push(Action::Close(conn));
    }
    fn migrate(&mut self, conn: ConnId, core: CoreId, login: Adopt) {
        self.0.push(Action::Migrate(conn, core, login));
    }
    fn mail(&mut self, core: CoreId, msg: ShardMsg) {
        self.0.push(Action::Mail(core, msg));
    }
}

/// Hooks that count calls and can store offline messages.
#[derive(Default)]
struct Probe {
    verifies: AtomicUsize,
    c2s: AtomicUsize,
    logouts: Mutex<Vec<(String, Option<i32>)>>,
    lost: Mutex<Vec<String>>,
    store_offline: bool,
    stored: Mutex<Vec<String>>,
    /// For each C2S message: its text, taken as a uid, and whether `Api::is_online` saw it.
    online_seen: Mutex<Vec<(String, bool)>>,
}

impl ServerEvents for Probe {
    fn verify(&self, _login: &LoginRequest<'_>, _session: SessionInfo<'_>) -> i32 {
        self.verifies.fetch_add(1, Ordering::SeqCst);
        0
    }
    fn on_logout(&self, session: SessionInfo<'_>, kickout_code: Option<i32>) {
        self.logouts
            .lock()
            .unwrap()
            .push((session.uid.to_owned(), kickout_code));
    }
    fn on_c2s(&self, msg: &Message<'_>, _session: SessionInfo<'_>, api: &mut Api) {
        self.c2s.fetch_add(1, Ordering::SeqCst);
        let uid = msg.text().unwrap_or_default().to_owned();
        let online = api.is_online(&uid);
        self.online_seen.lock().unwrap().push((uid, online));
    }
    fn on_offline(&self, msg: Undelivered<'_>) -> bool {
        if self.store_offline {
            self.stored
                .lock()
                .unwrap()
                .push(String::from_utf8(msg.json.to_vec()).unwrap());
        }
        self.store_offline
    }
    fn on_s2c_lost(&self, to: &str, _fp: &str, _json: &[u8]) {
        self.lost.lock().unwrap().push(to.to_owned());
    }
}

/// A set of shards and the connections on them.
struct World {
    shards: Vec<Shard>,
    /// Every send, in order, with the core it went out from.
    sent: Vec<(CoreId, Endpoint, Message<'static>)>,
    closed: Vec<ConnId>,
    now: Now,
    /// Where each connection lives now.
    conn_core: HashMap<ConnId, CoreId>,
}

const T0_EPOCH_MS: i64 = 1_795_769_352_000;

fn peer(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl World {
    fn new(cores: usize, hooks: Arc<dyn ServerEvents>) -> Self {
        Self::with_config(cores, hooks, |_| {})
    }

    /// A world whose shards' settings are the defaults changed by `tune`.
    fn with_config(
        cores: usize,
        hooks: Arc<dyn ServerEvents>,
        tune: impl Fn(&mut ShardConfig),
    ) -> Self {
        let mono = Instant::now();
        let presence = Arc::new(Presence::new(cores));
        let shards = (0..cores)
            .map(|core| {
                let mut config = ShardConfig::new(core as CoreId, cores);
                tune(&mut config);
                Shard::new(config, Arc::clone(&hooks), mono).with_presence(Arc::clone(&presence))
            })
            .collect();
        Self {
            shards,
            sent: Vec::new(),
            closed: Vec::new(),
            now: Now {
                mono,
                epoch_ms: T0_EPOCH_MS,
            },
            conn_core: HashMap::new(),
        }
    }

    fn open(&mut self, core: CoreId, conn: u64, transport: Transport) -> ConnId {
        let id = ConnId(conn);
        self.shards[core as usize].on_open(self.now, id, transport, peer(conn as u16));
        self.conn_core.insert(id, core);
        id
    }

    /// Runs `f` on a shard, then carries out everything it asked for until the world is quiet.
    fn on(&mut self, core: CoreId, f: impl FnOnce(&mut Shard, Now, &mut Recorder)) {
        let mut queue = std::collections::VecDeque::new();
        let mut rec = Recorder::default();
        f(&mut self.shards[core as usize], self.now, &mut rec);
        queue.push_back((core, rec));
        while let Some((core, rec)) = queue.pop_front() {
            for action in rec.0 {
                let mut next = Recorder::default();
                match action {
                    Action::Send(endpoint, json) => {
                        let mut body = json.into_bytes();
                        let msg = Decoder::new().decode(&mut body).unwrap().into_owned();
                        self.sent.push((core, endpoint, msg));
                        continue;
                    }
                    Action::Close(conn) => {
                        if self.conn_core.remove(&conn).is_some() {
                            self.closed.push(conn);
                            self.shards[core as usize].on_closed(self.now, conn, &mut next);
                        }
                    }
                    Action::Migrate(conn, to, adopt) => {
                        self.conn_core.insert(conn, to);
                        self.shards[to as usize].on_adopted(self.now, conn, adopt, &mut next);
                        queue.push_back((to, next));
                        continue;
                    }
                    Action::Mail(to, msg) => {
                        self.shards[to as usize].on_mail(self.now, msg, &mut next);
                        queue.push_back((to, next));
                        continue;
                    }
                }
                queue.push_back((core, next));
            }
        }
    }

    fn frame(&mut self, conn: ConnId, msg: &Message<'_>) {
        let core = self.conn_core[&conn];
        let mut body = msg.to_json();
        self.on(core, |shard, now, out| {
            shard.on_frame(now, conn, &mut body, out)
        });
    }

    fn datagram(&mut self, core: CoreId, from: SocketAddr, msg: &Message<'_>) {
        let mut bytes = msg.to_json();
        self.on(core, |shard, now, out| {
            shard.on_datagram(now, from, &mut bytes, out)
        });
    }

    fn advance(&mut self, by: Duration) {
        let target = self.now.mono + by;
        // Step through every timer so they fire at their own time, like the event loop would.
        loop {
            let next = self.shards.iter_mut().filter_map(Shard::poll_timeout).min();
            let step = match next {
                Some(at) if at <= target => at.max(self.now.mono),
                _ => break,
            };
            self.now.epoch_ms += (step - self.now.mono).as_millis() as i64;
            self.now.mono = step;
            for core in 0..self.shards.len() {
                self.on(core as CoreId, |shard, now, out| {
                    shard.handle_timeout(now, out)
                });
            }
        }
        self.now.epoch_ms += (target - self.now.mono).as_millis() as i64;
        self.now.mono = target;
        for core in 0..self.shards.len() {
            self.on(core as CoreId, |shard, now, out| {
                shard.handle_timeout(now, out)
            });
        }
    }

    /// Messages sent to `endpoint` since the last call.
    fn take(&mut self, endpoint: Endpoint) -> Vec<Message<'static>> {
        let (mine, rest): (Vec<_>, Vec<_>) =
            self.sent.drain(..).partition(|(_, e, _)| *e == endpoint);
        self.sent = rest;
        mine.into_iter().map(|(_, _, m)| m).collect()
    }

    fn login(&mut self, conn: ConnId, uid: &str, first_login_time: i64) {
        self.frame(conn, &login(uid, first_login_time));
    }
}

fn login(uid: &str, first_login_time: i64) -> Message<'static> {
    Message::login(LoginRequest {
        user_id: UserId::from(uid.to_owned()),
        token: Some(Cow::Borrowed("tok")),
        extra: None,
        first_login_time,
    })
}

fn data(from: &str, to: &str, text: &str, fp: Option<&str>) -> Message<'static> {
    Message::data(
        UserId::from(from.to_owned()),
        UserId::from(to.to_owned()),
        text.to_owned(),
        fp.map(|f| Fingerprint::from(f.to_owned())),
    )
}

fn login_response(msg: &Message<'_>) -> LoginResponse {
    assert_eq!(msg.kind, Kind::LoginResponse);
    Decoder::new().login_response(msg.text().unwrap()).unwrap()
}

/// A uid whose shard is `core` of `cores`.
fn uid_on(core: CoreId, cores: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| shard_for(u, cores) == core)
        .unwrap()
}

fn conn(c: ConnId) -> Endpoint {
    Endpoint::Conn(c)
}

#[test]
fn login_answers_with_server_time_and_keep_alive_is_answered() {
    let mut w = World::new(1, Arc::new(Probe::default()));
    let alice = w.open(0, 1, Transport::Tcp);
    w.login(alice, "alice", 0);
    let replies = w.take(conn(alice));
    assert_eq!(replies.len(), 1);
    assert_eq!(login_response(&replies[0]), LoginResponse::ok(T0_EPOCH_MS));
    assert_eq!(replies[0].to.as_ref().unwrap(), "alice");
    assert!(w.shards[0].is_online("alice"));

    w.frame(alice, &Message::keep_alive(UserId::new("alice")));
    let replies = w.take(conn(alice));
    assert_eq!(replies[0].kind, Kind::KeepAliveResponse);
    assert_eq!(replies[0].to.as_ref().unwrap(), "alice");

    // A re-login with a firstLoginTime gets it echoed back (SPEC §4.2).
    w.login(alice, "alice", 42);
    assert_eq!(
        login_response(&w.take(conn(alice))[0]),
        LoginResponse::ok(42)
    );
}

#[test]
fn unauthenticated_sessions_get_301_and_are_closed() {
    let mut w = World::new(1, Arc::new(Probe::default()));
    let c = w.open(0, 1, Transport::Tcp);
    let ka = Message::keep_alive(UserId::new("alice"));
    w.frame(c, &ka);
    let replies = w.take(conn(c));
    assert_eq!(replies[0].kind, Kind::Error);
    let err = Decoder::new()
        .error_response(replies[0].text().unwrap())
        .unwrap();
    assert_eq!(err.code, 301);
    assert_eq!(
        err.message.as_deref().unwrap().as_bytes(),
        &ka.to_json()[..]
    );
    assert_eq!(w.closed, vec![c]);

    // UDP: 301 too, nothing is closed or kept.
    w.datagram(0, peer(9), &data("x", "y", "hi", None));
    let replies = w.take(Endpoint::Udp(peer(9)));
    assert_eq!(replies[0].kind, Kind::Error);
    assert!(w.shards[0].sessions.is_empty());

    // Echo needs no login and is answered with type 53, everything else unchanged.
    let d = w.open(0, 2, Transport::Tcp);
    let echo = data("a", "b", "ping", Some("fp1")).echo_response();
    let mut request = echo.clone();
    request.kind = Kind::Echo;
    w.frame(d, &request);
    assert_eq!(w.take(conn(d)), vec![echo]);
}

#[test]
fn c2c_relays_with_substitute_ack_and_dedup() {
    let probe = Arc::new(Probe::default());
    let mut w = World::new(1, probe.clone());
    let a = w.open(0, 1, Transport::Tcp);
    let b = w.open(0, 2, Transport::Ws);
    w.login(a, "alice", 0);
    w.login(b, "bob", 0);
    w.take(conn(a));
    w.take(conn(b));

    // Spoofed `from` is overwritten with the session's uid (hazard S1).
    w.frame(a, &data("mallory", "bob", "hi <bob>", Some("fp-1")));
    let got = w.take(conn(b));
    assert_eq!(got, vec![data("alice", "bob", "hi <bob>", Some("fp-1"))]);
    let acks = w.take(conn(a));
    assert_eq!(acks.len(), 1);
    assert_eq!((acks[0].kind, acks[0].text()), (Kind::Ack, Some("fp-1")));
    assert_eq!(acks[0].from.as_ref().unwrap(), "bob");
    assert_eq!(acks[0].to.as_ref().unwrap(), "alice");

    // The sender's resend is ACKed again but not forwarded again (hazard R2).
    w.frame(a, &data("alice", "bob", "hi <bob>", Some("fp-1")));
    assert!(w.take(conn(b)).is_empty());
    assert_eq!(w.take(conn(a)).len(), 1);

    // Bob's ACK clears the resend queue: nothing is resent later.
    let ack = Message::ack(
        UserId::new("bob"),
        UserId::new("alice"),
        Fingerprint::new("fp-1"),
        false,
    );
    w.frame(b, &ack);
    // Someone else's ACK for the same fp would not have counted (hazard S3) — checked below.
    w.advance(Duration::from_secs(8));
    assert!(w.take(conn(b)).is_empty());
    assert!(probe.lost.lock().unwrap().is_empty());

    // Without QoS: forwarded, no ACK.
    w.frame(a, &data("alice", "bob", "plain", None));
    assert_eq!(w.take(conn(b)).len(), 1);
    assert!(w.take(conn(a)).is_empty());
}

#[test]
fn unacknowledged_relay_is_resent_once_then_lost_and_acks_are_owned() {
    let probe = Arc::new(Probe::default());
    let mut w = World::new(1, probe.clone());
    let a = w.open(0, 1, Transport::Tcp);
    let b = w.open(0, 2, Transport::Tcp);
    w.login(a, "alice", 0);
    w.login(b, "bob", 0);
    w.take(conn(b));
    w.frame(a, &data("alice", "bob", "hi", Some("fp-2")));
    w.take(conn(a));
    assert_eq!(w.take(conn(b)).len(), 1);
    // Alice "ACKs" bob's message: not hers to clear (hazard S3).
    w.frame(
        a,
        &Message::ack(
            UserId::new("alice"),
            UserId::new("x"),
            Fingerprint::new("fp-2"),
            false,
        ),
    );
    w.advance(Duration::from_millis(5_000));
    assert_eq!(
        w.take(conn(b)).len(),
        1,
        "one resend at the first tick after the 2 s grace"
    );
    w.advance(Duration::from_millis(4_900));
    assert!(probe.lost.lock().unwrap().is_empty());
    w.advance(Duration::from_millis(200));
    assert_eq!(*probe.lost.lock().unwrap(), vec!["bob".to_owned()]);
    assert!(w.take(conn(b)).is_empty(), "at most one resend");
}

#[test]
fn offline_recipient_gets_no_ack_unless_stored() {
    let mut w = World::new(1, Arc::new(Probe::default()));
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, "alice", 0);
    w.take(conn(a));
    w.frame(a, &data("alice", "carol", "hi", Some("fp-3")));
    assert!(w.take(conn(a)).is_empty());

    let probe = Arc::new(Probe {
        store_offline: true,
        ..Probe::default()
    });
    let mut w = World::new(1, probe.clone());
    let a = w.open(0, 1, Transport::Udp);
    w.login(a, "alice", 0);
    w.take(conn(a));
    w.frame(a, &data("alice", "carol", "hi", Some("fp-3")));
    let acks = w.take(conn(a));
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].from.as_ref().unwrap(), "carol");
    assert_eq!(probe.stored.lock().unwrap().len(), 1);
}

#[test]
fn duplicate_login_kicks_the_old_session_across_transports() {
    let probe = Arc::new(Probe::default());
    let mut w = World::new(1, probe.clone());
    let old = w.open(0, 1, Transport::Tcp);
    w.login(old, "alice", 0);
    w.take(conn(old));
    w.now.epoch_ms += 1000;
    let new = w.open(0, 2, Transport::Ws);
    w.login(new, "alice", 0);
    let kicked = w.take(conn(old));
    assert_eq!(kicked[0].kind, Kind::Kickout);
    assert_eq!(
        Decoder::new()
            .kickout(kicked[0].text().unwrap())
            .unwrap()
            .code,
        1
    );
    assert_eq!(w.closed, vec![old]);
    assert_eq!(
        login_response(&w.take(conn(new))[0]),
        LoginResponse::ok(T0_EPOCH_MS + 1000)
    );
    // The replaced session ends without a logout callback: alice is still online.
    assert!(probe.logouts.lock().unwrap().is_empty());
    assert!(w.shards[0].is_online("alice"));

    // An older firstLoginTime loses: kickout to the newcomer, no code-0 response first (R4).
    let late = w.open(0, 3, Transport::Tcp);
    w.login(late, "alice", T0_EPOCH_MS - 5);
    let replies = w.take(conn(late));
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].kind, Kind::Kickout);
    // Addressed to the uid it asked for, though it was never registered (SPEC §3: `to` = uid).
    assert_eq!(replies[0].to.as_ref().unwrap().as_str(), "alice");
    assert!(w.take(conn(new)).is_empty());
    assert!(w.closed.contains(&late));

    // Logout of the current session calls on_logout.
    w.frame(new, &Message::logout(UserId::new("alice")));
    assert_eq!(
        *probe.logouts.lock().unwrap(),
        vec![("alice".to_owned(), None)]
    );
    assert!(!w.shards[0].is_online("alice"));
}

#[test]
fn relogin_as_another_user_is_verified_again() {
    let table = TokenTable::parse("mallory tok\nalice secret\n").unwrap();
    let mut w = World::new(1, Arc::new(table));
    let m = w.open(0, 1, Transport::Tcp);
    w.login(m, "mallory", 0);
    assert_eq!(login_response(&w.take(conn(m))[0]).code, 0);
    // Hazard S2: the reference skipped verify here and handed over alice's account.
    w.login(m, "alice", 0);
    let replies = w.take(conn(m));
    assert_eq!(
        login_response(&replies[0]).code,
        crate::hooks::TOKEN_REFUSED
    );
    assert_eq!(replies[0].to.as_ref().unwrap(), "-1");
    assert!(!w.shards[0].is_online("alice"));
    assert_eq!(w.closed, vec![m]);
}

#[test]
fn c2s_is_acked_every_time_and_delivered_once() {
    let probe = Arc::new(Probe::default());
    let mut w = World::new(1, probe.clone());
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, "alice", 0);
    w.take(conn(a));
    for _ in 0..2 {
        w.frame(a, &data("alice", "0", "to server", Some("fp-4")));
        let acks = w.take(conn(a));
        assert_eq!(acks.len(), 1);
        assert_eq!(
            (acks[0].from.as_ref().unwrap().as_str(), acks[0].text()),
            ("0", Some("fp-4"))
        );
    }
    assert_eq!(probe.c2s.load(Ordering::SeqCst), 1);
}

#[test]
fn idle_sessions_expire_and_traffic_keeps_them() {
    let mut w = World::new(1, Arc::new(Probe::default()));
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, "alice", 0);
    w.advance(Duration::from_secs(15));
    w.frame(a, &Message::keep_alive(UserId::new("alice")));
    w.advance(Duration::from_secs(15));
    assert!(
        w.closed.is_empty(),
        "the keep-alive reset the 20 s idle timer"
    );
    w.advance(Duration::from_secs(6));
    assert_eq!(w.closed, vec![a]);
    assert!(!w.shards[0].is_online("alice"));

    // UDP: 10 s.
    w.datagram(0, peer(7), &login("bob", 0));
    assert!(w.shards[0].is_online("bob"));
    w.advance(Duration::from_millis(10_001));
    assert!(!w.shards[0].is_online("bob"));
}

#[test]
fn s2c_command_resends_once_then_reports_lost() {
    let probe = Arc::new(Probe::default());
    let mut w = World::new(2, probe.clone());
    let bob = uid_on(1, 2, "bob");
    let b = w.open(0, 1, Transport::Tcp);
    w.login(b, &bob, 0);
    w.take(conn(b));
    let command = Command::Send {
        to: UserId::from(bob.clone()),
        text: "from the server".into(),
        typeu: 99,
        qos: true,
    };
    w.on(0, |shard, now, out| shard.command(now, command, out));
    let got = w.take(conn(b));
    assert_eq!(got.len(), 1);
    assert_eq!(
        (
            got[0].from.as_ref().unwrap().as_str(),
            got[0].typeu,
            got[0].qos
        ),
        ("0", 99, true)
    );
    w.advance(Duration::from_secs(11));
    assert_eq!(w.take(conn(b)).len(), 1);
    assert_eq!(*probe.lost.lock().unwrap(), vec![bob]);
}

#[test]
fn sessions_migrate_to_their_shard_and_c2c_crosses_shards() {
    let probe = Arc::new(Probe::default());
    let mut w = World::new(2, probe.clone());
    let alice = uid_on(0, 2, "alice");
    let bob = uid_on(1, 2, "bob");
    // Both connections land on core 0; bob's moves to core 1 after verify.
    let a = w.open(0, 1, Transport::Tcp);
    let b = w.open(0, 2, Transport::Ws);
    w.login(a, &alice, 0);
    w.login(b, &bob, 0);
    assert_eq!(w.conn_core[&b], 1);
    assert_eq!(w.conn_core[&a], 0);
    assert!(w.shards[1].is_online(&bob) && w.shards[0].is_online(&alice));
    assert_eq!(login_response(&w.take(conn(b))[0]).code, 0);
    w.take(conn(a));

    w.frame(a, &data(&alice, &bob, "across", Some("fp-5")));
    assert_eq!(
        w.take(conn(b)),
        vec![data(&alice, &bob, "across", Some("fp-5"))]
    );
    let acks = w.take(conn(a));
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].from.as_ref().unwrap().as_str(), bob);

    // A UDP client of bob's shard whose datagrams reach core 0: its session lives on core 1,
    // core 0 forwards; replies go out from core 1's socket.
    let addr = peer(5000);
    let carol = uid_on(1, 2, "carol");
    w.datagram(0, addr, &login(&carol, 0));
    assert!(w.shards[1].is_online(&carol));
    assert!(w.sent.iter().any(|(core, e, m)| *core == 1
        && *e == Endpoint::Udp(addr)
        && m.kind == Kind::LoginResponse));
    w.take(Endpoint::Udp(addr));
    w.datagram(0, addr, &Message::keep_alive(UserId::from(carol.clone())));
    let replies = w.take(Endpoint::Udp(addr));
    assert_eq!(replies[0].kind, Kind::KeepAliveResponse);
    // Logout ends the session and the route: the next keep-alive is unauthenticated.
    w.datagram(0, addr, &Message::logout(UserId::from(carol.clone())));
    assert!(!w.shards[1].is_online(&carol));
    assert!(w.shards[0].udp_routes.is_empty());
    w.datagram(0, addr, &Message::keep_alive(UserId::from(carol.clone())));
    assert_eq!(w.take(Endpoint::Udp(addr))[0].kind, Kind::Error);
}

#[test]
fn kicked_udp_session_is_logged_out() {
    let mut w = World::new(1, Arc::new(Probe::default()));
    let addr = peer(6000);
    w.datagram(0, addr, &login("alice", 0));
    let t = w.open(0, 1, Transport::Tcp);
    w.login(t, "alice", 0);
    let kicked = w.take(Endpoint::Udp(addr));
    assert_eq!(kicked.last().unwrap().kind, Kind::Kickout);
    // Hazard S5: the kicked UDP client can no longer act as alice.
    w.datagram(0, addr, &Message::keep_alive(UserId::new("alice")));
    assert_eq!(w.take(Endpoint::Udp(addr))[0].kind, Kind::Error);
}

/// A real redb store in a temporary directory, whose writer's callbacks are collected so the
/// test can hand them to the shards like the mesh would.
struct TestStore {
    dir: std::path::PathBuf,
    store: Arc<dyn crate::store::Store>,
    offline: OfflineStore,
    mail: Arc<Mutex<Vec<(CoreId, ShardMsg)>>>,
}

impl TestStore {
    fn new(name: &str) -> Self {
        Self::with_reader(
            name,
            crate::store::read::READER_THREADS,
            crate::store::read::READ_QUEUE_CAPACITY,
        )
    }

    /// With a reader of `threads` threads and a queue of `capacity`.
    fn with_reader(name: &str, threads: usize, capacity: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("imedge-shard-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store: Arc<dyn crate::store::Store> = Arc::new(
            crate::store::redb::RedbStore::open(&dir, crate::store::Limits::default()).unwrap(),
        );
        // The expiry sweep runs on the virtual clock's day (messages are stored at T0).
        let config = crate::store::group::GroupConfig {
            clock: || T0_EPOCH_MS + 3_600_000,
            ..Default::default()
        };
        let writer = Arc::new(
            crate::store::group::GroupCommit::start_with(Arc::clone(&store), config).unwrap(),
        );
        let mail = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&mail);
        let post: Post = Arc::new(move |core, msg| sink.lock().unwrap().push((core, msg)));
        Self {
            dir,
            offline: OfflineStore {
                writer,
                reader: Arc::new(
                    crate::store::read::Reader::start_with(Arc::clone(&store), threads, capacity)
                        .unwrap(),
                ),
                post,
            },
            store,
            mail,
        }
    }

    /// Waits until the writer has answered `n` requests and delivers its mail.
    fn settle(&self, w: &mut World, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.mail.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "store callbacks did not arrive");
            std::thread::sleep(Duration::from_millis(2));
        }
        let mail: Vec<_> = self.mail.lock().unwrap().drain(..).collect();
        for (core, msg) in mail {
            w.on(core, |shard, now, out| shard.on_mail(now, msg, out));
        }
    }

    /// Delivers the store's mail (pages read, commits) until `endpoint` has received `n`
    /// messages; returns them.
    fn collect(&self, w: &mut World, endpoint: Endpoint, n: usize) -> Vec<Message<'static>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = w.take(endpoint);
        while got.len() < n {
            assert!(Instant::now() < deadline, "{} of {n} arrived", got.len());
            if !self.deliver(w) {
                std::thread::sleep(Duration::from_millis(2));
            }
            got.extend(w.take(endpoint));
        }
        got
    }

    /// Delivers the store's mail queued so far; whether there was any.
    fn deliver(&self, w: &mut World) -> bool {
        let mail: Vec<_> = self.mail.lock().unwrap().drain(..).collect();
        let any = !mail.is_empty();
        for (core, msg) in mail {
            w.on(core, |shard, now, out| shard.on_mail(now, msg, out));
        }
        any
    }

    /// Waits until `uid` has exactly `n` stored messages.
    fn wait_stored(&self, uid: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self
                .store
                .pending(uid, 0, usize::MAX, T0_EPOCH_MS + 3_600_000)
                .unwrap()
                .len();
            if left == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{uid}: {left} stored, expected {n}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn world_with_store(cores: usize, store: &TestStore) -> World {
    let mut w = World::new(cores, Arc::new(Probe::default()));
    w.shards = w
        .shards
        .drain(..)
        .map(|shard| shard.with_store(store.offline.clone()))
        .collect();
    w
}

#[test]
fn offline_messages_are_acked_after_commit_and_delivered_in_order_at_login() {
    let store = TestStore::new("order");
    let mut w = world_with_store(2, &store);
    let alice = uid_on(0, 2, "alice");
    let carol = uid_on(1, 2, "carol");
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, &alice, 0);
    w.take(conn(a));
    for i in 0..5 {
        w.frame(
            a,
            &data(&alice, &carol, &format!("m{i}"), Some(&format!("fp{i}"))),
        );
    }
    // No ACK before the store has committed.
    assert!(w.take(conn(a)).is_empty());
    store.settle(&mut w, 5);
    let acks = w.take(conn(a));
    assert_eq!(
        acks.iter().map(|m| m.text().unwrap()).collect::<Vec<_>>(),
        ["fp0", "fp1", "fp2", "fp3", "fp4"]
    );
    assert!(acks
        .iter()
        .all(|m| m.from.as_ref().unwrap().as_str() == carol));
    // A resend of a stored message is ACKed again but not stored twice.
    w.frame(a, &data(&alice, &carol, "m0", Some("fp0")));
    assert_eq!(w.take(conn(a)).len(), 1);
    store.wait_stored(&carol, 5);

    // Carol logs in (on another transport, landing on the other core): all five, in order.
    let c = w.open(0, 2, Transport::Ws);
    w.login(c, &carol, 0);
    let got = store.collect(&mut w, conn(c), 6);
    assert_eq!(got[0].kind, Kind::LoginResponse);
    let texts: Vec<_> = got[1..]
        .iter()
        .map(|m| m.text().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4"]);
    // She ACKs two and goes away: the other three stay stored.
    for fp in ["fp0", "fp1"] {
        w.frame(c, &ack(&carol, &alice, fp));
    }
    store.wait_stored(&carol, 3);
    w.on(1, |shard, now, out| shard.on_closed(now, c, out));
    let c2 = w.open(1, 3, Transport::Udp);
    w.login(c2, &carol, 0);
    let again: Vec<_> = store.collect(&mut w, conn(c2), 4)[1..]
        .iter()
        .map(|m| m.text().unwrap().to_owned())
        .collect();
    assert_eq!(again, ["m2", "m3", "m4"]);
    for fp in ["fp2", "fp3", "fp4"] {
        w.frame(c2, &ack(&carol, &alice, fp));
    }
    store.wait_stored(&carol, 0);
}

#[test]
fn lost_real_time_messages_and_shutdown_leftovers_are_stored() {
    let store = TestStore::new("lost");
    let mut w = world_with_store(1, &store);
    let a = w.open(0, 1, Transport::Tcp);
    let b = w.open(0, 2, Transport::Tcp);
    w.login(a, "alice", 0);
    w.login(b, "bob", 0);
    w.frame(a, &data("alice", "bob", "never acked", Some("lost-1")));
    w.frame(
        a,
        &data("alice", "bob", "pending at shutdown", Some("late-1")),
    );
    // Resent once, then lost → stored for bob's next login.
    w.advance(Duration::from_secs(4));
    w.frame(b, &ack("bob", "alice", "late-1"));
    w.frame(
        a,
        &data("alice", "bob", "pending at shutdown", Some("late-2")),
    );
    w.advance(Duration::from_secs(7));
    store.wait_stored("bob", 1);
    w.on(0, |shard, now, _| shard.store_pending_for_shutdown(now));
    store.wait_stored("bob", 2);
    let texts: Vec<_> = store
        .store
        .pending("bob", 0, 10, T0_EPOCH_MS + 3_600_000)
        .unwrap()
        .into_iter()
        .map(|s| s.fp.unwrap())
        .collect();
    assert_eq!(texts, ["lost-1", "late-2"]);
}

fn ack(from: &str, to: &str, fp: &str) -> Message<'static> {
    Message::ack(
        UserId::from(from.to_owned()),
        UserId::from(to.to_owned()),
        Fingerprint::from(fp.to_owned()),
        false,
    )
}

#[test]
fn hooks_see_who_is_online_on_every_core() {
    let probe = Arc::new(Probe::default());
    let mut w = World::new(2, probe.clone());
    let alice = uid_on(0, 2, "alice");
    let bob = uid_on(1, 2, "bob");
    let a = w.open(0, 1, Transport::Tcp);
    let b = w.open(0, 2, Transport::Tcp);
    w.login(a, &alice, 0);
    w.login(b, &bob, 0);
    assert_eq!(w.conn_core[&b], 1, "bob's session lives on the other core");
    w.frame(a, &data(&alice, "0", &bob, Some("fp-1")));
    w.frame(a, &data(&alice, "0", &alice, Some("fp-2")));
    w.frame(a, &data(&alice, "0", "nobody", Some("fp-3")));
    w.on(1, |shard, now, out| shard.on_closed(now, b, out));
    w.frame(a, &data(&alice, "0", &bob, Some("fp-4")));
    let seen = probe.online_seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (bob.clone(), true),
            (alice.clone(), true),
            ("nobody".to_owned(), false),
            (bob.clone(), false),
        ]
    );
}

fn error_code(msg: &Message<'_>) -> i32 {
    assert_eq!(msg.kind, Kind::Error);
    Decoder::new()
        .error_response(msg.text().unwrap())
        .unwrap()
        .code
}

#[test]
fn messages_with_too_long_ids_are_refused_without_ack() {
    use imedge_protocol::message::payload::ERROR_INVALID_MESSAGE;
    use imedge_protocol::message::{MAX_FINGERPRINT_LEN, MAX_USER_ID_LEN};
    let probe = Arc::new(Probe::default());
    let mut w = World::new(1, probe.clone());
    let a = w.open(0, 1, Transport::Tcp);
    let b = w.open(0, 2, Transport::Tcp);
    w.login(a, "alice", 0);
    w.login(b, "bob", 0);
    w.take(conn(a));
    w.take(conn(b));

    // A fingerprint one byte too long, C2S and C2C: no ACK, no delivery, an error 4, session kept.
    let long_fp = "f".repeat(MAX_FINGERPRINT_LEN + 1);
    w.frame(a, &data("alice", "0", "hi", Some(&long_fp)));
    w.frame(a, &data("alice", "bob", "hi", Some(&long_fp)));
    let replies = w.take(conn(a));
    assert_eq!(replies.len(), 2);
    assert!(replies
        .iter()
        .all(|r| error_code(r) == ERROR_INVALID_MESSAGE));
    // The reason is short and does not reflect the request.
    assert!(replies.iter().all(|r| r.to_json().len() < 200));
    assert!(w.take(conn(b)).is_empty());
    assert_eq!(probe.c2s.load(Ordering::SeqCst), 0);
    // A recipient id too long.
    w.frame(
        a,
        &data("alice", &"b".repeat(MAX_USER_ID_LEN + 1), "hi", Some("fp")),
    );
    assert_eq!(error_code(&w.take(conn(a))[0]), ERROR_INVALID_MESSAGE);
    assert!(w.closed.is_empty());
    assert_eq!(w.shards[0].stats().ids_too_long, 3);
    // At the limits, accepted.
    let fp = "f".repeat(MAX_FINGERPRINT_LEN);
    w.frame(a, &data("alice", "bob", "hi", Some(&fp)));
    assert_eq!(w.take(conn(b)).len(), 1);
    assert_eq!(w.take(conn(a))[0].kind, Kind::Ack);

    // From an unauthenticated UDP source: dropped without any reply (no reflection).
    w.datagram(0, peer(9), &data(&"x".repeat(1000), "y", "hi", None));
    assert!(w.take(Endpoint::Udp(peer(9))).is_empty());
    // From an unauthenticated connection: error, then closed.
    let c = w.open(0, 3, Transport::Ws);
    w.frame(c, &data("c", "bob", "hi", Some(&long_fp)));
    assert_eq!(error_code(&w.take(conn(c))[0]), ERROR_INVALID_MESSAGE);
    assert_eq!(w.closed, vec![c]);
    assert_eq!(w.shards[0].stats().ids_too_long, 5);
}

#[test]
fn logins_with_a_too_long_uid_or_as_the_server_are_refused() {
    use imedge_protocol::message::payload::ERROR_INVALID_MESSAGE;
    use imedge_protocol::message::MAX_USER_ID_LEN;
    let probe = Arc::new(Probe::default());
    let mut w = World::new(1, probe.clone());
    let long = "u".repeat(MAX_USER_ID_LEN + 1);

    // The envelope's `from` (the SDK's own uid) too long: refused at ingress.
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, &long, 0);
    assert_eq!(error_code(&w.take(conn(a))[0]), ERROR_INVALID_MESSAGE);
    assert_eq!(w.closed, vec![a]);

    // Only `loginUserId` too long: the login is refused with code 4.
    let b = w.open(0, 2, Transport::Tcp);
    let mut msg = login(&long, 0);
    msg.from = Some(UserId::new("short"));
    w.frame(b, &msg);
    let reply = w.take(conn(b));
    assert_eq!(login_response(&reply[0]).code, ERROR_INVALID_MESSAGE);
    assert_eq!(w.closed, vec![a, b]);
    assert_eq!(w.shards[0].stats().ids_too_long, 2);

    // Login as "0", the server's own id: refused before verify.
    let c = w.open(0, 3, Transport::Tcp);
    w.login(c, "0", 0);
    assert_eq!(
        login_response(&w.take(conn(c))[0]).code,
        ERROR_INVALID_MESSAGE
    );
    assert_eq!(w.closed, vec![a, b, c]);
    assert!(!w.shards[0].is_online("0"));
    assert!(!w.shards[0].is_online(&long));
    assert_eq!(probe.verifies.load(Ordering::SeqCst), 0);
    assert_eq!(w.shards[0].stats().logins_refused, 2);
    assert_eq!(w.shards[0].stats().logins, 0);
}

#[test]
fn full_resend_table_refuses_c2c_without_ack() {
    let probe = Arc::new(Probe::default());
    let mut w = World::with_config(1, probe.clone(), |c| c.qos.max_pending = 1);
    let a = w.open(0, 1, Transport::Tcp);
    let b = w.open(0, 2, Transport::Tcp);
    w.login(a, "alice", 0);
    w.login(b, "bob", 0);
    w.take(conn(a));
    w.take(conn(b));
    w.frame(a, &data("alice", "bob", "one", Some("fp-1")));
    assert_eq!(w.take(conn(b)).len(), 1);
    assert_eq!(w.take(conn(a))[0].kind, Kind::Ack);
    // The table is full: the second message is neither written nor ACKed.
    w.frame(a, &data("alice", "bob", "two", Some("fp-2")));
    assert!(w.take(conn(b)).is_empty());
    assert!(w.take(conn(a)).is_empty());
    assert_eq!(w.shards[0].stats().qos_table_full, 1);
    // Without QoS nothing needs the table.
    w.frame(a, &data("alice", "bob", "plain", None));
    assert_eq!(w.take(conn(b)).len(), 1);
    // Bob ACKs the first: the sender's resend of the second goes through and is ACKed.
    w.frame(b, &ack("bob", "alice", "fp-1"));
    w.frame(a, &data("alice", "bob", "two", Some("fp-2")));
    assert_eq!(w.take(conn(b))[0].text(), Some("two"));
    assert_eq!(w.take(conn(a))[0].kind, Kind::Ack);
}

#[test]
fn full_resend_table_takes_s2c_to_the_lost_path() {
    let probe = Arc::new(Probe::default());
    let mut w = World::with_config(1, probe.clone(), |c| c.qos.max_pending = 0);
    let b = w.open(0, 2, Transport::Tcp);
    w.login(b, "bob", 0);
    w.take(conn(b));
    let send = Command::Send {
        to: UserId::new("bob"),
        text: "from the app".into(),
        typeu: -1,
        qos: true,
    };
    w.on(0, |shard, now, out| shard.command(now, send, out));
    assert!(w.take(conn(b)).is_empty());
    assert_eq!(*probe.lost.lock().unwrap(), vec!["bob".to_owned()]);
    assert_eq!(w.shards[0].stats().qos_table_full, 1);
}

#[test]
fn resends_to_an_online_recipient_that_run_out_are_stored_and_redelivered() {
    let store = TestStore::new("redrain");
    let mut w = world_with_store(1, &store);
    let a = w.open(0, 1, Transport::Tcp);
    let b = w.open(0, 2, Transport::Tcp);
    w.login(a, "alice", 0);
    w.login(b, "bob", 0);
    w.take(conn(b));
    w.frame(a, &data("alice", "bob", "hello", Some("fp-r")));
    assert_eq!(w.take(conn(b)).len(), 1);
    // One resend, then lost at the next tick (SPEC §8.4): stored.
    w.advance(Duration::from_secs(11));
    assert_eq!(w.take(conn(b)).len(), 1, "the reference's single resend");
    store.wait_stored("bob", 1);
    // Once committed, bob (still online) gets it again from the store, without a new login.
    let again = store.collect(&mut w, conn(b), 1);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].text(), Some("hello"));
    assert_eq!(again[0].fp.as_ref().unwrap().as_str(), "fp-r");
    assert_eq!(w.shards[0].stats().redrained, 1);
    // His ACK now removes it from the store.
    w.frame(b, &ack("bob", "alice", "fp-r"));
    store.wait_stored("bob", 0);
}

#[test]
fn qos_resends_and_interval_are_configurable() {
    let probe = Arc::new(Probe::default());
    let mut w = World::with_config(1, probe.clone(), |c| {
        c.qos.max_resends = 4;
        c.qos.check_interval = Duration::from_millis(500);
    });
    let a = w.open(0, 1, Transport::Tcp);
    let b = w.open(0, 2, Transport::Tcp);
    w.login(a, "alice", 0);
    w.login(b, "bob", 0);
    w.take(conn(b));
    w.frame(a, &data("alice", "bob", "hi", Some("fp-c")));
    assert_eq!(w.take(conn(b)).len(), 1);
    // Grace 2 s, then a resend every 500 ms: four by 4 s, lost at the fifth tick.
    w.advance(Duration::from_millis(4_100));
    assert_eq!(w.take(conn(b)).len(), 4);
    assert!(probe.lost.lock().unwrap().is_empty());
    w.advance(Duration::from_millis(500));
    assert_eq!(*probe.lost.lock().unwrap(), vec!["bob".to_owned()]);
    assert_eq!(w.shards[0].stats().resent, 4);
}

#[test]
fn c2c_larger_than_max_message_bytes_is_refused_at_the_sender() {
    use imedge_protocol::message::payload::ERROR_INVALID_MESSAGE;
    let probe = Arc::new(Probe {
        store_offline: true,
        ..Probe::default()
    });
    let mut w = World::new(1, probe.clone());
    let a = w.open(0, 1, Transport::Ws);
    let b = w.open(0, 2, Transport::Tcp);
    w.login(a, "alice", 0);
    w.login(b, "bob", 0);
    w.take(conn(a));
    w.take(conn(b));
    // The relay of this one is exactly the limit: relayed and ACKed.
    let probe_len = data("alice", "bob", "", Some("fp-1")).to_json().len();
    let fits = "x".repeat(DEFAULT_MAX_MESSAGE_BYTES - probe_len);
    w.frame(a, &data("alice", "bob", &fits, Some("fp-1")));
    let got = w.take(conn(b));
    assert_eq!(got[0].to_json().len(), DEFAULT_MAX_MESSAGE_BYTES);
    assert_eq!(w.take(conn(a))[0].kind, Kind::Ack);
    // One byte more: refused at the sender, to an online and to an offline recipient alike.
    let big = format!("{fits}y");
    w.frame(a, &data("alice", "bob", &big, Some("fp-2")));
    w.frame(a, &data("alice", "carol", &big, Some("fp-3")));
    assert!(w.take(conn(b)).is_empty());
    let replies = w.take(conn(a));
    assert_eq!(replies.len(), 2);
    assert!(replies
        .iter()
        .all(|r| error_code(r) == ERROR_INVALID_MESSAGE));
    assert!(probe.stored.lock().unwrap().is_empty());
    assert_eq!(w.shards[0].stats().too_large, 2);
    assert!(w.closed.is_empty());
    // From a UDP session too.
    let dave = Endpoint::Udp(peer(7));
    w.datagram(0, peer(7), &login("dave", 0));
    w.datagram(
        0,
        peer(7),
        &data("dave", "bob", &format!("{big}yy"), Some("fp-4")),
    );
    let replies = w.take(dave);
    assert_eq!(error_code(&replies[1]), ERROR_INVALID_MESSAGE);
    assert!(w.take(conn(b)).is_empty());
    assert_eq!(w.shards[0].stats().too_large, 3);

    // The limit is a setting.
    let mut w = World::with_config(1, probe.clone(), |c| c.max_message_bytes = 1024);
    let a = w.open(0, 1, Transport::Tcp);
    let b = w.open(0, 2, Transport::Tcp);
    w.login(a, "alice", 0);
    w.login(b, "bob", 0);
    w.take(conn(b));
    w.frame(a, &data("alice", "bob", &"z".repeat(1024), None));
    assert!(w.take(conn(b)).is_empty());
    assert_eq!(w.shards[0].stats().too_large, 1);
}

#[test]
fn data_past_the_session_rate_is_dropped_without_ack() {
    let probe = Arc::new(Probe::default());
    let mut w = World::with_config(1, probe.clone(), |c| {
        c.session_msg_rate = 10;
        c.session_msg_burst = 20;
    });
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, "alice", 0);
    w.take(conn(a));
    // A burst of 25 C2S messages at one instant: 20 ACKed and handled, 5 dropped silently.
    for i in 0..25 {
        w.frame(a, &data("alice", "0", "x", Some(&format!("fp-{i}"))));
    }
    assert_eq!(w.take(conn(a)).len(), 20);
    assert_eq!(probe.c2s.load(Ordering::SeqCst), 20);
    assert_eq!(w.shards[0].stats().rate_limited, 5);
    // Keep-alives and ACKs are not limited.
    w.frame(a, &Message::keep_alive(UserId::new("alice")));
    assert_eq!(w.take(conn(a))[0].kind, Kind::KeepAliveResponse);
    // After 0.5 s, 5 more tokens: the SDK's resends of the dropped ones go through.
    w.advance(Duration::from_millis(500));
    for i in 20..26 {
        w.frame(a, &data("alice", "0", "x", Some(&format!("fp-{i}"))));
    }
    assert_eq!(w.take(conn(a)).len(), 5);
    assert_eq!(w.shards[0].stats().rate_limited, 6);
    // Sessions have their own allowance.
    let b = w.open(0, 2, Transport::Ws);
    w.login(b, "bob", 0);
    w.take(conn(b));
    w.frame(b, &data("bob", "0", "x", Some("fp-b")));
    assert_eq!(w.take(conn(b)).len(), 1);
}

#[test]
fn dedup_windows_are_bounded_in_bytes_and_count_evictions() {
    let probe = Arc::new(Probe::default());
    let mut w = World::with_config(1, probe.clone(), |c| {
        c.dedup.max_bytes = 16 << 10;
        c.session_msg_rate = 0;
    });
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, "alice", 0);
    for i in 0..5_000 {
        w.frame(a, &data("alice", "0", "x", Some(&format!("fp-{i}"))));
        if i % 500 == 0 {
            w.advance(Duration::from_secs(5));
        }
    }
    let stats = w.shards[0].stats();
    assert!(stats.dedup_evicted > 0);
    assert!(
        stats.qos_bytes <= 2 * (16 << 10),
        "{} bytes",
        stats.qos_bytes
    );
    assert_eq!(probe.c2s.load(Ordering::SeqCst), 5_000);
    // The newest is still known: its resend is ACKed, not handed to the application again.
    w.frame(a, &data("alice", "0", "x", Some("fp-4999")));
    assert_eq!(probe.c2s.load(Ordering::SeqCst), 5_000);
}

#[test]
fn stored_messages_are_written_only_with_a_resend_entry() {
    let store = TestStore::new("drain-full");
    let mut w = world_with_store(1, &store);
    for shard in &mut w.shards {
        shard.resend = QosSender::new(
            QosSenderConfig {
                max_pending: 1,
                ..QosSenderConfig::SERVER
            },
            w.now.mono,
        );
    }
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, "alice", 0);
    for i in 0..3 {
        w.frame(
            a,
            &data("alice", "carol", &format!("m{i}"), Some(&format!("fp{i}"))),
        );
    }
    store.settle(&mut w, 3);
    store.wait_stored("carol", 3);
    // Carol logs in: the table has room for one, so one is written; the others are not sent
    // untracked, they stay stored.
    let c = w.open(0, 2, Transport::Tcp);
    w.login(c, "carol", 0);
    let got: Vec<_> = store
        .collect(&mut w, conn(c), 2)
        .into_iter()
        .skip(1)
        .collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text(), Some("m0"));
    assert_eq!(w.shards[0].stats().qos_table_full, 2);
    w.frame(c, &ack("carol", "alice", "fp0"));
    store.wait_stored("carol", 2);
}

#[test]
fn a_busy_reader_is_asked_again_on_a_timer() {
    // One reader thread, a queue of one: held in a callback with one request queued, it is
    // busy for the shard.
    let store = TestStore::with_reader("read-busy", 1, 1);
    let mut w = world_with_store(1, &store);
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, "alice", 0);
    for i in 0..3 {
        w.frame(
            a,
            &data("alice", "carol", &format!("m{i}"), Some(&format!("fp{i}"))),
        );
    }
    store.settle(&mut w, 3);
    store.wait_stored("carol", 3);
    let (entered, in_callback) = crossbeam_channel::bounded(1);
    let (release, released) = crossbeam_channel::bounded::<()>(1);
    let reader = &store.offline.reader;
    let hold = Box::new(move |_| {
        entered.send(()).unwrap();
        released.recv_timeout(Duration::from_secs(10)).unwrap();
    });
    reader.submit_page("x", 0, 1, 0, hold).unwrap();
    in_callback.recv_timeout(Duration::from_secs(10)).unwrap();
    reader.submit_page("x", 0, 1, 0, Box::new(|_| {})).unwrap();

    let c = w.open(0, 2, Transport::Tcp);
    w.login(c, "carol", 0);
    assert_eq!(w.take(conn(c)).len(), 1, "the login response only");
    assert_eq!(w.shards[0].stats().read_busy, 1);
    // Still busy at the retry: counted again, asked again later — one timer, no loop.
    w.advance(offline::READ_RETRY);
    assert_eq!(w.shards[0].stats().read_busy, 2);
    release.send(()).unwrap();
    // Once the reader has room, the next retry reads the page.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < 3 {
        assert!(Instant::now() < deadline, "{} of 3 arrived", got.len());
        w.advance(offline::READ_RETRY);
        store.deliver(&mut w);
        got.extend(w.take(conn(c)));
        if got.len() < 3 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let texts: Vec<_> = got.iter().map(|m| m.text().unwrap().to_owned()).collect();
    assert_eq!(texts, ["m0", "m1", "m2"]);
}

#[test]
fn the_drain_keeps_a_window_in_flight_that_slides_with_each_ack() {
    let store = TestStore::new("window");
    let mut w = World::with_config(1, Arc::new(Probe::default()), |c| c.session_msg_rate = 0);
    w.shards = w
        .shards
        .drain(..)
        .map(|shard| shard.with_store(store.offline.clone()))
        .collect();
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, "alice", 0);
    const N: usize = 300;
    for (transport, window, prefix) in [
        (Transport::Udp, UDP_DRAIN_WINDOW, "fp"),
        (Transport::Tcp, STREAM_DRAIN_WINDOW, "again"),
    ] {
        for i in 0..N {
            w.frame(
                a,
                &data(
                    "alice",
                    "carol",
                    &format!("m{i}"),
                    Some(&format!("{prefix}{i}")),
                ),
            );
        }
        store.settle(&mut w, N);
        store.wait_stored("carol", N);
        let _ = w.take(conn(a));
        let c = w.open(0, 10 + window as u64, transport);
        w.login(c, "carol", 0);
        let mut got: Vec<_> = store.collect(&mut w, conn(c), 1 + window)[1..].to_vec();
        // The next page is read ahead, but no more than the window is sent.
        std::thread::sleep(Duration::from_millis(50));
        store.deliver(&mut w);
        got.extend(w.take(conn(c)));
        assert_eq!(got.len(), window, "{transport:?}");
        // Each ACK lets exactly one more out, in order, across the page boundary.
        for i in 0..N {
            let fp = got[i].fp.as_ref().unwrap().as_str().to_owned();
            assert_eq!(fp, format!("{prefix}{i}"), "{transport:?}");
            w.frame(c, &ack("carol", "alice", &fp));
            let want = (window + i + 1).min(N);
            got.extend(store.collect(&mut w, conn(c), want - got.len()));
            assert_eq!(got.len(), want, "{transport:?} after {} ACKs", i + 1);
        }
        store.wait_stored("carol", 0);
        w.on(0, |shard, now, out| shard.on_closed(now, c, out));
    }
}

#[test]
fn a_page_read_for_an_earlier_login_is_not_sent_again() {
    let store = TestStore::new("generation");
    let mut w = world_with_store(1, &store);
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, "alice", 0);
    for i in 0..3 {
        w.frame(
            a,
            &data("alice", "carol", &format!("m{i}"), Some(&format!("fp{i}"))),
        );
    }
    store.settle(&mut w, 3);
    store.wait_stored("carol", 3);
    // Carol logs in twice before either page arrives (a quick re-login): the page read for the
    // first login is dropped, the second one's is sent, once.
    let c1 = w.open(0, 2, Transport::Tcp);
    w.login(c1, "carol", 0);
    let c2 = w.open(0, 3, Transport::Tcp);
    w.login(c2, "carol", T0_EPOCH_MS + 1);
    let got = store.collect(&mut w, conn(c2), 4);
    std::thread::sleep(Duration::from_millis(50));
    store.deliver(&mut w);
    let more = w.take(conn(c2));
    let texts: Vec<_> = got[1..]
        .iter()
        .chain(&more)
        .filter(|m| m.kind == Kind::CommonData)
        .map(|m| m.text().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["m0", "m1", "m2"]);
    assert!(w.take(conn(c1)).iter().all(|m| m.kind != Kind::CommonData));
}

#[test]
fn a_stored_message_lost_by_an_online_recipient_is_sent_again_once() {
    let store = TestStore::new("stored-lost");
    let mut w = world_with_store(1, &store);
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, "alice", 0);
    for i in 0..2 {
        w.frame(
            a,
            &data("alice", "carol", &format!("m{i}"), Some(&format!("fp{i}"))),
        );
    }
    store.settle(&mut w, 2);
    store.wait_stored("carol", 2);
    let c = w.open(0, 2, Transport::Tcp);
    w.login(c, "carol", 0);
    let got = store.collect(&mut w, conn(c), 3);
    assert_eq!(got[1].text(), Some("m0"));
    // Carol ACKs m0 but not m1: one resend, then lost (still stored) ...
    w.frame(c, &ack("carol", "alice", "fp0"));
    store.wait_stored("carol", 1);
    w.advance(Duration::from_secs(11));
    assert_eq!(w.take(conn(c)).len(), 1, "the reference's single resend");
    // ... and, carol being still online, read again and sent once more (m0 is not).
    let again = store.collect(&mut w, conn(c), 1);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].text(), Some("m1"));
    assert_eq!(w.shards[0].stats().redrained, 1);
    // Lost again: it waits for the next login (no endless loop).
    w.advance(Duration::from_secs(11));
    assert_eq!(w.take(conn(c)).len(), 1, "the resend of the second attempt");
    std::thread::sleep(Duration::from_millis(50));
    store.deliver(&mut w);
    assert!(w.take(conn(c)).is_empty());
    assert_eq!(w.shards[0].stats().redrained, 1);
    store.wait_stored("carol", 1);
}

#[test]
fn a_full_store_queue_refuses_at_once_without_ack() {
    use crate::store::{Appended, Expired, Removal, Store, StoreError, StoreStats, Stored};
    /// A store whose appends wait for the test's go-ahead, to hold the writer busy.
    struct Held(crossbeam_channel::Receiver<()>, Arc<dyn Store>);
    impl Store for Held {
        fn append(&self, batch: &[crate::store::Offline]) -> Result<Vec<Appended>, StoreError> {
            let _ = self.0.recv_timeout(Duration::from_secs(10));
            self.1.append(batch)
        }
        fn pending(&self, to: &str, a: u64, l: usize, n: i64) -> Result<Vec<Stored>, StoreError> {
            self.1.pending(to, a, l, n)
        }
        fn remove(&self, removals: &[Removal]) -> Result<(), StoreError> {
            self.1.remove(removals)
        }
        fn expire(&self, now_ms: i64, max: usize) -> Result<Expired, StoreError> {
            self.1.expire(now_ms, max)
        }
        fn stats(&self) -> StoreStats {
            self.1.stats()
        }
    }
    let store = TestStore::new("full-queue");
    let (go, held) = crossbeam_channel::unbounded();
    let config = crate::store::group::GroupConfig {
        queue_capacity: 1,
        clock: || T0_EPOCH_MS,
        ..Default::default()
    };
    let writer = Arc::new(
        crate::store::group::GroupCommit::start_with(
            Arc::new(Held(held, Arc::clone(&store.store))),
            config,
        )
        .unwrap(),
    );
    let mut offline = store.offline.clone();
    offline.writer = Arc::clone(&writer);
    let mut w = World::new(1, Arc::new(Probe::default()));
    w.shards = w
        .shards
        .drain(..)
        .map(|shard| shard.with_store(offline.clone()))
        .collect();
    let a = w.open(0, 1, Transport::Tcp);
    w.login(a, "alice", 0);
    w.take(conn(a));
    // m0 holds the writer, m1 fills the queue, m2 is refused at once.
    w.frame(a, &data("alice", "carol", "m0", Some("fp0")));
    let deadline = Instant::now() + Duration::from_secs(10);
    while writer.queued() > 0 {
        assert!(Instant::now() < deadline, "the writer never took m0");
        std::thread::yield_now();
    }
    w.frame(a, &data("alice", "carol", "m1", Some("fp1")));
    w.frame(a, &data("alice", "carol", "m2", Some("fp2")));
    assert_eq!(w.shards[0].stats().store_refused, 1);
    assert_eq!(writer.stats().busy, 1);
    assert!(
        w.take(conn(a)).is_empty(),
        "no ACK before a commit, none for m2"
    );
    go.send(()).unwrap();
    go.send(()).unwrap();
    // Only m0 and m1 are ACKed (substitute ACKs from carol), once stored.
    let mut acked = Vec::new();
    while acked.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "ACKs of the stored messages: {acked:?}"
        );
        store.deliver(&mut w);
        acked.extend(
            w.take(conn(a))
                .into_iter()
                .filter(|m| m.kind == Kind::Ack)
                .map(|m| m.text().unwrap().to_owned()),
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(acked, ["fp0", "fp1"]);
    store.wait_stored("carol", 2);
}
