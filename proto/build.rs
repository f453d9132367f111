//! Generates the prost/tonic code from `proto/infertap.proto` without `protoc`: protox parses the
//! file into a descriptor set, tonic-prost-build generates from that.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/infertap.proto");
    let fds = protox::compile(["proto/infertap.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
