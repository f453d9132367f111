//! infertap agent: watches an unmodified LLM inference server and reports per-request and
//! per-token timings, joined with GPU activity.
//!
//! The data path is a pipeline, one module per stage:
//!
//! ```text
//! probes (eBPF tracepoints/uprobes, agent-ebpf)   -> raw ring-buffer records
//!   events       decode records into typed ConnEvent / ProcEvent
//!   reconstruct  per-connection byte streams -> HTTP/1.1 exchanges -> RequestRecord
//!     protocol::{http, sse, openai}  incremental parsers used by reconstruct
//!   gpu          CUDA uprobe aggregates, CUPTI records, NVML samples, request<->GPU correlation
//!   aggregate    interval histograms/counters (mergeable) from records
//!   sinks        JSON lines, Prometheus endpoint, gRPC stream to the collector
//!   metadata     pid -> cgroup -> container/pod (Kubernetes) for labels and JSON lines
//! ```
//! `pipeline` wires the stages together; `main.rs` is only the CLI.

pub mod aggregate;
pub mod clock;
pub mod events;
pub mod external_counter;
pub mod gpu;
pub mod health;
pub mod identity;
pub mod metadata;
pub mod pipeline;
pub mod probes;
pub mod profiling;
pub mod protocol;
pub mod reconstruct;
pub mod record;
pub mod server_metrics;
pub mod sinks;
pub mod symbolize;
pub mod targets;
