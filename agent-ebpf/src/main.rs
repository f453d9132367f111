//! infertap's eBPF programs.
//!
//! `sockets`: syscall tracepoints that follow the connections accepted by the traced processes
//! and stream what they read and write to user space through one ring buffer.
//! `arrival`: TCP tracepoints that stamp when a request's bytes reached a traced socket, before
//! the server read them (accept-queue and receive-buffer waits).
//! `cuda`: uprobes on the CUDA driver/runtime launch paths, aggregated in the kernel.
//! `profile`: stack samples (on-CPU timer, off-CPU switches, CUDA launch sites) with the Python
//! frame walker, streamed through their own ring buffer.
#![no_std]
#![no_main]
// The CUDA launch sampler's per-CPU busy flag needs a compare-and-swap, which
// `core::sync::atomic` does not offer on the BPF target.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod arrival;
mod cuda;
mod profile;
mod sockets;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it exists only to satisfy no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
