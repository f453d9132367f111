//! `infertap-collector`: merges interval reports from infertap agents (gRPC) and serves the fleet
//! view on a Prometheus endpoint, the agents' profiles (`/pprof/*`) and a web page (`/ui`). See
//! the library docs for the merging rules.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use infertap_collector::forward::ForwardConfig;
use infertap_collector::otlp::{OtlpMetricsConfig, OtlpMetricsExporter};
use infertap_collector::profiles::ProfileStoreConfig;
use infertap_collector::remote_write::RemoteWriteConfig;
use infertap_collector::{AggregateBy, CollectorConfig};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "infertap-collector", version, about)]
struct Args {
    /// Address for agents' gRPC streams.
    #[arg(
        long,
        default_value = "0.0.0.0:50051",
        env = "INFERTAP_COLLECTOR_GRPC_ADDR"
    )]
    grpc_addr: SocketAddr,
    /// Address of the HTTP endpoints: `/metrics`, `/healthz`, `/pprof/profile`, `/pprof/nodes`,
    /// `/ui`.
    #[arg(
        long,
        default_value = "0.0.0.0:9464",
        env = "INFERTAP_COLLECTOR_METRICS_ADDR"
    )]
    metrics_addr: SocketAddr,
    /// Drop an agent's gauges after it has sent nothing for this long (e.g. `60s`, `2m`).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    agent_timeout: Duration,
    /// Identity labels kept on merged series: `agent` (node + agent), `node`, or `fleet` (none).
    #[arg(long, value_enum, default_value_t = AggregateBy::Agent)]
    aggregate_by: AggregateBy,
    /// Cap on distinct model_name label values across the fleet.
    #[arg(long, default_value_t = 256)]
    max_models: usize,
    /// Most gzipped profile bytes kept in memory across all agents (e.g. `512MiB`, `2GiB`); past
    /// it the oldest profile of the agent holding the most goes first.
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    profile_store_bytes: usize,
    /// Profiles whose interval ended longer ago than this are evicted (e.g. `1h`, `30m`).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    profile_retention: Duration,
    /// Largest gRPC message (one report with its profiles) accepted.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    max_message_bytes: usize,
    /// Forward every stored profile to this Pyroscope-compatible backend
    /// (`POST <url>/ingest?...&format=pprof`), e.g. `http://pyroscope:4040`.
    #[arg(long, env = "INFERTAP_PROFILES_URL")]
    profiles_url: Option<String>,
    /// Application name of forwarded profiles (`name=<app>{node=..,agent=..,profile_type=..}`).
    #[arg(long, default_value = "infertap")]
    profiles_app: String,
    /// Profiles waiting to be forwarded; past it new ones are dropped (and counted).
    #[arg(long, default_value_t = 1024)]
    profiles_queue: usize,
    /// Directory of the persisted totals and dedupe state (`state.bin`), loaded at start and
    /// written every `--state-interval` and on shutdown.
    #[arg(
        long,
        default_value = "/var/lib/infertap-collector",
        env = "INFERTAP_COLLECTOR_STATE_DIR"
    )]
    state_dir: PathBuf,
    /// Keep everything in memory only (totals reset on restart; acks sent at once).
    #[arg(long)]
    no_state: bool,
    /// How often the state is written; acks wait for the write covering their report.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    state_interval: Duration,
    /// Prometheus remote-write endpoint (repeatable), e.g.
    /// `http://victoria:8428/api/v1/write` or `http://prometheus:9090/api/v1/write`.
    #[arg(
        long = "remote-write-url",
        env = "INFERTAP_REMOTE_WRITE_URL",
        value_delimiter = ','
    )]
    remote_write_urls: Vec<String>,
    /// Snapshot period of remote write.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    remote_write_interval: Duration,
    /// Parent directory of the durable per-URL remote-write queues.
    #[arg(long, default_value = "/var/lib/infertap-collector/remote-write")]
    remote_write_dir: PathBuf,
    /// Byte bound of each URL's queue; past it the oldest data is dropped (and counted).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    remote_write_max_bytes: usize,
    /// Most samples in one remote-write request.
    #[arg(long, default_value_t = 10_000)]
    remote_write_max_samples: usize,
    /// Label added to every remote-written series (repeatable), e.g. `cluster=eu1`.
    #[arg(long = "remote-write-label", value_parser = parse_label)]
    remote_write_labels: Vec<(String, String)>,
    /// Header sent with every remote-write request (repeatable), e.g.
    /// `X-Scope-OrgID: tenant1` (Mimir) or `Authorization: Bearer ...`.
    #[arg(long = "remote-write-header", value_parser = parse_header)]
    remote_write_headers: Vec<(String, String)>,
    /// Longest wait between retries of a failed remote-write request (backoff doubles from
    /// 500 ms up to this; a store's Retry-After is honoured).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    remote_write_max_backoff: Duration,
    /// Timeout of one remote-write request.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    remote_write_timeout: Duration,
    /// Most merged series; new series past it are refused and counted.
    #[arg(long, default_value_t = infertap_collector::DEFAULT_MAX_SERIES)]
    max_series: usize,
    /// Most distinct agents (node + agent id); a new one past it is refused at its hello.
    #[arg(long, default_value_t = infertap_collector::DEFAULT_MAX_AGENTS)]
    max_agents: usize,
    /// Remove the series of an agent gone (no stream, no report) for this long.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    agent_retention: Duration,
    #[command(flatten)]
    otlp: OtlpArgs,
}

/// `name=value` for `--remote-write-label`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected name=value"))?;
    let k = k.trim();
    let valid = !k.is_empty()
        && !k.starts_with("__")
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(format!("{k:?} is not a valid label name"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// `Name: value` for `--remote-write-header`.
fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected 'Name: value'"))?;
    hyper::http::HeaderName::from_bytes(k.trim().as_bytes()).map_err(|e| format!("{k:?}: {e}"))?;
    hyper::http::HeaderValue::from_str(v.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// OTLP export of the merged metrics.
#[derive(Debug, clap::Args)]
struct OtlpArgs {
    /// Export the merged fleet metrics to this OTLP/gRPC endpoint (e.g.
    /// http://otel-collector:4317).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// gRPC metadata sent with every OTLP export, e.g. `authorization=Bearer …` (repeatable).
    #[arg(long = "otlp-header", value_name = "KEY=VALUE", value_parser = infertap_proto::otlp::parse_header)]
    otlp_headers: Vec<(String, String)>,
    /// `service.name` of the exported resource.
    #[arg(long, default_value = "infertap-collector", value_name = "NAME")]
    otlp_service_name: String,
    /// Time between OTLP metrics exports.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    otlp_interval: Duration,
}

/// A byte size: a number with an optional K/M/G (×1000) or KiB/MiB/GiB (×1024) suffix.
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of bytes, e.g. 512MiB"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{s:?}: must be positive and fit in memory"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    anyhow::ensure!(
        args.agent_timeout > Duration::ZERO,
        "--agent-timeout must be positive"
    );
    let grpc = TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("binding --grpc-addr {}", args.grpc_addr))?;
    let metrics = TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {}", args.metrics_addr))?;
    anyhow::ensure!(
        args.profile_retention > Duration::ZERO,
        "--profile-retention must be positive"
    );
    anyhow::ensure!(
        args.state_interval > Duration::ZERO && args.remote_write_interval > Duration::ZERO,
        "--state-interval and --remote-write-interval must be positive"
    );
    let cfg = CollectorConfig {
        agent_timeout: args.agent_timeout,
        aggregate_by: args.aggregate_by,
        max_models: args.max_models,
        profiles: ProfileStoreConfig {
            max_bytes: args.profile_store_bytes,
            retention: args.profile_retention,
            ..ProfileStoreConfig::default()
        },
        max_message_bytes: args.max_message_bytes,
        forward: args.profiles_url.map(|url| {
            let mut f = ForwardConfig::new(url, args.profiles_app.clone());
            f.queue = args.profiles_queue;
            f
        }),
        state_dir: (!args.no_state).then(|| args.state_dir.clone()),
        state_interval: args.state_interval,
        remote_write: (!args.remote_write_urls.is_empty()).then(|| {
            let mut rw = RemoteWriteConfig::new(
                args.remote_write_urls.clone(),
                args.remote_write_dir.clone(),
            );
            rw.interval = args.remote_write_interval;
            rw.max_bytes = args.remote_write_max_bytes as u64;
            rw.max_samples_per_send = args.remote_write_max_samples.max(1);
            rw.external_labels = args.remote_write_labels.clone();
            rw.headers = args.remote_write_headers.clone();
            rw.timeout = args.remote_write_timeout;
            rw.backoff_max = args.remote_write_max_backoff.max(rw.backoff_min);
            rw
        }),
        max_series: args.max_series,
        max_agents: args.max_agents,
        agent_retention: args.agent_retention,
    };
    let mut collector = infertap_collector::start(cfg, grpc, metrics).await?;
    let otlp = match &args.otlp.otlp_endpoint {
        Some(url) => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into());
            let mut c = OtlpMetricsConfig::new(url.clone(), host);
            c.client.headers = args.otlp.otlp_headers.clone();
            c.service_name = args.otlp.otlp_service_name.clone();
            c.interval = args.otlp.otlp_interval;
            Some(
                OtlpMetricsExporter::spawn(c, collector.fleet().clone())
                    .with_context(|| format!("--otlp-endpoint {url}"))?,
            )
        }
        None => None,
    };
    // One machine-readable line on stdout, for scripts and tests started with port 0.
    println!(
        "listening grpc={} metrics={}",
        collector.grpc_addr(),
        collector.metrics_addr()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, shutting down"),
        _ = term.recv() => tracing::info!("terminated, shutting down"),
        err = collector.wait_failure() => return Err(err),
    }
    if let Some(o) = otlp {
        if !o.shutdown(Duration::from_secs(5)).await {
            tracing::warn!("the final OTLP metrics export did not finish in time");
        }
    }
    collector.shutdown().await
}
