//! Login on the server side: verify, the duplicate-login rules and registration (SPEC §5).
//!
//! Differences from the reference, all closing documented hazards:
//! * S2 — a login for *another* uid on an authenticated session goes through verify again (the
//!   reference skipped it: any account could become any other). A re-login as the same uid is
//!   re-registered without verify, like the reference.
//! * R4 — the duplicate-login decision is made before anything is sent: a newcomer that loses
//!   (older `firstLoginTime`) gets its kickout and no `code: 0` response first.
//! * S5 — a UDP session kicked by a duplicate login is logged out, not left authenticated.
//!
//! Verify is asynchronous when the shard has a hook pool: the login is posted with a ticket and
//! the session waits (its other frames dropped, counted) until [`ShardMsg::Verified`] answers,
//! the verify timeout refuses it, or the session ends (the late answer is then ignored). Every
//! way the verify can fail refuses the login with
//! [`VERIFY_UNAVAILABLE`](crate::hooks::VERIFY_UNAVAILABLE).
//!
//! Before verify, a login is refused (code [`ERROR_INVALID_MESSAGE`], counted) when its uid is
//! longer than [`MAX_USER_ID_LEN`](imedge_protocol::message::MAX_USER_ID_LEN), or is `"0"`, the
//! server's own id: a user "0" would receive the ACKs and C2S traffic meant for the server.

use imedge_protocol::message::check_user_id;
use imedge_protocol::message::payload::{
    LoginRequest, LoginResponse, ERROR_INVALID_MESSAGE, KICKOUT_DUPLICATE_LOGIN,
};
use imedge_protocol::session::Transport;
use imedge_protocol::Message;

use super::{shard_for, Adopt, Endpoint, Now, Outbox, Shard, ShardMsg, Timer};
use crate::hooks::pool::{Notice, VerifyJob};
use crate::hooks::{Interests, SessionInfo, VERIFY_UNAVAILABLE};

/// Default of `ShardConfig::max_pending_verifies`: logins one core may have waiting for the hook
/// pool at once. Each holds its login document (a few hundred bytes) and a timer; past it a login
/// is refused with [`VERIFY_UNAVAILABLE`] at once (counted `verify_pending_full`). Four times a
/// worker queue ([`HOOK_QUEUE_CAPACITY`](crate::hooks::pool::HOOK_QUEUE_CAPACITY)): the queues
/// refuse first when the pool is the bottleneck, this bounds a core when the verifier is slow.
pub const DEFAULT_MAX_PENDING_VERIFIES: usize = 4_096;

/// Default of `ShardConfig::verify_timeout`: how long a login waits for its verify before it is
/// refused with [`VERIFY_UNAVAILABLE`] (counted `verify_timeouts`). The Java SDK gives up on a
/// login response after its own timeout and retries; a verifier slower than this is broken, and
/// waiting longer would only hold the pending slot.
pub const DEFAULT_VERIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A login waiting for its verify on the hook pool.
#[derive(Debug)]
pub(super) struct Verifying {
    endpoint: Endpoint,
    login: LoginRequest<'static>,
    transport: Transport,
    peer: std::net::SocketAddr,
    /// UDP: the core whose socket received the login.
    via: super::CoreId,
    /// The verify timeout in the wheel.
    timer: crate::timer::TimerKey,
}

impl Shard {
    /// A type-0 message on `endpoint` (SPEC §5.1).
    pub(super) fn on_login(
        &mut self,
        now: Now,
        endpoint: Endpoint,
        msg: &Message<'_>,
        out: &mut dyn Outbox,
    ) {
        let parsed = msg.text().map(|text| self.decoder.login_request(text));
        let Some(Ok(login)) = parsed else {
            // Step 1: no login document or no `loginUserId`: TCP/WS closed, UDP ignored.
            if let Endpoint::Conn(conn) = endpoint {
                out.close(conn);
            }
            return;
        };
        let (transport, peer, current) = match (self.sessions.get(&endpoint), endpoint) {
            (Some(s), _) => (s.transport, s.peer, s.uid.clone()),
            (None, Endpoint::Udp(addr)) => (Transport::Udp, addr, None),
            (None, Endpoint::Conn(_)) => return,
        };
        if current.as_ref() == Some(&login.user_id) {
            // Same user, same session: re-register without verify (step 3).
            self.register(now, endpoint, login, out);
            return;
        }
        let too_long = check_user_id(login.user_id.as_str()).is_err();
        if too_long {
            self.stats.ids_too_long += 1;
        }
        if too_long || login.user_id.is_server() {
            self.refuse_login(now, endpoint, &login, ERROR_INVALID_MESSAGE, out);
            return;
        }
        if !self.interests.contains(Interests::VERIFY) {
            self.verified(now, endpoint, login, transport, peer, out);
            return;
        }
        let Some(pool) = self.hook_pool.clone() else {
            // No pool (an embedder's or a test's shard): the hook runs here, inline.
            let info = SessionInfo {
                uid: login.user_id.as_str(),
                transport,
                peer,
            };
            match self.hooks.verify(&login, info) {
                0 => self.verified(now, endpoint, login, transport, peer, out),
                code => self.refuse_login(now, endpoint, &login, code, out),
            }
            return;
        };
        if self.verifying.len() >= self.config.max_pending_verifies {
            self.stats.verify_pending_full += 1;
            self.refuse_login(now, endpoint, &login, VERIFY_UNAVAILABLE, out);
            return;
        }
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        let job = VerifyJob {
            core: self.config.core,
            ticket,
            login: login.clone(),
            transport,
            peer,
        };
        if pool.verify(job).is_err() {
            // Counted by the pool (`hook_refused`).
            self.refuse_login(now, endpoint, &login, VERIFY_UNAVAILABLE, out);
            return;
        }
        let timer = self
            .timers
            .insert(now.mono + self.config.verify_timeout, Timer::Verify(ticket));
        self.verifying_endpoints.insert(endpoint, ticket);
        self.verifying.insert(
            ticket,
            Verifying {
                endpoint,
                login,
                transport,
                peer,
                via: self.udp_via,
                timer,
            },
        );
    }

    /// The hook pool's answer to the verify of `ticket`. A ticket that is no longer pending
    /// (its connection closed, or it timed out) is ignored.
    pub(super) fn on_verified(&mut self, now: Now, ticket: u64, code: i32, out: &mut dyn Outbox) {
        let Some(pending) = self.take_verifying(ticket) else {
            self.stats.verify_stale += 1;
            return;
        };
        if code != 0 {
            self.refuse_login(now, pending.endpoint, &pending.login, code, out);
            return;
        }
        if let Endpoint::Udp(_) = pending.endpoint {
            self.udp_via = pending.via;
        }
        self.verified(
            now,
            pending.endpoint,
            pending.login,
            pending.transport,
            pending.peer,
            out,
        );
    }

    /// The verify of `ticket` did not answer within `verify_timeout`: the login is refused.
    pub(super) fn on_verify_timeout(&mut self, now: Now, ticket: u64, out: &mut dyn Outbox) {
        let Some(pending) = self.take_verifying(ticket) else {
            return;
        };
        self.stats.verify_timeouts += 1;
        tracing::debug!(uid = pending.login.user_id.as_str(), "verify timed out");
        self.refuse_login(
            now,
            pending.endpoint,
            &pending.login,
            VERIFY_UNAVAILABLE,
            out,
        );
    }

    /// Removes a pending verify, with its timer and its endpoint's mark.
    fn take_verifying(&mut self, ticket: u64) -> Option<Verifying> {
        let pending = self.verifying.remove(&ticket)?;
        self.timers.cancel(pending.timer);
        self.verifying_endpoints.remove(&pending.endpoint);
        Some(pending)
    }

    /// Forgets the verify pending on `endpoint`, if any (the session ended meanwhile): its
    /// answer, when it comes, finds no ticket and is ignored.
    pub(super) fn cancel_verify(&mut self, endpoint: Endpoint) {
        if let Some(ticket) = self.verifying_endpoints.remove(&endpoint) {
            if let Some(pending) = self.verifying.remove(&ticket) {
                self.timers.cancel(pending.timer);
            }
        }
    }

    /// Step 4: refused. TCP/WS are closed after the reply; a UDP client keeps whatever state it
    /// had.
    fn refuse_login(
        &mut self,
        now: Now,
        endpoint: Endpoint,
        login: &LoginRequest<'_>,
        code: i32,
        out: &mut dyn Outbox,
    ) {
        self.stats.logins_refused += 1;
        tracing::debug!(uid = login.user_id.as_str(), code, "login refused");
        let reply = Message::login_response(login.user_id.borrowed(), LoginResponse::refused(code));
        self.send(now, endpoint, reply, out);
        if let Endpoint::Conn(conn) = endpoint {
            out.close(conn);
        }
    }

    /// A login that passed verify: the session leaves its old identity, then is registered here
    /// or handed to its user's shard.
    fn verified(
        &mut self,
        now: Now,
        endpoint: Endpoint,
        login: LoginRequest<'static>,
        transport: Transport,
        peer: std::net::SocketAddr,
        out: &mut dyn Outbox,
    ) {
        let current = self.sessions.get(&endpoint).and_then(|s| s.uid.clone());
        if let Some(previous) = current {
            // Hazard S2 closed: the session leaves its old identity before taking the new one.
            tracing::debug!(
                from = previous.as_str(),
                to = login.user_id.as_str(),
                "re-login as another user"
            );
            self.unregister(endpoint);
        }
        let target = shard_for(login.user_id.as_str(), self.config.cores);
        if target == self.config.core {
            self.register(now, endpoint, login, out);
            return;
        }
        // The user's sessions live on another core: hand the session over.
        let via = self.sessions.get(&endpoint).map_or(self.udp_via, |s| s.via);
        let adopt = Adopt {
            login,
            transport,
            peer,
            via,
        };
        match endpoint {
            Endpoint::Conn(conn) => {
                self.forget(endpoint);
                out.migrate(conn, target, adopt);
            }
            Endpoint::Udp(addr) => {
                self.forget(endpoint);
                if via == self.config.core {
                    self.udp_routes.insert(addr, target);
                } else {
                    out.mail(via, ShardMsg::UdpRoute { addr, core: target });
                }
                out.mail(target, ShardMsg::UdpLogin(adopt));
            }
        }
    }

    /// Drops a session's record without closing anything (it moves to another core).
    fn forget(&mut self, endpoint: Endpoint) {
        if let Some(session) = self.sessions.remove(&endpoint) {
            self.timers.cancel(session.idle_timer);
        }
    }

    /// Takes `endpoint`'s uid away, logging it out if it was the user's current session.
    fn unregister(&mut self, endpoint: Endpoint) {
        let Some(session) = self.sessions.get_mut(&endpoint) else {
            return;
        };
        let Some(uid) = session.uid.take() else {
            return;
        };
        let (transport, peer) = (session.transport, session.peer);
        if self.online.get(&uid) == Some(&endpoint) {
            self.set_offline(uid.as_str());
            if self.interests.contains(Interests::LOGOUT) {
                self.notify(Notice::Logout {
                    uid,
                    transport,
                    peer,
                    kickout_code: None,
                });
            }
        }
    }

    /// Registers a verified login of a session of this shard: duplicate-login rules (§5.3),
    /// then the response, then `on_login` (§5.1 steps 5–6, in the order of hazard R4's fix).
    pub(super) fn register(
        &mut self,
        now: Now,
        endpoint: Endpoint,
        login: LoginRequest<'static>,
        out: &mut dyn Outbox,
    ) {
        if let Endpoint::Udp(addr) = endpoint {
            if !self.sessions.contains_key(&endpoint) {
                self.add_session(now, endpoint, Transport::Udp, addr);
            }
            if let Some(session) = self.sessions.get_mut(&endpoint) {
                session.via = self.udp_via;
            }
        }
        let uid = login.user_id.clone();
        let requested = login.first_login_time;
        let first_login_time = if requested <= 0 {
            now.epoch_ms
        } else {
            requested
        };

        if let Some(old) = self.online.get(&uid).copied().filter(|&e| e != endpoint) {
            let old_first = self.sessions.get(&old).map_or(0, |s| s.first_login_time);
            if requested > 0 && requested < old_first {
                // The newcomer is older than the registered session: it is the one kicked,
                // and it is not registered.
                tracing::debug!(
                    uid = uid.as_str(),
                    "duplicate login refused (older firstLoginTime)"
                );
                self.kick_session(now, endpoint, &uid, KICKOUT_DUPLICATE_LOGIN, None, out);
                return;
            }
            if requested <= 0 || requested > old_first {
                tracing::debug!(
                    uid = uid.as_str(),
                    "duplicate login: kicking the previous session"
                );
                // The newcomer takes the table first, so the kicked session ends without an
                // `on_logout` for a user who is still online (SPEC §5.5).
                self.set_online(&uid, endpoint);
                self.kick_session(now, old, &uid, KICKOUT_DUPLICATE_LOGIN, None, out);
            }
            // Equal times: both stay; the newcomer becomes the current session (reference v6.5).
        }

        let Some(session) = self.sessions.get_mut(&endpoint) else {
            return;
        };
        session.uid = Some(uid.clone());
        session.first_login_time = first_login_time;
        session.kickout_code = None;
        let info_transport = session.transport;
        let info_peer = session.peer;
        self.set_online(&uid, endpoint);
        self.stats.logins += 1;
        let reply = Message::login_response(uid.borrowed(), LoginResponse::ok(first_login_time));
        self.send(now, endpoint, reply, out);

        if let (true, Some(pool)) = (self.interests.contains(Interests::LOGIN), &self.hook_pool) {
            // Its commands reach the users' cores as mail.
            pool.notify(Notice::Login {
                uid: uid.clone(),
                extra: login.extra.as_deref().map(str::to_owned),
                transport: info_transport,
                peer: info_peer,
            });
        } else if self.interests.contains(Interests::LOGIN) {
            let mut api = self.api();
            self.hooks.on_login(
                login.extra.as_deref(),
                SessionInfo {
                    uid: uid.as_str(),
                    transport: info_transport,
                    peer: info_peer,
                },
                &mut api,
            );
            self.run_hook_commands(now, api, out);
        }
        self.deliver_stored(now, &uid, out);
    }
}
