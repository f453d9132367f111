//! Where results go: JSON lines, the Prometheus endpoint, the gRPC stream to the collector,
//! OTLP spans and metrics, pprof profiles.

pub mod explain;
pub mod grpc;
pub mod jsonl;
pub mod otlp;
pub mod pprof;
pub mod prometheus;
