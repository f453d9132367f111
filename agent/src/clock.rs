//! Kernel CLOCK_MONOTONIC (what `bpf_ktime_get_ns` returns) → Unix-epoch wall-clock time.
//!
//! The offset is measured by bracketing a CLOCK_REALTIME read between two CLOCK_MONOTONIC reads
//! and keeping the tightest bracket, so its error is below a microsecond. It is re-measured
//! periodically because NTP slews the wall clock.

use std::time::Duration;

fn read(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// CLOCK_MONOTONIC now, in ns (the probes' clock).
pub fn monotonic_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC) as u64
}

/// CLOCK_REALTIME now, in Unix ns.
pub fn unix_ns() -> u64 {
    read(libc::CLOCK_REALTIME) as u64
}

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime − monotonic, in ns.
    offset_ns: i128,
    /// Half-width of the bracket the offset was measured in (its uncertainty).
    pub uncertainty_ns: u64,
}

impl Clock {
    pub fn measure() -> Self {
        let mut best = (i128::MAX, 0i128);
        for _ in 0..16 {
            let m1 = read(libc::CLOCK_MONOTONIC);
            let r = read(libc::CLOCK_REALTIME);
            let m2 = read(libc::CLOCK_MONOTONIC);
            let width = m2 - m1;
            if width < best.0 {
                best = (width, r - (m1 + width / 2));
            }
        }
        Clock {
            offset_ns: best.1,
            uncertainty_ns: (best.0 / 2) as u64,
        }
    }

    /// Unix time minus monotonic time, in ns.
    pub fn unix_offset_ns(&self) -> i64 {
        self.offset_ns as i64
    }

    pub fn to_unix_ns(&self, monotonic_ns: u64) -> u64 {
        (monotonic_ns as i128 + self.offset_ns).max(0) as u64
    }

    pub fn to_monotonic_ns(&self, unix_ns: u64) -> u64 {
        (unix_ns as i128 - self.offset_ns).max(0) as u64
    }

    /// How often to re-measure.
    pub const REFRESH: Duration = Duration::from_secs(10);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_matches_the_wall_clock() {
        let c = Clock::measure();
        assert!(
            c.uncertainty_ns < 1_000_000,
            "bracket too wide: {}",
            c.uncertainty_ns
        );
        let now_unix = c.to_unix_ns(monotonic_ns());
        let wall = unix_ns();
        assert!(wall.abs_diff(now_unix) < 5_000_000, "{wall} vs {now_unix}");
        assert_eq!(c.to_monotonic_ns(c.to_unix_ns(123_456_789)), 123_456_789);
    }
}
