//! Server-sent events splitter over a de-chunked response body (WHATWG HTML §9.2 event stream).
//!
//! `data` fields are kept (joined with `\n` across lines) and the `event` name is handed over with
//! them (API shapes such as the OpenAI Responses and Anthropic Messages streams name their
//! events); `id`, `retry` and comments are skipped. An event is dispatched at the blank line that ends it, inside the
//! `feed` call that delivered that byte, so the caller can stamp it with that syscall's time.
//!
//! Gaps (uncaptured bytes): an event whose tail is in a gap is dispatched at once with
//! `truncated: true` (servers write one event per syscall, so its end is almost surely inside the
//! gap). After a gap the stream must restart at a field line; otherwise everything up to the next
//! blank line is skipped.

use memchr::{memchr2, memchr3};

/// Default bound on one event's data.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;

/// One dispatched event.
#[derive(Debug, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The event's data (lines joined with `\n`), possibly cut short.
    pub data: &'a [u8],
    /// Part of the event was not seen (gap, or over the size bound).
    pub truncated: bool,
    /// The payload came in `error:` lines instead of `data:` (llama.cpp server reports stream
    /// errors that way).
    pub error_field: bool,
    /// The event's `event:` name (empty when it has none), at most [`MAX_EVENT_NAME_BYTES`].
    pub name: &'a [u8],
}

/// Bound on a kept `event:` name (longer names are cut; every name a known API uses fits).
pub const MAX_EVENT_NAME_BYTES: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Data,
    /// `error:` lines, kept like data.
    Error,
    /// `event:` line: the event's name.
    Event,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// At the start of a line.
    Start,
    /// Reading a field name.
    Name,
    /// Right after the colon (one optional space is skipped).
    ValueStart(Field),
    Value(Field),
    /// A comment, or a line skipped while resynchronising.
    Skip,
}

/// Incremental event splitter for one response body.
#[derive(Debug)]
pub struct SseSplitter {
    data: Vec<u8>,
    max_event_bytes: usize,
    name: [u8; 8],
    name_len: usize,
    line: Line,
    /// The previous byte was CR: a following LF belongs to the same line end.
    pending_cr: bool,
    has_data: bool,
    error_field: bool,
    event_name: [u8; MAX_EVENT_NAME_BYTES],
    event_name_len: usize,
    /// Some field line was seen in the current event.
    event_open: bool,
    overflowed: bool,
    after_gap: bool,
    /// Skipping up to the next blank line (lost sync after a gap).
    discard: bool,
    /// Events dispatched with `truncated` set.
    pub truncated_events: u64,
}

impl Default for SseSplitter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseSplitter {
    pub fn new(max_event_bytes: usize) -> Self {
        SseSplitter {
            data: Vec::new(),
            max_event_bytes,
            name: [0; 8],
            name_len: 0,
            line: Line::Start,
            pending_cr: false,
            has_data: false,
            error_field: false,
            event_name: [0; MAX_EVENT_NAME_BYTES],
            event_name_len: 0,
            event_open: false,
            overflowed: false,
            after_gap: false,
            discard: false,
            truncated_events: 0,
        }
    }

    /// Ready for a new body (keeps the buffer's allocation).
    pub fn reset(&mut self) {
        self.clear_event();
        self.line = Line::Start;
        self.pending_cr = false;
        self.after_gap = false;
        self.discard = false;
    }

    fn clear_event(&mut self) {
        self.data.clear();
        self.has_data = false;
        self.error_field = false;
        self.event_name_len = 0;
        self.event_open = false;
        self.overflowed = false;
    }

    fn dispatch(&mut self, emit: &mut impl FnMut(SseEvent<'_>), truncated: bool) {
        if self.has_data && !self.discard {
            let truncated = truncated || self.overflowed;
            if truncated {
                self.truncated_events += 1;
            }
            emit(SseEvent {
                data: &self.data,
                truncated,
                error_field: self.error_field,
                name: &self.event_name[..self.event_name_len],
            });
        }
        self.clear_event();
    }

    fn push_data(&mut self, bytes: &[u8]) {
        let room = self.max_event_bytes.saturating_sub(self.data.len());
        if bytes.len() > room {
            self.overflowed = true;
        }
        self.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn end_line(&mut self, eol: u8) {
        self.line = Line::Start;
        self.pending_cr = eol == b'\r';
    }

    /// Feeds captured body bytes.
    pub fn feed(&mut self, bytes: &[u8], emit: &mut impl FnMut(SseEvent<'_>)) {
        let mut i = 0;
        if self.after_gap && !bytes.is_empty() {
            self.after_gap = false;
            // Line ends right after a gap close the line/event already flushed.
            while i < bytes.len() && (bytes[i] == b'\r' || bytes[i] == b'\n') {
                i += 1;
            }
            if i < bytes.len() && !starts_like_field(&bytes[i..]) {
                self.discard = true;
            }
        }
        while i < bytes.len() {
            let b = bytes[i];
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.line {
                Line::Start => {
                    if b == b'\r' || b == b'\n' {
                        i += 1;
                        self.end_line(b);
                        if self.discard {
                            self.discard = false;
                            self.clear_event();
                        } else {
                            self.dispatch(emit, false);
                        }
                    } else if self.discard || b == b':' {
                        self.line = Line::Skip;
                        i += 1;
                    } else {
                        self.name_len = 0;
                        self.line = Line::Name;
                    }
                }
                Line::Name => {
                    let rest = &bytes[i..];
                    let j = memchr3(b':', b'\r', b'\n', rest).unwrap_or(rest.len());
                    for &c in &rest[..j] {
                        if self.name_len < self.name.len() {
                            self.name[self.name_len] = c;
                        }
                        self.name_len += 1;
                    }
                    i += j;
                    if j == rest.len() {
                        continue;
                    }
                    let field = match &self.name[..self.name_len.min(self.name.len())] {
                        b"data" if self.name_len == 4 => Field::Data,
                        b"error" if self.name_len == 5 => Field::Error,
                        b"event" if self.name_len == 5 => Field::Event,
                        _ => Field::Other,
                    };
                    self.event_open = true;
                    if field == Field::Event {
                        // The last `event:` line of an event names it.
                        self.event_name_len = 0;
                    } else if field != Field::Other {
                        self.error_field |= field == Field::Error;
                        self.start_data_line();
                    }
                    if rest[j] == b':' {
                        i += 1;
                        self.line = Line::ValueStart(field);
                    } else {
                        // A field name alone on its line: empty value; the EOL is handled below.
                        self.line = Line::Value(field);
                    }
                }
                Line::ValueStart(field) => {
                    if b == b' ' {
                        i += 1;
                    }
                    self.line = Line::Value(field);
                }
                Line::Value(field) => {
                    let rest = &bytes[i..];
                    match memchr2(b'\r', b'\n', rest) {
                        Some(j) => {
                            self.push_value(field, &rest[..j]);
                            i += j + 1;
                            self.end_line(rest[j]);
                        }
                        None => {
                            self.push_value(field, rest);
                            i = bytes.len();
                        }
                    }
                }
                Line::Skip => match memchr2(b'\r', b'\n', &bytes[i..]) {
                    Some(j) => {
                        let eol = bytes[i + j];
                        i += j + 1;
                        self.end_line(eol);
                    }
                    None => i = bytes.len(),
                },
            }
        }
    }

    fn push_value(&mut self, field: Field, bytes: &[u8]) {
        match field {
            Field::Data | Field::Error => self.push_data(bytes),
            Field::Event => {
                let room = MAX_EVENT_NAME_BYTES - self.event_name_len;
                let n = bytes.len().min(room);
                self.event_name[self.event_name_len..self.event_name_len + n]
                    .copy_from_slice(&bytes[..n]);
                self.event_name_len += n;
            }
            Field::Other => {}
        }
    }

    fn start_data_line(&mut self) {
        if self.has_data {
            self.push_data(b"\n");
        }
        self.has_data = true;
    }

    /// `n` body bytes were not captured.
    pub fn gap(&mut self, n: u64, emit: &mut impl FnMut(SseEvent<'_>)) {
        if n == 0 {
            return;
        }
        let mid_event = self.event_open || self.line != Line::Start;
        if mid_event && !self.discard {
            // Partial comment lines have no data and dispatch nothing.
            self.dispatch(emit, true);
        }
        self.clear_event();
        self.line = Line::Start;
        self.pending_cr = false;
        self.discard = false;
        self.after_gap = true;
    }

    /// The body ended: returns true when an event was left incomplete (the stream was cut).
    pub fn finish(&mut self) -> bool {
        let incomplete = !self.discard
            && (self.event_open
                || matches!(self.line, Line::Name | Line::Value(_) | Line::ValueStart(_)));
        self.reset();
        incomplete
    }
}

fn starts_like_field(s: &[u8]) -> bool {
    if s[0] == b':' {
        return true;
    }
    [&b"data"[..], b"event", b"id", b"retry", b"error"]
        .iter()
        .any(|name| {
            let k = s.len().min(name.len());
            s[..k] == name[..k]
                && (s.len() <= name.len() || matches!(s[name.len()], b':' | b'\r' | b'\n'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(parts: &[&[u8]]) -> Vec<(String, bool, usize)> {
        let mut sp = SseSplitter::default();
        let mut out = Vec::new();
        for (idx, p) in parts.iter().enumerate() {
            sp.feed(p, &mut |e| {
                out.push((
                    String::from_utf8_lossy(e.data).into_owned(),
                    e.truncated,
                    idx,
                ))
            });
        }
        out
    }

    #[test]
    fn splits_events_and_skips_comments() {
        let ev =
            collect(&[b": ping\r\n\r\ndata: a\n\ndata: b\r\n\r\nevent: x\ndata:c\rdata: d\r\r"]);
        assert_eq!(
            ev,
            vec![
                ("a".into(), false, 0),
                ("b".into(), false, 0),
                ("c\nd".into(), false, 0)
            ]
        );
    }

    #[test]
    fn every_split_position_gives_same_events_and_final_byte_time() {
        let stream: &[u8] =
            b"data: {\"x\":1}\r\n\r\n: keep-alive\n\ndata: two\ndata: lines\n\ndata: [DONE]\n\n";
        let whole = collect(&[stream]);
        assert_eq!(whole.len(), 3);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            let ev = collect(&[a, b]);
            let names: Vec<_> = ev.iter().map(|e| e.0.clone()).collect();
            assert_eq!(
                names,
                vec!["{\"x\":1}", "two\nlines", "[DONE]"],
                "cut at {cut}"
            );
            // An event belongs to the part holding the byte that ends it (for CR LF, the CR that
            // starts the blank line).
            let ends = [16usize, 54, 68];
            for (e, end) in ev.iter().zip(ends) {
                let expect = usize::from(cut < end);
                assert_eq!(e.2, expect, "cut {cut} event {:?}", e.0);
            }
        }
    }

    #[test]
    fn crlf_split_across_feeds_is_one_line_end() {
        let ev = collect(&[b"data: a\r", b"\n", b"\r", b"\ndata: b\r\n\r\n"]);
        assert_eq!(
            ev.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert_eq!(ev[0].2, 2);
    }

    #[test]
    fn gap_mid_event_dispatches_truncated_then_resyncs() {
        let mut sp = SseSplitter::default();
        let mut out = Vec::new();
        let mut emit = |e: SseEvent<'_>| out.push((e.data.to_vec(), e.truncated));
        sp.feed(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hel",
            &mut emit,
        );
        sp.gap(500, &mut emit);
        sp.feed(b"data: next\n\n", &mut emit);
        // After a gap, bytes that do not start a field are skipped up to the blank line.
        sp.gap(10, &mut emit);
        sp.feed(b"tail of something\n\ndata: ok\n\n", &mut emit);
        assert!(!sp.finish());
        assert_eq!(
            out,
            vec![
                (
                    b"{\"choices\":[{\"delta\":{\"content\":\"hel".to_vec(),
                    true
                ),
                (b"next".to_vec(), false),
                (b"ok".to_vec(), false)
            ]
        );
    }

    #[test]
    fn gap_after_complete_data_line_keeps_data() {
        let mut sp = SseSplitter::default();
        let mut out = Vec::new();
        let mut emit = |e: SseEvent<'_>| out.push((e.data.to_vec(), e.truncated));
        sp.feed(b"data: full\n", &mut emit);
        sp.gap(1, &mut emit);
        sp.feed(b"\ndata: x\n\n", &mut emit);
        assert_eq!(out, vec![(b"full".to_vec(), true), (b"x".to_vec(), false)]);
    }

    #[test]
    fn finish_reports_cut_event_and_bounds_size() {
        let mut sp = SseSplitter::new(8);
        let mut out = Vec::new();
        let mut emit = |e: SseEvent<'_>| out.push((e.data.to_vec(), e.truncated));
        sp.feed(b"data: 0123456789abc\n\ndata: part", &mut emit);
        assert_eq!(out, vec![(b"01234567".to_vec(), true)]);
        assert!(sp.finish());
        assert!(!sp.finish());
    }

    #[test]
    fn error_lines_are_kept_and_flagged() {
        let mut sp = SseSplitter::default();
        let mut out = Vec::new();
        sp.feed(b"error: {\"code\":500}\n\ndata: x\n\n", &mut |e| {
            out.push((e.data.to_vec(), e.error_field))
        });
        assert_eq!(
            out,
            vec![(b"{\"code\":500}".to_vec(), true), (b"x".to_vec(), false)]
        );
    }

    #[test]
    fn event_names_are_handed_over_and_bounded() {
        let mut sp = SseSplitter::default();
        let mut out = Vec::new();
        let long = format!("event: {}\ndata: x\n\n", "n".repeat(500));
        for part in [
            &b"event: response.output_text.delta\ndata: {\"a\":1}\n\n"[..],
            b"data: {}\n\n",
            b"event: ping\nevent: message_stop\r\ndata: {}\r\n\r\n",
            b"event:error\ndata: 1\n\n",
            long.as_bytes(),
        ] {
            // Byte at a time: the name survives being split anywhere.
            for b in part.chunks(1) {
                sp.feed(b, &mut |e| {
                    out.push(String::from_utf8_lossy(e.name).into_owned())
                });
            }
        }
        assert_eq!(
            out,
            vec![
                "response.output_text.delta".to_owned(),
                String::new(),
                "message_stop".into(),
                "error".into(),
                "n".repeat(MAX_EVENT_NAME_BYTES),
            ]
        );
    }

    #[test]
    fn event_without_data_is_not_dispatched() {
        assert!(collect(&[b"event: ping\n\nid: 3\n\nretry: 10\n\n"]).is_empty());
        assert_eq!(collect(&[b"data\n\n"]), vec![(String::new(), false, 0)]);
    }
}
