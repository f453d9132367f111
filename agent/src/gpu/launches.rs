//! GPU time per CUDA launch: the CUPTI launch records (which thread launched, when) joined with
//! the kernel and graph activity records of the same correlation id, into the profiler's
//! [`LaunchTiming`]s. Also the mapping of a containerised process's thread ids onto the host's
//! ([`TidMap`]), which the join needs to meet the eBPF samples.
//!
//! Launch records usually arrive first (the library sends them within ~100 ms of the call;
//! kernel records come when CUPTI flushes a buffer, every ~200 ms, after the kernel ran), but
//! either side may come first: both wait in one bounded table keyed by (pid, correlation id).
//!
//! - A kernel launch enqueues one kernel: its timing is emitted when both sides are in.
//! - A graph launch at `graphs` detail has one graph-trace record: emitted likewise, with the
//!   graph's span. At `full` detail it has one kernel record per kernel node, which may come in
//!   several buffers: emitted once no node arrived for [`LaunchJoinConfig::graph_settle_ns`],
//!   with the nodes' summed durations.
//!
//! What never matches within [`LaunchJoinConfig::wait_ns`] is counted (launches without GPU work,
//! GPU work without its launch) and forgotten; a full table evicts its oldest entry, counted.
//! Only kernels and graphs count as a launch's GPU work (memcpy/memset nodes of a graph are in
//! the graph-trace span at `graphs` detail, not at `full`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::profiling::stage::LaunchTiming;

/// One CUDA launch API call reported by the injection library, in the host's pid namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchApiCall {
    /// Process (host pid namespace).
    pub pid: u32,
    /// Launching thread (host pid namespace); 0 when it could not be mapped.
    pub tid: u32,
    /// CUPTI correlation id (shared with the kernel/graph records of the launch).
    pub correlation_id: u32,
    /// The call's entry and exit on the launching thread, CLOCK_MONOTONIC ns.
    pub start_ns: u64,
    pub end_ns: u64,
    /// When the thread's previous launch call returned (or launch tracing began); 0: unknown.
    pub after_ns: u64,
    /// `cuGraphLaunch` / `cudaGraphLaunch`.
    pub graph: bool,
    /// A driver launch inside a runtime launch on the same thread (the runtime's own call).
    pub nested: bool,
}

/// Bounds and waits of the join.
#[derive(Clone, Debug)]
pub struct LaunchJoinConfig {
    /// How long one side waits for the other.
    pub wait_ns: u64,
    /// A full-detail graph launch is complete once no node kernel arrived for this long.
    pub graph_settle_ns: u64,
    /// Entries (launches and early GPU work) held at most.
    pub max_pending: usize,
    /// Timings held for [`LaunchJoiner::take`] at most (it is called every pipeline tick).
    pub max_out: usize,
    /// Processes remembered as sending launch records.
    pub max_processes: usize,
}

impl Default for LaunchJoinConfig {
    fn default() -> Self {
        LaunchJoinConfig {
            wait_ns: 5_000_000_000,
            graph_settle_ns: 1_000_000_000,
            max_pending: 256 * 1024,
            max_out: 256 * 1024,
            max_processes: 4096,
        }
    }
}

/// Join counters (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchJoinCounters {
    /// Launch records received.
    pub launches: u64,
    /// Timings produced.
    pub timed: u64,
    /// Launches whose GPU work never arrived (failed enqueue, records CUPTI dropped, detail
    /// switched off meanwhile). Nested driver launches are not counted: their work may carry
    /// the outer runtime call's id.
    pub launches_unmatched: u64,
    /// Kernel/graph records of a launch-tracing process whose launch record never arrived
    /// (launch records dropped, or launched through a function not hooked).
    pub work_unmatched: u64,
    /// Two launch records with one correlation id (the outer call is kept).
    pub duplicate_launches: u64,
    /// Entries evicted from the full table.
    pub evicted: u64,
    /// Timings dropped because nobody took them.
    pub out_dropped: u64,
}

type Key = (u32, u32);

#[derive(Debug)]
struct Pending {
    call: Option<LaunchApiCall>,
    gpu_ns: u64,
    records: u32,
    /// Kernel name while every record had the same one.
    name: Option<Arc<str>>,
    mixed_names: bool,
    /// A graph-trace record arrived: the graph's work is complete.
    graph_record: bool,
    first_seen_ns: u64,
    last_work_ns: u64,
}

/// The launch ↔ GPU work join (single-threaded; the GPU stage owns it).
pub struct LaunchJoiner {
    cfg: LaunchJoinConfig,
    pending: HashMap<Key, Pending>,
    /// Insertion order for expiry and eviction; entries removed meanwhile are skipped.
    order: VecDeque<(Key, u64)>,
    /// Full-detail graph launches waiting to settle: (key, last node arrival).
    settling: VecDeque<(Key, u64)>,
    /// Processes that sent launch records: only their GPU work waits for a launch.
    tracing: HashSet<u32>,
    out: Vec<LaunchTiming>,
    counters: LaunchJoinCounters,
}

impl LaunchJoiner {
    pub fn new(cfg: LaunchJoinConfig) -> Self {
        LaunchJoiner {
            cfg,
            pending: HashMap::new(),
            order: VecDeque::new(),
            settling: VecDeque::new(),
            tracing: HashSet::new(),
            out: Vec::new(),
            counters: LaunchJoinCounters::default(),
        }
    }

    pub fn counters(&self) -> LaunchJoinCounters {
        self.counters
    }

    /// Entries waiting for their other side.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn entry(&mut self, key: Key, now_ns: u64) -> &mut Pending {
        if !self.pending.contains_key(&key) {
            while self.pending.len() >= self.cfg.max_pending.max(1) {
                let Some((k, t)) = self.order.pop_front() else {
                    break;
                };
                if self.pending.get(&k).is_some_and(|p| p.first_seen_ns == t) {
                    self.pending.remove(&k);
                    self.counters.evicted += 1;
                }
            }
            self.order.push_back((key, now_ns));
        }
        self.pending.entry(key).or_insert_with(|| Pending {
            call: None,
            gpu_ns: 0,
            records: 0,
            name: None,
            mixed_names: false,
            graph_record: false,
            first_seen_ns: now_ns,
            last_work_ns: now_ns,
        })
    }

    /// A launch record arrived.
    pub fn add_launch(&mut self, call: LaunchApiCall, now_ns: u64) {
        self.counters.launches += 1;
        if self.tracing.len() < self.cfg.max_processes || self.tracing.contains(&call.pid) {
            self.tracing.insert(call.pid);
        }
        let key = (call.pid, call.correlation_id);
        let e = self.entry(key, now_ns);
        match &mut e.call {
            Some(prev) => {
                // One id for two calls: the runtime's launch and its own driver call. The
                // outer one is what the application called (and what the stack sample saw).
                if call.start_ns <= prev.start_ns && call.end_ns >= prev.end_ns {
                    *prev = call;
                }
                self.counters.duplicate_launches += 1;
            }
            None => e.call = Some(call),
        }
        self.try_emit(key);
    }

    /// A kernel (`graph_record: false`) or graph-trace record of `pid` arrived.
    pub fn add_work(
        &mut self,
        pid: u32,
        correlation_id: u32,
        duration_ns: u64,
        name: Option<Arc<str>>,
        graph_record: bool,
        now_ns: u64,
    ) {
        let key = (pid, correlation_id);
        if !self.pending.contains_key(&key) && !self.tracing.contains(&pid) {
            return; // this process sends no launch records (launch tracing off there)
        }
        let e = self.entry(key, now_ns);
        e.gpu_ns = e.gpu_ns.saturating_add(duration_ns);
        e.records += 1;
        e.last_work_ns = now_ns;
        e.graph_record |= graph_record;
        if !e.mixed_names {
            match (&e.name, name) {
                (None, n) if e.records == 1 => e.name = n,
                (Some(a), Some(b)) if **a == *b => {}
                _ => {
                    e.name = None;
                    e.mixed_names = true;
                }
            }
        }
        let settle = e.call.is_some_and(|c| c.graph) && !e.graph_record;
        if settle {
            self.settling.push_back((key, now_ns));
        } else {
            self.try_emit(key);
        }
    }

    /// Emits `key` if its launch and (complete) GPU work are both in.
    fn try_emit(&mut self, key: Key) {
        let Some(p) = self.pending.get(&key) else {
            return;
        };
        let Some(call) = p.call else { return };
        if p.records == 0 || (call.graph && !p.graph_record) {
            return; // graph nodes: emitted when they settle
        }
        self.emit(key);
    }

    fn emit(&mut self, key: Key) {
        let Some(p) = self.pending.remove(&key) else {
            return;
        };
        let Some(call) = p.call else { return };
        if self.out.len() >= self.cfg.max_out.max(1) {
            self.counters.out_dropped += 1;
            return;
        }
        self.counters.timed += 1;
        self.out.push(LaunchTiming {
            pid: call.pid,
            tid: call.tid,
            api_start_ns: call.start_ns,
            api_end_ns: call.end_ns,
            after_ns: call.after_ns,
            gpu_ns: p.gpu_ns,
            kernel: if call.graph { None } else { p.name },
        });
    }

    /// Emits settled graph launches and expires what waited too long.
    pub fn poll(&mut self, now_ns: u64) {
        while let Some(&(key, at)) = self.settling.front() {
            if at.saturating_add(self.cfg.graph_settle_ns) > now_ns {
                break;
            }
            self.settling.pop_front();
            // A later node re-queued it: that entry decides.
            if self
                .pending
                .get(&key)
                .is_some_and(|p| p.last_work_ns == at && p.call.is_some())
            {
                self.emit(key);
            }
        }
        while let Some(&(key, at)) = self.order.front() {
            if at.saturating_add(self.cfg.wait_ns) > now_ns {
                break;
            }
            self.order.pop_front();
            let Some(p) = self.pending.get(&key) else {
                continue;
            };
            if p.first_seen_ns != at {
                continue;
            }
            match (p.call, p.records) {
                (Some(c), 0) => {
                    if !c.nested {
                        self.counters.launches_unmatched += 1;
                    }
                    self.pending.remove(&key);
                }
                // A graph whose nodes kept arriving: what came is what it did.
                (Some(_), _) => self.emit(key),
                (None, _) => {
                    self.counters.work_unmatched += 1;
                    self.pending.remove(&key);
                }
            }
        }
    }

    /// Timings produced since the last call.
    pub fn take(&mut self) -> Vec<LaunchTiming> {
        std::mem::take(&mut self.out)
    }
}

/// Maps the thread ids a process reports (its own pid namespace, e.g. a container's) onto the
/// host's, which the eBPF samples carry, from `/proc/<pid>/task/*/status` `NSpid:` lines.
/// Rescans at most once per [`TidMap::RESCAN`] when an unknown thread shows up.
#[derive(Debug)]
pub struct TidMap {
    proc_root: PathBuf,
    host_pid: u32,
    map: HashMap<u32, u32>,
    last_scan: Option<Instant>,
}

impl TidMap {
    pub const RESCAN: Duration = Duration::from_secs(1);

    /// For process `host_pid` (host namespace) under `/proc`.
    pub fn new(host_pid: u32) -> Self {
        Self::with_proc_root(Path::new("/proc"), host_pid)
    }

    /// For a process under another proc root (tests).
    pub fn with_proc_root(proc_root: &Path, host_pid: u32) -> Self {
        TidMap {
            proc_root: proc_root.to_path_buf(),
            host_pid,
            map: HashMap::new(),
            last_scan: None,
        }
    }

    /// The host tid of namespace tid `ns_tid`, if the thread exists (or existed at the last
    /// scan).
    pub fn host_tid(&mut self, ns_tid: u32) -> Option<u32> {
        if let Some(&t) = self.map.get(&ns_tid) {
            return Some(t);
        }
        if self.last_scan.is_none_or(|t| t.elapsed() >= Self::RESCAN) {
            self.last_scan = Some(Instant::now());
            self.map = scan_ns_tids(&self.proc_root, self.host_pid);
        }
        self.map.get(&ns_tid).copied()
    }
}

/// Innermost-namespace tid → host tid for every thread of `pid`.
fn scan_ns_tids(proc_root: &Path, pid: u32) -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    let Ok(dir) = std::fs::read_dir(proc_root.join(pid.to_string()).join("task")) else {
        return map;
    };
    for task in dir.flatten() {
        let Some(host) = task
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A thread that exited meanwhile has no status: skipped.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        if let Some(ns) = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|v| v.split_whitespace().last())
            .and_then(|v| v.parse::<u32>().ok())
        {
            map.insert(ns, host);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn call(pid: u32, corr: u32, start: u64) -> LaunchApiCall {
        LaunchApiCall {
            pid,
            tid: pid + 1,
            correlation_id: corr,
            start_ns: start,
            end_ns: start + 4_000,
            after_ns: start.saturating_sub(1_000),
            graph: false,
            nested: false,
        }
    }

    fn joiner() -> LaunchJoiner {
        LaunchJoiner::new(LaunchJoinConfig::default())
    }

    fn name(s: &str) -> Option<Arc<str>> {
        Some(Arc::from(s))
    }

    #[test]
    fn kernels_join_their_launch_in_either_order() {
        let mut j = joiner();
        j.add_launch(call(10, 1, 100 * MS), 101 * MS);
        assert!(j.take().is_empty());
        j.add_work(10, 1, 30_000, name("gemm"), false, 300 * MS);
        // Kernel before launch (a buffer flushed before the launch ring was drained).
        j.add_launch(call(10, 5, 100 * MS), 101 * MS); // marks pid 10 as tracing
        j.add_work(10, 2, 7_000, name("norm"), false, 302 * MS);
        j.add_launch(call(10, 2, 200 * MS), 303 * MS);
        let t = j.take();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0],
            LaunchTiming {
                pid: 10,
                tid: 11,
                api_start_ns: 100 * MS,
                api_end_ns: 100 * MS + 4_000,
                after_ns: 100 * MS - 1_000,
                gpu_ns: 30_000,
                kernel: name("gemm"),
            }
        );
        assert_eq!((t[1].gpu_ns, t[1].kernel.as_deref()), (7_000, Some("norm")));
        // Same correlation id in another process is another launch.
        j.add_launch(call(20, 1, 100 * MS), 304 * MS);
        j.add_work(20, 1, 1_000, None, false, 305 * MS);
        assert_eq!(j.take()[0].pid, 20);
        assert_eq!(j.counters().timed, 3);
        assert_eq!(j.pending(), 1, "launch 10/5 waits");
    }

    #[test]
    fn graphs_sum_their_nodes_once_settled_or_take_the_graph_record() {
        let mut j = joiner();
        let g = LaunchApiCall {
            graph: true,
            ..call(10, 7, 100 * MS)
        };
        j.add_launch(g, 100 * MS);
        j.add_work(10, 7, 5_000, name("node_a"), false, 300 * MS);
        j.add_work(10, 7, 7_000, name("node_b"), false, 500 * MS);
        j.poll(1_400 * MS);
        assert!(j.take().is_empty(), "a node came 0.9 s ago: not settled");
        j.poll(1_500 * MS);
        let t = j.take();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].gpu_ns, t[0].kernel.clone()), (12_000, None));
        // Graph-level detail: one record is the whole graph.
        j.add_launch(
            LaunchApiCall {
                graph: true,
                ..call(10, 8, 2_000 * MS)
            },
            2_000 * MS,
        );
        j.add_work(10, 8, 90_000, None, true, 2_100 * MS);
        assert_eq!(j.take()[0].gpu_ns, 90_000);
    }

    #[test]
    fn unmatched_sides_expire_counted_and_the_table_is_bounded() {
        let mut j = LaunchJoiner::new(LaunchJoinConfig {
            max_pending: 3,
            ..LaunchJoinConfig::default()
        });
        // Not a launch-tracing process: its kernels are not held.
        j.add_work(99, 1, 1, None, false, 0);
        assert_eq!(j.pending(), 0);
        j.add_launch(call(10, 1, 0), 0);
        j.add_launch(
            LaunchApiCall {
                nested: true,
                ..call(10, 2, 0)
            },
            0,
        );
        j.add_work(10, 3, 5, None, false, 0);
        assert_eq!(j.pending(), 3);
        j.add_launch(call(10, 4, 0), MS); // evicts the oldest (10/1)
        assert_eq!((j.pending(), j.counters().evicted), (3, 1));
        j.poll(5_000 * MS + 1);
        let c = j.counters();
        assert_eq!(
            (c.launches_unmatched, c.work_unmatched),
            (0, 1),
            "the nested launch is not counted; 10/4 is younger"
        );
        j.poll(6_000 * MS);
        assert_eq!(j.counters().launches_unmatched, 1);
        assert_eq!(j.pending(), 0);
        assert!(j.take().is_empty());
    }

    #[test]
    fn duplicate_ids_keep_the_outer_call_and_mixed_names_are_dropped() {
        let mut j = joiner();
        let outer = LaunchApiCall {
            start_ns: 100,
            end_ns: 10_000,
            ..call(10, 1, 0)
        };
        let inner = LaunchApiCall {
            start_ns: 2_000,
            end_ns: 8_000,
            nested: true,
            ..call(10, 1, 0)
        };
        j.add_launch(inner, 0);
        j.add_launch(outer, 0);
        j.add_work(10, 1, 3, name("k"), false, 0);
        let t = j.take();
        assert_eq!((t[0].api_start_ns, t[0].api_end_ns), (100, 10_000));
        assert_eq!(j.counters().duplicate_launches, 1);

        let g = LaunchApiCall {
            graph: true,
            ..call(10, 2, 0)
        };
        j.add_launch(g, 0);
        j.add_work(10, 2, 1, name("a"), false, 0);
        j.add_work(10, 2, 1, name("a"), false, 0);
        j.add_work(10, 2, 1, name("b"), false, 0);
        j.poll(10 * 1_000 * MS);
        let t = j.take();
        assert_eq!((t[0].gpu_ns, t[0].kernel.clone()), (3, None));
    }

    #[test]
    fn output_is_bounded() {
        let mut j = LaunchJoiner::new(LaunchJoinConfig {
            max_out: 2,
            ..LaunchJoinConfig::default()
        });
        for i in 0..5 {
            j.add_launch(call(1, i, 0), 0);
            j.add_work(1, i, 1, None, false, 0);
        }
        assert_eq!(j.take().len(), 2);
        assert_eq!(j.counters().out_dropped, 3);
    }

    #[test]
    fn tids_map_through_nspid() {
        let root = std::env::temp_dir().join(format!("infertap-tidmap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let task = root.join("4000/task");
        for (host, ns) in [(4000, 1), (4007, 12)] {
            let d = task.join(host.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("status"),
                format!("Name:\tpython\nNSpid:\t{host}\t{ns}\nVmRSS:\t1 kB\n"),
            )
            .unwrap();
        }
        // A thread that vanished between readdir and open.
        std::fs::create_dir_all(task.join("4009")).unwrap();
        let mut m = TidMap::with_proc_root(&root, 4000);
        assert_eq!(m.host_tid(12), Some(4007));
        assert_eq!(m.host_tid(1), Some(4000));
        assert_eq!(
            m.host_tid(13),
            None,
            "unknown, and no rescan within a second"
        );
        let _ = std::fs::remove_dir_all(&root);

        // This process, in our own namespace: the identity.
        let me = std::process::id();
        let mut m = TidMap::new(me);
        assert_eq!(m.host_tid(me), Some(me));
        // A thread started after the first scan is found by the next one (a second later).
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::syscall(libc::SYS_gettid) } as u32)
                .unwrap();
            let _ = stop_rx.recv();
        });
        let tid = rx.recv().unwrap();
        std::thread::sleep(TidMap::RESCAN);
        assert_eq!(m.host_tid(tid), Some(tid));
        drop(stop_tx);
        h.join().unwrap();
    }
}
