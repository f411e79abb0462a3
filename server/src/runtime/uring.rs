//! The io_uring backend (on the `io-uring` crate): one ring per core, set up with
//! `IORING_SETUP_SINGLE_ISSUER` + `IORING_SETUP_DEFER_TASKRUN` (only the core's thread submits,
//! and completions are produced only when it asks for them, in its own wait), owning its
//! listeners, connections, UDP socket and shard. What does not depend on io_uring is in
//! [`super::base`], shared with the epoll loop.
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

use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::net::{Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use imedge_protocol::frame::udp;
use imedge_protocol::session::Transport;
use io_uring::types::{BufRingEntry, CancelBuilder, Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};
use slab::Slab;

use super::admit::Admission;
use super::base::{self, Base, EMFILE, ENFILE};
use super::conn::ConnState;
use super::mesh::{Mail, Mesh, Migrant, Wake};
use super::{Limits, Listeners};
use crate::shard::{Adopt, CoreId, Now, Shard};

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

/// Size of a UDP buffer: the recvmsg header, the sender's address and a payload that can tell a
/// datagram of `max` bytes from a longer one.
fn udp_buffer_size(max_datagram: usize) -> usize {
    RECVMSG_OUT_LEN + UDP_NAME_LEN + udp::recv_buffer_len(max_datagram)
}

/// Checks that the io_uring loop can run here: io_uring is not disabled, a ring builds with the
/// flags the loop uses, the kernel knows every operation it issues, a provided buffer ring
/// registers, and a submit-and-wait with a timeout completes an operation. The last step matters
/// because a sandbox's seccomp filter may allow `io_uring_setup` and still deny
/// `io_uring_enter` or `io_uring_register`.
///
/// The test ring lives on a thread of its own: when a ring is torn down the kernel queues work
/// on every thread that used it with `TWA_SIGNAL`, which interrupts that thread's next blocking
/// system call (a socket read with a timeout then fails with EINTR) — the caller's thread must
/// not get that.
///
/// # Errors
/// Why io_uring cannot be used (the message says what to change).
pub fn probe() -> io::Result<()> {
    std::thread::Builder::new()
        .name("imedge-io-probe".to_owned())
        .spawn(probe_here)?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the io_uring probe panicked")))
}

fn probe_here() -> io::Result<()> {
    let disabled = std::fs::read_to_string(IO_URING_DISABLED)
        .ok()
        .and_then(|text| text.trim().parse::<u8>().ok())
        .unwrap_or(0);
    if disabled >= 2 {
        return Err(unavailable(
            io::ErrorKind::PermissionDenied,
            "it is disabled by the kernel.io_uring_disabled sysctl (2)",
        ));
    }
    let ring = build_ring().map_err(|error| explain(&error, disabled))?;
    if !ring.params().is_feature_ext_arg() || !ring.params().is_feature_nodrop() {
        return Err(unavailable(
            io::ErrorKind::Unsupported,
            "the kernel lacks IORING_FEAT_EXT_ARG or IORING_FEAT_NODROP",
        ));
    }
    let mut ops = Probe::new();
    ring.submitter()
        .register_probe(&mut ops)
        .map_err(|error| explain(&error, disabled))?;
    let needed = [
        (opcode::Accept::CODE, "accept"),
        (opcode::Recv::CODE, "recv"),
        (opcode::RecvMsg::CODE, "recvmsg"),
        (opcode::Send::CODE, "send"),
        (opcode::Read::CODE, "read"),
        (opcode::AsyncCancel::CODE, "async_cancel"),
    ];
    if let Some((_, name)) = needed.iter().find(|(code, _)| !ops.is_supported(*code)) {
        return Err(unavailable(
            io::ErrorKind::Unsupported,
            &format!(
                "the kernel does not support IORING_OP_{}",
                name.to_uppercase()
            ),
        ));
    }
    let buffers = BufRing::new(TCP_GROUP, 1, 64)?;
    buffers
        .register(&ring)
        .map_err(|error| explain(&error, disabled))?;
    let _ = ring.submitter().unregister_buf_ring(TCP_GROUP);
    let mut ring = ring;
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a no-op uses no memory.
    if unsafe { ring.submission().push(&nop) }.is_err() {
        return Err(unavailable(
            io::ErrorKind::Other,
            "its submission queue is full",
        ));
    }
    let timeout = Timespec::from(Duration::from_secs(1));
    let args = SubmitArgs::new().timespec(&timeout);
    ring.submitter()
        .submit_with_args(1, &args)
        .map_err(|error| explain(&error, disabled))?;
    if ring.completion().next().is_none_or(|cqe| cqe.result() != 0) {
        return Err(unavailable(
            io::ErrorKind::Other,
            "a no-op submitted to a test ring did not complete",
        ));
    }
    Ok(())
}

fn unavailable(kind: io::ErrorKind, why: &str) -> io::Error {
    io::Error::new(kind, format!("io_uring is unavailable: {why}"))
}

/// Turns a failed io_uring system call into the reason io_uring is unavailable.
fn explain(error: &io::Error, disabled: u8) -> io::Error {
    let why = match error.raw_os_error() {
        Some(libc::ENOSYS) => {
            "the kernel has no io_uring (ENOSYS: too old, built without it, or hidden by a seccomp \
             filter)"
                .to_owned()
        }
        Some(libc::EPERM | libc::EACCES) if disabled == 1 => {
            "not permitted: kernel.io_uring_disabled=1 limits it to privileged processes and \
             kernel.io_uring_group"
                .to_owned()
        }
        Some(libc::EPERM | libc::EACCES) => {
            "not permitted (EPERM: a seccomp filter or container policy denies it)".to_owned()
        }
        Some(libc::EINVAL) => {
            "the kernel rejects IORING_SETUP_SINGLE_ISSUER/DEFER_TASKRUN or a provided buffer \
             ring (EINVAL: Linux 6.1 or later is needed)"
                .to_owned()
        }
        Some(libc::ENOMEM) => {
            "the kernel cannot allocate the ring (ENOMEM: memory or RLIMIT_MEMLOCK)".to_owned()
        }
        _ => format!("{error}"),
    };
    unavailable(error.kind(), &why)
}

/// A ring as every core's loop uses it: one submitter thread, completions produced only when
/// that thread waits, and every SQE of a submission attempted even if one fails.
fn build_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_submit_all()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES)
}

/// A core's wake-up: an eventfd on which the core's ring keeps a read pending. Other cores add to
/// its counter ([`Wake`]), which completes the read and ends the core's wait.
///
/// It is a blocking eventfd on purpose: the ring reads it without blocking anyway (and falls
/// back to polling it), while a non-blocking one could make some kernels fail the read with
/// EAGAIN instead of waiting. Writing blocks only if the counter would overflow, and the ring's
/// read resets it every turn.
#[derive(Debug)]
pub struct EventFd(File);

impl EventFd {
    /// A new eventfd with a zero counter.
    ///
    /// # Errors
    /// The process is out of descriptors.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; it returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        Ok(Self(File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }
}

impl Wake for EventFd {
    fn wake(&self) {
        if let Err(error) = (&self.0).write_all(&1u64.to_ne_bytes()) {
            tracing::warn!(%error, "cannot wake a core");
        }
    }
}

/// A provided buffer ring (an io_uring "buffer group"): `count` buffers of `size` bytes that the
/// kernel takes from, one per receive completion, and that the loop gives back as soon as it has
/// handled the bytes (parsed them in place, or copied them out) — in the same turn, so buffers
/// never pile up on the loop's side.
///
/// Memory: a page-aligned ring of `count` 16-byte descriptors shared with the kernel (the tail,
/// which only we advance, sits in the first descriptor's reserved field), and `count × size`
/// bytes of buffers. Both are freed only once the ring has no operation pending, or leaked.
struct BufRing {
    descriptors: NonNull<BufRingEntry>,
    descriptors_layout: Layout,
    buffers: NonNull<u8>,
    buffers_layout: Layout,
    count: u16,
    size: usize,
    /// Our tail: the buffers described before it are the kernel's to take.
    tail: u16,
    group: u16,
    /// Free the memory when dropped; cleared when the kernel might still use it.
    owned: bool,
}

/// `struct io_uring_buf`, the kernel's layout of a provided buffer descriptor (the same as
/// `io_uring`'s opaque [`BufRingEntry`]), so that each field can be written on its own: the
/// `resv` of the first descriptor is the ring's tail, which must not be covered by a `&mut`.
#[repr(C)]
struct RawBufDescriptor {
    addr: u64,
    len: u32,
    bid: u16,
    /// The ring's tail, in the first descriptor; never written through this struct.
    resv: u16,
}

const _: () = assert!(size_of::<RawBufDescriptor>() == size_of::<BufRingEntry>());

impl std::fmt::Debug for BufRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRing")
            .field("group", &self.group)
            .field("count", &self.count)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// The system's page size (the alignment the kernel wants for a buffer ring).
fn page_size() -> usize {
    // SAFETY: sysconf takes no pointers.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(4096)
}

fn allocate(layout: Layout) -> io::Result<NonNull<u8>> {
    if layout.size() == 0 {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: the layout's size is not zero.
    NonNull::new(unsafe { alloc::alloc_zeroed(layout) }).ok_or(io::ErrorKind::OutOfMemory.into())
}

impl BufRing {
    /// `count` (a power of two, at most 32768) buffers of `size` bytes for group `group`, all
    /// available to the kernel once registered.
    fn new(group: u16, count: u16, size: usize) -> io::Result<Self> {
        if !count.is_power_of_two() || count > MAX_RING_BUFFERS || size == 0 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let count_usize = usize::from(count);
        let descriptors_layout =
            Layout::from_size_align(count_usize * size_of::<BufRingEntry>(), page_size())
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let buffers_layout = Layout::from_size_align(
            count_usize
                .checked_mul(size)
                .ok_or(io::ErrorKind::InvalidInput)?,
            page_size(),
        )
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let descriptors = allocate(descriptors_layout)?.cast::<BufRingEntry>();
        let buffers = match allocate(buffers_layout) {
            Ok(buffers) => buffers,
            Err(error) => {
                // SAFETY: allocated just above with this layout, never shared.
                unsafe { alloc::dealloc(descriptors.as_ptr().cast(), descriptors_layout) };
                return Err(error);
            }
        };
        // Touch every page now: the kernel hands buffers out round the ring, so under traffic
        // they all become resident anyway, and an idle server's RSS should be what it will be
        // under load rather than grow with the first burst. (Volatile: the compiler may not
        // drop writes of zeros to zeroed memory.)
        for offset in (0..buffers_layout.size()).step_by(page_size()) {
            // SAFETY: `offset` is inside the block just allocated, which nothing else uses yet.
            unsafe { buffers.as_ptr().add(offset).write_volatile(0) };
        }
        let mut ring = Self {
            descriptors,
            descriptors_layout,
            buffers,
            buffers_layout,
            count,
            size,
            tail: 0,
            group,
            owned: true,
        };
        for bid in 0..count {
            ring.give_back(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// Registers the ring with `ring`'s kernel side under its group id.
    fn register(&self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the descriptors stay allocated until this `BufRing` is dropped, which happens
        // only after the io_uring has no operation pending (`UringCore`'s `Drop`), or never.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.descriptors.as_ptr() as u64,
                self.count,
                self.group,
                0,
            )
        }
    }

    /// Describes buffer `bid` at the tail; the kernel sees it after [`BufRing::publish`].
    fn give_back(&mut self, bid: u16) {
        if bid >= self.count {
            return;
        }
        let slot = usize::from(self.tail & (self.count - 1));
        let addr = self.buffers.as_ptr() as u64 + u64::from(bid) * self.size as u64;
        let len = u32::try_from(self.size).unwrap_or(u32::MAX);
        // SAFETY: `slot < count`, so the descriptor lies inside the allocation, aligned (the
        // ring is page-aligned and descriptors are 16 bytes). The kernel reads only the
        // descriptors between its head and the published tail; this one is at the tail, so
        // nothing else reads it now (at most `count` buffers are ever described, so the tail
        // never laps the head). Its three fields are written through raw pointers, never through
        // a `&mut` to the whole descriptor: the first descriptor's last field is the ring's
        // tail, which the kernel reads concurrently.
        unsafe {
            let descriptor = self
                .descriptors
                .as_ptr()
                .add(slot)
                .cast::<RawBufDescriptor>();
            std::ptr::addr_of_mut!((*descriptor).addr).write(addr);
            std::ptr::addr_of_mut!((*descriptor).len).write(len);
            std::ptr::addr_of_mut!((*descriptor).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers given back so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail is the `u16` reserved field of the first descriptor, inside the
        // page-aligned allocation and so aligned. The kernel only reads it (with acquire
        // ordering); this thread writes it only here, atomically.
        let tail = unsafe {
            AtomicU16::from_ptr(BufRingEntry::tail(self.descriptors.as_ptr()).cast_mut())
        };
        tail.store(self.tail, Ordering::Release);
    }

    /// Gives buffer `bid` back to the kernel at once.
    fn recycle(&mut self, bid: u16) {
        self.give_back(bid);
        self.publish();
    }

    /// The first `len` bytes of buffer `bid`, which a completion handed to us.
    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= self.count {
            return &[];
        }
        let len = len.min(self.size);
        // SAFETY: `bid < count` and `len <= size` keep the slice inside the allocation. The
        // kernel wrote these bytes before posting the completion that named `bid`, and takes the
        // buffer again only after `recycle(bid)`, which needs `&mut self` and so cannot happen
        // while this borrow lives.
        unsafe {
            std::slice::from_raw_parts(self.buffers.as_ptr().add(usize::from(bid) * self.size), len)
        }
    }

    /// The first `len` bytes of buffer `bid`, which a completion handed to us, to parse in
    /// place (simd-json unescapes strings where they lie).
    fn bytes_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        if bid >= self.count {
            return &mut [];
        }
        let len = len.min(self.size);
        // SAFETY: `bid < count` and `len <= size` keep the slice inside the allocation, and
        // inside buffer `bid` alone. The kernel wrote these bytes before posting the completion
        // that named `bid` and took the buffer off the ring then: it writes into it again only
        // after `recycle(bid)` describes it anew, which needs `&mut self` and so cannot happen
        // while this borrow lives. Nothing else on our side aliases the buffer meanwhile (`bytes`
        // needs `&self`).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.buffers.as_ptr().add(usize::from(bid) * self.size),
                len,
            )
        }
    }

    /// Keeps the memory allocated for good: the kernel might still use it.
    fn leak(&mut self) {
        self.owned = false;
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // SAFETY: both blocks were allocated in `new` with these layouts and are freed only
        // here; `owned` is cleared whenever the kernel might still use them.
        unsafe {
            alloc::dealloc(self.descriptors.as_ptr().cast(), self.descriptors_layout);
            alloc::dealloc(self.buffers.as_ptr(), self.buffers_layout);
        }
    }
}

/// Which listener an accept is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Tcp,
    Ws,
}

/// What a completion is about, carried in its SQE's `user_data`: the kind of operation in the
/// high half and, for a connection's operations, its socket's key in the low half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Accept(Gate),
    UdpRecv,
    Wake,
    Recv(usize),
    Send(usize),
    /// A cancellation (its own completion carries nothing we need).
    Cancel,
}

impl Op {
    fn encode(self) -> u64 {
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

    fn decode(user_data: u64) -> Option<Self> {
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

/// A listening socket and whether its multishot accept is armed.
#[derive(Debug)]
struct Gateway {
    listener: TcpListener,
    armed: bool,
}

/// A TCP or WebSocket socket on this ring and what is pending on it. It outlives its connection
/// in [`Base::conns`] until its last completion is in.
#[derive(Debug)]
struct Sock {
    stream: TcpStream,
    /// Its connection (index in `Base::conns`); `None` once closed or leaving.
    conn: Option<usize>,
    /// A multishot receive is armed (until its last completion).
    receiving: bool,
    /// The bytes of the send in flight: the kernel reads them until its completion.
    sending: Option<BytesMut>,
    /// The connection is moving to another core and waits here for the kernel to let go.
    leaving: Option<Box<Leaving>>,
}

/// A connection on its way to another core.
#[derive(Debug)]
struct Leaving {
    state: ConnState,
    core: CoreId,
    adopt: Adopt,
}

impl Sock {
    fn new(stream: TcpStream) -> Self {
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
struct Lent {
    /// Where the pending eventfd read puts the counter.
    wake: [u8; 8],
    /// The template of the UDP multishot `RecvMsg`: only its name and control lengths matter.
    udp_msg: libc::msghdr,
}

/// Puts `unsent` back in front of `tx` (what was queued since the send was issued).
fn requeue(mut unsent: BytesMut, tx: &mut BytesMut) {
    if unsent.is_empty() {
        return;
    }
    unsent.extend_from_slice(tx);
    *tx = unsent;
}

/// A socket address as the kernel wrote it (`sockaddr_in` or `sockaddr_in6`).
fn sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(name.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(ip.into(), port)))
        }
        libc::AF_INET6 => {
            // Like std, the flow label and scope id are taken as the kernel stores them.
            let flowinfo = u32::from_ne_bytes(name.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope_id = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip.into(),
                port,
                flowinfo,
                scope_id,
            )))
        }
        _ => None,
    }
}

/// A datagram out of a multishot `RecvMsg` buffer: the sender, the datagram's real length
/// (larger than the bytes kept if it was truncated) and where the bytes kept lie in `buffer`
/// (after the header, the name field and the control field, as `RecvMsgOut::parse` lays them
/// out), to be decoded there.
// `msg_controllen` is a `usize` with glibc and a `u32` with musl.
#[allow(clippy::useless_conversion)]
fn datagram(buffer: &[u8], msg: &libc::msghdr) -> Option<(SocketAddr, usize, Range<usize>)> {
    let out = RecvMsgOut::parse(buffer, msg).ok()?;
    let from = sockaddr(out.name_data())?;
    let received = usize::try_from(out.incoming_payload_len()).unwrap_or(usize::MAX);
    let start = RECVMSG_OUT_LEN
        + usize::try_from(msg.msg_namelen).ok()?
        + usize::try_from(msg.msg_controllen).ok()?;
    let kept = start..start + out.payload_data().len();
    Some((from, received, kept))
}

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

    /// Runs until a [`Mail::Shutdown`] has been handled.
    pub fn run(mut self) -> io::Result<()> {
        while !self.base.shutting_down {
            let timeout = self.base.wait_timeout();
            self.wait(timeout)?;
            let now = base::now();
            self.complete(now);
            // Carry out what the completions finished — a close that waited for its last send,
            // the rest of a partial send — before any mail is answered: a peer that saw its
            // goodbye must not be reported online by a question asked after it.
            self.flush(now);
            if self.base.accept_pause_over(now) {
                self.arm_accept(Gate::Tcp);
                self.arm_accept(Gate::Ws);
            }
            while let Some(migrant) = self.base.drain_inbox(now) {
                self.adopt(now, *migrant);
            }
            self.base.run_timers(now);
            self.flush(now);
            self.base.outgoing.flush();
        }
        self.close_all();
        // Dropping `self` cancels what is still pending and waits for it (`quiesce`).
        Ok(())
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
            if conn.migrate.is_some() {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use std::io::Read;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

    /// The bytes of `addr` as the kernel writes a socket address.
    fn kernel_bytes(addr: SocketAddr) -> Vec<u8> {
        let addr = socket2::SockAddr::from(addr);
        let len = usize::try_from(addr.len()).unwrap();
        // SAFETY: `as_ptr` points at a sockaddr of `len` initialised bytes owned by `addr`.
        unsafe { std::slice::from_raw_parts(addr.as_ptr().cast::<u8>(), len) }.to_vec()
    }

    #[test]
    fn socket_addresses_parse_as_the_kernel_writes_them() {
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 7901);
        let v6 = SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            3000,
            0x12345,
            3,
        ));
        assert_eq!(sockaddr(&kernel_bytes(v4)), Some(v4));
        assert_eq!(sockaddr(&kernel_bytes(v6)), Some(v6));
        // Truncated or of another family: no address.
        assert_eq!(sockaddr(&kernel_bytes(v4)[..6]), None);
        assert_eq!(sockaddr(&kernel_bytes(v6)[..20]), None);
        assert_eq!(sockaddr(&[0; 16]), None);
        assert_eq!(sockaddr(&[]), None);
    }

    /// A buffer as a multishot `RecvMsg` fills it: header, name field, payload.
    fn recvmsg_buffer(from: SocketAddr, payload: &[u8], incoming: u32, truncated: bool) -> Vec<u8> {
        let name = kernel_bytes(from);
        let mut buffer = Vec::new();
        buffer.extend_from_slice(&u32::try_from(name.len()).unwrap().to_ne_bytes());
        buffer.extend_from_slice(&0u32.to_ne_bytes());
        buffer.extend_from_slice(&incoming.to_ne_bytes());
        let flags = if truncated { libc::MSG_TRUNC as u32 } else { 0 };
        buffer.extend_from_slice(&flags.to_ne_bytes());
        assert_eq!(buffer.len(), RECVMSG_OUT_LEN);
        let mut field = name;
        field.resize(UDP_NAME_LEN, 0);
        buffer.extend_from_slice(&field);
        buffer.extend_from_slice(payload);
        buffer
    }

    fn template() -> libc::msghdr {
        // SAFETY: an all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_namelen = UDP_NAME_LEN as u32;
        msg
    }

    #[test]
    fn datagrams_come_out_of_recvmsg_buffers_with_their_real_length() {
        let from: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let buffer = recvmsg_buffer(from, b"{\"type\":0}", 10, false);
        let (addr, received, kept) = datagram(&buffer, &template()).unwrap();
        assert_eq!(
            (addr, received, &buffer[kept]),
            (from, 10, &b"{\"type\":0}"[..])
        );

        // Longer than the buffer: the kept bytes are cut, the length says how long it was, and
        // the shard's size check sees the real length.
        let max = 8;
        let kept = udp::recv_buffer_len(max);
        let buffer = recvmsg_buffer(from, &vec![b'x'; kept], 5000, true);
        let (_, received, bytes) = datagram(&buffer, &template()).unwrap();
        assert_eq!((received, bytes.len()), (5000, kept));
        assert_eq!(bytes.end, buffer.len());
        assert!(udp::decode(received, max).is_err());

        // A buffer too short for the header and name: nothing.
        assert!(datagram(&buffer[..RECVMSG_OUT_LEN], &template()).is_none());
    }

    #[test]
    fn udp_buffers_hold_a_datagram_one_byte_over_the_limit() {
        let size = udp_buffer_size(2048);
        assert_eq!(size, RECVMSG_OUT_LEN + UDP_NAME_LEN + 2049);
    }

    /// The descriptors of a ring, as the kernel would read them: (addr, len, bid).
    fn descriptors(ring: &BufRing) -> Vec<(u64, u32, u16)> {
        (0..usize::from(ring.count))
            .map(|slot| {
                // SAFETY: slot < count; nothing else accesses the ring in this test.
                let d = unsafe { &*ring.descriptors.as_ptr().add(slot) };
                (d.addr(), d.len(), d.bid())
            })
            .collect()
    }

    fn published_tail(ring: &BufRing) -> u16 {
        // SAFETY: as in `publish`.
        unsafe { AtomicU16::from_ptr(BufRingEntry::tail(ring.descriptors.as_ptr()).cast_mut()) }
            .load(Ordering::Acquire)
    }

    #[test]
    fn buffer_ring_describes_every_buffer_and_takes_them_back_in_order() {
        let mut ring = BufRing::new(3, 4, 100).unwrap();
        let base = ring.buffers.as_ptr() as u64;
        assert_eq!(published_tail(&ring), 4);
        assert_eq!(
            descriptors(&ring),
            vec![
                (base, 100, 0),
                (base + 100, 100, 1),
                (base + 200, 100, 2),
                (base + 300, 100, 3)
            ]
        );
        assert_eq!(
            ring.descriptors.as_ptr() as usize % page_size(),
            0,
            "the kernel wants a page-aligned ring"
        );

        // The kernel took buffers 2 and 0; they come back in the next slots, wrapping around.
        ring.recycle(2);
        ring.recycle(0);
        assert_eq!(published_tail(&ring), 6);
        let d = descriptors(&ring);
        assert_eq!((d[0], d[1]), ((base + 200, 100, 2), (base, 100, 0)));

        // Reads stay inside the buffer named, whatever the completion claims.
        assert_eq!(ring.bytes(1, 1000).len(), 100);
        assert_eq!(ring.bytes(1, 10).len(), 10);
        assert!(ring.bytes(4, 10).is_empty());
        ring.bytes_mut(1, 3).copy_from_slice(b"abc");
        assert_eq!(ring.bytes(1, 3), b"abc");
        assert_eq!(ring.bytes_mut(1, 1000).len(), 100);
        assert!(ring.bytes_mut(4, 10).is_empty());
        ring.recycle(9); // not a buffer of this ring: ignored
        assert_eq!(published_tail(&ring), 6);
    }

    #[test]
    fn buffer_rings_refuse_sizes_the_kernel_would() {
        assert!(BufRing::new(0, 3, 64).is_err());
        assert!(BufRing::new(0, 0, 64).is_err());
        assert!(BufRing::new(0, 4, 0).is_err());
        assert!(BufRing::new(0, 32_768, 1).is_ok());
    }

    #[test]
    fn wakes_add_to_the_eventfd_counter() {
        let waker = EventFd::new().unwrap();
        waker.wake();
        waker.wake();
        let mut counter = [0u8; 8];
        (&waker.0).read_exact(&mut counter).unwrap();
        assert_eq!(u64::from_ne_bytes(counter), 2);
    }

    #[test]
    fn unavailability_is_explained() {
        let text =
            |errno, disabled| explain(&io::Error::from_raw_os_error(errno), disabled).to_string();
        assert!(text(libc::ENOSYS, 0).contains("ENOSYS"));
        assert!(text(libc::EPERM, 0).contains("seccomp"));
        assert!(text(libc::EPERM, 1).contains("io_uring_disabled=1"));
        assert!(text(libc::EINVAL, 0).contains("6.1"));
        assert!(text(libc::EIO, 0).starts_with("io_uring is unavailable"));
    }

    /// Tearing down a ring interrupts the threads that used it (see `probe`): the caller of
    /// `probe` must not have its next blocking call fail with EINTR.
    #[test]
    fn probing_does_not_interrupt_the_calling_thread() {
        if let Err(error) = probe() {
            eprintln!("skipped: {error}");
            return;
        }
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        for _ in 0..4 {
            let error = socket.recv(&mut [0; 8]).unwrap_err();
            assert!(
                matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "{error}"
            );
        }
    }

    /// The provided buffer ring end to end, without sockets: an eventfd read that lets the kernel
    /// pick a buffer.
    #[test]
    fn the_kernel_reads_into_a_provided_buffer_and_names_it() {
        if let Err(error) = probe() {
            eprintln!("skipped: {error}");
            return;
        }
        let mut ring = build_ring().unwrap();
        let mut buffers = BufRing::new(5, 2, 8).unwrap();
        buffers.register(&ring).unwrap();
        let waker = EventFd::new().unwrap();
        let read = |ring: &mut IoUring| {
            waker.wake();
            let entry = opcode::Read::new(Fd(waker.0.as_raw_fd()), std::ptr::null_mut(), 8)
                .buf_group(5)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(9);
            // SAFETY: the read writes into the buffer ring, which outlives the ring; we wait for
            // the completion below.
            unsafe { ring.submission().push(&entry).unwrap() };
            ring.submit_and_wait(1).unwrap();
            let cqe = ring.completion().next().unwrap();
            assert_eq!((cqe.user_data(), cqe.result()), (9, 8));
            cqueue::buffer_select(cqe.flags()).unwrap()
        };
        let first = read(&mut ring);
        assert_eq!(buffers.bytes(first, 8), &1u64.to_ne_bytes()[..]);
        let second = read(&mut ring);
        assert_ne!(first, second, "a buffer not given back is not reused");
        buffers.recycle(first);
        buffers.recycle(second);
        let third = read(&mut ring);
        assert_eq!(
            third, first,
            "buffers come back in the order they were given back"
        );
        drop(ring);
    }
}
