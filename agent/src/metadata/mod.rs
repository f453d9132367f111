//! Where a traced process runs: container and Kubernetes pod metadata for its requests.
//!
//! A source → transform chain, pid → [`cgroup::CgroupIds`] (the process's cgroup path: pod UID
//! and container id) → [`kubelet::PodIndex`] (the kubelet's `/pods`: namespace, pod and
//! container names) → [`PodMetadata`], attached to each request record. The drain thread only
//! does map lookups and, once per process, one `/proc/<pid>/cgroup` read; kubelet requests run on
//! the [`Resolver`]'s own refresher thread, woken on a miss and rate-limited with exponential
//! backoff, so a slow or unreachable kubelet never stalls the drain (its requests just carry ids
//! without names until it answers).

pub mod cgroup;
#[cfg(any(test, feature = "kubelet-fake"))]
pub mod fake_kubelet;
pub mod kubelet;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use cgroup::CgroupIds;
use kubelet::{KubeletClient, KubeletConfig, PodIndex};

/// What is known about a traced process's container and pod. Serialised as the `k8s` object of
/// JSON request lines (absent fields omitted).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PodMetadata {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl PodMetadata {
    /// Namespace, pod and container names, once the kubelet named all three (the series labels).
    pub fn names(&self) -> Option<(&str, &str, &str)> {
        Some((
            self.namespace.as_deref()?,
            self.pod.as_deref()?,
            self.container.as_deref()?,
        ))
    }
}

/// When to look for pod metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum K8sMode {
    /// On inside a Kubernetes pod (`KUBERNETES_SERVICE_HOST` set), off elsewhere.
    Auto,
    On,
    Off,
}

/// Resolved metadata settings.
#[derive(Clone, Debug)]
pub struct K8sOptions {
    /// `None`: cgroup ids only (no names).
    pub kubelet: Option<KubeletConfig>,
    /// Least time between two kubelet requests (a burst of misses costs one).
    pub min_refresh: Duration,
    /// Longest wait after repeated kubelet failures.
    pub max_backoff: Duration,
    /// Full re-read even without misses (drops pods that went away).
    pub resync: Duration,
}

impl K8sOptions {
    /// Settings from the command line and the pod's environment: `None` when metadata is off.
    /// The kubelet URL defaults to `https://$NODE_IP:10250` (downward API `status.hostIP`), the
    /// token and CA to the pod's service account when those files exist.
    pub fn resolve(
        mode: K8sMode,
        kubelet_url: Option<String>,
        token_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
        insecure_tls: bool,
    ) -> Option<Self> {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        match mode {
            K8sMode::Off => return None,
            K8sMode::Auto if !in_cluster && kubelet_url.is_none() => return None,
            _ => {}
        }
        let url = kubelet_url.or_else(|| {
            let ip = std::env::var("NODE_IP").ok().filter(|s| !s.is_empty())?;
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip
            };
            Some(format!("https://{host}:10250"))
        });
        let existing = |p: &str| Some(PathBuf::from(p)).filter(|p| p.exists());
        let kubelet = match url {
            Some(url) => Some(KubeletConfig {
                // The read-only port (plain http) needs no token: never send the service
                // account's in clear text unless told to.
                token_file: token_file.or_else(|| {
                    url.starts_with("https://")
                        .then(|| existing(kubelet::SERVICE_ACCOUNT_TOKEN))
                        .flatten()
                }),
                ca_file: ca_file.or_else(|| existing(kubelet::SERVICE_ACCOUNT_CA)),
                url,
                insecure_tls,
                timeout: Duration::from_secs(10),
            }),
            None => {
                tracing::warn!(
                    "pod metadata: no --kubelet-url and no NODE_IP; requests carry container and pod ids only"
                );
                None
            }
        };
        Some(K8sOptions {
            kubelet,
            min_refresh: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
            resync: Duration::from_secs(300),
        })
    }
}

/// Counters of the metadata source.
#[derive(Debug, Default)]
pub struct ResolverCounters {
    pub kubelet_fetches: AtomicU64,
    pub kubelet_errors: AtomicU64,
    /// Records of a containerised process whose names the kubelet did not (yet) give.
    pub unresolved_records: AtomicU64,
}

#[derive(Debug, Default)]
struct Shared {
    index: RwLock<PodIndex>,
    /// Bumped when a kubelet answer changed the index; cached lookups of an older one are
    /// redone.
    generation: AtomicU64,
    counters: ResolverCounters,
}

/// Kubelet requests one unresolved process may trigger: at `min_refresh` × 1, 2, 4, ... after
/// it was first seen (a container's id reaches the kubelet's status a moment after it starts),
/// then only the periodic re-read.
const MAX_ASKS_PER_PROCESS: u32 = 6;

/// What the resolver knows about one process.
struct PidState {
    ids: Option<CgroupIds>,
    /// Index generation `meta` was resolved against (`u64::MAX`: never).
    gen: u64,
    meta: Option<Arc<PodMetadata>>,
    asks: u32,
    next_ask: Instant,
}

/// pid → [`PodMetadata`], cached. Owned by the pipeline task.
pub struct Resolver {
    shared: Arc<Shared>,
    wake: Option<SyncSender<()>>,
    pids: HashMap<u32, PidState>,
    min_refresh: Duration,
    /// Injected cgroup reader (tests); `None`: `/proc/<pid>/cgroup`.
    read_cgroup: fn(u32) -> Option<CgroupIds>,
}

impl Resolver {
    /// Starts the kubelet refresher thread (when a kubelet is configured) and its first fetch.
    pub fn start(opts: &K8sOptions) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::default());
        let wake = match &opts.kubelet {
            Some(cfg) => {
                let client = KubeletClient::new(cfg.clone())?;
                tracing::info!("pod metadata from {}", client.url());
                let (tx, rx) = mpsc::sync_channel(1);
                let s = shared.clone();
                let o = opts.clone();
                std::thread::Builder::new()
                    .name("infertap-kubelet".into())
                    .spawn(move || refresher(client, s, rx, o))?;
                let _ = tx.try_send(());
                Some(tx)
            }
            None => None,
        };
        Ok(Resolver {
            shared,
            wake,
            pids: HashMap::new(),
            min_refresh: opts.min_refresh,
            read_cgroup: cgroup::read_pid,
        })
    }

    pub fn counters(&self) -> &ResolverCounters {
        &self.shared.counters
    }

    /// The metadata of `pid`'s container: map lookups after the first call per pid (one
    /// `/proc/<pid>/cgroup` read) and per kubelet answer that changed something. `None` for a
    /// process in no container.
    pub fn lookup(&mut self, pid: u32) -> Option<Arc<PodMetadata>> {
        let gen = self.shared.generation.load(Ordering::Acquire);
        let read = self.read_cgroup;
        let st = self.pids.entry(pid).or_insert_with(|| PidState {
            ids: read(pid).filter(|i| !i.is_empty()),
            gen: u64::MAX,
            meta: None,
            asks: 0,
            next_ask: Instant::now(),
        });
        if st.gen != gen {
            st.gen = gen;
            st.meta = st.ids.as_ref().map(|ids| {
                let index = self
                    .shared
                    .index
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                Arc::new(resolve(ids, &index))
            });
        }
        let unnamed = st.meta.as_ref().is_some_and(|m| m.names().is_none());
        if unnamed && st.asks < MAX_ASKS_PER_PROCESS {
            // A container the kubelet has not told us about (new since its last answer): ask
            // again, less and less often; the refresher coalesces and rate-limits.
            let now = Instant::now();
            if now >= st.next_ask {
                st.asks += 1;
                st.next_ask = now + self.min_refresh * (1 << st.asks);
                if let Some(tx) = &self.wake {
                    match tx.try_send(()) {
                        Ok(()) | Err(TrySendError::Full(())) => {}
                        Err(TrySendError::Disconnected(())) => self.wake = None,
                    }
                }
            }
        }
        st.meta.clone()
    }

    /// Counts a record that went out without names (see [`ResolverCounters`]).
    pub fn note_record(&self, meta: Option<&PodMetadata>) {
        if meta.is_some_and(|m| m.names().is_none()) {
            self.shared
                .counters
                .unresolved_records
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets an exited process (its pid may be reused by another container).
    pub fn forget(&mut self, pid: u32) {
        self.pids.remove(&pid);
    }
}

/// Joins a process's cgroup ids with the kubelet's names.
fn resolve(ids: &CgroupIds, index: &PodIndex) -> PodMetadata {
    let container = ids
        .container_id
        .as_deref()
        .and_then(|id| index.containers.get(id));
    let pod = ids.pod_uid.as_deref().and_then(|u| index.pods.get(u));
    PodMetadata {
        namespace: container
            .map(|c| c.namespace.clone())
            .or_else(|| pod.map(|p| p.namespace.clone())),
        pod: container
            .map(|c| c.pod.clone())
            .or_else(|| pod.map(|p| p.pod.clone())),
        container: container.map(|c| c.container.clone()),
        container_id: ids.container_id.clone(),
        pod_uid: ids
            .pod_uid
            .clone()
            .or_else(|| container.map(|c| c.pod_uid.clone())),
    }
}

/// The refresher thread: one kubelet request per wake-up (coalesced), at most one per
/// `min_refresh`, backing off exponentially up to `max_backoff` while the kubelet fails; a full
/// re-read every `resync` regardless. Ends when the resolver is dropped.
fn refresher(client: KubeletClient, shared: Arc<Shared>, rx: mpsc::Receiver<()>, o: K8sOptions) {
    let mut backoff = o.min_refresh;
    let mut next_allowed = Instant::now();
    let mut last_error: Option<String> = None;
    loop {
        // After a failure the refresher retries on its own (at the backoff); otherwise it
        // waits for a miss or the periodic re-read.
        let idle = if last_error.is_some() {
            next_allowed.saturating_duration_since(Instant::now())
        } else {
            o.resync
        };
        match rx.recv_timeout(idle) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Wait out the rate limit; wake-ups meanwhile fold into this fetch.
        loop {
            let now = Instant::now();
            if now >= next_allowed {
                break;
            }
            match rx.recv_timeout(next_allowed - now) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        match client.fetch() {
            Ok(index) => {
                let (pods, containers) = (index.pods.len(), index.containers.len());
                let mut current = shared
                    .index
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Cached lookups are redone only when the answer changed.
                if *current != index {
                    *current = index;
                    shared.generation.fetch_add(1, Ordering::AcqRel);
                }
                drop(current);
                shared
                    .counters
                    .kubelet_fetches
                    .fetch_add(1, Ordering::Relaxed);
                if last_error.take().is_some() {
                    tracing::info!("kubelet answers again");
                }
                tracing::debug!("kubelet: {pods} pods, {containers} containers");
                backoff = o.min_refresh;
            }
            Err(e) => {
                shared
                    .counters
                    .kubelet_errors
                    .fetch_add(1, Ordering::Relaxed);
                let msg = format!("{e:#}");
                // One warning per distinct failure, not one per retry.
                if last_error.as_deref() != Some(&msg) {
                    tracing::warn!("pod metadata: {msg} (retrying with backoff)");
                }
                last_error = Some(msg);
                backoff = (backoff * 2).min(o.max_backoff);
            }
        }
        next_allowed = Instant::now() + backoff;
    }
}

#[cfg(test)]
mod tests {
    use super::kubelet::tests::{fake_kubelet, write_temp, RECORDED, RECORDED_ID, RECORDED_UID};
    use super::*;

    fn recorded_ids(_pid: u32) -> Option<CgroupIds> {
        Some(CgroupIds {
            pod_uid: Some(RECORDED_UID.into()),
            container_id: Some(RECORDED_ID.into()),
            runtime: Some(cgroup::Runtime::Docker),
        })
    }

    fn unknown_ids(_pid: u32) -> Option<CgroupIds> {
        Some(CgroupIds {
            pod_uid: Some("11111111-2222-3333-4444-555555555555".into()),
            container_id: Some("ab".repeat(32)),
            runtime: Some(cgroup::Runtime::Containerd),
        })
    }

    fn opts(url: String, ca: PathBuf, token: PathBuf) -> K8sOptions {
        K8sOptions {
            kubelet: Some(KubeletConfig {
                url,
                token_file: Some(token),
                ca_file: Some(ca),
                insecure_tls: false,
                timeout: Duration::from_secs(5),
            }),
            min_refresh: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
            resync: Duration::from_secs(300),
        }
    }

    fn wait_for(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn names_arrive_from_the_kubelet_and_misses_are_rate_limited() {
        let k = fake_kubelet(RECORDED.to_owned(), "tok".into());
        let o = opts(
            k.url.clone(),
            write_temp("res-ca.pem", &k.ca_pem),
            write_temp("res-token", "tok"),
        );
        let mut r = Resolver::start(&o).unwrap();
        r.read_cgroup = recorded_ids;
        assert!(wait_for(|| r
            .lookup(42)
            .and_then(|m| m.names().map(|_| ()))
            .is_some()));
        let m = r.lookup(42).unwrap();
        assert_eq!(
            *m,
            PodMetadata {
                namespace: Some("default".into()),
                pod: Some("queue-l4dv8".into()),
                container: Some("queue".into()),
                container_id: Some(RECORDED_ID.into()),
                pod_uid: Some(RECORDED_UID.into()),
            }
        );
        // A process in a container the kubelet does not list: ids only, and a burst of misses
        // costs a bounded number of kubelet requests (one per min_refresh at most).
        r.read_cgroup = unknown_ids;
        let before = k.requests.load(Ordering::SeqCst);
        let start = Instant::now();
        for pid in 100..10_100 {
            let m = r.lookup(pid).unwrap();
            assert!(m.names().is_none() && m.container_id.is_some());
            r.forget(pid);
        }
        std::thread::sleep(Duration::from_millis(500));
        let made = k.requests.load(Ordering::SeqCst) - before;
        let allowed = 2 + (start.elapsed().as_millis() / 200) as usize;
        assert!(
            made >= 1 && made <= allowed,
            "{made} requests, at most {allowed}"
        );
    }

    #[test]
    fn cached_lookups_return_the_same_metadata_without_rereading() {
        use std::sync::atomic::AtomicUsize;
        static READS: AtomicUsize = AtomicUsize::new(0);
        let o = K8sOptions {
            kubelet: None,
            min_refresh: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
            resync: Duration::from_secs(1),
        };
        let mut r = Resolver::start(&o).unwrap();
        r.read_cgroup = |pid| {
            READS.fetch_add(1, Ordering::Relaxed);
            recorded_ids(pid)
        };
        let first = r.lookup(5).unwrap();
        let n = 200_000;
        let t = Instant::now();
        for _ in 0..n {
            assert!(Arc::ptr_eq(&r.lookup(5).unwrap(), &first));
        }
        eprintln!(
            "cached pod metadata lookup: {:.0} ns",
            t.elapsed().as_nanos() as f64 / n as f64
        );
        assert_eq!(
            READS.load(Ordering::Relaxed),
            1,
            "one cgroup read per process"
        );
    }

    #[test]
    fn a_container_the_kubelet_never_lists_costs_a_few_requests_not_one_per_record() {
        let k = fake_kubelet(RECORDED.to_owned(), "tok2".into());
        let o = opts(
            k.url.clone(),
            write_temp("nl-ca.pem", &k.ca_pem),
            write_temp("nl-token", "tok2"),
        );
        let mut r = Resolver::start(&o).unwrap();
        r.read_cgroup = unknown_ids;
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed() < Duration::from_millis(1500) {
            assert!(r.lookup(9).unwrap().names().is_none());
            n += 1;
            std::thread::sleep(Duration::from_micros(500));
        }
        std::thread::sleep(Duration::from_millis(300));
        let made = k.requests.load(Ordering::SeqCst);
        // The start-up fetch, then asks at 0, 0.4 and 1.2 s (200 ms × 2, 4, ...).
        assert!(
            (1..=5).contains(&made),
            "{made} kubelet requests for {n} lookups"
        );
        assert!(n > 500);
    }

    #[test]
    fn a_failing_kubelet_backs_off_and_lookups_never_block() {
        let k = fake_kubelet(RECORDED.to_owned(), "right".into());
        let o = opts(
            k.url.clone(),
            write_temp("bo-ca.pem", &k.ca_pem),
            write_temp("bo-token", "wrong"),
        );
        let mut r = Resolver::start(&o).unwrap();
        r.read_cgroup = recorded_ids;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(2500) {
            let t = Instant::now();
            let m = r.lookup(7).unwrap();
            assert!(t.elapsed() < Duration::from_millis(50), "lookup blocked");
            assert!(m.names().is_none());
            r.forget(7);
            std::thread::sleep(Duration::from_millis(5));
        }
        let errors = r.counters().kubelet_errors.load(Ordering::Relaxed);
        // 200 ms doubling to the 1 s cap: about 0, 0.4, 1.2, 2.2 s → 3-4 attempts, not hundreds.
        assert!((2..=6).contains(&errors), "{errors} kubelet attempts");
        assert_eq!(r.counters().kubelet_fetches.load(Ordering::Relaxed), 0);
        // The token is fixed (it is re-read per request): the refresher retries on its own,
        // without further misses, and the names arrive.
        std::fs::write(write_temp("bo-token", "right"), "right").unwrap();
        assert!(wait_for(|| r
            .counters()
            .kubelet_fetches
            .load(Ordering::Relaxed)
            > 0));
        assert!(r.lookup(7).unwrap().names().is_some());
    }

    #[test]
    fn processes_outside_containers_have_no_metadata() {
        let o = K8sOptions {
            kubelet: None,
            min_refresh: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
            resync: Duration::from_secs(1),
        };
        let mut r = Resolver::start(&o).unwrap();
        r.read_cgroup = |_| Some(CgroupIds::default());
        assert!(r.lookup(1).is_none());
        r.read_cgroup = |_| None;
        r.forget(1);
        assert!(r.lookup(1).is_none());
        // Ids without a kubelet: JSON gets ids, series get no pod labels.
        r.read_cgroup = unknown_ids;
        r.forget(1);
        let m = r.lookup(1).unwrap();
        assert!(m.names().is_none() && m.pod_uid.is_some());
    }

    #[test]
    fn resolve_follows_mode_and_environment() {
        // No KUBERNETES_SERVICE_HOST in the test environment (asserted, not set: env is
        // process-wide and tests run in parallel).
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            assert!(K8sOptions::resolve(K8sMode::Auto, None, None, None, false).is_none());
        }
        assert!(
            K8sOptions::resolve(K8sMode::Off, Some("https://x".into()), None, None, false)
                .is_none()
        );
        let o = K8sOptions::resolve(
            K8sMode::Auto,
            Some("https://10.0.0.5:10250".into()),
            None,
            None,
            true,
        )
        .unwrap();
        let k = o.kubelet.unwrap();
        assert_eq!(k.url, "https://10.0.0.5:10250");
        assert!(k.insecure_tls);
        let ro = K8sOptions::resolve(
            K8sMode::On,
            Some("http://10.0.0.5:10255".into()),
            None,
            None,
            false,
        )
        .unwrap();
        assert!(
            ro.kubelet.unwrap().token_file.is_none(),
            "no token over plain http"
        );
    }
}
