//! Fuzz target: the message decoder (both the copying and the in-place padded path) and the
//! `dataContent` document decoders, checking decode → encode → decode is stable.
#![no_main]

use imedge_protocol::codec::PADDING;
use imedge_protocol::Decoder;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new();
    let mut body = data.to_vec();
    let copied = decoder.decode(&mut body).map(|m| m.into_owned());

    let mut padded = data.to_vec();
    padded.extend_from_slice(&[0xa5; PADDING]);
    let in_place = decoder
        .decode_padded(&mut padded, data.len())
        .map(|m| m.into_owned());
    assert_eq!(copied, in_place);

    if let Ok(msg) = copied {
        let json = msg.to_json();
        let mut again = json.clone();
        let back = decoder
            .decode(&mut again)
            .expect("our own encoding decodes");
        assert_eq!(back, msg);
        assert_eq!(back.to_json(), json);
        if let Some(text) = msg.text() {
            let _ = decoder.login_request(text);
            let _ = decoder.login_response(text);
            let _ = decoder.error_response(text);
            let _ = decoder.kickout(text);
        }
    }
});
