//! The bounded event queue (`ClientOptions::event_capacity`): an application that does not read
//! its events makes the client leave received QoS messages unacknowledged, so the server resends
//! them, instead of buffering them without bound.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test code: a panic is a failure

mod support;

use std::time::Duration;

use imedge_client::{ClientOptions, Event, Notice, Transport};
use imedge_protocol::{Content, Fingerprint, Kind, Message, UserId};
use support::{bounded, load, Conn, Server, PROMPT};

/// On the paused clock (see `liveness.rs`) a deadline only passes when nothing is left to do.
const DEADLINE: Duration = Duration::from_secs(10);

fn data(n: usize) -> Message<'static> {
    Message::data(
        UserId::from("bob".to_owned()),
        UserId::from("alice".to_owned()),
        format!("m{n}"),
        Some(Fingerprint::from(format!("fp-{n}"))),
    )
}

/// The fingerprint of the next ACK the client sends, skipping keep-alives; `None` when nothing
/// but keep-alives came within `timeout`.
async fn next_ack(peer: &mut Conn, timeout: Duration) -> Option<String> {
    let until = tokio::time::Instant::now() + timeout;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let got = peer.recv_within(left).await.ok()??.message();
        if got.kind == Kind::Ack {
            return Some(got.text().unwrap().to_owned());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn full_event_queue_leaves_qos_messages_unacknowledged() {
    bounded(60, async {
        let units = load("tcp-login-logout.jsonl", "alice");
        let server = Server::bind(Transport::Tcp).await;
        let options = server.options("alice", "tokenA").with_event_capacity(2);
        let (client, mut events, mut peer) = support::connect(&server, options).await;
        peer.recv().await;
        peer.send_unit(&units[1]).await;
        events
            .wait_for(|e| matches!(e, Event::LoginOk { .. }), PROMPT)
            .await
            .unwrap();

        // The application reads nothing: two messages fill the queue, two more are not taken.
        for n in 1..=4 {
            peer.send(&data(n)).await;
        }
        assert_eq!(next_ack(&mut peer, DEADLINE).await.as_deref(), Some("fp-1"));
        assert_eq!(next_ack(&mut peer, DEADLINE).await.as_deref(), Some("fp-2"));
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while client.state().await.unwrap().deferred_messages < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "messages not deferred"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let state = client.state().await.unwrap();
        assert_eq!((state.deferred_messages, state.dropped_notices), (2, 0));
        // Every message has been read by the client by now: no ACK for 3 and 4.
        assert_eq!(next_ack(&mut peer, Duration::from_millis(300)).await, None);

        // The application catches up; the server's resends are taken this time, and a resend of
        // a message already delivered is ACKed again but not delivered twice.
        for n in 1..=2 {
            let got = events.next().await.unwrap();
            assert!(matches!(&got, Event::Message(m) if m.text() == Some(&*format!("m{n}"))));
        }
        for n in [3, 1, 4] {
            peer.send(&data(n)).await;
            let fp = format!("fp-{n}");
            assert_eq!(next_ack(&mut peer, DEADLINE).await, Some(fp));
        }
        for n in [3, 4] {
            let got = events.next().await.unwrap();
            assert!(
                matches!(&got, Event::Message(m) if m.text() == Some(&*format!("m{n}"))),
                "{got:?}"
            );
        }
        assert_eq!(client.state().await.unwrap().deferred_messages, 2);
        client.logout().await;
        let rest = support::session_events(support::drain(&mut events).await);
        assert!(rest.is_empty(), "{rest:?}");
    })
    .await;
}

/// Notices other than messages never wait and are never lost while the queue is full: the
/// login result of a client whose application reads nothing waits in the overflow.
#[tokio::test(start_paused = true)]
async fn notices_overflow_rather_than_block_the_client() {
    bounded(60, async {
        let units = load("tcp-login-logout.jsonl", "alice");
        let server = Server::bind(Transport::Tcp).await;
        let options = server.options("alice", "tokenA").with_event_capacity(1);
        // `Connected` takes the only slot; the login response overflows.
        let (client, mut events, mut peer) = support::connect(&server, options).await;
        peer.recv().await;
        peer.send_unit(&units[1]).await;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !client.state().await.unwrap().logged_in {
            assert!(tokio::time::Instant::now() < deadline, "login not handled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A message finds the queue full and is not ACKed; the client still answers commands.
        peer.send(&data(1)).await;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while client.state().await.unwrap().deferred_messages < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "message not deferred"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        events
            .wait_for(|e| matches!(e, Event::LoginOk { .. }), PROMPT)
            .await
            .unwrap();
        peer.send(&data(1)).await;
        assert_eq!(next_ack(&mut peer, DEADLINE).await.as_deref(), Some("fp-1"));
        let got = events.wait_for(|_| true, PROMPT).await.unwrap();
        assert!(matches!(&got, Event::Message(m) if m.text() == Some("m1")));
        client.logout().await;
    })
    .await;
}

/// The overflow is bounded too (`ClientOptions::overflow_capacity`): a server flooding notices
/// other than messages (here unsolicited echo responses) at an application that reads nothing
/// gets the excess dropped and counted, never buffered without bound.
#[tokio::test(start_paused = true)]
async fn a_full_overflow_drops_and_counts_notices() {
    bounded(60, async {
        let units = load("tcp-login-logout.jsonl", "alice");
        let server = Server::bind(Transport::Tcp).await;
        let options = ClientOptions {
            overflow_capacity: 3,
            ..server.options("alice", "tokenA").with_event_capacity(1)
        };
        // `Connected` fills the queue; the login result is the overflow's first notice.
        let (client, mut events, mut peer) = support::connect(&server, options).await;
        peer.recv().await;
        peer.send_unit(&units[1]).await;
        for n in 0..10 {
            let echo = Message::new(Kind::EchoResponse)
                .from(UserId::SERVER)
                .to(UserId::from("alice".to_owned()))
                .content(Content::Text(format!("echo {n}").into()));
            peer.send(&echo).await;
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while client.state().await.unwrap().dropped_notices < 8 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "notices not dropped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(client.state().await.unwrap().dropped_notices, 8);

        // What was kept arrives in order: the login, then the first two echoes.
        assert!(matches!(events.recv().await, Some(Notice::Connected)));
        let kept = [
            events.next().await.unwrap(),
            events.next().await.unwrap(),
            events.next().await.unwrap(),
        ];
        assert!(matches!(kept[0], Event::LoginOk { .. }), "{kept:?}");
        for (n, event) in kept[1..].iter().enumerate() {
            assert!(
                matches!(event, Event::EchoResponse(m) if m.text() == Some(&*format!("echo {n}"))),
                "{event:?}"
            );
        }
        client.logout().await;
    })
    .await;
}
