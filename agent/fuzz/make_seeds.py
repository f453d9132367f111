#!/usr/bin/env python3
"""Writes seed inputs for the http_sse fuzz target (control byte, length, gap, payload)."""
import os

def step(kind, conn, payload=b"", gap=0):
    out = b""
    while True:
        part, payload = payload[:255], payload[255:]
        out += bytes([(conn << 3) | kind, len(part), gap]) + part
        if not payload:
            return out

def chunk(b):
    return b"%x\r\n" % len(b) + b + b"\r\n"

req = b'POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{"model":"m","stream":true}'
head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
ev = lambda c, fr=b"null": b'data: {"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":%s}]}\n\n' % (c, fr)
seeds = {
    "vllm_stream": step(6, 0, gap=3) + step(0, 0, req) + step(3, 0, head) + b"".join(step(3, 0, chunk(ev(c))) for c in [b"a", b"b"])
        + step(3, 0, chunk(ev(b"", b'"stop"'))) + step(3, 0, chunk(b"data: [DONE]\n\n")) + step(3, 0, b"0\r\n\r\n") + step(6, 0),
    "non_stream": step(0, 1, req.replace(b"true", b"fals")) + step(3, 1, b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" + b'{"usage":{"completion_tokens":3}}      '),
    "gaps": step(0, 0, req[:40], 0x0f) + step(3, 0, head) + step(3, 0, chunk(ev(b"x" * 200))[:100], 0xc0) + step(3, 0, b"0\r\n\r\n"),
    "http10_close": step(0, 2, b"GET / HTTP/1.0\r\n\r\n") + step(3, 2, b"HTTP/1.0 200 OK\r\n\r\nbody") + step(6, 2),
    "continue": step(0, 0, b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n") + step(3, 0, b"HTTP/1.1 100 Continue\r\n\r\n")
        + step(0, 0, b"{}") + step(3, 0, b"HTTP/1.1 500 E\r\nContent-Length: 0\r\n\r\n"),
}
os.makedirs("seeds", exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join("seeds", name), "wb") as f:
        f.write(data)
