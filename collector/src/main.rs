//! `infertap-collector`: merges interval reports from infertap agents (gRPC) and serves the fleet
//! view on a Prometheus endpoint. See the library docs for the merging rules.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
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
    /// Address of the Prometheus endpoint (`/metrics`, `/healthz`).
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
    let cfg = CollectorConfig {
        agent_timeout: args.agent_timeout,
        aggregate_by: args.aggregate_by,
        max_models: args.max_models,
    };
    let mut collector = infertap_collector::start(cfg, grpc, metrics).await?;
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
    collector.shutdown().await
}
