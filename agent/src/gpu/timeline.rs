//! GPU timeline types shared by the GPU data sources (CUPTI, NVML, CUDA uprobes) and the
//! request↔GPU correlation.
//!
//! Every timestamp here is CLOCK_MONOTONIC nanoseconds, the clock the eBPF probes use, so GPU
//! activity lines up with request and token times without further conversion. Sources on another
//! clock (CUPTI's GPU timestamps) are mapped onto it before they reach these types.

use std::sync::Arc;

/// Current CLOCK_MONOTONIC time in nanoseconds (the timeline clock).
pub use crate::clock::monotonic_ns as monotonic_now_ns;

/// Direction of a memory copy, as CUPTI classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemcpyKind {
    /// Host → device (pageable or pinned host memory).
    HtoD,
    /// Device → host.
    DtoH,
    /// Device → device on the same GPU.
    DtoD,
    /// Host → host through the CUDA API.
    HtoH,
    /// Peer to peer between two GPUs.
    PtoP,
    /// Array copies and kinds CUPTI leaves unknown.
    Other,
}

impl MemcpyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MemcpyKind::HtoD => "htod",
            MemcpyKind::DtoH => "dtoh",
            MemcpyKind::DtoD => "dtod",
            MemcpyKind::HtoH => "htoh",
            MemcpyKind::PtoP => "ptop",
            MemcpyKind::Other => "other",
        }
    }
}

/// What a host thread waited for, as CUPTI's synchronization records classify it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncKind {
    /// `cudaEventSynchronize` / `cuEventSynchronize`.
    Event,
    /// `cudaStreamWaitEvent`: a stream (not the host) waits for an event.
    StreamWaitEvent,
    /// `cudaStreamSynchronize` / `cuStreamSynchronize`.
    Stream,
    /// `cudaDeviceSynchronize` / `cuCtxSynchronize`.
    Context,
    /// A kind this build does not know.
    Unknown,
}

impl SyncKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Event => "event",
            SyncKind::StreamWaitEvent => "stream_wait_event",
            SyncKind::Stream => "stream",
            SyncKind::Context => "context",
            SyncKind::Unknown => "unknown",
        }
    }
}

/// What a [`GpuActivity`] was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum GpuActivityKind {
    /// A kernel execution. `grid`/`block` are the launch dimensions (x, y, z).
    Kernel {
        grid: [i32; 3],
        block: [i32; 3],
        /// Static + dynamic shared memory per block, bytes.
        shared_mem_bytes: u32,
        registers_per_thread: u16,
    },
    /// A memory copy of `bytes` bytes.
    Memcpy { kind: MemcpyKind, bytes: u64 },
    /// A memset of `bytes` bytes.
    Memset { bytes: u64 },
    /// A host-side wait for GPU work (the interval the host thread was blocked).
    Sync { kind: SyncKind },
    /// One whole CUDA graph launch (replay), recorded as a single interval instead of one record
    /// per kernel node.
    Graph { graph_id: u32 },
}

impl GpuActivityKind {
    /// Short stable label ("kernel", "memcpy", ...), e.g. for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            GpuActivityKind::Kernel { .. } => "kernel",
            GpuActivityKind::Memcpy { .. } => "memcpy",
            GpuActivityKind::Memset { .. } => "memset",
            GpuActivityKind::Sync { .. } => "sync",
            GpuActivityKind::Graph { .. } => "graph",
        }
    }
}

/// One interval of GPU (or host-waits-for-GPU) activity, from CUPTI.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GpuActivity {
    pub kind: GpuActivityKind,
    /// CUDA device ordinal; `u32::MAX` for a synchronization whose context was never seen in a
    /// kernel/memcpy record (CUPTI's sync records name only the context).
    pub device: u32,
    /// CUPTI context id.
    pub context: u32,
    /// CUPTI stream id (0 where the record kind has none, e.g. context-wide syncs).
    pub stream: u32,
    /// CLOCK_MONOTONIC ns.
    pub start_ns: u64,
    /// CLOCK_MONOTONIC ns, `>= start_ns`.
    pub end_ns: u64,
    /// CUPTI correlation id, which links the activity to the host API call that issued it (unique
    /// per process, not across processes).
    pub correlation_id: u32,
    /// Demangled-or-not kernel name as CUPTI reports it; `None` for non-kernels.
    #[serde(serialize_with = "ser_opt_arc_str")]
    pub name: Option<Arc<str>>,
    /// Process that issued the work.
    pub pid: u32,
}

impl GpuActivity {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

fn ser_opt_arc_str<S: serde::Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(name) => s.serialize_some(&**name),
        None => s.serialize_none(),
    }
}

/// Where [`PowerSample::power_mw`] came from. They differ: on recent GPUs the plain reading is a
/// 1 s moving average, too slow to attribute power to a single decode step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerSource {
    /// `NVML_FI_DEV_POWER_INSTANT` field value.
    Instant,
    /// `nvmlDeviceGetPowerUsage` (averaged over ~1 s on Ampere and later).
    Average,
}

/// One fast-path NVML sample of a GPU (taken every power period, ≤ 100 ms). Each reading is
/// `None` where the GPU or driver does not support it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PowerSample {
    /// NVML device index.
    pub device: u32,
    /// CLOCK_MONOTONIC ns at which the readings were taken.
    pub ts_ns: u64,
    /// Board power draw, milliwatts.
    pub power_mw: Option<u32>,
    pub power_source: Option<PowerSource>,
    /// Energy consumed since the driver was loaded, millijoules (monotonic counter: differences
    /// between samples give energy per interval, immune to sampling gaps).
    pub energy_mj: Option<u64>,
    /// Percent of the last sample period during which a kernel ran.
    pub gpu_util_pct: Option<u32>,
    /// Percent of the last sample period during which device memory was read or written.
    pub mem_util_pct: Option<u32>,
}

/// A probed CUDA function: one entry of the table shared with the eBPF side
/// (`infertap_common::cuda::FUNCS`), so a function has one identity from probe to trace.
pub type CudaFunc = &'static infertap_common::cuda::Func;

/// What a CUDA call does (launch, copy, sync, ...).
pub use infertap_common::cuda::Class as CudaCallKind;

/// Looks a probed function up by its exported symbol.
pub fn cuda_func(symbol: &str) -> Option<CudaFunc> {
    infertap_common::cuda::FUNCS
        .iter()
        .find(|f| f.symbol == symbol)
}

fn ser_cuda_func<S: serde::Serializer>(f: &CudaFunc, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.symbol)
}

/// One host-side CUDA API call seen by the launch-path uprobes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CudaApiCall {
    pub pid: u32,
    pub tid: u32,
    #[serde(serialize_with = "ser_cuda_func")]
    pub func: CudaFunc,
    /// CLOCK_MONOTONIC ns at function entry.
    pub start_ns: u64,
    /// CLOCK_MONOTONIC ns at return; `None` where only the entry was probed (a uretprobe costs
    /// ~10 µs per call, so hot launch paths are probed on entry only).
    pub end_ns: Option<u64>,
    /// Bytes copied, set or allocated, for the functions that take a size.
    pub bytes: Option<u64>,
}

impl CudaApiCall {
    /// Category of the call (same as `self.func.kind()`).
    pub fn kind(&self) -> CudaCallKind {
        self.func.class
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_resolve_by_symbol() {
        let f = cuda_func("cuMemcpyDtoHAsync_v2").unwrap();
        assert_eq!(f.class, CudaCallKind::MemcpyAsync);
        assert_eq!(f.api, infertap_common::cuda::Api::Driver);
        assert!(cuda_func("cudaNotAFunction").is_none());
        let call = CudaApiCall {
            pid: 1,
            tid: 2,
            func: f,
            start_ns: 3,
            end_ns: None,
            bytes: Some(4),
        };
        assert_eq!(
            serde_json::to_value(call).unwrap()["func"],
            "cuMemcpyDtoHAsync_v2"
        );
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_now_ns();
        let b = monotonic_now_ns();
        assert!(a > 0 && b >= a);
    }
}
