//! `cargo xtask bench-collector`: the collector under a simulated fleet, remote-writing into a
//! real VictoriaMetrics.
//!
//! 1. Ingest: `--agents` (1,000) simulated agents, each one gRPC stream sending one interval
//!    report every `--interval` (10 s) with the series an agent serving one model has (latency
//!    and token histograms, request counters, gauges). Measures the collector's CPU (% of one
//!    core) and RSS over `--duration`, the remote-write lag, and one report's size on the wire.
//! 2. Outage (`--outage-agents` 100): VictoriaMetrics is killed for `--outage` (5 min) while the
//!    agents keep reporting, then restarted; after the queue drains, every snapshot's sample of
//!    a probe series is counted back from VictoriaMetrics (0 lost expected) and the peak queue
//!    size on disk is reported.
//!
//! Prints one JSON object (also written to target/bench/collector.json).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use infertap_proto::pb::collector_client::CollectorClient;
use infertap_proto::pb::{
    agent_message, AgentHello, AgentMessage, Counter, Gauge, Histogram, IntervalReport, Label,
};
use infertap_proto::schema;
use infertap_tests::collector_support::{free_port, scrape, CollectorProcess};
use infertap_tests::report::proc_usage;
use infertap_tests::stores::{Kind, Store};
use prost::Message as _;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    interval: Duration,
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 100)]
    outage_agents: usize,
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    outage: Duration,
    /// Skip the outage part.
    #[arg(long)]
    no_outage: bool,
}

fn l(n: &str, v: &str) -> Label {
    Label {
        name: n.into(),
        value: v.into(),
    }
}

/// One agent's interval report: every histogram of the schema's request metrics with one model
/// (spread over a few buckets), request counters by outcome, token counters, gauges.
fn report(seq: u64, i: u64) -> IntervalReport {
    let mut histograms = Vec::new();
    let mut counters = Vec::new();
    let mut gauges = Vec::new();
    for def in schema::ALL {
        match def.kind {
            schema::Kind::Histogram => {
                let mut b = vec![0u64; def.bucket_count()];
                let n = def.bucket_count() as u64;
                for k in 0..4 {
                    b[((i + seq + k * 3) % n) as usize] += 1 + k;
                }
                let count = b.iter().sum();
                histograms.push(Histogram {
                    name: def.name.into(),
                    labels: def
                        .labels
                        .iter()
                        .map(|n| {
                            l(
                                n,
                                if *n == "model_name" {
                                    "llama-3-8b"
                                } else {
                                    "x"
                                },
                            )
                        })
                        .collect(),
                    bucket_counts: b,
                    sum: count as f64 * 0.1,
                    count,
                });
            }
            schema::Kind::Counter => counters.push(Counter {
                name: def.name.into(),
                labels: def
                    .labels
                    .iter()
                    .map(|n| {
                        l(
                            n,
                            if *n == "model_name" {
                                "llama-3-8b"
                            } else {
                                "ok"
                            },
                        )
                    })
                    .collect(),
                value: 1 + (seq + i) % 7,
            }),
            schema::Kind::Gauge => gauges.push(Gauge {
                name: def.name.into(),
                labels: def.labels.iter().map(|n| l(n, "x")).collect(),
                value: ((seq + i) % 9) as f64,
            }),
        }
    }
    IntervalReport {
        sequence: seq,
        histograms,
        counters,
        gauges,
        ..Default::default()
    }
}

/// One simulated agent: a stream, a report per interval; returns reports acked.
async fn agent(
    grpc: SocketAddr,
    i: usize,
    interval: Duration,
    until: Instant,
) -> anyhow::Result<u64> {
    let mut client = CollectorClient::connect(format!("http://{grpc}")).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(AgentHello {
            node: format!("node-{i:04}"),
            agent_id: format!("agent-{i:04}"),
            instance_id: i as u64 + 1,
            pids: vec![1],
            version: "bench".into(),
            schema_version: schema::SCHEMA_VERSION,
        })),
    })
    .await?;
    let mut acks = client
        .report(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Spread the agents over the interval like a real fleet.
    tokio::time::sleep(interval.mul_f64((i % 1000) as f64 / 1000.0)).await;
    let mut tick = tokio::time::interval(interval);
    let mut seq = 0;
    let mut acked = 0;
    while Instant::now() < until {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                tx.send(AgentMessage { msg: Some(agent_message::Msg::Report(report(seq, i as u64))) }).await?;
            }
            a = acks.message() => match a? {
                Some(a) => acked = a.sequence,
                None => break,
            },
        }
    }
    Ok(acked)
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    scrape(addr).map(|m| m.sum(name, &[])).unwrap_or(f64::NAN)
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        dir_bytes(&p)
                    } else {
                        e.metadata().map_or(0, |m| m.len())
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn run_fleet(
    grpc: SocketAddr,
    agents: usize,
    interval: Duration,
    for_: Duration,
) -> tokio::task::JoinHandle<u64> {
    let until = Instant::now() + for_;
    tokio::spawn(async move {
        let tasks: Vec<_> = (0..agents)
            .map(|i| tokio::spawn(agent(grpc, i, interval, until)))
            .collect();
        let mut acked = 0;
        for t in tasks {
            acked += t.await.ok().and_then(|r| r.ok()).unwrap_or(0);
        }
        acked
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let tmp = tempfile::tempdir()?;
    let wire = report(1, 0).encoded_len();
    let mut out = serde_json::json!({ "report_bytes_on_wire": wire, "agents": a.agents, "interval_s": a.interval.as_secs_f64() });

    // 1. Ingest.
    let store = Store::start(Kind::Victoria, free_port()?, &tmp.path().join("vm1"))?;
    let (q, s) = (tmp.path().join("q1"), tmp.path().join("s1"));
    let url = store.write_url();
    let c = CollectorProcess::start(
        "127.0.0.1:0".parse()?,
        &[
            "--remote-write-url",
            &url,
            "--remote-write-dir",
            q.to_str().unwrap(),
            "--state-dir",
            s.to_str().unwrap(),
            "--state-interval",
            "10s",
        ],
    )?;
    let fleet = run_fleet(c.grpc_addr, a.agents, a.interval, a.duration + a.interval).await;
    // Warm-up: every agent connected and sending.
    tokio::time::sleep(a.interval * 2).await;
    let u0 = proc_usage(c.pid()).context("collector usage")?;
    let t0 = Instant::now();
    let mut max_lag: f64 = 0.0;
    let mut max_rss = 0;
    while t0.elapsed() < a.duration.saturating_sub(a.interval) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let addr = c.metrics_addr;
        let lag = tokio::task::spawn_blocking(move || {
            metric(addr, "infertap_collector_remote_write_lag_seconds")
        })
        .await?;
        if lag.is_finite() {
            max_lag = max_lag.max(lag);
        }
        max_rss = max_rss.max(proc_usage(c.pid()).map_or(0, |u| u.rss_kib));
    }
    let u1 = proc_usage(c.pid()).context("collector usage")?;
    let cpu = (u1.cpu_s - u0.cpu_s) / t0.elapsed().as_secs_f64() * 100.0;
    let addr = c.metrics_addr;
    let m = tokio::task::spawn_blocking(move || scrape(addr)).await??;
    let acked = fleet.await?;
    out["ingest"] = serde_json::json!({
        "collector_cpu_percent_of_one_core": (cpu * 10.0).round() / 10.0,
        "collector_rss_mib": max_rss as f64 / 1024.0,
        "remote_write_lag_max_s": max_lag,
        "series": m.sum("infertap_collector_series", &[]),
        "snapshot_samples": m.sum("infertap_collector_remote_write_snapshot_samples", &[]),
        "samples_sent": m.sum("infertap_collector_remote_write_samples_sent_total", &[]),
        "samples_dropped": m.sum("infertap_collector_remote_write_samples_dropped_total", &[]) + 0.0,
        "state_file_bytes": m.sum("infertap_collector_state_bytes", &[]),
        "state_write_s": m.sum("infertap_collector_state_write_seconds", &[]),
        "reports_acked": acked,
    });
    eprintln!("{}", serde_json::to_string_pretty(&out)?);
    drop(c);
    drop(store);

    // 2. Outage.
    if !a.no_outage {
        let vm_addr = free_port()?;
        let data = tmp.path().join("vm2");
        let store = Store::start(Kind::Victoria, vm_addr, &data)?;
        let (q, s) = (tmp.path().join("q2"), tmp.path().join("s2"));
        let url = store.write_url();
        let c = CollectorProcess::start(
            "127.0.0.1:0".parse()?,
            &[
                "--remote-write-url",
                &url,
                "--remote-write-dir",
                q.to_str().unwrap(),
                "--state-dir",
                s.to_str().unwrap(),
                "--remote-write-max-backoff",
                "5s",
            ],
        )?;
        let started = now_s();
        let fleet = run_fleet(
            c.grpc_addr,
            a.outage_agents,
            a.interval,
            a.outage + Duration::from_secs(120),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        store.stop();
        let down = Instant::now();
        let mut peak_bytes: f64 = 0.0;
        while down.elapsed() < a.outage {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let addr = c.metrics_addr;
            let b = tokio::task::spawn_blocking(move || {
                metric(addr, "infertap_collector_remote_write_queue_bytes")
            })
            .await?;
            if b.is_finite() {
                peak_bytes = peak_bytes.max(b);
            }
        }
        let store = Store::start(Kind::Victoria, vm_addr, &data)?;
        let back = Instant::now();
        // Drained: nothing pending.
        loop {
            let addr = c.metrics_addr;
            let m = tokio::task::spawn_blocking(move || scrape(addr)).await??;
            if m.sum("infertap_collector_remote_write_pending_samples", &[]) == 0.0
                || back.elapsed() > Duration::from_secs(300)
            {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let drain_s = back.elapsed().as_secs_f64();
        let addr = c.metrics_addr;
        let m = tokio::task::spawn_blocking(move || scrape(addr)).await??;
        let end = now_s();
        // Every sample VictoriaMetrics holds, counted back over the whole run.
        let window = (end - started) as u64 + 60;
        let in_vm = store
            .query(
                &format!("sum(count_over_time({{__name__=~\".+\"}}[{window}s]))"),
                end,
            )?
            .first()
            .map_or(0.0, |r| r.1);
        // The probe series: one sample per snapshot, every 15 s since the start.
        let series = store.raw(
            r#"infertap_collector_remote_write_snapshot_samples"#,
            end,
            (end - started) as u64 + 60,
        )?;
        let samples = series.first().map_or(0, |s| s.1.len());
        let max_gap_s = series.first().map_or(0.0, |s| {
            s.1.windows(2)
                .map(|w| (w[1].0 - w[0].0) as f64 / 1e3)
                .fold(0.0, f64::max)
        });
        let enq = m.sum(
            "infertap_collector_remote_write_samples_enqueued_total",
            &[],
        );
        let sent = m.sum("infertap_collector_remote_write_samples_sent_total", &[]);
        let dropped = m.sum("infertap_collector_remote_write_samples_dropped_total", &[]) + 0.0;
        drop(c);
        let _ = fleet.await;
        out["outage"] = serde_json::json!({
            "agents": a.outage_agents,
            "store_down_s": a.outage.as_secs_f64(),
            "queue_peak_bytes": peak_bytes,
            "drain_after_return_s": drain_s,
            "samples_enqueued": enq,
            "samples_sent": sent,
            "samples_dropped": dropped,
            "samples_lost": enq - sent - dropped,
            "samples_in_victoria_metrics": in_vm,
            "queue_dir_bytes_after_drain": dir_bytes(&q),
            "probe_series_samples_in_vm": samples,
            "probe_series_max_gap_s": max_gap_s,
        });
    }
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("collector.json"), &text)?;
    Ok(())
}
