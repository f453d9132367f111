//! The agent against the scripted server, whose exact emission times are logged: per-token times
//! within 1 ms, exact token counts, keep-alive, non-streaming, HTTP errors, cut streams.
//! Needs root and a built agent (skips locally, fails in CI when missing).

use std::time::Duration;

use infertap_tests::agent::{Agent, AgentOptions, AgentRecord};
use infertap_tests::client::{Endpoint, RequestSpec};
use infertap_tests::compare::check_against_emissions;
use infertap_tests::load::run_sequences_blocking;
use infertap_tests::prereq;
use infertap_tests::servers::ScriptedServer;
use serde_json::json;

/// Agent time vs the server's own clock reading right after send(): the brief's bound.
const TOL_NS: u64 = 1_000_000;
const WAIT: Duration = Duration::from_secs(15);

fn spec(endpoint: Endpoint, scenario: &str) -> RequestSpec {
    RequestSpec::new(endpoint, 16).header("X-Scenario", scenario)
}

fn find<'a>(recs: &'a [AgentRecord], peer: &str, seq: u32) -> &'a AgentRecord {
    recs.iter()
        .find(|r| r.peer.as_deref() == Some(peer) && r.seq_on_conn == seq)
        .unwrap_or_else(|| panic!("no agent record for {peer} seq {seq}: {recs:#?}"))
}

#[test]
fn streaming_times_and_counts_match_emissions() {
    if !prereq::agent_test("streaming_times_and_counts_match_emissions") {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 25, "itl_ms": [4, 9, 2, 6, 12, 3], "tokens": 12},
        "scenarios": {
            "plain": {},
            "frag": {"split": "fragments", "fragment_gap_ms": 3, "tokens": 6},
            "coal": {"split": "coalesce", "coalesce": 4, "tokens": 9},
            "multi": {"tokens_per_event": 3, "usage": false, "tokens": 5},
            "bare": {"role_chunk": false, "usage": false, "tokens": 7},
        }
    }))
    .unwrap();
    let agent = Agent::spawn(&AgentOptions::pid(server.pid())).unwrap();
    let seqs = vec![
        vec![
            spec(Endpoint::Chat, "plain"),
            spec(Endpoint::Chat, "frag"),
            spec(Endpoint::Completions, "multi"),
        ],
        vec![
            spec(Endpoint::Completions, "plain"),
            spec(Endpoint::Completions, "coal"),
            spec(Endpoint::Chat, "bare"),
        ],
        vec![
            spec(Endpoint::Chat, "coal"),
            spec(Endpoint::Chat, "multi"),
            spec(Endpoint::Completions, "frag"),
        ],
    ];
    let client: Vec<_> = run_sequences_blocking(server.addr(), seqs)
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    assert!(client.iter().all(|c| c.error.is_none()), "{client:#?}");
    let em = server.wait_emissions(9, WAIT).unwrap();
    let recs = agent.wait_records(9, WAIT).unwrap();
    let check = check_against_emissions(&recs, &em, TOL_NS);
    eprintln!("agent vs server emissions: {check:#?}");
    assert!(check.problems.is_empty(), "{:#?}", check.problems);
    assert_eq!(check.matched, 9);
    for c in &client {
        let a = find(&recs, &c.local_addr, c.seq_on_conn);
        assert_eq!(a.pid, server.pid());
        assert_eq!(a.method, "POST");
        assert_eq!(a.path, c.path);
        assert!(a.stream);
        assert_eq!(a.error, None, "{a:?}");
        assert_eq!(a.output_tokens, Some(c.output_tokens), "{a:?}\n{c:?}");
        let expect_source = if c.usage_completion_tokens.is_some() {
            "usage"
        } else {
            "counted"
        };
        assert_eq!(
            a.token_count_source.as_deref(),
            Some(expect_source),
            "{a:?}"
        );
        // TTFT as the agent defines it (server read → first token write) is within the
        // client's (send → arrival), and close to it on loopback.
        let (at, ct) = (a.ttft_ms.unwrap(), c.ttft_ms.unwrap());
        assert!(
            at <= ct + 1.0 && ct - at < 10.0,
            "ttft agent {at} client {ct}"
        );
    }
    // Keep-alive: 3 connections, sequence numbers 0, 1, 2 on each, one conn_id per connection.
    let mut conns: Vec<(String, u64)> = recs
        .iter()
        .map(|r| (r.peer.clone().unwrap_or_default(), r.conn_id))
        .collect();
    conns.sort();
    conns.dedup();
    assert_eq!(conns.len(), 3, "{conns:?}");
    let exit = agent.stop().unwrap();
    assert!(
        exit.status.success(),
        "agent exit {:?}\n{}",
        exit.status,
        exit.log
    );
}

#[test]
fn non_streaming_and_http_errors() {
    if !prereq::agent_test("non_streaming_and_http_errors") {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 10, "tokens": 6},
        "scenarios": {
            "json": {"mode": "json", "tokens": 7},
            "json_chunked": {"mode": "json", "chunked": true, "tokens": 4, "tokens_per_event": 2},
            "e429": {"mode": "error", "status": 429},
            "e500": {"mode": "error", "status": 500, "chunked": true},
            "ok": {},
        }
    }))
    .unwrap();
    let agent = Agent::spawn(&AgentOptions::pid(server.pid())).unwrap();
    let mut json_req = spec(Endpoint::Chat, "json");
    json_req.stream = false;
    let mut json_chunked = spec(Endpoint::Completions, "json_chunked");
    json_chunked.stream = false;
    let seq = vec![
        json_req,
        json_chunked,
        spec(Endpoint::Chat, "e429"),
        spec(Endpoint::Completions, "e500"),
        spec(Endpoint::Chat, "ok"),
    ];
    let client = run_sequences_blocking(server.addr(), vec![seq])
        .unwrap()
        .remove(0);
    assert!(client.iter().all(|c| c.error.is_none()), "{client:#?}");
    let recs = agent.wait_records(5, WAIT).unwrap();
    let peer = &client[0].local_addr;
    let r = |seq| find(&recs, peer, seq);
    assert_eq!(
        (r(0).stream, r(0).status, r(0).error.as_deref()),
        (false, Some(200), None)
    );
    assert_eq!(r(0).output_tokens, Some(7));
    assert!(r(0).token_unix_ns.len() <= 1, "{:?}", r(0));
    assert_eq!(
        (r(1).stream, r(1).status, r(1).error.as_deref()),
        (false, Some(200), None)
    );
    assert_eq!(r(1).output_tokens, Some(8));
    assert_eq!(
        (r(2).status, r(2).error.as_deref()),
        (Some(429), Some("http_4xx"))
    );
    assert_eq!(
        (r(3).status, r(3).error.as_deref()),
        (Some(500), Some("http_5xx"))
    );
    assert_eq!((r(4).status, r(4).error.as_deref()), (Some(200), None));
    assert_eq!(r(4).output_tokens, Some(6));
    let em = server.wait_emissions(5, WAIT).unwrap();
    let check = check_against_emissions(&recs, &em[4..], TOL_NS);
    assert!(check.problems.is_empty(), "{:#?}", check.problems);
    assert!(agent.stop().unwrap().status.success());
}

#[test]
fn server_close_and_client_disconnect_mid_stream() {
    if !prereq::agent_test("server_close_and_client_disconnect_mid_stream") {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 10, "itl_ms": 8, "tokens": 10},
        "scenarios": {"close": {"close_after": 3}, "ok": {}}
    }))
    .unwrap();
    let agent = Agent::spawn(&AgentOptions::pid(server.pid())).unwrap();
    let mut abort = spec(Endpoint::Chat, "ok");
    abort.abort_after_events = Some(4);
    let seqs = vec![
        vec![spec(Endpoint::Chat, "close")],
        vec![abort],
        vec![spec(Endpoint::Completions, "ok")],
    ];
    let client = run_sequences_blocking(server.addr(), seqs).unwrap();
    let recs = agent.wait_records(3, WAIT).unwrap();
    let closed = find(&recs, &client[0][0].local_addr, 0);
    assert_eq!(closed.error.as_deref(), Some("server_close"), "{closed:?}");
    assert_eq!(closed.token_unix_ns.len(), 3);
    let gone = find(&recs, &client[1][0].local_addr, 0);
    assert_eq!(gone.error.as_deref(), Some("client_disconnect"), "{gone:?}");
    assert!(gone.token_unix_ns.len() >= 4, "{gone:?}");
    let ok = find(&recs, &client[2][0].local_addr, 0);
    assert_eq!((ok.error.as_deref(), ok.output_tokens), (None, Some(10)));
    // Times of the events that were sent still match the server's log.
    let em = server.wait_emissions(3, WAIT).unwrap();
    let sent: Vec<_> = em
        .into_iter()
        .filter(|e| e.peer != client[1][0].local_addr)
        .collect();
    let check = check_against_emissions(&recs, &sent, TOL_NS);
    assert!(check.problems.is_empty(), "{:#?}", check.problems);
    assert!(agent.stop().unwrap().status.success());
}
