//! TCP framing: a 4-byte big-endian length prefix, then that many bytes of JSON (SPEC §1.1).
//!
//! The decoder is incremental: it consumes nothing until a whole frame is buffered, and rejects
//! an oversize frame as soon as its prefix is readable — before the body arrives, so a peer
//! cannot make us buffer more than `max_body` bytes (the reference's fail-fast rule).

use bytes::{BufMut, BytesMut};

use crate::Message;

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// Largest body the reference accepts (`GatewayTCP.TCP_FRAME_MAX_BODY_LENGTH`, SPEC §1.1); the
/// Java SDK uses the same limit for frames it receives, so we never send larger ones either.
pub const DEFAULT_MAX_BODY: usize = 6144;

/// A frame whose prefix announces more than the allowed body. The reference closes the
/// connection without a reply (`vectors/tcp-oversize.jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame body of {len} bytes exceeds the limit of {max}")]
pub struct TooLarge {
    /// What the prefix announced.
    pub len: u64,
    /// The configured maximum.
    pub max: usize,
}

/// Length of the body of the complete frame at the start of `src`, or `Ok(None)` if `src` does
/// not hold a whole frame yet. The frame occupies `src[..PREFIX_LEN + body_len]`.
pub fn decode(src: &[u8], max_body: usize) -> Result<Option<usize>, TooLarge> {
    let Some(prefix) = src.first_chunk::<PREFIX_LEN>() else {
        return Ok(None);
    };
    let announced = u32::from_be_bytes(*prefix);
    let len = usize::try_from(announced)
        .ok()
        .filter(|&len| len <= max_body)
        .ok_or(TooLarge {
            len: announced.into(),
            max: max_body,
        })?;
    // `first_chunk` succeeded, so `src.len() >= PREFIX_LEN`: the subtraction cannot wrap.
    Ok((src.len() - PREFIX_LEN >= len).then_some(len))
}

/// Splits the next complete frame off the front of `src` and returns its body, or `Ok(None)`
/// (nothing consumed) if it is not all there. The body is a view of the same allocation: the
/// message decoder then parses it in place.
pub fn split_frame(src: &mut BytesMut, max_body: usize) -> Result<Option<BytesMut>, TooLarge> {
    let Some(len) = decode(src, max_body)? else {
        return Ok(None);
    };
    let mut frame = src.split_to(PREFIX_LEN + len);
    let _prefix = frame.split_to(PREFIX_LEN);
    Ok(Some(frame))
}

/// Appends `msg` as one frame: the JSON is written straight after a placeholder prefix, which is
/// then patched with the body length.
pub fn encode(msg: &Message<'_>, dst: &mut BytesMut) {
    let start = dst.len();
    dst.put_u32(0);
    msg.encode(dst);
    patch_prefix(dst, start);
}

/// Appends an already encoded body as one frame.
pub fn encode_body(body: &[u8], dst: &mut BytesMut) {
    // Bodies come from our own encoder and are bounded by the transport limits (≪ 4 GiB).
    dst.put_u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
    dst.put_slice(body);
}

fn patch_prefix(dst: &mut BytesMut, start: usize) {
    let body_len = dst.len() - start - PREFIX_LEN;
    let prefix = u32::try_from(body_len).unwrap_or(u32::MAX).to_be_bytes();
    if let Some(slot) = dst.get_mut(start..start + PREFIX_LEN) {
        slot.copy_from_slice(&prefix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UserId;

    #[test]
    fn needs_the_whole_frame() {
        assert_eq!(decode(b"", 10), Ok(None));
        assert_eq!(decode(b"\0\0\0", 10), Ok(None));
        assert_eq!(decode(b"\0\0\0\x02{", 10), Ok(None));
        assert_eq!(decode(b"\0\0\0\x02{}", 10), Ok(Some(2)));
        assert_eq!(decode(b"\0\0\0\x02{}\0\0", 10), Ok(Some(2)));
        assert_eq!(decode(b"\0\0\0\0", 10), Ok(Some(0)));
    }

    #[test]
    fn oversize_fails_on_the_prefix_alone() {
        assert_eq!(decode(b"\0\0\x18\x00", DEFAULT_MAX_BODY), Ok(None)); // 6144: wait for body
        assert_eq!(
            decode(b"\0\0\x18\x01", DEFAULT_MAX_BODY),
            Err(TooLarge {
                len: 6145,
                max: DEFAULT_MAX_BODY
            })
        );
        assert_eq!(
            decode(b"\xff\xff\xff\xff", DEFAULT_MAX_BODY),
            Err(TooLarge {
                len: u64::from(u32::MAX),
                max: DEFAULT_MAX_BODY
            })
        );
    }

    #[test]
    fn split_and_encode_round_trip() {
        let msg = Message::keep_alive(UserId::new("alice"));
        let mut buf = BytesMut::new();
        encode(&msg, &mut buf);
        encode(&msg, &mut buf);
        let json = msg.to_json();
        assert_eq!(buf.len(), 2 * (PREFIX_LEN + json.len()));
        let first = split_frame(&mut buf, DEFAULT_MAX_BODY).unwrap().unwrap();
        assert_eq!(&first[..], &json[..]);
        buf.truncate(buf.len() - 1);
        let partial = buf.clone();
        assert_eq!(split_frame(&mut buf, DEFAULT_MAX_BODY), Ok(None));
        assert_eq!(buf, partial, "an incomplete frame is not consumed");
        let mut framed = BytesMut::new();
        encode_body(&json, &mut framed);
        assert_eq!(&framed[..PREFIX_LEN], &(json.len() as u32).to_be_bytes());
    }
}
