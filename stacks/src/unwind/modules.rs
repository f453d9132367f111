//! The agent-wide cache of parsed modules: one parse of a file serves every process that maps
//! it, found by (device, inode) or, across containers and copies, by GNU build id; bounded in
//! count and heap bytes.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::elf::{ElfError, ElfUnwindData};

/// Identifies one parsed module object for the agent's lifetime (the same file mapped by two
/// processes has one id). Ids are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId(pub u64);

/// What the unwinder shares one parse of a module's unwind tables by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ModuleKey {
    /// The GNU build id (`NT_GNU_BUILD_ID`), when the file has one.
    BuildId(Box<[u8]>),
    /// The file's device and inode (as `/proc/<pid>/maps` shows them) when it has no build id.
    File { dev: u64, inode: u64 },
}

/// Identity of one file's contents as the symbolizer reads them: device, inode, size and
/// modification time of the open file (what `fstat` says; the vDSO's memory file is unique).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `st_dev` of the open file.
    pub dev: u64,
    /// `st_ino`.
    pub inode: u64,
    /// Bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
}

impl FileId {
    pub(crate) fn of(file: &File) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let md = file.metadata()?;
        Ok(FileId {
            dev: md.dev(),
            inode: md.ino(),
            size: md.size(),
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        })
    }
}

/// A parsed file: unwind tables plus the open file (kept so the file can still be symbolized
/// after the process exited or the file was deleted; one descriptor per cached module).
pub(crate) struct ModuleObject {
    pub id: ModuleId,
    pub key: ModuleKey,
    pub file: File,
    pub file_id: Option<FileId>,
    pub data: ElfUnwindData,
}

impl ModuleObject {
    pub fn build_id(&self) -> Option<&[u8]> {
        self.data.build_id.as_deref()
    }
}

/// A module as one process maps it. `normalize` hands these out; they stay valid (and keep the
/// file open) after the process exits.
pub struct ModuleInfo {
    /// Id of the parsed object, `None` when the file could not be opened or parsed.
    pub id: Option<ModuleId>,
    /// The path as the process sees it (in its own mount namespace), without ` (deleted)`.
    pub path: PathBuf,
    /// The file was deleted (or replaced) on disk after the process mapped it.
    pub deleted: bool,
    /// The path the agent opened it through (`/proc/<pid>/map_files/<range>` or
    /// `/proc/<pid>/root/<path>`); only valid while the process lives. `None` when the parsed
    /// module was found in the cache (opened for another mapping or process) or opening
    /// failed. To open the file later use [`ModuleInfo::agent_path`].
    pub open_path: Option<PathBuf>,
    /// Device (`makedev(major, minor)`) and inode of the mapped file as `/proc/<pid>/maps`
    /// shows them (0 for the vDSO).
    pub dev: u64,
    pub inode: u64,
    /// The executable mapping this info describes, in the process's address space.
    pub mapping_start: u64,
    pub mapping_end: u64,
    /// File offset the mapping starts at.
    pub mapping_offset: u64,
    /// Process address = ELF virtual address + `bias`; `None` when the ELF headers could not be
    /// read.
    pub bias: Option<u64>,
    /// The module is the kernel's vDSO (its image is read from the process's memory).
    pub vdso: bool,
    pub(crate) object: Option<Arc<ModuleObject>>,
    /// This mapping's own file, when the parsed object was shared by build id from another
    /// file (a copy in another container, or a stripped and an unstripped build of the same
    /// code): symbolization reads the file this process maps.
    pub(crate) own_file: Option<(File, Option<FileId>)>,
    /// Why the object is missing, for logs.
    pub load_error: Option<String>,
}

impl std::fmt::Debug for ModuleInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleInfo")
            .field("id", &self.id)
            .field("path", &self.path)
            .field("deleted", &self.deleted)
            .field("open_path", &self.open_path)
            .field("build_id", &self.build_id_hex())
            .field(
                "mapping",
                &format_args!("{:#x}..{:#x}", self.mapping_start, self.mapping_end),
            )
            .field("bias", &self.bias.map(|b| format!("{b:#x}")))
            .field("has_cfi", &self.has_cfi())
            .field("load_error", &self.load_error)
            .finish()
    }
}

impl ModuleInfo {
    /// The file name (`libpython3.11.so.1.0`, `[vdso]`).
    pub fn name(&self) -> &str {
        if self.vdso {
            return "[vdso]";
        }
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
    }

    /// GNU build id bytes, if the file was read and has one.
    pub fn build_id(&self) -> Option<&[u8]> {
        self.object.as_ref()?.build_id()
    }

    /// Build id as lowercase hex.
    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id()
            .map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
    }

    /// What the parsed unwind data is shared by (build id, else the mapped file).
    pub fn key(&self) -> ModuleKey {
        match &self.object {
            Some(o) => o.key.clone(),
            None => ModuleKey::File {
                dev: self.dev,
                inode: self.inode,
            },
        }
    }

    /// The open file this process maps, if it could be opened. Valid for as long as this info
    /// lives, even after the process exited or the file was deleted.
    pub fn file(&self) -> Option<&File> {
        match &self.own_file {
            Some((f, _)) => Some(f),
            None => self.object.as_ref().map(|o| &o.file),
        }
    }

    /// Identity of [`file`](Self::file)'s contents (the symbolizer's cache key).
    pub fn file_id(&self) -> Option<FileId> {
        match &self.own_file {
            Some((_, id)) => *id,
            None => self.object.as_ref().and_then(|o| o.file_id),
        }
    }

    /// A path through which this process (the agent) can open the module's file right now:
    /// `/proc/self/fd/<n>` of the descriptor the module holds.
    pub fn agent_path(&self) -> Option<PathBuf> {
        use std::os::fd::AsRawFd;
        self.file()
            .map(|f| PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())))
    }

    /// Whether the file has DWARF CFI (`.eh_frame` or `.debug_frame`).
    pub fn has_cfi(&self) -> bool {
        self.object.as_ref().is_some_and(|o| o.data.has_cfi())
    }

    /// FDEs (functions with CFI) the module has; 0 when it has no CFI or was not parsed.
    pub fn fde_count(&self) -> usize {
        self.object.as_ref().map_or(0, |o| o.data.fde_count())
    }

    /// Heap bytes the parsed module holds (shared by every process mapping it).
    pub fn heap_bytes(&self) -> usize {
        self.object.as_ref().map_or(0, |o| o.data.heap_bytes)
    }

    /// ELF virtual address of process address `addr` (meaningful inside this mapping).
    pub fn vaddr_of(&self, addr: u64) -> Option<u64> {
        self.bias.map(|b| addr.wrapping_sub(b))
    }

    /// File offset of process address `addr` (meaningful for addresses inside this mapping).
    pub fn file_offset_of(&self, addr: u64) -> u64 {
        addr.wrapping_sub(self.mapping_start)
            .wrapping_add(self.mapping_offset)
    }
}

/// Limits of the module cache.
#[derive(Clone, Copy, Debug)]
pub struct ModuleCacheLimits {
    /// Most parsed modules kept (each holds one open file descriptor).
    pub max_modules: usize,
    /// Most heap bytes of unwind tables kept (section copies + coverage tables).
    pub max_heap_bytes: usize,
}

impl Default for ModuleCacheLimits {
    fn default() -> Self {
        ModuleCacheLimits {
            max_modules: 512,
            max_heap_bytes: 512 << 20,
        }
    }
}

/// Counters of the module cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModuleCacheStats {
    /// Files parsed.
    pub loaded: u64,
    /// Lookups answered by an already parsed module (another process, or another mapping).
    pub shared: u64,
    /// Files that could not be opened or parsed.
    pub failed: u64,
    /// Files refused because the budget was spent on modules in use by live processes.
    pub over_budget: u64,
    /// Unused modules dropped to stay within the limits.
    pub evicted: u64,
    /// FDEs that failed to parse in loaded files (their addresses count as without CFI).
    pub bad_fdes: u64,
    /// Modules cached now.
    pub cached: u64,
    /// Heap bytes of the cached modules now.
    pub heap_bytes: u64,
}

struct Entry {
    obj: Arc<ModuleObject>,
    last_used: u64,
}

/// The cache itself.
pub(crate) struct ModuleCache {
    limits: ModuleCacheLimits,
    entries: HashMap<ModuleId, Entry>,
    by_file: HashMap<(u64, u64), ModuleId>,
    by_build_id: HashMap<Box<[u8]>, ModuleId>,
    next_id: u64,
    clock: u64,
    heap_bytes: usize,
    pub stats: ModuleCacheStats,
}

/// Why a module has no parsed object.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("{0}")]
    Elf(#[from] ElfError),
    #[error("module cache budget spent on modules in use ({0} bytes needed)")]
    OverBudget(usize),
}

impl ModuleCache {
    pub fn new(limits: ModuleCacheLimits) -> Self {
        ModuleCache {
            limits,
            entries: HashMap::new(),
            by_file: HashMap::new(),
            by_build_id: HashMap::new(),
            next_id: 1,
            clock: 0,
            heap_bytes: 0,
            stats: ModuleCacheStats::default(),
        }
    }

    fn touch(&mut self, id: ModuleId) -> Option<Arc<ModuleObject>> {
        self.clock += 1;
        let e = self.entries.get_mut(&id)?;
        e.last_used = self.clock;
        Some(e.obj.clone())
    }

    /// The parsed module of file (dev, inode), if cached.
    pub fn lookup_file(&mut self, dev: u64, inode: u64) -> Option<Arc<ModuleObject>> {
        let id = *self.by_file.get(&(dev, inode))?;
        let obj = self.touch(id)?;
        self.stats.shared += 1;
        Some(obj)
    }

    /// Parses (or finds by build id) the module in `file`, known to the process as (dev, inode).
    /// `vdso_image`: the bytes of the vDSO instead of a file on disk. When the parse of another
    /// file with the same build id is reused, `file` is handed back (with its identity) if it is
    /// a different file, for symbolizing this mapping from its own file.
    #[allow(clippy::type_complexity)]
    pub fn load(
        &mut self,
        dev: u64,
        inode: u64,
        file: File,
        vdso_image: Option<&[u8]>,
    ) -> Result<(Arc<ModuleObject>, Option<(File, Option<FileId>)>), LoadError> {
        // A cheap pass for the build id first: another container's copy of the same library
        // (other inode, same contents) shares the parse.
        let build_id = match vdso_image {
            Some(img) => read_build_id(img),
            None => read_build_id(&object::ReadCache::new(&file)),
        };
        if let Some(bid) = &build_id {
            if let Some(&id) = self.by_build_id.get(bid) {
                if let Some(obj) = self.touch(id) {
                    self.stats.shared += 1;
                    if vdso_image.is_some() {
                        return Ok((obj, None));
                    }
                    let fid = FileId::of(&file).ok();
                    if fid.is_some() && fid == obj.file_id {
                        self.by_file.insert((dev, inode), id);
                        return Ok((obj, None));
                    }
                    // Another file with the same code: share the unwind tables, keep this
                    // file for symbolization. No (dev, inode) alias, so every mapping of it
                    // comes through here and gets its own file.
                    return Ok((obj, Some((file, fid))));
                }
            }
        }
        let parsed = match vdso_image {
            Some(img) => ElfUnwindData::from_bytes(img),
            None => ElfUnwindData::from_file(&file),
        };
        let data = match parsed {
            Ok(d) => d,
            Err(e) => {
                self.stats.failed += 1;
                return Err(e.into());
            }
        };
        let need = data.heap_bytes;
        if !self.make_room(need) {
            self.stats.over_budget += 1;
            return Err(LoadError::OverBudget(need));
        }
        let id = ModuleId(self.next_id);
        self.next_id += 1;
        let key = match &data.build_id {
            Some(b) => ModuleKey::BuildId(b.clone()),
            None => ModuleKey::File { dev, inode },
        };
        let file_id = FileId::of(&file).ok();
        let obj = Arc::new(ModuleObject {
            id,
            key,
            file,
            file_id,
            data,
        });
        self.clock += 1;
        self.entries.insert(
            id,
            Entry {
                obj: obj.clone(),
                last_used: self.clock,
            },
        );
        if vdso_image.is_none() {
            self.by_file.insert((dev, inode), id);
        }
        if let Some(b) = &obj.data.build_id {
            self.by_build_id.insert(b.clone(), id);
        }
        self.heap_bytes += need;
        self.stats.loaded += 1;
        self.stats.bad_fdes += obj.data.bad_fdes as u64;
        self.update_gauges();
        Ok((obj, None))
    }

    /// Records a file that could not be opened.
    pub fn note_open_failure(&mut self) {
        self.stats.failed += 1;
    }

    /// Evicts least recently used modules that no process map holds until `need` more bytes and
    /// one more module fit. False when that is impossible.
    fn make_room(&mut self, need: usize) -> bool {
        loop {
            let fits = self.entries.len() < self.limits.max_modules
                && self.heap_bytes + need <= self.limits.max_heap_bytes;
            if fits {
                return true;
            }
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.obj) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(id, _)| *id);
            let Some(id) = victim else {
                return false;
            };
            self.remove(id);
            self.stats.evicted += 1;
        }
    }

    fn remove(&mut self, id: ModuleId) {
        if let Some(e) = self.entries.remove(&id) {
            self.heap_bytes -= e.obj.data.heap_bytes;
            self.by_file.retain(|_, v| *v != id);
            self.by_build_id.retain(|_, v| *v != id);
        }
        self.update_gauges();
    }

    fn update_gauges(&mut self) {
        self.stats.cached = self.entries.len() as u64;
        self.stats.heap_bytes = self.heap_bytes as u64;
    }
}

fn read_build_id<'d, R: object::ReadRef<'d>>(data: R) -> Option<Box<[u8]>> {
    use object::Object;
    let elf = object::read::elf::ElfFile64::<object::Endianness, R>::parse(data).ok()?;
    elf.build_id().ok().flatten().map(Box::from)
}

/// `path` without the ` (deleted)` suffix the kernel appends, and whether it had one.
pub(crate) fn strip_deleted(path: &Path) -> (PathBuf, bool) {
    let s = path.as_os_str().as_encoded_bytes();
    const SUFFIX: &[u8] = b" (deleted)";
    if s.ends_with(SUFFIX) {
        let trimmed = &s[..s.len() - SUFFIX.len()];
        // SAFETY: `trimmed` is a prefix of an OsStr's encoded bytes cut right before an ASCII
        // byte, which is a valid boundary of the encoding.
        let os = unsafe { std::ffi::OsStr::from_encoded_bytes_unchecked(trimmed) };
        (PathBuf::from(os), true)
    } else {
        (path.to_path_buf(), false)
    }
}
