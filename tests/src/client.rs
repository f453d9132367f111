//! A small, independent streaming HTTP/1.1 client for OpenAI-compatible servers.
//!
//! It measures what a benchmark client measures (send time, time to first content event, arrival
//! of every content event, token counts) so tests can hold the agent's numbers against it. It
//! shares no code with the agent's parsers on purpose: a bug in one should not hide in the other.
//! Times are CLOCK_REALTIME nanoseconds, the clock the agent uses in its JSON lines.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Wall-clock now, in Unix nanoseconds.
pub fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The two OpenAI endpoints we drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// One request to send.
#[derive(Clone, Debug)]
pub struct RequestSpec {
    pub endpoint: Endpoint,
    pub stream: bool,
    pub max_tokens: u32,
    pub model: Option<String>,
    pub prompt: String,
    /// Extra request headers (e.g. `X-Scenario` for the scripted server).
    pub headers: Vec<(String, String)>,
    /// Drop the connection after this many content events (a client disconnecting mid-stream).
    pub abort_after_events: Option<u32>,
    /// With `abort_after_events`: reset (SO_LINGER 0) instead of a normal close.
    pub abort_with_reset: bool,
}

impl RequestSpec {
    pub fn new(endpoint: Endpoint, max_tokens: u32) -> Self {
        RequestSpec {
            endpoint,
            stream: true,
            max_tokens,
            model: None,
            prompt: "Write a short story about a lighthouse keeper.".into(),
            headers: Vec::new(),
            abort_after_events: None,
            abort_with_reset: false,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn body(&self) -> Vec<u8> {
        let mut v = match self.endpoint {
            Endpoint::Chat => serde_json::json!({
                "messages": [{"role": "user", "content": self.prompt}],
            }),
            Endpoint::Completions => serde_json::json!({ "prompt": self.prompt }),
        };
        v["max_tokens"] = self.max_tokens.into();
        v["stream"] = self.stream.into();
        if self.stream {
            v["stream_options"] = serde_json::json!({"include_usage": true});
        }
        if let Some(m) = &self.model {
            v["model"] = m.clone().into();
        }
        serde_json::to_vec(&v).expect("json")
    }
}

/// What the client saw of one exchange. `local_addr` and `seq_on_conn` are the join key with the
/// agent's `peer` and `seq_on_conn`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientRecord {
    pub local_addr: String,
    /// Which load-generator connection slot sent it.
    pub conn_index: u32,
    pub seq_on_conn: u32,
    pub path: String,
    pub stream: bool,
    pub status: Option<u16>,
    /// Just before the request was written.
    pub send_unix_ns: u64,
    /// Arrival of the response head.
    pub response_start_unix_ns: Option<u64>,
    pub first_token_unix_ns: Option<u64>,
    pub end_unix_ns: u64,
    pub ttft_ms: Option<f64>,
    pub e2e_ms: f64,
    /// Arrival of every content event (the read that completed it).
    pub event_unix_ns: Vec<u64>,
    pub tokens_per_event: Vec<u32>,
    /// Tokens counted from the content events.
    pub counted_tokens: u64,
    /// `usage.completion_tokens`, when the server sent usage.
    pub usage_completion_tokens: Option<u64>,
    /// Usage when present, else counted.
    pub output_tokens: u64,
    pub saw_done: bool,
    pub error: Option<String>,
}

impl ClientRecord {
    pub fn itl_ns(&self) -> impl Iterator<Item = u64> + '_ {
        self.event_unix_ns
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]))
    }
}

/// One keep-alive connection.
pub struct ClientConn {
    stream: TcpStream,
    local: SocketAddr,
    host: String,
    seq: u32,
    buf: Vec<u8>,
    reusable: bool,
    pub conn_index: u32,
    /// Limit for a whole exchange; a stalled server becomes an error, not a hang.
    pub timeout: Duration,
}

impl ClientConn {
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        Ok(ClientConn {
            stream,
            local,
            host: addr.to_string(),
            seq: 0,
            buf: Vec::new(),
            reusable: true,
            conn_index: 0,
            timeout: Duration::from_secs(300),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// False once the server asked to close, the exchange failed, or the client aborted.
    pub fn is_reusable(&self) -> bool {
        self.reusable
    }

    /// Sends one request and reads its whole response. Failures are recorded in the record's
    /// `error` (and make the connection non-reusable); they never panic.
    pub async fn request(&mut self, spec: &RequestSpec) -> ClientRecord {
        let mut rec = ClientRecord {
            local_addr: self.local.to_string(),
            conn_index: self.conn_index,
            seq_on_conn: self.seq,
            path: spec.endpoint.path().into(),
            stream: spec.stream,
            ..Default::default()
        };
        self.seq += 1;
        let res = tokio::time::timeout(self.timeout, self.exchange(spec, &mut rec)).await;
        let err = match res {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some("timeout".to_string()),
        };
        if err.is_some() {
            self.reusable = false;
        }
        rec.error = rec.error.take().or(err);
        if rec.end_unix_ns == 0 {
            rec.end_unix_ns = now_unix_ns();
        }
        rec.e2e_ms = ms(rec.end_unix_ns.saturating_sub(rec.send_unix_ns));
        rec.ttft_ms = rec
            .first_token_unix_ns
            .map(|t| ms(t.saturating_sub(rec.send_unix_ns)));
        rec.output_tokens = rec.usage_completion_tokens.unwrap_or(rec.counted_tokens);
        rec
    }

    async fn exchange(&mut self, spec: &RequestSpec, rec: &mut ClientRecord) -> Result<()> {
        let body = spec.body();
        let mut req = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Accept: text/event-stream\r\nContent-Length: {}\r\n",
            spec.endpoint.path(),
            self.host,
            body.len()
        );
        for (k, v) in &spec.headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut wire = req.into_bytes();
        wire.extend_from_slice(&body);
        rec.send_unix_ns = now_unix_ns();
        self.stream.write_all(&wire).await.context("send request")?;

        // Response head.
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            self.read_more()
                .await?
                .context("connection closed before response head")?;
        };
        rec.response_start_unix_ns = Some(now_unix_ns());
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            bail!("bad status line {status_line:?}");
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        rec.status = Some(status);
        let mut chunked = false;
        let mut length: Option<usize> = None;
        let mut close = version == "HTTP/1.0";
        let mut event_stream = false;
        for line in lines {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "transfer-encoding" => chunked = v.contains("chunked"),
                "content-length" => length = v.parse().ok(),
                "connection" => close = v.contains("close"),
                "content-type" => event_stream = v.starts_with("text/event-stream"),
                _ => {}
            }
        }
        if close {
            self.reusable = false;
        }
        let framing = if chunked {
            Framing::Chunked(Dechunker::default())
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            self.reusable = false;
            Framing::UntilClose
        };
        let mut body = BodyReader {
            framing,
            sse: event_stream.then(SseSplitter::default),
            json: Vec::new(),
            done: false,
        };
        let mut at = rec.response_start_unix_ns.unwrap_or_else(now_unix_ns);
        loop {
            let data = std::mem::take(&mut self.buf);
            let consumed = body.feed(&data, at, rec)?;
            self.buf = data[consumed..].to_vec();
            if body.done {
                break;
            }
            if let Some(k) = spec.abort_after_events {
                if rec.event_unix_ns.len() as u32 >= k {
                    self.abort(spec.abort_with_reset);
                    rec.end_unix_ns = now_unix_ns();
                    rec.error = Some("client_abort".into());
                    return Ok(());
                }
            }
            match self.read_more().await? {
                Some(_) => at = now_unix_ns(),
                None => {
                    if matches!(body.framing, Framing::UntilClose) {
                        break;
                    }
                    self.reusable = false;
                    rec.end_unix_ns = now_unix_ns();
                    bail!("server closed mid-response");
                }
            }
        }
        rec.end_unix_ns = at;
        if !event_stream {
            body.finish_json(rec);
        }
        Ok(())
    }

    async fn read_more(&mut self) -> Result<Option<usize>> {
        let mut tmp = [0u8; 65536];
        let n = self.stream.read(&mut tmp).await.context("read")?;
        if n == 0 {
            self.reusable = false;
            return Ok(None);
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(Some(n))
    }

    fn abort(&mut self, reset: bool) {
        self.reusable = false;
        if reset {
            set_linger_zero(&self.stream);
        }
        // Shutting down both directions sends FIN (or RST with linger 0 once dropped by the
        // caller); the fd itself closes when the connection is dropped.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.stream);
        if !reset {
            // SAFETY: fd is a valid socket owned by self.stream.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

/// Makes the next close of this socket send RST.
pub fn set_linger_zero<S: std::os::fd::AsRawFd>(sock: &S) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, correctly sized option value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

enum Framing {
    Chunked(Dechunker),
    Length(usize),
    UntilClose,
}

struct BodyReader {
    framing: Framing,
    sse: Option<SseSplitter>,
    json: Vec<u8>,
    done: bool,
}

impl BodyReader {
    /// Feeds wire bytes that arrived at `at`; returns how many were consumed (the rest belongs
    /// to the next response).
    fn feed(&mut self, data: &[u8], at: u64, rec: &mut ClientRecord) -> Result<usize> {
        let mut payload = Vec::new();
        let consumed = match &mut self.framing {
            Framing::Chunked(d) => {
                let n = d.feed(data, &mut payload)?;
                self.done = d.done;
                n
            }
            Framing::Length(left) => {
                let n = (*left).min(data.len());
                payload.extend_from_slice(&data[..n]);
                *left -= n;
                self.done = *left == 0;
                n
            }
            Framing::UntilClose => {
                payload.extend_from_slice(data);
                data.len()
            }
        };
        match &mut self.sse {
            Some(s) => {
                for ev in s.feed(&payload) {
                    on_event(&ev, at, rec);
                }
            }
            None => self.json.extend_from_slice(&payload),
        }
        Ok(consumed)
    }

    fn finish_json(&mut self, rec: &mut ClientRecord) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.json) else {
            return;
        };
        if let Some(u) = v
            .pointer("/usage/completion_tokens")
            .and_then(|u| u.as_u64())
        {
            rec.usage_completion_tokens = Some(u);
        }
    }
}

/// Handles one SSE event's data payload.
/// Tokens an OpenAI Chat Completions / Completions event carries over its `choices`: for each
/// choice with text, its per-token logprobs entries, else one. The client's and the wire
/// reference's reading of a chunk (both independent of the agent's parsers).
pub fn openai_choice_tokens(choices: &[serde_json::Value]) -> u32 {
    choices
        .iter()
        .map(|c| {
            let text = c
                .pointer("/delta/content")
                .or_else(|| c.get("text"))
                .and_then(|t| t.as_str())
                .unwrap_or("");
            if text.is_empty() {
                return 0;
            }
            c.pointer("/logprobs/content")
                .or_else(|| c.pointer("/logprobs/tokens"))
                .and_then(|l| l.as_array())
                .map(|a| a.len() as u32)
                .filter(|&n| n > 0)
                .unwrap_or(1)
        })
        .sum()
}

fn on_event(data: &str, at: u64, rec: &mut ClientRecord) {
    if data.trim() == "[DONE]" {
        rec.saw_done = true;
        return;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
        return;
    };
    if let Some(u) = v
        .pointer("/usage/completion_tokens")
        .and_then(|u| u.as_u64())
    {
        rec.usage_completion_tokens = Some(u);
    }
    let tokens = v["choices"]
        .as_array()
        .map_or(0, |c| openai_choice_tokens(c));
    if tokens > 0 {
        if rec.first_token_unix_ns.is_none() {
            rec.first_token_unix_ns = Some(at);
        }
        rec.event_unix_ns.push(at);
        rec.tokens_per_event.push(tokens);
        rec.counted_tokens += tokens as u64;
    }
}

/// Incremental `Transfer-Encoding: chunked` decoder.
#[derive(Default)]
struct Dechunker {
    /// Bytes left in the current chunk's data, `None` while reading a size line.
    left: Option<usize>,
    /// Expecting the CRLF after a chunk's data.
    want_crlf: bool,
    last_chunk: bool,
    done: bool,
}

impl Dechunker {
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize> {
        let mut i = 0;
        while i < data.len() && !self.done {
            if self.want_crlf {
                let rest = &data[i..];
                if rest.len() < 2 {
                    return Ok(i);
                }
                if &rest[..2] != b"\r\n" {
                    bail!("chunk not followed by CRLF");
                }
                i += 2;
                self.want_crlf = false;
                if self.last_chunk {
                    self.done = true;
                }
                continue;
            }
            match self.left {
                None => {
                    let Some(eol) = find(&data[i..], b"\r\n") else {
                        return Ok(i);
                    };
                    let line = std::str::from_utf8(&data[i..i + eol]).context("chunk size")?;
                    let size =
                        usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                            .with_context(|| format!("bad chunk size {line:?}"))?;
                    i += eol + 2;
                    if size == 0 {
                        // No trailers expected; the final CRLF ends the body.
                        self.last_chunk = true;
                        self.want_crlf = true;
                    } else {
                        self.left = Some(size);
                    }
                }
                Some(left) => {
                    let n = left.min(data.len() - i);
                    out.extend_from_slice(&data[i..i + n]);
                    i += n;
                    if n == left {
                        self.left = None;
                        self.want_crlf = true;
                    } else {
                        self.left = Some(left - n);
                    }
                }
            }
        }
        Ok(i)
    }
}

/// Splits an SSE body into events, returning each event's joined `data:` lines.
#[derive(Default)]
struct SseSplitter {
    pending: Vec<u8>,
}

impl SseSplitter {
    fn feed(&mut self, data: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(data);
        let mut events = Vec::new();
        loop {
            let lf = find(&self.pending, b"\n\n").map(|i| (i, 2));
            let crlf = find(&self.pending, b"\r\n\r\n").map(|i| (i, 4));
            let end = match (lf, crlf) {
                (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
                (a, b) => a.or(b),
            };
            let Some((at, sep)) = end else { break };
            let raw: Vec<u8> = self.pending.drain(..at + sep).collect();
            let text = String::from_utf8_lossy(&raw[..at]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunker_handles_any_split() {
        let wire = b"5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\nNEXT";
        for cut in 0..wire.len() {
            let mut d = Dechunker::default();
            let mut out = Vec::new();
            let mut pending = wire[..cut].to_vec();
            let n = d.feed(&pending, &mut out).unwrap();
            pending.drain(..n);
            pending.extend_from_slice(&wire[cut..]);
            let m = d.feed(&pending, &mut out).unwrap();
            assert_eq!(out, b"hello world", "cut at {cut}");
            assert!(d.done);
            assert_eq!(&pending[m..], b"NEXT");
        }
    }

    #[test]
    fn sse_counts_content_events_only() {
        let mut rec = ClientRecord::default();
        let mut s = SseSplitter::default();
        let body = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\r\n\r\n",
            "data: {\"choices\":[{\"text\":\"a\",\"logprobs\":{\"tokens\":[\"a\",\"b\"]}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"completion_tokens\":3}}\n\n",
            "data: [DONE]\n\n"
        );
        for (i, b) in body.as_bytes().chunks(7).enumerate() {
            for ev in s.feed(b) {
                on_event(&ev, i as u64, &mut rec);
            }
        }
        assert_eq!(rec.tokens_per_event, vec![1, 2]);
        assert_eq!(rec.counted_tokens, 3);
        assert_eq!(rec.usage_completion_tokens, Some(3));
        assert!(rec.saw_done);
        assert_eq!(rec.event_unix_ns.len(), 2);
    }
}
