//! imedge-client: a Rust client SDK with the semantics of MobileIMSDK's Java client.
//!
//! Skeleton: the transports and the async API arrive with the server issue. What exists today is
//! the sans-IO session and QoS logic it will drive, re-exported from `imedge-protocol`.

pub use imedge_protocol::qos;
pub use imedge_protocol::session;
