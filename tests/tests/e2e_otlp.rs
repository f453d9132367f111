//! OTLP export end to end: the real agent traces the scripted server and exports to a receiver
//! that decodes with the official OpenTelemetry protobuf definitions (Python
//! `opentelemetry-proto` + `grpcio`, `tests/servers/otlp_receiver.py`), independent of the
//! agent's code. Checked per request against the agent's own JSON line: span times, GenAI
//! attributes, TTFT and its event, slow-token events, error spans; the metrics against the
//! Prometheus endpoint; a privacy marker in prompts and completions never reaches the receiver;
//! a receiver that is down or slow costs counted drops, never the drain; the collector's
//! `--otlp-endpoint` exports the merged fleet metrics equal to its own `/metrics`.
//! Needs root, a built agent and the receiver venv (skips locally, fails in CI when missing).

use std::time::Duration;

use infertap_tests::agent::{Agent, AgentOptions, AgentRecord, Metrics};
use infertap_tests::client::{Endpoint, RequestSpec};
use infertap_tests::collector_support::{self, CollectorProcess};
use infertap_tests::load::run_sequences_blocking;
use infertap_tests::otlp::{self, array, as_u64, attributes, OtlpReceiver, ReceivedSpan};
use infertap_tests::prereq;
use infertap_tests::servers::{free_port, wait_for, ScriptedServer};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
/// Put in every prompt and every streamed completion; must appear nowhere in what was exported.
const MARKER: &str = "PRIVACY-MARKER-c0ffee-7f3a9c";
const MODEL: &str = "otlp-test-model";

fn gate(test: &str) -> bool {
    prereq::agent_test(test) && prereq::check(test, otlp::missing_receiver())
}

fn spec(endpoint: Endpoint, scenario: &str) -> RequestSpec {
    let mut s = RequestSpec::new(endpoint, 16).header("X-Scenario", scenario);
    s.model = Some(MODEL.into());
    s.prompt = format!("Tell me about {MARKER}, please.");
    s
}

fn otlp_agent(server_pid: u32, url: &str, extra: &[&str]) -> Agent {
    let mut o = AgentOptions::pid(server_pid);
    o.node = Some("otlp-node".into());
    o.extra_args = ["--otlp-endpoint", url]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    Agent::spawn(&o).unwrap()
}

fn span_for<'a>(spans: &'a [ReceivedSpan], r: &AgentRecord) -> &'a ReceivedSpan {
    let port: u64 = r
        .peer
        .as_deref()
        .and_then(|p| p.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .expect("record has a peer");
    let found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| {
            let a = s.attrs();
            a.get("client.port").and_then(Value::as_u64) == Some(port)
                && a.get("infertap.seq_on_conn").and_then(Value::as_u64)
                    == Some(u64::from(r.seq_on_conn))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one span for {:?} seq {}",
        r.peer,
        r.seq_on_conn
    );
    found[0]
}

/// Events of a span: (name, time, attributes).
fn events(s: &ReceivedSpan) -> Vec<(String, u64, serde_json::Map<String, Value>)> {
    array(&s.span["events"])
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or("").to_owned(),
                as_u64(&e["timeUnixNano"]).unwrap_or(0),
                attributes(&e["attributes"]),
            )
        })
        .collect()
}

#[test]
fn otlp_spans_and_metrics_match_json_lines_and_prometheus() {
    let test = "otlp_spans_and_metrics_match_json_lines_and_prometheus";
    if !gate(test) {
        return;
    }
    let _g = prereq::e2e_lock();
    let receiver = OtlpReceiver::start(0, &[]).unwrap();
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 20, "itl_ms": 4, "tokens": 8, "text": MARKER},
        "scenarios": {
            "chat": {},
            // One gap 20× the others: exactly the slow token (event index 5).
            "slow": {"itl_ms": [3, 3, 3, 3, 80, 3, 3], "tokens": 8},
            "json": {"mode": "json", "ttft_ms": 5},
            "e500": {"mode": "error", "status": 500},
            "e404": {"mode": "error", "status": 404},
            "cut": {"close_after": 3},
        }
    }))
    .unwrap();
    let agent = otlp_agent(
        server.pid(),
        &receiver.url(),
        &[
            "--otlp-interval",
            "1s",
            "--otlp-header",
            "authorization=Bearer otlp-test-token",
            "--otlp-service-name",
            "infertap-e2e",
        ],
    );
    let seqs = vec![
        vec![
            spec(Endpoint::Chat, "chat"),
            spec(Endpoint::Chat, "slow"),
            spec(Endpoint::Completions, "chat"),
            spec(Endpoint::Chat, "json"),
        ],
        vec![
            spec(Endpoint::Chat, "e500"),
            spec(Endpoint::Chat, "e404"),
            spec(Endpoint::Chat, "cut"),
        ],
    ];
    let mut seqs = seqs;
    seqs[0][3].stream = false;
    run_sequences_blocking(server.addr(), seqs).unwrap();
    let recs = agent.wait_records(7, WAIT).unwrap();
    // Let a metrics export happen after the last request, then compare with a scrape.
    std::thread::sleep(Duration::from_millis(1500));
    let prom: Metrics = agent.metrics().unwrap();
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "agent failed:\n{}", exit.log);

    let spans = wait_for(WAIT, "7 spans at the receiver", || {
        receiver.spans().ok().filter(|s| s.len() >= 7)
    })
    .unwrap();
    assert_eq!(spans.len(), recs.len(), "one span per request line");
    for r in &recs {
        let s = span_for(&spans, r);
        let a = s.attrs();
        let ctx = format!("{} {} {:?}: {:#}", r.method, r.path, r.error, s.span);
        // Resource: the traced server's process, our service name and node.
        assert_eq!(s.resource["service.name"], "infertap-e2e", "{ctx}");
        assert_eq!(s.resource["host.name"], "otlp-node", "{ctx}");
        assert_eq!(
            s.resource["process.pid"].as_u64(),
            Some(u64::from(server.pid()))
        );
        assert!(s.resource["infertap.agent.version"].is_string());
        // Times: exactly the JSON line's.
        assert_eq!(
            s.u64_field("startTimeUnixNano"),
            Some(r.start_unix_ns),
            "{ctx}"
        );
        assert_eq!(s.u64_field("endTimeUnixNano"), Some(r.end_unix_ns), "{ctx}");
        assert_eq!(s.span["kind"], "SPAN_KIND_SERVER");
        assert_eq!(
            s.span["traceId"].as_str().map(str::len),
            Some(24),
            "16 bytes, base64"
        );
        assert_eq!(a["http.request.method"], r.method.as_str());
        assert_eq!(a["url.path"], r.path.as_str());
        assert_eq!(a["server.address"], "otlp-node");
        assert_eq!(a["server.port"].as_u64(), Some(u64::from(server.port)));
        if let Some(st) = r.status {
            assert_eq!(a["http.response.status_code"].as_u64(), Some(u64::from(st)));
        }
        // GenAI conventions.
        let op = if r.path.ends_with("/chat/completions") {
            "chat"
        } else {
            "text_completion"
        };
        if r.stream_kind.as_deref() != Some("unknown") {
            assert_eq!(s.span["name"], format!("{op} {MODEL}"), "{ctx}");
            assert_eq!(a["gen_ai.operation.name"], op, "{ctx}");
        }
        assert_eq!(a["gen_ai.request.model"], MODEL, "{ctx}");
        assert_eq!(
            a.get("gen_ai.usage.output_tokens").and_then(Value::as_u64),
            r.output_tokens,
            "{ctx}"
        );
        assert_eq!(
            a.get("gen_ai.usage.input_tokens").and_then(Value::as_u64),
            r.prompt_tokens,
            "{ctx}"
        );
        match &r.finish_reason {
            Some(f) => assert_eq!(a["gen_ai.response.finish_reasons"], json!([f]), "{ctx}"),
            None => assert!(!a.contains_key("gen_ai.response.finish_reasons"), "{ctx}"),
        }
        assert_eq!(a.get("infertap.ttft_ms").and_then(Value::as_f64), r.ttft_ms);
        assert_eq!(
            a.get("infertap.stream_kind").and_then(Value::as_str),
            r.stream_kind.as_deref()
        );
        let ev = events(s);
        let first: Vec<_> = ev
            .iter()
            .filter(|e| e.0 == "infertap.first_token")
            .collect();
        match r.first_token_unix_ns {
            Some(t) if r.ttft_ms.is_some() => {
                assert_eq!(first.len(), 1, "{ctx}");
                assert_eq!(first[0].1, t, "first-token event at the line's first token");
            }
            _ => assert!(first.is_empty(), "{ctx}"),
        }
        // Errors: 5xx and cut-off exchanges are span errors, 4xx is not (HTTP conventions).
        let status = s.span["status"]["code"].as_str();
        match r.error.as_deref() {
            None | Some("http_4xx") => {
                assert_eq!(status, None, "{ctx}");
                assert!(!a.contains_key("error.type"), "{ctx}");
                assert_eq!(a["infertap.outcome"], r.error.as_deref().unwrap_or("ok"));
            }
            Some("http_5xx") => {
                assert_eq!(status, Some("STATUS_CODE_ERROR"), "{ctx}");
                assert_eq!(a["error.type"], "500");
            }
            Some(e) => {
                assert_eq!(status, Some("STATUS_CODE_ERROR"), "{ctx}");
                assert_eq!(a["error.type"], e);
            }
        }
    }
    // The slow token: an event at the 80 ms gap's end, with the gap's size.
    let slow = recs
        .iter()
        .find(|r| r.token_unix_ns.len() == 8 && r.itl_ns().nth(4).unwrap_or(0) > 50_000_000)
        .expect("the slow scenario's record");
    let ev = events(span_for(&spans, slow));
    let slow_ev: Vec<_> = ev.iter().filter(|e| e.0 == "infertap.slow_token").collect();
    assert!(
        slow_ev
            .iter()
            .any(|e| e.1 == slow.token_unix_ns[5] && e.2["infertap.token_index"] == 5),
        "slow-token event at event 5: {slow_ev:#?}"
    );
    assert!(slow_ev.len() <= 5, "bounded per span");
    // Every streamed request with errors in the middle ended up as the right kind of error.
    assert!(recs.iter().any(|r| r.error.as_deref() == Some("http_5xx")));
    assert!(recs.iter().any(|r| r.error.as_deref() == Some("http_4xx")));

    // Auth header on every export.
    let exports = receiver.exports().unwrap();
    assert!(exports
        .iter()
        .all(|e| e.metadata.get("authorization").and_then(Value::as_str)
            == Some("Bearer otlp-test-token")));

    // Metrics: the newest export equals the Prometheus endpoint's series.
    let m = receiver.last_metrics().unwrap().expect("a metrics export");
    let mut compared = 0;
    for (name, metric) in &m {
        if let Some(h) = metric.get("histogram") {
            assert_eq!(
                h["aggregationTemporality"],
                "AGGREGATION_TEMPORALITY_CUMULATIVE"
            );
            for p in array(&h["dataPoints"]) {
                let labels = attributes(&p["attributes"]);
                let l: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or("")))
                    .collect();
                let count = as_u64(&p["count"]).unwrap_or(0);
                assert_eq!(
                    count as f64,
                    prom.sum(&format!("{name}_count"), &l),
                    "{name}{l:?}"
                );
                let buckets: Vec<u64> = array(&p["bucketCounts"])
                    .iter()
                    .map(|b| as_u64(b).unwrap_or(0))
                    .collect();
                assert_eq!(buckets.iter().sum::<u64>(), count, "{name}");
                assert_eq!(buckets.len(), array(&p["explicitBounds"]).len() + 1);
                compared += 1;
            }
        }
    }
    // And the other way round: every histogram series of the endpoint was exported.
    for sample in prom.samples.iter().filter(|s| s.name.ends_with("_count")) {
        let name = sample.name.trim_end_matches("_count");
        let points = array(&m[name]["histogram"]["dataPoints"]);
        assert!(
            points.iter().any(|p| {
                let a = attributes(&p["attributes"]);
                a.len() == sample.labels.len()
                    && sample
                        .labels
                        .iter()
                        .all(|(k, v)| a.get(k) == Some(&json!(v)))
            }),
            "{} {:?} not exported over OTLP",
            sample.name,
            sample.labels
        );
    }
    for name in [
        "infertap_time_to_first_token_seconds",
        "infertap_inter_token_latency_seconds",
        "infertap_time_per_output_token_seconds",
        "infertap_e2e_request_latency_seconds",
        "infertap_request_output_tokens",
    ] {
        assert!(m.contains_key(name), "{name} exported");
    }
    for p in array(&m["infertap_requests_total"]["sum"]["dataPoints"]) {
        let labels = attributes(&p["attributes"]);
        let l: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or("")))
            .collect();
        assert_eq!(
            as_u64(&p["asInt"]).unwrap_or(0) as f64,
            prom.sum("infertap_requests_total", &l),
            "{l:?}"
        );
        compared += 1;
    }
    assert_eq!(m["infertap_requests_total"]["sum"]["isMonotonic"], true);
    assert!(compared >= 8, "{compared} series compared");
    let trace_bytes: usize = exports
        .iter()
        .filter(|e| e.signal == "traces")
        .map(|e| e.raw.len())
        .sum();
    eprintln!(
        "{} spans ({} bytes per span on the wire), {} metrics exports, {compared} metric series equal to Prometheus",
        spans.len(),
        trace_bytes / spans.len(),
        exports.iter().filter(|e| e.signal == "metrics").count()
    );

    // Privacy: the marker was in every prompt and streamed completion, and is nowhere in what
    // the receiver got (decoded JSON or the bytes themselves).
    let recv_text = std::fs::read_to_string(receiver.dir.path().join("exports.jsonl")).unwrap();
    assert!(!recv_text.contains(MARKER));
    let marker = MARKER.as_bytes();
    for e in &exports {
        assert!(
            !e.raw.windows(marker.len()).any(|w| w == marker),
            "marker in an export"
        );
    }
}

#[test]
fn otlp_receiver_down_or_slow_costs_counted_drops_not_the_drain() {
    let test = "otlp_receiver_down_or_slow_costs_counted_drops_not_the_drain";
    if !gate(test) {
        return;
    }
    let _g = prereq::e2e_lock();
    let server = ScriptedServer::start(&json!({
        "default": {"mode": "json", "ttft_ms": 1},
    }))
    .unwrap();
    let batch = |n: usize| {
        let seqs: Vec<Vec<RequestSpec>> = (0..4)
            .map(|_| {
                (0..n / 4)
                    .map(|_| {
                        let mut s = RequestSpec::new(Endpoint::Chat, 4);
                        s.stream = false;
                        s
                    })
                    .collect()
            })
            .collect();
        run_sequences_blocking(server.addr(), seqs).unwrap();
    };
    let counter = |m: &Metrics, reason: &str| {
        m.sum("infertap_events_dropped_total", &[("reason", reason)]) as u64
    };

    // 1. Nothing listens on the endpoint: requests are still written, failures are counted.
    let port = free_port().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let agent = otlp_agent(server.pid(), &url, &["--otlp-interval", "1s"]);
    batch(8);
    agent.wait_records(8, WAIT).unwrap();
    let m = wait_for(WAIT, "counted OTLP export failures", || {
        agent
            .metrics()
            .ok()
            .filter(|m| counter(m, "otlp_export_failed") >= 1)
    })
    .unwrap();
    assert!(
        m.sum(
            "infertap_otlp_exports_total",
            &[("signal", "traces"), ("result", "error")]
        ) >= 1.0
    );
    assert_eq!(agent.healthz().unwrap(), 200);
    // The receiver comes up on that port: later spans get through.
    let receiver = OtlpReceiver::start(port, &[]).unwrap();
    batch(8);
    agent.wait_records(16, WAIT).unwrap();
    let got = wait_for(WAIT, "spans after the receiver came up", || {
        receiver.spans().ok().filter(|s| !s.is_empty())
    })
    .unwrap();
    let m = agent.metrics().unwrap();
    eprintln!(
        "receiver down: {} spans lost to failed exports, {} export errors; after it came up {} spans received",
        counter(&m, "otlp_export_failed"),
        m.sum("infertap_otlp_exports_total", &[("signal", "traces"), ("result", "error")]),
        got.len()
    );
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{}", exit.log);
    drop(receiver);

    // 2. A receiver that takes 3 s to answer each export and a queue of 4 spans: once the first
    //    export is in flight (the receiver logs it before answering), a burst of requests is
    //    still written line by line at once; the spans that do not fit are dropped and counted,
    //    and every span is accounted for.
    let mut slow = OtlpReceiver::start(0, &["--delay-ms", "3000"]).unwrap();
    let agent = otlp_agent(
        server.pid(),
        &slow.url(),
        &["--otlp-queue-size", "4", "--otlp-interval", "0s"],
    );
    batch(4);
    agent.wait_records(4, WAIT).unwrap();
    wait_for(WAIT, "the first export in flight", || {
        slow.exports().ok().filter(|e| !e.is_empty())
    })
    .unwrap();
    let n = 4 + 32;
    batch(32);
    agent.wait_records(n, WAIT).unwrap();
    let (m, received) = wait_for(WAIT, "every span exported or counted", || {
        let m = agent.metrics().ok()?;
        let received = slow.spans().ok()?.len() as u64;
        let accounted = received
            + counter(&m, "otlp_queue_full")
            + counter(&m, "otlp_export_failed")
            + counter(&m, "otlp_rejected");
        (accounted == n as u64).then_some((m, received))
    })
    .unwrap();
    slow.check_alive().unwrap();
    let full = counter(&m, "otlp_queue_full");
    eprintln!(
        "slow receiver: {n} requests, {received} spans received, {full} dropped (queue full)"
    );
    assert!(
        full > 0,
        "a 4-span queue behind a 2 s receiver must overflow"
    );
    assert!(received > 0);
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{}", exit.log);
}

#[test]
fn collector_exports_the_merged_metrics_over_otlp() {
    let test = "collector_exports_the_merged_metrics_over_otlp";
    if !gate(test) || !prereq::check(test, prereq::missing_collector()) {
        return;
    }
    let _g = prereq::e2e_lock();
    let receiver = OtlpReceiver::start(0, &[]).unwrap();
    let grpc = collector_support::free_port().unwrap();
    let collector = CollectorProcess::start(
        grpc,
        &[
            "--otlp-endpoint",
            &receiver.url(),
            "--otlp-interval",
            "1s",
            "--otlp-header",
            "x-tenant=fleet-a",
        ],
    )
    .unwrap();
    let server = ScriptedServer::start(&json!({
        "default": {"ttft_ms": 10, "itl_ms": 3, "tokens": 6},
    }))
    .unwrap();
    let mut o = AgentOptions::pid(server.pid());
    o.node = Some("otlp-fleet-node".into());
    o.collector = Some(format!("http://{grpc}"));
    o.interval = Some("1s".into());
    let agent = Agent::spawn(&o).unwrap();
    let n = 6;
    let seqs = vec![(0..n)
        .map(|_| {
            let mut s = RequestSpec::new(Endpoint::Chat, 6);
            s.model = Some(MODEL.into());
            s
        })
        .collect()];
    run_sequences_blocking(server.addr(), seqs).unwrap();
    agent.wait_records(n, WAIT).unwrap();
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{}", exit.log);
    // Every request merged, then an OTLP export that carries them all.
    wait_for(WAIT, "the requests on the collector", || {
        let m = collector.scrape().ok()?;
        (m.sum("infertap_requests_total", &[]) == n as f64).then_some(())
    })
    .unwrap();
    let requests_in = |m: &serde_json::Map<String, Value>| -> u64 {
        array(&m["infertap_requests_total"]["sum"]["dataPoints"])
            .iter()
            .map(|p| as_u64(&p["asInt"]).unwrap_or(0))
            .sum()
    };
    let m = wait_for(WAIT, "an OTLP export with every request", || {
        receiver
            .last_metrics()
            .ok()
            .flatten()
            .filter(|m| requests_in(m) == n as u64)
    })
    .unwrap();
    let prom = collector.scrape().unwrap();
    let mut compared = 0;
    for (name, metric) in &m {
        let Some(h) = metric.get("histogram") else {
            continue;
        };
        for p in array(&h["dataPoints"]) {
            let labels = attributes(&p["attributes"]);
            assert_eq!(
                labels["node"], "otlp-fleet-node",
                "{name}: identity attributes"
            );
            let l: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or("")))
                .collect();
            assert_eq!(
                prom.get(&format!("{name}_count"), &l),
                Some(as_u64(&p["count"]).unwrap_or(0) as f64),
                "{name}{l:?}"
            );
            compared += 1;
        }
    }
    assert!(
        m.contains_key("infertap_time_to_first_token_seconds"),
        "{:?}",
        m.keys().collect::<Vec<_>>()
    );
    assert!(compared >= 4, "{compared} histogram series compared");
    let exports = receiver.exports().unwrap();
    let e = exports
        .iter()
        .rev()
        .find(|e| e.signal == "metrics")
        .unwrap();
    assert_eq!(e.metadata["x-tenant"], "fleet-a");
    let res = attributes(&e.request["resourceMetrics"][0]["resource"]["attributes"]);
    assert_eq!(res["service.name"], "infertap-collector");
    assert!(
        prom.sum("infertap_collector_otlp_exports_total", &[("result", "ok")]) >= 1.0,
        "export calls counted on the collector's /metrics"
    );
    eprintln!("collector: {compared} histogram series over OTLP equal to its /metrics");
    assert!(collector.terminate().unwrap(), "collector exits cleanly");
}
