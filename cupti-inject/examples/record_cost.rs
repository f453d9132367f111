//! Cost of the injection library's own work:
//! - per CUPTI activity record: decoding a record from a completed CUPTI buffer and encoding it
//!   into the wire batch for the agent (what runs in the buffer-completed callback, off the CUDA
//!   threads);
//! - per launch, on the launching thread: the entry and exit launch callbacks (two clock reads,
//!   the cached thread id, one push into the lock-free ring), with 1 and 2 threads launching at
//!   once while a sender thread drains the ring (sized so that nothing is dropped: drops are
//!   cheaper than pushes and would flatter the figure). Run it on a machine with at least 3
//!   idle cores, or the threads share CPUs and the 2-thread figure measures the scheduler.
//!
//! CUPTI's own cost of producing records and dispatching callbacks is not included (no GPU here).
//!
//! `cargo run --release -p infertap-cupti --example record_cost`

use std::{
    hint::black_box,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use cudarc::cupti::sys;
use infertap_cupti::{
    launches::{monotonic_ns, record_api, LaunchRing, RING_CAPACITY},
    records::decode_record,
    wire::{encode_frame, Frame},
};

const DRIVER: u32 = sys::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API as u32;
const CU_LAUNCH_KERNEL: u32 =
    sys::CUpti_driver_api_trace_cbid::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel as u32;

/// One launch's two callbacks, as CUPTI makes them (entry, then exit with the same slot).
fn one_launch(ring: &LaunchRing, corr: u32) {
    let mut slot = 0u64;
    let mut ret = 0i32;
    // SAFETY: a plain C struct; all-zero is valid (null pointers, site ENTER).
    let mut d: sys::CUpti_CallbackData = unsafe { std::mem::zeroed() };
    d.correlationId = corr;
    d.correlationData = &mut slot;
    d.functionReturnValue = (&mut ret as *mut i32).cast();
    let p = (&d as *const sys::CUpti_CallbackData).cast();
    // SAFETY: valid callback data for both calls.
    unsafe { record_api(ring, monotonic_ns(), DRIVER, CU_LAUNCH_KERNEL, black_box(p)) };
    d.callbackSite = sys::CUpti_ApiCallbackSite::CUPTI_API_EXIT;
    let p = (&d as *const sys::CUpti_CallbackData).cast();
    unsafe { record_api(ring, monotonic_ns(), DRIVER, CU_LAUNCH_KERNEL, black_box(p)) };
}

/// Best ns per launch over a few rounds of `per_thread` launches on each of `threads` threads,
/// with one sender thread draining the ring meanwhile. Returns (ns per launch, drops).
fn launch_cost(threads: u32, per_thread: u32) -> (f64, u64) {
    let mut best = f64::MAX;
    let mut drops = 0;
    for _ in 0..5 {
        let ring = LaunchRing::new((threads * per_thread) as usize);
        let stop = AtomicBool::new(false);
        let per_launch = std::thread::scope(|s| {
            s.spawn(|| {
                let mut v = Vec::with_capacity(16 * 1024);
                while !stop.load(Ordering::Relaxed) {
                    v.clear();
                    ring.drain_into(&mut v, 16 * 1024);
                    black_box(&v);
                    if v.is_empty() {
                        std::thread::yield_now();
                    }
                }
            });
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let ring = &ring;
                    s.spawn(move || {
                        let t0 = Instant::now();
                        for i in 0..per_thread {
                            one_launch(ring, t * per_thread + i);
                        }
                        t0.elapsed().as_nanos() as f64 / per_thread as f64
                    })
                })
                .collect();
            let worst = hs
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold(0.0, f64::max);
            stop.store(true, Ordering::Relaxed);
            worst
        });
        best = best.min(per_launch);
        drops += ring.counters.ring_full.load(Ordering::Relaxed);
    }
    (best, drops)
}

fn clock_pair_cost() -> f64 {
    const N: u32 = 1_000_000;
    let t0 = Instant::now();
    for _ in 0..N {
        black_box(monotonic_ns());
        black_box(monotonic_ns());
    }
    t0.elapsed().as_nanos() as f64 / N as f64
}

fn kernel_record(i: u64, name: *const std::ffi::c_char) -> Vec<u8> {
    // SAFETY: CUPTI records are plain C structs; all-zero is a valid value.
    let mut k: sys::CUpti_ActivityKernel9 = unsafe { std::mem::zeroed() };
    k.kind = sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;
    k.start = 1_000_000 + i * 10_000;
    k.end = k.start + 7_000;
    k.deviceId = (i % 8) as u32;
    k.streamId = 7;
    k.correlationId = i as u32;
    k.gridX = 108;
    k.blockX = 128;
    k.name = name;
    // SAFETY: reading the struct's bytes.
    unsafe {
        std::slice::from_raw_parts(
            (&k as *const sys::CUpti_ActivityKernel9).cast::<u8>(),
            std::mem::size_of_val(&k),
        )
    }
    .to_vec()
}

fn main() {
    let name = std::ffi::CString::new("void gemm_kernel<128, 128>(float const*, float*)").unwrap();
    const N: usize = 200_000;
    let records: Vec<Vec<u8>> = (0..N as u64)
        .map(|i| kernel_record(i, name.as_ptr()))
        .collect();
    let mut out = Vec::with_capacity(N * 96);
    let mut batch = Vec::with_capacity(1024);
    let mut best = f64::MAX;
    for _ in 0..5 {
        out.clear();
        let t0 = Instant::now();
        for r in &records {
            let d = decode_record(black_box(r)).expect("valid record");
            batch.push(d.activity);
            if batch.len() == 1024 {
                encode_frame(&Frame::Activities(std::mem::take(&mut batch)), &mut out);
            }
        }
        encode_frame(&Frame::Activities(std::mem::take(&mut batch)), &mut out);
        best = best.min(t0.elapsed().as_nanos() as f64 / N as f64);
        black_box(&out);
    }
    println!("{{\"records\": {N}, \"ns_per_record_decode_and_encode\": {best:.1}, \"wire_bytes_per_record\": {:.1}}}", out.len() as f64 / N as f64);

    let clocks = clock_pair_cost();
    let (one, one_drops) = launch_cost(1, 1_000_000);
    let (two, two_drops) = launch_cost(2, 500_000);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "{{\"ns_per_launch_callbacks_1_thread\": {one:.1}, \"ns_per_launch_callbacks_2_threads\": {two:.1}, \"of_which_two_clock_reads\": {clocks:.1}, \"drops\": {}, \"cores\": {cores}, \"ring_bytes\": {}, \"wire_bytes_per_launch\": {}}}",
        one_drops + two_drops,
        RING_CAPACITY * (std::mem::size_of::<infertap_cupti::wire::Launch>() + std::mem::size_of::<usize>()),
        infertap_cupti::wire::LAUNCH_LEN
    );
}
