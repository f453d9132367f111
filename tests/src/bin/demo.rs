//! `cargo xtask demo`: the real llama.cpp server under concurrent streaming load, watched by the
//! agent (reporting to a local collector). Prints every request as the agent reports it, then
//! TTFT/ITL/TPOT/E2E percentiles (agent and client side by side) and where the metrics are.

use std::io::{BufRead, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use infertap_tests::agent::{Agent, AgentOptions, AgentRecord, Collector};
use infertap_tests::compare::fidelity;
use infertap_tests::load::{run_load, EndpointMix, LoadConfig};
use infertap_tests::report::{print_latency_table, summarize_agent, summarize_client};
use infertap_tests::servers::{http_get, LlamaServer, MODEL_ALIAS};
use infertap_tests::{paths, prereq};

#[derive(Parser, Debug)]
#[command(about = "infertap demo on the real llama.cpp server")]
struct Args {
    /// How long to drive load.
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent streaming clients (keep-alive connections).
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    #[arg(long, default_value_t = 48)]
    max_tokens: u32,
    #[arg(long, value_enum, default_value_t = EndpointMix::Mixed)]
    endpoint: EndpointMix,
    /// Keep the server, agent and collector up after the load until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let missing: Vec<String> = [
        prereq::missing_root(),
        prereq::missing_agent(),
        prereq::missing_real_server(),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        anyhow::bail!("demo cannot start: {}", missing.join("; "));
    }
    println!("[demo] starting the llama.cpp server (SmolLM2-135M, 2 threads)...");
    let server = LlamaServer::start(2)?;
    println!(
        "[demo] server pid {} on http://{}",
        server.pid(),
        server.addr()
    );
    let collector = match paths::collector_binary().and_then(|_| Collector::spawn()) {
        Ok(c) => {
            println!(
                "[demo] collector: gRPC {}, metrics http://{}/metrics",
                c.grpc_addr, c.metrics_addr
            );
            Some(c)
        }
        Err(e) => {
            println!("[demo] no collector ({e:#}); continuing with the agent alone");
            None
        }
    };
    let mut opts = AgentOptions::pid(server.pid());
    opts.collector = collector.as_ref().map(|c| c.url());
    opts.interval = Some("5s".into());
    opts.node = Some("demo".into());
    let agent = Agent::spawn(&opts)?;
    println!(
        "[demo] agent pid {} attached; metrics http://{}/metrics",
        agent.pid().unwrap_or(0),
        agent.metrics_addr
    );
    println!(
        "[demo] driving {} streaming clients ({:?} endpoints, max_tokens {}) for {:?}\n",
        args.concurrency, args.endpoint, args.max_tokens, args.duration
    );

    let stop = Arc::new(AtomicBool::new(false));
    let tail = std::thread::spawn({
        let path = agent.requests_path.clone();
        let stop = stop.clone();
        move || tail_records(path, stop)
    });

    let mut cfg = LoadConfig::new(server.addr());

    cfg.model = Some(MODEL_ALIAS.into());
    cfg.concurrency = args.concurrency;
    cfg.requests = None;
    cfg.duration = Some(args.duration);
    cfg.max_tokens = args.max_tokens;
    cfg.endpoint = args.endpoint;
    let client = infertap_tests::runtime().block_on(run_load(&cfg, None))?;

    let want = client.iter().filter(|c| !c.local_addr.is_empty()).count();
    let recs = agent
        .wait_records(want, Duration::from_secs(15))
        .or_else(|e| {
            println!("[demo] warning: {e:#}");
            agent.records()
        })?;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let _ = tail.join();

    println!("\n[demo] latency percentiles (agent from the server's syscalls; client = loadgen)");
    print_latency_table(&summarize_agent(&recs), &summarize_client(&client));
    let f = fidelity(&recs, &client);
    println!(
        "agent vs client: joined {}/{} requests, token-count mismatches {}, \
         |TTFT diff| p50 {:.3} ms p99 {:.3} ms, |ITL diff| p50 {:.3} ms p99 {:.3} ms",
        f.joined,
        f.client_requests,
        f.token_mismatches,
        f.ttft.median_ns as f64 / 1e6,
        f.ttft.p99_ns as f64 / 1e6,
        f.itl.median_ns as f64 / 1e6,
        f.itl.p99_ns as f64 / 1e6,
    );

    println!("\n[demo] metrics endpoints:");
    show_metrics("agent", agent.metrics_addr);
    if let Some(c) = &collector {
        // Give the agent one interval to push its aggregates.
        std::thread::sleep(Duration::from_secs(6));
        show_metrics("collector", c.metrics_addr);
    }
    println!(
        "  per-request JSON lines: {}",
        agent.requests_path.display()
    );
    if let Some(c) = &collector {
        show_profile(c.metrics_addr);
    }
    if args.keep {
        println!("\n[demo] everything stays up; press Ctrl-C to stop.");
        let rt = infertap_tests::runtime();
        rt.block_on(tokio::signal::ctrl_c())
            .context("wait for Ctrl-C")?;
    }
    let exit = agent.stop()?;
    println!("[demo] agent stopped ({})", exit.status);
    drop(server);
    Ok(())
}

fn show_metrics(who: &str, addr: std::net::SocketAddr) {
    println!("  {who}: curl http://{addr}/metrics");
    match http_get(addr, "/metrics") {
        Ok((200, body)) => {
            let lines: Vec<&str> = body
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                // Counters and histogram counts/sums; buckets would fill the screen.
                .filter(|l| !l.contains("_bucket{"))
                .collect();
            for l in lines.iter().take(12) {
                println!("      {l}");
            }
            if lines.len() > 12 {
                println!(
                    "      ... ({} more series, histogram buckets not shown)",
                    lines.len() - 12
                );
            }
        }
        Ok((st, _)) => println!("      (HTTP {st})"),
        Err(e) => println!("      (unreachable: {e:#})"),
    }
}

/// The fleet's CPU profile of the run as the collector merged it: where the server spent its
/// CPU, by function (self time) and by Python function (total time), and where to look further.
fn show_profile(addr: std::net::SocketAddr) {
    println!("\n[demo] continuous profile of the server (from the collector, last 5 minutes):");
    let a = match infertap_tests::collector_support::http_get_bytes(
        addr,
        "/pprof/profile?type=cpu&from=-5m",
    ) {
        Ok(a) if a.status == 200 => a,
        Ok(a) => {
            println!("      (HTTP {}: {})", a.status, a.text());
            return;
        }
        Err(e) => {
            println!("      (unreachable: {e:#})");
            return;
        }
    };
    let p = match infertap_proto::pprof::decode(&a.body, 64 << 20) {
        Ok(p) => p,
        Err(e) => {
            println!("      (undecodable profile: {e})");
            return;
        }
    };
    let total: i64 = p.sample.iter().map(|s| s.value[1]).sum();
    if total == 0 {
        println!("      (no CPU samples yet)");
        return;
    }
    let name_of = |loc: u64| -> Vec<(String, bool)> {
        let l = &p.location[loc as usize - 1];
        l.line
            .iter()
            .map(|ln| {
                let f = &p.function[ln.function_id as usize - 1];
                let file = &p.string_table[f.filename as usize];
                (
                    p.string_table[f.name as usize].clone(),
                    file.ends_with(".py"),
                )
            })
            .collect()
    };
    let mut flat: std::collections::HashMap<String, i64> = Default::default();
    let mut python: std::collections::HashMap<String, i64> = Default::default();
    for s in &p.sample {
        let v = s.value[1];
        if let Some(&leaf) = s.location_id.first() {
            if let Some((n, _)) = name_of(leaf).into_iter().next() {
                *flat.entry(n).or_default() += v;
            }
        }
        let mut seen = std::collections::HashSet::new();
        for &loc in &s.location_id {
            for (n, py) in name_of(loc) {
                if py && seen.insert(n.clone()) {
                    *python.entry(n).or_default() += v;
                }
            }
        }
    }
    let top = |m: std::collections::HashMap<String, i64>, what: &str| {
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        println!("  {what}:");
        for (n, ns) in v.into_iter().take(6) {
            println!("    {:5.1}%  {n}", 100.0 * ns as f64 / total as f64);
        }
    };
    println!(
        "  {:.2} s of CPU sampled over {} profiles",
        total as f64 / 1e9,
        a.header("x-infertap-profiles").unwrap_or("?")
    );
    top(flat, "hottest functions (self)");
    top(
        python,
        "Python functions (total, including what they called)",
    );
    println!("  flame graph: http://{addr}/ui (with --keep)");
    println!(
        "  pprof:       go tool pprof -http=: 'http://{addr}/pprof/profile?type=cpu&from=-10m'"
    );
}

/// Prints each agent record as it is written.
fn tail_records(path: PathBuf, stop: Arc<AtomicBool>) {
    let mut offset = 0u64;
    let mut partial = String::new();
    loop {
        let done = stop.load(Ordering::SeqCst);
        if let Ok(mut f) = std::fs::File::open(&path) {
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                let mut r = std::io::BufReader::new(f);
                let mut line = String::new();
                while let Ok(n) = r.read_line(&mut line) {
                    if n == 0 {
                        break;
                    }
                    offset += n as u64;
                    partial.push_str(&line);
                    line.clear();
                    if partial.ends_with('\n') {
                        if let Ok(rec) = serde_json::from_str::<AgentRecord>(&partial) {
                            print_record(&rec);
                        }
                        partial.clear();
                    }
                }
            }
        }
        if done {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn print_record(r: &AgentRecord) {
    let itl: Vec<f64> = r.itl_ns().map(|g| g as f64 / 1e6).collect();
    let itl_p50 = if itl.is_empty() {
        "-".to_string()
    } else {
        format!("{:.1}ms", infertap_tests::compare::percentile(&itl, 50.0))
    };
    println!(
        "{:<21} #{:<2} {:<20} {} ttft {:>8} itl p50 {:>7} tpot {:>7} tokens {:>3} ({}) e2e {:>7.1}ms{}",
        r.peer.as_deref().unwrap_or("?"),
        r.seq_on_conn,
        r.path,
        r.status.map(|s| s.to_string()).unwrap_or("-".into()),
        r.ttft_ms.map(|t| format!("{t:.1}ms")).unwrap_or("-".into()),
        itl_p50,
        r.tpot_ms.map(|t| format!("{t:.1}ms")).unwrap_or("-".into()),
        r.output_tokens.map(|t| t.to_string()).unwrap_or("-".into()),
        r.token_count_source.as_deref().unwrap_or("-"),
        r.end_unix_ns.saturating_sub(r.start_unix_ns) as f64 / 1e6,
        r.error.as_deref().map(|e| format!(" error={e}")).unwrap_or_default(),
    );
}
