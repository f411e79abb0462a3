//! CPU time of a process from `/proc/<pid>/stat` (utime + stime, fields 14 and 15, in clock
//! ticks), which counts every thread of the process — an event loop and any helper threads alike;
//! and the busy time of the whole machine from `/proc/stat`, so a run can tell how much CPU other
//! processes took while it measured; and kernel network counters (`/proc/net/snmp`) that tell
//! where lost datagrams went and whether TCP retransmitted.

use std::io;
use std::time::Duration;

/// Index of utime among the fields after the command name's closing `)`: that slice starts at
/// field 3 (state), and utime is field 14 (proc(5)).
const UTIME_AFTER_COMM: usize = 14 - 3;

/// Ticks per second when `sysconf(_SC_CLK_TCK)` fails: the value on every Linux architecture.
const DEFAULT_CLK_TCK: u64 = 100;

/// utime + stime of a `/proc/<pid>/stat` line, in clock ticks. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted from its last `)`.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_ascii_whitespace().skip(UTIME_AFTER_COMM);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Busy time of all CPUs together in a `/proc/stat` text, in clock ticks: user, nice, system,
/// irq, softirq and steal of the aggregate `cpu` line (idle and iowait left out; guest time is
/// already inside user).
pub fn machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = fields.try_into().ok()?;
    Some(user + nice + system + irq + softirq + steal)
}

/// Counter `name` of section `section` (e.g. `"Udp"`) in a `/proc/net/snmp`-style text, where
/// each section is a line of names followed by a line of values.
pub fn net_counter(text: &str, section: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| {
        l.strip_prefix(section)
            .is_some_and(|rest| rest.starts_with(": "))
    });
    let (names, values) = (lines.next()?, lines.next()?);
    let column = names.split_ascii_whitespace().position(|n| n == name)?;
    values.split_ascii_whitespace().nth(column)?.parse().ok()
}

/// Kernel network counters that explain losses and latency tails, machine-wide.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Datagrams dropped because a socket's receive buffer was full (`Udp: RcvbufErrors`).
    pub udp_rcvbuf_errors: u64,
    /// TCP segments retransmitted (`Tcp: RetransSegs`). Loopback loses nothing, so these are
    /// timer-driven: tail-loss probes sent when ACKs stopped for tens of milliseconds (a stalled
    /// CPU holds back the delayed ACKs armed on it).
    pub tcp_retrans_segs: u64,
}

/// Reads [`NetCounters`] from `/proc/net/snmp`.
pub fn net_counters() -> io::Result<NetCounters> {
    let snmp = std::fs::read_to_string("/proc/net/snmp")?;
    let get = |section, name| {
        net_counter(&snmp, section, name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no {section} {name} in /proc/net/snmp"),
            )
        })
    };
    Ok(NetCounters {
        udp_rcvbuf_errors: get("Udp", "RcvbufErrors")?,
        tcp_retrans_segs: get("Tcp", "RetransSegs")?,
    })
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat`'s times.
pub fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks)
        .ok()
        .filter(|&t| t > 0)
        .unwrap_or(DEFAULT_CLK_TCK)
}

/// CPU time (user + system) a process has used so far; `None` for the calling process.
pub fn process_cpu(pid: Option<u32>) -> io::Result<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(&path)?;
    let ticks = cpu_ticks(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unparsable {path}")))?;
    Ok(ticks_to_duration(ticks))
}

/// Busy time of all CPUs together so far (see [`machine_busy_ticks`]).
pub fn machine_busy() -> io::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks = machine_busy_ticks(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/stat"))?;
    Ok(ticks_to_duration(ticks))
}

fn ticks_to_duration(ticks: u64) -> Duration {
    let per_s = clock_ticks_per_s();
    let nanos = u128::from(ticks) * 1_000_000_000 / u128::from(per_s);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utime_and_stime() {
        // A real line, with a command name holding a space and a parenthesis.
        let stat = "4242 (echo (x) y) S 1 4242 4242 0 -1 4194560 1200 0 0 0 321 45 0 0 20 0 1 0 \
                    8000 10000000 500 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(cpu_ticks(stat), Some(321 + 45));
    }

    #[test]
    fn rejects_truncated_lines() {
        assert_eq!(cpu_ticks("1 (a) S 1 2 3"), None);
        assert_eq!(cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn sums_machine_busy_time() {
        let stat = "cpu  100 2 30 5000 7 1 4 9 0 0\ncpu0 50 1 15 2500 3 0 2 4 0 0\n";
        assert_eq!(machine_busy_ticks(stat), Some(100 + 2 + 30 + 1 + 4 + 9));
        assert_eq!(machine_busy_ticks("cpu  1 2 3\n"), None);
    }

    #[test]
    fn finds_net_counters() {
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 7315024 7301 327718 7650317 327712 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 5 0\n";
        assert_eq!(net_counter(snmp, "Udp", "RcvbufErrors"), Some(327_712));
        assert_eq!(net_counter(snmp, "UdpLite", "RcvbufErrors"), Some(5));
        assert_eq!(net_counter(snmp, "Udp", "Nope"), None);
        assert_eq!(net_counter("Ip: 1 2\nIp: 3 4\n", "Udp", "InErrors"), None);
    }

    #[test]
    fn reads_own_process() {
        assert!(process_cpu(None).is_ok());
        assert!(machine_busy().is_ok());
        assert!(net_counters().is_ok());
        assert!(clock_ticks_per_s() > 0);
    }
}
