//! When a request's bytes reached the server's socket, before the server read them.
//!
//! The syscall tracepoints in `sockets` see a request when the server *reads* it; a request that
//! waited in the accept queue or in the socket's receive buffer (a busy event loop, an overloaded
//! server) would start late and its TTFT would be short by exactly the wait users feel. Two TCP
//! tracepoints, which exist on kernels without kprobes or fentry, close that gap:
//!
//! - `sock:inet_sock_set_state` (raw): a connection to one of the traced listening ports
//!   (`LISTEN_PORTS`: seeded by user space from `/proc` once per traced process, then kept by
//!   `exit_listen` when a traced process starts listening) entering ESTABLISHED gets a `SOCKS`
//!   entry holding its handshake time; any socket leaving for CLOSE loses it.
//! - `tcp:tcp_probe` (raw, at the top of `tcp_rcv_established`, for every segment received on an
//!   established socket): a data segment on a socket in `SOCKS` that had no unread data stamps
//!   the socket's pending arrival. Segments of sockets not in the map cost one hash lookup.
//!
//! At the read exit `sockets` asks [`take_arrival`] for the arrival of the oldest byte it read;
//! the socket's `copied_seq == rcv_nxt` (everything received was read) clears it, otherwise the
//! newest segment's arrival stays pending for the next read. The `struct sock *` of an accepted
//! fd comes from a walk of the task's fd table ([`sock_of_fd`]). All struct offsets come from
//! the kernel's BTF, written by user space before load; with any of them missing user space
//! leaves `ARRIVAL_ENABLED` at 0 and requests start at their read, as before.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated as gen,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use infertap_common::{arrival as ctr, sock_flag, SockTimes};

// ---- configuration (BTF offsets), written by user space before load ---------------------------

/// 1 when every offset below was found and the TCP programs are attached.
#[unsafe(no_mangle)]
static ARRIVAL_ENABLED: u32 = 0;
/// `struct sock`: `__sk_common.skc_num` (u16, local port, host order).
#[unsafe(no_mangle)]
static SK_NUM_OFFSET: u32 = 0;
/// `struct sock`: `__sk_common.skc_family` (u16).
#[unsafe(no_mangle)]
static SK_FAMILY_OFFSET: u32 = 0;
/// `struct tcp_sock`: `copied_seq` (u32, next byte the reader gets).
#[unsafe(no_mangle)]
static TP_COPIED_SEQ_OFFSET: u32 = 0;
/// `struct tcp_sock`: `rcv_nxt` (u32, next byte expected from the peer).
#[unsafe(no_mangle)]
static TP_RCV_NXT_OFFSET: u32 = 0;
/// 1 when the three `tcp_sock` fields below were found: writes then carry their departure.
#[unsafe(no_mangle)]
static DEPARTURE_ENABLED: u32 = 0;
/// `struct tcp_sock`: `write_seq` (u32, tail of the data the application wrote).
#[unsafe(no_mangle)]
static TP_WRITE_SEQ_OFFSET: u32 = 0;
/// `struct tcp_sock`: `snd_nxt` (u32, next sequence number to send).
#[unsafe(no_mangle)]
static TP_SND_NXT_OFFSET: u32 = 0;
/// `struct tcp_sock`: `tcp_wstamp_ns` (u64, CLOCK_MONOTONIC departure time of the latest data
/// segment sent; for a paced socket, its planned departure).
#[unsafe(no_mangle)]
static TP_WSTAMP_OFFSET: u32 = 0;
/// `struct sk_buff`: `cb` (TCP's `struct tcp_skb_cb`: `seq` at 0, `end_seq` at 4, `tcp_flags`
/// at 12 — unchanged since 2.6).
#[unsafe(no_mangle)]
static SKB_CB_OFFSET: u32 = 0;
/// `struct task_struct`: `files`.
#[unsafe(no_mangle)]
static TASK_FILES_OFFSET: u32 = 0;
/// `struct files_struct`: `fdt`.
#[unsafe(no_mangle)]
static FILES_FDT_OFFSET: u32 = 0;
/// `struct fdtable`: `max_fds` (u32).
#[unsafe(no_mangle)]
static FDT_MAX_FDS_OFFSET: u32 = 0;
/// `struct fdtable`: `fd` (`struct file **`).
#[unsafe(no_mangle)]
static FDT_FD_OFFSET: u32 = 0;
/// `struct file`: `private_data` (the `struct socket *` of a socket file).
#[unsafe(no_mangle)]
static FILE_PRIVATE_DATA_OFFSET: u32 = 0;
/// `struct socket`: `sk`.
#[unsafe(no_mangle)]
static SOCKET_SK_OFFSET: u32 = 0;

#[inline(always)]
fn config(v: &u32) -> u64 {
    // SAFETY: reading a plain global; volatile so the loader's rewritten value is used.
    unsafe { core::ptr::read_volatile(v) as u64 }
}

#[inline(always)]
pub(crate) fn enabled() -> bool {
    config(&ARRIVAL_ENABLED) != 0
}

// ---- maps ------------------------------------------------------------------------------------

/// Local ports the traced processes listen on (port → 1), kept by user space.
#[map]
static LISTEN_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// Sockets whose arrivals are tracked, by `struct sock *`.
#[map]
static SOCKS: HashMap<u64, SockTimes> = HashMap::with_max_entries(65536, 0);

/// Per-CPU event counts (`infertap_common::arrival`).
#[map]
static ARRIVALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ctr::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = ARRIVALS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: fault-tolerant kernel read.
    unsafe { bpf_probe_read_kernel(addr as *const T).ok() }
}

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const TCPHDR_FIN: u8 = 0x01;
const TCPHDR_SYN: u8 = 0x02;

// ---- programs ----------------------------------------------------------------------------------

/// `inet_sock_set_state(sk, oldstate, newstate)`: track connections to the traced ports from
/// the moment their handshake completes; forget sockets that close.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn on_sock_state(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let old: u64 = ctx.arg(1);
    let new: u64 = ctx.arg(2);
    let (old, new) = (old as i32, new as i32);
    if new == TCP_ESTABLISHED && old == TCP_SYN_RECV {
        let Some(port) = read::<u16>(sk + config(&SK_NUM_OFFSET)) else {
            return 0;
        };
        // SAFETY: presence test only.
        if unsafe { LISTEN_PORTS.get(&port) }.is_none() {
            return 0;
        }
        let times = SockTimes {
            // SAFETY: helper without arguments.
            established_ns: unsafe { bpf_ktime_get_ns() },
            ..Default::default()
        };
        if SOCKS.insert(&sk, &times, 0).is_err() {
            count(ctr::SOCK_MAP_FULL);
            return 0;
        }
        count(ctr::ESTABLISHED);
    } else if new == TCP_CLOSE {
        forget(sk);
    }
    0
}

/// `listen()` exit: a traced process now listens on a TCP port; follow its handshakes (a server
/// that binds late, e.g. after loading its model, is covered without any polling).
#[tracepoint]
pub fn exit_listen(ctx: TracePointContext) -> u32 {
    if !enabled() {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !crate::sockets::is_target(tgid) || crate::sockets::arg(&ctx, 0) as i64 != 0 {
        return 0;
    }
    let Some(args) = crate::sockets::syscall_args() else {
        return 0;
    };
    let Some(sk) = sock_of_fd(args[0] as i32) else {
        return 0;
    };
    if let Some(port) = read::<u16>(sk + config(&SK_NUM_OFFSET)) {
        if LISTEN_PORTS.insert(&port, &1, 0).is_err() {
            count(ctr::SOCK_MAP_FULL);
        }
    }
    0
}

/// `tcp_probe(sk, skb)`: a data segment reached an established socket.
#[raw_tracepoint(tracepoint = "tcp_probe")]
pub fn on_tcp_probe(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let Some(t) = SOCKS.get_ptr_mut(&sk) else {
        return 0;
    };
    let skb: u64 = ctx.arg(1);
    let cb = skb + config(&SKB_CB_OFFSET);
    let (Some(seq_pair), Some(tcp_flags)) = (read::<[u32; 2]>(cb), read::<u8>(cb + 12)) else {
        return 0;
    };
    let [seq, end_seq] = seq_pair;
    let mut len = end_seq.wrapping_sub(seq);
    if tcp_flags & TCPHDR_FIN != 0 {
        len = len.wrapping_sub(1);
    }
    if tcp_flags & TCPHDR_SYN != 0 {
        len = len.wrapping_sub(1);
    }
    if len == 0 || len > 1 << 30 {
        // A pure ACK (the client acknowledging streamed tokens), a bare FIN, or nonsense.
        return 0;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: map value pointer, valid for this program run; a concurrent reader on another
    // CPU sees either value of a field (8-byte stores).
    let t = unsafe { &mut *t };
    if t.pending_ns == 0 {
        t.pending_ns = now;
        count(ctr::ARRIVED);
    }
    t.last_ns = now;
    t.last_end_seq = end_seq;
    0
}

// ---- helpers for the syscall programs ----------------------------------------------------------

/// Drops `sk`'s entry, settling the gauges' counts.
#[inline(always)]
pub(crate) fn forget(sk: u64) {
    // SAFETY: value copied out immediately.
    let Some(t) = (unsafe { SOCKS.get(&sk) }).copied() else {
        return;
    };
    if t.pending_ns != 0 {
        count(ctr::CONSUMED);
    }
    if t.flags & sock_flag::ACCEPTED == 0 && t.established_ns != 0 {
        count(ctr::CLOSED_UNACCEPTED);
    }
    let _ = SOCKS.remove(&sk);
}

/// The `struct sock *` behind the calling task's `fd`, if it is an IPv4/IPv6 socket.
#[inline(always)]
pub(crate) fn sock_of_fd(fd: i32) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    // SAFETY: returns the current task (never null in a syscall).
    let task = unsafe { gen::bpf_get_current_task_btf() } as u64;
    let files: u64 = read(task + config(&TASK_FILES_OFFSET))?;
    let fdt: u64 = read(files + config(&FILES_FDT_OFFSET))?;
    let max_fds: u32 = read(fdt + config(&FDT_MAX_FDS_OFFSET))?;
    if fd as u32 >= max_fds {
        return None;
    }
    let fds: u64 = read(fdt + config(&FDT_FD_OFFSET))?;
    let file: u64 = read(fds + 8 * fd as u64)?;
    if file == 0 {
        return None;
    }
    let socket: u64 = read(file + config(&FILE_PRIVATE_DATA_OFFSET))?;
    if socket == 0 {
        return None;
    }
    let sk: u64 = read(socket + config(&SOCKET_SK_OFFSET))?;
    if sk == 0 {
        return None;
    }
    let family: u16 = read(sk + config(&SK_FAMILY_OFFSET))?;
    (family == AF_INET || family == AF_INET6).then_some(sk)
}

/// A traced process accepted (or user space adopted, `accepted = false`) the TCP socket `sk`:
/// returns its handshake time when the kernel saw it, and makes sure its arrivals are tracked.
#[inline(always)]
pub(crate) fn on_accepted(sk: u64, accepted: bool) -> u64 {
    if let Some(t) = SOCKS.get_ptr_mut(&sk) {
        // SAFETY: map value pointer, valid for this program run.
        let t = unsafe { &mut *t };
        if t.flags & sock_flag::ACCEPTED == 0 {
            t.flags |= sock_flag::ACCEPTED;
            if t.established_ns != 0 && accepted {
                count(ctr::ACCEPTED);
            }
        }
        return t.established_ns;
    }
    let times = SockTimes {
        flags: sock_flag::ACCEPTED,
        ..Default::default()
    };
    // BPF_NOEXIST: a socket the state program inserted meanwhile keeps its handshake time.
    if SOCKS.insert(&sk, &times, 1).is_err() {
        // SAFETY: presence test only.
        if unsafe { SOCKS.get(&sk) }.is_none() {
            count(ctr::SOCK_MAP_FULL);
        }
    }
    0
}

/// At a write exit on the TCP socket `sk` that wrote bytes at `now`: when the last of them left
/// (0 when unknown). When nothing written is still queued (`write_seq == snd_nxt`), the latest
/// data segment the socket sent carried this write's last byte and `tcp_wstamp_ns` is its
/// departure (taken when the stack started transmitting, µs before the packet reaches the
/// device) — earlier than the syscall's exit by however long the send path ran after it (on
/// loopback that includes the receiver's softirq work).
#[inline(always)]
pub(crate) fn departure(sk: u64, now: u64) -> u64 {
    if config(&DEPARTURE_ENABLED) == 0 {
        return 0;
    }
    let write_seq: Option<u32> = read(sk + config(&TP_WRITE_SEQ_OFFSET));
    let snd_nxt: Option<u32> = read(sk + config(&TP_SND_NXT_OFFSET));
    let wstamp: Option<u64> = read(sk + config(&TP_WSTAMP_OFFSET));
    match (write_seq, snd_nxt, wstamp) {
        // Within the last second: a stale stamp (nothing sent by this write) is older than that
        // only when the connection was idle, and then the write's bytes are still queued.
        (Some(w), Some(n), Some(t)) if w == n && t != 0 && t <= now && now - t < 1_000_000_000 => t,
        _ => 0,
    }
}

/// At a read exit that returned bytes from `sk`: when the oldest of them reached the socket
/// (0 when unknown). Clears the pending arrival when the read left nothing unread.
#[inline(always)]
pub(crate) fn take_arrival(sk: u64) -> u64 {
    let Some(t) = SOCKS.get_ptr_mut(&sk) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for this program run.
    let t = unsafe { &mut *t };
    let first_read = t.flags & sock_flag::READ == 0;
    t.flags |= sock_flag::READ;
    let pending = t.pending_ns;
    if pending == 0 {
        // Bytes the kernel queued without `tcp_rcv_established` (data on the handshake's last
        // ACK, processed in SYN_RECV): they arrived when the handshake completed.
        return if first_read { t.established_ns } else { 0 };
    }
    let copied: Option<u32> = read(sk + config(&TP_COPIED_SEQ_OFFSET));
    let rcv_nxt: Option<u32> = read(sk + config(&TP_RCV_NXT_OFFSET));
    match (copied, rcv_nxt) {
        (Some(c), Some(n)) if c != n => {
            // Unread bytes remain: the newest segment's arrival is the best bound for them.
            t.pending_ns = t.last_ns;
        }
        _ => {
            t.pending_ns = 0;
            count(ctr::CONSUMED);
        }
    }
    pending
}
