//! The agent's Prometheus endpoint: `/metrics` (OpenMetrics text of the cumulative aggregates),
//! `/healthz` (the process answers) and `/readyz` (probes attached and the event drain running,
//! see [`crate::health`]), served with axum until shut down.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::aggregate::SharedMetrics;
use crate::health::{Readiness, ReadyState};

/// Content type of OpenMetrics text, which Prometheus negotiates and parses.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running metrics server; shut it down with [`MetricsServer::shutdown`].
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
    readiness: Readiness,
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
    let readiness = Readiness::default();
    let ready = readiness.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || metrics_response(metrics.clone(), extra.clone())),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(move || readyz(ready.clone())));
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
        readiness,
    })
}

/// `/readyz`: 200 `ready` or 503 with the reason.
async fn readyz(readiness: Readiness) -> axum::response::Response {
    let state = readiness.state();
    let code = match state {
        ReadyState::Ready => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, state.describe()).into_response()
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

    /// The state `/readyz` reports; the pipeline marks it attached and beats it per drain.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out[9..12].parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|x| x.1)
            .unwrap_or("")
            .to_owned();
        (code, body)
    }

    #[tokio::test]
    async fn readyz_follows_attachment_and_drain() {
        let srv = serve("127.0.0.1:0".parse().unwrap(), SharedMetrics::default())
            .await
            .unwrap();
        let addr = srv.local_addr();
        let r = srv.readiness();
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(
            (code, body.as_str()),
            (503, "not ready: probes not attached\n")
        );
        r.set_attached(true);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        r.drained();
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));
        r.set_stall_after(std::time::Duration::from_millis(50));
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(
            body.starts_with("not ready: event drain stalled for"),
            "{body}"
        );
        srv.shutdown().await.unwrap();
    }
}
