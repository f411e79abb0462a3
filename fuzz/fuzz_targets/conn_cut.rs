//! Fuzz target: the server's connection state, differentially. The bytes of one TCP or
//! WebSocket connection arrive in arbitrary chunks; the loop's zero-copy path (`ConnState::cut`
//! where bytes lie, the rest appended to `rx` and taken by `next`) must yield exactly the
//! message bodies, and the same close, as the buffered path (`next` on everything copied).
#![no_main]

use std::net::SocketAddr;

use imedge_protocol::frame::ws;
use imedge_protocol::session::Transport;
use imedge_server::runtime::conn::{ConnState, Next};

/// A WebSocket upgrade the server accepts, so that the frames after it are exercised.
const UPGRADE: &[u8] = b"GET /websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Small, so that the oversize path is reached often.
const MAX_BODY: usize = 512;

#[derive(Debug, PartialEq)]
enum Seen {
    Body(Vec<u8>),
    Close,
}

/// Drains `state` through the buffered path.
fn drain(state: &mut ConnState, seen: &mut Vec<Seen>) -> bool {
    loop {
        match state.next(MAX_BODY) {
            Next::Body(body) => seen.push(Seen::Body(body.to_vec())),
            Next::Wait => return false,
            Next::Close => {
                seen.push(Seen::Close);
                return true;
            }
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let peer = SocketAddr::from(([127, 0, 0, 1], 9));
    let transport = if mode & 1 == 0 {
        Transport::Tcp
    } else {
        Transport::Ws
    };
    let mut stream = Vec::new();
    if transport == Transport::Ws && mode & 2 == 0 {
        stream.extend_from_slice(UPGRADE);
    }
    stream.extend_from_slice(rest);
    // Chunk sizes come from the mode byte's high bits: 1..=32 bytes, or everything at once.
    let chunk = match mode >> 2 {
        0 => stream.len().max(1),
        n => usize::from(n & 31) + 1,
    };

    // Buffered: every byte copied into rx, then cut by `next`.
    let mut reference = ConnState::new(transport, peer);
    let mut expected = Vec::new();
    for piece in stream.chunks(chunk) {
        reference.rx.extend_from_slice(piece);
        if drain(&mut reference, &mut expected) {
            break;
        }
    }

    // Zero-copy where possible, as `Base::process_received` does.
    let mut state = ConnState::new(transport, peer);
    let mut seen = Vec::new();
    for piece in stream.chunks(chunk) {
        let mut owned = piece.to_vec();
        let mut received: &mut [u8] = &mut owned;
        if state.takes_in_place() {
            while let Some(body) = state.cut(&mut received, MAX_BODY) {
                let max = match transport {
                    Transport::Ws => ws::MAX_PAYLOAD,
                    _ => MAX_BODY,
                };
                assert!(body.len() <= max);
                seen.push(Seen::Body(body.to_vec()));
            }
        }
        state.rx.extend_from_slice(received);
        if drain(&mut state, &mut seen) {
            break;
        }
    }
    assert_eq!(seen, expected);
    assert_eq!(state.tx, reference.tx);
});
