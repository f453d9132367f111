//! The agent on the real llama.cpp server (llama-cpp-python, SmolLM2-135M) under concurrent
//! keep-alive streaming load on both endpoints: per-request token counts equal the client's,
//! TTFT and inter-token gaps agree with the client's measurements.

use std::time::Duration;

use infertap_tests::agent::{Agent, AgentOptions};
use infertap_tests::compare::{fidelity, join};
use infertap_tests::load::{run_load_blocking, EndpointMix, LoadConfig};
use infertap_tests::prereq;
use infertap_tests::servers::{LlamaServer, MODEL_ALIAS};

/// The agent times server-side syscalls, the client times its own; on loopback they differ by
/// the kernel hop plus scheduling on a 2-core machine shared with the model's threads.
const TTFT_MEDIAN_NS: u64 = 2_000_000;
const TTFT_P99_NS: u64 = 15_000_000;
const ITL_MEDIAN_NS: u64 = 500_000;
const ITL_P99_NS: u64 = 5_000_000;

#[test]
fn real_server_concurrent_streams() {
    let name = "real_server_concurrent_streams";
    if !prereq::agent_test(name) || !prereq::check(name, prereq::missing_real_server()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = LlamaServer::start(2).unwrap();
    let agent = Agent::spawn(&AgentOptions::pid(server.pid())).unwrap();
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
    eprintln!("fidelity: {}", serde_json::to_string_pretty(&f).unwrap());
    assert_eq!(f.token_mismatches, 0);
    assert!(
        f.ttft.median_ns <= TTFT_MEDIAN_NS && f.ttft.p99_ns <= TTFT_P99_NS,
        "{:?}",
        f.ttft
    );
    assert!(
        f.itl.median_ns <= ITL_MEDIAN_NS && f.itl.p99_ns <= ITL_P99_NS,
        "{:?}",
        f.itl
    );
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{:?}\n{}", exit.status, exit.log);
}
