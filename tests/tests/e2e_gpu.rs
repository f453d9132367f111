//! GPU attribution through the real agent binary: NVML is a fake `libnvidia-ml.so.1` built here
//! (two GPUs with scripted power and energy counters), the server is the scripted SSE server.
//! Each request's JSON line must carry its GPU attribution (energy from the NVML samples over its
//! lifetime, per output token too) and the agent's `/metrics` the NVML gauges and the request
//! energy histogram. Needs root (skips locally, fails in CI when missing).

use std::{path::Path, process::Command, time::Duration};

use infertap_tests::agent::{Agent, AgentOptions};
use infertap_tests::client::{Endpoint, RequestSpec};
use infertap_tests::load::run_sequences_blocking;
use infertap_tests::prereq;
use infertap_tests::servers::{http_get, wait_for, ScriptedServer};
use serde_json::{json, Value};

fn build_fake_nvml(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("libnvidia-ml.so.1");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fake_nvml.c");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap();
    assert!(status.success(), "building the fake NVML library");
    out
}

#[test]
fn requests_carry_gpu_energy_from_nvml() {
    if !prereq::agent_test("requests_carry_gpu_energy_from_nvml") {
        return;
    }
    let _g = prereq::e2e_lock();
    let dir = tempfile::tempdir().unwrap();
    let nvml = build_fake_nvml(dir.path());
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 120, "itl_ms": [40], "tokens": 8},
    }))
    .unwrap();
    let mut opts = AgentOptions::pid(server.pid());
    opts.extra_args = vec![
        "--nvml-lib".into(),
        nvml.display().to_string(),
        "--cupti-socket".into(),
        dir.path().join("cupti.sock").display().to_string(),
    ];
    let agent = Agent::spawn(&opts).unwrap();
    let seqs = vec![vec![
        RequestSpec::new(Endpoint::Chat, 8),
        RequestSpec::new(Endpoint::Completions, 8),
    ]];
    let client = run_sequences_blocking(server.addr(), seqs).unwrap();
    assert_eq!(client.iter().map(Vec::len).sum::<usize>(), 2);

    // Records are held until the GPU data of their window has arrived (3 s by default).
    let lines: Vec<Value> = wait_for(Duration::from_secs(20), "2 request lines", || {
        let text = std::fs::read_to_string(&agent.requests_path).ok()?;
        let v: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (v.len() >= 2).then_some(v)
    })
    .unwrap();
    for l in &lines {
        let gpu = l
            .get("gpu")
            .unwrap_or_else(|| panic!("no gpu attribution: {l}"));
        let energy = gpu["energy_j"]
            .as_f64()
            .unwrap_or_else(|| panic!("no energy: {gpu}"));
        let e2e_s = l["e2e_ms"].as_f64().unwrap() / 1e3;
        // Two fake GPUs whose energy counters advance 0.5 J per 100 ms sample each: 10 W together.
        assert!(
            energy > 0.2 * 10.0 * e2e_s && energy < 5.0 * 10.0 * e2e_s,
            "energy {energy} J over {e2e_s} s"
        );
        let tokens = l["output_tokens"].as_f64().unwrap();
        let per_token = gpu["energy_j_per_token"].as_f64().unwrap();
        assert!((per_token - energy / tokens).abs() < 1e-9, "{gpu}");
        let busy = gpu["gpu_busy_ms"].as_f64().unwrap();
        assert!(
            busy == 0.0 && busy.is_sign_positive(),
            "no kernels ran: {busy}"
        );
    }
    let (status, metrics) = http_get(agent.metrics_addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("infertap_gpu_power_watts{gpu=\"0\"}"),
        "NVML gauges on /metrics"
    );
    assert!(
        metrics.contains("infertap_request_energy_joules_count"),
        "energy histogram on /metrics"
    );
    assert_eq!(metrics.matches("# EOF").count(), 1);
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{}", exit.log);
}

/// Runs an `infertap` subcommand against the scripted server while requests flow; returns its
/// stdout.
fn run_subcommand(args: &[&str], server: &ScriptedServer, nvml: &Path, dir: &Path) -> String {
    let bin = infertap_tests::paths::agent_binary().expect("agent binary");
    let child = Command::new(bin)
        .args(args)
        .args([
            "--pid",
            &server.pid().to_string(),
            "--duration",
            "6s",
            "--nvml-lib",
        ])
        .arg(nvml)
        .arg("--cupti-socket")
        .arg(dir.join("cupti-sub.sock"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let seqs = vec![vec![
        RequestSpec::new(Endpoint::Chat, 6),
        RequestSpec::new(Endpoint::Chat, 6),
    ]];
    run_sequences_blocking(server.addr(), seqs).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn trace_and_explain_subcommands() {
    if !prereq::agent_test("trace_and_explain_subcommands") {
        return;
    }
    let _g = prereq::e2e_lock();
    let dir = tempfile::tempdir().unwrap();
    let nvml = build_fake_nvml(dir.path());
    let server =
        ScriptedServer::start(&json!({"default": {"ttft_ms": 60, "itl_ms": [20], "tokens": 6}}))
            .unwrap();

    let trace_path = dir.path().join("trace.json");
    run_subcommand(
        &["trace", "--out", trace_path.to_str().unwrap()],
        &server,
        &nvml,
        dir.path(),
    );
    let text = std::fs::read_to_string(&trace_path).unwrap();
    let summary = infertap::gpu::trace::validate_trace(&text).expect("a valid Perfetto trace");
    let v: Value = serde_json::from_str(&text).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let named = |n: &str| {
        events
            .iter()
            .filter(|e| e["name"].as_str().is_some_and(|s| s.contains(n)))
            .count()
    };
    assert!(
        named("token") >= 12,
        "token instants of both requests: {summary:?}"
    );
    assert!(events.iter().any(|e| e["ph"] == "C"), "power counter track");

    let report = run_subcommand(&["explain", "--top", "5"], &server, &nvml, dir.path());
    assert!(report.contains("/v1/chat/completions"), "{report}");
    assert!(report.to_lowercase().contains("ttft"), "{report}");
}
