//! The Rust client SDK (`imedge-client`) against a real imedge server over real sockets: login on
//! every transport, C2C with QoS across every transport pair, keep-alive, a server-side kick, S2C
//! from the application, and a login refused by the verifier.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test code: a panic is a failure

mod support;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imedge_client::{
    Client, ClientOptions, Error, Event, Events, KeepAlive, Notice, SenseMode, Transport,
};
use imedge_server::hooks::{ServerEvents, TokenTable, TOKEN_REFUSED};
use support::{config, Server, T};

/// Bound on every test (nextest kills a test after 120 s).
const LIMIT: Duration = Duration::from_secs(60);
/// How long an expected event is waited for: generous, as test threads outnumber the cores
/// (six on two in CI); a pass never waits that long.
const PROMPT: Duration = Duration::from_secs(10);
/// How long "nothing more happens" is watched.
const QUIET: Duration = Duration::from_millis(300);

const TRANSPORTS: [Transport; 3] = [Transport::Tcp, Transport::Udp, Transport::Ws];

async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(LIMIT, test)
        .await
        .expect("the test ran over its time limit");
}

fn addr(server: &Server, transport: Transport) -> std::net::SocketAddr {
    match transport {
        Transport::Tcp => server.tcp,
        Transport::Udp => server.udp,
        Transport::Ws => server.ws,
    }
}

fn options(server: &Server, transport: Transport, uid: &str, token: &str) -> ClientOptions {
    ClientOptions::new(transport, addr(server, transport), uid, token)
}

async fn login(server: &Server, transport: Transport, uid: &str) -> (Client, Events) {
    Client::login(options(server, transport, uid, "tok"))
        .await
        .unwrap_or_else(|e| panic!("{transport:?} login of {uid}: {e}"))
}

/// Session events that arrive within [`QUIET`] (transport notices are skipped).
async fn drain(events: &mut Events) -> Vec<Event> {
    tokio::time::sleep(QUIET).await;
    queued(events)
}

/// Session events already queued (transport notices are skipped).
fn queued(events: &mut Events) -> Vec<Event> {
    let mut seen = Vec::new();
    while let Some(notice) = events.try_recv() {
        if let Notice::Session(event) = notice {
            seen.push(event);
        }
    }
    seen
}

/// Polls `cond` (a question to the server's control API) until it holds, for up to [`PROMPT`].
async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    eventually_within(what, PROMPT, cond).await;
}

/// Polls `cond` until it holds, for up to `limit`.
async fn eventually_within(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn login_and_logout_on_each_transport() {
    bounded(async {
        let server = Server::start(2);
        let api = server.api();
        for transport in TRANSPORTS {
            let uid = format!("login-{transport:?}");
            let (client, mut events) = login(&server, transport, &uid).await;
            let state = client.state().await.unwrap();
            assert!(
                state.connected && state.logged_in,
                "{transport:?}: {state:?}"
            );
            assert!(state.first_login_time.is_some_and(|t| t > 0));
            assert_eq!(api.is_online(&uid), Some(true), "{transport:?}");
            client.logout().await;
            assert!(client.is_closed() || client.state().await.is_err());
            eventually(&format!("{transport:?}: still online after logout"), || {
                api.is_online(&uid) == Some(false)
            })
            .await;
            let rest = drain(&mut events).await;
            assert!(
                !rest
                    .iter()
                    .any(|e| matches!(e, Event::LinkLost | Event::Kicked { .. })),
                "{transport:?}: {rest:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn c2c_with_qos_across_all_transport_pairs() {
    bounded(async {
        // Two cores: half of the pairs cross cores.
        let server = Server::start(2);
        for (i, from_t) in TRANSPORTS.into_iter().enumerate() {
            for (j, to_t) in TRANSPORTS.into_iter().enumerate() {
                let (a, b) = (format!("sdk-a{i}{j}"), format!("sdk-b{i}{j}"));
                let (alice, mut alice_events) = login(&server, from_t, &a).await;
                let (bob, mut bob_events) = login(&server, to_t, &b).await;
                let text = format!("héllo <&'=\"> {from_t:?} → {to_t:?}");
                let fp = alice
                    .send(b.clone(), text.clone(), true)
                    .await
                    .unwrap()
                    .unwrap();

                let got = bob_events
                    .wait_for(|e| matches!(e, Event::Message(_)), PROMPT)
                    .await
                    .unwrap_or_else(|e| panic!("{from_t:?} → {to_t:?}: {e}"));
                let Event::Message(msg) = got else {
                    unreachable!()
                };
                assert_eq!(msg.from.as_ref().unwrap().as_str(), a);
                assert_eq!(msg.to.as_ref().unwrap().as_str(), b);
                assert_eq!(msg.text(), Some(text.as_str()));
                assert_eq!(msg.fp.as_ref(), Some(&fp));
                assert!(msg.qos);

                let delivered = alice_events
                    .wait_for(|e| matches!(e, Event::Delivered(_)), PROMPT)
                    .await
                    .unwrap_or_else(|e| panic!("{from_t:?} → {to_t:?}: {e}"));
                assert_eq!(delivered, Event::Delivered(fp.clone()));
                assert_eq!(alice.state().await.unwrap().pending_qos, 0);

                // Delivered once: no second copy, no second ACK, nothing lost.
                tokio::time::sleep(QUIET).await;
                let rest_b = queued(&mut bob_events);
                let rest_a = queued(&mut alice_events);
                assert!(
                    rest_b.is_empty(),
                    "{from_t:?} → {to_t:?}: bob saw {rest_b:?}"
                );
                assert!(
                    rest_a.is_empty(),
                    "{from_t:?} → {to_t:?}: alice saw {rest_a:?}"
                );
                alice.logout().await;
                bob.logout().await;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn keep_alive_keeps_the_session() {
    bounded(async {
        // A 2 s idle timeout on the server; the clients beat every 250 ms (eight beats per idle
        // period, so a loaded machine delaying a few changes nothing) and give the server 10 s
        // to answer (only the server's side of the keep-alive is under test here).
        let idle = Duration::from_secs(2);
        let mut cfg = config(2);
        cfg.tcp_idle = idle;
        cfg.ws_idle = idle;
        cfg.udp_idle = idle;
        let server = Server::with(cfg, Arc::new(imedge_server::hooks::AllowAll));
        let api = server.api();
        let mut clients = Vec::new();
        for transport in TRANSPORTS {
            let uid = format!("beat-{transport:?}");
            let options = ClientOptions {
                keep_alive: Some(KeepAlive::from_millis(250, 10_000)),
                ..options(&server, transport, &uid, "tok")
            };
            let (client, events) = Client::login(options).await.unwrap();
            clients.push((transport, uid, client, events));
        }
        // For contrast, a raw client that logs in and stays silent is dropped by the server.
        // Logged in after the others, its drop shows a whole idle period has passed for them.
        let mut silent = server.connect(T::Tcp);
        silent.login("silent");
        eventually_within("the silent client is dropped", idle * 10, || {
            api.is_online("silent") == Some(false)
        })
        .await;

        for (transport, uid, client, events) in &mut clients {
            assert_eq!(api.is_online(uid), Some(true), "{transport:?}");
            let state = client.state().await.unwrap();
            assert!(state.logged_in, "{transport:?}: {state:?}");
            let mut transport_trouble = Vec::new();
            while let Some(notice) = events.try_recv() {
                match notice {
                    Notice::Session(
                        Event::LinkLost | Event::Kicked { .. } | Event::Error { .. },
                    )
                    | Notice::Disconnected(_)
                    | Notice::ConnectFailed(_) => transport_trouble.push(format!("{notice:?}")),
                    _ => {}
                }
            }
            assert!(
                transport_trouble.is_empty(),
                "{transport:?}: {transport_trouble:?}"
            );
            client.logout().await;
        }
        silent.expect_closed();
        assert_eq!(api.is_online("silent"), Some(false));
    })
    .await;
}

#[tokio::test]
async fn server_kick_reaches_the_sdk() {
    bounded(async {
        let server = Server::start(2);
        let api = server.api();
        for transport in TRANSPORTS {
            let uid = format!("kick-{transport:?}");
            let (client, mut events) = login(&server, transport, &uid).await;
            api.kick(&uid, 2, Some("maintenance"));
            let kicked = events
                .wait_for(|e| matches!(e, Event::Kicked { .. }), PROMPT)
                .await
                .unwrap_or_else(|e| panic!("{transport:?}: {e}"));
            assert_eq!(
                kicked,
                Event::Kicked {
                    code: 2,
                    reason: Some("maintenance".to_owned())
                },
                "{transport:?}"
            );
            // The SDK stops after a kickout (no automatic re-login): its events end.
            let end =
                tokio::time::timeout(PROMPT, async { while events.recv().await.is_some() {} })
                    .await;
            assert!(
                end.is_ok(),
                "{transport:?}: the client went on after the kickout"
            );
            assert!(client.is_closed() || client.state().await.is_err());
            assert_eq!(api.is_online(&uid), Some(false), "{transport:?}");
        }
    })
    .await;
}

/// Records the server's S2C QoS outcomes.
#[derive(Default)]
struct S2cOutcomes {
    delivered: Mutex<Vec<(String, String)>>,
    lost: Mutex<Vec<(String, String)>>,
}

impl ServerEvents for S2cOutcomes {
    fn on_s2c_delivered(&self, to: &str, fp: &str) {
        self.delivered
            .lock()
            .unwrap()
            .push((to.to_owned(), fp.to_owned()));
    }

    fn on_s2c_lost(&self, to: &str, fp: &str, _json: &[u8]) {
        self.lost
            .lock()
            .unwrap()
            .push((to.to_owned(), fp.to_owned()));
    }
}

#[tokio::test]
async fn s2c_from_the_application_is_received_and_acked() {
    bounded(async {
        let hooks = Arc::new(S2cOutcomes::default());
        // A resend check every 500 ms that leaves a message alone for 4 s: an unacknowledged
        // message is resent 4.0–4.5 s after it was sent, and an ACK has 4 s to arrive however
        // loaded the machine is.
        let mut cfg = config(2);
        cfg.qos.grace = Duration::from_secs(4);
        cfg.qos.check_interval = Duration::from_millis(500);
        let server = Server::with(cfg, Arc::clone(&hooks) as Arc<dyn ServerEvents>);
        let api = server.api();
        let mut clients = Vec::new();
        for transport in TRANSPORTS {
            let uid = format!("s2c-{transport:?}");
            let (client, events) = login(&server, transport, &uid).await;
            clients.push((transport, uid, client, events));
        }
        let sent = tokio::time::Instant::now();
        for (_, uid, ..) in &clients {
            api.send(uid, format!("for {uid}"), 99, true);
        }
        let mut fps = Vec::new();
        for (transport, uid, _, events) in &mut clients {
            let got = events
                .wait_for(|e| matches!(e, Event::Message(_)), PROMPT)
                .await
                .unwrap_or_else(|e| panic!("{transport:?}: {e}"));
            let Event::Message(msg) = got else {
                unreachable!()
            };
            assert_eq!(msg.from.as_ref().unwrap().as_str(), "0", "{transport:?}");
            assert_eq!(msg.to.as_ref().unwrap().as_str(), uid.as_str());
            assert_eq!(msg.text(), Some(format!("for {uid}").as_str()));
            assert_eq!((msg.typeu, msg.qos), (99, true));
            fps.push((uid.clone(), msg.fp.unwrap().as_str().to_owned()));
        }
        // The SDK's ACKs reach the server: `on_s2c_delivered` fires for each message.
        eventually("on_s2c_delivered for every message", || {
            hooks.delivered.lock().unwrap().len() == fps.len()
        })
        .await;
        let mut delivered = hooks.delivered.lock().unwrap().clone();
        delivered.sort();
        fps.sort();
        assert_eq!(delivered, fps);

        // No resend: an unacknowledged message would have been resent 4.0–4.5 s after it was
        // sent. Watch past that.
        tokio::time::sleep_until(sent + Duration::from_millis(5000)).await;
        let (stats, _) = api.stats();
        assert_eq!((stats.resent, stats.lost), (0, 0), "{stats:?}");
        assert!(hooks.lost.lock().unwrap().is_empty());
        for (transport, _, client, events) in &mut clients {
            let rest = drain(events).await;
            assert!(rest.is_empty(), "{transport:?}: {rest:?}");
            client.logout().await;
        }
    })
    .await;
}

#[tokio::test]
async fn login_refused_by_the_token_table() {
    bounded(async {
        let table = TokenTable::parse("alice secret\n").unwrap();
        let server = Server::with(config(2), Arc::new(table));
        for transport in TRANSPORTS {
            // Client::login reports the refusal code.
            let refused = Client::login(options(&server, transport, "alice", "wrong")).await;
            assert!(
                matches!(refused, Err(Error::LoginFailed(TOKEN_REFUSED))),
                "{transport:?}: {refused:?}"
            );
            let unknown = Client::login(options(&server, transport, "mallory", "secret")).await;
            assert!(
                matches!(unknown, Err(Error::LoginFailed(TOKEN_REFUSED))),
                "{transport:?}: {unknown:?}"
            );
            // And as an event, with Client::connect.
            let (client, mut events) =
                Client::connect(options(&server, transport, "alice", "nope"))
                    .await
                    .unwrap();
            let failed = events
                .wait_for(|e| matches!(e, Event::LoginFailed { .. }), PROMPT)
                .await
                .unwrap_or_else(|e| panic!("{transport:?}: {e}"));
            assert_eq!(
                failed,
                Event::LoginFailed {
                    code: TOKEN_REFUSED
                }
            );
            client.close().await;
            // The right token logs in.
            let (client, _events) = Client::login(
                options(&server, transport, "alice", "secret").with_sense_mode(match transport {
                    Transport::Udp => SenseMode::S3,
                    _ => SenseMode::S5,
                }),
            )
            .await
            .unwrap_or_else(|e| panic!("{transport:?}: {e}"));
            client.logout().await;
        }
    })
    .await;
}
