//! CUDA launch-path uprobes (driver and runtime API).
//!
//! One entry program and one return program serve every probed function; the attach cookie
//! (`infertap_common::cuda::Cookie`) says which function it is and where its arguments are.
//! Default mode aggregates in the kernel (calls, bytes, duration histograms per
//! process/thread/function, launch counts per kernel) so a decode step's thousands of launches
//! cost one map update each and no ring-buffer traffic. In per-event mode (a trace window) each
//! call is also written to the ring buffer. Launches (kernel and graph) are also stack-sampled,
//! 1 in `LAUNCH_SAMPLE_EVERY`, into the profiler's `SAMPLES` ring (`profile::launch_sample`).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_attach_cookie},
    macros::{map, uprobe, uretprobe},
    maps::{Array, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use infertap_common::{
    counter,
    cuda::{control, CallPayload, Class, Cookie, KernelKey, Stat, StatKey, DURATION_BUCKETS},
    kind,
    profile::profile_control,
    EventHeader,
};

use crate::sockets::{bump, emit_small, is_target};

#[map]
static CUDA_CONTROL: Array<u32> = Array::with_max_entries(control::COUNT, 0);

#[map]
static CUDA_STATS: PerCpuHashMap<StatKey, Stat> = PerCpuHashMap::with_max_entries(16384, 0);

#[map]
static CUDA_KERNELS: LruPerCpuHashMap<KernelKey, u64> =
    LruPerCpuHashMap::with_max_entries(16384, 0);

/// Zeroed template for new `CUDA_STATS` entries (a `Stat` is too large for the stack).
#[map]
static CUDA_ZERO: PerCpuArray<Stat> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct CallKey {
    pid_tgid: u64,
    func: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Call {
    ts_ns: u64,
    bytes: i64,
    handle: u64,
    stream: u64,
    copy: u32,
    _pad: u32,
}

#[map]
static CUDA_INFLIGHT: LruHashMap<CallKey, Call> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn control(index: u32) -> u32 {
    CUDA_CONTROL.get(index).copied().unwrap_or(0)
}

/// The probed function's argument registers (rdi, rsi, rdx, rcx, r8, r9) and stack pointer.
/// Each is loaded from the context at a constant offset, as the verifier requires; a slot is then
/// picked from this copy on the stack.
struct Args {
    regs: [u64; 8],
}

impl Args {
    #[inline(always)]
    fn new(ctx: &ProbeContext) -> Self {
        let r = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
        // SAFETY: volatile loads of pt_regs fields at constant offsets.
        unsafe {
            use core::ptr::{addr_of, read_volatile as rv};
            Args {
                regs: [
                    rv(addr_of!((*r).rdi)),
                    rv(addr_of!((*r).rsi)),
                    rv(addr_of!((*r).rdx)),
                    rv(addr_of!((*r).rcx)),
                    rv(addr_of!((*r).r8)),
                    rv(addr_of!((*r).r9)),
                    rv(addr_of!((*r).rsp)),
                    0,
                ],
            }
        }
    }

    /// Argument slot `slot` (System V x86-64: 6 registers, then the stack after the return
    /// address).
    #[inline(always)]
    fn slot(&self, slot: u8) -> u64 {
        if slot < 6 {
            // SAFETY: slot < 6 < 8.
            return unsafe { *self.regs.get_unchecked((slot & 7) as usize) };
        }
        let sp = self.regs[6];
        // SAFETY: fault-tolerant read of the probed thread's stack.
        unsafe {
            aya_ebpf::helpers::bpf_probe_read_user((sp + 8 * (slot as u64 - 5)) as *const u64)
                .unwrap_or(0)
        }
    }
}

#[inline(always)]
fn log2(mut v: u64) -> usize {
    let mut r = 0usize;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    r
}

#[inline(always)]
fn stat_entry(key: &StatKey) -> Option<&'static mut Stat> {
    if let Some(p) = CUDA_STATS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, exclusively ours while this program runs on this CPU.
        return Some(unsafe { &mut *p });
    }
    let zero = CUDA_ZERO.get_ptr(0)?;
    // SAFETY: the template slot is never written.
    if CUDA_STATS
        .insert(key, unsafe { &*zero }, BPF_NOEXIST as u64)
        .is_err()
    {
        bump(counter::CUDA_MAP_FULL);
    }
    CUDA_STATS.get_ptr_mut(key).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn emit_call(pid_tgid: u64, cookie: Cookie, enter: u64, exit: u64, call: &Call) {
    #[repr(C)]
    struct Rec {
        header: EventHeader,
        payload: CallPayload,
    }
    let rec = Rec {
        header: EventHeader {
            ts_enter_ns: enter,
            ts_exit_ns: exit,
            pid_tgid,
            conn_id: cookie.0,
            ret: call.bytes,
            arrival_ns: 0,
            flags: 0,
            aux: 0,
            fd: call.copy as i32,
            captured: core::mem::size_of::<CallPayload>() as u16,
            kind: kind::CUDA_CALL,
            syscall: 0,
        },
        payload: CallPayload {
            handle: call.handle,
            stream: call.stream,
        },
    };
    emit_small(&rec);
}

#[uprobe]
pub fn cuda_enter(ctx: ProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if control(control::ALL_PROCESSES) == 0 && !is_target(tgid) {
        return 0;
    }
    // SAFETY: a kprobe-type program context.
    let cookie = Cookie(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let now = unsafe { bpf_ktime_get_ns() };
    let args = Args::new(&ctx);
    let bytes = match cookie.bytes_slot() {
        Some(s) => (args.slot(s).wrapping_mul(cookie.elem_size())) as i64,
        None => -1,
    };
    let copy = match cookie.copy_kind_slot() {
        Some(s) => infertap_common::cuda::CopyKind::from_runtime_kind(args.slot(s)) as u32,
        None => cookie.copy() as u32,
    };
    let call = Call {
        ts_ns: now,
        bytes,
        handle: match cookie.handle_slot() {
            Some(s) => args.slot(s),
            None => 0,
        },
        stream: match cookie.stream_slot() {
            Some(s) => args.slot(s),
            None => 0,
        },
        copy,
        _pad: 0,
    };
    let key = StatKey {
        tgid,
        tid: id as u32,
        func: cookie.func_id() as u32,
        _pad: 0,
    };
    if let Some(stat) = stat_entry(&key) {
        stat.calls += 1;
        if bytes > 0 {
            stat.bytes += bytes as u64;
            let k = (copy as usize) & 7;
            if k < 5 {
                stat.bytes_by_kind[k] += bytes as u64;
            }
        }
    }
    if cookie.handle_slot().is_some() {
        let kkey = KernelKey {
            tgid,
            func: cookie.func_id() as u32,
            handle: call.handle,
        };
        match kernel_count_slot(&kkey) {
            Some(c) => *c += 1,
            None => {
                let _ = CUDA_KERNELS.insert(&kkey, &1, 0);
            }
        }
    }
    let class = cookie.class();
    if (class == Class::Launch as u8 || class == Class::GraphLaunch as u8)
        && crate::profile::one_in(crate::profile::control(
            profile_control::LAUNCH_SAMPLE_EVERY,
        ))
    {
        crate::profile::launch_sample(&ctx, id, now, cookie.0, call.handle);
    }
    if cookie.timed() {
        let _ = CUDA_INFLIGHT.insert(
            &CallKey {
                pid_tgid: id,
                func: cookie.func_id() as u64,
            },
            &call,
            0,
        );
    } else if control(control::MODE) == control::MODE_EVENTS {
        emit_call(id, cookie, now, now, &call);
    }
    0
}

#[inline(always)]
fn kernel_count_slot(key: &KernelKey) -> Option<&'static mut u64> {
    // SAFETY: per-CPU value, exclusively ours while this program runs on this CPU.
    CUDA_KERNELS.get_ptr_mut(key).map(|p| unsafe { &mut *p })
}

#[uretprobe]
pub fn cuda_exit(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: a kprobe-type program context.
    let cookie = Cookie(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let key = CallKey {
        pid_tgid: id,
        func: cookie.func_id() as u64,
    };
    // SAFETY: copied out immediately.
    let Some(call) = (unsafe { CUDA_INFLIGHT.get(&key) }).copied() else {
        return 0;
    };
    let _ = CUDA_INFLIGHT.remove(&key);
    let now = unsafe { bpf_ktime_get_ns() };
    let dur = now.saturating_sub(call.ts_ns);
    let skey = StatKey {
        tgid: (id >> 32) as u32,
        tid: id as u32,
        func: cookie.func_id() as u32,
        _pad: 0,
    };
    if let Some(stat) = stat_entry(&skey) {
        stat.timed_calls += 1;
        stat.duration_ns_sum += dur;
        if dur > stat.duration_ns_max {
            stat.duration_ns_max = dur;
        }
        let b = log2(dur);
        let b = if b >= DURATION_BUCKETS {
            DURATION_BUCKETS - 1
        } else {
            b
        };
        stat.duration_hist[b] += 1;
    }
    if control(control::MODE) == control::MODE_EVENTS {
        emit_call(id, cookie, call.ts_ns, now, &call);
    }
    0
}
