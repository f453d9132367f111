//! Native unwinding + symbolization of real programs built here with gcc, stopped at a known
//! point, sampled as the kernel sampler does (ptrace regs + `STACK_BYTES` of stack), and checked
//! against gdb's backtrace of the same stopped process.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use infertap_stacks::symbolize::{Symbolizer, SymbolizerConfig};
use infertap_stacks::unwind::{TruncatedReason, UnwindConfig, UnwindOutcome, Unwinder};

/// main → chain_a → chain_b → chain_c, on the main thread or a second thread; chain_c raises
/// SIGSTOP (`stop`) or spins after printing `ready` (`spin`).
const CHAIN_C: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
volatile long sink;
static int spin;
__attribute__((noinline)) void chain_c(int d) {
  sink += d;
  if (spin) {
    printf("ready\n");
    fflush(stdout);
    for (;;) sink++;
  }
  raise(SIGSTOP);
  sink += 1;
}
__attribute__((noinline)) void chain_b(int d) { chain_c(d + 1); sink += 2; }
__attribute__((noinline)) void chain_a(int d) { chain_b(d + 1); sink += 3; }
static void *thread_main(void *arg) { (void)arg; chain_a(10); return NULL; }
int main(int argc, char **argv) {
  spin = argc > 1 && strcmp(argv[1], "spin") == 0;
  if (argc > 2 && strcmp(argv[2], "thread") == 0) {
    pthread_t t;
    pthread_create(&t, NULL, thread_main, NULL);
    pthread_join(t, NULL);
  } else {
    chain_a(1);
  }
  return 0;
}
"#;

const CFI_FLAGS: &[&str] = &["-O2", "-fomit-frame-pointer"];
const NO_TABLES: &[&str] = &["-fno-asynchronous-unwind-tables", "-fno-unwind-tables"];

fn flags(base: &[&str], extra: &[&str]) -> Vec<&'static str> {
    base.iter()
        .chain(extra)
        .map(|s| &*Box::leak(s.to_string().into_boxed_str()))
        .collect()
}

/// Runs `bin args` until it is stopped at its known point.
fn start_stopped(bin: &Path, args: &[&str]) -> Target {
    let mut t = Target::spawn(Command::new(bin).args(args));
    if args.first() == Some(&"spin") {
        t.wait_line("ready");
        // Let it leave printf and spin in chain_c.
        std::thread::sleep(Duration::from_millis(100));
        stop(t.pid());
    } else {
        wait_all_stopped(t.pid(), Duration::from_secs(10));
    }
    t
}

fn copy_stripped(src: &Path, dst: &Path, how: &str) {
    let o = Command::new("strip")
        .arg(how)
        .arg("-o")
        .arg(dst)
        .arg(src)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "strip: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn section_names(path: &Path) -> Vec<String> {
    use object::{Object, ObjectSection};
    let data = std::fs::read(path).unwrap();
    let f = object::File::parse(&*data).unwrap();
    f.sections()
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect()
}

/// The functions (innermost first) our symbolizer names for a stack, physical frames only.
fn physical_names(syms: &[infertap_stacks::symbolize::Symbolized]) -> Vec<String> {
    syms.iter()
        .map(|fs| fs.last().unwrap().function.clone())
        .collect()
}

fn assert_chain(names: &[String], entry: &str, ctx: &str) {
    let pos = |n: &str| names.iter().position(|x| x == n);
    let c = pos("chain_c").unwrap_or_else(|| panic!("{ctx}: no chain_c in {names:?}"));
    assert_eq!(
        &names[c..c + 4],
        &["chain_c", "chain_b", "chain_a", entry],
        "{ctx}: {names:?}"
    );
}

#[test]
fn cfi_only_unwinds_to_the_stack_end_like_gdb() {
    if !native_prereqs("cfi_only_unwinds_to_the_stack_end_like_gdb") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path(), "chain_cfi", "c", CHAIN_C, CFI_FLAGS);
    for args in [
        ["stop", "main"],
        ["spin", "main"],
        ["stop", "thread"],
        ["spin", "thread"],
    ] {
        let t = start_stopped(&bin, &args);
        let pid = t.pid();
        let caps = capture_all(pid);
        let gdb = gdb_backtraces(pid);
        let mut u = Unwinder::new(UnwindConfig::default());
        let mut s = Symbolizer::new(SymbolizerConfig::default());
        assert_eq!(caps.len(), if args[1] == "thread" { 2 } else { 1 });
        for cap in &caps {
            let ctx = format!("{args:?} tid {}", cap.tid);
            let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, cap);
            assert_matches_gdb(&ctx, &stack, &syms, &gdb[&cap.tid], false, Some(dir.path()));
            assert_eq!(stack.outcome, UnwindOutcome::Complete, "{ctx}");
            let names = physical_names(&syms);
            assert!(syms.iter().all(|fs| fs.iter().all(|f| f.resolved)), "{ctx}");
            // The main thread may still be in clone3 right after the syscall, which glibc
            // leaves without CFI (its FDE ends before the syscall): a leaf guess there.
            let allowed = usize::from(names[0] == "clone3") as u32;
            assert!(
                stack.guessed_frames <= allowed,
                "{ctx}\n{}",
                describe(&stack, &syms)
            );
            if cap.tid == pid {
                assert_eq!(names.last().unwrap(), "_start", "{ctx}");
            } else {
                assert_eq!(names.last().unwrap(), "clone3", "{ctx}");
            }
            let on_chain = (args[1] == "thread") != (cap.tid == pid);
            if on_chain {
                let entry = if args[1] == "thread" {
                    "thread_main"
                } else {
                    "main"
                };
                assert_chain(&names, entry, &ctx);
            }
        }
        let st = u.stats();
        assert_eq!(st.samples, caps.len() as u64);
        assert_eq!(st.complete, caps.len() as u64);
        assert_eq!(st.truncated.total(), 0);
    }
}

#[test]
fn frame_pointers_without_unwind_tables() {
    if !native_prereqs("frame_pointers_without_unwind_tables") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The same code with and without debug info: gdb reads the `-g` build's `.debug_frame` as
    // its reference for the process running the stripped one (gcc's code does not depend on
    // `-g`).
    let with_dbg = compile(
        dir.path(),
        "chain_fp_dbg",
        "c",
        CHAIN_C,
        &flags(&["-g", "-O2", "-fno-omit-frame-pointer"], NO_TABLES),
    );
    let bin = dir.path().join("chain_fp");
    copy_stripped(&with_dbg, &bin, "--strip-debug");
    let secs = section_names(&bin);
    assert!(!secs.iter().any(|s| s == ".debug_frame"), "{secs:?}");
    for args in [["stop", "main"], ["spin", "main"], ["spin", "thread"]] {
        let t = start_stopped(&bin, &args);
        let pid = t.pid();
        let gdb = gdb_backtraces_with(pid, Some(&with_dbg));
        let mut u = Unwinder::new(UnwindConfig::default());
        let mut s = Symbolizer::new(SymbolizerConfig::default());
        for cap in capture_all(pid) {
            let ctx = format!("{args:?} tid {}", cap.tid);
            let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
            assert_matches_gdb(&ctx, &stack, &syms, &gdb[&cap.tid], false, Some(dir.path()));
            // Frame pointers chain up to glibc, whose CFI ends the stack.
            assert_eq!(stack.outcome, UnwindOutcome::Complete, "{ctx}");
            let on_chain = (args[1] == "thread") != (cap.tid == pid);
            if on_chain {
                let entry = if args[1] == "thread" {
                    "thread_main"
                } else {
                    "main"
                };
                assert_chain(&physical_names(&syms), entry, &ctx);
                // chain_c, chain_b, chain_a and the entry function have no CFI.
                assert_eq!(
                    stack.guessed_frames,
                    4,
                    "{ctx}\n{}",
                    describe(&stack, &syms)
                );
            }
        }
    }
}

#[test]
fn debug_frame_only_binary() {
    if !native_prereqs("debug_frame_only_binary") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // No frame pointers, no `.eh_frame` for our code: only `.debug_frame` describes it.
    let bin = compile(
        dir.path(),
        "chain_dbgframe",
        "c",
        CHAIN_C,
        &flags(&["-g", "-O2", "-fomit-frame-pointer"], NO_TABLES),
    );
    assert!(section_names(&bin).iter().any(|s| s == ".debug_frame"));
    for args in [["stop", "main"], ["spin", "thread"]] {
        let t = start_stopped(&bin, &args);
        let pid = t.pid();
        let gdb = gdb_backtraces(pid);
        let mut u = Unwinder::new(UnwindConfig::default());
        let mut s = Symbolizer::new(SymbolizerConfig::default());
        for cap in capture_all(pid) {
            let ctx = format!("{args:?} tid {}", cap.tid);
            let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
            assert_matches_gdb(&ctx, &stack, &syms, &gdb[&cap.tid], false, Some(dir.path()));
            assert_eq!(stack.outcome, UnwindOutcome::Complete, "{ctx}");
            assert_eq!(stack.guessed_frames, 0, "{ctx}");
        }
    }
}

#[test]
fn neither_cfi_nor_frame_pointers_is_truncated_and_counted() {
    if !native_prereqs("neither_cfi_nor_frame_pointers_is_truncated_and_counted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let with_dbg = compile(
        dir.path(),
        "chain_none_dbg",
        "c",
        CHAIN_C,
        &flags(&["-g", "-O2", "-fomit-frame-pointer"], NO_TABLES),
    );
    let bin = dir.path().join("chain_none");
    copy_stripped(&with_dbg, &bin, "--strip-debug");
    let mut truncated = 0;
    for args in [["stop", "main"], ["spin", "main"], ["stop", "thread"]] {
        let t = start_stopped(&bin, &args);
        let pid = t.pid();
        let gdb = gdb_backtraces_with(pid, Some(&with_dbg));
        let mut u = Unwinder::new(UnwindConfig::default());
        let mut s = Symbolizer::new(SymbolizerConfig::default());
        let caps = capture_all(pid);
        for cap in &caps {
            let ctx = format!("{args:?} tid {}", cap.tid);
            let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, cap);
            // Whatever we produce is the true stack's beginning, never invented frames.
            assert_matches_gdb(&ctx, &stack, &syms, &gdb[&cap.tid], true, Some(dir.path()));
            assert_eq!(
                stack.outcome,
                UnwindOutcome::Truncated(TruncatedReason::NoUnwindInfo),
                "{ctx}\n{}",
                describe(&stack, &syms)
            );
            truncated += 1;
        }
        let st = u.stats();
        assert_eq!(st.truncated.no_unwind_info, caps.len() as u64);
        assert_eq!(st.complete, 0);
    }
    assert!(truncated >= 4);
}

#[test]
fn stripped_binary_unwinds_and_falls_back_to_offsets() {
    if !native_prereqs("stripped_binary_unwinds_and_falls_back_to_offsets") {
        return;
    }
    use object::{Object, ObjectSymbol};
    let dir = tempfile::tempdir().unwrap();
    let full = compile(dir.path(), "chain_full", "c", CHAIN_C, CFI_FLAGS);
    let bin = dir.path().join("chain_stripped");
    copy_stripped(&full, &bin, "--strip-all");
    assert!(!section_names(&bin).iter().any(|s| s == ".symtab"));
    // Where the unstripped build has each function (same code, same addresses).
    let data = std::fs::read(&full).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    let sym_range = |name: &str| {
        let s = elf.symbols().find(|s| s.name() == Ok(name)).unwrap();
        s.address()..s.address() + s.size()
    };

    let t = start_stopped(&bin, &["spin", "main"]);
    let pid = t.pid();
    let gdb = gdb_backtraces(pid);
    let mut u = Unwinder::new(UnwindConfig::default());
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let cap = capture(pid, pid).unwrap();
    let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
    assert_matches_gdb(
        "stripped",
        &stack,
        &syms,
        &gdb[&pid],
        false,
        Some(dir.path()),
    );
    assert_eq!(stack.outcome, UnwindOutcome::Complete);
    // Frames 0..4 are chain_c, chain_b, chain_a, main of the stripped binary.
    for (i, want) in ["chain_c", "chain_b", "chain_a", "main"].iter().enumerate() {
        let n = u
            .normalize(
                pid,
                infertap_stacks::unwind::lookup_address(i, stack.frames[i]),
            )
            .unwrap();
        assert_eq!(n.module.name(), "chain_stripped");
        assert!(!n.module.deleted);
        let vaddr = n.vaddr.unwrap();
        assert!(
            sym_range(want).contains(&vaddr),
            "frame {i}: {vaddr:#x} not in {want}"
        );
        let f = &syms[i][0];
        assert!(!f.resolved, "{f:?}");
        assert_eq!(f.function, format!("chain_stripped+{:#x}", n.file_offset));
    }
    // libc still resolves.
    let names = physical_names(&syms);
    assert!(
        names.iter().any(|n| n == "__libc_start_call_main"),
        "{names:?}"
    );
}

/// Templates, namespaces, a lambda and an always-inline function (with `-g`).
const CPP: &str = r#"
#include <csignal>
#include <cstdio>
namespace infer {
namespace detail {
template <typename T> struct Worker {
  T acc{};
  __attribute__((noinline)) void run(int n);
};
static inline __attribute__((always_inline)) int leaf_inline(int x) {
  volatile int y = x * 3;
  raise(SIGSTOP);
  return y;
}
template <typename T> __attribute__((noinline)) void Worker<T>::run(int n) {
  acc += leaf_inline(n);
}
}  // namespace detail
template <typename F> __attribute__((noinline)) void apply(F f) {
  f();
  asm volatile("" ::: "memory");
}
}  // namespace infer
int main() {
  infer::detail::Worker<long> w;
  infer::apply([&] { w.run(7); });
  std::printf("%ld\n", w.acc);
  return 0;
}
"#;

#[test]
fn cpp_names_are_demangled_and_inlined_frames_reported() {
    if !native_prereqs("cpp_names_are_demangled_and_inlined_frames_reported") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(
        dir.path(),
        "infer_cpp",
        "c++",
        CPP,
        &["-g", "-O2", "-fomit-frame-pointer"],
    );
    let t = start_stopped(&bin, &["stop"]);
    let pid = t.pid();
    let gdb = gdb_backtraces(pid);
    let mut u = Unwinder::new(UnwindConfig::default());
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let cap = capture(pid, pid).unwrap();
    let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
    let report = describe(&stack, &syms);
    let lines = assert_matches_gdb("c++", &stack, &syms, &gdb[&pid], false, Some(dir.path()));
    assert!(lines >= 4, "{lines} lines compared\n{report}");
    assert_eq!(stack.outcome, UnwindOutcome::Complete, "{report}");
    // The frame of Worker<long>::run shows leaf_inline inlined into it, with lines.
    let i = syms
        .iter()
        .position(|fs| {
            fs.last()
                .unwrap()
                .function
                .starts_with("infer::detail::Worker<long>::run")
        })
        .unwrap_or_else(|| panic!("no Worker<long>::run\n{report}"));
    let fs = &syms[i];
    assert_eq!(fs.len(), 2, "{report}");
    assert!(
        fs[0].inlined && fs[0].function.contains("leaf_inline"),
        "{report}"
    );
    assert!(!fs[1].inlined);
    let src = CPP.lines().collect::<Vec<_>>();
    let line_of = |needle: &str| src.iter().position(|l| l.contains(needle)).unwrap() as u32 + 1;
    assert_eq!(fs[0].line, Some(line_of("raise(SIGSTOP)")), "{report}");
    assert_eq!(fs[1].line, Some(line_of("acc += leaf_inline")), "{report}");
    assert!(
        fs[1].file.as_deref().unwrap().ends_with("infer_cpp.cc"),
        "{report}"
    );
    assert!(fs[1].sym_addr.is_some() && fs[1].sym_offset.is_some());
    // The lambda's caller: a demangled template instance of infer::apply.
    assert!(
        syms.iter()
            .flat_map(|fs| fs.iter())
            .any(|f| f.function == "void infer::apply<main::{lambda()#1}>(main::{lambda()#1})"),
        "{report}"
    );
}

const LIB: &str = r#"
#include <signal.h>
volatile long lsink;
__attribute__((noinline)) void lib_c(int d) { lsink += d; raise(SIGSTOP); lsink++; }
__attribute__((noinline)) void lib_b(int d) { lib_c(d + 1); lsink += 2; }
void lib_entry(int d) { lib_b(d + 1); lsink += 3; }
"#;

/// dlopens argv[1], unlinks it unless argv[2] is "keep", and calls into it.
const DL_MAIN: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
volatile long sink;
__attribute__((noinline)) void call_lib(void (*f)(int)) { f(1); sink++; }
int main(int argc, char **argv) {
  void *h = dlopen(argv[1], RTLD_NOW);
  if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
  if (argc < 3 || strcmp(argv[2], "keep") != 0) unlink(argv[1]);
  void (*f)(int) = (void (*)(int))dlsym(h, "lib_entry");
  call_lib(f);
  return 0;
}
"#;

fn build_lib(dir: &Path) -> (PathBuf, PathBuf) {
    let lib = compile(
        dir,
        "libchain.so",
        "c",
        LIB,
        &["-g", "-O2", "-fomit-frame-pointer", "-shared", "-fPIC"],
    );
    let main = compile(dir, "dl_main", "c", DL_MAIN, CFI_FLAGS);
    (lib, main)
}

#[test]
fn library_deleted_after_dlopen_is_read_through_map_files() {
    if !native_prereqs("library_deleted_after_dlopen_is_read_through_map_files") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (lib, main) = build_lib(dir.path());

    // Reference: the same program with the library kept on disk, checked against gdb (gdb
    // cannot read a deleted library's unwind info and invents frames there).
    let reference = {
        let t = start_stopped(&main, &[lib.to_str().unwrap(), "keep"]);
        let pid = t.pid();
        let mut u = Unwinder::new(UnwindConfig::default());
        let mut s = Symbolizer::new(SymbolizerConfig::default());
        let cap = capture(pid, pid).unwrap();
        let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
        let gdb = gdb_backtraces(pid);
        assert_matches_gdb(
            "kept lib",
            &stack,
            &syms,
            &gdb[&pid],
            false,
            Some(dir.path()),
        );
        module_offsets(&mut u, pid, &stack)
    };

    let t = start_stopped(&main, &[lib.to_str().unwrap()]);
    let pid = t.pid();
    assert!(!lib.exists(), "the program unlinks the library");
    let mut u = Unwinder::new(UnwindConfig::default());
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let cap = capture(pid, pid).unwrap();
    let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
    let report = describe(&stack, &syms);
    assert_eq!(stack.outcome, UnwindOutcome::Complete, "{report}");
    assert_eq!(module_offsets(&mut u, pid, &stack), reference, "{report}");
    let names = physical_names(&syms);
    let c = names.iter().position(|n| n == "lib_c").expect(&report);
    assert_eq!(
        &names[c..c + 5],
        &["lib_c", "lib_b", "lib_entry", "call_lib", "main"],
        "{report}"
    );
    let n = u
        .normalize(
            pid,
            infertap_stacks::unwind::lookup_address(c, stack.frames[c]),
        )
        .unwrap();
    assert!(n.module.deleted, "{:?}", n.module);
    assert_eq!(n.module.path, lib);
    let open = n
        .module
        .open_path
        .as_ref()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        open.starts_with(&format!("/proc/{pid}/map_files/")),
        "{open}"
    );
    assert!(n.module.build_id().is_some());
    // Lines come from the deleted file's DWARF.
    let lib_src = LIB
        .lines()
        .position(|l| l.contains("raise(SIGSTOP)"))
        .unwrap() as u32
        + 1;
    assert_eq!(syms[c][0].line, Some(lib_src), "{report}");
}

#[test]
fn container_path_that_vanishes() {
    if !native_prereqs("container_path_that_vanishes")
        || !prereq("container_path_that_vanishes", missing_tool("unshare"))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (lib, main) = build_lib(dir.path());
    // The library exists only inside the program's own mount namespace (a tmpfs over an
    // empty directory), as with a container's root.
    let ns_dir = dir.path().join("ns");
    std::fs::create_dir(&ns_dir).unwrap();
    let ns_lib = ns_dir.join("libchain.so");
    let script = format!(
        "mount -t tmpfs tmpfs {d} && cp {lib} {d}/ && exec {main} {d}/libchain.so keep",
        d = ns_dir.display(),
        lib = lib.display(),
        main = main.display()
    );
    for use_map_files in [false, true] {
        let mut t = Target::spawn(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(&script),
        );
        wait_all_stopped(t.pid(), Duration::from_secs(10));
        let pid = t.pid();
        assert!(
            !ns_lib.exists(),
            "the host must not see the namespace's file"
        );
        let mut u = Unwinder::new(UnwindConfig {
            use_map_files,
            ..UnwindConfig::default()
        });
        let cap = capture(pid, pid).unwrap();
        let stack = u.unwind(pid, cap.regs, &cap.stack);
        assert_eq!(stack.outcome, UnwindOutcome::Complete);
        let normalized: Vec<_> = stack
            .lookup_addrs()
            .map(|a| u.normalize(pid, a).unwrap())
            .collect();
        let lib_frame = normalized
            .iter()
            .find(|n| n.module.name() == "libchain.so")
            .unwrap();
        assert_eq!(lib_frame.module.path, ns_lib);
        let open = lib_frame.module.open_path.clone().unwrap();
        let want_prefix = if use_map_files {
            format!("/proc/{pid}/map_files/")
        } else {
            format!("/proc/{pid}/root/")
        };
        assert!(open.to_str().unwrap().starts_with(&want_prefix), "{open:?}");
        // The process and its namespace go away; the samples still symbolize.
        let _ = t.child.kill();
        let _ = t.child.wait();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        let mut s = Symbolizer::new(SymbolizerConfig::default());
        let names: Vec<String> = normalized
            .iter()
            .map(|n| {
                s.symbolize(&n.module, &[n.file_offset])[0]
                    .last()
                    .unwrap()
                    .function
                    .clone()
            })
            .collect();
        let c = names
            .iter()
            .position(|n| n == "lib_c")
            .unwrap_or_else(|| panic!("{names:?}"));
        assert_eq!(&names[c..c + 3], &["lib_c", "lib_b", "lib_entry"]);
        u.forget(pid);
        assert_eq!(u.stats().processes, 0);
    }
}

#[test]
fn process_exiting_mid_unwind() {
    if !native_prereqs("process_exiting_mid_unwind") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path(), "chain_exit", "c", CHAIN_C, CFI_FLAGS);

    // 1. Gone before its first sample is unwound: nothing to unwind with, counted.
    let mut t = start_stopped(&bin, &["stop", "main"]);
    let pid = t.pid();
    let cap = capture(pid, pid).unwrap();
    let gdb = gdb_backtraces(pid);
    let _ = t.child.kill();
    let _ = t.child.wait();
    let mut u = Unwinder::new(UnwindConfig::default());
    let stack = u.unwind(pid, cap.regs, &cap.stack);
    assert_eq!(
        stack.outcome,
        UnwindOutcome::Truncated(TruncatedReason::ProcessGone)
    );
    assert_eq!(stack.frames, vec![cap.regs.ip]);
    assert_eq!(u.stats().truncated.process_gone, 1);
    assert_eq!(u.stats().maps_read_failures, 1);

    // 2. Gone after its maps were read and libc was parsed, before the executable was opened:
    // libc's frames unwind, the executable cannot be opened, the unwind is truncated where
    // the executable's CFI would have been needed.
    let mut t = start_stopped(&bin, &["stop", "main"]);
    let pid = t.pid();
    let cap = capture(pid, pid).unwrap();
    let gdb2 = gdb_backtraces(pid);
    let mut u = Unwinder::new(UnwindConfig::default());
    let libc_frame = u.normalize(pid, cap.regs.ip).unwrap();
    assert_eq!(libc_frame.module.name(), "libc.so.6");
    let _ = t.child.kill();
    let _ = t.child.wait();
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let stack = u.unwind(pid, cap.regs, &cap.stack);
    let syms = symbolize_stack(&mut u, &mut s, pid, &stack);
    assert_matches_gdb("exited", &stack, &syms, &gdb2[&pid], true, Some(dir.path()));
    assert_eq!(
        stack.outcome,
        UnwindOutcome::Truncated(TruncatedReason::NoUnwindInfo),
        "{}",
        describe(&stack, &syms)
    );
    let exe = u.normalize(pid, stack.frames.last().unwrap() - 1).unwrap();
    assert_eq!(exe.module.name(), "chain_exit");
    assert!(exe.module.load_error.is_some());
    assert!(u.stats().modules.failed >= 1);
    // Its frame still gets a name: the fallback.
    assert!(!syms.last().unwrap()[0].resolved);

    // 3. Gone after a complete unwind: the parsed modules and held files keep working.
    let t = start_stopped(&bin, &["stop", "main"]);
    let pid = t.pid();
    let cap = capture(pid, pid).unwrap();
    let mut u = Unwinder::new(UnwindConfig::default());
    let before = u.unwind(pid, cap.regs, &cap.stack);
    assert_eq!(before.outcome, UnwindOutcome::Complete);
    drop(t);
    let after = u.unwind(pid, cap.regs, &cap.stack);
    assert_eq!(before, after);
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let syms = symbolize_stack(&mut u, &mut s, pid, &after);
    assert_chain(&physical_names(&syms), "main", "after exit");
    let _ = gdb;
}

#[test]
fn modules_are_parsed_once_across_processes() {
    if !native_prereqs("modules_are_parsed_once_across_processes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path(), "chain_shared", "c", CHAIN_C, CFI_FLAGS);
    // A copy: another inode, the same build id (another container's image of the binary).
    let copy = dir.path().join("chain_shared_copy");
    std::fs::copy(&bin, &copy).unwrap();
    let mut u = Unwinder::new(UnwindConfig::default());
    let a = start_stopped(&bin, &["stop", "main"]);
    let b = start_stopped(&bin, &["stop", "main"]);
    let c = start_stopped(&copy, &["stop", "main"]);
    let mut ids = Vec::new();
    for t in [&a, &b, &c] {
        let cap = capture(t.pid(), t.pid()).unwrap();
        let stack = u.unwind(t.pid(), cap.regs, &cap.stack);
        assert_eq!(stack.outcome, UnwindOutcome::Complete);
        let last = stack.lookup_addrs().last().unwrap();
        let n = u.normalize(t.pid(), last).unwrap();
        ids.push(n.module.id.unwrap());
    }
    // chain_shared (and its copy) and libc, parsed once each.
    let st = u.stats();
    assert_eq!(st.modules.loaded, 2, "{st:?}");
    assert!(st.modules.shared >= 2, "{st:?}");
    assert_eq!(st.modules.cached, 2);
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[0], ids[2]);
    assert_eq!(st.processes, 3);
    for t in [&a, &b, &c] {
        u.forget(t.pid());
    }
    assert_eq!(u.stats().processes, 0);
}

#[test]
fn module_cache_stays_within_its_limits() {
    if !native_prereqs("module_cache_stays_within_its_limits") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path(), "chain_limit", "c", CHAIN_C, CFI_FLAGS);
    let mut u = Unwinder::new(UnwindConfig {
        module_cache: infertap_stacks::unwind::ModuleCacheLimits {
            max_modules: 1,
            max_heap_bytes: usize::MAX,
        },
        ..UnwindConfig::default()
    });
    let t = start_stopped(&bin, &["stop", "main"]);
    let pid = t.pid();
    let cap = capture(pid, pid).unwrap();
    let full = Unwinder::new(UnwindConfig::default()).unwind(pid, cap.regs, &cap.stack);
    let exe_addr = full.lookup_addrs().last().unwrap();

    // The executable first; then the process is forgotten, so nothing holds it.
    let n = u.normalize(pid, exe_addr).unwrap();
    assert_eq!(n.module.name(), "chain_limit");
    drop(n);
    assert_eq!(u.stats().modules.cached, 1);
    u.forget(pid);
    // libc (frame 0) evicts it; the executable then does not fit while libc is in use.
    let stack = u.unwind(pid, cap.regs, &cap.stack);
    assert_eq!(
        stack.outcome,
        UnwindOutcome::Truncated(TruncatedReason::NoUnwindInfo),
        "{stack:?}"
    );
    let st = u.stats();
    assert_eq!(st.modules.cached, 1, "{st:?}");
    assert_eq!(st.modules.evicted, 1, "{st:?}");
    assert_eq!(st.modules.over_budget, 1, "{st:?}");
    assert_eq!(st.modules.loaded, 2, "{st:?}");
}

/// rec(n) recurses n times with ~200 bytes of frame each, then stops.
const RECURSE: &str = r#"
#include <signal.h>
#include <stdlib.h>
__attribute__((noinline)) int rec(int n) {
  volatile char pad[200];
  pad[0] = (char)n;
  if (n == 0) {
    raise(SIGSTOP);
    return pad[0];
  }
  return rec(n - 1) + pad[0];
}
int main(int argc, char **argv) { return rec(atoi(argv[1])); }
"#;

#[test]
fn deep_stacks_hit_the_copy_or_depth_limit() {
    if !native_prereqs("deep_stacks_hit_the_copy_or_depth_limit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path(), "recurse", "c", RECURSE, CFI_FLAGS);

    // ~230 bytes a frame, twice as deep as the kernel's copy.
    let depth = (2 * STACK_BYTES / 200).to_string();
    let t = start_stopped(&bin, &[&depth]);
    let pid = t.pid();
    let cap = capture(pid, pid).unwrap();
    assert_eq!(cap.stack.len(), STACK_BYTES);
    let gdb = gdb_backtraces(pid);
    // Room for every frame the copy holds (≈ 290 of them in 64 KiB): the copy is the limit.
    let mut u = Unwinder::new(UnwindConfig {
        max_frames: 4096,
        ..UnwindConfig::default()
    });
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
    assert_matches_gdb("deep", &stack, &syms, &gdb[&pid], true, Some(dir.path()));
    assert_eq!(
        stack.outcome,
        UnwindOutcome::Truncated(TruncatedReason::StackCopyExhausted)
    );
    assert!(stack.frames.len() > 50, "{}", stack.frames.len());
    assert_eq!(u.stats().truncated.stack_copy_exhausted, 1);

    // 30 frames, 10 allowed.
    let t = start_stopped(&bin, &["30"]);
    let pid = t.pid();
    let cap = capture(pid, pid).unwrap();
    let mut u = Unwinder::new(UnwindConfig {
        max_frames: 10,
        ..UnwindConfig::default()
    });
    let stack = u.unwind(pid, cap.regs, &cap.stack);
    assert_eq!(
        stack.outcome,
        UnwindOutcome::Truncated(TruncatedReason::MaxDepth)
    );
    assert_eq!(stack.frames.len(), 10);
    assert_eq!(u.stats().truncated.max_depth, 1);
}

/// Spins in clock_gettime, mostly inside the vDSO.
const VDSO: &str = r#"
#include <stdio.h>
#include <time.h>
volatile long sink;
__attribute__((noinline)) void tick(void) {
  struct timespec ts;
  printf("ready\n");
  fflush(stdout);
  for (;;) { clock_gettime(CLOCK_MONOTONIC, &ts); sink += ts.tv_nsec; }
}
int main(void) { tick(); return 0; }
"#;

#[test]
fn unwinds_through_the_vdso() {
    if !native_prereqs("unwinds_through_the_vdso") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path(), "vdso_spin", "c", VDSO, CFI_FLAGS);
    let mut t = Target::spawn(&mut Command::new(&bin));
    t.wait_line("ready");
    let pid = t.pid();
    let mut u = Unwinder::new(UnwindConfig::default());
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    for _ in 0..200 {
        stop(pid);
        let cap = capture(pid, pid).unwrap();
        let n = u.normalize(pid, cap.regs.ip).unwrap();
        if n.module.vdso {
            let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
            let gdb = gdb_backtraces(pid);
            assert_matches_gdb("vdso", &stack, &syms, &gdb[&pid], false, Some(dir.path()));
            assert_eq!(stack.outcome, UnwindOutcome::Complete);
            assert!(syms[0][0].resolved, "{:?}", syms[0]);
            assert!(physical_names(&syms).iter().any(|n| n == "tick"));
            return;
        }
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(3));
    }
    panic!("never stopped inside the vDSO in 200 tries");
}

/// A stack-realigning function (a VLA next to AVX values): gcc describes its frame with a
/// CFA expression that reads memory (`DW_OP_breg6 (rbp): -8; DW_OP_deref`), as in ggml's and
/// BLAS's kernels.
const REALIGN: &str = r#"
#include <immintrin.h>
#include <signal.h>
volatile long sink;
__attribute__((noinline)) void leaf(char *p) { sink += p[0]; raise(SIGSTOP); sink++; }
__attribute__((noinline)) void realigned(int n) {
  char buf[n] __attribute__((aligned(64)));
  __m256 v[4];
  for (int i = 0; i < 4; i++) v[i] = _mm256_set1_ps((float)(n + i));
  buf[0] = (char)n;
  leaf(buf);
  float out[8];
  _mm256_storeu_ps(out, _mm256_add_ps(v[0], v[3]));
  sink += buf[1] + (long)out[0];
}
int main(int argc, char **argv) { (void)argv; realigned(argc + 300); return 0; }
"#;

#[test]
fn stack_realigning_function_with_a_cfa_expression() {
    if !native_prereqs("stack_realigning_function_with_a_cfa_expression") {
        return;
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !prereq(
        "stack_realigning_function_with_a_cfa_expression",
        (!cpu.contains(" avx")).then(|| "CPU without AVX".to_string()),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(
        dir.path(),
        "realign",
        "c",
        REALIGN,
        &["-O2", "-mavx", "-fomit-frame-pointer"],
    );
    let t = start_stopped(&bin, &[]);
    let pid = t.pid();
    let gdb = gdb_backtraces(pid);
    let mut u = Unwinder::new(UnwindConfig::default());
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let cap = capture(pid, pid).unwrap();
    let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
    assert_matches_gdb(
        "realign",
        &stack,
        &syms,
        &gdb[&pid],
        false,
        Some(dir.path()),
    );
    assert_eq!(stack.outcome, UnwindOutcome::Complete);
    let names = physical_names(&syms);
    let i = names.iter().position(|n| n == "leaf").unwrap();
    assert_eq!(&names[i..i + 3], &["leaf", "realigned", "main"]);
    // The step out of `realigned` went through the full evaluator.
    assert_eq!(u.stats().evaluated_steps, 1, "{:?}", u.stats());
    assert_eq!(stack.guessed_frames, 0);
}

/// chain_c spins until SIGALRM arrives; the handler raises SIGSTOP, so the stack holds a
/// kernel-built signal frame (glibc's `__restore_rt`, described by CFI expressions over the
/// saved context) between the handler and the interrupted chain.
const SIGNAL: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
volatile long sink;
__attribute__((noinline)) void in_handler(int sig) { sink += sig; raise(SIGSTOP); sink++; }
static void handler(int sig) { in_handler(sig); sink++; }
__attribute__((noinline)) void chain_c(int d) { sink += d; alarm(1); for (;;) sink++; }
__attribute__((noinline)) void chain_b(int d) { chain_c(d + 1); sink += 2; }
__attribute__((noinline)) void chain_a(int d) { chain_b(d + 1); sink += 3; }
int main(void) {
  struct sigaction sa = {0};
  sa.sa_handler = handler;
  sigaction(SIGALRM, &sa, NULL);
  chain_a(1);
  return 0;
}
"#;

#[test]
fn unwinds_through_a_signal_frame() {
    if !native_prereqs("unwinds_through_a_signal_frame") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path(), "sig", "c", SIGNAL, CFI_FLAGS);
    let t = Target::spawn(&mut Command::new(&bin));
    wait_all_stopped(t.pid(), Duration::from_secs(10));
    let pid = t.pid();
    let gdb = gdb_backtraces(pid);
    let mut u = Unwinder::new(UnwindConfig::default());
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let cap = capture(pid, pid).unwrap();
    let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
    assert_matches_gdb("signal", &stack, &syms, &gdb[&pid], false, Some(dir.path()));
    assert_eq!(stack.outcome, UnwindOutcome::Complete);
    let names = physical_names(&syms);
    let h = names.iter().position(|n| n == "in_handler").unwrap();
    let c = names.iter().position(|n| n == "chain_c").unwrap();
    assert!(h < c, "{names:?}");
    assert_chain(&names, "main", "signal");
    // __restore_rt's CFI restores rsp, rbp and rip from the saved context with expressions.
    assert!(u.stats().evaluated_steps >= 1, "{:?}", u.stats());
}
