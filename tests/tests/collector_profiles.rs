//! Profiles through the real `infertap-collector` binary: real gRPC agent exporters attach
//! pprof profiles to their interval reports; the collector stores, merges and serves them
//! (`/pprof/profile`, `/pprof/nodes`), bounds its store, rejects garbage, survives a restart
//! of its own and forwards to a Pyroscope-style `/ingest` receiver. `go tool pprof` reads what
//! it serves.

use std::net::SocketAddr;
use std::time::Duration;

use infertap::aggregate::{Aggregator, DEFAULT_MAX_MODELS};
use infertap::sinks::grpc::{ExporterConfig, GrpcExporter};
use infertap_proto::pb::collector_client::CollectorClient;
use infertap_proto::pb::{
    agent_message, AgentHello, AgentMessage, Counter, IntervalReport, Label, ProfileData,
    ProfileType,
};
use infertap_proto::pprof::{self, ProfileBuilder, ProfileKind};
use infertap_proto::schema;
use infertap_tests::collector_support::{
    http_get_bytes, wait_until, CollectorProcess, HttpAnswer, Metrics,
};
use infertap_tests::prereq;
use infertap_tests::tools::{artifacts_dir, go_pprof, missing_go};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(30);
const S: u64 = 1_000_000_000;
const ENGINE: &str = "/opt/venv/lib/python3.12/site-packages/vllm/v1/engine/core.py";
const SCHED: &str = "/opt/venv/lib/python3.12/site-packages/vllm/v1/core/sched/scheduler.py";
const RUNNER: &str = "/opt/venv/lib/python3.12/site-packages/vllm/v1/worker/gpu_model_runner.py";

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A profile of `kind` over [start, start + 10 s): `EngineCore.step → <leaf>` with `samples`
/// samples (10 ms each).
fn profile(kind: ProfileKind, start_ns: u64, leaf: (&str, &str), samples: i64) -> ProfileData {
    let mut b = ProfileBuilder::new(kind);
    b.set_time(start_ns, start_ns + 10 * S);
    let step = b.python_frame("EngineCore.step", ENGINE, 220, 231);
    let l = b.python_frame(leaf.0, leaf.1, 10, 12);
    b.add_sample(&[l, step], &[samples, samples * 10_000_000], &[])
        .unwrap();
    b.into_profile_data().unwrap()
}

fn exporter(grpc: SocketAddr, node: &str, agent: &str) -> GrpcExporter {
    let mut cfg = ExporterConfig::new(format!("http://{grpc}"), node, agent);
    cfg.buffer_capacity = 32;
    cfg.backoff_min = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(300);
    cfg.connect_timeout = Duration::from_secs(2);
    GrpcExporter::spawn(cfg).expect("spawn exporter")
}

async fn get(addr: SocketAddr, path: &str) -> HttpAnswer {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || http_get_bytes(addr, &path))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("GET failed: {e:#}"))
}

async fn scrape(addr: SocketAddr) -> Metrics {
    tokio::task::spawn_blocking(move || infertap_tests::collector_support::scrape(addr))
        .await
        .unwrap()
        .expect("scrape")
}

/// GET a merged profile and decode it; also returns how many profiles were merged.
async fn merged(addr: SocketAddr, query: &str) -> (pprof::pb::Profile, usize, Vec<u8>) {
    let a = get(addr, &format!("/pprof/profile?{query}")).await;
    assert_eq!(a.status, 200, "{query}: {}", a.text());
    assert_eq!(a.header("content-type"), Some("application/octet-stream"));
    let n = a
        .header("x-infertap-profiles")
        .expect("profile count header")
        .parse()
        .unwrap();
    let p = pprof::decode(&a.body, 64 << 20).expect("collector serves a valid pprof");
    (p, n, a.body)
}

fn functions(p: &pprof::pb::Profile) -> Vec<String> {
    pprof::fold(p, 0).into_iter().map(|(s, _)| s).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_profiles_merge_exactly_and_filter_by_node_and_time() {
    let collector = CollectorProcess::start("127.0.0.1:0".parse().unwrap(), &[]).unwrap();
    let (e1, e2) = (
        exporter(collector.grpc_addr, "n1", "a1"),
        exporter(collector.grpc_addr, "n2", "a2"),
    );
    let (mut g1, mut g2) = (
        Aggregator::new(DEFAULT_MAX_MODELS, now_ns()),
        Aggregator::new(DEFAULT_MAX_MODELS, now_ns()),
    );
    // Three 10 s intervals starting a minute ago (whole seconds, so queries can name them).
    let t0 = (now_ns() / S - 60) * S;
    for i in 0..3u64 {
        let start = t0 + i * 10 * S;
        let k = i as i64 + 1;
        assert!(e1.attach_profile(profile(
            ProfileKind::Cpu,
            start,
            ("Scheduler.schedule", SCHED),
            10 * k
        )));
        assert!(e2.attach_profile(profile(
            ProfileKind::Cpu,
            start,
            ("GPUModelRunner.execute_model", RUNNER),
            7 * k
        )));
        if i == 0 {
            assert!(e2.attach_profile(profile(
                ProfileKind::Gpu,
                start,
                ("GPUModelRunner.execute_model", RUNNER),
                5
            )));
        }
        g1.set_in_flight(1, 0);
        assert!(e1.submit(g1.take_interval(now_ns())));
        assert!(e2.submit(g2.take_interval(now_ns())));
    }
    wait_until(WAIT, "acks", || {
        e1.acked_sequence() == 3 && e2.acked_sequence() == 3
    })
    .await
    .unwrap();
    let addr = collector.metrics_addr;

    // Everything (the default range is the last 5 minutes): 10+20+30 + 7+14+21 samples.
    let (all, n, body) = merged(addr, "").await;
    assert_eq!(n, 6);
    assert_eq!(pprof::total(&all, 0), 102);
    assert_eq!(pprof::total(&all, 1), 102 * 10_000_000);
    assert_eq!(all.time_nanos as u64, t0);
    assert_eq!(all.duration_nanos as u64, 30 * S);
    assert_eq!(
        functions(&all),
        [
            "EngineCore.step;GPUModelRunner.execute_model",
            "EngineCore.step;Scheduler.schedule"
        ]
    );
    // By node (one or several), by explicit range in unix seconds, RFC 3339 and relative.
    let (p, n, _) = merged(addr, "node=n1").await;
    assert_eq!((n, pprof::total(&p, 0)), (3, 60));
    assert_eq!(functions(&p), ["EngineCore.step;Scheduler.schedule"]);
    let (p, _, _) = merged(addr, "node=n1&node=n2&type=cpu").await;
    assert_eq!(pprof::total(&p, 0), 102);
    let (p, n, _) = merged(addr, &format!("from={}&to={}", t0 / S + 10, t0 / S + 20)).await;
    assert_eq!(
        (n, pprof::total(&p, 0)),
        (2, 20 + 14),
        "the second interval only"
    );
    let rfc = |ns: u64| rfc3339_utc(ns / S);
    let (p, _, _) = merged(
        addr,
        &format!("node=n2&from={}&to={}", rfc(t0 + 20 * S), rfc(t0 + 30 * S)),
    )
    .await;
    assert_eq!(pprof::total(&p, 0), 21);
    let (p, n, _) = merged(addr, "from=-10h&to=-2h").await;
    assert_eq!(
        (n, p.sample.len()),
        (0, 0),
        "a range with no profiles: empty, valid"
    );
    assert!(ProfileKind::Cpu.matches(&p));
    let (p, n, _) = merged(addr, "type=gpu").await;
    assert_eq!((n, pprof::total(&p, 0)), (1, 5));
    assert!(ProfileKind::Gpu.matches(&p));
    let (p, n, _) = merged(addr, "type=offcpu&node=n1").await;
    assert_eq!((n, p.sample.len()), (0, 0));

    // Bad input: a clear 400; an unknown node: 404 naming the nodes that have profiles.
    for (q, want) in [
        ("type=heap", "expected cpu, gpu or offcpu"),
        ("from=yesterday", "from: "),
        ("from=-1m&to=-5m", "must be before"),
        ("nod=n1", "unknown parameter"),
    ] {
        let a = get(addr, &format!("/pprof/profile?{q}")).await;
        assert_eq!(a.status, 400, "{q}");
        assert!(a.text().contains(want), "{q}: {}", a.text());
    }
    let a = get(addr, "/pprof/profile?node=nope").await;
    assert_eq!(a.status, 404);
    assert!(
        a.text().contains("nodes with profiles: n1, n2"),
        "{}",
        a.text()
    );

    // go tool pprof reads what the collector serves.
    if prereq::check(
        "two_nodes_profiles_merge_exactly_and_filter_by_node_and_time (go tool pprof)",
        missing_go(),
    ) {
        let file = artifacts_dir("collector_profiles")
            .unwrap()
            .join("merged-cpu.pb.gz");
        std::fs::write(&file, &body).unwrap();
        let top = go_pprof(&["-top", "-sample_index=samples"], &file).unwrap();
        println!("{top}");
        assert!(top.contains("of 102 total"), "{top}");
        for f in [
            "EngineCore.step",
            "Scheduler.schedule",
            "GPUModelRunner.execute_model",
        ] {
            assert!(top.contains(f), "{f}\n{top}");
        }
        let cpu = go_pprof(&["-top", "-sample_index=cpu"], &file).unwrap();
        assert!(cpu.contains("of 1020ms total"), "{cpu}");
    }

    // What is stored.
    let a = get(addr, "/pprof/nodes").await;
    assert_eq!(a.status, 200);
    let j: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    let series = j["series"].as_array().unwrap();
    let find = |node: &str, ty: &str| {
        series
            .iter()
            .find(|s| s["node"] == node && s["type"] == ty)
            .unwrap_or_else(|| panic!("{node}/{ty} missing: {j}"))
    };
    assert_eq!(find("n1", "cpu")["profiles"], 3);
    assert_eq!(find("n1", "cpu")["samples"], 60);
    assert_eq!(find("n1", "cpu")["agent"], "a1");
    assert_eq!(find("n1", "cpu")["from_unix_ns"], t0);
    assert_eq!(find("n1", "cpu")["to_unix_ns"], t0 + 30 * S);
    assert_eq!(find("n2", "gpu")["samples"], 5);
    assert_eq!(series.len(), 3);
    assert_eq!(j["stored_profiles"], 7);

    let m = scrape(addr).await;
    assert_eq!(
        m.get(
            "infertap_collector_profiles_received_total",
            &[("result", "stored")]
        ),
        Some(7.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.get("infertap_collector_profile_store_profiles", &[]),
        Some(7.0)
    );
    // The reports' metrics were applied alongside.
    assert_eq!(
        m.get(
            "infertap_requests_waiting",
            &[("node", "n1"), ("agent", "a1")]
        ),
        Some(0.0)
    );
    assert_eq!(e1.shutdown(Duration::from_secs(5)).await, 0);
    assert_eq!(e2.shutdown(Duration::from_secs(5)).await, 0);
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds, computed independently of the collector's parser
/// (civil-from-days, Howard Hinnant's algorithm).
fn rfc3339_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_bounds_evict_by_bytes_and_age_and_count() {
    let size = profile(ProfileKind::Cpu, now_ns(), ("Scheduler.schedule", SCHED), 1)
        .pprof
        .len();
    // Room for three profiles and a half.
    let cap = format!("{}", size * 7 / 2);
    let collector = CollectorProcess::start(
        "127.0.0.1:0".parse().unwrap(),
        &["--profile-store-bytes", &cap, "--profile-retention", "2m"],
    )
    .unwrap();
    let ex = exporter(collector.grpc_addr, "n1", "a1");
    let mut agg = Aggregator::new(DEFAULT_MAX_MODELS, now_ns());
    let t0 = (now_ns() / S - 100) * S;
    // One profile that ended 10 minutes ago (beyond the 2 min retention), then five recent
    // ones with 1..=5 samples.
    assert!(ex.attach_profile(profile(
        ProfileKind::Cpu,
        t0 - 600 * S,
        ("Scheduler.schedule", SCHED),
        100
    )));
    for i in 0..5u64 {
        assert!(ex.attach_profile(profile(
            ProfileKind::Cpu,
            t0 + i * 10 * S,
            ("Scheduler.schedule", SCHED),
            i as i64 + 1
        )));
        assert!(ex.submit(agg.take_interval(now_ns())));
    }
    wait_until(WAIT, "acks", || ex.acked_sequence() == 5)
        .await
        .unwrap();
    let addr = collector.metrics_addr;
    let m = scrape(addr).await;
    assert_eq!(
        m.get(
            "infertap_collector_profiles_evicted_total",
            &[("reason", "age")]
        ),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.get(
            "infertap_collector_profiles_evicted_total",
            &[("reason", "bytes")]
        ),
        Some(2.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.get("infertap_collector_profile_store_profiles", &[]),
        Some(3.0)
    );
    let stored = m
        .get("infertap_collector_profile_store_bytes", &[])
        .unwrap();
    assert!(stored <= (size * 7 / 2) as f64, "{stored}");
    // The three newest survive: 3 + 4 + 5 samples.
    let (p, n, _) = merged(addr, "from=-1h").await;
    assert_eq!((n, pprof::total(&p, 0)), (3, 12));
    let a = get(addr, "/pprof/nodes").await;
    let j: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(j["series"][0]["from_unix_ns"], t0 + 20 * S);
    assert_eq!(j["max_bytes"], size * 7 / 2);
    assert_eq!(j["retention_seconds"], 120);
    assert_eq!(ex.shutdown(Duration::from_secs(5)).await, 0);
}

fn hello(instance: u64) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Hello(AgentHello {
            node: "raw-node".into(),
            agent_id: "raw".into(),
            instance_id: instance,
            pids: vec![],
            version: "test".into(),
            schema_version: schema::SCHEMA_VERSION,
        })),
    }
}

fn report(sequence: u64, requests: u64, profiles: Vec<ProfileData>) -> AgentMessage {
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
            profiles,
            ..Default::default()
        })),
    }
}

/// Sends `msgs` on one raw stream and reads `acks` acks (or the error status).
async fn raw_stream(
    grpc: SocketAddr,
    msgs: Vec<AgentMessage>,
    acks: usize,
) -> Result<Vec<u64>, tonic::Status> {
    let mut client = CollectorClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel(16);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    let mut stream = client.report(ReceiverStream::new(rx)).await?.into_inner();
    let mut got = Vec::new();
    while got.len() < acks {
        match tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("ack timeout")?
        {
            Some(a) => got.push(a.sequence),
            None => break,
        }
    }
    drop(tx);
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_profile_payloads_are_rejected_and_counted_never_a_crash() {
    let collector = CollectorProcess::start(
        "127.0.0.1:0".parse().unwrap(),
        &["--max-message-bytes", "1MiB"],
    )
    .unwrap();
    let t = now_ns() - 20 * S;
    let good = profile(ProfileKind::Cpu, t, ("Scheduler.schedule", SCHED), 9);
    let with = |f: &dyn Fn(&mut ProfileData)| {
        let mut p = good.clone();
        f(&mut p);
        p
    };
    // A GPU profile declared as CPU, a wrong sample count, garbage, truncated gzip, an
    // unspecified type, a bogus type number, end before start.
    let gpu = profile(ProfileKind::Gpu, t, ("x", SCHED), 1);
    let bad = vec![
        with(&|p| p.pprof = gpu.pprof.clone()),
        with(&|p| p.sample_count = 10),
        with(&|p| p.pprof = b"definitely not a profile".to_vec().into()),
        with(&|p| p.pprof = p.pprof.slice(..p.pprof.len() / 2)),
        with(&|p| p.r#type = ProfileType::Unspecified as i32),
        with(&|p| p.r#type = 99),
        with(&|p| p.end_unix_ns = p.start_unix_ns - 1),
    ];
    let acks = raw_stream(
        collector.grpc_addr,
        vec![
            hello(1),
            report(1, 3, bad),
            report(2, 4, vec![good.clone()]),
        ],
        2,
    )
    .await
    .unwrap();
    assert_eq!(acks, [1, 2], "reports with bad profiles are still acked");
    let addr = collector.metrics_addr;
    let m = scrape(addr).await;
    for (reason, n) in [
        ("sample_types", 1.0),
        ("sample_count", 1.0),
        ("protobuf", 1.0),
        ("gzip", 1.0),
        ("unknown_type", 2.0),
        ("bad_time_range", 1.0),
    ] {
        assert_eq!(
            m.get(
                "infertap_collector_profiles_rejected_total",
                &[("reason", reason)]
            ),
            Some(n),
            "{reason}\n{}",
            m.text
        );
    }
    assert_eq!(
        m.get(
            "infertap_collector_profiles_received_total",
            &[("result", "rejected")]
        ),
        Some(7.0)
    );
    assert_eq!(
        m.get(
            "infertap_collector_profiles_received_total",
            &[("result", "stored")]
        ),
        Some(1.0)
    );
    // The metrics of both reports were applied.
    assert_eq!(
        m.get(
            "infertap_requests_total",
            &[
                ("node", "raw-node"),
                ("agent", "raw"),
                ("model_name", "m"),
                ("outcome", "ok")
            ]
        ),
        Some(7.0)
    );
    let (p, n, _) = merged(addr, "").await;
    assert_eq!((n, pprof::total(&p, 0)), (1, 9));

    // A report larger than --max-message-bytes is refused with a clear status, and the
    // collector carries on.
    let mut huge = good.clone();
    huge.pprof = vec![0u8; 2 << 20].into();
    let err = raw_stream(
        collector.grpc_addr,
        vec![hello(2), report(1, 1, vec![huge])],
        1,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err}"
    );
    assert_eq!(get(addr, "/healthz").await.status, 200);
    let acks = raw_stream(collector.grpc_addr, vec![hello(3), report(1, 1, vec![])], 1)
        .await
        .unwrap();
    assert_eq!(acks, [1]);

    // The real exporter, configured to put more on a report than this collector takes: the
    // refused report is re-sent without its profiles (counted) and delivery goes on.
    let mut cfg = ExporterConfig::new(format!("http://{}", collector.grpc_addr), "big", "a");
    cfg.backoff_min = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(200);
    cfg.max_profile_bytes = 4 << 20;
    cfg.max_report_profile_bytes = 4 << 20;
    let ex = GrpcExporter::spawn(cfg).unwrap();
    let mut agg = Aggregator::new(DEFAULT_MAX_MODELS, now_ns());
    let mut big = good.clone();
    big.pprof = vec![7u8; 2 << 20].into();
    assert!(ex.attach_profile(big));
    assert!(ex.submit(agg.take_interval(now_ns())));
    assert!(ex.attach_profile(good.clone()));
    assert!(ex.submit(agg.take_interval(now_ns())));
    wait_until(WAIT, "both reports acked", || ex.acked_sequence() == 2)
        .await
        .unwrap();
    assert_eq!((ex.oversized_profiles(), ex.dropped_profiles()), (1, 0));
    let (p, _, _) = merged(addr, "node=big").await;
    assert_eq!(
        pprof::total(&p, 0),
        9,
        "the second report's profile arrived"
    );
    assert_eq!(ex.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_restart_mid_run_delivers_unacked_profiles_once() {
    let collector = CollectorProcess::start("127.0.0.1:0".parse().unwrap(), &[]).unwrap();
    let grpc = collector.grpc_addr;
    let ex = exporter(grpc, "n1", "a1");
    let mut agg = Aggregator::new(DEFAULT_MAX_MODELS, now_ns());
    let t0 = (now_ns() / S - 60) * S;
    let leaf = ("Scheduler.schedule", SCHED);
    assert!(ex.attach_profile(profile(ProfileKind::Cpu, t0, leaf, 5)));
    assert!(ex.submit(agg.take_interval(now_ns())));
    wait_until(WAIT, "first ack", || ex.acked_sequence() == 1)
        .await
        .unwrap();
    let (p, _, _) = merged(collector.metrics_addr, "").await;
    assert_eq!(pprof::total(&p, 0), 5);

    collector.kill();
    wait_until(WAIT, "exporter to notice", || !ex.is_connected())
        .await
        .unwrap();
    assert!(ex.attach_profile(profile(ProfileKind::Cpu, t0 + 10 * S, leaf, 7)));
    assert!(ex.submit(agg.take_interval(now_ns())));
    assert!(ex.attach_profile(profile(ProfileKind::Cpu, t0 + 20 * S, leaf, 11)));
    assert!(ex.submit(agg.take_interval(now_ns())));
    wait_until(WAIT, "two buffered", || ex.buffered_reports() == 2)
        .await
        .unwrap();
    assert!(ex.buffered_profile_bytes() > 0);

    let collector = CollectorProcess::start(grpc, &[]).unwrap();
    wait_until(WAIT, "buffered reports acked", || {
        ex.acked_sequence() == 3 && ex.buffered_reports() == 0
    })
    .await
    .unwrap();
    assert_eq!(ex.buffered_profile_bytes(), 0);
    // The new collector holds the two re-sent intervals (in-memory store: the first one went
    // with the old process), each once.
    let (p, n, _) = merged(collector.metrics_addr, "").await;
    assert_eq!((n, pprof::total(&p, 0)), (2, 18));
    let m = scrape(collector.metrics_addr).await;
    assert_eq!(
        m.get(
            "infertap_collector_profiles_received_total",
            &[("result", "stored")]
        ),
        Some(2.0)
    );
    assert_eq!((ex.dropped_profiles(), ex.dropped_reports()), (0, 0));
    assert_eq!(ex.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_forwarded_to_a_pyroscope_ingest_endpoint() {
    if !prereq::check(
        "profiles_are_forwarded_to_a_pyroscope_ingest_endpoint",
        prereq::missing_python(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = infertap_tests::paths::workspace_root().join("tests/servers/ingest_receiver.py");
    let mut receiver = std::process::Command::new("python3")
        .arg(&script)
        .args(["--dir", dir.path().to_str().unwrap(), "--fail-first", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(receiver.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("listening ")
        .unwrap()
        .parse()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/pyroscope");
    let collector = CollectorProcess::start(
        "127.0.0.1:0".parse().unwrap(),
        &["--profiles-url", &url, "--profiles-app", "vllm-fleet"],
    )
    .unwrap();
    let ex = exporter(collector.grpc_addr, "gpu-node-1", "vllm-0");
    let mut agg = Aggregator::new(DEFAULT_MAX_MODELS, now_ns());
    let t0 = (now_ns() / S - 30) * S;
    assert!(ex.attach_profile(profile(
        ProfileKind::Cpu,
        t0,
        ("Scheduler.schedule", SCHED),
        13
    )));
    assert!(ex.attach_profile(profile(
        ProfileKind::Gpu,
        t0,
        ("GPUModelRunner.execute_model", RUNNER),
        4
    )));
    assert!(ex.submit(agg.take_interval(now_ns())));
    // The first POST is answered 503 and retried: three requests for two profiles.
    let d = dir.path().to_owned();
    wait_until(WAIT, "three POSTs", || d.join("req-3.json").exists())
        .await
        .unwrap();
    let m = {
        let addr = collector.metrics_addr;
        let mut m = scrape(addr).await;
        for _ in 0..100 {
            if m.get("infertap_collector_profiles_forwarded_total", &[]) == Some(2.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            m = scrape(addr).await;
        }
        m
    };
    assert_eq!(
        m.get("infertap_collector_profiles_forwarded_total", &[]),
        Some(2.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.get("infertap_collector_profile_forward_retries_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        m.get("infertap_collector_profile_forward_queue", &[]),
        Some(0.0)
    );

    let mut seen = Vec::new();
    for i in 1..=3 {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("req-{i}.json"))).unwrap(),
        )
        .unwrap();
        let body = std::fs::read(dir.path().join(format!("req-{i}.body"))).unwrap();
        assert_eq!(meta["method"], "POST");
        assert_eq!(meta["headers"]["content-type"], "binary/octet-stream");
        let path = meta["path"].as_str().unwrap();
        let (route, query) = path.split_once('?').unwrap();
        assert_eq!(route, "/pyroscope/ingest");
        let q = query_pairs(query);
        let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("format"), Some("pprof"));
        assert_eq!(get("spyName"), Some("infertap"));
        assert_eq!(get("from"), Some((t0 / S).to_string().as_str()));
        assert_eq!(get("until"), Some((t0 / S + 10).to_string().as_str()));
        let name = get("name").unwrap().to_owned();
        let p = pprof::decode(&body, 64 << 20).expect("body is the pprof");
        seen.push((meta["status"].as_i64().unwrap(), name, pprof::total(&p, 0)));
    }
    let cpu = "vllm-fleet{node=gpu-node-1,agent=vllm-0,profile_type=cpu}".to_owned();
    let gpu = "vllm-fleet{node=gpu-node-1,agent=vllm-0,profile_type=gpu}".to_owned();
    assert_eq!(
        seen,
        [(503, cpu.clone(), 13), (200, cpu, 13), (200, gpu, 4)],
        "the refused first try is re-sent, then the next profile"
    );
    assert_eq!(ex.shutdown(Duration::from_secs(5)).await, 0);
    let _ = receiver.kill();
    let _ = receiver.wait();
}

/// Query pairs decoded with the standard form rules, independently of the collector's code.
fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (unescape(k), unescape(v)))
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}
