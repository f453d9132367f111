//! Symbolization of normalized native addresses and kernel addresses (`blazesym`): demangled
//! C++/Rust names, inlined frames and file:line where DWARF exists (in the file, a `.dwp`, or a
//! debug link under the debug directories), the symbol's start address; kernel addresses via
//! `/proc/kallsyms`.
//!
//! # Input
//! - [`Symbolizer::symbolize`] takes one module ([`ModuleInfo`], from
//!   [`Unwinder::normalize`](crate::unwind::Unwinder::normalize)) and **file offsets** in it
//!   ([`NormalizedAddr::file_offset`](crate::unwind::NormalizedAddr)) of *lookup* addresses:
//!   return addresses must already be moved back into the call instruction
//!   ([`lookup_address`](crate::unwind::lookup_address)), or the line (and with inlining, the
//!   function) reported is that of the instruction after the call.
//! - [`Symbolizer::symbolize_kernel`] takes kernel lookup addresses (the first address of
//!   `bpf_get_stack` as is, the return addresses after it minus one).
//!
//! # Output
//! One [`Symbolized`] per input address: the frames at that address, **innermost first** (an
//! address in `f` where `g` was inlined, with `h` inlined into `g`, gives `h`, `g`, `f`; only the
//! last, `f`, is a physical frame). Where nothing is known (a stripped file without the symbol,
//! a file that cannot be read, an address outside any symbol) the result is one frame named
//! `<module file name>+0x<file offset>` (kernel: `[kernel]+0x<address>`) with `resolved: false`,
//! never an error: the sample keeps its frame.
//!
//! # Threading and caching
//! `blazesym`'s symbolizer is single-threaded (`!Send`), and parsing DWARF costs milliseconds to
//! seconds for large files: create a [`Symbolizer`] on a thread of its own, feed it batches off
//! the sampling path ([`spawn`] does exactly that). Results are cached per file (device, inode,
//! size, mtime of the file read) and file offset, so one libpython serves every process; the cache
//! holds at most [`SymbolizerConfig::max_cached_addrs`] addresses (the older half is dropped when
//! it fills) and blazesym keeps at most [`SymbolizerConfig::max_open_modules`] files parsed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use blazesym::symbolize::source::{Elf, Kernel, Source};
use blazesym::symbolize::{Input, Sym, Symbolized as BzSymbolized};
use blazesym::MaybeDefault;

use crate::unwind::{FileId, ModuleInfo};

/// One (possibly inlined) function at an address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SymFrame {
    /// Demangled function name; for an unresolved address `<module>+0x<file offset>`.
    pub function: String,
    /// Source file (with its directory where DWARF gives one).
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u16>,
    /// Inlined into the next frame of the same address (not a physical frame).
    pub inlined: bool,
    /// Start of the physical function, as an ELF virtual address (what `nm` shows; kernel: the
    /// kallsyms address). `None` for inlined frames and unresolved addresses.
    pub sym_addr: Option<u64>,
    /// How far the address is into that function, bytes.
    pub sym_offset: Option<u64>,
    /// False for the fallback name.
    pub resolved: bool,
}

/// The frames at one address, innermost first (never empty).
pub type Symbolized = Arc<[SymFrame]>;

/// Settings of a [`Symbolizer`].
#[derive(Clone, Debug)]
pub struct SymbolizerConfig {
    /// Most (module, offset) and kernel addresses cached.
    pub max_cached_addrs: usize,
    /// Most modules blazesym keeps parsed (each also holds an open file).
    pub max_open_modules: usize,
    /// Where debug-link targets are searched (`/usr/lib/debug` by default).
    pub debug_dirs: Vec<PathBuf>,
    /// Read DWARF (lines, inlined functions); false: symbol tables only.
    pub debug_syms: bool,
    /// Kernel symbols from this kallsyms file (`/proc/kallsyms` by default; `None`: kernel
    /// addresses get the fallback name).
    pub kallsyms: Option<PathBuf>,
}

impl Default for SymbolizerConfig {
    fn default() -> Self {
        SymbolizerConfig {
            max_cached_addrs: 1 << 20,
            max_open_modules: 256,
            debug_dirs: vec![PathBuf::from("/usr/lib/debug")],
            debug_syms: true,
            kallsyms: Some(PathBuf::from("/proc/kallsyms")),
        }
    }
}

/// Counters of a [`Symbolizer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolizeStats {
    /// Addresses asked for.
    pub addrs: u64,
    /// Answered from the cache.
    pub cache_hits: u64,
    /// Resolved to a name by blazesym.
    pub resolved: u64,
    /// Given the fallback name (no symbol, unreadable file, error).
    pub unresolved: u64,
    /// blazesym calls that failed as a whole (the batch got fallback names).
    pub errors: u64,
    /// Modules whose parsed data was dropped to stay within `max_open_modules`.
    pub modules_evicted: u64,
}

/// Which file a module's addresses are symbolized from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum FileKey {
    /// The open file's identity (device, inode, size, mtime).
    Open(FileId),
    /// A module whose file could not be opened: every address gets the fallback name.
    Unopened { dev: u64, inode: u64 },
}

impl FileKey {
    fn of(module: &ModuleInfo) -> FileKey {
        match module.file_id() {
            Some(id) => FileKey::Open(id),
            None => FileKey::Unopened {
                dev: module.dev,
                inode: module.inode,
            },
        }
    }
}

/// Cache key of one address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum AddrKey {
    Module(FileKey, u64),
    Kernel(u64),
}

/// A bounded map that drops its older half when full (two generations): cheap, and an entry
/// used in the last half-capacity lookups survives.
struct TwoGenCache {
    young: HashMap<AddrKey, Symbolized>,
    old: HashMap<AddrKey, Symbolized>,
    half: usize,
}

impl TwoGenCache {
    fn new(max: usize) -> Self {
        TwoGenCache {
            young: HashMap::new(),
            old: HashMap::new(),
            half: (max / 2).max(1),
        }
    }

    fn get(&mut self, k: &AddrKey) -> Option<Symbolized> {
        if let Some(v) = self.young.get(k) {
            return Some(v.clone());
        }
        let v = self.old.remove(k)?;
        self.insert(k.clone(), v.clone());
        Some(v)
    }

    fn insert(&mut self, k: AddrKey, v: Symbolized) {
        if self.young.len() >= self.half {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(k, v);
    }
}

/// Symbolizes batches of addresses (see the module docs). `!Send`: lives on its own thread.
pub struct Symbolizer {
    inner: blazesym::symbolize::Symbolizer,
    config: SymbolizerConfig,
    cache: TwoGenCache,
    /// Files blazesym holds, with the path it knows them by and when they were last used.
    open: HashMap<FileKey, (PathBuf, u64)>,
    clock: u64,
    stats: SymbolizeStats,
    /// PLT stubs per file: symbol tables have no symbols for them, so without this an address
    /// in `.plt` would be named after whatever symbol precedes the section (often `_init`).
    plts: HashMap<FileKey, Arc<PltTable>>,
}

impl Symbolizer {
    pub fn new(config: SymbolizerConfig) -> Self {
        let inner = blazesym::symbolize::Symbolizer::builder()
            .enable_code_info(config.debug_syms)
            .enable_inlined_fns(config.debug_syms)
            .enable_demangling(true)
            .enable_auto_reload(true)
            .set_debug_dirs(Some(config.debug_dirs.clone()))
            .build();
        Symbolizer {
            inner,
            cache: TwoGenCache::new(config.max_cached_addrs),
            config,
            open: HashMap::new(),
            clock: 0,
            stats: SymbolizeStats::default(),
            plts: HashMap::new(),
        }
    }

    pub fn stats(&self) -> SymbolizeStats {
        self.stats
    }

    /// Symbolizes `file_offsets` (of lookup addresses) in `module`; one result per offset, in
    /// order.
    pub fn symbolize(&mut self, module: &ModuleInfo, file_offsets: &[u64]) -> Vec<Symbolized> {
        self.stats.addrs += file_offsets.len() as u64;
        let key = FileKey::of(module);
        let mut out: Vec<Option<Symbolized>> = Vec::with_capacity(file_offsets.len());
        let mut missing = Vec::new();
        for (i, &off) in file_offsets.iter().enumerate() {
            match self.cache.get(&AddrKey::Module(key, off)) {
                Some(v) => {
                    self.stats.cache_hits += 1;
                    out.push(Some(v));
                }
                None => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        if !missing.is_empty() {
            let offs: Vec<u64> = missing.iter().map(|&i| file_offsets[i]).collect();
            let resolved = self.resolve_module(module, &key, &offs);
            for (&i, v) in missing.iter().zip(resolved) {
                self.cache
                    .insert(AddrKey::Module(key, file_offsets[i]), v.clone());
                out[i] = Some(v);
            }
        }
        out.into_iter()
            .map(|v| v.expect("every slot filled"))
            .collect()
    }

    /// Symbolizes kernel lookup addresses; one result per address, in order.
    pub fn symbolize_kernel(&mut self, addrs: &[u64]) -> Vec<Symbolized> {
        self.stats.addrs += addrs.len() as u64;
        let mut out: Vec<Option<Symbolized>> = Vec::with_capacity(addrs.len());
        let mut missing = Vec::new();
        for (i, &a) in addrs.iter().enumerate() {
            match self.cache.get(&AddrKey::Kernel(a)) {
                Some(v) => {
                    self.stats.cache_hits += 1;
                    out.push(Some(v));
                }
                None => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        if !missing.is_empty() {
            let want: Vec<u64> = missing.iter().map(|&i| addrs[i]).collect();
            let resolved = self.resolve_kernel(&want);
            for (&i, v) in missing.iter().zip(resolved) {
                self.cache.insert(AddrKey::Kernel(addrs[i]), v.clone());
                out[i] = Some(v);
            }
        }
        out.into_iter()
            .map(|v| v.expect("every slot filled"))
            .collect()
    }

    fn resolve_kernel(&mut self, addrs: &[u64]) -> Vec<Symbolized> {
        let fallback = |a: u64| fallback_frame(format!("[kernel]+{a:#x}"));
        let Some(kallsyms) = self.config.kallsyms.clone() else {
            self.stats.unresolved += addrs.len() as u64;
            return addrs.iter().map(|&a| fallback(a)).collect();
        };
        let src = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Some(kallsyms),
            vmlinux: MaybeDefault::None,
            debug_syms: false,
            ..Kernel::default()
        });
        match self.inner.symbolize(&src, Input::AbsAddr(addrs)) {
            Ok(res) => res
                .into_iter()
                .zip(addrs)
                .map(|(r, &a)| match r {
                    BzSymbolized::Sym(sym) => {
                        self.stats.resolved += 1;
                        frames_of(sym, None)
                    }
                    BzSymbolized::Unknown(_) => {
                        self.stats.unresolved += 1;
                        fallback(a)
                    }
                })
                .collect(),
            Err(e) => {
                tracing::debug!("kernel symbolization failed: {e}");
                self.stats.errors += 1;
                self.stats.unresolved += addrs.len() as u64;
                addrs.iter().map(|&a| fallback(a)).collect()
            }
        }
    }

    fn resolve_module(
        &mut self,
        module: &ModuleInfo,
        key: &FileKey,
        offs: &[u64],
    ) -> Vec<Symbolized> {
        let name = module.name().to_string();
        let fallback = |off: u64| fallback_frame(format!("{name}+{off:#x}"));
        let Some(path) = self.path_for(module, key) else {
            self.stats.unresolved += offs.len() as u64;
            return offs.iter().map(|&o| fallback(o)).collect();
        };
        let plt = self
            .plts
            .entry(*key)
            .or_insert_with(|| Arc::new(PltTable::read(&path)))
            .clone();
        if !plt.is_empty() && offs.iter().any(|&o| plt.name_of(o).is_some()) {
            // Stubs by name; the rest through blazesym.
            let rest: Vec<u64> = offs
                .iter()
                .copied()
                .filter(|&o| plt.name_of(o).is_none())
                .collect();
            let mut named = if rest.is_empty() {
                Vec::new()
            } else {
                self.resolve_module(module, key, &rest)
            }
            .into_iter();
            return offs
                .iter()
                .map(|&o| match plt.name_of(o) {
                    Some(n) => {
                        self.stats.resolved += 1;
                        plt_frame(n)
                    }
                    None => named.next().unwrap_or_else(|| fallback(o)),
                })
                .collect();
        }
        let mut elf = Elf::new(path.clone());
        elf.debug_syms = self.config.debug_syms;
        let src = Source::Elf(elf);
        // DWARF names a function without a linkage name (a static function, a lambda, some
        // template instances) by its bare `DW_AT_name`, without namespaces or classes; the
        // symbol table's demangled name of the same function is qualified. Physical frames get
        // that one.
        let symtab_names: Vec<Option<(u64, String)>> = if self.config.debug_syms {
            let mut plain = Elf::new(path);
            plain.debug_syms = false;
            match self
                .inner
                .symbolize(&Source::Elf(plain), Input::FileOffset(offs))
            {
                Ok(res) => res
                    .into_iter()
                    .map(|r| match r {
                        BzSymbolized::Sym(sym) => Some((sym.addr, sym.name.into_owned())),
                        BzSymbolized::Unknown(_) => None,
                    })
                    .collect(),
                Err(_) => vec![None; offs.len()],
            }
        } else {
            vec![None; offs.len()]
        };
        match self.inner.symbolize(&src, Input::FileOffset(offs)) {
            Ok(res) => res
                .into_iter()
                .zip(offs)
                .zip(symtab_names)
                .map(|((r, &o), symtab)| match r {
                    BzSymbolized::Sym(sym) => {
                        self.stats.resolved += 1;
                        let qualified = symtab
                            .filter(|(start, name)| {
                                *start == sym.addr && qualifies(name, &sym.name)
                            })
                            .map(|(_, name)| name);
                        frames_of(sym, qualified)
                    }
                    BzSymbolized::Unknown(_) => {
                        self.stats.unresolved += 1;
                        fallback(o)
                    }
                })
                .collect(),
            Err(e) => {
                tracing::debug!(module = %module.path.display(), "symbolization failed: {e}");
                self.stats.errors += 1;
                self.stats.unresolved += offs.len() as u64;
                offs.iter().map(|&o| fallback(o)).collect()
            }
        }
    }

    /// The path blazesym knows `module`'s file by (`/proc/self/fd/<n>` of the descriptor the
    /// module holds), registering it on first use and dropping the least recently used file
    /// past the limit.
    fn path_for(&mut self, module: &ModuleInfo, key: &FileKey) -> Option<PathBuf> {
        self.clock += 1;
        let path = module.agent_path()?;
        match self.open.get_mut(key) {
            Some((p, used)) if *p == path => {
                *used = self.clock;
                return Some(path);
            }
            // The same file reached through another descriptor (the module was parsed again):
            // forget the old path, whose number may since belong to another file.
            Some(_) => {
                if let Some((old, _)) = self.open.remove(key) {
                    self.evict_path(old);
                }
            }
            None => {}
        }
        if self.open.len() >= self.config.max_open_modules.max(1) {
            if let Some(victim) = self
                .open
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            {
                if let Some((p, _)) = self.open.remove(&victim) {
                    self.evict_path(p);
                    self.stats.modules_evicted += 1;
                }
            }
        }
        self.open.insert(*key, (path.clone(), self.clock));
        Some(path)
    }

    fn evict_path(&mut self, path: PathBuf) {
        let _ = self.inner.evict(&blazesym::symbolize::evict::Evict::Elf(
            blazesym::symbolize::evict::Elf::new(path),
        ));
    }
}

/// Whether symbol-table name `symtab` is a namespace- or class-qualified spelling of the bare
/// DWARF name `dwarf` (`void infer::apply<…>(…)` for `apply<…>`), not merely another alias of
/// the same address (`gsignal` for `raise`).
fn qualifies(symtab: &str, dwarf: &str) -> bool {
    fn base(s: &str) -> &str {
        &s[..s.find(['(', '<']).unwrap_or(s.len())]
    }
    let d = base(dwarf);
    !d.is_empty() && !d.contains("::") && base(symtab).ends_with(&format!("::{d}"))
}

/// PLT stubs of one ELF file: file-offset ranges of `.plt`, `.plt.sec` and `.plt.got` entries
/// with the symbol each jumps to (`memcpy@plt`), decoded from the entry's `jmp *GOT(%rip)` and
/// the dynamic relocation of that GOT slot. Entries whose slot has no relocation (PLT0) are
/// named `[plt]`.
#[derive(Debug, Default)]
pub struct PltTable {
    /// (start, end, name), sorted by start.
    entries: Vec<(u64, u64, String)>,
}

impl PltTable {
    /// Reads `path` lazily (section headers, the PLT sections, relocations and dynamic symbols
    /// only); any error gives an empty table.
    pub fn read(path: &std::path::Path) -> PltTable {
        let Ok(file) = std::fs::File::open(path) else {
            return PltTable::default();
        };
        let cache = object::read::ReadCache::new(file);
        PltTable::parse(&cache).unwrap_or_default()
    }

    fn parse<'d, R: object::ReadRef<'d>>(data: R) -> Option<PltTable> {
        use object::{Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, RelocationTarget};
        let file = object::File::parse(data).ok()?;
        if file.architecture() != object::Architecture::X86_64 {
            return None;
        }
        // GOT slot address → symbol name, from the dynamic relocations (JUMP_SLOT, GLOB_DAT),
        // whose symbol indices are into the dynamic symbol table.
        let dynsym = file.dynamic_symbol_table()?;
        let mut slots: HashMap<u64, String> = HashMap::new();
        for (offset, rel) in file.dynamic_relocations()? {
            if let RelocationTarget::Symbol(idx) = rel.target() {
                if let Ok(sym) = dynsym.symbol_by_index(idx) {
                    if let Ok(name) = sym.name() {
                        if !name.is_empty() {
                            slots.insert(offset, name.to_owned());
                        }
                    }
                }
            }
        }
        let mut entries = Vec::new();
        for sec in file.sections() {
            let name = sec.name().unwrap_or("");
            if !matches!(name, ".plt" | ".plt.sec" | ".plt.got") {
                continue;
            }
            let (Some((file_off, _)), Ok(bytes)) = (sec.file_range(), sec.data()) else {
                continue;
            };
            let entsize = if name == ".plt.got" && bytes.len() % 16 != 0 {
                8
            } else {
                16
            };
            for (i, entry) in bytes.chunks(entsize).enumerate() {
                let start = (i * entsize) as u64;
                // `jmp *disp32(%rip)`, maybe after `endbr64` / with a `bnd` prefix.
                let target = entry.windows(6).enumerate().find_map(|(j, w)| {
                    (w[0] == 0xff && w[1] == 0x25).then(|| {
                        let disp = i32::from_le_bytes([w[2], w[3], w[4], w[5]]) as i64;
                        (sec.address() as i64 + start as i64 + j as i64 + 6 + disp) as u64
                    })
                });
                let label = match target.and_then(|t| slots.get(&t)) {
                    Some(n) => format!("{}@plt", n.split('@').next().unwrap_or(n)),
                    None => "[plt]".to_owned(),
                };
                entries.push((file_off + start, file_off + start + entsize as u64, label));
            }
        }
        entries.sort_by_key(|e| e.0);
        Some(PltTable { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The stub containing file offset `off`, if any.
    pub fn name_of(&self, off: u64) -> Option<&str> {
        let i = self
            .entries
            .partition_point(|e| e.0 <= off)
            .checked_sub(1)?;
        let (s, e, n) = &self.entries[i];
        (off >= *s && off < *e).then_some(n.as_str())
    }
}

fn plt_frame(name: &str) -> Symbolized {
    Arc::from([SymFrame {
        function: name.to_owned(),
        file: None,
        line: None,
        column: None,
        inlined: false,
        sym_addr: None,
        sym_offset: None,
        resolved: true,
    }])
}

fn fallback_frame(function: String) -> Symbolized {
    Arc::from([SymFrame {
        function,
        file: None,
        line: None,
        column: None,
        inlined: false,
        sym_addr: None,
        sym_offset: None,
        resolved: false,
    }])
}

fn code_location(
    ci: Option<&blazesym::symbolize::CodeInfo<'_>>,
) -> (Option<String>, Option<u32>, Option<u16>) {
    match ci {
        Some(ci) => (
            Some(ci.to_path().to_string_lossy().into_owned()),
            ci.line,
            ci.column,
        ),
        None => (None, None, None),
    }
}

/// blazesym lists inlined functions outermost first, each with the location inside it; turn
/// that into frames innermost first. `physical_name` replaces the physical function's name.
fn frames_of(sym: Sym<'_>, physical_name: Option<String>) -> Symbolized {
    let mut frames = Vec::with_capacity(1 + sym.inlined.len());
    for f in sym.inlined.iter().rev() {
        let (file, line, column) = code_location(f.code_info.as_ref());
        frames.push(SymFrame {
            function: f.name.to_string(),
            file,
            line,
            column,
            inlined: true,
            sym_addr: None,
            sym_offset: None,
            resolved: true,
        });
    }
    let (file, line, column) = code_location(sym.code_info.as_deref());
    frames.push(SymFrame {
        function: physical_name.unwrap_or_else(|| sym.name.to_string()),
        file,
        line,
        column,
        inlined: false,
        sym_addr: Some(sym.addr),
        sym_offset: Some(sym.offset as u64),
        resolved: true,
    });
    Arc::from(frames)
}

/// A batch for the symbolizer thread: addresses of one module, or kernel addresses.
pub enum Request {
    Module {
        module: Arc<ModuleInfo>,
        file_offsets: Vec<u64>,
        reply: std::sync::mpsc::SyncSender<Vec<Symbolized>>,
    },
    Kernel {
        addrs: Vec<u64>,
        reply: std::sync::mpsc::SyncSender<Vec<Symbolized>>,
    },
}

/// Handle of a symbolizer thread started by [`spawn`]. Dropping every clone ends the thread.
#[derive(Clone)]
pub struct SymbolizerHandle {
    tx: std::sync::mpsc::SyncSender<Request>,
}

impl SymbolizerHandle {
    /// Queues a request; `Err` gives it back when the queue is full (the caller decides to drop
    /// or retry: it never blocks the sampling path).
    pub fn try_submit(&self, req: Request) -> Result<(), Request> {
        self.tx.try_send(req).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(r)
            | std::sync::mpsc::TrySendError::Disconnected(r) => r,
        })
    }

    /// Symbolizes `file_offsets` of `module` on the thread and waits for the answer.
    pub fn symbolize_blocking(
        &self,
        module: Arc<ModuleInfo>,
        file_offsets: Vec<u64>,
    ) -> Option<Vec<Symbolized>> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        self.tx
            .send(Request::Module {
                module,
                file_offsets,
                reply,
            })
            .ok()?;
        rx.recv().ok()
    }
}

/// Starts a thread that owns a [`Symbolizer`] and answers [`Request`]s from a queue of
/// `queue` entries.
pub fn spawn(config: SymbolizerConfig, queue: usize) -> std::io::Result<SymbolizerHandle> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Request>(queue.max(1));
    std::thread::Builder::new()
        .name("infertap-symbolize".into())
        .spawn(move || {
            let mut s = Symbolizer::new(config);
            for req in rx {
                match req {
                    Request::Module {
                        module,
                        file_offsets,
                        reply,
                    } => {
                        let _ = reply.send(s.symbolize(&module, &file_offsets));
                    }
                    Request::Kernel { addrs, reply } => {
                        let _ = reply.send(s.symbolize_kernel(&addrs));
                    }
                }
            }
        })?;
    Ok(SymbolizerHandle { tx })
}

#[cfg(test)]
mod plt_tests {
    use super::PltTable;

    /// Every PLT stub of a real dynamically linked program is named after the function it
    /// jumps to, as `objdump -d` shows it (`<memcpy@plt>`).
    #[test]
    fn plt_stubs_of_a_real_program_are_named_like_objdump() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let t = PltTable::read(&exe);
        assert!(!t.is_empty(), "no PLT in {}", exe.display());
        let out = std::process::Command::new("objdump")
            .args([
                "-d",
                "--section=.plt",
                "--section=.plt.sec",
                "--section=.plt.got",
            ])
            .arg(&exe)
            .output();
        let Ok(out) = out else {
            eprintln!("SKIP plt names: objdump not found");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let data = std::fs::read(&exe).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        let file_offset = |vaddr: u64| {
            use object::{Object, ObjectSection};
            elf.sections().find_map(|s| {
                let (off, _) = s.file_range()?;
                (vaddr >= s.address() && vaddr < s.address() + s.size())
                    .then(|| vaddr - s.address() + off)
            })
        };
        // "0000000000012340 <memcpy@plt>:" headers, with their addresses.
        let mut checked = 0;
        for l in text.lines() {
            let Some((addr, rest)) = l.split_once(" <") else {
                continue;
            };
            let Some(name) = rest.strip_suffix(">:") else {
                continue;
            };
            if !name.ends_with("@plt") || name.contains('+') {
                continue;
            }
            let Ok(vaddr) = u64::from_str_radix(addr.trim(), 16) else {
                continue;
            };
            let off = file_offset(vaddr).expect("stub inside a section");
            assert_eq!(
                t.name_of(off),
                Some(name),
                "at {vaddr:#x} (file offset {off:#x})"
            );
            checked += 1;
        }
        assert!(checked > 0, "objdump named no stub we know:\n{text}");
    }

    #[test]
    fn non_elf_and_missing_files_give_empty_tables() {
        assert!(PltTable::read(std::path::Path::new("/nonexistent")).is_empty());
        let f = std::env::temp_dir().join(format!("infertap-not-elf-{}", std::process::id()));
        std::fs::write(&f, b"not an ELF file at all").unwrap();
        assert!(PltTable::read(&f).is_empty());
        let _ = std::fs::remove_file(f);
    }
}
