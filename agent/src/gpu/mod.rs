//! GPU side: CUDA launch-path uprobe aggregates, CUPTI activity records, NVML samples, and the
//! correlation of requests and token gaps with GPU activity.

pub mod correlate;
pub mod explain;
mod intervals;
pub mod timeline;
pub mod trace;
