//! Counters read from somewhere else (NVML's energy total, an engine's `*_total` series), turned
//! into counters of the agent's own: they start at 0 on the first reading, grow by the
//! difference between consecutive readings, and carry on across a reset of the source (a driver
//! reload, a server restart: a reading below the previous one counts as a fresh start).
//!
//! Why not export the source's total as is: the interval reports carry counter *deltas*, and an
//! agent restarted on a long-running GPU or server would otherwise report the source's whole
//! history as one interval's increase at the collector.

/// One external cumulative counter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExternalCounter {
    last: Option<f64>,
    total: f64,
}

impl ExternalCounter {
    /// Takes a new reading of the source's cumulative value; returns the increase it added
    /// (0 for the first reading). Non-finite or negative readings are ignored.
    pub fn observe(&mut self, reading: f64) -> f64 {
        if !reading.is_finite() || reading < 0.0 {
            return 0.0;
        }
        let added = match self.last {
            None => 0.0,
            Some(prev) if reading >= prev => reading - prev,
            // The source restarted from 0: what it counted since is new.
            Some(_) => reading,
        };
        self.last = Some(reading);
        self.total += added;
        added
    }

    /// What was counted since the first reading.
    pub fn total(&self) -> f64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_zero_and_survives_resets() {
        let mut c = ExternalCounter::default();
        assert_eq!(c.observe(1000.0), 0.0);
        assert_eq!(c.observe(1500.0), 500.0);
        assert_eq!(c.observe(1500.0), 0.0);
        // Reset (server restart): 0 → 20 after it counts as 20 new.
        assert_eq!(c.observe(20.0), 20.0);
        assert_eq!(c.observe(25.0), 5.0);
        assert_eq!(c.observe(f64::NAN), 0.0);
        assert_eq!(c.observe(-1.0), 0.0);
        assert_eq!(c.total(), 525.0);
    }
}
