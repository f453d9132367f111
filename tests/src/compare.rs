//! Joins agent records with client records and measures how far apart they are.

use std::collections::HashMap;

use serde::Serialize;

use crate::agent::AgentRecord;
use crate::client::ClientRecord;

/// Agent and client records matched by (client address, sequence on the connection).
pub struct Joined<'a> {
    pub pairs: Vec<(&'a AgentRecord, &'a ClientRecord)>,
    pub agent_only: Vec<&'a AgentRecord>,
    pub client_only: Vec<&'a ClientRecord>,
}

/// Joins on (agent `peer`, `seq_on_conn`) = (client `local_addr`, `seq_on_conn`). Client records
/// without an address (failed connects) are left out of both sides.
pub fn join<'a>(agent: &'a [AgentRecord], client: &'a [ClientRecord]) -> Joined<'a> {
    let mut by_key: HashMap<(&str, u32), &AgentRecord> = HashMap::new();
    let mut agent_only = Vec::new();
    for a in agent {
        match a.peer.as_deref() {
            Some(p) => {
                if let Some(dup) = by_key.insert((p, a.seq_on_conn), a) {
                    agent_only.push(dup);
                }
            }
            None => agent_only.push(a),
        }
    }
    let mut pairs = Vec::new();
    let mut client_only = Vec::new();
    for c in client.iter().filter(|c| !c.local_addr.is_empty()) {
        match by_key.remove(&(c.local_addr.as_str(), c.seq_on_conn)) {
            Some(a) => pairs.push((a, c)),
            None => client_only.push(c),
        }
    }
    agent_only.extend(by_key.into_values());
    Joined {
        pairs,
        agent_only,
        client_only,
    }
}

/// Distribution of absolute errors, in nanoseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ErrorStats {
    pub n: usize,
    pub median_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    /// Mean of the signed errors (client minus agent): a systematic offset.
    pub mean_signed_ns: f64,
}

impl ErrorStats {
    pub fn from_signed(errors: &[i64]) -> ErrorStats {
        if errors.is_empty() {
            return ErrorStats::default();
        }
        let mut abs: Vec<u64> = errors.iter().map(|e| e.unsigned_abs()).collect();
        abs.sort_unstable();
        ErrorStats {
            n: abs.len(),
            median_ns: percentile_sorted(&abs, 50.0),
            p99_ns: percentile_sorted(&abs, 99.0),
            max_ns: *abs.last().unwrap_or(&0),
            mean_signed_ns: errors.iter().map(|&e| e as f64).sum::<f64>() / errors.len() as f64,
        }
    }
}

/// Nearest-rank percentile of sorted values (`q` in 0..=100).
pub fn percentile_sorted<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Percentile of unsorted values.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    percentile_sorted(&v, q)
}

/// How closely the agent's view matches the client's.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Fidelity {
    pub client_requests: usize,
    pub agent_records: usize,
    pub joined: usize,
    pub unmatched_agent: usize,
    pub unmatched_client: usize,
    /// |client TTFT − agent TTFT|.
    pub ttft: ErrorStats,
    /// |client gap − agent gap| for every inter-event gap, where event counts agree.
    pub itl: ErrorStats,
    /// |client arrival − agent emission| of every content event (absolute time points).
    pub event_time: ErrorStats,
    pub token_mismatches: usize,
    pub event_count_mismatches: usize,
}

/// Compares joined records.
pub fn fidelity(agent: &[AgentRecord], client: &[ClientRecord]) -> Fidelity {
    let j = join(agent, client);
    let mut ttft = Vec::new();
    let mut itl = Vec::new();
    let mut ev = Vec::new();
    let mut token_mismatches = 0;
    let mut event_count_mismatches = 0;
    for (a, c) in &j.pairs {
        if let (Some(af), Some(cf)) = (a.first_token_unix_ns, c.first_token_unix_ns) {
            let agent_ttft = af as i64 - a.start_unix_ns as i64;
            let client_ttft = cf as i64 - c.send_unix_ns as i64;
            ttft.push(client_ttft - agent_ttft);
        }
        if a.output_tokens != Some(c.output_tokens) {
            token_mismatches += 1;
        }
        if a.token_unix_ns.len() != c.event_unix_ns.len() {
            event_count_mismatches += 1;
            continue;
        }
        for (x, y) in a.itl_ns().zip(c.itl_ns()) {
            itl.push(y as i64 - x as i64);
        }
        for (x, y) in a.token_unix_ns.iter().zip(&c.event_unix_ns) {
            ev.push(*y as i64 - *x as i64);
        }
    }
    Fidelity {
        client_requests: client.len(),
        agent_records: agent.len(),
        joined: j.pairs.len(),
        unmatched_agent: j.agent_only.len(),
        unmatched_client: j.client_only.len(),
        ttft: ErrorStats::from_signed(&ttft),
        itl: ErrorStats::from_signed(&itl),
        event_time: ErrorStats::from_signed(&ev),
        token_mismatches,
        event_count_mismatches,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_and_fidelity() {
        let a = AgentRecord {
            peer: Some("127.0.0.1:5000".into()),
            seq_on_conn: 1,
            start_unix_ns: 1_000,
            first_token_unix_ns: Some(2_000),
            token_unix_ns: vec![2_000, 3_000],
            output_tokens: Some(2),
            ..Default::default()
        };
        let c = ClientRecord {
            local_addr: "127.0.0.1:5000".into(),
            seq_on_conn: 1,
            send_unix_ns: 900,
            first_token_unix_ns: Some(2_050),
            event_unix_ns: vec![2_050, 3_080],
            output_tokens: 2,
            ..Default::default()
        };
        let other = ClientRecord {
            local_addr: "127.0.0.1:5000".into(),
            seq_on_conn: 0,
            ..Default::default()
        };
        let agent = [a];
        let client = [c, other];
        let f = fidelity(&agent, &client);
        assert_eq!((f.joined, f.unmatched_client, f.unmatched_agent), (1, 1, 0));
        assert_eq!(f.ttft.max_ns, 150);
        assert_eq!(f.itl.max_ns, 30);
        assert_eq!(f.event_time.max_ns, 80);
        assert_eq!(f.token_mismatches, 0);
    }

    #[test]
    fn distance_outside_send_interval() {
        assert_eq!(outside(5, 3, 8), 0);
        assert_eq!(outside(2, 3, 8), -1);
        assert_eq!(outside(10, 3, 8), 2);
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_sorted(&v, 50.0), 50);
        assert_eq!(percentile_sorted(&v, 99.0), 99);
        assert_eq!(percentile_sorted(&v, 100.0), 100);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
    }
}

/// Agent records held against the scripted server's emission log.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EmissionCheck {
    /// Logged exchanges that had an agent record.
    pub matched: usize,
    /// Distance of each agent token time from the server's [before send, after send] interval
    /// of that event (0 when inside), every content event.
    pub event_time: ErrorStats,
    /// |agent start − server's first request byte read|.
    pub start_time: ErrorStats,
    /// Human-readable problems (missing records, count mismatches, times beyond tolerance).
    pub problems: Vec<String>,
}

/// Signed distance of `t` from the interval [lo, hi] (0 inside it).
fn outside(t: u64, lo: u64, hi: u64) -> i64 {
    if t < lo {
        t as i64 - lo as i64
    } else if t > hi {
        t as i64 - hi as i64
    } else {
        0
    }
}

/// Checks that every logged exchange has an agent record (joined by peer and seq_on_conn) with
/// the same status, the same number of content events at the same times (each within `tol_ns`
/// of the interval in which the server's send of that event ran) and the same output token count.
pub fn check_against_emissions(
    agent: &[AgentRecord],
    emissions: &[crate::servers::Emission],
    tol_ns: u64,
) -> EmissionCheck {
    let by_key: HashMap<(&str, u32), &AgentRecord> = agent
        .iter()
        .filter_map(|a| a.peer.as_deref().map(|p| ((p, a.seq_on_conn), a)))
        .collect();
    let mut out = EmissionCheck::default();
    let mut ev = Vec::new();
    let mut starts = Vec::new();
    for e in emissions {
        let Some(a) = by_key.get(&(e.peer.as_str(), e.seq_on_conn)) else {
            out.problems.push(format!(
                "no agent record for {} seq {}",
                e.peer, e.seq_on_conn
            ));
            continue;
        };
        out.matched += 1;
        let who = format!("{} seq {} ({})", e.peer, e.seq_on_conn, e.scenario);
        if a.status != e.status {
            out.problems
                .push(format!("{who}: status {:?} != {:?}", a.status, e.status));
        }
        if let Some(r) = e.request_unix_ns {
            let d = a.start_unix_ns as i64 - r as i64;
            starts.push(d);
            if d.unsigned_abs() > tol_ns {
                out.problems.push(format!("{who}: start off by {d} ns"));
            }
        }
        if let Some(k) = &e.stream_kind {
            if a.stream_kind.as_deref() != Some(k.as_str()) {
                out.problems
                    .push(format!("{who}: stream_kind {:?} != {k}", a.stream_kind));
            }
        }
        if e.completed && e.stream_kind.is_some() && a.finish_reason != e.finish_reason {
            out.problems.push(format!(
                "{who}: finish_reason {:?} != {:?}",
                a.finish_reason, e.finish_reason
            ));
        }
        if e.completed && e.stream_kind.is_some() {
            let source = e
                .usage_output_tokens
                .map(|_| "usage")
                .or(e.tokens_known.then_some("counted"));
            if a.token_count_source.as_deref() != source {
                out.problems.push(format!(
                    "{who}: token_count_source {:?} != {source:?}",
                    a.token_count_source
                ));
            }
        }
        let parallel = e.choice_per_event.iter().any(|&c| c != 0);
        if parallel && a.token_choice != e.choice_per_event {
            out.problems.push(format!(
                "{who}: token_choice {:?} != {:?}",
                a.token_choice, e.choice_per_event
            ));
        }
        if !e.tokens_known {
            if a.output_tokens.is_some() {
                out.problems.push(format!(
                    "{who}: output_tokens {:?} for a shape without tokens",
                    a.output_tokens
                ));
            }
        } else if e.completed && a.output_tokens != Some(e.output_tokens) {
            out.problems.push(format!(
                "{who}: output_tokens {:?} != {}",
                a.output_tokens, e.output_tokens
            ));
        }
        if a.token_unix_ns.len() != e.events_unix_ns.len() {
            out.problems.push(format!(
                "{who}: {} content events != {}",
                a.token_unix_ns.len(),
                e.events_unix_ns.len()
            ));
            continue;
        }
        for (i, (x, y)) in a.token_unix_ns.iter().zip(&e.events_unix_ns).enumerate() {
            let before = e.events_send_start_unix_ns.get(i).copied().unwrap_or(*y);
            let d = outside(*x, before, *y);
            ev.push(d);
            if d.unsigned_abs() > tol_ns {
                out.problems.push(format!("{who}: event {i} off by {d} ns"));
            }
        }
        if let (Some(f), Some(y)) = (a.first_token_unix_ns, e.events_unix_ns.first()) {
            let before = e.events_send_start_unix_ns.first().copied().unwrap_or(*y);
            let d = outside(f, before, *y);
            if d.unsigned_abs() > tol_ns {
                out.problems
                    .push(format!("{who}: first_token off by {d} ns"));
            }
        }
    }
    out.event_time = ErrorStats::from_signed(&ev);
    out.start_time = ErrorStats::from_signed(&starts);
    out
}
