//! The GPU stage of the pipeline: starts the GPU data sources that exist on this node (NVML
//! sampler, CUPTI receiver), feeds them and the CUDA uprobe calls into the correlator, and
//! returns completed requests with their GPU attribution. It also joins CUPTI's launch records
//! with their kernels into per-launch GPU times for the profiler
//! ([`GpuStage::take_launch_timings`]).
//!
//! Sources that cannot start (no GPU, no driver) log one line and stay off; while no source is
//! active, requests pass straight through (no correlation delay).

use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    correlate::{CorrelatedRequest, Correlator, CorrelatorConfig, RequestKey},
    cupti::{CuptiReceiver, DetailLevel, ReceiverConfig},
    launches::{LaunchApiCall, LaunchJoinConfig, LaunchJoinCounters, LaunchJoiner},
    nvml::{self, NvmlConfig, NvmlHandle, NvmlSampler},
    timeline::{CudaApiCall, GpuActivity, GpuActivityKind, PowerSample},
    trace::TraceWriter,
};
use crate::{
    events::CudaCall, profiling::stage::LaunchTiming, reconstruct::InFlightRequest,
    record::RequestRecord,
};

#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Sample NVML (power, energy, utilisation, memory, clocks, ...).
    pub nvml: bool,
    /// Load this NVML library instead of `libnvidia-ml.so.1`.
    pub nvml_lib: Option<PathBuf>,
    pub power_period: Duration,
    pub device_period: Duration,
    /// Listen for the CUPTI injection library here (`None`: no CUPTI).
    pub cupti_socket: Option<PathBuf>,
    pub cupti_detail: DetailLevel,
    pub correlator: CorrelatorConfig,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            nvml: true,
            nvml_lib: None,
            power_period: Duration::from_millis(100),
            device_period: Duration::from_secs(1),
            cupti_socket: Some(ReceiverConfig::default().socket_path),
            cupti_detail: DetailLevel::Full,
            correlator: CorrelatorConfig::default(),
        }
    }
}

/// Everything a trace window records (`infertap trace`).
pub struct TraceWindow {
    pub writer: TraceWriter,
}

pub struct GpuStage {
    correlator: Correlator,
    nvml: Option<Arc<NvmlHandle>>,
    cupti: Option<CuptiReceiver>,
    activities: Option<mpsc::Receiver<GpuActivity>>,
    launches: Option<mpsc::Receiver<LaunchApiCall>>,
    joiner: LaunchJoiner,
    power: Option<mpsc::Receiver<PowerSample>>,
    activity_seen: bool,
    cuda_probed: bool,
    started: HashSet<RequestKey>,
    first_token: HashSet<RequestKey>,
    /// Set during a trace window: every GPU-side event is also written to the trace.
    pub trace: Option<TraceWriter>,
}

impl GpuStage {
    /// Starts the sources available on this node. Must run inside a tokio runtime (CUPTI
    /// receiver).
    pub fn start(opts: &GpuOptions) -> Self {
        let mut nvml_handle = None;
        let mut power_rx = None;
        if opts.nvml {
            match NvmlSampler::new(opts.nvml_lib.as_deref()) {
                Ok(sampler) => {
                    let (tx, rx) = mpsc::channel(4096);
                    let cfg = NvmlConfig {
                        lib_path: opts.nvml_lib.clone(),
                        power_period: opts.power_period,
                        device_period: opts.device_period,
                    };
                    let gpus = sampler.gpus().len();
                    match nvml::spawn(sampler, &cfg, Some(tx)) {
                        Ok(h) => {
                            info!(
                                "NVML: sampling {gpus} GPU(s), power every {:?}",
                                opts.power_period
                            );
                            nvml_handle = Some(Arc::new(h));
                            power_rx = Some(rx);
                        }
                        Err(e) => warn!("NVML sampler thread: {e}"),
                    }
                }
                Err(e) => info!("{e}"),
            }
        }
        let (mut cupti, mut activities, mut launches) = (None, None, None);
        if let Some(path) = &opts.cupti_socket {
            let cfg = ReceiverConfig {
                socket_path: path.clone(),
                ..ReceiverConfig::default()
            };
            match CuptiReceiver::bind(cfg) {
                Ok((mut r, rx)) => {
                    r.set_detail(opts.cupti_detail);
                    launches = r.take_launches();
                    info!(
                        "CUPTI: listening on {} (start the server with CUDA_INJECTION64_PATH=<libinfertap_cupti.so>)",
                        path.display()
                    );
                    cupti = Some(r);
                    activities = Some(rx);
                }
                Err(e) => warn!(
                    "CUPTI receiver on {}: {e} (GPU kernel timings disabled)",
                    path.display()
                ),
            }
        }
        GpuStage {
            correlator: Correlator::new(opts.correlator.clone()),
            nvml: nvml_handle,
            cupti,
            activities,
            launches,
            joiner: LaunchJoiner::new(LaunchJoinConfig::default()),
            power: power_rx,
            activity_seen: false,
            cuda_probed: false,
            started: HashSet::new(),
            first_token: HashSet::new(),
            trace: None,
        }
    }

    /// Whether requests go through the correlator (some GPU data can arrive).
    pub fn active(&self) -> bool {
        self.nvml.is_some() || self.activity_seen || self.cuda_probed
    }

    /// The uprobes found CUDA libraries in the traced processes.
    pub fn set_cuda_probed(&mut self, probed: bool) {
        self.cuda_probed |= probed;
    }

    pub fn nvml(&self) -> Option<Arc<NvmlHandle>> {
        self.nvml.clone()
    }

    pub fn cupti(&self) -> Option<&CuptiReceiver> {
        self.cupti.as_ref()
    }

    /// Tells the correlator which requests are in flight (start and first-token times), so
    /// prefill and sharing are known before the requests complete.
    pub fn note_in_flight(&mut self, requests: impl Iterator<Item = InFlightRequest>) {
        if !self.active() {
            return;
        }
        for r in requests {
            let key = RequestKey {
                pid: r.conn.pid,
                conn_id: r.conn.conn_id,
                seq_on_conn: r.seq_on_conn,
            };
            if self.started.insert(key) {
                self.correlator.request_started(key, r.start_ns);
            }
            if let Some(t) = r.first_token_ns {
                if self.first_token.insert(key) {
                    self.correlator.request_first_token(key, t);
                }
            }
        }
    }

    pub fn add_cuda_call(&mut self, c: &CudaCall) {
        let call = CudaApiCall {
            pid: c.pid,
            tid: c.tid,
            func: c.func,
            start_ns: c.start_ns,
            end_ns: c.end_ns,
            bytes: c.bytes,
        };
        if let Some(t) = self.trace.as_mut() {
            t.add_api_call(&call);
        }
        self.correlator.add_api_call(call);
    }

    /// Moves what the sources delivered into the correlator (and the trace window), and the
    /// launch records and kernels into the launch join.
    pub fn drain_sources(&mut self) {
        let now = super::timeline::monotonic_now_ns();
        // Activities first, then launches: the receiver queues a connection's launch records
        // before the activities that follow them on the wire, so every launch sent before an
        // activity taken here is taken too, and the join sees launches first.
        let mut acts = Vec::new();
        if let Some(rx) = self.activities.as_mut() {
            while let Ok(a) = rx.try_recv() {
                acts.push(a);
            }
        }
        if let Some(rx) = self.launches.as_mut() {
            while let Ok(l) = rx.try_recv() {
                self.joiner.add_launch(l, now);
            }
        }
        for a in acts {
            self.activity_seen = true;
            if let Some(t) = self.trace.as_mut() {
                t.add_activity(&a);
            }
            let graph = match a.kind {
                GpuActivityKind::Kernel { .. } => Some(false),
                GpuActivityKind::Graph { .. } => Some(true),
                _ => None,
            };
            if let Some(graph) = graph {
                self.joiner.add_work(
                    a.pid,
                    a.correlation_id,
                    a.duration_ns(),
                    a.name.clone(),
                    graph,
                    now,
                );
            }
            self.correlator.add_activity(a);
        }
        if let Some(rx) = self.power.as_mut() {
            while let Ok(p) = rx.try_recv() {
                if let Some(t) = self.trace.as_mut() {
                    t.add_power_sample(&p);
                }
                self.correlator.add_power_sample(p);
            }
        }
    }

    /// Hands a completed request over; it comes back from [`poll`](Self::poll) once the GPU
    /// data for its window has had time to arrive. Returns it at once when no source is active.
    pub fn finish_request(&mut self, r: RequestRecord) -> Option<RequestRecord> {
        if !self.active() {
            return Some(r);
        }
        let key = RequestKey::of(&r);
        self.started.remove(&key);
        self.first_token.remove(&key);
        self.correlator.request_finished(r);
        None
    }

    pub fn poll(&mut self, now_ns: u64) -> Vec<CorrelatedRequest> {
        self.correlator.poll(now_ns)
    }

    pub fn flush(&mut self) -> Vec<CorrelatedRequest> {
        self.correlator.flush()
    }

    /// GPU time of the CUDA launches whose launch record and kernels (or graph) have both
    /// arrived since the last call, for [`crate::profiling::stage::Profiler::gpu_launch_timings`].
    /// Call it after [`drain_sources`](Self::drain_sources), every tick: what is not taken is
    /// bounded and then dropped (counted).
    pub fn take_launch_timings(&mut self) -> Vec<LaunchTiming> {
        self.joiner.poll(super::timeline::monotonic_now_ns());
        self.joiner.take()
    }

    /// Counters of the launch ↔ kernel join.
    pub fn launch_join_counters(&self) -> LaunchJoinCounters {
        self.joiner.counters()
    }

    /// Cumulative drop counts of the GPU side, by reason.
    pub fn drops(&self) -> Vec<(&'static str, u64)> {
        let c = self.correlator.counters();
        let j = self.joiner.counters();
        let mut out = vec![
            ("gpu_late_data", c.late_dropped),
            ("gpu_window_cap", c.cap_dropped),
            ("gpu_launch_unmatched", j.launches_unmatched),
            ("gpu_kernel_without_launch", j.work_unmatched),
            ("gpu_launch_join_evicted", j.evicted + j.out_dropped),
        ];
        if let Some(r) = &self.cupti {
            use std::sync::atomic::Ordering::Relaxed;
            let s = r.stats();
            out.push(("cupti_channel_full", s.dropped_channel_full.load(Relaxed)));
            out.push((
                "cupti_launch_channel_full",
                s.launches_dropped_channel_full.load(Relaxed),
            ));
        }
        out
    }
}
