//! The collector's `/ui` page in headless Chromium: a real collector binary fed over gRPC by
//! two real agent exporters (latency records through the agent's aggregator, vLLM-like CPU
//! profiles); the DOM after the page's scripts ran must hold the percentile table with the
//! values PromQL's histogram_quantile would give and the flame graph's frames; a screenshot
//! goes to `target/test-artifacts/collector_ui/`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use infertap::aggregate::{Aggregator, DEFAULT_MAX_MODELS};
use infertap::record::{RequestRecord, TokenCountSource};
use infertap::sinks::grpc::{ExporterConfig, GrpcExporter};
use infertap_proto::pb::ProfileData;
use infertap_proto::pprof::{ProfileBuilder, ProfileKind};
use infertap_tests::collector_support::{http_get_bytes, wait_until, CollectorProcess};
use infertap_tests::prereq;
use infertap_tests::tools::{
    artifacts_dir, chromium_dump_dom, chromium_screenshot, missing_chromium,
};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const ENGINE: &str = "/opt/venv/lib/python3.12/site-packages/vllm/v1/engine/core.py";
const RUNNER: &str = "/opt/venv/lib/python3.12/site-packages/vllm/v1/worker/gpu_model_runner.py";
const SCHED: &str = "/opt/venv/lib/python3.12/site-packages/vllm/v1/core/sched/scheduler.py";

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A completed streaming request: content events at `events_us` after its start, one token
/// each, ending 1 ms after the last.
fn record(model: &str, events_us: &[u64]) -> RequestRecord {
    let start = 1_000 * MS;
    let token_ns: Vec<u64> = events_us.iter().map(|us| start + us * 1_000).collect();
    RequestRecord {
        pid: 1,
        conn_id: 1,
        peer: None,
        seq_on_conn: 0,
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
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
        end_ns: token_ns.last().copied().unwrap_or(start) + MS,
        tokens_per_event: vec![1; token_ns.len()],
        output_tokens: Some(token_ns.len() as u64),
        token_ns,
        token_count_source: Some(TokenCountSource::Counted),
        prompt_tokens: None,
        finish_reason: Some("stop".into()),
        request_bytes: 100,
        response_bytes: 1_000,
        error: None,
        ..Default::default()
    }
}

/// A vLLM-like CPU profile over [start, start + 10 s).
fn cpu_profile(start: u64, execute: i64, schedule: i64) -> ProfileData {
    let mut b = ProfileBuilder::new(ProfileKind::Cpu);
    b.set_time(start, start + 10 * S);
    b.set_period("cpu", "nanoseconds", 10_000_000);
    let busy = b.python_frame("EngineCore.run_busy_loop", ENGINE, 640, 651);
    let step = b.python_frame("EngineCore.step", ENGINE, 220, 231);
    let exec = b.python_frame("GPUModelRunner.execute_model", RUNNER, 1180, 1242);
    let sched = b.python_frame("Scheduler.schedule", SCHED, 150, 170);
    b.add_sample(&[exec, step, busy], &[execute, execute * 10_000_000], &[])
        .unwrap();
    b.add_sample(
        &[sched, step, busy],
        &[schedule, schedule * 10_000_000],
        &[],
    )
    .unwrap();
    b.into_profile_data().unwrap()
}

fn exporter(grpc: SocketAddr, node: &str) -> GrpcExporter {
    let mut cfg = ExporterConfig::new(format!("http://{grpc}"), node, "vllm");
    cfg.backoff_min = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(300);
    GrpcExporter::spawn(cfg).unwrap()
}

/// The `<tr>` of the latency table for (node, model), cells as text.
fn latency_row(dom: &str, node: &str, model: &str) -> Vec<String> {
    let table = &dom[dom.find("id=\"latency\"").expect("latency table")..];
    let table = &table[..table.find("</table>").unwrap()];
    let head = format!("<td class=\"l\">{node}</td><td class=\"l\">{model}</td>");
    let row = &table[table
        .find(&head)
        .unwrap_or_else(|| panic!("no row {node}/{model}\n{table}"))..];
    let row = &row[..row.find("</tr>").unwrap()];
    row.split("<td")
        .skip(1)
        .map(|c| c[c.find('>').unwrap() + 1..c.find("</td>").unwrap()].to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_page_shows_percentiles_and_flame_graph_in_headless_chromium() {
    if !prereq::check(
        "ui_page_shows_percentiles_and_flame_graph_in_headless_chromium",
        missing_chromium(),
    ) {
        return;
    }
    let collector = CollectorProcess::start("127.0.0.1:0".parse().unwrap(), &[]).unwrap();
    let (e1, e2) = (
        exporter(collector.grpc_addr, "gpu-node-1"),
        exporter(collector.grpc_addr, "gpu-node-2"),
    );
    let (mut a1, mut a2) = (
        Aggregator::new(DEFAULT_MAX_MODELS, now_ns()),
        Aggregator::new(DEFAULT_MAX_MODELS, now_ns()),
    );
    // Node 1: four requests, TTFT 15 ms, token gaps 2 ms, E2E 20 ms.
    for _ in 0..4 {
        a1.observe(&record("llama-3-8b", &[15_000, 17_000, 19_000]));
    }
    // Node 2: two requests, TTFT 300 ms, gaps 40 ms, E2E 381 ms.
    for _ in 0..2 {
        a2.observe(&record("qwen2-7b", &[300_000, 340_000, 380_000]));
    }
    let t0 = (now_ns() / S - 40) * S;
    for i in 0..3u64 {
        assert!(e1.attach_profile(cpu_profile(t0 + i * 10 * S, 30, 10)));
        assert!(e2.attach_profile(cpu_profile(t0 + i * 10 * S, 5, 15)));
        assert!(e1.submit(a1.take_interval(now_ns())));
        assert!(e2.submit(a2.take_interval(now_ns())));
    }
    wait_until(Duration::from_secs(30), "acks", || {
        e1.acked_sequence() == 3 && e2.acked_sequence() == 3
    })
    .await
    .unwrap();
    let addr = collector.metrics_addr;

    // Server-side render time, as a client sees it (median of 5).
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let a = tokio::task::spawn_blocking(move || http_get_bytes(addr, "/ui"))
            .await
            .unwrap()
            .unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(a.status, 200);
        assert_eq!(a.header("content-type"), Some("text/html; charset=utf-8"));
    }
    times.sort_by(f64::total_cmp);
    eprintln!(
        "GET /ui (2 nodes, 6 profiles merged): median {:.1} ms",
        times[2]
    );
    let bad = tokio::task::spawn_blocking(move || http_get_bytes(addr, "/ui?type=heap"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bad.status, 400);
    assert!(
        bad.text().contains("expected cpu, gpu or offcpu"),
        "{}",
        bad.text()
    );

    let url = format!("http://{addr}/ui");
    let (dom, console) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium_dump_dom(&url)
    })
    .await
    .unwrap()
    .unwrap();
    let dir = artifacts_dir("collector_ui").unwrap();
    std::fs::write(dir.join("ui-dom.html"), &dom).unwrap();
    assert!(
        !console.contains("Uncaught"),
        "script errors in the page:\n{console}"
    );

    // Percentiles (ms) as histogram_quantile interpolates them:
    // TTFT 15 ms x4 in (10, 20] ms: p50 = 10 + 10 * 2/4 = 15, p90 = 19, p99 = 19.9.
    // ITL 2 ms x8 in (1, 2.5] ms: p50 = 1 + 1.5 * 4/8 = 1.75, p90 = 2.35.
    // E2E 20 ms x4 in the first bucket (0, 300] ms: p50 = 150, p90 = 270, p99 = 297.
    let r1 = latency_row(&dom, "gpu-node-1", "llama-3-8b");
    assert_eq!(
        r1,
        [
            "gpu-node-1",
            "llama-3-8b",
            "4",
            "15.0",
            "19.0",
            "19.9",
            "1.75",
            "2.35",
            r1[8].as_str(),
            "150",
            "270",
            "297"
        ],
        "{r1:?}"
    );
    // Node 2: TTFT 300 ms x2 in (250, 500]: p50 = 250 + 250 * 1/2 = 375, p90 = 475, p99 = 497.5.
    // ITL 40 ms x4 in (25, 50]: p50 = 37.5, p90 = 47.5, p99 = 49.75.
    // E2E 381 ms x2 in (300, 500]: p50 = 400, p90 = 480, p99 = 498.
    let r2 = latency_row(&dom, "gpu-node-2", "qwen2-7b");
    assert_eq!(
        r2,
        [
            "gpu-node-2",
            "qwen2-7b",
            "2",
            "375",
            "475",
            "498",
            "37.5",
            "47.5",
            "49.8",
            "400",
            "480",
            "498"
        ],
        "{r2:?}"
    );

    // The flame graph: inline SVG, every frame of both nodes' stacks with its share.
    let fg = &dom[dom.find("id=\"flamegraph\"").expect("flame graph")..];
    assert!(fg.contains("<svg"), "inline svg");
    // 3 intervals x (30+10 + 5+15) samples x 10 ms = 1.8 s = 1,800,000 µs.
    for (frame, us, pct) in [
        ("EngineCore.run_busy_loop", "1,800,000", "100.00"),
        ("EngineCore.step", "1,800,000", "100.00"),
        ("GPUModelRunner.execute_model", "1,050,000", "58.33"),
        ("Scheduler.schedule", "750,000", "41.67"),
    ] {
        let title = format!("<title>{frame} ({us} µs, {pct}%)</title>");
        assert!(fg.contains(&title), "{title} missing");
    }
    assert!(dom.contains("6 profiles merged: 180 samples"), "summary");
    assert!(dom.contains("id=\"stored\""), "stored profiles table");

    // One node selected: only its rows and its frames.
    let (dom1, _) = tokio::task::spawn_blocking({
        let url = format!("{url}?node=gpu-node-2&from=-1h");
        move || chromium_dump_dom(&url)
    })
    .await
    .unwrap()
    .unwrap();
    let latency = &dom1[dom1.find("id=\"latency\"").unwrap()..];
    let latency = &latency[..latency.find("</table>").unwrap()];
    assert!(
        !latency.contains("gpu-node-1") && latency.contains("gpu-node-2"),
        "{latency}"
    );
    assert!(
        dom1.contains("<title>Scheduler.schedule (450,000 µs, 75.00%)</title>"),
        "node 2 only"
    );

    let shot = dir.join("ui.png");
    tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || chromium_screenshot(&url, &shot, 1400, 1300)
    })
    .await
    .unwrap()
    .unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "screenshot {}",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());
    assert_eq!(e1.shutdown(Duration::from_secs(5)).await, 0);
    assert_eq!(e2.shutdown(Duration::from_secs(5)).await, 0);
}
