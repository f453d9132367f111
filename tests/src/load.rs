//! Closed-loop load: N concurrent keep-alive connections, each sending requests back to back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::client::{ClientConn, ClientRecord, Endpoint, RequestSpec};

/// Which endpoint each request uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EndpointMix {
    Chat,
    Completions,
    /// Alternate between the two (per request, across connections).
    Mixed,
}

#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub addr: SocketAddr,
    pub concurrency: u32,
    /// Stop after this many requests in total (across connections)...
    pub requests: Option<u64>,
    /// ...or after this long (requests in flight finish).
    pub duration: Option<Duration>,
    pub max_tokens: u32,
    pub endpoint: EndpointMix,
    pub stream: bool,
    pub model: Option<String>,
    /// Extra headers sent with every request.
    pub headers: Vec<(String, String)>,
}

impl LoadConfig {
    pub fn new(addr: SocketAddr) -> Self {
        LoadConfig {
            addr,
            concurrency: 1,
            requests: Some(1),
            duration: None,
            max_tokens: 16,
            endpoint: EndpointMix::Chat,
            stream: true,
            model: None,
            headers: Vec::new(),
        }
    }
}

/// Prompts vary so consecutive requests do not hit a prompt cache identically.
const PROMPTS: &[&str] = &[
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some facts about the moon.",
    "Describe a busy market in the morning.",
    "What makes bread rise?",
    "Tell me about the history of maps.",
];

/// Parses `http://host:port[/...]` or `host:port` into a socket address.
pub fn parse_url(url: &str) -> Result<SocketAddr> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or(rest);
    use std::net::ToSocketAddrs;
    hostport
        .to_socket_addrs()
        .with_context(|| format!("bad url {url:?}"))?
        .next()
        .with_context(|| format!("no address for {url:?}"))
}

/// Runs the load; every finished request is also sent to `live` (if given) as it completes.
pub async fn run_load(
    cfg: &LoadConfig,
    live: Option<mpsc::UnboundedSender<ClientRecord>>,
) -> Result<Vec<ClientRecord>> {
    let issued = Arc::new(AtomicU64::new(0));
    let deadline = cfg.duration.map(|d| Instant::now() + d);
    let mut tasks = Vec::new();
    for slot in 0..cfg.concurrency {
        let cfg = cfg.clone();
        let issued = issued.clone();
        let live = live.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut conn: Option<ClientConn> = None;
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let n = issued.fetch_add(1, Ordering::SeqCst);
                if cfg.requests.is_some_and(|r| n >= r) {
                    break;
                }
                let c = match conn.take() {
                    Some(c) if c.is_reusable() => c,
                    _ => match ClientConn::connect(cfg.addr).await {
                        Ok(mut c) => {
                            c.conn_index = slot;
                            c
                        }
                        Err(e) => {
                            let rec = ClientRecord {
                                conn_index: slot,
                                error: Some(format!("{e:#}")),
                                ..Default::default()
                            };
                            out.push(rec);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let mut c = c;
                let endpoint = match cfg.endpoint {
                    EndpointMix::Chat => Endpoint::Chat,
                    EndpointMix::Completions => Endpoint::Completions,
                    EndpointMix::Mixed if n.is_multiple_of(2) => Endpoint::Chat,
                    EndpointMix::Mixed => Endpoint::Completions,
                };
                let mut spec = RequestSpec::new(endpoint, cfg.max_tokens);
                spec.stream = cfg.stream;
                spec.model = cfg.model.clone();
                spec.headers = cfg.headers.clone();
                spec.prompt = PROMPTS[(n as usize) % PROMPTS.len()].to_string();
                let rec = c.request(&spec).await;
                if let Some(l) = &live {
                    let _ = l.send(rec.clone());
                }
                out.push(rec);
                conn = Some(c);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("load task panicked")?);
    }
    all.sort_by_key(|r| r.send_unix_ns);
    Ok(all)
}

/// Runs explicit request sequences: each inner list goes, in order, over one keep-alive
/// connection (a new connection is opened if the server or an abort closed it); the lists run
/// concurrently. Returns records per list, in order.
pub async fn run_sequences(
    addr: SocketAddr,
    sequences: Vec<Vec<RequestSpec>>,
) -> Result<Vec<Vec<ClientRecord>>> {
    let mut tasks = Vec::new();
    for (slot, seq) in sequences.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut conn: Option<ClientConn> = None;
            for spec in seq {
                let mut c = match conn.take() {
                    Some(c) if c.is_reusable() => c,
                    _ => ClientConn::connect(addr).await?,
                };
                c.conn_index = slot as u32;
                out.push(c.request(&spec).await);
                conn = Some(c);
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.context("sequence task panicked")??);
    }
    Ok(all)
}

/// Blocking wrapper of [`run_sequences`] for synchronous tests.
pub fn run_sequences_blocking(
    addr: SocketAddr,
    sequences: Vec<Vec<RequestSpec>>,
) -> Result<Vec<Vec<ClientRecord>>> {
    crate::runtime().block_on(run_sequences(addr, sequences))
}

/// Blocking wrapper of [`run_load`].
pub fn run_load_blocking(cfg: &LoadConfig) -> Result<Vec<ClientRecord>> {
    crate::runtime().block_on(run_load(cfg, None))
}
