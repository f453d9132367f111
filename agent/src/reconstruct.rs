//! Per-connection byte streams → HTTP/1.1 exchanges → [`RequestRecord`]s.
//!
//! Contract (used by `pipeline`):
//! - `Reconstructor::on_event(&ConnEvent, &mut Vec<RequestRecord>)` consumes events in kernel order
//!   and pushes every exchange that completed (normally or not).
//! - `on_process_exit(pid, ts, out)` ends that process's connections (`RequestError::ProcessExit`).
//! - `expire_idle(now_ns, out)` bounds memory for connections that went silent.
//! - `in_flight()` gives the running/waiting gauges; `stats()` the counted drops.
//!
//! Timing follows what benchmark clients (vLLM `benchmark_serving`, genai-perf) measure, seen from
//! the server's syscalls: `start_ns` is the read that delivered the request's first byte,
//! `first_token_ns`/`token_ns` the writes that completed each SSE event carrying generated content,
//! `end_ns` the write that completed the response (or the event that cut it off).
//!
//! Every request whose head was parsed yields exactly one record, whatever happens to the
//! connection. Request heads that never parse are counted in [`ReconstructStats::malformed`] and
//! yield no record (there is no method or path to report).
//!
//! Half-close: a read returning 0 ([`ConnEvent::PeerClosed`]) only says the client will send
//! nothing more (`shutdown(SHUT_WR)` looks the same as a full close from the server's side), so
//! pending responses go on and complete normally. A failed write or read (`Error`: EPIPE,
//! ECONNRESET) ends them as `client_disconnect`; the server's close with a response unfinished
//! ends it as `client_disconnect` when the client had closed its side first, else as
//! `server_close`.
//!
//! Only HTTP/1.x stays traced: a connection accepted by the server whose first bytes are a TLS
//! record, the HTTP/2 preface or anything else that is not an HTTP/1.x request
//! ([`http::first_bytes`]) is dropped here and queued in [`Reconstructor::take_untraced`] so the
//! pipeline removes it from the kernel's connection map; its later events (already in the ring)
//! are ignored ([`ReconstructStats::events_after_untrace`]).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use crate::events::{ConnEvent, ConnKey, Direction};
use crate::protocol::http::{self, ContentType, Flow, HttpEvent, MalformedKind, Role};
use crate::protocol::openai::{self, EventInfo};
use crate::protocol::sse::{SseEvent, SseSplitter};
use crate::record::{RequestError, RequestRecord, TokenCountSource};

/// Bounds and timeouts.
#[derive(Clone, Debug)]
pub struct ReconstructConfig {
    /// Connections tracked at once; beyond, the least recently active are evicted.
    pub max_connections: usize,
    /// A connection silent this long is dropped by [`Reconstructor::expire_idle`].
    pub idle_timeout_ns: u64,
    /// Bound on one header block: a longer head is counted as
    /// [`ReconstructStats::header_overflow`] and the connection resyncs at the next message.
    /// Defaults to what the kernel captures of a request's start (`HEAD_CAPTURE`).
    pub max_header_bytes: usize,
    /// Requests received but not yet answered, per connection (pipelining depth).
    pub max_pending_per_conn: usize,
    /// Captured prefix of a request body, or of a non-streaming response body, kept for JSON
    /// field extraction (cleared as soon as it is read).
    pub max_body_scan_bytes: usize,
    /// Bound on one SSE event's data.
    pub max_event_bytes: usize,
    /// Content events whose times are kept per exchange; later ones are still counted.
    pub max_token_events: usize,
}

impl Default for ReconstructConfig {
    fn default() -> Self {
        ReconstructConfig {
            max_connections: 16 * 1024,
            idle_timeout_ns: 15 * 60 * 1_000_000_000,
            // What the kernel captures of every request's start, whatever `--capture-bytes`.
            max_header_bytes: infertap_common::HEAD_CAPTURE,
            max_pending_per_conn: 64,
            max_body_scan_bytes: 16 * 1024,
            max_event_bytes: crate::protocol::sse::DEFAULT_MAX_EVENT_BYTES,
            max_token_events: 256 * 1024,
        }
    }
}

/// Requests in progress, as an inference server's own gauges define them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    /// First content event seen, response not finished.
    pub running: u64,
    /// Request head received, no content event yet (includes non-streaming requests).
    pub waiting: u64,
}

/// One request in progress (for GPU correlation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlightRequest {
    pub conn: ConnKey,
    pub seq_on_conn: u32,
    pub start_ns: u64,
    pub first_token_ns: Option<u64>,
    /// Tokens counted so far.
    pub tokens: u64,
}

/// Counters of what was seen, dropped or repaired. Monotonic except `connections_open`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconstructStats {
    pub events: u64,
    pub records: u64,
    /// Connections tracked now (gauge).
    pub connections_open: u64,
    pub connections_opened: u64,
    /// Connections first seen mid-stream (no accept observed).
    pub connections_adopted: u64,
    /// Dropped because `max_connections` was reached.
    pub connections_evicted: u64,
    /// Dropped by `expire_idle`.
    pub connections_expired: u64,
    /// Close/error events for connections not tracked.
    pub events_for_unknown_conn: u64,
    /// Messages that could not be parsed (either direction).
    pub malformed: u64,
    /// Of `malformed`: header blocks over `max_header_bytes`.
    pub header_overflow: u64,
    /// Message starts found by scanning (after a loss, or on adopted connections).
    pub resyncs: u64,
    /// Gaps where a message start was expected.
    pub lost_sync: u64,
    /// Chunk framing recovered at a syscall boundary after a gap.
    pub chunk_resyncs: u64,
    /// Syscalls whose payload was cut by the capture limit.
    pub gaps: u64,
    pub gap_bytes: u64,
    /// Responses with no request to pair with (adopted connections, lost requests).
    pub orphan_responses: u64,
    /// Requests not tracked because `max_pending_per_conn` was reached.
    pub pending_overflow: u64,
    /// SSE events dispatched without their end (gap or size bound).
    pub truncated_events: u64,
    /// Event payloads read with the byte-level fallback (JSON cut by the capture limit).
    pub fallback_events: u64,
    /// Content events beyond `max_token_events` (counted, times not kept).
    pub token_events_dropped: u64,
    /// Connections no longer traced because they do not speak HTTP/1.x, by
    /// [`UntracedKind`] (index `kind as usize`).
    pub untraced: [u64; UntracedKind::COUNT],
    /// Events of connections dropped as not HTTP/1.x that were already on their way.
    pub events_after_untrace: u64,
    /// Syscall tails (last bytes of a syscall longer than the capture) fed to the parsers.
    pub tails: u64,
}

/// Why a connection stopped being traced: it does not speak HTTP/1.x.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UntracedKind {
    /// A unix-domain socket (ZMQ IPC, torch distributed stores, local RPC).
    Unix = 0,
    /// TLS (the first byte is a handshake record).
    Tls = 1,
    /// HTTP/2 with prior knowledge (the connection preface `PRI * HTTP/2.0`).
    H2 = 2,
    /// Any other first bytes that are not an HTTP/1.x request.
    Other = 3,
    /// HTTP/1.1 that switched protocols (`101`: WebSocket, h2c), after its switch.
    Upgraded = 4,
}

impl UntracedKind {
    pub const COUNT: usize = 5;
    pub const ALL: [UntracedKind; Self::COUNT] =
        [Self::Unix, Self::Tls, Self::H2, Self::Other, Self::Upgraded];

    /// Label value (`kind`) of `infertap_connections_untraced_total`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unix => "unix",
            Self::Tls => "tls",
            Self::H2 => "h2",
            Self::Other => "other",
            Self::Upgraded => "upgraded",
        }
    }
}

/// A connection the kernel should stop tracing (see [`Reconstructor::take_untraced`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Untrace {
    pub conn: ConnKey,
    /// Its fd, when the accept was seen.
    pub fd: Option<i32>,
    pub kind: UntracedKind,
}

/// Connections dropped as not HTTP/1.x that are remembered, so events already in flight for
/// them are ignored instead of adopting them again.
const MAX_UNTRACED_REMEMBERED: usize = 4096;
/// Bytes kept from the end of a response body that was not captured whole (what follows the
/// last uncaptured bytes), for the fields a JSON body ends with (`usage`).
const MAX_BODY_TAIL_BYTES: usize = 4096;
/// First bytes of a connection kept until they show whether it speaks HTTP/1.x.
const MAX_FIRST_BYTES: usize = 32;

/// Rebuilds exchanges from connection events.
pub struct Reconstructor {
    cfg: ReconstructConfig,
    conns: HashMap<ConnKey, Conn>,
    stats: ReconstructStats,
    /// Connections dropped as not HTTP/1.x, oldest first (bounded).
    untraced: VecDeque<ConnKey>,
    untraced_set: std::collections::HashSet<ConnKey>,
    /// Decisions the pipeline has not applied to the kernel map yet.
    to_untrace: Vec<Untrace>,
}

struct Conn {
    req: http::Parser,
    resp: http::Parser,
    side: Side,
}

/// Per-connection state the parser callbacks update.
struct Side {
    key: ConnKey,
    peer: Option<SocketAddr>,
    last_ts: u64,
    next_seq: u32,
    /// Requests whose head was parsed and whose response has not ended, oldest first.
    pending: VecDeque<Exchange>,
    req_start_ns: u64,
    /// Exchange receiving the request body now.
    req_target: Option<u32>,
    req_body: Vec<u8>,
    resp_start_ns: u64,
    resp_target: RespTarget,
    /// The current response body is an SSE stream (else JSON/other, scanned at its end).
    resp_sse: bool,
    sse: SseSplitter,
    resp_body: Vec<u8>,
    resp_body_cut: bool,
    /// A 101 response switched protocols: stop parsing both directions.
    upgraded: bool,
    /// The fd, when the connection was seen opening.
    fd: Option<i32>,
    /// The first bytes have not yet shown whether this connection speaks HTTP/1.x (only
    /// connections seen from their accept are judged; adopted ones may be mid-message).
    judging: bool,
    /// First bytes kept while `judging` (at most `MAX_FIRST_BYTES`).
    first_bytes: Vec<u8>,
    /// The client closed its sending side (a read returned 0).
    peer_closed: bool,
    /// Bytes of the current non-SSE response body after its last uncaptured bytes (bounded to
    /// its last `MAX_BODY_TAIL_BYTES`).
    resp_tail: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RespTarget {
    None,
    /// A 1xx interim response.
    Interim,
    /// A response with no request to pair with.
    Orphan,
    /// The response to `pending.front()`.
    Front,
}

struct Exchange {
    seq: u32,
    method: String,
    path: String,
    start_ns: u64,
    request_end_ns: Option<u64>,
    request_bytes: u64,
    req_model: Option<String>,
    req_stream: Option<bool>,
    status: Option<u16>,
    response_start_ns: Option<u64>,
    sse: bool,
    first_token_ns: Option<u64>,
    token_ns: Vec<u64>,
    tokens_per_event: Vec<u32>,
    counted_tokens: u64,
    usage_completion: Option<u64>,
    usage_prompt: Option<u64>,
    resp_model: Option<String>,
    finish_reason: Option<String>,
    terminal: bool,
    /// Time of the latest write of this exchange's response.
    last_out_ns: u64,
    stream_error: Option<Option<u16>>,
    malformed: bool,
}

const MAX_PATH_BYTES: usize = 512;
const MAX_MODEL_BYTES: usize = 256;

impl Reconstructor {
    pub fn new(cfg: ReconstructConfig) -> Self {
        Reconstructor {
            cfg,
            conns: HashMap::new(),
            stats: ReconstructStats::default(),
            untraced: VecDeque::new(),
            untraced_set: std::collections::HashSet::new(),
            to_untrace: Vec::new(),
        }
    }

    pub fn config(&self) -> &ReconstructConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &ReconstructStats {
        &self.stats
    }

    /// Consumes one event; pushes the exchanges it completed.
    pub fn on_event(&mut self, ev: &ConnEvent<'_>, out: &mut Vec<RequestRecord>) {
        self.stats.events += 1;
        if !self.untraced_set.is_empty() && self.untraced_set.contains(&ev.conn()) {
            match ev {
                // The id is reused only if the kernel's clock repeats: start afresh.
                ConnEvent::Open { .. } => self.forget_untraced(ev.conn()),
                ConnEvent::Close { .. } => {
                    self.stats.events_after_untrace += 1;
                    self.forget_untraced(ev.conn());
                    return;
                }
                _ => {
                    self.stats.events_after_untrace += 1;
                    return;
                }
            }
        }
        match *ev {
            ConnEvent::Open {
                conn,
                fd,
                ts_ns,
                peer,
                ..
            } => {
                if let Some(old) = self.conns.remove(&conn) {
                    // Same id seen again: whatever was pending there is lost.
                    self.flush(old, ts_ns, RequestError::Truncated, out);
                }
                self.insert(conn, ts_ns, peer, true, out);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.side.fd = Some(fd);
                    c.side.judging = true;
                }
            }
            ConnEvent::Data {
                conn,
                dir,
                ts_ns,
                len,
                payload,
                ..
            } => self.on_data(conn, dir, ts_ns, len, payload, out),
            ConnEvent::DataTail {
                conn,
                dir,
                ts_ns,
                payload,
            } => self.on_tail(conn, dir, ts_ns, payload, out),
            ConnEvent::PeerClosed { conn, ts_ns } => {
                // Maybe only a half-close: the client may still be reading its answers.
                let Some(c) = self.conns.get_mut(&conn) else {
                    self.stats.events_for_unknown_conn += 1;
                    return;
                };
                c.side.last_ts = ts_ns;
                c.side.peer_closed = true;
            }
            ConnEvent::Error { conn, ts_ns, .. } => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    self.stats.events_for_unknown_conn += 1;
                    return;
                };
                c.side.last_ts = ts_ns;
                c.cut_pending(ts_ns, RequestError::ClientDisconnect, &mut self.stats, out);
            }
            ConnEvent::Close { conn, ts_ns } => {
                let Some(mut c) = self.conns.remove(&conn) else {
                    self.stats.events_for_unknown_conn += 1;
                    return;
                };
                // A read-until-close body ends normally here.
                let Conn { resp, side, .. } = &mut c;
                let (cfg, stats) = (&self.cfg, &mut self.stats);
                resp.on_close(&mut |ev| side.on_response(ev, ts_ns, cfg, stats, out));
                // The client left first (or half-closed and the server gave up): its disconnect
                // cut what was still unanswered.
                let error = if c.side.peer_closed {
                    RequestError::ClientDisconnect
                } else {
                    RequestError::ServerClose
                };
                self.flush(c, ts_ns, error, out);
            }
        }
        self.stats.connections_open = self.conns.len() as u64;
    }

    /// Stops following `conn`, which does not speak HTTP/1.x (or is a unix-domain socket):
    /// its state is dropped, its later events ignored, and it is queued for
    /// [`Reconstructor::take_untraced`]. `fd` is needed when the connection was never seen here.
    /// Exchanges in progress on it (none when its first bytes decided) end as `truncated`.
    pub fn untrace(
        &mut self,
        conn: ConnKey,
        fd: Option<i32>,
        kind: UntracedKind,
        out: &mut Vec<RequestRecord>,
    ) {
        let fd = match self.conns.remove(&conn) {
            Some(c) => {
                let (ts, known) = (c.side.last_ts, c.side.fd);
                self.flush(c, ts, RequestError::Truncated, out);
                fd.or(known)
            }
            None => fd,
        };
        self.stats.untraced[kind as usize] += 1;
        if self.untraced_set.insert(conn) {
            self.untraced.push_back(conn);
            if self.untraced.len() > MAX_UNTRACED_REMEMBERED {
                if let Some(old) = self.untraced.pop_front() {
                    self.untraced_set.remove(&old);
                }
            }
        }
        self.to_untrace.push(Untrace { conn, fd, kind });
        self.stats.connections_open = self.conns.len() as u64;
    }

    fn forget_untraced(&mut self, conn: ConnKey) {
        if self.untraced_set.remove(&conn) {
            self.untraced.retain(|k| *k != conn);
        }
    }

    /// Connections found not to speak HTTP/1.x since the last call: the pipeline removes them
    /// from the kernel's connection map so their syscalls cost nothing more.
    pub fn take_untraced(&mut self) -> Vec<Untrace> {
        std::mem::take(&mut self.to_untrace)
    }

    /// Whether decisions are waiting for [`Reconstructor::take_untraced`].
    pub fn has_untraced(&self) -> bool {
        !self.to_untrace.is_empty()
    }

    /// Marks a connection that was open before tracing began (opened with `ConnEvent::Open` by
    /// adoption): its first bytes may be the middle of a message, so they do not decide whether
    /// it speaks HTTP/1.x.
    pub fn mark_adopted(&mut self, conn: ConnKey) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.side.judging = false;
            c.side.first_bytes = Vec::new();
        }
    }

    /// Judges a fresh connection's first bytes; returns the kind when it is not HTTP/1.x.
    fn judge(side: &mut Side, dir: Direction, payload: &[u8], gap: u64) -> Option<UntracedKind> {
        use http::FirstBytes;
        let room = MAX_FIRST_BYTES.saturating_sub(side.first_bytes.len());
        side.first_bytes
            .extend_from_slice(&payload[..payload.len().min(room)]);
        let verdict = match dir {
            Direction::In => http::first_bytes(&side.first_bytes),
            // A server that speaks first: an HTTP/1.x server only ever sends a response.
            Direction::Out => {
                if http::looks_like_response_start(&side.first_bytes) {
                    FirstBytes::Http
                } else if b"HTTP/1.".starts_with(&side.first_bytes) {
                    FirstBytes::Undecided
                } else {
                    FirstBytes::Other
                }
            }
        };
        let verdict = match verdict {
            // Out of bytes to look at: leave it to the parser.
            FirstBytes::Undecided if gap > 0 || side.first_bytes.len() >= MAX_FIRST_BYTES => {
                FirstBytes::Http
            }
            v => v,
        };
        let kind = match verdict {
            FirstBytes::Undecided => return None,
            FirstBytes::Http => None,
            FirstBytes::Tls => Some(UntracedKind::Tls),
            FirstBytes::H2 => Some(UntracedKind::H2),
            FirstBytes::Other => Some(UntracedKind::Other),
        };
        side.judging = false;
        side.first_bytes = Vec::new();
        kind
    }

    fn on_data(
        &mut self,
        key: ConnKey,
        dir: Direction,
        ts: u64,
        len: u64,
        payload: &[u8],
        out: &mut Vec<RequestRecord>,
    ) {
        if !self.conns.contains_key(&key) {
            self.stats.connections_adopted += 1;
            self.insert(key, ts, None, false, out);
        }
        let payload = &payload[..payload
            .len()
            .min(usize::try_from(len).unwrap_or(usize::MAX))];
        let gap = len - payload.len() as u64;
        if let Some(c) = self.conns.get_mut(&key) {
            if c.side.judging && (!payload.is_empty() || gap > 0) {
                if let Some(kind) = Self::judge(&mut c.side, dir, payload, gap) {
                    self.untrace(key, None, kind, out);
                    return;
                }
            }
        }
        let Self {
            cfg, conns, stats, ..
        } = self;
        let Some(c) = conns.get_mut(&key) else { return };
        if gap > 0 {
            stats.gaps += 1;
            stats.gap_bytes += gap;
        }
        let Conn { req, resp, side } = c;
        side.last_ts = ts;
        match dir {
            Direction::In => req.feed(payload, gap, &mut |ev| side.on_request(ev, ts, cfg, stats)),
            Direction::Out => resp.feed(payload, gap, &mut |ev| {
                side.on_response(ev, ts, cfg, stats, out)
            }),
        }
        if side.upgraded {
            req.set_opaque();
            resp.set_opaque();
            if side.pending.is_empty() {
                // Switched protocols (WebSocket, h2c): nothing more to parse here.
                self.untrace(key, None, UntracedKind::Upgraded, out);
            }
        }
    }

    /// The last bytes of the syscall just fed (see [`ConnEvent::DataTail`]).
    fn on_tail(
        &mut self,
        key: ConnKey,
        dir: Direction,
        ts: u64,
        payload: &[u8],
        out: &mut Vec<RequestRecord>,
    ) {
        let Self {
            cfg, conns, stats, ..
        } = self;
        // A tail follows its prefix's event, which created the connection if needed.
        let Some(c) = conns.get_mut(&key) else {
            stats.events_for_unknown_conn += 1;
            return;
        };
        stats.tails += 1;
        let Conn { req, resp, side } = c;
        side.last_ts = ts;
        match dir {
            Direction::In => req.feed_tail(payload, &mut |ev| side.on_request(ev, ts, cfg, stats)),
            Direction::Out => {
                resp.feed_tail(payload, &mut |ev| side.on_response(ev, ts, cfg, stats, out))
            }
        }
        if side.upgraded {
            req.set_opaque();
            resp.set_opaque();
            if side.pending.is_empty() {
                // Switched protocols (WebSocket, h2c): nothing more to parse here.
                self.untrace(key, None, UntracedKind::Upgraded, out);
            }
        }
    }

    fn insert(
        &mut self,
        key: ConnKey,
        ts: u64,
        peer: Option<SocketAddr>,
        synced: bool,
        out: &mut Vec<RequestRecord>,
    ) {
        if self.conns.len() >= self.cfg.max_connections.max(1) {
            self.evict(out);
        }
        self.stats.connections_opened += 1;
        let max_header = self.cfg.max_header_bytes;
        self.conns.insert(
            key,
            Conn {
                req: http::Parser::new(Role::Request, max_header, synced),
                resp: http::Parser::new(Role::Response, max_header, synced),
                side: Side {
                    key,
                    peer,
                    last_ts: ts,
                    next_seq: 0,
                    pending: VecDeque::new(),
                    req_start_ns: ts,
                    req_target: None,
                    req_body: Vec::new(),
                    resp_start_ns: ts,
                    resp_target: RespTarget::None,
                    resp_sse: false,
                    sse: SseSplitter::new(self.cfg.max_event_bytes),
                    resp_body: Vec::new(),
                    resp_body_cut: false,
                    upgraded: false,
                    fd: None,
                    judging: false,
                    first_bytes: Vec::new(),
                    peer_closed: false,
                    resp_tail: Vec::new(),
                },
            },
        );
        self.stats.connections_open = self.conns.len() as u64;
    }

    /// Drops the least recently active sixteenth of the table (amortises the scan).
    fn evict(&mut self, out: &mut Vec<RequestRecord>) {
        let mut ages: Vec<(u64, ConnKey)> = self
            .conns
            .iter()
            .map(|(k, c)| (c.side.last_ts, *k))
            .collect();
        let n = (ages.len() / 16).max(1);
        ages.select_nth_unstable(n - 1);
        for &(_, key) in &ages[..n] {
            if let Some(c) = self.conns.remove(&key) {
                self.stats.connections_evicted += 1;
                let ts = c.side.last_ts;
                self.flush(c, ts, RequestError::Truncated, out);
            }
        }
    }

    /// The traced process exited: everything it had in flight ends now.
    pub fn on_process_exit(&mut self, pid: u32, ts_ns: u64, out: &mut Vec<RequestRecord>) {
        let keys: Vec<ConnKey> = self
            .conns
            .keys()
            .filter(|k| k.pid == pid)
            .copied()
            .collect();
        for key in keys {
            if let Some(c) = self.conns.remove(&key) {
                self.flush(c, ts_ns, RequestError::ProcessExit, out);
            }
        }
        self.stats.connections_open = self.conns.len() as u64;
    }

    /// Drops connections silent for longer than `idle_timeout_ns`; their unfinished exchanges are
    /// reported as `Truncated` (the close was missed).
    pub fn expire_idle(&mut self, now_ns: u64, out: &mut Vec<RequestRecord>) {
        let timeout = self.cfg.idle_timeout_ns;
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.side.last_ts) > timeout)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some(c) = self.conns.remove(&key) {
                self.stats.connections_expired += 1;
                self.flush(c, now_ns, RequestError::Truncated, out);
            }
        }
        self.stats.connections_open = self.conns.len() as u64;
    }

    /// Running/waiting gauges (walks the in-flight requests; call it per scrape, not per event).
    pub fn in_flight(&self) -> InFlight {
        let mut g = InFlight::default();
        for ex in self.conns.values().flat_map(|c| c.side.pending.iter()) {
            if ex.first_token_ns.is_some() {
                g.running += 1;
            } else {
                g.waiting += 1;
            }
        }
        g
    }

    pub fn in_flight_requests(&self) -> impl Iterator<Item = InFlightRequest> + '_ {
        self.conns.values().flat_map(|c| {
            c.side.pending.iter().map(move |ex| InFlightRequest {
                conn: c.side.key,
                seq_on_conn: ex.seq,
                start_ns: ex.start_ns,
                first_token_ns: ex.first_token_ns,
                tokens: ex.counted_tokens,
            })
        })
    }

    fn flush(&mut self, mut c: Conn, ts: u64, error: RequestError, out: &mut Vec<RequestRecord>) {
        c.cut_pending(ts, error, &mut self.stats, out);
        // Prompt bytes must not outlive their use.
        c.side.req_body.clear();
        c.side.resp_body.clear();
        c.side.resp_tail.clear();
    }
}

impl Conn {
    /// Ends every pending exchange with `error` (the response in progress keeps its byte count).
    fn cut_pending(
        &mut self,
        ts: u64,
        error: RequestError,
        stats: &mut ReconstructStats,
        out: &mut Vec<RequestRecord>,
    ) {
        let side = &mut self.side;
        let resp_in_progress = side.resp_target == RespTarget::Front && self.resp.in_message();
        let mut first = true;
        while let Some(mut ex) = side.pending.pop_front() {
            if side.req_target == Some(ex.seq) && self.req.in_message() {
                ex.request_bytes = self.req.message_bytes();
            }
            let (resp_bytes, partial_event) = if first && resp_in_progress {
                (
                    self.resp.message_bytes(),
                    side.resp_sse && side.sse.finish(),
                )
            } else {
                (0, false)
            };
            first = false;
            side.emit(ex, ts, resp_bytes, Some(error), partial_event, stats, out);
        }
        side.req_target = None;
        side.req_body.clear();
        // Whatever the server still writes for these belongs to no one.
        if side.resp_target == RespTarget::Front {
            side.resp_target = RespTarget::Orphan;
        }
        stats.truncated_events += std::mem::take(&mut side.sse.truncated_events);
        side.sse.reset();
        side.resp_body.clear();
        side.resp_tail.clear();
    }
}

impl Side {
    fn find(&mut self, seq: u32) -> Option<&mut Exchange> {
        self.pending.iter_mut().rev().find(|e| e.seq == seq)
    }

    fn on_request(
        &mut self,
        ev: HttpEvent<'_>,
        ts: u64,
        cfg: &ReconstructConfig,
        stats: &mut ReconstructStats,
    ) -> Flow {
        match ev {
            HttpEvent::MessageStart => {
                self.req_start_ns = ts;
                self.req_target = None;
                self.req_body.clear();
            }
            HttpEvent::Request(head) => {
                if self.pending.len() >= cfg.max_pending_per_conn.max(1) {
                    stats.pending_overflow += 1;
                    return Flow::Continue;
                }
                let seq = self.next_seq;
                self.next_seq = self.next_seq.wrapping_add(1);
                self.pending.push_back(Exchange::new(
                    seq,
                    head.method,
                    head.path,
                    self.req_start_ns,
                ));
                self.req_target = Some(seq);
                if head.method == "CONNECT" {
                    return Flow::Opaque;
                }
            }
            HttpEvent::Body(b) => {
                if self.req_target.is_some() {
                    let room = cfg.max_body_scan_bytes.saturating_sub(self.req_body.len());
                    self.req_body.extend_from_slice(&b[..b.len().min(room)]);
                }
            }
            HttpEvent::BodyGap(_) => {}
            HttpEvent::MessageEnd { bytes } => {
                if let Some(seq) = self.req_target.take() {
                    let info = openai::request_info(&self.req_body);
                    if let Some(ex) = self.pending.iter_mut().rev().find(|e| e.seq == seq) {
                        ex.request_end_ns = Some(ts);
                        ex.request_bytes = bytes;
                        ex.req_model = info.model.map(|m| bounded(&m, MAX_MODEL_BYTES));
                        ex.req_stream = info.stream;
                    }
                }
                self.req_body.clear();
            }
            HttpEvent::Malformed { kind, bytes } => {
                count_malformed(stats, kind);
                if let Some(seq) = self.req_target.take() {
                    if let Some(ex) = self.find(seq) {
                        ex.malformed = true;
                        ex.request_bytes = bytes;
                    }
                }
                self.req_body.clear();
            }
            HttpEvent::LostSync { .. } => stats.lost_sync += 1,
            HttpEvent::Resynced => stats.resyncs += 1,
            HttpEvent::ChunkResynced => stats.chunk_resyncs += 1,
            HttpEvent::Response(_) => {}
        }
        Flow::Continue
    }

    fn on_response(
        &mut self,
        ev: HttpEvent<'_>,
        ts: u64,
        cfg: &ReconstructConfig,
        stats: &mut ReconstructStats,
        out: &mut Vec<RequestRecord>,
    ) -> Flow {
        match ev {
            HttpEvent::MessageStart => {
                self.resp_start_ns = ts;
                self.resp_target = RespTarget::None;
            }
            HttpEvent::Response(head) => {
                if head.status < 200 {
                    self.resp_target = RespTarget::Interim;
                    if head.status == 101 {
                        // Protocol switch: the upgraded exchange ends here.
                        self.upgraded = true;
                        if let Some(mut ex) = self.pending.pop_front() {
                            ex.status = Some(101);
                            ex.response_start_ns = Some(self.resp_start_ns);
                            self.emit(ex, ts, head.head_bytes as u64, None, false, stats, out);
                        }
                        return Flow::Opaque;
                    }
                    return Flow::Continue;
                }
                let start = self.resp_start_ns;
                let Some(ex) = self.pending.front_mut() else {
                    stats.orphan_responses += 1;
                    self.resp_target = RespTarget::Orphan;
                    return Flow::Continue;
                };
                ex.status = Some(head.status);
                ex.response_start_ns = Some(start);
                ex.last_out_ns = ts;
                ex.sse = head.content_type == ContentType::EventStream;
                self.resp_target = RespTarget::Front;
                self.resp_sse = ex.sse;
                self.sse.reset();
                self.resp_body.clear();
                self.resp_body_cut = false;
                self.resp_tail.clear();
                if ex.method == "HEAD" {
                    return Flow::NoBody;
                }
            }
            HttpEvent::Body(b) => {
                if self.resp_target != RespTarget::Front {
                    return Flow::Continue;
                }
                let Some(ex) = self.pending.front_mut() else {
                    return Flow::Continue;
                };
                ex.last_out_ns = ts;
                if self.resp_sse {
                    let max_ev = cfg.max_token_events;
                    self.sse
                        .feed(b, &mut |e| apply_sse(ex, e, ts, max_ev, stats));
                } else if self.resp_body_cut {
                    // Past a gap (or the scan bound): keep the body's last bytes.
                    keep_tail(&mut self.resp_tail, b);
                } else {
                    let room = cfg.max_body_scan_bytes.saturating_sub(self.resp_body.len());
                    let n = b.len().min(room);
                    self.resp_body.extend_from_slice(&b[..n]);
                    if b.len() > room {
                        self.resp_body_cut = true;
                        keep_tail(&mut self.resp_tail, &b[n..]);
                    }
                }
            }
            HttpEvent::BodyGap(n) => {
                if self.resp_target != RespTarget::Front {
                    return Flow::Continue;
                }
                let Some(ex) = self.pending.front_mut() else {
                    return Flow::Continue;
                };
                ex.last_out_ns = ts;
                if self.resp_sse {
                    let max_ev = cfg.max_token_events;
                    self.sse
                        .gap(n, &mut |e| apply_sse(ex, e, ts, max_ev, stats));
                } else {
                    self.resp_body_cut = true;
                    // Only bytes after this gap are contiguous with the body's end.
                    self.resp_tail.clear();
                }
            }
            HttpEvent::MessageEnd { bytes } => {
                if self.resp_target == RespTarget::Front {
                    if let Some(mut ex) = self.pending.pop_front() {
                        let incomplete = if self.resp_sse {
                            self.sse.finish()
                        } else {
                            if !self.resp_body.is_empty() {
                                let info = openai::classify(&self.resp_body);
                                apply_body(&mut ex, info);
                                self.resp_body.clear();
                            }
                            // A body not captured whole ends with its last bytes: the fields a
                            // JSON answer puts last (`usage`, the stop reason) are read there.
                            if !self.resp_tail.is_empty() {
                                let info = openai::classify(&self.resp_tail);
                                apply_body(&mut ex, info);
                                self.resp_tail.clear();
                            }
                            false
                        };
                        stats.truncated_events += std::mem::take(&mut self.sse.truncated_events);
                        self.emit(ex, ts, bytes, None, incomplete, stats, out);
                    }
                }
                self.resp_target = RespTarget::None;
            }
            HttpEvent::Malformed { kind, bytes } => {
                count_malformed(stats, kind);
                // The broken message was the response to the oldest pending request.
                if matches!(self.resp_target, RespTarget::Front | RespTarget::None) {
                    if let Some(mut ex) = self.pending.pop_front() {
                        ex.malformed = true;
                        self.sse.reset();
                        self.resp_body.clear();
                        self.resp_tail.clear();
                        self.emit(
                            ex,
                            ts,
                            bytes,
                            Some(RequestError::Malformed),
                            false,
                            stats,
                            out,
                        );
                    }
                }
                self.resp_target = RespTarget::None;
            }
            HttpEvent::LostSync { .. } => stats.lost_sync += 1,
            HttpEvent::Resynced => stats.resyncs += 1,
            HttpEvent::ChunkResynced => stats.chunk_resyncs += 1,
            HttpEvent::Request(_) => {}
        }
        Flow::Continue
    }

    /// Builds and pushes the record of a finished exchange.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        ex: Exchange,
        end_ns: u64,
        response_bytes: u64,
        cut: Option<RequestError>,
        incomplete_event: bool,
        stats: &mut ReconstructStats,
        out: &mut Vec<RequestRecord>,
    ) {
        let http_error = match ex.status {
            Some(400..=499) => Some(RequestError::Http4xx),
            Some(500..=599) => Some(RequestError::Http5xx),
            _ => None,
        };
        let stream_error = ex.stream_error.map(|code| match code {
            Some(400..=499) => RequestError::Http4xx,
            _ => RequestError::Http5xx,
        });
        // A client that leaves once the stream said it was finished got the whole answer (some
        // close before reading the chunked terminator); its end is the last write it read.
        let (cut, end_ns) = match cut {
            Some(RequestError::ClientDisconnect) if ex.sse && ex.terminal && !incomplete_event => {
                (None, ex.last_out_ns)
            }
            c => (c, end_ns),
        };
        let stream_cut = ex.sse && (incomplete_event || !ex.terminal);
        let error = http_error
            .or(cut)
            .or(stream_error)
            .or(ex.malformed.then_some(RequestError::Malformed))
            .or(stream_cut.then_some(RequestError::Truncated));
        let (output_tokens, source) = match ex.usage_completion {
            Some(n) => (Some(n), Some(TokenCountSource::Usage)),
            None if ex.sse => (Some(ex.counted_tokens), Some(TokenCountSource::Counted)),
            None => (None, None),
        };
        stats.records += 1;
        out.push(RequestRecord {
            pid: self.key.pid,
            conn_id: self.key.conn_id,
            peer: self.peer,
            seq_on_conn: ex.seq,
            method: ex.method,
            path: ex.path,
            status: ex.status,
            model: ex.req_model.or(ex.resp_model),
            stream: ex.req_stream.unwrap_or(ex.sse),
            start_ns: ex.start_ns,
            request_end_ns: ex.request_end_ns,
            response_start_ns: ex.response_start_ns,
            first_token_ns: ex.first_token_ns,
            end_ns: end_ns.max(ex.start_ns),
            token_ns: ex.token_ns,
            tokens_per_event: ex.tokens_per_event,
            output_tokens,
            token_count_source: source,
            prompt_tokens: ex.usage_prompt,
            finish_reason: ex.finish_reason,
            request_bytes: ex.request_bytes,
            response_bytes,
            error,
        });
    }
}

impl Exchange {
    fn new(seq: u32, method: &str, path: &str, start_ns: u64) -> Self {
        Exchange {
            seq,
            method: bounded(method, 32),
            path: bounded(path, MAX_PATH_BYTES),
            start_ns,
            request_end_ns: None,
            request_bytes: 0,
            req_model: None,
            req_stream: None,
            status: None,
            response_start_ns: None,
            sse: false,
            first_token_ns: None,
            token_ns: Vec::new(),
            tokens_per_event: Vec::new(),
            counted_tokens: 0,
            usage_completion: None,
            usage_prompt: None,
            resp_model: None,
            finish_reason: None,
            terminal: false,
            last_out_ns: start_ns,
            stream_error: None,
            malformed: false,
        }
    }
}

fn apply_sse(
    ex: &mut Exchange,
    e: SseEvent<'_>,
    ts: u64,
    max_events: usize,
    stats: &mut ReconstructStats,
) {
    let mut info = openai::classify(e.data);
    if e.error_field {
        // `error:` events carry an error object whatever their JSON says.
        info.content = false;
        info.error = Some(info.error.flatten());
    }
    apply_event(ex, info, ts, max_events, stats);
}

/// Folds one SSE event into its exchange.
fn apply_event(
    ex: &mut Exchange,
    info: EventInfo<'_>,
    ts: u64,
    max_events: usize,
    stats: &mut ReconstructStats,
) {
    if info.fallback {
        stats.fallback_events += 1;
    }
    if info.content {
        let tokens = info.tokens.max(1);
        ex.first_token_ns.get_or_insert(ts);
        ex.counted_tokens += u64::from(tokens);
        if ex.token_ns.len() < max_events {
            ex.token_ns.push(ts);
            ex.tokens_per_event.push(tokens);
        } else {
            stats.token_events_dropped += 1;
        }
    }
    apply_body(ex, info);
}

/// The fields a stream event and a whole JSON body share.
fn apply_body(ex: &mut Exchange, info: EventInfo<'_>) {
    if info.terminal {
        ex.terminal = true;
    }
    if let Some(fr) = info.finish_reason {
        if ex.finish_reason.as_deref() != Some(&*fr) {
            ex.finish_reason = Some(vocabulary(&fr));
        }
    }
    if ex.resp_model.is_none() {
        if let Some(m) = info.model {
            ex.resp_model = Some(bounded(&m, MAX_MODEL_BYTES));
        }
    }
    if info.completion_tokens.is_some() {
        ex.usage_completion = info.completion_tokens;
    }
    if info.prompt_tokens.is_some() {
        ex.usage_prompt = info.prompt_tokens;
    }
    if info.error.is_some() {
        ex.stream_error = info.error;
    }
}

/// Appends `b` to `tail`, keeping only its last `MAX_BODY_TAIL_BYTES`.
fn keep_tail(tail: &mut Vec<u8>, b: &[u8]) {
    if b.len() >= MAX_BODY_TAIL_BYTES {
        tail.clear();
        tail.extend_from_slice(&b[b.len() - MAX_BODY_TAIL_BYTES..]);
        return;
    }
    let excess = (tail.len() + b.len()).saturating_sub(MAX_BODY_TAIL_BYTES);
    tail.drain(..excess);
    tail.extend_from_slice(b);
}

fn count_malformed(stats: &mut ReconstructStats, kind: MalformedKind) {
    stats.malformed += 1;
    if kind == MalformedKind::HeaderOverflow {
        stats.header_overflow += 1;
    }
}

/// At most `max` bytes of `s`, cut at a char boundary.
fn bounded(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Finish reasons are a closed vocabulary; anything else is reported as `other` so no free text
/// can leak through this field.
fn vocabulary(s: &str) -> String {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        s.to_string()
    } else {
        "other".to_owned()
    }
}

#[cfg(test)]
mod tests;
