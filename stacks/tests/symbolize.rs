//! The symbolizer on its own: kernel addresses against /proc/kallsyms, Rust names of this very
//! test binary, caching across processes by build id, fallbacks, and the symbolizer thread.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use infertap_stacks::symbolize::{self, Symbolizer, SymbolizerConfig};
use infertap_stacks::unwind::{UnwindConfig, Unwinder};

/// (address, name) of text symbols in /proc/kallsyms, or why they cannot be read.
fn kallsyms_text() -> Result<Vec<(u64, String)>, String> {
    let text = std::fs::read_to_string("/proc/kallsyms").map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if !matches!(kind, "T" | "t") || it.next().is_some() {
            continue; // module symbols carry a `[module]` column
        }
        let addr = u64::from_str_radix(addr, 16).map_err(|e| e.to_string())?;
        out.push((addr, name.to_string()));
    }
    if out.iter().all(|(a, _)| *a == 0) {
        return Err("kallsyms addresses are hidden (kptr_restrict, not root)".into());
    }
    out.sort();
    Ok(out)
}

#[test]
fn kernel_addresses_resolve_through_kallsyms() {
    let syms = match kallsyms_text() {
        Ok(s) => s,
        Err(e) => {
            prereq("kernel_addresses_resolve_through_kallsyms", Some(e));
            return;
        }
    };
    // Well-known functions, at their start and a few bytes in.
    let want = ["schedule", "do_syscall_64", "ksys_write", "do_nanosleep"];
    let mut addrs = Vec::new();
    let mut names = Vec::new();
    for w in want {
        let Some(i) = syms.iter().position(|(_, n)| n == w) else {
            continue;
        };
        let (a, _) = syms[i];
        // Only where the next symbol is further away than our probe.
        if syms.get(i + 1).is_some_and(|(b, _)| *b > a + 4) {
            addrs.extend([a, a + 4]);
            names.extend([w, w]);
        }
    }
    assert!(addrs.len() >= 4, "none of {want:?} in kallsyms");
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let out = s.symbolize_kernel(&addrs);
    for ((a, n), r) in addrs.iter().zip(&names).zip(&out) {
        assert_eq!(r.len(), 1);
        let f = &r[0];
        assert!(f.resolved, "{a:#x}: {f:?}");
        assert_eq!(f.function, *n, "{a:#x}");
        let start = f.sym_addr.unwrap();
        assert_eq!(start + f.sym_offset.unwrap(), *a);
    }
    // Cached the second time.
    let again = s.symbolize_kernel(&addrs);
    assert_eq!(again, out);
    assert_eq!(s.stats().cache_hits, addrs.len() as u64);

    // No kallsyms: the fallback name, not an error.
    let mut s = Symbolizer::new(SymbolizerConfig {
        kallsyms: None,
        ..SymbolizerConfig::default()
    });
    let r = s.symbolize_kernel(&addrs[..1]);
    assert!(!r[0][0].resolved);
    assert_eq!(r[0][0].function, format!("[kernel]+{:#x}", addrs[0]));
}

#[inline(never)]
fn marker_function_for_symbolization(x: u64) -> u64 {
    std::hint::black_box(x.wrapping_mul(3))
}

#[test]
fn rust_names_of_this_binary_are_demangled() {
    let pid = std::process::id();
    let mut u = Unwinder::new(UnwindConfig::default());
    let addr = marker_function_for_symbolization as *const () as u64;
    let n = u.normalize(pid, addr + 1).expect("own code is in a module");
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let r = s.symbolize(&n.module, &[n.file_offset]);
    let f = r[0].last().unwrap();
    assert!(f.resolved);
    assert_eq!(f.function, "symbolize::marker_function_for_symbolization");
    assert_eq!(f.sym_offset, Some(1));
    assert_eq!(Some(f.sym_addr.unwrap() + 1), n.vaddr);
    assert!(
        f.file.as_deref().unwrap().ends_with("tests/symbolize.rs"),
        "{f:?}"
    );
    // Optimized builds inline `wrapping_mul` at that address: inlined frames come first.
    assert!(r[0][..r[0].len() - 1].iter().all(|f| f.inlined), "{r:?}");
}

#[test]
fn results_are_shared_across_processes_of_one_file() {
    if !native_prereqs("results_are_shared_across_processes_of_one_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = "#include <signal.h>\n\
               volatile int s;\n\
               __attribute__((noinline)) void stop_here(void) { raise(SIGSTOP); s++; }\n\
               int main(void) { stop_here(); return 0; }\n";
    let bin = compile(dir.path(), "shared_sym", "c", src, &["-O2", "-g"]);
    // The same build stripped: same build id (the unwinder shares one parse of both), other
    // symbols (the symbolizer must read each process's own file).
    let stripped = dir.path().join("shared_sym_stripped");
    let o = Command::new("strip")
        .args(["--strip-all", "-o"])
        .arg(&stripped)
        .arg(&bin)
        .output()
        .unwrap();
    assert!(o.status.success());
    let mut u = Unwinder::new(UnwindConfig::default());
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let mut seen = Vec::new();
    let mut hits = Vec::new();
    for b in [&stripped, &bin, &bin] {
        let t = Target::spawn(&mut Command::new(b));
        wait_all_stopped(t.pid(), Duration::from_secs(10));
        let cap = capture(t.pid(), t.pid()).unwrap();
        let stack = u.unwind(t.pid(), cap.regs, &cap.stack);
        assert!(stack.outcome.is_complete());
        let before = s.stats().cache_hits;
        let syms = symbolize_stack(&mut u, &mut s, t.pid(), &stack);
        hits.push(s.stats().cache_hits - before);
        seen.push((names(&syms), syms.len()));
    }
    // One parse of the executable's unwind tables served all three (plus libc).
    assert_eq!(u.stats().modules.loaded, 2, "{:?}", u.stats());
    // The stripped process gets the fallback, the unstripped ones the name.
    assert!(!seen[0].0.iter().any(|n| n == "stop_here"), "{:?}", seen[0]);
    assert!(seen[0]
        .0
        .iter()
        .any(|n| n.starts_with("shared_sym_stripped+0x")));
    assert!(seen[1].0.iter().any(|n| n == "stop_here"), "{:?}", seen[1]);
    assert_eq!(seen[1], seen[2]);
    // The third process's frames were all answered from the cache; the second shared only
    // libc's with the first.
    assert_eq!(hits[2], seen[2].1 as u64, "{hits:?}");
    assert!(hits[1] < seen[1].1 as u64, "{hits:?}");
}

#[test]
fn a_stripped_library_falls_back_to_its_dynamic_symbols() {
    if !native_prereqs("a_stripped_library_falls_back_to_its_dynamic_symbols") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lib_src = "#include <signal.h>\n\
                   volatile int s;\n\
                   static __attribute__((noinline)) void hidden_helper(void) { raise(SIGSTOP); s++; }\n\
                   void exported_entry(void) { hidden_helper(); s++; }\n";
    let lib = compile(
        dir.path(),
        "libstripped.so",
        "c",
        lib_src,
        &["-O2", "-shared", "-fPIC"],
    );
    let o = Command::new("strip")
        .arg("--strip-all")
        .arg(&lib)
        .output()
        .unwrap();
    assert!(o.status.success());
    let main_src = "void exported_entry(void);\nint main(void) { exported_entry(); return 0; }\n";
    let main = compile(
        dir.path(),
        "use_stripped",
        "c",
        main_src,
        &["-O2", "-L", dir.path().to_str().unwrap(), "-lstripped"],
    );
    let t = Target::spawn(Command::new(&main).env("LD_LIBRARY_PATH", dir.path()));
    wait_all_stopped(t.pid(), Duration::from_secs(10));
    let pid = t.pid();
    let cap = capture(pid, pid).unwrap();
    let mut u = Unwinder::new(UnwindConfig::default());
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let stack = u.unwind(pid, cap.regs, &cap.stack);
    let syms = symbolize_stack(&mut u, &mut s, pid, &stack);
    let report = describe(&stack, &syms);
    assert!(stack.outcome.is_complete(), "{report}");
    let gdb = gdb_backtraces(pid);
    assert_matches_gdb("stripped lib", &stack, &syms, &gdb[&pid], false, None);
    let lib_frames: Vec<_> = stack
        .lookup_addrs()
        .zip(&syms)
        .filter_map(|(a, fs)| {
            let n = u.normalize(pid, a)?;
            (n.module.name() == "libstripped.so").then(|| (n.file_offset, fs[0].clone()))
        })
        .collect();
    assert_eq!(lib_frames.len(), 2, "{report}");
    // The static helper has no symbol left: module+offset; the exported one keeps its name.
    assert!(!lib_frames[0].1.resolved);
    assert_eq!(
        lib_frames[0].1.function,
        format!("libstripped.so+{:#x}", lib_frames[0].0)
    );
    assert!(lib_frames[1].1.resolved);
    assert_eq!(lib_frames[1].1.function, "exported_entry");
}

#[test]
fn the_symbolizer_thread_answers_requests() {
    let pid = std::process::id();
    let mut u = Unwinder::new(UnwindConfig::default());
    let addr = marker_function_for_symbolization as *const () as u64;
    let n = u.normalize(pid, addr).unwrap();
    let h = symbolize::spawn(SymbolizerConfig::default(), 4).unwrap();
    let r = h
        .symbolize_blocking(n.module.clone(), vec![n.file_offset, n.file_offset])
        .unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(
        r[0].last().unwrap().function,
        "symbolize::marker_function_for_symbolization"
    );
    assert!(Arc::ptr_eq(&r[0], &r[1]) || r[0] == r[1]);
    // Queued requests: a full queue hands the request back instead of blocking.
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    let mut accepted = 0;
    for _ in 0..64 {
        let req = symbolize::Request::Module {
            module: n.module.clone(),
            file_offsets: vec![n.file_offset],
            reply: tx.clone(),
        };
        if h.try_submit(req).is_ok() {
            accepted += 1;
        }
        if accepted == 8 {
            break;
        }
    }
    assert!(accepted >= 1);
    for _ in 0..accepted {
        let r = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(
            r[0].last().unwrap().function,
            "symbolize::marker_function_for_symbolization"
        );
    }
}
