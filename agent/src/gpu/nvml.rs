//! NVML sampler: per-GPU power, energy, utilisation, memory, clocks, temperature, throttle
//! reasons, PCIe throughput, ECC counts and per-process GPU memory.
//!
//! Two cadences: [`PowerSample`]s (power, energy, utilisation) every `power_period` (≤ 100 ms,
//! so power can be attributed to decode steps), [`DeviceSample`]s for the rest every
//! `device_period`. Every reading is optional: a GPU or driver that does not support one
//! (`NotSupported`, or an older library without the symbol: `FailedToLoadSymbol`) has it skipped
//! and counted in [`SkipCounts`], never failing the sample. Without NVML (no GPU, no driver)
//! [`NvmlSampler::new`] returns a one-line error and the agent runs without GPU metrics.
//!
//! Exported metric names and their DCGM exporter equivalents: [`METRICS`].

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor,
};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::Nvml;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::timeline::{monotonic_now_ns, PowerSample, PowerSource};

/// `NVML_FI_DEV_POWER_INSTANT` (nvml.h): instantaneous board power, mW.
const FI_DEV_POWER_INSTANT: u32 = 186;

/// NVML could not be used at all.
#[derive(Debug, thiserror::Error)]
pub enum NvmlInitError {
    #[error("NVML library not loadable ({0}); no NVIDIA driver here? GPU metrics disabled")]
    NoLibrary(String),
    #[error("NVML failed to initialise: {0}; GPU metrics disabled")]
    Init(NvmlError),
    #[error("NVML sees no GPU; GPU metrics disabled")]
    NoDevices,
}

/// One GPU as NVML names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: u32,
    pub name: Option<String>,
    pub uuid: Option<String>,
}

/// GPU memory used by one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// `None` where the driver does not report it.
    pub used_bytes: Option<u64>,
}

/// One slow-path sample of a GPU. `None` readings are unsupported there.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceSample {
    pub device: u32,
    /// CLOCK_MONOTONIC ns.
    pub ts_ns: u64,
    pub fb_used_bytes: Option<u64>,
    pub fb_free_bytes: Option<u64>,
    pub fb_total_bytes: Option<u64>,
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
    pub temperature_c: Option<u32>,
    /// `nvmlClocksThrottleReasons` bitmask (0: not throttled).
    pub throttle_reasons: Option<u64>,
    /// PCIe throughput over NVML's last 20 ms window, KB/s.
    pub pcie_tx_kbps: Option<u32>,
    pub pcie_rx_kbps: Option<u32>,
    /// Volatile (since driver load) corrected / uncorrected ECC error counts.
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    /// Processes with a compute context on this GPU.
    pub processes: Option<Vec<GpuProcess>>,
}

/// Readings skipped because unsupported, per reading name (cumulative).
#[derive(Debug, Default)]
pub struct SkipCounts {
    counts: Mutex<BTreeMap<&'static str, u64>>,
    /// Readings that failed for other reasons (GPU lost, driver errors).
    pub errors: AtomicU64,
}

impl SkipCounts {
    fn skip(&self, what: &'static str) {
        if let Ok(mut m) = self.counts.lock() {
            *m.entry(what).or_default() += 1;
        }
    }

    /// (reading, times skipped as unsupported).
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.counts
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }
}

/// Loads and queries NVML. Blocking calls (microseconds to a few ms each): run it on its own
/// thread ([`spawn`]).
pub struct NvmlSampler {
    nvml: Nvml,
    gpus: Vec<GpuInfo>,
    /// Per device: whether the instantaneous power field works (learnt on first use).
    instant_power: Vec<std::cell::Cell<Option<bool>>>,
    skips: Arc<SkipCounts>,
}

impl NvmlSampler {
    /// Loads NVML from `lib_path` (default: `libnvidia-ml.so.1` on the loader path).
    pub fn new(lib_path: Option<&Path>) -> Result<NvmlSampler, NvmlInitError> {
        let mut builder = Nvml::builder();
        if let Some(p) = lib_path {
            builder.lib_path(p.as_os_str());
        } else {
            builder.lib_path(OsStr::new("libnvidia-ml.so.1"));
        }
        let nvml = builder.init().map_err(|e| match e {
            NvmlError::LibloadingError(e) => NvmlInitError::NoLibrary(e.to_string()),
            NvmlError::FailedToLoadSymbol(s) => NvmlInitError::NoLibrary(s),
            other => NvmlInitError::Init(other),
        })?;
        let count = nvml.device_count().map_err(NvmlInitError::Init)?;
        if count == 0 {
            return Err(NvmlInitError::NoDevices);
        }
        let gpus = (0..count)
            .map(|index| {
                let dev = nvml.device_by_index(index).ok();
                GpuInfo {
                    index,
                    name: dev.as_ref().and_then(|d| d.name().ok()),
                    uuid: dev.as_ref().and_then(|d| d.uuid().ok()),
                }
            })
            .collect();
        Ok(NvmlSampler {
            nvml,
            gpus,
            instant_power: vec![std::cell::Cell::new(None); count as usize],
            skips: Arc::new(SkipCounts::default()),
        })
    }

    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }

    pub fn skips(&self) -> &Arc<SkipCounts> {
        &self.skips
    }

    /// `Ok(Some)`: the reading. `Ok(None)`: unsupported, skipped and counted.
    fn read<T>(&self, what: &'static str, r: Result<T, NvmlError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => {
                self.skips.skip(what);
                None
            }
            Err(_) => {
                self.skips.errors.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Instantaneous power via field values, `None` if this device lacks it.
    fn instant_power_mw(&self, i: usize, dev: &nvml_wrapper::Device<'_>) -> Option<u32> {
        let known = &self.instant_power[i];
        if known.get() == Some(false) {
            return None;
        }
        let v = dev
            .field_values_for(&[FieldId(FI_DEV_POWER_INSTANT)])
            .ok()
            .and_then(|mut v| v.pop())
            .and_then(|s| s.ok())
            .and_then(|s| s.value.ok())
            .and_then(|v| match v {
                SampleValue::U32(x) => Some(x),
                SampleValue::U64(x) => u32::try_from(x).ok(),
                SampleValue::I64(x) => u32::try_from(x).ok(),
                SampleValue::F64(x) if x >= 0.0 => Some(x as u32),
                SampleValue::F64(_) => None,
            });
        if known.get().is_none() {
            known.set(Some(v.is_some()));
            if v.is_none() {
                self.skips.skip("power_instant");
            }
        }
        v
    }

    /// Power, energy and utilisation of every GPU.
    pub fn sample_power(&mut self) -> Vec<PowerSample> {
        let mut out = Vec::with_capacity(self.gpus.len());
        for i in 0..self.gpus.len() {
            let Some(dev) = self.read("device", self.nvml.device_by_index(i as u32)) else {
                continue;
            };
            let ts_ns = monotonic_now_ns();
            let energy_mj = self.read("energy", dev.total_energy_consumption());
            let util = self.read("utilization", dev.utilization_rates());
            let average = || self.read("power", dev.power_usage());
            let (power_mw, power_source) = match self.instant_power_mw(i, &dev) {
                Some(p) => (Some(p), Some(PowerSource::Instant)),
                None => match average() {
                    Some(p) => (Some(p), Some(PowerSource::Average)),
                    None => (None, None),
                },
            };
            out.push(PowerSample {
                device: i as u32,
                ts_ns,
                power_mw,
                power_source,
                energy_mj,
                gpu_util_pct: util.as_ref().map(|u| u.gpu),
                mem_util_pct: util.as_ref().map(|u| u.memory),
            });
        }
        out
    }

    /// Memory, clocks, temperature, throttling, PCIe, ECC and processes of every GPU.
    pub fn sample_devices(&mut self) -> Vec<DeviceSample> {
        let mut out = Vec::with_capacity(self.gpus.len());
        for i in 0..self.gpus.len() {
            let Some(dev) = self.read("device", self.nvml.device_by_index(i as u32)) else {
                continue;
            };
            let mem = self.read("memory", dev.memory_info());
            let processes = self
                .read("processes", dev.running_compute_processes())
                .map(|ps| {
                    ps.into_iter()
                        .map(|p| GpuProcess {
                            pid: p.pid,
                            used_bytes: match p.used_gpu_memory {
                                UsedGpuMemory::Used(b) => Some(b),
                                UsedGpuMemory::Unavailable => None,
                            },
                        })
                        .collect()
                });
            out.push(DeviceSample {
                device: i as u32,
                ts_ns: monotonic_now_ns(),
                fb_used_bytes: mem.as_ref().map(|m| m.used),
                fb_free_bytes: mem.as_ref().map(|m| m.free),
                fb_total_bytes: mem.as_ref().map(|m| m.total),
                sm_clock_mhz: self.read("sm_clock", dev.clock_info(Clock::SM)),
                mem_clock_mhz: self.read("mem_clock", dev.clock_info(Clock::Memory)),
                temperature_c: self.read("temperature", dev.temperature(TemperatureSensor::Gpu)),
                throttle_reasons: self
                    .read("throttle_reasons", dev.current_throttle_reasons())
                    .map(|r| r.bits()),
                pcie_tx_kbps: self.read("pcie_tx", dev.pcie_throughput(PcieUtilCounter::Send)),
                pcie_rx_kbps: self.read("pcie_rx", dev.pcie_throughput(PcieUtilCounter::Receive)),
                ecc_corrected: self.read(
                    "ecc_corrected",
                    dev.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
                ),
                ecc_uncorrected: self.read(
                    "ecc_uncorrected",
                    dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
                ),
                processes,
            });
        }
        out
    }
}

/// Sampling cadence.
#[derive(Clone, Debug)]
pub struct NvmlConfig {
    pub lib_path: Option<PathBuf>,
    /// Power/energy/utilisation period (clamped to ≤ 100 ms).
    pub power_period: Duration,
    /// Period of everything else.
    pub device_period: Duration,
}

impl Default for NvmlConfig {
    fn default() -> Self {
        NvmlConfig {
            lib_path: None,
            power_period: Duration::from_millis(100),
            device_period: Duration::from_secs(1),
        }
    }
}

/// Latest samples, one per GPU.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NvmlSnapshot {
    pub gpus: Vec<GpuInfo>,
    pub power: Vec<PowerSample>,
    pub devices: Vec<DeviceSample>,
}

/// A running sampler thread. Dropping it stops the thread.
pub struct NvmlHandle {
    latest: Arc<Mutex<NvmlSnapshot>>,
    skips: Arc<SkipCounts>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NvmlHandle {
    pub fn snapshot(&self) -> NvmlSnapshot {
        self.latest.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn skips(&self) -> &SkipCounts {
        &self.skips
    }
}

impl Drop for NvmlHandle {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts sampling on a dedicated thread. Each [`PowerSample`] is also offered to `power_tx`
/// (for correlation with requests); a full channel drops the sample (the snapshot keeps it).
pub fn spawn(
    mut sampler: NvmlSampler,
    config: &NvmlConfig,
    power_tx: Option<tokio::sync::mpsc::Sender<PowerSample>>,
) -> std::io::Result<NvmlHandle> {
    let power_period = config.power_period.min(Duration::from_millis(100));
    let device_period = config.device_period.max(power_period);
    let latest = Arc::new(Mutex::new(NvmlSnapshot {
        gpus: sampler.gpus.clone(),
        ..Default::default()
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let skips = sampler.skips.clone();
    let (latest2, stop2) = (latest.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("infertap-nvml".into())
        .spawn(move || {
            let mut next_power = Instant::now();
            let mut next_device = Instant::now();
            while !stop2.load(Relaxed) {
                let now = Instant::now();
                if now >= next_power {
                    let power = sampler.sample_power();
                    if let Some(tx) = &power_tx {
                        for p in &power {
                            let _ = tx.try_send(*p);
                        }
                    }
                    if let Ok(mut l) = latest2.lock() {
                        l.power = power;
                    }
                    next_power += power_period;
                    if next_power < now {
                        next_power = now + power_period; // fell behind: skip, don't burst
                    }
                }
                if now >= next_device {
                    let devices = sampler.sample_devices();
                    if let Ok(mut l) = latest2.lock() {
                        l.devices = devices;
                    }
                    next_device = now + device_period;
                }
                let wake = next_power.min(next_device);
                std::thread::sleep(
                    wake.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50)),
                );
            }
        })?;
    Ok(NvmlHandle {
        latest,
        skips,
        stop,
        thread: Some(thread),
    })
}

/// One exported metric and the DCGM exporter field it corresponds to (same quantity; units are
/// converted to base units: watts, joules, bytes, hertz).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricDef {
    pub name: &'static str,
    pub help: &'static str,
    /// DCGM field, "" where DCGM has none.
    pub dcgm: &'static str,
}

/// The NVML metrics, with their DCGM exporter equivalents.
pub const METRICS: &[MetricDef] = &[
    MetricDef {
        name: "infertap_gpu_power_watts",
        help: "Board power draw (instantaneous where supported, else NVML's ~1 s average)",
        dcgm: "DCGM_FI_DEV_POWER_USAGE",
    },
    MetricDef {
        name: "infertap_gpu_energy_joules",
        help: "Energy consumed since the driver loaded",
        dcgm: "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    },
    MetricDef {
        name: "infertap_gpu_utilization_percent",
        help: "Percent of time a kernel was running",
        dcgm: "DCGM_FI_DEV_GPU_UTIL",
    },
    MetricDef {
        name: "infertap_gpu_memory_copy_utilization_percent",
        help: "Percent of time device memory was read or written",
        dcgm: "DCGM_FI_DEV_MEM_COPY_UTIL",
    },
    MetricDef {
        name: "infertap_gpu_fb_used_bytes",
        help: "Framebuffer memory used",
        dcgm: "DCGM_FI_DEV_FB_USED",
    },
    MetricDef {
        name: "infertap_gpu_fb_free_bytes",
        help: "Framebuffer memory free",
        dcgm: "DCGM_FI_DEV_FB_FREE",
    },
    MetricDef {
        name: "infertap_gpu_fb_total_bytes",
        help: "Framebuffer memory total",
        dcgm: "DCGM_FI_DEV_FB_TOTAL",
    },
    MetricDef {
        name: "infertap_gpu_sm_clock_hertz",
        help: "SM clock",
        dcgm: "DCGM_FI_DEV_SM_CLOCK",
    },
    MetricDef {
        name: "infertap_gpu_memory_clock_hertz",
        help: "Memory clock",
        dcgm: "DCGM_FI_DEV_MEM_CLOCK",
    },
    MetricDef {
        name: "infertap_gpu_temperature_celsius",
        help: "GPU temperature",
        dcgm: "DCGM_FI_DEV_GPU_TEMP",
    },
    MetricDef {
        name: "infertap_gpu_clock_throttle_reasons",
        help: "Clock throttle reasons bitmask (nvmlClocksThrottleReasons)",
        dcgm: "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
    },
    MetricDef {
        name: "infertap_gpu_pcie_tx_bytes_per_second",
        help: "PCIe transmit throughput",
        dcgm: "DCGM_FI_PROF_PCIE_TX_BYTES",
    },
    MetricDef {
        name: "infertap_gpu_pcie_rx_bytes_per_second",
        help: "PCIe receive throughput",
        dcgm: "DCGM_FI_PROF_PCIE_RX_BYTES",
    },
    MetricDef {
        name: "infertap_gpu_ecc_corrected_errors",
        help: "Corrected (single-bit) ECC errors since driver load",
        dcgm: "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
    },
    MetricDef {
        name: "infertap_gpu_ecc_uncorrected_errors",
        help: "Uncorrected (double-bit) ECC errors since driver load",
        dcgm: "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    },
    MetricDef {
        name: "infertap_gpu_process_memory_bytes",
        help: "GPU memory used by a process",
        dcgm: "",
    },
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabel {
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcLabel {
    gpu: String,
    pid: String,
}

type G = Family<GpuLabel, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// Prometheus gauges for [`NvmlSnapshot`]s, registered under the names of [`METRICS`].
pub struct NvmlMetrics {
    per_gpu: Vec<G>,
    process_memory: Family<ProcLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl NvmlMetrics {
    /// Registers the gauges (names without the registry prefix: pass an unprefixed registry).
    pub fn register(registry: &mut Registry) -> NvmlMetrics {
        let n = METRICS.len() - 1;
        let per_gpu: Vec<G> = (0..n).map(|_| G::default()).collect();
        for (def, fam) in METRICS.iter().zip(&per_gpu) {
            registry.register(def.name, def.help, fam.clone());
        }
        let process_memory = Family::default();
        let def = &METRICS[n];
        registry.register(def.name, def.help, process_memory.clone());
        NvmlMetrics {
            per_gpu,
            process_memory,
        }
    }

    /// Sets the gauges to the snapshot's values; readings a GPU does not support are not
    /// exported (rather than exported as 0), and processes that left are removed.
    pub fn update(&self, snap: &NvmlSnapshot) {
        for fam in &self.per_gpu {
            fam.clear();
        }
        self.process_memory.clear();
        let set = |idx: usize, gpu: u32, v: Option<f64>| {
            if let Some(v) = v {
                self.per_gpu[idx]
                    .get_or_create(&GpuLabel {
                        gpu: gpu.to_string(),
                    })
                    .set(v);
            }
        };
        for p in &snap.power {
            set(0, p.device, p.power_mw.map(|mw| mw as f64 / 1e3));
            set(1, p.device, p.energy_mj.map(|mj| mj as f64 / 1e3));
            set(2, p.device, p.gpu_util_pct.map(f64::from));
            set(3, p.device, p.mem_util_pct.map(f64::from));
        }
        for d in &snap.devices {
            let g = d.device;
            set(4, g, d.fb_used_bytes.map(|v| v as f64));
            set(5, g, d.fb_free_bytes.map(|v| v as f64));
            set(6, g, d.fb_total_bytes.map(|v| v as f64));
            set(7, g, d.sm_clock_mhz.map(|v| v as f64 * 1e6));
            set(8, g, d.mem_clock_mhz.map(|v| v as f64 * 1e6));
            set(9, g, d.temperature_c.map(f64::from));
            set(10, g, d.throttle_reasons.map(|v| v as f64));
            set(11, g, d.pcie_tx_kbps.map(|v| v as f64 * 1e3));
            set(12, g, d.pcie_rx_kbps.map(|v| v as f64 * 1e3));
            set(13, g, d.ecc_corrected.map(|v| v as f64));
            set(14, g, d.ecc_uncorrected.map(|v| v as f64));
            for p in d.processes.iter().flatten() {
                if let Some(b) = p.used_bytes {
                    self.process_memory
                        .get_or_create(&ProcLabel {
                            gpu: g.to_string(),
                            pid: p.pid.to_string(),
                        })
                        .set(b as f64);
                }
            }
        }
    }
}

/// Renders a snapshot as Prometheus/OpenMetrics text.
pub fn render_prometheus(snap: &NvmlSnapshot) -> String {
    let mut registry = Registry::default();
    let metrics = NvmlMetrics::register(&mut registry);
    metrics.update(snap);
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_table_is_consistent() {
        let mut names: Vec<_> = METRICS.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METRICS.len());
        assert!(METRICS.iter().all(|m| m.name.starts_with("infertap_gpu_")));
        assert_eq!(METRICS[0].dcgm, "DCGM_FI_DEV_POWER_USAGE");
        assert_eq!(
            METRICS.last().unwrap().name,
            "infertap_gpu_process_memory_bytes"
        );
    }

    #[test]
    fn render_skips_unsupported_and_converts_units() {
        let snap = NvmlSnapshot {
            gpus: vec![],
            power: vec![PowerSample {
                device: 3,
                ts_ns: 1,
                power_mw: Some(251_500),
                power_source: Some(PowerSource::Instant),
                energy_mj: None,
                gpu_util_pct: Some(97),
                mem_util_pct: None,
            }],
            devices: vec![],
        };
        let text = render_prometheus(&snap);
        assert!(
            text.contains("infertap_gpu_power_watts{gpu=\"3\"} 251.5"),
            "{text}"
        );
        assert!(
            text.contains("infertap_gpu_utilization_percent{gpu=\"3\"} 97.0"),
            "{text}"
        );
        assert!(!text.contains("infertap_gpu_energy_joules{"), "{text}");
    }
}
