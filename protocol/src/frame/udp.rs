//! UDP framing: one datagram is one JSON message, without any header (SPEC §1.2).

use bytes::BufMut;

pub use super::tcp::TooLarge;
use crate::Message;

/// Largest datagram the reference reads (its receive buffer, SPEC §1.2). A longer one is
/// truncated by the OS there and then fails to parse; we detect it and report it instead.
pub const DEFAULT_MAX_DATAGRAM: usize = 2048;

/// The Java UDP SDK reads server datagrams into a 1024-byte buffer (hazard R6): a longer reply is
/// truncated on those clients.
pub const JAVA_CLIENT_MAX_DATAGRAM: usize = 1024;

/// Size of a receive buffer that can tell a datagram of exactly `max` bytes from a longer one:
/// the kernel fills at most this much, so a read of `max + 1` bytes means "too large".
pub const fn recv_buffer_len(max: usize) -> usize {
    max + 1
}

/// The message body of a received datagram of `received` bytes (read into a buffer of at least
/// [`recv_buffer_len`]`(max)`), or [`TooLarge`] if it exceeds `max`.
pub fn decode(received: usize, max: usize) -> Result<usize, TooLarge> {
    if received > max {
        return Err(TooLarge {
            len: received as u64,
            max,
        });
    }
    Ok(received)
}

/// Appends `msg` as one datagram's payload.
pub fn encode(msg: &Message<'_>, dst: &mut impl BufMut) {
    msg.encode(dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_inclusive() {
        assert_eq!(decode(2048, DEFAULT_MAX_DATAGRAM), Ok(2048));
        assert_eq!(
            decode(2049, DEFAULT_MAX_DATAGRAM),
            Err(TooLarge {
                len: 2049,
                max: 2048
            })
        );
        assert_eq!(recv_buffer_len(DEFAULT_MAX_DATAGRAM), 2049);
    }
}
