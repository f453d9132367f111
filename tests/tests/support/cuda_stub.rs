//! Builds the stand-in CUDA libraries (`libcuda.so.1`, `libcudart.so.12`) and the apps that
//! drive them (`fixtures/cuda`), shared by the CUDA probe, launch-sampling and GPU-profile tests.
//! The stubs are built with their CUPTI side on (`STUB_WITH_TOOL`, see `fixtures/fake_tool.h`):
//! inert unless the fake libcupti subscribes.

#![allow(dead_code)] // each test binary uses its part

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use cudarc::cupti::sys::{CUpti_driver_api_trace_cbid as D, CUpti_runtime_api_trace_cbid as R};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/cuda")
}

fn run(cmd: &mut Command) {
    let status = cmd.status().expect("compiler runs");
    assert!(status.success(), "{cmd:?} failed");
}

/// Compiler flags of the stubs: the tool hooks, and CUPTI's callback ids from cudarc.
fn stub_flags() -> Vec<String> {
    vec![
        "-DSTUB_WITH_TOOL".into(),
        format!("-I{}", fixtures().parent().unwrap().display()),
        format!(
            "-DCBID_CU_LAUNCH_KERNEL={}",
            D::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel as u32
        ),
        format!(
            "-DCBID_CUDA_LAUNCH_KERNEL={}",
            R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernel_v7000 as u32
        ),
        format!(
            "-DCBID_CUDA_GRAPH_LAUNCH={}",
            R::CUPTI_RUNTIME_TRACE_CBID_cudaGraphLaunch_v10000 as u32
        ),
    ]
}

/// Builds the stub libraries into `dir`.
pub fn build_stubs(dir: &Path) {
    let f = fixtures();
    run(Command::new("cc")
        .args(["-shared", "-fPIC", "-O1"])
        .args(stub_flags())
        .arg("-o")
        .arg(dir.join("libcuda.so.1"))
        .arg(f.join("stub_driver.c"))
        .arg("-ldl"));
    run(Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wl,-soname,libcudart.so.12"])
        .args(stub_flags())
        .arg("-o")
        .arg(dir.join("libcudart.so.12"))
        .arg(f.join("stub_runtime.c")));
}

/// Builds a C++ app from `fixtures/cuda/<src>` against the stubs in `dir`.
pub fn build_app(dir: &Path, src: &str, name: &str) -> PathBuf {
    let app = dir.join(name);
    run(Command::new("c++")
        .args(["-O1", "-g", "-o"])
        .arg(&app)
        .arg(fixtures().join(src))
        .arg(format!("-L{}", dir.display()))
        .args(["-l:libcudart.so.12", "-ldl", "-lpthread"])
        .arg(format!("-Wl,-rpath,{}", dir.display())));
    app
}

/// Builds the stubs and the probe tests' app into a fresh directory.
pub fn build(dir: &Path) -> PathBuf {
    build_stubs(dir);
    build_app(dir, "app.cpp", "app")
}
