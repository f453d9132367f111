//! Launch API calls: which thread launched each kernel or graph, and when.
//!
//! CUPTI's callback API calls our callback ([`record_api`]) at the entry and exit of the launch
//! functions only ([`KERNEL_LAUNCHES`], [`GRAPH_LAUNCHES`]), on the launching thread. At entry
//! it stores CLOCK_MONOTONIC in CUPTI's per-invocation `correlationData` slot; at exit it pushes
//! one [`Launch`] (correlation id, `gettid()`, entry and exit times, and when the thread's
//! previous launch call returned) into a bounded lock-free ring ([`LaunchRing`]) that the sender
//! thread drains. Nothing here blocks, allocates or takes a lock on the CUDA thread: a full ring
//! drops the record and counts it.
//!
//! The previous call's exit bounds the window in which the eBPF stack sample of this call was
//! taken: CUPTI calls back some microseconds after the call's entry (tens, on a thread's first
//! call or a preempted one), so "the sample just before CUPTI's entry time" alone misses calls,
//! while "the thread's latest launch sample after its previous launch returned" is exact.
//!
//! Why callbacks rather than CUPTI's `DRIVER`/`RUNTIME` activity records: the agent joins these
//! records with eBPF stack samples taken in the same call, by thread id and a time window a few
//! microseconds wide. Read on the launching thread, `gettid()` and CLOCK_MONOTONIC are exactly
//! the values the kernel side sees, with no thread-id type setting (process-global, and
//! `pthread_self` by default) and no CUPTI→monotonic clock mapping whose error could push a
//! 3 µs launch call outside its window. The callback API works on every CUPTI since 4.0, while
//! per-cbid API activity needs CUPTI 12.5 (without it, `DRIVER`/`RUNTIME` records every CUDA
//! call, several per launch in PyTorch). The cost is ours to keep small: measured by
//! `examples/record_cost.rs`.

use std::cell::Cell;
use std::ffi::c_void;
use std::ptr::addr_of;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use crossbeam_queue::ArrayQueue;
use cudarc::cupti::sys::{
    self, CUpti_CallbackDomain as Domain, CUpti_driver_api_trace_cbid as D,
    CUpti_runtime_api_trace_cbid as R,
};

use crate::wire::{launch_flags, ApiDomain, Launch};

/// Driver and runtime functions that launch one kernel, as (domain, cbid).
pub const KERNEL_LAUNCHES: [(ApiDomain, u32); 12] = [
    (
        ApiDomain::Driver,
        D::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel as u32,
    ),
    (
        ApiDomain::Driver,
        D::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel_ptsz as u32,
    ),
    (
        ApiDomain::Driver,
        D::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernelEx as u32,
    ),
    (
        ApiDomain::Driver,
        D::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernelEx_ptsz as u32,
    ),
    (
        ApiDomain::Driver,
        D::CUPTI_DRIVER_TRACE_CBID_cuLaunchCooperativeKernel as u32,
    ),
    (
        ApiDomain::Driver,
        D::CUPTI_DRIVER_TRACE_CBID_cuLaunchCooperativeKernel_ptsz as u32,
    ),
    (
        ApiDomain::Runtime,
        R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernel_v7000 as u32,
    ),
    (
        ApiDomain::Runtime,
        R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernel_ptsz_v7000 as u32,
    ),
    (
        ApiDomain::Runtime,
        R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernelExC_v11060 as u32,
    ),
    (
        ApiDomain::Runtime,
        R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernelExC_ptsz_v11060 as u32,
    ),
    (
        ApiDomain::Runtime,
        R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchCooperativeKernel_v9000 as u32,
    ),
    (
        ApiDomain::Runtime,
        R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchCooperativeKernel_ptsz_v9000 as u32,
    ),
];

/// Driver and runtime functions that launch a CUDA graph, as (domain, cbid).
pub const GRAPH_LAUNCHES: [(ApiDomain, u32); 4] = [
    (
        ApiDomain::Driver,
        D::CUPTI_DRIVER_TRACE_CBID_cuGraphLaunch as u32,
    ),
    (
        ApiDomain::Driver,
        D::CUPTI_DRIVER_TRACE_CBID_cuGraphLaunch_ptsz as u32,
    ),
    (
        ApiDomain::Runtime,
        R::CUPTI_RUNTIME_TRACE_CBID_cudaGraphLaunch_v10000 as u32,
    ),
    (
        ApiDomain::Runtime,
        R::CUPTI_RUNTIME_TRACE_CBID_cudaGraphLaunch_ptsz_v10000 as u32,
    ),
];

/// Launch records waiting for the sender: 64 Ki × 40 bytes (plus the queue's per-slot stamp),
/// about 0.6 s of launches at 100 000 launches/s; the sender drains it every 100 ms.
pub const RING_CAPACITY: usize = 64 * 1024;

/// CUPTI's `CUPTI_API_ENTER` / `CUPTI_API_EXIT` (`CUpti_ApiCallbackSite`).
const SITE_ENTER: u32 = 0;
const SITE_EXIT: u32 = 1;

/// Counters of the launch path (cumulative).
#[derive(Debug, Default)]
pub struct LaunchCounters {
    /// Records pushed into the ring.
    pub recorded: AtomicU64,
    /// Records dropped: ring full.
    pub ring_full: AtomicU64,
    /// Launch calls that returned an error (they enqueued nothing; not recorded).
    pub failed_calls: AtomicU64,
    /// Callbacks for a domain/cbid that is not a launch, without callback data, or exits
    /// without a usable entry time.
    pub ignored: AtomicU64,
}

/// The bounded multi-producer ring between CUDA threads and the sender thread.
pub struct LaunchRing {
    queue: ArrayQueue<Launch>,
    /// When the launch callbacks were last switched on (CLOCK_MONOTONIC ns): a thread's launch
    /// calls before it went unseen, so no record's window reaches back past it.
    tracing_since: AtomicU64,
    pub counters: LaunchCounters,
}

impl LaunchRing {
    /// A ring of `capacity` records, allocated once.
    pub fn new(capacity: usize) -> LaunchRing {
        LaunchRing {
            queue: ArrayQueue::new(capacity.max(1)),
            tracing_since: AtomicU64::new(0),
            counters: LaunchCounters::default(),
        }
    }

    /// The launch callbacks were switched on at `ns`.
    pub fn set_tracing_since(&self, ns: u64) {
        self.tracing_since.store(ns, Relaxed);
    }

    /// Adds a record; a full ring drops it (counted). Lock-free, never blocks.
    pub fn push(&self, l: Launch) {
        match self.queue.push(l) {
            Ok(()) => self.counters.recorded.fetch_add(1, Relaxed),
            Err(_) => self.counters.ring_full.fetch_add(1, Relaxed),
        };
    }

    /// Moves up to `max` records into `out` (the sender thread).
    pub fn drain_into(&self, out: &mut Vec<Launch>, max: usize) {
        while out.len() < max {
            match self.queue.pop() {
                Some(l) => out.push(l),
                None => break,
            }
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Bumped in the child after `fork`: thread ids cached before it belong to the parent.
static FORK_GENERATION: AtomicU32 = AtomicU32::new(0);

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Relaxed);
}

/// Registers the fork handler that invalidates cached thread ids (call once).
pub fn install_fork_handler() {
    // SAFETY: registering a plain extern "C" fn with no preconditions.
    unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
}

thread_local! {
    /// (tid, fork generation it was read in); tid 0 = not read yet.
    static TID: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
    /// Runtime launch calls in progress on this thread (a driver launch inside one is nested).
    static RUNTIME_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// When this thread's last launch call (not nested) returned; 0: none yet.
    static LAST_EXIT: Cell<u64> = const { Cell::new(0) };
}

/// `gettid()`, read once per thread (one syscall) and cached.
fn current_tid() -> u32 {
    let generation = FORK_GENERATION.load(Relaxed);
    TID.with(|c| {
        let (tid, g) = c.get();
        if tid != 0 && g == generation {
            return tid;
        }
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        c.set((tid, generation));
        tid
    })
}

/// CLOCK_MONOTONIC in ns (the eBPF side's `bpf_ktime_get_ns` clock); vDSO, no syscall.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn is_graph(domain: ApiDomain, cbid: u32) -> bool {
    GRAPH_LAUNCHES.contains(&(domain, cbid))
}

fn is_launch(domain: ApiDomain, cbid: u32) -> bool {
    KERNEL_LAUNCHES.contains(&(domain, cbid)) || is_graph(domain, cbid)
}

/// The work of one callback: at entry, note the time in CUPTI's per-invocation slot; at exit,
/// push the record. `now_ns` is CLOCK_MONOTONIC read first thing in the callback (before any
/// thread-local access, whose first use on a thread allocates), so that the call's interval
/// starts as close to the call's real entry as CUPTI lets us see it. `domain` and the callback
/// site are read as integers: CUPTI's enums are never trusted to hold a known value.
///
/// # Safety
/// `data` is null or points to a `CUpti_CallbackData` valid for the call (CUPTI's guarantee for
/// the driver and runtime domains), whose `correlationData` is null or valid from entry to exit.
pub unsafe fn record_api(
    ring: &LaunchRing,
    now_ns: u64,
    domain: u32,
    cbid: u32,
    data: *const c_void,
) {
    let domain = match domain {
        d if d == Domain::CUPTI_CB_DOMAIN_DRIVER_API as u32 => ApiDomain::Driver,
        d if d == Domain::CUPTI_CB_DOMAIN_RUNTIME_API as u32 => ApiDomain::Runtime,
        _ => {
            ring.counters.ignored.fetch_add(1, Relaxed);
            return;
        }
    };
    let d = data as *const sys::CUpti_CallbackData;
    if d.is_null() || !is_launch(domain, cbid) {
        ring.counters.ignored.fetch_add(1, Relaxed);
        return;
    }
    // SAFETY: `d` is valid (caller); the site is read as its u32 representation.
    let (site, slot) = unsafe {
        (
            *(addr_of!((*d).callbackSite) as *const u32),
            (*d).correlationData,
        )
    };
    let runtime = domain == ApiDomain::Runtime;
    if site == SITE_ENTER {
        if runtime {
            RUNTIME_DEPTH.with(|c| c.set(c.get().saturating_add(1)));
        }
        if !slot.is_null() {
            // SAFETY: CUPTI's per-invocation slot, valid until the exit callback.
            unsafe { *slot = now_ns };
        }
        return;
    }
    if site != SITE_EXIT {
        ring.counters.ignored.fetch_add(1, Relaxed);
        return;
    }
    let end_ns = now_ns;
    let nested = if runtime {
        RUNTIME_DEPTH.with(|c| c.set(c.get().saturating_sub(1)));
        false
    } else {
        RUNTIME_DEPTH.with(|c| c.get()) > 0
    };
    // Failed calls too: their samples belong to them, not to the next call.
    let last = if nested {
        LAST_EXIT.with(|c| c.get())
    } else {
        LAST_EXIT.with(|c| c.replace(end_ns))
    };
    let after_ns = last.max(ring.tracing_since.load(Relaxed));
    // SAFETY: as above; the return value is a CUresult / cudaError_t (an int).
    let (start_ns, ret, correlation_id) = unsafe {
        let start = if slot.is_null() { 0 } else { *slot };
        let rv = (*d).functionReturnValue as *const i32;
        let ret = if rv.is_null() { 0 } else { *rv };
        (start, ret, (*d).correlationId)
    };
    if ret != 0 {
        ring.counters.failed_calls.fetch_add(1, Relaxed);
        return;
    }
    // No entry time (no slot, or the callbacks were switched on inside this call): the call's
    // window is unknown, and a guess could take another call's sample.
    if start_ns == 0 || start_ns > end_ns || start_ns < after_ns {
        ring.counters.ignored.fetch_add(1, Relaxed);
        return;
    }
    let mut flags = 0;
    if is_graph(domain, cbid) {
        flags |= launch_flags::GRAPH;
    }
    if nested {
        flags |= launch_flags::NESTED;
    }
    ring.push(Launch {
        correlation_id,
        tid: current_tid(),
        // An entry slot CUPTI did not preserve must not make a call that ends before it starts.
        start_ns,
        end_ns,
        after_ns,
        cbid,
        domain,
        flags,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(site: u32, corr: u32, slot: *mut u64, ret: *mut i32) -> sys::CUpti_CallbackData {
        // SAFETY: a plain C struct; all-zero is valid (null pointers, ENTER site).
        let mut d: sys::CUpti_CallbackData = unsafe { std::mem::zeroed() };
        // SAFETY: writing the site's u32 representation.
        unsafe { *(std::ptr::addr_of_mut!(d.callbackSite) as *mut u32) = site };
        d.correlationId = corr;
        d.correlationData = slot;
        d.functionReturnValue = ret.cast();
        d
    }

    const DRV: u32 = Domain::CUPTI_CB_DOMAIN_DRIVER_API as u32;
    const RT: u32 = Domain::CUPTI_CB_DOMAIN_RUNTIME_API as u32;
    const CU_LAUNCH: u32 = D::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel as u32;
    const CUDA_LAUNCH: u32 = R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernel_v7000 as u32;
    const CUDA_GRAPH: u32 = R::CUPTI_RUNTIME_TRACE_CBID_cudaGraphLaunch_v10000 as u32;

    fn call(ring: &LaunchRing, domain: u32, cbid: u32, corr: u32, ret: i32, inner: impl FnOnce()) {
        let mut slot = 0u64;
        let mut rv = ret;
        let enter = data(SITE_ENTER, corr, &mut slot, &mut rv);
        // SAFETY: valid callback data for the duration of the calls.
        unsafe {
            record_api(
                ring,
                monotonic_ns(),
                domain,
                cbid,
                (&enter as *const sys::CUpti_CallbackData).cast(),
            )
        };
        inner();
        let exit = data(SITE_EXIT, corr, &mut slot, &mut rv);
        unsafe {
            record_api(
                ring,
                monotonic_ns(),
                domain,
                cbid,
                (&exit as *const sys::CUpti_CallbackData).cast(),
            )
        };
    }

    fn drain(ring: &LaunchRing) -> Vec<Launch> {
        let mut v = Vec::new();
        ring.drain_into(&mut v, usize::MAX);
        v
    }

    #[test]
    fn a_launch_is_recorded_with_tid_and_its_call_interval() {
        let ring = LaunchRing::new(16);
        let before = monotonic_ns();
        call(&ring, RT, CUDA_LAUNCH, 41, 0, || {
            std::thread::sleep(std::time::Duration::from_millis(2))
        });
        let after = monotonic_ns();
        let got = drain(&ring);
        assert_eq!(got.len(), 1);
        let l = got[0];
        assert_eq!(
            (l.correlation_id, l.cbid, l.domain, l.flags),
            (41, CUDA_LAUNCH, ApiDomain::Runtime, 0)
        );
        // SAFETY: gettid has no preconditions.
        assert_eq!(l.tid, unsafe { libc::syscall(libc::SYS_gettid) } as u32);
        assert!(
            before <= l.start_ns && l.end_ns <= after,
            "{l:?} not in [{before}, {after}]"
        );
        assert!(l.end_ns - l.start_ns >= 2_000_000, "the call's 2 ms: {l:?}");
    }

    #[test]
    fn graphs_nesting_failures_and_foreign_callbacks() {
        // A fresh thread: its first launch has no previous one.
        std::thread::spawn(graphs_nesting_failures_and_foreign_callbacks_on_this_thread)
            .join()
            .unwrap();
    }

    fn graphs_nesting_failures_and_foreign_callbacks_on_this_thread() {
        let ring = LaunchRing::new(16);
        call(&ring, RT, CUDA_GRAPH, 1, 0, || {});
        // The runtime calling the driver inside its own launch.
        call(&ring, RT, CUDA_LAUNCH, 2, 0, || {
            call(&ring, DRV, CU_LAUNCH, 3, 0, || {})
        });
        call(&ring, DRV, CU_LAUNCH, 4, 0, || {});
        // A failed launch enqueued nothing.
        call(&ring, DRV, CU_LAUNCH, 5, 700, || {});
        // Not a launch, an unknown domain, no data.
        call(&ring, DRV, 1, 6, 0, || {});
        call(&ring, 99, CU_LAUNCH, 7, 0, || {});
        unsafe { record_api(&ring, monotonic_ns(), DRV, CU_LAUNCH, std::ptr::null()) };
        let got = drain(&ring);
        let by: Vec<(u32, u8)> = got.iter().map(|l| (l.correlation_id, l.flags)).collect();
        assert_eq!(
            by,
            vec![
                (1, launch_flags::GRAPH),
                (3, launch_flags::NESTED),
                (2, 0),
                (4, 0)
            ]
        );
        // Each call's window starts where the thread's previous (outer) launch call ended.
        let after: Vec<u64> = got.iter().map(|l| l.after_ns).collect();
        assert_eq!(after, vec![0, got[0].end_ns, got[0].end_ns, got[2].end_ns]);
        // The failed call moved the bound too: its sample is its own.
        call(&ring, DRV, CU_LAUNCH, 8, 0, || {});
        let next = drain(&ring)[0];
        assert!(next.after_ns > got[3].end_ns && next.after_ns <= next.start_ns);
        // Callbacks switched on later: nothing before then is this thread's previous call.
        let since = monotonic_ns();
        ring.set_tracing_since(since);
        call(&ring, DRV, CU_LAUNCH, 9, 0, || {});
        assert_eq!(drain(&ring)[0].after_ns, since);
        // An exit whose entry was not seen (switched on inside the call) is not recorded.
        let mut rv = 0;
        let mut slot = 0u64;
        let exit = data(SITE_EXIT, 10, &mut slot, &mut rv);
        unsafe {
            record_api(
                &ring,
                monotonic_ns(),
                DRV,
                CU_LAUNCH,
                (&exit as *const sys::CUpti_CallbackData).cast(),
            )
        };
        assert!(ring.is_empty());
        assert_eq!(ring.counters.failed_calls.load(Relaxed), 1);
        assert_eq!(ring.counters.ignored.load(Relaxed), 2 * 2 + 1 + 1);
    }

    #[test]
    fn a_full_ring_drops_and_counts_and_threads_keep_their_tids() {
        let ring = LaunchRing::new(1000);
        let tids: Vec<u32> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|t| {
                    let ring = &ring;
                    s.spawn(move || {
                        for i in 0..500 {
                            call(ring, DRV, CU_LAUNCH, t * 1000 + i, 0, || {});
                        }
                        // SAFETY: gettid has no preconditions.
                        unsafe { libc::syscall(libc::SYS_gettid) as u32 }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let got = drain(&ring);
        assert_eq!(got.len(), 1000);
        assert_eq!(ring.counters.ring_full.load(Relaxed), 1000);
        assert_eq!(ring.counters.recorded.load(Relaxed), 1000);
        for l in &got {
            let t = (l.correlation_id / 1000) as usize;
            assert_eq!(l.tid, tids[t], "record of thread {t} carries its tid");
        }
    }
}
