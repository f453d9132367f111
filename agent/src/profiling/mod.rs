//! The profiler: stack samples of the traced process trees (on-CPU timer samples, off-CPU
//! switch-outs, CUDA launch sites) from the kernel's sample ring, turned into per-interval
//! profiles and per-token-gap attributions.
//!
//! ```text
//! probes::profile (source)   perf_event cpu-clock, sched_switch, CUDA launch uprobes → SAMPLES ring
//!   stack     (transform)    unwound native frames + resolved Python frames → interned RawStack
//!   offcpu    (transform)    switch-out ↔ switch-in pairing, exact per-interval accounting
//!   labels    (transform)    process role, thread name, model, process tree
//!   aggregate (transform)    (stack, labels) → count, ns per profile type per interval
//!   attribution (transform)  recent samples ↔ completed requests' slow token gaps
//! sinks::pprof (sink)        symbolized, Python-merged pprof per interval → collector, files
//! ```
//!
//! Everything here runs on the profiler's own thread, never on the socket-event drain, so a
//! burst of samples or a slow symbolization cannot delay token timing.

pub mod aggregate;
pub mod attribution;
pub mod labels;
pub mod offcpu;
pub mod stack;
pub mod stage;
pub mod symbolic;
