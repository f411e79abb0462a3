//! Test support: a real server on 127.0.0.1 (ephemeral ports) and raw protocol clients for the
//! three transports, speaking bytes over real sockets. Every wait is bounded.

#![allow(dead_code, clippy::unwrap_used, clippy::indexing_slicing)]

use std::borrow::Cow;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use imedge_protocol::frame::{tcp, ws};
use imedge_protocol::message::payload::LoginRequest;
use imedge_protocol::{Decoder, Fingerprint, Kind, Message, UserId};
use imedge_server::config::{IoBackend, ServerConfig};
use imedge_server::hooks::{AllowAll, ServerEvents};
use imedge_server::runtime::{self, ServerHandle};

/// How long a test waits for an expected message before failing.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be sure nothing more arrives.
pub const QUIET: Duration = Duration::from_millis(300);

/// The I/O backend the integration tests run on (`IMEDGE_TEST_IO=uring|epoll|auto`).
pub fn backend() -> IoBackend {
    match std::env::var("IMEDGE_TEST_IO").as_deref() {
        Ok("uring") => IoBackend::Uring,
        Ok("auto") => IoBackend::Auto,
        _ => IoBackend::Epoll,
    }
}

/// A server config on 127.0.0.1 with ephemeral ports.
pub fn config(threads: usize) -> ServerConfig {
    ServerConfig {
        bind: [127, 0, 0, 1].into(),
        tcp_port: Some(0),
        udp_port: Some(0),
        ws_port: Some(0),
        threads,
        io: backend(),
        pin_threads: false,
        // The reference's behaviour unless a test asks for the store: the offline hook decides.
        offline_store: false,
        data_dir: temp_dir("data"),
        // Tests send bursts (a thousand messages at once) far beyond any person's: the per-session
        // rate limit is off unless a test turns it on (`gateways::session_rate_limit_…`).
        session_msg_rate: 0,
        ..ServerConfig::default()
    }
}

/// A fresh directory under the system temp dir, unique to this process and call.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("imedge-test-{}-{name}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A running server, stopped when dropped.
pub struct Server {
    handle: Option<ServerHandle>,
    pub tcp: SocketAddr,
    pub udp: SocketAddr,
    pub ws: SocketAddr,
}

impl Server {
    pub fn start(threads: usize) -> Self {
        Self::with(config(threads), Arc::new(AllowAll))
    }

    pub fn with(config: ServerConfig, hooks: Arc<dyn ServerEvents>) -> Self {
        // Port 0: the server itself takes a port nobody holds (`runtime::claim`).
        let handle = runtime::start(&config, hooks).unwrap();
        Self {
            tcp: handle.tcp_addr.unwrap(),
            udp: handle.udp_addr.unwrap(),
            ws: handle.ws_addr.unwrap(),
            handle: Some(handle),
        }
    }

    /// A server running elsewhere (another process) at these addresses: clients only.
    pub fn at(tcp: SocketAddr, udp: SocketAddr, ws: SocketAddr) -> Self {
        Self {
            handle: None,
            tcp,
            udp,
            ws,
        }
    }

    /// The application's control API.
    pub fn api(&self) -> runtime::ControlApi {
        self.handle.as_ref().unwrap().api()
    }

    pub fn connect(&self, transport: T) -> Client {
        Client::connect(self, transport)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().unwrap();
        }
    }
}

/// A transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T {
    Tcp,
    Udp,
    Ws,
}

pub const ALL: [T; 3] = [T::Tcp, T::Udp, T::Ws];

enum Link {
    Tcp(TcpStream, BytesMut),
    Udp(UdpSocket),
    Ws(TcpStream, BytesMut, ws::FrameDecoder),
}

/// A raw client: sends and receives `Message`s, nothing else (no automatic ACKs or keep-alives).
pub struct Client {
    link: Link,
    pub transport: T,
    decoder: Decoder,
}

fn read_some(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<usize, ErrorKind> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).unwrap();
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk) {
        Ok(0) => Err(ErrorKind::UnexpectedEof),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(n)
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(0),
        Err(e) => Err(e.kind()),
    }
}

/// What a receive found.
#[derive(Debug, PartialEq)]
pub enum Recv {
    Message(Message<'static>),
    /// WebSocket close frame (code).
    WsClose(u16),
    Closed,
    Timeout,
}

/// What a raw receive found: a message body exactly as it arrived (TCP frame body, WebSocket
/// text payload, UDP datagram), before decoding.
#[derive(Debug, PartialEq)]
pub enum RecvBody {
    Body(Vec<u8>),
    /// WebSocket close frame: status code (1005 when none was given) and reason.
    WsClose(u16, String),
    Closed,
    Timeout,
}

/// The WebSocket upgrade request the raw client sends by default.
pub fn ws_upgrade_request(server: SocketAddr) -> Vec<u8> {
    format!(
        "GET /websocket HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

impl Client {
    pub fn connect(server: &Server, transport: T) -> Self {
        let link = match transport {
            T::Tcp => Link::Tcp(TcpStream::connect(server.tcp).unwrap(), BytesMut::new()),
            T::Udp => {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                socket.connect(server.udp).unwrap();
                Link::Udp(socket)
            }
            T::Ws => {
                let (client, head) = Self::connect_ws(server, &ws_upgrade_request(server.ws));
                assert!(
                    head.starts_with(b"HTTP/1.1 101 "),
                    "{}",
                    String::from_utf8_lossy(&head)
                );
                return client;
            }
        };
        Self {
            link,
            transport,
            decoder: Decoder::new(),
        }
    }

    /// Opens a WebSocket connection with `request` as the upgrade request; returns the client and
    /// the server's response head (through the blank line). The caller checks the status.
    pub fn connect_ws(server: &Server, request: &[u8]) -> (Self, Vec<u8>) {
        let mut stream = TcpStream::connect(server.ws).unwrap();
        stream.write_all(request).unwrap();
        let mut buf = BytesMut::new();
        let deadline = Instant::now() + WAIT;
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(Instant::now() < deadline, "no upgrade response");
            if read_some(&mut stream, &mut buf, deadline).is_err() {
                // Refused: the server answered (or not) and closed.
                return (
                    Self {
                        link: Link::Ws(
                            stream,
                            BytesMut::new(),
                            ws::FrameDecoder::new(ws::Role::Client, usize::MAX),
                        ),
                        transport: T::Ws,
                        decoder: Decoder::new(),
                    },
                    buf.to_vec(),
                );
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = buf.split_to(end).to_vec();
        let link = Link::Ws(
            stream,
            buf,
            ws::FrameDecoder::new(ws::Role::Client, usize::MAX),
        );
        let client = Self {
            link,
            transport: T::Ws,
            decoder: Decoder::new(),
        };
        (client, head)
    }

    pub fn send(&mut self, msg: &Message<'_>) {
        match &mut self.link {
            Link::Tcp(stream, _) => {
                let mut out = BytesMut::new();
                tcp::encode(msg, &mut out);
                stream.write_all(&out).unwrap();
            }
            Link::Udp(socket) => {
                socket.send(&msg.to_json()).unwrap();
            }
            Link::Ws(stream, ..) => {
                let mut out = BytesMut::new();
                ws::encode_message(msg, Some([1, 2, 3, 4]), &mut out);
                stream.write_all(&out).unwrap();
            }
        }
    }

    /// Sends raw bytes (framing included) — for malformed-input tests.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        match &mut self.link {
            Link::Tcp(stream, _) | Link::Ws(stream, ..) => {
                let _ = stream.write_all(bytes);
            }
            Link::Udp(socket) => {
                socket.send(bytes).unwrap();
            }
        }
    }

    /// Sends one message body (any bytes, e.g. a captured JSON text) framed for the transport:
    /// TCP length prefix, one UDP datagram, one masked WebSocket text frame. Write errors are
    /// ignored (the server may already have closed, as for oversize input).
    pub fn send_body(&mut self, body: &[u8]) {
        match &mut self.link {
            Link::Tcp(stream, _) => {
                let mut out = BytesMut::new();
                tcp::encode_body(body, &mut out);
                let _ = stream.write_all(&out);
            }
            Link::Udp(socket) => {
                let _ = socket.send(body);
            }
            Link::Ws(stream, ..) => {
                let mut out = BytesMut::new();
                ws::encode_text(body, Some([0x37, 0xfa, 0x21, 0x3d]), &mut out);
                let _ = stream.write_all(&out);
            }
        }
    }

    /// Sends one message body framed for the transport, like [`Client::send_body`], waiting at
    /// most [`WAIT`] for the socket to take it. Returns whether it was written in full (not:
    /// the server closed the connection, or stopped reading).
    pub fn try_send_body(&mut self, body: &[u8]) -> bool {
        let mut out = BytesMut::new();
        let stream = match &mut self.link {
            Link::Tcp(stream, _) => {
                tcp::encode_body(body, &mut out);
                stream
            }
            Link::Ws(stream, ..) => {
                ws::encode_text(body, Some([0x37, 0xfa, 0x21, 0x3d]), &mut out);
                stream
            }
            Link::Udp(socket) => return socket.send(body).is_ok(),
        };
        stream.set_write_timeout(Some(WAIT)).unwrap();
        stream.write_all(&out).is_ok()
    }

    /// Half-closes a TCP or WebSocket connection (the client's FIN); nothing for UDP.
    pub fn shutdown_write(&mut self) {
        if let Link::Tcp(stream, _) | Link::Ws(stream, ..) = &mut self.link {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
    }

    pub fn recv_within(&mut self, wait: Duration) -> Recv {
        match self.recv_body_within(wait) {
            RecvBody::Body(mut body) => {
                let text = String::from_utf8_lossy(&body).into_owned();
                let msg = self.decoder.decode(&mut body);
                Recv::Message(msg.unwrap_or_else(|e| panic!("{e}: {text:?}")).into_owned())
            }
            RecvBody::WsClose(code, _) => Recv::WsClose(code),
            RecvBody::Closed => Recv::Closed,
            RecvBody::Timeout => Recv::Timeout,
        }
    }

    /// The next message body as received (not decoded), a close, or a timeout.
    pub fn recv_body_within(&mut self, wait: Duration) -> RecvBody {
        let deadline = Instant::now() + wait;
        loop {
            match &mut self.link {
                Link::Tcp(stream, buf) => {
                    if let Some(body) = tcp::split_frame(buf, usize::MAX).unwrap() {
                        return RecvBody::Body(body.to_vec());
                    }
                    if Instant::now() >= deadline {
                        return RecvBody::Timeout;
                    }
                    if read_some(stream, buf, deadline).is_err() {
                        return RecvBody::Closed;
                    }
                }
                Link::Ws(stream, buf, frames) => {
                    match frames.decode(buf).unwrap() {
                        Some(ws::Unit::Text(body)) => return RecvBody::Body(body.to_vec()),
                        Some(ws::Unit::Close(close)) => {
                            let (code, reason) = close.unwrap_or((1005, String::new()));
                            return RecvBody::WsClose(code, reason);
                        }
                        Some(_) => continue,
                        None => {}
                    }
                    if Instant::now() >= deadline {
                        return RecvBody::Timeout;
                    }
                    if read_some(stream, buf, deadline).is_err() {
                        return RecvBody::Closed;
                    }
                }
                Link::Udp(socket) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return RecvBody::Timeout;
                    }
                    socket.set_read_timeout(Some(left)).unwrap();
                    let mut buf = [0u8; 65536];
                    match socket.recv(&mut buf) {
                        Ok(n) => return RecvBody::Body(buf[..n].to_vec()),
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            return RecvBody::Timeout
                        }
                        Err(_) => return RecvBody::Closed,
                    }
                }
            }
        }
    }

    /// The next message; fails the test if none arrives in time.
    pub fn recv(&mut self) -> Message<'static> {
        match self.recv_within(WAIT) {
            Recv::Message(msg) => msg,
            other => panic!(
                "{:?} client: expected a message, got {other:?}",
                self.transport
            ),
        }
    }

    /// The next message, which must be of `kind`.
    pub fn expect(&mut self, kind: Kind) -> Message<'static> {
        let msg = self.recv();
        assert_eq!(msg.kind, kind, "{:?} client got {msg:?}", self.transport);
        msg
    }

    /// Nothing arrives for a short while.
    pub fn expect_quiet(&mut self) {
        match self.recv_within(QUIET) {
            Recv::Timeout => {}
            other => panic!(
                "{:?} client: expected silence, got {other:?}",
                self.transport
            ),
        }
    }

    /// The server closes the connection (WebSocket: close 1000 "Bye" first). Messages before it
    /// are returned.
    pub fn expect_closed(&mut self) -> Vec<Message<'static>> {
        let mut before = Vec::new();
        loop {
            match self.recv_within(WAIT) {
                Recv::Message(msg) => before.push(msg),
                Recv::WsClose(code) => {
                    assert_eq!(code, 1000);
                    assert_eq!(self.recv_within(WAIT), Recv::Closed);
                    return before;
                }
                Recv::Closed => return before,
                Recv::Timeout => {
                    panic!("{:?} client: expected the server to close", self.transport)
                }
            }
        }
    }

    pub fn login(&mut self, uid: &str) -> Message<'static> {
        self.send(&login(uid, "tok", 0));
        let reply = self.expect(Kind::LoginResponse);
        let doc = Decoder::new()
            .login_response(reply.text().unwrap())
            .unwrap();
        assert_eq!(doc.code, 0, "login of {uid} refused");
        reply
    }
}

pub fn login(uid: &str, token: &str, first_login_time: i64) -> Message<'static> {
    Message::login(LoginRequest {
        user_id: UserId::from(uid.to_owned()),
        token: Some(Cow::Owned(token.to_owned())),
        extra: None,
        first_login_time,
    })
}

pub fn data(from: &str, to: &str, text: &str, fp: Option<&str>) -> Message<'static> {
    Message::data(
        UserId::from(from.to_owned()),
        UserId::from(to.to_owned()),
        text.to_owned(),
        fp.map(|f| Fingerprint::from(f.to_owned())),
    )
}

pub fn ack(from: &str, to: &str, fp: &str) -> Message<'static> {
    Message::ack(
        UserId::from(from.to_owned()),
        UserId::from(to.to_owned()),
        Fingerprint::from(fp.to_owned()),
        false,
    )
}

/// A uid whose shard is `core` of `cores`.
pub fn uid_on(core: u16, cores: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| imedge_server::shard::shard_for(u, cores) == core)
        .unwrap()
}
