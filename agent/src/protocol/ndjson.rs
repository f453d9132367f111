//! Newline-delimited JSON splitter over a de-chunked response body (Ollama's
//! `application/x-ndjson` streams, JSON-lines streams).
//!
//! A line is dispatched at its `\n`, inside the `feed` call that delivered that byte, so the
//! caller can stamp it with that syscall's time; lines split across syscalls are joined and
//! several lines in one syscall are dispatched one by one. A trailing `\r` and surrounding
//! whitespace are trimmed; blank lines are skipped. Memory is bounded: a line longer than the
//! bound keeps only its first `max_line_bytes` and is dispatched with `truncated` set.
//!
//! Gaps (uncaptured bytes): a line whose tail is in a gap is dispatched at once with
//! `truncated: true` (servers write one line per syscall). After a gap, bytes up to the next
//! `\n` are skipped unless the next captured byte starts a JSON value (`{` or `[`).

use memchr::memchr;

/// Default bound on one line.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;

/// One dispatched line.
#[derive(Debug, PartialEq, Eq)]
pub struct Line<'a> {
    /// The line without its line end and surrounding whitespace, possibly cut short.
    pub data: &'a [u8],
    /// Part of the line was not seen (gap, or over the size bound).
    pub truncated: bool,
}

/// Incremental line splitter for one response body.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max_line_bytes: usize,
    overflowed: bool,
    /// Skipping up to the next `\n` (lost sync after a gap).
    discard: bool,
    after_gap: bool,
    /// Lines dispatched with `truncated` set.
    pub truncated_lines: u64,
}

impl Default for LineSplitter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE_BYTES)
    }
}

impl LineSplitter {
    pub fn new(max_line_bytes: usize) -> Self {
        LineSplitter {
            buf: Vec::new(),
            max_line_bytes,
            overflowed: false,
            discard: false,
            after_gap: false,
            truncated_lines: 0,
        }
    }

    /// Ready for a new body (keeps the buffer's allocation).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.overflowed = false;
        self.discard = false;
        self.after_gap = false;
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.discard {
            return;
        }
        let room = self.max_line_bytes.saturating_sub(self.buf.len());
        if bytes.len() > room {
            self.overflowed = true;
        }
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn dispatch(&mut self, emit: &mut impl FnMut(Line<'_>), truncated: bool) {
        let data = self.buf.trim_ascii();
        if !data.is_empty() && !self.discard {
            let truncated = truncated || self.overflowed;
            if truncated {
                self.truncated_lines += 1;
            }
            emit(Line { data, truncated });
        }
        self.buf.clear();
        self.overflowed = false;
        self.discard = false;
    }

    /// Feeds captured body bytes.
    pub fn feed(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(Line<'_>)) {
        if self.after_gap {
            let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
            if let Some(i) = start {
                self.after_gap = false;
                self.discard = !matches!(bytes[i], b'{' | b'[');
            }
        }
        while let Some(j) = memchr(b'\n', bytes) {
            self.push(&bytes[..j]);
            self.dispatch(emit, false);
            bytes = &bytes[j + 1..];
        }
        self.push(bytes);
    }

    /// A line has begun and not ended (the body was cut inside it).
    pub fn has_partial(&self) -> bool {
        !self.discard && !self.buf.trim_ascii().is_empty()
    }

    /// `n` body bytes were not captured.
    pub fn gap(&mut self, n: u64, emit: &mut impl FnMut(Line<'_>)) {
        if n == 0 {
            return;
        }
        if !self.buf.trim_ascii().is_empty() {
            self.dispatch(emit, true);
        }
        self.buf.clear();
        self.overflowed = false;
        self.discard = false;
        self.after_gap = true;
    }

    /// The body ended: a last line without its `\n` is dispatched (JSON-lines writers may omit
    /// the final newline; whether it is whole is for the JSON parse to say).
    pub fn finish(&mut self, emit: &mut impl FnMut(Line<'_>)) {
        self.dispatch(emit, false);
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(parts: &[&[u8]]) -> Vec<(String, bool, usize)> {
        let mut sp = LineSplitter::default();
        let mut out = Vec::new();
        for (idx, p) in parts.iter().enumerate() {
            sp.feed(p, &mut |l| {
                out.push((
                    String::from_utf8_lossy(l.data).into_owned(),
                    l.truncated,
                    idx,
                ))
            });
        }
        sp.finish(&mut |l| {
            out.push((
                String::from_utf8_lossy(l.data).into_owned(),
                l.truncated,
                parts.len(),
            ))
        });
        out
    }

    #[test]
    fn every_split_position_gives_same_lines_and_final_byte_time() {
        let stream: &[u8] = b"{\"a\":1}\n\r\n{\"b\":\"x\\ny\"}\r\n  \n{\"done\":true}\n";
        let ends = [7usize, 23, 40];
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            let got = collect(&[a, b]);
            let lines: Vec<_> = got.iter().map(|l| l.0.as_str()).collect();
            assert_eq!(
                lines,
                vec!["{\"a\":1}", "{\"b\":\"x\\ny\"}", "{\"done\":true}"],
                "cut {cut}"
            );
            for (l, end) in got.iter().zip(ends) {
                assert_eq!(l.2, usize::from(cut <= end), "cut {cut} line {:?}", l.0);
                assert!(!l.1);
            }
        }
    }

    #[test]
    fn coalesced_lines_and_byte_at_a_time() {
        let stream: &[u8] = b"{\"i\":0}\n{\"i\":1}\n{\"i\":2}\n";
        assert_eq!(collect(&[stream]).len(), 3);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let got = collect(&bytes);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].2, stream.len() - 1);
    }

    #[test]
    fn huge_line_is_bounded_and_flagged() {
        let mut sp = LineSplitter::new(16);
        let mut out = Vec::new();
        let long = vec![b'x'; 100_000];
        sp.feed(&long, &mut |l| out.push((l.data.len(), l.truncated)));
        sp.feed(&long, &mut |l| out.push((l.data.len(), l.truncated)));
        assert!(sp.buf.capacity() < 1024, "memory bounded");
        sp.feed(b"\n{}\n", &mut |l| out.push((l.data.len(), l.truncated)));
        assert_eq!(out, vec![(16, true), (2, false)]);
        assert_eq!(sp.truncated_lines, 1);
    }

    #[test]
    fn gap_mid_line_dispatches_truncated_then_resyncs() {
        let mut sp = LineSplitter::default();
        let mut out = Vec::new();
        let mut emit = |l: Line<'_>| out.push((l.data.to_vec(), l.truncated));
        sp.feed(b"{\"response\":\"hel", &mut emit);
        sp.gap(300, &mut emit);
        // The tail of the cut line: skipped up to its newline.
        sp.feed(b"lo\",\"done\":false}\n{\"done\":true}\n", &mut emit);
        sp.gap(10, &mut emit);
        // A syscall that starts a fresh object is read at once.
        sp.feed(b"{\"x\":1}\n", &mut emit);
        assert_eq!(
            out,
            vec![
                (b"{\"response\":\"hel".to_vec(), true),
                (b"{\"done\":true}".to_vec(), false),
                (b"{\"x\":1}".to_vec(), false),
            ]
        );
    }

    #[test]
    fn invalid_utf8_and_missing_final_newline() {
        let got = collect(&[b"\xff\xfe{\"a\":\x80}\n", b"{\"last\":1}"]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], ("{\"last\":1}".into(), false, 2));
    }
}
