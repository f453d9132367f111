//! The profiler stage: three threads of its own, so the socket-event drain never waits on it.
//!
//! - `infertap-profiler` owns the `SAMPLES` ring and the profiler's kernel maps: it drains the
//!   ring (polling; records do not wake it), unwinds each sample's copied stack, resolves its
//!   Python frames, labels it, counts it into the interval's aggregates and the attribution
//!   window, and attributes completed requests' slow token gaps.
//! - `infertap-pyfind` runs CPython discovery for newly seen processes (milliseconds of ELF
//!   and memory reads each) and hands the layouts back.
//! - `infertap-pprof` symbolizes and encodes each interval's aggregates (blazesym on DWARF can
//!   take tens of milliseconds per new library) and hands the profiles to the sinks.
//!
//! The pipeline talks to it through a bounded command channel; a full channel drops the
//! command and counts it (`profiler_command_dropped`) rather than blocking the drain.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use infertap_common::profile::{sample_flags, StackTop};
use infertap_proto::pb::ProfileData;
use infertap_stacks::python::code::Resolver;
use infertap_stacks::python::discover::{discover, DiscoverError, PythonProcess};
use infertap_stacks::symbolize::{Symbolizer, SymbolizerConfig};
use infertap_stacks::unwind::{TruncatedReason, UnwindConfig, UnwindOutcome, Unwinder};
use infertap_stacks::UserRegs;
use tracing::{debug, info, warn};

use super::aggregate::{OffCpuState, ProfileAggregate, ProfileType, SampleLabels, Values};
use super::attribution::{
    for_each_share, profile_range, EntryKind, RangeProfile, SampleWindow, WindowEntry,
};
use super::labels::Labeller;
use super::offcpu::{OffCpuPiece, OffCpuTracker, Pending};
use super::stack::{NativeFrame, PythonFrame, RawStack, StackInterner, Truncation};
use super::symbolic::{FunctionSnapshot, Location, ModuleTable, Namer};
use crate::clock;
use crate::probes::profile::{decode_sample, ProfileProbes, SampleKind, SampleView};
use crate::record::RequestRecord;
use crate::sinks::pprof::{self, BuildContext};

/// What the profiler does (from the CLI).
#[derive(Clone, Debug)]
pub struct ProfilerOptions {
    /// On-CPU sampling rate per CPU (for each sample's weight; the perf events are set up by
    /// the probes).
    pub hz: u64,
    /// Node name put on every sample.
    pub node: String,
    /// How long samples stay available for attribution to completed requests.
    pub window: Duration,
    /// Most samples kept for attribution.
    pub max_window_entries: usize,
    /// A gap is slow when longer than this × its request's median gap.
    pub slow_gap_factor: f64,
    /// Slow gaps attributed per request (the longest).
    pub max_slow_gaps: usize,
    /// Stacks kept per attributed range (`explain`).
    pub top_stacks: usize,
    /// Keep per-request attributions for the final report (`infertap explain`).
    pub keep_attributions: bool,
    /// Also merge every interval into one profile per type for the final report
    /// (`infertap profile`).
    pub keep_whole: bool,
    /// Off-CPU switch-outs captured at least 1 in N (each stands for the N it was sampled at;
    /// 0 = off).
    pub offcpu_every: u32,
    /// Most off-CPU captures per second across the traced processes: when they switch more
    /// often, N is raised (every second) so the capture rate stays near this. 0: N stays fixed.
    pub offcpu_budget: u32,
    /// CUDA launches captured 1 in N (each stands for N; 0 = off).
    pub launch_every: u32,
}

impl Default for ProfilerOptions {
    fn default() -> Self {
        ProfilerOptions {
            hz: 49,
            node: String::new(),
            window: Duration::from_secs(60),
            max_window_entries: 500_000,
            slow_gap_factor: 3.0,
            max_slow_gaps: 5,
            top_stacks: 8,
            keep_attributions: false,
            keep_whole: false,
            offcpu_every: 16,
            offcpu_budget: 100,
            launch_every: 0,
        }
    }
}

/// Counters of the profiler, shared with the pipeline (metrics).
#[derive(Debug, Default)]
pub struct ProfilerCounters {
    pub cpu_samples: AtomicU64,
    pub offcpu_samples: AtomicU64,
    pub offcpu_periods: AtomicU64,
    pub launch_samples: AtomicU64,
    pub undecodable: AtomicU64,
    pub stacks_complete: AtomicU64,
    pub stacks_truncated: [AtomicU64; TruncatedReason::ALL.len()],
    /// Samples of known Python processes, and those with at least one Python frame.
    pub python_samples: AtomicU64,
    pub python_samples_with_frames: AtomicU64,
    pub python_frame_errors: AtomicU64,
    /// Processes whose Python frames are walked now.
    pub python_processes: AtomicU64,
    pub commands_dropped: AtomicU64,
    pub build_queue_full: AtomicU64,
    pub profiles_built: AtomicU64,
    pub window_evicted: AtomicU64,
    pub offcpu_unmatched: AtomicU64,
    pub offcpu_evicted: AtomicU64,
    pub requests_attributed: AtomicU64,
    /// The 1-in-N rate off-CPU switch-outs are captured at now.
    pub offcpu_every: AtomicU64,
    /// Sampled launches joined to a CUPTI launch timing (their GPU time is known).
    pub launches_timed: AtomicU64,
    /// Sampled launches for which no timing arrived in time (counted, no GPU time).
    pub launches_untimed: AtomicU64,
}

impl ProfilerCounters {
    pub fn truncated(&self, r: TruncatedReason) -> u64 {
        TruncatedReason::ALL
            .iter()
            .position(|x| *x == r)
            .map_or(0, |i| self.stacks_truncated[i].load(Relaxed))
    }
}

/// Code that took part of an attributed range: stacks grouped by what they were doing.
#[derive(Clone, Debug, PartialEq)]
pub struct CodeShare {
    /// On-CPU: the innermost frames (what ran). Off-CPU: the kernel function the thread waited
    /// in, then the innermost user frames (where it waited). Leaf first.
    pub frames: Vec<String>,
    /// The innermost Python frame, `qualname (file:line)`, when the stacks have one.
    pub python: Option<String>,
    pub process: Arc<str>,
    pub thread: Arc<str>,
    pub nanos: u64,
    /// `None`: on-CPU time; otherwise how the threads were off CPU.
    pub state: Option<OffCpuState>,
    /// The largest contributing stack, root first, `;`-separated (as flame graph tools fold).
    pub example: String,
}

/// A range (a token gap, or a request's time to first token) with what ran in it.
#[derive(Clone, Debug)]
pub struct RangeAttribution {
    /// 1-based index of the token the gap precedes; 0 for the time to first token.
    pub token_index: usize,
    pub start_ns: u64,
    pub len_ns: u64,
    pub on_cpu_ns: u64,
    pub off_cpu_ns: u64,
    pub cpu_samples: u32,
    /// On-CPU code, largest first (capped).
    pub on_cpu: Vec<CodeShare>,
    /// Off-CPU waits, largest first (capped).
    pub off_cpu: Vec<CodeShare>,
}

/// What the serving processes did during one request's time to first token and slowest gaps.
#[derive(Clone, Debug)]
pub struct RequestAttribution {
    pub pid: u32,
    pub conn_id: u64,
    pub seq_on_conn: u32,
    pub ttft: Option<RangeAttribution>,
    pub slow_gaps: Vec<RangeAttribution>,
}

/// What the profiler hands back when it stops.
#[derive(Debug, Default)]
pub struct ProfilerReport {
    pub attributions: Vec<RequestAttribution>,
    /// With `keep_whole`: one profile per type over the whole run.
    pub whole: Vec<ProfileData>,
}

/// The GPU work one CUDA launch call produced, as the CUPTI side measured it: the launch API
/// call's time on the launching thread and the summed duration of the kernels it enqueued.
/// The profiler joins it to the launch's stack sample (same thread, sample time inside the
/// call) to weigh GPU profiles by GPU time.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchTiming {
    pub pid: u32,
    /// Kernel thread id of the launching thread; 0 when CUPTI's thread could not be mapped
    /// (then any thread of `pid` matches).
    pub tid: u32,
    /// The launch API call, CLOCK_MONOTONIC ns.
    pub api_start_ns: u64,
    pub api_end_ns: u64,
    /// When the launching thread's previous launch call returned (or launch tracing began),
    /// CLOCK_MONOTONIC ns; 0 when unknown. The call's stack sample, taken at its entry, is then
    /// exactly the thread's latest launch sample in `(after_ns, api_end_ns]`, however late after
    /// the entry CUPTI saw the call start.
    pub after_ns: u64,
    /// GPU time of the kernels (or graph) this launch enqueued, ns.
    pub gpu_ns: u64,
    /// Kernel name when known (one kernel), for the `kernel` label.
    pub kernel: Option<Arc<str>>,
}

enum Command {
    LaunchTimings(Vec<LaunchTiming>),
    AddRoot(u32),
    ProcessExited(u32),
    ProcessExec(u32),
    Request(Arc<RequestRecord>),
    EndInterval,
    Finish(SyncSender<ProfilerReport>),
}

/// Where finished profiles go (called on the builder thread).
pub type ProfileSinkFn = Box<dyn FnMut(&ProfileData) + Send>;

/// The running profiler.
pub struct Profiler {
    tx: SyncSender<Command>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<ProfilerCounters>,
}

impl Profiler {
    /// Starts the profiler on `probes` (the kernel maps and the sample ring move to its thread).
    pub fn spawn(
        opts: ProfilerOptions,
        mut probes: ProfileProbes,
        sink: ProfileSinkFn,
    ) -> Result<Profiler> {
        let ring = probes.take_samples().context("sample ring already taken")?;
        let counters = Arc::new(ProfilerCounters::default());
        let (tx, rx) = mpsc::sync_channel(4096);
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("infertap-profiler".into())
            .spawn(move || {
                let mut s = match State::new(opts, probes, c, sink) {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("profiler could not start: {e:#}");
                        return;
                    }
                };
                s.run(ring, rx);
            })
            .context("spawning the profiler thread")?;
        Ok(Profiler {
            tx,
            thread: Some(thread),
            counters,
        })
    }

    pub fn counters(&self) -> &Arc<ProfilerCounters> {
        &self.counters
    }

    fn send(&self, c: Command) {
        match self.tx.try_send(c) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.commands_dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// GPU durations of CUDA launches (from CUPTI), to weigh the sampled launch stacks.
    pub fn gpu_launch_timings(&self, t: Vec<LaunchTiming>) {
        if !t.is_empty() {
            self.send(Command::LaunchTimings(t));
        }
    }

    /// A process the user asked to trace (the root of a server's process tree).
    pub fn add_root(&self, pid: u32) {
        self.send(Command::AddRoot(pid));
    }

    pub fn process_exited(&self, pid: u32) {
        self.send(Command::ProcessExited(pid));
    }

    /// A traced process replaced its image (`execve`): its modules and interpreter changed.
    pub fn process_exec(&self, pid: u32) {
        self.send(Command::ProcessExec(pid));
    }

    /// A completed request, for attribution of its slow token gaps.
    pub fn request_completed(&self, r: Arc<RequestRecord>) {
        self.send(Command::Request(r));
    }

    /// Ends the aggregation interval: its profiles are built and handed to the sink.
    pub fn end_interval(&self) {
        self.send(Command::EndInterval);
    }

    /// Stops the profiler after a last drain and interval; waits at most `timeout`.
    pub fn finish(mut self, timeout: Duration) -> Option<ProfilerReport> {
        let (tx, rx) = mpsc::sync_channel(1);
        // A blocking send: the final command must not be dropped.
        if self.tx.send(Command::Finish(tx)).is_err() {
            return None;
        }
        let report = rx.recv_timeout(timeout).ok();
        if let Some(t) = self.thread.take() {
            if report.is_some() {
                let _ = t.join();
            }
        }
        report
    }
}

/// What discovery knows of a process.
enum PyState {
    /// Discovery asked, no answer yet.
    Asked,
    Python,
    /// Not CPython 3.10–3.13 (or refused): frames stay native-only.
    NotPython,
    /// Ask again at this time (the interpreter was still starting).
    RetryAt(Instant),
}

enum BuildJob {
    Interval {
        aggs: Vec<ProfileAggregate>,
        modules: Arc<[Arc<infertap_stacks::unwind::ModuleInfo>]>,
        functions: FunctionSnapshot,
        unix_offset_ns: i64,
        exes: Arc<HashSet<std::path::PathBuf>>,
    },
    Name {
        stacks: Vec<Arc<RawStack>>,
        modules: Arc<[Arc<infertap_stacks::unwind::ModuleInfo>]>,
        functions: FunctionSnapshot,
        reply: SyncSender<Vec<Vec<Location>>>,
    },
    Whole {
        aggs: Vec<ProfileAggregate>,
        modules: Arc<[Arc<infertap_stacks::unwind::ModuleInfo>]>,
        functions: FunctionSnapshot,
        unix_offset_ns: i64,
        exes: Arc<HashSet<std::path::PathBuf>>,
        reply: SyncSender<Vec<ProfileData>>,
    },
}

/// A sampled launch waiting for its CUPTI timing.
struct PendingLaunch {
    ts_ns: u64,
    stack: Arc<RawStack>,
    labels: Arc<SampleLabels>,
}

/// Sampled launches waiting for their timings, per (pid, tid) in time order, so a timing finds
/// its sample with a binary search (most timings have none: 1 launch in N is sampled).
#[derive(Default)]
struct PendingLaunches {
    by_thread: HashMap<(u32, u32), VecDeque<PendingLaunch>>,
    len: usize,
}

impl PendingLaunches {
    fn push(&mut self, pid: u32, tid: u32, l: PendingLaunch) {
        let q = self.by_thread.entry((pid, tid)).or_default();
        // Ring order per CPU; a thread's samples arrive in order unless it migrated CPUs.
        let at = q.partition_point(|x| x.ts_ns <= l.ts_ns);
        q.insert(at, l);
        self.len += 1;
    }

    /// Removes and returns the latest sample of (pid, tid) — any thread of `pid` when `tid` is
    /// 0 — taken in `[lo, hi]`.
    fn take_latest(&mut self, pid: u32, tid: u32, lo: u64, hi: u64) -> Option<PendingLaunch> {
        let mut best: Option<((u32, u32), usize, u64)> = None;
        let mut consider = |key: (u32, u32), q: &VecDeque<PendingLaunch>| {
            let end = q.partition_point(|x| x.ts_ns <= hi);
            if end > 0 && q[end - 1].ts_ns >= lo && best.is_none_or(|b| q[end - 1].ts_ns > b.2) {
                best = Some((key, end - 1, q[end - 1].ts_ns));
            }
        };
        if tid != 0 {
            if let Some(q) = self.by_thread.get(&(pid, tid)) {
                consider((pid, tid), q);
            }
        } else {
            for (k, q) in self.by_thread.iter().filter(|(k, _)| k.0 == pid) {
                consider(*k, q);
            }
        }
        let (key, i, _) = best?;
        let q = self.by_thread.get_mut(&key)?;
        let l = q.remove(i)?;
        if q.is_empty() {
            self.by_thread.remove(&key);
        }
        self.len -= 1;
        Some(l)
    }

    /// Drops samples older than `cutoff`; returns how many.
    fn expire(&mut self, cutoff: u64) -> u64 {
        let mut n = 0;
        self.by_thread.retain(|_, q| {
            while q.front().is_some_and(|l| l.ts_ns < cutoff) {
                q.pop_front();
                n += 1;
            }
            !q.is_empty()
        });
        self.len -= n as usize;
        n
    }

    /// Drops the oldest sample of the fullest thread (at the bound).
    fn evict_one(&mut self) -> bool {
        let Some(key) = self
            .by_thread
            .iter()
            .max_by_key(|(_, q)| q.len())
            .map(|(k, _)| *k)
        else {
            return false;
        };
        if let Some(q) = self.by_thread.get_mut(&key) {
            q.pop_front();
            self.len -= 1;
            if q.is_empty() {
                self.by_thread.remove(&key);
            }
        }
        true
    }

    fn forget_process(&mut self, pid: u32) {
        let mut n = 0;
        self.by_thread.retain(|k, q| {
            if k.0 == pid {
                n += q.len();
                false
            } else {
                true
            }
        });
        self.len -= n;
    }
}

/// How long a sampled launch waits for its timing (CUPTI delivers buffers every ~200 ms, the
/// agent forwards them at its next tick).
const LAUNCH_TIMING_WAIT_NS: u64 = 10_000_000_000;
/// A launch uprobe fires at the call's first instruction, before CUPTI's API timestamp (a few
/// µs, tens on a thread's first call). Used only when a timing has no `after_ns` bound.
const LAUNCH_MATCH_SLACK_NS: u64 = 50_000;

/// A completed request waiting until the samples of its last gap have been drained.
struct PendingRequest {
    ready_at_ns: u64,
    record: Arc<RequestRecord>,
}

/// A request's attribution before its stacks are named.
struct RawAttribution {
    pid: u32,
    conn_id: u64,
    seq_on_conn: u32,
    ttft: Option<(usize, RangeProfile)>,
    gaps: Vec<(usize, RangeProfile)>,
}

/// How long after a request ended its samples are surely drained (the ring is polled every
/// `POLL`; records from other CPUs may lag a little more).
const ATTRIBUTION_LAG_NS: u64 = 500_000_000;
const POLL: Duration = Duration::from_millis(50);
const RETRY_DISCOVERY: Duration = Duration::from_secs(2);

struct State {
    opts: ProfilerOptions,
    probes: ProfileProbes,
    counters: Arc<ProfilerCounters>,
    unwinder: Unwinder,
    resolver: Resolver,
    labeller: Labeller,
    interner: StackInterner,
    modules: ModuleTable,
    window: SampleWindow,
    offcpu: OffCpuTracker,
    aggs: HashMap<ProfileType, ProfileAggregate>,
    whole: HashMap<ProfileType, ProfileAggregate>,
    interval_start_ns: u64,
    period_ns: u64,
    python: HashMap<u32, PyState>,
    seen: HashSet<u32>,
    labels: HashMap<(u32, u32, Option<OffCpuState>), Arc<SampleLabels>>,
    requests: VecDeque<PendingRequest>,
    attributions: Vec<RawAttribution>,
    find_tx: SyncSender<u32>,
    found_rx: Receiver<(u32, Result<PythonProcess, DiscoverError>)>,
    build_tx: SyncSender<BuildJob>,
    builder: Option<JoinHandle<()>>,
    regs_scratch: Vec<u64>,
    launches: PendingLaunches,
    /// Whether any launch was timed in the current interval (the GPU profile's note).
    timed_this_interval: bool,
    /// Stack ranges registered with the kernel, per (pid, tid), so stack copies stop at the
    /// thread's stack top instead of copying the whole window.
    stack_tops: HashMap<(u32, u32), StackTop>,
    /// Off-CPU rate control: the 1-in-N in effect, and the switch count and time it was last
    /// adjusted at.
    offcpu_every_now: u32,
    switches_seen: u64,
    last_rate_check: Instant,
    /// Executables of the traced processes (as they name them), so profiles list the program
    /// as their main binary.
    exes: HashSet<std::path::PathBuf>,
}

impl State {
    fn new(
        opts: ProfilerOptions,
        probes: ProfileProbes,
        counters: Arc<ProfilerCounters>,
        mut sink: ProfileSinkFn,
    ) -> Result<State> {
        let (find_tx, find_rx) = mpsc::sync_channel::<u32>(1024);
        let (found_tx, found_rx) = mpsc::sync_channel(1024);
        std::thread::Builder::new()
            .name("infertap-pyfind".into())
            .spawn(move || {
                for pid in find_rx {
                    if found_tx.send((pid, discover(pid))).is_err() {
                        break;
                    }
                }
            })
            .context("spawning the Python discovery thread")?;
        let (build_tx, build_rx) = mpsc::sync_channel::<BuildJob>(8);
        let node = opts.node.clone();
        let c = counters.clone();
        let builder = std::thread::Builder::new()
            .name("infertap-pprof".into())
            .spawn(move || {
                let mut namer = Namer::new(Symbolizer::new(SymbolizerConfig::default()));
                for job in build_rx {
                    match job {
                        BuildJob::Interval {
                            aggs,
                            modules,
                            functions,
                            unix_offset_ns,
                            exes,
                        } => {
                            let ctx = BuildContext {
                                node: &node,
                                unix_offset_ns,
                                modules: &modules,
                                functions: &functions,
                                executables: &exes,
                            };
                            for a in &aggs {
                                if let Some(p) = pprof::build(a, &mut namer, &ctx) {
                                    c.profiles_built.fetch_add(1, Relaxed);
                                    sink(&p);
                                }
                            }
                        }
                        BuildJob::Whole {
                            aggs,
                            modules,
                            functions,
                            unix_offset_ns,
                            exes,
                            reply,
                        } => {
                            let ctx = BuildContext {
                                node: &node,
                                unix_offset_ns,
                                modules: &modules,
                                functions: &functions,
                                executables: &exes,
                            };
                            let out = aggs
                                .iter()
                                .filter_map(|a| pprof::build(a, &mut namer, &ctx))
                                .collect();
                            let _ = reply.send(out);
                        }
                        BuildJob::Name {
                            stacks,
                            modules,
                            functions,
                            reply,
                        } => {
                            let out = stacks
                                .iter()
                                .map(|s| namer.name(s, &modules, &functions))
                                .collect();
                            let _ = reply.send(out);
                        }
                    }
                }
            })
            .context("spawning the profile builder thread")?;
        let now = clock::monotonic_ns();
        let period_ns = 1_000_000_000u64.checked_div(opts.hz).unwrap_or(0);
        let offcpu_every_now = opts.offcpu_every;
        Ok(State {
            window: SampleWindow::new(opts.window.as_nanos() as u64, opts.max_window_entries),
            offcpu: OffCpuTracker::new(100_000),
            aggs: HashMap::new(),
            whole: HashMap::new(),
            interval_start_ns: now,
            period_ns,
            opts,
            probes,
            counters,
            unwinder: Unwinder::new(UnwindConfig::default()),
            resolver: Resolver::default(),
            labeller: Labeller::new(65_536),
            interner: StackInterner::default(),
            modules: ModuleTable::default(),
            python: HashMap::new(),
            seen: HashSet::new(),
            labels: HashMap::new(),
            requests: VecDeque::new(),
            attributions: Vec::new(),
            find_tx,
            found_rx,
            build_tx,
            builder: Some(builder),
            regs_scratch: Vec::new(),
            launches: PendingLaunches::default(),
            timed_this_interval: false,
            stack_tops: HashMap::new(),
            offcpu_every_now,
            switches_seen: 0,
            last_rate_check: Instant::now(),
            exes: HashSet::new(),
        })
    }

    fn run(&mut self, mut ring: RingBuf<MapData>, rx: Receiver<Command>) {
        let fd = ring.as_raw_fd();
        let mut last_housekeeping = Instant::now();
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; a timeout bounds the wait.
            unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as i32) };
            self.drain(&mut ring);
            self.poll_discovery();
            loop {
                match rx.try_recv() {
                    Ok(Command::Finish(reply)) => {
                        self.drain(&mut ring);
                        let report = self.finish();
                        let _ = reply.send(report);
                        return;
                    }
                    Ok(c) => self.command(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            if last_housekeeping.elapsed() >= Duration::from_millis(250) {
                last_housekeeping = Instant::now();
                self.housekeeping(clock::monotonic_ns());
            }
        }
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        // Bounded per call so commands are served during a flood.
        for _ in 0..100_000 {
            let Some(item) = ring.next() else { break };
            match decode_sample(&item) {
                Ok(v) => self.sample(&v),
                Err(e) => {
                    self.counters.undecodable.fetch_add(1, Relaxed);
                    debug!("undecodable sample record: {e}");
                }
            }
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::LaunchTimings(t) => self.join_launches(t),
            Command::AddRoot(pid) => {
                self.labeller.add_root(pid);
                // Roles depend on the roots: label samples afresh.
                self.labels.clear();
            }
            Command::ProcessExited(pid) => self.forget(pid),
            Command::ProcessExec(pid) => {
                // A new image: modules, interpreter and role are new.
                self.forget(pid);
            }
            Command::Request(r) => {
                if let Some(m) = &r.model {
                    self.labeller.saw_model(r.pid, m);
                }
                if r.token_ns.len() >= 2 || r.first_token_ns.is_some() {
                    self.requests.push_back(PendingRequest {
                        ready_at_ns: r.end_ns + ATTRIBUTION_LAG_NS,
                        record: r,
                    });
                }
            }
            Command::EndInterval => self.end_interval(),
            Command::Finish(_) => unreachable!("handled by run"),
        }
    }

    fn forget(&mut self, pid: u32) {
        if matches!(self.python.get(&pid), Some(PyState::Python)) {
            self.counters.python_processes.fetch_sub(1, Relaxed);
        }
        self.probes.forget_process(pid);
        self.unwinder.forget(pid);
        self.resolver.forget_process(pid);
        self.offcpu.forget_process(pid);
        self.labeller.forget_process(pid);
        self.python.remove(&pid);
        self.seen.remove(&pid);
        self.stack_tops.retain(|k, _| k.0 != pid);
        self.launches.forget_process(pid);
        self.labels.retain(|k, _| k.0 != pid);
    }

    /// First sight of a process: ask whether it is Python.
    fn see(&mut self, pid: u32) {
        if self.seen.insert(pid) {
            self.ask_python(pid);
            if self.exes.len() < 1024 {
                if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
                    self.exes.insert(exe);
                }
            }
        }
    }

    fn ask_python(&mut self, pid: u32) {
        if self.find_tx.try_send(pid).is_ok() {
            self.python.insert(pid, PyState::Asked);
        } else {
            self.python
                .insert(pid, PyState::RetryAt(Instant::now() + RETRY_DISCOVERY));
        }
    }

    fn poll_discovery(&mut self) {
        while let Ok((pid, r)) = self.found_rx.try_recv() {
            if !self.seen.contains(&pid) {
                continue; // exited meanwhile
            }
            match r {
                Ok(p) => {
                    let registered = self
                        .resolver
                        .add_process(&p)
                        .context("opening its memory")
                        .and_then(|_| self.probes.set_python_process(pid, &p.py_proc()));
                    match registered {
                        Ok(()) => {
                            info!(
                                "pid {pid}: CPython {} ({}), Python frames on",
                                p.version,
                                p.binary.display()
                            );
                            self.counters.python_processes.fetch_add(1, Relaxed);
                            self.python.insert(pid, PyState::Python);
                        }
                        Err(e) => {
                            warn!(
                                "pid {pid}: CPython {} found but not walkable: {e:#}",
                                p.version
                            );
                            self.python.insert(pid, PyState::NotPython);
                        }
                    }
                }
                Err(e) if e.is_transient() => {
                    self.python
                        .insert(pid, PyState::RetryAt(Instant::now() + RETRY_DISCOVERY));
                }
                Err(DiscoverError::NotPython) | Err(DiscoverError::Gone) => {
                    self.python.insert(pid, PyState::NotPython);
                }
                Err(e) => {
                    info!("pid {pid}: no Python frames ({}): {e}", e.reason());
                    self.python.insert(pid, PyState::NotPython);
                }
            }
        }
        let now = Instant::now();
        let retry: Vec<u32> = self
            .python
            .iter()
            .filter_map(|(&pid, s)| match s {
                PyState::RetryAt(t) if *t <= now => Some(pid),
                _ => None,
            })
            .collect();
        for pid in retry {
            self.ask_python(pid);
        }
    }

    fn labels(&mut self, pid: u32, tid: u32, state: Option<OffCpuState>) -> Arc<SampleLabels> {
        if let Some(l) = self.labels.get(&(pid, tid, state)) {
            return l.clone();
        }
        let l = Arc::new(SampleLabels {
            pid,
            process: self.labeller.role_of(pid),
            thread: self.labeller.thread_name(pid, tid),
            model: self.labeller.model_of(pid),
            state,
            kernel: None,
        });
        if self.labels.len() > 100_000 {
            self.labels.clear();
        }
        self.labels.insert((pid, tid, state), l.clone());
        l
    }

    /// Registers the sampled thread's stack range with the kernel on its first sample, and again
    /// when a sample shows the range moved (a copy cut short at the registered top, or `sp`
    /// outside it), so later copies stop at the top of the thread's stack.
    fn track_stack_top(&mut self, v: &SampleView<'_>) {
        let (pid, tid, sp) = (v.pid(), v.tid(), v.header.sp);
        if sp == 0 {
            return;
        }
        let known = self.stack_tops.get(&(pid, tid)).copied();
        let recheck = match known {
            None => true,
            Some(st) => {
                let cut = sample_flags::STACK_TO_TOP | sample_flags::STACK_SHORT;
                !(st.low <= sp && sp < st.top) || v.header.flags & cut == cut
            }
        };
        if !recheck {
            return;
        }
        let Some(st) = self.unwinder.stack_top(pid, sp) else {
            return;
        };
        if known == Some(st) {
            return;
        }
        if self.stack_tops.len() >= 65_536 {
            self.stack_tops.clear();
        }
        if self.probes.set_stack_top(pid, tid, st).is_ok() {
            self.stack_tops.insert((pid, tid), st);
        }
    }

    fn stack_of(&mut self, v: &SampleView<'_>) -> Arc<RawStack> {
        let pid = v.pid();
        self.see(pid);
        self.track_stack_top(v);
        let h = &v.header;
        let regs = UserRegs {
            ip: h.ip,
            sp: h.sp,
            bp: h.bp,
        };
        let mut frames = std::mem::take(&mut self.regs_scratch);
        frames.clear();
        let (outcome, _) = if h.ip != 0 {
            let un = self.unwinder.unwind(pid, regs, v.stack());
            frames.extend(un.lookup_addrs());
            (un.outcome, un.guessed_frames)
        } else {
            (
                UnwindOutcome::Truncated(TruncatedReason::UnmappedAddress),
                0,
            )
        };
        match outcome {
            UnwindOutcome::Complete => {
                self.counters.stacks_complete.fetch_add(1, Relaxed);
            }
            UnwindOutcome::Truncated(r) => {
                if let Some(i) = TruncatedReason::ALL.iter().position(|x| *x == r) {
                    self.counters.stacks_truncated[i].fetch_add(1, Relaxed);
                }
            }
        }
        let native: Vec<NativeFrame> = frames
            .iter()
            .map(|&a| match self.unwinder.normalize(pid, a) {
                Some(n) => NativeFrame {
                    module: self.modules.intern(&n.module),
                    offset: n.file_offset,
                },
                None => NativeFrame {
                    module: NativeFrame::UNMAPPED,
                    offset: a,
                },
            })
            .collect();
        self.regs_scratch = frames;
        let mut python = Vec::new();
        if matches!(self.python.get(&pid), Some(PyState::Python)) {
            self.counters.python_samples.fetch_add(1, Relaxed);
            for f in v.python_frames() {
                match self.resolver.resolve(pid, f) {
                    Ok(loc) => python.push(PythonFrame {
                        func: loc.function.0,
                        line: loc.line.unwrap_or(0),
                        entry: loc.entry,
                    }),
                    Err(_) => {
                        self.counters.python_frame_errors.fetch_add(1, Relaxed);
                    }
                }
            }
            if !python.is_empty() {
                self.counters
                    .python_samples_with_frames
                    .fetch_add(1, Relaxed);
            }
        }
        self.interner.intern(RawStack {
            kernel: v.kernel_frames().collect(),
            native: native.into(),
            python: python.into(),
            truncation: match outcome {
                UnwindOutcome::Complete => Truncation::None,
                UnwindOutcome::Truncated(r) => Truncation::Cut(r.as_str()),
            },
        })
    }

    fn agg(&mut self, kind: ProfileType) -> &mut ProfileAggregate {
        let (start, period) = (self.interval_start_ns, self.period_ns);
        let every = match kind {
            ProfileType::OffCpu => self.opts.offcpu_every as u64,
            ProfileType::Gpu => self.opts.launch_every as u64,
            ProfileType::Cpu => period,
            ProfileType::SlowTokens => 0,
        };
        self.aggs
            .entry(kind)
            .or_insert_with(|| ProfileAggregate::new(kind, start, every))
    }

    fn sample(&mut self, v: &SampleView<'_>) {
        let (pid, tid) = (v.pid(), v.tid());
        let ts = v.header.ts_ns;
        match v.kind {
            SampleKind::Cpu => {
                self.counters.cpu_samples.fetch_add(1, Relaxed);
                let stack = self.stack_of(v);
                let labels = self.labels(pid, tid, None);
                let period = self.period_ns;
                self.agg(ProfileType::Cpu).add(
                    stack.clone(),
                    labels.clone(),
                    Values {
                        count: 1,
                        nanos: period,
                    },
                );
                self.push_window(WindowEntry {
                    start_ns: ts,
                    end_ns: ts,
                    tgid: pid,
                    tid,
                    kind: EntryKind::OnCpu,
                    period_ns: period,
                    scale: 1,
                    stack,
                    labels,
                });
            }
            SampleKind::OffCpu => {
                self.counters.offcpu_samples.fetch_add(1, Relaxed);
                let stack = self.stack_of(v);
                let state = if v.has_flag(sample_flags::PREEMPTED) {
                    OffCpuState::Preempted
                } else {
                    OffCpuState::Blocked
                };
                let labels = self.labels(pid, tid, Some(state));
                // Each capture carries the rate it was sampled at.
                let scale = match v.header.aux2 {
                    0 => self.opts.offcpu_every.max(1),
                    n => n.min(u32::MAX as u64) as u32,
                };
                let accounted = ts.max(self.interval_start_ns);
                self.offcpu.switched_out(
                    tid,
                    Pending {
                        tgid: pid,
                        out_ns: ts,
                        accounted_ns: accounted,
                        state,
                        scale,
                        stack,
                        labels,
                    },
                );
            }
            SampleKind::OffCpuEnd => {
                if let Some(piece) = self.offcpu.switched_in(tid, v.header.aux, ts) {
                    self.counters.offcpu_periods.fetch_add(1, Relaxed);
                    self.account_offcpu(piece);
                } else {
                    self.counters.offcpu_unmatched.fetch_add(1, Relaxed);
                }
            }
            SampleKind::Launch => {
                self.counters.launch_samples.fetch_add(1, Relaxed);
                let stack = self.stack_of(v);
                let labels = self.labels(pid, tid, None);
                let every = self.opts.launch_every.max(1) as u64;
                self.agg(ProfileType::Gpu).add(
                    stack.clone(),
                    labels.clone(),
                    Values {
                        count: every,
                        nanos: 0,
                    },
                );
                if self.launches.len >= 100_000 && self.launches.evict_one() {
                    self.counters.launches_untimed.fetch_add(1, Relaxed);
                }
                self.launches.push(
                    pid,
                    tid,
                    PendingLaunch {
                        ts_ns: ts,
                        stack,
                        labels,
                    },
                );
            }
        }
    }

    fn push_window(&mut self, e: WindowEntry) {
        let before = self.window.evicted_full;
        self.window.push(e);
        if self.window.evicted_full > before {
            self.counters.window_evicted.fetch_add(1, Relaxed);
        }
    }

    fn account_offcpu(&mut self, p: OffCpuPiece) {
        let nanos = p.to_ns.saturating_sub(p.from_ns) * p.scale as u64;
        let count = if p.ended { p.scale as u64 } else { 0 };
        if nanos > 0 || count > 0 {
            self.agg(ProfileType::OffCpu).add(
                p.stack.clone(),
                p.labels.clone(),
                Values { count, nanos },
            );
        }
        if p.ended {
            self.push_window(WindowEntry {
                start_ns: p.out_ns,
                end_ns: p.to_ns,
                tgid: p.tgid,
                tid: p.tid,
                kind: EntryKind::OffCpu(p.state),
                period_ns: 0,
                scale: p.scale,
                stack: p.stack,
                labels: p.labels,
            });
        }
    }

    /// Joins CUPTI launch timings to the sampled launches they belong to: same process, same
    /// thread (when known), the sample taken at the call's entry: the thread's latest launch
    /// sample after its previous launch call returned (`after_ns`) and before this one did, or
    /// without that bound, one just before the API start or inside the call. Each timed sample
    /// adds its GPU time, scaled by the sampling rate.
    fn join_launches(&mut self, timings: Vec<LaunchTiming>) {
        let every = self.opts.launch_every.max(1) as u64;
        let mut adds = Vec::new();
        for t in timings {
            let lo = if t.tid != 0 && t.after_ns > 0 {
                t.after_ns + 1
            } else {
                t.api_start_ns.saturating_sub(LAUNCH_MATCH_SLACK_NS)
            };
            let hi = t.api_end_ns.max(t.api_start_ns);
            // Latest first: no launch entry on the thread comes between this call's own sample
            // and its end.
            let Some(l) = self.launches.take_latest(t.pid, t.tid, lo, hi) else {
                continue;
            };
            let labels = match &t.kernel {
                Some(k) if l.labels.kernel.as_deref() != Some(&**k) => Arc::new(SampleLabels {
                    kernel: Some(k.clone()),
                    ..(*l.labels).clone()
                }),
                _ => l.labels.clone(),
            };
            adds.push((l.stack, labels, t.gpu_ns * every));
            self.counters.launches_timed.fetch_add(1, Relaxed);
        }
        if !adds.is_empty() {
            self.timed_this_interval = true;
        }
        for (stack, labels, nanos) in adds {
            self.agg(ProfileType::Gpu)
                .add(stack, labels, Values { count: 0, nanos });
        }
    }

    /// Keeps off-CPU captures near the budget: N = max(configured N, switches/s ÷ budget),
    /// changed only when it moves by more than a quarter (each capture records its own N).
    fn adapt_offcpu_rate(&mut self) {
        let elapsed = self.last_rate_check.elapsed();
        if self.opts.offcpu_every == 0
            || self.opts.offcpu_budget == 0
            || elapsed < Duration::from_secs(1)
        {
            return;
        }
        self.last_rate_check = Instant::now();
        let switches: u64 = self
            .probes
            .offcpu_totals()
            .iter()
            .map(|(_, t)| t.switches)
            .sum();
        let delta = switches.saturating_sub(self.switches_seen);
        self.switches_seen = switches;
        let per_s = delta as f64 / elapsed.as_secs_f64();
        let want = ((per_s / self.opts.offcpu_budget as f64).ceil() as u32)
            .clamp(self.opts.offcpu_every, 1 << 20);
        let cur = self.offcpu_every_now.max(1);
        if want.abs_diff(cur) * 4 > cur && self.probes.set_offcpu_sample_every(want).is_ok() {
            debug!("off-CPU captures: 1 in {want} ({per_s:.0} switches/s)");
            self.offcpu_every_now = want;
        }
        self.counters
            .offcpu_every
            .store(self.offcpu_every_now as u64, Relaxed);
    }

    fn housekeeping(&mut self, now: u64) {
        self.adapt_offcpu_rate();
        let cutoff = now.saturating_sub(LAUNCH_TIMING_WAIT_NS);
        let expired = self.launches.expire(cutoff);
        self.counters.launches_untimed.fetch_add(expired, Relaxed);
        self.attribute_ready(now);
        self.window.expire(now);
        self.counters
            .offcpu_evicted
            .store(self.offcpu.stats.evicted, Relaxed);
    }

    /// Attributes the completed requests whose samples have all arrived.
    fn attribute_ready(&mut self, now: u64) {
        while self.requests.front().is_some_and(|r| r.ready_at_ns <= now) {
            let Some(p) = self.requests.pop_front() else {
                break;
            };
            self.attribute(&p.record);
        }
    }

    fn attribute(&mut self, r: &RequestRecord) {
        self.counters.requests_attributed.fetch_add(1, Relaxed);
        let root = self.labeller.root_of(r.pid);
        let mut roots: HashMap<u32, bool> = HashMap::new();
        let labeller = &mut self.labeller;
        let mut in_tree = |tgid: u32| {
            *roots
                .entry(tgid)
                .or_insert_with(|| labeller.root_of(tgid) == root)
        };
        let gaps = r.slow_gaps(self.opts.slow_gap_factor, self.opts.max_slow_gaps);
        let mut slow_adds: Vec<(Arc<RawStack>, Arc<SampleLabels>, Values)> = Vec::new();
        for g in &gaps.slow {
            for_each_share(&self.window, g.start_ns, g.end_ns, &mut in_tree, |e, v| {
                let state = match e.kind {
                    EntryKind::OnCpu => None,
                    EntryKind::OffCpu(s) => Some(s),
                };
                let labels = if e.labels.state == state {
                    e.labels.clone()
                } else {
                    Arc::new(SampleLabels {
                        state,
                        ..(*e.labels).clone()
                    })
                };
                slow_adds.push((e.stack.clone(), labels, v));
            });
        }
        let kept = self.opts.keep_attributions.then(|| {
            // Every stack: they are grouped by what they did once named.
            let top = usize::MAX;
            let ttft = r.first_token_ns.map(|ft| {
                let end = ft.max(r.start_ns);
                (
                    0,
                    profile_range(&self.window, r.start_ns, end, &mut in_tree, top),
                )
            });
            let gaps = gaps
                .slow
                .iter()
                .map(|g| {
                    let p = profile_range(&self.window, g.start_ns, g.end_ns, &mut in_tree, top);
                    (g.token_index, p)
                })
                .collect();
            RawAttribution {
                pid: r.pid,
                conn_id: r.conn_id,
                seq_on_conn: r.seq_on_conn,
                ttft,
                gaps,
            }
        });
        for (s, l, v) in slow_adds {
            self.agg(ProfileType::SlowTokens).add(s, l, v);
        }
        if let Some(a) = kept {
            self.attributions.push(a);
        }
    }

    fn functions_of<'a>(&self, stacks: impl Iterator<Item = &'a RawStack>) -> FunctionSnapshot {
        let mut out = FunctionSnapshot::new();
        for s in stacks {
            for p in s.python.iter() {
                if let std::collections::hash_map::Entry::Vacant(e) = out.entry(p.func) {
                    if let Some(f) = self
                        .resolver
                        .function(infertap_stacks::python::functions::FunctionId(p.func))
                    {
                        e.insert(f.clone());
                    }
                }
            }
        }
        out
    }

    fn end_interval(&mut self) {
        let now = clock::monotonic_ns();
        for piece in self.offcpu.account_open(now) {
            self.account_offcpu(piece);
        }
        self.attribute_ready(now);
        let mut aggs: Vec<ProfileAggregate> =
            std::mem::take(&mut self.aggs).into_values().collect();
        aggs.retain(|a| !a.is_empty());
        for a in &mut aggs {
            a.end_ns = now;
            if a.kind == ProfileType::Gpu {
                a.notes.push(if self.timed_this_interval {
                    "gpu/nanoseconds: GPU time of sampled launches (CUPTI), each scaled by the \
                     launch sampling rate; samples/count: launches"
                        .into()
                } else {
                    "GPU profile weighted by CUDA launch counts only (no CUPTI launch timings \
                     arrived: gpu/nanoseconds is 0); each sampled launch stands for the launches \
                     it was sampled from"
                        .into()
                });
            }
        }
        self.interval_start_ns = now;
        self.timed_this_interval = false;
        if self.opts.keep_whole {
            for a in &aggs {
                match self.whole.get_mut(&a.kind) {
                    Some(w) => w.merge(a.clone()),
                    None => {
                        self.whole.insert(a.kind, a.clone());
                    }
                }
            }
        }
        if !aggs.is_empty() {
            let functions =
                self.functions_of(aggs.iter().flat_map(|a| a.samples.keys().map(|k| &*k.0)));
            let job = BuildJob::Interval {
                aggs,
                modules: self.modules.snapshot(),
                functions,
                unix_offset_ns: clock::Clock::measure().unix_offset_ns(),
                exes: Arc::new(self.exes.clone()),
            };
            if let Err(TrySendError::Full(_)) = self.build_tx.try_send(job) {
                self.counters.build_queue_full.fetch_add(1, Relaxed);
                warn!("profile builder is behind: this interval's profiles are dropped");
            }
        }
        self.interner.clear();
        self.labels.clear();
    }

    fn finish(&mut self) -> ProfilerReport {
        // Requests that ended just now: the ring was drained after they ended.
        while let Some(p) = self.requests.pop_front() {
            self.attribute(&p.record);
        }
        self.end_interval();
        let mut report = ProfilerReport::default();
        let modules = self.modules.snapshot();
        if self.opts.keep_whole && !self.whole.is_empty() {
            let aggs: Vec<ProfileAggregate> =
                std::mem::take(&mut self.whole).into_values().collect();
            let functions =
                self.functions_of(aggs.iter().flat_map(|a| a.samples.keys().map(|k| &*k.0)));
            let (tx, rx) = mpsc::sync_channel(1);
            if self
                .build_tx
                .send(BuildJob::Whole {
                    aggs,
                    modules: modules.clone(),
                    functions,
                    unix_offset_ns: clock::Clock::measure().unix_offset_ns(),
                    exes: Arc::new(self.exes.clone()),
                    reply: tx,
                })
                .is_ok()
            {
                report.whole = rx
                    .recv_timeout(Duration::from_secs(120))
                    .unwrap_or_default();
            }
        }
        if self.opts.keep_attributions && !self.attributions.is_empty() {
            report.attributions = self.name_attributions(&modules);
        }
        // Let the builder finish what it holds (the last interval) before the caller's sinks
        // shut down.
        let (dead_tx, _) = mpsc::sync_channel(1);
        let build_tx = std::mem::replace(&mut self.build_tx, dead_tx);
        drop(build_tx);
        if let Some(b) = self.builder.take() {
            let _ = b.join();
        }
        report
    }

    fn name_attributions(
        &mut self,
        modules: &Arc<[Arc<infertap_stacks::unwind::ModuleInfo>]>,
    ) -> Vec<RequestAttribution> {
        let raws = std::mem::take(&mut self.attributions);
        let mut stacks: Vec<Arc<RawStack>> = Vec::new();
        let mut index: HashMap<*const RawStack, usize> = HashMap::new();
        for r in &raws {
            for (_, p) in r.ttft.iter().chain(r.gaps.iter()) {
                for s in &p.top {
                    index.entry(Arc::as_ptr(&s.stack)).or_insert_with(|| {
                        stacks.push(s.stack.clone());
                        stacks.len() - 1
                    });
                }
            }
        }
        let functions = self.functions_of(stacks.iter().map(|s| &**s));
        let (tx, rx) = mpsc::sync_channel(1);
        let named: Vec<Vec<Location>> = if self
            .build_tx
            .send(BuildJob::Name {
                stacks,
                modules: modules.clone(),
                functions,
                reply: tx,
            })
            .is_ok()
        {
            rx.recv_timeout(Duration::from_secs(120))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let lookup = |s: &Arc<RawStack>| {
            index
                .get(&Arc::as_ptr(s))
                .and_then(|&i| named.get(i))
                .cloned()
        };
        let max = self.opts.top_stacks;
        let convert = |token_index: usize, p: &RangeProfile| {
            let (on_cpu, off_cpu) = group_shares(p, &lookup, max);
            RangeAttribution {
                token_index,
                start_ns: p.start_ns,
                len_ns: p.end_ns.saturating_sub(p.start_ns),
                on_cpu_ns: p.on_cpu_ns,
                off_cpu_ns: p.off_cpu_ns,
                cpu_samples: p.cpu_samples,
                on_cpu,
                off_cpu,
            }
        };
        raws.iter()
            .map(|r| RequestAttribution {
                pid: r.pid,
                conn_id: r.conn_id,
                seq_on_conn: r.seq_on_conn,
                ttft: r.ttft.as_ref().map(|(i, p)| convert(*i, p)),
                slow_gaps: r.gaps.iter().map(|(i, p)| convert(*i, p)).collect(),
            })
            .collect()
    }
}

/// Scheduler-internal kernel frames, skipped when naming where a thread waited.
fn is_scheduler_frame(name: &str) -> bool {
    name.starts_with("__schedule")
        || name.starts_with("schedule")
        || name.starts_with("finish_task_switch")
        || name.starts_with("preempt_schedule")
}

/// The grouping frames of a named stack (see [`CodeShare::frames`]).
fn share_frames(locs: &[Location], on_cpu: bool) -> Vec<String> {
    use super::symbolic::FrameKind;
    let names = |l: &Location| {
        l.lines
            .iter()
            .map(|li| li.name.to_string())
            .collect::<Vec<_>>()
    };
    if on_cpu {
        return locs.iter().flat_map(names).take(2).collect();
    }
    let mut out: Vec<String> = locs
        .iter()
        .filter(|l| l.kind == FrameKind::Kernel)
        .flat_map(names)
        .find(|n| !is_scheduler_frame(n))
        .into_iter()
        .collect();
    out.extend(
        locs.iter()
            .filter(|l| l.kind != FrameKind::Kernel)
            .flat_map(names)
            .take(2),
    );
    out
}

fn python_frame_of(locs: &[Location]) -> Option<String> {
    locs.iter()
        .find(|l| l.kind == super::symbolic::FrameKind::Python)
        .and_then(|l| l.lines.first())
        .map(|li| {
            let file = li.file.as_deref().map_or("?", short_python_path);
            format!("{} ({file}:{})", li.name, li.line)
        })
}

/// A Python source path as a module path: what follows `site-packages/`, `dist-packages/` or
/// the standard library's `lib/pythonX.Y/` (`llama_cpp/llama.py`, `asyncio/events.py`), else
/// the path itself.
pub fn short_python_path(p: &str) -> &str {
    for marker in ["/site-packages/", "/dist-packages/"] {
        if let Some(i) = p.rfind(marker) {
            return &p[i + marker.len()..];
        }
    }
    if let Some(i) = p.rfind("/lib/python") {
        let rest = &p[i + "/lib/python".len()..];
        if let Some(j) = rest.find('/') {
            return &rest[j + 1..];
        }
    }
    p
}

/// Groups a range's stacks into on-CPU and off-CPU code shares, largest first, `max` of each.
fn group_shares(
    p: &RangeProfile,
    named: &dyn Fn(&Arc<RawStack>) -> Option<Vec<Location>>,
    max: usize,
) -> (Vec<CodeShare>, Vec<CodeShare>) {
    type Key = (
        Vec<String>,
        Option<String>,
        Arc<str>,
        Arc<str>,
        Option<OffCpuState>,
    );
    let mut groups: HashMap<Key, (u64, u64, String)> = HashMap::new();
    for s in &p.top {
        let Some(locs) = named(&s.stack) else {
            continue;
        };
        for (ns, on) in [(s.on_cpu_ns, true), (s.off_cpu_ns, false)] {
            if ns == 0 {
                continue;
            }
            let state = if on {
                None
            } else {
                s.labels.state.or(Some(OffCpuState::Blocked))
            };
            let key = (
                share_frames(&locs, on),
                python_frame_of(&locs),
                s.labels.process.clone(),
                s.labels.thread.clone(),
                state,
            );
            let g = groups.entry(key).or_insert((0, 0, String::new()));
            g.0 += ns;
            if ns > g.1 {
                g.1 = ns;
                g.2 = super::symbolic::folded(&locs, 64);
            }
        }
    }
    let mut on = Vec::new();
    let mut off = Vec::new();
    for ((frames, python, process, thread, state), (nanos, _, example)) in groups {
        let share = CodeShare {
            frames,
            python,
            process,
            thread,
            nanos,
            state,
            example,
        };
        if state.is_none() {
            on.push(share);
        } else {
            off.push(share);
        }
    }
    for v in [&mut on, &mut off] {
        v.sort_by(|a, b| b.nanos.cmp(&a.nanos).then_with(|| a.frames.cmp(&b.frames)));
        v.truncate(max);
    }
    (on, off)
}

#[cfg(test)]
mod tests {
    fn launch(ts: u64) -> super::PendingLaunch {
        use super::super::stack::{RawStack, Truncation};
        super::PendingLaunch {
            ts_ns: ts,
            stack: std::sync::Arc::new(RawStack {
                kernel: Box::new([]),
                native: Box::new([]),
                python: Box::new([]),
                truncation: Truncation::None,
            }),
            labels: std::sync::Arc::new(super::SampleLabels {
                pid: 1,
                process: "p".into(),
                thread: "t".into(),
                model: None,
                state: None,
                kernel: None,
            }),
        }
    }

    #[test]
    fn pending_launches_match_the_latest_sample_of_the_thread_in_the_window() {
        let mut p = super::PendingLaunches::default();
        for ts in [10, 20, 30] {
            p.push(1, 7, launch(ts));
        }
        p.push(1, 8, launch(25));
        p.push(2, 7, launch(26));
        assert_eq!(p.take_latest(1, 7, 15, 28).map(|l| l.ts_ns), Some(20));
        assert!(
            p.take_latest(1, 7, 21, 28).is_none(),
            "nothing left in the window"
        );
        // Any thread of the process when the tid is unknown: the latest in the window.
        assert_eq!(p.take_latest(1, 0, 0, 40).map(|l| l.ts_ns), Some(30));
        assert_eq!(p.take_latest(1, 0, 0, 40).map(|l| l.ts_ns), Some(25));
        assert_eq!(p.len, 2);
        assert_eq!(p.expire(15), 1);
        p.forget_process(2);
        assert_eq!(p.len, 0);
        assert!(p.by_thread.is_empty());
    }

    #[test]
    fn python_paths_are_shortened_to_module_paths() {
        use super::short_python_path as s;
        assert_eq!(
            s("/root/.cache/infertap/venv/lib/python3.11/site-packages/llama_cpp/llama.py"),
            "llama_cpp/llama.py"
        );
        assert_eq!(s("/usr/lib/python3/dist-packages/vllm/a.py"), "vllm/a.py");
        assert_eq!(
            s("/root/.pyenv/versions/3.11.7/lib/python3.11/asyncio/events.py"),
            "asyncio/events.py"
        );
        assert_eq!(s("<frozen runpy>"), "<frozen runpy>");
    }
}
