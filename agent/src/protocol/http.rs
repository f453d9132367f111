//! Incremental HTTP/1.1 message parser over captured syscall segments.
//!
//! One [`Parser`] per direction of a connection. It is fed one syscall at a time as
//! `(captured prefix, gap)`: `gap` bytes followed the captured ones but were not captured. The
//! parser reports what it recognises through a callback ([`HttpEvent`]); it never buffers body
//! bytes, only a header block (bounded) or a chunk-size line (bounded).
//!
//! Gaps inside a body of known length (Content-Length, chunk data) cost nothing. A gap that hides
//! framing (a header block, a chunk-size line) loses the message: it is reported as
//! [`HttpEvent::Malformed`] and the parser resynchronises at the next line that looks like a message
//! start. Syscall boundaries are treated as line starts, since servers write whole messages,
//! chunks or events per call.

use memchr::{memchr, memchr3};

/// Default bound on a header block.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// Chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 1024;
/// Trailer section after the last chunk (trailers are skipped, never stored).
const MAX_TRAILER_BYTES: u64 = 64 * 1024;
/// Largest chunk size accepted (15 hex digits), so sums never overflow.
const MAX_CHUNK_SIZE: u64 = (1 << 60) - 1;

const METHODS: &[&[u8]] = &[
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];

/// Which side of the exchange a parser reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Request,
    Response,
}

/// How the body of a message is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Response body ends when the server closes the connection.
    UntilClose,
}

/// The part of `Content-Type` that matters to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentType {
    Absent,
    EventStream,
    /// Newline-delimited JSON (`application/x-ndjson`, `application/jsonl`, ...): one event per
    /// line.
    NdJson,
    Json,
    Other,
}

/// Media types of newline-delimited JSON streams.
const NDJSON_TYPES: [&[u8]; 7] = [
    b"application/x-ndjson",
    b"application/ndjson",
    b"application/jsonl",
    b"application/x-jsonlines",
    b"application/jsonlines",
    b"application/json-lines",
    b"application/stream+json",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// Request target without query string or fragment.
    pub path: &'a str,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub framing: Framing,
    pub content_type: ContentType,
    pub connection_close: bool,
    pub head_bytes: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub minor_version: u8,
    /// Framing as the headers say it; the handler may override it (HEAD, upgrades).
    pub framing: Framing,
    pub content_type: ContentType,
    pub connection_close: bool,
    pub head_bytes: usize,
}

/// Why a message was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MalformedKind {
    /// The header block exceeded the configured bound.
    HeaderOverflow,
    /// The header block is not valid HTTP/1.x.
    BadHead,
    /// Uncaptured bytes hid part of the header block.
    GapInHead,
    /// Content-Length/Transfer-Encoding combination we cannot frame (e.g. conflicting lengths).
    BadFraming,
    /// Invalid chunk-size line or chunk terminator.
    BadChunk,
    /// Uncaptured bytes hid chunk framing and no chunk-size line followed.
    ChunkFramingLost,
    /// Trailer section too long.
    TrailerOverflow,
}

/// What the parser recognised. Every event belongs to the syscall being fed.
#[derive(Debug, PartialEq, Eq)]
pub enum HttpEvent<'a> {
    /// The first byte of a new message.
    MessageStart,
    Request(RequestHead<'a>),
    Response(ResponseHead),
    /// Captured body bytes (de-chunked).
    Body(&'a [u8]),
    /// Body bytes that exist but were not captured (or, after framing was lost, an upper bound).
    BodyGap(u64),
    /// The message ended; `bytes` counts it whole (head, framing, body, gaps).
    MessageEnd {
        bytes: u64,
    },
    /// The current message (if any) is lost; the parser now scans for the next message start.
    Malformed {
        kind: MalformedKind,
        bytes: u64,
    },
    /// Uncaptured bytes arrived where a message start was expected; scanning for one.
    LostSync {
        gap: u64,
    },
    /// Scanning found a message start (after `Malformed`/`LostSync`, or on an adopted connection).
    Resynced,
    /// Chunk framing lost in a gap was found again at the next syscall.
    ChunkResynced,
}

/// The handler's answer to a head event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The message has no body whatever its headers say (response to HEAD).
    NoBody,
    /// Stop parsing this direction (protocol upgrade, CONNECT).
    Opaque,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Expecting a message start right here.
    Start,
    /// Looking for something that looks like a message start.
    Resync,
    Head,
    Body {
        remaining: u64,
    },
    ChunkSize,
    ChunkData {
        remaining: u64,
    },
    /// After chunk data: CR LF (`got` of them seen).
    ChunkCrlf {
        got: u8,
    },
    /// A gap hid chunk framing; the next syscall should start with a chunk-size line.
    ChunkLost,
    Trailers {
        line_nonempty: bool,
        total: u64,
    },
    UntilClose,
    Opaque,
}

/// Incremental parser for one direction of a connection.
#[derive(Debug)]
pub struct Parser {
    role: Role,
    state: State,
    /// Partial header block or chunk-size line.
    buf: Vec<u8>,
    max_header_bytes: usize,
    msg_bytes: u64,
    in_message: bool,
    /// The bytes being fed continue a syscall after uncaptured ones ([`Parser::feed_tail`]):
    /// their start is no line start and no framing boundary.
    mid_syscall: bool,
}

enum HeadOutcome {
    Complete {
        len: usize,
        framing: Framing,
        opaque: bool,
    },
    Partial,
    Error(MalformedKind),
}

impl Parser {
    /// `synced`: the stream is known to start at a message boundary (connection seen from its
    /// accept); otherwise the parser first scans for a message start.
    pub fn new(role: Role, max_header_bytes: usize, synced: bool) -> Self {
        Parser {
            role,
            state: if synced { State::Start } else { State::Resync },
            buf: Vec::new(),
            max_header_bytes: max_header_bytes.max(64),
            msg_bytes: 0,
            in_message: false,
            mid_syscall: false,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// A message has started and not ended.
    pub fn in_message(&self) -> bool {
        self.in_message
    }

    /// Bytes of the current message consumed so far.
    pub fn message_bytes(&self) -> u64 {
        self.msg_bytes
    }

    /// The body runs until the connection closes.
    pub fn reading_until_close(&self) -> bool {
        self.state == State::UntilClose
    }

    /// Ignore everything from now on (the connection switched protocols).
    pub fn set_opaque(&mut self) {
        self.state = State::Opaque;
        self.in_message = false;
        self.buf = Vec::new();
    }

    /// The connection closed: a read-until-close body ends here (returns true after emitting
    /// `MessageEnd`). Any other message in progress is left to the caller to report as cut off.
    pub fn on_close(&mut self, f: &mut impl FnMut(HttpEvent<'_>) -> Flow) -> bool {
        if self.state == State::UntilClose {
            self.end_message(f);
            true
        } else {
            false
        }
    }

    /// Feeds the last bytes of the syscall fed just before, which was fed with a `gap`: they
    /// follow uncaptured bytes, so their first byte is neither a line start nor a place where
    /// lost chunk framing can be found again. Inside a body they are body bytes (a non-streaming
    /// response's `usage` is there); anywhere else they are scanned like any bytes.
    pub fn feed_tail(&mut self, payload: &[u8], f: &mut impl FnMut(HttpEvent<'_>) -> Flow) {
        self.mid_syscall = true;
        self.feed(payload, 0, f);
        self.mid_syscall = false;
    }

    /// Feeds one syscall: `payload` captured bytes followed by `gap` uncaptured ones.
    pub fn feed(&mut self, payload: &[u8], gap: u64, f: &mut impl FnMut(HttpEvent<'_>) -> Flow) {
        let mut rest = payload;
        while !rest.is_empty() {
            let offset = payload.len() - rest.len();
            // Syscall boundaries count as line starts.
            let line_start =
                (offset == 0 && !self.mid_syscall) || (offset > 0 && payload[offset - 1] == b'\n');
            rest = match self.state {
                State::Start => {
                    // Stray CR/LF between messages is allowed (RFC 9112 §2.2).
                    let skip = rest
                        .iter()
                        .take_while(|&&b| b == b'\r' || b == b'\n')
                        .count();
                    let rest = &rest[skip..];
                    if !rest.is_empty() {
                        self.begin_message(f);
                        self.state = State::Head;
                    }
                    rest
                }
                State::Resync => match find_message_start(self.role, rest, line_start) {
                    Some(i) => {
                        f(HttpEvent::Resynced);
                        self.begin_message(f);
                        self.state = State::Head;
                        &rest[i..]
                    }
                    None => &[],
                },
                State::Head => self.head(rest, f),
                State::Body { remaining } => {
                    let n = (rest.len() as u64).min(remaining) as usize;
                    f(HttpEvent::Body(&rest[..n]));
                    self.msg_bytes += n as u64;
                    if remaining == n as u64 {
                        self.end_message(f);
                    } else {
                        self.state = State::Body {
                            remaining: remaining - n as u64,
                        };
                    }
                    &rest[n..]
                }
                State::ChunkSize => self.chunk_size(rest, f),
                State::ChunkData { remaining } => {
                    let n = (rest.len() as u64).min(remaining) as usize;
                    f(HttpEvent::Body(&rest[..n]));
                    self.msg_bytes += n as u64;
                    self.state = if remaining == n as u64 {
                        State::ChunkCrlf { got: 0 }
                    } else {
                        State::ChunkData {
                            remaining: remaining - n as u64,
                        }
                    };
                    &rest[n..]
                }
                State::ChunkCrlf { got } => {
                    let b = rest[0];
                    self.msg_bytes += 1;
                    match (got, b) {
                        (0, b'\r') => self.state = State::ChunkCrlf { got: 1 },
                        (_, b'\n') => self.state = State::ChunkSize,
                        _ => self.malformed(MalformedKind::BadChunk, f),
                    }
                    &rest[1..]
                }
                State::ChunkLost if self.mid_syscall => {
                    // Framing was lost in the gap just before: these bytes are somewhere in the
                    // body (most likely chunk data), but where its chunks end is unknown.
                    f(HttpEvent::BodyGap(rest.len() as u64));
                    self.msg_bytes += rest.len() as u64;
                    &[]
                }
                State::ChunkLost => {
                    if offset == 0 {
                        if let Some((line_len, size)) = chunk_line_at_start(rest) {
                            f(HttpEvent::ChunkResynced);
                            self.msg_bytes += line_len as u64;
                            self.after_chunk_size(size);
                            &rest[line_len..]
                        } else {
                            self.malformed(MalformedKind::ChunkFramingLost, f);
                            rest
                        }
                    } else {
                        self.malformed(MalformedKind::ChunkFramingLost, f);
                        rest
                    }
                }
                State::Trailers {
                    line_nonempty,
                    total,
                } => self.trailers(rest, line_nonempty, total, f),
                State::UntilClose => {
                    f(HttpEvent::Body(rest));
                    self.msg_bytes += rest.len() as u64;
                    &[]
                }
                State::Opaque => &[],
            };
        }
        if gap > 0 {
            self.gap(gap, f);
        }
    }

    fn gap(&mut self, mut gap: u64, f: &mut impl FnMut(HttpEvent<'_>) -> Flow) {
        match self.state {
            State::Start => {
                f(HttpEvent::LostSync { gap });
                self.state = State::Resync;
            }
            State::Resync | State::Opaque => {}
            State::Head => {
                self.msg_bytes += gap;
                self.malformed(MalformedKind::GapInHead, f);
            }
            State::Body { remaining } => {
                let n = gap.min(remaining);
                f(HttpEvent::BodyGap(n));
                self.msg_bytes += n;
                if n == remaining {
                    self.end_message(f);
                    if gap > n {
                        f(HttpEvent::LostSync { gap: gap - n });
                        self.state = State::Resync;
                    }
                } else {
                    self.state = State::Body {
                        remaining: remaining - n,
                    };
                }
            }
            State::ChunkData { remaining } => {
                let n = gap.min(remaining);
                f(HttpEvent::BodyGap(n));
                self.msg_bytes += n;
                gap -= n;
                if n < remaining {
                    self.state = State::ChunkData {
                        remaining: remaining - n,
                    };
                } else {
                    self.chunk_crlf_gap(0, gap, f);
                }
            }
            State::ChunkCrlf { got } => self.chunk_crlf_gap(got, gap, f),
            State::ChunkSize | State::ChunkLost => {
                // The size line is cut or hidden: how much of the gap is body is unknown.
                self.buf.clear();
                self.msg_bytes += gap;
                f(HttpEvent::BodyGap(gap));
                self.state = State::ChunkLost;
            }
            State::Trailers { .. } => {
                // Trailers are optional and rare; assume the gap finished them.
                self.msg_bytes += gap;
                self.end_message(f);
                self.state = State::Resync;
            }
            State::UntilClose => {
                f(HttpEvent::BodyGap(gap));
                self.msg_bytes += gap;
            }
        }
    }

    /// A gap right after chunk data: the CR LF is taken as read; anything beyond hides framing.
    fn chunk_crlf_gap(&mut self, got: u8, gap: u64, f: &mut impl FnMut(HttpEvent<'_>) -> Flow) {
        let need = u64::from(2 - got.min(2));
        let c = gap.min(need);
        self.msg_bytes += c;
        if c < need {
            self.state = State::ChunkCrlf { got: got + c as u8 };
        } else if gap > c {
            self.msg_bytes += gap - c;
            f(HttpEvent::BodyGap(gap - c));
            self.state = State::ChunkLost;
        } else {
            self.state = State::ChunkSize;
        }
    }

    fn begin_message(&mut self, f: &mut impl FnMut(HttpEvent<'_>) -> Flow) {
        self.in_message = true;
        self.msg_bytes = 0;
        self.buf.clear();
        f(HttpEvent::MessageStart);
    }

    fn end_message(&mut self, f: &mut impl FnMut(HttpEvent<'_>) -> Flow) {
        let bytes = self.msg_bytes;
        self.in_message = false;
        self.msg_bytes = 0;
        self.state = State::Start;
        f(HttpEvent::MessageEnd { bytes });
    }

    fn malformed(&mut self, kind: MalformedKind, f: &mut impl FnMut(HttpEvent<'_>) -> Flow) {
        let bytes = self.msg_bytes;
        self.in_message = false;
        self.msg_bytes = 0;
        self.buf.clear();
        self.state = State::Resync;
        f(HttpEvent::Malformed { kind, bytes });
    }

    fn head<'a>(&mut self, rest: &'a [u8], f: &mut impl FnMut(HttpEvent<'_>) -> Flow) -> &'a [u8] {
        if self.buf.is_empty() {
            // Fast path: the whole head is in this syscall, parse it in place.
            match parse_head(self.role, rest, f) {
                HeadOutcome::Complete {
                    len,
                    framing,
                    opaque,
                } => {
                    self.msg_bytes += len as u64;
                    self.after_head(framing, opaque, f);
                    return &rest[len..];
                }
                HeadOutcome::Error(kind) => {
                    // Skip a byte so scanning cannot find this same start again.
                    self.msg_bytes += 1;
                    self.malformed(kind, f);
                    return &rest[1..];
                }
                HeadOutcome::Partial => {}
            }
        }
        let old = self.buf.len();
        let room = self.max_header_bytes.saturating_sub(old);
        let take = rest.len().min(room);
        self.buf.extend_from_slice(&rest[..take]);
        match parse_head(self.role, &self.buf, f) {
            HeadOutcome::Complete {
                len,
                framing,
                opaque,
            } => {
                let used = len.saturating_sub(old).min(take);
                self.msg_bytes += used as u64;
                self.buf.clear();
                self.after_head(framing, opaque, f);
                &rest[used..]
            }
            HeadOutcome::Partial if self.buf.len() < self.max_header_bytes => {
                self.msg_bytes += take as u64;
                &rest[take..]
            }
            HeadOutcome::Partial => {
                self.msg_bytes += take as u64;
                self.malformed(MalformedKind::HeaderOverflow, f);
                &rest[take.max(1)..]
            }
            HeadOutcome::Error(kind) => {
                self.msg_bytes += take as u64;
                self.malformed(kind, f);
                &rest[take.max(1)..]
            }
        }
    }

    fn after_head(
        &mut self,
        framing: Framing,
        opaque: bool,
        f: &mut impl FnMut(HttpEvent<'_>) -> Flow,
    ) {
        match framing {
            Framing::None | Framing::Length(0) => self.end_message(f),
            Framing::Length(n) => self.state = State::Body { remaining: n },
            Framing::Chunked => self.state = State::ChunkSize,
            Framing::UntilClose => self.state = State::UntilClose,
        }
        if opaque {
            self.set_opaque();
        }
    }

    fn chunk_size<'a>(
        &mut self,
        rest: &'a [u8],
        f: &mut impl FnMut(HttpEvent<'_>) -> Flow,
    ) -> &'a [u8] {
        let Some(nl) = memchr(b'\n', rest) else {
            if self.buf.len() + rest.len() > MAX_CHUNK_LINE {
                self.msg_bytes += rest.len() as u64;
                self.malformed(MalformedKind::BadChunk, f);
                return &[];
            }
            self.buf.extend_from_slice(rest);
            self.msg_bytes += rest.len() as u64;
            return &[];
        };
        let parsed = if self.buf.is_empty() {
            parse_chunk_line(&rest[..nl])
        } else if self.buf.len() + nl > MAX_CHUNK_LINE {
            None
        } else {
            self.buf.extend_from_slice(&rest[..nl]);
            let p = parse_chunk_line(&self.buf);
            self.buf.clear();
            p
        };
        self.msg_bytes += nl as u64 + 1;
        match parsed {
            Some(size) => self.after_chunk_size(size),
            None => self.malformed(MalformedKind::BadChunk, f),
        }
        &rest[nl + 1..]
    }

    fn after_chunk_size(&mut self, size: u64) {
        self.state = if size == 0 {
            State::Trailers {
                line_nonempty: false,
                total: 0,
            }
        } else {
            State::ChunkData { remaining: size }
        };
    }

    fn trailers<'a>(
        &mut self,
        rest: &'a [u8],
        mut line_nonempty: bool,
        mut total: u64,
        f: &mut impl FnMut(HttpEvent<'_>) -> Flow,
    ) -> &'a [u8] {
        let mut i = 0;
        while i < rest.len() {
            let b = rest[i];
            i += 1;
            total += 1;
            if b == b'\n' {
                if !line_nonempty {
                    self.msg_bytes += i as u64;
                    self.end_message(f);
                    return &rest[i..];
                }
                line_nonempty = false;
            } else if b != b'\r' {
                line_nonempty = true;
            }
        }
        self.msg_bytes += i as u64;
        if total > MAX_TRAILER_BYTES {
            self.malformed(MalformedKind::TrailerOverflow, f);
        } else {
            self.state = State::Trailers {
                line_nonempty,
                total,
            };
        }
        &[]
    }
}

/// Parses a header block; emits the head event on success.
fn parse_head(role: Role, data: &[u8], f: &mut impl FnMut(HttpEvent<'_>) -> Flow) -> HeadOutcome {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match role {
        Role::Request => {
            let mut req = httparse::Request::new(&mut headers);
            let len = match req.parse(data) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return HeadOutcome::Partial,
                Err(_) => return HeadOutcome::Error(MalformedKind::BadHead),
            };
            let info = match HeaderInfo::scan(req.headers) {
                Ok(i) => i,
                Err(k) => return HeadOutcome::Error(k),
            };
            let framing = if info.transfer_encoding {
                if !info.chunked {
                    // A request body we cannot delimit (RFC 9112 §6.3): the server answers 400.
                    return HeadOutcome::Error(MalformedKind::BadFraming);
                }
                Framing::Chunked
            } else {
                info.content_length.map_or(Framing::None, Framing::Length)
            };
            let method = req.method.unwrap_or("");
            let target = req.path.unwrap_or("");
            let path = target.split(['?', '#']).next().unwrap_or("");
            let minor_version = req.version.unwrap_or(1);
            let flow = f(HttpEvent::Request(RequestHead {
                method,
                path,
                minor_version,
                framing,
                content_type: info.content_type.unwrap_or(ContentType::Absent),
                connection_close: info.close(minor_version),
                head_bytes: len,
            }));
            apply_flow(len, framing, flow)
        }
        Role::Response => {
            let mut resp = httparse::Response::new(&mut headers);
            let len = match resp.parse(data) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return HeadOutcome::Partial,
                Err(_) => return HeadOutcome::Error(MalformedKind::BadHead),
            };
            let info = match HeaderInfo::scan(resp.headers) {
                Ok(i) => i,
                Err(k) => return HeadOutcome::Error(k),
            };
            let status = resp.code.unwrap_or(0);
            let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
                Framing::None
            } else if info.transfer_encoding {
                if info.chunked {
                    Framing::Chunked
                } else {
                    Framing::UntilClose
                }
            } else {
                info.content_length
                    .map_or(Framing::UntilClose, Framing::Length)
            };
            let minor_version = resp.version.unwrap_or(1);
            let flow = f(HttpEvent::Response(ResponseHead {
                status,
                minor_version,
                framing,
                content_type: info.content_type.unwrap_or(ContentType::Absent),
                connection_close: info.close(minor_version),
                head_bytes: len,
            }));
            apply_flow(len, framing, flow)
        }
    }
}

fn apply_flow(len: usize, framing: Framing, flow: Flow) -> HeadOutcome {
    match flow {
        Flow::Continue => HeadOutcome::Complete {
            len,
            framing,
            opaque: false,
        },
        Flow::NoBody => HeadOutcome::Complete {
            len,
            framing: Framing::None,
            opaque: false,
        },
        Flow::Opaque => HeadOutcome::Complete {
            len,
            framing: Framing::None,
            opaque: true,
        },
    }
}

#[derive(Default)]
struct HeaderInfo {
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    content_type: Option<ContentType>,
    connection: Option<bool>,
}

impl HeaderInfo {
    fn scan(headers: &[httparse::Header<'_>]) -> Result<HeaderInfo, MalformedKind> {
        let mut info = HeaderInfo::default();
        for h in headers {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                // A list of identical values is allowed (RFC 9110 §8.6); different ones are not.
                for v in h.value.split(|&b| b == b',') {
                    let n = parse_decimal(v.trim_ascii()).ok_or(MalformedKind::BadFraming)?;
                    if info.content_length.is_some_and(|c| c != n) {
                        return Err(MalformedKind::BadFraming);
                    }
                    info.content_length = Some(n);
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                info.transfer_encoding = true;
                // Chunked must be the final coding.
                let last = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .map(<[u8]>::trim_ascii)
                    .unwrap_or(b"");
                info.chunked = last.eq_ignore_ascii_case(b"chunked");
            } else if name.eq_ignore_ascii_case("content-type") {
                let v = h.value.trim_ascii();
                let essence = v.split(|&b| b == b';').next().unwrap_or(b"").trim_ascii();
                info.content_type = Some(if essence.eq_ignore_ascii_case(b"text/event-stream") {
                    ContentType::EventStream
                } else if NDJSON_TYPES.iter().any(|t| essence.eq_ignore_ascii_case(t)) {
                    ContentType::NdJson
                } else if essence.len() >= 4
                    && essence[essence.len() - 4..].eq_ignore_ascii_case(b"json")
                {
                    ContentType::Json
                } else {
                    ContentType::Other
                });
            } else if name.eq_ignore_ascii_case("connection") {
                for tok in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if tok.eq_ignore_ascii_case(b"close") {
                        info.connection = Some(true);
                    } else if tok.eq_ignore_ascii_case(b"keep-alive") && info.connection.is_none() {
                        info.connection = Some(false);
                    }
                }
            }
        }
        Ok(info)
    }

    fn close(&self, minor_version: u8) -> bool {
        self.connection.unwrap_or(minor_version == 0)
    }
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    Some(n)
}

/// `size [; ext...] [CR]` (the LF already stripped).
fn parse_chunk_line(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let mut size = 0u64;
    for &b in &line[..digits] {
        size = (size << 4) | u64::from((b as char).to_digit(16)?);
    }
    let tail = &line[digits..];
    let tail_trimmed = tail.trim_ascii();
    if !(tail_trimmed.is_empty() || tail_trimmed[0] == b';') {
        return None;
    }
    (size <= MAX_CHUNK_SIZE).then_some(size)
}

/// A complete chunk-size line at the start of `data`: (line length with LF, size).
fn chunk_line_at_start(data: &[u8]) -> Option<(usize, u64)> {
    let window = &data[..data.len().min(MAX_CHUNK_LINE)];
    let nl = memchr(b'\n', window)?;
    Some((nl + 1, parse_chunk_line(&data[..nl])?))
}

/// What the first bytes a client sent on a connection say about its protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstBytes {
    /// An HTTP/1.x request line (or the start of one whose end is not visible yet).
    Http,
    /// Too few bytes to tell.
    Undecided,
    /// A TLS handshake record (content type 22, version major 3).
    Tls,
    /// The HTTP/2 connection preface (`PRI * HTTP/2.0`, prior knowledge).
    H2,
    /// Anything else.
    Other,
}

/// The HTTP/2 connection preface's request line (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// Longest method token accepted at a connection's start.
const MAX_METHOD_LEN: usize = 24;

/// Judges the first bytes a client sent on a fresh connection (RFC 9112 §3: `method SP
/// request-target SP HTTP-version CRLF`, after optional empty lines). Methods are any token, not
/// only the common ones; when the whole request line is visible its version must be HTTP/1.0
/// or HTTP/1.1.
pub fn first_bytes(data: &[u8]) -> FirstBytes {
    let skip = data
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let s = &data[skip..];
    let Some(&b0) = s.first() else {
        return FirstBytes::Undecided;
    };
    if b0 == 0x16 {
        return match s.get(1) {
            None => FirstBytes::Undecided,
            Some(3) => FirstBytes::Tls,
            Some(_) => FirstBytes::Other,
        };
    }
    let n = s.len().min(H2_PREFACE.len());
    if s[..n] == H2_PREFACE[..n] {
        if n == H2_PREFACE.len() {
            return FirstBytes::H2;
        }
        // "P", "PR", "PRI": also the start of POST, PUT, PATCH or other methods.
        if n > 3 {
            return FirstBytes::Undecided;
        }
    }
    let method = s.iter().take_while(|&&b| is_tchar(b)).count();
    if method == s.len() {
        return if method <= MAX_METHOD_LEN {
            FirstBytes::Undecided
        } else {
            FirstBytes::Other
        };
    }
    if method == 0 || method > MAX_METHOD_LEN || s[method] != b' ' {
        return FirstBytes::Other;
    }
    let line = &s[method + 1..];
    if line.first() == Some(&b' ') {
        return FirstBytes::Other;
    }
    match memchr(b'\n', line) {
        None => FirstBytes::Http,
        Some(end) => {
            let line = line[..end].strip_suffix(b"\r").unwrap_or(&line[..end]);
            let ok = line.len() > 9
                && line[line.len() - 9] == b' '
                && line[line.len() - 8..line.len() - 1] == *b"HTTP/1."
                && matches!(line[line.len() - 1], b'0' | b'1');
            if ok {
                FirstBytes::Http
            } else {
                FirstBytes::Other
            }
        }
    }
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `data` starts with an HTTP/1.x status line (`HTTP/1.x NNN`).
pub fn looks_like_response_start(data: &[u8]) -> bool {
    looks_like_start(Role::Response, data)
}

/// Position of the first line in `data` that looks like the start of a message of `role`.
/// Offset 0 is a candidate only when it is a line start.
pub fn find_message_start(role: Role, data: &[u8], line_start: bool) -> Option<usize> {
    let mut pos = if line_start {
        0
    } else {
        memchr(b'\n', data)? + 1
    };
    while pos < data.len() {
        if looks_like_start(role, &data[pos..]) {
            return Some(pos);
        }
        pos += memchr(b'\n', &data[pos..])? + 1;
    }
    None
}

fn looks_like_start(role: Role, s: &[u8]) -> bool {
    match role {
        Role::Request => {
            let Some(m) = METHODS
                .iter()
                .find(|m| s.len() > m.len() && s.starts_with(m) && s[m.len()] == b' ')
            else {
                return false;
            };
            // When the whole request line is here, it must end with the version.
            match memchr3(b'\n', b'\r', 0, s) {
                Some(end) => {
                    let line = &s[m.len() + 1..end];
                    line.len() > 9
                        && line[line.len() - 9] == b' '
                        && line[line.len() - 8..line.len() - 1] == *b"HTTP/1."
                        && (line[line.len() - 1] == b'0' || line[line.len() - 1] == b'1')
                }
                None => s.len() > m.len() + 1 && s[m.len() + 1] != b' ',
            }
        }
        Role::Response => {
            s.len() >= 12
                && s.starts_with(b"HTTP/1.")
                && s[8] == b' '
                && s[9..12].iter().all(u8::is_ascii_digit)
        }
    }
}

#[cfg(test)]
mod tests;
