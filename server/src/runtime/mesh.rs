//! Cross-core mail: one bounded lock-free inbox per core, and a way to wake its event loop.
//!
//! Senders push into the target's [`ArrayQueue`] and remember the target; at the end of its loop
//! turn a core wakes each core it mailed once (one `eventfd` write per target per turn, not per
//! message). A full inbox means the target is overloaded: the sender keeps the mail in a local
//! overflow and retries on its next turn. What happens when that overflow is full depends on the
//! mail ([`Mail::is_refusable`]):
//!
//! * mail a peer's traffic makes — a relayed message ([`ShardMsg::Deliver`]), a forwarded
//!   datagram, a UDP login — is refused past [`MAX_OVERFLOW`] and counted ([`Mesh::refused`]);
//!   each has a defined outcome for its sender: a relayed message is not acknowledged (the
//!   sender's SDK resends it or reports it lost, exactly as for an offline recipient nobody
//!   stored), a datagram or a UDP login is lost as UDP may lose it (the SDK resends);
//! * everything else — receipts, route changes, commands, migrating connections — is never
//!   dropped: there is at most one per refusable mail that was accepted, or per session, so its
//!   overflow is bounded by the same limits; its high-water mark is counted
//!   ([`Mesh::control_backlog_peak`]). A "UDP route released" therefore always arrives.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use crate::shard::{Adopt, CoreId, ShardMsg};

/// Capacity of each core's inbox. A core drains its inbox every turn (tens of microseconds), so
/// 8192 entries hold ~80 ms of a core's whole cross-core traffic at 100k messages/s; past that
/// the senders keep mail in their bounded overflow ([`MAX_OVERFLOW`]). The queue's slots are
/// allocated and written up front (a mail is 120 bytes + an 8-byte stamp), so this is resident
/// memory of an idle server: 1 MiB per core, where 64k entries cost 8 MiB.
pub const INBOX_CAPACITY: usize = 8_192;

/// How long a thread outside the loops waits for room in a full inbox before dropping its mail.
/// A running core drains thousands of mails per millisecond; a second means it has stopped.
pub const POST_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// Refusable mail a core holds back for a full inbox before it refuses more (per target core):
/// ~0.6 s of 100k messages/s, 8 MiB of mail at most.
pub const MAX_OVERFLOW: usize = 65_536;

/// What travels between cores.
#[derive(Debug)]
pub enum Mail {
    /// For the shard.
    Shard(ShardMsg),
    /// A connection moving to its user's shard after a verified login.
    Adopt(Box<Migrant>),
    /// A question from the control thread, answered on the channel it carries.
    Query(Query),
    /// Stop: close every connection, then end the loop.
    Shutdown,
}

impl Mail {
    /// Whether the mail comes from a peer's traffic and has a defined outcome when refused (see
    /// the module's documentation); other mail is never dropped by a loop.
    pub fn is_refusable(&self) -> bool {
        matches!(
            self,
            Mail::Shard(ShardMsg::Deliver(_) | ShardMsg::Datagram { .. } | ShardMsg::UdpLogin(_))
        )
    }
}

/// Questions the control thread asks a core.
#[derive(Debug)]
pub enum Query {
    /// Is this user logged in on the core's shard?
    IsOnline(String, std::sync::mpsc::Sender<bool>),
    /// The shard's counters and number of online users.
    Stats(std::sync::mpsc::Sender<(crate::shard::Stats, usize)>),
}

/// A TCP or WebSocket connection in transit between cores. The sending core has let go of the
/// socket entirely (epoll: deregistered; io_uring: its receive and send cancelled and completed)
/// before it is mailed, so the receiving core is its only user.
#[derive(Debug)]
pub struct Migrant {
    /// The socket (non-blocking), as a plain std stream so that either backend can take it.
    pub stream: std::net::TcpStream,
    /// Transport state: buffered input, queued output, WebSocket decoder.
    pub conn: super::conn::ConnState,
    /// The verified login it carries.
    pub adopt: Adopt,
}

/// Wakes a core's event loop: `mio::Waker` for the epoll loop, `uring::EventFd` (an eventfd the
/// ring keeps a read pending on) for the io_uring loop.
pub trait Wake: Send + Sync {
    /// Makes the core's current or next wait return.
    fn wake(&self);
}

impl Wake for mio::Waker {
    fn wake(&self) {
        if let Err(error) = mio::Waker::wake(self) {
            tracing::warn!(%error, "cannot wake a core");
        }
    }
}

/// The inboxes and wakers of all cores.
pub struct Mesh {
    inboxes: Vec<ArrayQueue<Mail>>,
    wakers: Vec<Arc<dyn Wake>>,
    /// Mail from outside the loops dropped after waiting [`POST_PATIENCE`] for a full inbox.
    pub dropped: AtomicU64,
    /// Refusable mail refused because an inbox and the sender's overflow were full.
    pub refused: AtomicU64,
    /// The most mail any core has held back for one target at once.
    pub control_backlog_peak: AtomicU64,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("cores", &self.inboxes.len())
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// A mesh of `wakers.len()` cores.
    pub fn new(wakers: Vec<Arc<dyn Wake>>) -> Self {
        Self {
            inboxes: wakers
                .iter()
                .map(|_| ArrayQueue::new(INBOX_CAPACITY))
                .collect(),
            wakers,
            dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            control_backlog_peak: AtomicU64::new(0),
        }
    }

    /// Number of cores.
    pub fn cores(&self) -> usize {
        self.inboxes.len()
    }

    /// Takes the next mail for `core`.
    pub fn pop(&self, core: CoreId) -> Option<Mail> {
        self.inboxes.get(usize::from(core))?.pop()
    }

    /// Wakes `core`.
    pub fn wake(&self, core: CoreId) {
        if let Some(waker) = self.wakers.get(usize::from(core)) {
            waker.wake();
        }
    }

    /// Delivers `mail` to `core` from outside the loops (the control thread, the store's
    /// writer), waiting for room if the inbox is full (the loops keep draining their inboxes),
    /// and wakes the core. A core that has stopped drains nothing: after [`POST_PATIENCE`] the
    /// mail is dropped and counted rather than hanging the caller (a dropped store receipt only
    /// means the sender resends, and the store de-duplicates the resend).
    pub fn post(&self, core: CoreId, mut mail: Mail) {
        let Some(inbox) = self.inboxes.get(usize::from(core)) else {
            return;
        };
        let deadline = std::time::Instant::now() + POST_PATIENCE;
        loop {
            match inbox.push(mail) {
                Ok(()) => break,
                Err(back) if std::time::Instant::now() < deadline => {
                    mail = back;
                    self.wake(core);
                    std::thread::yield_now();
                }
                Err(_) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        core,
                        "inbox full for too long: mail from outside the loops dropped"
                    );
                    break;
                }
            }
        }
        self.wake(core);
    }

    /// Sends `Shutdown` to every core (from the control thread).
    pub fn shutdown_all(&self) {
        for core in 0..self.inboxes.len() {
            if let Ok(core) = CoreId::try_from(core) {
                self.post(core, Mail::Shutdown);
            }
        }
    }
}

/// A core's outgoing side: mail that did not fit yet, and whom to wake at the end of the turn.
#[derive(Debug)]
pub struct Outgoing {
    mesh: Arc<Mesh>,
    overflow: Vec<VecDeque<Mail>>,
    /// Refusable mail in each overflow.
    refusable: Vec<usize>,
    max_overflow: usize,
    to_wake: Vec<bool>,
}

impl Outgoing {
    /// The sending side for one core.
    pub fn new(mesh: Arc<Mesh>) -> Self {
        Self::with_limit(mesh, MAX_OVERFLOW)
    }

    /// The sending side, refusing refusable mail past `max_overflow` held back per target.
    pub fn with_limit(mesh: Arc<Mesh>, max_overflow: usize) -> Self {
        let cores = mesh.cores();
        Self {
            mesh,
            overflow: (0..cores).map(|_| VecDeque::new()).collect(),
            refusable: vec![0; cores],
            max_overflow,
            to_wake: vec![false; cores],
        }
    }

    /// Sends `mail` to `core` (delivered in order with earlier mail to the same core). Refusable
    /// mail that finds the inbox and this core's overflow for it full is refused: counted, and
    /// given back so that the caller can see what was refused.
    pub fn send(&mut self, core: CoreId, mail: Mail) -> Result<(), Mail> {
        let index = usize::from(core);
        let (Some(inbox), Some(overflow), Some(refusable)) = (
            self.mesh.inboxes.get(index),
            self.overflow.get_mut(index),
            self.refusable.get_mut(index),
        ) else {
            return Err(mail);
        };
        if let Some(flag) = self.to_wake.get_mut(index) {
            *flag = true;
        }
        let mail = if overflow.is_empty() {
            match inbox.push(mail) {
                Ok(()) => return Ok(()),
                Err(back) => back,
            }
        } else {
            mail
        };
        if mail.is_refusable() {
            if *refusable >= self.max_overflow {
                self.mesh.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(core, "inbox and overflow full: mail refused");
                return Err(mail);
            }
            *refusable += 1;
        }
        overflow.push_back(mail);
        self.mesh
            .control_backlog_peak
            .fetch_max(overflow.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Retries held-back mail and wakes every core mailed since the last call.
    pub fn flush(&mut self) {
        for (index, (overflow, refusable)) in self
            .overflow
            .iter_mut()
            .zip(&mut self.refusable)
            .enumerate()
        {
            let Some(inbox) = self.mesh.inboxes.get(index) else {
                continue;
            };
            while let Some(mail) = overflow.pop_front() {
                let was_refusable = mail.is_refusable();
                if let Err(back) = inbox.push(mail) {
                    overflow.push_front(back);
                    break;
                }
                if was_refusable {
                    *refusable = refusable.saturating_sub(1);
                }
            }
            if !overflow.is_empty() {
                if let Some(flag) = self.to_wake.get_mut(index) {
                    *flag = true;
                }
            }
        }
        for (index, flag) in self.to_wake.iter_mut().enumerate() {
            if std::mem::take(flag) {
                if let Ok(core) = CoreId::try_from(index) {
                    self.mesh.wake(core);
                }
            }
        }
    }

    /// Whether mail is still held back (the loop should not sleep long).
    pub fn has_backlog(&self) -> bool {
        self.overflow.iter().any(|o| !o.is_empty())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;

    use super::*;

    struct Nobody;

    impl Wake for Nobody {
        fn wake(&self) {}
    }

    fn mesh() -> Arc<Mesh> {
        Arc::new(Mesh::new(vec![Arc::new(Nobody), Arc::new(Nobody)]))
    }

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7))
    }

    fn datagram() -> Mail {
        Mail::Shard(ShardMsg::Datagram {
            from: addr(),
            bytes: bytes::BytesMut::from(&b"{}"[..]),
            via: 0,
        })
    }

    fn released() -> Mail {
        Mail::Shard(ShardMsg::UdpReleased { addr: addr() })
    }

    #[test]
    fn refusable_mail_is_refused_past_the_overflow_and_control_mail_never() {
        let mesh = mesh();
        let mut out = Outgoing::with_limit(Arc::clone(&mesh), 2);
        for _ in 0..INBOX_CAPACITY {
            out.send(1, datagram()).unwrap();
        }
        // Inbox full: two more are held back, the third refused and counted.
        out.send(1, datagram()).unwrap();
        out.send(1, datagram()).unwrap();
        assert!(matches!(
            out.send(1, datagram()),
            Err(Mail::Shard(ShardMsg::Datagram { .. }))
        ));
        assert_eq!(mesh.refused.load(Ordering::Relaxed), 1);
        // A route release is never refused, however full.
        for _ in 0..10 {
            out.send(1, released()).unwrap();
        }
        assert_eq!(mesh.refused.load(Ordering::Relaxed), 1);
        assert_eq!(mesh.control_backlog_peak.load(Ordering::Relaxed), 12);
        assert!(out.has_backlog());

        // The target drains its inbox: the overflow follows in order, and room for refusable
        // mail comes back.
        let mut taken = 0;
        while mesh.pop(1).is_some() {
            taken += 1;
        }
        assert_eq!(taken, INBOX_CAPACITY);
        out.flush();
        assert!(!out.has_backlog());
        let mut order = Vec::new();
        while let Some(mail) = mesh.pop(1) {
            order.push(matches!(mail, Mail::Shard(ShardMsg::UdpReleased { .. })));
        }
        assert_eq!(order, [[false; 2].as_slice(), &[true; 10]].concat());
        for _ in 0..INBOX_CAPACITY + 2 {
            out.send(1, datagram()).unwrap();
        }
        assert!(out.send(1, datagram()).is_err());
    }

    #[test]
    fn only_peer_driven_mail_is_refusable() {
        assert!(datagram().is_refusable());
        assert!(!released().is_refusable());
        assert!(!Mail::Shutdown.is_refusable());
    }
}
