//! Where results go: JSON lines, the Prometheus endpoint, the gRPC stream to the collector.

pub mod grpc;
pub mod jsonl;
pub mod prometheus;
