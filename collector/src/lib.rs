//! infertap collector: receives interval reports from many agents over gRPC, merges them into a
//! fleet view and serves it on a Prometheus endpoint with the same metric names the agents use.
//!
//! Merging: reports are deltas, so histograms (fixed schema bounds) and counters add exactly.
//! Series carry `node` and `agent` labels by default ([`AggregateBy::Agent`]); fleet-wide figures
//! are left to PromQL (`sum without (node, agent) (...)`), which avoids double counting that an
//! extra unlabelled fleet series would cause in `sum()` queries. `--aggregate-by node|fleet`
//! merges at collection time instead, for fleets where per-agent series are too many.
//!
//! Each (node, agent, instance) applies every sequence number at most once, so reports an agent
//! re-sends after a reconnect are acked but not counted again. Gauges are per agent and summed at
//! scrape time; an agent's gauges disappear when it disconnects cleanly or sends nothing for
//! `agent_timeout`, while its counters and histograms keep their totals.
//!
//! Profiles: reports may carry gzipped pprof profiles; those of applied (non-duplicate) reports
//! are validated and kept in a bounded in-memory store ([`profiles`]), served merged on
//! `/pprof/profile`, listed on `/pprof/nodes`, drawn as a flame graph on `/ui` next to the
//! latency percentiles, and optionally forwarded to a Pyroscope-compatible backend
//! ([`forward`]). All HTTP endpoints share the metrics address.

pub mod forward;
mod http;
pub mod otlp;
pub mod profiles;
pub mod query;
pub mod remote_write;
pub mod state;
mod ui;

use std::collections::{HashMap, HashSet};
use std::future::Future as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use infertap_proto::pb::collector_server::{Collector, CollectorServer};
use infertap_proto::pb::{
    agent_message, Ack, AgentHello, AgentMessage, IntervalReport, ProfileData,
};
use infertap_proto::schema;
use infertap_proto::store::MetricStore;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::forward::{ForwardConfig, ForwardMetrics, Forwarder};
use crate::profiles::{Ingested, ProfileMetrics, ProfileStore, ProfileStoreConfig};
use crate::remote_write::{RemoteWrite, RemoteWriteConfig};
use crate::state::StateDir;

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Identity labels kept on merged series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AggregateBy {
    /// `node` and `agent` labels on every series.
    #[default]
    Agent,
    /// `node` label only: agents of one node merged.
    Node,
    /// No identity labels: one series per metric and schema labels for the whole fleet.
    Fleet,
}

#[derive(Clone, Debug)]
pub struct CollectorConfig {
    /// An agent that sent nothing for this long is considered gone: its gauges are dropped.
    pub agent_timeout: Duration,
    pub aggregate_by: AggregateBy,
    /// Cap on distinct `model_name` values across the fleet (overflow → "other").
    pub max_models: usize,
    /// Bounds of the profile store.
    pub profiles: ProfileStoreConfig,
    /// Largest gRPC message (one report with its profiles) accepted, bytes.
    pub max_message_bytes: usize,
    /// Forward every stored profile to this Pyroscope-compatible backend.
    pub forward: Option<ForwardConfig>,
    /// Persist totals and dedupe state here (None: in memory only, acks sent at once).
    pub state_dir: Option<std::path::PathBuf>,
    /// How often the state is written; with a state dir, acks wait for the write that
    /// covers their report (at most this long).
    pub state_interval: Duration,
    /// Remote write to Prometheus-compatible stores.
    pub remote_write: Option<RemoteWriteConfig>,
    /// Most merged series (totals and gauges); new series past it are refused and counted
    /// (`rejected_series{reason="series_limit"}`).
    pub max_series: usize,
    /// Most distinct agent identities (node + agent id) known at once; a new one past it is
    /// refused at its hello (`agents_rejected{reason="agent_limit"}`).
    pub max_agents: usize,
    /// An agent identity with no open stream and no report for this long has its series
    /// removed from the merged view (and its dedupe state forgotten).
    pub agent_retention: Duration,
}

/// Default [`CollectorConfig::max_message_bytes`]: 64 MiB (agents put at most 16 MiB of
/// profiles on one report by default).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            agent_timeout: Duration::from_secs(60),
            aggregate_by: AggregateBy::Agent,
            max_models: 256,
            profiles: ProfileStoreConfig::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            forward: None,
            state_dir: None,
            state_interval: Duration::from_secs(5),
            remote_write: None,
            max_series: DEFAULT_MAX_SERIES,
            max_agents: DEFAULT_MAX_AGENTS,
            agent_retention: Duration::from_secs(3600),
        }
    }
}

/// Default [`CollectorConfig::max_series`].
pub const DEFAULT_MAX_SERIES: usize = 2_000_000;
/// Default [`CollectorConfig::max_agents`].
pub const DEFAULT_MAX_AGENTS: usize = 10_000;

/// Wall-clock now, unix ns.
pub(crate) fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Dedupe state is forgotten this long after an agent instance's last message.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct InstanceKey {
    node: String,
    agent: String,
    instance: u64,
}

#[derive(Debug)]
struct AgentState {
    /// Highest sequence applied; reports at or below it are duplicates.
    last_sequence: u64,
    last_seen: Instant,
    /// Open streams of this instance (normally 0 or 1; briefly 2 during a reconnect).
    streams: usize,
    /// Latest gauges, identity labels included; `None` once the agent is gone.
    gauges: Option<MetricStore>,
}

#[derive(Debug, Default)]
struct FleetState {
    totals: MetricStore,
    agents: HashMap<InstanceKey, AgentState>,
    models: HashSet<String>,
    /// Checkpoint epoch: reports applied now become durable with the checkpoint that takes
    /// this number ([`Fleet::checkpoint`]).
    epoch: u64,
}

/// Collector's own metrics, next to the merged ones.
#[derive(Debug, Clone, Default)]
struct SelfMetrics {
    agents_connected: Gauge,
    reports: Family<Vec<(String, String)>, Counter>,
    rejected_series: Family<Vec<(String, String)>, Counter>,
    profiles: ProfileMetrics,
    forward: ForwardMetrics,
    agents_rejected: Family<Vec<(String, String)>, Counter>,
    series_pruned: Counter,
    series: Gauge,
    /// 1 for the result of loading the state at start (loaded, missing, corrupt,
    /// version_mismatch, disabled).
    state_load: Family<Vec<(String, String)>, Gauge>,
    state_writes: Family<Vec<(String, String)>, Counter>,
    state_bytes: Gauge,
    state_write_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    otlp: otlp::OtlpExportMetrics,
}

/// The merged fleet state, shared by the gRPC service and the metrics endpoint.
#[derive(Debug)]
pub struct Fleet {
    cfg: CollectorConfig,
    state: Mutex<FleetState>,
    metrics: SelfMetrics,
    profiles: ProfileStore,
    forwarder: OnceLock<Forwarder>,
    remote_write: OnceLock<Arc<RemoteWrite>>,
    /// Highest checkpoint epoch whose state is on disk (acks wait for it with a state dir).
    durable: tokio::sync::watch::Sender<u64>,
    /// An ack is waiting for the next state write (wakes the checkpoint task early).
    ack_wanted: tokio::sync::Notify,
    /// Bounds the CPU-heavy profile work (decoding on ingest, merging for queries) running at
    /// once, to the number of cores: many agents or queries wait instead of piling up threads
    /// and memory.
    cpu_permits: Arc<tokio::sync::Semaphore>,
}

/// One checkpoint's data, cloned under the fleet lock.
struct Checkpoint {
    epoch: u64,
    totals: MetricStore,
    instances: Vec<infertap_proto::state_pb::AgentInstance>,
    models: Vec<String>,
    gauges: Vec<MetricStore>,
}

impl Checkpoint {
    /// The merged view (`/metrics`' series): totals plus the live agents' gauges.
    fn view(&self) -> MetricStore {
        let mut view = self.totals.clone();
        for g in &self.gauges {
            // Gauges only: merging cannot hit a histogram layout mismatch.
            let _ = view.merge(g);
        }
        view
    }
}

/// What happened to one report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyResult {
    Applied { rejected_series: usize },
    Duplicate,
}

impl Fleet {
    pub fn new(cfg: CollectorConfig) -> Self {
        let metrics = SelfMetrics::default();
        let profiles = ProfileStore::new(cfg.profiles.clone(), metrics.profiles.clone());
        Fleet {
            cfg,
            state: Mutex::new(FleetState::default()),
            metrics,
            profiles,
            forwarder: OnceLock::new(),
            remote_write: OnceLock::new(),
            durable: tokio::sync::watch::Sender::new(0),
            ack_wanted: tokio::sync::Notify::new(),
            cpu_permits: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
        }
    }

    /// Runs CPU-heavy profile work `f` on the blocking pool once a permit is free.
    pub(crate) async fn run_cpu<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Fleet) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let permit = self
            .cpu_permits
            .clone()
            .acquire_owned()
            .await
            .context("collector shutting down")?;
        let fleet = self.clone();
        let out = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&fleet)
        })
        .await
        .context("profile task panicked")?;
        Ok(out)
    }

    /// The OTLP exporter's counters (`--otlp-endpoint`), on this fleet's `/metrics`.
    pub fn otlp_metrics(&self) -> otlp::OtlpExportMetrics {
        self.metrics.otlp.clone()
    }

    /// The profile store.
    pub fn profiles(&self) -> &ProfileStore {
        &self.profiles
    }

    pub fn config(&self) -> &CollectorConfig {
        &self.cfg
    }

    /// Stores the profiles of an applied report and forwards the stored ones. CPU-bound
    /// (decoding): call it off the async threads.
    fn ingest_profiles(&self, key: &InstanceKey, profiles: &[ProfileData]) -> Ingested {
        let done = self
            .profiles
            .ingest(&key.node, &key.agent, profiles, unix_now_ns());
        if let Some(f) = self.forwarder.get() {
            for p in &done.stored {
                f.enqueue(&key.node, &key.agent, p);
            }
        }
        done
    }

    fn lock(&self) -> MutexGuard<'_, FleetState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn prefix(&self, key: &InstanceKey) -> Vec<(String, String)> {
        let node = (schema::LABEL_NODE.to_owned(), key.node.clone());
        let agent = (schema::LABEL_AGENT.to_owned(), key.agent.clone());
        match self.cfg.aggregate_by {
            AggregateBy::Agent => vec![node, agent],
            AggregateBy::Node => vec![node],
            AggregateBy::Fleet => vec![],
        }
    }

    /// Registers a stream of `key`; refuses a new identity past `max_agents`.
    fn connect(&self, key: &InstanceKey) -> Result<(), Status> {
        let mut st = self.lock();
        let known = st
            .agents
            .keys()
            .any(|k| k.node == key.node && k.agent == key.agent);
        if !known {
            let identities: HashSet<(&str, &str)> = st
                .agents
                .keys()
                .map(|k| (k.node.as_str(), k.agent.as_str()))
                .collect();
            if identities.len() >= self.cfg.max_agents {
                self.metrics
                    .agents_rejected
                    .get_or_create(&vec![("reason".into(), "agent_limit".into())])
                    .inc();
                return Err(Status::resource_exhausted(format!(
                    "collector already tracks {} agents (--max-agents)",
                    identities.len()
                )));
            }
        }
        let a = st.agents.entry(key.clone()).or_insert(AgentState {
            last_sequence: 0,
            last_seen: Instant::now(),
            streams: 0,
            gauges: None,
        });
        a.streams += 1;
        a.last_seen = Instant::now();
        self.metrics.agents_connected.inc();
        Ok(())
    }

    fn disconnect(&self, key: &InstanceKey, clean: bool) {
        let mut st = self.lock();
        if let Some(a) = st.agents.get_mut(key) {
            a.streams = a.streams.saturating_sub(1);
            // A clean end means the agent shut down: its in-flight gauges are no longer true.
            if clean && a.streams == 0 {
                a.gauges = None;
            }
        }
        self.metrics.agents_connected.dec();
    }

    #[cfg(test)]
    fn apply(&self, key: &InstanceKey, report: &IntervalReport) -> ApplyResult {
        self.apply_at_epoch(key, report).0
    }

    /// Applies a report; also returns the checkpoint epoch whose state will hold it.
    fn apply_at_epoch(&self, key: &InstanceKey, report: &IntervalReport) -> (ApplyResult, u64) {
        let prefix = self.prefix(key);
        let mut guard = self.lock();
        let st = &mut *guard;
        let epoch = st.epoch;
        let Some(agent) = st.agents.get_mut(key) else {
            // `connect` always runs first; treat a missing entry as a protocol bug, not a panic.
            return (ApplyResult::Duplicate, epoch);
        };
        agent.last_seen = Instant::now();
        if report.sequence <= agent.last_sequence {
            self.metrics
                .reports
                .get_or_create(&vec![("result".into(), "duplicate".into())])
                .inc();
            return (ApplyResult::Duplicate, epoch);
        }
        agent.last_sequence = report.sequence;
        let max_models = self.cfg.max_models;
        let models = &mut st.models;
        let mut cap_models = |label: &str, value: &str| {
            if label != schema::LABEL_MODEL || models.contains(value) {
                return value.to_owned();
            }
            if models.len() < max_models {
                models.insert(value.to_owned());
                return value.to_owned();
            }
            schema::MODEL_OTHER.to_owned()
        };
        let (gauges_only, counted) = split_gauges(report);
        let mut delta = MetricStore::new();
        let mut errors = delta.apply_report(&counted, &prefix, &mut cap_models);
        let mut gauges = MetricStore::new();
        errors.extend(gauges.apply_report(&gauges_only, &prefix, &mut cap_models));
        // The series cap counts totals plus every live agent's gauges.
        let gauge_series: usize = st
            .agents
            .iter()
            .filter(|(k, _)| *k != key)
            .filter_map(|(_, a)| a.gauges.as_ref().map(MetricStore::series_count))
            .sum();
        let room = self.cfg.max_series.saturating_sub(gauge_series);
        let mut refused = st.totals.merge_capped(&delta, room).unwrap_or_else(|e| {
            tracing::warn!("histogram layout mismatch while merging: {e}");
            0
        });
        let room_for_gauges = room.saturating_sub(st.totals.series_count());
        let mut capped = MetricStore::new();
        refused += capped.merge_capped(&gauges, room_for_gauges).unwrap_or(0);
        if refused > 0 {
            self.metrics
                .rejected_series
                .get_or_create(&vec![("reason".into(), "series_limit".into())])
                .inc_by(refused as u64);
            tracing::warn!(node = %key.node, agent = %key.agent, refused, limit = self.cfg.max_series, "series limit (--max-series) reached; new series refused");
        }
        self.metrics.series.set(st.totals.series_count() as i64);
        let Some(agent) = st.agents.get_mut(key) else {
            return (ApplyResult::Duplicate, epoch);
        };
        agent.gauges = Some(capped);
        self.metrics
            .reports
            .get_or_create(&vec![("result".into(), "applied".into())])
            .inc();
        for e in &errors {
            self.metrics
                .rejected_series
                .get_or_create(&vec![("reason".into(), e.reason().into())])
                .inc();
        }
        if let Some(first) = errors.first() {
            tracing::warn!(node = %key.node, agent = %key.agent, sequence = report.sequence, rejected = errors.len(), "report had series outside the schema, skipped them; first: {first}");
        }
        (
            ApplyResult::Applied {
                rejected_series: errors.len(),
            },
            epoch,
        )
    }

    /// Drops gauges of agents silent for longer than the timeout and forgets long-gone ones.
    pub fn sweep(&self) {
        self.profiles.sweep(unix_now_ns());
        let mut st = self.lock();
        let timeout = self.cfg.agent_timeout;
        for (key, a) in st.agents.iter_mut() {
            if a.gauges.is_some() && a.last_seen.elapsed() > timeout {
                a.gauges = None;
                tracing::warn!(node = %key.node, agent = %key.agent, instance = format_args!("{:016x}", key.instance), "agent silent for {}; dropped its gauges", humantime::format_duration(timeout));
            }
        }
        st.agents
            .retain(|_, a| a.streams > 0 || a.last_seen.elapsed() < FORGET_AFTER.max(timeout));
        self.prune_stale(&mut st);
    }

    /// Removes the series of agent identities gone for longer than `agent_retention` (with
    /// `--aggregate-by node`, of nodes all of whose agents are gone; never with `fleet`).
    fn prune_stale(&self, st: &mut FleetState) {
        let retention = self.cfg.agent_retention;
        let live = |a: &AgentState| a.streams > 0 || a.last_seen.elapsed() < retention;
        let mut stale: HashSet<(String, String)> = HashSet::new();
        let mut alive: HashSet<(String, String)> = HashSet::new();
        for (k, a) in &st.agents {
            let id = (k.node.clone(), k.agent.clone());
            if live(a) {
                alive.insert(id);
            } else {
                stale.insert(id);
            }
        }
        stale.retain(|id| !alive.contains(id));
        if stale.is_empty() {
            return;
        }
        let removed = match self.cfg.aggregate_by {
            AggregateBy::Agent => st.totals.retain_series(|l| {
                !(l.len() >= 2 && stale.contains(&(l[0].1.clone(), l[1].1.clone())))
            }),
            AggregateBy::Node => {
                let live_nodes: HashSet<&String> = alive.iter().map(|(n, _)| n).collect();
                let gone: HashSet<&String> = stale
                    .iter()
                    .map(|(n, _)| n)
                    .filter(|n| !live_nodes.contains(n))
                    .collect();
                st.totals
                    .retain_series(|l| !(l.first().is_some_and(|(_, n)| gone.contains(n))))
            }
            AggregateBy::Fleet => 0,
        };
        st.agents
            .retain(|k, _| !stale.contains(&(k.node.clone(), k.agent.clone())));
        for (node, agent) in &stale {
            tracing::info!(%node, %agent, series = removed, "agent gone for longer than --agent-retention ({}); pruned its series", humantime::format_duration(retention));
        }
        self.metrics.series_pruned.inc_by(removed as u64);
        self.metrics.series.set(st.totals.series_count() as i64);
    }

    /// Takes a checkpoint under the lock (clones only) and starts a new epoch: the epoch it
    /// covers, the totals, dedupe state and models to persist, and the live agents' gauges
    /// (merged into the view by [`Checkpoint::view`], off the lock).
    fn checkpoint(&self) -> Checkpoint {
        let mut st = self.lock();
        let epoch = st.epoch;
        st.epoch += 1;
        let totals = st.totals.clone();
        let now_ns = unix_now_ns();
        let instances = st
            .agents
            .iter()
            .map(|(k, a)| infertap_proto::state_pb::AgentInstance {
                node: k.node.clone(),
                agent: k.agent.clone(),
                instance: k.instance,
                last_sequence: a.last_sequence,
                last_seen_unix_ns: now_ns.saturating_sub(a.last_seen.elapsed().as_nanos() as u64),
            })
            .collect();
        let models = st.models.iter().cloned().collect();
        let gauges = st
            .agents
            .values()
            .filter_map(|a| a.gauges.clone())
            .collect();
        Checkpoint {
            epoch,
            totals,
            instances,
            models,
            gauges,
        }
    }

    fn aggregate_name(&self) -> &'static str {
        match self.cfg.aggregate_by {
            AggregateBy::Agent => "agent",
            AggregateBy::Node => "node",
            AggregateBy::Fleet => "fleet",
        }
    }

    /// Loads a persisted state into this (empty) fleet; returns the series restored.
    fn restore(&self, saved: infertap_proto::state_pb::CollectorState) -> usize {
        let identity: &[&str] = match self.cfg.aggregate_by {
            AggregateBy::Agent => &[schema::LABEL_NODE, schema::LABEL_AGENT],
            AggregateBy::Node => &[schema::LABEL_NODE],
            AggregateBy::Fleet => &[],
        };
        let mut st = self.lock();
        let totals = saved.totals.unwrap_or_default();
        let mut rejected = 0usize;
        let split = |labels: &[infertap_proto::pb::Label]| {
            let n = identity.len().min(labels.len());
            let ok = labels[..n]
                .iter()
                .zip(identity)
                .all(|(l, id)| l.name == *id);
            let prefix: Vec<(String, String)> = labels[..n]
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect();
            (ok, prefix, labels[n..].to_vec())
        };
        // Each saved series is applied on its own, as a one-series report under its identity
        // prefix, so one that no longer fits the schema is skipped and counted alone.
        let mut apply = |ok: bool, prefix: Vec<(String, String)>, one: IntervalReport| {
            if !ok
                || !st
                    .totals
                    .apply_report(&one, &prefix, |_, v| v.to_owned())
                    .is_empty()
            {
                rejected += 1;
            }
        };
        for h in &totals.histograms {
            let (ok, prefix, rest) = split(&h.labels);
            let histograms = vec![infertap_proto::pb::Histogram {
                labels: rest,
                ..h.clone()
            }];
            apply(
                ok,
                prefix,
                IntervalReport {
                    histograms,
                    ..Default::default()
                },
            );
        }
        for c in &totals.counters {
            let (ok, prefix, rest) = split(&c.labels);
            let counters = vec![infertap_proto::pb::Counter {
                labels: rest,
                ..c.clone()
            }];
            apply(
                ok,
                prefix,
                IntervalReport {
                    counters,
                    ..Default::default()
                },
            );
        }
        if rejected > 0 {
            tracing::warn!(
                rejected,
                "saved series that no longer match the schema were not restored"
            );
            self.metrics
                .rejected_series
                .get_or_create(&vec![("reason".into(), "state_restore".into())])
                .inc_by(rejected as u64);
        }
        let now_ns = unix_now_ns();
        for i in saved.instances {
            let ago = Duration::from_nanos(now_ns.saturating_sub(i.last_seen_unix_ns));
            st.agents.insert(
                InstanceKey {
                    node: i.node,
                    agent: i.agent,
                    instance: i.instance,
                },
                AgentState {
                    last_sequence: i.last_sequence,
                    last_seen: Instant::now().checked_sub(ago).unwrap_or_else(Instant::now),
                    streams: 0,
                    gauges: None,
                },
            );
        }
        st.models.extend(saved.models);
        self.metrics.series.set(st.totals.series_count() as i64);
        st.totals.series_count()
    }

    /// The merged view: counter and histogram totals plus the gauges of live agents.
    pub fn snapshot(&self) -> MetricStore {
        let st = self.lock();
        let mut view = st.totals.clone();
        for a in st.agents.values() {
            if let Some(g) = &a.gauges {
                // Gauges only: merging cannot hit a histogram layout mismatch.
                let _ = view.merge(g);
            }
        }
        view
    }

    /// OpenMetrics text of the merged view and the collector's own metrics.
    pub fn encode_openmetrics(&self) -> Result<String, std::fmt::Error> {
        self.encode_with(Some(self.snapshot()))
    }

    /// OpenMetrics text of the collector's own metrics only (what remote write adds to the
    /// merged view).
    pub fn encode_self_metrics(&self) -> Result<String, std::fmt::Error> {
        self.encode_with(None)
    }

    fn encode_with(&self, view: Option<MetricStore>) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        if let Some(view) = view {
            registry.register_collector(Box::new(view));
        }
        self.register_fleet_metrics(&mut registry);
        registry.register(
            "infertap_collector_agent_streams",
            "Open agent streams",
            self.metrics.agents_connected.clone(),
        );
        registry.register(
            "infertap_collector_reports",
            "Agent reports received, by result",
            self.metrics.reports.clone(),
        );
        registry.register(
            "infertap_collector_rejected_series",
            "Report series skipped because they did not match the schema, by reason",
            self.metrics.rejected_series.clone(),
        );
        let p = &self.metrics.profiles;
        registry.register(
            "infertap_collector_profiles_received",
            "Profiles received on applied reports, by result (stored, rejected)",
            p.received.clone(),
        );
        registry.register(
            "infertap_collector_profiles_rejected",
            "Profiles refused, by reason (gzip, protobuf, invalid, sample_types, sample_count, too_large, ...)",
            p.rejected.clone(),
        );
        registry.register(
            "infertap_collector_profiles_evicted",
            "Stored profiles evicted, by reason (age: older than the retention; bytes: store full)",
            p.evicted.clone(),
        );
        registry.register(
            "infertap_collector_profile_store_bytes",
            "Gzipped profile bytes held in the profile store",
            p.stored_bytes.clone(),
        );
        registry.register(
            "infertap_collector_profile_store_profiles",
            "Profiles held in the profile store",
            p.stored_profiles.clone(),
        );
        if self.forwarder.get().is_some() {
            let f = &self.metrics.forward;
            registry.register(
                "infertap_collector_profiles_forwarded",
                "Profiles delivered to the --profiles-url backend",
                f.sent.clone(),
            );
            registry.register(
                "infertap_collector_profile_forward_retries",
                "Re-sends to the --profiles-url backend after a retryable failure",
                f.retries.clone(),
            );
            registry.register(
                "infertap_collector_profile_forward_dropped",
                "Profiles not delivered to the --profiles-url backend, by reason (queue_full, retries_exhausted, rejected, shutdown)",
                f.dropped.clone(),
            );
            registry.register(
                "infertap_collector_profile_forward_queue",
                "Profiles waiting to be forwarded",
                f.queued.clone(),
            );
        }
        self.metrics.otlp.register(&mut registry);
        let mut out = String::new();
        encode(&mut out, &registry)?;
        Ok(out)
    }

    /// Self-metrics of the caps, the persisted state and remote write.
    fn register_fleet_metrics(&self, registry: &mut Registry) {
        let m = &self.metrics;
        registry.register(
            "infertap_collector_agents_rejected",
            "Agent streams refused at their hello, by reason (agent_limit: --max-agents)",
            m.agents_rejected.clone(),
        );
        registry.register(
            "infertap_collector_series",
            "Merged counter and histogram series held (gauges not included)",
            m.series.clone(),
        );
        registry.register(
            "infertap_collector_series_pruned",
            "Series removed because their agent was gone for longer than --agent-retention",
            m.series_pruned.clone(),
        );
        registry.register(
            "infertap_collector_state_load",
            "1 for how loading the --state-dir state went at start (loaded, missing, corrupt, version_mismatch, disabled)",
            m.state_load.clone(),
        );
        registry.register(
            "infertap_collector_state_writes",
            "State checkpoints written to --state-dir, by result (ok, error)",
            m.state_writes.clone(),
        );
        registry.register(
            "infertap_collector_state_bytes",
            "Size of the last state file written",
            m.state_bytes.clone(),
        );
        registry.register(
            "infertap_collector_state_write_seconds",
            "Duration of the last state checkpoint write (serialize, write, fsync, rename)",
            m.state_write_seconds.clone(),
        );
        if let Some(rw) = self.remote_write.get() {
            rw.refresh_gauges();
            rw.metrics().register(registry);
        }
    }
}

/// Splits a report into its gauges and its counted part (histograms and counters).
fn split_gauges(report: &IntervalReport) -> (IntervalReport, IntervalReport) {
    let gauges = IntervalReport {
        gauges: report.gauges.clone(),
        ..Default::default()
    };
    let counted = IntervalReport {
        sequence: report.sequence,
        start_unix_ns: report.start_unix_ns,
        end_unix_ns: report.end_unix_ns,
        histograms: report.histograms.clone(),
        counters: report.counters.clone(),
        ..Default::default()
    };
    (gauges, counted)
}

/// The gRPC service.
#[derive(Clone, Debug)]
pub struct CollectorService {
    fleet: Arc<Fleet>,
}

fn valid_identity(hello: &AgentHello) -> Result<InstanceKey, Status> {
    if hello.schema_version != schema::SCHEMA_VERSION {
        return Err(Status::failed_precondition(format!(
            "agent metric schema {} differs from the collector's {}",
            hello.schema_version,
            schema::SCHEMA_VERSION
        )));
    }
    if hello.node.is_empty() || hello.agent_id.is_empty() {
        return Err(Status::invalid_argument(
            "hello needs a node and an agent id",
        ));
    }
    Ok(InstanceKey {
        node: schema::clamp_label_value(&hello.node).to_owned(),
        agent: schema::clamp_label_value(&hello.agent_id).to_owned(),
        instance: hello.instance_id,
    })
}

#[tonic::async_trait]
impl Collector for CollectorService {
    type ReportStream = ReceiverStream<Result<Ack, Status>>;

    async fn report(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        // A peer that connects and never says hello must not hold a task forever.
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 30 s"))??;
        let hello = match first {
            Some(AgentMessage {
                msg: Some(agent_message::Msg::Hello(h)),
            }) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ))
            }
            None => return Err(Status::cancelled("stream ended before the hello")),
        };
        let key = valid_identity(&hello)
            .inspect_err(|e| tracing::warn!(?peer, "rejected agent: {}", e.message()))?;
        tracing::info!(
            node = %key.node, agent = %key.agent, instance = format_args!("{:016x}", key.instance),
            pids = ?hello.pids, version = %hello.version, ?peer, "agent connected"
        );
        self.fleet
            .connect(&key)
            .inspect_err(|e| tracing::warn!(node = %key.node, agent = %key.agent, "refused agent: {}", e.message()))?;
        // Acks queue here; one per report, so an agent's unacked window bounds it in practice.
        let (tx, rx) = mpsc::channel(64);
        let fleet = self.fleet.clone();
        // With a state dir, an ack leaves only once the state holding its report is on disk,
        // so a collector crash never loses an acked report: the agent re-sends the rest.
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(u64, u64)>();
        let ack_out = tx.clone();
        let gated = fleet.cfg.state_dir.is_some();
        let mut durable = fleet.durable.subscribe();
        tokio::spawn(async move {
            while let Some((sequence, epoch)) = ack_rx.recv().await {
                if gated && durable.wait_for(|d| *d >= epoch).await.is_err() {
                    return;
                }
                if ack_out.send(Ok(Ack { sequence })).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let clean = loop {
                match inbound.message().await {
                    Ok(Some(AgentMessage {
                        msg: Some(agent_message::Msg::Report(report)),
                    })) if report.sequence == 0 => {
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "report sequence numbers start at 1",
                            )))
                            .await;
                        break false;
                    }
                    Ok(Some(AgentMessage {
                        msg: Some(agent_message::Msg::Report(report)),
                    })) => {
                        let seq = report.sequence;
                        let (applied, epoch) = fleet.apply_at_epoch(&key, &report);
                        match applied {
                            ApplyResult::Duplicate => {
                                tracing::debug!(node = %key.node, agent = %key.agent, seq, "duplicate report acked again")
                            }
                            ApplyResult::Applied { .. } if !report.profiles.is_empty() => {
                                // Decoding and validating is CPU work: off the async threads,
                                // but before the ack, so an acked report's profiles are stored.
                                let k = key.clone();
                                let done = fleet
                                    .run_cpu(move |f| f.ingest_profiles(&k, &report.profiles))
                                    .await;
                                match done {
                                    Ok(d) => {
                                        tracing::debug!(node = %key.node, agent = %key.agent, seq, stored = d.stored.len(), rejected = d.rejected.len(), "report with profiles applied")
                                    }
                                    Err(e) => {
                                        tracing::error!(node = %key.node, agent = %key.agent, seq, "profile ingestion failed: {e}")
                                    }
                                }
                            }
                            ApplyResult::Applied { .. } => {
                                tracing::debug!(node = %key.node, agent = %key.agent, seq, "report applied")
                            }
                        }
                        if ack_tx.send((seq, epoch)).is_err() {
                            break false;
                        }
                        if gated {
                            fleet.ack_wanted.notify_one();
                        }
                    }
                    Ok(Some(_)) => {
                        let _ = tx
                            .send(Err(Status::invalid_argument("expected a report")))
                            .await;
                        break false;
                    }
                    Ok(None) => break true,
                    Err(status) => {
                        tracing::debug!(node = %key.node, agent = %key.agent, "stream error: {status}");
                        // Tell the agent why (e.g. a message over --max-message-bytes), if it
                        // is still there to hear it.
                        if matches!(
                            status.code(),
                            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
                        ) {
                            tracing::warn!(node = %key.node, agent = %key.agent, "refused a report: {}", status.message());
                        }
                        let _ = tx.send(Err(status)).await;
                        break false;
                    }
                }
            };
            fleet.disconnect(&key, clean);
            if clean {
                tracing::info!(node = %key.node, agent = %key.agent, "agent disconnected");
            } else {
                tracing::warn!(node = %key.node, agent = %key.agent, "agent stream lost; its gauges stay until the agent timeout");
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A running collector (gRPC + metrics servers + sweeper).
#[derive(Debug)]
pub struct RunningCollector {
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    fleet: Arc<Fleet>,
    stop: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

/// Starts serving on already bound listeners (port 0 works: see the `*_addr` accessors).
pub async fn start(
    cfg: CollectorConfig,
    grpc: TcpListener,
    metrics: TcpListener,
) -> anyhow::Result<RunningCollector> {
    let grpc_addr = grpc.local_addr()?;
    let metrics_addr = metrics.local_addr()?;
    let sweep_every =
        (cfg.agent_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let max_message = cfg.max_message_bytes;
    let forward = cfg.forward.clone();
    let state_interval = cfg.state_interval.max(Duration::from_millis(100));
    let rw_cfg = cfg.remote_write.clone();
    let state_dir = match &cfg.state_dir {
        Some(d) => Some(Arc::new(
            StateDir::open(d).with_context(|| format!("--state-dir {}", d.display()))?,
        )),
        None => None,
    };
    let fleet = Arc::new(Fleet::new(cfg));
    let load_result = match &state_dir {
        None => "disabled",
        Some(sd) => match sd.load(fleet.aggregate_name()) {
            Ok(None) => {
                tracing::info!(path = %sd.path().display(), "no saved state; starting empty");
                "missing"
            }
            Ok(Some(saved)) => {
                let written = saved.written_unix_ns;
                let instances = saved.instances.len();
                let series = fleet.restore(saved);
                let age = Duration::from_nanos(unix_now_ns().saturating_sub(written));
                tracing::info!(path = %sd.path().display(), series, instances, age = %humantime::format_duration(Duration::from_secs(age.as_secs())), "restored saved totals and dedupe state");
                "loaded"
            }
            Err(e) => {
                tracing::error!(path = %sd.path().display(), "saved state not loaded ({e}); starting empty, the next checkpoint replaces it");
                e.result()
            }
        },
    };
    fleet
        .metrics
        .state_load
        .get_or_create(&vec![("result".into(), load_result.into())])
        .set(1);
    let (grpc_stop, grpc_stopped) = oneshot::channel::<()>();
    let (http_stop, http_stopped) = oneshot::channel::<()>();
    let (sweep_stop, mut sweep_stopped) = oneshot::channel::<()>();
    let mut stop = Vec::new();
    let mut tasks = Vec::new();
    if let Some(fc) = forward {
        let (fwd_stop, fwd_stopped) = oneshot::channel::<()>();
        let (forwarder, task) = Forwarder::spawn(fc, fleet.metrics.forward.clone(), fwd_stopped)?;
        let _ = fleet.forwarder.set(forwarder);
        stop.push(fwd_stop);
        tasks.push(task);
    }

    let service = CollectorServer::new(CollectorService {
        fleet: fleet.clone(),
    })
    .max_decoding_message_size(max_message);
    let grpc_task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), async {
                let _ = grpc_stopped.await;
            })
            .await
            .context("gRPC server")
    });

    let app = http::router(fleet.clone());
    let http_task = tokio::spawn(async move {
        axum::serve(metrics, app)
            .with_graceful_shutdown(async {
                let _ = http_stopped.await;
            })
            .await
            .context("metrics server")
    });

    let (rw_stop_tx, rw_stop) = tokio::sync::watch::channel(false);
    if let Some(rc) = rw_cfg.clone() {
        let rw = Arc::new(RemoteWrite::open(rc)?);
        tasks.extend(rw.spawn_senders(rw_stop)?);
        let _ = fleet.remote_write.set(rw);
    }
    if state_dir.is_some() || rw_cfg.is_some() {
        let (cp_stop, cp_stopped) = oneshot::channel::<()>();
        let rw_every = rw_cfg
            .as_ref()
            .map(|c| c.interval.max(Duration::from_millis(100)));
        let task = tokio::spawn(run_checkpoints(
            fleet.clone(),
            state_dir,
            state_interval,
            rw_every,
            cp_stopped,
            rw_stop_tx,
        ));
        stop.push(cp_stop);
        tasks.push(task);
    }

    let sweep_fleet = fleet.clone();
    let sweep_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweep_every);
        loop {
            tokio::select! {
                _ = tick.tick() => sweep_fleet.sweep(),
                _ = &mut sweep_stopped => return Ok(()),
            }
        }
    });
    tracing::info!(%grpc_addr, %metrics_addr, "collector listening");
    stop.extend([grpc_stop, http_stop, sweep_stop]);
    tasks.extend([grpc_task, http_task, sweep_task]);
    Ok(RunningCollector {
        grpc_addr,
        metrics_addr,
        fleet,
        stop,
        tasks,
    })
}

impl RunningCollector {
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Stops all servers gracefully and waits for them. The first failure is returned.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        for s in self.stop {
            let _ = s.send(());
        }
        let mut result = Ok(());
        for t in self.tasks {
            let r = t.await.context("collector task panicked").and_then(|r| r);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// Waits until a server task ends on its own (an error: they run until shut down).
    pub async fn wait_failure(&mut self) -> anyhow::Error {
        let (res, idx) = first_finished(&mut self.tasks).await;
        self.tasks.remove(idx);
        match res {
            Ok(Ok(())) => anyhow::anyhow!("a collector server stopped unexpectedly"),
            Ok(Err(e)) => e,
            Err(e) => anyhow::Error::new(e).context("collector task panicked"),
        }
    }
}

/// Checkpoints: the state is written every `state_interval`, and sooner when acks are waiting
/// for it (group commit: one write covers every report applied before it), but never more
/// often than ten times the last write took (at least 100 ms apart), so writing the state costs
/// at most about a tenth of a core however busy the fleet. Acks waiting for it are then
/// released. Every `rw_every` the same checkpoint also goes to remote write. The snapshot sent
/// is the state just persisted, so a restarted collector never reports less than a store has
/// already seen (no false counter resets). On stop: a last checkpoint, up to 5 s for the
/// senders to drain, then the senders stop.
async fn run_checkpoints(
    fleet: Arc<Fleet>,
    state_dir: Option<Arc<StateDir>>,
    state_interval: Duration,
    rw_every: Option<Duration>,
    mut stopped: oneshot::Receiver<()>,
    rw_stop: tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<()> {
    let mut state_tick = tokio::time::interval(state_interval);
    state_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rw_tick = tokio::time::interval(rw_every.unwrap_or(Duration::from_secs(3600)));
    rw_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_write = Instant::now();
    let mut last_took = Duration::ZERO;
    loop {
        tokio::select! {
            _ = state_tick.tick(), if state_dir.is_some() => {
                let t = Instant::now();
                checkpoint_once(&fleet, state_dir.clone(), false).await;
                (last_write, last_took) = (Instant::now(), t.elapsed());
            }
            _ = fleet.ack_wanted.notified(), if state_dir.is_some() => {
                let gap = (last_took * 10).max(Duration::from_millis(100)).min(state_interval);
                let wait = gap.saturating_sub(last_write.elapsed());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut stopped => break,
                }
                let t = Instant::now();
                checkpoint_once(&fleet, state_dir.clone(), false).await;
                (last_write, last_took) = (Instant::now(), t.elapsed());
            }
            _ = rw_tick.tick(), if rw_every.is_some() => {
                let t = Instant::now();
                checkpoint_once(&fleet, state_dir.clone(), true).await;
                (last_write, last_took) = (Instant::now(), t.elapsed());
            }
            _ = &mut stopped => break,
        }
    }
    checkpoint_once(&fleet, state_dir.clone(), rw_every.is_some()).await;
    if let Some(rw) = fleet.remote_write.get() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if rw.all_sent() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let _ = rw_stop.send(true);
    Ok(())
}

async fn checkpoint_once(fleet: &Arc<Fleet>, state_dir: Option<Arc<StateDir>>, remote: bool) {
    let cp = fleet.checkpoint();
    let self_text = if remote {
        fleet.encode_self_metrics().unwrap_or_default()
    } else {
        String::new()
    };
    let f = fleet.clone();
    let done = tokio::task::spawn_blocking(move || {
        let view = remote.then(|| cp.view());
        let Checkpoint {
            epoch,
            totals,
            instances,
            models,
            ..
        } = cp;
        if let Some(sd) = state_dir {
            let started = Instant::now();
            let saved = infertap_proto::state_pb::CollectorState {
                format_version: state::FORMAT_VERSION,
                schema_version: schema::SCHEMA_VERSION,
                written_unix_ns: unix_now_ns(),
                aggregate_by: f.aggregate_name().into(),
                totals: Some(totals.interval_report(&MetricStore::new(), 0, 0)),
                instances,
                models,
            };
            let result = match sd.write(&saved) {
                Ok(bytes) => {
                    f.metrics.state_bytes.set(bytes as i64);
                    "ok"
                }
                Err(e) => {
                    // Acks are released anyway: holding them would only make agents buffer
                    // until their own bound; the log and the counter say state is not durable.
                    tracing::error!(path = %sd.path().display(), "writing the state checkpoint failed: {e}");
                    "error"
                }
            };
            f.metrics
                .state_writes
                .get_or_create(&vec![("result".into(), result.into())])
                .inc();
            f.metrics
                .state_write_seconds
                .set(started.elapsed().as_secs_f64());
        }
        f.durable.send_modify(|d| *d = (*d).max(epoch));
        if let (Some(view), Some(rw)) = (view, f.remote_write.get()) {
            rw.enqueue_snapshot(&view, &self_text, (unix_now_ns() / 1_000_000) as i64);
        }
    })
    .await;
    if let Err(e) = done {
        tracing::error!("checkpoint task failed: {e}");
    }
}

/// The first of `tasks` to finish, and its index (`select_all` without the futures crate).
async fn first_finished(
    tasks: &mut [JoinHandle<anyhow::Result<()>>],
) -> (Result<anyhow::Result<()>, tokio::task::JoinError>, usize) {
    std::future::poll_fn(|cx| {
        for (i, t) in tasks.iter_mut().enumerate() {
            if let std::task::Poll::Ready(r) = std::pin::Pin::new(t).poll(cx) {
                return std::task::Poll::Ready((r, i));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use infertap_proto::pb;

    fn key(node: &str) -> InstanceKey {
        InstanceKey {
            node: node.into(),
            agent: "a".into(),
            instance: 7,
        }
    }

    fn report(seq: u64, requests: u64, running: f64) -> IntervalReport {
        let def = &schema::E2E_REQUEST_LATENCY;
        let mut buckets = vec![0; def.bucket_count()];
        buckets[3] = requests;
        IntervalReport {
            sequence: seq,
            histograms: vec![pb::Histogram {
                name: def.name.into(),
                labels: vec![pb::Label {
                    name: "model_name".into(),
                    value: "m".into(),
                }],
                bucket_counts: buckets,
                sum: requests as f64,
                count: requests,
            }],
            counters: vec![pb::Counter {
                name: schema::REQUESTS.name.into(),
                labels: vec![
                    pb::Label {
                        name: "model_name".into(),
                        value: "m".into(),
                    },
                    pb::Label {
                        name: "outcome".into(),
                        value: "ok".into(),
                    },
                ],
                value: requests,
            }],
            gauges: vec![pb::Gauge {
                name: schema::REQUESTS_RUNNING.name.into(),
                labels: vec![],
                value: running,
            }],
            ..Default::default()
        }
    }

    fn req_labels(prefix: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut l: Vec<(String, String)> = prefix
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        l.push(("model_name".into(), "m".into()));
        l.push(("outcome".into(), "ok".into()));
        l
    }

    #[test]
    fn duplicates_are_idempotent_and_fleet_merges() {
        let fleet = Fleet::new(CollectorConfig {
            aggregate_by: AggregateBy::Fleet,
            ..Default::default()
        });
        let (k1, k2) = (key("n1"), key("n2"));
        fleet.connect(&k1).unwrap();
        fleet.connect(&k2).unwrap();
        assert_eq!(
            fleet.apply(&k1, &report(1, 2, 1.0)),
            ApplyResult::Applied { rejected_series: 0 }
        );
        assert_eq!(fleet.apply(&k1, &report(1, 2, 1.0)), ApplyResult::Duplicate);
        assert_eq!(
            fleet.apply(&k1, &report(3, 5, 2.0)),
            ApplyResult::Applied { rejected_series: 0 }
        );
        assert_eq!(
            fleet.apply(&k1, &report(2, 100, 9.0)),
            ApplyResult::Duplicate,
            "late lower sequence"
        );
        fleet.apply(&k2, &report(1, 10, 4.0));
        let view = fleet.snapshot();
        assert_eq!(view.counter(&schema::REQUESTS, &req_labels(&[])), Some(17));
        let h = view
            .histogram(
                &schema::E2E_REQUEST_LATENCY,
                &vec![("model_name".into(), "m".into())],
            )
            .unwrap();
        assert_eq!((h.count, h.buckets[3]), (17, 17));
        assert_eq!(view.gauge(&schema::REQUESTS_RUNNING, &vec![]), Some(6.0));
    }

    #[test]
    fn clean_disconnect_and_timeout_drop_gauges_only() {
        let fleet = Fleet::new(CollectorConfig {
            agent_timeout: Duration::from_millis(50),
            ..Default::default()
        });
        let (k1, k2) = (key("n1"), key("n2"));
        fleet.connect(&k1).unwrap();
        fleet.connect(&k2).unwrap();
        fleet.apply(&k1, &report(1, 1, 3.0));
        fleet.apply(&k2, &report(1, 1, 5.0));
        let g = |f: &Fleet, n: &str| {
            f.snapshot().gauge(
                &schema::REQUESTS_RUNNING,
                &vec![("node".into(), n.into()), ("agent".into(), "a".into())],
            )
        };
        assert_eq!((g(&fleet, "n1"), g(&fleet, "n2")), (Some(3.0), Some(5.0)));
        fleet.disconnect(&k1, true);
        assert_eq!(g(&fleet, "n1"), None, "clean shutdown drops gauges at once");
        fleet.disconnect(&k2, false);
        fleet.sweep();
        assert_eq!(
            g(&fleet, "n2"),
            Some(5.0),
            "lost stream keeps gauges until the timeout"
        );
        std::thread::sleep(Duration::from_millis(80));
        fleet.sweep();
        assert_eq!(g(&fleet, "n2"), None);
        let c = fleet.snapshot().counter(
            &schema::REQUESTS,
            &req_labels(&[("node", "n2"), ("agent", "a")]),
        );
        assert_eq!(c, Some(1), "counters keep their totals");
    }

    #[test]
    fn model_labels_are_capped_fleet_wide() {
        let fleet = Fleet::new(CollectorConfig {
            max_models: 1,
            aggregate_by: AggregateBy::Fleet,
            ..Default::default()
        });
        let k = key("n");
        fleet.connect(&k).unwrap();
        let mut r = report(1, 1, 0.0);
        fleet.apply(&k, &r);
        r.sequence = 2;
        r.counters[0].labels[0].value = "other-model".into();
        r.histograms.clear();
        fleet.apply(&k, &r);
        let view = fleet.snapshot();
        let mut other = req_labels(&[]);
        other[0].1 = "other".into();
        assert_eq!(view.counter(&schema::REQUESTS, &other), Some(1));
    }

    #[test]
    fn node_mode_merges_agents_of_a_node() {
        let fleet = Fleet::new(CollectorConfig {
            aggregate_by: AggregateBy::Node,
            ..Default::default()
        });
        let a = InstanceKey {
            node: "n1".into(),
            agent: "a".into(),
            instance: 1,
        };
        let b = InstanceKey {
            node: "n1".into(),
            agent: "b".into(),
            instance: 2,
        };
        let c = InstanceKey {
            node: "n2".into(),
            agent: "a".into(),
            instance: 3,
        };
        for (k, n) in [(&a, 1), (&b, 2), (&c, 4)] {
            fleet.connect(k).unwrap();
            fleet.apply(k, &report(1, n, n as f64));
        }
        let view = fleet.snapshot();
        assert_eq!(
            view.counter(&schema::REQUESTS, &req_labels(&[("node", "n1")])),
            Some(3)
        );
        assert_eq!(
            view.counter(&schema::REQUESTS, &req_labels(&[("node", "n2")])),
            Some(4)
        );
        assert_eq!(
            view.gauge(
                &schema::REQUESTS_RUNNING,
                &vec![("node".into(), "n1".into())]
            ),
            Some(3.0)
        );
    }

    #[test]
    fn series_and_agent_caps_refuse_and_count() {
        let fleet = Fleet::new(CollectorConfig {
            max_series: 3,
            max_agents: 2,
            ..Default::default()
        });
        let (k1, k2, k3) = (key("n1"), key("n2"), key("n3"));
        fleet.connect(&k1).unwrap();
        fleet.connect(&k2).unwrap();
        let err = fleet.connect(&k3).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        // A second stream of a known identity is not a new agent.
        fleet.connect(&k1).unwrap();
        // n1: histogram + counter + gauge = 3 series; n2's are all new and refused.
        fleet.apply(&k1, &report(1, 1, 1.0));
        fleet.apply(&k2, &report(1, 1, 1.0));
        let view = fleet.snapshot();
        assert_eq!(view.series_count(), 3);
        assert_eq!(
            view.counter(
                &schema::REQUESTS,
                &req_labels(&[("node", "n2"), ("agent", "a")])
            ),
            None
        );
        let text = fleet.encode_openmetrics().unwrap();
        assert!(
            text.contains(r#"infertap_collector_rejected_series_total{reason="series_limit"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"infertap_collector_agents_rejected_total{reason="agent_limit"} 1"#),
            "{text}"
        );
        // Existing series keep taking deltas.
        fleet.apply(&k1, &report(2, 5, 1.0));
        assert_eq!(
            fleet.snapshot().counter(
                &schema::REQUESTS,
                &req_labels(&[("node", "n1"), ("agent", "a")])
            ),
            Some(6)
        );
    }

    #[test]
    fn stale_agents_are_pruned_after_the_retention() {
        let fleet = Fleet::new(CollectorConfig {
            agent_retention: Duration::from_millis(50),
            agent_timeout: Duration::from_millis(10),
            ..Default::default()
        });
        let (k1, k2) = (key("n1"), key("n2"));
        fleet.connect(&k1).unwrap();
        fleet.connect(&k2).unwrap();
        fleet.apply(&k1, &report(1, 1, 1.0));
        fleet.apply(&k2, &report(1, 2, 1.0));
        fleet.disconnect(&k1, true);
        std::thread::sleep(Duration::from_millis(80));
        fleet.sweep();
        let view = fleet.snapshot();
        let c = |n: &str| {
            view.counter(
                &schema::REQUESTS,
                &req_labels(&[("node", n), ("agent", "a")]),
            )
        };
        assert_eq!(c("n1"), None, "gone longer than the retention: pruned");
        assert_eq!(c("n2"), Some(2), "still connected: kept");
        // Its dedupe state went too: the same instance starts over.
        fleet.connect(&k1).unwrap();
        assert_eq!(
            fleet.apply(&k1, &report(1, 1, 1.0)),
            ApplyResult::Applied { rejected_series: 0 }
        );
    }

    #[test]
    fn checkpoint_restores_totals_and_dedupe_exactly() {
        let fleet = Fleet::new(CollectorConfig::default());
        let (k1, k2) = (key("n1"), key("n2"));
        fleet.connect(&k1).unwrap();
        fleet.connect(&k2).unwrap();
        fleet.apply(&k1, &report(1, 3, 1.0));
        fleet.apply(&k1, &report(2, 4, 1.0));
        fleet.apply(&k2, &report(5, 7, 2.0));
        let Checkpoint {
            epoch,
            totals,
            instances,
            models,
            ..
        } = fleet.checkpoint();
        assert_eq!(fleet.checkpoint().epoch, epoch + 1);
        let saved = infertap_proto::state_pb::CollectorState {
            format_version: state::FORMAT_VERSION,
            schema_version: schema::SCHEMA_VERSION,
            written_unix_ns: unix_now_ns(),
            aggregate_by: "agent".into(),
            totals: Some(totals.interval_report(&MetricStore::new(), 0, 0)),
            instances,
            models,
        };
        let back = Fleet::new(CollectorConfig::default());
        assert_eq!(back.restore(saved), totals.series_count());
        let mut restored = back.snapshot();
        restored.clear_gauges();
        assert_eq!(restored, totals);
        // Re-sent reports the saved state covers are duplicates; newer ones apply.
        back.connect(&k1).unwrap();
        assert_eq!(back.apply(&k1, &report(2, 4, 1.0)), ApplyResult::Duplicate);
        assert_eq!(
            back.apply(&k1, &report(3, 1, 1.0)),
            ApplyResult::Applied { rejected_series: 0 }
        );
        assert_eq!(
            back.snapshot().counter(
                &schema::REQUESTS,
                &req_labels(&[("node", "n1"), ("agent", "a")])
            ),
            Some(8)
        );
    }
}
