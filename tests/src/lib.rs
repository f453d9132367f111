//! Test harness for infertap: scripted and real servers, the agent and collector as processes,
//! an independent streaming client and load generator, and agent-vs-client comparisons.
//!
//! Module map:
//! - [`client`]: streaming HTTP/1.1 client measuring what a benchmark client measures
//! - [`load`]: N concurrent keep-alive connections (used by the `loadgen` binary)
//! - [`servers`]: `tests/servers/scripted_sse.py` and llama-cpp-python as child processes
//! - [`agent`]: the `infertap` and `infertap-collector` binaries as child processes, their
//!   JSON-lines records and Prometheus metrics
//! - [`compare`]: join agent and client records by (peer, seq_on_conn), error statistics
//! - [`prereq`]: skip locally / fail in CI when root, binaries or the venv are missing
//! - [`paths`]: where binaries, the venv and the model live
//! - [`collector_support`]: in-process agents' exporters against a collector (gRPC tests)
//! - [`tools`]: `go tool pprof`, headless Chromium and the test artefacts folder
//! - [`otlp`]: the OTLP/gRPC receiver decoding with the official protobuf definitions
//! - [`wire`]: packet capture of a server port on loopback, the timing reference
//! - [`k8s`]: the manifests' schema validator, the DaemonSet's capability set, a kubelet-shaped
//!   cgroup to run a server in

pub mod agent;
pub mod client;
pub mod collector_support;
pub mod compare;
pub mod k8s;
pub mod load;
pub mod otlp;
pub mod paths;
pub mod prereq;
pub mod prometheus;
pub mod report;
pub mod servers;
pub mod stores;
pub mod tools;
pub mod wire;

/// Builds a multi-thread tokio runtime (for sync tests and binaries).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
