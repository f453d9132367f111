//! Request ↔ GPU correlation through the public API, as the pipeline and CLI drive it: requests
//! start and finish while GPU data arrives late and out of order; `poll` finalises after the
//! delay; the results go to a Perfetto trace and the `explain` text.

use std::sync::Arc;

use infertap::gpu::correlate::{Contributor, Correlator, CorrelatorConfig, RequestKey};
use infertap::gpu::timeline::{
    cuda_func, CudaApiCall, GpuActivity, GpuActivityKind, MemcpyKind, PowerSample,
};
use infertap::gpu::trace::{validate_trace, TraceWriter};
use infertap::record::{RequestRecord, TokenCountSource};
use infertap::sinks::explain::{render_explain, ExplainOptions};

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;
/// Monotonic times start well after boot, as they do on a real host.
const T0: u64 = 86_400 * SEC;

fn record(conn_id: u64, start: u64, end: u64, tokens: &[u64]) -> RequestRecord {
    RequestRecord {
        pid: 4242,
        conn_id,
        peer: None,
        seq_on_conn: 0,
        method: "POST".into(),
        path: "/v1/completions".into(),
        status: Some(200),
        model: Some("tiny".into()),
        stream: true,
        start_ns: T0 + start,
        read_ns: T0 + start,
        arrival_ns: None,
        connected_ns: None,
        accepted_ns: None,
        request_end_ns: Some(T0 + start),
        response_start_ns: Some(T0 + start),
        first_token_ns: tokens.first().map(|t| T0 + t),
        end_ns: T0 + end,
        token_ns: tokens.iter().map(|t| T0 + t).collect(),
        tokens_per_event: vec![1; tokens.len()],
        output_tokens: Some(tokens.len() as u64),
        token_count_source: Some(TokenCountSource::Counted),
        prompt_tokens: Some(2048),
        finish_reason: Some("length".into()),
        request_bytes: 300,
        response_bytes: 3000,
        error: None,
        ..Default::default()
    }
}

fn activity(kind: GpuActivityKind, name: Option<&str>, stream: u32, a: u64, b: u64) -> GpuActivity {
    GpuActivity {
        kind,
        device: 0,
        context: 1,
        stream,
        start_ns: T0 + a,
        end_ns: T0 + b,
        correlation_id: 7,
        name: name.map(Arc::from),
        pid: 4243,
    }
}

fn kernel(name: &str, stream: u32, a: u64, b: u64) -> GpuActivity {
    let kind = GpuActivityKind::Kernel {
        grid: [108, 1, 1],
        block: [256, 1, 1],
        shared_mem_bytes: 0,
        registers_per_thread: 64,
    };
    activity(kind, Some(name), stream, a, b)
}

#[test]
fn pipeline_flow_to_trace_and_explain() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    // Request A decodes at 20 ms per token; B arrives at 205 ms with a long prompt whose
    // prefill (205..290 ms) stalls A's token after 200 ms.
    let a = record(
        1,
        0,
        400 * MS,
        &[
            100 * MS,
            120 * MS,
            140 * MS,
            160 * MS,
            180 * MS,
            200 * MS,
            300 * MS,
            320 * MS,
        ],
    );
    let b = record(2, 205 * MS, 500 * MS, &[290 * MS, 310 * MS, 330 * MS]);
    c.request_started(RequestKey::of(&a), a.start_ns);
    c.request_started(RequestKey::of(&b), b.start_ns);
    c.request_first_token(RequestKey::of(&a), T0 + 100 * MS);

    // Decode steps: 10 ms of kernels after each of A's tokens; B's prefill 210..290 ms.
    for t in [100, 120, 140, 160, 180, 300] {
        c.add_activity(kernel("decode_step", 7, (t + 2) * MS, (t + 12) * MS));
    }
    c.add_activity(kernel("prefill_flash_attn", 7, 210 * MS, 290 * MS));
    c.add_activity(activity(
        GpuActivityKind::Memcpy {
            kind: MemcpyKind::HtoD,
            bytes: 8 << 20,
        },
        None,
        9,
        205 * MS,
        209 * MS,
    ));
    c.add_api_call(CudaApiCall {
        pid: 4243,
        tid: 4244,
        func: cuda_func("cudaStreamSynchronize").unwrap(),
        start_ns: T0 + 290 * MS,
        end_ns: Some(T0 + 291 * MS),
        bytes: None,
    });
    for i in 0..=10 {
        c.add_power_sample(PowerSample {
            device: 0,
            ts_ns: T0 + i * 50 * MS,
            power_mw: Some(300_000),
            power_source: None,
            energy_mj: Some(1_000_000 + i * 15_000),
            gpu_util_pct: Some(80),
            mem_util_pct: Some(30),
        });
    }

    // The pipeline reports B's first content event as it is seen (B is still in flight when A
    // is finalised, and the first token bounds its prefill).
    c.request_first_token(RequestKey::of(&b), T0 + 290 * MS);
    c.request_finished(a.clone());
    // CUPTI buffers are late: nothing before the delay has passed.
    assert!(c.poll(a.end_ns + SEC).is_empty());
    let done_a = c.poll(a.end_ns + 3 * SEC);
    assert_eq!(done_a.len(), 1);
    let ga = &done_a[0].gpu;
    // Alone until 205 ms, then shared with B (still in flight) until 400 ms.
    // Kernels: 5 × 10 ms alone, prefill 80 ms shared, last decode 10 ms shared.
    assert!(
        (ga.gpu_busy_ms - (50.0 + 40.0 + 5.0)).abs() < 1e-9,
        "{}",
        ga.gpu_busy_ms
    );
    // 300 W over 205 ms alone + 195 ms halved: 61.5 + 29.25 J (counter: 15 J per 50 ms).
    assert!(
        (ga.energy_j.unwrap() - 90.75).abs() < 1e-9,
        "{:?}",
        ga.energy_j
    );
    assert_eq!(ga.memcpy_bytes, 4 << 20);
    let slow = &ga.slow_tokens[0];
    assert_eq!((slow.token_index, slow.gap_ns), (6, 100 * MS));
    assert_eq!(slow.gpu_busy_ns, 80 * MS);
    assert_eq!(slow.sync_wait_ns, MS);
    assert!(
        matches!(&slow.top[0], Contributor::Prefill { conn_id: 2, overlap_ns, .. } if *overlap_ns == 85 * MS)
    );
    assert!(
        matches!(&slow.top[1], Contributor::Kernel { name, .. } if name == "prefill_flash_attn")
    );

    c.request_finished(b.clone());
    let done_b = c.poll(b.end_ns + 3 * SEC);
    assert_eq!(done_b.len(), 1);
    let all: Vec<_> = done_a.into_iter().chain(done_b).collect();
    // Busy shares add up to the busy time while requests were in flight.
    let busy: f64 = all.iter().map(|r| r.gpu.gpu_busy_ms).sum();
    assert!((busy - 140.0).abs() < 1e-9, "{busy}");

    let mut w = TraceWriter::new(1_763_856_000_000_000_000 - T0 as i64);
    for r in &all {
        w.add_correlated(r);
    }
    for t in [100, 120, 140, 160, 180, 300] {
        w.add_activity(&kernel("decode_step", 7, (t + 2) * MS, (t + 12) * MS));
    }
    w.add_activity(&kernel("prefill_flash_attn", 7, 210 * MS, 290 * MS));
    let path =
        std::env::temp_dir().join(format!("infertap-correlation-{}.json", std::process::id()));
    w.write_file(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let summary = validate_trace(&text).unwrap();
    assert_eq!(summary.complete, 2 * 2 + 1 + 7);
    assert_eq!(summary.instants, 8 + 3);
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["otherData"]["ts_origin_monotonic_ns"], T0);
    assert_eq!(doc["otherData"]["ts_origin_unix_ns"], "1763856000000000000");

    let text = render_explain(&all, &ExplainOptions::default());
    assert!(text.contains("token 6 +100.0 ms (5.0× median)"), "{text}");
    assert!(
        text.contains("memcpy htod ×1 on GPU 0 (8.4 MB): 4.000 ms"),
        "{text}"
    );
    assert!(
        text.contains("prefill of request conn 2#0 (pid 4242): 85.000 ms"),
        "{text}"
    );
}
