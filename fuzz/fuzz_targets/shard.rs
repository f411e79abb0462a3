//! Fuzz target: the shards (two cores) fed arbitrary sequences of messages from several TCP,
//! WebSocket and UDP clients — logins under a few uids, data with and without QoS, ACKs,
//! keep-alives, logouts, echo, garbage bodies, closes and the passing of time — wired by
//! in-memory mail as the event loops wire them. Besides "never panics": once every connection
//! is closed and the idle timeouts have passed, no session is left online.
#![no_main]

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use imedge_protocol::message::payload::LoginRequest;
use imedge_protocol::session::Transport;
use imedge_protocol::{Fingerprint, Kind, Message, UserId};
use imedge_server::hooks::AllowAll;
use imedge_server::shard::{
    Adopt, ConnId, CoreId, Endpoint, Now, Outbox, Presence, Shard, ShardConfig, ShardMsg,
};

const CORES: usize = 2;
const CONNS: u8 = 4;
const UIDS: [&str; 5] = ["a", "b", "c", "0", "dd"];
const FPS: [&str; 4] = ["f0", "f1", "f2", "f3"];

enum Action {
    Close(ConnId),
    Migrate(ConnId, CoreId, Adopt),
    Mail(CoreId, ShardMsg),
}

#[derive(Default)]
struct Recorder(Vec<Action>);

impl Outbox for Recorder {
    fn send(&mut self, _to: Endpoint, msg: &Message<'_>) {
        // Everything the shard sends must encode.
        let _ = msg.to_json();
    }
    fn send_json(&mut self, _to: Endpoint, _json: &Bytes) {}
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

struct World {
    shards: Vec<Shard>,
    now: Now,
    conn_core: HashMap<ConnId, CoreId>,
}

impl World {
    fn on(&mut self, core: CoreId, f: impl FnOnce(&mut Shard, Now, &mut Recorder)) {
        let mut queue = VecDeque::new();
        let mut rec = Recorder::default();
        f(&mut self.shards[core as usize], self.now, &mut rec);
        queue.push_back((core, rec));
        while let Some((core, rec)) = queue.pop_front() {
            for action in rec.0 {
                let mut next = Recorder::default();
                let at = match action {
                    Action::Close(conn) => {
                        if self.conn_core.remove(&conn).is_some() {
                            self.shards[core as usize].on_closed(self.now, conn, &mut next);
                        }
                        core
                    }
                    Action::Migrate(conn, to, adopt) => {
                        self.conn_core.insert(conn, to);
                        self.shards[to as usize].on_adopted(self.now, conn, adopt, &mut next);
                        to
                    }
                    Action::Mail(to, msg) => {
                        self.shards[to as usize].on_mail(self.now, msg, &mut next);
                        to
                    }
                };
                queue.push_back((at, next));
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        let target = self.now.mono + by;
        loop {
            let next = self.shards.iter_mut().filter_map(Shard::poll_timeout).min();
            let step = match next {
                Some(at) if at <= target => at.max(self.now.mono),
                _ => break,
            };
            self.now.epoch_ms += (step - self.now.mono).as_millis() as i64;
            self.now.mono = step;
            for core in 0..CORES {
                self.on(core as CoreId, |shard, now, out| {
                    shard.handle_timeout(now, out)
                });
            }
        }
        self.now.epoch_ms += (target - self.now.mono).as_millis() as i64;
        self.now.mono = target;
        for core in 0..CORES {
            self.on(core as CoreId, |shard, now, out| {
                shard.handle_timeout(now, out)
            });
        }
    }
}

fn udp_peer(k: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 2], 1000 + u16::from(k)))
}

/// One message of the small grammar the fuzzer steers.
fn message(op: u8, arg: u8, uid: &'static str) -> Option<Message<'static>> {
    let other = UIDS[usize::from(arg >> 4) % UIDS.len()];
    let fp = FPS[usize::from(arg >> 2) % FPS.len()];
    Some(match op % 7 {
        0 => Message::login(LoginRequest {
            user_id: UserId::from(uid.to_owned()),
            token: Some(Cow::Borrowed("t")),
            extra: None,
            first_login_time: i64::from(arg & 3) - 1,
        }),
        1 => Message::keep_alive(UserId::from(uid.to_owned())),
        2 => Message::data(
            UserId::from(uid.to_owned()),
            UserId::from(other.to_owned()),
            "x",
            (arg & 1 == 1).then(|| Fingerprint::from(fp.to_owned())),
        ),
        3 => Message::ack(
            UserId::from(uid.to_owned()),
            UserId::from(other.to_owned()),
            Fingerprint::from(fp.to_owned()),
            false,
        ),
        4 => Message::logout(UserId::from(uid.to_owned())),
        5 => Message::new(Kind::Echo).from(UserId::from(uid.to_owned())),
        _ => return None,
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mono = Instant::now();
    let presence = Arc::new(Presence::new(CORES));
    let hooks = Arc::new(AllowAll);
    let mut world = World {
        shards: (0..CORES)
            .map(|core| {
                Shard::new(ShardConfig::new(core as CoreId, CORES), hooks.clone(), mono)
                    .with_presence(Arc::clone(&presence))
            })
            .collect(),
        now: Now {
            mono,
            epoch_ms: 1_800_000_000_000,
        },
        conn_core: HashMap::new(),
    };
    let mut next_conn = 0u64;
    let mut conns: [Option<ConnId>; CONNS as usize] = [None; CONNS as usize];
    let mut ops = data.chunks_exact(3);
    for op in &mut ops {
        let [kind, who, arg] = [op[0], op[1], op[2]];
        let k = who % CONNS;
        let uid = UIDS[usize::from(who >> 2) % UIDS.len()];
        match kind % 8 {
            // A TCP or WebSocket client opens a connection.
            0 => {
                if conns[usize::from(k)].is_none() {
                    next_conn += 1;
                    let id = ConnId(next_conn);
                    let core = (arg % CORES as u8) as CoreId;
                    let transport = if arg & 2 == 0 {
                        Transport::Tcp
                    } else {
                        Transport::Ws
                    };
                    let peer = SocketAddr::from(([127, 0, 0, 1], 2000 + next_conn as u16));
                    world.shards[core as usize].on_open(world.now, id, transport, peer);
                    world.conn_core.insert(id, core);
                    conns[usize::from(k)] = Some(id);
                }
            }
            // It sends a message, or garbage.
            1 | 2 => {
                let Some(id) = conns[usize::from(k)] else {
                    continue;
                };
                let Some(&core) = world.conn_core.get(&id) else {
                    conns[usize::from(k)] = None;
                    continue;
                };
                let mut body = match message(arg, op[1] ^ arg, uid) {
                    Some(msg) => msg.to_json(),
                    None => op.repeat(usize::from(arg & 7)),
                };
                world.on(core, |shard, now, out| {
                    shard.on_frame(now, id, &mut body, out)
                });
            }
            // The connection closes.
            3 => {
                if let Some(id) = conns[usize::from(k)].take() {
                    if let Some(core) = world.conn_core.remove(&id) {
                        world.on(core, |shard, now, out| shard.on_closed(now, id, out));
                    }
                }
            }
            // A UDP client sends a datagram, received by either core.
            4 | 5 => {
                let core = (who % CORES as u8) as CoreId;
                let from = udp_peer(k);
                let mut bytes = match message(arg, op[1] ^ arg, uid) {
                    Some(msg) => msg.to_json(),
                    None => op.to_vec(),
                };
                world.on(core, |shard, now, out| {
                    shard.on_datagram(now, from, &mut bytes, out)
                });
            }
            // Time passes: up to ~25 s.
            _ => world.advance(Duration::from_millis(u64::from(arg) * 100)),
        }
    }
    // Everyone leaves; after the longest idle timeout (and the resends) nobody is online.
    for id in conns.into_iter().flatten() {
        if let Some(core) = world.conn_core.remove(&id) {
            world.on(core, |shard, now, out| shard.on_closed(now, id, out));
        }
    }
    world.advance(Duration::from_secs(120));
    for shard in &world.shards {
        assert_eq!(shard.online_users(), 0, "a session outlived its connection");
    }
});
