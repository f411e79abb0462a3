//! The worker's clock wake-ups: one `timerfd` (nanosecond precision, unlike epoll's millisecond
//! timeout, which would add up to a millisecond to every measured latency) armed at the earliest
//! deadline, and a heap of per-client deadlines so that no turn scans all clients.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// What a heap entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The session's `poll_timeout`; valid while the client's armed deadline equals it.
    Session,
    /// A worker-driven login retry; valid while the client's retry generation equals the tag.
    Retry,
}

/// A deadline of one client.
pub type Entry = Reverse<(u64, u32, Kind, u32)>;

/// Per-client deadlines, earliest first. Stale entries are skipped when popped.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Entry>,
}

impl Timers {
    /// Adds a deadline.
    pub fn push(&mut self, at_ns: u64, client: u32, kind: Kind, tag: u32) {
        self.heap.push(Reverse((at_ns, client, kind, tag)));
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((at, ..))| *at)
    }

    /// Takes the earliest entry if it is due at `now_ns`.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<(u64, u32, Kind, u32)> {
        if self.next()? > now_ns {
            return None;
        }
        self.heap.pop().map(|Reverse(e)| e)
    }
}

/// A CLOCK_MONOTONIC timerfd armed at absolute times.
#[derive(Debug)]
pub struct TimerFd {
    fd: OwnedFd,
    armed: Option<u64>,
}

impl TimerFd {
    /// A disarmed, non-blocking timer.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call with constant flags.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The default timer slack (50 µs) would wake the loop up to 50 µs after a send is due,
        // and the open-loop latency counts from the intended time: 1 ns asks for none. (The
        // timer is made on the worker's loop thread, the thread whose slack this sets.)
        // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects only this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        Ok(Self { fd, armed: None })
    }

    /// Fires at monotonic time `at_ns` (at once if it has passed). Re-arming at the same time is
    /// free.
    pub fn arm(&mut self, at_ns: u64) {
        if self.armed == Some(at_ns) {
            return;
        }
        // 0 would disarm the timer: the earliest real time is 1 ns.
        let at = at_ns.max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(at / 1_000_000_000).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::try_from(at % 1_000_000_000).unwrap_or(0),
            },
        };
        // SAFETY: `fd` is a valid timerfd and `spec` a valid itimerspec; the old value is not
        // asked for.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        self.armed = (rc == 0).then_some(at_ns);
    }

    /// Consumes an expiry (after the fd was readable).
    pub fn drain(&mut self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into an 8-byte buffer from a valid, non-blocking fd.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
            )
        };
        self.armed = None;
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_orders_and_pops_due_only() {
        let mut t = Timers::default();
        t.push(30, 1, Kind::Session, 0);
        t.push(10, 2, Kind::Retry, 7);
        t.push(20, 3, Kind::Session, 0);
        assert_eq!(t.next(), Some(10));
        assert_eq!(t.pop_due(5), None);
        assert_eq!(t.pop_due(25), Some((10, 2, Kind::Retry, 7)));
        assert_eq!(t.pop_due(25), Some((20, 3, Kind::Session, 0)));
        assert_eq!(t.pop_due(25), None);
        assert_eq!(t.next(), Some(30));
    }

    #[test]
    fn timerfd_fires() {
        let mut fd = TimerFd::new().unwrap();
        fd.arm(crate::clock::mono_ns());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, bounded wait of 1 s.
        let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
        assert_eq!(n, 1);
        fd.drain();
    }
}
