//! Cost of the injection library's own work per CUPTI activity record: decoding a record from a
//! completed CUPTI buffer and encoding it into the wire batch for the agent (what runs in the
//! buffer-completed callback). CUPTI's cost of producing records is not included (no GPU here).
//!
//! `cargo run --release -p infertap-cupti --example record_cost`

use std::{hint::black_box, time::Instant};

use cudarc::cupti::sys;
use infertap_cupti::{
    records::decode_record,
    wire::{encode_frame, Frame},
};

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
}
