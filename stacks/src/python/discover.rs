//! Finding a CPython 3.10–3.13 interpreter in a running process.
//!
//! For a pid: look at the ELF files it maps (its executable, for a static `python`, and any
//! `libpython3.*.so`), read their exported symbols (`.dynsym`, then `.symtab`) through
//! `/proc/<pid>/map_files` or `/proc/<pid>/root` (so processes in containers, venvs and deleted
//! files work), compute each file's load bias from its mapping, then read the version
//! (`Py_Version`, 3.11+; 3.10 is recognised by its symbols), the main interpreter
//! (`_PyRuntime.interpreters.main`) and `PyCode_Type` from the target's memory. Every table
//! offset the discovery depends on is validated against the live process before a
//! [`PythonProcess`] is returned: `PyCode_Type`'s type and name, the first thread state's
//! `interp` back-pointer and, for 3.13, every field of the interpreter's own `_Py_DebugOffsets`.
//! Anything unexpected is a [`DiscoverError`] with a short [`DiscoverError::reason`] for the
//! caller's counters, never a guessed table.
//!
//! # 3.10 threads
//! CPython 3.10 records no kernel thread id, only `PyThreadState.thread_id`, the thread's
//! `pthread_t`. With glibc that is the address of the thread's `struct pthread`, whose `tid`
//! field holds the kernel tid; glibc exports where that field is for debuggers, in the
//! `GLIBC_PRIVATE` symbol `_thread_db_pthread_tid` (three `u32`: size in bits, element count,
//! byte offset; what gdb's libthread_db reads). Discovery reads that descriptor from the libc
//! the process maps (its `.dynsym`; the executable's own symbols for a static build), checks it
//! against the live process (a thread state's `pthread_t` must lead to a tid of one of the
//! process's threads) and puts the offset in `PyOffsets::pthread_tid`. A 3.10 process whose
//! libc has no such descriptor (musl, a stripped static build) is refused
//! ([`DiscoverError::NoThreadIds`]): its threads could not be told apart.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use infertap_common::profile::PyProc;
use object::{Object, ObjectSegment, ObjectSymbol, ReadCache};

use super::mem::{Memory, ProcMem, ReadError};
use super::offsets::{self, Layout, DEBUG_COOKIE};

/// A CPython version as the target reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PyVersion {
    pub major: u8,
    pub minor: u8,
    /// `None` where the process does not tell (3.10 has no `Py_Version`).
    pub patch: Option<u8>,
}

impl std::fmt::Display for PyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.patch {
            Some(p) => write!(f, "{}.{}.{}", self.major, self.minor, p),
            None => write!(f, "{}.{}", self.major, self.minor),
        }
    }
}

/// Why a process cannot be walked.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// The process does not exist (any more).
    #[error("process is gone")]
    Gone,
    /// No mapped ELF file defines `_PyRuntime` or `Py_Initialize`: not a CPython process.
    #[error("not a CPython process")]
    NotPython,
    /// A CPython this crate has no tables for.
    #[error("unsupported CPython {version}")]
    Unsupported { version: String },
    /// A free-threaded (`--disable-gil`) build: its object layout differs from the tables.
    #[error("free-threaded CPython {version} is not supported")]
    FreeThreaded { version: PyVersion },
    /// `_PyRuntime` exists but no main interpreter yet (the process is starting): try later.
    #[error("CPython runtime found but not initialised yet")]
    NotInitialized,
    /// The interpreter's own `_Py_DebugOffsets` disagree with the table for its version.
    #[error("CPython {version}: {field} is {runtime} in the process, {table} in our table")]
    LayoutMismatch {
        version: PyVersion,
        field: &'static str,
        table: u64,
        runtime: u64,
    },
    /// A consistency check on the live process failed (wrong table or a non-standard build).
    #[error("CPython {version}: {what}")]
    Invalid { version: PyVersion, what: String },
    /// CPython 3.10 (no `native_thread_id`) with a libc that does not say where a thread's tid
    /// is in its `struct pthread` (musl, a static build without glibc's debugger symbols).
    #[error("CPython {version} records no kernel thread ids and {why}: its threads cannot be told apart")]
    NoThreadIds { version: PyVersion, why: String },
    /// An ELF file that defines `_PyRuntime` lacks another symbol discovery needs.
    #[error("{path}: no symbol {symbol}")]
    MissingSymbol { path: PathBuf, symbol: &'static str },
    /// Reading the process's files or `/proc` entries failed (permissions, vanished files).
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    /// Reading the target's memory failed.
    #[error("reading process memory: {0}")]
    Read(#[from] ReadError),
}

impl DiscoverError {
    /// A short stable label for counting (`infertap_python_discovery_total{result=...}`).
    pub fn reason(&self) -> &'static str {
        match self {
            DiscoverError::Gone => "gone",
            DiscoverError::NotPython => "not_python",
            DiscoverError::Unsupported { .. } => "unsupported_version",
            DiscoverError::FreeThreaded { .. } => "free_threaded",
            DiscoverError::NotInitialized => "not_initialized",
            DiscoverError::LayoutMismatch { .. } => "layout_mismatch",
            DiscoverError::Invalid { .. } => "invalid",
            DiscoverError::NoThreadIds { .. } => "no_thread_ids",
            DiscoverError::MissingSymbol { .. } => "missing_symbol",
            DiscoverError::Io { .. } => "io",
            DiscoverError::Read(_) => "read",
        }
    }

    /// Whether asking again later may succeed (the process was starting up).
    pub fn is_transient(&self) -> bool {
        matches!(self, DiscoverError::NotInitialized)
    }
}

/// A CPython process the kernel can walk, with what user space needs to resolve its frames.
#[derive(Clone, Debug)]
pub struct PythonProcess {
    pub pid: u32,
    pub version: PyVersion,
    /// The ELF file defining `_PyRuntime`, as the process names it (its own mount namespace).
    pub binary: PathBuf,
    /// Load bias of `binary` (runtime address − link-time address).
    pub bias: u64,
    /// Address of `_PyRuntime`.
    pub runtime: u64,
    /// Address of the main `PyInterpreterState`.
    pub interp: u64,
    /// Address of `PyCode_Type`.
    pub code_type: u64,
    /// Address of `PyUnicode_Type` (to check strings read from code objects).
    pub unicode_type: u64,
    /// Address of `PyBytes_Type` (to check line tables and 3.10 bytecode).
    pub bytes_type: u64,
    /// The offset table for `version`.
    pub layout: &'static Layout,
    /// 3.10: byte offset of `tid` in the process's glibc `struct pthread` (from its
    /// `_thread_db_pthread_tid` descriptor), how a `thread_id` leads to the kernel tid. `None`
    /// for 3.11+, which record `native_thread_id`.
    pub pthread_tid: Option<u16>,
    py_proc: PyProc,
}

impl PythonProcess {
    /// The record to put in the kernel's per-process Python map (key: tgid).
    ///
    /// Its `code_type` is set for 3.13+ only, where a frame's `f_executable` may be something
    /// other than a code object; 3.10–3.12 frames always point at code objects, so the kernel
    /// is spared one read per frame there (the resolver type-checks every code object anyway).
    pub fn py_proc(&self) -> PyProc {
        self.py_proc
    }
}

/// Symbols discovery reads, as link-time addresses.
#[derive(Default, Debug)]
struct Symbols {
    runtime: Option<u64>,
    code_type: Option<u64>,
    unicode_type: Option<u64>,
    bytes_type: Option<u64>,
    type_type: Option<u64>,
    py_version: Option<u64>,
    /// `Py_IsNone` (a function since 3.10): tells 3.10 from 3.7–3.9, which lack `Py_Version`.
    is_none: bool,
    /// `Py_Initialize`: any CPython, including those too old to have `_PyRuntime`.
    py_initialize: bool,
}

impl Symbols {
    fn complete(&self) -> bool {
        self.runtime.is_some()
            && self.code_type.is_some()
            && self.unicode_type.is_some()
            && self.bytes_type.is_some()
            && self.type_type.is_some()
            && (self.py_version.is_some() || self.is_none)
    }

    fn take<'a, S: ObjectSymbol<'a>>(&mut self, sym: S) {
        if sym.is_undefined() {
            return;
        }
        let Ok(name) = sym.name_bytes() else { return };
        let addr = sym.address();
        let slot = match name {
            b"_PyRuntime" => &mut self.runtime,
            b"PyCode_Type" => &mut self.code_type,
            b"PyUnicode_Type" => &mut self.unicode_type,
            b"PyBytes_Type" => &mut self.bytes_type,
            b"PyType_Type" => &mut self.type_type,
            b"Py_Version" => &mut self.py_version,
            b"Py_IsNone" => {
                self.is_none = true;
                return;
            }
            b"Py_Initialize" => {
                self.py_initialize = true;
                return;
            }
            _ => return,
        };
        slot.get_or_insert(addr);
    }
}

/// One mapped ELF file: its lowest mapping (start address and file offset).
#[derive(Debug, Clone)]
struct Candidate {
    path: PathBuf,
    start: u64,
    end: u64,
    offset: u64,
}

fn io_err(what: impl Into<String>, error: std::io::Error) -> DiscoverError {
    if error.raw_os_error() == Some(libc::ESRCH) {
        return DiscoverError::Gone;
    }
    DiscoverError::Io {
        what: what.into(),
        error,
    }
}

fn proc_err(pid: u32, e: procfs::ProcError) -> DiscoverError {
    match e {
        procfs::ProcError::NotFound(_) => DiscoverError::Gone,
        other => DiscoverError::Io {
            what: format!("/proc/{pid}"),
            error: std::io::Error::other(other.to_string()),
        },
    }
}

/// Whether a mapped file's name looks like a CPython shared library (`libpython3.12.so.1.0`,
/// `libpython3.13t.so`, …).
fn is_libpython(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("libpython") && n.contains(".so"))
}

/// Whether a mapped file's name looks like glibc's C library (`libc.so.6`; `libc-2.31.so`
/// before glibc 2.34).
fn is_glibc_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == "libc.so.6" || (n.starts_with("libc-") && n.ends_with(".so")))
}

/// The ELF files a process maps that discovery reads.
struct Mapped {
    /// Files that may hold the interpreter: libpython(s) first, then the executable.
    python: Vec<Candidate>,
    /// Files that may hold glibc's `_thread_db_pthread_tid`: the C library, then the executable
    /// (a static build).
    libc: Vec<Candidate>,
}

/// The mapped files discovery looks at, from one read of `/proc/<pid>/maps`.
fn candidates(pid: u32) -> Result<Mapped, DiscoverError> {
    let process = procfs::process::Process::new(pid as i32).map_err(|e| proc_err(pid, e))?;
    let exe = process.exe().ok();
    let maps = process.maps().map_err(|e| proc_err(pid, e))?;
    let mut files: BTreeMap<PathBuf, Candidate> = BTreeMap::new();
    for m in maps {
        let procfs::process::MMapPath::Path(path) = m.pathname else {
            continue;
        };
        let wanted =
            is_libpython(&path) || is_glibc_name(&path) || exe.as_deref() == Some(path.as_path());
        if !wanted {
            continue;
        }
        let c = Candidate {
            path: path.clone(),
            start: m.address.0,
            end: m.address.1,
            offset: m.offset,
        };
        files
            .entry(path)
            .and_modify(|old| {
                if c.offset < old.offset {
                    *old = c.clone();
                }
            })
            .or_insert(c);
    }
    let all: Vec<Candidate> = files.into_values().collect();
    let is_exe = |c: &Candidate| exe.as_deref() == Some(c.path.as_path());
    let mut python: Vec<Candidate> = all
        .iter()
        .filter(|c| is_libpython(&c.path) || is_exe(c))
        .cloned()
        .collect();
    python.sort_by_key(|c| !is_libpython(&c.path));
    let mut libc: Vec<Candidate> = all
        .iter()
        .filter(|c| is_glibc_name(&c.path) || is_exe(c))
        .cloned()
        .collect();
    libc.sort_by_key(|c| !is_glibc_name(&c.path));
    Ok(Mapped { python, libc })
}

/// Opens a mapped file as the process sees it: through `map_files` (any namespace, deleted
/// files), else through its root directory.
fn open_mapped(pid: u32, c: &Candidate) -> Result<File, DiscoverError> {
    let by_map = format!("/proc/{pid}/map_files/{:x}-{:x}", c.start, c.end);
    if let Ok(f) = File::open(&by_map) {
        return Ok(f);
    }
    let rel = c.path.strip_prefix("/").unwrap_or(&c.path);
    let by_root = Path::new(&format!("/proc/{pid}/root")).join(rel);
    File::open(&by_root).map_err(|e| io_err(format!("opening {}", by_root.display()), e))
}

/// glibc's `_thread_db_pthread_tid` descriptor in one mapped file: `Ok(None)` when the file
/// does not define it.
fn read_pthread_tid_descriptor(pid: u32, c: &Candidate) -> Result<Option<[u32; 3]>, DiscoverError> {
    const NAME: &[u8] = b"_thread_db_pthread_tid";
    let file = open_mapped(pid, c)?;
    let cache = ReadCache::new(file);
    let bad = |what: String| DiscoverError::Io {
        what: format!("{}: {what}", c.path.display()),
        error: std::io::Error::from(std::io::ErrorKind::InvalidData),
    };
    let obj = object::File::parse(&cache).map_err(|e| bad(format!("parsing: {e}")))?;
    let found = obj
        .dynamic_symbols()
        .chain(obj.symbols())
        .find(|s| !s.is_undefined() && s.name_bytes() == Ok(NAME));
    let Some(sym) = found else {
        return Ok(None);
    };
    let addr = sym.address();
    let bytes = obj
        .segments()
        .find_map(|seg| seg.data_range(addr, 12).ok().flatten())
        .ok_or_else(|| {
            bad(format!(
                "_thread_db_pthread_tid at {addr:#x} has no file data"
            ))
        })?;
    let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    Ok(Some([word(0), word(1), word(2)]))
}

/// Where a 4-byte `tid` sits in a `struct pthread`, from a `_thread_db_pthread_tid` descriptor
/// (`{ bits, count, offset }`), or why the descriptor is unusable.
fn pthread_tid_from_descriptor(d: [u32; 3]) -> Result<u16, String> {
    let [bits, count, offset] = d;
    if bits != 32 || count != 1 {
        return Err(format!(
            "its _thread_db_pthread_tid describes a {bits}-bit field × {count}, not one 32-bit tid"
        ));
    }
    // struct pthread is a few KiB (glibc 2.36: 2304 bytes); the kernel ABI wants a u16.
    if offset % 4 != 0 || offset >= 0x4000 {
        return Err(format!(
            "its _thread_db_pthread_tid gives an implausible offset {offset}"
        ));
    }
    Ok(offset as u16)
}

/// 3.10: the offset of `tid` in the process's `struct pthread`, from the first of `libc` that
/// defines `_thread_db_pthread_tid`.
fn pthread_tid_offset(
    pid: u32,
    version: PyVersion,
    libc: &[Candidate],
) -> Result<u16, DiscoverError> {
    let refuse = |why: String| DiscoverError::NoThreadIds { version, why };
    let mut looked = Vec::new();
    for c in libc {
        match read_pthread_tid_descriptor(pid, c) {
            Ok(Some(d)) => {
                return pthread_tid_from_descriptor(d)
                    .map_err(|why| refuse(format!("{}: {why}", c.path.display())));
            }
            Ok(None) => looked.push(c.path.display().to_string()),
            Err(DiscoverError::Gone) => return Err(DiscoverError::Gone),
            Err(e) => looked.push(format!("{} ({e})", c.path.display())),
        }
    }
    Err(refuse(if looked.is_empty() {
        "maps no glibc libc.so".to_string()
    } else {
        format!(
            "no glibc _thread_db_pthread_tid in {} (musl or a static build?)",
            looked.join(", ")
        )
    }))
}

/// Checks a 3.10 `pthread_tid` against the live process: some thread state's `pthread_t`,
/// followed to its `tid`, must name one of `pid`'s threads. Returns how many did.
fn check_pthread_tids(
    pid: u32,
    mem: &impl Memory,
    interp: u64,
    layout: &Layout,
    pthread_tid: u16,
) -> Result<usize, String> {
    let mut ts = mem
        .read_u64(interp.wrapping_add(layout.interp_threads_head))
        .map_err(|e| e.to_string())?;
    let (mut states, mut live) = (0, 0);
    let mut seen = Vec::new();
    while ts != 0 && states < infertap_common::profile::MAX_PY_THREADS {
        states += 1;
        let pthread = mem
            .read_u64(ts.wrapping_add(layout.tstate_thread_id))
            .map_err(|e| e.to_string())?;
        if let Ok(tid) = mem.read_u32(pthread.wrapping_add(pthread_tid as u64)) {
            if tid != 0 && Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
                live += 1;
            }
            seen.push(tid);
        }
        ts = mem
            .read_u64(ts.wrapping_add(layout.tstate_next))
            .map_err(|e| e.to_string())?;
    }
    if states > 0 && live == 0 {
        return Err(format!(
            "no thread state's pthread_t leads to a thread of the process through tid offset              {pthread_tid} (read {seen:?})"
        ));
    }
    Ok(live)
}

/// Reads the symbols of one ELF file and its load bias for mapping `c`.
fn read_symbols(pid: u32, c: &Candidate) -> Result<(Symbols, u64), DiscoverError> {
    let file = open_mapped(pid, c)?;
    let cache = ReadCache::new(file);
    let elf_err = |e: object::Error| DiscoverError::Io {
        what: format!("parsing {}", c.path.display()),
        error: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    };
    let obj = object::File::parse(&cache).map_err(elf_err)?;
    let mut syms = Symbols::default();
    for s in obj.dynamic_symbols() {
        syms.take(s);
    }
    if !syms.complete() {
        for s in obj.symbols() {
            syms.take(s);
        }
    }
    // The segment holding the mapping's file offset gives the link-time address of `start`.
    let seg = obj.segments().find(|s| {
        let (off, size) = s.file_range();
        off <= c.offset && c.offset < off.saturating_add(size.max(1))
    });
    let bias = match seg {
        Some(s) => {
            let (off, _) = s.file_range();
            c.start
                .wrapping_sub(s.address().wrapping_add(c.offset - off))
        }
        None => {
            return Err(DiscoverError::Io {
                what: format!(
                    "{}: no segment maps offset {:#x}",
                    c.path.display(),
                    c.offset
                ),
                error: std::io::Error::from(std::io::ErrorKind::InvalidData),
            })
        }
    };
    Ok((syms, bias))
}

/// The `X.Y` a CPython file name carries (`python3.9`, `libpython3.6m.so.1.0` → `3.9`, `3.6`).
fn version_from_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let rest = &name[name.find("python")? + 6..];
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let digits = digits.trim_end_matches('.');
    (!digits.is_empty()).then(|| digits.to_string())
}

/// The version family of a file with `_PyRuntime` but without `Py_Version`: 3.10 (recognised
/// by its symbols) or an unsupported 3.7–3.9.
fn version_without_py_version(syms: &Symbols, path: &Path) -> Result<PyVersion, DiscoverError> {
    if syms.is_none {
        return Ok(PyVersion {
            major: 3,
            minor: 10,
            patch: None,
        });
    }
    Err(DiscoverError::Unsupported {
        version: version_from_name(path).unwrap_or_else(|| "3.7-3.9".to_string()),
    })
}

/// Finds the CPython interpreter of `pid`. See the module docs for what is checked.
pub fn discover(pid: u32) -> Result<PythonProcess, DiscoverError> {
    let mem = ProcMem::open(pid).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DiscoverError::Gone,
        _ => io_err(format!("opening /proc/{pid}/mem"), e),
    })?;
    let mut first_error = None;
    let mut saw_runtime = false;
    let mut old_python = None;
    let mapped = candidates(pid)?;
    for c in &mapped.python {
        let (syms, bias) = match read_symbols(pid, c) {
            Ok(x) => x,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        if syms.runtime.is_none() {
            if syms.py_initialize {
                old_python.get_or_insert(c.path.clone());
            }
            continue;
        }
        saw_runtime = true;
        match from_symbols(pid, &mem, &c.path, &syms, bias, &mapped.libc) {
            Err(DiscoverError::NotInitialized) => continue,
            other => return other,
        }
    }
    if saw_runtime {
        return Err(DiscoverError::NotInitialized);
    }
    // A CPython without _PyRuntime (≤ 3.6): name its version from the file name.
    if let Some(path) = old_python {
        return Err(DiscoverError::Unsupported {
            version: version_from_name(&path).unwrap_or_else(|| "< 3.7".to_string()),
        });
    }
    // A file we could not read may have been the interpreter; say so rather than NotPython.
    Err(first_error.unwrap_or(DiscoverError::NotPython))
}

fn from_symbols(
    pid: u32,
    mem: &impl Memory,
    path: &Path,
    syms: &Symbols,
    bias: u64,
    libc: &[Candidate],
) -> Result<PythonProcess, DiscoverError> {
    let at = |a: u64| a.wrapping_add(bias);
    let need = |v: Option<u64>, symbol: &'static str| {
        v.map(at).ok_or_else(|| DiscoverError::MissingSymbol {
            path: path.to_path_buf(),
            symbol,
        })
    };
    let runtime = need(syms.runtime, "_PyRuntime")?;
    let version = match syms.py_version {
        Some(a) => {
            let hex = mem.read_u64(at(a))?;
            PyVersion {
                major: (hex >> 24) as u8,
                minor: (hex >> 16) as u8,
                patch: Some((hex >> 8) as u8),
            }
        }
        None => version_without_py_version(syms, path)?,
    };
    let Some(layout) = offsets::layout(version.major, version.minor) else {
        return Err(DiscoverError::Unsupported {
            version: version.to_string(),
        });
    };
    let code_type = need(syms.code_type, "PyCode_Type")?;
    let unicode_type = need(syms.unicode_type, "PyUnicode_Type")?;
    let bytes_type = need(syms.bytes_type, "PyBytes_Type")?;
    let type_type = need(syms.type_type, "PyType_Type")?;

    if let Some(debug) = offsets::debug_offsets(version.minor) {
        check_debug_offsets(mem, runtime, version, syms, bias, layout, debug)?;
    }

    let interp = mem.read_u64(runtime.wrapping_add(layout.runtime_interpreters_main))?;
    if interp == 0 {
        return Err(DiscoverError::NotInitialized);
    }
    let invalid = |what: String| DiscoverError::Invalid { version, what };

    // PyCode_Type must be a type object named "code": checks ob_type and tp_name offsets
    // (a Py_TRACE_REFS build would fail here).
    for (ty, name) in [
        (code_type, "code"),
        (unicode_type, "str"),
        (bytes_type, "bytes"),
    ] {
        let meta = mem.read_u64(ty.wrapping_add(layout.object_type))?;
        if meta != type_type {
            return Err(invalid(format!(
                "type object {name} at {ty:#x} has type {meta:#x}, not PyType_Type {type_type:#x}"
            )));
        }
        let tp_name = mem.read_u64(ty.wrapping_add(layout.type_tp_name))?;
        let got = mem.read_cstr(tp_name, 64)?;
        if got != name.as_bytes() {
            return Err(invalid(format!(
                "type at {ty:#x} is named {:?}, expected {name:?}",
                String::from_utf8_lossy(&got)
            )));
        }
    }

    // The first thread state, if any, must point back at this interpreter.
    let head = mem.read_u64(interp.wrapping_add(layout.interp_threads_head))?;
    if head != 0 {
        let back = mem.read_u64(head.wrapping_add(layout.tstate_interp))?;
        if back != interp {
            return Err(invalid(format!(
                "thread state {head:#x} belongs to interpreter {back:#x}, not {interp:#x}"
            )));
        }
    }
    let kernel_code_type = if version.minor >= 13 { code_type } else { 0 };
    let mut py_proc = layout
        .py_proc(interp, kernel_code_type)
        .ok_or_else(|| invalid("an offset does not fit the kernel ABI".into()))?;
    let pthread_tid = if layout.tstate_native_thread_id.is_none() {
        let off = pthread_tid_offset(pid, version, libc)?;
        check_pthread_tids(pid, mem, interp, layout, off).map_err(invalid)?;
        py_proc.offsets.pthread_tid = off;
        Some(off)
    } else {
        None
    };
    Ok(PythonProcess {
        pid,
        version,
        binary: path.to_path_buf(),
        bias,
        runtime,
        interp,
        code_type,
        unicode_type,
        bytes_type,
        layout,
        pthread_tid,
        py_proc,
    })
}

/// 3.13+: `_PyRuntime` starts with `_Py_DebugOffsets`; every field it shares with our table
/// must agree.
fn check_debug_offsets(
    mem: &impl Memory,
    runtime: u64,
    version: PyVersion,
    syms: &Symbols,
    bias: u64,
    layout: &Layout,
    debug: &offsets::DebugOffsetsLayout,
) -> Result<(), DiscoverError> {
    let raw = mem.read_vec(runtime, debug.size as usize, debug.size as usize)?;
    let word = |pos: u64| {
        let p = pos as usize;
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[p..p + 8]);
        u64::from_le_bytes(b)
    };
    if &raw[..8] != DEBUG_COOKIE {
        return Err(DiscoverError::Invalid {
            version,
            what: "_PyRuntime does not start with the _Py_DebugOffsets cookie".into(),
        });
    }
    if let Some(a) = syms.py_version {
        let hex = mem.read_u64(a.wrapping_add(bias))?;
        let dv = word(debug.version);
        if dv != hex {
            return Err(DiscoverError::LayoutMismatch {
                version,
                field: "debug.version",
                table: hex,
                runtime: dv,
            });
        }
    }
    if word(debug.free_threaded) != 0 {
        return Err(DiscoverError::FreeThreaded { version });
    }
    for f in debug.fields {
        let table = layout.field(f.table_field).ok_or(DiscoverError::Invalid {
            version,
            what: format!("table lacks {}", f.table_field),
        })?;
        let runtime_value = word(f.position);
        if runtime_value != table {
            return Err(DiscoverError::LayoutMismatch {
                version,
                field: f.name,
                table,
                runtime: runtime_value,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One contiguous block of target memory.
    struct Flat {
        base: u64,
        bytes: Vec<u8>,
    }

    impl Memory for Flat {
        fn read_exact_at(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError> {
            let bad = ReadError::Unreadable {
                addr,
                len: buf.len(),
                errno: libc::EFAULT,
            };
            let start = addr.checked_sub(self.base).ok_or(bad.clone())? as usize;
            let src = self.bytes.get(start..start + buf.len()).ok_or(bad)?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    /// A `_Py_DebugOffsets` block as a 3.13 interpreter laid out like our table would have it.
    fn debug_block(version_hex: u64) -> Flat {
        let d = &offsets::DEBUG_OFFSETS_313;
        let mut bytes = vec![0u8; d.size as usize + 8];
        bytes[..8].copy_from_slice(DEBUG_COOKIE);
        bytes[d.version as usize..][..8].copy_from_slice(&version_hex.to_le_bytes());
        for f in d.fields {
            let v = offsets::PY313.field(f.table_field).unwrap();
            bytes[f.position as usize..][..8].copy_from_slice(&v.to_le_bytes());
        }
        // Py_Version right after the block.
        let at = d.size as usize;
        bytes[at..at + 8].copy_from_slice(&version_hex.to_le_bytes());
        Flat {
            base: 0x1000,
            bytes,
        }
    }

    #[test]
    fn debug_offsets_must_agree_with_the_table() {
        let d = &offsets::DEBUG_OFFSETS_313;
        let v = PyVersion {
            major: 3,
            minor: 13,
            patch: Some(0),
        };
        let syms = Symbols {
            py_version: Some(0x1000 + d.size),
            ..Default::default()
        };
        let check = |m: &Flat| check_debug_offsets(m, 0x1000, v, &syms, 0, &offsets::PY313, d);
        let good = debug_block(0x030d00f0);
        check(&good).unwrap();

        // Every single field that differs is named in the refusal.
        for f in d.fields {
            let mut m = debug_block(0x030d00f0);
            m.bytes[f.position as usize] ^= 8;
            match check(&m) {
                Err(DiscoverError::LayoutMismatch { field, .. }) => assert_eq!(field, f.name),
                other => panic!("{}: {other:?}", f.name),
            }
        }
        let mut m = debug_block(0x030d00f0);
        m.bytes[d.free_threaded as usize] = 1;
        assert!(matches!(check(&m), Err(DiscoverError::FreeThreaded { .. })));
        let mut m = debug_block(0x030d00f0);
        m.bytes[0] = b'y';
        assert!(matches!(check(&m), Err(DiscoverError::Invalid { .. })));
        // The block's version must be the process's Py_Version.
        let mut m = debug_block(0x030d00f0);
        m.bytes[d.version as usize + 1] = 1;
        assert!(matches!(
            check(&m),
            Err(DiscoverError::LayoutMismatch {
                field: "debug.version",
                ..
            })
        ));
        // Unreadable runtime: an error, not a panic.
        let short = Flat {
            base: 0x1000,
            bytes: vec![0; 100],
        };
        assert!(matches!(check(&short), Err(DiscoverError::Read(_))));
    }

    #[test]
    fn libpython_names() {
        assert!(is_libpython(Path::new("/usr/lib/libpython3.12.so.1.0")));
        assert!(is_libpython(Path::new("/x/libpython3.13t.so")));
        assert!(!is_libpython(Path::new("/usr/bin/python3.12")));
        assert!(!is_libpython(Path::new("/usr/lib/libpythonish.a")));
    }

    #[test]
    fn old_versions_are_named_from_the_file() {
        let syms = Symbols::default();
        match version_without_py_version(&syms, Path::new("/usr/lib/libpython3.9.so.1.0")) {
            Err(DiscoverError::Unsupported { version }) => assert_eq!(version, "3.9"),
            other => panic!("{other:?}"),
        }
        match version_without_py_version(&syms, Path::new("/opt/bin/pyapp")) {
            Err(DiscoverError::Unsupported { version }) => assert_eq!(version, "3.7-3.9"),
            other => panic!("{other:?}"),
        }
        let syms = Symbols {
            is_none: true,
            ..Default::default()
        };
        let v = version_without_py_version(&syms, Path::new("/opt/bin/pyapp")).unwrap();
        assert_eq!((v.major, v.minor, v.patch), (3, 10, None));
    }

    #[test]
    fn version_in_file_names() {
        let v = |p: &str| version_from_name(Path::new(p));
        assert_eq!(v("/usr/lib/libpython2.7.so.1.0").as_deref(), Some("2.7"));
        assert_eq!(v("/x/libpython3.6m.so.1.0").as_deref(), Some("3.6"));
        assert_eq!(v("/usr/bin/python3.12").as_deref(), Some("3.12"));
        assert_eq!(v("/usr/bin/python"), None);
        assert_eq!(v("/usr/bin/uwsgi"), None);
    }

    #[test]
    fn mapped_files_open_through_the_root_when_map_files_fails() {
        let pid = std::process::id();
        let mut exe = candidates(pid)
            .unwrap()
            .python
            .into_iter()
            .find(|c| !is_libpython(&c.path))
            .expect("the test binary is mapped");
        open_mapped(pid, &exe).unwrap();
        // No such map_files entry: /proc/<pid>/root/<path> is used.
        exe.start = 0x1000;
        exe.end = 0x2000;
        open_mapped(pid, &exe).unwrap();
        exe.path = PathBuf::from("/nonexistent/python3.12");
        assert!(matches!(
            open_mapped(pid, &exe),
            Err(DiscoverError::Io { .. })
        ));
    }

    #[test]
    fn glibc_describes_where_a_thread_keeps_its_tid() {
        // This test binary maps glibc: its descriptor, read like a target's, leads from our own
        // pthread_self() to our own tid.
        let pid = std::process::id();
        let mapped = candidates(pid).unwrap();
        assert!(
            mapped.libc.iter().any(|c| is_glibc_name(&c.path)),
            "{:?}",
            mapped.libc
        );
        let v = PyVersion {
            major: 3,
            minor: 10,
            patch: None,
        };
        let off = pthread_tid_offset(pid, v, &mapped.libc).unwrap();
        // SAFETY: pthread_self has no preconditions; gettid neither.
        let (me, tid) = unsafe { (libc::pthread_self() as u64, libc::gettid() as u32) };
        let mem = ProcMem::open(pid).unwrap();
        assert_eq!(mem.read_u32(me + off as u64).unwrap(), tid);
        // Only libc and the executable are looked at; a file without the symbol says so.
        let exe_only: Vec<Candidate> = mapped
            .libc
            .iter()
            .filter(|c| !is_glibc_name(&c.path))
            .cloned()
            .collect();
        match pthread_tid_offset(pid, v, &exe_only) {
            Err(e @ DiscoverError::NoThreadIds { .. }) => {
                assert_eq!(e.reason(), "no_thread_ids");
                assert!(e.to_string().contains("_thread_db_pthread_tid"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            pthread_tid_offset(pid, v, &[]),
            Err(DiscoverError::NoThreadIds { .. })
        ));
    }

    #[test]
    fn pthread_tid_descriptors_are_checked() {
        assert_eq!(pthread_tid_from_descriptor([32, 1, 720]), Ok(720));
        assert!(pthread_tid_from_descriptor([64, 1, 720]).is_err());
        assert!(pthread_tid_from_descriptor([32, 2, 720]).is_err());
        assert!(pthread_tid_from_descriptor([32, 1, 722]).is_err());
        assert!(pthread_tid_from_descriptor([32, 1, 1 << 20]).is_err());
        assert!(is_glibc_name(Path::new("/lib/x86_64-linux-gnu/libc.so.6")));
        assert!(is_glibc_name(Path::new("/lib/libc-2.31.so")));
        assert!(!is_glibc_name(Path::new("/lib/ld-musl-x86_64.so.1")));
        assert!(!is_glibc_name(Path::new("/usr/lib/libcrypto.so.3")));
    }

    #[test]
    fn this_test_binary_is_not_python() {
        match discover(std::process::id()) {
            Err(DiscoverError::NotPython) => {}
            other => panic!("expected NotPython, got {other:?}"),
        }
    }
}
