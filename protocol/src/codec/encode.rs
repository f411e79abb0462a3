//! [`Message`] → bytes, exactly as the reference's Gson writes them (SPEC §2.1).
//!
//! Key order `bridge, type, dataContent, from, to, fp, QoS, typeu, sm`; null keys omitted;
//! compact; HTML-safe escaping; raw UTF-8. Written straight into the output buffer: no
//! intermediate `String` or DOM, including for documents nested in `dataContent`.

use bytes::BufMut;

use super::escape::escape_into;
use crate::message::payload::{ErrorResponse, Kickout, LoginRequest, LoginResponse};
use crate::message::{Content, Message};

/// Writes JSON at a given depth of string nesting: at depth 0 bytes go out as they are, at depth
/// `n` everything is escaped `n` times (a document inside a string inside a string…).
pub(crate) struct JsonWriter<'b, B> {
    dst: &'b mut B,
    depth: u8,
    /// Whether the next key is the first of its object (no comma before it).
    first: bool,
}

impl<'b, B: BufMut> JsonWriter<'b, B> {
    pub(crate) fn new(dst: &'b mut B) -> Self {
        Self {
            dst,
            depth: 0,
            first: true,
        }
    }

    #[inline]
    fn raw(&mut self, bytes: &[u8]) {
        if self.depth == 0 {
            self.dst.put_slice(bytes);
        } else {
            escape_into(self.dst, bytes, self.depth);
        }
    }

    fn begin_object(&mut self) {
        self.raw(b"{");
        self.first = true;
    }

    fn end_object(&mut self) {
        self.raw(b"}");
    }

    /// `"name":`, preceded by a comma unless it is the first key. Key names are plain ASCII
    /// without characters that need escaping, so only the quotes are escaped at depth > 0.
    fn key(&mut self, name: &str) {
        if !self.first {
            self.raw(b",");
        }
        self.first = false;
        self.raw(b"\"");
        self.raw(name.as_bytes());
        self.raw(b"\":");
    }

    fn string(&mut self, value: &str) {
        self.raw(b"\"");
        escape_into(self.dst, value.as_bytes(), self.depth + 1);
        self.raw(b"\"");
    }

    fn int(&mut self, value: i64) {
        let mut buf = itoa::Buffer::new();
        self.raw(buf.format(value).as_bytes());
    }

    fn string_field(&mut self, name: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.key(name);
            self.string(value);
        }
    }

    fn int_field(&mut self, name: &str, value: i64) {
        self.key(name);
        self.int(value);
    }

    /// A document written as a JSON string value (SPEC §4: "double encoding").
    fn nested(&mut self, write: impl FnOnce(&mut Self)) {
        self.raw(b"\"");
        self.depth += 1;
        let first = self.first;
        write(self);
        self.first = first;
        self.depth -= 1;
        self.raw(b"\"");
    }

    fn content(&mut self, content: &Content<'_>) {
        match content {
            Content::Text(text) => self.string(text),
            Content::Login(doc) => self.nested(|w| doc.write(w)),
            Content::LoginResponse(doc) => self.nested(|w| doc.write(w)),
            Content::Error(doc) => self.nested(|w| doc.write(w)),
            Content::Kickout(doc) => self.nested(|w| doc.write(w)),
        }
    }
}

impl Message<'_> {
    /// Appends the JSON of this message to `dst`, byte for byte as the reference would.
    ///
    /// The envelope is always at the top level, so its fixed pieces (`{"bridge":false,"type":`,
    /// `,"from":"` …) go out as whole literals; only the strings are scanned for escaping.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_slice(if self.bridge {
            b"{\"bridge\":true,\"type\":"
        } else {
            b"{\"bridge\":false,\"type\":"
        });
        put_int(dst, self.kind.code().into());
        if let Some(content) = &self.content {
            dst.put_slice(b",\"dataContent\":");
            JsonWriter::new(dst).content(content);
        }
        let strings = [
            (&b",\"from\":\""[..], self.from.as_ref().map(|u| u.as_str())),
            (b",\"to\":\"", self.to.as_ref().map(|u| u.as_str())),
            (b",\"fp\":\"", self.fp.as_ref().map(|f| f.as_str())),
        ];
        for (key, value) in strings {
            if let Some(value) = value {
                dst.put_slice(key);
                escape_into(dst, value.as_bytes(), 1);
                dst.put_u8(b'"');
            }
        }
        dst.put_slice(if self.qos {
            b",\"QoS\":true,\"typeu\":"
        } else {
            b",\"QoS\":false,\"typeu\":"
        });
        put_int(dst, self.typeu.into());
        dst.put_slice(b",\"sm\":");
        put_int(dst, self.sm);
        dst.put_u8(b'}');
    }

    /// The JSON of this message as a `Vec` (tests, diagnostics; the hot path uses [`Self::encode`]).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.encode(&mut out);
        out
    }
}

fn put_int(dst: &mut impl BufMut, value: i64) {
    dst.put_slice(itoa::Buffer::new().format(value).as_bytes());
}

macro_rules! document {
    ($ty:ty, |$doc:ident, $w:ident| $body:block) => {
        impl $ty {
            fn write<B: BufMut>(&self, $w: &mut JsonWriter<'_, B>) {
                let $doc = self;
                $w.begin_object();
                $body
                $w.end_object();
            }

            /// The document as a JSON string (what a decoded message carries in `dataContent`).
            pub fn to_json(&self) -> String {
                let mut out = Vec::with_capacity(64);
                self.write(&mut JsonWriter::new(&mut out));
                // The writer emits only the UTF-8 it was given plus ASCII escapes.
                String::from_utf8(out).unwrap_or_default()
            }
        }
    };
}

document!(LoginRequest<'_>, |doc, w| {
    w.string_field("loginUserId", Some(doc.user_id.as_str()));
    w.string_field("loginToken", doc.token.as_deref());
    w.string_field("extra", doc.extra.as_deref());
    w.int_field("firstLoginTime", doc.first_login_time);
});

document!(LoginResponse, |doc, w| {
    w.int_field("code", doc.code.into());
    w.int_field("firstLoginTime", doc.first_login_time);
});

document!(ErrorResponse<'_>, |doc, w| {
    w.int_field("errorCode", doc.code.into());
    w.string_field("errorMsg", doc.message.as_deref());
});

document!(Kickout<'_>, |doc, w| {
    w.int_field("code", doc.code.into());
    w.string_field("reason", doc.reason.as_deref());
});

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::message::{Fingerprint, UserId};

    fn json(msg: &Message<'_>) -> String {
        String::from_utf8(msg.to_json()).unwrap()
    }

    #[test]
    fn login_matches_spec_example() {
        let msg = Message::login(LoginRequest {
            user_id: UserId::new("alice"),
            token: Some(Cow::Borrowed("tokenA")),
            extra: None,
            first_login_time: 0,
        });
        assert_eq!(
            json(&msg),
            r#"{"bridge":false,"type":0,"dataContent":"{\"loginUserId\":\"alice\",\"loginToken\":\"tokenA\",\"firstLoginTime\":0}","from":"alice","to":"0","QoS":false,"typeu":-1,"sm":-1}"#
        );
    }

    #[test]
    fn server_documents() {
        let ok = Message::login_response(UserId::new("bob"), LoginResponse::ok(1795769352595));
        assert_eq!(
            json(&ok),
            r#"{"bridge":false,"type":50,"dataContent":"{\"code\":0,\"firstLoginTime\":1795769352595}","from":"0","to":"bob","QoS":false,"typeu":-1,"sm":-1}"#
        );
        let refused = Message::login_response(UserId::new("bob"), LoginResponse::refused(1025));
        assert!(json(&refused).contains(
            r#""dataContent":"{\"code\":1025,\"firstLoginTime\":-1}","from":"0","to":"-1""#
        ));
        let kick = Message::kickout(
            UserId::new("a"),
            Kickout {
                code: 1,
                reason: None,
            },
        );
        assert!(json(&kick).contains(r#""dataContent":"{\"code\":1}""#));
    }

    #[test]
    fn error_message_is_a_string_inside_a_document() {
        let inner = r#"{"dataContent":"{}","x":"<"}"#;
        let msg = Message::error(ErrorResponse {
            code: 301,
            message: Some(Cow::Borrowed(inner)),
        });
        assert_eq!(
            json(&msg),
            r#"{"bridge":false,"type":52,"dataContent":"{\"errorCode\":301,\"errorMsg\":\"{\\\"dataContent\\\":\\\"{}\\\",\\\"x\\\":\\\"\\u003c\\\"}\"}","from":"0","to":"-1","QoS":false,"typeu":-1,"sm":-1}"#
        );
    }

    #[test]
    fn nulls_are_omitted() {
        let mut msg = Message::data(UserId::new("a"), UserId::new("b"), "x", None);
        msg.from = None;
        msg.content = None;
        assert_eq!(
            json(&msg),
            r#"{"bridge":false,"type":2,"to":"b","QoS":false,"typeu":-1,"sm":-1}"#
        );
        let qos = Message::data(
            UserId::new("a"),
            UserId::new("b"),
            "x",
            Some(Fingerprint::new("f")),
        );
        assert!(json(&qos).contains(r#""fp":"f","QoS":true"#));
    }
}
