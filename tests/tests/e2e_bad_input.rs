//! Bad input must not crash or hang the agent: raw garbage, malformed HTTP, truncated chunks,
//! resets (SO_LINGER 0) from either side, and a target process that exits mid-stream. The agent
//! keeps serving, reports the damaged exchanges with the right error, counts them in /metrics,
//! and still measures a normal request exactly afterwards.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use infertap_tests::agent::{Agent, AgentOptions, AgentRecord};
use infertap_tests::client::{set_linger_zero, Endpoint, RequestSpec};
use infertap_tests::compare::check_against_emissions;
use infertap_tests::load::run_sequences_blocking;
use infertap_tests::prereq;
use infertap_tests::servers::ScriptedServer;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

/// Deterministic pseudo-random bytes (xorshift), so a failure can be replayed.
fn garbage(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends raw bytes on a fresh connection, optionally resetting it, and drains what comes back.
fn raw(addr: std::net::SocketAddr, bytes: &[u8], reset: bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let _ = s.write_all(bytes);
    if reset {
        set_linger_zero(&s);
        return; // drop → RST
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

fn find<'a>(recs: &'a [AgentRecord], peer: &str) -> Option<&'a AgentRecord> {
    recs.iter().find(|r| r.peer.as_deref() == Some(peer))
}

#[test]
fn garbage_resets_and_truncation_are_survived_and_counted() {
    if !prereq::agent_test("garbage_resets_and_truncation_are_survived_and_counted") {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 5, "itl_ms": 3, "tokens": 8},
        "scenarios": {
            "trunc": {"truncate_after": 3},
            "rst": {"close_after": 2, "reset": true},
            "ok": {},
        }
    }))
    .unwrap();
    let addr = server.addr();
    let mut agent = Agent::spawn(&AgentOptions::pid(server.pid())).unwrap();

    // Raw garbage, binary and text-like, with and without a reset.
    for seed in 1..=4u64 {
        raw(addr, &garbage(seed, 3000), seed % 2 == 0);
    }
    raw(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", false); // a TLS ClientHello start
    raw(addr, b"GARBAGE / HTTP/9.9\r\n\r\n", false);
    raw(
        addr,
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999\r\n\r\n{\"str",
        false,
    );
    raw(
        addr,
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        true,
    );
    raw(addr, &[b'A'; 70_000], false); // one enormous "request line"

    let mut client_rst = RequestSpec::new(Endpoint::Chat, 8).header("X-Scenario", "ok");
    client_rst.abort_after_events = Some(2);
    client_rst.abort_with_reset = true;
    let seqs = vec![
        vec![RequestSpec::new(Endpoint::Completions, 8).header("X-Scenario", "trunc")],
        vec![RequestSpec::new(Endpoint::Chat, 8).header("X-Scenario", "rst")],
        vec![client_rst],
    ];
    let cut = run_sequences_blocking(addr, seqs).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(agent.is_running(), "agent died:\n{}", agent.log());

    // A normal exchange afterwards is still measured exactly.
    let ok = run_sequences_blocking(
        addr,
        vec![vec![
            RequestSpec::new(Endpoint::Chat, 8).header("X-Scenario", "ok")
        ]],
    )
    .unwrap();
    let ok_peer = ok[0][0].local_addr.clone();
    let recs = infertap_tests::servers::wait_for(WAIT, "the normal request's record", || {
        agent.records().ok().filter(|r| find(r, &ok_peer).is_some())
    })
    .unwrap();
    let em: Vec<_> = server
        .emissions()
        .unwrap()
        .into_iter()
        .filter(|e| e.peer == ok_peer)
        .collect();
    let check = check_against_emissions(&recs, &em, 1_000_000);
    assert!(
        check.problems.is_empty() && check.matched == 1,
        "{check:#?}"
    );

    let trunc = find(&recs, &cut[0][0].local_addr).expect("record for the truncated stream");
    assert!(
        matches!(
            trunc.error.as_deref(),
            Some("truncated") | Some("server_close")
        ),
        "{trunc:?}"
    );
    assert_eq!(trunc.token_unix_ns.len(), 3, "{trunc:?}");
    let rst = find(&recs, &cut[1][0].local_addr).expect("record for the server reset");
    assert_eq!(rst.error.as_deref(), Some("server_close"), "{rst:?}");
    let crst = find(&recs, &cut[2][0].local_addr).expect("record for the client reset");
    assert_eq!(crst.error.as_deref(), Some("client_disconnect"), "{crst:?}");
    for r in &recs {
        assert!(r.output_tokens.unwrap_or(0) <= 8, "{r:?}");
    }

    // Health and metrics still answer, and the damage is counted.
    assert_eq!(agent.healthz().unwrap(), 200);
    let m = agent.metrics().unwrap();
    assert!(!m.samples.is_empty(), "empty /metrics");
    for kind in ["server_close", "client_disconnect"] {
        assert!(
            m.sum_counters_with_label_value(kind) >= 1.0,
            "no counter labelled {kind} in /metrics: {:?}",
            m.names()
        );
    }
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{:?}\n{}", exit.status, exit.log);
}

#[test]
fn target_process_exit_mid_stream() {
    if !prereq::agent_test("target_process_exit_mid_stream") {
        return;
    }
    let _g = prereq::e2e_lock();
    let mut server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 5, "itl_ms": 5, "tokens": 20, "exit_after": 4}
    }))
    .unwrap();
    let pid = server.pid();
    let mut agent = Agent::spawn(&AgentOptions::pid(pid)).unwrap();
    let client = run_sequences_blocking(
        server.addr(),
        vec![vec![RequestSpec::new(Endpoint::Chat, 32)]],
    )
    .unwrap();
    assert!(client[0][0].error.is_some(), "{:?}", client[0][0]);
    server.wait_exit(WAIT).unwrap();
    let recs = agent.wait_records(1, WAIT).unwrap();
    let r = &recs[0];
    assert_eq!(r.pid, pid);
    assert_eq!(r.error.as_deref(), Some("process_exit"), "{r:?}");
    assert_eq!(r.token_unix_ns.len(), 4, "{r:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        agent.is_running(),
        "agent exited with its target:\n{}",
        agent.log()
    );
    assert_eq!(agent.healthz().unwrap(), 200);
    assert!(
        agent
            .metrics()
            .unwrap()
            .sum_counters_with_label_value("process_exit")
            >= 1.0
    );
    assert!(agent.stop().unwrap().status.success());
}
