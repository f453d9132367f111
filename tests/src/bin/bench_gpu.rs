//! `cargo xtask bench` (GPU part): what the GPU-side instrumentation costs.
//!
//! - CUDA launch-path uprobes: ns added per `cuLaunchKernel` in the agent's default (in-kernel
//!   aggregate) mode and in per-event mode, on stand-in `libcuda.so.1` builds whose entry points
//!   start the way real driver builds do (`endbr64; push %rbp`) and with a prologue the kernel
//!   has to single-step; and what that adds to a simulated decode step of 1000 launches + sync.
//! - NVML sampler: CPU of its thread at the default periods (against the fake NVML library, so
//!   this is infertap's own cost; real driver calls add to it).
//! - CUPTI injection library: ns per activity record of its own processing (decode + encode).
//!
//! Needs root and a built agent. Prints a table; JSON in target/bench/gpu-latest.json.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use infertap_tests::paths;
use serde::Serialize;

const ROUNDS: usize = 3;

fn cc(args: &[&str], out: &Path, src: &Path) -> Result<()> {
    let ok = Command::new("cc")
        .args(args)
        .arg("-o")
        .arg(out)
        .arg(src)
        .arg("-ldl")
        .status()?
        .success();
    if !ok {
        bail!("cc {args:?} {} failed", src.display());
    }
    Ok(())
}

/// One run of the launch microbenchmark; `mode` is none, aggregate or events.
fn launch_run(bench: &Path, lib: &Path, mode: &str, steps: u32) -> Result<f64> {
    let mut child = Command::new(bench)
        .arg(lib)
        .arg(steps.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line)?;
    let pid: u32 = line
        .trim()
        .strip_prefix("ready ")
        .context("bench handshake")?
        .parse()?;
    let mut agent = None;
    if mode != "none" {
        let ready = std::env::temp_dir().join(format!("infertap-bench-gpu-{pid}.ready"));
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(paths::agent_binary()?);
        cmd.args([
            "--pid",
            &pid.to_string(),
            "--metrics-addr",
            "off",
            "--cupti-socket",
            "off",
            "--no-nvml",
        ])
        .arg("--cuda-lib")
        .arg(lib)
        .arg("--ready-file")
        .arg(&ready)
        .args(["--log", "warn"]);
        if mode == "events" {
            cmd.arg("--cuda-events");
        }
        let a = cmd.spawn()?;
        let t0 = Instant::now();
        while !ready.exists() {
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("agent not ready");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        agent = Some(a);
    }
    child.stdin.as_mut().unwrap().write_all(b"go\n")?;
    line.clear();
    out.read_line(&mut line)?;
    child.wait()?;
    if let Some(mut a) = agent {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(a.id() as i32, libc::SIGINT) };
        a.wait()?;
    }
    let v: serde_json::Value = serde_json::from_str(line.trim()).context("bench output")?;
    v["ns_per_launch"].as_f64().context("ns_per_launch")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Serialize)]
struct LaunchCost {
    prologue: &'static str,
    baseline_ns: f64,
    aggregate_added_ns: f64,
    events_added_ns: f64,
    /// Added to a 1000-launch step by the default (aggregate) mode, in µs.
    aggregate_us_per_1000_launch_step: f64,
}

#[derive(Serialize)]
struct Report {
    launch: Vec<LaunchCost>,
    nvml_sampler_cpu_percent_of_core: f64,
    cupti_ns_per_record: f64,
    cupti_wire_bytes_per_record: f64,
}

fn nvml_cost(dir: &Path) -> Result<f64> {
    let lib = dir.join("libnvidia-ml.so.1");
    let src = paths::workspace_root().join("tests/fixtures/fake_nvml.c");
    let ok = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()?
        .success();
    if !ok {
        bail!("building the fake NVML library");
    }
    let secs = 20;
    let mut a = Command::new(paths::agent_binary()?)
        .args([
            "--pid",
            "1",
            "--metrics-addr",
            "off",
            "--cupti-socket",
            "off",
            "--no-cuda",
            "--log",
            "warn",
        ])
        .arg("--nvml-lib")
        .arg(&lib)
        .spawn()?;
    std::thread::sleep(Duration::from_secs(secs));
    let mut ticks = 0u64;
    for t in std::fs::read_dir(format!("/proc/{}/task", a.id()))? {
        let t = t?.path();
        if std::fs::read_to_string(t.join("comm"))?.trim() == "infertap-nvml" {
            let stat = std::fs::read_to_string(t.join("stat"))?;
            let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
                .split_whitespace()
                .collect();
            ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
        }
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(a.id() as i32, libc::SIGINT) };
    a.wait()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz / secs as f64 * 100.0)
}

fn cupti_cost() -> (f64, f64) {
    use cudarc::cupti::sys;
    use infertap_cupti::{
        records::decode_record,
        wire::{encode_frame, Frame},
    };
    let name = std::ffi::CString::new("void gemm_kernel<128, 128>(float const*, float*)").unwrap();
    const N: usize = 200_000;
    let records: Vec<Vec<u8>> = (0..N as u64)
        .map(|i| {
            // SAFETY: CUPTI records are plain C structs; all-zero is valid.
            let mut k: sys::CUpti_ActivityKernel9 = unsafe { std::mem::zeroed() };
            k.kind = sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;
            k.start = 1_000_000 + i * 10_000;
            k.end = k.start + 7_000;
            k.correlationId = i as u32;
            k.name = name.as_ptr();
            // SAFETY: the struct's bytes.
            unsafe {
                std::slice::from_raw_parts(
                    (&k as *const sys::CUpti_ActivityKernel9).cast::<u8>(),
                    std::mem::size_of_val(&k),
                )
            }
            .to_vec()
        })
        .collect();
    let mut best = f64::MAX;
    let mut bytes = 0;
    for _ in 0..5 {
        let mut out = Vec::with_capacity(N * 96);
        let mut batch = Vec::with_capacity(1024);
        let t0 = Instant::now();
        for r in &records {
            batch.push(
                decode_record(std::hint::black_box(r))
                    .expect("valid record")
                    .activity,
            );
            if batch.len() == 1024 {
                encode_frame(&Frame::Activities(std::mem::take(&mut batch)), &mut out);
            }
        }
        encode_frame(&Frame::Activities(batch), &mut out);
        best = best.min(t0.elapsed().as_nanos() as f64 / N as f64);
        bytes = out.len();
    }
    (best, bytes as f64 / N as f64)
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench_gpu needs root (eBPF)");
    }
    let dir = tempfile::tempdir()?;
    let fx = paths::workspace_root().join("tests/fixtures/cuda");
    let bench: PathBuf = dir.path().join("bench_launch");
    cc(&["-O2"], &bench, &fx.join("bench_launch.c"))?;
    // (prologue, compiler flags, decode steps per run): the single-stepped case is ~100× slower.
    let variants = [
        (
            "endbr64; push (CET build with frame setup, as driver entry points)",
            vec!["-O0", "-fcf-protection=full"],
            2000,
        ),
        (
            "push %rbp (emulated by the kernel)",
            vec!["-O0", "-fcf-protection=none"],
            2000,
        ),
        (
            "mov (single-stepped by the kernel)",
            vec!["-O1", "-fcf-protection=none"],
            40,
        ),
    ];
    let mut launch = Vec::new();
    for (i, (prologue, flags, steps)) in variants.iter().enumerate() {
        let vdir = dir.path().join(format!("v{i}"));
        std::fs::create_dir_all(&vdir)?;
        let lib = vdir.join("libcuda.so.1");
        let mut args = vec!["-shared", "-fPIC"];
        args.extend(flags.iter().copied());
        let ok = Command::new("cc")
            .args(&args)
            .arg("-o")
            .arg(&lib)
            .arg(fx.join("stub_driver.c"))
            .status()?
            .success();
        if !ok {
            bail!("building the stub driver");
        }
        let m = |mode: &str| -> Result<f64> {
            let v: Result<Vec<f64>> = (0..ROUNDS)
                .map(|_| launch_run(&bench, &lib, mode, *steps))
                .collect();
            Ok(median(v?))
        };
        let base = m("none")?;
        let agg = m("aggregate")?;
        let ev = m("events")?;
        launch.push(LaunchCost {
            prologue,
            baseline_ns: base,
            aggregate_added_ns: agg - base,
            events_added_ns: ev - base,
            aggregate_us_per_1000_launch_step: (agg - base) * 1001.0 / 1000.0,
        });
    }
    let nvml = nvml_cost(dir.path())?;
    let (cupti_ns, cupti_bytes) = cupti_cost();
    let report = Report {
        launch,
        nvml_sampler_cpu_percent_of_core: nvml,
        cupti_ns_per_record: cupti_ns,
        cupti_wire_bytes_per_record: cupti_bytes,
    };
    println!("CUDA launch-path uprobes (ns added per cuLaunchKernel; median of {ROUNDS} runs of steps of 1000 launches + 1 sync):");
    println!(
        "  {:<70} {:>9} {:>11} {:>9} {:>16}",
        "entry prologue", "baseline", "aggregate", "events", "µs/1000-step"
    );
    for l in &report.launch {
        println!(
            "  {:<70} {:>9.1} {:>11.1} {:>9.1} {:>16.1}",
            l.prologue,
            l.baseline_ns,
            l.aggregate_added_ns,
            l.events_added_ns,
            l.aggregate_us_per_1000_launch_step
        );
    }
    println!("NVML sampler thread (100 ms power, 1 s device readings, fake library): {nvml:.3}% of a core");
    println!("CUPTI injection library, own processing: {cupti_ns:.1} ns/record, {cupti_bytes:.0} wire bytes/record");
    let out = paths::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("gpu-latest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("JSON: {}", out.join("gpu-latest.json").display());
    Ok(())
}
