//! `cargo xtask bench` (profiling part): what continuous profiling costs and how well it unwinds,
//! on the real llama.cpp server (llama-cpp-python: CPython calling llama.cpp/ggml, no frame
//! pointers).
//!
//! - Interleaved pairs of runs under the same streaming load: the agent with profiling (its
//!   defaults: 49 Hz on-CPU, off-CPU 1 in 16, profiles every interval into a directory) and the
//!   agent with `--no-profile`, order alternating. Per pair: server tokens/s and agent CPU.
//!   Reported: tokens/s ratio (mean and spread over pairs), agent CPU added by profiling.
//! - Unwind success from the profiles themselves: the share of samples whose native stack
//!   reached main / thread start (no `[truncated: …]` root), for samples in llama.cpp code
//!   (leaf in libllama/libggml) and for the rest of the Python server.
//! - Per-sample cost: in the kernel from `bpf_stats` (run time ÷ run count of the sampling
//!   programs, `kernel.bpf_stats_enabled` switched on for the bench), in user space from the CPU
//!   time of the profiler's threads ÷ samples they processed.
//!
//! Prints a table and writes JSON to target/bench/profile-latest.json.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use infertap_tests::agent::{Agent, AgentOptions};
use infertap_tests::load::{run_load_blocking, EndpointMix, LoadConfig};
use infertap_tests::report::{proc_usage, program_stats};
use infertap_tests::servers::{LlamaServer, MODEL_ALIAS};
use infertap_tests::{paths, prereq};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "infertap continuous-profiling cost and unwind benchmark")]
struct Args {
    /// Pairs of runs (profiling on / off, order alternating).
    #[arg(long, default_value_t = 5)]
    pairs: u32,
    /// Length of each run's measured part.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    run_duration: Duration,
    /// Load before each measured part (module parsing, first symbolization, interpreter
    /// discovery happen once per agent start and are not the steady-state cost).
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Concurrent streams of the load.
    #[arg(long, default_value_t = 2)]
    streams: u32,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Extra argument for the profiling runs' agent (repeatable), e.g.
    /// `--agent-arg=--offcpu-hook=classic` to compare the context-switch hooks.
    #[arg(long, allow_hyphen_values = true)]
    agent_arg: Vec<String>,
}

#[derive(Serialize, Default, Clone, Copy)]
struct Run {
    tok_s: f64,
    agent_cpu_pct: f64,
}

#[derive(Serialize, Default)]
struct ProgramCost {
    name: String,
    runs: u64,
    ns_per_run: f64,
}

#[derive(Serialize, Default)]
struct UnwindShare {
    samples: i64,
    complete: i64,
    share: f64,
}

#[derive(Serialize, Default)]
struct Report {
    pairs: Vec<(Run, Run)>,
    tok_s_ratio_mean: f64,
    tok_s_ratio_min: f64,
    tok_s_ratio_max: f64,
    agent_cpu_pct_profiling: f64,
    agent_cpu_pct_no_profiling: f64,
    agent_cpu_pct_added: f64,
    samples_processed: u64,
    user_ns_per_sample: f64,
    kernel: Vec<ProgramCost>,
    unwind_llama_cpp: UnwindShare,
    unwind_python_server: UnwindShare,
    truncated_by_reason: Vec<(String, f64)>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(why) = prereq::missing_root()
        .or_else(prereq::missing_agent)
        .or_else(prereq::missing_real_server)
    {
        anyhow::bail!("bench_profile needs {why}");
    }
    let server = LlamaServer::start(2)?;
    // Run-time statistics of BPF programs are off by default; on for the bench only.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;
    let dir = tempfile::tempdir()?;
    let mut report = Report::default();
    let mut cpu_prof = Vec::new();
    let mut cpu_off = Vec::new();
    let mut profiler_cpu_s = 0.0;
    let mut kernel: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for pair in 0..args.pairs {
        let mut on = Run::default();
        let mut off = Run::default();
        for profiling_first in [pair % 2 == 0, pair % 2 != 0] {
            if profiling_first {
                let (r, prof_cpu, samples) = run(&server, &args, Some(dir.path()), &mut kernel)?;
                on = r;
                profiler_cpu_s += prof_cpu;
                report.samples_processed += samples;
            } else {
                off = run(&server, &args, None, &mut kernel)?.0;
            }
        }
        eprintln!(
            "[bench] pair {pair}: profiling {:.1} tok/s (agent {:.2} % CPU), no profiling {:.1} tok/s (agent {:.2} % CPU)",
            on.tok_s, on.agent_cpu_pct, off.tok_s, off.agent_cpu_pct
        );
        cpu_prof.push(on.agent_cpu_pct);
        cpu_off.push(off.agent_cpu_pct);
        report.pairs.push((on, off));
    }
    let ratios: Vec<f64> = report
        .pairs
        .iter()
        .map(|(a, b)| a.tok_s / b.tok_s)
        .collect();
    report.tok_s_ratio_mean = ratios.iter().sum::<f64>() / ratios.len().max(1) as f64;
    report.tok_s_ratio_min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    report.tok_s_ratio_max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    report.agent_cpu_pct_profiling = mean(&cpu_prof);
    report.agent_cpu_pct_no_profiling = mean(&cpu_off);
    report.agent_cpu_pct_added = report.agent_cpu_pct_profiling - report.agent_cpu_pct_no_profiling;
    report.user_ns_per_sample = 1e9 * profiler_cpu_s / report.samples_processed.max(1) as f64;
    for (name, (runs, ns)) in kernel {
        if runs > 0 {
            report.kernel.push(ProgramCost {
                name,
                runs,
                ns_per_run: ns as f64 / runs as f64,
            });
        }
    }
    unwind_shares(dir.path(), &mut report)?;
    print_report(&report);
    let out = paths::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("profile-latest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    eprintln!(
        "[bench] wrote {}",
        out.join("profile-latest.json").display()
    );
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// One run: (tokens/s and agent CPU, CPU seconds of the profiler's threads, samples processed).
fn run(
    server: &LlamaServer,
    args: &Args,
    profile_dir: Option<&Path>,
    kernel: &mut std::collections::BTreeMap<String, (u64, u64)>,
) -> Result<(Run, f64, u64)> {
    let mut opts = AgentOptions::pid(server.pid());
    match profile_dir {
        Some(d) => {
            opts.extra_args = vec!["--profile-dir".into(), d.display().to_string()];
            opts.extra_args.extend(args.agent_arg.iter().cloned());
        }
        None => opts.extra_args = vec!["--no-profile".into()],
    }
    let agent = Agent::spawn(&opts)?;
    let pid = agent.pid().context("agent pid")?;
    let mut cfg = LoadConfig::new(server.addr());
    cfg.model = Some(MODEL_ALIAS.into());
    cfg.concurrency = args.streams;
    cfg.requests = None;
    cfg.duration = Some(args.warmup);
    cfg.max_tokens = args.max_tokens;
    cfg.endpoint = EndpointMix::Mixed;
    run_load_blocking(&cfg)?;
    cfg.duration = Some(args.run_duration);
    let before = proc_usage(pid).unwrap_or_default();
    let prof_before = profiler_threads_cpu_s(pid);
    let samples_before = samples_so_far(&agent);
    let k0 = program_stats(PROFILER_PROGRAMS);
    let t = Instant::now();
    let recs = run_load_blocking(&cfg)?;
    let wall = t.elapsed().as_secs_f64();
    let after = proc_usage(pid).unwrap_or_default();
    let prof_cpu = profiler_threads_cpu_s(pid) - prof_before;
    // The agent's programs live as long as it does: their statistics are read before it stops.
    for (name, (runs, ns)) in program_stats(PROFILER_PROGRAMS) {
        let (r0, n0) = k0.get(&name).copied().unwrap_or_default();
        let e = kernel.entry(name).or_default();
        e.0 += runs.saturating_sub(r0);
        e.1 += ns.saturating_sub(n0);
    }
    let samples = samples_so_far(&agent).saturating_sub(samples_before);
    // Let the last interval's profiles be written.
    agent.stop()?;
    let tokens: u64 = recs
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.output_tokens)
        .sum();
    Ok((
        Run {
            tok_s: tokens as f64 / wall,
            agent_cpu_pct: 100.0 * (after.cpu_s - before.cpu_s) / wall,
        },
        prof_cpu,
        samples,
    ))
}

fn samples_so_far(agent: &Agent) -> u64 {
    agent
        .metrics()
        .map(|m| m.sum("infertap_profile_samples_total", &[]))
        .unwrap_or(0.0) as u64
}

/// CPU seconds of the agent's profiler threads (`infertap-profiler`, `-pprof`, `-pyfind`).
fn profiler_threads_cpu_s(pid: u32) -> f64 {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("infertap-prof")
            && !comm.starts_with("infertap-pprof")
            && !comm.starts_with("infertap-pyfin")
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let Some(i) = stat.rfind(')') else { continue };
        let f: Vec<&str> = stat[i + 2..].split_whitespace().collect();
        ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    ticks as f64 / hz
}

/// The profiler's programs whose per-run cost is reported.
const PROFILER_PROGRAMS: &[&str] = &[
    "profile_cpu",
    "on_sched_switch",
    "on_switch_raw",
    "cuda_enter",
];

/// Unwind success from the CPU profiles the profiling runs wrote.
fn unwind_shares(dir: &Path, r: &mut Report) -> Result<()> {
    let mut by_reason: std::collections::BTreeMap<String, i64> = Default::default();
    let mut all = 0i64;
    for e in std::fs::read_dir(dir)? {
        let path: PathBuf = e?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.starts_with("cpu-") {
            continue;
        }
        let p = infertap_proto::pprof::decode(&std::fs::read(&path)?, 64 << 20)?;
        let fname = |loc_id: u64| -> Vec<&str> {
            let l = &p.location[loc_id as usize - 1];
            l.line
                .iter()
                .map(|ln| {
                    let f = &p.function[ln.function_id as usize - 1];
                    p.string_table[f.name as usize].as_str()
                })
                .collect()
        };
        let mapping_file = |loc_id: u64| -> &str {
            let l = &p.location[loc_id as usize - 1];
            p.mapping
                .iter()
                .find(|m| m.id == l.mapping_id)
                .map_or("", |m| p.string_table[m.filename as usize].as_str())
        };
        for s in &p.sample {
            let n = s.value[0];
            all += n;
            let root = s
                .location_id
                .last()
                .map(|&id| fname(id))
                .unwrap_or_default();
            let truncated = root.iter().find(|f| f.starts_with("[truncated: "));
            if let Some(t) = truncated {
                *by_reason.entry(t.to_string()).or_default() += n;
            }
            // The leaf's module: the first user-space (non-kernel) location.
            let leaf_module = s
                .location_id
                .iter()
                .map(|&id| mapping_file(id))
                .find(|f| !f.is_empty() && *f != "[kernel.kallsyms]")
                .unwrap_or("");
            let llama = leaf_module.contains("libllama") || leaf_module.contains("libggml");
            let bucket = if llama {
                &mut r.unwind_llama_cpp
            } else {
                &mut r.unwind_python_server
            };
            bucket.samples += n;
            if truncated.is_none() {
                bucket.complete += n;
            }
        }
    }
    for b in [&mut r.unwind_llama_cpp, &mut r.unwind_python_server] {
        b.share = b.complete as f64 / b.samples.max(1) as f64;
    }
    r.truncated_by_reason = by_reason
        .into_iter()
        .map(|(k, v)| (k, 100.0 * v as f64 / all.max(1) as f64))
        .collect();
    Ok(())
}

fn print_report(r: &Report) {
    println!();
    println!(
        "continuous profiling on the real llama.cpp server ({} interleaved pairs)",
        r.pairs.len()
    );
    println!("| measurement | result | target |");
    println!("|---|---|---|");
    println!(
        "| server tokens/s with profiling ÷ without | {:.3} (spread {:.3}–{:.3}) | ≥ 0.99 |",
        r.tok_s_ratio_mean, r.tok_s_ratio_min, r.tok_s_ratio_max
    );
    println!(
        "| agent CPU, profiling / no profiling | {:.2} % / {:.2} % of a core (+{:.2} %) | ≤ +1 % |",
        r.agent_cpu_pct_profiling, r.agent_cpu_pct_no_profiling, r.agent_cpu_pct_added
    );
    println!(
        "| stacks reaching main/thread start: llama.cpp code | {:.1} % of {} samples | ≥ 95 % |",
        100.0 * r.unwind_llama_cpp.share,
        r.unwind_llama_cpp.samples
    );
    println!(
        "| stacks reaching main/thread start: Python server | {:.1} % of {} samples | ≥ 95 % |",
        100.0 * r.unwind_python_server.share,
        r.unwind_python_server.samples
    );
    for (reason, pct) in &r.truncated_by_reason {
        println!("| truncated {reason} | {pct:.1} % of CPU samples | |");
    }
    println!(
        "| user space per sample (profiler threads' CPU ÷ {} samples) | {:.1} µs | |",
        r.samples_processed,
        r.user_ns_per_sample / 1e3
    );
    for k in &r.kernel {
        println!(
            "| kernel per run of {} (bpf_stats, {} runs) | {:.2} µs | |",
            k.name,
            k.runs,
            k.ns_per_run / 1e3
        );
    }
}
