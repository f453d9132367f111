//! Native unwinding of sampled user stacks, from the registers and the stack bytes the kernel
//! copied (`SampleHeader::{ip, sp, bp}` + `SampleRecord::stack`), with DWARF CFI
//! (`.eh_frame` through `.eh_frame_hdr`, `.debug_frame` where present) via `framehop`, and
//! frame pointers where a module has no CFI.
//!
//! # Addresses
//! [`UnwoundStack::frames`] holds process addresses: `frames[0]` is the sampled instruction
//! pointer, every later entry is a **return address as found on the stack, not caller-adjusted**
//! (it points after the call instruction). Look up code information (module, symbol, line) for
//! [`lookup_address`]`(i, frames[i])`, which subtracts one from return addresses so a call at the
//! very end of a function (a `noreturn` call) still resolves to its caller.
//!
//! # Outcome
//! Every unwind ends in an [`UnwindOutcome`]:
//! - **complete**: the unwind info says the stack ends here: the CFI row of the last frame
//!   marks the return address undefined (glibc's `_start`, the child side of `clone3` under
//!   `start_thread`), or CFI recovered a zero return address. An end found only by a guess (a
//!   zero `rbp` under the frame-pointer rule) is *not* complete.
//! - **truncated** with one [`TruncatedReason`]:
//!   - `stack_copy_exhausted`: the next frame's CFI needs stack bytes above the copied window
//!     (a frame-pointer guess reading less than 64 KiB above it counts too).
//!   - `no_unwind_info`: the walk had to guess through code without CFI (a module without
//!     unwind tables, or one that could not be opened) and the guess did not lead to a valid
//!     frame; a guessed return address outside any code is dropped.
//!   - `unmapped_address`: a frame address (the ip, or a return address recovered with CFI)
//!     is in no file-backed executable mapping: anonymous executable memory (JIT code; kept as
//!     the last frame) or a value that is not code (dropped).
//!   - `max_depth`: [`UnwindConfig::max_frames`] frames were produced and the last one still
//!     has a caller.
//!   - `bad_cfi`: a CFI row could not be applied: it reads below the stack pointer, needs a
//!     register a sample does not carry (anything but ip/sp/bp, e.g. in the prologue of a
//!     stack-realigning function), does not advance, or moves the stack pointer backwards.
//!   - `process_gone`: the process's mappings could not be read (it exited before its first
//!     sample was unwound); the ip is the only frame.
//!
//! Where an address has no CFI the walk guesses: frame pointers, or for the ip inside a module
//! that has CFI elsewhere (a hand-written stub such as glibc's `clone3` after the syscall) the
//! return address on top of the stack, whichever lands in code. Guessed frames are counted in
//! [`UnwoundStack::guessed_frames`]; a walk that reaches a CFI-described end after guesses is
//! complete (binaries built with frame pointers and no unwind tables chain up to glibc, whose
//! CFI ends the stack).
//!
//! CFI rows are applied by framehop where it is exact (CFA = rsp/rbp + offset, registers saved
//! at CFA offsets: nearly all code) and evaluated in full with gimli otherwise (CFA
//! expressions that read memory, as gcc emits for stack-realigning AVX code such as ggml's
//! kernels); framehop's own fallback for such rows (frame pointers, silently) is never used.
//!
//! # Modules and costs
//! A process's executable mappings are read from `/proc/<pid>/maps` on its first sample and
//! re-read when an address falls outside every known mapping, at most once per
//! [`UnwindConfig::maps_refresh_interval`]. A module is parsed the first time a frame needs it,
//! on the caller's thread inside `unwind`/`normalize`: `pread`s of its CFI sections (copied to
//! the heap, so a file rewritten on disk cannot fault the agent) and one pass over its FDEs.
//! Measured (`examples/unwind_cost.rs`, release build): libpython3.11 0.5 ms (5.4 k FDEs),
//! libllama 0.7 ms, numpy's 24 MiB OpenBLAS 3.3 ms (11.7 k FDEs, 1.9 MiB held), a generated
//! library of 100 k functions 14.5 ms (5.1 MiB held): ≈ 0.15–0.3 µs and ≈ 50 bytes per FDE, so
//! a libtorch-sized module (a few 100 k FDEs) costs tens of ms once. [`Unwinder::preload`] does this
//! for every module of a process up front, off the sampling path. Parses are shared by every
//! process mapping the same file ((device, inode), else build id) and bounded by
//! [`ModuleCacheLimits`]. Once modules are parsed a 14-frame libpython stack unwinds in
//! 0.8 µs (median and p99) with framehop's rule cache warm, ~22 µs with it cold.

mod cfi_eval;
mod elf;
mod maps;
mod modules;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64};
use framehop::{FrameAddress, Unwinder as _};

use crate::UserRegs;
use infertap_common::profile::StackTop;

use elf::{CfiSource, CfiUnwinder};
use maps::{Backing, OpenOptions, ProcessMap};
use modules::ModuleCache;
pub use modules::{FileId, ModuleCacheLimits, ModuleCacheStats, ModuleId, ModuleInfo, ModuleKey};

/// The address to look code information up for: `addr` itself for frame 0 (the instruction
/// pointer), `addr - 1` for return addresses.
pub fn lookup_address(frame_index: usize, addr: u64) -> u64 {
    if frame_index == 0 {
        addr
    } else {
        addr.saturating_sub(1)
    }
}

/// Why an unwind stopped before the end of the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TruncatedReason {
    StackCopyExhausted,
    NoUnwindInfo,
    UnmappedAddress,
    MaxDepth,
    BadCfi,
    ProcessGone,
}

impl TruncatedReason {
    pub const ALL: [TruncatedReason; 6] = [
        TruncatedReason::StackCopyExhausted,
        TruncatedReason::NoUnwindInfo,
        TruncatedReason::UnmappedAddress,
        TruncatedReason::MaxDepth,
        TruncatedReason::BadCfi,
        TruncatedReason::ProcessGone,
    ];

    /// The metric label (`stack_copy_exhausted`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            TruncatedReason::StackCopyExhausted => "stack_copy_exhausted",
            TruncatedReason::NoUnwindInfo => "no_unwind_info",
            TruncatedReason::UnmappedAddress => "unmapped_address",
            TruncatedReason::MaxDepth => "max_depth",
            TruncatedReason::BadCfi => "bad_cfi",
            TruncatedReason::ProcessGone => "process_gone",
        }
    }
}

impl std::fmt::Display for TruncatedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an unwind ended (see the module docs for the rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnwindOutcome {
    Complete,
    Truncated(TruncatedReason),
}

impl UnwindOutcome {
    pub fn is_complete(self) -> bool {
        self == UnwindOutcome::Complete
    }
}

/// One unwound stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnwoundStack {
    /// `frames[0]`: the ip; then return addresses, innermost first, not caller-adjusted.
    pub frames: Vec<u64>,
    /// Whether the walk reached the end of the stack, or why not.
    pub outcome: UnwindOutcome,
    /// Frames recovered by the frame-pointer guess (code without CFI).
    pub guessed_frames: u32,
}

impl UnwoundStack {
    /// The addresses to look code up for, frame by frame (see [`lookup_address`]).
    pub fn lookup_addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.frames
            .iter()
            .enumerate()
            .map(|(i, &a)| lookup_address(i, a))
    }
}

/// An address normalized to its module.
#[derive(Clone, Debug)]
pub struct NormalizedAddr {
    pub module: Arc<ModuleInfo>,
    /// Offset of the address in the module's file (what [`crate::symbolize`] takes).
    pub file_offset: u64,
    /// The address in the ELF's own virtual address space (what `addr2line -e <file>` takes);
    /// `None` when the ELF headers could not be read.
    pub vaddr: Option<u64>,
}

/// Settings of an [`Unwinder`].
#[derive(Clone, Copy, Debug)]
pub struct UnwindConfig {
    /// Most frames per stack (ip included).
    pub max_frames: usize,
    /// Least time between two reads of one process's maps when an address is outside every
    /// known mapping.
    pub maps_refresh_interval: Duration,
    /// Open module files through `/proc/<pid>/map_files/` first (needs CAP_SYS_ADMIN or
    /// CAP_CHECKPOINT_RESTORE; the only way to a library deleted on disk). Otherwise, or if
    /// that fails, `/proc/<pid>/root/<path>`, accepted only when its device and inode match the
    /// mapping.
    pub use_map_files: bool,
    /// Bounds of the shared module cache.
    pub module_cache: ModuleCacheLimits,
}

impl Default for UnwindConfig {
    fn default() -> Self {
        UnwindConfig {
            max_frames: 256,
            maps_refresh_interval: Duration::from_millis(250),
            use_map_files: true,
            module_cache: ModuleCacheLimits::default(),
        }
    }
}

/// Truncated stacks, one counter per [`TruncatedReason`] (same names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TruncatedCounts {
    pub stack_copy_exhausted: u64,
    pub no_unwind_info: u64,
    pub unmapped_address: u64,
    pub max_depth: u64,
    pub bad_cfi: u64,
    pub process_gone: u64,
}

impl TruncatedCounts {
    pub fn get(&self, r: TruncatedReason) -> u64 {
        match r {
            TruncatedReason::StackCopyExhausted => self.stack_copy_exhausted,
            TruncatedReason::NoUnwindInfo => self.no_unwind_info,
            TruncatedReason::UnmappedAddress => self.unmapped_address,
            TruncatedReason::MaxDepth => self.max_depth,
            TruncatedReason::BadCfi => self.bad_cfi,
            TruncatedReason::ProcessGone => self.process_gone,
        }
    }

    fn bump(&mut self, r: TruncatedReason) {
        let c = match r {
            TruncatedReason::StackCopyExhausted => &mut self.stack_copy_exhausted,
            TruncatedReason::NoUnwindInfo => &mut self.no_unwind_info,
            TruncatedReason::UnmappedAddress => &mut self.unmapped_address,
            TruncatedReason::MaxDepth => &mut self.max_depth,
            TruncatedReason::BadCfi => &mut self.bad_cfi,
            TruncatedReason::ProcessGone => &mut self.process_gone,
        };
        *c += 1;
    }

    pub fn total(&self) -> u64 {
        TruncatedReason::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

/// Counters of an [`Unwinder`] (monotonic unless noted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindStats {
    /// Stacks unwound (`complete + truncated.total()`).
    pub samples: u64,
    /// Stacks that reached the end the unwind info marks.
    pub complete: u64,
    /// Stacks cut short, by reason.
    pub truncated: TruncatedCounts,
    /// Frames produced, ip included.
    pub frames: u64,
    /// Frames recovered by the frame-pointer guess.
    pub guessed_frames: u64,
    /// Steps through CFI rows framehop does not apply (CFA expressions with memory reads, as
    /// in stack-realigning functions), evaluated in full with gimli.
    pub evaluated_steps: u64,
    /// Reads of `/proc/<pid>/maps` (first reads and refreshes).
    pub maps_reads: u64,
    /// Reads of `/proc/<pid>/maps` that failed (process gone, permission).
    pub maps_read_failures: u64,
    /// Processes with a module map now (gauge).
    pub processes: u64,
    /// The shared module cache's counters.
    pub modules: ModuleCacheStats,
}

/// Unwinds the stacks of any number of processes, sharing parsed modules between them. Not
/// thread-safe by design: one sample-processing thread owns it.
pub struct Unwinder {
    config: UnwindConfig,
    processes: HashMap<u32, ProcessMap>,
    modules: ModuleCache,
    cache: CacheX86_64,
    /// An unwinder without modules: framehop's fallback rule (frame pointers) for every
    /// address, used where a module has no CFI for the address.
    fp_only: CfiUnwinder,
    /// For CFI rows framehop does not apply exactly (stack realignment, expressions).
    evaluator: cfi_eval::Evaluator,
    stats: UnwindStats,
}

/// One step's way of unwinding.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StepKind {
    Cfi,
    Guess,
}

impl Unwinder {
    pub fn new(config: UnwindConfig) -> Self {
        Unwinder {
            config,
            processes: HashMap::new(),
            modules: ModuleCache::new(config.module_cache),
            cache: CacheX86_64::new(),
            fp_only: CfiUnwinder::new(),
            evaluator: cfi_eval::Evaluator::new(),
            stats: UnwindStats::default(),
        }
    }

    /// Counters (see [`UnwindStats`]).
    pub fn stats(&self) -> UnwindStats {
        let mut s = self.stats;
        s.modules = self.modules.stats;
        s.processes = self.processes.len() as u64;
        s
    }

    /// Drops everything known about `pid` (call when it exits or execs). Parsed modules stay in
    /// the shared cache for other processes until evicted.
    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Reads `pid`'s maps now and parses every module it maps (the work `unwind` would
    /// otherwise do lazily on the samples that first hit each module). Returns how many
    /// executable mappings have a parsed module.
    pub fn preload(&mut self, pid: u32) -> std::io::Result<usize> {
        let opts = self.open_options();
        let map = process_map(&mut self.processes, &mut self.stats, pid)?;
        let mut n = 0;
        for i in 0..map.entries.len() {
            if map
                .module(i, &mut self.modules, opts)
                .is_some_and(|m| m.id.is_some())
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The module holding process address `addr` of `pid` and the address's offset in it. For
    /// a frame's address pass [`lookup_address`] of it. `None` when `addr` is in no file-backed
    /// executable mapping (after a rate-limited re-read of the maps).
    pub fn normalize(&mut self, pid: u32, addr: u64) -> Option<NormalizedAddr> {
        let opts = self.open_options();
        let interval = self.config.maps_refresh_interval;
        let map = process_map(&mut self.processes, &mut self.stats, pid).ok()?;
        let i = match map.find(addr) {
            Some(i) => i,
            None => {
                if map.last_read.elapsed() < interval {
                    return None;
                }
                self.stats.maps_reads += 1;
                if map.refresh().is_err() {
                    self.stats.maps_read_failures += 1;
                    return None;
                }
                map.find(addr)?
            }
        };
        let module = map.module(i, &mut self.modules, opts)?;
        Some(NormalizedAddr {
            file_offset: module.file_offset_of(addr),
            vaddr: module.vaddr_of(addr),
            module,
        })
    }

    /// The stack that `sp` (a stack pointer of a thread of `pid`) is in: the readable,
    /// writable, non-executable mapping containing it (`low` 0 for the main thread's `[stack]`,
    /// which grows down), from the same read of `/proc/<pid>/maps` the unwinder keeps (re-read,
    /// at most once per [`UnwindConfig::maps_refresh_interval`], when `sp` is in no known
    /// mapping: a thread started after the last read). What the profiler registers so the
    /// kernel copies a thread's stack only up to its top (`ProfileProbes::set_stack_top`).
    ///
    /// glibc puts a thread's `struct pthread` and static TLS at the top of its stack mapping,
    /// so the bytes between the outermost frame and this top are a few KiB of those; a stack
    /// mapping the kernel merged with an adjacent writable mapping gives a top above the real
    /// one, which only costs copy size. `None` when `sp` is in no such mapping (or the maps
    /// cannot be read).
    pub fn stack_top(&mut self, pid: u32, sp: u64) -> Option<StackTop> {
        let interval = self.config.maps_refresh_interval;
        let map = process_map(&mut self.processes, &mut self.stats, pid).ok()?;
        let found = match map.writable_at(sp) {
            Some(m) => m,
            None => {
                if map.last_read.elapsed() < interval {
                    return None;
                }
                self.stats.maps_reads += 1;
                if map.refresh().is_err() {
                    self.stats.maps_read_failures += 1;
                    return None;
                }
                map.writable_at(sp)?
            }
        };
        Some(StackTop {
            top: found.end,
            low: if found.grows_down { 0 } else { found.start },
        })
    }

    /// Unwinds one sampled stack: `stack` holds the bytes the kernel copied from `regs.sp`
    /// upward.
    pub fn unwind(&mut self, pid: u32, regs: UserRegs, stack: &[u8]) -> UnwoundStack {
        let mut frames = Vec::with_capacity(32);
        let (outcome, guessed_frames) = self.unwind_into(pid, regs, stack, &mut frames);
        UnwoundStack {
            frames,
            outcome,
            guessed_frames,
        }
    }

    /// [`unwind`](Self::unwind) into a reused vector (cleared first); returns the outcome and
    /// the number of guessed frames.
    pub fn unwind_into(
        &mut self,
        pid: u32,
        regs: UserRegs,
        stack: &[u8],
        frames: &mut Vec<u64>,
    ) -> (UnwindOutcome, u32) {
        frames.clear();
        frames.push(regs.ip);
        let mut guessed = 0u32;
        let outcome = self.walk(pid, regs, stack, frames, &mut guessed);
        self.stats.samples += 1;
        self.stats.frames += frames.len() as u64;
        self.stats.guessed_frames += u64::from(guessed);
        match outcome {
            UnwindOutcome::Complete => self.stats.complete += 1,
            UnwindOutcome::Truncated(r) => self.stats.truncated.bump(r),
        }
        (outcome, guessed)
    }

    fn open_options(&self) -> OpenOptions {
        OpenOptions {
            use_map_files: self.config.use_map_files,
        }
    }

    fn walk(
        &mut self,
        pid: u32,
        regs: UserRegs,
        stack: &[u8],
        frames: &mut Vec<u64>,
        guessed: &mut u32,
    ) -> UnwindOutcome {
        use TruncatedReason::*;
        let opts = self.open_options();
        let interval = self.config.maps_refresh_interval;
        let max_frames = self.config.max_frames.max(1);
        let Unwinder {
            processes,
            modules,
            cache,
            fp_only,
            evaluator,
            stats,
            ..
        } = self;
        let Ok(map) = process_map(processes, stats, pid) else {
            return UnwindOutcome::Truncated(ProcessGone);
        };

        let stack_lo = regs.sp;
        let stack_hi = regs.sp.saturating_add(stack.len() as u64);
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            if addr >= stack_lo && addr.checked_add(8).is_some_and(|e| e <= stack_hi) {
                let off = (addr - stack_lo) as usize;
                let mut b = [0u8; 8];
                b.copy_from_slice(&stack[off..off + 8]);
                Ok(u64::from_le_bytes(b))
            } else {
                Err(())
            }
        };

        let mut uregs = UnwindRegsX86_64::new(regs.ip, regs.sp, regs.bp);
        // How the step that produced the current frame's address worked.
        let mut prev_step: Option<StepKind> = None;
        loop {
            let index = frames.len() - 1;
            let addr = frames[index];
            let lookup = lookup_address(index, addr);
            let mut found = map.find(lookup);
            if found.is_none() && map.last_read.elapsed() >= interval {
                stats.maps_reads += 1;
                match map.refresh() {
                    Ok(()) => found = map.find(lookup),
                    Err(_) => stats.maps_read_failures += 1,
                }
            }
            let guessed_here = prev_step == Some(StepKind::Guess);
            let Some(i) = found else {
                // Not code of this process: a return address recovered from garbage. The ip
                // itself is kept whatever it is.
                if index > 0 {
                    frames.pop();
                    if guessed_here {
                        *guessed -= 1;
                    }
                }
                return UnwindOutcome::Truncated(if guessed_here {
                    NoUnwindInfo
                } else {
                    UnmappedAddress
                });
            };
            if map.entries[i].backing == Backing::Anonymous {
                if guessed_here {
                    // A frame-pointer guess that lands in anonymous memory is as likely noise
                    // as JIT code: drop it and blame the module that lacked CFI.
                    frames.pop();
                    *guessed -= 1;
                    return UnwindOutcome::Truncated(NoUnwindInfo);
                }
                return UnwindOutcome::Truncated(UnmappedAddress);
            }
            let module = map.module(i, modules, opts);
            let located = module.as_ref().and_then(|m| {
                let bias = m.bias?;
                let obj = m.object.as_ref()?;
                let (fde_index, fde) = obj.data.fde_for(lookup.wrapping_sub(bias))?;
                Some((obj.clone(), bias, fde_index, fde))
            });
            let (step, result) = match &located {
                Some((obj, bias, fde_index, fde)) => {
                    let data = &obj.data;
                    let kind = data.fde_kind(*fde_index);
                    let mut k = kind.load(Ordering::Relaxed);
                    if k == 0 {
                        k = if evaluator.fde_is_simple(data, *fde) {
                            elf::FDE_SIMPLE
                        } else {
                            elf::FDE_COMPLEX
                        };
                        kind.store(k, Ordering::Relaxed);
                    }
                    let r = if k == elf::FDE_SIMPLE {
                        let unwinder = match fde.source {
                            CfiSource::EhFrame => data.eh.as_ref(),
                            CfiSource::DebugFrame => data.debug.as_ref(),
                        }
                        .expect("coverage entries come from a section with an unwinder");
                        let fa = frame_address(index, addr.wrapping_sub(*bias));
                        unwinder
                            .unwind_frame(fa, &mut uregs, cache, &mut read_stack)
                            .map_err(StepError::from)
                    } else {
                        stats.evaluated_steps += 1;
                        evaluator
                            .step(
                                data,
                                *fde,
                                lookup.wrapping_sub(*bias),
                                index == 0,
                                &mut uregs,
                                &mut read_stack,
                            )
                            .map_err(StepError::from)
                    };
                    (StepKind::Cfi, r)
                }
                None => {
                    // No CFI for this address. In a module that has CFI elsewhere, the ip is
                    // most likely in a hand-written stub outside any FDE (glibc's clone3 after
                    // the syscall, in the parent) where the return address is on top of the
                    // stack; everywhere else, frame pointers. A guess is taken only if it
                    // lands in code; the other is tried otherwise.
                    let leaf_first = index == 0 && module.as_ref().is_some_and(|m| m.has_cfi());
                    let before = uregs;
                    let mut attempt = |leaf: bool, uregs: &mut UnwindRegsX86_64| {
                        *uregs = before;
                        if leaf {
                            leaf_return(uregs, &mut read_stack)
                        } else {
                            let fa = frame_address(index, addr);
                            fp_only
                                .unwind_frame(fa, uregs, cache, &mut read_stack)
                                .map_err(StepError::from)
                        }
                    };
                    let lands_in_code = |r: &Result<Option<u64>, StepError>| match r {
                        Ok(Some(ra)) => map
                            .find(ra.wrapping_sub(1))
                            .is_some_and(|j| map.entries[j].backing != Backing::Anonymous),
                        _ => false,
                    };
                    let mut r = attempt(leaf_first, &mut uregs);
                    if index == 0 && !lands_in_code(&r) {
                        let other = attempt(!leaf_first, &mut uregs);
                        if lands_in_code(&other) {
                            r = other;
                        } else {
                            r = attempt(leaf_first, &mut uregs);
                        }
                    }
                    (StepKind::Guess, r)
                }
            };
            match result {
                Ok(Some(ra)) => {
                    if frames.len() >= max_frames {
                        // There is a caller, and no room for it.
                        return UnwindOutcome::Truncated(MaxDepth);
                    }
                    frames.push(ra);
                    if step == StepKind::Guess {
                        *guessed += 1;
                    }
                    prev_step = Some(step);
                }
                Ok(None) => {
                    return match step {
                        StepKind::Cfi => UnwindOutcome::Complete,
                        // A zero frame pointer only ends the walk; it proves nothing.
                        StepKind::Guess => UnwindOutcome::Truncated(NoUnwindInfo),
                    };
                }
                Err(e) => return UnwindOutcome::Truncated(classify_error(step, e, stack_hi)),
            }
        }
    }
}

/// The map of `pid`, read on first use.
fn process_map<'a>(
    processes: &'a mut HashMap<u32, ProcessMap>,
    stats: &mut UnwindStats,
    pid: u32,
) -> std::io::Result<&'a mut ProcessMap> {
    use std::collections::hash_map::Entry;
    match processes.entry(pid) {
        Entry::Occupied(o) => Ok(o.into_mut()),
        Entry::Vacant(v) => {
            stats.maps_reads += 1;
            match ProcessMap::read(pid) {
                Ok(m) => Ok(v.insert(m)),
                Err(e) => {
                    stats.maps_read_failures += 1;
                    Err(e)
                }
            }
        }
    }
}

/// The frame-pointer guess reading this far above the copy is taken as a real frame beyond it.
const GUESS_BEYOND_COPY_SLACK: u64 = 64 << 10;

/// Why one step failed.
#[derive(Clone, Copy, Debug)]
enum StepError {
    /// A stack read outside the copied bytes, at this address.
    Read(u64),
    /// Anything else: the rule could not be applied or did not advance.
    Unusable,
}

impl From<framehop::Error> for StepError {
    fn from(e: framehop::Error) -> Self {
        match e {
            framehop::Error::CouldNotReadStack(a) => StepError::Read(a),
            _ => StepError::Unusable,
        }
    }
}

impl From<cfi_eval::EvalError> for StepError {
    fn from(e: cfi_eval::EvalError) -> Self {
        match e {
            cfi_eval::EvalError::Read(a) => StepError::Read(a),
            cfi_eval::EvalError::Unusable => StepError::Unusable,
        }
    }
}

fn classify_error(step: StepKind, err: StepError, stack_hi: u64) -> TruncatedReason {
    use TruncatedReason::*;
    match (step, err) {
        (StepKind::Cfi, StepError::Read(a)) if a >= stack_hi => StackCopyExhausted,
        (StepKind::Cfi, _) => BadCfi,
        (StepKind::Guess, StepError::Read(a))
            if a >= stack_hi && a - stack_hi < GUESS_BEYOND_COPY_SLACK =>
        {
            StackCopyExhausted
        }
        (StepKind::Guess, _) => NoUnwindInfo,
    }
}

/// The guess for a leaf function without CFI: the return address is on top of the stack.
fn leaf_return(
    regs: &mut UnwindRegsX86_64,
    read_stack: &mut impl FnMut(u64) -> Result<u64, ()>,
) -> Result<Option<u64>, StepError> {
    let sp = regs.sp();
    let ra = read_stack(sp).map_err(|()| StepError::Read(sp))?;
    if ra == 0 {
        return Ok(None);
    }
    regs.set_ip(ra);
    regs.set_sp(sp.checked_add(8).ok_or(StepError::Unusable)?);
    Ok(Some(ra))
}

fn frame_address(index: usize, addr: u64) -> FrameAddress {
    if index == 0 {
        FrameAddress::from_instruction_pointer(addr)
    } else {
        // Return addresses are never 0 here: a zero return address ends the walk.
        FrameAddress::from_return_address(addr)
            .unwrap_or(FrameAddress::from_instruction_pointer(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// This thread's registers and up to 16 KiB of its stack, as the kernel would copy them
    /// when sampling it right here.
    #[inline(never)]
    fn sample_self() -> (UserRegs, Vec<u8>) {
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads three registers; no memory is touched.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]",
                "mov {sp}, rsp",
                "mov {bp}, rbp",
                ip = out(reg) ip,
                sp = out(reg) sp,
                bp = out(reg) bp,
            );
        }
        let mem = std::fs::File::open("/proc/self/mem").unwrap();
        let mut stack = Vec::new();
        let mut addr = sp;
        while stack.len() < 16384 {
            let want = (((addr | 0xfff) + 1 - addr) as usize).min(16384 - stack.len());
            let mut buf = vec![0u8; want];
            match mem.read_at(&mut buf, addr) {
                Ok(n) if n > 0 => {
                    stack.extend_from_slice(&buf[..n]);
                    addr += n as u64;
                }
                _ => break,
            }
        }
        (UserRegs { ip, sp, bp }, stack)
    }

    #[inline(never)]
    fn sampled_two_calls_deep() -> (UserRegs, Vec<u8>) {
        let r = sample_self();
        std::hint::black_box(r)
    }

    fn own_pid() -> u32 {
        std::process::id()
    }

    #[test]
    fn unwinds_its_own_thread_to_thread_start() {
        let (regs, stack) = sampled_two_calls_deep();
        let mut u = Unwinder::new(UnwindConfig::default());
        let s = u.unwind(own_pid(), regs, &stack);
        // The test harness runs each test on its own thread: the stack ends in clone3.
        assert_eq!(s.outcome, UnwindOutcome::Complete, "{s:x?}");
        assert_eq!(s.guessed_frames, 0);
        assert!(s.frames.len() >= 5, "{s:x?}");
        let st = u.stats();
        assert_eq!((st.samples, st.complete), (1, 1));
        assert!(st.modules.loaded >= 2, "{st:?}");
        // The ip is in sample_self, the first return address in its caller, both in the test
        // binary.
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        for (i, a) in s.lookup_addrs().take(2).enumerate() {
            let n = u.normalize(own_pid(), a).unwrap();
            assert_eq!(n.module.path, me, "frame {i}");
            assert!(n.module.has_cfi());
            assert!(n.module.build_id().is_some());
            assert_eq!(n.module.file_offset_of(a), n.file_offset);
        }
        // The last frame is libc's thread start.
        let last = s.lookup_addrs().last().unwrap();
        let n = u.normalize(own_pid(), last).unwrap();
        assert!(n.module.name().starts_with("libc"), "{:?}", n.module);
    }

    #[test]
    fn stack_tops_are_the_end_of_the_stack_mapping() {
        let mut u = Unwinder::new(UnwindConfig::default());
        let pid = own_pid();
        // This thread's stack (the test harness runs each test on its own thread) and a thread
        // started after the unwinder read the maps: both found, the latter by a re-read.
        let (regs, stack) = sample_self();
        let range = u.stack_top(pid, regs.sp).expect("sp is in a stack mapping");
        let top = range.top;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mapping = maps
            .lines()
            .find_map(|l| {
                let (range, rest) = l.split_once(' ')?;
                let (a, b) = range.split_once('-')?;
                let (a, b) = (
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                );
                (a <= regs.sp && regs.sp < b).then(|| (a, b, rest.to_string()))
            })
            .unwrap();
        assert_eq!((range.low, top), (mapping.0, mapping.1), "{}", mapping.2);
        assert!(mapping.2.starts_with("rw"), "{}", mapping.2);
        // A copy bounded by the top holds the whole stack: its unwind is complete.
        let to_top = (top - regs.sp) as usize;
        assert!(to_top <= stack.len() || stack.len() == 16384, "{to_top}");
        let bounded = &stack[..to_top.min(stack.len())];
        assert_eq!(
            u.unwind(pid, regs, bounded).outcome,
            UnwindOutcome::Complete
        );

        let reads = u.stats().maps_reads;
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let local = 0u64;
            tx.send(std::ptr::addr_of!(local) as u64).unwrap();
            let _ = done_rx.recv();
            std::hint::black_box(local);
        });
        let other_sp = rx.recv().unwrap();
        let mut fresh = Unwinder::new(UnwindConfig {
            maps_refresh_interval: Duration::ZERO,
            ..UnwindConfig::default()
        });
        let other = fresh.stack_top(pid, other_sp).unwrap();
        assert!(other.low <= other_sp && other_sp < other.top);
        assert!(other.top - other_sp < 16 << 20);
        assert_ne!(other, range);
        // Within the refresh interval an unknown address is not looked up again.
        assert_eq!(u.stack_top(pid, 0x1000), None);
        assert_eq!(u.stats().maps_reads, reads);
        // The main thread (blocked in a syscall while the harness runs tests: its sp is in
        // /proc/<pid>/syscall) is on [stack], which grows down: no low bound.
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/syscall")).unwrap();
        let fields: Vec<&str> = syscall.split_whitespace().collect();
        if fields.len() == 9 {
            let main_sp = u64::from_str_radix(fields[7].trim_start_matches("0x"), 16).unwrap();
            let main = fresh.stack_top(pid, main_sp).unwrap();
            let stack_line = maps.lines().find(|l| l.ends_with("[stack]")).unwrap();
            let end = stack_line.split(['-', ' ']).nth(1).unwrap();
            assert_eq!(main.top, u64::from_str_radix(end, 16).unwrap());
            assert_eq!(main.low, 0);
        }
        // Code and unmapped memory are no stack.
        assert_eq!(fresh.stack_top(pid, regs.ip), None);
        assert_eq!(fresh.stack_top(pid, 0x10), None);
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_short_copy_is_stack_copy_exhausted() {
        let (regs, stack) = sampled_two_calls_deep();
        let mut u = Unwinder::new(UnwindConfig::default());
        let full = u.unwind(own_pid(), regs, &stack);
        assert_eq!(full.outcome, UnwindOutcome::Complete);
        let cut = u.unwind(own_pid(), regs, &stack[..64]);
        assert_eq!(
            cut.outcome,
            UnwindOutcome::Truncated(TruncatedReason::StackCopyExhausted)
        );
        assert!(full.frames.starts_with(&cut.frames));
        let none = u.unwind(own_pid(), regs, &[]);
        assert_eq!(
            none.outcome,
            UnwindOutcome::Truncated(TruncatedReason::StackCopyExhausted)
        );
        assert_eq!(none.frames, vec![regs.ip]);
        assert_eq!(u.stats().truncated.stack_copy_exhausted, 2);
    }

    #[test]
    fn an_ip_outside_any_module_is_unmapped() {
        let (regs, stack) = sample_self();
        let mut u = Unwinder::new(UnwindConfig {
            maps_refresh_interval: Duration::ZERO,
            ..UnwindConfig::default()
        });
        let s = u.unwind(own_pid(), UserRegs { ip: 0x10, ..regs }, &stack);
        assert_eq!(
            s.outcome,
            UnwindOutcome::Truncated(TruncatedReason::UnmappedAddress)
        );
        assert_eq!(s.frames, vec![0x10]);
        assert!(u.normalize(own_pid(), 0x10).is_none());
        // The miss re-read the maps (interval zero).
        assert!(u.stats().maps_reads >= 2);
    }

    #[test]
    fn max_depth_cuts_and_counts() {
        let (regs, stack) = sampled_two_calls_deep();
        let mut u = Unwinder::new(UnwindConfig {
            max_frames: 2,
            ..UnwindConfig::default()
        });
        let s = u.unwind(own_pid(), regs, &stack);
        assert_eq!(
            s.outcome,
            UnwindOutcome::Truncated(TruncatedReason::MaxDepth),
            "{s:x?}"
        );
        assert_eq!(s.frames.len(), 2);
        assert_eq!(u.stats().truncated.max_depth, 1);
    }

    #[test]
    fn labels_are_stable() {
        let labels: Vec<&str> = TruncatedReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "stack_copy_exhausted",
                "no_unwind_info",
                "unmapped_address",
                "max_depth",
                "bad_cfi",
                "process_gone"
            ]
        );
        assert_eq!(lookup_address(0, 0x1000), 0x1000);
        assert_eq!(lookup_address(3, 0x1000), 0xfff);
    }

    #[test]
    fn unwinder_and_modules_cross_threads() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync>() {}
        send::<Unwinder>();
        send_sync::<ModuleInfo>();
        send_sync::<NormalizedAddr>();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Garbage registers and stack bytes against this process's real mappings: always an
        /// outcome, never a panic, never more frames than allowed, every counter consistent.
        #[test]
        fn garbage_never_panics(
            ip_pick in 0usize..4,
            ip_raw in proptest::num::u64::ANY,
            sp_off in 0u64..4096,
            bp in proptest::num::u64::ANY,
            words in proptest::collection::vec(proptest::num::u64::ANY, 0..512),
            plant in proptest::collection::vec((0usize..512, 0usize..64), 0..16),
        ) {
            thread_local! {
                static REAL: (UserRegs, Vec<u8>, Vec<u64>) = {
                    let (regs, stack) = sampled_two_calls_deep();
                    let frames = Unwinder::new(UnwindConfig::default()).unwind(std::process::id(), regs, &stack).frames;
                    (regs, stack, frames)
                };
            }
            REAL.with(|(regs, _stack, real_frames)| {
                // Plant real code addresses among random words so CFI rules run on junk.
                let mut words = words.clone();
                for (at, which) in &plant {
                    if let (Some(w), Some(f)) = (words.get_mut(*at), real_frames.get(*which % real_frames.len())) {
                        *w = *f;
                    }
                }
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                let ip = match ip_pick {
                    0 => ip_raw,
                    _ => real_frames[ip_pick % real_frames.len()],
                };
                let regs = UserRegs { ip, sp: regs.sp.wrapping_sub(sp_off * 8), bp };
                let mut u = Unwinder::new(UnwindConfig { max_frames: 64, ..UnwindConfig::default() });
                let s = u.unwind(std::process::id(), regs, &bytes);
                proptest::prop_assert!(!s.frames.is_empty() && s.frames.len() <= 64);
                proptest::prop_assert_eq!(s.frames[0], ip);
                let st = u.stats();
                proptest::prop_assert_eq!(st.samples, 1);
                proptest::prop_assert_eq!(st.complete + st.truncated.total(), 1);
                proptest::prop_assert!(s.guessed_frames as usize <= s.frames.len());
                Ok(())
            })?;
        }
    }
}
