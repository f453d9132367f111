//! Socket syscall tracepoints.
//!
//! Filtering happens here, in the kernel, in two steps so untraced processes pay one hash lookup:
//! 1. `TARGETS`: is the calling thread's process traced? (tgid set; children are added on fork)
//! 2. `CONNS`: is this fd a connection the process accepted (or that user space adopted)? Pipes,
//!    stdout, eventfds and the event loop's self-wakeup socketpair never get past this.
//!
//! Each traced syscall is an entry/exit pair: the entry stores its arguments per thread in
//! `INFLIGHT`; the exit knows the byte count, copies a bounded prefix of the payload from user
//! memory and emits one record (`EventHeader` + payload) to `EVENTS`.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated as gen},
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use infertap_common::{
    counter, kind, syscall as sc, ConnInfo, ConnKey, EventHeader, HEADER_LEN, MAX_CAPTURE,
};

// ---- configuration, written by user space before load ----------------------------------------

/// Bytes of payload to copy per syscall (≤ MAX_CAPTURE).
#[unsafe(no_mangle)]
static CAPTURE_BYTES: u32 = infertap_common::DEFAULT_CAPTURE;
/// Unread bytes in the ring buffer above which a record wakes the consumer; below it records
/// are written without a wake-up (the consumer also polls), which saves 1–2 µs per event.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 256 * 1024;
/// Offset of `child_pid` in the sched_process_fork tracepoint record (it moved across kernel
/// versions; user space reads it from the tracepoint's format file).
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 20;

#[inline(always)]
fn config<T: Copy>(v: &T) -> T {
    // SAFETY: reading a plain global; volatile so the loader's rewritten value is used.
    unsafe { core::ptr::read_volatile(v) }
}

// ---- maps ------------------------------------------------------------------------------------

/// Traced processes (tgid → 1). Threads' tids may appear too (fork tracepoint fires for threads);
/// they are harmless because lookups use the tgid, and are removed when the thread exits.
#[map]
static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(8192, 0);

/// Traced connections.
#[map]
static CONNS: HashMap<ConnKey, ConnInfo> = HashMap::with_max_entries(65536, 0);

/// Arguments of the syscall in progress on each thread (LRU: a thread killed inside a syscall
/// never reaches the exit, and its entry must not leak).
#[map]
static INFLIGHT: LruHashMap<u64, Inflight> = LruHashMap::with_max_entries(16384, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// One record being assembled (header + payload), per CPU: too large for the 512-byte stack.
#[map]
static SCRATCH: PerCpuArray<Record> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// How the payload of a syscall is laid out in user memory: a flat buffer (read, write,
/// recvfrom, sendto) or a sockaddr (accept).
const LAYOUT_BUF: u8 = 1;
/// An iovec array (readv, writev).
const LAYOUT_IOV: u8 = 2;
/// A msghdr (recvmsg, sendmsg).
const LAYOUT_MSG: u8 = 3;
/// An mmsghdr array (recvmmsg, sendmmsg).
const LAYOUT_MMSG: u8 = 4;

/// Most iovecs walked per syscall (bounded loop for the verifier).
const MAX_IOV: u64 = 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct Inflight {
    ts_enter_ns: u64,
    conn_id: u64,
    ptr: u64,
    count: u64,
    fd: i32,
    kind: u8,
    syscall: u8,
    layout: u8,
    _pad: u8,
}

#[repr(C)]
struct Record {
    header: EventHeader,
    // Offsets are masked below MAX_CAPTURE and lengths below 2*MAX_CAPTURE so every copy is
    // provably inside this buffer.
    data: [u8; 3 * MAX_CAPTURE],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MsgHdr {
    name: u64,
    namelen: u32,
    _pad0: u32,
    iov: u64,
    iovlen: u64,
    control: u64,
    controllen: u64,
    flags: u32,
    _pad1: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MMsgHdr {
    hdr: MsgHdr,
    len: u32,
    _pad: u32,
}

const EAGAIN: i64 = 11;
const EINTR: i64 = 4;
const EINPROGRESS: i64 = 115;

#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // Syscall tracepoint records: 8 bytes of common fields, the syscall nr, then 8-byte args.
    // SAFETY: offsets inside the syscall tracepoint record.
    unsafe { ctx.read_at::<u64>(16 + 8 * n).unwrap_or(0) }
}

#[inline(always)]
pub(crate) fn is_target(tgid: u32) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { TARGETS.get(&tgid).is_some() }
}

// ---- entry: remember the arguments of syscalls on traced connections -------------------------

#[inline(always)]
fn enter_io(ctx: &TracePointContext, kind: u8, syscall: u8, layout: u8) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let fd = arg(ctx, 0) as i32;
    // SAFETY: value copied out immediately.
    let Some(conn) = (unsafe { CONNS.get(&ConnKey { tgid, fd }) }) else {
        return 0;
    };
    bump(counter::TRACED_SYSCALLS);
    let inflight = Inflight {
        ts_enter_ns: unsafe { bpf_ktime_get_ns() },
        conn_id: conn.conn_id,
        ptr: arg(ctx, 1),
        count: arg(ctx, 2),
        fd,
        kind,
        syscall,
        layout,
        _pad: 0,
    };
    if INFLIGHT.insert(&id, &inflight, 0).is_err() {
        bump(counter::INFLIGHT_FULL);
    }
    0
}

macro_rules! enter_program {
    ($name:ident, $kind:expr, $syscall:expr, $layout:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            enter_io(&ctx, $kind, $syscall, $layout)
        }
    };
}

enter_program!(enter_read, kind::READ, sc::READ, LAYOUT_BUF);
enter_program!(enter_readv, kind::READ, sc::READV, LAYOUT_IOV);
enter_program!(enter_recvfrom, kind::READ, sc::RECVFROM, LAYOUT_BUF);
enter_program!(enter_recvmsg, kind::READ, sc::RECVMSG, LAYOUT_MSG);
enter_program!(enter_recvmmsg, kind::READ, sc::RECVMMSG, LAYOUT_MMSG);
enter_program!(enter_write, kind::WRITE, sc::WRITE, LAYOUT_BUF);
enter_program!(enter_writev, kind::WRITE, sc::WRITEV, LAYOUT_IOV);
enter_program!(enter_sendto, kind::WRITE, sc::SENDTO, LAYOUT_BUF);
enter_program!(enter_sendmsg, kind::WRITE, sc::SENDMSG, LAYOUT_MSG);
enter_program!(enter_sendmmsg, kind::WRITE, sc::SENDMMSG, LAYOUT_MMSG);

/// accept/accept4 entry: remember where the kernel will write the peer address.
#[inline(always)]
fn enter_accept(ctx: &TracePointContext, syscall: u8) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if !is_target((id >> 32) as u32) {
        return 0;
    }
    let inflight = Inflight {
        ts_enter_ns: unsafe { bpf_ktime_get_ns() },
        conn_id: 0,
        ptr: arg(ctx, 1),
        count: 0,
        fd: arg(ctx, 0) as i32,
        kind: kind::ACCEPT,
        syscall,
        layout: LAYOUT_BUF,
        _pad: 0,
    };
    if INFLIGHT.insert(&id, &inflight, 0).is_err() {
        bump(counter::INFLIGHT_FULL);
    }
    0
}

#[tracepoint]
pub fn enter_accept4(ctx: TracePointContext) -> u32 {
    enter_accept(&ctx, sc::ACCEPT4)
}

#[tracepoint]
pub fn enter_accept_plain(ctx: TracePointContext) -> u32 {
    enter_accept(&ctx, sc::ACCEPT)
}

/// close entry: stop tracing the connection and tell user space.
#[tracepoint]
pub fn enter_close(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let key = ConnKey {
        tgid,
        fd: arg(&ctx, 0) as i32,
    };
    // SAFETY: value copied out immediately.
    let Some(conn) = (unsafe { CONNS.get(&key) }).copied() else {
        return 0;
    };
    let _ = CONNS.remove(&key);
    let now = unsafe { bpf_ktime_get_ns() };
    let header = EventHeader {
        ts_enter_ns: now,
        ts_exit_ns: now,
        pid_tgid: id,
        conn_id: conn.conn_id,
        ret: 0,
        fd: key.fd,
        captured: 0,
        kind: kind::CLOSE,
        syscall: sc::CLOSE,
    };
    emit_header(&header);
    0
}

// ---- exit: byte counts, payload, new connections ---------------------------------------------

/// accept/accept4 exit. Works without a recorded entry too: a server thread is usually already
/// blocked in accept() when the agent attaches, and its next connection must not be missed
/// (user space then finds the peer address in /proc).
#[tracepoint]
pub fn exit_accept(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // SAFETY: value copied out immediately.
    let inflight = (unsafe { INFLIGHT.get(&id) }).copied();
    if inflight.is_some() {
        let _ = INFLIGHT.remove(&id);
    }
    if !is_target(tgid) {
        return 0;
    }
    let ret = arg(&ctx, 0) as i64;
    if ret < 0 {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let key = ConnKey {
        tgid,
        fd: ret as i32,
    };
    if CONNS.insert(&key, &ConnInfo { conn_id: now }, 0).is_err() {
        bump(counter::CONN_MAP_FULL);
        return 0;
    }
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch slot, exclusively ours for this program run.
    let rec = unsafe { &mut *rec };
    let (ts_enter_ns, syscall, addr) = match inflight {
        Some(i) if i.kind == kind::ACCEPT => (i.ts_enter_ns, i.syscall, i.ptr),
        _ => (now, sc::ACCEPT4, 0),
    };
    rec.header = EventHeader {
        ts_enter_ns,
        ts_exit_ns: now,
        pid_tgid: id,
        conn_id: now,
        ret,
        fd: ret as i32,
        captured: 0,
        kind: kind::ACCEPT,
        syscall,
    };
    // The peer address, if the caller asked for it (sockaddr_in6 is the largest we decode).
    if addr != 0 && copy_user(rec.data.as_mut_ptr(), 0, addr, 28) {
        rec.header.captured = 28;
    }
    emit_record(rec)
}

/// One exit program serves every traced syscall: the entry recorded how to read the payload.
#[tracepoint]
pub fn exit_io(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: value copied out immediately.
    let Some(inflight) = (unsafe { INFLIGHT.get(&id) }).copied() else {
        return 0;
    };
    let _ = INFLIGHT.remove(&id);
    if inflight.kind == kind::ACCEPT {
        // Accepts end in `exit_accept`; an entry left here belongs to an interrupted accept.
        return 0;
    }
    let ret = arg(&ctx, 0) as i64;
    if ret == -EAGAIN || ret == -EINTR || ret == -EINPROGRESS {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch slot, exclusively ours for this program run.
    let rec = unsafe { &mut *rec };
    rec.header = EventHeader {
        ts_enter_ns: inflight.ts_enter_ns,
        ts_exit_ns: now,
        pid_tgid: id,
        conn_id: inflight.conn_id,
        ret,
        fd: inflight.fd,
        captured: 0,
        kind: inflight.kind,
        syscall: inflight.syscall,
    };

    if ret > 0 {
        let limit = config(&CAPTURE_BYTES) as u64;
        let want = if (ret as u64) < limit {
            ret as u64
        } else {
            limit
        };
        if want < ret as u64 {
            bump(counter::PAYLOAD_TRUNCATED);
        }
        let got = match inflight.layout {
            LAYOUT_BUF => {
                if copy_user(rec.data.as_mut_ptr(), 0, inflight.ptr, want) {
                    want
                } else {
                    0
                }
            }
            LAYOUT_IOV => copy_iov(rec, inflight.ptr, inflight.count, want),
            LAYOUT_MSG => match unsafe { read_user::<MsgHdr>(inflight.ptr) } {
                Some(m) => copy_iov(rec, m.iov, m.iovlen, want),
                None => 0,
            },
            LAYOUT_MMSG => {
                // ret counts messages: report the first message's bytes (the common case is one).
                match unsafe { read_user::<MMsgHdr>(inflight.ptr) } {
                    Some(m) => {
                        rec.header.ret = m.len as i64;
                        let want = if (m.len as u64) < limit {
                            m.len as u64
                        } else {
                            limit
                        };
                        copy_iov(rec, m.hdr.iov, m.hdr.iovlen, want)
                    }
                    None => 0,
                }
            }
            _ => 0,
        };
        if got == 0 && want > 0 {
            bump(counter::PAYLOAD_FAULT);
        }
        rec.header.captured = got as u16;
    }
    emit_record(rec)
}

/// Copies up to `want` bytes spread over an iovec array into the record; returns bytes copied.
#[inline(always)]
fn copy_iov(rec: &mut Record, iov: u64, iovcnt: u64, want: u64) -> u64 {
    let mut off: u64 = 0;
    let mut i: u64 = 0;
    while i < MAX_IOV {
        if i >= iovcnt || off >= want {
            break;
        }
        let Some(v) =
            (unsafe { read_user::<IoVec>(iov + i * core::mem::size_of::<IoVec>() as u64) })
        else {
            break;
        };
        let rest = want - off;
        let n = if v.len < rest { v.len } else { rest };
        if n > 0 && !copy_user(rec.data.as_mut_ptr(), off, v.base, n) {
            break;
        }
        off += n;
        i += 1;
    }
    off
}

#[inline(always)]
unsafe fn read_user<T>(ptr: u64) -> Option<T> {
    unsafe { aya_ebpf::helpers::bpf_probe_read_user(ptr as *const T).ok() }
}

/// Copies `len` user bytes to `base + off`, with both bounded by masks the verifier can follow.
#[inline(always)]
fn copy_user(base: *mut u8, off: u64, src: u64, len: u64) -> bool {
    let off = (off as usize) & (MAX_CAPTURE - 1);
    let len = (len as usize) & (2 * MAX_CAPTURE - 1);
    if len == 0 {
        return true;
    }
    // SAFETY: off < MAX_CAPTURE and len < 2*MAX_CAPTURE keep the write inside `Record::data`.
    unsafe {
        gen::bpf_probe_read_user(
            base.add(off) as *mut c_void,
            len as u32,
            src as *const c_void,
        ) == 0
    }
}

#[inline(always)]
fn wakeup_flags() -> u64 {
    // BPF_RB_AVAIL_DATA = 0
    if EVENTS.query(0) >= config(&WAKEUP_BYTES) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn emit_record(rec: &mut Record) -> u32 {
    let len = HEADER_LEN + ((rec.header.captured as usize) & (2 * MAX_CAPTURE - 1));
    // SAFETY: `len` ≤ size_of::<Record>() by the mask above.
    let r = unsafe {
        gen::bpf_ringbuf_output(
            &EVENTS as *const RingBuf as *mut c_void,
            rec as *mut Record as *mut c_void,
            len as u64,
            wakeup_flags(),
        )
    };
    if r < 0 {
        bump(counter::RINGBUF_FULL);
    } else {
        bump(counter::EVENTS);
    }
    0
}

#[inline(always)]
fn emit_header(header: &EventHeader) {
    emit_small(header);
}

/// Emits a small fixed-size record built on the stack.
#[inline(always)]
pub(crate) fn emit_small<T>(record: &T) {
    match EVENTS.output::<T>(record, wakeup_flags()) {
        Ok(()) => bump(counter::EVENTS),
        Err(_) => bump(counter::RINGBUF_FULL),
    }
}

// ---- process lifecycle -----------------------------------------------------------------------

/// sched_process_fork: a traced process's children are traced too (pre-fork servers).
#[tracepoint]
pub fn on_fork(ctx: TracePointContext) -> u32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_target(parent) {
        return 0;
    }
    // SAFETY: offset from the tracepoint's format file.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(config(&FORK_CHILD_PID_OFFSET) as usize) }) else {
        return 0;
    };
    let _ = TARGETS.insert(&(child as u32), &1, 0);
    0
}

/// sched_process_exit fires per thread: a thread's entry is dropped quietly, a process's exit is
/// reported so user space can end its connections.
#[tracepoint]
pub fn on_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    let tid = id as u32;
    if tid != tgid {
        let _ = TARGETS.remove(&tid);
        return 0;
    }
    if !is_target(tgid) {
        return 0;
    }
    let _ = TARGETS.remove(&tgid);
    let now = unsafe { bpf_ktime_get_ns() };
    let header = EventHeader {
        ts_enter_ns: now,
        ts_exit_ns: now,
        pid_tgid: id,
        conn_id: 0,
        ret: 0,
        fd: -1,
        captured: 0,
        kind: kind::EXIT,
        syscall: 0,
    };
    emit_header(&header);
    0
}
