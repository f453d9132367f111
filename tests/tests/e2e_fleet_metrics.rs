//! GPU device metrics and the traced servers' own metrics, end to end: the real agent binary
//! (eBPF, root) streaming to the real collector binary.
//!
//! - GPU: no GPU here, so the agents load the fake `libnvidia-ml.so.1` (tests/fixtures/
//!   fake_nvml.c, built with `cc`, as tests/tests/gpu_nvml.rs does); two agents with different
//!   node names report the same fake GPUs; the collector must show them per node and GPU.
//! - Server metrics: the scripted server serves a `/metrics` body recorded from a real vLLM
//!   0.32 (CPU build) under load (tests/fixtures/server_metrics/), with counters advancing per
//!   scrape; the agent's and the collector's `infertap_server_*` must be what the bodies say.
//! - A server without `/metrics` (the real llama-cpp-python server) yields no series.
//! - Live vLLM, when `~/.cache/infertap/vllm-venv` holds one (SKIP otherwise, also in CI).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use infertap_tests::agent::{Agent, AgentOptions, Collector, Metrics};
use infertap_tests::client::{Endpoint, RequestSpec};
use infertap_tests::load::run_sequences_blocking;
use infertap_tests::prereq;
use infertap_tests::servers::{free_port, wait_for, LlamaServer, ScriptedServer};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Builds the fake NVML into a fresh directory (`cc -shared`).
fn fake_nvml() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libnvidia-ml.so.1");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(fixture("fake_nvml.c"))
        .status()
        .expect("cc runs");
    assert!(st.success(), "building the fake NVML failed");
    (dir, lib)
}

/// Agent options without the sources these tests do not need (keeps the 2 shared cores free).
fn quiet(mut o: AgentOptions, extra: &[&str]) -> AgentOptions {
    o.extra_args.extend(
        ["--no-profile", "--no-cuda", "--cupti-socket", "off"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string()),
    );
    o
}

fn labels_of(m: &Metrics, name: &str) -> Vec<BTreeMap<String, String>> {
    m.samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.labels.clone())
        .collect()
}

/// The one sample of `name` with all of `labels`.
fn one(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let v: Vec<f64> = m
        .samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    assert!(v.len() <= 1, "{name}{labels:?}: {} series", v.len());
    v.first().copied()
}

#[test]
fn gpu_metrics_reach_the_collector_per_node_and_gpu() {
    let name = "gpu_metrics_reach_the_collector_per_node_and_gpu";
    if !prereq::agent_test(name) || !prereq::check(name, prereq::missing_collector()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let (_dir, lib) = fake_nvml();
    let collector = Collector::spawn().unwrap();
    let lib = lib.to_str().unwrap().to_owned();
    // No server to trace: an unused port keeps the agents waiting for one, NVML runs anyway.
    let agents: Vec<Agent> = ["gpu-node-a", "gpu-node-b"]
        .iter()
        .map(|node| {
            let mut o = AgentOptions {
                ports: vec![free_port().unwrap()],
                collector: Some(collector.url()),
                interval: Some("1s".into()),
                node: Some((*node).into()),
                ..Default::default()
            };
            o = quiet(o, &["--nvml-lib", &lib]);
            Agent::spawn(&o).unwrap()
        })
        .collect();
    let temp = "infertap_gpu_temperature_celsius";
    let fleet = wait_for(WAIT, "both nodes' GPUs on the collector", || {
        let m = collector.metrics().ok()?;
        (labels_of(&m, temp).len() == 4).then_some(m)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agents[0].log()));
    let uuid = |i: u32| {
        format!("GPU-{0}{0}{0}{0}{0}{0}{0}{0}-{0}{0}{0}{0}-{0}{0}{0}{0}-{0}{0}{0}{0}-{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}", i)
    };
    for (a, node) in agents.iter().zip(["gpu-node-a", "gpu-node-b"]) {
        let own = a.metrics().unwrap();
        for gpu in [0u32, 1] {
            let g = gpu.to_string();
            let uuid = uuid(gpu);
            let sel = [
                ("gpu", g.as_str()),
                ("gpu_uuid", uuid.as_str()),
                ("gpu_model", "Fake GPU"),
            ];
            let mut at_collector = sel.to_vec();
            at_collector.push(("node", node));
            // Readings the fake keeps constant: the agent's endpoint and the collector agree
            // exactly, and both are the fake's formulas in base units.
            let gib = (1u64 << 30) as f64;
            for (metric, want) in [
                (temp, 60.0 + gpu as f64),
                ("infertap_gpu_fb_used_bytes", (1.0 + gpu as f64) * gib),
                ("infertap_gpu_fb_total_bytes", 80.0 * gib),
                ("infertap_gpu_sm_clock_hertz", (1410.0 + gpu as f64) * 1e6),
                (
                    "infertap_gpu_memory_clock_hertz",
                    (1593.0 + gpu as f64) * 1e6,
                ),
                ("infertap_gpu_clock_throttle_reasons", 4.0),
                (
                    "infertap_gpu_pcie_tx_bytes_per_second",
                    (1000.0 + gpu as f64) * 1e3,
                ),
            ] {
                assert_eq!(
                    one(&own, metric, &sel),
                    Some(want),
                    "{node} agent {metric}{sel:?}"
                );
                assert_eq!(
                    one(&fleet, metric, &at_collector),
                    Some(want),
                    "{node} collector {metric}{sel:?}"
                );
            }
            let mut reason = at_collector.clone();
            reason.push(("reason", "sw_power_cap"));
            assert_eq!(one(&fleet, "infertap_gpu_throttled", &reason), Some(1.0));
            reason.pop();
            reason.push(("reason", "hw_thermal_slowdown"));
            assert_eq!(one(&fleet, "infertap_gpu_throttled", &reason), Some(0.0));
            // Power advances by 10 mW per NVML call: the collector shows a reading the agent
            // made before its current one.
            let (pa, pc) = (
                one(&own, "infertap_gpu_power_watts", &sel).unwrap(),
                one(&fleet, "infertap_gpu_power_watts", &at_collector).unwrap(),
            );
            let base = if gpu == 0 { 160.0 } else { 151.0 };
            assert!(
                base <= pc && pc <= pa,
                "{node} gpu {gpu}: power {pc} vs agent {pa}"
            );
            // ECC is unsupported by the fake: absent, not 0.
            assert_eq!(
                one(
                    &fleet,
                    "infertap_gpu_ecc_corrected_errors_total",
                    &at_collector
                ),
                None
            );
        }
        let mut pm = vec![("gpu", "0"), ("pid", "4242"), ("node", node)];
        assert_eq!(
            one(&fleet, "infertap_gpu_process_memory_bytes", &pm),
            Some(3.0 * (1u64 << 30) as f64)
        );
        pm[0] = ("gpu", "1");
        assert_eq!(one(&fleet, "infertap_gpu_process_memory_bytes", &pm), None);
    }
    // Energy is a counter: after the agents stop (their last reports delivered), the
    // collector's total per node and GPU is the agent's own total, which grew by 0.5 J per
    // NVML call (whole joules kept).
    let mut last_energy = Vec::new();
    for a in &agents {
        let m = a.metrics().unwrap();
        last_energy.push(m.sum("infertap_gpu_energy_joules_total", &[("gpu", "0")]));
    }
    // Stopped together: each takes seconds to detach its probes on a loaded machine.
    let stopping: Vec<_> = agents
        .into_iter()
        .map(|a| std::thread::spawn(move || a.stop()))
        .collect();
    for s in stopping {
        let exit = s.join().unwrap().unwrap();
        assert!(exit.status.success(), "{}", exit.log);
    }
    let m = collector.metrics().unwrap();
    for (node, seen) in ["gpu-node-a", "gpu-node-b"].iter().zip(last_energy) {
        let total = m.sum(
            "infertap_gpu_energy_joules_total",
            &[("gpu", "0"), ("node", node)],
        );
        eprintln!("{node}: GPU 0 energy {total} J at the collector ({seen} J seen on the agent before stop)");
        assert!(total >= seen && total > 0.0, "{node}: {total} < {seen}");
        assert_eq!(total.fract(), 0.0);
    }
    // Gauges of agents that shut down cleanly are gone; counters keep their totals.
    assert!(labels_of(&m, temp).is_empty(), "{:?}", labels_of(&m, temp));
}

/// Values of the sample lines of `name` in one served body, summed over its series.
fn served(body: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let series = line.split(' ').next().unwrap_or("");
        let metric = series.split('{').next().unwrap_or("");
        if metric == name {
            let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[derive(serde::Deserialize)]
struct Scrape {
    peer: String,
    scrape: u64,
    body: String,
}

fn scrapes(path: &Path) -> Vec<Scrape> {
    infertap_tests::servers::read_jsonl(path).unwrap_or_default()
}

/// What the agent must count for a counter from the bodies it read (first read = zero point,
/// a drop below the previous reading = a server restart: the new reading counts in full).
fn counted(bodies: &[&str], name: &str) -> f64 {
    let mut total = 0.0;
    let mut prev: Option<f64> = None;
    for b in bodies {
        let v = served(b, name).unwrap();
        if let Some(p) = prev {
            total += if v >= p { v - p } else { v };
        }
        prev = Some(v);
    }
    total
}

#[test]
fn server_metrics_from_recorded_vllm_body_reach_agent_and_collector() {
    let name = "server_metrics_from_recorded_vllm_body_reach_agent_and_collector";
    if !prereq::agent_test(name) || !prereq::check(name, prereq::missing_collector()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let body_path = fixture("server_metrics/vllm-0.32.0-cpu-preempting.prom");
    let body = std::fs::read_to_string(&body_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("scrapes.jsonl");
    // Counters advance per scrape; after 4 scrapes they start over (a server restart).
    let server = ScriptedServer::start_with(
        &json!({"default": {"ttft_ms": 5, "itl_ms": 2, "tokens": 4}}),
        &[
            "--metrics-file",
            body_path.to_str().unwrap(),
            "--metrics-advance",
            "vllm:num_preemptions_total=3",
            "--metrics-advance",
            "vllm:prefix_cache_hits_total=40",
            "--metrics-advance",
            "vllm:prefix_cache_queries_total=100",
            "--metrics-reset-after",
            "4",
            "--metrics-log",
            log.to_str().unwrap(),
        ],
    )
    .unwrap();
    let collector = Collector::spawn().unwrap();
    let mut o = AgentOptions::pid(server.pid());
    o.collector = Some(collector.url());
    o.interval = Some("1s".into());
    o.node = Some("srv-node".into());
    let agent = Agent::spawn(&quiet(o, &["--log", "info,infertap::server_metrics=debug"])).unwrap();
    // User traffic next to the scrapes.
    let specs: Vec<RequestSpec> = (0..6)
        .map(|_| RequestSpec::new(Endpoint::Chat, 4))
        .collect();
    run_sequences_blocking(server.addr(), vec![specs]).unwrap();
    wait_for(WAIT, "6 scrapes", || {
        (scrapes(&log).len() >= 6).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    // Allow the agent to publish the last scrape it read.
    std::thread::sleep(Duration::from_millis(600));
    let port = server.port.to_string();
    let sel = [
        ("engine", "vllm"),
        ("model_name", "smollm2-135m"),
        ("server_port", port.as_str()),
    ];
    let m = agent.metrics().unwrap();
    // Gauges: exactly what the body says (the recorded body's own values).
    for (ours, theirs) in [
        (
            "infertap_server_kv_cache_usage_ratio",
            "vllm:kv_cache_usage_perc",
        ),
        (
            "infertap_server_requests_running",
            "vllm:num_requests_running",
        ),
        (
            "infertap_server_requests_waiting",
            "vllm:num_requests_waiting",
        ),
    ] {
        assert_eq!(
            one(&m, ours, &sel),
            Some(served(&body, theirs).unwrap()),
            "{ours}"
        );
    }
    // Prefix-cache hit ratio between two reads: 40 more hits of 100 more queried tokens.
    assert_eq!(
        one(&m, "infertap_server_prefix_cache_hit_ratio", &sel),
        Some(0.4)
    );
    // vLLM exports no batch size.
    assert_eq!(one(&m, "infertap_server_batch_size", &sel), None);
    // The agent's scrapes are not requests: 6 user requests, no /metrics record.
    assert_eq!(m.sum("infertap_requests_total", &[]), 6.0);
    let recs = agent.records().unwrap();
    assert_eq!(
        recs.len(),
        6,
        "{:?}",
        recs.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    assert!(recs.iter().all(|r| r.path != "/metrics"));
    let all = scrapes(&log);
    assert!(
        all.iter()
            .all(|s| !recs.iter().any(|r| r.peer.as_deref() == Some(&s.peer))),
        "a scrape connection was reported as a request"
    );
    // At most one scrape per interval (1 s): the agent ran for a while, compare with its age.
    let n = all.len();
    let exit_before = agent.metrics().unwrap();
    let agent_total = one(&exit_before, "infertap_server_preemptions_total", &sel).unwrap();
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{}", exit.log);
    let all = scrapes(&log);
    // The agent's counter is the sum of the increases between the bodies it read, restarts
    // carried over; it read every scrape but possibly the last one (in flight at stop).
    let bodies: Vec<&str> = all.iter().map(|s| s.body.as_str()).collect();
    let full = counted(&bodies, "vllm:num_preemptions_total");
    let but_last = counted(&bodies[..bodies.len() - 1], "vllm:num_preemptions_total");
    let fleet = collector.metrics().unwrap();
    let mut at_collector = sel.to_vec();
    at_collector.push(("node", "srv-node"));
    let total = one(&fleet, "infertap_server_preemptions_total", &at_collector).unwrap();
    eprintln!(
        "{} scrapes ({n} before stop); preemptions counted: agent {agent_total} before stop, collector {total}, bodies say {but_last}..{full}",
        all.len()
    );
    assert!(
        total == full || total == but_last,
        "{total} not in {{{but_last}, {full}}}"
    );
    assert!(total >= agent_total);
    assert!(all.iter().map(|s| s.scrape).eq(0..all.len() as u64));
    // Exactly one "no engine metrics" debug line at most (none here: the server has them).
    assert_eq!(
        exit.log.matches("no engine metrics on /metrics").count(),
        0,
        "{}",
        exit.log
    );
}

#[test]
fn server_metrics_of_two_nodes_stay_apart_at_the_collector() {
    let name = "server_metrics_of_two_nodes_stay_apart_at_the_collector";
    if !prereq::agent_test(name) || !prereq::check(name, prereq::missing_collector()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let body_path = fixture("server_metrics/vllm-0.32.0-cpu-under-load.prom");
    let body = std::fs::read_to_string(&body_path).unwrap();
    let server =
        ScriptedServer::start_with(&json!({}), &["--metrics-file", body_path.to_str().unwrap()])
            .unwrap();
    let collector = Collector::spawn().unwrap();
    let agents: Vec<Agent> = ["srv-a", "srv-b"]
        .iter()
        .map(|node| {
            let mut o = AgentOptions::pid(server.pid());
            o.collector = Some(collector.url());
            o.interval = Some("1s".into());
            o.node = Some((*node).into());
            Agent::spawn(&quiet(o, &[])).unwrap()
        })
        .collect();
    let want = served(&body, "vllm:kv_cache_usage_perc").unwrap();
    let fleet = wait_for(WAIT, "both nodes' server series on the collector", || {
        let m = collector.metrics().ok()?;
        (labels_of(&m, "infertap_server_kv_cache_usage_ratio").len() == 2).then_some(m)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agents[0].log()));
    for node in ["srv-a", "srv-b"] {
        assert_eq!(
            one(
                &fleet,
                "infertap_server_kv_cache_usage_ratio",
                &[("node", node), ("engine", "vllm")]
            ),
            Some(want)
        );
        assert_eq!(
            one(
                &fleet,
                "infertap_server_requests_waiting",
                &[("node", node), ("model_name", "smollm2-135m")]
            ),
            served(&body, "vllm:num_requests_waiting")
        );
    }
}

#[test]
fn server_without_metrics_endpoint_yields_no_series() {
    let name = "server_without_metrics_endpoint_yields_no_series";
    if !prereq::agent_test(name) || !prereq::check(name, prereq::missing_real_server()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = LlamaServer::start(2).unwrap();
    let mut o = AgentOptions::pid(server.pid());
    o.interval = Some("1s".into());
    let agent = Agent::spawn(&quiet(o, &["--log", "info,infertap::server_metrics=debug"])).unwrap();
    let specs: Vec<RequestSpec> = (0..2)
        .map(|_| RequestSpec::new(Endpoint::Chat, 4))
        .collect();
    run_sequences_blocking(server.addr(), vec![specs]).unwrap();
    // Several intervals: the first try fails, the back-off retries (2 s, 4 s) too.
    std::thread::sleep(Duration::from_secs(5));
    let m = agent.metrics().unwrap();
    let ours: Vec<_> = m
        .samples
        .iter()
        .filter(|s| s.name.starts_with("infertap_server_"))
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
    assert_eq!(m.sum("infertap_requests_total", &[]), 2.0);
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{}", exit.log);
    let lines: Vec<&str> = exit
        .log
        .lines()
        .filter(|l| l.contains("server_metrics"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("DEBUG") && lines[0].contains("no engine metrics on /metrics"));
}

/// Against a live vLLM (CPU build) when one is installed in `~/.cache/infertap/vllm-venv` with
/// the SmolLM2 model converted next to it (`~/.cache/infertap/vllm-model/smollm2-135m`).
/// Not part of CI: SKIP when absent, even with CI=true.
#[test]
fn live_vllm_server_metrics() {
    let name = "live_vllm_server_metrics";
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let base = Path::new(&home).join(".cache/infertap");
    let python = base.join("vllm-venv/bin/python");
    let model = base.join("vllm-model/smollm2-135m");
    if !python.is_file() || !model.is_dir() {
        eprintln!(
            "SKIP {name}: no vLLM venv at {} or model at {}",
            python.display(),
            model.display()
        );
        return;
    }
    if !prereq::agent_test(name) {
        return;
    }
    let _g = prereq::e2e_lock();
    let port = free_port().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut vllm = Command::new(&python)
        .args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
        .arg(&model)
        .args([
            "--served-model-name",
            "smollm2-135m",
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "2048",
            "--gpu-memory-utilization",
            "0.15",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .env("HF_HUB_OFFLINE", "1")
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: SIGINT to our own child: vLLM stops its engine processes itself.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
            let _ = wait_for(Duration::from_secs(30), "vLLM exit", || {
                self.0.try_wait().ok().flatten()
            });
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = vllm.id();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let up = wait_for(Duration::from_secs(600), "vLLM health", || {
        if let Ok(Some(st)) = vllm.try_wait() {
            return Some(Err(format!("vLLM exited: {st}")));
        }
        infertap_tests::servers::http_get(addr, "/health")
            .ok()
            .filter(|(s, _)| *s == 200)
            .map(|_| Ok(()))
    });
    let _vllm = Kill(vllm);
    if let Err(e) = up.map_err(|e| e.to_string()).and_then(|r| r) {
        panic!(
            "{e}\n{}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
    }
    let mut o = AgentOptions::pid(pid);
    o.ports = vec![port];
    o.interval = Some("1s".into());
    let agent = Agent::spawn(&quiet(o, &[])).unwrap();
    let specs: Vec<Vec<RequestSpec>> = (0..4)
        .map(|_| {
            (0..3)
                .map(|_| {
                    let mut s = RequestSpec::new(Endpoint::Chat, 64);
                    s.model = Some("smollm2-135m".into());
                    s
                })
                .collect()
        })
        .collect();
    let p = port.to_string();
    let sel = [
        ("engine", "vllm"),
        ("model_name", "smollm2-135m"),
        ("server_port", p.as_str()),
    ];
    // Under load: what the agent re-exports follows vLLM's own scheduler (4 sequences at once).
    let load = std::thread::spawn(move || run_sequences_blocking(addr, specs));
    let (mut max_running, mut max_kv, mut polls) = (0.0f64, 0.0f64, 0);
    while !load.is_finished() {
        if let Ok(m) = agent.metrics() {
            polls += 1;
            max_running =
                max_running.max(one(&m, "infertap_server_requests_running", &sel).unwrap_or(0.0));
            max_kv =
                max_kv.max(one(&m, "infertap_server_kv_cache_usage_ratio", &sel).unwrap_or(0.0));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    load.join().unwrap().unwrap();
    eprintln!("live vLLM under load ({polls} polls of the agent): requests running up to {max_running}, KV cache usage up to {max_kv}");
    assert!((2.0..=4.0).contains(&max_running), "{max_running}");
    assert!(max_kv > 0.0 && max_kv <= 1.0, "{max_kv}");
    std::thread::sleep(Duration::from_secs(3));
    let m = agent.metrics().unwrap();
    let (_, body) = infertap_tests::servers::http_get(addr, "/metrics").unwrap();
    for (ours, theirs) in [
        (
            "infertap_server_kv_cache_usage_ratio",
            "vllm:kv_cache_usage_perc",
        ),
        (
            "infertap_server_requests_running",
            "vllm:num_requests_running",
        ),
        (
            "infertap_server_requests_waiting",
            "vllm:num_requests_waiting",
        ),
    ] {
        let (a, b) = (one(&m, ours, &sel), served(&body, theirs));
        eprintln!("live vLLM: {ours} = {a:?}, vLLM's {theirs} = {b:?}");
        // Idle after the load: both read the same settled value.
        assert_eq!(a, b, "{ours}");
    }
    eprintln!(
        "live vLLM: prefix-cache hit ratio {:?}, preemptions {:?}, requests seen {}",
        one(&m, "infertap_server_prefix_cache_hit_ratio", &sel),
        one(&m, "infertap_server_preemptions_total", &sel),
        m.sum("infertap_requests_total", &[])
    );
    let recs = agent.records().unwrap();
    let other: Vec<_> = recs
        .iter()
        .filter(|r| r.path != "/v1/chat/completions")
        .map(|r| (r.method.clone(), r.path.clone(), r.peer.clone()))
        .collect();
    eprintln!("live vLLM: records other than the 12 chat completions: {other:?}");
    assert_eq!(recs.len() - other.len(), 12);
    // None of the agent's own scrapes (the test's own GET /metrics above is a client like
    // any other, and may be one).
    assert!(other.len() <= 1, "{other:?}");
}
