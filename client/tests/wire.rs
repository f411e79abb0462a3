//! Wire behaviour against the captured reference server: each test replays the server side of a
//! golden vector file, checks that every message the SDK sends is byte-identical to what the Java
//! SDK (or, for WebSocket, the raw capture client) sent, and that the SDK reports what the Java SDK
//! reports.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test code: a panic is a failure

mod support;

use imedge_client::{Client, Event, Notice};
use imedge_protocol::Kind;
use support::{bounded, drain, load, session_events, Dir, Server};

/// Replays `file` as seen by the endpoint `conn` with a fresh client and checks its events.
async fn replay_file(file: &str, conn: &str) {
    replay_units(file, &load(file, conn)).await;
}

/// Replays `units` of `file` with a fresh client; checks that the SDK reports what the Java SDK
/// would, that it connected once without any link trouble, and that its task ended.
async fn replay_units(file: &str, units: &[support::Unit]) {
    assert!(!units.is_empty(), "{file}: nothing to replay");
    let (user_id, token) = support::credentials(units);
    let server = Server::bind(support::transport_of(file)).await;
    let (client, mut events, mut peer) =
        support::connect(&server, server.options(&user_id, &token)).await;
    let (_, mut notices) = support::replay(&mut peer, &client, &mut events, units).await;
    notices.extend(drain(&mut events).await);
    let transport: Vec<_> = notices
        .iter()
        .filter(|n| !matches!(n, Notice::Session(_)))
        .collect();
    assert!(
        matches!(transport.as_slice(), [Notice::Connected]),
        "{file}: {notices:?}"
    );
    assert!(matches!(notices.first(), Some(Notice::Connected)), "{file}");
    assert_eq!(
        session_events(notices),
        support::expected_events(units),
        "{file}"
    );
    assert!(client.is_closed(), "{file}: the task should have ended");
    // Logout, kickout and refused login close the link on the client side too (SPEC §5.4).
    if !file.starts_with("udp") {
        peer.closed().await;
    }
}

#[tokio::test]
async fn tcp_login_logout() {
    bounded(10, async {
        replay_file("tcp-login-logout.jsonl", "alice").await;
    })
    .await;
}

#[tokio::test]
async fn udp_login_logout() {
    bounded(10, async {
        replay_file("udp-login-logout.jsonl", "alice").await;
    })
    .await;
}

#[tokio::test]
async fn ws_login_logout() {
    bounded(10, async {
        replay_file("ws-login-logout.jsonl", "alice").await;
    })
    .await;
}

#[tokio::test]
async fn login_reports_the_captured_first_login_time() {
    bounded(10, async {
        for file in [
            "tcp-login-logout.jsonl",
            "udp-login-logout.jsonl",
            "ws-login-logout.jsonl",
        ] {
            let units = load(file, "alice");
            let first_login_time = support::first_login_time(&units);
            let server = Server::bind(support::transport_of(file)).await;
            let (client, mut events, mut peer) =
                support::connect(&server, server.options("alice", "tokenA")).await;
            let login = peer.recv().await;
            assert_eq!(login.json(), units[0].json, "{file}");
            peer.send_unit(&units[1]).await;
            let event = events
                .wait_for(|e| matches!(e, Event::LoginOk { .. }), support::PROMPT)
                .await
                .unwrap();
            assert_eq!(event, Event::LoginOk { first_login_time });
            let state = client.state().await.unwrap();
            assert!(state.logged_in && state.connected);
            assert_eq!(state.first_login_time, Some(first_login_time));
            client.logout().await;
            assert_eq!(peer.recv().await.message().kind, Kind::Logout);
        }
    })
    .await;
}

#[tokio::test]
async fn login_rejected() {
    bounded(20, async {
        for file in [
            "tcp-login-rejected.jsonl",
            "udp-login-rejected.jsonl",
            "ws-login-rejected.jsonl",
        ] {
            replay_file(file, "alice").await;
        }
        // Client::login turns the refusal into an error.
        let units = load("tcp-login-rejected.jsonl", "alice");
        let server = Server::bind(imedge_client::Transport::Tcp).await;
        let options = server.options("alice", "refim-reject");
        let login = tokio::spawn(Client::login(options));
        let mut peer = server.accept().await;
        peer.recv().await;
        peer.send_unit(&units[1]).await;
        let result = login.await.unwrap();
        assert!(
            matches!(result, Err(imedge_client::Error::LoginFailed(1025))),
            "{result:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn c2c_qos_both_directions() {
    bounded(20, async {
        for file in ["tcp-c2c-qos.jsonl", "udp-c2c-qos.jsonl", "ws-c2c-qos.jsonl"] {
            replay_file(file, "alice").await;
            replay_file(file, "bob").await;
        }
    })
    .await;
}

#[tokio::test]
async fn c2c_without_qos() {
    bounded(20, async {
        for file in ["tcp-c2c-noqos.jsonl", "udp-c2c-noqos.jsonl"] {
            replay_file(file, "alice").await;
            replay_file(file, "bob").await;
        }
    })
    .await;
}

#[tokio::test]
async fn c2s_and_s2c_qos() {
    bounded(20, async {
        for file in [
            "tcp-c2s-qos.jsonl",
            "udp-c2s-qos.jsonl",
            "ws-c2s-qos.jsonl",
            "tcp-s2c-qos.jsonl",
            "udp-s2c-qos.jsonl",
            "ws-s2c-qos.jsonl",
        ] {
            replay_file(file, "alice").await;
        }
    })
    .await;
}

#[tokio::test]
async fn kicked_by_admin() {
    bounded(20, async {
        for file in [
            "tcp-kickout-admin.jsonl",
            "udp-kickout-admin.jsonl",
            "ws-kickout-admin.jsonl",
        ] {
            // The Java UDP SDK ignores kickouts and heartbeats on; imedge follows the TCP SDK on
            // every transport (stop, no re-login), so the UDP capture is played up to the kickout.
            let mut units = load(file, "alice");
            let kick = units
                .iter()
                .position(|u| u.kind() == Kind::Kickout)
                .unwrap();
            units.truncate(kick + 1);
            replay_units(file, &units).await;
        }
    })
    .await;
}

/// SPEC §8.5: a QoS message received twice (a server resend) is ACKed twice, exactly as the SDK
/// ACKs, and delivered once.
#[tokio::test]
async fn duplicate_incoming_qos_message_is_acked_twice_and_delivered_once() {
    bounded(20, async {
        for file in ["tcp-c2c-qos.jsonl", "udp-c2c-qos.jsonl", "ws-c2c-qos.jsonl"] {
            let mut units = load(file, "alice");
            // Bob's QoS message and alice's ACK of it, played a second time right after.
            let data = units
                .iter()
                .position(|u| u.dir == Dir::S2c && u.kind() == Kind::CommonData)
                .unwrap();
            let ack = data + 1;
            assert_eq!(units[ack].kind(), Kind::Ack, "{file}");
            assert_eq!(units[ack].dir, Dir::C2s, "{file}");
            let again = [units[data].clone(), units[ack].clone()];
            units.splice(ack + 1..ack + 1, again);

            let server = Server::bind(support::transport_of(file)).await;
            let (user_id, token) = support::credentials(&units);
            let (client, mut events, mut peer) =
                support::connect(&server, server.options(&user_id, &token)).await;
            let (sent, mut notices) =
                support::replay(&mut peer, &client, &mut events, &units).await;
            let acks: Vec<_> = sent
                .iter()
                .filter(|r| r.message().kind == Kind::Ack)
                .collect();
            assert_eq!(acks.len(), 2, "{file}");
            assert_eq!(acks[0].body, acks[1].body, "{file}");

            notices.extend(drain(&mut events).await);
            let events = session_events(notices);
            let delivered: Vec<_> = events
                .iter()
                .filter(|e| matches!(e, Event::Message(m) if m.qos))
                .collect();
            assert_eq!(
                delivered,
                [&Event::Message(units[data].message())],
                "{file}"
            );
            assert_eq!(events, support::expected_events(&units), "{file}");
        }
    })
    .await;
}

/// Echo after login (`*-echo.jsonl`): the request goes out as captured, the reply is reported.
#[tokio::test]
async fn echo_after_login() {
    bounded(20, async {
        for file in ["tcp-echo.jsonl", "udp-echo.jsonl", "ws-echo.jsonl"] {
            let all = load(file, "alice");
            // The capture's first echo precedes the login, which the SDK sends at connect.
            let login = all
                .iter()
                .position(|u| u.dir == Dir::C2s && u.kind() == Kind::Login)
                .unwrap();
            let units = &all[login..];
            let (user_id, token) = support::credentials(units);
            let server = Server::bind(support::transport_of(file)).await;
            let (client, mut events, mut peer) =
                support::connect(&server, server.options(&user_id, &token)).await;
            peer.recv().await;
            peer.send_unit(&units[1]).await;
            let echo = &units[2];
            assert_eq!(echo.kind(), Kind::Echo, "{file}");
            client
                .echo(echo.message().text().unwrap().to_owned())
                .await
                .unwrap();
            assert_eq!(peer.recv().await.json(), echo.json, "{file}");
            peer.send_unit(&units[3]).await;
            let reply = events
                .wait_for(|e| matches!(e, Event::EchoResponse(_)), support::PROMPT)
                .await
                .unwrap();
            assert_eq!(reply, Event::EchoResponse(units[3].message()), "{file}");
            client.logout().await;
        }
    })
    .await;
}
