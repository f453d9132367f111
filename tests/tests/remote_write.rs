//! Remote write from the real `infertap-collector` binary into real stores (VictoriaMetrics
//! and Prometheus, started here on loopback with temporary data directories), and the
//! collector's persisted state across a SIGKILL. The agents are the agent's own gRPC exporter
//! (`infertap::sinks::grpc::GrpcExporter`) fed with constructed interval reports.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use infertap::sinks::grpc::{ExporterConfig, GrpcExporter};
use infertap_proto::pb::{Counter, Gauge, Histogram, IntervalReport, Label};
use infertap_proto::schema;
use infertap_tests::collector_support::{free_port, CollectorProcess, Metrics};
use infertap_tests::prereq;
use infertap_tests::stores::{self, Kind, Store};

const WAIT: Duration = Duration::from_secs(60);

fn label(n: &str, v: &str) -> Label {
    Label {
        name: n.into(),
        value: v.into(),
    }
}

/// Report `i` of an agent: `1 + i % 3` requests, TTFTs in buckets `i % 5` and `i % 5 + 2`.
fn report(i: u64) -> IntervalReport {
    let def = &schema::TIME_TO_FIRST_TOKEN;
    let n = 1 + i % 3;
    let mut buckets = vec![0u64; def.bucket_count()];
    buckets[(i % 5) as usize] += n;
    buckets[(i % 5 + 2) as usize] += 1;
    IntervalReport {
        histograms: vec![Histogram {
            name: def.name.into(),
            labels: vec![label("model_name", "m")],
            bucket_counts: buckets,
            sum: 0.25 * (n + 1) as f64,
            count: n + 1,
        }],
        counters: vec![Counter {
            name: schema::REQUESTS.name.into(),
            labels: vec![label("model_name", "m"), label("outcome", "ok")],
            value: n,
        }],
        gauges: vec![Gauge {
            name: schema::REQUESTS_RUNNING.name.into(),
            labels: vec![],
            value: (i % 4) as f64,
        }],
        ..Default::default()
    }
}

fn requests_in(reports: std::ops::Range<u64>) -> u64 {
    reports.map(|i| 1 + i % 3).sum()
}

fn exporter(grpc: SocketAddr, node: &str, agent: &str) -> GrpcExporter {
    let mut cfg = ExporterConfig::new(format!("http://{grpc}"), node, agent);
    cfg.backoff_min = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(500);
    cfg.connect_timeout = Duration::from_secs(2);
    GrpcExporter::spawn(cfg).expect("spawn exporter")
}

async fn scrape(c: &CollectorProcess) -> Metrics {
    let addr = c.metrics_addr;
    tokio::task::spawn_blocking(move || infertap_tests::collector_support::scrape(addr))
        .await
        .unwrap()
        .expect("scrape")
}

/// The merged fleet series of a scrape (the collector's own metrics left out).
fn merged(m: &Metrics) -> BTreeMap<BTreeMap<String, String>, f64> {
    m.samples()
        .iter()
        .filter(|(n, _, _)| n.starts_with("infertap_") && !n.starts_with("infertap_collector_"))
        .map(|(n, l, v)| {
            let mut l = l.clone();
            l.insert("__name__".into(), n.clone());
            (l, *v)
        })
        .collect()
}

fn rw_args<'a>(url: &'a str, dir: &'a str, state: &'a str, interval: &'a str) -> Vec<&'a str> {
    vec![
        "--remote-write-url",
        url,
        "--remote-write-dir",
        dir,
        "--remote-write-interval",
        interval,
        "--state-dir",
        state,
        "--state-interval",
        "500ms",
        "--remote-write-max-backoff",
        "1s",
    ]
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Polls the collector until `cond` holds on a scrape.
async fn wait_scrape(c: &CollectorProcess, what: &str, cond: impl Fn(&Metrics) -> bool) -> Metrics {
    let end = Instant::now() + WAIT;
    loop {
        let m = scrape(c).await;
        if cond(&m) {
            return m;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Everything enqueued has been acknowledged (one scrape shows sent == enqueued, none pending).
fn all_delivered(m: &Metrics) -> bool {
    let sent = m.sum("infertap_collector_remote_write_samples_sent_total", &[]);
    let enq = m.sum(
        "infertap_collector_remote_write_samples_enqueued_total",
        &[],
    );
    let dropped = m.sum("infertap_collector_remote_write_samples_dropped_total", &[]);
    enq > 0.0
        && sent + dropped == enq
        && m.sum("infertap_collector_remote_write_pending_samples", &[]) == 0.0
}

fn sent(m: &Metrics) -> f64 {
    m.sum("infertap_collector_remote_write_samples_sent_total", &[])
}

/// (a)/(b): what the store holds is exactly what `/metrics` shows: every counter, gauge and
/// histogram bucket/sum/count series with the same labels and values.
async fn store_matches_metrics_exactly(kind: Kind, test: &str) {
    let bin = match kind {
        Kind::Victoria => stores::VICTORIA_METRICS,
        Kind::Prometheus => stores::PROMETHEUS,
    };
    if !prereq::check(test, stores::missing(bin)) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::start(kind, free_port().unwrap(), &tmp.path().join("store")).unwrap();
    let url = store.write_url();
    let (q, s) = (tmp.path().join("q"), tmp.path().join("state"));
    let (q, s) = (q.to_str().unwrap(), s.to_str().unwrap());
    let c = CollectorProcess::start(
        "127.0.0.1:0".parse().unwrap(),
        &rw_args(&url, q, s, "500ms"),
    )
    .unwrap();
    let a = exporter(c.grpc_addr, "node-1", "vllm-0");
    let b = exporter(c.grpc_addr, "node-2", "sglang-0");
    for i in 0..6 {
        assert!(a.submit(report(i)));
        assert!(b.submit(report(i + 10)));
    }
    let want = requests_in(0..6);
    let m = wait_scrape(&c, "all reports applied", |m| {
        m.get(
            "infertap_requests_total",
            &[
                ("node", "node-1"),
                ("agent", "vllm-0"),
                ("model_name", "m"),
                ("outcome", "ok"),
            ],
        ) == Some(want as f64)
            && m.get(
                "infertap_requests_total",
                &[
                    ("node", "node-2"),
                    ("agent", "sglang-0"),
                    ("model_name", "m"),
                    ("outcome", "ok"),
                ],
            ) == Some(requests_in(10..16) as f64)
    })
    .await;
    let expected = merged(&m);
    assert!(
        expected.len() > 40,
        "histogram buckets, sums, counts, counters, gauges: {expected:?}"
    );
    // Wait for a snapshot taken after that scrape to be acknowledged.
    let after = sent(&m) + m.sum("infertap_collector_remote_write_snapshot_samples", &[]);
    wait_scrape(&c, "a later snapshot delivered", |m| {
        sent(m) >= after && all_delivered(m)
    })
    .await;
    // A store makes new series searchable after a short indexing delay: poll until it has
    // them all, then compare exactly.
    let query = r#"{__name__=~"infertap_.+",__name__!~"infertap_collector_.+"}"#;
    let end = Instant::now() + WAIT;
    let got: BTreeMap<BTreeMap<String, String>, f64> = loop {
        let got: BTreeMap<_, _> = store.query(query, now_s()).unwrap().into_iter().collect();
        if got.len() >= expected.len() || Instant::now() > end {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for (labels, v) in &expected {
        assert_eq!(
            got.get(labels),
            Some(v),
            "{kind:?} differs for {labels:?}; it has {:?}",
            got.keys()
                .map(|k| &k["__name__"])
                .collect::<std::collections::BTreeSet<_>>()
        );
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "{kind:?} has other series: {got:?}"
    );
    // The collector's own metrics travel too (polled like the others: the store indexes a
    // new series after a short delay).
    let end = Instant::now() + WAIT;
    let own = loop {
        let own = store
            .query(
                "infertap_collector_remote_write_samples_sent_total",
                now_s(),
            )
            .unwrap();
        if !own.is_empty() || Instant::now() > end {
            break own;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(own.len(), 1, "{own:?}");
    // An agent that leaves cleanly loses its gauges on the collector; the next snapshot marks
    // them stale, so the store stops answering them at once (not after its 5 min lookback).
    assert_eq!(b.shutdown(Duration::from_secs(10)).await, 0);
    let gauge = r#"infertap_requests_running{node="node-2"}"#;
    let end = Instant::now() + WAIT;
    loop {
        let left = store.query(gauge, now_s()).unwrap();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "{kind:?} still shows {left:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        store
            .query(r#"infertap_requests_running{node="node-1"}"#, now_s())
            .unwrap()
            .len(),
        1,
        "the other agent's gauge stays"
    );
    assert_eq!(a.shutdown(Duration::from_secs(10)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn victoria_metrics_holds_exactly_what_metrics_shows() {
    store_matches_metrics_exactly(
        Kind::Victoria,
        "victoria_metrics_holds_exactly_what_metrics_shows",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_holds_exactly_what_metrics_shows() {
    store_matches_metrics_exactly(
        Kind::Prometheus,
        "prometheus_holds_exactly_what_metrics_shows",
    )
    .await;
}

/// Submits one report every `every` until told to stop; returns how many it submitted.
fn keep_reporting(
    ex: std::sync::Arc<GrpcExporter>,
    every: Duration,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<u64>,
) {
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut i = 0;
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    assert!(ex.submit(report(i)));
                    i += 1;
                }
                _ = stop.changed() => return i,
            }
        }
    });
    (stop_tx, task)
}

/// The exporter back from the reporting task (which has ended).
fn own(ex: std::sync::Arc<GrpcExporter>) -> GrpcExporter {
    std::sync::Arc::try_unwrap(ex).unwrap_or_else(|_| panic!("exporter still shared"))
}

/// Timestamps of one series have no gap longer than `max_gap_ms`; with `counter`, values never
/// go down (a store would read that as a reset).
fn assert_continuous(samples: &[(i64, f64)], max_gap_ms: i64, counter: bool, what: &str) {
    assert!(samples.len() >= 2, "{what}: {samples:?}");
    for w in samples.windows(2) {
        assert!(
            w[1].0 - w[0].0 <= max_gap_ms,
            "{what}: gap {} ms at {:?}",
            w[1].0 - w[0].0,
            w
        );
        assert!(
            !counter || w[1].1 >= w[0].1,
            "{what}: went down (a reset) at {w:?}"
        );
    }
}

/// (c): VictoriaMetrics down for 20 s while the agent keeps reporting: afterwards every snapshot
/// is there (no gap in the series' timestamps), nothing dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_loses_no_samples() {
    let test = "store_outage_loses_no_samples";
    if !prereq::check(test, stores::missing(stores::VICTORIA_METRICS)) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let addr = free_port().unwrap();
    let data = tmp.path().join("store");
    let store = Store::start(Kind::Victoria, addr, &data).unwrap();
    let url = store.write_url();
    let (q, s) = (tmp.path().join("q"), tmp.path().join("state"));
    let c = CollectorProcess::start(
        "127.0.0.1:0".parse().unwrap(),
        &rw_args(&url, q.to_str().unwrap(), s.to_str().unwrap(), "1s"),
    )
    .unwrap();
    let ex = std::sync::Arc::new(exporter(c.grpc_addr, "node-1", "vllm-0"));
    let (stop, task) = keep_reporting(ex.clone(), Duration::from_millis(500));
    tokio::time::sleep(Duration::from_secs(4)).await;
    store.stop();
    let down_at = now_s();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let m = scrape(&c).await;
    assert!(m.sum("infertap_collector_remote_write_retries_total", &[]) > 0.0);
    assert!(m.sum("infertap_collector_remote_write_pending_samples", &[]) > 0.0);
    assert!(
        m.sum("infertap_collector_remote_write_lag_seconds", &[]) >= 10.0,
        "lag shows the outage"
    );
    let store = Store::start(Kind::Victoria, addr, &data).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(true).unwrap();
    let n = task.await.unwrap();
    let m = wait_scrape(&c, "queue drained", all_delivered).await;
    assert_eq!(
        m.sum("infertap_collector_remote_write_samples_dropped_total", &[]),
        0.0
    );
    let series = store
        .raw(
            r#"infertap_requests_total{node="node-1",agent="vllm-0"}"#,
            now_s(),
            120,
        )
        .unwrap();
    assert_eq!(series.len(), 1, "{series:?}");
    let samples = &series[0].1;
    // One snapshot a second; allow for a busy machine delaying a tick, never for a lost one.
    assert_continuous(samples, 2_500, true, "infertap_requests_total");
    let during = samples
        .iter()
        .filter(|(ts, _)| (*ts as f64) / 1e3 > down_at + 1.0 && (*ts as f64) / 1e3 < down_at + 19.0)
        .count();
    assert!(
        during >= 12,
        "samples from the outage window: {during} in {samples:?}"
    );
    assert_eq!(own(ex).shutdown(Duration::from_secs(10)).await, 0);
    assert!(n > 20);
}

/// (d): the collector is SIGKILLed mid-stream and restarted on the same state and queue: its
/// counters continue from their totals (the store never sees a reset), no report is lost or
/// counted twice (acks only leave once the state holding them is on disk), and the queue
/// resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_collector_resumes_totals_and_queue() {
    let test = "sigkilled_collector_resumes_totals_and_queue";
    if !prereq::check(test, stores::missing(stores::VICTORIA_METRICS)) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::start(
        Kind::Victoria,
        free_port().unwrap(),
        &tmp.path().join("store"),
    )
    .unwrap();
    let url = store.write_url();
    let (q, s) = (tmp.path().join("q"), tmp.path().join("state"));
    let args = rw_args(&url, q.to_str().unwrap(), s.to_str().unwrap(), "1s");
    let grpc = free_port().unwrap();
    let c = CollectorProcess::start(grpc, &args).unwrap();
    let ex = std::sync::Arc::new(exporter(grpc, "node-1", "vllm-0"));
    let (stop, task) = keep_reporting(ex.clone(), Duration::from_millis(300));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = scrape(&c).await;
    c.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = CollectorProcess::start(grpc, &args).unwrap();
    let m = scrape(&c).await;
    assert_eq!(
        m.get("infertap_collector_state_load", &[("result", "loaded")]),
        Some(1.0)
    );
    let labels = [
        ("node", "node-1"),
        ("agent", "vllm-0"),
        ("model_name", "m"),
        ("outcome", "ok"),
    ];
    let restored = m.get("infertap_requests_total", &labels).unwrap_or(0.0);
    assert!(restored > 0.0, "totals restored: {}", m.text);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.send(true).unwrap();
    let n = task.await.unwrap();
    assert_eq!(ex.dropped_reports(), 0);
    assert_eq!(
        own(ex).shutdown(Duration::from_secs(20)).await,
        0,
        "every report acked"
    );
    let total = requests_in(0..n) as f64;
    let m = wait_scrape(&c, "every report applied exactly once", |m| {
        m.get("infertap_requests_total", &labels) == Some(total)
    })
    .await;
    assert!(before.get("infertap_requests_total", &labels).unwrap() <= total);
    let after = sent(&m) + m.sum("infertap_collector_remote_write_snapshot_samples", &[]);
    wait_scrape(&c, "a final snapshot delivered", |m| {
        sent(m) >= after && all_delivered(m)
    })
    .await;
    let series = store
        .raw(r#"infertap_requests_total{node="node-1"}"#, now_s(), 120)
        .unwrap();
    assert_eq!(series.len(), 1, "{series:?}");
    let samples = &series[0].1;
    // Samples from before the kill (resumed from the queue) and after, never going down.
    assert_continuous(
        samples,
        6_000,
        true,
        "infertap_requests_total across the SIGKILL",
    );
    assert_eq!(samples.last().unwrap().1, total);
}

/// (e): a tiny queue bound with the store down: the oldest snapshots are dropped and counted,
/// the newest are delivered once the store is up, without gaps among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_bound_drops_oldest_and_delivers_the_rest() {
    let test = "queue_bound_drops_oldest_and_delivers_the_rest";
    if !prereq::check(test, stores::missing(stores::VICTORIA_METRICS)) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let addr = free_port().unwrap();
    let url = format!("http://{addr}/api/v1/write");
    let (q, s) = (tmp.path().join("q"), tmp.path().join("state"));
    let mut args = rw_args(&url, q.to_str().unwrap(), s.to_str().unwrap(), "500ms");
    args.extend(["--remote-write-max-bytes", "16KiB"]);
    let started = now_s();
    let c = CollectorProcess::start("127.0.0.1:0".parse().unwrap(), &args).unwrap();
    let ex = std::sync::Arc::new(exporter(c.grpc_addr, "node-1", "vllm-0"));
    let (stop, task) = keep_reporting(ex.clone(), Duration::from_millis(500));
    let m = wait_scrape(&c, "the bound to drop data", |m| {
        m.get(
            "infertap_collector_remote_write_samples_dropped_total",
            &[("url", &url), ("reason", "queue_full")],
        )
        .is_some_and(|d| d > 0.0)
    })
    .await;
    assert!(m.sum("infertap_collector_remote_write_queue_bytes", &[]) <= 16.0 * 1024.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let store = Store::start(Kind::Victoria, addr, &tmp.path().join("store")).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    let m = wait_scrape(&c, "queue drained", all_delivered).await;
    let dropped = m.sum("infertap_collector_remote_write_samples_dropped_total", &[]);
    assert!(dropped > 0.0 && sent(&m) > 0.0);
    let series = store
        .raw(
            r#"infertap_collector_remote_write_snapshot_samples"#,
            now_s(),
            300,
        )
        .unwrap();
    assert_eq!(series.len(), 1, "{series:?}");
    let samples = &series[0].1;
    let first = samples[0].0 as f64 / 1e3;
    assert!(
        first > started + 2.0,
        "the oldest snapshots were dropped: first at {first}, started {started}"
    );
    assert_continuous(samples, 2_000, false, "delivered snapshots");
    assert_eq!(own(ex).shutdown(Duration::from_secs(10)).await, 0);
}
