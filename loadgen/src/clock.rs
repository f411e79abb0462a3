//! Clocks: CLOCK_MONOTONIC nanoseconds, comparable across the worker processes of one machine (so
//! a receive time in one process can be subtracted from an intended send time set in another),
//! and the conversion to [`Instant`] for the protocol's session, which counts in `Instant`s.
//! Also the CPU time of the calling thread, for the loadgen's own saturation report.

use std::time::{Duration, Instant};

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Maps monotonic nanoseconds to `Instant`s (both are CLOCK_MONOTONIC on Linux; the anchor only
/// converts between the representations).
#[derive(Debug, Clone, Copy)]
pub struct Anchor {
    instant: Instant,
    ns: u64,
}

impl Anchor {
    /// Reads both clocks now.
    pub fn now() -> Self {
        Self {
            instant: Instant::now(),
            ns: mono_ns(),
        }
    }

    /// The `Instant` of monotonic time `ns`.
    pub fn instant(&self, ns: u64) -> Instant {
        if ns >= self.ns {
            self.instant + Duration::from_nanos(ns - self.ns)
        } else {
            self.instant
                .checked_sub(Duration::from_nanos(self.ns - ns))
                .unwrap_or(self.instant)
        }
    }

    /// The monotonic nanoseconds of `instant`.
    pub fn ns(&self, instant: Instant) -> u64 {
        match instant.checked_duration_since(self.instant) {
            Some(d) => self
                .ns
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            None => self.ns.saturating_sub(
                u64::try_from(self.instant.duration_since(instant).as_nanos()).unwrap_or(0),
            ),
        }
    }
}

/// User plus system CPU time of the calling thread, in nanoseconds: `CLOCK_THREAD_CPUTIME_ID`,
/// exact to the nanosecond (`/proc/thread-self/stat` counts in clock ticks of 10 ms, which rounds
/// a short run's CPU down to zero), else `/proc/thread-self/stat` fields 14 and 15. `None` where
/// neither is available.
pub fn thread_cpu_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
        let secs = u64::try_from(ts.tv_sec).ok()?;
        let nanos = u64::try_from(ts.tv_nsec).ok()?;
        return Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos));
    }
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    cpu_ns_from_stat(&stat, clock_ticks())
}

/// User plus system CPU time from the text of a `/proc/<pid>/stat` file.
pub fn cpu_ns_from_stat(stat: &str, ticks_per_s: u64) -> Option<u64> {
    // The command name (field 2) may contain spaces: fields are counted after its closing ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_ascii_whitespace();
    // After ')': field 3 is the state; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime).saturating_mul(1_000_000_000) / ticks_per_s.max(1))
}

/// Clock ticks per second of `/proc` CPU times.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// Turns transparent huge pages off for this process: mimalloc's arena is `MADV_HUGEPAGE`, and
/// clearing 2 MiB pages on first touch showed up as the top item of a login burst's profile.
pub fn disable_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and affects this process alone.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

/// Raises the soft limit of open files to the hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit with cur ≤ max.
        unsafe {
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let stat = "1234 (my prog) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(cpu_ns_from_stat(stat, 100), Some(3_000_000_000));
        assert_eq!(cpu_ns_from_stat("garbage", 100), None);
    }

    #[test]
    fn anchor_round_trips() {
        let a = Anchor::now();
        let ns = mono_ns() + 5_000;
        assert_eq!(a.ns(a.instant(ns)), ns);
        assert!(thread_cpu_ns().is_some());
    }
}
