//! imedge-benches: criterion micro-benchmarks on in-memory bytes (see `benches/`), and the pieces of
//! the echo benchmark that are not I/O (see [`echo`]). No server or client code lives here.
//!
//! # Layout
//!
//! - `benches/codec.rs`: criterion benches of the message codec.
//! - [`echo`]: the echo benchmark's wire format, send schedule and `/proc/<pid>/stat` reader.
//! - `src/bin/echo_tokio.rs` (`echo-tokio`): an idiomatic tokio echo server, the reference the
//!   server's own loops (`imedge --bench-echo`) are compared with.
//! - `src/bin/echo_load.rs` (`echo-load`): the open-loop load client; `scripts/bench_echo.sh`
//!   runs it against all three servers.

pub mod echo;
