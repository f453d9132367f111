//! Loopback packet capture with an `AF_PACKET` socket: the kernel's own per-packet timestamps.
//!
//! - Socket: `AF_PACKET`, `SOCK_DGRAM` (no link header: every frame starts at its IP header),
//!   bound to `lo`. Opened with protocol 0 (receives nothing), the filter is attached, and only
//!   then is it bound to `ETH_P_ALL` on `lo`, so no unfiltered packet is ever queued.
//! - Filter: a classic BPF program run by the kernel keeps TCP over IPv4 (non-fragments) or IPv6
//!   (TCP as the first next header) with the given port as source or destination, and only the
//!   copy whose `pkt_type` is `PACKET_OUTGOING`.
//! - Loopback duplicates: every packet sent on `lo` is seen twice by a packet socket, once
//!   leaving (`PACKET_OUTGOING`, from `dev_queue_xmit_nit`, inside the sender's syscall) and once
//!   arriving (`PACKET_HOST`, from `netif_rx`). Keeping only the outgoing copy both dedupes and
//!   fixes which timestamp is used: **the time the sender's stack handed the packet to `lo`**.
//!   On loopback the arriving copy is queued microseconds later in the same softirq.
//! - Timestamps: `SO_TIMESTAMPNS` (`SCM_TIMESTAMPNS` control messages), the skb's receive
//!   timestamp in **CLOCK_REALTIME** nanoseconds. The agent's `*_unix_ns` are CLOCK_MONOTONIC
//!   converted to Unix time, so both are on the same (Unix) scale; any residual offset between
//!   the clocks shows up as a systematic error in the comparisons, which is what we want to see.
//! - Timestamps must be on before the first packet: the kernel turns packet timestamping on
//!   (a static key) from a work queue some time after the first socket asks for it, and until
//!   then packets carry no time and `recvmsg` stamps them when it reads them (tens of µs late).
//!   [`ensure_timestamping`] keeps a timestamping UDP socket open for the life of the process and
//!   waits until a loopback datagram comes back stamped at its send, not at its read.
//! - Losses: the socket's receive buffer is raised to 64 MiB (`SO_RCVBUFFORCE`, root) and the
//!   kernel's drop count (`PACKET_STATISTICS`) is returned with the packets; callers assert it
//!   is zero rather than judging timings against an incomplete capture.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

// Linux UAPI values (include/uapi/asm-generic/socket.h, linux/if_packet.h, linux/filter.h).
const SO_ATTACH_FILTER: libc::c_int = 26;
const SO_RCVBUFFORCE: libc::c_int = 33;
const SO_TIMESTAMPNS: libc::c_int = 35;
const SCM_TIMESTAMPNS: libc::c_int = SO_TIMESTAMPNS;
const SOL_PACKET: libc::c_int = 263;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_OUTGOING: u32 = 4;
const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
const SKF_AD_OFF: u32 = (-0x1000i32) as u32;
const SKF_AD_PROTOCOL: u32 = 0;
const SKF_AD_PKTTYPE: u32 = 4;
/// Bytes kept per packet: loopback GSO packets reach 64 KiB.
const SNAPLEN: usize = 256 * 1024;

/// One captured packet: its IP datagram (from the IP header on) and the kernel's timestamp.
#[derive(Clone, Debug)]
pub struct Packet {
    /// CLOCK_REALTIME nanoseconds (`SO_TIMESTAMPNS`).
    pub ts_unix_ns: u64,
    pub data: Vec<u8>,
}

/// What the kernel counted for the capture socket.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct CaptureStats {
    /// Packets that passed the filter.
    pub packets: u32,
    /// Packets dropped because the socket's buffer was full.
    pub drops: u32,
    /// Packets longer than the snap length (their tail is missing).
    pub truncated: u32,
}

/// The capture thread's result: the packets and how many were truncated.
type Captured = (Vec<Packet>, u32);

/// A running capture of one TCP port on `lo`. [`Capture::stop`] ends it and returns the packets.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Captured>>>,
    fd: Arc<OwnedFd>,
}

// BPF instruction classes / modes (linux/bpf_common.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MSH: u16 = 0xa0;
const JEQ: u16 = 0x10;
const JSET: u16 = 0x40;
const K: u16 = 0x00;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The socket filter: outgoing copies of TCP segments to or from `port` (offsets are relative
/// to the IP header, as for `SOCK_DGRAM` packet sockets).
fn filter(port: u16) -> Vec<libc::sock_filter> {
    let p = u32::from(port);
    // Jump offsets count from the next instruction; targets: 20 accept, 21 drop, 13 IPv6.
    vec![
        /* 0 */ ins(LD | W | ABS, 0, 0, SKF_AD_OFF + SKF_AD_PKTTYPE),
        /* 1 */ ins(JMP | JEQ | K, 0, 19, PACKET_OUTGOING),
        /* 2 */ ins(LD | H | ABS, 0, 0, SKF_AD_OFF + SKF_AD_PROTOCOL),
        /* 3 */ ins(JMP | JEQ | K, 0, 9, ETH_P_IP),
        // IPv4: TCP, not a fragment, either port.
        /* 4 */
        ins(LD | B | ABS, 0, 0, 9),
        /* 5 */ ins(JMP | JEQ | K, 0, 15, 6),
        /* 6 */ ins(LD | H | ABS, 0, 0, 6),
        /* 7 */ ins(JMP | JSET | K, 13, 0, 0x1fff),
        /* 8 */ ins(LDX | B | MSH, 0, 0, 0),
        /* 9 */ ins(LD | H | IND, 0, 0, 0),
        /* 10 */ ins(JMP | JEQ | K, 9, 0, p),
        /* 11 */ ins(LD | H | IND, 0, 0, 2),
        /* 12 */ ins(JMP | JEQ | K, 7, 8, p),
        // IPv6: TCP as the first next header, either port.
        /* 13 */
        ins(JMP | JEQ | K, 0, 7, ETH_P_IPV6),
        /* 14 */ ins(LD | B | ABS, 0, 0, 6),
        /* 15 */ ins(JMP | JEQ | K, 0, 5, 6),
        /* 16 */ ins(LD | H | ABS, 0, 0, 40),
        /* 17 */ ins(JMP | JEQ | K, 2, 0, p),
        /* 18 */ ins(LD | H | ABS, 0, 0, 42),
        /* 19 */ ins(JMP | JEQ | K, 0, 1, p),
        /* 20 */ ins(RET | K, 0, 0, SNAPLEN as u32),
        /* 21 */ ins(RET | K, 0, 0, 0),
    ]
}

fn check(r: libc::c_int, what: &str) -> Result<()> {
    if r < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn setsockopt<T>(fd: i32, level: i32, name: i32, v: &T, what: &str) -> Result<()> {
    // SAFETY: v points to a live T of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            v as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    check(r, what)
}

/// Reads one datagram with its `SCM_TIMESTAMPNS` time.
fn recv_stamped(fd: i32, buf: &mut [u8], flags: i32) -> std::io::Result<(usize, Option<u64>)> {
    let mut cbuf = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: all-zero msghdr is valid; pointers below are to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: msg describes valid buffers.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut ts = None;
    // SAFETY: CMSG_* walk the control buffer the kernel filled in, bounded by msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == SCM_TIMESTAMPNS {
                let t = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                ts = Some(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, ts))
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Makes sure the kernel stamps packets when they pass (see the module docs): keeps one
/// timestamping socket open for the rest of the process and waits (up to 5 s) until a loopback
/// datagram read 20 ms after its send carries a time within 5 ms of the send.
pub fn ensure_timestamping() -> Result<()> {
    static KEEP: std::sync::OnceLock<Result<std::net::UdpSocket, String>> =
        std::sync::OnceLock::new();
    let r = KEEP.get_or_init(|| {
        let go = || -> Result<std::net::UdpSocket> {
            let u = std::net::UdpSocket::bind("127.0.0.1:0")?;
            let one: libc::c_int = 1;
            setsockopt(
                u.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_TIMESTAMPNS,
                &one,
                "SO_TIMESTAMPNS",
            )?;
            u.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
            let me = u.local_addr()?;
            let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut buf = [0u8; 16];
            loop {
                let sent = unix_now_ns();
                u.send_to(b"ts", me)?;
                std::thread::sleep(std::time::Duration::from_millis(20));
                let (_, ts) = recv_stamped(u.as_raw_fd(), &mut buf, 0)?;
                let ts = ts.context("datagram without SCM_TIMESTAMPNS")?;
                if ts >= sent && ts - sent < 5_000_000 {
                    return Ok(u);
                }
                if std::time::Instant::now() > end {
                    bail!("kernel packet timestamps still taken at read time after 5 s");
                }
            }
        };
        go().map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok(_) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

impl Capture {
    /// Starts capturing TCP traffic of `port` on `lo` (needs root / CAP_NET_RAW).
    pub fn start(port: u16) -> Result<Capture> {
        ensure_timestamping()?;
        // SAFETY: plain socket(2).
        let raw =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        check(raw, "socket(AF_PACKET) (needs root)")?;
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let f = fd.as_raw_fd();
        let mut prog = filter(port);
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_mut_ptr(),
        };
        setsockopt(
            f,
            libc::SOL_SOCKET,
            SO_ATTACH_FILTER,
            &fprog,
            "SO_ATTACH_FILTER",
        )?;
        let one: libc::c_int = 1;
        setsockopt(f, libc::SOL_SOCKET, SO_TIMESTAMPNS, &one, "SO_TIMESTAMPNS")?;
        let buf: libc::c_int = 64 << 20;
        setsockopt(f, libc::SOL_SOCKET, SO_RCVBUFFORCE, &buf, "SO_RCVBUFFORCE")?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        setsockopt(f, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv, "SO_RCVTIMEO")?;
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        if ifindex == 0 {
            bail!("no loopback interface: {}", std::io::Error::last_os_error());
        }
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a valid sockaddr_ll of the given size.
        let r = unsafe {
            libc::bind(
                f,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(r, "bind(AF_PACKET, lo)")?;
        let fd = Arc::new(fd);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (fd, stop) = (fd.clone(), stop.clone());
            std::thread::Builder::new()
                .name("wire-capture".into())
                .spawn(move || read_loop(fd.as_raw_fd(), &stop))
                .context("spawn capture thread")?
        };
        Ok(Capture {
            stop,
            thread: Some(thread),
            fd,
        })
    }

    /// Stops the capture (after draining what the kernel has queued) and returns the packets in
    /// capture order with the kernel's counts.
    pub fn stop(mut self) -> Result<(Vec<Packet>, CaptureStats)> {
        self.stop.store(true, Ordering::SeqCst);
        let (packets, truncated) = self
            .thread
            .take()
            .context("capture already stopped")?
            .join()
            .map_err(|_| anyhow::anyhow!("capture thread panicked"))??;
        let mut st = [0u32; 2]; // struct tpacket_stats { tp_packets, tp_drops }
        let mut len = std::mem::size_of_val(&st) as libc::socklen_t;
        // SAFETY: st is a writable buffer of len bytes.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                SOL_PACKET,
                PACKET_STATISTICS,
                st.as_mut_ptr() as *mut libc::c_void,
                &mut len,
            )
        };
        check(r, "PACKET_STATISTICS")?;
        Ok((
            packets,
            CaptureStats {
                packets: st[0],
                drops: st[1],
                truncated,
            },
        ))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Receives packets until `stop` is set and the queue is empty.
fn read_loop(fd: i32, stop: &AtomicBool) -> Result<Captured> {
    let mut out = Vec::new();
    let mut truncated = 0;
    let mut buf = vec![0u8; SNAPLEN];
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let flags = if stopping { libc::MSG_DONTWAIT } else { 0 } | libc::MSG_TRUNC;
        let (n, ts) = match recv_stamped(fd, &mut buf, flags) {
            Ok(r) => r,
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    if stopping {
                        return Ok((out, truncated));
                    }
                    continue;
                }
                _ => return Err(e).context("recvmsg(AF_PACKET)"),
            },
        };
        if n > buf.len() {
            truncated += 1;
        }
        let Some(ts_unix_ns) = ts else {
            bail!("packet without SCM_TIMESTAMPNS");
        };
        out.push(Packet {
            ts_unix_ns,
            data: buf[..n.min(buf.len())].to_vec(),
        });
    }
}
