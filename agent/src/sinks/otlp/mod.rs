//! OTLP/gRPC exporter (`--otlp-endpoint`): one span per completed request and the Prometheus
//! endpoint's metrics, to any OpenTelemetry collector or backend.
//!
//! The pipeline hands spans over with [`OtlpExporter::submit`], which never blocks: a bounded
//! channel (`try_send`); a full channel drops the span and counts it
//! (`infertap_events_dropped_total{reason="otlp_queue_full"}`). A background task batches spans
//! (up to [`OtlpConfig::batch_size`], or after [`OtlpConfig::batch_timeout`]), groups them by
//! traced process into resources, and exports them with `TraceService/Export`; retryable
//! failures (the OTLP spec's list: `UNAVAILABLE`, `RESOURCE_EXHAUSTED`, ...) are retried with
//! exponential backoff and jitter up to [`OtlpConfig::max_attempts`], after which the batch's
//! spans are dropped and counted (`reason="otlp_export_failed"`); spans the receiver reports as
//! rejected (partial success) count as `reason="otlp_rejected"`. While the task waits on a slow
//! or absent receiver the channel fills and further spans are dropped at the door, so memory
//! stays bounded and the ring-buffer drain never waits.
//!
//! Every [`OtlpConfig::metrics_interval`] the task also exports the cumulative metric store
//! (converted by [`infertap_proto::otlp::resource_metrics`], shared with the collector) with
//! `MetricsService/Export`; a failed metrics export loses nothing (the next one carries the
//! totals). Export attempts are counted by signal and result
//! ([`OtlpExporter::exports`], `infertap_otlp_exports_total{signal,result}`).

pub mod span;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use infertap_proto::otlp::{self as potlp, ClientConfig, OtlpClient};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::aggregate::SharedMetrics;
pub use infertap_proto::otlp::parse_header;
pub use span::{request_span, RequestSpan};

/// Drop reason: the span queue was full (the exporter is behind or the receiver is away).
pub const DROP_REASON_QUEUE_FULL: &str = "otlp_queue_full";
/// Drop reason: spans of a batch that failed every export attempt.
pub const DROP_REASON_EXPORT_FAILED: &str = "otlp_export_failed";
/// Drop reason: spans the receiver accepted the batch of but rejected (OTLP partial success).
pub const DROP_REASON_REJECTED: &str = "otlp_rejected";

/// Exporter settings; [`OtlpConfig::new`] fills in defaults.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// Endpoint, headers, timeouts and backoff of the OTLP/gRPC client.
    pub client: ClientConfig,
    /// `service.name` of the resources.
    pub service_name: String,
    /// `host.name` of the resources (the agent's node name).
    pub node: String,
    /// Spans held between the pipeline and the export task; beyond it spans are dropped.
    pub queue_capacity: usize,
    /// Most spans per export.
    pub batch_size: usize,
    /// A partial batch is exported this long after its first span arrived.
    pub batch_timeout: Duration,
    /// How often the metrics are exported; `None`: no metrics.
    pub metrics_interval: Option<Duration>,
    /// Attempts per span export (the first included) before the batch is given up.
    pub max_attempts: u32,
}

impl OtlpConfig {
    /// Defaults: 4096 queued spans, batches of 512 or 1 s, metrics every 10 s, 5 attempts
    /// (the client's backoff: 100 ms → 5 s; 10 s per export).
    pub fn new(endpoint: impl Into<String>, node: impl Into<String>) -> Self {
        OtlpConfig {
            client: ClientConfig::new(endpoint),
            service_name: "infertap".into(),
            node: node.into(),
            queue_capacity: 4096,
            batch_size: 512,
            batch_timeout: Duration::from_secs(1),
            metrics_interval: Some(Duration::from_secs(10)),
            max_attempts: 5,
        }
    }
}

/// The exporter's cumulative counts.
#[derive(Debug, Default)]
pub struct OtlpStats {
    /// Spans dropped because the queue was full (or the task had stopped).
    pub queue_full: AtomicU64,
    /// Spans given up after every export attempt failed.
    pub export_failed_spans: AtomicU64,
    /// Spans the receiver rejected (partial success).
    pub rejected_spans: AtomicU64,
    /// Spans the receiver accepted.
    pub exported_spans: AtomicU64,
    /// Spans taken into the queue.
    pub queued_spans: AtomicU64,
    /// Export calls by outcome.
    pub trace_exports_ok: AtomicU64,
    pub trace_exports_failed: AtomicU64,
    pub metrics_exports_ok: AtomicU64,
    pub metrics_exports_failed: AtomicU64,
}

/// Handle to the export task.
#[derive(Debug)]
pub struct OtlpExporter {
    tx: mpsc::Sender<RequestSpan>,
    stats: Arc<OtlpStats>,
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl OtlpExporter {
    /// Starts the export task on the current tokio runtime. `metrics` is the cumulative store
    /// (with the time it started counting) to export every `metrics_interval`. Fails only on an
    /// invalid URL or header; an unreachable receiver is retried in the background.
    pub fn spawn(
        cfg: OtlpConfig,
        metrics: Option<(SharedMetrics, u64)>,
    ) -> anyhow::Result<OtlpExporter> {
        if cfg.queue_capacity == 0 || cfg.batch_size == 0 || cfg.max_attempts == 0 {
            bail!("OTLP queue capacity, batch size and attempts must be at least 1");
        }
        let client = OtlpClient::new(cfg.client.clone())?;
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let stats = Arc::new(OtlpStats::default());
        let worker = Worker {
            client,
            base_resource: base_resource(&cfg),
            server_ports: HashMap::new(),
            metrics,
            stats: stats.clone(),
            cfg,
        };
        let task = tokio::spawn(worker.run(rx, stop_rx));
        Ok(OtlpExporter {
            tx,
            stats,
            stop,
            task,
        })
    }

    /// Queues a span for export without blocking; false (a counted drop) when the queue is full.
    pub fn submit(&self, span: RequestSpan) -> bool {
        match self.tx.try_send(span) {
            Ok(()) => {
                self.stats.queued_spans.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Like [`OtlpExporter::submit`], building the span only when the queue has room (a full
    /// queue costs the pipeline one counter increment, not a span).
    pub fn submit_with(&self, build: impl FnOnce() -> RequestSpan) -> bool {
        match self.tx.try_reserve() {
            Ok(permit) => {
                permit.send(build());
                self.stats.queued_spans.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub fn stats(&self) -> &OtlpStats {
        &self.stats
    }

    /// The drop counts by `infertap_events_dropped_total` reason.
    pub fn drops(&self) -> [(&'static str, u64); 3] {
        let s = &self.stats;
        [
            (DROP_REASON_QUEUE_FULL, s.queue_full.load(Ordering::Relaxed)),
            (
                DROP_REASON_EXPORT_FAILED,
                s.export_failed_spans.load(Ordering::Relaxed),
            ),
            (
                DROP_REASON_REJECTED,
                s.rejected_spans.load(Ordering::Relaxed),
            ),
        ]
    }

    /// Export calls as `(signal, result, count)`, for `infertap_otlp_exports_total`.
    pub fn exports(&self) -> [(&'static str, &'static str, u64); 4] {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("traces", "ok", l(&s.trace_exports_ok)),
            ("traces", "error", l(&s.trace_exports_failed)),
            ("metrics", "ok", l(&s.metrics_exports_ok)),
            ("metrics", "error", l(&s.metrics_exports_failed)),
        ]
    }

    /// Exports what is queued and a last metrics snapshot (one attempt each), waiting at most
    /// `timeout`. Returns the spans that were queued but neither exported nor counted as
    /// dropped when it stopped (0 unless it had to give up).
    pub async fn shutdown(self, timeout: Duration) -> u64 {
        let OtlpExporter {
            tx,
            stop,
            mut task,
            stats,
        } = self;
        drop(tx);
        let _ = stop.send(true);
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
        }
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        l(&stats.queued_spans).saturating_sub(
            l(&stats.exported_spans) + l(&stats.rejected_spans) + l(&stats.export_failed_spans),
        )
    }
}

fn base_resource(cfg: &OtlpConfig) -> Vec<KeyValue> {
    vec![
        potlp::kv_str("service.name", cfg.service_name.clone()),
        potlp::kv_str("host.name", cfg.node.clone()),
        potlp::kv_str("infertap.agent.version", env!("CARGO_PKG_VERSION")),
        potlp::kv_i64("infertap.agent.pid", i64::from(std::process::id())),
    ]
}

struct Worker {
    client: OtlpClient,
    base_resource: Vec<KeyValue>,
    /// The traced server's listening port, when it has exactly one (`server.port`).
    server_ports: HashMap<u32, Option<u16>>,
    metrics: Option<(SharedMetrics, u64)>,
    stats: Arc<OtlpStats>,
    cfg: OtlpConfig,
}

impl Worker {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<RequestSpan>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut batch: Vec<RequestSpan> = Vec::new();
        let mut batch_deadline: Option<tokio::time::Instant> = None;
        let mut metrics_tick = self.cfg.metrics_interval.map(|d| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        let mut warned = false;
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                msg = rx.recv() => match msg {
                    Some(s) => {
                        batch.push(s);
                        batch_deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.cfg.batch_timeout);
                        if batch.len() >= self.cfg.batch_size {
                            self.export_spans(std::mem::take(&mut batch), &mut warned, false).await;
                            batch_deadline = None;
                        }
                    }
                    None => break,
                },
                _ = async { tokio::time::sleep_until(batch_deadline.unwrap()).await }, if batch_deadline.is_some() => {
                    self.export_spans(std::mem::take(&mut batch), &mut warned, false).await;
                    batch_deadline = None;
                }
                _ = async { metrics_tick.as_mut().unwrap().tick().await }, if metrics_tick.is_some() => {
                    self.export_metrics(&mut warned, false).await;
                }
            }
        }
        // Shutdown: what is still queued, then the final totals, one attempt each.
        while let Ok(s) = rx.try_recv() {
            batch.push(s);
            if batch.len() >= self.cfg.batch_size {
                self.export_spans(std::mem::take(&mut batch), &mut warned, true)
                    .await;
            }
        }
        if !batch.is_empty() {
            self.export_spans(batch, &mut warned, true).await;
        }
        if self.metrics.is_some() {
            self.export_metrics(&mut warned, true).await;
        }
    }

    fn server_port(&mut self, pid: u32) -> Option<u16> {
        // One /proc read per traced process; the cache is bounded (pids of exited servers).
        if self.server_ports.len() >= 4096 && !self.server_ports.contains_key(&pid) {
            self.server_ports.clear();
        }
        *self.server_ports.entry(pid).or_insert_with(|| {
            let ports = crate::targets::server_sockets(pid).listening_ports;
            (ports.len() == 1).then(|| ports[0])
        })
    }

    fn resource(&self, pid: Option<u32>) -> Resource {
        let mut attributes = self.base_resource.clone();
        if let Some(pid) = pid {
            attributes.push(potlp::kv_i64("process.pid", i64::from(pid)));
        }
        Resource {
            attributes,
            ..Default::default()
        }
    }

    async fn export_spans(&mut self, batch: Vec<RequestSpan>, warned: &mut bool, last: bool) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let mut by_pid: Vec<(u32, Vec<_>)> = Vec::new();
        for mut s in batch {
            // The server as the agent sees it: this node, and its port when it has only one.
            s.span
                .attributes
                .push(potlp::kv_str("server.address", self.cfg.node.clone()));
            if let Some(port) = self.server_port(s.pid) {
                s.span
                    .attributes
                    .push(potlp::kv_i64("server.port", i64::from(port)));
            }
            match by_pid.iter_mut().find(|(p, _)| *p == s.pid) {
                Some((_, v)) => v.push(s.span),
                None => by_pid.push((s.pid, vec![s.span])),
            }
        }
        let msg = ExportTraceServiceRequest {
            resource_spans: by_pid
                .into_iter()
                .map(|(pid, spans)| ResourceSpans {
                    resource: Some(self.resource(Some(pid))),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(potlp::instrumentation_scope()),
                        spans,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                })
                .collect(),
        };
        let attempts = if last { 1 } else { self.cfg.max_attempts };
        let stats = self.stats.clone();
        let url = self.client.url().to_owned();
        let mut on_failure = |status: &tonic::Status| {
            stats.trace_exports_failed.fetch_add(1, Ordering::Relaxed);
            if !*warned {
                tracing::warn!(
                    "OTLP trace export to {url} failed: {} {}; retrying with backoff, spans are dropped (counted) while it fails",
                    status.code(),
                    status.message()
                );
                *warned = true;
            }
        };
        match self
            .client
            .export_traces(msg, attempts, &mut on_failure)
            .await
        {
            Some(resp) => {
                self.stats.trace_exports_ok.fetch_add(1, Ordering::Relaxed);
                let rejected = resp
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
                    .min(n);
                self.stats
                    .rejected_spans
                    .fetch_add(rejected, Ordering::Relaxed);
                self.stats
                    .exported_spans
                    .fetch_add(n - rejected, Ordering::Relaxed);
                if *warned {
                    tracing::info!("OTLP receiver {} reachable again", self.client.url());
                    *warned = false;
                }
            }
            None => {
                self.stats
                    .export_failed_spans
                    .fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    async fn export_metrics(&mut self, warned: &mut bool, last: bool) {
        let Some((shared, start)) = &self.metrics else {
            return;
        };
        let store = shared.snapshot();
        let rm =
            potlp::resource_metrics(&store, *start, crate::clock::unix_ns(), self.resource(None));
        let msg = ExportMetricsServiceRequest {
            resource_metrics: vec![rm],
        };
        // The next export carries the same totals: a short retry suffices.
        let attempts = if last {
            1
        } else {
            self.cfg.max_attempts.min(3)
        };
        let stats = self.stats.clone();
        let url = self.client.url().to_owned();
        let mut on_failure = |status: &tonic::Status| {
            stats.metrics_exports_failed.fetch_add(1, Ordering::Relaxed);
            if !*warned {
                tracing::warn!(
                    "OTLP metrics export to {url} failed: {} {}",
                    status.code(),
                    status.message()
                );
                *warned = true;
            }
        };
        if self
            .client
            .export_metrics(msg, attempts, &mut on_failure)
            .await
            .is_some()
        {
            self.stats
                .metrics_exports_ok
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_blocking() {
        // Nothing listens on port 1 of loopback: every export fails; the queue of 2 fills.
        let mut cfg = OtlpConfig::new("http://127.0.0.1:1", "node");
        cfg.queue_capacity = 2;
        cfg.batch_size = 1;
        cfg.metrics_interval = None;
        cfg.client.backoff_min = Duration::from_secs(5);
        let e = OtlpExporter::spawn(cfg, None).unwrap();
        let span = RequestSpan {
            pid: 0,
            span: Default::default(),
        };
        let t = std::time::Instant::now();
        let accepted = (0..100).filter(|_| e.submit(span.clone())).count();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "submit must not block"
        );
        assert!(accepted <= 3, "{accepted} spans accepted into a queue of 2");
        assert_eq!(
            e.drops()[0].1,
            100 - accepted as u64,
            "every span not accepted is counted"
        );
        // Shutdown makes one attempt per queued batch and gives up after 2 s: every accepted
        // span is then exported, counted as failed, or reported lost.
        let lost = e.shutdown(Duration::from_secs(2)).await;
        assert!(lost <= accepted as u64);
    }
}
