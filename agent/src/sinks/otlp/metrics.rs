//! The Prometheus endpoint's series as OTLP metrics: explicit-bucket histograms with the
//! schema's bounds, monotonic sums and gauges, cumulative temporality, the same metric names and
//! the same attribute names as the Prometheus labels.
//!
//! The input is the cumulative store the Prometheus endpoint serves
//! ([`crate::aggregate::SharedMetrics`]), cut as a report against an empty store (so the values
//! are the totals since `start_unix_ns`): one source for both outputs, no second set of
//! histograms.

use infertap_proto::pb::{IntervalReport, Label};
use infertap_proto::schema::{self, Kind, MetricDef};
use infertap_proto::store::MetricStore;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::span::kv_str;

/// The UCUM unit of a metric, from its Prometheus name's unit suffix.
pub fn unit(def: &MetricDef) -> &'static str {
    let base = def.name.strip_suffix("_total").unwrap_or(def.name);
    if base.ends_with("_seconds") {
        "s"
    } else if base.ends_with("_joules") {
        "J"
    } else if base.ends_with("_bytes") {
        "By"
    } else if base.contains("tokens") {
        "{token}"
    } else {
        "1"
    }
}

fn attributes(labels: &[Label]) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|l| kv_str(&l.name, l.value.clone()))
        .collect()
}

/// Every series of `store` as OTLP metrics, cumulative since `start_unix_ns`, stamped `now`.
pub fn resource_metrics(
    store: &MetricStore,
    start_unix_ns: u64,
    now_unix_ns: u64,
    resource: Resource,
) -> ResourceMetrics {
    let totals = store.interval_report(&MetricStore::new(), start_unix_ns, now_unix_ns);
    resource_metrics_from_report(&totals, resource)
}

/// Converts a report of cumulative values (see [`resource_metrics`]) to OTLP. Series whose name
/// the schema does not know are left out (there are none from our own stores).
pub fn resource_metrics_from_report(
    totals: &IntervalReport,
    resource: Resource,
) -> ResourceMetrics {
    let (start, now) = (totals.start_unix_ns, totals.end_unix_ns);
    let cumulative = AggregationTemporality::Cumulative as i32;
    let mut metrics: Vec<Metric> = Vec::new();
    for def in schema::ALL {
        let data = match def.kind {
            Kind::Histogram => {
                let points: Vec<HistogramDataPoint> = totals
                    .histograms
                    .iter()
                    .filter(|h| h.name == def.name && h.bucket_counts.len() == def.bucket_count())
                    .map(|h| HistogramDataPoint {
                        attributes: attributes(&h.labels),
                        start_time_unix_nano: start,
                        time_unix_nano: now,
                        count: h.count,
                        sum: Some(h.sum),
                        bucket_counts: h.bucket_counts.clone(),
                        explicit_bounds: def.bounds.to_vec(),
                        ..Default::default()
                    })
                    .collect();
                (!points.is_empty()).then_some(metric::Data::Histogram(Histogram {
                    data_points: points,
                    aggregation_temporality: cumulative,
                }))
            }
            Kind::Counter => {
                let points: Vec<NumberDataPoint> = totals
                    .counters
                    .iter()
                    .filter(|c| c.name == def.name)
                    .map(|c| NumberDataPoint {
                        attributes: attributes(&c.labels),
                        start_time_unix_nano: start,
                        time_unix_nano: now,
                        value: Some(number_data_point::Value::AsInt(
                            i64::try_from(c.value).unwrap_or(i64::MAX),
                        )),
                        ..Default::default()
                    })
                    .collect();
                (!points.is_empty()).then_some(metric::Data::Sum(Sum {
                    data_points: points,
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                }))
            }
            Kind::Gauge => {
                let points: Vec<NumberDataPoint> = totals
                    .gauges
                    .iter()
                    .filter(|g| g.name == def.name)
                    .map(|g| NumberDataPoint {
                        attributes: attributes(&g.labels),
                        time_unix_nano: now,
                        value: Some(number_data_point::Value::AsDouble(g.value)),
                        ..Default::default()
                    })
                    .collect();
                (!points.is_empty()).then_some(metric::Data::Gauge(Gauge {
                    data_points: points,
                }))
            }
        };
        if let Some(data) = data {
            metrics.push(Metric {
                name: def.name.to_owned(),
                description: def.help.to_owned(),
                unit: unit(def).to_owned(),
                data: Some(data),
                ..Default::default()
            });
        }
    }
    ResourceMetrics {
        resource: Some(resource),
        scope_metrics: vec![ScopeMetrics {
            scope: Some(instrumentation_scope()),
            metrics,
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    }
}

/// The instrumentation scope of everything infertap exports.
pub fn instrumentation_scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "infertap".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infertap_proto::store::Labels;

    #[test]
    fn histograms_keep_the_schema_bounds_and_counts_are_cumulative() {
        let mut store = MetricStore::new();
        let def = &schema::TIME_TO_FIRST_TOKEN;
        let labels: Labels = vec![(schema::LABEL_MODEL.into(), "m".into())];
        for v in [0.003, 0.2, 0.2] {
            store.histogram_mut(def, labels.clone()).observe(def, v);
        }
        store.add_counter(
            &schema::REQUESTS,
            vec![
                (schema::LABEL_MODEL.into(), "m".into()),
                (schema::LABEL_OUTCOME.into(), "ok".into()),
            ],
            3,
        );
        store.set_gauge(&schema::REQUESTS_RUNNING, Vec::new(), 2.0);
        let rm = resource_metrics(&store, 10, 20, Resource::default());
        let ms = &rm.scope_metrics[0].metrics;
        let ttft = ms.iter().find(|m| m.name == def.name).unwrap();
        assert_eq!(ttft.unit, "s");
        let Some(metric::Data::Histogram(h)) = &ttft.data else {
            panic!("not a histogram")
        };
        assert_eq!(
            h.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let p = &h.data_points[0];
        assert_eq!(p.explicit_bounds, def.bounds);
        assert_eq!(p.bucket_counts.len(), def.bounds.len() + 1);
        assert_eq!(p.count, 3);
        assert_eq!(p.bucket_counts.iter().sum::<u64>(), 3);
        assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (10, 20));
        assert_eq!(p.attributes[0].key, schema::LABEL_MODEL);
        let reqs = ms
            .iter()
            .find(|m| m.name == "infertap_requests_total")
            .unwrap();
        let Some(metric::Data::Sum(s)) = &reqs.data else {
            panic!("not a sum")
        };
        assert!(s.is_monotonic);
        assert_eq!(
            s.data_points[0].value,
            Some(number_data_point::Value::AsInt(3))
        );
        assert_eq!(reqs.unit, "1");
        let running = ms
            .iter()
            .find(|m| m.name == "infertap_requests_running")
            .unwrap();
        assert!(matches!(running.data, Some(metric::Data::Gauge(_))));
    }
}
