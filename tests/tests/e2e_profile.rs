//! Continuous profiling end to end, through the agent binary, on the real llama.cpp server
//! (llama-cpp-python: a CPython 3.11 uvicorn server calling llama.cpp/ggml built without frame
//! pointers), read back by the reference consumer, `go tool pprof`:
//!
//! - `infertap profile` during decode: the server's samples are dominated by ggml/llama compute
//!   functions (≥ 50 % of the leaf time), with Python frames of `llama_cpp` merged in; a profile
//!   of the idle server shows no compute at all;
//! - the long-running agent streams each interval's profiles to a real collector, which serves
//!   merged pprof that `go tool pprof` reads, and the agent's metrics count samples and unwinds;
//! - `infertap explain` on this CPU-only server names the code that ran in TTFT and slow gaps.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use infertap_tests::agent::{Agent, AgentOptions, Collector};
use infertap_tests::collector_support::http_get_bytes;
use infertap_tests::load::{run_load_blocking, EndpointMix, LoadConfig};
use infertap_tests::servers::{LlamaServer, MODEL_ALIAS};
use infertap_tests::tools::{go_pprof, missing_go};
use infertap_tests::{paths, prereq};

/// Leaf functions that are llama.cpp/ggml model compute (matrix products, quantized dot
/// products, attention, norms), as opposed to the HTTP server, Python or the kernel.
fn is_compute(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.starts_with("ggml_")
        || n.contains("libggml")
        || n.starts_with("llama_")
        || n.contains("quantize_row")
        || n.contains("gemm")
        || n.contains("gemv")
}

/// The OpenMP runtime ggml runs its compute graph on (libgomp is stripped: its frames are
/// `libgomp.so.1+0x…`): workers spinning at or sleeping in the graph's barriers. On a busy
/// 2-core machine this can be most of the decode time; it is llama.cpp's compute, not the
/// server's.
fn is_compute_runtime(name: &str) -> bool {
    name.contains("libgomp") || name.starts_with("GOMP_") || name.starts_with("gomp_")
}

/// `go tool pprof -top` rows: (flat samples, function name).
fn top_by_samples(file: &Path) -> (u64, Vec<(u64, String)>) {
    let out = go_pprof(
        &["-top", "-nodecount=100000", "-sample_index=samples"],
        file,
    )
    .unwrap();
    let mut total = 0;
    let mut rows = Vec::new();
    for line in out.lines() {
        if let Some(rest) = line.trim().strip_prefix("Showing nodes accounting for ") {
            // "N, P% of T total"
            if let Some(t) = rest.split(" of ").nth(1) {
                total = t
                    .split_whitespace()
                    .next()
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0);
            }
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 6 && cols[1].ends_with('%') && cols[4].ends_with('%') {
            if let Ok(flat) = cols[0].parse::<u64>() {
                rows.push((flat, cols[5..].join(" ")));
            }
        }
    }
    (total, rows)
}

/// Runs `infertap profile` on `pid` for `secs` seconds, every type into `dir`.
fn profile(pid: u32, secs: u64, dir: &Path) -> String {
    let bin = paths::agent_binary().unwrap();
    let out = Command::new(bin)
        .args(["profile", "--pid", &pid.to_string()])
        .args(["--duration", &format!("{secs}s")])
        .arg("--out")
        .arg(dir.join("main.pb.gz"))
        .arg("--out-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "infertap profile failed: {log}");
    log
}

fn load(server: &LlamaServer, requests: u64, concurrency: u32) -> LoadConfig {
    let mut cfg = LoadConfig::new(server.addr());
    cfg.model = Some(MODEL_ALIAS.into());
    cfg.concurrency = concurrency;
    cfg.requests = Some(requests);
    cfg.max_tokens = 48;
    cfg.endpoint = EndpointMix::Mixed;
    cfg
}

fn prereqs(name: &str) -> bool {
    prereq::agent_test(name)
        && prereq::check(name, prereq::missing_real_server())
        && prereq::check(name, missing_go())
}

#[test]
fn llama_server_profile_during_decode_and_idle() {
    let name = "llama_server_profile_during_decode_and_idle";
    if !prereqs(name) {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = LlamaServer::start(2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let busy = dir.path().join("busy");
    let mut cfg = load(&server, 0, 2);
    // The load outlasts the profile window on both sides.
    cfg.requests = None;
    cfg.duration = Some(Duration::from_secs(14));
    let pid = server.pid();
    let loader = std::thread::spawn(move || run_load_blocking(&cfg).unwrap());
    std::thread::sleep(Duration::from_secs(2));
    let log = profile(pid, 10, &busy);
    let client = loader.join().unwrap();
    assert!(
        client.iter().any(|c| c.output_tokens > 1),
        "no tokens streamed"
    );

    let cpu = busy.join("cpu.pb.gz");
    let (total, rows) = top_by_samples(&cpu);
    assert!(total > 100, "only {total} CPU samples during decode\n{log}");
    let kernels: u64 = rows
        .iter()
        .filter(|(_, n)| is_compute(n))
        .map(|r| r.0)
        .sum();
    let runtime: u64 = rows
        .iter()
        .filter(|(_, n)| is_compute_runtime(n))
        .map(|r| r.0)
        .sum();
    let share = (kernels + runtime) as f64 / total as f64;
    eprintln!(
        "decode: {total} samples; llama.cpp/ggml {:.1} % of them ({:.1} % in ggml/llama functions, {:.1} % in its OpenMP runtime); top: {:?}",
        100.0 * share,
        100.0 * kernels as f64 / total as f64,
        100.0 * runtime as f64 / total as f64,
        &rows[..rows.len().min(8)]
    );
    assert!(
        share >= 0.5,
        "llama.cpp/ggml compute is {:.1} % of the server's samples: {rows:?}",
        100.0 * share
    );
    assert!(
        kernels > 0,
        "no ggml/llama function among the leaves: {rows:?}"
    );
    // Python frames of the llama_cpp package, with their source files.
    let files = go_pprof(&["-top", "-filefunctions", "-nodecount=100000"], &cpu).unwrap();
    assert!(
        files
            .lines()
            .any(|l| l.contains("Llama.") && l.contains("llama_cpp/llama.py")),
        "no llama_cpp Python frames:\n{files}"
    );
    let p = infertap_proto::pprof::decode(&std::fs::read(&cpu).unwrap(), 64 << 20).unwrap();
    let with_python = p
        .sample
        .iter()
        .filter(|s| {
            s.location_id.iter().any(|id| {
                let l = &p.location[*id as usize - 1];
                l.mapping_id == 0
                    && l.line.iter().any(|ln| {
                        let f = &p.function[ln.function_id as usize - 1];
                        p.string_table[f.filename as usize].ends_with(".py")
                    })
            })
        })
        .map(|s| s.value[0])
        .sum::<i64>();
    let all: i64 = p.sample.iter().map(|s| s.value[0]).sum();
    eprintln!(
        "samples with at least one Python frame: {:.1} % ({with_python}/{all})",
        100.0 * with_python as f64 / all.max(1) as f64
    );
    assert!(with_python > 0);
    for t in ["offcpu", "slow_tokens"] {
        let f = busy.join(format!("{t}.pb.gz"));
        if f.exists() {
            go_pprof(&["-top"], &f).unwrap_or_else(|e| panic!("{t}: {e:#}"));
        }
    }

    // Idle: nothing computes.
    let idle = dir.path().join("idle");
    profile(pid, 5, &idle);
    // `--out` is written even when the window had no samples (then it is an empty profile).
    let (itotal, irows) = top_by_samples(&idle.join("main.pb.gz"));
    let icompute: u64 = irows
        .iter()
        .filter(|(_, n)| is_compute(n) || is_compute_runtime(n))
        .map(|r| r.0)
        .sum();
    eprintln!("idle: {itotal} samples, compute {icompute}: {irows:?}");
    assert!(icompute <= 1, "compute while idle: {irows:?}");
}

#[test]
fn continuous_profiles_reach_the_collector() {
    let name = "continuous_profiles_reach_the_collector";
    if !prereqs(name) || !prereq::check(name, prereq::missing_collector()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = LlamaServer::start(2).unwrap();
    let collector = Collector::spawn().unwrap();
    let mut opts = AgentOptions::pid(server.pid());
    opts.collector = Some(collector.url());
    opts.interval = Some("2s".into());
    let agent = Agent::spawn(&opts).unwrap();
    run_load_blocking(&load(&server, 8, 2)).unwrap();
    // Two more intervals so the last profiles are built and sent.
    std::thread::sleep(Duration::from_secs(5));
    let m = agent.metrics().unwrap();
    let cpu_samples = m.sum("infertap_profile_samples_total", &[("kind", "cpu")]);
    let complete = m.sum("infertap_profile_stacks_total", &[("result", "complete")]);
    let stacks = m.sum("infertap_profile_stacks_total", &[]);
    eprintln!(
        "agent: {cpu_samples} CPU samples, {complete}/{stacks} stacks complete ({:.1} %)",
        100.0 * complete / stacks.max(1.0)
    );
    assert!(cpu_samples > 50.0, "{cpu_samples}");
    assert!(
        m.sum(
            "infertap_profile_python_samples_total",
            &[("result", "with_frames")]
        ) > 0.0
    );
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{}", exit.log);

    let dir = tempfile::tempdir().unwrap();
    for t in ["cpu", "offcpu"] {
        let a = http_get_bytes(
            collector.metrics_addr,
            &format!("/pprof/profile?type={t}&from=-10m"),
        )
        .unwrap();
        assert_eq!(a.status, 200, "{t}: {}", a.text());
        let f: PathBuf = dir.path().join(format!("{t}.pb.gz"));
        std::fs::write(&f, &a.body).unwrap();
        let top = go_pprof(&["-top", "-nodecount=30"], &f).unwrap();
        eprintln!("collector {t}:\n{top}");
        if t == "cpu" {
            assert!(top.lines().any(is_compute_line), "{top}");
        }
    }
}

fn is_compute_line(l: &str) -> bool {
    l.split_whitespace().last().is_some_and(is_compute)
}

#[test]
fn explain_names_the_code_in_slow_gaps_of_a_cpu_only_server() {
    let name = "explain_names_the_code_in_slow_gaps_of_a_cpu_only_server";
    if !prereqs(name) {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = LlamaServer::start(2).unwrap();
    let bin = paths::agent_binary().unwrap();
    let child = Command::new(bin)
        .args([
            "explain",
            "--pid",
            &server.pid().to_string(),
            "--duration",
            "20s",
        ])
        .args(["--top", "3", "--rank-by", "ttft"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // Six concurrent streams: requests queue for the model, so TTFTs and some gaps are long.
    run_load_blocking(&load(&server, 12, 6)).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    eprintln!("{text}");
    let conc: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("mean concurrency ").nth(1))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    assert!(!conc.is_empty(), "{text}");
    assert!(
        conc.iter().any(|&c| c > 1.5),
        "concurrency {conc:?}\n{text}"
    );
    assert!(
        !text.contains("GPU busy"),
        "GPU lines without a GPU source:\n{text}"
    );
    assert!(
        text.contains("TTFT") && text.contains("CPU: on-CPU"),
        "{text}"
    );
    // The slowest TTFTs were spent computing (other requests' tokens): the largest on-CPU
    // share of a TTFT is ggml/llama compute, reached from llama_cpp's Python code.
    let first_on_cpu: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("on-CPU "))
        .collect();
    assert!(!first_on_cpu.is_empty(), "{text}");
    assert!(
        first_on_cpu.iter().any(|l| l.contains("ggml_")),
        "no compute in the attribution:\n{text}"
    );
}

/// Bad input in one process tree (`tests/fixtures/profile/churn.c`): a stripped program built
/// without unwind tables or frame pointers, a library deleted from disk after `dlopen`, and a
/// stream of children that exit within 30 ms. The agent keeps running, writes a profile
/// `go tool pprof` reads, names the deleted library's function, shows the children's samples,
/// and marks the stacks it could not unwind as cut instead of dropping them.
#[test]
fn profile_survives_vanishing_processes_deleted_libraries_and_unwindable_code() {
    let name = "profile_survives_vanishing_processes_deleted_libraries_and_unwindable_code";
    if !prereq::agent_test(name) || !prereq::check(name, missing_go()) {
        return;
    }
    if Command::new("gcc").arg("--version").output().is_err() {
        prereq::check(name, Some("gcc not found".into()));
        return;
    }
    let _g = prereq::e2e_lock();
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/profile");
    let lib = dir.path().join("libchurn.so");
    let exe = dir.path().join("churn");
    let gcc = |args: &[&str]| {
        let out = Command::new("gcc").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "gcc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    gcc(&[
        "-O1",
        "-shared",
        "-fPIC",
        "-o",
        lib.to_str().unwrap(),
        fixtures.join("churn_lib.c").to_str().unwrap(),
    ]);
    gcc(&[
        "-O1",
        "-fomit-frame-pointer",
        "-fno-asynchronous-unwind-tables",
        "-fno-unwind-tables",
        "-s",
        "-o",
        exe.to_str().unwrap(),
        fixtures.join("churn.c").to_str().unwrap(),
        "-ldl",
    ]);
    let mut child = Command::new(&exe)
        .arg(&lib)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    assert!(!lib.exists(), "the library is deleted");
    let out = dir.path().join("out");
    let log = profile(child.id(), 6, &out);
    let _ = child.kill();
    let _ = child.wait();
    let cpu = out.join("cpu.pb.gz");
    let top = go_pprof(&["-top", "-nodecount=100000"], &cpu).unwrap();
    eprintln!("{top}");
    assert!(
        top.starts_with("File: churn"),
        "the traced program is the profile's main binary:\n{top}"
    );
    assert!(
        top.contains("infertap_deleted_library_burn"),
        "the deleted library's function is not named:\n{top}\n{log}"
    );
    assert!(
        top.contains("[truncated: "),
        "stacks through code without unwind information are not marked as cut:\n{top}"
    );
    let pids = go_pprof(&["-tags"], &cpu).unwrap();
    let pid_lines = pids
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("pid:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty() && l.contains('%'))
        .count();
    assert!(
        pid_lines >= 3,
        "samples of the short-lived children are missing (pids):\n{pids}"
    );
}
