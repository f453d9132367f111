//! `cargo xtask bench`: how faithful and how cheap the agent is.
//!
//! (a) Fidelity on the real llama.cpp server at several concurrency levels: agent vs client
//!     absolute error of TTFT and of every inter-token gap (median, p99), token-count mismatches.
//! (b) Overhead: server tokens/s with the agent attached ÷ without (interleaved rounds); ns added
//!     per traced send() (a process doing many small sends on a loopback TCP connection, traced vs
//!     not traced vs agent running but watching another process); agent CPU and RSS.
//! (c) Wire-judged fidelity: a packet capture of the server port on loopback (kernel timestamps,
//!     `infertap_tests::wire`) is the reference for each request's start, TTFT, every token time
//!     and end: on the scripted server at several concurrency levels and under deliberate
//!     overload (more streams than it serves at once: requests queue un-accepted for a second or
//!     more), and on the real server during (a). The client's stopwatch is reported beside it.
//! Prints tables and writes JSON to target/bench/.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use infertap_tests::agent::{Agent, AgentOptions};
use infertap_tests::compare::{fidelity, wire_fidelity, Fidelity, WireFidelity};
use infertap_tests::load::{run_load_blocking, EndpointMix, LoadConfig};
use infertap_tests::report::{proc_usage, program_stats, ProcUsage};
use infertap_tests::servers::{LlamaServer, ScriptedServer, MODEL_ALIAS};
use infertap_tests::wire::WireCapture;
use infertap_tests::{paths, prereq};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "infertap fidelity and overhead benchmark")]
struct Args {
    /// Concurrency levels for the fidelity runs.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    streams: Vec<u32>,
    /// Requests per fidelity run: max(this, 2 x streams).
    #[arg(long, default_value_t = 24)]
    requests: u64,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Throughput rounds (each: one run with the agent, one without, order alternating).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Length of each throughput run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    round_duration: Duration,
    /// Concurrency of the throughput runs.
    #[arg(long, default_value_t = 4)]
    throughput_streams: u32,
    /// send() calls per micro-benchmark run.
    #[arg(long, default_value_t = 1_000_000)]
    sends: u64,
    /// Skip the parts that need the real server.
    #[arg(long)]
    no_server: bool,
    /// Concurrency levels of the wire-judged runs on the scripted server (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    wire_streams: Vec<u32>,
    /// Requests per wire-judged scripted run: max(this, 2 x streams).
    #[arg(long, default_value_t = 48)]
    wire_requests: u64,
    /// Overload run: this many streams against a scripted server serving `overload_slots`
    /// connections at once (0: no overload run).
    #[arg(long, default_value_t = 32)]
    overload_streams: u32,
    #[arg(long, default_value_t = 4)]
    overload_slots: u32,
    /// Internal: be the micro-benchmark's sending process.
    #[arg(long, hide = true)]
    send_child: Option<u64>,
}

#[derive(Serialize)]
struct FidelityRow {
    streams: u32,
    #[serde(flatten)]
    f: Fidelity,
    agent: Option<ProcUsage>,
    wall_s: f64,
}

/// One wire-judged run: agent (and client) vs the packet capture of the same run.
#[derive(Serialize)]
struct WireRow {
    /// "scripted" or "llama.cpp".
    server: &'static str,
    streams: u32,
    /// Connections the server serves at once (overload runs), else null.
    server_slots: Option<u32>,
    requests: usize,
    packets: u32,
    wall_s: f64,
    #[serde(flatten)]
    w: WireFidelity,
}

#[derive(Serialize, Default)]
struct Throughput {
    rounds: Vec<(f64, f64)>,
    with_agent_tok_s: f64,
    without_agent_tok_s: f64,
    ratio: f64,
    agent_cpu_s: f64,
    agent_cpu_pct: f64,
    agent_peak_rss_kib: u64,
}

#[derive(Serialize, Default)]
struct SendCost {
    sends: u64,
    bytes_per_send: usize,
    untraced_ns: f64,
    traced_ns: f64,
    other_pid_traced_ns: f64,
    added_traced_ns: f64,
    added_untraced_ns: f64,
    agent: Option<ProcUsage>,
    /// Kernel time per run of the socket programs (bpf_stats), traced run and
    /// watching-another-process run (last round).
    kernel_traced: Vec<ProgramCost>,
    kernel_other_pid: Vec<ProgramCost>,
}

#[derive(Serialize, Default, Clone, Debug)]
struct ProgramCost {
    name: String,
    runs: u64,
    ns_per_run: f64,
}

/// Programs whose per-run cost the send() benchmark reports: the syscall exits the benchmark
/// drives and the arrival tracking's TCP hooks (every received segment on the node passes
/// `on_tcp_probe`; traced sockets' data segments take the longer path).
const COSTED_PROGRAMS: &[&str] = &[
    "exit_sendto",
    "exit_read",
    "exit_recvfrom",
    "on_tcp_probe",
    "on_sock_state",
];

fn program_costs(
    before: &std::collections::BTreeMap<String, (u64, u64)>,
    after: &std::collections::BTreeMap<String, (u64, u64)>,
) -> Vec<ProgramCost> {
    after
        .iter()
        .filter_map(|(name, &(runs, ns))| {
            let (r0, n0) = before.get(name).copied().unwrap_or((0, 0));
            let runs = runs.saturating_sub(r0);
            (runs > 0).then(|| ProgramCost {
                name: name.clone(),
                runs,
                ns_per_run: ns.saturating_sub(n0) as f64 / runs as f64,
            })
        })
        .collect()
}

#[derive(Serialize, Default)]
struct Report {
    unix_time: u64,
    fidelity: Vec<FidelityRow>,
    wire: Vec<WireRow>,
    throughput: Option<Throughput>,
    send_cost: SendCost,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(n) = args.send_child {
        return send_child(n);
    }
    let missing: Vec<String> = [prereq::missing_root(), prereq::missing_agent()]
        .into_iter()
        .flatten()
        .collect();
    if !missing.is_empty() {
        bail!("bench cannot start: {}", missing.join("; "));
    }
    let mut report = Report {
        unix_time: infertap_tests::client::now_unix_ns() / 1_000_000_000,
        ..Default::default()
    };
    if !args.no_server {
        if let Some(m) = prereq::missing_real_server() {
            bail!("bench needs the real server: {m} (or pass --no-server)");
        }
        let server = LlamaServer::start(2)?;
        eprintln!(
            "[bench] llama server pid {} on {}",
            server.pid(),
            server.addr()
        );
        // Warm-up so the first measured request does not pay model page-in.
        let mut warm = LoadConfig::new(server.addr());
        warm.requests = Some(2);
        warm.max_tokens = 8;
        run_load_blocking(&warm)?;
        for &streams in &args.streams {
            let (row, wire) = fidelity_run(&server, streams, &args)?;
            report.fidelity.push(row);
            report.wire.push(wire);
        }
        report.throughput = Some(throughput(&server, &args)?);
    }
    wire_runs(&args, &mut report.wire)?;
    report.send_cost = send_cost(args.sends)?;
    print_report(&report);
    let dir = std::env::var_os("INFERTAP_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(paths::target_dir)
        .join("bench");
    std::fs::create_dir_all(&dir)?;
    let json = serde_json::to_string_pretty(&report)?;
    let file = dir.join(format!("bench-{}.json", report.unix_time));
    std::fs::write(&file, &json)?;
    std::fs::write(dir.join("latest.json"), &json)?;
    println!("\nJSON: {}", file.display());
    Ok(())
}

fn fidelity_run(server: &LlamaServer, streams: u32, args: &Args) -> Result<(FidelityRow, WireRow)> {
    eprintln!("[bench] fidelity at {streams} concurrent streams");
    let agent = Agent::spawn(&AgentOptions::pid(server.pid()))?;
    let cap = WireCapture::start(server.port)?;
    let mut cfg = LoadConfig::new(server.addr());
    cfg.model = Some(MODEL_ALIAS.into());
    cfg.concurrency = streams;
    cfg.requests = Some(args.requests.max(2 * streams as u64));
    cfg.max_tokens = args.max_tokens;
    cfg.endpoint = EndpointMix::Mixed;
    let t = Instant::now();
    let client = run_load_blocking(&cfg)?;
    let wall_s = t.elapsed().as_secs_f64();
    let want = client.iter().filter(|c| !c.local_addr.is_empty()).count();
    let recs = agent
        .wait_records(want, Duration::from_secs(20))
        .or_else(|e| {
            eprintln!("[bench] warning: {e:#}");
            agent.records()
        })?;
    let usage = agent.pid().and_then(proc_usage);
    agent.stop()?;
    let run = cap.finish()?;
    if run.losses() > 0 {
        bail!(
            "capture lost data ({:?}): wire figures would be wrong",
            run.stats
        );
    }
    let wire = WireRow {
        server: "llama.cpp",
        streams,
        server_slots: None,
        requests: client.len(),
        packets: run.stats.packets,
        wall_s,
        w: wire_fidelity(&recs, &run, Some(&client)),
    };
    eprintln!("[bench] wire: {}", wire.w.summary());
    Ok((
        FidelityRow {
            streams,
            f: fidelity(&recs, &client),
            agent: usage,
            wall_s,
        },
        wire,
    ))
}

/// Wire-judged runs on the scripted server: each concurrency level, then the overload run.
fn wire_runs(args: &Args, out: &mut Vec<WireRow>) -> Result<()> {
    let stream = serde_json::json!({"default": {"ttft_ms": 15, "itl_ms": 10, "tokens": 16}});
    for &streams in &args.wire_streams {
        let requests = args.wire_requests.max(2 * streams as u64);
        out.push(wire_run(&stream, &[], streams, requests, None)?);
    }
    if args.overload_streams > 0 {
        // Each slot serves one request per connection; the rest wait un-accepted.
        let slow = serde_json::json!({"default": {"ttft_ms": 20, "itl_ms": 25, "tokens": 12,
                                                  "keep_alive": false}});
        let slots = args.overload_slots.max(1).to_string();
        out.push(wire_run(
            &slow,
            &["--max-conns", &slots, "--accept-delay-ms", "5"],
            args.overload_streams,
            u64::from(args.overload_streams),
            Some(args.overload_slots.max(1)),
        )?);
    }
    Ok(())
}

fn wire_run(
    script: &serde_json::Value,
    server_args: &[&str],
    streams: u32,
    requests: u64,
    slots: Option<u32>,
) -> Result<WireRow> {
    eprintln!("[bench] wire-judged scripted run: {streams} streams, slots {slots:?}");
    let server = ScriptedServer::start_with(script, server_args)?;
    let agent = Agent::spawn(&AgentOptions::pid(server.pid()))?;
    let cap = WireCapture::start(server.port)?;
    let mut cfg = LoadConfig::new(server.addr());
    cfg.concurrency = streams;
    cfg.requests = Some(requests);
    cfg.max_tokens = 16;
    cfg.endpoint = EndpointMix::Mixed;
    let t = Instant::now();
    let client = run_load_blocking(&cfg)?;
    let wall_s = t.elapsed().as_secs_f64();
    let want = client.iter().filter(|c| !c.local_addr.is_empty()).count();
    let recs = agent
        .wait_records(want, Duration::from_secs(20))
        .or_else(|e| {
            eprintln!("[bench] warning: {e:#}");
            agent.records()
        })?;
    agent.stop()?;
    let run = cap.finish()?;
    if run.losses() > 0 {
        bail!(
            "capture lost data ({:?}): wire figures would be wrong",
            run.stats
        );
    }
    let w = wire_fidelity(&recs, &run, Some(&client));
    eprintln!("[bench] wire: {}", w.summary());
    Ok(WireRow {
        server: "scripted",
        streams,
        server_slots: slots,
        requests: client.len(),
        packets: run.stats.packets,
        wall_s,
        w,
    })
}

fn tok_per_s(server: &LlamaServer, args: &Args) -> Result<f64> {
    let mut cfg = LoadConfig::new(server.addr());
    cfg.model = Some(MODEL_ALIAS.into());
    cfg.concurrency = args.throughput_streams;
    cfg.requests = None;
    cfg.duration = Some(args.round_duration);
    cfg.max_tokens = args.max_tokens;
    cfg.endpoint = EndpointMix::Mixed;
    let t = Instant::now();
    let recs = run_load_blocking(&cfg)?;
    let tokens: u64 = recs
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.output_tokens)
        .sum();
    Ok(tokens as f64 / t.elapsed().as_secs_f64())
}

fn throughput(server: &LlamaServer, args: &Args) -> Result<Throughput> {
    let mut out = Throughput::default();
    let mut cpu = 0.0;
    let mut wall = 0.0;
    for round in 0..args.rounds {
        let mut with = 0.0;
        let mut without = 0.0;
        for agent_first in [round % 2 == 0, round % 2 != 0] {
            if agent_first {
                let agent = Agent::spawn(&AgentOptions::pid(server.pid()))?;
                let before = agent.pid().and_then(proc_usage).unwrap_or_default();
                let t = Instant::now();
                with = tok_per_s(server, args)?;
                wall += t.elapsed().as_secs_f64();
                let after = agent.pid().and_then(proc_usage).unwrap_or_default();
                cpu += after.cpu_s - before.cpu_s;
                out.agent_peak_rss_kib = out.agent_peak_rss_kib.max(after.peak_rss_kib);
                agent.stop()?;
            } else {
                without = tok_per_s(server, args)?;
            }
        }
        eprintln!("[bench] round {round}: {with:.1} tok/s with agent, {without:.1} without");
        out.rounds.push((with, without));
    }
    let n = out.rounds.len().max(1) as f64;
    out.with_agent_tok_s = out.rounds.iter().map(|r| r.0).sum::<f64>() / n;
    out.without_agent_tok_s = out.rounds.iter().map(|r| r.1).sum::<f64>() / n;
    out.ratio = out.with_agent_tok_s / out.without_agent_tok_s;
    out.agent_cpu_s = cpu;
    out.agent_cpu_pct = 100.0 * cpu / wall.max(1e-9);
    Ok(out)
}

/// Events per response in the micro-benchmark (a long but realistic stream).
const EVENTS_PER_RESPONSE: u64 = 1000;
const EVENT_PAYLOAD: &str = "data: {\"choices\":[{\"text\":\"x\"}]}\n\n";
const HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
const TAIL: &[u8] = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";

/// One SSE event as one HTTP chunk.
fn event_chunk() -> Vec<u8> {
    format!("{:x}\r\n{EVENT_PAYLOAD}\r\n", EVENT_PAYLOAD.len()).into_bytes()
}
const REQUEST: &[u8] = b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: 31\r\n\r\n{\"prompt\":\"x\",\"stream\":true}\n\n\n";

/// The sending process: serves `n` SSE events as keep-alive streaming responses, one send() per
/// event, and prints the nanoseconds spent inside those send() calls.
fn send_child(n: u64) -> Result<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", l.local_addr()?.port());
    std::io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
    let event = event_chunk();
    let mut spent = Duration::ZERO;
    let mut sent = 0;
    let mut req = vec![0u8; REQUEST.len()];
    while sent < n {
        if s.read_exact(&mut req).is_err() {
            break;
        }
        s.write_all(HEAD)?;
        let k = EVENTS_PER_RESPONSE.min(n - sent);
        let t = Instant::now();
        for _ in 0..k {
            // SAFETY: valid connected socket, valid buffer.
            let r = unsafe { libc::send(fd, event.as_ptr() as *const _, event.len(), 0) };
            if r != event.len() as isize {
                bail!("short send: {r}");
            }
        }
        spent += t.elapsed();
        sent += k;
        s.write_all(TAIL)?;
    }
    println!("{}", spent.as_nanos());
    Ok(())
}

enum Tracing {
    None,
    Traced,
    OtherPid,
}

/// One micro-benchmark run; returns ns per send(), the agent's usage and the kernel cost per
/// run of the socket programs.
fn send_run(n: u64, tracing: Tracing) -> Result<(f64, Option<ProcUsage>, Vec<ProgramCost>)> {
    let exe = std::env::current_exe()?;
    let mut child = KillOnDrop(
        Command::new(exe)
            .arg("--send-child")
            .arg(n.to_string())
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut out = BufReader::new(child.0.stdout.take().context("child stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let port: u16 = line.trim().parse().context("child port")?;
    // An idle process for the "agent watches someone else" case.
    let other = KillOnDrop(Command::new("sleep").arg("600").spawn()?);
    let agent = match tracing {
        Tracing::None => None,
        Tracing::Traced => Some(Agent::spawn(&AgentOptions::pid(child.0.id()))?),
        Tracing::OtherPid => Some(Agent::spawn(&AgentOptions::pid(other.0.id()))?),
    };
    let stats_before = program_stats(COSTED_PROGRAMS);
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    let resp_len = HEAD.len() + TAIL.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = EVENTS_PER_RESPONSE.min(left);
        s.write_all(REQUEST)?;
        let mut want = resp_len + k as usize * event_chunk().len();
        while want > 0 {
            let r = s.read(&mut buf[..want.min(1 << 20)])?;
            if r == 0 {
                bail!("sender closed early");
            }
            want -= r;
        }
        left -= k;
    }
    line.clear();
    out.read_line(&mut line)?;
    let spent: f64 = line.trim().parse().context("child timing")?;
    let costs = program_costs(&stats_before, &program_stats(COSTED_PROGRAMS));
    let _ = child.0.wait();
    let usage = agent.as_ref().and_then(|a| a.pid()).and_then(proc_usage);
    if let Some(a) = agent {
        a.stop()?;
    }
    drop(other);
    Ok((spent / n as f64, usage, costs))
}

/// Kills a helper process however the run ends (an error must not leave it waiting forever).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn send_cost(n: u64) -> Result<SendCost> {
    let (mut none, mut traced, mut other) = (Vec::new(), Vec::new(), Vec::new());
    let mut agent_usage = None;
    let (mut kernel_traced, mut kernel_other_pid) = (Vec::new(), Vec::new());
    // Run time per program needs kernel.bpf_stats_enabled, held while the returned fd lives.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| eprintln!("[bench] bpf_stats unavailable ({e}): no kernel cost figures"))
        .ok();
    for round in 0..3 {
        eprintln!("[bench] send() micro-benchmark round {round} ({n} sends per case)");
        none.push(send_run(n, Tracing::None)?.0);
        let (t, u, k) = send_run(n, Tracing::Traced)?;
        traced.push(t);
        agent_usage = u;
        kernel_traced = k;
        let (o, _, k) = send_run(n, Tracing::OtherPid)?;
        other.push(o);
        kernel_other_pid = k;
    }
    let (none, traced, other) = (median(none), median(traced), median(other));
    Ok(SendCost {
        sends: n,
        bytes_per_send: event_chunk().len(),
        untraced_ns: none,
        traced_ns: traced,
        other_pid_traced_ns: other,
        added_traced_ns: traced - none,
        added_untraced_ns: other - none,
        agent: agent_usage,
        kernel_traced,
        kernel_other_pid,
    })
}

fn print_report(r: &Report) {
    if !r.fidelity.is_empty() {
        println!("\nFidelity on the real server (agent vs client, absolute error)");
        println!(
            "{:>7} {:>8} {:>7} {:>11} {:>11} {:>10} {:>10} {:>9} {:>9}",
            "streams",
            "requests",
            "joined",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "ITL p50 ms",
            "ITL p99 ms",
            "tok mism",
            "evt mism"
        );
        for row in &r.fidelity {
            let f = &row.f;
            println!(
                "{:>7} {:>8} {:>7} {:>11.3} {:>11.3} {:>10.3} {:>10.3} {:>9} {:>9}",
                row.streams,
                f.client_requests,
                f.joined,
                f.ttft.median_ns as f64 / 1e6,
                f.ttft.p99_ns as f64 / 1e6,
                f.itl.median_ns as f64 / 1e6,
                f.itl.p99_ns as f64 / 1e6,
                f.token_mismatches,
                f.event_count_mismatches
            );
        }
    }
    if !r.wire.is_empty() {
        println!("\nAgent vs the wire (packet capture on lo; error = agent - wire, ms; client = its stopwatch vs the wire)");
        println!(
            "{:<9} {:>7} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>5} {:>5} {:>9} {:>10} {:>10}",
            "server",
            "streams",
            "slots",
            "joined",
            "start p50",
            "TTFT p50",
            "TTFT p99",
            "TTFT max",
            "tok p50",
            "tok p99",
            "evt≠",
            "tok≠",
            "wire TTFT",
            "client TTFT",
            "client tok"
        );
        let ms = |ns: u64| ns as f64 / 1e6;
        for row in &r.wire {
            let w = &row.w;
            let (ct, ce) = w
                .client
                .as_ref()
                .map(|c| (ms(c.ttft.p99_ns), ms(c.event_time.p99_ns)))
                .unwrap_or((f64::NAN, f64::NAN));
            println!(
                "{:<9} {:>7} {:>5} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>5} {:>5} {:>9.1} {:>10.3} {:>10.3}",
                row.server,
                row.streams,
                row.server_slots.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                format!("{}/{}", w.joined, w.wire_exchanges),
                ms(w.start.median_ns),
                ms(w.ttft.median_ns),
                ms(w.ttft.p99_ns),
                ms(w.ttft.max_ns),
                ms(w.token_time.median_ns),
                ms(w.token_time.p99_ns),
                w.event_count_mismatches,
                w.token_count_mismatches,
                w.wire_ttft_ms[1],
                ct,
                ce
            );
        }
        println!("  (wire TTFT: p99 of the wire's own TTFT, ms; client TTFT / tok: p99 of the client's error vs the wire)");
    }
    if let Some(t) = &r.throughput {
        println!(
            "\nServer throughput ({} rounds, interleaved)",
            t.rounds.len()
        );
        println!(
            "  with agent {:.1} tok/s, without {:.1} tok/s, ratio {:.4}",
            t.with_agent_tok_s, t.without_agent_tok_s, t.ratio
        );
        println!(
            "  agent CPU {:.2} s ({:.2}% of one core), peak RSS {:.1} MiB",
            t.agent_cpu_s,
            t.agent_cpu_pct,
            t.agent_peak_rss_kib as f64 / 1024.0
        );
    }
    let s = &r.send_cost;
    println!(
        "\nsend() micro-benchmark ({} sends of {} bytes, median of 3)",
        s.sends, s.bytes_per_send
    );
    println!(
        "  not traced (no agent)         {:>8.0} ns/send",
        s.untraced_ns
    );
    println!(
        "  traced by the agent           {:>8.0} ns/send (+{:.0} ns)",
        s.traced_ns, s.added_traced_ns
    );
    println!(
        "  agent watching another pid    {:>8.0} ns/send (+{:.0} ns)",
        s.other_pid_traced_ns, s.added_untraced_ns
    );
    for (what, costs) in [
        ("traced", &s.kernel_traced),
        ("agent watching another pid", &s.kernel_other_pid),
    ] {
        for c in costs {
            println!(
                "  kernel, {what}: {:<14} {:>8.0} ns/run ({} runs)",
                c.name, c.ns_per_run, c.runs
            );
        }
    }
    if let Some(u) = s.agent {
        println!(
            "  agent during the traced run: CPU {:.2} s, peak RSS {:.1} MiB",
            u.cpu_s,
            u.peak_rss_kib as f64 / 1024.0
        );
    }
}
