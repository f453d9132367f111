//! CUPTI path without a GPU: activity records built from cudarc's CUPTI structs decode exactly;
//! wire frames become timeline activities; the agent's receiver works over a real unix socket;
//! the injection library loads and does nothing harmful without libcupti.

#[path = "support/cupti_lib.rs"]
mod cupti_lib;

use std::ffi::CString;
use std::mem::size_of;
use std::sync::Arc;
use std::time::Duration;

use cudarc::cupti::sys;
use infertap::gpu::cupti::{ConnDecoder, CuptiReceiver, DetailLevel, FrameEvent, ReceiverConfig};
use infertap::gpu::timeline::{GpuActivityKind, MemcpyKind, SyncKind};
use infertap_cupti::records::{decode_record, map_time, RecordError};
use infertap_cupti::wire::{
    self, encode_frame, launch_flags, memcpy_kind, sync_kind, Activity, ActivityKind, ApiDomain,
    Frame, Hello, Launch,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: reading the plain bytes of a repr(C) CUPTI struct.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()).to_vec() }
}

fn kernel_record(name: &CString) -> sys::CUpti_ActivityKernel9 {
    // SAFETY: CUPTI records are plain C structs; all-zero is a valid value.
    let mut k: sys::CUpti_ActivityKernel9 = unsafe { std::mem::zeroed() };
    k.kind = sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;
    k.registersPerThread = 96;
    k.start = 5_000_000_000;
    k.end = 5_000_123_456;
    k.deviceId = 1;
    k.contextId = 7;
    k.streamId = 13;
    k.gridX = 108;
    k.gridY = 2;
    k.gridZ = 1;
    k.blockX = 128;
    k.blockY = 1;
    k.blockZ = 1;
    k.staticSharedMemory = 1024;
    k.dynamicSharedMemory = 4096;
    k.correlationId = 4711;
    k.name = name.as_ptr();
    k
}

#[test]
fn kernel_record_decodes_exactly() {
    let name = CString::new("void flash_fwd_kernel<Flash_fwd_params>(Flash_fwd_params)").unwrap();
    let bytes = bytes_of(&kernel_record(&name));
    let d = decode_record(&bytes).unwrap();
    assert_eq!(d.name_ptr, name.as_ptr() as usize);
    assert_eq!(
        d.activity,
        Activity {
            kind: ActivityKind::Kernel,
            sub: 0,
            registers_per_thread: 96,
            device: 1,
            context: 7,
            stream: 13,
            correlation_id: 4711,
            name_id: 0,
            graph_id: 0,
            shared_mem_bytes: 5120,
            start_ns: 5_000_000_000,
            end_ns: 5_000_123_456,
            bytes: 0,
            grid: [108, 2, 1],
            block: [128, 1, 1],
        }
    );
    // Extra bytes after the record (the rest of a CUPTI buffer) are ignored.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0xAB; 64]);
    assert_eq!(decode_record(&longer).unwrap(), d);
    // A cut record is an error, not a read past the end.
    assert!(matches!(
        decode_record(&bytes[..100]),
        Err(RecordError::Short { kind: 10, len: 100 })
    ));
}

#[test]
fn memcpy_memset_sync_graph_records_decode_exactly() {
    // SAFETY (all zeroed below): plain C structs.
    let mut m: sys::CUpti_ActivityMemcpy6 = unsafe { std::mem::zeroed() };
    m.kind = sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_MEMCPY;
    m.copyKind = sys::CUpti_ActivityMemcpyKind::CUPTI_ACTIVITY_MEMCPY_KIND_DTOH as u8;
    m.bytes = 1 << 20;
    m.start = 100;
    m.end = 350;
    m.deviceId = 0;
    m.contextId = 3;
    m.streamId = 9;
    m.correlationId = 21;
    let d = decode_record(&bytes_of(&m)).unwrap().activity;
    assert_eq!(
        (d.kind, d.sub, d.bytes),
        (ActivityKind::Memcpy, memcpy_kind::DTOH, 1 << 20)
    );
    assert_eq!(
        (d.start_ns, d.end_ns, d.context, d.stream, d.correlation_id),
        (100, 350, 3, 9, 21)
    );

    // Array copies are reported as "unknown" direction.
    m.copyKind = sys::CUpti_ActivityMemcpyKind::CUPTI_ACTIVITY_MEMCPY_KIND_ATOD as u8;
    assert_eq!(
        decode_record(&bytes_of(&m)).unwrap().activity.sub,
        memcpy_kind::UNKNOWN
    );

    let mut s: sys::CUpti_ActivityMemset4 = unsafe { std::mem::zeroed() };
    s.kind = sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_MEMSET;
    s.bytes = 4096;
    s.start = 10;
    s.end = 20;
    s.deviceId = 2;
    s.contextId = 4;
    s.streamId = 5;
    s.correlationId = 6;
    let d = decode_record(&bytes_of(&s)).unwrap().activity;
    assert_eq!(
        (d.kind, d.bytes, d.device, d.correlation_id),
        (ActivityKind::Memset, 4096, 2, 6)
    );

    let mut y: sys::CUpti_ActivitySynchronization2 = unsafe { std::mem::zeroed() };
    y.kind = sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_SYNCHRONIZATION;
    y.type_ = sys::CUpti_ActivitySynchronizationType::CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_CONTEXT_SYNCHRONIZE;
    y.start = 1000;
    y.end = 9000;
    y.contextId = 4;
    y.streamId = u32::MAX; // CUPTI: no stream for context syncs
    y.correlationId = 77;
    let d = decode_record(&bytes_of(&y)).unwrap().activity;
    assert_eq!(
        (d.kind, d.sub),
        (ActivityKind::Sync, sync_kind::CONTEXT_SYNCHRONIZE)
    );
    assert_eq!(
        (d.device, d.context, d.stream),
        (wire::DEVICE_UNKNOWN, 4, 0)
    );
    assert_eq!((d.start_ns, d.end_ns), (1000, 9000));

    let mut g: sys::CUpti_ActivityGraphTrace2 = unsafe { std::mem::zeroed() };
    g.kind = sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_GRAPH_TRACE;
    g.correlationId = 88;
    g.start = 500;
    g.end = 2500;
    g.deviceId = 1;
    g.graphId = 42;
    g.contextId = 2;
    g.streamId = 3;
    let d = decode_record(&bytes_of(&g)).unwrap().activity;
    assert_eq!(
        (d.kind, d.graph_id, d.device, d.stream),
        (ActivityKind::Graph, 42, 1, 3)
    );
    assert_eq!((d.start_ns, d.end_ns, d.correlation_id), (500, 2500, 88));

    // Records CUPTI could not time, and kinds never enabled, are refused.
    g.start = 0;
    g.end = 0;
    assert_eq!(decode_record(&bytes_of(&g)), Err(RecordError::NoTimestamps));
    let mut other = bytes_of(&g);
    other[..4].copy_from_slice(
        &(sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_DRIVER as u32).to_ne_bytes(),
    );
    assert!(matches!(
        decode_record(&other),
        Err(RecordError::UnknownKind(_))
    ));
    assert!(decode_record(&[1, 0]).is_err());
}

#[test]
fn clock_mapping_is_an_offset() {
    assert_eq!(map_time(1_000, 500), 1_500);
    assert_eq!(map_time(1_000, -400), 600);
    assert_eq!(map_time(100, -400), 0, "clamped, never wraps");
}

fn wire_kernel(name_id: u32) -> Activity {
    Activity {
        kind: ActivityKind::Kernel,
        sub: 0,
        registers_per_thread: 32,
        device: 0,
        context: 1,
        stream: 7,
        correlation_id: 5,
        name_id,
        graph_id: 0,
        shared_mem_bytes: 0,
        start_ns: 10_000,
        end_ns: 12_000,
        bytes: 0,
        grid: [1, 1, 1],
        block: [32, 1, 1],
    }
}

#[test]
fn conn_decoder_turns_frames_into_timeline_activities() {
    let mut dec = ConnDecoder::default();
    let mut out = Vec::new();
    let mut unknown = 0;
    // Activities before Hello break the protocol.
    assert!(dec
        .apply(
            Frame::Activities(vec![wire_kernel(1)]),
            &mut out,
            &mut unknown
        )
        .is_err());
    dec.apply(
        Frame::Hello(Hello {
            pid: 99,
            cupti_version: 26,
            detail: DetailLevel::Full,
        }),
        &mut out,
        &mut unknown,
    )
    .unwrap();
    dec.apply(
        Frame::Names(vec![(1, "gemm".into())]),
        &mut out,
        &mut unknown,
    )
    .unwrap();
    let memcpy = Activity {
        kind: ActivityKind::Memcpy,
        sub: memcpy_kind::HTOD,
        bytes: 8192,
        ..wire_kernel(0)
    };
    let sync = Activity {
        kind: ActivityKind::Sync,
        sub: sync_kind::STREAM_SYNCHRONIZE,
        ..wire_kernel(0)
    };
    let frame = Frame::Activities(vec![wire_kernel(1), wire_kernel(2), memcpy, sync]);
    dec.apply(frame, &mut out, &mut unknown).unwrap();
    assert_eq!(out.len(), 4);
    assert_eq!(out[0].name.as_deref(), Some("gemm"));
    assert_eq!(out[0].pid, 99);
    assert_eq!(
        (out[0].start_ns, out[0].end_ns, out[0].stream),
        (10_000, 12_000, 7)
    );
    assert!(matches!(
        out[0].kind,
        GpuActivityKind::Kernel {
            grid: [1, 1, 1],
            block: [32, 1, 1],
            registers_per_thread: 32,
            ..
        }
    ));
    assert_eq!(out[1].name, None, "id 2 never defined");
    assert_eq!(unknown, 1);
    assert_eq!(
        out[2].kind,
        GpuActivityKind::Memcpy {
            kind: MemcpyKind::HtoD,
            bytes: 8192
        }
    );
    assert_eq!(
        out[3].kind,
        GpuActivityKind::Sync {
            kind: SyncKind::Stream
        }
    );
    // Names are shared, not copied per activity.
    let again = out[0].name.clone().unwrap();
    assert!(Arc::strong_count(&again) >= 2);

    // Launch records are held for the receiver to map and forward.
    let launch = Launch {
        correlation_id: 5,
        tid: 100,
        start_ns: 9_000,
        end_ns: 9_500,
        after_ns: 8_000,
        cbid: 211,
        domain: ApiDomain::Runtime,
        flags: launch_flags::GRAPH,
    };
    assert_eq!(
        dec.apply(
            Frame::Launches(vec![launch, launch]),
            &mut out,
            &mut unknown
        )
        .unwrap(),
        FrameEvent::Launches(2)
    );
    assert_eq!(dec.take_launches(), vec![launch, launch]);
    assert!(dec.take_launches().is_empty());
    // Unknown frame types are skipped, not fatal.
    assert_eq!(
        dec.apply(Frame::Unknown { ty: 42, len: 3 }, &mut out, &mut unknown)
            .unwrap(),
        FrameEvent::Skipped(42)
    );
    // The agent's view of the pid (socket credentials) wins over the one the process reports.
    assert!(!dec.foreign_pid_namespace());
    dec.set_peer_pid(4099);
    assert_eq!((dec.pid(), dec.reported_pid()), (Some(4099), Some(99)));
    assert!(dec.foreign_pid_namespace());
    out.clear();
    dec.apply(
        Frame::Activities(vec![wire_kernel(1)]),
        &mut out,
        &mut unknown,
    )
    .unwrap();
    assert_eq!(out[0].pid, 4099);

    let mut fresh = ConnDecoder::default();
    assert!(fresh
        .apply(Frame::Launches(vec![launch]), &mut out, &mut unknown)
        .is_err());
}

#[tokio::test]
async fn receiver_serves_a_library_over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("infertap-cupti-rx-{}", std::process::id()));
    let path = dir.join("cupti.sock");
    let cfg = ReceiverConfig {
        socket_path: path.clone(),
        channel_capacity: 3,
        launch_capacity: 2,
        max_connections: 4,
    };
    let (mut rx_handle, mut rx) = CuptiReceiver::bind(cfg.clone()).unwrap();
    let mut launches = rx_handle.take_launches().expect("launch channel");
    assert!(rx_handle.take_launches().is_none(), "taken once");
    // A second agent on the same socket is refused.
    assert_eq!(
        CuptiReceiver::bind(cfg).err().map(|e| e.kind()),
        Some(std::io::ErrorKind::AddrInUse)
    );
    // Requested before the library connects: sent right after its Hello.
    rx_handle.set_detail(DetailLevel::Graphs);

    let mut lib = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut buf = Vec::new();
    encode_frame(
        &Frame::Hello(Hello {
            pid: 1234,
            cupti_version: 26,
            detail: DetailLevel::Full,
        }),
        &mut buf,
    );
    encode_frame(&Frame::Names(vec![(1, "rms_norm".into())]), &mut buf);
    encode_frame(
        &Frame::Activities(
            (0..5)
                .map(|i| Activity {
                    start_ns: i,
                    end_ns: i + 1,
                    ..wire_kernel(1)
                })
                .collect(),
        ),
        &mut buf,
    );
    encode_frame(
        &Frame::Stats(wire::Stats {
            records: 5,
            detail: 2,
            ..Default::default()
        }),
        &mut buf,
    );
    // SAFETY: gettid has no preconditions.
    let my_tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    encode_frame(
        &Frame::Launches(
            (0..3)
                .map(|i| Launch {
                    correlation_id: 10 + i,
                    tid: my_tid,
                    start_ns: 100,
                    end_ns: 200,
                    after_ns: 50,
                    cbid: 307,
                    domain: ApiDomain::Driver,
                    flags: 0,
                })
                .collect(),
        ),
        &mut buf,
    );
    // Byte by byte: frames split across reads must reassemble.
    for b in &buf {
        lib.write_all(std::slice::from_ref(b)).await.unwrap();
    }
    let mut level = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), lib.read_exact(&mut level))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(DetailLevel::from_u8(level[0]), Some(DetailLevel::Graphs));

    // Channel capacity 3: three delivered, two dropped and counted, nothing blocked.
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // The process said it is pid 1234 (its own namespace's view); the socket's credentials say
    // which process it is for the agent (here: this test process).
    let me = std::process::id();
    assert!(got
        .iter()
        .all(|a| a.pid == me && a.name.as_deref() == Some("rms_norm")));
    assert_eq!(
        got.iter().map(|a| a.start_ns).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    use std::sync::atomic::Ordering::Relaxed;
    while rx_handle.stats().launches.load(Relaxed)
        + rx_handle
            .stats()
            .launches_dropped_channel_full
            .load(Relaxed)
        < 3
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rx_handle.stats().activities.load(Relaxed), 3);
    assert_eq!(rx_handle.stats().dropped_channel_full.load(Relaxed), 2);
    assert_eq!(rx_handle.inject_stats()[&me].records, 5);
    // Launches: pid from the credentials; "pid 1234" marks another pid namespace, so the tid
    // went through /proc/<pid>/task/*/status NSpid (here the identity: same namespace).
    // Capacity 2: one dropped, counted.
    let l = launches.recv().await.unwrap();
    assert_eq!((l.pid, l.tid, l.correlation_id), (me, my_tid, 10));
    assert_eq!(
        (l.start_ns, l.end_ns, l.after_ns, l.graph, l.nested),
        (100, 200, 50, false, false)
    );
    assert_eq!(launches.recv().await.unwrap().correlation_id, 11);
    assert_eq!(rx_handle.stats().launches.load(Relaxed), 2);
    assert_eq!(
        rx_handle
            .stats()
            .launches_dropped_channel_full
            .load(Relaxed),
        1
    );
    assert_eq!(rx_handle.stats().launch_tids_unmapped.load(Relaxed), 0);

    // A level change reaches connected libraries.
    rx_handle.set_detail(DetailLevel::Off);
    tokio::time::timeout(Duration::from_secs(5), lib.read_exact(&mut level))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(DetailLevel::from_u8(level[0]), Some(DetailLevel::Off));

    // Garbage closes that connection only, and is counted.
    let mut bad = tokio::net::UnixStream::connect(&path).await.unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut sink = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), bad.read(&mut sink))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "corrupt stream must be closed");
    assert_eq!(rx_handle.stats().malformed_streams.load(Relaxed), 1);

    // A library of a newer wire version: refused cleanly, counted apart from corruption. An
    // unknown frame type of a known version is skipped and the connection goes on.
    let mut newer = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut frame = Vec::new();
    encode_frame(
        &Frame::Hello(Hello {
            pid: 1,
            cupti_version: 0,
            detail: DetailLevel::Full,
        }),
        &mut frame,
    );
    let mut skipped = frame.clone();
    frame[4..6].copy_from_slice(&(wire::VERSION + 1).to_le_bytes());
    newer.write_all(&frame).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), newer.read(&mut sink))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "a newer wire version is refused");
    assert_eq!(rx_handle.stats().unsupported_version.load(Relaxed), 1);
    assert_eq!(rx_handle.stats().malformed_streams.load(Relaxed), 1);
    skipped.extend_from_slice(b"ITCU");
    skipped.extend_from_slice(&wire::VERSION.to_le_bytes());
    skipped.extend_from_slice(&99u16.to_le_bytes());
    skipped.extend_from_slice(&2u32.to_le_bytes());
    skipped.extend_from_slice(b"??");
    let mut future = tokio::net::UnixStream::connect(&path).await.unwrap();
    future.write_all(&skipped).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while rx_handle.stats().frames_skipped.load(Relaxed) == 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rx_handle.stats().frames_skipped.load(Relaxed), 1);
    assert_eq!(rx_handle.stats().malformed_streams.load(Relaxed), 1);

    drop(rx_handle);
    assert!(!path.exists(), "socket file removed on drop");
}

#[test]
fn injection_library_without_libcupti_is_inert() {
    let so = cupti_lib::cdylib();
    // SAFETY: loading our own library; its initializers are trivial.
    let lib = unsafe { libloading::Library::new(&so) }.expect("dlopen libinfertap_cupti.so");
    // SAFETY: the exported signatures.
    let init: libloading::Symbol<extern "C" fn() -> i32> =
        unsafe { lib.get(b"InitializeInjection") }.unwrap();
    let state: libloading::Symbol<extern "C" fn() -> i32> =
        unsafe { lib.get(b"infertap_cupti_state") }.unwrap();
    assert_eq!(state(), 0, "not initialized yet");
    // No libcupti on this machine: success for CUDA (never fail the host's cuInit), state NoCupti.
    assert_eq!(init(), 1);
    assert_eq!(state(), 2);
    // Idempotent.
    assert_eq!(init(), 1);
    assert_eq!(state(), 2);
}
