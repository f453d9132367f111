//! pprof sink: one interval's aggregate of one profile type → a gzipped `profile.proto`, with
//! named frames (see `profiling::symbolic`), a Mapping per module (path and GNU build id), and
//! sample labels `node`, `pid`, `process`, `thread`, `model`, `state` and `kernel`.
//!
//! Python frames are Functions named by their qualified name (with `<`/`>` shown as `[`/`]`,
//! since pprof tools strip angle brackets as C++ templates; the exact qualname is the Function's
//! `system_name`) in their source file, at their line.
//!
//! Native addresses are file offsets placed in a per-module window (`memory_start` =
//! `n << 40` for the n-th module of the profile, `file_offset` 0), so `address - memory_start + file_offset` is the
//! file offset any pprof tool would symbolize, mappings never overlap, and profiles from many
//! processes of one library share their locations.

use std::collections::HashMap;
use std::sync::Arc;

use infertap_proto::pb::ProfileData;
use infertap_proto::pprof::{
    Line, LocationId, Mapping, MappingId, ProfileBuilder, ProfileKind, SampleLabel,
};
use infertap_stacks::unwind::ModuleInfo;

use crate::profiling::aggregate::{ProfileAggregate, SampleLabels};
use crate::profiling::symbolic::{FrameKind, FunctionSnapshot, Location, Namer};

/// Writes profiles into a directory as `<type>-<start unix ms>.pb.gz`, keeping the newest
/// `keep` files per type (older ones are deleted). A failed write is logged and counted, never
/// fatal: the profile still reaches the other sinks.
pub struct ProfileDir {
    dir: std::path::PathBuf,
    keep: usize,
    written: HashMap<i32, std::collections::VecDeque<std::path::PathBuf>>,
    pub write_errors: u64,
}

impl ProfileDir {
    pub fn open(dir: &std::path::Path, keep: usize) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating --profile-dir {}", dir.display()))?;
        Ok(ProfileDir {
            dir: dir.to_path_buf(),
            keep: keep.max(1),
            written: HashMap::new(),
            write_errors: 0,
        })
    }

    pub fn write(&mut self, p: &ProfileData) {
        let kind = infertap_proto::pb::ProfileType::try_from(p.r#type)
            .ok()
            .and_then(ProfileKind::from_pb)
            .map_or("unknown", |k| k.name());
        let path = self
            .dir
            .join(format!("{kind}-{}.pb.gz", p.start_unix_ns / 1_000_000));
        let tmp = path.with_extension("tmp");
        let res = std::fs::write(&tmp, &p.pprof).and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            self.write_errors += 1;
            tracing::warn!("writing {}: {e}", path.display());
            return;
        }
        let q = self.written.entry(p.r#type).or_default();
        q.push_back(path);
        while q.len() > self.keep {
            if let Some(old) = q.pop_front() {
                let _ = std::fs::remove_file(old);
            }
        }
    }
}

/// Start of the kernel's mapping (kernel addresses are kept as they are).
const KERNEL_START: u64 = 0xffff_0000_0000_0000;
const MODULE_WINDOW_SHIFT: u32 = 40;

/// Everything a profile needs besides its samples.
pub struct BuildContext<'a> {
    pub node: &'a str,
    /// CLOCK_MONOTONIC → Unix ns.
    pub unix_offset_ns: i64,
    pub modules: &'a [Arc<ModuleInfo>],
    pub functions: &'a FunctionSnapshot,
    /// Executables of the traced processes: the first of them found among the modules becomes
    /// the profile's first mapping (pprof tools take it as the program).
    pub executables: &'a std::collections::HashSet<std::path::PathBuf>,
}

fn to_unix(mono_ns: u64, offset: i64) -> u64 {
    (mono_ns as i128 + offset as i128).max(0) as u64
}

struct Builder<'a> {
    b: ProfileBuilder,
    /// Module → (mapping, start of its address window).
    mappings: HashMap<u32, (MappingId, u64)>,
    kernel_mapping: Option<MappingId>,
    locations: HashMap<Location, LocationId>,
    ctx: &'a BuildContext<'a>,
}

impl Builder<'_> {
    /// The module's Mapping and the start of its address window. Windows are handed out in
    /// creation order, so the first mapping created (the program) also has the lowest
    /// addresses: pprof tools sort mappings by address and call the first one the program.
    fn mapping(&mut self, module: u32) -> (MappingId, u64) {
        if let Some(&m) = self.mappings.get(&module) {
            return m;
        }
        let info = self.ctx.modules.get(module as usize);
        let filename = info.map_or_else(String::new, |m| m.path.display().to_string());
        let build_id = info.and_then(|m| m.build_id_hex()).unwrap_or_default();
        let start = (self.mappings.len() as u64 + 1) << MODULE_WINDOW_SHIFT;
        let id = self.b.mapping(&Mapping {
            memory_start: start,
            memory_limit: start + (1 << MODULE_WINDOW_SHIFT),
            file_offset: 0,
            filename: &filename,
            build_id: &build_id,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
        self.mappings.insert(module, (id, start));
        (id, start)
    }

    fn location(&mut self, loc: &Location) -> LocationId {
        if let Some(&id) = self.locations.get(loc) {
            return id;
        }
        let id = match loc.kind {
            FrameKind::Python => {
                let l = &loc.lines[0];
                let name = pprof_python_name(&l.name);
                self.b.python_frame_named(
                    &name,
                    &l.name,
                    l.file.as_deref().unwrap_or(""),
                    l.start_line as i64,
                    l.line as i64,
                )
            }
            FrameKind::Native | FrameKind::Kernel | FrameKind::Truncated => {
                let (mapping, address) = match (loc.kind, loc.module) {
                    (FrameKind::Native, Some(m)) => {
                        let (id, start) = self.mapping(m);
                        (Some(id), start + loc.address)
                    }
                    (FrameKind::Kernel, _) => {
                        let m = match self.kernel_mapping {
                            Some(m) => m,
                            None => {
                                let m = self.b.mapping(&Mapping {
                                    memory_start: KERNEL_START,
                                    memory_limit: u64::MAX,
                                    file_offset: 0,
                                    filename: "[kernel.kallsyms]",
                                    build_id: "",
                                    has_functions: true,
                                    ..Mapping::default()
                                });
                                self.kernel_mapping = Some(m);
                                m
                            }
                        };
                        (Some(m), loc.address)
                    }
                    _ => (None, 0),
                };
                let lines: Vec<Line<'_>> = loc
                    .lines
                    .iter()
                    .map(|l| Line {
                        name: &l.name,
                        system_name: "",
                        filename: l.file.as_deref().unwrap_or(""),
                        start_line: l.start_line as i64,
                        line: l.line as i64,
                    })
                    .collect();
                self.b.native_frame(mapping, address, &lines)
            }
        };
        self.locations.insert(loc.clone(), id);
        id
    }
}

/// A Python qualified name as pprof tools display it: they strip `<...>` as if it were a C++
/// template argument list, so `<module>` would show as `<unknown>` and `f.<locals>.g` as `f.g`.
/// Angle brackets become square ones (`[module]`, `f.[locals].g`, `[lambda]`).
fn pprof_python_name(qualname: &str) -> std::borrow::Cow<'_, str> {
    if qualname.contains(['<', '>']) {
        qualname.replace('<', "[").replace('>', "]").into()
    } else {
        qualname.into()
    }
}

fn labels_of<'a>(l: &'a SampleLabels, kind: ProfileKind, node: &'a str) -> Vec<SampleLabel<'a>> {
    let mut out = vec![
        SampleLabel::str("node", node),
        SampleLabel::num("pid", l.pid as i64, ""),
        SampleLabel::str("process", &l.process),
        SampleLabel::str("thread", &l.thread),
    ];
    if let Some(m) = &l.model {
        out.push(SampleLabel::str("model", m));
    }
    match (kind, l.state) {
        (_, Some(s)) => out.push(SampleLabel::str("state", s.name())),
        (ProfileKind::SlowTokens, None) => out.push(SampleLabel::str("state", "on_cpu")),
        _ => {}
    }
    if let Some(k) = &l.kernel {
        out.push(SampleLabel::str("kernel", k));
    }
    out
}

/// Builds the pprof of one aggregate; `None` when it has no samples.
pub fn build(
    agg: &ProfileAggregate,
    namer: &mut Namer,
    ctx: &BuildContext<'_>,
) -> Option<ProfileData> {
    if agg.is_empty() {
        return None;
    }
    let mut b = Builder {
        b: ProfileBuilder::new(agg.kind),
        mappings: HashMap::new(),
        kernel_mapping: None,
        locations: HashMap::new(),
        ctx,
    };
    // The main executable first: pprof tools take the first mapping as the program. Failing a
    // traced executable among the modules, the root-most native frame of the largest sample.
    let exe = (0..ctx.modules.len() as u32).find(|&m| {
        ctx.executables.contains(&ctx.modules[m as usize].path)
            && agg
                .samples
                .keys()
                .any(|(s, _)| s.native.iter().any(|f| f.module == m))
    });
    let root = || {
        agg.samples
            .iter()
            .max_by_key(|(_, v)| v.nanos)
            .and_then(|((stack, _), _)| {
                stack
                    .native
                    .iter()
                    .rev()
                    .find(|f| f.module != crate::profiling::stack::NativeFrame::UNMAPPED)
                    .map(|f| f.module)
            })
    };
    if let Some(m) = exe.or_else(root) {
        b.mapping(m);
    }
    b.b.set_time(
        to_unix(agg.start_ns, ctx.unix_offset_ns),
        to_unix(agg.end_ns.max(agg.start_ns), ctx.unix_offset_ns),
    );
    match agg.kind {
        ProfileKind::Cpu => b.b.set_period("cpu", "nanoseconds", agg.period_ns as i64),
        ProfileKind::OffCpu => b.b.set_period("switches", "count", agg.period_ns as i64),
        ProfileKind::Gpu => b.b.set_period("launches", "count", agg.period_ns as i64),
        ProfileKind::SlowTokens => b.b.set_period("wall", "nanoseconds", 0),
    }
    for n in &agg.notes {
        b.b.add_comment(n);
    }
    // Deterministic order (stable profiles for the same input).
    let mut samples: Vec<_> = agg.samples.iter().collect();
    samples.sort_by(|a, b| a.0 .1.cmp(&b.0 .1).then_with(|| b.1.nanos.cmp(&a.1.nanos)));
    let mut named: HashMap<*const crate::profiling::stack::RawStack, Vec<LocationId>> =
        HashMap::new();
    for ((stack, labels), v) in samples {
        let ids = named.entry(Arc::as_ptr(stack)).or_insert_with(|| {
            let locs = namer.name(stack, ctx.modules, ctx.functions);
            locs.iter().map(|l| b.location(l)).collect()
        });
        let values = [v.count as i64, v.nanos as i64];
        // Built from this builder's own ids with one value per sample type: cannot fail.
        let _ =
            b.b.add_sample(ids, &values, &labels_of(labels, agg.kind, ctx.node));
    }
    b.b.into_profile_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_names_survive_pprof_display() {
        assert_eq!(pprof_python_name("<module>"), "[module]");
        assert_eq!(pprof_python_name("A.f.<locals>.g"), "A.f.[locals].g");
        assert_eq!(pprof_python_name("Llama.eval"), "Llama.eval");
    }
    use crate::profiling::aggregate::{ProfileType, Values};
    use crate::profiling::stack::{NativeFrame, RawStack, Truncation};
    use infertap_stacks::symbolize::SymbolizerConfig;
    use infertap_stacks::unwind::{UnwindConfig, Unwinder};
    use infertap_stacks::UserRegs;
    use std::os::unix::fs::FileExt;

    /// Registers and 16 KiB of this thread's own stack, as the kernel would copy them.
    #[inline(never)]
    fn sample_self() -> (UserRegs, Vec<u8>) {
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads three registers.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]",
                "mov {sp}, rsp",
                "mov {bp}, rbp",
                ip = out(reg) ip,
                sp = out(reg) sp,
                bp = out(reg) bp,
            );
        }
        let mem = std::fs::File::open("/proc/self/mem").unwrap();
        let mut stack = vec![0u8; 16384];
        let mut got = 0;
        while got < stack.len() {
            match mem.read_at(&mut stack[got..], sp + got as u64) {
                Ok(n) if n > 0 => got += n,
                _ => break,
            }
        }
        stack.truncate(got);
        (UserRegs { ip, sp, bp }, stack)
    }

    #[inline(never)]
    fn infertap_pprof_test_caller() -> (UserRegs, Vec<u8>) {
        std::hint::black_box(sample_self())
    }

    /// This test's own stack, unwound, normalized, named and encoded: the profile decodes and
    /// holds this test's functions in root-to-leaf order under one mapping per module.
    #[test]
    fn own_stack_becomes_a_valid_profile() {
        let (regs, bytes) = infertap_pprof_test_caller();
        let pid = std::process::id();
        let mut u = Unwinder::new(UnwindConfig::default());
        let unwound = u.unwind(pid, regs, &bytes);
        let mut modules = crate::profiling::symbolic::ModuleTable::default();
        let native: Vec<NativeFrame> = unwound
            .lookup_addrs()
            .map(|a| match u.normalize(pid, a) {
                Some(n) => NativeFrame {
                    module: modules.intern(&n.module),
                    offset: n.file_offset,
                },
                None => NativeFrame {
                    module: NativeFrame::UNMAPPED,
                    offset: a,
                },
            })
            .collect();
        assert!(native.len() >= 3, "{unwound:?}");
        let stack = Arc::new(RawStack {
            kernel: Box::new([]),
            native: native.into(),
            python: Box::new([]),
            truncation: match unwound.outcome {
                infertap_stacks::unwind::UnwindOutcome::Complete => Truncation::None,
                infertap_stacks::unwind::UnwindOutcome::Truncated(r) => Truncation::Cut(r.as_str()),
            },
        });
        let mut agg = ProfileAggregate::new(ProfileType::Cpu, 1_000, 20_408_163);
        agg.end_ns = 10_000_001_000;
        let labels = Arc::new(SampleLabels {
            pid,
            process: "server".into(),
            thread: "main".into(),
            model: Some("m".into()),
            state: None,
            kernel: None,
        });
        agg.add(
            stack.clone(),
            labels.clone(),
            Values {
                count: 3,
                nanos: 61_224_489,
            },
        );
        let mods = modules.snapshot();
        let funcs = FunctionSnapshot::new();
        let exes = [std::fs::read_link("/proc/self/exe").unwrap()]
            .into_iter()
            .collect();
        let ctx = BuildContext {
            node: "n1",
            unix_offset_ns: 5_000,
            modules: &mods,
            functions: &funcs,
            executables: &exes,
        };
        let mut namer = Namer::new(infertap_stacks::symbolize::Symbolizer::new(
            SymbolizerConfig::default(),
        ));
        let data = build(&agg, &mut namer, &ctx).expect("a profile");
        assert_eq!(data.sample_count, 3);
        assert_eq!(data.start_unix_ns, 6_000);
        let p = infertap_proto::pprof::decode(&data.pprof, 64 << 20).expect("valid pprof");
        assert_eq!(p.sample.len(), 1);
        assert_eq!(p.sample[0].value, vec![3, 61_224_489]);
        let names: Vec<String> = p.sample[0]
            .location_id
            .iter()
            .flat_map(|id| {
                let l = &p.location[*id as usize - 1];
                l.line.iter().map(|line| {
                    let f = &p.function[line.function_id as usize - 1];
                    p.string_table[f.name as usize].clone()
                })
            })
            .collect();
        let pos = |needle: &str| names.iter().position(|n| n.contains(needle));
        let (leaf, caller) = (pos("sample_self"), pos("infertap_pprof_test_caller"));
        assert!(leaf.is_some() && caller.is_some(), "{names:#?}");
        assert!(leaf < caller, "leaf first: {names:#?}");
        let label = |k: &str| {
            p.sample[0]
                .label
                .iter()
                .find(|l| p.string_table[l.key as usize] == k)
                .map(|l| (p.string_table[l.str as usize].clone(), l.num))
        };
        assert_eq!(label("node"), Some(("n1".into(), 0)));
        assert_eq!(label("pid").map(|l| l.1), Some(pid as i64));
        assert_eq!(label("model").map(|l| l.0), Some("m".into()));
        let files: Vec<&str> = p
            .mapping
            .iter()
            .map(|m| p.string_table[m.filename as usize].as_str())
            .collect();
        assert!(files.iter().any(|f| f.contains("infertap")), "{files:?}");
        assert!(
            files[0].contains("infertap"),
            "the test binary is the profile's main mapping: {files:?}"
        );
        assert!(
            p.mapping
                .windows(2)
                .all(|w| w[0].memory_limit <= w[1].memory_start
                    || w[1].memory_limit <= w[0].memory_start),
            "mappings overlap"
        );
    }
}
