//! Extension points: the verify step and the application callbacks of the reference server
//! (SPEC §10) as one trait, plus the built-in verifiers.
//!
//! # Contract
//! With the server's hook pool ([`pool::HookPool`], what [`crate::runtime::start`] sets up)
//! [`ServerEvents::verify`] and the notifications — [`ServerEvents::on_login`],
//! [`ServerEvents::on_logout`], [`ServerEvents::on_c2c_after`], [`ServerEvents::on_offline`]
//! when the built-in store keeps the message anyway, [`ServerEvents::on_s2c_delivered`] and
//! [`ServerEvents::on_s2c_lost`] — run on worker threads, never on an event loop: they may block
//! (an HTTP call, a database lookup). The shard posts the login and goes on serving its other
//! sessions; the verify's answer comes back to it as mail. A verify that cannot run (queue full,
//! panic, no answer within the verify timeout) refuses the login with [`VERIFY_UNAVAILABLE`]; a
//! notification the full queue cannot take is dropped and counted.
//!
//! [`ServerEvents::on_c2s_before`], [`ServerEvents::on_c2s`], [`ServerEvents::on_c2c_before`]
//! and `on_offline` without the built-in store decide whether a message is ACKed: they still run
//! on the core that owns the session, inside its event loop, and must not block (no disk or
//! network I/O, no locks held for long); hand slow work to another thread through a channel. A
//! shard built without a pool (an embedder's, the tests') runs every hook inline. What a hook
//! wants the server to do (send a message to a user, kick a session) goes through the [`Api`] it
//! is given and is carried out after the hook returns; [`Api::is_online`] answers at once.
//!
//! A hook says which callbacks it implements with [`ServerEvents::interests`]: the shard calls
//! (or posts) only those, so [`AllowAll`] costs nothing on the message path and [`TokenTable`]
//! only a verify per login.

pub mod pool;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use imedge_protocol::message::payload::LoginRequest;
use imedge_protocol::session::Transport;
use imedge_protocol::{Message, UserId};

pub use crate::shard::Presence;

/// What a hook knows about the session it is called for.
#[derive(Debug, Clone, Copy)]
pub struct SessionInfo<'a> {
    /// The session's authenticated uid (for verify: the uid asking to log in).
    pub uid: &'a str,
    /// The transport the session uses.
    pub transport: Transport,
    /// The peer's address.
    pub peer: SocketAddr,
}

/// A C2C or S2C message that could not be delivered in real time (recipient not online).
#[derive(Debug, Clone, Copy)]
pub struct Undelivered<'a> {
    /// Sender uid (`"0"` for S2C).
    pub from: &'a str,
    /// Recipient uid (`None` when the message had no `to`).
    pub to: Option<&'a str>,
    /// Fingerprint, for QoS messages.
    pub fp: Option<&'a str>,
    /// The message exactly as it would have been sent (encoded JSON).
    pub json: &'a [u8],
}

/// Login refusal code when the verify could not be run: the hook pool's queue was full, the hook
/// panicked, or it did not answer within the verify timeout. The first code after the
/// framework's reserved range (SPEC §4.2: applications use ≥ 1025) that [`TokenTable`] does not
/// use: the client may retry later, its credentials were not judged.
pub const VERIFY_UNAVAILABLE: i32 = 1026;

/// Which callbacks of [`ServerEvents`] a hook implements, so that the shard calls or posts only
/// those. A set of bits; combine with `|`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interests(u32);

impl Interests {
    /// None: every callback is the default no-op.
    pub const NONE: Self = Self(0);
    /// [`ServerEvents::verify`].
    pub const VERIFY: Self = Self(1);
    /// [`ServerEvents::on_login`].
    pub const LOGIN: Self = Self(1 << 1);
    /// [`ServerEvents::on_logout`].
    pub const LOGOUT: Self = Self(1 << 2);
    /// [`ServerEvents::on_c2s_before`] and [`ServerEvents::on_c2s`].
    pub const C2S: Self = Self(1 << 3);
    /// [`ServerEvents::on_c2c_before`].
    pub const C2C_BEFORE: Self = Self(1 << 4);
    /// [`ServerEvents::on_c2c_after`].
    pub const C2C_AFTER: Self = Self(1 << 5);
    /// [`ServerEvents::on_offline`].
    pub const OFFLINE: Self = Self(1 << 6);
    /// [`ServerEvents::on_s2c_lost`] and [`ServerEvents::on_s2c_delivered`].
    pub const S2C_OUTCOME: Self = Self(1 << 7);
    /// Every callback (the default: a hook that does not say is called for everything).
    pub const ALL: Self = Self((1 << 8) - 1);

    /// What runs on the hook pool ([`pool::HookPool`]) when the server has one: verify and
    /// the notifications. `C2S` and `C2C_BEFORE` decide a message's ACK and still run inline.
    pub const POOLED: Self = Self(
        Self::VERIFY.0
            | Self::LOGIN.0
            | Self::LOGOUT.0
            | Self::C2C_AFTER.0
            | Self::OFFLINE.0
            | Self::S2C_OUTCOME.0,
    );

    /// Whether any bit of `other` is set.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Interests {
    type Output = Self;
    fn bitor(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

/// The server application's callbacks (SPEC §10). Every method has a no-op default: the
/// defaults behave like the reference's demo (everyone may log in, nothing is stored offline).
pub trait ServerEvents: Send + Sync + 'static {
    /// The callbacks this hook implements; the others are not called. Default: all of them.
    fn interests(&self) -> Interests {
        Interests::ALL
    }
    /// `onUserLoginVerify`: 0 accepts the login, anything else refuses it and is sent to the
    /// client as the `code` (applications use codes ≥ 1025). The token must never be logged.
    /// Runs on a hook worker thread (see the module's contract): it may block, and a panic
    /// refuses the login with [`VERIFY_UNAVAILABLE`].
    fn verify(&self, login: &LoginRequest<'_>, session: SessionInfo<'_>) -> i32 {
        let _ = (login, session);
        0
    }
    /// `onUserLoginSucess`.
    fn on_login(&self, extra: Option<&str>, session: SessionInfo<'_>, api: &mut Api) {
        let _ = (extra, session, api);
    }
    /// `onUserLogout`; `kickout_code` is set when the session ended because it was kicked.
    fn on_logout(&self, session: SessionInfo<'_>, kickout_code: Option<i32>) {
        let _ = (session, kickout_code);
    }
    /// `onTransferMessage4C2SBefore`: false drops the message silently (no ACK).
    fn on_c2s_before(&self, msg: &Message<'_>, session: SessionInfo<'_>) -> bool {
        let _ = (msg, session);
        true
    }
    /// `onTransferMessage4C2S`: a (de-duplicated) message for the server application.
    fn on_c2s(&self, msg: &Message<'_>, session: SessionInfo<'_>, api: &mut Api) {
        let _ = (msg, session, api);
    }
    /// `onTransferMessage4C2CBefore`: false drops the message silently (no ACK).
    fn on_c2c_before(&self, msg: &Message<'_>, session: SessionInfo<'_>) -> bool {
        let _ = (msg, session);
        true
    }
    /// `onTransferMessage4C2C`: the message was written to the recipient's session.
    fn on_c2c_after(&self, from: &str, to: &str, fp: Option<&str>) {
        let _ = (from, to, fp);
    }
    /// `onTransferMessage_RealTimeSendFaild`: the recipient is not online. With the built-in
    /// offline store (the default of the `imedge` binary) the message is stored durably whatever
    /// this returns, and this is only a notification. Without it, return true if the
    /// application stored the message (the sender then gets its ACK); the default stores nothing.
    fn on_offline(&self, msg: Undelivered<'_>) -> bool {
        let _ = msg;
        false
    }
    /// `messagesLost`: a server-sent QoS message was not acknowledged after its resend.
    fn on_s2c_lost(&self, to: &str, fp: &str, json: &[u8]) {
        let _ = (to, fp, json);
    }
    /// `messagesBeReceived`: the recipient acknowledged a server-sent QoS message.
    fn on_s2c_delivered(&self, to: &str, fp: &str) {
        let _ = (to, fp);
    }
}

/// What a hook may ask the server to do (carried out after the hook returns), and who is online.
#[derive(Debug)]
pub struct Api {
    pub(crate) commands: Vec<Command>,
    presence: Arc<Presence>,
}

/// A request made through [`Api`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send application data from the server (S2C) to a user.
    Send {
        /// Recipient.
        to: UserId<'static>,
        /// `dataContent`.
        text: String,
        /// `typeu`.
        typeu: i32,
        /// With QoS (a fingerprint is generated and the message is resent until ACKed).
        qos: bool,
    },
    /// Kick the user's current session with a kickout message (SPEC §4.5).
    Kick {
        /// Whose session.
        uid: UserId<'static>,
        /// Kickout code (2 = by the application).
        code: i32,
        /// Optional reason.
        reason: Option<String>,
    },
}

impl Api {
    /// An API that sees the online users in `presence`.
    pub(crate) fn new(presence: Arc<Presence>) -> Self {
        Self {
            commands: Vec::new(),
            presence,
        }
    }

    /// Whether `uid` is logged in, on any core, answered at once (see [`Presence`]: exact for
    /// users of the hook's own core, as of their last login or logout for the others).
    pub fn is_online(&self, uid: &str) -> bool {
        self.presence.is_online(uid)
    }

    /// Sends `text` from the server to `to` (S2C, SPEC §7.3).
    pub fn send(&mut self, to: &str, text: impl Into<String>, typeu: i32, qos: bool) {
        self.commands.push(Command::Send {
            to: UserId::from(to.to_owned()),
            text: text.into(),
            typeu,
            qos,
        });
    }

    /// Kicks the current session of `uid` with `code` and an optional reason.
    pub fn kick(&mut self, uid: &str, code: i32, reason: Option<&str>) {
        self.commands.push(Command::Kick {
            uid: UserId::from(uid.to_owned()),
            code,
            reason: reason.map(str::to_owned),
        });
    }
}

/// The default application: everyone may log in, nothing is stored offline (the reference demo).
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl ServerEvents for AllowAll {
    fn interests(&self) -> Interests {
        Interests::NONE
    }
}

/// Refusal code of [`TokenTable`] for an unknown uid or a wrong token.
pub const TOKEN_REFUSED: i32 = 1025;

/// A verifier that accepts a login only with the token listed for its uid.
///
/// File format: one `uid token` pair per line, separated by white space; blank lines and lines
/// starting with `#` are ignored.
#[derive(Clone, Default)]
pub struct TokenTable {
    tokens: HashMap<String, String>,
}

impl fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens are secrets: only say how many there are.
        f.debug_struct("TokenTable")
            .field("users", &self.tokens.len())
            .finish()
    }
}

impl TokenTable {
    /// Parses the table from text (see the type's docs for the format).
    ///
    /// # Errors
    /// A line with a uid but no token, naming its line number (never its content).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(uid), Some(token), None) => {
                    tokens.insert(uid.to_owned(), token.to_owned());
                }
                _ => return Err(format!("line {}: expected `uid token`", n + 1)),
            }
        }
        Ok(Self { tokens })
    }

    /// Reads the table from a file.
    ///
    /// # Errors
    /// The file cannot be read or has a malformed line.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Number of users in the table.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

impl ServerEvents for TokenTable {
    fn interests(&self) -> Interests {
        Interests::VERIFY
    }

    fn verify(&self, login: &LoginRequest<'_>, _session: SessionInfo<'_>) -> i32 {
        match (
            self.tokens.get(login.user_id.as_str()),
            login.token.as_deref(),
        ) {
            (Some(expected), Some(given)) if constant_time_eq(expected, given) => 0,
            _ => TOKEN_REFUSED,
        }
    }
}

/// Compares two secrets in a time that depends only on their lengths, not on where they first
/// differ (a byte-by-byte `==` stops early, which lets a client guess a token a byte at a time
/// by timing the refusals).
fn constant_time_eq(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold back into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn login(uid: &str, token: Option<&str>) -> LoginRequest<'static> {
        LoginRequest {
            user_id: UserId::from(uid.to_owned()),
            token: token.map(|t| Cow::Owned(t.to_owned())),
            extra: None,
            first_login_time: 0,
        }
    }

    #[test]
    fn token_table_verifies() {
        let table = TokenTable::parse("# users\nalice s3cret\n\n  bob   tok \n").unwrap();
        assert_eq!(table.len(), 2);
        let info = SessionInfo {
            uid: "alice",
            transport: Transport::Tcp,
            peer: "127.0.0.1:1".parse().unwrap(),
        };
        assert_eq!(table.verify(&login("alice", Some("s3cret")), info), 0);
        assert_eq!(
            table.verify(&login("alice", Some("nope")), info),
            TOKEN_REFUSED
        );
        assert_eq!(table.verify(&login("alice", None), info), TOKEN_REFUSED);
        assert_eq!(
            table.verify(&login("carol", Some("s3cret")), info),
            TOKEN_REFUSED
        );
        assert_eq!(table.verify(&login("bob", Some("tok")), info), 0);
        assert!(!format!("{table:?}").contains("s3cret"));
        assert!(TokenTable::parse("alice").is_err());
        assert!(TokenTable::parse("alice a b").is_err());
        assert_eq!(table.interests(), Interests::VERIFY);
        assert_eq!(AllowAll.interests(), Interests::NONE);
    }

    #[test]
    fn constant_time_eq_compares_whole_secrets() {
        assert!(constant_time_eq("s3cret", "s3cret"));
        assert!(!constant_time_eq("s3cret", "s3creT"));
        assert!(!constant_time_eq("s3cret", "s3cre"));
        assert!(!constant_time_eq("", "x"));
        assert!(constant_time_eq("", ""));
    }

    #[test]
    fn interests_combine() {
        let set = Interests::VERIFY | Interests::LOGOUT;
        assert!(set.contains(Interests::VERIFY));
        assert!(!set.contains(Interests::LOGIN));
        assert!(Interests::ALL.contains(set));
        assert!(Interests::ALL.contains(Interests::S2C_OUTCOME));
        assert!(!Interests::NONE.contains(Interests::VERIFY));
    }
}
