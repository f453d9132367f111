//! Per-connection byte streams → HTTP/1.1 exchanges → [`RequestRecord`]s.
//!
//! Contract (used by `pipeline`):
//! - `Reconstructor::on_event(&ConnEvent, &mut Vec<RequestRecord>)` consumes events in kernel order
//!   and pushes every exchange that completed (normally or not).
//! - `on_process_exit(pid, ts, out)` ends that process's connections (`RequestError::ProcessExit`).
//! - `expire_idle(now_ns, out)` bounds memory for connections that went silent.
//! - `in_flight()` gives the running/waiting gauges; `stats()` the counted drops.
// Filled in by the reconstruction work (see protocol::{http, sse, openai}).
