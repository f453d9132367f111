//! Prometheus remote write (1.0) of the merged fleet view to any number of stores
//! (`--remote-write-url`, repeatable): VictoriaMetrics, Prometheus with
//! `--web.enable-remote-write-receiver`, Mimir, Cortex, Thanos Receive, ...
//!
//! Every `--remote-write-interval` the collector snapshots the same series `/metrics` shows
//! (taken under the fleet lock: a clone), turns them into samples with one timestamp
//! ([`encode`]), splits them into requests of at most `--remote-write-max-samples` samples
//! and appends those, already compressed, to a durable on-disk queue per URL ([`queue`]); the
//! encoding and the disk writes run on the blocking pool, never on the gRPC ingest threads.
//!
//! One sender per URL posts the oldest queued request (`Content-Encoding: snappy`,
//! `Content-Type: application/x-protobuf`, `X-Prometheus-Remote-Write-Version: 0.1.0`) and
//! deletes it only once the store answered 2xx. 5xx, 429, timeouts and connection errors are
//! retried (exponential backoff with jitter, capped, `Retry-After` honoured) without limit: the
//! queue's byte bound decides what is given up, oldest first (`reason="queue_full"`). Any other
//! 4xx means the store will never take that request: it is dropped, logged and counted
//! (`reason="rejected"`) so one poison request cannot stall the queue. Requests stay in order.
//!
//! Self-metrics (label `url`, credentials and query stripped): see [`RemoteWriteMetrics`].

pub mod encode;
pub mod queue;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::http::{header, Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use infertap_proto::store::MetricStore;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use self::queue::{Queue, QueueConfig};

/// Remote-write settings.
#[derive(Clone, Debug)]
pub struct RemoteWriteConfig {
    /// Store endpoints, e.g. `http://victoria:8428/api/v1/write`.
    pub urls: Vec<String>,
    /// Parent of the per-URL queue directories.
    pub dir: PathBuf,
    /// Snapshot period.
    pub interval: Duration,
    /// Byte bound of each URL's queue.
    pub max_bytes: u64,
    /// Most samples in one request.
    pub max_samples_per_send: usize,
    /// Labels added to every series (unless it has them), e.g. `cluster=eu1`.
    pub external_labels: Vec<(String, String)>,
    /// Extra request headers (e.g. `Authorization`, `X-Scope-OrgID` for Mimir).
    pub headers: Vec<(String, String)>,
    /// Per request (connect, send, answer).
    pub timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl RemoteWriteConfig {
    /// Defaults: 15 s interval, 1 GiB per queue, 10,000 samples per request, 30 s timeout,
    /// backoff 500 ms → 30 s.
    pub fn new(urls: Vec<String>, dir: PathBuf) -> Self {
        RemoteWriteConfig {
            urls,
            dir,
            interval: Duration::from_secs(15),
            max_bytes: 1 << 30,
            max_samples_per_send: 10_000,
            external_labels: Vec::new(),
            headers: Vec::new(),
            timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

type Labels = Vec<(String, String)>;

/// Remote-write self-metrics, each labelled with the store's `url` (and `reason` for drops).
#[derive(Clone, Debug)]
pub struct RemoteWriteMetrics {
    /// `infertap_collector_remote_write_samples_enqueued_total`: appended to the queue, plus
    /// those found queued on disk at start (so enqueued = sent + dropped + pending).
    pub enqueued: Family<Labels, Counter>,
    /// `infertap_collector_remote_write_samples_sent_total`: acknowledged by the store.
    pub sent: Family<Labels, Counter>,
    /// `infertap_collector_remote_write_samples_dropped_total{reason}`: `queue_full` (oldest
    /// data deleted to stay within `--remote-write-max-bytes`), `rejected` (a 4xx other than
    /// 429), `corrupt` (a queued request that no longer reads back), `enqueue_failed` (the
    /// queue could not be written, e.g. a full disk).
    pub dropped: Family<Labels, Counter>,
    /// `infertap_collector_remote_write_retries_total`: re-sends after a retryable failure.
    pub retries: Family<Labels, Counter>,
    /// `infertap_collector_remote_write_queue_bytes`: segment bytes on disk.
    pub queue_bytes: Family<Labels, Gauge>,
    /// `infertap_collector_remote_write_pending_samples`: queued, not yet acknowledged.
    pub pending_samples: Family<Labels, Gauge>,
    /// `infertap_collector_remote_write_lag_seconds`: age of the oldest unacknowledged
    /// snapshot (0 when the queue is empty).
    pub lag_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    /// `infertap_collector_remote_write_last_success_timestamp_seconds`.
    pub last_success: Family<Labels, Gauge<f64, AtomicU64>>,
    /// `infertap_collector_remote_write_send_duration_seconds`: one request, store answer included.
    pub send_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// `infertap_collector_remote_write_snapshot_duration_seconds`: snapshot to queued, all URLs.
    pub snapshot_duration: Histogram,
    /// `infertap_collector_remote_write_snapshot_samples`: samples in the last snapshot.
    pub snapshot_samples: Gauge,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for RemoteWriteMetrics {
    fn default() -> Self {
        RemoteWriteMetrics {
            enqueued: Family::default(),
            sent: Family::default(),
            dropped: Family::default(),
            retries: Family::default(),
            queue_bytes: Family::default(),
            pending_samples: Family::default(),
            lag_seconds: Family::default(),
            last_success: Family::default(),
            send_duration: Family::new_with_constructor(duration_histogram),
            snapshot_duration: duration_histogram(),
            snapshot_samples: Gauge::default(),
        }
    }
}

impl RemoteWriteMetrics {
    /// Adds every remote-write metric to `r`.
    pub fn register(&self, r: &mut Registry) {
        let p = "infertap_collector_remote_write";
        r.register(
            format!("{p}_samples_enqueued"),
            "Samples appended to the remote-write queue (and found queued on disk at start)",
            self.enqueued.clone(),
        );
        r.register(
            format!("{p}_samples_sent"),
            "Samples the store acknowledged",
            self.sent.clone(),
        );
        r.register(
            format!("{p}_samples_dropped"),
            "Samples given up, by reason (queue_full, rejected, corrupt, enqueue_failed)",
            self.dropped.clone(),
        );
        r.register(
            format!("{p}_retries"),
            "Requests re-sent after a 5xx, 429, timeout or connection error",
            self.retries.clone(),
        );
        r.register(
            format!("{p}_queue_bytes"),
            "Bytes of the on-disk queue",
            self.queue_bytes.clone(),
        );
        r.register(
            format!("{p}_pending_samples"),
            "Samples queued and not yet acknowledged",
            self.pending_samples.clone(),
        );
        r.register(
            format!("{p}_lag_seconds"),
            "Age of the oldest unacknowledged snapshot (0 when all are sent)",
            self.lag_seconds.clone(),
        );
        r.register(
            format!("{p}_last_success_timestamp_seconds"),
            "Unix time of the last acknowledged request",
            self.last_success.clone(),
        );
        r.register(
            format!("{p}_send_duration_seconds"),
            "Duration of one remote-write request",
            self.send_duration.clone(),
        );
        r.register(
            format!("{p}_snapshot_duration_seconds"),
            "Time from snapshot to queued (encoding and disk writes, all URLs)",
            self.snapshot_duration.clone(),
        );
        r.register(
            format!("{p}_snapshot_samples"),
            "Samples in the last snapshot",
            self.snapshot_samples.clone(),
        );
    }
}

/// The URL as a label value: scheme, host, port and path (no credentials, no query).
pub fn url_label(uri: &Uri) -> String {
    let host = uri.host().unwrap_or("");
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{}://{host}{port}{}",
        uri.scheme_str().unwrap_or("http"),
        uri.path()
    )
}

/// The queue directory of one URL: its host, port and a hash of the whole URL (so two paths
/// on one host get two queues, and the name stays a plain file name).
pub fn queue_dir(parent: &Path, uri: &Uri) -> PathBuf {
    let full = uri.to_string();
    let sum = crc32fast::hash(full.as_bytes());
    let host: String = format!(
        "{}_{}",
        uri.host().unwrap_or("store"),
        uri.port_u16().unwrap_or(0)
    )
    .chars()
    .map(|c| {
        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
            c
        } else {
            '_'
        }
    })
    .collect();
    parent.join(format!("{host}-{sum:08x}"))
}

struct Target {
    uri: Uri,
    label: Labels,
    queue: Arc<Queue>,
    notify: Notify,
}

/// The remote-write side of a collector: queues, senders and metrics.
pub struct RemoteWrite {
    cfg: RemoteWriteConfig,
    targets: Vec<Arc<Target>>,
    metrics: RemoteWriteMetrics,
    /// The last snapshot's series, to mark the ones that disappear as stale.
    prev_view: Mutex<Option<MetricStore>>,
}

impl std::fmt::Debug for RemoteWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteWrite")
            .field("urls", &self.cfg.urls)
            .finish()
    }
}

fn reason(url: &Labels, reason: &str) -> Labels {
    let mut l = url.clone();
    l.push(("reason".into(), reason.into()));
    l
}

impl RemoteWrite {
    /// Opens every URL's queue (resuming what a previous run left). Fails on a bad URL or a
    /// queue directory that cannot be used (permissions, another collector holding it).
    pub fn open(cfg: RemoteWriteConfig) -> anyhow::Result<RemoteWrite> {
        let metrics = RemoteWriteMetrics::default();
        let mut targets = Vec::new();
        for url in &cfg.urls {
            let uri: Uri = url
                .parse()
                .with_context(|| format!("--remote-write-url {url:?}"))?;
            anyhow::ensure!(
                matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some(),
                "--remote-write-url {url:?}: expected http(s)://host[:port]/path"
            );
            let dir = queue_dir(&cfg.dir, &uri);
            let (queue, opened) = Queue::open(&dir, QueueConfig::new(cfg.max_bytes))
                .with_context(|| format!("remote-write queue {}", dir.display()))?;
            let label = vec![("url".to_owned(), url_label(&uri))];
            if opened.corrupt_bytes > 0 {
                tracing::warn!(url = %label[0].1, dir = %dir.display(), bytes = opened.corrupt_bytes, "remote-write queue had a damaged tail (a crash mid-write?); cut it off");
            }
            if opened.pending_records > 0 {
                tracing::info!(url = %label[0].1, requests = opened.pending_records, samples = opened.pending_samples, "resuming the remote-write queue");
            }
            // Resumed samples count as enqueued by this process, so enqueued = sent + dropped +
            // pending holds across restarts.
            metrics
                .enqueued
                .get_or_create(&label)
                .inc_by(opened.pending_samples);
            targets.push(Arc::new(Target {
                uri,
                label,
                queue: Arc::new(queue),
                notify: Notify::new(),
            }));
        }
        Ok(RemoteWrite {
            cfg,
            targets,
            metrics,
            prev_view: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &RemoteWriteConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &RemoteWriteMetrics {
        &self.metrics
    }

    /// Whether every queue is empty (everything acknowledged or given up).
    pub fn all_sent(&self) -> bool {
        self.targets
            .iter()
            .all(|t| t.queue.stats().pending_records == 0)
    }

    /// Refreshes the queue gauges (called before each scrape and snapshot).
    pub fn refresh_gauges(&self) {
        let now_ms = crate::unix_now_ns() as f64 / 1e6;
        for t in &self.targets {
            let st = t.queue.stats();
            self.metrics
                .queue_bytes
                .get_or_create(&t.label)
                .set(st.bytes as i64);
            self.metrics
                .pending_samples
                .get_or_create(&t.label)
                .set(st.pending_samples as i64);
            let lag = st
                .oldest_pending_ms
                .map_or(0.0, |ms| ((now_ms - ms as f64) / 1e3).max(0.0));
            self.metrics.lag_seconds.get_or_create(&t.label).set(lag);
        }
    }

    /// Turns one snapshot into requests and appends them to every queue. Blocking (CPU and
    /// disk): call it on the blocking pool.
    pub fn enqueue_snapshot(&self, view: &MetricStore, self_text: &str, ts_ms: i64) {
        let started = Instant::now();
        let gone = {
            let mut prev = self
                .prev_view
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let gone = prev.as_ref().map(|p| p.without(view));
            *prev = Some(view.clone());
            gone
        };
        let batches = encode::encode_snapshot(
            view,
            gone.as_ref().filter(|g| g.series_count() > 0),
            self_text,
            &self.cfg.external_labels,
            ts_ms,
            self.cfg.max_samples_per_send,
        );
        let samples: u64 = batches.iter().map(|b| u64::from(b.samples)).sum();
        self.metrics.snapshot_samples.set(samples as i64);
        let refs: Vec<(u32, &[u8])> = batches
            .iter()
            .map(|b| (b.samples, b.body.as_slice()))
            .collect();
        for t in &self.targets {
            match t.queue.append(ts_ms, &refs) {
                Ok(a) => {
                    self.metrics
                        .enqueued
                        .get_or_create(&t.label)
                        .inc_by(samples);
                    if a.dropped_samples > 0 {
                        self.metrics
                            .dropped
                            .get_or_create(&reason(&t.label, "queue_full"))
                            .inc_by(a.dropped_samples);
                        tracing::warn!(url = %t.label[0].1, samples = a.dropped_samples, requests = a.dropped_records, "remote-write queue full (--remote-write-max-bytes): dropped its oldest data");
                    }
                    t.notify.notify_one();
                }
                Err(e) => {
                    self.metrics
                        .dropped
                        .get_or_create(&reason(&t.label, "enqueue_failed"))
                        .inc_by(samples);
                    tracing::error!(url = %t.label[0].1, "could not queue a remote-write snapshot ({samples} samples): {e}");
                }
            }
        }
        self.metrics
            .snapshot_duration
            .observe(started.elapsed().as_secs_f64());
        self.refresh_gauges();
    }

    /// Starts one sender per URL; they stop when `stop` turns true (what is queued stays on
    /// disk for the next run).
    pub fn spawn_senders(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<()>>>> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .context("TLS setup")?
            .https_or_http()
            .enable_http1()
            .build();
        let client: HttpClient = Client::builder(TokioExecutor::new()).build(https);
        Ok(self
            .targets
            .iter()
            .map(|t| {
                let (rw, t, client, stop) = (self.clone(), t.clone(), client.clone(), stop.clone());
                tokio::spawn(async move {
                    rw.run_sender(&t, client, stop).await;
                    Ok(())
                })
            })
            .collect())
    }

    async fn run_sender(&self, t: &Target, client: HttpClient, mut stop: watch::Receiver<bool>) {
        let m = &self.metrics;
        let url = t.label[0].1.clone();
        let mut backoff = self.cfg.backoff_min;
        let mut failures = 0u64;
        let mut rng = fastrand::Rng::new();
        loop {
            if *stop.borrow() {
                return;
            }
            let q = t.queue.clone();
            let next = tokio::task::spawn_blocking(move || q.peek()).await;
            let rec = match next {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::error!(%url, "reading the remote-write queue: {e}");
                    if sleep_or_stop(Duration::from_secs(1), &mut stop).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!(%url, "remote-write queue task failed: {e}");
                    return;
                }
            };
            let rec = match rec {
                None => {
                    tokio::select! {
                        _ = t.notify.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return,
                    }
                    continue;
                }
                Some(Err((id, samples))) => {
                    tracing::error!(%url, id, samples, "a queued remote-write request no longer reads back intact; skipped it");
                    m.dropped
                        .get_or_create(&reason(&t.label, "corrupt"))
                        .inc_by(u64::from(samples));
                    self.ack(t, id).await;
                    continue;
                }
                Some(Ok(r)) => r,
            };
            let started = Instant::now();
            let outcome = self.send(&client, t, rec.payload).await;
            m.send_duration
                .get_or_create(&t.label)
                .observe(started.elapsed().as_secs_f64());
            match outcome {
                Outcome::Ok => {
                    self.ack(t, rec.id).await;
                    m.sent
                        .get_or_create(&t.label)
                        .inc_by(u64::from(rec.samples));
                    m.last_success
                        .get_or_create(&t.label)
                        .set(crate::unix_now_ns() as f64 / 1e9);
                    if failures > 0 {
                        tracing::info!(%url, failures, "remote write recovered");
                    }
                    failures = 0;
                    backoff = self.cfg.backoff_min;
                    self.refresh_gauges();
                }
                Outcome::Rejected(status, body) => {
                    tracing::error!(%url, status = status.as_u16(), samples = rec.samples, "store rejected a remote-write request; dropped it: {body}");
                    m.dropped
                        .get_or_create(&reason(&t.label, "rejected"))
                        .inc_by(u64::from(rec.samples));
                    self.ack(t, rec.id).await;
                }
                Outcome::Retry { after, why } => {
                    failures += 1;
                    m.retries.get_or_create(&t.label).inc();
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(%url, failures, "remote write failed, will retry: {why}");
                    }
                    let half = backoff / 2;
                    let jittered = half + half.mul_f64(rng.f64());
                    let wait = after.map_or(jittered, |a| a.min(self.cfg.backoff_max * 4));
                    backoff = (backoff * 2).min(self.cfg.backoff_max);
                    if sleep_or_stop(wait, &mut stop).await {
                        return;
                    }
                }
            }
        }
    }

    async fn ack(&self, t: &Target, id: u64) {
        let q = t.queue.clone();
        match tokio::task::spawn_blocking(move || q.ack(id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(url = %t.label[0].1, "recording a remote-write ack: {e}"),
            Err(e) => tracing::error!(url = %t.label[0].1, "remote-write ack task failed: {e}"),
        }
    }

    async fn send(&self, client: &HttpClient, t: &Target, body: Vec<u8>) -> Outcome {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(t.uri.clone())
            .header(header::CONTENT_ENCODING, "snappy")
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .header(
                header::USER_AGENT,
                concat!("infertap-collector/", env!("CARGO_PKG_VERSION")),
            )
            .header("X-Prometheus-Remote-Write-Version", "0.1.0");
        for (k, v) in &self.cfg.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = match req.body(Full::new(Bytes::from(body))) {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Rejected(StatusCode::BAD_REQUEST, format!("bad request: {e}"))
            }
        };
        let res = tokio::time::timeout(self.cfg.timeout, async {
            let resp = client.request(req).await?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, retry_after, body))
        })
        .await;
        match res {
            Err(_) => Outcome::Retry {
                after: None,
                why: format!("no answer within {:?}", self.cfg.timeout),
            },
            Ok(Err(e)) => Outcome::Retry {
                after: None,
                why: format!("{e:#}"),
            },
            Ok(Ok((status, after, body))) => {
                let text = String::from_utf8_lossy(&body[..body.len().min(512)])
                    .trim()
                    .to_owned();
                if status.is_success() {
                    Outcome::Ok
                } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    Outcome::Retry {
                        after,
                        why: format!("{status}: {text}"),
                    }
                } else {
                    Outcome::Rejected(status, text)
                }
            }
        }
    }
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

enum Outcome {
    Ok,
    Rejected(StatusCode, String),
    Retry {
        after: Option<Duration>,
        why: String,
    },
}

/// `Retry-After`: delay seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at_ms = chrono::DateTime::parse_from_rfc2822(v)
        .ok()?
        .timestamp_millis();
    let now_ms = (crate::unix_now_ns() / 1_000_000) as i64;
    Some(Duration::from_millis(
        at_ms.saturating_sub(now_ms).max(0) as u64
    ))
}

/// Sleeps `d` unless stopped first; returns whether it was stopped.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let secs = (crate::unix_now_ns() / 1_000_000_000) as i64 + 60;
        let in_a_minute = chrono::DateTime::from_timestamp(secs, 0)
            .unwrap()
            .to_rfc2822();
        let d = parse_retry_after(&in_a_minute).unwrap();
        assert!(
            d > Duration::from_secs(50) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn url_labels_drop_credentials_and_queue_dirs_differ_per_path() {
        let u: Uri = "https://user:secret@mimir.example:443/api/v1/push?x=1"
            .parse()
            .unwrap();
        assert_eq!(url_label(&u), "https://mimir.example:443/api/v1/push");
        let a: Uri = "http://vm:8428/api/v1/write".parse().unwrap();
        let b: Uri = "http://vm:8428/insert/0/prometheus/api/v1/write"
            .parse()
            .unwrap();
        let (da, db) = (
            queue_dir(Path::new("/q"), &a),
            queue_dir(Path::new("/q"), &b),
        );
        assert_ne!(da, db);
        assert!(da
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("vm_8428-"));
    }
}
