//! QoS over a lossy UDP link: UDP clients reach an in-process imedge through the `imedge-lossy`
//! proxy, which drops datagrams both ways. With enough resends on both ends every C2C message
//! reaches the recipient's application exactly once; with the reference's few resends the SDK's
//! de-duplication still never lets a resend through twice.
//!
//! The server's resend schedule is set as `--qos-resends N --qos-resend-interval MS` set it
//! (`ServerConfig::qos`). Under loss a UDP client misses keep-alive responses, declares its link
//! lost and logs in again from a new socket (a new source port): the proxy spares the first
//! datagram of every flow each way, so each login and its answer get through, and the server
//! re-routes the user to the new address. Counts are asserted, never timings.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use imedge_loadgen::config::{Config, MaxLoss, Rate, Scenario};
use imedge_loadgen::report::{json, table};
use imedge_loadgen::{run_in_process, Options, Report};
use imedge_lossy::{Config as ProxyConfig, Faults, Proxy};
use imedge_protocol::qos::QosSenderConfig;
use imedge_server::config::{IoBackend, ServerConfig};
use imedge_server::hooks::AllowAll;
use imedge_server::runtime::{self, ServerHandle};

/// The I/O backend of the test server (`IMEDGE_TEST_IO=uring|epoll`), as the server's tests do.
fn backend() -> IoBackend {
    match std::env::var("IMEDGE_TEST_IO").as_deref() {
        Ok("uring") => IoBackend::Uring,
        _ => IoBackend::Epoll,
    }
}

struct Server {
    handle: Option<ServerHandle>,
    udp: SocketAddr,
    data_dir: std::path::PathBuf,
}

impl Server {
    /// A server on ephemeral loopback ports with the resend schedule `qos`. The offline store
    /// is on: a message for a recipient caught between two logins is kept for its next login.
    fn start(name: &str, qos: QosSenderConfig) -> Self {
        let data_dir =
            std::env::temp_dir().join(format!("imedge-lossy-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let config = ServerConfig {
            bind: [127, 0, 0, 1].into(),
            tcp_port: Some(0),
            udp_port: Some(0),
            ws_port: Some(0),
            threads: 1,
            io: backend(),
            pin_threads: false,
            offline_store: true,
            data_dir: data_dir.clone(),
            qos,
            ..ServerConfig::default()
        };
        let handle = runtime::start(&config, Arc::new(AllowAll)).unwrap();
        Self {
            udp: handle.udp_addr.unwrap(),
            handle: Some(handle),
            data_dir,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// A proxy in front of `server` dropping `drop` of the datagrams each way; the first datagram of
/// every flow each way (a login and its answer) is spared.
fn lossy_proxy(server: &Server, drop: f64, seed: u64) -> Proxy {
    Proxy::start(ProxyConfig {
        to_server: Faults::dropping(drop),
        to_client: Faults::dropping(drop),
        seed,
        spare_first: 1,
        ..ProxyConfig::new(server.udp)
    })
    .unwrap()
}

/// A C2C QoS run of `clients` UDP clients through `proxy`.
fn run(proxy: &Proxy, prefix: &str, clients: usize, config: Config) -> Report {
    let addr = proxy.addr();
    let config = Config {
        hosts: vec![addr.ip()],
        udp_port: addr.port(),
        weights: [0, 1, 0],
        clients,
        scenario: Scenario::C2c,
        qos: true,
        uid_prefix: prefix.to_owned(),
        workers: Some(1),
        ..config
    };
    let report = run_in_process(&config, Options::default()).unwrap();
    eprintln!("{}", table::render(&report));
    eprintln!("proxy: {:?}", proxy.stats());
    report
}

/// The acceptance test: 200 UDP clients, 10 % of the datagrams dropped each way,
/// `--qos-resends 8` on the server and on every client: nothing lost, nothing delivered twice
/// to an application, although the wire carries duplicates (resends whose ACK was dropped).
#[test]
fn ten_percent_loss_with_eight_resends_delivers_every_message_once() {
    let interval = Duration::from_millis(500);
    let server = Server::start(
        "eight",
        QosSenderConfig {
            max_resends: 8,
            check_interval: interval,
            ..QosSenderConfig::SERVER
        },
    );
    let proxy = lossy_proxy(&server, 0.10, 9);
    let report = run(
        &proxy,
        "lossy8-",
        200,
        Config {
            // 2,000 messages over 10 s: several keep-alive rounds, so some clients lose their
            // link and log in again from a new port in the middle of the traffic.
            rate: Rate::PerSecond(200.0),
            duration: Some(Duration::from_secs(10)),
            // A client's last resend leaves 0.5 + 8 × 0.5 s after its first send, the server's
            // 2 + 8 × 0.5 s after it forwarded: 15 s covers both legs and a re-login between.
            grace: Duration::from_secs(20),
            qos_resends: Some(8),
            qos_resend_interval: Some(interval),
            max_loss: MaxLoss::Count(0),
            ..Config::default()
        },
    );
    let stats = proxy.stop();
    let doc = json::to_json(&report);
    let totals = &doc["totals"];
    let c = &report.totals.counters;
    assert_eq!(report.logins.ok, 200, "every client logged in");
    assert!(c.sent >= 1000, "{c:?}");
    assert_eq!(totals["lost"], 0, "{c:?}");
    assert_eq!(totals["delivered"].as_u64(), Some(c.sent), "{c:?}");
    assert_eq!(totals["app_duplicated"], 0, "{c:?}");
    // The link was lossy indeed, and the SDK's de-duplication had copies to hide.
    assert!(
        stats.to_server.dropped > 50 && stats.to_client.dropped > 50,
        "{stats:?}"
    );
    assert!(c.duplicated > 0, "{c:?}");
    assert_eq!(report.exit_code(), 0);
}

/// The reference's schedule (the SDK resends twice, the server once, every 5 s) over a milder
/// 3 % loss: a few messages may be lost — that is what the resend flags are for — but no
/// resend ever reaches an application twice, and the run completes.
#[test]
fn reference_resends_never_deliver_twice() {
    let server = Server::start("reference", QosSenderConfig::SERVER);
    let proxy = lossy_proxy(&server, 0.03, 3);
    let report = run(
        &proxy,
        "lossy2-",
        40,
        Config {
            rate: Rate::PerSecond(40.0),
            duration: Some(Duration::from_secs(3)),
            // The SDK gives a message up 18 s after its first send at the latest.
            grace: Duration::from_secs(20),
            max_loss: MaxLoss::Fraction(1.0),
            ..Config::default()
        },
    );
    let stats = proxy.stop();
    let c = &report.totals.counters;
    assert_eq!(report.logins.ok, 40, "every client logged in");
    assert!(c.sent >= 60, "{c:?}");
    assert_eq!(c.app_duplicated, 0, "{c:?}");
    assert!(c.delivered + c.lost == c.sent, "{c:?}");
    assert!(
        stats.to_server.dropped + stats.to_client.dropped > 0,
        "{stats:?}"
    );
}

/// A partition longer than the UDP SDK's 10-s liveness timeout: every client declares its link
/// lost and logs in again from a new socket, i.e. a new source port — a new flow at the proxy,
/// whose first datagram each way is spared, so the re-login gets through while everything else
/// is still dropped — and the server drops the silent old sessions. Once the link heals, every
/// message sent reaches its recipient's application exactly once: the resend schedule (8 every
/// 3 s, about 30 s in all on both ends) outlasts the partition by three resends or more.
///
/// Why so long a schedule: like the Java SDK, the session counts a resend at every tick while
/// its link is down (nothing is written), and the re-login adds one at once (its timers restart
/// at every login, SPEC §8.3). With 8 every 2 s (20 s) a message first sent just after the
/// partition began had a single resend left after the healing, and under load 1–3 of 400
/// messages were reported `Lost` to their senders (never reaching the server) in 5 of 8 runs.
#[test]
fn udp_clients_log_in_again_from_new_ports_after_a_partition() {
    let interval = Duration::from_secs(3);
    let server = Server::start(
        "partition",
        QosSenderConfig {
            max_resends: 8,
            check_interval: interval,
            ..QosSenderConfig::SERVER
        },
    );
    let proxy = Arc::new(lossy_proxy(&server, 0.0, 5));
    let clients = 20;
    let partition = {
        let proxy = Arc::clone(&proxy);
        std::thread::spawn(move || {
            // Once everyone has logged in and traffic flows (polled, bounded)...
            let started = std::time::Instant::now();
            while proxy.stats().to_server.received < 3 * clients as u64 {
                assert!(started.elapsed() < Duration::from_secs(30), "no traffic");
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_secs(2));
            // ...nothing gets through but each new flow's first datagram, for 14 s: more than
            // the 10-s liveness timeout plus its 2-s check, well within the 30-s resend span.
            proxy.set_faults(Faults::dropping(1.0), Faults::dropping(1.0));
            std::thread::sleep(Duration::from_secs(14));
            proxy.set_faults(Faults::default(), Faults::default());
        })
    };
    let report = run(
        &proxy,
        "part-",
        clients,
        Config {
            rate: Rate::PerSecond(20.0),
            duration: Some(Duration::from_secs(20)),
            grace: Duration::from_secs(35),
            qos_resends: Some(8),
            qos_resend_interval: Some(interval),
            // Messages due while a sender is logged out are unsent, not lost.
            max_loss: MaxLoss::Fraction(1.0),
            ..Config::default()
        },
    );
    partition.join().unwrap();
    let stats = proxy.stats();
    let c = &report.totals.counters;
    assert_eq!(report.logins.ok, clients as u64, "every client logged in");
    assert!(report.logins.link_lost > 0, "{:?}", report.logins);
    assert!(
        stats.flows > clients as u64,
        "re-logins came from new ports: {stats:?}"
    );
    assert!(c.sent > 100, "{c:?}");
    assert_eq!(c.lost, 0, "{c:?}");
    assert_eq!(c.app_duplicated, 0, "{c:?}");
}

/// A link that delivers every datagram twice: the wire-level `duplicated` counts one extra copy
/// of every message, `app_duplicated` none — the SDK's de-duplication hides them all.
#[test]
fn a_duplicating_link_shows_on_the_wire_not_in_the_application() {
    let server = Server::start("twice", QosSenderConfig::SERVER);
    let proxy = Proxy::start(ProxyConfig {
        to_client: Faults {
            duplicate: 1.0,
            ..Faults::default()
        },
        ..ProxyConfig::new(server.udp)
    })
    .unwrap();
    let report = run(
        &proxy,
        "twice-",
        20,
        Config {
            rate: Rate::PerSecond(50.0),
            duration: Some(Duration::from_secs(2)),
            grace: Duration::from_secs(10),
            ..Config::default()
        },
    );
    let c = &report.totals.counters;
    assert!(c.sent >= 50, "{c:?}");
    assert_eq!((c.delivered, c.lost), (c.sent, 0), "{c:?}");
    assert!(c.duplicated >= c.sent, "every message came twice: {c:?}");
    assert_eq!(c.app_duplicated, 0, "{c:?}");
    assert_eq!(report.exit_code(), 0);
}
