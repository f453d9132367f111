//! Request ↔ GPU correlation, joined through time.
//!
//! Requests are served by one process (the API server) while kernels are launched by others
//! (engine, tensor-parallel workers), and one kernel serves a whole batch, so there is no id that
//! links a kernel to a request. The join is by time, on one clock (CLOCK_MONOTONIC ns):
//!
//! * **Sharing.** A request's lifetime `[start_ns, end_ns)` is split at every start/end of the
//!   other requests in flight, giving segments with a constant number `k` of requests in flight
//!   (this one included). Whatever the GPU did during a segment is shared equally: each of the `k`
//!   requests is charged `1/k` of it.
//! * **GPU busy time.** Per device, the union of compute work (kernels, CUDA graph launches,
//!   memsets; not copies) so that work on concurrent streams is not counted twice; a request is
//!   charged `Σ_device Σ_segment |busy ∩ segment| / k`. Busy time of several devices adds up
//!   (GPU-milliseconds), so a tensor-parallel step on 4 GPUs counts 4×.
//! * **Memcpy bytes.** A copy's bytes are spread uniformly over its duration and the part inside a
//!   segment is shared the same way.
//! * **Energy.** The device energy during each segment (from NVML's energy counter, linearly
//!   interpolated between samples, where both ends are bracketed by counter readings; else the
//!   piecewise-linear integral of the power samples) is shared `1/k`. Within a segment every
//!   in-flight request has the same share of the GPU busy time, so this *is* "energy × the
//!   request's share of GPU busy time", computed segment by segment; it conserves energy (the
//!   requests' shares add up to the device energy while any request is in flight) and it includes
//!   the idle power drawn while requests wait.
//!
//! The in-flight set comes from [`Correlator::request_started`] (reported when the request's first
//! byte is read) and [`Correlator::request_finished`]. A request that only ever arrives finished
//! is still known to requests finalised after it, but not to those finalised while it ran, which
//! then get a larger share.
//!
//! **Delay.** CUPTI hands activity records over in buffers, seconds after the fact, so a finished
//! request is held back for [`CorrelatorConfig::finalize_delay_ns`] (default 3 s; it must exceed
//! the CUPTI flush period plus the transport latency) before [`Correlator::poll`] computes its
//! [`RequestGpuStats`]. GPU data, API calls and request intervals are kept for
//! [`CorrelatorConfig::horizon_ns`] and under hard count caps; a request that started before
//! evicted data is flagged `partial`.
//!
//! **Token gaps.** Each gap between consecutive content events is split, instant by instant, into
//! GPU busy (any device running compute) > host blocked in a synchronisation (uprobe sync calls,
//! the blocking `cudaMemcpy`, CUPTI sync records) > host in the launch path (kernel/graph/copy
//! launches) > idle, in that priority, so the four parts sum to the gap. Uprobes on entry only
//! give no return time: a launch is taken to last until the next launch on its thread when that
//! follows within `launch_burst_gap_ns`, else `launch_entry_cost_ns`; a sync until the thread's
//! next CUDA call, at most `max_open_sync_ns`. The
//! slowest gaps (longer than `slow_gap_factor ×` the request's median gap, the `max_slow_gaps`
//! longest) get their top contributors: kernels by name, graphs, copies, host sync calls, and
//! other requests' prefill (a request whose `[start, first_token)` overlaps the gap is by
//! definition in prefill then).
//!
//! **Cost.** Finalising is batched: one pass over the retained data of the batch's time span
//! builds prefix-summed interval sets, after which each request costs a few binary searches per
//! segment and per token gap. Measured (release build, 2-core dev VM): 64 requests in flight,
//! 8,000 kernels/s and 8,000 entry-only launches/s, 10 s requests of 400 tokens: ≈8 ms of CPU per
//! finalised request, ≈4% of one core overall.
//!
//! Scope: one `Correlator` correlates everything it is fed. Feed it the GPU activity, API calls
//! and power samples of the devices and processes that serve the requests you give it (one
//! correlator per served model / target).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::intervals::IntervalSet;
use super::timeline::{
    CudaApiCall, CudaCallKind, CudaFunc, GpuActivity, GpuActivityKind, MemcpyKind, PowerSample,
    SyncKind,
};
use crate::record::RequestRecord;

/// Tunables of the [`Correlator`].
#[derive(Clone, Debug)]
pub struct CorrelatorConfig {
    /// How long GPU data and finished request intervals are kept, behind `now`.
    pub horizon_ns: u64,
    /// How long a finished request waits for late GPU data before it is finalised.
    pub finalize_delay_ns: u64,
    /// Hard caps; the oldest entries are dropped (and counted) beyond them.
    pub max_activities: usize,
    pub max_api_calls: usize,
    pub max_power_samples_per_device: usize,
    /// Cap on finished request intervals kept, and on requests waiting for finalisation.
    pub max_requests: usize,
    /// Activities and API calls longer than this are dropped as malformed (a broken clock
    /// mapping would otherwise mark the GPU busy for hours and widen every look-back).
    pub max_span_ns: u64,
    /// A started request never reported finished is forgotten after this long.
    pub max_open_request_ns: u64,
    /// A gap is slow when longer than this × the request's median gap.
    pub slow_gap_factor: f64,
    /// At most this many slow gaps are explained per request (the longest).
    pub max_slow_gaps: usize,
    /// Contributors listed per explained gap.
    pub max_contributors: usize,
    /// Entry-only launch calls (no uretprobe): the host is taken to be in its launch path from a
    /// launch until the next launch on the same thread when that follows within this gap.
    pub launch_burst_gap_ns: u64,
    /// Entry-only launch calls: time charged for an isolated launch (or the last of a burst),
    /// about the host cost of one `cudaLaunchKernel`.
    pub launch_entry_cost_ns: u64,
    /// Entry-only sync calls: the host is taken to wait until its next CUDA call, at most this.
    pub max_open_sync_ns: u64,
    /// Power readings are held flat at most this far before the first / after the last sample.
    pub power_hold_ns: u64,
}

impl Default for CorrelatorConfig {
    fn default() -> Self {
        CorrelatorConfig {
            horizon_ns: 120 * SEC,
            finalize_delay_ns: 3 * SEC,
            max_activities: 1 << 20,
            max_api_calls: 1 << 20,
            max_power_samples_per_device: 1 << 16,
            max_requests: 1 << 16,
            max_span_ns: 60 * SEC,
            max_open_request_ns: 3600 * SEC,
            slow_gap_factor: 3.0,
            max_slow_gaps: 5,
            max_contributors: 5,
            launch_burst_gap_ns: 100_000,
            launch_entry_cost_ns: 5_000,
            max_open_sync_ns: SEC,
            power_hold_ns: SEC,
        }
    }
}

const SEC: u64 = 1_000_000_000;

/// Identity of one exchange: the server process, its connection and the exchange's sequence
/// number on it (as in [`RequestRecord`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RequestKey {
    pub pid: u32,
    pub conn_id: u64,
    pub seq_on_conn: u32,
}

impl RequestKey {
    pub fn of(rec: &RequestRecord) -> Self {
        RequestKey {
            pid: rec.pid,
            conn_id: rec.conn_id,
            seq_on_conn: rec.seq_on_conn,
        }
    }
}

/// GPU side of one request. Serialises flat into the request's JSON line.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RequestGpuStats {
    /// Device compute-busy time charged to the request (shared among requests in flight, summed
    /// over devices), milliseconds.
    pub gpu_busy_ms: f64,
    /// Kernels that ran at some point of the request's lifetime (not shared: batch-wide).
    pub kernel_count: u64,
    /// CUDA graph launches that ran during the request's lifetime (not shared).
    pub graph_count: u64,
    /// Bytes copied by the GPU charged to the request (shared).
    pub memcpy_bytes: u64,
    /// Energy charged to the request, joules; `None` without power data for the window.
    pub energy_j: Option<f64>,
    pub energy_j_per_token: Option<f64>,
    /// Time-weighted mean number of requests in flight (this one included).
    pub mean_concurrency: f64,
    /// Median gap between content events.
    pub median_itl_ns: Option<u64>,
    /// Time to first token (`start..first_token`), decomposed like a token gap: queueing shows
    /// as idle or other requests' GPU work, the prefill itself as GPU busy.
    pub ttft_breakdown: Option<GapBreakdown>,
    /// All token gaps of the request, decomposed and summed.
    pub itl_breakdown: Option<GapBreakdown>,
    /// The slowest gaps, explained, longest first.
    pub slow_tokens: Vec<TokenGapExplanation>,
    /// Some GPU data of the request's window was evicted or dropped before it was finalised.
    pub partial: bool,
}

/// A time span split into what the GPU and host were doing; the parts sum to the span.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GapBreakdown {
    /// Some device was executing compute work (kernels, graphs, memsets).
    pub gpu_busy_ns: u64,
    /// No device busy; a host thread was blocked in a CUDA synchronisation.
    pub sync_wait_ns: u64,
    /// No device busy, no sync; a host thread was in the kernel/graph/copy launch path.
    pub launch_ns: u64,
    /// None of the above: host work outside CUDA (scheduling, sampling, detokenising, HTTP).
    pub idle_ns: u64,
}

impl GapBreakdown {
    fn add(&mut self, o: &GapBreakdown) {
        self.gpu_busy_ns += o.gpu_busy_ns;
        self.sync_wait_ns += o.sync_wait_ns;
        self.launch_ns += o.launch_ns;
        self.idle_ns += o.idle_ns;
    }

    pub fn total_ns(&self) -> u64 {
        self.gpu_busy_ns + self.sync_wait_ns + self.launch_ns + self.idle_ns
    }
}

/// One slow inter-token gap and what filled it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenGapExplanation {
    /// Index of the content event that ended the gap (the gap is `token_ns[i-1]..token_ns[i]`).
    pub token_index: usize,
    pub start_ns: u64,
    pub gap_ns: u64,
    pub gpu_busy_ns: u64,
    pub sync_wait_ns: u64,
    pub launch_ns: u64,
    pub idle_ns: u64,
    /// What overlapped the gap, by overlap time, longest first.
    pub top: Vec<Contributor>,
}

/// The one-word cause of a slow token, for the `infertap_slow_tokens_total{cause}` counter:
/// `other_request_prefill` when another request's prefill is the largest overlap, otherwise the
/// largest part of the gap's decomposition.
pub fn dominant_cause(t: &TokenGapExplanation) -> &'static str {
    if matches!(t.top.first(), Some(Contributor::Prefill { .. })) {
        return "other_request_prefill";
    }
    let parts = [
        (t.gpu_busy_ns, "gpu_busy"),
        (t.sync_wait_ns, "sync_wait"),
        (t.launch_ns, "launch_bound"),
        (t.idle_ns, "idle"),
    ];
    parts
        .iter()
        .max_by_key(|p| p.0)
        .map(|p| p.1)
        .unwrap_or("idle")
}

/// Something that overlapped a token gap, with how long it overlapped it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Contributor {
    /// Kernels of one name on one device (overlaps of concurrent kernels add up).
    Kernel {
        name: String,
        device: u32,
        count: u32,
        overlap_ns: u64,
    },
    Graph {
        graph_id: u32,
        device: u32,
        count: u32,
        overlap_ns: u64,
    },
    Memcpy {
        #[serde(serialize_with = "ser_memcpy_kind")]
        direction: MemcpyKind,
        device: u32,
        count: u32,
        /// Bytes copied inside the gap (pro rata of each copy's duration).
        bytes: u64,
        overlap_ns: u64,
    },
    Memset {
        device: u32,
        count: u32,
        overlap_ns: u64,
    },
    /// Another request was in prefill (between its start and first token) during the gap.
    Prefill {
        pid: u32,
        conn_id: u64,
        seq_on_conn: u32,
        prompt_tokens: Option<u64>,
        overlap_ns: u64,
    },
    /// Host threads blocked in a CUDA synchronisation (uprobes: the function; CUPTI: the kind).
    HostSync {
        what: &'static str,
        count: u32,
        overlap_ns: u64,
    },
}

fn ser_memcpy_kind<S: serde::Serializer>(k: &MemcpyKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}

impl Contributor {
    pub fn overlap_ns(&self) -> u64 {
        match self {
            Contributor::Kernel { overlap_ns, .. }
            | Contributor::Graph { overlap_ns, .. }
            | Contributor::Memcpy { overlap_ns, .. }
            | Contributor::Memset { overlap_ns, .. }
            | Contributor::Prefill { overlap_ns, .. }
            | Contributor::HostSync { overlap_ns, .. } => *overlap_ns,
        }
    }
}

/// A finished request with its GPU side.
#[derive(Clone, Debug, PartialEq)]
pub struct CorrelatedRequest {
    pub record: RequestRecord,
    pub gpu: RequestGpuStats,
}

/// Drops and evictions, for the agent's self-metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CorrelatorCounters {
    /// GPU data that arrived older than the retention cutoff.
    pub late_dropped: u64,
    /// Entries dropped to honour the hard caps.
    pub cap_dropped: u64,
    /// Finished requests finalised before their delay because too many were pending.
    pub finalized_early: u64,
    /// Started requests never reported finished, forgotten after `max_open_request_ns`.
    pub stale_open_requests: u64,
    /// Activities / API calls ending before they start, or longer than `max_span_ns`.
    pub malformed: u64,
}

#[derive(Clone, Copy, Debug)]
struct ReqSpan {
    key: RequestKey,
    start: u64,
    /// `u64::MAX` while in flight.
    end: u64,
    first_token: Option<u64>,
    prompt_tokens: Option<u64>,
}

impl ReqSpan {
    /// `[start, first token)`; to the end for a request that never produced a token, and
    /// unbounded while in flight without a first token.
    fn prefill(&self) -> (u64, u64) {
        (self.start, self.first_token.unwrap_or(self.end))
    }
}

/// Time-indexed windows of GPU activity, CUDA API calls, power samples and request intervals.
#[derive(Debug)]
pub struct Correlator {
    cfg: CorrelatorConfig,
    seq: u64,
    activities: BTreeMap<(u64, u64), GpuActivity>,
    max_activity_ns: u64,
    api_calls: BTreeMap<(u64, u64), CudaApiCall>,
    max_api_ns: u64,
    /// Per device, sorted by `ts_ns`.
    power: BTreeMap<u32, Vec<PowerSample>>,
    open: HashMap<RequestKey, ReqSpan>,
    finished: BTreeMap<(u64, RequestKey), ReqSpan>,
    max_request_ns: u64,
    pending: Vec<RequestRecord>,
    /// Data before this time may be missing (evicted or dropped).
    evicted_before: u64,
    counters: CorrelatorCounters,
}

impl Correlator {
    pub fn new(cfg: CorrelatorConfig) -> Self {
        Correlator {
            cfg,
            seq: 0,
            activities: BTreeMap::new(),
            max_activity_ns: 0,
            api_calls: BTreeMap::new(),
            max_api_ns: 0,
            power: BTreeMap::new(),
            open: HashMap::new(),
            finished: BTreeMap::new(),
            max_request_ns: 0,
            pending: Vec::new(),
            evicted_before: 0,
            counters: CorrelatorCounters::default(),
        }
    }

    pub fn config(&self) -> &CorrelatorConfig {
        &self.cfg
    }

    pub fn counters(&self) -> CorrelatorCounters {
        self.counters
    }

    /// Finished requests waiting for their finalisation delay.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Adds one GPU activity record (any order).
    pub fn add_activity(&mut self, a: GpuActivity) {
        if a.end_ns < a.start_ns || a.duration_ns() > self.cfg.max_span_ns {
            self.counters.malformed += 1;
            return;
        }
        if a.end_ns < self.evicted_before {
            self.counters.late_dropped += 1;
            return;
        }
        self.max_activity_ns = self.max_activity_ns.max(a.duration_ns());
        let seq = self.next_seq();
        self.activities.insert((a.start_ns, seq), a);
        while self.activities.len() > self.cfg.max_activities {
            if let Some(((start, _), _)) = self.activities.pop_first() {
                self.evicted_before = self.evicted_before.max(start);
                self.counters.cap_dropped += 1;
            }
        }
    }

    /// Adds one host CUDA API call (any order).
    pub fn add_api_call(&mut self, c: CudaApiCall) {
        if c.end_ns
            .is_some_and(|e| e < c.start_ns || e - c.start_ns > self.cfg.max_span_ns)
        {
            self.counters.malformed += 1;
            return;
        }
        if c.end_ns.unwrap_or(c.start_ns) < self.evicted_before {
            self.counters.late_dropped += 1;
            return;
        }
        if let Some(end) = c.end_ns {
            self.max_api_ns = self.max_api_ns.max(end - c.start_ns);
        }
        let seq = self.next_seq();
        self.api_calls.insert((c.start_ns, seq), c);
        while self.api_calls.len() > self.cfg.max_api_calls {
            if let Some(((start, _), _)) = self.api_calls.pop_first() {
                self.evicted_before = self.evicted_before.max(start);
                self.counters.cap_dropped += 1;
            }
        }
    }

    /// Adds one NVML sample (any order).
    pub fn add_power_sample(&mut self, s: PowerSample) {
        if s.ts_ns < self.evicted_before {
            self.counters.late_dropped += 1;
            return;
        }
        let v = self.power.entry(s.device).or_default();
        let at = v.partition_point(|x| x.ts_ns <= s.ts_ns);
        v.insert(at, s);
        if v.len() > self.cfg.max_power_samples_per_device {
            let excess = v.len() - self.cfg.max_power_samples_per_device;
            self.evicted_before = self.evicted_before.max(v[excess].ts_ns);
            v.drain(..excess);
            self.counters.cap_dropped += excess as u64;
        }
    }

    /// The request's first byte was read: it is in flight from `start_ns`.
    pub fn request_started(&mut self, key: RequestKey, start_ns: u64) {
        self.open.insert(
            key,
            ReqSpan {
                key,
                start: start_ns,
                end: u64::MAX,
                first_token: None,
                prompt_tokens: None,
            },
        );
    }

    /// The request's first content event (optional; refines "in prefill" while it is in flight).
    pub fn request_first_token(&mut self, key: RequestKey, ts_ns: u64) {
        if let Some(r) = self.open.get_mut(&key) {
            r.first_token.get_or_insert(ts_ns);
        }
    }

    /// The request finished; it is finalised by [`Correlator::poll`] once the finalisation delay
    /// after `end_ns` has passed.
    pub fn request_finished(&mut self, rec: RequestRecord) {
        let key = RequestKey::of(&rec);
        self.open.remove(&key);
        let span = ReqSpan {
            key,
            start: rec.start_ns,
            end: rec.end_ns.max(rec.start_ns),
            first_token: rec.first_token_ns,
            prompt_tokens: rec.prompt_tokens,
        };
        self.max_request_ns = self.max_request_ns.max(span.end - span.start);
        self.finished.insert((span.start, key), span);
        while self.finished.len() > self.cfg.max_requests {
            if let Some(((start, _), _)) = self.finished.pop_first() {
                self.evicted_before = self.evicted_before.max(start);
                self.counters.cap_dropped += 1;
            }
        }
        self.pending.push(rec);
    }

    /// Finalises the finished requests whose delay has passed at `now_ns` (CLOCK_MONOTONIC), and
    /// evicts data older than the horizon.
    pub fn poll(&mut self, now_ns: u64) -> Vec<CorrelatedRequest> {
        let delay = self.cfg.finalize_delay_ns;
        let (mut ready, mut keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|r| r.end_ns.saturating_add(delay) <= now_ns);
        // Records are never dropped: beyond the cap the oldest go out early (and may miss late
        // GPU data).
        if keep.len() > self.cfg.max_requests {
            keep.sort_by_key(|r| r.end_ns);
            let excess = keep.len() - self.cfg.max_requests;
            ready.extend(keep.drain(..excess));
            self.counters.finalized_early += excess as u64;
        }
        self.pending = keep;
        let out = self.finalize(ready);
        self.evict(now_ns.saturating_sub(self.cfg.horizon_ns), now_ns);
        out
    }

    /// Finalises every pending request now (shutdown, or offline analysis after all data is in).
    pub fn flush(&mut self) -> Vec<CorrelatedRequest> {
        let ready = std::mem::take(&mut self.pending);
        self.finalize(ready)
    }

    fn finalize(&self, mut ready: Vec<RequestRecord>) -> Vec<CorrelatedRequest> {
        if ready.is_empty() {
            return Vec::new();
        }
        ready.sort_by_key(|r| (r.end_ns, r.start_ns));
        let a = ready.iter().map(|r| r.start_ns).min().unwrap_or(0);
        let b = ready
            .iter()
            .map(|r| r.end_ns.max(r.start_ns))
            .max()
            .unwrap_or(a);
        let window = self.window(a, b);
        ready
            .into_iter()
            .map(|record| {
                let gpu = self.analyze_in(&window, &record);
                CorrelatedRequest { record, gpu }
            })
            .collect()
    }

    fn evict(&mut self, cutoff: u64, now_ns: u64) {
        let max_open = self.cfg.max_open_request_ns;
        let before = self.open.len();
        self.open
            .retain(|_, r| r.start.saturating_add(max_open) >= now_ns);
        self.counters.stale_open_requests += (before - self.open.len()) as u64;
        if cutoff <= self.evicted_before {
            return;
        }
        self.evicted_before = cutoff;
        self.activities = self.activities.split_off(&(cutoff, 0));
        self.api_calls = self.api_calls.split_off(&(cutoff, 0));
        let min_key = RequestKey {
            pid: 0,
            conn_id: 0,
            seq_on_conn: 0,
        };
        // Finished intervals are kept while they may still overlap a retained window.
        let req_cut = cutoff.saturating_sub(self.max_request_ns);
        self.finished = self.finished.split_off(&(req_cut, min_key));
        for v in self.power.values_mut() {
            // Keep the last sample before the cutoff: interpolation needs both neighbours.
            let first_kept = v.partition_point(|s| s.ts_ns < cutoff).saturating_sub(1);
            v.drain(..first_kept);
        }
    }

    /// Activities that overlap `[a, b)`.
    fn activities_in(&self, a: u64, b: u64) -> impl Iterator<Item = &GpuActivity> {
        let lo = a.saturating_sub(self.max_activity_ns);
        self.activities
            .range((lo, 0)..(b, 0))
            .map(|(_, v)| v)
            .filter(move |x| x.end_ns > a || (x.start_ns >= a && x.start_ns < b))
    }

    /// Other requests (finished or in flight) whose lifetime overlaps `[a, b)`.
    fn others_in(&self, me: RequestKey, a: u64, b: u64) -> Vec<ReqSpan> {
        let min_key = RequestKey {
            pid: 0,
            conn_id: 0,
            seq_on_conn: 0,
        };
        let lo = a.saturating_sub(self.max_request_ns);
        self.finished
            .range((lo, min_key)..(b, min_key))
            .map(|(_, r)| *r)
            .chain(self.open.values().copied())
            .filter(|r| r.key != me && r.start < b && r.end > a)
            .collect()
    }

    /// Computes the GPU side of a finished request from the data held now.
    pub fn analyze(&self, rec: &RequestRecord) -> RequestGpuStats {
        let window = self.window(rec.start_ns, rec.end_ns.max(rec.start_ns));
        self.analyze_in(&window, rec)
    }

    /// Builds, in one pass over the data, what the analysis of requests within `[a, b)` needs;
    /// each request is then a few binary searches per segment and per token gap.
    fn window(&self, a: u64, b: u64) -> Window {
        let mut device_spans: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        let mut kernels = (Vec::new(), Vec::new());
        let mut graphs = (Vec::new(), Vec::new());
        let mut copies = Vec::new();
        let mut sync_spans: Vec<(u64, u64, &'static str)> = Vec::new();
        for x in self.activities_in(a, b) {
            match x.kind {
                GpuActivityKind::Kernel { .. } => {
                    kernels.0.push(x.start_ns);
                    kernels.1.push(x.end_ns);
                }
                GpuActivityKind::Graph { .. } => {
                    graphs.0.push(x.start_ns);
                    graphs.1.push(x.end_ns);
                }
                GpuActivityKind::Memcpy { bytes, .. } => copies.push((x.start_ns, x.end_ns, bytes)),
                GpuActivityKind::Sync { kind } => {
                    if is_host_sync_activity(&x.kind) {
                        sync_spans.push((x.start_ns, x.end_ns, sync_kind_label(kind)));
                    }
                }
                GpuActivityKind::Memset { .. } => {}
            }
            if is_device_work(&x.kind) {
                device_spans
                    .entry(x.device)
                    .or_default()
                    .push((x.start_ns, x.end_ns));
            }
        }
        let mut launch = Vec::new();
        for (call, span) in self.api_spans(a, b) {
            match call_class(call.func) {
                CallClass::Sync => sync_spans.push((span.0, span.1, call.func.symbol)),
                CallClass::Launch => launch.push(span),
                CallClass::Other => {}
            }
        }
        let device_busy: BTreeMap<u32, IntervalSet> = device_spans
            .into_iter()
            .map(|(d, v)| (d, IntervalSet::from_spans(v)))
            .collect();
        let busy = IntervalSet::from_spans(
            device_busy
                .values()
                .flat_map(|set| set.iter())
                .collect::<Vec<_>>(),
        );
        let sync =
            IntervalSet::from_spans(sync_spans.iter().map(|&(s, e, _)| (s, e))).subtract(&busy);
        let launch = IntervalSet::from_spans(launch)
            .subtract(&busy)
            .subtract(&sync);
        for v in [&mut kernels.0, &mut kernels.1, &mut graphs.0, &mut graphs.1] {
            v.sort_unstable();
        }
        copies.sort_unstable();
        sync_spans.sort_unstable();
        Window {
            max_copy_ns: copies.iter().map(|c| c.1 - c.0).max().unwrap_or(0),
            max_sync_ns: sync_spans.iter().map(|c| c.1 - c.0).max().unwrap_or(0),
            device_busy,
            host: HostSets { busy, sync, launch },
            kernels,
            graphs,
            copies,
            sync_spans,
        }
    }

    fn analyze_in(&self, w: &Window, rec: &RequestRecord) -> RequestGpuStats {
        let me = RequestKey::of(rec);
        let (s, e) = (rec.start_ns, rec.end_ns.max(rec.start_ns));
        let others = self.others_in(me, s, e);
        let segs = segments(s, e, &others);

        let busy_ns: f64 = w
            .device_busy
            .values()
            .map(|set| {
                segs.iter()
                    .map(|&(a, b, k)| set.overlap_len(a, b) as f64 / k as f64)
                    .fold(0.0, |acc, v| acc + v)
            })
            // Folds from +0.0: an empty f64 `sum()` is -0.0, which prints as "-0.0 ms".
            .fold(0.0, |acc, v| acc + v);
        let lo = s.saturating_sub(w.max_copy_ns);
        let first = w.copies.partition_point(|c| c.0 < lo);
        let memcpy_bytes: f64 = w.copies[first..]
            .iter()
            .take_while(|c| c.0 < e)
            .map(|&(a, b, bytes)| shared_amount(&segs, a, b, bytes as f64))
            .fold(0.0, |acc, v| acc + v);

        let mut energy: Option<f64> = None;
        for samples in self.power.values() {
            for &(a, b, k) in &segs {
                if let Some(j) = energy_j(samples, a, b, self.cfg.power_hold_ns) {
                    *energy.get_or_insert(0.0) += j / k as f64;
                }
            }
        }
        let tokens = rec.output_tokens.filter(|&t| t > 0);
        let mean_concurrency = if e > s {
            segs.iter()
                .map(|&(a, b, k)| (b - a) as f64 * k as f64)
                .fold(0.0, |acc, v| acc + v)
                / (e - s) as f64
        } else {
            1.0
        };

        let (median_itl_ns, itl_breakdown, slow_tokens) = self.token_gaps(w, rec, me);
        RequestGpuStats {
            gpu_busy_ms: busy_ns / 1e6,
            kernel_count: count_overlapping(&w.kernels, s, e),
            graph_count: count_overlapping(&w.graphs, s, e),
            memcpy_bytes: memcpy_bytes.round() as u64,
            energy_j: energy,
            energy_j_per_token: energy.zip(tokens).map(|(j, t)| j / t as f64),
            mean_concurrency,
            median_itl_ns,
            ttft_breakdown: rec
                .first_token_ns
                .map(|ft| w.host.breakdown(s, ft.clamp(s, e))),
            itl_breakdown,
            slow_tokens,
            partial: s < self.evicted_before,
        }
    }

    /// Median gap, summed breakdown of all gaps, and the explained slow gaps.
    fn token_gaps(
        &self,
        w: &Window,
        rec: &RequestRecord,
        me: RequestKey,
    ) -> (Option<u64>, Option<GapBreakdown>, Vec<TokenGapExplanation>) {
        let gaps = rec.slow_gaps(self.cfg.slow_gap_factor, self.cfg.max_slow_gaps);
        let Some(median) = gaps.median_ns else {
            return (None, None, Vec::new());
        };
        let mut total = GapBreakdown::default();
        for g in &gaps.all {
            total.add(&w.host.breakdown(g.start_ns, g.end_ns));
        }
        let slow: Vec<(usize, u64, u64)> = gaps
            .slow
            .iter()
            .map(|g| (g.token_index, g.start_ns, g.end_ns))
            .collect();
        let explained = slow
            .into_iter()
            .map(|(i, a, b)| {
                let br = w.host.breakdown(a, b);
                TokenGapExplanation {
                    token_index: i,
                    start_ns: a,
                    gap_ns: b - a,
                    gpu_busy_ns: br.gpu_busy_ns,
                    sync_wait_ns: br.sync_wait_ns,
                    launch_ns: br.launch_ns,
                    idle_ns: br.idle_ns,
                    top: self.contributors(w, me, a, b),
                }
            })
            .collect();
        (Some(median), Some(total), explained)
    }

    /// API calls overlapping `[a, b)` with the span each occupied its thread (see the entry-only
    /// rules on [`CorrelatorConfig`]).
    fn api_spans(&self, a: u64, b: u64) -> Vec<(&CudaApiCall, (u64, u64))> {
        let lookback = self
            .max_api_ns
            .max(self.cfg.max_open_sync_ns)
            .max(self.cfg.launch_burst_gap_ns);
        let lookahead = self.cfg.max_open_sync_ns.max(self.cfg.launch_burst_gap_ns);
        let mut per_thread: HashMap<(u32, u32), Vec<&CudaApiCall>> = HashMap::new();
        for (_, c) in self
            .api_calls
            .range((a.saturating_sub(lookback), 0)..(b.saturating_add(lookahead), 0))
        {
            per_thread.entry((c.pid, c.tid)).or_default().push(c);
        }
        let mut out = Vec::new();
        for calls in per_thread.values() {
            for (i, c) in calls.iter().enumerate() {
                let next = calls.get(i + 1).map(|n| n.start_ns);
                let end = match (c.end_ns, call_class(c.func)) {
                    (Some(end), _) => end,
                    (None, CallClass::Sync) => {
                        let cap = c.start_ns.saturating_add(self.cfg.max_open_sync_ns);
                        next.map_or(cap, |n| n.min(cap))
                    }
                    (None, CallClass::Launch) => match next {
                        Some(n) if n - c.start_ns <= self.cfg.launch_burst_gap_ns => n,
                        _ => c.start_ns.saturating_add(self.cfg.launch_entry_cost_ns),
                    },
                    (None, CallClass::Other) => c.start_ns,
                };
                if end > a && c.start_ns < b {
                    out.push((*c, (c.start_ns, end)));
                }
            }
        }
        out
    }

    /// What overlapped `[a, b)`, longest overlap first.
    fn contributors(&self, w: &Window, me: RequestKey, a: u64, b: u64) -> Vec<Contributor> {
        let ov = |s: u64, e: u64| e.min(b).saturating_sub(s.max(a));
        let mut kernels: HashMap<(&str, u32), (u32, u64)> = HashMap::new();
        let mut graphs: HashMap<(u32, u32), (u32, u64)> = HashMap::new();
        let mut copies: HashMap<(MemcpyKind, u32), (u32, f64, u64)> = HashMap::new();
        let mut memsets: HashMap<u32, (u32, u64)> = HashMap::new();
        let mut syncs: HashMap<&'static str, (u32, u64)> = HashMap::new();
        for x in self.activities_in(a, b) {
            let o = ov(x.start_ns, x.end_ns);
            match x.kind {
                GpuActivityKind::Kernel { .. } => {
                    let name = x.name.as_deref().unwrap_or("<unnamed kernel>");
                    let v = kernels.entry((name, x.device)).or_default();
                    v.0 += 1;
                    v.1 += o;
                }
                GpuActivityKind::Graph { graph_id } => {
                    let v = graphs.entry((graph_id, x.device)).or_default();
                    v.0 += 1;
                    v.1 += o;
                }
                GpuActivityKind::Memcpy { kind, bytes } => {
                    let share = if x.end_ns > x.start_ns {
                        bytes as f64 * o as f64 / (x.end_ns - x.start_ns) as f64
                    } else {
                        bytes as f64
                    };
                    let v = copies.entry((kind, x.device)).or_default();
                    v.0 += 1;
                    v.1 += share;
                    v.2 += o;
                }
                GpuActivityKind::Memset { .. } => {
                    let v = memsets.entry(x.device).or_default();
                    v.0 += 1;
                    v.1 += o;
                }
                // Host waits come from the window, with the uprobe sync calls.
                GpuActivityKind::Sync { .. } => {}
            }
        }
        let first = w
            .sync_spans
            .partition_point(|x| x.0 < a.saturating_sub(w.max_sync_ns));
        for &(s, e, what) in w.sync_spans[first..].iter().take_while(|x| x.0 < b) {
            let o = ov(s, e);
            if o > 0 {
                let v = syncs.entry(what).or_default();
                v.0 += 1;
                v.1 += o;
            }
        }
        let mut out: Vec<Contributor> = Vec::new();
        out.extend(
            kernels
                .into_iter()
                .map(|((name, device), (count, o))| Contributor::Kernel {
                    name: name.to_owned(),
                    device,
                    count,
                    overlap_ns: o,
                }),
        );
        out.extend(
            graphs
                .into_iter()
                .map(|((graph_id, device), (count, o))| Contributor::Graph {
                    graph_id,
                    device,
                    count,
                    overlap_ns: o,
                }),
        );
        out.extend(
            copies
                .into_iter()
                .map(
                    |((direction, device), (count, bytes, o))| Contributor::Memcpy {
                        direction,
                        device,
                        count,
                        bytes: bytes.round() as u64,
                        overlap_ns: o,
                    },
                ),
        );
        out.extend(
            memsets
                .into_iter()
                .map(|(device, (count, o))| Contributor::Memset {
                    device,
                    count,
                    overlap_ns: o,
                }),
        );
        out.extend(
            syncs
                .into_iter()
                .map(|(what, (count, o))| Contributor::HostSync {
                    what,
                    count,
                    overlap_ns: o,
                }),
        );
        for r in self.others_in(me, a, b) {
            let (ps, pe) = r.prefill();
            let o = ov(ps, pe);
            if o > 0 {
                out.push(Contributor::Prefill {
                    pid: r.key.pid,
                    conn_id: r.key.conn_id,
                    seq_on_conn: r.key.seq_on_conn,
                    prompt_tokens: r.prompt_tokens,
                    overlap_ns: o,
                });
            }
        }
        out.retain(|c| c.overlap_ns() > 0);
        // Deterministic order: longest first, then by the serialised form.
        out.sort_by(|x, y| {
            y.overlap_ns()
                .cmp(&x.overlap_ns())
                .then_with(|| format!("{x:?}").cmp(&format!("{y:?}")))
        });
        out.truncate(self.cfg.max_contributors);
        out
    }
}

/// Precomputed data of a time window (see [`Correlator::window`]).
struct Window {
    /// Per device, the union of compute spans.
    device_busy: BTreeMap<u32, IntervalSet>,
    host: HostSets,
    /// Kernel start times and end times, each sorted.
    kernels: (Vec<u64>, Vec<u64>),
    graphs: (Vec<u64>, Vec<u64>),
    /// `(start, end, bytes)` sorted by start.
    copies: Vec<(u64, u64, u64)>,
    max_copy_ns: u64,
    /// Host blocked in a sync: `(start, end, what)` sorted by start (CUPTI and uprobes).
    sync_spans: Vec<(u64, u64, &'static str)>,
    max_sync_ns: u64,
}

/// Spans overlapping `[s, e)`, from sorted starts and sorted ends (every end ≥ its start).
fn count_overlapping((starts, ends): &(Vec<u64>, Vec<u64>), s: u64, e: u64) -> u64 {
    let started = starts.partition_point(|&x| x < e);
    let ended = ends.partition_point(|&x| x <= s);
    started.saturating_sub(ended) as u64
}

struct HostSets {
    busy: IntervalSet,
    sync: IntervalSet,
    launch: IntervalSet,
}

impl HostSets {
    fn breakdown(&self, a: u64, b: u64) -> GapBreakdown {
        let gpu_busy_ns = self.busy.overlap_len(a, b);
        let sync_wait_ns = self.sync.overlap_len(a, b);
        let launch_ns = self.launch.overlap_len(a, b);
        GapBreakdown {
            gpu_busy_ns,
            sync_wait_ns,
            launch_ns,
            idle_ns: (b - a) - gpu_busy_ns - sync_wait_ns - launch_ns,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallClass {
    Sync,
    Launch,
    Other,
}

fn call_class(f: CudaFunc) -> CallClass {
    match f.class {
        // A synchronous copy blocks the host until the GPU has drained the stream.
        CudaCallKind::Sync | CudaCallKind::Memcpy => CallClass::Sync,
        CudaCallKind::Launch
        | CudaCallKind::GraphLaunch
        | CudaCallKind::MemcpyAsync
        | CudaCallKind::Memset => CallClass::Launch,
        CudaCallKind::Alloc | CudaCallKind::Free => CallClass::Other,
    }
}

/// Compute work of a device: what "GPU busy" means here (as in NVML's utilisation). Copies run
/// on separate copy engines concurrently with compute; they are accounted as bytes, and show up
/// among a gap's contributors.
fn is_device_work(k: &GpuActivityKind) -> bool {
    matches!(
        k,
        GpuActivityKind::Kernel { .. }
            | GpuActivityKind::Graph { .. }
            | GpuActivityKind::Memset { .. }
    )
}

/// CUPTI synchronisation records where the host blocked (a stream waiting on an event is not).
fn is_host_sync_activity(k: &GpuActivityKind) -> bool {
    matches!(k, GpuActivityKind::Sync { kind } if *kind != SyncKind::StreamWaitEvent)
}

fn sync_kind_label(k: SyncKind) -> &'static str {
    match k {
        SyncKind::Event => "event synchronize",
        SyncKind::StreamWaitEvent => "stream wait event",
        SyncKind::Stream => "stream synchronize",
        SyncKind::Context => "context synchronize",
        SyncKind::Unknown => "synchronize",
    }
}

/// Splits `[s, e)` at the other requests' boundaries: `(from, to, requests in flight)`.
fn segments(s: u64, e: u64, others: &[ReqSpan]) -> Vec<(u64, u64, u32)> {
    let mut k: i64 = 1;
    let mut deltas: Vec<(u64, i64)> = Vec::with_capacity(others.len() * 2);
    for o in others {
        if o.start <= s {
            k += 1;
        } else {
            deltas.push((o.start, 1));
        }
        if o.end < e {
            deltas.push((o.end, -1));
        }
    }
    deltas.sort_unstable();
    let mut out = Vec::with_capacity(deltas.len() + 1);
    let mut cur = s;
    for (t, d) in deltas {
        if t > cur {
            out.push((cur, t, k.max(1) as u32));
            cur = t;
        }
        k += d;
    }
    if e > cur {
        out.push((cur, e, k.max(1) as u32));
    }
    out
}

/// `amount` spread uniformly over `[a, b)` (all at `a` when empty), shared per segment.
fn shared_amount(segs: &[(u64, u64, u32)], a: u64, b: u64, amount: f64) -> f64 {
    if b <= a {
        return segs
            .iter()
            .find(|&&(s, e, _)| s <= a && a < e)
            .map_or(0.0, |&(_, _, k)| amount / k as f64);
    }
    let dur = (b - a) as f64;
    segs.iter()
        .map(|&(s, e, k)| {
            let o = e.min(b).saturating_sub(s.max(a));
            amount * o as f64 / dur / k as f64
        })
        .sum()
}

/// Device energy in `[a, b)`, joules: energy-counter difference where counter readings bracket
/// both ends, else the integral of the piecewise-linear power curve (held flat for
/// `hold_ns` beyond the outermost samples). `None` when no sample covers any of the window.
pub fn energy_j(samples: &[PowerSample], a: u64, b: u64, hold_ns: u64) -> Option<f64> {
    if b <= a {
        return Some(0.0);
    }
    // Only the samples around the window matter (two on each side: a neighbour may lack a
    // power reading).
    let lo = samples.partition_point(|s| s.ts_ns < a).saturating_sub(2);
    let hi = (samples.partition_point(|s| s.ts_ns <= b) + 2).min(samples.len());
    let samples = &samples[lo..hi];
    if let (Some(ca), Some(cb)) = (counter_at(samples, a), counter_at(samples, b)) {
        if cb >= ca {
            return Some((cb - ca) / 1e3);
        }
    }
    let pts: Vec<(u64, f64)> = samples
        .iter()
        .filter_map(|s| s.power_mw.map(|p| (s.ts_ns, p as f64)))
        .collect();
    let (first, last) = (pts.first()?, pts.last()?);
    let lo = a.max(first.0.saturating_sub(hold_ns));
    let hi = b.min(last.0.saturating_add(hold_ns));
    if hi <= lo {
        return None;
    }
    // mW·ns → J.
    let mut mw_ns = 0.0;
    // Flat hold before the first and after the last sample.
    mw_ns += first.1 * first.0.min(hi).saturating_sub(lo) as f64;
    mw_ns += last.1 * hi.saturating_sub(last.0.max(lo)) as f64;
    for w in pts.windows(2) {
        let ((t0, p0), (t1, p1)) = (w[0], w[1]);
        let (x0, x1) = (t0.max(lo), t1.min(hi));
        if x1 <= x0 || t1 <= t0 {
            continue;
        }
        let at = |x: u64| p0 + (p1 - p0) * (x - t0) as f64 / (t1 - t0) as f64;
        mw_ns += (at(x0) + at(x1)) / 2.0 * (x1 - x0) as f64;
    }
    Some(mw_ns * 1e-12)
}

/// Energy counter (mJ) linearly interpolated at `t`, when readings bracket it without a reset.
fn counter_at(samples: &[PowerSample], t: u64) -> Option<f64> {
    let p = samples.partition_point(|s| s.ts_ns <= t);
    let lo = samples.get(p.checked_sub(1)?)?;
    if lo.ts_ns == t {
        return lo.energy_mj.map(|e| e as f64);
    }
    let hi = samples.get(p)?;
    let (e0, e1) = (lo.energy_mj? as f64, hi.energy_mj? as f64);
    if e1 < e0 {
        return None;
    }
    Some(e0 + (e1 - e0) * (t - lo.ts_ns) as f64 / (hi.ts_ns - lo.ts_ns) as f64)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::gpu::timeline::cuda_func;
    use crate::record::TokenCountSource;

    pub(crate) const MS: u64 = 1_000_000;

    pub(crate) fn request(conn_id: u64, start: u64, end: u64, tokens: &[u64]) -> RequestRecord {
        RequestRecord {
            pid: 100,
            conn_id,
            peer: None,
            seq_on_conn: 0,
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status: Some(200),
            model: Some("m".into()),
            stream: true,
            start_ns: start,
            read_ns: start,
            arrival_ns: None,
            connected_ns: None,
            accepted_ns: None,
            request_end_ns: Some(start),
            response_start_ns: Some(start),
            first_token_ns: tokens.first().copied(),
            end_ns: end,
            token_ns: tokens.to_vec(),
            tokens_per_event: vec![1; tokens.len()],
            output_tokens: Some(tokens.len() as u64),
            token_count_source: Some(TokenCountSource::Counted),
            prompt_tokens: Some(512),
            finish_reason: Some("stop".into()),
            request_bytes: 100,
            response_bytes: 1000,
            error: None,
            ..Default::default()
        }
    }

    pub(crate) fn kernel(name: &str, stream: u32, start: u64, end: u64) -> GpuActivity {
        GpuActivity {
            kind: GpuActivityKind::Kernel {
                grid: [1, 1, 1],
                block: [128, 1, 1],
                shared_mem_bytes: 0,
                registers_per_thread: 32,
            },
            device: 0,
            context: 1,
            stream,
            start_ns: start,
            end_ns: end,
            correlation_id: 1,
            name: Some(Arc::from(name)),
            pid: 200,
        }
    }

    pub(crate) fn memcpy(bytes: u64, start: u64, end: u64) -> GpuActivity {
        GpuActivity {
            kind: GpuActivityKind::Memcpy {
                kind: MemcpyKind::HtoD,
                bytes,
            },
            name: None,
            stream: 3,
            ..kernel("", 3, start, end)
        }
    }

    pub(crate) fn power(ts: u64, mw: Option<u32>, mj: Option<u64>) -> PowerSample {
        PowerSample {
            device: 0,
            ts_ns: ts,
            power_mw: mw,
            power_source: None,
            energy_mj: mj,
            gpu_util_pct: None,
            mem_util_pct: None,
        }
    }

    pub(crate) fn call(func: CudaFunc, start: u64, end: Option<u64>) -> CudaApiCall {
        CudaApiCall {
            pid: 200,
            tid: 201,
            func,
            start_ns: start,
            end_ns: end,
            bytes: None,
        }
    }

    fn approx(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9 * b.abs().max(1.0), "{a} != {b}");
    }

    /// A [0, 100) ms and B [50, 150) ms; kernels on two streams; one copy; 100 W flat.
    pub(crate) fn two_requests(c: &mut Correlator) -> (RequestRecord, RequestRecord) {
        let a = request(11, 0, 100 * MS, &[20 * MS, 60 * MS, 95 * MS]);
        let b = request(12, 50 * MS, 150 * MS, &[70 * MS, 140 * MS]);
        for k in [
            kernel("gemm", 1, 10 * MS, 30 * MS),
            kernel("attn", 2, 20 * MS, 40 * MS),
            kernel("gemm", 1, 60 * MS, 80 * MS),
            kernel("gemm", 1, 90 * MS, 120 * MS),
            memcpy(1000, 40 * MS, 60 * MS),
        ] {
            c.add_activity(k);
        }
        for t in [0, 50, 100, 150] {
            c.add_power_sample(power(t * MS, Some(100_000), None));
        }
        (a, b)
    }

    #[test]
    fn busy_bytes_and_energy_are_shared_among_requests_in_flight() {
        let mut c = Correlator::new(CorrelatorConfig::default());
        let (a, b) = two_requests(&mut c);
        c.request_started(RequestKey::of(&a), a.start_ns);
        c.request_started(RequestKey::of(&b), b.start_ns);
        c.request_finished(a.clone());
        // B is still in flight when A is finalised.
        assert!(c.poll(100 * MS + 2 * SEC).is_empty());
        let done = c.poll(100 * MS + 3 * SEC);
        assert_eq!(done.len(), 1);
        let ga = &done[0].gpu;
        // [10,40) alone (two streams' union = 30) + [60,80) half + [90,100) half.
        approx(ga.gpu_busy_ms, 30.0 + 10.0 + 5.0);
        assert_eq!(ga.kernel_count, 4);
        // 1000 B over [40,60): 500 alone, 500 shared.
        assert_eq!(ga.memcpy_bytes, 750);
        // 100 W × 50 ms alone + 100 W × 50 ms / 2.
        approx(ga.energy_j.unwrap(), 5.0 + 2.5);
        approx(ga.energy_j_per_token.unwrap(), 7.5 / 3.0);
        approx(ga.mean_concurrency, 1.5);
        // TTFT 0..20 ms: gemm from 10 ms, attn from 20 ms.
        assert_eq!(
            ga.ttft_breakdown,
            Some(GapBreakdown {
                gpu_busy_ns: 10 * MS,
                sync_wait_ns: 0,
                launch_ns: 0,
                idle_ns: 10 * MS,
            })
        );
        assert!(!ga.partial);

        c.request_finished(b.clone());
        let done = c.flush();
        let gb = &done[0].gpu;
        approx(gb.gpu_busy_ms, 10.0 + 5.0 + 20.0);
        assert_eq!(gb.kernel_count, 2);
        assert_eq!(gb.memcpy_bytes, 250);
        approx(gb.energy_j.unwrap(), 2.5 + 5.0);
        // Shares add up to the device totals.
        approx(ga.gpu_busy_ms + gb.gpu_busy_ms, 80.0);
        approx(ga.energy_j.unwrap() + gb.energy_j.unwrap(), 15.0);
    }

    #[test]
    fn energy_from_counter_and_from_power_ramp() {
        let mut c = Correlator::new(CorrelatorConfig::default());
        // Counter: 20 J over 100 ms (200 W); power readings disagree and must be ignored.
        c.add_power_sample(power(0, Some(1), Some(1_000)));
        c.add_power_sample(power(100 * MS, Some(1), Some(21_000)));
        let r = request(1, 10 * MS, 60 * MS, &[]);
        approx(c.analyze(&r).energy_j.unwrap(), 10.0);

        // No counter: 0 W → 100 W ramp over 100 ms, request covers it all: 5 J.
        let mut c = Correlator::new(CorrelatorConfig::default());
        c.add_power_sample(power(0, Some(0), None));
        c.add_power_sample(power(100 * MS, Some(100_000), None));
        let r = request(1, 0, 100 * MS, &[]);
        approx(c.analyze(&r).energy_j.unwrap(), 5.0);
        // Half of it: 0..50 ms → mean 25 W × 50 ms.
        let r = request(1, 0, 50 * MS, &[]);
        approx(c.analyze(&r).energy_j.unwrap(), 1.25);
        // Held flat for `power_hold_ns` (1 s) past the last sample, nothing after.
        let r = request(1, 100 * MS, 3 * SEC, &[]);
        approx(c.analyze(&r).energy_j.unwrap(), 100.0);
        // Zig-zag 100/200 W every 10 ms; [15, 45) ms: 0.625 + 1.5 + 1.5 + 0.625 J.
        let mut c = Correlator::new(CorrelatorConfig::default());
        for i in 0..50u64 {
            let w = if i % 2 == 0 { 100_000 } else { 200_000 };
            c.add_power_sample(power(i * 10 * MS, Some(w), None));
        }
        let r = request(1, 15 * MS, 45 * MS, &[]);
        approx(c.analyze(&r).energy_j.unwrap(), 4.25);
        // No samples at all: unknown, not zero.
        let c = Correlator::new(CorrelatorConfig::default());
        assert_eq!(c.analyze(&r).energy_j, None);
    }

    /// A's tokens at 100, 110, 120, 170, 180 ms; the 50 ms gap holds B's prefill, a sync stall
    /// and a launch burst.
    pub(crate) fn gap_scenario(c: &mut Correlator) {
        let a = request(
            1,
            0,
            200 * MS,
            &[100 * MS, 110 * MS, 120 * MS, 170 * MS, 180 * MS],
        );
        let b = request(2, 125 * MS, 300 * MS, &[160 * MS, 290 * MS]);
        c.add_activity(kernel("decode", 1, 120 * MS, 125 * MS));
        c.add_activity(kernel("prefill_attn", 2, 126 * MS, 150 * MS));
        c.add_api_call(call(
            cuda_func("cudaStreamSynchronize").unwrap(),
            150 * MS,
            Some(158 * MS),
        ));
        // Entry-only launches: a burst of two (50 µs apart), the last charged 5 µs.
        c.add_api_call(call(cuda_func("cuLaunchKernel").unwrap(), 158 * MS, None));
        c.add_api_call(call(
            cuda_func("cuLaunchKernel").unwrap(),
            158 * MS + 50_000,
            None,
        ));
        c.request_finished(b);
        c.request_finished(a);
    }

    #[test]
    fn slow_gap_is_decomposed_and_explained() {
        let mut c = Correlator::new(CorrelatorConfig::default());
        gap_scenario(&mut c);
        let done = c.flush();
        let ga = &done.iter().find(|r| r.record.conn_id == 1).unwrap().gpu;
        assert_eq!(ga.median_itl_ns, Some(10 * MS));
        assert_eq!(ga.slow_tokens.len(), 1);
        let g = &ga.slow_tokens[0];
        assert_eq!(
            (g.token_index, g.start_ns, g.gap_ns),
            (3, 120 * MS, 50 * MS)
        );
        assert_eq!(g.gpu_busy_ns, 29 * MS);
        assert_eq!(g.sync_wait_ns, 8 * MS);
        assert_eq!(g.launch_ns, 55_000);
        assert_eq!(g.idle_ns, 50 * MS - 29 * MS - 8 * MS - 55_000);
        assert_eq!(
            g.gpu_busy_ns + g.sync_wait_ns + g.launch_ns + g.idle_ns,
            g.gap_ns
        );
        assert_eq!(
            g.top,
            vec![
                Contributor::Prefill {
                    pid: 100,
                    conn_id: 2,
                    seq_on_conn: 0,
                    prompt_tokens: Some(512),
                    overlap_ns: 35 * MS,
                },
                Contributor::Kernel {
                    name: "prefill_attn".into(),
                    device: 0,
                    count: 1,
                    overlap_ns: 24 * MS,
                },
                Contributor::HostSync {
                    what: "cudaStreamSynchronize",
                    count: 1,
                    overlap_ns: 8 * MS,
                },
                Contributor::Kernel {
                    name: "decode".into(),
                    device: 0,
                    count: 1,
                    overlap_ns: 5 * MS,
                },
            ]
        );
        // The other gaps are empty: all idle.
        let all = ga.itl_breakdown.unwrap();
        assert_eq!(all.total_ns(), 80 * MS);
        assert_eq!(all.idle_ns, 30 * MS + g.idle_ns);
        assert_eq!(all.gpu_busy_ns, g.gpu_busy_ns);
    }

    #[test]
    fn retention_drops_late_data_and_flags_partial() {
        let cfg = CorrelatorConfig {
            horizon_ns: SEC,
            finalize_delay_ns: 0,
            ..CorrelatorConfig::default()
        };
        let mut c = Correlator::new(cfg);
        c.add_activity(kernel("k", 1, 0, MS));
        assert!(c.poll(10 * SEC).is_empty());
        c.add_activity(kernel("late", 1, 2 * SEC, 3 * SEC));
        assert_eq!(c.counters().late_dropped, 1);
        c.add_activity(kernel("k", 1, 5 * SEC, 4 * SEC));
        c.add_activity(kernel("k", 1, 5 * SEC, 100 * SEC));
        c.add_api_call(call(
            cuda_func("cudaDeviceSynchronize").unwrap(),
            5 * SEC,
            Some(4 * SEC),
        ));
        assert_eq!(c.counters().malformed, 3);
        c.request_finished(request(1, 0, 10 * SEC, &[]));
        let done = c.poll(11 * SEC);
        assert_eq!(done.len(), 1);
        assert!(done[0].gpu.partial);
        assert_eq!(done[0].gpu.kernel_count, 0);
    }

    #[test]
    fn stale_open_requests_are_forgotten_and_pending_is_bounded() {
        let cfg = CorrelatorConfig {
            max_open_request_ns: 10 * SEC,
            max_requests: 2,
            ..CorrelatorConfig::default()
        };
        let mut c = Correlator::new(cfg);
        let stuck = request(9, 0, SEC, &[]);
        c.request_started(RequestKey::of(&stuck), 0);
        assert!(c.poll(5 * SEC).is_empty());
        // Still in flight: a request finishing now shares with it.
        let r = request(1, SEC, 2 * SEC, &[]);
        approx(c.analyze(&r).mean_concurrency, 2.0);
        c.poll(11 * SEC);
        assert_eq!(c.counters().stale_open_requests, 1);
        approx(c.analyze(&r).mean_concurrency, 1.0);
        for i in 0..5 {
            c.request_finished(request(i, 20 * SEC, 20 * SEC + i, &[]));
        }
        // Delay not over, but only 2 may wait: the 3 oldest go now.
        let early = c.poll(20 * SEC);
        assert_eq!(early.len(), 3);
        assert_eq!(c.pending_len(), 2);
        assert_eq!(c.counters().finalized_early, 3);
        assert_eq!(c.flush().len(), 2);
    }

    #[test]
    fn caps_bound_memory() {
        let cfg = CorrelatorConfig {
            max_activities: 10,
            ..CorrelatorConfig::default()
        };
        let mut c = Correlator::new(cfg);
        for i in 0..25 {
            c.add_activity(kernel("k", 1, i * MS, i * MS + 1));
        }
        assert_eq!(c.activities.len(), 10);
        assert_eq!(c.counters().cap_dropped, 15);
        let r = request(1, 0, 30 * MS, &[]);
        let s = c.analyze(&r);
        assert_eq!(s.kernel_count, 10);
        assert!(s.partial);
    }

    #[test]
    fn json_form_is_flat_and_named() {
        let mut c = Correlator::new(CorrelatorConfig::default());
        gap_scenario(&mut c);
        c.add_activity(memcpy(4096, 130 * MS, 140 * MS));
        let done = c.flush();
        let ga = done.iter().find(|r| r.record.conn_id == 1).unwrap();
        let v = serde_json::to_value(&ga.gpu).unwrap();
        let top = v["slow_tokens"][0]["top"].as_array().unwrap();
        assert!(
            top.contains(
                &serde_json::json!({"kind": "memcpy", "direction": "htod", "device": 0,
                "count": 1, "bytes": 4096, "overlap_ns": 10 * MS})
            ),
            "{top:?}"
        );
        for f in [
            "gpu_busy_ms",
            "energy_j",
            "energy_j_per_token",
            "memcpy_bytes",
            "slow_tokens",
        ] {
            assert!(v.get(f).is_some(), "{f} missing in {v}");
        }
    }

    mod conservation {
        use super::*;
        use proptest::prelude::*;

        fn span() -> impl Strategy<Value = (u64, u64)> {
            (0u64..1_000, 0u64..300).prop_map(|(a, l)| (a * 1_000, (a + l) * 1_000))
        }

        proptest! {
            // Shares add up: over all requests, busy time equals each device's busy time while at
            // least one request is in flight, energy equals the device energy then, and every
            // token gap decomposes exactly.
            #[test]
            fn shares_add_up(
                reqs in proptest::collection::vec((span(), proptest::collection::vec(0u64..1_300, 0..6)), 1..6),
                kernels in proptest::collection::vec((span(), 0u32..2, 0u32..3), 0..30),
                copies in proptest::collection::vec((span(), 1u64..10_000), 0..5),
                calls in proptest::collection::vec((0u64..1_300, proptest::option::of(0u64..50), 0usize..3), 0..20),
            ) {
                let mut c = Correlator::new(CorrelatorConfig::default());
                let mut recs = Vec::new();
                for (i, ((s, e), mut toks)) in reqs.into_iter().enumerate() {
                    toks.sort_unstable();
                    let toks: Vec<u64> = toks.into_iter().map(|t| (s + t * 1_000).min(e)).collect();
                    recs.push(request(i as u64, s, e, &toks));
                }
                for ((a, b), device, stream) in &kernels {
                    let mut k = kernel("k", *stream, *a, *b);
                    k.device = *device;
                    c.add_activity(k);
                }
                for ((a, b), bytes) in &copies {
                    c.add_activity(memcpy(*bytes, *a, *b));
                }
                let funcs = [cuda_func("cuLaunchKernel").unwrap(), cuda_func("cudaStreamSynchronize").unwrap(), cuda_func("cudaMemcpy").unwrap()];
                for (t, d, f) in calls {
                    c.add_api_call(call(funcs[f], t * 1_000, d.map(|d| (t + d) * 1_000)));
                }
                // 50 W flat on device 0 (held over the whole test window).
                c.add_power_sample(power(500_000, Some(50_000), None));
                for r in &recs {
                    c.request_finished(r.clone());
                }
                let done = c.flush();
                prop_assert_eq!(done.len(), recs.len());

                let lifetimes = IntervalSet::from_spans(recs.iter().map(|r| (r.start_ns, r.end_ns)));
                let mut want_busy = 0u64;
                for d in 0..2 {
                    let busy = IntervalSet::from_spans(
                        kernels.iter().filter(|k| k.1 == d).map(|k| k.0),
                    );
                    for &(a, b) in lifetimes.spans() {
                        want_busy += busy.overlap_len(a, b);
                    }
                }
                let got_busy: f64 = done.iter().map(|r| r.gpu.gpu_busy_ms * 1e6).sum();
                prop_assert!((got_busy - want_busy as f64).abs() < 1e-3, "{} vs {}", got_busy, want_busy);

                let want_j = 50.0 * lifetimes.total() as f64 * 1e-9;
                let got_j: f64 = done.iter().map(|r| r.gpu.energy_j.unwrap_or(0.0)).sum();
                prop_assert!((got_j - want_j).abs() < 1e-9, "{} vs {}", got_j, want_j);

                let mut want_bytes = 0f64;
                for ((a, b), bytes) in &copies {
                    want_bytes += if b > a {
                        *bytes as f64 * lifetimes.overlap_len(*a, *b) as f64 / (b - a) as f64
                    } else if lifetimes.overlap_len(*a, a + 1) > 0 {
                        *bytes as f64
                    } else {
                        0.0
                    };
                }
                let got_bytes: u64 = done.iter().map(|r| r.gpu.memcpy_bytes).sum();
                prop_assert!((got_bytes as f64 - want_bytes).abs() <= recs.len() as f64 * 0.5 + 1e-6);

                for r in &done {
                    let gaps: u64 = r.record.itl_ns().sum();
                    prop_assert_eq!(r.gpu.itl_breakdown.map_or(0, |b| b.total_ns()), gaps);
                    for g in &r.gpu.slow_tokens {
                        prop_assert_eq!(g.gpu_busy_ns + g.sync_wait_ns + g.launch_ns + g.idle_ns, g.gap_ns);
                    }
                }
            }
        }
    }
}
