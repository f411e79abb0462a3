//! The Java SDK's client state machine, sans-IO: login, keep-alive, automatic re-login and QoS
//! (SPEC §5.1 client view, §6.1, §6.2, §6.4, §8.3, §8.5).
//!
//! [`ClientSession`] is what MobileIMSDK's TCP SDK spreads over `LocalDataReciever`,
//! `KeepAliveDaemon`, `AutoReLoginDaemon`, `QoS4SendDaemon` and `QoS4ReciveDaemon`, as one
//! deterministic value. The I/O layer owns the transport and the clock:
//!
//! ```text
//! link up          → handle_connected(now)      (the login is queued at once)
//! message decoded  → handle_message(now, &msg)
//! link lost        → handle_disconnected(now)
//! timer fired      → handle_timeout(now)
//! then drain         poll_output()  → Transmit(msg) | Reconnect | Close, in order
//!                    poll_event()   → what the application is told
//! and arm a timer at poll_timeout()
//! ```
//!
//! Transmissions and transport actions share one queue, [`ClientSession::poll_output`], because
//! their order matters: a logout must be written before the link is closed.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use super::sense::{KeepAlive, SenseMode, Transport, LIVENESS_CHECK_INTERVAL};
use crate::codec::{DecodeError, Decoder, Field};
use crate::message::payload::{
    ErrorResponse, Kickout, LoginRequest, LoginResponse, ERROR_NOT_LOGGED_IN, LOGIN_OK,
};
use crate::message::{Content, Fingerprint, Kind, Message, UserId};
use crate::qos::{
    QosEvent, QosKeyHasher, QosReceiver, QosReceiverConfig, QosSender, QosSenderConfig, Seen,
};

/// What a client session is configured with. [`ClientConfig::new`] fills in the Java SDK's
/// defaults for the transport.
#[derive(Clone)]
pub struct ClientConfig {
    /// The uid to log in as (`loginUserId`, and `from` of everything sent).
    pub user_id: UserId<'static>,
    /// `loginToken`, opaque to the framework. Never logged: `Debug` redacts it.
    pub token: Option<String>,
    /// `extra`, opaque application data sent with the login.
    pub extra: Option<String>,
    /// The transport, which selects the SDK's default timings.
    pub transport: Transport,
    /// Keep-alive interval and liveness timeout: the sense mode (SPEC §6.2).
    pub keep_alive: KeepAlive,
    /// Period of automatic re-login attempts (SPEC §6.4).
    pub relogin_interval: Duration,
    /// Resend timing of sent QoS messages (SPEC §8.3).
    pub qos: QosSenderConfig,
    /// De-duplication window of received QoS messages (SPEC §8.5).
    pub dedup: QosReceiverConfig,
}

impl ClientConfig {
    /// A configuration with the Java SDK's defaults for `transport`: sense mode TCP 15S / UDP 3S
    /// (WebSocket as TCP), re-login every 3000 / 2000 ms, the SDK's QoS timings.
    pub fn new(
        user_id: impl Into<UserId<'static>>,
        token: impl Into<String>,
        transport: Transport,
    ) -> Self {
        Self {
            user_id: user_id.into(),
            token: Some(token.into()),
            extra: None,
            transport,
            keep_alive: transport.default_client_keep_alive(),
            relogin_interval: transport.relogin_interval(),
            qos: QosSenderConfig::CLIENT,
            dedup: QosReceiverConfig::CLIENT,
        }
    }

    /// Uses the SDK heartbeat of `mode` on this transport (e.g. the demo clients' 5S).
    ///
    /// # Errors
    /// The UDP SDK has no 5S or 15S mode (SPEC §6.2).
    pub fn with_sense_mode(mut self, mode: SenseMode) -> Result<Self, UnsupportedSenseMode> {
        self.keep_alive = mode
            .client_keep_alive(self.transport)
            .ok_or(UnsupportedSenseMode {
                mode,
                transport: self.transport,
            })?;
        Ok(self)
    }

    /// Sets the `extra` login field.
    pub fn with_extra(mut self, extra: impl Into<String>) -> Self {
        self.extra = Some(extra.into());
        self
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("user_id", &self.user_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("extra", &self.extra)
            .field("transport", &self.transport)
            .field("keep_alive", &self.keep_alive)
            .field("relogin_interval", &self.relogin_interval)
            .field("qos", &self.qos)
            .field("dedup", &self.dedup)
            .finish()
    }
}

/// The SDK for this transport has no such sense mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {transport:?} SDK has no {mode:?} sense mode")]
pub struct UnsupportedSenseMode {
    /// The mode asked for.
    pub mode: SenseMode,
    /// The transport of the configuration.
    pub transport: Transport,
}

/// Why [`ClientSession::send`] refused a message. Nothing was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The session is not logged in (no successful login response on the current link, or the
    /// server answered 301).
    #[error("not logged in")]
    NotLoggedIn,
    /// The QoS resend table holds its maximum of unacknowledged messages.
    #[error("too many unacknowledged QoS messages")]
    QosFull,
}

/// What the I/O layer must do, in order, from [`ClientSession::poll_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Encode and write this message on the current link.
    Transmit(Message<'static>),
    /// Drop the current link, if any, and open a new one; call
    /// [`ClientSession::handle_connected`] once it is up. Asked again at every re-login tick while
    /// no link comes up (the SDK restarts its connection attempt each time).
    Reconnect,
    /// Close the link, or abandon a connection attempt, and do not reconnect. No
    /// [`ClientSession::handle_disconnected`] is needed afterwards.
    Close,
}

/// What the application is told, from [`ClientSession::poll_event`] (the SDK's callbacks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Login response code 0: logged in (`onLoginResponse(0)`).
    LoginOk {
        /// `firstLoginTime` of this response; the session keeps the one of the *first* success
        /// ([`ClientSession::first_login_time`]).
        first_login_time: i64,
    },
    /// Login refused with this code (≥ 1025 for application codes); the link is closed.
    LoginFailed {
        /// The refusal code.
        code: i32,
    },
    /// The link was lost (transport closed or keep-alive timeout); automatic re-login started
    /// (`onLinkClose`).
    LinkLost,
    /// Kicked out (type 54): the session stopped and will not re-login (TCP SDK behaviour).
    Kicked {
        /// 1 = duplicate login, 2 = by the server application (SPEC §4.5).
        code: i32,
        /// Optional reason text.
        reason: Option<String>,
    },
    /// An application message (type 2), delivered once even if the server resent it.
    Message(Message<'static>),
    /// An ACK for this fingerprint arrived (`messagesBeReceived`). Reported for every ACK, as the
    /// SDK does, including one for a fingerprint already reported lost.
    Delivered(Fingerprint<'static>),
    /// This QoS message was never acknowledged (`messagesLost`): after its last resend, or because
    /// the session was stopped (logout, kickout) while it was pending.
    Lost(Fingerprint<'static>, Message<'static>),
    /// An error response (type 52); 301 = not logged in, which also schedules a re-login.
    Error {
        /// `errorCode`.
        code: i32,
        /// `errorMsg` (for 301 the server's re-serialization of the refused message).
        message: Option<String>,
    },
    /// The reply to an echo request (type 53).
    EchoResponse(Message<'static>),
    /// A framework message whose document could not be parsed; it was ignored, as the SDK does.
    Malformed {
        /// The type of the message.
        kind: Kind,
        /// Why its `dataContent` was refused.
        error: DecodeError,
    },
}

/// Where the session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not started, logged out, kicked, or refused with no re-login running: nothing happens until
    /// the next `handle_connected`.
    Idle,
    /// A login is sent or about to be (link coming up); not logged in.
    LoggingIn,
    /// The server accepted the login on the current link; keep-alive runs.
    LoggedIn,
    /// Logged in, then the server answered 301: keep-alive stopped, re-login scheduled, but the
    /// link still counts as established (a link loss now restarts the re-login at once, as the SDK
    /// does).
    Rejected,
}

/// Keep-alive timers while logged in (SPEC §6.2).
#[derive(Debug, Clone, Copy)]
struct Heartbeat {
    next_send: Instant,
    next_check: Instant,
    /// Last keep-alive response, or the first keep-alive sent; `None` before any keep-alive (the
    /// SDK does not check liveness until then).
    last_heard: Option<Instant>,
}

/// A MobileIMSDK client session (see the module docs).
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    phase: Phase,
    /// Whether the I/O layer has a link up (`handle_connected` without a later loss).
    link_up: bool,
    /// `firstLoginTime` of the first successful login, sent back on re-logins (SPEC §4.1, §5.1).
    first_login_time: Option<i64>,
    heartbeat: Option<Heartbeat>,
    /// The next automatic re-login attempt, while the re-login "daemon" runs.
    relogin_at: Option<Instant>,
    sender: QosSender<Message<'static>>,
    receiver: QosReceiver,
    /// Keys of the de-duplication window: (sender, fingerprint) under a per-session secret.
    keys: QosKeyHasher,
    /// Parses login responses, errors and kickouts carried as text.
    decoder: Decoder,
    outputs: VecDeque<Output>,
    events: VecDeque<Event>,
}

impl ClientSession {
    /// A session that has not connected yet. Open the transport and call
    /// [`Self::handle_connected`] to log in.
    pub fn new(config: ClientConfig, now: Instant) -> Self {
        Self {
            sender: QosSender::new(config.qos, now),
            receiver: QosReceiver::new(config.dedup, now),
            keys: QosKeyHasher::random(),
            config,
            phase: Phase::Idle,
            link_up: false,
            first_login_time: None,
            heartbeat: None,
            relogin_at: None,
            decoder: Decoder::new(),
            outputs: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Whether the server accepted the login on the current link (and has not answered 301).
    pub fn is_logged_in(&self) -> bool {
        self.phase == Phase::LoggedIn
    }

    /// `firstLoginTime` of the first successful login, which re-logins send back.
    pub fn first_login_time(&self) -> Option<i64> {
        self.first_login_time
    }

    /// Number of sent QoS messages awaiting an ACK.
    pub fn pending_qos(&self) -> usize {
        self.sender.len()
    }

    /// The transport link is up: the login is queued immediately (SPEC §5.1). Also (re)starts a
    /// session that was idle (after a logout, kickout or refusal).
    pub fn handle_connected(&mut self, now: Instant) {
        let _ = now;
        self.link_up = true;
        self.heartbeat = None;
        self.phase = Phase::LoggingIn;
        let login = self.login_message();
        self.outputs.push_back(Output::Transmit(login));
    }

    /// The link was lost (closed by the peer, read error). A logged-in session reports
    /// [`Event::LinkLost`] and starts automatic re-login, first attempt immediately (SPEC §6.4).
    /// Queued transmissions are dropped. Idempotent: ignored when no link is up.
    pub fn handle_disconnected(&mut self, now: Instant) {
        if !self.link_up {
            return;
        }
        match self.phase {
            Phase::LoggedIn | Phase::Rejected => self.lose_link(now),
            Phase::LoggingIn => {
                self.drop_link();
                // An initial login whose link failed: the SDK has no re-login running then.
                if self.relogin_at.is_none() {
                    self.phase = Phase::Idle;
                    self.events.push_back(Event::LinkLost);
                }
            }
            Phase::Idle => self.drop_link(),
        }
    }

    /// A message arrived from the server.
    ///
    /// A QoS message is ACKed every time and passed on only the first time (SPEC §8.5).
    pub fn handle_message(&mut self, now: Instant, msg: &Message<'_>) {
        if msg.qos {
            if let Some(fp) = &msg.fp {
                if let Some(ack) = msg.ack_reply() {
                    self.outputs.push_back(Output::Transmit(ack.into_owned()));
                }
                let from = msg.from.as_ref().map_or("", |from| from.as_str());
                let key = self.keys.key(from, fp.as_str());
                if self.receiver.handle_message(now, key) == Seen::Duplicate {
                    return;
                }
            }
        }
        match msg.kind {
            Kind::CommonData => self
                .events
                .push_back(Event::Message(msg.clone().into_owned())),
            Kind::KeepAliveResponse => {
                if let Some(heartbeat) = &mut self.heartbeat {
                    heartbeat.last_heard = Some(now);
                }
            }
            Kind::Ack => self.on_ack(msg),
            Kind::LoginResponse => self.on_login_response(now, msg),
            Kind::Error => self.on_error(now, msg),
            Kind::Kickout => self.on_kickout(msg),
            Kind::EchoResponse => self
                .events
                .push_back(Event::EchoResponse(msg.clone().into_owned())),
            // Client-to-server types and unknown types: the SDK logs and ignores them.
            _ => {}
        }
    }

    /// Runs every timer due at or before `now`: re-login attempts, keep-alives, the liveness
    /// check, QoS resends and the de-duplication sweep.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(at) = self.relogin_at {
            if at <= now {
                self.relogin_attempt();
                self.relogin_at = Some(next_tick(at, self.config.relogin_interval, now));
            }
        }

        let mut lost = false;
        if let Some(heartbeat) = &mut self.heartbeat {
            let KeepAlive { interval, timeout } = self.config.keep_alive;
            if heartbeat.next_send <= now {
                let keep_alive = Message::keep_alive(self.config.user_id.clone());
                self.outputs.push_back(Output::Transmit(keep_alive));
                heartbeat.last_heard.get_or_insert(now);
                heartbeat.next_send = next_tick(heartbeat.next_send, interval, now);
            }
            if heartbeat.next_check <= now {
                heartbeat.next_check =
                    next_tick(heartbeat.next_check, LIVENESS_CHECK_INTERVAL, now);
                lost = heartbeat
                    .last_heard
                    .is_some_and(|last| now.saturating_duration_since(last) >= timeout);
            }
        }
        if lost {
            self.lose_link(now);
        }

        // The SDK keeps its resend timer running while the link is down (SPEC §8.3).
        self.sender.handle_timeout(now);
        self.pump_sender();
        if self.has_established_link() {
            self.receiver.handle_timeout(now);
        }
    }

    /// Sends application data (type 2) from this session's uid to `to`.
    ///
    /// With a fingerprint the message asks for QoS: it enters the resend table and is resent on
    /// the SDK's schedule until ACKed or reported [`Event::Lost`]. The fingerprint is chosen by the
    /// caller (the SDK uses a random UUID v4; this crate has no randomness). Sending a fingerprint
    /// that is still pending replaces the kept copy without resetting its schedule.
    ///
    /// # Errors
    /// [`SendError::NotLoggedIn`] unless logged in; [`SendError::QosFull`] when the resend table is
    /// full. Nothing is queued in either case.
    pub fn send(
        &mut self,
        now: Instant,
        to: UserId<'static>,
        text: impl Into<Cow<'static, str>>,
        fp: Option<Fingerprint<'static>>,
        typeu: i32,
    ) -> Result<(), SendError> {
        if self.phase != Phase::LoggedIn {
            return Err(SendError::NotLoggedIn);
        }
        let mut msg = Message::data(self.config.user_id.clone(), to, text, fp);
        msg.typeu = typeu;
        if let Some(fp) = &msg.fp {
            self.sender
                .insert(now, fp.clone(), msg.clone(), heap_bytes(&msg))
                .map_err(|_| SendError::QosFull)?;
        }
        self.outputs.push_back(Output::Transmit(msg));
        Ok(())
    }

    /// Logs out: a logout message if logged in, then [`Output::Close`]. Everything stops, the
    /// de-duplication window and the stored `firstLoginTime` are forgotten, and pending QoS
    /// messages are reported [`Event::Lost`] (the SDK's `release()`, SPEC §5.4).
    pub fn logout(&mut self, now: Instant) {
        let _ = now;
        if self.phase == Phase::LoggedIn && self.link_up {
            let logout = Message::logout(self.config.user_id.clone());
            self.outputs.push_back(Output::Transmit(logout));
        }
        self.release();
    }

    /// The next thing the I/O layer must do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next thing to tell the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called; `None` when no timer runs.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let heartbeat = self.heartbeat.map(|h| h.next_send.min(h.next_check));
        let sweep = self
            .has_established_link()
            .then(|| self.receiver.poll_timeout())
            .flatten();
        [
            self.relogin_at,
            heartbeat,
            self.sender.poll_timeout(),
            sweep,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The login message, with the stored `firstLoginTime` (0 before the first success).
    fn login_message(&self) -> Message<'static> {
        Message::login(LoginRequest {
            user_id: self.config.user_id.clone(),
            token: self.config.token.clone().map(Cow::Owned),
            extra: self.config.extra.clone().map(Cow::Owned),
            first_login_time: self.first_login_time.unwrap_or(0),
        })
    }

    /// Logged in on the current link, possibly since refused with 301.
    fn has_established_link(&self) -> bool {
        matches!(self.phase, Phase::LoggedIn | Phase::Rejected)
    }

    fn on_ack(&mut self, msg: &Message<'_>) {
        let Some(fp) = msg.text() else {
            return;
        };
        self.sender.handle_ack(fp);
        self.events
            .push_back(Event::Delivered(Fingerprint::from(fp.to_owned())));
    }

    fn on_login_response(&mut self, now: Instant, msg: &Message<'_>) {
        if self.phase == Phase::Idle {
            // The answer to a login that was abandoned (logout, kickout).
            return;
        }
        let response = match login_response(&mut self.decoder, msg) {
            Ok(response) => response,
            Err(error) => {
                self.malformed(msg.kind, error);
                return;
            }
        };
        if response.code != LOGIN_OK {
            // The SDK closes the link; a running re-login keeps trying (SPEC §5.1 step 4).
            self.events.push_back(Event::LoginFailed {
                code: response.code,
            });
            self.heartbeat = None;
            self.drop_link();
            self.outputs.push_back(Output::Close);
            self.phase = if self.relogin_at.is_some() {
                Phase::LoggingIn
            } else {
                Phase::Idle
            };
            return;
        }
        self.first_login_time
            .get_or_insert(response.first_login_time);
        self.phase = Phase::LoggedIn;
        self.relogin_at = None;
        self.heartbeat = Some(Heartbeat {
            next_send: later(now, self.config.keep_alive.interval),
            next_check: later(now, LIVENESS_CHECK_INTERVAL),
            last_heard: None,
        });
        // The SDK restarts both QoS timers at every login, first run immediately (SPEC §8.3, §8.5).
        self.sender.restart(now);
        self.receiver.restart(now);
        self.events.push_back(Event::LoginOk {
            first_login_time: response.first_login_time,
        });
        // Entries past their grace are due right now.
        self.sender.handle_timeout(now);
        self.pump_sender();
    }

    fn on_error(&mut self, now: Instant, msg: &Message<'_>) {
        let response = match error_response(&mut self.decoder, msg) {
            Ok(response) => response,
            Err(error) => {
                self.malformed(msg.kind, error);
                return;
            }
        };
        if response.code == ERROR_NOT_LOGGED_IN && self.phase != Phase::Idle {
            // Keep-alive stops; re-login starts after one interval (SPEC §6.4).
            self.heartbeat = None;
            if self.phase == Phase::LoggedIn {
                self.phase = Phase::Rejected;
            }
            self.relogin_at = Some(later(now, self.config.relogin_interval));
        }
        self.events.push_back(Event::Error {
            code: response.code,
            message: response.message.map(Cow::into_owned),
        });
    }

    fn on_kickout(&mut self, msg: &Message<'_>) {
        if self.phase == Phase::Idle {
            return;
        }
        // The TCP SDK releases everything before it even parses the document (SPEC §5.3). The UDP
        // SDK ignores kickouts; imedge follows the TCP SDK on every transport.
        let kickout = kickout(&mut self.decoder, msg);
        match kickout {
            Ok(kickout) => self.events.push_back(Event::Kicked {
                code: kickout.code,
                reason: kickout.reason.map(Cow::into_owned),
            }),
            Err(error) => self.malformed(msg.kind, error),
        }
        self.release();
    }

    /// Logged in, and the link is gone (transport loss or keep-alive timeout): report it and start
    /// re-login with an immediate first attempt, which asks for a new link.
    fn lose_link(&mut self, now: Instant) {
        self.drop_link();
        self.heartbeat = None;
        self.phase = Phase::LoggingIn;
        self.events.push_back(Event::LinkLost);
        self.relogin_attempt();
        self.relogin_at = Some(later(now, self.config.relogin_interval));
    }

    /// One automatic re-login attempt: the login on the current link, or a new link whose
    /// `handle_connected` will send it.
    fn relogin_attempt(&mut self) {
        if self.link_up {
            let login = self.login_message();
            self.outputs.push_back(Output::Transmit(login));
        } else {
            self.outputs.push_back(Output::Reconnect);
        }
    }

    /// Forgets the current link; what was queued for it can no longer be written.
    fn drop_link(&mut self) {
        self.link_up = false;
        self.outputs
            .retain(|output| !matches!(output, Output::Transmit(_)));
    }

    /// Stops everything (logout, kickout): the SDK's `release()`.
    fn release(&mut self) {
        self.phase = Phase::Idle;
        self.heartbeat = None;
        self.relogin_at = None;
        self.first_login_time = None;
        self.link_up = false;
        self.outputs.push_back(Output::Close);
        self.receiver.clear();
        for (fp, msg) in self.sender.drain() {
            self.events.push_back(Event::Lost(fp, msg));
        }
    }

    /// Turns the resend table's events into transmissions and [`Event::Lost`]s.
    ///
    /// A resend is written only while logged in. The SDK writes it whatever the state — into a
    /// closed socket while the link is down (counted as a resend all the same, as here), or on a
    /// fresh link before its login is answered, where the server replies 301 and closes a TCP
    /// link; imedge skips that write.
    fn pump_sender(&mut self) {
        while let Some(event) = self.sender.poll_event() {
            match event {
                QosEvent::Resend { item, .. } => {
                    if self.phase == Phase::LoggedIn && self.link_up {
                        self.outputs.push_back(Output::Transmit(item));
                    }
                }
                QosEvent::Lost { key, item } => self.events.push_back(Event::Lost(key, item)),
            }
        }
    }

    fn malformed(&mut self, kind: Kind, error: DecodeError) {
        self.events.push_back(Event::Malformed { kind, error });
    }
}

/// What a kept copy of `msg` holds on the heap (its strings, at most; borrowed ones count too).
fn heap_bytes(msg: &Message<'_>) -> usize {
    let uid = |u: &Option<UserId<'_>>| u.as_ref().map_or(0, |u| u.as_str().len());
    msg.text().map_or(0, str::len)
        + uid(&msg.from)
        + uid(&msg.to)
        + msg.fp.as_ref().map_or(0, |fp| fp.as_str().len())
}

/// The login response document of a type-50 message, structured or as text.
fn login_response(decoder: &mut Decoder, msg: &Message<'_>) -> Result<LoginResponse, DecodeError> {
    match &msg.content {
        Some(Content::LoginResponse(doc)) => Ok(*doc),
        Some(Content::Text(text)) => decoder.login_response(text),
        Some(_) => Err(DecodeError::WrongType(Field::DataContent)),
        None => Err(DecodeError::Missing(Field::DataContent)),
    }
}

/// The error document of a type-52 message, structured or as text.
fn error_response(
    decoder: &mut Decoder,
    msg: &Message<'_>,
) -> Result<ErrorResponse<'static>, DecodeError> {
    match &msg.content {
        Some(Content::Error(doc)) => Ok(doc.clone().into_owned()),
        Some(Content::Text(text)) => decoder.error_response(text),
        Some(_) => Err(DecodeError::WrongType(Field::DataContent)),
        None => Err(DecodeError::Missing(Field::DataContent)),
    }
}

/// The kickout document of a type-54 message, structured or as text.
fn kickout(decoder: &mut Decoder, msg: &Message<'_>) -> Result<Kickout<'static>, DecodeError> {
    match &msg.content {
        Some(Content::Kickout(doc)) => Ok(doc.clone().into_owned()),
        Some(Content::Text(text)) => decoder.kickout(text),
        Some(_) => Err(DecodeError::WrongType(Field::DataContent)),
        None => Err(DecodeError::Missing(Field::DataContent)),
    }
}

/// The tick after `at`, or one period after `now` if the caller is so late that it also passed.
fn next_tick(at: Instant, period: Duration, now: Instant) -> Instant {
    let next = later(at, period);
    if next <= now {
        later(now, period)
    } else {
        next
    }
}

/// `t + d`, or `t` if that is not representable (only with absurd configurations).
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST_LOGIN_TIME: i64 = 1_795_768_890_108;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn session(transport: Transport, t0: Instant) -> ClientSession {
        ClientSession::new(ClientConfig::new("alice", "tokenA", transport), t0)
    }

    fn outputs(s: &mut ClientSession) -> Vec<Output> {
        std::iter::from_fn(|| s.poll_output()).collect()
    }

    fn events(s: &mut ClientSession) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    /// The kinds of the transmitted messages, with actions as pseudo-kinds.
    fn kinds(outputs: &[Output]) -> Vec<&'static str> {
        outputs
            .iter()
            .map(|o| match o {
                Output::Transmit(m) => match m.kind {
                    Kind::Login => "login",
                    Kind::KeepAlive => "keep-alive",
                    Kind::CommonData => "data",
                    Kind::Logout => "logout",
                    Kind::Ack => "ack",
                    _ => "other",
                },
                Output::Reconnect => "reconnect",
                Output::Close => "close",
            })
            .collect()
    }

    /// The `firstLoginTime` of a transmitted login.
    fn login_time(output: &Output) -> Option<i64> {
        match output {
            Output::Transmit(Message {
                kind: Kind::Login,
                content: Some(Content::Login(req)),
                ..
            }) => Some(req.first_login_time),
            _ => None,
        }
    }

    /// A type-50 message as decoded from the wire (text content).
    fn login_response_msg(code: i32, first_login_time: i64) -> Message<'static> {
        Message::new(Kind::LoginResponse)
            .from(UserId::SERVER)
            .to(UserId::from("alice"))
            .content(format!(
                "{{\"code\":{code},\"firstLoginTime\":{first_login_time}}}"
            ))
    }

    fn server_msg(kind: Kind, content: &str) -> Message<'static> {
        Message::new(kind)
            .from(UserId::SERVER)
            .to(UserId::from("alice"))
            .content(content.to_owned())
    }

    /// Connects at `t0`, logs in at `t0 + 50 ms`, drains everything.
    fn logged_in(transport: Transport, t0: Instant) -> ClientSession {
        let mut s = session(transport, t0);
        s.handle_connected(t0);
        s.handle_message(t0 + ms(50), &login_response_msg(0, FIRST_LOGIN_TIME));
        outputs(&mut s);
        events(&mut s);
        s
    }

    /// Runs every timer up to `until` in order, answering nothing; returns (time, output) pairs.
    fn run_until(s: &mut ClientSession, until: Instant) -> Vec<(Instant, Output)> {
        let mut out = Vec::new();
        while let Some(at) = s.poll_timeout() {
            if at > until {
                break;
            }
            s.handle_timeout(at);
            out.extend(outputs(s).into_iter().map(|o| (at, o)));
        }
        out
    }

    #[test]
    fn login_is_sent_on_connect() {
        let t0 = Instant::now();
        let mut s = session(Transport::Tcp, t0);
        assert_eq!(s.poll_timeout(), None);
        s.handle_connected(t0);
        let out = outputs(&mut s);
        assert_eq!(kinds(&out), ["login"]);
        let Some(Output::Transmit(login)) = out.first() else {
            panic!("no login");
        };
        assert_eq!(login.from.as_ref().map(UserId::as_str), Some("alice"));
        assert_eq!(login.to.as_ref().map(UserId::as_str), Some("0"));
        assert_eq!(login_time(&out[0]), Some(0));
        // The SDK's exact login body (SPEC §4.1 example).
        assert_eq!(
            String::from_utf8(login.to_json()).unwrap(),
            r#"{"bridge":false,"type":0,"dataContent":"{\"loginUserId\":\"alice\",\"loginToken\":\"tokenA\",\"firstLoginTime\":0}","from":"alice","to":"0","QoS":false,"typeu":-1,"sm":-1}"#
        );
        assert!(!s.is_logged_in());
        assert_eq!(
            s.send(t0, UserId::SERVER, "hi", None, -1),
            Err(SendError::NotLoggedIn)
        );
        s.handle_message(t0 + ms(50), &login_response_msg(0, FIRST_LOGIN_TIME));
        assert_eq!(
            events(&mut s),
            [Event::LoginOk {
                first_login_time: FIRST_LOGIN_TIME
            }]
        );
        assert!(s.is_logged_in());
        assert_eq!(s.first_login_time(), Some(FIRST_LOGIN_TIME));
    }

    #[test]
    fn login_response_decoded_from_wire_bytes() {
        let t0 = Instant::now();
        let mut s = session(Transport::Tcp, t0);
        s.handle_connected(t0);
        let mut body = br#"{"bridge":false,"type":50,"dataContent":"{\"code\":0,\"firstLoginTime\":1795768890108}","from":"0","to":"alice","QoS":false,"typeu":-1,"sm":-1}"#.to_vec();
        let mut decoder = Decoder::new();
        let msg = decoder.decode(&mut body).unwrap();
        s.handle_message(t0, &msg);
        assert_eq!(
            events(&mut s),
            [Event::LoginOk {
                first_login_time: FIRST_LOGIN_TIME
            }]
        );
        // A structured document works too (in-memory client/server pairs).
        let mut s = session(Transport::Tcp, t0);
        s.handle_connected(t0);
        s.handle_message(
            t0,
            &Message::login_response(UserId::from("alice"), LoginResponse::ok(42)),
        );
        assert_eq!(s.first_login_time(), Some(42));
    }

    #[test]
    fn keep_alives_one_interval_after_login_then_every_interval() {
        // The demo clients' 5S mode: keep-alives at +5.0 s and +10.0 s after the login response,
        // as in vectors/tcp-keepalive.jsonl.
        let t0 = Instant::now();
        let config = ClientConfig::new("alice", "tokenA", Transport::Tcp)
            .with_sense_mode(SenseMode::S5)
            .unwrap();
        let mut s = ClientSession::new(config, t0);
        s.handle_connected(t0);
        outputs(&mut s);
        s.handle_message(t0 + ms(50), &login_response_msg(0, FIRST_LOGIN_TIME));
        events(&mut s);
        let mut sent = Vec::new();
        while let Some(at) = s.poll_timeout() {
            if at > t0 + ms(20_050) {
                break;
            }
            s.handle_timeout(at);
            for out in outputs(&mut s) {
                assert_eq!(kinds(&[out]), ["keep-alive"]);
                sent.push(at - t0);
                s.handle_message(at + ms(3), &server_msg(Kind::KeepAliveResponse, "{}"));
            }
        }
        assert_eq!(sent, [ms(5050), ms(10_050), ms(15_050), ms(20_050)]);
        assert_eq!(events(&mut s), []);
        assert!(s.is_logged_in());
    }

    #[test]
    fn keep_alive_timeout_reconnects_and_relogs_with_first_login_time() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Tcp, t0);
        // SDK default 15 s / 20 s: keep-alives at 15 050 and 30 050, never answered. Silence is
        // counted from the first keep-alive; liveness checks run at 50 + 2000k, and the first
        // that finds 20 s of it is 36 050.
        let out = run_until(&mut s, t0 + ms(36_049));
        let sent: Vec<_> = out
            .iter()
            .map(|(at, o)| (*at - t0, kinds(std::slice::from_ref(o))[0]))
            .collect();
        assert_eq!(
            sent,
            [(ms(15_050), "keep-alive"), (ms(30_050), "keep-alive")]
        );
        assert!(events(&mut s).is_empty());

        s.handle_timeout(t0 + ms(36_050));
        assert_eq!(events(&mut s), [Event::LinkLost]);
        assert_eq!(outputs(&mut s), [Output::Reconnect]);
        assert!(!s.is_logged_in());
        // The link does not come up: another attempt one re-login interval later.
        assert_eq!(s.poll_timeout(), Some(t0 + ms(39_050)));
        s.handle_timeout(t0 + ms(39_050));
        assert_eq!(outputs(&mut s), [Output::Reconnect]);
        // Link up: the re-login carries the first login's firstLoginTime.
        s.handle_connected(t0 + ms(40_000));
        let out = outputs(&mut s);
        assert_eq!(login_time(&out[0]), Some(FIRST_LOGIN_TIME));
        // The server echoes it; a different value would not replace the stored one.
        s.handle_message(t0 + ms(40_010), &login_response_msg(0, 7));
        assert_eq!(
            events(&mut s),
            [Event::LoginOk {
                first_login_time: 7
            }]
        );
        assert_eq!(s.first_login_time(), Some(FIRST_LOGIN_TIME));
        // Re-login stopped; the heartbeat restarted from the new login.
        assert_eq!(s.poll_timeout(), Some(t0 + ms(42_010)));
        let out = run_until(&mut s, t0 + ms(55_010));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, t0 + ms(55_010));
    }

    #[test]
    fn transport_loss_relogs_immediately() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Udp, t0);
        s.handle_disconnected(t0 + ms(1000));
        assert_eq!(events(&mut s), [Event::LinkLost]);
        assert_eq!(outputs(&mut s), [Output::Reconnect]);
        // Idempotent.
        s.handle_disconnected(t0 + ms(1001));
        assert!(events(&mut s).is_empty());
        assert!(outputs(&mut s).is_empty());
        // UDP re-login interval: 2000 ms.
        assert_eq!(s.poll_timeout(), Some(t0 + ms(3000)));
    }

    #[test]
    fn error_301_relogs_after_one_interval() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Udp, t0);
        let error = r#"{"errorCode":301,"errorMsg":"{\"type\":1}"}"#;
        s.handle_message(t0 + ms(1000), &server_msg(Kind::Error, error));
        assert_eq!(
            events(&mut s),
            [Event::Error {
                code: 301,
                message: Some(r#"{"type":1}"#.into())
            }]
        );
        assert!(outputs(&mut s).is_empty());
        assert!(!s.is_logged_in());
        assert_eq!(
            s.send(t0 + ms(1000), UserId::SERVER, "x", None, -1),
            Err(SendError::NotLoggedIn)
        );
        // UDP keeps the link: the re-login goes on it, one interval (2000 ms) later.
        assert_eq!(s.poll_timeout(), Some(t0 + ms(3000)));
        s.handle_timeout(t0 + ms(3000));
        let out = outputs(&mut s);
        assert_eq!(kinds(&out), ["login"]);
        assert_eq!(login_time(&out[0]), Some(FIRST_LOGIN_TIME));
        // Still unanswered: tried again every interval.
        s.handle_timeout(t0 + ms(5000));
        assert_eq!(kinds(&outputs(&mut s)), ["login"]);
        s.handle_message(t0 + ms(5010), &login_response_msg(0, FIRST_LOGIN_TIME));
        assert!(s.is_logged_in());
    }

    #[test]
    fn error_301_then_tcp_close_reconnects_at_once() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Tcp, t0);
        let error = r#"{"errorCode":301,"errorMsg":"x"}"#;
        s.handle_message(t0 + ms(1000), &server_msg(Kind::Error, error));
        events(&mut s);
        // The server closes a TCP link after a 301 (SPEC §9).
        s.handle_disconnected(t0 + ms(1001));
        assert_eq!(events(&mut s), [Event::LinkLost]);
        assert_eq!(outputs(&mut s), [Output::Reconnect]);
    }

    #[test]
    fn kickout_stops_the_session() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Tcp, t0);
        s.send(
            t0 + ms(100),
            UserId::from("bob"),
            "hi",
            Some("fp-1".into()),
            -1,
        )
        .unwrap();
        outputs(&mut s);
        s.handle_message(t0 + ms(200), &server_msg(Kind::Kickout, r#"{"code":1}"#));
        let ev = events(&mut s);
        assert_eq!(
            ev[0],
            Event::Kicked {
                code: 1,
                reason: None
            }
        );
        assert!(matches!(&ev[1], Event::Lost(fp, _) if fp == "fp-1"));
        assert_eq!(ev.len(), 2);
        assert_eq!(outputs(&mut s), [Output::Close]);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.first_login_time(), None);
        assert_eq!(
            s.send(t0 + ms(300), UserId::SERVER, "x", None, -1),
            Err(SendError::NotLoggedIn)
        );
        s.handle_timeout(t0 + ms(600_000));
        assert!(outputs(&mut s).is_empty());
        assert!(events(&mut s).is_empty());
    }

    #[test]
    fn kickout_with_reason() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Ws, t0);
        s.handle_message(
            t0,
            &server_msg(Kind::Kickout, r#"{"code":2,"reason":"admin"}"#),
        );
        assert_eq!(
            events(&mut s),
            [Event::Kicked {
                code: 2,
                reason: Some("admin".into())
            }]
        );
    }

    #[test]
    fn qos_message_resent_then_lost() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Tcp, t0);
        // QoS ticks run from the login response (t0 + 50) every 5000 ms.
        s.send(
            t0 + ms(150),
            UserId::from("carol"),
            "to offline carol",
            Some("fp-1".into()),
            7,
        )
        .unwrap();
        let out = outputs(&mut s);
        assert_eq!(kinds(&out), ["data"]);
        let Output::Transmit(original) = &out[0] else {
            panic!("not a transmission");
        };
        assert!(original.qos);
        assert_eq!(original.typeu, 7);
        assert_eq!(s.pending_qos(), 1);

        let data: Vec<_> = run_until(&mut s, t0 + ms(15_049))
            .into_iter()
            .filter(|(_, o)| matches!(o, Output::Transmit(m) if m.kind == Kind::CommonData))
            .collect();
        // Resent unchanged at +4.9 s and +9.9 s after the send, like vectors/tcp-offline-lost.
        assert_eq!(
            data,
            [
                (t0 + ms(5050), Output::Transmit(original.clone())),
                (t0 + ms(10_050), Output::Transmit(original.clone())),
            ]
        );
        assert!(events(&mut s).is_empty());
        s.handle_timeout(t0 + ms(15_050));
        assert_eq!(
            events(&mut s),
            [Event::Lost("fp-1".into(), original.clone())]
        );
        assert_eq!(s.pending_qos(), 0);
    }

    #[test]
    fn ack_reports_delivery_and_stops_resends() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Tcp, t0);
        s.send(t0 + ms(150), UserId::SERVER, "c2s", Some("fp-1".into()), -1)
            .unwrap();
        outputs(&mut s);
        let ack = Message::ack(UserId::SERVER, UserId::from("alice"), "fp-1".into(), false);
        s.handle_message(t0 + ms(160), &ack);
        assert_eq!(events(&mut s), [Event::Delivered("fp-1".into())]);
        assert_eq!(s.pending_qos(), 0);
        let out = run_until(&mut s, t0 + ms(14_000));
        assert!(out.is_empty());
        assert!(events(&mut s).is_empty());
    }

    #[test]
    fn qos_full_refuses_the_message() {
        let t0 = Instant::now();
        let mut config = ClientConfig::new("alice", "tokenA", Transport::Tcp);
        config.qos.max_pending = 1;
        let mut s = ClientSession::new(config, t0);
        s.handle_connected(t0);
        s.handle_message(t0, &login_response_msg(0, 1));
        outputs(&mut s);
        s.send(t0, UserId::SERVER, "a", Some("fp-1".into()), -1)
            .unwrap();
        assert_eq!(
            s.send(t0, UserId::SERVER, "b", Some("fp-2".into()), -1),
            Err(SendError::QosFull)
        );
        // Non-QoS data is not limited.
        s.send(t0, UserId::SERVER, "c", None, -1).unwrap();
        assert_eq!(kinds(&outputs(&mut s)), ["data", "data"]);
    }

    #[test]
    fn duplicate_incoming_qos_message_acked_twice_delivered_once() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Tcp, t0);
        let mut data = Message::data(
            UserId::from("bob"),
            UserId::from("alice"),
            "hello",
            Some("fp-b".into()),
        );
        data.typeu = 3;
        s.handle_message(t0 + ms(100), &data);
        s.handle_message(t0 + ms(5100), &data);
        let out = outputs(&mut s);
        let expected_ack = Message::ack(
            UserId::from("alice"),
            UserId::from("bob"),
            "fp-b".into(),
            false,
        );
        assert_eq!(
            out,
            [
                Output::Transmit(expected_ack.clone()),
                Output::Transmit(expected_ack)
            ]
        );
        assert_eq!(events(&mut s), [Event::Message(data)]);
    }

    #[test]
    fn non_qos_data_is_delivered_without_ack() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Tcp, t0);
        let data = Message::data(UserId::from("bob"), UserId::from("alice"), "hi", None);
        s.handle_message(t0, &data);
        s.handle_message(t0, &data);
        assert!(outputs(&mut s).is_empty());
        assert_eq!(events(&mut s).len(), 2);
    }

    #[test]
    fn refused_login_closes_without_retry() {
        let t0 = Instant::now();
        let mut s = session(Transport::Tcp, t0);
        s.handle_connected(t0);
        outputs(&mut s);
        s.handle_message(
            t0 + ms(5),
            &Message::login_response(UserId::from("alice"), LoginResponse::refused(1025)),
        );
        assert_eq!(events(&mut s), [Event::LoginFailed { code: 1025 }]);
        assert_eq!(outputs(&mut s), [Output::Close]);
        assert_eq!(s.poll_timeout(), None);
        assert!(!s.is_logged_in());
    }

    #[test]
    fn logout_writes_logout_then_closes() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Tcp, t0);
        s.send(t0 + ms(100), UserId::SERVER, "x", Some("fp-1".into()), -1)
            .unwrap();
        outputs(&mut s);
        s.logout(t0 + ms(200));
        assert_eq!(kinds(&outputs(&mut s)), ["logout", "close"]);
        assert!(matches!(events(&mut s).as_slice(), [Event::Lost(fp, _)] if fp == "fp-1"));
        assert_eq!(s.poll_timeout(), None);
        // A new link starts a fresh login (firstLoginTime forgotten).
        s.handle_connected(t0 + ms(300));
        assert_eq!(login_time(&outputs(&mut s)[0]), Some(0));
    }

    #[test]
    fn resends_are_not_written_while_the_link_is_down() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Tcp, t0);
        s.send(t0 + ms(150), UserId::SERVER, "x", Some("fp-1".into()), -1)
            .unwrap();
        outputs(&mut s);
        s.handle_disconnected(t0 + ms(1000));
        events(&mut s);
        // Re-login attempts keep asking for a link; the resends at 5050 and 10050 are counted but
        // not written, and the message is reported lost at 15050 as in the SDK.
        let out = run_until(&mut s, t0 + ms(15_050));
        assert!(out.iter().all(|(_, o)| *o == Output::Reconnect));
        assert!(matches!(events(&mut s).as_slice(), [Event::Lost(fp, _)] if fp == "fp-1"));
    }

    #[test]
    fn pending_message_is_resent_right_after_a_relogin() {
        let t0 = Instant::now();
        let mut s = logged_in(Transport::Tcp, t0);
        s.send(t0 + ms(150), UserId::SERVER, "x", Some("fp-1".into()), -1)
            .unwrap();
        outputs(&mut s);
        s.handle_disconnected(t0 + ms(1000));
        s.handle_connected(t0 + ms(4000));
        outputs(&mut s);
        // Logged in again at 4100: the QoS timer restarts there with an immediate run, and the
        // message (3.95 s old, past its grace) is resent at once.
        s.handle_message(t0 + ms(4100), &login_response_msg(0, FIRST_LOGIN_TIME));
        assert_eq!(kinds(&outputs(&mut s)), ["data"]);
    }

    #[test]
    fn echo_response_is_reported() {
        let t0 = Instant::now();
        let mut s = session(Transport::Tcp, t0);
        let echo = Message::new(Kind::Echo).content("ping").echo_response();
        s.handle_message(t0, &echo);
        assert_eq!(events(&mut s), [Event::EchoResponse(echo)]);
    }

    #[test]
    fn malformed_document_is_reported_and_ignored() {
        let t0 = Instant::now();
        let mut s = session(Transport::Tcp, t0);
        s.handle_connected(t0);
        s.handle_message(t0, &server_msg(Kind::LoginResponse, "not json"));
        assert!(matches!(
            events(&mut s).as_slice(),
            [Event::Malformed {
                kind: Kind::LoginResponse,
                ..
            }]
        ));
        assert!(!s.is_logged_in());
    }

    #[test]
    fn sense_mode_and_debug() {
        let config = ClientConfig::new("alice", "secret-token", Transport::Udp);
        assert_eq!(
            config.clone().with_sense_mode(SenseMode::S5).unwrap_err(),
            UnsupportedSenseMode {
                mode: SenseMode::S5,
                transport: Transport::Udp
            }
        );
        assert_eq!(config.keep_alive, KeepAlive::from_millis(3000, 10_000));
        assert!(!format!("{config:?}").contains("secret-token"));
    }
}
