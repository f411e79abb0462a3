//! Who holds a port: a live process, or nobody — an orphaned socket that outlives a crashed run.
//!
//! After `kill -9` a process's sockets close only once it has fully exited, and with io_uring
//! only once the kernel has torn its rings down: operations still pending on a listener (the
//! multishot accept, a multishot receive) hold its file until the ring's exit work cancels them,
//! which runs asynchronously after the process is gone. Meanwhile the socket is in `LISTEN` with
//! no process, and an immediate restart finds the port taken. Start-up waits for such sockets
//! (see `runtime::claim`) but fails at once when a live process holds the port. Linux only:
//! elsewhere nobody is known to hold anything, and start-up just waits its bounded time.

use std::collections::HashSet;
use std::path::Path;

/// The kind of socket asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// A TCP listener.
    Tcp,
    /// A UDP socket.
    Udp,
}

/// `/proc/net/tcp` state of a listening socket.
const TCP_LISTEN: &str = "0A";
/// `/proc/net/udp` state of an unconnected socket ("closed" in the TCP state names).
const UDP_UNCONNECTED: &str = "07";
/// `PF_EXITING` in `/proc/<pid>/stat`'s flags: the process is dying (its sockets close soon).
const PF_EXITING: u64 = 0x4;

/// Inodes of the sockets bound to local `port` (listening, for TCP), from `/proc/net`.
fn socket_inodes(proc_root: &Path, proto: Proto, port: u16) -> HashSet<u64> {
    let (files, state) = match proto {
        Proto::Tcp => (["net/tcp", "net/tcp6"], TCP_LISTEN),
        Proto::Udp => (["net/udp", "net/udp6"], UDP_UNCONNECTED),
    };
    let mut inodes = HashSet::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(proc_root.join(file)) else {
            continue;
        };
        inodes.extend(text.lines().skip(1).filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let local_port = fields.get(1)?.rsplit(':').next()?;
            let local_port = u16::from_str_radix(local_port, 16).ok()?;
            (local_port == port && *fields.get(3)? == state)
                .then(|| fields.get(9)?.parse::<u64>().ok())
                .flatten()
                .filter(|&inode| inode != 0)
        }));
    }
    inodes
}

/// Processes (not dying) that have one of `inodes` open, as far as this user can see.
fn live_holders(proc_root: &Path, inodes: &HashSet<u64>) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut holders = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).ok().is_some_and(|target| {
                target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
                    .is_some_and(|inode| inodes.contains(&inode))
            })
        });
        if holds && !exiting(&entry.path()) {
            holders.push(pid);
        }
    }
    holders
}

/// Whether the process at `/proc/<pid>` is exiting (`PF_EXITING`).
fn exiting(proc_pid: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(proc_pid.join("stat")) else {
        return true;
    };
    // The command name (field 2) may hold spaces: fields are counted after its ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return false;
    };
    // state ppid pgrp session tty_nr tpgid flags
    let flags = rest
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok());
    let state = rest.split_whitespace().next();
    matches!(state, Some("Z" | "X")) || flags.is_some_and(|f| f & PF_EXITING != 0)
}

/// Who holds `port`: `Some(pids)` of live processes holding a socket bound to it (empty: only
/// orphaned sockets, or dying processes); `None` if no such socket is visible at all (not Linux,
/// or the socket is gone).
pub fn holders(proto: Proto, port: u16) -> Option<Vec<u32>> {
    let root = Path::new("/proc");
    let inodes = socket_inodes(root, proto, port);
    if inodes.is_empty() {
        return None;
    }
    Some(live_holders(root, &inodes))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_listener_of_this_process_is_held_by_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(holders(Proto::Tcp, port), Some(vec![std::process::id()]));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        assert_eq!(holders(Proto::Udp, port), Some(vec![std::process::id()]));
        drop(listener);
    }

    #[test]
    fn a_free_port_has_no_holder() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(holders(Proto::Tcp, port), None);
    }

    #[test]
    fn this_process_is_not_exiting() {
        assert!(!exiting(Path::new("/proc/self")));
        assert!(exiting(Path::new("/proc/no-such-process")));
    }
}
