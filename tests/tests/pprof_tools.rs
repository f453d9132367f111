//! `go tool pprof` (the reference reader) reads what `infertap_proto::pprof` writes: function
//! names, file paths of Python frames, inlined native frames, totals per sample type, and the
//! merge of several profiles.

use infertap_proto::pprof::{
    self, LabelFilter, Line, Mapping, ProfileBuilder, ProfileKind, SampleLabel,
};
use infertap_tests::prereq;
use infertap_tests::tools::{artifacts_dir, go_pprof, missing_go};

const PY: &str = "/opt/venv/lib/python3.12/site-packages/vllm/v1/engine/core.py";
const PY_WORKER: &str = "/opt/venv/lib/python3.12/site-packages/vllm/v1/worker/gpu_model_runner.py";
const PERIOD_NS: i64 = 10_000_000; // 100 Hz

/// A vLLM-like CPU profile: `EngineCore.run_busy_loop → EngineCore.step →
/// GPUModelRunner.execute_model → _PyEval_EvalFrameDefault(+inlined) → cudaLaunchKernel`, and a
/// second stack ending in `EngineCore.step` itself. `scale` multiplies the sample counts.
fn vllm_profile(scale: i64, start_ns: u64) -> ProfileBuilder {
    let mut b = ProfileBuilder::new(ProfileKind::Cpu);
    b.set_time(start_ns, start_ns + 10_000_000_000);
    b.set_period("cpu", "nanoseconds", PERIOD_NS);
    let libpython = b.mapping(&Mapping {
        memory_start: 0x7f10_0000_0000,
        memory_limit: 0x7f10_0050_0000,
        file_offset: 0,
        filename: "/usr/lib/x86_64-linux-gnu/libpython3.12.so.1.0",
        build_id: "4f2b1c0d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c",
        has_functions: true,
        has_filenames: true,
        has_line_numbers: true,
        has_inline_frames: true,
    });
    let libcudart = b.mapping(&Mapping {
        memory_start: 0x7f20_0000_0000,
        memory_limit: 0x7f20_0010_0000,
        filename: "/usr/local/cuda/lib64/libcudart.so.12",
        build_id: "00112233445566778899aabbccddeeff00112233",
        has_functions: true,
        ..Default::default()
    });
    let busy = b.python_frame("EngineCore.run_busy_loop", PY, 640, 651);
    let step = b.python_frame("EngineCore.step", PY, 220, 231);
    let exec = b.python_frame("GPUModelRunner.execute_model", PY_WORKER, 1180, 1242);
    let eval = b.native_frame(
        Some(libpython),
        0x7f10_0012_3456,
        &[
            Line {
                name: "_PyFrame_GetCode",
                filename: "Include/internal/pycore_frame.h",
                line: 75,
                ..Default::default()
            },
            Line {
                name: "_PyEval_EvalFrameDefault",
                system_name: "_PyEval_EvalFrameDefault",
                filename: "Python/ceval.c",
                start_line: 577,
                line: 1003,
            },
        ],
    );
    let launch = b.native_frame(
        Some(libcudart),
        0x7f20_0000_4242,
        &[Line {
            name: "cudaLaunchKernel",
            ..Default::default()
        }],
    );
    let main = [SampleLabel::str("thread", "MainThread")];
    b.add_sample(
        &[launch, eval, exec, step, busy],
        &[30 * scale, 30 * scale * PERIOD_NS],
        &main,
    )
    .unwrap();
    b.add_sample(&[step, busy], &[10 * scale, 10 * scale * PERIOD_NS], &main)
        .unwrap();
    b
}

#[test]
fn go_tool_pprof_reads_built_and_merged_profiles() {
    if !prereq::check(
        "go_tool_pprof_reads_built_and_merged_profiles",
        missing_go(),
    ) {
        return;
    }
    let dir = artifacts_dir("pprof_tools").unwrap();
    let (gz, count) = vllm_profile(1, 1_764_583_200_000_000_000).encode_gzip();
    assert_eq!(count, 40);
    let file = dir.join("vllm-cpu.pb.gz");
    std::fs::write(&file, &gz).unwrap();

    // Flat and cumulative by function, in CPU time.
    let top = go_pprof(&["-top", "-sample_index=cpu", "-nodecount=50"], &file).unwrap();
    println!("{top}");
    assert!(top.contains("Type: cpu"), "{top}");
    assert!(
        top.contains("Showing nodes accounting for 400ms, 100% of 400ms total"),
        "40 samples x 10 ms\n{top}"
    );
    let row = |name: &str| {
        top.lines()
            .find(|l| l.trim_end().ends_with(name))
            .unwrap_or_else(|| panic!("{name} missing\n{top}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // flat flat% sum% cum cum% name
    assert_eq!(row("cudaLaunchKernel")[0], "300ms");
    assert_eq!(row("EngineCore.step")[0], "100ms");
    assert_eq!(row("EngineCore.step")[3], "400ms");
    assert_eq!(row("EngineCore.run_busy_loop")[3], "400ms");
    // The inlined frame is its own function in pprof's view, marked inline, under its caller.
    assert_eq!(row("_PyFrame_GetCode (inline)")[3], "300ms");
    assert_eq!(row("_PyEval_EvalFrameDefault")[3], "300ms");
    assert_eq!(row("GPUModelRunner.execute_model")[3], "300ms");

    // Samples, by function and source file: Python frames show their vllm/ paths.
    let files = go_pprof(&["-top", "-sample_index=samples", "-filefunctions"], &file).unwrap();
    println!("{files}");
    assert!(files.contains("of 40 total"), "{files}");
    assert!(
        files
            .lines()
            .any(|l| l.contains("EngineCore.step") && l.contains("vllm/v1/engine/core.py")),
        "{files}"
    );
    assert!(
        files
            .lines()
            .any(|l| l.contains("GPUModelRunner.execute_model")
                && l.contains("vllm/v1/worker/gpu_model_runner.py")),
        "{files}"
    );
    // Line granularity: the executing line of the Python frame.
    let lines = go_pprof(&["-top", "-lines", "-sample_index=samples"], &file).unwrap();
    assert!(lines.contains("core.py:231"), "{lines}");
    assert!(lines.contains("ceval.c:1003"), "{lines}");
    assert!(lines.contains("pycore_frame.h:75"), "{lines}");
    // Mappings with build ids survive (`-raw` prints them).
    let raw = go_pprof(&["-raw"], &file).unwrap();
    assert!(
        raw.contains("libpython3.12.so.1.0")
            && raw.contains("4f2b1c0d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c"),
        "{raw}"
    );
    assert!(raw.contains("thread:[MainThread]"), "labels: {raw}");

    // Three intervals merged: totals add, pprof reads the result.
    let parts: Vec<_> = (1..=3)
        .map(|i| vllm_profile(i, 1_764_583_200_000_000_000 + i as u64 * 10_000_000_000).build())
        .collect();
    let merged = pprof::merge(&parts, &LabelFilter::default())
        .unwrap()
        .unwrap();
    let mfile = dir.join("vllm-cpu-merged.pb.gz");
    std::fs::write(&mfile, pprof::encode_gzip(&merged)).unwrap();
    let top = go_pprof(&["-top", "-sample_index=samples"], &mfile).unwrap();
    println!("{top}");
    assert!(top.contains("of 240 total"), "(1+2+3) x 40 samples\n{top}");
    assert_eq!(merged.sample.len(), 2, "identical stacks merged");
    assert_eq!(merged.duration_nanos, 30_000_000_000);
}
