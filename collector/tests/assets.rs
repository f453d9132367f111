//! The Grafana dashboard and the alert rules shipped with the collector reference only metrics
//! that exist in the shared schema (so a rename cannot silently break them).

use std::collections::BTreeSet;

use infertap_proto::schema;

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

fn known(name: &str) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    schema::ALL.iter().any(|d| d.name == name || d.name == base)
}

fn check(path: &str) {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let names = referenced_metrics(&text);
    assert!(!names.is_empty(), "{path} references no metric");
    let unknown: Vec<_> = names.iter().filter(|n| !known(n)).collect();
    assert!(
        unknown.is_empty(),
        "{path} references unknown metrics: {unknown:?}"
    );
}

#[test]
fn dashboard_uses_schema_metrics() {
    let text = std::fs::read_to_string(format!(
        "{}/grafana/infertap.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("dashboard is valid JSON");
    assert!(v["panels"].as_array().is_some_and(|p| p.len() >= 10));
    check("grafana/infertap.json");
}

#[test]
fn alert_rules_use_schema_metrics() {
    check("alerts/infertap.rules.yml");
}
