//! One OTLP span per completed request, following the OpenTelemetry GenAI and HTTP semantic
//! conventions where they define a field, with infertap's own figures under `infertap.*`.
//!
//! Every time and derived figure is taken from the request's [`RequestLine`] (the JSON line of
//! the same request), so a span and its JSON line always agree exactly. No prompt or completion
//! text is read: the record holds none.
//!
//! Shape (README "OTLP" lists it too):
//! - kind `SERVER`; start = the request's start (arrival at the socket, else the server's read),
//!   end = its last response byte;
//! - name `{gen_ai.operation.name} {gen_ai.request.model}` (e.g. `chat smollm2`) for a known
//!   LLM API shape, `{method} {path}` otherwise;
//! - status `ERROR` for 5xx and cut-off exchanges (`error.type` says which); a 4xx leaves the
//!   status unset, as the HTTP conventions ask of server spans (`infertap.outcome` still says
//!   `http_4xx`);
//! - events `infertap.first_token` (at the first content event) and up to
//!   [`MAX_SLOW_TOKEN_EVENTS`] `infertap.slow_token` (at the end of each slow token gap, longest
//!   first; slow = longer than [`SLOW_GAP_FACTOR`] × the request's median gap, the definition
//!   the GPU correlation and `explain` use).

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span, status, Span, Status};

use crate::clock::Clock;
use crate::gpu::correlate::{dominant_cause, RequestGpuStats};
use crate::record::{RequestError, RequestRecord, StreamKind};
use crate::sinks::jsonl::RequestLine;

/// A gap is slow when longer than this × the request's median gap (as in the GPU correlation's
/// default `slow_gap_factor`).
pub const SLOW_GAP_FACTOR: f64 = 3.0;
/// Most `infertap.slow_token` events per span (the longest gaps).
pub const MAX_SLOW_TOKEN_EVENTS: usize = 5;

/// Name of the event at the first content event.
pub const EVENT_FIRST_TOKEN: &str = "infertap.first_token";
/// Name of the event at the end of a slow token gap.
pub const EVENT_SLOW_TOKEN: &str = "infertap.slow_token";

/// A span and the traced process it belongs to (spans are grouped by process into resources).
#[derive(Clone, Debug, PartialEq)]
pub struct RequestSpan {
    pub pid: u32,
    pub span: Span,
}

pub(crate) use infertap_proto::otlp::{kv, kv_i64, kv_str};

fn kv_u64(key: &str, v: u64) -> KeyValue {
    kv_i64(key, i64::try_from(v).unwrap_or(i64::MAX))
}

fn kv_f64(key: &str, v: f64) -> KeyValue {
    kv(key, any_value::Value::DoubleValue(v))
}

fn kv_bool(key: &str, v: bool) -> KeyValue {
    kv(key, any_value::Value::BoolValue(v))
}

fn kv_str_array(key: &str, values: Vec<String>) -> KeyValue {
    kv(
        key,
        any_value::Value::ArrayValue(ArrayValue {
            values: values
                .into_iter()
                .map(|v| AnyValue {
                    value: Some(any_value::Value::StringValue(v)),
                })
                .collect(),
        }),
    )
}

/// `gen_ai.operation.name` for the API shapes whose operation is known (Ollama speaks one
/// shape for `/api/chat` and `/api/generate`: the path tells them apart).
pub fn operation_name(kind: StreamKind, path: &str) -> Option<&'static str> {
    match kind {
        StreamKind::Ollama if path.ends_with("/chat") => Some("chat"),
        StreamKind::Ollama => Some("text_completion"),
        StreamKind::OpenaiChat | StreamKind::OpenaiResponses | StreamKind::AnthropicMessages => {
            Some("chat")
        }
        StreamKind::OpenaiCompletion | StreamKind::Tgi | StreamKind::Llamacpp => {
            Some("text_completion")
        }
        StreamKind::Unknown | StreamKind::JsonLines => None,
    }
}

/// Random, non-zero ids (no upstream trace context is visible to the agent).
fn random_bytes<const N: usize>() -> [u8; N] {
    use std::hash::BuildHasher;
    let mut out = [0u8; N];
    // RandomState is seeded from the OS once per process and then per instance: every call
    // yields fresh, unpredictable 64-bit values without a new dependency.
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let v = std::collections::hash_map::RandomState::new().hash_one(i);
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
    if out.iter().all(|b| *b == 0) {
        out[N - 1] = 1;
    }
    out
}

/// Builds the span of one completed request. `line` must be the request's JSON line built with
/// the same `clock` (its times and derived figures are reused, so both outputs agree).
pub fn request_span(
    r: &RequestRecord,
    line: &RequestLine<'_>,
    gpu: Option<&RequestGpuStats>,
    clock: &Clock,
) -> RequestSpan {
    let op = operation_name(r.stream_kind, &r.path);
    let name = match (op, r.model.as_deref()) {
        (Some(op), Some(model)) => format!("{op} {model}"),
        (Some(op), None) => op.to_owned(),
        _ => format!("{} {}", r.method, r.path),
    };
    let mut a: Vec<KeyValue> = Vec::with_capacity(40);
    // HTTP server conventions.
    a.push(kv_str("http.request.method", r.method.clone()));
    a.push(kv_str("url.path", r.path.clone()));
    a.push(kv_str("url.scheme", "http"));
    a.push(kv_str("network.protocol.name", "http"));
    a.push(kv_str("network.protocol.version", "1.1"));
    if let Some(s) = r.status {
        a.push(kv_i64("http.response.status_code", i64::from(s)));
    }
    if let Some(p) = r.peer {
        a.push(kv_str("client.address", p.ip().to_string()));
        a.push(kv_i64("client.port", i64::from(p.port())));
    }
    // GenAI conventions.
    if let Some(op) = op {
        a.push(kv_str("gen_ai.operation.name", op));
    }
    if let Some(m) = &r.model {
        a.push(kv_str("gen_ai.request.model", m.clone()));
    }
    if let Some(n) = r.prompt_tokens {
        a.push(kv_u64("gen_ai.usage.input_tokens", n));
    }
    if let Some(n) = r.output_tokens {
        a.push(kv_u64("gen_ai.usage.output_tokens", n));
    }
    let finish: Vec<String> = if r.choices.is_empty() {
        r.finish_reason.iter().cloned().collect()
    } else {
        r.choices
            .iter()
            .filter_map(|c| c.finish_reason.clone())
            .collect()
    };
    if !finish.is_empty() {
        a.push(kv_str_array("gen_ai.response.finish_reasons", finish));
    }
    // Errors: 5xx and cut-off exchanges are errors of this server span; 4xx are the client's.
    let error_type = match r.error {
        None | Some(RequestError::Http4xx) => None,
        Some(RequestError::Http5xx) => Some(
            r.status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "http_5xx".into()),
        ),
        Some(e) => Some(e.as_str().to_owned()),
    };
    if let Some(t) = &error_type {
        a.push(kv_str("error.type", t.clone()));
    }
    // infertap's own figures (the JSON line's, same names where they exist there).
    a.push(kv_str(
        "infertap.outcome",
        r.error
            .map_or(infertap_proto::schema::OUTCOME_OK, |e| e.as_str()),
    ));
    a.push(kv_str("infertap.stream_kind", line.stream_kind));
    a.push(kv_bool("infertap.stream", r.stream));
    if let Some(s) = r.token_count_source {
        a.push(kv_str(
            "infertap.token_count_source",
            match s {
                crate::record::TokenCountSource::Usage => "usage",
                crate::record::TokenCountSource::Counted => "counted",
            },
        ));
    }
    let opt_ms = |a: &mut Vec<KeyValue>, key: &str, v: Option<f64>| {
        if let Some(v) = v {
            a.push(kv_f64(key, v));
        }
    };
    opt_ms(&mut a, "infertap.ttft_ms", line.ttft_ms);
    opt_ms(&mut a, "infertap.tpot_ms", line.tpot_ms);
    opt_ms(&mut a, "infertap.itl_ms_median", line.itl_ms_median);
    opt_ms(&mut a, "infertap.itl_ms_max", line.itl_ms_max);
    opt_ms(&mut a, "infertap.queue_ms", line.queue_ms);
    opt_ms(&mut a, "infertap.accept_queue_ms", line.accept_queue_ms);
    a.push(kv_f64("infertap.e2e_ms", line.e2e_ms));
    a.push(kv_u64(
        "infertap.content_events",
        line.content_events as u64,
    ));
    a.push(kv_u64("infertap.request_bytes", r.request_bytes));
    a.push(kv_u64("infertap.response_bytes", r.response_bytes));
    a.push(kv_u64("infertap.conn_id", r.conn_id));
    a.push(kv_i64("infertap.seq_on_conn", i64::from(r.seq_on_conn)));
    if r.choices.len() > 1 {
        a.push(kv_i64("infertap.choices", r.choices.len() as i64));
    }
    if let Some(g) = gpu {
        a.push(kv_f64("infertap.gpu.busy_ms", g.gpu_busy_ms));
        a.push(kv_u64("infertap.gpu.kernel_count", g.kernel_count));
        a.push(kv_u64("infertap.gpu.graph_count", g.graph_count));
        a.push(kv_u64("infertap.gpu.memcpy_bytes", g.memcpy_bytes));
        a.push(kv_f64("infertap.gpu.mean_concurrency", g.mean_concurrency));
        opt_ms(&mut a, "infertap.gpu.energy_j", g.energy_j);
        opt_ms(
            &mut a,
            "infertap.gpu.energy_j_per_token",
            g.energy_j_per_token,
        );
        if g.partial {
            a.push(kv_bool("infertap.gpu.partial", true));
        }
    }

    let mut events = Vec::new();
    if let (Some(t), Some(ttft)) = (line.first_token_unix_ns, line.ttft_ms) {
        events.push(span::Event {
            time_unix_nano: t,
            name: EVENT_FIRST_TOKEN.into(),
            attributes: vec![kv_f64("infertap.ttft_ms", ttft)],
            dropped_attributes_count: 0,
        });
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    match gpu.filter(|g| !g.slow_tokens.is_empty()) {
        // The GPU correlation already picked and explained the slow gaps.
        Some(g) => {
            for t in g.slow_tokens.iter().take(MAX_SLOW_TOKEN_EVENTS) {
                let mut attrs = vec![
                    kv_u64("infertap.token_index", t.token_index as u64),
                    kv_f64("infertap.gap_ms", ms(t.gap_ns)),
                    kv_str("infertap.slow_token.cause", dominant_cause(t)),
                    kv_f64("infertap.gpu.busy_ms", ms(t.gpu_busy_ns)),
                    kv_f64("infertap.gpu.sync_wait_ms", ms(t.sync_wait_ns)),
                    kv_f64("infertap.gpu.launch_ms", ms(t.launch_ns)),
                    kv_f64("infertap.gpu.idle_ms", ms(t.idle_ns)),
                ];
                if let Some(m) = g.median_itl_ns {
                    attrs.push(kv_f64("infertap.itl_ms_median", ms(m)));
                }
                events.push(span::Event {
                    time_unix_nano: clock.to_unix_ns(t.start_ns.saturating_add(t.gap_ns)),
                    name: EVENT_SLOW_TOKEN.into(),
                    attributes: attrs,
                    dropped_attributes_count: 0,
                });
            }
        }
        None => {
            let gaps = r.slow_gaps(SLOW_GAP_FACTOR, MAX_SLOW_TOKEN_EVENTS);
            for t in &gaps.slow {
                let mut attrs = vec![
                    kv_u64("infertap.token_index", t.token_index as u64),
                    kv_f64("infertap.gap_ms", ms(t.gap_ns())),
                ];
                if let Some(m) = gaps.median_ns {
                    attrs.push(kv_f64("infertap.itl_ms_median", ms(m)));
                }
                events.push(span::Event {
                    time_unix_nano: clock.to_unix_ns(t.end_ns),
                    name: EVENT_SLOW_TOKEN.into(),
                    attributes: attrs,
                    dropped_attributes_count: 0,
                });
            }
        }
    }

    let status = error_type.as_ref().map(|t| Status {
        message: t.clone(),
        code: status::StatusCode::Error as i32,
    });
    RequestSpan {
        pid: r.pid,
        span: Span {
            trace_id: random_bytes::<16>().to_vec(),
            span_id: random_bytes::<8>().to_vec(),
            name,
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: line.start_unix_ns,
            end_time_unix_nano: line.end_unix_ns,
            attributes: a,
            events,
            status,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ChoiceRecord, TokenCountSource};

    fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a any_value::Value> {
        s.attributes
            .iter()
            .find(|k| k.key == key)
            .and_then(|k| k.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    fn chat() -> RequestRecord {
        RequestRecord {
            pid: 42,
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status: Some(200),
            model: Some("smollm2".into()),
            stream: true,
            stream_kind: StreamKind::OpenaiChat,
            start_ns: 1_000_000,
            read_ns: 1_200_000,
            arrival_ns: Some(1_000_000),
            first_token_ns: Some(5_000_000),
            // Gaps 1, 1, 1, 10, 1 ms: one slow gap (the 10 ms one, ending event 4).
            token_ns: vec![
                5_000_000, 6_000_000, 7_000_000, 8_000_000, 18_000_000, 19_000_000,
            ],
            tokens_per_event: vec![1; 6],
            end_ns: 20_000_000,
            output_tokens: Some(6),
            token_count_source: Some(TokenCountSource::Usage),
            prompt_tokens: Some(11),
            finish_reason: Some("stop".into()),
            peer: Some("127.0.0.1:5555".parse().unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn chat_span_follows_genai_conventions_and_the_json_line() {
        let clock = Clock::measure();
        let r = chat();
        let line = RequestLine::new(&r, &clock);
        let s = request_span(&r, &line, None, &clock).span;
        assert_eq!(s.name, "chat smollm2");
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        assert_eq!(s.start_time_unix_nano, line.start_unix_ns);
        assert_eq!(s.end_time_unix_nano, line.end_unix_ns);
        assert_eq!(s.trace_id.len(), 16);
        assert_eq!(s.span_id.len(), 8);
        let sv = |v: &str| any_value::Value::StringValue(v.into());
        assert_eq!(attr(&s, "gen_ai.operation.name"), Some(&sv("chat")));
        assert_eq!(attr(&s, "gen_ai.request.model"), Some(&sv("smollm2")));
        assert_eq!(
            attr(&s, "gen_ai.usage.input_tokens"),
            Some(&any_value::Value::IntValue(11))
        );
        assert_eq!(
            attr(&s, "gen_ai.usage.output_tokens"),
            Some(&any_value::Value::IntValue(6))
        );
        assert_eq!(
            attr(&s, "infertap.ttft_ms"),
            Some(&any_value::Value::DoubleValue(4.0))
        );
        assert_eq!(
            attr(&s, "infertap.queue_ms"),
            Some(&any_value::Value::DoubleValue(0.2))
        );
        let Some(any_value::Value::ArrayValue(fr)) = attr(&s, "gen_ai.response.finish_reasons")
        else {
            panic!("finish reasons missing")
        };
        assert_eq!(fr.values.len(), 1);
        assert_eq!(
            attr(&s, "client.port"),
            Some(&any_value::Value::IntValue(5555))
        );
        assert!(s.status.is_none());
        assert!(attr(&s, "error.type").is_none());
        // One first-token event and one slow-token event, at the line's times.
        assert_eq!(s.events.len(), 2);
        assert_eq!(s.events[0].name, EVENT_FIRST_TOKEN);
        assert_eq!(Some(s.events[0].time_unix_nano), line.first_token_unix_ns);
        assert_eq!(s.events[1].name, EVENT_SLOW_TOKEN);
        assert_eq!(s.events[1].time_unix_nano, line.token_unix_ns[4]);
    }

    #[test]
    fn errors_set_status_and_error_type_but_4xx_does_not() {
        let clock = Clock::measure();
        let mut r = chat();
        r.status = Some(503);
        r.error = Some(RequestError::Http5xx);
        let line = RequestLine::new(&r, &clock);
        let s = request_span(&r, &line, None, &clock).span;
        assert_eq!(
            s.status.as_ref().map(|s| s.code),
            Some(status::StatusCode::Error as i32)
        );
        assert_eq!(
            attr(&s, "error.type"),
            Some(&any_value::Value::StringValue("503".into()))
        );
        r.error = Some(RequestError::ClientDisconnect);
        let s = request_span(&r, &RequestLine::new(&r, &clock), None, &clock).span;
        assert_eq!(
            attr(&s, "error.type"),
            Some(&any_value::Value::StringValue("client_disconnect".into()))
        );
        r.status = Some(404);
        r.error = Some(RequestError::Http4xx);
        let s = request_span(&r, &RequestLine::new(&r, &clock), None, &clock).span;
        assert!(s.status.is_none() && attr(&s, "error.type").is_none());
        assert_eq!(
            attr(&s, "infertap.outcome"),
            Some(&any_value::Value::StringValue("http_4xx".into()))
        );
    }

    #[test]
    fn unknown_shapes_are_named_by_method_and_path_and_choices_list_their_reasons() {
        let clock = Clock::measure();
        let mut r = chat();
        r.stream_kind = StreamKind::Unknown;
        r.path = "/health".into();
        r.method = "GET".into();
        let s = request_span(&r, &RequestLine::new(&r, &clock), None, &clock).span;
        assert_eq!(s.name, "GET /health");
        assert!(attr(&s, "gen_ai.operation.name").is_none());
        let mut r = chat();
        r.choices = vec![
            ChoiceRecord {
                index: 0,
                finish_reason: Some("stop".into()),
                ..Default::default()
            },
            ChoiceRecord {
                index: 1,
                finish_reason: Some("length".into()),
                ..Default::default()
            },
        ];
        let s = request_span(&r, &RequestLine::new(&r, &clock), None, &clock).span;
        let Some(any_value::Value::ArrayValue(fr)) = attr(&s, "gen_ai.response.finish_reasons")
        else {
            panic!("finish reasons missing")
        };
        assert_eq!(fr.values.len(), 2);
    }

    #[test]
    fn gpu_attribution_becomes_attributes_and_explained_slow_token_events() {
        use crate::gpu::correlate::TokenGapExplanation;
        let clock = Clock::measure();
        let r = chat();
        let gpu = RequestGpuStats {
            gpu_busy_ms: 12.5,
            kernel_count: 40,
            energy_j: Some(3.0),
            energy_j_per_token: Some(0.5),
            median_itl_ns: Some(1_000_000),
            slow_tokens: vec![TokenGapExplanation {
                token_index: 4,
                start_ns: 8_000_000,
                gap_ns: 10_000_000,
                gpu_busy_ns: 1_000_000,
                sync_wait_ns: 8_000_000,
                launch_ns: 0,
                idle_ns: 1_000_000,
                top: Vec::new(),
            }],
            ..Default::default()
        };
        let line = RequestLine::new(&r, &clock);
        let s = request_span(&r, &line, Some(&gpu), &clock).span;
        assert_eq!(
            attr(&s, "infertap.gpu.busy_ms"),
            Some(&any_value::Value::DoubleValue(12.5))
        );
        assert_eq!(
            attr(&s, "infertap.gpu.energy_j_per_token"),
            Some(&any_value::Value::DoubleValue(0.5))
        );
        let slow: Vec<_> = s
            .events
            .iter()
            .filter(|e| e.name == EVENT_SLOW_TOKEN)
            .collect();
        assert_eq!(slow.len(), 1);
        assert_eq!(slow[0].time_unix_nano, line.token_unix_ns[4]);
        let cause = slow[0]
            .attributes
            .iter()
            .find(|k| k.key == "infertap.slow_token.cause")
            .and_then(|k| k.value.as_ref())
            .and_then(|v| v.value.as_ref());
        assert_eq!(
            cause,
            Some(&any_value::Value::StringValue("sync_wait".into()))
        );
    }

    #[test]
    fn ollama_operation_follows_the_path() {
        assert_eq!(
            operation_name(StreamKind::Ollama, "/api/chat"),
            Some("chat")
        );
        assert_eq!(
            operation_name(StreamKind::Ollama, "/api/generate"),
            Some("text_completion")
        );
        assert_eq!(
            operation_name(StreamKind::JsonLines, "/v1/chat/completions"),
            None
        );
    }

    #[test]
    fn ids_are_random() {
        let a = random_bytes::<16>();
        let b = random_bytes::<16>();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 16]);
    }
}
