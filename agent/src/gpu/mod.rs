//! GPU side: CUDA launch-path uprobe aggregates, CUPTI activity records, NVML samples, and the
//! correlation of requests and token gaps with GPU activity.
//!
//! - `timeline`: the GPU-side event types, all on the probes' clock (CLOCK_MONOTONIC).
//! - `cupti`: receiver for the CUPTI injection library (exact kernel/memcpy timings).
//! - `launches`: CUPTI launch records joined with their kernels: GPU time per launch, for the
//!   profiler's GPU profile.
//! - `nvml`: power, energy, utilisation, memory, clocks, throttling (DCGM-mapped metrics).
//! - `correlate`: requests and token gaps joined with GPU activity through time.
//! - `trace`: the Perfetto timeline (the `explain` text is a sink: `sinks::explain`).

pub mod correlate;
pub mod cupti;
mod intervals;
pub mod launches;
pub mod nvml;
pub mod stage;
pub mod timeline;
pub mod trace;
