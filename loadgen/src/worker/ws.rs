//! The client side of the WebSocket transport (RFC 6455) on byte slices: the upgrade request and
//! the check of its `101` answer, the server's (unmasked) frames, and masked control frames.
//! Text frames out are `imedge_protocol::frame::ws::encode_message` with a mask.

use std::net::SocketAddr;
use std::ops::Range;

/// The upgrade key: any 16 random bytes in base64 will do for a load generator; this is RFC 6455
/// §1.3's example, whose accept value is known.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// `Sec-WebSocket-Accept` for [`KEY`] (RFC 6455 §1.3).
pub const ACCEPT: &[u8] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// Largest upgrade response accepted: the customary 8 KiB HTTP header limit.
pub const MAX_RESPONSE: usize = 8_192;

/// The upgrade request for `path` on `server`.
pub fn upgrade_request(server: SocketAddr, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// The state of the upgrade after reading `buf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// The response is not complete yet.
    Incomplete,
    /// `101` with the right accept key; the first `consumed` bytes were the response.
    Accepted {
        /// Length of the response head.
        consumed: usize,
    },
    /// Anything else.
    Refused,
}

/// Parses the server's answer to the upgrade.
pub fn handshake(buf: &[u8]) -> Handshake {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_RESPONSE {
            Handshake::Refused
        } else {
            Handshake::Incomplete
        };
    };
    let head = buf.get(..end).unwrap_or_default();
    let ok = head.starts_with(b"HTTP/1.1 101") && head.windows(ACCEPT.len()).any(|w| w == ACCEPT);
    if ok {
        Handshake::Accepted { consumed: end + 4 }
    } else {
        Handshake::Refused
    }
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A final text frame; the payload is at this range of the input.
    Text(Range<usize>),
    /// A ping with this payload range.
    Ping(Range<usize>),
    /// A pong.
    Pong,
    /// A close.
    Close,
}

/// A frame the client refuses (masked, fragmented, binary, reserved bits): the link is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

/// The frame at the front of `buf` and its total length; `Ok(None)` = incomplete.
pub fn parse_frame(buf: &[u8], max_payload: usize) -> Result<Option<(Frame, usize)>, Invalid> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    // Server frames are never masked (RFC 6455 §5.1); imedge sends each message as one final
    // frame without extensions.
    if b0 & 0x70 != 0 || b1 & 0x80 != 0 {
        return Err(Invalid);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    let (len, header) = match b1 & 0x7f {
        126 => match buf.get(2..4).and_then(|b| <[u8; 2]>::try_from(b).ok()) {
            Some(b) => (u64::from(u16::from_be_bytes(b)), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let len = usize::try_from(len).map_err(|_| Invalid)?;
    if len > max_payload {
        return Err(Invalid);
    }
    let total = header + len;
    if buf.len() < total {
        return Ok(None);
    }
    let payload = header..total;
    let frame = match opcode {
        0x1 if fin => Frame::Text(payload),
        0x8 => Frame::Close,
        0x9 => Frame::Ping(payload),
        0xA => Frame::Pong,
        _ => return Err(Invalid),
    };
    Ok(Some((frame, total)))
}

/// Appends a masked control frame (`0x8` close, `0xA` pong) with `payload` (≤ 125 bytes).
pub fn put_control(dst: &mut bytes::BytesMut, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let payload = payload.get(..125).unwrap_or(payload);
    dst.extend_from_slice(&[0x80 | opcode, 0x80 | payload.len() as u8]);
    dst.extend_from_slice(&mask);
    dst.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_states() {
        assert_eq!(handshake(b"HTTP/1.1 101 Switching"), Handshake::Incomplete);
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81";
        assert_eq!(
            handshake(ok),
            Handshake::Accepted {
                consumed: ok.len() - 1
            }
        );
        assert_eq!(
            handshake(b"HTTP/1.1 404 Not Found\r\n\r\n"),
            Handshake::Refused
        );
    }

    #[test]
    fn frames() {
        assert_eq!(parse_frame(b"\x81", 100), Ok(None));
        assert_eq!(parse_frame(b"\x81\x03ab", 100), Ok(None));
        assert_eq!(
            parse_frame(b"\x81\x03abcZ", 100),
            Ok(Some((Frame::Text(2..5), 5)))
        );
        let mut long = vec![0x81, 126, 0, 200];
        long.extend(std::iter::repeat_n(b'x', 200));
        assert_eq!(
            parse_frame(&long, 1000),
            Ok(Some((Frame::Text(4..204), 204)))
        );
        assert_eq!(parse_frame(&long, 100), Err(Invalid));
        assert_eq!(parse_frame(b"\x88\x00", 100), Ok(Some((Frame::Close, 2))));
        assert_eq!(parse_frame(b"\x81\x83abcd", 100), Err(Invalid), "masked");
        assert_eq!(parse_frame(b"\x82\x00", 100), Err(Invalid), "binary");
    }

    #[test]
    fn masked_control_frame() {
        let mut dst = bytes::BytesMut::new();
        put_control(&mut dst, 0x8, &[0x03, 0xe8], [1, 2, 3, 4]);
        assert_eq!(&dst[..], &[0x88, 0x82, 1, 2, 3, 4, 0x02, 0xea]);
    }
}
