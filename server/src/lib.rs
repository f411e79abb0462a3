//! imedge-server: a MobileIMSDK-compatible IM transport server — the library behind the `imedge`
//! binary (which only parses the command line and sets up logging).
//!
//! # Layout (in data-flow order)
//!
//! * socket bytes → frames: [`runtime`] runs one pinned event loop per core; its connections
//!   ([`runtime::conn`]) cut TCP frames, WebSocket messages (upgrade included) and datagrams with
//!   `imedge_protocol::frame`;
//! * frame → message → session/shard: [`shard`] decodes each body in place and runs the logic of
//!   the session it belongs to — a [`shard::Shard`] holds every session of the users that hash to
//!   its core ([`shard::shard_for`]): login and the duplicate-login rules (`shard/login.rs`),
//!   keep-alive, idle expiry, 301 for unauthenticated sessions, echo;
//! * route → QoS: C2S to the application, C2C to the recipient's shard, S2C from the application,
//!   ACKs, resends and de-duplication (`shard/route.rs`); shards talk over [`runtime::mesh`];
//! * → socket: everything a shard sends goes through its [`shard::Outbox`], which the loop
//!   implements by queueing framed bytes on the connection and writing them once per turn;
//! * [`hooks`] — the application's extension points (verify, login, logout, C2S/C2C, offline,
//!   S2C delivered/lost) and the built-in verifiers; verifies and notifications run on the hook
//!   pool ([`hooks::pool`]) and answer the shard by mail; [`config`] — the typed settings;
//! * [`store`] — durable offline queues: the shards submit appends and removals to its
//!   group-commit writer thread and page reads to its reader threads, and get the answers back
//!   as mail — no disk access on an event loop;
//! * [`timer`] — the per-core timer wheel behind session expiry.
//!
//! `docs/architecture.md` explains the threading, sharding and timer design.

pub mod config;
pub mod hooks;
pub mod runtime;
pub mod shard;
pub mod store;
pub mod timer;
