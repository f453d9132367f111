//! Streaming load generator for OpenAI-compatible servers: N concurrent keep-alive connections,
//! one JSON line per request (client address, sequence on the connection, send time, TTFT, the
//! arrival time of every content event, token counts). Independent of the agent's code.
//!
//! With `--wire FILE` (root, a loopback server) it also captures the server port on `lo` during
//! the load and writes the wire's view (times, sizes and counts only) as JSON, and prints the
//! client's stopwatch error against it; with `--agent-requests` as well, the agent's JSON lines
//! from the same run are judged against the wire too.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use infertap_tests::client::ClientRecord;
use infertap_tests::compare::percentile;
use infertap_tests::load::{parse_url, run_load, EndpointMix, LoadConfig};

#[derive(Parser, Debug)]
#[command(about = "Streaming load generator for OpenAI-compatible HTTP servers")]
struct Args {
    /// Server base URL, e.g. http://127.0.0.1:8000
    #[arg(long)]
    url: String,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// Total requests (default 10 unless --duration is given).
    #[arg(long)]
    requests: Option<u64>,
    /// Run for this long instead (e.g. 30s); requests in flight finish.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    #[arg(long, value_enum, default_value_t = EndpointMix::Chat)]
    endpoint: EndpointMix,
    /// Send non-streaming requests.
    #[arg(long)]
    no_stream: bool,
    #[arg(long)]
    model: Option<String>,
    /// Extra header "Name: value" (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Where to write JSON lines ("-" = stdout).
    #[arg(long, default_value = "-")]
    out: String,
    /// Print a one-line summary per request and a final table to stderr.
    #[arg(long)]
    live: bool,
    /// Capture the server port on `lo` during the load (root) and write the wire's view here.
    #[arg(long)]
    wire: Option<String>,
    /// With --wire: the agent's `--requests` JSON lines of this run, judged against the wire.
    #[arg(long, requires = "wire")]
    agent_requests: Option<String>,
    /// With --agent-requests: wait this long after the load for the agent's last lines.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    agent_wait: Duration,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut cfg = LoadConfig::new(parse_url(&args.url)?);
    cfg.concurrency = args.concurrency.max(1);
    cfg.duration = args.duration;
    cfg.requests = match (args.requests, args.duration) {
        (Some(n), _) => Some(n),
        (None, Some(_)) => None,
        (None, None) => Some(10),
    };
    cfg.max_tokens = args.max_tokens;
    cfg.endpoint = args.endpoint;
    cfg.stream = !args.no_stream;
    cfg.model = args.model.clone();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .context("--header wants \"Name: value\"")?;
        cfg.headers.push((k.trim().into(), v.trim().into()));
    }
    let mut out: Box<dyn Write + Send> = if args.out == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&args.out).with_context(|| format!("create {}", args.out))?,
        ))
    };
    let capture = match &args.wire {
        Some(_) => Some(infertap_tests::wire::WireCapture::start(cfg.addr.port())?),
        None => None,
    };
    let rt = infertap_tests::runtime();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ClientRecord>();
    let live = args.live;
    let started = std::time::Instant::now();
    let records = rt.block_on(async move {
        let load = tokio::spawn({
            let cfg = cfg.clone();
            async move { run_load(&cfg, Some(tx)).await }
        });
        while let Some(r) = rx.recv().await {
            let line = serde_json::to_string(&r)?;
            writeln!(out, "{line}")?;
            out.flush()?;
            if live {
                eprintln!(
                    "{} seq={} {} status={:?} ttft={} tokens={} e2e={:.1}ms{}",
                    r.local_addr,
                    r.seq_on_conn,
                    r.path,
                    r.status,
                    r.ttft_ms.map(|t| format!("{t:.1}ms")).unwrap_or("-".into()),
                    r.output_tokens,
                    r.e2e_ms,
                    r.error
                        .as_deref()
                        .map(|e| format!(" error={e}"))
                        .unwrap_or_default()
                );
            }
        }
        load.await?
    })?;
    let wall = started.elapsed().as_secs_f64();
    let ok: Vec<&ClientRecord> = records.iter().filter(|r| r.error.is_none()).collect();
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_ms).collect();
    let itl: Vec<f64> = ok
        .iter()
        .flat_map(|r| r.itl_ns().map(|g| g as f64 / 1e6).collect::<Vec<_>>())
        .collect();
    let tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
    eprintln!(
        "loadgen: {} requests ({} errors) in {wall:.1}s, {tokens} tokens ({:.1} tok/s); \
         TTFT p50 {:.1} ms p99 {:.1} ms; ITL p50 {:.2} ms p99 {:.2} ms",
        records.len(),
        records.len() - ok.len(),
        tokens as f64 / wall,
        percentile(&ttft, 50.0),
        percentile(&ttft, 99.0),
        percentile(&itl, 50.0),
        percentile(&itl, 99.0),
    );
    if let (Some(cap), Some(path)) = (capture, &args.wire) {
        let run = cap.finish()?;
        std::fs::write(path, serde_json::to_vec_pretty(&run)?)
            .with_context(|| format!("write {path}"))?;
        let agent = match &args.agent_requests {
            Some(p) => {
                std::thread::sleep(args.agent_wait);
                infertap_tests::servers::read_jsonl(std::path::Path::new(p))?
            }
            None => Vec::new(),
        };
        let f = infertap_tests::compare::wire_fidelity(&agent, &run, Some(&records));
        eprintln!(
            "wire: {} packets, {} connections, {} exchanges; capture losses {} ({:?})",
            run.stats.packets,
            run.conns.len(),
            f.wire_exchanges,
            run.losses(),
            run.stats
        );
        eprintln!("wire: {}", f.summary());
    }
    Ok(())
}
