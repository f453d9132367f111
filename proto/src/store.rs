//! A mergeable set of metric series keyed by schema metric and label values: what the agent
//! accumulates, what interval reports carry (as deltas) and what the collector merges. It encodes
//! itself as OpenMetrics text through `prometheus-client`'s [`Collector`] trait, so the agent's
//! and the collector's `/metrics` are produced by the same code.

use std::collections::BTreeMap;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::pb;
use crate::schema::{self, Kind, MetricDef};

/// Label name/value pairs of one series, in the order the schema (plus any identity labels
/// prepended by the collector) lists them.
pub type Labels = Vec<(String, String)>;

type SeriesKey = (&'static str, Labels);

/// One histogram series: non-cumulative bucket counts (schema bounds, then +Inf), sum and count.
/// Merging is element-wise addition, exact for counts.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramData {
    pub buckets: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl HistogramData {
    pub fn empty(def: &MetricDef) -> Self {
        HistogramData {
            buckets: vec![0; def.bucket_count()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, def: &MetricDef, v: f64) {
        let i = def.bucket_index(v);
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
            self.count += 1;
            if v.is_finite() {
                self.sum += v;
            }
        }
    }

    /// Adds `other` into `self`; both must have the same bucket layout.
    pub fn merge(&mut self, other: &HistogramData) -> Result<(), StoreError> {
        if other.buckets.len() != self.buckets.len() {
            return Err(StoreError::BucketCount {
                got: other.buckets.len(),
                want: self.buckets.len(),
            });
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a = a.saturating_add(*b);
        }
        self.sum += other.sum;
        self.count = self.count.saturating_add(other.count);
        Ok(())
    }

    /// The `q`-quantile (0..=1) estimated the way Prometheus' `histogram_quantile` does: linear
    /// interpolation inside the bucket holding rank `q * count`, the first bucket starting at 0,
    /// and the largest finite bound when the rank falls in the +Inf bucket. `None` when empty or
    /// when the layout does not match `def`.
    pub fn quantile(&self, def: &MetricDef, q: f64) -> Option<f64> {
        if self.count == 0 || self.buckets.len() != def.bucket_count() || !(0.0..=1.0).contains(&q)
        {
            return None;
        }
        let rank = q * self.count as f64;
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = def.bounds.get(i) else {
                    return def.bounds.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { def.bounds[i - 1] };
                let into = (rank - below as f64).max(0.0);
                return Some(lower + (upper - lower) * into / n as f64);
            }
            below += n;
        }
        def.bounds.last().copied()
    }

    /// What was added since `earlier` (a previous copy of the same series). A series that went
    /// down (a reset) counts from zero.
    pub fn delta_since(&self, earlier: &HistogramData) -> HistogramData {
        let reset = earlier.buckets.len() != self.buckets.len()
            || self.count < earlier.count
            || self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .any(|(a, b)| a < b);
        if reset {
            return self.clone();
        }
        HistogramData {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(a, b)| a - b)
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }
}

/// Why a series of a report was not applied.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreError {
    UnknownMetric(String),
    WrongKind { metric: String },
    WrongLabels { metric: String, got: Vec<String> },
    BucketCount { got: usize, want: usize },
    BadValue { metric: String },
}

impl StoreError {
    /// Short, bounded reason for a rejection counter label.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::UnknownMetric(_) => "unknown_metric",
            StoreError::WrongKind { .. } => "wrong_kind",
            StoreError::WrongLabels { .. } => "wrong_labels",
            StoreError::BucketCount { .. } => "bucket_count",
            StoreError::BadValue { .. } => "bad_value",
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::UnknownMetric(m) => write!(f, "unknown metric {m:?}"),
            StoreError::WrongKind { metric } => write!(f, "metric {metric} sent as the wrong kind"),
            StoreError::WrongLabels { metric, got } => {
                write!(f, "metric {metric} with labels {got:?}, not the schema's")
            }
            StoreError::BucketCount { got, want } => {
                write!(f, "histogram with {got} buckets, schema has {want}")
            }
            StoreError::BadValue { metric } => {
                write!(f, "metric {metric} with a non-finite or negative value")
            }
        }
    }
}

impl std::error::Error for StoreError {}

/// Series of every kind, keyed by metric and labels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricStore {
    histograms: BTreeMap<SeriesKey, HistogramData>,
    counters: BTreeMap<SeriesKey, u64>,
    gauges: BTreeMap<SeriesKey, f64>,
}

impl MetricStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The histogram series `def{labels}`, created empty if new.
    pub fn histogram_mut(&mut self, def: &'static MetricDef, labels: Labels) -> &mut HistogramData {
        debug_assert_eq!(def.kind, Kind::Histogram);
        self.histograms
            .entry((def.name, labels))
            .or_insert_with(|| HistogramData::empty(def))
    }

    /// Every series of histogram `def`, in label order.
    pub fn histograms<'a>(
        &'a self,
        def: &MetricDef,
    ) -> impl Iterator<Item = (&'a Labels, &'a HistogramData)> + 'a {
        series(&self.histograms, def.name)
    }

    pub fn histogram(&self, def: &MetricDef, labels: &Labels) -> Option<&HistogramData> {
        self.histograms.get(&(def.name, labels.clone()))
    }

    pub fn add_counter(&mut self, def: &'static MetricDef, labels: Labels, delta: u64) {
        debug_assert_eq!(def.kind, Kind::Counter);
        let c = self.counters.entry((def.name, labels)).or_insert(0);
        *c = c.saturating_add(delta);
    }

    /// Sets a counter to a cumulative total kept elsewhere (e.g. a drop count).
    pub fn set_counter(&mut self, def: &'static MetricDef, labels: Labels, total: u64) {
        debug_assert_eq!(def.kind, Kind::Counter);
        self.counters.insert((def.name, labels), total);
    }

    pub fn counter(&self, def: &MetricDef, labels: &Labels) -> Option<u64> {
        self.counters.get(&(def.name, labels.clone())).copied()
    }

    pub fn set_gauge(&mut self, def: &'static MetricDef, labels: Labels, v: f64) {
        debug_assert_eq!(def.kind, Kind::Gauge);
        self.gauges.insert((def.name, labels), v);
    }

    pub fn gauge(&self, def: &MetricDef, labels: &Labels) -> Option<f64> {
        self.gauges.get(&(def.name, labels.clone())).copied()
    }

    pub fn clear_gauges(&mut self) {
        self.gauges.clear();
    }

    /// Removes every series of gauge `def` (before setting the current ones, so series of a
    /// reading that went away disappear instead of keeping their last value).
    pub fn clear_gauge(&mut self, def: &MetricDef) {
        self.gauges.retain(|k, _| k.0 != def.name);
    }

    pub fn series_count(&self) -> usize {
        self.histograms.len() + self.counters.len() + self.gauges.len()
    }

    /// Adds every series of `other` into `self`: histograms and counters are summed, and so are
    /// gauges (the fleet view of "requests running" is the sum over agents), except device
    /// readings and ratios, which keep the largest ([`schema::gauge_merge`]).
    pub fn merge(&mut self, other: &MetricStore) -> Result<(), StoreError> {
        for ((name, labels), h) in &other.histograms {
            match self.histograms.get_mut(&(*name, labels.clone())) {
                Some(mine) => mine.merge(h)?,
                None => {
                    self.histograms.insert((name, labels.clone()), h.clone());
                }
            }
        }
        for ((name, labels), v) in &other.counters {
            let c = self.counters.entry((name, labels.clone())).or_insert(0);
            *c = c.saturating_add(*v);
        }
        for ((name, labels), v) in &other.gauges {
            match self.gauges.entry((name, labels.clone())) {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(*v);
                }
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    let mine = e.get_mut();
                    match schema::gauge_merge(name) {
                        schema::GaugeMerge::Sum => *mine += v,
                        schema::GaugeMerge::Max => *mine = mine.max(*v),
                    }
                }
            }
        }
        Ok(())
    }

    /// The report of what changed since `earlier` (a previous clone of this store): histogram
    /// and counter deltas (unchanged series left out), gauges at their current value.
    /// `sequence` is left 0 for the exporter to assign.
    pub fn interval_report(
        &self,
        earlier: &MetricStore,
        start_unix_ns: u64,
        end_unix_ns: u64,
    ) -> pb::IntervalReport {
        let histograms = self
            .histograms
            .iter()
            .filter_map(|(key, h)| {
                let d = match earlier.histograms.get(key) {
                    Some(e) => h.delta_since(e),
                    None => h.clone(),
                };
                (d.count > 0).then(|| pb::Histogram {
                    name: key.0.to_owned(),
                    labels: to_pb_labels(&key.1),
                    bucket_counts: d.buckets,
                    sum: d.sum,
                    count: d.count,
                })
            })
            .collect();
        let counters = self
            .counters
            .iter()
            .filter_map(|(key, &v)| {
                let e = earlier.counters.get(key).copied().unwrap_or(0);
                let d = if v >= e { v - e } else { v };
                (d > 0).then(|| pb::Counter {
                    name: key.0.to_owned(),
                    labels: to_pb_labels(&key.1),
                    value: d,
                })
            })
            .collect();
        let gauges = self
            .gauges
            .iter()
            .map(|(key, &v)| pb::Gauge {
                name: key.0.to_owned(),
                labels: to_pb_labels(&key.1),
                value: v,
            })
            .collect();
        pb::IntervalReport {
            sequence: 0,
            start_unix_ns,
            end_unix_ns,
            histograms,
            counters,
            gauges,
            profiles: Vec::new(),
        }
    }

    /// Validates a report against the schema and adds it in: histogram and counter deltas are
    /// summed into existing series, gauges replace theirs. `prefix` labels (e.g. node/agent) are
    /// prepended to every series; `map_value(label, value)` may rewrite label values (caps).
    /// Invalid series are skipped and returned; valid ones are applied either way.
    pub fn apply_report(
        &mut self,
        report: &pb::IntervalReport,
        prefix: &[(String, String)],
        mut map_value: impl FnMut(&str, &str) -> String,
    ) -> Vec<StoreError> {
        let mut errors = Vec::new();
        let mut labels_for = |def: &MetricDef, got: &[pb::Label]| -> Result<Labels, StoreError> {
            let names_match = def.accepts_label_names(got.iter().map(|l| l.name.as_str()));
            if !names_match {
                return Err(StoreError::WrongLabels {
                    metric: def.name.to_owned(),
                    got: got.iter().map(|l| l.name.clone()).collect(),
                });
            }
            let mut labels = prefix.to_vec();
            labels.extend(got.iter().map(|l| {
                (
                    l.name.clone(),
                    map_value(&l.name, schema::clamp_label_value(&l.value)),
                )
            }));
            Ok(labels)
        };
        for h in &report.histograms {
            let res = lookup_kind(&h.name, Kind::Histogram).and_then(|def| {
                if h.bucket_counts.len() != def.bucket_count() {
                    return Err(StoreError::BucketCount {
                        got: h.bucket_counts.len(),
                        want: def.bucket_count(),
                    });
                }
                if !h.sum.is_finite() || h.bucket_counts.iter().sum::<u64>() != h.count {
                    return Err(StoreError::BadValue {
                        metric: def.name.to_owned(),
                    });
                }
                let labels = labels_for(def, &h.labels)?;
                let delta = HistogramData {
                    buckets: h.bucket_counts.clone(),
                    sum: h.sum,
                    count: h.count,
                };
                self.histogram_mut(def, labels).merge(&delta)
            });
            errors.extend(res.err());
        }
        for c in &report.counters {
            let res = lookup_kind(&c.name, Kind::Counter).and_then(|def| {
                let labels = labels_for(def, &c.labels)?;
                self.add_counter(def, labels, c.value);
                Ok(())
            });
            errors.extend(res.err());
        }
        for g in &report.gauges {
            let res = lookup_kind(&g.name, Kind::Gauge).and_then(|def| {
                if !g.value.is_finite() {
                    return Err(StoreError::BadValue {
                        metric: def.name.to_owned(),
                    });
                }
                let labels = labels_for(def, &g.labels)?;
                self.set_gauge(def, labels, g.value);
                Ok(())
            });
            errors.extend(res.err());
        }
        errors
    }

    /// Every counter series of `def` (cumulative totals in a merged store), in label order.
    pub fn counters<'a>(&'a self, def: &MetricDef) -> impl Iterator<Item = (&'a Labels, u64)> + 'a {
        series(&self.counters, def.name).map(|(l, v)| (l, *v))
    }

    /// Every gauge series of `def`, in label order.
    pub fn gauges<'a>(&'a self, def: &MetricDef) -> impl Iterator<Item = (&'a Labels, f64)> + 'a {
        series(&self.gauges, def.name).map(|(l, v)| (l, *v))
    }

    /// Like [`MetricStore::merge`], but a series `self` does not hold yet is only added while
    /// `self` has fewer than `max_series` series; the others are left out and counted (the
    /// return value). Existing series always take their deltas.
    pub fn merge_capped(
        &mut self,
        other: &MetricStore,
        max_series: usize,
    ) -> Result<usize, StoreError> {
        let mut refused = 0;
        for ((name, labels), h) in &other.histograms {
            let total = self.series_count();
            match self.histograms.get_mut(&(*name, labels.clone())) {
                Some(mine) => mine.merge(h)?,
                None if total < max_series => {
                    self.histograms.insert((name, labels.clone()), h.clone());
                }
                None => refused += 1,
            }
        }
        for ((name, labels), v) in &other.counters {
            let total = self.series_count();
            match self.counters.get_mut(&(*name, labels.clone())) {
                Some(c) => *c = c.saturating_add(*v),
                None if total < max_series => {
                    self.counters.insert((name, labels.clone()), *v);
                }
                None => refused += 1,
            }
        }
        for ((name, labels), v) in &other.gauges {
            let total = self.series_count();
            match self.gauges.get_mut(&(*name, labels.clone())) {
                Some(g) => *g += v,
                None if total < max_series => {
                    self.gauges.insert((name, labels.clone()), *v);
                }
                None => refused += 1,
            }
        }
        Ok(refused)
    }

    /// The series of `self` that `other` does not hold (values from `self`): what disappeared
    /// between two snapshots.
    pub fn without(&self, other: &MetricStore) -> MetricStore {
        MetricStore {
            histograms: self
                .histograms
                .iter()
                .filter(|(k, _)| !other.histograms.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            counters: self
                .counters
                .iter()
                .filter(|(k, _)| !other.counters.contains_key(*k))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            gauges: self
                .gauges
                .iter()
                .filter(|(k, _)| !other.gauges.contains_key(*k))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        }
    }

    /// Keeps only the series whose labels `keep` accepts; returns how many were removed.
    pub fn retain_series(&mut self, mut keep: impl FnMut(&Labels) -> bool) -> usize {
        let before = self.series_count();
        self.histograms.retain(|k, _| keep(&k.1));
        self.counters.retain(|k, _| keep(&k.1));
        self.gauges.retain(|k, _| keep(&k.1));
        before - self.series_count()
    }

    /// OpenMetrics text of this store alone (see [`Collector`] to combine it with other metrics).
    pub fn encode_openmetrics(&self) -> Result<String, fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

fn lookup_kind(name: &str, kind: Kind) -> Result<&'static MetricDef, StoreError> {
    let def = schema::lookup(name)
        .ok_or_else(|| StoreError::UnknownMetric(schema::clamp_label_value(name).to_owned()))?;
    if def.kind != kind {
        return Err(StoreError::WrongKind {
            metric: def.name.to_owned(),
        });
    }
    Ok(def)
}

fn to_pb_labels(labels: &Labels) -> Vec<pb::Label> {
    labels
        .iter()
        .map(|(n, v)| pb::Label {
            name: n.clone(),
            value: v.clone(),
        })
        .collect()
}

fn series<'a, V>(
    map: &'a BTreeMap<SeriesKey, V>,
    name: &'static str,
) -> impl Iterator<Item = (&'a Labels, &'a V)> {
    map.range((name, Vec::new())..)
        .take_while(move |(k, _)| k.0 == name)
        .map(|(k, v)| (&k.1, v))
}

impl Collector for MetricStore {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        for def in schema::ALL {
            let metric_type = match def.kind {
                Kind::Histogram => MetricType::Histogram,
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut family =
                encoder.encode_descriptor(def.family_name(), def.help, None, metric_type)?;
            match def.kind {
                Kind::Histogram => {
                    for (labels, h) in series(&self.histograms, def.name) {
                        let buckets: Vec<(f64, u64)> = def
                            .bounds
                            .iter()
                            .copied()
                            .chain([f64::INFINITY])
                            .zip(h.buckets.iter().copied())
                            .collect();
                        if labels.is_empty() {
                            family
                                .encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)?;
                        } else {
                            family
                                .encode_family(labels)?
                                .encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)?;
                        }
                    }
                }
                Kind::Counter => {
                    for (labels, v) in series(&self.counters, def.name) {
                        if labels.is_empty() {
                            family.encode_counter::<NoLabelSet, _, u64>(v, None)?;
                        } else {
                            family
                                .encode_family(labels)?
                                .encode_counter::<NoLabelSet, _, u64>(v, None)?;
                        }
                    }
                }
                Kind::Gauge => {
                    for (labels, v) in series(&self.gauges, def.name) {
                        // `metric{} 1` is legal but unusual; write unlabelled series bare.
                        if labels.is_empty() {
                            family.encode_gauge(v)?;
                        } else {
                            family.encode_family(labels)?.encode_gauge(v)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{
        E2E_REQUEST_LATENCY, EVENTS_DROPPED, REQUESTS, REQUESTS_RUNNING, TIME_TO_FIRST_TOKEN,
    };

    #[test]
    fn device_gauges_merge_by_max_counts_by_sum() {
        let gpu: Labels = vec![
            (schema::LABEL_GPU.into(), "0".into()),
            (schema::LABEL_GPU_UUID.into(), "GPU-1".into()),
            (schema::LABEL_GPU_MODEL.into(), "H100".into()),
        ];
        let mut a = MetricStore::new();
        a.set_gauge(&schema::GPU_TEMPERATURE, gpu.clone(), 61.0);
        a.set_gauge(&REQUESTS_RUNNING, vec![], 2.0);
        let mut b = MetricStore::new();
        b.set_gauge(&schema::GPU_TEMPERATURE, gpu.clone(), 60.0);
        b.set_gauge(&REQUESTS_RUNNING, vec![], 3.0);
        let mut view = MetricStore::new();
        view.merge(&a).unwrap();
        view.merge(&b).unwrap();
        assert_eq!(view.gauge(&schema::GPU_TEMPERATURE, &gpu), Some(61.0));
        assert_eq!(view.gauge(&REQUESTS_RUNNING, &vec![]), Some(5.0));
        view.clear_gauge(&schema::GPU_TEMPERATURE);
        assert_eq!(view.gauge(&schema::GPU_TEMPERATURE, &gpu), None);
        assert_eq!(view.gauge(&REQUESTS_RUNNING, &vec![]), Some(5.0));
    }

    fn model(m: &str) -> Labels {
        vec![(schema::LABEL_MODEL.into(), m.into())]
    }

    #[test]
    fn histogram_merge_is_exact_and_checks_layout() {
        let def = &TIME_TO_FIRST_TOKEN;
        let (mut a, mut b, mut all) = (
            HistogramData::empty(def),
            HistogramData::empty(def),
            HistogramData::empty(def),
        );
        for (i, v) in [0.0005, 0.001, 0.003, 0.05, 0.05, 3.0, 9999.0]
            .into_iter()
            .enumerate()
        {
            if i % 2 == 0 {
                a.observe(def, v)
            } else {
                b.observe(def, v)
            }
            all.observe(def, v);
        }
        let mut merged = a.clone();
        merged.merge(&b).unwrap();
        assert_eq!(merged.buckets, all.buckets);
        assert_eq!(merged.count, 7);
        assert!((merged.sum - all.sum).abs() < 1e-9);
        assert_eq!(merged.buckets[0], 2, "0.0005 and 0.001 are <= 0.001");
        assert_eq!(
            *merged.buckets.last().unwrap(),
            1,
            "9999 s is above the last bound"
        );
        assert_eq!(merged.delta_since(&a).buckets, b.buckets);
        let other = HistogramData::empty(&E2E_REQUEST_LATENCY);
        assert!(matches!(
            merged.merge(&other),
            Err(StoreError::BucketCount { .. })
        ));
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let def = &TIME_TO_FIRST_TOKEN; // bounds 0.001, 0.005, 0.01, 0.02, ...
        let mut h = HistogramData::empty(def);
        assert_eq!(h.quantile(def, 0.5), None, "empty");
        // 4 in (0.005, 0.01], 4 in (0.01, 0.02].
        for v in [0.006, 0.007, 0.008, 0.009, 0.011, 0.012, 0.013, 0.014] {
            h.observe(def, v);
        }
        // Rank 4 of 8 is the end of the (0.005, 0.01] bucket.
        assert!((h.quantile(def, 0.5).unwrap() - 0.01).abs() < 1e-12);
        // Rank 2: halfway into the first populated bucket.
        assert!((h.quantile(def, 0.25).unwrap() - 0.0075).abs() < 1e-12);
        // Rank 7.2: 3.2 of 4 into (0.01, 0.02].
        assert!((h.quantile(def, 0.9).unwrap() - 0.018).abs() < 1e-12);
        assert!((h.quantile(def, 1.0).unwrap() - 0.02).abs() < 1e-12);
        // Values in the first bucket interpolate from 0.
        let mut low = HistogramData::empty(def);
        low.observe(def, 0.0005);
        low.observe(def, 0.0005);
        assert!((low.quantile(def, 0.5).unwrap() - 0.0005).abs() < 1e-12);
        // The +Inf bucket answers the largest finite bound.
        let mut inf = HistogramData::empty(def);
        inf.observe(def, 1e6);
        assert_eq!(inf.quantile(def, 0.99), Some(2560.0));
        assert_eq!(h.quantile(def, 1.5), None);
        assert_eq!(h.quantile(&E2E_REQUEST_LATENCY, 0.5), None, "wrong layout");
    }

    #[test]
    fn delta_report_roundtrip_equals_cumulative() {
        let mut agent = MetricStore::new();
        let mut last = MetricStore::new();
        let mut collector = MetricStore::new();
        for round in 0..3u64 {
            for i in 0..=round {
                agent
                    .histogram_mut(&TIME_TO_FIRST_TOKEN, model("m"))
                    .observe(&TIME_TO_FIRST_TOKEN, 0.01 * i as f64);
                agent.add_counter(
                    &REQUESTS,
                    vec![
                        ("model_name".into(), "m".into()),
                        ("outcome".into(), "ok".into()),
                    ],
                    1,
                );
            }
            agent.set_counter(
                &EVENTS_DROPPED,
                vec![("reason".into(), "ringbuf".into())],
                round * 5,
            );
            agent.set_gauge(&REQUESTS_RUNNING, vec![], round as f64);
            let report = agent.interval_report(&last, round, round + 1);
            last = agent.clone();
            assert!(collector
                .apply_report(&report, &[], |_, v| v.to_owned())
                .is_empty());
        }
        assert_eq!(collector, agent);
        // Nothing changed: the next report carries gauges only.
        let idle = agent.interval_report(&last, 3, 4);
        assert!(idle.histograms.is_empty() && idle.counters.is_empty());
        assert_eq!(idle.gauges.len(), 1);
    }

    #[test]
    fn counter_reset_is_counted_from_zero() {
        let mut s = MetricStore::new();
        s.set_counter(&EVENTS_DROPPED, vec![("reason".into(), "x".into())], 10);
        let earlier = s.clone();
        s.set_counter(&EVENTS_DROPPED, vec![("reason".into(), "x".into())], 3);
        let r = s.interval_report(&earlier, 0, 1);
        assert_eq!(r.counters[0].value, 3);
    }

    #[test]
    fn apply_rejects_what_the_schema_does_not_allow() {
        let def = &TIME_TO_FIRST_TOKEN;
        let ok_labels = vec![pb::Label {
            name: "model_name".into(),
            value: "m".into(),
        }];
        let mut good = HistogramData::empty(def);
        good.observe(def, 0.2);
        let h = |name: &str, labels: Vec<pb::Label>, buckets: Vec<u64>, count| pb::Histogram {
            name: name.into(),
            labels,
            bucket_counts: buckets,
            sum: 0.2,
            count,
        };
        let report = pb::IntervalReport {
            histograms: vec![
                h(def.name, ok_labels.clone(), good.buckets.clone(), 1),
                h("infertap_bogus", ok_labels.clone(), good.buckets.clone(), 1),
                h(def.name, vec![], good.buckets.clone(), 1),
                h(def.name, ok_labels.clone(), vec![1], 1),
                h(def.name, ok_labels.clone(), good.buckets.clone(), 2),
            ],
            counters: vec![pb::Counter {
                name: def.name.into(),
                labels: ok_labels.clone(),
                value: 1,
            }],
            gauges: vec![pb::Gauge {
                name: REQUESTS_RUNNING.name.into(),
                labels: vec![],
                value: f64::NAN,
            }],
            ..Default::default()
        };
        let mut s = MetricStore::new();
        let prefix = vec![("node".to_owned(), "n1".to_owned())];
        let errs = s.apply_report(&report, &prefix, |_, v| v.to_uppercase());
        let reasons: Vec<_> = errs.iter().map(StoreError::reason).collect();
        assert_eq!(
            reasons,
            [
                "unknown_metric",
                "wrong_labels",
                "bucket_count",
                "bad_value",
                "wrong_kind",
                "bad_value"
            ]
        );
        let labels = vec![
            ("node".to_owned(), "n1".to_owned()),
            ("model_name".to_owned(), "M".to_owned()),
        ];
        assert_eq!(s.histogram(def, &labels), Some(&good));
        assert_eq!(s.series_count(), 1);
    }

    #[test]
    fn encodes_openmetrics_with_schema_names() {
        let mut s = MetricStore::new();
        s.histogram_mut(&TIME_TO_FIRST_TOKEN, model("llama"))
            .observe(&TIME_TO_FIRST_TOKEN, 0.03);
        s.add_counter(
            &REQUESTS,
            vec![
                ("model_name".into(), "llama".into()),
                ("outcome".into(), "ok".into()),
            ],
            2,
        );
        s.set_gauge(&REQUESTS_RUNNING, vec![], 4.0);
        let text = s.encode_openmetrics().unwrap();
        assert!(
            text.contains("# TYPE infertap_time_to_first_token_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "infertap_time_to_first_token_seconds_bucket{le=\"0.02\",model_name=\"llama\"} 0\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "infertap_time_to_first_token_seconds_bucket{le=\"0.04\",model_name=\"llama\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "infertap_time_to_first_token_seconds_bucket{le=\"+Inf\",model_name=\"llama\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("infertap_time_to_first_token_seconds_count{model_name=\"llama\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("infertap_requests_total{model_name=\"llama\",outcome=\"ok\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("infertap_requests_running 4.0\n"), "{text}");
        for def in schema::ALL {
            assert!(
                text.contains(&format!("# TYPE {} ", def.family_name())),
                "{} missing",
                def.name
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    proptest::proptest! {
        /// Splitting observations across any number of agents and intervals, then merging the
        /// deltas, gives exactly the histogram of all observations.
        #[test]
        fn merge_of_any_split_equals_whole(
            obs in proptest::collection::vec((0u64..20_000_000_000, 0usize..4), 0..200),
        ) {
            let def = &TIME_TO_FIRST_TOKEN;
            let mut whole = HistogramData::empty(def);
            let mut parts = vec![HistogramData::empty(def); 4];
            for (ns, part) in &obs {
                let v = *ns as f64 / 1e9;
                whole.observe(def, v);
                parts[*part].observe(def, v);
            }
            let mut merged = HistogramData::empty(def);
            for p in &parts {
                merged.merge(p).unwrap();
            }
            proptest::prop_assert_eq!(&merged.buckets, &whole.buckets);
            proptest::prop_assert_eq!(merged.count, obs.len() as u64);
            proptest::prop_assert!((merged.sum - whole.sum).abs() < 1e-6);
            for (i, b) in def.bounds.iter().enumerate() {
                let below = obs.iter().filter(|(ns, _)| (*ns as f64 / 1e9) <= *b).count() as u64;
                proptest::prop_assert_eq!(merged.buckets[..=i].iter().sum::<u64>(), below);
            }
        }
    }
}
