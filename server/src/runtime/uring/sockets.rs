//! The sockets a ring works on and what is pending on them.

use std::net::{TcpListener, TcpStream};

use bytes::BytesMut;

use crate::runtime::conn::ConnState;
use crate::shard::{Adopt, CoreId};

/// A listening socket and whether its multishot accept is armed.
#[derive(Debug)]
pub(super) struct Gateway {
    pub(super) listener: TcpListener,
    pub(super) armed: bool,
}

/// A TCP or WebSocket socket on this ring and what is pending on it. It outlives its connection
/// in [`Base::conns`] until its last completion is in.
#[derive(Debug)]
pub(super) struct Sock {
    pub(super) stream: TcpStream,
    /// Its connection (index in `Base::conns`); `None` once closed or leaving.
    pub(super) conn: Option<usize>,
    /// A multishot receive is armed (until its last completion).
    pub(super) receiving: bool,
    /// The bytes of the send in flight: the kernel reads them until its completion.
    pub(super) sending: Option<BytesMut>,
    /// The connection is moving to another core and waits here for the kernel to let go.
    pub(super) leaving: Option<Box<Leaving>>,
}

/// A connection on its way to another core.
#[derive(Debug)]
pub(super) struct Leaving {
    pub(super) state: ConnState,
    pub(super) core: CoreId,
    pub(super) adopt: Adopt,
}

impl Sock {
    pub(super) fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            conn: None,
            receiving: false,
            sending: None,
            leaving: None,
        }
    }
}

/// Small things the kernel reads or writes while operations are pending, in one heap block that
/// stays put for the loop's life (and is leaked if the kernel might still use it).
pub(super) struct Lent {
    /// Where the pending eventfd read puts the counter.
    pub(super) wake: [u8; 8],
    /// The template of the UDP multishot `RecvMsg`: only its name and control lengths matter.
    pub(super) udp_msg: libc::msghdr,
}

/// Puts `unsent` back in front of `tx` (what was queued since the send was issued).
pub(super) fn requeue(mut unsent: BytesMut, tx: &mut BytesMut) {
    if unsent.is_empty() {
        return;
    }
    unsent.extend_from_slice(tx);
    *tx = unsent;
}
