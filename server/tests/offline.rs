//! Offline messages and durability over real sockets: a message the server acknowledged is
//! delivered later, in order, exactly once — across logins, a graceful restart and `kill -9`.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use imedge_protocol::frame::tcp;
use imedge_protocol::{Decoder, Kind, Message, UserId};
use imedge_server::hooks::AllowAll;
use support::*;

fn with_store(threads: usize, dir: &std::path::Path) -> imedge_server::config::ServerConfig {
    let mut cfg = config(threads);
    cfg.offline_store = true;
    cfg.data_dir = dir.to_path_buf();
    // These tests send thousands of messages back to back: no per-session rate limit.
    cfg.session_msg_rate = 0;
    cfg
}

/// Receives `n` data messages, ACKing each; returns their texts in arrival order.
fn drain(c: &mut Client, uid: &str, n: usize) -> Vec<String> {
    let mut texts = Vec::new();
    while texts.len() < n {
        let msg = c.recv();
        if msg.kind != Kind::CommonData {
            continue;
        }
        let from = msg.from.as_ref().unwrap().as_str().to_owned();
        c.send(&ack(uid, &from, msg.fp.as_ref().unwrap().as_str()));
        texts.push(msg.text().unwrap().to_owned());
    }
    texts
}

#[test]
fn offline_then_login_on_each_transport_in_order() {
    let dir = temp_dir("offline-each");
    let server = Server::with(with_store(2, &dir), Arc::new(AllowAll));
    let mut alice = server.connect(T::Tcp);
    alice.login("alice");
    for (i, t) in ALL.into_iter().enumerate() {
        let to = format!("off-{i}");
        for n in 0..3 {
            alice.send(&data(
                "alice",
                &to,
                &format!("{n}"),
                Some(&format!("{to}-{n}")),
            ));
        }
        // Each is ACKed once the store has it (substitute ACK from the recipient).
        for _ in 0..3 {
            let a = alice.expect(Kind::Ack);
            assert_eq!(a.from.as_ref().unwrap().as_str(), to);
        }
        let mut c = server.connect(t);
        c.login(&to);
        assert_eq!(drain(&mut c, &to, 3), ["0", "1", "2"], "{t:?}");
        c.expect_quiet();
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_thousand_stored_messages_keep_their_order_and_partial_delivery_resumes() {
    let dir = temp_dir("offline-1000");
    let server = Server::with(with_store(2, &dir), Arc::new(AllowAll));
    let mut alice = server.connect(T::Tcp);
    alice.login("alice");
    for n in 0..1000 {
        alice.send(&data(
            "alice",
            "carol",
            &n.to_string(),
            Some(&format!("fp-{n}")),
        ));
        if n == 10 {
            // A resend of a stored message is ACKed but not stored twice.
            alice.send(&data("alice", "carol", "5", Some("fp-5")));
        }
    }
    for _ in 0..1001 {
        alice.expect(Kind::Ack);
    }
    // First login: take 300, ACK them, go away without ACKing the rest of what arrived.
    let mut carol = server.connect(T::Ws);
    carol.login("carol");
    let first = drain(&mut carol, "carol", 300);
    // Make sure the server took the ACKs before the socket goes: closing with unread data makes
    // the kernel reset the connection, and a reset discards whatever the server has not read
    // yet (those messages would then, correctly, come again). The server answers frames in
    // order, so once the keep-alive's answer is here every ACK before it was handled; what
    // arrives before it is left unACKed and comes again at the next login.
    carol.send(&Message::keep_alive(UserId::new("carol")));
    while carol.recv().kind != Kind::KeepAliveResponse {}
    drop(carol);
    // Second login: the rest, in order, none twice (the ACKed 300 were removed; anything sent
    // but not ACKed comes again).
    let mut carol = server.connect(T::Udp);
    carol.login("carol");
    let rest = drain(&mut carol, "carol", 700);
    let all: Vec<usize> = first
        .iter()
        .chain(&rest)
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(all, (0..1000).collect::<Vec<_>>());
    carol.expect_quiet();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn graceful_restart_keeps_stored_messages() {
    let dir = temp_dir("offline-restart");
    {
        let server = Server::with(with_store(1, &dir), Arc::new(AllowAll));
        let mut alice = server.connect(T::Tcp);
        alice.login("alice");
        alice.send(&data("alice", "dave", "kept", Some("k1")));
        alice.expect(Kind::Ack);
    }
    let server = Server::with(with_store(2, &dir), Arc::new(AllowAll));
    let mut dave = server.connect(T::Tcp);
    dave.login("dave");
    assert_eq!(drain(&mut dave, "dave", 1), ["kept"]);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn per_user_limit_and_expiry() {
    let dir = temp_dir("offline-limits");
    let mut cfg = with_store(1, &dir);
    cfg.offline_max_per_user = 3;
    cfg.offline_max_age = Duration::from_secs(1);
    let server = Server::with(cfg, Arc::new(AllowAll));
    let mut alice = server.connect(T::Tcp);
    alice.login("alice");
    for n in 0..5 {
        alice.send(&data(
            "alice",
            "erin",
            &n.to_string(),
            Some(&format!("l{n}")),
        ));
    }
    // Three fit; the two over the limit get no ACK (the sender's QoS will report them lost).
    for _ in 0..3 {
        alice.expect(Kind::Ack);
    }
    alice.expect_quiet();
    // Older than max_age at login: dropped, not delivered.
    std::thread::sleep(Duration::from_millis(1300));
    let mut erin = server.connect(T::Tcp);
    erin.login("erin");
    erin.expect_quiet();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sender_quota_and_byte_cap_refuse_without_ack() {
    // The quota: a sender inventing recipients is stopped (no ACK) after max_per_sender.
    let dir = temp_dir("offline-quota");
    let mut cfg = with_store(1, &dir);
    cfg.offline_max_per_sender = 3;
    let server = Server::with(cfg, Arc::new(AllowAll));
    let mut mallory = server.connect(T::Tcp);
    mallory.login("mallory");
    for n in 0..5 {
        mallory.send(&data(
            "mallory",
            &format!("invented-{n}"),
            "x",
            Some(&format!("q{n}")),
        ));
    }
    for n in 0..3 {
        let a = mallory.expect(Kind::Ack);
        assert_eq!(a.from.as_ref().unwrap().as_str(), format!("invented-{n}"));
    }
    mallory.expect_quiet();
    assert_eq!(server.api().stats().0.store.over_sender_quota, 2);
    // Someone else still gets through; a delivered message gives the quota back.
    let mut bob = server.connect(T::Tcp);
    bob.login("bob");
    bob.send(&data("bob", "invented-9", "y", Some("b1")));
    bob.expect(Kind::Ack);
    let mut first = server.connect(T::Tcp);
    first.login("invented-0");
    assert_eq!(drain(&mut first, "invented-0", 1), ["x"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 10;
    loop {
        // The removal commits asynchronously: resend a new message until the quota has room.
        mallory.send(&data("mallory", "invented-10", "z", Some(&format!("r{n}"))));
        if matches!(mallory.recv_within(Duration::from_millis(300)), Recv::Message(m) if m.kind == Kind::Ack)
        {
            break;
        }
        assert!(Instant::now() < deadline, "quota never freed");
        n += 1;
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);

    // The byte cap: room for about two messages in all.
    let dir = temp_dir("offline-capacity");
    let mut cfg = with_store(1, &dir);
    cfg.offline_max_bytes = 500;
    let server = Server::with(cfg, Arc::new(AllowAll));
    let mut alice = server.connect(T::Tcp);
    alice.login("alice");
    for n in 0..4 {
        alice.send(&data(
            "alice",
            &format!("away-{n}"),
            "x",
            Some(&format!("c{n}")),
        ));
    }
    // Each is either ACKed (stored) or refused (counted, no ACK): wait until all four are one
    // or the other.
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked + server.api().stats().0.store.over_capacity < 4 {
        assert!(
            Instant::now() < deadline,
            "{acked} ACKed, the rest not refused"
        );
        if let Recv::Message(m) = alice.recv_within(Duration::from_millis(100)) {
            assert_eq!(m.kind, Kind::Ack);
            acked += 1;
        }
    }
    assert!(
        (1..4).contains(&acked),
        "{acked} of 4 ACKed with a 500-byte cap"
    );
    alice.expect_quiet();
    let store = server.api().stats().0.store;
    assert_eq!(store.over_capacity, 4 - acked, "{store:?}");
    assert!(store.held_bytes <= 500, "{store:?}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stores `n` QoS messages from `from` for `to` (texts `0..n`), waiting for every ACK.
fn store_n(server: &Server, from: &str, to: &str, n: usize) {
    let mut c = server.connect(T::Tcp);
    c.login(from);
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    for chunk in 0..n.div_ceil(500) {
        for i in chunk * 500..((chunk + 1) * 500).min(n) {
            c.send(&data(from, to, &i.to_string(), Some(&format!("{to}-{i}"))));
        }
        // Read the ACKs as they come, so the sender is no slow consumer.
        while let Recv::Message(_) = c.recv_within(Duration::from_millis(1)) {
            acked += 1;
        }
    }
    while acked < n {
        assert!(Instant::now() < deadline, "{acked} of {n} stored");
        if let Recv::Message(m) = c.recv_within(Duration::from_secs(1)) {
            assert_eq!(m.kind, Kind::Ack);
            acked += 1;
        }
    }
}

/// Logs `uid` in on `t` and receives (ACKing each) until `n` distinct messages arrived; returns
/// how long that took.
fn drain_all(server: &Server, t: T, uid: &str, n: usize) -> Duration {
    let mut c = server.connect(t);
    let start = Instant::now();
    c.login(uid);
    let deadline = start + Duration::from_secs(90);
    let mut seen = HashSet::new();
    while seen.len() < n {
        assert!(
            Instant::now() < deadline,
            "{t:?}: {} of {n} stored messages arrived",
            seen.len()
        );
        let Recv::Message(msg) = c.recv_within(Duration::from_secs(1)) else {
            continue;
        };
        if msg.kind != Kind::CommonData {
            continue;
        }
        let from = msg.from.as_ref().unwrap().as_str().to_owned();
        c.send(&ack(uid, &from, msg.fp.as_ref().unwrap().as_str()));
        seen.insert(msg.text().unwrap().to_owned());
    }
    start.elapsed()
}

/// A backlog of stored messages (4,000 here, so that storing them — one fsync per group commit —
/// stays well inside the test's time bound on a loaded 2-core machine; `IMEDGE_DRAIN_BACKLOG=10000`
/// for the figure) reaches a UDP and a TCP client: the drain keeps a window in flight that
/// slides with each ACK, so the UDP client's receive buffer is never overrun (no message waits for
/// a resend timer). Run with `--nocapture` for the times (BENCHMARKS.md).
#[test]
fn a_stored_backlog_reaches_udp_and_tcp_clients() {
    let n: usize = std::env::var("IMEDGE_DRAIN_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4_000);
    let dir = temp_dir("offline-10k");
    let mut cfg = with_store(2, &dir);
    cfg.offline_max_per_sender = 4 * n;
    let server = Server::with(cfg, Arc::new(AllowAll));
    for t in [T::Udp, T::Tcp] {
        let uid = format!("backlog-{t:?}");
        store_n(&server, "alice", &uid, n);
        let took = drain_all(&server, t, &uid, n);
        eprintln!("drain of {n} stored messages over {t:?}: {took:.2?}");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `imedge` binary on a TCP port only, with its store in `dir`. The caller waits for it.
#[allow(clippy::zombie_processes)]
fn spawn(dir: &std::path::Path) -> (Child, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imedge"))
        .args([
            "--bind",
            "127.0.0.1",
            "--tcp-port",
            "0",
            "--udp-port",
            "off",
            "--ws-port",
            "off",
        ])
        .args(["--threads", "2", "--no-pin", "true"])
        // The kill -9 test streams 10,000 messages from one session at once.
        .args(["--session-msg-rate", "0"])
        // ... and stores them all for one offline user: no per-sender quota in the way.
        .args(["--offline-max-per-sender", "100000"])
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "server did not start");
        let mut line = String::new();
        assert!(log.read_line(&mut line).unwrap() > 0, "server exited");
        if let Some(at) = line.find("TCP gateway listening addr=127.0.0.1:") {
            let port = line[at + 37..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            // Keep draining the log so the server never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
            return (child, port);
        }
    }
}

/// A blocking TCP client speaking frames.
struct Raw {
    stream: TcpStream,
    rx: BytesMut,
    decoder: Decoder,
}

impl Raw {
    fn connect(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self {
            stream,
            rx: BytesMut::new(),
            decoder: Decoder::new(),
        }
    }
    fn send(&mut self, msg: &Message<'_>) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        tcp::encode(msg, &mut out);
        self.stream.write_all(&out)
    }
    /// The next message, or `None` when the connection ends.
    fn recv(&mut self) -> Option<Message<'static>> {
        loop {
            if let Some(body) = tcp::split_frame(&mut self.rx, usize::MAX).unwrap() {
                let mut body = body.to_vec();
                return Some(self.decoder.decode(&mut body).unwrap().into_owned());
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.rx.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[test]
fn kill_9_mid_stream_loses_no_acknowledged_message() {
    const STREAM: usize = 10_000;
    let dir = temp_dir("offline-kill9");
    let (mut server, port) = spawn(&dir);
    let mut alice = Raw::connect(port);
    alice.send(&login("alice", "t", 0)).unwrap();
    assert_eq!(alice.recv().unwrap().kind, Kind::LoginResponse);

    // A writer thread streams QoS messages to the offline user; this thread collects ACKs and
    // kills the server with SIGKILL once a third of them have arrived.
    let mut writer = alice.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut out = BytesMut::new();
        for n in 0..STREAM {
            tcp::encode(
                &data("alice", "frank", &n.to_string(), Some(&format!("k-{n}"))),
                &mut out,
            );
            if out.len() > 16 * 1024 || n + 1 == STREAM {
                if writer.write_all(&out).is_err() {
                    return;
                }
                out.clear();
            }
        }
    });
    let mut acked = HashSet::new();
    while let Some(msg) = alice.recv() {
        if msg.kind == Kind::Ack {
            acked.insert(msg.text().unwrap().to_owned());
            if acked.len() == STREAM / 3 {
                server.kill().unwrap();
            }
        }
    }
    server.wait().unwrap();
    sender.join().unwrap();
    assert!(
        acked.len() >= STREAM / 3,
        "only {} ACKs before the connection ended",
        acked.len()
    );

    // Restart on the same data: frank receives every acknowledged message exactly once.
    let (mut server, port) = spawn(&dir);
    let mut frank = Raw::connect(port);
    frank.send(&login("frank", "t", 0)).unwrap();
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    frank
        .stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    while let Some(msg) = frank.recv() {
        assert!(Instant::now() < deadline);
        if msg.kind != Kind::CommonData {
            continue;
        }
        let fp = msg.fp.as_ref().unwrap().as_str().to_owned();
        frank.send(&ack("frank", "alice", &fp)).unwrap();
        assert!(seen.insert(fp), "delivered twice");
        order.push(msg.text().unwrap().parse::<usize>().unwrap());
    }
    assert!(
        acked.iter().all(|fp| seen.contains(fp)),
        "{} acknowledged, {} delivered",
        acked.len(),
        seen.len()
    );
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "delivered out of order"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_stores_messages_still_waiting_for_their_ack() {
    let dir = temp_dir("offline-sigterm");
    let (mut server, port) = spawn(&dir);
    let mut alice = Raw::connect(port);
    let mut bob = Raw::connect(port);
    alice.send(&login("alice", "t", 0)).unwrap();
    bob.send(&login("bob", "t", 0)).unwrap();
    assert_eq!(alice.recv().unwrap().kind, Kind::LoginResponse);
    assert_eq!(bob.recv().unwrap().kind, Kind::LoginResponse);
    alice
        .send(&data("alice", "bob", "in flight", Some("f-1")))
        .unwrap();
    // Bob receives it but never ACKs: it sits in the server's resend table.
    let got = bob.recv().unwrap();
    assert_eq!(got.text(), Some("in flight"));
    let status = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        server.wait().unwrap().success(),
        "exit code 0 after SIGTERM"
    );

    let (mut server, port) = spawn(&dir);
    let mut bob = Raw::connect(port);
    bob.send(&login("bob", "t", 0)).unwrap();
    assert_eq!(bob.recv().unwrap().kind, Kind::LoginResponse);
    let again = bob.recv().unwrap();
    assert_eq!(
        (again.text(), again.fp.as_ref().unwrap().as_str()),
        (Some("in flight"), "f-1")
    );
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
