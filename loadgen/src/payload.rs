//! What a generated message carries, so that the receiving worker can account for it without any
//! shared state: `dataContent` = `lg:<run>:<worker>:<sender>:<seq>:<intended_ns>:` padded with `x`
//! to `--message-size` bytes, and the QoS fingerprint `lg-<run>-<worker>-<sender>-<seq>-<intended_ns>`,
//! which comes back in the ACK (so a C2S latency needs no table either).
//!
//! `run` identifies the run (messages of an earlier run that the server still resends or kept
//! offline for the same user ids are ignored), `sender` is the sender's index within its worker,
//! `seq` its own message counter (from 0), and `intended_ns` the CLOCK_MONOTONIC time the schedule
//! intended the message for.

use std::fmt::Write;

/// Identifies one generated message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Run that sent it.
    pub run: u32,
    /// Worker that sent it.
    pub worker: u32,
    /// Sender's index in that worker.
    pub sender: u32,
    /// Sender's message sequence number.
    pub seq: u64,
    /// Intended send time (CLOCK_MONOTONIC ns).
    pub intended_ns: u64,
}

/// The `dataContent` of `stamp`, padded with `x` to `size` bytes (longer if the header is).
pub fn encode(stamp: &Stamp, size: usize) -> String {
    let mut s = String::with_capacity(size.max(48));
    let _ = write!(
        s,
        "lg:{}:{}:{}:{}:{}:",
        stamp.run, stamp.worker, stamp.sender, stamp.seq, stamp.intended_ns
    );
    let pad = size.saturating_sub(s.len());
    s.extend(std::iter::repeat_n('x', pad));
    s
}

/// The stamp of a `dataContent`, `None` if it is not one of ours.
pub fn decode(text: &str) -> Option<Stamp> {
    parse(text.strip_prefix("lg:")?, ':')
}

/// The QoS fingerprint of `stamp`.
pub fn fingerprint(stamp: &Stamp) -> String {
    format!(
        "lg-{}-{}-{}-{}-{}",
        stamp.run, stamp.worker, stamp.sender, stamp.seq, stamp.intended_ns
    )
}

/// The stamp of a fingerprint, `None` if it is not one of ours.
pub fn decode_fingerprint(fp: &str) -> Option<Stamp> {
    parse(fp.strip_prefix("lg-")?, '-')
}

fn parse(rest: &str, sep: char) -> Option<Stamp> {
    let mut parts = rest.splitn(6, sep);
    Some(Stamp {
        run: parts.next()?.parse().ok()?,
        worker: parts.next()?.parse().ok()?,
        sender: parts.next()?.parse().ok()?,
        seq: parts.next()?.parse().ok()?,
        intended_ns: parts.next()?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: Stamp = Stamp {
        run: 7,
        worker: 2,
        sender: 17,
        seq: 99,
        intended_ns: 123_456_789,
    };

    #[test]
    fn round_trip_and_padding() {
        let text = encode(&STAMP, 100);
        assert_eq!(text.len(), 100);
        assert!(text.starts_with("lg:7:2:17:99:123456789:x"));
        assert_eq!(decode(&text), Some(STAMP));
        // Shorter than the header: the header is kept whole.
        assert_eq!(decode(&encode(&STAMP, 1)), Some(STAMP));
        assert_eq!(decode_fingerprint(&fingerprint(&STAMP)), Some(STAMP));
    }

    #[test]
    fn foreign_content_is_ignored() {
        assert_eq!(decode("hello"), None);
        assert_eq!(decode("lg:1:2:x:4:5:"), None);
        assert_eq!(
            decode_fingerprint("2d1c3a0e-7b1b-4d5e-9f00-3c3a1b2c4d5e"),
            None
        );
    }
}
