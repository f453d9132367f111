//! A user-space Python frame walker with exactly the kernel walker's semantics: the reference
//! implementation its tests compare against, and a debugging aid (`walk` a stopped process and
//! see what the kernel should have emitted). It is not on the production path: the profiler's
//! Python frames come from the kernel.
//!
//! # The walk, step by step (what the eBPF walker must do)
//!
//! Input: the sampled task's tid, and the process's [`PyProc`] `p` (`o` = `p.offsets`). All
//! reads are 8-byte little-endian pointers unless said, at `base + offset` in wrapping `u64`
//! arithmetic; any failed read stops the walk with `PY_ERROR`, keeping the frames already
//! emitted.
//!
//! 1. **Thread.** The thread id of a thread state `ts`: `id = *(ts +
//!    o.tstate_native_thread_id)`; with `p.flags & THREAD_ID_IS_PTHREAD` (3.10, where that is
//!    `thread_id`, a `pthread_t`) instead the 4 bytes at `id + o.pthread_tid`, zero-extended
//!    (the `tid` of glibc's `struct pthread`); if *that* read fails the state matches no thread
//!    (its thread exited) and the search goes on. `ts = *(p.interp + o.interp_threads_head)`;
//!    up to `MAX_PY_THREADS` times: if `ts == 0` stop with `PY_NO_THREAD`; if its thread id ==
//!    the tid (zero-extended) the thread is found; else `ts = *(ts + o.tstate_next)`. Not found
//!    after `MAX_PY_THREADS` states: `PY_NO_THREAD`; a failed read of the list itself:
//!    `PY_NO_THREAD | PY_ERROR`. (A cache tid → ts is fine as long as a hit is re-validated by
//!    the same comparison.) A `PyProc` with `THREAD_ID_IS_PTHREAD` but no `o.pthread_tid`
//!    matches nothing: `PY_NO_THREAD | PY_ERROR`.
//!
//!    3.10 allocates a new thread's state in the creating thread, which briefly carries the
//!    creator's `pthread_t` until the new thread starts: a sample then may find that (newer,
//!    frameless) state first and show no frames.
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
    /// `thread_id`: the thread's `pthread_t` (with glibc, the address of its `struct pthread`,
    /// which is also its fs base on x86-64).
    pub thread_id: u64,
    /// The kernel tid the walker matches: `native_thread_id` (3.11+), or (3.10) the `tid` read
    /// through `thread_id` and `PyOffsets::pthread_tid`; `None` when that `struct pthread` is
    /// unreadable (the thread exited).
    pub native_thread_id: Option<u64>,
}

/// Whether `p` matches 3.10 threads through `struct pthread` without saying where its `tid` is.
fn pthread_tid_missing(p: &PyProc) -> bool {
    p.flags & py_flags::THREAD_ID_IS_PTHREAD != 0 && p.offsets.pthread_tid == PY_OFFSET_NONE
}

/// Step 1's thread id of thread state `ts`: `Err` when `ts` is unreadable, `Ok(None)` when its
/// `struct pthread` is (3.10).
fn tstate_tid(mem: &impl Memory, p: &PyProc, ts: u64) -> Result<Option<u64>, ReadError> {
    let o = &p.offsets;
    let id = mem.read_u64(ts.wrapping_add(o.tstate_native_thread_id as u64))?;
    if p.flags & py_flags::THREAD_ID_IS_PTHREAD == 0 {
        return Ok(Some(id));
    }
    Ok(mem
        .read_u32(id.wrapping_add(o.pthread_tid as u64))
        .ok()
        .map(u64::from))
}

/// Lists the interpreter's thread states (at most `MAX_PY_THREADS`, like the kernel), reading
/// `thread_id` at `thread_id_offset` (`Layout::tstate_thread_id`).
pub fn thread_states(
    mem: &impl Memory,
    p: &PyProc,
    thread_id_offset: u64,
) -> Result<Vec<ThreadState>, ReadError> {
    let o = &p.offsets;
    let mut out = Vec::new();
    let mut ts = mem.read_u64(p.interp.wrapping_add(o.interp_threads_head as u64))?;
    while ts != 0 && out.len() < MAX_PY_THREADS {
        let thread_id = mem.read_u64(ts.wrapping_add(thread_id_offset))?;
        let native_thread_id = if pthread_tid_missing(p) {
            None
        } else {
            tstate_tid(mem, p, ts)?
        };
        out.push(ThreadState {
            tstate: ts,
            thread_id,
            native_thread_id,
        });
        ts = mem.read_u64(ts.wrapping_add(o.tstate_next as u64))?;
    }
    Ok(out)
}

/// Why step 1 found no thread state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FindError {
    /// Reading the thread list failed.
    Read(ReadError),
    /// The `PyProc` cannot tell threads apart (`THREAD_ID_IS_PTHREAD` without `pthread_tid`).
    NoThreadIds,
}

/// Step 1: the thread state of kernel thread `tid`, `None` if no state matches within
/// `MAX_PY_THREADS`.
pub fn find_tstate(mem: &impl Memory, p: &PyProc, tid: u32) -> Result<Option<u64>, FindError> {
    if pthread_tid_missing(p) {
        return Err(FindError::NoThreadIds);
    }
    let o = &p.offsets;
    let mut ts = mem
        .read_u64(p.interp.wrapping_add(o.interp_threads_head as u64))
        .map_err(FindError::Read)?;
    for _ in 0..MAX_PY_THREADS {
        if ts == 0 {
            return Ok(None);
        }
        if tstate_tid(mem, p, ts).map_err(FindError::Read)? == Some(tid as u64) {
            return Ok(Some(ts));
        }
        ts = mem
            .read_u64(ts.wrapping_add(o.tstate_next as u64))
            .map_err(FindError::Read)?;
    }
    Ok(None)
}

/// Walks kernel thread `tid` of a process: steps 1–3.
pub fn walk(mem: &impl Memory, p: &PyProc, tid: u32) -> WalkOutcome {
    match find_tstate(mem, p, tid) {
        Ok(Some(ts)) => walk_tstate(mem, p, ts),
        Ok(None) => WalkOutcome {
            flags: sample_flags::PY_NO_THREAD,
            ..Default::default()
        },
        Err(FindError::Read(e)) => WalkOutcome {
            flags: sample_flags::PY_NO_THREAD | sample_flags::PY_ERROR,
            error: Some(e),
            ..Default::default()
        },
        Err(FindError::NoThreadIds) => WalkOutcome {
            flags: sample_flags::PY_NO_THREAD | sample_flags::PY_ERROR,
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
    let mut f = mem.read_u64(ts.wrapping_add(off(o.tstate_frame)))?;
    if o.cframe_current_frame != PY_OFFSET_NONE && f != 0 {
        f = mem.read_u64(f.wrapping_add(off(o.cframe_current_frame)))?;
    }
    let check_owner = o.frame_owner != PY_OFFSET_NONE && p.owner_cstack != 0xff;
    let every_frame_entry = p.version < 0x030b;
    for _ in 0..2 * MAX_PY_FRAMES {
        if f == 0 {
            return Ok(());
        }
        if check_owner && mem.read_u8(f.wrapping_add(off(o.frame_owner)))? == p.owner_cstack {
            if let Some(last) = out.frames.last_mut() {
                last.code |= PY_FRAME_ENTRY;
            }
            f = mem.read_u64(f.wrapping_add(off(o.frame_previous)))?;
            continue;
        }
        let code = mem.read_u64(f.wrapping_add(off(o.frame_code)))?;
        if p.code_type != 0 && mem.read_u64(code.wrapping_add(off(o.object_type)))? != p.code_type {
            f = mem.read_u64(f.wrapping_add(off(o.frame_previous)))?;
            continue;
        }
        if out.frames.len() == MAX_PY_FRAMES {
            out.flags |= sample_flags::PY_TRUNCATED;
            return Ok(());
        }
        let instr = if p.flags & py_flags::LASTI_IS_INT != 0 {
            mem.read_u32(f.wrapping_add(off(o.frame_instr)))? as u64
        } else {
            mem.read_u64(f.wrapping_add(off(o.frame_instr)))?
        };
        let entry = every_frame_entry
            || (o.frame_is_entry != PY_OFFSET_NONE
                && mem.read_u8(f.wrapping_add(off(o.frame_is_entry)))? != 0);
        out.frames.push(PyFrame {
            code: code | if entry { PY_FRAME_ENTRY } else { 0 },
            instr,
        });
        f = mem.read_u64(f.wrapping_add(off(o.frame_previous)))?;
    }
    if f != 0 {
        out.flags |= sample_flags::PY_TRUNCATED;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The walk's rules on hand-built address spaces laid out with the real tables (the
    //! real-interpreter behaviour is covered by `tests/python_frames.rs`).
    use super::*;
    use crate::python::offsets::{self, Layout};
    use std::collections::BTreeMap;

    /// A sparse address space: bytes exist only where written.
    #[derive(Default)]
    struct Space(BTreeMap<u64, u8>);

    impl Space {
        fn put(&mut self, addr: u64, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                self.0.insert(addr + i as u64, *b);
            }
        }
        fn ptr(&mut self, addr: u64, v: u64) {
            self.put(addr, &v.to_le_bytes());
        }
    }

    impl Memory for Space {
        fn read_exact_at(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError> {
            let len = buf.len();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = *self
                    .0
                    .get(&(addr + i as u64))
                    .ok_or(ReadError::Unreadable {
                        addr,
                        len,
                        errno: libc::EFAULT,
                    })?;
            }
            Ok(())
        }
    }

    const INTERP: u64 = 0x10_0000;
    const TSTATE: u64 = 0x20_0000;
    const CFRAME: u64 = 0x28_0000;
    const CODE_TYPE: u64 = 0x30_0000;
    const OTHER_TYPE: u64 = 0x31_0000;
    const TID: u32 = 4242;
    /// The thread's `pthread_t`: its `struct pthread`, with the tid at `PTHREAD_TID`.
    const PTHREAD: u64 = 0x7f00_0000_1000;
    const PTHREAD_TID: u16 = 720;

    fn frame_addr(i: usize) -> u64 {
        0x40_0000 + 0x100 * i as u64
    }
    fn code_addr(i: usize) -> u64 {
        0x80_0000 + 0x100 * i as u64
    }

    #[derive(Clone, Copy)]
    enum F {
        Py,
        Shim,
        NotCode,
        PyEntry,
    }

    /// One thread whose frames (innermost first) are `frames`, the last pointing at `last_prev`.
    fn build(l: &Layout, frames: &[F], last_prev: u64) -> (Space, PyProc) {
        let mut s = Space::default();
        let mut p = l.py_proc(INTERP, CODE_TYPE).unwrap();
        if p.flags & py_flags::THREAD_ID_IS_PTHREAD != 0 {
            p.offsets.pthread_tid = PTHREAD_TID;
        }
        s.ptr(INTERP + l.interp_threads_head, TSTATE);
        s.ptr(TSTATE + l.tstate_next, 0);
        s.ptr(TSTATE + l.tstate_thread_id, PTHREAD);
        s.put(PTHREAD + PTHREAD_TID as u64, &TID.to_le_bytes());
        if let Some(o) = l.tstate_native_thread_id {
            s.ptr(TSTATE + o, TID as u64);
        }
        let first = if frames.is_empty() { 0 } else { frame_addr(0) };
        match l.cframe_current_frame {
            Some(o) => {
                s.ptr(TSTATE + l.tstate_frame, CFRAME);
                s.ptr(CFRAME + o, first);
            }
            None => s.ptr(TSTATE + l.tstate_frame, first),
        }
        for (i, f) in frames.iter().enumerate() {
            let a = frame_addr(i);
            let prev = if i + 1 < frames.len() {
                frame_addr(i + 1)
            } else {
                last_prev
            };
            s.ptr(a + l.frame_previous, prev);
            s.ptr(a + l.frame_code, code_addr(i));
            let ty = if matches!(f, F::NotCode) {
                OTHER_TYPE
            } else {
                CODE_TYPE
            };
            s.ptr(code_addr(i) + l.object_type, ty);
            if p.flags & py_flags::LASTI_IS_INT != 0 {
                s.put(a + l.frame_instr, &(i as i32 - 1).to_le_bytes());
            } else {
                s.ptr(a + l.frame_instr, 0x9000_0000 + i as u64);
            }
            if let Some(o) = l.frame_owner {
                let owner = if matches!(f, F::Shim) { 3 } else { 0 };
                s.put(a + o, &[owner]);
            }
            if let Some(o) = l.frame_is_entry {
                s.put(a + o, &[matches!(f, F::PyEntry) as u8]);
            }
        }
        (s, p)
    }

    fn key() -> u32 {
        TID
    }

    fn summary(w: &WalkOutcome) -> Vec<(usize, bool)> {
        w.frames
            .iter()
            .map(|f| (((f.code_addr() - 0x80_0000) / 0x100) as usize, f.is_entry()))
            .collect()
    }

    #[test]
    fn shims_mark_the_frame_before_them_and_vanish() {
        use F::*;
        let (s, p) = build(&offsets::PY312, &[Py, Shim, Py, Py, Shim], 0);
        let w = walk(&s, &p, key());
        assert_eq!(w.flags, 0);
        assert_eq!(w.tstate, TSTATE);
        assert_eq!(summary(&w), [(0, true), (2, false), (3, true)]);
        assert_eq!(w.frames[0].instr, 0x9000_0000);
        // A shim at the leaf has no frame before it to mark.
        let (s, p) = build(&offsets::PY313, &[Shim, Py, Shim], 0);
        assert_eq!(summary(&walk(&s, &p, key())), [(1, true)]);
    }

    #[test]
    fn non_code_executables_are_skipped_without_a_mark() {
        use F::*;
        let (s, p) = build(&offsets::PY313, &[Py, NotCode, Py, Shim], 0);
        assert_eq!(summary(&walk(&s, &p, key())), [(0, false), (2, true)]);
    }

    #[test]
    fn is_entry_on_311_and_every_frame_on_310() {
        use F::*;
        let (s, p) = build(&offsets::PY311, &[Py, PyEntry, Py, PyEntry], 0);
        let w = walk(&s, &p, key());
        assert_eq!(summary(&w), [(0, false), (1, true), (2, false), (3, true)]);
        let (s, p) = build(&offsets::PY310, &[Py, Py, Py], 0);
        let w = walk(&s, &p, key());
        assert_eq!(summary(&w), [(0, true), (1, true), (2, true)]);
        // f_lasti is 4 bytes, zero-extended: -1 reads as 0xffff_ffff.
        assert_eq!(w.frames[0].instr, 0xffff_ffff);
        assert_eq!(w.frames[2].instr, 1);
        // 3.10 threads are matched through struct pthread: the pthread_t itself, or another
        // tid, is no match.
        assert_eq!(
            walk(&s, &p, PTHREAD as u32).flags,
            sample_flags::PY_NO_THREAD
        );
        assert_eq!(walk(&s, &p, TID + 1).flags, sample_flags::PY_NO_THREAD);
        let all = thread_states(&s, &p, offsets::PY310.tstate_thread_id).unwrap();
        assert_eq!(
            all,
            [ThreadState {
                tstate: TSTATE,
                thread_id: PTHREAD,
                native_thread_id: Some(TID as u64)
            }]
        );
        // Without the pthread tid offset no thread can be told apart: flagged, never guessed.
        let mut blind = p;
        blind.offsets.pthread_tid = PY_OFFSET_NONE;
        assert_eq!(
            walk(&s, &p, TID).flags,
            0,
            "the same process with the offset walks"
        );
        assert_eq!(
            walk(&s, &blind, TID).flags,
            sample_flags::PY_NO_THREAD | sample_flags::PY_ERROR
        );
        // A struct pthread that cannot be read (its thread exited) matches nobody, and the
        // search goes on to the next thread state.
        let (mut s, p) = build(&offsets::PY310, &[Py], 0);
        const DEAD: u64 = 0x60_0000;
        s.ptr(INTERP + offsets::PY310.interp_threads_head, DEAD);
        s.ptr(DEAD + offsets::PY310.tstate_thread_id, 0xdead_0000);
        s.ptr(DEAD + offsets::PY310.tstate_next, TSTATE);
        let w = walk(&s, &p, TID);
        assert_eq!((w.flags, w.tstate, w.frames.len()), (0, TSTATE, 1));
        // 3.11+ match native_thread_id, whatever thread_id holds.
        let (s, p) = build(&offsets::PY311, &[Py], 0);
        assert_eq!(
            walk(&s, &p, PTHREAD as u32).flags,
            sample_flags::PY_NO_THREAD
        );
        assert_eq!(walk(&s, &p, TID).flags, 0);
    }

    #[test]
    fn cycles_and_deep_stacks_are_cut_at_max_frames() {
        use F::*;
        // The outermost frame points back at the leaf: an endless loop of four frames.
        let (s, p) = build(&offsets::PY312, &[Py, Py, Py, Py], frame_addr(0));
        let w = walk(&s, &p, key());
        assert_eq!(w.frames.len(), MAX_PY_FRAMES);
        assert_eq!(w.flags, sample_flags::PY_TRUNCATED);
        // A cycle of shims only: the visit budget ends it.
        let (s, p) = build(&offsets::PY312, &[Shim, Shim], frame_addr(0));
        let w = walk(&s, &p, key());
        assert!(w.frames.is_empty());
        assert_eq!(w.flags, sample_flags::PY_TRUNCATED);
        // Exactly MAX_PY_FRAMES frames then a shim: the shim still marks the last one.
        let mut frames = vec![Py; MAX_PY_FRAMES];
        frames.push(Shim);
        let (s, p) = build(&offsets::PY312, &frames, 0);
        let w = walk(&s, &p, key());
        assert_eq!((w.frames.len(), w.flags), (MAX_PY_FRAMES, 0));
        assert!(w.frames.last().unwrap().is_entry());
        // One frame more is cut.
        frames.insert(0, Py);
        let (s, p) = build(&offsets::PY312, &frames, 0);
        let w = walk(&s, &p, key());
        assert_eq!(
            (w.frames.len(), w.flags),
            (MAX_PY_FRAMES, sample_flags::PY_TRUNCATED)
        );
        assert!(!w.frames.last().unwrap().is_entry());
    }

    #[test]
    fn unreadable_memory_keeps_the_frames_walked_so_far() {
        use F::*;
        let (s, p) = build(&offsets::PY313, &[Py, Py], 0xdead_0000);
        let w = walk(&s, &p, key());
        assert_eq!(w.frames.len(), 2);
        assert_eq!(w.flags, sample_flags::PY_ERROR);
        assert!(matches!(w.error, Some(ReadError::Unreadable { .. })));
        // An interpreter address that is not mapped at all.
        let mut p2 = p;
        p2.interp = 0xbad0_0000;
        let w = walk(&s, &p2, key());
        assert_eq!(
            (w.frames.len(), w.flags),
            (0, sample_flags::PY_NO_THREAD | sample_flags::PY_ERROR)
        );
    }

    #[test]
    fn thread_lists_are_bounded() {
        use F::*;
        let (mut s, p) = build(&offsets::PY312, &[Py], 0);
        // The only thread state points at itself and matches nobody.
        s.ptr(TSTATE + offsets::PY312.tstate_next, TSTATE);
        assert_eq!(walk(&s, &p, 7).flags, sample_flags::PY_NO_THREAD);
        let all = thread_states(&s, &p, offsets::PY312.tstate_thread_id).unwrap();
        assert_eq!(all.len(), MAX_PY_THREADS);
        // No thread state at all.
        s.ptr(INTERP + offsets::PY312.interp_threads_head, 0);
        assert_eq!(walk(&s, &p, key()).flags, sample_flags::PY_NO_THREAD);
        // A thread with no Python frame yet.
        let (s, p) = build(&offsets::PY311, &[], 0);
        assert_eq!(
            walk(&s, &p, key()),
            WalkOutcome {
                tstate: TSTATE,
                ..Default::default()
            }
        );
    }
}
