//! Message bodies ↔ [`crate::Message`]: decoding with simd-json in place, encoding as Gson does.

mod decode;
mod encode;
mod escape;

pub use decode::{Decoder, MAX_DEPTH, PADDING};

/// A field of the envelope or of a `dataContent` document, named in decode errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `bridge`
    Bridge,
    /// `type`
    Type,
    /// `dataContent`
    DataContent,
    /// `from`
    From,
    /// `to`
    To,
    /// `fp`
    Fp,
    /// `QoS`
    Qos,
    /// `typeu`
    Typeu,
    /// `sm`
    Sm,
    /// `loginUserId`
    LoginUserId,
    /// `loginToken`
    LoginToken,
    /// `extra`
    Extra,
    /// `firstLoginTime`
    FirstLoginTime,
    /// `code` / `errorCode`
    Code,
    /// `reason` / `errorMsg`
    Reason,
}

/// Why a body is not a message. Small and `Copy`: errors a peer can cause are cheap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A zero-length body (the reference closes the session).
    #[error("empty message body")]
    Empty,
    /// Not well-formed JSON.
    #[error("invalid JSON")]
    InvalidJson,
    /// The body is not valid UTF-8.
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("JSON nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// Valid JSON, but not an object.
    #[error("message is not a JSON object")]
    NotAnObject,
    /// A required key is absent or null.
    #[error("missing {0:?}")]
    Missing(Field),
    /// A key's value has a type that cannot be coerced to the field's.
    #[error("{0:?} has the wrong type")]
    WrongType(Field),
    /// [`Decoder::decode_padded`] was given less than [`PADDING`] bytes after the body
    /// (a caller bug, not a peer error).
    #[error("receive buffer lacks read-ahead padding")]
    InsufficientPadding,
}
