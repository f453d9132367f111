//! Loading and attaching the eBPF programs (agent-ebpf), and the maps user space drives:
//! the traced process set, the traced connections, the event ring buffer and the drop counters.
//! The CUDA uprobes live in the same object and share the traced process set (`cuda`), and so
//! does the profiler's kernel side (`profile`: perf events, sched_switch, the sample ring).

pub mod arrival;
pub mod btf;
pub mod cuda;
pub mod profile;

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use infertap_common::{counter, ConnInfo, ConnKey, MAX_CAPTURE};
use tracing::{debug, info, warn};

/// The compiled eBPF object, built by build.rs (empty when built with AYA_BUILD_SKIP=1).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/infertap"));

/// Tracepoints: (program, category, tracepoint).
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("exit_read", "syscalls", "sys_exit_read"),
    ("exit_readv", "syscalls", "sys_exit_readv"),
    ("exit_recvfrom", "syscalls", "sys_exit_recvfrom"),
    ("exit_recvmsg", "syscalls", "sys_exit_recvmsg"),
    ("exit_recvmmsg", "syscalls", "sys_exit_recvmmsg"),
    ("exit_write", "syscalls", "sys_exit_write"),
    ("exit_writev", "syscalls", "sys_exit_writev"),
    ("exit_sendto", "syscalls", "sys_exit_sendto"),
    ("exit_sendmsg", "syscalls", "sys_exit_sendmsg"),
    ("exit_sendmmsg", "syscalls", "sys_exit_sendmmsg"),
    ("exit_accept", "syscalls", "sys_exit_accept4"),
    ("exit_accept", "syscalls", "sys_exit_accept"),
    ("enter_close", "syscalls", "sys_enter_close"),
    ("on_fork", "sched", "sched_process_fork"),
    ("on_exit", "sched", "sched_process_exit"),
    ("on_exec", "sched", "sched_process_exec"),
];

const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// Payload bytes copied per syscall.
    pub capture_bytes: u32,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ringbuf_bytes: u32,
    /// Unread bytes above which the kernel wakes the consumer instead of waiting for its poll.
    pub wakeup_bytes: u64,
    /// The profiler's sampling sources and sample ring.
    pub profile: profile::ProfileConfig,
    /// Stamp when request bytes reached the socket (TCP tracepoints), so requests start at
    /// their arrival rather than at the server's read.
    pub arrival: bool,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            capture_bytes: infertap_common::DEFAULT_CAPTURE,
            ringbuf_bytes: 16 << 20,
            wakeup_bytes: 256 << 10,
            profile: profile::ProfileConfig::default(),
            arrival: true,
        }
    }
}

/// Loaded and attached socket probes.
pub struct Probes {
    // Field order matters on drop: maps and links go before the Ebpf object that owns programs.
    events: Option<RingBuf<MapData>>,
    targets: HashMap<MapData, u32, u8>,
    conns: HashMap<MapData, ConnKey, ConnInfo>,
    counters: PerCpuArray<MapData, u64>,
    pub cuda: cuda::CudaProbes,
    /// Arrival tracking, when the kernel supports it (see [`arrival`]).
    pub arrival: Option<arrival::ArrivalProbes>,
    /// The profiler's kernel side; taken by the profiler stage, which runs on its own thread.
    pub profile: profile::ProfileSlot,
    /// Which keys of `targets` are thread-group leaders (cached: it never changes for a key).
    leaders: std::collections::HashMap<u32, bool>,
    /// The loaded `sched_switch` hook and its link while attached.
    offcpu_hook: Option<profile::OffCpuHook>,
    switch_link: Option<profile::SwitchLink>,
    _ebpf: Ebpf,
}

/// Counters kept by the kernel side, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters(pub [u64; counter::COUNT as usize]);

impl KernelCounters {
    pub fn get(&self, index: u32) -> u64 {
        self.0[index as usize]
    }

    /// Events lost in the kernel (ring buffer full).
    pub fn lost(&self) -> u64 {
        self.get(counter::RINGBUF_FULL)
    }
}

impl Probes {
    pub fn load(cfg: &ProbeConfig) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("this infertap binary was built without its eBPF programs (AYA_BUILD_SKIP); rebuild with `cargo xtask build`");
        }
        if cfg.capture_bytes as usize > MAX_CAPTURE {
            bail!(
                "--capture-bytes {} exceeds the maximum of {MAX_CAPTURE}",
                cfg.capture_bytes
            );
        }
        cfg.profile.validate()?;
        ensure_tracefs()?;
        let fork_offset = fork_child_pid_offset().unwrap_or_else(|e| {
            warn!("could not read sched_process_fork's format ({e:#}); assuming the 6.x layout");
            20
        });
        // Several MB: parsed once for every plan that needs offsets, dropped after loading.
        let btf = btf::Btf::vmlinux().map_err(|e| e.to_string());
        let plan = profile::LoadPlan::new(&cfg.profile, &btf);
        let arrival_plan = arrival::plan(cfg.arrival, &btf);
        drop(btf);
        let mut loader = EbpfLoader::new();
        loader
            .override_global("CAPTURE_BYTES", &cfg.capture_bytes, true)
            .override_global("WAKEUP_BYTES", &cfg.wakeup_bytes, true)
            .override_global("FORK_CHILD_PID_OFFSET", &fork_offset, true)
            .map_max_entries("EVENTS", cfg.ringbuf_bytes);
        plan.apply(&mut loader);
        if let Ok(o) = &arrival_plan {
            o.apply(&mut loader);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (are you root, with BPF enabled?)")?;

        let mut loaded = std::collections::HashSet::new();
        for (prog, category, name) in TRACEPOINTS {
            let program: &mut TracePoint = ebpf
                .program_mut(prog)
                .with_context(|| format!("eBPF program {prog} missing"))?
                .try_into()?;
            if loaded.insert(*prog) {
                program
                    .load()
                    .with_context(|| format!("verifier rejected {prog}"))?;
            }
            program
                .attach(category, name)
                .with_context(|| format!("attaching {prog} to {category}/{name}"))?;
            debug!("attached {prog} to {category}/{name}");
        }

        let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map")?)?;
        let targets = HashMap::try_from(ebpf.take_map("TARGETS").context("TARGETS map")?)?;
        let conns = HashMap::try_from(ebpf.take_map("CONNS").context("CONNS map")?)?;
        let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("COUNTERS map")?)?;
        let cuda = cuda::CudaProbes::new(&mut ebpf)?;
        let arrival = match arrival_plan.and_then(|_| arrival::ArrivalProbes::attach(&mut ebpf)) {
            Ok(a) => {
                info!(
                    "request arrival: from the socket (tcp_probe + inet_sock_set_state); TTFT and \
                     E2E start when a request's first byte reached the server"
                );
                Some(a)
            }
            Err(e) => {
                warn!(
                    "request arrival: off ({e:#}); requests start when the server reads them, so \
                     queueing before the read is not seen"
                );
                None
            }
        };
        let mut profile = profile::ProfileProbes::new(&mut ebpf, &cfg.profile, plan)?;
        let switch_link = profile.switch_link.take();
        Ok(Self {
            offcpu_hook: profile.offcpu_hook(),
            switch_link,
            events: Some(events),
            targets,
            conns,
            counters,
            cuda,
            arrival,
            profile: profile::ProfileSlot::new(profile),
            leaders: std::collections::HashMap::new(),
            _ebpf: ebpf,
        })
    }

    /// The profiler's kernel side (sample ring, controls, Python map), handed out once.
    pub fn take_profile(&mut self) -> Option<profile::ProfileProbes> {
        self.profile.take()
    }

    /// The event ring buffer, handed to the consumer once.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    pub fn add_target(&mut self, pid: u32) -> Result<()> {
        self.targets
            .insert(pid, 1, 0)
            .with_context(|| format!("tracing pid {pid}"))
    }

    pub fn is_target(&self, pid: u32) -> bool {
        self.targets.get(&pid, 0).is_ok()
    }

    /// Processes (and possibly thread ids, see the eBPF side) currently traced.
    pub fn targets(&self) -> Vec<u32> {
        self.targets.keys().filter_map(|k| k.ok()).collect()
    }

    /// The traced processes only (thread-group leaders): the kernel's set also holds the ids of
    /// threads the fork tracepoint saw, and reading one process's memory maps once per thread
    /// would multiply the rescan cost by its thread count.
    pub fn processes(&mut self) -> Vec<u32> {
        let keys = self.targets();
        self.leaders.retain(|k, _| keys.contains(k));
        keys.into_iter()
            .filter(|&k| {
                *self
                    .leaders
                    .entry(k)
                    .or_insert_with(|| crate::targets::tgid_of(k) == Some(k))
            })
            .collect()
    }

    /// Starts tracing a connection that was open before the agent attached.
    pub fn adopt_connection(&mut self, pid: u32, fd: i32, conn_id: u64) -> Result<()> {
        self.conns
            .insert(
                ConnKey { tgid: pid, fd },
                ConnInfo {
                    conn_id,
                    // Its next read may begin a request: capture it like a new connection's.
                    flags: infertap_common::conn_flag::HEAD,
                    ..Default::default()
                },
                0,
            )
            .with_context(|| format!("adopting fd {fd} of pid {pid}"))
    }

    /// Stops tracing one connection (it does not speak HTTP/1.x): its kernel map entry is
    /// removed, so its syscalls cost one failed lookup from now on and emit nothing (its close
    /// included). The entry is removed only if it still holds `conn_id` (the fd may have been
    /// closed and reused by a newer connection); without `fd`, the process's entries are
    /// searched for it. Returns whether an entry was removed.
    pub fn untrace_connection(&mut self, pid: u32, conn_id: u64, fd: Option<i32>) -> bool {
        let holds = |conns: &HashMap<MapData, ConnKey, ConnInfo>, k: &ConnKey| {
            conns.get(k, 0).is_ok_and(|v| v.conn_id == conn_id)
        };
        let key = match fd {
            Some(fd) => Some(ConnKey { tgid: pid, fd }).filter(|k| holds(&self.conns, k)),
            None => self
                .conns
                .keys()
                .filter_map(|k| k.ok())
                .find(|k| k.tgid == pid && holds(&self.conns, k)),
        };
        key.is_some_and(|k| self.conns.remove(&k).is_ok())
    }

    /// Whether the kernel traces `(pid, fd)` now, and under which connection id.
    pub fn traced_connection(&self, pid: u32, fd: i32) -> Option<u64> {
        self.conns
            .get(&ConnKey { tgid: pid, fd }, 0)
            .ok()
            .map(|v| v.conn_id)
    }

    /// Finds the CUDA libraries the traced processes have mapped and probes new ones.
    /// Returns the number of probes attached by this call.
    pub fn attach_cuda(&mut self) -> usize {
        let mut libs: Vec<std::path::PathBuf> = Vec::new();
        for pid in self.processes() {
            for lib in cuda::mapped_cuda_libraries(pid) {
                if !libs.contains(&lib) {
                    libs.push(lib);
                }
            }
        }
        let mut attached = 0;
        for lib in libs {
            match self.attach_cuda_library(&lib) {
                Ok(n) => attached += n,
                Err(e) => warn!("CUDA probes on {}: {e:#}", lib.display()),
            }
        }
        attached
    }

    /// Probes one CUDA library (also usable with an explicit path, `--cuda-lib`).
    pub fn attach_cuda_library(&mut self, lib: &Path) -> Result<usize> {
        self.cuda.attach_library(&mut self._ebpf, lib)
    }

    /// Drops a process and its connections from the kernel maps (after it exited).
    pub fn forget_process(&mut self, pid: u32) {
        self.cuda.forget_process(pid);
        if let Some(p) = self.profile.get_mut() {
            p.forget_process(pid);
        }
        let _ = self.targets.remove(&pid);
        let keys: Vec<ConnKey> = self
            .conns
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.tgid == pid)
            .collect();
        for k in keys {
            let _ = self.conns.remove(&k);
        }
    }

    /// Detaches (`false`) or re-attaches (`true`) the `sched_switch` hook, which stays loaded
    /// with its maps: while detached, context switches pay nothing for it and off-CPU
    /// periods are not seen (a period that spans the detachment is lost, not miscounted: its
    /// switch-in finds no start, or a start the LRU map later drops). For a profiler that
    /// stops off-CPU profiling for a long time, and for measuring what the hook costs.
    pub fn set_offcpu_hook_attached(&mut self, attached: bool) -> Result<()> {
        let hook = self
            .offcpu_hook
            .context("off-CPU profiling is unavailable: no sched_switch hook")?;
        match (attached, self.switch_link.take()) {
            (false, Some(link)) => profile::detach(&mut self._ebpf, hook, link)?,
            (true, None) => self.switch_link = Some(profile::attach_loaded(&mut self._ebpf, hook)?),
            (_, link) => self.switch_link = link,
        }
        Ok(())
    }

    /// The kernel's view of a loaded program (verified instruction count, and run time / run
    /// count while `kernel.bpf_stats_enabled` is on).
    pub fn program_info(&self, name: &str) -> Result<aya::programs::ProgramInfo> {
        self._ebpf
            .program(name)
            .with_context(|| format!("eBPF program {name} missing"))?
            .info()
            .with_context(|| format!("program info of {name} (is it loaded?)"))
    }

    pub fn counters(&self) -> KernelCounters {
        let mut out = KernelCounters::default();
        for i in 0..counter::COUNT {
            if let Ok(per_cpu) = self.counters.get(&i, 0) {
                out.0[i as usize] = per_cpu.iter().sum();
            }
        }
        out
    }
}

/// Syscall tracepoints need tracefs; mount it when it is missing (we are root anyway).
fn ensure_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", TRACEFS])
        .status()
        .context("running mount for tracefs")?;
    if !status.success() {
        bail!("tracefs is not mounted and `mount -t tracefs tracefs {TRACEFS}` failed");
    }
    Ok(())
}

/// Reads `child_pid`'s offset from the sched_process_fork format (it moved in 6.x kernels).
fn fork_child_pid_offset() -> Result<u32> {
    let path = Path::new(TRACEFS).join("events/sched/sched_process_fork/format");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_field_offset(&text, "child_pid").context("child_pid field not found")
}

fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        if decl.split_whitespace().last()? != field {
            return None;
        }
        rest.trim()
            .strip_prefix("offset:")?
            .split(';')
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn fork_format_offsets() {
        let new = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(super::parse_field_offset(new, "child_pid"), Some(20));
        let old = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:1;\n\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:1;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(super::parse_field_offset(old, "child_pid"), Some(44));
        assert_eq!(super::parse_field_offset(old, "nope"), None);
    }
}
