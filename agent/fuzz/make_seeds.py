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
def sse_named(name, data):
    return b"event: " + name + b"\ndata: " + data + b"\n\n"

def post(path, body):
    return b"POST %s HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body)

ndjson_head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
json_head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
responses = [sse_named(b"response.created", b'{"type":"response.created","response":{"status":"in_progress"}}'),
             sse_named(b"response.output_text.delta", b'{"type":"response.output_text.delta","output_index":0,"delta":"Hi","logprobs":[{"token":"H"},{"token":"i"}]}'),
             sse_named(b"response.output_text.done", b'{"type":"response.output_text.done","text":"Hi"}'),
             sse_named(b"response.completed", b'{"type":"response.completed","response":{"status":"completed","usage":{"input_tokens":3,"output_tokens":2}}}')]
anthropic = [sse_named(b"message_start", b'{"type":"message_start","message":{"content":[],"model":"c","usage":{"input_tokens":5,"output_tokens":1}}}'),
             sse_named(b"ping", b'{"type":"ping"}'),
             sse_named(b"content_block_delta", b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}'),
             sse_named(b"content_block_delta", b'{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{"}}'),
             sse_named(b"message_delta", b'{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":2}}'),
             sse_named(b"message_stop", b'{"type":"message_stop"}')]
ollama = [b'{"model":"m","created_at":"t","response":"a","done":false}\n',
          b'{"model":"m","created_at":"t","message":{"role":"assistant","content":"b"},"done":false}\n',
          b'{"model":"m","created_at":"t","response":"","done":true,"done_reason":"stop","eval_count":2,"prompt_eval_count":4}\n']
n2 = [b'data: {"object":"chat.completion.chunk","choices":[{"index":%d,"delta":{"content":"x"},"finish_reason":%s}]}\n\n' % (i, fr)
      for i, fr in [(0, b"null"), (1, b"null"), (0, b'"stop"'), (1, b'"length"')]] + [b"data: [DONE]\n\n"]
def stream(conn, path, head_bytes, events):
    return (step(0, conn, post(path, b'{"stream":true}')) + step(3, conn, head_bytes)
            + b"".join(step(3, conn, chunk(e)) for e in events) + step(3, conn, b"0\r\n\r\n"))

seeds = {
    "responses": stream(0, b"/v1/responses", head, responses),
    "anthropic": stream(1, b"/v1/messages", head, anthropic),
    "ollama": stream(2, b"/api/chat", ndjson_head, ollama),
    "json_lines": stream(0, b"/x", json_head, [b'{"a":1}\n{"b":2}\n', b'{"c":', b'3}\n']),
    "n2": stream(1, b"/v1/chat/completions", head, n2),
    "shapes_raw": b"\x07\x40\xa0" + b"".join(responses + anthropic + ollama + n2),
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
