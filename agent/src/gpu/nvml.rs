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
//! Exported metric names (the shared schema's `infertap_gpu_*`) and their DCGM exporter
//! equivalents: [`DCGM_FIELDS`]; [`NvmlExport`] turns snapshots into those series.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use infertap_proto::schema;
use infertap_proto::store::{Labels, MetricStore};
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor,
};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::Nvml;

use crate::external_counter::ExternalCounter;

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

/// Each exported GPU metric with the DCGM exporter field that measures the same quantity (""
/// where DCGM has none). DCGM reports MHz, MiB, mJ and KB/s where infertap uses base units
/// (hertz, bytes, joules, bytes/s); the README's table lists the conversions.
pub const DCGM_FIELDS: &[(&schema::MetricDef, &str)] = &[
    (&schema::GPU_POWER, "DCGM_FI_DEV_POWER_USAGE"),
    (&schema::GPU_ENERGY, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"),
    (&schema::GPU_UTILIZATION, "DCGM_FI_DEV_GPU_UTIL"),
    (
        &schema::GPU_MEMORY_COPY_UTILIZATION,
        "DCGM_FI_DEV_MEM_COPY_UTIL",
    ),
    (&schema::GPU_FB_USED, "DCGM_FI_DEV_FB_USED"),
    (&schema::GPU_FB_FREE, "DCGM_FI_DEV_FB_FREE"),
    (&schema::GPU_FB_TOTAL, "DCGM_FI_DEV_FB_TOTAL"),
    (&schema::GPU_SM_CLOCK, "DCGM_FI_DEV_SM_CLOCK"),
    (&schema::GPU_MEMORY_CLOCK, "DCGM_FI_DEV_MEM_CLOCK"),
    (&schema::GPU_TEMPERATURE, "DCGM_FI_DEV_GPU_TEMP"),
    (
        &schema::GPU_THROTTLE_REASONS,
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
    ),
    (&schema::GPU_THROTTLED, ""),
    (&schema::GPU_PCIE_TX, "DCGM_FI_DEV_PCIE_TX_THROUGHPUT"),
    (&schema::GPU_PCIE_RX, "DCGM_FI_DEV_PCIE_RX_THROUGHPUT"),
    (&schema::GPU_ECC_CORRECTED, "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"),
    (
        &schema::GPU_ECC_UNCORRECTED,
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    ),
    (&schema::GPU_PROCESS_MEMORY, ""),
];

/// Turns [`NvmlSnapshot`]s into the schema's GPU series (`infertap_gpu_*`, see
/// [`DCGM_FIELDS`]) in a [`MetricStore`]: the agent's own endpoint and its interval reports to
/// the collector read the same store. Keeps the energy and ECC readings' running totals (see
/// [`ExternalCounter`]), so it lives as long as the sampler.
#[derive(Debug, Default)]
pub struct NvmlExport {
    /// Per GPU index: energy (J), corrected and uncorrected ECC totals.
    counters: BTreeMap<u32, [ExternalCounter; 3]>,
}

impl NvmlExport {
    /// Replaces the store's GPU gauges with the snapshot's (readings a GPU does not support
    /// are absent, not 0; processes that left disappear) and advances the counters.
    pub fn publish(&mut self, snap: &NvmlSnapshot, store: &mut MetricStore) {
        for (def, _) in DCGM_FIELDS {
            if def.kind == schema::Kind::Gauge {
                store.clear_gauge(def);
            }
        }
        let labels = |gpu: u32| -> Labels {
            let info = snap.gpus.iter().find(|g| g.index == gpu);
            let text =
                |v: Option<&String>| schema::clamp_label_value(v.map_or("", |s| s)).to_owned();
            vec![
                (schema::LABEL_GPU.to_owned(), gpu.to_string()),
                (
                    schema::LABEL_GPU_UUID.to_owned(),
                    text(info.and_then(|g| g.uuid.as_ref())),
                ),
                (
                    schema::LABEL_GPU_MODEL.to_owned(),
                    text(info.and_then(|g| g.name.as_ref())),
                ),
            ]
        };
        let gauge =
            |store: &mut MetricStore, def: &'static schema::MetricDef, gpu: u32, v: Option<f64>| {
                if let Some(v) = v.filter(|v| v.is_finite()) {
                    store.set_gauge(def, labels(gpu), v);
                }
            };
        for p in &snap.power {
            let g = p.device;
            gauge(
                store,
                &schema::GPU_POWER,
                g,
                p.power_mw.map(|mw| mw as f64 / 1e3),
            );
            gauge(
                store,
                &schema::GPU_UTILIZATION,
                g,
                p.gpu_util_pct.map(f64::from),
            );
            gauge(
                store,
                &schema::GPU_MEMORY_COPY_UTILIZATION,
                g,
                p.mem_util_pct.map(f64::from),
            );
        }
        for d in &snap.devices {
            let g = d.device;
            gauge(
                store,
                &schema::GPU_FB_USED,
                g,
                d.fb_used_bytes.map(|v| v as f64),
            );
            gauge(
                store,
                &schema::GPU_FB_FREE,
                g,
                d.fb_free_bytes.map(|v| v as f64),
            );
            gauge(
                store,
                &schema::GPU_FB_TOTAL,
                g,
                d.fb_total_bytes.map(|v| v as f64),
            );
            gauge(
                store,
                &schema::GPU_SM_CLOCK,
                g,
                d.sm_clock_mhz.map(|v| v as f64 * 1e6),
            );
            gauge(
                store,
                &schema::GPU_MEMORY_CLOCK,
                g,
                d.mem_clock_mhz.map(|v| v as f64 * 1e6),
            );
            gauge(
                store,
                &schema::GPU_TEMPERATURE,
                g,
                d.temperature_c.map(f64::from),
            );
            gauge(
                store,
                &schema::GPU_PCIE_TX,
                g,
                d.pcie_tx_kbps.map(|v| v as f64 * 1e3),
            );
            gauge(
                store,
                &schema::GPU_PCIE_RX,
                g,
                d.pcie_rx_kbps.map(|v| v as f64 * 1e3),
            );
            if let Some(mask) = d.throttle_reasons {
                store.set_gauge(&schema::GPU_THROTTLE_REASONS, labels(g), mask as f64);
                for (reason, bit) in schema::GPU_THROTTLE_REASON_BITS {
                    let mut l = labels(g);
                    l.push((schema::LABEL_REASON.to_owned(), (*reason).to_owned()));
                    let on = if mask & bit != 0 { 1.0 } else { 0.0 };
                    store.set_gauge(&schema::GPU_THROTTLED, l, on);
                }
            }
            for p in d.processes.iter().flatten() {
                if let Some(b) = p.used_bytes {
                    let mut l = labels(g);
                    l.push((schema::LABEL_PID.to_owned(), p.pid.to_string()));
                    store.set_gauge(&schema::GPU_PROCESS_MEMORY, l, b as f64);
                }
            }
        }
        // Counters: energy from the fast samples, ECC from the slow ones; a GPU's series
        // appears with its first reading (at 0) and then grows.
        let readings = snap
            .power
            .iter()
            .map(|p| (p.device, 0, p.energy_mj.map(|mj| mj as f64 / 1e3)))
            .chain(snap.devices.iter().flat_map(|d| {
                [
                    (d.device, 1, d.ecc_corrected.map(|v| v as f64)),
                    (d.device, 2, d.ecc_uncorrected.map(|v| v as f64)),
                ]
            }));
        for (gpu, which, reading) in readings {
            let Some(reading) = reading else { continue };
            let c = &mut self.counters.entry(gpu).or_default()[which];
            c.observe(reading);
            let def = [
                &schema::GPU_ENERGY,
                &schema::GPU_ECC_CORRECTED,
                &schema::GPU_ECC_UNCORRECTED,
            ][which];
            // Whole units: the store's counters are integers (joules, error counts).
            store.set_counter(def, labels(gpu), c.total().floor() as u64);
        }
    }
}

/// Renders one snapshot as OpenMetrics text, as the agent's endpoint shows it on a first
/// publish (counters at 0).
pub fn render_prometheus(snap: &NvmlSnapshot) -> String {
    let mut store = MetricStore::new();
    NvmlExport::default().publish(snap, &mut store);
    store.encode_openmetrics().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dcgm_table_covers_every_gpu_metric() {
        let gpu_defs: Vec<_> = schema::ALL
            .iter()
            .filter(|d| d.name.starts_with("infertap_gpu_"))
            .map(|d| d.name)
            .collect();
        let table: Vec<_> = DCGM_FIELDS.iter().map(|(d, _)| d.name).collect();
        assert_eq!(gpu_defs, table);
        assert_eq!(DCGM_FIELDS[0].1, "DCGM_FI_DEV_POWER_USAGE");
    }

    fn snap(energy_mj: Option<u64>, throttle: Option<u64>) -> NvmlSnapshot {
        NvmlSnapshot {
            gpus: vec![GpuInfo {
                index: 3,
                name: Some("Fake GPU".into()),
                uuid: Some("GPU-3".into()),
            }],
            power: vec![PowerSample {
                device: 3,
                ts_ns: 1,
                power_mw: Some(251_500),
                power_source: Some(PowerSource::Instant),
                energy_mj,
                gpu_util_pct: Some(97),
                mem_util_pct: None,
            }],
            devices: vec![DeviceSample {
                device: 3,
                ts_ns: 1,
                fb_used_bytes: Some(1 << 30),
                fb_free_bytes: None,
                fb_total_bytes: None,
                sm_clock_mhz: Some(1410),
                mem_clock_mhz: None,
                temperature_c: Some(60),
                throttle_reasons: throttle,
                pcie_tx_kbps: None,
                pcie_rx_kbps: None,
                ecc_corrected: None,
                ecc_uncorrected: None,
                processes: None,
            }],
        }
    }

    #[test]
    fn publish_converts_units_skips_unsupported_and_counts_energy() {
        let labels: Labels = vec![
            (schema::LABEL_GPU.into(), "3".into()),
            (schema::LABEL_GPU_UUID.into(), "GPU-3".into()),
            (schema::LABEL_GPU_MODEL.into(), "Fake GPU".into()),
        ];
        let mut store = MetricStore::new();
        let mut export = NvmlExport::default();
        export.publish(&snap(Some(5_000_000), Some(0x24)), &mut store);
        assert_eq!(store.gauge(&schema::GPU_POWER, &labels), Some(251.5));
        assert_eq!(store.gauge(&schema::GPU_UTILIZATION, &labels), Some(97.0));
        assert_eq!(
            store.gauge(&schema::GPU_MEMORY_COPY_UTILIZATION, &labels),
            None
        );
        assert_eq!(store.gauge(&schema::GPU_SM_CLOCK, &labels), Some(1.41e9));
        assert_eq!(
            store.gauge(&schema::GPU_THROTTLE_REASONS, &labels),
            Some(36.0)
        );
        let reason = |store: &MetricStore, r: &str| {
            let mut l = labels.clone();
            l.push((schema::LABEL_REASON.into(), r.into()));
            store.gauge(&schema::GPU_THROTTLED, &l)
        };
        assert_eq!(reason(&store, "sw_power_cap"), Some(1.0));
        assert_eq!(reason(&store, "sw_thermal_slowdown"), Some(1.0));
        assert_eq!(reason(&store, "hw_slowdown"), Some(0.0));
        // Energy counts from the first reading: 0, then +2.5 kJ; a driver reload carries on.
        assert_eq!(store.counter(&schema::GPU_ENERGY, &labels), Some(0));
        export.publish(&snap(Some(7_500_000), None), &mut store);
        assert_eq!(store.counter(&schema::GPU_ENERGY, &labels), Some(2500));
        export.publish(&snap(Some(1_000), None), &mut store);
        assert_eq!(store.counter(&schema::GPU_ENERGY, &labels), Some(2501));
        // Throttle reasons went unsupported: their series are gone, not stale.
        assert_eq!(store.gauge(&schema::GPU_THROTTLE_REASONS, &labels), None);
        assert_eq!(reason(&store, "sw_power_cap"), None);
        let text = store.encode_openmetrics().unwrap();
        assert!(
            text.contains(
                "infertap_gpu_power_watts{gpu=\"3\",gpu_uuid=\"GPU-3\",gpu_model=\"Fake GPU\"} 251.5"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE infertap_gpu_energy_joules counter"),
            "{text}"
        );
        assert!(
            text.contains(
                "infertap_gpu_energy_joules_total{gpu=\"3\",gpu_uuid=\"GPU-3\",gpu_model=\"Fake GPU\"} 2501"
            ),
            "{text}"
        );
    }
}
