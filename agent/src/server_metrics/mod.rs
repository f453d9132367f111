//! The traced server's own Prometheus metrics, joined in (zero code on the server side).
//!
//! vLLM, SGLang, TGI and llama.cpp (`llama-server --metrics`) serve `GET /metrics` on their
//! serving port. This source tries the listening ports of each traced process (only the
//! `--port` ones when given), remembers which answered with an engine's Prometheus text, backs
//! off exponentially (up to [`MAX_BACKOFF`]) on those that did not, and re-exports the runbook
//! series ([`parse::FIELDS`]) under the schema's stable `infertap_server_*` names with labels
//! `engine`, `model_name`, `server_port`.
//!
//! Runs as its own tokio task, never on the ring-buffer drain: at most one scrape per server
//! per period, each bounded by a timeout (connect + response) and a body-size cap. A process
//! in another network namespace (a container) is reached from inside its namespace (`setns` on
//! a short-lived thread of its own; needs CAP_SYS_ADMIN, else that server is skipped with a debug line).
//!
//! Its own scrape connections reach the traced server like any client, so the local address of
//! every scrape connection is recorded in [`OwnScrapes`] before a request is sent; the pipeline
//! drops the records whose peer is one of them (they are not user requests). One kept-alive
//! connection per server carries the scrapes (see [`ScrapeConn`] for why it stays open).
//!
//! Counters (preemptions) are counted from the first scrape on with [`ExternalCounter`], so a
//! server restart (its counter back to 0) or an agent restart never shows up as a burst.

pub mod parse;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use infertap_proto::schema::{self, MetricDef};
use infertap_proto::store::Labels;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::external_counter::ExternalCounter;
use parse::{Engine, EngineReading, Field};

/// Longest wait before a port that did not answer with engine metrics is tried again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How long a scrape connection's local address is remembered (its record completes when the
/// server has answered, well within this).
const OWN_ADDR_TTL: Duration = Duration::from_secs(120);
/// Listening addresses whose counters are remembered after their process went away.
const MAX_RETIRED: usize = 256;
/// Distinct `model_name` values kept per server; further ones are left out (an engine serves
/// one model, or a few LoRA adapters named by their own label).
const MAX_MODELS_PER_SERVER: usize = 16;

/// Settings of the source.
#[derive(Clone, Debug)]
pub struct ServerMetricsConfig {
    /// At most one scrape per server per period (the agent uses its report interval).
    pub period: Duration,
    /// Bound on connect + request + response of one scrape.
    pub timeout: Duration,
    /// Larger bodies are abandoned (counted as a failed scrape).
    pub max_body_bytes: usize,
    /// Only these ports are tried (the agent's `--port` list); empty: every listening port.
    pub only_ports: Vec<u16>,
}

impl Default for ServerMetricsConfig {
    fn default() -> Self {
        ServerMetricsConfig {
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            max_body_bytes: 4 << 20,
            only_ports: Vec::new(),
        }
    }
}

/// Local addresses of the source's own scrape connections, shared with the pipeline.
#[derive(Clone, Debug, Default)]
pub struct OwnScrapes(Arc<Mutex<HashMap<SocketAddr, Instant>>>);

impl OwnScrapes {
    fn insert(&self, addr: SocketAddr) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        m.retain(|_, t| now.duration_since(*t) < OWN_ADDR_TTL);
        m.insert(canonical(addr), now);
    }

    /// Whether a traced connection's peer is one of our scrapes.
    pub fn contains(&self, peer: SocketAddr) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&canonical(peer))
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`: a dual-stack server reports IPv4 peers that way.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Ready-to-store series of one server: labels, gauges and counter totals.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerSeries {
    pub labels: Labels,
    pub gauges: Vec<(&'static MetricDef, f64)>,
    pub counters: Vec<(&'static MetricDef, u64)>,
}

/// Counts of the source's work, for logs and tests.
#[derive(Debug, Default)]
pub struct ScrapeStats {
    pub scrapes_ok: std::sync::atomic::AtomicU64,
    pub scrapes_failed: std::sync::atomic::AtomicU64,
}

/// A running source. Dropping it stops the task.
pub struct ServerMetrics {
    pids: watch::Sender<Vec<u32>>,
    latest: Arc<Mutex<BTreeMap<SocketAddr, Vec<ServerSeries>>>>,
    own: OwnScrapes,
    stats: Arc<ScrapeStats>,
    task: JoinHandle<()>,
}

impl Drop for ServerMetrics {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ServerMetrics {
    /// Starts the task (inside a tokio runtime).
    pub fn spawn(cfg: ServerMetricsConfig) -> ServerMetrics {
        let (pids, pids_rx) = watch::channel(Vec::new());
        let latest = Arc::new(Mutex::new(BTreeMap::new()));
        let own = OwnScrapes::default();
        let stats = Arc::new(ScrapeStats::default());
        let mut runner = Runner {
            cfg,
            pids: pids_rx,
            servers: BTreeMap::new(),
            latest: latest.clone(),
            own: own.clone(),
            stats: stats.clone(),
            own_netns: netns_of("self"),
            retired: HashMap::new(),
        };
        let task = tokio::spawn(async move { runner.run().await });
        ServerMetrics {
            pids,
            latest,
            own,
            stats,
            task,
        }
    }

    /// The traced processes (their listening ports are looked up by the task).
    pub fn set_pids(&self, mut pids: Vec<u32>) {
        pids.sort_unstable();
        self.pids.send_if_modified(|cur| {
            let changed = *cur != pids;
            *cur = pids;
            changed
        });
    }

    /// The latest series of every server that answered recently.
    pub fn series(&self) -> Vec<ServerSeries> {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    /// Addresses of our own scrape connections.
    pub fn own_scrapes(&self) -> OwnScrapes {
        self.own.clone()
    }

    pub fn stats(&self) -> &ScrapeStats {
        &self.stats
    }
}

#[derive(Debug)]
enum Known {
    /// Not tried yet, or failed: `failures` in a row.
    Unknown { failures: u32 },
    /// Answered with this engine's metrics.
    Engine(Engine),
}

#[derive(Debug)]
struct Server {
    pid: u32,
    /// Listening address (as the kernel shows it).
    listen: SocketAddr,
    known: Known,
    next_try: Instant,
    /// Logged its failure once already (later failures are silent).
    reported: bool,
    preemptions: HashMap<String, ExternalCounter>,
    /// Last (hits, queries) per model, for the hit ratio between two scrapes.
    prefix_last: HashMap<String, (f64, f64)>,
    /// Last computed hit ratio per model (kept while no query happens).
    prefix_ratio: HashMap<String, f64>,
    last_ok: Option<Instant>,
    /// The kept-alive scrape connection.
    conn: Option<ScrapeConn>,
}

struct Runner {
    cfg: ServerMetricsConfig,
    pids: watch::Receiver<Vec<u32>>,
    servers: BTreeMap<SocketAddr, Server>,
    latest: Arc<Mutex<BTreeMap<SocketAddr, Vec<ServerSeries>>>>,
    own: OwnScrapes,
    stats: Arc<ScrapeStats>,
    own_netns: Option<u64>,
    /// Counters of servers whose process went away, by listening address, for the process
    /// that takes its place.
    retired: HashMap<SocketAddr, HashMap<String, ExternalCounter>>,
}

impl Runner {
    async fn run(&mut self) {
        let period = self.cfg.period.max(Duration::from_millis(200));
        let mut last_discover: Option<Instant> = None;
        loop {
            let changed = self.pids.has_changed().unwrap_or(false);
            if changed || last_discover.is_none_or(|t| t.elapsed() >= period) {
                let pids = self.pids.borrow_and_update().clone();
                self.discover(&pids).await;
                last_discover = Some(Instant::now());
            }
            let now = Instant::now();
            let due: Vec<SocketAddr> = self
                .servers
                .iter()
                .filter(|(_, s)| s.next_try <= now)
                .map(|(a, _)| *a)
                .collect();
            for addr in due {
                self.scrape_one(addr).await;
            }
            self.publish();
            let next = self
                .servers
                .values()
                .map(|s| s.next_try)
                .min()
                .unwrap_or(now + period)
                .min(Instant::now() + period);
            let wait = next.saturating_duration_since(Instant::now());
            let mut pids = self.pids.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
                r = pids.changed() => if r.is_err() { return },
            }
        }
    }

    /// Finds the listening addresses of the traced processes; forgets servers that went away.
    async fn discover(&mut self, pids: &[u32]) {
        let pids = pids.to_vec();
        let found = tokio::task::spawn_blocking(move || {
            pids.into_iter()
                .flat_map(|pid| {
                    crate::targets::listening_addrs(pid)
                        .into_iter()
                        .map(move |a| (pid, a))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut seen = HashSet::new();
        for (pid, listen) in found {
            if !self.cfg.only_ports.is_empty() && !self.cfg.only_ports.contains(&listen.port()) {
                continue;
            }
            // Processes sharing one listening socket (pre-fork workers) are one server.
            seen.insert(listen);
            let retired = &mut self.retired;
            self.servers.entry(listen).or_insert_with(|| Server {
                pid,
                listen,
                known: Known::Unknown { failures: 0 },
                next_try: Instant::now(),
                reported: false,
                // A server restarted on the same address (a new process) carries on counting.
                preemptions: retired.remove(&listen).unwrap_or_default(),
                prefix_last: HashMap::new(),
                prefix_ratio: HashMap::new(),
                last_ok: None,
                conn: None,
            });
        }
        let gone: Vec<SocketAddr> = self
            .servers
            .keys()
            .filter(|a| !seen.contains(a))
            .copied()
            .collect();
        for a in gone {
            if let Some(s) = self.servers.remove(&a) {
                if self.retired.len() < MAX_RETIRED {
                    self.retired.insert(a, s.preemptions);
                }
            }
        }
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|a, _| seen.contains(a));
    }

    async fn scrape_one(&mut self, addr: SocketAddr) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(server) = self.servers.get(&addr) else {
            return;
        };
        let (pid, listen) = (server.pid, server.listen);
        let netns = netns_of(&pid.to_string()).filter(|ns| Some(*ns) != self.own_netns);
        let mut slot = self.servers.get_mut(&addr).and_then(|s| s.conn.take());
        let result = tokio::time::timeout(
            self.cfg.timeout,
            fetch(
                &mut slot,
                pid,
                connect_addr(listen),
                netns.is_some(),
                self.cfg.max_body_bytes,
                self.cfg.timeout,
                &self.own,
            ),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.cfg.timeout)))
        .and_then(|body| parse::parse(&body).map_err(|e| e.to_string()))
        .and_then(|r| match r.engine {
            Some(_) => Ok(r),
            None => Err("Prometheus text of no engine infertap knows".to_owned()),
        });
        let period = self.cfg.period;
        let Some(server) = self.servers.get_mut(&addr) else {
            return;
        };
        // A timed-out scrape left nothing in the slot: the next one reconnects.
        server.conn = slot;
        match result {
            Ok(reading) => {
                self.stats.scrapes_ok.fetch_add(1, Relaxed);
                let engine = reading.engine.expect("checked above");
                if !matches!(server.known, Known::Engine(e) if e == engine) {
                    tracing::info!(
                        pid,
                        port = listen.port(),
                        "reading {} metrics from its /metrics",
                        engine.as_str()
                    );
                }
                server.known = Known::Engine(engine);
                server.next_try = Instant::now() + period;
                server.last_ok = Some(Instant::now());
                server.reported = false;
                let series = server.series(engine, &reading);
                self.latest
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(addr, series);
            }
            Err(why) => {
                self.stats.scrapes_failed.fetch_add(1, Relaxed);
                let failures = match server.known {
                    Known::Unknown { failures } => failures + 1,
                    // A server that answered before: retry soon, it may be restarting.
                    Known::Engine(_) => 1,
                };
                server.known = Known::Unknown { failures };
                let backoff = period
                    .saturating_mul(1u32 << failures.min(16))
                    .min(MAX_BACKOFF);
                server.next_try = Instant::now() + backoff;
                if !server.reported {
                    server.reported = true;
                    tracing::debug!(
                        pid,
                        port = listen.port(),
                        "no engine metrics on /metrics ({why}); retrying with back-off"
                    );
                }
            }
        }
    }

    /// Drops the series of servers that have not answered for three periods.
    fn publish(&mut self) {
        let stale = self.cfg.period.saturating_mul(3);
        let servers = &self.servers;
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|a, _| {
                servers
                    .get(a)
                    .and_then(|s| s.last_ok)
                    .is_some_and(|t| t.elapsed() < stale)
            });
    }
}

impl Server {
    /// The schema series of one reading (counters advanced, hit ratio from counter deltas).
    fn series(&mut self, engine: Engine, r: &EngineReading) -> Vec<ServerSeries> {
        let mut out = Vec::new();
        let mut models: Vec<&String> = r.models.keys().collect();
        models.truncate(MAX_MODELS_PER_SERVER);
        for model in models {
            let label = schema::clamp_label_value(model).to_owned();
            let labels: Labels = vec![
                (schema::LABEL_ENGINE.to_owned(), engine.as_str().to_owned()),
                (schema::LABEL_MODEL.to_owned(), label.clone()),
                (
                    schema::LABEL_SERVER_PORT.to_owned(),
                    self.listen.port().to_string(),
                ),
            ];
            let get = |f: Field| r.get(model, f);
            let mut gauges = Vec::new();
            for (field, def) in [
                (Field::KvCacheUsage, &schema::SERVER_KV_CACHE_USAGE),
                (Field::RequestsRunning, &schema::SERVER_REQUESTS_RUNNING),
                (Field::RequestsWaiting, &schema::SERVER_REQUESTS_WAITING),
                (Field::BatchSize, &schema::SERVER_BATCH_SIZE),
            ] {
                if let Some(v) = get(field) {
                    gauges.push((def, v));
                }
            }
            let ratio = match (
                get(Field::PrefixHitRatio),
                get(Field::PrefixHitsTotal),
                get(Field::PrefixQueriesTotal),
            ) {
                (Some(v), _, _) => Some(v),
                (None, Some(h), Some(q)) => {
                    let prev = self.prefix_last.insert(label.clone(), (h, q));
                    if let Some((ph, pq)) = prev {
                        if q > pq && h >= ph {
                            self.prefix_ratio
                                .insert(label.clone(), ((h - ph) / (q - pq)).clamp(0.0, 1.0));
                        }
                    }
                    self.prefix_ratio.get(&label).copied()
                }
                _ => None,
            };
            if let Some(v) = ratio {
                gauges.push((&schema::SERVER_PREFIX_CACHE_HIT_RATIO, v));
            }
            let mut counters = Vec::new();
            if let Some(total) = get(Field::PreemptionsTotal) {
                let c = self.preemptions.entry(label.clone()).or_default();
                c.observe(total);
                counters.push((&schema::SERVER_PREEMPTIONS, c.total().round() as u64));
            }
            out.push(ServerSeries {
                labels,
                gauges,
                counters,
            });
        }
        out
    }
}

/// Where to connect for a listening address: loopback for a wildcard listener.
fn connect_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The network namespace inode of `/proc/<who>/ns/net`.
fn netns_of(who: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/proc/{who}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Connects, inside `pid`'s network namespace when `enter_netns`. The blocking connect runs
/// on a thread of its own that ends with it, so a thread that entered a container's namespace
/// never serves anything else.
async fn connect(
    pid: u32,
    addr: SocketAddr,
    enter_netns: bool,
    timeout: Duration,
) -> Result<std::net::TcpStream, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("infertap-scrape".into())
        .spawn(move || {
            let r = (|| {
                if enter_netns {
                    enter_netns_of(pid)?;
                }
                std::net::TcpStream::connect_timeout(&addr, timeout)
                    .map_err(|e| format!("connect {addr}: {e}"))
            })();
            let _ = tx.send(r);
        })
        .map_err(|e| format!("spawning the connect thread: {e}"))?;
    rx.await.map_err(|_| "connect thread ended".to_owned())?
}

/// Moves the calling thread into `pid`'s network namespace.
fn enter_netns_of(pid: u32) -> Result<(), String> {
    use std::os::fd::AsRawFd as _;
    let target = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| format!("network namespace of pid {pid}: {e}"))?;
    // SAFETY: setns on this thread with a namespace fd we hold open.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "entering the network namespace of pid {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A kept-alive HTTP/1.1 connection to one server. Kept between scrapes on purpose: a server
/// that accepts without asking for the peer address (uvloop: vLLM, SGLang) has its peer looked
/// up in `/proc` when the agent processes the accept, which only finds a connection that is
/// still open; a connection closed right after its one scrape would go unrecognised.
struct ScrapeConn {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    task: JoinHandle<()>,
    local: SocketAddr,
}

impl Drop for ScrapeConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for ScrapeConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrapeConn")
            .field("local", &self.local)
            .finish()
    }
}

async fn open_conn(
    pid: u32,
    addr: SocketAddr,
    enter_netns: bool,
    timeout: Duration,
    own: &OwnScrapes,
) -> Result<ScrapeConn, String> {
    let std_stream = connect(pid, addr, enter_netns, timeout).await?;
    let local = std_stream
        .local_addr()
        .map_err(|e| format!("socket: {e}"))?;
    // Known before any request is sent, so the server's records of it are always recognised.
    own.insert(local);
    std_stream
        .set_nonblocking(true)
        .map_err(|e| format!("socket: {e}"))?;
    let stream = tokio::net::TcpStream::from_std(std_stream).map_err(|e| format!("socket: {e}"))?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(ScrapeConn {
        sender,
        task,
        local,
    })
}

/// `GET /metrics` over the server's kept-alive connection (opened, or re-opened when the
/// server closed it); the body as text. The connection is put back into `slot` when it can
/// carry the next scrape.
async fn fetch(
    slot: &mut Option<ScrapeConn>,
    pid: u32,
    addr: SocketAddr,
    enter_netns: bool,
    max_body: usize,
    timeout: Duration,
    own: &OwnScrapes,
) -> Result<String, String> {
    let reused = match slot.take() {
        Some(mut c) => c.sender.ready().await.is_ok().then_some(c),
        None => None,
    };
    let mut conn = match reused {
        Some(c) => c,
        None => open_conn(pid, addr, enter_netns, timeout, own).await?,
    };
    // Still ours while it lives (the entry would otherwise expire).
    own.insert(conn.local);
    let req = hyper::Request::get("/metrics")
        .header(hyper::header::HOST, addr.to_string())
        // Plain text format: no OpenMetrics negotiation (exemplars, `# EOF`).
        .header(hyper::header::ACCEPT, "text/plain;version=0.0.4")
        .header(
            hyper::header::USER_AGENT,
            concat!("infertap/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = conn
        .sender
        .send_request(req)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let status = resp.status();
    let text_type = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("text/plain") || v.starts_with("application/openmetrics-text")
        });
    let body = Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if !status.is_success() {
        // Not an engine's endpoint: no reason to hold a connection to it.
        return Err(format!("HTTP {status}"));
    }
    if !text_type {
        return Err("not text/plain".to_owned());
    }
    *slot = Some(conn);
    String::from_utf8(body.to_vec()).map_err(|_| "body is not UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_v4_peers_match_plain_v4() {
        let own = OwnScrapes::default();
        own.insert("127.0.0.1:40000".parse().unwrap());
        assert!(own.contains("[::ffff:127.0.0.1]:40000".parse().unwrap()));
        assert!(own.contains("127.0.0.1:40000".parse().unwrap()));
        assert!(!own.contains("127.0.0.1:40001".parse().unwrap()));
    }

    #[test]
    fn wildcard_listeners_are_reached_on_loopback() {
        assert_eq!(
            connect_addr("0.0.0.0:8000".parse().unwrap()),
            "127.0.0.1:8000".parse().unwrap()
        );
        assert_eq!(
            connect_addr("[::]:8000".parse().unwrap()),
            "[::1]:8000".parse().unwrap()
        );
        assert_eq!(
            connect_addr("10.1.2.3:8000".parse().unwrap()),
            "10.1.2.3:8000".parse().unwrap()
        );
    }

    fn server() -> Server {
        Server {
            pid: 1,
            listen: "0.0.0.0:8000".parse().unwrap(),
            known: Known::Unknown { failures: 0 },
            next_try: Instant::now(),
            reported: false,
            preemptions: HashMap::new(),
            prefix_last: HashMap::new(),
            prefix_ratio: HashMap::new(),
            last_ok: None,
            conn: None,
        }
    }

    fn vllm(preempt: f64, hits: f64, queries: f64) -> EngineReading {
        let body = format!(
            "# TYPE vllm:num_preemptions_total counter\n\
             vllm:num_preemptions_total{{engine=\"0\",model_name=\"m\"}} {preempt}\n\
             # TYPE vllm:prefix_cache_hits_total counter\n\
             vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"m\"}} {hits}\n\
             # TYPE vllm:prefix_cache_queries_total counter\n\
             vllm:prefix_cache_queries_total{{engine=\"0\",model_name=\"m\"}} {queries}\n"
        );
        parse::parse(&body).unwrap()
    }

    #[test]
    fn counters_start_at_zero_survive_restarts_and_ratio_is_between_scrapes() {
        let mut s = server();
        let counter = |v: &[ServerSeries]| v[0].counters[0].1;
        let ratio = |v: &[ServerSeries]| {
            v[0].gauges
                .iter()
                .find(|(d, _)| d.name == schema::SERVER_PREFIX_CACHE_HIT_RATIO.name)
                .map(|(_, v)| *v)
        };
        let a = s.series(Engine::Vllm, &vllm(10.0, 100.0, 400.0));
        assert_eq!(counter(&a), 0);
        assert_eq!(ratio(&a), None, "needs two scrapes");
        assert_eq!(
            a[0].labels,
            vec![
                ("engine".to_owned(), "vllm".to_owned()),
                ("model_name".to_owned(), "m".to_owned()),
                ("server_port".to_owned(), "8000".to_owned()),
            ]
        );
        let b = s.series(Engine::Vllm, &vllm(13.0, 130.0, 500.0));
        assert_eq!(counter(&b), 3);
        assert_eq!(ratio(&b), Some(0.3));
        // No queries since: the last ratio stays.
        let c = s.series(Engine::Vllm, &vllm(13.0, 130.0, 500.0));
        assert_eq!(ratio(&c), Some(0.3));
        // Server restarted: its counters start again from 0.
        let d = s.series(Engine::Vllm, &vllm(2.0, 5.0, 10.0));
        assert_eq!(counter(&d), 5);
    }
}
