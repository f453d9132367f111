//! gRPC exporter: streams interval reports to the collector.
//!
//! The pipeline hands reports over with [`GrpcExporter::submit`], which never blocks (bounded
//! channel, `try_send`; a full channel counts a drop). A background task assigns each report a
//! sequence number and keeps it in a bounded buffer until the collector acks it; while the
//! collector is away it reconnects with exponential backoff and jitter, and on reconnect re-sends
//! every unacked report (the collector ignores sequences it has already applied, so nothing is
//! counted twice). When the buffer is full the oldest report is dropped and counted
//! ([`GrpcExporter::dropped_reports`], exported by the pipeline as
//! `infertap_events_dropped_total{reason="export_buffer_full"}`).

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use infertap_proto::pb::collector_client::CollectorClient;
use infertap_proto::pb::{agent_message, AgentHello, AgentMessage, IntervalReport};
use infertap_proto::schema;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Exporter settings; [`ExporterConfig::new`] fills in defaults.
#[derive(Clone, Debug)]
pub struct ExporterConfig {
    /// Collector URL, e.g. `http://collector:50051` (`http://` is assumed when missing).
    pub endpoint: String,
    pub node: String,
    pub agent_id: String,
    pub pids: Vec<u32>,
    /// Reports held (unacked) while the collector is slow or away; the oldest goes first.
    pub buffer_capacity: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
}

impl ExporterConfig {
    /// Defaults: 720 buffered reports (1 h at a 5 s interval), backoff 250 ms → 30 s.
    pub fn new(
        endpoint: impl Into<String>,
        node: impl Into<String>,
        agent_id: impl Into<String>,
    ) -> Self {
        ExporterConfig {
            endpoint: endpoint.into(),
            node: node.into(),
            agent_id: agent_id.into(),
            pids: Vec::new(),
            buffer_capacity: 720,
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    dropped: AtomicU64,
    buffered: AtomicUsize,
    acked: AtomicU64,
    connected: AtomicBool,
}

/// Handle to the exporter task.
#[derive(Debug)]
pub struct GrpcExporter {
    tx: mpsc::Sender<IntervalReport>,
    stats: Arc<Stats>,
    pids: Arc<Mutex<Vec<u32>>>,
    instance_id: u64,
    task: JoinHandle<()>,
}

impl GrpcExporter {
    /// Starts the exporter task (on the current tokio runtime). Fails only on an invalid URL or
    /// configuration; an unreachable collector is retried in the background.
    pub fn spawn(cfg: ExporterConfig) -> anyhow::Result<GrpcExporter> {
        anyhow::ensure!(
            cfg.buffer_capacity > 0,
            "export buffer capacity must be at least 1"
        );
        anyhow::ensure!(
            !cfg.node.is_empty() && !cfg.agent_id.is_empty(),
            "node and agent id must not be empty"
        );
        let url = if cfg.endpoint.contains("://") {
            cfg.endpoint.clone()
        } else {
            format!("http://{}", cfg.endpoint)
        };
        let endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| format!("invalid collector URL {url:?}"))?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            // Detects a collector that vanished without closing the connection.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let instance_id = std::collections::hash_map::RandomState::new()
            .hash_one((std::process::id(), std::time::SystemTime::now()));
        // Room for a burst of intervals while the task is busy; the real buffer is in the task.
        let (tx, rx) = mpsc::channel(16);
        let stats = Arc::new(Stats::default());
        let pids = Arc::new(Mutex::new(cfg.pids.clone()));
        let worker = Worker {
            endpoint,
            url,
            cfg,
            instance_id,
            rx,
            rx_closed: false,
            buffer: VecDeque::new(),
            next_sequence: 1,
            stats: stats.clone(),
            pids: pids.clone(),
            rng: instance_id | 1,
        };
        let task = tokio::spawn(worker.run());
        Ok(GrpcExporter {
            tx,
            stats,
            pids,
            instance_id,
            task,
        })
    }

    /// Queues a report without blocking. Returns false (and counts a drop) when the exporter
    /// cannot keep up or has stopped.
    pub fn submit(&self, report: IntervalReport) -> bool {
        match self.tx.try_send(report) {
            Ok(()) => true,
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Reports dropped so far (buffer or channel full), cumulative. Feed it to
    /// `Aggregator::set_drops(schema::DROP_REASON_EXPORT_BUFFER_FULL, ..)`.
    pub fn dropped_reports(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    /// Reports held that the collector has not acked yet.
    pub fn buffered_reports(&self) -> usize {
        self.stats.buffered.load(Ordering::Relaxed)
    }

    /// Highest sequence number the collector has acked (0: none yet).
    pub fn acked_sequence(&self) -> u64 {
        self.stats.acked.load(Ordering::Relaxed)
    }

    pub fn is_connected(&self) -> bool {
        self.stats.connected.load(Ordering::Relaxed)
    }

    /// This agent process's instance id, as sent in the hello.
    pub fn instance_id(&self) -> u64 {
        self.instance_id
    }

    /// Updates the traced pid set announced on the next (re)connect.
    pub fn set_pids(&self, pids: Vec<u32>) {
        *self.pids.lock().unwrap_or_else(PoisonError::into_inner) = pids;
    }

    /// Stops taking reports and gives the task up to `grace` to deliver what is buffered; what is
    /// still unacked after that is lost (and logged). Returns the number of reports lost.
    pub async fn shutdown(self, grace: Duration) -> usize {
        let GrpcExporter {
            tx,
            stats,
            mut task,
            ..
        } = self;
        drop(tx);
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
            let lost = stats.buffered.load(Ordering::Relaxed);
            tracing::warn!(lost, "collector did not ack all reports before shutdown");
            return lost;
        }
        0
    }
}

struct Worker {
    endpoint: Endpoint,
    url: String,
    cfg: ExporterConfig,
    instance_id: u64,
    rx: mpsc::Receiver<IntervalReport>,
    rx_closed: bool,
    buffer: VecDeque<IntervalReport>,
    next_sequence: u64,
    stats: Arc<Stats>,
    pids: Arc<Mutex<Vec<u32>>>,
    rng: u64,
}

enum SessionEnd {
    /// Input closed and everything acked.
    Done,
    /// The connection or stream failed; `established` says whether it got as far as a stream.
    Lost { established: bool, error: String },
}

impl Worker {
    async fn run(mut self) {
        let mut backoff = self.cfg.backoff_min;
        let mut failures = 0u64;
        loop {
            match self.session().await {
                SessionEnd::Done => {
                    tracing::debug!("gRPC exporter finished");
                    return;
                }
                SessionEnd::Lost { established, error } => {
                    self.stats.connected.store(false, Ordering::Relaxed);
                    if established {
                        tracing::warn!(collector = %self.url, buffered = self.buffer.len(), "collector stream lost: {error}; reconnecting");
                        backoff = self.cfg.backoff_min;
                        failures = 0;
                    } else {
                        failures += 1;
                        // The first failure and then every tenth, so a long outage stays visible
                        // without flooding the log.
                        if failures == 1 || failures.is_multiple_of(10) {
                            tracing::warn!(collector = %self.url, failures, buffered = self.buffer.len(), "cannot reach collector: {error}");
                        }
                    }
                }
            }
            if self.rx_closed && self.buffer.is_empty() {
                return;
            }
            let delay = self.jitter(backoff);
            backoff = (backoff * 2).min(self.cfg.backoff_max);
            // Keep taking reports while waiting, so the pipeline never sees a full channel.
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    msg = self.rx.recv(), if !self.rx_closed => self.take(msg),
                }
            }
        }
    }

    /// Uniformly random in [d/2, d] ("equal jitter"), so agents restarted together spread out.
    fn jitter(&mut self, d: Duration) -> Duration {
        // xorshift64: plenty for jitter, no extra dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = d.as_nanos() as u64 / 2;
        Duration::from_nanos(half + self.rng % (half + 1))
    }

    fn take(&mut self, msg: Option<IntervalReport>) {
        match msg {
            Some(mut report) => {
                report.sequence = self.next_sequence;
                self.next_sequence += 1;
                if self.buffer.len() >= self.cfg.buffer_capacity {
                    if let Some(old) = self.buffer.pop_front() {
                        let total = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                        if total.is_power_of_two() {
                            tracing::warn!(
                                sequence = old.sequence,
                                dropped_total = total,
                                "export buffer full, dropped oldest report"
                            );
                        }
                    }
                }
                self.buffer.push_back(report);
                self.stats
                    .buffered
                    .store(self.buffer.len(), Ordering::Relaxed);
            }
            None => self.rx_closed = true,
        }
    }

    fn ack(&mut self, sequence: u64) {
        while self.buffer.front().is_some_and(|r| r.sequence <= sequence) {
            self.buffer.pop_front();
        }
        self.stats
            .buffered
            .store(self.buffer.len(), Ordering::Relaxed);
        self.stats.acked.fetch_max(sequence, Ordering::Relaxed);
    }

    fn hello(&self) -> AgentMessage {
        AgentMessage {
            msg: Some(agent_message::Msg::Hello(AgentHello {
                node: self.cfg.node.clone(),
                agent_id: self.cfg.agent_id.clone(),
                instance_id: self.instance_id,
                pids: self
                    .pids
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                schema_version: schema::SCHEMA_VERSION,
            })),
        }
    }

    /// One connection: hello, then every buffered report, then new ones as they come, removing
    /// each from the buffer when acked.
    async fn session(&mut self) -> SessionEnd {
        if self.rx_closed && self.buffer.is_empty() {
            return SessionEnd::Done;
        }
        let lost = |established, error: String| SessionEnd::Lost { established, error };
        let channel: Channel = {
            let endpoint = self.endpoint.clone();
            let connect = endpoint.connect();
            tokio::pin!(connect);
            loop {
                tokio::select! {
                    res = &mut connect => match res {
                        Ok(c) => break c,
                        Err(e) => return lost(false, error_chain(&e)),
                    },
                    msg = self.rx.recv(), if !self.rx_closed => self.take(msg),
                }
            }
        };
        // Every queued message is a buffered report (or the hello), so this bound is never hit
        // while the buffer bound holds; `reserve` below waits when the stream is backed up.
        let (out_tx, out_rx) = mpsc::channel::<AgentMessage>(self.cfg.buffer_capacity + 1);
        if out_tx.send(self.hello()).await.is_err() {
            return lost(false, "request stream closed".into());
        }
        let mut client = CollectorClient::new(channel);
        let mut acks = {
            let call = client.report(ReceiverStream::new(out_rx));
            tokio::pin!(call);
            loop {
                tokio::select! {
                    res = &mut call => match res {
                        Ok(resp) => break resp.into_inner(),
                        Err(status) => return lost(false, format!("{}: {}", status.code(), status.message())),
                    },
                    msg = self.rx.recv(), if !self.rx_closed => self.take(msg),
                }
            }
        };
        self.stats.connected.store(true, Ordering::Relaxed);
        tracing::info!(collector = %self.url, buffered = self.buffer.len(), "connected to collector");
        // Highest sequence handed to this stream; everything above it in the buffer is unsent.
        let mut sent_up_to = 0u64;
        loop {
            if self.rx_closed && self.buffer.is_empty() {
                return SessionEnd::Done;
            }
            // The buffer is ordered by sequence: the first unsent report is found by bisection.
            let next = self.buffer.partition_point(|r| r.sequence <= sent_up_to);
            tokio::select! {
                permit = out_tx.reserve(), if next < self.buffer.len() => match permit {
                    Ok(permit) => {
                        let report = self.buffer[next].clone();
                        sent_up_to = report.sequence;
                        permit.send(AgentMessage { msg: Some(agent_message::Msg::Report(report)) });
                    }
                    Err(_) => return lost(true, "request stream closed".into()),
                },
                msg = self.rx.recv(), if !self.rx_closed => self.take(msg),
                ack = acks.message() => match ack {
                    Ok(Some(ack)) => self.ack(ack.sequence),
                    Ok(None) => return lost(true, "collector ended the stream".into()),
                    Err(status) => return lost(true, format!("{}: {}", status.code(), status.message())),
                },
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_config() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(GrpcExporter::spawn(ExporterConfig::new("http://[::1", "n", "a")).is_err());
            let mut cfg = ExporterConfig::new("127.0.0.1:1", "n", "a");
            cfg.buffer_capacity = 0;
            assert!(GrpcExporter::spawn(cfg).is_err());
            assert!(GrpcExporter::spawn(ExporterConfig::new("127.0.0.1:1", "", "a")).is_err());
        });
    }
}
