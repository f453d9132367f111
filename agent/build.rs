//! Builds the eBPF programs (`agent-ebpf`) for the bpf target with aya-build and leaves the object
//! in OUT_DIR, where `probes` embeds it. `AYA_BUILD_SKIP=1` skips that build (clippy or unit tests
//! of user space only); the agent then reports at load time that it carries no eBPF object.
use std::path::PathBuf;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let object = out_dir.join("infertap");
        if !object.exists() {
            std::fs::write(&object, b"")?;
        }
        return Ok(());
    }
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest_dir
        .join("../agent-ebpf")
        .canonicalize()
        .context("agent-ebpf directory")?;
    let root_dir = root_dir.to_str().context("non-UTF-8 path")?;
    // The eBPF crate reads the shared ABI: rebuild when it changes too.
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../common/src").display()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "infertap-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
