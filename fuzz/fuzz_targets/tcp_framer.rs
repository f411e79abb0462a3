//! Fuzz target: the TCP framer and the message decoder behind it, on an arbitrary byte stream
//! that arrives in two pieces (the first input byte chooses the split).
#![no_main]

use bytes::BytesMut;
use imedge_protocol::frame::tcp;
use imedge_protocol::Decoder;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(stream.len());
    let mut decoder = Decoder::new();
    let mut rx = BytesMut::from(&stream[..at]);
    for piece in [&stream[at..], &[][..]] {
        loop {
            match tcp::split_frame(&mut rx, tcp::DEFAULT_MAX_BODY) {
                Ok(Some(mut body)) => {
                    assert!(body.len() <= tcp::DEFAULT_MAX_BODY);
                    if let Ok(msg) = decoder.decode(&mut body) {
                        // Whatever decodes must re-encode and decode to the same message.
                        let mut out = BytesMut::new();
                        tcp::encode(&msg, &mut out);
                        let mut again = tcp::split_frame(&mut out, usize::MAX).unwrap().unwrap();
                        let owned = msg.into_owned();
                        assert_eq!(Decoder::new().decode(&mut again).unwrap(), owned);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        rx.extend_from_slice(piece);
    }
});
