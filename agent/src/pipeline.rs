//! Wires the stages: probes → events → reconstruct → records → sinks (JSON lines, aggregates for
//! Prometheus and the collector).
//!
//! One task owns the ring buffer and the reconstruction state, so the hot path takes no locks;
//! it drains the ring when the kernel wakes it (ring above `wakeup_bytes`) or on a short poll
//! tick (records are written without wake-ups to keep the per-syscall cost low).

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{
    aggregate::{Aggregator, DEFAULT_MAX_MODELS},
    clock::{self, Clock},
    events::{self, ConnEvent, Event, ProcEvent},
    gpu::{
        correlate::{CorrelatedRequest, RequestGpuStats},
        nvml::NvmlExport,
        stage::{GpuOptions, GpuStage},
        trace::TraceWriter,
    },
    probes::{ProbeConfig, Probes},
    profiling::stage::{Profiler, ProfilerOptions, ProfilerReport},
    reconstruct::{ReconstructConfig, Reconstructor, UntracedKind},
    record::RequestRecord,
    server_metrics::{ServerMetrics, ServerMetricsConfig},
    sinks::jsonl::{self, JsonLines, RequestLine},
    sinks::{
        grpc::{ExporterConfig, GrpcExporter},
        otlp::{self, OtlpConfig, OtlpExporter},
        prometheus::{self, MetricsServer},
    },
    targets,
};

/// Everything the agent needs to run (built from the CLI).
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub requests: Option<String>,
    pub print: bool,
    pub probe: ProbeConfig,
    pub poll_interval: Duration,
    pub duration: Option<Duration>,
    pub ready_file: Option<PathBuf>,
    /// How often `--port` owners and CUDA libraries are re-resolved.
    pub rescan_interval: Duration,
    pub cuda: CudaOptions,
    pub gpu: GpuOptions,
    /// Prometheus endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// Collector to stream interval aggregates to.
    pub collector: Option<String>,
    /// Aggregation interval for the collector.
    pub interval: Duration,
    /// Node name reported to the collector.
    pub node: String,
    /// `--agent-id`: the agent label on the collector (None: persisted in `state_dir`).
    pub agent_id: Option<String>,
    /// Where the generated agent id is kept (`--state-dir`).
    pub state_dir: PathBuf,
    /// Keep every completed request with its GPU attribution (`infertap explain`).
    pub keep_requests: bool,
    /// Record a Perfetto trace of the run (`infertap trace`).
    pub trace: bool,
    /// Continuous profiling (None: off). Its sampling sources are set in `probe.profile`.
    pub profiler: Option<ProfilerOptions>,
    /// Also write every interval's profiles as files into this directory.
    pub profile_dir: Option<PathBuf>,
    /// Export spans and metrics over OTLP/gRPC (`--otlp-endpoint`).
    pub otlp: Option<OtlpConfig>,
    /// Read the traced servers' own `/metrics` (`server_metrics`), once per `interval`.
    pub server_metrics: bool,
    /// Container/pod metadata on records and series (None: off).
    pub k8s: Option<crate::metadata::K8sOptions>,
}

/// CUDA launch-path probing.
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    pub enabled: bool,
    /// Libraries to probe in addition to those found in the traced processes' maps.
    pub libs: Vec<PathBuf>,
    /// Probe every process that maps the libraries (e.g. engine processes not forked from the
    /// traced server), not only the traced set.
    pub all_processes: bool,
    /// Emit one record per call (trace windows) instead of aggregating in the kernel only.
    pub per_event: bool,
}

/// Counters of the user-space side (the kernel keeps its own, see `probes::KernelCounters`).
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub records_decoded: AtomicU64,
    pub decode_errors: AtomicU64,
    pub requests_completed: AtomicU64,
}

/// Adopted connections get ids with the top bit set so they never collide with kernel ids
/// (monotonic timestamps).
const ADOPTED_CONN_ID_BASE: u64 = 1 << 63;

type RecordObserver = Box<dyn FnMut(&RequestRecord) + Send>;
type CudaObserver = Box<dyn FnMut(&events::CudaCall) + Send>;

pub struct Pipeline {
    opts: AgentOptions,
    probes: Probes,
    recon: Reconstructor,
    clock: Clock,
    jsonl: Option<JsonLines>,
    known_pids: HashSet<u32>,
    next_adopted_id: u64,
    pub stats: PipelineStats,
    records: Vec<RequestRecord>,
    /// Called for every completed request (embedders, tests).
    observers: Vec<RecordObserver>,
    /// Called for every CUDA call record (per-event mode only: trace windows).
    cuda_observers: Vec<CudaObserver>,
    aggregator: Aggregator,
    exporter: Option<GrpcExporter>,
    otlp: Option<OtlpExporter>,
    metrics_server: Option<MetricsServer>,
    gpu: GpuStage,
    /// NVML snapshots → `infertap_gpu_*` series (keeps the energy/ECC running totals).
    nvml_export: NvmlExport,
    /// The traced servers' own metrics (`--no-server-metrics` turns it off).
    server_metrics: Option<ServerMetrics>,
    /// Records of our own scrapes of the servers (dropped: not user requests).
    pub own_scrapes_dropped: u64,
    profiler: Option<Profiler>,
    /// What the profiler reported when it stopped (attributions, whole-run profiles).
    profiler_report: Option<ProfilerReport>,
    /// Completed requests with their GPU attribution (`keep_requests`).
    pub kept: Vec<CorrelatedRequest>,
    /// pid → container/pod metadata (`--k8s`).
    metadata: Option<crate::metadata::Resolver>,
    /// Exited processes whose metadata is forgotten at the next tick (after their last
    /// records went out).
    exited_pids: Vec<u32>,
}

impl Pipeline {
    /// Loads the probes and starts the sinks and GPU sources. Runs inside a tokio runtime.
    pub async fn new(opts: AgentOptions) -> Result<Self> {
        let mut probes = Probes::load(&opts.probe)?;
        if opts.cuda.enabled {
            probes.cuda.set_all_processes(opts.cuda.all_processes)?;
            probes.cuda.set_per_event(opts.cuda.per_event)?;
            for lib in &opts.cuda.libs {
                probes
                    .attach_cuda_library(lib)
                    .with_context(|| format!("--cuda-lib {}", lib.display()))?;
            }
        }
        let jsonl = opts.requests.as_deref().map(JsonLines::open).transpose()?;
        let started_unix_ns = clock::unix_ns();
        let aggregator = Aggregator::new(DEFAULT_MAX_MODELS, started_unix_ns);
        let clock = Clock::measure();
        let mut gpu = GpuStage::start(&opts.gpu);
        if opts.trace {
            gpu.trace = Some(TraceWriter::new(clock.unix_offset_ns()));
        }
        // NVML gauges are schema series in the aggregator's store (published on every tick),
        // so the endpoint needs no extra families.
        let metrics_server = match opts.metrics_addr {
            Some(addr) => Some(prometheus::serve(addr, aggregator.shared()).await?),
            None => None,
        };
        let exporter = match &opts.collector {
            Some(url) => {
                let agent_id = crate::identity::agent_id(
                    opts.agent_id.as_deref(),
                    &opts.state_dir,
                    &opts.node,
                );
                let mut cfg = ExporterConfig::new(url.clone(), opts.node.clone(), agent_id);
                cfg.pids = opts.pids.clone();
                Some(GrpcExporter::spawn(cfg).with_context(|| format!("--collector {url}"))?)
            }
            None => None,
        };
        let otlp = match &opts.otlp {
            Some(cfg) => Some(
                OtlpExporter::spawn(cfg.clone(), Some((aggregator.shared(), started_unix_ns)))
                    .with_context(|| format!("--otlp-endpoint {}", cfg.client.endpoint))?,
            ),
            None => None,
        };
        let profiler = match (&opts.profiler, probes.take_profile()) {
            (Some(po), Some(pp)) => {
                let to_collector = exporter.as_ref().map(|e| e.profile_sink());
                let mut to_dir = match &opts.profile_dir {
                    Some(d) => Some(crate::sinks::pprof::ProfileDir::open(d, 360)?),
                    None => None,
                };
                let sink: crate::profiling::stage::ProfileSinkFn = Box::new(move |p| {
                    if let Some(s) = &to_collector {
                        s.attach(p.clone());
                    }
                    if let Some(d) = to_dir.as_mut() {
                        d.write(p);
                    }
                });
                Some(Profiler::spawn(po.clone(), pp, sink)?)
            }
            _ => None,
        };
        let metadata = opts
            .k8s
            .as_ref()
            .map(crate::metadata::Resolver::start)
            .transpose()
            .context("pod metadata")?;
        Ok(Self {
            metadata,
            exited_pids: Vec::new(),
            aggregator,
            exporter,
            otlp,
            metrics_server,
            gpu,
            nvml_export: NvmlExport::default(),
            server_metrics: opts.server_metrics.then(|| {
                ServerMetrics::spawn(ServerMetricsConfig {
                    period: opts.interval,
                    only_ports: opts.ports.clone(),
                    ..ServerMetricsConfig::default()
                })
            }),
            own_scrapes_dropped: 0,
            profiler,
            profiler_report: None,
            kept: Vec::new(),
            probes,
            recon: Reconstructor::new(ReconstructConfig::default()),
            clock,
            jsonl,
            known_pids: HashSet::new(),
            next_adopted_id: ADOPTED_CONN_ID_BASE,
            stats: PipelineStats::default(),
            records: Vec::new(),
            observers: Vec::new(),
            cuda_observers: Vec::new(),
            opts,
        })
    }

    pub fn add_observer(&mut self, f: impl FnMut(&RequestRecord) + Send + 'static) {
        self.observers.push(Box::new(f));
    }

    pub fn add_cuda_observer(&mut self, f: impl FnMut(&events::CudaCall) + Send + 'static) {
        self.cuda_observers.push(Box::new(f));
    }

    pub fn reconstructor(&self) -> &Reconstructor {
        &self.recon
    }

    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Starts tracing a process: its future connections through the kernel filter, its current
    /// ones by adoption.
    pub fn trace_pid(&mut self, pid: u32) -> Result<()> {
        if !targets::process_alive(pid) {
            anyhow::bail!("process {pid} does not exist");
        }
        self.probes.add_target(pid)?;
        if let Some(p) = &self.profiler {
            p.add_root(pid);
        }
        if let Some(m) = self.metadata.as_mut() {
            // Reads the process's cgroup once and, for a container the kubelet has not
            // named yet, wakes the refresher before the first request completes.
            m.lookup(pid);
        }
        if self.known_pids.insert(pid) {
            // One /proc read per process: the ports it listens on now (the kernel's listen()
            // hook adds later ones), so requests' arrival is stamped from their handshake, and
            // the connections it already has, to adopt.
            let sockets = targets::server_sockets(pid);
            if let Some(a) = &mut self.probes.arrival {
                let mut ports = sockets.listening_ports.clone();
                ports.extend(self.opts.ports.iter().copied());
                a.add_listen_ports(&ports);
            }
            let now = clock::monotonic_ns();
            let existing = sockets.connections;
            for c in &existing {
                let conn_id = self.next_adopted_id;
                self.next_adopted_id += 1;
                if let Err(e) = self.probes.adopt_connection(pid, c.fd, conn_id) {
                    warn!("{e:#}");
                    continue;
                }
                let ev = ConnEvent::Open {
                    conn: events::ConnKey { pid, conn_id },
                    fd: c.fd,
                    ts_ns: now,
                    peer: Some(c.peer),
                    established_ns: None,
                };
                self.recon.on_event(&ev, &mut self.records);
                self.recon.mark_adopted(ev.conn());
            }
            info!(
                "tracing pid {pid} ({} open connection(s) adopted)",
                existing.len()
            );
        }
        Ok(())
    }

    /// Probes CUDA libraries the traced processes mapped since the last look (late dlopen,
    /// new engine processes).
    fn rescan_cuda(&mut self) {
        if self.opts.cuda.enabled {
            self.probes.attach_cuda();
            self.gpu
                .set_cuda_probed(!self.probes.cuda.attached_libraries.is_empty());
        }
    }

    /// Resolves `--port` owners and adds new ones.
    fn rescan_ports(&mut self) {
        for port in self.opts.ports.clone() {
            for pid in targets::port_owners(port) {
                if !self.known_pids.contains(&pid) {
                    if let Err(e) = self.trace_pid(pid) {
                        warn!("port {port}: {e:#}");
                    }
                }
            }
        }
    }

    fn handle_record(&mut self, raw: &[u8]) {
        self.stats.records_decoded.fetch_add(1, Ordering::Relaxed);
        match events::decode(raw) {
            Ok(Some(Event::Conn(ConnEvent::Open { conn, fd, .. })))
                if events::accept_family(raw) == Some(libc::AF_UNIX) =>
            {
                // A unix-domain socket (ZMQ IPC, a torch store): never HTTP over TCP.
                self.recon
                    .untrace(conn, Some(fd), UntracedKind::Unix, &mut self.records);
            }
            Ok(Some(Event::Conn(ev))) => {
                if let ConnEvent::Open {
                    conn,
                    fd,
                    ts_ns,
                    peer: None,
                    established_ns,
                } = ev
                {
                    // The caller of accept passed no address buffer: ask /proc.
                    let peer = targets::peer_of(conn.pid, fd);
                    if peer.is_none() && targets::is_unix_socket(conn.pid, fd) == Some(true) {
                        self.recon
                            .untrace(conn, Some(fd), UntracedKind::Unix, &mut self.records);
                        self.apply_untraced();
                        return;
                    }
                    self.recon.on_event(
                        &ConnEvent::Open {
                            conn,
                            fd,
                            ts_ns,
                            peer,
                            established_ns,
                        },
                        &mut self.records,
                    );
                } else {
                    self.recon.on_event(&ev, &mut self.records);
                    if let Some(tail) = events::decode_tail(raw) {
                        self.recon.on_event(&tail, &mut self.records);
                    }
                }
            }
            Ok(Some(Event::Proc(ProcEvent::Exit { pid, ts_ns }))) => {
                info!("traced process {pid} exited");
                self.recon.on_process_exit(pid, ts_ns, &mut self.records);
                self.probes.forget_process(pid);
                self.known_pids.remove(&pid);
                self.exited_pids.push(pid);
                if let Some(p) = &self.profiler {
                    p.process_exited(pid);
                }
            }
            Ok(Some(Event::Proc(ProcEvent::Exec { pid, .. }))) => {
                if let Some(p) = &self.profiler {
                    p.process_exec(pid);
                }
            }
            Ok(Some(Event::Cuda(call))) => {
                self.gpu.add_cuda_call(&call);
                for obs in &mut self.cuda_observers {
                    obs(&call);
                }
            }
            Ok(Some(Event::Proc(ProcEvent::Fork { .. }))) | Ok(None) => {}
            Err(e) => {
                self.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                warn!("undecodable event record: {e}");
            }
        }
        if self.recon.has_untraced() {
            self.apply_untraced();
        }
    }

    /// Removes the connections the reconstruction found not to speak HTTP/1.x from the
    /// kernel's map: from now on their syscalls are filtered out by one failed lookup.
    fn apply_untraced(&mut self) {
        for u in self.recon.take_untraced() {
            let removed = self
                .probes
                .untrace_connection(u.conn.pid, u.conn.conn_id, u.fd);
            tracing::debug!(
                "connection {} of pid {} is {}, not HTTP/1.x: untraced (kernel entry {})",
                u.conn.conn_id,
                u.conn.pid,
                u.kind.name(),
                if removed { "removed" } else { "already gone" }
            );
        }
    }

    /// Completed requests go to the GPU stage (which holds them until their GPU data arrived)
    /// or, with no GPU source active, straight to the sinks.
    fn flush_records(&mut self) {
        for mut r in std::mem::take(&mut self.records) {
            if let (Some(sm), Some(peer)) = (&self.server_metrics, r.peer) {
                if sm.own_scrapes().contains(peer) {
                    // The agent's own GET /metrics: not a user request.
                    self.own_scrapes_dropped += 1;
                    continue;
                }
            }
            if let Some(m) = self.metadata.as_mut() {
                r.k8s = m.lookup(r.pid);
            }
            if let Some(r) = self.gpu.finish_request(r) {
                self.emit(r, None);
            }
        }
    }

    /// Writes one completed request to every sink.
    fn emit(&mut self, mut r: RequestRecord, gpu: Option<RequestGpuStats>) {
        if let Some(m) = self.metadata.as_mut() {
            if r.k8s.is_none() {
                r.k8s = m.lookup(r.pid);
            }
            m.note_record(r.k8s.as_deref());
        }
        self.stats
            .requests_completed
            .fetch_add(1, Ordering::Relaxed);
        if self.jsonl.is_some() || self.otlp.is_some() {
            // One line for both: the span reuses the line's times and figures.
            let mut line = RequestLine::new(&r, &self.clock);
            if let Some(o) = &self.otlp {
                o.submit_with(|| otlp::request_span(&r, &line, gpu.as_ref(), &self.clock));
            }
            if let Some(out) = self.jsonl.as_mut() {
                line.gpu = gpu.as_ref().and_then(|g| serde_json::to_value(g).ok());
                out.write(&line);
            }
        }
        if self.opts.print {
            eprintln!("{}", jsonl::human_line(&r));
        }
        self.aggregator.observe(&r);
        if let Some(p) = &self.profiler {
            p.request_completed(std::sync::Arc::new(r.clone()));
        }
        if let Some(g) = &gpu {
            self.aggregator.observe_gpu(&r, g);
        }
        if let Some(t) = self.gpu.trace.as_mut() {
            t.add_request(&r, gpu.as_ref());
        }
        for obs in &mut self.observers {
            obs(&r);
        }
        if self.opts.keep_requests {
            let gpu = gpu.unwrap_or_default();
            self.kept.push(CorrelatedRequest { record: r, gpu });
        }
    }

    /// Periodic housekeeping: idle connections, GPU correlation, gauges.
    fn tick(&mut self) {
        let now = clock::monotonic_ns();
        self.recon.expire_idle(now, &mut self.records);
        self.flush_records();
        self.gpu.drain_sources();
        self.gpu.note_in_flight(self.recon.in_flight_requests());
        for c in self.gpu.poll(now) {
            self.emit(c.record, Some(c.gpu));
        }
        // GPU time per sampled launch (CUPTI launch ↔ kernel join), for the GPU profile.
        let timings = self.gpu.take_launch_timings();
        if let Some(p) = &self.profiler {
            p.gpu_launch_timings(timings);
        }
        let f = self.recon.in_flight();
        self.aggregator.set_in_flight(f.running, f.waiting);
        if let Some(h) = self.gpu.nvml() {
            self.aggregator
                .set_gpu_devices(&mut self.nvml_export, &h.snapshot());
        }
        if let Some(sm) = &self.server_metrics {
            sm.set_pids(self.known_pids.iter().copied().collect());
            self.aggregator.set_server_series(&sm.series());
        }
        if let Some(m) = self.metadata.as_mut() {
            for pid in self.exited_pids.drain(..) {
                m.forget(pid);
            }
        } else {
            self.exited_pids.clear();
        }
        self.update_drops();
    }

    /// Publishes every component's cumulative drop counts as
    /// `infertap_events_dropped_total{reason}`, and the queue gauges kept from the same kernel
    /// arrival counters.
    fn update_drops(&mut self) {
        use infertap_common::counter as k;
        let kc = self.probes.counters();
        // One read of the arrival counters serves its drop reason and the queue gauges.
        let arrival = self.probes.arrival.as_ref().map(|a| a.counters());
        if let Some(c) = arrival {
            self.aggregator.set_queue_depths(c.unread(), c.unaccepted());
        }
        let rs = self.recon.stats().clone();
        let mut drops: Vec<(&str, u64)> = vec![
            ("ringbuf_full", kc.get(k::RINGBUF_FULL)),
            ("conn_map_full", kc.get(k::CONN_MAP_FULL)),
            ("payload_fault", kc.get(k::PAYLOAD_FAULT)),
            ("cuda_map_full", kc.get(k::CUDA_MAP_FULL)),
            ("sample_ring_full", kc.get(k::SAMPLE_RING_FULL)),
            ("sample_failed", kc.get(k::SAMPLE_FAILED)),
            ("profile_map_full", kc.get(k::PROFILE_MAP_FULL)),
            ("sample_busy", kc.get(k::SAMPLE_BUSY)),
            ("sock_map_full", arrival.map_or(0, |c| c.map_full())),
            ("malformed_http", rs.malformed - rs.header_overflow),
            ("http_head_too_large", rs.header_overflow),
            ("pending_overflow", rs.pending_overflow),
            ("connections_evicted", rs.connections_evicted),
            ("token_events_over_limit", rs.token_events_dropped),
            (
                "undecodable_record",
                self.stats.decode_errors.load(Ordering::Relaxed),
            ),
            (
                "jsonl_write_error",
                self.jsonl.as_ref().map_or(0, |j| j.write_errors),
            ),
        ];
        drops.extend(self.gpu.drops());
        if let Some(m) = &self.metadata {
            drops.push((
                "k8s_metadata_unresolved",
                m.counters().unresolved_records.load(Ordering::Relaxed),
            ));
        }
        if let Some(p) = &self.profiler {
            use std::sync::atomic::Ordering::Relaxed;
            let c = p.counters();
            drops.extend([
                ("undecodable_sample", c.undecodable.load(Relaxed)),
                ("profiler_command_dropped", c.commands_dropped.load(Relaxed)),
                ("profile_build_queue_full", c.build_queue_full.load(Relaxed)),
                ("attribution_window_full", c.window_evicted.load(Relaxed)),
                ("offcpu_pending_evicted", c.offcpu_evicted.load(Relaxed)),
                ("offcpu_end_unmatched", c.offcpu_unmatched.load(Relaxed)),
            ]);
            self.aggregator.set_profiler_stats(c);
        }
        if let Some(e) = &self.exporter {
            drops.push((
                infertap_proto::schema::DROP_REASON_EXPORT_BUFFER_FULL,
                e.dropped_reports(),
            ));
            drops.push((
                infertap_proto::schema::DROP_REASON_PROFILE_BUFFER_FULL,
                e.dropped_profiles(),
            ));
            drops.push((
                infertap_proto::schema::DROP_REASON_PROFILE_TOO_LARGE,
                e.oversized_profiles(),
            ));
        }
        if let Some(o) = &self.otlp {
            drops.extend(o.drops());
            for (signal, result, n) in o.exports() {
                self.aggregator.set_otlp_exports(signal, result, n);
            }
        }
        for (reason, n) in drops {
            self.aggregator.set_drops(reason, n);
        }
        for kind in UntracedKind::ALL {
            self.aggregator
                .set_untraced(kind.name(), rs.untraced[kind as usize]);
        }
    }

    /// End of an aggregation interval: CUDA aggregates, then the report to the collector.
    fn interval(&mut self) {
        let stats = self.probes.cuda.call_stats();
        self.aggregator.set_cuda_stats(&stats);
        if let Some(p) = &self.profiler {
            p.end_interval();
        }
        let report = self.aggregator.take_interval(clock::unix_ns());
        if let Some(e) = &self.exporter {
            e.set_pids(self.known_pids.iter().copied().collect());
            e.submit(report);
        }
    }

    /// Address the Prometheus endpoint listens on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(|m| m.local_addr())
    }

    /// Completed requests of this run with their GPU attribution (`keep_requests`).
    pub fn take_kept(&mut self) -> Vec<CorrelatedRequest> {
        std::mem::take(&mut self.kept)
    }

    /// Whether a GPU source (NVML, CUPTI, CUDA uprobes) was active.
    pub fn gpu_active(&self) -> bool {
        self.gpu.active()
    }

    /// What the profiler reported when it stopped (after [`Pipeline::run`]).
    pub fn take_profiler_report(&mut self) -> Option<ProfilerReport> {
        self.profiler_report.take()
    }

    /// The Perfetto trace of this run (`trace`).
    pub fn take_trace(&mut self) -> Option<TraceWriter> {
        self.gpu.trace.take()
    }

    /// Runs until `shutdown` resolves or `--duration` elapses.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<Self> {
        for pid in self.opts.pids.clone() {
            self.trace_pid(pid)?;
        }
        self.rescan_ports();
        self.rescan_cuda();
        if self.known_pids.is_empty() && !self.opts.ports.is_empty() {
            info!(
                "no process listens on port(s) {:?} yet; waiting for one",
                self.opts.ports
            );
        }
        let ring = self
            .probes
            .take_events()
            .context("event ring already taken")?;
        // SAFETY: the ring buffer owns its map fd for its whole life and always reports that fd.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering the event ring with tokio: {e}"))?;
        if let Some(path) = &self.opts.ready_file {
            std::fs::write(path, format!("{}\n", std::process::id()))
                .with_context(|| format!("writing --ready-file {}", path.display()))?;
        }
        info!("infertap: ready");
        let readiness = self.metrics_server.as_ref().map(|m| m.readiness());
        if let Some(r) = &readiness {
            // A pass every poll tick; many missed ones in a row mean the drain is stuck.
            r.set_stall_after(crate::health::DEFAULT_STALL_AFTER.max(self.opts.poll_interval * 20));
            r.set_attached(true);
            r.drained();
        }

        let deadline = self.opts.duration.map(|d| tokio::time::Instant::now() + d);
        let mut poll = tokio::time::interval(self.opts.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_housekeeping = Instant::now();
        let mut last_clock = Instant::now();
        let mut last_rescan = Instant::now();
        let mut last_interval = Instant::now();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => break,
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                _ = poll.tick() => {
                    self.drain(ring.get_mut());
                }
            }
            if let Some(r) = &readiness {
                r.drained();
            }
            let now = Instant::now();
            if now - last_housekeeping >= Duration::from_millis(250) {
                last_housekeeping = now;
                self.tick();
            }
            if now - last_clock >= Clock::REFRESH {
                last_clock = now;
                self.clock = Clock::measure();
            }
            if now - last_rescan >= self.opts.rescan_interval {
                last_rescan = now;
                self.rescan_ports();
                self.rescan_cuda();
            }
            if now - last_interval >= self.opts.interval {
                last_interval = now;
                self.interval();
            }
        }
        if let Some(r) = &readiness {
            r.set_attached(false);
        }
        // Take what the kernel wrote up to the stop, finish what waits for GPU data, and hand
        // the last interval to the collector.
        self.drain(ring.get_mut());
        self.tick();
        for c in self.gpu.flush() {
            self.emit(c.record, Some(c.gpu));
        }
        // The profiler's last interval is built before the final report, so its profiles go
        // out with it.
        if let Some(p) = self.profiler.take() {
            self.profiler_report = p.finish(Duration::from_secs(150));
            if self.profiler_report.is_none() {
                warn!("the profiler did not stop in time; its last profiles are lost");
            }
        }
        self.update_drops();
        let stats = self.probes.cuda.call_stats();
        self.aggregator.set_cuda_stats(&stats);
        let report = self.aggregator.take_interval(clock::unix_ns());
        if let Some(e) = &self.exporter {
            e.set_pids(self.known_pids.iter().copied().collect());
            e.submit(report);
        }
        if let Some(e) = self.exporter.take() {
            let lost = e.shutdown(Duration::from_secs(3)).await;
            if lost > 0 {
                warn!("{lost} interval report(s) could not be delivered to the collector");
            }
        }
        if let Some(o) = self.otlp.take() {
            let lost = o.shutdown(Duration::from_secs(5)).await;
            if lost > 0 {
                warn!("the OTLP exporter did not finish in time: {lost} span(s) lost");
            }
        }
        if let Some(m) = self.metrics_server.take() {
            let _ = m.shutdown().await;
        }
        Ok(self)
    }

    fn drain(&mut self, ring: &mut aya::maps::RingBuf<aya::maps::MapData>) {
        while let Some(item) = ring.next() {
            // Decoded in place: the slot is released when `item` drops.
            self.handle_record(&item);
        }
        self.flush_records();
    }
}
