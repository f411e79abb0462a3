//! The server over real sockets on 127.0.0.1: every transport, every pair of transports, both
//! shards of a two-core server.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod support;

use imedge_protocol::{Decoder, Kind, Message, UserId};
use support::*;

#[test]
fn login_keep_alive_logout_on_each_transport() {
    let server = Server::start(2);
    for (i, t) in ALL.into_iter().enumerate() {
        let uid = format!("user{i}");
        let mut c = server.connect(t);
        let reply = c.login(&uid);
        assert_eq!(reply.to.as_ref().unwrap().as_str(), uid);
        c.send(&Message::keep_alive(UserId::from(uid.clone())));
        let ka = c.expect(Kind::KeepAliveResponse);
        assert_eq!(ka.text(), Some("{}"));
        c.send(&Message::logout(UserId::from(uid.clone())));
        if t == T::Udp {
            // UDP logout is silent; the session is gone: the next keep-alive gets 301.
            c.expect_quiet();
            c.send(&Message::keep_alive(UserId::from(uid)));
            c.expect(Kind::Error);
        } else {
            assert!(c.expect_closed().is_empty());
        }
    }
}

#[test]
fn c2c_across_all_nine_transport_pairs_with_both_acks() {
    // Two cores: users sit on both shards, so half of the pairs cross cores.
    let server = Server::start(2);
    let mut n = 0;
    for from_t in ALL {
        for to_t in ALL {
            n += 1;
            let (a, b) = (
                uid_on(0, 2, &format!("a{n}x")),
                uid_on(1, 2, &format!("b{n}x")),
            );
            let mut alice = server.connect(from_t);
            let mut bob = server.connect(to_t);
            alice.login(&a);
            bob.login(&b);
            let fp = format!("fp-{n}");
            let sent = data(&a, &b, "héllo <&'=\">", Some(&fp));
            alice.send(&sent);
            let got = bob.expect(Kind::CommonData);
            assert_eq!(got, sent, "{from_t:?} → {to_t:?}");
            // The sender's ACK comes from the server on the recipient's behalf.
            let sub = alice.expect(Kind::Ack);
            assert_eq!(
                (sub.text(), sub.from.as_ref().unwrap().as_str()),
                (Some(fp.as_str()), b.as_str())
            );
            // The recipient's own ACK clears the server's resend entry and is not forwarded.
            bob.send(&ack(&b, &a, &fp));
            alice.expect_quiet();
            // And back.
            let reply = data(&b, &a, "back", Some(&format!("{fp}-r")));
            bob.send(&reply);
            assert_eq!(alice.expect(Kind::CommonData), reply);
            bob.expect(Kind::Ack);
        }
    }
}

#[test]
fn c2s_is_acked_from_the_server() {
    let server = Server::start(1);
    let mut c = server.connect(T::Tcp);
    c.login("alice");
    c.send(&data("alice", "0", "for the app", Some("c2s-1")));
    let a = c.expect(Kind::Ack);
    assert_eq!(
        (
            a.from.as_ref().unwrap().as_str(),
            a.to.as_ref().unwrap().as_str()
        ),
        ("0", "alice")
    );
    // A duplicate is ACKed again.
    c.send(&data("alice", "0", "for the app", Some("c2s-1")));
    c.expect(Kind::Ack);
    // Without QoS nothing comes back.
    c.send(&data("alice", "0", "no qos", None));
    c.expect_quiet();
}

#[test]
fn duplicate_login_kicks_across_transports() {
    let server = Server::start(2);
    for (first, second) in [(T::Tcp, T::Ws), (T::Ws, T::Udp), (T::Udp, T::Tcp)] {
        let uid = format!("dup-{first:?}-{second:?}");
        let mut old = server.connect(first);
        old.login(&uid);
        let mut new = server.connect(second);
        new.login(&uid);
        let kick = old.expect(Kind::Kickout);
        assert_eq!(
            Decoder::new().kickout(kick.text().unwrap()).unwrap().code,
            1
        );
        if first == T::Udp {
            // Hazard S5 closed: the kicked UDP session is logged out.
            old.send(&Message::keep_alive(UserId::from(uid.clone())));
            old.expect(Kind::Error);
        } else {
            old.expect_closed();
        }
        // The new session works.
        new.send(&Message::keep_alive(UserId::from(uid)));
        new.expect(Kind::KeepAliveResponse);
    }
}

#[test]
fn unlogged_sessions_get_301_and_echo_works_without_login() {
    let server = Server::start(1);
    for t in ALL {
        let mut c = server.connect(t);
        let mut echo = data("x", "y", "ping", Some("e1"));
        echo.kind = Kind::Echo;
        c.send(&echo);
        let reply = c.expect(Kind::EchoResponse);
        assert_eq!(reply.text(), Some("ping"));
        let ka = Message::keep_alive(UserId::new("nobody"));
        c.send(&ka);
        let err = c.expect(Kind::Error);
        let doc = Decoder::new().error_response(err.text().unwrap()).unwrap();
        assert_eq!(doc.code, 301);
        if t == T::Udp {
            // SPEC S4: nothing of the request is reflected to a UDP source (maybe spoofed).
            assert_eq!(doc.message, None);
        } else {
            assert_eq!(
                doc.message.as_deref().unwrap().as_bytes(),
                &ka.to_json()[..]
            );
        }
        if t != T::Udp {
            c.expect_closed();
        }
    }
}

#[test]
fn spoofed_from_is_overwritten() {
    let server = Server::start(1);
    let mut mallory = server.connect(T::Udp);
    let mut bob = server.connect(T::Ws);
    mallory.login("mallory");
    bob.login("bob");
    mallory.send(&data("alice", "bob", "trust me", None));
    let got = bob.expect(Kind::CommonData);
    assert_eq!(got.from.as_ref().unwrap().as_str(), "mallory");
}

#[test]
fn relogin_as_another_user_is_verified_again() {
    let table = imedge_server::hooks::TokenTable::parse("mallory m\nalice a\n").unwrap();
    let server = Server::with(config(1), std::sync::Arc::new(table));
    let mut alice = server.connect(T::Tcp);
    alice.send(&login("alice", "a", 0));
    alice.expect(Kind::LoginResponse);
    let mut mallory = server.connect(T::Tcp);
    mallory.send(&login("mallory", "m", 0));
    mallory.expect(Kind::LoginResponse);
    mallory.send(&login("alice", "m", 0));
    let refused = mallory.expect(Kind::LoginResponse);
    assert_eq!(
        Decoder::new()
            .login_response(refused.text().unwrap())
            .unwrap()
            .code,
        1025
    );
    mallory.expect_closed();
    // Alice was not kicked.
    alice.send(&Message::keep_alive(UserId::new("alice")));
    alice.expect(Kind::KeepAliveResponse);
}

#[test]
fn malformed_and_oversize_input_closes_only_that_session() {
    let server = Server::start(2);
    let mut bystander = server.connect(T::Tcp);
    bystander.login("bystander");

    let mut c = server.connect(T::Tcp);
    c.login("t1");
    c.send_raw(&[0, 0, 0x18, 0x01]); // a 6145-byte frame announced: closed at once
    assert!(c.expect_closed().is_empty());

    let mut c = server.connect(T::Tcp);
    c.send_raw(b"\0\0\0\x05[1,2]"); // not an object
    assert!(c.expect_closed().is_empty());

    let mut w = server.connect(T::Ws);
    w.login("w1");
    // A 65537-byte text frame: close 1009 as the reference does.
    let mut frame = vec![0x81, 0xff];
    frame.extend_from_slice(&65537u64.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    w.send_raw(&frame);
    assert_eq!(w.recv_within(WAIT), Recv::WsClose(1009));

    let mut u = server.connect(T::Udp);
    u.login("u1");
    u.send_raw(&vec![b'x'; 2049]);
    u.send(&Message::keep_alive(UserId::new("u1")));
    u.expect(Kind::Error);
    u.send_raw(b"{not json");
    u.expect_quiet();

    bystander.send(&Message::keep_alive(UserId::new("bystander")));
    bystander.expect(Kind::KeepAliveResponse);
}

#[test]
fn idle_sessions_expire() {
    let mut cfg = config(2);
    cfg.tcp_idle = std::time::Duration::from_secs(1);
    cfg.ws_idle = std::time::Duration::from_secs(1);
    cfg.udp_idle = std::time::Duration::from_secs(1);
    let server = Server::with(cfg, std::sync::Arc::new(imedge_server::hooks::AllowAll));
    let mut t = server.connect(T::Tcp);
    let mut w = server.connect(T::Ws);
    let mut u = server.connect(T::Udp);
    t.login("idle-t");
    w.login("idle-w");
    u.login("idle-u");
    t.expect_closed();
    w.expect_closed();
    std::thread::sleep(std::time::Duration::from_millis(200));
    u.send(&Message::keep_alive(UserId::new("idle-u")));
    u.expect(Kind::Error);
}

#[test]
fn websocket_other_paths_get_404() {
    use std::io::{Read, Write};
    let server = Server::start(1);
    let mut s = std::net::TcpStream::connect(server.ws).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /websocket?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    assert!(
        response.starts_with(b"HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&response)
    );
}

#[test]
fn control_api_sends_s2c_kicks_and_answers_questions() {
    let server = Server::start(2);
    let api = server.api();
    let users: Vec<String> = (0..2).map(|core| uid_on(core, 2, "api")).collect();
    let mut clients: Vec<Client> = users
        .iter()
        .zip([T::Ws, T::Udp])
        .map(|(uid, t)| {
            let mut c = server.connect(t);
            c.login(uid);
            c
        })
        .collect();
    for (uid, c) in users.iter().zip(&mut clients) {
        assert_eq!(api.is_online(uid), Some(true));
        api.send(uid, "from the app", 99, true);
        let got = c.expect(Kind::CommonData);
        assert_eq!(
            (got.from.as_ref().unwrap().as_str(), got.typeu, got.qos),
            ("0", 99, true)
        );
        // The client's ACK (from = uid, to = "0") clears it: no resend follows.
        c.send(&ack(uid, "0", got.fp.as_ref().unwrap().as_str()));
    }
    assert_eq!(api.is_online("nobody"), Some(false));
    let (stats, online) = api.stats();
    assert_eq!((online, stats.logins, stats.delivered), (2, 2, 2));

    api.kick(&users[0], 2, Some("bye now"));
    let kick = clients[0].expect(Kind::Kickout);
    let doc = Decoder::new().kickout(kick.text().unwrap()).unwrap();
    assert_eq!((doc.code, doc.reason.as_deref()), (2, Some("bye now")));
    clients[0].expect_closed();
    assert_eq!(api.is_online(&users[0]), Some(false));
}

/// The error code of a type-52 reply.
fn error_code(msg: &Message<'_>) -> i32 {
    assert_eq!(msg.kind, Kind::Error, "got {msg:?}");
    Decoder::new()
        .error_response(msg.text().unwrap())
        .unwrap()
        .code
}

#[test]
fn too_long_ids_and_too_large_messages_are_refused_on_every_transport() {
    use imedge_protocol::message::payload::ERROR_INVALID_MESSAGE;
    let mut cfg = config(2);
    cfg.max_message_bytes = 1000;
    let server = Server::with(cfg, std::sync::Arc::new(imedge_server::hooks::AllowAll));
    let mut bob = server.connect(T::Tcp);
    bob.login("bob");
    for (i, t) in ALL.into_iter().enumerate() {
        let uid = format!("sender{i}");
        let mut c = server.connect(t);
        c.login(&uid);
        // A 65-byte fingerprint: an error 4 and no ACK.
        c.send(&data(&uid, "0", "hi", Some(&"f".repeat(65))));
        assert_eq!(error_code(&c.recv()), ERROR_INVALID_MESSAGE);
        // A relay over --max-message-bytes: refused at the sender, bob gets nothing.
        c.send(&data(&uid, "bob", &"x".repeat(1200), Some("big")));
        assert_eq!(error_code(&c.recv()), ERROR_INVALID_MESSAGE);
        c.expect_quiet();
        // The session is kept and still works.
        c.send(&data(&uid, "bob", "small", Some("small")));
        assert_eq!(c.expect(Kind::Ack).text(), Some("small"));
        assert_eq!(bob.expect(Kind::CommonData).text(), Some("small"));
        bob.send(&ack("bob", &uid, "small"));
    }
    let stats = server.api().stats().0;
    assert_eq!(stats.ids_too_long, 3);
    assert_eq!(stats.too_large, 3);
}

#[test]
fn session_rate_limit_drops_data_without_ack_on_every_transport() {
    let mut cfg = config(1);
    cfg.session_msg_rate = 1;
    cfg.session_msg_burst = 5;
    let server = Server::with(cfg, std::sync::Arc::new(imedge_server::hooks::AllowAll));
    for (i, t) in ALL.into_iter().enumerate() {
        let uid = format!("flood{i}");
        let mut c = server.connect(t);
        c.login(&uid);
        for n in 0..20 {
            c.send(&data(&uid, "0", "x", Some(&format!("fp-{n}"))));
        }
        // The burst is ACKed, the rest dropped silently (a token per second may come back in
        // between on a slow machine, hence a range rather than exactly 5).
        let mut acks = 0;
        while let Recv::Message(msg) = c.recv_within(std::time::Duration::from_millis(500)) {
            assert_eq!(msg.kind, Kind::Ack);
            acks += 1;
        }
        assert!((5..20).contains(&acks), "{t:?}: {acks} ACKs");
        // Keep-alives are not limited.
        c.send(&Message::keep_alive(UserId::from(uid)));
        c.expect(Kind::KeepAliveResponse);
    }
    assert!(server.api().stats().0.rate_limited >= 3);
}
