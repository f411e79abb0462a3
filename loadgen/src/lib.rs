//! imedge-loadgen: simulates thousands of MobileIMSDK clients (TCP, UDP, WebSocket) against imedge
//! or any MobileIMSDK-compatible server, and reports throughput, latency percentiles
//! (coordinated-omission corrected), loss, duplicates and reordering.
//!
//! It is not a client SDK: each simulated client is the protocol crate's sans-IO `ClientSession`
//! driven by a worker's single epoll loop, so tens of thousands of clients cost a few cores at most.
//!
//! # Layout
//!
//! * [`config`] — the typed configuration and the parsers of the command line's value syntaxes.
//! * [`plan`] — who is who: workers, client ranges, transports, pairs, source addresses.
//! * [`schedule`] — the open-loop schedule (intended send times).
//! * [`payload`] — what a message carries (`lg:<worker>:<sender>:<seq>:<intended_ns>:`).
//! * [`counters`] — sent/delivered/lost/duplicate/reorder accounting.
//! * [`worker`] — the per-worker event loop, sockets and sessions.
//! * [`stats`] — worker snapshots and histogram transport.
//! * [`run`] — workers as threads or processes, merged into a [`report::Report`].
//! * [`report`] — the final table, JSON, HdrHistogram interval log and HTML/SVG report.
//!
//! # What is measured
//!
//! * **Latency** = receive time at the receiving client − *intended* send time (open loop,
//!   coordinated omission corrected); for `c2s` it is the time the server's ACK reaches the
//!   sender. Both ends are CLOCK_MONOTONIC, comparable across worker processes. Closed loop
//!   (`--rate max`) has no schedule: the intended time is the actual send time.
//! * **Attribution**: every count and latency of a message goes to the transport of its
//!   **sender**.
//! * **delivered** counts distinct messages received (c2c, fanout; pairs and fanout receivers are
//!   always in the sender's worker) or ACKed by the server (c2s). **acked** counts distinct ACKs
//!   at the sender. **duplicated** counts extra copies on the wire, *before* the session's own
//!   de-duplication (the application, like the SDK's, never sees them); **app_duplicated** counts
//!   the copies that got past that de-duplication to the application (must be 0); **reordered** counts
//!   messages that arrived after a later one of the same sender.
//! * **lost** = sent − delivered once sending stopped and `--grace` passed (or every message was
//!   delivered and ACKed). **unsent** = messages the schedule asked for that the session refused
//!   (not logged in, QoS table full). `--max-loss` compares lost + unsent with sent + unsent: an
//!   integer is a count, a decimal or percentage a fraction. **qos_lost** = the SDK's
//!   `messagesLost` reports during the run (informational).
//! * Exit status: 0 ok, 1 loss over `--max-loss` or no client logged in, 2 usage error.
//! * The loadgen's own CPU (user + system of each worker's loop thread) is reported as a share of
//!   a core and µs per message; it warns when a worker exceeds 90 % of a core or more than 1 % of
//!   the sends left over 5 ms behind schedule.

pub mod clock;
pub mod config;
pub mod counters;
pub mod payload;
pub mod plan;
pub mod report;
pub mod run;
pub mod schedule;
pub mod server;
pub mod stats;
pub mod worker;

pub use config::Config;
pub use report::Report;
pub use run::{run_in_process, run_processes, Options};
