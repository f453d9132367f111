//! `--otlp-endpoint` on the collector: the merged fleet metrics (what `/metrics` serves) over
//! OTLP/gRPC every interval, with the agents' `node`/`agent` identity as attributes.
//!
//! The conversion and the client are the agent's (`infertap_proto::otlp`): explicit-bucket
//! histograms with the schema's bounds, monotonic sums, gauges, cumulative temporality since the
//! collector started, OTLP's retryable codes retried with backoff. A failed export loses
//! nothing (the next one carries the totals); every call is counted on the collector's own
//! `/metrics` as `infertap_collector_otlp_exports_total{result="ok|error"}` and failures are
//! logged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use infertap_proto::otlp::{self as potlp, ClientConfig, OtlpClient};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Fleet;

/// What and where the collector exports over OTLP.
#[derive(Clone, Debug)]
pub struct OtlpMetricsConfig {
    pub client: ClientConfig,
    /// `service.name` of the resource.
    pub service_name: String,
    /// `host.name` of the resource (the collector's host).
    pub host_name: String,
    /// Time between exports.
    pub interval: Duration,
    /// Attempts per export (the first included).
    pub max_attempts: u32,
}

impl OtlpMetricsConfig {
    /// Defaults: `service.name` `infertap-collector`, every 10 s, 3 attempts per export.
    pub fn new(endpoint: impl Into<String>, host_name: impl Into<String>) -> Self {
        OtlpMetricsConfig {
            client: ClientConfig::new(endpoint),
            service_name: "infertap-collector".into(),
            host_name: host_name.into(),
            interval: Duration::from_secs(10),
            max_attempts: 3,
        }
    }
}

/// Export calls by result, for the collector's own `/metrics` (registered once an exporter
/// runs).
#[derive(Clone, Debug, Default)]
pub struct OtlpExportMetrics {
    enabled: Arc<AtomicBool>,
    exports: Family<Vec<(String, String)>, Counter>,
}

impl OtlpExportMetrics {
    /// Counts one call; returns the new total for `result`.
    fn count(&self, result: &str) -> u64 {
        self.exports
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc()
            + 1
    }

    /// Export calls with `result` (`ok`, `error`) so far.
    pub fn get(&self, result: &str) -> u64 {
        self.exports
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .get()
    }

    /// Adds the family to `registry` when an exporter runs.
    pub fn register(&self, registry: &mut Registry) {
        if self.enabled.load(Ordering::Relaxed) {
            registry.register(
                "infertap_collector_otlp_exports",
                "OTLP metrics export calls (--otlp-endpoint), by result (ok, error; each retry counted)",
                self.exports.clone(),
            );
        }
    }
}

/// The running export task.
#[derive(Debug)]
pub struct OtlpMetricsExporter {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl OtlpMetricsExporter {
    /// Starts exporting `fleet`'s merged view. Fails only on an invalid endpoint or header.
    pub fn spawn(cfg: OtlpMetricsConfig, fleet: Arc<Fleet>) -> anyhow::Result<Self> {
        anyhow::ensure!(!cfg.interval.is_zero(), "--otlp-interval must be positive");
        let client = OtlpClient::new(cfg.client.clone())?;
        let counts = fleet.otlp_metrics();
        counts.enabled.store(true, Ordering::Relaxed);
        let (stop, stopped) = watch::channel(false);
        let started = crate::unix_now_ns();
        let task = tokio::spawn(run(cfg, client, fleet, started, counts, stopped));
        Ok(OtlpMetricsExporter { stop, task })
    }

    /// Exports the final totals once and stops, waiting at most `timeout`; false when it had
    /// to give up.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
            return false;
        }
        true
    }
}

async fn run(
    cfg: OtlpMetricsConfig,
    client: OtlpClient,
    fleet: Arc<Fleet>,
    started: u64,
    counts: OtlpExportMetrics,
    mut stopped: watch::Receiver<bool>,
) {
    let resource = Resource {
        attributes: vec![
            potlp::kv_str("service.name", cfg.service_name.clone()),
            potlp::kv_str("host.name", cfg.host_name.clone()),
            potlp::kv_str("infertap.collector.version", env!("CARGO_PKG_VERSION")),
        ],
        ..Default::default()
    };
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + cfg.interval, cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let last = tokio::select! {
            biased;
            _ = stopped.changed() => true,
            _ = tick.tick() => false,
        };
        let msg = ExportMetricsServiceRequest {
            resource_metrics: vec![potlp::resource_metrics(
                &fleet.snapshot(),
                started,
                crate::unix_now_ns(),
                resource.clone(),
            )],
        };
        let attempts = if last { 1 } else { cfg.max_attempts };
        let c = counts.clone();
        let mut first_failure = None;
        let mut failed_total = 0;
        let mut on_failure = |s: &tonic::Status| {
            failed_total = c.count("error");
            first_failure.get_or_insert_with(|| format!("{} {}", s.code(), s.message()));
        };
        let ok = client
            .export_metrics(msg, attempts, &mut on_failure)
            .await
            .is_some();
        if ok {
            counts.count("ok");
            if failing {
                tracing::info!("OTLP metrics export to {} works again", client.url());
                failing = false;
            }
        } else if !failing {
            tracing::warn!(
                "OTLP metrics export to {} failed ({}); {} failed calls so far, retrying every interval",
                client.url(),
                first_failure.unwrap_or_default(),
                failed_total
            );
            failing = true;
        }
        if last {
            return;
        }
    }
}
