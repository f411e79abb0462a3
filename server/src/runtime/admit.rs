//! Admission of new TCP and WebSocket connections, shared by every core: how many connections
//! may be open without having logged in (in all, and per source address), and how fast one
//! source address may open connections. Consulted once per accepted connection and once when it
//! logs in or closes — never per message — so plain atomics shared across cores are enough.
//!
//! Per-address state lives in small fixed tables indexed by a keyed hash of the address (the key
//! is random per process, so a peer cannot aim at another address's slot): no allocation per
//! address, no lock, no table to expire. Two addresses that share a slot share its limits, which
//! only ever makes the server stricter.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Slots of each per-address table: 4096 × (4 + 8) bytes = 48 KiB for the server. With a few
/// hundred addresses connecting at once, two rarely share a slot.
pub const IP_SLOTS: usize = 4096;

/// A source address may open this many seconds' worth of its rate at once (a client behind a
/// NAT reconnecting together with its neighbours after a network change).
pub const RATE_BURST_SECONDS: u64 = 2;

/// Token-bucket arithmetic works in thousandths of a connection.
const MILLI: u64 = 1000;

/// Bits of a bucket holding the spent milli-tokens (the rest hold the time of the last update,
/// in ms since `origin`: 40 bits last 34 years).
const SPENT_BITS: u32 = 24;

/// The admission limits (0 = no limit, for each).
#[derive(Debug, Clone, Copy)]
pub struct AdmitLimits {
    /// `--max-unauthenticated`: connections not logged in, over all cores.
    pub max_unauthenticated: usize,
    /// `--max-conns-per-ip`: connections not logged in from one source address.
    pub max_per_ip: u32,
    /// `--max-conn-rate-per-ip`: new connections per second from one source address.
    pub rate_per_ip: u32,
    /// `--udp-unauth-reply-rate`: replies per second to one UDP source address that is not
    /// logged in (error 301, echo).
    pub udp_unauth_reply_rate: u32,
    /// Apply the per-address limits to loopback peers too (`--limit-loopback`). Off by default:
    /// a loopback peer is this host — a benchmark, or a local proxy whose clients all share its
    /// address.
    pub limit_loopback: bool,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many connections not logged in, over all cores.
    Unauthenticated,
    /// Too many connections not logged in from the source address.
    PerIp,
    /// The source address opens connections too fast.
    Rate,
}

/// The shared admission state.
#[derive(Debug)]
pub struct Admission {
    limits: AdmitLimits,
    unauthenticated: AtomicUsize,
    per_ip: Box<[AtomicU32]>,
    /// New connections per address.
    connect_rate: RateTable,
    /// Replies to UDP sources that are not logged in, per address (SPEC S4).
    udp_replies: RateTable,
    key: std::collections::hash_map::RandomState,
}

/// Token buckets per address slot, as atomics: `rate` per second with a burst of
/// [`RATE_BURST_SECONDS`] of it. A bucket records what was spent, so a fresh one is full.
#[derive(Debug)]
struct RateTable {
    rate: u64,
    buckets: Box<[AtomicU64]>,
    origin: Instant,
}

/// An admitted connection's place in the counts, given back when it logs in or closes (on
/// drop).
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    /// Its per-address slot, if the per-address limit applies.
    slot: Option<usize>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission
            .unauthenticated
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(counter) = self.slot.and_then(|slot| self.admission.per_ip.get(slot)) {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Admission {
    /// Admission with `limits`; `origin` is the clock's start for the rate buckets.
    pub fn new(limits: AdmitLimits, origin: Instant) -> Self {
        Self {
            limits,
            unauthenticated: AtomicUsize::new(0),
            per_ip: (0..IP_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            connect_rate: RateTable::new(limits.rate_per_ip, origin),
            udp_replies: RateTable::new(limits.udp_unauth_reply_rate, origin),
            key: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Whether the per-address limits apply to `ip`.
    fn limits_ip(&self, ip: IpAddr) -> bool {
        self.limits.limit_loopback || !ip.to_canonical().is_loopback()
    }

    /// Whether a reply may go to `ip`, a UDP source that is not logged in, at `now` (takes one
    /// token of its bucket).
    pub fn udp_reply(&self, ip: IpAddr, now: Instant) -> bool {
        !self.limits_ip(ip) || self.udp_replies.take(self.slot(ip), now)
    }

    /// Connections admitted and not yet logged in or closed, over all cores.
    pub fn unauthenticated(&self) -> usize {
        self.unauthenticated.load(Ordering::Relaxed)
    }

    fn slot(&self, ip: IpAddr) -> usize {
        // Modulo a power of two: the low bits of a SipHash are as good as any.
        (self.key.hash_one(ip.to_canonical()) as usize) % IP_SLOTS
    }

    /// Admits a connection from `ip` at `now`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Ticket, Refusal> {
        let slot = self.limits_ip(ip).then(|| self.slot(ip));
        if let Some(slot) = slot {
            if !self.connect_rate.take(slot, now) {
                return Err(Refusal::Rate);
            }
        }
        let max = self.limits.max_unauthenticated;
        if self.unauthenticated.fetch_add(1, Ordering::Relaxed) >= max && max > 0 {
            self.unauthenticated.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Unauthenticated);
        }
        // From here on the ticket gives back what was taken, also on refusal.
        let mut ticket = Ticket {
            admission: Arc::clone(self),
            slot: None,
        };
        if let Some(counter) = slot.and_then(|slot| self.per_ip.get(slot)) {
            let max = self.limits.max_per_ip;
            if counter.fetch_add(1, Ordering::Relaxed) >= max && max > 0 {
                counter.fetch_sub(1, Ordering::Relaxed);
                return Err(Refusal::PerIp);
            }
            ticket.slot = slot;
        }
        Ok(ticket)
    }
}

impl RateTable {
    fn new(rate: u32, origin: Instant) -> Self {
        Self {
            rate: u64::from(rate),
            buckets: (0..IP_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            origin,
        }
    }

    /// Takes one token from the bucket of `slot`, refilled at the rate up to the burst; `false`
    /// if it is empty. A rate of 0 is no limit.
    fn take(&self, slot: usize, now: Instant) -> bool {
        let rate = self.rate;
        let Some(bucket) = self.buckets.get(slot) else {
            return true;
        };
        if rate == 0 {
            return true;
        }
        let burst = (rate * RATE_BURST_SECONDS * MILLI).min((1 << SPENT_BITS) - 1);
        let now_ms = u64::try_from(now.saturating_duration_since(self.origin).as_millis())
            .unwrap_or(u64::MAX >> SPENT_BITS)
            .min(u64::MAX >> SPENT_BITS);
        let mut current = bucket.load(Ordering::Relaxed);
        loop {
            let (last_ms, spent) = (current >> SPENT_BITS, current & ((1 << SPENT_BITS) - 1));
            // `rate` per second is `rate` thousandths per millisecond.
            let refill = now_ms.saturating_sub(last_ms).saturating_mul(rate);
            let spent = spent.saturating_sub(refill);
            if spent + MILLI > burst {
                return false;
            }
            let next = (now_ms.max(last_ms) << SPENT_BITS) | (spent + MILLI);
            match bucket.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    fn admission(limits: AdmitLimits) -> (Arc<Admission>, Instant) {
        let origin = Instant::now();
        (Arc::new(Admission::new(limits, origin)), origin)
    }

    const OPEN: AdmitLimits = AdmitLimits {
        max_unauthenticated: 0,
        max_per_ip: 0,
        rate_per_ip: 0,
        udp_unauth_reply_rate: 0,
        limit_loopback: true,
    };
    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn the_global_cap_counts_tickets_until_they_are_dropped() {
        let (admit, t) = admission(AdmitLimits {
            max_unauthenticated: 2,
            ..OPEN
        });
        let one = admit.admit(A, t).unwrap();
        let _two = admit.admit(A, t).unwrap();
        assert_eq!(admit.admit(A, t).unwrap_err(), Refusal::Unauthenticated);
        assert_eq!(admit.unauthenticated(), 2);
        drop(one);
        assert!(admit.admit(A, t).is_ok());
    }

    #[test]
    fn the_per_address_cap_and_its_release() {
        let (admit, t) = admission(AdmitLimits {
            max_per_ip: 1,
            ..OPEN
        });
        let one = admit.admit(A, t).unwrap();
        assert_eq!(admit.admit(A, t).unwrap_err(), Refusal::PerIp);
        // A refusal gives back its place in the global count.
        assert_eq!(admit.unauthenticated(), 1);
        drop(one);
        assert_eq!(admit.unauthenticated(), 0);
        let _again = admit.admit(A, t).unwrap();
    }

    #[test]
    fn the_rate_bucket_allows_a_burst_then_refills() {
        let (admit, t) = admission(AdmitLimits {
            rate_per_ip: 5,
            ..OPEN
        });
        let burst = 5 * RATE_BURST_SECONDS as usize;
        for _ in 0..burst {
            drop(admit.admit(A, t).unwrap());
        }
        assert_eq!(admit.admit(A, t).unwrap_err(), Refusal::Rate);
        // 200 ms at 5/s: one more.
        let later = t + Duration::from_millis(200);
        drop(admit.admit(A, later).unwrap());
        assert_eq!(admit.admit(A, later).unwrap_err(), Refusal::Rate);
        // A long pause refills the whole burst, not more.
        let much_later = t + Duration::from_secs(3600);
        for _ in 0..burst {
            drop(admit.admit(A, much_later).unwrap());
        }
        assert!(admit.admit(A, much_later).is_err());
    }

    #[test]
    fn loopback_is_exempt_from_per_address_limits_unless_asked() {
        let (admit, t) = admission(AdmitLimits {
            max_per_ip: 1,
            rate_per_ip: 1,
            limit_loopback: false,
            ..OPEN
        });
        let local = IpAddr::from([127, 0, 0, 1]);
        let _tickets: Vec<_> = (0..10).map(|_| admit.admit(local, t).unwrap()).collect();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(admit.admit(mapped, t).is_ok());
        let _kept = admit.admit(A, t).unwrap();
        assert_eq!(admit.admit(A, t).unwrap_err(), Refusal::PerIp);
    }
}

#[cfg(test)]
mod udp_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn udp_replies_to_one_source_are_rate_limited() {
        let t = Instant::now();
        let admit = Admission::new(
            AdmitLimits {
                max_unauthenticated: 0,
                max_per_ip: 0,
                rate_per_ip: 0,
                udp_unauth_reply_rate: 2,
                limit_loopback: false,
            },
            t,
        );
        let victim = IpAddr::from([198, 51, 100, 7]);
        let allowed = (0..100).filter(|_| admit.udp_reply(victim, t)).count();
        assert_eq!(allowed, 2 * RATE_BURST_SECONDS as usize);
        assert!(admit.udp_reply(victim, t + std::time::Duration::from_millis(500)));
        // Loopback is exempt unless asked.
        assert!((0..100).all(|_| admit.udp_reply(IpAddr::from([127, 0, 0, 1]), t)));
    }
}
