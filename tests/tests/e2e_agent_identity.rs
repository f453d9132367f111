//! The real agent (eBPF) against the scripted server, reporting to the real collector: a
//! restarted agent keeps its series (same `agent` label, the id it persisted in `--state-dir`),
//! and its counters continue on the collector instead of starting a second series.
//! Needs root and a built agent (skips locally, fails in CI when missing).

use std::collections::BTreeSet;
use std::time::Duration;

use infertap_tests::agent::{Agent, AgentOptions, Collector};
use infertap_tests::client::{Endpoint, RequestSpec};
use infertap_tests::load::run_sequences_blocking;
use infertap_tests::prereq;
use infertap_tests::servers::{wait_for, ScriptedServer};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn restarted_agent_keeps_its_series() {
    let name = "restarted_agent_keeps_its_series";
    if !prereq::agent_test(name) || !prereq::check(name, prereq::missing_collector()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let server =
        ScriptedServer::start(&json!({"default": {"ttft_ms": 5, "itl_ms": [2], "tokens": 4}}))
            .unwrap();
    let collector = Collector::spawn().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut opts = AgentOptions::pid(server.pid());
    opts.collector = Some(collector.url());
    opts.interval = Some("1s".into());
    opts.node = Some("node-id-test".into());
    opts.extra_args = vec!["--state-dir".into(), state.path().to_str().unwrap().into()];
    let requests = |n: usize| {
        let seqs = vec![(0..n)
            .map(|_| RequestSpec::new(Endpoint::Chat, 4))
            .collect::<Vec<_>>()];
        let out = run_sequences_blocking(server.addr(), seqs).unwrap();
        assert!(out.iter().flatten().all(|c| c.error.is_none()), "{out:#?}");
    };
    // Requests of this node on the collector, and the agent labels its series carry.
    let seen = || {
        let m = collector.metrics().unwrap();
        let agents: BTreeSet<String> = m
            .samples
            .iter()
            .filter(|s| {
                s.name == "infertap_requests_total"
                    && s.labels.get("node").map(String::as_str) == Some("node-id-test")
            })
            .filter_map(|s| s.labels.get("agent").cloned())
            .collect();
        let total = m.sum("infertap_requests_total", &[("node", "node-id-test")]);
        (total, agents)
    };

    let first = Agent::spawn(&opts).unwrap();
    requests(3);
    wait_for(WAIT, "the first run's 3 requests on the collector", || {
        (seen().0 == 3.0).then_some(())
    })
    .unwrap();
    let exit = first.stop().unwrap();
    assert!(exit.status.success(), "{}", exit.log);
    let id = std::fs::read_to_string(state.path().join("agent-id"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(seen().1, BTreeSet::from([id.clone()]));

    let second = Agent::spawn(&opts).unwrap();
    requests(2);
    wait_for(
        WAIT,
        "the second run's requests added to the same series",
        || (seen().0 == 5.0).then_some(()),
    )
    .unwrap();
    assert_eq!(
        seen().1,
        BTreeSet::from([id]),
        "one agent label across both runs"
    );
    let exit = second.stop().unwrap();
    assert!(exit.status.success(), "{}", exit.log);
}
