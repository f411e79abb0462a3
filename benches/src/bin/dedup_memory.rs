//! Memory per entry of the QoS de-duplication window, before and after compact keys (issue 9).
//!
//! Fills each layout with N entries as the server holds them — key = (sender uid, 36-byte UUID
//! fingerprint), spread over 30 s so that all are within one window — and reports the
//! heap bytes the global allocator handed out per entry (requested sizes, without the
//! allocator's own rounding) and the growth of the process's resident set.
//!
//! * `before`: the layout up to issue 9 — `"uid\nfp"` as an `Arc<str>` in a
//!   `HashMap<Arc<str>, Instant>` plus a `VecDeque<(Instant, Arc<str>)>` FIFO.
//! * `after`: `QosReceiver` with `QosReceiverConfig::SERVER`: 128-bit keyed hashes in time
//!   buckets, and what its own `bytes()` accounting says.
//!
//! Run: `cargo run --release -p imedge-benches --bin dedup-memory -- 1000000`

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imedge_protocol::qos::{QosKeyHasher, QosReceiver, QosReceiverConfig};

/// The system allocator, counting live requested bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Resident set size in bytes, from /proc/self/statm (0 where there is none).
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The i-th message's sender and fingerprint: 10,000 senders, UUID-shaped fingerprints.
fn ids(i: u64) -> (String, String) {
    let uid = format!("user-{}", i % 10_000);
    let fp = format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        i as u32,
        (i >> 32) as u16,
        i % 0xfff,
        (i / 7) % 0xfff,
        i.wrapping_mul(0x9e37_79b9)
    );
    (uid, fp)
}

fn report(name: &str, n: u64, heap: usize, rss: usize, extra: &str) {
    let n = n as f64;
    #[allow(clippy::print_stdout)]
    {
        println!(
            "{name:>6}: {:>7.1} B/entry heap, {:>7.1} B/entry RSS{extra}",
            heap as f64 / n,
            rss as f64 / n
        );
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    match std::env::args().nth(2).as_deref() {
        Some("before") => before(n),
        Some("after") => after(n),
        _ => {
            // Each layout in a fresh process, so that its resident set starts from nothing.
            for layout in ["before", "after"] {
                let status = std::env::current_exe()
                    .and_then(|exe| {
                        std::process::Command::new(exe)
                            .arg(n.to_string())
                            .arg(layout)
                            .status()
                    })
                    .map(|s| s.success());
                assert!(matches!(status, Ok(true)), "{layout} run failed");
            }
        }
    }
}

/// The i-th message's send time: spread over 30 s, inside the 38-s server window, so that
/// nothing expires.
fn at(t0: Instant, n: u64, i: u64) -> Instant {
    t0 + Duration::from_nanos(i * (30_000_000_000 / n.max(1)))
}

fn before(n: u64) {
    let t0 = Instant::now();
    let at = |i| at(t0, n, i);
    let (heap0, rss0) = (LIVE.load(Ordering::Relaxed), rss());
    let mut seen: HashMap<Arc<str>, Instant> = HashMap::new();
    let mut fifo: VecDeque<(Instant, Arc<str>)> = VecDeque::new();
    for i in 0..n {
        let (uid, fp) = ids(i);
        let key: Arc<str> = Arc::from(format!("{uid}\n{fp}"));
        seen.insert(Arc::clone(&key), at(i));
        fifo.push_back((at(i), key));
    }
    let (heap, resident) = (LIVE.load(Ordering::Relaxed) - heap0, rss() - rss0);
    report("before", n, heap, resident, "");
    drop((seen, fifo));
}

fn after(n: u64) {
    let t0 = Instant::now();
    let at = |i| at(t0, n, i);
    let (heap0, rss0) = (LIVE.load(Ordering::Relaxed), rss());
    let hasher = QosKeyHasher::random();
    let config = QosReceiverConfig {
        max_bytes: usize::MAX,
        ..QosReceiverConfig::SERVER
    };
    let mut receiver = QosReceiver::new(config, t0);
    for i in 0..n {
        let (uid, fp) = ids(i);
        receiver.handle_message(at(i), hasher.key(&uid, &fp));
    }
    let (heap, resident) = (
        LIVE.load(Ordering::Relaxed).saturating_sub(heap0),
        rss().saturating_sub(rss0),
    );
    let accounted = format!(
        ", {:.1} B/entry by bytes(); {} keys",
        receiver.bytes() as f64 / n as f64,
        receiver.len()
    );
    report("after", n, heap, resident, &accounted);
}
