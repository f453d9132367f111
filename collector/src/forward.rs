//! Forwards every stored profile to a continuous-profiling backend speaking Pyroscope's HTTP
//! ingest API: `POST <url>/ingest?name=<app>{node=..,agent=..,profile_type=..}&from=<unix s>
//! &until=<unix s>&format=pprof&spyName=infertap` with the gzipped pprof as a
//! `binary/octet-stream` body (Pyroscope reads a raw pprof body when `format=pprof`).
//!
//! One task sends in arrival order behind a bounded queue: a full queue drops the newest profile
//! (`reason="queue_full"`); connection errors, timeouts, 408, 429 and 5xx answers are retried
//! with exponential backoff up to `max_attempts` (`reason="retries_exhausted"` after that);
//! other 4xx answers are not retried (`reason="rejected"`). Plain `http://` only (no TLS).

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::http::{header, Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::profiles::StoredProfile;

/// Forwarder settings.
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// Base URL of the backend, e.g. `http://pyroscope:4040` (`/ingest` is appended).
    pub url: String,
    /// Application name (`name=<app>{...}`), e.g. `infertap`.
    pub app: String,
    /// Profiles waiting to be sent; past it new ones are dropped.
    pub queue: usize,
    /// Tries per profile, the first included.
    pub max_attempts: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Per request (connect, send, answer).
    pub timeout: Duration,
}

impl ForwardConfig {
    /// Defaults: queue 1024, 5 attempts, backoff 500 ms → 10 s, 10 s per request.
    pub fn new(url: impl Into<String>, app: impl Into<String>) -> Self {
        ForwardConfig {
            url: url.into(),
            app: app.into(),
            queue: 1024,
            max_attempts: 5,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Forwarding counters (registered with the collector's own metrics).
#[derive(Clone, Debug, Default)]
pub struct ForwardMetrics {
    pub sent: Counter,
    /// Re-sends after a retryable failure.
    pub retries: Counter,
    /// `reason`: queue_full, retries_exhausted, rejected, shutdown.
    pub dropped: Family<Vec<(String, String)>, Counter>,
    pub queued: Gauge,
}

impl ForwardMetrics {
    fn drop_one(&self, reason: &str) {
        self.dropped
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }
}

struct Job {
    node: String,
    agent: String,
    profile: StoredProfile,
}

/// Handle to the forwarding task.
#[derive(Debug)]
pub struct Forwarder {
    tx: mpsc::Sender<Job>,
    metrics: ForwardMetrics,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({}/{} {})", self.node, self.agent, self.profile.kind)
    }
}

/// Label values in Pyroscope's `name{k=v,...}` cannot hold `,`, `=`, `{`, `}` or spaces.
fn label_value(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-.:/".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Characters escaped in query values (everything but unreserved ones).
const QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The `/ingest` URI for one profile.
pub fn ingest_uri(base: &Uri, app: &str, node: &str, agent: &str, p: &StoredProfile) -> String {
    let name = format!(
        "{app}{{node={},agent={},profile_type={}}}",
        label_value(node),
        label_value(agent),
        p.kind.name()
    );
    let from = p.start_unix_ns / 1_000_000_000;
    let until = p.end_unix_ns.div_ceil(1_000_000_000).max(from + 1);
    let path = base.path().trim_end_matches('/');
    format!(
        "{}://{}{path}/ingest?name={}&from={from}&until={until}&format=pprof&spyName=infertap",
        base.scheme_str().unwrap_or("http"),
        base.authority().map_or("", |a| a.as_str()),
        percent_encoding::utf8_percent_encode(&name, QUERY),
    )
}

enum Outcome {
    Sent,
    Retry(String),
    Rejected(String),
}

impl Forwarder {
    /// Validates the configuration and starts the task; `stop` ends it (what is still queued
    /// is counted as `shutdown` drops).
    pub fn spawn(
        cfg: ForwardConfig,
        metrics: ForwardMetrics,
        stop: oneshot::Receiver<()>,
    ) -> anyhow::Result<(Forwarder, JoinHandle<anyhow::Result<()>>)> {
        let base: Uri = cfg
            .url
            .parse()
            .with_context(|| format!("--profiles-url {:?} is not a URL", cfg.url))?;
        anyhow::ensure!(
            base.scheme_str() == Some("http") && base.authority().is_some(),
            "--profiles-url {:?}: only http://host[:port][/prefix] is supported",
            cfg.url
        );
        anyhow::ensure!(
            !cfg.app.is_empty()
                && cfg
                    .app
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)),
            "--profiles-app {:?}: use letters, digits, '_', '-' and '.'",
            cfg.app
        );
        anyhow::ensure!(
            cfg.queue > 0 && cfg.max_attempts > 0,
            "forward queue and attempts must be positive"
        );
        let (tx, rx) = mpsc::channel(cfg.queue);
        let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let task = tokio::spawn(run(cfg, base, client, rx, metrics.clone(), stop));
        Ok((Forwarder { tx, metrics }, task))
    }

    /// Queues a profile without blocking; false (a counted `queue_full` drop) when full.
    pub fn enqueue(&self, node: &str, agent: &str, profile: &StoredProfile) -> bool {
        let job = Job {
            node: node.to_owned(),
            agent: agent.to_owned(),
            profile: profile.clone(),
        };
        match self.tx.try_send(job) {
            Ok(()) => {
                self.metrics.queued.inc();
                true
            }
            Err(_) => {
                self.metrics.drop_one("queue_full");
                false
            }
        }
    }
}

async fn run(
    cfg: ForwardConfig,
    base: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    mut rx: mpsc::Receiver<Job>,
    metrics: ForwardMetrics,
    mut stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let mut logged_failures = 0u64;
    loop {
        let job = tokio::select! {
            j = rx.recv() => match j { Some(j) => j, None => return Ok(()) },
            _ = &mut stop => break,
        };
        metrics.queued.dec();
        let uri = ingest_uri(&base, &cfg.app, &job.node, &job.agent, &job.profile);
        let mut backoff = cfg.backoff_min;
        let mut attempt = 1;
        loop {
            let outcome = send(&client, &uri, &job.profile.pprof, cfg.timeout).await;
            match outcome {
                Outcome::Sent => {
                    metrics.sent.inc();
                    break;
                }
                Outcome::Rejected(why) => {
                    metrics.drop_one("rejected");
                    logged_failures += 1;
                    if logged_failures.is_power_of_two() {
                        tracing::warn!(%uri, "profile backend refused a profile: {why}");
                    }
                    break;
                }
                Outcome::Retry(why) if attempt >= cfg.max_attempts => {
                    metrics.drop_one("retries_exhausted");
                    logged_failures += 1;
                    if logged_failures.is_power_of_two() {
                        tracing::warn!(%uri, attempts = attempt, "could not forward a profile: {why}");
                    }
                    break;
                }
                Outcome::Retry(why) => {
                    tracing::debug!(%uri, attempt, "forward failed, retrying: {why}");
                    metrics.retries.inc();
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut stop => {
                            metrics.drop_one("shutdown");
                            return drain(rx, &metrics);
                        }
                    }
                    backoff = (backoff * 2).min(cfg.backoff_max);
                }
            }
        }
    }
    drain(rx, &metrics)
}

fn drain(mut rx: mpsc::Receiver<Job>, metrics: &ForwardMetrics) -> anyhow::Result<()> {
    rx.close();
    while rx.try_recv().is_ok() {
        metrics.queued.dec();
        metrics.drop_one("shutdown");
    }
    Ok(())
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &str,
    body: &Bytes,
    timeout: Duration,
) -> Outcome {
    let req = match Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "binary/octet-stream")
        .header(
            header::USER_AGENT,
            concat!("infertap-collector/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(body.clone()))
    {
        Ok(r) => r,
        Err(e) => return Outcome::Rejected(format!("bad request: {e}")),
    };
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        })?;
        let status = resp.status();
        // Read (a bounded part of) the answer so the connection can be reused.
        let body = http_body_util::Limited::new(resp.into_body(), 4096)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        Ok::<_, String>((status, body))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Outcome::Retry(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Outcome::Retry(e),
        Ok(Ok((status, _))) if status.is_success() => Outcome::Sent,
        Ok(Ok((status, body)))
            if status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT =>
        {
            Outcome::Retry(format!("{status}: {}", body.trim()))
        }
        Ok(Ok((status, body))) => Outcome::Rejected(format!("{status}: {}", body.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infertap_proto::pprof::ProfileKind;

    #[test]
    fn ingest_uri_has_pyroscope_form() {
        let p = StoredProfile {
            kind: ProfileKind::OffCpu,
            start_unix_ns: 1_700_000_000_500_000_000,
            end_unix_ns: 1_700_000_010_200_000_000,
            sample_count: 1,
            pprof: Bytes::new(),
        };
        let base: Uri = "http://127.0.0.1:4040/pyro/".parse().unwrap();
        let u = ingest_uri(&base, "infertap", "gpu-node 1", "vllm,a", &p);
        assert_eq!(
            u,
            "http://127.0.0.1:4040/pyro/ingest?name=infertap%7Bnode%3Dgpu-node_1%2Cagent%3Dvllm_a%2Cprofile_type%3Doffcpu%7D&from=1700000000&until=1700000011&format=pprof&spyName=infertap"
        );
    }

    #[tokio::test]
    async fn refuses_bad_configuration() {
        let m = ForwardMetrics::default();
        for (url, app) in [
            ("https://x:4040", "infertap"),
            ("not a url", "infertap"),
            ("http://x:4040", "bad app{}"),
            ("/relative", "infertap"),
        ] {
            let (_tx, stop) = oneshot::channel();
            assert!(
                Forwarder::spawn(ForwardConfig::new(url, app), m.clone(), stop).is_err(),
                "{url} {app}"
            );
        }
    }
}
