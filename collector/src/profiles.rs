//! The collector's profile store: every profile agents send, per (node, agent), indexed by time,
//! in memory (a restart starts empty; agents re-send only what was not acked). Bounded two ways:
//! profiles whose interval ended more than `retention` ago (by the collector's clock) are
//! evicted, and past `max_bytes` of stored (gzipped) payloads the oldest profile of the agent
//! holding the most bytes goes first, so one noisy agent cannot evict the rest of the fleet.
//! Every profile is decoded and validated on arrival (bounded decompression, consistent tables,
//! the sample types of its type, its declared sample count) and kept gzipped as received.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use infertap_proto::pb::{ProfileData, ProfileType};
use infertap_proto::pprof::{self, LabelFilter, Merger, PprofError, ProfileKind};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// Store bounds.
#[derive(Clone, Debug)]
pub struct ProfileStoreConfig {
    /// Most gzipped payload bytes held across all agents.
    pub max_bytes: usize,
    /// Profiles whose interval ended longer ago than this are evicted.
    pub retention: Duration,
    /// Most bytes one profile may decompress to (gzip bombs are refused). Decoded structures
    /// take up to ~8x this in memory (packed varints become `u64`s), per profile being decoded.
    pub max_decoded_bytes: usize,
}

impl Default for ProfileStoreConfig {
    fn default() -> Self {
        ProfileStoreConfig {
            max_bytes: 512 << 20,
            retention: Duration::from_secs(3600),
            max_decoded_bytes: 32 << 20,
        }
    }
}

/// Counters and gauges the store keeps (registered with the collector's own metrics).
#[derive(Clone, Debug, Default)]
pub struct ProfileMetrics {
    /// `result`: stored, rejected.
    pub received: Family<Vec<(String, String)>, Counter>,
    /// `reason`: why a profile was refused (gzip, protobuf, invalid, sample_types, ...).
    pub rejected: Family<Vec<(String, String)>, Counter>,
    /// `reason`: bytes, age.
    pub evicted: Family<Vec<(String, String)>, Counter>,
    pub stored_bytes: Gauge,
    pub stored_profiles: Gauge,
}

impl ProfileMetrics {
    fn count(family: &Family<Vec<(String, String)>, Counter>, label: &str, value: &str) {
        family
            .get_or_create(&vec![(label.to_owned(), value.to_owned())])
            .inc();
    }
}

/// One stored profile.
#[derive(Clone, Debug)]
pub struct StoredProfile {
    pub kind: ProfileKind,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub sample_count: u64,
    /// As received: gzipped serialized `perftools.profiles.Profile`.
    pub pprof: Bytes,
}

/// Why a received profile was not stored.
#[derive(Clone, Debug, PartialEq)]
pub enum ProfileReject {
    UnknownType(i32),
    BadTimeRange,
    Pprof(PprofError),
    /// Its sample types are not those of its declared type.
    SampleTypes(ProfileKind),
    /// `sample_count` differs from the decoded profile's.
    SampleCount {
        declared: u64,
        decoded: i64,
    },
    /// Larger than the whole store.
    TooLarge(usize),
}

impl ProfileReject {
    /// Short, bounded reason for a rejection counter label.
    pub fn reason(&self) -> &'static str {
        match self {
            ProfileReject::UnknownType(_) => "unknown_type",
            ProfileReject::BadTimeRange => "bad_time_range",
            ProfileReject::Pprof(e) => e.reason(),
            ProfileReject::SampleTypes(_) => "sample_types",
            ProfileReject::SampleCount { .. } => "sample_count",
            ProfileReject::TooLarge(_) => "too_large",
        }
    }
}

impl std::fmt::Display for ProfileReject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProfileReject::UnknownType(t) => write!(f, "unknown profile type {t}"),
            ProfileReject::BadTimeRange => write!(f, "end before start"),
            ProfileReject::Pprof(e) => e.fmt(f),
            ProfileReject::SampleTypes(k) => {
                write!(f, "sample types are not those of a {k} profile")
            }
            ProfileReject::SampleCount { declared, decoded } => write!(
                f,
                "declares {declared} samples, the profile holds {decoded}"
            ),
            ProfileReject::TooLarge(n) => write!(f, "{n} bytes, more than the whole store"),
        }
    }
}

/// Checks a received profile: type, time range, decodable within the bound, consistent, the
/// sample types of its type and the declared sample count.
pub fn check(p: &ProfileData, max_decoded: usize) -> Result<StoredProfile, ProfileReject> {
    let kind = ProfileType::try_from(p.r#type)
        .ok()
        .and_then(ProfileKind::from_pb)
        .ok_or(ProfileReject::UnknownType(p.r#type))?;
    if p.end_unix_ns < p.start_unix_ns {
        return Err(ProfileReject::BadTimeRange);
    }
    let decoded = pprof::decode(&p.pprof, max_decoded).map_err(ProfileReject::Pprof)?;
    if !kind.matches(&decoded) {
        return Err(ProfileReject::SampleTypes(kind));
    }
    let samples = pprof::total(&decoded, 0);
    if samples < 0 || samples as u64 != p.sample_count {
        return Err(ProfileReject::SampleCount {
            declared: p.sample_count,
            decoded: samples,
        });
    }
    Ok(StoredProfile {
        kind,
        start_unix_ns: p.start_unix_ns,
        end_unix_ns: p.end_unix_ns,
        sample_count: p.sample_count,
        pprof: p.pprof.clone(),
    })
}

/// What [`ProfileStore::ingest`] did with one report's profiles.
#[derive(Debug, Default)]
pub struct Ingested {
    pub stored: Vec<StoredProfile>,
    pub rejected: Vec<ProfileReject>,
}

/// Which profiles a query wants; empty lists mean all.
#[derive(Clone, Debug)]
pub struct ProfileQuery {
    pub nodes: Vec<String>,
    pub agents: Vec<String>,
    pub kind: ProfileKind,
    /// Profiles whose interval overlaps `[from, to)` (unix ns) are merged whole.
    pub from_unix_ns: u64,
    pub to_unix_ns: u64,
    pub labels: LabelFilter,
}

/// A merged query result.
#[derive(Debug)]
pub struct Merged {
    /// `None` when no stored profile matched.
    pub profile: Option<pprof::pb::Profile>,
    /// Profiles merged.
    pub profiles: usize,
    /// Stored profiles that matched but failed to merge (cannot happen for checked profiles;
    /// counted rather than trusted).
    pub failed: usize,
}

/// Stored profiles of one type of one agent, by (end time, arrival number).
#[derive(Debug, Default)]
struct Series {
    by_end: BTreeMap<(u64, u64), StoredProfile>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// (node, agent, kind) → profiles.
    series: BTreeMap<(String, String, ProfileKind), Series>,
    bytes: usize,
    profiles: usize,
    arrivals: u64,
}

/// What one (node, agent, type) holds, for `/pprof/nodes`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SeriesSummary {
    pub node: String,
    pub agent: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub profiles: usize,
    pub bytes: usize,
    pub samples: u64,
    pub from_unix_ns: u64,
    pub to_unix_ns: u64,
}

/// The bounded store (see the module docs).
#[derive(Debug)]
pub struct ProfileStore {
    cfg: ProfileStoreConfig,
    inner: Mutex<Inner>,
    metrics: ProfileMetrics,
}

impl ProfileStore {
    pub fn new(cfg: ProfileStoreConfig, metrics: ProfileMetrics) -> Self {
        ProfileStore {
            cfg,
            inner: Mutex::new(Inner::default()),
            metrics,
        }
    }

    pub fn config(&self) -> &ProfileStoreConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks and stores the profiles of one applied report (decoding happens before the
    /// lock is taken), then evicts to the bounds. Returns what was stored and the rejections
    /// (already counted).
    pub fn ingest(
        &self,
        node: &str,
        agent: &str,
        profiles: &[ProfileData],
        now_unix_ns: u64,
    ) -> Ingested {
        let mut rejects = Vec::new();
        let mut ok = Vec::with_capacity(profiles.len());
        for p in profiles {
            match check(p, self.cfg.max_decoded_bytes) {
                Ok(sp) if sp.pprof.len() > self.cfg.max_bytes => {
                    rejects.push(ProfileReject::TooLarge(sp.pprof.len()))
                }
                Ok(sp) => ok.push(sp),
                Err(e) => rejects.push(e),
            }
        }
        for e in &rejects {
            ProfileMetrics::count(&self.metrics.received, "result", "rejected");
            ProfileMetrics::count(&self.metrics.rejected, "reason", e.reason());
        }
        if let Some(first) = rejects.first() {
            tracing::warn!(%node, %agent, rejected = rejects.len(), "rejected profiles; first: {first}");
        }
        if ok.is_empty() {
            return Ingested {
                stored: ok,
                rejected: rejects,
            };
        }
        let mut st = self.lock();
        for sp in ok.iter().cloned() {
            st.arrivals += 1;
            let arrival = st.arrivals;
            let len = sp.pprof.len();
            let series = st
                .series
                .entry((node.to_owned(), agent.to_owned(), sp.kind))
                .or_default();
            series.bytes += len;
            series.by_end.insert((sp.end_unix_ns, arrival), sp);
            st.bytes += len;
            st.profiles += 1;
            ProfileMetrics::count(&self.metrics.received, "result", "stored");
        }
        self.evict(&mut st, now_unix_ns);
        Ingested {
            stored: ok,
            rejected: rejects,
        }
    }

    /// Evicts by age and then by bytes; updates the gauges.
    fn evict(&self, st: &mut Inner, now_unix_ns: u64) {
        let horizon = now_unix_ns.saturating_sub(self.cfg.retention.as_nanos() as u64);
        let mut aged = 0usize;
        let mut freed = 0usize;
        for series in st.series.values_mut() {
            while let Some(entry) = series.by_end.first_entry() {
                if entry.key().0 >= horizon {
                    break;
                }
                let sp = entry.remove();
                series.bytes -= sp.pprof.len();
                freed += sp.pprof.len();
                aged += 1;
            }
        }
        st.bytes -= freed;
        st.profiles -= aged;
        for _ in 0..aged {
            ProfileMetrics::count(&self.metrics.evicted, "reason", "age");
        }
        while st.bytes > self.cfg.max_bytes {
            // The agent (node, agent) holding the most bytes loses its oldest profile.
            let mut per_agent: BTreeMap<(&str, &str), usize> = BTreeMap::new();
            for ((node, agent, _), s) in &st.series {
                *per_agent.entry((node, agent)).or_default() += s.bytes;
            }
            let Some(((node, agent), _)) = per_agent.into_iter().max_by_key(|(_, b)| *b) else {
                break;
            };
            let (node, agent) = (node.to_owned(), agent.to_owned());
            let oldest = st
                .series
                .iter_mut()
                .filter(|((n, a, _), s)| *n == node && *a == agent && !s.by_end.is_empty())
                .min_by_key(|(_, s)| s.by_end.keys().next().copied())
                .and_then(|(_, s)| {
                    let sp = s.by_end.pop_first()?.1;
                    s.bytes -= sp.pprof.len();
                    Some(sp.pprof.len())
                });
            let Some(len) = oldest else { break };
            st.bytes -= len;
            st.profiles -= 1;
            ProfileMetrics::count(&self.metrics.evicted, "reason", "bytes");
        }
        st.series.retain(|_, s| !s.by_end.is_empty());
        self.metrics.stored_bytes.set(st.bytes as i64);
        self.metrics.stored_profiles.set(st.profiles as i64);
    }

    /// Evicts profiles past the retention (also done on every ingest).
    pub fn sweep(&self, now_unix_ns: u64) {
        let mut st = self.lock();
        self.evict(&mut st, now_unix_ns);
    }

    /// Payloads matching `q` (cheap clones; the merge runs outside the lock).
    pub fn select(&self, q: &ProfileQuery) -> Vec<Bytes> {
        let st = self.lock();
        let mut out = Vec::new();
        for ((node, agent, kind), s) in &st.series {
            if *kind != q.kind
                || (!q.nodes.is_empty() && !q.nodes.contains(node))
                || (!q.agents.is_empty() && !q.agents.contains(agent))
            {
                continue;
            }
            // Overlap: end > from (the index) and start < to.
            for sp in s
                .by_end
                .range((q.from_unix_ns.saturating_add(1), 0)..)
                .map(|e| e.1)
            {
                if sp.start_unix_ns < q.to_unix_ns {
                    out.push(sp.pprof.clone());
                }
            }
        }
        out
    }

    /// Decodes and merges the payloads [`ProfileStore::select`] finds for `q`.
    pub fn merge(&self, q: &ProfileQuery) -> Merged {
        let payloads = self.select(q);
        let mut m = Merger::new(q.labels.clone());
        let mut failed = 0;
        for data in &payloads {
            if let Err(e) = m.add_encoded(data, self.cfg.max_decoded_bytes) {
                failed += 1;
                tracing::error!("stored profile failed to merge: {e}");
            }
        }
        let profiles = m.merged();
        Merged {
            profile: m.finish(),
            profiles,
            failed,
        }
    }

    /// Whether any profile of `node` is stored.
    pub fn has_node(&self, node: &str) -> bool {
        self.lock().series.keys().any(|(n, _, _)| n == node)
    }

    /// Every (node, agent, type) with its counts and time range.
    pub fn summary(&self) -> Vec<SeriesSummary> {
        let st = self.lock();
        st.series
            .iter()
            .map(|((node, agent, kind), s)| SeriesSummary {
                node: node.clone(),
                agent: agent.clone(),
                kind: kind.name(),
                profiles: s.by_end.len(),
                bytes: s.bytes,
                samples: s.by_end.values().map(|p| p.sample_count).sum(),
                from_unix_ns: s
                    .by_end
                    .values()
                    .map(|p| p.start_unix_ns)
                    .min()
                    .unwrap_or(0),
                to_unix_ns: s.by_end.keys().last().map_or(0, |k| k.0),
            })
            .collect()
    }

    /// (bytes, profiles) stored now.
    pub fn totals(&self) -> (usize, usize) {
        let st = self.lock();
        (st.bytes, st.profiles)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infertap_proto::pprof::ProfileBuilder;

    const S: u64 = 1_000_000_000;

    fn profile(kind: ProfileKind, start_s: u64, samples: &[(&str, i64)]) -> ProfileData {
        let mut b = ProfileBuilder::new(kind);
        b.set_time(start_s * S, (start_s + 10) * S);
        for (f, n) in samples {
            let l = b.python_frame(f, "vllm/x.py", 1, 2);
            b.add_sample(&[l], &[*n, n * 1000], &[]).unwrap();
        }
        b.into_profile_data().unwrap()
    }

    fn store(max_bytes: usize, retention_s: u64) -> ProfileStore {
        ProfileStore::new(
            ProfileStoreConfig {
                max_bytes,
                retention: Duration::from_secs(retention_s),
                max_decoded_bytes: 1 << 20,
            },
            ProfileMetrics::default(),
        )
    }

    fn query(kind: ProfileKind, from_s: u64, to_s: u64) -> ProfileQuery {
        ProfileQuery {
            nodes: vec![],
            agents: vec![],
            kind,
            from_unix_ns: from_s * S,
            to_unix_ns: to_s * S,
            labels: LabelFilter::default(),
        }
    }

    #[test]
    fn stores_queries_by_overlap_and_merges() {
        let st = store(1 << 20, 3600);
        let now = 100 * S;
        assert!(st
            .ingest(
                "n1",
                "a",
                &[profile(ProfileKind::Cpu, 10, &[("f", 3)])],
                now
            )
            .rejected
            .is_empty());
        st.ingest(
            "n1",
            "a",
            &[profile(ProfileKind::Cpu, 20, &[("f", 4), ("g", 1)])],
            now,
        );
        st.ingest(
            "n2",
            "b",
            &[profile(ProfileKind::Cpu, 20, &[("g", 10)])],
            now,
        );
        st.ingest(
            "n2",
            "b",
            &[profile(ProfileKind::Gpu, 20, &[("k", 7)])],
            now,
        );
        let m = st.merge(&query(ProfileKind::Cpu, 0, 100));
        assert_eq!((m.profiles, m.failed), (3, 0));
        assert_eq!(pprof::total(m.profile.as_ref().unwrap(), 0), 18);
        // [10 s, 20 s) touches [10, 20) only; [20, 30) does not overlap [30, ..).
        assert_eq!(st.merge(&query(ProfileKind::Cpu, 15, 20)).profiles, 1);
        assert_eq!(st.merge(&query(ProfileKind::Cpu, 30, 40)).profiles, 0);
        assert_eq!(st.merge(&query(ProfileKind::Cpu, 19, 21)).profiles, 3);
        let mut q = query(ProfileKind::Cpu, 0, 100);
        q.nodes = vec!["n2".into()];
        assert_eq!(pprof::total(st.merge(&q).profile.as_ref().unwrap(), 0), 10);
        assert_eq!(st.merge(&query(ProfileKind::Gpu, 0, 100)).profiles, 1);
        assert!(st
            .merge(&query(ProfileKind::OffCpu, 0, 100))
            .profile
            .is_none());
        let sum = st.summary();
        assert_eq!(sum.len(), 3);
        assert_eq!(
            (sum[0].node.as_str(), sum[0].kind, sum[0].profiles),
            ("n1", "cpu", 2)
        );
        assert_eq!((sum[0].from_unix_ns, sum[0].to_unix_ns), (10 * S, 30 * S));
        assert_eq!(sum[0].samples, 8);
        assert!(st.has_node("n2") && !st.has_node("n3"));
    }

    #[test]
    fn rejects_bad_profiles_with_reasons() {
        let st = store(1 << 20, 3600);
        let good = profile(ProfileKind::Cpu, 10, &[("f", 3)]);
        let mut garbage = good.clone();
        garbage.pprof = Bytes::from_static(b"\x1f\x8b\x08\x00garbage");
        let mut not_proto = good.clone();
        not_proto.pprof = Bytes::from_static(b"\xff\xff\xff\xff");
        let mut wrong_type = good.clone();
        wrong_type.r#type = ProfileType::Gpu as i32;
        let mut unknown = good.clone();
        unknown.r#type = 42;
        let mut count = good.clone();
        count.sample_count = 4;
        let mut time = good.clone();
        time.end_unix_ns = 0;
        let rejects = st
            .ingest(
                "n",
                "a",
                &[good, garbage, not_proto, wrong_type, unknown, count, time],
                100 * S,
            )
            .rejected;
        let reasons: Vec<_> = rejects.iter().map(ProfileReject::reason).collect();
        assert_eq!(
            reasons,
            [
                "gzip",
                "protobuf",
                "sample_types",
                "unknown_type",
                "sample_count",
                "bad_time_range"
            ]
        );
        assert_eq!(st.totals().1, 1, "the good one is stored");
    }

    #[test]
    fn evicts_by_age_and_by_bytes_from_the_largest_agent() {
        let one = profile(ProfileKind::Cpu, 0, &[("f", 1)]).pprof.len();
        let st = store(one * 4 + one / 2, 60);
        let now = 1000 * S;
        // Ended 10 s ago and 70 s ago: the second is beyond the 60 s retention at once.
        st.ingest(
            "n1",
            "a",
            &[profile(ProfileKind::Cpu, 980, &[("f", 1)])],
            now,
        );
        st.ingest(
            "n1",
            "a",
            &[profile(ProfileKind::Cpu, 920, &[("f", 1)])],
            now,
        );
        assert_eq!(st.totals().1, 1);
        assert_eq!(
            st.metrics
                .evicted
                .get_or_create(&vec![("reason".into(), "age".into())])
                .get(),
            1
        );
        // n1 gets 3 more (4 in all), n2 one: 5 > the cap of 4.5: n1's oldest goes.
        for t in [981, 982, 983] {
            st.ingest("n1", "a", &[profile(ProfileKind::Cpu, t, &[("f", 1)])], now);
        }
        st.ingest(
            "n2",
            "b",
            &[profile(ProfileKind::Gpu, 950, &[("g", 1)])],
            now,
        );
        assert_eq!(st.totals().1, 4);
        assert_eq!(
            st.metrics
                .evicted
                .get_or_create(&vec![("reason".into(), "bytes".into())])
                .get(),
            1
        );
        let sum = st.summary();
        assert_eq!(
            sum[0].from_unix_ns,
            981 * S,
            "n1's oldest (980) evicted, not n2's older one"
        );
        assert_eq!(sum[1].node, "n2");
        // Time passes: the sweep evicts by age.
        st.sweep(now + 3600 * S);
        assert_eq!(st.totals(), (0, 0));
        assert!(st.summary().is_empty());
        assert_eq!(st.metrics.stored_bytes.get(), 0);
    }
}
