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
//! `first_token_ns`/`token_ns` the writes that completed each stream event carrying generated
//! content, `end_ns` the write that completed the response (or the event that cut it off).
//!
//! Stream bodies: `text/event-stream` is split into SSE events (their `event:` names are part of
//! the parse), NDJSON media types into lines, and a chunked `application/json` body becomes a
//! JSON-lines stream once its first two lines are each a whole JSON value (else it is one
//! non-streaming body). Each event is classified by its own members ([`openai::classify_event`])
//! into a [`StreamKind`]; events of parallel choices (`n > 1`) are kept apart per choice.
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
use crate::protocol::http::{self, ContentType, Flow, Framing, HttpEvent, MalformedKind, Role};
use crate::protocol::ndjson::{Line, LineSplitter};
use crate::protocol::openai::{self, EventInfo};
use crate::protocol::shape::{finish_vocabulary, StreamKind};
use crate::protocol::sse::{SseEvent, SseSplitter};
use crate::record::{ChoiceRecord, RequestError, RequestRecord, TokenCountSource};

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
    /// Choices beyond [`MAX_CHOICES`] in one exchange (their tokens count in the totals only).
    pub choices_overflow: u64,
    /// Connections no longer traced because they do not speak HTTP/1.x, by
    /// [`UntracedKind`] (index `kind as usize`).
    pub untraced: [u64; UntracedKind::COUNT],
    /// Events of connections dropped as not HTTP/1.x that were already on their way.
    pub events_after_untrace: u64,
    /// Syscall tails (last bytes of a syscall longer than the capture) fed to the parsers.
    pub tails: u64,
}

/// Parallel choices tracked individually per exchange.
pub const MAX_CHOICES: usize = 128;

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

/// The fields of a [`ConnEvent::Data`].
struct DataEv<'a> {
    key: ConnKey,
    dir: Direction,
    ts: u64,
    len: u64,
    payload: &'a [u8],
    arrival: Option<u64>,
}

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
    /// Kernel arrival stamp of the request now starting (see `read_arrival`).
    req_arrival_ns: Option<u64>,
    /// Arrival of the oldest byte of the read being parsed (reads only).
    read_arrival: Option<u64>,
    /// The connection's handshake and accept times, for its first exchange (new connections
    /// whose handshake the kernel saw).
    established_ns: Option<u64>,
    accepted_ns: Option<u64>,
    /// Exchange receiving the request body now.
    req_target: Option<u32>,
    req_body: Vec<u8>,
    resp_start_ns: u64,
    resp_target: RespTarget,
    /// How the current response body is read.
    resp_mode: BodyMode,
    sse: SseSplitter,
    lines: LineSplitter,
    /// [`BodyMode::MaybeLines`]: the first line, held until a second one confirms JSON lines.
    held_line: Vec<u8>,
    held_ts: Option<u64>,
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

/// How a response body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyMode {
    /// Buffered (bounded) and classified as one JSON body at its end.
    Buffer,
    /// Server-sent events.
    Sse,
    /// Newline-delimited JSON (NDJSON media types).
    Lines,
    /// Chunked `application/json`: buffered like [`BodyMode::Buffer`] and also split into
    /// lines; it becomes [`BodyMode::Lines`] when its first two lines each parse as JSON.
    MaybeLines,
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
    read_ns: u64,
    arrival_ns: Option<u64>,
    connected_ns: Option<u64>,
    accepted_ns: Option<u64>,
    request_end_ns: Option<u64>,
    request_bytes: u64,
    req_model: Option<String>,
    req_stream: Option<bool>,
    status: Option<u16>,
    response_start_ns: Option<u64>,
    /// The body is an event stream (SSE events or JSON lines).
    streamed: bool,
    /// The body is read as lines (NDJSON / JSON lines).
    line_body: bool,
    kind: StreamKind,
    /// Some line parsed as JSON of no known shape.
    unrecognised_json: bool,
    first_token_ns: Option<u64>,
    token_ns: Vec<u64>,
    tokens_per_event: Vec<u32>,
    /// Choice index of each `token_ns` entry.
    token_choice: Vec<u32>,
    /// Times of events no shape recognised: the content events of a stream of unknown shape.
    other_ns: Vec<u64>,
    choices: Vec<ChoiceState>,
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

/// One parallel choice of an exchange.
struct ChoiceState {
    index: u32,
    tokens: u64,
    events: u64,
    first_ns: Option<u64>,
    last_ns: Option<u64>,
    finish_reason: Option<&'static str>,
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
                established_ns,
                ..
            } => {
                if let Some(old) = self.conns.remove(&conn) {
                    // Same id seen again: whatever was pending there is lost.
                    self.flush(old, ts_ns, RequestError::Truncated, out);
                }
                self.insert(conn, ts_ns, peer, true, out);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.side.established_ns = established_ns.filter(|&e| e <= ts_ns);
                    c.side.accepted_ns = Some(ts_ns);
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
                arrival_ns,
            } => self.on_data(
                DataEv {
                    key: conn,
                    dir,
                    ts: ts_ns,
                    len,
                    payload,
                    arrival: arrival_ns,
                },
                out,
            ),
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

    fn on_data(&mut self, ev: DataEv<'_>, out: &mut Vec<RequestRecord>) {
        let DataEv {
            key,
            dir,
            ts,
            len,
            payload,
            arrival,
        } = ev;
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
        side.read_arrival = arrival;
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
                    req_arrival_ns: None,
                    read_arrival: None,
                    established_ns: None,
                    accepted_ns: None,
                    req_target: None,
                    req_body: Vec::new(),
                    resp_start_ns: ts,
                    resp_target: RespTarget::None,
                    resp_mode: BodyMode::Buffer,
                    sse: SseSplitter::new(self.cfg.max_event_bytes),
                    lines: LineSplitter::new(self.cfg.max_event_bytes),
                    held_line: Vec::new(),
                    held_ts: None,
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
            // A stream of a shape not (yet) recognised runs once it has events.
            if ex.first_token_ns.is_some() || !ex.other_ns.is_empty() {
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
                let partial = match side.resp_mode {
                    BodyMode::Sse => side.sse.finish(),
                    BodyMode::Lines => side.lines.has_partial(),
                    BodyMode::MaybeLines | BodyMode::Buffer => false,
                };
                (self.resp.message_bytes(), partial)
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
        side.reset_body(stats);
    }
}

impl Side {
    /// Forgets the current response body's parse state (keeping its counters).
    fn reset_body(&mut self, stats: &mut ReconstructStats) {
        stats.truncated_events += std::mem::take(&mut self.sse.truncated_events);
        stats.truncated_events += std::mem::take(&mut self.lines.truncated_lines);
        self.sse.reset();
        self.lines.reset();
        self.resp_body.clear();
        self.resp_tail.clear();
        self.held_line.clear();
        self.held_ts = None;
    }

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
                // A stamp later than the read (clocks of different CPUs) is not trusted.
                self.req_arrival_ns = self.read_arrival.filter(|&a| a <= ts);
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
                let mut ex = Exchange::new(
                    seq,
                    head.method,
                    head.path,
                    self.req_arrival_ns.unwrap_or(self.req_start_ns),
                );
                ex.read_ns = self.req_start_ns;
                ex.arrival_ns = self.req_arrival_ns;
                if seq == 0 {
                    if let Some(est) = self.established_ns {
                        ex.connected_ns = Some(est);
                        ex.accepted_ns = self.accepted_ns;
                    }
                }
                self.pending.push_back(ex);
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
                let mode = match head.content_type {
                    ContentType::EventStream => BodyMode::Sse,
                    ContentType::NdJson => BodyMode::Lines,
                    ContentType::Json if head.framing == Framing::Chunked => BodyMode::MaybeLines,
                    _ => BodyMode::Buffer,
                };
                ex.streamed = matches!(mode, BodyMode::Sse | BodyMode::Lines);
                ex.line_body = mode == BodyMode::Lines;
                let head_only = ex.method == "HEAD";
                self.resp_target = RespTarget::Front;
                self.resp_mode = mode;
                self.reset_body(stats);
                self.resp_body_cut = false;
                if head_only {
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
                let max_ev = cfg.max_token_events;
                match self.resp_mode {
                    BodyMode::Sse => self
                        .sse
                        .feed(b, &mut |e| apply_sse(ex, e, ts, max_ev, stats)),
                    BodyMode::Lines => self
                        .lines
                        .feed(b, &mut |l| apply_line(ex, l.data, ts, max_ev, stats)),
                    BodyMode::MaybeLines | BodyMode::Buffer => {
                        if self.resp_body_cut {
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
                        if self.resp_mode == BodyMode::MaybeLines {
                            let (held, held_ts) = (&mut self.held_line, &mut self.held_ts);
                            let mut mode = BodyMode::MaybeLines;
                            self.lines.feed(b, &mut |l| {
                                maybe_line(ex, &mut mode, held, held_ts, l, ts, max_ev, stats)
                            });
                            self.resp_mode = mode;
                        }
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
                let max_ev = cfg.max_token_events;
                match self.resp_mode {
                    BodyMode::Sse => self
                        .sse
                        .gap(n, &mut |e| apply_sse(ex, e, ts, max_ev, stats)),
                    BodyMode::Lines => self
                        .lines
                        .gap(n, &mut |l| apply_line(ex, l.data, ts, max_ev, stats)),
                    BodyMode::MaybeLines | BodyMode::Buffer => {
                        self.resp_body_cut = true;
                        // Only bytes after this gap are contiguous with the body's end.
                        self.resp_tail.clear();
                        // A gap before JSON lines are confirmed: read the body as one.
                        self.resp_mode = BodyMode::Buffer;
                    }
                }
            }
            HttpEvent::MessageEnd { bytes } => {
                if self.resp_target == RespTarget::Front {
                    if let Some(mut ex) = self.pending.pop_front() {
                        let max_ev = cfg.max_token_events;
                        if self.resp_mode == BodyMode::MaybeLines {
                            let (held, held_ts) = (&mut self.held_line, &mut self.held_ts);
                            let mut mode = BodyMode::MaybeLines;
                            self.lines.finish(&mut |l| {
                                maybe_line(&mut ex, &mut mode, held, held_ts, l, ts, max_ev, stats)
                            });
                            // Confirmed lines were read as a stream; else it is one body.
                            self.resp_mode = if mode == BodyMode::Lines {
                                BodyMode::Lines
                            } else {
                                BodyMode::Buffer
                            };
                            if self.resp_mode == BodyMode::Lines {
                                self.resp_body.clear();
                            }
                        }
                        let incomplete = match self.resp_mode {
                            BodyMode::Sse => self.sse.finish(),
                            BodyMode::Lines => {
                                self.lines.finish(&mut |l| {
                                    apply_line(&mut ex, l.data, ts, max_ev, stats)
                                });
                                false
                            }
                            BodyMode::Buffer | BodyMode::MaybeLines => {
                                if !self.resp_body.is_empty() {
                                    let info = openai::classify(&self.resp_body);
                                    apply_body(&mut ex, info);
                                    self.resp_body.clear();
                                }
                                // A body not captured whole ends with its last bytes: the
                                // fields a JSON answer puts last (`usage`, the stop reason)
                                // are read there.
                                if !self.resp_tail.is_empty() {
                                    let info = openai::classify(&self.resp_tail);
                                    apply_body(&mut ex, info);
                                    self.resp_tail.clear();
                                }
                                false
                            }
                        };
                        self.reset_body(stats);
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
                        self.reset_body(stats);
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
        mut ex: Exchange,
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
        let kind = match ex.kind {
            StreamKind::Unknown if ex.line_body && ex.unrecognised_json => StreamKind::JsonLines,
            k => k,
        };
        if ex.streamed && !kind.is_known() {
            // No shape recognised: every event is a content event of unknown token count, so
            // TTFT and the gaps still mean "first event" and "time between events".
            ex.first_token_ns = ex.other_ns.first().copied();
            ex.tokens_per_event = vec![1; ex.other_ns.len()];
            ex.token_choice.clear();
            ex.choices.clear();
            ex.token_ns = std::mem::take(&mut ex.other_ns);
        }
        let (cut, end_ns) = match cut {
            Some(RequestError::ClientDisconnect)
                if ex.streamed && ex.terminal && !incomplete_event =>
            {
                (None, ex.last_out_ns)
            }
            c => (c, end_ns),
        };
        // Only a shape with an end marker can be known to have been cut before it.
        let stream_cut =
            ex.streamed && (incomplete_event || (!ex.terminal && kind.has_terminal_marker()));
        let error = http_error
            .or(cut)
            .or(stream_error)
            .or(ex.malformed.then_some(RequestError::Malformed))
            .or(stream_cut.then_some(RequestError::Truncated));
        let (output_tokens, source) = match ex.usage_completion {
            Some(n) => (Some(n), Some(TokenCountSource::Usage)),
            None if ex.streamed && kind.is_known() => {
                (Some(ex.counted_tokens), Some(TokenCountSource::Counted))
            }
            None => (None, None),
        };
        // Per-choice figures only when the response has parallel choices.
        let parallel = ex.choices.len() > 1 || ex.choices.iter().any(|c| c.index != 0);
        let choices: Vec<ChoiceRecord> = if parallel {
            let mut v: Vec<ChoiceRecord> = ex
                .choices
                .iter()
                .map(|c| ChoiceRecord {
                    index: c.index,
                    output_tokens: c.tokens,
                    content_events: c.events,
                    first_token_ns: c.first_ns,
                    last_token_ns: c.last_ns,
                    finish_reason: c.finish_reason.map(str::to_owned),
                })
                .collect();
            v.sort_by_key(|c| c.index);
            v
        } else {
            ex.token_choice.clear();
            Vec::new()
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
            stream: ex.req_stream.unwrap_or(ex.streamed),
            start_ns: ex.start_ns,
            read_ns: ex.read_ns,
            arrival_ns: ex.arrival_ns,
            connected_ns: ex.connected_ns,
            accepted_ns: ex.accepted_ns,
            request_end_ns: ex.request_end_ns,
            response_start_ns: ex.response_start_ns,
            first_token_ns: ex.first_token_ns,
            end_ns: end_ns.max(ex.start_ns),
            token_ns: ex.token_ns,
            tokens_per_event: ex.tokens_per_event,
            token_choice: ex.token_choice,
            choices,
            stream_kind: kind,
            output_tokens,
            token_count_source: source,
            prompt_tokens: ex.usage_prompt,
            finish_reason: ex.finish_reason,
            request_bytes: ex.request_bytes,
            response_bytes,
            error,
            k8s: None,
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
            read_ns: start_ns,
            arrival_ns: None,
            connected_ns: None,
            accepted_ns: None,
            request_end_ns: None,
            request_bytes: 0,
            req_model: None,
            req_stream: None,
            status: None,
            response_start_ns: None,
            streamed: false,
            line_body: false,
            kind: StreamKind::Unknown,
            unrecognised_json: false,
            first_token_ns: None,
            token_ns: Vec::new(),
            tokens_per_event: Vec::new(),
            token_choice: Vec::new(),
            other_ns: Vec::new(),
            choices: Vec::new(),
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
    let mut info = openai::classify_event(e.name, e.data);
    if e.error_field {
        // `error:` events carry an error object whatever their JSON says.
        info.content = false;
        info.choices.clear();
        info.error = Some(info.error.flatten());
    }
    apply_event(ex, info, ts, max_events, stats);
}

/// Folds one JSON line of a line-delimited stream into its exchange.
fn apply_line(
    ex: &mut Exchange,
    data: &[u8],
    ts: u64,
    max_events: usize,
    stats: &mut ReconstructStats,
) {
    let info = openai::classify_event(b"", data);
    if !info.fallback && info.kind.is_none() {
        ex.unrecognised_json = true;
    }
    apply_event(ex, info, ts, max_events, stats);
}

/// One line of a chunked `application/json` body not yet known to be JSON lines: the first is
/// held; a second whole JSON value confirms the stream (`mode` becomes `Lines`, both lines are
/// applied at their own times); a line that is not whole JSON makes it one body (`Buffer`).
#[allow(clippy::too_many_arguments)]
fn maybe_line(
    ex: &mut Exchange,
    mode: &mut BodyMode,
    held: &mut Vec<u8>,
    held_ts: &mut Option<u64>,
    l: Line<'_>,
    ts: u64,
    max_events: usize,
    stats: &mut ReconstructStats,
) {
    match *mode {
        BodyMode::Lines => apply_line(ex, l.data, ts, max_events, stats),
        BodyMode::MaybeLines => {
            let whole = !l.truncated
                && matches!(l.data.first(), Some(b'{' | b'['))
                && serde_json::from_slice::<serde::de::IgnoredAny>(l.data).is_ok();
            if !whole {
                *mode = BodyMode::Buffer;
                held.clear();
                *held_ts = None;
            } else if let Some(first_ts) = held_ts.take() {
                *mode = BodyMode::Lines;
                ex.streamed = true;
                ex.line_body = true;
                apply_line(ex, held, first_ts, max_events, stats);
                held.clear();
                apply_line(ex, l.data, ts, max_events, stats);
            } else {
                held.clear();
                held.extend_from_slice(l.data);
                *held_ts = Some(ts);
            }
        }
        BodyMode::Buffer | BodyMode::Sse => {}
    }
}

/// Folds one stream event into its exchange.
fn apply_event(
    ex: &mut Exchange,
    mut info: EventInfo<'_>,
    ts: u64,
    max_events: usize,
    stats: &mut ReconstructStats,
) {
    if info.fallback {
        stats.fallback_events += 1;
    }
    // Until a shape is recognised, every event (but an end marker or an error) may be the
    // content event of a stream of unknown shape.
    let unknown = ex.kind == StreamKind::Unknown && info.kind.is_none();
    if unknown && !info.done && info.error.is_none() && ex.other_ns.len() < max_events {
        ex.other_ns.push(ts);
    }
    if info.choices.is_empty() {
        // One output sequence: the whole event is choice 0.
        if info.content {
            content_event(ex, 0, info.tokens, ts, max_events, stats);
        }
        if let Some(fr) = &info.finish_reason {
            if let Some(c) = choice_mut(ex, 0, stats) {
                c.finish_reason = Some(finish_vocabulary(fr));
            }
        }
        if info.terminal {
            ex.terminal = true;
        }
    } else {
        for c in &info.choices {
            if c.tokens > 0 {
                content_event(ex, c.index, c.tokens, ts, max_events, stats);
            }
            if let Some(st) = choice_mut(ex, c.index, stats) {
                if let Some(fr) = &c.finish_reason {
                    st.finish_reason = Some(finish_vocabulary(fr));
                }
            }
        }
        // The request finishes when every choice has.
        if info.done || ex.choices.iter().all(|c| c.finish_reason.is_some()) {
            ex.terminal = true;
        }
    }
    if info.done {
        ex.terminal = true;
    }
    // Decided above (per choice when the shape has them).
    info.terminal = false;
    apply_body(ex, info);
}

/// The state of choice `index`, created on first sight (`None` beyond [`MAX_CHOICES`]).
fn choice_mut<'e>(
    ex: &'e mut Exchange,
    index: u32,
    stats: &mut ReconstructStats,
) -> Option<&'e mut ChoiceState> {
    let pos = match ex.choices.iter().position(|c| c.index == index) {
        Some(p) => p,
        None if ex.choices.len() < MAX_CHOICES => {
            ex.choices.push(ChoiceState {
                index,
                tokens: 0,
                events: 0,
                first_ns: None,
                last_ns: None,
                finish_reason: None,
            });
            ex.choices.len() - 1
        }
        None => {
            stats.choices_overflow += 1;
            return None;
        }
    };
    Some(&mut ex.choices[pos])
}

/// A content event of choice `index` carrying `tokens` tokens (at least one).
fn content_event(
    ex: &mut Exchange,
    index: u32,
    tokens: u32,
    ts: u64,
    max_events: usize,
    stats: &mut ReconstructStats,
) {
    let tokens = tokens.max(1);
    ex.first_token_ns.get_or_insert(ts);
    ex.counted_tokens += u64::from(tokens);
    if let Some(c) = choice_mut(ex, index, stats) {
        c.tokens += u64::from(tokens);
        c.events += 1;
        c.first_ns.get_or_insert(ts);
        c.last_ns = Some(ts);
    }
    if ex.token_ns.len() < max_events {
        ex.token_ns.push(ts);
        ex.tokens_per_event.push(tokens);
        ex.token_choice.push(index);
    } else {
        stats.token_events_dropped += 1;
    }
}

/// The fields a stream event and a whole JSON body share.
fn apply_body(ex: &mut Exchange, info: EventInfo<'_>) {
    if let Some(k) = info.kind {
        if ex.kind == StreamKind::Unknown {
            ex.kind = k;
            ex.other_ns = Vec::new();
        }
    }
    if info.terminal {
        ex.terminal = true;
    }
    if let Some(fr) = info.finish_reason {
        ex.finish_reason = Some(finish_vocabulary(&fr).to_owned());
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

#[cfg(test)]
mod arrival_tests;
#[cfg(test)]
mod tests;
