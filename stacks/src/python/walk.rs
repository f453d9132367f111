//! A user-space Python frame walker with exactly the kernel walker's semantics: the reference
//! implementation its tests compare against, and a debugging aid (`walk` a stopped process and
//! see what the kernel should have emitted). It is not on the production path: the profiler's
//! Python frames come from the kernel.
//!
//! # The walk, step by step (what the eBPF walker must do)
//!
//! Input: the sampled task's tid and fs base (`task->thread.fsbase`), and the process's
//! [`PyProc`] `p` (`o` = `p.offsets`). All reads are 8-byte little-endian pointers unless said;
//! any failed read stops the walk with `PY_ERROR`, keeping the frames already emitted.
//!
//! 1. **Thread.** `key` = fs base if `p.flags & THREAD_ID_IS_PTHREAD` (3.10), else the tid.
//!    `ts = *(p.interp + o.interp_threads_head)`; up to `MAX_PY_THREADS` times: if `ts == 0`
//!    stop with `PY_NO_THREAD`; if `*(ts + o.tstate_native_thread_id) == key` (8 bytes, zero-
//!    extended tid) the thread is found; else `ts = *(ts + o.tstate_next)`. Not found after
//!    `MAX_PY_THREADS` states: `PY_NO_THREAD`. (A cache tid → ts is fine as long as a hit is
//!    re-validated by the same id comparison.)
//! 2. **Leaf frame.** `f = *(ts + o.tstate_frame)`; if `o.cframe_current_frame != NONE` and
//!    `f != 0`: `f = *(f + o.cframe_current_frame)` (3.11/3.12 `cframe->current_frame`).
//! 3. **Frames**, at most `2 * MAX_PY_FRAMES` visits, innermost first, while `f != 0`:
//!    - If `o.frame_owner != NONE` and `p.owner_cstack != 0xff`: `owner = *(u8*)(f +
//!      o.frame_owner)`; if `owner == p.owner_cstack` (a C-stack shim, 3.12+): set
//!      `PY_FRAME_ENTRY` on the last *emitted* frame (if any), `f = *(f + o.frame_previous)`,
//!      continue (the shim is not emitted).
//!    - `code = *(f + o.frame_code)`.
//!    - If `p.code_type != 0`: `if *(code + o.object_type) != p.code_type` skip this frame
//!      (not emitted, no mark): `f = *(f + o.frame_previous)`, continue.
//!    - If `MAX_PY_FRAMES` frames were already emitted: set `PY_TRUNCATED`, stop.
//!    - `instr`: if `p.flags & LASTI_IS_INT`, the 4 bytes at `f + o.frame_instr` zero-extended
//!      (3.10 `f_lasti`, may be `-1` = `0xffff_ffff`); else the pointer at `f + o.frame_instr`.
//!    - entry: 3.10 (`p.version < 0x030b`): always; 3.11 (`o.frame_is_entry != NONE`):
//!      `*(u8*)(f + o.frame_is_entry) != 0`; 3.12+: set later by a shim (above).
//!    - emit `PyFrame { code: code | (entry ? PY_FRAME_ENTRY : 0), instr }`;
//!      `f = *(f + o.frame_previous)`.
//!
//!    If the visit budget runs out with `f != 0`: `PY_TRUNCATED`.
//!
//! Reads are from the running process without locks: frames can be torn (a frame being pushed
//! or popped). The resolver treats every `PyFrame` as untrusted.

use infertap_common::profile::{
    py_flags, sample_flags, PyFrame, PyProc, MAX_PY_FRAMES, MAX_PY_THREADS, PY_FRAME_ENTRY,
    PY_OFFSET_NONE,
};

use super::mem::{Memory, ReadError};

/// How the kernel identifies the sampled thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadKey {
    /// Kernel thread id (matched against `native_thread_id`, 3.11+).
    pub tid: u32,
    /// The thread's fs base (matched against `thread_id`, a `pthread_t`, on 3.10). 0 when
    /// unknown: 3.10 threads then never match.
    pub fsbase: u64,
}

/// What one walk produced, as the kernel would put it in a sample.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalkOutcome {
    /// Innermost first.
    pub frames: Vec<PyFrame>,
    /// `sample_flags::PY_TRUNCATED | PY_ERROR | PY_NO_THREAD` bits.
    pub flags: u8,
    /// The thread state walked (0 when none matched).
    pub tstate: u64,
    /// The first failed read, when `flags` has `PY_ERROR`.
    pub error: Option<ReadError>,
}

/// One entry of the interpreter's thread list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadState {
    pub tstate: u64,
    /// `thread_id`: the creating thread's `pthread_t` (its fs base on x86-64).
    pub thread_id: u64,
    /// `native_thread_id` (3.11+): the kernel tid.
    pub native_thread_id: Option<u64>,
}

fn thread_matches(p: &PyProc, id: u64, key: ThreadKey) -> bool {
    if p.flags & py_flags::THREAD_ID_IS_PTHREAD != 0 {
        key.fsbase != 0 && id == key.fsbase
    } else {
        id == key.tid as u64
    }
}

/// Lists the interpreter's thread states (at most `MAX_PY_THREADS`, like the kernel), reading
/// `thread_id` at `thread_id_offset` (`Layout::tstate_thread_id`).
pub fn thread_states(
    mem: &impl Memory,
    p: &PyProc,
    thread_id_offset: u64,
) -> Result<Vec<ThreadState>, ReadError> {
    let o = &p.offsets;
    let pthread_only = p.flags & py_flags::THREAD_ID_IS_PTHREAD != 0;
    let mut out = Vec::new();
    let mut ts = mem.read_u64(p.interp + o.interp_threads_head as u64)?;
    while ts != 0 && out.len() < MAX_PY_THREADS {
        let thread_id = mem.read_u64(ts + thread_id_offset)?;
        let native_thread_id = if pthread_only {
            None
        } else {
            Some(mem.read_u64(ts + o.tstate_native_thread_id as u64)?)
        };
        out.push(ThreadState {
            tstate: ts,
            thread_id,
            native_thread_id,
        });
        ts = mem.read_u64(ts + o.tstate_next as u64)?;
    }
    Ok(out)
}

/// Step 1: the thread state of `key`, `None` if no state matches within `MAX_PY_THREADS`.
pub fn find_tstate(
    mem: &impl Memory,
    p: &PyProc,
    key: ThreadKey,
) -> Result<Option<u64>, ReadError> {
    let o = &p.offsets;
    let mut ts = mem.read_u64(p.interp + o.interp_threads_head as u64)?;
    for _ in 0..MAX_PY_THREADS {
        if ts == 0 {
            return Ok(None);
        }
        let id = mem.read_u64(ts + o.tstate_native_thread_id as u64)?;
        if thread_matches(p, id, key) {
            return Ok(Some(ts));
        }
        ts = mem.read_u64(ts + o.tstate_next as u64)?;
    }
    Ok(None)
}

/// Walks the thread `key` of a process: steps 1–3.
pub fn walk(mem: &impl Memory, p: &PyProc, key: ThreadKey) -> WalkOutcome {
    match find_tstate(mem, p, key) {
        Ok(Some(ts)) => walk_tstate(mem, p, ts),
        Ok(None) => WalkOutcome {
            flags: sample_flags::PY_NO_THREAD,
            ..Default::default()
        },
        Err(e) => WalkOutcome {
            flags: sample_flags::PY_ERROR,
            error: Some(e),
            ..Default::default()
        },
    }
}

/// Walks the frames of thread state `ts`: steps 2–3.
pub fn walk_tstate(mem: &impl Memory, p: &PyProc, ts: u64) -> WalkOutcome {
    let mut out = WalkOutcome {
        tstate: ts,
        ..Default::default()
    };
    if let Err(e) = walk_frames(mem, p, ts, &mut out) {
        out.flags |= sample_flags::PY_ERROR;
        out.error = Some(e);
    }
    out
}

fn walk_frames(
    mem: &impl Memory,
    p: &PyProc,
    ts: u64,
    out: &mut WalkOutcome,
) -> Result<(), ReadError> {
    let o = &p.offsets;
    let off = |v: u16| v as u64;
    let mut f = mem.read_u64(ts + off(o.tstate_frame))?;
    if o.cframe_current_frame != PY_OFFSET_NONE && f != 0 {
        f = mem.read_u64(f + off(o.cframe_current_frame))?;
    }
    let check_owner = o.frame_owner != PY_OFFSET_NONE && p.owner_cstack != 0xff;
    let every_frame_entry = p.version < 0x030b;
    for _ in 0..2 * MAX_PY_FRAMES {
        if f == 0 {
            return Ok(());
        }
        if check_owner && mem.read_u8(f + off(o.frame_owner))? == p.owner_cstack {
            if let Some(last) = out.frames.last_mut() {
                last.code |= PY_FRAME_ENTRY;
            }
            f = mem.read_u64(f + off(o.frame_previous))?;
            continue;
        }
        let code = mem.read_u64(f + off(o.frame_code))?;
        if p.code_type != 0 && mem.read_u64(code + off(o.object_type))? != p.code_type {
            f = mem.read_u64(f + off(o.frame_previous))?;
            continue;
        }
        if out.frames.len() == MAX_PY_FRAMES {
            out.flags |= sample_flags::PY_TRUNCATED;
            return Ok(());
        }
        let instr = if p.flags & py_flags::LASTI_IS_INT != 0 {
            mem.read_u32(f + off(o.frame_instr))? as u64
        } else {
            mem.read_u64(f + off(o.frame_instr))?
        };
        let entry = every_frame_entry
            || (o.frame_is_entry != PY_OFFSET_NONE && mem.read_u8(f + off(o.frame_is_entry))? != 0);
        out.frames.push(PyFrame {
            code: code | if entry { PY_FRAME_ENTRY } else { 0 },
            instr,
        });
        f = mem.read_u64(f + off(o.frame_previous))?;
    }
    if f != 0 {
        out.flags |= sample_flags::PY_TRUNCATED;
    }
    Ok(())
}
