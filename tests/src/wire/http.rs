//! HTTP/1.1 exchanges out of a reassembled connection, with the wire time of every part that
//! matters for latency: each request's first and last byte, each response's status line, every
//! SSE event / NDJSON line, and the response's end.
//!
//! Bytes are read only to find boundaries and classify events (tests look at their own
//! synthetic traffic); the results hold times, sizes, counts and status codes, never content.

use serde::Serialize;

use super::tcp::{Stream, TcpConn};

/// One connection as the wire saw it.
#[derive(Clone, Debug, Serialize)]
pub struct WireConn {
    /// The client's "ip:port" (the agent's `peer`), as `SocketAddr` displays it.
    pub client: String,
    pub server: String,
    pub syn_unix_ns: Option<u64>,
    pub syn_count: u32,
    pub synack_unix_ns: Option<u64>,
    /// The client's ACK of the SYN-ACK.
    pub established_unix_ns: Option<u64>,
    pub client_fin_unix_ns: Option<u64>,
    pub server_fin_unix_ns: Option<u64>,
    pub rst_unix_ns: Option<u64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub retransmitted_bytes: u64,
    pub out_of_order_segments: u64,
    /// Bytes behind a gap that was never filled (a capture loss): timings after it are unknown.
    pub unfilled_bytes: u64,
    pub exchanges: Vec<WireExchange>,
}

/// One request and its response, in order on the connection.
#[derive(Clone, Debug, Serialize)]
pub struct WireExchange {
    pub seq_on_conn: u32,
    /// Packet carrying the request's first byte (its first transmission: when the client sent
    /// it).
    pub request_first_unix_ns: u64,
    /// The last transmission of the request's first byte: the copy the server's socket
    /// accepted when earlier ones were dropped (a full accept queue drops them). Equal to
    /// `request_first_unix_ns` unless the byte was retransmitted. The agent's arrival is
    /// judged against this one.
    pub request_first_accepted_unix_ns: u64,
    /// When the request's last byte had been on the wire.
    pub request_last_unix_ns: u64,
    pub request_bytes: u64,
    /// False when the connection ended before the whole request was sent.
    pub request_complete: bool,
    /// Method and path of the request line, without the query (`GET /metrics`).
    pub request_target: String,
    pub response: Option<WireResponse>,
}

/// How a response body is split into events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyKind {
    /// `text/event-stream`: one event per blank-line-terminated block with `data:` lines.
    Sse,
    /// `application/x-ndjson` (and JSON-lines types): one event per line.
    Ndjson,
    /// Anything else: no events.
    Plain,
}

/// One SSE event or NDJSON line.
#[derive(Clone, Debug, Serialize)]
pub struct WireEvent {
    /// When the event's last byte had been on the wire (all events a packet completes share
    /// that packet's time).
    pub unix_ns: u64,
    pub bytes: usize,
    /// Carries generated text (a token event).
    pub content: bool,
    /// Tokens it carries (per-token logprobs when present, else 1; 0 for non-content).
    pub tokens: u32,
    /// Its payload has a shape this reference knows (see [`classify_known`]).
    pub recognised: bool,
}

/// A response as the wire saw it.
#[derive(Clone, Debug, Serialize)]
pub struct WireResponse {
    pub status: u16,
    /// Packet carrying the status line's first byte.
    pub status_line_unix_ns: u64,
    pub kind: BodyKind,
    pub events: Vec<WireEvent>,
    /// Times of the content events only (what the agent reports as `token_unix_ns`).
    pub content_unix_ns: Vec<u64>,
    /// When the body's last byte (chunked terminator, last Content-Length byte, or the
    /// server's FIN for a body delimited by close) had been on the wire.
    pub end_unix_ns: Option<u64>,
    pub complete: bool,
    pub body_bytes: u64,
    /// Output tokens from the stream's own usage fields, when it has them.
    pub usage_tokens: Option<u64>,
    /// Tokens counted from the content events.
    pub counted_tokens: u64,
    /// False for a stream of no known shape: it has events but no token semantics.
    pub tokens_known: bool,
}

impl WireResponse {
    /// Usage when present, else counted (what a client reports as output tokens).
    pub fn output_tokens(&self) -> u64 {
        self.usage_tokens.unwrap_or(self.counted_tokens)
    }

    pub fn first_content_unix_ns(&self) -> Option<u64> {
        self.content_unix_ns.first().copied()
    }
}

fn find(h: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > h.len() {
        return None;
    }
    h[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

/// Header fields that frame a message.
#[derive(Default)]
struct Head {
    first_line: String,
    content_length: Option<usize>,
    chunked: bool,
    content_type: String,
}

fn parse_head(raw: &[u8]) -> Head {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n");
    let mut h = Head {
        first_line: lines.next().unwrap_or_default().to_string(),
        ..Default::default()
    };
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
        match k.as_str() {
            "content-length" => h.content_length = v.parse().ok(),
            "transfer-encoding" => h.chunked = v.contains("chunked"),
            "content-type" => h.content_type = v,
            _ => {}
        }
    }
    h
}

/// A decoded body: its bytes and where each contiguous piece lies in the stream.
#[derive(Default)]
struct Body {
    bytes: Vec<u8>,
    /// (body offset, stream offset) of each piece.
    pieces: Vec<(usize, usize)>,
}

impl Body {
    fn push(&mut self, stream: &[u8], a: usize, b: usize) {
        if a < b {
            self.pieces.push((self.bytes.len(), a));
            self.bytes.extend_from_slice(&stream[a..b]);
        }
    }

    fn stream_off(&self, i: usize) -> usize {
        let k = self.pieces.partition_point(|p| p.0 <= i).saturating_sub(1);
        let (b, s) = self.pieces[k];
        s + (i - b)
    }
}

/// Frames a body starting at `at`; returns (decoded body, stream offset after it, complete).
fn frame_body(d: &[u8], at: usize, h: &Head, until_close: bool) -> (Body, usize, bool) {
    let mut body = Body::default();
    if h.chunked {
        let mut pos = at;
        loop {
            let Some(eol) = find(d, b"\r\n", pos) else {
                return (body, d.len(), false);
            };
            let size_text = String::from_utf8_lossy(&d[pos..eol]);
            let Ok(n) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            else {
                return (body, d.len(), false);
            };
            let start = eol + 2;
            if n == 0 {
                // Trailer section ends with an empty line.
                return match find(d, b"\r\n", start) {
                    Some(e) if e == start => (body, start + 2, true),
                    Some(_) => match find(d, b"\r\n\r\n", start) {
                        Some(e) => (body, e + 4, true),
                        None => (body, d.len(), false),
                    },
                    None => (body, d.len(), false),
                };
            }
            let end = start + n;
            body.push(d, start, end.min(d.len()));
            if end + 2 > d.len() {
                return (body, d.len(), false);
            }
            pos = end + 2;
        }
    } else if let Some(n) = h.content_length {
        let end = at + n;
        body.push(d, at, end.min(d.len()));
        (body, end.min(d.len()), end <= d.len())
    } else if until_close {
        body.push(d, at, d.len());
        (body, d.len(), true)
    } else {
        (body, at, true)
    }
}

/// `METHOD /path` of a request's first line (query cut off); empty when it has none.
fn request_target(req: &[u8]) -> String {
    let line_end = find(req, b"\r\n", 0).unwrap_or(req.len());
    let line = String::from_utf8_lossy(&req[..line_end]);
    let mut it = line.split(' ');
    match (it.next(), it.next()) {
        (Some(m), Some(t)) => format!("{m} {}", t.split('?').next().unwrap_or(t)),
        _ => String::new(),
    }
}

/// Request spans on the client → server stream: (start, end, complete, method is HEAD).
fn requests(d: &[u8]) -> Vec<(usize, usize, bool, bool)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < d.len() {
        let Some(he) = find(d, b"\r\n\r\n", pos) else {
            out.push((pos, d.len(), false, false));
            break;
        };
        let h = parse_head(&d[pos..he]);
        let head = h.first_line.starts_with("HEAD ");
        let (_, end, complete) = frame_body(d, he + 4, &h, false);
        out.push((pos, end, complete, head));
        if !complete {
            break;
        }
        pos = end;
    }
    out
}

/// Splits a body into SSE events: (start, end of the terminating blank line, event name, data).
fn sse_events(b: &[u8]) -> Vec<(usize, usize, Option<String>, Option<String>)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    let (mut name, mut data): (Option<String>, Option<String>) = (None, None);
    while let Some(nl) = find(b, b"\n", pos) {
        let mut line = &b[pos..nl];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        pos = nl + 1;
        if line.is_empty() {
            if data.is_some() {
                out.push((start, pos, name.take(), data.take()));
            }
            name = None;
            start = pos;
            continue;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
            None => (text.to_string(), String::new()),
        };
        match field.as_str() {
            "event" => name = Some(value),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&value);
                }
                None => data = Some(value),
            },
            _ => {}
        }
    }
    out
}

/// Classifies one event's payload: (content, tokens it carries, output tokens from usage).
/// Independent of the agent's parsers on purpose.
pub fn classify(event: Option<&str>, data: &str) -> (bool, u32, Option<u64>) {
    classify_known(event, data).unwrap_or((false, 0, None))
}

/// [`classify`], or `None` when the payload is of no shape this reference knows (a stream of
/// such events has no token semantics: every event is timed as a content event).
pub fn classify_known(event: Option<&str>, data: &str) -> Option<(bool, u32, Option<u64>)> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
        return None;
    };
    let kind = event
        .map(str::to_string)
        .or_else(|| v.get("type").and_then(|t| t.as_str()).map(str::to_string));
    let nonempty = |p: &str| {
        v.pointer(p)
            .and_then(|x| x.as_str())
            .is_some_and(|s| !s.is_empty())
    };
    let u = |p: &str| v.pointer(p).and_then(|x| x.as_u64());
    match kind.as_deref() {
        // OpenAI Responses API.
        Some("response.output_text.delta") => {
            let n = v
                .get("logprobs")
                .and_then(|l| l.as_array())
                .map(|l| l.len() as u32)
                .filter(|&n| n > 0)
                .unwrap_or(1);
            return Some((nonempty("/delta"), n, None));
        }
        Some("response.completed") => return Some((false, 0, u("/response/usage/output_tokens"))),
        // Anthropic Messages API.
        Some("content_block_delta") => {
            return Some((
                nonempty("/delta/text") || nonempty("/delta/thinking"),
                1,
                None,
            ))
        }
        Some("message_delta") => return Some((false, 0, u("/usage/output_tokens"))),
        Some(k) if k.starts_with("response.") || k.starts_with("message_") => {
            return Some((false, 0, None))
        }
        Some("content_block_start") | Some("content_block_stop") | Some("ping") => {
            return Some((false, 0, None))
        }
        _ => {}
    }
    if let Some(choices) = v.get("choices").and_then(|c| c.as_array()) {
        // OpenAI Chat Completions / Completions.
        let tokens = crate::client::openai_choice_tokens(choices);
        return Some((tokens > 0, tokens, u("/usage/completion_tokens")));
    }
    // Ollama NDJSON (`/api/generate`: response, `/api/chat`: message.content).
    if v.get("done").is_some() && (v.get("response").is_some() || v.get("message").is_some()) {
        let content = nonempty("/response") || nonempty("/message/content");
        return Some((content, u32::from(content), u("/eval_count")));
    }
    // TGI `/generate_stream`.
    if v.get("token").is_some() {
        let special = v
            .pointer("/token/special")
            .and_then(|s| s.as_bool())
            .unwrap_or(false);
        let content = !special && nonempty("/token/text");
        return Some((content, u32::from(content), u("/details/generated_tokens")));
    }
    // llama.cpp native `/completion`.
    if v.get("content").is_some() {
        let content = nonempty("/content");
        return Some((content, u32::from(content), u("/tokens_predicted")));
    }
    None
}

/// At least two non-empty lines, each a JSON value.
fn json_lines(b: &[u8]) -> bool {
    let lines: Vec<&[u8]> = b
        .split(|&c| c == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|l| !l.is_empty())
        .collect();
    lines.len() >= 2
        && lines
            .iter()
            .all(|l| serde_json::from_slice::<serde_json::Value>(l).is_ok())
}

fn events(body: &Body, kind: BodyKind, s: &Stream) -> Vec<WireEvent> {
    let b = &body.bytes;
    let spans: Vec<(usize, usize, Option<String>, String)> = match kind {
        BodyKind::Sse => sse_events(b)
            .into_iter()
            .filter_map(|(a, e, n, d)| d.map(|d| (a, e, n, d)))
            .collect(),
        BodyKind::Ndjson => {
            let mut out = Vec::new();
            let mut pos = 0;
            while let Some(nl) = find(b, b"\n", pos) {
                let line = String::from_utf8_lossy(&b[pos..nl]).trim().to_string();
                if !line.is_empty() {
                    out.push((pos, nl + 1, None, line));
                }
                pos = nl + 1;
            }
            out
        }
        BodyKind::Plain => Vec::new(),
    };
    spans
        .into_iter()
        .filter_map(|(a, e, name, data)| {
            let (sa, se) = (body.stream_off(a), body.stream_off(e - 1) + 1);
            let t = s.time_of(sa, se)?;
            let known = if data == "[DONE]" {
                Some((false, 0, None))
            } else {
                classify_known(name.as_deref(), &data)
            };
            let (content, tokens, _) = known.unwrap_or((false, 0, None));
            Some(WireEvent {
                unix_ns: t,
                bytes: e - a,
                content,
                tokens: if content { tokens } else { 0 },
                recognised: known.is_some(),
            })
        })
        .collect()
}

fn usage_tokens(body: &Body, kind: BodyKind) -> Option<u64> {
    let b = &body.bytes;
    let mut last = None;
    match kind {
        BodyKind::Sse => {
            for (_, _, n, d) in sse_events(b) {
                if let Some(d) = d {
                    if let (_, _, Some(u)) = classify(n.as_deref(), &d) {
                        last = Some(u);
                    }
                }
            }
        }
        BodyKind::Ndjson => {
            for line in String::from_utf8_lossy(b).lines() {
                if let (_, _, Some(u)) = classify(None, line.trim()) {
                    last = Some(u);
                }
            }
        }
        BodyKind::Plain => {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(b) {
                last = v
                    .pointer("/usage/completion_tokens")
                    .or_else(|| v.pointer("/usage/output_tokens"))
                    .or_else(|| v.get("eval_count"))
                    .and_then(|x| x.as_u64());
            }
        }
    }
    last
}

/// Reads every exchange of a reassembled connection.
pub fn exchanges(c: &TcpConn) -> WireConn {
    let (q, r) = (&c.c2s, &c.s2c);
    let reqs = requests(&q.data);
    let mut out = Vec::new();
    let mut pos = 0;
    for (i, &(a, e, complete, head_method)) in reqs.iter().enumerate() {
        let mut ex = WireExchange {
            seq_on_conn: i as u32,
            request_first_unix_ns: q.time_at(a).unwrap_or(0),
            request_first_accepted_unix_ns: q.last_time_at(a).unwrap_or(0),
            request_last_unix_ns: q.time_of(a, e).unwrap_or(0),
            request_bytes: (e - a) as u64,
            request_complete: complete,
            request_target: request_target(&q.data[a..e]),
            response: None,
        };
        // Responses in order; interim 1xx responses (except 101) precede the final one.
        while pos < r.data.len() {
            let Some(he) = find(&r.data, b"\r\n\r\n", pos) else {
                break;
            };
            let h = parse_head(&r.data[pos..he]);
            let status: u16 = h
                .first_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let start = pos;
            if (100..200).contains(&status) && status != 101 {
                pos = he + 4;
                continue;
            }
            let no_body = head_method || status == 204 || status == 304 || status == 101;
            let kind = if h.content_type.starts_with("text/event-stream") {
                BodyKind::Sse
            } else if h.content_type.contains("ndjson")
                || h.content_type.contains("jsonl")
                || h.content_type.contains("json-lines")
                || h.content_type.contains("json-seq")
            {
                BodyKind::Ndjson
            } else {
                BodyKind::Plain
            };
            let (body, end, complete) = if no_body {
                (Body::default(), he + 4, true)
            } else {
                frame_body(&r.data, he + 4, &h, true)
            };
            let until_close = !no_body && !h.chunked && h.content_length.is_none();
            let end_ns = if until_close {
                r.fin_ns.or_else(|| r.time_of(start, end))
            } else if complete {
                r.time_of(start, end)
            } else {
                None
            };
            // Chunked `application/json` whose lines are each a JSON value is a JSON-lines
            // stream (a single, possibly pretty-printed, document is not).
            let kind = if kind == BodyKind::Plain && h.chunked && json_lines(&body.bytes) {
                BodyKind::Ndjson
            } else {
                kind
            };
            let mut evs = events(&body, kind, r);
            // A stream of no known shape: every event is timed as a content event and its
            // tokens are unknown (what a reader without the shape can say).
            let tokens_known = evs.is_empty() || evs.iter().any(|e| e.recognised);
            if !tokens_known {
                evs.iter_mut().for_each(|e| e.content = true);
            }
            let content_unix_ns: Vec<u64> = evs
                .iter()
                .filter(|e| e.content)
                .map(|e| e.unix_ns)
                .collect();
            let counted = evs.iter().map(|e| u64::from(e.tokens)).sum();
            ex.response = Some(WireResponse {
                status,
                status_line_unix_ns: r.time_at(start).unwrap_or(0),
                kind,
                content_unix_ns,
                end_unix_ns: end_ns,
                complete: complete && (!until_close || r.fin_ns.is_some()),
                body_bytes: body.bytes.len() as u64,
                usage_tokens: usage_tokens(&body, kind),
                counted_tokens: counted,
                tokens_known,
                events: evs,
            });
            pos = end;
            break;
        }
        out.push(ex);
    }
    WireConn {
        client: c.client.to_string(),
        server: c.server.to_string(),
        syn_unix_ns: c.syn_ns,
        syn_count: c.syn_count,
        synack_unix_ns: c.synack_ns,
        established_unix_ns: c.established_ns,
        client_fin_unix_ns: q.fin_ns,
        server_fin_unix_ns: r.fin_ns,
        rst_unix_ns: c.rst_ns,
        request_bytes: q.data.len() as u64,
        response_bytes: r.data.len() as u64,
        retransmitted_bytes: q.retransmitted_bytes + r.retransmitted_bytes,
        out_of_order_segments: q.out_of_order_segments + r.out_of_order_segments,
        unfilled_bytes: q.unfilled_bytes() + r.unfilled_bytes(),
        exchanges: out,
    }
}
