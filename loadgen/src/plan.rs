//! Who is who: how many workers, which clients each runs, each client's transport, partner,
//! server and source address. Plain functions of the configuration, so every worker computes the
//! same plan on its own.

use std::net::{IpAddr, Ipv4Addr};

use imedge_protocol::session::Transport;

use crate::config::{Config, Scenario};

/// Clients per worker process: the hard limit of open files here is 20,000 per process; each
/// client holds one socket, and a worker needs a few more (epoll, timerfd, pipes, libraries), so
/// 18,000 leaves a margin of 2,000.
pub const CLIENTS_PER_WORKER: usize = 18_000;

/// Connections to one destination from one source address above which sources are spread
/// automatically. The ephemeral port range here (32768–60999) gives ~28k per (source,
/// destination), but long before that the kernel's search for a free port in `connect` grows
/// linear in the ports taken: measured, 19,000 TCP logins from 127.0.0.1 spent two thirds of the
/// loadgen's CPU in `__inet_hash_connect`/`__inet_check_established` and crawled at ~4.5k/s.
/// A few thousand per source keeps that search short.
pub const AUTO_SPREAD_THRESHOLD: usize = 4_000;

/// The loopback sources used when spreading automatically (127.0.0.1 is left to other users).
pub const AUTO_SOURCE_FIRST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Last automatic loopback source.
pub const AUTO_SOURCE_LAST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 250);

/// Index of a transport in per-transport arrays (`[tcp, udp, ws]`).
pub fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Tcp => 0,
        Transport::Udp => 1,
        Transport::Ws => 2,
    }
}

/// The transport at an index of per-transport arrays.
pub fn transport_at(i: usize) -> Transport {
    match i {
        0 => Transport::Tcp,
        1 => Transport::Udp,
        _ => Transport::Ws,
    }
}

/// Workers needed for `clients`, by the per-process file limit.
pub fn workers_needed(clients: usize) -> usize {
    clients.div_ceil(CLIENTS_PER_WORKER).max(1)
}

/// The contiguous range of global client indices of every worker. Shares are even (pairs never
/// straddle two workers) except possibly the last.
pub fn split(clients: usize, workers: usize) -> Vec<std::ops::Range<usize>> {
    let workers = workers.max(1);
    let pairs = clients / 2;
    let mut out = Vec::with_capacity(workers);
    let mut start = 0;
    for w in 0..workers {
        let my_pairs = pairs / workers + usize::from(w < pairs % workers);
        let mut end = start + 2 * my_pairs;
        if w + 1 == workers {
            end = clients;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// The transport of every client: smooth weighted round-robin over `[tcp, udp, ws]`, so that with
/// equal weights the order is tcp, udp, ws, tcp, … and consecutive clients (the c2c pairs) mix
/// transports: (tcp, udp), (ws, tcp), (udp, ws).
pub fn transports(clients: usize, weights: [u32; 3]) -> Vec<Transport> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = [0i64; 3];
    let mut out = Vec::with_capacity(clients);
    if total == 0 {
        return out;
    }
    for _ in 0..clients {
        let mut best = 0;
        for i in 0..3 {
            let w = weights.get(i).map_or(0, |&w| i64::from(w));
            if let Some(c) = current.get_mut(i) {
                *c += w;
            }
            if current.get(i) > current.get(best) {
                best = i;
            }
        }
        if let Some(c) = current.get_mut(best) {
            *c -= total;
        }
        out.push(transport_at(best));
    }
    out
}

/// The local partner a client sends to, by scenario: its pair in c2c (`i ^ 1`, none for an odd
/// last client), `None` otherwise (c2s sends to the server; fanout picks receivers in turn).
pub fn partner(scenario: Scenario, local: usize, local_clients: usize) -> Option<usize> {
    match scenario {
        Scenario::C2c => Some(local ^ 1).filter(|&p| p < local_clients),
        _ => None,
    }
}

/// Whether a local client sends messages in this scenario.
pub fn is_sender(scenario: Scenario, local: usize, local_clients: usize) -> bool {
    match scenario {
        Scenario::C2c => partner(scenario, local, local_clients).is_some(),
        Scenario::C2s => true,
        Scenario::Fanout => local == 0 && local_clients > 1,
        Scenario::Idle | Scenario::Storm => false,
    }
}

/// Senders of every worker.
pub fn senders_per_worker(config: &Config, ranges: &[std::ops::Range<usize>]) -> Vec<usize> {
    ranges
        .iter()
        .map(|r| {
            let n = r.len();
            (0..n).filter(|&i| is_sender(config.scenario, i, n)).count()
        })
        .collect()
}

/// The source addresses to spread over: the configured ones, or the automatic loopback range when
/// some transport would put more than [`AUTO_SPREAD_THRESHOLD`] connections on one destination
/// and every host is loopback. Empty = let the kernel choose.
pub fn source_ips(config: &Config, transports: &[Transport]) -> Vec<IpAddr> {
    if !config.source_ips.is_empty() {
        return config.source_ips.clone();
    }
    let hosts = config.hosts.len().max(1);
    let busiest = [Transport::Tcp, Transport::Udp, Transport::Ws]
        .iter()
        .map(|&t| {
            transports
                .iter()
                .filter(|&&x| x == t)
                .count()
                .div_ceil(hosts)
        })
        .max()
        .unwrap_or(0);
    let loopback = config.hosts.iter().all(IpAddr::is_loopback);
    if busiest > AUTO_SPREAD_THRESHOLD && loopback {
        (u32::from(AUTO_SOURCE_FIRST)..=u32::from(AUTO_SOURCE_LAST))
            .map(|a| IpAddr::V4(Ipv4Addr::from(a)))
            .collect()
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_counts() {
        assert_eq!(workers_needed(1000), 1);
        assert_eq!(workers_needed(20_000), 2);
        assert_eq!(workers_needed(50_000), 3);
    }

    #[test]
    fn split_keeps_pairs_together() {
        let r = split(11, 3);
        assert_eq!(r, vec![0..4, 4..8, 8..11]);
        assert_eq!(split(10, 1), vec![0..10]);
        assert!(split(20_000, 2).iter().all(|r| r.len() % 2 == 0));
    }

    #[test]
    fn transport_mix_pairs_across_transports() {
        use Transport::*;
        assert_eq!(transports(6, [1, 1, 1]), vec![Tcp, Udp, Ws, Tcp, Udp, Ws]);
        assert_eq!(transports(3, [0, 1, 0]), vec![Udp, Udp, Udp]);
        let mix = transports(400, [1, 3, 0]);
        assert_eq!(mix.iter().filter(|&&t| t == Udp).count(), 300);
        assert!(transports(3, [0, 0, 0]).is_empty());
    }

    #[test]
    fn senders_by_scenario() {
        assert_eq!(partner(Scenario::C2c, 0, 3), Some(1));
        assert_eq!(partner(Scenario::C2c, 1, 3), Some(0));
        assert_eq!(partner(Scenario::C2c, 2, 3), None);
        assert!(is_sender(Scenario::Fanout, 0, 5));
        assert!(!is_sender(Scenario::Fanout, 1, 5));
        assert!(!is_sender(Scenario::Idle, 0, 5));
    }

    #[test]
    fn automatic_source_spread() {
        let config = Config {
            clients: 60_000,
            weights: [1, 0, 0],
            ..Config::default()
        };
        let t = transports(config.clients, config.weights);
        assert_eq!(source_ips(&config, &t).len(), 249);
        let small = Config::default();
        let t = transports(small.clients, small.weights);
        assert!(source_ips(&small, &t).is_empty());
    }
}
