//! The profiler's kernel side, from user space: the `cpu-clock` perf events (one per online CPU)
//! and the `sched_switch` hook (the raw tracepoint, with `task_struct` offsets from the kernel's
//! BTF, or the classic tracepoint: [`SwitchHook`]) that feed the `SAMPLES` ring, the run-time controls, the
//! per-process Python layouts the kernel walks with, the off-CPU totals, and a decoder for the
//! sample records ([`decode_sample`]).
//!
//! Stack copies are bounded per thread by its stack top ([`ProfileProbes::set_stack_top`]): a
//! thread whose top is registered costs the bytes its stack holds, others the full
//! `stack_bytes` (64 KiB by default).
//!
//! CPU profiling is optional: when perf events cannot be opened (no perf support in the kernel,
//! `kernel.perf_event_paranoid`, a container without CAP_PERFMON) the agent goes on without it
//! and says why once ([`ProfileProbes::cpu_profiling`]). Off-CPU profiling likewise.

use std::collections::HashMap as StdHashMap;

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuHashMap, RingBuf},
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        raw_trace_point::RawTracePointLinkId,
        trace_point::TracePointLinkId,
        PerfEvent, RawTracePoint, TracePoint,
    },
    Ebpf, EbpfLoader,
};
use infertap_common::profile::{
    profile_control as ctl, py_flags, sample_flags, sample_kind, OffCpuStart, OffCpuTotals,
    PyFrame, PyProc, SampleHeader, SampleRecord, StackTop, MAX_KERNEL_FRAMES, MAX_PY_FRAMES,
    MAX_STACK_BYTES, PY_OFFSET_NONE, SAMPLE_FIXED_LEN, SAMPLE_HEADER_LEN,
};
use tracing::{debug, info, warn};

use super::btf::{self, Btf};

/// Profiler settings fixed at load (the 1-in-N rates and the stack size can also change at run
/// time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileConfig {
    /// On-CPU samples per second per CPU (`cpu-clock` timer); 0: no perf events at all. An odd
    /// rate that divides no common timer period avoids lockstep with periodic work.
    pub hz: u64,
    /// Capture the stack of 1 in N switch-outs of traced threads; 0 turns off-CPU profiling
    /// off for the probes' life (no totals either, and no `sched_switch` hook, so context
    /// switches pay nothing). Totals count every switch-out whatever N is.
    pub offcpu_sample_every: u32,
    /// Capture the stack of 1 in N CUDA launches; 0: off.
    pub launch_sample_every: u32,
    /// User stack bytes copied per sample (≤ `MAX_STACK_BYTES`, rounded down to 8); less for a
    /// thread whose stack top is registered and nearer.
    pub stack_bytes: u32,
    /// Size of the `SAMPLES` ring buffer in bytes (a power of two, a multiple of the page size).
    pub samples_ring_bytes: u32,
    /// Which `sched_switch` hook off-CPU profiling uses.
    pub switch_hook: SwitchHook,
}

/// Which `sched_switch` hook feeds off-CPU profiling. Both produce the same records; they differ
/// in what every context switch of the machine pays (see [`OffCpuHook`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SwitchHook {
    /// The raw tracepoint when the kernel's BTF gives the `task_struct` offsets it needs and it
    /// attaches; the classic tracepoint otherwise.
    #[default]
    Auto,
    /// The classic tracepoint `sched/sched_switch` (needs tracefs).
    Tracepoint,
    /// The raw tracepoint only: without it off-CPU profiling is unavailable.
    RawTracepoint,
    /// The raw tracepoint, reading prev's state from its `task_struct` as it must on kernels
    /// before 5.18 (whose raw tracepoint has no `prev_state` argument) even where the argument
    /// exists: that path, tested on newer kernels. There a wake-up racing the switch-out from
    /// another CPU can make a blocked switch-out look runnable (the reason 5.18 added the
    /// argument).
    RawTracepointTaskState,
}

/// The `sched_switch` hook in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffCpuHook {
    /// `on_switch_raw` on the raw tracepoint: the kernel calls it with the tracepoint's
    /// arguments and builds no trace record; it reads next's tid (and, without `state_arg`,
    /// prev's state) from the `task_struct`s at BTF offsets.
    RawTracepoint {
        /// Prev's state comes from the tracepoint's `prev_state` argument (5.18+).
        state_arg: bool,
    },
    /// `on_sched_switch` on the classic tracepoint, reading the trace record the kernel
    /// assembles (comms, pids, priorities, state) for every switch.
    Tracepoint,
}

impl OffCpuHook {
    /// The eBPF program (for its `bpf_stats` and verifier figures).
    pub fn program(self) -> &'static str {
        match self {
            OffCpuHook::RawTracepoint { .. } => "on_switch_raw",
            OffCpuHook::Tracepoint => "on_sched_switch",
        }
    }
}

impl Default for ProfileConfig {
    fn default() -> Self {
        Self {
            hz: 49,
            // A capture costs a stack copy (up to 64 KiB) and ring traffic; servers switch
            // thousands of times a second. The totals still see every switch.
            offcpu_sample_every: 16,
            launch_sample_every: 0,
            stack_bytes: infertap_common::profile::DEFAULT_STACK_BYTES,
            // ≈490 samples with a whole 64 KiB stack, ≈1200 at the 27 KiB mean copy measured
            // on the llama.cpp server with stack tops registered (tests/profile_stacks.rs):
            // 100 ms of 49 Hz on 32 busy threads is ≈160 samples, so a consumer that polls
            // every 100 ms has 3× headroom even if no top is known.
            samples_ring_bytes: 32 << 20,
            switch_hook: SwitchHook::Auto,
        }
    }
}

impl ProfileConfig {
    pub(super) fn validate(&self) -> Result<()> {
        if self.stack_bytes as usize > MAX_STACK_BYTES {
            bail!(
                "stack bytes {} exceed the maximum of {MAX_STACK_BYTES}",
                self.stack_bytes
            );
        }
        let ring = self.samples_ring_bytes;
        if !ring.is_power_of_two() || ring < 4096 {
            bail!("samples ring size {ring} is not a power of two ≥ 4096");
        }
        Ok(())
    }
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// Field offsets of the sched_switch tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SwitchOffsets {
    prev_pid: u32,
    prev_state: u32,
    next_pid: u32,
}

impl SwitchOffsets {
    fn parse(format: &str) -> Option<Self> {
        Some(Self {
            prev_pid: super::parse_field_offset(format, "prev_pid")?,
            prev_state: super::parse_field_offset(format, "prev_state")?,
            next_pid: super::parse_field_offset(format, "next_pid")?,
        })
    }

    fn read() -> Result<Self> {
        let path = format!("{TRACEFS}/events/sched/sched_switch/format");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Self::parse(&text).context("prev_pid, prev_state or next_pid missing in its format")
    }
}

/// What the raw `sched_switch` hook needs from the kernel's BTF: where `struct task_struct`
/// keeps the tid, the state and the exit state, and whether the tracepoint passes prev's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawSwitchOffsets {
    /// Byte offset of `pid` (the tid; a 4-byte `pid_t`).
    pub pid: u32,
    /// Byte offset of `__state` (a 4-byte `unsigned int`, 5.14+) or `state` (an 8-byte `long`
    /// before 5.14, whose low half the program reads on this little-endian machine).
    pub state: u32,
    /// Byte offset of `exit_state` (a 4-byte `int`).
    pub exit_state: u32,
    /// The raw tracepoint has a `prev_state` argument (`btf_trace_sched_switch` has 4
    /// arguments after its private data; without the typedef, a 5.18+ kernel).
    pub state_arg: bool,
}

impl RawSwitchOffsets {
    /// Finds the offsets in `btf`; `release` (major, minor) decides `state_arg` when `btf` has
    /// no `btf_trace_sched_switch`.
    pub fn from_btf(btf: &Btf, release: Option<(u32, u32)>) -> Result<Self> {
        let task = btf
            .find(btf::Kind::Struct, "task_struct")
            .context("no struct task_struct in the kernel's BTF")?;
        let field = |names: &[&'static str], sizes: &[u64]| -> Result<(u32, &'static str)> {
            for &name in names {
                let Some(m) = btf.member(task, name) else {
                    continue;
                };
                let off = m
                    .byte_offset()
                    .with_context(|| format!("task_struct.{name} is a bitfield"))?;
                let size = btf.size_of(m.type_id);
                if !size.is_some_and(|s| sizes.contains(&s)) {
                    bail!("task_struct.{name} is {size:?} bytes, not {sizes:?}");
                }
                let off = u32::try_from(off).context("task_struct offset past 4 GiB")?;
                return Ok((off, name));
            }
            bail!("task_struct has no {}", names.join(" or "))
        };
        let (pid, _) = field(&["pid"], &[4])?;
        let (state, _) = field(&["__state", "state"], &[4, 8])?;
        let (exit_state, _) = field(&["exit_state"], &[4])?;
        let state_arg = match btf.tracepoint_args("sched_switch") {
            Some(4) => true,
            Some(3) => false,
            Some(n) => bail!("btf_trace_sched_switch has {n} arguments, expected 3 or 4"),
            None => {
                release.context(
                    "no btf_trace_sched_switch in the BTF and the kernel release is unknown",
                )? >= (5, 18)
            }
        };
        Ok(Self {
            pid,
            state,
            exit_state,
            state_arg,
        })
    }

    /// From the running kernel's BTF (`btf`: parsed once by the loader for every plan).
    fn read(btf: &Result<Btf, String>) -> Result<Self> {
        let btf = btf
            .as_ref()
            .map_err(|e| anyhow::anyhow!("reading the kernel's BTF: {e}"))?;
        Self::from_btf(btf, kernel_release())
    }
}

/// Kernel frames the raw hook's captures leave out so they start where the classic hook's do
/// (at the tracepoint's call site in `__schedule`, or in `__traceiter_sched_switch` when several
/// probes share the tracepoint): the program's own frame (it calls `bpf_get_stack` from its
/// main body) and `bpf_trace_run4` (`__bpf_trace_sched_switch` tail-calls it and leaves no
/// frame). The kernel-level tests check the two hooks' stacks against each other.
const RAW_STACK_SKIP: u32 = 2;

/// The running kernel's (major, minor) release.
pub(crate) fn kernel_release() -> Option<(u32, u32)> {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_release(&r)
}

fn parse_release(r: &str) -> Option<(u32, u32)> {
    let mut it = r.trim().split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The kernel's sample scratch arrays: one entry per possible CPU each.
const SCRATCH_MAPS: [&str; 3] = ["SCRATCH_CPU", "SCRATCH_SWITCH", "SCRATCH_LAUNCH"];

/// Kernel memory the sample scratch arrays take on a machine with `cpus` possible CPUs (≈ 213
/// KiB per CPU).
pub fn scratch_bytes(cpus: u32) -> u64 {
    // agent-ebpf's `Scratch`: the record, a page of slack after its stack, the frame window
    // (twice PY_FRAME_WINDOW_BYTES) and the walker's state (a PyProc and three u64).
    let per = std::mem::size_of::<SampleRecord>()
        + 4096
        + 2 * infertap_common::profile::PY_FRAME_WINDOW_BYTES
        + std::mem::size_of::<PyProc>()
        + 24;
    SCRATCH_MAPS.len() as u64 * cpus as u64 * per as u64
}

/// What the loader must know before the object is loaded (globals, the ring size, the CPU
/// count).
pub(super) struct LoadPlan {
    hook: SwitchHook,
    switch: Result<SwitchOffsets>,
    raw: Result<RawSwitchOffsets>,
    /// `raw`'s `state_arg` as the program's global.
    raw_state_arg: u32,
    ring_bytes: u32,
    wakeup_bytes: u64,
    /// Possible CPUs (`bpf_get_smp_processor_id` is below this): the scratch arrays' size.
    cpus: Result<u32>,
}

impl LoadPlan {
    /// `btf`: the running kernel's BTF (or why it could not be read).
    pub(super) fn new(cfg: &ProfileConfig, btf: &Result<Btf, String>) -> Self {
        let classic = matches!(cfg.switch_hook, SwitchHook::Auto | SwitchHook::Tracepoint);
        let raw = cfg.switch_hook != SwitchHook::Tracepoint;
        let mut plan = Self {
            hook: cfg.switch_hook,
            switch: if classic {
                SwitchOffsets::read()
            } else {
                Err(anyhow::anyhow!("not wanted"))
            },
            raw: if raw {
                RawSwitchOffsets::read(btf).map(|mut o| {
                    if cfg.switch_hook == SwitchHook::RawTracepointTaskState {
                        o.state_arg = false;
                    }
                    o
                })
            } else {
                Err(anyhow::anyhow!("not wanted"))
            },
            raw_state_arg: 0,
            ring_bytes: cfg.samples_ring_bytes,
            // Wake the consumer only when a quarter of the ring is waiting.
            wakeup_bytes: cfg.samples_ring_bytes as u64 / 4,
            cpus: aya::util::nr_cpus()
                .map(|n| n as u32)
                .map_err(|(what, e)| anyhow::anyhow!("reading {what}: {e}")),
        };
        plan.raw_state_arg = plan.raw.as_ref().is_ok_and(|o| o.state_arg) as u32;
        plan
    }

    /// Applies the globals, the ring size and the scratch arrays' size to the loader.
    pub(super) fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader
            .override_global("SAMPLE_WAKEUP_BYTES", &self.wakeup_bytes, true)
            .map_max_entries("SAMPLES", self.ring_bytes);
        // Unknown CPU count: one entry, so only CPU 0 samples (counted as SAMPLE_FAILED on the
        // others) rather than no agent at all; `ProfileProbes::new` says so.
        let cpus = *self.cpus.as_ref().unwrap_or(&1);
        for name in SCRATCH_MAPS.iter().chain(&["LAUNCH_BUSY"]) {
            loader.map_max_entries(name, cpus.max(1));
        }
        if let Ok(o) = &self.switch {
            loader
                .override_global("SWITCH_PREV_PID_OFFSET", &o.prev_pid, true)
                .override_global("SWITCH_PREV_STATE_OFFSET", &o.prev_state, true)
                .override_global("SWITCH_NEXT_PID_OFFSET", &o.next_pid, true);
        }
        if let Ok(o) = &self.raw {
            loader
                .override_global("TASK_PID_OFFSET", &o.pid, true)
                .override_global("TASK_STATE_OFFSET", &o.state, true)
                .override_global("TASK_EXIT_STATE_OFFSET", &o.exit_state, true)
                .override_global("SWITCH_STATE_ARG", &self.raw_state_arg, true)
                .override_global("SWITCH_RAW_STACK_SKIP", &RAW_STACK_SKIP, true);
        }
    }
}

/// Whether on-CPU sampling runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuProfiling {
    /// Perf events attached on `cpus` CPUs at `hz`.
    Sampling { hz: u64, cpus: usize },
    /// Not configured (`hz` = 0).
    Off,
    /// Wanted but unavailable, with the reason.
    Unavailable(String),
}

/// Holds the [`ProfileProbes`] until the profiler stage takes them to its own thread. Derefs to
/// them while they are here (kernel-level tests drive them directly); using them after they
/// were taken is a programming error and panics.
pub struct ProfileSlot(Option<ProfileProbes>);

impl ProfileSlot {
    pub(super) fn new(p: ProfileProbes) -> Self {
        ProfileSlot(Some(p))
    }

    /// Moves the probes out (once).
    pub fn take(&mut self) -> Option<ProfileProbes> {
        self.0.take()
    }

    /// The probes, unless taken.
    pub fn get_mut(&mut self) -> Option<&mut ProfileProbes> {
        self.0.as_mut()
    }
}

impl std::ops::Deref for ProfileSlot {
    type Target = ProfileProbes;
    fn deref(&self) -> &ProfileProbes {
        self.0
            .as_ref()
            .expect("profile probes were taken by the profiler")
    }
}

impl std::ops::DerefMut for ProfileSlot {
    fn deref_mut(&mut self) -> &mut ProfileProbes {
        self.0
            .as_mut()
            .expect("profile probes were taken by the profiler")
    }
}

pub struct ProfileProbes {
    control: Array<MapData, u32>,
    py_procs: HashMap<MapData, u32, PyProc>,
    py_threads: HashMap<MapData, u64, u64>,
    stack_tops: HashMap<MapData, u64, StackTop>,
    offcpu_start: HashMap<MapData, u32, OffCpuStart>,
    offcpu_totals: PerCpuHashMap<MapData, u32, OffCpuTotals>,
    samples: Option<RingBuf<MapData>>,
    /// Totals as last handed out by `take_offcpu_totals` (the kernel's are cumulative).
    taken: StdHashMap<u32, OffCpuTotals>,
    cpu: CpuProfiling,
    /// The `sched_switch` hook attached (None: off-CPU profiling is unavailable).
    offcpu_hook: Option<OffCpuHook>,
    /// Its link, until `Probes` takes it.
    pub(super) switch_link: Option<SwitchLink>,
    /// Why off-CPU profiling is unavailable (None: a hook is attached).
    offcpu_unavailable: Option<String>,
}

impl ProfileProbes {
    pub(super) fn new(ebpf: &mut Ebpf, cfg: &ProfileConfig, plan: LoadPlan) -> Result<Self> {
        let mut control = Array::try_from(
            ebpf.take_map("PROFILE_CONTROL")
                .context("PROFILE_CONTROL map")?,
        )?;
        let py_procs = HashMap::try_from(ebpf.take_map("PY_PROCS").context("PY_PROCS map")?)?;
        let py_threads = HashMap::try_from(ebpf.take_map("PY_THREADS").context("PY_THREADS map")?)?;
        let stack_tops = HashMap::try_from(ebpf.take_map("STACK_TOPS").context("STACK_TOPS map")?)?;
        if let Err(e) = &plan.cpus {
            warn!("possible CPU count unknown ({e:#}): only CPU 0 takes stack samples");
        }
        let offcpu_start =
            HashMap::try_from(ebpf.take_map("OFFCPU_START").context("OFFCPU_START map")?)?;
        let offcpu_totals = PerCpuHashMap::try_from(
            ebpf.take_map("OFFCPU_TOTALS")
                .context("OFFCPU_TOTALS map")?,
        )?;
        let samples = RingBuf::try_from(ebpf.take_map("SAMPLES").context("SAMPLES map")?)?;
        control.set(ctl::STACK_BYTES, cfg.stack_bytes & !7, 0)?;
        control.set(ctl::LAUNCH_SAMPLE_EVERY, cfg.launch_sample_every, 0)?;

        let cpu = if cfg.hz == 0 {
            CpuProfiling::Off
        } else {
            match attach_cpu_clock(ebpf, cfg.hz) {
                Ok(cpus) => {
                    control.set(ctl::CPU_ON, 1, 0)?;
                    info!("CPU profiling: {} Hz on {cpus} CPUs", cfg.hz);
                    CpuProfiling::Sampling { hz: cfg.hz, cpus }
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    warn!("CPU profiling disabled, the agent goes on without it: {why}");
                    CpuProfiling::Unavailable(why)
                }
            }
        };

        // Not wanted: no hook at all, so context switches pay nothing for it.
        let attached: Result<_, (anyhow::Error, bool)> = if cfg.offcpu_sample_every == 0 {
            Err((
                anyhow::anyhow!("off-CPU profiling was not configured (1 in 0 switch-outs)"),
                false,
            ))
        } else {
            attach_switch(ebpf, &plan).map_err(|e| (e, true))
        };
        let (offcpu_hook, switch_link, offcpu_unavailable) = match attached {
            Ok((hook, link)) => {
                control.set(ctl::OFFCPU_SAMPLE_EVERY, cfg.offcpu_sample_every, 0)?;
                (Some(hook), Some(link), None)
            }
            Err((e, wanted)) => {
                let why = format!("{e:#}");
                if wanted {
                    warn!("off-CPU profiling disabled, the agent goes on without it: {why}");
                }
                (None, None, Some(why))
            }
        };
        Ok(Self {
            control,
            py_procs,
            py_threads,
            stack_tops,
            offcpu_start,
            offcpu_totals,
            samples: Some(samples),
            taken: StdHashMap::new(),
            cpu,
            offcpu_hook,
            switch_link,
            offcpu_unavailable,
        })
    }

    /// The `SAMPLES` ring buffer, handed to the consumer once.
    pub fn take_samples(&mut self) -> Option<RingBuf<MapData>> {
        self.samples.take()
    }

    /// Whether on-CPU sampling runs, and why not.
    pub fn cpu_profiling(&self) -> &CpuProfiling {
        &self.cpu
    }

    /// Why off-CPU profiling is unavailable (`None`: it is attached).
    pub fn offcpu_unavailable(&self) -> Option<&str> {
        self.offcpu_unavailable.as_deref()
    }

    /// The `sched_switch` hook off-CPU profiling runs on (`None`: unavailable).
    pub fn offcpu_hook(&self) -> Option<OffCpuHook> {
        self.offcpu_hook
    }

    /// Pauses or resumes on-CPU samples (the perf events stay attached).
    pub fn set_cpu_sampling(&mut self, on: bool) -> Result<()> {
        if on {
            if let CpuProfiling::Unavailable(why) = &self.cpu {
                bail!("CPU profiling is unavailable: {why}");
            }
            if self.cpu == CpuProfiling::Off {
                bail!("CPU profiling was not configured (0 Hz)");
            }
        }
        self.control
            .set(ctl::CPU_ON, on as u32, 0)
            .context("setting CPU sampling")
    }

    /// Captures 1 in `every` switch-outs with their stacks (0: off-CPU profiling off, totals
    /// included).
    pub fn set_offcpu_sample_every(&mut self, every: u32) -> Result<()> {
        if every != 0 {
            if let Some(why) = &self.offcpu_unavailable {
                bail!("off-CPU profiling is unavailable: {why}");
            }
        }
        self.control
            .set(ctl::OFFCPU_SAMPLE_EVERY, every, 0)
            .context("setting the off-CPU sampling rate")
    }

    /// Captures the stack of 1 in `every` CUDA launches (0: off).
    pub fn set_launch_sample_every(&mut self, every: u32) -> Result<()> {
        self.control
            .set(ctl::LAUNCH_SAMPLE_EVERY, every, 0)
            .context("setting the launch sampling rate")
    }

    /// User stack bytes copied per sample, rounded down to 8.
    pub fn set_stack_bytes(&mut self, bytes: u32) -> Result<()> {
        if bytes as usize > MAX_STACK_BYTES {
            bail!("stack bytes {bytes} exceed the maximum of {MAX_STACK_BYTES}");
        }
        self.control
            .set(ctl::STACK_BYTES, bytes & !7, 0)
            .context("setting the stack copy size")
    }

    /// Tells the kernel where process `pid`'s interpreter is and how to walk its frames.
    pub fn set_python_process(&mut self, pid: u32, proc_: &PyProc) -> Result<()> {
        check_py_proc(proc_)?;
        self.py_procs
            .insert(pid, *proc_, 0)
            .with_context(|| format!("PY_PROCS entry of pid {pid} (map full?)"))
    }

    /// Bounds the stack copies of thread `tid` of process `pid` by its stack's top: `stack` is
    /// the mapping that holds it (`Unwinder::stack_top` of a sample's `sp`). A sample whose `sp`
    /// is inside `stack` then copies `min(top - sp, stack_bytes)` bytes and carries
    /// `STACK_TO_TOP`; one on another stack is copied as if there were no entry. Call once per
    /// thread, on its first sample; the kernel drops the entry when the thread exits.
    ///
    /// When to look again (both cheap: `Unwinder::stack_top` answers from the maps it keeps):
    /// a sample of a registered thread without `STACK_TO_TOP` whose `sp` is outside the
    /// registered range and less than `stack_bytes` below its own mapping's top (the thread
    /// moved to another stack), and a sample with `STACK_TO_TOP | STACK_SHORT` (a page below
    /// the top was not present, or the mapping changed); re-register only if the range
    /// differs.
    pub fn set_stack_top(&mut self, pid: u32, tid: u32, stack: StackTop) -> Result<()> {
        if stack.top <= stack.low {
            bail!(
                "empty stack range {:#x}..{:#x} for tid {tid} of pid {pid}",
                stack.low,
                stack.top
            );
        }
        let key = (pid as u64) << 32 | tid as u64;
        self.stack_tops
            .insert(key, stack, 0)
            .with_context(|| format!("STACK_TOPS entry of tid {tid} of pid {pid}"))
    }

    /// Forgets thread `tid`'s stack range (its samples copy `stack_bytes` again).
    pub fn remove_stack_top(&mut self, pid: u32, tid: u32) {
        let _ = self.stack_tops.remove(&((pid as u64) << 32 | tid as u64));
    }

    /// The stack range registered for thread `tid` of `pid`, if the kernel still has it.
    pub fn stack_top(&self, pid: u32, tid: u32) -> Option<StackTop> {
        self.stack_tops
            .get(&((pid as u64) << 32 | tid as u64), 0)
            .ok()
    }

    /// Stops walking process `pid`'s Python frames.
    pub fn remove_python_process(&mut self, pid: u32) {
        let _ = self.py_procs.remove(&pid);
        let threads: Vec<u64> = self
            .py_threads
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| (k >> 32) as u32 == pid)
            .collect();
        for k in threads {
            let _ = self.py_threads.remove(&k);
        }
    }

    /// Drops everything the profiler's maps hold about process `pid` (after it exited or
    /// stopped being traced).
    pub fn forget_process(&mut self, pid: u32) {
        self.remove_python_process(pid);
        let tops: Vec<u64> = self
            .stack_tops
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| (k >> 32) as u32 == pid)
            .collect();
        for k in tops {
            let _ = self.stack_tops.remove(&k);
        }
        let _ = self.offcpu_totals.remove(&pid);
        self.taken.remove(&pid);
        let starts: Vec<u32> = self
            .offcpu_start
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, v)| v.tgid == pid)
            .map(|(k, _)| k)
            .collect();
        for k in starts {
            let _ = self.offcpu_start.remove(&k);
        }
    }

    /// Threads of traced processes that are off-CPU now, as the kernel follows them: (tid, when
    /// and how each switched out). A thread that exited is never among them: its last
    /// switch-out is not followed.
    pub fn offcpu_open_periods(&self) -> Vec<(u32, OffCpuStart)> {
        let mut out: Vec<(u32, OffCpuStart)> = self
            .offcpu_start
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, o)| o.ts_ns != 0)
            .collect();
        out.sort_by_key(|(tid, _)| *tid);
        out
    }

    /// Off-CPU totals per process since the probes loaded, summed over CPUs.
    pub fn offcpu_totals(&self) -> Vec<(u32, OffCpuTotals)> {
        let mut out: Vec<(u32, OffCpuTotals)> = self
            .offcpu_totals
            .iter()
            .filter_map(|r| r.ok())
            .map(|(pid, per_cpu)| {
                let mut t = OffCpuTotals::default();
                for c in per_cpu.iter() {
                    t.blocked_ns += c.blocked_ns;
                    t.preempted_ns += c.preempted_ns;
                    t.switches += c.switches;
                }
                (pid, t)
            })
            .collect();
        out.sort_by_key(|(pid, _)| *pid);
        out
    }

    /// Off-CPU totals per process accumulated since the previous call (the first call: since
    /// load). The kernel's counters are never cleared, so nothing the kernel adds between the
    /// read and the "reset" is lost.
    pub fn take_offcpu_totals(&mut self) -> Vec<(u32, OffCpuTotals)> {
        let now = self.offcpu_totals();
        let mut out = Vec::with_capacity(now.len());
        for (pid, t) in now {
            let prev = self.taken.insert(pid, t).unwrap_or_default();
            let d = OffCpuTotals {
                blocked_ns: t.blocked_ns.saturating_sub(prev.blocked_ns),
                preempted_ns: t.preempted_ns.saturating_sub(prev.preempted_ns),
                switches: t.switches.saturating_sub(prev.switches),
            };
            if d != OffCpuTotals::default() {
                out.push((pid, d));
            }
        }
        out
    }
}

/// Opens a `cpu-clock` event at `hz` on every online CPU with the sampling program. All or
/// nothing: a partial set would bias the profile towards some CPUs.
fn attach_cpu_clock(ebpf: &mut Ebpf, hz: u64) -> Result<usize> {
    let prog: &mut PerfEvent = ebpf
        .program_mut("profile_cpu")
        .context("eBPF program profile_cpu missing")?
        .try_into()?;
    prog.load().context("verifier rejected profile_cpu")?;
    let cpus =
        aya::util::online_cpus().map_err(|(what, e)| anyhow::anyhow!("reading {what}: {e}"))?;
    for &cpu in &cpus {
        if let Err(e) = prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Frequency(hz),
            false,
        ) {
            let _ = prog.unload();
            return Err(anyhow::Error::new(e).context(format!(
                "perf_event_open(cpu-clock, {hz} Hz) on CPU {cpu} ({})",
                perf_hint()
            )));
        }
    }
    debug!("profile_cpu attached on CPUs {cpus:?}");
    Ok(cpus.len())
}

/// What usually stands in the way of perf events, with this machine's settings.
fn perf_hint() -> String {
    let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unreadable: no perf events in this kernel?".into());
    let max_rate = std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    format!(
        "needs CAP_PERFMON or CAP_SYS_ADMIN and a kernel with perf events; \
         kernel.perf_event_paranoid = {paranoid}, kernel.perf_event_max_sample_rate = {max_rate}"
    )
}

/// The link of the attached `sched_switch` hook (Probes detaches and re-attaches through it).
#[derive(Debug)]
pub(super) enum SwitchLink {
    Raw(RawTracePointLinkId),
    Classic(TracePointLinkId),
}

/// Loads and attaches the `sched_switch` hook the plan asks for and says which one in one line.
fn attach_switch(ebpf: &mut Ebpf, plan: &LoadPlan) -> Result<(OffCpuHook, SwitchLink)> {
    let raw = |ebpf: &mut Ebpf| -> Result<(OffCpuHook, SwitchLink)> {
        let o = plan.raw.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let hook = OffCpuHook::RawTracepoint {
            state_arg: o.state_arg,
        };
        let link = load_and_attach(ebpf, hook)?;
        info!(
            "off-CPU profiling: raw tracepoint sched_switch (task_struct offsets from BTF: pid \
             {}, state {}, exit_state {}; prev's state from {})",
            o.pid,
            o.state,
            o.exit_state,
            if o.state_arg {
                "the tracepoint's prev_state argument"
            } else {
                "task_struct"
            }
        );
        Ok((hook, link))
    };
    let classic = |ebpf: &mut Ebpf, why: Option<&anyhow::Error>| {
        plan.switch.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let link = load_and_attach(ebpf, OffCpuHook::Tracepoint)?;
        match why {
            Some(e) => info!(
                "off-CPU profiling: tracepoint sched/sched_switch (the raw tracepoint is not \
                 usable: {e:#})"
            ),
            None => info!("off-CPU profiling: tracepoint sched/sched_switch"),
        }
        anyhow::Ok((OffCpuHook::Tracepoint, link))
    };
    match plan.hook {
        SwitchHook::Tracepoint => classic(ebpf, None),
        SwitchHook::RawTracepoint | SwitchHook::RawTracepointTaskState => raw(ebpf),
        SwitchHook::Auto => match raw(ebpf) {
            Ok(h) => Ok(h),
            Err(e) => classic(ebpf, Some(&e))
                .map_err(|c| anyhow::anyhow!("raw tracepoint: {e:#}; classic tracepoint: {c:#}")),
        },
    }
}

fn load_and_attach(ebpf: &mut Ebpf, hook: OffCpuHook) -> Result<SwitchLink> {
    let name = hook.program();
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing"))?;
    match hook {
        OffCpuHook::RawTracepoint { .. } => <&mut RawTracePoint>::try_from(prog)?.load(),
        OffCpuHook::Tracepoint => <&mut TracePoint>::try_from(prog)?.load(),
    }
    .with_context(|| format!("verifier rejected {name}"))?;
    attach_loaded(ebpf, hook).inspect_err(|_| {
        // Not attached: give the kernel its memory back (the classic hook may load next).
        let _ = match (hook, ebpf.program_mut(name)) {
            (OffCpuHook::RawTracepoint { .. }, Some(p)) => {
                <&mut RawTracePoint>::try_from(p).map(|p| p.unload())
            }
            (OffCpuHook::Tracepoint, Some(p)) => <&mut TracePoint>::try_from(p).map(|p| p.unload()),
            (_, None) => return,
        };
    })
}

/// Attaches the loaded program of `hook`.
pub(super) fn attach_loaded(ebpf: &mut Ebpf, hook: OffCpuHook) -> Result<SwitchLink> {
    let name = hook.program();
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing"))?;
    Ok(match hook {
        OffCpuHook::RawTracepoint { .. } => {
            let prog: &mut RawTracePoint = prog.try_into()?;
            SwitchLink::Raw(
                prog.attach("sched_switch")
                    .context("attaching on_switch_raw to raw tracepoint sched_switch")?,
            )
        }
        OffCpuHook::Tracepoint => {
            let prog: &mut TracePoint = prog.try_into()?;
            SwitchLink::Classic(
                prog.attach("sched", "sched_switch")
                    .context("attaching on_sched_switch to sched/sched_switch")?,
            )
        }
    })
}

/// Detaches `hook`'s program (it stays loaded).
pub(super) fn detach(ebpf: &mut Ebpf, hook: OffCpuHook, link: SwitchLink) -> Result<()> {
    let name = hook.program();
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing"))?;
    match link {
        SwitchLink::Raw(id) => {
            let p: &mut RawTracePoint = prog.try_into()?;
            p.detach(id)?;
        }
        SwitchLink::Classic(id) => {
            let p: &mut TracePoint = prog.try_into()?;
            p.detach(id)?;
        }
    }
    Ok(())
}

/// The checks the kernel walker makes (`frame_window` in agent-ebpf), made here first so a bad
/// layout is an error at registration instead of `PY_ERROR` on every sample.
fn check_py_proc(p: &PyProc) -> Result<()> {
    let o = &p.offsets;
    if p.interp == 0 {
        bail!("PyProc without an interpreter address");
    }
    // The walker knows the frame layouts of 3.10 (PyFrameObject chain) through 3.13.
    if !(0x030a..=0x030d).contains(&p.version) {
        bail!(
            "Python {}.{} is not walked (3.10–3.13)",
            p.version >> 8,
            p.version & 0xff
        );
    }
    let required = [
        ("interp_threads_head", o.interp_threads_head),
        ("tstate_next", o.tstate_next),
        ("tstate_native_thread_id", o.tstate_native_thread_id),
        ("tstate_frame", o.tstate_frame),
        ("frame_code", o.frame_code),
        ("frame_previous", o.frame_previous),
        ("frame_instr", o.frame_instr),
    ];
    for (name, v) in required {
        if v == PY_OFFSET_NONE {
            bail!("PyOffsets.{name} is missing");
        }
    }
    if p.code_type != 0 && o.object_type == PY_OFFSET_NONE {
        bail!("PyProc checks code_type but PyOffsets.object_type is missing");
    }
    if p.flags & py_flags::THREAD_ID_IS_PTHREAD != 0 {
        // 3.10: thread_id is a pthread_t; the tid is read from its struct pthread.
        if o.pthread_tid == PY_OFFSET_NONE {
            bail!("PyProc matches threads by pthread_t but PyOffsets.pthread_tid is missing");
        }
        if !o.pthread_tid.is_multiple_of(4) {
            bail!(
                "PyOffsets.pthread_tid = {} is not aligned to its 4-byte field",
                o.pthread_tid
            );
        }
    }
    let lasti_int = p.flags & py_flags::LASTI_IS_INT != 0;
    let mut end = 0u32;
    for (name, off, size) in [
        ("frame_code", o.frame_code, 8u32),
        ("frame_previous", o.frame_previous, 8),
        ("frame_instr", o.frame_instr, if lasti_int { 4 } else { 8 }),
        ("frame_owner", o.frame_owner, 1),
        ("frame_is_entry", o.frame_is_entry, 1),
    ] {
        if off == PY_OFFSET_NONE {
            continue;
        }
        if !(off as u32).is_multiple_of(size) {
            bail!("PyOffsets.{name} = {off} is not aligned to its {size}-byte field");
        }
        end = end.max(off as u32 + size);
    }
    if end > FRAME_WINDOW_BYTES {
        bail!("frame fields end at byte {end}, past the kernel walker's {FRAME_WINDOW_BYTES}-byte window");
    }
    Ok(())
}

const FRAME_WINDOW_BYTES: u32 = infertap_common::profile::PY_FRAME_WINDOW_BYTES as u32;

// ---- decoding ----------------------------------------------------------------------------------

/// What a sample record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleKind {
    Cpu,
    OffCpu,
    OffCpuEnd,
    Launch,
}

impl SampleKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            sample_kind::CPU => SampleKind::Cpu,
            sample_kind::OFFCPU => SampleKind::OffCpu,
            sample_kind::OFFCPU_END => SampleKind::OffCpuEnd,
            sample_kind::LAUNCH => SampleKind::Launch,
            _ => return None,
        })
    }
}

/// A sample record decoded in place: the header copied out, frames and stack borrowed from the
/// ring buffer's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleView<'a> {
    pub header: SampleHeader,
    pub kind: SampleKind,
    kernel: &'a [u8],
    python: &'a [u8],
    stack: &'a [u8],
}

impl<'a> SampleView<'a> {
    pub fn pid(&self) -> u32 {
        (self.header.pid_tgid >> 32) as u32
    }

    pub fn tid(&self) -> u32 {
        self.header.pid_tgid as u32
    }

    pub fn has_flag(&self, flag: u8) -> bool {
        self.header.flags & flag != 0
    }

    /// Kernel return addresses, innermost first.
    pub fn kernel_frames(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.kernel
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8-byte chunk")))
    }

    /// Python frames, innermost first.
    pub fn python_frames(&self) -> impl ExactSizeIterator<Item = PyFrame> + 'a {
        self.python.chunks_exact(16).map(|c| PyFrame {
            code: u64::from_ne_bytes(c[..8].try_into().expect("8 bytes")),
            instr: u64::from_ne_bytes(c[8..].try_into().expect("8 bytes")),
        })
    }

    /// The copied user stack; byte `i` is the target's memory at `header.sp + i`.
    pub fn stack(&self) -> &'a [u8] {
        self.stack
    }
}

/// Why a sample record was rejected (count it; never fatal).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SampleError {
    #[error("sample record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown sample kind {0}")]
    UnknownKind(u8),
    #[error("unknown sample flags {0:#x}")]
    UnknownFlags(u8),
    #[error("{what} = {value} exceeds the maximum of {max}")]
    TooMany {
        what: &'static str,
        value: usize,
        max: usize,
    },
    #[error("record is {len} bytes but its header says {expected}")]
    Length { len: usize, expected: usize },
}

/// Decodes one `SAMPLES` record. Every length the header claims is checked against the record
/// and the ABI's bounds; a record that does not add up is an error, never a panic.
pub fn decode_sample(record: &[u8]) -> Result<SampleView<'_>, SampleError> {
    if record.len() < SAMPLE_HEADER_LEN {
        return Err(SampleError::Short(record.len()));
    }
    // SAFETY: the length is checked above; SampleHeader is repr(C) plain integers, so any bit
    // pattern is valid; read_unaligned needs no alignment.
    let header: SampleHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let kind = SampleKind::from_u8(header.kind).ok_or(SampleError::UnknownKind(header.kind))?;
    if header.flags & !sample_flags::ALL != 0 {
        return Err(SampleError::UnknownFlags(header.flags & !sample_flags::ALL));
    }
    if kind == SampleKind::OffCpuEnd {
        let counts = header.user_stack_len as usize
            + header.kernel_frames as usize
            + header.py_frames as usize;
        if record.len() != SAMPLE_HEADER_LEN || counts != 0 {
            return Err(SampleError::Length {
                len: record.len(),
                expected: SAMPLE_HEADER_LEN,
            });
        }
        return Ok(SampleView {
            header,
            kind,
            kernel: &[],
            python: &[],
            stack: &[],
        });
    }
    let kernel_frames = header.kernel_frames as usize;
    let py_frames = header.py_frames as usize;
    let stack_len = header.user_stack_len as usize;
    for (what, value, max) in [
        ("kernel_frames", kernel_frames, MAX_KERNEL_FRAMES),
        ("py_frames", py_frames, MAX_PY_FRAMES),
        ("user_stack_len", stack_len, MAX_STACK_BYTES),
    ] {
        if value > max {
            return Err(SampleError::TooMany { what, value, max });
        }
    }
    let expected = SAMPLE_FIXED_LEN + stack_len;
    if record.len() != expected {
        return Err(SampleError::Length {
            len: record.len(),
            expected,
        });
    }
    let kernel_at = SAMPLE_HEADER_LEN;
    let python_at = kernel_at + MAX_KERNEL_FRAMES * 8;
    Ok(SampleView {
        header,
        kind,
        kernel: &record[kernel_at..kernel_at + kernel_frames * 8],
        python: &record[python_at..python_at + py_frames * 16],
        stack: &record[SAMPLE_FIXED_LEN..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use infertap_common::profile::{sample_flags as sf, PyOffsets, SampleRecord, PY_FRAME_ENTRY};

    /// A stack record as the kernel lays it out: the fixed part, then `stack`.
    fn record(header: SampleHeader, kernel: &[u64], python: &[PyFrame], stack: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; SAMPLE_FIXED_LEN];
        // SAFETY: writing a repr(C) integer struct into a buffer of at least its size.
        unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast::<SampleHeader>(), header) };
        let k = std::mem::offset_of!(SampleRecord, kernel);
        for (i, f) in kernel.iter().enumerate() {
            out[k + 8 * i..k + 8 * i + 8].copy_from_slice(&f.to_ne_bytes());
        }
        let p = std::mem::offset_of!(SampleRecord, python);
        for (i, f) in python.iter().enumerate() {
            out[p + 16 * i..p + 16 * i + 8].copy_from_slice(&f.code.to_ne_bytes());
            out[p + 16 * i + 8..p + 16 * i + 16].copy_from_slice(&f.instr.to_ne_bytes());
        }
        out.extend_from_slice(stack);
        out
    }

    fn cpu_header(kernel: usize, python: usize, stack: usize) -> SampleHeader {
        SampleHeader {
            ts_ns: 123,
            pid_tgid: 7 << 32 | 9,
            ip: 0x401000,
            sp: 0x7ffc0000,
            bp: 0,
            user_stack_len: stack as u32,
            kernel_frames: kernel as u16,
            py_frames: python as u16,
            cpu: 1,
            kind: sample_kind::CPU,
            flags: sf::IN_KERNEL | sf::STACK_SHORT,
            ..Default::default()
        }
    }

    #[test]
    fn decodes_a_full_record() {
        let py = [
            PyFrame {
                code: 0x1000 | PY_FRAME_ENTRY,
                instr: 0x1010,
            },
            PyFrame {
                code: 0x2000,
                instr: 0x2020,
            },
        ];
        let stack: Vec<u8> = (0..64u8).collect();
        let bytes = record(cpu_header(3, 2, 64), &[11, 22, 33], &py, &stack);
        let v = decode_sample(&bytes).unwrap();
        assert_eq!(v.kind, SampleKind::Cpu);
        assert_eq!((v.pid(), v.tid()), (7, 9));
        assert!(v.has_flag(sf::IN_KERNEL) && v.has_flag(sf::STACK_SHORT));
        assert!(!v.has_flag(sf::PY_ERROR));
        assert_eq!(v.kernel_frames().collect::<Vec<_>>(), vec![11, 22, 33]);
        let frames: Vec<PyFrame> = v.python_frames().collect();
        assert_eq!(frames, py);
        assert!(frames[0].is_entry() && frames[0].code_addr() == 0x1000);
        assert_eq!(v.stack(), &stack[..]);
    }

    #[test]
    fn decodes_a_header_only_end_record() {
        let h = SampleHeader {
            kind: sample_kind::OFFCPU_END,
            aux: 100,
            ts_ns: 150,
            flags: sf::PREEMPTED,
            ..Default::default()
        };
        let mut bytes = record(h, &[], &[], &[]);
        bytes.truncate(SAMPLE_HEADER_LEN);
        let v = decode_sample(&bytes).unwrap();
        assert_eq!(v.kind, SampleKind::OffCpuEnd);
        assert_eq!((v.header.aux, v.header.ts_ns), (100, 150));
        assert_eq!(
            v.stack().len() + v.kernel_frames().len() + v.python_frames().len(),
            0
        );
        // An end record with a body, or claiming frames, does not add up.
        let long = record(h, &[], &[], &[]);
        assert!(matches!(
            decode_sample(&long),
            Err(SampleError::Length { .. })
        ));
        let mut lying = bytes.clone();
        lying[std::mem::offset_of!(SampleHeader, kernel_frames)] = 1;
        assert!(matches!(
            decode_sample(&lying),
            Err(SampleError::Length { .. })
        ));
    }

    #[test]
    fn rejects_truncated_records() {
        let bytes = record(
            cpu_header(1, 1, 256),
            &[1],
            &[PyFrame::default()],
            &[7; 256],
        );
        for cut in [0, 1, SAMPLE_HEADER_LEN - 1] {
            assert_eq!(decode_sample(&bytes[..cut]), Err(SampleError::Short(cut)));
        }
        for cut in [
            SAMPLE_HEADER_LEN,
            SAMPLE_FIXED_LEN - 1,
            SAMPLE_FIXED_LEN + 255,
        ] {
            assert_eq!(
                decode_sample(&bytes[..cut]),
                Err(SampleError::Length {
                    len: cut,
                    expected: SAMPLE_FIXED_LEN + 256
                })
            );
        }
    }

    #[test]
    fn rejects_lengths_that_lie() {
        // The header claims more stack than the record carries, and less.
        let mut h = cpu_header(0, 0, 512);
        let bytes = record(h, &[], &[], &[0; 256]);
        assert!(matches!(
            decode_sample(&bytes),
            Err(SampleError::Length { .. })
        ));
        h.user_stack_len = 128;
        let bytes = record(h, &[], &[], &[0; 256]);
        assert!(matches!(
            decode_sample(&bytes),
            Err(SampleError::Length { .. })
        ));
        // Counts beyond the ABI's arrays.
        let cases = [
            cpu_header(MAX_KERNEL_FRAMES + 1, 0, 0),
            cpu_header(0, MAX_PY_FRAMES + 1, 0),
            cpu_header(0, 0, MAX_STACK_BYTES + 8),
        ];
        for h in cases {
            let bytes = record(h, &[], &[], &[]);
            assert!(
                matches!(decode_sample(&bytes), Err(SampleError::TooMany { .. })),
                "{h:?}"
            );
        }
    }

    #[test]
    fn rejects_unknown_kinds_and_flags() {
        for kind in [0u8, 5, 0xff] {
            let mut h = cpu_header(0, 0, 0);
            h.kind = kind;
            assert_eq!(
                decode_sample(&record(h, &[], &[], &[])).unwrap_err(),
                SampleError::UnknownKind(kind)
            );
        }
        let mut h = cpu_header(0, 0, 0);
        h.flags = 0x80 | sf::IN_KERNEL;
        assert_eq!(
            decode_sample(&record(h, &[], &[], &[])).unwrap_err(),
            SampleError::UnknownFlags(0x80)
        );
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            if let Ok(v) = decode_sample(&bytes) {
                // Whatever was accepted is internally consistent.
                proptest::prop_assert!(v.stack().len() <= MAX_STACK_BYTES);
                proptest::prop_assert_eq!(v.kernel_frames().len(), v.header.kernel_frames as usize);
                proptest::prop_assert_eq!(v.python_frames().len(), v.header.py_frames as usize);
            }
        }

        #[test]
        fn stack_records_of_any_size_round_trip(len in 0usize..=MAX_STACK_BYTES / 8, k in 0usize..=MAX_KERNEL_FRAMES, p in 0usize..=MAX_PY_FRAMES) {
            let stack: Vec<u8> = (0..len * 8).map(|i| i as u8).collect();
            let kernel: Vec<u64> = (0..k as u64).collect();
            let python: Vec<PyFrame> = (0..p as u64).map(|i| PyFrame { code: i, instr: !i }).collect();
            let bytes = record(cpu_header(k, p, stack.len()), &kernel, &python, &stack);
            let v = decode_sample(&bytes).unwrap();
            proptest::prop_assert_eq!(v.stack(), &stack[..]);
            proptest::prop_assert_eq!(v.kernel_frames().collect::<Vec<_>>(), kernel);
            proptest::prop_assert_eq!(v.python_frames().collect::<Vec<_>>(), python);
        }
    }

    #[test]
    fn raw_switch_offsets_from_btf() {
        use super::btf::tests::Builder;
        // struct task_struct { unsigned int __state; ...; int exit_state; pid_t pid; } and the
        // tracepoint typedef with `args` arguments after __data.
        let build = |state: (&str, u32), pid_bits: u32, args: Option<usize>| {
            let mut b = Builder::new();
            let int = b.int("int", 4);
            let long = b.int("long", 8);
            let pid_t = b.add("pid_t", 8, 0, false, int, &[]);
            let st = if state.1 == 8 { long } else { int };
            let task = b.strukt(
                4,
                "task_struct",
                64,
                true,
                &[
                    (state.0, st, 64, 0),
                    ("exit_state", int, 256, 0),
                    ("pid", pid_t, 288, pid_bits),
                ],
            );
            if let Some(n) = args {
                let tp = b.add("", 2, 0, false, task, &[]);
                let mut tail = vec![0, 0];
                for _ in 0..n {
                    tail.extend_from_slice(&[0, tp]);
                }
                let proto = b.add("", 13, n as u32 + 1, false, 0, &tail);
                let pp = b.add("", 2, 0, false, proto, &[]);
                b.add("btf_trace_sched_switch", 8, 0, false, pp, &[]);
            }
            Btf::parse(&b.build()).unwrap()
        };
        let o = RawSwitchOffsets::from_btf(&build(("__state", 4), 0, Some(4)), None).unwrap();
        assert_eq!(
            o,
            RawSwitchOffsets {
                pid: 36,
                state: 8,
                exit_state: 32,
                state_arg: true
            }
        );
        // Before 5.18: three arguments; before 5.14: an 8-byte `state`.
        let o = RawSwitchOffsets::from_btf(&build(("state", 8), 0, Some(3)), None).unwrap();
        assert_eq!((o.state, o.state_arg), (8, false));
        // No typedef: the release decides.
        let btf = build(("__state", 4), 0, None);
        assert!(
            RawSwitchOffsets::from_btf(&btf, Some((5, 18)))
                .unwrap()
                .state_arg
        );
        assert!(
            !RawSwitchOffsets::from_btf(&btf, Some((5, 17)))
                .unwrap()
                .state_arg
        );
        assert!(RawSwitchOffsets::from_btf(&btf, None).is_err());
        // What the program could not read right is refused.
        let e = RawSwitchOffsets::from_btf(&build(("__state", 4), 3, Some(4)), None).unwrap_err();
        assert!(e.to_string().contains("bitfield"), "{e}");
        let e = RawSwitchOffsets::from_btf(&build(("status", 4), 0, Some(4)), None).unwrap_err();
        assert!(e.to_string().contains("__state or state"), "{e}");
        let e = RawSwitchOffsets::from_btf(&build(("__state", 4), 0, Some(5)), None).unwrap_err();
        assert!(e.to_string().contains("5 arguments"), "{e}");
    }

    #[test]
    fn raw_switch_offsets_of_this_kernel() {
        if !std::path::Path::new(super::btf::VMLINUX).exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "no kernel BTF"
            );
            eprintln!(
                "SKIP raw_switch_offsets_of_this_kernel: no {}",
                super::btf::VMLINUX
            );
            return;
        }
        let o = RawSwitchOffsets::read(&Btf::vmlinux().map_err(|e| e.to_string())).unwrap();
        // The state is the first field after thread_info; pid and tgid sit far later.
        assert!(
            o.state < 64 && o.pid > o.state && o.exit_state < o.pid,
            "{o:?}"
        );
        assert_eq!(o.state_arg, kernel_release().unwrap() >= (5, 18));
    }

    #[test]
    fn kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_release("6.1"), Some((6, 1)));
        assert_eq!(parse_release("garbage"), None);
        assert_eq!(parse_release(""), None);
    }

    #[test]
    fn switch_format_offsets() {
        let format = "name: sched_switch\nID: 316\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:int prev_prio;\toffset:28;\tsize:4;\tsigned:1;\n\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;\n\tfield:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;\n\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;\n";
        assert_eq!(
            SwitchOffsets::parse(format),
            Some(SwitchOffsets {
                prev_pid: 24,
                prev_state: 32,
                next_pid: 56
            })
        );
        assert_eq!(
            SwitchOffsets::parse("field:pid_t prev_pid;\toffset:24;"),
            None
        );
    }

    fn py311() -> PyProc {
        PyProc {
            interp: 0x1000,
            code_type: 0,
            offsets: PyOffsets {
                interp_threads_head: 16,
                tstate_next: 8,
                tstate_native_thread_id: 152,
                tstate_frame: 56,
                cframe_current_frame: 8,
                frame_code: 32,
                frame_previous: 48,
                frame_instr: 56,
                frame_owner: 69,
                frame_is_entry: 68,
                object_type: 8,
                pthread_tid: PY_OFFSET_NONE,
                _pad: [0; 4],
            },
            version: 0x030b,
            owner_cstack: 0xff,
            _pad0: 0,
            flags: 0,
        }
    }

    #[test]
    fn python_layouts_are_checked_like_the_kernel_does() {
        check_py_proc(&py311()).unwrap();
        let mut p = py311();
        p.offsets.frame_previous = 50;
        assert!(check_py_proc(&p)
            .unwrap_err()
            .to_string()
            .contains("aligned"));
        let mut p = py311();
        p.offsets.frame_owner = 200;
        assert!(check_py_proc(&p)
            .unwrap_err()
            .to_string()
            .contains("window"));
        let mut p = py311();
        p.offsets.tstate_next = PY_OFFSET_NONE;
        assert!(check_py_proc(&p).is_err());
        let mut p = py311();
        p.interp = 0;
        assert!(check_py_proc(&p).is_err());
        let mut p = py311();
        p.version = 0x0309;
        assert!(check_py_proc(&p).unwrap_err().to_string().contains("3.9"));
        // 3.10: f_lasti is a 4-byte int, 4-aligned is enough.
        let mut p = py311();
        p.flags = py_flags::LASTI_IS_INT;
        p.offsets.frame_instr = 100;
        p.offsets.frame_owner = PY_OFFSET_NONE;
        p.offsets.frame_is_entry = PY_OFFSET_NONE;
        check_py_proc(&p).unwrap();
        // 3.10 threads are told apart through struct pthread: its tid offset is required.
        p.flags |= py_flags::THREAD_ID_IS_PTHREAD;
        assert!(check_py_proc(&p)
            .unwrap_err()
            .to_string()
            .contains("pthread_tid"));
        p.offsets.pthread_tid = 722;
        assert!(check_py_proc(&p)
            .unwrap_err()
            .to_string()
            .contains("aligned"));
        p.offsets.pthread_tid = 720;
        check_py_proc(&p).unwrap();
    }

    #[test]
    fn scratch_memory_per_cpu() {
        // Three arrays of one 72600-byte Scratch per CPU.
        assert_eq!(scratch_bytes(1), 3 * 72600);
        assert_eq!(scratch_bytes(64), 64 * 3 * 72600);
    }
}
