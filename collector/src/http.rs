//! The collector's HTTP endpoints (all on the metrics address):
//! - `GET /metrics`: OpenMetrics text of the merged fleet view and the collector's own metrics.
//! - `GET /healthz`.
//! - `GET /pprof/profile?node=&agent=&type=&from=&to=&label=`: the matching stored profiles
//!   merged into one gzipped pprof (see [`crate::query::selection`] for the parameters). 400 with
//!   a message on bad parameters; 404 when a `node` is named that has no stored profile at all;
//!   otherwise 200, with a valid empty profile (no samples) when nothing overlaps the range.
//!   `X-Infertap-Profiles` says how many profiles were merged.
//! - `GET /pprof/nodes`: JSON listing what the store holds per node, agent and type.
//! - `GET /ui`: the web page (latency percentiles and a flame graph).

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use infertap_proto::pprof;

use crate::query::{self, Selection};
use crate::{unix_now_ns, Fleet, OPENMETRICS_CONTENT_TYPE};

/// Header with the number of profiles merged into a `/pprof/profile` answer.
pub const PROFILES_HEADER: &str = "x-infertap-profiles";

pub(crate) fn router(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/pprof/profile", get(profile))
        .route("/pprof/nodes", get(nodes))
        .route("/ui", get(ui))
        .route(
            "/",
            get(|| async { axum::response::Redirect::temporary("/ui") }),
        )
        .with_state(fleet)
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut body = msg.into();
    body.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn metrics(State(fleet): State<Arc<Fleet>>) -> Response {
    fleet.sweep();
    match fleet.encode_openmetrics() {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::error!("encoding metrics failed: {e}");
            text(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed")
        }
    }
}

/// Named nodes that have nothing stored, for the 404 answer.
fn unknown_nodes(fleet: &Fleet, sel: &Selection) -> Vec<String> {
    sel.query
        .nodes
        .iter()
        .filter(|n| !fleet.profiles().has_node(n))
        .cloned()
        .collect()
}

async fn profile(State(fleet): State<Arc<Fleet>>, RawQuery(raw): RawQuery) -> Response {
    let sel = match query::selection(raw.as_deref(), unix_now_ns()) {
        Ok(s) => s,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let missing = unknown_nodes(&fleet, &sel);
    if !missing.is_empty() && missing.len() == sel.query.nodes.len() {
        let mut stored: Vec<String> = fleet
            .profiles()
            .summary()
            .into_iter()
            .map(|s| s.node)
            .collect();
        stored.dedup();
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "no profiles stored for node {}; nodes with profiles: {} (see /pprof/nodes)",
                missing.join(", "),
                if stored.is_empty() {
                    "none".to_owned()
                } else {
                    stored.join(", ")
                }
            ),
        );
    }
    let kind = sel.query.kind;
    let (from, to) = (sel.query.from_unix_ns, sel.query.to_unix_ns);
    let f = fleet.clone();
    let merged = tokio::task::spawn_blocking(move || f.profiles().merge(&sel.query)).await;
    let merged = match merged {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("profile merge failed: {e}");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "profile merge failed");
        }
    };
    let count = merged.profiles;
    let profile = merged
        .profile
        .unwrap_or_else(|| pprof::empty(kind, from, to));
    let body = pprof::encode_gzip(&profile);
    let mut resp = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (
                header::CONTENT_DISPOSITION,
                match kind {
                    pprof::ProfileKind::Cpu => "attachment; filename=\"infertap-cpu.pb.gz\"",
                    pprof::ProfileKind::OffCpu => "attachment; filename=\"infertap-offcpu.pb.gz\"",
                    pprof::ProfileKind::Gpu => "attachment; filename=\"infertap-gpu.pb.gz\"",
                    pprof::ProfileKind::SlowTokens => {
                        "attachment; filename=\"infertap-slow_tokens.pb.gz\""
                    }
                },
            ),
        ],
        body,
    )
        .into_response();
    resp.headers_mut()
        .insert(PROFILES_HEADER, HeaderValue::from(count));
    resp
}

#[derive(serde::Serialize)]
struct NodesAnswer {
    retention_seconds: u64,
    max_bytes: usize,
    stored_bytes: usize,
    stored_profiles: usize,
    series: Vec<crate::profiles::SeriesSummary>,
}

async fn nodes(State(fleet): State<Arc<Fleet>>) -> Response {
    let store = fleet.profiles();
    let (stored_bytes, stored_profiles) = store.totals();
    let answer = NodesAnswer {
        retention_seconds: store.config().retention.as_secs(),
        max_bytes: store.config().max_bytes,
        stored_bytes,
        stored_profiles,
        series: store.summary(),
    };
    match serde_json::to_string_pretty(&answer) {
        Ok(mut body) => {
            body.push('\n');
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}")),
    }
}

async fn ui(State(fleet): State<Arc<Fleet>>, RawQuery(raw): RawQuery) -> Response {
    let page = fleet
        .run_cpu(move |f| crate::ui::page(f, raw.as_deref()))
        .await;
    match page {
        Ok((status, html)) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response(),
        Err(e) => {
            tracing::error!("rendering /ui failed: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering the page failed",
            )
        }
    }
}
