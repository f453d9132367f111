//! Wire format between the injection library and the agent (a unix stream socket).
//!
//! The library sends a stream of frames; the agent sends single bytes back ([`DetailLevel`]).
//! Every frame is a 12-byte header followed by its payload, all integers little-endian:
//!
//! ```text
//! header:     magic u32 ("ITCU") | version u16 | frame type u16 | payload length u32
//! Hello:      pid u32 | cupti version u32 | detail level u8 | 3 bytes zero
//! Names:      count u32, then count × (id u32 | length u16 | UTF-8 bytes)
//! Activities: count u32, then count × 80-byte records (see [`Activity`])
//! Stats:      count u32, then count × u64 counters in [`Stats`] field order
//! Launches:   count u32, then count × 40-byte records (see [`Launch`])        (version 2)
//! ```
//!
//! Kernel names are sent once per connection, as a `Names` frame defining every id an
//! `Activities` frame refers to before that frame; records carry the id only. Timestamps are
//! already on the agent's clock (CLOCK_MONOTONIC ns).
//!
//! Versions: 1 had no `Launches` frame; 2 adds it and changes nothing else, so a version-2
//! decoder reads both ([`MIN_VERSION`]..=[`VERSION`]). A frame of a newer version is refused with
//! [`WireError::UnsupportedVersion`] (the agent closes that connection and says why); a frame type
//! this decoder does not know, in a version it accepts, is skipped whole ([`Frame::Unknown`]),
//! since its length is in the header.
//!
//! Decoding is incremental and pure ([`decode_frame`]): give it the bytes received so far, it
//! returns a frame and how many bytes it used, or `None` when the frame is still incomplete.

use std::fmt;

/// `b"ITCU"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"ITCU");
/// Wire version this build writes (and the newest it reads).
pub const VERSION: u16 = 2;
/// Oldest wire version this build reads.
pub const MIN_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 12;
/// Encoded size of one [`Activity`].
pub const ACTIVITY_LEN: usize = 80;
/// Encoded size of one [`Launch`].
pub const LAUNCH_LEN: usize = 40;
/// Frames larger than this are malformed (the library never builds them: it splits batches).
pub const MAX_PAYLOAD: usize = 8 << 20;
/// Kernel names are cut to this many bytes (templated C++ names can run to kilobytes).
pub const MAX_NAME_LEN: usize = 1024;
/// `device` of records whose device is not known (synchronization records carry only a
/// context, resolved through earlier kernel/memcpy records of that context).
pub const DEVICE_UNKNOWN: u32 = u32::MAX;
/// Default socket path of the agent's receiver.
pub const DEFAULT_SOCKET: &str = "/run/infertap/cupti.sock";
/// Environment variable overriding [`DEFAULT_SOCKET`] (read by both sides).
pub const SOCKET_ENV: &str = "INFERTAP_CUPTI_SOCKET";

const FRAME_HELLO: u16 = 1;
const FRAME_NAMES: u16 = 2;
const FRAME_ACTIVITIES: u16 = 3;
const FRAME_STATS: u16 = 4;
const FRAME_LAUNCHES: u16 = 5;

/// How much the library records; switched at run time by the agent (one byte on the socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DetailLevel {
    /// Nothing enabled: CUPTI adds no overhead.
    Off = 0,
    /// One record per CUDA graph launch (not one per node), plus host synchronizations and, where
    /// CUPTI allows the combination, the kernels/copies issued outside graphs. Far fewer records
    /// for servers that replay decode steps as CUDA graphs.
    Graphs = 1,
    /// Every kernel, memcpy, memset and synchronization.
    Full = 2,
}

impl DetailLevel {
    pub fn from_u8(v: u8) -> Option<DetailLevel> {
        match v {
            0 => Some(DetailLevel::Off),
            1 => Some(DetailLevel::Graphs),
            2 => Some(DetailLevel::Full),
            _ => None,
        }
    }

    /// Parses "off" / "graphs" / "full" (as in `INFERTAP_CUPTI_DETAIL`).
    pub fn parse(s: &str) -> Option<DetailLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "0" => Some(DetailLevel::Off),
            "graphs" | "graph" | "1" => Some(DetailLevel::Graphs),
            "full" | "2" => Some(DetailLevel::Full),
            _ => None,
        }
    }
}

/// Kind of an [`Activity`] record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ActivityKind {
    Kernel = 1,
    Memcpy = 2,
    Memset = 3,
    Sync = 4,
    Graph = 5,
}

impl ActivityKind {
    pub fn from_u8(v: u8) -> Option<ActivityKind> {
        Some(match v {
            1 => ActivityKind::Kernel,
            2 => ActivityKind::Memcpy,
            3 => ActivityKind::Memset,
            4 => ActivityKind::Sync,
            5 => ActivityKind::Graph,
            _ => return None,
        })
    }
}

/// Memcpy direction codes (`Activity::sub` of memcpy records); values are CUPTI's
/// `CUpti_ActivityMemcpyKind`.
pub mod memcpy_kind {
    pub const UNKNOWN: u8 = 0;
    pub const HTOD: u8 = 1;
    pub const DTOH: u8 = 2;
    pub const DTOD: u8 = 8;
    pub const HTOH: u8 = 9;
    pub const PTOP: u8 = 10;
}

/// Synchronization type codes (`Activity::sub` of sync records); values are CUPTI's
/// `CUpti_ActivitySynchronizationType`.
pub mod sync_kind {
    pub const UNKNOWN: u8 = 0;
    pub const EVENT_SYNCHRONIZE: u8 = 1;
    pub const STREAM_WAIT_EVENT: u8 = 2;
    pub const STREAM_SYNCHRONIZE: u8 = 3;
    pub const CONTEXT_SYNCHRONIZE: u8 = 4;
}

/// One GPU activity as sent on the wire. Encoded as 80 bytes:
///
/// ```text
///  0 kind u8 | 1 sub u8 | 2 registers u16 | 4 device | 8 context | 12 stream | 16 correlation
/// 20 name id | 24 graph id | 28 shared mem | 32 start u64 | 40 end u64 | 48 bytes u64
/// 56 grid 3×i32 | 68 block 3×i32
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    pub kind: ActivityKind,
    /// Memcpy: [`memcpy_kind`]; sync: [`sync_kind`]; else 0.
    pub sub: u8,
    pub registers_per_thread: u16,
    pub device: u32,
    pub context: u32,
    pub stream: u32,
    pub correlation_id: u32,
    /// Kernels: id defined by a `Names` frame; 0 = no name.
    pub name_id: u32,
    /// Graph launches (and kernels run as graph nodes): CUPTI graph id; else 0.
    pub graph_id: u32,
    /// Kernels: static + dynamic shared memory per block.
    pub shared_mem_bytes: u32,
    /// CLOCK_MONOTONIC ns.
    pub start_ns: u64,
    pub end_ns: u64,
    /// Memcpy/memset size.
    pub bytes: u64,
    pub grid: [i32; 3],
    pub block: [i32; 3],
}

/// CUDA API domain of a [`Launch`] (CUPTI's `CUpti_CallbackDomain` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ApiDomain {
    /// Driver API (`cuLaunchKernel`, `cuGraphLaunch`, ...).
    Driver = 1,
    /// Runtime API (`cudaLaunchKernel`, `cudaGraphLaunch`, ...).
    Runtime = 2,
}

impl ApiDomain {
    pub fn from_u8(v: u8) -> Option<ApiDomain> {
        match v {
            1 => Some(ApiDomain::Driver),
            2 => Some(ApiDomain::Runtime),
            _ => None,
        }
    }
}

/// [`Launch::flags`] bits.
pub mod launch_flags {
    /// A graph launch (`cuGraphLaunch`, `cudaGraphLaunch`): its GPU work is a graph-trace record
    /// or, at full detail, one kernel record per kernel node, all with the launch's correlation id.
    pub const GRAPH: u8 = 1;
    /// A driver launch made inside a runtime launch on the same thread (the runtime's own call
    /// into the driver): the outer runtime call is the one the application made.
    pub const NESTED: u8 = 2;
    /// Bits a version-2 sender may set.
    pub const KNOWN: u8 = GRAPH | NESTED;
}

/// One CUDA launch API call as the injection library saw it on the launching thread (CUPTI's
/// callback API at the call's entry and exit). Joined to the kernel (or graph) records of the
/// same `correlation_id` it gives "this thread's launch, at this time, cost this much GPU time".
/// Encoded as 40 bytes:
///
/// ```text
///  0 correlation u32 | 4 tid u32 | 8 start u64 | 16 end u64 | 24 after u64 | 32 cbid u32
/// 36 domain u8 | 37 flags u8 | 38 2 bytes zero
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// CUPTI's correlation id of the call (the same id as its kernel/graph activity records).
    pub correlation_id: u32,
    /// `gettid()` of the launching thread, in the traced process's pid namespace.
    pub tid: u32,
    /// The call's entry and exit, CLOCK_MONOTONIC ns (read on the launching thread).
    pub start_ns: u64,
    pub end_ns: u64,
    /// When the previous launch call of this thread (recorded or not, failed ones included;
    /// calls nested in a runtime launch excepted) returned, CLOCK_MONOTONIC ns; 0 for the
    /// thread's first. The call's real entry lies in `(after_ns, start_ns]`: a stack sample
    /// taken at its entry is the thread's latest launch sample after `after_ns`, however late
    /// CUPTI called back.
    pub after_ns: u64,
    /// CUPTI callback id of the function (`CUpti_driver_api_trace_cbid` or
    /// `CUpti_runtime_api_trace_cbid`, by `domain`).
    pub cbid: u32,
    pub domain: ApiDomain,
    /// [`launch_flags`] bits.
    pub flags: u8,
}

impl Launch {
    pub fn is_graph(&self) -> bool {
        self.flags & launch_flags::GRAPH != 0
    }
    pub fn is_nested(&self) -> bool {
        self.flags & launch_flags::NESTED != 0
    }
}

/// The library's counters, cumulative since it started. Sent about once a second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stats {
    /// Records decoded and queued for sending.
    pub records: u64,
    /// Records CUPTI itself dropped (no buffer available).
    pub cupti_dropped: u64,
    /// Buffer requests refused because the fixed pool was empty.
    pub buffers_exhausted: u64,
    /// Records of kinds this build does not decode.
    pub unknown_kind: u64,
    /// Records without timestamps or too short to decode.
    pub bad_records: u64,
    /// Batches dropped because the send queue was full.
    pub queue_full: u64,
    /// Batches dropped because no agent was connected.
    pub no_agent: u64,
    /// Batches written to the agent.
    pub batches_sent: u64,
    /// Kernel names not interned because the name table is full.
    pub names_overflow: u64,
    /// CUPTI calls that failed (enable/disable/flush...).
    pub cupti_errors: u64,
    /// Panics caught at the FFI boundary.
    pub panics: u64,
    /// [`DetailLevel`] in effect (as u8): the agent's request may have been refused.
    pub detail: u64,
    /// Launch API calls recorded by the launch callbacks (version 2).
    pub launches: u64,
    /// Launch records dropped because the launch ring was full (the sender fell behind).
    pub launches_ring_full: u64,
    /// Launch records dropped because no agent was connected or the write failed.
    pub launches_unsent: u64,
    /// Launch callbacks in effect: 1 when CUPTI accepted the subscription and at least one
    /// launch callback, else 0 (another CUPTI subscriber, or detail `off`).
    pub launch_tracing: u64,
}

impl Stats {
    const FIELDS: usize = 16;

    fn to_array(self) -> [u64; Self::FIELDS] {
        [
            self.records,
            self.cupti_dropped,
            self.buffers_exhausted,
            self.unknown_kind,
            self.bad_records,
            self.queue_full,
            self.no_agent,
            self.batches_sent,
            self.names_overflow,
            self.cupti_errors,
            self.panics,
            self.detail,
            self.launches,
            self.launches_ring_full,
            self.launches_unsent,
            self.launch_tracing,
        ]
    }

    /// Missing trailing counters (an older sender) read as 0; extra ones are ignored.
    fn from_slice(v: &[u64]) -> Stats {
        let g = |i: usize| v.get(i).copied().unwrap_or(0);
        Stats {
            records: g(0),
            cupti_dropped: g(1),
            buffers_exhausted: g(2),
            unknown_kind: g(3),
            bad_records: g(4),
            queue_full: g(5),
            no_agent: g(6),
            batches_sent: g(7),
            names_overflow: g(8),
            cupti_errors: g(9),
            panics: g(10),
            detail: g(11),
            launches: g(12),
            launches_ring_full: g(13),
            launches_unsent: g(14),
            launch_tracing: g(15),
        }
    }
}

/// Sent first on every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub pid: u32,
    /// `cuptiGetVersion` (0 if unknown).
    pub cupti_version: u32,
    pub detail: DetailLevel,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Names(Vec<(u32, String)>),
    Activities(Vec<Activity>),
    Stats(Stats),
    /// Launch API calls (version 2).
    Launches(Vec<Launch>),
    /// A frame type this decoder does not know, skipped whole (`ty`: its type, `len`: payload
    /// bytes). Never encoded.
    Unknown {
        ty: u16,
        len: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    BadMagic(u32),
    /// A frame of a wire version outside [`MIN_VERSION`]..=[`VERSION`] (a newer library: update
    /// the agent).
    UnsupportedVersion(u16),
    TooLarge(usize),
    /// The payload does not match its frame type's layout.
    BadPayload(&'static str),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::BadMagic(m) => write!(f, "bad frame magic {m:#010x}"),
            WireError::UnsupportedVersion(v) => write!(
                f,
                "unsupported wire version {v} (this agent reads {MIN_VERSION}..={VERSION}; a newer injection library needs a newer agent)"
            ),
            WireError::TooLarge(n) => write!(f, "frame payload of {n} bytes exceeds the limit"),
            WireError::BadPayload(what) => write!(f, "malformed payload: {what}"),
        }
    }
}

impl std::error::Error for WireError {}

fn put_header(out: &mut Vec<u8>, ty: u16, payload_len: usize) {
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
}

/// Appends `frame`, encoded, to `out`.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) {
    match frame {
        Frame::Hello(h) => {
            put_header(out, FRAME_HELLO, 12);
            out.extend_from_slice(&h.pid.to_le_bytes());
            out.extend_from_slice(&h.cupti_version.to_le_bytes());
            out.extend_from_slice(&[h.detail as u8, 0, 0, 0]);
        }
        Frame::Names(names) => {
            let len = 4 + names
                .iter()
                .map(|(_, n)| 6 + n.len().min(MAX_NAME_LEN))
                .sum::<usize>();
            put_header(out, FRAME_NAMES, len);
            out.extend_from_slice(&(names.len() as u32).to_le_bytes());
            for (id, name) in names {
                let bytes = truncate_utf8(name, MAX_NAME_LEN).as_bytes();
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
                out.extend_from_slice(bytes);
            }
        }
        Frame::Activities(acts) => {
            put_header(out, FRAME_ACTIVITIES, 4 + acts.len() * ACTIVITY_LEN);
            out.extend_from_slice(&(acts.len() as u32).to_le_bytes());
            for a in acts {
                encode_activity(a, out);
            }
        }
        Frame::Stats(s) => {
            let arr = s.to_array();
            put_header(out, FRAME_STATS, 4 + arr.len() * 8);
            out.extend_from_slice(&(arr.len() as u32).to_le_bytes());
            for v in arr {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Frame::Launches(ls) => {
            put_header(out, FRAME_LAUNCHES, 4 + ls.len() * LAUNCH_LEN);
            out.extend_from_slice(&(ls.len() as u32).to_le_bytes());
            for l in ls {
                encode_launch(l, out);
            }
        }
        // Only ever produced by the decoder.
        Frame::Unknown { .. } => {}
    }
}

fn encode_launch(l: &Launch, out: &mut Vec<u8>) {
    out.extend_from_slice(&l.correlation_id.to_le_bytes());
    out.extend_from_slice(&l.tid.to_le_bytes());
    out.extend_from_slice(&l.start_ns.to_le_bytes());
    out.extend_from_slice(&l.end_ns.to_le_bytes());
    out.extend_from_slice(&l.after_ns.to_le_bytes());
    out.extend_from_slice(&l.cbid.to_le_bytes());
    out.extend_from_slice(&[l.domain as u8, l.flags, 0, 0]);
}

fn decode_launch(b: &[u8]) -> Result<Launch, WireError> {
    debug_assert_eq!(b.len(), LAUNCH_LEN);
    let domain = ApiDomain::from_u8(b[36]).ok_or(WireError::BadPayload("launch domain"))?;
    let flags = b[37];
    if flags & !launch_flags::KNOWN != 0 {
        return Err(WireError::BadPayload("launch flags"));
    }
    let (start_ns, end_ns) = (u64_at(b, 8), u64_at(b, 16));
    if end_ns < start_ns {
        return Err(WireError::BadPayload("launch ends before it starts"));
    }
    let after_ns = u64_at(b, 24);
    if after_ns > start_ns {
        return Err(WireError::BadPayload(
            "launch starts before the previous one ended",
        ));
    }
    Ok(Launch {
        correlation_id: u32_at(b, 0),
        tid: u32_at(b, 4),
        start_ns,
        end_ns,
        after_ns,
        cbid: u32_at(b, 32),
        domain,
        flags,
    })
}

/// Longest prefix of `s` of at most `max` bytes ending on a char boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn encode_activity(a: &Activity, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(a.kind as u8);
    out.push(a.sub);
    out.extend_from_slice(&a.registers_per_thread.to_le_bytes());
    for v in [
        a.device,
        a.context,
        a.stream,
        a.correlation_id,
        a.name_id,
        a.graph_id,
        a.shared_mem_bytes,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [a.start_ns, a.end_ns, a.bytes] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in a.grid.iter().chain(a.block.iter()) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    debug_assert_eq!(out.len() - start, ACTIVITY_LEN);
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn i32_at(b: &[u8], o: usize) -> i32 {
    i32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn decode_activity(b: &[u8]) -> Result<Activity, WireError> {
    debug_assert_eq!(b.len(), ACTIVITY_LEN);
    let kind = ActivityKind::from_u8(b[0]).ok_or(WireError::BadPayload("activity kind"))?;
    Ok(Activity {
        kind,
        sub: b[1],
        registers_per_thread: u16_at(b, 2),
        device: u32_at(b, 4),
        context: u32_at(b, 8),
        stream: u32_at(b, 12),
        correlation_id: u32_at(b, 16),
        name_id: u32_at(b, 20),
        graph_id: u32_at(b, 24),
        shared_mem_bytes: u32_at(b, 28),
        start_ns: u64_at(b, 32),
        end_ns: u64_at(b, 40),
        bytes: u64_at(b, 48),
        grid: [i32_at(b, 56), i32_at(b, 60), i32_at(b, 64)],
        block: [i32_at(b, 68), i32_at(b, 72), i32_at(b, 76)],
    })
}

/// Decodes the first frame in `buf`. `Ok(None)`: more bytes are needed. `Ok(Some((frame, n)))`:
/// the frame used the first `n` bytes. An error means the stream is corrupt and the connection
/// should be dropped.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let magic = u32_at(buf, 0);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = u16_at(buf, 4);
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Err(WireError::UnsupportedVersion(version));
    }
    let ty = u16_at(buf, 6);
    let len = u32_at(buf, 8) as usize;
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let p = &buf[HEADER_LEN..HEADER_LEN + len];
    let frame = match ty {
        FRAME_HELLO => {
            if p.len() != 12 {
                return Err(WireError::BadPayload("hello length"));
            }
            Frame::Hello(Hello {
                pid: u32_at(p, 0),
                cupti_version: u32_at(p, 4),
                detail: DetailLevel::from_u8(p[8]).ok_or(WireError::BadPayload("detail level"))?,
            })
        }
        FRAME_NAMES => {
            let count = counted(p)?;
            let mut names = Vec::with_capacity(count.min(p.len() / 6));
            let mut o = 4;
            for _ in 0..count {
                if p.len() < o + 6 {
                    return Err(WireError::BadPayload("names truncated"));
                }
                let id = u32_at(p, o);
                let n = u16_at(p, o + 4) as usize;
                o += 6;
                let bytes = p
                    .get(o..o + n)
                    .ok_or(WireError::BadPayload("name truncated"))?;
                let name = std::str::from_utf8(bytes)
                    .map_err(|_| WireError::BadPayload("name not UTF-8"))?;
                names.push((id, name.to_owned()));
                o += n;
            }
            if o != p.len() {
                return Err(WireError::BadPayload("names trailing bytes"));
            }
            Frame::Names(names)
        }
        FRAME_ACTIVITIES => {
            let count = counted(p)?;
            if p.len() != 4 + count * ACTIVITY_LEN {
                return Err(WireError::BadPayload("activities length"));
            }
            let acts = p[4..]
                .chunks_exact(ACTIVITY_LEN)
                .map(decode_activity)
                .collect::<Result<Vec<_>, _>>()?;
            Frame::Activities(acts)
        }
        FRAME_STATS => {
            let count = counted(p)?;
            if p.len() != 4 + count * 8 {
                return Err(WireError::BadPayload("stats length"));
            }
            let vals: Vec<u64> = p[4..].chunks_exact(8).map(|c| u64_at(c, 0)).collect();
            Frame::Stats(Stats::from_slice(&vals))
        }
        FRAME_LAUNCHES if version >= 2 => {
            let count = counted(p)?;
            if Some(p.len()) != count.checked_mul(LAUNCH_LEN).map(|n| n + 4) {
                return Err(WireError::BadPayload("launches length"));
            }
            let ls = p[4..]
                .chunks_exact(LAUNCH_LEN)
                .map(decode_launch)
                .collect::<Result<Vec<_>, _>>()?;
            Frame::Launches(ls)
        }
        other => Frame::Unknown { ty: other, len },
    };
    Ok(Some((frame, HEADER_LEN + len)))
}

fn counted(p: &[u8]) -> Result<usize, WireError> {
    if p.len() < 4 {
        return Err(WireError::BadPayload("missing count"));
    }
    Ok(u32_at(p, 0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_activity() -> Activity {
        Activity {
            kind: ActivityKind::Kernel,
            sub: 0,
            registers_per_thread: 128,
            device: 1,
            context: 2,
            stream: 7,
            correlation_id: 99,
            name_id: 3,
            graph_id: 0,
            shared_mem_bytes: 49152,
            start_ns: 1_000_000_123,
            end_ns: 1_000_050_456,
            bytes: 0,
            grid: [132, 1, 1],
            block: [256, 1, 1],
        }
    }

    fn sample_launch() -> Launch {
        Launch {
            correlation_id: 99,
            tid: 4243,
            start_ns: 1_000_000_000,
            end_ns: 1_000_004_500,
            after_ns: 999_990_000,
            cbid: 211,
            domain: ApiDomain::Runtime,
            flags: 0,
        }
    }

    fn launches_frame(ls: Vec<Launch>) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_frame(&Frame::Launches(ls), &mut buf);
        buf
    }

    #[test]
    fn roundtrip_all_frames_split_at_every_byte() {
        let frames = vec![
            Frame::Hello(Hello {
                pid: 4242,
                cupti_version: 26,
                detail: DetailLevel::Full,
            }),
            Frame::Names(vec![
                (1, "ampere_sgemm_128x64_nn".into()),
                (3, "flash::fwd<é>".into()),
            ]),
            Frame::Activities(vec![
                sample_activity(),
                Activity {
                    kind: ActivityKind::Memcpy,
                    sub: memcpy_kind::DTOH,
                    bytes: 4096,
                    ..sample_activity()
                },
            ]),
            Frame::Stats(Stats {
                records: 10,
                queue_full: 2,
                panics: 1,
                launches: 7,
                launch_tracing: 1,
                ..Stats::default()
            }),
            Frame::Launches(vec![
                sample_launch(),
                Launch {
                    correlation_id: 100,
                    domain: ApiDomain::Driver,
                    flags: launch_flags::GRAPH | launch_flags::NESTED,
                    ..sample_launch()
                },
            ]),
        ];
        let mut buf = Vec::new();
        for f in &frames {
            encode_frame(f, &mut buf);
        }
        // Feed the stream through a growing window: incomplete prefixes must ask for more.
        let mut got = Vec::new();
        let mut pos = 0;
        for end in 0..=buf.len() {
            while let Some((f, n)) = decode_frame(&buf[pos..end]).unwrap() {
                got.push(f);
                pos += n;
            }
        }
        assert_eq!(pos, buf.len());
        assert_eq!(got, frames);
    }

    #[test]
    fn corrupt_streams_are_errors_not_panics() {
        let mut buf = Vec::new();
        encode_frame(&Frame::Activities(vec![sample_activity()]), &mut buf);
        let mut bad = buf.clone();
        bad[0] ^= 0xff;
        assert!(matches!(decode_frame(&bad), Err(WireError::BadMagic(_))));
        let mut bad = buf.clone();
        bad[HEADER_LEN + 4] = 77; // activity kind
        assert_eq!(
            decode_frame(&bad),
            Err(WireError::BadPayload("activity kind"))
        );
        let mut bad = buf.clone();
        bad[8..12].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert!(matches!(decode_frame(&bad), Err(WireError::TooLarge(_))));
        let mut bad = buf.clone();
        bad[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&5u32.to_le_bytes()); // count lies
        assert_eq!(
            decode_frame(&bad),
            Err(WireError::BadPayload("activities length"))
        );
        // Names whose length points past the payload.
        let mut names = Vec::new();
        encode_frame(&Frame::Names(vec![(1, "abc".into())]), &mut names);
        names[HEADER_LEN + 8] = 200;
        assert!(decode_frame(&names).is_err());
    }

    #[test]
    fn launch_records_are_40_bytes_in_the_documented_layout() {
        let buf = launches_frame(vec![sample_launch()]);
        assert_eq!(buf.len(), HEADER_LEN + 4 + LAUNCH_LEN);
        let r = &buf[HEADER_LEN + 4..];
        assert_eq!(u32_at(r, 0), 99);
        assert_eq!(u32_at(r, 4), 4243);
        assert_eq!(u64_at(r, 8), 1_000_000_000);
        assert_eq!(u64_at(r, 16), 1_000_004_500);
        assert_eq!(u64_at(r, 24), 999_990_000);
        assert_eq!(u32_at(r, 32), 211);
        assert_eq!(&r[36..40], &[ApiDomain::Runtime as u8, 0, 0, 0]);
    }

    #[test]
    fn bad_launch_frames_are_errors() {
        let good = launches_frame(vec![sample_launch(), sample_launch()]);
        let rec = HEADER_LEN + 4;
        // Truncated payload: the header promises more bytes, so the decoder waits for them.
        for cut in HEADER_LEN..good.len() {
            assert_eq!(decode_frame(&good[..cut]), Ok(None), "cut at {cut}");
        }
        // The count disagrees with the payload.
        let mut bad = good.clone();
        bad[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            decode_frame(&bad),
            Err(WireError::BadPayload("launches length"))
        );
        // A count whose byte size overflows.
        let mut bad = good.clone();
        bad[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_frame(&bad).is_err());
        // A payload length that is no whole number of records (the header length is consistent).
        let mut bad = good[..good.len() - 1].to_vec();
        bad[8..12].copy_from_slice(&((good.len() - 1 - HEADER_LEN) as u32).to_le_bytes());
        assert_eq!(
            decode_frame(&bad),
            Err(WireError::BadPayload("launches length"))
        );
        let mut bad = good.clone();
        bad[rec + 36] = 9;
        assert_eq!(
            decode_frame(&bad),
            Err(WireError::BadPayload("launch domain"))
        );
        let mut bad = good.clone();
        bad[rec + LAUNCH_LEN + 37] = 0x80;
        assert_eq!(
            decode_frame(&bad),
            Err(WireError::BadPayload("launch flags"))
        );
        let mut bad = good.clone();
        bad[rec + 16..rec + 24].copy_from_slice(&1u64.to_le_bytes());
        assert_eq!(
            decode_frame(&bad),
            Err(WireError::BadPayload("launch ends before it starts"))
        );
        let mut bad = good.clone();
        bad[rec + 24..rec + 32].copy_from_slice(&2_000_000_000u64.to_le_bytes());
        assert_eq!(
            decode_frame(&bad),
            Err(WireError::BadPayload(
                "launch starts before the previous one ended"
            ))
        );
        // Missing count.
        let mut bad = Vec::new();
        put_header(&mut bad, FRAME_LAUNCHES, 2);
        bad.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode_frame(&bad),
            Err(WireError::BadPayload("missing count"))
        );
    }

    #[test]
    fn versions_old_streams_read_newer_refused_unknown_frames_skipped() {
        // A version-1 library's stream (no Launches frame) still decodes.
        let mut v1 = Vec::new();
        encode_frame(&Frame::Activities(vec![sample_activity()]), &mut v1);
        v1[4..6].copy_from_slice(&1u16.to_le_bytes());
        let (f, n) = decode_frame(&v1).unwrap().unwrap();
        assert_eq!(n, v1.len());
        assert_eq!(f, Frame::Activities(vec![sample_activity()]));
        // Launches did not exist in version 1: such a frame is skipped, not misread.
        let mut v1l = launches_frame(vec![sample_launch()]);
        v1l[4..6].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(
            decode_frame(&v1l).unwrap().unwrap(),
            (
                Frame::Unknown {
                    ty: FRAME_LAUNCHES,
                    len: 4 + LAUNCH_LEN
                },
                v1l.len()
            )
        );
        // A newer version is refused with a clear error.
        let mut v3 = launches_frame(vec![sample_launch()]);
        v3[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
        assert_eq!(
            decode_frame(&v3),
            Err(WireError::UnsupportedVersion(VERSION + 1))
        );
        assert!(WireError::UnsupportedVersion(3)
            .to_string()
            .contains("newer agent"));
        let mut v0 = v1.clone();
        v0[4..6].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(decode_frame(&v0), Err(WireError::UnsupportedVersion(0)));
        // An unknown frame type of a known version is skipped whole; the next frame follows.
        let mut buf = Vec::new();
        put_header(&mut buf, 77, 5);
        buf.extend_from_slice(b"hello");
        encode_frame(&Frame::Launches(vec![sample_launch()]), &mut buf);
        let (f, n) = decode_frame(&buf).unwrap().unwrap();
        assert_eq!((f, n), (Frame::Unknown { ty: 77, len: 5 }, HEADER_LEN + 5));
        let (f, _) = decode_frame(&buf[n..]).unwrap().unwrap();
        assert_eq!(f, Frame::Launches(vec![sample_launch()]));
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic xorshift garbage, raw and behind a valid header of each frame type.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000 {
            let len = (next() % 200) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && buf.len() >= HEADER_LEN {
                let ty = 1 + (next() % 6) as u16;
                let plen = (buf.len() - HEADER_LEN) as u32;
                buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
                buf[4..6].copy_from_slice(&VERSION.to_le_bytes());
                buf[6..8].copy_from_slice(&ty.to_le_bytes());
                buf[8..12].copy_from_slice(&plen.to_le_bytes());
            }
            // Walk the buffer as a stream: errors stop it, nothing panics or loops forever.
            let mut pos = 0;
            while let Ok(Some((_, n))) = decode_frame(&buf[pos..]) {
                assert!(n >= HEADER_LEN);
                pos += n;
            }
        }
    }

    #[test]
    fn long_names_are_cut_on_char_boundaries() {
        let long = "é".repeat(MAX_NAME_LEN); // 2 bytes each
        let mut buf = Vec::new();
        encode_frame(&Frame::Names(vec![(9, long)]), &mut buf);
        let (f, _) = decode_frame(&buf).unwrap().unwrap();
        let Frame::Names(n) = f else {
            panic!("not names")
        };
        assert_eq!(n[0].1.len(), MAX_NAME_LEN);
        assert!(n[0].1.chars().all(|c| c == 'é'));
    }

    #[test]
    fn detail_levels_parse() {
        assert_eq!(DetailLevel::parse("Graphs"), Some(DetailLevel::Graphs));
        assert_eq!(DetailLevel::parse("full"), Some(DetailLevel::Full));
        assert_eq!(DetailLevel::parse("loud"), None);
        for l in [DetailLevel::Off, DetailLevel::Graphs, DetailLevel::Full] {
            assert_eq!(DetailLevel::from_u8(l as u8), Some(l));
        }
    }
}
