//! Generates the prost/tonic code from `proto/infertap.proto` and `proto/profile.proto` (Google's
//! pprof schema, verbatim from github.com/google/pprof, `proto/profile.proto` as of commit 101d87f,
//! 2025-08-30) without `protoc`: protox parses the files into a descriptor set, tonic-prost-build
//! generates from that. Profile payloads are `bytes::Bytes` so buffered reports clone cheaply.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/infertap.proto");
    println!("cargo:rerun-if-changed=proto/profile.proto");
    let fds = protox::compile(["proto/infertap.proto", "proto/profile.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".infertap.v1.ProfileData.pprof")
        .compile_fds(fds)?;
    Ok(())
}
