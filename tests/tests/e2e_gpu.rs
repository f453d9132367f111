//! GPU attribution through the real agent binary: NVML is a fake `libnvidia-ml.so.1` built here
//! (two GPUs with scripted power and energy counters), the server is the scripted SSE server.
//! Each request's JSON line must carry its GPU attribution (energy from the NVML samples over its
//! lifetime, per output token too) and the agent's `/metrics` the NVML gauges and the request
//! energy histogram.
//!
//! GPU time by call path: a CUDA app (`fixtures/cuda/launch_paths.cpp`) on the stub libcuda /
//! libcudart, with the real injection library and the fake libcupti, launches from three call
//! paths on two threads; `infertap profile --type gpu --gpu-stack-every 1` must weigh each path
//! by exactly the GPU time of its kernels (`go tool pprof` reads the profile), and without the
//! injection library fall back to launch counts and say so in the profile's comment.
//!
//! Needs root (skips locally, fails in CI when missing).

#[path = "support/cuda_stub.rs"]
mod cuda_stub;
#[path = "support/cupti_lib.rs"]
mod cupti_lib;
#[path = "support/fake_cupti.rs"]
mod fake_cupti;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::{path::Path, process::Command, time::Duration};

use infertap_tests::agent::{Agent, AgentOptions};
use infertap_tests::client::{Endpoint, RequestSpec};
use infertap_tests::load::run_sequences_blocking;
use infertap_tests::prereq;
use infertap_tests::servers::{http_get, wait_for, ScriptedServer};
use infertap_tests::tools::{artifacts_dir, go_pprof, missing_go};
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
        metrics.contains("infertap_gpu_power_watts{gpu=\"0\",gpu_uuid=\"GPU-00000000-0000-0000-0000-000000000000\",gpu_model=\"Fake GPU\"}"),
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
    let ready = dir.join(format!("{}-ready", args[0]));
    let _ = std::fs::remove_file(&ready);
    let child = Command::new(bin)
        .args(args)
        .arg("--ready-file")
        .arg(&ready)
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
    // Requests only once the probes are attached (loading takes longer on a busy machine).
    wait_for(Duration::from_secs(30), "subcommand ready", || {
        ready.exists().then_some(())
    })
    .unwrap();
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

/// Launches per kernel path and graph launches of `launch_paths`, and the GPU times its stubs
/// give each kernel (see `fixtures/cuda/launch_paths.cpp`).
const LAUNCHES: u64 = 120;
const GRAPH_LAUNCHES: u64 = 40;
const HEAVY_NS: u64 = 30_000;
const LIGHT_NS: u64 = 10_000;
const GRAPH_NS: u64 = 5_123 + 7_456;

/// The `launch_paths` app, stopped at "ready".
struct LaunchApp {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl LaunchApp {
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).unwrap();
        s.trim().to_owned()
    }
    fn go(&mut self) {
        self.stdin.write_all(b"go\n").unwrap();
        self.stdin.flush().unwrap();
    }
}

struct ProfileRun {
    profile: std::path::PathBuf,
    agent_log: String,
    app_log: String,
}

/// Runs the app under `infertap profile --type gpu`, with the injection library and the fake
/// libcupti when `inject` is set, and `env` in the app's environment.
fn profile_launch_paths(
    dir: &Path,
    app: &Path,
    inject: Option<(&Path, &Path)>,
    env: &[(&str, &str)],
    tag: &str,
) -> ProfileRun {
    let sock = dir.join(format!("cupti-{tag}.sock"));
    let app_log = dir.join(format!("app-{tag}.log"));
    let mut cmd = Command::new(app);
    cmd.args([
        LAUNCHES.to_string(),
        GRAPH_LAUNCHES.to_string(),
        "1000".into(),
    ])
    .env("LD_LIBRARY_PATH", dir)
    .env("INFERTAP_CUPTI_SOCKET", &sock)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(&app_log).unwrap())
    .envs(env.iter().copied());
    if let Some((lib, cupti)) = inject {
        cmd.env("CUDA_INJECTION64_PATH", lib)
            .env("INFERTAP_CUPTI_LIB", cupti);
    }
    let mut child = cmd.spawn().unwrap();
    let mut app = LaunchApp {
        stdin: child.stdin.take().unwrap(),
        stdout: BufReader::new(child.stdout.take().unwrap()),
        child,
    };
    assert_eq!(app.line(), "ready");
    let pid = app.child.id();

    let out = dir.join(format!("gpu-{tag}.pb.gz"));
    let ready = dir.join(format!("ready-{tag}"));
    let log = dir.join(format!("agent-{tag}.log"));
    let bin = infertap_tests::paths::agent_binary().expect("agent binary");
    let mut agent = Command::new(bin)
        .args(["profile", "--type", "gpu", "--gpu-stack-every", "1"])
        .args(["--profile-hz", "0", "--offcpu-every", "0", "--no-nvml"])
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--cuda-lib")
        .arg(dir.join("libcuda.so.1"))
        .arg("--cuda-lib")
        .arg(dir.join("libcudart.so.12"))
        .arg("--cupti-socket")
        .arg(&sock)
        .args(["--duration", "12s", "--out"])
        .arg(&out)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(Duration::from_secs(60), "agent ready", || {
        ready.exists().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", read_log()));
    if inject.is_some() {
        // The library retries its connection every second.
        let hello = format!("CUPTI: pid {pid} connected");
        wait_for(
            Duration::from_secs(10),
            "the injection library to connect",
            || read_log().contains(&hello).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", read_log()));
    }
    app.go();
    assert_eq!(app.line(), "done");
    let status = agent.wait().unwrap();
    assert!(status.success(), "{}", read_log());
    app.go();
    assert!(app.child.wait().unwrap().success());
    ProfileRun {
        profile: out,
        agent_log: read_log(),
        app_log: std::fs::read_to_string(&app_log).unwrap_or_default(),
    }
}

/// The `-top -cum` value of the row whose function contains `func`, as printed.
fn cum_of(top: &str, func: &str) -> String {
    top.lines()
        .find(|l| {
            l.split_whitespace()
                .nth(5)
                .is_some_and(|f| f.contains(func))
        })
        .unwrap_or_else(|| panic!("{func} missing\n{top}"))
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_owned()
}

#[test]
fn gpu_profile_weighs_call_paths_by_cupti_gpu_time() {
    let test = "gpu_profile_weighs_call_paths_by_cupti_gpu_time";
    if !prereq::agent_test(test) || !prereq::check(test, missing_go()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let dir = tempfile::tempdir().unwrap();
    cuda_stub::build_stubs(dir.path());
    let app = cuda_stub::build_app(dir.path(), "launch_paths.cpp", "launch_paths");
    let cupti = fake_cupti::build(&dir.path().join("fake"));
    let inject = cupti_lib::cdylib();
    let artifacts = artifacts_dir(test).unwrap();

    // With CUPTI: every launch sampled and timed, so each path weighs exactly its kernels.
    let run = profile_launch_paths(dir.path(), &app, Some((&inject, &cupti)), &[], "cupti");
    let file = artifacts.join("gpu-cupti.pb.gz");
    std::fs::copy(&run.profile, &file).unwrap();
    let ctx = format!("agent log:\n{}\napp log:\n{}", run.agent_log, run.app_log);
    let top = go_pprof(
        &[
            "-top",
            "-cum",
            "-sample_index=gpu",
            "-unit=ns",
            "-nodecount=200",
        ],
        &file,
    )
    .unwrap();
    println!("{top}");
    let ns = |v: u64| format!("{v}ns");
    assert_eq!(
        cum_of(&top, "heavy_path"),
        ns(LAUNCHES * HEAVY_NS),
        "{top}\n{ctx}"
    );
    assert_eq!(
        cum_of(&top, "light_path"),
        ns(LAUNCHES * LIGHT_NS),
        "{top}\n{ctx}"
    );
    assert_eq!(
        cum_of(&top, "graph_path"),
        ns(GRAPH_LAUNCHES * GRAPH_NS),
        "{top}\n{ctx}"
    );
    // The launching threads: each path's time on its own thread.
    let sampler = go_pprof(
        &[
            "-top",
            "-cum",
            "-sample_index=gpu",
            "-unit=ns",
            "-tagfocus=thread=sampler",
        ],
        &file,
    )
    .unwrap();
    assert_eq!(
        cum_of(&sampler, "light_path"),
        ns(LAUNCHES * LIGHT_NS),
        "{sampler}"
    );
    assert!(!sampler.contains("heavy_path"), "{sampler}");
    let counts = go_pprof(
        &["-top", "-cum", "-sample_index=samples", "-nodecount=200"],
        &file,
    )
    .unwrap();
    assert_eq!(
        cum_of(&counts, "heavy_path"),
        LAUNCHES.to_string(),
        "{counts}"
    );
    assert_eq!(
        cum_of(&counts, "graph_path"),
        GRAPH_LAUNCHES.to_string(),
        "{counts}"
    );
    let comments = go_pprof(&["-comments"], &file).unwrap();
    assert!(
        comments.contains("GPU time of sampled launches (CUPTI)")
            && !comments.contains("launch counts only"),
        "{comments}"
    );

    // Without the injection library: launch counts only, and the profile says so.
    let run = profile_launch_paths(dir.path(), &app, None, &[], "plain");
    let file = artifacts.join("gpu-plain.pb.gz");
    std::fs::copy(&run.profile, &file).unwrap();
    let counts = go_pprof(
        &["-top", "-cum", "-sample_index=samples", "-nodecount=200"],
        &file,
    )
    .unwrap();
    println!("{counts}");
    assert_eq!(
        cum_of(&counts, "heavy_path"),
        LAUNCHES.to_string(),
        "{counts}\n{}",
        run.agent_log
    );
    assert_eq!(
        cum_of(&counts, "light_path"),
        LAUNCHES.to_string(),
        "{counts}"
    );
    assert_eq!(
        cum_of(&counts, "graph_path"),
        GRAPH_LAUNCHES.to_string(),
        "{counts}"
    );
    let comments = go_pprof(&["-comments"], &file).unwrap();
    assert!(
        comments.contains("weighted by CUDA launch counts only"),
        "{comments}"
    );
    let gpu = go_pprof(&["-top", "-sample_index=gpu"], &file).unwrap();
    assert!(
        gpu.contains("of 0 total") || gpu.contains("0 of 0"),
        "{gpu}"
    );

    // Another tool holds CUPTI's one callback subscriber: kernels are still traced, launches are
    // not timed, the library says why and the profile falls back the same way.
    let run = profile_launch_paths(
        dir.path(),
        &app,
        Some((&inject, &cupti)),
        &[("FAKE_CUPTI_REFUSE_SUBSCRIBE", "1")],
        "refused",
    );
    assert!(
        run.app_log.contains("cuptiSubscribe failed"),
        "the library explains: {}",
        run.app_log
    );
    let file = artifacts.join("gpu-refused.pb.gz");
    std::fs::copy(&run.profile, &file).unwrap();
    let counts = go_pprof(
        &["-top", "-cum", "-sample_index=samples", "-nodecount=200"],
        &file,
    )
    .unwrap();
    assert_eq!(
        cum_of(&counts, "heavy_path"),
        LAUNCHES.to_string(),
        "{counts}"
    );
    let comments = go_pprof(&["-comments"], &file).unwrap();
    assert!(
        comments.contains("weighted by CUDA launch counts only"),
        "{comments}"
    );
}
