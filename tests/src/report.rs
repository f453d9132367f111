//! Summaries shared by the demo and bench drivers: latency percentiles and /proc usage.

use serde::Serialize;

use crate::agent::AgentRecord;
use crate::client::ClientRecord;
use crate::compare::percentile;

/// p50/p90/p99/max of one latency, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(values: &[f64]) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            n: values.len(),
            p50: percentile(values, 50.0),
            p90: percentile(values, 90.0),
            p99: percentile(values, 99.0),
            max: values.iter().cloned().fold(f64::MIN, f64::max),
        }
    }
}

/// TTFT, ITL, TPOT and E2E distributions of one side's view.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencySummary {
    pub requests: usize,
    pub errors: usize,
    pub output_tokens: u64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub e2e_ms: Percentiles,
}

fn ns_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

pub fn summarize_agent(recs: &[AgentRecord]) -> LatencySummary {
    let ok: Vec<&AgentRecord> = recs.iter().filter(|r| r.error.is_none()).collect();
    LatencySummary {
        requests: recs.len(),
        errors: recs.len() - ok.len(),
        output_tokens: ok.iter().filter_map(|r| r.output_tokens).sum(),
        ttft_ms: Percentiles::of(&ok.iter().filter_map(|r| r.ttft_ms).collect::<Vec<_>>()),
        itl_ms: Percentiles::of(
            &ok.iter()
                .flat_map(|r| r.itl_ns().map(ns_ms))
                .collect::<Vec<_>>(),
        ),
        tpot_ms: Percentiles::of(&ok.iter().filter_map(|r| r.tpot_ms).collect::<Vec<_>>()),
        e2e_ms: Percentiles::of(
            &ok.iter()
                .map(|r| ns_ms(r.end_unix_ns.saturating_sub(r.start_unix_ns)))
                .collect::<Vec<_>>(),
        ),
    }
}

pub fn summarize_client(recs: &[ClientRecord]) -> LatencySummary {
    let ok: Vec<&ClientRecord> = recs.iter().filter(|r| r.error.is_none()).collect();
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|r| r.output_tokens > 1 && r.event_unix_ns.len() > 1)
        .map(|r| {
            let span = r.event_unix_ns.last().unwrap() - r.event_unix_ns[0];
            ns_ms(span) / (r.output_tokens - 1) as f64
        })
        .collect();
    LatencySummary {
        requests: recs.len(),
        errors: recs.len() - ok.len(),
        output_tokens: ok.iter().map(|r| r.output_tokens).sum(),
        ttft_ms: Percentiles::of(&ok.iter().filter_map(|r| r.ttft_ms).collect::<Vec<_>>()),
        itl_ms: Percentiles::of(
            &ok.iter()
                .flat_map(|r| r.itl_ns().map(ns_ms))
                .collect::<Vec<_>>(),
        ),
        tpot_ms: Percentiles::of(&tpot),
        e2e_ms: Percentiles::of(&ok.iter().map(|r| r.e2e_ms).collect::<Vec<_>>()),
    }
}

/// Prints agent and client distributions side by side.
pub fn print_latency_table(agent: &LatencySummary, client: &LatencySummary) {
    println!(
        "{:<8} {:<7} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "metric", "source", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    let rows = [
        ("TTFT", &agent.ttft_ms, &client.ttft_ms),
        ("ITL", &agent.itl_ms, &client.itl_ms),
        ("TPOT", &agent.tpot_ms, &client.tpot_ms),
        ("E2E", &agent.e2e_ms, &client.e2e_ms),
    ];
    for (name, a, c) in rows {
        for (src, p) in [("agent", a), ("client", c)] {
            println!(
                "{:<8} {:<7} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                name, src, p.n, p.p50, p.p90, p.p99, p.max
            );
        }
    }
    println!(
        "requests: agent {} ({} errors), client {} ({} errors); output tokens: agent {}, client {}",
        agent.requests,
        agent.errors,
        client.requests,
        client.errors,
        agent.output_tokens,
        client.output_tokens
    );
}

/// CPU seconds (user+system) and resident memory of a process, from /proc.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ProcUsage {
    pub cpu_s: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

pub fn proc_usage(pid: u32) -> Option<ProcUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcUsage {
        cpu_s: (utime + stime) as f64 / hz,
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

/// Run count and run time (ns) of the loaded eBPF programs named in `names`, summed over their
/// instances (`kernel.bpf_stats_enabled` must be on for run times). Benchmarks take the
/// difference of two readings around a run.
pub fn program_stats(names: &[&str]) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for p in aya::programs::loaded_programs().flatten() {
        let Some(name) = p.name_as_str() else {
            continue;
        };
        if names.contains(&name) {
            let e = out.entry(name.to_owned()).or_insert((0, 0));
            e.0 += p.run_count();
            e.1 += p.run_time().as_nanos() as u64;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_proc_usage() {
        let u = proc_usage(std::process::id()).unwrap();
        assert!(u.rss_kib > 0 && u.peak_rss_kib >= u.rss_kib);
        assert!(u.cpu_s >= 0.0);
    }

    #[test]
    fn client_summary() {
        let r = ClientRecord {
            ttft_ms: Some(10.0),
            e2e_ms: 40.0,
            event_unix_ns: vec![0, 10_000_000, 30_000_000],
            output_tokens: 3,
            ..Default::default()
        };
        let s = summarize_client(&[r]);
        assert_eq!(s.itl_ms.n, 2);
        assert_eq!(s.itl_ms.max, 20.0);
        assert_eq!(s.tpot_ms.p50, 15.0);
        assert_eq!(s.ttft_ms.p50, 10.0);
    }
}
