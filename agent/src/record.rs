//! The unit of output: one completed HTTP request/response exchange, with its token timeline.
//!
//! Times are kernel CLOCK_MONOTONIC nanoseconds (`*_ns`) as the probes report them; sinks convert
//! to Unix-epoch time with [`crate::clock::Clock`]. No prompt or completion text is ever stored:
//! only sizes, counts and metadata.

use std::net::SocketAddr;

pub use crate::protocol::shape::StreamKind;

/// Why an exchange did not complete normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestError {
    /// Response status 400–499.
    Http4xx,
    /// Response status 500–599.
    Http5xx,
    /// The client closed or reset the connection before the response ended.
    ClientDisconnect,
    /// The server closed the connection before the response ended.
    ServerClose,
    /// The response body ended (or the stream was cut) in the middle of an event, or a streaming
    /// response ended without its terminal marker.
    Truncated,
    /// The byte stream could not be parsed as HTTP/1.1 (or captured bytes were lost mid-message).
    Malformed,
    /// The traced process exited with the exchange in flight.
    ProcessExit,
}

impl RequestError {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestError::Http4xx => "http_4xx",
            RequestError::Http5xx => "http_5xx",
            RequestError::ClientDisconnect => "client_disconnect",
            RequestError::ServerClose => "server_close",
            RequestError::Truncated => "truncated",
            RequestError::Malformed => "malformed",
            RequestError::ProcessExit => "process_exit",
        }
    }
}

/// Where the output token count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenCountSource {
    /// `usage.completion_tokens` carried by the response.
    Usage,
    /// Counted from the content events (per-token logprobs where present, else one per event
    /// per choice).
    Counted,
}

/// One parallel choice (`n > 1`) of a streamed response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChoiceRecord {
    /// `choices[].index`.
    pub index: u32,
    /// Tokens counted from this choice's content events (the usage total covers all choices).
    pub output_tokens: u64,
    /// Content events of this choice (all of them, also beyond the kept times).
    pub content_events: u64,
    pub first_token_ns: Option<u64>,
    pub last_token_ns: Option<u64>,
    /// This choice's own stop (closed vocabulary, see [`crate::protocol::shape`]).
    pub finish_reason: Option<String>,
}

/// One completed exchange.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestRecord {
    pub pid: u32,
    /// Connection identity (kernel conn id), stable for the connection's lifetime.
    pub conn_id: u64,
    /// The client's address, when known.
    pub peer: Option<SocketAddr>,
    /// Sequence number of this exchange on its connection (0-based; >0 means keep-alive reuse).
    pub seq_on_conn: u32,
    pub method: String,
    /// Request path without the query string.
    pub path: String,
    /// Response status; `None` when no response status line was seen.
    pub status: Option<u16>,
    /// `model` from the request body (or, failing that, from the response events).
    pub model: Option<String>,
    /// `stream` flag from the request body; falls back to `Content-Type: text/event-stream`.
    pub stream: bool,
    /// The request's start: when its first byte reached the server's socket (`arrival_ns`) or,
    /// when the kernel could not stamp that, when the server read it (`read_ns`). TTFT and E2E
    /// count from here.
    pub start_ns: u64,
    /// When the server read the request's first byte.
    pub read_ns: u64,
    /// When the request's first byte reached the server's socket (kernel receive time), if seen.
    pub arrival_ns: Option<u64>,
    /// First exchange of a new connection whose handshake the kernel saw: when the handshake
    /// completed (the client's `connect()` returned, minus the network's half round trip).
    pub connected_ns: Option<u64>,
    /// Same connection: when the server accepted it.
    pub accepted_ns: Option<u64>,
    /// Time the last request byte was read.
    pub request_end_ns: Option<u64>,
    /// Time the response status line was written.
    pub response_start_ns: Option<u64>,
    /// Time of the first event carrying generated content.
    pub first_token_ns: Option<u64>,
    /// Time the response ended (last body byte written) or the exchange was cut off.
    pub end_ns: u64,
    /// Emission time of every content event, in order (the first equals `first_token_ns`), of
    /// every choice: with parallel choices, `token_choice` says which choice each belongs to.
    /// For a stream of unknown shape, the time of every event.
    pub token_ns: Vec<u64>,
    /// Tokens carried by each content event (same length as `token_ns`; 1 per event when the
    /// shape is unknown).
    pub tokens_per_event: Vec<u32>,
    /// Choice index of each `token_ns` entry when the response has parallel choices (`n > 1`);
    /// empty when every event belongs to choice 0.
    pub token_choice: Vec<u32>,
    /// Per-choice figures when the response has parallel choices, by index; empty otherwise.
    pub choices: Vec<ChoiceRecord>,
    /// The API shape the response body spoke.
    pub stream_kind: StreamKind,
    /// Output tokens, the total over choices (see `token_count_source`); `None` when neither
    /// usage nor a known shape gives them.
    pub output_tokens: Option<u64>,
    pub token_count_source: Option<TokenCountSource>,
    /// `usage.prompt_tokens`, when the response carries it.
    pub prompt_tokens: Option<u64>,
    /// Last `finish_reason` seen (`stop`, `length`, ...), a closed vocabulary, not content.
    pub finish_reason: Option<String>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub error: Option<RequestError>,
    /// The serving process's container and Kubernetes pod (`None` off Kubernetes, or for a
    /// process in no container); attached by the pipeline from [`crate::metadata`].
    pub k8s: Option<std::sync::Arc<crate::metadata::PodMetadata>>,
}

impl RequestRecord {
    /// Time to first token in nanoseconds.
    pub fn ttft_ns(&self) -> Option<u64> {
        self.first_token_ns.map(|t| t.saturating_sub(self.start_ns))
    }

    pub fn e2e_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }

    /// Time the request waited before the server read it (accept queue included for the first
    /// request of a new connection); `None` without a kernel arrival stamp.
    pub fn queue_ns(&self) -> Option<u64> {
        self.arrival_ns.map(|a| self.read_ns.saturating_sub(a))
    }

    /// Time the connection waited in the accept queue (first exchange of a new connection).
    pub fn accept_wait_ns(&self) -> Option<u64> {
        Some(self.accepted_ns?.saturating_sub(self.connected_ns?))
    }

    /// TTFT counted from the server's read (without the queueing before it).
    pub fn ttft_after_read_ns(&self) -> Option<u64> {
        self.first_token_ns.map(|t| t.saturating_sub(self.read_ns))
    }

    /// E2E counted from the server's read.
    pub fn e2e_after_read_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.read_ns)
    }

    /// Gaps between consecutive content events of the same choice (inter-token latency as
    /// benchmark clients measure it: one gap per event after each choice's first; a token of
    /// choice 1 is not a gap of choice 0).
    pub fn itl_ns(&self) -> impl Iterator<Item = u64> + '_ {
        self.gaps().map(|g| g.gap_ns())
    }

    /// Every inter-token gap, per choice, in the order of the events that end them.
    pub fn gaps(&self) -> Gaps<'_> {
        Gaps {
            token_ns: &self.token_ns,
            token_choice: &self.token_choice,
            next: 0,
            last: Vec::new(),
        }
    }

    /// The gaps of one choice.
    pub fn choice_itl_ns(&self, index: u32) -> impl Iterator<Item = u64> + '_ {
        self.gaps()
            .filter(move |g| self.token_choice.get(g.token_index).copied().unwrap_or(0) == index)
            .map(|g| g.gap_ns())
    }

    /// Time per output token after the first: (last content event − first) / (tokens − 1),
    /// as vLLM's benchmark defines TPOT. With parallel choices, the mean of each choice's TPOT
    /// (from its own counted tokens and event times).
    pub fn tpot_ns(&self) -> Option<u64> {
        if self.choices.len() > 1 {
            let per: Vec<u64> = self
                .choices
                .iter()
                .filter_map(|c| {
                    let (f, l) = (c.first_token_ns?, c.last_token_ns?);
                    (c.output_tokens > 1).then(|| l.saturating_sub(f) / (c.output_tokens - 1))
                })
                .collect();
            return (!per.is_empty()).then(|| per.iter().sum::<u64>() / per.len() as u64);
        }
        let first = self.first_token_ns?;
        let last = *self.token_ns.last()?;
        let tokens = self.output_tokens?;
        (tokens > 1).then(|| (last.saturating_sub(first)) / (tokens - 1))
    }

    pub fn is_streaming(&self) -> bool {
        self.stream
    }

    /// The median inter-token gap and the gaps longer than `factor ×` that median, longest
    /// first, at most `max` of them. One definition of a "slow token" for every consumer (GPU
    /// correlation, CPU attribution, metrics).
    pub fn slow_gaps(&self, factor: f64, max: usize) -> SlowGaps {
        let gaps: Vec<TokenGap> = self.gaps().collect();
        if gaps.is_empty() {
            return SlowGaps::default();
        }
        let mut sorted: Vec<u64> = gaps.iter().map(TokenGap::gap_ns).collect();
        sorted.sort_unstable();
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2
        };
        let threshold = factor * median as f64;
        let mut slow: Vec<TokenGap> = gaps
            .iter()
            .copied()
            .filter(|g| g.gap_ns() as f64 > threshold)
            .collect();
        slow.sort_by_key(|g| (std::cmp::Reverse(g.gap_ns()), g.token_index));
        slow.truncate(max);
        SlowGaps {
            median_ns: Some(median),
            all: gaps,
            slow,
        }
    }
}

/// Iterator over [`RequestRecord::gaps`].
pub struct Gaps<'a> {
    token_ns: &'a [u64],
    token_choice: &'a [u32],
    next: usize,
    /// Last event time per choice seen so far.
    last: Vec<(u32, u64)>,
}

impl Iterator for Gaps<'_> {
    type Item = TokenGap;

    fn next(&mut self) -> Option<TokenGap> {
        while self.next < self.token_ns.len() {
            let i = self.next;
            self.next += 1;
            let choice = self.token_choice.get(i).copied().unwrap_or(0);
            let t = self.token_ns[i];
            match self.last.iter_mut().find(|(c, _)| *c == choice) {
                Some(slot) => {
                    let start = slot.1;
                    slot.1 = t;
                    return Some(TokenGap {
                        token_index: i,
                        start_ns: start,
                        end_ns: t.max(start),
                    });
                }
                None => self.last.push((choice, t)),
            }
        }
        None
    }
}

/// The gap before content event `token_index` (the gap between that event and the previous
/// event of the same choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenGap {
    pub token_index: usize,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl TokenGap {
    pub fn gap_ns(&self) -> u64 {
        self.end_ns - self.start_ns
    }
}

/// Result of [`RequestRecord::slow_gaps`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlowGaps {
    pub median_ns: Option<u64>,
    /// Every gap, in order.
    pub all: Vec<TokenGap>,
    /// The slow ones, longest first.
    pub slow: Vec<TokenGap>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> RequestRecord {
        RequestRecord {
            pid: 1,
            conn_id: 1,
            peer: None,
            seq_on_conn: 0,
            method: "POST".into(),
            path: "/v1/completions".into(),
            status: Some(200),
            model: None,
            stream: true,
            start_ns: 1_000,
            read_ns: 1_000,
            arrival_ns: None,
            connected_ns: None,
            accepted_ns: None,
            request_end_ns: Some(1_100),
            response_start_ns: Some(1_500),
            first_token_ns: Some(2_000),
            end_ns: 5_000,
            token_ns: vec![2_000, 3_000, 4_500],
            tokens_per_event: vec![1, 1, 2],
            output_tokens: Some(4),
            token_count_source: Some(TokenCountSource::Counted),
            prompt_tokens: None,
            finish_reason: None,
            request_bytes: 10,
            response_bytes: 20,
            error: None,
            ..Default::default()
        }
    }

    #[test]
    fn derived_latencies() {
        let r = rec();
        assert_eq!(r.ttft_ns(), Some(1_000));
        assert_eq!(r.e2e_ns(), 4_000);
        assert_eq!(r.itl_ns().collect::<Vec<_>>(), vec![1_000, 1_500]);
        assert_eq!(r.tpot_ns(), Some(2_500 / 3));
    }

    #[test]
    fn slow_gaps_are_relative_to_the_median() {
        let mut r = rec();
        r.token_ns = vec![0, 10, 20, 30, 130, 140, 200];
        let g = r.slow_gaps(3.0, 5);
        assert_eq!(g.median_ns, Some(10));
        assert_eq!(g.all.len(), 6);
        let slow: Vec<(usize, u64)> = g.slow.iter().map(|g| (g.token_index, g.gap_ns())).collect();
        assert_eq!(slow, vec![(4, 100), (6, 60)]);
        assert_eq!(r.slow_gaps(3.0, 1).slow.len(), 1);
        r.token_ns = vec![5];
        assert_eq!(r.slow_gaps(3.0, 5), SlowGaps::default());
    }

    #[test]
    fn parallel_choices_have_their_own_gaps() {
        let mut r = rec();
        // Two choices interleaved: 0 at 0, 10, 30; 1 at 2, 22.
        r.token_ns = vec![0, 2, 10, 22, 30];
        r.tokens_per_event = vec![1; 5];
        r.token_choice = vec![0, 1, 0, 1, 0];
        let gaps: Vec<(usize, u64)> = r.gaps().map(|g| (g.token_index, g.gap_ns())).collect();
        assert_eq!(gaps, vec![(2, 10), (3, 20), (4, 20)]);
        assert_eq!(r.choice_itl_ns(0).collect::<Vec<_>>(), vec![10, 20]);
        assert_eq!(r.choice_itl_ns(1).collect::<Vec<_>>(), vec![20]);
        r.choices = vec![
            ChoiceRecord {
                index: 0,
                output_tokens: 3,
                content_events: 3,
                first_token_ns: Some(0),
                last_token_ns: Some(30),
                finish_reason: None,
            },
            ChoiceRecord {
                index: 1,
                output_tokens: 2,
                content_events: 2,
                first_token_ns: Some(2),
                last_token_ns: Some(22),
                finish_reason: None,
            },
        ];
        assert_eq!(r.tpot_ns(), Some((15 + 20) / 2));
        let g = r.slow_gaps(1.2, 5);
        assert_eq!(g.median_ns, Some(20));
        assert!(g.slow.is_empty());
    }
}
