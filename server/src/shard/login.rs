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
//! Before verify, a login is refused (code [`ERROR_INVALID_MESSAGE`], counted) when its uid is
//! longer than [`MAX_USER_ID_LEN`](imedge_protocol::message::MAX_USER_ID_LEN), or is `"0"`, the
//! server's own id: a user "0" would receive the ACKs and C2S traffic meant for the server.

use imedge_protocol::message::check_user_id;
use imedge_protocol::message::payload::{
    LoginRequest, LoginResponse, ERROR_INVALID_MESSAGE, KICKOUT_DUPLICATE_LOGIN,
};
use imedge_protocol::session::Transport;
use imedge_protocol::Message;

use super::{shard_for, Adopt, Endpoint, Now, Outbox, Shard, ShardMsg};
use crate::hooks::SessionInfo;

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
        let info = SessionInfo {
            uid: login.user_id.as_str(),
            transport,
            peer,
        };
        let too_long = check_user_id(login.user_id.as_str()).is_err();
        if too_long {
            self.stats.ids_too_long += 1;
        }
        let code = if too_long || login.user_id.is_server() {
            ERROR_INVALID_MESSAGE
        } else {
            self.hooks.verify(&login, info)
        };
        if code != 0 {
            // Step 4: refused. TCP/WS are closed after the reply; a UDP client keeps whatever
            // state it had.
            self.stats.logins_refused += 1;
            tracing::debug!(uid = login.user_id.as_str(), code, "login refused");
            let reply =
                Message::login_response(login.user_id.borrowed(), LoginResponse::refused(code));
            self.send(now, endpoint, reply, out);
            if let Endpoint::Conn(conn) = endpoint {
                out.close(conn);
            }
            return;
        }
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
            let info = SessionInfo {
                uid: uid.as_str(),
                transport,
                peer,
            };
            self.hooks.on_logout(info, None);
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
        self.deliver_stored(now, &uid, out);
    }
}
