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
//!
//! Profiles: the profiler hands each finished profile (one gzipped pprof per type per interval,
//! built with `infertap_proto::pprof::ProfileBuilder`) to [`GrpcExporter::attach_profile`] or a
//! [`ProfileSink`] cloned for its own task; the exporter puts it on the next report it takes, so
//! profiles share the reports' acks, re-sends and at-most-once application. Profile payloads are
//! bounded in bytes on top of the report bound ([`ExporterConfig::profile_buffer_bytes`]): past
//! it the oldest buffered payloads are dropped first and the reports keep their metrics
//! ([`GrpcExporter::dropped_profiles`] → `reason="profile_buffer_full"`); a single payload over
//! [`ExporterConfig::max_profile_bytes`] is refused at once ([`GrpcExporter::oversized_profiles`]
//! → `reason="profile_too_large"`).

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use infertap_proto::pb::collector_client::CollectorClient;
use infertap_proto::pb::{agent_message, AgentHello, AgentMessage, IntervalReport, ProfileData};
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
    /// Bytes of profile payloads held, attached but not yet on a report plus on unacked
    /// reports; past it the oldest payloads are dropped (their reports keep their metrics).
    pub profile_buffer_bytes: usize,
    /// Largest single profile payload (gzipped bytes) accepted; larger ones are dropped at once.
    pub max_profile_bytes: usize,
    /// Most profile bytes put on one report (at least one profile always goes); the rest wait
    /// for the next report. Keep well under the collector's `--max-message-bytes`.
    pub max_report_profile_bytes: usize,
}

/// Default [`ExporterConfig::profile_buffer_bytes`]: 64 MiB.
pub const DEFAULT_PROFILE_BUFFER_BYTES: usize = 64 << 20;
/// Default [`ExporterConfig::max_profile_bytes`]: 4 MiB (the collector refuses profiles that
/// decompress to more than 32 MiB).
pub const DEFAULT_MAX_PROFILE_BYTES: usize = 4 << 20;
/// Default [`ExporterConfig::max_report_profile_bytes`]: 16 MiB (the collector accepts 64 MiB
/// messages by default).
pub const DEFAULT_MAX_REPORT_PROFILE_BYTES: usize = 16 << 20;

impl ExporterConfig {
    /// Defaults: 720 buffered reports (1 h at a 5 s interval), backoff 250 ms → 30 s, 64 MiB of
    /// profile payloads, 4 MiB per profile, 16 MiB of profiles per report.
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
            profile_buffer_bytes: DEFAULT_PROFILE_BUFFER_BYTES,
            max_profile_bytes: DEFAULT_MAX_PROFILE_BYTES,
            max_report_profile_bytes: DEFAULT_MAX_REPORT_PROFILE_BYTES,
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    dropped: AtomicU64,
    buffered: AtomicUsize,
    acked: AtomicU64,
    connected: AtomicBool,
    dropped_profiles: AtomicU64,
    oversized_profiles: AtomicU64,
    profile_bytes: AtomicUsize,
}

/// What the pipeline hands the exporter task.
#[derive(Debug)]
enum Input {
    Report(IntervalReport),
    Profile(ProfileData),
}

/// A cloneable, `Send` handle that attaches profiles to the exporter's next report, for a
/// profiler running on its own task or thread. It does not keep the exporter alive: after
/// [`GrpcExporter::shutdown`] attaching fails (and counts a drop).
#[derive(Clone, Debug)]
pub struct ProfileSink {
    tx: mpsc::WeakSender<Input>,
    stats: Arc<Stats>,
}

impl ProfileSink {
    /// Queues a profile for the next report without blocking; false (a counted
    /// `profile_buffer_full` drop) when the exporter cannot take it now or has stopped.
    pub fn attach(&self, profile: ProfileData) -> bool {
        match self.tx.upgrade() {
            Some(tx) => try_attach(&tx, &self.stats, profile),
            None => {
                self.stats.dropped_profiles.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

fn try_attach(tx: &mpsc::Sender<Input>, stats: &Stats, profile: ProfileData) -> bool {
    match tx.try_send(Input::Profile(profile)) {
        Ok(()) => true,
        Err(_) => {
            stats.dropped_profiles.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Handle to the exporter task.
#[derive(Debug)]
pub struct GrpcExporter {
    tx: mpsc::Sender<Input>,
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
        anyhow::ensure!(
            cfg.max_profile_bytes > 0
                && cfg.max_profile_bytes <= cfg.profile_buffer_bytes
                && cfg.max_profile_bytes <= cfg.max_report_profile_bytes,
            "max profile bytes must be positive and within the profile buffer and per-report bounds"
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
        // Room for a burst of intervals (a report and a few profiles each) while the task is
        // busy; the real buffer is in the task.
        let (tx, rx) = mpsc::channel(64);
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
            pending_profiles: VecDeque::new(),
            profile_bytes: 0,
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
    /// cannot keep up or has stopped. Profiles already on the report go with it (same bounds as
    /// attached ones); profiles attached since the last report are added to it.
    pub fn submit(&self, report: IntervalReport) -> bool {
        match self.tx.try_send(Input::Report(report)) {
            Ok(()) => true,
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Queues a profile (gzipped pprof, e.g. from `ProfileBuilder::into_profile_data`) to go on
    /// the next report this exporter takes, without blocking. Returns false (and counts a
    /// `profile_buffer_full` drop) when the exporter cannot keep up or has stopped. Profiles
    /// attached after the last report still go out, on a report of their own, at shutdown.
    pub fn attach_profile(&self, profile: ProfileData) -> bool {
        try_attach(&self.tx, &self.stats, profile)
    }

    /// A handle for attaching profiles from another task or thread.
    pub fn profile_sink(&self) -> ProfileSink {
        ProfileSink {
            tx: self.tx.downgrade(),
            stats: self.stats.clone(),
        }
    }

    /// Profile payloads dropped so far to stay within the byte bound (or because the exporter
    /// could not take them), cumulative. Feed it to
    /// `Aggregator::set_drops(schema::DROP_REASON_PROFILE_BUFFER_FULL, ..)`.
    pub fn dropped_profiles(&self) -> u64 {
        self.stats.dropped_profiles.load(Ordering::Relaxed)
    }

    /// Profile payloads refused for exceeding `max_profile_bytes`, cumulative
    /// (`schema::DROP_REASON_PROFILE_TOO_LARGE`).
    pub fn oversized_profiles(&self) -> u64 {
        self.stats.oversized_profiles.load(Ordering::Relaxed)
    }

    /// Bytes of profile payloads held now (waiting for a report or on unacked reports).
    pub fn buffered_profile_bytes(&self) -> usize {
        self.stats.profile_bytes.load(Ordering::Relaxed)
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
    rx: mpsc::Receiver<Input>,
    rx_closed: bool,
    buffer: VecDeque<IntervalReport>,
    /// Profiles attached since the last report, oldest first.
    pending_profiles: VecDeque<ProfileData>,
    /// Payload bytes of `pending_profiles` plus the profiles on `buffer`'s reports.
    profile_bytes: usize,
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

    /// Whether a profile payload fits the per-profile limit; counts and logs one that does not.
    fn profile_fits(&self, p: &ProfileData) -> bool {
        let len = p.pprof.len();
        if len <= self.cfg.max_profile_bytes {
            return true;
        }
        let total = self
            .stats
            .oversized_profiles
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if total.is_power_of_two() {
            tracing::warn!(
                bytes = len,
                limit = self.cfg.max_profile_bytes,
                dropped_total = total,
                "profile payload over the per-profile limit, dropped"
            );
        }
        false
    }

    fn take(&mut self, msg: Option<Input>) {
        match msg {
            Some(Input::Report(mut report)) => {
                let mut profiles = std::mem::take(&mut report.profiles);
                profiles.retain(|p| self.profile_fits(p));
                report.profiles = profiles;
                self.push_report(report)
            }
            Some(Input::Profile(p)) => {
                if !self.profile_fits(&p) {
                    return;
                }
                self.profile_bytes += p.pprof.len();
                self.pending_profiles.push_back(p);
                self.enforce_profile_bound();
            }
            None => {
                self.rx_closed = true;
                // Profiles attached after the last report go on reports of their own.
                while !self.pending_profiles.is_empty() {
                    let (start, end) = self
                        .pending_profiles
                        .iter()
                        .fold((u64::MAX, 0), |(s, e), p| {
                            (s.min(p.start_unix_ns), e.max(p.end_unix_ns))
                        });
                    self.push_report(IntervalReport {
                        start_unix_ns: start,
                        end_unix_ns: end,
                        ..Default::default()
                    });
                }
            }
        }
        self.publish();
    }

    /// Numbers a report, moves waiting profiles onto it and buffers it, dropping the oldest
    /// report (and counting its profiles) when the buffer is full.
    fn push_report(&mut self, mut report: IntervalReport) {
        report.sequence = self.next_sequence;
        self.next_sequence += 1;
        let mut on_report = report.profiles.iter().map(|p| p.pprof.len()).sum::<usize>();
        self.profile_bytes += on_report;
        while let Some(p) = self.pending_profiles.front() {
            let len = p.pprof.len();
            if !report.profiles.is_empty() && on_report + len > self.cfg.max_report_profile_bytes {
                break;
            }
            on_report += len;
            if let Some(p) = self.pending_profiles.pop_front() {
                report.profiles.push(p);
            }
        }
        if self.buffer.len() >= self.cfg.buffer_capacity {
            if let Some(old) = self.buffer.pop_front() {
                let total = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                self.profile_bytes = self
                    .profile_bytes
                    .saturating_sub(old.profiles.iter().map(|p| p.pprof.len()).sum::<usize>());
                self.stats
                    .dropped_profiles
                    .fetch_add(old.profiles.len() as u64, Ordering::Relaxed);
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
        self.enforce_profile_bound();
    }

    /// Drops the oldest profile payloads (on buffered reports first, then waiting ones) until
    /// the held bytes fit `profile_buffer_bytes`; the reports themselves stay.
    fn enforce_profile_bound(&mut self) {
        while self.profile_bytes > self.cfg.profile_buffer_bytes {
            let dropped = match self.buffer.iter_mut().find(|r| !r.profiles.is_empty()) {
                Some(r) => Some(r.profiles.remove(0)),
                None => self.pending_profiles.pop_front(),
            };
            let Some(p) = dropped else { break };
            self.profile_bytes = self.profile_bytes.saturating_sub(p.pprof.len());
            let total = self.stats.dropped_profiles.fetch_add(1, Ordering::Relaxed) + 1;
            if total.is_power_of_two() {
                tracing::warn!(
                    bytes = p.pprof.len(),
                    limit = self.cfg.profile_buffer_bytes,
                    dropped_total = total,
                    "profile buffer full, dropped the oldest profile payload"
                );
            }
        }
    }

    fn publish(&self) {
        self.stats
            .buffered
            .store(self.buffer.len(), Ordering::Relaxed);
        self.stats
            .profile_bytes
            .store(self.profile_bytes, Ordering::Relaxed);
    }

    fn ack(&mut self, sequence: u64) {
        while self.buffer.front().is_some_and(|r| r.sequence <= sequence) {
            if let Some(r) = self.buffer.pop_front() {
                self.profile_bytes = self
                    .profile_bytes
                    .saturating_sub(r.profiles.iter().map(|p| p.pprof.len()).sum::<usize>());
            }
        }
        self.publish();
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
                    Err(status) => {
                        if matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted) {
                            self.strip_refused_report();
                        }
                        return lost(true, format!("{}: {}", status.code(), status.message()));
                    }
                },
            }
        }
    }

    /// The collector refused a message as too large. It applies messages in order and acks
    /// each, so the refused one is the oldest unacked report: its profiles go (counted as
    /// `profile_too_large`) so that re-sending it can succeed instead of failing forever.
    fn strip_refused_report(&mut self) {
        let Some(r) = self.buffer.front_mut() else {
            return;
        };
        if r.profiles.is_empty() {
            return;
        }
        let n = r.profiles.len();
        let bytes: usize = r.profiles.iter().map(|p| p.pprof.len()).sum();
        let sequence = r.sequence;
        r.profiles.clear();
        self.profile_bytes = self.profile_bytes.saturating_sub(bytes);
        self.stats
            .oversized_profiles
            .fetch_add(n as u64, Ordering::Relaxed);
        self.publish();
        tracing::warn!(
            sequence,
            profiles = n,
            bytes,
            "collector refused a report as too large; re-sending it without its profiles \
             (raise the collector's --max-message-bytes or lower max_report_profile_bytes)"
        );
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
            let mut cfg = ExporterConfig::new("127.0.0.1:1", "n", "a");
            cfg.max_profile_bytes = cfg.profile_buffer_bytes + 1;
            assert!(GrpcExporter::spawn(cfg).is_err());
        });
    }

    fn profile(len: usize, start: u64) -> ProfileData {
        ProfileData {
            r#type: infertap_proto::pb::ProfileType::Cpu as i32,
            start_unix_ns: start,
            end_unix_ns: start + 10,
            pprof: vec![0u8; len].into(),
            sample_count: 1,
        }
    }

    /// With no collector (port 1 refuses), everything stays buffered: the byte bound drops the
    /// oldest profile payloads, the reports stay, an oversized payload is refused.
    #[test]
    fn profile_bytes_are_bounded_oldest_first_keeping_reports() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut cfg = ExporterConfig::new("127.0.0.1:1", "n", "a");
            cfg.profile_buffer_bytes = 1000;
            cfg.max_profile_bytes = 400;
            cfg.max_report_profile_bytes = 700;
            cfg.backoff_min = Duration::from_secs(5);
            let ex = GrpcExporter::spawn(cfg).unwrap();
            let sink = ex.profile_sink();
            assert!(sink.attach(profile(300, 1)));
            assert!(ex.attach_profile(profile(300, 2)));
            assert!(ex.attach_profile(profile(300, 3)));
            assert!(
                ex.attach_profile(profile(401, 4)),
                "queued, refused by the task"
            );
            assert!(ex.submit(IntervalReport::default()));
            let settle = || tokio::time::sleep(Duration::from_millis(50));
            settle().await;
            // 700 bytes per report: two profiles on report 1, the third waits.
            assert_eq!(ex.buffered_reports(), 1);
            assert_eq!(ex.buffered_profile_bytes(), 900);
            assert_eq!(ex.oversized_profiles(), 1);
            assert_eq!(ex.dropped_profiles(), 0);
            // 1200 > 1000: the oldest payload (on report 1) goes.
            assert!(ex.attach_profile(profile(300, 5)));
            settle().await;
            assert_eq!(ex.dropped_profiles(), 1);
            assert_eq!(ex.buffered_profile_bytes(), 900);
            assert!(ex.submit(IntervalReport::default()));
            settle().await;
            assert_eq!(
                ex.buffered_reports(),
                2,
                "metrics reports are never dropped for bytes"
            );
            assert_eq!(ex.buffered_profile_bytes(), 900);
            // After shutdown a sink's attach fails and counts.
            let lost = ex.shutdown(Duration::from_millis(100)).await;
            assert_eq!(lost, 2);
            assert!(!sink.attach(profile(10, 6)));
        });
    }
}
