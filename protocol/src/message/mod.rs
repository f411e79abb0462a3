//! The message envelope ("Protocal" in the reference) and what it carries (SPEC §2–§4).

mod id;
mod kind;
pub mod payload;

use std::borrow::Cow;

pub use id::{Fingerprint, UserId};
pub use kind::Kind;

use payload::{ErrorResponse, Kickout, LoginRequest, LoginResponse};

/// `typeu` and `sm` when the sender does not set them (SPEC §2).
pub const UNSET: i64 = -1;

/// The `dataContent` of keep-alive and keep-alive response messages.
pub const EMPTY_DOCUMENT: &str = "{}";

/// Longest user id accepted, in bytes. The reference has no limit; ids are account names or
/// numbers chosen by the application, far below this, and every QoS and session table keeps
/// them, so an unbounded id would let one client make the server hold arbitrary strings.
pub const MAX_USER_ID_LEN: usize = 128;

/// Longest fingerprint accepted, in bytes. The Java SDK sends 36-byte UUIDs (SPEC §8.2) and
/// imedge's own are shorter; 64 leaves room for other clients' formats.
pub const MAX_FINGERPRINT_LEN: usize = 64;

/// An id of a message is longer than its limit ([`Message::check_id_lengths`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdTooLong {
    /// `from` or `to` (or a login's `loginUserId`) is longer than [`MAX_USER_ID_LEN`].
    #[error("user id of {len} bytes (at most {MAX_USER_ID_LEN})")]
    UserId {
        /// Its length in bytes.
        len: usize,
    },
    /// `fp` is longer than [`MAX_FINGERPRINT_LEN`].
    #[error("fingerprint of {len} bytes (at most {MAX_FINGERPRINT_LEN})")]
    Fingerprint {
        /// Its length in bytes.
        len: usize,
    },
}

/// Checks a user id against [`MAX_USER_ID_LEN`].
///
/// # Errors
/// [`IdTooLong::UserId`] when it is longer.
pub fn check_user_id(uid: &str) -> Result<(), IdTooLong> {
    if uid.len() > MAX_USER_ID_LEN {
        return Err(IdTooLong::UserId { len: uid.len() });
    }
    Ok(())
}

/// One message, in any direction, on any transport (SPEC §2).
///
/// Decoded messages borrow their strings from the receive buffer; messages built by imedge may
/// carry a structured [`Content`] document that is encoded straight to the wire without an
/// intermediate string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    /// `bridge`: the message crossed the MQ bridge (SPEC §11).
    pub bridge: bool,
    /// `type`.
    pub kind: Kind,
    /// `dataContent`; `None` is omitted on the wire (null).
    pub content: Option<Content<'a>>,
    /// `from`; `None` when the key was absent (Gson leaves the field null).
    pub from: Option<UserId<'a>>,
    /// `to`; `None` when the key was absent.
    pub to: Option<UserId<'a>>,
    /// `fp`: set on QoS messages.
    pub fp: Option<Fingerprint<'a>>,
    /// `QoS`: the sender wants an acknowledgement.
    pub qos: bool,
    /// `typeu`: application sub-type, never interpreted by the framework.
    pub typeu: i32,
    /// `sm`: server timestamp in epoch milliseconds, or `-1`.
    pub sm: i64,
}

/// The `dataContent` of a message.
///
/// Decoding always yields [`Content::Text`]; the structured variants exist so that imedge can
/// build framework messages whose content is a JSON document encoded *as a string* (SPEC §4) and
/// write them in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content<'a> {
    /// Opaque text: application payload, a fingerprint (ACK), or a document as received.
    Text(Cow<'a, str>),
    /// A login request document (type 0). Boxed, like the other rare documents, to keep every
    /// message — most of which are data — small.
    Login(Box<LoginRequest<'a>>),
    /// A login response document (type 50).
    LoginResponse(LoginResponse),
    /// An error document (type 52).
    Error(Box<ErrorResponse<'a>>),
    /// A kickout document (type 54).
    Kickout(Box<Kickout<'a>>),
}

impl<'a> Content<'a> {
    /// The text, if this content is plain text (always the case for decoded messages).
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Self::Text(text) => Some(text),
            _ => None,
        }
    }

    /// Detaches the content from the buffer it borrows from.
    pub fn into_owned(self) -> Content<'static> {
        match self {
            Self::Text(text) => Content::Text(Cow::Owned(text.into_owned())),
            Self::Login(doc) => Content::Login(Box::new(doc.into_owned())),
            Self::LoginResponse(doc) => Content::LoginResponse(doc),
            Self::Error(doc) => Content::Error(Box::new(doc.into_owned())),
            Self::Kickout(doc) => Content::Kickout(Box::new(doc.into_owned())),
        }
    }
}

impl<'a> From<&'a str> for Content<'a> {
    fn from(text: &'a str) -> Self {
        Self::Text(Cow::Borrowed(text))
    }
}

impl From<String> for Content<'static> {
    fn from(text: String) -> Self {
        Self::Text(Cow::Owned(text))
    }
}

impl<'a> Message<'a> {
    /// A message of `kind` with every other field at the value a sender leaves unset (SPEC §2):
    /// `from`/`to` `"-1"`, `typeu`/`sm` `-1`, no content, no fingerprint, no QoS.
    pub fn new(kind: Kind) -> Self {
        Self {
            bridge: false,
            kind,
            content: None,
            from: Some(UserId::UNKNOWN),
            to: Some(UserId::UNKNOWN),
            fp: None,
            qos: false,
            typeu: UNSET as i32,
            sm: UNSET,
        }
    }

    /// Type 0, as the SDK sends it: `from` = the uid, `to` = `"0"` (SPEC §4.1).
    pub fn login(request: LoginRequest<'a>) -> Self {
        let from = request.user_id.clone();
        Self::new(Kind::Login)
            .from(from)
            .to(UserId::SERVER)
            .content(Content::Login(Box::new(request)))
    }

    /// Type 1 from `uid` (SPEC §6.1).
    pub fn keep_alive(uid: UserId<'a>) -> Self {
        Self::new(Kind::KeepAlive)
            .from(uid)
            .to(UserId::SERVER)
            .content(EMPTY_DOCUMENT)
    }

    /// Type 3 from `uid`; no content (SPEC §5.4).
    pub fn logout(uid: UserId<'a>) -> Self {
        Self::new(Kind::Logout).from(uid).to(UserId::SERVER)
    }

    /// Type 2 application data. With a fingerprint the message asks for QoS.
    pub fn data(
        from: UserId<'a>,
        to: UserId<'a>,
        text: impl Into<Cow<'a, str>>,
        fp: Option<Fingerprint<'a>>,
    ) -> Self {
        let qos = fp.is_some();
        Self {
            fp,
            qos,
            ..Self::new(Kind::CommonData)
                .from(from)
                .to(to)
                .content(Content::Text(text.into()))
        }
    }

    /// Type 4 acknowledging `fp` (SPEC §8.2); `bridge` is copied from the acknowledged message.
    pub fn ack(from: UserId<'a>, to: UserId<'a>, fp: Fingerprint<'a>, bridge: bool) -> Self {
        let text = fp.into_inner();
        Self {
            bridge,
            ..Self::new(Kind::Ack)
                .from(from)
                .to(to)
                .content(Content::Text(text))
        }
    }

    /// The ACK a receiver returns for this QoS message: `from` = its `to`, `to` = its `from`,
    /// `bridge` copied (SPEC §8.2). `None` if the message has no fingerprint.
    pub fn ack_reply(&self) -> Option<Message<'_>> {
        let fp = self.fp.as_ref()?.borrowed();
        let from = self.to.as_ref().map_or(UserId::UNKNOWN, UserId::borrowed);
        let to = self.from.as_ref().map_or(UserId::UNKNOWN, UserId::borrowed);
        Some(Message::ack(from, to, fp, self.bridge))
    }

    /// Type 50 for `uid`: success carries `to` = uid, a refusal `to` = `"-1"` (SPEC §4.2).
    pub fn login_response(uid: UserId<'a>, response: LoginResponse) -> Self {
        let to = if response.code == 0 {
            uid
        } else {
            UserId::UNKNOWN
        };
        Self::new(Kind::LoginResponse)
            .from(UserId::SERVER)
            .to(to)
            .content(Content::LoginResponse(response))
    }

    /// Type 51 to `uid` (SPEC §6.1).
    pub fn keep_alive_response(uid: UserId<'a>) -> Self {
        Self::new(Kind::KeepAliveResponse)
            .from(UserId::SERVER)
            .to(uid)
            .content(EMPTY_DOCUMENT)
    }

    /// Type 52: `from "0"`, `to "-1"` (SPEC §4.4).
    pub fn error(response: ErrorResponse<'a>) -> Self {
        Self::new(Kind::Error)
            .from(UserId::SERVER)
            .content(Content::Error(Box::new(response)))
    }

    /// Type 54 to `uid` (SPEC §4.5).
    pub fn kickout(uid: UserId<'a>, kickout: Kickout<'a>) -> Self {
        Self::new(Kind::Kickout)
            .from(UserId::SERVER)
            .to(uid)
            .content(Content::Kickout(Box::new(kickout)))
    }

    /// The reply to an echo request: the same message with type 53 (SPEC §4.7).
    pub fn echo_response(mut self) -> Self {
        self.kind = Kind::EchoResponse;
        self
    }

    /// Sets `from`.
    pub fn from(mut self, from: UserId<'a>) -> Self {
        self.from = Some(from);
        self
    }

    /// Sets `to`.
    pub fn to(mut self, to: UserId<'a>) -> Self {
        self.to = Some(to);
        self
    }

    /// Sets `dataContent`.
    pub fn content(mut self, content: impl Into<Content<'a>>) -> Self {
        self.content = Some(content.into());
        self
    }

    /// Sets `sm` (server timestamps on, SPEC §2).
    pub fn sm(mut self, sm: i64) -> Self {
        self.sm = sm;
        self
    }

    /// The text of `dataContent`, if it is text.
    pub fn text(&self) -> Option<&str> {
        self.content.as_ref().and_then(Content::as_text)
    }

    /// Whether this is application data addressed to the server (C2S, SPEC §7.1).
    pub fn is_c2s(&self) -> bool {
        self.kind == Kind::CommonData && self.to.as_ref().is_some_and(UserId::is_server)
    }

    /// Checks `from`, `to` and `fp` against [`MAX_USER_ID_LEN`] and [`MAX_FINGERPRINT_LEN`]. A
    /// cheap pass over three lengths, run before a message touches any table.
    ///
    /// # Errors
    /// The first id found too long.
    pub fn check_id_lengths(&self) -> Result<(), IdTooLong> {
        for uid in [&self.from, &self.to].into_iter().flatten() {
            check_user_id(uid.as_str())?;
        }
        if let Some(fp) = &self.fp {
            if fp.as_str().len() > MAX_FINGERPRINT_LEN {
                return Err(IdTooLong::Fingerprint {
                    len: fp.as_str().len(),
                });
            }
        }
        Ok(())
    }

    /// Detaches the message from the buffer it borrows from.
    pub fn into_owned(self) -> Message<'static> {
        Message {
            bridge: self.bridge,
            kind: self.kind,
            content: self.content.map(Content::into_owned),
            from: self.from.map(UserId::into_owned),
            to: self.to.map(UserId::into_owned),
            fp: self.fp.map(Fingerprint::into_owned),
            qos: self.qos,
            typeu: self.typeu,
            sm: self.sm,
        }
    }
}

impl<'a> From<LoginRequest<'a>> for Content<'a> {
    fn from(doc: LoginRequest<'a>) -> Self {
        Self::Login(Box::new(doc))
    }
}

impl From<LoginResponse> for Content<'static> {
    fn from(doc: LoginResponse) -> Self {
        Self::LoginResponse(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_lengths_are_checked_at_their_limits() {
        let uid = |n: usize| UserId::from("u".repeat(n));
        let fp = |n: usize| Some(Fingerprint::from("f".repeat(n)));
        let ok = Message::data(uid(MAX_USER_ID_LEN), uid(MAX_USER_ID_LEN), "x", fp(64));
        assert_eq!(ok.check_id_lengths(), Ok(()));
        let long_from = Message::data(uid(129), uid(1), "x", None);
        assert_eq!(
            long_from.check_id_lengths(),
            Err(IdTooLong::UserId { len: 129 })
        );
        let long_to = Message::data(uid(1), uid(500), "x", None);
        assert_eq!(
            long_to.check_id_lengths(),
            Err(IdTooLong::UserId { len: 500 })
        );
        let long_fp = Message::data(uid(1), uid(1), "x", fp(MAX_FINGERPRINT_LEN + 1));
        assert_eq!(
            long_fp.check_id_lengths(),
            Err(IdTooLong::Fingerprint { len: 65 })
        );
        // The Java SDK's UUIDs fit.
        let uuid = Some(Fingerprint::from("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert_eq!(
            Message::data(uid(8), uid(8), "x", uuid).check_id_lengths(),
            Ok(())
        );
        assert_eq!(
            check_user_id(&"u".repeat(129)),
            Err(IdTooLong::UserId { len: 129 })
        );
    }
}
