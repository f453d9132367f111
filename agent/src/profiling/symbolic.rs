//! From raw stacks to named call stacks: kernel and native frames symbolized (`blazesym`
//! through `infertap_stacks::symbolize`, inlined functions included), Python frames named from
//! the interned function table, and the Python frames merged into the native stack in place of
//! the interpreter's eval-loop frames. Runs on the profile builder's thread, never on the
//! sampling path.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use infertap_stacks::python::functions::Function;
use infertap_stacks::python::merge::merge as merge_python;
use infertap_stacks::python::merge::Slot;
use infertap_stacks::symbolize::{SymFrame, Symbolizer};
use infertap_stacks::unwind::ModuleInfo;

use super::stack::{NativeFrame, RawStack, Truncation};

/// Modules referenced by native frames; `NativeFrame::module` indexes it. Append-only for the
/// life of the profiler, so indices stay valid in every window and aggregate.
#[derive(Clone, Default)]
pub struct ModuleTable {
    by_key: HashMap<(u64, u64, std::path::PathBuf), u32>,
    list: Vec<Arc<ModuleInfo>>,
}

impl ModuleTable {
    /// The index of the module's file (one per device, inode and path: the same library mapped
    /// by many processes is one module).
    pub fn intern(&mut self, m: &Arc<ModuleInfo>) -> u32 {
        let key = (m.dev, m.inode, m.path.clone());
        if let Some(&i) = self.by_key.get(&key) {
            return i;
        }
        let i = self.list.len() as u32;
        self.list.push(m.clone());
        self.by_key.insert(key, i);
        i
    }

    pub fn get(&self, i: u32) -> Option<&Arc<ModuleInfo>> {
        self.list.get(i as usize)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// A snapshot for another thread (the list of `Arc`s; the infos are shared).
    pub fn snapshot(&self) -> Arc<[Arc<ModuleInfo>]> {
        self.list.clone().into()
    }
}

/// Python functions by id (`PythonFrame::func`), as the builder thread needs them.
pub type FunctionSnapshot = HashMap<u32, Function>;

/// What kind of code a location is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    Kernel,
    Native,
    Python,
    /// A synthetic root frame naming why the native stack was cut.
    Truncated,
}

/// One function at one line (a location holds several when functions were inlined).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LineInfo {
    pub name: Arc<str>,
    pub file: Option<Arc<str>>,
    pub line: u32,
    /// First line of the function (Python), 0 when unknown.
    pub start_line: u32,
}

/// One location of a named stack: a Python frame, a native or kernel address with its
/// (inlined) functions innermost first, or the truncation marker.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    pub kind: FrameKind,
    /// Module index (native frames).
    pub module: Option<u32>,
    /// File offset (native), kernel address, or 0.
    pub address: u64,
    pub lines: Vec<LineInfo>,
}

impl Location {
    /// The outermost function at this location (the one the address belongs to).
    pub fn function(&self) -> &str {
        self.lines.last().map_or("?", |l| &l.name)
    }
}

/// How well the Python frames fit the native stack (for the profiler's counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeCounts {
    pub stacks: u64,
    /// Stacks with Python frames.
    pub with_python: u64,
    /// Stacks whose eval-loop frames and Python invocations matched one to one.
    pub exact: u64,
}

/// Names stacks; keeps the symbolizer's caches across calls.
pub struct Namer {
    symbolizer: Symbolizer,
    kernel_cache: HashMap<u64, Arc<[SymFrame]>>,
    strings: HashMap<String, Arc<str>>,
    pub merges: MergeCounts,
}

impl Namer {
    pub fn new(symbolizer: Symbolizer) -> Self {
        Namer {
            symbolizer,
            kernel_cache: HashMap::new(),
            strings: HashMap::new(),
            merges: MergeCounts::default(),
        }
    }

    pub fn symbolizer(&self) -> &Symbolizer {
        &self.symbolizer
    }

    fn s(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        if self.strings.len() > 1 << 20 {
            self.strings.clear();
        }
        let a: Arc<str> = s.into();
        self.strings.insert(s.to_owned(), a.clone());
        a
    }

    fn sym_lines(&mut self, frames: &[SymFrame]) -> Vec<LineInfo> {
        frames
            .iter()
            .map(|f| LineInfo {
                name: self.s(&f.function),
                file: f.file.as_deref().map(|p| self.s(p)),
                line: f.line.unwrap_or(0),
                start_line: 0,
            })
            .collect()
    }

    fn kernel(&mut self, index: usize, addr: u64) -> Location {
        // Every kernel frame but the interrupted instruction is a return address: look up the
        // call instruction before it.
        let lookup = if index == 0 {
            addr
        } else {
            addr.saturating_sub(1)
        };
        let frames = match self.kernel_cache.get(&lookup) {
            Some(f) => f.clone(),
            None => {
                let f = self
                    .symbolizer
                    .symbolize_kernel(&[lookup])
                    .pop()
                    .unwrap_or_else(|| Arc::from(Vec::new()));
                if self.kernel_cache.len() > 1 << 16 {
                    self.kernel_cache.clear();
                }
                self.kernel_cache.insert(lookup, f.clone());
                f
            }
        };
        Location {
            kind: FrameKind::Kernel,
            module: None,
            address: addr,
            lines: self.sym_lines(&frames),
        }
    }

    fn native_lines(&mut self, f: NativeFrame, modules: &[Arc<ModuleInfo>]) -> Vec<LineInfo> {
        let Some(m) = modules.get(f.module as usize) else {
            return vec![LineInfo {
                name: self.s(&format!("[unknown]+{:#x}", f.offset)),
                file: None,
                line: 0,
                start_line: 0,
            }];
        };
        let frames = self.symbolizer.symbolize(m, &[f.offset]).pop();
        match frames {
            Some(fr) if !fr.is_empty() => self.sym_lines(&fr),
            _ => vec![LineInfo {
                name: self.s(&format!("{}+{:#x}", module_name(&m.path), f.offset)),
                file: None,
                line: 0,
                start_line: 0,
            }],
        }
    }

    /// The named stack, leaf first: kernel frames, then the user frames with Python merged in,
    /// then a `[truncated: …]` root when the native unwind was cut.
    pub fn name(
        &mut self,
        stack: &RawStack,
        modules: &[Arc<ModuleInfo>],
        functions: &FunctionSnapshot,
    ) -> Vec<Location> {
        let mut out: Vec<Location> =
            Vec::with_capacity(stack.kernel.len() + stack.native.len() + stack.python.len() + 1);
        for (i, &a) in stack.kernel.iter().enumerate() {
            out.push(self.kernel(i, a));
        }
        let native: Vec<Vec<LineInfo>> = stack
            .native
            .iter()
            .map(|&f| self.native_lines(f, modules))
            .collect();
        self.merges.stacks += 1;
        let python: Vec<Location> = stack
            .python
            .iter()
            .map(|p| {
                let (name, file, start) = match functions.get(&p.func) {
                    Some(f) => (f.qualname.clone(), Some(f.filename.clone()), f.first_line),
                    None => (self.s("<unknown python function>"), None, 0),
                };
                Location {
                    kind: FrameKind::Python,
                    module: None,
                    address: 0,
                    lines: vec![LineInfo {
                        name,
                        file,
                        line: p.line,
                        start_line: start,
                    }],
                }
            })
            .collect();
        if python.is_empty() {
            for (i, lines) in native.into_iter().enumerate() {
                out.push(Location {
                    kind: FrameKind::Native,
                    module: Some(stack.native[i].module),
                    address: stack.native[i].offset,
                    lines,
                });
            }
        } else {
            self.merges.with_python += 1;
            let names: Vec<Vec<&str>> = native
                .iter()
                .map(|ls| ls.iter().map(|l| &*l.name).collect())
                .collect();
            let entry: Vec<bool> = stack.python.iter().map(|p| p.entry).collect();
            let merged = merge_python(&names, &entry);
            if merged.exact() {
                self.merges.exact += 1;
            }
            // Consecutive slots of one native frame become one location with those lines.
            let mut current: Option<(usize, Location)> = None;
            for slot in merged.slots {
                match slot {
                    Slot::Native { frame, inline } => {
                        let line = native[frame].get(inline).cloned();
                        match &mut current {
                            Some((f, loc)) if *f == frame => loc.lines.extend(line),
                            _ => {
                                if let Some((_, loc)) = current.take() {
                                    out.push(loc);
                                }
                                current = Some((
                                    frame,
                                    Location {
                                        kind: FrameKind::Native,
                                        module: Some(stack.native[frame].module),
                                        address: stack.native[frame].offset,
                                        lines: line.into_iter().collect(),
                                    },
                                ));
                            }
                        }
                    }
                    Slot::Python { frame } => {
                        if let Some((_, loc)) = current.take() {
                            out.push(loc);
                        }
                        out.push(python[frame].clone());
                    }
                }
            }
            if let Some((_, loc)) = current.take() {
                out.push(loc);
            }
        }
        if let Truncation::Cut(reason) = stack.truncation {
            out.push(Location {
                kind: FrameKind::Truncated,
                module: None,
                address: 0,
                lines: vec![LineInfo {
                    name: self.s(&format!("[truncated: {reason}]")),
                    file: None,
                    line: 0,
                    start_line: 0,
                }],
            });
        }
        out
    }
}

/// The file name of a module path (`libggml-cpu.so` of `/…/lib/libggml-cpu.so`).
pub fn module_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// A one-line rendering of a named stack, root first (`a;b;c`), for text output.
pub fn folded(locs: &[Location], max_frames: usize) -> String {
    let names: Vec<&str> = locs
        .iter()
        .rev()
        .flat_map(|l| l.lines.iter().rev().map(|li| &*li.name))
        .collect();
    let skip = names.len().saturating_sub(max_frames);
    let mut s = String::new();
    if skip > 0 {
        s.push_str("…;");
    }
    s.push_str(&names[skip..].join(";"));
    s
}
