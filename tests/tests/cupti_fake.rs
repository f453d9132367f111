//! The injection library end to end against a fake libcupti (tests/fixtures/fake_cupti.c): real
//! InitializeInjection, CUPTI-style buffer callbacks, record decoding, clock mapping, the
//! non-blocking sender, the agent's receiver, detail switching, bounded buffers, agent restarts;
//! then the launch callbacks: the records of launches made on a thread of this process (its tid,
//! its call's time), joined by the agent's launch join with the kernels CUPTI reported for them.
//! One test per binary: the library's state is per process.

#[path = "support/cupti_lib.rs"]
mod cupti_lib;
#[path = "support/fake_cupti.rs"]
mod fake_cupti;

use std::ffi::{c_char, CString};
use std::mem::size_of;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use cudarc::cupti::sys::{
    self, CUpti_driver_api_trace_cbid as D, CUpti_runtime_api_trace_cbid as R,
};
use infertap::gpu::cupti::{CuptiReceiver, DetailLevel, ReceiverConfig};
use infertap::gpu::launches::{LaunchApiCall, LaunchJoinConfig, LaunchJoiner};
use infertap::gpu::timeline::{monotonic_now_ns, GpuActivity, GpuActivityKind, SyncKind};
use libloading::{Library, Symbol};

const KERNEL: i32 = 10;
const MEMCPY: i32 = 1;
const MEMSET: i32 = 2;
const SYNC: i32 = 38;
const GRAPH: i32 = 51;

const DRIVER: i32 = 1;
const RUNTIME: i32 = 2;

fn build_fake_cupti() -> PathBuf {
    fake_cupti::build(
        &std::env::temp_dir().join(format!("infertap-fake-cupti-{}", std::process::id())),
    )
}

fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: plain bytes of a repr(C) CUPTI struct.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()).to_vec() }
}

struct Fake {
    lib: Library,
}

impl Fake {
    fn f<T: Copy>(&self, name: &str) -> T {
        // SAFETY: the fixture's exported hooks, called with their C signatures.
        unsafe { *self.lib.get::<T>(name.as_bytes()).unwrap() }
    }
    fn enabled(&self, kind: i32) -> bool {
        self.f::<extern "C" fn(i32) -> i32>("fake_cupti_enabled")(kind) == 1
    }
    fn push(&self, rec: &[u8]) {
        let push = self.f::<extern "C" fn(*const u8, usize) -> i32>("fake_cupti_push");
        assert_eq!(push(rec.as_ptr(), rec.len()), 0);
    }
    fn deliver(&self) -> i32 {
        self.f::<extern "C" fn() -> i32>("fake_cupti_deliver")()
    }
    fn callback_enabled(&self, domain: i32, cbid: u32) -> bool {
        self.f::<extern "C" fn(i32, u32) -> i32>("fake_cupti_callback_enabled")(domain, cbid) == 1
    }
    /// One launch call made by this thread (sleeping `call_us` inside it) that runs a kernel of
    /// `ns`; returns its correlation id.
    fn launch(
        &self,
        domain: i32,
        cbid: u32,
        ns: u64,
        name: &CString,
        call_us: i64,
        result: i32,
    ) -> u32 {
        self.f::<extern "C" fn(i32, u32, u64, *const c_char, i64, i32) -> u32>("fake_cupti_launch")(
            domain,
            cbid,
            ns,
            name.as_ptr(),
            call_us,
            result,
        )
    }
    fn graph_launch(&self, cbid: u32, graph_id: u32, nodes: &[u64]) -> u32 {
        self.f::<extern "C" fn(i32, u32, u32, i32, *const u64) -> u32>("fake_cupti_graph_launch")(
            RUNTIME,
            cbid,
            graph_id,
            nodes.len() as i32,
            nodes.as_ptr(),
        )
    }
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn recv_n(rx: &mut tokio::sync::mpsc::Receiver<GpuActivity>, n: usize) -> Vec<GpuActivity> {
    let mut got = Vec::new();
    while got.len() < n {
        let a = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("activities arrive")
            .expect("channel open");
        got.push(a);
    }
    got
}

fn kernel(name: &CString, ctx: u32, dev: u32, start: u64, dur: u64, corr: u32) -> Vec<u8> {
    // SAFETY: zeroed plain C struct.
    let mut k: sys::CUpti_ActivityKernel9 = unsafe { std::mem::zeroed() };
    k.kind = sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;
    k.start = start;
    k.end = start + dur;
    k.deviceId = dev;
    k.contextId = ctx;
    k.streamId = 7;
    k.gridX = 64;
    k.gridY = 1;
    k.gridZ = 1;
    k.blockX = 256;
    k.blockY = 1;
    k.blockZ = 1;
    k.correlationId = corr;
    k.name = name.as_ptr();
    bytes_of(&k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_library_streams_activity_to_the_agent() {
    let fake_path = build_fake_cupti();
    // SAFETY: our own fixture.
    let fake = Fake {
        lib: unsafe { Library::new(&fake_path) }.unwrap(),
    };
    let offset: u64 = fake.f::<extern "C" fn() -> u64>("fake_cupti_offset_ns")();

    let sock = std::env::temp_dir()
        .join(format!("infertap-fake-cupti-{}", std::process::id()))
        .join("agent.sock");
    let cfg = ReceiverConfig {
        socket_path: sock.clone(),
        ..ReceiverConfig::default()
    };
    let (receiver, mut rx) = CuptiReceiver::bind(cfg.clone()).unwrap();

    // What a server started with CUDA_INJECTION64_PATH would see. Only this test runs in this
    // process, so setting the environment is race-free.
    std::env::set_var("INFERTAP_CUPTI_LIB", &fake_path);
    std::env::set_var("INFERTAP_CUPTI_SOCKET", &sock);
    std::env::remove_var("INFERTAP_CUPTI_DETAIL");
    let so = cupti_lib::cdylib();
    // SAFETY: our own library.
    let inject = unsafe { Library::new(&so) }.unwrap();
    // SAFETY: exported C signatures.
    let init: Symbol<extern "C" fn() -> i32> =
        unsafe { inject.get(b"InitializeInjection") }.unwrap();
    let state: Symbol<extern "C" fn() -> i32> =
        unsafe { inject.get(b"infertap_cupti_state") }.unwrap();
    assert_eq!(init(), 1);
    assert_eq!(state(), 1, "active with (fake) libcupti");

    // Full detail by default: node-level kinds on, graph-level off.
    for k in [KERNEL, MEMCPY, MEMSET, SYNC] {
        assert!(fake.enabled(k), "kind {k} enabled");
    }
    assert!(!fake.enabled(GRAPH));

    // The buffer pool is fixed: CUPTI asking for 20 buffers at once gets 8, then they all return.
    assert_eq!(
        fake.f::<extern "C" fn(i32) -> i32>("fake_cupti_hoard")(20),
        8
    );

    wait_for("library connects", Duration::from_secs(5), || {
        receiver.stats().connections_active.load(Relaxed) == 1
    })
    .await;

    // CUPTI-domain times for "now" on the monotonic clock.
    let base_mono = monotonic_now_ns();
    let base = base_mono + offset;
    let name = CString::new("attn_fwd_kernel").unwrap();
    fake.push(&kernel(&name, 7, 1, base, 30_000, 1));
    fake.push(&kernel(&name, 7, 1, base + 40_000, 25_000, 2));
    // SAFETY: zeroed plain C structs.
    let mut m: sys::CUpti_ActivityMemcpy6 = unsafe { std::mem::zeroed() };
    m.kind = sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_MEMCPY;
    m.copyKind = sys::CUpti_ActivityMemcpyKind::CUPTI_ACTIVITY_MEMCPY_KIND_DTOH as u8;
    m.bytes = 65536;
    m.start = base + 70_000;
    m.end = base + 80_000;
    m.deviceId = 1;
    m.contextId = 7;
    m.streamId = 7;
    m.correlationId = 3;
    fake.push(&bytes_of(&m));
    let mut y: sys::CUpti_ActivitySynchronization2 = unsafe { std::mem::zeroed() };
    y.kind = sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_SYNCHRONIZATION;
    y.type_ = sys::CUpti_ActivitySynchronizationType::CUPTI_ACTIVITY_SYNCHRONIZATION_TYPE_STREAM_SYNCHRONIZE;
    y.start = base + 60_000;
    y.end = base + 80_500;
    y.contextId = 7;
    y.streamId = 7;
    y.correlationId = 4;
    fake.push(&bytes_of(&y));
    assert_eq!(fake.deliver(), 4);

    let got = recv_n(&mut rx, 4).await;
    let pid = std::process::id();
    assert!(got.iter().all(|a| a.pid == pid));
    let (k1, k2, mc, sy) = (&got[0], &got[1], &got[2], &got[3]);
    assert_eq!(k1.name.as_deref(), Some("attn_fwd_kernel"));
    assert_eq!(k2.name.as_deref(), Some("attn_fwd_kernel"));
    assert!(
        std::sync::Arc::ptr_eq(k1.name.as_ref().unwrap(), k2.name.as_ref().unwrap()),
        "one name, interned once"
    );
    // Mapped onto CLOCK_MONOTONIC: the offset is measured, so allow a small error; durations
    // and spacing are exact.
    let err = k1.start_ns.abs_diff(base_mono);
    assert!(
        err < 200_000,
        "start maps to monotonic within 200 µs, off by {err} ns"
    );
    assert_eq!(k1.duration_ns(), 30_000);
    assert_eq!(k2.start_ns - k1.start_ns, 40_000);
    assert!(matches!(
        k1.kind,
        GpuActivityKind::Kernel {
            grid: [64, 1, 1],
            block: [256, 1, 1],
            ..
        }
    ));
    assert_eq!(
        (k1.device, k1.context, k1.stream, k1.correlation_id),
        (1, 7, 7, 1)
    );
    assert!(matches!(
        mc.kind,
        GpuActivityKind::Memcpy { bytes: 65536, .. }
    ));
    assert_eq!(
        sy.kind,
        GpuActivityKind::Sync {
            kind: SyncKind::Stream
        }
    );
    assert_eq!(sy.device, 1, "sync device resolved from its context");

    // Manual flushing (this fake has no cuptiActivityFlushPeriod) and stats reach the agent.
    wait_for("stats", Duration::from_secs(5), || {
        receiver
            .inject_stats()
            .get(&pid)
            .is_some_and(|s| s.records == 4)
    })
    .await;
    let st = receiver.inject_stats()[&pid];
    assert_eq!(st.buffers_exhausted, 12);
    assert_eq!((st.queue_full, st.panics, st.bad_records), (0, 0, 0));
    assert!(fake.f::<extern "C" fn() -> u32>("fake_cupti_flushes")() > 0);

    // The agent switches detail: graph-level tracing on (this fake accepts node kinds alongside,
    // for work outside graphs).
    receiver.set_detail(DetailLevel::Graphs);
    wait_for("graph mode", Duration::from_secs(5), || {
        fake.enabled(GRAPH) && fake.enabled(KERNEL) && fake.enabled(SYNC)
    })
    .await;
    wait_for("graph mode reported", Duration::from_secs(5), || {
        receiver
            .inject_stats()
            .get(&pid)
            .is_some_and(|s| s.detail == 1)
    })
    .await;
    receiver.set_detail(DetailLevel::Full);
    wait_for("full mode", Duration::from_secs(5), || {
        fake.enabled(KERNEL) && !fake.enabled(GRAPH)
    })
    .await;
    // Where CUPTI refuses graph tracing, the library stays on full detail and says so.
    fake.f::<extern "C" fn(i32)>("fake_cupti_refuse_graph")(1);
    receiver.set_detail(DetailLevel::Graphs);
    wait_for("refusal reported", Duration::from_secs(5), || {
        receiver
            .inject_stats()
            .get(&pid)
            .is_some_and(|s| s.cupti_errors >= 1 && s.detail == 2)
    })
    .await;
    assert!(fake.enabled(KERNEL) && !fake.enabled(GRAPH));

    // The agent goes away: delivering records must neither block nor crash the host.
    drop(receiver);
    drop(rx);
    fake.push(&kernel(&name, 7, 1, base + 100_000, 1_000, 5));
    let t = Instant::now();
    assert_eq!(fake.deliver(), 1);
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "delivery blocked {:?}",
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(), 1);

    // A restarted agent gets the library back, with names defined again on the new connection.
    let (mut receiver, mut rx) = CuptiReceiver::bind(cfg).unwrap();
    let mut launches = receiver.take_launches().unwrap();
    wait_for("reconnect", Duration::from_secs(5), || {
        receiver.stats().connections_active.load(Relaxed) == 1
    })
    .await;
    fake.push(&kernel(&name, 7, 1, base + 200_000, 1_000, 6));
    assert_eq!(fake.deliver(), 1);
    let got = recv_n(&mut rx, 1).await;
    assert_eq!(got[0].name.as_deref(), Some("attn_fwd_kernel"));
    assert_eq!(got[0].correlation_id, 6);
    assert_eq!(receiver.stats().unknown_names.load(Relaxed), 0);

    // ---- Launch callbacks ----
    // Full detail: every kernel and graph launch function has its callback on, nothing else.
    let cbids = [
        (DRIVER, D::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel as u32),
        (
            DRIVER,
            D::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel_ptsz as u32,
        ),
        (DRIVER, D::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernelEx as u32),
        (
            DRIVER,
            D::CUPTI_DRIVER_TRACE_CBID_cuLaunchCooperativeKernel_ptsz as u32,
        ),
        (
            RUNTIME,
            R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernel_v7000 as u32,
        ),
        (
            RUNTIME,
            R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernelExC_v11060 as u32,
        ),
        (
            RUNTIME,
            R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchCooperativeKernel_v9000 as u32,
        ),
    ];
    let graph_cbids = [
        (DRIVER, D::CUPTI_DRIVER_TRACE_CBID_cuGraphLaunch as u32),
        (DRIVER, D::CUPTI_DRIVER_TRACE_CBID_cuGraphLaunch_ptsz as u32),
        (
            RUNTIME,
            R::CUPTI_RUNTIME_TRACE_CBID_cudaGraphLaunch_v10000 as u32,
        ),
        (
            RUNTIME,
            R::CUPTI_RUNTIME_TRACE_CBID_cudaGraphLaunch_ptsz_v10000 as u32,
        ),
    ];
    for &(d, c) in cbids.iter().chain(&graph_cbids) {
        assert!(fake.callback_enabled(d, c), "callback {d}/{c} on");
    }
    let cu_memcpy = D::CUPTI_DRIVER_TRACE_CBID_cuMemcpyHtoD_v2 as u32;
    assert!(!fake.callback_enabled(DRIVER, cu_memcpy), "not a launch");

    // Launches made on a thread of this process: its tid, its call's time. From here on the
    // fake's emulated GPU runs, and its worker delivers the kernel records.
    let cuda_launch = R::CUPTI_RUNTIME_TRACE_CBID_cudaLaunchKernel_v7000 as u32;
    let cu_launch = D::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel as u32;
    let cuda_graph = R::CUPTI_RUNTIME_TRACE_CBID_cudaGraphLaunch_v10000 as u32;
    let gemm = CString::new("gemm_kernel").unwrap();
    let (tid, before, after, ids) = std::thread::scope(|s| {
        s.spawn(|| {
            let before = monotonic_now_ns();
            let a = fake.launch(RUNTIME, cuda_launch, 25_000, &gemm, 2_000, 0);
            let b = fake.launch(DRIVER, cu_launch, 4_321, &gemm, 0, 0);
            let failed = fake.launch(DRIVER, cu_launch, 0, &gemm, 0, 1);
            let g = fake.graph_launch(cuda_graph, 3, &[5_000, 7_000]);
            (gettid(), before, monotonic_now_ns(), [a, b, failed, g])
        })
        .join()
        .unwrap()
    });
    assert_ne!(tid, gettid());
    let mut calls: Vec<LaunchApiCall> = Vec::new();
    while calls.len() < 3 {
        calls.push(
            tokio::time::timeout(Duration::from_secs(5), launches.recv())
                .await
                .expect("launch records arrive")
                .unwrap(),
        );
    }
    let pid = std::process::id();
    assert_eq!(
        calls.iter().map(|c| c.correlation_id).collect::<Vec<_>>(),
        vec![ids[0], ids[1], ids[3]],
        "the failed launch enqueued nothing and is not recorded"
    );
    for c in &calls {
        assert_eq!((c.pid, c.tid), (pid, tid), "{c:?}");
        assert!(
            before <= c.start_ns && c.start_ns <= c.end_ns && c.end_ns <= after,
            "{c:?}"
        );
        assert!(!c.nested);
    }
    assert!(
        calls[0].end_ns - calls[0].start_ns >= 2_000_000,
        "the 2 ms call"
    );
    // Each call's window reaches back to where the thread's previous launch call returned (the
    // failed one included), the first to when launch tracing began.
    assert!(
        calls[0].after_ns > 0 && calls[0].after_ns < before,
        "{:?}",
        calls[0]
    );
    assert_eq!(calls[1].after_ns, calls[0].end_ns);
    assert!(calls[2].after_ns > calls[1].end_ns && calls[2].after_ns <= calls[2].start_ns);
    assert_eq!(
        calls.iter().map(|c| c.graph).collect::<Vec<_>>(),
        vec![false, false, true]
    );
    // Their kernels: one each, two nodes for the graph, all under the launches' ids.
    let work = recv_n(&mut rx, 4).await;
    let mut joiner = LaunchJoiner::new(LaunchJoinConfig::default());
    let now = monotonic_now_ns();
    for c in &calls {
        joiner.add_launch(*c, now);
    }
    for a in &work {
        assert!(matches!(a.kind, GpuActivityKind::Kernel { .. }));
        joiner.add_work(
            a.pid,
            a.correlation_id,
            a.duration_ns(),
            a.name.clone(),
            false,
            now,
        );
    }
    joiner.poll(now + LaunchJoinConfig::default().graph_settle_ns);
    let timings = joiner.take();
    let by_start: Vec<(u64, u64, Option<&str>)> = timings
        .iter()
        .map(|t| (t.api_start_ns, t.gpu_ns, t.kernel.as_deref()))
        .collect();
    assert_eq!(
        by_start,
        vec![
            (calls[0].start_ns, 25_000, Some("gemm_kernel")),
            (calls[1].start_ns, 4_321, Some("gemm_kernel")),
            (calls[2].start_ns, 12_000, None),
        ],
        "GPU time per launch"
    );
    assert!(timings.iter().all(|t| t.tid == tid && t.pid == pid));
    wait_for("launch stats", Duration::from_secs(5), || {
        receiver
            .inject_stats()
            .get(&pid)
            .is_some_and(|s| s.launches == 3 && s.launch_tracing == 1)
    })
    .await;
    let st = receiver.inject_stats()[&pid];
    assert_eq!((st.launches_ring_full, st.panics), (0, 0));

    // Off: no callbacks, no records; graphs: graph launches (and kernel launches, since this
    // CUPTI accepts kernel records alongside graph tracing).
    receiver.set_detail(DetailLevel::Off);
    wait_for("callbacks off", Duration::from_secs(5), || {
        !fake.callback_enabled(RUNTIME, cuda_launch) && !fake.callback_enabled(RUNTIME, cuda_graph)
    })
    .await;
    wait_for("off reported", Duration::from_secs(5), || {
        receiver
            .inject_stats()
            .get(&pid)
            .is_some_and(|s| s.launch_tracing == 0 && s.detail == 0)
    })
    .await;
    fake.launch(RUNTIME, cuda_launch, 1_000, &gemm, 0, 0);
    receiver.set_detail(DetailLevel::Graphs);
    wait_for("graph mode", Duration::from_secs(5), || {
        fake.callback_enabled(RUNTIME, cuda_graph) && fake.callback_enabled(RUNTIME, cuda_launch)
    })
    .await;
    fake.f::<extern "C" fn(i32)>("fake_cupti_refuse_graph")(0);
    receiver.set_detail(DetailLevel::Full);
    receiver.set_detail(DetailLevel::Graphs);
    wait_for("graph tracing on", Duration::from_secs(5), || {
        fake.enabled(GRAPH)
    })
    .await;
    let g = fake.graph_launch(cuda_graph, 4, &[1_000, 2_000, 3_000]);
    let l = tokio::time::timeout(Duration::from_secs(5), launches.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (l.correlation_id, l.graph),
        (g, true),
        "nothing recorded while off"
    );
    // One graph-trace record for the whole graph.
    let a = recv_n(&mut rx, 1).await.remove(0);
    assert_eq!(a.kind, GpuActivityKind::Graph { graph_id: 4 });
    assert_eq!((a.correlation_id, a.duration_ns()), (g, 6_000));
    joiner.add_launch(l, now);
    joiner.add_work(a.pid, a.correlation_id, a.duration_ns(), None, true, now);
    assert_eq!(joiner.take()[0].gpu_ns, 6_000);
}
