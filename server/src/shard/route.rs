//! Data messages: C2S to the application, C2C to another user on any shard, S2C from the
//! application, and the server's QoS around them (SPEC §7, §8).
//!
//! Differences from the reference, closing documented hazards:
//! * S1 — `from` of C2S and C2C is overwritten with the session's uid.
//! * R2 — C2C is de-duplicated by (sender, fingerprint): a resend of a message already delivered
//!   (or stored) is ACKed again but not forwarded again.
//! * S3 — server resend entries are keyed by (recipient, fingerprint): an ACK clears only
//!   messages addressed to the user who sends it.
//!
//! Acknowledged means durable or delivered (issue 9 §3): a QoS message is written to an online
//! recipient only once it has a resend entry. When the resend table is full (entries or bytes)
//! a C2C message is refused — not written, no substitute ACK, counted in `qos_table_full` — so
//! the sender's SDK resends it a few seconds later or reports it lost; it is never ACKed and then
//! dropped. An S2C message from the application takes the path of a lost one (the `on_s2c_lost`
//! hook, and the offline store when there is one).

use std::net::SocketAddr;

use bytes::Bytes;
use imedge_protocol::qos::Seen;
use imedge_protocol::session::Transport;
use imedge_protocol::{Fingerprint, Message, UserId};

use super::{shard_for, CoreId, Endpoint, Now, Outbox, Pending, Shard, ShardMsg};
use crate::hooks::pool::Notice;
use crate::hooks::{Interests, SessionInfo, Undelivered};

/// An encoded message on its way to its recipient's shard.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Sender (`"0"` for S2C).
    pub from: UserId<'static>,
    /// Recipient; `None` when the message had no `to` (treated as offline, SPEC §2.2).
    pub to: Option<UserId<'static>>,
    /// Fingerprint.
    pub fp: Option<Fingerprint<'static>>,
    /// Whether the message asks for QoS (and has a fingerprint).
    pub qos: bool,
    /// `bridge` of the message, copied into its ACKs.
    pub bridge: bool,
    /// The message as it goes to the recipient.
    pub json: Bytes,
    /// The sender's shard, which wants a [`Receipt`] (C2C QoS only).
    pub reply_to: Option<CoreId>,
}

/// What became of a [`Delivery`], for the sender's substitute ACK (SPEC §7.2 steps 4–5).
#[derive(Debug, Clone)]
pub struct Receipt {
    /// Sender.
    pub from: UserId<'static>,
    /// Recipient.
    pub to: Option<UserId<'static>>,
    /// Fingerprint.
    pub fp: Fingerprint<'static>,
    /// `bridge` of the message.
    pub bridge: bool,
    /// Outcome.
    pub outcome: Outcome,
}

/// The outcome of a delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written to the recipient's session.
    Delivered,
    /// The recipient was offline and the offline hook stored the message.
    Stored,
    /// The recipient was offline and nothing stored it: the sender gets no ACK.
    Offline,
}

impl Shard {
    /// Type 2 from a logged-in session.
    pub(super) fn on_data(
        &mut self,
        now: Now,
        endpoint: Endpoint,
        (uid, transport, peer): (UserId<'static>, Transport, SocketAddr),
        received: &Message<'_>,
        out: &mut dyn Outbox,
    ) {
        let mut msg = received.clone();
        msg.from = Some(uid.borrowed());
        let info = SessionInfo {
            uid: uid.as_str(),
            transport,
            peer,
        };
        let fp = msg.fp.clone().filter(|_| msg.qos);
        if msg.is_c2s() {
            // SPEC §7.1.
            if let (true, Some(pool)) = (
                self.interests.contains(Interests::C2S),
                self.hook_pool.clone(),
            ) {
                let owned = msg.into_owned();
                self.post_c2s(now, endpoint, (uid, transport, peer), owned, &pool, out);
                return;
            }
            if self.interests.contains(Interests::C2S) && !self.hooks.on_c2s_before(&msg, info) {
                return;
            }
            if let Some(fp) = &fp {
                let key = self.qos_key(uid.as_str(), fp.as_str());
                let seen = self.dedup.handle_message(now.mono, key);
                let ack = Message::ack(UserId::SERVER, uid.borrowed(), fp.borrowed(), msg.bridge);
                self.send(now, endpoint, ack, out);
                if seen == Seen::Duplicate {
                    return;
                }
            }
            if self.interests.contains(Interests::C2S) {
                let mut api = self.api();
                self.hooks.on_c2s(&msg, info, &mut api);
                self.run_hook_commands(now, api, out);
            }
            return;
        }

        // SPEC §7.2.
        if self.interests.contains(Interests::C2C_BEFORE) && !self.hooks.on_c2c_before(&msg, info) {
            return;
        }
        if let Some(fp) = &fp {
            if self
                .c2c_done
                .contains(self.qos_key(uid.as_str(), fp.as_str()))
            {
                // Already delivered or stored: ACK the resend again, do not forward it twice.
                let to = msg.to.clone().unwrap_or(UserId::UNKNOWN);
                let ack = Message::ack(to, uid.borrowed(), fp.borrowed(), msg.bridge);
                self.send(now, endpoint, ack, out);
                return;
            }
        }
        if self.config.server_timestamps {
            msg.sm = now.epoch_ms;
        }
        let json = self.encode_once(&msg);
        if json.len() > self.config.max_message_bytes {
            // See `ShardConfig::max_message_bytes`: refused here, before any table or store.
            self.stats.too_large += 1;
            self.refuse_invalid(now, endpoint, true, "message too large to relay", out);
            return;
        }
        let delivery = Delivery {
            from: uid.clone(),
            to: msg.to.clone().map(UserId::into_owned),
            fp: fp.map(Fingerprint::into_owned),
            qos: msg.qos && msg.fp.is_some(),
            bridge: msg.bridge,
            json,
            reply_to: Some(self.config.core),
        };
        let target = delivery.to.as_ref().map_or(self.config.core, |to| {
            shard_for(to.as_str(), self.config.cores)
        });
        if target == self.config.core {
            self.deliver(now, delivery, out);
        } else {
            out.mail(target, ShardMsg::Deliver(delivery));
        }
    }

    /// Writes a message to its recipient, a user of this shard (C2C second half, S2C).
    pub(super) fn deliver(&mut self, now: Now, delivery: Delivery, out: &mut dyn Outbox) {
        let endpoint = delivery
            .to
            .as_ref()
            .and_then(|to| self.online.get(to))
            .copied();
        let outcome = match (endpoint, &delivery.to) {
            (Some(endpoint), Some(to)) => {
                if let (true, Some(fp)) = (delivery.qos, &delivery.fp) {
                    let pending = Pending {
                        to: to.clone(),
                        from: delivery.from.clone(),
                        fp: fp.clone(),
                        json: delivery.json.clone(),
                        seq: None,
                    };
                    let key = self.qos_key(to.as_str(), fp.as_str());
                    let heap = pending.heap_bytes();
                    if let Err(pending) = self.resend.insert(now.mono, key, pending, heap) {
                        // Per message, so counted rather than logged.
                        self.stats.qos_table_full += 1;
                        if delivery.from.is_server() {
                            self.hooks
                                .on_s2c_lost(to.as_str(), fp.as_str(), &delivery.json);
                            self.store_lost(now, &pending, out);
                        }
                        // C2C: no receipt, so no ACK; the sender's SDK resends it.
                        return;
                    }
                }
                out.send_json(endpoint, &delivery.json);
                self.stats.delivered += 1;
                if !delivery.from.is_server() && self.interests.contains(Interests::C2C_AFTER) {
                    self.notify(Notice::C2cAfter {
                        from: delivery.from.clone(),
                        to: to.clone(),
                        fp: delivery.fp.clone(),
                    });
                }
                Outcome::Delivered
            }
            _ => {
                self.stats.offline += 1;
                let durable = self.offline.is_some() && delivery.to.is_some();
                let stored = if !self.interests.contains(Interests::OFFLINE) {
                    false
                } else if durable {
                    // The store keeps it whatever the hook says: only a notification.
                    self.notify(Notice::Offline {
                        from: delivery.from.clone(),
                        to: delivery.to.clone(),
                        fp: delivery.fp.clone(),
                        json: delivery.json.clone(),
                    });
                    false
                } else {
                    self.hooks.on_offline(Undelivered {
                        from: delivery.from.as_str(),
                        to: delivery.to.as_ref().map(UserId::as_str),
                        fp: delivery.fp.as_ref().map(Fingerprint::as_str),
                        json: &delivery.json,
                    })
                };
                if durable {
                    // The durable store takes it; the receipt follows its commit.
                    self.store_offline(now, delivery, out);
                    return;
                }
                if stored {
                    Outcome::Stored
                } else {
                    Outcome::Offline
                }
            }
        };
        let (Some(core), true, Some(fp)) = (delivery.reply_to, delivery.qos, delivery.fp) else {
            return;
        };
        let receipt = Receipt {
            from: delivery.from,
            to: delivery.to,
            fp,
            bridge: delivery.bridge,
            outcome,
        };
        if core == self.config.core {
            self.on_receipt(now, receipt, out);
        } else {
            out.mail(core, ShardMsg::Delivered(receipt));
        }
    }

    /// The sender's shard learns what became of its C2C QoS message: delivered or stored →
    /// the substitute ACK (`from` = recipient), and resends of it are no longer forwarded.
    pub(super) fn on_receipt(&mut self, now: Now, receipt: Receipt, out: &mut dyn Outbox) {
        if receipt.outcome == Outcome::Offline {
            // As the reference demo: no ACK; the sender's QoS retries and reports it lost.
            return;
        }
        let key = self.qos_key(receipt.from.as_str(), receipt.fp.as_str());
        self.c2c_done.handle_message(now.mono, key);
        let Some(&endpoint) = self.online.get(&receipt.from) else {
            return;
        };
        let to = receipt.to.unwrap_or(UserId::UNKNOWN);
        let ack = Message::ack(to, receipt.from, receipt.fp, receipt.bridge);
        self.send(now, endpoint, ack, out);
    }
}
