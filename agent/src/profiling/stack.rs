//! The profiler's unsymbolized stack: kernel addresses, normalized native frames and resolved
//! Python frames of one sample, kept apart so they can be hashed and counted cheaply on the
//! sampling path and merged into one call stack only when a profile is built (merging Python
//! frames into the native stack needs the native frames' names).

use std::collections::HashSet;
use std::sync::Arc;

/// A native user frame normalized to its module, so it can be symbolized after the process
/// exited. `module == UNMAPPED` means the address belonged to no known mapping (`offset` then
/// holds the raw address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NativeFrame {
    pub module: u32,
    /// Offset into the module's file (what symbolizers take for ELF files).
    pub offset: u64,
}

impl NativeFrame {
    pub const UNMAPPED: u32 = u32::MAX;
}

/// A Python frame resolved to an interned function and a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PythonFrame {
    pub func: u32,
    pub line: u32,
    /// Outermost frame of one eval-loop invocation (see `infertap_common::profile::PY_FRAME_ENTRY`).
    pub entry: bool,
}

/// Why a native stack ends before its root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Truncation {
    /// The unwinder reached the end of the stack as its unwind information describes it.
    None,
    /// The unwinder stopped early; the reason's name (from the unwinder) labels a synthetic
    /// root frame so truncated stacks stay visible in flame graphs.
    Cut(&'static str),
}

/// One sample's stack, leaf first in every part.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RawStack {
    pub kernel: Box<[u64]>,
    pub native: Box<[NativeFrame]>,
    pub python: Box<[PythonFrame]>,
    pub truncation: Truncation,
}

impl RawStack {
    pub fn is_empty(&self) -> bool {
        self.kernel.is_empty() && self.native.is_empty() && self.python.is_empty()
    }
}

/// Interns stacks so repeated samples of the same stack share one allocation. Cleared at the end
/// of every interval: stacks still referenced elsewhere (the attribution window, a profile being
/// built) stay alive through their `Arc`s.
#[derive(Default)]
pub struct StackInterner {
    set: HashSet<Arc<RawStack>>,
}

impl StackInterner {
    pub fn intern(&mut self, s: RawStack) -> Arc<RawStack> {
        if let Some(a) = self.set.get(&s) {
            return a.clone();
        }
        let a = Arc::new(s);
        self.set.insert(a.clone());
        a
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    pub fn clear(&mut self) {
        self.set.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(n: u64) -> RawStack {
        RawStack {
            kernel: Box::new([]),
            native: vec![NativeFrame {
                module: 1,
                offset: n,
            }]
            .into(),
            python: Box::new([]),
            truncation: Truncation::None,
        }
    }

    #[test]
    fn interning_shares_equal_stacks() {
        let mut i = StackInterner::default();
        let a = i.intern(stack(1));
        let b = i.intern(stack(1));
        let c = i.intern(stack(2));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(i.len(), 2);
        i.clear();
        assert_eq!(
            *a,
            stack(1),
            "cleared interner keeps referenced stacks alive"
        );
    }
}
