//! Fuzz target: the WebSocket upgrade parser and frame decoder (both roles) on arbitrary bytes.
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
    let mut decoder = ws::FrameDecoder::new(role, ws::MAX_PAYLOAD);
    let mut src = BytesMut::from(bytes);
    while let Ok(Some(unit)) = decoder.decode(&mut src) {
        if let ws::Unit::Text(payload) = unit {
            assert!(payload.len() <= ws::MAX_PAYLOAD);
        }
    }
});
