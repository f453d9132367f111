//! The alert rules in `collector/alerts/`: `promtool check rules` accepts every rule file,
//! `promtool test rules` passes every unit test file, and every alert carries a severity, a
//! summary, a description and a `runbook_url` naming an existing section of `docs/runbook.md`,
//! and has unit tests that see it fire at each of its severities and stay quiet.
//!
//! promtool (Debian `prometheus`, installed by `cargo xtask setup`; `PROMTOOL` overrides the
//! path) missing: the promtool tests print `SKIP` locally and fail with `CI=true`, like the
//! end-to-end tests' prerequisites (`tests/src/prereq.rs`, which this crate cannot depend on).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

fn alerts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("alerts")
}

fn files_ending(suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(alerts_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The promtool to run, or `None` after printing why the test is skipped (panics in CI).
fn promtool(test: &str) -> Option<PathBuf> {
    let bin = std::env::var_os("PROMTOOL").map_or_else(|| PathBuf::from("promtool"), PathBuf::from);
    match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => Some(bin),
        res => {
            let why = format!(
                "{} not runnable ({}); `cargo xtask setup` installs it",
                bin.display(),
                match res {
                    Ok(o) => format!("exit {}", o.status),
                    Err(e) => e.to_string(),
                }
            );
            if in_ci() {
                panic!("{test}: prerequisite missing in CI: {why}");
            }
            // Straight to stderr, past the test harness' capture, so it shows for a passing test.
            let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
            None
        }
    }
}

fn run_promtool(bin: &Path, args: &[&str], files: &[PathBuf]) {
    let out = Command::new(bin)
        .args(args)
        .args(files.iter().map(|f| f.file_name().unwrap()))
        .current_dir(alerts_dir())
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?} failed ({}):\n{text}",
        out.status
    );
    // One SUCCESS per file: promtool reports each on its own.
    assert_eq!(
        text.matches("SUCCESS").count(),
        files.len(),
        "promtool {args:?}:\n{text}"
    );
}

#[test]
fn promtool_check_rules() {
    let Some(bin) = promtool("promtool_check_rules") else {
        return;
    };
    let files = files_ending(".rules.yml");
    assert!(!files.is_empty());
    run_promtool(&bin, &["check", "rules"], &files);
}

#[test]
fn promtool_test_rules() {
    let Some(bin) = promtool("promtool_test_rules") else {
        return;
    };
    let files = files_ending("_test.yml");
    assert!(!files.is_empty());
    run_promtool(&bin, &["test", "rules"], &files);
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct TestFile {
    rule_files: Vec<String>,
    tests: Vec<TestCase>,
}

#[derive(Deserialize)]
struct TestCase {
    name: String,
    #[serde(default)]
    alert_rule_test: Vec<AlertTest>,
}

#[derive(Deserialize)]
struct AlertTest {
    alertname: String,
    #[serde(default)]
    exp_alerts: Vec<ExpAlert>,
}

#[derive(Deserialize)]
struct ExpAlert {
    #[serde(default)]
    exp_labels: BTreeMap<String, String>,
}

fn read_yaml<T: for<'de> Deserialize<'de>>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// GitHub's heading anchors: lower-cased, punctuation other than `-` and `_` dropped, spaces
/// turned into `-`.
fn runbook_anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => {
                        Some(c.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// The traffic floor the latency and error rules share: the model's request rate on the node.
const TRAFFIC_FLOOR: &str = "rate(infertap_requests_total[5m])) >= 0.1";

#[test]
fn every_alert_has_severity_runbook_and_unit_tests() {
    let runbook_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runbook.md");
    let runbook = std::fs::read_to_string(&runbook_path).expect("docs/runbook.md");
    let anchors = runbook_anchors(&runbook);

    // alert -> (rules file, severities, whether it has the traffic floor)
    let mut alerts: BTreeMap<String, (String, BTreeSet<String>, bool)> = BTreeMap::new();
    let mut problems = Vec::new();
    let rule_files = files_ending(".rules.yml");
    assert!(!rule_files.is_empty());
    for path in &rule_files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let rf: RuleFile = read_yaml(path);
        for g in &rf.groups {
            for r in &g.rules {
                let Some(name) = &r.alert else {
                    assert!(
                        r.record.is_some(),
                        "{file}/{}: rule without alert or record",
                        g.name
                    );
                    continue;
                };
                let sev = r.labels.get("severity").map(String::as_str).unwrap_or("");
                if !matches!(sev, "warning" | "critical") {
                    problems.push(format!("{name}: severity {sev:?} is not warning|critical"));
                }
                for key in ["summary", "description", "runbook_url"] {
                    if r.annotations.get(key).is_none_or(|v| v.trim().is_empty()) {
                        problems.push(format!("{name}/{sev}: no {key} annotation"));
                    }
                }
                if !r
                    .annotations
                    .get("summary")
                    .is_some_and(|s| s.contains("$value"))
                {
                    problems.push(format!("{name}/{sev}: the summary does not show the value"));
                }
                let url = r
                    .annotations
                    .get("runbook_url")
                    .cloned()
                    .unwrap_or_default();
                match url.strip_prefix("docs/runbook.md#") {
                    Some(a) if anchors.contains(a) => {}
                    _ => problems.push(format!(
                        "{name}: runbook_url {url:?} is not docs/runbook.md#<an existing heading>"
                    )),
                }
                if let Some(f) = &r.for_ {
                    if humantime::parse_duration(f).is_err() {
                        problems.push(format!("{name}/{sev}: bad for: {f:?}"));
                    }
                }
                let e = alerts
                    .entry(name.clone())
                    .or_insert_with(|| (file.clone(), BTreeSet::new(), false));
                if e.0 != file {
                    problems.push(format!("{name} is defined in {} and {file}", e.0));
                }
                if !e.1.insert(sev.to_owned()) {
                    problems.push(format!("{name} has two {sev} rules"));
                }
                e.2 |= r.expr.contains(TRAFFIC_FLOOR);
            }
        }
    }

    // What the unit tests cover: per alert, the severities seen firing, whether a case expects
    // silence, and whether a case named for the traffic floor expects silence.
    #[derive(Default)]
    struct Cover {
        firing: BTreeSet<String>,
        quiet: bool,
        quiet_under_floor: bool,
    }
    let mut cover: BTreeMap<String, Cover> = BTreeMap::new();
    let test_files = files_ending("_test.yml");
    for path in &test_files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let tf: TestFile = read_yaml(path);
        for rf in &tf.rule_files {
            if !alerts_dir().join(rf).is_file() {
                problems.push(format!("{file}: rule file {rf} does not exist"));
            }
        }
        for t in &tf.tests {
            for a in &t.alert_rule_test {
                match alerts.get(&a.alertname) {
                    Some((rules, _, _)) if tf.rule_files.contains(rules) => {}
                    Some((rules, _, _)) => problems.push(format!(
                        "{file}: tests {} but does not load {rules}",
                        a.alertname
                    )),
                    None => problems.push(format!("{file}: tests unknown alert {}", a.alertname)),
                }
                let c = cover.entry(a.alertname.clone()).or_default();
                if a.exp_alerts.is_empty() {
                    c.quiet = true;
                    c.quiet_under_floor |= t.name.contains("traffic floor");
                }
                for e in &a.exp_alerts {
                    if let Some(s) = e.exp_labels.get("severity") {
                        c.firing.insert(s.clone());
                    }
                }
            }
        }
    }
    for (name, (file, sevs, floor)) in &alerts {
        let test_file = file.replace(".rules.yml", "_test.yml");
        if !test_files.iter().any(|p| p.ends_with(&test_file)) {
            problems.push(format!("{file} has no {test_file}"));
        }
        let c = cover.get(name);
        for s in sevs {
            if !c.is_some_and(|c| c.firing.contains(s)) {
                problems.push(format!("{name}: no unit test sees the {s} rule fire"));
            }
        }
        if !c.is_some_and(|c| c.quiet) {
            problems.push(format!(
                "{name}: no unit test sees it stay quiet below the threshold"
            ));
        }
        if *floor && !c.is_some_and(|c| c.quiet_under_floor) {
            problems.push(format!(
                "{name}: has a traffic floor but no unit test named \"... traffic floor ...\" keeps it quiet"
            ));
        }
    }
    // Every runbook section but the introduction's belongs to an alert.
    for h in runbook.lines().filter_map(|l| l.strip_prefix("## ")) {
        if h != "Alertmanager" && !alerts.contains_key(h.trim()) {
            problems.push(format!("docs/runbook.md section {h:?} names no alert"));
        }
    }
    assert!(alerts.len() >= 15, "only {} alerts", alerts.len());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The runbook sends operators to dashboard panels as `*Row → Panel*`: each named row and panel
/// exists on the dashboard, so a renamed panel cannot leave the runbook pointing nowhere.
#[test]
fn runbook_panel_references_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let runbook = std::fs::read_to_string(root.join("../docs/runbook.md")).unwrap();
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("grafana/infertap.json")).unwrap())
            .unwrap();
    let titles: BTreeSet<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    let mut refs = 0;
    let mut missing = Vec::new();
    // Emphasis spans (between single asterisks; `**bold**` keeps the count even), which may
    // wrap across lines within a paragraph.
    let text = runbook.replace('\n', " ");
    for span in text.split('*').skip(1).step_by(2) {
        if !span.contains('→') {
            continue;
        }
        refs += 1;
        for part in span.split('→') {
            let part = part.split_whitespace().collect::<Vec<_>>().join(" ");
            if !titles.contains(part.as_str()) {
                missing.push(format!("{part:?} (in *{span}*)"));
            }
        }
    }
    assert!(refs >= 10, "only {refs} panel references in the runbook");
    assert!(missing.is_empty(), "not on the dashboard: {missing:#?}");
}
