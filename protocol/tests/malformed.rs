//! Hostile input: whatever arrives from the network, the decoders answer with a typed error (or
//! "need more bytes"), never a panic, and allocate memory bounded by the input size.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test code: a panic is a failure

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use imedge_protocol::codec::Field;
use imedge_protocol::frame::{tcp, udp, ws};
use imedge_protocol::{DecodeError, Decoder};
use proptest::prelude::*;

/// Counts the bytes allocated by the current thread, so one test can bound the memory a decode
/// takes while other tests run on other threads.
struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: defers to the system allocator; only adds bookkeeping in a const-initialised
// thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + layout.size()));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + new_size));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Decodes `input` with a fresh decoder; returns the result and the bytes allocated doing so.
fn decode_counting(input: &[u8]) -> (Result<(), DecodeError>, usize) {
    let mut body = input.to_vec();
    let mut decoder = Decoder::new();
    let before = ALLOCATED.with(Cell::get);
    let result = decoder.decode(&mut body).map(drop);
    (result, ALLOCATED.with(Cell::get) - before)
}

/// Memory a decode may take: a small multiple of the input (simd-json's padded copy, string
/// scratch, structural index and tape) plus a constant.
fn budget(input_len: usize) -> usize {
    64 * 1024 + 48 * input_len
}

fn assert_error(input: &[u8], expected: DecodeError) {
    let (result, allocated) = decode_counting(input);
    assert_eq!(
        result,
        Err(expected),
        "{:?}",
        String::from_utf8_lossy(&input[..input.len().min(60)])
    );
    assert!(
        allocated <= budget(input.len()),
        "{allocated} bytes allocated for {} input bytes",
        input.len()
    );
}

#[test]
fn json_bombs_fail_fast_within_the_frame_limits() {
    for len in [tcp::DEFAULT_MAX_BODY, ws::MAX_PAYLOAD] {
        let half = (len - 12) / 2;
        let arrays = format!(
            "{{\"type\":2,\"x\":{}{}",
            "[".repeat(half),
            "]".repeat(half)
        );
        assert_error(arrays.as_bytes(), DecodeError::TooDeep);
        let objects = format!("{{\"type\":2{}", ",\"a\":{\"b\":1".repeat(len / 12));
        assert_error(objects.as_bytes(), DecodeError::TooDeep);
        let unclosed = "[".repeat(len);
        assert_error(unclosed.as_bytes(), DecodeError::TooDeep);
        // Wide rather than deep: many keys and a long array of small values.
        let wide = format!("{{\"type\":2,\"x\":[{}0]}}", "0,".repeat(len / 2 - 10));
        let (result, allocated) = decode_counting(wide.as_bytes());
        assert_eq!(result, Ok(()));
        assert!(allocated <= budget(wide.len()));
    }
}

#[test]
fn malformed_bodies_give_typed_errors() {
    let cases: &[(&[u8], DecodeError)] = &[
        (b"", DecodeError::Empty),
        (b"   ", DecodeError::InvalidJson),
        (b"null", DecodeError::NotAnObject),
        (b"42", DecodeError::NotAnObject),
        (b"\"type\"", DecodeError::NotAnObject),
        (b"[{\"type\":1}]", DecodeError::NotAnObject),
        (b"{\"type\":1", DecodeError::InvalidJson),
        (b"{\"type\":1}}", DecodeError::InvalidJson),
        (b"{type:1}", DecodeError::InvalidJson),
        (b"{'type':1}", DecodeError::InvalidJson),
        (b"{\"type\":1,}", DecodeError::InvalidJson),
        (b"{\"type\":\"\\x\"}", DecodeError::InvalidJson),
        (
            b"{\"type\":1,\"to\":\"\xc3\x28\"}",
            DecodeError::InvalidUtf8,
        ),
        (
            b"{\"type\":1,\"to\":\"\xed\xa0\x80\"}",
            DecodeError::InvalidUtf8,
        ),
        (b"{\"type\":1,\"to\":\"\xff\"}", DecodeError::InvalidUtf8),
        (b"{}", DecodeError::Missing(Field::Type)),
        (b"{\"type\":null}", DecodeError::Missing(Field::Type)),
        (b"{\"type\":true}", DecodeError::WrongType(Field::Type)),
        (b"{\"type\":[2]}", DecodeError::WrongType(Field::Type)),
        (b"{\"type\":{}}", DecodeError::WrongType(Field::Type)),
        (b"{\"type\":1e300}", DecodeError::WrongType(Field::Type)),
        (
            b"{\"type\":2,\"sm\":\"soon\"}",
            DecodeError::WrongType(Field::Sm),
        ),
        (
            b"{\"type\":2,\"sm\":18446744073709551615}",
            DecodeError::WrongType(Field::Sm),
        ),
        (
            b"{\"type\":2,\"typeu\":2147483648}",
            DecodeError::WrongType(Field::Typeu),
        ),
        (
            b"{\"type\":2,\"bridge\":\"yes\"}",
            DecodeError::WrongType(Field::Bridge),
        ),
        (
            b"{\"type\":2,\"dataContent\":{\"a\":1}}",
            DecodeError::WrongType(Field::DataContent),
        ),
        (
            b"{\"type\":2,\"from\":[\"a\"]}",
            DecodeError::WrongType(Field::From),
        ),
        (b"{\"type\":2,\"fp\":{}}", DecodeError::WrongType(Field::Fp)),
    ];
    for (input, expected) in cases {
        assert_error(input, *expected);
    }
}

#[test]
fn malformed_documents_give_typed_errors() {
    let mut decoder = Decoder::new();
    assert_eq!(decoder.login_request(""), Err(DecodeError::Empty));
    assert_eq!(
        decoder.login_request("{}").err(),
        Some(DecodeError::Missing(Field::LoginUserId))
    );
    assert_eq!(
        decoder.login_request(r#"{"loginUserId":null}"#).err(),
        Some(DecodeError::Missing(Field::LoginUserId))
    );
    assert_eq!(
        decoder.login_request("[]").err(),
        Some(DecodeError::NotAnObject)
    );
    assert_eq!(
        decoder
            .login_request(r#"{"loginUserId":"a","firstLoginTime":"x"}"#)
            .err(),
        Some(DecodeError::WrongType(Field::FirstLoginTime))
    );
    assert_eq!(
        decoder.login_response("{").err(),
        Some(DecodeError::InvalidJson)
    );
    assert_eq!(
        decoder.kickout(r#"{"code":[]}"#).err(),
        Some(DecodeError::WrongType(Field::Code))
    );
}

#[test]
fn truncated_frames_wait_and_huge_prefixes_fail() {
    let body = br#"{"bridge":false,"type":1,"dataContent":"{}","from":"a","to":"0","QoS":false,"typeu":-1,"sm":-1}"#;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    for cut in 0..frame.len() {
        assert_eq!(tcp::decode(&frame[..cut], tcp::DEFAULT_MAX_BODY), Ok(None));
        // A truncated body handed to the JSON decoder is an error, not a panic.
        let (result, _) = decode_counting(&body[..cut.min(body.len() - 1)]);
        assert!(result.is_err());
    }
    for prefix in [6145u32, 65536, 1 << 24, u32::MAX] {
        let bytes = prefix.to_be_bytes();
        assert!(tcp::decode(&bytes, tcp::DEFAULT_MAX_BODY).is_err());
        let mut rx = BytesMut::from(&bytes[..]);
        assert!(tcp::split_frame(&mut rx, tcp::DEFAULT_MAX_BODY).is_err());
    }
    assert!(udp::decode(udp::DEFAULT_MAX_DATAGRAM + 1, udp::DEFAULT_MAX_DATAGRAM).is_err());
    // A WS header announcing 2^63 bytes fails as soon as the header is readable.
    let mut huge = BytesMut::from(
        &[
            0x81, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4,
        ][..],
    );
    let result = ws::FrameDecoder::new(ws::Role::Server, ws::MAX_PAYLOAD).decode(&mut huge);
    assert_eq!(result.err(), Some(ws::WsError::TooBig));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let (_, allocated) = decode_counting(&bytes);
        prop_assert!(allocated <= budget(bytes.len()));
        let _ = tcp::decode(&bytes, tcp::DEFAULT_MAX_BODY);
        let _ = ws::accept(&bytes, &mut BytesMut::new());
        let mut decoder = Decoder::new();
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = decoder.login_request(text);
            let _ = decoder.error_response(text);
        }
        for role in [ws::Role::Server, ws::Role::Client] {
            let mut src = BytesMut::from(&bytes[..]);
            let mut frames = ws::FrameDecoder::new(role, ws::MAX_PAYLOAD);
            while let Ok(Some(_)) = frames.decode(&mut src) {}
        }
    }

    #[test]
    fn mutated_messages_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut body = br#"{"bridge":false,"type":2,"dataContent":"Hello \u003c\"x\"","from":"alice","to":"bob","fp":"ef2adb06-fcf7-423d-9a08-90ccfa28533a","QoS":true,"typeu":7,"sm":-1}"#.to_vec();
        for (at, byte) in flips {
            let i = at.index(body.len());
            body[i] = byte;
        }
        let (_, allocated) = decode_counting(&body);
        prop_assert!(allocated <= budget(body.len()));
    }
}
