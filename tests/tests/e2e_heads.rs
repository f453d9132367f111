//! The agent binary against the scripted server and real sockets: request heads longer than
//! the capture (a 3 KB bearer token, a 16 KiB head) are parsed, a 64 KiB head is rejected and
//! counted and the connection goes on; bodies larger than the capture are counted by size and a
//! non-streaming answer's `usage` past the captured prefix is found; a half-closed client
//! (`shutdown(SHUT_WR)`) is answered in full and reported as such; unix-domain, TLS, HTTP/2 and
//! other non-HTTP connections are counted by kind and leave the kernel's map.
//! Needs root and a built agent (skips locally, fails in CI when missing).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    time::Duration,
};

use infertap_tests::agent::{Agent, AgentOptions, AgentRecord};
use infertap_tests::client::{Endpoint, RequestSpec};
use infertap_tests::load::run_sequences_blocking;
use infertap_tests::prereq;
use infertap_tests::servers::{wait_for, ScriptedServer};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

fn find<'a>(recs: &'a [AgentRecord], peer: &str, seq: u32) -> &'a AgentRecord {
    recs.iter()
        .find(|r| r.peer.as_deref() == Some(peer) && r.seq_on_conn == seq)
        .unwrap_or_else(|| panic!("no agent record for {peer} seq {seq}: {recs:#?}"))
}

/// One request on a raw connection; returns the status and the whole response's size (the
/// scripted server's non-streaming answers carry a Content-Length).
fn exchange(s: &mut TcpStream, req: &[u8]) -> (u16, usize) {
    s.write_all(req).unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (status, buf.len() + len)
}

fn post(path: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn long_heads_and_bodies_through_the_agent() {
    if !prereq::agent_test("long_heads_and_bodies_through_the_agent") {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 5, "itl_ms": 2, "tokens": 6},
        "scenarios": {
            "long": {"mode": "json", "tokens": 4000, "ttft_ms": 1},
            "plain": {"mode": "json", "tokens": 3, "ttft_ms": 1},
        }
    }))
    .unwrap();
    let agent = Agent::spawn(&AgentOptions {
        capture_bytes: Some(1024),
        ..AgentOptions::pid(server.pid())
    })
    .unwrap();
    // A gateway's 3 KB bearer token on a streaming request, a 16 KiB head, and a 100 KB prompt
    // whose answer is ~28 KB of JSON with `usage` at its end.
    let token = format!("Bearer {}", "e".repeat(3000));
    let pad = "p".repeat(15 * 1024);
    let mut big_prompt = RequestSpec::new(Endpoint::Chat, 4000).header("X-Scenario", "long");
    big_prompt.stream = false;
    big_prompt.prompt = "w ".repeat(50_000);
    let seqs = vec![vec![
        RequestSpec::new(Endpoint::Chat, 16).header("Authorization", &token),
        RequestSpec::new(Endpoint::Completions, 16).header("X-Pad", &pad),
        big_prompt,
    ]];
    let client: Vec<_> = run_sequences_blocking(server.addr(), seqs)
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    assert!(client.iter().all(|c| c.error.is_none()), "{client:#?}");
    let recs = agent.wait_records(3, WAIT).unwrap();
    let peer = &client[0].local_addr;
    let auth = find(&recs, peer, 0);
    assert_eq!(
        (auth.method.as_str(), auth.path.as_str(), auth.status),
        ("POST", "/v1/chat/completions", Some(200))
    );
    assert_eq!((auth.error.as_deref(), auth.output_tokens), (None, Some(6)));
    assert!(auth.request_bytes > 3000, "{auth:?}");
    let padded = find(&recs, peer, 1);
    assert_eq!(
        (padded.error.as_deref(), padded.output_tokens),
        (None, Some(6))
    );
    assert!(padded.request_bytes > 15 * 1024, "{padded:?}");
    let long = find(&recs, peer, 2);
    assert_eq!(long.error, None, "{long:?}");
    assert_eq!(
        long.output_tokens,
        Some(4000),
        "usage past the captured prefix: {long:?}"
    );
    assert_eq!(long.token_count_source.as_deref(), Some("usage"));
    assert_eq!(long.finish_reason.as_deref(), Some("length"));
    assert!(long.request_bytes > 100_000, "{long:?}");
    assert!(long.response_bytes > 28_000, "{long:?}");

    // A 64 KiB head: rejected and counted; the same connection's next request is reported.
    let mut s = TcpStream::connect(server.addr()).unwrap();
    let local = s.local_addr().unwrap().to_string();
    let huge: String = (0..8)
        .map(|i| format!("X-Big-{i}: {}\r\n", "h".repeat(8 * 1024)))
        .collect();
    let body = r#"{"model":"m","prompt":"hi","max_tokens":3}"#;
    let (st, _) = exchange(
        &mut s,
        &post(
            "/v1/completions",
            &format!("X-Scenario: plain\r\n{huge}"),
            body,
        ),
    );
    assert_eq!(st, 200, "the server itself accepts it");
    let next = post("/v1/completions", "X-Scenario: plain\r\n", body);
    let (st, resp_len) = exchange(&mut s, &next);
    assert_eq!(st, 200);
    let recs = agent.wait_records(4, WAIT).unwrap();
    let after = recs
        .iter()
        .find(|r| r.peer.as_deref() == Some(local.as_str()))
        .unwrap_or_else(|| panic!("no record for {local}: {recs:#?}"));
    assert_eq!((after.error.as_deref(), after.status), (None, Some(200)));
    assert_eq!(after.request_bytes, next.len() as u64);
    assert_eq!(after.response_bytes, resp_len as u64);
    assert_eq!(
        recs.iter()
            .filter(|r| r.peer.as_deref() == Some(local.as_str()))
            .count(),
        1,
        "the 64 KiB head has no record (no method or path could be trusted)"
    );
    let m = wait_for(WAIT, "head counted", || {
        let m = agent.metrics().ok()?;
        (m.sum(
            "infertap_events_dropped_total",
            &[("reason", "http_head_too_large")],
        ) >= 1.0)
            .then_some(m)
    })
    .unwrap();
    assert_eq!(
        m.sum(
            "infertap_events_dropped_total",
            &[("reason", "http_head_too_large")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "infertap_events_dropped_total",
            &[("reason", "malformed_http")]
        ),
        0.0
    );
}

#[test]
fn half_closed_client_is_answered_in_full() {
    if !prereq::agent_test("half_closed_client_is_answered_in_full") {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 30, "itl_ms": 3, "tokens": 10, "await_eof_ms": 2000},
    }))
    .unwrap();
    let agent = Agent::spawn(&AgentOptions::pid(server.pid())).unwrap();
    let mut s = TcpStream::connect(server.addr()).unwrap();
    let local = s.local_addr().unwrap().to_string();
    s.write_all(&post(
        "/v1/chat/completions",
        "",
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
    ))
    .unwrap();
    // The client sends nothing more but keeps reading: the server's read returns 0 first.
    s.shutdown(Shutdown::Write).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp);
    assert!(text.contains("data: [DONE]"), "{text}");
    let em = server.wait_emissions(1, WAIT).unwrap();
    assert!(em[0].completed, "{em:?}");
    let recs = agent.wait_records(1, WAIT).unwrap();
    let r = find(&recs, &local, 0);
    assert_eq!(r.error, None, "a half-close is no disconnect: {r:#?}");
    assert_eq!(r.output_tokens, Some(10));
    assert_eq!(r.token_unix_ns.len(), 10);
}

const MIXED_SERVER: &str = r#"
import ctypes, socket, sys, threading
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0)); ls.listen(8)
us = socket.socket(socket.AF_UNIX); us.bind(sys.argv[1]); us.listen(4)
# A second unix listener accepted with accept(fd, NULL, NULL), as C servers often do: the
# accept's record carries no address and the agent asks /proc.
us2 = socket.socket(socket.AF_UNIX); us2.bind(sys.argv[1] + ".2"); us2.listen(4)
libc = ctypes.CDLL(None, use_errno=True)
print(ls.getsockname()[1], flush=True)
def serve(c):
    # Echo what the client sends: every read and write is a traced syscall unless untraced.
    while True:
        d = c.recv(4096)
        if not d:
            break
        if d.startswith(b"GET /ws "):
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        elif d.startswith(b"GET "):
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        else:
            c.sendall(d)
    c.close()
conns = []
def accept(l):
    while True:
        c, _ = l.accept()
        print("fd", c.fileno(), flush=True)
        threading.Thread(target=serve, args=(c,), daemon=True).start()
def accept_noaddr(l):
    while True:
        fd = libc.accept(l.fileno(), None, None)
        c = socket.socket(fileno=fd)
        print("fd", fd, flush=True)
        threading.Thread(target=serve, args=(c,), daemon=True).start()
threading.Thread(target=accept, args=(us,), daemon=True).start()
threading.Thread(target=accept_noaddr, args=(us2,), daemon=True).start()
accept(ls)
"#;

/// Keys `(tgid, fd)` of every CONNS map on the machine, through bpftool.
fn kernel_conns(pid: u32) -> Option<Vec<i32>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "name", "CONNS"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    // One map: a list of entries; several maps (other agents): a list of lists.
    let mut entries = Vec::new();
    fn collect(v: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
            serde_json::Value::Object(o) if o.contains_key("key") => out.push(v.clone()),
            serde_json::Value::Object(o) => o.values().for_each(|x| collect(x, out)),
            _ => {}
        }
    }
    collect(&v, &mut entries);
    let mut fds = Vec::new();
    for e in entries {
        let key = &e["key"];
        let (tgid, fd) = if let Some(t) = key.get("tgid") {
            (t.as_u64()? as u32, key["fd"].as_i64()? as i32)
        } else {
            let bytes: Vec<u8> = key
                .as_array()?
                .iter()
                .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
                .collect();
            if bytes.len() != 8 {
                continue;
            }
            (
                u32::from_le_bytes(bytes[0..4].try_into().ok()?),
                i32::from_le_bytes(bytes[4..8].try_into().ok()?),
            )
        };
        if tgid == pid {
            fds.push(fd);
        }
    }
    Some(fds)
}

#[test]
fn non_http_connections_are_counted_and_untraced() {
    if !prereq::agent_test("non_http_connections_are_counted_and_untraced") {
        return;
    }
    let _g = prereq::e2e_lock();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zmq.ipc");
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(MIXED_SERVER)
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", line.trim()).parse().unwrap();
    let agent = Agent::spawn(&AgentOptions::pid(pid)).unwrap();
    let mut next_fd = || {
        let mut l = String::new();
        stdout.read_line(&mut l).unwrap();
        l.trim()
            .strip_prefix("fd ")
            .unwrap()
            .parse::<i32>()
            .unwrap()
    };
    let ws: &[u8] = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let switched =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let firsts: [&[u8]; 5] = [
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x00\x00\x00\x0cset mystore",
        ws,
    ];
    let mut tcp = Vec::new();
    let mut fds = Vec::new();
    for f in firsts {
        let mut c = TcpStream::connect(addr).unwrap();
        fds.push(next_fd());
        c.write_all(f).unwrap();
        // The HTTP one gets a 40-byte answer, the others their bytes echoed.
        let answer = if f == ws {
            switched.len()
        } else if f.starts_with(b"GET") {
            40
        } else {
            f.len()
        };
        let mut echo = vec![0u8; answer];
        c.read_exact(&mut echo).unwrap();
        tcp.push(c);
    }
    let mut ux = UnixStream::connect(&path).unwrap();
    fds.push(next_fd());
    ux.write_all(b"\x01\x02zmq").unwrap();
    let mut e = [0u8; 5];
    ux.read_exact(&mut e).unwrap();
    let mut ux2 = UnixStream::connect(path.with_extension("ipc.2")).unwrap();
    fds.push(next_fd());
    ux2.write_all(b"\x01\x02zmq").unwrap();
    ux2.read_exact(&mut e).unwrap();

    let m = wait_for(WAIT, "untraced connections counted", || {
        let m = agent.metrics().ok()?;
        let n = |k| m.sum("infertap_connections_untraced_total", &[("kind", k)]);
        (n("unix") + n("tls") + n("h2") + n("other") + n("upgraded") >= 6.0).then_some(m)
    })
    .unwrap();
    for (kind, n) in [
        ("unix", 2.0),
        ("tls", 1.0),
        ("h2", 1.0),
        ("other", 1.0),
        ("upgraded", 1.0),
    ] {
        assert_eq!(
            m.sum("infertap_connections_untraced_total", &[("kind", kind)]),
            n,
            "{kind}"
        );
    }
    // The kernel no longer traces them; the HTTP connection is still there.
    match kernel_conns(pid) {
        Some(traced) => {
            assert!(traced.contains(&fds[0]), "{traced:?} vs {fds:?}");
            for fd in &fds[1..] {
                assert!(!traced.contains(fd), "fd {fd} still traced: {traced:?}");
            }
        }
        None => {
            assert!(!prereq::in_ci(), "bpftool is needed in CI");
            eprintln!("SKIP kernel map check: bpftool unavailable");
        }
    }
    // More traffic on all of them: the HTTP one is still reported, no other record appears.
    for c in &mut tcp[1..] {
        c.write_all(b"more bytes").unwrap();
        let mut b = [0u8; 10];
        c.read_exact(&mut b).unwrap();
    }
    let recs = agent.wait_records(2, WAIT).unwrap();
    let mut paths: Vec<(&str, Option<u16>)> =
        recs.iter().map(|r| (r.path.as_str(), r.status)).collect();
    paths.sort();
    assert_eq!(paths, vec![("/health", Some(200)), ("/ws", Some(101))]);
    let _ = child.kill();
    let _ = child.wait();
}

/// The real llama.cpp server (uvicorn) and a client that half-closes after its request: the
/// agent's verdict is what the client lived through. A full stream (`[DONE]` read) must be a
/// success with the client's token count; a stream the server gave up on (uvicorn may take the
/// EOF for a disconnect) must be `client_disconnect`, never a success.
#[test]
fn half_close_against_the_real_server() {
    let name = "half_close_against_the_real_server";
    if !prereq::agent_test(name) || !prereq::check(name, prereq::missing_real_server()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = infertap_tests::servers::LlamaServer::start(2).unwrap();
    let agent = Agent::spawn(&AgentOptions::pid(server.pid())).unwrap();
    let mut s = TcpStream::connect(server.addr()).unwrap();
    let local = s.local_addr().unwrap().to_string();
    let body = json!({
        "model": infertap_tests::servers::MODEL_ALIAS,
        "prompt": "Once upon a time",
        "max_tokens": 12,
        "stream": true,
    })
    .to_string();
    s.write_all(&post("/v1/completions", "", &body)).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    let complete = text.contains("data: [DONE]");
    let events = text.matches("data: {").count();
    let recs = agent.wait_records(1, WAIT).unwrap();
    let r = find(&recs, &local, 0);
    eprintln!(
        "llama.cpp server after the client's SHUT_WR: {} ({events} data events); agent: {:?}",
        if complete { "complete stream" } else { "cut" },
        r.error
    );
    if complete {
        assert_eq!(r.error, None, "{r:#?}");
        assert_eq!(r.token_unix_ns.len(), events, "{r:#?}");
    } else {
        assert_eq!(r.error.as_deref(), Some("client_disconnect"), "{r:#?}");
    }
}
