//! What depends on the I/O backend beyond the gateways' behaviour: which backend runs, and what
//! happens when the process runs out of file descriptors. Runs on the backend the whole suite
//! runs on (`IMEDGE_TEST_IO`, see `support::backend`). Linux only: `/proc` and `RLIMIT_NOFILE`.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use imedge_protocol::frame::tcp;
use imedge_protocol::{Decoder, Kind, Message, UserId};
use imedge_server::config::IoBackend;
use imedge_server::hooks::AllowAll;
use imedge_server::runtime;
use support::*;

#[test]
fn the_requested_backend_runs() {
    let handle = runtime::start(&config(1), Arc::new(AllowAll)).unwrap();
    let backend = handle.backend;
    handle.shutdown().unwrap();
    let expected = match support::backend() {
        IoBackend::Epoll => "epoll",
        IoBackend::Uring => "io_uring",
        IoBackend::Auto if runtime::probe_io_uring().is_ok() => "io_uring",
        IoBackend::Auto => "epoll",
    };
    assert_eq!(backend, expected);
}

/// A second server on ports another one holds does not start (with `SO_REUSEPORT` it could
/// join the first one's sockets and silently take half of its traffic).
#[test]
fn ports_in_use_are_refused() {
    let first = Server::start(1);
    for (tcp, udp, ws) in [
        (Some(first.tcp.port()), None, None),
        (None, Some(first.udp.port()), None),
        (None, None, Some(first.ws.port())),
    ] {
        let mut second = config(1);
        (second.tcp_port, second.udp_port, second.ws_port) = (tcp, udp, ws);
        let error = runtime::start(&second, Arc::new(AllowAll)).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse, "{error}");
    }
    // The first server still answers on all of them.
    for transport in [T::Tcp, T::Udp, T::Ws] {
        first
            .connect(transport)
            .login(&format!("still-{transport:?}"));
    }
}

/// An echo request for `text`, framed for TCP.
fn echo_frame(text: &str) -> BytesMut {
    let mut echo = Message::data(UserId::new("x"), UserId::new("y"), text, None);
    echo.kind = Kind::Echo;
    let mut out = BytesMut::new();
    tcp::encode(&echo, &mut out);
    out
}

/// Reads `count` echoes from `stream`; the i-th must start with `i` as five digits.
fn read_echoes_in_order(stream: &mut TcpStream, count: usize, chunk: usize) {
    let deadline = Instant::now() + WAIT * 4;
    let mut buf = BytesMut::new();
    let mut got = 0;
    let mut bytes = vec![0u8; chunk];
    while got < count {
        if let Some(body) = tcp::split_frame(&mut buf, usize::MAX).unwrap() {
            let mut body = body.to_vec();
            let reply = Decoder::new().decode(&mut body).unwrap();
            assert_eq!(reply.kind, Kind::EchoResponse);
            assert_eq!(
                &reply.text().unwrap()[..5],
                format!("{got:05}"),
                "out of order"
            );
            got += 1;
            continue;
        }
        assert!(Instant::now() < deadline, "{got} of {count} echoes");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let n = stream.read(&mut bytes).unwrap();
        assert!(n > 0, "closed after {got} of {count} echoes");
        buf.extend_from_slice(&bytes[..n]);
    }
}

/// Writes `count` numbered echo requests of about `size` bytes on a clone of `stream`.
fn write_echoes(stream: &TcpStream, count: usize, size: usize) -> std::thread::JoinHandle<()> {
    let mut writer = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        for i in 0..count {
            let text = format!("{i:05}{}", "z".repeat(size));
            writer.write_all(&echo_frame(&text)).unwrap();
        }
    })
}

/// Several connections pipeline megabytes of requests at once: the receives use up the
/// provided buffers faster than one turn gives them back, and the replies queue up behind
/// pending sends. Everything comes back, whole and in order.
#[test]
fn pipelined_bursts_come_back_whole_and_in_order() {
    let server = Server::start(2);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let addr = server.tcp;
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                let writer = write_echoes(&stream, 300, 5000);
                read_echoes_in_order(&mut stream, 300, 64 * 1024);
                writer.join().unwrap();
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
}

/// A login, a keep-alive and half of a C2S message in one write, the rest of that message in a
/// later one: the frames received behind the login are handled in order, on the user's core
/// (most of these users hash to another core than the one that accepted their connection, so
/// the connection migrates with the bytes not yet handled), and the split frame is put back
/// together.
#[test]
fn frames_behind_a_login_travel_with_the_connection() {
    let server = Server::start(4);
    for n in 0..8 {
        let uid = format!("behind-{n}");
        let mut client = server.connect(T::Tcp);
        let mut bytes = BytesMut::new();
        tcp::encode(&login(&uid, "tok", 0), &mut bytes);
        tcp::encode(&Message::keep_alive(UserId::from(uid.clone())), &mut bytes);
        let c2s = data(&uid, "0", "hello server", Some(&format!("fp-{n}")));
        let mut c2s = {
            let mut frame = BytesMut::new();
            tcp::encode(&c2s, &mut frame);
            frame
        };
        let tail = c2s.split_off(c2s.len() / 2);
        bytes.extend_from_slice(&c2s);
        client.send_raw(&bytes);
        client.expect(Kind::LoginResponse);
        client.expect(Kind::KeepAliveResponse);
        std::thread::sleep(Duration::from_millis(20));
        client.send_raw(&tail);
        let ack = client.expect(Kind::Ack);
        assert_eq!(ack.text(), Some(format!("fp-{n}").as_str()));
    }
}

/// A masked WebSocket frame as a client writes it.
fn ws_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    frame
}

/// Whole WebSocket text frames (unmasked where they were received), a ping, a message in two
/// fragments and a frame split across writes, all behind each other: every message is handled,
/// in order, whether it was cut in place or went through the buffered decoder.
#[test]
fn websocket_frames_in_place_and_buffered_come_out_in_order() {
    let server = Server::start(1);
    let mut client = server.connect(T::Ws);
    client.login("ws-mixed");
    let echo = |text: &str| {
        let mut msg = Message::data(UserId::new("ws-mixed"), UserId::new("0"), text, None);
        msg.kind = Kind::Echo;
        msg.to_json()
    };
    let first = echo("00 whole");
    let second = echo("01 fragmented");
    let third = echo(&format!("02 long {}", "x".repeat(300)));
    let fourth = echo("03 split");
    let (head, tail) = second.split_at(10);
    let mut bytes = ws_frame(0x1, true, &first);
    bytes.extend(ws_frame(0x9, true, b"ping"));
    bytes.extend(ws_frame(0x1, false, head));
    bytes.extend(ws_frame(0x0, true, tail));
    bytes.extend(ws_frame(0x1, true, &third));
    let split = ws_frame(0x1, true, &fourth);
    bytes.extend_from_slice(&split[..7]);
    client.send_raw(&bytes);
    std::thread::sleep(Duration::from_millis(20));
    client.send_raw(&split[7..]);
    for prefix in ["00", "01", "02", "03"] {
        let reply = client.expect(Kind::EchoResponse);
        assert!(reply.text().unwrap().starts_with(prefix), "{reply:?}");
    }
}

/// `--bench-echo`: the loops send every TCP frame, WebSocket message and UDP datagram back as
/// it came, whatever it holds, without the protocol.
#[test]
fn bench_echo_mode_returns_frames_and_datagrams_unchanged() {
    let mut config = config(1);
    config.bench_echo = true;
    let server = Server::with(config, Arc::new(AllowAll));
    for transport in [T::Tcp, T::Udp, T::Ws] {
        let mut client = server.connect(transport);
        // Up to the UDP datagram limit (2048): a longer datagram is cut at the receive buffer.
        for size in [0usize, 1, 100, 2000] {
            let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let body = if transport == T::Ws {
                vec![b'w'; size]
            } else {
                body
            };
            client.send_body(&body);
            match client.recv_body_within(WAIT) {
                RecvBody::Body(echoed) => assert!(
                    echoed == body,
                    "{transport:?} {size}: {} bytes back",
                    echoed.len()
                ),
                other => panic!("{transport:?} {size}: {other:?}"),
            }
        }
    }
}

/// A client with a tiny receive buffer that starts reading late: the server's sends wait in the
/// kernel (or come back partial) while more replies queue behind them; nothing is lost or
/// reordered.
#[test]
fn a_slow_reader_gets_everything_in_order() {
    let server = Server::start(1);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.tcp.into()).unwrap();
    let mut stream = TcpStream::from(socket);
    let writer = write_echoes(&stream, 300, 5000);
    std::thread::sleep(Duration::from_millis(300));
    read_echoes_in_order(&mut stream, 300, 3000);
    writer.join().unwrap();
}

/// Set in the child process that runs the server for the descriptor-limit test.
const CHILD: &str = "IMEDGE_EMFILE_CHILD";

/// Descriptors the child's server may open beyond those it has when it starts: a few for its
/// loop (probe ring, eventfd or epoll, listener, ring), the rest for connections.
const HEADROOM: u64 = 8;

/// The server for [`accept_pauses_when_out_of_descriptors_and_resumes`]: a one-core TCP gateway
/// under a low descriptor limit, serving until its standard input closes.
#[test]
#[ignore = "the child process of accept_pauses_when_out_of_descriptors_and_resumes"]
fn emfile_server() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    // The limit must be in place before the server starts: io_uring's accept reads it when the
    // accept is submitted.
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    // Fill the holes below it, so that the server gets exactly the headroom.
    let mut holes = Vec::new();
    loop {
        let hole = std::fs::File::open("/dev/null").unwrap();
        if std::os::fd::AsRawFd::as_raw_fd(&hole) as u64 > highest {
            break;
        }
        holes.push(hole);
    }
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill and setrlimit to read.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = highest + 1 + HEADROOM;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let mut config = config(1);
    config.udp_port = None;
    config.ws_port = None;
    let handle = runtime::start(&config, Arc::new(AllowAll)).unwrap();
    // The parent reads this line from our standard output.
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "ready {} {}",
        handle.tcp_addr.unwrap(),
        handle.backend
    )
    .unwrap();
    stdout.flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    handle.shutdown().unwrap();
    drop(holes);
}

/// Sends an echo request on `stream` and waits up to `wait` for the echo.
fn echoed(stream: &mut TcpStream, text: &str, wait: Duration) -> bool {
    stream.write_all(&echo_frame(text)).unwrap();
    read_echo(stream, text, wait)
}

fn read_echo(stream: &mut TcpStream, text: &str, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = BytesMut::new();
    loop {
        if let Some(body) = tcp::split_frame(&mut buf, usize::MAX).unwrap() {
            let mut body = body.to_vec();
            let reply = Decoder::new().decode(&mut body).unwrap();
            assert_eq!((reply.kind, reply.text()), (Kind::EchoResponse, Some(text)));
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return false,
        }
    }
}

/// CPU time (user + system) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): state is first, utime the 12th.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn accept_pauses_when_out_of_descriptors_and_resumes() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["emfile_server", "--exact", "--ignored", "--nocapture"])
        .env(CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map(Result::unwrap)
        .find(|line| line.starts_with("ready "))
        .expect("the child server did not start");
    let addr: SocketAddr = ready.split(' ').nth(1).unwrap().parse().unwrap();

    // Connect until a connection is not served: the server is out of descriptors.
    let mut served = Vec::new();
    let mut blocked = loop {
        assert!(served.len() < 64, "the server never ran out of descriptors");
        let mut stream = TcpStream::connect(addr).unwrap();
        if echoed(&mut stream, "hello", Duration::from_millis(500)) {
            served.push(stream);
        } else {
            break stream;
        }
    };
    assert!(!served.is_empty(), "{ready}: no connection was served");

    // Out of descriptors, the server pauses accepting between tries: it does not spin.
    // SAFETY: sysconf takes no pointers.
    let ticks_per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(child.id()) - before;
    assert!(
        used * 4 < ticks_per_second,
        "{ready}: {used} ticks of CPU in 1 s while out of descriptors"
    );

    // Descriptors come back when the served connections close; the waiting one is accepted
    // and its request, queued all along, answered.
    drop(served);
    assert!(
        read_echo(&mut blocked, "hello", WAIT),
        "{ready}: accepting did not resume"
    );
    // And the server goes on accepting.
    let mut late = TcpStream::connect(addr).unwrap();
    assert!(echoed(&mut late, "again", WAIT), "{ready}");

    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}
