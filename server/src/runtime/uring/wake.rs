//! A core's wake-up through its ring: an eventfd.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};

use crate::runtime::mesh::Wake;

/// A core's wake-up: an eventfd on which the core's ring keeps a read pending. Other cores add to
/// its counter ([`Wake`]), which completes the read and ends the core's wait.
///
/// It is a blocking eventfd on purpose: the ring reads it without blocking anyway (and falls
/// back to polling it), while a non-blocking one could make some kernels fail the read with
/// EAGAIN instead of waiting. Writing blocks only if the counter would overflow, and the ring's
/// read resets it every turn.
#[derive(Debug)]
pub struct EventFd(pub(super) File);

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use std::io::Read;

    use super::*;

    #[test]
    fn wakes_add_to_the_eventfd_counter() {
        let waker = EventFd::new().unwrap();
        waker.wake();
        waker.wake();
        let mut counter = [0u8; 8];
        (&waker.0).read_exact(&mut counter).unwrap();
        assert_eq!(u64::from_ne_bytes(counter), 2);
    }
}
