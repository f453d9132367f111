//! Query-string parsing for the profile endpoints and the web page: `node`, `agent`, `type`,
//! `from`, `to`, `label`, each optional, with errors worded for a 400 answer.

use std::time::Duration;

use infertap_proto::pprof::{LabelFilter, ProfileKind};

use crate::profiles::ProfileQuery;

/// Range used when `from` is missing: the last five minutes.
pub const DEFAULT_RANGE: Duration = Duration::from_secs(300);

/// Decoded `key=value` pairs of a query string (`+` is a space, `%XX` escapes decoded).
pub fn pairs(raw: Option<&str>) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        percent_encoding::percent_decode_str(&s)
            .decode_utf8_lossy()
            .into_owned()
    };
    raw.unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(kv), String::new()),
        })
        .collect()
}

/// A point in time: unix seconds (`1733000000`, fractions allowed), RFC 3339
/// (`2026-12-01T10:00:00Z`, any offset), `now`, or relative to now (`-10m`, `-1h30m`, `now-90s`).
pub fn parse_time(s: &str, now_unix_ns: u64) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() || t == "now" {
        return Ok(now_unix_ns);
    }
    if let Some(rel) = t.strip_prefix("now-").or_else(|| t.strip_prefix('-')) {
        let d = humantime::parse_duration(rel)
            .map_err(|e| format!("{s:?}: bad relative time ({e}); use e.g. -10m or -1h"))?;
        return Ok(now_unix_ns.saturating_sub(d.as_nanos().min(u64::MAX as u128) as u64));
    }
    if t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = t
            .parse()
            .map_err(|_| format!("{s:?}: not a number of unix seconds"))?;
        if !(0.0..=1.8e10).contains(&secs) {
            return Err(format!("{s:?}: unix seconds out of range"));
        }
        return Ok((secs * 1e9) as u64);
    }
    let dt = chrono::DateTime::parse_from_rfc3339(t).map_err(|e| {
        format!("{s:?}: not unix seconds, RFC 3339 (2026-12-01T10:00:00Z) or relative (-10m): {e}")
    })?;
    u64::try_from(dt.timestamp_nanos_opt().unwrap_or(-1))
        .map_err(|_| format!("{s:?}: before 1970 or too far ahead"))
}

/// The parameters shared by `/pprof/profile` and `/ui`.
#[derive(Clone, Debug)]
pub struct Selection {
    pub query: ProfileQuery,
    /// The raw `from`/`to` as given (for forms and links), empty when defaulted.
    pub from_raw: String,
    pub to_raw: String,
}

/// Parses `node` (repeatable), `agent` (repeatable), `type` (cpu|gpu|offcpu, default cpu),
/// `from` (default `to` - 5 min), `to` (default now) and `label=key=value` (repeatable).
/// Empty values count as absent; unknown parameters are refused so typos do not go unnoticed.
pub fn selection(raw: Option<&str>, now_unix_ns: u64) -> Result<Selection, String> {
    selection_from_pairs(pairs(raw), now_unix_ns)
}

/// The default selection (all nodes, cpu, the last five minutes); never fails.
pub fn default_selection(now_unix_ns: u64) -> Selection {
    let to = now_unix_ns.max(DEFAULT_RANGE.as_nanos() as u64);
    Selection {
        query: ProfileQuery {
            nodes: Vec::new(),
            agents: Vec::new(),
            kind: ProfileKind::Cpu,
            from_unix_ns: to - DEFAULT_RANGE.as_nanos() as u64,
            to_unix_ns: to,
            labels: LabelFilter::default(),
        },
        from_raw: String::new(),
        to_raw: String::new(),
    }
}

/// [`selection`] from already decoded pairs.
pub fn selection_from_pairs(
    pairs: Vec<(String, String)>,
    now_unix_ns: u64,
) -> Result<Selection, String> {
    let mut nodes = Vec::new();
    let mut agents = Vec::new();
    let mut kind = ProfileKind::Cpu;
    let mut from_raw = String::new();
    let mut to_raw = String::new();
    let mut labels = Vec::new();
    for (k, v) in pairs {
        if v.is_empty() {
            continue;
        }
        match k.as_str() {
            "node" => nodes.push(v),
            "agent" => agents.push(v),
            "type" => {
                kind = ProfileKind::parse(&v)
                    .ok_or_else(|| format!("type {v:?}: expected cpu, gpu or offcpu"))?
            }
            "from" => from_raw = v,
            "to" => to_raw = v,
            "label" => {
                let (lk, lv) = v
                    .split_once('=')
                    .filter(|(lk, _)| !lk.is_empty())
                    .ok_or_else(|| format!("label {v:?}: expected key=value"))?;
                labels.push((lk.to_owned(), lv.to_owned()));
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (known: node, agent, type, from, to, label)"
                ))
            }
        }
    }
    let to = if to_raw.is_empty() {
        now_unix_ns
    } else {
        parse_time(&to_raw, now_unix_ns).map_err(|e| format!("to: {e}"))?
    };
    let from = if from_raw.is_empty() {
        to.saturating_sub(DEFAULT_RANGE.as_nanos() as u64)
    } else {
        parse_time(&from_raw, now_unix_ns).map_err(|e| format!("from: {e}"))?
    };
    if from >= to {
        return Err(format!(
            "from ({}) must be before to ({})",
            if from_raw.is_empty() {
                "default"
            } else {
                &from_raw
            },
            if to_raw.is_empty() { "now" } else { &to_raw }
        ));
    }
    Ok(Selection {
        query: ProfileQuery {
            nodes,
            agents,
            kind,
            from_unix_ns: from,
            to_unix_ns: to,
            labels: LabelFilter::new(labels),
        },
        from_raw,
        to_raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_583_200 * 1_000_000_000; // 2025-12-01T10:00:00Z

    #[test]
    fn times_in_every_accepted_form() {
        assert_eq!(parse_time("now", NOW), Ok(NOW));
        assert_eq!(parse_time("1764583200", NOW), Ok(NOW));
        assert_eq!(parse_time("1764583200.5", NOW), Ok(NOW + 500_000_000));
        assert_eq!(parse_time("2025-12-01T10:00:00Z", NOW), Ok(NOW));
        assert_eq!(parse_time("2025-12-01T12:00:00+02:00", NOW), Ok(NOW));
        assert_eq!(parse_time("-10m", NOW), Ok(NOW - 600_000_000_000));
        assert_eq!(parse_time("now-1h30m", NOW), Ok(NOW - 5_400_000_000_000));
        for bad in [
            "-10x",
            "yesterday",
            "2025-13-01T00:00:00Z",
            "1e99",
            "99999999999",
        ] {
            assert!(parse_time(bad, NOW).is_err(), "{bad}");
        }
    }

    #[test]
    fn selection_defaults_and_errors() {
        let s = selection(None, NOW).unwrap();
        assert_eq!(s.query.kind, ProfileKind::Cpu);
        assert_eq!(s.query.to_unix_ns, NOW);
        assert_eq!(s.query.from_unix_ns, NOW - 300_000_000_000);
        assert!(s.query.nodes.is_empty() && s.query.labels.is_empty());
        let s = selection(
            Some("node=n1&node=n%202&type=offcpu&from=-1h&to=-30m&label=thread%3Dmain&agent="),
            NOW,
        )
        .unwrap();
        assert_eq!(s.query.nodes, ["n1", "n 2"]);
        assert!(s.query.agents.is_empty(), "empty values are absent");
        assert_eq!(s.query.kind, ProfileKind::OffCpu);
        assert_eq!(s.query.to_unix_ns - s.query.from_unix_ns, 1_800_000_000_000);
        assert_eq!(s.query.labels.labels, [("thread".into(), "main".into())]);
        for (q, want) in [
            ("type=heap", "expected cpu, gpu or offcpu"),
            ("from=-5m&to=-10m", "must be before"),
            ("from=soon", "from: "),
            ("nodes=x", "unknown parameter"),
            ("label=novalue", "expected key=value"),
        ] {
            let e = selection(Some(q), NOW).unwrap_err();
            assert!(e.contains(want), "{q}: {e}");
        }
    }
}
