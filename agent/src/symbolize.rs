//! Addresses in a traced process → (demangled) function names, from the mapped ELF files'
//! symbol tables (the `object` crate). Used to name CUDA kernels launched through the runtime
//! API without CUPTI: `cudaLaunchKernel` receives the host stub's address, and nvcc names the
//! stub after the kernel's mangled name.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use object::{Object, ObjectSegment, ObjectSymbol};

/// Symbols and loadable segments of one ELF file.
struct SymbolTable {
    /// (address, size, name), sorted by address.
    symbols: Vec<(u64, u64, String)>,
    /// (file offset, virtual address, file size) of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
}

impl SymbolTable {
    fn load(path: &Path) -> Option<Self> {
        let data = std::fs::read(path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        let mut symbols: Vec<(u64, u64, String)> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| s.kind() == object::SymbolKind::Text && s.address() != 0)
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_owned())))
            .collect();
        symbols.sort_by_key(|s| s.0);
        symbols.dedup_by_key(|s| s.0);
        let segments = file
            .segments()
            .map(|seg| {
                let (off, size) = seg.file_range();
                (off, seg.address(), size)
            })
            .collect();
        Some(Self { symbols, segments })
    }

    fn vaddr_of_file_offset(&self, off: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|(o, _, size)| off >= *o && off < o + size)
            .map(|(o, vaddr, _)| off - o + vaddr)
    }

    fn lookup(&self, vaddr: u64) -> Option<&str> {
        let i = self
            .symbols
            .partition_point(|s| s.0 <= vaddr)
            .checked_sub(1)?;
        let (addr, size, name) = &self.symbols[i];
        (size == &0 && vaddr == *addr || vaddr < addr + size).then_some(name.as_str())
    }
}

/// Demangles a C++ (Itanium ABI) name; other names are returned as they are.
pub fn demangle(name: &str) -> String {
    cpp_demangle::Symbol::new(name)
        .ok()
        .and_then(|s| s.demangle().ok())
        .unwrap_or_else(|| name.to_owned())
}

/// Caches symbol tables per file.
#[derive(Default)]
pub struct Symbolizer {
    tables: HashMap<PathBuf, Option<Arc<SymbolTable>>>,
}

impl Symbolizer {
    /// The demangled name of the function at `addr` in process `pid`.
    pub fn symbolize(&mut self, pid: u32, addr: u64) -> Option<String> {
        let m = crate::targets::file_mappings(pid)
            .into_iter()
            .find(|m| addr >= m.start && addr < m.end)?;
        // Through the process's root, so files inside containers resolve too.
        let file = PathBuf::from(format!("/proc/{pid}/root{}", m.path.display()));
        let table = self
            .tables
            .entry(m.path.clone())
            .or_insert_with(|| SymbolTable::load(&file).map(Arc::new))
            .clone()?;
        let vaddr = table.vaddr_of_file_offset(addr - m.start + m.offset)?;
        table.lookup(vaddr).map(demangle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    #[no_mangle]
    pub extern "C" fn infertap_symbolize_probe_target() -> u32 {
        std::hint::black_box(7)
    }

    #[test]
    fn names_a_function_of_this_process() {
        let addr = infertap_symbolize_probe_target as extern "C" fn() -> u32 as usize as u64;
        let name = Symbolizer::default().symbolize(std::process::id(), addr);
        assert_eq!(name.as_deref(), Some("infertap_symbolize_probe_target"));
    }

    #[test]
    fn demangles_cuda_host_stub_names() {
        assert_eq!(
            demangle("_Z14rmsnorm_kernelPfi"),
            "rmsnorm_kernel(float*, int)"
        );
        assert_eq!(demangle("plain_c"), "plain_c");
    }
}
