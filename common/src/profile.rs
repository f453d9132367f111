//! Profiling ABI: stack samples taken in the kernel (on-CPU timer samples, off-CPU switch-outs,
//! CUDA launch sites) and the per-process Python layout user space hands to the kernel so it can
//! walk the interpreter's frames.
//!
//! Samples travel on their own ring buffer (`SAMPLES`), apart from the socket events, so a burst
//! of stacks never delays token timing and the profiler drains at its own pace. Every record
//! starts with a [`SampleHeader`]; stack samples are a whole [`SampleRecord`] cut after
//! `user_stack_len` bytes of `stack` (so the fixed part is always there and only the copied stack
//! varies), and `OFFCPU_END` records are the header alone.

/// Most bytes of the user stack copied per sample (from the sampled `sp` upward). A power of two
/// so lengths can be bounded with a mask the verifier understands.
///
/// 64 KiB: llama.cpp decode threads need ≈ 43 KiB to unwind to their thread's start
/// (`llama_context::process_ubatch` alone has a 36 KiB frame); 16 KiB cut 20–25 % of them. The
/// copy of a thread whose stack top user space registered (`STACK_TOPS`) stops at that top, so
/// shallow stacks cost what they hold, not 64 KiB.
pub const MAX_STACK_BYTES: usize = 65536;
/// Default copy (`profile_control::STACK_BYTES`): the whole window.
pub const DEFAULT_STACK_BYTES: u32 = 65536;
/// Kernel frames kept per sample (`bpf_get_stack`).
pub const MAX_KERNEL_FRAMES: usize = 64;
/// Python frames walked per sample; deeper stacks are cut at the root end (flag `PY_TRUNCATED`).
pub const MAX_PY_FRAMES: usize = 128;
/// Python threads walked to find the sampled thread's `PyThreadState` when it is not cached.
pub const MAX_PY_THREADS: usize = 128;

/// What a sample record describes (`SampleHeader::kind`).
pub mod sample_kind {
    /// A `cpu-clock` timer sample of a traced thread (on-CPU).
    pub const CPU: u8 = 1;
    /// A traced thread switched out (`sched_switch`), with its stack at that moment. Its
    /// duration arrives later as an [`OFFCPU_END`] record with the same tid and `aux` = this
    /// record's `ts_ns`. Sampled 1 in `OFFCPU_SAMPLE_EVERY` switch-outs.
    pub const OFFCPU: u8 = 2;
    /// The thread of an earlier [`OFFCPU`] record ran again: `ts_ns` is the switch-in time,
    /// `aux` the switch-out time. Header only.
    pub const OFFCPU_END: u8 = 3;
    /// A CUDA launch (uprobe on a launch function), with the launching thread's stack. `aux`
    /// holds the attach cookie (`cuda::Cookie`), `aux2` the kernel handle (CUfunction or host
    /// stub) or graph. Sampled 1 in `LAUNCH_SAMPLE_EVERY` launches.
    pub const LAUNCH: u8 = 4;
}

/// `SampleHeader::flags`.
pub mod sample_flags {
    /// The sample was taken in kernel mode (a timer tick during a syscall or fault; every
    /// `OFFCPU` record, taken in `schedule()`): `kernel_frames` are its kernel stack and
    /// `ip`/`sp`/`bp` are the user registers saved at kernel entry.
    pub const IN_KERNEL: u8 = 1;
    /// More Python frames than `MAX_PY_FRAMES`: the outermost ones are missing.
    pub const PY_TRUNCATED: u8 = 2;
    /// The Python walk failed part-way (unreadable memory, a thread state that was being torn
    /// down, a `PyProc` whose offsets the walker cannot use): the frames present are valid, the
    /// rest is missing. With `PY_NO_THREAD`: the thread search itself could not finish (more
    /// than `MAX_PY_THREADS` threads, or an unreadable thread list).
    pub const PY_ERROR: u8 = 4;
    /// The user stack copy stopped at unreadable memory before the wanted size (usually the top
    /// of the stack mapping: the stack is then complete, not cut).
    pub const STACK_SHORT: u8 = 8;
    /// Off-CPU: the thread was preempted while runnable (waiting for a CPU), not blocked: the
    /// tracepoint's `prev_state` had no blocking state bit (0, or `TASK_REPORT_MAX` for a
    /// preemption).
    pub const PREEMPTED: u8 = 16;
    /// The process is a known Python process but no `PyThreadState` matched this thread (a
    /// native-only thread, e.g. a BLAS/OpenMP worker).
    pub const PY_NO_THREAD: u8 = 32;
    /// The copy was bounded by the thread's [`StackTop`](super::StackTop) from `STACK_TOPS`
    /// (`sp` was inside it and its top nearer than `STACK_BYTES`): `stack` holds everything
    /// from `sp` to the top of the thread's stack mapping, unless `STACK_SHORT` is also set: a
    /// page below the top could not be read (not present: never touched, or being migrated or
    /// reclaimed; or the mapping changed since the entry was made).
    pub const STACK_TO_TOP: u8 = 64;
    /// Every defined bit (a decoder rejects others).
    pub const ALL: u8 =
        IN_KERNEL | PY_TRUNCATED | PY_ERROR | STACK_SHORT | PREEMPTED | PY_NO_THREAD | STACK_TO_TOP;
}

/// Header of every sample record. 72 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleHeader {
    /// CLOCK_MONOTONIC ns (`bpf_ktime_get_ns`) when the sample was taken.
    pub ts_ns: u64,
    /// `tgid << 32 | tid` of the sampled thread.
    pub pid_tgid: u64,
    /// User-mode instruction pointer, stack pointer and frame pointer of the sampled thread (the
    /// registers saved at kernel entry when the sample interrupted kernel mode).
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// `OFFCPU_END`: switch-out time of the period that ended; `LAUNCH`: attach cookie.
    pub aux: u64,
    /// `LAUNCH`: kernel handle / host stub / graph exec passed to the launch function.
    /// `OFFCPU`: the 1-in-N rate the capture was sampled at (it stands for N switch-outs).
    pub aux2: u64,
    /// Bytes of `SampleRecord::stack` that follow the fixed part (≤ `MAX_STACK_BYTES`).
    pub user_stack_len: u32,
    /// Valid entries of `SampleRecord::kernel`.
    pub kernel_frames: u16,
    /// Valid entries of `SampleRecord::python`, innermost first.
    pub py_frames: u16,
    pub cpu: u16,
    /// One of [`sample_kind`].
    pub kind: u8,
    /// Bits of [`sample_flags`].
    pub flags: u8,
    pub _pad: u32,
}

pub const SAMPLE_HEADER_LEN: usize = core::mem::size_of::<SampleHeader>();

/// One Python frame as the kernel walked it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrame {
    /// Address of the frame's code object in the target process, with [`PY_FRAME_ENTRY`] in the
    /// top bit.
    pub code: u64,
    /// 3.11+: the frame's instruction pointer (`prev_instr` / `instr_ptr`, an address inside the
    /// code object's bytecode); 3.10: `f_lasti` (an index in code units), sign-extended (-1
    /// before the frame's first instruction).
    pub instr: u64,
}

/// Set on `PyFrame::code` for the outermost frame of one `_PyEval_EvalFrameDefault` invocation
/// (3.11: `is_entry`; 3.12+: the frame right before a C-stack shim frame; 3.10: every frame).
/// Merging with native frames replaces the k-th eval-loop native frame with the k-th such group.
pub const PY_FRAME_ENTRY: u64 = 1 << 63;

impl PyFrame {
    pub fn code_addr(&self) -> u64 {
        self.code & !PY_FRAME_ENTRY
    }
    pub fn is_entry(&self) -> bool {
        self.code & PY_FRAME_ENTRY != 0
    }
}

/// The record the eBPF side assembles in per-CPU scratch memory and emits up to
/// `SAMPLE_FIXED_LEN + user_stack_len` bytes of.
#[repr(C)]
pub struct SampleRecord {
    pub header: SampleHeader,
    /// Kernel return addresses, innermost first.
    pub kernel: [u64; MAX_KERNEL_FRAMES],
    pub python: [PyFrame; MAX_PY_FRAMES],
    /// The user stack from `header.sp` upward.
    pub stack: [u8; MAX_STACK_BYTES],
}

/// Bytes of a stack sample before its copied user stack.
pub const SAMPLE_FIXED_LEN: usize = core::mem::offset_of!(SampleRecord, stack);

/// Marks an offset that does not exist in this interpreter version.
pub const PY_OFFSET_NONE: u16 = u16::MAX;

/// Bytes at the start of a frame the kernel walker reads per frame (see [`PyOffsets`]).
pub const PY_FRAME_WINDOW_BYTES: usize = 128;

/// Field offsets the kernel needs to walk one CPython version's frames. Filled by user space
/// from its per-version tables (and checked against the interpreter's own debug offsets where
/// it has them, 3.13+).
///
/// The kernel reads each frame's first [`PY_FRAME_WINDOW_BYTES`] in one go: the frame fields
/// (`frame_*`) must end within them, pointers 8-aligned and a 3.10 `f_lasti` 4-aligned. User
/// space rejects a layout that breaks this; the kernel flags `PY_ERROR` for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyOffsets {
    /// `PyInterpreterState`: first thread state (`threads.head`; 3.10 `tstate_head`).
    pub interp_threads_head: u16,
    /// `PyThreadState.next`.
    pub tstate_next: u16,
    /// `PyThreadState.native_thread_id` (the kernel tid), 3.11+. 3.10 has no such field: there it
    /// is `PyThreadState.thread_id` (the thread's `pthread_t`), `PyProc::flags` has
    /// [`py_flags::THREAD_ID_IS_PTHREAD`] and the tid is read through [`Self::pthread_tid`].
    pub tstate_native_thread_id: u16,
    /// `PyThreadState` → current frame: 3.10 `frame`, 3.11/3.12 `cframe`, 3.13+ `current_frame`.
    pub tstate_frame: u16,
    /// 3.11/3.12: `_PyCFrame.current_frame` (one more dereference after `tstate_frame`);
    /// `PY_OFFSET_NONE` when `tstate_frame` points at the frame itself.
    pub cframe_current_frame: u16,
    /// Frame → code object: `f_code` (3.10–3.12), `f_executable` (3.13+).
    pub frame_code: u16,
    /// Frame → outer frame: `previous` (3.11+), `f_back` (3.10).
    pub frame_previous: u16,
    /// Frame → instruction: `prev_instr` (3.11/3.12), `instr_ptr` (3.13+), `f_lasti` (3.10, an
    /// `int`; see `PyProc::flags`).
    pub frame_instr: u16,
    /// `_PyInterpreterFrame.owner` (a `char`); `PY_OFFSET_NONE` on 3.10.
    pub frame_owner: u16,
    /// `_PyInterpreterFrame.is_entry` (3.11 only); `PY_OFFSET_NONE` elsewhere.
    pub frame_is_entry: u16,
    /// `PyObject.ob_type` (to check that `f_executable` is a code object, 3.13+).
    pub object_type: u16,
    /// With [`py_flags::THREAD_ID_IS_PTHREAD`] (3.10): byte offset of `tid` (a 4-byte `pid_t`) in
    /// the target libc's `struct pthread`, which a `pthread_t` points at. Read by user space from
    /// glibc's `_thread_db_pthread_tid` descriptor (the one gdb's libthread_db uses; 720 in glibc
    /// 2.36), so no kernel structure offset is needed. `PY_OFFSET_NONE` otherwise.
    pub pthread_tid: u16,
    pub _pad: [u16; 4],
}

impl Default for PyOffsets {
    fn default() -> Self {
        PyOffsets {
            interp_threads_head: PY_OFFSET_NONE,
            tstate_next: PY_OFFSET_NONE,
            tstate_native_thread_id: PY_OFFSET_NONE,
            tstate_frame: PY_OFFSET_NONE,
            cframe_current_frame: PY_OFFSET_NONE,
            frame_code: PY_OFFSET_NONE,
            frame_previous: PY_OFFSET_NONE,
            frame_instr: PY_OFFSET_NONE,
            frame_owner: PY_OFFSET_NONE,
            frame_is_entry: PY_OFFSET_NONE,
            object_type: PY_OFFSET_NONE,
            pthread_tid: PY_OFFSET_NONE,
            _pad: [0; 4],
        }
    }
}

/// `PyProc::flags`.
pub mod py_flags {
    /// `frame_instr` is a 4-byte `f_lasti` (3.10), not a pointer.
    pub const LASTI_IS_INT: u32 = 1;
    /// `tstate_native_thread_id` is the offset of `thread_id`, an 8-byte `pthread_t` (3.10,
    /// which records no kernel tid). With glibc a `pthread_t` is the address of the thread's
    /// `struct pthread`: the kernel reads the 4-byte `tid` at `pthread_t + PyOffsets::pthread_tid`
    /// and compares that with the sampled tid. A thread state whose `struct pthread` cannot be
    /// read (its thread exited) matches no thread.
    pub const THREAD_ID_IS_PTHREAD: u32 = 2;
}

/// Value of the kernel's per-process Python map (key: tgid): where the interpreter is and how to
/// walk it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProc {
    /// Address of the main `PyInterpreterState` in the target process.
    pub interp: u64,
    /// Address of `PyCode_Type`; frames whose executable has another type are skipped (3.13+
    /// shim frames). 0: no check.
    pub code_type: u64,
    pub offsets: PyOffsets,
    /// `(major << 8) | minor`, e.g. `0x030b` for 3.11.
    pub version: u16,
    /// `_PyInterpreterFrame.owner` value of C-stack shim frames (3.12+: 3), skipped and turned
    /// into an entry mark on the frame before them; 0xff when the version has none.
    pub owner_cstack: u8,
    pub _pad0: u8,
    /// Bits of [`py_flags`].
    pub flags: u32,
}

/// Indices of the profiler's control array (`PROFILE_CONTROL`), written by user space at run
/// time.
pub mod profile_control {
    /// Capture 1 in N off-CPU switch-outs of traced threads with their stacks (0: off-CPU
    /// profiling off). Every switch-out still counts in the off-CPU totals.
    pub const OFFCPU_SAMPLE_EVERY: u32 = 0;
    /// Capture the stack of 1 in N CUDA launches (0: off).
    pub const LAUNCH_SAMPLE_EVERY: u32 = 1;
    /// Bytes of user stack to copy per sample (≤ `MAX_STACK_BYTES`, rounded to 8). A thread with
    /// a `STACK_TOPS` entry whose range holds its `sp` gets `min(top - sp, STACK_BYTES)`.
    pub const STACK_BYTES: u32 = 2;
    /// 1: on-CPU timer samples are taken (the perf events stay attached either way).
    pub const CPU_ON: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Most entries of the kernel's `STACK_TOPS` map (LRU, key: `tgid << 32 | tid`, value:
/// [`StackTop`]). User space adds a thread's entry once (after its first sample); the kernel
/// drops it when the thread exits. The key carries the tgid so a reused tid of another process
/// never meets a stale entry, and user space can drop a whole process's entries.
pub const MAX_STACK_TOPS: u32 = 65536;

/// Value of `STACK_TOPS`: the mapping that holds a thread's stack, from `/proc/<pid>/maps`. The
/// kernel bounds a sample's copy by `top` only when `low <= sp < top`, so a thread running on
/// another stack for a while (a signal stack, a coroutine's, a Go goroutine's) is copied in
/// full rather than cut at the wrong top.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackTop {
    /// End address (exclusive) of the mapping: the top of the stack.
    pub top: u64,
    /// Start address of the mapping; 0 for the main thread's `[stack]`, which grows down.
    pub low: u64,
}

/// Per-process off-CPU totals kept in the kernel (every switch-out, sampled or not), per CPU
/// (user space sums the CPUs). A period is added when the thread runs again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuTotals {
    /// Time traced threads spent blocked (sleeping) off-CPU.
    pub blocked_ns: u64,
    /// Time traced threads spent runnable but not running (preempted).
    pub preempted_ns: u64,
    /// Off-CPU periods completed (switch-out followed by switch-in).
    pub switches: u64,
}

/// Value of the kernel's per-thread off-CPU map (`OFFCPU_START`, key: tid): a traced thread's
/// current off-CPU period, if it has one. The entry is kept while the thread lives and rewritten
/// in place at each switch-out; its switch-in closes it (`ts_ns` = 0). User space only reads it
/// (threads off-CPU now) and drops a forgotten process's entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuStart {
    /// CLOCK_MONOTONIC ns of the switch-out; 0: the thread is on a CPU (no open period).
    pub ts_ns: u64,
    pub tgid: u32,
    /// Bits of [`offcpu_start`].
    pub flags: u32,
}

/// Task states as the kernel's `sched_switch` tracepoint reports them (`prev_state` of its trace
/// record), and how the raw tracepoint's arguments map onto them. The classic tracepoint hands
/// the eBPF side the reported value; the raw one hands it the task's raw `__state` (and the
/// program reads `exit_state`), which [`reported_switch_state`] turns into the same value so both
/// hooks classify a switch-out alike.
pub mod switch_state {
    /// `TASK_INTERRUPTIBLE`.
    pub const INTERRUPTIBLE: u32 = 0x1;
    /// `TASK_UNINTERRUPTIBLE`.
    pub const UNINTERRUPTIBLE: u32 = 0x2;
    /// `EXIT_DEAD` (a `task_struct::exit_state` value).
    pub const EXIT_DEAD: u32 = 0x10;
    /// `EXIT_ZOMBIE` (a `task_struct::exit_state` value).
    pub const EXIT_ZOMBIE: u32 = 0x20;
    /// `TASK_REPORT`: every state bit the tracepoint reports (up to `TASK_PARKED`).
    pub const REPORT: u32 = 0x7f;
    /// `TASK_REPORT_IDLE`: how an idle kernel thread's `TASK_IDLE` is reported.
    pub const REPORT_IDLE: u32 = REPORT + 1;
    /// `TASK_REPORT_MAX`: what a preemption is reported as.
    pub const REPORT_MAX: u32 = REPORT_IDLE << 1;
    /// `TASK_NOLOAD`; with `TASK_UNINTERRUPTIBLE` it makes `TASK_IDLE`.
    pub const NOLOAD: u32 = 0x400;
    /// `TASK_RTLOCK_WAIT` (5.15+), reported as uninterruptible.
    pub const RTLOCK_WAIT: u32 = 0x1000;
    /// `TASK_FROZEN` (6.1+), reported as uninterruptible.
    pub const FROZEN: u32 = 0x8000;
    /// Reported states of a task that is exiting: it never runs again after this switch-out.
    pub const EXITING: u32 = EXIT_DEAD | EXIT_ZOMBIE;
    /// Every reported blocking state (`TASK_REPORT` and `TASK_REPORT_IDLE`). A switch-out with
    /// none of them was a preemption: 0 (runnable, e.g. `sched_yield`) or `REPORT_MAX`.
    pub const BLOCKED: u32 = REPORT | REPORT_IDLE;
}

/// The `prev_state` the classic `sched_switch` tracepoint would report for a switch-out with
/// these raw-tracepoint arguments: `preempt`, the task's raw state (`prev_state` argument, 5.18+,
/// or `task_struct::__state`) and its `exit_state`. Mirrors the kernel's
/// `__trace_sched_switch_state` and `__task_state_index` (include/trace/events/sched.h,
/// include/linux/sched.h): a preemption is `REPORT_MAX`; otherwise the highest reported bit of
/// `state | exit_state`, with `TASK_IDLE` as `REPORT_IDLE` and an rt-lock wait or a frozen task
/// as uninterruptible; 0 for a runnable task.
#[inline(always)]
pub const fn reported_switch_state(preempt: bool, state: u32, exit_state: u32) -> u32 {
    use switch_state as s;
    if preempt {
        return s::REPORT_MAX;
    }
    let mut bits = (state | exit_state) & s::REPORT;
    if state & (s::UNINTERRUPTIBLE | s::NOLOAD) == s::UNINTERRUPTIBLE | s::NOLOAD {
        bits = s::REPORT_IDLE;
    }
    if state & (s::RTLOCK_WAIT | s::FROZEN) != 0 {
        bits = s::UNINTERRUPTIBLE;
    }
    // `1 << (fls(bits) - 1)`: the highest bit (bits < 0x100).
    let mut top = s::REPORT_IDLE;
    while top != 0 && bits & top == 0 {
        top >>= 1;
    }
    top
}

/// `OffCpuStart::flags`.
pub mod offcpu_start {
    /// Switched out while runnable (see `sample_flags::PREEMPTED`).
    pub const PREEMPTED: u32 = 1;
    /// An `OFFCPU` record was emitted for this switch-out: the switch-in emits its `OFFCPU_END`.
    pub const CAPTURED: u32 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_states_are_reported_as_the_tracepoint_does() {
        use switch_state as s;
        let r = reported_switch_state;
        // Preempted: whatever the state, TASK_REPORT_MAX.
        assert_eq!(r(true, s::INTERRUPTIBLE, 0), s::REPORT_MAX);
        assert_eq!(r(true, 0, s::EXIT_ZOMBIE), s::REPORT_MAX);
        // Runnable at the switch (sched_yield, a signal that cancelled the sleep).
        assert_eq!(r(false, 0, 0), 0);
        // Sleeps.
        assert_eq!(r(false, s::INTERRUPTIBLE, 0), s::INTERRUPTIBLE);
        assert_eq!(r(false, s::UNINTERRUPTIBLE, 0), s::UNINTERRUPTIBLE);
        // TASK_KILLABLE (TASK_WAKEKILL 0x100 | UNINTERRUPTIBLE): the unreported bit is dropped.
        assert_eq!(r(false, 0x100 | s::UNINTERRUPTIBLE, 0), s::UNINTERRUPTIBLE);
        // TASK_IDLE.
        assert_eq!(r(false, s::NOLOAD | s::UNINTERRUPTIBLE, 0), s::REPORT_IDLE);
        // rt-lock waits and frozen tasks look uninterruptible.
        assert_eq!(r(false, s::RTLOCK_WAIT, 0), s::UNINTERRUPTIBLE);
        assert_eq!(
            r(false, s::FROZEN | s::INTERRUPTIBLE, 0),
            s::UNINTERRUPTIBLE
        );
        // The final switch of an exiting task: TASK_DEAD (0x80, unreported) with its exit
        // state; a zombie wins over a lower state bit, TASK_PARKED (0x40) over a zombie.
        assert_eq!(r(false, 0x80, s::EXIT_DEAD), s::EXIT_DEAD);
        assert_eq!(r(false, 0x80, s::EXIT_ZOMBIE), s::EXIT_ZOMBIE);
        assert_eq!(r(false, s::INTERRUPTIBLE, s::EXIT_ZOMBIE), s::EXIT_ZOMBIE);
        assert_eq!(r(false, 0x40, s::EXIT_ZOMBIE), 0x40);
        // A reported state is one bit, so the classification masks see exactly one class.
        for state in 0..0x10000u32 {
            for exit in [0, s::EXIT_DEAD, s::EXIT_ZOMBIE] {
                let v = r(false, state, exit);
                assert!(
                    v == 0 || v.is_power_of_two() && v <= s::REPORT_IDLE,
                    "{state:#x}"
                );
            }
        }
    }

    #[test]
    fn layouts_are_stable() {
        assert_eq!(SAMPLE_HEADER_LEN, 72);
        assert_eq!(core::mem::size_of::<PyFrame>(), 16);
        assert_eq!(
            SAMPLE_FIXED_LEN,
            72 + 8 * MAX_KERNEL_FRAMES + 16 * MAX_PY_FRAMES
        );
        assert_eq!(core::mem::size_of::<PyOffsets>(), 32);
        assert_eq!(core::mem::offset_of!(PyOffsets, object_type), 20);
        assert_eq!(core::mem::offset_of!(PyOffsets, pthread_tid), 22);
        assert_eq!(core::mem::offset_of!(PyProc, offsets), 16);
        assert_eq!(core::mem::offset_of!(PyProc, flags), 52);
        assert_eq!(core::mem::size_of::<PyProc>(), 56);
        assert_eq!(core::mem::size_of::<OffCpuStart>(), 16);
        assert_eq!(core::mem::size_of::<StackTop>(), 16);
        assert_eq!(core::mem::size_of::<OffCpuTotals>(), 24);
        assert!(MAX_STACK_BYTES.is_power_of_two());
        assert!(DEFAULT_STACK_BYTES as usize <= MAX_STACK_BYTES);
        assert_eq!(sample_flags::ALL, 0x7f);
    }
}
