//! Interval aggregates (mergeable histograms, counters, gauges) built from request records.
//!
//! The [`Aggregator`] keeps cumulative series in a [`MetricStore`] shared with the Prometheus
//! endpoint ([`SharedMetrics`]) and cuts per-interval delta reports ([`IntervalReport`]) for the
//! collector by diffing against the state at the previous cut. Histogram bounds, metric and label
//! names come from [`infertap_proto::schema`], so agent and collector series merge exactly.
//!
//! What each record feeds:
//! - `infertap_requests_total{model_name,outcome}`: every record.
//! - `infertap_requests_by_stream_kind_total{stream_kind}`: every record, by API shape.
//! - `infertap_output_tokens_total`, `infertap_prompt_tokens_total`: every record that has counts
//!   (tokens a disconnected client received were still generated).
//! - TTFT: streaming records with a first token; ITL: every gap between consecutive content
//!   events of the same choice (`n > 1`: a token of choice 1 is not a gap of choice 0). Both are
//!   measured events, so they are kept whatever the outcome.
//! - TPOT, E2E, per-request token-count histograms: successful records only, since a cut-off
//!   request has no meaningful end (errors show up in `infertap_requests_total` instead).
//! - TTFT and E2E count from the request's arrival at the socket; the `*_after_read_*` twins
//!   count from the server's read, and `infertap_request_queue_time_seconds` is the difference
//!   (every record with a kernel arrival stamp); `infertap_accept_queue_time_seconds`: first
//!   exchanges of new connections.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use infertap_proto::pb::IntervalReport;
use infertap_proto::schema::{self, MetricDef};
use infertap_proto::store::HistogramData;
use infertap_proto::store::{Labels, MetricStore};

use crate::record::RequestRecord;

/// Default cap on distinct `model_name` label values; later models are reported as "other".
pub const DEFAULT_MAX_MODELS: usize = 32;

/// The agent's cumulative metrics, readable from other tasks (the Prometheus endpoint).
#[derive(Clone, Debug, Default)]
pub struct SharedMetrics(Arc<Mutex<MetricStore>>);

impl SharedMetrics {
    fn lock(&self) -> MutexGuard<'_, MetricStore> {
        // A panic elsewhere while holding the lock leaves plain counters behind: still usable.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the current cumulative state.
    pub fn snapshot(&self) -> MetricStore {
        self.lock().clone()
    }

    /// OpenMetrics text of the current state.
    pub fn encode_openmetrics(&self) -> Result<String, std::fmt::Error> {
        self.snapshot().encode_openmetrics()
    }
}

/// Builds cumulative and per-interval metrics from request records. Owned by the pipeline task.
#[derive(Debug)]
pub struct Aggregator {
    cumulative: SharedMetrics,
    /// Cumulative state at the last `take_interval`, to compute deltas.
    last_cut: MetricStore,
    interval_start_unix_ns: u64,
    models: HashSet<String>,
    max_models: usize,
}

impl Aggregator {
    /// `max_models` caps distinct `model_name` values (overflow → "other"); `now_unix_ns` starts
    /// the first interval.
    pub fn new(max_models: usize, now_unix_ns: u64) -> Self {
        let mut agg = Aggregator {
            cumulative: SharedMetrics::default(),
            last_cut: MetricStore::new(),
            interval_start_unix_ns: now_unix_ns,
            models: HashSet::new(),
            max_models,
        };
        // Gauges exist from the start so scrapes see 0 rather than nothing.
        agg.set_in_flight(0, 0);
        agg
    }

    /// Handle for the Prometheus endpoint (cumulative series, updated on every `observe`).
    pub fn shared(&self) -> SharedMetrics {
        self.cumulative.clone()
    }

    fn model_label(&mut self, model: Option<&str>) -> String {
        let m = schema::clamp_label_value(model.unwrap_or(schema::MODEL_UNKNOWN));
        if self.models.contains(m) {
            return m.to_owned();
        }
        if self.models.len() < self.max_models {
            self.models.insert(m.to_owned());
            return m.to_owned();
        }
        schema::MODEL_OTHER.to_owned()
    }

    /// Adds one completed exchange.
    pub fn observe(&mut self, r: &RequestRecord) {
        self.observe_accept_wait(r);
        let model = self.model_label(r.model.as_deref());
        let by_model: Labels = vec![(schema::LABEL_MODEL.to_owned(), model.clone())];
        let outcome = r.error.map_or(schema::OUTCOME_OK, |e| e.as_str());
        let ok = r.error.is_none();
        let secs = |ns: u64| ns as f64 / 1e9;

        let mut store = self.cumulative.lock();
        store.add_counter(
            &schema::REQUESTS,
            vec![
                (schema::LABEL_MODEL.to_owned(), model),
                (schema::LABEL_OUTCOME.to_owned(), outcome.to_owned()),
            ],
            1,
        );
        store.add_counter(
            &schema::REQUESTS_BY_STREAM_KIND,
            vec![(
                schema::LABEL_STREAM_KIND.to_owned(),
                r.stream_kind.as_str().to_owned(),
            )],
            1,
        );
        if let Some(n) = r.output_tokens {
            store.add_counter(&schema::OUTPUT_TOKENS, by_model.clone(), n);
        }
        if let Some(n) = r.prompt_tokens {
            store.add_counter(&schema::PROMPT_TOKENS, by_model.clone(), n);
        }
        let mut observe = |def: &'static MetricDef, values: &mut dyn Iterator<Item = f64>| {
            let mut values = values.peekable();
            if values.peek().is_some() {
                let h = store.histogram_mut(def, by_model.clone());
                values.for_each(|v| h.observe(def, v));
            }
        };
        if r.is_streaming() {
            observe(
                &schema::TIME_TO_FIRST_TOKEN,
                &mut r.ttft_ns().map(secs).into_iter(),
            );
            observe(
                &schema::TIME_TO_FIRST_TOKEN_AFTER_READ,
                &mut r.ttft_after_read_ns().map(secs).into_iter(),
            );
        }
        observe(
            &schema::REQUEST_QUEUE_TIME,
            &mut r.queue_ns().map(secs).into_iter(),
        );
        observe(&schema::INTER_TOKEN_LATENCY, &mut r.itl_ns().map(secs));
        if ok {
            observe(
                &schema::TIME_PER_OUTPUT_TOKEN,
                &mut r.tpot_ns().map(secs).into_iter(),
            );
            observe(
                &schema::E2E_REQUEST_LATENCY,
                &mut std::iter::once(secs(r.e2e_ns())),
            );
            observe(
                &schema::E2E_REQUEST_LATENCY_AFTER_READ,
                &mut std::iter::once(secs(r.e2e_after_read_ns())),
            );
            observe(
                &schema::REQUEST_OUTPUT_TOKENS,
                &mut r.output_tokens.map(|n| n as f64).into_iter(),
            );
            observe(
                &schema::REQUEST_PROMPT_TOKENS,
                &mut r.prompt_tokens.map(|n| n as f64).into_iter(),
            );
        }
    }

    /// Adds a new connection's accept-queue wait (first exchange of a connection whose
    /// handshake the kernel saw).
    fn observe_accept_wait(&mut self, r: &RequestRecord) {
        if let Some(w) = r.accept_wait_ns() {
            let def = &schema::ACCEPT_QUEUE_TIME;
            self.cumulative
                .lock()
                .histogram_mut(def, Vec::new())
                .observe(def, w as f64 / 1e9);
        }
    }

    /// Sets the queue gauges from the kernel's arrival counters.
    pub fn set_queue_depths(&mut self, unread: u64, unaccepted: u64) {
        let mut store = self.cumulative.lock();
        store.set_gauge(&schema::REQUESTS_UNREAD, Vec::new(), unread as f64);
        store.set_gauge(
            &schema::CONNECTIONS_UNACCEPTED,
            Vec::new(),
            unaccepted as f64,
        );
    }

    /// Adds a request's GPU attribution (from `gpu::correlate`).
    pub fn observe_gpu(&mut self, r: &RequestRecord, gpu: &crate::gpu::correlate::RequestGpuStats) {
        let model = self.model_label(r.model.as_deref());
        let by_model: Labels = vec![(schema::LABEL_MODEL.to_owned(), model)];
        let mut store = self.cumulative.lock();
        let mut observe = |def: &'static MetricDef, v: Option<f64>| {
            if let Some(v) = v {
                store.histogram_mut(def, by_model.clone()).observe(def, v);
            }
        };
        observe(&schema::REQUEST_GPU_BUSY, Some(gpu.gpu_busy_ms / 1e3));
        observe(&schema::REQUEST_ENERGY, gpu.energy_j);
        observe(&schema::ENERGY_PER_OUTPUT_TOKEN, gpu.energy_j_per_token);
        for t in &gpu.slow_tokens {
            let cause = crate::gpu::correlate::dominant_cause(t);
            store.add_counter(
                &schema::SLOW_TOKENS,
                vec![(schema::LABEL_CAUSE.to_owned(), cause.to_owned())],
                1,
            );
        }
    }

    /// Sets the CUDA call metrics from the kernel-side aggregates (cumulative totals, summed
    /// over processes and threads so the label set stays the closed set of probed functions).
    /// Publishes the profiler's cumulative counters.
    pub fn set_profiler_stats(&mut self, c: &crate::profiling::stage::ProfilerCounters) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut store = self.cumulative.lock();
        let label = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        for (kind, n) in [
            ("cpu", &c.cpu_samples),
            ("offcpu", &c.offcpu_samples),
            ("launch", &c.launch_samples),
        ] {
            store.set_counter(
                &schema::PROFILE_SAMPLES,
                label(schema::LABEL_KIND, kind),
                n.load(Relaxed),
            );
        }
        store.set_counter(
            &schema::PROFILE_STACKS,
            label(schema::LABEL_RESULT, "complete"),
            c.stacks_complete.load(Relaxed),
        );
        for r in infertap_stacks::unwind::TruncatedReason::ALL {
            store.set_counter(
                &schema::PROFILE_STACKS,
                label(schema::LABEL_RESULT, r.as_str()),
                c.truncated(r),
            );
        }
        let with = c.python_samples_with_frames.load(Relaxed);
        let all = c.python_samples.load(Relaxed);
        store.set_counter(
            &schema::PROFILE_PYTHON_SAMPLES,
            label(schema::LABEL_RESULT, "with_frames"),
            with,
        );
        store.set_counter(
            &schema::PROFILE_PYTHON_SAMPLES,
            label(schema::LABEL_RESULT, "native_only"),
            all.saturating_sub(with),
        );
        store.set_gauge(
            &schema::PROFILE_PYTHON_PROCESSES,
            Vec::new(),
            c.python_processes.load(Relaxed) as f64,
        );
        store.set_gauge(
            &schema::PROFILE_OFFCPU_ONE_IN,
            Vec::new(),
            c.offcpu_every.load(Relaxed) as f64,
        );
    }

    pub fn set_cuda_stats(&mut self, stats: &[crate::probes::cuda::CallStats]) {
        use infertap_common::cuda::{CopyKind, DURATION_BUCKETS};
        use std::collections::BTreeMap;
        let mut calls: BTreeMap<&str, u64> = BTreeMap::new();
        let mut hist: BTreeMap<&str, ([u64; DURATION_BUCKETS], u64, u64)> = BTreeMap::new();
        let mut bytes = [0u64; 5];
        for c in stats {
            *calls.entry(c.func.symbol).or_default() += c.stat.calls;
            for (a, b) in bytes.iter_mut().zip(c.stat.bytes_by_kind.iter()) {
                *a += b;
            }
            if c.stat.timed_calls > 0 {
                let e = hist
                    .entry(c.func.symbol)
                    .or_insert(([0; DURATION_BUCKETS], 0, 0));
                for (a, b) in e.0.iter_mut().zip(c.stat.duration_hist.iter()) {
                    *a += b;
                }
                e.1 += c.stat.duration_ns_sum;
                e.2 += c.stat.timed_calls;
            }
        }
        let mut store = self.cumulative.lock();
        let label = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        for (f, n) in calls {
            store.set_counter(&schema::CUDA_CALLS, label(schema::LABEL_FUNCTION, f), n);
        }
        for (kind, n) in CopyKind::ALL.iter().zip(bytes) {
            if n > 0 {
                store.set_counter(
                    &schema::CUDA_COPY_BYTES,
                    label(schema::LABEL_DIRECTION, kind.name()),
                    n,
                );
            }
        }
        let def = &schema::CUDA_CALL_DURATION;
        for (f, (log2_buckets, sum_ns, count)) in hist {
            let h = store.histogram_mut(def, label(schema::LABEL_FUNCTION, f));
            *h = cuda_histogram(def, &log2_buckets, sum_ns, count);
        }
    }

    /// Current in-flight requests: `running` have a response started, `waiting` do not yet.
    pub fn set_in_flight(&mut self, running: u64, waiting: u64) {
        let mut store = self.cumulative.lock();
        store.set_gauge(&schema::REQUESTS_RUNNING, Vec::new(), running as f64);
        store.set_gauge(&schema::REQUESTS_WAITING, Vec::new(), waiting as f64);
    }

    /// Sets `infertap_events_dropped_total{reason}` to a cumulative count kept by the dropping
    /// component (ring buffer, parser, exporter). `reason` must come from a small fixed set.
    pub fn set_drops(&mut self, reason: &str, cumulative_total: u64) {
        let labels = vec![(
            schema::LABEL_REASON.to_owned(),
            schema::clamp_label_value(reason).to_owned(),
        )];
        self.cumulative
            .lock()
            .set_counter(&schema::EVENTS_DROPPED, labels, cumulative_total);
    }

    /// Sets `infertap_connections_untraced_total{kind}` to a cumulative count kept by the
    /// reconstruction (`kind`: `unix`, `tls`, `h2`, `other`).
    pub fn set_untraced(&mut self, kind: &str, cumulative_total: u64) {
        let labels = vec![(schema::LABEL_KIND.to_owned(), kind.to_owned())];
        self.cumulative
            .lock()
            .set_counter(&schema::CONNECTIONS_UNTRACED, labels, cumulative_total);
    }

    /// Sets `infertap_otlp_exports_total{signal,result}` to the OTLP exporter's cumulative count
    /// of export calls (`signal`: traces|metrics, `result`: ok|error).
    pub fn set_otlp_exports(&mut self, signal: &str, result: &str, cumulative_total: u64) {
        let labels = vec![
            (schema::LABEL_SIGNAL.to_owned(), signal.to_owned()),
            (schema::LABEL_RESULT.to_owned(), result.to_owned()),
        ];
        self.cumulative
            .lock()
            .set_counter(&schema::OTLP_EXPORTS, labels, cumulative_total);
    }

    /// Ends the current interval at `now_unix_ns` and returns what changed during it (histogram
    /// and counter deltas, current gauges). `sequence` is 0: the gRPC exporter assigns it.
    pub fn take_interval(&mut self, now_unix_ns: u64) -> IntervalReport {
        let current = self.cumulative.snapshot();
        let report =
            current.interval_report(&self.last_cut, self.interval_start_unix_ns, now_unix_ns);
        self.last_cut = current;
        self.interval_start_unix_ns = now_unix_ns;
        report
    }
}

/// Maps the kernel's log2 duration buckets (`[2^i, 2^(i+1))` ns) onto the schema's
/// power-of-two bounds: kernel bucket `i` ends at bound `2^(i+1)` ns.
fn cuda_histogram(def: &MetricDef, log2: &[u64], sum_ns: u64, count: u64) -> HistogramData {
    let mut h = HistogramData::empty(def);
    let first = schema::CUDA_DURATION_FIRST_LOG2 as usize;
    let last = h.buckets.len() - 1;
    for (i, n) in log2.iter().enumerate() {
        let idx = (i + 1).saturating_sub(first).min(last);
        h.buckets[idx] += n;
    }
    h.sum = sum_ns as f64 / 1e9;
    h.count = count;
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{RequestError, TokenCountSource};
    use infertap_proto::store::HistogramData;

    /// A streaming record: request at t=0, events at the given ms offsets, one token each.
    fn record(
        model: &str,
        events_ms: &[u64],
        end_ms: u64,
        error: Option<RequestError>,
    ) -> RequestRecord {
        let ms = 1_000_000u64;
        let base = 5_000 * ms;
        let token_ns: Vec<u64> = events_ms.iter().map(|t| base + t * ms).collect();
        RequestRecord {
            pid: 7,
            conn_id: 1,
            peer: None,
            seq_on_conn: 0,
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status: Some(200),
            model: Some(model.into()),
            stream: true,
            start_ns: base,
            read_ns: base,
            arrival_ns: None,
            connected_ns: None,
            accepted_ns: None,
            request_end_ns: Some(base),
            response_start_ns: token_ns.first().copied(),
            first_token_ns: token_ns.first().copied(),
            end_ns: base + end_ms * ms,
            tokens_per_event: vec![1; token_ns.len()],
            output_tokens: Some(token_ns.len() as u64),
            token_ns,
            token_count_source: Some(TokenCountSource::Counted),
            prompt_tokens: Some(12),
            finish_reason: Some("stop".into()),
            request_bytes: 100,
            response_bytes: 1000,
            error,
            stream_kind: crate::record::StreamKind::OpenaiChat,
            ..Default::default()
        }
    }

    fn m(model: &str) -> Labels {
        vec![(schema::LABEL_MODEL.into(), model.into())]
    }

    fn expected(def: &MetricDef, values_s: &[f64]) -> HistogramData {
        let mut h = HistogramData::empty(def);
        values_s.iter().for_each(|v| h.observe(def, *v));
        h
    }

    #[test]
    fn record_feeds_every_metric() {
        let mut agg = Aggregator::new(DEFAULT_MAX_MODELS, 0);
        agg.observe(&record("llama", &[20, 25, 35, 36], 40, None));
        let s = agg.shared().snapshot();
        let ttft = s
            .histogram(&schema::TIME_TO_FIRST_TOKEN, &m("llama"))
            .unwrap();
        assert_eq!(ttft, &expected(&schema::TIME_TO_FIRST_TOKEN, &[0.020]));
        let itl = s
            .histogram(&schema::INTER_TOKEN_LATENCY, &m("llama"))
            .unwrap();
        assert_eq!(itl.count, 3);
        assert_eq!(
            itl.buckets,
            expected(&schema::INTER_TOKEN_LATENCY, &[0.005, 0.010, 0.001]).buckets
        );
        let tpot = s
            .histogram(&schema::TIME_PER_OUTPUT_TOKEN, &m("llama"))
            .unwrap();
        assert_eq!(
            tpot.buckets,
            expected(&schema::TIME_PER_OUTPUT_TOKEN, &[0.016 / 3.0]).buckets
        );
        let e2e = s
            .histogram(&schema::E2E_REQUEST_LATENCY, &m("llama"))
            .unwrap();
        assert_eq!(e2e.count, 1);
        assert_eq!(e2e.buckets[0], 1, "40 ms is under the first E2E bound");
        let ok = vec![
            (schema::LABEL_MODEL.into(), "llama".into()),
            (schema::LABEL_OUTCOME.into(), "ok".into()),
        ];
        assert_eq!(s.counter(&schema::REQUESTS, &ok), Some(1));
        assert_eq!(s.counter(&schema::OUTPUT_TOKENS, &m("llama")), Some(4));
        assert_eq!(s.counter(&schema::PROMPT_TOKENS, &m("llama")), Some(12));
        let kind = vec![(schema::LABEL_STREAM_KIND.into(), "openai_chat".into())];
        assert_eq!(s.counter(&schema::REQUESTS_BY_STREAM_KIND, &kind), Some(1));
        assert_eq!(s.gauge(&schema::REQUESTS_RUNNING, &vec![]), Some(0.0));
    }

    #[test]
    fn errors_count_but_skip_completion_latencies() {
        let mut agg = Aggregator::new(DEFAULT_MAX_MODELS, 0);
        agg.observe(&record(
            "llama",
            &[20, 30],
            31,
            Some(RequestError::ClientDisconnect),
        ));
        let s = agg.shared().snapshot();
        let lbl = vec![
            (schema::LABEL_MODEL.into(), "llama".into()),
            (schema::LABEL_OUTCOME.into(), "client_disconnect".into()),
        ];
        assert_eq!(s.counter(&schema::REQUESTS, &lbl), Some(1));
        assert_eq!(
            s.histogram(&schema::TIME_TO_FIRST_TOKEN, &m("llama"))
                .unwrap()
                .count,
            1
        );
        assert_eq!(
            s.histogram(&schema::INTER_TOKEN_LATENCY, &m("llama"))
                .unwrap()
                .count,
            1
        );
        assert!(s
            .histogram(&schema::E2E_REQUEST_LATENCY, &m("llama"))
            .is_none());
        assert!(s
            .histogram(&schema::TIME_PER_OUTPUT_TOKEN, &m("llama"))
            .is_none());
    }

    #[test]
    fn parallel_choices_feed_per_choice_gaps() {
        let mut agg = Aggregator::new(DEFAULT_MAX_MODELS, 0);
        // n = 2: choice 0 at 20, 30, 40 ms; choice 1 at 21, 41 ms. Consecutive events of
        // different choices (1 ms apart) are not inter-token gaps.
        let mut r = record("llama", &[20, 21, 30, 40, 41], 45, None);
        r.token_choice = vec![0, 1, 0, 0, 1];
        agg.observe(&r);
        let s = agg.shared().snapshot();
        let itl = s
            .histogram(&schema::INTER_TOKEN_LATENCY, &m("llama"))
            .unwrap();
        assert_eq!(
            itl,
            &expected(&schema::INTER_TOKEN_LATENCY, &[0.010, 0.010, 0.020])
        );
    }

    #[test]
    fn model_cardinality_is_capped() {
        let mut agg = Aggregator::new(2, 0);
        for name in ["a", "b", "c", "d", "a"] {
            agg.observe(&record(name, &[10], 11, None));
        }
        let mut none = record("x", &[10], 11, None);
        none.model = None;
        agg.observe(&none);
        let s = agg.shared().snapshot();
        let e2e = |m_: &str| {
            s.histogram(&schema::E2E_REQUEST_LATENCY, &m(m_))
                .map(|h| h.count)
        };
        assert_eq!(
            (e2e("a"), e2e("b"), e2e("c"), e2e("other")),
            (Some(2), Some(1), None, Some(3))
        );
    }

    #[test]
    fn intervals_are_deltas() {
        let mut agg = Aggregator::new(DEFAULT_MAX_MODELS, 100);
        agg.observe(&record("llama", &[20, 25], 40, None));
        agg.set_drops("ringbuf_full", 5);
        agg.set_in_flight(3, 1);
        let r1 = agg.take_interval(200);
        assert_eq!(
            (r1.start_unix_ns, r1.end_unix_ns, r1.sequence),
            (100, 200, 0)
        );
        let reqs = |r: &IntervalReport, name: &str| {
            r.counters
                .iter()
                .filter(|c| c.name == name)
                .map(|c| c.value)
                .sum::<u64>()
        };
        assert_eq!(reqs(&r1, "infertap_requests_total"), 1);
        assert_eq!(reqs(&r1, "infertap_events_dropped_total"), 5);
        agg.observe(&record("llama", &[20], 40, None));
        agg.set_drops("ringbuf_full", 8);
        let r2 = agg.take_interval(300);
        assert_eq!(r2.start_unix_ns, 200);
        assert_eq!(reqs(&r2, "infertap_requests_total"), 1);
        assert_eq!(reqs(&r2, "infertap_events_dropped_total"), 3);
        let e2e = r2
            .histograms
            .iter()
            .find(|h| h.name == schema::E2E_REQUEST_LATENCY.name)
            .unwrap();
        assert_eq!(e2e.count, 1);
        let running = r2
            .gauges
            .iter()
            .find(|g| g.name == "infertap_requests_running")
            .unwrap();
        assert_eq!(running.value, 3.0);
        // The cumulative view keeps totals.
        let ok = vec![
            (schema::LABEL_MODEL.into(), "llama".into()),
            (schema::LABEL_OUTCOME.into(), "ok".into()),
        ];
        assert_eq!(
            agg.shared().snapshot().counter(&schema::REQUESTS, &ok),
            Some(2)
        );
    }
}
