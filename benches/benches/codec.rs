//! Criterion benches of the message codec on a typical C2C QoS message (~200 bytes of JSON),
//! TCP-framed, on in-memory bytes: decode, encode, and decode + re-encode (what a relay does).
//!
//! Run: `cargo bench -p imedge-benches --bench codec`

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // bench code on fixed, known-good input

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use imedge_protocol::codec::PADDING;
use imedge_protocol::frame::tcp;
use imedge_protocol::{Decoder, Fingerprint, Message, UserId};
use std::hint::black_box;

/// A C2C QoS message as the Java SDK writes it, with a 100-byte text like the load generator's.
fn typical() -> Vec<u8> {
    let msg = Message::data(
        UserId::new("alice"),
        UserId::new("bob"),
        "Hello Bob, this is Alice. Are we still on for lunch at noon tomorrow? Reply when you can!",
        Some(Fingerprint::new("ef2adb06-fcf7-423d-9a08-90ccfa28533a")),
    );
    let mut frame = BytesMut::new();
    tcp::encode(&msg, &mut frame);
    frame.to_vec()
}

fn codec(c: &mut Criterion) {
    let frame = typical();
    let body_len = frame.len() - tcp::PREFIX_LEN;
    let mut group = c.benchmark_group(format!("c2c_{body_len}B_tcp"));
    group.throughput(Throughput::Elements(1));

    // The receive buffer: the frame, then read-ahead padding as a real buffer would have.
    let mut rx = frame.clone();
    rx.resize(frame.len() + PADDING, 0);
    let mut decoder = Decoder::new();
    let mut out = BytesMut::with_capacity(4096);

    group.bench_function("decode", |b| {
        b.iter(|| {
            rx[..frame.len()].copy_from_slice(&frame);
            let len = tcp::decode(&rx, tcp::DEFAULT_MAX_BODY).unwrap().unwrap();
            let msg = decoder
                .decode(&mut rx[tcp::PREFIX_LEN..tcp::PREFIX_LEN + len])
                .unwrap();
            black_box(msg.qos);
        })
    });

    group.bench_function("decode_in_place", |b| {
        b.iter(|| {
            rx[..frame.len()].copy_from_slice(&frame);
            let len = tcp::decode(&rx, tcp::DEFAULT_MAX_BODY).unwrap().unwrap();
            let msg = decoder
                .decode_padded(&mut rx[tcp::PREFIX_LEN..], len)
                .unwrap();
            black_box(msg.qos);
        })
    });

    let msg = decoder
        .decode(&mut frame[tcp::PREFIX_LEN..].to_vec())
        .unwrap()
        .into_owned();
    group.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            tcp::encode(black_box(&msg), &mut out);
            black_box(out.len());
        })
    });

    group.bench_function("decode_reencode", |b| {
        b.iter(|| {
            rx[..frame.len()].copy_from_slice(&frame);
            let len = tcp::decode(&rx, tcp::DEFAULT_MAX_BODY).unwrap().unwrap();
            let msg = decoder
                .decode_padded(&mut rx[tcp::PREFIX_LEN..], len)
                .unwrap();
            out.clear();
            tcp::encode(&msg, &mut out);
            black_box(out.len());
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
