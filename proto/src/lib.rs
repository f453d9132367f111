//! infertap's agent→collector protocol (`pb`, generated from `proto/infertap.proto`) and the
//! metric schema both sides share (`schema`), plus the mergeable metric store (`store`) that the
//! agent's and the collector's Prometheus endpoints both encode from, so metric names, label names
//! and bucket bounds cannot drift apart. `pprof` builds, decodes, validates and merges the
//! profiles that reports carry; `otlp` turns a store into OTLP metrics and exports over
//! OTLP/gRPC (agent and collector `--otlp-endpoint`).

pub mod otlp;
pub mod pprof;
pub mod schema;
pub mod store;

/// Generated protobuf messages and the `Collector` gRPC service (client and server).
pub mod pb {
    tonic::include_proto!("infertap.v1");
}

/// Prometheus remote-write 1.0 messages (`prometheus.WriteRequest`, `TimeSeries`, ...), generated
/// from Prometheus's own `prompb/remote.proto` and `prompb/types.proto` (vendored in `proto/`).
pub mod prompb {
    tonic::include_proto!("prometheus");
}

/// The collector's persisted state (`--state-dir`): merged totals and per-instance dedupe.
pub mod state_pb {
    tonic::include_proto!("infertap.state.v1");
}
