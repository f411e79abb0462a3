//! Provided buffer rings: the memory the kernel receives into. All the `unsafe` that touches
//! memory shared with the kernel lives here.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

use super::MAX_RING_BUFFERS;

/// A provided buffer ring (an io_uring "buffer group"): `count` buffers of `size` bytes that the
/// kernel takes from, one per receive completion, and that the loop gives back as soon as it has
/// handled the bytes (parsed them in place, or copied them out) — in the same turn, so buffers
/// never pile up on the loop's side.
///
/// Memory: a page-aligned ring of `count` 16-byte descriptors shared with the kernel (the tail,
/// which only we advance, sits in the first descriptor's reserved field), and `count × size`
/// bytes of buffers. Both are freed only once the ring has no operation pending, or leaked.
pub(super) struct BufRing {
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
pub(super) struct RawBufDescriptor {
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
pub(super) fn page_size() -> usize {
    // SAFETY: sysconf takes no pointers.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(4096)
}

pub(super) fn allocate(layout: Layout) -> io::Result<NonNull<u8>> {
    if layout.size() == 0 {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: the layout's size is not zero.
    NonNull::new(unsafe { alloc::alloc_zeroed(layout) }).ok_or(io::ErrorKind::OutOfMemory.into())
}

impl BufRing {
    /// `count` (a power of two, at most 32768) buffers of `size` bytes for group `group`, all
    /// available to the kernel once registered.
    pub(super) fn new(group: u16, count: u16, size: usize) -> io::Result<Self> {
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
    pub(super) fn register(&self, ring: &IoUring) -> io::Result<()> {
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
    pub(super) fn give_back(&mut self, bid: u16) {
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
    pub(super) fn publish(&self) {
        // SAFETY: the tail is the `u16` reserved field of the first descriptor, inside the
        // page-aligned allocation and so aligned. The kernel only reads it (with acquire
        // ordering); this thread writes it only here, atomically.
        let tail = unsafe {
            AtomicU16::from_ptr(BufRingEntry::tail(self.descriptors.as_ptr()).cast_mut())
        };
        tail.store(self.tail, Ordering::Release);
    }

    /// Gives buffer `bid` back to the kernel at once.
    pub(super) fn recycle(&mut self, bid: u16) {
        self.give_back(bid);
        self.publish();
    }

    /// The first `len` bytes of buffer `bid`, which a completion handed to us.
    pub(super) fn bytes(&self, bid: u16, len: usize) -> &[u8] {
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
    pub(super) fn bytes_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
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
    pub(super) fn leak(&mut self) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use std::os::fd::AsRawFd;

    use io_uring::types::Fd;
    use io_uring::{cqueue, opcode, squeue};

    use super::super::{build_ring, probe, EventFd};
    use super::*;
    use crate::runtime::mesh::Wake;

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
