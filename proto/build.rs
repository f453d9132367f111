//! Generates the prost/tonic code from `proto/infertap.proto` and `proto/profile.proto` (Google's
//! pprof schema, verbatim from github.com/google/pprof, `proto/profile.proto` as of commit 101d87f,
//! 2025-08-30) without `protoc`: protox parses the files into a descriptor set, tonic-prost-build
//! generates from that. Profile payloads are `bytes::Bytes` so buffered reports clone cheaply.
//!
//! Prometheus remote write: `proto/prompb/{types,remote}.proto` are Prometheus's own definitions,
//! verbatim from github.com/prometheus/prometheus `prompb/` (commit 6748fea, last change to those
//! files in the snapshot of d15adb9, 2026-08-21), and `proto/gogoproto/gogo.proto` the gogoproto
//! options they import, verbatim from github.com/gogo/protobuf (commit f67b897). Only the
//! `prometheus` package is generated (gogoproto's options do not change the wire format).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/infertap.proto");
    println!("cargo:rerun-if-changed=proto/profile.proto");
    let fds = protox::compile(["proto/infertap.proto", "proto/profile.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".infertap.v1.ProfileData.pprof")
        .compile_fds(fds)?;

    println!("cargo:rerun-if-changed=proto/prompb");
    println!("cargo:rerun-if-changed=proto/gogoproto");
    let mut prompb = protox::compile(["remote.proto"], ["proto/prompb", "proto"])?;
    prompb
        .file
        .retain(|f| f.package.as_deref() == Some("prometheus"));
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(prompb)?;

    // The collector's --state-dir file; its reports are the infertap.v1 messages above.
    println!("cargo:rerun-if-changed=proto/collector_state.proto");
    let state = protox::compile(["collector_state.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .extern_path(".infertap.v1", "crate::pb")
        .compile_fds(state)?;
    Ok(())
}
