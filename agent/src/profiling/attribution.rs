//! Attribution of stack samples to the requests and token gaps they fell in.
//!
//! The profiler keeps the last minute or so of samples (on-CPU samples as instants, off-CPU
//! periods as intervals) in a time-ordered window. When a request completes, its slow token gaps
//! are looked up in the window over the request's server process tree: which stacks were on
//! CPU, and where threads were blocked or waiting for a CPU, while the client waited for the
//! next token.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::aggregate::{OffCpuState, SampleLabels, Values};
use super::stack::RawStack;

/// What a window entry measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A timer sample: the thread was running this stack at `end_ns`.
    OnCpu,
    /// The thread was off CPU from `start_ns` to `end_ns` with this stack.
    OffCpu(OffCpuState),
}

/// One sample (or off-CPU period) in the window.
#[derive(Clone, Debug)]
pub struct WindowEntry {
    /// Off-CPU: switch-out time; on-CPU: the sample time.
    pub start_ns: u64,
    /// Off-CPU: switch-in time; on-CPU: the sample time.
    pub end_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub kind: EntryKind,
    /// On-CPU: CPU time one sample stands for (the sampling period). Off-CPU: unused (the
    /// overlap with the queried range is used, times `scale`).
    pub period_ns: u64,
    /// How many events this entry stands for (1-in-N sampling of switch-outs).
    pub scale: u32,
    pub stack: Arc<RawStack>,
    pub labels: Arc<SampleLabels>,
}

impl WindowEntry {
    /// Time this entry contributes to `[a, b)`.
    pub fn weight_in(&self, a: u64, b: u64) -> u64 {
        match self.kind {
            EntryKind::OnCpu => {
                if self.end_ns >= a && self.end_ns < b {
                    self.period_ns
                } else {
                    0
                }
            }
            EntryKind::OffCpu(_) => {
                let s = self.start_ns.max(a);
                let e = self.end_ns.min(b);
                e.saturating_sub(s) * self.scale as u64
            }
        }
    }
}

/// Bounded, time-ordered window of recent samples.
pub struct SampleWindow {
    entries: VecDeque<WindowEntry>,
    max_age_ns: u64,
    max_entries: usize,
    /// Longest off-CPU period seen in the window (bounds how far back a query must look).
    longest_offcpu_ns: u64,
    /// Entries dropped because the window was full (not by age).
    pub evicted_full: u64,
}

impl SampleWindow {
    pub fn new(max_age_ns: u64, max_entries: usize) -> Self {
        SampleWindow {
            entries: VecDeque::new(),
            max_age_ns,
            max_entries: max_entries.max(1),
            longest_offcpu_ns: 0,
            evicted_full: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds an entry. Entries arrive roughly in `end_ns` order (per-CPU ring order); a late one
    /// is placed where it belongs so range queries stay exact.
    pub fn push(&mut self, e: WindowEntry) {
        if self.entries.len() >= self.max_entries {
            self.entries.pop_front();
            self.evicted_full += 1;
        }
        if let EntryKind::OffCpu(_) = e.kind {
            self.longest_offcpu_ns = self
                .longest_offcpu_ns
                .max(e.end_ns - e.start_ns.min(e.end_ns));
        }
        let pos = if self.entries.back().is_none_or(|b| b.end_ns <= e.end_ns) {
            self.entries.len()
        } else {
            self.entries.partition_point(|x| x.end_ns <= e.end_ns)
        };
        self.entries.insert(pos, e);
    }

    /// Drops entries that ended more than `max_age_ns` before `now_ns`.
    pub fn expire(&mut self, now_ns: u64) {
        let cutoff = now_ns.saturating_sub(self.max_age_ns);
        while self.entries.front().is_some_and(|e| e.end_ns < cutoff) {
            self.entries.pop_front();
        }
        if self.entries.is_empty() {
            self.longest_offcpu_ns = 0;
        }
    }

    /// The oldest time the window still covers completely.
    pub fn covered_from(&self) -> Option<u64> {
        self.entries.front().map(|e| e.end_ns)
    }

    /// Entries that may overlap `[a, b)`, filtered by process.
    pub fn overlapping<'a>(
        &'a self,
        a: u64,
        b: u64,
        mut keep: impl FnMut(u32) -> bool + 'a,
    ) -> impl Iterator<Item = &'a WindowEntry> + 'a {
        // Every entry overlapping [a, b) ends at or after a; off-CPU entries may start up to
        // `longest_offcpu_ns` before they end.
        let first = self.entries.partition_point(|e| e.end_ns < a);
        self.entries
            .range(first..)
            .take_while(move |e| e.end_ns < b.saturating_add(self.longest_offcpu_ns))
            .filter(move |e| e.start_ns < b && keep(e.tgid))
    }
}

/// One stack's share of a time range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackShare {
    pub stack: Arc<RawStack>,
    pub labels: Arc<SampleLabels>,
    pub on_cpu_ns: u64,
    pub off_cpu_ns: u64,
}

impl StackShare {
    pub fn total_ns(&self) -> u64 {
        self.on_cpu_ns + self.off_cpu_ns
    }
}

/// What the serving processes did during one time range (a token gap).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeProfile {
    pub start_ns: u64,
    pub end_ns: u64,
    /// CPU time sampled in the range, over all threads of the process tree.
    pub on_cpu_ns: u64,
    /// Off-CPU time (sampled switch-outs, scaled) in the range.
    pub off_cpu_ns: u64,
    /// On-CPU samples that fell in the range.
    pub cpu_samples: u32,
    /// The stacks, largest share first (capped).
    pub top: Vec<StackShare>,
}

/// Profiles `[a, b)` over the processes `keep` accepts; keeps the `max_stacks` largest stacks.
pub fn profile_range(
    w: &SampleWindow,
    a: u64,
    b: u64,
    keep: impl FnMut(u32) -> bool,
    max_stacks: usize,
) -> RangeProfile {
    let mut by: HashMap<(Arc<RawStack>, Arc<SampleLabels>), (u64, u64)> = HashMap::new();
    let mut out = RangeProfile {
        start_ns: a,
        end_ns: b,
        ..RangeProfile::default()
    };
    for e in w.overlapping(a, b, keep) {
        let t = e.weight_in(a, b);
        if t == 0 {
            continue;
        }
        let slot = by.entry((e.stack.clone(), e.labels.clone())).or_default();
        match e.kind {
            EntryKind::OnCpu => {
                slot.0 += t;
                out.on_cpu_ns += t;
                out.cpu_samples += 1;
            }
            EntryKind::OffCpu(_) => {
                slot.1 += t;
                out.off_cpu_ns += t;
            }
        }
    }
    let mut top: Vec<StackShare> = by
        .into_iter()
        .map(|((stack, labels), (on, off))| StackShare {
            stack,
            labels,
            on_cpu_ns: on,
            off_cpu_ns: off,
        })
        .collect();
    top.sort_by(|x, y| {
        y.total_ns()
            .cmp(&x.total_ns())
            .then_with(|| x.labels.cmp(&y.labels))
    });
    top.truncate(max_stacks);
    out.top = top;
    out
}

/// Adds every entry's share of `[a, b)` to `f` (the slow-token profile), keyed by stack and
/// labels, split into on-CPU and off-CPU values.
pub fn for_each_share(
    w: &SampleWindow,
    a: u64,
    b: u64,
    keep: impl FnMut(u32) -> bool,
    mut f: impl FnMut(&WindowEntry, Values),
) {
    for e in w.overlapping(a, b, keep) {
        let t = e.weight_in(a, b);
        if t > 0 {
            let count = match e.kind {
                EntryKind::OnCpu => 1,
                EntryKind::OffCpu(_) => e.scale as u64,
            };
            f(e, Values { count, nanos: t });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::stack::{NativeFrame, Truncation};
    use super::*;
    use proptest::prelude::*;

    fn stack(n: u64) -> Arc<RawStack> {
        Arc::new(RawStack {
            kernel: Box::new([]),
            native: vec![NativeFrame {
                module: 0,
                offset: n,
            }]
            .into(),
            python: Box::new([]),
            truncation: Truncation::None,
        })
    }

    fn labels(pid: u32) -> Arc<SampleLabels> {
        Arc::new(SampleLabels {
            pid,
            process: "p".into(),
            thread: "t".into(),
            model: None,
            state: None,
            kernel: None,
        })
    }

    fn on(ts: u64, tgid: u32, s: u64) -> WindowEntry {
        WindowEntry {
            start_ns: ts,
            end_ns: ts,
            tgid,
            tid: tgid,
            kind: EntryKind::OnCpu,
            period_ns: 10,
            scale: 1,
            stack: stack(s),
            labels: labels(tgid),
        }
    }

    fn off(a: u64, b: u64, tgid: u32, s: u64, scale: u32) -> WindowEntry {
        WindowEntry {
            start_ns: a,
            end_ns: b,
            tgid,
            tid: tgid,
            kind: EntryKind::OffCpu(OffCpuState::Blocked),
            period_ns: 0,
            scale,
            stack: stack(s),
            labels: labels(tgid),
        }
    }

    #[test]
    fn range_counts_on_cpu_instants_and_off_cpu_overlap() {
        let mut w = SampleWindow::new(1_000_000, 100);
        w.push(on(100, 1, 1));
        w.push(on(150, 1, 1));
        w.push(on(160, 2, 2)); // other process
        w.push(off(50, 400, 1, 3, 2)); // long block, scaled ×2
        w.push(on(300, 1, 2));
        let p = profile_range(&w, 120, 310, |t| t == 1, 10);
        assert_eq!(p.cpu_samples, 2);
        assert_eq!(p.on_cpu_ns, 20);
        assert_eq!(p.off_cpu_ns, (310 - 120) * 2);
        assert_eq!(p.top[0].stack, stack(3));
        assert_eq!(p.top.len(), 3);
    }

    #[test]
    fn late_entries_are_ordered_and_old_ones_expire() {
        let mut w = SampleWindow::new(100, 100);
        w.push(on(200, 1, 1));
        w.push(on(150, 1, 2)); // arrived late
        w.push(on(250, 1, 3));
        let p = profile_range(&w, 140, 160, |_| true, 10);
        assert_eq!(p.cpu_samples, 1);
        assert_eq!(p.top[0].stack, stack(2));
        w.expire(300);
        assert_eq!(w.len(), 2, "150 is older than 300-100");
        assert_eq!(w.covered_from(), Some(200));
    }

    #[test]
    fn full_window_counts_evictions() {
        let mut w = SampleWindow::new(u64::MAX, 2);
        for t in 0..5 {
            w.push(on(t, 1, 1));
        }
        assert_eq!(w.len(), 2);
        assert_eq!(w.evicted_full, 3);
    }

    proptest! {
        /// Splitting a range in two never changes the total attributed time.
        #[test]
        fn ranges_are_additive(
            ons in proptest::collection::vec(0u64..1000, 0..50),
            offs in proptest::collection::vec((0u64..1000, 0u64..300), 0..20),
            a in 0u64..500, mid in 0u64..500, len in 0u64..500,
        ) {
            let mut w = SampleWindow::new(u64::MAX, 10_000);
            for t in ons { w.push(on(t, 1, t % 3)); }
            for (s, d) in offs { w.push(off(s, s + d, 1, s % 5, 1)); }
            let b = a + mid + len;
            let m = a + mid;
            let whole = profile_range(&w, a, b, |_| true, usize::MAX);
            let l = profile_range(&w, a, m, |_| true, usize::MAX);
            let r = profile_range(&w, m, b, |_| true, usize::MAX);
            prop_assert_eq!(whole.on_cpu_ns, l.on_cpu_ns + r.on_cpu_ns);
            prop_assert_eq!(whole.off_cpu_ns, l.off_cpu_ns + r.off_cpu_ns);
            let tops: u64 = whole.top.iter().map(|s| s.total_ns()).sum();
            prop_assert_eq!(tops, whole.on_cpu_ns + whole.off_cpu_ns);
        }
    }
}
