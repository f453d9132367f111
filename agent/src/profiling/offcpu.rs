//! Pairs off-CPU switch-outs (sampled, with their stacks) with the switch-in that ends them, and
//! accounts each period to the intervals it spans: a thread blocked across an interval boundary
//! counts in both intervals for the part that fell in each, so an interval's off-CPU profile
//! holds exactly its own time.

use std::collections::HashMap;
use std::sync::Arc;

use super::aggregate::{OffCpuState, SampleLabels};
use super::stack::RawStack;

/// A sampled switch-out waiting for its end.
#[derive(Clone, Debug)]
pub struct Pending {
    pub tgid: u32,
    pub out_ns: u64,
    /// Time up to which this period has already been accounted to an interval.
    pub accounted_ns: u64,
    pub state: OffCpuState,
    pub scale: u32,
    pub stack: Arc<RawStack>,
    pub labels: Arc<SampleLabels>,
}

/// A piece of off-CPU time to account: `[from, to)` of the period that began at `out_ns`.
#[derive(Clone, Debug)]
pub struct OffCpuPiece {
    pub tgid: u32,
    pub tid: u32,
    pub out_ns: u64,
    pub from_ns: u64,
    pub to_ns: u64,
    /// The period ended (switch-in seen) with this piece.
    pub ended: bool,
    pub state: OffCpuState,
    pub scale: u32,
    pub stack: Arc<RawStack>,
    pub labels: Arc<SampleLabels>,
}

/// Counters of the pairing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuStats {
    pub periods_ended: u64,
    /// Ends whose switch-out record never arrived (lost in the ring, or taken before attach).
    pub unmatched_ends: u64,
    /// Pending switch-outs dropped because too many were open.
    pub evicted: u64,
    /// Pending switch-outs dropped because their process exited.
    pub exited: u64,
}

pub struct OffCpuTracker {
    pending: HashMap<(u32, u64), Pending>,
    max_pending: usize,
    pub stats: OffCpuStats,
}

impl OffCpuTracker {
    pub fn new(max_pending: usize) -> Self {
        OffCpuTracker {
            pending: HashMap::new(),
            max_pending: max_pending.max(1),
            stats: OffCpuStats::default(),
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// A sampled switch-out of `tid`.
    pub fn switched_out(&mut self, tid: u32, p: Pending) {
        if self.pending.len() >= self.max_pending {
            if let Some(k) = self
                .pending
                .iter()
                .min_by_key(|(_, v)| v.out_ns)
                .map(|(k, _)| *k)
            {
                self.pending.remove(&k);
                self.stats.evicted += 1;
            }
        }
        self.pending.insert((tid, p.out_ns), p);
    }

    /// `tid` ran again at `in_ns` after the switch-out at `out_ns`: the rest of the period.
    pub fn switched_in(&mut self, tid: u32, out_ns: u64, in_ns: u64) -> Option<OffCpuPiece> {
        let Some(p) = self.pending.remove(&(tid, out_ns)) else {
            self.stats.unmatched_ends += 1;
            return None;
        };
        self.stats.periods_ended += 1;
        Some(OffCpuPiece {
            tgid: p.tgid,
            tid,
            out_ns,
            from_ns: p.accounted_ns,
            to_ns: in_ns.max(p.accounted_ns),
            ended: true,
            state: p.state,
            scale: p.scale,
            stack: p.stack,
            labels: p.labels,
        })
    }

    /// At an interval boundary: the part of every still-open period up to `now_ns`.
    pub fn account_open(&mut self, now_ns: u64) -> Vec<OffCpuPiece> {
        let mut out = Vec::new();
        for (&(tid, out_ns), p) in self.pending.iter_mut() {
            if now_ns > p.accounted_ns {
                out.push(OffCpuPiece {
                    tgid: p.tgid,
                    tid,
                    out_ns,
                    from_ns: p.accounted_ns,
                    to_ns: now_ns,
                    ended: false,
                    state: p.state,
                    scale: p.scale,
                    stack: p.stack.clone(),
                    labels: p.labels.clone(),
                });
                p.accounted_ns = now_ns;
            }
        }
        out
    }

    /// Forgets a process's open periods (it exited; its threads will not switch in again).
    pub fn forget_process(&mut self, tgid: u32) {
        let before = self.pending.len();
        self.pending.retain(|_, p| p.tgid != tgid);
        self.stats.exited += (before - self.pending.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::super::stack::Truncation;
    use super::*;

    fn pending(tgid: u32, out: u64) -> Pending {
        Pending {
            tgid,
            out_ns: out,
            accounted_ns: out,
            state: OffCpuState::Blocked,
            scale: 1,
            stack: Arc::new(RawStack {
                kernel: Box::new([]),
                native: Box::new([]),
                python: Box::new([]),
                truncation: Truncation::None,
            }),
            labels: Arc::new(SampleLabels {
                pid: tgid,
                process: "p".into(),
                thread: "t".into(),
                model: None,
                state: Some(OffCpuState::Blocked),
                kernel: None,
            }),
        }
    }

    #[test]
    fn periods_spanning_intervals_are_split_exactly() {
        let mut t = OffCpuTracker::new(10);
        t.switched_out(7, pending(1, 100));
        let open = t.account_open(250);
        assert_eq!(open.len(), 1);
        assert_eq!(
            (open[0].from_ns, open[0].to_ns, open[0].ended),
            (100, 250, false)
        );
        let end = t.switched_in(7, 100, 400).unwrap();
        assert_eq!((end.from_ns, end.to_ns, end.ended), (250, 400, true));
        assert_eq!(t.pending_len(), 0);
        assert!(t.switched_in(7, 100, 500).is_none());
        assert_eq!(t.stats.unmatched_ends, 1);
        assert_eq!(t.stats.periods_ended, 1);
    }

    #[test]
    fn bounded_and_forgets_exited_processes() {
        let mut t = OffCpuTracker::new(2);
        t.switched_out(1, pending(1, 10));
        t.switched_out(2, pending(1, 20));
        t.switched_out(3, pending(2, 30));
        assert_eq!(t.pending_len(), 2);
        assert_eq!(t.stats.evicted, 1);
        assert!(t.switched_in(1, 10, 40).is_none(), "the oldest was evicted");
        t.forget_process(1);
        assert_eq!(t.pending_len(), 1);
        assert_eq!(t.stats.exited, 1);
    }
}
