#!/usr/bin/env python3
"""Scripted OpenAI-compatible streaming server for infertap's end-to-end tests (stdlib only).

Every response follows a *scenario* from a JSON script, so tests know exactly what the server sent
and when. After every send() that completes a content event, the server records time.time_ns();
one JSON line per finished exchange goes to --emit-log, which tests compare with the agent's
per-token timestamps.

Script (all keys optional):
  {"default": SCENARIO, "sequence": [SCENARIO, ...], "scenarios": {"name": SCENARIO, ...}}
A request uses the scenario named by its `X-Scenario` header, else the next unused entry of
`sequence` (in arrival order), else `default`.

SCENARIO keys (defaults in brackets):
  mode            "stream" | "json" | "error"                                   ["stream"]
  status          HTTP status for mode "error"                                  [500]
  ttft_ms         delay between reading the request and the first content event [20]
  itl_ms          delay between content events: a number or a per-gap list      [5]
  tokens          number of content events                                      [8]
  tokens_per_event  tokens carried by each content event (logprobs entries)    [1]
  role_chunk      chat only: send a role-only chunk first (not content)         [true]
  usage           send a final usage chunk / usage object                       [true]
  done            send "data: [DONE]"                                           [true]
  split           "none" | "fragments" (each event over several sends)
                  | "coalesce" (`coalesce` events per send)                     ["none"]
  fragment_gap_ms pause between the fragments of one event                      [1]
  coalesce        events per send for split="coalesce"                          [3]
  close_after     close the connection after this many content events          [null]
  truncate_after  after this many content events send half of the next one, then close
  reset           close with SO_LINGER 0 (RST) instead of FIN                   [false]
  exit_after      the whole server process exits (os._exit) after this many
                  content events of this response                              [null]
  keep_alive      honour keep-alive                                             [true]
  chunked         json/error mode: chunked body instead of Content-Length      [false]
  shape           stream mode: the API shape spoken, whatever the path           ["openai"]
                  "openai" (chat or completions by path) | "responses" (OpenAI Responses
                  events) | "anthropic" (Messages events) | "ollama_generate" | "ollama_chat"
                  (NDJSON) | "tgi" | "llamacpp" (native SSE) | "json_lines" (chunked
                  application/json lines of no known shape) | "unknown_sse" (SSE of no known
                  shape)
  n               "openai" shape: parallel choices, events interleaved choice by choice [1]
  text            stream mode: words put before each content event's token text (e.g. a
                  marker a privacy test must never find in the agent's output)  [""]
  await_eof_ms    before responding, wait up to this long for the client to shut down its
                  sending side (a read returning 0, as a server watching for disconnects
                  does); a half-closed client is still answered in full, then the
                  connection is closed                                          [0]

Overload options (command line): --max-conns N serves at most N connections at once; further
connections stay un-accepted in the listen backlog (their requests wait in the kernel) until a
served connection ends. --accept-delay-ms D sleeps D ms before each accept (a slow acceptor).
--backlog B sets listen()'s backlog [256].

Emission log line: {"peer": "ip:port" (the client's address), "seq_on_conn", "method", "path",
  "scenario", "status", "stream", "request_unix_ns" (first request byte read),
  "response_start_unix_ns", "events_unix_ns" [after the send completing each content event],
  "events_send_start_unix_ns" [before that send: the kernel's send lies between the two],
  "tokens_per_event" [...], "output_tokens", "end_unix_ns", "completed" (false when cut off),
  "shape", "stream_kind" (what the agent must report), "finish_reason" (in the agent's closed
  vocabulary, null when the shape has none), "usage_output_tokens" (the usage the stream
  reported, null when none), "tokens_known" (false for shapes with no token semantics),
  "choice_per_event" [choice index of each content event]}
"""

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time

STATUS_TEXT = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
               500: "Internal Server Error", 503: "Service Unavailable"}

DEFAULTS = {
    "mode": "stream", "status": 500, "ttft_ms": 20, "itl_ms": 5, "tokens": 8,
    "tokens_per_event": 1, "role_chunk": True, "usage": True, "done": True, "split": "none",
    "fragment_gap_ms": 1, "coalesce": 3, "close_after": None, "reset": False,
    "exit_after": None, "truncate_after": None, "keep_alive": True, "chunked": False,
    "shape": "openai", "n": 1, "await_eof_ms": 0, "text": "",
}


class Script:
    def __init__(self, doc):
        self.default = dict(DEFAULTS, **doc.get("default", {}))
        self.sequence = [dict(self.default, **s) for s in doc.get("sequence", [])]
        self.named = {k: dict(self.default, **v) for k, v in doc.get("scenarios", {}).items()}
        self.lock = threading.Lock()
        self.next = 0

    def pick(self, name):
        if name is not None:
            if name not in self.named:
                raise KeyError(name)
            return name, self.named[name]
        with self.lock:
            if self.next < len(self.sequence):
                i = self.next
                self.next += 1
                return "sequence[%d]" % i, self.sequence[i]
        return "default", self.default


class EmitLog:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1) if path else None
        self.lock = threading.Lock()

    def write(self, entry):
        if self.f is None:
            return
        with self.lock:
            self.f.write(json.dumps(entry) + "\n")
            self.f.flush()


class Closed(Exception):
    pass


def read_request(sock, buf):
    """Reads one HTTP/1.1 request. Returns (method, path, headers, body, first_byte_ns, rest)
    or None on a clean EOF before any byte."""
    first_ns = time.time_ns() if buf else None
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            if buf:
                raise Closed()
            return None
        if first_ns is None:
            first_ns = time.time_ns()
        buf += data
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("bad request line")
    method, target, version = parts
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            while b"\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    raise Closed()
                buf += data
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                data = sock.recv(65536)
                if not data:
                    raise Closed()
                buf += data
            body += buf[:size]
            buf = buf[size + 2:]
            if size == 0:
                break
    else:
        n = int(headers.get("content-length", "0"))
        while len(buf) < n:
            data = sock.recv(65536)
            if not data:
                raise Closed()
            buf += data
        body, buf = buf[:n], buf[n:]
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return method, target.split("?")[0], headers, body, first_ns, keep, buf


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def content_event(chat, model, i, n_tok, prefix=""):
    text = prefix + "".join("tok%d " % (i * n_tok + k) for k in range(n_tok))
    logprobs = {"content": [{"token": "t", "logprob": -0.1} for _ in range(n_tok)]}
    if chat:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": None}
        obj = "text_completion"
    if n_tok > 1:
        choice["logprobs"] = logprobs
    return {"id": "cmpl-scripted", "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice]}


def sse(obj):
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class Conn:
    def __init__(self, server, sock, addr):
        self.server = server
        self.sock = sock
        self.peer = "%s:%d" % (addr[0], addr[1])
        self.last_send_start = 0
        self.eof = False

    def send(self, data):
        """Sends all of data; returns the time right after. The time right before is kept in
        self.last_send_start: the kernel's send happened between the two."""
        self.last_send_start = time.time_ns()
        self.sock.sendall(data)
        return time.time_ns()

    def abort(self, reset):
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def serve(self):
        buf = b""
        seq = 0
        try:
            while True:
                req = read_request(self.sock, buf)
                if req is None:
                    return
                method, path, headers, body, first_ns, keep, buf = req
                if not self.respond(seq, method, path, headers, body, first_ns, keep):
                    return
                if self.eof:
                    return
                seq += 1
        except (Closed, ConnectionError, OSError, ValueError):
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    def respond(self, seq, method, path, headers, body, first_ns, keep):
        """Sends one response; returns False when the connection must end."""
        try:
            name, sc = self.server.script.pick(headers.get("x-scenario"))
        except KeyError as e:
            name, sc = "unknown:%s" % e, dict(DEFAULTS, mode="error", status=400)
        try:
            req = json.loads(body) if body else {}
        except ValueError:
            req = {}
        if not isinstance(req, dict):
            req = {}
        chat = path.endswith("/chat/completions")
        model = str(req.get("model") or "scripted-model")
        stream = bool(req.get("stream", False)) and sc["mode"] == "stream"
        keep = keep and sc["keep_alive"]
        log = {"peer": self.peer, "seq_on_conn": seq, "method": method, "path": path,
               "scenario": name, "stream": stream, "request_unix_ns": first_ns,
               "events_unix_ns": [], "events_send_start_unix_ns": [], "tokens_per_event": [], "output_tokens": 0,
               "completed": False}
        if sc["await_eof_ms"] and not self.eof:
            self.sock.settimeout(sc["await_eof_ms"] / 1000.0)
            try:
                if self.sock.recv(1, socket.MSG_PEEK) == b"":
                    self.sock.recv(1)          # the EOF, as the server's own read sees it
                    self.eof = True
            except socket.timeout:
                pass
            finally:
                self.sock.settimeout(None)
        keep = keep and not self.eof
        conn_hdr = b"keep-alive" if keep else b"close"
        try:
            if sc["mode"] == "error":
                status = int(sc["status"])
                payload = json.dumps({"error": {"message": "scripted error", "code": status}})
                log["status"] = status
                time.sleep(sc["ttft_ms"] / 1000.0)
                log["response_start_unix_ns"] = self.send_body(status, payload.encode(),
                                                               conn_hdr, sc["chunked"])
                log["completed"] = True
            elif not stream:
                log["status"] = 200
                time.sleep(self.gap(sc, -1))
                n, per = int(sc["tokens"]), int(sc["tokens_per_event"])
                text = "".join("tok%d " % i for i in range(n * per))
                if chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "length"}
                else:
                    choice = {"index": 0, "text": text, "finish_reason": "length"}
                doc = {"id": "cmpl-scripted",
                       "object": "chat.completion" if chat else "text_completion",
                       "model": model, "choices": [choice]}
                if sc["usage"]:
                    doc["usage"] = {"prompt_tokens": 5, "completion_tokens": n * per,
                                    "total_tokens": 5 + n * per}
                t = self.send_body(200, json.dumps(doc).encode(), conn_hdr, sc["chunked"])
                log["response_start_unix_ns"] = t
                log["output_tokens"] = n * per
                log["completed"] = True
            else:
                log["status"] = 200
                if not self.stream(sc, chat, model, conn_hdr, log):
                    return False
                log["completed"] = True
        finally:
            log["end_unix_ns"] = time.time_ns()
            self.server.emit.write(log)
        return keep

    @staticmethod
    def gap(sc, i):
        """Delay before content event i (i == -1 or 0: time to first token)."""
        if i <= 0:
            return sc["ttft_ms"] / 1000.0
        itl = sc["itl_ms"]
        if isinstance(itl, list):
            return (itl[i - 1] if i - 1 < len(itl) else itl[-1]) / 1000.0
        return itl / 1000.0

    def send_body(self, status, payload, conn_hdr, chunked):
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: %s\r\n" % (
            status, STATUS_TEXT.get(status, "Status").encode(), conn_hdr)
        if chunked:
            return self.send(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(payload)
                             + b"0\r\n\r\n")
        return self.send(head + b"Content-Length: %d\r\n\r\n" % len(payload) + payload)

    def stream(self, sc, chat, model, conn_hdr, log):
        """Streams the scripted events; returns False when the connection was cut."""
        n, per = int(sc["tokens"]), int(sc["tokens_per_event"])
        shape = Shape(sc["shape"], chat, model, n, per, int(sc["n"]), sc)
        log.update(shape="%s" % sc["shape"], stream_kind=shape.kind, finish_reason=shape.finish,
                   usage_output_tokens=shape.usage_tokens, tokens_known=shape.tokens_known,
                   choice_per_event=[])
        log["response_start_unix_ns"] = self.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nCache-Control: no-cache\r\n"
            b"Connection: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
            % (shape.content_type, conn_hdr))
        for pre in shape.preamble():
            self.send(chunk(pre))
        # Content events: token i of every choice, choice by choice.
        events = [(i, c) for i in range(n) for c in range(shape.choices)]
        # Group events into sends: each group is written by one send (or fragmented).
        groups = []
        step = int(sc["coalesce"]) if sc["split"] == "coalesce" else 1
        for start in range(0, len(events), step):
            groups.append(events[start:start + step])
        for group in groups:
            time.sleep(self.gap(sc, group[0][0] if group[0][1] == 0 else 1))
            data = b"".join(chunk(shape.event(i, c)) for i, c in group)
            if sc["close_after"] is not None and group[0][0] >= int(sc["close_after"]):
                self.abort(sc["reset"])
                return False
            if sc["truncate_after"] is not None and group[0][0] >= int(sc["truncate_after"]):
                # Half an event (cut inside its JSON), then the connection ends.
                self.send(data[: len(data) // 2])
                self.abort(sc["reset"])
                return False
            if sc["split"] == "fragments":
                # Four pieces cutting through the chunk header, the JSON and the event's "\n\n":
                # the event is complete only with the last send, whose time is logged.
                cuts = sorted({2, len(data) // 2, len(data) - 3})
                prev = 0
                for c in cuts:
                    self.send(data[prev:c])
                    prev = c
                    time.sleep(sc["fragment_gap_ms"] / 1000.0)
                t = self.send(data[prev:])
            else:
                t = self.send(data)
            for _, c in group:
                log["events_unix_ns"].append(t)
                log["events_send_start_unix_ns"].append(self.last_send_start)
                log["tokens_per_event"].append(shape.per)
                log["output_tokens"] += shape.per
                log["choice_per_event"].append(c)
            if sc["exit_after"] is not None and len(log["events_unix_ns"]) >= int(sc["exit_after"]):
                self.server.emit.write(dict(log, end_unix_ns=time.time_ns()))
                os._exit(3)
        if sc["close_after"] is not None and n >= int(sc["close_after"]):
            self.abort(sc["reset"])
            return False
        self.send(b"".join(chunk(t) for t in shape.tail()) + b"0\r\n\r\n")
        return True


def sse_named(name, obj):
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(obj).encode() + b"\n\n"


def ndjson(obj):
    return json.dumps(obj).encode() + b"\n"


class Shape:
    """The bytes of one API shape's stream, as each API's public docs describe it."""

    def __init__(self, name, chat, model, n, per, choices, sc):
        if name not in ("openai", "responses", "anthropic", "ollama_generate", "ollama_chat",
                        "tgi", "llamacpp", "json_lines", "unknown_sse"):
            raise ValueError("unknown shape %r" % name)
        self.name, self.chat, self.model, self.n = name, chat, model, n
        self.choices = choices if name == "openai" else 1
        # Shapes without per-token logprobs carry one token per event.
        self.per = per if name in ("openai", "responses") else 1
        self.usage, self.done, self.role_chunk = sc["usage"], sc["done"], sc["role_chunk"]
        self.total = n * self.per * self.choices
        self.content_type = b"text/event-stream"
        if name.startswith("ollama"):
            self.content_type = b"application/x-ndjson"
        elif name == "json_lines":
            self.content_type = b"application/json"
        self.kind = {"openai": "openai_chat" if chat else "openai_completion",
                     "responses": "openai_responses", "anthropic": "anthropic_messages",
                     "ollama_generate": "ollama", "ollama_chat": "ollama", "tgi": "tgi",
                     "llamacpp": "llamacpp", "json_lines": "json_lines",
                     "unknown_sse": "unknown"}[name]
        self.tokens_known = name not in ("json_lines", "unknown_sse")
        # The finish each shape reports, in the agent's closed vocabulary.
        self.finish = None if not self.tokens_known else (
            "stop" if name == "responses" else "length")
        has_usage = self.usage and self.tokens_known
        if name == "openai":
            has_usage = self.usage
        self.usage_tokens = self.total if has_usage else None
        self.seq = 0
        self.prefix = sc["text"]

    def text(self, i):
        return self.prefix + "".join("tok%d " % (i * self.per + k) for k in range(self.per))

    def preamble(self):
        m = self.model
        if self.name == "openai":
            if not (self.chat and self.role_chunk):
                return []
            if self.choices == 1:
                return [sse({"id": "cmpl-scripted", "object": "chat.completion.chunk",
                             "model": m, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                      "finish_reason": None}]})]
            else:
                return [sse({"id": "cmpl-scripted", "object": "chat.completion.chunk", "model": m,
                             "choices": [{"index": c, "delta": {"role": "assistant",
                                                                "content": ""},
                                          "finish_reason": None}]})
                        for c in range(self.choices)]
        if self.name == "responses":
            resp = self.response("in_progress", None)
            return [self.responses_event("response.created", {"response": resp}),
                    self.responses_event("response.in_progress", {"response": resp}),
                    self.responses_event("response.output_item.added", {
                        "output_index": 0, "item": {"id": "msg_1", "type": "message",
                                                    "status": "in_progress",
                                                    "role": "assistant", "content": []}}),
                    self.responses_event("response.content_part.added", {
                        "item_id": "msg_1", "output_index": 0, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": []}})]
        if self.name == "anthropic":
            return [sse_named("message_start", {"type": "message_start", "message": {
                        "id": "msg_1", "type": "message", "role": "assistant", "content": [],
                        "model": m, "stop_reason": None, "stop_sequence": None,
                        "usage": {"input_tokens": 5, "output_tokens": 1}}}),
                    sse_named("content_block_start", {"type": "content_block_start", "index": 0,
                                                      "content_block": {"type": "text",
                                                                        "text": ""}}),
                    sse_named("ping", {"type": "ping"})]
        return []

    def response(self, status, usage):
        return {"id": "resp_1", "object": "response", "created_at": int(time.time()),
                "status": status, "error": None, "incomplete_details": None, "model": self.model,
                "output": [], "usage": usage}

    def responses_event(self, ty, fields):
        obj = dict({"type": ty, "sequence_number": self.seq}, **fields)
        self.seq += 1
        return sse_named(ty, obj)

    def event(self, i, c):
        m, text = self.model, self.text(i)
        if self.name == "openai":
            ev = content_event(self.chat, m, i, self.per, self.prefix)
            ev["choices"][0]["index"] = c
            return sse(ev)
        if self.name == "responses":
            fields = {"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": text}
            if self.per > 1:
                fields["logprobs"] = [{"token": "t", "logprob": -0.1} for _ in range(self.per)]
            return self.responses_event("response.output_text.delta", fields)
        if self.name == "anthropic":
            return sse_named("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                     "delta": {"type": "text_delta",
                                                               "text": text}})
        created = "2026-12-02T00:00:00.%06dZ" % i
        if self.name == "ollama_generate":
            return ndjson({"model": m, "created_at": created, "response": text, "done": False})
        if self.name == "ollama_chat":
            return ndjson({"model": m, "created_at": created,
                           "message": {"role": "assistant", "content": text}, "done": False})
        if self.name == "tgi":
            return b"data:" + json.dumps({"index": i, "token": {
                "id": 100 + i, "text": text, "logprob": -0.1, "special": False},
                "generated_text": None, "details": None}).encode() + b"\n\n"
        if self.name == "llamacpp":
            return sse({"index": 0, "content": text, "tokens": [], "stop": False, "id_slot": 0,
                        "tokens_predicted": i + 1, "tokens_evaluated": 5})
        if self.name == "json_lines":
            return ndjson({"seq": i, "piece": text})
        return sse_named("chunk", {"piece": text})

    def tail(self):
        m, total = self.model, self.total
        out = []
        if self.name == "openai":
            for c in range(self.choices):
                fin = {"index": c, "delta": {}, "finish_reason": "length"} if self.chat else \
                    {"index": c, "text": "", "finish_reason": "length"}
                out.append(sse({"id": "cmpl-scripted", "object": "chat.completion.chunk"
                                if self.chat else "text_completion", "model": m,
                                "choices": [fin]}))
            if self.usage:
                out.append(sse({"id": "cmpl-scripted", "object": "chat.completion.chunk"
                                if self.chat else "text_completion", "model": m, "choices": [],
                                "usage": {"prompt_tokens": 5, "completion_tokens": total,
                                          "total_tokens": 5 + total}}))
            if self.done:
                out.append(b"data: [DONE]\n\n")
        elif self.name == "responses":
            full = "".join(self.text(i) for i in range(self.n))
            out.append(self.responses_event("response.output_text.done", {
                "item_id": "msg_1", "output_index": 0, "content_index": 0, "text": full}))
            out.append(self.responses_event("response.output_item.done", {
                "output_index": 0, "item": {"id": "msg_1", "type": "message",
                                            "status": "completed", "role": "assistant",
                                            "content": [{"type": "output_text", "text": full,
                                                         "annotations": []}]}}))
            if self.done:
                usage = {"input_tokens": 5, "output_tokens": total,
                         "total_tokens": 5 + total} if self.usage else None
                out.append(self.responses_event("response.completed", {
                    "response": self.response("completed", usage)}))
        elif self.name == "anthropic":
            out.append(sse_named("content_block_stop", {"type": "content_block_stop",
                                                        "index": 0}))
            if self.done:
                delta = {"type": "message_delta", "delta": {"stop_reason": "max_tokens",
                                                            "stop_sequence": None}}
                if self.usage:
                    delta["usage"] = {"output_tokens": total}
                out.append(sse_named("message_delta", delta))
                out.append(sse_named("message_stop", {"type": "message_stop"}))
        elif self.name.startswith("ollama"):
            if self.done:
                last = {"model": m, "created_at": "2026-12-02T00:00:01Z", "done": True,
                        "done_reason": "length", "total_duration": 1000, "load_duration": 10}
                if self.name == "ollama_generate":
                    last["response"] = ""
                else:
                    last["message"] = {"role": "assistant", "content": ""}
                if self.usage:
                    last.update(prompt_eval_count=5, eval_count=total)
                out.append(ndjson(last))
        elif self.name == "tgi":
            if self.done:
                details = {"finish_reason": "length", "seed": None}
                if self.usage:
                    details["generated_tokens"] = total
                out.append(b"data:" + json.dumps({"index": self.n, "token": {
                    "id": 2, "text": "</s>", "logprob": -0.1, "special": True},
                    "generated_text": "x", "details": details}).encode() + b"\n\n")
        elif self.name == "llamacpp":
            if self.done:
                last = {"index": 0, "content": "", "tokens": [], "stop": True, "model": m,
                        "stop_type": "limit", "stopping_word": "", "tokens_cached": 5}
                if self.usage:
                    last.update(tokens_predicted=total, tokens_evaluated=5)
                out.append(sse(last))
        return out


class Server:
    def __init__(self, script, emit):
        self.script = script
        self.emit = emit


def main():
    # Threads hand the GIL over quickly, so the clock reading right after a send is not held
    # back by another connection's thread (default switch interval: 5 ms).
    sys.setswitchinterval(0.0001)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--script", help="JSON script file (default: all defaults)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the listening port here once listening")
    ap.add_argument("--emit-log", help="append one JSON line per exchange here")
    ap.add_argument("--max-conns", type=int, default=0,
                    help="serve at most this many connections at once (0: unlimited)")
    ap.add_argument("--accept-delay-ms", type=float, default=0.0,
                    help="sleep this long before each accept()")
    ap.add_argument("--backlog", type=int, default=256, help="listen() backlog")
    args = ap.parse_args()
    doc = {}
    if args.script:
        with open(args.script) as f:
            doc = json.load(f)
    server = Server(Script(doc), EmitLog(args.emit_log))
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((args.host, args.port))
    lsock.listen(args.backlog)
    port = lsock.getsockname()[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.rename(tmp, args.port_file)
    print("PORT %d" % port, flush=True)
    slots = threading.BoundedSemaphore(args.max_conns) if args.max_conns > 0 else None
    while True:
        if slots is not None:
            slots.acquire()
        if args.accept_delay_ms > 0:
            time.sleep(args.accept_delay_ms / 1000.0)
        sock, addr = lsock.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve_slot, args=(Conn(server, sock, addr), slots),
                         daemon=True).start()


def serve_slot(conn, slots):
    try:
        conn.serve()
    finally:
        if slots is not None:
            slots.release()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
