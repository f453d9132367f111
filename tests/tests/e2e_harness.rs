//! Self-check of the harness, no agent or root needed: the independent client's measurements
//! agree with the scripted server's logged emission times, so it can be trusted as a reference.

use std::collections::HashMap;
use std::time::Duration;

use infertap_tests::client::{Endpoint, RequestSpec};
use infertap_tests::compare::{percentile_sorted, ErrorStats};
use infertap_tests::load::{run_load_blocking, run_sequences_blocking, EndpointMix, LoadConfig};
use infertap_tests::prereq;
use infertap_tests::servers::{Emission, ScriptedServer};
use serde_json::json;

fn by_key(e: &[Emission]) -> HashMap<(String, u32), Emission> {
    e.iter()
        .map(|e| ((e.peer.clone(), e.seq_on_conn), e.clone()))
        .collect()
}

#[test]
fn client_matches_scripted_emissions() {
    if !prereq::check(
        "client_matches_scripted_emissions",
        prereq::missing_python(),
    ) {
        return;
    }
    let _g = prereq::e2e_lock();
    let script = json!({
        "default": {"ttft_ms": 15, "itl_ms": [3, 7, 2, 9, 4], "tokens": 10},
        "scenarios": {
            "frag": {"split": "fragments", "fragment_gap_ms": 2, "tokens": 6},
            "coal": {"split": "coalesce", "coalesce": 3, "tokens": 7, "tokens_per_event": 2,
                     "usage": false},
            "json": {"mode": "json", "tokens": 5},
            "e503": {"mode": "error", "status": 503},
        }
    });
    let server = ScriptedServer::start(&script).unwrap();
    let mut cfg = LoadConfig::new(server.addr());
    cfg.concurrency = 3;
    cfg.requests = Some(9);
    cfg.endpoint = EndpointMix::Mixed;
    let mut recs = run_load_blocking(&cfg).unwrap();
    let specs = vec![
        RequestSpec::new(Endpoint::Chat, 8).header("X-Scenario", "frag"),
        RequestSpec::new(Endpoint::Completions, 8).header("X-Scenario", "coal"),
        {
            let mut s = RequestSpec::new(Endpoint::Chat, 8).header("X-Scenario", "json");
            s.stream = false;
            s
        },
        RequestSpec::new(Endpoint::Chat, 8).header("X-Scenario", "e503"),
    ];
    recs.extend(
        run_sequences_blocking(server.addr(), vec![specs])
            .unwrap()
            .remove(0),
    );
    let em = by_key(
        &server
            .wait_emissions(recs.len(), Duration::from_secs(5))
            .unwrap(),
    );

    let mut errs = Vec::new();
    let mut per_conn: HashMap<String, Vec<u32>> = HashMap::new();
    for r in &recs {
        assert!(r.error.is_none(), "{r:?}");
        per_conn
            .entry(r.local_addr.clone())
            .or_default()
            .push(r.seq_on_conn);
        let e = &em[&(r.local_addr.clone(), r.seq_on_conn)];
        assert_eq!(r.status, e.status);
        assert_eq!(r.output_tokens, e.output_tokens, "{r:?}\n{e:?}");
        assert_eq!(r.event_unix_ns.len(), e.events_unix_ns.len());
        assert_eq!(r.tokens_per_event, e.tokens_per_event);
        for (i, c) in r.event_unix_ns.iter().enumerate() {
            // Causality: nothing arrives before the server started sending it.
            let before = e.events_send_start_unix_ns[i];
            assert!(
                *c >= before,
                "event {i} arrived {} ns before its send",
                before - c
            );
            errs.push(*c as i64 - e.events_unix_ns[i] as i64);
        }
    }
    // Keep-alive: three connections carried the 9 load requests, one the 4 scripted ones.
    assert_eq!(per_conn.len(), 4, "{per_conn:?}");
    for seqs in per_conn.values() {
        assert_eq!(*seqs, (0..seqs.len() as u32).collect::<Vec<_>>());
    }
    let st = ErrorStats::from_signed(&errs);
    eprintln!("client arrival - server emission: {st:?}");
    assert!(st.n >= 9 * 10);
    // Loopback delivery plus a tokio wake-up: tens of µs typically. The bound is on p90, not the
    // maximum: on a busy 2-core machine one descheduled client thread delays a few events.
    let mut abs: Vec<u64> = errs.iter().map(|e| e.unsigned_abs()).collect();
    abs.sort_unstable();
    let p90 = percentile_sorted(&abs, 90.0);
    assert!(st.median_ns < 1_000_000, "{st:?}");
    assert!(p90 < 1_000_000, "p90 {p90} ns; {st:?}");
}

#[test]
fn client_sees_cut_streams() {
    if !prereq::check("client_sees_cut_streams", prereq::missing_python()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let script = json!({"default": {"ttft_ms": 5, "itl_ms": 2, "tokens": 6},
        "scenarios": {"close": {"close_after": 3}, "trunc": {"truncate_after": 2}}});
    let server = ScriptedServer::start(&script).unwrap();
    let mut abort = RequestSpec::new(Endpoint::Chat, 8);
    abort.abort_after_events = Some(2);
    let seqs = vec![
        vec![RequestSpec::new(Endpoint::Chat, 8).header("X-Scenario", "close")],
        vec![RequestSpec::new(Endpoint::Completions, 8).header("X-Scenario", "trunc")],
        vec![abort],
    ];
    let r = run_sequences_blocking(server.addr(), seqs).unwrap();
    assert_eq!(r[0][0].event_unix_ns.len(), 3);
    assert!(r[0][0].error.as_deref().unwrap().contains("closed"));
    assert_eq!(r[1][0].event_unix_ns.len(), 2);
    assert!(r[1][0].error.is_some());
    assert_eq!(r[2][0].event_unix_ns.len(), 2);
    assert_eq!(r[2][0].error.as_deref(), Some("client_abort"));
}
