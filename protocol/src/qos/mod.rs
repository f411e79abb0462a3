//! Acknowledged delivery (SPEC §8): a sender's resend table and a receiver's de-duplication window.
//!
//! Both are sans-IO tables driven by the caller's clock, with MobileIMSDK's timings as presets:
//!
//! * [`QosSender`] — unacknowledged messages, resent on the reference's check ticks and finally
//!   reported lost ([`QosSenderConfig::CLIENT`] for the Java SDK, §8.3;
//!   [`QosSenderConfig::SERVER`] for the server's S2C queue, §8.4).
//! * [`QosReceiver`] — fingerprints seen recently, so that a resent message is ACKed again but
//!   delivered once (§8.5).
//!
//! Only type-2 messages with `QoS: true` and an `fp` take part (§8.1). The reference keys every
//! table by fingerprint alone (§8.2); here the receiver (and the server's sender) key by
//! (user id, fingerprint) as a compact [`QosKey`] ([`key`]), since fingerprints are chosen by
//! clients.

pub mod key;
pub mod receiver;
pub mod sender;

pub use key::{QosKey, QosKeyHasher};
pub use receiver::{QosReceiver, QosReceiverConfig, ReceiverStats, Seen};
pub use sender::{QosEvent, QosSender, QosSenderConfig, SenderStats};
