//! Wire format of the echo benchmark. TCP: a 4-byte big-endian body length, then the body (what
//! imedge's TCP framing uses). UDP: one datagram is one body. Every body the client sends starts
//! with a [`Stamp`] (frame id and intended send time), padded with zeros to the chosen size, so an
//! echoed frame tells which message it answers and when that message was due.

/// Bytes of the TCP length prefix.
pub const LEN_PREFIX: usize = 4;

/// Largest TCP body the echo servers take: imedge's TCP frame limit (its decoder rejects larger
/// bodies and closes the connection), so that all servers accept the same frames.
pub const MAX_TCP_BODY: usize = 6144;

/// Largest UDP datagram the echo servers return: imedge's UDP receive buffer size.
pub const MAX_UDP_DATAGRAM: usize = 2048;

/// Bytes of a [`Stamp`] at the start of a body: frame id (u64) and intended send time (u64).
pub const STAMP_LEN: usize = 16;

/// Frames per benchmark message: the message itself and its QoS ACK (a C2C message with QoS is
/// two frames each way).
pub const FRAMES_PER_MESSAGE: u64 = 2;

/// What a body carries: which frame it is and when its message was meant to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// `message * FRAMES_PER_MESSAGE + part`.
    pub id: u64,
    /// The message's intended send time, nanoseconds since the run's clock origin.
    pub intended_ns: u64,
}

impl Stamp {
    /// The stamp of frame `part` of message `message`.
    pub fn new(message: u64, part: u64, intended_ns: u64) -> Self {
        Self {
            id: message * FRAMES_PER_MESSAGE + part,
            intended_ns,
        }
    }

    /// The message this frame belongs to.
    pub fn message(self) -> u64 {
        self.id / FRAMES_PER_MESSAGE
    }
}

/// A TCP frame announced a body larger than [`MAX_TCP_BODY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooLarge(pub usize);

impl std::fmt::Display for FrameTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "frame body of {} bytes exceeds {MAX_TCP_BODY}", self.0)
    }
}

impl std::error::Error for FrameTooLarge {}

/// Appends a body of `size` bytes (at least [`STAMP_LEN`]; shorter sizes are raised to it).
pub fn put_body(stamp: Stamp, size: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(&stamp.id.to_be_bytes());
    out.extend_from_slice(&stamp.intended_ns.to_be_bytes());
    out.resize(out.len() + size.saturating_sub(STAMP_LEN), 0);
}

/// Appends a TCP frame: the length prefix, then a body of `size` bytes.
pub fn put_frame(stamp: Stamp, size: usize, out: &mut Vec<u8>) {
    let body = size.max(STAMP_LEN);
    // Sizes are checked against MAX_TCP_BODY by the caller; u32 holds any of them.
    out.extend_from_slice(&u32::try_from(body).unwrap_or(u32::MAX).to_be_bytes());
    put_body(stamp, body, out);
}

/// The stamp at the start of a body, or `None` if the body is too short to hold one.
pub fn stamp(body: &[u8]) -> Option<Stamp> {
    let id = body.get(..8)?.try_into().ok().map(u64::from_be_bytes)?;
    let intended_ns = body
        .get(8..STAMP_LEN)?
        .try_into()
        .ok()
        .map(u64::from_be_bytes)?;
    Some(Stamp { id, intended_ns })
}

/// The first whole TCP frame in `buf`: `Ok(Some((body, consumed)))`, `Ok(None)` if more bytes
/// are needed (nothing is consumed), or an error for an oversized frame.
pub fn next_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameTooLarge> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let mut len = [0u8; LEN_PREFIX];
    len.copy_from_slice(prefix);
    let body_len = u32::from_be_bytes(len) as usize;
    if body_len > MAX_TCP_BODY {
        return Err(FrameTooLarge(body_len));
    }
    let end = LEN_PREFIX + body_len;
    Ok(buf.get(LEN_PREFIX..end).map(|body| (body, end)))
}

/// Length of the whole TCP frames at the front of `buf` (what an echo server can send back now).
pub fn whole_frames_len(buf: &[u8]) -> Result<usize, FrameTooLarge> {
    let mut done = 0;
    while let Some((_, used)) = next_frame(buf.get(done..).unwrap_or_default())? {
        done += used;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let mut buf = Vec::new();
        put_frame(Stamp::new(7, 1, 123_456), 100, &mut buf);
        assert_eq!(buf.len(), LEN_PREFIX + 100);
        let (body, used) = next_frame(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        let s = stamp(body).unwrap();
        assert_eq!(
            s,
            Stamp {
                id: 15,
                intended_ns: 123_456
            }
        );
        assert_eq!(s.message(), 7);
    }

    #[test]
    fn partial_frames_wait() {
        let mut buf = Vec::new();
        put_frame(Stamp::new(1, 0, 5), 20, &mut buf);
        put_frame(Stamp::new(1, 1, 5), 20, &mut buf);
        let whole = buf.len();
        put_frame(Stamp::new(2, 0, 9), 20, &mut buf);
        buf.truncate(buf.len() - 3);
        assert_eq!(whole_frames_len(&buf), Ok(whole));
        assert_eq!(next_frame(&buf[..3]), Ok(None));
        assert_eq!(whole_frames_len(&[]), Ok(0));
    }

    #[test]
    fn oversized_and_short_bodies() {
        let big = u32::try_from(MAX_TCP_BODY + 1).unwrap().to_be_bytes();
        assert_eq!(next_frame(&big), Err(FrameTooLarge(MAX_TCP_BODY + 1)));
        assert_eq!(stamp(&[0; STAMP_LEN - 1]), None);
        let mut body = Vec::new();
        put_body(Stamp::new(0, 0, 0), 4, &mut body);
        assert_eq!(body.len(), STAMP_LEN);
    }
}
