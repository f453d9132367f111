//! CUDA launch-path uprobes: finding libcuda/libcudart in the traced processes' memory maps
//! (system installs and the copies inside Python wheels alike), attaching the generic entry and
//! return programs to every known symbol with its cookie, and reading the in-kernel aggregates.
//!
//! No restart of the server is needed: libraries are discovered from /proc/<pid>/maps, and a
//! library loaded later (dlopen) is picked up by the next rescan.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, MapData, PerCpuHashMap},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
        UProbe,
    },
    Ebpf,
};
use infertap_common::cuda::{control, Api, Cookie, KernelKey, Stat, StatKey, FUNCS};
use tracing::{debug, info};

/// Kind of CUDA library, from its file name.
pub fn library_api(path: &Path) -> Option<Api> {
    let name = path.file_name()?.to_str()?;
    if name.starts_with("libcuda.so") {
        Some(Api::Driver)
    } else if name.starts_with("libcudart.so") {
        Some(Api::Runtime)
    } else {
        None
    }
}

/// CUDA libraries mapped by a process, as paths reachable from the agent's mount namespace
/// (`/proc/<pid>/root/...`, which also works for containers).
pub fn mapped_cuda_libraries(pid: u32) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for m in crate::targets::file_mappings(pid) {
        if library_api(&m.path).is_some() {
            let p = PathBuf::from(format!("/proc/{pid}/root{}", m.path.display()));
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// `endbr64`, the CET landing pad that begins functions in CET-enabled builds.
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Where to place each exported function's probe: 4 bytes in when the function starts with
/// `endbr64`. The kernel cannot emulate that instruction and single-steps it out of line, which
/// costs tens of µs per hit in a VM; the next instruction is reached with registers and stack
/// untouched, so argument reads are the same.
fn entry_offsets(elf: &[u8]) -> StdHashMap<String, u64> {
    use object::{Object, ObjectSection, ObjectSymbol};
    let mut out = StdHashMap::new();
    let Ok(file) = object::File::parse(elf) else {
        return out;
    };
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        let (Ok(name), Some(idx)) = (sym.name(), sym.section_index()) else {
            continue;
        };
        let Ok(section) = file.section_by_index(idx) else {
            continue;
        };
        let Ok(bytes) = section.data() else { continue };
        let start = sym.address().wrapping_sub(section.address()) as usize;
        if bytes.get(start..start + 4) == Some(&ENDBR64[..]) {
            out.insert(name.to_owned(), 4);
        }
    }
    out
}

/// In-kernel aggregate of one (process, thread, function), summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallStats {
    pub pid: u32,
    pub tid: u32,
    pub func: &'static infertap_common::cuda::Func,
    pub stat: Stat,
}

/// Launch count of one kernel (handle or host-stub address) in one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelLaunches {
    pub pid: u32,
    pub func: &'static infertap_common::cuda::Func,
    pub handle: u64,
    pub launches: u64,
}

pub struct CudaProbes {
    control: Array<MapData, u32>,
    stats: PerCpuHashMap<MapData, StatKey, Stat>,
    kernels: PerCpuHashMap<MapData, KernelKey, u64>,
    /// Libraries already probed, by (device, inode): the same file seen through different
    /// paths (/proc/<pid>/root of several processes) is probed once.
    attached: HashSet<(u64, u64)>,
    pub attached_libraries: Vec<(PathBuf, usize)>,
    loaded: bool,
}

impl CudaProbes {
    pub(super) fn new(ebpf: &mut Ebpf) -> Result<Self> {
        let control = Array::try_from(ebpf.take_map("CUDA_CONTROL").context("CUDA_CONTROL map")?)?;
        let stats =
            PerCpuHashMap::try_from(ebpf.take_map("CUDA_STATS").context("CUDA_STATS map")?)?;
        let kernels =
            PerCpuHashMap::try_from(ebpf.take_map("CUDA_KERNELS").context("CUDA_KERNELS map")?)?;
        Ok(Self {
            control,
            stats,
            kernels,
            attached: HashSet::new(),
            attached_libraries: Vec::new(),
            loaded: false,
        })
    }

    /// Per-event mode (a trace window) or aggregate-only mode.
    pub fn set_per_event(&mut self, on: bool) -> Result<()> {
        let v = if on {
            control::MODE_EVENTS
        } else {
            control::MODE_AGGREGATE
        };
        self.control
            .set(control::MODE, v, 0)
            .context("setting CUDA probe mode")
    }

    /// Probe every process that maps the libraries, not only the traced set.
    pub fn set_all_processes(&mut self, on: bool) -> Result<()> {
        self.control
            .set(control::ALL_PROCESSES, on as u32, 0)
            .context("setting CUDA probe scope")
    }

    /// Attaches to every known symbol the library exports. Returns how many probes were
    /// attached (0 when it was already probed).
    pub fn attach_library(&mut self, ebpf: &mut Ebpf, path: &Path) -> Result<usize> {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        if !self.attached.insert((meta.dev(), meta.ino())) {
            return Ok(0);
        }
        let api = library_api(path)
            .with_context(|| format!("{} is not a CUDA library", path.display()))?;
        if !self.loaded {
            for name in ["cuda_enter", "cuda_exit"] {
                let p: &mut UProbe = ebpf
                    .program_mut(name)
                    .context("CUDA program missing")?
                    .try_into()?;
                p.load()
                    .with_context(|| format!("verifier rejected {name}"))?;
            }
            self.loaded = true;
        }
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let entries = entry_offsets(&data);
        let mut attached = 0;
        for f in FUNCS.iter().filter(|f| f.api == api) {
            let cookie = Cookie::of(f).0;
            let skip = entries.get(f.symbol).copied().unwrap_or(0);
            let point = || UProbeAttachPoint {
                location: UProbeAttachLocation::SymbolOffset(f.symbol, skip),
                cookie: Some(cookie),
            };
            let enter: &mut UProbe = ebpf
                .program_mut("cuda_enter")
                .context("cuda_enter")?
                .try_into()?;
            match enter.attach(point(), path, UProbeScope::AllProcesses) {
                Ok(_) => attached += 1,
                Err(e) => {
                    // Not every driver version exports every symbol (e.g. cuLaunchKernelEx).
                    debug!("{}: {} not probed: {e}", path.display(), f.symbol);
                    continue;
                }
            }
            if f.ret {
                let exit: &mut UProbe = ebpf
                    .program_mut("cuda_exit")
                    .context("cuda_exit")?
                    .try_into()?;
                exit.attach(point(), path, UProbeScope::AllProcesses)
                    .with_context(|| format!("return probe on {}", f.symbol))?;
                attached += 1;
            }
        }
        let skipped = FUNCS
            .iter()
            .filter(|f| f.api == api && entries.contains_key(f.symbol))
            .count();
        info!(
            "CUDA: {attached} probes on {} ({skipped} placed after endbr64)",
            path.display()
        );
        self.attached_libraries.push((path.to_path_buf(), attached));
        Ok(attached)
    }

    /// Aggregates per (process, thread, function), summed over CPUs.
    pub fn call_stats(&self) -> Vec<CallStats> {
        let mut out = Vec::new();
        for item in self.stats.iter().filter_map(|r| r.ok()) {
            let (key, per_cpu) = item;
            let Some(func) = infertap_common::cuda::func(key.func as u16) else {
                continue;
            };
            let mut total = Stat::default();
            for s in per_cpu.iter() {
                total.calls += s.calls;
                total.bytes += s.bytes;
                total.timed_calls += s.timed_calls;
                total.duration_ns_sum += s.duration_ns_sum;
                total.duration_ns_max = total.duration_ns_max.max(s.duration_ns_max);
                for (a, b) in total.duration_hist.iter_mut().zip(s.duration_hist.iter()) {
                    *a += b;
                }
                for (a, b) in total.bytes_by_kind.iter_mut().zip(s.bytes_by_kind.iter()) {
                    *a += b;
                }
            }
            out.push(CallStats {
                pid: key.tgid,
                tid: key.tid,
                func,
                stat: total,
            });
        }
        out.sort_by_key(|c| (c.pid, c.tid, c.func.id));
        out
    }

    /// Launch counts per kernel handle / host stub.
    pub fn kernel_launches(&self) -> Vec<KernelLaunches> {
        let mut merged: StdHashMap<(u32, u16, u64), u64> = StdHashMap::new();
        for (key, per_cpu) in self.kernels.iter().filter_map(|r| r.ok()) {
            *merged
                .entry((key.tgid, key.func as u16, key.handle))
                .or_default() += per_cpu.iter().sum::<u64>();
        }
        let mut out: Vec<KernelLaunches> = merged
            .into_iter()
            .filter_map(|((pid, func, handle), launches)| {
                Some(KernelLaunches {
                    pid,
                    func: infertap_common::cuda::func(func)?,
                    handle,
                    launches,
                })
            })
            .collect();
        out.sort_by(|a, b| b.launches.cmp(&a.launches).then(a.handle.cmp(&b.handle)));
        out
    }

    /// Drops the aggregates of a process that exited.
    pub fn forget_process(&mut self, pid: u32) {
        let keys: Vec<StatKey> = self
            .stats
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.tgid == pid)
            .collect();
        for k in keys {
            let _ = self.stats.remove(&k);
        }
    }
}
