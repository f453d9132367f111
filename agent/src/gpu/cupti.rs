//! Agent side of the CUPTI injection library (`cupti-inject`, loaded into the server with
//! `CUDA_INJECTION64_PATH`): a unix-socket receiver that decodes the library's wire frames into
//! [`GpuActivity`] values and launch API calls ([`LaunchApiCall`]), and can switch the library's
//! detail level.
//!
//! Every traced process connects on its own; memory is bounded per connection (one frame) and in
//! the output channels (a full channel drops and counts, never blocks the sockets).
//!
//! Pids and tids are given in the agent's (host) pid namespace, the one the eBPF probes report:
//! the process's pid comes from the socket's peer credentials, and when it differs from the pid
//! the library reported (a container), launch thread ids are mapped through `/proc` `NSpid`
//! ([`TidMap`]).

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use infertap_cupti::wire::{decode_frame, memcpy_kind, sync_kind, Frame};
pub use infertap_cupti::wire::{
    Activity as WireActivity, ActivityKind as WireKind, DetailLevel, Launch as WireLaunch,
    Stats as InjectStats, WireError, DEFAULT_SOCKET, DEVICE_UNKNOWN, SOCKET_ENV,
};
use tracing::{info, warn};

use super::launches::{LaunchApiCall, TidMap};
use super::timeline::{GpuActivity, GpuActivityKind, MemcpyKind, SyncKind};

/// Receiver settings.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Where to listen (the library reads the same path from `INFERTAP_CUPTI_SOCKET`).
    pub socket_path: PathBuf,
    /// Activities buffered between the receiver and the pipeline.
    pub channel_capacity: usize,
    /// Launch records buffered between the receiver and the pipeline.
    pub launch_capacity: usize,
    /// Further connections are refused (closed at once) beyond this.
    pub max_connections: u64,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            socket_path: std::env::var_os(SOCKET_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            channel_capacity: 64 * 1024,
            launch_capacity: 64 * 1024,
            max_connections: 256,
        }
    }
}

/// Receiver counters (cumulative).
#[derive(Debug, Default)]
pub struct ReceiverStats {
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Activities delivered to the channel.
    pub activities: AtomicU64,
    /// Activities dropped because the pipeline's channel was full.
    pub dropped_channel_full: AtomicU64,
    /// Connections closed because their byte stream was corrupt.
    pub malformed_streams: AtomicU64,
    /// Kernel records whose name id was never defined (delivered without a name).
    pub unknown_names: AtomicU64,
    /// Launch records delivered to the launch channel.
    pub launches: AtomicU64,
    /// Launch records dropped because the launch channel was full.
    pub launches_dropped_channel_full: AtomicU64,
    /// Launch records whose thread could not be mapped into the host's pid namespace (the
    /// thread had exited): delivered with tid 0 ("any thread of the process").
    pub launch_tids_unmapped: AtomicU64,
    /// Connections closed because the library speaks a newer wire version (update the agent).
    pub unsupported_version: AtomicU64,
    /// Frames of unknown types skipped.
    pub frames_skipped: AtomicU64,
}

/// Decodes one connection's frames into [`GpuActivity`] values (pure; no I/O).
#[derive(Debug, Default)]
pub struct ConnDecoder {
    hello: Option<infertap_cupti::wire::Hello>,
    /// The peer's pid in the agent's namespace (socket credentials).
    peer_pid: Option<u32>,
    names: HashMap<u32, Arc<str>>,
    last_stats: Option<InjectStats>,
    /// Launch records of the last frame(s), until [`ConnDecoder::take_launches`].
    launches: Vec<WireLaunch>,
}

/// What a frame meant, beyond the activities it carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameEvent {
    Hello {
        pid: u32,
        cupti_version: u32,
        detail: DetailLevel,
    },
    Names(usize),
    Activities(usize),
    Stats(InjectStats),
    /// Launch records, held for [`ConnDecoder::take_launches`].
    Launches(usize),
    /// A frame of an unknown type, skipped.
    Skipped(u16),
}

/// The library broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("frame before Hello")]
    NoHello,
    #[error("second Hello on one connection")]
    DuplicateHello,
}

/// Names kept per connection (the library caps its own table lower).
const MAX_NAMES_PER_CONN: usize = 65536;

impl ConnDecoder {
    /// Pid of the traced process in the agent's pid namespace: the socket peer's when known,
    /// else the one it said Hello with.
    pub fn pid(&self) -> Option<u32> {
        self.peer_pid.or(self.hello.map(|h| h.pid))
    }

    /// Pid the process reported itself (in its own pid namespace).
    pub fn reported_pid(&self) -> Option<u32> {
        self.hello.map(|h| h.pid)
    }

    /// Sets the peer's pid as the agent sees it (`SO_PEERCRED`).
    pub fn set_peer_pid(&mut self, pid: u32) {
        self.peer_pid = Some(pid);
    }

    /// Whether the process lives in another pid namespace than the agent (its thread ids must
    /// be mapped).
    pub fn foreign_pid_namespace(&self) -> bool {
        matches!((self.peer_pid, self.hello), (Some(p), Some(h)) if p != h.pid)
    }

    /// Launch records received since the last call (in the process's own pid namespace).
    pub fn take_launches(&mut self) -> Vec<WireLaunch> {
        std::mem::take(&mut self.launches)
    }

    /// The library's latest counters.
    pub fn last_stats(&self) -> Option<InjectStats> {
        self.last_stats
    }

    /// Applies one frame; activities are appended to `out`. `unknown_names` counts kernels
    /// whose name id was not defined.
    pub fn apply(
        &mut self,
        frame: Frame,
        out: &mut Vec<GpuActivity>,
        unknown_names: &mut u64,
    ) -> Result<FrameEvent, ProtocolError> {
        match frame {
            Frame::Hello(h) => {
                if self.hello.is_some() {
                    return Err(ProtocolError::DuplicateHello);
                }
                self.hello = Some(h);
                Ok(FrameEvent::Hello {
                    pid: h.pid,
                    cupti_version: h.cupti_version,
                    detail: h.detail,
                })
            }
            Frame::Names(names) => {
                self.hello.ok_or(ProtocolError::NoHello)?;
                let n = names.len();
                for (id, name) in names {
                    if self.names.len() < MAX_NAMES_PER_CONN || self.names.contains_key(&id) {
                        self.names.insert(id, Arc::from(name));
                    }
                }
                Ok(FrameEvent::Names(n))
            }
            Frame::Activities(acts) => {
                self.hello.ok_or(ProtocolError::NoHello)?;
                let pid = self.pid().unwrap_or_default();
                let n = acts.len();
                out.reserve(n);
                for a in &acts {
                    let name = if a.kind == WireKind::Kernel && a.name_id != 0 {
                        let name = self.names.get(&a.name_id).cloned();
                        if name.is_none() {
                            *unknown_names += 1;
                        }
                        name
                    } else {
                        None
                    };
                    out.push(to_gpu_activity(a, pid, name));
                }
                Ok(FrameEvent::Activities(n))
            }
            Frame::Stats(s) => {
                self.hello.ok_or(ProtocolError::NoHello)?;
                self.last_stats = Some(s);
                Ok(FrameEvent::Stats(s))
            }
            Frame::Launches(ls) => {
                self.hello.ok_or(ProtocolError::NoHello)?;
                let n = ls.len();
                self.launches.extend(ls);
                Ok(FrameEvent::Launches(n))
            }
            Frame::Unknown { ty, .. } => Ok(FrameEvent::Skipped(ty)),
        }
    }
}

/// Converts one wire record (times already CLOCK_MONOTONIC) into the timeline type.
pub fn to_gpu_activity(a: &WireActivity, pid: u32, name: Option<Arc<str>>) -> GpuActivity {
    let kind = match a.kind {
        WireKind::Kernel => GpuActivityKind::Kernel {
            grid: a.grid,
            block: a.block,
            shared_mem_bytes: a.shared_mem_bytes,
            registers_per_thread: a.registers_per_thread,
        },
        WireKind::Memcpy => GpuActivityKind::Memcpy {
            kind: match a.sub {
                memcpy_kind::HTOD => MemcpyKind::HtoD,
                memcpy_kind::DTOH => MemcpyKind::DtoH,
                memcpy_kind::DTOD => MemcpyKind::DtoD,
                memcpy_kind::HTOH => MemcpyKind::HtoH,
                memcpy_kind::PTOP => MemcpyKind::PtoP,
                _ => MemcpyKind::Other,
            },
            bytes: a.bytes,
        },
        WireKind::Memset => GpuActivityKind::Memset { bytes: a.bytes },
        WireKind::Sync => GpuActivityKind::Sync {
            kind: match a.sub {
                sync_kind::EVENT_SYNCHRONIZE => SyncKind::Event,
                sync_kind::STREAM_WAIT_EVENT => SyncKind::StreamWaitEvent,
                sync_kind::STREAM_SYNCHRONIZE => SyncKind::Stream,
                sync_kind::CONTEXT_SYNCHRONIZE => SyncKind::Context,
                _ => SyncKind::Unknown,
            },
        },
        WireKind::Graph => GpuActivityKind::Graph {
            graph_id: a.graph_id,
        },
    };
    GpuActivity {
        kind,
        device: a.device,
        context: a.context,
        stream: a.stream,
        start_ns: a.start_ns,
        end_ns: a.end_ns.max(a.start_ns),
        correlation_id: a.correlation_id,
        name,
        pid,
    }
}

/// Listens for injection libraries. Dropping it stops the listener and removes the socket file.
pub struct CuptiReceiver {
    stats: Arc<ReceiverStats>,
    inject_stats: Arc<Mutex<HashMap<u32, InjectStats>>>,
    detail: watch::Sender<Option<DetailLevel>>,
    launches: Option<mpsc::Receiver<LaunchApiCall>>,
    path: PathBuf,
    task: JoinHandle<()>,
}

impl CuptiReceiver {
    /// Binds the socket (creating its directory; a stale socket file left by a dead agent is
    /// replaced, a live one is an `AddrInUse` error) and starts accepting. Must be called within
    /// a tokio runtime. The socket is made world-writable so that servers running as any user can
    /// report; what they send is only ever data.
    pub fn bind(
        config: ReceiverConfig,
    ) -> io::Result<(CuptiReceiver, mpsc::Receiver<GpuActivity>)> {
        let path = config.socket_path.clone();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another agent listens on {}", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
        let (launch_tx, launch_rx) = mpsc::channel(config.launch_capacity.max(1));
        let stats = Arc::new(ReceiverStats::default());
        let inject_stats = Arc::new(Mutex::new(HashMap::new()));
        let (detail, _) = watch::channel(None);
        let task = tokio::spawn(accept_loop(
            listener,
            Outputs {
                activities: tx,
                launches: launch_tx,
                stats: stats.clone(),
                inject_stats: inject_stats.clone(),
            },
            detail.subscribe(),
            config.max_connections,
        ));
        Ok((
            CuptiReceiver {
                stats,
                inject_stats,
                detail,
                launches: Some(launch_rx),
                path,
                task,
            },
            rx,
        ))
    }

    /// The launch records of every connected library (once; `None` after the first call).
    /// Until taken, and whenever the taker falls behind, they are dropped and counted.
    pub fn take_launches(&mut self) -> Option<mpsc::Receiver<LaunchApiCall>> {
        self.launches.take()
    }

    /// Asks every connected library (and those connecting later) to switch to `level`.
    pub fn set_detail(&self, level: DetailLevel) {
        self.detail.send_replace(Some(level));
    }

    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }

    /// Latest counters reported by each traced process (by pid).
    pub fn inject_stats(&self) -> HashMap<u32, InjectStats> {
        self.inject_stats
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CuptiReceiver {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where a connection's output goes.
#[derive(Clone)]
struct Outputs {
    activities: mpsc::Sender<GpuActivity>,
    launches: mpsc::Sender<LaunchApiCall>,
    stats: Arc<ReceiverStats>,
    inject_stats: Arc<Mutex<HashMap<u32, InjectStats>>>,
}

async fn accept_loop(
    listener: UnixListener,
    out: Outputs,
    detail: watch::Receiver<Option<DetailLevel>>,
    max_connections: u64,
) {
    let stats = out.stats.clone();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // EMFILE and the like: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                stats.connections_total.fetch_add(1, Relaxed);
                if stats.connections_active.load(Relaxed) >= max_connections {
                    stats.connections_refused.fetch_add(1, Relaxed);
                    continue; // dropping the stream closes it
                }
                stats.connections_active.fetch_add(1, Relaxed);
                let (out, detail) = (out.clone(), detail.clone());
                conns.spawn(async move {
                    let stats = out.stats.clone();
                    match serve_conn(stream, &out, detail).await {
                        Ok(()) => {}
                        Err(ProtocolError::Wire(e @ WireError::UnsupportedVersion(_))) => {
                            stats.unsupported_version.fetch_add(1, Relaxed);
                            warn!("CUPTI: closing a connection: {e}");
                        }
                        Err(e) => {
                            stats.malformed_streams.fetch_add(1, Relaxed);
                            warn!("CUPTI: closing a corrupt connection: {e}");
                        }
                    }
                    stats.connections_active.fetch_sub(1, Relaxed);
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Serves one library until it disconnects. `Err` only for protocol violations.
async fn serve_conn(
    stream: UnixStream,
    o: &Outputs,
    mut detail: watch::Receiver<Option<DetailLevel>>,
) -> Result<(), ProtocolError> {
    let (tx, stats, inject_stats) = (&o.activities, &*o.stats, &*o.inject_stats);
    let mut dec = ConnDecoder::default();
    // 0: the peer lives in a pid namespace the agent cannot see; keep the pid it reports.
    if let Some(pid) = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .filter(|&p| p > 0)
    {
        dec.set_peer_pid(pid as u32);
    }
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = Vec::new();
    let mut unknown = 0u64;
    let mut said_hello = false;
    // Set once Hello shows the process in another pid namespace.
    let mut tids: Option<TidMap> = None;
    loop {
        tokio::select! {
            r = rd.read_buf(&mut buf) => {
                match r {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {}
                }
                while let Some((frame, used)) = decode_frame(&buf)? {
                    buf.advance(used);
                    match dec.apply(frame, &mut out, &mut unknown)? {
                        FrameEvent::Hello { detail: lib_level, pid: ns_pid, cupti_version } => {
                            said_hello = true;
                            let pid = dec.pid().unwrap_or(ns_pid);
                            if dec.foreign_pid_namespace() {
                                tids = Some(TidMap::new(pid));
                            }
                            info!(
                                "CUPTI: pid {pid} connected (its own pid {ns_pid}, CUPTI {cupti_version}, detail {lib_level:?})"
                            );
                            // A level requested before this library connected.
                            let want = *detail.borrow_and_update();
                            if let Some(want) = want.filter(|w| *w != lib_level) {
                                if wr.write_all(&[want as u8]).await.is_err() {
                                    return Ok(());
                                }
                            }
                        }
                        FrameEvent::Stats(s) => {
                            if let (Some(pid), Ok(mut m)) = (dec.pid(), inject_stats.lock()) {
                                m.insert(pid, s);
                            }
                        }
                        FrameEvent::Launches(_) => {
                            let pid = dec.pid().unwrap_or_default();
                            for l in dec.take_launches() {
                                let tid = match tids.as_mut() {
                                    // Blocking /proc reads, at most once a second per
                                    // containerised process and only for unseen threads.
                                    Some(m) => m.host_tid(l.tid).unwrap_or_else(|| {
                                        stats.launch_tids_unmapped.fetch_add(1, Relaxed);
                                        0
                                    }),
                                    None => l.tid,
                                };
                                let call = LaunchApiCall {
                                    pid,
                                    tid,
                                    correlation_id: l.correlation_id,
                                    start_ns: l.start_ns,
                                    end_ns: l.end_ns,
                                    after_ns: l.after_ns,
                                    graph: l.is_graph(),
                                    nested: l.is_nested(),
                                };
                                match o.launches.try_send(call) {
                                    Ok(()) => stats.launches.fetch_add(1, Relaxed),
                                    Err(_) => stats.launches_dropped_channel_full.fetch_add(1, Relaxed),
                                };
                            }
                        }
                        FrameEvent::Skipped(_) => {
                            stats.frames_skipped.fetch_add(1, Relaxed);
                        }
                        FrameEvent::Names(_) | FrameEvent::Activities(_) => {}
                    }
                    stats.unknown_names.fetch_add(std::mem::take(&mut unknown), Relaxed);
                    for a in out.drain(..) {
                        match tx.try_send(a) {
                            Ok(()) => stats.activities.fetch_add(1, Relaxed),
                            Err(_) => stats.dropped_channel_full.fetch_add(1, Relaxed),
                        };
                    }
                }
            }
            changed = detail.changed() => {
                if changed.is_err() {
                    return Ok(()); // the receiver was dropped
                }
                let want = *detail.borrow_and_update();
                if let (Some(want), true) = (want, said_hello) {
                    // The library reports the level it applied in its Stats frames (it may
                    // refuse `Graphs` where CUPTI lacks graph tracing); it is asked only once.
                    if wr.write_all(&[want as u8]).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}
