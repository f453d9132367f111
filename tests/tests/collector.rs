//! Agent exporters → real `infertap-collector` binary over gRPC on 127.0.0.1. No eBPF: the
//! agents are `infertap::aggregate::Aggregator` + `infertap::sinks::grpc::GrpcExporter` fed with
//! constructed request records. Expected bucket counts are written out from the vLLM bounds.

use std::time::Duration;

use infertap::aggregate::{Aggregator, DEFAULT_MAX_MODELS};
use infertap::record::{RequestError, RequestRecord, TokenCountSource};
use infertap::sinks::grpc::{ExporterConfig, GrpcExporter};
use infertap::sinks::prometheus;
use infertap_proto::pb::collector_client::CollectorClient;
use infertap_proto::pb::{
    agent_message, AgentHello, AgentMessage, Counter, Gauge, IntervalReport, Label,
};
use infertap_proto::schema;
use infertap_tests::collector_support::{free_port, http_get, wait_until, CollectorProcess};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MS: u64 = 1_000_000;
const WAIT: Duration = Duration::from_secs(20);

/// A streaming request starting at t=1 s with content events at the given offsets (µs), one
/// token each, ending 1 ms after the last event.
fn record(model: &str, events_us: &[u64], error: Option<RequestError>) -> RequestRecord {
    let start = 1_000 * MS;
    let token_ns: Vec<u64> = events_us.iter().map(|us| start + us * 1_000).collect();
    let end_ns = token_ns.last().copied().unwrap_or(start) + MS;
    RequestRecord {
        pid: 4242,
        conn_id: 9,
        peer: None,
        seq_on_conn: 0,
        method: "POST".into(),
        path: "/v1/completions".into(),
        status: Some(200),
        model: Some(model.into()),
        stream: true,
        start_ns: start,
        read_ns: start,
        arrival_ns: None,
        connected_ns: None,
        accepted_ns: None,
        request_end_ns: Some(start),
        response_start_ns: token_ns.first().copied(),
        first_token_ns: token_ns.first().copied(),
        end_ns,
        tokens_per_event: vec![1; token_ns.len()],
        output_tokens: Some(token_ns.len() as u64),
        token_ns,
        token_count_source: Some(TokenCountSource::Counted),
        prompt_tokens: None,
        finish_reason: Some("stop".into()),
        request_bytes: 200,
        response_bytes: 2_000,
        error,
        ..Default::default()
    }
}

fn exporter(grpc: std::net::SocketAddr, node: &str, agent: &str, buffer: usize) -> GrpcExporter {
    let mut cfg = ExporterConfig::new(format!("http://{grpc}"), node, agent);
    cfg.buffer_capacity = buffer;
    cfg.backoff_min = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(300);
    cfg.connect_timeout = Duration::from_secs(2);
    GrpcExporter::spawn(cfg).expect("spawn exporter")
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Scrapes off the async runtime's threads (the scrape is blocking std I/O).
async fn scrape(c: &CollectorProcess) -> infertap_tests::collector_support::Metrics {
    let addr = c.metrics_addr;
    tokio::task::spawn_blocking(move || infertap_tests::collector_support::scrape(addr))
        .await
        .unwrap()
        .expect("scrape collector")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_merge_into_exact_fleet_histograms() {
    let collector =
        CollectorProcess::start("127.0.0.1:0".parse().unwrap(), &["--aggregate-by", "fleet"])
            .unwrap();
    let (ea, eb) = (
        exporter(collector.grpc_addr, "n1", "a", 8),
        exporter(collector.grpc_addr, "n2", "b", 8),
    );
    let (mut a, mut b) = (
        Aggregator::new(DEFAULT_MAX_MODELS, now_ns()),
        Aggregator::new(DEFAULT_MAX_MODELS, now_ns()),
    );

    // Agent A, two intervals. TTFTs 3 ms, 15 ms, 15 ms; ITL gaps 0.5 ms and 1 ms.
    a.observe(&record("llama", &[3_000, 3_500, 4_500], None));
    a.observe(&record("llama", &[15_000], None));
    a.set_in_flight(2, 1);
    assert!(ea.submit(a.take_interval(now_ns())));
    a.observe(&record("llama", &[15_000], None));
    assert!(ea.submit(a.take_interval(now_ns())));
    // Agent B: TTFT 3 ms with a 10 ms gap, TTFT 300 ms cut off by the client.
    b.observe(&record("llama", &[3_000, 13_000], None));
    b.observe(&record(
        "llama",
        &[300_000],
        Some(RequestError::ClientDisconnect),
    ));
    b.set_in_flight(3, 0);
    assert!(eb.submit(b.take_interval(now_ns())));

    wait_until(WAIT, "acks", || {
        ea.acked_sequence() == 2 && eb.acked_sequence() == 1
    })
    .await
    .unwrap();
    let m = scrape(&collector).await;
    let ttft = "infertap_time_to_first_token_seconds_bucket";
    let llama = ("model_name", "llama");
    // Cumulative counts at vLLM's TTFT bounds for {3, 15, 15, 3, 300} ms.
    for (le, want) in [
        ("0.001", 0.0),
        ("0.005", 2.0),
        ("0.01", 2.0),
        ("0.02", 4.0),
        ("0.25", 4.0),
        ("0.5", 5.0),
        ("+Inf", 5.0),
    ] {
        assert_eq!(
            m.get(ttft, &[llama, ("le", le)]),
            Some(want),
            "TTFT le={le}\n{}",
            m.text
        );
    }
    assert_eq!(
        m.get("infertap_time_to_first_token_seconds_count", &[llama]),
        Some(5.0)
    );
    let sum = m
        .get("infertap_time_to_first_token_seconds_sum", &[llama])
        .unwrap();
    assert!((sum - 0.336).abs() < 1e-9, "TTFT sum {sum}");
    // ITL gaps {0.5, 1, 10} ms on the refined sub-10 ms bounds.
    let itl = "infertap_inter_token_latency_seconds_bucket";
    for (le, want) in [
        ("0.00025", 0.0),
        ("0.0005", 1.0),
        ("0.001", 2.0),
        ("0.0075", 2.0),
        ("0.01", 3.0),
        ("+Inf", 3.0),
    ] {
        assert_eq!(
            m.get(itl, &[llama, ("le", le)]),
            Some(want),
            "ITL le={le}\n{}",
            m.text
        );
    }
    // E2E only for the four successful requests.
    assert_eq!(
        m.get("infertap_e2e_request_latency_seconds_count", &[llama]),
        Some(4.0)
    );
    assert_eq!(
        m.get("infertap_requests_total", &[llama, ("outcome", "ok")]),
        Some(4.0)
    );
    assert_eq!(
        m.get(
            "infertap_requests_total",
            &[llama, ("outcome", "client_disconnect")]
        ),
        Some(1.0)
    );
    assert_eq!(m.get("infertap_output_tokens_total", &[llama]), Some(8.0));
    assert_eq!(
        m.get("infertap_requests_running", &[]),
        Some(5.0),
        "gauges summed over agents"
    );
    assert_eq!(m.get("infertap_requests_waiting", &[]), Some(1.0));
    assert!(
        !m.has("infertap_requests_total", &[("node", "n1")]),
        "fleet mode has no identity labels"
    );
    assert_eq!(http_get(collector.metrics_addr, "/healthz").unwrap().0, 200);

    // Clean agent shutdown: gauges go at once, totals stay.
    assert_eq!(ea.shutdown(Duration::from_secs(5)).await, 0);
    assert_eq!(eb.shutdown(Duration::from_secs(5)).await, 0);
    let collector_ref = &collector;
    let mut last = None;
    for _ in 0..100 {
        let m = scrape(collector_ref).await;
        if m.get("infertap_requests_running", &[]).is_none() {
            last = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = last.expect("gauges of cleanly disconnected agents were not dropped");
    assert_eq!(
        m.get("infertap_time_to_first_token_seconds_count", &[llama]),
        Some(5.0)
    );
    assert!(
        collector.terminate().unwrap(),
        "collector exits 0 on SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_restart_loses_nothing_buffered_and_counts_nothing_twice() {
    let collector = CollectorProcess::start("127.0.0.1:0".parse().unwrap(), &[]).unwrap();
    let grpc = collector.grpc_addr;
    let ex = exporter(grpc, "n1", "a1", 16);
    let mut agg = Aggregator::new(DEFAULT_MAX_MODELS, now_ns());
    let interval = |agg: &mut Aggregator, n: usize| {
        for _ in 0..n {
            agg.observe(&record("m", &[20_000, 30_000], None));
        }
        agg.take_interval(now_ns())
    };
    assert!(ex.submit(interval(&mut agg, 2)));
    wait_until(WAIT, "first ack", || ex.acked_sequence() == 1)
        .await
        .unwrap();
    let labels = [
        ("node", "n1"),
        ("agent", "a1"),
        ("model_name", "m"),
        ("outcome", "ok"),
    ];
    assert_eq!(
        scrape(&collector)
            .await
            .get("infertap_requests_total", &labels),
        Some(2.0)
    );

    collector.kill();
    wait_until(WAIT, "exporter to notice", || !ex.is_connected())
        .await
        .unwrap();
    assert!(ex.submit(interval(&mut agg, 3)));
    assert!(ex.submit(interval(&mut agg, 4)));
    wait_until(WAIT, "two buffered", || ex.buffered_reports() == 2)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        ex.buffered_reports(),
        2,
        "nothing acked while the collector is down"
    );

    let collector = CollectorProcess::start(grpc, &[]).unwrap();
    wait_until(WAIT, "buffered reports acked", || {
        ex.acked_sequence() == 3 && ex.buffered_reports() == 0
    })
    .await
    .unwrap();
    let m = scrape(&collector).await;
    // The new collector starts from zero: it holds exactly the two buffered intervals (3 + 4),
    // not the already acked first one again.
    assert_eq!(
        m.get("infertap_requests_total", &labels),
        Some(7.0),
        "{}",
        m.text
    );
    let id = [("node", "n1"), ("agent", "a1"), ("model_name", "m")];
    assert_eq!(
        m.get("infertap_e2e_request_latency_seconds_count", &id),
        Some(7.0)
    );
    assert_eq!(
        m.get(
            "infertap_inter_token_latency_seconds_bucket",
            &[id[0], id[1], id[2], ("le", "0.01")]
        ),
        Some(7.0)
    );
    assert_eq!(ex.dropped_reports(), 0);
    assert_eq!(ex.shutdown(Duration::from_secs(5)).await, 0);
}

fn hello(instance: u64, schema_version: u32) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Hello(AgentHello {
            node: "raw-node".into(),
            agent_id: "raw".into(),
            instance_id: instance,
            pids: vec![1, 2],
            version: "test".into(),
            schema_version,
        })),
    }
}

fn counter_report(sequence: u64, requests: u64, running: Option<f64>) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Report(IntervalReport {
            sequence,
            counters: vec![Counter {
                name: "infertap_requests_total".into(),
                labels: vec![
                    Label {
                        name: "model_name".into(),
                        value: "m".into(),
                    },
                    Label {
                        name: "outcome".into(),
                        value: "ok".into(),
                    },
                ],
                value: requests,
            }],
            gauges: running
                .map(|v| Gauge {
                    name: "infertap_requests_running".into(),
                    labels: vec![],
                    value: v,
                })
                .into_iter()
                .collect(),
            ..Default::default()
        })),
    }
}

/// Opens a raw stream, sends `msgs`, and returns the sender (stream stays open while it lives)
/// and the acks, read until `acks_wanted` arrive.
async fn raw_stream(
    grpc: std::net::SocketAddr,
    msgs: Vec<AgentMessage>,
    acks_wanted: usize,
) -> Result<(mpsc::Sender<AgentMessage>, Vec<u64>), tonic::Status> {
    let mut client = CollectorClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(16);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    let mut acks = client.report(ReceiverStream::new(rx)).await?.into_inner();
    let mut got = Vec::new();
    while got.len() < acks_wanted {
        match tokio::time::timeout(WAIT, acks.message())
            .await
            .expect("ack timeout")?
        {
            Some(a) => got.push(a.sequence),
            None => break,
        }
    }
    Ok((tx, got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_sequences_are_acked_but_applied_once() {
    let collector = CollectorProcess::start("127.0.0.1:0".parse().unwrap(), &[]).unwrap();
    let grpc = collector.grpc_addr;
    let msgs = vec![
        hello(42, schema::SCHEMA_VERSION),
        counter_report(1, 5, None),
        counter_report(1, 5, None),
        counter_report(2, 1, None),
    ];
    let (tx, acks) = raw_stream(grpc, msgs, 3).await.unwrap();
    assert_eq!(acks, [1, 1, 2]);
    drop(tx);
    // Reconnect of the same instance re-sends 2 (its ack "lost") and sends 3.
    let msgs = vec![
        hello(42, schema::SCHEMA_VERSION),
        counter_report(2, 1, None),
        counter_report(3, 10, None),
    ];
    let (_tx, acks) = raw_stream(grpc, msgs, 2).await.unwrap();
    assert_eq!(acks, [2, 3]);
    // A restarted agent process (new instance) starts its sequence again at 1 and is counted.
    let (_tx2, acks) = raw_stream(
        grpc,
        vec![
            hello(43, schema::SCHEMA_VERSION),
            counter_report(1, 100, None),
        ],
        1,
    )
    .await
    .unwrap();
    assert_eq!(acks, [1]);
    let m = scrape(&collector).await;
    let labels = [
        ("node", "raw-node"),
        ("agent", "raw"),
        ("model_name", "m"),
        ("outcome", "ok"),
    ];
    assert_eq!(
        m.get("infertap_requests_total", &labels),
        Some(116.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.get(
            "infertap_collector_reports_total",
            &[("result", "duplicate")]
        ),
        Some(2.0)
    );

    // Protocol errors are refused with a clear status, not a hang.
    let err = raw_stream(grpc, vec![hello(44, schema::SCHEMA_VERSION + 1)], 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let err = raw_stream(grpc, vec![counter_report(1, 1, None)], 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let err = raw_stream(
        grpc,
        vec![
            hello(45, schema::SCHEMA_VERSION),
            counter_report(0, 1, None),
        ],
        1,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_from_start_agent_buffers_then_counts_drops() {
    let grpc = free_port().unwrap();
    let ex = exporter(grpc, "n1", "a1", 3);
    let mut agg = Aggregator::new(DEFAULT_MAX_MODELS, now_ns());
    let server = prometheus::serve("127.0.0.1:0".parse().unwrap(), agg.shared())
        .await
        .unwrap();
    // Drop deltas each report carries (what the pipeline would send each interval).
    let mut drop_deltas = Vec::new();
    for _ in 0..10 {
        agg.observe(&record("m", &[20_000], None));
        agg.set_drops(schema::DROP_REASON_EXPORT_BUFFER_FULL, ex.dropped_reports());
        let report = agg.take_interval(now_ns());
        drop_deltas.push(
            report
                .counters
                .iter()
                .filter(|c| c.name == "infertap_events_dropped_total")
                .map(|c| c.value)
                .sum::<u64>(),
        );
        assert!(
            ex.submit(report),
            "submit never blocks or refuses while the task keeps up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_until(WAIT, "buffer full", || {
        ex.buffered_reports() == 3 && ex.dropped_reports() == 7
    })
    .await
    .unwrap();
    assert_eq!(ex.acked_sequence(), 0);
    agg.set_drops(schema::DROP_REASON_EXPORT_BUFFER_FULL, ex.dropped_reports());

    // The agent's own endpoint reports the drops.
    let addr = server.local_addr();
    let m = tokio::task::spawn_blocking(move || infertap_tests::collector_support::scrape(addr))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        m.get(
            "infertap_events_dropped_total",
            &[("reason", "export_buffer_full")]
        ),
        Some(7.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.get(
            "infertap_requests_total",
            &[("model_name", "m"), ("outcome", "ok")]
        ),
        Some(10.0)
    );
    server.shutdown().await.unwrap();

    // When the collector finally comes up it gets the three newest intervals.
    let collector = CollectorProcess::start(grpc, &[]).unwrap();
    wait_until(WAIT, "delivery", || {
        ex.acked_sequence() == 10 && ex.buffered_reports() == 0
    })
    .await
    .unwrap();
    let m = scrape(&collector).await;
    let id = [("node", "n1"), ("agent", "a1")];
    assert_eq!(
        m.get(
            "infertap_requests_total",
            &[id[0], id[1], ("model_name", "m"), ("outcome", "ok")]
        ),
        Some(3.0),
        "{}",
        m.text
    );
    // Drop counts travel in reports too: the collector has what the three surviving reports
    // carried (the agent's own endpoint above has the full count).
    let surviving: u64 = drop_deltas[7..].iter().sum();
    assert_eq!(
        m.sum("infertap_events_dropped_total", &id),
        surviving as f64,
        "{}",
        m.text
    );
    assert_eq!(ex.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_agent_loses_gauges_after_timeout_but_keeps_totals() {
    let collector =
        CollectorProcess::start("127.0.0.1:0".parse().unwrap(), &["--agent-timeout", "1s"])
            .unwrap();
    let grpc = collector.grpc_addr;
    // A hung agent: connected, then silent.
    let (_silent, acks) = raw_stream(
        grpc,
        vec![
            hello(7, schema::SCHEMA_VERSION),
            counter_report(1, 4, Some(4.0)),
        ],
        1,
    )
    .await
    .unwrap();
    assert_eq!(acks, [1]);
    // A live agent that keeps reporting every 200 ms.
    let ex = exporter(grpc, "live", "a", 8);
    let live = tokio::spawn(async move {
        let mut agg = Aggregator::new(DEFAULT_MAX_MODELS, now_ns());
        agg.set_in_flight(2, 0);
        for _ in 0..25 {
            ex.submit(agg.take_interval(now_ns()));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ex
    });
    let raw = [("node", "raw-node"), ("agent", "raw")];
    let m = scrape(&collector).await;
    assert_eq!(
        m.get("infertap_requests_running", &raw),
        Some(4.0),
        "{}",
        m.text
    );

    let collector_ref = &collector;
    let mut gone = None;
    for _ in 0..100 {
        let m = scrape(collector_ref).await;
        if m.get("infertap_requests_running", &raw).is_none() {
            gone = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = gone.expect("silent agent's gauge still there after the timeout");
    assert_eq!(
        m.get(
            "infertap_requests_total",
            &[raw[0], raw[1], ("model_name", "m"), ("outcome", "ok")]
        ),
        Some(4.0)
    );
    assert_eq!(
        m.get(
            "infertap_requests_running",
            &[("node", "live"), ("agent", "a")]
        ),
        Some(2.0),
        "{}",
        m.text
    );
    let ex = live.await.unwrap();
    assert_eq!(ex.shutdown(Duration::from_secs(5)).await, 0);
}
