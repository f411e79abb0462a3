//! Integration tests: the load generator against an in-process imedge server on 127.0.0.1
//! (ephemeral ports). Every run is bounded by its own phase deadlines; the tests assert counts,
//! never timings.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imedge_loadgen::config::{Config, MaxLoss, Rate, Scenario};
use imedge_loadgen::report::json;
use imedge_loadgen::{run_in_process, run_processes, Options};
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
    tcp: SocketAddr,
    udp: SocketAddr,
    ws: SocketAddr,
}

impl Server {
    fn start() -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let data_dir =
            std::env::temp_dir().join(format!("imedge-loadgen-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let config = ServerConfig {
            bind: [127, 0, 0, 1].into(),
            tcp_port: Some(0),
            udp_port: Some(0),
            ws_port: Some(0),
            threads: 1,
            io: backend(),
            pin_threads: false,
            offline_store: false,
            data_dir,
            // Closed-loop runs (`Rate::Max`) send far more per session than any client.
            session_msg_rate: 0,
            ..ServerConfig::default()
        };
        let handle = runtime::start(&config, Arc::new(AllowAll)).unwrap();
        Self {
            tcp: handle.tcp_addr.unwrap(),
            udp: handle.udp_addr.unwrap(),
            ws: handle.ws_addr.unwrap(),
            handle: Some(handle),
        }
    }

    fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().unwrap();
        }
    }

    fn loadgen_config(&self, prefix: &str) -> Config {
        Config {
            hosts: vec![self.tcp.ip()],
            tcp_port: self.tcp.port(),
            udp_port: self.udp.port(),
            ws_port: self.ws.port(),
            uid_prefix: prefix.to_owned(),
            ..Config::default()
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn short_c2c_run_delivers_everything() {
    let server = Server::start();
    let config = Config {
        clients: 20,
        scenario: Scenario::C2c,
        rate: Rate::PerSecond(200.0),
        duration: Some(Duration::from_secs(2)),
        grace: Duration::from_secs(3),
        // Two worker threads: their counters and histograms are merged into one report.
        workers: Some(2),
        ..server.loadgen_config("c2c-")
    };
    // The server runs in this process: its /proc entries are ours.
    let options = Options {
        server_pid: Some(std::process::id()),
        ..Options::default()
    };
    let report = run_in_process(&config, options).unwrap();
    let doc = json::to_json(&report);
    eprintln!("{}", imedge_loadgen::report::table::render(&report));

    for key in ["totals", "transports", "logins", "config"] {
        assert!(doc.get(key).is_some(), "missing {key}");
    }
    let totals = &doc["totals"];
    for key in [
        "sent",
        "delivered",
        "acked",
        "lost",
        "duplicated",
        "app_duplicated",
        "reordered",
        "msgs_per_s",
    ] {
        assert!(totals[key].is_number(), "totals.{key}");
    }
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(totals["latency_us"][key].is_number(), "latency_us.{key}");
    }
    for t in ["tcp", "udp", "ws"] {
        assert!(
            doc["transports"][t]["sent"].as_u64().unwrap() > 0,
            "{t} sent"
        );
    }
    assert_eq!(doc["logins"]["ok"], 20);
    let sent = totals["sent"].as_u64().unwrap();
    assert!(sent > 0);
    assert_eq!(totals["delivered"].as_u64().unwrap(), sent);
    assert_eq!(totals["lost"], 0);
    assert_eq!(totals["duplicated"], 0);
    assert_eq!(totals["app_duplicated"], 0);
    assert_eq!(totals["unsent"], 0);
    assert_eq!(totals["acked"].as_u64().unwrap(), sent);
    assert_eq!(report.exit_code(), 0);
    // Server figures: read from /proc on every tick (the CPU window may hold no whole tick in
    // so short a send phase, so only its presence and the memory are checked).
    let server = &doc["server"];
    assert_eq!(server["pid"], std::process::id());
    assert!(server["rss_kb_max"].as_u64().unwrap() > 0, "{server}");
    assert!(server["fds_max"].as_u64().unwrap() > 0, "{server}");
    assert!(server["cpu_us_per_msg"].is_number());
}

#[test]
fn c2s_closed_loop_is_acked() {
    let server = Server::start();
    let config = Config {
        clients: 6,
        scenario: Scenario::C2s,
        rate: Rate::Max,
        window: 2,
        messages: Some(300),
        duration: Some(Duration::from_secs(5)),
        grace: Duration::from_secs(3),
        workers: Some(1),
        ..server.loadgen_config("c2s-")
    };
    let report = run_in_process(&config, Options::default()).unwrap();
    let c = &report.totals.counters;
    assert_eq!(c.sent, 300);
    assert_eq!(c.acked, 300);
    assert_eq!(c.lost, 0);
    assert_eq!(report.exit_code(), 0);
}

#[test]
fn stopped_server_is_reported_as_loss_in_bounded_time() {
    let mut server = Server::start();
    let config = Config {
        clients: 12,
        scenario: Scenario::C2c,
        rate: Rate::PerSecond(300.0),
        duration: Some(Duration::from_secs(4)),
        grace: Duration::from_secs(1),
        workers: Some(1),
        max_loss: MaxLoss::Count(0),
        ..server.loadgen_config("dead-")
    };
    let started = Instant::now();
    let runner = std::thread::spawn(move || run_in_process(&config, Options::default()).unwrap());
    // Stop the server once the run is surely sending (logins of 12 clients take milliseconds).
    std::thread::sleep(Duration::from_millis(1500));
    server.stop();
    let report = runner.join().unwrap();
    let elapsed = started.elapsed();
    eprintln!("{}", imedge_loadgen::report::table::render(&report));
    let (lost, due) = report.loss();
    assert!(report.totals.counters.sent > 0);
    assert!(lost > 0, "loss reported: {lost} of {due}");
    assert_eq!(report.exit_code(), 1);
    // Bounded: far below the worker's hard stop, which is itself bounded.
    assert!(elapsed < Duration::from_secs(60), "ended after {elapsed:?}");
}

#[test]
fn idle_and_storm_log_everyone_in() {
    let server = Server::start();
    let config = Config {
        clients: 9,
        scenario: Scenario::Storm,
        duration: Some(Duration::from_secs(5)),
        workers: Some(1),
        ..server.loadgen_config("storm-")
    };
    let report = run_in_process(&config, Options::default()).unwrap();
    assert_eq!(report.logins.ok, 9);
    assert_eq!(report.logins.stormed, 9);
    assert_eq!(report.logins.relogins_ok, 9);
    assert_eq!(report.exit_code(), 0);
}

#[test]
fn worker_processes_report_to_the_parent() {
    let server = Server::start();
    let config = Config {
        clients: 8,
        scenario: Scenario::C2s,
        rate: Rate::PerSecond(100.0),
        duration: Some(Duration::from_secs(1)),
        grace: Duration::from_secs(3),
        workers: Some(2),
        ..server.loadgen_config("proc-")
    };
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_imedge-loadgen"));
    let report = run_processes(&config, exe, Options::default()).unwrap();
    assert_eq!(report.workers, 2);
    assert_eq!(report.logins.ok, 8);
    let c = &report.totals.counters;
    assert!(c.sent > 0);
    assert_eq!(c.acked, c.sent);
    assert_eq!(c.lost, 0);
    assert!(report.cpu.total_s > 0.0);
    assert_eq!(report.exit_code(), 0);
}
