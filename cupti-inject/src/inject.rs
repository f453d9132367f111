//! The injection runtime: CUPTI setup, buffer callbacks, and the sender thread.
//!
//! Threads: CUPTI calls `buffer_requested` on CUDA API threads of the host and `buffer_completed`
//! on its own worker thread (or the thread flushing). Both only touch short mutexes and a
//! non-blocking `try_send`. The launch callbacks ([`crate::launches`]) run on the launching
//! threads and only push into a lock-free ring. All socket I/O happens on our own
//! `infertap-cupti` thread.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use cudarc::cupti::sys::{self, CUptiResult, CUpti_ActivityKind as K};
use cudarc::driver::sys::CUcontext;

use crate::launches::{
    self, monotonic_ns, LaunchRing, GRAPH_LAUNCHES, KERNEL_LAUNCHES, RING_CAPACITY,
};
use crate::records::{decode_record, map_time, RecordError};
use crate::wire::{
    self, encode_frame, Activity, ActivityKind, ApiDomain, DetailLevel, Frame, Hello, Launch,
    Stats, DEVICE_UNKNOWN,
};

/// Fixed pool of CUPTI buffers: memory is bounded at `POOL_BUFFERS * BUFFER_SIZE` for the life
/// of the process. When all are in flight CUPTI gets no buffer and drops (and counts) records.
const POOL_BUFFERS: usize = 8;
const BUFFER_SIZE: usize = 2 << 20;
/// Decoded batches waiting for the sender thread.
const QUEUE_BATCHES: usize = 16;
/// Activities per wire frame (keeps frames far below `wire::MAX_PAYLOAD`).
const FRAME_ACTIVITIES: usize = 16 * 1024;
/// Launch records per wire frame (512 KiB).
const FRAME_LAUNCHES: usize = 16 * 1024;
/// Distinct kernel names interned (≤ 16 MiB at the 1 KiB name cap); beyond it kernels are sent
/// without a name (counted).
const MAX_NAMES: usize = 16 * 1024;
const TICK: Duration = Duration::from_millis(100);
const STATS_EVERY: Duration = Duration::from_secs(1);
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// A write to the agent that cannot complete within this drops the connection.
const WRITE_DEADLINE: Duration = Duration::from_millis(500);
/// CUPTI's worker flushes buffers holding completed records this often.
const FLUSH_PERIOD_MS: u32 = 200;

/// What the library is doing; see [`infertap_cupti_state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum State {
    /// `InitializeInjection` has not run.
    NotInitialized = 0,
    /// Tracing is on.
    Active = 1,
    /// libcupti was not found: nothing is enabled, the process runs untouched.
    NoCupti = 2,
    /// CUPTI refused the setup (e.g. another profiler already subscribed); nothing enabled.
    Failed = 3,
}

static STATE: AtomicU8 = AtomicU8::new(State::NotInitialized as u8);
static INIT: Once = Once::new();
static RT: OnceLock<Runtime> = OnceLock::new();

#[derive(Default)]
struct Counters {
    records: AtomicU64,
    cupti_dropped: AtomicU64,
    buffers_exhausted: AtomicU64,
    unknown_kind: AtomicU64,
    bad_records: AtomicU64,
    queue_full: AtomicU64,
    no_agent: AtomicU64,
    batches_sent: AtomicU64,
    names_overflow: AtomicU64,
    cupti_errors: AtomicU64,
    panics: AtomicU64,
    launches_unsent: AtomicU64,
}

static COUNTERS: Counters = Counters {
    records: AtomicU64::new(0),
    cupti_dropped: AtomicU64::new(0),
    buffers_exhausted: AtomicU64::new(0),
    unknown_kind: AtomicU64::new(0),
    bad_records: AtomicU64::new(0),
    queue_full: AtomicU64::new(0),
    no_agent: AtomicU64::new(0),
    batches_sent: AtomicU64::new(0),
    names_overflow: AtomicU64::new(0),
    cupti_errors: AtomicU64::new(0),
    panics: AtomicU64::new(0),
    launches_unsent: AtomicU64::new(0),
};

impl Counters {
    fn snapshot(&self) -> Stats {
        Stats {
            records: self.records.load(Relaxed),
            cupti_dropped: self.cupti_dropped.load(Relaxed),
            buffers_exhausted: self.buffers_exhausted.load(Relaxed),
            unknown_kind: self.unknown_kind.load(Relaxed),
            bad_records: self.bad_records.load(Relaxed),
            queue_full: self.queue_full.load(Relaxed),
            no_agent: self.no_agent.load(Relaxed),
            batches_sent: self.batches_sent.load(Relaxed),
            names_overflow: self.names_overflow.load(Relaxed),
            cupti_errors: self.cupti_errors.load(Relaxed),
            panics: self.panics.load(Relaxed),
            detail: RT.get().map_or(0, |rt| rt.applied.load(Relaxed) as u64),
            launches: RT
                .get()
                .map_or(0, |rt| rt.launches.counters.recorded.load(Relaxed)),
            launches_ring_full: RT
                .get()
                .map_or(0, |rt| rt.launches.counters.ring_full.load(Relaxed)),
            launches_unsent: self.launches_unsent.load(Relaxed),
            launch_tracing: RT
                .get()
                .map_or(0, |rt| rt.launch_tracing.load(Relaxed) as u64),
        }
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Kernel names interned by content; ids are dense from 1 so "names sent so far" is one number.
#[derive(Default)]
struct Names {
    ids: HashMap<Box<[u8]>, u32>,
    list: Vec<String>,
}

impl Names {
    fn intern(&mut self, name: &[u8]) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        if self.list.len() >= MAX_NAMES {
            inc(&COUNTERS.names_overflow);
            return 0;
        }
        let s = String::from_utf8_lossy(name);
        self.list
            .push(wire::truncate_utf8(&s, wire::MAX_NAME_LEN).to_owned());
        let id = self.list.len() as u32;
        self.ids.insert(name.into(), id);
        id
    }
}

struct Runtime {
    /// Free CUPTI buffers (addresses of leaked, 8-byte aligned allocations).
    pool: Mutex<Vec<usize>>,
    names: Mutex<Names>,
    /// Context → device, learnt from kernel/memcpy records; sync records carry only a context.
    ctx_device: Mutex<HashMap<u32, u32>>,
    tx: SyncSender<Vec<Activity>>,
    /// monotonic = cupti + offset.
    offset_ns: AtomicI64,
    /// Level requested (by env or agent) and level in effect.
    wanted: AtomicU8,
    applied: AtomicU8,
    cupti_version: AtomicU32,
    socket: PathBuf,
    stop: AtomicBool,
    done: Mutex<Option<Receiver<()>>>,
    /// Launch API calls from the launch callbacks, drained by the sender.
    launches: LaunchRing,
    /// CUPTI subscriber of the launch callbacks (`CUpti_SubscriberHandle`); 0: none.
    subscriber: AtomicUsize,
    /// Whether any launch callback is enabled now.
    launch_tracing: AtomicBool,
}

/// Entry point called by libcuda (`CUDA_INJECTION64_PATH`) during `cuInit`. Always returns 1
/// (success): a failure here must not fail the host's CUDA initialization; what happened is
/// visible through [`infertap_cupti_state`] and one line on stderr.
#[no_mangle]
pub extern "C" fn InitializeInjection() -> i32 {
    INIT.call_once(|| {
        let state = match catch_unwind(init) {
            Ok(s) => s,
            Err(_) => {
                inc(&COUNTERS.panics);
                State::Failed
            }
        };
        STATE.store(state as u8, Relaxed);
    });
    1
}

/// The library's [`State`] as an integer (for tests and diagnostics).
#[no_mangle]
pub extern "C" fn infertap_cupti_state() -> i32 {
    STATE.load(Relaxed) as i32
}

fn say(msg: &str) {
    eprintln!("infertap-cupti[{}]: {msg}", std::process::id());
}

fn has_symbol(name: &str) -> bool {
    // SAFETY: only looks the symbol up; culib() is loaded (is_culib_present checked first).
    unsafe { sys::culib().get::<*const ()>(name.as_bytes()).is_ok() }
}

fn ok(r: CUptiResult) -> bool {
    if r == CUptiResult::CUPTI_SUCCESS {
        true
    } else {
        inc(&COUNTERS.cupti_errors);
        false
    }
}

fn init() -> State {
    if let Some(path) = std::env::var_os("INFERTAP_CUPTI_LIB") {
        // Loaded once and kept: cudarc then finds it by soname.
        match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => std::mem::forget(lib),
            Err(e) => say(&format!("cannot load INFERTAP_CUPTI_LIB={path:?}: {e}")),
        }
    }
    // SAFETY: only tries to dlopen the library.
    if !unsafe { sys::is_culib_present() } {
        say("libcupti not found (set INFERTAP_CUPTI_LIB); GPU activity tracing disabled");
        return State::NoCupti;
    }
    for f in [
        "cuptiGetVersion",
        "cuptiGetTimestamp",
        "cuptiActivityRegisterCallbacks",
        "cuptiActivityEnable",
        "cuptiActivityDisable",
        "cuptiActivityGetNextRecord",
        "cuptiActivityGetNumDroppedRecords",
        "cuptiActivityFlushAll",
    ] {
        if !has_symbol(f) {
            say(&format!(
                "libcupti lacks {f}; GPU activity tracing disabled"
            ));
            return State::Failed;
        }
    }
    let mut version = 0u32;
    // SAFETY: valid out pointer.
    ok(unsafe { sys::cuptiGetVersion(&mut version) });

    let (tx, rx) = sync_channel(QUEUE_BATCHES);
    let (done_tx, done_rx) = sync_channel(1);
    let wanted = std::env::var("INFERTAP_CUPTI_DETAIL")
        .ok()
        .and_then(|s| DetailLevel::parse(&s))
        .unwrap_or(DetailLevel::Full);
    let pool = (0..POOL_BUFFERS)
        .map(|_| {
            // u64 elements: CUPTI needs 8-byte aligned buffers.
            let buf = vec![0u64; BUFFER_SIZE / 8].into_boxed_slice();
            Box::leak(buf).as_mut_ptr() as usize
        })
        .collect();
    let rt = Runtime {
        pool: Mutex::new(pool),
        names: Mutex::new(Names::default()),
        ctx_device: Mutex::new(HashMap::new()),
        tx,
        offset_ns: AtomicI64::new(clock_offset().unwrap_or(0)),
        wanted: AtomicU8::new(wanted as u8),
        applied: AtomicU8::new(DetailLevel::Off as u8),
        cupti_version: AtomicU32::new(version),
        socket: std::env::var_os(wire::SOCKET_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(wire::DEFAULT_SOCKET)),
        stop: AtomicBool::new(false),
        done: Mutex::new(Some(done_rx)),
        launches: LaunchRing::new(RING_CAPACITY),
        subscriber: AtomicUsize::new(0),
        launch_tracing: AtomicBool::new(false),
    };
    if RT.set(rt).is_err() {
        return State::Failed;
    }
    // SAFETY: plain CUPTI calls with valid function pointers.
    if !ok(unsafe {
        sys::cuptiActivityRegisterCallbacks(Some(buffer_requested), Some(buffer_completed))
    }) {
        say("cuptiActivityRegisterCallbacks failed (another CUPTI client?); tracing disabled");
        return State::Failed;
    }
    if has_symbol("cuptiActivityFlushPeriod") {
        // SAFETY: plain CUPTI call.
        ok(unsafe { sys::cuptiActivityFlushPeriod(FLUSH_PERIOD_MS) });
    }
    subscribe_launches();
    apply_detail(wanted);
    let spawned = std::thread::Builder::new()
        .name("infertap-cupti".into())
        .spawn(move || {
            if catch_unwind(AssertUnwindSafe(|| sender_loop(rx))).is_err() {
                inc(&COUNTERS.panics);
            }
            let _ = done_tx.try_send(());
        });
    if spawned.is_err() {
        apply_detail(DetailLevel::Off);
        return State::Failed;
    }
    // SAFETY: registering a plain extern "C" fn.
    unsafe { libc::atexit(at_exit) };
    State::Active
}

/// Our callback with CUPTI's enums taken as the integers they are on the ABI (an unexpected
/// value must not be undefined behaviour).
unsafe extern "C" fn api_callback(
    _userdata: *mut c_void,
    domain: u32,
    cbid: u32,
    data: *const c_void,
) {
    // First: the call's time as close to its entry (or exit) as we get.
    let now = monotonic_ns();
    let r = catch_unwind(AssertUnwindSafe(|| {
        if let Some(rt) = RT.get() {
            // SAFETY: CUPTI passes callback data valid for this call.
            unsafe { launches::record_api(&rt.launches, now, domain, cbid, data) };
        }
    }));
    if r.is_err() {
        inc(&COUNTERS.panics);
    }
}

/// Subscribes to CUPTI's callback API for the launch callbacks (enabled per detail level by
/// [`apply_launch_callbacks`]). CUPTI admits one subscriber per process: when a profiler already
/// holds it, kernels are still traced but their GPU time cannot be attributed to call paths.
fn subscribe_launches() {
    let Some(rt) = RT.get() else { return };
    if !has_symbol("cuptiSubscribe") || !has_symbol("cuptiEnableCallback") {
        say("libcupti lacks the callback API; GPU time by call path disabled");
        return;
    }
    type Ours = unsafe extern "C" fn(*mut c_void, u32, u32, *const c_void);
    type Theirs = unsafe extern "C" fn(*mut c_void, sys::CUpti_CallbackDomain, u32, *const c_void);
    // SAFETY: the same C ABI: CUpti_CallbackDomain is a repr(u32) enum.
    let cb = unsafe { std::mem::transmute::<Ours, Theirs>(api_callback) };
    let mut handle: sys::CUpti_SubscriberHandle = std::ptr::null_mut();
    // SAFETY: valid out pointer and callback.
    let r = unsafe { sys::cuptiSubscribe(&mut handle, Some(cb), std::ptr::null_mut()) };
    if r != CUptiResult::CUPTI_SUCCESS || handle.is_null() {
        inc(&COUNTERS.cupti_errors);
        say(&format!(
            "cuptiSubscribe failed ({r:?}; another CUPTI subscriber?): kernels are traced, GPU time by call path is not"
        ));
        return;
    }
    launches::install_fork_handler();
    rt.subscriber.store(handle as usize, Relaxed);
}

/// Turns the launch callbacks on or off: kernel launches when kernels are traced, graph launches
/// whenever anything is. Callback ids an older CUPTI does not know are refused and skipped.
fn apply_launch_callbacks(kernels: bool, graphs: bool) {
    let Some(rt) = RT.get() else { return };
    let handle = rt.subscriber.load(Relaxed) as sys::CUpti_SubscriberHandle;
    if handle.is_null() {
        return;
    }
    let mut on = 0;
    for (list, want) in [
        (&KERNEL_LAUNCHES[..], kernels),
        (&GRAPH_LAUNCHES[..], graphs),
    ] {
        for &(domain, cbid) in list {
            let d = match domain {
                ApiDomain::Driver => sys::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API,
                ApiDomain::Runtime => sys::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_RUNTIME_API,
            };
            // SAFETY: plain CUPTI call with our live subscriber.
            let r = unsafe { sys::cuptiEnableCallback(want as u32, handle, d, cbid) };
            if want && r == CUptiResult::CUPTI_SUCCESS {
                on += 1;
            }
        }
    }
    if on > 0 && !rt.launch_tracing.load(Relaxed) {
        rt.launches.set_tracing_since(monotonic_ns());
    }
    rt.launch_tracing.store(on > 0, Relaxed);
}

/// Enables the CUPTI activity kinds of `level`; returns the level in effect.
///
/// `Graphs`: with `CUPTI_ACTIVITY_KIND_GRAPH_TRACE` on, CUPTI reports a graph launch as one record
/// instead of one per node (as Nsight's `--cuda-graph-trace=graph`); kernels, copies and memsets
/// issued outside graphs are still traced where CUPTI accepts node kinds alongside graph tracing
/// (node kinds are switched off first and re-enabled after, since enabling graph tracing while
/// they are on may be refused). If graph tracing itself is refused, falls back to `Full`.
fn apply_detail(level: DetailLevel) -> DetailLevel {
    let node = [
        K::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
        K::CUPTI_ACTIVITY_KIND_MEMCPY,
        K::CUPTI_ACTIVITY_KIND_MEMSET,
    ];
    let sync = K::CUPTI_ACTIVITY_KIND_SYNCHRONIZATION;
    let graph = K::CUPTI_ACTIVITY_KIND_GRAPH_TRACE;
    // SAFETY (all calls below): plain CUPTI calls taking an enum.
    let enable = |k| ok(unsafe { sys::cuptiActivityEnable(k) });
    let try_enable = |k| unsafe { sys::cuptiActivityEnable(k) } == CUptiResult::CUPTI_SUCCESS;
    let disable = |k| {
        unsafe { sys::cuptiActivityDisable(k) };
    };
    // Whether kernel records are on (then kernel launches are worth timing).
    let mut kernels = false;
    let applied = match level {
        DetailLevel::Off => {
            node.into_iter().chain([sync, graph]).for_each(disable);
            DetailLevel::Off
        }
        DetailLevel::Full => {
            disable(graph);
            node.into_iter().chain([sync]).for_each(|k| {
                kernels |= enable(k) && k == node[0];
            });
            DetailLevel::Full
        }
        DetailLevel::Graphs => {
            node.into_iter().for_each(disable);
            enable(sync);
            let graphs = enable(graph);
            // Graph mode: node kinds only for work outside graphs, if CUPTI allows the mix.
            // Refused graph tracing: node kinds as in Full.
            node.into_iter().for_each(|k| {
                let on = if graphs { try_enable(k) } else { enable(k) };
                kernels |= on && k == node[0];
            });
            if graphs {
                DetailLevel::Graphs
            } else {
                DetailLevel::Full
            }
        }
    };
    apply_launch_callbacks(kernels, applied != DetailLevel::Off);
    if let Some(rt) = RT.get() {
        rt.applied.store(applied as u8, Relaxed);
    }
    applied
}

/// Offset from CUPTI's clock to CLOCK_MONOTONIC, from the tightest of a few bracketed readings.
fn clock_offset() -> Option<i64> {
    let mut best: Option<(u64, i64)> = None;
    for _ in 0..5 {
        let t0 = monotonic_ns();
        let mut c = 0u64;
        // SAFETY: valid out pointer.
        if unsafe { sys::cuptiGetTimestamp(&mut c) } != CUptiResult::CUPTI_SUCCESS {
            inc(&COUNTERS.cupti_errors);
            return best.map(|b| b.1);
        }
        let t1 = monotonic_ns();
        let width = t1 - t0;
        let off = (t0 + width / 2) as i64 - c as i64;
        if best.is_none_or(|(w, _)| width < w) {
            best = Some((width, off));
        }
    }
    best.map(|b| b.1)
}

/// CUPTI wants a buffer. Hands out a pooled one, or none (CUPTI then drops and counts records).
unsafe extern "C" fn buffer_requested(
    buffer: *mut *mut u8,
    size: *mut usize,
    max_records: *mut usize,
) {
    let got = catch_unwind(|| RT.get().and_then(|rt| rt.pool.lock().ok()?.pop()));
    let got = got.unwrap_or_else(|_| {
        inc(&COUNTERS.panics);
        None
    });
    if got.is_none() {
        inc(&COUNTERS.buffers_exhausted);
    }
    // SAFETY: CUPTI passes valid out pointers.
    unsafe {
        *buffer = got.map_or(std::ptr::null_mut(), |p| p as *mut u8);
        *size = if got.is_some() { BUFFER_SIZE } else { 0 };
        *max_records = 0; // as many as fit
    }
}

/// CUPTI returns a buffer holding `valid` bytes of records: decode, queue, recycle the buffer.
unsafe extern "C" fn buffer_completed(
    ctx: CUcontext,
    stream: u32,
    buffer: *mut u8,
    _size: usize,
    valid: usize,
) {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let Some(rt) = RT.get() else { return };
        if !buffer.is_null() && valid > 0 {
            // SAFETY: CUPTI hands back a buffer we gave it with `valid` initialized bytes.
            unsafe { rt.process(buffer, valid) };
        }
        let mut dropped = 0usize;
        // SAFETY: ctx/stream as CUPTI passed them; valid out pointer.
        if unsafe { sys::cuptiActivityGetNumDroppedRecords(ctx, stream, &mut dropped) }
            == CUptiResult::CUPTI_SUCCESS
        {
            COUNTERS.cupti_dropped.fetch_add(dropped as u64, Relaxed);
        }
    }));
    if r.is_err() {
        inc(&COUNTERS.panics);
    }
    if !buffer.is_null() {
        if let Some(mut pool) = RT.get().and_then(|rt| rt.pool.lock().ok()) {
            pool.push(buffer as usize);
        }
    }
}

impl Runtime {
    /// # Safety
    /// `buffer` must hold `valid` bytes of CUPTI activity records.
    unsafe fn process(&self, buffer: *mut u8, valid: usize) {
        let end = buffer as usize + valid;
        let offset = self.offset_ns.load(Relaxed);
        let mut batch = Vec::new();
        let mut record: *mut sys::CUpti_Activity = std::ptr::null_mut();
        loop {
            // SAFETY: CUPTI's own iterator over the buffer it filled.
            let st = unsafe { sys::cuptiActivityGetNextRecord(buffer, valid, &mut record) };
            if st != CUptiResult::CUPTI_SUCCESS || record.is_null() {
                break; // CUPTI_ERROR_MAX_LIMIT_REACHED: end of buffer
            }
            let start = record as usize;
            if start >= end {
                break;
            }
            // SAFETY: the record lies inside the valid part of the buffer.
            let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
            match decode_record(bytes) {
                Ok(d) => {
                    let mut a = d.activity;
                    a.start_ns = map_time(a.start_ns, offset);
                    a.end_ns = map_time(a.end_ns, offset);
                    if a.kind == ActivityKind::Kernel && d.name_ptr != 0 {
                        // SAFETY: CUPTI's NUL-terminated kernel name, alive during the callback.
                        let name = unsafe { CStr::from_ptr(d.name_ptr as *const c_char) };
                        if let Ok(mut names) = self.names.lock() {
                            a.name_id = names.intern(name.to_bytes());
                        }
                    }
                    self.resolve_device(&mut a);
                    batch.push(a);
                }
                Err(RecordError::UnknownKind(_)) => inc(&COUNTERS.unknown_kind),
                Err(_) => inc(&COUNTERS.bad_records),
            }
        }
        if batch.is_empty() {
            return;
        }
        COUNTERS.records.fetch_add(batch.len() as u64, Relaxed);
        match self.tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => inc(&COUNTERS.queue_full),
            Err(TrySendError::Disconnected(_)) => inc(&COUNTERS.no_agent),
        }
    }

    fn resolve_device(&self, a: &mut Activity) {
        let Ok(mut map) = self.ctx_device.lock() else {
            return;
        };
        if a.device == DEVICE_UNKNOWN {
            if let Some(&d) = map.get(&a.context) {
                a.device = d;
            }
        } else if map.len() < 4096 {
            map.insert(a.context, a.device);
        }
    }
}

/// Process exit: force CUPTI to hand over what it holds and give the sender a moment to write it.
extern "C" fn at_exit() {
    let _ = catch_unwind(|| {
        let Some(rt) = RT.get() else { return };
        // SAFETY: plain CUPTI call; FORCED also flushes records still in flight.
        unsafe {
            sys::cuptiActivityFlushAll(
                sys::CUpti_ActivityFlag::CUPTI_ACTIVITY_FLAG_FLUSH_FORCED as u32,
            )
        };
        rt.stop.store(true, Relaxed);
        if let Some(done) = rt.done.lock().ok().and_then(|mut d| d.take()) {
            let _ = done.recv_timeout(Duration::from_millis(500));
        }
    });
}

/// One connection to the agent.
struct Conn {
    stream: UnixStream,
    /// Names (ids 1..=names_sent) already defined on this connection.
    names_sent: usize,
}

fn connect(rt: &Runtime) -> Option<Conn> {
    let stream = UnixStream::connect(&rt.socket).ok()?;
    stream.set_nonblocking(true).ok()?;
    let mut conn = Conn {
        stream,
        names_sent: 0,
    };
    let mut out = Vec::new();
    let detail = DetailLevel::from_u8(rt.applied.load(Relaxed)).unwrap_or(DetailLevel::Off);
    encode_frame(
        &Frame::Hello(Hello {
            pid: std::process::id(),
            cupti_version: rt.cupti_version.load(Relaxed),
            detail,
        }),
        &mut out,
    );
    write_all(&conn.stream, &out).ok()?;
    conn.names_sent = 0;
    Some(conn)
}

/// Writes all of `buf` on the non-blocking socket, waiting for room up to [`WRITE_DEADLINE`].
/// `MSG_NOSIGNAL`: a vanished agent must not raise SIGPIPE in the host process.
fn write_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let deadline = Instant::now() + WRITE_DEADLINE;
    while !buf.is_empty() {
        // SAFETY: valid fd and buffer.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            buf = &buf[n as usize..];
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            }
            _ => return Err(err),
        }
    }
    Ok(())
}

/// Reads pending detail-level bytes from the agent; the last valid one wins.
/// `Err`: the agent closed the connection.
fn read_control(stream: &UnixStream) -> io::Result<Option<DetailLevel>> {
    let mut last = None;
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: valid fd and buffer.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(last),
                io::ErrorKind::Interrupted => continue,
                _ => Err(err),
            };
        }
        if let Some(l) = buf[..n as usize]
            .iter()
            .rev()
            .find_map(|&b| DetailLevel::from_u8(b))
        {
            last = Some(l);
        }
    }
}

fn send_batch(
    rt: &Runtime,
    conn: &mut Conn,
    batch: &[Activity],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    out.clear();
    // Define every name the batch may use before the batch (ids only grow).
    let new_names: Vec<(u32, String)> = match rt.names.lock() {
        Ok(names) if names.list.len() > conn.names_sent => names.list[conn.names_sent..]
            .iter()
            .enumerate()
            .map(|(i, n)| ((conn.names_sent + i + 1) as u32, n.clone()))
            .collect(),
        _ => Vec::new(),
    };
    if !new_names.is_empty() {
        encode_frame(&Frame::Names(new_names.clone()), out);
    }
    for chunk in batch.chunks(FRAME_ACTIVITIES) {
        encode_frame(&Frame::Activities(chunk.to_vec()), out);
    }
    write_all(&conn.stream, out)?;
    conn.names_sent += new_names.len();
    Ok(())
}

/// Sends what the launch ring holds (or drops it, counted, without an agent).
fn send_launches(
    rt: &Runtime,
    conn: &mut Option<Conn>,
    scratch: &mut Vec<Launch>,
    out: &mut Vec<u8>,
) {
    // Bounded: the ring's content at most, plus what producers add meanwhile.
    for _ in 0..=RING_CAPACITY / FRAME_LAUNCHES {
        scratch.clear();
        rt.launches.drain_into(scratch, FRAME_LAUNCHES);
        if scratch.is_empty() {
            return;
        }
        let n = scratch.len() as u64;
        let Some(c) = conn.as_ref() else {
            COUNTERS.launches_unsent.fetch_add(n, Relaxed);
            continue;
        };
        out.clear();
        let frame = Frame::Launches(std::mem::take(scratch));
        encode_frame(&frame, out);
        if let Frame::Launches(v) = frame {
            *scratch = v;
        }
        if write_all(&c.stream, out).is_err() {
            COUNTERS.launches_unsent.fetch_add(n, Relaxed);
            inc(&COUNTERS.no_agent);
            *conn = None;
        }
    }
}

fn send_stats(conn: &Conn, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    encode_frame(&Frame::Stats(COUNTERS.snapshot()), out);
    write_all(&conn.stream, out)
}

fn sender_loop(rx: Receiver<Vec<Activity>>) {
    let Some(rt) = RT.get() else { return };
    let mut conn: Option<Conn> = None;
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    let mut last_connect: Option<Instant> = None;
    let mut last_tick = Instant::now();
    let flush_manually = !has_symbol("cuptiActivityFlushPeriod");
    loop {
        if conn.is_none() && last_connect.is_none_or(|t| t.elapsed() >= RECONNECT_EVERY) {
            last_connect = Some(Instant::now());
            conn = connect(rt);
        }
        let stopping = rt.stop.load(Relaxed);
        let next = if stopping {
            rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
        } else {
            rx.recv_timeout(TICK)
        };
        // Launch records before the batch: a kernel's launch was recorded before CUPTI could
        // complete a buffer holding the kernel, so the agent sees launches first.
        send_launches(rt, &mut conn, &mut scratch, &mut out);
        match next {
            Ok(batch) => match conn.as_mut() {
                Some(c) => match send_batch(rt, c, &batch, &mut out) {
                    Ok(()) => inc(&COUNTERS.batches_sent),
                    Err(_) => {
                        inc(&COUNTERS.no_agent);
                        conn = None;
                    }
                },
                None => inc(&COUNTERS.no_agent),
            },
            Err(RecvTimeoutError::Timeout) if stopping => {
                if let Some(c) = &conn {
                    let _ = send_stats(c, &mut out);
                }
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if last_tick.elapsed() >= STATS_EVERY {
            last_tick = Instant::now();
            if flush_manually {
                // SAFETY: plain CUPTI call; 0 = deliver buffers with completed records.
                ok(unsafe { sys::cuptiActivityFlushAll(0) });
            }
            if let Some(off) = clock_offset() {
                rt.offset_ns.store(off, Relaxed);
            }
            if let Some(c) = &conn {
                match read_control(&c.stream) {
                    Ok(Some(level)) => rt.wanted.store(level as u8, Relaxed),
                    Ok(None) => {}
                    Err(_) => conn = None,
                }
            }
            let wanted = rt.wanted.load(Relaxed);
            if wanted != rt.applied.load(Relaxed) {
                if let Some(level) = DetailLevel::from_u8(wanted) {
                    let applied = apply_detail(level);
                    // A refused level is not retried every tick.
                    rt.wanted.store(applied as u8, Relaxed);
                }
            }
            if let Some(c) = &conn {
                if send_stats(c, &mut out).is_err() {
                    conn = None;
                }
            }
        }
    }
}
