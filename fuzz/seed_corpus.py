#!/usr/bin/env python3
"""Builds the fuzz seed corpus from the captured vectors (shared/protocol/vectors).

Each target gets the units it parses: tcp_framer the TCP frames (with a leading split byte),
ws_frame the WebSocket frames and upgrade requests (with a leading mode byte), message_decode the
JSON bodies of every transport, conn_cut each TCP or WebSocket connection's client bytes. Units over 8 KiB are left out to keep the corpus small.
Usage: fuzz/seed_corpus.py [VECTORS_DIR]
"""
import hashlib, json, pathlib, sys

here = pathlib.Path(__file__).resolve().parent
vectors = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else here.parent.parent / "shared/protocol/vectors"
MAX = 8192

def put(target, data):
    if len(data) > MAX:
        return
    d = here / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()).write_bytes(data)

for f in sorted(vectors.glob("*.jsonl")):
    transport = f.name.split("-")[0]
    # conn_cut: each connection's client bytes in one stream, cut in chunks of 1, 7 or all at
    # once (mode bits 2..); WebSocket streams carry their own upgrade (mode bit 1).
    if transport in ("tcp", "ws"):
        streams = {}
        for line in f.read_text().splitlines():
            u = json.loads(line)
            if u["dir"] == "c2s" and u["hex"]:
                streams.setdefault(u.get("conn"), bytearray()).extend(bytes.fromhex(u["hex"]))
        for stream in streams.values():
            for chunk in (0, 1, 7):
                mode = (chunk << 2) | (0 if transport == "tcp" else 3)
                put("conn_cut", bytes([mode]) + bytes(stream))
    for line in f.read_text().splitlines():
        u = json.loads(line)
        raw = bytes.fromhex(u["hex"])
        if not raw:
            continue
        if u["json"] is not None:
            put("message_decode", u["json"].encode())
        if transport == "tcp":
            put("tcp_framer", bytes([len(raw) // 2 % 256]) + raw)
        elif transport == "ws":
            mode = 0 if u.get("kind") == "http" else (1 if u["dir"] == "c2s" else 3)
            put("ws_frame", bytes([mode]) + raw)
for t in ("message_decode", "tcp_framer", "ws_frame", "conn_cut"):
    print(t, len(list((here / "corpus" / t).iterdir())))
