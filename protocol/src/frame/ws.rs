//! WebSocket transport (SPEC §1.3): the HTTP upgrade and RFC 6455 text frames, one message each.
//!
//! The server side of MobileIMSDK's WebSocket gateway, driven over in-memory buffers. The RFC 6455
//! parts — request parsing and validation, the accept key, frame headers — are tungstenite's
//! codec; this module adds only what the reference does on top of it: the exact `101` bytes Netty
//! sends, the path check, the 65536-byte payload limit with its `1009` close, reassembly of
//! fragmented text messages, and framing a [`Message`] straight into the output buffer.
//!
//! * [`accept`] — one upgrade request → the `101` response, or an HTTP error response.
//! * [`FrameDecoder`] — frames → [`Unit`]s: text payloads (unmasked in place, zero copy for
//!   unfragmented frames), ping, pong, close; [`FrameDecoder::text_in_place`] unmasks a whole text
//!   frame where it lies in a plain byte slice (the server's provided receive buffers).
//! * [`encode_message`], [`encode_text`], [`encode_close`], [`encode_pong`] — frames out.

use std::io::Cursor;
use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tungstenite::error::{CapacityError, Error as TungsteniteError, ProtocolError};
use tungstenite::handshake::machine::TryParse;
use tungstenite::handshake::server::{create_response, Request};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::Message;

/// The only upgrade path: Netty's handshaker compares the whole request URI, so a query string
/// (`/websocket?x=1`) does not match (SPEC §1.3).
pub const PATH: &str = "/websocket";

/// Largest accepted message payload: Netty's default WebSocket frame limit (SPEC §1.3). A longer
/// frame — or fragmented message — is answered with close `1009` (`vectors/ws-oversize.jsonl`).
pub const MAX_PAYLOAD: usize = 65_536;

/// Largest upgrade request. Real upgrade requests are a few hundred bytes (the captured ones are
/// 273); 8 KiB is the customary HTTP header limit (nginx, Netty's `HttpObjectDecoder`), and bounds
/// the memory an unauthenticated peer can make us hold before the handshake completes.
pub const MAX_HANDSHAKE: usize = 8_192;

/// What the server sends whenever it closes a session: close 1000 "Bye" (SPEC §1.3).
pub const CLOSE_BYE: &[u8] = &[0x88, 0x05, 0x03, 0xe8, b'B', b'y', b'e'];

/// The reason Netty gives in its close 1009 after a frame longer than [`MAX_PAYLOAD`]
/// (`vectors/ws-oversize.jsonl`: `88 2e 03 f1 "Max frame length of 65536 has been exceeded."`).
pub const CLOSE_TOO_BIG_REASON: &str = "Max frame length of 65536 has been exceeded.";

/// RFC 6455 §5.5: "All control frames MUST have a payload length of 125 bytes or less".
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest frame header: 2 bytes, 8-byte extended length, 4-byte mask (RFC 6455 §5.2).
const MAX_HEADER: usize = 14;

/// A payload length that selects the 16-bit length form: [`encode_message`] reserves this header
/// size before it knows the length, since most messages are 126..=65535 bytes long.
const RESERVED_LENGTH_FORM: u64 = 126;

/// The `101` response exactly as the reference (Netty 4.1) sends it, up to the accept key.
const SWITCHING_PROTOCOLS: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: ";

/// The outcome of an upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Valid upgrade for [`PATH`]: the `101` response was appended to `dst`; `consumed` bytes of
    /// `src` were the request (anything after it is already WebSocket frames).
    Accepted { consumed: usize },
    /// Anything else: an HTTP error response was appended to `dst`; close after writing it.
    /// `404` for another path (including `/websocket?x=1`), `400` for a malformed or invalid
    /// upgrade, `431` when [`MAX_HANDSHAKE`] bytes arrive without a complete request (or it has
    /// too many headers). `consumed` is the request's length, or all of `src` when it has none.
    Rejected { consumed: usize, status: u16 },
}

/// Answers the upgrade request at the front of `src`. `None` = need more bytes (nothing written).
///
/// Deviation from the reference, on purpose: Netty leaves a request for another path unanswered
/// until the idle timeout (SPEC §13 R10); imedge answers `404` and closes.
pub fn accept(src: &[u8], dst: &mut BytesMut) -> Option<Handshake> {
    // Only the first MAX_HANDSHAKE bytes are looked at, so the outcome does not depend on how the
    // request was split into reads.
    let window = src.get(..MAX_HANDSHAKE).unwrap_or(src);
    let (consumed, request) = match Request::try_parse(window) {
        Ok(Some(parsed)) => parsed,
        Ok(None) if window.len() < MAX_HANDSHAKE => return None,
        Ok(None) | Err(TungsteniteError::Capacity(CapacityError::TooManyHeaders)) => {
            return Some(reject(431, src.len(), dst));
        }
        Err(_) => return Some(reject(400, src.len(), dst)),
    };
    // `Uri == &str` compares the whole request target, as Netty does: no query, no absolute form.
    if request.uri() != PATH {
        return Some(reject(404, consumed, dst));
    }
    let response = match create_response(&request) {
        Ok(response) => response,
        Err(TungsteniteError::Protocol(ProtocolError::MissingSecWebSocketVersionHeader)) => {
            // RFC 6455 §4.4: on a version we do not speak, "send an appropriate HTTP error code
            // [...] and a |Sec-WebSocket-Version| header field indicating the version(s) the
            // server is capable of understanding".
            dst.extend_from_slice(BAD_REQUEST);
            dst.extend_from_slice(b"sec-websocket-version: 13\r\n");
            return Some(close_response(400, consumed, dst));
        }
        Err(_) => return Some(reject(400, consumed, dst)),
    };
    // create_response always sets the accept key (tungstenite's `derive_accept_key` of the
    // request's `Sec-WebSocket-Key`); a missing one would be a tungstenite bug, answered as 400.
    let Some(accept_key) = response.headers().get("sec-websocket-accept") else {
        return Some(reject(400, consumed, dst));
    };
    dst.extend_from_slice(SWITCHING_PROTOCOLS);
    dst.extend_from_slice(accept_key.as_bytes());
    dst.extend_from_slice(b"\r\n\r\n");
    Some(Handshake::Accepted { consumed })
}

/// Status line of the `400` answer to a malformed or invalid upgrade.
const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\n";

/// Appends a bodyless HTTP error response that asks the client to close.
fn reject(status: u16, consumed: usize, dst: &mut BytesMut) -> Handshake {
    let status_line: &[u8] = match status {
        404 => b"HTTP/1.1 404 Not Found\r\n",
        431 => b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
        _ => BAD_REQUEST,
    };
    dst.extend_from_slice(status_line);
    close_response(status, consumed, dst)
}

/// Ends an error response begun in `dst`: no body, and the connection closes after it.
fn close_response(status: u16, consumed: usize, dst: &mut BytesMut) -> Handshake {
    dst.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n\r\n");
    Handshake::Rejected { consumed, status }
}

/// Which end of the connection decodes: the masking rule differs (RFC 6455 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Decodes client frames, which must be masked.
    Server,
    /// Decodes server frames, which must not be masked.
    Client,
}

/// One thing the peer said.
#[derive(Debug)]
pub enum Unit {
    /// One complete text message payload (reassembled if it was fragmented), unmasked in place.
    Text(BytesMut),
    /// A ping; answer with [`encode_pong`] and the same payload.
    Ping(Bytes),
    /// A pong (ignored by the reference).
    Pong,
    /// A close, with the peer's status code and reason if it gave one.
    Close(Option<(u16, String)>),
}

/// A frame error: the session is closed with [`WsError::close_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// The message payload exceeds the decoder's limit.
    #[error("WebSocket message larger than the payload limit")]
    TooBig,
    /// A binary frame: MobileIMSDK messages are text only (SPEC §1.3).
    #[error("binary WebSocket frames are not supported")]
    Binary,
    /// Anything else RFC 6455 forbids.
    #[error("WebSocket protocol violation")]
    Protocol,
}

impl WsError {
    /// The close status to send before closing (RFC 6455 §7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            WsError::TooBig => 1009,
            WsError::Binary => 1003,
            WsError::Protocol => 1002,
        }
    }
}

/// Incremental frame decoder for one connection.
#[derive(Debug)]
pub struct FrameDecoder {
    role: Role,
    max_payload: usize,
    /// The fragments received so far of an unfinished text message, already unmasked.
    partial: Option<BytesMut>,
}

impl FrameDecoder {
    /// A decoder for `role` that refuses messages longer than `max_payload` bytes.
    pub fn new(role: Role, max_payload: usize) -> Self {
        Self {
            role,
            max_payload,
            partial: None,
        }
    }

    /// Takes the next unit off the front of `src`. `Ok(None)` = incomplete: the incomplete frame
    /// is not consumed (complete fragments of an unfinished message move into the decoder).
    ///
    /// Checks run as soon as the frame header is readable, so an oversize frame fails before its
    /// payload arrives.
    ///
    /// # Errors
    ///
    /// [`WsError::TooBig`] for a message longer than the limit (also when fragmented),
    /// [`WsError::Binary`] for a binary frame, [`WsError::Protocol`] for reserved bits or opcodes,
    /// wrong masking for the role, fragmented or oversize control frames, a continuation without a
    /// start, a new message inside a fragmented one, or an invalid close body. The decoder's state
    /// is unspecified afterwards: close the session with [`WsError::close_code`].
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Unit>, WsError> {
        loop {
            let mut cursor = Cursor::new(&src[..]);
            let (header, length) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok(None),
                // Reserved opcodes (RFC 6455 §5.2: "MUST _Fail the WebSocket Connection_").
                Err(_) => return Err(WsError::Protocol),
            };
            let header_len = usize::try_from(cursor.position()).map_err(|_| WsError::Protocol)?;
            self.check(&header, length)?;
            // `check` bounded `length` by `max_payload` or MAX_CONTROL_PAYLOAD, both usizes.
            let length = usize::try_from(length).map_err(|_| WsError::TooBig)?;
            let Some(frame_len) = header_len.checked_add(length) else {
                return Err(WsError::TooBig);
            };
            if src.len() < frame_len {
                return Ok(None);
            }
            src.advance(header_len);
            let mut payload = src.split_to(length);
            if let Some(mask) = header.mask {
                apply_mask(&mut payload, mask);
            }
            match header.opcode {
                OpCode::Data(Data::Text) if header.is_final => {
                    return Ok(Some(Unit::Text(payload)))
                }
                OpCode::Data(Data::Text) => self.partial = Some(payload),
                OpCode::Data(Data::Continue) => {
                    let Some(mut message) = self.partial.take() else {
                        return Err(WsError::Protocol);
                    };
                    message.extend_from_slice(&payload);
                    if header.is_final {
                        return Ok(Some(Unit::Text(message)));
                    }
                    self.partial = Some(message);
                }
                OpCode::Control(Control::Ping) => return Ok(Some(Unit::Ping(payload.freeze()))),
                OpCode::Control(Control::Pong) => return Ok(Some(Unit::Pong)),
                OpCode::Control(Control::Close) => return close(&payload).map(Some),
                // Rejected by `check` (binary) and by `FrameHeader::parse` (reserved).
                OpCode::Data(Data::Binary | Data::Reserved(_))
                | OpCode::Control(Control::Reserved(_)) => return Err(WsError::Protocol),
            }
        }
    }

    /// The common case without a copy: if `src` starts with a whole, final text frame and no
    /// fragmented message is in progress, unmasks its payload where it lies and returns where the
    /// payload is and how long the frame is. Anything else — an incomplete frame, a control
    /// frame, a fragment, a frame [`FrameDecoder::decode`] would refuse — gives `None` and leaves
    /// `src` untouched: those bytes belong in the buffered path, where `decode` handles them (and
    /// reports the error, if any).
    pub fn text_in_place(&self, src: &mut [u8]) -> Option<(Range<usize>, usize)> {
        if self.partial.is_some() {
            return None;
        }
        let mut cursor = Cursor::new(&*src);
        let (header, length) = FrameHeader::parse(&mut cursor).ok()??;
        if !header.is_final || !matches!(header.opcode, OpCode::Data(Data::Text)) {
            return None;
        }
        self.check(&header, length).ok()?;
        let header_len = usize::try_from(cursor.position()).ok()?;
        let end = header_len.checked_add(usize::try_from(length).ok()?)?;
        let payload = src.get_mut(header_len..end)?;
        if let Some(mask) = header.mask {
            apply_mask(payload, mask);
        }
        Some((header_len..end, end))
    }

    /// Whether no fragmented message is being reassembled (so that the next frame may be taken
    /// with [`FrameDecoder::text_in_place`]).
    pub fn is_idle(&self) -> bool {
        self.partial.is_none()
    }

    /// Validates a frame header against RFC 6455, the role and the payload limit.
    fn check(&self, header: &FrameHeader, length: u64) -> Result<(), WsError> {
        // §5.2: "MUST be 0 unless an extension is negotiated" — we negotiate none.
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(WsError::Protocol);
        }
        // §5.1: "a client MUST mask all frames", "A server MUST NOT mask any frames".
        let masked_ok = match self.role {
            Role::Server => header.mask.is_some(),
            Role::Client => header.mask.is_none(),
        };
        if !masked_ok {
            return Err(WsError::Protocol);
        }
        let buffered = match header.opcode {
            OpCode::Control(_) => {
                // §5.5: "All control frames MUST have a payload length of 125 bytes or less and
                // MUST NOT be fragmented."
                if !header.is_final || length > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(WsError::Protocol);
                }
                return Ok(());
            }
            OpCode::Data(Data::Binary) => return Err(WsError::Binary),
            // §5.4: the fragments of one message are not interleaved with another message.
            OpCode::Data(Data::Text) if self.partial.is_some() => return Err(WsError::Protocol),
            OpCode::Data(Data::Text) => 0,
            OpCode::Data(Data::Continue) => match &self.partial {
                Some(message) => message.len(),
                None => return Err(WsError::Protocol),
            },
            OpCode::Data(Data::Reserved(_)) => return Err(WsError::Protocol),
        };
        // The limit is on the whole message, so fragmenting does not get around it.
        let total = u64::try_from(buffered).map_or(u64::MAX, |b| b.saturating_add(length));
        if total > u64::try_from(self.max_payload).unwrap_or(u64::MAX) {
            return Err(WsError::TooBig);
        }
        Ok(())
    }
}

/// The body of a close frame (RFC 6455 §5.5.1): nothing, or a status code and a UTF-8 reason.
fn close(payload: &[u8]) -> Result<Unit, WsError> {
    match payload {
        [] => Ok(Unit::Close(None)),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // §7.4: codes such as 1005/1006 "MUST NOT be set as a status code in a Close".
            if !CloseCode::from(code).is_allowed() {
                return Err(WsError::Protocol);
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::Protocol)?;
            Ok(Unit::Close(Some((code, reason.to_owned()))))
        }
        [_] => Err(WsError::Protocol),
    }
}

/// XORs `buf` with the 4-byte masking key (RFC 6455 §5.3); masking and unmasking are the same.
/// Local because tungstenite's `apply_mask` is private.
fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    // Whole 16-byte blocks against a repeated key compile to vector XORs; 16 is a multiple of 4,
    // so every block starts at key offset 0.
    const BLOCK: usize = 16;
    let mut key = [0u8; BLOCK];
    for (k, m) in key.iter_mut().zip(mask.iter().cycle()) {
        *k = *m;
    }
    let mut blocks = buf.chunks_exact_mut(BLOCK);
    for block in &mut blocks {
        for (b, k) in block.iter_mut().zip(key) {
            *b ^= k;
        }
    }
    for (b, k) in blocks.into_remainder().iter_mut().zip(key) {
        *b ^= k;
    }
}

/// Appends one final text frame carrying `msg`'s JSON: unmasked when `mask` is `None` (server),
/// masked with the given key otherwise (client).
///
/// The JSON is written straight into `dst` behind a reserved 16-bit-length header, which is then
/// filled in; the rarer 7-bit and 64-bit forms move the payload by 2 or 6 bytes, so the output is
/// the shortest form, as any standard encoder produces.
pub fn encode_message(msg: &Message<'_>, mask: Option<[u8; 4]>, dst: &mut BytesMut) {
    let header = text_header(mask);
    let start = dst.len();
    let reserved = header.len(RESERVED_LENGTH_FORM);
    dst.put_bytes(0, reserved);
    msg.encode(dst);
    let length = dst.len() - start - reserved;

    let mut head = [0u8; MAX_HEADER];
    let head_len = format_header(&header, length, &mut head);
    let payload_at = start + head_len;
    if head_len < reserved {
        dst.copy_within(start + reserved.., payload_at);
        dst.truncate(payload_at + length);
    } else if head_len > reserved {
        dst.put_bytes(0, head_len - reserved);
        dst.copy_within(start + reserved..start + reserved + length, payload_at);
    }
    if let (Some(slot), Some(head)) = (dst.get_mut(start..payload_at), head.get(..head_len)) {
        slot.copy_from_slice(head);
    }
    if let (Some(mask), Some(payload)) = (mask, dst.get_mut(payload_at..)) {
        apply_mask(payload, mask);
    }
}

/// Appends one final text frame carrying `payload`, masked with `mask` if given (client).
pub fn encode_text(payload: &[u8], mask: Option<[u8; 4]>, dst: &mut BytesMut) {
    put_frame(&text_header(mask), payload, dst);
}

/// Appends an unmasked (server) close frame with `code` and `reason`; a reason longer than a
/// control frame can carry is cut at a character boundary.
pub fn encode_close(code: u16, reason: &str, dst: &mut BytesMut) {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = reason.get(..cut).unwrap_or_default();
    let header = control_header(Control::Close);
    let payload_len = 2 + reason.len();
    put_header(&header, payload_len, dst);
    dst.put_u16(code);
    dst.extend_from_slice(reason.as_bytes());
}

/// Appends an unmasked (server) pong echoing `payload` (at most 125 bytes are sent).
pub fn encode_pong(payload: &[u8], dst: &mut BytesMut) {
    let payload = payload.get(..MAX_CONTROL_PAYLOAD).unwrap_or(payload);
    put_frame(&control_header(Control::Pong), payload, dst);
}

fn text_header(mask: Option<[u8; 4]>) -> FrameHeader {
    FrameHeader {
        opcode: OpCode::Data(Data::Text),
        mask,
        ..FrameHeader::default()
    }
}

fn control_header(control: Control) -> FrameHeader {
    FrameHeader {
        opcode: OpCode::Control(control),
        ..FrameHeader::default()
    }
}

/// Appends header and payload, masking the payload if the header has a key.
fn put_frame(header: &FrameHeader, payload: &[u8], dst: &mut BytesMut) {
    put_header(header, payload.len(), dst);
    let at = dst.len();
    dst.extend_from_slice(payload);
    if let (Some(mask), Some(appended)) = (header.mask, dst.get_mut(at..)) {
        apply_mask(appended, mask);
    }
}

fn put_header(header: &FrameHeader, length: usize, dst: &mut BytesMut) {
    let mut head = [0u8; MAX_HEADER];
    let head_len = format_header(header, length, &mut head);
    dst.extend_from_slice(head.get(..head_len).unwrap_or_default());
}

/// tungstenite's header encoder into a stack buffer; returns the header length.
fn format_header(header: &FrameHeader, length: usize, head: &mut [u8; MAX_HEADER]) -> usize {
    let length = length as u64; // usize is at most 64 bits
    let mut out = &mut head[..];
    // Cannot fail: it writes at most MAX_HEADER bytes into a MAX_HEADER-byte slice.
    let written = header.format(length, &mut out);
    debug_assert!(written.is_ok(), "frame header exceeds {MAX_HEADER} bytes");
    header.len(length)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UserId;

    /// Upgrade request and response from `vectors/ws-c2c-duplicate.jsonl` (Python websockets
    /// client offering permessage-deflate, which the reference ignores).
    const REQUEST: &[u8] =
        b"GET /websocket HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: E6jRgVmOtczYFfv/545Clw==\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
User-Agent: Python/3.11 websockets/17.4\r\n\r\n";
    const RESPONSE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
connection: upgrade\r\nsec-websocket-accept: +6tYKrzaQfy60hPtHn9WmTFIAjc=\r\n\r\n";

    /// The close 1009 Netty sent after a 65537-byte frame (`vectors/ws-oversize.jsonl`).
    const CLOSE_TOO_BIG: &[u8] = b"\x88\x2e\x03\xf1Max frame length of 65536 has been exceeded.";

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn request_for(target: &str) -> Vec<u8> {
        let text = String::from_utf8(REQUEST.to_vec()).unwrap();
        text.replacen("/websocket", target, 1).into_bytes()
    }

    /// A client frame as a client would send it.
    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> BytesMut {
        let mut frame = BytesMut::new();
        let len = payload.len();
        frame.put_u8(if fin { 0x80 } else { 0 } | opcode);
        if len < 126 {
            frame.put_u8(0x80 | len as u8);
        } else if len <= 0xffff {
            frame.put_u8(0x80 | 126);
            frame.put_u16(len as u16);
        } else {
            frame.put_u8(0x80 | 127);
            frame.put_u64(len as u64);
        }
        frame.extend_from_slice(&MASK);
        frame.extend(payload.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m));
        frame
    }

    fn server() -> FrameDecoder {
        FrameDecoder::new(Role::Server, MAX_PAYLOAD)
    }

    fn text(unit: Option<Unit>) -> Vec<u8> {
        match unit {
            Some(Unit::Text(payload)) => payload.to_vec(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn handshake_accepted_byte_for_byte() {
        let mut src = REQUEST.to_vec();
        src.extend_from_slice(b"\x81\x85"); // the first frame may follow in the same read
        let mut dst = BytesMut::new();
        assert_eq!(
            accept(&src, &mut dst),
            Some(Handshake::Accepted {
                consumed: REQUEST.len()
            })
        );
        assert_eq!(&dst[..], RESPONSE);
        let key = tungstenite::handshake::derive_accept_key(b"E6jRgVmOtczYFfv/545Clw==");
        assert_eq!(key, "+6tYKrzaQfy60hPtHn9WmTFIAjc=");
    }

    #[test]
    fn handshake_incomplete_writes_nothing() {
        let mut dst = BytesMut::new();
        for cut in [0, 1, 20, REQUEST.len() - 1] {
            assert_eq!(accept(&REQUEST[..cut], &mut dst), None);
        }
        assert!(dst.is_empty());
    }

    #[test]
    fn handshake_other_path_is_404() {
        for target in ["/other", "/websocket?x=1", "/websocket/", "/WebSocket"] {
            let request = request_for(target);
            let mut dst = BytesMut::new();
            let outcome = accept(&request, &mut dst);
            let consumed = request.len();
            assert_eq!(
                outcome,
                Some(Handshake::Rejected {
                    consumed,
                    status: 404
                }),
                "{target}"
            );
            assert_eq!(
                &dst[..],
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    }

    #[test]
    fn handshake_invalid_upgrade_is_400() {
        let cases: [&[u8]; 4] = [
            b"GET /websocket HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /websocket HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: E6jRgVmOtczYFfv/545Clw==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            b"GET /websocket HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello on the plain port",
        ];
        for request in cases {
            let mut dst = BytesMut::new();
            let Some(Handshake::Rejected { status: 400, .. }) = accept(request, &mut dst) else {
                panic!("{:?}", String::from_utf8_lossy(request));
            };
            assert!(dst.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
        }
    }

    #[test]
    fn handshake_wrong_version_is_400_with_our_version() {
        let request = String::from_utf8(REQUEST.to_vec())
            .unwrap()
            .replace("Version: 13", "Version: 8");
        let mut dst = BytesMut::new();
        let outcome = accept(request.as_bytes(), &mut dst);
        let consumed = request.len();
        assert_eq!(
            outcome,
            Some(Handshake::Rejected {
                consumed,
                status: 400
            })
        );
        assert_eq!(
            &dst[..],
            b"HTTP/1.1 400 Bad Request\r\nsec-websocket-version: 13\r\n\
content-length: 0\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn handshake_oversize_is_431() {
        let mut request = b"GET /websocket HTTP/1.1\r\nX-Padding: ".to_vec();
        request.resize(MAX_HANDSHAKE - 1, b'a');
        let mut dst = BytesMut::new();
        assert_eq!(accept(&request, &mut dst), None);
        request.push(b'a');
        let outcome = accept(&request, &mut dst);
        assert_eq!(
            outcome,
            Some(Handshake::Rejected {
                consumed: MAX_HANDSHAKE,
                status: 431
            })
        );
        assert!(dst.starts_with(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"));

        // Also when the oversize request is complete and arrives in one read.
        request.extend_from_slice(b"\r\n\r\n");
        let mut dst = BytesMut::new();
        let Some(Handshake::Rejected { status: 431, .. }) = accept(&request, &mut dst) else {
            panic!("complete oversize request accepted");
        };
    }

    #[test]
    fn masked_text_frame_decoded_in_place() {
        // From the RFC 6455 §5.7 examples: a masked "Hello".
        let mut src = BytesMut::from(&b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58\x81"[..]);
        let mut decoder = server();
        assert_eq!(text(decoder.decode(&mut src).unwrap()), b"Hello");
        assert_eq!(&src[..], b"\x81", "the next frame's first byte stays");
        assert!(decoder.decode(&mut src).unwrap().is_none());
        assert_eq!(&src[..], b"\x81");
    }

    #[test]
    fn whole_text_frames_are_unmasked_where_they_lie() {
        let mut src = masked(0x1, true, b"{\"type\":1}").to_vec();
        let first = src.len();
        src.extend_from_slice(&masked(0x1, true, &[b'x'; 300]));
        let decoder = server();
        let (body, len) = decoder.text_in_place(&mut src).unwrap();
        assert_eq!(len, first);
        assert_eq!(&src[body], b"{\"type\":1}");
        let rest = &mut src[first..];
        let (body, len) = decoder.text_in_place(rest).unwrap();
        assert_eq!(len, rest.len(), "a 16-bit length frame");
        assert_eq!(&rest[body], &[b'x'; 300][..]);
    }

    #[test]
    fn in_place_leaves_everything_else_untouched() {
        let decoder = server();
        let frame = masked(0x1, true, b"{\"type\":1}");
        let cases = [
            frame[..frame.len() - 1].to_vec(),   // incomplete
            masked(0x9, true, b"ping").to_vec(), // control
            masked(0x1, false, b"{").to_vec(),   // first fragment
            masked(0x2, true, b"bin").to_vec(),  // binary: decode reports it
            {
                let mut unmasked = frame.to_vec(); // no mask from a client: decode reports it
                unmasked[1] &= 0x7f;
                unmasked
            },
        ];
        for case in cases {
            let mut src = case.clone();
            assert!(decoder.text_in_place(&mut src).is_none(), "{case:?}");
            assert_eq!(src, case);
        }
        // While a fragmented message is in progress, whole frames go through `decode` too.
        let mut decoder = server();
        let mut src = masked(0x1, false, b"{");
        assert!(decoder.decode(&mut src).unwrap().is_none());
        assert!(!decoder.is_idle());
        let mut src = frame.to_vec();
        assert!(decoder.text_in_place(&mut src).is_none());
    }

    #[test]
    fn incomplete_frame_consumes_nothing() {
        let frame = masked(0x1, true, b"{\"type\":1}");
        for cut in 0..frame.len() {
            let mut src = BytesMut::from(&frame[..cut]);
            assert!(server().decode(&mut src).unwrap().is_none(), "cut {cut}");
            assert_eq!(src.len(), cut);
        }
    }

    #[test]
    fn extended_lengths() {
        for len in [125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut src = masked(0x1, true, &payload);
            assert_eq!(
                text(server().decode(&mut src).unwrap()),
                payload,
                "len {len}"
            );
            assert!(src.is_empty());
        }
        // The 64-bit form is legal for a short payload too (not the shortest form, but allowed).
        let mut src = BytesMut::from(&b"\x81\xff\0\0\0\0\0\0\0\x02\0\0\0\0hi"[..]);
        assert_eq!(text(server().decode(&mut src).unwrap()), b"hi");
    }

    #[test]
    fn limit_accepts_65536_and_rejects_65537_from_the_header() {
        let mut src = masked(0x1, true, &vec![b'x'; MAX_PAYLOAD]);
        assert_eq!(text(server().decode(&mut src).unwrap()).len(), MAX_PAYLOAD);

        // Header only: 64-bit length 65537 and the mask, no payload yet.
        let mut src = BytesMut::from(&b"\x81\xff\0\0\0\0\0\x01\0\x01\x37\xfa\x21\x3d"[..]);
        assert_eq!(server().decode(&mut src).unwrap_err(), WsError::TooBig);
        assert_eq!(WsError::TooBig.close_code(), 1009);
        // A length with the most significant bit set (RFC 6455 forbids it) is just too big.
        let mut src =
            BytesMut::from(&b"\x81\xff\xff\xff\xff\xff\xff\xff\xff\xff\x37\xfa\x21\x3d"[..]);
        assert_eq!(server().decode(&mut src).unwrap_err(), WsError::TooBig);
    }

    #[test]
    fn fragmented_text_reassembled_with_control_frames_between() {
        let mut src = masked(0x1, false, b"{\"bridge\":");
        src.extend_from_slice(&masked(0x9, true, b"ping?"));
        src.extend_from_slice(&masked(0x0, false, b"false,"));
        src.extend_from_slice(&masked(0x0, true, b"\"type\":1}"));
        let mut decoder = server();
        let Some(Unit::Ping(ping)) = decoder.decode(&mut src).unwrap() else {
            panic!()
        };
        assert_eq!(&ping[..], b"ping?");
        assert_eq!(
            text(decoder.decode(&mut src).unwrap()),
            b"{\"bridge\":false,\"type\":1}"
        );
        assert!(src.is_empty());
    }

    #[test]
    fn fragmented_message_limit_is_on_the_whole_message() {
        let mut decoder = FrameDecoder::new(Role::Server, 10);
        let mut src = masked(0x1, false, b"123456");
        src.extend_from_slice(&masked(0x0, true, b"12345"));
        assert_eq!(decoder.decode(&mut src).unwrap_err(), WsError::TooBig);
    }

    #[test]
    fn fragment_order_violations() {
        let mut src = masked(0x0, true, b"orphan");
        assert_eq!(server().decode(&mut src).unwrap_err(), WsError::Protocol);

        let mut src = masked(0x1, false, b"one");
        src.extend_from_slice(&masked(0x1, true, b"two"));
        assert_eq!(server().decode(&mut src).unwrap_err(), WsError::Protocol);
    }

    #[test]
    fn ping_pong_close() {
        let mut src = masked(0x9, true, b"");
        src.extend_from_slice(&masked(0xa, true, b"any"));
        src.extend_from_slice(&masked(0x8, true, b"\x03\xe8Bye"));
        src.extend_from_slice(&masked(0x8, true, b""));
        let mut decoder = server();
        let Some(Unit::Ping(ping)) = decoder.decode(&mut src).unwrap() else {
            panic!()
        };
        assert!(ping.is_empty());
        assert!(matches!(
            decoder.decode(&mut src).unwrap(),
            Some(Unit::Pong)
        ));
        let Some(Unit::Close(close)) = decoder.decode(&mut src).unwrap() else {
            panic!()
        };
        assert_eq!(close, Some((1000, "Bye".to_owned())));
        assert!(matches!(
            decoder.decode(&mut src).unwrap(),
            Some(Unit::Close(None))
        ));

        let mut pong = BytesMut::new();
        encode_pong(b"ping?", &mut pong);
        assert_eq!(&pong[..], b"\x8a\x05ping?");
    }

    #[test]
    fn invalid_control_frames() {
        for frame in [
            masked(0x9, false, b""),            // fragmented control frame
            masked(0x9, true, &[b'p'; 126]),    // control payload over 125
            masked(0x8, true, b"\x03"),         // close with half a code
            masked(0x8, true, b"\x03\xed"),     // 1005 may not be sent
            masked(0x8, true, b"\x03\xe8\xff"), // reason not UTF-8
        ] {
            let mut src = frame;
            assert_eq!(server().decode(&mut src).unwrap_err(), WsError::Protocol);
        }
    }

    #[test]
    fn binary_frame_rejected() {
        let mut src = masked(0x2, true, b"\x00\x01");
        let err = server().decode(&mut src).unwrap_err();
        assert_eq!(err, WsError::Binary);
        assert_eq!(err.close_code(), 1003);
    }

    #[test]
    fn header_violations_are_protocol_errors() {
        let mut with_rsv1 = masked(0x1, true, b"x");
        with_rsv1[0] |= 0x40; // permessage-deflate was never negotiated
        let reserved_opcode = masked(0x3, true, b"x");
        let reserved_control = masked(0xb, true, b"x");
        let unmasked = BytesMut::from(&b"\x81\x05Hello"[..]);
        for mut src in [with_rsv1, reserved_opcode, reserved_control, unmasked] {
            let err = server().decode(&mut src).unwrap_err();
            assert_eq!(err, WsError::Protocol);
            assert_eq!(err.close_code(), 1002);
        }
        // And the other way round: a client refuses masked server frames.
        let mut src = masked(0x1, true, b"x");
        let err = FrameDecoder::new(Role::Client, MAX_PAYLOAD)
            .decode(&mut src)
            .unwrap_err();
        assert_eq!(err, WsError::Protocol);
    }

    #[test]
    fn encode_message_round_trips_in_both_roles_and_all_length_forms() {
        for text_len in [0, 10, 200, 70_000] {
            let msg = Message::data(
                UserId::new("alice"),
                UserId::new("bob"),
                "é".repeat(text_len / 2),
                None,
            );
            let json = msg.to_json();
            // Server → client: unmasked, same bytes as encode_text.
            let mut framed = BytesMut::from(&b"prefix"[..]);
            encode_message(&msg, None, &mut framed);
            let mut expected = BytesMut::from(&b"prefix"[..]);
            encode_text(&json, None, &mut expected);
            assert_eq!(framed, expected, "len {}", json.len());
            let mut src = framed.split_off(6);
            let mut client = FrameDecoder::new(Role::Client, usize::MAX);
            assert_eq!(text(client.decode(&mut src).unwrap()), json);
            assert!(src.is_empty());

            // Client → server: masked.
            let mut framed = BytesMut::new();
            encode_message(&msg, Some(MASK), &mut framed);
            let mut expected = BytesMut::new();
            encode_text(&json, Some(MASK), &mut expected);
            assert_eq!(framed, expected);
            assert_eq!(&framed[..], &masked(0x1, true, &json)[..]);
            let mut server = FrameDecoder::new(Role::Server, usize::MAX);
            assert_eq!(text(server.decode(&mut framed).unwrap()), json);
            assert!(framed.is_empty());
        }
    }

    #[test]
    fn encode_message_matches_the_reference() {
        // ws-oversize.jsonl, s2c keep-alive response: 100-byte payload, 7-bit length.
        let mut framed = BytesMut::new();
        encode_message(
            &Message::keep_alive_response(UserId::new("alice")),
            None,
            &mut framed,
        );
        let mut expected = b"\x81\x64".to_vec();
        expected.extend_from_slice(
            b"{\"bridge\":false,\"type\":51,\"dataContent\":\"{}\",\"from\":\"0\",\"to\":\"alice\",\
\"QoS\":false,\"typeu\":-1,\"sm\":-1}",
        );
        assert_eq!(&framed[..], &expected[..]);
    }

    #[test]
    fn encode_close_matches_the_reference() {
        let mut bye = BytesMut::new();
        encode_close(1000, "Bye", &mut bye);
        assert_eq!(&bye[..], CLOSE_BYE);

        let mut too_big = BytesMut::new();
        encode_close(
            WsError::TooBig.close_code(),
            CLOSE_TOO_BIG_REASON,
            &mut too_big,
        );
        assert_eq!(&too_big[..], CLOSE_TOO_BIG);

        // A client decodes what we send.
        let mut src = too_big;
        let Some(Unit::Close(close)) = FrameDecoder::new(Role::Client, MAX_PAYLOAD)
            .decode(&mut src)
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(close, Some((1009, CLOSE_TOO_BIG_REASON.to_owned())));

        // An over-long reason is cut to fit a control frame, on a character boundary.
        let mut long = BytesMut::new();
        encode_close(1000, &"é".repeat(100), &mut long);
        assert_eq!(long[1] as usize, 2 + 122);
        let mut src = long;
        assert!(FrameDecoder::new(Role::Client, MAX_PAYLOAD)
            .decode(&mut src)
            .is_ok());
    }

    proptest::proptest! {
        /// Whatever a peer sends, nothing panics and the limits hold.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut response = BytesMut::new();
            if let Some(Handshake::Accepted { consumed } | Handshake::Rejected { consumed, .. }) =
                accept(&bytes, &mut response)
            {
                proptest::prop_assert!(consumed <= bytes.len());
            }
            for role in [Role::Server, Role::Client] {
                let mut decoder = FrameDecoder::new(role, 64);
                let mut src = BytesMut::from(&bytes[..]);
                while let Ok(Some(unit)) = decoder.decode(&mut src) {
                    if let Unit::Text(payload) = unit {
                        proptest::prop_assert!(payload.len() <= 64);
                    }
                }
            }
        }
    }
}
