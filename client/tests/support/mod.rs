//! A scripted server for the SDK's tests: it replays the SERVER side of the captured golden
//! vectors (`shared/protocol/vectors/`, real traffic of the reference Java server) over real
//! sockets on 127.0.0.1, and checks what the client sends against the captured CLIENT side.
//!
//! The vectors are read at test time from the shared folder (never copied); `IMEDGE_VECTORS` may
//! point elsewhere.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::HashSet;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use imedge_client::{Client, ClientOptions, Event, Events, Notice, Transport};
use imedge_protocol::frame::ws::{self, FrameDecoder, Handshake, Role, Unit as WsUnit};
use imedge_protocol::message::payload::LOGIN_OK;
use imedge_protocol::{Decoder, Fingerprint, Kind, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::Instant;

/// How long the scripted server waits for something the client should send promptly.
pub const PROMPT: Duration = Duration::from_secs(5);

/// Runs `test`, failing if it takes longer than `secs` seconds.
pub async fn bounded<T>(secs: u64, test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), test)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {secs} s"))
}

// ---------------------------------------------------------------------------------------------
// Golden vectors

/// Direction of a captured unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client → server.
    C2s,
    /// Server → client.
    S2c,
}

/// One captured protocol message (lines without a message are skipped).
#[derive(Debug, Clone)]
pub struct Unit {
    pub file: String,
    pub line: usize,
    pub dir: Dir,
    pub t_ms: f64,
    pub conn: String,
    /// The unit exactly as on the wire: TCP frame with prefix, UDP datagram, WS frame.
    pub bytes: Vec<u8>,
    /// The message JSON exactly as carried.
    pub json: String,
}

impl Unit {
    /// The decoded message.
    pub fn message(&self) -> Message<'static> {
        let mut body = self.json.clone().into_bytes();
        Decoder::new()
            .decode(&mut body)
            .unwrap_or_else(|e| panic!("{}: {e}", self.at()))
            .into_owned()
    }

    pub fn kind(&self) -> Kind {
        self.message().kind
    }

    pub fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

pub fn vectors_dir() -> PathBuf {
    std::env::var_os("IMEDGE_VECTORS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/protocol/vectors"),
        PathBuf::from,
    )
}

/// The protocol messages of `file` sent or received by the endpoint `conn`, in capture order.
pub fn load(file: &str, conn: &str) -> Vec<Unit> {
    let path = vectors_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("vectors not found at {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let json = v["json"].as_str()?.to_owned();
            (v["conn"] == conn).then(|| Unit {
                file: file.to_owned(),
                line: i + 1,
                dir: if v["dir"] == "c2s" {
                    Dir::C2s
                } else {
                    Dir::S2c
                },
                t_ms: v["t_ms"].as_f64().unwrap(),
                conn: conn.to_owned(),
                bytes: hex::decode(v["hex"].as_str().unwrap()).unwrap(),
                json,
            })
        })
        .collect()
}

/// The transport a vector file was captured on, from its name.
pub fn transport_of(file: &str) -> Transport {
    match file.split('-').next() {
        Some("tcp") => Transport::Tcp,
        Some("udp") => Transport::Udp,
        Some("ws") => Transport::Ws,
        _ => panic!("{file}: unknown transport"),
    }
}

/// The uid and token of the first login in `units`.
pub fn credentials(units: &[Unit]) -> (String, String) {
    let login = units
        .iter()
        .find(|u| u.dir == Dir::C2s && u.kind() == Kind::Login)
        .expect("a login");
    let msg = login.message();
    let doc = Decoder::new().login_request(msg.text().unwrap()).unwrap();
    (
        doc.user_id.as_str().to_owned(),
        doc.token.unwrap_or_default().into_owned(),
    )
}

/// The `firstLoginTime` of the first successful login response in `units`.
pub fn first_login_time(units: &[Unit]) -> i64 {
    units
        .iter()
        .filter(|u| u.dir == Dir::S2c && u.kind() == Kind::LoginResponse)
        .map(|u| {
            let doc = Decoder::new()
                .login_response(u.message().text().unwrap())
                .unwrap();
            assert_eq!(doc.code, LOGIN_OK, "{}", u.at());
            doc.first_login_time
        })
        .next()
        .expect("a successful login response")
}

/// What the Java SDK reports to its application for this capture (SPEC §5, §8): login results,
/// ACKs, data once per fingerprint, echo replies, kickouts, then the QoS messages that were never
/// acknowledged.
pub fn expected_events(units: &[Unit]) -> Vec<Event> {
    let (mut events, lost) = reported(units);
    events.extend(lost);
    events
}

/// What the SDK reports while the capture is played (`.0`), and the QoS messages of the client
/// that were never acknowledged (`.1`, reported at the end: lost or released).
fn reported(units: &[Unit]) -> (Vec<Event>, Vec<Event>) {
    let mut decoder = Decoder::new();
    let mut events = Vec::new();
    let mut seen = HashSet::new();
    let mut sent = Vec::new();
    let mut acked = HashSet::new();
    for unit in units {
        let msg = unit.message();
        let text = msg.text().unwrap_or_default().to_owned();
        match (unit.dir, msg.kind) {
            (Dir::C2s, Kind::CommonData)
                if msg.qos && !sent.iter().any(|m: &Message<'_>| m.fp == msg.fp) =>
            {
                sent.push(msg);
            }
            (Dir::S2c, Kind::LoginResponse) => {
                let doc = decoder.login_response(&text).unwrap();
                events.push(if doc.code == LOGIN_OK {
                    Event::LoginOk {
                        first_login_time: doc.first_login_time,
                    }
                } else {
                    Event::LoginFailed { code: doc.code }
                });
            }
            (Dir::S2c, Kind::Ack) => {
                acked.insert(text.clone());
                events.push(Event::Delivered(Fingerprint::from(text)));
            }
            // Delivered once per fingerprint (SPEC §8.5).
            (Dir::S2c, Kind::CommonData) if !msg.qos || seen.insert(msg.fp.clone()) => {
                events.push(Event::Message(msg));
            }
            (Dir::S2c, Kind::EchoResponse) => events.push(Event::EchoResponse(msg)),
            (Dir::S2c, Kind::Kickout) => {
                let doc = decoder.kickout(&text).unwrap();
                events.push(Event::Kicked {
                    code: doc.code,
                    reason: doc.reason.map(|r| r.into_owned()),
                });
            }
            _ => {}
        }
    }
    let lost = sent
        .into_iter()
        .filter_map(|msg| {
            let fp = msg.fp.clone().unwrap();
            (!acked.contains(fp.as_str())).then_some(Event::Lost(fp, msg))
        })
        .collect();
    (events, lost)
}

/// Every notice until the client's stream ends.
pub async fn drain(events: &mut Events) -> Vec<Notice> {
    let mut all = Vec::new();
    while let Some(notice) = events.recv().await {
        all.push(notice);
    }
    all
}

/// The session events among `notices`.
pub fn session_events(notices: Vec<Notice>) -> Vec<Event> {
    notices
        .into_iter()
        .filter_map(|n| match n {
            Notice::Session(event) => Some(event),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The scripted server

/// A listening socket of one transport on 127.0.0.1, port chosen by the OS.
pub struct Server {
    transport: Transport,
    tcp: Option<TcpListener>,
    udp: Option<Arc<UdpSocket>>,
    addr: SocketAddr,
}

impl Server {
    pub async fn bind(transport: Transport) -> Self {
        Self::bind_addr(transport, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    pub async fn bind_addr(transport: Transport, addr: SocketAddr) -> Self {
        match transport {
            Transport::Udp => {
                let socket = UdpSocket::bind(addr).await.unwrap();
                let addr = socket.local_addr().unwrap();
                Self {
                    transport,
                    tcp: None,
                    udp: Some(Arc::new(socket)),
                    addr,
                }
            }
            Transport::Tcp | Transport::Ws => {
                let listener = TcpListener::bind(addr).await.unwrap();
                let addr = listener.local_addr().unwrap();
                Self {
                    transport,
                    tcp: Some(listener),
                    udp: None,
                    addr,
                }
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Client options for this server.
    pub fn options(&self, user_id: &str, token: &str) -> ClientOptions {
        ClientOptions::new(self.transport, self.addr, user_id, token)
    }

    /// The next client connection (TCP/WS: accepted and, for WS, upgraded; UDP: the first
    /// datagram from a new source address, kept for [`Conn::recv`]).
    pub async fn accept(&self) -> Conn {
        self.try_accept(PROMPT).await.expect("no client connected")
    }

    /// [`Server::accept`], or `None` after `timeout`.
    pub async fn try_accept(&self, timeout: Duration) -> Option<Conn> {
        tokio::time::timeout(timeout, self.accept_now()).await.ok()
    }

    async fn accept_now(&self) -> Conn {
        if let Some(socket) = &self.udp {
            let mut buf = vec![0; 65_536];
            let (len, peer) = socket.recv_from(&mut buf).await.unwrap();
            buf.truncate(len);
            return Conn {
                io: Io::Udp {
                    socket: socket.clone(),
                    peer,
                    first: Some(buf),
                },
                rbuf: BytesMut::new(),
                ws: None,
            };
        }
        let listener = self.tcp.as_ref().unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = Conn {
            io: Io::Tcp(stream),
            rbuf: BytesMut::new(),
            ws: None,
        };
        if self.transport == Transport::Ws {
            conn.upgrade().await;
        }
        conn
    }
}

/// Connects a client with `options` to `server` and accepts it there. Both at once: a WebSocket
/// client waits for the upgrade response.
pub async fn connect(server: &Server, options: ClientOptions) -> (Client, Events, Conn) {
    let (connected, conn) = tokio::join!(Client::connect(options), server.accept());
    let (client, events) = connected.unwrap();
    (client, events, conn)
}

enum Io {
    Tcp(TcpStream),
    Udp {
        socket: Arc<UdpSocket>,
        /// The client's address: where replies go.
        peer: SocketAddr,
        /// The datagram that revealed the client, not yet handed out.
        first: Option<Vec<u8>>,
    },
}

/// One client as the scripted server sees it.
pub struct Conn {
    io: Io,
    rbuf: BytesMut,
    /// Set once a WebSocket upgrade was accepted (server role: client frames are masked).
    ws: Option<FrameDecoder>,
}

/// What the client sent: the unit as on the wire and the message body in it.
#[derive(Debug)]
pub struct Received {
    /// TCP: prefix + body; UDP: the datagram; WS: the (masked) frame is not kept, only the body.
    pub raw: Vec<u8>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }

    pub fn message(&self) -> Message<'static> {
        let mut body = self.body.clone();
        Decoder::new().decode(&mut body).unwrap().into_owned()
    }
}

impl Conn {
    /// The WebSocket upgrade, answered by the protocol crate's server-side handshake (the bytes
    /// Netty sends, SPEC §1.3).
    async fn upgrade(&mut self) {
        loop {
            let mut out = BytesMut::new();
            match ws::accept(&self.rbuf, &mut out) {
                Some(Handshake::Accepted { consumed }) => {
                    self.rbuf.advance(consumed);
                    self.write(&out).await;
                    self.ws = Some(FrameDecoder::new(Role::Server, ws::MAX_PAYLOAD));
                    return;
                }
                Some(Handshake::Rejected { status, .. }) => {
                    self.write(&out).await;
                    panic!("upgrade rejected with {status}");
                }
                None => assert!(self.fill().await, "client closed during the upgrade"),
            }
        }
    }

    /// Reads more bytes into `rbuf`; false at end of stream.
    async fn fill(&mut self) -> bool {
        let Io::Tcp(stream) = &mut self.io else {
            unreachable!("UDP has no stream")
        };
        self.rbuf.reserve(8192);
        match stream.read_buf(&mut self.rbuf).await {
            Ok(n) => n > 0,
            Err(_) => false,
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        match &mut self.io {
            Io::Tcp(stream) => stream.write_all(bytes).await.unwrap(),
            Io::Udp { socket, peer, .. } => {
                socket.send_to(bytes, *peer).await.unwrap();
            }
        }
    }

    /// The next message the client sends; panics after [`PROMPT`] or at end of stream.
    pub async fn recv(&mut self) -> Received {
        self.recv_within(PROMPT)
            .await
            .expect("the client sent nothing in time")
            .expect("the client closed the connection")
    }

    /// The next message within `timeout`: `Err` on timeout, `Ok(None)` at end of stream (TCP FIN
    /// or WebSocket close).
    pub async fn recv_within(&mut self, timeout: Duration) -> Result<Option<Received>, ()> {
        tokio::time::timeout(timeout, self.recv_now())
            .await
            .map_err(|_| ())
    }

    async fn recv_now(&mut self) -> Option<Received> {
        match &mut self.io {
            Io::Udp {
                socket,
                peer,
                first,
            } => {
                if let Some(datagram) = first.take() {
                    return Some(received(datagram.clone(), datagram));
                }
                let mut buf = vec![0; 65_536];
                let (len, from) = socket.recv_from(&mut buf).await.unwrap();
                buf.truncate(len);
                *peer = from;
                Some(received(buf.clone(), buf))
            }
            Io::Tcp(_) if self.ws.is_some() => loop {
                let decoded = self.ws.as_mut().unwrap().decode(&mut self.rbuf);
                match decoded.expect("a valid WebSocket frame") {
                    Some(WsUnit::Text(body)) => return Some(received(Vec::new(), body.to_vec())),
                    Some(WsUnit::Close(_)) => return None,
                    Some(WsUnit::Ping(_) | WsUnit::Pong) => {}
                    None => {
                        if !self.fill().await {
                            return None;
                        }
                    }
                }
            },
            Io::Tcp(_) => loop {
                // Independent of the protocol crate's framer on purpose: 4-byte big-endian length.
                if self.rbuf.len() >= 4 {
                    let len = u32::from_be_bytes(self.rbuf[..4].try_into().unwrap()) as usize;
                    if self.rbuf.len() >= 4 + len {
                        let raw = self.rbuf.split_to(4 + len).to_vec();
                        return Some(received(raw.clone(), raw[4..].to_vec()));
                    }
                }
                if !self.fill().await {
                    return None;
                }
            },
        }
    }

    /// Writes a captured unit exactly as it was on the wire.
    pub async fn send_unit(&mut self, unit: &Unit) {
        assert_eq!(unit.dir, Dir::S2c, "{}", unit.at());
        self.write(&unit.bytes).await;
    }

    /// Writes raw bytes (e.g. a malformed frame).
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.write(bytes).await;
    }

    /// Writes `msg` framed for the transport.
    pub async fn send(&mut self, msg: &Message<'_>) {
        let mut out = BytesMut::new();
        match (&self.io, &self.ws) {
            (Io::Udp { .. }, _) => msg.encode(&mut out),
            (Io::Tcp(_), Some(_)) => ws::encode_message(msg, None, &mut out),
            (Io::Tcp(_), None) => {
                let body = msg.to_json();
                out.extend_from_slice(&(body.len() as u32).to_be_bytes());
                out.extend_from_slice(&body);
            }
        }
        self.write(&out).await;
    }

    /// Waits until the client closes its end (TCP FIN / WebSocket close), discarding messages.
    pub async fn closed(&mut self) {
        bounded(5, async { while self.recv_now().await.is_some() {} }).await;
    }

    /// The client's address (UDP: the source of its last datagram).
    pub fn peer(&self) -> SocketAddr {
        match &self.io {
            Io::Tcp(stream) => stream.peer_addr().unwrap(),
            Io::Udp { peer, .. } => *peer,
        }
    }

    /// Whether the client speaks WebSocket on this connection.
    pub fn is_ws(&self) -> bool {
        self.ws.is_some()
    }
}

fn received(raw: Vec<u8>, body: Vec<u8>) -> Received {
    Received {
        raw,
        body,
        at: Instant::now(),
    }
}

// ---------------------------------------------------------------------------------------------
// Replay

/// Plays `units` (one endpoint's messages, in capture order) against `client` on `conn`:
/// server messages are written exactly as captured; client messages are awaited and must match
/// the capture byte for byte — the whole unit on TCP and UDP (prefix included), the text payload
/// on WebSocket (client frames are masked with random keys). Messages the application originates
/// are requested from the client first: data (`send_with` with the captured fingerprint and
/// `typeu`, except for resends of a fingerprint already sent), logout, echo. Login, keep-alives
/// and ACKs must come from the SDK by itself.
///
/// Before each request the client must have reported what the server messages so far make the
/// SDK report (as the Java application would see its callbacks before acting): that is what
/// orders, say, a logout after the login response on the client's side too.
///
/// Returns what the client sent, with arrival times, and the notices read from `events`.
pub async fn replay(
    conn: &mut Conn,
    client: &Client,
    events: &mut Events,
    units: &[Unit],
) -> (Vec<Received>, Vec<Notice>) {
    let mut sent_fps = HashSet::new();
    let mut got = Vec::new();
    let mut notices = Vec::new();
    for (i, unit) in units.iter().enumerate() {
        if unit.dir == Dir::S2c {
            conn.send_unit(unit).await;
            continue;
        }
        let msg = unit.message();
        let from_app = matches!(msg.kind, Kind::CommonData | Kind::Logout | Kind::Echo);
        if from_app {
            let want = reported(&units[..i]).0.len();
            while session_events_in(&notices) < want {
                let notice = tokio::time::timeout(PROMPT, events.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{}: client reported {notices:?}", unit.at()))
                    .unwrap_or_else(|| panic!("{}: client ended: {notices:?}", unit.at()));
                notices.push(notice);
            }
        }
        match msg.kind {
            Kind::CommonData => {
                let is_resend = msg
                    .fp
                    .as_ref()
                    .is_some_and(|fp| !sent_fps.insert(fp.clone()));
                if !is_resend {
                    client
                        .send_with(
                            msg.to.clone().unwrap(),
                            msg.text().unwrap().to_owned(),
                            msg.fp.clone(),
                            msg.typeu,
                        )
                        .await
                        .unwrap_or_else(|e| panic!("{}: {e}", unit.at()));
                }
            }
            Kind::Logout => client.logout().await,
            Kind::Echo => client.send_raw(msg.clone()).await.unwrap(),
            _ => {}
        }
        // Keep-alives and resends follow the SDK's timers: allow one interval of the slowest mode
        // used here (5 s) and some.
        let wait = if msg.kind == Kind::KeepAlive || msg.kind == Kind::CommonData {
            Duration::from_secs(7)
        } else {
            PROMPT
        };
        let received = conn
            .recv_within(wait)
            .await
            .unwrap_or_else(|()| panic!("{}: the client sent nothing", unit.at()))
            .unwrap_or_else(|| panic!("{}: the client closed the connection", unit.at()));
        if conn.is_ws() {
            assert_eq!(received.json(), unit.json, "{}", unit.at());
        } else {
            assert_eq!(
                String::from_utf8_lossy(&received.raw),
                String::from_utf8_lossy(&unit.bytes),
                "{}",
                unit.at()
            );
            assert_eq!(received.raw, unit.bytes, "{}", unit.at());
        }
        got.push(received);
    }
    (got, notices)
}

fn session_events_in(notices: &[Notice]) -> usize {
    notices
        .iter()
        .filter(|n| matches!(n, Notice::Session(_)))
        .count()
}
