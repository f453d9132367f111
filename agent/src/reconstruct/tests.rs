use super::*;
use proptest::prelude::*;

const KEY: ConnKey = ConnKey {
    pid: 4242,
    conn_id: 7,
};

/// Drives a Reconstructor like the probes would: one event per syscall, payload cut at `cap`.
struct Sim {
    r: Reconstructor,
    out: Vec<RequestRecord>,
    cap: usize,
}

impl Sim {
    fn new() -> Self {
        Sim {
            r: Reconstructor::new(ReconstructConfig::default()),
            out: Vec::new(),
            cap: 1024,
        }
    }
    fn ev(&mut self, ev: ConnEvent<'_>) {
        self.r.on_event(&ev, &mut self.out);
    }
    fn open(&mut self, ts: u64) {
        self.ev(ConnEvent::Open {
            conn: KEY,
            fd: 9,
            ts_ns: ts,
            peer: Some("127.0.0.1:5555".parse().unwrap()),
            established_ns: None,
        });
    }
    fn data(&mut self, dir: Direction, ts: u64, bytes: &[u8]) {
        let payload = &bytes[..bytes.len().min(self.cap)];
        self.ev(ConnEvent::Data {
            conn: KEY,
            dir,
            ts_ns: ts,
            len: bytes.len() as u64,
            payload,
            arrival_ns: None,
        });
    }
    fn read(&mut self, ts: u64, bytes: &[u8]) {
        self.data(Direction::In, ts, bytes);
    }
    fn write(&mut self, ts: u64, bytes: &[u8]) {
        self.data(Direction::Out, ts, bytes);
    }
    fn close(&mut self, ts: u64) {
        self.ev(ConnEvent::Close {
            conn: KEY,
            ts_ns: ts,
        });
    }
    fn one(&mut self) -> RequestRecord {
        assert_eq!(self.out.len(), 1, "{:#?}", self.out);
        self.out.pop().unwrap()
    }
}

/// The kernel's capture rules (agent-ebpf `capture_payload`), to drive the reconstruction the
/// way the probes do: reads in the head window (opened at accept and by every write, closed
/// after `HEAD_CAPTURE` bytes) are captured up to what is left of it, other syscalls up to `cap`,
/// and writes longer than that also send their last `min(cap, TAIL_CAPTURE)` bytes.
struct Kernel {
    head: bool,
    head_read: usize,
}

impl Kernel {
    fn new() -> Self {
        Kernel {
            head: true,
            head_read: 0,
        }
    }

    fn read(&mut self, sim: &mut Sim, ts: u64, bytes: &[u8]) {
        let mut limit = sim.cap;
        if self.head {
            limit = limit.max(infertap_common::HEAD_CAPTURE - self.head_read);
            self.head_read += bytes.len();
            if self.head_read >= infertap_common::HEAD_CAPTURE {
                self.head = false;
                self.head_read = 0;
            }
        }
        let n = bytes.len().min(limit);
        sim.ev(ConnEvent::Data {
            conn: KEY,
            dir: Direction::In,
            ts_ns: ts,
            len: bytes.len() as u64,
            payload: &bytes[..n],
            arrival_ns: None,
        });
    }

    fn write(&mut self, sim: &mut Sim, ts: u64, bytes: &[u8]) {
        self.head = true;
        self.head_read = 0;
        let n = bytes.len().min(sim.cap);
        let tail = (bytes.len() - n).min(sim.cap.min(infertap_common::TAIL_CAPTURE));
        sim.ev(ConnEvent::Data {
            conn: KEY,
            dir: Direction::Out,
            ts_ns: ts,
            len: (bytes.len() - tail) as u64,
            payload: &bytes[..n],
            arrival_ns: None,
        });
        if tail > 0 {
            sim.ev(ConnEvent::DataTail {
                conn: KEY,
                dir: Direction::Out,
                ts_ns: ts,
                payload: &bytes[bytes.len() - tail..],
            });
        }
    }
}

/// A request head of about `size` bytes (a long bearer token, as gateways send) and its body.
fn post_with_token(path: &str, body: &str, size: usize) -> Vec<u8> {
    let base = post(path, body).len();
    let token = "t".repeat(size.saturating_sub(base + "Authorization: Bearer \r\n".len()));
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept: application/json\r\nContent-Type: application/json\r\nUser-Agent: OpenAI/Python 1.51.0\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept: application/json\r\nContent-Type: application/json\r\nUser-Agent: OpenAI/Python 1.51.0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const UVICORN_SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ndate: Mon, 23 Nov 2026 00:00:00 GMT\r\nserver: uvicorn\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n";

fn vllm_chunk(content: Option<&str>, finish: Option<&str>) -> String {
    let delta = match content {
        Some(c) => format!(r#"{{"content":"{c}"}}"#),
        None => r#"{"role":"assistant","content":""}"#.to_owned(),
    };
    let fr = finish.map_or("null".to_owned(), |f| format!("\"{f}\""));
    format!(
        "data: {{\"id\":\"chatcmpl-9f\",\"object\":\"chat.completion.chunk\",\"created\":1763856000,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{fr}}}]}}\n\n"
    )
}

/// vLLM OpenAI server (uvicorn + h11): one chunk per SSE event, usage chunk, `[DONE]`.
fn vllm_stream(sim: &mut Sim, t0: u64) {
    let body = r#"{"messages":[{"role":"user","content":"Hi"}],"model":"llama-8b","max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#;
    sim.read(t0, &post("/v1/chat/completions", body));
    sim.write(t0 + 100, UVICORN_SSE_HEAD);
    sim.write(t0 + 200, &chunk(vllm_chunk(None, None).as_bytes()));
    sim.write(t0 + 300, &chunk(vllm_chunk(Some("Hello"), None).as_bytes()));
    sim.write(
        t0 + 400,
        &chunk(vllm_chunk(Some(" there"), None).as_bytes()),
    );
    sim.write(
        t0 + 500,
        &chunk(vllm_chunk(Some("!"), Some("length")).as_bytes()),
    );
    sim.write(t0 + 600, &chunk(br#"data: {"id":"chatcmpl-9f","object":"chat.completion.chunk","created":1763856000,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[],"usage":{"prompt_tokens":11,"total_tokens":14,"completion_tokens":3}}

"#));
    sim.write(t0 + 700, &chunk(b"data: [DONE]\n\n"));
    sim.write(t0 + 800, b"0\r\n\r\n");
}

#[test]
fn vllm_streaming_chat() {
    let mut sim = Sim::new();
    sim.open(1_000);
    vllm_stream(&mut sim, 10_000);
    let r = sim.one();
    assert_eq!((r.pid, r.conn_id, r.seq_on_conn), (4242, 7, 0));
    assert_eq!(r.peer, Some("127.0.0.1:5555".parse().unwrap()));
    assert_eq!(
        (r.method.as_str(), r.path.as_str(), r.status),
        ("POST", "/v1/chat/completions", Some(200))
    );
    assert_eq!(r.model.as_deref(), Some("llama-8b"));
    assert!(r.stream);
    assert_eq!(r.start_ns, 10_000);
    assert_eq!(r.request_end_ns, Some(10_000));
    assert_eq!(r.response_start_ns, Some(10_100));
    assert_eq!(r.first_token_ns, Some(10_300));
    assert_eq!(r.token_ns, vec![10_300, 10_400, 10_500]);
    assert_eq!(r.tokens_per_event, vec![1, 1, 1]);
    assert_eq!(r.end_ns, 10_800);
    assert_eq!(
        (r.output_tokens, r.token_count_source),
        (Some(3), Some(TokenCountSource::Usage))
    );
    assert_eq!(r.prompt_tokens, Some(11));
    assert_eq!(r.finish_reason.as_deref(), Some("length"));
    assert_eq!(r.error, None);
    assert!(r.request_bytes > 0 && r.response_bytes > 0);
    assert_eq!(r.ttft_ns(), Some(300));
    assert_eq!(sim.r.in_flight(), InFlight::default());
    sim.close(20_000);
    assert!(sim.out.is_empty());
    assert_eq!(sim.r.stats().connections_open, 0);
}

/// llama-cpp-python: sse-starlette framing (CRLF separators, `: ping` comments), json.dumps
/// spacing, no usage in the stream.
#[test]
fn llama_cpp_python_stream_counts_tokens() {
    let mut sim = Sim::new();
    sim.open(0);
    let body = r#"{"prompt": "The capital of France is", "max_tokens": 4, "stream": true}"#;
    sim.read(100, &post("/v1/completions", body));
    sim.write(
        200,
        b"HTTP/1.1 200 OK\r\ndate: x\r\nserver: uvicorn\r\ncontent-type: text/event-stream; charset=utf-8\r\nx-request-id: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    let ev = |text: &str, fin: &str| {
        format!("data: {{\"id\": \"cmpl-1\", \"object\": \"text_completion\", \"created\": 1, \"model\": \"/models/smollm2.gguf\", \"choices\": [{{\"text\": \"{text}\", \"index\": 0, \"logprobs\": null, \"finish_reason\": {fin}}}]}}\r\n\r\n")
    };
    sim.write(300, &chunk(ev(" Paris", "null").as_bytes()));
    sim.write(350, &chunk(b": ping - 2026-11-23 00:00:00.000000\r\n\r\n"));
    sim.write(400, &chunk(ev(".", "null").as_bytes()));
    sim.write(500, &chunk(ev(" It", "null").as_bytes()));
    sim.write(600, &chunk(ev("", "\"length\"").as_bytes()));
    sim.write(700, &chunk(b"data: [DONE]\r\n\r\n"));
    sim.write(701, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.token_ns, vec![300, 400, 500]);
    assert_eq!(
        (r.output_tokens, r.token_count_source),
        (Some(3), Some(TokenCountSource::Counted))
    );
    // No model in the request body: taken from the events.
    assert_eq!(r.model.as_deref(), Some("/models/smollm2.gguf"));
    assert!(r.stream);
    assert_eq!(r.finish_reason.as_deref(), Some("length"));
    assert_eq!((r.end_ns, r.error), (701, None));
}

/// TGI native `/generate_stream` twice on one keep-alive connection.
#[test]
fn tgi_keep_alive() {
    let mut sim = Sim::new();
    sim.open(0);
    for (i, t) in [(0u32, 1_000u64), (1, 5_000)] {
        sim.read(
            t,
            &post(
                "/generate_stream",
                r#"{"inputs":"Hello","parameters":{"max_new_tokens":2}}"#,
            ),
        );
        sim.write(t + 10, b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nx-compute-type: gpu+optimized\r\ntransfer-encoding: chunked\r\ndate: x\r\n\r\n");
        sim.write(t + 20, &chunk(br#"data:{"index":1,"token":{"id":22557,"text":" world","logprob":-1.5,"special":false},"generated_text":null,"details":null}

"#));
        sim.write(t + 30, &chunk(br#"data:{"index":2,"token":{"id":2,"text":"</s>","logprob":-0.2,"special":true},"generated_text":" world","details":{"finish_reason":"eos_token","generated_tokens":2,"seed":null}}

"#));
        sim.write(t + 31, b"0\r\n\r\n");
        let r = sim.one();
        assert_eq!(r.seq_on_conn, i);
        assert_eq!(r.start_ns, t);
        assert_eq!(r.token_ns, vec![t + 20]);
        assert_eq!(
            (r.output_tokens, r.token_count_source),
            (Some(2), Some(TokenCountSource::Usage))
        );
        // TGI's `eos_token` in the closed vocabulary.
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
        assert_eq!(r.stream_kind, StreamKind::Tgi);
        assert_eq!(r.error, None);
    }
}

#[test]
fn non_streaming_uses_usage() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        10,
        &post(
            "/v1/completions?api-version=1",
            r#"{"model":"m","prompt":"x","max_tokens":5}"#,
        ),
    );
    let body = br#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"abcde","logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":1,"total_tokens":6,"completion_tokens":5}}"#;
    sim.write(
        90,
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    sim.write(100, body);
    let r = sim.one();
    assert_eq!(r.path, "/v1/completions");
    assert!(!r.stream);
    assert_eq!((r.first_token_ns, r.end_ns), (None, 100));
    assert!(r.token_ns.is_empty());
    assert_eq!(
        (r.output_tokens, r.token_count_source, r.prompt_tokens),
        (Some(5), Some(TokenCountSource::Usage), Some(1))
    );
    assert_eq!(r.finish_reason.as_deref(), Some("length"));
    assert_eq!(r.error, None);
}

#[test]
fn every_syscall_split_gives_same_record() {
    let mut reference = Sim::new();
    reference.open(0);
    vllm_stream(&mut reference, 0);
    let want = reference.one();
    // Rebuild the byte streams and re-split them at every position (all at one time per
    // direction, so records compare equal).
    let mut sim = Sim::new();
    sim.cap = usize::MAX;
    let mut inb = Vec::new();
    let mut outb = Vec::new();
    {
        let body = r#"{"messages":[{"role":"user","content":"Hi"}],"model":"llama-8b","max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#;
        inb.extend(post("/v1/chat/completions", body));
        outb.extend_from_slice(UVICORN_SSE_HEAD);
        for c in [
            vllm_chunk(None, None),
            vllm_chunk(Some("Hello"), None),
            vllm_chunk(Some(" there"), None),
            vllm_chunk(Some("!"), Some("length")),
        ] {
            outb.extend(chunk(c.as_bytes()));
        }
        outb.extend(chunk(br#"data: {"id":"chatcmpl-9f","object":"chat.completion.chunk","created":1763856000,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[],"usage":{"prompt_tokens":11,"total_tokens":14,"completion_tokens":3}}

"#));
        outb.extend(chunk(b"data: [DONE]\n\n"));
        outb.extend_from_slice(b"0\r\n\r\n");
    }
    let normalize = |mut r: RequestRecord| {
        r.token_ns.iter_mut().for_each(|t| *t = 0);
        r.first_token_ns = r.first_token_ns.map(|_| 0);
        r.start_ns = 0;
        r.read_ns = 0;
        r.request_end_ns = None;
        r.response_start_ns = None;
        r.end_ns = 0;
        r
    };
    let want = normalize(want);
    for cut in 0..=outb.len() {
        sim.open(0);
        let icut = cut % (inb.len() + 1);
        sim.read(1, &inb[..icut]);
        sim.read(1, &inb[icut..]);
        sim.write(2, &outb[..cut]);
        sim.write(2, &outb[cut..]);
        let r = normalize(sim.one());
        assert_eq!(r, want, "cut {cut}");
        sim.close(3);
    }
}

/// Events larger than the capture limit: JSON cut, SSE terminators and chunk CRLFs in the gap.
#[test]
fn capture_limit_cuts_events_but_counts_them() {
    let mut sim = Sim::new();
    sim.cap = 256;
    sim.open(0);
    sim.read(
        10,
        &post(
            "/v1/chat/completions",
            r#"{"model":"m","stream":true,"messages":[]}"#,
        ),
    );
    sim.write(20, UVICORN_SSE_HEAD);
    let lp = r#"{"token":"x","logprob":-0.25,"bytes":[120],"top_logprobs":[]}"#;
    for i in 0..5u64 {
        let ev = format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"x\"}},\"logprobs\":{{\"content\":[{lp},{lp},{lp},{lp},{lp}]}},\"finish_reason\":{}}}]}}\n\n",
            if i == 4 { "\"stop\"" } else { "null" }
        );
        assert!(ev.len() > 256);
        sim.write(100 + i, &chunk(ev.as_bytes()));
    }
    sim.write(200, &chunk(br#"data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":25}}

"#));
    sim.write(201, &chunk(b"data: [DONE]\n\n"));
    sim.write(202, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.token_ns, vec![100, 101, 102, 103, 104]);
    assert_eq!(r.output_tokens, Some(25));
    assert_eq!(r.error, None, "{r:#?}");
    assert_eq!(sim.r.stats().fallback_events, 5);
    assert!(sim.r.stats().gaps >= 5);
}

#[test]
fn client_disconnect_mid_stream() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        10,
        &post("/v1/chat/completions", r#"{"model":"m","stream":true}"#),
    );
    sim.write(20, UVICORN_SSE_HEAD);
    sim.write(30, &chunk(vllm_chunk(Some("a"), None).as_bytes()));
    assert_eq!(
        sim.r.in_flight(),
        InFlight {
            running: 1,
            waiting: 0
        }
    );
    let inf: Vec<_> = sim.r.in_flight_requests().collect();
    assert_eq!(
        inf,
        vec![InFlightRequest {
            conn: KEY,
            seq_on_conn: 0,
            start_ns: 10,
            first_token_ns: Some(30),
            tokens: 1
        }]
    );
    // The client's EOF alone may be a half-close: the response goes on.
    sim.ev(ConnEvent::PeerClosed {
        conn: KEY,
        ts_ns: 40,
    });
    assert!(sim.out.is_empty(), "{:#?}", sim.out);
    assert_eq!(sim.r.in_flight().running, 1);
    sim.write(50, &chunk(vllm_chunk(Some("b"), None).as_bytes()));
    // The server gives up (uvicorn cancels on EOF) and closes: the client's leaving cut it.
    sim.close(60);
    let r = sim.one();
    assert_eq!(
        (r.error, r.end_ns, r.output_tokens),
        (Some(RequestError::ClientDisconnect), 60, Some(2))
    );
    assert!(r.response_bytes > 0);
}

#[test]
fn half_closed_client_gets_a_complete_response() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        10,
        &post("/v1/chat/completions", r#"{"model":"m","stream":true}"#),
    );
    // shutdown(SHUT_WR) right after the request: the server's next read returns 0.
    sim.ev(ConnEvent::PeerClosed {
        conn: KEY,
        ts_ns: 12,
    });
    sim.write(20, UVICORN_SSE_HEAD);
    sim.write(30, &chunk(vllm_chunk(Some("a"), None).as_bytes()));
    sim.write(40, &chunk(vllm_chunk(Some("b"), Some("stop")).as_bytes()));
    sim.write(50, &chunk(b"data: [DONE]\n\n"));
    sim.write(51, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.error, None, "{r:#?}");
    assert_eq!((r.end_ns, r.output_tokens), (51, Some(2)));
    assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    // Then the server closes the connection: nothing else to report.
    sim.close(60);
    assert!(sim.out.is_empty());

    // A non-streaming answer after a half-close, with Content-Length, completes too.
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(10, &post("/v1/completions", r#"{"model":"m"}"#));
    sim.ev(ConnEvent::PeerClosed {
        conn: KEY,
        ts_ns: 11,
    });
    let body = br#"{"choices":[{"text":"hi","finish_reason":"length"}],"usage":{"prompt_tokens":2,"completion_tokens":4}}"#;
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    resp.extend_from_slice(body);
    sim.write(30, &resp);
    let r = sim.one();
    assert_eq!((r.error, r.output_tokens), (None, Some(4)));
    // A half-closed client whose response the server abandons (closes mid-body) is a
    // disconnect; a server that closes mid-body on its own is a server close.
    for (peer_closed, want) in [
        (true, RequestError::ClientDisconnect),
        (false, RequestError::ServerClose),
    ] {
        let mut sim = Sim::new();
        sim.open(0);
        sim.read(10, &post("/v1/completions", r#"{"model":"m"}"#));
        if peer_closed {
            sim.ev(ConnEvent::PeerClosed {
                conn: KEY,
                ts_ns: 11,
            });
        }
        sim.write(30, &resp[..resp.len() - 10]);
        sim.close(40);
        assert_eq!(sim.one().error, Some(want));
    }
}

#[test]
fn server_close_and_unanswered_requests() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        10,
        &post("/v1/completions", r#"{"model":"m","stream":true}"#),
    );
    assert_eq!(
        sim.r.in_flight(),
        InFlight {
            running: 0,
            waiting: 1
        }
    );
    sim.close(20);
    let r = sim.one();
    assert_eq!(
        (r.status, r.error, r.end_ns),
        (None, Some(RequestError::ServerClose), 20)
    );

    sim.open(100);
    sim.read(
        110,
        &post("/v1/completions", r#"{"model":"m","stream":true}"#),
    );
    sim.write(120, UVICORN_SSE_HEAD);
    sim.write(130, &chunk(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n"));
    sim.close(140);
    assert_eq!(sim.one().error, Some(RequestError::ServerClose));
}

#[test]
fn stream_without_terminal_marker_is_truncated() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        10,
        &post("/v1/completions", r#"{"model":"m","stream":true}"#),
    );
    sim.write(20, UVICORN_SSE_HEAD);
    sim.write(
        30,
        &chunk(b"data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":null}]}\n\n"),
    );
    sim.write(40, b"0\r\n\r\n");
    assert_eq!(sim.one().error, Some(RequestError::Truncated));
    // Cut in the middle of an event.
    sim.read(
        50,
        &post("/v1/completions", r#"{"model":"m","stream":true}"#),
    );
    sim.write(60, UVICORN_SSE_HEAD);
    sim.write(70, &chunk(b"data: [DONE]\n\ndata: {\"choi"));
    sim.write(80, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!((r.seq_on_conn, r.error), (1, Some(RequestError::Truncated)));
}

#[test]
fn http_errors() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        10,
        &post("/v1/chat/completions", r#"{"model":"nope","stream":true}"#),
    );
    let body = br#"{"object":"error","message":"The model `nope` does not exist.","type":"NotFoundError","param":null,"code":404}"#;
    sim.write(20, format!("HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes());
    sim.write(21, body);
    let r = sim.one();
    assert_eq!(
        (r.status, r.error, r.stream),
        (Some(404), Some(RequestError::Http4xx), true)
    );
    // Error event inside a 200 stream (vLLM reports engine errors this way).
    sim.read(
        30,
        &post("/v1/chat/completions", r#"{"model":"m","stream":true}"#),
    );
    sim.write(40, UVICORN_SSE_HEAD);
    sim.write(50, &chunk(br#"data: {"error": {"object": "error", "message": "boom", "type": "InternalServerError", "param": null, "code": 500}}

"#));
    sim.write(51, &chunk(b"data: [DONE]\n\n"));
    sim.write(52, b"0\r\n\r\n");
    assert_eq!(sim.one().error, Some(RequestError::Http5xx));
}

#[test]
fn expect_100_continue() {
    let mut sim = Sim::new();
    sim.open(0);
    let body = r#"{"model":"m","prompt":"x"}"#;
    sim.read(
        10,
        format!(
            "POST /v1/completions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    sim.write(20, b"HTTP/1.1 100 Continue\r\n\r\n");
    sim.read(30, body.as_bytes());
    sim.write(40, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
    let r = sim.one();
    assert_eq!(
        (r.status, r.start_ns, r.request_end_ns, r.response_start_ns),
        (Some(200), 10, Some(30), Some(40))
    );
    assert_eq!(r.model.as_deref(), Some("m"));
}

#[test]
fn http10_read_until_close() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(10, b"GET /v1/models HTTP/1.0\r\n\r\n");
    sim.write(
        20,
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"data\":",
    );
    sim.write(30, b"[]}");
    assert!(sim.out.is_empty());
    sim.close(40);
    let r = sim.one();
    assert_eq!(
        (r.method.as_str(), r.status, r.end_ns, r.error),
        ("GET", Some(200), 40, None)
    );
}

#[test]
fn pipelined_requests_pair_fifo() {
    let mut sim = Sim::new();
    sim.open(0);
    let two = [&post("/a", "{}")[..], b"GET /b HTTP/1.1\r\n\r\n"].concat();
    sim.read(10, &two);
    sim.write(20, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nAHTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(sim.out.len(), 2);
    assert_eq!(
        (
            sim.out[0].path.as_str(),
            sim.out[0].status,
            sim.out[0].seq_on_conn
        ),
        ("/a", Some(200), 0)
    );
    assert_eq!(
        (
            sim.out[1].path.as_str(),
            sim.out[1].error,
            sim.out[1].seq_on_conn
        ),
        ("/b", Some(RequestError::Http5xx), 1)
    );
}

#[test]
fn adopted_connection_resyncs() {
    let mut sim = Sim::new();
    // No Open: the agent attached while a stream was running.
    sim.write(5, &chunk(vllm_chunk(Some("x"), None).as_bytes()));
    sim.write(6, b"0\r\n\r\n");
    assert!(sim.out.is_empty());
    vllm_stream(&mut sim, 100);
    let r = sim.one();
    assert_eq!((r.error, r.output_tokens, r.peer), (None, Some(3), None));
    assert_eq!(sim.r.stats().connections_adopted, 1);
}

#[test]
fn process_exit_idle_expiry_and_eviction() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(10, &post("/v1/completions", "{}"));
    sim.r.on_process_exit(KEY.pid, 50, &mut sim.out);
    assert_eq!(sim.one().error, Some(RequestError::ProcessExit));

    sim.open(100);
    sim.read(110, &post("/v1/completions", "{}"));
    sim.r
        .expire_idle(110 + sim.r.config().idle_timeout_ns, &mut sim.out);
    assert!(sim.out.is_empty());
    sim.r
        .expire_idle(111 + sim.r.config().idle_timeout_ns, &mut sim.out);
    assert_eq!(sim.one().error, Some(RequestError::Truncated));
    assert_eq!(sim.r.stats().connections_open, 0);

    let mut r = Reconstructor::new(ReconstructConfig {
        max_connections: 32,
        ..Default::default()
    });
    let mut out = Vec::new();
    for i in 0..100u64 {
        let conn = ConnKey { pid: 1, conn_id: i };
        r.on_event(
            &ConnEvent::Open {
                conn,
                fd: 3,
                ts_ns: i,
                peer: None,
                established_ns: None,
            },
            &mut out,
        );
        let req = post("/x", "{}");
        r.on_event(
            &ConnEvent::Data {
                conn,
                dir: Direction::In,
                ts_ns: i,
                len: req.len() as u64,
                payload: &req,
                arrival_ns: None,
            },
            &mut out,
        );
        assert!(r.stats().connections_open <= 32);
    }
    assert_eq!(out.len() as u64, r.stats().connections_evicted);
    assert!(out
        .iter()
        .all(|rec| rec.error == Some(RequestError::Truncated)));
    assert_eq!(r.in_flight().waiting + out.len() as u64, 100);
}

#[test]
fn malformed_response_is_reported() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(10, &post("/v1/completions", "{}"));
    sim.write(
        20,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n",
    );
    let r = sim.one();
    assert_eq!(r.error, Some(RequestError::Malformed));
    assert_eq!(sim.r.stats().malformed, 1);
    // Garbage requests yield no record, only a count.
    sim.read(30, b"\x16\x03\x01\x00\xa5\x01\x00\x00");
    sim.close(40);
    assert!(sim.out.is_empty());
    assert_eq!(sim.r.stats().malformed, 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_events_never_panic(
        evs in prop::collection::vec(
            (0u8..6, prop::collection::vec(any::<u8>(), 0..120), 0u64..400),
            0..40,
        ),
    ) {
        let mut r = Reconstructor::new(ReconstructConfig { max_connections: 4, max_pending_per_conn: 4, ..Default::default() });
        let mut out = Vec::new();
        for (i, (kind, bytes, extra)) in evs.iter().enumerate() {
            let conn = ConnKey { pid: 1, conn_id: u64::from(kind % 3) };
            let ts = i as u64;
            let ev = match kind {
                0 | 1 => ConnEvent::Data { conn, dir: Direction::In, ts_ns: ts, len: bytes.len() as u64 + extra, payload: bytes, arrival_ns: None },
                2 | 3 => ConnEvent::Data { conn, dir: Direction::Out, ts_ns: ts, len: bytes.len() as u64 + extra % 3, payload: bytes, arrival_ns: None },
                4 => ConnEvent::Close { conn, ts_ns: ts },
                _ => ConnEvent::Open { conn, fd: 1, ts_ns: ts, peer: None, established_ns: None },
            };
            r.on_event(&ev, &mut out);
            prop_assert!(r.stats().connections_open <= 4);
        }
        r.on_process_exit(1, 1_000, &mut out);
        prop_assert_eq!(r.in_flight(), InFlight::default());
        prop_assert_eq!(out.len() as u64, r.stats().records);
    }

    #[test]
    fn arbitrary_splits_of_exchange_give_same_record(cuts in prop::collection::vec(0usize..2000, 0..10)) {
        let inb = post("/v1/chat/completions", r#"{"model":"m","stream":true}"#);
        let mut outb = UVICORN_SSE_HEAD.to_vec();
        for c in [vllm_chunk(None, None), vllm_chunk(Some("a"), None), vllm_chunk(Some("b"), Some("stop"))] {
            outb.extend(chunk(c.as_bytes()));
        }
        outb.extend(chunk(b"data: [DONE]\n\n"));
        outb.extend_from_slice(b"0\r\n\r\n");
        let feed = |cuts: &[usize], inb: &[u8], outb: &[u8]| {
            let mut sim = Sim::new();
            sim.cap = usize::MAX;
            sim.open(0);
            let c = cuts.first().map_or(0, |c| c % (inb.len() + 1));
            sim.read(1, &inb[..c]);
            sim.read(1, &inb[c..]);
            let mut cs: Vec<usize> = cuts.iter().map(|c| c % (outb.len() + 1)).collect();
            cs.sort_unstable();
            let mut prev = 0;
            for c in cs.into_iter().chain([outb.len()]) {
                sim.write(2, &outb[prev..c]);
                prev = c;
            }
            sim.one()
        };
        let want = feed(&[], &inb, &outb);
        prop_assert_eq!(want.output_tokens, Some(2));
        prop_assert_eq!(feed(&cuts, &inb, &outb), want);
    }
}

#[test]
fn request_cut_by_capture_limit_falls_back_to_response() {
    let mut sim = Sim::new();
    sim.open(0);
    // openai-python sends messages first: with a long prompt, model and stream are not captured.
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}],"model":"llama-8b","stream":true}}"#,
        "x".repeat(4000)
    );
    sim.read(10, &post("/v1/chat/completions", &body));
    sim.write(20, UVICORN_SSE_HEAD);
    sim.write(30, &chunk(vllm_chunk(Some("a"), Some("stop")).as_bytes()));
    sim.write(40, &chunk(b"data: [DONE]\n\n"));
    sim.write(50, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.model.as_deref(), Some("meta-llama/Llama-3.1-8B-Instruct"));
    assert!(r.stream);
    assert_eq!(r.request_end_ns, Some(10));
    assert_eq!(
        r.request_bytes,
        post("/v1/chat/completions", &body).len() as u64
    );
    assert_eq!((r.error, r.output_tokens), (None, Some(1)));
}

#[test]
fn head_request_and_upgrade() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(10, b"HEAD /health HTTP/1.1\r\n\r\n");
    sim.write(20, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n");
    let r = sim.one();
    assert_eq!((r.method.as_str(), r.end_ns, r.error), ("HEAD", 20, None));
    sim.read(
        30,
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    sim.write(
        40,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    let r = sim.one();
    assert_eq!((r.status, r.error), (Some(101), None));
    // The switched connection is untraced; frames already on their way produce nothing.
    assert_eq!(
        sim.r.take_untraced(),
        vec![Untrace {
            conn: KEY,
            fd: Some(9),
            kind: UntracedKind::Upgraded
        }]
    );
    sim.read(50, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58");
    sim.write(60, b"HTTP/1.1 200 OK\r\n\r\n");
    sim.close(70);
    assert!(sim.out.is_empty());
    assert_eq!(sim.r.stats().malformed, 0);
    assert_eq!(sim.r.stats().events_after_untrace, 3);
}

/// Throughput of the hot path (run with `--release -- --ignored --nocapture`).
#[test]
#[ignore = "timing; run explicitly in release mode"]
fn stream_throughput() {
    let mut r = Reconstructor::new(ReconstructConfig::default());
    let mut out = Vec::new();
    let req = post("/v1/chat/completions", r#"{"model":"m","stream":true}"#);
    let events: Vec<Vec<u8>> = (0..64)
        .map(|_| chunk(vllm_chunk(Some("tok"), None).as_bytes()))
        .collect();
    let fin = chunk(vllm_chunk(Some("!"), Some("stop")).as_bytes());
    let done = chunk(b"data: [DONE]\n\n");
    let mut n_events = 0u64;
    let start = std::time::Instant::now();
    let mut ts = 0u64;
    for i in 0..2_000u64 {
        let conn = ConnKey {
            pid: 1,
            conn_id: i % 64,
        };
        let mut ev = |dir, bytes: &[u8]| {
            ts += 1;
            n_events += 1;
            r.on_event(
                &ConnEvent::Data {
                    conn,
                    dir,
                    ts_ns: ts,
                    len: bytes.len() as u64,
                    payload: bytes,
                    arrival_ns: None,
                },
                &mut out,
            );
        };
        ev(Direction::In, &req);
        ev(Direction::Out, UVICORN_SSE_HEAD);
        for e in &events {
            ev(Direction::Out, e);
        }
        ev(Direction::Out, &fin);
        ev(Direction::Out, &done);
        ev(Direction::Out, b"0\r\n\r\n");
        out.clear();
    }
    let el = start.elapsed();
    println!(
        "{n_events} events in {el:?}: {:.0} ns/event",
        el.as_nanos() as f64 / n_events as f64
    );
    assert_eq!(r.stats().records, 2_000);
}

#[test]
fn client_leaving_after_done_is_success() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        10,
        &post("/v1/completions", r#"{"model":"m","stream":true}"#),
    );
    sim.write(20, UVICORN_SSE_HEAD);
    sim.write(
        30,
        &chunk(
            br#"data: {"choices":[{"text":"a","finish_reason":"stop"}]}

"#,
        ),
    );
    sim.write(40, &chunk(b"data: [DONE]\n\n"));
    sim.ev(ConnEvent::Error {
        conn: KEY,
        dir: Direction::Out,
        ts_ns: 50,
        errno: libc::EPIPE,
    });
    let r = sim.one();
    assert_eq!((r.error, r.end_ns, r.output_tokens), (None, 40, Some(1)));
    // Leaving in the middle of an event is a disconnect.
    sim.read(
        60,
        &post("/v1/completions", r#"{"model":"m","stream":true}"#),
    );
    sim.write(70, UVICORN_SSE_HEAD);
    sim.write(80, &chunk(b"data: [DONE]\n\ndata: {\"cho"));
    sim.ev(ConnEvent::PeerClosed {
        conn: KEY,
        ts_ns: 90,
    });
    sim.close(95);
    assert_eq!(sim.one().error, Some(RequestError::ClientDisconnect));
}

proptest! {
    /// Whatever the capture limit, the stream is still recognised, tokens are never invented and
    /// the record is not malformed (chunk framing survives the gaps).
    #[test]
    fn capture_limit_never_inflates_tokens(cap in 8usize..600) {
        let mut sim = Sim::new();
        sim.open(0);
        sim.read(1, &post("/v1/chat/completions", r#"{"model":"m","stream":true}"#));
        sim.cap = cap;
        sim.write(2, UVICORN_SSE_HEAD);
        for i in 0..6u64 {
            sim.write(10 + i, &chunk(vllm_chunk(Some("tok"), None).as_bytes()));
        }
        sim.write(20, &chunk(vllm_chunk(Some(""), Some("stop")).as_bytes()));
        sim.write(21, &chunk(b"data: [DONE]\n\n"));
        sim.write(22, b"0\r\n\r\n");
        prop_assert_eq!(sim.out.len(), 1);
        let r = sim.out.pop().unwrap();
        prop_assert!(r.output_tokens.unwrap_or(0) <= 6);
        if cap >= UVICORN_SSE_HEAD.len() {
            prop_assert_eq!(r.status, Some(200));
            prop_assert!(r.stream);
            prop_assert!(r.error != Some(RequestError::Malformed), "{:?}", r);
        } else {
            // The response head itself was cut: nothing can be trusted.
            prop_assert_eq!(r.error, Some(RequestError::Malformed));
        }
    }
}

/// llama.cpp server reports a failure inside a stream as an `error:` event.
#[test]
fn llama_cpp_error_event() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(10, &post("/completion", r#"{"prompt":"x","stream":true}"#));
    sim.write(
        20,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    sim.write(
        30,
        &chunk(
            br#"data: {"content":"a","stop":false}

"#,
        ),
    );
    sim.write(
        40,
        &chunk(
            br#"error: {"code":500,"message":"slot unavailable","type":"server_error"}

"#,
        ),
    );
    sim.write(50, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(
        (r.error, r.output_tokens),
        (Some(RequestError::Http5xx), Some(1))
    );
}

/// Reads of at most `n` bytes each, as a buffered server reads (Python's rfile: 8 KiB).
fn read_in(k: &mut Kernel, sim: &mut Sim, ts: u64, bytes: &[u8], n: usize) {
    for (i, piece) in bytes.chunks(n).enumerate() {
        k.read(sim, ts + i as u64, piece);
    }
}

fn json_response(body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

#[test]
fn head_up_to_16k_is_parsed_whatever_the_capture() {
    for (head, read_size) in [
        (3 * 1024, 64 * 1024),
        (16 * 1024 - 64, 8192),
        (16 * 1024 - 64, 1000),
    ] {
        let mut sim = Sim::new();
        sim.cap = 1024;
        let mut k = Kernel::new();
        sim.open(0);
        let req = post_with_token("/v1/completions", r#"{"model":"m","prompt":"hi"}"#, head);
        assert!(req.len() <= infertap_common::HEAD_CAPTURE, "{}", req.len());
        read_in(&mut k, &mut sim, 10, &req, read_size);
        k.write(&mut sim, 100, &json_response(br#"{"choices":[{"text":"x","finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":3}}"#));
        let r = sim.one();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/completions")
        );
        assert_eq!(
            (r.error, r.status, r.output_tokens),
            (None, Some(200), Some(3))
        );
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!(r.request_bytes, req.len() as u64);
        assert_eq!(sim.r.stats().malformed, 0);
        // The next request on the connection gets the head window again.
        read_in(&mut k, &mut sim, 200, &req, read_size);
        k.write(&mut sim, 300, &json_response(b"{}"));
        assert_eq!(sim.one().error, None);
    }
}

#[test]
fn head_over_16k_is_rejected_counted_and_the_connection_resyncs() {
    let mut sim = Sim::new();
    sim.cap = 1024;
    let mut k = Kernel::new();
    sim.open(0);
    let big = post_with_token("/v1/completions", r#"{"model":"m"}"#, 64 * 1024);
    read_in(&mut k, &mut sim, 10, &big, 8192);
    assert_eq!(sim.r.stats().header_overflow, 1, "{:?}", sim.r.stats());
    assert_eq!(sim.r.stats().malformed, 1);
    // The server refuses it; the answer pairs with nothing (counted as an orphan).
    k.write(
        &mut sim,
        100,
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n",
    );
    assert!(sim.out.is_empty(), "{:#?}", sim.out);
    assert_eq!(sim.r.stats().orphan_responses, 1);
    // The next request parses normally.
    let req = post("/v1/completions", r#"{"model":"m"}"#);
    k.read(&mut sim, 200, &req);
    k.write(&mut sim, 300, &json_response(b"{}"));
    let r = sim.one();
    assert_eq!((r.error, r.status), (None, Some(200)), "{r:#?}");
    assert_eq!(sim.r.stats().resyncs, 1);
}

#[test]
fn bodies_larger_than_capture_are_counted_and_usage_is_found_in_the_tail() {
    let mut sim = Sim::new();
    sim.cap = 1024;
    let mut k = Kernel::new();
    sim.open(0);
    let prompt = "p".repeat(100_000);
    let req = post(
        "/v1/chat/completions",
        &format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{prompt}"}}]}}"#),
    );
    read_in(&mut k, &mut sim, 10, &req, 65536);
    let content = "w".repeat(30_000);
    let body = format!(
        r#"{{"id":"c","object":"chat.completion","model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}},"finish_reason":"length"}}],"usage":{{"prompt_tokens":25001,"completion_tokens":7501,"total_tokens":32502}},"prompt_logprobs":null}}"#
    );
    let resp = json_response(body.as_bytes());
    // One write of head and body (uvicorn), then the same split over several writes.
    k.write(&mut sim, 100, &resp);
    let r = sim.one();
    assert_eq!(r.request_bytes, req.len() as u64);
    assert_eq!(r.response_bytes, resp.len() as u64);
    assert_eq!(r.output_tokens, Some(7501), "{r:#?}");
    assert_eq!(r.prompt_tokens, Some(25001));
    assert_eq!(r.finish_reason.as_deref(), Some("length"));
    assert_eq!(r.error, None);
    assert!(sim.r.stats().tails >= 1);
    read_in(&mut k, &mut sim, 200, &req, 65536);
    for (i, piece) in resp.chunks(8000).enumerate() {
        k.write(&mut sim, 300 + i as u64, piece);
    }
    let r = sim.one();
    assert_eq!(r.response_bytes, resp.len() as u64);
    assert_eq!((r.output_tokens, r.error), (Some(7501), None));
    // A chunked JSON body, one chunk per write (h11), is read the same way.
    read_in(&mut k, &mut sim, 400, &req, 65536);
    k.write(
        &mut sim,
        500,
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    k.write(&mut sim, 501, &chunk(body.as_bytes()));
    k.write(&mut sim, 502, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!((r.output_tokens, r.error), (Some(7501), None), "{r:#?}");
}

#[test]
fn tail_after_lost_chunk_framing_is_not_malformed() {
    let mut sim = Sim::new();
    sim.cap = 64;
    let mut k = Kernel::new();
    sim.open(0);
    k.read(&mut sim, 10, &post("/v1/completions", r#"{"model":"m"}"#));
    k.write(
        &mut sim,
        20,
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    // Several chunks in one write: the gap hides their framing; the tail cannot restore it.
    let mut w = Vec::new();
    for _ in 0..5 {
        w.extend_from_slice(&chunk(&[b'x'; 100]));
    }
    k.write(&mut sim, 30, &w);
    assert!(sim.out.is_empty());
    k.write(&mut sim, 40, &chunk(b"{}"));
    k.write(&mut sim, 41, b"0\r\n\r\n");
    let r = sim.one();
    assert_ne!(r.error, Some(RequestError::Malformed), "{r:#?}");
    assert_eq!(sim.r.stats().chunk_resyncs, 1);
}

#[test]
fn non_http_connections_are_untraced_by_kind() {
    let cases: [(&[&[u8]], Option<UntracedKind>); 8] = [
        (
            &[b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
            Some(UntracedKind::Tls),
        ),
        (
            &[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"],
            Some(UntracedKind::H2),
        ),
        // The preface split over reads: undecided until it is visible.
        (
            &[b"PRI", b" * HT", b"TP/2.0\r\n\r\nSM\r\n\r\n"],
            Some(UntracedKind::H2),
        ),
        (
            &[b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f"],
            Some(UntracedKind::Other),
        ),
        (&[b"*3\r\n$3\r\nSET\r\n"], Some(UntracedKind::Other)),
        (
            &[b"GET /metrics HTTP/2.0\r\n\r\n"],
            Some(UntracedKind::Other),
        ),
        // HTTP/1.x stays traced, even split and with an uncommon method.
        (
            &[
                b"PO",
                b"ST /v1/completions HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            ],
            None,
        ),
        (&[b"PROPFIND /x HTTP/1.1\r\n\r\n"], None),
    ];
    for (reads, want) in cases {
        let mut sim = Sim::new();
        sim.open(0);
        for (i, r) in reads.iter().enumerate() {
            sim.read(10 + i as u64, r);
        }
        let untraced = sim.r.take_untraced();
        match want {
            Some(kind) => {
                assert_eq!(
                    untraced,
                    vec![Untrace {
                        conn: KEY,
                        fd: Some(9),
                        kind
                    }],
                    "{reads:?}"
                );
                assert_eq!(sim.r.stats().untraced[kind as usize], 1);
                assert_eq!(sim.r.stats().connections_open, 0);
                // Events already on their way are ignored, not adopted.
                sim.read(50, b"GET / HTTP/1.1\r\n\r\n");
                sim.write(60, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                sim.close(70);
                assert!(sim.out.is_empty());
                assert_eq!(sim.r.stats().events_after_untrace, 3);
                assert_eq!(sim.r.stats().connections_adopted, 0);
            }
            None => {
                assert!(untraced.is_empty(), "{reads:?}: {untraced:?}");
                assert_eq!(sim.r.stats().untraced, [0; UntracedKind::COUNT]);
            }
        }
    }
    // A server that speaks first with something else than a response.
    let mut sim = Sim::new();
    sim.open(0);
    sim.write(10, b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f\x03\x00NULL");
    assert_eq!(sim.r.take_untraced()[0].kind, UntracedKind::Other);
    // Adopted connections (open before tracing) are never judged by their first bytes.
    let mut sim = Sim::new();
    sim.open(0);
    sim.r.mark_adopted(KEY);
    sim.read(10, b"\x16\x03\x01 mid-body bytes");
    assert!(sim.r.take_untraced().is_empty());
    // Unix sockets are untraced from their accept, before any event.
    let mut sim = Sim::new();
    sim.r
        .untrace(KEY, Some(4), UntracedKind::Unix, &mut sim.out);
    sim.read(10, b"\x01\x02");
    assert_eq!(sim.r.stats().events_after_untrace, 1);
    assert_eq!(sim.r.stats().connections_adopted, 0);
    assert_eq!(sim.r.take_untraced()[0].fd, Some(4));
}

proptest! {
    /// Streams whose writes are longer than the capture (several events coalesced into one
    /// write, one chunk each) with the tails the kernel adds: tokens are never invented, the
    /// record is never malformed, and the final usage chunk (in the last write's tail) is read.
    #[test]
    fn tails_of_coalesced_stream_writes_never_inflate(cap in 160usize..1500, per_write in 2usize..40) {
        // (Response heads longer than the capture are lost as before: cap ≥ the 150-byte head.)
        prop_assume!(cap >= UVICORN_SSE_HEAD.len());
        let mut sim = Sim::new();
        sim.cap = cap;
        let mut k = Kernel::new();
        sim.open(0);
        k.read(&mut sim, 1, &post("/v1/chat/completions", r#"{"model":"m","stream":true}"#));
        k.write(&mut sim, 2, UVICORN_SSE_HEAD);
        let events: Vec<String> = (0..60).map(|_| vllm_chunk(Some("tok"), None)).collect();
        for (i, group) in events.chunks(per_write).enumerate() {
            k.write(&mut sim, 10 + i as u64, &chunk(group.concat().as_bytes()));
        }
        let usage = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":60}}\n\n";
        let end = [vllm_chunk(Some(""), Some("stop")), usage.to_owned(), "data: [DONE]\n\n".to_owned()].concat();
        k.write(&mut sim, 100, &chunk(end.as_bytes()));
        k.write(&mut sim, 101, b"0\r\n\r\n");
        prop_assert_eq!(sim.out.len(), 1);
        let r = sim.out.pop().unwrap();
        prop_assert!(r.error != Some(RequestError::Malformed), "{:?}", r);
        prop_assert!(r.token_ns.len() <= 60, "{:?}", r.token_ns.len());
        let tail = cap.min(infertap_common::TAIL_CAPTURE);
        if tail >= usage.len() + "data: [DONE]\n\n\r\n".len() {
            // The usage chunk lies inside the last write's prefix or tail: the count is exact.
            prop_assert_eq!(r.output_tokens, Some(60), "{:?}", r);
            prop_assert_eq!(r.token_count_source, Some(TokenCountSource::Usage));
        } else {
            prop_assert!(r.output_tokens.unwrap_or(0) <= 60);
        }
    }
}

mod shapes;
