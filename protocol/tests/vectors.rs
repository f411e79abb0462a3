//! Golden data: every unit of every capture in `shared/protocol/vectors/` — taken from the real
//! MobileIMSDK Java server and clients — must unframe, decode, re-encode and re-frame to the
//! identical bytes. The files are read at test time from the shared folder (never copied here);
//! `IMEDGE_VECTORS` may point elsewhere.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test code: a panic is a failure

use std::collections::HashMap;
use std::path::PathBuf;

use bytes::BytesMut;
use imedge_protocol::frame::{tcp, udp, ws};
use imedge_protocol::message::Content;
use imedge_protocol::{Decoder, Kind, Message};

/// Number of capture files the vectors README promises (67 files, 571 protocol messages).
const EXPECTED_FILES: usize = 67;
const EXPECTED_MESSAGES: usize = 571;

#[derive(Debug)]
struct Unit {
    file: String,
    line: usize,
    dir: String,
    conn: String,
    kind: Option<String>,
    bytes: Vec<u8>,
    json: Option<String>,
}

impl Unit {
    fn transport(&self) -> &str {
        self.file.split('-').next().unwrap_or_default()
    }

    fn at(&self) -> String {
        format!("{}:{} ({} {})", self.file, self.line, self.dir, self.conn)
    }
}

fn vectors_dir() -> PathBuf {
    std::env::var_os("IMEDGE_VECTORS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/protocol/vectors"),
        PathBuf::from,
    )
}

/// All files, each as its units in capture order (byte-less syn/fin/rst lines skipped).
fn load() -> Vec<(String, Vec<Unit>)> {
    let dir = vectors_dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("vectors not found at {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            let units = text
                .lines()
                .enumerate()
                .filter_map(|(i, line)| {
                    let v: serde_json::Value = serde_json::from_str(line).unwrap();
                    let bytes = hex::decode(v["hex"].as_str().unwrap()).unwrap();
                    (!bytes.is_empty()).then(|| Unit {
                        file: file.clone(),
                        line: i + 1,
                        dir: v["dir"].as_str().unwrap().to_owned(),
                        conn: v["conn"].as_str().unwrap().to_owned(),
                        kind: v["kind"].as_str().map(str::to_owned),
                        bytes,
                        json: v["json"].as_str().map(str::to_owned),
                    })
                })
                .collect();
            (file, units)
        })
        .collect()
}

/// Decodes `body`, checks it is the captured JSON, re-encodes it byte for byte, and checks the
/// structured form of its `dataContent` document (if any) encodes to the same bytes too.
fn check_body(unit: &Unit, body: &[u8]) -> Message<'static> {
    let json = unit.json.as_deref().unwrap();
    assert_eq!(
        body,
        json.as_bytes(),
        "{}: unframed body differs",
        unit.at()
    );
    let mut decoder = Decoder::new();
    let mut buf = body.to_vec();
    let msg = decoder
        .decode(&mut buf)
        .unwrap_or_else(|e| panic!("{}: {e}", unit.at()))
        .into_owned();
    assert_eq!(
        String::from_utf8(msg.to_json()).unwrap(),
        json,
        "{}: re-encoding differs",
        unit.at()
    );

    // The zero-copy path must agree with the copying one.
    let mut padded = body.to_vec();
    padded.extend_from_slice(&[b'#'; imedge_protocol::codec::PADDING]);
    let in_place = decoder.decode_padded(&mut padded, body.len()).unwrap();
    assert_eq!(in_place, msg, "{}: padded decode differs", unit.at());

    if let Some(text) = msg.text() {
        let structured = match msg.kind {
            Kind::Login => Some(Content::Login(Box::new(
                decoder.login_request(text).unwrap(),
            ))),
            Kind::LoginResponse => Some(Content::LoginResponse(
                decoder.login_response(text).unwrap(),
            )),
            Kind::Error => Some(Content::Error(Box::new(
                decoder.error_response(text).unwrap(),
            ))),
            Kind::Kickout => Some(Content::Kickout(Box::new(decoder.kickout(text).unwrap()))),
            _ => None,
        };
        if let Some(content) = structured {
            let rebuilt = Message {
                content: Some(content),
                ..msg.clone()
            };
            assert_eq!(
                String::from_utf8(rebuilt.to_json()).unwrap(),
                json,
                "{}: document re-encoding differs",
                unit.at()
            );
        }
    }
    msg
}

fn check_tcp(unit: &Unit) {
    let body_len = u32::from_be_bytes(unit.bytes[..4].try_into().unwrap()) as usize;
    if body_len > tcp::DEFAULT_MAX_BODY {
        // tcp-oversize: the reference closed the connection on this prefix; so do we.
        assert!(
            tcp::decode(&unit.bytes[..4], tcp::DEFAULT_MAX_BODY).is_err(),
            "{}",
            unit.at()
        );
    }
    let len = tcp::decode(&unit.bytes, usize::MAX).unwrap().unwrap();
    assert_eq!(
        tcp::PREFIX_LEN + len,
        unit.bytes.len(),
        "{}: frame length",
        unit.at()
    );
    // Incremental: every proper prefix of the frame asks for more.
    for cut in [0, 1, 3, 4, unit.bytes.len() - 1] {
        assert_eq!(
            tcp::decode(&unit.bytes[..cut], usize::MAX),
            Ok(None),
            "{}",
            unit.at()
        );
    }
    let msg = check_body(unit, &unit.bytes[tcp::PREFIX_LEN..]);
    let mut framed = BytesMut::new();
    tcp::encode(&msg, &mut framed);
    assert_eq!(
        &framed[..],
        &unit.bytes[..],
        "{}: re-framing differs",
        unit.at()
    );
}

fn check_udp(unit: &Unit) {
    let received = unit.bytes.len();
    if received > udp::DEFAULT_MAX_DATAGRAM {
        // udp-oversize: the reference's 2048-byte read truncated this datagram and dropped the
        // session; we report it as too large.
        assert!(
            udp::decode(received, udp::DEFAULT_MAX_DATAGRAM).is_err(),
            "{}",
            unit.at()
        );
    } else {
        assert_eq!(
            udp::decode(received, udp::DEFAULT_MAX_DATAGRAM),
            Ok(received)
        );
    }
    let msg = check_body(unit, &unit.bytes);
    let mut datagram = Vec::new();
    udp::encode(&msg, &mut datagram);
    assert_eq!(datagram, unit.bytes, "{}: re-encoding differs", unit.at());
}

/// Where the masking key of a client frame sits (RFC 6455 §5.2).
fn mask_of(frame: &[u8]) -> [u8; 4] {
    let at = match frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    frame[at..at + 4].try_into().unwrap()
}

fn role_of(unit: &Unit) -> ws::Role {
    if unit.dir == "c2s" {
        ws::Role::Server
    } else {
        ws::Role::Client
    }
}

fn check_ws_frame(unit: &Unit) {
    let mut src = BytesMut::from(&unit.bytes[..]);
    let mut decoder = ws::FrameDecoder::new(role_of(unit), ws::MAX_PAYLOAD);
    // Incremental: a frame missing its last byte is not consumed.
    let mut partial = BytesMut::from(&unit.bytes[..unit.bytes.len() - 1]);
    match ws::FrameDecoder::new(role_of(unit), ws::MAX_PAYLOAD).decode(&mut partial) {
        Ok(None) => assert_eq!(partial.len(), unit.bytes.len() - 1, "{}", unit.at()),
        Err(ws::WsError::TooBig) => {}
        other => panic!("{}: partial frame gave {other:?}", unit.at()),
    }
    match decoder.decode(&mut src) {
        Ok(Some(ws::Unit::Text(payload))) => {
            assert!(src.is_empty(), "{}: frame not fully consumed", unit.at());
            let msg = check_body(unit, &payload);
            let mask = (unit.dir == "c2s").then(|| mask_of(&unit.bytes));
            let mut framed = BytesMut::new();
            ws::encode_message(&msg, mask, &mut framed);
            assert_eq!(
                &framed[..],
                &unit.bytes[..],
                "{}: re-framing differs",
                unit.at()
            );
        }
        Err(ws::WsError::TooBig) => {
            // ws-oversize: 65537 bytes; the reference answered close 1009.
            assert!(unit.bytes.len() > ws::MAX_PAYLOAD, "{}", unit.at());
            let mut big = BytesMut::from(&unit.bytes[..]);
            let mut unlimited = ws::FrameDecoder::new(role_of(unit), usize::MAX);
            let Ok(Some(ws::Unit::Text(payload))) = unlimited.decode(&mut big) else {
                panic!(
                    "{}: oversize frame does not decode without a limit",
                    unit.at()
                );
            };
            check_body(unit, &payload);
        }
        other => panic!("{}: expected a text frame, got {other:?}", unit.at()),
    }
}

fn check_ws_close(unit: &Unit) {
    let mut src = BytesMut::from(&unit.bytes[..]);
    let decoded = ws::FrameDecoder::new(role_of(unit), ws::MAX_PAYLOAD)
        .decode(&mut src)
        .unwrap_or_else(|e| panic!("{}: {e}", unit.at()));
    let Some(ws::Unit::Close(close)) = decoded else {
        panic!("{}: expected a close frame, got {decoded:?}", unit.at());
    };
    if unit.dir == "s2c" {
        let (code, reason) = close.unwrap();
        let mut framed = BytesMut::new();
        ws::encode_close(code, &reason, &mut framed);
        assert_eq!(
            &framed[..],
            &unit.bytes[..],
            "{}: close re-encoding differs",
            unit.at()
        );
    }
}

#[test]
fn every_capture_round_trips_byte_for_byte() {
    let files = load();
    assert_eq!(
        files.len(),
        EXPECTED_FILES,
        "vector files in {}",
        vectors_dir().display()
    );
    let mut messages = 0;
    for (file, units) in &files {
        let mut in_file = 0;
        // WS upgrade requests waiting for their response, per connection.
        let mut upgrades: HashMap<&str, Vec<u8>> = HashMap::new();
        for unit in units {
            match (unit.transport(), unit.kind.as_deref(), unit.json.is_some()) {
                ("tcp", None, true) => check_tcp(unit),
                ("udp", None, true) => check_udp(unit),
                ("ws", None, true) => check_ws_frame(unit),
                ("ws", Some("ws-close"), false) => check_ws_close(unit),
                ("ws", Some("http"), false) if unit.dir == "c2s" => {
                    let mut response = BytesMut::new();
                    let outcome = ws::accept(&unit.bytes, &mut response);
                    assert_eq!(
                        outcome,
                        Some(ws::Handshake::Accepted {
                            consumed: unit.bytes.len()
                        }),
                        "{}",
                        unit.at()
                    );
                    upgrades.insert(&unit.conn, response.to_vec());
                }
                ("ws", Some("http"), false) => {
                    let ours = upgrades.remove(unit.conn.as_str()).unwrap();
                    assert_eq!(
                        String::from_utf8_lossy(&ours),
                        String::from_utf8_lossy(&unit.bytes),
                        "{}: upgrade response differs",
                        unit.at()
                    );
                }
                _ => panic!("{}: unexpected unit {unit:?}", unit.at()),
            }
            in_file += usize::from(unit.json.is_some());
        }
        assert!(in_file > 0, "{file}: no protocol message exercised");
        assert!(upgrades.is_empty(), "{file}: upgrade without response");
        messages += in_file;
    }
    assert_eq!(messages, EXPECTED_MESSAGES);
}
