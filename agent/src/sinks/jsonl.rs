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
    /// The API shape of the response (closed vocabulary, README).
    pub stream_kind: &'static str,
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
    /// Every content event of every choice, in emission order.
    pub token_unix_ns: Vec<u64>,
    /// Choice index of each `token_unix_ns` entry (only with parallel choices, `n > 1`).
    #[serde(skip_serializing_if = "<[u32]>::is_empty")]
    pub token_choice: &'a [u32],
    /// Per-choice figures (only with parallel choices, `n > 1`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<ChoiceLine<'a>>,
    /// GPU attribution (present when GPU data sources are active).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<serde_json::Value>,
    /// The serving container and pod (namespace, pod, container, container_id, pod_uid; present
    /// when pod metadata is on and the process runs in a container).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s: Option<&'a crate::metadata::PodMetadata>,
}

/// One choice of a response with parallel choices.
#[derive(Serialize)]
pub struct ChoiceLine<'a> {
    pub index: u32,
    pub output_tokens: u64,
    pub content_events: u64,
    pub first_token_unix_ns: Option<u64>,
    pub ttft_ms: Option<f64>,
    pub itl_ms_median: Option<f64>,
    pub itl_ms_max: Option<f64>,
    pub finish_reason: Option<&'a str>,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The median of sorted gaps (the upper one for an even count), in ms.
fn median_ms(sorted: &[u64]) -> Option<f64> {
    (!sorted.is_empty()).then(|| ms(sorted[sorted.len() / 2]))
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
            stream_kind: r.stream_kind.as_str(),
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
            itl_ms_median: median_ms(&itl),
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
            token_choice: &r.token_choice,
            choices: r
                .choices
                .iter()
                .map(|c| {
                    let mut gaps: Vec<u64> = r.choice_itl_ns(c.index).collect();
                    gaps.sort_unstable();
                    ChoiceLine {
                        index: c.index,
                        output_tokens: c.output_tokens,
                        content_events: c.content_events,
                        first_token_unix_ns: c.first_token_ns.map(|t| clock.to_unix_ns(t)),
                        ttft_ms: c.first_token_ns.map(|t| ms(t.saturating_sub(r.start_ns))),
                        itl_ms_median: median_ms(&gaps),
                        itl_ms_max: gaps.last().copied().map(ms),
                        finish_reason: c.finish_reason.as_deref(),
                    }
                })
                .collect(),
            gpu: None,
            k8s: r.k8s.as_deref(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ChoiceRecord, StreamKind};

    fn record() -> RequestRecord {
        RequestRecord {
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            stream: true,
            start_ns: 1_000_000,
            first_token_ns: Some(2_000_000),
            end_ns: 9_000_000,
            output_tokens: Some(5),
            stream_kind: StreamKind::OpenaiChat,
            ..Default::default()
        }
    }

    #[test]
    fn single_choice_lines_carry_the_kind_and_no_choice_fields() {
        let clock = Clock::measure();
        let mut r = record();
        r.token_ns = vec![2_000_000, 3_000_000, 5_000_000];
        r.tokens_per_event = vec![1; 3];
        let v = serde_json::to_value(RequestLine::new(&r, &clock)).unwrap();
        assert_eq!(v["stream_kind"], "openai_chat");
        assert!(v.get("choices").is_none() && v.get("token_choice").is_none());
        assert_eq!(v["itl_ms_median"], 2.0);
        assert_eq!(v["content_events"], 3);
    }

    #[test]
    fn parallel_choices_get_per_choice_figures() {
        let clock = Clock::measure();
        let mut r = record();
        // Choice 0 at 2, 3, 4 ms; choice 1 at 2.5, 6 ms.
        r.token_ns = vec![2_000_000, 2_500_000, 3_000_000, 4_000_000, 6_000_000];
        r.tokens_per_event = vec![1; 5];
        r.token_choice = vec![0, 1, 0, 0, 1];
        r.choices = vec![
            ChoiceRecord {
                index: 0,
                output_tokens: 3,
                content_events: 3,
                first_token_ns: Some(2_000_000),
                last_token_ns: Some(4_000_000),
                finish_reason: Some("stop".into()),
            },
            ChoiceRecord {
                index: 1,
                output_tokens: 2,
                content_events: 2,
                first_token_ns: Some(2_500_000),
                last_token_ns: Some(6_000_000),
                finish_reason: Some("length".into()),
            },
        ];
        let v = serde_json::to_value(RequestLine::new(&r, &clock)).unwrap();
        assert_eq!(v["token_choice"], serde_json::json!([0, 1, 0, 0, 1]));
        let c = v["choices"].as_array().unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0]["itl_ms_median"], 1.0);
        assert_eq!(c[0]["itl_ms_max"], 1.0);
        assert_eq!(c[1]["itl_ms_median"], 3.5);
        assert_eq!(c[1]["ttft_ms"], 1.5);
        assert_eq!(c[1]["finish_reason"], "length");
        assert_eq!(c[1]["first_token_unix_ns"], clock.to_unix_ns(2_500_000));
        // Request-level gaps are per choice too: 1, 1 (choice 0) and 3.5 (choice 1).
        assert_eq!(v["itl_ms_max"], 3.5);
        assert_eq!(v["itl_ms_median"], 1.0);
        assert_eq!(v["output_tokens"], 5);
    }

    #[test]
    fn pod_metadata_is_a_k8s_object_and_absent_off_kubernetes() {
        let clock = Clock::measure();
        let mut r = record();
        let v = serde_json::to_value(RequestLine::new(&r, &clock)).unwrap();
        assert!(v.get("k8s").is_none());
        r.k8s = Some(std::sync::Arc::new(crate::metadata::PodMetadata {
            namespace: Some("ml".into()),
            pod: Some("vllm-0".into()),
            container: Some("engine".into()),
            container_id: Some("ab".repeat(32)),
            pod_uid: Some("4c2d8e0a-3b1f-4a6e-9c7d-1e2f3a4b5c6d".into()),
        }));
        let v = serde_json::to_value(RequestLine::new(&r, &clock)).unwrap();
        assert_eq!(
            v["k8s"],
            serde_json::json!({
                "namespace": "ml", "pod": "vllm-0", "container": "engine",
                "container_id": "ab".repeat(32),
                "pod_uid": "4c2d8e0a-3b1f-4a6e-9c7d-1e2f3a4b5c6d",
            })
        );
        // Ids only (kubelet not answered yet): the names are left out, not null.
        r.k8s = Some(std::sync::Arc::new(crate::metadata::PodMetadata {
            container_id: Some("cd".repeat(32)),
            ..Default::default()
        }));
        let v = serde_json::to_value(RequestLine::new(&r, &clock)).unwrap();
        assert_eq!(
            v["k8s"],
            serde_json::json!({"container_id": "cd".repeat(32)})
        );
    }
}
