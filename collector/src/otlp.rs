//! `--otlp-endpoint` on the collector: the merged fleet metrics (what `/metrics` serves) over
//! OTLP/gRPC every interval, with the agents' `node`/`agent` identity as attributes.
//!
//! The conversion and the client are the agent's (`infertap_proto::otlp`): explicit-bucket
//! histograms with the schema's bounds, monotonic sums, gauges, cumulative temporality since the
//! collector started, OTLP's retryable codes retried with backoff. A failed export loses
//! nothing (the next one carries the totals); failures are counted and logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use infertap_proto::otlp::{self as potlp, ClientConfig, OtlpClient};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::resource::v1::Resource;
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

/// Export calls by result, cumulative.
#[derive(Debug, Default)]
pub struct OtlpExportCounts {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// The running export task.
#[derive(Debug)]
pub struct OtlpMetricsExporter {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    counts: Arc<OtlpExportCounts>,
}

impl OtlpMetricsExporter {
    /// Starts exporting `fleet`'s merged view. Fails only on an invalid endpoint or header.
    pub fn spawn(cfg: OtlpMetricsConfig, fleet: Arc<Fleet>) -> anyhow::Result<Self> {
        anyhow::ensure!(!cfg.interval.is_zero(), "--otlp-interval must be positive");
        let client = OtlpClient::new(cfg.client.clone())?;
        let counts = Arc::new(OtlpExportCounts::default());
        let (stop, stopped) = watch::channel(false);
        let started = crate::unix_now_ns();
        let task = tokio::spawn(run(cfg, client, fleet, started, counts.clone(), stopped));
        Ok(OtlpMetricsExporter { stop, task, counts })
    }

    pub fn counts(&self) -> &OtlpExportCounts {
        &self.counts
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
    counts: Arc<OtlpExportCounts>,
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
        let mut on_failure = |s: &tonic::Status| {
            c.failed.fetch_add(1, Ordering::Relaxed);
            first_failure.get_or_insert_with(|| format!("{} {}", s.code(), s.message()));
        };
        let ok = client
            .export_metrics(msg, attempts, &mut on_failure)
            .await
            .is_some();
        if ok {
            counts.ok.fetch_add(1, Ordering::Relaxed);
            if failing {
                tracing::info!("OTLP metrics export to {} works again", client.url());
                failing = false;
            }
        } else if !failing {
            tracing::warn!(
                "OTLP metrics export to {} failed ({}); {} failed calls so far, retrying every interval",
                client.url(),
                first_failure.unwrap_or_default(),
                counts.failed.load(Ordering::Relaxed)
            );
            failing = true;
        }
        if last {
            return;
        }
    }
}
