//! The connection layer's limits, hit with real sockets: slow consumers, stalled writes, closing
//! connections that keep sending, oversize input. Every wait polls the server's counters with a
//! generous deadline; nothing asserts a timing.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use imedge_protocol::frame::tcp;
use imedge_protocol::Kind;
use imedge_server::config::ServerConfig;
use imedge_server::hooks::AllowAll;
use imedge_server::shard::Stats;
use support::{data, Client, Recv, Server, T};

/// How long a test waits for a counter to move.
const DEADLINE: Duration = Duration::from_secs(30);

/// Polls the server's counters until `done` holds; fails the test after [`DEADLINE`].
fn wait_for(server: &Server, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (stats, _) = server.api().stats();
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "{what}: {stats:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An echo request (type 52) of about `size` bytes: the server answers it with as much,
/// logged in or not.
fn echo(size: usize) -> BytesMut {
    let mut msg = data("x", "0", &"e".repeat(size), None);
    msg.kind = Kind::Echo;
    let mut body = BytesMut::new();
    msg.encode(&mut body);
    body
}

/// Sends echo requests on `client` without ever reading the answers, until `stop` holds for
/// the server's counters or the connection breaks; at most `max_bytes`.
fn flood(server: &Server, client: &mut Client, max_bytes: usize, stop: impl Fn(&Stats) -> bool) {
    let body = echo(4000);
    let mut sent = 0;
    while sent < max_bytes {
        if !client.try_send_body(&body) {
            return;
        }
        sent += body.len();
        if sent % (64 * body.len()) == 0 && stop(&server.api().stats().0) {
            return;
        }
    }
}

fn config(tweak: impl FnOnce(&mut ServerConfig)) -> ServerConfig {
    let mut config = support::config(1);
    tweak(&mut config);
    config
}

/// A client that sends and never reads is disconnected once its unsent output passes
/// `--max-send-buffer`, on TCP and WebSocket; the server goes on serving others.
#[test]
fn slow_consumer_is_disconnected_at_its_send_budget() {
    let server = Server::with(
        config(|c| {
            c.max_send_buffer = 64 * 1024;
            c.write_stall_timeout = Duration::from_secs(600);
        }),
        Arc::new(AllowAll),
    );
    for (n, transport) in [T::Tcp, T::Ws].into_iter().enumerate() {
        let mut stuck = server.connect(transport);
        flood(&server, &mut stuck, 256 << 20, |s| {
            s.conn.send_overflows > n as u64
        });
        wait_for(&server, "slow consumer disconnected", |s| {
            s.conn.send_overflows > n as u64
        });
    }
    let mut fine = server.connect(T::Tcp);
    fine.login("fine");
    let stats = server.api().stats().0;
    assert_eq!(stats.conn.write_stalls, 0, "{stats:?}");
}

/// Output that makes no progress for `--write-stall-timeout` closes the connection, also once
/// it is closing (after a logout) while the peer keeps sending and never reads: a closing
/// connection reads no more, and the stall bounds how long it lingers.
#[test]
fn stalled_writes_close_the_connection_also_while_closing() {
    let server = Server::with(
        config(|c| {
            c.max_send_buffer = 1 << 30;
            c.write_stall_timeout = Duration::from_secs(3);
        }),
        Arc::new(AllowAll),
    );
    // Open: the stall alone ends it.
    let mut stuck = server.connect(T::Tcp);
    flood(&server, &mut stuck, 64 << 20, |s| s.conn.write_stalls > 0);
    wait_for(&server, "stalled write closed", |s| s.conn.write_stalls > 0);

    // Closing: a logout behind a backlog of unread output, then more input.
    let mut stuck = server.connect(T::Ws);
    stuck.login("closer");
    // More than the kernel's buffers hold (a few MiB on loopback), so that output waits.
    flood(&server, &mut stuck, 24 << 20, |_| false);
    let mut logout = BytesMut::new();
    imedge_protocol::Message::logout("closer".into()).encode(&mut logout);
    stuck.try_send_body(&logout);
    flood(&server, &mut stuck, 8 << 20, |s| s.conn.write_stalls > 1);
    wait_for(&server, "closing connection's stall", |s| {
        s.conn.write_stalls > 1
    });
    assert!(!server.api().is_online("closer").unwrap());
    assert_eq!(server.api().stats().0.conn.send_overflows, 0);
}

/// A TCP client announcing a frame within the limit but sending more than any frame can hold
/// never makes the server buffer more than a frame: an oversize prefix is refused at once, and
/// bytes behind whole frames are cut as they come.
#[test]
fn oversize_frames_close_the_connection() {
    let server = Server::start(1);
    let mut client = server.connect(T::Tcp);
    let mut frame = BytesMut::new();
    frame.extend_from_slice(
        &u32::try_from(tcp::DEFAULT_MAX_BODY + 1)
            .unwrap()
            .to_be_bytes(),
    );
    client.send_raw(&frame);
    client.send_raw(&vec![b'{'; 64 * 1024]);
    assert_eq!(client.recv_within(support::WAIT), Recv::Closed);
    wait_for(&server, "frame error counted", |s| s.malformed > 0);
}

/// A recipient disconnected as a slow consumer loses none of the QoS messages the server
/// acknowledged to their sender: those it never acknowledged take the lost path into the
/// offline store (or are resent to its next session), and reach it at its next login.
#[test]
fn a_slow_consumers_unacknowledged_messages_reach_its_next_session() {
    let server = Server::with(
        config(|c| {
            // A login page of stored 3 KB messages (256) fits; a reader that stopped does not.
            c.max_send_buffer = 1 << 20;
            c.write_stall_timeout = Duration::from_secs(600);
            c.offline_store = true;
            // Alice sends thousands back to back: no per-session rate limit.
            c.session_msg_rate = 0;
        }),
        Arc::new(AllowAll),
    );
    let mut bob = server.connect(T::Tcp);
    bob.login("bob");
    let mut alice = server.connect(T::Tcp);
    alice.login("alice");
    let text = "m".repeat(3000);
    let mut sent = 0;
    while server.api().stats().0.conn.send_overflows == 0 {
        assert!(sent < 20_000, "bob was never disconnected");
        for _ in 0..32 {
            alice.send(&data("alice", "bob", &text, Some(&format!("fp{sent}"))));
            sent += 1;
        }
        // Alice reads her ACKs, so that she is not a slow consumer herself.
        while let Recv::Message(_) = alice.recv_within(Duration::from_millis(1)) {}
    }
    drop(bob);
    // What bob never acknowledged is reported lost (and stored) within the resend schedule;
    // what followed his disconnection went to the store directly. (Logging in earlier would
    // get the resends all at once, a burst that may overflow the budget again.)
    wait_for(&server, "every message stored", |s| {
        s.lost + s.offline >= sent
    });
    let mut missing: BTreeSet<String> = (0..sent).map(|i| format!("fp{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Log in again until everything came: resent to the new session, or stored and delivered
    // at a login.
    while !missing.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} of {sent} never arrived, e.g. {:?}",
            missing.len(),
            missing.first()
        );
        let mut bob = server.connect(T::Tcp);
        bob.login("bob");
        let quiet_until = Instant::now() + Duration::from_secs(7);
        while Instant::now() < quiet_until && !missing.is_empty() {
            match bob.recv_within(Duration::from_millis(200)) {
                Recv::Message(msg) if msg.kind == Kind::CommonData => {
                    let fp = msg.fp.clone().unwrap();
                    bob.send(&support::ack("bob", "alice", fp.as_str()));
                    missing.remove(fp.as_str());
                }
                Recv::Message(_) | Recv::Timeout => {}
                other => panic!("{other:?}"),
            }
        }
        while let Recv::Message(_) = alice.recv_within(Duration::from_millis(1)) {}
    }
}

/// An echo request answered proves the server took the connection in and handles it.
fn assert_served(client: &mut Client) {
    let mut msg = data("x", "0", "ping", None);
    msg.kind = Kind::Echo;
    client.send(&msg);
    client.expect(Kind::EchoResponse);
}

/// TCP and WebSocket connections that have not logged in within `--login-timeout` are closed
/// (counted); one that logged in stays.
#[test]
fn connections_that_do_not_log_in_in_time_are_closed() {
    let server = Server::with(
        config(|c| c.login_timeout = Duration::from_millis(300)),
        Arc::new(AllowAll),
    );
    let mut early = server.connect(T::Tcp);
    early.login("early");
    let mut idle = [server.connect(T::Tcp), server.connect(T::Ws)];
    for client in &mut idle {
        assert_eq!(client.recv_within(support::WAIT), Recv::Closed);
    }
    wait_for(&server, "login timeouts counted", |s| {
        s.conn.login_timeouts >= 2
    });
    early.send(&imedge_protocol::Message::keep_alive("early".into()));
    early.expect(Kind::KeepAliveResponse);
    assert!(server.api().is_online("early").unwrap());
}

/// `--max-unauthenticated` caps connections not logged in over the whole server: the next is
/// refused and closed at once (counted), and a login frees a place.
#[test]
fn unauthenticated_connections_are_capped() {
    let server = Server::with(
        config(|c| {
            c.threads = 2;
            c.max_unauthenticated = 3;
        }),
        Arc::new(AllowAll),
    );
    let mut waiting: Vec<Client> = (0..3).map(|_| server.connect(T::Tcp)).collect();
    for client in &mut waiting {
        assert_served(client);
    }
    let mut refused = server.connect(T::Tcp);
    assert_eq!(refused.recv_within(support::WAIT), Recv::Closed);
    assert_eq!(server.api().stats().0.conn.refused_unauthenticated, 1);
    // A login (which may move the connection to another core) frees its place.
    waiting[0].login(&support::uid_on(1, 2, "u"));
    let mut next = server.connect(T::Tcp);
    next.login("next");
    assert_eq!(server.api().stats().0.conn.refused_unauthenticated, 1);
}

/// `--max-conns-per-ip` caps the connections not logged in from one address, and
/// `--max-conn-rate-per-ip` how fast it opens them (loopback counts here: `limit_loopback`).
#[test]
fn one_address_is_capped_in_waiting_connections_and_in_rate() {
    let server = Server::with(
        config(|c| {
            c.max_conns_per_ip = 2;
            c.limit_loopback = true;
        }),
        Arc::new(AllowAll),
    );
    let mut waiting: Vec<Client> = (0..2).map(|_| server.connect(T::Tcp)).collect();
    for client in &mut waiting {
        assert_served(client);
    }
    let mut refused = server.connect(T::Tcp);
    assert_eq!(refused.recv_within(support::WAIT), Recv::Closed);
    assert_eq!(server.api().stats().0.conn.refused_per_ip, 1);
    waiting[0].login("a");
    assert_served(&mut server.connect(T::Tcp));

    let server = Server::with(
        config(|c| {
            c.max_conn_rate_per_ip = 5;
            c.limit_loopback = true;
        }),
        Arc::new(AllowAll),
    );
    // Far more than the burst (10) and what 5/s refills while they connect.
    let clients: Vec<Client> = (0..100).map(|_| server.connect(T::Tcp)).collect();
    wait_for(&server, "rate refusals counted", |s| {
        s.conn.refused_rate > 0
    });
    let closed = clients
        .into_iter()
        .map(|mut c| c.recv_within(Duration::from_millis(50)))
        .filter(|r| *r == Recv::Closed)
        .count() as u64;
    let stats = server.api().stats().0;
    assert!(
        closed > 0 && stats.conn.refused_rate >= closed,
        "{closed} {stats:?}"
    );
    assert_eq!(stats.conn.refused_per_ip + stats.conn.login_timeouts, 0);
}

/// SPEC S4: unauthenticated UDP traffic cannot make the server an amplifier. A datagram that is
/// not a protocol message gets no reply; a 301 reflects nothing of the request and is sent only
/// if at most `UDP_REPLY_MAX_RATIO` times the request (the Java UDP SDK's ~95-byte keep-alive
/// still gets it); replies to one source are rate-limited (counted).
#[test]
fn unauthenticated_udp_is_not_amplified() {
    use imedge_protocol::{Message, UserId};
    let server = Server::with(
        config(|c| {
            c.udp_unauth_reply_rate = 2;
            c.limit_loopback = true;
        }),
        Arc::new(AllowAll),
    );
    let mut c = server.connect(T::Udp);
    // Not a protocol message: nothing.
    c.send_body(b"hello");
    c.send_body(br#"{"type":1"#);
    c.expect_quiet();

    // A keep-alive like the Java UDP SDK's: the 301 comes, no larger than 3x. One full of
    // characters JSON escapes (the reference's reply was 9x larger): nothing of it comes back.
    let ka = Message::keep_alive(UserId::from("u1234567"));
    let request = ka.to_json();
    assert!((80..=110).contains(&request.len()), "{}", request.len());
    let escaped = Message::keep_alive(UserId::from("<".repeat(40))).to_json();
    for sent in [&request, &escaped] {
        c.send_body(sent);
        let support::RecvBody::Body(reply) = c.recv_body_within(support::WAIT) else {
            panic!("no 301");
        };
        let text = String::from_utf8_lossy(&reply).into_owned();
        assert!(reply.len() <= 3 * request.len(), "{} bytes", reply.len());
        assert!(text.contains("301") && !text.contains("u1234567") && !text.contains("003c"));
    }

    // A tiny well-formed keep-alive: its 301 would be larger than 3x: none.
    let tiny = br#"{"type":1,"from":"a"}"#;
    c.send_body(tiny);
    c.expect_quiet();
    wait_for(&server, "too large counted", |s| {
        s.conn.udp_replies_too_large > 0
    });

    // A flood from one source: a few replies, the rest counted.
    for _ in 0..40 {
        c.send_body(&request);
    }
    let mut replies = 0;
    while let Recv::Message(_) = c.recv_within(support::QUIET) {
        replies += 1;
    }
    assert!(replies < 40, "{replies}");
    let stats = wait_for(&server, "limited counted", |s| {
        s.conn.udp_replies_limited > 0
    });
    assert_eq!(replies + 2 + stats.conn.udp_replies_limited, 42);
}
