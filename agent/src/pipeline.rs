//! Wires the stages: probes → events → reconstruct → records → sinks (JSON lines, aggregates for
//! Prometheus and the collector).
//!
//! One task owns the ring buffer and the reconstruction state, so the hot path takes no locks;
//! it drains the ring when the kernel wakes it (ring above `wakeup_bytes`) or on a short poll
//! tick (records are written without wake-ups to keep the per-syscall cost low).

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{
    clock::{self, Clock},
    events::{self, ConnEvent, Event, ProcEvent},
    probes::{ProbeConfig, Probes},
    reconstruct::{ReconstructConfig, Reconstructor},
    record::RequestRecord,
    sinks::jsonl::{self, JsonLines, RequestLine},
    targets,
};

/// Everything the agent needs to run (built from the CLI).
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub requests: Option<String>,
    pub print: bool,
    pub probe: ProbeConfig,
    pub poll_interval: Duration,
    pub duration: Option<Duration>,
    pub ready_file: Option<PathBuf>,
    /// How often `--port` owners are re-resolved.
    pub rescan_interval: Duration,
}

/// Counters of the user-space side (the kernel keeps its own, see `probes::KernelCounters`).
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub records_decoded: AtomicU64,
    pub decode_errors: AtomicU64,
    pub requests_completed: AtomicU64,
}

/// Adopted connections get ids with the top bit set so they never collide with kernel ids
/// (monotonic timestamps).
const ADOPTED_CONN_ID_BASE: u64 = 1 << 63;

pub struct Pipeline {
    opts: AgentOptions,
    probes: Probes,
    recon: Reconstructor,
    clock: Clock,
    jsonl: Option<JsonLines>,
    known_pids: HashSet<u32>,
    next_adopted_id: u64,
    pub stats: PipelineStats,
    records: Vec<RequestRecord>,
    /// Called for every completed request (aggregates, GPU correlation, ...).
    observers: Vec<Box<dyn FnMut(&RequestRecord) + Send>>,
    /// Called for every CUDA call record (per-event mode only: trace windows).
    cuda_observers: Vec<Box<dyn FnMut(&events::CudaCall) + Send>>,
}

impl Pipeline {
    pub fn new(opts: AgentOptions) -> Result<Self> {
        let probes = Probes::load(&opts.probe)?;
        let jsonl = opts.requests.as_deref().map(JsonLines::open).transpose()?;
        Ok(Self {
            probes,
            recon: Reconstructor::new(ReconstructConfig::default()),
            clock: Clock::measure(),
            jsonl,
            known_pids: HashSet::new(),
            next_adopted_id: ADOPTED_CONN_ID_BASE,
            stats: PipelineStats::default(),
            records: Vec::new(),
            observers: Vec::new(),
            cuda_observers: Vec::new(),
            opts,
        })
    }

    pub fn add_observer(&mut self, f: impl FnMut(&RequestRecord) + Send + 'static) {
        self.observers.push(Box::new(f));
    }

    pub fn add_cuda_observer(&mut self, f: impl FnMut(&events::CudaCall) + Send + 'static) {
        self.cuda_observers.push(Box::new(f));
    }

    pub fn reconstructor(&self) -> &Reconstructor {
        &self.recon
    }

    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Starts tracing a process: its future connections through the kernel filter, its current
    /// ones by adoption.
    pub fn trace_pid(&mut self, pid: u32) -> Result<()> {
        if !targets::process_alive(pid) {
            anyhow::bail!("process {pid} does not exist");
        }
        self.probes.add_target(pid)?;
        if self.known_pids.insert(pid) {
            let now = clock::monotonic_ns();
            let existing = targets::existing_server_connections(pid);
            for c in &existing {
                let conn_id = self.next_adopted_id;
                self.next_adopted_id += 1;
                if let Err(e) = self.probes.adopt_connection(pid, c.fd, conn_id) {
                    warn!("{e:#}");
                    continue;
                }
                let ev = ConnEvent::Open {
                    conn: events::ConnKey { pid, conn_id },
                    fd: c.fd,
                    ts_ns: now,
                    peer: Some(c.peer),
                };
                self.recon.on_event(&ev, &mut self.records);
            }
            info!(
                "tracing pid {pid} ({} open connection(s) adopted)",
                existing.len()
            );
        }
        Ok(())
    }

    /// Resolves `--port` owners and adds new ones.
    fn rescan_ports(&mut self) {
        for port in self.opts.ports.clone() {
            for pid in targets::port_owners(port) {
                if !self.known_pids.contains(&pid) {
                    if let Err(e) = self.trace_pid(pid) {
                        warn!("port {port}: {e:#}");
                    }
                }
            }
        }
    }

    fn handle_record(&mut self, raw: &[u8]) {
        self.stats.records_decoded.fetch_add(1, Ordering::Relaxed);
        match events::decode(raw) {
            Ok(Some(Event::Conn(ev))) => {
                if let ConnEvent::Open {
                    conn,
                    fd,
                    ts_ns,
                    peer: None,
                } = ev
                {
                    // The caller of accept passed no address buffer: ask /proc.
                    let peer = targets::peer_of(conn.pid, fd);
                    self.recon.on_event(
                        &ConnEvent::Open {
                            conn,
                            fd,
                            ts_ns,
                            peer,
                        },
                        &mut self.records,
                    );
                } else {
                    self.recon.on_event(&ev, &mut self.records);
                }
            }
            Ok(Some(Event::Proc(ProcEvent::Exit { pid, ts_ns }))) => {
                info!("traced process {pid} exited");
                self.recon.on_process_exit(pid, ts_ns, &mut self.records);
                self.probes.forget_process(pid);
                self.known_pids.remove(&pid);
            }
            Ok(Some(Event::Cuda(call))) => {
                for obs in &mut self.cuda_observers {
                    obs(&call);
                }
            }
            Ok(Some(Event::Proc(ProcEvent::Fork { .. }))) | Ok(None) => {}
            Err(e) => {
                self.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                warn!("undecodable event record: {e}");
            }
        }
    }

    fn flush_records(&mut self) {
        for r in std::mem::take(&mut self.records) {
            self.stats
                .requests_completed
                .fetch_add(1, Ordering::Relaxed);
            if let Some(out) = self.jsonl.as_mut() {
                out.write(&RequestLine::new(&r, &self.clock));
            }
            if self.opts.print {
                eprintln!("{}", jsonl::human_line(&r));
            }
            for obs in &mut self.observers {
                obs(&r);
            }
        }
    }

    /// Periodic housekeeping: idle connections, clock drift, port owners.
    fn tick(&mut self) {
        self.recon
            .expire_idle(clock::monotonic_ns(), &mut self.records);
        self.flush_records();
    }

    /// Runs until `shutdown` resolves or `--duration` elapses.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<Self> {
        for pid in self.opts.pids.clone() {
            self.trace_pid(pid)?;
        }
        self.rescan_ports();
        if self.known_pids.is_empty() && !self.opts.ports.is_empty() {
            info!(
                "no process listens on port(s) {:?} yet; waiting for one",
                self.opts.ports
            );
        }
        let ring = self
            .probes
            .take_events()
            .context("event ring already taken")?;
        // SAFETY: the ring buffer owns its map fd for its whole life and always reports that fd.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering the event ring with tokio: {e}"))?;
        if let Some(path) = &self.opts.ready_file {
            std::fs::write(path, format!("{}\n", std::process::id()))
                .with_context(|| format!("writing --ready-file {}", path.display()))?;
        }
        info!("infertap: ready");

        let deadline = self.opts.duration.map(|d| tokio::time::Instant::now() + d);
        let mut poll = tokio::time::interval(self.opts.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_housekeeping = Instant::now();
        let mut last_clock = Instant::now();
        let mut last_rescan = Instant::now();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => break,
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                _ = poll.tick() => {
                    self.drain(ring.get_mut());
                }
            }
            let now = Instant::now();
            if now - last_housekeeping >= Duration::from_millis(250) {
                last_housekeeping = now;
                self.tick();
            }
            if now - last_clock >= Clock::REFRESH {
                last_clock = now;
                self.clock = Clock::measure();
            }
            if !self.opts.ports.is_empty() && now - last_rescan >= self.opts.rescan_interval {
                last_rescan = now;
                self.rescan_ports();
            }
        }
        // Take what the kernel wrote up to the stop.
        self.drain(ring.get_mut());
        self.tick();
        Ok(self)
    }

    fn drain(&mut self, ring: &mut aya::maps::RingBuf<aya::maps::MapData>) {
        while let Some(item) = ring.next() {
            // Decoded in place: the slot is released when `item` drops.
            self.handle_record(&item);
        }
        self.flush_records();
    }
}
