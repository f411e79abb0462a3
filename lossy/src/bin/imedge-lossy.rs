//! `imedge-lossy`: runs the fault-injection proxy from the command line until killed, printing
//! its counts to stderr every few seconds.
//!
//! ```text
//! imedge-lossy --upstream 127.0.0.1:7901 --listen 127.0.0.1:17901 --drop 10 --spare-first 1
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use imedge_lossy::{Config, Faults, Proxy};

/// A UDP proxy that drops, delays, duplicates and reorders datagrams (for tests only).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The server to relay to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Where clients send.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Percentage of datagrams dropped.
    #[arg(long, default_value_t = 0.0)]
    drop: f64,
    /// Percentage of datagrams sent twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Percentage of datagrams held back so that later ones overtake them.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// How long a reordered datagram is held back, milliseconds.
    #[arg(long, default_value_t = 30)]
    reorder_hold_ms: u64,
    /// Fixed delay of every datagram, milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Extra random delay up to this, milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Which way the faults apply.
    #[arg(long, value_enum, default_value = "both")]
    direction: Which,
    /// The first N datagrams of each client in each direction pass untouched.
    #[arg(long, default_value_t = 0)]
    spare_first: u64,
    /// Seed of the decisions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seconds between printed counts.
    #[arg(long, default_value_t = 5)]
    report_secs: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Which {
    Both,
    ToServer,
    ToClient,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let faults = Faults {
        drop: args.drop / 100.0,
        duplicate: args.duplicate / 100.0,
        reorder: args.reorder / 100.0,
        reorder_hold: Duration::from_millis(args.reorder_hold_ms),
        delay: Duration::from_millis(args.delay_ms),
        jitter: Duration::from_millis(args.jitter_ms),
    };
    let (to_server, to_client) = match args.direction {
        Which::Both => (faults, faults),
        Which::ToServer => (faults, Faults::default()),
        Which::ToClient => (Faults::default(), faults),
    };
    let proxy = Proxy::start(Config {
        listen: args.listen,
        to_server,
        to_client,
        seed: args.seed,
        spare_first: args.spare_first,
        ..Config::new(args.upstream)
    })?;
    eprintln!("imedge-lossy: {} -> {}", proxy.addr(), args.upstream);
    loop {
        std::thread::sleep(Duration::from_secs(args.report_secs.max(1)));
        eprintln!("{:?}", proxy.stats());
    }
}
