//! Fuzz target: the WebSocket upgrade parser and frame decoder (both roles) on arbitrary bytes,
//! and the server's zero-copy path (`text_in_place`) against the buffered decoder.
#![no_main]

use bytes::BytesMut;
use imedge_protocol::frame::ws;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let mut response = BytesMut::new();
        if let Some(
            ws::Handshake::Accepted { consumed } | ws::Handshake::Rejected { consumed, .. },
        ) = ws::accept(bytes, &mut response)
        {
            assert!(consumed <= bytes.len());
            assert!(!response.is_empty());
        }
        return;
    }
    let role = if mode & 2 == 0 {
        ws::Role::Server
    } else {
        ws::Role::Client
    };
    // Differential: every frame the in-place path takes, `decode` takes too — the same length
    // and the same unmasked text.
    let mut in_place = bytes.to_vec();
    let mut buffered = BytesMut::from(bytes);
    let mut reference = ws::FrameDecoder::new(role, ws::MAX_PAYLOAD);
    let mut at = 0;
    while let Some(rest) = in_place.get_mut(at..) {
        let Some((body, len)) = reference.text_in_place(rest) else {
            break;
        };
        assert!(body.end <= len && len <= rest.len());
        let before = buffered.len();
        match reference.decode(&mut buffered) {
            Ok(Some(ws::Unit::Text(payload))) => assert_eq!(&payload[..], &rest[body]),
            other => panic!("text_in_place took a text frame, decode gave {other:?}"),
        }
        assert_eq!(before - buffered.len(), len);
        at += len;
    }

    let mut decoder = ws::FrameDecoder::new(role, ws::MAX_PAYLOAD);
    let mut src = BytesMut::from(bytes);
    while let Ok(Some(unit)) = decoder.decode(&mut src) {
        if let ws::Unit::Text(payload) = unit {
            assert!(payload.len() <= ws::MAX_PAYLOAD);
        }
    }
});
