//! Property tests: whatever imedge encodes, it decodes to the same message — for every kind,
//! arbitrary unicode text, and every transport's framing.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test code: a panic is a failure

use bytes::BytesMut;
use imedge_protocol::frame::{tcp, ws};
use imedge_protocol::message::payload::{ErrorResponse, Kickout, LoginRequest};
use imedge_protocol::message::Content;
use imedge_protocol::{Decoder, Fingerprint, Kind, Message, UserId};
use proptest::prelude::*;

const KIND_CODES: [i32; 13] = [0, 1, 2, 3, 4, 5, 50, 51, 52, 53, 54, 7, -9];

fn text() -> impl Strategy<Value = String> {
    // Any unicode, biased towards the characters the escaper treats specially.
    prop_oneof![
        any::<String>(),
        "[\"\\\\<>&='\u{2028}\u{2029}\u{0}-\u{1f}a-z中文😀]{0,40}",
    ]
}

prop_compose! {
    fn message()(
        bridge in any::<bool>(),
        code in prop::sample::select(&KIND_CODES[..]),
        other in any::<i32>(),
        content in prop::option::of(text()),
        from in prop::option::of(text()),
        to in prop::option::of(text()),
        fp in prop::option::of(text()),
        qos in any::<bool>(),
        typeu in any::<i32>(),
        sm in any::<i64>(),
    ) -> Message<'static> {
        Message {
            bridge,
            kind: Kind::from_code(if code == 7 { other } else { code }),
            content: content.map(Content::from),
            from: from.map(UserId::from),
            to: to.map(UserId::from),
            fp: fp.map(Fingerprint::from),
            qos,
            typeu,
            sm,
        }
    }
}

fn decode(json: &[u8]) -> Message<'static> {
    let mut body = json.to_vec();
    Decoder::new().decode(&mut body).unwrap().into_owned()
}

proptest! {
    #[test]
    fn encode_then_decode_is_identity(msg in message()) {
        let json = msg.to_json();
        prop_assert!(std::str::from_utf8(&json).is_ok());
        prop_assert_eq!(decode(&json), msg.clone());
        // Encoding is canonical: decode → encode gives the same bytes.
        prop_assert_eq!(decode(&json).to_json(), json);
    }

    #[test]
    fn data_content_text_survives(s in any::<String>()) {
        let msg = Message::data(UserId::new("a"), UserId::new("b"), s.clone(), Some(Fingerprint::new("f")));
        let back = decode(&msg.to_json());
        prop_assert_eq!(back.text(), Some(s.as_str()));
    }

    #[test]
    fn documents_survive_double_encoding(
        uid in text(), token in prop::option::of(text()), extra in prop::option::of(text()),
        flt in any::<i64>(), reason in prop::option::of(text()), code in any::<i32>(),
    ) {
        let mut decoder = Decoder::new();
        let login = LoginRequest { user_id: UserId::from(uid), token: token.map(Into::into), extra: extra.map(Into::into), first_login_time: flt };
        let received = decode(&Message::login(login.clone()).to_json());
        prop_assert_eq!(decoder.login_request(received.text().unwrap()).unwrap(), login);

        let kick = Kickout { code, reason: reason.clone().map(Into::into) };
        let received = decode(&Message::kickout(UserId::new("u"), kick.clone()).to_json());
        prop_assert_eq!(decoder.kickout(received.text().unwrap()).unwrap(), kick);

        // errorMsg quotes a whole message: three levels of nesting in all.
        let inner = Message::data(UserId::new("a"), UserId::new("b"), reason.unwrap_or_default(), None);
        let quoted = String::from_utf8(inner.to_json()).unwrap();
        let err = ErrorResponse { code, message: Some(quoted.clone().into()) };
        let received = decode(&Message::error(err.clone()).to_json());
        let back = decoder.error_response(received.text().unwrap()).unwrap();
        prop_assert_eq!(&back, &err);
        prop_assert_eq!(decode(quoted.as_bytes()), inner);
    }

    #[test]
    fn tcp_frames_round_trip(msgs in prop::collection::vec(message(), 1..5), split in any::<prop::sample::Index>()) {
        let mut wire = BytesMut::new();
        for msg in &msgs {
            tcp::encode(msg, &mut wire);
        }
        // Bytes arrive in two arbitrary pieces.
        let at = split.index(wire.len() + 1);
        let mut rx = BytesMut::from(&wire[..at]);
        let mut got = Vec::new();
        let mut rest = &wire[at..];
        loop {
            while let Some(body) = tcp::split_frame(&mut rx, usize::MAX).unwrap() {
                got.push(decode(&body));
            }
            if rest.is_empty() { break; }
            rx.extend_from_slice(rest);
            rest = &[];
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn ws_frames_round_trip(msg in message(), mask in prop::option::of(any::<[u8; 4]>())) {
        let mut wire = BytesMut::new();
        ws::encode_message(&msg, mask, &mut wire);
        let role = if mask.is_some() { ws::Role::Server } else { ws::Role::Client };
        let mut decoder = ws::FrameDecoder::new(role, usize::MAX);
        match decoder.decode(&mut wire) {
            Ok(Some(ws::Unit::Text(body))) => prop_assert_eq!(decode(&body), msg),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
        prop_assert!(wire.is_empty());
    }
}
