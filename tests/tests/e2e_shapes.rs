//! Every streaming API shape through the agent binary against the scripted server, which speaks
//! each shape on the same path (`/v1/chat/completions`: recognition is by the bytes, not the
//! path) and logs its own emission times. Per exchange: event count and times (within 1 ms of
//! the server's send), token count, `stream_kind`, `finish_reason`, `token_count_source`, and for
//! `n > 1` the choice of every event and per-choice figures.
//! Needs root and a built agent (skips locally, fails in CI when missing).

use std::time::Duration;

use infertap_tests::agent::{Agent, AgentOptions, AgentRecord};
use infertap_tests::client::{Endpoint, RequestSpec};
use infertap_tests::compare::{check_against_emissions, wire_fidelity};
use infertap_tests::load::run_sequences_blocking;
use infertap_tests::prereq;
use infertap_tests::servers::{Emission, ScriptedServer};
use infertap_tests::wire::WireCapture;
use serde_json::{json, Map, Value};

const TOL_NS: u64 = 1_000_000;
const WAIT: Duration = Duration::from_secs(20);

/// Shapes with no OpenAI framing; `openai` itself is covered by `e2e_scripted`.
const SHAPES: [&str; 8] = [
    "responses",
    "anthropic",
    "ollama_generate",
    "ollama_chat",
    "tgi",
    "llamacpp",
    "json_lines",
    "unknown_sse",
];

fn spec(endpoint: Endpoint, scenario: &str) -> RequestSpec {
    RequestSpec::new(endpoint, 16).header("X-Scenario", scenario)
}

fn find<'a>(recs: &'a [AgentRecord], e: &Emission) -> &'a AgentRecord {
    recs.iter()
        .find(|r| r.peer.as_deref() == Some(e.peer.as_str()) && r.seq_on_conn == e.seq_on_conn)
        .unwrap_or_else(|| panic!("no agent record for {} seq {}", e.peer, e.seq_on_conn))
}

#[test]
fn every_api_shape_matches_emissions() {
    if !prereq::agent_test("every_api_shape_matches_emissions") {
        return;
    }
    let _g = prereq::e2e_lock();
    let mut scenarios = Map::new();
    for s in SHAPES {
        scenarios.insert(s.into(), json!({"shape": s}));
        scenarios.insert(
            format!("{s}_frag"),
            json!({"shape": s, "split": "fragments", "fragment_gap_ms": 2, "tokens": 5}),
        );
        scenarios.insert(
            format!("{s}_coal"),
            json!({"shape": s, "split": "coalesce", "coalesce": 3, "tokens": 7}),
        );
        scenarios.insert(
            format!("{s}_nousage"),
            json!({"shape": s, "usage": false, "tokens": 6}),
        );
    }
    // Per-token logprobs: Responses deltas carrying 3 tokens each.
    scenarios.insert(
        "responses_multi".into(),
        json!({"shape": "responses", "tokens_per_event": 3, "usage": false, "tokens": 4}),
    );
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 15, "itl_ms": [3, 7, 2, 5], "tokens": 9},
        "scenarios": Value::Object(scenarios),
    }))
    .unwrap();
    let agent = Agent::spawn(&AgentOptions::pid(server.pid())).unwrap();
    let cap = WireCapture::start(server.port).unwrap();
    // Two keep-alive connections, each taking half the shapes and their variants in sequence
    // (few concurrent streams, so the Python server's own clock readings stay within the
    // tolerance on a loaded machine).
    let mut seqs: Vec<Vec<RequestSpec>> = SHAPES
        .chunks(SHAPES.len() / 2)
        .map(|half| {
            half.iter()
                .flat_map(|s| {
                    ["", "_frag", "_coal", "_nousage"]
                        .map(|v| spec(Endpoint::Chat, &format!("{s}{v}")))
                })
                .collect()
        })
        .collect();
    seqs[0].push(spec(Endpoint::Chat, "responses_multi"));
    let total: usize = seqs.iter().map(Vec::len).sum();
    let client: Vec<_> = run_sequences_blocking(server.addr(), seqs)
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    assert!(client.iter().all(|c| c.error.is_none()), "{client:#?}");
    let em = server.wait_emissions(total, WAIT).unwrap();
    let recs = agent.wait_records(total, WAIT).unwrap();
    let wire = cap.finish().unwrap();
    assert_eq!(wire.losses(), 0, "capture lost data: {:?}", wire.stats);
    let check = check_against_emissions(&recs, &em, TOL_NS);
    eprintln!(
        "agent vs server emissions over {} shapes: {:#?}",
        SHAPES.len(),
        check
    );
    // The wire, parsing each shape on its own, is the stricter reference for the times.
    let w = wire_fidelity(&recs, &wire, Some(&client));
    eprintln!("agent vs the wire over every shape: {}", w.summary());
    if !w.problems.is_empty() {
        eprintln!("wire problems: {:#?}", w.problems);
    }
    assert_eq!(w.joined, total, "{}", w.summary());
    let misses = w.target_misses();
    assert!(
        misses.is_empty(),
        "misses the wire targets: {misses:#?}\n{}",
        w.summary()
    );
    assert!(check.problems.is_empty(), "{:#?}", check.problems);
    assert_eq!(check.matched, total);
    for e in &em {
        let a = find(&recs, e);
        assert_eq!(a.error, None, "{}: {a:?}", e.scenario);
        assert!(a.stream, "{}", e.scenario);
        assert_eq!(
            a.content_events,
            Some(e.events_unix_ns.len()),
            "{}",
            e.scenario
        );
        if e.tokens_known {
            assert_eq!(a.output_tokens, Some(e.output_tokens), "{}", e.scenario);
        } else {
            // No token semantics: the events are still timed (TTFT = first event).
            assert_eq!(a.output_tokens, None, "{}", e.scenario);
            assert!(a.ttft_ms.is_some(), "{}", e.scenario);
        }
        assert!(a.choices.is_empty() && a.token_choice.is_empty());
    }
    assert!(agent.stop().unwrap().status.success());
}

/// `n > 1` on both OpenAI endpoints: every event's choice, per-choice token counts and
/// finish, the total equal to the server's usage.
#[test]
fn parallel_choices_match_emissions() {
    if !prereq::agent_test("parallel_choices_match_emissions") {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 15, "itl_ms": [3, 6, 2], "tokens": 6},
        "scenarios": {
            "n2": {"n": 2},
            "n3": {"n": 3, "tokens": 4, "split": "coalesce", "coalesce": 2},
            "n2_counted": {"n": 2, "usage": false, "tokens_per_event": 2, "tokens": 5},
        }
    }))
    .unwrap();
    let agent = Agent::spawn(&AgentOptions::pid(server.pid())).unwrap();
    let seqs = vec![
        vec![
            spec(Endpoint::Chat, "n2"),
            spec(Endpoint::Completions, "n3"),
        ],
        vec![
            spec(Endpoint::Completions, "n2_counted"),
            spec(Endpoint::Chat, "n3"),
        ],
    ];
    let client: Vec<_> = run_sequences_blocking(server.addr(), seqs)
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    assert!(client.iter().all(|c| c.error.is_none()), "{client:#?}");
    let em = server.wait_emissions(4, WAIT).unwrap();
    let recs = agent.wait_records(4, WAIT).unwrap();
    let check = check_against_emissions(&recs, &em, TOL_NS);
    eprintln!("n > 1 vs server emissions: {check:#?}");
    assert!(check.problems.is_empty(), "{:#?}", check.problems);
    for e in &em {
        let a = find(&recs, e);
        let n = e.choice_per_event.iter().max().unwrap() + 1;
        assert_eq!(a.error, None, "{a:?}");
        assert_eq!(a.choices.len() as u32, n, "{}", e.scenario);
        for c in &a.choices {
            let events: Vec<usize> = (0..e.choice_per_event.len())
                .filter(|&i| e.choice_per_event[i] == c.index)
                .collect();
            let tokens: u64 = events
                .iter()
                .map(|&i| u64::from(e.tokens_per_event[i]))
                .sum();
            assert_eq!(c.output_tokens, tokens, "{} choice {}", e.scenario, c.index);
            assert_eq!(c.content_events, events.len() as u64);
            assert_eq!(c.finish_reason.as_deref(), Some("length"));
            assert!(c.itl_ms_median.is_some());
        }
        assert_eq!(
            a.choices.iter().map(|c| c.output_tokens).sum::<u64>(),
            e.output_tokens
        );
    }
    assert!(agent.stop().unwrap().status.success());
}

/// A stream that ends without its shape's end marker was cut (`truncated`); a stream of a shape
/// without one just ended (no error). A server that dies inside an event (half an event, then
/// close) is a `server_close` with the events before it, for every shape.
#[test]
fn missing_end_marker_only_matters_for_shapes_that_have_one() {
    if !prereq::agent_test("missing_end_marker_only_matters_for_shapes_that_have_one") {
        return;
    }
    let _g = prereq::e2e_lock();
    let mut scenarios = Map::new();
    for s in SHAPES {
        scenarios.insert(s.into(), json!({"shape": s, "done": false}));
        scenarios.insert(format!("{s}_cut"), json!({"shape": s, "truncate_after": 2}));
    }
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 10, "itl_ms": 3, "tokens": 4},
        "scenarios": Value::Object(scenarios),
    }))
    .unwrap();
    let agent = Agent::spawn(&AgentOptions::pid(server.pid())).unwrap();
    let mut seqs = vec![SHAPES.iter().map(|s| spec(Endpoint::Chat, s)).collect()];
    // A cut connection is not reused: one connection each.
    seqs.extend(
        SHAPES
            .iter()
            .map(|s| vec![spec(Endpoint::Chat, &format!("{s}_cut"))]),
    );
    let client = run_sequences_blocking(server.addr(), seqs).unwrap();
    assert!(client[0].iter().all(|c| c.error.is_none()), "{client:#?}");
    let total = 2 * SHAPES.len();
    let em = server.wait_emissions(total, WAIT).unwrap();
    let recs = agent.wait_records(total, WAIT).unwrap();
    for e in &em {
        let a = find(&recs, e);
        assert_eq!(
            a.content_events,
            Some(e.events_unix_ns.len()),
            "{}",
            e.scenario
        );
        if e.scenario.ends_with("_cut") {
            assert_eq!(
                a.error.as_deref(),
                Some("server_close"),
                "{}: {a:?}",
                e.scenario
            );
            assert_eq!(e.events_unix_ns.len(), 2);
            continue;
        }
        let want = e.tokens_known.then_some("truncated");
        assert_eq!(a.error.as_deref(), want, "{}: {a:?}", e.scenario);
        assert_eq!(a.stream_kind, e.stream_kind, "{}", e.scenario);
    }
    assert!(agent.stop().unwrap().status.success());
}
