//! `infertap`: the command line. All logic lives in the library (`pipeline` and its stages).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use infertap::{
    pipeline::{AgentOptions, Pipeline},
    probes::ProbeConfig,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "infertap",
    version,
    about = "Zero-code profiler for LLM inference servers: per-request and per-token timings from eBPF, joined with GPU activity",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent (the default when no subcommand is given).
    Run(AgentArgs),
}

/// Which processes to watch.
#[derive(Args, Debug, Clone)]
struct TargetArgs {
    /// Process to trace (repeatable). Its children are followed.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Trace the process(es) listening on this TCP port (repeatable); re-resolved periodically.
    #[arg(long = "port", value_name = "PORT")]
    ports: Vec<u16>,
    /// Payload bytes captured per syscall (max 4096). Larger values see more of big requests.
    #[arg(long, default_value_t = infertap_common::DEFAULT_CAPTURE, value_name = "BYTES")]
    capture_bytes: u32,
    /// Size of the kernel→agent event ring buffer.
    #[arg(long, default_value = "16777216", value_name = "BYTES")]
    ringbuf_bytes: u32,
    /// How often the agent drains the ring buffer (the kernel also wakes it when the ring fills).
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Stop after this long (default: run until SIGINT/SIGTERM).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

#[derive(Args, Debug, Clone)]
struct AgentArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Write one JSON line per completed request to this file (`-` for stdout).
    #[arg(long, value_name = "PATH|-")]
    requests: Option<String>,
    /// Print a short human-readable line per completed request to stderr.
    #[arg(long)]
    print: bool,
    /// Prometheus endpoint (/metrics, /healthz). `off` disables it.
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR|off")]
    metrics_addr: String,
    /// Stream interval aggregates to this collector (e.g. http://collector:50051).
    #[arg(long, value_name = "URL")]
    collector: Option<String>,
    /// Aggregation interval for the collector stream.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Node name reported to the collector (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// Create this file once the probes are attached (for scripts and tests).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, default_value = "info", env = "INFERTAP_LOG")]
    log: String,
}

fn parse_metrics_addr(s: &str) -> Result<Option<SocketAddr>> {
    if s == "off" {
        return Ok(None);
    }
    Ok(Some(
        s.parse()
            .map_err(|e| anyhow::anyhow!("--metrics-addr {s}: {e}"))?,
    ))
}

fn agent_options(a: &AgentArgs) -> Result<AgentOptions> {
    if a.target.pids.is_empty() && a.target.ports.is_empty() {
        bail!("nothing to trace: give --pid <PID> or --port <PORT>");
    }
    Ok(AgentOptions {
        pids: a.target.pids.clone(),
        ports: a.target.ports.clone(),
        requests: a.requests.clone(),
        print: a.print,
        probe: ProbeConfig {
            capture_bytes: a.target.capture_bytes,
            ringbuf_bytes: a.target.ringbuf_bytes,
            ..ProbeConfig::default()
        },
        poll_interval: a.target.poll_interval,
        duration: a.target.duration,
        ready_file: a.ready_file.clone(),
        rescan_interval: Duration::from_secs(1),
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run_agent(a: AgentArgs) -> Result<()> {
    let opts = agent_options(&a)?;
    let _metrics_addr = parse_metrics_addr(&a.metrics_addr)?;
    let pipeline = Pipeline::new(opts)?;
    let pipeline = pipeline.run(shutdown_signal()).await?;
    let s = pipeline.reconstructor().stats();
    tracing::info!(
        "stopped: {} requests, {} connections, {} malformed, {} kernel events lost",
        s.records,
        s.connections_opened + s.connections_adopted,
        s.malformed,
        pipeline.probes().counters().lost()
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let agent = match cli.command {
        Some(Command::Run(a)) => a,
        None => cli.agent,
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&agent.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_agent(agent))
}
