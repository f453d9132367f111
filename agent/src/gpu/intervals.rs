//! Sets of half-open `[start, end)` nanosecond intervals: the arithmetic behind busy-time unions
//! and the token-gap decomposition.

/// Sorted, disjoint, non-empty, non-touching half-open intervals, with prefix sums of their
/// lengths so that the covered length of any range is two binary searches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct IntervalSet {
    spans: Vec<(u64, u64)>,
    /// `before[i]`: total length of `spans[..i]`.
    before: Vec<u64>,
}

impl IntervalSet {
    /// The union of `spans` (any order, overlaps allowed; empty spans are ignored).
    pub(crate) fn from_spans(spans: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut v: Vec<(u64, u64)> = spans.into_iter().filter(|&(a, b)| b > a).collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            match out.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Self::from_disjoint(out)
    }

    fn from_disjoint(spans: Vec<(u64, u64)>) -> Self {
        let mut before = Vec::with_capacity(spans.len());
        let mut sum = 0;
        for &(a, b) in &spans {
            before.push(sum);
            sum += b - a;
        }
        IntervalSet { spans, before }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.spans.iter().copied()
    }

    #[cfg(test)]
    pub(crate) fn spans(&self) -> &[(u64, u64)] {
        &self.spans
    }

    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.spans.iter().map(|&(a, b)| b - a).sum()
    }

    /// Length of the part of the set before `t`.
    fn covered_before(&self, t: u64) -> u64 {
        let i = self.spans.partition_point(|&(start, _)| start < t);
        match i.checked_sub(1) {
            None => 0,
            Some(last) => {
                let (s, e) = self.spans[last];
                self.before[last] + e.min(t) - s
            }
        }
    }

    /// Length of the part of the set inside `[a, b)`.
    pub(crate) fn overlap_len(&self, a: u64, b: u64) -> u64 {
        if b <= a {
            return 0;
        }
        self.covered_before(b) - self.covered_before(a)
    }

    /// `self` minus `other`.
    pub(crate) fn subtract(&self, other: &IntervalSet) -> IntervalSet {
        let mut out = Vec::with_capacity(self.spans.len());
        let mut j = 0;
        for &(s, e) in &self.spans {
            let mut cur = s;
            // Skip `other` spans entirely before this one.
            while j < other.spans.len() && other.spans[j].1 <= cur {
                j += 1;
            }
            let mut k = j;
            while k < other.spans.len() && other.spans[k].0 < e {
                let (os, oe) = other.spans[k];
                if os > cur {
                    out.push((cur, os));
                }
                cur = cur.max(oe);
                if cur >= e {
                    break;
                }
                k += 1;
            }
            if cur < e {
                out.push((cur, e));
            }
        }
        Self::from_disjoint(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn union_merges_overlapping_and_touching() {
        let s = IntervalSet::from_spans([(5, 10), (0, 3), (3, 4), (8, 12), (20, 20)]);
        assert_eq!(s.spans(), &[(0, 4), (5, 12)]);
        assert_eq!(s.total(), 11);
        assert_eq!(s.overlap_len(2, 6), 3);
        assert_eq!(s.overlap_len(12, 100), 0);
        assert_eq!(s.overlap_len(6, 6), 0);
    }

    #[test]
    fn subtract_cuts_holes() {
        let a = IntervalSet::from_spans([(0, 10), (20, 30)]);
        let b = IntervalSet::from_spans([(2, 4), (8, 22), (25, 26)]);
        assert_eq!(
            a.subtract(&b).spans(),
            &[(0, 2), (4, 8), (22, 25), (26, 30)]
        );
        assert_eq!(a.subtract(&a).spans(), &[]);
        assert_eq!(a.subtract(&IntervalSet::default()), a);
    }

    fn covered(spans: &[(u64, u64)], t: u64) -> bool {
        spans.iter().any(|&(a, b)| a <= t && t < b)
    }

    proptest! {
        // Point-wise check against the definition on a small domain.
        #[test]
        fn matches_pointwise(
            xs in proptest::collection::vec((0u64..60, 0u64..15), 0..8),
            ys in proptest::collection::vec((0u64..60, 0u64..15), 0..8),
            q in (0u64..70, 0u64..70),
        ) {
            let xs: Vec<_> = xs.into_iter().map(|(a, l)| (a, a + l)).collect();
            let ys: Vec<_> = ys.into_iter().map(|(a, l)| (a, a + l)).collect();
            let x = IntervalSet::from_spans(xs.clone());
            let y = IntervalSet::from_spans(ys.clone());
            let d = x.subtract(&y);
            let (qa, qb) = (q.0.min(q.1), q.0.max(q.1));
            let mut want_overlap = 0;
            for t in 0..80 {
                prop_assert_eq!(covered(x.spans(), t), covered(&xs, t));
                prop_assert_eq!(covered(d.spans(), t), covered(&xs, t) && !covered(&ys, t));
                if t >= qa && t < qb && covered(&xs, t) {
                    want_overlap += 1;
                }
            }
            prop_assert_eq!(x.overlap_len(qa, qb), want_overlap);
            for w in d.spans().windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
        }
    }
}
