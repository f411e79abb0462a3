//! Acknowledged delivery over real sockets (SPEC §8.3): ACKed → `Delivered`; never ACKed →
//! resent unchanged at the SDK's ticks, then `Lost`, on the captured timeline.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test code: a panic is a failure

mod support;

use std::time::Duration;

use imedge_client::{Event, Notice, SenseMode, Transport};
use imedge_protocol::{Kind, Message};
use support::{bounded, load, Dir, Server, PROMPT};
use tokio::time::Instant;

/// `Client::send` with QoS: a fresh UUID v4 fingerprint, the message exactly as the Java SDK wrote
/// it apart from that fingerprint, and the server's ACK reported as `Delivered`.
#[tokio::test]
async fn acked_qos_message_is_delivered() {
    bounded(20, async {
        for file in ["tcp-c2c-qos.jsonl", "udp-c2c-qos.jsonl", "ws-c2c-qos.jsonl"] {
            let units = load(file, "alice");
            let (user_id, token) = support::credentials(&units);
            let data = units
                .iter()
                .find(|u| u.dir == Dir::C2s && u.kind() == Kind::CommonData)
                .unwrap();
            let ack = units
                .iter()
                .find(|u| u.dir == Dir::S2c && u.kind() == Kind::Ack)
                .unwrap();
            let captured = data.message();
            let captured_fp = captured.fp.clone().unwrap();

            let server = Server::bind(support::transport_of(file)).await;
            let (client, mut events, mut peer) =
                support::connect(&server, server.options(&user_id, &token)).await;
            peer.recv().await;
            peer.send_unit(&units[1]).await;
            events
                .wait_for(|e| matches!(e, Event::LoginOk { .. }), PROMPT)
                .await
                .unwrap();

            let fp = client
                .send(
                    captured.to.clone().unwrap(),
                    captured.text().unwrap().to_owned(),
                    true,
                )
                .await
                .unwrap()
                .unwrap();
            assert_uuid_v4(fp.as_str());
            let got = peer.recv().await;
            assert_eq!(
                got.json(),
                data.json.replace(captured_fp.as_str(), fp.as_str()),
                "{file}"
            );
            assert_eq!(client.state().await.unwrap().pending_qos, 1);

            let mut reply = ack.message();
            reply.content = Some(fp.as_str().to_owned().into());
            peer.send(&reply).await;
            let delivered = events
                .wait_for(|e| matches!(e, Event::Delivered(_)), PROMPT)
                .await
                .unwrap();
            assert_eq!(delivered, Event::Delivered(fp), "{file}");
            assert_eq!(client.state().await.unwrap().pending_qos, 0);

            // Without QoS: no fingerprint, nothing to track.
            assert_eq!(client.send("bob", "plain", false).await.unwrap(), None);
            let plain = peer.recv().await.message();
            assert!(!plain.qos && plain.fp.is_none());
            client.logout().await;
            let rest = support::session_events(support::drain(&mut events).await);
            assert!(rest.is_empty(), "{file}: {rest:?}");
        }
    })
    .await;
}

fn assert_uuid_v4(fp: &str) {
    let bytes = fp.as_bytes();
    assert_eq!(bytes.len(), 36, "{fp}");
    for (i, b) in bytes.iter().enumerate() {
        match i {
            8 | 13 | 18 | 23 => assert_eq!(*b, b'-', "{fp}"),
            14 => assert_eq!(*b, b'4', "{fp}"),
            19 => assert!(b"89ab".contains(b), "{fp}"),
            _ => assert!(b.is_ascii_hexdigit() && !b.is_ascii_uppercase(), "{fp}"),
        }
    }
}

/// `*-offline-lost.jsonl`: a QoS message the server never ACKs is resent unchanged at the QoS
/// ticks +5 s and +10 s after the login and reported lost at +15 s, keep-alives continuing in
/// between — replayed byte for byte against the Java SDK's capture (TCP in the demo's MODE_5S,
/// UDP in the SDK's default MODE_3S). On tokio's paused clock (see `liveness.rs`): the 15 s of
/// the reference timings pass at once and exactly.
async fn lost_after_two_resends(file: &str, sense_mode: SenseMode) {
    let mut units = load(file, "alice");
    let logout = units.pop().unwrap();
    assert_eq!(logout.kind(), Kind::Logout, "{file}");
    let (user_id, token) = support::credentials(&units);
    let server = Server::bind(support::transport_of(file)).await;
    let options = server.options(&user_id, &token).with_sense_mode(sense_mode);
    let (client, mut events, mut peer) = support::connect(&server, options).await;

    let (sent, mut notices) = support::replay(&mut peer, &client, &mut events, &units).await;
    let t0 = sent[0].at;
    let data: Vec<Duration> = sent
        .iter()
        .filter(|r| r.message().kind == Kind::CommonData)
        .map(|r| r.at - t0)
        .collect();
    assert_eq!(data.len(), 3, "{file}: {data:?}");
    for (resend, due) in data[1..].iter().zip([5, 10]) {
        let due = Duration::from_secs(due);
        assert!(
            *resend >= due && *resend < due + Duration::from_millis(50),
            "{file}: resend at {resend:?}, due {due:?}"
        );
    }

    // Reported at the +15 s tick, which is also when the last captured keep-alive went out.
    let lost = loop {
        let notice = tokio::time::timeout(PROMPT, events.recv())
            .await
            .unwrap()
            .unwrap();
        let is_lost = matches!(notice, Notice::Session(Event::Lost(..)));
        notices.push(notice);
        if is_lost {
            break t0.elapsed();
        }
    };
    assert!(
        lost >= Duration::from_secs(15) && lost < Duration::from_millis(15_050),
        "{file}: lost after {lost:?}"
    );
    assert_eq!(
        support::session_events(notices),
        support::expected_events(&units),
        "{file}"
    );
    assert_eq!(client.state().await.unwrap().pending_qos, 0);

    client.logout().await;
    assert_eq!(peer.recv().await.raw, logout.bytes, "{file}");
}

#[tokio::test(start_paused = true)]
async fn tcp_unacked_qos_message_is_resent_then_lost() {
    bounded(
        25,
        lost_after_two_resends("tcp-offline-lost.jsonl", SenseMode::S5),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn udp_unacked_qos_message_is_resent_then_lost() {
    bounded(
        25,
        lost_after_two_resends("udp-offline-lost.jsonl", SenseMode::S3),
    )
    .await;
}

/// Logout releases the resend table: what is still unacknowledged is reported lost (SPEC §5.4).
#[tokio::test(start_paused = true)]
async fn logout_reports_pending_qos_messages_lost() {
    bounded(10, async {
        let units = load("tcp-login-logout.jsonl", "alice");
        let server = Server::bind(Transport::Tcp).await;
        let (client, mut events, mut peer) =
            support::connect(&server, server.options("alice", "tokenA")).await;
        peer.recv().await;
        peer.send_unit(&units[1]).await;
        events
            .wait_for(|e| matches!(e, Event::LoginOk { .. }), PROMPT)
            .await
            .unwrap();
        let fp = client
            .send("carol", "never acked", true)
            .await
            .unwrap()
            .unwrap();
        let sent: Message<'static> = peer.recv().await.message();
        let started = Instant::now();
        client.logout().await;
        assert_eq!(peer.recv().await.raw, units[2].bytes);
        let events = support::session_events(support::drain(&mut events).await);
        assert_eq!(events, [Event::Lost(fp, sent)]);
        assert!(started.elapsed() < Duration::from_secs(1));
    })
    .await;
}

/// `with_qos_resends` / `with_qos_resend_interval`: an unacknowledged message is resent exactly
/// the configured number of times, unchanged, then reported lost.
#[tokio::test(start_paused = true)]
async fn configured_resend_policy_is_followed() {
    bounded(60, async {
        let units = load("udp-login-logout.jsonl", "alice");
        let server = Server::bind(Transport::Udp).await;
        let options = server
            .options("alice", "tokenA")
            .with_qos_resends(4)
            .with_qos_resend_interval(Duration::from_millis(100));
        let (client, mut events, mut peer) = support::connect(&server, options).await;
        peer.recv().await;
        peer.send_unit(&units[1]).await;
        events
            .wait_for(|e| matches!(e, Event::LoginOk { .. }), PROMPT)
            .await
            .unwrap();
        let fp = client.send("bob", "again", true).await.unwrap().unwrap();
        let lost = events
            .wait_for(|e| matches!(e, Event::Lost(..)), PROMPT)
            .await
            .unwrap();
        assert!(matches!(lost, Event::Lost(ref got, _) if *got == fp));
        // Everything the client wrote has arrived by now (loopback); count the copies.
        let mut copies = Vec::new();
        while let Ok(Some(got)) = peer.recv_within(Duration::from_millis(500)).await {
            let msg = got.message();
            if msg.kind == Kind::CommonData {
                copies.push(got.body);
            }
        }
        assert_eq!(copies.len(), 1 + 4);
        assert!(copies.iter().all(|c| *c == copies[0]));
        client.logout().await;
    })
    .await;
}
