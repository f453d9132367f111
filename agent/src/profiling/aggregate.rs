//! Interval aggregates of stack samples: for each profile type, (stack, labels) → count and
//! nanoseconds. One aggregate per type per interval becomes one pprof profile.

use std::collections::HashMap;
use std::sync::Arc;

use super::stack::RawStack;

pub use infertap_proto::pprof::ProfileKind as ProfileType;

/// Off-CPU state of a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OffCpuState {
    /// Sleeping: waiting on a lock, a futex (e.g. the GIL), I/O, a timer.
    Blocked,
    /// Runnable but not running: waiting for a CPU.
    Preempted,
}

impl OffCpuState {
    pub fn name(self) -> &'static str {
        match self {
            OffCpuState::Blocked => "blocked",
            OffCpuState::Preempted => "preempted",
        }
    }
}

/// Labels of a sample. Bounded in number: process roles and thread names of the traced
/// processes, never request ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleLabels {
    pub pid: u32,
    /// The process's role in the server (`api_server`, `engine_core`, `worker`, ...), or its
    /// command name.
    pub process: Arc<str>,
    /// The thread's name (`comm`), e.g. `python3`, `ggml`, `EngineCoreThread`.
    pub thread: Arc<str>,
    /// Model served by this process tree, when requests named one.
    pub model: Option<Arc<str>>,
    /// Off-CPU state (off-CPU and slow-token profiles).
    pub state: Option<OffCpuState>,
    /// For GPU profiles: the launched kernel's name when known.
    pub kernel: Option<Arc<str>>,
}

/// What a (stack, labels) pair accumulated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Values {
    /// Samples (or, for sampled events, the events they stand for).
    pub count: u64,
    /// Time: on-CPU, off-CPU or GPU nanoseconds.
    pub nanos: u64,
}

impl Values {
    pub fn add(&mut self, o: Values) {
        self.count += o.count;
        self.nanos += o.nanos;
    }
}

/// One profile type's samples over one interval.
#[derive(Clone, Debug)]
pub struct ProfileAggregate {
    pub kind: ProfileType,
    /// CLOCK_MONOTONIC ns of the interval's start and end.
    pub start_ns: u64,
    pub end_ns: u64,
    /// Nominal sampling period (on-CPU: 1/Hz in ns; 0 where it does not apply).
    pub period_ns: u64,
    pub samples: HashMap<(Arc<RawStack>, Arc<SampleLabels>), Values>,
    /// Free-form notes carried into the profile's comments (e.g. "GPU time weighted by launch
    /// counts: no CUPTI data").
    pub notes: Vec<String>,
}

impl ProfileAggregate {
    pub fn new(kind: ProfileType, start_ns: u64, period_ns: u64) -> Self {
        ProfileAggregate {
            kind,
            start_ns,
            end_ns: start_ns,
            period_ns,
            samples: HashMap::new(),
            notes: Vec::new(),
        }
    }

    pub fn add(&mut self, stack: Arc<RawStack>, labels: Arc<SampleLabels>, v: Values) {
        self.samples.entry((stack, labels)).or_default().add(v);
    }

    pub fn total(&self) -> Values {
        let mut t = Values::default();
        for v in self.samples.values() {
            t.add(*v);
        }
        t
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Folds another aggregate of the same type in (a longer window, e.g. `infertap profile`).
    pub fn merge(&mut self, other: ProfileAggregate) {
        debug_assert_eq!(self.kind, other.kind);
        self.start_ns = self.start_ns.min(other.start_ns);
        self.end_ns = self.end_ns.max(other.end_ns);
        for (k, v) in other.samples {
            self.samples.entry(k).or_default().add(v);
        }
        for n in other.notes {
            if !self.notes.contains(&n) {
                self.notes.push(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::stack::{NativeFrame, Truncation};
    use super::*;

    fn labels(pid: u32) -> Arc<SampleLabels> {
        Arc::new(SampleLabels {
            pid,
            process: "server".into(),
            thread: "main".into(),
            model: None,
            state: None,
            kernel: None,
        })
    }

    fn stack(off: u64) -> Arc<RawStack> {
        Arc::new(RawStack {
            kernel: Box::new([]),
            native: vec![NativeFrame {
                module: 0,
                offset: off,
            }]
            .into(),
            python: Box::new([]),
            truncation: Truncation::None,
        })
    }

    #[test]
    fn adds_and_merges_preserve_totals() {
        let mut a = ProfileAggregate::new(ProfileType::Cpu, 100, 10);
        a.add(
            stack(1),
            labels(1),
            Values {
                count: 1,
                nanos: 10,
            },
        );
        a.add(
            stack(1),
            labels(1),
            Values {
                count: 1,
                nanos: 10,
            },
        );
        a.add(
            stack(2),
            labels(1),
            Values {
                count: 1,
                nanos: 10,
            },
        );
        assert_eq!(a.samples.len(), 2);
        let mut b = ProfileAggregate::new(ProfileType::Cpu, 50, 10);
        b.end_ns = 300;
        b.add(
            stack(1),
            labels(2),
            Values {
                count: 3,
                nanos: 30,
            },
        );
        a.merge(b);
        assert_eq!(
            a.total(),
            Values {
                count: 6,
                nanos: 60
            }
        );
        assert_eq!((a.start_ns, a.end_ns), (50, 300));
        assert_eq!(a.samples.len(), 3);
    }
}
