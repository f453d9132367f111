//! NVML sampler against a fake `libnvidia-ml.so.1` (tests/fixtures/fake_nvml.c, compiled here with
//! `cc`): scripted readings must come out exactly; unsupported readings are skipped and counted;
//! a missing library is a clear error, not a panic.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use infertap::gpu::nvml::{
    render_prometheus, spawn, GpuProcess, NvmlConfig, NvmlInitError, NvmlSampler,
};
use infertap::gpu::timeline::PowerSource;

/// Compiles `src` into `<tmp>/<tag>/libnvidia-ml.so.1`. Each test gets its own copy: the fake
/// keeps per-process call counters, and one path would be one shared library.
fn build_lib(tag: &str, src: &Path, extra: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("infertap-nvml-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("libnvidia-ml.so.1");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(src)
        .args(extra)
        .status()
        .expect("cc runs");
    assert!(status.success(), "compiling {src:?} failed");
    out
}

fn fake_nvml(tag: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fake_nvml.c");
    build_lib(tag, &src, &[])
}

#[test]
fn sampler_reports_scripted_readings_exactly() {
    let lib = fake_nvml("exact");
    let mut s = NvmlSampler::new(Some(&lib)).expect("fake NVML loads");
    assert_eq!(s.gpus().len(), 2);
    assert_eq!(s.gpus()[0].name.as_deref(), Some("Fake GPU"));
    assert_eq!(
        s.gpus()[1].uuid.as_deref(),
        Some("GPU-11111111-1111-1111-1111-111111111111")
    );

    let first = s.sample_power();
    let second = s.sample_power();
    assert_eq!(first.len(), 2);
    // GPU 0 has the instantaneous field; GPU 1 falls back to the averaged reading.
    assert_eq!(first[0].power_mw, Some(160_000));
    assert_eq!(first[0].power_source, Some(PowerSource::Instant));
    assert_eq!(second[0].power_mw, Some(160_010));
    assert_eq!(first[1].power_mw, Some(151_000));
    assert_eq!(first[1].power_source, Some(PowerSource::Average));
    assert_eq!(second[1].power_mw, Some(151_010));
    assert_eq!(
        [
            first[0].energy_mj,
            second[0].energy_mj,
            first[1].energy_mj,
            second[1].energy_mj
        ],
        [
            Some(1_000_000),
            Some(1_000_500),
            Some(1_001_000),
            Some(1_001_500)
        ]
    );
    assert_eq!(
        (first[0].gpu_util_pct, first[0].mem_util_pct),
        (Some(40), Some(20))
    );
    assert_eq!(
        (second[1].gpu_util_pct, second[1].mem_util_pct),
        (Some(42), Some(22))
    );
    assert!(first[0].ts_ns > 0 && second[0].ts_ns >= first[0].ts_ns);

    let devs = s.sample_devices();
    let gib = 1u64 << 30;
    let d0 = &devs[0];
    assert_eq!(d0.fb_total_bytes, Some(80 * gib));
    assert_eq!(d0.fb_used_bytes, Some(gib));
    assert_eq!(d0.fb_free_bytes, Some(79 * gib));
    assert_eq!(
        (d0.sm_clock_mhz, d0.mem_clock_mhz),
        (Some(1410), Some(1593))
    );
    assert_eq!(d0.temperature_c, Some(60));
    assert_eq!(d0.throttle_reasons, Some(0x4));
    assert_eq!((d0.pcie_tx_kbps, d0.pcie_rx_kbps), (Some(1000), Some(2000)));
    assert_eq!((d0.ecc_corrected, d0.ecc_uncorrected), (None, None));
    assert_eq!(
        d0.processes,
        Some(vec![GpuProcess {
            pid: 4242,
            used_bytes: Some(3 * gib)
        }])
    );
    let d1 = &devs[1];
    assert_eq!(d1.fb_used_bytes, Some(2 * gib));
    assert_eq!(d1.temperature_c, Some(61));
    assert_eq!(d1.processes, Some(vec![]));

    // Unsupported readings: skipped and counted, per reading.
    let skips: std::collections::HashMap<_, _> = s.skips().snapshot().into_iter().collect();
    assert_eq!(skips.get("ecc_corrected"), Some(&2));
    assert_eq!(skips.get("ecc_uncorrected"), Some(&2));
    assert_eq!(
        skips.get("power_instant"),
        Some(&1),
        "learnt once for GPU 1"
    );
    assert_eq!(
        s.skips().errors.load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    let text = render_prometheus(&infertap::gpu::nvml::NvmlSnapshot {
        gpus: s.gpus().to_vec(),
        power: second,
        devices: devs,
    });
    let g0 = r#"gpu="0",gpu_uuid="GPU-00000000-0000-0000-0000-000000000000",gpu_model="Fake GPU""#;
    let g1 = r#"gpu="1",gpu_uuid="GPU-11111111-1111-1111-1111-111111111111",gpu_model="Fake GPU""#;
    for line in [
        format!("infertap_gpu_power_watts{{{g0}}} 160.01"),
        format!("infertap_gpu_power_watts{{{g1}}} 151.01"),
        // A counter from the first reading on (the device's own total is not re-exported).
        format!("infertap_gpu_energy_joules_total{{{g1}}} 0"),
        format!("infertap_gpu_fb_used_bytes{{{g1}}} 2147483648.0"),
        format!("infertap_gpu_sm_clock_hertz{{{g0}}} 1410000000.0"),
        format!("infertap_gpu_pcie_rx_bytes_per_second{{{g1}}} 2001000.0"),
        format!("infertap_gpu_clock_throttle_reasons{{{g0}}} 4.0"),
        format!("infertap_gpu_throttled{{{g0},reason=\"sw_power_cap\"}} 1.0"),
        format!("infertap_gpu_throttled{{{g0},reason=\"hw_slowdown\"}} 0.0"),
        format!("infertap_gpu_process_memory_bytes{{{g0},pid=\"4242\"}} 3221225472.0"),
    ] {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    assert!(
        !text.contains("infertap_gpu_ecc_corrected_errors_total{"),
        "unsupported must not export 0"
    );
}

#[test]
fn missing_library_is_a_clear_error() {
    let err = match NvmlSampler::new(Some(Path::new("/nonexistent/libnvidia-ml.so.1"))) {
        Err(e) => e,
        Ok(_) => panic!("loaded a library that does not exist"),
    };
    assert!(matches!(err, NvmlInitError::NoLibrary(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("GPU metrics disabled") && !msg.contains('\n'),
        "{msg}"
    );
}

#[test]
fn library_without_readings_degrades_to_skips() {
    // Only init, count and handles: every reading's symbol is missing (FailedToLoadSymbol).
    let dir = std::env::temp_dir().join(format!("infertap-nvml-{}-min", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("min.c");
    std::fs::write(
        &src,
        "int nvmlInit_v2(void){return 0;}\nint nvmlShutdown(void){return 0;}\n\
         int nvmlDeviceGetCount_v2(unsigned*c){*c=1;return 0;}\n\
         int nvmlDeviceGetHandleByIndex_v2(unsigned i, void**d){*d=(void*)1;return i?2:0;}\n",
    )
    .unwrap();
    let lib = build_lib("min", &src, &[]);
    let mut s = NvmlSampler::new(Some(&lib)).expect("minimal NVML loads");
    let p = s.sample_power();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].power_mw, p[0].energy_mj, p[0].gpu_util_pct),
        (None, None, None)
    );
    let d = s.sample_devices();
    assert_eq!(
        (
            d[0].fb_used_bytes,
            d[0].temperature_c,
            d[0].processes.clone()
        ),
        (None, None, None)
    );
    let skips: std::collections::HashMap<_, _> = s.skips().snapshot().into_iter().collect();
    for what in [
        "power",
        "energy",
        "utilization",
        "memory",
        "temperature",
        "processes",
    ] {
        assert_eq!(skips.get(what), Some(&1), "{what} in {skips:?}");
    }
}

#[test]
fn spawned_sampler_publishes_snapshots_and_power_samples() {
    let lib = fake_nvml("spawn");
    let sampler = NvmlSampler::new(Some(&lib)).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let cfg = NvmlConfig {
        lib_path: Some(lib),
        power_period: Duration::from_millis(10),
        device_period: Duration::from_millis(50),
    };
    let handle = spawn(sampler, &cfg, Some(tx)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < 6 && Instant::now() < deadline {
        match rx.try_recv() {
            Ok(p) => got.push(p),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    assert!(got.len() >= 6, "got {} power samples", got.len());
    // Per GPU, successive samples advance (the fake's counters) and time moves forward.
    let gpu0: Vec<_> = got.iter().filter(|p| p.device == 0).collect();
    assert!(gpu0
        .windows(2)
        .all(|w| w[1].power_mw > w[0].power_mw && w[1].ts_ns > w[0].ts_ns));
    let snap = handle.snapshot();
    assert_eq!(snap.gpus.len(), 2);
    assert_eq!(snap.power.len(), 2);
    while handle.snapshot().devices.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(handle.snapshot().devices.len(), 2);
    drop(handle); // joins the thread
}
