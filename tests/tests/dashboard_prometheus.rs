//! The shipped Grafana dashboard and alert rules against a real Prometheus: the real agent traces
//! the real llama.cpp server (llama-cpp-python, SmolLM2-135M) under streaming and non-streaming
//! load and reports to the real collector every second; Prometheus scrapes both at a 1 s interval
//! into a temporary TSDB and loads `collector/alerts/*.rules.yml`. Then every template variable
//! query and every panel query of `collector/grafana/infertap.json` (variables substituted as a
//! user selecting this node and model would) runs through `/api/v1/query`: each must be accepted,
//! and each must return a finite value unless it reads a metric that cannot exist on this machine
//! (`EXEMPT`, by metric-name prefix, with the reason). Every alert rule must evaluate with
//! health `ok`.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use infertap_tests::agent::{Agent, AgentOptions, Collector};
use infertap_tests::load::{run_load_blocking, EndpointMix, LoadConfig};
use infertap_tests::paths::workspace_root;
use infertap_tests::prereq;
use infertap_tests::prometheus::{missing_prometheus, Prometheus};
use infertap_tests::servers::{wait_for, LlamaServer, MODEL_ALIAS};

const NODE: &str = "dash-node-1";

/// Metric-name prefixes whose series cannot exist in this test, with the reason. A panel query
/// that reads any of them must still be accepted by Prometheus but may return nothing.
const EXEMPT: &[(&str, &str)] = &[
    (
        "infertap_gpu_",
        "NVML device gauges: no GPU on this machine",
    ),
    (
        "infertap_request_gpu_busy_",
        "GPU time per request: needs CUDA kernels",
    ),
    (
        "infertap_energy_per_output_token_",
        "GPU energy per token: needs NVML",
    ),
    (
        "infertap_cuda_",
        "CUDA uprobes: llama.cpp runs on the CPU here",
    ),
    (
        "infertap_slow_tokens_",
        "slow-token causes come from the GPU correlator (needs CUDA activity)",
    ),
    (
        "infertap_server_",
        "engine metrics come from the server's /metrics: llama-cpp-python has none",
    ),
    (
        "infertap_collector_remote_write_",
        "the collector runs without --remote-write-url here",
    ),
    (
        "infertap_events_dropped_",
        "counted from an agent's first drop; a healthy run has none",
    ),
    (
        "infertap_collector_rejected_series_",
        "counted from the first rejected series; a healthy run has none",
    ),
];

fn referenced_metrics(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("infertap_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// `expr` with every comparison against a number (`> 0.5`, `>= 0.1`, `< 30`) turned into
/// `>= -Inf`: true for every finite sample, so the result holds exactly the series the rule
/// looks at.
fn open_thresholds(expr: &str) -> String {
    let b = expr.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'>' || b[i] == b'<' {
            let mut j = i + 1;
            if j < b.len() && b[j] == b'=' {
                j += 1;
            }
            let mut k = j;
            while k < b.len() && b[k] == b' ' {
                k += 1;
            }
            let start = k;
            while k < b.len() && (b[k].is_ascii_digit() || b[k] == b'.') {
                k += 1;
            }
            if k > start {
                out.push_str(">= -Inf");
                i = k;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// The dashboard's variables as this test selects them: this node, this model, and "All"
/// (`.*`, the variables' allValue) for the Kubernetes ones, which have no values here.
fn substitute(expr: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "1m")
        .replace("$model_name", MODEL_ALIAS)
        .replace("$namespace", ".*")
        .replace("$node", NODE)
        .replace("$pod", ".*");
    assert!(!out.contains('$'), "unsubstituted variable in {out}");
    out
}

/// (panel title, query) for every target of every panel, rows' nested panels included.
fn panel_queries(dash: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(inner) = p["panels"].as_array() {
            stack.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((p["title"].as_str().unwrap_or("").to_owned(), e.to_owned()));
            }
        }
    }
    out
}

#[test]
fn dashboard_and_alert_rules_on_real_prometheus() {
    let name = "dashboard_and_alert_rules_on_real_prometheus";
    if !prereq::agent_test(name)
        || !prereq::check(name, prereq::missing_real_server())
        || !prereq::check(name, prereq::missing_collector())
        || !prereq::check(name, missing_prometheus())
    {
        return;
    }
    let _g = prereq::e2e_lock();
    let t0 = Instant::now();
    let root = workspace_root();
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("collector/grafana/infertap.json")).unwrap(),
    )
    .unwrap();
    let mut rule_files: Vec<String> = std::fs::read_dir(root.join("collector/alerts"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".rules.yml"))
        .map(|p| p.display().to_string())
        .collect();
    rule_files.sort();
    assert!(!rule_files.is_empty());

    let server = LlamaServer::start(2).unwrap();
    let collector = Collector::spawn().unwrap();
    let mut opts = AgentOptions::pid(server.pid());
    opts.collector = Some(collector.url());
    opts.interval = Some("1s".into());
    opts.node = Some(NODE.into());
    let agent = Agent::spawn(&opts).unwrap();

    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\nscrape_configs:\n  - job_name: infertap-agent\n    static_configs: [{{targets: ['{}']}}]\n  - job_name: infertap-collector\n    static_configs: [{{targets: ['{}']}}]\n",
        rule_files
            .iter()
            .map(|f| format!("  - '{f}'"))
            .collect::<Vec<_>>()
            .join("\n"),
        agent.metrics_addr,
        collector.metrics_addr,
    );
    let prom = Prometheus::start(&config).unwrap();
    let log = |what: &str| eprintln!("[{:5.1}s] {what}", t0.elapsed().as_secs_f64());
    log("server, agent, collector and prometheus up");

    // A TLS handshake on the serving port: the agent stops tracing that connection and counts
    // it (the untraced-connections panel).
    {
        let mut s = std::net::TcpStream::connect(server.addr()).unwrap();
        // A ClientHello record's header (handshake, TLS 1.0 record version) and the start of
        // its body.
        s.write_all(&[
            0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03,
        ])
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The server answers with an error or closes: either way it has read the bytes.
        let _ = s.read(&mut [0u8; 512]);
    }

    // Requests the server refuses (messages not a list: a validation error) so the error panels
    // and the error-rate rule have failures (an outcome other than ok) to divide: one before the
    // load creates the series, one after it makes it grow (a counter's first value is no rate).
    let refuse = || {
        let mut s = std::net::TcpStream::connect(server.addr()).unwrap();
        let body = format!("{{\"model\": \"{MODEL_ALIAS}\", \"messages\": 5}}");
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            server.addr(),
            body.len()
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        let status: u16 = answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        assert!(
            (400..600).contains(&status),
            "refused request answered {answer:?}"
        );
    };
    refuse();

    // Non-streaming requests (their responses carry usage: prompt tokens) before and after
    // streaming load on both endpoints: the prompt-token counter exists before it grows.
    let mut plain = LoadConfig::new(server.addr());
    plain.model = Some(MODEL_ALIAS.into());
    plain.max_tokens = 4;
    plain.stream = false;
    plain.requests = Some(2);
    let mut client = run_load_blocking(&plain).unwrap();
    let mut cfg = LoadConfig::new(server.addr());
    cfg.model = Some(MODEL_ALIAS.into());
    cfg.concurrency = 2;
    cfg.requests = None;
    cfg.duration = Some(Duration::from_secs(20));
    cfg.max_tokens = 16;
    cfg.endpoint = EndpointMix::Mixed;
    client.extend(run_load_blocking(&cfg).unwrap());
    refuse();
    let refused = 2;
    client.extend(run_load_blocking(&plain).unwrap());
    assert!(
        client
            .iter()
            .all(|c| c.error.is_none() && c.status == Some(200)),
        "{client:#?}"
    );
    log(&format!(
        "{} requests done, {refused} refused",
        client.len()
    ));

    // Every request reached Prometheus through the collector.
    let total = (client.len() + refused) as f64;
    let counted = |job: &str| {
        prom.query(&format!(
            "sum(infertap_requests_total{{job=\"{job}\", node=~\"{NODE}|\"}})"
        ))
        .ok()
        .and_then(|v| v.first().map(|s| s.value))
        .unwrap_or(0.0)
    };
    wait_for(
        Duration::from_secs(30),
        "all requests in Prometheus",
        || {
            (counted("infertap-collector") >= total && counted("infertap-agent") >= total)
                .then_some(())
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: collector {} agent {} of {total}\ntargets {:?}",
            counted("infertap-collector"),
            counted("infertap-agent"),
            prom.targets()
        )
    });
    for (url, health, err) in prom.targets().unwrap() {
        assert_eq!(health, "up", "{url}: {err}");
    }
    log("every request counted by Prometheus");

    // The template variables list this node and model.
    let mut problems = Vec::new();
    for v in dash["templating"]["list"].as_array().unwrap() {
        let Some(q) = v["definition"].as_str() else {
            continue;
        };
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {q} is not label_values(selector, label)"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let values = prom
            .label_values(label.trim(), &substitute(selector.trim()))
            .unwrap();
        let want = match v["name"].as_str().unwrap() {
            "node" => Some(NODE),
            "model_name" => Some(MODEL_ALIAS),
            // Kubernetes labels: none off Kubernetes.
            _ => None,
        };
        if let Some(w) = want {
            if !values.iter().any(|x| x == w) {
                problems.push(format!("variable {q}: {values:?} lacks {w}"));
            }
        }
    }

    // Every panel query: accepted; data unless exempt.
    let queries = panel_queries(&dash);
    let mut used_exemptions = BTreeSet::new();
    let (mut with_data, mut exempt) = (0, 0);
    for (title, expr) in &queries {
        let q = substitute(expr);
        let res = match prom.query(&q) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{title}: {e:#}"));
                continue;
            }
        };
        let metrics = referenced_metrics(expr);
        let why: Vec<_> = EXEMPT
            .iter()
            .filter(|(p, _)| metrics.iter().any(|m| m.starts_with(p)))
            .collect();
        if !why.is_empty() {
            exempt += 1;
            used_exemptions.extend(why.iter().map(|(p, _)| *p));
            eprintln!(
                "exempt  {title}: {} series ({})",
                res.len(),
                why.iter().map(|(_, r)| *r).collect::<Vec<_>>().join("; ")
            );
            continue;
        }
        if res.iter().any(|s| s.value.is_finite()) {
            with_data += 1;
            eprintln!(
                "data    {title}: {} series, e.g. {:?} = {}",
                res.len(),
                res[0].labels,
                res[0].value
            );
        } else {
            problems.push(format!("{title}: no finite value from {q}: {res:?}"));
        }
    }
    for (p, _) in EXEMPT {
        if !used_exemptions.contains(p) {
            problems.push(format!(
                "exemption {p} is used by no panel query: remove it"
            ));
        }
    }
    log(&format!(
        "{} panel queries: {with_data} with data, {exempt} exempt",
        queries.len()
    ));

    // Every alert rule evaluated without error.
    let n_rules = rule_files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .matches("- alert:")
                .count()
        })
        .sum::<usize>();
    let rules = wait_for(Duration::from_secs(20), "every rule evaluated", || {
        prom.rules().ok().filter(|r| {
            r.len() == n_rules
                && r.iter()
                    .all(|(_, r)| r.health != "unknown" && !r.last_evaluation.starts_with("0001"))
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:#?}\n{}", prom.rules(), prom.log()));
    for (group, r) in &rules {
        assert_eq!(r.kind, "alerting", "{group}/{}", r.name);
        if r.health != "ok" {
            problems.push(format!(
                "rule {group}/{} ({:?}): health {} {:?}",
                r.name,
                r.labels.get("severity"),
                r.health,
                r.last_error
            ));
        }
    }
    // With every threshold (and the traffic floor) opened up, each rule whose metrics exist here
    // selects live series: its metric names, labels and grouping match what agent and collector
    // export (a wrong label would leave an alert that can never fire).
    let mut shaped = 0;
    for (group, r) in &rules {
        let metrics = referenced_metrics(&r.query);
        if EXEMPT
            .iter()
            .any(|(p, _)| metrics.iter().any(|m| m.starts_with(p)))
        {
            continue;
        }
        let open = open_thresholds(&r.query);
        match prom.query(&open) {
            Ok(v) if v.iter().any(|s| s.value.is_finite()) => shaped += 1,
            Ok(v) => problems.push(format!(
                "rule {group}/{} selects no live series: {open} -> {v:?}",
                r.name
            )),
            Err(e) => problems.push(format!("rule {group}/{}: {e:#}", r.name)),
        }
    }
    log(&format!(
        "{shaped} rules select live series with their thresholds opened"
    ));

    let active: Vec<_> = rules
        .iter()
        .filter(|(_, r)| r.state.as_deref() != Some("inactive"))
        .map(|(_, r)| format!("{} {:?} {:?}", r.name, r.labels.get("severity"), r.state))
        .collect();
    log(&format!(
        "{} rules evaluated ok; pending or firing under this load: {active:?}",
        rules.len()
    ));

    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(with_data > exempt, "{with_data} with data, {exempt} exempt");
    drop(prom);
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{:?}\n{}", exit.status, exit.log);
    log("done");
}
