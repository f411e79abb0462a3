//! Offline messages on the shard side (issue "offline messages and durability"): what happens
//! when a recipient is not online, when a real-time delivery is lost, and at the next login.
//!
//! * A C2C or S2C message for a user who is not online goes to the [`GroupCommit`] writer; the
//!   sender's substitute ACK is sent only from the writer's callback, i.e. once the message is
//!   durable — never before.
//! * A server-sent QoS message reported lost by the resend table is stored the same way (the
//!   store de-duplicates by recipient, sender and fingerprint, so it is never stored twice).
//! * At login, stored messages are sent in the order they were stored, with QoS; each is removed
//!   from the store only when the recipient ACKs it. A recipient that goes away mid-delivery gets
//!   the rest at its next login. The loop never reads the disk: pages are read by the store's
//!   [`Reader`] threads and come back as [`ShardMsg::Page`] mail. The drain is flow-controlled:
//!   at most a window of messages ([`UDP_DRAIN_WINDOW`], [`STREAM_DRAIN_WINDOW`]) is in flight
//!   (sent, not yet ACKed or lost), and each ACK lets the next one out, so a backlog leaves at
//!   the pace of the link instead of in bursts a UDP client drops; the next page is read ahead
//!   while the current one is being sent.
//! * At shutdown, messages still waiting in the resend table are stored before the loop exits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imedge_protocol::session::Transport;
use imedge_protocol::{Fingerprint, UserId};

use super::route::{Delivery, Outcome, Receipt};
use super::{CoreId, Endpoint, Now, Outbox, Pending, Shard, ShardMsg, Timer};
use crate::store::read::Reader;
use crate::store::{group::GroupCommit, Offline, StoreError, Stored};

/// Stored messages read per page (one request to the [`Reader`]). A page is held in memory
/// until sent, so it is bounded; large enough that a TCP window's worth is one read.
pub const LOGIN_PAGE: usize = 256;

/// Stored QoS messages in flight (sent, not yet ACKed or lost) per UDP session. A UDP client's
/// receive buffer (Linux default ~208 KiB, smaller on phones) holds a few hundred datagrams of
/// ordinary size; 64 stays well inside it even with the client's own traffic, and at a
/// round trip of tens of milliseconds still moves thousands of messages a second. A burst past
/// the buffer is dropped and then waits for the resend timer (5 s): measured, a 4.7 s stall.
pub const UDP_DRAIN_WINDOW: usize = 64;

/// Stored QoS messages in flight per TCP or WebSocket session: the stream does not drop, so
/// the window only bounds what sits in the send queue (256 × a 6 KiB maximum is 1.5 MiB,
/// inside the default `--max-send-buffer` of 4 MiB).
pub const STREAM_DRAIN_WINDOW: usize = 256;

/// How long a drain waits before asking the [`Reader`] again when its queue was full: long
/// enough that a loaded reader is not polled, short against a login.
pub const READ_RETRY: Duration = Duration::from_millis(50);

/// Posts mail to a core from any thread (the store writer's callbacks use it).
pub type Post = Arc<dyn Fn(CoreId, ShardMsg) + Send + Sync>;

/// The durable store as a shard sees it: two queues that never block and the way back. No
/// store handle: an event loop cannot touch the disk, not even at shutdown.
#[derive(Clone)]
pub struct OfflineStore {
    /// Durable appends (group commit), removals, the expiry sweep, shutdown hand-overs.
    pub writer: Arc<GroupCommit>,
    /// Reads pages of stored messages off the event loop.
    pub reader: Arc<Reader>,
    /// How callbacks reach a core.
    pub post: Post,
}

impl std::fmt::Debug for OfflineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfflineStore").finish_non_exhaustive()
    }
}

/// A user whose stored messages are being delivered.
#[derive(Debug, Default)]
pub(super) struct Drain {
    /// Tells this drain's page answers from those of a drain it replaced (a new login).
    generation: u64,
    /// Stored QoS messages sent and not yet acknowledged or lost (at most the window).
    in_flight: usize,
    /// Read but not sent yet, in seq order.
    ready: VecDeque<Stored>,
    /// Highest seq read so far: the next page starts after it (removals may not be committed).
    read_to: u64,
    /// The store may hold more after `read_to`.
    more: bool,
    /// A page request is with the reader.
    reading: bool,
    /// A message was stored (redrain) while a page was being read: read again after it.
    again: bool,
    /// The reader was busy: ask again at the retry timer.
    retry: bool,
    /// A message it sent was lost (its resends ran out): it is still stored.
    lost: bool,
    /// The queue was already read again from the start for lost messages (once per drain).
    reread: bool,
}

/// The drains of a shard.
#[derive(Debug, Default)]
pub(super) struct Drains {
    users: HashMap<UserId<'static>, Drain>,
    next_generation: u64,
    /// The [`Timer::DrainRetry`] is set.
    retry_armed: bool,
}

/// How long a removal is remembered: far longer than the store takes to commit one (its writer
/// commits what is queued at every turn), short enough that what a user who never comes back
/// left here is forgotten soon.
const REMOVING_HORIZON: Duration = Duration::from_secs(60);

/// Users with more remembered removals than this are swept of old ones at the next insert:
/// the table stays proportional to recent acknowledgements.
const REMOVING_SWEEP_USERS: usize = 1024;

/// Seqs of stored messages, per user, that were acknowledged and handed to the store for
/// removal — filtered out of the pages read until a page shows them gone.
#[derive(Debug, Default)]
pub(super) struct Removing(HashMap<UserId<'static>, (Instant, HashSet<u64>)>);

impl Removing {
    fn insert(&mut self, now: Instant, uid: &UserId<'static>, seqs: &[u64]) {
        if self.0.len() >= REMOVING_SWEEP_USERS && !self.0.contains_key(uid) {
            self.0.retain(|_, (touched, _)| {
                now.saturating_duration_since(*touched) < REMOVING_HORIZON
            });
        }
        let (touched, set) = self
            .0
            .entry(uid.clone())
            .or_insert_with(|| (now, HashSet::new()));
        *touched = now;
        set.extend(seqs);
    }

    /// Whether `seq` of `uid` is being removed.
    fn contains(&self, uid: &UserId<'static>, seq: u64) -> bool {
        self.0.get(uid).is_some_and(|(_, set)| set.contains(&seq))
    }

    /// A page of `uid`'s messages after `after` was read: removals in its range that it does
    /// not contain are committed, and forgotten.
    fn settle(&mut self, uid: &UserId<'static>, after: u64, page: &[u64], full: bool) {
        let Some((_, set)) = self.0.get_mut(uid) else {
            return;
        };
        let last = page.iter().copied().max().unwrap_or(after);
        set.retain(|&seq| seq <= after || (full && seq > last) || page.contains(&seq));
        if set.is_empty() {
            self.0.remove(uid);
        }
    }
}

impl Shard {
    /// Stores a message whose recipient is not online. The sender's receipt (if it wants one)
    /// is posted from the store's callback, after the commit. If the writer's queue is full the
    /// message is not stored and the (negative: no ACK) receipt goes out at once through the
    /// outbox — nothing runs a callback or posts mail from the loop.
    pub(super) fn store_offline(
        &mut self,
        now: Now,
        delivery: Delivery,
        out: &mut dyn Outbox,
    ) -> bool {
        let (Some(offline), Some(to)) = (&self.offline, &delivery.to) else {
            return false;
        };
        let record = Offline {
            to: to.as_str().to_owned(),
            from: delivery.from.as_str().to_owned(),
            fp: delivery.fp.as_ref().map(|fp| fp.as_str().to_owned()),
            json: delivery.json.clone(),
            stored_at_ms: now.epoch_ms,
            sender_acked: false,
        };
        let receipt = match (delivery.reply_to, delivery.qos, delivery.fp) {
            (Some(core), true, Some(fp)) => Some((
                core,
                Receipt {
                    from: delivery.from,
                    to: delivery.to,
                    fp,
                    bridge: delivery.bridge,
                    outcome: Outcome::Offline,
                },
            )),
            _ => None,
        };
        let post = Arc::clone(&offline.post);
        let answer = receipt.clone();
        let submitted = offline.writer.try_submit(
            record,
            Box::new(move |result| {
                let durable = result.as_ref().is_ok_and(|a| a.is_durable());
                if let Err(error) = &result {
                    // Per message, so debug only: the writer counts busy and failed requests.
                    tracing::debug!(%error, "offline message not stored; the sender gets no ACK");
                }
                if let Some((core, mut receipt)) = answer {
                    receipt.outcome = if durable {
                        Outcome::Stored
                    } else {
                        Outcome::Offline
                    };
                    post(core, ShardMsg::Delivered(receipt));
                }
            }),
        );
        if submitted.is_err() {
            // Not stored: no ACK (the sender's resend is the retry), counted by the writer
            // (`busy`) and here.
            self.stats.store_refused += 1;
            if let Some((core, receipt)) = receipt {
                if core == self.config.core {
                    self.on_receipt(now, receipt, out);
                } else {
                    out.mail(core, ShardMsg::Delivered(receipt));
                }
            }
        }
        true
    }

    /// A server-sent message was not acknowledged after its resends: store it (unless it came
    /// from the store, where it still is). Once committed, a [`ShardMsg::Redrain`] delivers it
    /// again if the recipient is still online, instead of parking it until the next login.
    pub(super) fn store_lost(&mut self, now: Now, item: &Pending, out: &mut dyn Outbox) {
        if item.seq.is_some() {
            // Still stored: once the drain has sent the rest, it reads its user's queue again
            // (once), so a recipient who stays online gets it without a new login.
            if let Some(drain) = self.drains.users.get_mut(&item.to) {
                drain.lost = true;
            }
            self.drain_progress(now, &item.to, out);
            return;
        }
        let Some(offline) = &self.offline else {
            return;
        };
        let record = Offline {
            to: item.to.as_str().to_owned(),
            from: item.from.as_str().to_owned(),
            fp: Some(item.fp.as_str().to_owned()),
            json: item.json.clone(),
            stored_at_ms: now.epoch_ms,
            sender_acked: true,
        };
        let (post, core, uid) = (Arc::clone(&offline.post), self.config.core, item.to.clone());
        let submitted = offline.writer.try_submit(
            record,
            Box::new(move |result| match result {
                Ok(appended) if appended.is_durable() => post(core, ShardMsg::Redrain(uid)),
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "lost real-time message not stored"),
            }),
        );
        if submitted.is_err() {
            self.stats.store_refused += 1;
            tracing::debug!("lost real-time message not stored: the store's queue is full");
        }
    }

    /// A lost message of `uid` was stored: if `uid` is online, send the stored messages again —
    /// as more of a delivery in progress, else as a new one.
    pub(super) fn redrain(&mut self, now: Now, uid: &UserId<'static>, out: &mut dyn Outbox) {
        if !self.online.contains_key(uid) {
            return;
        }
        self.stats.redrained += 1;
        if let Some(drain) = self.drains.users.get_mut(uid) {
            if drain.reading {
                drain.again = true;
            } else {
                drain.more = true;
            }
            self.pump(now, uid, out);
            return;
        }
        self.start_drain(now, uid);
    }

    /// The recipient acknowledged a message: if it came from the store, remove it there.
    pub(super) fn stored_acked(&mut self, now: Now, item: &Pending, out: &mut dyn Outbox) {
        let (Some(seq), Some(offline)) = (item.seq, &self.offline) else {
            return;
        };
        offline.writer.remove(item.to.as_str(), vec![seq]);
        self.removing.insert(now.mono, &item.to, &[seq]);
        self.drain_progress(now, &item.to, out);
    }

    /// One message in flight is settled (ACKed or lost): the window lets the next one out.
    fn drain_progress(&mut self, now: Now, uid: &UserId<'static>, out: &mut dyn Outbox) {
        let Some(drain) = self.drains.users.get_mut(uid) else {
            return;
        };
        drain.in_flight = drain.in_flight.saturating_sub(1);
        self.pump(now, uid, out);
    }

    /// At login: start delivering `uid`'s stored messages, oldest first (replacing a delivery
    /// to an earlier session).
    pub(super) fn deliver_stored(&mut self, now: Now, uid: &UserId<'static>, _: &mut dyn Outbox) {
        self.start_drain(now, uid);
    }

    /// A new drain for `uid`, from the start of its queue.
    fn start_drain(&mut self, now: Now, uid: &UserId<'static>) {
        if self.offline.is_none() || !self.online.contains_key(uid) {
            return;
        }
        let generation = self.drains.next_generation;
        self.drains.next_generation += 1;
        let drain = Drain {
            generation,
            more: true,
            ..Drain::default()
        };
        self.drains.users.insert(uid.clone(), drain);
        self.read_next(now, uid);
    }

    /// Asks the reader for the page after `read_to`, unless one is being read or none is left.
    /// A busy reader is asked again at the retry timer (never in a loop).
    fn read_next(&mut self, now: Now, uid: &UserId<'static>) {
        let (Some(offline), Some(drain)) = (&self.offline, self.drains.users.get_mut(uid)) else {
            return;
        };
        if drain.reading || !drain.more {
            return;
        }
        let (post, core) = (Arc::clone(&offline.post), self.config.core);
        let (generation, after, user) = (drain.generation, drain.read_to, uid.clone());
        let done = Box::new(move |page| {
            post(
                core,
                ShardMsg::Page {
                    uid: user,
                    generation,
                    after,
                    page,
                },
            );
        });
        match offline
            .reader
            .submit_page(uid.as_str(), after, LOGIN_PAGE, now.epoch_ms, done)
        {
            Ok(()) => {
                drain.reading = true;
                drain.retry = false;
            }
            Err(StoreError::Busy) => {
                drain.retry = true;
                self.stats.read_busy += 1;
                if !self.drains.retry_armed {
                    self.drains.retry_armed = true;
                    self.timers.insert(now.mono + READ_RETRY, Timer::DrainRetry);
                }
            }
            Err(error) => {
                tracing::warn!(uid = uid.as_str(), %error, "cannot read stored messages");
                drain.more = false;
            }
        }
    }

    /// The retry timer: ask the reader again for every drain it was too busy for.
    pub(super) fn retry_reads(&mut self, now: Now, out: &mut dyn Outbox) {
        self.drains.retry_armed = false;
        let waiting: Vec<UserId<'static>> = self
            .drains
            .users
            .iter()
            .filter(|(_, d)| d.retry)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in waiting {
            if let Some(drain) = self.drains.users.get_mut(&uid) {
                drain.retry = false;
            }
            self.pump(now, &uid, out);
        }
    }

    /// A page the reader read for a drain.
    pub(super) fn on_page(
        &mut self,
        now: Now,
        uid: &UserId<'static>,
        generation: u64,
        after: u64,
        page: Result<Vec<Stored>, StoreError>,
        out: &mut dyn Outbox,
    ) {
        let Some(drain) = self.drains.users.get_mut(uid) else {
            return;
        };
        if drain.generation != generation {
            return;
        }
        drain.reading = false;
        match page {
            Ok(page) => {
                let full = page.len() == LOGIN_PAGE;
                let seqs: Vec<u64> = page.iter().map(|stored| stored.seq).collect();
                self.removing.settle(uid, after, &seqs, full);
                drain.more = full || std::mem::take(&mut drain.again);
                for stored in page {
                    drain.read_to = drain.read_to.max(stored.seq);
                    // Acknowledged, its removal not committed yet: not again.
                    if !self.removing.contains(uid, stored.seq) {
                        drain.ready.push_back(stored);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(uid = uid.as_str(), %error, "cannot read stored messages");
                drain.more = std::mem::take(&mut drain.again);
            }
        }
        self.pump(now, uid, out);
    }

    /// Shutdown: everything still waiting for an ACK in the resend table is handed to the
    /// store's writer (on its own lane, which a full append queue does not refuse), so that it
    /// is delivered after the restart (messages that came from the store are still there). Does
    /// not block the loop: the runtime shuts the writer down after the cores, and the writer
    /// stores every hand-over before it exits.
    pub fn store_pending_for_shutdown(&mut self, now: Now) {
        let Some(offline) = &self.offline else {
            return;
        };
        let records: Vec<Offline> = self
            .resend
            .drain()
            .filter(|(_, item)| item.seq.is_none())
            .map(|(_, item)| Offline {
                to: item.to.as_str().to_owned(),
                from: item.from.as_str().to_owned(),
                fp: Some(item.fp.as_str().to_owned()),
                json: item.json,
                stored_at_ms: now.epoch_ms,
                sender_acked: true,
            })
            .collect();
        if records.is_empty() {
            return;
        }
        let n = records.len();
        offline.writer.hand_over(
            records,
            Box::new(move |result| match result {
                Ok(_) => tracing::info!(
                    messages = n,
                    "unacknowledged messages stored for the next login"
                ),
                Err(error) => tracing::error!(
                    %error,
                    messages = n,
                    "could not store unacknowledged messages at shutdown"
                ),
            }),
        );
    }

    /// Sends what the window allows of `uid`'s drain, reads ahead, and ends the drain once
    /// everything is settled.
    fn pump(&mut self, now: Now, uid: &UserId<'static>, out: &mut dyn Outbox) {
        let Some(mut drain) = self.drains.users.remove(uid) else {
            return;
        };
        let (Some(offline), Some(&endpoint)) = (&self.offline, self.online.get(uid)) else {
            // Gone: what it did not ACK stays stored for its next login.
            return;
        };
        let writer = Arc::clone(&offline.writer);
        let udp = matches!(endpoint, Endpoint::Udp(_))
            || self
                .sessions
                .get(&endpoint)
                .is_some_and(|s| s.transport == Transport::Udp);
        let window = if udp {
            UDP_DRAIN_WINDOW
        } else {
            STREAM_DRAIN_WINDOW
        };
        let mut unacked = Vec::new();
        while drain.in_flight < window {
            let Some(stored) = drain.ready.pop_front() else {
                break;
            };
            match stored.fp {
                Some(fp) => {
                    let fp = Fingerprint::from(fp);
                    let key = self.qos_key(uid.as_str(), fp.as_str());
                    let json = stored.json.clone();
                    let pending = Pending {
                        to: uid.clone(),
                        from: UserId::from(stored.from),
                        fp,
                        json: stored.json,
                        seq: Some(stored.seq),
                    };
                    let heap = pending.heap_bytes();
                    if self.resend.insert(now.mono, key, pending, heap).is_err() {
                        // Written only with a resend entry: this one and the rest stay stored
                        // for a later drain (in order: nothing after it is sent either).
                        self.stats.qos_table_full += 1 + drain.ready.len() as u64;
                        drain.ready.clear();
                        drain.more = false;
                        drain.again = false;
                        break;
                    }
                    out.send_json(endpoint, &json);
                    self.stats.delivered += 1;
                    drain.in_flight += 1;
                }
                // Stored without QoS: nobody will ACK it; it was delivered best-effort.
                None => {
                    out.send_json(endpoint, &stored.json);
                    self.stats.delivered += 1;
                    unacked.push(stored.seq);
                }
            }
        }
        if !unacked.is_empty() {
            self.removing.insert(now.mono, uid, &unacked);
            writer.remove(uid.as_str(), unacked);
        }
        let settled = drain.in_flight == 0 && drain.ready.is_empty();
        if settled && !drain.more && !drain.reading && !drain.retry {
            if !drain.lost || drain.reread {
                return;
            }
            // Everything else is settled: what was lost is read again (ACKed messages whose
            // removal is not committed are filtered by `removing`), once.
            self.stats.redrained += 1;
            drain.reread = true;
            drain.lost = false;
            drain.read_to = 0;
            drain.more = true;
        }
        // Read ahead: the next page is on its way while the last window of this one is sent.
        let read_ahead = drain.ready.len() < window && !drain.retry;
        self.drains.users.insert(uid.clone(), drain);
        if read_ahead {
            self.read_next(now, uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9: no disk access on an event loop. The shard's code (everything but its tests)
    /// holds no store handle and calls no store method: it has only the writer's and the
    /// reader's queues.
    #[test]
    fn the_shard_holds_no_store_handle() {
        let files = [
            ("mod.rs", include_str!("mod.rs")),
            ("offline.rs", include_str!("offline.rs")),
            ("route.rs", include_str!("route.rs")),
            ("login.rs", include_str!("login.rs")),
            ("presence.rs", include_str!("presence.rs")),
        ];
        for (name, source) in files {
            let code = source.split("#[cfg(test)]").next().unwrap();
            for needle in [
                "dyn Store",
                "RedbStore",
                ".pending(",
                ".append(&",
                ".expire(",
            ] {
                assert!(!code.contains(needle), "shard/{name} uses `{needle}`");
            }
        }
    }

    /// Does not compile if a field (say, a store handle) is added to [`OfflineStore`].
    #[allow(dead_code)]
    fn offline_store_fields(offline: OfflineStore) {
        let OfflineStore {
            writer: _,
            reader: _,
            post: _,
        } = offline;
    }

    #[test]
    fn removals_are_filtered_until_a_page_shows_them_gone() {
        let now = Instant::now();
        let uid = UserId::from("carol".to_owned());
        let mut removing = Removing::default();
        removing.insert(now, &uid, &[3, 7, 300]);
        assert!(removing.contains(&uid, 3) && removing.contains(&uid, 300));
        // A full page of seqs 1..=8 still holds 3 and 7 (not committed yet); 300 is beyond it.
        removing.settle(&uid, 0, &[1, 2, 3, 4, 5, 6, 7, 8], true);
        assert!(removing.contains(&uid, 3) && removing.contains(&uid, 300));
        // The next read no longer has 3 and 7: forgotten. A last (short) page forgets 300.
        removing.settle(&uid, 0, &[1, 2, 4], false);
        assert!(!removing.contains(&uid, 3) && !removing.contains(&uid, 7));
        assert!(!removing.contains(&uid, 300));
        assert!(removing.0.is_empty());
    }

    #[test]
    fn old_removals_are_swept_when_the_table_grows() {
        let now = Instant::now();
        let mut removing = Removing::default();
        for n in 0..REMOVING_SWEEP_USERS {
            removing.insert(now, &UserId::from(format!("u{n}")), &[1]);
        }
        let later = now + REMOVING_HORIZON;
        removing.insert(later, &UserId::from("new".to_owned()), &[1]);
        assert_eq!(removing.0.len(), 1);
    }
}
