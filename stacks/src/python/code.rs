//! Code objects → (qualified name, file name, line), read from the target's memory.
//!
//! [`CodeReader`] reads one `PyCodeObject` (its names, first line, line table and where its
//! bytecode is) with a type check on every object it follows and a bound on every length it
//! reads. [`Resolver`] turns the kernel's [`PyFrame`]s into [`PyLocation`]s: per process it
//! caches decoded code objects by address (bounded, least-recently-used by generations), and
//! interns functions into [`FunctionId`]s shared by all processes.
//!
//! A code object address can be reused after the code object is freed (code created at run time
//! by `exec`/`compile`). A cached entry is trusted only while the frame's instruction falls
//! inside its bytecode; otherwise it is read again.

use std::collections::HashMap;
use std::sync::Arc;

use infertap_common::profile::PyFrame;

use super::discover::PythonProcess;
use super::functions::{Function, FunctionId, FunctionTable};
use super::linetable::LineTable;
use super::mem::{Memory, ProcMem, ReadError};
use super::offsets::{Bytecode, Layout, CODE_UNIT};

/// Longest `co_name`/`co_qualname` read, in characters.
pub const MAX_NAME_CHARS: usize = 1024;
/// Longest `co_filename` read, in characters (PATH_MAX).
pub const MAX_FILENAME_CHARS: usize = 4096;
/// Largest line table read, in bytes.
pub const MAX_LINETABLE_BYTES: usize = 1 << 20;
/// Default number of code objects cached per process.
pub const DEFAULT_CODES_PER_PROCESS: usize = 16384;

/// Why a frame could not be resolved.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ResolveError {
    #[error("process {0} is not registered with the resolver")]
    UnknownProcess(u32),
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The address does not hold an object of the expected type (a torn frame, a stale
    /// pointer or garbage).
    #[error("object at {addr:#x} has type {found:#x}, expected {what} ({expected:#x})")]
    WrongType {
        addr: u64,
        what: &'static str,
        expected: u64,
        found: u64,
    },
    /// A string or bytes object with an impossible header.
    #[error("bad {what} object at {addr:#x}: {why}")]
    Malformed {
        addr: u64,
        what: &'static str,
        why: String,
    },
    /// The frame's instruction is outside its code object's bytecode.
    #[error("instruction {instr:#x} is outside code object {code:#x}")]
    InstrOutOfRange { code: u64, instr: u64 },
}

/// How a frame's `instr` relates to its code object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InstrKind {
    /// 3.10: `f_lasti`, an index in code units (low 32 bits, signed).
    LastI,
    /// 3.11+: a pointer into the inline bytecode (`prev_instr`/`instr_ptr`).
    Pointer,
}

/// One code object as read from the target.
#[derive(Clone, Debug)]
pub struct CodeObject {
    /// `co_qualname` (3.11+) or `co_name` (3.10).
    pub qualname: String,
    pub filename: String,
    pub first_line: u32,
    pub lines: LineTable,
    /// Address of the first code unit (3.11+; 3.10: of `co_code`'s bytes).
    pub bytecode: u64,
    /// Bytecode length in bytes.
    pub bytecode_len: u64,
    instr_kind: InstrKind,
}

impl CodeObject {
    /// Byte offset in the bytecode of the instruction a frame's `instr` names (negative: the
    /// frame has not started), or `None` when `instr` cannot belong to this code object.
    pub fn offset_of(&self, instr: u64) -> Option<i64> {
        match self.instr_kind {
            InstrKind::LastI => {
                // -1: the frame has not started; anything below is not an f_lasti.
                let lasti = instr as u32 as i32 as i64;
                let off = lasti * CODE_UNIT as i64;
                (lasti >= -1 && off < self.bytecode_len as i64).then_some(off)
            }
            InstrKind::Pointer => {
                let off = instr.wrapping_sub(self.bytecode) as i64;
                // 3.11/3.12 `prev_instr` is one code unit before the start until the frame runs.
                let ok = off >= -(CODE_UNIT as i64)
                    && off < self.bytecode_len as i64
                    && off % CODE_UNIT as i64 == 0;
                ok.then_some(off)
            }
        }
    }

    /// The source line of a frame at `instr` (`PyCode_Addr2Line`), `Ok(None)` when the
    /// instruction has no line.
    pub fn line_of(&self, code: u64, instr: u64) -> Result<Option<u32>, ResolveError> {
        let off = self
            .offset_of(instr)
            .ok_or(ResolveError::InstrOutOfRange { code, instr })?;
        Ok(self.lines.line_at(off))
    }
}

/// Reads code objects, strings and bytes of one process.
#[derive(Debug)]
pub struct CodeReader<M: Memory> {
    mem: M,
    layout: &'static Layout,
    code_type: u64,
    unicode_type: u64,
    bytes_type: u64,
}

impl<M: Memory> CodeReader<M> {
    /// A reader of `mem` laid out as `p` (from discovery) says.
    pub fn new(mem: M, p: &PythonProcess) -> CodeReader<M> {
        CodeReader {
            mem,
            layout: p.layout,
            code_type: p.code_type,
            unicode_type: p.unicode_type,
            bytes_type: p.bytes_type,
        }
    }

    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Reads `want` bytes at `addr`, or only the `need` bytes that must be there when the
    /// speculative longer read runs off a mapping.
    fn read_prefix(&self, addr: u64, want: usize, need: usize) -> Result<Vec<u8>, ReadError> {
        match self.mem.read_vec(addr, want, want) {
            Ok(v) => Ok(v),
            Err(_) => self.mem.read_vec(addr, need, need),
        }
    }

    fn check_type(
        &self,
        addr: u64,
        header: &[u8],
        what: &'static str,
        expected: u64,
    ) -> Result<(), ResolveError> {
        let found = word(header, self.layout.object_type);
        if found != expected {
            return Err(ResolveError::WrongType {
                addr,
                what,
                expected,
                found,
            });
        }
        Ok(())
    }

    /// Reads a `str` object of at most `limit` characters.
    pub fn read_str(&self, addr: u64, limit: usize) -> Result<String, ResolveError> {
        let u = &self.layout.unicode;
        let fixed = u.compact_size as usize;
        // Short compact strings come in one read with their header.
        let head = self.read_prefix(addr, fixed + 128, fixed)?;
        self.check_type(addr, &head, "str", self.unicode_type)?;
        let bad = |why: String| ResolveError::Malformed {
            addr,
            what: "str",
            why,
        };
        let len = word(&head, u.length);
        if len > limit as u64 {
            return Err(bad(format!("length {len} over limit {limit}")));
        }
        let state = word(&head, u.state) as u32;
        let kind = (state >> u.kind_shift) & 7;
        let compact = state >> u.compact_bit & 1 != 0;
        let ascii = state >> u.ascii_bit & 1 != 0;
        if let Some(ready) = u.ready_bit {
            if state >> ready & 1 == 0 {
                return Err(bad("not ready".into()));
            }
        }
        if !matches!(kind, 1 | 2 | 4) || (ascii && kind != 1) {
            return Err(bad(format!("state {state:#x}")));
        }
        let data = match (compact, ascii) {
            (true, true) => addr.wrapping_add(u.ascii_size),
            (true, false) => addr.wrapping_add(u.compact_size),
            (false, _) => self.mem.read_u64(addr.wrapping_add(u.data))?,
        };
        let nbytes = len as usize * kind as usize;
        let inline_at = data.wrapping_sub(addr) as usize;
        let raw = if compact && inline_at + nbytes <= head.len() {
            head[inline_at..inline_at + nbytes].to_vec()
        } else {
            self.mem.read_vec(data, nbytes, limit * 4)?
        };
        Ok(match kind {
            1 => raw.iter().map(|&b| b as char).collect(),
            2 => raw
                .chunks_exact(2)
                .map(|c| {
                    char::from_u32(u16::from_le_bytes([c[0], c[1]]) as u32)
                        .unwrap_or(char::REPLACEMENT_CHARACTER)
                })
                .collect(),
            _ => raw
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .unwrap_or(char::REPLACEMENT_CHARACTER)
                })
                .collect(),
        })
    }

    /// Reads a `bytes` object's header: its length, checked against `limit`.
    fn bytes_len(&self, addr: u64, head: &[u8], limit: usize) -> Result<usize, ResolveError> {
        self.check_type(addr, head, "bytes", self.bytes_type)?;
        let len = word(head, self.layout.bytes_size);
        if len > limit as u64 {
            return Err(ResolveError::Malformed {
                addr,
                what: "bytes",
                why: format!("length {len} over limit {limit}"),
            });
        }
        Ok(len as usize)
    }

    /// Reads a `bytes` object of at most `limit` bytes.
    pub fn read_bytes(&self, addr: u64, limit: usize) -> Result<Vec<u8>, ResolveError> {
        let sval = self.layout.bytes_sval as usize;
        let head = self.read_prefix(addr, sval + 256, sval)?;
        let len = self.bytes_len(addr, &head, limit)?;
        if sval + len <= head.len() {
            return Ok(head[sval..sval + len].to_vec());
        }
        Ok(self
            .mem
            .read_vec(addr.wrapping_add(sval as u64), len, limit)?)
    }

    /// Reads the code object at `addr`.
    pub fn read_code(&self, addr: u64) -> Result<CodeObject, ResolveError> {
        let l = self.layout;
        let end = [
            l.code_filename,
            l.code_name,
            l.code_qualname.unwrap_or(0),
            l.code_linetable,
            l.code_firstlineno,
            match l.code_bytecode {
                Bytecode::Bytes { co_code } => co_code,
                Bytecode::Inline { .. } => 0,
            },
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
            + 8;
        let head = self.mem.read_vec(addr, end as usize, end as usize)?;
        self.check_type(addr, &head, "code", self.code_type)?;
        let qualname = self.read_str(
            word(&head, l.code_qualname.unwrap_or(l.code_name)),
            MAX_NAME_CHARS,
        )?;
        let filename = self.read_str(word(&head, l.code_filename), MAX_FILENAME_CHARS)?;
        let first_line = word(&head, l.code_firstlineno) as u32;
        let first_line = if (first_line as i32) < 0 {
            0
        } else {
            first_line
        };
        let table = self.read_bytes(word(&head, l.code_linetable), MAX_LINETABLE_BYTES)?;
        let (lines, bytecode, bytecode_len, instr_kind) = match l.code_bytecode {
            Bytecode::Bytes { co_code } => {
                let code_bytes = word(&head, co_code);
                let sval = l.bytes_sval as usize;
                let bhead = self.mem.read_vec(code_bytes, sval, sval)?;
                let len = self.bytes_len(code_bytes, &bhead, 1 << 30)?;
                (
                    LineTable::parse_310(&table, first_line),
                    code_bytes.wrapping_add(l.bytes_sval),
                    len as u64,
                    InstrKind::LastI,
                )
            }
            Bytecode::Inline { co_code_adaptive } => {
                let units = word(&head, l.varobject_size);
                if units > 1 << 28 {
                    return Err(ResolveError::Malformed {
                        addr,
                        what: "code",
                        why: format!("{units} code units"),
                    });
                }
                (
                    LineTable::parse_311(&table, first_line),
                    addr.wrapping_add(co_code_adaptive),
                    units * CODE_UNIT,
                    InstrKind::Pointer,
                )
            }
        };
        Ok(CodeObject {
            qualname,
            filename,
            first_line,
            lines,
            bytecode,
            bytecode_len,
            instr_kind,
        })
    }
}

/// The little-endian `u64` at `off` of `buf` (0 past its end; callers size `buf` to cover the
/// fields they read).
fn word(buf: &[u8], off: u64) -> u64 {
    let o = off as usize;
    buf.get(o..o + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0)
}

/// A resolved Python frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PyLocation {
    pub function: FunctionId,
    /// Source line of the frame's current instruction; `None` when it has none.
    pub line: Option<u32>,
    /// The frame carried `PY_FRAME_ENTRY` (for merging with native frames).
    pub entry: bool,
}

/// Cache counters of a [`Resolver`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolverStats {
    pub hits: u64,
    pub misses: u64,
    /// Cached entries dropped because a frame's instruction did not fit them (reused address).
    pub stale: u64,
    pub errors: u64,
}

#[derive(Debug)]
struct CachedCode {
    function: FunctionId,
    code: CodeObject,
}

/// Two generations of at most `cap / 2` entries each: a lookup that hits the old generation
/// moves the entry to the new one; when the new one is full it becomes the old one.
#[derive(Debug)]
struct GenCache {
    cap: usize,
    new: HashMap<u64, Arc<CachedCode>>,
    old: HashMap<u64, Arc<CachedCode>>,
}

impl GenCache {
    fn new(cap: usize) -> GenCache {
        GenCache {
            cap: cap.max(2),
            new: HashMap::new(),
            old: HashMap::new(),
        }
    }

    fn get(&mut self, k: u64) -> Option<Arc<CachedCode>> {
        if let Some(v) = self.new.get(&k) {
            return Some(v.clone());
        }
        let v = self.old.remove(&k)?;
        self.insert(k, v.clone());
        Some(v)
    }

    fn insert(&mut self, k: u64, v: Arc<CachedCode>) {
        if self.new.len() >= self.cap / 2 {
            self.old = std::mem::take(&mut self.new);
        }
        self.new.insert(k, v);
    }

    fn remove(&mut self, k: u64) {
        self.new.remove(&k);
        self.old.remove(&k);
    }

    fn len(&self) -> usize {
        self.new.len() + self.old.len()
    }
}

#[derive(Debug)]
struct ProcessCodes {
    reader: CodeReader<ProcMem>,
    cache: GenCache,
}

/// Resolves kernel-walked Python frames of registered processes.
#[derive(Debug)]
pub struct Resolver {
    processes: HashMap<u32, ProcessCodes>,
    functions: FunctionTable,
    codes_per_process: usize,
    stats: ResolverStats,
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::new(DEFAULT_CODES_PER_PROCESS)
    }
}

impl Resolver {
    /// A resolver caching at most `codes_per_process` code objects per process.
    pub fn new(codes_per_process: usize) -> Resolver {
        Resolver {
            processes: HashMap::new(),
            functions: FunctionTable::new(),
            codes_per_process,
            stats: ResolverStats::default(),
        }
    }

    /// Registers a discovered process (opens its memory). Re-registering a pid (a new process
    /// with a reused pid, or a rediscovery) drops what was cached for it.
    pub fn add_process(&mut self, p: &PythonProcess) -> std::io::Result<()> {
        let mem = ProcMem::open(p.pid)?;
        self.processes.insert(
            p.pid,
            ProcessCodes {
                reader: CodeReader::new(mem, p),
                cache: GenCache::new(self.codes_per_process),
            },
        );
        Ok(())
    }

    /// Forgets a process (call when it exits): its cache and open memory go.
    pub fn forget_process(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    pub fn has_process(&self, pid: u32) -> bool {
        self.processes.contains_key(&pid)
    }

    /// Code objects cached for `pid`.
    pub fn cached_codes(&self, pid: u32) -> usize {
        self.processes.get(&pid).map_or(0, |p| p.cache.len())
    }

    /// Resolves one frame of process `pid`.
    pub fn resolve(&mut self, pid: u32, frame: PyFrame) -> Result<PyLocation, ResolveError> {
        let r = self.resolve_inner(pid, frame);
        if r.is_err() {
            self.stats.errors += 1;
        }
        r
    }

    fn resolve_inner(&mut self, pid: u32, frame: PyFrame) -> Result<PyLocation, ResolveError> {
        let proc = self
            .processes
            .get_mut(&pid)
            .ok_or(ResolveError::UnknownProcess(pid))?;
        let addr = frame.code_addr();
        let loc = |c: &CachedCode, line| PyLocation {
            function: c.function,
            line,
            entry: frame.is_entry(),
        };
        if let Some(c) = proc.cache.get(addr) {
            if let Ok(line) = c.code.line_of(addr, frame.instr) {
                self.stats.hits += 1;
                return Ok(loc(&c, line));
            }
            proc.cache.remove(addr);
            self.stats.stale += 1;
        }
        self.stats.misses += 1;
        let code = proc.reader.read_code(addr)?;
        let line = code.line_of(addr, frame.instr)?;
        let function = self
            .functions
            .intern(&code.qualname, &code.filename, code.first_line);
        let c = Arc::new(CachedCode { function, code });
        let out = loc(&c, line);
        proc.cache.insert(addr, c);
        Ok(out)
    }

    /// The interned function `id`.
    pub fn function(&self, id: FunctionId) -> Option<&Function> {
        self.functions.get(id)
    }

    pub fn functions(&self) -> &FunctionTable {
        &self.functions
    }

    /// Starts a new function table (ids restart from 0); every cache is dropped with it, since
    /// cached entries hold old ids.
    pub fn reset_functions(&mut self) {
        self.functions.clear();
        for p in self.processes.values_mut() {
            p.cache = GenCache::new(self.codes_per_process);
        }
    }

    pub fn stats(&self) -> ResolverStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dummy(f: u32) -> Arc<CachedCode> {
        Arc::new(CachedCode {
            function: FunctionId(f),
            code: CodeObject {
                qualname: String::new(),
                filename: String::new(),
                first_line: 1,
                lines: LineTable::default(),
                bytecode: 0x1000,
                bytecode_len: 8,
                instr_kind: InstrKind::Pointer,
            },
        })
    }

    #[test]
    fn generational_cache_is_bounded_and_keeps_recent_entries() {
        let mut c = GenCache::new(8);
        for k in 0..100u64 {
            c.insert(k, dummy(k as u32));
            assert!(c.len() <= 8);
            // A key touched every round survives.
            c.insert(1000, dummy(1000));
            assert!(c.get(1000).is_some());
        }
        assert!(c.get(99).is_some());
        assert!(c.get(0).is_none());
        c.remove(99);
        assert!(c.get(99).is_none());
    }

    #[test]
    fn instruction_offsets() {
        let mut code = dummy(0).code.clone();
        assert_eq!(code.offset_of(0x1000 - 2), Some(-2));
        assert_eq!(code.offset_of(0x1000), Some(0));
        assert_eq!(code.offset_of(0x1006), Some(6));
        assert_eq!(code.offset_of(0x1008), None);
        assert_eq!(code.offset_of(0x1003), None);
        assert_eq!(code.offset_of(0x1000 - 4), None);
        assert_eq!(code.offset_of(0), None);
        code.instr_kind = InstrKind::LastI;
        assert_eq!(code.offset_of(0xffff_ffff), Some(-2));
        assert_eq!(code.offset_of(u64::MAX), Some(-2));
        assert_eq!(code.offset_of(0xffff_fffe), None);
        assert_eq!(code.offset_of(3), Some(6));
        assert_eq!(code.offset_of(4), None);
    }
}
