//! Socket syscall tracepoints.
//!
//! Filtering happens here, in the kernel, in two steps so untraced processes pay one hash lookup:
//! 1. `TARGETS`: is the calling thread's process traced? (tgid set; children are added on fork)
//! 2. `CONNS`: is this fd a connection the process accepted (or that user space adopted)? Pipes,
//!    stdout, eventfds and the event loop's self-wakeup socketpair never get past this.
//!
//! Only the syscall *exit* is traced: it knows the byte count, reads the syscall's arguments from
//! the task's saved user registers (`bpf_task_pt_regs`), copies a bounded prefix of the payload
//! and emits one record (`EventHeader` + payload) to `EVENTS`. Without entry probes there is one
//! tracepoint hit per syscall instead of two and no per-thread state to keep, which halves the
//! cost for every process and leaves ≈200 ns for a traced one.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{pt_regs, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated as gen},
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use infertap_common::{
    conn_flag, counter, kind, syscall as sc, ConnInfo, ConnKey, EventHeader, HEADER_LEN,
    MAX_CAPTURE,
};

use crate::arrival;

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
pub(crate) fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // Syscall tracepoint records: 8 bytes of common fields, the syscall nr, then 8-byte args.
    // SAFETY: offsets inside the syscall tracepoint record.
    unsafe { ctx.read_at::<u64>(16 + 8 * n).unwrap_or(0) }
}

#[inline(always)]
pub(crate) fn is_target(tgid: u32) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { TARGETS.get(&tgid).is_some() }
}

// ---- close: stop tracing the connection and tell user space ------------------------------

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
    if conn.sk != 0 {
        arrival::forget(conn.sk);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let header = EventHeader {
        ts_enter_ns: now,
        ts_exit_ns: now,
        pid_tgid: id,
        conn_id: conn.conn_id,
        ret: 0,
        arrival_ns: 0,
        flags: 0,
        aux: 0,
        fd: key.fd,
        captured: 0,
        kind: kind::CLOSE,
        syscall: sc::CLOSE,
    };
    emit_header(&header);
    0
}

// ---- exit: byte counts, payload, new connections ---------------------------------------------

/// This CPU's record under construction, with its header filled (no payload yet).
#[inline(always)]
fn scratch_record(
    pid_tgid: u64,
    now: u64,
    conn_id: u64,
    ret: i64,
    fd: i32,
    kind: u8,
    syscall: u8,
) -> Option<&'static mut Record> {
    let rec = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch slot, exclusively ours for this program run.
    let rec = unsafe { &mut *rec };
    rec.header = EventHeader {
        ts_enter_ns: now,
        ts_exit_ns: now,
        pid_tgid,
        conn_id,
        ret,
        arrival_ns: 0,
        flags: 0,
        aux: 0,
        fd,
        captured: 0,
        kind,
        syscall,
    };
    Some(rec)
}

/// The arguments of the current syscall, from the task's saved user registers
/// (System V syscall order: rdi, rsi, rdx, r10, r8, r9).
#[inline(always)]
pub(crate) fn syscall_args() -> Option<[u64; 4]> {
    // SAFETY: helpers returning kernel pointers; the registers are copied with a fault-tolerant
    // kernel read.
    unsafe {
        let task = gen::bpf_get_current_task_btf();
        let regs = gen::bpf_task_pt_regs(task) as *const pt_regs;
        if regs.is_null() {
            return None;
        }
        // pt_regs lays out r10, r9, r8, rax, rcx, rdx, rsi, rdi contiguously: read just that
        // 64-byte window.
        let window: [u64; 8] =
            aya_ebpf::helpers::bpf_probe_read_kernel(core::ptr::addr_of!((*regs).r10).cast())
                .ok()?;
        Some([window[7], window[6], window[5], window[0]])
    }
}

/// accept/accept4 exit: the new fd becomes a traced connection. No entry probe is needed, so a
/// server thread already blocked in accept() when the agent attaches is covered too.
#[tracepoint]
pub fn exit_accept(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
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
    let mut info = ConnInfo {
        conn_id: now,
        ..Default::default()
    };
    let mut established = 0;
    if arrival::enabled() {
        match arrival::sock_of_fd(ret as i32) {
            Some(sk) => {
                info.sk = sk;
                established = arrival::on_accepted(sk, true);
            }
            None => info.flags |= conn_flag::NO_SOCK,
        }
    }
    if CONNS.insert(&key, &info, 0).is_err() {
        bump(counter::CONN_MAP_FULL);
        return 0;
    }
    let Some(rec) = scratch_record(id, now, now, ret, ret as i32, kind::ACCEPT, sc::ACCEPT4) else {
        return 0;
    };
    rec.header.arrival_ns = established;
    // The peer address, if the caller asked for it (sockaddr_in6 is the largest we decode).
    let addr = syscall_args().map_or(0, |a| a[1]);
    if addr != 0 && copy_user(rec.data.as_mut_ptr(), 0, addr, 28) {
        rec.header.captured = 28;
    }
    emit_record(rec)
}

/// Exit of a read/write-family syscall.
#[inline(always)]
fn exit_io(ctx: &TracePointContext, kind: u8, syscall: u8, layout: u8) -> u32 {
    let ret = arg(ctx, 0) as i64;
    // Cheapest tests first: most syscalls of untraced processes stop here or at the next check.
    if ret == -EAGAIN || ret == -EINTR || ret == -EINPROGRESS || (ret == 0 && kind == kind::WRITE) {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let Some(args) = syscall_args() else {
        return 0;
    };
    let fd = args[0] as i32;
    let Some(conn) = CONNS.get_ptr_mut(&ConnKey { tgid, fd }) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for this program run; only this connection's own
    // syscalls (serialised by the server) write it.
    let conn = unsafe { &mut *conn };
    let now = unsafe { bpf_ktime_get_ns() };
    let mut arrival_ns = 0;
    if kind == kind::READ && ret > 0 && arrival::enabled() {
        if conn.sk == 0 && conn.flags & conn_flag::NO_SOCK == 0 {
            // A connection user space adopted (open before the agent started).
            match arrival::sock_of_fd(fd) {
                Some(sk) => {
                    conn.sk = sk;
                    arrival::on_accepted(sk, false);
                }
                None => conn.flags |= conn_flag::NO_SOCK,
            }
        }
        if conn.sk != 0 {
            arrival_ns = arrival::take_arrival(conn.sk);
        }
    } else if kind == kind::WRITE && ret > 0 && conn.sk != 0 {
        arrival_ns = arrival::departure(conn.sk, now);
    }
    let Some(rec) = scratch_record(id, now, conn.conn_id, ret, fd, kind, syscall) else {
        return 0;
    };
    rec.header.arrival_ns = arrival_ns;
    if ret > 0 {
        let limit = config(&CAPTURE_BYTES) as u64;
        let want = if (ret as u64) < limit {
            ret as u64
        } else {
            limit
        };
        let (ptr, count) = (args[1], args[2]);
        let got = match layout {
            LAYOUT_BUF => {
                if copy_user(rec.data.as_mut_ptr(), 0, ptr, want) {
                    want
                } else {
                    0
                }
            }
            LAYOUT_IOV => copy_iov(rec, ptr, count, want),
            LAYOUT_MSG => match unsafe { read_user::<MsgHdr>(ptr) } {
                Some(m) => copy_iov(rec, m.iov, m.iovlen, want),
                None => 0,
            },
            LAYOUT_MMSG => {
                // ret counts messages: report the first message's bytes (the common case is one).
                match unsafe { read_user::<MMsgHdr>(ptr) } {
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

macro_rules! exit_program {
    ($name:ident, $kind:expr, $syscall:expr, $layout:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            exit_io(&ctx, $kind, $syscall, $layout)
        }
    };
}

exit_program!(exit_read, kind::READ, sc::READ, LAYOUT_BUF);
exit_program!(exit_readv, kind::READ, sc::READV, LAYOUT_IOV);
exit_program!(exit_recvfrom, kind::READ, sc::RECVFROM, LAYOUT_BUF);
exit_program!(exit_recvmsg, kind::READ, sc::RECVMSG, LAYOUT_MSG);
exit_program!(exit_recvmmsg, kind::READ, sc::RECVMMSG, LAYOUT_MMSG);
exit_program!(exit_write, kind::WRITE, sc::WRITE, LAYOUT_BUF);
exit_program!(exit_writev, kind::WRITE, sc::WRITEV, LAYOUT_IOV);
exit_program!(exit_sendto, kind::WRITE, sc::SENDTO, LAYOUT_BUF);
exit_program!(exit_sendmsg, kind::WRITE, sc::SENDMSG, LAYOUT_MSG);
exit_program!(exit_sendmmsg, kind::WRITE, sc::SENDMMSG, LAYOUT_MMSG);

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

/// Records are written without waking the consumer (a wake-up costs 1–2 µs per event); the
/// agent drains the ring on a short poll. Only when the ring has filled past `WAKEUP_BYTES` (a
/// burst, or a stalled consumer) does a record wake it.
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
    if EVENTS.output::<T>(record, wakeup_flags()).is_err() {
        bump(counter::RINGBUF_FULL);
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

/// sched_process_exec: a traced process's image changed (e.g. a fork-then-exec'd worker), so
/// user space re-reads its mappings and looks for an interpreter again.
#[tracepoint]
pub fn on_exec(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    emit_header(&EventHeader {
        ts_enter_ns: now,
        ts_exit_ns: now,
        pid_tgid: id,
        conn_id: 0,
        ret: 0,
        arrival_ns: 0,
        flags: 0,
        aux: 0,
        fd: -1,
        captured: 0,
        kind: kind::EXEC,
        syscall: 0,
    });
    0
}

/// sched_process_exit fires per thread: a thread's entry is dropped quietly, a process's exit is
/// reported so user space can end its connections.
#[tracepoint]
pub fn on_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    let tid = id as u32;
    if !is_target(tgid) {
        if tid != tgid {
            let _ = TARGETS.remove(&tid);
        }
        return 0;
    }
    crate::profile::thread_exited(id);
    if tid != tgid {
        let _ = TARGETS.remove(&tid);
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
        arrival_ns: 0,
        flags: 0,
        aux: 0,
        fd: -1,
        captured: 0,
        kind: kind::EXIT,
        syscall: 0,
    };
    emit_header(&header);
    0
}
