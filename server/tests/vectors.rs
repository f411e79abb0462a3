//! The golden captures of the reference MobileIMSDK server (`shared/protocol/vectors/`), replayed
//! against imedge: the client side of every file is sent to a real imedge server over real
//! sockets, and every server reply is compared with the captured one, byte for byte after
//! normalisation.
//!
//! * The files are read at test time from `shared/protocol/vectors` (or `$IMEDGE_VECTORS`), never
//!   copied here. One `#[test]` per file; a file without a test fails
//!   [`every_vector_file_is_replayed`], so new captures cannot be skipped silently.
//! * Each file gets its own server with the reference demo's settings (TCP/WS idle 11 s, UDP 10 s,
//!   server timestamps only for `*-servertimestamp`) and the capture's "refim" test hooks
//!   ([`Refim`]).
//! * Lines are walked in capture order, one raw client per `conn`: a `c2s` message is sent (the
//!   captured JSON, framed for the transport) at the captured time relative to the start, so
//!   keep-alive, resend and idle-timeout flows run on the real clock; an `s2c` message is the next
//!   message on that connection; `fin` / WebSocket close lines are checked too.
//! * Normalised are only values that legitimately vary ([`Normaliser`]): fingerprints the server
//!   makes (S2C), server clock values (`firstLoginTime`, `sm` — plausible and consistent), and
//!   nothing else (ports, WebSocket keys and masks never reach the compared bytes).
//! * Where imedge deliberately differs from the reference — the documented hazard fixes of
//!   SPEC §13 — the expected bytes change through explicit, commented [`overrides`] keyed by file
//!   and line.
//!
//! Timing: the longest capture runs 17 s of real time and most of every replay is waiting on the
//! capture's clock. libtest runs only `available_parallelism` tests at once (2 on a small CI box),
//! which would serialise those waits (~3 min), so the first test to run starts *every* replay on its
//! own thread and each test then waits for (and reports) its own file's outcome: the whole file set
//! takes about as long as the longest capture.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test code: a panic is a failure

mod support;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use imedge_protocol::message::payload::{ErrorResponse, LoginRequest, LoginResponse};
use imedge_protocol::message::payload::{ERROR_NOT_LOGGED_IN, KICKOUT_BY_ADMIN};
use imedge_protocol::message::Content;
use imedge_protocol::{Decoder, Kind, Message, UserId};
use imedge_server::hooks::{Api, ServerEvents, SessionInfo, Undelivered};
use support::{Client, RecvBody, Server, T};

// ---------------------------------------------------------------------------------------------
// One test per capture file.

macro_rules! vector_tests {
    ($($name:ident => $file:literal,)*) => {
        /// Every capture file this suite replays.
        const FILES: &[&str] = &[$($file),*];
        $(
            #[test]
            fn $name() {
                outcome($file);
            }
        )*
    };
}

vector_tests! {
    tcp_c2c_duplicate => "tcp-c2c-duplicate.jsonl",
    tcp_c2c_noqos => "tcp-c2c-noqos.jsonl",
    tcp_c2c_qos_servertimestamp => "tcp-c2c-qos-servertimestamp.jsonl",
    tcp_c2c_qos => "tcp-c2c-qos.jsonl",
    tcp_c2s_duplicate => "tcp-c2s-duplicate.jsonl",
    tcp_c2s_qos => "tcp-c2s-qos.jsonl",
    tcp_echo => "tcp-echo.jsonl",
    tcp_from_spoof => "tcp-from-spoof.jsonl",
    tcp_keepalive => "tcp-keepalive.jsonl",
    tcp_kickout_admin => "tcp-kickout-admin.jsonl",
    tcp_kickout_duplicate => "tcp-kickout-duplicate.jsonl",
    tcp_kickout_firstlogintime => "tcp-kickout-firstlogintime.jsonl",
    tcp_login_logout => "tcp-login-logout.jsonl",
    tcp_login_rejected => "tcp-login-rejected.jsonl",
    tcp_offline_lost => "tcp-offline-lost.jsonl",
    tcp_offline_stored => "tcp-offline-stored.jsonl",
    tcp_oversize => "tcp-oversize.jsonl",
    tcp_relogin_other_uid => "tcp-relogin-other-uid.jsonl",
    tcp_relogin_same_conn => "tcp-relogin-same-conn.jsonl",
    tcp_s2c_qos => "tcp-s2c-qos.jsonl",
    tcp_s2c_resend => "tcp-s2c-resend.jsonl",
    tcp_session_timeout => "tcp-session-timeout.jsonl",
    tcp_unlogged_301 => "tcp-unlogged-301.jsonl",
    udp_c2c_duplicate => "udp-c2c-duplicate.jsonl",
    udp_c2c_noqos => "udp-c2c-noqos.jsonl",
    udp_c2c_qos_servertimestamp => "udp-c2c-qos-servertimestamp.jsonl",
    udp_c2c_qos => "udp-c2c-qos.jsonl",
    udp_c2s_duplicate => "udp-c2s-duplicate.jsonl",
    udp_c2s_qos => "udp-c2s-qos.jsonl",
    udp_echo => "udp-echo.jsonl",
    udp_from_spoof => "udp-from-spoof.jsonl",
    udp_keepalive => "udp-keepalive.jsonl",
    udp_kickout_admin => "udp-kickout-admin.jsonl",
    udp_kickout_duplicate => "udp-kickout-duplicate.jsonl",
    udp_kickout_firstlogintime => "udp-kickout-firstlogintime.jsonl",
    udp_login_logout => "udp-login-logout.jsonl",
    udp_login_rejected => "udp-login-rejected.jsonl",
    udp_offline_lost => "udp-offline-lost.jsonl",
    udp_offline_stored => "udp-offline-stored.jsonl",
    udp_oversize => "udp-oversize.jsonl",
    udp_relogin_other_uid => "udp-relogin-other-uid.jsonl",
    udp_relogin_same_conn => "udp-relogin-same-conn.jsonl",
    udp_s2c_qos => "udp-s2c-qos.jsonl",
    udp_s2c_resend => "udp-s2c-resend.jsonl",
    udp_session_timeout => "udp-session-timeout.jsonl",
    udp_unlogged_301 => "udp-unlogged-301.jsonl",
    ws_c2c_duplicate => "ws-c2c-duplicate.jsonl",
    ws_c2c_qos_servertimestamp => "ws-c2c-qos-servertimestamp.jsonl",
    ws_c2c_qos => "ws-c2c-qos.jsonl",
    ws_c2s_duplicate => "ws-c2s-duplicate.jsonl",
    ws_c2s_qos => "ws-c2s-qos.jsonl",
    ws_echo => "ws-echo.jsonl",
    ws_from_spoof => "ws-from-spoof.jsonl",
    ws_keepalive => "ws-keepalive.jsonl",
    ws_kickout_admin => "ws-kickout-admin.jsonl",
    ws_kickout_duplicate => "ws-kickout-duplicate.jsonl",
    ws_kickout_firstlogintime => "ws-kickout-firstlogintime.jsonl",
    ws_login_logout => "ws-login-logout.jsonl",
    ws_login_rejected => "ws-login-rejected.jsonl",
    ws_offline => "ws-offline.jsonl",
    ws_oversize => "ws-oversize.jsonl",
    ws_relogin_other_uid => "ws-relogin-other-uid.jsonl",
    ws_relogin_same_conn => "ws-relogin-same-conn.jsonl",
    ws_s2c_qos => "ws-s2c-qos.jsonl",
    ws_s2c_resend => "ws-s2c-resend.jsonl",
    ws_session_timeout => "ws-session-timeout.jsonl",
    ws_unlogged_301 => "ws-unlogged-301.jsonl",
}

/// A capture file that this suite does not list would be skipped silently: fail instead (and
/// fail for a listed file that has disappeared).
#[test]
fn every_vector_file_is_replayed() {
    let dir = vectors_dir();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("vectors not found at {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".jsonl"))
        .collect();
    let listed: BTreeSet<String> = FILES.iter().map(|f| (*f).to_owned()).collect();
    let untested: Vec<_> = on_disk.difference(&listed).collect();
    let missing: Vec<_> = listed.difference(&on_disk).collect();
    assert!(
        untested.is_empty() && missing.is_empty(),
        "capture files without a replay test (add them to vector_tests!): {untested:?}; \
         listed but not found in {}: {missing:?}",
        dir.display()
    );
}

// ---------------------------------------------------------------------------------------------
// Running every replay at once.

/// How long a test waits for its file's replay. The longest capture lasts 17 s, and every wait
/// of a replay ends at most [`SLACK`] after the capture's time for it.
const TEST_LIMIT: Duration = Duration::from_secs(30);

type Outcome = Result<(), String>;

#[derive(Default)]
struct Slot {
    outcome: Mutex<Option<Outcome>>,
    done: Condvar,
}

/// Starts the replays on their own threads, once: every file's when the tests share one
/// process (`cargo test`: the slow replays mostly wait on the capture's clock, so they overlap),
/// only the asking test's file when each test has a process of its own (nextest).
fn replays(asking: &str) -> &'static HashMap<&'static str, Arc<Slot>> {
    static REPLAYS: OnceLock<HashMap<&'static str, Arc<Slot>>> = OnceLock::new();
    let one_per_process =
        std::env::var("NEXTEST_EXECUTION_MODE").is_ok_and(|mode| mode == "process-per-test");
    REPLAYS.get_or_init(|| {
        FILES
            .iter()
            .filter(|&&file| !one_per_process || file == asking)
            .map(|&file| {
                let slot = Arc::new(Slot::default());
                let done = Arc::clone(&slot);
                std::thread::Builder::new()
                    .name(format!("replay {file}"))
                    .spawn(move || {
                        let outcome = std::panic::catch_unwind(|| replay_file(file))
                            .unwrap_or_else(|panic| {
                                Err(panic
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| {
                                        panic.downcast_ref::<&str>().map(|s| (*s).to_owned())
                                    })
                                    .unwrap_or_else(|| "panicked".to_owned()))
                            });
                        *done.outcome.lock().unwrap() = Some(outcome);
                        done.done.notify_all();
                    })
                    .unwrap();
                (file, slot)
            })
            .collect()
    })
}

/// Waits for `file`'s replay and fails the calling test with its error.
fn outcome(file: &str) {
    let slot = &replays(file)[file];
    let guard = slot.outcome.lock().unwrap();
    let (guard, _) = slot
        .done
        .wait_timeout_while(guard, TEST_LIMIT, |outcome| outcome.is_none())
        .unwrap();
    match guard.as_ref() {
        Some(Ok(())) => {}
        Some(Err(error)) => panic!("{file}: {error}"),
        None => panic!("{file}: replay did not finish within {TEST_LIMIT:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The capture files.

fn vectors_dir() -> PathBuf {
    std::env::var_os("IMEDGE_VECTORS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/protocol/vectors"),
        PathBuf::from,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    C2s,
    S2c,
}

/// One line of a capture file.
#[derive(Debug, Clone)]
struct Line {
    /// 1-based line number.
    n: usize,
    dir: Dir,
    t_ms: f64,
    conn: String,
    json: Option<String>,
    hex: Vec<u8>,
    event: Option<String>,
    kind: Option<String>,
}

fn load(file: &str) -> Result<Vec<Line>, String> {
    let path = vectors_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
            let text = |key: &str| v[key].as_str().map(str::to_owned);
            Ok(Line {
                n: i + 1,
                dir: match v["dir"].as_str() {
                    Some("c2s") => Dir::C2s,
                    Some("s2c") => Dir::S2c,
                    other => return Err(format!("line {}: dir {other:?}", i + 1)),
                },
                t_ms: v["t_ms"].as_f64().unwrap_or_default(),
                conn: text("conn").unwrap_or_default(),
                json: text("json"),
                hex: hex::decode(v["hex"].as_str().unwrap_or_default())
                    .map_err(|e| format!("line {}: {e}", i + 1))?,
                event: text("event"),
                kind: text("kind"),
            })
        })
        .collect()
}

fn transport_of(file: &str) -> T {
    match file.split('-').next() {
        Some("tcp") => T::Tcp,
        Some("udp") => T::Udp,
        Some("ws") => T::Ws,
        _ => panic!("{file}: unknown transport"),
    }
}

/// The flow of a file: its name without transport and extension (`c2c-qos`).
fn flow(file: &str) -> &str {
    let name = file.strip_suffix(".jsonl").unwrap_or(file);
    name.split_once('-').map_or(name, |(_, flow)| flow)
}

fn decode(json: &[u8]) -> Result<Message<'static>, String> {
    let mut body = json.to_vec();
    Decoder::new()
        .decode(&mut body)
        .map(Message::into_owned)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(json)))
}

// ---------------------------------------------------------------------------------------------
// The capture's test hooks ("refim", vectors/README.md), as a `ServerEvents`.

/// What the hooks saw, for the checks a file makes after its replay.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Verify { uid: String, token: String },
    Login(String),
    Logout { uid: String, kickout: Option<i32> },
    C2s { fp: Option<String> },
    C2cAfter { fp: Option<String> },
    Offline { to: Option<String> },
    S2cDelivered,
    S2cLost,
}

/// The demo's behaviour (verify 0, nothing stored offline) plus the capture's triggers: token
/// `refim-reject` → 1025; C2C to `stored-*` → stored; C2S `refim:s2c` → an S2C QoS message
/// (typeu 99, `s2c-reply-to:<fp>`) back to the sender; C2S `refim:kick` → kickout code 2 with the
/// captured reason.
struct Refim {
    kick_reason: Option<String>,
    seen: Mutex<Vec<Seen>>,
}

impl Refim {
    fn see(&self, seen: Seen) {
        self.seen.lock().unwrap().push(seen);
    }

    fn count(&self, pred: impl Fn(&Seen) -> bool) -> usize {
        self.seen.lock().unwrap().iter().filter(|s| pred(s)).count()
    }
}

impl ServerEvents for Refim {
    fn verify(&self, login: &LoginRequest<'_>, _session: SessionInfo<'_>) -> i32 {
        let token = login.token.as_deref().unwrap_or_default();
        self.see(Seen::Verify {
            uid: login.user_id.as_str().to_owned(),
            token: token.to_owned(),
        });
        if token == "refim-reject" {
            1025
        } else {
            0
        }
    }

    fn on_login(&self, _extra: Option<&str>, session: SessionInfo<'_>, _api: &mut Api) {
        self.see(Seen::Login(session.uid.to_owned()));
    }

    fn on_logout(&self, session: SessionInfo<'_>, kickout: Option<i32>) {
        self.see(Seen::Logout {
            uid: session.uid.to_owned(),
            kickout,
        });
    }

    fn on_c2s(&self, msg: &Message<'_>, session: SessionInfo<'_>, api: &mut Api) {
        let fp = msg.fp.as_ref().map(|fp| fp.as_str().to_owned());
        match msg.text() {
            Some("refim:s2c") => api.send(
                session.uid,
                format!("s2c-reply-to:{}", fp.as_deref().unwrap_or_default()),
                99,
                true,
            ),
            Some("refim:kick") => {
                api.kick(session.uid, KICKOUT_BY_ADMIN, self.kick_reason.as_deref());
            }
            _ => {}
        }
        self.see(Seen::C2s { fp });
    }

    fn on_c2c_after(&self, _from: &str, _to: &str, fp: Option<&str>) {
        self.see(Seen::C2cAfter {
            fp: fp.map(str::to_owned),
        });
    }

    fn on_offline(&self, msg: Undelivered<'_>) -> bool {
        self.see(Seen::Offline {
            to: msg.to.map(str::to_owned),
        });
        msg.to.is_some_and(|to| to.starts_with("stored-"))
    }

    fn on_s2c_lost(&self, _to: &str, _fp: &str, _json: &[u8]) {
        self.see(Seen::S2cLost);
    }

    fn on_s2c_delivered(&self, _to: &str, _fp: &str) {
        self.see(Seen::S2cDelivered);
    }
}

/// The reason of the code-2 kickout the capture shows (the refim admin trigger).
fn captured_kick_reason(lines: &[Line]) -> Option<String> {
    lines.iter().find_map(|line| {
        let msg = decode(line.json.as_ref()?.as_bytes()).ok()?;
        if line.dir != Dir::S2c || msg.kind != Kind::Kickout {
            return None;
        }
        let doc = Decoder::new().kickout(msg.text()?).ok()?;
        (doc.code == KICKOUT_BY_ADMIN).then(|| doc.reason.map(Cow::into_owned))?
    })
}

// ---------------------------------------------------------------------------------------------
// The replay script.

#[derive(Debug, Clone)]
enum Action {
    /// TCP: the client's SYN, i.e. connect.
    Connect,
    /// WebSocket: connect and send this upgrade request (the captured one, same key).
    Upgrade(Vec<u8>),
    /// The server's upgrade response: byte-identical, since the key is the captured one.
    UpgradeResponse(Vec<u8>),
    /// Send one message body (JSON text), framed for the transport.
    Send(String),
    /// Send bytes exactly as captured (the client's WebSocket close frame).
    SendRaw(Vec<u8>),
    /// The client's FIN.
    Shutdown,
    /// The next message on the connection (normalised). A `floating` one may arrive earlier than
    /// the capture placed it among its connection's messages (timer-driven sends).
    Expect { json: String, floating: bool },
    /// A WebSocket close frame with this status and reason.
    ExpectWsClose(u16, String),
    /// The server ends the connection.
    ExpectClosed,
}

#[derive(Debug, Clone)]
struct Step {
    line: usize,
    t_ms: f64,
    conn: String,
    action: Action,
}

fn script(lines: &[Line], transport: T) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for line in lines {
        let action = match (
            line.dir,
            line.event.as_deref(),
            line.kind.as_deref(),
            &line.json,
        ) {
            (Dir::C2s, None, None, Some(json)) => Action::Send(json.clone()),
            (Dir::S2c, None, None, Some(json)) => Action::Expect {
                json: json.clone(),
                floating: false,
            },
            (Dir::C2s, Some("syn"), ..) if transport == T::Tcp => Action::Connect,
            // WebSocket connects at its upgrade request; the server's SYN-ACK and the kernel's
            // RST after the client's own close are not protocol behaviour.
            (Dir::C2s, Some("syn"), ..) | (Dir::S2c, Some("syn" | "rst"), ..) => continue,
            (Dir::C2s, Some("fin"), ..) => Action::Shutdown,
            (Dir::S2c, Some("fin"), ..) => Action::ExpectClosed,
            (Dir::C2s, None, Some("http"), None) => Action::Upgrade(line.hex.clone()),
            (Dir::S2c, None, Some("http"), None) => Action::UpgradeResponse(line.hex.clone()),
            (Dir::C2s, None, Some("ws-close"), None) => Action::SendRaw(line.hex.clone()),
            (Dir::S2c, None, Some("ws-close"), None) => {
                // A server frame: 0x88, a 7-bit length, then status and reason.
                let payload = line.hex.get(2..).unwrap_or_default();
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
                Action::ExpectWsClose(code, reason)
            }
            _ => return Err(format!("line {}: cannot replay {line:?}", line.n)),
        };
        steps.push(Step {
            line: line.n,
            t_ms: line.t_ms,
            conn: line.conn.clone(),
            action,
        });
    }
    Ok(steps)
}

// ---------------------------------------------------------------------------------------------
// Where imedge deliberately differs from the capture.

/// How an expected unit of the capture changes.
#[derive(Debug, Clone, Copy)]
enum Fix {
    /// The expected message's `from` becomes this uid.
    From(&'static str),
    /// The expected message's `to` becomes this uid.
    To(&'static str),
    /// The expected unit does not happen.
    Absent,
    /// Timer-driven: may arrive before the messages the capture shows ahead of it.
    Floating,
    /// Instead, the connection of the request on line `request` gets error 301 for it.
    NotLoggedIn { request: usize },
}

/// The expectation overrides of `file`: (line, change). Each one is a documented hazard fix
/// (SPEC §13) or is explained where it is listed.
fn overrides(file: &str) -> Vec<(usize, Fix)> {
    use Fix::*;
    match file {
        // S1 — spoofable `from`. imedge overwrites `from` of C2C and C2S data with the session's
        // uid: bob receives mallory's message as from "mallory", and the substitute ACK (C2C) and
        // the server ACK (C2S) go to "mallory" instead of the spoofed "alice".
        "tcp-from-spoof.jsonl" => vec![
            (10, From("mallory")),
            (11, To("mallory")),
            (14, To("mallory")),
        ],
        "udp-from-spoof.jsonl" => vec![
            (6, From("mallory")),
            (7, To("mallory")),
            (10, To("mallory")),
        ],
        "ws-from-spoof.jsonl" => vec![
            (14, From("mallory")),
            (15, To("mallory")),
            (18, To("mallory")),
        ],

        // R2 — no server de-duplication for C2C. imedge remembers the (sender, fp) of delivered
        // C2C QoS messages: the resend is ACKed again but not forwarded to bob again.
        "tcp-c2c-duplicate.jsonl" => vec![(14, Absent)],
        "udp-c2c-duplicate.jsonl" => vec![(10, Absent)],
        "ws-c2c-duplicate.jsonl" => vec![(18, Absent)],

        // R4 — login acknowledged before registration. The newcomer with an *older*
        // firstLoginTime (alice#3) loses the duplicate-login arbitration; imedge decides before
        // answering, so it gets only the kickout, not a `code: 0` response first.
        "tcp-kickout-firstlogintime.jsonl" => vec![(14, Absent)],
        "udp-kickout-firstlogintime.jsonl" => vec![(7, Absent)],
        "ws-kickout-firstlogintime.jsonl" => vec![(23, Absent)],

        // S5 — kicked UDP sessions stay authenticated. imedge logs a kicked UDP session out, so
        // its next keep-alive is answered with error 301 (the reference answered 51).
        "udp-kickout-admin.jsonl" => vec![(7, NotLoggedIn { request: 6 })],
        // S5 and R7 (keep-alive routed by uid): in the capture the kicked alice#1 — a Java UDP
        // SDK, which ignores type 54 — kept heartbeating as alice and every reply went to the
        // *new* session alice#2. In imedge alice#1 is logged out, so each of its keep-alives
        // gets 301 on its own address and alice#2 sees only replies to its own keep-alives.
        // (A real UDP SDK would re-login after the first 301; the captured client bytes are
        // replayed as they are.) Then alice#3 — the SDK's re-login from a new port with the
        // firstLoginTime of alice#1, older than alice#2's — is refused by R4's fix: only the
        // kickout, no `code: 0` first; its keep-alive then gets 301 as in the capture.
        "udp-kickout-duplicate.jsonl" => vec![
            (7, NotLoggedIn { request: 6 }),
            (11, NotLoggedIn { request: 10 }),
            (15, NotLoggedIn { request: 14 }),
            (19, NotLoggedIn { request: 18 }),
            (23, Absent),
        ],

        // Not a hazard: the reference's S2C resend happens 2–7 s after the original depending on
        // the phase of its 5 s QoS timer (SPEC §8.4), so relative to the client's keep-alives
        // (every 4 s) it may come earlier than in the capture.
        "tcp-s2c-resend.jsonl" => vec![(10, Floating)],
        "udp-s2c-resend.jsonl" => vec![(6, Floating)],
        "ws-s2c-resend.jsonl" => vec![(12, Floating)],

        // Not a hazard, and not a SPEC change: for a frame over 64 KiB Netty sends its close 1009
        // and then, closing the channel, a second close frame (1000 "Bye"). RFC 6455 §5.5.1 ends
        // the closing handshake with the first close frame; SPEC §1.3 describes this case as
        // "a close frame, status 1009 [...] and end the connection". imedge sends only the 1009.
        "ws-oversize.jsonl" => vec![(12, Absent)],

        // S2 — re-login as another uid: imedge verifies the second login (the reference skipped
        // verify) and logs the session's old identity (mallory) out first. With the demo's
        // verify (0 for any token but `refim-reject`) the login is accepted, so the wire is the
        // same as the capture: mallory's session gets `code: 0` for alice, the real alice is
        // kicked (code 1) and bob's message for alice reaches mallory's session. What differs is
        // checked on the hooks after the replay (`after_replay`). With a real verifier the
        // takeover is refused (gateways.rs `relogin_as_another_user_is_verified_again`).
        //
        // R9 (QoS echo in the resend queue) and R10 (WebSocket wrong path → 404): no capture
        // shows a difference on the wire (echo replies are never resent within a capture; no
        // capture requests another path).
        _ => Vec::new(),
    }
}

fn apply_overrides(file: &str, lines: &[Line], steps: &mut Vec<Step>) -> Result<(), String> {
    for (line, fix) in overrides(file) {
        let at = steps
            .iter()
            .position(|s| s.line == line)
            .ok_or_else(|| format!("override for line {line}, which has no step"))?;
        let step = &mut steps[at];
        let Action::Expect { json, floating } = &mut step.action else {
            if matches!(fix, Fix::Absent) {
                steps.remove(at);
                continue;
            }
            return Err(format!(
                "override {fix:?} for line {line}, which expects no message"
            ));
        };
        match fix {
            Fix::From(uid) | Fix::To(uid) => {
                let mut msg = decode(json.as_bytes())?;
                let field = if matches!(fix, Fix::From(_)) {
                    &mut msg.from
                } else {
                    &mut msg.to
                };
                *field = Some(UserId::from(uid.to_owned()));
                *json = String::from_utf8(msg.to_json()).unwrap();
            }
            Fix::Floating => *floating = true,
            Fix::Absent => {
                steps.remove(at);
            }
            Fix::NotLoggedIn { request } => {
                let req = lines
                    .iter()
                    .find(|l| l.n == request && l.dir == Dir::C2s)
                    .and_then(|l| Some((l.conn.clone(), l.json.clone()?)))
                    .ok_or_else(|| format!("line {request} is not a client message"))?;
                let reply = Message::error(ErrorResponse {
                    code: ERROR_NOT_LOGGED_IN,
                    message: Some(Cow::Owned(req.1)),
                });
                *json = String::from_utf8(reply.to_json()).unwrap();
                step.conn = req.0;
            }
        }
    }
    if file.starts_with("udp-") {
        unreflect_udp_301(steps)?;
    }
    Ok(())
}

/// S4 — unauthenticated error reflection. Over UDP (whose source address may be spoofed)
/// imedge's error 301 carries no copy of the request: every expected 301 of a UDP capture loses
/// its `errorMsg`. (The Java UDP SDK reads only the code, to log in again.)
fn unreflect_udp_301(steps: &mut [Step]) -> Result<(), String> {
    for step in steps {
        let Action::Expect { json, .. } = &mut step.action else {
            continue;
        };
        let msg = decode(json.as_bytes())?;
        if msg.kind != Kind::Error {
            continue;
        }
        let Some(doc) = msg.text() else {
            continue;
        };
        if Decoder::new()
            .error_response(doc)
            .is_ok_and(|e| e.code == ERROR_NOT_LOGGED_IN)
        {
            let reply = Message::error(ErrorResponse {
                code: ERROR_NOT_LOGGED_IN,
                message: None,
            });
            *json = String::from_utf8(reply.to_json()).unwrap();
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Normalisation.

fn now_ms() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(now.as_millis()).unwrap()
}

/// A server clock reading must be within a day of our clock.
fn plausible(what: &str, value: i64) -> Result<(), String> {
    const DAY_MS: i64 = 24 * 3600 * 1000;
    if (value - now_ms()).abs() <= DAY_MS {
        Ok(())
    } else {
        Err(format!(
            "{what} {value} is not within a day of now ({})",
            now_ms()
        ))
    }
}

/// The values that legitimately differ between the capture and this run, learned as they appear.
#[derive(Debug, Clone, Default)]
struct Normaliser {
    /// Fingerprints made by the server (S2C): captured → ours.
    fps: Vec<(String, String)>,
    /// `firstLoginTime` values: captured → ours. A value the capture shows twice (a client sends
    /// back what the server gave it, the server echoes a client's value) must be equal here too.
    times: HashMap<i64, i64>,
    /// Our clock minus the capture's, from the first server time seen: maps the times clients
    /// derive from the server's (e.g. "10 s later than my first login") into this run.
    offset: Option<i64>,
}

impl Normaliser {
    fn subst_fps(&self, json: &str) -> String {
        let mut text = json.to_owned();
        for (captured, ours) in &self.fps {
            text = text.replace(captured.as_str(), ours);
        }
        text
    }

    /// The client message of the capture, as it is to be sent in this run.
    fn c2s(&mut self, json: &str) -> Result<String, String> {
        let mut text = self.subst_fps(json);
        let msg = decode(text.as_bytes())?;
        if msg.kind == Kind::Login {
            if let Some(doc) = msg.text() {
                let login = Decoder::new()
                    .login_request(doc)
                    .map_err(|e| format!("{e}: {doc}"))?;
                let captured = login.first_login_time;
                if captured > 0 {
                    let ours = match self.times.get(&captured) {
                        Some(&ours) => ours,
                        None => {
                            let offset = self
                                .offset
                                .ok_or("a login with a firstLoginTime before any server time")?;
                            self.times.insert(captured, captured + offset);
                            captured + offset
                        }
                    };
                    text = text.replace(&captured.to_string(), &ours.to_string());
                }
            }
        }
        Ok(text)
    }

    /// Checks a received message body against the captured one; learns and commits the mappings
    /// only if it matches.
    fn expect(&mut self, captured: &str, actual: &[u8]) -> Result<(), String> {
        let mut next = self.clone();
        next.compare(captured, actual)?;
        *self = next;
        Ok(())
    }

    fn compare(&mut self, captured: &str, actual: &[u8]) -> Result<(), String> {
        let expected_text = self.subst_fps(captured);
        let mut expected = decode(expected_text.as_bytes())?;
        if expected.to_json() != expected_text.as_bytes() {
            return Err(format!(
                "the codec does not re-encode the capture: {expected_text}"
            ));
        }
        let got = decode(actual)?;
        let mismatch = |expected: &Message<'_>| {
            format!(
                "expected {}\n     got {}",
                String::from_utf8_lossy(&expected.to_json()),
                String::from_utf8_lossy(actual)
            )
        };
        if expected.kind != got.kind {
            return Err(mismatch(&expected));
        }

        // A server-made fingerprint (S2C data): ours is whatever the server chose, once.
        if expected.kind == Kind::CommonData
            && expected.from.as_ref().is_some_and(UserId::is_server)
        {
            if let (Some(theirs), Some(ours)) = (&expected.fp, &got.fp) {
                let (theirs, ours) = (theirs.as_str().to_owned(), ours.as_str().to_owned());
                let known = self.fps.iter().any(|(_, o)| *o == theirs);
                if !known {
                    if ours.is_empty() || self.fps.iter().any(|(_, o)| *o == ours) {
                        return Err(format!("server fingerprint {ours:?} is empty or reused"));
                    }
                    self.fps.push((theirs, ours.clone()));
                    expected.fp = got.fp.clone();
                }
            }
        }

        // The login response's firstLoginTime: a server clock reading or an echo.
        let mut login_times = None;
        if expected.kind == Kind::LoginResponse {
            let mut decoder = Decoder::new();
            let theirs = decoder
                .login_response(expected.text().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            let ours = decoder
                .login_response(got.text().unwrap_or_default())
                .map_err(|_| mismatch(&expected))?;
            self.time(theirs.first_login_time, ours.first_login_time)?;
            login_times = Some((theirs.first_login_time, ours.first_login_time));
            expected.content = Some(Content::LoginResponse(LoginResponse {
                code: theirs.code,
                first_login_time: ours.first_login_time,
            }));
        }

        // `sm`: the server clock when it sent the packet (server timestamps on), else -1.
        if expected.sm != -1 {
            plausible("sm", got.sm)?;
            if let Some((theirs, ours)) = login_times {
                if theirs == expected.sm && ours != got.sm {
                    return Err(format!(
                        "the capture shows sm == firstLoginTime, got sm {} and firstLoginTime {ours}",
                        got.sm
                    ));
                }
            }
            expected.sm = got.sm;
        }

        if expected.to_json() == actual {
            Ok(())
        } else {
            Err(mismatch(&expected))
        }
    }

    fn time(&mut self, theirs: i64, ours: i64) -> Result<(), String> {
        if theirs <= 0 {
            return if ours == theirs {
                Ok(())
            } else {
                Err(format!("firstLoginTime {ours}, the capture shows {theirs}"))
            };
        }
        plausible("firstLoginTime", ours)?;
        match self.times.get(&theirs) {
            Some(&known) if known != ours => Err(format!(
                "firstLoginTime {ours}: the capture shows the same value as before, which was {known} here"
            )),
            Some(_) => Ok(()),
            None => {
                self.times.insert(theirs, ours);
                self.offset.get_or_insert(ours - theirs);
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The replay.

/// How late (and how early, for timer-driven units) a reply may be compared with the capture.
const SLACK: Duration = Duration::from_secs(5);
/// The least time a reply is waited for, even when the replay runs behind the capture's clock.
const MIN_WAIT: Duration = Duration::from_secs(2);
/// How long each connection must stay silent at the end.
const QUIET: Duration = Duration::from_millis(300);

/// A receive outcome for an error message, bodies as text.
fn show(got: &RecvBody) -> String {
    match got {
        RecvBody::Body(body) => String::from_utf8_lossy(body).into_owned(),
        other => format!("{other:?}"),
    }
}

fn at(t0: Instant, t_ms: f64) -> Instant {
    t0 + Duration::from_secs_f64(t_ms.max(0.0) / 1000.0)
}

struct Conn {
    client: Client,
    /// The upgrade response head, for WebSocket.
    head: Vec<u8>,
    /// The server closed it (or the client sent its FIN).
    closed: bool,
}

fn replay_file(file: &'static str) -> Outcome {
    let lines = load(file)?;
    let transport = transport_of(file);
    let mut steps = script(&lines, transport)?;
    apply_overrides(file, &lines, &mut steps)?;

    let mut config = support::config(2);
    config.tcp_idle = Duration::from_secs(11);
    config.ws_idle = Duration::from_secs(11);
    config.udp_idle = Duration::from_secs(10);
    config.server_timestamps = file.contains("-servertimestamp");
    let hooks = Arc::new(Refim {
        kick_reason: captured_kick_reason(&lines),
        seen: Mutex::new(Vec::new()),
    });
    let server = Server::with(config, Arc::clone(&hooks) as Arc<dyn ServerEvents>);

    let result = run(&server, transport, &steps);
    // Notification hooks run on the hook pool, after the wire traffic they follow: poll.
    let result = result.and_then(|()| settled(|| after_replay(file, &hooks)));
    drop(server);
    result
}

fn run(server: &Server, transport: T, steps: &[Step]) -> Outcome {
    let t0 = Instant::now();
    let mut conns: HashMap<String, Conn> = HashMap::new();
    let mut norm = Normaliser::default();
    let mut done = vec![false; steps.len()];

    for (i, step) in steps.iter().enumerate() {
        if done[i] {
            continue;
        }
        let here = |e: String| format!("line {} ({}): {e}", step.line, step.conn);
        let due = at(t0, step.t_ms);
        let sleep_until_due = || {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        };
        let deadline = (due + SLACK).max(Instant::now() + MIN_WAIT);
        // Timer-driven units must not come much earlier than the capture shows either.
        let not_early = |what: &str| {
            let early = at(t0, step.t_ms - SLACK.as_secs_f64() * 1000.0);
            if Instant::now() < early {
                Err(here(format!(
                    "{what} after {:?}, the capture shows it at {} ms",
                    t0.elapsed(),
                    step.t_ms
                )))
            } else {
                Ok(())
            }
        };
        match &step.action {
            Action::Connect => {
                sleep_until_due();
                let client = Client::connect(server, T::Tcp);
                conns.insert(
                    step.conn.clone(),
                    Conn {
                        client,
                        head: Vec::new(),
                        closed: false,
                    },
                );
            }
            Action::Upgrade(request) => {
                sleep_until_due();
                let (client, head) = Client::connect_ws(server, request);
                conns.insert(
                    step.conn.clone(),
                    Conn {
                        client,
                        head,
                        closed: false,
                    },
                );
            }
            Action::UpgradeResponse(response) => {
                let conn = conns
                    .get(&step.conn)
                    .ok_or_else(|| here("no connection".into()))?;
                if conn.head != *response {
                    return Err(here(format!(
                        "upgrade response {:?}, the capture shows {:?}",
                        String::from_utf8_lossy(&conn.head),
                        String::from_utf8_lossy(response)
                    )));
                }
            }
            Action::Send(json) => {
                sleep_until_due();
                let body = norm.c2s(json).map_err(here)?;
                let conn = conns.entry(step.conn.clone()).or_insert_with(|| Conn {
                    // UDP: a new client endpoint (socket) for every `conn` of the capture.
                    client: Client::connect(server, transport),
                    head: Vec::new(),
                    closed: false,
                });
                conn.client.send_body(body.as_bytes());
            }
            Action::SendRaw(bytes) => {
                sleep_until_due();
                let conn = conns
                    .get_mut(&step.conn)
                    .ok_or_else(|| here("no connection".into()))?;
                conn.client.send_raw(bytes);
            }
            Action::Shutdown => {
                sleep_until_due();
                let conn = conns
                    .get_mut(&step.conn)
                    .ok_or_else(|| here("no connection".into()))?;
                conn.client.shutdown_write();
            }
            Action::Expect { json, .. } => {
                let conn = conns
                    .get_mut(&step.conn)
                    .ok_or_else(|| here("no connection".into()))?;
                loop {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    let body = match conn.client.recv_body_within(wait) {
                        RecvBody::Body(body) => body,
                        other => {
                            return Err(here(format!("expected {json}, got {}", show(&other))))
                        }
                    };
                    let error = match norm.expect(json, &body) {
                        Ok(()) => break,
                        Err(error) => error,
                    };
                    // A timer-driven message of this connection, due later in the script?
                    let floating = (i + 1..steps.len()).find(|&j| {
                        !done[j]
                            && steps[j].conn == step.conn
                            && matches!(&steps[j].action, Action::Expect { json, floating: true }
                                if norm.clone().expect(json, &body).is_ok())
                    });
                    match floating {
                        Some(j) => {
                            let Action::Expect { json, .. } = &steps[j].action else {
                                unreachable!()
                            };
                            norm.expect(json, &body).map_err(here)?;
                            done[j] = true;
                        }
                        None => return Err(here(error)),
                    }
                }
                not_early("message")?;
            }
            Action::ExpectWsClose(code, reason) => {
                let conn = conns
                    .get_mut(&step.conn)
                    .ok_or_else(|| here("no connection".into()))?;
                let wait = deadline.saturating_duration_since(Instant::now());
                match conn.client.recv_body_within(wait) {
                    RecvBody::WsClose(c, r) if c == *code && r == *reason => {}
                    other => {
                        return Err(here(format!(
                            "expected close {code} {reason:?}, got {}",
                            show(&other)
                        )))
                    }
                }
                not_early("close frame")?;
            }
            Action::ExpectClosed => {
                let conn = conns
                    .get_mut(&step.conn)
                    .ok_or_else(|| here("no connection".into()))?;
                let wait = deadline.saturating_duration_since(Instant::now());
                match conn.client.recv_body_within(wait) {
                    RecvBody::Closed => conn.closed = true,
                    other => {
                        return Err(here(format!(
                            "expected the server to close, got {}",
                            show(&other)
                        )))
                    }
                }
                not_early("close")?;
            }
        }
    }

    // Nothing the capture does not show may be left: a message still in flight to a connection
    // (a duplicate forward, a stray resend) fails the replay.
    let mut names: Vec<_> = conns.keys().cloned().collect();
    names.sort();
    for name in names {
        let conn = conns.get_mut(&name).unwrap();
        if conn.closed {
            continue;
        }
        if let RecvBody::Body(body) = conn.client.recv_body_within(QUIET) {
            return Err(format!(
                "{name}: unexpected message at the end: {}",
                String::from_utf8_lossy(&body)
            ));
        }
    }
    Ok(())
}

/// `check`'s verdict once it passes, or its last one after a generous deadline.
fn settled(check: impl Fn() -> Outcome) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let outcome = check();
        if outcome.is_ok() || Instant::now() >= deadline {
            return outcome;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the hooks must have seen, per flow: the parts of the reference's behaviour (and of
/// imedge's fixes) that are not visible on the wire.
fn after_replay(file: &str, hooks: &Refim) -> Outcome {
    let count = |pred: &dyn Fn(&Seen) -> bool| hooks.count(pred);
    let check = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{what}; hooks saw {:?}",
                hooks.seen.lock().unwrap()
            ))
        }
    };
    match flow(file) {
        // The duplicate C2S is ACKed twice but reaches the application once (SPEC §8.5).
        "c2s-duplicate" => check(
            count(&|s| matches!(s, Seen::C2s { .. })) == 1,
            "the application must see the duplicate C2S once",
        ),
        // R2 fixed: forwarded once.
        "c2c-duplicate" => check(
            count(&|s| matches!(s, Seen::C2cAfter { .. })) == 1,
            "the duplicate C2C must be forwarded once",
        ),
        // S2 fixed: the second login was verified, and the session's old identity logged out.
        "relogin-other-uid" => check(
            count(
                &|s| matches!(s, Seen::Verify { uid, token } if uid == "alice" && token == "no-verify"),
            ) == 1
                && count(&|s| matches!(s, Seen::Logout { uid, .. } if uid == "mallory")) == 1,
            "the re-login as alice must be verified and mallory logged out",
        ),
        "relogin-same-conn" => check(
            count(&|s| matches!(s, Seen::Verify { .. })) == 1,
            "a re-login as the same user is not verified again",
        ),
        "s2c-qos" => check(
            count(&|s| *s == Seen::S2cDelivered) == 1 && count(&|s| *s == Seen::S2cLost) == 0,
            "the ACKed S2C message must be reported delivered",
        ),
        // One resend, then reported lost one tick later (SPEC §8.4).
        "s2c-resend" => check(
            count(&|s| *s == Seen::S2cLost) == 1 && count(&|s| *s == Seen::S2cDelivered) == 0,
            "the unacknowledged S2C message must be reported lost once",
        ),
        "kickout-admin" => check(
            count(&|s| matches!(s, Seen::Logout { uid, kickout: Some(2) } if uid == "alice")) == 1,
            "the kicked session must be logged out with code 2",
        ),
        "login-rejected" => check(
            count(&|s| matches!(s, Seen::Login(_))) == 0,
            "a refused login must not log in",
        ),
        // The original and the client's two resends, none stored (not ACKed, so not recorded
        // as done by R2's fix either).
        "offline-lost" => check(
            count(&|s| matches!(s, Seen::Offline { to: Some(to) } if to == "carol")) == 3,
            "the offline hook must see the message and both resends",
        ),
        "offline-stored" => check(
            count(&|s| matches!(s, Seen::Offline { to: Some(to) } if to == "stored-carol")) == 1,
            "the offline hook must store the message",
        ),
        _ => Ok(()),
    }
}
