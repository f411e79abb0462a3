//! Bytes → [`Message`] with simd-json, in place on the receive buffer (SPEC §2.2).
//!
//! simd-json unescapes strings inside the buffer it is given, so every string of the decoded
//! message borrows from the receive buffer: no copy of the body, no DOM. The envelope is read
//! off simd-json's tape in one pass; values of unknown keys are skipped by their node count.
//!
//! Leniency follows the reference's Gson: numbers and booleans given as strings are accepted,
//! unknown keys ignored, a missing key takes the JVM default (`typeu`/`sm` 0, strings null),
//! the last of duplicate keys wins. Two deliberate differences: a message without `type` is an
//! error rather than a login (hazard S9), and Gson's lenient *syntax* (unquoted keys, single
//! quotes, comments) is not accepted — no MobileIMSDK client produces it.

use std::borrow::Cow;

use simd_json::{Buffers, ErrorType, Node, StaticNode, Tape};

use super::DecodeError;
use super::Field;
use crate::message::payload::{ErrorResponse, Kickout, LoginRequest, LoginResponse};
use crate::message::{Content, Fingerprint, Kind, Message, UserId};

/// Deepest JSON nesting accepted. The envelope and its documents are flat objects (depth 1);
/// unknown keys may hold small structures from future clients. A hard cap keeps a "JSON bomb"
/// (`[[[[…`) from costing stack or memory beyond the frame limit.
pub const MAX_DEPTH: usize = 16;

/// Bytes of padding [`Decoder::decode_padded`] needs after the body.
pub const PADDING: usize = simd_json::INPUT_PADDING;

/// Reusable parser state: simd-json's scratch buffers and tape, kept between messages so that
/// decoding allocates nothing once warm. One per event loop.
pub struct Decoder {
    buffers: Buffers,
    /// Empty between calls; its allocation is reused with a fresh lifetime on every decode.
    tape: Tape<'static>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder sized for typical messages; buffers grow on demand.
    pub fn new() -> Self {
        Self {
            buffers: Buffers::with_max_depth(1024, MAX_DEPTH),
            tape: Tape(Vec::new()),
        }
    }

    /// Decodes one message from `body` (exactly the JSON text), unescaping it in place.
    ///
    /// simd-json copies the body into its own padded buffer for SIMD scanning; use
    /// [`Self::decode_padded`] when the receive buffer has [`PADDING`] bytes after the body.
    pub fn decode<'a>(&mut self, body: &'a mut [u8]) -> Result<Message<'a>, DecodeError> {
        if body.is_empty() {
            return Err(DecodeError::Empty);
        }
        let mut tape = std::mem::replace(&mut self.tape, Tape(Vec::new())).reset::<'a>();
        let result = simd_json::fill_tape(body, &mut self.buffers, &mut tape)
            .map_err(|e| json_error(e.error()))
            .and_then(|()| envelope(&tape.0));
        self.tape = tape.reset();
        result
    }

    /// Decodes the message in `buf[..len]`, using `buf[len..]` (at least [`PADDING`] bytes, any
    /// content, left unchanged) as simd-json's read-ahead: the body is not copied at all.
    pub fn decode_padded<'a>(
        &mut self,
        buf: &'a mut [u8],
        len: usize,
    ) -> Result<Message<'a>, DecodeError> {
        if len == 0 {
            return Err(DecodeError::Empty);
        }
        if buf.len().saturating_sub(len) < PADDING {
            return Err(DecodeError::InsufficientPadding);
        }
        let mut tape = std::mem::replace(&mut self.tape, Tape(Vec::new())).reset::<'a>();
        let result = simd_json::fill_tape_padded(buf, len, &mut self.buffers, &mut tape)
            .map_err(|e| json_error(e.error()))
            .and_then(|()| envelope(&tape.0));
        self.tape = tape.reset();
        result
    }

    /// Parses a document carried in `dataContent` (copied: documents are small and rare).
    fn document<T>(
        &mut self,
        text: &str,
        read: impl FnOnce(&[Node<'_>]) -> Result<T, DecodeError>,
    ) -> Result<T, DecodeError> {
        if text.is_empty() {
            return Err(DecodeError::Empty);
        }
        let mut copy = text.as_bytes().to_vec();
        let mut tape = std::mem::replace(&mut self.tape, Tape(Vec::new())).reset();
        let result = simd_json::fill_tape(&mut copy, &mut self.buffers, &mut tape)
            .map_err(|e| json_error(e.error()))
            .and_then(|()| read(&tape.0));
        self.tape = tape.reset();
        result
    }

    /// Parses a type-0 `dataContent` (SPEC §4.1). A missing or null `loginUserId` is an error:
    /// the reference closes the session without a reply (SPEC §5.1 step 1).
    pub fn login_request(&mut self, text: &str) -> Result<LoginRequest<'static>, DecodeError> {
        self.document(text, |nodes| {
            let mut doc = LoginRequest {
                user_id: UserId::new(""),
                token: None,
                extra: None,
                first_login_time: 0,
            };
            let mut user_id = None;
            for_each_field(nodes, |key, value| {
                match key {
                    "loginUserId" => user_id = string(value, Field::LoginUserId)?,
                    "loginToken" => doc.token = string(value, Field::LoginToken)?,
                    "extra" => doc.extra = string(value, Field::Extra)?,
                    "firstLoginTime" => {
                        doc.first_login_time =
                            long(value, Field::FirstLoginTime)?.unwrap_or(doc.first_login_time)
                    }
                    _ => {}
                }
                Ok(())
            })?;
            doc.user_id = UserId::new(user_id.ok_or(DecodeError::Missing(Field::LoginUserId))?);
            Ok(doc.into_owned())
        })
    }

    /// Parses a type-50 `dataContent` (SPEC §4.2).
    pub fn login_response(&mut self, text: &str) -> Result<LoginResponse, DecodeError> {
        self.document(text, |nodes| {
            let mut doc = LoginResponse {
                code: 0,
                first_login_time: 0,
            };
            for_each_field(nodes, |key, value| {
                match key {
                    "code" => doc.code = int(value, Field::Code)?.unwrap_or(doc.code),
                    "firstLoginTime" => {
                        doc.first_login_time =
                            long(value, Field::FirstLoginTime)?.unwrap_or(doc.first_login_time)
                    }
                    _ => {}
                }
                Ok(())
            })?;
            Ok(doc)
        })
    }

    /// Parses a type-52 `dataContent` (SPEC §4.4).
    pub fn error_response(&mut self, text: &str) -> Result<ErrorResponse<'static>, DecodeError> {
        self.document(text, |nodes| {
            let mut doc = ErrorResponse {
                code: 0,
                message: None,
            };
            for_each_field(nodes, |key, value| {
                match key {
                    "errorCode" => doc.code = int(value, Field::Code)?.unwrap_or(doc.code),
                    "errorMsg" => doc.message = string(value, Field::Reason)?,
                    _ => {}
                }
                Ok(())
            })?;
            Ok(doc.into_owned())
        })
    }

    /// Parses a type-54 `dataContent` (SPEC §4.5).
    pub fn kickout(&mut self, text: &str) -> Result<Kickout<'static>, DecodeError> {
        self.document(text, |nodes| {
            let mut doc = Kickout {
                code: 0,
                reason: None,
            };
            for_each_field(nodes, |key, value| {
                match key {
                    "code" => doc.code = int(value, Field::Code)?.unwrap_or(doc.code),
                    "reason" => doc.reason = string(value, Field::Reason)?,
                    _ => {}
                }
                Ok(())
            })?;
            Ok(doc.into_owned())
        })
    }
}

fn json_error(kind: &ErrorType) -> DecodeError {
    match kind {
        ErrorType::DepthLimitExceeded => DecodeError::TooDeep,
        ErrorType::InvalidUtf8 => DecodeError::InvalidUtf8,
        _ => DecodeError::InvalidJson,
    }
}

/// Reads the envelope from the tape of a parsed body.
fn envelope<'a>(nodes: &[Node<'a>]) -> Result<Message<'a>, DecodeError> {
    // Defaults of a Gson-built object whose key is missing (SPEC §2.2), except `type`.
    let mut msg = Message {
        bridge: false,
        kind: Kind::Login,
        content: None,
        from: None,
        to: None,
        fp: None,
        qos: false,
        typeu: 0,
        sm: 0,
    };
    let mut kind = None;
    for_each_field(nodes, |key, value| {
        match key {
            "bridge" => msg.bridge = boolean(value, Field::Bridge)?.unwrap_or(msg.bridge),
            "type" => kind = int(value, Field::Type)?.map(Kind::from_code).or(kind),
            "dataContent" => msg.content = string(value, Field::DataContent)?.map(Content::Text),
            "from" => msg.from = string(value, Field::From)?.map(UserId::new),
            "to" => msg.to = string(value, Field::To)?.map(UserId::new),
            "fp" => msg.fp = string(value, Field::Fp)?.map(Fingerprint::new),
            "QoS" => msg.qos = boolean(value, Field::Qos)?.unwrap_or(msg.qos),
            "typeu" => msg.typeu = int(value, Field::Typeu)?.unwrap_or(msg.typeu),
            "sm" => msg.sm = long(value, Field::Sm)?.unwrap_or(msg.sm),
            _ => {}
        }
        Ok(())
    })?;
    msg.kind = kind.ok_or(DecodeError::Missing(Field::Type))?;
    Ok(msg)
}

/// Calls `f(key, value)` for every member of the root object on the tape.
fn for_each_field<'a>(
    nodes: &[Node<'a>],
    mut f: impl FnMut(&'a str, &Node<'a>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let Some(Node::Object { len, .. }) = nodes.first() else {
        return Err(DecodeError::NotAnObject);
    };
    let mut at = 1;
    for _ in 0..*len {
        let (Some(Node::String(key)), Some(value)) = (nodes.get(at), nodes.get(at + 1)) else {
            return Err(DecodeError::InvalidJson);
        };
        f(key, value)?;
        // Skip the value, including everything nested in it.
        at += 2 + match value {
            Node::Object { count, .. } | Node::Array { count, .. } => *count,
            _ => 0,
        };
    }
    Ok(())
}

/// A string field; Gson also takes numbers and booleans as their text. `Ok(None)` = null.
fn string<'a>(value: &Node<'a>, field: Field) -> Result<Option<Cow<'a, str>>, DecodeError> {
    Ok(Some(match value {
        Node::String(s) => Cow::Borrowed(*s),
        Node::Static(StaticNode::Null) => return Ok(None),
        Node::Static(StaticNode::Bool(b)) => Cow::Borrowed(if *b { "true" } else { "false" }),
        Node::Static(StaticNode::I64(n)) => Cow::Owned(itoa::Buffer::new().format(*n).to_owned()),
        Node::Static(StaticNode::U64(n)) => Cow::Owned(itoa::Buffer::new().format(*n).to_owned()),
        // A float's original spelling is gone after parsing; no client sends one as an id.
        _ => return Err(DecodeError::WrongType(field)),
    }))
}

/// A boolean field; Gson also takes the strings "true"/"false" (any case). `Ok(None)` = null.
fn boolean(value: &Node<'_>, field: Field) -> Result<Option<bool>, DecodeError> {
    match value {
        Node::Static(StaticNode::Bool(b)) => Ok(Some(*b)),
        Node::Static(StaticNode::Null) => Ok(None),
        Node::String(s) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Node::String(s) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        _ => Err(DecodeError::WrongType(field)),
    }
}

/// A 64-bit integer field; Gson also takes integral floats and numeric strings. `Ok(None)` = null.
fn long(value: &Node<'_>, field: Field) -> Result<Option<i64>, DecodeError> {
    let wrong = DecodeError::WrongType(field);
    match value {
        Node::Static(StaticNode::I64(n)) => Ok(Some(*n)),
        Node::Static(StaticNode::U64(n)) => i64::try_from(*n).map(Some).map_err(|_| wrong),
        Node::Static(StaticNode::F64(f)) => integral(*f).map(Some).ok_or(wrong),
        Node::Static(StaticNode::Null) => Ok(None),
        Node::String(s) => match s.trim().parse::<i64>() {
            Ok(n) => Ok(Some(n)),
            Err(_) => s
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(integral)
                .map(Some)
                .ok_or(wrong),
        },
        _ => Err(wrong),
    }
}

/// A 32-bit integer field (see [`long`]).
fn int(value: &Node<'_>, field: Field) -> Result<Option<i32>, DecodeError> {
    match long(value, field)? {
        Some(n) => i32::try_from(n)
            .map(Some)
            .map_err(|_| DecodeError::WrongType(field)),
        None => Ok(None),
    }
}

/// `f` as an integer if it has no fractional part and fits (Gson's `nextLong` rule).
fn integral(f: f64) -> Option<i64> {
    // i64::MAX as f64 rounds up to 2^63, which does not fit; the range test excludes it.
    let in_range = f >= -(2f64.powi(63)) && f < 2f64.powi(63);
    #[allow(clippy::cast_possible_truncation)]
    (in_range && f.fract() == 0.0).then_some(f as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str) -> Result<Message<'static>, DecodeError> {
        let mut body = text.as_bytes().to_vec();
        Decoder::new().decode(&mut body).map(Message::into_owned)
    }

    #[test]
    fn decodes_the_spec_login() {
        let msg = decode(r#"{"bridge":false,"type":0,"dataContent":"{\"loginUserId\":\"alice\",\"loginToken\":\"tokenA\",\"firstLoginTime\":0}","from":"alice","to":"0","QoS":false,"typeu":-1,"sm":-1}"#).unwrap();
        assert_eq!(msg.kind, Kind::Login);
        assert_eq!(msg.from.as_ref().unwrap(), "alice");
        assert_eq!(msg.typeu, -1);
        let login = Decoder::new().login_request(msg.text().unwrap()).unwrap();
        assert_eq!(login.user_id, "alice");
        assert_eq!(login.token.as_deref(), Some("tokenA"));
        assert_eq!(login.extra, None);
    }

    #[test]
    fn lenient_like_gson() {
        let msg = decode(r#"{"type":"2","QoS":"TRUE","typeu":7.0,"sm":"12","to":42,"from":true,"x":{"a":[1,{"b":2}]},"fp":"f","bridge":null}"#).unwrap();
        assert_eq!(msg.kind, Kind::CommonData);
        assert!(msg.qos);
        assert_eq!(msg.typeu, 7);
        assert_eq!(msg.sm, 12);
        assert_eq!(msg.to.as_ref().unwrap(), "42");
        assert_eq!(msg.from.as_ref().unwrap(), "true");
        assert_eq!(msg.fp.as_ref().unwrap(), "f");
        assert!(!msg.bridge);
    }

    #[test]
    fn missing_keys_take_jvm_defaults() {
        let msg = decode(r#"{"type":2}"#).unwrap();
        assert_eq!((msg.typeu, msg.sm, msg.qos), (0, 0, false));
        assert_eq!((msg.from, msg.to, msg.content), (None, None, None));
        assert_eq!(decode(r#"{"type":1,"type":5}"#).unwrap().kind, Kind::Echo);
    }

    #[test]
    fn errors_are_typed() {
        assert_eq!(decode(""), Err(DecodeError::Empty));
        assert_eq!(
            decode(r#"{"from":"a"}"#),
            Err(DecodeError::Missing(Field::Type))
        );
        assert_eq!(decode(r#"[1,2]"#), Err(DecodeError::NotAnObject));
        assert_eq!(decode(r#""x""#), Err(DecodeError::NotAnObject));
        assert_eq!(decode(r#"{"type":2"#), Err(DecodeError::InvalidJson));
        assert_eq!(
            decode(r#"{"type":"two"}"#),
            Err(DecodeError::WrongType(Field::Type))
        );
        assert_eq!(
            decode(r#"{"type":4294967296}"#),
            Err(DecodeError::WrongType(Field::Type))
        );
        assert_eq!(
            decode(r#"{"type":1.5}"#),
            Err(DecodeError::WrongType(Field::Type))
        );
        assert_eq!(
            decode(r#"{"type":2,"QoS":1}"#),
            Err(DecodeError::WrongType(Field::Qos))
        );
        assert_eq!(
            decode(r#"{"type":2,"to":{}}"#),
            Err(DecodeError::WrongType(Field::To))
        );
        assert_eq!(
            decode(r#"{"type":2,"to":1.5}"#),
            Err(DecodeError::WrongType(Field::To))
        );
        let mut bad = br#"{"type":2,"to":"\xff"}"#.to_vec();
        bad.splice(16..20, [0xff]);
        assert_eq!(
            Decoder::new().decode(&mut bad).err(),
            Some(DecodeError::InvalidUtf8)
        );
        let bomb = format!(
            "{{\"type\":2,\"x\":{}{}}}",
            "[".repeat(20_000),
            "]".repeat(20_000)
        );
        assert_eq!(decode(&bomb), Err(DecodeError::TooDeep));
    }

    #[test]
    fn padded_decode_borrows_in_place() {
        let text = br#"{"type":2,"dataContent":"a\"b","to":"b"}"#;
        let mut buf = text.to_vec();
        buf.extend_from_slice(&[b'x'; PADDING]);
        let mut decoder = Decoder::new();
        let msg = decoder.decode_padded(&mut buf, text.len()).unwrap();
        assert_eq!(msg.text(), Some("a\"b"));
        assert!(matches!(msg.content, Some(Content::Text(Cow::Borrowed(_)))));
        assert_eq!(
            decoder.decode_padded(&mut buf[..text.len() + 3], text.len()),
            Err(DecodeError::InsufficientPadding)
        );
    }
}
