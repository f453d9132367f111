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
    conn_flag, counter, flag, kind, syscall as sc, ConnInfo, ConnKey, EventHeader, HEADER_LEN,
    HEAD_CAPTURE, MAX_CAPTURE, TAIL_CAPTURE,
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

/// Bytes copied per `bpf_probe_read_user` call: longer spans are copied in pieces so each
/// call's length has a small bound the verifier can add to its destination offset.
const COPY_CHUNK: u64 = 4096;
/// Pieces per span: enough for the longest span (a head-window prefix of `HEAD_CAPTURE`).
const MAX_CHUNKS: u64 = (HEAD_CAPTURE as u64) / COPY_CHUNK;
/// Largest destination offset of a piece: the prefix ends at `HEAD_CAPTURE` at most and a tail
/// follows it.
const MAX_COPY_OFFSET: u64 = (HEAD_CAPTURE + TAIL_CAPTURE) as u64;
/// Payload room of a record: any piece (offset ≤ `MAX_COPY_OFFSET`, length masked below
/// `2 * COPY_CHUNK`) fits.
const RECORD_DATA: usize = HEAD_CAPTURE + TAIL_CAPTURE + 2 * COPY_CHUNK as usize;

#[repr(C)]
struct Record {
    header: EventHeader,
    // Every copy into it is bounded by `MAX_COPY_OFFSET` and `2 * COPY_CHUNK` (see
    // `copy_user`), so it is provably inside this buffer. 25 KiB per CPU.
    data: [u8; RECORD_DATA],
}

const _: () = assert!(MAX_CAPTURE as u64 <= HEAD_CAPTURE as u64);
const _: () = assert!(
    core::mem::size_of::<Record>() <= 32 * 1024,
    "per-CPU value limit"
);

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
        flags: conn_flag::HEAD,
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
    if addr != 0 && copy_user::<1>(rec.data.as_mut_ptr(), 0, addr, 28) {
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
    let Some(conn_ptr) = CONNS.get_ptr_mut(&ConnKey { tgid, fd }) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for this program run; only this connection's own
    // syscalls (serialised by the server) write it.
    let conn = unsafe { &mut *conn_ptr };
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
        capture_payload(rec, conn_ptr, kind, layout, ret as u64, args[1], args[2]);
    }
    emit_record(rec)
}

/// Copies the payload of a successful read/write into the record: a prefix of the per-syscall
/// capture (or, for reads in the connection's head window, of what is left of `HEAD_CAPTURE`),
/// and for writes longer than that, also their last bytes (`flag::TAIL`). Updates the
/// connection's head window.
#[inline(always)]
fn capture_payload(
    rec: &mut Record,
    conn: *mut ConnInfo,
    kind: u8,
    layout: u8,
    ret: u64,
    ptr: u64,
    count: u64,
) {
    // Where the bytes are (a flat buffer or an iovec array) and how many the syscall moved.
    let (iov, iovcnt, total) = match layout {
        LAYOUT_BUF => (ptr, 0, ret),
        LAYOUT_IOV => (ptr, count, ret),
        LAYOUT_MSG => match unsafe { read_user::<MsgHdr>(ptr) } {
            Some(m) => (m.iov, m.iovlen, ret),
            // Counted as a payload fault below (nothing can be copied).
            None => (0, 0, ret),
        },
        // ret counts messages: report the first message's bytes (the common case is one).
        LAYOUT_MMSG => match unsafe { read_user::<MMsgHdr>(ptr) } {
            Some(m) => {
                rec.header.ret = m.len as i64;
                (m.hdr.iov, m.hdr.iovlen, m.len as u64)
            }
            None => (0, 0, ret),
        },
        _ => (0, 0, 0),
    };
    let flat = layout == LAYOUT_BUF;
    let capture = config(&CAPTURE_BYTES) as u64;
    let mut limit = capture;
    // SAFETY: map value pointer, valid for this program run; only `flags` is written, by the
    // program handling this fd's syscall (a race with a concurrent syscall on the same fd only
    // mis-sizes one capture).
    let flags = unsafe { (*conn).flags };
    if kind == kind::READ {
        if flags & conn_flag::HEAD != 0 {
            let read = (flags >> conn_flag::HEAD_READ_SHIFT) as u64;
            let room = (HEAD_CAPTURE as u64).saturating_sub(read);
            if room > limit {
                limit = room;
                rec.header.flags |= flag::HEAD_WINDOW;
            }
            let read = read + total;
            let low = flags & ((1 << conn_flag::HEAD_READ_SHIFT) - 1);
            let new = if read >= HEAD_CAPTURE as u64 {
                low & !conn_flag::HEAD
            } else {
                low | ((read as u32) << conn_flag::HEAD_READ_SHIFT)
            };
            unsafe { (*conn).flags = new };
        }
    } else if flags & conn_flag::HEAD == 0 || flags >> conn_flag::HEAD_READ_SHIFT != 0 {
        // The server answered: the next read begins a new request.
        let low = flags & ((1 << conn_flag::HEAD_READ_SHIFT) - 1);
        unsafe { (*conn).flags = low | conn_flag::HEAD };
    }
    if limit > HEAD_CAPTURE as u64 {
        limit = HEAD_CAPTURE as u64;
    }
    let want = if total < limit { total } else { limit };
    if want == 0 {
        if total > 0 {
            bump(counter::PAYLOAD_FAULT);
        }
        return;
    }
    // Only reads have a head window: a write's prefix (≤ MAX_CAPTURE) is one piece, which keeps
    // the verifier's walk of the iovec loops small.
    let got = if kind == kind::READ {
        copy_span::<MAX_CHUNKS>(rec, flat, iov, iovcnt, 0, want, 0)
    } else {
        copy_span::<1>(rec, flat, iov, iovcnt, 0, want, 0)
    };
    if got < want {
        if got == 0 {
            bump(counter::PAYLOAD_FAULT);
        }
        rec.header.captured = got as u16;
        return;
    }
    let mut captured = got;
    if kind == kind::WRITE && total > want {
        let max_tail = if capture < TAIL_CAPTURE as u64 {
            capture
        } else {
            TAIL_CAPTURE as u64
        };
        let rest = total - want;
        let tail = if rest < max_tail { rest } else { max_tail };
        if tail > 0 && copy_span::<1>(rec, flat, iov, iovcnt, total - tail, tail, want) == tail {
            rec.header.flags |= flag::TAIL;
            rec.header.aux = tail as u32;
            captured += tail;
        }
    }
    rec.header.captured = captured as u16;
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

/// Copies bytes `[from, from + len)` of the syscall's payload (a flat buffer at `iov` when
/// `flat`, else an array of `iovcnt` iovecs) to `rec.data[dst..]`; returns the bytes copied
/// (fewer than `len` when user memory faulted or the iovecs ran out). `CHUNKS` pieces of
/// `COPY_CHUNK` at most are copied per iovec.
#[inline(always)]
fn copy_span<const CHUNKS: u64>(
    rec: &mut Record,
    flat: bool,
    iov: u64,
    iovcnt: u64,
    from: u64,
    len: u64,
    dst: u64,
) -> u64 {
    let base = rec.data.as_mut_ptr();
    if flat {
        return if copy_user::<CHUNKS>(base, dst, iov + from, len) {
            len
        } else {
            0
        };
    }
    let end = from + len;
    let mut pos: u64 = 0;
    let mut copied: u64 = 0;
    let mut i: u64 = 0;
    while i < MAX_IOV {
        if i >= iovcnt || pos >= end {
            break;
        }
        let Some(v) =
            (unsafe { read_user::<IoVec>(iov + i * core::mem::size_of::<IoVec>() as u64) })
        else {
            break;
        };
        let v_end = pos + v.len;
        if v_end > from {
            let start = if pos > from { pos } else { from };
            let stop = if v_end < end { v_end } else { end };
            let n = stop - start;
            if n > 0 && !copy_user::<CHUNKS>(base, dst + (start - from), v.base + (start - pos), n)
            {
                break;
            }
            copied += n;
        }
        pos = v_end;
        i += 1;
    }
    copied
}

#[inline(always)]
unsafe fn read_user<T>(ptr: u64) -> Option<T> {
    unsafe { aya_ebpf::helpers::bpf_probe_read_user(ptr as *const T).ok() }
}

/// Copies `len` (≤ `CHUNKS * COPY_CHUNK`) user bytes to `base + off`, in pieces of
/// `COPY_CHUNK` whose offsets and lengths have bounds the verifier can follow.
#[inline(always)]
fn copy_user<const CHUNKS: u64>(base: *mut u8, off: u64, src: u64, len: u64) -> bool {
    let mut done: u64 = 0;
    let mut i: u64 = 0;
    while i < CHUNKS {
        if done >= len {
            break;
        }
        let left = len - done;
        let n = if left < COPY_CHUNK { left } else { COPY_CHUNK };
        let at = off + done;
        if at > MAX_COPY_OFFSET {
            return false;
        }
        let n = (n as usize) & (2 * COPY_CHUNK as usize - 1);
        // SAFETY: at ≤ MAX_COPY_OFFSET and n < 2*COPY_CHUNK keep the write inside
        // `Record::data` (RECORD_DATA = MAX_COPY_OFFSET + 2*COPY_CHUNK).
        let r = unsafe {
            gen::bpf_probe_read_user(
                base.add(at as usize) as *mut c_void,
                n as u32,
                (src + done) as *const c_void,
            )
        };
        if r != 0 {
            return false;
        }
        done += n as u64;
        i += 1;
    }
    done >= len
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
    let mut data = rec.header.captured as usize;
    if data > RECORD_DATA {
        data = RECORD_DATA;
    }
    let len = HEADER_LEN + data;
    // SAFETY: `len` ≤ size_of::<Record>() by the bound above.
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
