//! Agent side of the CUPTI injection library (`cupti-inject`, loaded into the server with
//! `CUDA_INJECTION64_PATH`): a unix-socket receiver that decodes the library's wire frames into
//! [`GpuActivity`] values and can switch the library's detail level.
//!
//! Every traced process connects on its own; memory is bounded per connection (one frame) and in
//! the output channel (a full channel drops and counts activities, never blocks the sockets).

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
    Activity as WireActivity, ActivityKind as WireKind, DetailLevel, Stats as InjectStats,
    WireError, DEFAULT_SOCKET, DEVICE_UNKNOWN, SOCKET_ENV,
};

use super::timeline::{GpuActivity, GpuActivityKind, MemcpyKind, SyncKind};

/// Receiver settings.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Where to listen (the library reads the same path from `INFERTAP_CUPTI_SOCKET`).
    pub socket_path: PathBuf,
    /// Activities buffered between the receiver and the pipeline.
    pub channel_capacity: usize,
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
}

/// Decodes one connection's frames into [`GpuActivity`] values (pure; no I/O).
#[derive(Debug, Default)]
pub struct ConnDecoder {
    hello: Option<infertap_cupti::wire::Hello>,
    names: HashMap<u32, Arc<str>>,
    last_stats: Option<InjectStats>,
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
    /// Pid of the traced process, once it said Hello.
    pub fn pid(&self) -> Option<u32> {
        self.hello.map(|h| h.pid)
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
                let pid = self.hello.ok_or(ProtocolError::NoHello)?.pid;
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
        let stats = Arc::new(ReceiverStats::default());
        let inject_stats = Arc::new(Mutex::new(HashMap::new()));
        let (detail, _) = watch::channel(None);
        let task = tokio::spawn(accept_loop(
            listener,
            tx,
            stats.clone(),
            inject_stats.clone(),
            detail.subscribe(),
            config.max_connections,
        ));
        Ok((
            CuptiReceiver {
                stats,
                inject_stats,
                detail,
                path,
                task,
            },
            rx,
        ))
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

async fn accept_loop(
    listener: UnixListener,
    tx: mpsc::Sender<GpuActivity>,
    stats: Arc<ReceiverStats>,
    inject_stats: Arc<Mutex<HashMap<u32, InjectStats>>>,
    detail: watch::Receiver<Option<DetailLevel>>,
    max_connections: u64,
) {
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
                let (tx, stats, inject_stats, detail) =
                    (tx.clone(), stats.clone(), inject_stats.clone(), detail.clone());
                conns.spawn(async move {
                    if serve_conn(stream, &tx, &stats, &inject_stats, detail).await.is_err() {
                        stats.malformed_streams.fetch_add(1, Relaxed);
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
    tx: &mpsc::Sender<GpuActivity>,
    stats: &ReceiverStats,
    inject_stats: &Mutex<HashMap<u32, InjectStats>>,
    mut detail: watch::Receiver<Option<DetailLevel>>,
) -> Result<(), ProtocolError> {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut dec = ConnDecoder::default();
    let mut out = Vec::new();
    let mut unknown = 0u64;
    let mut said_hello = false;
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
                        FrameEvent::Hello { detail: lib_level, .. } => {
                            said_hello = true;
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
