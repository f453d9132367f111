//! The agent's Prometheus endpoint: `/metrics` (OpenMetrics text of the cumulative aggregates)
//! and `/healthz`, served with axum until shut down.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::aggregate::SharedMetrics;

/// Content type of OpenMetrics text, which Prometheus negotiates and parses.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running metrics server; shut it down with [`MetricsServer::shutdown`].
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

/// Extra node-local metric families appended to `/metrics` (OpenMetrics text; a trailing
/// `# EOF` is removed), e.g. the NVML device gauges.
pub type ExtraMetrics = std::sync::Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Binds `addr` (port 0 picks a free port) and serves `metrics` on `/metrics`.
pub async fn serve(addr: SocketAddr, metrics: SharedMetrics) -> anyhow::Result<MetricsServer> {
    serve_with(addr, metrics, None).await
}

/// Like [`serve`], with extra families after the aggregates.
pub async fn serve_with(
    addr: SocketAddr,
    metrics: SharedMetrics,
    extra: Option<ExtraMetrics>,
) -> anyhow::Result<MetricsServer> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics address {addr}"))?;
    let local_addr = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || metrics_response(metrics.clone(), extra.clone())),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(%local_addr, "serving Prometheus metrics on /metrics");
    Ok(MetricsServer {
        local_addr,
        stop,
        task,
    })
}

async fn metrics_response(
    metrics: SharedMetrics,
    extra: Option<ExtraMetrics>,
) -> axum::response::Response {
    match metrics.encode_openmetrics() {
        Ok(mut body) => {
            if let Some(text) = extra.and_then(|f| f()) {
                // One `# EOF` at the very end, as OpenMetrics requires.
                if body.ends_with("# EOF\n") {
                    body.truncate(body.len() - "# EOF\n".len());
                }
                body.push_str(text.strip_suffix("# EOF\n").unwrap_or(&text));
                body.push_str("# EOF\n");
            }
            ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response()
        }
        Err(e) => {
            tracing::error!("encoding metrics failed: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
    }
}

impl MetricsServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight scrapes finish, and waits for the server task.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task
            .await
            .context("metrics server task")?
            .context("metrics server")
    }
}
