//! [`RedbStore`]: the offline store in one embedded redb file, `offline.redb` under `--data-dir`.
//!
//! # Tables
//!
//! | table      | key                       | value         | why                                |
//! |------------|---------------------------|---------------|------------------------------------|
//! | `messages` | `(to, seq)`               | record bytes  | a queue is one range, in seq order |
//! | `dedup`    | `(to, from, fp)`          | `seq`         | a resend finds the stored copy     |
//! | `counts`   | `to`                      | messages held | the per-user limit without a scan  |
//! | `by_age`   | `(stored_at_ms, to, seq)` | `()`          | `expire` reads only what expired   |
//! | `meta`     | name                      | `u64`         | schema version, next seq           |
//!
//! `seq` comes from one counter for the whole store (`meta.next_seq`), saved in the same
//! transaction as the messages it numbered: it increases per user (and globally) in append
//! order, across restarts, even after a user's queue emptied. A `counts` row exists only while its
//! user has messages; a `dedup` row only while its message is stored.
//!
//! A record is `[version=1][stored_at_ms: i64 LE][from_len: u32 LE][from][has_fp: 0|1]
//! ([fp_len: u32 LE][fp])[json…]`, a format of our own rather than a redb tuple so that redb's
//! evolving tuple/`Option` encodings (3.0 and 5.0 both changed them) cannot change ours. Anything
//! that does not parse is a [`StoreError::Corrupt`], never a panic.
//!
//! # Durability
//!
//! Every write transaction commits with `Durability::Immediate` (redb's default, set explicitly):
//! `commit()` returns after the data and the commit slot are fsynced, once per transaction. redb's
//! commit slot is checksummed, so a crash mid-commit leaves the previous commit intact and the next
//! open repairs to it. Transactions that change nothing are aborted, so they cost no fsync.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use ::redb::{
    Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction,
};
use bytes::Bytes;

use super::{
    Appended, Counters, Expired, Limits, Offline, Removal, Store, StoreError, StoreStats, Stored,
    SERVER_SENDER,
};

/// The store's file name under the data directory.
pub const FILE_NAME: &str = "offline.redb";

/// redb's page cache. Its default (1 GiB) is sized for a database that is the application's main
/// state; offline messages are written once, read once at login and deleted, so a small cache
/// holds the hot part (recent pages of the B-trees) and the rest of the memory stays with the
/// event loops.
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The layout version in `meta.schema`; a file with another version is refused, not misread.
const SCHEMA_VERSION: u64 = 1;
/// The first seq ever handed out (0 is never a valid seq).
const FIRST_SEQ: u64 = 1;

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const DEDUP: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("dedup");
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");
const BY_AGE: TableDefinition<(i64, &str, u64), ()> = TableDefinition::new("by_age");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_SCHEMA: &str = "schema";
const META_NEXT_SEQ: &str = "next_seq";

/// The offline store in a redb file. Cheap to share (`Arc`); redb serialises write transactions
/// and lets reads run beside them on a snapshot.
pub struct RedbStore {
    db: Database,
    limits: Limits,
    counters: Counters,
    /// What the per-sender quota and the byte cap are checked against: kept in memory (rebuilt
    /// by one scan at open) so an append needs no extra table. Locked for the whole of every
    /// write transaction, before it begins, and updated only after its commit — so it always
    /// equals what is durable.
    held: Mutex<Held>,
}

/// The store's contents in numbers (see [`RedbStore::held`]).
#[derive(Debug, Default)]
struct Held {
    /// Messages stored, per sender (a sender with none has no entry).
    per_sender: HashMap<String, u64>,
    /// Messages stored.
    messages: u64,
    /// Bytes stored: [`size`] of every message.
    bytes: u64,
}

impl Held {
    fn freed(&mut self, freed: &[Freed]) {
        for f in freed {
            self.messages = self.messages.saturating_sub(1);
            self.bytes = self.bytes.saturating_sub(f.bytes);
            if let Some(from) = &f.from {
                if let Some(n) = self.per_sender.get_mut(from) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.per_sender.remove(from);
                    }
                }
            }
        }
    }
}

/// A deleted message, as [`Held`] counts it.
#[derive(Debug)]
struct Freed {
    /// Its sender (`None`: the record was malformed).
    from: Option<String>,
    bytes: u64,
}

/// What a message counts against [`Limits::max_bytes`]: its record and its key.
fn size(to: &str, record_len: usize) -> u64 {
    (to.len() + record_len) as u64
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("limits", &self.limits)
            .field("stats", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens (or creates) `dir/offline.redb`, creating `dir` if missing. After a crash, redb
    /// repairs the file to its last commit here.
    pub fn open(dir: &Path, limits: Limits) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::backend)?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join(FILE_NAME))?;
        let store = Self {
            db,
            limits,
            counters: Counters::default(),
            held: Mutex::new(Held::default()),
        };
        store.init()?;
        let held = store.scan()?;
        store.counters.set_held(held.messages, held.bytes);
        *store.lock() = held;
        Ok(store)
    }

    /// Whether `err` from [`RedbStore::open`] says another process has the file open — after a
    /// `kill -9`, the killed run until the kernel has finished tearing it down.
    pub fn is_locked(err: &StoreError) -> bool {
        matches!(err, StoreError::Backend(e)
            if matches!(e.downcast_ref::<::redb::Error>(), Some(::redb::Error::DatabaseAlreadyOpen)))
    }

    /// Counts what is stored (one pass over the messages).
    fn scan(&self) -> Result<Held, StoreError> {
        let mut held = Held::default();
        let txn = self.db.begin_read()?;
        let messages = txn.open_table(MESSAGES)?;
        for entry in messages.iter()? {
            let (key, value) = entry?;
            let (to, _) = key.value();
            let value = value.value();
            held.messages += 1;
            held.bytes += size(to, value.len());
            // A malformed record counts in bytes only; `pending` reports it.
            if let Ok(record) = record::decode(value) {
                *held.per_sender.entry(record.from.to_owned()).or_default() += 1;
            }
        }
        Ok(held)
    }

    /// The accounting, for one write transaction (a poisoned lock is still consistent: it is
    /// updated only after a commit, in one step).
    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The limits this store enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Creates the tables (so read transactions find them) and checks the schema version.
    fn init(&self) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let schema = meta.get(META_SCHEMA)?.map(|v| v.value());
            match schema {
                None => {
                    meta.insert(META_SCHEMA, SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(StoreError::Corrupt {
                        what: "schema version",
                        detail: format!("{other}, this build reads {SCHEMA_VERSION}"),
                    })
                }
            }
            txn.open_table(MESSAGES)?;
            txn.open_table(DEDUP)?;
            txn.open_table(COUNTS)?;
            txn.open_table(BY_AGE)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// A write transaction that fsyncs on commit.
    fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        Ok(txn)
    }

    /// Commits `txn` if it changed anything, else aborts it (no fsync for nothing).
    fn finish(&self, txn: WriteTransaction, changed: bool) -> Result<(), StoreError> {
        if changed {
            txn.commit()?;
            self.counters.committed();
        } else {
            txn.abort()?;
        }
        Ok(())
    }

    /// Deletes the given messages in one transaction; returns how many existed.
    fn delete(&self, removals: &[Removal]) -> Result<u64, StoreError> {
        if removals.iter().all(|r| r.seqs.is_empty()) {
            return Ok(0);
        }
        let mut held = self.lock();
        let txn = self.begin_write()?;
        let mut freed = Vec::new();
        {
            let mut tables = Tables::open(&txn)?;
            for removal in removals {
                for &seq in &removal.seqs {
                    if let Some(f) = tables.delete(&removal.to, seq)? {
                        freed.push(f);
                    }
                }
            }
        }
        self.finish(txn, !freed.is_empty())?;
        held.freed(&freed);
        self.counters.set_held(held.messages, held.bytes);
        Ok(freed.len() as u64)
    }

    /// [`Store::expire`]: deletes up to `max` messages stored before `cutoff_ms`; returns
    /// (deleted, whether more may remain).
    fn expire_chunk(&self, cutoff_ms: i64, max: usize) -> Result<(u64, bool), StoreError> {
        let mut held = self.lock();
        let txn = self.begin_write()?;
        let mut freed = Vec::new();
        let mut due = Vec::new();
        {
            let mut tables = Tables::open(&txn)?;
            for entry in tables.by_age.range(..(cutoff_ms, "", 0u64))? {
                if due.len() >= max {
                    break;
                }
                let (key, _) = entry?;
                let (at, to, seq) = key.value();
                due.push((at, to.to_owned(), seq));
            }
            for (at, to, seq) in &due {
                // The index row goes even if its message is missing, so the loop always advances.
                tables.by_age.remove((*at, to.as_str(), *seq))?;
                if let Some(f) = tables.delete(to, *seq)? {
                    freed.push(f);
                }
            }
        }
        self.finish(txn, !due.is_empty())?;
        held.freed(&freed);
        self.counters.set_held(held.messages, held.bytes);
        Ok((freed.len() as u64, due.len() >= max))
    }
}

impl Store for RedbStore {
    fn append(&self, batch: &[Offline]) -> Result<Vec<Appended>, StoreError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        if batch.is_empty() {
            return Ok(outcomes);
        }
        let max_per_user = u64::try_from(self.limits.max_per_user).unwrap_or(u64::MAX);
        let max_per_sender = u64::try_from(self.limits.max_per_sender).unwrap_or(u64::MAX);
        let mut held = self.lock();
        let txn = self.begin_write()?;
        let mut stored_any = false;
        // What this batch adds to `held`, applied once it is committed.
        let mut added_per_sender: HashMap<&str, u64> = HashMap::new();
        let mut added_bytes = 0u64;
        {
            let mut tables = Tables::open(&txn)?;
            let mut meta = txn.open_table(META)?;
            let mut next_seq = meta
                .get(META_NEXT_SEQ)?
                .map_or(FIRST_SEQ, |v| v.value())
                .max(FIRST_SEQ);
            let mut record = Vec::new();
            // Per-user counts of this batch: (count, changed), written once per user at the end.
            let mut counts: HashMap<&str, (u64, bool)> = HashMap::new();
            for msg in batch {
                let to = msg.to.as_str();
                if let Some(fp) = &msg.fp {
                    let known = tables.dedup.get((to, msg.from.as_str(), fp.as_str()))?;
                    if let Some(seq) = known.map(|v| v.value()) {
                        // A row whose message is gone is stale (see `Tables::delete`); the new
                        // copy takes it over below.
                        if tables.messages.get((to, seq))?.is_some() {
                            outcomes.push(Appended::Duplicate { seq });
                            continue;
                        }
                    }
                }
                let count = match counts.get(to) {
                    Some(&(count, _)) => count,
                    None => tables.counts.get(to)?.map_or(0, |v| v.value()),
                };
                if count >= max_per_user {
                    // Refused, never silently: counted (StoreStats::over_limit) and the sender gets no ACK;
                    // logged at debug only, since a full queue can refuse every message.
                    tracing::debug!(to, max_per_user, "offline queue full: message refused");
                    outcomes.push(Appended::OverLimit);
                    continue;
                }
                let from = msg.from.as_str();
                let sent = held.per_sender.get(from).copied().unwrap_or(0)
                    + added_per_sender.get(from).copied().unwrap_or(0);
                if !msg.sender_acked && from != SERVER_SENDER && sent >= max_per_sender {
                    tracing::debug!(from, max_per_sender, "sender's offline quota full: refused");
                    outcomes.push(Appended::OverSenderQuota);
                    continue;
                }
                record::encode(msg, &mut record)?;
                let bytes = size(to, record.len());
                if !msg.sender_acked
                    && held.bytes.saturating_add(added_bytes).saturating_add(bytes)
                        > self.limits.max_bytes
                {
                    tracing::debug!(
                        to,
                        max_bytes = self.limits.max_bytes,
                        "offline store full: refused"
                    );
                    outcomes.push(Appended::OverCapacity);
                    continue;
                }
                let seq = next_seq;
                next_seq = seq.checked_add(1).ok_or(StoreError::Corrupt {
                    what: "sequence counter",
                    detail: "exhausted".to_owned(),
                })?;
                *added_per_sender.entry(from).or_default() += 1;
                added_bytes += bytes;
                tables.messages.insert((to, seq), record.as_slice())?;
                if let Some(fp) = &msg.fp {
                    tables
                        .dedup
                        .insert((to, msg.from.as_str(), fp.as_str()), seq)?;
                }
                counts.insert(to, (count.saturating_add(1), true));
                tables.by_age.insert((msg.stored_at_ms, to, seq), ())?;
                outcomes.push(Appended::Stored { seq });
                stored_any = true;
            }
            for (to, (count, changed)) in counts {
                if changed {
                    tables.counts.insert(to, count)?;
                }
            }
            if stored_any {
                meta.insert(META_NEXT_SEQ, next_seq)?;
            }
        }
        // Duplicates were already durable; over-limit messages were not written: a batch that
        // stored nothing needs no commit.
        self.finish(txn, stored_any)?;
        for (from, n) in added_per_sender {
            held.messages += n;
            *held.per_sender.entry(from.to_owned()).or_default() += n;
        }
        held.bytes += added_bytes;
        self.counters.set_held(held.messages, held.bytes);
        drop(held);
        self.counters.appended(&outcomes);
        Ok(outcomes)
    }

    fn pending(
        &self,
        to: &str,
        after: u64,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::new();
        let txn = self.db.begin_read()?;
        let messages = txn.open_table(MESSAGES)?;
        let Some(first) = after.checked_add(1) else {
            return Ok(out);
        };
        for entry in messages.range((to, first)..=(to, u64::MAX))? {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry?;
            let (_, seq) = key.value();
            let record = record::decode(value.value()).map_err(|e| located(e, to, seq))?;
            if self.limits.expired(record.stored_at_ms, now_ms) {
                // Left for the sweep (`expire`), which deletes and counts it.
                continue;
            }
            out.push(Stored {
                seq,
                from: record.from.to_owned(),
                fp: record.fp.map(str::to_owned),
                json: Bytes::copy_from_slice(record.json),
                stored_at_ms: record.stored_at_ms,
            });
        }
        Ok(out)
    }

    fn remove(&self, removals: &[Removal]) -> Result<(), StoreError> {
        let n = self.delete(removals)?;
        self.counters.removed(n);
        Ok(())
    }

    fn expire(&self, now_ms: i64, max: usize) -> Result<Expired, StoreError> {
        // expired ⇔ now - stored_at > max_age ⇔ stored_at < now - max_age
        let cutoff_ms = now_ms.saturating_sub(self.limits.max_age_ms());
        let (deleted, more) = self.expire_chunk(cutoff_ms, max.max(1))?;
        self.counters.expired(deleted);
        if deleted > 0 {
            // Dropped, never silently: counted in the stats and said in the log.
            tracing::info!(
                dropped = deleted,
                max_age_secs = self.limits.max_age.as_secs(),
                "expired offline messages dropped"
            );
        }
        Ok(Expired { deleted, more })
    }

    /// Lock-free (atomics): safe to call from an event loop.
    fn stats(&self) -> StoreStats {
        self.counters.snapshot()
    }
}

/// The tables one message lives in, opened in one write transaction.
struct Tables<'txn> {
    messages: Table<'txn, (&'static str, u64), &'static [u8]>,
    dedup: Table<'txn, (&'static str, &'static str, &'static str), u64>,
    counts: Table<'txn, &'static str, u64>,
    by_age: Table<'txn, (i64, &'static str, u64), ()>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            messages: txn.open_table(MESSAGES)?,
            dedup: txn.open_table(DEDUP)?,
            counts: txn.open_table(COUNTS)?,
            by_age: txn.open_table(BY_AGE)?,
        })
    }

    /// Deletes message `seq` of `to` and its index rows; returns whether it was stored.
    ///
    /// A record that does not decode is deleted all the same (this is how a malformed record
    /// reported by `pending` is got rid of); its index rows cannot be found without it, so they
    /// are left: `expire` drops a `by_age` row whose message is gone, and `append` ignores a
    /// `dedup` row whose message is gone.
    fn delete(&mut self, to: &str, seq: u64) -> Result<Option<Freed>, StoreError> {
        let Some(removed) = self.messages.remove((to, seq))? else {
            return Ok(None);
        };
        let mut freed = Freed {
            from: None,
            bytes: size(to, removed.value().len()),
        };
        match record::decode(removed.value()) {
            Ok(record) => {
                freed.from = Some(record.from.to_owned());
                if let Some(fp) = record.fp {
                    let key = (to, record.from, fp);
                    // Only the row that names this message (a stale row may name another).
                    if self.dedup.get(key)?.map(|v| v.value()) == Some(seq) {
                        self.dedup.remove(key)?;
                    }
                }
                self.by_age.remove((record.stored_at_ms, to, seq))?;
            }
            Err(err) => {
                tracing::warn!(to, seq, error = %err, "deleted a malformed offline record");
            }
        }
        // Never below zero, and the row goes when the queue is empty.
        let count = self.counts.get(to)?.map_or(0, |v| v.value());
        if count <= 1 {
            self.counts.remove(to)?;
        } else {
            self.counts.insert(to, count - 1)?;
        }
        Ok(Some(freed))
    }
}

/// Names the message a decoding error is about, so it can be found (and removed).
fn located(err: StoreError, to: &str, seq: u64) -> StoreError {
    match err {
        StoreError::Corrupt { what, detail } => StoreError::Corrupt {
            what,
            detail: format!("{detail} (user {to:?}, seq {seq})"),
        },
        other => other,
    }
}

/// The stored form of a message (see the module doc for the layout).
mod record {
    use super::super::{Offline, StoreError};

    /// The record layout version (first byte).
    const VERSION: u8 = 1;

    /// A decoded record, borrowing the stored bytes.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Record<'a> {
        pub(super) stored_at_ms: i64,
        pub(super) from: &'a str,
        pub(super) fp: Option<&'a str>,
        pub(super) json: &'a [u8],
    }

    /// Encodes `msg` (all but `to`, which is in the key) into `out`, replacing its contents.
    pub(super) fn encode(msg: &Offline, out: &mut Vec<u8>) -> Result<(), StoreError> {
        out.clear();
        out.push(VERSION);
        out.extend_from_slice(&msg.stored_at_ms.to_le_bytes());
        put_str(out, "sender", &msg.from)?;
        match &msg.fp {
            None => out.push(0),
            Some(fp) => {
                out.push(1);
                put_str(out, "fingerprint", fp)?;
            }
        }
        out.extend_from_slice(&msg.json);
        Ok(())
    }

    fn put_str(out: &mut Vec<u8>, what: &'static str, s: &str) -> Result<(), StoreError> {
        let len =
            u32::try_from(s.len()).map_err(|_| StoreError::TooLarge { what, len: s.len() })?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        Ok(())
    }

    /// Decodes a record; anything malformed is [`StoreError::Corrupt`].
    pub(super) fn decode(bytes: &[u8]) -> Result<Record<'_>, StoreError> {
        let (&version, rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
        if version != VERSION {
            return Err(corrupt(format!("version {version}")));
        }
        let (at, rest) = rest
            .split_first_chunk::<8>()
            .ok_or_else(|| corrupt("truncated timestamp"))?;
        let (from, rest) = take_str(rest, "sender")?;
        let (&has_fp, rest) = rest
            .split_first()
            .ok_or_else(|| corrupt("truncated fingerprint flag"))?;
        let (fp, json) = match has_fp {
            0 => (None, rest),
            1 => {
                let (fp, rest) = take_str(rest, "fingerprint")?;
                (Some(fp), rest)
            }
            other => return Err(corrupt(format!("fingerprint flag {other}"))),
        };
        Ok(Record {
            stored_at_ms: i64::from_le_bytes(*at),
            from,
            fp,
            json,
        })
    }

    fn take_str<'a>(bytes: &'a [u8], what: &str) -> Result<(&'a str, &'a [u8]), StoreError> {
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt(format!("truncated {what} length")))?;
        let len = usize::try_from(u32::from_le_bytes(*len))
            .map_err(|_| corrupt(format!("{what} length")))?;
        let (s, rest) = rest
            .split_at_checked(len)
            .ok_or_else(|| corrupt(format!("truncated {what}")))?;
        let s = std::str::from_utf8(s).map_err(|_| corrupt(format!("{what} is not UTF-8")))?;
        Ok((s, rest))
    }

    fn corrupt(detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            what: "message record",
            detail: detail.into(),
        }
    }
}

/// redb's errors are backend errors: wrapped whole, so the cause chain reaches the log.
macro_rules! from_redb {
    ($($err:ty),* $(,)?) => {$(
        impl From<$err> for StoreError {
            fn from(err: $err) -> Self {
                Self::Backend(Arc::new(::redb::Error::from(err)))
            }
        }
    )*};
}

from_redb!(
    ::redb::Error,
    ::redb::DatabaseError,
    ::redb::TransactionError,
    ::redb::TableError,
    ::redb::StorageError,
    ::redb::CommitError,
    ::redb::SetDurabilityError,
);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::testutil::{msg, n_of, TempDir};

    const DAY_MS: i64 = 24 * 60 * 60 * 1000;

    fn open(dir: &TempDir) -> RedbStore {
        RedbStore::open(dir.path(), Limits::default()).unwrap()
    }

    /// Sweeps until nothing expired remains (chunks of 100); returns how many went.
    fn expire_all(store: &RedbStore, now_ms: i64) -> u64 {
        let mut total = 0;
        loop {
            let e = store.expire(now_ms, 100).unwrap();
            total += e.deleted;
            if !e.more {
                return total;
            }
        }
    }

    fn seqs(outcomes: &[Appended]) -> Vec<u64> {
        outcomes
            .iter()
            .map(|o| match o {
                Appended::Stored { seq } => *seq,
                other => panic!("not stored: {other:?}"),
            })
            .collect()
    }

    /// `(seq, n)` of everything pending for `to`.
    fn queue(store: &RedbStore, to: &str) -> Vec<(u64, u64)> {
        store
            .pending(to, 0, usize::MAX, 0)
            .unwrap()
            .iter()
            .map(|s| (s.seq, n_of(&s.json)))
            .collect()
    }

    #[test]
    fn a_thousand_messages_come_back_in_order_byte_for_byte() {
        let dir = TempDir::new("order");
        let store = open(&dir);
        // Three recipients interleaved, batches of varying size.
        let all: Vec<Offline> = (0..1_000u64)
            .map(|n| msg(&format!("u{}", n % 3), "s", n, n as i64))
            .collect();
        let mut outcomes = Vec::new();
        for chunk in all.chunks(37) {
            outcomes.extend(store.append(chunk).unwrap());
        }
        let seqs = seqs(&outcomes);
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "append order = seq order"
        );
        for u in 0..3 {
            let to = format!("u{u}");
            let pending = store.pending(&to, 0, usize::MAX, 0).unwrap();
            let expected: Vec<&Offline> = all.iter().filter(|m| m.to == to).collect();
            assert_eq!(pending.len(), expected.len());
            for (got, want) in pending.iter().zip(expected) {
                assert_eq!(got.json, want.json);
                assert_eq!(got.from, want.from);
                assert_eq!(got.fp, want.fp);
                assert_eq!(got.stored_at_ms, want.stored_at_ms);
            }
            assert!(pending.windows(2).all(|w| w[0].seq < w[1].seq));
        }
        // A limit takes the oldest first.
        let first = store.pending("u1", 0, 5, 0).unwrap();
        assert_eq!(
            first.iter().map(|s| n_of(&s.json)).collect::<Vec<_>>(),
            [1, 4, 7, 10, 13]
        );
        assert!(store.pending("u1", 0, 0, 0).unwrap().is_empty());
        // Paging: the next five after the last one returned.
        let next = store.pending("u1", first[4].seq, 5, 0).unwrap();
        assert_eq!(
            next.iter().map(|s| n_of(&s.json)).collect::<Vec<_>>(),
            [16, 19, 22, 25, 28]
        );
        assert!(store.pending("u1", u64::MAX, 5, 0).unwrap().is_empty());
        assert_eq!(store.stats().stored, 1_000);
        assert_eq!(store.stats().commits, 1_000u64.div_ceil(37));
    }

    #[test]
    fn user_ids_that_are_prefixes_of_each_other_stay_apart() {
        let dir = TempDir::new("prefix");
        let store = open(&dir);
        let batch = ["u1", "u10", "u", "u1\0", "u2"].map(|to| msg(to, "s", 1, 0));
        store.append(&batch).unwrap();
        for to in ["u1", "u10", "u", "u1\0", "u2"] {
            let pending = store.pending(to, 0, usize::MAX, 0).unwrap();
            assert_eq!(pending.len(), 1, "{to:?}");
            assert!(pending[0]
                .json
                .windows(to.len())
                .any(|w| w == to.as_bytes()));
        }
        assert!(store.pending("u3", 0, usize::MAX, 0).unwrap().is_empty());
    }

    #[test]
    fn a_resend_is_stored_once() {
        let dir = TempDir::new("dedup");
        let store = open(&dir);
        let m = msg("bob", "alice", 1, 0);
        let first = store.append(std::slice::from_ref(&m)).unwrap();
        assert_eq!(first, [Appended::Stored { seq: 1 }]);
        let commits = store.stats().commits;
        // The resend, also twice within one batch.
        let again = store.append(&[m.clone(), m.clone()]).unwrap();
        assert_eq!(again, [Appended::Duplicate { seq: 1 }; 2]);
        assert_eq!(store.stats().commits, commits, "nothing new: no commit");
        // Within one batch, before it was ever stored.
        let fresh = msg("bob", "alice", 2, 0);
        let batch = store.append(&[fresh.clone(), fresh]).unwrap();
        assert_eq!(
            batch,
            [Appended::Stored { seq: 2 }, Appended::Duplicate { seq: 2 }]
        );
        // Same fp from another sender, or to another recipient: different messages.
        let mut other_sender = m.clone();
        other_sender.from = "carol".into();
        let mut other_to = m.clone();
        other_to.to = "dave".into();
        assert_eq!(
            store.append(&[other_sender, other_to]).unwrap(),
            [Appended::Stored { seq: 3 }, Appended::Stored { seq: 4 }]
        );
        // Without a fingerprint nothing is de-duplicated.
        let mut no_fp = m.clone();
        no_fp.fp = None;
        let twice = store.append(&[no_fp.clone(), no_fp]).unwrap();
        assert_eq!(seqs(&twice), [5, 6]);
        assert_eq!(queue(&store, "bob").len(), 5); // seqs 1, 2, 3 (carol), 5, 6
        let stats = store.stats();
        assert_eq!((stats.stored, stats.duplicates), (6, 3));
        // Once delivered and removed, the fingerprint is free again (the dedup window is the
        // time a message is stored).
        store.remove(&[Removal::new("bob", &[1])]).unwrap();
        assert_eq!(seqs(&store.append(&[m]).unwrap()), [7]);
    }

    #[test]
    fn removed_messages_are_gone_and_unknown_seqs_are_ignored() {
        let dir = TempDir::new("remove");
        let store = open(&dir);
        let batch: Vec<Offline> = (0..10).map(|n| msg("u", "s", n, 0)).collect();
        store.append(&batch).unwrap();
        store.append(&[msg("v", "s", 100, 0)]).unwrap();
        store.remove(&[Removal::new("u", &[1, 3, 5, 999])]).unwrap();
        store.remove(&[Removal::new("v", &[2])]).unwrap(); // u's seq under another user: ignored
        store.remove(&[Removal::new("nobody", &[4])]).unwrap();
        store.remove(&[Removal::new("u", &[])]).unwrap();
        let left: Vec<u64> = queue(&store, "u").iter().map(|q| q.0).collect();
        assert_eq!(left, [2, 4, 6, 7, 8, 9, 10]);
        assert_eq!(queue(&store, "v"), [(11, 100)]);
        assert_eq!(store.stats().removed, 3);
        store.remove(&[Removal::new("u", &left)]).unwrap();
        assert!(queue(&store, "u").is_empty());
        assert_eq!(store.stats().removed, 10);
    }

    #[test]
    fn a_partial_delivery_resumes_after_reopen_in_order() {
        let dir = TempDir::new("partial");
        {
            let store = open(&dir);
            let batch: Vec<Offline> = (0..100).map(|n| msg("u", "s", n, 0)).collect();
            store.append(&batch).unwrap();
            // Delivered the first 30, the recipient ACKed 25 of them, then disconnected.
            let delivered = store.pending("u", 0, 30, 0).unwrap();
            let acked: Vec<u64> = delivered.iter().take(25).map(|s| s.seq).collect();
            store.remove(&[Removal::new("u", &acked)]).unwrap();
        }
        let store = open(&dir);
        let rest = queue(&store, "u");
        assert_eq!(
            rest.iter().map(|q| q.1).collect::<Vec<_>>(),
            (25..100).collect::<Vec<_>>()
        );
        assert!(rest.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn the_per_user_limit_refuses_and_counts() {
        let dir = TempDir::new("limit");
        let limits = Limits {
            max_per_user: 3,
            ..Limits::default()
        };
        let store = RedbStore::open(dir.path(), limits).unwrap();
        let batch: Vec<Offline> = (0..5).map(|n| msg("u", "s", n, 0)).collect();
        let out = store.append(&batch).unwrap();
        assert_eq!(
            out,
            [
                Appended::Stored { seq: 1 },
                Appended::Stored { seq: 2 },
                Appended::Stored { seq: 3 },
                Appended::OverLimit,
                Appended::OverLimit,
            ]
        );
        assert!(!Appended::OverLimit.is_durable());
        // A resend of a stored message is still a duplicate (the sender may be ACKed), not
        // over the limit; other users are unaffected.
        let out = store
            .append(&[batch[0].clone(), msg("v", "s", 9, 0)])
            .unwrap();
        assert_eq!(
            out,
            [Appended::Duplicate { seq: 1 }, Appended::Stored { seq: 4 }]
        );
        assert_eq!(store.stats().over_limit, 2);
        // Delivery makes room.
        store.remove(&[Removal::new("u", &[1])]).unwrap();
        assert_eq!(seqs(&store.append(&batch[3..4]).unwrap()), [5]);
        assert_eq!(store.append(&batch[4..5]).unwrap(), [Appended::OverLimit]);
        assert_eq!(store.stats().over_limit, 3);
        // The count survives a reopen.
        drop(store);
        let store = RedbStore::open(dir.path(), limits).unwrap();
        assert_eq!(store.append(&batch[4..5]).unwrap(), [Appended::OverLimit]);
    }

    #[test]
    fn the_per_sender_quota_refuses_and_counts_but_not_the_server() {
        let dir = TempDir::new("sender-quota");
        let limits = Limits {
            max_per_sender: 3,
            ..Limits::default()
        };
        let store = RedbStore::open(dir.path(), limits).unwrap();
        // A sender inventing recipients: each queue is far from its per-user limit.
        let batch: Vec<Offline> = (0..5)
            .map(|n| msg(&format!("u{n}"), "mallory", n, 0))
            .collect();
        let out = store.append(&batch).unwrap();
        assert_eq!(seqs(&out[..3]), [1, 2, 3]);
        assert_eq!(out[3..], [Appended::OverSenderQuota; 2]);
        assert!(!Appended::OverSenderQuota.is_durable());
        assert_eq!(store.stats().over_sender_quota, 2);
        // A resend of a stored one is a duplicate (ACKed), others are unaffected, and the
        // server ("0") is exempt.
        let out = store
            .append(&[batch[0].clone(), msg("u9", "alice", 9, 0)])
            .unwrap();
        assert_eq!(
            out,
            [Appended::Duplicate { seq: 1 }, Appended::Stored { seq: 4 }]
        );
        let s2c: Vec<Offline> = (0..5).map(|n| msg("u0", SERVER_SENDER, n, 0)).collect();
        assert_eq!(seqs(&store.append(&s2c).unwrap()).len(), 5);
        // Delivery (and expiry) gives the quota back; the count is rebuilt at open.
        store.remove(&[Removal::new("u1", &[2])]).unwrap();
        assert_eq!(seqs(&store.append(&batch[3..4]).unwrap()), [10]);
        assert_eq!(
            store.append(&batch[4..5]).unwrap(),
            [Appended::OverSenderQuota]
        );
        drop(store);
        let store = RedbStore::open(dir.path(), limits).unwrap();
        assert_eq!(
            store.append(&batch[4..5]).unwrap(),
            [Appended::OverSenderQuota]
        );
        store.remove(&[Removal::new("u0", &[1])]).unwrap();
        assert_eq!(seqs(&store.append(&batch[4..5]).unwrap()), [11]);
    }

    #[test]
    fn the_byte_cap_refuses_and_counts() {
        let dir = TempDir::new("capacity");
        let one = {
            let m = msg("u", "s", 0, 0);
            let mut record = Vec::new();
            record::encode(&m, &mut record).unwrap();
            size("u", record.len())
        };
        let limits = Limits {
            max_bytes: one * 3 + one / 2,
            ..Limits::default()
        };
        let store = RedbStore::open(dir.path(), limits).unwrap();
        let batch: Vec<Offline> = (0..5).map(|n| msg("u", "s", n, 0)).collect();
        let out = store.append(&batch).unwrap();
        assert_eq!(seqs(&out[..3]), [1, 2, 3]);
        assert_eq!(out[3..], [Appended::OverCapacity; 2]);
        assert!(!Appended::OverCapacity.is_durable());
        let stats = store.stats();
        assert_eq!(
            (stats.over_capacity, stats.held, stats.held_bytes),
            (2, 3, 3 * one)
        );
        // The server is not exempt from the cap: it bounds the disk. A message whose sender was
        // already ACKed (lost real-time delivery) is: refusing it would lose it.
        let s2c = msg("v", SERVER_SENDER, 0, 0);
        assert_eq!(store.append(&[s2c]).unwrap(), [Appended::OverCapacity]);
        let mut lost = msg("v", "s", 0, 0);
        lost.sender_acked = true;
        assert_eq!(seqs(&store.append(&[lost]).unwrap()), [4]);
        store.remove(&[Removal::new("v", &[4])]).unwrap();
        // Removal makes room; the bytes are rebuilt at open.
        store.remove(&[Removal::new("u", &[1])]).unwrap();
        assert_eq!(store.stats().held_bytes, 2 * one);
        drop(store);
        let store = RedbStore::open(dir.path(), limits).unwrap();
        assert_eq!(store.stats().held_bytes, 2 * one);
        assert_eq!(seqs(&store.append(&batch[3..4]).unwrap()), [5]);
        assert_eq!(
            store.append(&batch[4..5]).unwrap(),
            [Appended::OverCapacity]
        );
    }

    #[test]
    fn expired_messages_are_dropped_and_counted() {
        let dir = TempDir::new("expiry");
        let limits = Limits {
            max_per_user: 100,
            max_age: Duration::from_secs(24 * 60 * 60),
            ..Limits::default()
        };
        let store = RedbStore::open(dir.path(), limits).unwrap();
        let now = 100 * DAY_MS;
        let batch = [
            msg("u", "s", 0, now - 3 * DAY_MS),
            msg("u", "s", 1, now - DAY_MS - 1), // just over a day
            msg("u", "s", 2, now - DAY_MS),     // exactly a day: not older than max_age
            msg("u", "s", 3, now),
            msg("v", "s", 4, now - 2 * DAY_MS),
            msg("w", "s", 5, now - 5 * DAY_MS),
            msg("w", "s", 6, now),
        ];
        store.append(&batch).unwrap();
        // pending skips what expired instead of returning it, read-only: no commit.
        let commits = store.stats().commits;
        let pending = store.pending("u", 0, usize::MAX, now).unwrap();
        assert_eq!(
            pending.iter().map(|s| n_of(&s.json)).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!((store.stats().expired, store.stats().commits), (0, commits));
        // expire() sweeps every user, at most `max` per call.
        assert_eq!(
            store.expire(now, 3).unwrap(),
            Expired {
                deleted: 3,
                more: true
            }
        );
        assert_eq!(expire_all(&store, now), 1);
        assert_eq!(store.stats().expired, 4);
        assert!(queue(&store, "v").is_empty());
        assert_eq!(
            queue(&store, "w").iter().map(|q| q.1).collect::<Vec<_>>(),
            [6]
        );
        assert_eq!(expire_all(&store, now), 0);
        // Expired messages left the dedup index and the count.
        assert_eq!(seqs(&store.append(&batch[0..1]).unwrap()), [8]);
        // Two days later all four left (2, 3, 6 and the new copy of 0) are older than a day.
        assert_eq!(expire_all(&store, now + 2 * DAY_MS), 4);
        for to in ["u", "v", "w"] {
            assert!(queue(&store, to).is_empty());
        }
    }

    #[test]
    fn expire_works_through_more_than_one_chunk() {
        let dir = TempDir::new("expire-chunks");
        let limits = Limits {
            max_per_user: usize::MAX,
            max_age: Duration::from_millis(10),
            max_per_sender: usize::MAX,
            ..Limits::default()
        };
        let store = RedbStore::open(dir.path(), limits).unwrap();
        let total = 100 * 2 + 7;
        let batch: Vec<Offline> = (0..total)
            .map(|n| msg(&format!("u{}", n % 5), "s", n, 0))
            .collect();
        store.append(&batch).unwrap();
        assert_eq!(expire_all(&store, 1_000), total);
        assert_eq!(store.stats().expired, total);
        // One for the append, one per chunk of 100.
        assert_eq!(store.stats().commits, 1 + 3);
    }

    #[test]
    fn reopening_keeps_data_and_numbering() {
        let dir = TempDir::new("reopen");
        {
            let store = open(&dir);
            store
                .append(&[msg("u", "s", 0, 0), msg("u", "s", 1, 0)])
                .unwrap();
            store.remove(&[Removal::new("u", &[1, 2])]).unwrap(); // the queue is empty again
            store.append(&[msg("v", "s", 2, 0)]).unwrap();
        }
        let store = open(&dir);
        assert_eq!(queue(&store, "v"), [(3, 2)]);
        // A seq is never reused, even for a user whose queue emptied.
        assert_eq!(seqs(&store.append(&[msg("u", "s", 3, 0)]).unwrap()), [4]);
        // The dedup index survived too.
        assert_eq!(
            store.append(&[msg("v", "s", 2, 0)]).unwrap(),
            [Appended::Duplicate { seq: 3 }]
        );
    }

    #[test]
    fn an_empty_batch_commits_nothing() {
        let dir = TempDir::new("empty");
        let store = open(&dir);
        assert!(store.append(&[]).unwrap().is_empty());
        store.remove(&[Removal::new("u", &[1])]).unwrap();
        assert_eq!(expire_all(&store, i64::MAX), 0);
        assert_eq!(store.stats().commits, 0);
    }

    #[test]
    fn a_malformed_record_is_an_error_not_a_panic() {
        let dir = TempDir::new("corrupt");
        let store = open(&dir);
        store.append(&[msg("u", "s", 0, 0)]).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(MESSAGES)
            .unwrap()
            .insert(("u", 99u64), [1u8, 2, 3].as_slice())
            .unwrap();
        txn.commit().unwrap();
        let err = store.pending("u", 0, usize::MAX, 0).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("seq 99"), "{err}");
        // The way out: remove it by the seq the error names; the good message is still there.
        store.remove(&[Removal::new("u", &[99])]).unwrap();
        assert_eq!(queue(&store, "u"), [(1, 0)]);
        assert_eq!(store.stats().removed, 1);
    }

    #[test]
    fn every_truncation_or_mutation_of_a_record_decodes_or_errs() {
        let mut bytes = Vec::new();
        let m = msg("u", "sender", 7, -5);
        record::encode(&m, &mut bytes).unwrap();
        let decoded = record::decode(&bytes).unwrap();
        assert_eq!(
            (decoded.stored_at_ms, decoded.from, decoded.fp, decoded.json),
            (-5, "sender", Some("fp-sender-7"), &m.json[..])
        );
        for len in 0..bytes.len() {
            let _ = record::decode(&bytes[..len]);
        }
        for i in 0..bytes.len() {
            for v in [0u8, 1, 2, 0x7f, 0xff] {
                let mut b = bytes.clone();
                b[i] = v;
                let _ = record::decode(&b);
            }
        }
        assert!(record::decode(&[]).is_err());
        assert!(record::decode(&[2]).is_err());
        let mut no_fp = m.clone();
        no_fp.fp = None;
        record::encode(&no_fp, &mut bytes).unwrap();
        assert_eq!(record::decode(&bytes).unwrap().fp, None);
    }

    #[test]
    fn a_foreign_file_is_refused_not_misread() {
        let dir = TempDir::new("foreign");
        std::fs::write(dir.path().join(FILE_NAME), vec![0x5a; 64 * 1024]).unwrap();
        assert!(RedbStore::open(dir.path(), Limits::default()).is_err());

        // A redb file with another schema version.
        let dir = TempDir::new("schema");
        drop(open(&dir));
        let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(META_SCHEMA, 2)
            .unwrap();
        txn.commit().unwrap();
        drop(db);
        let err = RedbStore::open(dir.path(), Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Corrupt {
                    what: "schema version",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn open_creates_the_data_dir() {
        let dir = TempDir::new("mkdir");
        let nested = dir.path().join("a/b");
        drop(RedbStore::open(&nested, Limits::default()).unwrap());
        assert!(nested.join(FILE_NAME).is_file());
    }
}
