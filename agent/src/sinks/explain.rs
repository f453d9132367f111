//! Text rendering for `infertap explain`: the slowest requests, their slowest tokens and what
//! filled those gaps — on the GPU (busy, sync wait, launch-bound, idle, which kernels and which
//! other requests) and on the CPU (which stacks of the server's processes ran, or where their
//! threads were blocked, during the time to first token and each slow gap). The
//! machine-readable GPU form is [`RequestGpuStats`]'s serde serialisation (flat fields
//! `gpu_busy_ms`, `energy_j`, `slow_tokens`, ...), merged into the request's JSON line.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::gpu::correlate::{Contributor, CorrelatedRequest, RequestGpuStats};
use crate::profiling::stage::{CodeShare, RangeAttribution, RequestAttribution};

/// Which requests count as the slowest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RankBy {
    /// End-to-end latency.
    #[default]
    E2e,
    /// Time to first token.
    Ttft,
    /// Longest single inter-token gap.
    MaxGap,
}

#[derive(Clone, Debug)]
pub struct ExplainOptions {
    pub rank_by: RankBy,
    /// Requests shown.
    pub top_requests: usize,
    /// Slow tokens shown per request.
    pub top_tokens: usize,
    /// Kernel names longer than this are cut (C++ template names run to kilobytes).
    pub max_name_chars: usize,
    /// A GPU source was active: print the GPU lines (without one they would be all zeros).
    pub show_gpu: bool,
    /// Stacks shown per attributed range.
    pub top_stacks: usize,
}

impl Default for ExplainOptions {
    fn default() -> Self {
        ExplainOptions {
            rank_by: RankBy::E2e,
            top_requests: 10,
            top_tokens: 3,
            max_name_chars: 80,
            show_gpu: true,
            top_stacks: 3,
        }
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn rank_key(r: &CorrelatedRequest, by: RankBy) -> u64 {
    match by {
        RankBy::E2e => r.record.e2e_ns(),
        RankBy::Ttft => r.record.ttft_ns().unwrap_or(0),
        RankBy::MaxGap => r.record.itl_ns().max().unwrap_or(0),
    }
}

fn bytes_human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Renders the slowest requests (by `opts.rank_by`) with their GPU side and slowest tokens.
pub fn render_explain(reqs: &[CorrelatedRequest], opts: &ExplainOptions) -> String {
    render_explain_with(reqs, &[], opts)
}

/// Mean number of requests in flight over each request's lifetime (itself included), from the
/// requests alone: what the GPU correlation computes too, for servers without a GPU source.
fn concurrency(reqs: &[CorrelatedRequest]) -> Vec<f64> {
    let spans: Vec<(u64, u64)> = reqs
        .iter()
        .map(|r| (r.record.start_ns, r.record.end_ns.max(r.record.start_ns)))
        .collect();
    spans
        .iter()
        .enumerate()
        .map(|(i, &(s, e))| {
            if e == s {
                return 1.0;
            }
            let others: u64 = spans
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &(os, oe))| oe.min(e).saturating_sub(os.max(s)))
                .sum();
            1.0 + others as f64 / (e - s) as f64
        })
        .collect()
}

/// As [`render_explain`], with the CPU attributions of the profiler (matched to requests by
/// process, connection and sequence).
pub fn render_explain_with(
    reqs: &[CorrelatedRequest],
    cpu: &[RequestAttribution],
    opts: &ExplainOptions,
) -> String {
    let by_key: HashMap<(u32, u64, u32), &RequestAttribution> = cpu
        .iter()
        .map(|a| ((a.pid, a.conn_id, a.seq_on_conn), a))
        .collect();
    let conc = concurrency(reqs);
    let conc_of: HashMap<*const CorrelatedRequest, f64> = reqs
        .iter()
        .zip(conc)
        .map(|(r, c)| (r as *const CorrelatedRequest, c))
        .collect();
    let mut order: Vec<&CorrelatedRequest> = reqs.iter().collect();
    order.sort_by_key(|r| std::cmp::Reverse(rank_key(r, opts.rank_by)));
    order.truncate(opts.top_requests);
    let by = match opts.rank_by {
        RankBy::E2e => "end-to-end latency",
        RankBy::Ttft => "time to first token",
        RankBy::MaxGap => "longest token gap",
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} requests; the {} slowest by {by}:",
        reqs.len(),
        order.len()
    );
    if !cpu.is_empty() || !opts.show_gpu {
        let _ = writeln!(
            out,
            "(CPU: time of the server's processes sampled during each range, on CPU or blocked; GPU lines {})",
            if opts.show_gpu { "from the GPU sources" } else { "omitted: no GPU source was active" }
        );
    }
    for (n, r) in order.iter().enumerate() {
        out.push('\n');
        let rec = &r.record;
        let attr = by_key
            .get(&(rec.pid, rec.conn_id, rec.seq_on_conn))
            .copied();
        let conc = conc_of
            .get(&(*r as *const CorrelatedRequest))
            .copied()
            .unwrap_or(1.0);
        render_one(&mut out, n + 1, r, attr, conc, opts);
    }
    out
}

/// `62% ggml_vec_dot_q4_1_q8_1 ← ggml_compute_forward_mul_mat … LlamaContext.decode
/// (_internals.py:329) [server/python]`.
fn share_line(s: &CodeShare, whole_ns: u64, max_chars: usize) -> String {
    let mut what = s.frames.join(" ← ");
    if let Some(py) = &s.python {
        what.push_str(" … ");
        what.push_str(py);
    }
    let state = match s.state {
        None => String::new(),
        Some(st) => format!(" {}", st.name()),
    };
    format!(
        "{:.0}%{state} {} [{}/{}]",
        pct(s.nanos, whole_ns),
        truncate(&what, max_chars.max(40) * 2),
        s.process,
        s.thread,
    )
}

fn render_cpu_range(
    out: &mut String,
    indent: &str,
    what: &str,
    a: &RangeAttribution,
    opts: &ExplainOptions,
) {
    let _ = writeln!(
        out,
        "{indent}{what}CPU: on-CPU {:.1} ms ({} samples), off-CPU {:.1} ms",
        ms(a.on_cpu_ns),
        a.cpu_samples,
        ms(a.off_cpu_ns)
    );
    if a.on_cpu_ns + a.off_cpu_ns == 0 {
        let _ = writeln!(
            out,
            "{indent}  (no samples of the server's threads in this range)"
        );
        return;
    }
    for (label, list, whole) in [
        ("on-CPU ", &a.on_cpu, a.on_cpu_ns),
        ("off-CPU", &a.off_cpu, a.off_cpu_ns),
    ] {
        for (i, s) in list.iter().take(opts.top_stacks).enumerate() {
            let head = if i == 0 { label } else { "       " };
            let _ = writeln!(
                out,
                "{indent}  {head} {}",
                share_line(s, whole, opts.max_name_chars)
            );
        }
    }
}

fn render_one(
    out: &mut String,
    n: usize,
    r: &CorrelatedRequest,
    cpu: Option<&RequestAttribution>,
    concurrency: f64,
    opts: &ExplainOptions,
) {
    let rec = &r.record;
    let g = &r.gpu;
    let status = rec.status.map_or("-".to_owned(), |s| s.to_string());
    let _ = write!(
        out,
        "#{n} {} {}  conn {}#{} pid {}  status {status}",
        rec.method, rec.path, rec.conn_id, rec.seq_on_conn, rec.pid
    );
    if let Some(m) = &rec.model {
        let _ = write!(out, "  model {m}");
    }
    if let Some(e) = rec.error {
        let _ = write!(out, "  error {}", e.as_str());
    }
    out.push('\n');
    let _ = write!(out, "   e2e {:.1} ms", ms(rec.e2e_ns()));
    if let Some(t) = rec.ttft_ns() {
        let _ = write!(out, "  ttft {:.1} ms", ms(t));
    }
    if let Some(t) = rec.output_tokens {
        let _ = write!(out, "  output tokens {t}");
    }
    if let Some(m) = g.median_itl_ns {
        let _ = write!(out, "  median ITL {:.1} ms", ms(m));
    }
    let conc = if opts.show_gpu && g.mean_concurrency > 0.0 {
        g.mean_concurrency
    } else {
        concurrency
    };
    let _ = writeln!(out, "  mean concurrency {conc:.1}");
    if opts.show_gpu {
        render_gpu_line(out, g);
    }
    if let Some(t) = cpu.and_then(|c| c.ttft.as_ref()) {
        render_cpu_range(
            out,
            "   ",
            &format!("TTFT {:.1} ms: ", ms(t.len_ns)),
            t,
            opts,
        );
    }
    let gpu_breakdowns = if opts.show_gpu {
        vec![("TTFT", g.ttft_breakdown), ("token gaps", g.itl_breakdown)]
    } else {
        Vec::new()
    };
    for (what, b) in gpu_breakdowns {
        if let Some(b) = b.filter(|b| b.total_ns() > 0) {
            let t = b.total_ns();
            let _ = writeln!(
                out,
                "   {what}: GPU busy {:.0}% · sync wait {:.0}% · launch {:.0}% · idle {:.0}%",
                pct(b.gpu_busy_ns, t),
                pct(b.sync_wait_ns, t),
                pct(b.launch_ns, t),
                pct(b.idle_ns, t)
            );
        }
    }
    let cpu_gaps: HashMap<usize, &RangeAttribution> = cpu
        .map(|c| c.slow_gaps.iter().map(|g| (g.token_index, g)).collect())
        .unwrap_or_default();
    if g.slow_tokens.is_empty() || !opts.show_gpu {
        // No GPU view of the gaps: the CPU attribution alone (its gaps are the same slow gaps).
        let Some(c) = cpu.filter(|c| !c.slow_gaps.is_empty()) else {
            return;
        };
        let _ = writeln!(out, "   slowest tokens:");
        let median = median_gap(&r.record);
        for a in c.slow_gaps.iter().take(opts.top_tokens) {
            let ratio = median.filter(|&m| m > 0).map_or(String::new(), |m| {
                format!(" ({:.1}× median)", a.len_ns as f64 / m as f64)
            });
            let _ = writeln!(
                out,
                "     token {} +{:.1} ms{ratio}:",
                a.token_index,
                ms(a.len_ns)
            );
            render_cpu_range(out, "       ", "", a, opts);
        }
        return;
    }
    let _ = writeln!(out, "   slowest tokens:");
    for s in g.slow_tokens.iter().take(opts.top_tokens) {
        let ratio = g
            .median_itl_ns
            .filter(|&m| m > 0)
            .map_or(String::new(), |m| {
                format!(" ({:.1}× median)", s.gap_ns as f64 / m as f64)
            });
        let _ = writeln!(
            out,
            "     token {} +{:.1} ms{ratio}: GPU busy {:.1} ms, sync wait {:.1} ms, launch {:.1} ms, idle {:.1} ms",
            s.token_index,
            ms(s.gap_ns),
            ms(s.gpu_busy_ns),
            ms(s.sync_wait_ns),
            ms(s.launch_ns),
            ms(s.idle_ns)
        );
        for c in &s.top {
            let label = match c {
                Contributor::Kernel { name, .. } => {
                    let mut c = c.clone();
                    if let Contributor::Kernel { name: n, .. } = &mut c {
                        *n = truncate(name, opts.max_name_chars);
                    }
                    contributor_label(&c)
                }
                _ => contributor_label(c),
            };
            let _ = writeln!(out, "       - {label}");
        }
        if let Some(a) = cpu_gaps.get(&s.token_index) {
            render_cpu_range(out, "       ", "", a, opts);
        }
    }
}

fn median_gap(r: &crate::record::RequestRecord) -> Option<u64> {
    r.slow_gaps(f64::INFINITY, 0).median_ns
}

fn render_gpu_line(out: &mut String, g: &RequestGpuStats) {
    let _ = write!(
        out,
        "   GPU busy {:.1} ms  kernels {}",
        g.gpu_busy_ms, g.kernel_count
    );
    if g.graph_count > 0 {
        let _ = write!(out, "  graphs {}", g.graph_count);
    }
    let _ = write!(out, "  memcpy {}", bytes_human(g.memcpy_bytes));
    match (g.energy_j, g.energy_j_per_token) {
        (Some(j), Some(t)) => {
            let _ = write!(out, "  energy {j:.2} J ({t:.3} J/token)");
        }
        (Some(j), None) => {
            let _ = write!(out, "  energy {j:.2} J");
        }
        _ => {}
    }
    if g.partial {
        out.push_str("  (partial: some GPU data was evicted)");
    }
    out.push('\n');
}

/// One-line label of a contributor, for trace args and text output.
pub fn contributor_label(c: &Contributor) -> String {
    let ms = |ns: u64| ns as f64 / 1e6;
    match c {
        Contributor::Kernel {
            name,
            device,
            count,
            overlap_ns,
        } => format!(
            "kernel {name} ×{count} on GPU {device}: {:.3} ms",
            ms(*overlap_ns)
        ),
        Contributor::Graph {
            graph_id,
            device,
            count,
            overlap_ns,
        } => format!(
            "CUDA graph {graph_id} ×{count} on GPU {device}: {:.3} ms",
            ms(*overlap_ns)
        ),
        Contributor::Memcpy {
            direction,
            device,
            count,
            bytes,
            overlap_ns,
        } => format!(
            "memcpy {} ×{count} on GPU {device} ({}): {:.3} ms",
            direction.as_str(),
            bytes_human(*bytes),
            ms(*overlap_ns)
        ),
        Contributor::Memset {
            device,
            count,
            overlap_ns,
        } => format!("memset ×{count} on GPU {device}: {:.3} ms", ms(*overlap_ns)),
        Contributor::Prefill {
            pid,
            conn_id,
            seq_on_conn,
            prompt_tokens,
            overlap_ns,
        } => {
            let prompt = prompt_tokens.map_or(String::new(), |p| format!(", {p} prompt tokens"));
            format!(
                "prefill of request conn {conn_id}#{seq_on_conn} (pid {pid}{prompt}): {:.3} ms",
                ms(*overlap_ns)
            )
        }
        Contributor::HostSync {
            what,
            count,
            overlap_ns,
        } => format!("host blocked in {what} ×{count}: {:.3} ms", ms(*overlap_ns)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::correlate::tests::{gap_scenario, kernel, request, MS};
    use crate::gpu::correlate::{Correlator, CorrelatorConfig};

    #[test]
    fn renders_slowest_requests_and_their_slow_tokens() {
        let mut c = Correlator::new(CorrelatorConfig::default());
        gap_scenario(&mut c);
        let done = c.flush();
        let text = render_explain(&done, &ExplainOptions::default());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "2 requests; the 2 slowest by end-to-end latency:");
        // A (200 ms) before B (175 ms).
        let a = text.find("conn 1#0").unwrap();
        let b = text.find("conn 2#0").unwrap();
        assert!(a < b, "{text}");
        assert!(text.contains("e2e 200.0 ms  ttft 100.0 ms  output tokens 5  median ITL 10.0 ms"));
        assert!(text.contains(
            "   TTFT: GPU busy 0% · sync wait 0% · launch 0% · idle 100%\n   token gaps: GPU busy 36%"
        ), "{text}");
        assert!(text.contains(
            "token 3 +50.0 ms (5.0× median): GPU busy 29.0 ms, sync wait 8.0 ms, launch 0.1 ms, idle 12.9 ms"
        ), "{text}");
        assert!(
            text.contains("- prefill of request conn 2#0 (pid 100, 512 prompt tokens): 35.000 ms")
        );
        assert!(text.contains("- kernel prefill_attn ×1 on GPU 0: 24.000 ms"));
        assert!(text.contains("- host blocked in cudaStreamSynchronize ×1: 8.000 ms"));

        let ttft = render_explain(
            &done,
            &ExplainOptions {
                rank_by: RankBy::Ttft,
                top_requests: 1,
                ..ExplainOptions::default()
            },
        );
        assert!(ttft.contains("the 1 slowest by time to first token"));
        assert!(ttft.contains("conn 1#0") && !ttft.contains("#2 "));
    }

    #[test]
    fn long_kernel_names_are_cut() {
        let mut c = Correlator::new(CorrelatorConfig::default());
        let long = "k".repeat(500);
        c.add_activity(kernel(&long, 1, 25 * MS, 60 * MS));
        c.request_finished(request(
            1,
            0,
            100 * MS,
            &[10 * MS, 20 * MS, 30 * MS, 70 * MS],
        ));
        let done = c.flush();
        assert_eq!(done[0].gpu.slow_tokens.len(), 1);
        let text = render_explain(&done, &ExplainOptions::default());
        let line = text.lines().find(|l| l.contains("- kernel")).unwrap();
        assert!(line.contains(&format!("{}…", "k".repeat(79))), "{line}");
        assert!(!line.contains(&"k".repeat(81)));
        assert!(text.contains("GPU busy 35.0 ms  kernels 1  memcpy 0 B"));
    }
}
