//! The cost of durability as a sender sees it: how long a C2C QoS message takes to be ACKed
//! when the recipient is online (ACK once written to the recipient) and when it is offline (ACK
//! once the offline store has committed it), measured in the same run on the same server.
//!
//! Run: `cargo run --release -p imedge-server --example offline_ack_latency [MESSAGES] [auto|uring|epoll]`
//!
//! Two phases per case: one message at a time (each ACK waited for: the latency of one
//! message), then all messages pipelined (throughput, with group commit batching the fsyncs).

#![allow(clippy::expect_used, clippy::indexing_slicing, clippy::print_stdout)] // a measuring tool, not server code

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use imedge_protocol::frame::tcp;
use imedge_protocol::message::payload::LoginRequest;
use imedge_protocol::{Decoder, Fingerprint, Kind, Message, UserId};
use imedge_server::config::{IoBackend, ServerConfig};
use imedge_server::hooks::AllowAll;

struct Client {
    stream: TcpStream,
    rx: BytesMut,
    decoder: Decoder,
}

impl Client {
    fn connect(addr: std::net::SocketAddr, uid: &str) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut c = Self {
            stream,
            rx: BytesMut::new(),
            decoder: Decoder::new(),
        };
        c.send(&Message::login(LoginRequest {
            user_id: UserId::from(uid.to_owned()),
            token: None,
            extra: None,
            first_login_time: 0,
        }));
        assert_eq!(c.recv().kind, Kind::LoginResponse);
        c
    }

    fn send(&mut self, msg: &Message<'_>) {
        let mut out = BytesMut::new();
        tcp::encode(msg, &mut out);
        self.stream.write_all(&out).expect("write");
    }

    fn recv(&mut self) -> Message<'static> {
        loop {
            if let Some(body) = tcp::split_frame(&mut self.rx, usize::MAX).expect("frame") {
                let mut body = body.to_vec();
                return self.decoder.decode(&mut body).expect("decode").into_owned();
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "server closed");
            self.rx.extend_from_slice(&chunk[..n]);
        }
    }

    fn next_ack(&mut self) {
        while self.recv().kind != Kind::Ack {}
    }
}

fn msg(to: &str, n: usize) -> Message<'static> {
    Message::data(
        UserId::new("alice"),
        UserId::from(to.to_owned()),
        "x".repeat(100),
        Some(Fingerprint::from(format!("{to}-{n}"))),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let io = match std::env::args().nth(2).as_deref() {
        Some("epoll") => IoBackend::Epoll,
        Some("uring") => IoBackend::Uring,
        _ => IoBackend::Auto,
    };
    let dir = std::env::temp_dir().join(format!("imedge-ack-latency-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = ServerConfig {
        bind: [127, 0, 0, 1].into(),
        tcp_port: Some(0),
        udp_port: None,
        ws_port: None,
        threads: 1,
        data_dir: dir.clone(),
        offline_store: true,
        io,
        ..ServerConfig::default()
    };
    let server = imedge_server::runtime::start(&config, Arc::new(AllowAll)).expect("start");
    let addr = server.tcp_addr.expect("tcp");
    println!(
        "backend {}, {n} messages of 100 bytes per phase, data dir {}",
        server.backend,
        dir.display()
    );

    let mut alice = Client::connect(addr, "alice");
    // Bob is online and ACKs nothing: the sender's ACK does not wait for him (SPEC §7.2).
    let mut bob = Client::connect(addr, "bob");
    let drain_bob = std::thread::spawn(move || {
        let mut got = 0usize;
        let _ = bob.stream.set_read_timeout(Some(Duration::from_secs(3)));
        let mut chunk = [0u8; 65536];
        while let Ok(k) = bob.stream.read(&mut chunk) {
            if k == 0 {
                break;
            }
            got += k;
        }
        got
    });

    for (case, to) in [
        ("online recipient", "bob"),
        ("offline recipient (stored, fsync)", "nobody"),
    ] {
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            alice.send(&msg(to, i));
            alice.next_ack();
            lat.push(t.elapsed());
        }
        lat.sort();
        let t = Instant::now();
        let mut out = BytesMut::new();
        // Another recipient: the first phase may have filled `to`'s offline quota.
        let to = format!("{to}-pipelined");
        for i in 0..n {
            tcp::encode(&msg(&to, i), &mut out);
        }
        alice.stream.write_all(&out).expect("write");
        for _ in 0..n {
            alice.next_ack();
        }
        let pipelined = n as f64 / t.elapsed().as_secs_f64();
        println!(
            "{case:36} one at a time: p50 {:7.1} µs  p99 {:7.1} µs  max {:8.1} µs | pipelined: {:8.0} msg/s",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0),
            pipelined
        );
    }
    drop(alice);
    server.shutdown().expect("shutdown");
    let _ = drain_bob.join();
    let _ = std::fs::remove_dir_all(&dir);
}
