//! Builds the stand-in CUDA libraries (`libcuda.so.1`, `libcudart.so.12`) and the app that
//! drives them (`fixtures/cuda`), shared by the CUDA probe and launch-sampling tests.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/cuda")
}

fn run(cmd: &mut Command) {
    let status = cmd.status().expect("compiler runs");
    assert!(status.success(), "{cmd:?} failed");
}

/// Builds the stubs and the app into a fresh directory.
pub fn build(dir: &Path) -> PathBuf {
    let f = fixtures();
    run(Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(dir.join("libcuda.so.1"))
        .arg(f.join("stub_driver.c")));
    run(Command::new("cc")
        .args([
            "-shared",
            "-fPIC",
            "-O1",
            "-Wl,-soname,libcudart.so.12",
            "-o",
        ])
        .arg(dir.join("libcudart.so.12"))
        .arg(f.join("stub_runtime.c")));
    let app = dir.join("app");
    run(Command::new("c++")
        .args(["-O1", "-o"])
        .arg(&app)
        .arg(f.join("app.cpp"))
        .arg(format!("-L{}", dir.display()))
        .args(["-l:libcudart.so.12", "-ldl"])
        .arg(format!("-Wl,-rpath,{}", dir.display())));
    app
}
