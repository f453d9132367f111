//! Stack sampling for the continuous profiler (ABI: `infertap_common::profile`).
//!
//! Three sources, one capture path:
//! - `profile_cpu`: a `cpu-clock` perf event on every CPU. A sample of a traced thread (its tgid
//!   in `TARGETS`) records its user registers, the user stack from `sp` upward, the kernel stack
//!   when the timer hit kernel mode, and the Python frames when the process is a known CPython.
//! - `on_switch_raw` (raw tracepoint) or `on_sched_switch` (classic tracepoint), one of them
//!   loaded: off-CPU time. A traced thread's switch-out is remembered by tid; its switch-in adds
//!   the period to per-process totals (every switch), and 1 in `OFFCPU_SAMPLE_EVERY` switch-outs
//!   is captured with its stack and closed by an `OFFCPU_END` record. The raw hook spares every
//!   context switch of the machine the trace record the classic one is handed (on the test VM
//!   ≈ 100 ns of the ≈ 300 ns the classic hook adds to a switch: `switch_hook_cost_raw_vs_classic`).
//! - CUDA launches: `cuda::cuda_enter` calls [`launch_sample`] for 1 in `LAUNCH_SAMPLE_EVERY`
//!   launches.
//!
//! Native unwinding happens in user space from the copied stack (DWARF CFI): the kernel only
//! copies memory. The Python walk must happen here, because frames are gone by the time user
//! space could read them; it follows the per-version field offsets user space put in `PY_PROCS`
//! and validates the cached thread state on every use. A thread state is the sampled thread's
//! when its `native_thread_id` is the tid (3.11+), or (3.10, which records only a `pthread_t`)
//! when the `tid` of the glibc `struct pthread` its `thread_id` points at is (offset
//! `PyOffsets::pthread_tid`, from glibc's own debugger descriptor): no kernel structure is read.
//!
//! Untraced processes pay one `TARGETS` lookup per timer tick and, on `sched_switch`, that lookup
//! on the switch-out side and one `OFFCPU_START` lookup on the switch-in side (the raw hook first
//! reads next's tid from its `task_struct`).
//!
//! The launch sampler's scratch record is guarded by a per-CPU busy flag (`LAUNCH_BUSY`): a
//! uprobe program is preemptible, so two launches on one CPU could otherwise interleave in one
//! record.
//!
//! The user stack copy is up to `MAX_STACK_BYTES` (64 KiB); a thread whose stack mapping user
//! space registered in `STACK_TOPS` is copied only from `sp` to its top, so a shallow stack
//! costs what it holds. A traced thread's exit (`sched_process_exit`) drops its `STACK_TOPS`
//! and `PY_THREADS` entries.

use core::{ffi::c_void, intrinsics::AtomicOrdering};

use aya_ebpf::{
    bindings::{
        bpf_perf_event_data, pt_regs, BPF_F_SKIP_FIELD_MASK, BPF_NOEXIST, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP,
    },
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated as gen},
    macros::{map, perf_event, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap, RingBuf},
    programs::{PerfEventContext, ProbeContext, RawTracePointContext, TracePointContext},
    EbpfContext,
};
use infertap_common::{
    counter,
    profile::{
        offcpu_start, profile_control as ctl, py_flags, reported_switch_state, sample_flags as sf,
        sample_kind, switch_state, OffCpuStart, OffCpuTotals, PyFrame, PyProc, SampleHeader,
        SampleRecord, StackTop, MAX_KERNEL_FRAMES, MAX_PY_FRAMES, MAX_PY_THREADS, MAX_STACK_BYTES,
        MAX_STACK_TOPS, PY_FRAME_ENTRY, PY_FRAME_WINDOW_BYTES, PY_OFFSET_NONE, SAMPLE_FIXED_LEN,
        SAMPLE_HEADER_LEN,
    },
};

use crate::sockets::{bump, is_target};

// ---- configuration, written by user space before load ----------------------------------------

/// Unread bytes in `SAMPLES` above which a record wakes the consumer (it polls otherwise).
#[unsafe(no_mangle)]
static SAMPLE_WAKEUP_BYTES: u64 = 4 << 20;
/// Offsets of `prev_pid`, `prev_state` and `next_pid` in the sched_switch tracepoint record,
/// from the tracepoint's format file.
#[unsafe(no_mangle)]
static SWITCH_PREV_PID_OFFSET: u32 = 24;
#[unsafe(no_mangle)]
static SWITCH_PREV_STATE_OFFSET: u32 = 32;
#[unsafe(no_mangle)]
static SWITCH_NEXT_PID_OFFSET: u32 = 56;
/// Raw tracepoint: offsets in `struct task_struct` of `pid` (the tid), of `__state` (`state`
/// before 5.14) and of `exit_state`, from the kernel's BTF. Placeholders until user space sets
/// them: it loads `on_switch_raw` only when it found all three.
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TASK_STATE_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TASK_EXIT_STATE_OFFSET: u32 = 0;
/// 1: the raw tracepoint passes prev's state as its fourth argument (5.18+); 0: read it from
/// prev's `task_struct`.
#[unsafe(no_mangle)]
static SWITCH_STATE_ARG: u32 = 1;
/// Kernel frames of the raw tracepoint's own call path to skip in a capture's kernel stack (the
/// program and `bpf_trace_run4`; `__bpf_trace_sched_switch` tail-calls the latter and leaves no
/// frame), so it starts in `__schedule` as the classic tracepoint's does. Set by user space.
#[unsafe(no_mangle)]
static SWITCH_RAW_STACK_SKIP: u32 = 0;

#[inline(always)]
fn config<T: Copy>(v: &T) -> T {
    // SAFETY: reading a plain global; volatile so the loader's rewritten value is used.
    unsafe { core::ptr::read_volatile(v) }
}

// ---- maps ------------------------------------------------------------------------------------

/// Run-time controls (`profile_control`), written by user space.
#[map]
static PROFILE_CONTROL: Array<u32> = Array::with_max_entries(ctl::COUNT, 0);

/// Stack samples (`SampleHeader` first). Its size is set by user space at load.
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Known CPython processes (tgid → where the interpreter is and how to walk it).
#[map]
static PY_PROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(4096, 0);

/// `pid_tgid` → the thread's `PyThreadState*`, found by walking the interpreter's thread list
/// and re-validated (its thread id is still this tid) on every use.
#[map]
static PY_THREADS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// `pid_tgid` → the mapping holding the thread's stack, written by user space from
/// `/proc/<pid>/maps`; bounds the stack copy of a `sp` inside it. Dropped when the thread exits.
#[map]
static STACK_TOPS: LruHashMap<u64, StackTop> = LruHashMap::with_max_entries(MAX_STACK_TOPS, 0);

/// tid → its current off-CPU period (`ts_ns` 0: none, the thread is on a CPU). One entry per
/// traced thread that has switched, written in place; dropped when the thread exits.
#[map]
static OFFCPU_START: LruHashMap<u32, OffCpuStart> = LruHashMap::with_max_entries(65536, 0);

/// tgid → off-CPU totals (per CPU; user space sums).
#[map]
static OFFCPU_TOTALS: PerCpuHashMap<u32, OffCpuTotals> = PerCpuHashMap::with_max_entries(8192, 0);

/// x86-64 page size: the stack copy goes page by page so a copy that runs past the top of the
/// stack mapping keeps the pages it could read.
const PAGE: u64 = 4096;
/// Bytes of a frame read in one go by the Python walker (every field it needs lies in them).
const WINDOW_WORDS: usize = PY_FRAME_WINDOW_BYTES / 8;
const WINDOW_BYTES: u64 = PY_FRAME_WINDOW_BYTES as u64;

/// One sample under construction, per CPU and program type.
#[repr(C)]
pub(crate) struct Scratch {
    rec: SampleRecord,
    /// Lets a page-sized copy start anywhere below `MAX_STACK_BYTES` as far as the verifier can
    /// tell (the copy itself never goes past `user_stack_len`).
    _slack: [u8; PAGE as usize],
    /// The start of the Python frame being read: `WINDOW_BYTES` used, doubled so a read length
    /// masked with `2 * WINDOW_BYTES - 1` stays inside.
    window: [u64; 2 * WINDOW_WORDS],
    walk: PyWalk,
}

// `infertap::probes::profile::scratch_bytes` reports this size as the agent's kernel memory.
const _: () = assert!(
    core::mem::size_of::<Scratch>()
        == core::mem::size_of::<SampleRecord>()
            + PAGE as usize
            + 2 * PY_FRAME_WINDOW_BYTES
            + core::mem::size_of::<PyProc>()
            + 24
);

/// The Python walker's state, kept in the scratch map value rather than in registers (see `v`).
#[repr(C)]
struct PyWalk {
    proc_: PyProc,
    /// Bytes of each frame read (`frame_window`).
    wlen: u64,
    /// Frames stored so far.
    n: u64,
    /// `sample_flags` bits found by the walk.
    flags: u64,
}

/// Per program type, so a program that interrupts another never shares its buffer; one entry
/// per possible CPU (user space sets the size at load), indexed by the current CPU. Plain
/// arrays, not per-CPU ones: a per-CPU value is limited to 32 KiB (`PCPU_MIN_UNIT_SIZE`) and a
/// `Scratch` holds a 64 KiB stack.
#[map]
static SCRATCH_CPU: Array<Scratch> = Array::with_max_entries(1, 0);
#[map]
static SCRATCH_SWITCH: Array<Scratch> = Array::with_max_entries(1, 0);
#[map]
static SCRATCH_LAUNCH: Array<Scratch> = Array::with_max_entries(1, 0);

/// This CPU's entry of a scratch array.
#[inline(always)]
fn scratch(map: &'static Array<Scratch>) -> Option<&'static mut Scratch> {
    // SAFETY: helper without arguments.
    let cpu = unsafe { gen::bpf_get_smp_processor_id() };
    // SAFETY: this CPU's entry, used by one program type only. Perf-event and tracepoint
    // programs never nest with themselves on a CPU and are not preempted. A launch uprobe is
    // preemptible (it runs with migration, not preemption, disabled): it takes the entry
    // through `LAUNCH_BUSY` first.
    map.get_ptr_mut(cpu).map(|p| unsafe { &mut *p })
}

/// Per CPU (user space sets the size at load): 1 while a launch sample is being assembled in
/// the CPU's `SCRATCH_LAUNCH` entry. A uprobe program can be preempted on a preemptible kernel
/// (`preempt=full`, `lazy`, RT) and another thread's launch can then run on the same CPU; it
/// finds the flag taken and skips its sample (`counter::SAMPLE_BUSY`) instead of writing into a
/// record that is half built.
#[map]
static LAUNCH_BUSY: Array<u64> = Array::with_max_entries(1, 0);

/// Takes this CPU's `LAUNCH_BUSY` flag (compare-and-swap 0 → 1, `BPF_ATOMIC_CMPXCHG`): `None`
/// when another launch holds it. The caller clears it with [`release`] on every path. The
/// contender can only be a task on this same CPU (the program runs with migration disabled),
/// and a BPF program always runs to completion, so a taken flag is always released.
#[inline(always)]
fn take_launch_busy() -> Option<*mut u64> {
    // SAFETY: helper without arguments.
    let cpu = unsafe { gen::bpf_get_smp_processor_id() };
    let p = LAUNCH_BUSY.get_ptr_mut(cpu)?;
    // SAFETY: an 8-aligned u64 in a map value. (`core::sync::atomic` offers no compare-and-swap
    // on the BPF target; the intrinsic lowers to the instruction.)
    let (_, taken) = unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { AtomicOrdering::Acquire },
            { AtomicOrdering::Relaxed },
        >(p, 0, 1)
    };
    taken.then_some(p)
}

#[inline(always)]
fn release(flag: *mut u64) {
    // SAFETY: the flag taken by `take_launch_busy`; only this task can hold it now. An exchange
    // rather than a store: BPF has store-release only from cpu v4 (kernel 6.15).
    unsafe { core::intrinsics::atomic_xchg::<u64, { AtomicOrdering::Release }>(flag, 0) };
}

#[inline(always)]
pub(crate) fn control(index: u32) -> u32 {
    PROFILE_CONTROL.get(index).copied().unwrap_or(0)
}

/// True for 1 in `every` calls (never for 0).
#[inline(always)]
pub(crate) fn one_in(every: u32) -> bool {
    if every == 0 {
        return false;
    }
    // SAFETY: helper without arguments.
    every == 1 || unsafe { gen::bpf_get_prandom_u32() } % every == 0
}

/// User-mode registers of the sampled thread.
#[derive(Clone, Copy)]
struct UserRegs {
    ip: u64,
    sp: u64,
    bp: u64,
}

#[inline(always)]
unsafe fn read_user_u32(addr: u64) -> Option<u32> {
    let mut v: u32 = 0;
    // SAFETY: fault-tolerant read into a local.
    let r = unsafe {
        gen::bpf_probe_read_user(&mut v as *mut u32 as *mut c_void, 4, addr as *const c_void)
    };
    if r == 0 {
        Some(v)
    } else {
        None
    }
}

#[inline(always)]
unsafe fn read_user_u64(addr: u64) -> Option<u64> {
    let mut v: u64 = 0;
    // SAFETY: fault-tolerant read into a local.
    let r = unsafe {
        gen::bpf_probe_read_user(&mut v as *mut u64 as *mut c_void, 8, addr as *const c_void)
    };
    if r == 0 {
        Some(v)
    } else {
        None
    }
}

/// The user registers saved at kernel entry (`task_pt_regs(current)`).
#[inline(always)]
fn task_user_regs() -> Option<UserRegs> {
    // SAFETY: helpers returning kernel pointers; fields read with fault-tolerant kernel reads.
    unsafe {
        let task = gen::bpf_get_current_task_btf();
        let regs = gen::bpf_task_pt_regs(task) as *const pt_regs;
        if regs.is_null() {
            return None;
        }
        // ip, cs, flags, sp are contiguous in x86-64 pt_regs.
        let tail: [u64; 4] =
            aya_ebpf::helpers::bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rip).cast())
                .ok()?;
        let bp: u64 =
            aya_ebpf::helpers::bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rbp)).ok()?;
        Some(UserRegs {
            ip: tail[0],
            sp: tail[3],
            bp,
        })
    }
}

/// Starts a record in `s`: header filled, no frames, no stack.
#[inline(always)]
fn begin(s: &mut Scratch, pid_tgid: u64, now: u64, kind: u8, regs: UserRegs) {
    s.rec.header = SampleHeader {
        ts_ns: now,
        pid_tgid,
        ip: regs.ip,
        sp: regs.sp,
        bp: regs.bp,
        aux: 0,
        aux2: 0,
        user_stack_len: 0,
        kernel_frames: 0,
        py_frames: 0,
        // SAFETY: helper without arguments.
        cpu: unsafe { gen::bpf_get_smp_processor_id() } as u16,
        kind,
        flags: 0,
        _pad: 0,
    };
}

/// Kernel stack of the current context into the record (`ctx`: the program's context).
#[inline(always)]
fn kernel_stack(s: &mut Scratch, ctx: *mut c_void) {
    kernel_stack_skip(s, ctx, 0);
}

/// [`kernel_stack`] without its `skip` innermost frames.
#[inline(always)]
fn kernel_stack_skip(s: &mut Scratch, ctx: *mut c_void, skip: u32) {
    // SAFETY: the buffer is the record's kernel array, of exactly the size passed.
    let r = unsafe {
        gen::bpf_get_stack(
            ctx,
            s.rec.kernel.as_mut_ptr() as *mut c_void,
            (MAX_KERNEL_FRAMES * 8) as u32,
            (skip & BPF_F_SKIP_FIELD_MASK) as u64,
        )
    };
    if r > 0 {
        s.rec.header.kernel_frames = (r as u64 / 8) as u16;
    }
}

/// Copies up to `STACK_BYTES` of user stack from `sp` upward, and no further than the thread's
/// stack top when its `STACK_TOPS` entry holds `sp` (`STACK_TO_TOP`), one page at a time: a
/// copy that reaches unreadable memory (the top of the stack mapping) keeps what came before it
/// and sets `STACK_SHORT`.
#[inline(always)]
fn copy_stack(s: &mut Scratch, pid_tgid: u64, sp: u64) {
    let mut want = control(ctl::STACK_BYTES) as u64;
    if want > MAX_STACK_BYTES as u64 {
        want = MAX_STACK_BYTES as u64;
    }
    want &= !7;
    // SAFETY: value copied out immediately.
    if let Some(t) = unsafe { STACK_TOPS.get(&pid_tgid) }.copied() {
        if t.low <= sp && sp < t.top && t.top - sp <= want {
            want = t.top - sp;
            s.rec.header.flags |= sf::STACK_TO_TOP;
        }
    }
    // Through memory, so the verifier walks the copy (and everything after it) once, not once
    // per way of choosing its length; `user_stack_len` gets its real value below.
    set(&mut s.rec.header.user_stack_len, want as u32);
    let want = v(&s.rec.header.user_stack_len) as u64 & (2 * MAX_STACK_BYTES as u64 - 1);
    let want = if want > MAX_STACK_BYTES as u64 {
        MAX_STACK_BYTES as u64
    } else {
        want
    };
    let base = s.rec.stack.as_mut_ptr();
    let mut off: u64 = 0;
    let mut i = 0;
    // A copy of MAX_STACK_BYTES from an unaligned sp touches MAX_STACK_BYTES / PAGE + 1 pages.
    while i < MAX_STACK_BYTES as u64 / PAGE + 1 {
        if off >= want {
            break;
        }
        let addr = sp.wrapping_add(off);
        let to_page_end = PAGE - (addr & (PAGE - 1));
        let rest = want - off;
        let n = if to_page_end < rest {
            to_page_end
        } else {
            rest
        };
        let dst = (off as usize) & (MAX_STACK_BYTES - 1);
        // SAFETY: dst < MAX_STACK_BYTES and n ≤ PAGE: the write stays inside `stack` + `_slack`.
        let r = unsafe {
            gen::bpf_probe_read_user(
                base.add(dst) as *mut c_void,
                n as u32,
                addr as *const c_void,
            )
        };
        if r != 0 {
            break;
        }
        off += n;
        i += 1;
    }
    if off < want {
        s.rec.header.flags |= sf::STACK_SHORT;
    }
    s.rec.header.user_stack_len = off as u32;
}

// ---- Python ----------------------------------------------------------------------------------

#[inline(always)]
fn word(w: &[u64; 2 * WINDOW_WORDS], off: u16) -> u64 {
    // SAFETY: the index is masked into the window.
    unsafe { *w.get_unchecked(((off >> 3) as usize) & (WINDOW_WORDS - 1)) }
}

#[inline(always)]
fn byte(w: &[u64; 2 * WINDOW_WORDS], off: u16) -> u8 {
    (word(w, off) >> ((off & 7) * 8)) as u8
}

#[inline(always)]
fn int32(w: &[u64; 2 * WINDOW_WORDS], off: u16) -> i32 {
    (word(w, off) >> ((off & 4) * 8)) as u32 as i32
}

/// Bytes of the frame the walker must read to see every field it uses, or `None` when an
/// offset is misaligned or lies outside the window (a bad `PyProc`).
#[inline(always)]
fn frame_window(p: &PyProc) -> Option<u64> {
    let o = &p.offsets;
    if o.frame_code & 7 != 0 || o.frame_previous & 7 != 0 {
        return None;
    }
    let mut end = max(o.frame_code as u64, o.frame_previous as u64) + 8;
    if p.flags & py_flags::LASTI_IS_INT != 0 {
        if o.frame_instr & 3 != 0 {
            return None;
        }
        end = max(end, o.frame_instr as u64 + 4);
    } else {
        if o.frame_instr & 7 != 0 {
            return None;
        }
        end = max(end, o.frame_instr as u64 + 8);
    }
    if o.frame_owner != PY_OFFSET_NONE {
        end = max(end, o.frame_owner as u64 + 1);
    }
    if o.frame_is_entry != PY_OFFSET_NONE {
        end = max(end, o.frame_is_entry as u64 + 1);
    }
    if end > WINDOW_BYTES {
        return None;
    }
    Some(end)
}

#[inline(always)]
fn max(a: u64, b: u64) -> u64 {
    if a > b {
        a
    } else {
        b
    }
}

/// Volatile read of walker state kept in the scratch map value. The verifier sees every such
/// load as an unknown value, so the paths through one frame (stored, skipped) end in equal
/// states and are pruned instead of multiplying over the bounded loop's iterations; plain loads
/// would let the compiler keep the values in registers the verifier tracks exactly.
#[inline(always)]
fn v<T: Copy>(p: &T) -> T {
    // SAFETY: a reference is valid for reads.
    unsafe { core::ptr::read_volatile(p) }
}

#[inline(always)]
fn set<T: Copy>(p: &mut T, value: T) {
    // SAFETY: a mutable reference is valid for writes.
    unsafe { core::ptr::write_volatile(p, value) }
}

/// The kernel tid a thread state belongs to: `native_thread_id` (3.11+), or with
/// `THREAD_ID_IS_PTHREAD` (3.10) the `tid` in the `struct pthread` its `thread_id` points at.
/// `Err(())`: the thread state itself is unreadable; `Ok(None)`: its `struct pthread` is (the
/// thread exited), which matches no thread.
#[inline(always)]
fn tstate_tid(walk: &PyWalk, tstate: u64) -> Result<Option<u64>, ()> {
    let off = v(&walk.proc_.offsets.tstate_native_thread_id) as u64;
    // SAFETY: fault-tolerant reads of the target's memory.
    let Some(id) = (unsafe { read_user_u64(tstate + off) }) else {
        return Err(());
    };
    if v(&walk.proc_.flags) & py_flags::THREAD_ID_IS_PTHREAD == 0 {
        return Ok(Some(id));
    }
    let tid_off = v(&walk.proc_.offsets.pthread_tid) as u64;
    Ok(unsafe { read_user_u32(id + tid_off) }.map(u64::from))
}

/// Whether `tstate` is the thread state of kernel thread `tid`.
#[inline(always)]
fn tstate_is(walk: &PyWalk, tstate: u64, tid: u32) -> bool {
    matches!(tstate_tid(walk, tstate), Ok(Some(id)) if id == tid as u64)
}

/// The sampled thread's `PyThreadState*`: the cached one if it still belongs to this thread,
/// else the one found on the interpreter's thread list. `Err` carries the flags to set.
#[inline(always)]
fn thread_state(walk: &PyWalk, pid_tgid: u64) -> Result<u64, u8> {
    let tid = pid_tgid as u32;
    // SAFETY: value copied out immediately.
    if let Some(t) = unsafe { PY_THREADS.get(&pid_tgid) }.copied() {
        if tstate_is(walk, t, tid) {
            return Ok(t);
        }
        let _ = PY_THREADS.remove(&pid_tgid);
    }
    let head = v(&walk.proc_.interp) + v(&walk.proc_.offsets.interp_threads_head) as u64;
    // SAFETY: fault-tolerant reads of the target's memory.
    let Some(mut t) = (unsafe { read_user_u64(head) }) else {
        return Err(sf::PY_NO_THREAD | sf::PY_ERROR);
    };
    let mut i = 0;
    while i < MAX_PY_THREADS {
        if t == 0 {
            return Err(sf::PY_NO_THREAD);
        }
        let Ok(id) = tstate_tid(walk, t) else {
            return Err(sf::PY_NO_THREAD | sf::PY_ERROR);
        };
        if id == Some(tid as u64) {
            if PY_THREADS.insert(&pid_tgid, &t, 0).is_err() {
                bump(counter::PROFILE_MAP_FULL);
            }
            return Ok(t);
        }
        let next_off = v(&walk.proc_.offsets.tstate_next) as u64;
        let Some(next) = (unsafe { read_user_u64(t + next_off) }) else {
            return Err(sf::PY_NO_THREAD | sf::PY_ERROR);
        };
        t = next;
        i += 1;
    }
    // More threads than we walk: the search did not finish.
    Err(sf::PY_NO_THREAD | sf::PY_ERROR)
}

/// Frames visited per walk: every stored frame plus C-stack shim frames (3.12+) and non-code
/// frames (3.13+), which are skipped.
const MAX_PY_VISITS: usize = MAX_PY_FRAMES + MAX_PY_FRAMES / 4;

/// Walks the sampled thread's Python frames, innermost first, into the record.
#[inline(always)]
fn walk_python(s: &mut Scratch, pid_tgid: u64) {
    let tgid = (pid_tgid >> 32) as u32;
    let Some(p) = PY_PROCS.get_ptr(&tgid) else {
        return;
    };
    // SAFETY: a map value; copied into the scratch at once.
    s.walk.proc_ = unsafe { *p };
    let Some(wlen) = frame_window(&s.walk.proc_) else {
        s.rec.header.flags |= sf::PY_ERROR;
        return;
    };
    if s.walk.proc_.flags & py_flags::THREAD_ID_IS_PTHREAD != 0
        && s.walk.proc_.offsets.pthread_tid == PY_OFFSET_NONE
    {
        // No way to tell its threads apart.
        s.rec.header.flags |= sf::PY_ERROR | sf::PY_NO_THREAD;
        return;
    }
    set(&mut s.walk.wlen, wlen);
    set(&mut s.walk.n, 0);
    set(&mut s.walk.flags, 0);
    let tstate = match thread_state(&s.walk, pid_tgid) {
        Ok(t) => t,
        Err(flags) => {
            s.rec.header.flags |= flags;
            return;
        }
    };
    let frame_off = v(&s.walk.proc_.offsets.tstate_frame) as u64;
    // SAFETY: fault-tolerant reads of the target's memory.
    let Some(mut frame) = (unsafe { read_user_u64(tstate + frame_off) }) else {
        s.rec.header.flags |= sf::PY_ERROR;
        return;
    };
    let cframe_off = v(&s.walk.proc_.offsets.cframe_current_frame);
    if cframe_off != PY_OFFSET_NONE && frame != 0 {
        match unsafe { read_user_u64(frame + cframe_off as u64) } {
            Some(f) => frame = f,
            None => {
                s.rec.header.flags |= sf::PY_ERROR;
                return;
            }
        }
    }
    let mut i = 0;
    while i < MAX_PY_VISITS {
        if frame == 0 {
            break;
        }
        match py_frame(s, frame) {
            Some(previous) => frame = previous,
            None => break,
        }
        i += 1;
    }
    let mut flags = v(&s.walk.flags) as u8;
    if i >= MAX_PY_VISITS && frame != 0 {
        flags |= sf::PY_TRUNCATED;
    }
    s.rec.header.py_frames = (v(&s.walk.n) as usize & (2 * MAX_PY_FRAMES - 1)) as u16;
    s.rec.header.flags |= flags;
}

#[inline(always)]
fn walk_flag(s: &mut Scratch, flag: u8) {
    let f = v(&s.walk.flags) | flag as u64;
    set(&mut s.walk.flags, f);
}

/// Reads one frame at `frame`: stores it (or, for a shim, marks the frame stored before it as
/// its invocation's entry) and returns the next outer frame, or `None` to stop (flags set).
#[inline(always)]
fn py_frame(s: &mut Scratch, frame: u64) -> Option<u64> {
    let n = v(&s.walk.n) as usize;
    if n >= MAX_PY_FRAMES {
        walk_flag(s, sf::PY_TRUNCATED);
        return None;
    }
    let wlen = v(&s.walk.wlen) & (2 * WINDOW_BYTES - 1);
    // SAFETY: wlen < 2 * WINDOW_BYTES, the window's size.
    let r = unsafe {
        gen::bpf_probe_read_user(
            s.window.as_mut_ptr() as *mut c_void,
            wlen as u32,
            frame as *const c_void,
        )
    };
    if r != 0 {
        walk_flag(s, sf::PY_ERROR);
        return None;
    }
    let o = &s.walk.proc_.offsets;
    let w = &s.window;
    let code = word(w, v(&o.frame_code));
    let previous = word(w, v(&o.frame_previous));
    let owner_off = v(&o.frame_owner);
    if owner_off != PY_OFFSET_NONE && byte(w, owner_off) == v(&s.walk.proc_.owner_cstack) {
        // The C stack's entry shim: the frame stored last was its invocation's outermost.
        if n > 0 {
            let last = (n - 1) & (MAX_PY_FRAMES - 1);
            s.rec.python[last].code |= PY_FRAME_ENTRY;
        }
        return Some(previous);
    }
    if code == 0 {
        walk_flag(s, sf::PY_ERROR);
        return None;
    }
    let instr_off = v(&o.frame_instr);
    let instr = if v(&s.walk.proc_.flags) & py_flags::LASTI_IS_INT != 0 {
        int32(w, instr_off) as i64 as u64
    } else {
        word(w, instr_off)
    };
    let entry_off = v(&o.frame_is_entry);
    // 3.10: every frame is its own eval-loop invocation; 3.11: `is_entry`.
    let entry = v(&s.walk.proc_.version) < 0x030b
        || (entry_off != PY_OFFSET_NONE && byte(w, entry_off) != 0);
    let code_type = v(&s.walk.proc_.code_type);
    if code_type != 0 {
        // 3.13+: f_executable may be something other than a code object.
        let type_off = v(&o.object_type) as u64;
        match unsafe { read_user_u64(code + type_off) } {
            Some(t) if t == code_type => {}
            Some(_) => return Some(previous),
            None => {
                walk_flag(s, sf::PY_ERROR);
                return None;
            }
        }
    }
    s.rec.python[n & (MAX_PY_FRAMES - 1)] = PyFrame {
        code: if entry { code | PY_FRAME_ENTRY } else { code },
        instr,
    };
    set(&mut s.walk.n, n as u64 + 1);
    Some(previous)
}

// ---- emitting --------------------------------------------------------------------------------

/// Samples are written without waking the consumer, which polls; only a ring filled past
/// `SAMPLE_WAKEUP_BYTES` wakes it.
#[inline(always)]
fn wakeup_flags() -> u64 {
    // BPF_RB_AVAIL_DATA = 0
    if SAMPLES.query(0) >= config(&SAMPLE_WAKEUP_BYTES) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Emits the fixed part and the copied stack. Returns whether the record made it.
#[inline(always)]
fn emit(s: &mut Scratch) -> bool {
    let mut stack = s.rec.header.user_stack_len as u64;
    if stack > MAX_STACK_BYTES as u64 {
        stack = MAX_STACK_BYTES as u64;
    }
    // SAFETY: SAMPLE_FIXED_LEN + stack ≤ size_of::<SampleRecord>().
    let r = unsafe {
        gen::bpf_ringbuf_output(
            &SAMPLES as *const RingBuf as *mut c_void,
            &mut s.rec as *mut SampleRecord as *mut c_void,
            SAMPLE_FIXED_LEN as u64 + stack,
            wakeup_flags(),
        )
    };
    if r < 0 {
        bump(counter::SAMPLE_RING_FULL);
        return false;
    }
    true
}

/// User stack and Python frames, then the record out.
///
/// A BPF subprogram rather than inlined: its only input is the scratch (header filled), so the
/// verifier walks it once per program instead of once per path that reached it (kernel or user
/// mode, preempted or blocked), and the copy and the walk are not multiplied by each other's
/// exits. Measured: `profile_cpu` 114 k and `on_sched_switch` 208 k verified instructions
/// inlined, ≈ 115 k each as a subprogram.
#[inline(never)]
fn finish(s: &mut Scratch) -> bool {
    let pid_tgid = v(&s.rec.header.pid_tgid);
    let sp = v(&s.rec.header.sp);
    copy_stack(s, pid_tgid, sp);
    walk_python(s, pid_tgid);
    emit(s)
}

// ---- on-CPU ----------------------------------------------------------------------------------

/// `cpu-clock` timer sample.
#[perf_event]
pub fn profile_cpu(ctx: PerfEventContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if tgid == 0 || !is_target(tgid) || control(ctl::CPU_ON) == 0 {
        return 0;
    }
    let Some(s) = scratch(&SCRATCH_CPU) else {
        bump(counter::SAMPLE_FAILED);
        return 0;
    };
    let data = ctx.ctx as *const bpf_perf_event_data;
    // SAFETY: loads of the context's saved registers at constant offsets.
    let (cs, ip, sp, bp) = unsafe {
        use core::ptr::{addr_of, read_volatile as rv};
        (
            rv(addr_of!((*data).regs.cs)),
            rv(addr_of!((*data).regs.rip)),
            rv(addr_of!((*data).regs.rsp)),
            rv(addr_of!((*data).regs.rbp)),
        )
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if cs & 3 != 0 {
        begin(s, id, now, sample_kind::CPU, UserRegs { ip, sp, bp });
    } else {
        let Some(regs) = task_user_regs() else {
            bump(counter::SAMPLE_FAILED);
            return 0;
        };
        begin(s, id, now, sample_kind::CPU, regs);
        s.rec.header.flags = sf::IN_KERNEL;
        kernel_stack(s, ctx.as_ptr());
    }
    finish(s);
    0
}

// ---- off-CPU ---------------------------------------------------------------------------------
//
// Two hooks on `sched_switch`, one loaded (user space picks): `on_switch_raw`, a raw tracepoint
// that gets the tracepoint's arguments (`preempt, prev, next[, prev_state]`) and reads the two
// `task_struct` fields it needs at offsets user space found in the kernel's BTF; and
// `on_sched_switch`, the classic tracepoint, whose trace record (comms, pids, priorities, the
// reported state) the kernel assembles before every call. Both reduce a switch to the same
// three facts (the reported `prev_state`, next's tid, the program context for the kernel stack)
// and share everything after that.

/// sched_switch (classic tracepoint): the switch-out of a traced thread (current == prev) and
/// the switch-in of a thread that had one.
#[tracepoint]
pub fn on_sched_switch(ctx: TracePointContext) -> u32 {
    let every = control(ctl::OFFCPU_SAMPLE_EVERY);
    if every == 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    let mut now = 0;
    if tgid != 0 && is_target(tgid) {
        // SAFETY: offsets from the tracepoint's format file. The state's blocking bits are in
        // its low 32 bits (a `long` on little-endian).
        let (prev, state) = unsafe {
            (
                ctx.read_at::<i32>(config(&SWITCH_PREV_PID_OFFSET) as usize),
                ctx.read_at::<u32>(config(&SWITCH_PREV_STATE_OFFSET) as usize),
            )
        };
        if let (Ok(prev), Ok(state)) = (prev, state) {
            if prev as u32 == id as u32 {
                now = unsafe { bpf_ktime_get_ns() };
                switch_out(ctx.as_ptr(), id, every, now, state, 0);
            }
        }
    }
    // SAFETY: offset from the tracepoint's format file.
    let Ok(next) = (unsafe { ctx.read_at::<i32>(config(&SWITCH_NEXT_PID_OFFSET) as usize) }) else {
        return 0;
    };
    switch_in_of(next, now);
    0
}

/// sched_switch (raw tracepoint), the same as [`on_sched_switch`] without the trace record:
/// `args[0]` preempt, `args[1]` prev (== current), `args[2]` next, `args[3]` prev's state (5.18+;
/// older kernels: read from prev).
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn on_switch_raw(ctx: RawTracePointContext) -> i32 {
    let every = control(ctl::OFFCPU_SAMPLE_EVERY);
    if every == 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    let mut now = 0;
    if tgid != 0 && is_target(tgid) {
        let preempt: u64 = ctx.arg(0);
        let prev: u64 = ctx.arg(1);
        // A frozen global: the verifier follows one branch only, so a kernel whose tracepoint
        // has three arguments never sees the program read a fourth (which its attach refuses).
        let state = if config(&SWITCH_STATE_ARG) != 0 {
            Some(ctx.arg::<u64>(3) as u32)
        } else {
            // `__state` (an unsigned int) or, before 5.14, `state` (a long: its low half).
            read_kernel_u32(prev + config(&TASK_STATE_OFFSET) as u64)
        };
        let exit_state = read_kernel_u32(prev + config(&TASK_EXIT_STATE_OFFSET) as u64);
        if let (Some(state), Some(exit_state)) = (state, exit_state) {
            let reported = reported_switch_state(preempt as u8 != 0, state, exit_state);
            now = unsafe { bpf_ktime_get_ns() };
            switch_out(
                ctx.as_ptr(),
                id,
                every,
                now,
                reported,
                config(&SWITCH_RAW_STACK_SKIP),
            );
        }
    }
    let next: u64 = ctx.arg(2);
    let Some(next) = read_kernel_u32(next + config(&TASK_PID_OFFSET) as u64) else {
        return 0;
    };
    switch_in_of(next as i32, now);
    0
}

/// A 4-byte kernel read (fault-tolerant).
#[inline(always)]
fn read_kernel_u32(addr: u64) -> Option<u32> {
    let mut v: u32 = 0;
    // SAFETY: fault-tolerant read into a local.
    let r = unsafe {
        gen::bpf_probe_read_kernel(&mut v as *mut u32 as *mut c_void, 4, addr as *const c_void)
    };
    if r == 0 {
        Some(v)
    } else {
        None
    }
}

/// The switch-in of thread `next`: closes its off-CPU period if it has one (`now`: the time
/// already read by this invocation, or 0). The entry stays, closed (`ts_ns` 0), for the thread's
/// next switch-out to reuse in place: a map update and a delete per period cost ≈ 300 ns more
/// per traced switch on the test VM (the traced phases of `switch_hook_cost_raw_vs_classic`,
/// before and after).
#[inline(always)]
fn switch_in_of(next: i32, mut now: u64) {
    if next <= 0 {
        return;
    }
    let next = next as u32;
    let Some(entry) = OFFCPU_START.get_ptr_mut(&next) else {
        return;
    };
    // SAFETY: a map value; only this thread's switch-out and switch-in write it, in order.
    let entry = unsafe { &mut *entry };
    let start = OffCpuStart {
        ts_ns: v(&entry.ts_ns),
        tgid: v(&entry.tgid),
        flags: v(&entry.flags),
    };
    if start.ts_ns == 0 {
        return;
    }
    set(&mut entry.ts_ns, 0);
    if now == 0 {
        now = unsafe { bpf_ktime_get_ns() };
    }
    switch_in(next, &start, now);
}

/// The switch-out of traced thread `id` (current) whose reported state is `state`: remembered
/// until its switch-in (in the thread's entry, written in place once it has one), captured 1 in
/// `every`. `stack_skip`: kernel frames above `__schedule` (the hook's own) to leave out of a
/// capture's kernel stack.
#[inline(always)]
fn switch_out(ctx: *mut c_void, id: u64, every: u32, now: u64, state: u32, stack_skip: u32) {
    let tid = id as u32;
    if state & switch_state::EXITING != 0 {
        return;
    }
    let preempted = state & switch_state::BLOCKED == 0;
    let entry = match OFFCPU_START.get_ptr_mut(&tid) {
        Some(e) => e,
        None => {
            let closed = OffCpuStart::default();
            if OFFCPU_START.insert(&tid, &closed, 0).is_err() {
                bump(counter::PROFILE_MAP_FULL);
                return;
            }
            let Some(e) = OFFCPU_START.get_ptr_mut(&tid) else {
                bump(counter::PROFILE_MAP_FULL);
                return;
            };
            e
        }
    };
    // SAFETY: a map value; only this thread's switch-out and switch-in write it, in order (the
    // switch-in cannot come before this program has finished on this CPU).
    let entry = unsafe { &mut *entry };
    set(&mut entry.tgid, (id >> 32) as u32);
    set(
        &mut entry.flags,
        if preempted {
            offcpu_start::PREEMPTED
        } else {
            0
        },
    );
    set(&mut entry.ts_ns, now);
    if !one_in(every) {
        return;
    }
    // The capture reads the preemption back from the map entry rather than from a register, so
    // the verifier walks the capture once, not once per value of the flag.
    let preempted = v(&entry.flags) & offcpu_start::PREEMPTED != 0;
    if capture_offcpu(ctx, id, now, preempted, every, stack_skip) {
        entry.flags |= offcpu_start::CAPTURED;
    }
}

/// The `OFFCPU` record of a switch-out: kernel stack at `schedule()`, user registers saved at
/// kernel entry, user stack and Python frames.
#[inline(always)]
fn capture_offcpu(
    ctx: *mut c_void,
    id: u64,
    now: u64,
    preempted: bool,
    every: u32,
    stack_skip: u32,
) -> bool {
    let Some(s) = scratch(&SCRATCH_SWITCH) else {
        bump(counter::SAMPLE_FAILED);
        return false;
    };
    let Some(regs) = task_user_regs() else {
        bump(counter::SAMPLE_FAILED);
        return false;
    };
    begin(s, id, now, sample_kind::OFFCPU, regs);
    s.rec.header.flags = sf::IN_KERNEL | if preempted { sf::PREEMPTED } else { 0 };
    // The rate this capture was sampled at (user space may change it at any time).
    s.rec.header.aux2 = every as u64;
    kernel_stack_skip(s, ctx, stack_skip);
    finish(s)
}

#[inline(always)]
fn switch_in(tid: u32, start: &OffCpuStart, now: u64) {
    let dur = now.saturating_sub(start.ts_ns);
    let preempted = start.flags & offcpu_start::PREEMPTED != 0;
    if let Some(t) = totals_entry(start.tgid) {
        if preempted {
            t.preempted_ns += dur;
        } else {
            t.blocked_ns += dur;
        }
        t.switches += 1;
    }
    if start.flags & offcpu_start::CAPTURED == 0 {
        return;
    }
    let header = SampleHeader {
        ts_ns: now,
        pid_tgid: (start.tgid as u64) << 32 | tid as u64,
        ip: 0,
        sp: 0,
        bp: 0,
        aux: start.ts_ns,
        aux2: 0,
        user_stack_len: 0,
        kernel_frames: 0,
        py_frames: 0,
        // SAFETY: helper without arguments.
        cpu: unsafe { gen::bpf_get_smp_processor_id() } as u16,
        kind: sample_kind::OFFCPU_END,
        flags: if preempted { sf::PREEMPTED } else { 0 },
        _pad: 0,
    };
    const _: () = assert!(core::mem::size_of::<SampleHeader>() == SAMPLE_HEADER_LEN);
    if SAMPLES
        .output::<SampleHeader>(&header, wakeup_flags())
        .is_err()
    {
        bump(counter::SAMPLE_RING_FULL);
    }
}

#[inline(always)]
fn totals_entry(tgid: u32) -> Option<&'static mut OffCpuTotals> {
    if let Some(p) = OFFCPU_TOTALS.get_ptr_mut(&tgid) {
        // SAFETY: per-CPU value, exclusively ours while this program runs on this CPU.
        return Some(unsafe { &mut *p });
    }
    let zero = OffCpuTotals::default();
    if OFFCPU_TOTALS
        .insert(&tgid, &zero, BPF_NOEXIST as u64)
        .is_err()
    {
        bump(counter::PROFILE_MAP_FULL);
    }
    OFFCPU_TOTALS.get_ptr_mut(&tgid).map(|p| unsafe { &mut *p })
}

// ---- CUDA launches ---------------------------------------------------------------------------

/// A `LAUNCH` record for a CUDA launch uprobe hit (the caller decided to sample it): the
/// launching thread's registers at the probed function's entry, its user stack and Python
/// frames; `aux` = attach cookie, `aux2` = kernel handle / graph.
#[inline(always)]
pub(crate) fn launch_sample(ctx: &ProbeContext, pid_tgid: u64, now: u64, cookie: u64, handle: u64) {
    let Some(busy) = take_launch_busy() else {
        bump(counter::SAMPLE_BUSY);
        return;
    };
    let Some(s) = scratch(&SCRATCH_LAUNCH) else {
        release(busy);
        bump(counter::SAMPLE_FAILED);
        return;
    };
    let r = ctx.as_ptr() as *const pt_regs;
    // SAFETY: loads of the probed thread's saved registers at constant offsets.
    let regs = unsafe {
        use core::ptr::{addr_of, read_volatile as rv};
        UserRegs {
            ip: rv(addr_of!((*r).rip)),
            sp: rv(addr_of!((*r).rsp)),
            bp: rv(addr_of!((*r).rbp)),
        }
    };
    begin(s, pid_tgid, now, sample_kind::LAUNCH, regs);
    s.rec.header.aux = cookie;
    s.rec.header.aux2 = handle;
    finish(s);
    release(busy);
}

// ---- thread exit -----------------------------------------------------------------------------

/// A thread of a traced process exits (`sched_process_exit`, called by `sockets::on_exit`): its
/// stack top, cached thread state and off-CPU entry go with it, so a later thread given the same
/// tid never meets them.
#[inline(always)]
pub(crate) fn thread_exited(pid_tgid: u64) {
    let _ = STACK_TOPS.remove(&pid_tgid);
    let _ = PY_THREADS.remove(&pid_tgid);
    let _ = OFFCPU_START.remove(&(pid_tgid as u32));
}
