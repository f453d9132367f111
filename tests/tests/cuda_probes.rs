//! CUDA uprobes against stand-in libraries: the test builds a stub `libcuda.so.1` and
//! `libcudart.so.12` exporting the real symbol names, and an app that calls them with known
//! counts, byte sizes and sleeps. The probes attach for real; counts and bytes must be exact,
//! sync durations within scheduling noise, the late `dlopen` of the driver must be picked up, and
//! the runtime launch's host stub must resolve to the kernel's name. Needs root.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use infertap::{
    probes::{cuda::CallStats, ProbeConfig, Probes},
    symbolize::Symbolizer,
};
use infertap_common::cuda::{Class, CopyKind};

#[path = "support/cuda_stub.rs"]
mod cuda_stub;
use cuda_stub::build;

struct App {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl App {
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).unwrap();
        s.trim().to_owned()
    }

    fn go(&mut self) {
        self.stdin.write_all(b"go\n").unwrap();
    }
}

fn stat<'a>(stats: &'a [CallStats], pid: u32, symbol: &str) -> &'a CallStats {
    stats
        .iter()
        .find(|s| s.pid == pid && s.func.symbol == symbol)
        .unwrap_or_else(|| panic!("no stats for {symbol}: {stats:#?}"))
}

#[test]
fn cuda_calls_are_counted_timed_and_named() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the eBPF tests as root"
        );
        eprintln!("SKIPPED: eBPF tests need root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("infertap-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let app_path = build(&dir);
    let mut child = Command::new(&app_path)
        .env("LD_LIBRARY_PATH", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut app = App {
        stdin: child.stdin.take().unwrap(),
        stdout: BufReader::new(child.stdout.take().unwrap()),
        child,
    };
    let pid = app.child.id();
    let stub_addr = u64::from_str_radix(app.line().trim_start_matches("0x"), 16).unwrap();

    let mut probes = Probes::load(&ProbeConfig::default()).expect("load probes");
    probes.add_target(pid).unwrap();
    // Only the runtime is mapped so far.
    let attached = probes.attach_cuda();
    assert!(attached >= 6, "runtime probes attached: {attached}");
    assert_eq!(probes.cuda.attached_libraries.len(), 1);

    app.go();
    assert_eq!(app.line(), "phase1");
    let stats = probes.cuda.call_stats();
    let launch = stat(&stats, pid, "cudaLaunchKernel");
    assert_eq!(launch.stat.calls, 100);
    assert_eq!(launch.func.class, Class::Launch);
    assert_eq!(
        launch.stat.timed_calls, 0,
        "launches are never return-probed"
    );
    let memcpy = stat(&stats, pid, "cudaMemcpy");
    assert_eq!((memcpy.stat.calls, memcpy.stat.bytes), (3, 3 * 4096));
    assert_eq!(
        memcpy.stat.bytes_by_kind[CopyKind::HostToDevice as usize],
        3 * 4096,
        "direction from cudaMemcpyKind"
    );
    assert_eq!(memcpy.stat.timed_calls, 3, "blocking copies are timed");
    let memcpy_async = stat(&stats, pid, "cudaMemcpyAsync");
    assert_eq!(
        (memcpy_async.stat.calls, memcpy_async.stat.bytes),
        (5, 5000)
    );
    assert_eq!(
        memcpy_async.stat.bytes_by_kind[CopyKind::DeviceToHost as usize],
        5000
    );
    let sync = stat(&stats, pid, "cudaStreamSynchronize");
    assert_eq!((sync.stat.calls, sync.stat.timed_calls), (2, 2));
    let mean_ms = sync.stat.duration_ns_sum as f64 / 2.0 / 1e6;
    assert!(
        (5.0..25.0).contains(&mean_ms),
        "5 ms sleeps measured as {mean_ms} ms"
    );
    assert_eq!(sync.stat.duration_hist.iter().sum::<u64>(), 2);
    // 5 ms lies in [2^22, 2^23) ns.
    assert!(
        sync.stat.duration_hist[22] + sync.stat.duration_hist[23] >= 1,
        "{:?}",
        sync.stat.duration_hist
    );

    // Kernel names without CUPTI: the host stub's address resolves to the kernel's name.
    let kernels = probes.cuda.kernel_launches();
    let k = kernels
        .iter()
        .find(|k| k.pid == pid && k.func.symbol == "cudaLaunchKernel")
        .expect("kernel launches");
    assert_eq!((k.handle, k.launches), (stub_addr, 100));
    assert_eq!(
        Symbolizer::default().symbolize(pid, k.handle).as_deref(),
        Some("rmsnorm_kernel(float*, int)")
    );

    // The driver is dlopen'ed late: a rescan picks it up.
    app.go();
    assert_eq!(app.line(), "loaded");
    let attached = probes.attach_cuda();
    assert!(attached >= 10, "driver probes attached: {attached}");
    assert_eq!(probes.attach_cuda(), 0, "rescans do not attach twice");
    app.go();
    assert_eq!(app.line(), "phase2");
    let stats = probes.cuda.call_stats();
    assert_eq!(stat(&stats, pid, "cuLaunchKernel").stat.calls, 50);
    let htod = stat(&stats, pid, "cuMemcpyHtoD_v2");
    assert_eq!((htod.stat.calls, htod.stat.bytes), (4, 8192));
    assert_eq!(
        htod.stat.bytes_by_kind[CopyKind::HostToDevice as usize],
        8192
    );
    let memset = stat(&stats, pid, "cuMemsetD32_v2");
    assert_eq!(
        (memset.stat.calls, memset.stat.bytes),
        (2, 800),
        "memset counts 4-byte elements"
    );
    let ssync = stat(&stats, pid, "cuStreamSynchronize");
    assert_eq!(ssync.stat.timed_calls, 3);
    assert!(
        ssync.stat.duration_ns_sum >= 9_000_000,
        "3 × 3 ms: {}",
        ssync.stat.duration_ns_sum
    );
    let csync = stat(&stats, pid, "cuCtxSynchronize");
    assert_eq!(csync.stat.timed_calls, 1);
    assert!((10_000_000..60_000_000).contains(&csync.stat.duration_ns_max));
    let drv_kernels = probes.cuda.kernel_launches();
    assert!(drv_kernels
        .iter()
        .any(|k| k.pid == pid && k.handle == 0xabc0 && k.launches == 50));

    app.go();
    app.child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
