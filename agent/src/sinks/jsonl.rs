//! One JSON line per completed request (`--requests <path|->`), flushed per line so a reader
//! sees each request as soon as it completes. Times are Unix-epoch nanoseconds.

use std::io::Write;

use serde::Serialize;

use crate::{clock::Clock, record::RequestRecord};

/// The wire form of a request line. Field names are part of the CLI contract (README).
#[derive(Serialize)]
pub struct RequestLine<'a> {
    pub pid: u32,
    pub peer: Option<String>,
    pub conn_id: u64,
    pub seq_on_conn: u32,
    pub method: &'a str,
    pub path: &'a str,
    pub status: Option<u16>,
    pub model: Option<&'a str>,
    pub stream: bool,
    /// The request's start (its arrival when the kernel stamped it, else its read).
    pub start_unix_ns: u64,
    /// When the request's first byte reached the server's socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrival_unix_ns: Option<u64>,
    /// When the server read the request's first byte.
    pub read_unix_ns: u64,
    /// New connections: when the handshake completed and when the server accepted it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_unix_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted_unix_ns: Option<u64>,
    /// Time the request waited before the server read it (`read - arrival`, accept queue
    /// included for a new connection's first request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
    /// Of it, the time the connection waited to be accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_queue_ms: Option<f64>,
    pub first_token_unix_ns: Option<u64>,
    pub end_unix_ns: u64,
    pub ttft_ms: Option<f64>,
    pub e2e_ms: f64,
    pub tpot_ms: Option<f64>,
    pub itl_ms_median: Option<f64>,
    pub itl_ms_max: Option<f64>,
    pub output_tokens: Option<u64>,
    pub token_count_source: Option<crate::record::TokenCountSource>,
    pub prompt_tokens: Option<u64>,
    pub content_events: usize,
    pub finish_reason: Option<&'a str>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub error: Option<&'static str>,
    pub token_unix_ns: Vec<u64>,
    /// GPU attribution (present when GPU data sources are active).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<serde_json::Value>,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl<'a> RequestLine<'a> {
    pub fn new(r: &'a RequestRecord, clock: &Clock) -> Self {
        let mut itl: Vec<u64> = r.itl_ns().collect();
        itl.sort_unstable();
        RequestLine {
            pid: r.pid,
            peer: r.peer.map(|p| p.to_string()),
            conn_id: r.conn_id,
            seq_on_conn: r.seq_on_conn,
            method: &r.method,
            path: &r.path,
            status: r.status,
            model: r.model.as_deref(),
            stream: r.stream,
            start_unix_ns: clock.to_unix_ns(r.start_ns),
            arrival_unix_ns: r.arrival_ns.map(|t| clock.to_unix_ns(t)),
            read_unix_ns: clock.to_unix_ns(r.read_ns),
            connected_unix_ns: r.connected_ns.map(|t| clock.to_unix_ns(t)),
            accepted_unix_ns: r.accepted_ns.map(|t| clock.to_unix_ns(t)),
            queue_ms: r.queue_ns().map(ms),
            accept_queue_ms: r.accept_wait_ns().map(ms),
            first_token_unix_ns: r.first_token_ns.map(|t| clock.to_unix_ns(t)),
            end_unix_ns: clock.to_unix_ns(r.end_ns),
            ttft_ms: r.ttft_ns().map(ms),
            e2e_ms: ms(r.e2e_ns()),
            tpot_ms: r.tpot_ns().map(ms),
            itl_ms_median: (!itl.is_empty()).then(|| ms(itl[itl.len() / 2])),
            itl_ms_max: itl.last().copied().map(ms),
            output_tokens: r.output_tokens,
            token_count_source: r.token_count_source,
            prompt_tokens: r.prompt_tokens,
            content_events: r.token_ns.len(),
            finish_reason: r.finish_reason.as_deref(),
            request_bytes: r.request_bytes,
            response_bytes: r.response_bytes,
            error: r.error.map(|e| e.as_str()),
            token_unix_ns: r.token_ns.iter().map(|t| clock.to_unix_ns(*t)).collect(),
            gpu: None,
        }
    }
}

/// Writes request lines to a file or stdout. Write errors are counted, not fatal (a full disk must
/// not stop the agent).
pub struct JsonLines {
    out: Box<dyn Write + Send>,
    pub written: u64,
    pub write_errors: u64,
}

impl JsonLines {
    /// `-` is stdout; anything else a file, appended to.
    pub fn open(target: &str) -> anyhow::Result<Self> {
        let out: Box<dyn Write + Send> = if target == "-" {
            Box::new(std::io::stdout())
        } else {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(target)
                .map_err(|e| anyhow::anyhow!("opening --requests {target}: {e}"))?;
            Box::new(std::io::BufWriter::new(f))
        };
        Ok(Self {
            out,
            written: 0,
            write_errors: 0,
        })
    }

    pub fn write(&mut self, line: &RequestLine<'_>) {
        let res = serde_json::to_writer(&mut self.out, line)
            .map_err(std::io::Error::other)
            .and_then(|_| self.out.write_all(b"\n"))
            .and_then(|_| self.out.flush());
        match res {
            Ok(()) => self.written += 1,
            Err(_) => self.write_errors += 1,
        }
    }
}

/// A short human-readable line for the terminal (`--print`).
pub fn human_line(r: &RequestRecord) -> String {
    let mut itl: Vec<u64> = r.itl_ns().collect();
    itl.sort_unstable();
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    format!(
        "pid={} {} {} {} status={} ttft_ms={} itl_ms_p50={} e2e_ms={:.1} tokens={} {}",
        r.pid,
        r.peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
        r.method,
        r.path,
        r.status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into()),
        opt(r.ttft_ns().map(ms)),
        opt((!itl.is_empty()).then(|| ms(itl[itl.len() / 2]))),
        ms(r.e2e_ns()),
        r.output_tokens
            .map(|t| t.to_string())
            .unwrap_or_else(|| "-".into()),
        r.error.map(|e| e.as_str()).unwrap_or("ok"),
    )
}
