//! Turns the collector's merged view into Prometheus remote-write 1.0 requests: one sample per
//! series, all with the snapshot's timestamp, the same series `/metrics` shows.
//!
//! * Histograms become `<name>_bucket{le="..."}` (cumulative, `le` formatted exactly as the
//!   `/metrics` encoder formats it, `+Inf` last), `<name>_sum` and `<name>_count`; counters keep
//!   their `_total` name; gauges their name. Every metric of [`schema::ALL`] is walked, so
//!   whatever the schema holds is sent, not a fixed list.
//! * The collector's own metrics are taken from their OpenMetrics text (the same text `/metrics`
//!   serves), so every self-metric any module registers is sent too.
//! * Labels are sorted by name (`__name__` included), as the remote-write spec requires.
//!   External labels (`--remote-write-label`) are added to every series unless a series already
//!   has that label.
//!
//! A request holds at most `max_samples` samples; each is protobuf-encoded (`WriteRequest` from
//! Prometheus's own `prompb` definitions) and compressed with snappy's block format.

use infertap_proto::prompb::{Label, Sample, TimeSeries, WriteRequest};
use infertap_proto::schema::{self, Kind};
use infertap_proto::store::MetricStore;
use prost::Message as _;

/// One remote-write request body, ready to send.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedBatch {
    /// Snappy block-compressed protobuf `WriteRequest`.
    pub body: Vec<u8>,
    /// Samples in it.
    pub samples: u32,
}

fn label(name: &str, value: &str) -> Label {
    Label {
        name: name.to_owned(),
        value: value.to_owned(),
    }
}

/// Builds one series with one sample; labels get sorted and the external labels merged in.
fn series(
    name: String,
    labels: impl IntoIterator<Item = Label>,
    external: &[(String, String)],
    value: f64,
    ts_ms: i64,
) -> TimeSeries {
    let mut labels: Vec<Label> = std::iter::once(Label {
        name: "__name__".into(),
        value: name,
    })
    .chain(labels)
    .collect();
    for (k, v) in external {
        if !labels.iter().any(|l| &l.name == k) {
            labels.push(label(k, v));
        }
    }
    labels.sort_by(|a, b| a.name.cmp(&b.name));
    TimeSeries {
        labels,
        samples: vec![Sample {
            value,
            timestamp: ts_ms,
        }],
        ..Default::default()
    }
}

/// Every series of the merged view (`view`, as `Fleet::snapshot` returns it) plus the
/// collector's self-metrics (`self_text`, OpenMetrics text) at `ts_ms`.
pub fn collect(
    view: &MetricStore,
    self_text: &str,
    external: &[(String, String)],
    ts_ms: i64,
) -> Vec<TimeSeries> {
    let mut out = Vec::with_capacity(view.series_count() * 4);
    visit(view, self_text, external, ts_ms, &mut |t| out.push(t));
    out
}

/// Prometheus's staleness marker: the NaN that tells a store a series ended (`value.StaleNaN`).
pub const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

/// The snapshot straight into encoded requests of at most `max_samples` samples each, without
/// holding every series in memory at once (a 1,000-agent fleet has hundreds of thousands).
/// Series of `gone` (in the previous snapshot, not in this one: a departed agent's gauges, a
/// pruned agent's totals) get a staleness marker, as Prometheus's own scrapes write, so stores
/// stop showing them at once instead of for their lookback window.
pub fn encode_snapshot(
    view: &MetricStore,
    gone: Option<&MetricStore>,
    self_text: &str,
    external: &[(String, String)],
    ts_ms: i64,
    max_samples: usize,
) -> Vec<EncodedBatch> {
    let max = max_samples.max(1);
    let mut out = Vec::new();
    let mut batch = Vec::with_capacity(max.min(100_000));
    let mut push = |t: TimeSeries, out: &mut Vec<EncodedBatch>| {
        batch.push(t);
        if batch.len() >= max {
            out.push(encode_one(std::mem::take(&mut batch)));
        }
    };
    visit(view, self_text, external, ts_ms, &mut |t| push(t, &mut out));
    if let Some(gone) = gone {
        visit(gone, "", external, ts_ms, &mut |mut t| {
            for s in &mut t.samples {
                s.value = f64::from_bits(STALE_NAN);
            }
            push(t, &mut out)
        });
    }
    if !batch.is_empty() {
        out.push(encode_one(batch));
    }
    out
}

fn visit(
    view: &MetricStore,
    self_text: &str,
    external: &[(String, String)],
    ts_ms: i64,
    out: &mut impl FnMut(TimeSeries),
) {
    let pairs =
        |l: &Vec<(String, String)>| l.iter().map(|(n, v)| label(n, v)).collect::<Vec<Label>>();
    for def in schema::ALL {
        match def.kind {
            Kind::Histogram => {
                for (labels, h) in view.histograms(def) {
                    let base = pairs(labels);
                    let mut cumulative = 0u64;
                    for (i, n) in h.buckets.iter().enumerate() {
                        cumulative += n;
                        let le = match def.bounds.get(i) {
                            Some(b) => dtoa::Buffer::new().format(*b).to_owned(),
                            None => "+Inf".to_owned(),
                        };
                        let mut l = base.clone();
                        l.push(label("le", &le));
                        out(series(
                            format!("{}_bucket", def.name),
                            l,
                            external,
                            cumulative as f64,
                            ts_ms,
                        ));
                    }
                    out(series(
                        format!("{}_sum", def.name),
                        base.clone(),
                        external,
                        h.sum,
                        ts_ms,
                    ));
                    out(series(
                        format!("{}_count", def.name),
                        base,
                        external,
                        h.count as f64,
                        ts_ms,
                    ));
                }
            }
            Kind::Counter => {
                for (labels, v) in view.counters(def) {
                    out(series(
                        def.name.to_owned(),
                        pairs(labels),
                        external,
                        v as f64,
                        ts_ms,
                    ));
                }
            }
            Kind::Gauge => {
                for (labels, v) in view.gauges(def) {
                    out(series(
                        def.name.to_owned(),
                        pairs(labels),
                        external,
                        v,
                        ts_ms,
                    ));
                }
            }
        }
    }
    for (name, labels, value) in parse_exposition(self_text) {
        out(series(name, labels, external, value, ts_ms));
    }
}

/// Samples of an OpenMetrics/Prometheus text exposition as written by `prometheus-client`
/// (`name{label="value",...} value`; comment lines skipped). Lines that do not parse are
/// skipped: the text is our own encoder's output, so that does not happen in practice.
pub fn parse_exposition(text: &str) -> Vec<(String, Vec<Label>, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<(String, Vec<Label>, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches(',');
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = r.find('=')?;
            let lname = r[..eq].to_owned();
            r = r[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = r.char_indices();
            let close = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => {
                        let (_, e) = chars.next()?;
                        value.push(if e == 'n' { '\n' } else { e });
                    }
                    '"' => break i,
                    c => value.push(c),
                }
            };
            r = &r[close + 1..];
            labels.push(Label { name: lname, value });
        }
    }
    // The value, then an optional timestamp or exemplar (not used).
    let v: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some((name.to_owned(), labels, v))
}

/// Splits `series` into requests of at most `max_samples` samples, each encoded and
/// snappy-compressed.
pub fn encode_batches(series: Vec<TimeSeries>, max_samples: usize) -> Vec<EncodedBatch> {
    let max = max_samples.max(1);
    let mut out = Vec::with_capacity(series.len() / max + 1);
    let mut it = series.into_iter().peekable();
    while it.peek().is_some() {
        out.push(encode_one(it.by_ref().take(max).collect()));
    }
    out
}

fn encode_one(chunk: Vec<TimeSeries>) -> EncodedBatch {
    let samples = chunk.iter().map(|s| s.samples.len()).sum::<usize>() as u32;
    let raw = WriteRequest {
        timeseries: chunk,
        metadata: Vec::new(),
    }
    .encode_to_vec();
    // A request is far below snappy's 4 GiB input limit, so this cannot fail.
    let body = snap::raw::Encoder::new()
        .compress_vec(&raw)
        .unwrap_or_default();
    EncodedBatch { body, samples }
}

/// Decodes a request body (tests, tools): snappy block → `WriteRequest`.
pub fn decode_batch(body: &[u8]) -> anyhow::Result<WriteRequest> {
    let raw = snap::raw::Decoder::new().decompress_vec(body)?;
    Ok(WriteRequest::decode(raw.as_slice())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use infertap_proto::pb;

    #[test]
    fn histograms_counters_gauges_and_self_metrics_become_sorted_series() {
        let def = &schema::TIME_TO_FIRST_TOKEN;
        let mut buckets = vec![0u64; def.bucket_count()];
        buckets[0] = 2;
        buckets[2] = 3;
        let report = pb::IntervalReport {
            histograms: vec![pb::Histogram {
                name: def.name.into(),
                labels: vec![pb::Label {
                    name: "model_name".into(),
                    value: "m".into(),
                }],
                bucket_counts: buckets,
                sum: 0.5,
                count: 5,
            }],
            ..Default::default()
        };
        let mut view = MetricStore::new();
        let prefix = vec![("node".to_owned(), "n1".to_owned())];
        assert!(view
            .apply_report(&report, &prefix, |_, v| v.to_owned())
            .is_empty());
        let text = "# HELP x_total X.\n# TYPE x_total counter\nx_total{reason=\"a \\\"b\\\"\",k=\"v\"} 7\ny 1.5\n# EOF\n";
        let s = collect(&view, text, &[("cluster".into(), "c1".into())], 1000);
        assert_eq!(s.len(), def.bucket_count() + 2 + 2);
        let first = &s[0];
        let names: Vec<&str> = first.labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["__name__", "cluster", "le", "model_name", "node"]);
        assert_eq!(
            first.labels[2].value,
            dtoa::Buffer::new().format(def.bounds[0])
        );
        assert_eq!(first.samples[0].value, 2.0);
        let third = &s[2];
        assert_eq!(third.samples[0].value, 5.0, "buckets are cumulative");
        let inf = &s[def.bucket_count() - 1];
        assert_eq!(inf.labels[2].value, "+Inf");
        assert_eq!(inf.samples[0].value, 5.0);
        let x = &s[s.len() - 2];
        assert_eq!(x.labels[0].value, "x_total");
        assert!(x
            .labels
            .iter()
            .any(|l| l.name == "reason" && l.value == "a \"b\""));
        assert_eq!(x.samples[0].value, 7.0);
        assert_eq!(s[s.len() - 1].samples[0].value, 1.5);
        assert!(s.iter().all(|t| t.samples[0].timestamp == 1000));
    }

    #[test]
    fn streamed_snapshot_encoding_equals_collect_then_batch() {
        let mut view = MetricStore::new();
        let def = &schema::TIME_TO_FIRST_TOKEN;
        view.histogram_mut(def, vec![("model_name".into(), "m".into())])
            .observe(def, 0.02);
        let text = "a 1\nb{x=\"y\"} 2\n";
        let whole = encode_batches(collect(&view, text, &[], 9), 7);
        assert_eq!(encode_snapshot(&view, None, text, &[], 9, 7), whole);
        assert!(whole.len() > 1);
        // A series gone since the last snapshot gets one staleness marker per sample series.
        let mut before = view.clone();
        before.set_gauge(
            &schema::REQUESTS_RUNNING,
            vec![("node".into(), "n".into())],
            3.0,
        );
        let gone = before.without(&view);
        let b = encode_snapshot(&view, Some(&gone), "", &[], 9, 1000);
        let ts: Vec<TimeSeries> = b
            .iter()
            .flat_map(|b| decode_batch(&b.body).unwrap().timeseries)
            .collect();
        let stale = ts.last().unwrap();
        assert_eq!(stale.labels[0].value, schema::REQUESTS_RUNNING.name);
        assert_eq!(stale.samples[0].value.to_bits(), STALE_NAN);
    }

    #[test]
    fn batches_hold_at_most_max_samples_and_roundtrip() {
        let s: Vec<TimeSeries> = (0..25)
            .map(|i| series(format!("m{i}"), [], &[], i as f64, 5))
            .collect();
        let b = encode_batches(s.clone(), 10);
        assert_eq!(b.iter().map(|b| b.samples).collect::<Vec<_>>(), [10, 10, 5]);
        let back: Vec<TimeSeries> = b
            .iter()
            .flat_map(|b| decode_batch(&b.body).unwrap().timeseries)
            .collect();
        assert_eq!(back, s);
    }
}
