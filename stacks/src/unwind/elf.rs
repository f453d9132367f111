//! One ELF file's unwind tables, parsed once and shared by every process that maps the file.
//!
//! Only what unwinding and address normalization need is kept in memory: the bytes of
//! `.eh_frame`/`.eh_frame_hdr` (and `.debug_frame` where present), a sorted table of the address
//! ranges the CFI covers, the loadable segments and the GNU build id. The section bytes are
//! copied onto the heap rather than memory-mapped, so a library truncated or rewritten on disk
//! can never fault the agent (SIGBUS) and the cache's memory bound is real.
//!
//! Cost (measured by `examples/unwind_cost.rs`): reading the sections is a few `pread`s; the
//! coverage table is one pass over every FDE (≈ 0.3 µs each): libpython3.11 (5.4 k FDEs,
//! 460 KiB held) 0.5 ms, a 24 MiB OpenBLAS (11.7 k FDEs, 1.9 MiB held) 3.3 ms.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::sync::atomic::AtomicU8;
use std::sync::Arc;

use framehop::x86_64::UnwinderX86_64;
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder as _};
use gimli::{CieOrFde, LittleEndian, UnwindSection};
use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Object, ObjectSection, ReadRef};

/// Section bytes shared between the coverage table and framehop.
pub(crate) type SectionData = Arc<[u8]>;

/// framehop unwinder over one module's CFI, placed at the module's own (link-time) addresses:
/// callers translate a process address to an ELF virtual address before asking it.
pub(crate) type CfiUnwinder = UnwinderX86_64<SectionData>;

/// Which section describes an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CfiSource {
    EhFrame,
    DebugFrame,
}

/// One FDE's address range, `start..start+len` in ELF virtual addresses, and where it is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fde {
    pub start: u64,
    pub len: u32,
    /// Offset of the FDE in its section.
    pub offset: u32,
    pub source: CfiSource,
}

/// A CFI section kept for evaluating rows framehop cannot (see `cfi_eval`).
pub(crate) struct CfiSection {
    pub bytes: SectionData,
    pub bases: gimli::BaseAddresses,
}

/// A PT_LOAD segment: where file bytes land in the ELF's virtual address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LoadSegment {
    pub file_offset: u64,
    pub file_size: u64,
    pub vaddr: u64,
    /// PF_X: the segment holds code.
    pub exec: bool,
}

/// Why an ELF file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a 64-bit little-endian ELF file: {0}")]
    NotElf(String),
    #[error("bad ELF: {0}")]
    Bad(String),
}

impl From<object::Error> for ElfError {
    fn from(e: object::Error) -> Self {
        ElfError::Bad(e.to_string())
    }
}

/// The parsed, shareable part of a module.
pub(crate) struct ElfUnwindData {
    pub build_id: Option<Box<[u8]>>,
    pub segments: Vec<LoadSegment>,
    /// Sorted by `start`.
    coverage: Vec<Fde>,
    /// Per FDE of `coverage`: 0 not looked at yet, [`FDE_SIMPLE`] every row is one framehop
    /// applies exactly, [`FDE_COMPLEX`] some row needs the full evaluator.
    fde_kind: Vec<AtomicU8>,
    pub eh_frame: Option<CfiSection>,
    pub debug_frame: Option<CfiSection>,
    pub eh: Option<CfiUnwinder>,
    pub debug: Option<CfiUnwinder>,
    /// Heap bytes held (section copies + coverage table).
    pub heap_bytes: usize,
    /// FDEs that could not be parsed (counted, the rest of the table is still used).
    pub bad_fdes: usize,
}

impl ElfUnwindData {
    /// Parses `file` (opened by the caller from the process's view of it).
    pub fn from_file(file: &File) -> Result<Self, ElfError> {
        let cache = object::ReadCache::new(file);
        Self::parse(&cache)
    }

    /// Parses an ELF image held in memory (the vDSO).
    pub fn from_bytes(data: &[u8]) -> Result<Self, ElfError> {
        Self::parse(data)
    }

    fn parse<'d, R: ReadRef<'d>>(data: R) -> Result<Self, ElfError> {
        let elf = ElfFile64::<object::Endianness, R>::parse(data)
            .map_err(|e| ElfError::NotElf(e.to_string()))?;
        if !elf.is_little_endian() {
            return Err(ElfError::NotElf("big-endian".into()));
        }
        if elf.architecture() != object::Architecture::X86_64 {
            return Err(ElfError::NotElf(format!("{:?}", elf.architecture())));
        }
        let endian = elf.endian();
        let mut segments = Vec::new();
        for ph in elf.elf_program_headers() {
            if ph.p_type(endian) == object::elf::PT_LOAD {
                segments.push(LoadSegment {
                    file_offset: ph.p_offset(endian),
                    file_size: ph.p_filesz(endian),
                    vaddr: ph.p_vaddr(endian),
                    exec: ph.p_flags(endian).contains(object::elf::PF_X),
                });
            }
        }
        let build_id = elf.build_id().ok().flatten().map(Box::from);

        let section = |name: &str| -> Result<Option<(Range<u64>, SectionData)>, ElfError> {
            let Some(s) = elf.section_by_name(name) else {
                return Ok(None);
            };
            if s.kind() == object::SectionKind::UninitializedData {
                return Ok(None);
            }
            // Compressed `.debug_frame` (SHF_COMPRESSED) is not decompressed: `data()` would
            // hand back the compressed bytes, so skip it.
            if let object::SectionFlags::Elf { sh_flags, .. } = s.flags() {
                if sh_flags.contains(object::elf::SHF_COMPRESSED) {
                    return Ok(None);
                }
            }
            let bytes = s.data()?;
            if bytes.is_empty() {
                return Ok(None);
            }
            Ok(Some((
                s.address()..s.address() + s.size(),
                Arc::from(bytes),
            )))
        };
        let svma = |name: &str| {
            elf.section_by_name(name)
                .map(|s| s.address()..s.address() + s.size())
        };
        let eh_frame = section(".eh_frame")?;
        let eh_frame_hdr = if eh_frame.is_some() {
            section(".eh_frame_hdr")?
        } else {
            None
        };
        let debug_frame = section(".debug_frame")?;
        let text_svma = svma(".text");
        let got_svma = svma(".got");

        let mut coverage = Vec::new();
        let mut bad_fdes = 0;
        let eh_section = eh_frame.as_ref().map(|(range, bytes)| {
            let mut bases = gimli::BaseAddresses::default().set_eh_frame(range.start);
            if let Some(t) = &text_svma {
                bases = bases.set_text(t.start);
            }
            if let Some(g) = &got_svma {
                bases = bases.set_got(g.start);
            }
            CfiSection {
                bytes: bytes.clone(),
                bases,
            }
        });
        let debug_section = debug_frame.as_ref().map(|(_, bytes)| CfiSection {
            bytes: bytes.clone(),
            bases: gimli::BaseAddresses::default(),
        });
        if let Some(sec) = &eh_section {
            bad_fdes += collect_fdes(
                &eh_frame_of(sec),
                &sec.bases,
                CfiSource::EhFrame,
                &mut coverage,
            );
        }
        if let Some(sec) = &debug_section {
            bad_fdes += collect_fdes(
                &debug_frame_of(sec),
                &sec.bases,
                CfiSource::DebugFrame,
                &mut coverage,
            );
        }
        // Where both sections describe an address (crt objects linked into a `-g` build without
        // `.eh_frame` for its own code), `.eh_frame` sorts first and wins.
        coverage.sort_by_key(|f| (f.start, f.source != CfiSource::EhFrame));
        coverage.dedup_by_key(|f| f.start);
        coverage.shrink_to_fit();

        let fde_kind = (0..coverage.len()).map(|_| AtomicU8::new(0)).collect();
        let mut heap_bytes = coverage.capacity() * (std::mem::size_of::<Fde>() + 1);
        let eh = eh_frame.map(|(eh_range, eh_bytes)| {
            heap_bytes += eh_bytes.len();
            let (hdr_svma, hdr_bytes) = match eh_frame_hdr {
                Some((r, b)) => {
                    heap_bytes += b.len();
                    (Some(r), Some(b))
                }
                None => (None, None),
            };
            one_module_unwinder(ExplicitModuleSectionInfo {
                base_svma: 0,
                text_svma: text_svma.clone(),
                got_svma: got_svma.clone(),
                eh_frame_svma: Some(eh_range),
                eh_frame: Some(eh_bytes),
                eh_frame_hdr_svma: hdr_svma,
                eh_frame_hdr: hdr_bytes,
                ..Default::default()
            })
        });
        let debug = debug_frame.map(|(_, bytes)| {
            heap_bytes += bytes.len();
            one_module_unwinder(ExplicitModuleSectionInfo {
                base_svma: 0,
                text_svma: text_svma.clone(),
                debug_frame: Some(bytes),
                ..Default::default()
            })
        });
        Ok(ElfUnwindData {
            build_id,
            segments,
            coverage,
            fde_kind,
            eh_frame: eh_section,
            debug_frame: debug_section,
            eh,
            debug,
            heap_bytes,
            bad_fdes,
        })
    }

    /// The FDE covering ELF virtual address `vaddr` (its index and entry), if any.
    pub fn fde_for(&self, vaddr: u64) -> Option<(usize, Fde)> {
        let i = self.coverage.partition_point(|f| f.start <= vaddr);
        let i = i.checked_sub(1)?;
        let f = self.coverage[i];
        (vaddr - f.start < u64::from(f.len)).then_some((i, f))
    }

    /// The per-FDE memo of [`FDE_SIMPLE`] / [`FDE_COMPLEX`] (0: not computed).
    pub fn fde_kind(&self, index: usize) -> &AtomicU8 {
        &self.fde_kind[index]
    }

    /// Whether the file has any CFI at all.
    pub fn has_cfi(&self) -> bool {
        !self.coverage.is_empty()
    }

    /// FDEs in the coverage table.
    pub fn fde_count(&self) -> usize {
        self.coverage.len()
    }

    /// The load bias of a mapping of this file at `map_start` from file offset `map_offset`
    /// (`exec`: the mapping is executable): process address = ELF virtual address + bias.
    /// `None` when no PT_LOAD segment holds that offset.
    pub fn bias_for_mapping(&self, map_start: u64, map_offset: u64, exec: bool) -> Option<u64> {
        // The kernel maps a segment from the page holding its first byte, so one page of the
        // file can start two mappings (lld lays out `R` then `R E` segments back to back in the
        // file, a page apart in memory): the segment with the mapping's permissions decides.
        let holds = |s: &&LoadSegment| {
            map_offset >= s.file_offset - s.file_offset % PAGE
                && map_offset < s.file_offset.saturating_add(s.file_size.max(1))
        };
        let seg = self
            .segments
            .iter()
            .filter(holds)
            .find(|s| s.exec == exec)
            .or_else(|| self.segments.iter().find(holds))?;
        let vaddr_at_map_start = seg
            .vaddr
            .wrapping_sub(seg.file_offset)
            .wrapping_add(map_offset);
        Some(map_start.wrapping_sub(vaddr_at_map_start))
    }
}

const PAGE: u64 = 4096;

/// `ElfUnwindData::fde_kind` values.
pub(crate) const FDE_SIMPLE: u8 = 1;
pub(crate) const FDE_COMPLEX: u8 = 2;

/// The reader type over a kept section.
pub(crate) type Reader<'a> = gimli::EndianSlice<'a, LittleEndian>;

pub(crate) fn eh_frame_of(sec: &CfiSection) -> gimli::EhFrame<Reader<'_>> {
    let mut s = gimli::EhFrame::new(&sec.bytes, LittleEndian);
    s.set_address_size(8);
    s
}

pub(crate) fn debug_frame_of(sec: &CfiSection) -> gimli::DebugFrame<Reader<'_>> {
    let mut s = gimli::DebugFrame::new(&sec.bytes, LittleEndian);
    s.set_address_size(8);
    s
}

/// A framehop unwinder that knows exactly one module, at its link-time addresses.
fn one_module_unwinder(info: ExplicitModuleSectionInfo<SectionData>) -> CfiUnwinder {
    let mut u = CfiUnwinder::new();
    // framehop keeps 32-bit module-relative addresses; ELF virtual addresses of code fit.
    u.add_module(Module::new(String::new(), 0..u64::from(u32::MAX), 0, info));
    u
}

/// Appends every FDE's range; returns how many entries failed to parse.
fn collect_fdes<'a, S>(
    section: &S,
    bases: &gimli::BaseAddresses,
    source: CfiSource,
    out: &mut Vec<Fde>,
) -> usize
where
    S: UnwindSection<gimli::EndianSlice<'a, LittleEndian>>,
{
    type Reader<'a> = gimli::EndianSlice<'a, LittleEndian>;
    let mut cies: HashMap<usize, gimli::CommonInformationEntry<Reader<'a>>> = HashMap::new();
    let mut bad = 0;
    let mut entries = section.entries(bases);
    loop {
        match entries.next() {
            Ok(None) => break,
            Ok(Some(CieOrFde::Cie(_))) => {}
            Ok(Some(CieOrFde::Fde(partial))) => {
                let parsed = partial.parse(|sec, b, off| {
                    let key: usize = gimli::UnwindOffset::into(off);
                    if let Some(cie) = cies.get(&key) {
                        return Ok(cie.clone());
                    }
                    let cie = sec.cie_from_offset(b, off)?;
                    cies.insert(key, cie.clone());
                    Ok(cie)
                });
                match parsed {
                    Ok(fde) => {
                        let len = fde.len();
                        if len > 0 && fde.initial_address() != 0 {
                            if let Ok(len) = u32::try_from(len) {
                                let offset: usize = partial.offset();
                                if let Ok(offset) = u32::try_from(offset) {
                                    out.push(Fde {
                                        start: fde.initial_address(),
                                        len,
                                        offset,
                                        source,
                                    });
                                }
                            }
                        }
                    }
                    Err(_) => bad += 1,
                }
            }
            // A malformed entry length: the rest of the section cannot be framed.
            Err(_) => {
                bad += 1;
                break;
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(file_offset: u64, file_size: u64, vaddr: u64, exec: bool) -> LoadSegment {
        LoadSegment {
            file_offset,
            file_size,
            vaddr,
            exec,
        }
    }

    fn data(segments: Vec<LoadSegment>) -> ElfUnwindData {
        ElfUnwindData {
            build_id: None,
            segments,
            coverage: Vec::new(),
            fde_kind: Vec::new(),
            eh_frame: None,
            debug_frame: None,
            eh: None,
            debug: None,
            heap_bytes: 0,
            bad_fdes: 0,
        }
    }

    #[test]
    fn bias_of_an_lld_layout_uses_the_code_segment() {
        // rustc's default (lld) layout: the code segment starts mid-page in the file, one page
        // further in memory; the page at 0xde000 starts both the R and the R E mapping.
        let d = data(vec![
            seg(0, 0xde620, 0, false),
            seg(0xde620, 0x1ef920, 0xdf620, true),
            seg(0x2cdf40, 0x1c7c0, 0x2cff40, false),
        ]);
        let base = 0x5555_5555_0000u64;
        let exec_map_start = base + 0xdf000;
        let bias = d.bias_for_mapping(exec_map_start, 0xde000, true).unwrap();
        assert_eq!(bias, base);
        // The read-only mapping of the same page resolves through the first segment.
        assert_eq!(d.bias_for_mapping(base, 0, false), Some(base));
        assert_eq!(d.bias_for_mapping(base, 0x400000, true), None);
    }

    #[test]
    fn bias_of_a_bfd_layout() {
        // ld.bfd with -z separate-code: page-aligned segments, vaddr == offset.
        let d = data(vec![
            seg(0, 0x600, 0, false),
            seg(0x1000, 0x1d5, 0x1000, true),
        ]);
        let base = 0x7f00_0000_0000u64;
        assert_eq!(d.bias_for_mapping(base + 0x1000, 0x1000, true), Some(base));
    }

    #[test]
    fn own_executable_has_cfi_for_its_functions() {
        let f = File::open("/proc/self/exe").unwrap();
        let d = ElfUnwindData::from_file(&f).unwrap();
        assert!(d.has_cfi() && d.eh.is_some());
        assert!(d.build_id.is_some());
        assert_eq!(d.bad_fdes, 0);
        assert!(d.fde_count() > 1000, "{}", d.fde_count());
        // Every FDE start is covered, and the coverage is sorted and disjoint.
        let mut last_end = 0;
        for f in &d.coverage {
            assert!(f.start >= last_end, "overlap at {:#x}", f.start);
            last_end = f.start + u64::from(f.len);
            assert_eq!(d.fde_for(f.start).map(|(_, x)| x.start), Some(f.start));
        }
        assert!(d.fde_for(0).is_none());
    }

    #[test]
    fn garbage_is_not_an_elf() {
        assert!(matches!(
            ElfUnwindData::from_bytes(b"not an elf file at all"),
            Err(ElfError::NotElf(_))
        ));
        assert!(ElfUnwindData::from_bytes(&[]).is_err());
        // A truncated real ELF: headers promise more than there is.
        let me = std::fs::read("/proc/self/exe").unwrap();
        for cut in [64, 4096, me.len() / 2] {
            let _ = ElfUnwindData::from_bytes(&me[..cut]);
        }
    }
}
