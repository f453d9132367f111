//! Builds the eBPF programs (`agent-ebpf`) for the bpf target with aya-build and leaves the object
//! in OUT_DIR, where `probes` embeds it. `AYA_BUILD_SKIP=1` skips that build (clippy or unit tests
//! of user space only); the agent then reports at load time that it carries no eBPF object.
use std::path::PathBuf;

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("infertap");
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        if !object.exists() {
            std::fs::write(&object, b"")?;
        }
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "infertap-ebpf")
        .ok_or_else(|| anyhow!("infertap-ebpf package not found"))?;
    let root_dir = ebpf_package.manifest_path.parent().context("manifest without parent")?.as_str().to_owned();
    aya_build::build_ebpf(
        [aya_build::Package { name: "infertap-ebpf", root_dir: &root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
