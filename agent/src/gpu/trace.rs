//! Chrome trace event JSON (the "JSON Object Format"), which loads in Perfetto
//! (ui.perfetto.dev) and chrome://tracing.
//!
//! Layout:
//! * process **requests**: one track per connection (requests on a connection follow each
//!   other); per request a span (method + path), a `TTFT` span, an instant per content event and
//!   a `slow gap` span per explained slow gap, with the causes in its args;
//! * the real server/engine processes: per-thread CUDA API call spans (real pid/tid);
//! * process **GPU n** per device: a track per CUDA stream with kernel / copy / memset / graph
//!   spans, a `host sync (CUPTI)` track, and counter tracks for power (W) and utilisation (%).
//!
//! Timestamps: all sources are CLOCK_MONOTONIC ns. `ts` is microseconds (fractional, ns
//! resolution) since `otherData.ts_origin_monotonic_ns`, the earliest event; the same instant in
//! Unix time is `otherData.ts_origin_unix_ns`, so `unix_ns = origin_unix_ns + ts × 1000`.
//!
//! Perfetto's JSON importer reads `pid`/`tid` as 32-bit and identifies a thread by its `tid`
//! alone (a tid seen under another pid starts a new thread), so synthetic processes and tracks
//! get ids above the kernel's largest possible pid/tid (2^22), every synthetic tid is unique in
//! the file, and process-level events use `tid == pid`. Spans that would partially overlap on
//! one track (Perfetto requires spans on a track to nest) are moved to an extra "(overlap n)"
//! track of the same process.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::correlate::{CorrelatedRequest, RequestGpuStats};
use super::timeline::{CudaApiCall, GpuActivity, GpuActivityKind, PowerSample};
use crate::record::RequestRecord;
use crate::sinks::explain::contributor_label;

/// Linux `PID_MAX_LIMIT` (2^22): real pids are below it.
const SYNTHETIC_PID_BASE: u64 = 1 << 22;
/// The "requests" process.
pub const REQUESTS_PID: u64 = SYNTHETIC_PID_BASE + 1;
/// "GPU n" is `GPU_PID_BASE + n`, for `n < MAX_GPUS`.
pub const GPU_PID_BASE: u64 = SYNTHETIC_PID_BASE + 16;
const MAX_GPUS: u32 = 4096;
/// Activities whose device is not known (`device >= MAX_GPUS`, e.g. `u32::MAX`).
pub const UNKNOWN_GPU_PID: u64 = SYNTHETIC_PID_BASE + 2;
/// Synthetic tids (tracks of the synthetic processes, overlap tracks) count up from here.
const SYNTHETIC_TID_BASE: u64 = 1 << 23;

/// What a synthetic tid stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum TrackKey {
    /// A connection of a server process, in the "requests" process.
    Conn { pid: u32, conn_id: u64 },
    /// A CUDA stream of a device.
    Stream { device: u32, stream: u32 },
    /// CUPTI host-synchronisation records of a device.
    HostSync { device: u32 },
    /// Extra track for spans partially overlapping others on track `(pid, tid)`.
    Overlap { pid: u64, tid: u64, lane: usize },
}

#[derive(Clone, Debug, Default)]
struct Tracks {
    ids: HashMap<TrackKey, u64>,
}

impl Tracks {
    fn tid(&mut self, key: TrackKey) -> u64 {
        let next = SYNTHETIC_TID_BASE + self.ids.len() as u64;
        *self.ids.entry(key).or_insert(next)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Complete,
    Instant,
    Counter,
}

#[derive(Clone, Debug)]
struct Event {
    ph: Phase,
    name: String,
    cat: &'static str,
    pid: u64,
    tid: u64,
    ts_ns: u64,
    dur_ns: u64,
    args: Map<String, Value>,
}

/// Accumulates trace events and writes one trace file.
#[derive(Debug)]
pub struct TraceWriter {
    unix_offset_ns: i64,
    events: Vec<Event>,
    process_names: BTreeMap<u64, String>,
    thread_names: BTreeMap<(u64, u64), String>,
    tracks: Tracks,
    max_events: usize,
    dropped: u64,
}

impl TraceWriter {
    /// `unix_offset_ns`: Unix-epoch ns minus CLOCK_MONOTONIC ns (see [`crate::clock`]).
    pub fn new(unix_offset_ns: i64) -> Self {
        Self::with_capacity_limit(unix_offset_ns, 5_000_000)
    }

    /// As [`TraceWriter::new`], keeping at most `max_events` events (later ones are counted in
    /// `otherData.dropped_events`).
    pub fn with_capacity_limit(unix_offset_ns: i64, max_events: usize) -> Self {
        TraceWriter {
            unix_offset_ns,
            events: Vec::new(),
            process_names: BTreeMap::new(),
            thread_names: BTreeMap::new(),
            tracks: Tracks::default(),
            max_events,
            dropped: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Names a real process (e.g. its `comm`), shown instead of "Process <pid>".
    pub fn set_process_name(&mut self, pid: u32, name: &str) {
        self.process_names
            .insert(pid as u64, format!("{name} ({pid})"));
    }

    /// Names a real thread.
    pub fn set_thread_name(&mut self, pid: u32, tid: u32, name: &str) {
        self.thread_names
            .insert((pid as u64, tid as u64), name.to_owned());
    }

    fn push(&mut self, ev: Event) {
        if self.events.len() >= self.max_events {
            self.dropped += 1;
        } else {
            self.events.push(ev);
        }
    }

    fn span(&mut self, name: String, cat: &'static str, pid: u64, tid: u64, start: u64, end: u64) {
        self.span_args(name, cat, pid, tid, start, end, Map::new());
    }

    #[allow(clippy::too_many_arguments)]
    fn span_args(
        &mut self,
        name: String,
        cat: &'static str,
        pid: u64,
        tid: u64,
        start: u64,
        end: u64,
        args: Map<String, Value>,
    ) {
        self.push(Event {
            ph: Phase::Complete,
            name,
            cat,
            pid,
            tid,
            ts_ns: start,
            dur_ns: end.saturating_sub(start),
            args,
        });
    }

    fn conn_track(&mut self, pid: u32, conn_id: u64) -> u64 {
        let tid = self.tracks.tid(TrackKey::Conn { pid, conn_id });
        self.thread_names
            .entry((REQUESTS_PID, tid))
            .or_insert_with(|| format!("conn {conn_id} (pid {pid})"));
        tid
    }

    /// Adds a request and, when given, its GPU side (slow gaps with their causes).
    pub fn add_request(&mut self, rec: &RequestRecord, gpu: Option<&RequestGpuStats>) {
        self.process_names
            .entry(REQUESTS_PID)
            .or_insert_with(|| "requests".to_owned());
        let tid = self.conn_track(rec.pid, rec.conn_id);
        let (s, e) = (rec.start_ns, rec.end_ns.max(rec.start_ns));
        let clamp = |t: u64| t.clamp(s, e);

        let mut args = Map::new();
        args.insert("seq_on_conn".into(), json!(rec.seq_on_conn));
        args.insert("status".into(), json!(rec.status));
        args.insert("model".into(), json!(rec.model));
        args.insert("stream".into(), json!(rec.stream));
        args.insert("output_tokens".into(), json!(rec.output_tokens));
        args.insert("prompt_tokens".into(), json!(rec.prompt_tokens));
        args.insert("e2e_ms".into(), json!(rec.e2e_ns() as f64 / 1e6));
        args.insert(
            "ttft_ms".into(),
            json!(rec.ttft_ns().map(|t| t as f64 / 1e6)),
        );
        args.insert("error".into(), json!(rec.error.map(|e| e.as_str())));
        if let Some(g) = gpu {
            args.insert("gpu_busy_ms".into(), json!(g.gpu_busy_ms));
            args.insert("kernel_count".into(), json!(g.kernel_count));
            args.insert("memcpy_bytes".into(), json!(g.memcpy_bytes));
            args.insert("energy_j".into(), json!(g.energy_j));
            args.insert("energy_j_per_token".into(), json!(g.energy_j_per_token));
            args.insert("mean_concurrency".into(), json!(g.mean_concurrency));
        }
        let name = format!("{} {}", rec.method, rec.path);
        self.span_args(name, "request", REQUESTS_PID, tid, s, e, args);
        if let Some(ft) = rec.first_token_ns {
            self.span("TTFT".into(), "request", REQUESTS_PID, tid, s, clamp(ft));
        }
        for (i, &t) in rec.token_ns.iter().enumerate() {
            let mut args = Map::new();
            args.insert("index".into(), json!(i));
            if let Some(n) = rec.tokens_per_event.get(i) {
                args.insert("tokens".into(), json!(n));
            }
            self.push(Event {
                ph: Phase::Instant,
                name: "token".into(),
                cat: "token",
                pid: REQUESTS_PID,
                tid,
                ts_ns: clamp(t),
                dur_ns: 0,
                args,
            });
        }
        for g in gpu.map(|g| g.slow_tokens.as_slice()).unwrap_or_default() {
            let mut args = Map::new();
            args.insert("token_index".into(), json!(g.token_index));
            args.insert("gpu_busy_ms".into(), json!(g.gpu_busy_ns as f64 / 1e6));
            args.insert("sync_wait_ms".into(), json!(g.sync_wait_ns as f64 / 1e6));
            args.insert("launch_ms".into(), json!(g.launch_ns as f64 / 1e6));
            args.insert("idle_ms".into(), json!(g.idle_ns as f64 / 1e6));
            let top: Vec<String> = g.top.iter().map(contributor_label).collect();
            args.insert("top".into(), json!(top));
            let (a, b) = (clamp(g.start_ns), clamp(g.start_ns + g.gap_ns));
            self.span_args("slow gap".into(), "slow_gap", REQUESTS_PID, tid, a, b, args);
        }
    }

    pub fn add_correlated(&mut self, r: &CorrelatedRequest) {
        self.add_request(&r.record, Some(&r.gpu));
    }

    fn gpu_process(&mut self, device: u32) -> u64 {
        // CUPTI sync records of an unseen context carry device u32::MAX.
        let (pid, name) = if device < MAX_GPUS {
            (GPU_PID_BASE + device as u64, format!("GPU {device}"))
        } else {
            (UNKNOWN_GPU_PID, "GPU (unknown device)".to_owned())
        };
        self.process_names.entry(pid).or_insert(name);
        pid
    }

    /// Adds a CUPTI activity record: kernels/copies/memsets/graphs on their stream's track.
    pub fn add_activity(&mut self, a: &GpuActivity) {
        let pid = self.gpu_process(a.device);
        let mut args = Map::new();
        args.insert("pid".into(), json!(a.pid));
        args.insert("context".into(), json!(a.context));
        args.insert("correlation_id".into(), json!(a.correlation_id));
        let (name, cat) = match a.kind {
            GpuActivityKind::Kernel {
                grid,
                block,
                shared_mem_bytes,
                registers_per_thread,
            } => {
                args.insert("grid".into(), json!(grid));
                args.insert("block".into(), json!(block));
                args.insert("shared_mem_bytes".into(), json!(shared_mem_bytes));
                args.insert("registers_per_thread".into(), json!(registers_per_thread));
                let name = a.name.as_deref().unwrap_or("kernel").to_owned();
                (name, "kernel")
            }
            GpuActivityKind::Memcpy { kind, bytes } => {
                args.insert("bytes".into(), json!(bytes));
                (format!("memcpy {}", kind.as_str()), "memcpy")
            }
            GpuActivityKind::Memset { bytes } => {
                args.insert("bytes".into(), json!(bytes));
                ("memset".to_owned(), "memset")
            }
            GpuActivityKind::Graph { graph_id } => {
                args.insert("graph_id".into(), json!(graph_id));
                (format!("graph {graph_id}"), "graph")
            }
            GpuActivityKind::Sync { kind } => (format!("sync {}", kind.as_str()), "sync"),
        };
        let (key, thread_name) = match a.kind {
            GpuActivityKind::Sync { .. } => (
                TrackKey::HostSync { device: a.device },
                "host sync (CUPTI)".to_owned(),
            ),
            _ => (
                TrackKey::Stream {
                    device: a.device,
                    stream: a.stream,
                },
                format!("stream {}", a.stream),
            ),
        };
        let tid = self.tracks.tid(key);
        self.thread_names
            .entry((pid, tid))
            .or_insert_with(|| thread_name);
        self.span_args(name, cat, pid, tid, a.start_ns, a.end_ns, args);
    }

    /// Adds a host CUDA API call on its real thread; entry-only calls become instants.
    pub fn add_api_call(&mut self, c: &CudaApiCall) {
        let (pid, tid) = (c.pid as u64, c.tid as u64);
        let mut args = Map::new();
        if let Some(b) = c.bytes {
            args.insert("bytes".into(), json!(b));
        }
        let name = c.func.symbol.to_owned();
        match c.end_ns {
            Some(end) => self.span_args(name, "cuda_api", pid, tid, c.start_ns, end, args),
            None => self.push(Event {
                ph: Phase::Instant,
                name,
                cat: "cuda_api",
                pid,
                tid,
                ts_ns: c.start_ns,
                dur_ns: 0,
                args,
            }),
        }
    }

    /// Adds an NVML sample as counter values (power in W, utilisation in %).
    pub fn add_power_sample(&mut self, s: &PowerSample) {
        let pid = self.gpu_process(s.device);
        let counters = [
            ("power", "W", s.power_mw.map(|p| p as f64 / 1e3)),
            ("gpu util", "%", s.gpu_util_pct.map(f64::from)),
            ("mem util", "%", s.mem_util_pct.map(f64::from)),
        ];
        for (name, unit, v) in counters {
            if let Some(v) = v {
                let mut args = Map::new();
                args.insert(unit.into(), json!(v));
                self.push(Event {
                    ph: Phase::Counter,
                    name: name.into(),
                    cat: "nvml",
                    pid,
                    // Process-level: Perfetto keys threads by tid alone.
                    tid: pid,
                    ts_ns: s.ts_ns,
                    dur_ns: 0,
                    args,
                });
            }
        }
    }

    /// Writes the trace as JSON, event by event (no document tree is built in memory).
    pub fn write<W: Write>(&self, mut w: W) -> std::io::Result<()> {
        let mut thread_names = self.thread_names.clone();
        let mut tracks = self.tracks.clone();
        let tids = assign_overlap_lanes(&self.events, &mut thread_names, &mut tracks);
        // Time order; at equal start, longer spans first so parents precede their children.
        let mut order: Vec<usize> = (0..self.events.len()).collect();
        order.sort_by_key(|&i| {
            let e = &self.events[i];
            (e.ts_ns, std::cmp::Reverse(e.dur_ns), e.ph, i)
        });
        let origin = self.events.iter().map(|e| e.ts_ns).min().unwrap_or(0);
        let us = |ns: u64| ns as f64 / 1e3;

        let mut first = true;
        w.write_all(b"{\"traceEvents\":[")?;
        for (pid, name) in &self.process_names {
            let v = json!({"ph": "M", "name": "process_name", "pid": pid, "tid": pid, "ts": 0,
                "args": {"name": name}});
            emit(&mut w, &mut first, &v)?;
        }
        for ((pid, tid), name) in &thread_names {
            let v = json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "ts": 0,
                "args": {"name": name}});
            emit(&mut w, &mut first, &v)?;
        }
        for i in order {
            let e = &self.events[i];
            let (ph, dur, scope) = match e.ph {
                Phase::Complete => ("X", Some(us(e.dur_ns)), None),
                Phase::Instant => ("i", None, Some("t")),
                Phase::Counter => ("C", None, None),
            };
            let v = OutEvent {
                ph,
                name: &e.name,
                cat: e.cat,
                pid: e.pid,
                tid: tids[i],
                ts: us(e.ts_ns - origin),
                dur,
                s: scope,
                args: &e.args,
            };
            emit(&mut w, &mut first, &v)?;
        }
        let origin_unix = origin as i128 + self.unix_offset_ns as i128;
        let other = json!({
            "generator": "infertap",
            "clock": "CLOCK_MONOTONIC",
            "ts_unit": "us",
            "ts_origin_monotonic_ns": origin,
            "ts_origin_unix_ns": origin_unix.to_string(),
            "dropped_events": self.dropped,
        });
        w.write_all(b"],\"displayTimeUnit\":\"ns\",\"otherData\":")?;
        serde_json::to_writer(&mut w, &other)?;
        w.write_all(b"}")
    }

    /// The whole trace as a JSON value (for tests and small traces; [`TraceWriter::write`]
    /// streams).
    pub fn to_json(&self) -> std::io::Result<Value> {
        let mut buf = Vec::new();
        self.write(&mut buf)?;
        Ok(serde_json::from_slice(&buf)?)
    }

    pub fn write_file(&self, path: &Path) -> std::io::Result<()> {
        let f = std::fs::File::create(path)?;
        let mut w = std::io::BufWriter::new(f);
        self.write(&mut w)?;
        w.flush()
    }
}

/// One timed event as written.
#[derive(serde::Serialize)]
struct OutEvent<'a> {
    ph: &'static str,
    name: &'a str,
    cat: &'static str,
    pid: u64,
    tid: u64,
    ts: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    dur: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    s: Option<&'static str>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    args: &'a Map<String, Value>,
}

/// Writes one array element, with its separator.
fn emit<W: Write, T: serde::Serialize>(w: &mut W, first: &mut bool, v: &T) -> std::io::Result<()> {
    if !*first {
        w.write_all(b",")?;
    }
    *first = false;
    Ok(serde_json::to_writer(w, v)?)
}

/// The tid of every event: its own, or an extra track's where it would partially overlap an
/// earlier span on its track.
fn assign_overlap_lanes(
    events: &[Event],
    names: &mut BTreeMap<(u64, u64), String>,
    tracks: &mut Tracks,
) -> Vec<u64> {
    let mut tids: Vec<u64> = events.iter().map(|e| e.tid).collect();
    let mut by_track: BTreeMap<(u64, u64), Vec<usize>> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        if e.ph == Phase::Complete {
            by_track.entry((e.pid, e.tid)).or_default().push(i);
        }
    }
    for ((pid, tid), mut idx) in by_track {
        idx.sort_by_key(|&i| (events[i].ts_ns, std::cmp::Reverse(events[i].dur_ns), i));
        // Per lane, the ends of the spans still open (a nesting stack).
        let mut lanes: Vec<Vec<u64>> = Vec::new();
        for i in idx {
            let (s, e) = (events[i].ts_ns, events[i].ts_ns + events[i].dur_ns);
            let lane = lanes.iter_mut().position(|stack| {
                while stack.last().is_some_and(|&end| end <= s) {
                    stack.pop();
                }
                stack.last().is_none_or(|&end| e <= end)
            });
            let lane = lane.unwrap_or_else(|| {
                lanes.push(Vec::new());
                lanes.len() - 1
            });
            lanes[lane].push(e);
            if lane > 0 {
                let new_tid = tracks.tid(TrackKey::Overlap { pid, tid, lane });
                tids[i] = new_tid;
                if !names.contains_key(&(pid, new_tid)) {
                    let base = names
                        .get(&(pid, tid))
                        .cloned()
                        .unwrap_or_else(|| format!("thread {tid}"));
                    names.insert((pid, new_tid), format!("{base} (overlap {lane})"));
                }
            }
        }
    }
    tids
}

/// What [`validate_trace`] found in a valid trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceSummary {
    pub events: usize,
    pub complete: usize,
    pub instants: usize,
    pub counters: usize,
    pub metadata: usize,
    /// Distinct (pid, tid) tracks with timed events.
    pub tracks: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Format(String),
    #[error("event {index}: {reason}")]
    Event { index: usize, reason: String },
}

/// Checks a Chrome trace JSON document: an object with `traceEvents` and `otherData.clock` (one
/// clock for every event); per event `ph`, `name`, `pid`/`tid` integers that fit 32 bits (as
/// Perfetto reads them), each tid under a single pid (Perfetto identifies threads by tid),
/// finite `ts ≥ 0`; `dur ≥ 0` on `X`; `B`/`E` balanced per track; timestamps non-decreasing per
/// track (counters: per pid + name); `X` spans on a track nested, never partially overlapping.
pub fn validate_trace(text: &str) -> Result<TraceSummary, TraceError> {
    let doc: Value = serde_json::from_str(text)?;
    let events = doc
        .get("traceEvents")
        .and_then(Value::as_array)
        .ok_or_else(|| TraceError::Format("no traceEvents array".into()))?;
    doc.pointer("/otherData/clock")
        .and_then(Value::as_str)
        .ok_or_else(|| TraceError::Format("otherData.clock missing: unknown clock".into()))?;
    // ns tolerance when comparing span ends computed from fractional µs.
    const EPS_US: f64 = 1e-3;
    let mut sum = TraceSummary {
        events: events.len(),
        ..TraceSummary::default()
    };
    let mut last_ts: HashMap<(u64, u64, Option<&str>), f64> = HashMap::new();
    let mut open_b: HashMap<(u64, u64), Vec<&str>> = HashMap::new();
    let mut open_x: HashMap<(u64, u64), Vec<f64>> = HashMap::new();
    let mut tid_pid: HashMap<u64, u64> = HashMap::new();
    for (index, ev) in events.iter().enumerate() {
        let bad = |reason: String| TraceError::Event { index, reason };
        let ph = ev
            .get("ph")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing ph".into()))?;
        let name = ev
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing name".into()))?;
        let pid = ev
            .get("pid")
            .and_then(Value::as_u64)
            .filter(|&p| p <= u32::MAX as u64)
            .ok_or_else(|| bad("pid missing or not a 32-bit unsigned integer".into()))?;
        let tid = ev
            .get("tid")
            .and_then(Value::as_u64)
            .filter(|&t| t <= u32::MAX as u64)
            .ok_or_else(|| bad("tid missing or not a 32-bit unsigned integer".into()))?;
        if let Some(&other) = tid_pid.get(&tid) {
            if other != pid {
                return Err(bad(format!("tid {tid} used under pids {other} and {pid}")));
            }
        }
        tid_pid.insert(tid, pid);
        let ts = ev
            .get("ts")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("missing ts".into()))?;
        if !ts.is_finite() || ts < 0.0 {
            return Err(bad(format!("ts {ts} not a finite non-negative number")));
        }
        if ph == "M" {
            sum.metadata += 1;
            continue;
        }
        let track = (pid, tid);
        let order_key = (
            pid,
            if ph == "C" { 0 } else { tid },
            (ph == "C").then_some(name),
        );
        if let Some(&prev) = last_ts.get(&order_key) {
            if ts < prev {
                return Err(bad(format!("ts {ts} goes back from {prev} on its track")));
            }
        }
        last_ts.insert(order_key, ts);
        match ph {
            "X" => {
                let dur = ev
                    .get("dur")
                    .and_then(Value::as_f64)
                    .filter(|d| d.is_finite() && *d >= 0.0)
                    .ok_or_else(|| bad("X without a finite dur >= 0".into()))?;
                let stack = open_x.entry(track).or_default();
                while stack.last().is_some_and(|&end| end <= ts + EPS_US) {
                    stack.pop();
                }
                if let Some(&end) = stack.last() {
                    if ts + dur > end + EPS_US {
                        return Err(bad(format!(
                            "span {name} [{ts}, {}] partially overlaps one ending at {end}",
                            ts + dur
                        )));
                    }
                }
                stack.push(ts + dur);
                sum.complete += 1;
            }
            "B" => open_b.entry(track).or_default().push(name),
            "E" => {
                if open_b.entry(track).or_default().pop().is_none() {
                    return Err(bad("E without B".into()));
                }
            }
            "i" | "I" => sum.instants += 1,
            "C" => {
                if !ev.get("args").is_some_and(Value::is_object) {
                    return Err(bad("counter without args".into()));
                }
                sum.counters += 1;
            }
            other => return Err(bad(format!("unsupported ph {other:?}"))),
        }
    }
    if let Some((track, open)) = open_b.iter().find(|(_, v)| !v.is_empty()) {
        return Err(TraceError::Format(format!(
            "{} unterminated B event(s) on track {track:?}",
            open.len()
        )));
    }
    sum.tracks = last_ts.keys().filter(|k| k.2.is_none()).count();
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::correlate::tests::{call, gap_scenario, kernel, power, two_requests, MS};
    use crate::gpu::correlate::{Correlator, CorrelatorConfig};
    use crate::gpu::timeline::cuda_func;

    const OFFSET: i64 = 1_700_000_000_000_000_000;

    fn events(doc: &Value) -> &Vec<Value> {
        doc["traceEvents"].as_array().unwrap()
    }

    fn find<'a>(doc: &'a Value, name: &str) -> Vec<&'a Value> {
        events(doc).iter().filter(|e| e["name"] == name).collect()
    }

    #[test]
    fn full_timeline_exports_a_valid_trace() {
        let mut c = Correlator::new(CorrelatorConfig::default());
        let (a, b) = two_requests(&mut c);
        gap_scenario(&mut c);
        c.request_finished(a);
        c.request_finished(b);
        let done = c.flush();
        assert_eq!(done.len(), 4);

        let mut w = TraceWriter::new(OFFSET);
        for r in &done {
            w.add_correlated(r);
        }
        for k in [
            kernel("gemm", 1, 10 * MS, 30 * MS),
            kernel("attn", 2, 20 * MS, 40 * MS),
            kernel("decode", 1, 120 * MS, 125 * MS),
        ] {
            w.add_activity(&k);
        }
        w.add_api_call(&call(
            cuda_func("cudaStreamSynchronize").unwrap(),
            150 * MS,
            Some(158 * MS),
        ));
        w.add_api_call(&call(cuda_func("cuLaunchKernel").unwrap(), 158 * MS, None));
        let mut sync = kernel("", 0, 150 * MS, 157 * MS);
        sync.kind = GpuActivityKind::Sync {
            kind: crate::gpu::timeline::SyncKind::Stream,
        };
        sync.device = u32::MAX;
        w.add_activity(&sync);
        w.set_process_name(200, "python");
        // Out of order on purpose: the writer sorts.
        w.add_power_sample(&power(50 * MS, Some(150_000), None));
        w.add_power_sample(&power(0, Some(100_000), None));

        let mut buf = Vec::new();
        w.write(&mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let sum = validate_trace(&text).unwrap();
        // 4 requests: span + TTFT each (+ 1 slow gap of A in the gap scenario); 3 kernels;
        // 1 sync call; 1 CUPTI sync record.
        assert_eq!(sum.complete, 4 * 2 + 1 + 3 + 1 + 1);
        // Tokens: 3 + 2 + 5 + 2, plus the entry-only launch.
        assert_eq!(sum.instants, 12 + 1);
        assert_eq!(sum.counters, 2);

        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["otherData"]["clock"], "CLOCK_MONOTONIC");
        assert_eq!(doc["otherData"]["ts_origin_monotonic_ns"], 0);
        assert_eq!(doc["otherData"]["ts_origin_unix_ns"], OFFSET.to_string());
        let attn = find(&doc, "attn");
        assert_eq!(attn[0]["ts"], 20_000.0);
        assert_eq!(attn[0]["dur"], 20_000.0);
        assert_eq!(attn[0]["pid"], GPU_PID_BASE);
        let attn_tid = attn[0]["tid"].as_u64().unwrap();
        assert!(attn_tid >= SYNTHETIC_TID_BASE && attn_tid <= u32::MAX as u64);
        // A different stream of the same GPU is a different track.
        assert_ne!(find(&doc, "gemm")[0]["tid"], attn_tid);
        assert_eq!(find(&doc, "gemm")[0]["tid"], find(&doc, "decode")[0]["tid"]);
        // The API calls keep the real pid/tid.
        let sync = find(&doc, "cudaStreamSynchronize");
        assert_eq!(
            (sync[0]["pid"].as_u64(), sync[0]["tid"].as_u64()),
            (Some(200), Some(201))
        );
        let power_w: Vec<f64> = find(&doc, "power")
            .iter()
            .map(|e| e["args"]["W"].as_f64().unwrap())
            .collect();
        assert_eq!(power_w, vec![100.0, 150.0]);
        let names: Vec<&str> = find(&doc, "process_name")
            .iter()
            .map(|e| e["args"]["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"requests") && names.contains(&"GPU 0"));
        assert!(names.contains(&"python (200)"));
        assert!(names.contains(&"GPU (unknown device)"));
        assert_eq!(find(&doc, "sync stream")[0]["pid"], UNKNOWN_GPU_PID);
        let gap = find(&doc, "slow gap");
        assert_eq!(gap.len(), 1);
        assert_eq!(gap[0]["ts"], 120_000.0);
        assert_eq!(gap[0]["dur"], 50_000.0);
        assert_eq!(gap[0]["args"]["sync_wait_ms"], 8.0);
        assert!(gap[0]["args"]["top"][0]
            .as_str()
            .unwrap()
            .starts_with("prefill of request conn 2#0"));
        // The request span carries the correlation results.
        let spans = find(&doc, "POST /v1/chat/completions");
        assert_eq!(spans.len(), 4);
        assert!(spans.iter().all(|s| s["args"]["gpu_busy_ms"].is_number()));
    }

    #[test]
    fn partially_overlapping_spans_get_their_own_track() {
        let mut w = TraceWriter::new(0);
        w.add_activity(&kernel("a", 7, 1_000, 5_000));
        w.add_activity(&kernel("b", 7, 3_000, 8_000));
        w.add_activity(&kernel("c", 7, 3_500, 4_000));
        let doc = w.to_json().unwrap();
        let text = doc.to_string();
        validate_trace(&text).unwrap();
        let tid = find(&doc, "a")[0]["tid"].clone();
        assert_eq!(find(&doc, "c")[0]["tid"], tid, "nested span stays");
        assert_ne!(find(&doc, "b")[0]["tid"], tid);
        let threads: Vec<&str> = find(&doc, "thread_name")
            .iter()
            .map(|e| e["args"]["name"].as_str().unwrap())
            .collect();
        assert!(threads.contains(&"stream 7 (overlap 1)"), "{threads:?}");
    }

    #[test]
    fn cap_counts_dropped_events() {
        let mut w = TraceWriter::with_capacity_limit(0, 2);
        for i in 0..5 {
            w.add_activity(&kernel("k", 1, i * 10, i * 10 + 5));
        }
        assert_eq!((w.len(), w.dropped()), (2, 3));
        assert_eq!(w.to_json().unwrap()["otherData"]["dropped_events"], 3);
    }

    #[test]
    fn write_file_round_trips() {
        let mut w = TraceWriter::new(0);
        w.add_activity(&kernel("k", 1, 10, 20));
        let path = std::env::temp_dir().join(format!("infertap-trace-{}.json", std::process::id()));
        w.write_file(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(validate_trace(&text).unwrap().complete, 1);
    }

    #[test]
    fn validator_rejects_broken_traces() {
        let wrap = |evs: &str| {
            format!(r#"{{"traceEvents":[{evs}],"otherData":{{"clock":"CLOCK_MONOTONIC"}}}}"#)
        };
        let bad = [
            "not json".to_owned(),
            r#"{"traceEvents":[]}"#.to_owned(),
            wrap(r#"{"ph":"X","pid":1,"tid":1,"ts":0,"dur":1}"#),
            wrap(r#"{"ph":"X","name":"a","pid":1,"ts":0,"dur":1}"#),
            wrap(r#"{"ph":"X","name":"a","pid":1,"tid":1,"ts":-1,"dur":1}"#),
            wrap(r#"{"ph":"X","name":"a","pid":1,"tid":1,"ts":0}"#),
            wrap(
                r#"{"ph":"i","name":"a","pid":1,"tid":1,"ts":5},{"ph":"i","name":"b","pid":1,"tid":1,"ts":4}"#,
            ),
            wrap(
                r#"{"ph":"X","name":"a","pid":1,"tid":1,"ts":0,"dur":5},{"ph":"X","name":"b","pid":1,"tid":1,"ts":3,"dur":5}"#,
            ),
            wrap(r#"{"ph":"B","name":"a","pid":1,"tid":1,"ts":0}"#),
            wrap(r#"{"ph":"E","name":"a","pid":1,"tid":1,"ts":0}"#),
            wrap(r#"{"ph":"C","name":"a","pid":1,"tid":1,"ts":0}"#),
            wrap(r#"{"ph":"i","name":"a","pid":1,"tid":4294967296,"ts":0}"#),
            wrap(
                r#"{"ph":"i","name":"a","pid":1,"tid":3,"ts":0},{"ph":"i","name":"b","pid":2,"tid":3,"ts":1}"#,
            ),
        ];
        for (i, t) in bad.iter().enumerate() {
            assert!(validate_trace(t).is_err(), "case {i} accepted: {t}");
        }
        let good = wrap(
            r#"{"ph":"B","name":"a","pid":1,"tid":1,"ts":0},{"ph":"E","name":"a","pid":1,"tid":1,"ts":2},{"ph":"i","name":"b","pid":1,"tid":2,"ts":1},{"ph":"X","name":"c","pid":1,"tid":1,"ts":3,"dur":4},{"ph":"X","name":"d","pid":1,"tid":1,"ts":3,"dur":4}"#,
        );
        assert_eq!(validate_trace(&good).unwrap().tracks, 2);
    }
}
