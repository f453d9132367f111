//! The metric schema: every metric infertap exports, with its help text, labels and (for
//! histograms) fixed bucket bounds. Agent and collector both use these definitions, so histograms
//! from any agent merge exactly (same bounds) and both endpoints expose identical names.
//!
//! Latency bounds are vLLM's (v1 engine) so dashboards built for vLLM read ours unchanged; ITL and
//! TPOT get extra sub-10 ms bounds because streamed token gaps on fast GPUs are often below vLLM's
//! smallest (10 ms) bound.

/// Bumped whenever a metric's name, labels or bounds change incompatibly.
pub const SCHEMA_VERSION: u32 = 1;

/// Served model (from the request's `model` field), capped in cardinality; see [`MODEL_OTHER`].
pub const LABEL_MODEL: &str = "model_name";
/// Request outcome: [`OUTCOME_OK`] or an error kind (`http_4xx`, `client_disconnect`, ...).
pub const LABEL_OUTCOME: &str = "outcome";
/// Why events were dropped.
pub const LABEL_REASON: &str = "reason";
/// Collector only: the agent's node.
pub const LABEL_NODE: &str = "node";
/// Collector only: the agent's id.
pub const LABEL_AGENT: &str = "agent";

pub const OUTCOME_OK: &str = "ok";
/// Model label value for requests whose body named no model.
pub const MODEL_UNKNOWN: &str = "unknown";
/// Model label value once the cap on distinct model names is reached.
pub const MODEL_OTHER: &str = "other";
/// Longest label value accepted; longer values are cut (on a char boundary).
pub const MAX_LABEL_VALUE_LEN: usize = 128;
/// Drop reason used by the agent's gRPC exporter when its report buffer overflows.
pub const DROP_REASON_EXPORT_BUFFER_FULL: &str = "export_buffer_full";
/// Drop reason used by the agent's gRPC exporter for profile payloads it had to drop to stay
/// within its byte bound on buffered profiles (the reports' metrics are kept).
pub const DROP_REASON_PROFILE_BUFFER_FULL: &str = "profile_buffer_full";
/// Drop reason used by the agent's gRPC exporter for a single profile payload larger than its
/// per-profile limit (it could never be delivered).
pub const DROP_REASON_PROFILE_TOO_LARGE: &str = "profile_too_large";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Histogram,
    Counter,
    Gauge,
}

/// One metric family.
#[derive(Debug, PartialEq)]
pub struct MetricDef {
    /// Name as Prometheus shows it (counters end in `_total`).
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// Label names, in the order series carry them.
    pub labels: &'static [&'static str],
    /// Histogram upper bounds, strictly increasing, without +Inf (implicit last bucket).
    pub bounds: &'static [f64],
}

impl MetricDef {
    /// Name to hand to an OpenMetrics encoder, which appends `_total` to counters itself.
    pub fn family_name(&self) -> &'static str {
        match self.kind {
            Kind::Counter => self.name.strip_suffix("_total").unwrap_or(self.name),
            _ => self.name,
        }
    }

    /// Number of histogram buckets including the +Inf bucket (0 for other kinds).
    pub fn bucket_count(&self) -> usize {
        match self.kind {
            Kind::Histogram => self.bounds.len() + 1,
            _ => 0,
        }
    }

    /// Index of the bucket a value falls in: the first bound `>= v` (Prometheus `le`), else +Inf.
    /// NaN goes to +Inf.
    pub fn bucket_index(&self, v: f64) -> usize {
        if v.is_nan() {
            return self.bounds.len();
        }
        self.bounds.partition_point(|&b| b < v)
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
// Waits before the server's read: sub-millisecond when healthy, seconds under overload.
const QUEUE_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];
// vLLM's ITL/TPOT bounds start at 10 ms; finer bounds below it for fast decoders.
const TOKEN_GAP_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
const E2E_BOUNDS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
// vLLM's 1-2-5 series for token counts.
const TOKEN_COUNT_BOUNDS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
    50000.0, 100000.0, 200000.0, 500000.0, 1000000.0,
];

const MODEL: &[&str] = &[LABEL_MODEL];

pub static TIME_TO_FIRST_TOKEN: MetricDef = MetricDef {
    name: "infertap_time_to_first_token_seconds",
    help: "Time from the request's first byte reaching the server's socket to the first streamed content event",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: TTFT_BOUNDS,
};

pub static INTER_TOKEN_LATENCY: MetricDef = MetricDef {
    name: "infertap_inter_token_latency_seconds",
    help: "Gap between consecutive streamed content events of a response",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: TOKEN_GAP_BOUNDS,
};

pub static TIME_PER_OUTPUT_TOKEN: MetricDef = MetricDef {
    name: "infertap_time_per_output_token_seconds",
    help: "Per completed request: (last content event - first) / (output tokens - 1)",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: TOKEN_GAP_BOUNDS,
};

pub static E2E_REQUEST_LATENCY: MetricDef = MetricDef {
    name: "infertap_e2e_request_latency_seconds",
    help: "Time from the request's first byte reaching the server's socket to the response's last byte written, completed requests",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: E2E_BOUNDS,
};

pub static TIME_TO_FIRST_TOKEN_AFTER_READ: MetricDef = MetricDef {
    name: "infertap_time_to_first_token_after_read_seconds",
    help: "Time from the server's first read of the request to the first streamed content event (TTFT without the queueing before the read)",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: TTFT_BOUNDS,
};

pub static E2E_REQUEST_LATENCY_AFTER_READ: MetricDef = MetricDef {
    name: "infertap_e2e_request_latency_after_read_seconds",
    help: "Time from the server's first read of the request to the response's last byte written, completed requests",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: E2E_BOUNDS,
};

pub static REQUEST_QUEUE_TIME: MetricDef = MetricDef {
    name: "infertap_request_queue_time_seconds",
    help: "Time a request waited before the server read it: from its first byte reaching the socket (accept queue included for a new connection) to the server's first read",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: QUEUE_BOUNDS,
};

pub static ACCEPT_QUEUE_TIME: MetricDef = MetricDef {
    name: "infertap_accept_queue_time_seconds",
    help: "Time a new connection waited in the listen socket's accept queue: from its handshake completing to the server's accept",
    kind: Kind::Histogram,
    labels: &[],
    bounds: QUEUE_BOUNDS,
};

pub static REQUESTS_UNREAD: MetricDef = MetricDef {
    name: "infertap_requests_unread",
    help: "Traced connections holding request bytes that arrived but the server has not read yet",
    kind: Kind::Gauge,
    labels: &[],
    bounds: &[],
};

pub static CONNECTIONS_UNACCEPTED: MetricDef = MetricDef {
    name: "infertap_connections_unaccepted",
    help: "Connections to the traced listening ports that completed their handshake and wait in the accept queue",
    kind: Kind::Gauge,
    labels: &[],
    bounds: &[],
};

pub static REQUEST_OUTPUT_TOKENS: MetricDef = MetricDef {
    name: "infertap_request_output_tokens",
    help: "Output tokens per completed request",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: TOKEN_COUNT_BOUNDS,
};

pub static REQUEST_PROMPT_TOKENS: MetricDef = MetricDef {
    name: "infertap_request_prompt_tokens",
    help: "Prompt tokens per completed request whose response reported usage",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: TOKEN_COUNT_BOUNDS,
};

pub static REQUESTS: MetricDef = MetricDef {
    name: "infertap_requests_total",
    help: "Requests observed, by outcome",
    kind: Kind::Counter,
    labels: &[LABEL_MODEL, LABEL_OUTCOME],
    bounds: &[],
};

/// The API shape a response spoke (`openai_chat`, `anthropic_messages`, ..., `unknown`: the
/// agent's closed `stream_kind` vocabulary).
pub const LABEL_STREAM_KIND: &str = "stream_kind";

pub static REQUESTS_BY_STREAM_KIND: MetricDef = MetricDef {
    name: "infertap_requests_by_stream_kind_total",
    help: "Requests observed, by the API shape of the response (stream_kind)",
    kind: Kind::Counter,
    labels: &[LABEL_STREAM_KIND],
    bounds: &[],
};

pub static OUTPUT_TOKENS: MetricDef = MetricDef {
    name: "infertap_output_tokens_total",
    help: "Output tokens generated, all outcomes",
    kind: Kind::Counter,
    labels: MODEL,
    bounds: &[],
};

pub static PROMPT_TOKENS: MetricDef = MetricDef {
    name: "infertap_prompt_tokens_total",
    help: "Prompt tokens, from responses that reported usage",
    kind: Kind::Counter,
    labels: MODEL,
    bounds: &[],
};

pub static EVENTS_DROPPED: MetricDef = MetricDef {
    name: "infertap_events_dropped_total",
    help: "Events or reports the agent had to drop, by reason",
    kind: Kind::Counter,
    labels: &[LABEL_REASON],
    bounds: &[],
};

pub static CONNECTIONS_UNTRACED: MetricDef = MetricDef {
    name: "infertap_connections_untraced_total",
    help: "Connections accepted by traced processes that stopped being traced because they do \
           not speak HTTP/1.x, by kind (unix, tls, h2, other; upgraded: after a 101 switch)",
    kind: Kind::Counter,
    labels: &[LABEL_KIND],
    bounds: &[],
};

pub static REQUESTS_RUNNING: MetricDef = MetricDef {
    name: "infertap_requests_running",
    help: "Requests in flight whose response has started",
    kind: Kind::Gauge,
    labels: &[],
    bounds: &[],
};

pub static REQUESTS_WAITING: MetricDef = MetricDef {
    name: "infertap_requests_waiting",
    help: "Requests in flight still waiting for their response to start",
    kind: Kind::Gauge,
    labels: &[],
    bounds: &[],
};

/// Label of the slow-token cause counter.
pub const LABEL_CAUSE: &str = "cause";
/// Label of the CUDA call metrics: the probed symbol (a closed set of about 50).
pub const LABEL_FUNCTION: &str = "function";
/// Label of the copy-bytes counter: htod, dtoh, dtod, htoh, unknown.
pub const LABEL_DIRECTION: &str = "direction";

const GPU_BUSY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0,
];
const ENERGY_BOUNDS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
    10000.0,
];
const ENERGY_PER_TOKEN_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Powers of two from 2^10 ns (≈1 µs) to 2^35 ns (≈34 s): the kernel-side CUDA duration
/// histograms count log2 buckets, which map onto these bounds exactly.
pub const CUDA_DURATION_FIRST_LOG2: u32 = 10;
const CUDA_DURATION_BOUNDS: &[f64] = &[
    1.024e-6,
    2.048e-6,
    4.096e-6,
    8.192e-6,
    1.6384e-5,
    3.2768e-5,
    6.5536e-5,
    1.31072e-4,
    2.62144e-4,
    5.24288e-4,
    1.048576e-3,
    2.097152e-3,
    4.194304e-3,
    8.388608e-3,
    1.6777216e-2,
    3.3554432e-2,
    6.7108864e-2,
    0.134217728,
    0.268435456,
    0.536870912,
    1.073741824,
    2.147483648,
    4.294967296,
    8.589934592,
    17.179869184,
    34.359738368,
];

pub static REQUEST_GPU_BUSY: MetricDef = MetricDef {
    name: "infertap_request_gpu_busy_seconds",
    help: "GPU busy time attributed to a request: kernels overlapping its lifetime, shared among the requests in flight",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: GPU_BUSY_BOUNDS,
};

pub static REQUEST_ENERGY: MetricDef = MetricDef {
    name: "infertap_request_energy_joules",
    help:
        "GPU energy attributed to a request (integrated power, shared among the requests in flight)",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: ENERGY_BOUNDS,
};

pub static ENERGY_PER_OUTPUT_TOKEN: MetricDef = MetricDef {
    name: "infertap_energy_per_output_token_joules",
    help: "GPU energy attributed to a request divided by its output tokens",
    kind: Kind::Histogram,
    labels: MODEL,
    bounds: ENERGY_PER_TOKEN_BOUNDS,
};

pub static SLOW_TOKENS: MetricDef = MetricDef {
    name: "infertap_slow_tokens_total",
    help: "Inter-token gaps far above their request's median, by dominant cause (gpu_busy, sync_wait, launch_bound, idle, other_request_prefill)",
    kind: Kind::Counter,
    labels: &[LABEL_CAUSE],
    bounds: &[],
};

pub static CUDA_CALLS: MetricDef = MetricDef {
    name: "infertap_cuda_calls_total",
    help: "CUDA driver/runtime API calls seen by the launch-path uprobes",
    kind: Kind::Counter,
    labels: &[LABEL_FUNCTION],
    bounds: &[],
};

pub static CUDA_COPY_BYTES: MetricDef = MetricDef {
    name: "infertap_cuda_copy_bytes_total",
    help: "Bytes passed to CUDA memcpy calls, by direction",
    kind: Kind::Counter,
    labels: &[LABEL_DIRECTION],
    bounds: &[],
};

pub static CUDA_CALL_DURATION: MetricDef = MetricDef {
    name: "infertap_cuda_call_duration_seconds",
    help: "Duration of CUDA calls that block the host (synchronisation, blocking copies)",
    kind: Kind::Histogram,
    labels: &[LABEL_FUNCTION],
    bounds: CUDA_DURATION_BOUNDS,
};

/// Profiler: which kind of stack sample (`cpu`, `offcpu`, `launch`); connections: why one is
/// not traced (`unix`, `tls`, `h2`, `other`, `upgraded`).
pub const LABEL_KIND: &str = "kind";
/// Profiler: how a native unwind ended (`complete` or the reason it was cut).
pub const LABEL_RESULT: &str = "result";

pub static PROFILE_SAMPLES: MetricDef = MetricDef {
    name: "infertap_profile_samples_total",
    help: "Stack samples of the traced processes taken by the profiler, by kind (cpu: timer samples; offcpu: sampled switch-outs; launch: sampled CUDA launches)",
    kind: Kind::Counter,
    labels: &[LABEL_KIND],
    bounds: &[],
};

pub static PROFILE_STACKS: MetricDef = MetricDef {
    name: "infertap_profile_stacks_total",
    help: "Native stacks unwound by the profiler, by result: complete (reached main or thread start) or the reason the stack was cut (stack_copy_exhausted, no_unwind_info, unmapped_address, max_depth, bad_cfi, process_gone); truncated share = 1 - complete / all",
    kind: Kind::Counter,
    labels: &[LABEL_RESULT],
    bounds: &[],
};

pub static PROFILE_PYTHON_SAMPLES: MetricDef = MetricDef {
    name: "infertap_profile_python_samples_total",
    help: "Samples of CPython processes, by whether they carried at least one Python frame (result=with_frames|native_only)",
    kind: Kind::Counter,
    labels: &[LABEL_RESULT],
    bounds: &[],
};

pub static PROFILE_PYTHON_PROCESSES: MetricDef = MetricDef {
    name: "infertap_profile_python_processes",
    help: "Traced processes whose Python frames the profiler walks (CPython 3.10-3.13 found)",
    kind: Kind::Gauge,
    labels: &[],
    bounds: &[],
};

pub static PROFILE_OFFCPU_ONE_IN: MetricDef = MetricDef {
    name: "infertap_profile_offcpu_capture_one_in",
    help: "Off-CPU switch-outs are captured with their stack 1 in this many (raised automatically to keep captures within the budget)",
    kind: Kind::Gauge,
    labels: &[],
    bounds: &[],
};

/// OTLP signal of an export call (`traces`, `metrics`).
pub const LABEL_SIGNAL: &str = "signal";

pub static OTLP_EXPORTS: MetricDef = MetricDef {
    name: "infertap_otlp_exports_total",
    help: "OTLP export calls made by the agent, by signal (traces, metrics) and result (ok, error; a retried export counts each attempt)",
    kind: Kind::Counter,
    labels: &[LABEL_SIGNAL, LABEL_RESULT],
    bounds: &[],
};

/// Every metric, in exposition order.
pub static ALL: &[&MetricDef] = &[
    &TIME_TO_FIRST_TOKEN,
    &INTER_TOKEN_LATENCY,
    &TIME_PER_OUTPUT_TOKEN,
    &E2E_REQUEST_LATENCY,
    &REQUEST_OUTPUT_TOKENS,
    &REQUEST_PROMPT_TOKENS,
    &REQUESTS,
    &REQUESTS_BY_STREAM_KIND,
    &OUTPUT_TOKENS,
    &PROMPT_TOKENS,
    &EVENTS_DROPPED,
    &CONNECTIONS_UNTRACED,
    &REQUESTS_RUNNING,
    &REQUESTS_WAITING,
    &TIME_TO_FIRST_TOKEN_AFTER_READ,
    &E2E_REQUEST_LATENCY_AFTER_READ,
    &REQUEST_QUEUE_TIME,
    &ACCEPT_QUEUE_TIME,
    &REQUESTS_UNREAD,
    &CONNECTIONS_UNACCEPTED,
    &REQUEST_GPU_BUSY,
    &REQUEST_ENERGY,
    &ENERGY_PER_OUTPUT_TOKEN,
    &SLOW_TOKENS,
    &CUDA_CALLS,
    &CUDA_COPY_BYTES,
    &CUDA_CALL_DURATION,
    &PROFILE_SAMPLES,
    &PROFILE_STACKS,
    &PROFILE_PYTHON_SAMPLES,
    &PROFILE_PYTHON_PROCESSES,
    &PROFILE_OFFCPU_ONE_IN,
    &OTLP_EXPORTS,
];

/// The definition of a metric by its exposition name.
pub fn lookup(name: &str) -> Option<&'static MetricDef> {
    ALL.iter().copied().find(|d| d.name == name)
}

/// Cuts a label value to [`MAX_LABEL_VALUE_LEN`] bytes on a char boundary.
pub fn clamp_label_value(v: &str) -> &str {
    if v.len() <= MAX_LABEL_VALUE_LEN {
        return v;
    }
    let mut end = MAX_LABEL_VALUE_LEN;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    &v[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_duration_bounds_are_powers_of_two_ns() {
        for (i, b) in CUDA_DURATION_BOUNDS.iter().enumerate() {
            let ns = (1u64 << (CUDA_DURATION_FIRST_LOG2 as usize + i)) as f64;
            assert!((b * 1e9 - ns).abs() < 1e-3, "{b} vs {ns}");
        }
    }

    #[test]
    fn names_unique_and_well_formed() {
        for (i, d) in ALL.iter().enumerate() {
            assert!(d.name.starts_with("infertap_"), "{}", d.name);
            assert!(
                d.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                d.name
            );
            assert!(
                ALL[i + 1..].iter().all(|o| o.name != d.name),
                "duplicate {}",
                d.name
            );
            assert_eq!(lookup(d.name), Some(*d));
            match d.kind {
                Kind::Counter => assert!(d.name.ends_with("_total") && d.bounds.is_empty()),
                Kind::Gauge => assert!(d.bounds.is_empty()),
                Kind::Histogram => {
                    assert!(!d.bounds.is_empty());
                    assert!(
                        d.bounds.windows(2).all(|w| w[0] < w[1]),
                        "{} bounds not increasing",
                        d.name
                    );
                    assert!(d.bounds.iter().all(|b| b.is_finite() && *b > 0.0));
                }
            }
            for l in d.labels {
                assert!(
                    ![LABEL_NODE, LABEL_AGENT, "le"].contains(l),
                    "{} uses reserved label {l}",
                    d.name
                );
            }
        }
        assert_eq!(lookup("infertap_nope"), None);
    }

    #[test]
    fn required_names_present() {
        for n in [
            "infertap_time_to_first_token_seconds",
            "infertap_inter_token_latency_seconds",
            "infertap_time_per_output_token_seconds",
            "infertap_e2e_request_latency_seconds",
            "infertap_requests_total",
            "infertap_output_tokens_total",
            "infertap_events_dropped_total",
            "infertap_requests_running",
            "infertap_requests_waiting",
        ] {
            assert!(lookup(n).is_some(), "{n} missing");
        }
        assert_eq!(REQUESTS.family_name(), "infertap_requests");
        assert_eq!(TIME_TO_FIRST_TOKEN.family_name(), TIME_TO_FIRST_TOKEN.name);
    }

    #[test]
    fn bucket_index_is_le() {
        let d = &TIME_TO_FIRST_TOKEN;
        assert_eq!(d.bucket_index(0.0), 0);
        assert_eq!(
            d.bucket_index(0.001),
            0,
            "value equal to a bound belongs to it"
        );
        assert_eq!(d.bucket_index(0.0010001), 1);
        // 10 ms computed from integer nanoseconds lands exactly on the 0.01 bound.
        let ten_ms_ns: u64 = 10_000_000;
        assert_eq!(d.bucket_index(ten_ms_ns as f64 / 1e9), 2);
        assert_eq!(d.bucket_index(2560.0), d.bounds.len() - 1);
        assert_eq!(d.bucket_index(1e9), d.bounds.len());
        assert_eq!(d.bucket_index(f64::NAN), d.bounds.len());
        assert_eq!(d.bucket_count(), d.bounds.len() + 1);
    }

    #[test]
    fn clamp_respects_char_boundaries() {
        let long = "é".repeat(MAX_LABEL_VALUE_LEN);
        let c = clamp_label_value(&long);
        assert!(c.len() <= MAX_LABEL_VALUE_LEN && c.chars().all(|ch| ch == 'é'));
        assert_eq!(clamp_label_value("llama"), "llama");
    }
}
