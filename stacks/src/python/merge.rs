//! Merging a sample's Python frames into its native stack.
//!
//! Every invocation of CPython's eval loop (`_PyEval_EvalFrameDefault`) runs one or more Python
//! frames: the kernel marks the outermost frame of each invocation with `PY_FRAME_ENTRY`, which
//! splits the Python stack (innermost first) into *groups*, one per invocation. The native
//! stack has one `_PyEval_EvalFrameDefault` frame per invocation, in the same order, so the
//! k-th eval-loop frame from the leaf is replaced by the k-th group, and the native frames
//! around it stay where they are (a `llama_decode` called through ctypes stays above the Python
//! frame that called it; `main` and `Py_RunMain` stay below the module frame).
//!
//! When the counts disagree, nothing is dropped:
//! - more eval-loop frames than groups (the Python walk was cut, `PY_TRUNCATED`/`PY_ERROR`, or
//!   an invocation had not pushed its frame yet): the unmatched eval-loop frames, rootward, stay
//!   as native frames;
//! - more groups than eval-loop frames (the native unwind stopped early, or the eval loop's
//!   frames could not be symbolized): the remaining groups are appended at the root end, in
//!   order, so the Python stack stays whole and correctly nested among itself.
//!
//! The merge is pure: it returns positions ([`Slot`]s) into the caller's own frame lists.

use std::ops::Range;

/// The eval loop's symbol. GCC may split off parts (`_PyEval_EvalFrameDefault.cold`) or clone it
/// (`.constprop.0`); those count too.
pub const EVAL_FUNCTION: &str = "_PyEval_EvalFrameDefault";

/// Whether a native function name is CPython's eval loop (3.10–3.13).
pub fn is_eval_function(name: &str) -> bool {
    name.strip_prefix(EVAL_FUNCTION)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// One frame of a merged stack, leaf first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Native frame `frame`, its `inline`-th name (innermost inline first; 0 for a frame without
    /// names).
    Native { frame: usize, inline: usize },
    /// Python frame `frame` (index into the Python frames, innermost first).
    Python { frame: usize },
}

/// A merged stack and how well the two stacks matched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Leaf first.
    pub slots: Vec<Slot>,
    /// Eval-loop frames found in the native stack.
    pub eval_frames: usize,
    /// Python groups (invocations) in the Python stack.
    pub groups: usize,
    /// Eval-loop frames replaced by a group: `min(eval_frames, groups)`.
    pub replaced: usize,
}

impl Merged {
    /// Whether both stacks had the same number of invocations (no fallback was needed).
    pub fn exact(&self) -> bool {
        self.eval_frames == self.groups
    }
}

/// Splits Python frames (innermost first, `entry[i]` = frame i carries `PY_FRAME_ENTRY`) into
/// groups: each ends with an entry frame; frames after the last entry (a cut walk) form a final
/// group.
pub fn python_groups(entry: &[bool]) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    for (i, &e) in entry.iter().enumerate() {
        if e {
            groups.push(start..i + 1);
            start = i + 1;
        }
    }
    if start < entry.len() {
        groups.push(start..entry.len());
    }
    groups
}

/// Merges a native stack (leaf first; each frame's function names innermost inline first, the
/// last being the function that contains the address) with Python frames (innermost first,
/// given by their entry marks). See the module docs for the rules.
pub fn merge<S: AsRef<str>, F: AsRef<[S]>>(native: &[F], python_entry: &[bool]) -> Merged {
    let groups = python_groups(python_entry);
    let mut out = Merged {
        slots: Vec::with_capacity(native.len() + python_entry.len()),
        groups: groups.len(),
        ..Default::default()
    };
    let mut next = 0;
    for (i, f) in native.iter().enumerate() {
        let names = f.as_ref();
        if names.is_empty() {
            out.slots.push(Slot::Native {
                frame: i,
                inline: 0,
            });
            continue;
        }
        for (j, n) in names.iter().enumerate() {
            if is_eval_function(n.as_ref()) {
                out.eval_frames += 1;
                if let Some(g) = groups.get(next) {
                    out.slots
                        .extend(g.clone().map(|frame| Slot::Python { frame }));
                    next += 1;
                    continue;
                }
            }
            out.slots.push(Slot::Native {
                frame: i,
                inline: j,
            });
        }
    }
    out.replaced = next;
    for g in &groups[next..] {
        out.slots
            .extend(g.clone().map(|frame| Slot::Python { frame }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(stack: &[&[&str]], m: &Merged, py: &[&str]) -> Vec<String> {
        m.slots
            .iter()
            .map(|s| match *s {
                Slot::Native { frame, inline } => stack[frame]
                    .get(inline)
                    .map_or("?".to_string(), |n| n.to_string()),
                Slot::Python { frame } => format!("py:{}", py[frame]),
            })
            .collect()
    }

    #[test]
    fn eval_names() {
        assert!(is_eval_function("_PyEval_EvalFrameDefault"));
        assert!(is_eval_function("_PyEval_EvalFrameDefault.cold"));
        assert!(!is_eval_function("_PyEval_EvalFrameDefaultX"));
        assert!(!is_eval_function("_PyEval_EvalFrame"));
        assert!(!is_eval_function("PyEval_EvalCode"));
    }

    #[test]
    fn ctypes_call_sits_above_its_python_caller() {
        // inner() calls llama_decode through ctypes; outer() → method() run in one eval
        // invocation (3.11+), the module in another.
        let native: &[&[&str]] = &[
            &["llama_decode"],
            &["ffi_call_unix64"],
            &["_ctypes_callproc"],
            &["_PyEval_EvalFrameDefault"],
            &["_PyEval_Vector"],
            &["_PyEval_EvalFrameDefault"],
            &["PyEval_EvalCode"],
            &["Py_RunMain"],
            &["main"],
        ];
        let py = ["inner", "Klass.method", "outer", "<module>"];
        let entry = [false, false, true, true];
        let m = merge(native, &entry);
        assert!(m.exact());
        assert_eq!(
            names(native, &m, &py),
            [
                "llama_decode",
                "ffi_call_unix64",
                "_ctypes_callproc",
                "py:inner",
                "py:Klass.method",
                "py:outer",
                "_PyEval_Vector",
                "py:<module>",
                "PyEval_EvalCode",
                "Py_RunMain",
                "main"
            ]
        );
    }

    #[test]
    fn inlined_names_around_the_eval_loop_are_kept() {
        let native: &[&[&str]] = &[
            &[
                "_Py_DECREF",
                "_PyEval_EvalFrameDefault",
                "_PyEval_EvalFrame",
            ],
            &["main"],
        ];
        let py = ["f"];
        let m = merge(native, &[true]);
        assert_eq!(
            names(native, &m, &py),
            ["_Py_DECREF", "py:f", "_PyEval_EvalFrame", "main"]
        );
    }

    #[test]
    fn truncated_native_stack_appends_groups_at_the_root() {
        // The unwind stopped after the first eval frame: two groups have no native frame.
        let native: &[&[&str]] = &[&["memcpy"], &["_PyEval_EvalFrameDefault"], &[]];
        let py = ["a", "b", "c"];
        let m = merge(native, &[true, true, true]);
        assert_eq!((m.eval_frames, m.groups, m.replaced), (1, 3, 1));
        assert_eq!(
            names(native, &m, &py),
            ["memcpy", "py:a", "?", "py:b", "py:c"]
        );
    }

    #[test]
    fn cut_python_walk_keeps_extra_eval_frames() {
        let native: &[&[&str]] = &[
            &["_PyEval_EvalFrameDefault"],
            &["_PyEval_EvalFrameDefault"],
            &["main"],
        ];
        let py = ["a", "b"];
        // "b" has no entry mark: the walk was cut there.
        let m = merge(native, &[true, false]);
        assert_eq!((m.eval_frames, m.groups, m.replaced), (2, 2, 2));
        let m = merge(native, &[false, false]);
        assert_eq!((m.eval_frames, m.groups, m.replaced), (2, 1, 1));
        assert_eq!(
            names(native, &m, &py),
            ["py:a", "py:b", "_PyEval_EvalFrameDefault", "main"]
        );
    }

    #[test]
    fn groups() {
        assert_eq!(python_groups(&[]), Vec::<Range<usize>>::new());
        assert_eq!(python_groups(&[true, true]), vec![0..1, 1..2]);
        assert_eq!(python_groups(&[false, true, false]), vec![0..2, 2..3]);
    }

    fn native_stack() -> impl Strategy<Value = Vec<Vec<String>>> {
        let name = prop_oneof![
            3 => Just(EVAL_FUNCTION.to_string()),
            1 => Just(format!("{EVAL_FUNCTION}.cold")),
            4 => "[a-z]{1,3}".prop_map(|s| s),
        ];
        prop::collection::vec(prop::collection::vec(name, 0..3), 0..24)
    }

    proptest! {
        #[test]
        fn no_frame_is_lost_or_duplicated(native in native_stack(),
                                          entry in prop::collection::vec(any::<bool>(), 0..24)) {
            let m = merge(&native, &entry);
            let groups = python_groups(&entry);
            // Every Python frame exactly once, in order.
            let py: Vec<usize> = m.slots.iter().filter_map(|s| match *s {
                Slot::Python { frame } => Some(frame), _ => None }).collect();
            prop_assert_eq!(py, (0..entry.len()).collect::<Vec<_>>());
            // Every native (frame, name) exactly once, in order, except the replaced eval
            // names, which are the first `replaced` eval names from the leaf.
            let mut expected = Vec::new();
            let mut evals_seen = 0;
            for (i, f) in native.iter().enumerate() {
                if f.is_empty() { expected.push((i, 0)); continue; }
                for (j, n) in f.iter().enumerate() {
                    if is_eval_function(n) {
                        evals_seen += 1;
                        if evals_seen <= m.replaced { continue; }
                    }
                    expected.push((i, j));
                }
            }
            let nat: Vec<(usize, usize)> = m.slots.iter().filter_map(|s| match *s {
                Slot::Native { frame, inline } => Some((frame, inline)), _ => None }).collect();
            prop_assert_eq!(nat, expected);
            prop_assert_eq!(m.eval_frames, evals_seen);
            prop_assert_eq!(m.groups, groups.len());
            prop_assert_eq!(m.replaced, evals_seen.min(groups.len()));
            // Groups stay contiguous; unmatched groups come after every native frame.
            for (k, g) in groups.iter().enumerate() {
                let first = m.slots.iter().position(|s| *s == Slot::Python { frame: g.start }).unwrap();
                for (d, frame) in g.clone().enumerate() {
                    prop_assert_eq!(m.slots[first + d], Slot::Python { frame });
                }
                if k >= m.replaced {
                    let only_python = m.slots[first..].iter().all(|s| matches!(s, Slot::Python { .. }));
                    prop_assert!(only_python, "unmatched group {} before a native frame", k);
                }
            }
        }
    }
}
