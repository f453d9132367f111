//! Stack transforms of infertap's profiler, as pure libraries (their only I/O is reading
//! `/proc/<pid>/…` and the mapped ELF files):
//!
//! - [`unwind`]: native user stacks from a sample's registers and copied stack bytes, with DWARF
//!   CFI (`.eh_frame`, `.debug_frame`) through `framehop`, frame pointers where present; the
//!   per-process module map that normalizes addresses to (module, offset) for later
//!   symbolization.
//! - [`symbolize`]: (module, offset) and kernel addresses → demangled function names, inlined
//!   frames and source lines (`blazesym`), cached per build id, never on the sampling path.
//! - [`python`]: CPython 3.10–3.13 processes: finding the interpreter, the field offsets the
//!   kernel's frame walker needs, code objects → qualified name, file and line, and merging the
//!   Python frames into the native stack in place of the eval loop's frames.
//!
//! They sit between the sampler (a source, in the agent) and the profile builders (sinks).

pub mod python;
pub mod symbolize;
pub mod unwind;

/// User-mode registers of a sampled thread (x86-64), as the kernel captured them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}
