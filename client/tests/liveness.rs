//! Keep-alive, link loss and automatic re-login over real sockets (SPEC §6), against a scripted
//! server that answers with the captured server messages.
//!
//! Tests that check when something happens run on tokio's paused clock (`start_paused`): the
//! client's task and the scripted server share it, and it jumps to the next timer only when both
//! are idle, so the protocol's 3-s and 8-s instants come out exact however loaded the machine is
//! (loopback delivers a write to the peer's socket before the writer returns).

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test code: a panic is a failure

mod support;

use std::time::Duration;

use imedge_client::{Client, ClientOptions, Error, Event, Notice, SenseMode, Transport};
use imedge_protocol::Kind;
use support::{bounded, load, Conn, Server, Unit, PROMPT};
use tokio::time::Instant;

/// The captured keep-alive flow of `transport`: login, login response, keep-alive, response.
fn keepalive_units(transport: Transport) -> Vec<Unit> {
    let prefix = match transport {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
        Transport::Ws => "ws",
    };
    load(&format!("{prefix}-keepalive.jsonl"), "alice")
}

/// The captured login JSON with `firstLoginTime` set to `first_login_time`, as the SDK sends it
/// on an automatic re-login (SPEC §4.1).
fn relogin_json(login: &Unit, first_login_time: i64) -> String {
    let fresh = r#"\"firstLoginTime\":0}"#;
    assert!(login.json.contains(fresh), "{}", login.at());
    login.json.replace(
        fresh,
        &format!(r#"\"firstLoginTime\":{first_login_time}}}"#),
    )
}

/// A client logged in to `server` as in the transport's keep-alive capture: the login must match
/// the capture, the captured response answers it.
struct LoggedIn {
    client: Client,
    events: imedge_client::Events,
    peer: Conn,
    /// When the login response was sent.
    t0: Instant,
    units: Vec<Unit>,
}

async fn logged_in(
    server: &Server,
    transport: Transport,
    sense_mode: Option<SenseMode>,
) -> LoggedIn {
    let units = keepalive_units(transport);
    let (user_id, token) = support::credentials(&units);
    let mut options = server.options(&user_id, &token);
    options.sense_mode = sense_mode;
    let (client, mut events, mut peer) = support::connect(server, options).await;
    assert_eq!(peer.recv().await.json(), units[0].json);
    peer.send_unit(&units[1]).await;
    let t0 = Instant::now();
    let mut seen = Vec::new();
    while !matches!(seen.last(), Some(Notice::Session(Event::LoginOk { .. }))) {
        let notice = tokio::time::timeout(PROMPT, events.recv()).await.unwrap();
        seen.push(notice.unwrap_or_else(|| panic!("client ended: {seen:?}")));
    }
    LoggedIn {
        client,
        events,
        peer,
        t0,
        units,
    }
}

/// MODE_3S on TCP: a keep-alive every 3 s after the login, each byte-identical to the Java SDK's;
/// answered, the link stays up (the 5 s timeout would otherwise fire at +8 s).
#[tokio::test(start_paused = true)]
async fn tcp_keep_alive_mode_3s_answered() {
    bounded(20, async {
        let server = Server::bind(Transport::Tcp).await;
        let LoggedIn {
            client,
            mut events,
            mut peer,
            t0,
            units,
        } = logged_in(&server, Transport::Tcp, Some(SenseMode::S3)).await;
        let (keep_alive, response) = (&units[2], &units[3]);
        assert_eq!(keep_alive.kind(), Kind::KeepAlive);
        assert_eq!(response.kind(), Kind::KeepAliveResponse);

        for n in 1..=3u32 {
            let got = peer
                .recv_within(Duration::from_secs(4))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got.raw, keep_alive.bytes, "keep-alive {n}");
            let elapsed = got.at - t0;
            let due = Duration::from_secs(3) * n;
            // Virtual clock: exact up to tokio's 1-ms timer resolution.
            assert!(
                elapsed >= due && elapsed < due + Duration::from_millis(50),
                "keep-alive {n} at {elapsed:?}, due {due:?}"
            );
            peer.send_unit(response).await;
        }
        // Past the +8 s at which an unanswered link would have been declared lost.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let state = client.state().await.unwrap();
        assert!(state.logged_in && state.connected, "{state:?}");
        assert!(events.try_recv().is_none(), "nothing to report");
        client.logout().await;
        assert_eq!(peer.recv().await.message().kind, Kind::Logout);
    })
    .await;
}

/// MODE_3S on TCP, keep-alives unanswered: the link is declared lost at +8 s (first keep-alive at
/// +3 s, 5 s timeout, checked every 2 s), the client reconnects at once and re-logs in with the
/// `firstLoginTime` the server gave it (SPEC §6.2, §6.4).
#[tokio::test(start_paused = true)]
async fn tcp_keep_alive_timeout_relogs_with_first_login_time() {
    bounded(20, async {
        let server = Server::bind(Transport::Tcp).await;
        let LoggedIn {
            client,
            mut events,
            mut peer,
            t0,
            units,
        } = logged_in(&server, Transport::Tcp, Some(SenseMode::S3)).await;
        let first_login_time = support::first_login_time(&units);

        // Keep-alives at +3 s, +6 s (and +9 s) go unanswered; then the client drops the link.
        let mut keep_alives = 0;
        while let Some(got) = peer.recv_within(Duration::from_secs(12)).await.unwrap() {
            assert_eq!(got.raw, units[2].bytes);
            keep_alives += 1;
        }
        let lost = t0.elapsed();
        // The 5 s of silence since the first keep-alive (+3 s) end exactly at the liveness check
        // of +8 s. On a real clock timer jitter would decide whether that check or the next
        // (+10 s) sees them (as in the Java SDK, whose two timers race the same way); on the
        // virtual clock of this test it is that one.
        assert!(
            lost >= Duration::from_secs(8) && lost < Duration::from_millis(8_050),
            "link declared lost after {lost:?}"
        );
        assert_eq!(keep_alives, 2);

        let mut second = server.accept().await;
        assert_eq!(
            second.recv().await.json(),
            relogin_json(&units[0], first_login_time)
        );
        assert!(
            t0.elapsed() - lost < Duration::from_millis(500),
            "re-login is immediate"
        );
        second.send_unit(&units[1]).await;
        let after = events
            .wait_for(|e| matches!(e, Event::LoginOk { .. }), PROMPT)
            .await
            .unwrap();
        assert_eq!(after, Event::LoginOk { first_login_time });
        let state = client.state().await.unwrap();
        assert!(state.logged_in);
        assert_eq!(state.first_login_time, Some(first_login_time));
        client.logout().await;
        assert_eq!(second.recv().await.message().kind, Kind::Logout);
    })
    .await;
}

/// The server closes the connection (TCP FIN, WebSocket close): link lost, immediate reconnection
/// and re-login with the stored `firstLoginTime`.
#[tokio::test]
async fn server_close_relogs_at_once() {
    bounded(20, async {
        for transport in [Transport::Tcp, Transport::Ws] {
            let server = Server::bind(transport).await;
            let LoggedIn {
                client,
                mut events,
                peer,
                units,
                ..
            } = logged_in(&server, transport, None).await;
            let first_login_time = support::first_login_time(&units);
            drop(peer);

            let mut second = server.accept().await;
            assert_eq!(
                second.recv().await.json(),
                relogin_json(&units[0], first_login_time),
                "{transport:?}"
            );
            second.send_unit(&units[1]).await;
            let mut seen = Vec::new();
            while !matches!(seen.last(), Some(Notice::Session(Event::LoginOk { .. }))) {
                seen.push(events.recv().await.unwrap());
            }
            assert!(
                matches!(
                    seen.as_slice(),
                    [
                        Notice::Disconnected(_),
                        Notice::Session(Event::LinkLost),
                        Notice::Connected,
                        Notice::Session(Event::LoginOk { .. })
                    ]
                ),
                "{transport:?}: {seen:?}"
            );
            client.logout().await;
        }
    })
    .await;
}

/// Input that is not a valid frame or message closes the link; the session re-logs in on a new
/// one (SPEC §2.2 — what the reference does to a peer that sends garbage). Never a panic.
#[tokio::test]
async fn malformed_input_closes_the_link_and_relogs() {
    bounded(30, async {
        let garbage_tcp = {
            let mut frame = 8u32.to_be_bytes().to_vec();
            frame.extend_from_slice(b"not json");
            frame
        };
        let cases: [(Transport, Vec<u8>, &str); 5] = [
            (Transport::Tcp, garbage_tcp, "decode"),
            // A prefix announcing 6145 bytes: over the limit before the body arrives (SPEC §1.1).
            (Transport::Tcp, vec![0, 0, 0x18, 0x01], "frame"),
            (Transport::Udp, b"{\"type\":".to_vec(), "decode"),
            // A binary WebSocket frame (SPEC §1.3).
            (Transport::Ws, vec![0x82, 0x02, b'{', b'}'], "binary"),
            // A text frame that is JSON but not an object.
            (Transport::Ws, vec![0x81, 0x02, b'[', b']'], "decode"),
        ];
        for (transport, bytes, what) in cases {
            let server = Server::bind(transport).await;
            let LoggedIn {
                client,
                mut events,
                mut peer,
                units,
                ..
            } = logged_in(&server, transport, None).await;
            let first_login_time = support::first_login_time(&units);
            let first_port = peer.peer();
            peer.send_bytes(&bytes).await;

            let disconnected = events.recv().await.unwrap();
            let error = match disconnected {
                Notice::Disconnected(error) => error,
                other => panic!("{transport:?} {what}: {other:?}"),
            };
            let matches = match what {
                "decode" => matches!(error, Error::Decode(_)),
                "frame" => matches!(error, Error::Frame(_)),
                _ => matches!(error, Error::BinaryFrame),
            };
            assert!(matches, "{transport:?} {what}: {error:?}");
            assert_eq!(events.next().await, Some(Event::LinkLost));

            let mut second = server.accept().await;
            let login = second.recv().await;
            assert_eq!(login.json(), relogin_json(&units[0], first_login_time));
            // A new link is a new source port, also on UDP (a new session for the server).
            assert_ne!(second.peer(), first_port, "{transport:?}");
            second.send_unit(&units[1]).await;
            events
                .wait_for(|e| matches!(e, Event::LoginOk { .. }), PROMPT)
                .await
                .unwrap();
            client.logout().await;
        }
    })
    .await;
}

/// While the server is down the session asks for a new link every re-login interval (3 s on
/// TCP); when it is back, the client logs in again by itself.
#[tokio::test(start_paused = true)]
async fn reconnects_when_the_server_comes_back() {
    bounded(20, async {
        let server = Server::bind(Transport::Tcp).await;
        let addr = server.addr();
        let LoggedIn {
            client,
            mut events,
            peer,
            units,
            ..
        } = logged_in(&server, Transport::Tcp, None).await;
        let first_login_time = support::first_login_time(&units);
        drop(peer);
        drop(server);

        let mut seen = Vec::new();
        while !matches!(seen.last(), Some(Notice::ConnectFailed(_))) {
            seen.push(events.recv().await.unwrap());
        }
        assert!(
            matches!(
                seen.as_slice(),
                [
                    Notice::Disconnected(Error::PeerClosed),
                    Notice::Session(Event::LinkLost),
                    Notice::ConnectFailed(Error::Connect { .. })
                ]
            ),
            "{seen:?}"
        );
        let down = Instant::now();
        let server = Server::bind_addr(Transport::Tcp, addr).await;
        let mut peer = server.accept().await;
        let retried = down.elapsed();
        // Virtual clock: one re-login interval, up to the timer resolution.
        assert!(
            retried > Duration::from_millis(2900) && retried < Duration::from_millis(3050),
            "next attempt after {retried:?}"
        );
        assert_eq!(
            peer.recv().await.json(),
            relogin_json(&units[0], first_login_time)
        );
        peer.send_unit(&units[1]).await;
        events
            .wait_for(|e| matches!(e, Event::LoginOk { .. }), PROMPT)
            .await
            .unwrap();
        client.logout().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn connect_errors() {
    bounded(10, async {
        // Nobody listening.
        let server = Server::bind(Transport::Tcp).await;
        let addr = server.addr();
        drop(server);
        for transport in [Transport::Tcp, Transport::Ws] {
            let options = ClientOptions::new(transport, addr, "alice", "tokenA");
            let result = Client::connect(options).await;
            assert!(
                matches!(result, Err(Error::Connect { .. })),
                "{transport:?}: {result:?}"
            );
        }

        // A WebSocket path the server does not serve: the reference-compatible handshake of the
        // protocol crate answers 404.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refuse = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = bytes::BytesMut::new();
            loop {
                stream.read_buf(&mut request).await.unwrap();
                let mut out = bytes::BytesMut::new();
                if let Some(outcome) = imedge_protocol::frame::ws::accept(&request, &mut out) {
                    assert!(matches!(
                        outcome,
                        imedge_protocol::frame::ws::Handshake::Rejected { status: 404, .. }
                    ));
                    stream.write_all(&out).await.unwrap();
                    return;
                }
            }
        };
        let options = ClientOptions {
            ws_path: "/chat".to_owned(),
            ..ClientOptions::new(Transport::Ws, addr, "alice", "tokenA")
        };
        let (result, ()) = tokio::join!(Client::connect(options), refuse);
        assert!(matches!(result, Err(Error::Handshake { .. })), "{result:?}");

        // UDP has no connection: a server that never answers shows as a login timeout.
        let server = Server::bind(Transport::Udp).await;
        let options = ClientOptions {
            connect_timeout: Duration::from_millis(300),
            ..server.options("alice", "tokenA")
        };
        let started = Instant::now();
        let result = Client::login(options).await;
        assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2));

        // UDP SDK has no 5S mode (SPEC §6.2).
        let options = server
            .options("alice", "tokenA")
            .with_sense_mode(SenseMode::S5);
        assert!(matches!(
            Client::connect(options).await,
            Err(Error::Options(_))
        ));
    })
    .await;
}

#[tokio::test]
async fn send_before_login_is_refused() {
    bounded(10, async {
        let server = Server::bind(Transport::Udp).await;
        let (client, _events, mut peer) =
            support::connect(&server, server.options("alice", "tokenA")).await;
        assert_eq!(peer.recv().await.message().kind, Kind::Login);
        let result = client.send("bob", "too early", true).await;
        assert!(
            matches!(
                result,
                Err(Error::Send(imedge_client::SendError::NotLoggedIn))
            ),
            "{result:?}"
        );
        let state = client.state().await.unwrap();
        assert!(state.connected && !state.logged_in, "{state:?}");
        client.close().await;
        assert!(matches!(client.state().await, Err(Error::Closed)));
    })
    .await;
}

/// Dropping every handle logs out, like the SDK's release.
#[tokio::test]
async fn dropping_the_client_logs_out() {
    bounded(10, async {
        let units = load("tcp-login-logout.jsonl", "alice");
        let server = Server::bind(Transport::Tcp).await;
        let LoggedIn {
            client,
            mut events,
            mut peer,
            ..
        } = logged_in(&server, Transport::Tcp, None).await;
        let clone = client.clone();
        drop(client);
        assert!(!clone.is_closed());
        drop(clone);
        assert_eq!(peer.recv().await.raw, units[2].bytes);
        peer.closed().await;
        assert!(support::drain(&mut events).await.is_empty());
    })
    .await;
}
