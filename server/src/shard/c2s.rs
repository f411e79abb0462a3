//! C2S messages whose hooks run on the hook pool (SPEC §7.1): `on_c2s_before` and `on_c2s` run
//! on a worker, and the message is ACKed only once the answer says it was accepted — the same
//! outcome as inline, where a refused message gets no ACK.
//!
//! De-duplication keeps its guarantee (the application sees a message once): a copy already
//! accepted is ACKed again without a hook call; a resend that arrives while the first copy's
//! hooks are still running is dropped (counted `c2s_resend_pending`) — the SDK resends it again
//! and then gets its ACK. At most `max_pending_verifies` messages per core wait for their
//! hooks, each at most `verify_timeout`; past either, the message gets no ACK (counted
//! `c2s_hook_refused`) and the sender's SDK resends it or reports it lost. Hooks that time out
//! may still run later: the application may then see that message again when its resend is
//! accepted (a slow `on_c2s` should be handed to the application's own thread instead).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use imedge_protocol::qos::QosKey;
use imedge_protocol::session::Transport;
use imedge_protocol::{Fingerprint, Message, UserId};

use super::{Endpoint, Now, Outbox, Shard, Timer};
use crate::hooks::pool::{C2sJob, HookPool};
use crate::hooks::Command;
use crate::timer::TimerKey;

/// C2S messages waiting for their hooks, by ticket, and the QoS keys among them.
#[derive(Debug, Default)]
pub(super) struct PendingC2s {
    by_ticket: HashMap<u64, Waiting>,
    keys: HashSet<QosKey>,
}

#[derive(Debug)]
struct Waiting {
    endpoint: Endpoint,
    uid: UserId<'static>,
    /// QoS: the fingerprint to ACK and its de-duplication key.
    qos: Option<(Fingerprint<'static>, QosKey)>,
    bridge: bool,
    timer: TimerKey,
}

impl Shard {
    /// Posts a C2S message (its `from` already set) to the hook pool.
    pub(super) fn post_c2s(
        &mut self,
        now: Now,
        endpoint: Endpoint,
        (uid, transport, peer): (UserId<'static>, Transport, SocketAddr),
        msg: Message<'_>,
        pool: &HookPool,
        out: &mut dyn Outbox,
    ) {
        let fp = msg
            .fp
            .clone()
            .filter(|_| msg.qos)
            .map(Fingerprint::into_owned);
        let qos = fp.map(|fp| {
            let key = self.qos_key(uid.as_str(), fp.as_str());
            (fp, key)
        });
        if let Some((fp, key)) = &qos {
            if self.dedup.contains(*key) {
                // Accepted before: ACK the resend again, no second hook call (SPEC §8.5).
                let ack = Message::ack(UserId::SERVER, uid.borrowed(), fp.borrowed(), msg.bridge);
                self.send(now, endpoint, ack, out);
                return;
            }
            if self.c2s_pending.keys.contains(key) {
                self.stats.c2s_resend_pending += 1;
                return;
            }
        }
        if self.c2s_pending.by_ticket.len() >= self.config.max_pending_verifies {
            self.stats.c2s_hook_refused += 1;
            return;
        }
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        let bridge = msg.bridge;
        let job = C2sJob {
            core: self.config.core,
            ticket,
            msg: msg.into_owned(),
            uid: uid.clone(),
            transport,
            peer,
        };
        if pool.c2s(job).is_err() {
            // Counted by the pool (`hook_refused`): no ACK.
            return;
        }
        let timer = self
            .timers
            .insert(now.mono + self.config.verify_timeout, Timer::C2s(ticket));
        if let Some((_, key)) = &qos {
            self.c2s_pending.keys.insert(*key);
        }
        self.c2s_pending.by_ticket.insert(
            ticket,
            Waiting {
                endpoint,
                uid,
                qos,
                bridge,
                timer,
            },
        );
    }

    /// The pool's answer for the C2S message of `ticket`: ACK it if accepted (and the sender's
    /// session is still there), then carry out what `on_c2s` asked for.
    pub(super) fn on_c2s_done(
        &mut self,
        now: Now,
        ticket: u64,
        accepted: bool,
        commands: Vec<Command>,
        out: &mut dyn Outbox,
    ) {
        let Some(waiting) = self.take_c2s(ticket) else {
            return;
        };
        if !accepted {
            return;
        }
        if let Some((fp, key)) = &waiting.qos {
            self.dedup.handle_message(now.mono, *key);
            if self.sessions.contains_key(&waiting.endpoint) {
                let ack = Message::ack(
                    UserId::SERVER,
                    waiting.uid.borrowed(),
                    fp.borrowed(),
                    waiting.bridge,
                );
                self.send(now, waiting.endpoint, ack, out);
            }
        }
        for command in commands {
            self.command(now, command, out);
        }
    }

    /// The hooks of a C2S message did not answer in time: no ACK (their late answer is
    /// ignored).
    pub(super) fn on_c2s_timeout(&mut self, ticket: u64) {
        if self.take_c2s(ticket).is_some() {
            self.stats.c2s_hook_refused += 1;
        }
    }

    fn take_c2s(&mut self, ticket: u64) -> Option<Waiting> {
        let waiting = self.c2s_pending.by_ticket.remove(&ticket)?;
        self.timers.cancel(waiting.timer);
        if let Some((_, key)) = &waiting.qos {
            self.c2s_pending.keys.remove(key);
        }
        Some(waiting)
    }
}
