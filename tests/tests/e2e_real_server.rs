//! The agent on the real llama.cpp server (llama-cpp-python, SmolLM2-135M) under concurrent
//! keep-alive streaming load on both endpoints: per-request token counts equal the client's, and
//! TTFT and every token time agree with a packet capture of the same run (the client's stopwatch
//! is printed beside them: on 2 cores shared with the model's threads it carries milliseconds of
//! its own scheduling jitter, so it is not the reference).

use std::time::Duration;

use infertap_tests::agent::{Agent, AgentOptions};
use infertap_tests::compare::{fidelity, join, wire_fidelity};
use infertap_tests::load::{run_load_blocking, EndpointMix, LoadConfig};
use infertap_tests::prereq;
use infertap_tests::servers::{LlamaServer, MODEL_ALIAS};
use infertap_tests::wire::WireCapture;

#[test]
fn real_server_concurrent_streams() {
    let name = "real_server_concurrent_streams";
    if !prereq::agent_test(name) || !prereq::check(name, prereq::missing_real_server()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = LlamaServer::start(2).unwrap();
    let agent = Agent::spawn(&AgentOptions::pid(server.pid())).unwrap();
    let cap = WireCapture::start(server.addr().port()).unwrap();
    let mut cfg = LoadConfig::new(server.addr());
    cfg.model = Some(MODEL_ALIAS.into());
    cfg.concurrency = 4;
    cfg.requests = Some(16);
    cfg.max_tokens = 24;
    cfg.endpoint = EndpointMix::Mixed;
    let client = run_load_blocking(&cfg).unwrap();
    assert!(
        client
            .iter()
            .all(|c| c.error.is_none() && c.status == Some(200)),
        "{client:#?}"
    );
    assert!(
        client.iter().any(|c| c.seq_on_conn > 0),
        "no keep-alive reuse"
    );
    let recs = agent
        .wait_records(client.len(), Duration::from_secs(20))
        .unwrap();
    let wire = cap.finish().unwrap();
    assert_eq!(wire.losses(), 0, "capture lost data: {:?}", wire.stats);
    let j = join(&recs, &client);
    assert_eq!(
        j.pairs.len(),
        client.len(),
        "unjoined client records: {:#?}",
        j.client_only
    );
    for (a, c) in &j.pairs {
        assert_eq!(a.error, None, "{a:?}");
        assert_eq!(a.path, c.path);
        assert_eq!(a.output_tokens, Some(c.output_tokens), "{a:?}\n{c:?}");
        assert_eq!(a.token_unix_ns.len(), c.event_unix_ns.len(), "{a:?}\n{c:?}");
        // The shape as the bytes say it, and the stop in the closed vocabulary.
        let kind = if c.path.ends_with("/chat/completions") {
            "openai_chat"
        } else {
            "openai_completion"
        };
        assert_eq!(a.stream_kind.as_deref(), Some(kind), "{a:?}");
        assert!(
            matches!(a.finish_reason.as_deref(), Some("stop" | "length")),
            "{a:?}"
        );
    }
    // The model may stop at once for a prompt (0 tokens is legitimate); most requests stream.
    let streamed = client.iter().filter(|c| c.output_tokens > 1).count();
    assert!(
        streamed * 2 > client.len(),
        "only {streamed} requests streamed tokens"
    );
    let f = fidelity(&recs, &client);
    eprintln!(
        "agent vs client stopwatch (not the reference): {}",
        serde_json::to_string_pretty(&f).unwrap()
    );
    assert_eq!(f.token_mismatches, 0);
    let w = wire_fidelity(&recs, &wire, Some(&client));
    eprintln!("agent vs the wire: {}", w.summary());
    assert_eq!(w.joined, client.len(), "{}", w.summary());
    let misses = w.target_misses();
    assert!(
        misses.is_empty(),
        "misses the wire targets: {misses:#?}\n{}",
        w.summary()
    );
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{:?}\n{}", exit.status, exit.log);
}
