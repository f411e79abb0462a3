//! imedge-lossy: a UDP fault-injection proxy for tests. It sits between UDP clients and a server
//! on 127.0.0.1 and drops, delays, duplicates and reorders datagrams, each direction with its own
//! [`Faults`], decided by a seeded RNG so that a failing run can be replayed.
//!
//! It is not a network emulator: no bandwidth model, no queueing discipline, no packet
//! corruption, IPv4/IPv6 loopback only in spirit (it binds where told). It exists to show what a
//! lossy mobile link does to the protocol's QoS (resends, de-duplication, re-login).
//!
//! # Layout
//!
//! * [`rng`] — SplitMix64, the seeded source of every decision.
//! * [`faults`] — [`Faults`] of one direction and [`faults::decide`]: what becomes of one
//!   datagram (a pure function, tested on its own).
//! * [`proxy`] — [`Proxy`]: one thread, one mio loop. A client-facing socket; per client address
//!   (a *flow*) a socket connected to the upstream server, so the server sees one source address
//!   per client as it would without the proxy. Delayed datagrams wait in a time-ordered queue.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use imedge_lossy::{Config, Faults, Proxy};
//!
//! let server = "127.0.0.1:7901".parse().expect("an address");
//! let lossy = Faults { drop: 0.1, ..Faults::default() };
//! let proxy = Proxy::start(Config {
//!     to_server: lossy,
//!     to_client: lossy,
//!     spare_first: 1, // let each client's login through
//!     ..Config::new(server)
//! })?;
//! // Point UDP clients at proxy.addr() instead of the server.
//! let stats = proxy.stop();
//! # let _ = (stats, Duration::ZERO);
//! # Ok::<(), std::io::Error>(())
//! ```

pub mod faults;
pub mod proxy;
pub mod rng;

pub use faults::Faults;
pub use proxy::{Config, Direction, DirectionStats, Proxy, Stats};
