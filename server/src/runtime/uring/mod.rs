//! The io_uring backend (on the `io-uring` crate): one ring per core, set up with
//! `IORING_SETUP_SINGLE_ISSUER` + `IORING_SETUP_DEFER_TASKRUN` (only the core's thread submits,
//! and completions are produced only when it asks for them, in its own wait), owning its
//! listeners, connections, UDP socket and shard. What does not depend on io_uring is in
//! [`super::base`], shared with the epoll loop.
//!
//! # Layout
//!
//! * `probe` — whether io_uring can run here, and the ring as every core builds it;
//! * `bufring` — the provided buffer rings, the memory the kernel receives into: the `unsafe`
//!   that touches memory shared with the kernel is there (and in [`UringCore::push`], whose
//!   callers vouch for what each operation uses);
//! * `ops` — what a completion is about (`user_data`);
//! * `sockets` — the sockets a ring works on and what is pending on them;
//! * `recvmsg` — datagrams out of multishot `RecvMsg` buffers;
//! * `wake` — the eventfd other cores wake a core with;
//! * this file — the loop: arming operations, completions, flushing, migration, shutdown.
//!
//! # Operations
//!
//! * Each listener: one multishot accept (`AcceptMulti`), re-armed when it ends. When the
//!   process runs out of descriptors (EMFILE/ENFILE) the accept ends and is left ended for
//!   [`base::ACCEPT_PAUSE`], then re-armed: no retry loop in between.
//! * Each connection: one multishot receive (`RecvMulti`) into the TCP provided buffer ring,
//!   re-armed when it ends (for instance with ENOBUFS when every buffer was taken), and at most
//!   one `Send` in flight, of everything queued on the connection when it was issued; a partial
//!   send puts the rest back in front of what was queued since.
//! * The UDP socket: one multishot `RecvMsg` (`RecvMsgMulti`) into the UDP buffer ring; each
//!   buffer holds one datagram behind the kernel's `io_uring_recvmsg_out` header and the
//!   sender's address. Datagrams are *sent* with a direct non-blocking `sendto` (in
//!   [`super::base`], like epoll): a UDP send never waits, so an SQE would only add a
//!   `msghdr`, an address and a buffer to keep alive per datagram and delay the reply by a turn.
//! * Wake-ups: a `Read` of the core's eventfd ([`EventFd`]), re-armed after each completion;
//!   other cores write to the eventfd when they mail this one.
//!
//! # A loop turn
//!
//! Exactly one `io_uring_enter` per turn: it submits everything queued during the previous turn
//! and waits for completions until the shard's next timer (an `EXT_ARG` timespec), or not at all
//! if work was left over. Then: completions (accepted sockets, received bytes cut into messages
//! for the shard, datagrams, finished sends, and the closes that waited for a send) → the inbox
//! → due timers → a `Send` for every connection with queued output and none in flight → wake
//! the cores mailed. Only a burst larger
//! than the submission queue submits early (without waiting) to make room.
//!
//! # Buffers lent to the kernel
//!
//! Every SQE is queued through [`UringCore::push`], whose callers state what memory the
//! operation uses and why it outlives it: the provided buffer rings and the small [`Lent`]
//! block live as long as the loop; a send's bytes sit in its socket's `sending` until the send's
//! last completion; a socket (its descriptor) is dropped only when nothing is pending on it. When
//! the loop ends it cancels everything and waits for the last completions
//! ([`UringCore::quiesce`]); if the kernel still holds something after that, the memory is
//! leaked rather than freed.
//!
//! # Moving a connection to another core
//!
//! The shard asks for it after a verified login. The connection leaves the shared state at once
//! (its state parked with its socket), its pending receive and send are cancelled (`AsyncCancel`)
//! and, when their last completions are in — bytes received meanwhile appended to its input,
//! bytes not sent put back in front of its output — it is mailed (`Mail::Adopt`) as a plain
//! socket. The receiving core registers nothing: it just arms a receive on the descriptor.

use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use imedge_protocol::session::Transport;
use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use slab::Slab;

use super::admit::Admission;
use super::base::{self, Backend, Base, EMFILE, ENFILE};
use super::conn::ConnState;
use super::mesh::{Mail, Mesh, Migrant};
use super::{Limits, Listeners};
use crate::shard::{Adopt, CoreId, Now, Shard};

mod bufring;
mod ops;
mod probe;
mod recvmsg;
mod sockets;
mod wake;

use bufring::BufRing;
use ops::{Gate, Op};
use probe::build_ring;
pub use probe::probe;
use recvmsg::{datagram, udp_buffer_size};
use sockets::{requeue, Gateway, Leaving, Lent, Sock};
pub use wake::EventFd;

/// Submission queue entries per ring. A turn queues one entry per connection with output, plus
/// re-arms and cancellations; 1024 covers a busy turn, and a larger burst submits early (see
/// [`UringCore::push`]) rather than failing.
const SQ_ENTRIES: u32 = 1024;

/// Completion queue entries per ring: room for every provided buffer to be handed out in one
/// turn (each receive completion holds one) plus the sends, accepts and wakes of a busy turn, so
/// that the queue does not overflow in normal operation. (Should it, `IORING_FEAT_NODROP` keeps
/// the surplus in the kernel until the next wait: slower, never lost.)
const CQ_ENTRIES: u32 = 8192;

/// Buffer group of the TCP and WebSocket connections' receives.
const TCP_GROUP: u16 = 0;
/// Buffer group of the UDP socket's receives.
const UDP_GROUP: u16 = 1;

/// Buffers in the TCP group. A receive completion holds one until the loop has parsed its bytes
/// (or copied a partial frame into the connection's input), in the same turn; so this bounds the
/// receive completions all of the core's connections can post between two turns — a thousand
/// is more than one turn sees at 100k messages/s. Past it a connection's multishot receive ends
/// with ENOBUFS — its bytes stay in the socket — and is re-armed on the next turn.
const TCP_BUFFERS: u16 = 1024;

/// Size of a TCP buffer: one page. An IM connection reads a message or a few at a time, mostly
/// well under 1 KiB each; the largest frame (6 KiB) spans two buffers. 1024 × 4 KiB is 4 MiB
/// per core, resident from the start (see [`BufRing::new`]).
const TCP_BUFFER_SIZE: usize = 4096;

/// Buffers in the UDP group: one datagram each, half what the epoll loop receives per turn (a
/// burst beyond them waits in the socket's 4 MiB buffer for the re-armed receive). Their size
/// follows the configured datagram limit ([`udp_buffer_size`]): ~1 MiB per core.
const UDP_BUFFERS: u16 = 512;

/// Room reserved for the sender's address in a UDP buffer: an IPv6 socket address (IPv4 ones
/// are shorter).
const UDP_NAME_LEN: usize = size_of::<libc::sockaddr_in6>();

/// `struct io_uring_recvmsg_out` (four `u32`s), which heads every buffer a multishot `RecvMsg`
/// fills.
const RECVMSG_OUT_LEN: usize = 16;

/// The kernel's limit on the entries of a provided buffer ring.
const MAX_RING_BUFFERS: u16 = 32_768;

/// How long shutdown lets the ring write the goodbyes (WebSocket close frames, queued output)
/// before closing the connections regardless.
const GOODBYE_GRACE: Duration = Duration::from_millis(100);

/// How long the loop waits, when it ends, for the kernel to finish the cancelled operations.
/// They finish at once in practice; the bound only keeps a stuck kernel from hanging shutdown.
const QUIESCE_GRACE: Duration = Duration::from_secs(1);

/// Where the kernel says whether io_uring may be used: 0 yes, 1 only by privileged processes
/// and members of `kernel.io_uring_group`, 2 no.
const IO_URING_DISABLED: &str = "/proc/sys/kernel/io_uring_disabled";

/// One core's event loop on its own ring.
pub struct UringCore {
    base: Base<usize>,
    ring: IoUring,
    /// The TCP and WebSocket sockets, keyed as in their operations' `user_data`.
    socks: Slab<Sock>,
    tcp: Option<Gateway>,
    ws: Option<Gateway>,
    /// The UDP multishot receive is armed.
    udp_receiving: bool,
    waker: Arc<EventFd>,
    /// The eventfd read is armed.
    waking: bool,
    lent: ManuallyDrop<Box<Lent>>,
    tcp_buffers: BufRing,
    udp_buffers: BufRing,
    /// Operations submitted or queued whose last completion has not been taken.
    in_flight: usize,
    /// This turn's completions (a reused buffer).
    cqes: Vec<cqueue::Entry>,
    /// Entries that did not fit in the submission queue, queued first next time.
    backlog: VecDeque<squeue::Entry>,
}

impl std::fmt::Debug for UringCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringCore")
            .field("core", &self.base.core)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl UringCore {
    /// A loop for `core` with its listeners and the eventfd other cores wake it with. Builds the
    /// ring (on the calling thread, which becomes its only submitter), registers the buffer
    /// rings and arms the accepts, the UDP receive and the wake-up read.
    ///
    /// # Errors
    /// The ring or a buffer ring cannot be set up.
    pub fn new(
        core: CoreId,
        shard: Shard,
        listeners: Listeners,
        waker: Arc<EventFd>,
        mesh: Arc<Mesh>,
        (limits, admission): (Limits, Arc<Admission>),
    ) -> io::Result<Self> {
        let ring = build_ring()?;
        let tcp_buffers = BufRing::new(TCP_GROUP, TCP_BUFFERS, TCP_BUFFER_SIZE)?;
        let udp_buffers = BufRing::new(
            UDP_GROUP,
            UDP_BUFFERS,
            udp_buffer_size(limits.udp_max_datagram),
        )?;
        tcp_buffers.register(&ring)?;
        udp_buffers.register(&ring)?;
        // SAFETY: an all-zero msghdr is valid: null pointers and zero lengths.
        let mut udp_msg: libc::msghdr = unsafe { std::mem::zeroed() };
        udp_msg.msg_namelen = u32::try_from(UDP_NAME_LEN).unwrap_or(u32::MAX);
        let gateway = |listener| Gateway {
            listener,
            armed: false,
        };
        let mut core = Self {
            base: Base::new(core, shard, listeners.udp, mesh, (limits, admission)),
            ring,
            socks: Slab::new(),
            tcp: listeners.tcp.map(gateway),
            ws: listeners.ws.map(gateway),
            udp_receiving: false,
            waker,
            waking: false,
            lent: ManuallyDrop::new(Box::new(Lent {
                wake: [0; 8],
                udp_msg,
            })),
            tcp_buffers,
            udp_buffers,
            in_flight: 0,
            cqes: Vec::with_capacity(CQ_ENTRIES as usize),
            backlog: VecDeque::new(),
        };
        core.arm_accept(Gate::Tcp);
        core.arm_accept(Gate::Ws);
        core.arm_udp();
        core.arm_wake();
        Ok(core)
    }

    /// Runs until a [`Mail::Shutdown`] has been handled; dropping the loop then cancels what
    /// is still pending and waits for it (`quiesce`).
    ///
    /// # Errors
    /// `io_uring_enter` failed.
    pub fn run(self) -> io::Result<()> {
        base::run(self)
    }

    /// Queues an entry for the next submission. If the submission queue is full, it first
    /// submits what the queue holds (without waiting); if even that fails the entry waits in the
    /// backlog, which is queued before anything else at the next wait.
    ///
    /// # Safety
    /// The memory the entry points to must stay valid (and not be used in a way the operation
    /// forbids) until the operation's last completion has been taken.
    unsafe fn push(&mut self, entry: squeue::Entry) {
        self.in_flight += 1;
        if self.backlog.is_empty() {
            // SAFETY: the caller vouches for the entry's memory.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(error) = self.ring.submit() {
                tracing::debug!(%error, "early submit failed");
            }
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(entry);
    }

    /// Moves backlogged entries into the submission queue, as far as they fit.
    fn push_backlog(&mut self) {
        while let Some(entry) = self.backlog.front() {
            // SAFETY: backlogged entries were given to `push`, whose caller vouched for their
            // memory until their completion, which cannot come before they are submitted.
            if unsafe { self.ring.submission().push(entry) }.is_err() {
                return;
            }
            self.backlog.pop_front();
        }
    }

    /// The turn's one `io_uring_enter`: submits what was queued and waits for a completion, at
    /// most `timeout` (`None`: until one comes).
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.push_backlog();
        let result = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(timeout) => {
                let timeout = Timespec::from(timeout);
                let args = SubmitArgs::new().timespec(&timeout);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            // ETIME: the time is up. EINTR: a signal. EBUSY/EAGAIN: the completion queue is full
            // (the completions are taken next, and the submission retried next turn).
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Handles every completion the wait produced.
    fn complete(&mut self, now: Now) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion());
        for cqe in cqes.drain(..) {
            let (result, flags) = (cqe.result(), cqe.flags());
            if !cqueue::more(flags) {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            match Op::decode(cqe.user_data()) {
                Some(Op::Accept(gate)) => self.on_accept(now, gate, result, flags),
                Some(Op::UdpRecv) => self.on_datagram(now, result, flags),
                Some(Op::Wake) => self.on_wake(result),
                Some(Op::Recv(key)) => self.on_recv(now, key, result, flags),
                Some(Op::Send(key)) => self.on_send(now, key, result),
                Some(Op::Cancel) | None => {}
            }
        }
        self.cqes = cqes;
    }

    fn gateway(&mut self, gate: Gate) -> Option<&mut Gateway> {
        match gate {
            Gate::Tcp => self.tcp.as_mut(),
            Gate::Ws => self.ws.as_mut(),
        }
    }

    fn arm_accept(&mut self, gate: Gate) {
        if self.base.shutting_down || self.base.accept_paused_until.is_some() {
            return;
        }
        let Some(gateway) = self.gateway(gate) else {
            return;
        };
        if gateway.armed {
            return;
        }
        gateway.armed = true;
        let entry = opcode::AcceptMulti::new(Fd(gateway.listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(Op::Accept(gate).encode());
        // SAFETY: the accept asks for no peer address, so it points at no memory; the listener
        // stays open as long as the loop.
        unsafe { self.push(entry) };
    }

    fn arm_recv(&mut self, key: usize) {
        if self.base.shutting_down {
            return;
        }
        let Some(sock) = self.socks.get_mut(key) else {
            return;
        };
        if sock.receiving || sock.conn.is_none() {
            return;
        }
        sock.receiving = true;
        let entry = opcode::RecvMulti::new(Fd(sock.stream.as_raw_fd()), TCP_GROUP)
            .build()
            .user_data(Op::Recv(key).encode());
        // SAFETY: the receive writes only into the TCP buffer ring, which lives as long as the
        // loop (or is leaked); the socket is dropped only by `settle`, once nothing is pending
        // on it.
        unsafe { self.push(entry) };
    }

    fn arm_udp(&mut self) {
        if self.base.shutting_down || self.udp_receiving {
            return;
        }
        let Some(socket) = self.base.udp.as_ref() else {
            return;
        };
        self.udp_receiving = true;
        let entry = opcode::RecvMsgMulti::new(
            Fd(socket.as_raw_fd()),
            &raw const self.lent.udp_msg,
            UDP_GROUP,
        )
        .build()
        .user_data(Op::UdpRecv.encode());
        // SAFETY: the kernel reads the msghdr template in `lent` and writes into the UDP buffer
        // ring; both live as long as the loop (or are leaked), and so does the socket.
        unsafe { self.push(entry) };
    }

    fn arm_wake(&mut self) {
        if self.base.shutting_down || self.waking {
            return;
        }
        self.waking = true;
        let entry = opcode::Read::new(Fd(self.waker.0.as_raw_fd()), self.lent.wake.as_mut_ptr(), 8)
            .build()
            .user_data(Op::Wake.encode());
        // SAFETY: the read writes 8 bytes into `lent.wake`, which lives as long as the loop (or
        // is leaked) and which nothing else touches; the eventfd is held by `self.waker`.
        unsafe { self.push(entry) };
    }

    /// Sends `bytes` on socket `key`, keeping them in the socket until the send completes.
    fn send(&mut self, key: usize, bytes: BytesMut) {
        let Some(sock) = self.socks.get_mut(key) else {
            return;
        };
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let entry = opcode::Send::new(Fd(sock.stream.as_raw_fd()), bytes.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(Op::Send(key).encode());
        sock.sending = Some(bytes);
        // SAFETY: the kernel reads `len` bytes from the heap block of `bytes`, now held in
        // `sock.sending`: moving a `BytesMut` does not move its bytes, and it is neither changed
        // nor dropped until `on_send` takes it out at the send's completion (or leaked if the
        // ring never quiesces). The socket is dropped only once nothing is pending on it.
        unsafe { self.push(entry) };
    }

    /// Asks the kernel to end operation `op` early; its last completion follows.
    fn cancel(&mut self, op: Op) {
        let entry = opcode::AsyncCancel::new(op.encode())
            .build()
            .user_data(Op::Cancel.encode());
        // SAFETY: a cancellation by `user_data` points at no memory.
        unsafe { self.push(entry) };
    }

    fn on_accept(&mut self, now: Now, gate: Gate, result: i32, flags: u32) {
        if result >= 0 {
            // SAFETY: a successful accept's result is a new descriptor that only we hold.
            let stream = unsafe { TcpStream::from_raw_fd(result) };
            let transport = match gate {
                Gate::Tcp => Transport::Tcp,
                Gate::Ws => Transport::Ws,
            };
            self.add(now, stream, transport);
        }
        if cqueue::more(flags) {
            return;
        }
        if let Some(gateway) = self.gateway(gate) {
            gateway.armed = false;
        }
        match -result {
            EMFILE | ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                self.base
                    .pause_accept(now, &io::Error::from_raw_os_error(-result));
            }
            // The multishot accept ended on its own (success), was cancelled, or met a transient
            // error: accept again.
            ..=0 | libc::ECANCELED | libc::ECONNABORTED | libc::EINTR | libc::EAGAIN => {}
            _ => {
                // Do not spin on an error that may persist: try again after a pause.
                self.base
                    .pause_accept(now, &io::Error::from_raw_os_error(-result));
            }
        }
        self.arm_accept(gate);
    }

    /// Registers an accepted connection and starts receiving on it.
    fn add(&mut self, now: Now, stream: TcpStream, transport: Transport) {
        if self.base.shutting_down {
            return;
        }
        // AcceptMulti cannot return each connection's address: ask for it.
        let Ok(peer) = stream.peer_addr() else {
            return;
        };
        // Refused: closed at once (dropped).
        let Some(ticket) = self.base.admit(now, peer) else {
            return;
        };
        // TCP_NODELAY and SO_KEEPALIVE come from the listener (`bind_tcp`).
        let key = self.socks.insert(Sock::new(stream));
        let index = self
            .base
            .open(now, key, ConnState::new(transport, peer), ticket);
        if let Some(sock) = self.socks.get_mut(key) {
            sock.conn = Some(index);
        }
        self.arm_recv(key);
    }

    /// Registers a connection that migrated here and finishes its login.
    fn adopt(&mut self, now: Now, migrant: Migrant) {
        let Migrant {
            stream,
            conn,
            adopt,
        } = migrant;
        let key = self.socks.insert(Sock::new(stream));
        let index = self.base.adopt(now, key, conn, adopt);
        if let Some(sock) = self.socks.get_mut(key) {
            sock.conn = Some(index);
        }
        self.arm_recv(key);
        // Bytes that arrived behind the login came along in the receive buffer.
        self.process(now, index);
    }

    fn process(&mut self, now: Now, index: usize) {
        if let Some((core, adopt)) = self.base.process(now, index) {
            self.migrate(index, core, adopt);
        }
    }

    fn on_recv(&mut self, now: Now, key: usize, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let shutting_down = self.base.shutting_down;
        let Some(sock) = self.socks.get_mut(key) else {
            // Not reached (a socket outlives its operations); still, return the buffer.
            if let Some(bid) = cqueue::buffer_select(flags) {
                self.tcp_buffers.recycle(bid);
            }
            return;
        };
        if !more {
            sock.receiving = false;
        }
        let conn = sock.conn;
        // The bytes were parsed in the provided buffer itself (then the migration it asked for).
        let mut in_place = None;
        if let Some(bid) = cqueue::buffer_select(flags) {
            let len = usize::try_from(result).unwrap_or(0);
            if !shutting_down {
                match conn.filter(|&index| self.base.takes_in_place(index)) {
                    // Zero copy: frames are cut, unmasked (WebSocket) and decoded where the kernel
                    // put them; only a trailing partial frame, a WebSocket control frame or
                    // fragment, or what follows a close or migration is copied.
                    Some(index) => {
                        let received = self.tcp_buffers.bytes_mut(bid, len);
                        in_place = Some(self.base.process_received(now, index, received));
                    }
                    // A connection with input already buffered, a WebSocket upgrading or
                    // reassembling a fragmented message, closing, or leaving: append.
                    None => {
                        let received = self.tcp_buffers.bytes(bid, len);
                        match conn {
                            Some(index) => {
                                // Over the receive bound, it is aborted and closed at the flush.
                                self.base.absorb(index, received);
                            }
                            None => {
                                let max = self.base.limits.tcp_max_body;
                                if let Some(leaving) =
                                    self.socks.get_mut(key).and_then(|s| s.leaving.as_mut())
                                {
                                    leaving.state.absorb(received, max);
                                }
                            }
                        }
                    }
                }
            }
            self.tcp_buffers.recycle(bid);
        }
        let Some(index) = conn else {
            self.settle(key);
            return;
        };
        match result {
            1.. => match in_place {
                Some(Some((core, adopt))) => {
                    // The connection leaves: its receive is cancelled, not re-armed.
                    self.migrate(index, core, adopt);
                }
                Some(None) => {
                    if !more {
                        self.arm_recv(key);
                    }
                }
                None => {
                    if !shutting_down {
                        self.process(now, index);
                    }
                    if !more {
                        self.arm_recv(key);
                    }
                }
            },
            // The peer closed.
            0 => self.close_now(now, index),
            // Out of buffers (they are back by now), or a stale cancellation: receive again.
            _ if matches!(-result, libc::ENOBUFS | libc::ECANCELED) => self.arm_recv(key),
            _ => self.close_now(now, index),
        }
    }

    fn on_send(&mut self, now: Now, key: usize, result: i32) {
        let Some(sock) = self.socks.get_mut(key) else {
            return;
        };
        let Some(mut unsent) = sock.sending.take() else {
            return;
        };
        let sent = usize::try_from(result).unwrap_or(0).min(unsent.len());
        let failed = (result < 0 && result != -libc::ECANCELED) || (result == 0 && sent == 0);
        unsent.advance(sent);
        match (sock.conn, &mut sock.leaving) {
            (Some(index), _) if failed => self.close_now(now, index),
            (Some(index), _) => {
                let mut pending = false;
                if let Some(conn) = self.base.conns.get_mut(index) {
                    conn.state.in_flight = 0;
                    requeue(unsent, &mut conn.state.tx);
                    pending = !conn.state.tx.is_empty();
                    conn.state.release_empty_buffers();
                }
                self.base.wrote(now, index, sent > 0, pending);
                // Send the rest, or carry out a close that waited for this send.
                self.base.dirty.push(index);
            }
            (None, Some(leaving)) => {
                leaving.state.in_flight = 0;
                requeue(unsent, &mut leaving.state.tx);
                self.settle(key);
            }
            (None, None) => self.settle(key),
        }
    }

    fn on_datagram(&mut self, now: Now, result: i32, flags: u32) {
        if let Some(bid) = cqueue::buffer_select(flags) {
            let len = usize::try_from(result).unwrap_or(0);
            let received = datagram(self.udp_buffers.bytes(bid, len), &self.lent.udp_msg);
            if let (Some((from, received, kept)), false) = (received, self.base.shutting_down) {
                // Decoded in the provided buffer itself (copied only if forwarded to another
                // core), which goes back to the kernel right after.
                if let Some(bytes) = self.udp_buffers.bytes_mut(bid, len).get_mut(kept) {
                    self.base.datagram(now, from, received, bytes);
                }
            }
            self.udp_buffers.recycle(bid);
        }
        if cqueue::more(flags) {
            return;
        }
        self.udp_receiving = false;
        if result < 0 && !matches!(-result, libc::ENOBUFS | libc::ECANCELED | libc::EINTR) {
            // ICMP errors from earlier sends may surface here; they concern one peer only.
            tracing::debug!(error = %io::Error::from_raw_os_error(-result), "UDP receive error");
        }
        self.arm_udp();
    }

    fn on_wake(&mut self, result: i32) {
        self.waking = false;
        if result < 0 && result != -libc::ECANCELED {
            tracing::debug!(error = %io::Error::from_raw_os_error(-result), "eventfd read failed");
        }
        self.arm_wake();
    }

    /// Sends a connection to `core`: it leaves the shared state now, and is mailed once this
    /// ring has let go of its socket (see `settle`).
    fn migrate(&mut self, index: usize, core: CoreId, adopt: Adopt) {
        let Some(conn) = self.base.take(index) else {
            return;
        };
        let key = conn.sock;
        let Some(sock) = self.socks.get_mut(key) else {
            return;
        };
        sock.conn = None;
        sock.leaving = Some(Box::new(Leaving {
            state: conn.state,
            core,
            adopt,
        }));
        self.cancel_pending(key);
    }

    /// Cancels the receive and send pending on a socket, then settles it (see [`Self::settle`]).
    fn cancel_pending(&mut self, key: usize) {
        let Some(sock) = self.socks.get(key) else {
            return;
        };
        let (receiving, sending) = (sock.receiving, sock.sending.is_some());
        if receiving {
            self.cancel(Op::Recv(key));
        }
        if sending {
            self.cancel(Op::Send(key));
        }
        self.settle(key);
    }

    /// Drops a connection, tells the shard, and ends what is pending on its socket.
    fn close_now(&mut self, now: Now, index: usize) {
        let Some(key) = self.base.close(now, index) else {
            return;
        };
        let Some(sock) = self.socks.get_mut(key) else {
            return;
        };
        sock.conn = None;
        // Ends the pending receive (it completes with 0) and send (EPIPE) promptly; the
        // cancellations make sure.
        let _ = sock.stream.shutdown(Shutdown::Both);
        self.cancel_pending(key);
    }

    /// Finishes with a socket whose connection closed or left, once nothing is pending on it: a
    /// leaving one is mailed to its new core, a closed one dropped (which closes it).
    fn settle(&mut self, key: usize) {
        let Some(sock) = self.socks.get(key) else {
            return;
        };
        if sock.conn.is_some() || sock.receiving || sock.sending.is_some() {
            return;
        }
        let Some(sock) = self.socks.try_remove(key) else {
            return;
        };
        if let Some(leaving) = sock.leaving {
            let Leaving { state, core, adopt } = *leaving;
            let migrant = Migrant {
                stream: sock.stream,
                conn: state,
                adopt,
            };
            // A migrating connection is never refused (not refusable mail, see `mesh`).
            let _ = self
                .base
                .outgoing
                .send(core, Mail::Adopt(Box::new(migrant)));
        }
    }

    /// Issues a send for every connection with queued output and none in flight; closes those
    /// whose close was asked for once everything is written.
    fn flush(&mut self, now: Now) {
        while let Some(index) = self.base.dirty.pop() {
            let Some(conn) = self.base.conns.get_mut(index) else {
                continue;
            };
            if let Some((core, adopt)) = conn.migrate.take() {
                // Asked for by mail (a verify's answer): the connection leaves now.
                self.migrate(index, core, adopt);
                continue;
            }
            if conn.state.aborted {
                // Even with a send in flight: closing ends it.
                self.close_now(now, index);
                continue;
            }
            let key = conn.sock;
            if self
                .socks
                .get(key)
                .is_none_or(|sock| sock.sending.is_some())
            {
                // The send's completion brings the connection back here.
                continue;
            }
            if !conn.state.tx.is_empty() {
                let bytes = conn.state.tx.split();
                conn.state.in_flight = bytes.len();
                self.send(key, bytes);
                self.base.wrote(now, index, false, true);
            } else if conn.state.closing {
                self.close_now(now, index);
            }
        }
    }

    /// Shutdown: say goodbye on every connection, let the ring write what it can for a moment,
    /// close.
    fn close_all(&mut self) {
        let now = base::now();
        for index in self.base.indices() {
            if let Some(conn) = self.base.conns.get_mut(index) {
                conn.state.begin_close();
                self.base.dirty.push(index);
            }
        }
        let deadline = Instant::now() + GOODBYE_GRACE;
        loop {
            self.flush(now);
            let left = deadline.saturating_duration_since(Instant::now());
            if self.base.conns.is_empty() || left.is_zero() || self.wait(Some(left)).is_err() {
                break;
            }
            self.complete(now);
        }
        for index in self.base.indices() {
            self.close_now(now, index);
        }
        self.base.outgoing.flush();
    }

    /// Cancels every pending operation and waits, bounded by [`QUIESCE_GRACE`], for their last
    /// completions. Returns whether nothing is pending any more.
    fn quiesce(&mut self) -> bool {
        // Nothing re-arms from here on.
        self.base.shutting_down = true;
        // Backlogged entries were never submitted: forget them.
        self.in_flight = self.in_flight.saturating_sub(self.backlog.len());
        self.backlog.clear();
        if self.in_flight == 0 {
            return true;
        }
        let entry = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(Op::Cancel.encode());
        // SAFETY: a cancellation points at no memory.
        unsafe { self.push(entry) };
        let deadline = Instant::now() + QUIESCE_GRACE;
        let now = base::now();
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.wait(Some(left)).is_err() {
                break;
            }
            self.complete(now);
        }
        self.in_flight == 0
    }
}

impl Backend for UringCore {
    type Sock = usize;

    fn base(&mut self) -> &mut Base<usize> {
        &mut self.base
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        UringCore::wait(self, timeout)
    }

    fn handle_io(&mut self, now: Now) {
        self.complete(now);
    }

    fn resume_accepting(&mut self, _now: Now) {
        self.arm_accept(Gate::Tcp);
        self.arm_accept(Gate::Ws);
    }

    fn adopt(&mut self, now: Now, migrant: Migrant) {
        UringCore::adopt(self, now, migrant);
    }

    fn flush(&mut self, now: Now) {
        UringCore::flush(self, now);
    }

    fn close_all(&mut self) {
        UringCore::close_all(self);
    }
}

impl Drop for UringCore {
    fn drop(&mut self) {
        if self.quiesce() {
            // SAFETY: dropped once, here; nothing is pending, so the kernel no longer touches it.
            unsafe { ManuallyDrop::drop(&mut self.lent) };
            return;
        }
        // The kernel may still write into the buffers or read a send's bytes: leak them rather
        // than free memory it might use.
        tracing::error!(
            pending = self.in_flight,
            "io_uring operations did not finish: leaking their buffers"
        );
        self.tcp_buffers.leak();
        self.udp_buffers.leak();
        for (_, sock) in &mut self.socks {
            if let Some(bytes) = sock.sending.take() {
                std::mem::forget(bytes);
            }
        }
    }
}
