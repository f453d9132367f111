//! The Grafana dashboard and the alert rules shipped with the collector reference only metrics
//! that exist (so a rename cannot silently break them): the shared schema's, and the
//! collector's own self-metrics.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use infertap_collector::remote_write::RemoteWriteMetrics;
use infertap_collector::{CollectorConfig, Fleet};
use infertap_proto::schema;

/// Metrics the dashboard and the rules use that other issue-8 work adds in parallel: NVML GPU
/// gauges moving into `proto/src/schema.rs`, the engine metrics the agent re-exports from the
/// server's `/metrics` (`infertap_server_*`), and the collector's remote-write self-metrics.
/// Each entry goes once its name is known; `pending_names_are_not_known_yet` fails on a stale one.
const PENDING: &[&str] = &[];

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `infertap_*` identifier in `text`.
fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("infertap_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.insert(text[start..end].to_owned());
        i = end;
    }
    out
}

/// Names of the collector's own metrics, as exposed: what a default collector encodes, plus the
/// family names registered in its sources (some register only when their feature is configured).
/// Counters are listed with `_total` as Prometheus shows them.
fn collector_metric_names() -> BTreeSet<String> {
    let mut text = Fleet::new(CollectorConfig::default())
        .encode_openmetrics()
        .expect("collector encodes its metrics");
    // Remote-write self-metrics are registered only with `--remote-write-url`: take their
    // names from the same registration.
    // An empty family encodes nothing, so give each one series.
    let rw = RemoteWriteMetrics::default();
    let l = vec![("url".to_owned(), "x".to_owned())];
    for f in [&rw.enqueued, &rw.sent, &rw.dropped, &rw.retries] {
        drop(f.get_or_create(&l));
    }
    for f in [&rw.queue_bytes, &rw.pending_samples] {
        drop(f.get_or_create(&l));
    }
    for f in [&rw.lag_seconds, &rw.last_success] {
        drop(f.get_or_create(&l));
    }
    drop(rw.send_duration.get_or_create(&l));
    let mut registry = prometheus_client::registry::Registry::default();
    rw.register(&mut registry);
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("remote-write metrics encode");
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                out.insert(match kind {
                    "counter" => format!("{name}_total"),
                    _ => name.to_owned(),
                });
            }
        }
    }
    let mut src = Vec::new();
    rust_sources(&manifest_dir().join("src"), &mut src);
    for path in src {
        let text = std::fs::read_to_string(&path).unwrap();
        for lit in text.split('"').skip(1).step_by(2) {
            if lit.starts_with("infertap_collector_")
                && lit
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                out.insert(lit.to_owned());
                out.insert(format!("{lit}_total"));
            }
        }
    }
    out
}

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn known(name: &str, collector: &BTreeSet<String>) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    schema::ALL.iter().any(|d| d.name == name || d.name == base)
        || collector.contains(name)
        || collector.contains(base)
}

/// The rule files and their unit tests, relative to the crate.
fn alert_files() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(manifest_dir().join("alerts"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yml"))
        .map(|n| format!("alerts/{n}"))
        .collect();
    v.sort();
    v
}

fn check(path: &str, collector: &BTreeSet<String>) {
    let text = std::fs::read_to_string(manifest_dir().join(path)).unwrap();
    let names = referenced_metrics(&text);
    assert!(!names.is_empty(), "{path} references no metric");
    let unknown: Vec<_> = names
        .iter()
        .filter(|n| !known(n, collector) && !PENDING.contains(&n.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "{path} references unknown metrics: {unknown:?}"
    );
}

#[test]
fn dashboard_uses_known_metrics() {
    let text = std::fs::read_to_string(manifest_dir().join("grafana/infertap.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("dashboard is valid JSON");
    assert!(v["panels"].as_array().is_some_and(|p| p.len() >= 10));
    check("grafana/infertap.json", &collector_metric_names());
}

#[test]
fn alert_rules_use_known_metrics() {
    let collector = collector_metric_names();
    let files = alert_files();
    assert!(files.iter().any(|f| f.ends_with(".rules.yml")), "{files:?}");
    for f in &files {
        check(f, &collector);
    }
}

#[test]
fn pending_names_are_used() {
    let mut used = BTreeSet::new();
    for f in alert_files()
        .iter()
        .map(String::as_str)
        .chain(["grafana/infertap.json"])
    {
        used.extend(referenced_metrics(
            &std::fs::read_to_string(manifest_dir().join(f)).unwrap(),
        ));
    }
    let unused: Vec<_> = PENDING.iter().filter(|n| !used.contains(**n)).collect();
    assert!(
        unused.is_empty(),
        "PENDING lists names nothing uses: {unused:?}"
    );
}

#[test]
fn pending_names_are_not_known_yet() {
    let collector = collector_metric_names();
    let landed: Vec<_> = PENDING.iter().filter(|n| known(n, &collector)).collect();
    assert!(
        landed.is_empty(),
        "these names exist now: remove them from PENDING in collector/tests/assets.rs: {landed:?}"
    );
}

/// What Grafana 10/11 needs to import the dashboard as it is: every query on the `${datasource}`
/// variable, the template variables the panels use, unique panel ids, unique refIds per panel,
/// panels inside the 24-column grid without overlapping, and the four rows.
#[test]
fn dashboard_is_importable() {
    let text = std::fs::read_to_string(manifest_dir().join("grafana/infertap.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(d["uid"]
        .as_str()
        .is_some_and(|u| !u.is_empty() && u.len() <= 40));
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    let ds = var("datasource").expect("a datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in ["node", "model_name", "namespace", "pod"] {
        let v = var(name).unwrap_or_else(|| panic!("no {name} variable"));
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{name}");
        assert!(
            v["definition"].as_str().is_some_and(
                |q| q.starts_with("label_values(") && q.ends_with(&format!(", {name})"))
            ),
            "{name}: {}",
            v["definition"]
        );
        assert_eq!(v["includeAll"], true, "{name}");
        assert_eq!(v["multi"], true, "{name}");
        // "All" must also match series without the label (agents scraped directly have no
        // node; off Kubernetes there is no namespace or pod).
        assert_eq!(v["allValue"], ".*", "{name}");
    }

    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut rows = Vec::new();
    let mut cells: BTreeSet<(u64, u64)> = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{title} overlaps another panel at {cx},{cy}"
                );
            }
        }
        if p["type"] == "row" {
            rows.push(title.to_owned());
            continue;
        }
        assert!(
            ["timeseries", "table", "stat", "gauge"].contains(&p["type"].as_str().unwrap()),
            "{title}: type {}",
            p["type"]
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                refs.insert(t["refId"].as_str().unwrap()),
                "{title}: duplicate refId"
            );
            let expr = t["expr"].as_str().unwrap();
            // Only the dashboard's own variables and Grafana's rate interval.
            let mut rest = expr;
            while let Some(i) = rest.find('$') {
                let tail = &rest[i + 1..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = &tail[..end];
                assert!(
                    name == "__rate_interval" || var(name).is_some(),
                    "{title}: unknown variable ${name} in {expr}"
                );
                rest = &tail[end..];
            }
        }
    }
    assert_eq!(
        rows,
        [
            "User experience",
            "GPU health",
            "KV cache and scheduling",
            "Diagnostics"
        ]
    );
}
