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

    fn wire_run() -> crate::wire::WireRun {
        use crate::wire::*;
        let resp = |t0: u64| WireResponse {
            status: 200,
            status_line_unix_ns: t0 + 100,
            kind: BodyKind::Sse,
            events: Vec::new(),
            content_unix_ns: vec![t0 + 1_000, t0 + 2_000],
            end_unix_ns: Some(t0 + 3_000),
            complete: true,
            body_bytes: 100,
            usage_tokens: Some(2),
            counted_tokens: 2,
            tokens_known: true,
        };
        let ex = |seq: u32, t0: u64| WireExchange {
            seq_on_conn: seq,
            request_first_unix_ns: t0,
            request_first_accepted_unix_ns: t0,
            request_last_unix_ns: t0 + 10,
            request_bytes: 50,
            request_complete: true,
            request_target: "POST /v1/chat/completions".into(),
            response: Some(resp(t0)),
        };
        WireRun {
            port: 8000,
            stats: Default::default(),
            conns: vec![WireConn {
                client: "[::1]:5000".into(),
                server: "[::1]:8000".into(),
                syn_unix_ns: Some(500),
                syn_count: 1,
                synack_unix_ns: Some(510),
                established_unix_ns: Some(520),
                client_fin_unix_ns: None,
                server_fin_unix_ns: None,
                rst_unix_ns: None,
                request_bytes: 100,
                response_bytes: 200,
                retransmitted_bytes: 0,
                out_of_order_segments: 0,
                unfilled_bytes: 0,
                exchanges: vec![ex(0, 1_000), ex(1, 10_000), ex(2, 20_000)],
            }],
        }
    }

    #[test]
    fn metrics_scrapes_on_the_wire_are_not_judged() {
        let mut wire = wire_run();
        wire.conns[0].exchanges[2].request_target = "GET /metrics".into();
        let a = |seq: u32, t0: u64| AgentRecord {
            peer: Some("[::1]:5000".into()),
            seq_on_conn: seq,
            start_unix_ns: t0,
            first_token_unix_ns: Some(t0 + 1_000),
            token_unix_ns: vec![t0 + 1_000, t0 + 2_000],
            end_unix_ns: t0 + 3_000,
            output_tokens: Some(2),
            ..Default::default()
        };
        let f = wire_fidelity(&[a(0, 1_000), a(1, 10_000)], &wire, None);
        assert_eq!(
            (
                f.wire_exchanges,
                f.metrics_scrapes,
                f.joined,
                f.unmatched_wire
            ),
            (2, 1, 2, 0)
        );
        // An agent record for the scrape is one the agent should not have made.
        let f = wire_fidelity(&[a(0, 1_000), a(1, 10_000), a(2, 20_000)], &wire, None);
        assert_eq!((f.joined, f.unmatched_agent), (2, 1));
    }

    #[test]
    fn wire_join_and_errors() {
        let wire = wire_run();
        // seq 0: arrival reported (and ttft_ms counted from it); seq 1: only start (a server
        // read 300 ns late), one token event missing; seq 2: no agent record.
        let a0 = AgentRecord {
            peer: Some("[::1]:5000".into()),
            seq_on_conn: 0,
            start_unix_ns: 1_040,
            arrival_unix_ns: Some(1_040),
            accepted_unix_ns: Some(420),
            first_token_unix_ns: Some(2_050),
            ttft_ms: Some(0.00101),
            token_unix_ns: vec![2_050, 3_020],
            end_unix_ns: 4_000,
            output_tokens: Some(2),
            ..Default::default()
        };
        let a1 = AgentRecord {
            peer: Some("[::1]:5000".into()),
            seq_on_conn: 1,
            start_unix_ns: 10_300,
            first_token_unix_ns: Some(11_000),
            token_unix_ns: vec![11_000],
            end_unix_ns: 13_000,
            output_tokens: Some(1),
            ..Default::default()
        };
        let c0 = ClientRecord {
            local_addr: "[::1]:5000".into(),
            seq_on_conn: 0,
            send_unix_ns: 990,
            first_token_unix_ns: Some(2_100),
            event_unix_ns: vec![2_100, 3_200],
            ..Default::default()
        };
        let agent = [a0, a1];
        let f = wire_fidelity(&agent, &wire, Some(&[c0]));
        assert_eq!((f.wire_exchanges, f.joined, f.unmatched_wire), (3, 2, 1));
        assert_eq!((f.unmatched_agent, f.agent_arrival_reported), (0, 1));
        assert_eq!(f.start.max_ns, 300);
        assert_eq!(f.start.n, 2);
        // seq 0: 1010 - 1000; seq 1: (11000 - 10300) - 1000 = -300.
        assert_eq!((f.ttft.median_ns, f.ttft.max_ns), (10, 300));
        assert_eq!((f.event_count_mismatches, f.token_count_mismatches), (1, 1));
        assert_eq!((f.token_time.n, f.token_time.max_ns), (2, 50));
        assert_eq!(f.wire_connect_ms[2], 500.0 / 1e6);
        let c = f.client.as_ref().unwrap();
        assert_eq!(
            (c.joined, c.start.max_ns, c.ttft.max_ns, c.event_time.max_ns),
            (1, 10, 110, 200)
        );
        // Accepted at 420 ns, handshake completed at 520 ns: within the 50 µs tolerance.
        assert_eq!(
            (f.accept_wait_ms[0], f.accepted_before_handshake),
            (-100.0 / 1e6, 0)
        );
        let misses = f.target_misses();
        assert!(misses.iter().any(|m| m.contains("unjoined")), "{misses:?}");
        assert!(
            misses.iter().any(|m| m.contains("mismatches")),
            "{misses:?}"
        );
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
            // The server logs when it read the request: the agent's read time, not its start
            // (the arrival, earlier by the time the request waited unread).
            let read = a.read_unix_ns.unwrap_or(a.start_unix_ns);
            let d = read as i64 - r as i64;
            starts.push(d);
            if d.unsigned_abs() > tol_ns {
                out.problems.push(format!("{who}: read off by {d} ns"));
            }
            if a.start_unix_ns > read {
                out.problems.push(format!(
                    "{who}: start {} after the read {read}",
                    a.start_unix_ns
                ));
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

/// The agent's start of a request: `arrival_unix_ns` when it reports one, else `start_unix_ns`
/// (which becomes the arrival once the agent measures it).
pub fn agent_start_ns(a: &AgentRecord) -> u64 {
    a.arrival_unix_ns.unwrap_or(a.start_unix_ns)
}

/// The agent's TTFT in ns: its reported `ttft_ms` (what dashboards see), else first token − start.
pub fn agent_ttft_ns(a: &AgentRecord) -> Option<i64> {
    match a.ttft_ms {
        Some(ms) => Some((ms * 1e6).round() as i64),
        None => a
            .first_token_unix_ns
            .map(|f| f as i64 - agent_start_ns(a) as i64),
    }
}

/// A client's stopwatch held against the wire (what a benchmark client adds on its own).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClientVsWire {
    pub joined: usize,
    /// Client send − wire request first byte.
    pub start: ErrorStats,
    /// Client TTFT (send → first content event read) − wire TTFT.
    pub ttft: ErrorStats,
    /// Client read of each content event − its wire time.
    pub event_time: ErrorStats,
}

/// Agent records judged against the wire. Signed errors are agent minus wire.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WireFidelity {
    /// Exchanges on the wire with a response.
    pub wire_exchanges: usize,
    pub agent_records: usize,
    pub joined: usize,
    /// Agent records with no wire exchange (peer, seq_on_conn).
    pub unmatched_agent: usize,
    /// Wire exchanges with a response but no agent record.
    pub unmatched_wire: usize,
    /// `GET /metrics` exchanges on the wire: the agent's own reads of the engine's metrics
    /// endpoint (the tests' clients never ask for it), which it does not report as requests.
    /// Not judged; an agent record for one counts in `unmatched_agent`.
    pub metrics_scrapes: usize,
    /// Joined records in which the agent reported `arrival_unix_ns`.
    pub agent_arrival_reported: usize,
    /// Agent start (arrival, else start) − packet carrying the request's first byte (the
    /// transmission the server accepted, see `WireExchange::request_first_accepted_unix_ns`).
    pub start: ErrorStats,
    /// Agent TTFT − wire TTFT (first content event's packet − request's first byte, accepted
    /// transmission).
    pub ttft: ErrorStats,
    /// Agent `token_unix_ns[i]` − packet completing content event i (where counts agree).
    pub token_time: ErrorStats,
    /// Agent end − wire end of the response body.
    pub end: ErrorStats,
    pub event_count_mismatches: usize,
    pub token_count_mismatches: usize,
    /// Wire TTFT of every exchange (the load they were under), ms: median, p99, max.
    pub wire_ttft_ms: [f64; 3],
    /// Wire time from the client's SYN to the request's first byte for first requests on a
    /// connection (connect time, including any SYN retransmit), ms: median, p99, max.
    pub wire_connect_ms: [f64; 3],
    /// First requests on a connection whose agent record has `accepted_unix_ns`: agent accept −
    /// wire handshake completion (the client's ACK of the SYN-ACK), ms (median, p99, max): the
    /// accept-queue wait as the agent reports it.
    pub accept_wait_ms: [f64; 3],
    /// Of those, accepts the agent dates more than 50 µs before the handshake completed on the
    /// wire (impossible: a clock or attribution error).
    pub accepted_before_handshake: usize,
    /// Connections whose client sent its SYN more than once (a full accept queue or SYN
    /// backlog dropped it): their requests started late for reasons the server never saw.
    pub conns_with_syn_retransmits: usize,
    /// Bytes sent more than once on the judged port.
    pub retransmitted_bytes: u64,
    /// Requests whose first byte was sent more than than once (the first copy dropped).
    pub requests_resent: usize,
    /// For those: last − first transmission of the first byte, ms (median, p99, max): time
    /// the client lived through that no server-side view can see.
    pub resend_delay_ms: [f64; 3],
    pub client: Option<ClientVsWire>,
    /// The first few disagreements, for the test's message.
    pub problems: Vec<String>,
}

fn ms3(v: &[f64]) -> [f64; 3] {
    if v.is_empty() {
        return [0.0; 3];
    }
    [
        percentile(v, 50.0),
        percentile(v, 99.0),
        percentile(v, 100.0),
    ]
}

const MAX_PROBLEMS: usize = 20;

/// Joins agent records (and, when given, client records) to the wire's exchanges by
/// (client address, sequence on the connection) and measures the errors.
pub fn wire_fidelity(
    agent: &[AgentRecord],
    wire: &crate::wire::WireRun,
    client: Option<&[ClientRecord]>,
) -> WireFidelity {
    let mut by_key: HashMap<(&str, u32), &AgentRecord> = HashMap::new();
    let mut out = WireFidelity {
        agent_records: agent.len(),
        ..Default::default()
    };
    for a in agent {
        match a.peer.as_deref() {
            Some(p) if by_key.insert((p, a.seq_on_conn), a).is_none() => {}
            _ => out.unmatched_agent += 1,
        }
    }
    let clients: HashMap<(&str, u32), &ClientRecord> = client
        .unwrap_or_default()
        .iter()
        .filter(|c| !c.local_addr.is_empty())
        .map(|c| ((c.local_addr.as_str(), c.seq_on_conn), c))
        .collect();
    let (mut start, mut ttft, mut tok, mut end) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut c_start, mut c_ttft, mut c_ev) = (Vec::new(), Vec::new(), Vec::new());
    let (mut wire_ttft, mut connect, mut resend) = (Vec::new(), Vec::new(), Vec::new());
    let mut accept_wait = Vec::new();
    let mut c_joined = 0;
    let problem = |out: &mut WireFidelity, p: String| {
        if out.problems.len() < MAX_PROBLEMS {
            out.problems.push(p);
        }
    };
    for (conn, x) in wire.exchanges() {
        let Some(r) = &x.response else { continue };
        if x.request_target == "GET /metrics" {
            out.metrics_scrapes += 1;
            continue;
        }
        out.wire_exchanges += 1;
        let key = (conn.client.as_str(), x.seq_on_conn);
        let who = format!("{} seq {}", conn.client, x.seq_on_conn);
        let w_first = x.request_first_accepted_unix_ns;
        if w_first != x.request_first_unix_ns {
            resend.push(w_first.saturating_sub(x.request_first_unix_ns) as f64 / 1e6);
        }
        let w_ttft = r.first_content_unix_ns().map(|f| f as i64 - w_first as i64);
        if x.seq_on_conn == 0 {
            if let Some(s) = conn.syn_unix_ns {
                connect.push(x.request_first_unix_ns.saturating_sub(s) as f64 / 1e6);
            }
        }
        if let Some(wt) = w_ttft {
            wire_ttft.push(wt as f64 / 1e6);
        }
        if let Some(c) = clients.get(&key) {
            c_joined += 1;
            c_start.push(c.send_unix_ns as i64 - x.request_first_unix_ns as i64);
            if let (Some(ct), Some(f)) = (c.first_token_unix_ns, r.first_content_unix_ns()) {
                // The client lived through any resend: its reference is the first transmission.
                let wt = f as i64 - x.request_first_unix_ns as i64;
                c_ttft.push((ct as i64 - c.send_unix_ns as i64) - wt);
            }
            if c.event_unix_ns.len() == r.content_unix_ns.len() {
                for (y, w) in c.event_unix_ns.iter().zip(&r.content_unix_ns) {
                    c_ev.push(*y as i64 - *w as i64);
                }
            }
        }
        let Some(a) = by_key.remove(&key) else {
            out.unmatched_wire += 1;
            problem(&mut out, format!("{who}: no agent record"));
            continue;
        };
        out.joined += 1;
        if a.arrival_unix_ns.is_some() {
            out.agent_arrival_reported += 1;
        }
        start.push(agent_start_ns(a) as i64 - w_first as i64);
        if let (0, Some(acc), Some(est)) =
            (x.seq_on_conn, a.accepted_unix_ns, conn.established_unix_ns)
        {
            let d = acc as i64 - est as i64;
            accept_wait.push(d as f64 / 1e6);
            if d < -50_000 {
                out.accepted_before_handshake += 1;
                problem(
                    &mut out,
                    format!(
                        "{who}: accepted {:.3} ms before the handshake",
                        -d as f64 / 1e6
                    ),
                );
            }
        }
        if let Some(wt) = w_ttft {
            match agent_ttft_ns(a) {
                Some(at) => ttft.push(at - wt),
                None => problem(&mut out, format!("{who}: agent has no TTFT")),
            }
        }
        if let Some(we) = r.end_unix_ns {
            end.push(a.end_unix_ns as i64 - we as i64);
        }
        let wire_tokens = r.tokens_known.then(|| r.output_tokens());
        if a.output_tokens != wire_tokens {
            out.token_count_mismatches += 1;
            problem(
                &mut out,
                format!(
                    "{who}: output_tokens {:?} != wire {:?}",
                    a.output_tokens, wire_tokens
                ),
            );
        }
        if a.token_unix_ns.len() != r.content_unix_ns.len() {
            out.event_count_mismatches += 1;
            problem(
                &mut out,
                format!(
                    "{who}: {} token events != wire {}",
                    a.token_unix_ns.len(),
                    r.content_unix_ns.len()
                ),
            );
            continue;
        }
        for (t, w) in a.token_unix_ns.iter().zip(&r.content_unix_ns) {
            tok.push(*t as i64 - *w as i64);
        }
    }
    out.unmatched_agent += by_key.len();
    for (p, s) in by_key.keys().take(MAX_PROBLEMS) {
        problem(
            &mut out,
            format!("{p} seq {s}: agent record not on the wire"),
        );
    }
    out.conns_with_syn_retransmits = wire.conns.iter().filter(|c| c.syn_count > 1).count();
    out.retransmitted_bytes = wire.conns.iter().map(|c| c.retransmitted_bytes).sum();
    out.requests_resent = resend.len();
    out.accept_wait_ms = ms3(&accept_wait);
    out.resend_delay_ms = ms3(&resend);
    out.start = ErrorStats::from_signed(&start);
    out.ttft = ErrorStats::from_signed(&ttft);
    out.token_time = ErrorStats::from_signed(&tok);
    out.end = ErrorStats::from_signed(&end);
    out.wire_ttft_ms = ms3(&wire_ttft);
    out.wire_connect_ms = ms3(&connect);
    if client.is_some() {
        out.client = Some(ClientVsWire {
            joined: c_joined,
            start: ErrorStats::from_signed(&c_start),
            ttft: ErrorStats::from_signed(&c_ttft),
            event_time: ErrorStats::from_signed(&c_ev),
        });
    }
    out
}

/// The targets against the wire.
pub mod wire_targets {
    /// TTFT error median, ns.
    pub const TTFT_MEDIAN_NS: u64 = 100_000;
    /// TTFT error p99, ns.
    pub const TTFT_P99_NS: u64 = 500_000;
    /// Token-time error p99, ns.
    pub const TOKEN_P99_NS: u64 = 100_000;
}

impl WireFidelity {
    /// Every way these figures miss the targets (empty: all met). Joins must be
    /// complete (every wire exchange has its agent record and vice versa).
    pub fn target_misses(&self) -> Vec<String> {
        use wire_targets::*;
        let mut m = Vec::new();
        if self.wire_exchanges == 0 {
            m.push("no exchanges on the wire".into());
        }
        if self.unmatched_wire + self.unmatched_agent > 0 {
            m.push(format!(
                "unjoined: {} wire exchanges without agent record, {} agent records not on the wire",
                self.unmatched_wire, self.unmatched_agent
            ));
        }
        if self.event_count_mismatches + self.token_count_mismatches > 0 {
            m.push(format!(
                "{} event-count and {} token-count mismatches",
                self.event_count_mismatches, self.token_count_mismatches
            ));
        }
        if self.accepted_before_handshake > 0 {
            m.push(format!(
                "{} accepts dated before their handshake completed",
                self.accepted_before_handshake
            ));
        }
        if self.token_time.p99_ns > TOKEN_P99_NS {
            m.push(format!(
                "token-time error p99 {:.3} ms > {:.3} ms",
                self.token_time.p99_ns as f64 / 1e6,
                TOKEN_P99_NS as f64 / 1e6
            ));
        }
        if self.ttft.median_ns > TTFT_MEDIAN_NS {
            m.push(format!(
                "TTFT error median {:.3} ms > {:.3} ms",
                self.ttft.median_ns as f64 / 1e6,
                TTFT_MEDIAN_NS as f64 / 1e6
            ));
        }
        if self.ttft.p99_ns > TTFT_P99_NS {
            m.push(format!(
                "TTFT error p99 {:.3} ms > {:.3} ms",
                self.ttft.p99_ns as f64 / 1e6,
                TTFT_P99_NS as f64 / 1e6
            ));
        }
        m
    }

    /// One line of figures (ms) for logs.
    pub fn summary(&self) -> String {
        let e = |s: &ErrorStats| {
            format!(
                "p50 {:.3} p99 {:.3} max {:.3} mean {:+.3}",
                s.median_ns as f64 / 1e6,
                s.p99_ns as f64 / 1e6,
                s.max_ns as f64 / 1e6,
                s.mean_signed_ns / 1e6
            )
        };
        let mut s = format!(
            "joined {}/{} (agent {}, arrival reported {}) | start {} | TTFT {} | token {} | end {} | \
             mismatches events {} tokens {} | SYN retransmits {} retransmitted bytes {} requests resent {} (ms p50 {:.1} max {:.1}) | wire TTFT ms p50 {:.1} p99 {:.1} max {:.1} | connect ms p50 {:.2} max {:.1} | accept wait ms p50 {:.2} max {:.1} (before handshake {})",
            self.joined,
            self.wire_exchanges,
            self.agent_records,
            self.agent_arrival_reported,
            e(&self.start),
            e(&self.ttft),
            e(&self.token_time),
            e(&self.end),
            self.event_count_mismatches,
            self.token_count_mismatches,
            self.conns_with_syn_retransmits,
            self.retransmitted_bytes,
            self.requests_resent,
            self.resend_delay_ms[0],
            self.resend_delay_ms[2],
            self.wire_ttft_ms[0],
            self.wire_ttft_ms[1],
            self.wire_ttft_ms[2],
            self.wire_connect_ms[0],
            self.wire_connect_ms[2],
            self.accept_wait_ms[0],
            self.accept_wait_ms[2],
            self.accepted_before_handshake,
        );
        if let Some(c) = &self.client {
            s.push_str(&format!(
                " | client vs wire ({}): start {} TTFT {} events {}",
                c.joined,
                e(&c.start),
                e(&c.ttft),
                e(&c.event_time)
            ));
        }
        s
    }
}
