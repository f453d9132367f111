//! CPython 3.10–3.13 frames for the profiler (x86-64 Linux).
//!
//! The kernel walks a sampled thread's Python frames with a per-process [`PyProc`] and emits,
//! innermost first, one [`PyFrame`] `{ code object address | entry mark, instruction }` per
//! frame. This module is everything in user space around that walk:
//!
//! - [`discover`]: pid → [`discover::PythonProcess`] (version, main interpreter, `PyCode_Type`,
//!   the offset table) → the [`PyProc`] for the kernel, or a counted reason why not.
//! - [`offsets`]: the per-version field offsets, verified against each interpreter's headers
//!   (and, for 3.13, against the running interpreter's `_Py_DebugOffsets`).
//! - [`code`]: `(pid, PyFrame)` → function (qualified name, file, first line) and line, cached
//!   per code object; [`functions`] interns functions into small ids; [`linetable`] decodes
//!   `co_linetable` (3.10 and 3.11+ formats).
//! - [`merge`]: a native stack plus the resolved Python frames → one stack, the eval loop's
//!   native frames replaced by the Python frames they ran.
//! - [`walk`] (with [`stop`] and [`mem`]): a user-space walker with the kernel walker's exact
//!   semantics, the reference for the eBPF walker's tests and a debugging aid. Not used on the
//!   profiling path.
//!
//! # Using it
//!
//! ```text
//! new process  → discover(pid) → Ok(p): PY_PROCS[pid] = p.py_proc(); resolver.add_process(&p)
//!                               Err(e): count e.reason(); retry later if e.is_transient()
//! each sample  → for f in python frames: resolver.resolve(pid, f) → PyLocation
//!                merge::merge(native names, entry marks) → one leaf-first stack
//! process exit → resolver.forget_process(pid); remove PY_PROCS[pid]
//! ```
//!
//! [`PyProc`]: infertap_common::profile::PyProc
//! [`PyFrame`]: infertap_common::profile::PyFrame

pub mod code;
pub mod discover;
pub mod functions;
pub mod linetable;
pub mod mem;
pub mod merge;
pub mod offsets;
pub mod stop;
pub mod walk;

pub use code::{PyLocation, ResolveError, Resolver};
pub use discover::{discover, DiscoverError, PyVersion, PythonProcess};
pub use functions::{Function, FunctionId, FunctionTable};
