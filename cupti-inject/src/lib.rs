//! infertap's CUPTI injection library.
//!
//! Loaded into an unmodified CUDA process by setting `CUDA_INJECTION64_PATH` to this library:
//! libcuda dlopens it during `cuInit` and calls [`InitializeInjection`]. It enables CUPTI activity
//! tracing (kernels, memcpy, memset, synchronization; or one record per CUDA graph launch),
//! decodes completed activity buffers into a compact [`wire`] format and streams them to the
//! infertap agent over a unix socket. CUPTI callbacks on the kernel and graph launch functions
//! record which thread made each launch and when (`launches`), so that the agent can weigh its
//! sampled launch stacks by the GPU time each launch produced.
//!
//! It must never hurt the host process: memory is bounded (a fixed pool of CUPTI buffers, a bounded
//! send queue), nothing on a CUDA thread ever blocks on the agent (full queue or absent agent →
//! the batch is dropped and counted), every FFI entry point catches panics, and without libcupti
//! it does nothing at all.
//!
//! Environment:
//! - `INFERTAP_CUPTI_SOCKET`: agent socket (default `/run/infertap/cupti.sock`).
//! - `INFERTAP_CUPTI_LIB`: path of libcupti to load when it is not on the loader path (pip
//!   wheels ship it in `site-packages/nvidia/cuda_cupti/lib`).
//! - `INFERTAP_CUPTI_DETAIL`: initial detail, `full` (default), `graphs` or `off`.
//!
//! Without the default `inject` feature the crate is only the wire format (used by the agent).

pub mod wire;

#[cfg(feature = "inject")]
pub mod launches;

#[cfg(feature = "inject")]
pub mod records;

#[cfg(feature = "inject")]
mod inject;

#[cfg(feature = "inject")]
pub use inject::{infertap_cupti_state, InitializeInjection, State};
