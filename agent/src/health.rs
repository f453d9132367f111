//! Readiness of the agent, as `/readyz` reports it: ready once the probes are attached and the
//! ring-buffer drain runs, not ready before that and whenever the drain has not gone round for
//! longer than the stall threshold (a wedged pipeline task, a blocked sink). `/healthz` only says
//! the process answers; `/readyz` says it is doing its job, so a Kubernetes readiness probe
//! takes a stalled agent out of service and its dashboards show the gap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Drain stall after which `/readyz` turns 503 unless the pipeline sets its own (see
/// [`Readiness::set_stall_after`]): the drain normally goes round every poll interval (10 ms).
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct State {
    attached: AtomicBool,
    /// CLOCK_MONOTONIC ns of the last drain pass; 0 before the first.
    last_drain_ns: AtomicU64,
    stall_after_ns: AtomicU64,
}

/// Shared readiness state: the pipeline marks it, the metrics endpoint reads it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Readiness(Arc<State>);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Arc::new(State {
            attached: AtomicBool::new(false),
            last_drain_ns: AtomicU64::new(0),
            stall_after_ns: AtomicU64::new(DEFAULT_STALL_AFTER.as_nanos() as u64),
        }))
    }
}

/// What `/readyz` answers, with the reason shown in its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyState {
    Ready,
    /// Probes not attached yet (or detached at shutdown).
    NotAttached,
    /// Attached, but the drain has not run yet.
    NotDraining,
    /// The last drain pass is older than the stall threshold, by this much.
    Stalled {
        since: Duration,
    },
}

impl Readiness {
    /// Marks the probes attached (`true`) or going away (`false`, at shutdown).
    pub fn set_attached(&self, attached: bool) {
        self.0.attached.store(attached, Ordering::Release);
    }

    /// Records one pass of the ring-buffer drain (one relaxed store: cheap on the hot loop).
    pub fn drained(&self) {
        self.drained_at(crate::clock::monotonic_ns());
    }

    fn drained_at(&self, now_ns: u64) {
        self.0.last_drain_ns.store(now_ns.max(1), Ordering::Relaxed);
    }

    /// Drain silence after which the agent reports not ready.
    pub fn set_stall_after(&self, d: Duration) {
        self.0
            .stall_after_ns
            .store(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// The state now.
    pub fn state(&self) -> ReadyState {
        self.state_at(crate::clock::monotonic_ns())
    }

    fn state_at(&self, now_ns: u64) -> ReadyState {
        if !self.0.attached.load(Ordering::Acquire) {
            return ReadyState::NotAttached;
        }
        let last = self.0.last_drain_ns.load(Ordering::Relaxed);
        if last == 0 {
            return ReadyState::NotDraining;
        }
        let since = now_ns.saturating_sub(last);
        if since > self.0.stall_after_ns.load(Ordering::Relaxed) {
            return ReadyState::Stalled {
                since: Duration::from_nanos(since),
            };
        }
        ReadyState::Ready
    }
}

impl ReadyState {
    /// The body line `/readyz` serves.
    pub fn describe(&self) -> String {
        match self {
            ReadyState::Ready => "ready\n".into(),
            ReadyState::NotAttached => "not ready: probes not attached\n".into(),
            ReadyState::NotDraining => "not ready: event drain not started\n".into(),
            ReadyState::Stalled { since } => {
                format!(
                    "not ready: event drain stalled for {:.1} s\n",
                    since.as_secs_f64()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_attached_and_draining() {
        let r = Readiness::default();
        r.set_stall_after(Duration::from_secs(2));
        assert_eq!(r.state_at(5_000_000_000), ReadyState::NotAttached);
        r.set_attached(true);
        assert_eq!(r.state_at(5_000_000_000), ReadyState::NotDraining);
        r.drained_at(5_000_000_000);
        assert_eq!(r.state_at(6_000_000_000), ReadyState::Ready);
        assert_eq!(
            r.state_at(8_000_000_000),
            ReadyState::Stalled {
                since: Duration::from_secs(3)
            }
        );
        r.drained_at(8_000_000_000);
        assert_eq!(r.state_at(8_500_000_000), ReadyState::Ready);
        r.set_attached(false);
        assert_eq!(r.state_at(8_500_000_000), ReadyState::NotAttached);
    }
}
