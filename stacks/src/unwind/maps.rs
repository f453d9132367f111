//! One process's executable mappings (from `/proc/<pid>/maps`), each resolved lazily to its
//! module: opened through `/proc/<pid>/map_files/<range>` (works for files deleted on disk and
//! for other mount namespaces) or `/proc/<pid>/root/<path>`, parsed through the shared
//! [`ModuleCache`](super::modules::ModuleCache). The same read keeps the ranges of the
//! writable, non-executable mappings, where threads' stacks are (see `Unwinder::stack_top`).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use procfs::process::{MMPermissions, MMapPath, Process};

use super::modules::{strip_deleted, LoadError, ModuleCache, ModuleInfo};

/// What backs an executable mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Backing {
    /// A file (possibly deleted since it was mapped).
    File { path: PathBuf, deleted: bool },
    /// The kernel's vDSO.
    Vdso,
    /// Anonymous executable memory (JIT code, trampolines): no module, no unwind info.
    Anonymous,
}

pub(crate) struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub dev: u64,
    pub inode: u64,
    pub backing: Backing,
    /// Filled on first use.
    pub module: Option<Arc<ModuleInfo>>,
}

impl MapEntry {
    fn same_mapping(&self, other: &MapEntry) -> bool {
        self.start == other.start
            && self.end == other.end
            && self.offset == other.offset
            && self.dev == other.dev
            && self.inode == other.inode
            && self.backing == other.backing
    }
}

/// Options for opening module files.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OpenOptions {
    pub use_map_files: bool,
}

pub(crate) struct ProcessMap {
    pub pid: u32,
    /// Executable mappings, sorted by start.
    pub entries: Vec<MapEntry>,
    /// The readable, writable, non-executable mappings (thread stacks, heap, data), sorted by
    /// start.
    pub writable: Vec<DataMapping>,
    pub last_read: Instant,
}

/// A readable, writable, non-executable mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DataMapping {
    pub start: u64,
    pub end: u64,
    /// The main thread's `[stack]`, which the kernel grows down on demand.
    pub grows_down: bool,
}

/// The mappings of `pid` the unwinder keeps, from one read of its maps.
pub(crate) struct Maps {
    /// Executable mappings, sorted by start.
    pub exec: Vec<MapEntry>,
    /// Readable, writable, non-executable mappings, sorted by start.
    pub writable: Vec<DataMapping>,
}

/// Reads the mappings of `pid`.
pub(crate) fn read_maps(pid: u32) -> io::Result<Maps> {
    let maps = Process::new(pid as i32)
        .and_then(|p| p.maps())
        .map_err(proc_err)?;
    let mut out = Vec::new();
    let mut writable = Vec::new();
    let rw = MMPermissions::READ | MMPermissions::WRITE;
    for m in maps {
        if !m.perms.contains(MMPermissions::EXECUTE) {
            if m.perms.contains(rw) {
                writable.push(DataMapping {
                    start: m.address.0,
                    end: m.address.1,
                    grows_down: matches!(m.pathname, MMapPath::Stack),
                });
            }
            continue;
        }
        let backing = match &m.pathname {
            MMapPath::Path(p) => {
                let (path, deleted) = strip_deleted(p);
                Backing::File { path, deleted }
            }
            MMapPath::Vdso => Backing::Vdso,
            // `[vsyscall]` is a fixed legacy page with no unwind info; treat like anonymous.
            _ => Backing::Anonymous,
        };
        let (major, minor) = m.dev;
        out.push(MapEntry {
            start: m.address.0,
            end: m.address.1,
            offset: m.offset,
            dev: libc::makedev(major as u32, minor as u32),
            inode: m.inode,
            backing,
            module: None,
        });
    }
    out.sort_by_key(|e| e.start);
    writable.sort_unstable_by_key(|m| m.start);
    Ok(Maps {
        exec: out,
        writable,
    })
}

fn proc_err(e: procfs::ProcError) -> io::Error {
    match e {
        procfs::ProcError::NotFound(_) => io::Error::from(io::ErrorKind::NotFound),
        procfs::ProcError::PermissionDenied(_) => io::Error::from(io::ErrorKind::PermissionDenied),
        procfs::ProcError::Io(e, _) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl ProcessMap {
    pub fn read(pid: u32) -> io::Result<Self> {
        let maps = read_maps(pid)?;
        Ok(ProcessMap {
            pid,
            entries: maps.exec,
            writable: maps.writable,
            last_read: Instant::now(),
        })
    }

    /// Re-reads the maps, keeping resolved modules of mappings that did not change.
    pub fn refresh(&mut self) -> io::Result<()> {
        let Maps {
            exec: mut fresh,
            writable,
        } = read_maps(self.pid)?;
        self.writable = writable;
        for e in &mut fresh {
            if let Ok(i) = self.entries.binary_search_by_key(&e.start, |o| o.start) {
                if self.entries[i].same_mapping(e) {
                    e.module = self.entries[i].module.take();
                }
            }
        }
        self.entries = fresh;
        self.last_read = Instant::now();
        Ok(())
    }

    /// The readable, writable, non-executable mapping holding `addr`.
    pub fn writable_at(&self, addr: u64) -> Option<DataMapping> {
        let i = self.writable.partition_point(|m| m.start <= addr);
        let m = *self.writable.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    /// Index of the executable mapping holding `addr`.
    pub fn find(&self, addr: u64) -> Option<usize> {
        let i = self.entries.partition_point(|e| e.start <= addr);
        let i = i.checked_sub(1)?;
        (addr < self.entries[i].end).then_some(i)
    }

    /// The module of entry `i`, opening and parsing it on first use. `None` for anonymous
    /// memory.
    pub fn module(
        &mut self,
        i: usize,
        cache: &mut ModuleCache,
        opts: OpenOptions,
    ) -> Option<Arc<ModuleInfo>> {
        let pid = self.pid;
        let e = &mut self.entries[i];
        if let Some(m) = &e.module {
            return Some(m.clone());
        }
        let info = match &e.backing {
            Backing::Anonymous => return None,
            Backing::File { path, deleted } => {
                resolve_file(pid, e, path.clone(), *deleted, cache, opts)
            }
            Backing::Vdso => resolve_vdso(pid, e, cache),
        };
        let info = Arc::new(info);
        e.module = Some(info.clone());
        Some(info)
    }
}

fn resolve_file(
    pid: u32,
    e: &MapEntry,
    path: PathBuf,
    deleted: bool,
    cache: &mut ModuleCache,
    opts: OpenOptions,
) -> ModuleInfo {
    let mut info = ModuleInfo {
        id: None,
        path,
        deleted,
        open_path: None,
        dev: e.dev,
        inode: e.inode,
        mapping_start: e.start,
        mapping_end: e.end,
        mapping_offset: e.offset,
        bias: None,
        vdso: false,
        object: None,
        own_file: None,
        load_error: None,
    };
    let obj = match cache.lookup_file(e.dev, e.inode) {
        Some(obj) => Ok((obj, None)),
        None => match open_module_file(pid, e, &info.path, deleted, opts) {
            Ok((file, open_path)) => {
                info.open_path = Some(open_path);
                cache.load(e.dev, e.inode, file, None)
            }
            Err(err) => {
                cache.note_open_failure();
                info.load_error = Some(format!("open: {err}"));
                tracing::debug!(pid, path = %info.path.display(), "module not opened: {err}");
                return info;
            }
        },
    };
    attach_object(&mut info, obj, e);
    info
}

#[allow(clippy::type_complexity)]
fn attach_object(
    info: &mut ModuleInfo,
    obj: Result<
        (
            Arc<super::modules::ModuleObject>,
            Option<(File, Option<super::modules::FileId>)>,
        ),
        LoadError,
    >,
    e: &MapEntry,
) {
    match obj {
        Ok((obj, own_file)) => {
            info.own_file = own_file;
            info.id = Some(obj.id);
            info.bias = obj.data.bias_for_mapping(e.start, e.offset, true);
            if info.bias.is_none() {
                info.load_error = Some("mapping offset outside every PT_LOAD segment".into());
            }
            info.object = Some(obj);
        }
        Err(err) => {
            tracing::debug!(path = %info.path.display(), "module not parsed: {err}");
            info.load_error = Some(err.to_string());
        }
    }
}

/// Opens the file behind a mapping as the process sees it.
fn open_module_file(
    pid: u32,
    e: &MapEntry,
    path: &std::path::Path,
    deleted: bool,
    opts: OpenOptions,
) -> io::Result<(File, PathBuf)> {
    let mut first_err = None;
    if opts.use_map_files {
        // The very file the kernel mapped, whatever happened to its path since (needs
        // CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE).
        let p = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", e.start, e.end));
        match File::open(&p) {
            Ok(f) => return Ok((f, p)),
            Err(err) => first_err = Some(err),
        }
    }
    if !deleted {
        // The path in the process's own mount namespace (containers); accepted only if it is
        // still the mapped file.
        let rel = path.strip_prefix("/").unwrap_or(path);
        let p = PathBuf::from(format!("/proc/{pid}/root")).join(rel);
        match File::open(&p) {
            Ok(f) => {
                let md = f.metadata()?;
                if md.dev() == e.dev && md.ino() == e.inode {
                    return Ok((f, p));
                }
                return Err(io::Error::other(format!(
                    "{} is not the mapped file any more (inode {} vs {})",
                    p.display(),
                    md.ino(),
                    e.inode
                )));
            }
            Err(err) => return Err(first_err.unwrap_or(err)),
        }
    }
    Err(first_err.unwrap_or_else(|| io::Error::other("file deleted and map_files not used")))
}

fn resolve_vdso(pid: u32, e: &MapEntry, cache: &mut ModuleCache) -> ModuleInfo {
    let mut info = ModuleInfo {
        id: None,
        path: PathBuf::from("[vdso]"),
        deleted: false,
        open_path: None,
        dev: 0,
        inode: 0,
        mapping_start: e.start,
        mapping_end: e.end,
        mapping_offset: 0,
        bias: None,
        vdso: true,
        object: None,
        own_file: None,
        load_error: None,
    };
    let image = match read_process_memory(pid, e.start, (e.end - e.start) as usize) {
        Ok(img) => img,
        Err(err) => {
            cache.note_open_failure();
            info.load_error = Some(format!("read vdso: {err}"));
            return info;
        }
    };
    // The symbolizer opens modules by path: give the image one (an anonymous memory file).
    let file = match memfd_with(&image) {
        Ok(f) => f,
        Err(err) => {
            cache.note_open_failure();
            info.load_error = Some(format!("memfd: {err}"));
            return info;
        }
    };
    let obj = cache.load(0, 0, file, Some(&image));
    attach_object(&mut info, obj, e);
    info
}

fn read_process_memory(pid: u32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, addr)?;
    Ok(buf)
}

fn memfd_with(bytes: &[u8]) -> io::Result<File> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: a valid NUL-terminated name and flags; the returned descriptor is owned by the
    // File below.
    let fd = unsafe { libc::memfd_create(c"infertap-vdso".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(bytes)?;
    Ok(f)
}
