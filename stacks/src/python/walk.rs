//! A user-space Python frame walker with exactly the kernel walker's semantics: the reference
//! implementation its tests compare against, and a debugging aid (`walk` a stopped process and
//! see what the kernel should have emitted). It is not on the production path: the profiler's
//! Python frames come from the kernel.
//!
//! # The walk, step by step (what the eBPF walker must do)
//!
//! Input: the sampled task's tid and fs base (`task->thread.fsbase`), and the process's
//! [`PyProc`] `p` (`o` = `p.offsets`). All reads are 8-byte little-endian pointers unless said,
//! at `base + offset` in wrapping `u64` arithmetic; any failed read stops the walk with
//! `PY_ERROR`, keeping the frames already emitted.
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
    let mut ts = mem.read_u64(p.interp.wrapping_add(o.interp_threads_head as u64))?;
    while ts != 0 && out.len() < MAX_PY_THREADS {
        let thread_id = mem.read_u64(ts.wrapping_add(thread_id_offset))?;
        let native_thread_id = if pthread_only {
            None
        } else {
            Some(mem.read_u64(ts.wrapping_add(o.tstate_native_thread_id as u64))?)
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

/// Step 1: the thread state of `key`, `None` if no state matches within `MAX_PY_THREADS`.
pub fn find_tstate(
    mem: &impl Memory,
    p: &PyProc,
    key: ThreadKey,
) -> Result<Option<u64>, ReadError> {
    let o = &p.offsets;
    let mut ts = mem.read_u64(p.interp.wrapping_add(o.interp_threads_head as u64))?;
    for _ in 0..MAX_PY_THREADS {
        if ts == 0 {
            return Ok(None);
        }
        let id = mem.read_u64(ts.wrapping_add(o.tstate_native_thread_id as u64))?;
        if thread_matches(p, id, key) {
            return Ok(Some(ts));
        }
        ts = mem.read_u64(ts.wrapping_add(o.tstate_next as u64))?;
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
    const FSBASE: u64 = 0x7f00_0000_1000;

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
        let p = l.py_proc(INTERP, CODE_TYPE).unwrap();
        s.ptr(INTERP + l.interp_threads_head, TSTATE);
        s.ptr(TSTATE + l.tstate_next, 0);
        s.ptr(TSTATE + l.tstate_thread_id, FSBASE);
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

    fn key() -> ThreadKey {
        ThreadKey {
            tid: TID,
            fsbase: FSBASE,
        }
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
        // 3.10 threads are matched by fs base, not tid.
        let by_tid = ThreadKey {
            tid: TID,
            fsbase: 0,
        };
        assert_eq!(walk(&s, &p, by_tid).flags, sample_flags::PY_NO_THREAD);
        let (s, p) = build(&offsets::PY311, &[Py], 0);
        let by_fs = ThreadKey {
            tid: 1,
            fsbase: FSBASE,
        };
        assert_eq!(walk(&s, &p, by_fs).flags, sample_flags::PY_NO_THREAD);
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
        assert_eq!((w.frames.len(), w.flags), (0, sample_flags::PY_ERROR));
    }

    #[test]
    fn thread_lists_are_bounded() {
        use F::*;
        let (mut s, p) = build(&offsets::PY312, &[Py], 0);
        // The only thread state points at itself and matches nobody.
        s.ptr(TSTATE + offsets::PY312.tstate_next, TSTATE);
        let stranger = ThreadKey { tid: 7, fsbase: 7 };
        assert_eq!(walk(&s, &p, stranger).flags, sample_flags::PY_NO_THREAD);
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
