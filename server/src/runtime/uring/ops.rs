//! What a completion is about: the operations and their `user_data`.

/// Which listener an accept is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    Tcp,
    Ws,
}

/// What a completion is about, carried in its SQE's `user_data`: the kind of operation in the
/// high half and, for a connection's operations, its socket's key in the low half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Accept(Gate),
    UdpRecv,
    Wake,
    Recv(usize),
    Send(usize),
    /// A cancellation (its own completion carries nothing we need).
    Cancel,
}

impl Op {
    pub(super) fn encode(self) -> u64 {
        let (kind, key) = match self {
            Op::Accept(Gate::Tcp) => (1, 0),
            Op::Accept(Gate::Ws) => (2, 0),
            Op::UdpRecv => (3, 0),
            Op::Wake => (4, 0),
            Op::Recv(key) => (5, key),
            Op::Send(key) => (6, key),
            Op::Cancel => (7, 0),
        };
        // Socket keys are slab indices bounded by the descriptor limit: far below 2^32.
        (kind << 32) | (key as u64 & 0xffff_ffff)
    }

    pub(super) fn decode(user_data: u64) -> Option<Self> {
        let key = (user_data & 0xffff_ffff) as usize;
        Some(match user_data >> 32 {
            1 => Op::Accept(Gate::Tcp),
            2 => Op::Accept(Gate::Ws),
            3 => Op::UdpRecv,
            4 => Op::Wake,
            5 => Op::Recv(key),
            6 => Op::Send(key),
            7 => Op::Cancel,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn ops_round_trip_through_user_data() {
        let ops = [
            Op::Accept(Gate::Tcp),
            Op::Accept(Gate::Ws),
            Op::UdpRecv,
            Op::Wake,
            Op::Recv(0),
            Op::Recv(7),
            Op::Send(0xffff_ffff),
            Op::Send(12_345),
            Op::Cancel,
        ];
        for op in ops {
            assert_eq!(Op::decode(op.encode()), Some(op));
        }
        assert_eq!(Op::decode(0), None);
        assert_eq!(Op::decode(8 << 32), None);
    }
}
