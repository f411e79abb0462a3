//! A short, deterministic relay run for counting instructions: an in-process server on
//! 127.0.0.1, two clients (`alice`, `bob`) that log in, then `alice` sends `N` C2C messages (no
//! QoS) to `bob` in lock step — one in flight at a time, so every relay is one receive, one
//! decode, one encode and one send on the server whatever the timing.
//!
//! `relay_count <epoll|uring> <N> [tcp|udp] [threads]` (defaults: tcp, 1 thread).
//!
//! The clients run on the main thread, the server on its own threads; count per thread and
//! subtract a run with a smaller `N` to get the server's instructions per relayed message:
//!
//! ```text
//! valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=cg.%p \
//!     target/release/examples/relay_count epoll 2000
//! ```
//!
//! (thread 1 of the output is the clients; the others are the server). Valgrind cannot run the
//! io_uring backend; for it the run prints the server threads' CPU time instead (noisy).

use std::borrow::Cow;
use std::error::Error;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use imedge_protocol::frame::tcp;
use imedge_protocol::message::payload::LoginRequest;
use imedge_protocol::{Decoder, Kind, Message, UserId};
use imedge_server::config::{IoBackend, ServerConfig};
use imedge_server::hooks::AllowAll;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

enum Link {
    Tcp(TcpStream, BytesMut),
    Udp(UdpSocket),
}

impl Link {
    fn send(&mut self, msg: &Message<'_>) -> Result<()> {
        match self {
            Link::Tcp(stream, _) => {
                let mut frame = BytesMut::new();
                tcp::encode(msg, &mut frame);
                stream.write_all(&frame)?;
            }
            Link::Udp(socket) => {
                socket.send(&msg.to_json())?;
            }
        }
        Ok(())
    }

    /// The next message's kind.
    fn recv(&mut self, decoder: &mut Decoder) -> Result<Kind> {
        match self {
            Link::Tcp(stream, rx) => loop {
                if let Some(len) = tcp::decode(rx, tcp::DEFAULT_MAX_BODY)? {
                    let mut frame = rx.split_to(tcp::PREFIX_LEN + len);
                    let body = frame.split_off(tcp::PREFIX_LEN);
                    let mut body = body.to_vec();
                    return Ok(decoder.decode(&mut body)?.kind);
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Err("server closed".into());
                }
                rx.extend_from_slice(chunk.get(..n).unwrap_or_default());
            },
            Link::Udp(socket) => {
                let mut buf = [0u8; 4096];
                let n = socket.recv(&mut buf)?;
                let mut body = buf.get(..n).unwrap_or_default().to_vec();
                Ok(decoder.decode(&mut body)?.kind)
            }
        }
    }

    fn connect(udp: bool, tcp_addr: SocketAddr, udp_addr: SocketAddr) -> Result<Self> {
        if udp {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.connect(udp_addr)?;
            socket.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(Link::Udp(socket))
        } else {
            let stream = TcpStream::connect(tcp_addr)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(Link::Tcp(stream, BytesMut::new()))
        }
    }

    fn login(&mut self, uid: &str, decoder: &mut Decoder) -> Result<()> {
        self.send(&Message::login(LoginRequest {
            user_id: UserId::from(uid.to_owned()),
            token: Some(Cow::Borrowed("tok")),
            extra: None,
            first_login_time: 0,
        }))?;
        while self.recv(decoder)? != Kind::LoginResponse {}
        Ok(())
    }
}

/// CPU time (user and kernel) the server's core threads have used so far, from
/// `/proc/self/task/*/schedstat` — for io_uring, which valgrind cannot run (it blocks in
/// `io_uring_enter` holding its global lock). Noisy, unlike an instruction count.
fn server_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with("imedge-core"))
        })
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let io = match arg(0) {
        Some("uring") => IoBackend::Uring,
        Some("epoll") => IoBackend::Epoll,
        _ => return Err("usage: relay_count <epoll|uring> <N> [tcp|udp] [threads]".into()),
    };
    let n: usize = arg(1).unwrap_or("1000").parse()?;
    let udp = arg(2) == Some("udp");
    let threads: usize = arg(3).unwrap_or("1").parse()?;

    // A free UDP port (the server binds its UDP gateway with SO_REUSEPORT).
    let probe = UdpSocket::bind("127.0.0.1:0")?;
    let udp_port = probe.local_addr()?.port();
    drop(probe);
    let config = ServerConfig {
        bind: [127, 0, 0, 1].into(),
        tcp_port: Some(0),
        udp_port: Some(udp_port),
        ws_port: None,
        threads,
        io,
        pin_threads: false,
        offline_store: false,
        ..ServerConfig::default()
    };
    let handle = imedge_server::runtime::start(&config, Arc::new(AllowAll))?;
    let tcp_addr = handle.tcp_addr.ok_or("no TCP gateway")?;
    let udp_addr = handle.udp_addr.ok_or("no UDP gateway")?;

    let mut decoder = Decoder::new();
    let mut alice = Link::connect(udp, tcp_addr, udp_addr)?;
    let mut bob = Link::connect(udp, tcp_addr, udp_addr)?;
    alice.login("alice", &mut decoder)?;
    bob.login("bob", &mut decoder)?;
    let msg = Message::data(
        UserId::new("alice"),
        UserId::new("bob"),
        "hello bob, this is a message of a typical size for an IM chat line".to_owned(),
        None,
    );
    for _ in 0..n {
        alice.send(&msg)?;
        while bob.recv(&mut decoder)? != Kind::CommonData {}
    }
    let (stats, _) = handle.api().stats();
    let cpu_ns = server_cpu_ns();
    handle.shutdown()?;
    writeln!(
        std::io::stdout(),
        "{} relayed over {}: delivered {}, server threads' CPU time {} ns",
        n,
        if udp { "udp" } else { "tcp" },
        stats.delivered,
        cpu_ns
    )?;
    Ok(())
}
