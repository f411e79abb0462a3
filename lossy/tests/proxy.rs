//! The proxy over real sockets on 127.0.0.1: an echo server behind it, clients in front. Counts
//! are asserted, never timings; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test code: a panic is a failure

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use imedge_lossy::{Config, Faults, Proxy, Stats};

/// Generous: the proxy answers in microseconds, but test threads share two cores.
const DEADLINE: Duration = Duration::from_secs(20);

/// A UDP echo server on an ephemeral loopback port, which also remembers the source addresses
/// it saw.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<HashSet<SocketAddr>>>,
}

impl Echo {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peers = HashSet::new();
            let mut buf = [0; 2048];
            while !flag.load(Ordering::SeqCst) {
                if let Ok((len, peer)) = socket.recv_from(&mut buf) {
                    peers.insert(peer);
                    let _ = socket.send_to(&buf[..len], peer);
                }
            }
            peers
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> HashSet<SocketAddr> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn client() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    socket
}

/// Sends the numbered datagrams of `range` through `proxy`. Tests send at most 50 at once: a
/// burst must fit the receiving sockets' buffers even when the proxy's thread is not scheduled.
fn send_numbered(socket: &UdpSocket, proxy: SocketAddr, range: std::ops::Range<u32>) {
    for i in range {
        socket.send_to(&i.to_be_bytes(), proxy).unwrap();
    }
}

/// Reads echoes until `expected` have arrived or nothing came for `quiet` after the proxy has
/// released everything; returns them in arrival order.
fn collect(socket: &UdpSocket, proxy: &Proxy, expected: usize, quiet: Duration) -> Vec<u32> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut last = Instant::now();
    let mut buf = [0; 64];
    while got.len() < expected && started.elapsed() < DEADLINE {
        match socket.recv_from(&mut buf) {
            Ok((4, _)) => {
                got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                last = Instant::now();
            }
            Ok(_) => panic!("unexpected datagram"),
            Err(_) => {
                let s = proxy.stats();
                let settled = s.to_client.received == s.to_server.sent
                    && s.to_server.received + s.to_server.duplicated
                        == s.to_server.sent + s.to_server.dropped;
                if settled && last.elapsed() >= quiet {
                    break;
                }
            }
        }
    }
    got
}

/// Waits until `pred` holds for the proxy's counts.
fn wait_stats(proxy: &Proxy, pred: impl Fn(&Stats) -> bool) -> Stats {
    let started = Instant::now();
    loop {
        let stats = proxy.stats();
        if pred(&stats) {
            return stats;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "stats never settled: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn perfect_link_relays_everything_in_order() {
    let echo = Echo::start();
    let proxy = Proxy::start(Config::new(echo.addr)).unwrap();
    let socket = client();
    let mut got = Vec::new();
    for round in 0..4 {
        send_numbered(&socket, proxy.addr(), round * 50..(round + 1) * 50);
        got.extend(collect(&socket, &proxy, 50, Duration::from_millis(200)));
    }
    assert_eq!(got, (0..200).collect::<Vec<_>>());
    let stats = proxy.stop();
    assert_eq!(stats.to_server.received, 200);
    assert_eq!(stats.to_server.sent, 200);
    assert_eq!(stats.to_client.sent, 200);
    assert_eq!(stats.flows, 1);
    echo.stop();
}

#[test]
fn each_client_gets_its_own_source_address() {
    let echo = Echo::start();
    let proxy = Proxy::start(Config::new(echo.addr)).unwrap();
    let clients: Vec<UdpSocket> = (0..5).map(|_| client()).collect();
    for (i, socket) in clients.iter().enumerate() {
        send_numbered(socket, proxy.addr(), i as u32..i as u32 + 1);
    }
    for (i, socket) in clients.iter().enumerate() {
        assert_eq!(
            collect(socket, &proxy, 1, Duration::ZERO),
            [i as u32],
            "client {i}"
        );
    }
    let stats = proxy.stop();
    assert_eq!((stats.flows, stats.open_flows), (5, 5));
    assert_eq!(echo.stop().len(), 5);
}

#[test]
fn drops_follow_the_rate_in_each_direction() {
    let echo = Echo::start();
    let proxy = Proxy::start(Config {
        to_server: Faults::dropping(0.1),
        to_client: Faults::dropping(0.1),
        seed: 42,
        ..Config::new(echo.addr)
    })
    .unwrap();
    let socket = client();
    let mut got = Vec::new();
    // In rounds, so that no socket buffer overflows whatever the scheduling.
    for round in 0..40 {
        send_numbered(&socket, proxy.addr(), round * 50..(round + 1) * 50);
        got.extend(collect(&socket, &proxy, 50, Duration::from_millis(50)));
    }
    let stats = proxy.stop();
    echo.stop();
    assert_eq!(stats.to_server.received, 2000);
    assert_eq!(
        stats.to_server.sent + stats.to_server.dropped,
        2000,
        "{stats:?}"
    );
    assert!((120..280).contains(&stats.to_server.dropped), "{stats:?}");
    assert!((100..260).contains(&stats.to_client.dropped), "{stats:?}");
    assert_eq!(got.len() as u64, stats.to_client.sent);
    let distinct: HashSet<u32> = got.iter().copied().collect();
    assert_eq!(distinct.len(), got.len(), "nothing duplicated");
}

#[test]
fn spared_datagrams_pass_a_link_that_drops_everything() {
    let echo = Echo::start();
    let proxy = Proxy::start(Config {
        to_server: Faults::dropping(1.0),
        to_client: Faults::dropping(1.0),
        spare_first: 3,
        ..Config::new(echo.addr)
    })
    .unwrap();
    let socket = client();
    send_numbered(&socket, proxy.addr(), 0..10);
    let stats = wait_stats(&proxy, |s| s.to_server.received == 10);
    assert_eq!((stats.to_server.spared, stats.to_server.dropped), (3, 7));
    let got = collect(&socket, &proxy, 3, Duration::from_millis(200));
    assert_eq!(got, [0, 1, 2]);
    // The server's fourth datagram to this client would be dropped: the spare is per direction.
    let stats = proxy.stop();
    assert_eq!(stats.to_client.spared, 3);
    echo.stop();
}

#[test]
fn duplicates_arrive_twice() {
    let echo = Echo::start();
    let proxy = Proxy::start(Config {
        to_client: Faults {
            duplicate: 1.0,
            ..Faults::default()
        },
        ..Config::new(echo.addr)
    })
    .unwrap();
    let socket = client();
    send_numbered(&socket, proxy.addr(), 0..25);
    let mut got = collect(&socket, &proxy, 50, Duration::from_millis(200));
    got.sort_unstable();
    let twice: Vec<u32> = (0..25).flat_map(|i| [i, i]).collect();
    assert_eq!(got, twice);
    let stats = proxy.stop();
    assert_eq!((stats.to_client.duplicated, stats.to_client.sent), (25, 50));
    echo.stop();
}

#[test]
fn delayed_and_reordered_datagrams_all_arrive() {
    let echo = Echo::start();
    let proxy = Proxy::start(Config {
        to_server: Faults {
            reorder: 0.3,
            reorder_hold: Duration::from_millis(200),
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(5),
            ..Faults::default()
        },
        seed: 7,
        ..Config::new(echo.addr)
    })
    .unwrap();
    let socket = client();
    send_numbered(&socket, proxy.addr(), 0..50);
    let got = collect(&socket, &proxy, 50, Duration::from_millis(300));
    let stats = proxy.stop();
    echo.stop();
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..50).collect::<Vec<_>>(),
        "every datagram arrives once"
    );
    assert!(stats.to_server.reordered > 5, "{stats:?}");
    // Held back 200 ms while the burst went through: some arrive after a later one.
    assert_ne!(got, sorted, "nothing was overtaken");
}

#[test]
fn flows_beyond_the_limit_are_refused() {
    let echo = Echo::start();
    let proxy = Proxy::start(Config {
        max_flows: 2,
        ..Config::new(echo.addr)
    })
    .unwrap();
    let clients: Vec<UdpSocket> = (0..3).map(|_| client()).collect();
    for socket in &clients {
        send_numbered(socket, proxy.addr(), 0..1);
    }
    let stats = wait_stats(&proxy, |s| s.refused_flows + s.to_server.received == 3);
    assert_eq!((stats.flows, stats.refused_flows), (2, 1));
    drop(proxy);
    echo.stop();
}

#[test]
fn idle_flows_are_closed() {
    let echo = Echo::start();
    let proxy = Proxy::start(Config {
        flow_idle: Duration::from_millis(100),
        ..Config::new(echo.addr)
    })
    .unwrap();
    let socket = client();
    send_numbered(&socket, proxy.addr(), 0..1);
    assert_eq!(collect(&socket, &proxy, 1, Duration::ZERO), [0]);
    wait_stats(&proxy, |s| s.open_flows == 0);
    // The client comes back: a new flow.
    send_numbered(&socket, proxy.addr(), 1..2);
    assert_eq!(collect(&socket, &proxy, 1, Duration::ZERO), [1]);
    assert_eq!(proxy.stop().flows, 2);
    echo.stop();
}

#[test]
fn faults_change_while_running() {
    let echo = Echo::start();
    let proxy = Proxy::start(Config::new(echo.addr)).unwrap();
    let socket = client();
    send_numbered(&socket, proxy.addr(), 0..1);
    assert_eq!(collect(&socket, &proxy, 1, Duration::ZERO), [0]);

    // A partition: everything dropped.
    proxy.set_faults(Faults::dropping(1.0), Faults::dropping(1.0));
    send_numbered(&socket, proxy.addr(), 1..11);
    let stats = wait_stats(&proxy, |s| s.to_server.received == 11);
    assert_eq!((stats.to_server.sent, stats.to_server.dropped), (1, 10));

    // Healed.
    proxy.set_faults(Faults::default(), Faults::default());
    send_numbered(&socket, proxy.addr(), 11..12);
    assert_eq!(
        collect(&socket, &proxy, 1, Duration::from_millis(200)),
        [11]
    );
    drop(proxy);
    echo.stop();
}

#[test]
fn a_missing_server_does_not_stop_the_proxy() {
    // A port nobody listens on: the kernel answers with ICMP port unreachable, which the flow
    // socket reports as a read error.
    let closed = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(Config::new(closed)).unwrap();
    let socket = client();
    for round in 0..3 {
        send_numbered(&socket, proxy.addr(), round * 10..(round + 1) * 10);
        wait_stats(&proxy, |s| {
            s.to_server.received == u64::from(round + 1) * 10
        });
    }
    let stats = proxy.stop();
    assert_eq!(stats.to_client.received, 0);
    assert_eq!(
        stats.to_server.sent + stats.to_server.overflow,
        30,
        "{stats:?}"
    );
}
