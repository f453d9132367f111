//! OTLP for agent and collector: the metric store as OTLP metrics (explicit-bucket histograms
//! with the schema's bounds, monotonic sums and gauges, cumulative temporality, the Prometheus
//! names and label names), and an OTLP/gRPC client with the OTLP specification's retry rules.
//! Message types and clients are the `opentelemetry-proto` crate's (generated from the official
//! protos); nothing here encodes protobuf by hand.
//!
//! The metrics input is a cumulative [`MetricStore`] (the agent's Prometheus store, the
//! collector's merged view), cut as a report against an empty store so the values are the
//! totals since `start_unix_ns`: one source for both outputs, no second set of histograms.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};

use crate::pb::{IntervalReport, Label};
use crate::schema::{self, Kind, MetricDef};
use crate::store::MetricStore;

/// The generated OTLP types, for callers that build their own messages.
pub use opentelemetry_proto::tonic as proto;

/// An attribute with any value.
pub fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// A string attribute.
pub fn kv_str(key: &str, v: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.into()))
}

/// An integer attribute.
pub fn kv_i64(key: &str, v: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(v))
}

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

/// Parses a `--otlp-header KEY=VALUE` value (key lower-cased, value printable ASCII).
pub fn parse_header(s: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("--otlp-header {s:?}: expected KEY=VALUE"))?;
    let k = k.trim().to_ascii_lowercase();
    AsciiMetadataKey::from_str(&k).with_context(|| format!("--otlp-header: bad key {k:?}"))?;
    AsciiMetadataValue::from_str(v.trim())
        .with_context(|| format!("--otlp-header {k}: value is not printable ASCII"))?;
    Ok((k, v.trim().to_owned()))
}

/// Where and how an [`OtlpClient`] exports.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// OTLP/gRPC endpoint, e.g. `http://otel-collector:4317` (`http://` assumed when missing).
    pub endpoint: String,
    /// gRPC metadata sent with every export (auth headers).
    pub headers: Vec<(String, String)>,
    pub connect_timeout: Duration,
    /// Deadline of one export call.
    pub export_timeout: Duration,
    /// Backoff between attempts: doubles from `backoff_min` up to `backoff_max`, with jitter.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl ClientConfig {
    /// Defaults: connect 5 s, 10 s per export, backoff 100 ms → 5 s.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            headers: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            export_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// gRPC codes the OTLP specification lists as retryable.
pub fn retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Cancelled
            | DeadlineExceeded
            | Aborted
            | OutOfRange
            | Unavailable
            | DataLoss
            | ResourceExhausted
    )
}

/// `d` scaled by a random factor in [0.5, 1.0) so senders that lost the same receiver do not
/// retry in lockstep.
fn jitter(d: Duration) -> Duration {
    use std::hash::BuildHasher;
    let r = std::collections::hash_map::RandomState::new().hash_one(0u8) % 1000;
    d.mul_f64(0.5 + r as f64 / 2000.0)
}

/// An OTLP/gRPC client for traces and metrics over one lazily connected channel (reconnects
/// by itself once the receiver is back).
#[derive(Clone, Debug)]
pub struct OtlpClient {
    traces: TraceServiceClient<Channel>,
    metrics: MetricsServiceClient<Channel>,
    headers: MetadataMap,
    cfg: ClientConfig,
    url: String,
}

impl OtlpClient {
    /// Fails on an invalid URL or header, or an `https://` endpoint (this build has no TLS);
    /// an unreachable receiver only fails exports.
    pub fn new(cfg: ClientConfig) -> anyhow::Result<OtlpClient> {
        let url = if cfg.endpoint.contains("://") {
            cfg.endpoint.clone()
        } else {
            format!("http://{}", cfg.endpoint)
        };
        if !url.starts_with("http://") {
            anyhow::bail!(
                "OTLP endpoint {url:?}: only plain http:// gRPC is supported (no TLS in this build)"
            );
        }
        let channel = Endpoint::from_shared(url.clone())
            .with_context(|| format!("invalid OTLP endpoint {url:?}"))?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        let mut headers = MetadataMap::new();
        for (k, v) in &cfg.headers {
            let key = AsciiMetadataKey::from_str(k)
                .with_context(|| format!("--otlp-header: bad key {k:?}"))?;
            let value = AsciiMetadataValue::from_str(v)
                .with_context(|| format!("--otlp-header {k}: bad value"))?;
            headers.append(key, value);
        }
        Ok(OtlpClient {
            traces: TraceServiceClient::new(channel.clone()),
            metrics: MetricsServiceClient::new(channel),
            headers,
            cfg,
            url,
        })
    }

    /// The endpoint URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        *req.metadata_mut() = self.headers.clone();
        req.set_timeout(self.cfg.export_timeout);
        req
    }

    /// Exports spans, retrying retryable failures up to `attempts` calls in all;
    /// `on_failure` sees every failed call. `None` when every attempt failed.
    pub async fn export_traces(
        &self,
        msg: ExportTraceServiceRequest,
        attempts: u32,
        on_failure: &mut (dyn FnMut(&tonic::Status) + Send),
    ) -> Option<ExportTraceServiceResponse> {
        self.with_retries(attempts, on_failure, || {
            let mut c = self.traces.clone();
            let req = self.request(msg.clone());
            async move { c.export(req).await }
        })
        .await
    }

    /// Exports metrics, like [`OtlpClient::export_traces`].
    pub async fn export_metrics(
        &self,
        msg: ExportMetricsServiceRequest,
        attempts: u32,
        on_failure: &mut (dyn FnMut(&tonic::Status) + Send),
    ) -> Option<ExportMetricsServiceResponse> {
        self.with_retries(attempts, on_failure, || {
            let mut c = self.metrics.clone();
            let req = self.request(msg.clone());
            async move { c.export(req).await }
        })
        .await
    }

    /// Runs `call` until it succeeds, fails with a non-retryable code or has been made
    /// `attempts` times, with capped exponential backoff and jitter between calls.
    async fn with_retries<T, F, Fut>(
        &self,
        attempts: u32,
        on_failure: &mut (dyn FnMut(&tonic::Status) + Send),
        mut call: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut backoff = self.cfg.backoff_min;
        for attempt in 1..=attempts.max(1) {
            match call().await {
                Ok(r) => return Some(r.into_inner()),
                Err(status) => {
                    on_failure(&status);
                    if !retryable(status.code()) || attempt >= attempts {
                        return None;
                    }
                }
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(self.cfg.backoff_max);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Labels;

    #[test]
    fn headers_are_validated() {
        assert_eq!(
            parse_header("Authorization=Bearer abc").unwrap(),
            ("authorization".into(), "Bearer abc".into())
        );
        assert_eq!(
            parse_header("x-tenant = a=b").unwrap(),
            ("x-tenant".into(), "a=b".into())
        );
        assert!(parse_header("novalue").is_err());
        assert!(parse_header("bad key=v").is_err());
        assert!(parse_header("k=\u{7f}").is_err());
    }

    #[test]
    fn only_the_spec_codes_are_retried() {
        assert!(retryable(tonic::Code::Unavailable));
        assert!(retryable(tonic::Code::ResourceExhausted));
        assert!(!retryable(tonic::Code::InvalidArgument));
        assert!(!retryable(tonic::Code::Unauthenticated));
    }

    #[tokio::test]
    async fn tls_endpoints_are_refused_at_start() {
        assert!(OtlpClient::new(ClientConfig::new("https://otel:4317")).is_err());
        assert!(OtlpClient::new(ClientConfig::new("otel:4317")).is_ok());
    }

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
