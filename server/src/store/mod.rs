//! Durable offline messages: what a user who is not online (or whose real-time delivery was
//! reported lost) receives at the next login.
//!
//! This module is the storage layer only; the shards decide *when* to store, deliver and remove.
//! The contract every backend keeps:
//!
//! * a message is stored under its recipient with a `seq` that increases in append order, per
//!   user and across restarts, so delivery order is sending order;
//! * [`Store::append`] makes a whole batch durable in **one** commit before it returns — the
//!   sender's ACK may be sent only after that ([`Appended::is_durable`]);
//! * a message is de-duplicated by `(to, from, fp)` while it is stored, so a sender's resend is
//!   never stored twice (a message without a fingerprint is never de-duplicated);
//! * a message leaves the store only when the recipient ACKed it ([`Store::remove`]) or when it
//!   expired ([`Limits::max_age`]); expiry and every limit are counted, never silent;
//! * the store is bounded: per recipient ([`Limits::max_per_user`]), per sender
//!   ([`Limits::max_per_sender`]) and in bytes ([`Limits::max_bytes`]); a refused message is not
//!   durable, so its sender gets no ACK and its SDK reports it lost;
//! * bodies are kept as the encoded JSON bytes the sender's core produced, never re-parsed.
//!
//! # Layout
//!
//! * this file — the [`Store`] trait and its types, so a networked store can be added later;
//! * [`redb`] — [`redb::RedbStore`], the embedded backend (`offline.redb` under `--data-dir`);
//! * [`group`] — [`group::GroupCommit`], one writer thread that turns many concurrent appends into
//!   one commit (one fsync) per batch; the event loops submit to it and never wait on the disk.
//!   It also removes delivered messages (one transaction per turn) and sweeps expired ones;
//! * [`read`] — [`read::Reader`], reader threads that read pages for the event loops, whose
//!   answers come back to the core as mail.

pub mod group;
pub mod read;
pub mod redb;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// A message to store for a user who cannot receive it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offline {
    /// Recipient user id: the key the message is stored and delivered under.
    pub to: String,
    /// Sender user id (`"0"` for S2C), part of the de-duplication key.
    pub from: String,
    /// The protocol fingerprint of a QoS message; `None` is never de-duplicated.
    pub fp: Option<String>,
    /// The encoded message, exactly as it will be written to the recipient.
    pub json: Bytes,
    /// When it was stored (ms since the Unix epoch, the server's clock); expiry counts from here.
    pub stored_at_ms: i64,
    /// Its sender was already ACKed (a real-time delivery reported lost, or the resend table at
    /// shutdown): refusing it now would lose an acknowledged message, so the per-sender quota
    /// and the byte cap do not apply (what such messages add is bounded by the resend tables).
    pub sender_acked: bool,
}

/// What [`Store::append`] did with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored durably under this sequence number.
    Stored { seq: u64 },
    /// The same `(to, from, fp)` is already stored (durably) under `seq`; nothing was written.
    Duplicate { seq: u64 },
    /// The recipient already has [`Limits::max_per_user`] messages stored; nothing was written.
    OverLimit,
    /// The sender already has [`Limits::max_per_sender`] messages stored for others; nothing was
    /// written.
    OverSenderQuota,
    /// The store already holds [`Limits::max_bytes`]; nothing was written.
    OverCapacity,
}

impl Appended {
    /// Whether the message is now durably stored (just now, or by an earlier append), i.e.
    /// whether the sender may be ACKed.
    pub fn is_durable(self) -> bool {
        matches!(self, Self::Stored { .. } | Self::Duplicate { .. })
    }
}

/// Delivered messages of one user to delete ([`Store::remove`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub to: String,
    pub seqs: Vec<u64>,
}

impl Removal {
    pub fn new(to: &str, seqs: &[u64]) -> Self {
        Self {
            to: to.to_owned(),
            seqs: seqs.to_vec(),
        }
    }
}

/// What one [`Store::expire`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// Messages deleted.
    pub deleted: u64,
    /// It stopped at `max`: expired messages may remain.
    pub more: bool,
}

/// A stored message, as returned for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its place in the recipient's queue; pass it to [`Store::remove`] once the recipient ACKed.
    pub seq: u64,
    pub from: String,
    pub fp: Option<String>,
    /// The encoded message, byte for byte as it was appended.
    pub json: Bytes,
    pub stored_at_ms: i64,
}

/// Default [`Limits::max_per_user`]: a user offline for a week who receives a message a minute
/// has ~10,000 waiting. Above that the store would be holding a mailbox nobody reads, and one
/// abused account could fill the disk; the sender gets no ACK instead (and the count shows it).
pub const DEFAULT_MAX_PER_USER: usize = 10_000;

/// Default [`Limits::max_per_sender`]: messages one sender may have stored for other users at
/// once. A person writing to friends who are offline stays far below it; a client inventing
/// recipients (every message to a new user id passes the per-user limit) is stopped after a
/// thousand instead of filling the disk. The server itself ([`SERVER_SENDER`]) is exempt.
pub const DEFAULT_MAX_PER_SENDER: usize = 1_000;

/// Default [`Limits::max_bytes`]: 1 GiB of stored records in total — millions of ordinary
/// messages, yet a bound that keeps the disk (and the open-time rebuild of the accounting)
/// finite whatever many senders do together.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// The sender id of server-sent (S2C) messages: exempt from [`Limits::max_per_sender`], since
/// what the server sends is the application's choice, not a peer's.
pub const SERVER_SENDER: &str = "0";

/// Default [`Limits::max_age`]: a week, long enough to cover a phone that was off over a holiday,
/// short enough that the store does not become an archive (chat history is the application's).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The bounds the store enforces (named in the server's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages stored per recipient; further appends return [`Appended::OverLimit`].
    pub max_per_user: usize,
    /// Messages older than this are dropped (and counted) instead of delivered.
    pub max_age: Duration,
    /// Messages stored per sender (for any recipients); further appends return
    /// [`Appended::OverSenderQuota`]. [`SERVER_SENDER`] is exempt.
    pub max_per_sender: usize,
    /// Bytes of stored records in total; an append that would pass it returns
    /// [`Appended::OverCapacity`].
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_per_user: DEFAULT_MAX_PER_USER,
            max_age: DEFAULT_MAX_AGE,
            max_per_sender: DEFAULT_MAX_PER_SENDER,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

impl Limits {
    /// `max_age` in milliseconds, saturated (a `Duration` can exceed `i64` ms).
    pub fn max_age_ms(&self) -> i64 {
        i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX)
    }

    /// Whether a message stored at `stored_at_ms` is older than `max_age` at `now_ms`.
    pub fn expired(&self, stored_at_ms: i64, now_ms: i64) -> bool {
        now_ms.saturating_sub(stored_at_ms) > self.max_age_ms()
    }
}

/// What a store has done since it was opened (process counters, not persisted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Messages stored ([`Appended::Stored`]).
    pub stored: u64,
    /// Appends refused as already stored ([`Appended::Duplicate`]).
    pub duplicates: u64,
    /// Appends refused by [`Limits::max_per_user`] ([`Appended::OverLimit`]).
    pub over_limit: u64,
    /// Appends refused by [`Limits::max_per_sender`] ([`Appended::OverSenderQuota`]).
    pub over_sender_quota: u64,
    /// Appends refused by [`Limits::max_bytes`] ([`Appended::OverCapacity`]).
    pub over_capacity: u64,
    /// Messages held now (gauge).
    pub held: u64,
    /// Bytes of records held now (gauge), what [`Limits::max_bytes`] bounds.
    pub held_bytes: u64,
    /// Messages dropped by [`Limits::max_age`] (by [`Store::expire`], the writer's sweep).
    pub expired: u64,
    /// Messages deleted by [`Store::remove`] (delivered and ACKed).
    pub removed: u64,
    /// Durable write transactions committed (each one fsync); `stored / commits` is the mean
    /// group-commit batch.
    pub commits: u64,
}

impl StoreStats {
    /// Adds `other`'s counters (for a report that sums parts, e.g. per-core stats of which one
    /// carries the store's).
    pub fn merge(&mut self, other: &Self) {
        self.stored += other.stored;
        self.duplicates += other.duplicates;
        self.over_limit += other.over_limit;
        self.over_sender_quota += other.over_sender_quota;
        self.over_capacity += other.over_capacity;
        self.held += other.held;
        self.held_bytes += other.held_bytes;
        self.expired += other.expired;
        self.removed += other.removed;
        self.commits += other.commits;
    }
}

/// Why a store operation failed. `Clone` so that one failed commit can be reported to every
/// message of its batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend failed: I/O, the database, later the network. Nothing of the failed call is
    /// durable.
    #[error("offline store backend failed: {0}")]
    Backend(#[source] Arc<dyn std::error::Error + Send + Sync + 'static>),
    /// The store holds something this code did not write (a damaged or foreign file).
    #[error("offline store holds a malformed {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// A field cannot be encoded (longer than the record format allows).
    #[error("offline message {what} is too long to store ({len} bytes)")]
    TooLarge { what: &'static str, len: usize },
    /// The group-commit queue is full: the disk is not keeping up. The message was not stored; do
    /// not ACK the sender (its resend is the retry).
    #[error("offline store is busy: its write queue is full")]
    Busy,
    /// The group-commit writer has stopped; the message was not stored.
    #[error("offline store writer has stopped")]
    Closed,
}

impl StoreError {
    /// Wraps a backend's own error.
    pub fn backend(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Backend(Arc::new(err))
    }
}

/// Durable per-user queues of offline messages. Thread-safe: every method takes `&self`.
///
/// Every method blocks on the backend (a commit waits for fsync): call them from the
/// [`group::GroupCommit`] writer or another thread that may block, not from an event loop.
pub trait Store: Send + Sync + 'static {
    /// Appends durably in ONE transaction (one commit/fsync for the whole batch); outcome per
    /// message, in order. On `Err` nothing of the batch was stored.
    fn append(&self, batch: &[Offline]) -> Result<Vec<Appended>, StoreError>;

    /// Up to `limit` messages for `to` with a seq above `after` (0: from the start), oldest
    /// (lowest seq) first; messages older than [`Limits::max_age`] are skipped (the sweep,
    /// [`Store::expire`], deletes and counts them). Read-only: no write transaction, no fsync.
    /// Nothing is removed for being returned: delivery is confirmed by [`Store::remove`]
    /// (`after` lets a caller page past messages it has sent but whose removal is not committed
    /// yet).
    fn pending(
        &self,
        to: &str,
        after: u64,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<Stored>, StoreError>;

    /// Deletes delivered messages (by seq) of each removal's user, all in ONE transaction;
    /// unknown seqs are ignored.
    fn remove(&self, removals: &[Removal]) -> Result<(), StoreError>;

    /// Deletes up to `max` expired messages (oldest first) in one transaction, and counts them;
    /// `more` says whether expired messages may remain (call again).
    fn expire(&self, now_ms: i64, max: usize) -> Result<Expired, StoreError>;

    /// Counters since the store was opened. Must not block (unlike the other methods): the
    /// control API reads them on an event loop.
    fn stats(&self) -> StoreStats;
}

/// Lock-free counters behind [`StoreStats`], for backends.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    stored: AtomicU64,
    duplicates: AtomicU64,
    over_limit: AtomicU64,
    over_sender_quota: AtomicU64,
    over_capacity: AtomicU64,
    expired: AtomicU64,
    removed: AtomicU64,
    commits: AtomicU64,
    held: AtomicU64,
    held_bytes: AtomicU64,
}

impl Counters {
    /// Adds a committed append's outcomes.
    pub(crate) fn appended(&self, outcomes: &[Appended]) {
        let (mut stored, mut duplicates, mut over_limit) = (0, 0, 0);
        let (mut over_sender_quota, mut over_capacity) = (0, 0);
        for outcome in outcomes {
            match outcome {
                Appended::Stored { .. } => stored += 1,
                Appended::Duplicate { .. } => duplicates += 1,
                Appended::OverLimit => over_limit += 1,
                Appended::OverSenderQuota => over_sender_quota += 1,
                Appended::OverCapacity => over_capacity += 1,
            }
        }
        self.stored.fetch_add(stored, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        self.over_limit.fetch_add(over_limit, Ordering::Relaxed);
        self.over_sender_quota
            .fetch_add(over_sender_quota, Ordering::Relaxed);
        self.over_capacity
            .fetch_add(over_capacity, Ordering::Relaxed);
    }

    pub(crate) fn expired(&self, n: u64) {
        self.expired.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn removed(&self, n: u64) {
        self.removed.fetch_add(n, Ordering::Relaxed);
    }

    /// What the store holds now (gauges, set by the backend after each commit).
    pub(crate) fn set_held(&self, messages: u64, bytes: u64) {
        self.held.store(messages, Ordering::Relaxed);
        self.held_bytes.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn committed(&self) {
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StoreStats {
        StoreStats {
            stored: self.stored.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            over_limit: self.over_limit.load(Ordering::Relaxed),
            over_sender_quota: self.over_sender_quota.load(Ordering::Relaxed),
            over_capacity: self.over_capacity.load(Ordering::Relaxed),
            held: self.held.load(Ordering::Relaxed),
            held_bytes: self.held_bytes.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            removed: self.removed.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A unique, self-deleting directory under `std::env::temp_dir()` and message builders.

    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::Offline;

    /// A directory that is removed (with its contents) when dropped.
    #[derive(Debug)]
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(label: &str) -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let path = std::env::temp_dir().join(format!(
                "imedge-store-{label}-{}-{}-{nanos}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A message `n` from `from` to `to` with fingerprint `fp-{from}-{n}`, stored at `at_ms`; the
    /// body carries `n` so order can be checked after a round trip.
    pub(crate) fn msg(to: &str, from: &str, n: u64, at_ms: i64) -> Offline {
        Offline {
            to: to.to_owned(),
            from: from.to_owned(),
            fp: Some(format!("fp-{from}-{n}")),
            json: body(to, from, n),
            stored_at_ms: at_ms,
            sender_acked: false,
        }
    }

    /// A MobileIMSDK-shaped C2C body (~200 bytes) carrying `n`.
    pub(crate) fn body(to: &str, from: &str, n: u64) -> bytes::Bytes {
        bytes::Bytes::from(format!(
            r#"{{"bridge":false,"dataContent":"message number {n:>10} with some text to make it realistic","fp":"fp-{from}-{n}","from":"{from}","QoS":true,"to":"{to}","type":2,"typeu":-1,"sm":-1}}"#
        ))
    }

    /// The `n` a [`body`] carries.
    pub(crate) fn n_of(json: &[u8]) -> u64 {
        let text = std::str::from_utf8(json).unwrap();
        let start = text.find("message number ").unwrap() + "message number ".len();
        text[start..start + 10].trim().parse().unwrap()
    }
}
