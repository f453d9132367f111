//! Reads the few runbook series out of an engine's own Prometheus text (vLLM, SGLang, TGI,
//! llama.cpp) with `prom_text_format_parser` (a grammar-based parser of the text format; the
//! older `prometheus-parse` crate does not accept the `:` every engine but TGI uses in its
//! names). The mapping per engine is [`FIELDS`]; the README has the same table.

use std::collections::BTreeMap;

/// An engine whose metrics infertap knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Engine {
    Vllm,
    Sglang,
    Tgi,
    Llamacpp,
}

impl Engine {
    /// The `engine` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::Tgi => "tgi",
            Engine::Llamacpp => "llamacpp",
        }
    }

    /// The engine whose metric names start like `name`.
    fn of_metric(name: &str) -> Option<Engine> {
        if name.starts_with("vllm:") {
            Some(Engine::Vllm)
        } else if name.starts_with("sglang:") {
            Some(Engine::Sglang)
        } else if name.starts_with("tgi_") {
            Some(Engine::Tgi)
        } else if name.starts_with("llamacpp:") {
            Some(Engine::Llamacpp)
        } else {
            None
        }
    }
}

/// What one engine series stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// KV-cache usage, 0-1.
    KvCacheUsage,
    RequestsRunning,
    RequestsWaiting,
    /// Cumulative preemptions (vLLM) / retractions (SGLang).
    PreemptionsTotal,
    /// Cumulative prefix-cache hits, in tokens (vLLM v1).
    PrefixHitsTotal,
    /// Cumulative prefix-cache queries, in tokens (vLLM v1).
    PrefixQueriesTotal,
    /// A hit ratio the engine computes itself, 0-1.
    PrefixHitRatio,
    BatchSize,
}

impl Field {
    /// Ratios combine by max over an engine's series of one model (vLLM's data-parallel
    /// `engine` index), everything else by sum.
    fn is_ratio(self) -> bool {
        matches!(self, Field::KvCacheUsage | Field::PrefixHitRatio)
    }
}

/// Engine series → what they mean, as exposed (counters with their `_total` suffix). Names
/// checked against the engines' source: vLLM 0.32 `v1/metrics/loggers.py` (and the v0 names
/// older releases export), SGLang `srt/metrics/collector.py`, TGI `router/src`, llama.cpp
/// `tools/server` (`kv_cache_usage_ratio` only in older builds).
pub const FIELDS: &[(Engine, &str, Field)] = &[
    (
        Engine::Vllm,
        "vllm:kv_cache_usage_perc",
        Field::KvCacheUsage,
    ),
    (
        Engine::Vllm,
        "vllm:gpu_cache_usage_perc",
        Field::KvCacheUsage,
    ),
    (
        Engine::Vllm,
        "vllm:num_requests_running",
        Field::RequestsRunning,
    ),
    (
        Engine::Vllm,
        "vllm:num_requests_waiting",
        Field::RequestsWaiting,
    ),
    (
        Engine::Vllm,
        "vllm:num_preemptions_total",
        Field::PreemptionsTotal,
    ),
    (
        Engine::Vllm,
        "vllm:prefix_cache_hits_total",
        Field::PrefixHitsTotal,
    ),
    (
        Engine::Vllm,
        "vllm:prefix_cache_queries_total",
        Field::PrefixQueriesTotal,
    ),
    (
        Engine::Vllm,
        "vllm:gpu_prefix_cache_hit_rate",
        Field::PrefixHitRatio,
    ),
    (Engine::Sglang, "sglang:token_usage", Field::KvCacheUsage),
    (
        Engine::Sglang,
        "sglang:num_running_reqs",
        Field::RequestsRunning,
    ),
    (
        Engine::Sglang,
        "sglang:num_queue_reqs",
        Field::RequestsWaiting,
    ),
    (
        Engine::Sglang,
        "sglang:num_retracted_requests_total",
        Field::PreemptionsTotal,
    ),
    (
        Engine::Sglang,
        "sglang:cache_hit_rate",
        Field::PrefixHitRatio,
    ),
    (
        Engine::Tgi,
        "tgi_batch_current_size",
        Field::RequestsRunning,
    ),
    (Engine::Tgi, "tgi_batch_current_size", Field::BatchSize),
    (Engine::Tgi, "tgi_queue_size", Field::RequestsWaiting),
    (
        Engine::Llamacpp,
        "llamacpp:kv_cache_usage_ratio",
        Field::KvCacheUsage,
    ),
    (
        Engine::Llamacpp,
        "llamacpp:requests_processing",
        Field::RequestsRunning,
    ),
    (
        Engine::Llamacpp,
        "llamacpp:requests_deferred",
        Field::RequestsWaiting,
    ),
];

/// Label value used where the engine names no model (TGI, llama.cpp).
pub const NO_MODEL: &str = infertap_proto::schema::MODEL_UNKNOWN;

/// One parse of an engine's metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineReading {
    /// `None`: Prometheus text, but no engine infertap knows.
    pub engine: Option<Engine>,
    /// Per model (the engine's `model_name` label, [`NO_MODEL`] without one): the fields found.
    pub models: BTreeMap<String, Vec<(Field, f64)>>,
    /// Series the text parser rejected (the others are still read).
    pub rejected_metrics: usize,
}

/// Why a body is not an engine's metrics.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not Prometheus text: {0}")]
    NotPrometheus(String),
}

/// Parses a `/metrics` body.
pub fn parse(body: &str) -> Result<EngineReading, ParseError> {
    use prom_text_format_parser::ScrapeParseError;
    let (metrics, errors) = prom_text_format_parser::parse_scrape(body);
    if metrics.is_empty() {
        let why = match errors {
            None => "no metrics".to_owned(),
            Some(ScrapeParseError::Parse(e)) => e,
            Some(ScrapeParseError::Collect(v)) => v.first().map_or_else(String::new, |m| {
                format!("line {}: {}", m.line_no.start, m.error)
            }),
        };
        let why: String = why.chars().take(200).collect();
        return Err(ParseError::NotPrometheus(why));
    }
    let rejected_metrics = match errors {
        None => 0,
        Some(ScrapeParseError::Parse(_)) => 1,
        Some(ScrapeParseError::Collect(v)) => v.len(),
    };
    let engine = metrics.iter().find_map(|m| Engine::of_metric(&m.name));
    let mut out = EngineReading {
        engine,
        rejected_metrics,
        ..Default::default()
    };
    let Some(engine) = engine else {
        return Ok(out);
    };
    for m in &metrics {
        for &(e, name, field) in FIELDS {
            if e != engine || m.name != name {
                continue;
            }
            for s in &m.samples {
                let Ok(v) = s.value.value.parse::<f64>() else {
                    continue;
                };
                if !v.is_finite() {
                    continue;
                }
                let model = s
                    .labels
                    .iter()
                    .find(|l| l.key == "model_name")
                    .map_or(NO_MODEL, |l| l.value.as_str());
                let fields = out.models.entry(model.to_owned()).or_default();
                match fields.iter_mut().find(|(f, _)| *f == field) {
                    Some((_, have)) if field.is_ratio() => *have = have.max(v),
                    Some((_, have)) => *have += v,
                    None => fields.push((field, v)),
                }
            }
        }
    }
    Ok(out)
}

impl EngineReading {
    /// The value of `field` for `model`.
    pub fn get(&self, model: &str, field: Field) -> Option<f64> {
        self.models
            .get(model)?
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_series_fold_per_model_over_engine_indexes() {
        let body = "\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25
vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.5
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine=\"0\",model_name=\"m\"} 7.0
# HELP vllm:num_preemptions_created Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_created gauge
vllm:num_preemptions_created{engine=\"0\",model_name=\"m\"} 1.7e+09
";
        let r = parse(body).unwrap();
        assert_eq!(r.engine, Some(Engine::Vllm));
        assert_eq!(r.get("m", Field::RequestsRunning), Some(5.0));
        assert_eq!(r.get("m", Field::KvCacheUsage), Some(0.5));
        assert_eq!(r.get("m", Field::PreemptionsTotal), Some(7.0));
        assert_eq!(r.get("m", Field::RequestsWaiting), None);
        assert_eq!(r.rejected_metrics, 0);
    }

    #[test]
    fn tgi_and_llamacpp_have_no_model_label() {
        let tgi = "# TYPE tgi_queue_size gauge\ntgi_queue_size 4\n# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 9\n";
        let r = parse(tgi).unwrap();
        assert_eq!(r.engine, Some(Engine::Tgi));
        assert_eq!(r.get(NO_MODEL, Field::RequestsWaiting), Some(4.0));
        assert_eq!(r.get(NO_MODEL, Field::BatchSize), Some(9.0));
        assert_eq!(r.get(NO_MODEL, Field::RequestsRunning), Some(9.0));
        let llama = "# HELP llamacpp:requests_deferred Number of requests deferred\n# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 2\n";
        let r = parse(llama).unwrap();
        assert_eq!(r.engine, Some(Engine::Llamacpp));
        assert_eq!(r.get(NO_MODEL, Field::RequestsWaiting), Some(2.0));
    }

    #[test]
    fn other_text_is_not_an_engine() {
        assert!(parse("<html>not found</html>").is_err());
        assert!(parse("").is_err());
        let r = parse("# TYPE up gauge\nup 1\n").unwrap();
        assert_eq!(r.engine, None);
        assert!(r.models.is_empty());
    }
}
