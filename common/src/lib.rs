//! The event ABI shared by infertap's eBPF programs (`agent-ebpf`) and the user-space agent.
//!
//! Every record crossing the ring buffer starts with an [`EventHeader`]; `captured` payload bytes
//! follow it directly. Layouts are `#[repr(C)]` with explicit padding so both sides agree without
//! relying on the compiler.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod cuda;
pub mod profile;

/// Largest payload the kernel copies per syscall. A power of two so the eBPF side can bound
/// lengths with a mask the verifier understands.
pub const MAX_CAPTURE: usize = 4096;
/// Default per-syscall capture when the user does not choose one.
pub const DEFAULT_CAPTURE: u32 = 1024;
/// Bytes captured from the start of every request, whatever the per-syscall capture is: the
/// reads that begin an exchange (see [`conn_flag::HEAD`]) are copied up to this many bytes in
/// total, so a request head up to this size (long `Authorization` tokens, cookies) is parsed. A
/// power of two.
pub const HEAD_CAPTURE: usize = 16 * 1024;
/// Most bytes copied from the end of a syscall whose payload is longer than its capture (see
/// [`flag::TAIL`]): where a non-streaming response keeps its `usage`.
pub const TAIL_CAPTURE: usize = 1024;

/// What an event describes (`EventHeader::kind`).
pub mod kind {
    /// Bytes read from a traced connection (read, readv, recvfrom, recvmsg, recvmmsg).
    /// `ret` is the byte count; 0 means the peer closed its side (EOF).
    pub const READ: u8 = 1;
    /// Bytes written to a traced connection (write, writev, sendto, sendmsg, sendmmsg).
    pub const WRITE: u8 = 2;
    /// A connection accepted by a traced process; payload is the peer `sockaddr` (if the caller
    /// asked for it), `ret` the new fd.
    pub const ACCEPT: u8 = 3;
    /// The traced process closed a traced connection's fd.
    pub const CLOSE: u8 = 4;
    /// A traced process forked: `ret` holds the child's tgid.
    pub const FORK: u8 = 5;
    /// A traced process (its thread-group leader) exited.
    pub const EXIT: u8 = 6;
    /// A CUDA API call (per-event mode only): `conn_id` holds the attach cookie
    /// (`cuda::Cookie`), `ret` the byte count or -1, `fd` the copy direction; a `cuda::CallPayload`
    /// follows.
    pub const CUDA_CALL: u8 = 7;
    /// A traced process replaced its image (`execve`): its mappings (and interpreter) are new.
    pub const EXEC: u8 = 8;
}

/// Which syscall produced a READ/WRITE event (`EventHeader::syscall`), for diagnostics and stats.
pub mod syscall {
    pub const READ: u8 = 1;
    pub const READV: u8 = 2;
    pub const RECVFROM: u8 = 3;
    pub const RECVMSG: u8 = 4;
    pub const RECVMMSG: u8 = 5;
    pub const WRITE: u8 = 6;
    pub const WRITEV: u8 = 7;
    pub const SENDTO: u8 = 8;
    pub const SENDMSG: u8 = 9;
    pub const SENDMMSG: u8 = 10;
    pub const ACCEPT: u8 = 11;
    pub const ACCEPT4: u8 = 12;
    pub const CLOSE: u8 = 13;

    pub fn name(nr: u8) -> &'static str {
        match nr {
            READ => "read",
            READV => "readv",
            RECVFROM => "recvfrom",
            RECVMSG => "recvmsg",
            RECVMMSG => "recvmmsg",
            WRITE => "write",
            WRITEV => "writev",
            SENDTO => "sendto",
            SENDMSG => "sendmsg",
            SENDMMSG => "sendmmsg",
            ACCEPT => "accept",
            ACCEPT4 => "accept4",
            CLOSE => "close",
            _ => "unknown",
        }
    }
}

/// Header of every ring-buffer record. 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at syscall entry.
    pub ts_enter_ns: u64,
    /// CLOCK_MONOTONIC at syscall exit (equal to `ts_enter_ns` for events without an exit).
    pub ts_exit_ns: u64,
    /// `tgid << 32 | tid` of the calling thread.
    pub pid_tgid: u64,
    /// Identifies one connection across fd reuse: the CLOCK_MONOTONIC time the kernel side began
    /// tracking it (accept exit), or a value user space chose when it registered the socket.
    pub conn_id: u64,
    /// Syscall return value: bytes transferred, a new fd, a child tgid, or `-errno`.
    pub ret: i64,
    /// A kernel time (CLOCK_MONOTONIC ns) of what the record is about, from the socket:
    /// READ: when the oldest byte this read returned reached the socket's receive queue;
    /// ACCEPT: when the connection's handshake completed (it entered ESTABLISHED);
    /// WRITE: when the last byte written left (the socket's latest data departure, when nothing
    /// written is still queued). 0 = unknown.
    pub arrival_ns: u64,
    /// Kind-specific detail (see [`flag`] for the bits that are defined); 0 when none.
    pub flags: u32,
    /// Kind-specific value; 0 when none.
    pub aux: u32,
    /// The file descriptor concerned (-1 when not applicable).
    pub fd: i32,
    /// Payload bytes that follow this header (≤ `MAX_CAPTURE`, ≤ `ret`).
    pub captured: u16,
    /// One of [`kind`].
    pub kind: u8,
    /// One of [`syscall`].
    pub syscall: u8,
}

pub const HEADER_LEN: usize = core::mem::size_of::<EventHeader>();

/// Bits of [`EventHeader::flags`].
pub mod flag {
    /// READ/WRITE: the payload ends with the last [`super::EventHeader::aux`] bytes of the
    /// syscall (its tail); the bytes between the captured prefix
    /// (`captured - aux` bytes) and the tail were not copied.
    pub const TAIL: u32 = 1 << 0;
    /// READ: the read fell in the connection's head window ([`super::conn_flag::HEAD`]) and was
    /// captured up to [`super::HEAD_CAPTURE`] bytes instead of the per-syscall capture.
    pub const HEAD_WINDOW: u32 = 1 << 1;
}

/// Bits of [`ConnInfo::flags`] (kernel per-connection state).
pub mod conn_flag {
    /// The next reads begin a request: set when the connection is accepted or adopted and after
    /// every write by the server (an answer ends an exchange), cleared once
    /// [`super::HEAD_CAPTURE`] bytes were read in the window. While set, reads are captured up
    /// to what is left of `HEAD_CAPTURE` (at least the per-syscall capture).
    pub const HEAD: u32 = 1 << 0;
    /// Bits 16..32 count the bytes read since [`HEAD`] was set (saturating at
    /// [`super::HEAD_CAPTURE`]).
    pub const HEAD_READ_SHIFT: u32 = 16;
    /// Arrival tracking (`agent-ebpf/src/arrival.rs`): the connection's `struct sock` could not
    /// be found (not a TCP socket, or the fd walk failed), so the programs do not try again. A
    /// low bit, which the head window's updates keep.
    pub const NO_SOCK: u32 = 1 << 1;
}

/// When data reached a traced TCP socket, kept per socket by the kernel (`SOCKS` map, keyed by
/// the `struct sock *`). All times are CLOCK_MONOTONIC ns; 0 = not seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockTimes {
    /// The socket entered ESTABLISHED (the handshake's last ACK arrived), before any accept.
    pub established_ns: u64,
    /// Arrival of the oldest segment whose bytes the server has not read yet.
    pub pending_ns: u64,
    /// Arrival of the newest data segment.
    pub last_ns: u64,
    /// `end_seq` of the newest data segment.
    pub last_end_seq: u32,
    /// [`sock_flag`] bits.
    pub flags: u32,
}

/// Bits of [`SockTimes::flags`].
pub mod sock_flag {
    /// A traced process accepted (or adopted) the socket.
    pub const ACCEPTED: u32 = 1;
    /// The server has read from it at least once.
    pub const READ: u32 = 2;
}

/// Indices of the per-CPU arrival counters (`ARRIVALS` array): monotonically increasing event
/// counts from which user space derives queue gauges (differences of sums over CPUs).
pub mod arrival {
    /// A connection to a traced listening port completed its handshake.
    pub const ESTABLISHED: u32 = 0;
    /// A traced process accepted a connection counted in `ESTABLISHED`.
    pub const ACCEPTED: u32 = 1;
    /// A connection counted in `ESTABLISHED` closed before it was accepted.
    pub const CLOSED_UNACCEPTED: u32 = 2;
    /// Data reached a traced socket that had no unread data (a request began to wait).
    pub const ARRIVED: u32 = 3;
    /// A traced socket's unread data was read, or the socket closed with data unread.
    pub const CONSUMED: u32 = 4;
    /// The socket map was full: a socket's arrivals are not tracked.
    pub const SOCK_MAP_FULL: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Value of the kernel's per-connection map: a connection the agent follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    pub conn_id: u64,
    /// The connection's `struct sock *` (kernel address, used only as a map key), or 0 when
    /// not yet known.
    pub sk: u64,
    /// Per-connection state bits owned by the kernel programs; 0 at insertion.
    pub flags: u32,
    pub _reserved: u32,
}

/// Key of the per-connection map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: i32,
}

/// Indices of the per-CPU drop counters (`COUNTERS` array). Events that were delivered are
/// counted by user space; the kernel only counts what it had to drop.
pub mod counter {
    /// Ring buffer full: an event was lost.
    pub const RINGBUF_FULL: u32 = 0;
    /// The connection map was full: a new connection is not traced.
    pub const CONN_MAP_FULL: u32 = 1;
    /// Copying the payload from user memory failed (payload omitted, lengths kept).
    pub const PAYLOAD_FAULT: u32 = 2;
    /// The CUDA statistics map was full: a (process, thread, function) is not aggregated.
    pub const CUDA_MAP_FULL: u32 = 3;
    /// The sample ring buffer was full: a stack sample was lost.
    pub const SAMPLE_RING_FULL: u32 = 4;
    /// A sample could not be assembled (scratch memory unavailable, unreadable registers).
    pub const SAMPLE_FAILED: u32 = 5;
    /// The off-CPU or Python thread map was full: a switch-out or thread is not followed.
    pub const PROFILE_MAP_FULL: u32 = 6;
    /// A CUDA launch's stack sample was skipped: another launch on the same CPU, preempted
    /// while it assembled its sample, held that CPU's scratch record.
    pub const SAMPLE_BUSY: u32 = 7;
    pub const COUNT: u32 = 8;

    pub fn name(i: u32) -> &'static str {
        match i {
            RINGBUF_FULL => "ringbuf_full",
            CONN_MAP_FULL => "conn_map_full",
            PAYLOAD_FAULT => "payload_fault",
            CUDA_MAP_FULL => "cuda_map_full",
            SAMPLE_RING_FULL => "sample_ring_full",
            SAMPLE_FAILED => "sample_failed",
            PROFILE_MAP_FULL => "profile_map_full",
            SAMPLE_BUSY => "sample_busy",
            _ => "unused",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::cuda::StatKey {}
    unsafe impl aya::Pod for super::cuda::Stat {}
    unsafe impl aya::Pod for super::cuda::KernelKey {}
    // SAFETY: plain `repr(C)` integers with explicit padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::SockTimes {}
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::profile::PyProc {}
    unsafe impl aya::Pod for super::profile::OffCpuTotals {}
    unsafe impl aya::Pod for super::profile::OffCpuStart {}
    unsafe impl aya::Pod for super::profile::StackTop {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_layout_is_stable() {
        assert_eq!(super::HEADER_LEN, 64);
        assert_eq!(core::mem::size_of::<super::ConnKey>(), 8);
    }
}
