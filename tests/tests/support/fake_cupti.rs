//! Builds the fake libcupti (`fixtures/fake_cupti.c`) with CUPTI's record layouts taken from
//! cudarc's structs (the ones the injection library decodes), so the fake's records and the
//! decoder cannot drift apart.

use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use cudarc::cupti::sys::{CUpti_ActivityGraphTrace2 as G, CUpti_ActivityKernel9 as K};

/// `-D` flags describing the kernel and graph-trace record layouts.
fn layout_flags() -> Vec<String> {
    let d = |n: &str, v: usize| format!("-D{n}={v}");
    vec![
        d("K_SIZE", size_of::<K>()),
        d("K_START", offset_of!(K, start)),
        d("K_END", offset_of!(K, end)),
        d("K_DEVICE", offset_of!(K, deviceId)),
        d("K_CONTEXT", offset_of!(K, contextId)),
        d("K_STREAM", offset_of!(K, streamId)),
        d("K_CORR", offset_of!(K, correlationId)),
        d("K_NAME", offset_of!(K, name)),
        d("K_GRIDX", offset_of!(K, gridX)),
        d("K_GRIDY", offset_of!(K, gridY)),
        d("K_GRIDZ", offset_of!(K, gridZ)),
        d("K_BLOCKX", offset_of!(K, blockX)),
        d("K_BLOCKY", offset_of!(K, blockY)),
        d("K_BLOCKZ", offset_of!(K, blockZ)),
        d("G_SIZE", size_of::<G>()),
        d("G_START", offset_of!(G, start)),
        d("G_END", offset_of!(G, end)),
        d("G_DEVICE", offset_of!(G, deviceId)),
        d("G_CONTEXT", offset_of!(G, contextId)),
        d("G_STREAM", offset_of!(G, streamId)),
        d("G_GRAPHID", offset_of!(G, graphId)),
        d("G_CORR", offset_of!(G, correlationId)),
    ]
}

/// Builds `dir/libcupti.so` and returns its path.
pub fn build(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let out = dir.join("libcupti.so");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let status = Command::new("cc")
        .args([
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Wl,-soname,libcupti.so",
        ])
        .args(layout_flags())
        .arg(format!("-I{}", fixtures.display()))
        .arg("-o")
        .arg(&out)
        .arg(fixtures.join("fake_cupti.c"))
        .args(["-lpthread", "-ldl"])
        .status()
        .expect("cc runs");
    assert!(status.success(), "building the fake libcupti failed");
    out
}
