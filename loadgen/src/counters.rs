//! Message accounting: per-transport [`Counters`] and the receive-side [`SeqTracker`] that tells a
//! new message from a duplicate or a late (reordered) one.
//!
//! Attribution: a message counts for the transport of its **sender** — its `sent`, `delivered`,
//! `duplicated`, `reordered`, `lost` and latency all land in the sender's transport, whatever the
//! receiver's. Duplicates are counted on the wire, before the client session's own
//! de-duplication (which hides them from the application, as the SDK does).

use serde::{Deserialize, Serialize};

/// Sequence numbers remembered behind the highest one seen, to recognise duplicates. A message
/// older than this is counted as reordered (it cannot be told from a duplicate any more); with
/// one sender per stream and a small QoS window, reordering never reaches that far in practice.
pub const SEQ_WINDOW: u64 = 1024;

const WORDS: usize = (SEQ_WINDOW / 64) as usize;

/// Counts of one transport (or of all).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Messages handed to a logged-in session.
    pub sent: u64,
    /// Messages that arrived at their receiver at least once (C2C, fanout), or were ACKed by the
    /// server (C2S with QoS).
    pub delivered: u64,
    /// Distinct messages whose ACK reached the sender (QoS only).
    pub acked: u64,
    /// Sent and never delivered by the end of the grace period. Computed at the end.
    pub lost: u64,
    /// Extra copies received (server resends), before the session's de-duplication.
    pub duplicated: u64,
    /// Extra copies the session passed to the application after its de-duplication (the SDK's
    /// `onRecieveMessage` called twice for one message). Must be 0: a non-zero count means the
    /// de-duplication window was shorter than the sender's resends.
    #[serde(default)]
    pub app_duplicated: u64,
    /// Messages that arrived after a later message of the same sender.
    pub reordered: u64,
    /// Messages due by the schedule that could not be sent (sender not logged in, or its QoS
    /// table full). Counted as lost by `--max-loss`.
    pub unsent: u64,
    /// Messages the sender's QoS gave up on (`messagesLost`) while the run was going on.
    pub qos_lost: u64,
    /// Messages sent more than the lateness threshold after their intended time.
    pub late: u64,
}

impl Counters {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counters) {
        self.sent += other.sent;
        self.delivered += other.delivered;
        self.acked += other.acked;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.app_duplicated += other.app_duplicated;
        self.reordered += other.reordered;
        self.unsent += other.unsent;
        self.qos_lost += other.qos_lost;
        self.late += other.late;
    }

    /// Sets `lost` from what was sent and what arrived.
    pub fn settle(&mut self) {
        self.lost = self.sent.saturating_sub(self.delivered);
    }
}

/// How a message arrived, relative to what its stream delivered before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// New, and later than everything before it.
    InOrder,
    /// New, but after a later message of the same stream.
    Reordered,
    /// Seen before.
    Duplicate,
}

/// Receive-side state of one stream (one sender's messages at one receiver, or one sender's
/// ACKs): the highest sequence number seen and a bitmap of the [`SEQ_WINDOW`] before it.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    highest: Option<u64>,
    /// Bit `seq % SEQ_WINDOW` is set when `seq` (within the window below `highest`) was seen.
    seen: [u64; WORDS],
}

impl SeqTracker {
    /// Records `seq` and says how it arrived.
    pub fn observe(&mut self, seq: u64) -> Arrival {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            self.set(seq);
            return Arrival::InOrder;
        };
        if seq > highest {
            if seq - highest >= SEQ_WINDOW {
                self.seen = [0; WORDS];
            } else {
                for s in highest + 1..seq {
                    self.clear(s);
                }
            }
            self.set(seq);
            self.highest = Some(seq);
            return Arrival::InOrder;
        }
        if highest - seq >= SEQ_WINDOW {
            return Arrival::Reordered;
        }
        if self.is_set(seq) {
            return Arrival::Duplicate;
        }
        self.set(seq);
        Arrival::Reordered
    }

    fn slot(seq: u64) -> (usize, u64) {
        let bit = seq % SEQ_WINDOW;
        ((bit / 64) as usize, 1 << (bit % 64))
    }

    fn set(&mut self, seq: u64) {
        let (word, mask) = Self::slot(seq);
        if let Some(w) = self.seen.get_mut(word) {
            *w |= mask;
        }
    }

    fn clear(&mut self, seq: u64) {
        let (word, mask) = Self::slot(seq);
        if let Some(w) = self.seen.get_mut(word) {
            *w &= !mask;
        }
    }

    fn is_set(&self, seq: u64) -> bool {
        let (word, mask) = Self::slot(seq);
        self.seen.get(word).is_some_and(|w| w & mask != 0)
    }
}

/// Applies an arrival to the counters of the sender's transport; true if the message is new.
pub fn count_arrival(counters: &mut Counters, arrival: Arrival) -> bool {
    match arrival {
        Arrival::InOrder => {
            counters.delivered += 1;
            true
        }
        Arrival::Reordered => {
            counters.delivered += 1;
            counters.reordered += 1;
            true
        }
        Arrival::Duplicate => {
            counters.duplicated += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u64]) -> Counters {
        let mut tracker = SeqTracker::default();
        let mut c = Counters::default();
        for &s in seqs {
            count_arrival(&mut c, tracker.observe(s));
        }
        c
    }

    #[test]
    fn in_order_stream() {
        let c = run(&[0, 1, 2, 3]);
        assert_eq!((c.delivered, c.duplicated, c.reordered), (4, 0, 0));
    }

    #[test]
    fn duplicates_are_counted_once_each() {
        let c = run(&[0, 1, 1, 2, 0, 2]);
        assert_eq!((c.delivered, c.duplicated, c.reordered), (3, 3, 0));
    }

    #[test]
    fn reordering_and_a_late_duplicate() {
        // 2 overtakes 1; 1 arrives late (reordered), then again (duplicate).
        let c = run(&[0, 2, 1, 1, 3]);
        assert_eq!((c.delivered, c.duplicated, c.reordered), (4, 1, 1));
    }

    #[test]
    fn gaps_clear_the_window() {
        // A gap (fanout: other seqs went to other receivers) is not a reorder, and bits of an
        // earlier lap of the ring do not make a new seq look like a duplicate.
        let c = run(&[0, 5, SEQ_WINDOW, SEQ_WINDOW + 5, 3 * SEQ_WINDOW]);
        assert_eq!((c.delivered, c.duplicated, c.reordered), (5, 0, 0));
        let c = run(&[10, 10 + SEQ_WINDOW - 1, 10 + SEQ_WINDOW + 1]);
        assert_eq!(c.duplicated, 0);
    }

    #[test]
    fn far_behind_counts_as_reordered() {
        let c = run(&[5 * SEQ_WINDOW, 0]);
        assert_eq!((c.delivered, c.reordered), (2, 1));
    }

    #[test]
    fn loss_is_sent_minus_delivered() {
        let mut c = Counters {
            sent: 10,
            ..Counters::default()
        };
        count_arrival(&mut c, Arrival::InOrder);
        c.settle();
        assert_eq!(c.lost, 9);
        let mut total = Counters::default();
        total.add(&c);
        total.add(&c);
        assert_eq!(total.lost, 18);
    }
}
