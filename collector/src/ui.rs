//! `/ui`: one server-rendered page with, per node and model, the TTFT/ITL/E2E percentiles
//! estimated from the merged histograms, and the flame graph (SVG by `inferno`, inline) of the
//! profiles selected by node, type and time range, with plain links and a GET form to change
//! them. No JavaScript of ours; the flame graph's own script adds zoom and search.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Instant;

use axum::http::StatusCode;
use infertap_proto::pprof::{self, ProfileKind};
use infertap_proto::schema::{self, MetricDef};
use infertap_proto::store::HistogramData;

use crate::query::{self, Selection};
use crate::{unix_now_ns, Fleet};

/// Quantiles shown per latency.
const QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];
/// Quick ranges offered as links.
const RANGES: [(&str, &str); 5] = [
    ("5 min", "-5m"),
    ("15 min", "-15m"),
    ("1 h", "-1h"),
    ("6 h", "-6h"),
    ("24 h", "-24h"),
];
/// Parameters the flame graph's script writes into the page URL (zoom, search state).
const FLAMEGRAPH_PARAMS: [&str; 3] = ["x", "y", "s"];

/// HTML-escapes text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value.
fn qv(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Seconds as a latency in ms with sensible precision.
fn ms(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(s) => {
            let m = s * 1e3;
            if m < 1.0 {
                format!("{m:.3}")
            } else if m < 10.0 {
                format!("{m:.2}")
            } else if m < 100.0 {
                format!("{m:.1}")
            } else {
                format!("{m:.0}")
            }
        }
    }
}

fn utc(ns: u64) -> String {
    chrono::DateTime::from_timestamp((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as u32)
        .map_or_else(
            || ns.to_string(),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        )
}

/// Per (node, model): merged histograms of TTFT, ITL, E2E.
type LatencyRows = BTreeMap<(String, String), [Option<HistogramData>; 3]>;

fn latency_rows(fleet: &Fleet, nodes: &[String]) -> LatencyRows {
    let view = fleet.snapshot();
    let defs: [&MetricDef; 3] = [
        &schema::TIME_TO_FIRST_TOKEN,
        &schema::INTER_TOKEN_LATENCY,
        &schema::E2E_REQUEST_LATENCY,
    ];
    let mut rows = LatencyRows::new();
    for (i, def) in defs.iter().enumerate() {
        for (labels, h) in view.histograms(def) {
            let get = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let node = get(schema::LABEL_NODE).unwrap_or_else(|| "(fleet)".into());
            if !nodes.is_empty() && !nodes.contains(&node) {
                continue;
            }
            let model = get(schema::LABEL_MODEL).unwrap_or_default();
            let slot = &mut rows.entry((node, model)).or_default()[i];
            match slot {
                Some(acc) => {
                    // Same schema layout on both sides: cannot fail.
                    let _ = acc.merge(h);
                }
                None => *slot = Some(h.clone()),
            }
        }
    }
    rows
}

/// The flame graph of a merged profile as an inline `<svg>` element.
fn flame_graph(
    profile: &pprof::pb::Profile,
    kind: ProfileKind,
    title: &str,
) -> Result<String, String> {
    // Index 1 is the kind's time in nanoseconds; shown in µs.
    let folded = pprof::fold(profile, 1);
    if folded.is_empty() {
        return Ok(String::new());
    }
    let lines: Vec<String> = folded.iter().map(|(s, v)| format!("{s} {v}")).collect();
    let mut opt = inferno::flamegraph::Options::default();
    opt.title = title.to_owned();
    opt.count_name = "µs".into();
    opt.factor = 1e-3;
    opt.hash = true;
    opt.colors = match kind {
        ProfileKind::Cpu => {
            inferno::flamegraph::Palette::Basic(inferno::flamegraph::color::BasicPalette::Hot)
        }
        ProfileKind::OffCpu => {
            inferno::flamegraph::Palette::Basic(inferno::flamegraph::color::BasicPalette::Blue)
        }
        ProfileKind::Gpu => {
            inferno::flamegraph::Palette::Basic(inferno::flamegraph::color::BasicPalette::Green)
        }
        ProfileKind::SlowTokens => {
            inferno::flamegraph::Palette::Basic(inferno::flamegraph::color::BasicPalette::Red)
        }
    };
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut opt, lines.iter().map(String::as_str), &mut svg)
        .map_err(|e| format!("flame graph: {e}"))?;
    let svg = String::from_utf8(svg).map_err(|e| format!("flame graph: {e}"))?;
    // Inline in HTML: drop the XML declaration and doctype before the <svg> element.
    Ok(match svg.find("<svg") {
        Some(i) => svg[i..].to_owned(),
        None => svg,
    })
}

fn link(sel: &Selection, node: Option<&str>, kind: ProfileKind, from: &str, to: &str) -> String {
    let mut q = format!("type={}", kind.name());
    let nodes: Vec<&str> = match node {
        Some(n) => vec![n],
        None => sel.query.nodes.iter().map(String::as_str).collect(),
    };
    for n in nodes.into_iter().filter(|n| !n.is_empty()) {
        let _ = write!(q, "&node={}", qv(n));
    }
    if !from.is_empty() {
        let _ = write!(q, "&from={}", qv(from));
    }
    if !to.is_empty() {
        let _ = write!(q, "&to={}", qv(to));
    }
    q
}

const STYLE: &str = "
body { font-family: system-ui, sans-serif; margin: 1.2em 2em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; }
h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; }
td.l, th.l { text-align: left; }
form { margin: .6em 0; }
form label { margin-right: 1em; }
nav a { margin-right: .8em; }
.sel { font-weight: bold; }
.err { background: #fee; border: 1px solid #c66; padding: .5em; }
.note { color: #666; font-size: .85em; }
#flamegraph svg { width: 100%; }
";

/// Renders the page for the query string `raw`.
pub(crate) fn page(fleet: &Fleet, raw: Option<&str>) -> (StatusCode, String) {
    let t0 = Instant::now();
    let now = unix_now_ns();
    let filtered: Vec<(String, String)> = query::pairs(raw)
        .into_iter()
        .filter(|(k, _)| !FLAMEGRAPH_PARAMS.contains(&k.as_str()))
        .collect();
    let (status, sel, error) = match query::selection_from_pairs(filtered, now) {
        Ok(s) => (StatusCode::OK, s, None),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            query::default_selection(now),
            Some(e),
        ),
    };
    let store = fleet.profiles();
    let summary = store.summary();
    let rows = latency_rows(fleet, &sel.query.nodes);
    let mut nodes: BTreeSet<String> = summary.iter().map(|s| s.node.clone()).collect();
    nodes.extend(latency_rows(fleet, &[]).keys().map(|(n, _)| n.clone()));
    nodes.remove("(fleet)");

    let mut h = String::with_capacity(64 << 10);
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    h.push_str("<title>infertap collector</title><style>");
    h.push_str(STYLE);
    h.push_str("</style></head><body>\n<h1>infertap collector</h1>\n");
    if let Some(e) = &error {
        let _ = write!(
            h,
            "<p class=\"err\" id=\"error\">Bad parameters: {}</p>",
            esc(e)
        );
    }

    // Selection: links per node and type, quick ranges, and a form for anything else.
    let kind = sel.query.kind;
    let node_sel = sel.query.nodes.first().map(String::as_str);
    h.push_str("<nav id=\"nodes\">Node: ");
    let _ = write!(
        h,
        "<a href=\"/ui?{}\"{}>all</a>",
        esc(&link(&sel, Some(""), kind, &sel.from_raw, &sel.to_raw)),
        if node_sel.is_none() {
            " class=\"sel\""
        } else {
            ""
        }
    );
    for n in &nodes {
        let _ = write!(
            h,
            "<a href=\"/ui?{}\"{}>{}</a>",
            esc(&link(&sel, Some(n), kind, &sel.from_raw, &sel.to_raw)),
            if node_sel == Some(n.as_str()) {
                " class=\"sel\""
            } else {
                ""
            },
            esc(n)
        );
    }
    h.push_str("</nav>\n<nav id=\"types\">Type: ");
    for k in ProfileKind::ALL {
        let _ = write!(
            h,
            "<a href=\"/ui?{}\"{}>{}</a>",
            esc(&link(&sel, None, k, &sel.from_raw, &sel.to_raw)),
            if k == kind { " class=\"sel\"" } else { "" },
            k.name()
        );
    }
    h.push_str("</nav>\n<nav id=\"ranges\">Last: ");
    for (label, from) in RANGES {
        let _ = write!(
            h,
            "<a href=\"/ui?{}\"{}>{label}</a>",
            esc(&link(&sel, None, kind, from, "")),
            if sel.from_raw == from && sel.to_raw.is_empty() {
                " class=\"sel\""
            } else {
                ""
            },
        );
    }
    h.push_str("</nav>\n<form method=\"get\" action=\"/ui\">");
    h.push_str("<label>node <select name=\"node\"><option value=\"\">all</option>");
    for n in &nodes {
        let _ = write!(
            h,
            "<option{}>{}</option>",
            if node_sel == Some(n.as_str()) {
                " selected"
            } else {
                ""
            },
            esc(n)
        );
    }
    h.push_str("</select></label><label>type <select name=\"type\">");
    for k in ProfileKind::ALL {
        let _ = write!(
            h,
            "<option{}>{}</option>",
            if k == kind { " selected" } else { "" },
            k.name()
        );
    }
    let _ = writeln!(
        h,
        "</select></label><label>from <input name=\"from\" size=\"22\" value=\"{}\" placeholder=\"-5m, unix s, RFC 3339\"></label>\
         <label>to <input name=\"to\" size=\"22\" value=\"{}\" placeholder=\"now\"></label>\
         <button type=\"submit\">Show</button></form>",
        esc(&sel.from_raw),
        esc(&sel.to_raw)
    );

    // Latency percentiles.
    h.push_str("<h2>Latency percentiles (ms)</h2>\n");
    if rows.is_empty() {
        h.push_str("<p id=\"no-latency\">No latency histograms received yet.</p>\n");
    } else {
        h.push_str("<table id=\"latency\"><tr><th class=\"l\">node</th><th class=\"l\">model</th><th>requests</th>");
        for name in ["TTFT", "ITL", "E2E"] {
            for q in QUANTILES {
                let _ = write!(h, "<th>{name} p{}</th>", (q * 100.0).round());
            }
        }
        h.push_str("</tr>\n");
        let defs: [&MetricDef; 3] = [
            &schema::TIME_TO_FIRST_TOKEN,
            &schema::INTER_TOKEN_LATENCY,
            &schema::E2E_REQUEST_LATENCY,
        ];
        for ((node, model), hs) in &rows {
            let requests = hs[2].as_ref().map_or(0, |e| e.count);
            let _ = write!(
                h,
                "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{requests}</td>",
                esc(node),
                esc(model)
            );
            for (i, def) in defs.iter().enumerate() {
                for q in QUANTILES {
                    let v = hs[i].as_ref().and_then(|x| x.quantile(def, q));
                    let _ = write!(h, "<td>{}</td>", ms(v));
                }
            }
            h.push_str("</tr>\n");
        }
        h.push_str(
            "</table>\n<p class=\"note\">Since the collector started, from the merged histograms; \
                    quantiles are interpolated inside buckets as PromQL's histogram_quantile does. \
                    Requests: completed requests (E2E count).</p>\n",
        );
    }

    // Flame graph.
    let (from, to) = (sel.query.from_unix_ns, sel.query.to_unix_ns);
    let scope = match sel.query.nodes.as_slice() {
        [] => "all nodes".to_owned(),
        ns => ns.join(", "),
    };
    let _ = writeln!(
        h,
        "<h2 id=\"profile-heading\">{} profile: {} — {} to {}</h2>",
        kind.name(),
        esc(&scope),
        utc(from),
        utc(to)
    );
    let t_merge = Instant::now();
    let merged = store.merge(&sel.query);
    let merge_ms = t_merge.elapsed().as_secs_f64() * 1e3;
    match &merged.profile {
        None => {
            let _ = writeln!(
                h,
                "<p id=\"no-profile\">No {} profiles stored for {} in this range.</p>",
                kind.name(),
                esc(&scope)
            );
        }
        Some(p) => {
            let samples = pprof::total(p, 0);
            let time_ns = pprof::total(p, 1);
            let _ = writeln!(
                h,
                "<p id=\"profile-summary\">{} profiles merged: {samples} samples, {:.3} s of {} time. \
                 <a href=\"/pprof/profile?{}\">Download pprof</a> (for <code>go tool pprof</code>).</p>",
                merged.profiles,
                time_ns as f64 / 1e9,
                kind.name(),
                esc(&link(&sel, None, kind, &sel.from_raw, &sel.to_raw))
            );
            let title = format!("{} — {}", kind.name(), scope);
            match flame_graph(p, kind, &title) {
                Ok(svg) if svg.is_empty() => {
                    h.push_str("<p id=\"no-profile\">The merged profile has no samples.</p>\n")
                }
                Ok(svg) => {
                    h.push_str("<div id=\"flamegraph\">");
                    h.push_str(&svg);
                    h.push_str("</div>\n");
                }
                Err(e) => {
                    let _ = write!(h, "<p class=\"err\">{}</p>", esc(&e));
                }
            }
        }
    }

    // What the store holds.
    h.push_str("<h2>Stored profiles</h2>\n");
    if summary.is_empty() {
        h.push_str("<p id=\"no-stored\">None yet.</p>\n");
    } else {
        h.push_str("<table id=\"stored\"><tr><th class=\"l\">node</th><th class=\"l\">agent</th><th class=\"l\">type</th>\
                    <th>profiles</th><th>samples</th><th>KiB</th><th class=\"l\">from</th><th class=\"l\">to</th></tr>\n");
        for s in &summary {
            let _ = writeln!(
                h,
                "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{:.1}</td>\
                 <td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
                esc(&s.node),
                esc(&s.agent),
                s.kind,
                s.profiles,
                s.samples,
                s.bytes as f64 / 1024.0,
                utc(s.from_unix_ns),
                utc(s.to_unix_ns)
            );
        }
        h.push_str("</table>\n");
    }
    let _ = write!(
        h,
        "<p class=\"note\" id=\"timing\">Rendered in {:.1} ms (merge of {} profiles {:.1} ms). \
         Profiles are kept in memory for {} (at most {} MiB). <a href=\"/pprof/nodes\">/pprof/nodes</a> · \
         <a href=\"/metrics\">/metrics</a></p>\n</body></html>\n",
        t0.elapsed().as_secs_f64() * 1e3,
        merged.profiles,
        merge_ms,
        humantime::format_duration(store.config().retention),
        store.config().max_bytes >> 20
    );
    (status, h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_formats() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(ms(None), "–");
        assert_eq!(ms(Some(0.0005)), "0.500");
        assert_eq!(ms(Some(0.0123)), "12.3");
        assert_eq!(ms(Some(2.5)), "2500");
        assert_eq!(utc(1_764_583_200_000_000_000), "2025-12-01 10:00:00 UTC");
    }
}
