//! The bad-input and abuse suite: the `imedge` binary in a child process (so that its memory can
//! be read from /proc) is fed what a hostile or broken client sends — malformed frames, lengths
//! announcing 2 GiB, invalid UTF-8, deeply nested JSON, unknown types, binary and oversize
//! WebSocket frames, wrong paths, a client that sends without ever reading, thousands of idle
//! unauthenticated sockets, a storm of logins, a sender flooding invented recipients — while two
//! well-behaved clients keep exchanging QoS messages. Every wait is bounded; memory is compared with generous bounds (the measured
//! figures are in BENCHMARKS.md: run with `--nocapture` to see them).

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod support;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imedge_protocol::frame::tcp;
use imedge_protocol::{Decoder, Kind, Message, UserId};
use support::{ack, data, Client, Recv, Server, T, WAIT};

/// The server binary in a child process, killed when dropped.
struct Spawned {
    child: Child,
    server: Server,
}

impl Spawned {
    fn start(extra: &[&str]) -> Self {
        let dir = support::temp_dir("abuse");
        let mut child = Command::new(env!("CARGO_BIN_EXE_imedge"))
            .args(["--bind", "127.0.0.1", "--tcp-port", "0", "--udp-port", "0"])
            .args(["--ws-port", "0", "--threads", "2", "--no-pin", "true"])
            .arg("--data-dir")
            .arg(&dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut log = BufReader::new(child.stdout.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut tcp, mut udp, mut ws) = (None, None, None);
        while tcp.is_none() || udp.is_none() || ws.is_none() {
            assert!(Instant::now() < deadline, "server did not start");
            let mut line = String::new();
            assert!(log.read_line(&mut line).unwrap() > 0, "server exited");
            let addr = || -> SocketAddr {
                let at = line.find("addr=").unwrap() + 5;
                line[at..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            if line.contains("TCP gateway listening") {
                tcp = Some(addr());
            } else if line.contains("UDP gateway listening") {
                udp = Some(addr());
            } else if line.contains("WebSocket gateway listening") {
                ws = Some(addr());
            }
        }
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
        let server = Server::at(tcp.unwrap(), udp.unwrap(), ws.unwrap());
        Self { child, server }
    }

    /// The server's resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two well-behaved clients (TCP and WebSocket) exchanging C2C QoS messages.
struct Bystanders {
    alice: Client,
    bob: Client,
    sent: usize,
}

impl Bystanders {
    fn new(server: &Server) -> Self {
        let mut alice = server.connect(T::Tcp);
        alice.login("alice");
        let mut bob = server.connect(T::Ws);
        bob.login("bob");
        Self {
            alice,
            bob,
            sent: 0,
        }
    }

    /// One message each way, delivered and acknowledged end to end.
    fn exchange(&mut self) {
        for _ in 0..2 {
            self.sent += 1;
            let fp = format!("fp-{}", self.sent);
            let (from, to, a, b) = if self.sent.is_multiple_of(2) {
                ("alice", "bob", &mut self.alice, &mut self.bob)
            } else {
                ("bob", "alice", &mut self.bob, &mut self.alice)
            };
            a.send(&data(from, to, "hello", Some(&fp)));
            let mut got_ack = false;
            let mut got_msg = false;
            while !(got_ack && got_msg) {
                if !got_msg {
                    let msg = b.expect(Kind::CommonData);
                    assert_eq!(msg.fp.as_ref().map(|f| f.as_str()), Some(fp.as_str()));
                    b.send(&ack(to, from, &fp));
                    got_msg = true;
                }
                if !got_ack {
                    let reply = a.expect(Kind::Ack);
                    assert_eq!(reply.text(), Some(fp.as_str()));
                    got_ack = true;
                }
            }
        }
    }
}

/// Whether the server closed (or reset) a raw TCP stream within the wait; bytes it sends first
/// are skipped.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    use std::io::Read;
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
}

fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n < 65536 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]); // a zero mask: the payload goes as is
    frame.extend_from_slice(payload);
    frame
}

#[test]
fn malformed_input_on_every_transport_closes_only_the_offender() {
    let mut spawned = Spawned::start(&[]);
    let server = &spawned.server;
    let mut bystanders = Bystanders::new(server);
    bystanders.exchange();

    let nested = "[".repeat(100_000);
    let deep_object = format!("{}{}", r#"{"type":2,"dataContent":"#.repeat(20_000), "1");
    let bodies: Vec<Vec<u8>> = vec![
        b"{not json".to_vec(),
        vec![0xff, 0xfe, b'{', 0xc3, 0x28, b'}'],
        br#"{"type":2,"from":"\xff\xfe","to":"bob","dataContent":"x"}"#.to_vec(),
        nested.into_bytes(),
        deep_object.into_bytes(),
        br#"{"type":99,"from":"x","to":"0","dataContent":"?"}"#.to_vec(),
        br#"{"type":"2","from":1,"to":[],"dataContent":{}}"#.to_vec(),
        vec![b'"'; 5000],
        Vec::new(),
    ];
    for transport in [T::Tcp, T::Udp, T::Ws] {
        for body in &bodies {
            let mut c = server.connect(transport);
            c.send_body(body);
            // The offender gets an error reply, a close or nothing — never a crash, and the
            // rest of the server goes on.
            let _ = c.recv_within(Duration::from_millis(50));
        }
        bystanders.exchange();
    }

    // A TCP length prefix announcing 2^31 bytes: closed at once, nothing buffered.
    let mut s = TcpStream::connect(server.tcp).unwrap();
    s.write_all(&[0x80, 0, 0, 0, b'{']).unwrap();
    assert!(closed_within(&mut s, WAIT));
    let mut s = TcpStream::connect(server.tcp).unwrap();
    s.write_all(&[0x7f, 0xff, 0xff, 0xff]).unwrap();
    assert!(closed_within(&mut s, WAIT));

    // WebSocket: a binary frame, a 1 MiB text frame, a wrong path.
    let mut w = server.connect(T::Ws);
    w.send_raw(&ws_frame(0x2, b"\x00\x01binary"));
    assert!(matches!(
        w.recv_within(WAIT),
        Recv::WsClose(_) | Recv::Closed
    ));
    let mut w = server.connect(T::Ws);
    w.send_raw(&ws_frame(0x1, &vec![b'x'; 1 << 20]));
    assert_eq!(w.recv_within(WAIT), Recv::WsClose(1009));
    for path in [
        "/",
        "/websocket/../x",
        "/%00",
        &format!("/{}", "a".repeat(7000)),
    ] {
        let mut s = TcpStream::connect(server.ws).unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let _ = s.write_all(request.as_bytes());
        assert!(closed_within(&mut s, WAIT), "{path:.20}");
    }
    // An upgrade request that never ends.
    let mut s = TcpStream::connect(server.ws).unwrap();
    let _ = s.write_all(b"GET /websocket HTTP/1.1\r\n");
    let _ = s.write_all(&vec![b'a'; 64 * 1024]);
    assert!(closed_within(&mut s, WAIT));

    // Random bytes on every transport, from a fixed seed.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    for transport in [T::Tcp, T::Udp, T::Ws] {
        for size in [1, 7, 100, 1500, 3000] {
            let mut c = server.connect(transport);
            c.send_raw(&random(size));
            let _ = c.recv_within(Duration::from_millis(20));
        }
    }
    bystanders.exchange();
    assert!(spawned.alive());
}

#[test]
fn a_client_that_sends_without_reading_cannot_grow_server_memory() {
    let mut spawned = Spawned::start(&[]);
    let mut bystanders = Bystanders::new(&spawned.server);
    bystanders.exchange();
    let before = spawned.rss_kib();

    // Echo requests of ~6 KiB whose replies are never read: the server's send queue for this
    // connection fills, and the server must stop holding more — close the connection, or stop
    // reading — instead of buffering what it receives.
    let mut s = TcpStream::connect(spawned.server.tcp).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let echo = Message::new(Kind::Echo)
        .from(UserId::new("flood"))
        .content("x".repeat(6000));
    let mut frame = bytes::BytesMut::new();
    for _ in 0..16 {
        tcp::encode(&echo, &mut frame);
    }
    let limit = 512 << 20; // bytes sent: well past any per-connection budget
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0usize;
    let mut peak = before;
    while sent < limit && Instant::now() < deadline {
        match s.write(&frame) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                // The server stopped reading (or our buffers are full): that is the point.
                break;
            }
            Err(_) => break, // closed by the server
        }
        if sent % (16 << 20) < frame.len() {
            peak = peak.max(spawned.rss_kib());
        }
    }
    peak = peak.max(spawned.rss_kib());
    // Meanwhile the others are served.
    bystanders.exchange();
    eprintln!(
        "never-reading client: sent {} MiB; server RSS {} MiB before, peak {} MiB",
        sent >> 20,
        before >> 10,
        peak >> 10
    );
    assert!(
        peak < before + 64 * 1024,
        "server RSS grew from {before} KiB to {peak} KiB for a client that never reads"
    );
    assert!(spawned.alive());
}

/// Counts the sockets the server has closed (end of stream or reset), without waiting.
fn closed_by_server(sockets: &[TcpStream]) -> usize {
    use std::io::Read;
    let mut buf = [0u8; 1024];
    sockets
        .iter()
        .filter(|&s| match { s }.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != ErrorKind::WouldBlock,
        })
        .count()
}

#[test]
fn ten_thousand_idle_unauthenticated_sockets_are_capped_then_timed_out() {
    // The defaults' global cap (8192 connections not logged in) and a short login deadline.
    let mut spawned = Spawned::start(&["--login-timeout", "3"]);
    let mut bystanders = Bystanders::new(&spawned.server);
    let before = spawned.rss_kib();
    let mut idle = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while idle.len() < 10_000 && Instant::now() < deadline {
        match TcpStream::connect(spawned.server.tcp) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect {} failed: {e}", idle.len()),
        }
        if idle.len().is_multiple_of(2_000) {
            bystanders.exchange();
        }
    }
    assert_eq!(idle.len(), 10_000);
    bystanders.exchange();
    let after = spawned.rss_kib();
    for s in &idle {
        s.set_nonblocking(true).unwrap();
    }
    // Past the cap (8192), the server closed the newcomers at once.
    let early = closed_by_server(&idle);
    eprintln!(
        "10,000 idle unauthenticated TCP sockets: server RSS {} MiB before, {} MiB after; {early} closed at once",
        before >> 10,
        after >> 10
    );
    assert!(early >= 10_000 - 8192, "only {early} refused past the cap");
    // A few KiB per connection at most (kernel socket memory is not in RSS).
    assert!(after < before + 10_000 * 8, "{before} KiB → {after} KiB");
    // The login deadline closes the rest; the logged-in bystanders stay.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let closed = closed_by_server(&idle);
        if closed == idle.len() {
            break;
        }
        assert!(Instant::now() < deadline, "{closed} of 10,000 closed");
        std::thread::sleep(Duration::from_millis(200));
    }
    bystanders.exchange();
    assert!(spawned.alive());
}

#[test]
fn a_storm_of_twenty_thousand_logins_is_answered() {
    let mut spawned = Spawned::start(&[]);
    let mut bystanders = Bystanders::new(&spawned.server);
    let before = spawned.rss_kib();
    let udp = spawned.server.udp;
    // 20,000 UDP clients from distinct ports, 2,000 sockets at a time, each logging in once;
    // every login is answered (a lost datagram is retried, as the SDK does).
    let mut answered = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    for batch in 0..10 {
        let sockets: Vec<UdpSocket> = (0..2_000)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.connect(udp).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        let mut pending: Vec<usize> = (0..sockets.len()).collect();
        while !pending.is_empty() {
            assert!(Instant::now() < deadline, "{answered} logins answered");
            for &i in &pending {
                let uid = format!("storm-{batch}-{i}");
                let _ = sockets[i].send(&support::login(&uid, "tok", 0).to_json());
            }
            let wait_until = Instant::now() + Duration::from_secs(2);
            let mut buf = [0u8; 2048];
            pending.retain(|&i| loop {
                match sockets[i].recv(&mut buf) {
                    Ok(n) => {
                        let mut body = buf[..n].to_vec();
                        let msg = Decoder::new().decode(&mut body).unwrap();
                        if msg.kind == Kind::LoginResponse {
                            answered += 1;
                            return false;
                        }
                    }
                    Err(_) if Instant::now() < wait_until => {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    Err(_) => return true,
                }
            });
        }
        bystanders.exchange();
    }
    assert_eq!(answered, 20_000);
    let after = spawned.rss_kib();
    eprintln!(
        "20,000 UDP logins: server RSS {} MiB before, {} MiB after",
        before >> 10,
        after >> 10
    );
    assert!(spawned.alive());
}

#[test]
fn a_sender_flooding_invented_recipients_is_held_to_its_store_quota() {
    // The per-session rate limit would stop the flood first; off here, to reach the store.
    let mut spawned = Spawned::start(&["--session-msg-rate", "0"]);
    let mut bystanders = Bystanders::new(&spawned.server);
    let before = spawned.rss_kib();
    let mut flooder = spawned.server.connect(T::Tcp);
    flooder.login("flooder");
    // 1,500 QoS messages to users who do not exist (never online): each would be stored.
    let mut acked = 0;
    for i in 0..1_500 {
        flooder.send(&data(
            "flooder",
            &format!("nobody-{i}"),
            "x",
            Some(&format!("f{i}")),
        ));
        while let Recv::Message(m) = flooder.recv_within(Duration::from_millis(0)) {
            acked += usize::from(m.kind == Kind::Ack);
        }
    }
    // Every ACK means "stored"; past the default quota of 1,000 per sender nothing is stored
    // and nothing is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < 1_000 {
        assert!(Instant::now() < deadline, "{acked} ACKs");
        if let Recv::Message(m) = flooder.recv_within(Duration::from_secs(1)) {
            acked += usize::from(m.kind == Kind::Ack);
        }
    }
    // ... and no more.
    while let Recv::Message(m) = flooder.recv_within(Duration::from_secs(2)) {
        acked += usize::from(m.kind == Kind::Ack);
    }
    assert_eq!(acked, 1_000);
    bystanders.exchange();
    let after = spawned.rss_kib();
    eprintln!(
        "1,500 messages to invented users: {acked} stored and acknowledged; server RSS {} MiB before, {} MiB after",
        before >> 10,
        after >> 10
    );
    assert!(spawned.alive());
}
