//! Decoding of ring-buffer records (see `infertap_common::EventHeader`) into typed events.
//!
//! `ConnEvent` is the contract between the probes and [`crate::reconstruct`]: everything the
//! reconstruction knows about a connection arrives through it, in kernel order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use infertap_common::{cuda, flag, kind, EventHeader, HEADER_LEN};

/// Identifies one traced connection: the process and the kernel's connection id (which survives
/// fd reuse, unlike the fd).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub pid: u32,
    pub conn_id: u64,
}

/// Direction of bytes, seen from the traced (server) process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Read by the server: the client's request bytes.
    In,
    /// Written by the server: the response bytes.
    Out,
}

/// What happened on a traced connection. Times are CLOCK_MONOTONIC ns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnEvent<'a> {
    /// The server accepted (or the agent adopted an already open) connection.
    Open {
        conn: ConnKey,
        fd: i32,
        ts_ns: u64,
        peer: Option<SocketAddr>,
        /// When the connection's TCP handshake completed (before the server accepted it), if the
        /// kernel saw it; `None` for adopted connections and non-TCP sockets.
        established_ns: Option<u64>,
    },
    /// `len` bytes moved in `dir` in one syscall; `payload` is the captured prefix of them
    /// (`payload.len() <= len`, shorter when the capture limit cut it). `ts_ns`: for a read, its
    /// exit; for a write, when its last byte left the socket (TCP's departure stamp) when the
    /// kernel knows it, else the write's exit.
    Data {
        conn: ConnKey,
        dir: Direction,
        ts_ns: u64,
        len: u64,
        payload: &'a [u8],
        /// For reads: when the oldest of these bytes reached the socket's receive queue (kernel
        /// time, before the read), if the kernel saw it. `None` for writes and when unknown.
        arrival_ns: Option<u64>,
    },
    /// The last bytes of the syscall of the `Data` event just before it (same connection,
    /// direction and time), captured in addition to its prefix because the syscall was longer
    /// than the capture. The bytes between that prefix and this tail were not captured: the
    /// `Data` event counts them as its uncaptured remainder (its `len` stops where the tail
    /// begins, so the two lengths add up to the syscall's byte count).
    DataTail {
        conn: ConnKey,
        dir: Direction,
        ts_ns: u64,
        payload: &'a [u8],
    },
    /// A read returned 0: the client shut down its sending side (it may still be reading: a
    /// half-close, `shutdown(SHUT_WR)`), or closed the connection.
    PeerClosed { conn: ConnKey, ts_ns: u64 },
    /// A read or write failed with a connection error (ECONNRESET, EPIPE, ...).
    Error {
        conn: ConnKey,
        dir: Direction,
        ts_ns: u64,
        errno: i32,
    },
    /// The server closed the connection's fd.
    Close { conn: ConnKey, ts_ns: u64 },
}

impl ConnEvent<'_> {
    pub fn conn(&self) -> ConnKey {
        match self {
            ConnEvent::Open { conn, .. }
            | ConnEvent::Data { conn, .. }
            | ConnEvent::DataTail { conn, .. }
            | ConnEvent::PeerClosed { conn, .. }
            | ConnEvent::Error { conn, .. }
            | ConnEvent::Close { conn, .. } => *conn,
        }
    }

    pub fn ts_ns(&self) -> u64 {
        match self {
            ConnEvent::Open { ts_ns, .. }
            | ConnEvent::Data { ts_ns, .. }
            | ConnEvent::DataTail { ts_ns, .. }
            | ConnEvent::PeerClosed { ts_ns, .. }
            | ConnEvent::Error { ts_ns, .. }
            | ConnEvent::Close { ts_ns, .. } => *ts_ns,
        }
    }
}

/// Process lifecycle of the traced set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    Fork {
        parent: u32,
        child: u32,
        ts_ns: u64,
    },
    Exit {
        pid: u32,
        ts_ns: u64,
    },
    /// The process replaced its image (`execve`).
    Exec {
        pid: u32,
        ts_ns: u64,
    },
}

/// One CUDA API call seen by the uprobes in per-event mode (trace windows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaCall {
    pub pid: u32,
    pub tid: u32,
    pub func: &'static cuda::Func,
    pub start_ns: u64,
    /// Return time, for functions with a return probe (synchronisation, blocking copies).
    pub end_ns: Option<u64>,
    pub bytes: Option<u64>,
    pub copy: cuda::CopyKind,
    /// Kernel handle (driver launches), host stub address (runtime launches) or graph.
    pub handle: u64,
    pub stream: u64,
}

/// A decoded ring-buffer record.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Conn(ConnEvent<'a>),
    Proc(ProcEvent),
    Cuda(CudaCall),
}

/// Why a record could not be decoded (counted, never fatal).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record shorter than its header ({0} bytes)")]
    Short(usize),
    #[error("record claims {claimed} payload bytes but carries {present}")]
    PayloadLength { claimed: usize, present: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
    #[error("unknown CUDA function id {0}")]
    UnknownCudaFunc(u16),
}

/// Errnos that mean the connection is gone (as opposed to EAGAIN and friends, which the kernel
/// side already filters out).
fn is_connection_error(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNRESET | libc::EPIPE | libc::ETIMEDOUT | libc::ECONNABORTED | libc::ENOTCONN
    )
}

/// Parses a raw `sockaddr_in`/`sockaddr_in6` as the kernel wrote it.
pub fn parse_sockaddr(raw: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(raw.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(raw.get(2..4)?.try_into().ok()?);
    match family as i32 {
        libc::AF_INET => {
            let ip: [u8; 4] = raw.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        libc::AF_INET6 => {
            let ip: [u8; 16] = raw.get(8..24)?.try_into().ok()?;
            let v6 = Ipv6Addr::from(ip);
            let ip = v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6));
            Some(SocketAddr::new(ip, port))
        }
        _ => None,
    }
}

/// The address family of an ACCEPT record's peer `sockaddr` (e.g. `AF_UNIX`), when the caller
/// of accept passed an address buffer.
pub fn accept_family(record: &[u8]) -> Option<i32> {
    let (h, payload) = split(record).ok()?;
    if h.kind != kind::ACCEPT {
        return None;
    }
    Some(i32::from(u16::from_ne_bytes(
        payload.get(0..2)?.try_into().ok()?,
    )))
}

/// Splits a record into its header and payload.
pub fn split(record: &[u8]) -> Result<(EventHeader, &[u8]), DecodeError> {
    if record.len() < HEADER_LEN {
        return Err(DecodeError::Short(record.len()));
    }
    // SAFETY: the length is checked above; EventHeader is repr(C) plain integers, so any bit
    // pattern is valid; read_unaligned copes with the ring buffer's 8-byte alignment either way.
    let header: EventHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let payload = &record[HEADER_LEN..];
    let claimed = header.captured as usize;
    if claimed > payload.len() {
        return Err(DecodeError::PayloadLength {
            claimed,
            present: payload.len(),
        });
    }
    Ok((header, &payload[..claimed]))
}

fn decode_cuda(h: &EventHeader, payload: &[u8]) -> Result<CudaCall, DecodeError> {
    let cookie = cuda::Cookie(h.conn_id);
    let func =
        cuda::func(cookie.func_id()).ok_or(DecodeError::UnknownCudaFunc(cookie.func_id()))?;
    let word = |i: usize| {
        payload
            .get(i * 8..i * 8 + 8)
            .map_or(0, |b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
    };
    let copy = u8::try_from(h.fd).map_or(cuda::CopyKind::Unknown, cuda::CopyKind::from_u8);
    Ok(CudaCall {
        pid: (h.pid_tgid >> 32) as u32,
        tid: h.pid_tgid as u32,
        func,
        start_ns: h.ts_enter_ns,
        end_ns: cookie.timed().then_some(h.ts_exit_ns),
        bytes: (h.ret >= 0).then_some(h.ret as u64),
        copy,
        handle: word(0),
        stream: word(1),
    })
}

/// Length of the tail a READ/WRITE record carries after its prefix (`flag::TAIL`), when its
/// header is consistent (a tail longer than the payload or the byte count is ignored: the whole
/// payload is then taken as the prefix).
fn tail_len(h: &EventHeader, payload: &[u8]) -> usize {
    let io = h.kind == kind::READ || h.kind == kind::WRITE;
    let n = h.aux as usize;
    if io
        && h.flags & flag::TAIL != 0
        && h.ret > 0
        && n <= payload.len()
        && (n as u64) < h.ret as u64
    {
        n
    } else {
        0
    }
}

/// The tail of a READ/WRITE record that carries one ([`ConnEvent::DataTail`]), to be handled
/// right after the record's [`decode`]d `Data` event.
pub fn decode_tail(record: &[u8]) -> Option<ConnEvent<'_>> {
    let (h, payload) = split(record).ok()?;
    let n = tail_len(&h, payload);
    if n == 0 {
        return None;
    }
    Some(ConnEvent::DataTail {
        conn: ConnKey {
            pid: (h.pid_tgid >> 32) as u32,
            conn_id: h.conn_id,
        },
        dir: if h.kind == kind::READ {
            Direction::In
        } else {
            Direction::Out
        },
        ts_ns: data_ts(&h),
        payload: &payload[payload.len() - n..],
    })
}

/// The time of a READ/WRITE record's bytes: a read's exit; a write's last byte's departure
/// when the kernel knows it (`arrival_ns` of a WRITE), else its exit.
fn data_ts(h: &EventHeader) -> u64 {
    if h.kind == kind::WRITE && h.arrival_ns != 0 {
        h.arrival_ns
    } else {
        h.ts_exit_ns
    }
}

/// Decodes one ring-buffer record. A READ/WRITE record with a tail yields its `Data` event here
/// (prefix only) and its tail from [`decode_tail`].
pub fn decode(record: &[u8]) -> Result<Option<Event<'_>>, DecodeError> {
    let (h, payload) = split(record)?;
    let tail = tail_len(&h, payload);
    let pid = (h.pid_tgid >> 32) as u32;
    let conn = ConnKey {
        pid,
        conn_id: h.conn_id,
    };
    let ev = match h.kind {
        kind::READ | kind::WRITE => {
            let dir = if h.kind == kind::READ {
                Direction::In
            } else {
                Direction::Out
            };
            if h.ret > 0 {
                Event::Conn(ConnEvent::Data {
                    conn,
                    dir,
                    ts_ns: data_ts(&h),
                    len: h.ret as u64 - tail as u64,
                    payload: &payload[..payload.len() - tail],
                    arrival_ns: (dir == Direction::In && h.arrival_ns != 0).then_some(h.arrival_ns),
                })
            } else if h.ret == 0 && dir == Direction::In {
                Event::Conn(ConnEvent::PeerClosed {
                    conn,
                    ts_ns: h.ts_exit_ns,
                })
            } else if h.ret < 0 && is_connection_error(-h.ret as i32) {
                Event::Conn(ConnEvent::Error {
                    conn,
                    dir,
                    ts_ns: h.ts_exit_ns,
                    errno: -h.ret as i32,
                })
            } else {
                return Ok(None);
            }
        }
        kind::ACCEPT => Event::Conn(ConnEvent::Open {
            conn,
            fd: h.ret as i32,
            ts_ns: h.ts_exit_ns,
            peer: parse_sockaddr(payload),
            established_ns: (h.arrival_ns != 0).then_some(h.arrival_ns),
        }),
        kind::CLOSE => Event::Conn(ConnEvent::Close {
            conn,
            ts_ns: h.ts_enter_ns,
        }),
        kind::FORK => Event::Proc(ProcEvent::Fork {
            parent: pid,
            child: h.ret as u32,
            ts_ns: h.ts_enter_ns,
        }),
        kind::EXIT => Event::Proc(ProcEvent::Exit {
            pid,
            ts_ns: h.ts_enter_ns,
        }),
        kind::EXEC => Event::Proc(ProcEvent::Exec {
            pid,
            ts_ns: h.ts_enter_ns,
        }),
        kind::CUDA_CALL => Event::Cuda(decode_cuda(&h, payload)?),
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(Some(ev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(h: EventHeader, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; HEADER_LEN];
        // SAFETY: v has HEADER_LEN bytes.
        unsafe { std::ptr::write_unaligned(v.as_mut_ptr().cast(), h) };
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_write_with_truncated_payload() {
        let h = EventHeader {
            ts_enter_ns: 10,
            ts_exit_ns: 20,
            pid_tgid: (42u64 << 32) | 43,
            conn_id: 7,
            ret: 100,
            fd: 5,
            captured: 3,
            kind: kind::WRITE,
            syscall: infertap_common::syscall::SENDTO,
            ..Default::default()
        };
        let rec = record(h, b"abc");
        let ev = decode(&rec).unwrap().unwrap();
        assert_eq!(
            ev,
            Event::Conn(ConnEvent::Data {
                conn: ConnKey {
                    pid: 42,
                    conn_id: 7
                },
                dir: Direction::Out,
                ts_ns: 20,
                len: 100,
                payload: b"abc",
                arrival_ns: None,
            })
        );
    }

    #[test]
    fn splits_a_tail_from_its_prefix() {
        let h = EventHeader {
            ts_exit_ns: 20,
            pid_tgid: 42u64 << 32,
            conn_id: 7,
            ret: 10_000,
            captured: 6,
            flags: flag::TAIL,
            aux: 2,
            kind: kind::WRITE,
            ..Default::default()
        };
        let rec = record(h, b"abcdyz");
        let conn = ConnKey {
            pid: 42,
            conn_id: 7,
        };
        let Some(Event::Conn(ConnEvent::Data { len, payload, .. })) = decode(&rec).unwrap() else {
            panic!()
        };
        assert_eq!((len, payload), (9_998, &b"abcd"[..]));
        assert_eq!(
            decode_tail(&rec),
            Some(ConnEvent::DataTail {
                conn,
                dir: Direction::Out,
                ts_ns: 20,
                payload: b"yz"
            })
        );
        // A tail longer than the payload is inconsistent: the payload is all prefix.
        let bad = record(EventHeader { aux: 9, ..h }, b"abcdyz");
        let Some(Event::Conn(ConnEvent::Data { len, payload, .. })) = decode(&bad).unwrap() else {
            panic!()
        };
        assert_eq!((len, payload), (10_000, &b"abcdyz"[..]));
        assert_eq!(decode_tail(&bad), None);
        // No flag, no tail.
        assert_eq!(
            decode_tail(&record(EventHeader { flags: 0, ..h }, b"abcdyz")),
            None
        );
    }

    #[test]
    fn rejects_short_and_inconsistent_records() {
        assert_eq!(decode(&[0u8; 10]), Err(DecodeError::Short(10)));
        let h = EventHeader {
            captured: 50,
            kind: kind::READ,
            ret: 50,
            ..Default::default()
        };
        assert!(matches!(
            decode(&record(h, b"xy")),
            Err(DecodeError::PayloadLength { .. })
        ));
    }

    #[test]
    fn decodes_cuda_calls() {
        let f = cuda::FUNCS
            .iter()
            .find(|f| f.symbol == "cuStreamSynchronize")
            .unwrap();
        let h = EventHeader {
            ts_enter_ns: 100,
            ts_exit_ns: 5_100,
            pid_tgid: (9u64 << 32) | 10,
            conn_id: cuda::Cookie::of(f).0,
            ret: -1,
            fd: 0,
            captured: 16,
            kind: kind::CUDA_CALL,
            syscall: 0,
            ..Default::default()
        };
        let mut payload = 0xabcu64.to_ne_bytes().to_vec();
        payload.extend_from_slice(&0x99u64.to_ne_bytes());
        let Some(Event::Cuda(c)) = decode(&record(h, &payload)).unwrap() else {
            panic!()
        };
        assert_eq!(
            (c.pid, c.tid, c.func.symbol),
            (9, 10, "cuStreamSynchronize")
        );
        assert_eq!((c.start_ns, c.end_ns, c.bytes), (100, Some(5_100), None));
        assert_eq!((c.handle, c.stream), (0xabc, 0x99));
    }

    #[test]
    fn eagain_is_not_an_event() {
        let h = EventHeader {
            kind: kind::READ,
            ret: -(libc::EAGAIN as i64),
            ..Default::default()
        };
        assert_eq!(decode(&record(h, b"")), Ok(None));
    }

    #[test]
    fn sockaddr_v4_and_mapped_v6() {
        let mut v4 = [0u8; 16];
        v4[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(parse_sockaddr(&v4), Some("127.0.0.1:8080".parse().unwrap()));
        let mut v6 = [0u8; 28];
        v6[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&443u16.to_be_bytes());
        v6[8..24].copy_from_slice(&Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets());
        assert_eq!(parse_sockaddr(&v6), Some("10.1.2.3:443".parse().unwrap()));
        assert_eq!(parse_sockaddr(&[1, 0]), None);
    }
}
