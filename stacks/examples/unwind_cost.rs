//! What unwinding and symbolization cost, measured on a real CPython 3.11 stack.
//!
//! `cargo run --release --example unwind_cost -p infertap-stacks` (root: ptrace and
//! /proc/<pid>/map_files). Starts python3.11 (the test venv's, which also maps numpy's
//! OpenBLAS and llama.cpp's libraries when they import, else pyenv's), stops it inside
//! `time.sleep` below a few Python functions, takes one sample as the kernel does (ptrace regs +
//! 16 KiB of stack) and prints:
//! - the cost of parsing each module on first use (what a sample hitting a new module pays),
//! - the per-sample unwind cost with everything warm (median, p99), and with framehop's rule
//!   cache cold,
//! - the per-address symbolization cost: cold (first address of a module: opening and parsing
//!   its symbols and DWARF), blazesym warm (our cache bypassed), and warm (our cache).
//!
//! `-- --large N` also builds a shared library of N functions with gcc (libtorch_cpu has a few
//! hundred thousand FDEs), maps it into a stopped process and times its first-use parse.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use infertap_stacks::symbolize::{Symbolizer, SymbolizerConfig};
use infertap_stacks::unwind::{UnwindConfig, Unwinder};

fn python() -> (PathBuf, bool) {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let venv = PathBuf::from(home).join(".cache/infertap/venv/bin/python");
    if venv.is_file() {
        return (venv, true);
    }
    (
        PathBuf::from("/root/.pyenv/versions/3.11.7/bin/python3.11"),
        false,
    )
}

fn quantiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (q(0.5), q(0.99))
}

/// Builds a library with `n` small functions, maps it into a stopped process, times its parse.
fn large_library(n: usize) {
    use std::fmt::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let mut src = String::from("volatile long sink;\n");
    for i in 0..n {
        let _ = writeln!(
            src,
            "__attribute__((noinline)) long f{i}(long x) {{ long y = x * {i} + sink; sink = y; return y ^ (x >> 3); }}"
        );
    }
    let t0 = Instant::now();
    let lib = common::compile(
        dir.path(),
        "liblarge.so",
        "c",
        &src,
        &["-O1", "-shared", "-fPIC"],
    );
    println!(
        "\nlarge library: {n} functions, built in {:.0} s, {:.1} MiB",
        t0.elapsed().as_secs_f64(),
        std::fs::metadata(&lib).unwrap().len() as f64 / (1 << 20) as f64
    );
    let main = "#include <dlfcn.h>\n#include <signal.h>\n\
                int main(int c, char **v) { (void)c; if (!dlopen(v[1], RTLD_NOW)) return 1; raise(SIGSTOP); return 0; }\n";
    let bin = common::compile(dir.path(), "map_large", "c", main, &["-O2"]);
    let t = common::Target::spawn(Command::new(&bin).arg(&lib));
    common::wait_all_stopped(t.pid(), Duration::from_secs(30));
    let maps = procfs::process::Process::new(t.pid() as i32)
        .unwrap()
        .maps()
        .unwrap();
    let m = maps
        .iter()
        .find(|m| {
            m.perms.contains(procfs::process::MMPermissions::EXECUTE)
                && matches!(&m.pathname, procfs::process::MMapPath::Path(p) if p.ends_with("liblarge.so"))
        })
        .expect("liblarge.so mapped");
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let mut u = Unwinder::new(UnwindConfig::default());
        let _ = u.normalize(t.pid(), 0);
        let t0 = Instant::now();
        let n = u.normalize(t.pid(), m.address.0).unwrap();
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        last = Some((n.module.fde_count(), n.module.heap_bytes()));
    }
    let (med, _) = quantiles(times);
    let (fdes, heap) = last.unwrap();
    println!(
        "  first-use parse: median {med:.1} ms for {fdes} FDEs ({:.2} µs per FDE), {:.1} MiB held",
        med * 1e3 / fdes as f64,
        heap as f64 / (1 << 20) as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--large") {
        let n = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        large_library(n);
    }
    let (py, venv) = python();
    if !py.is_file() {
        eprintln!("no python3.11 at {}", py.display());
        std::process::exit(2);
    }
    let imports = if venv {
        "import numpy, llama_cpp\n"
    } else {
        ""
    };
    let script = format!(
        "{imports}import time\n\
         def inner():\n    print('ready', flush=True)\n    time.sleep(1000)\n\
         def middle():\n    inner()\n\
         def outer():\n    middle()\n\
         outer()\n"
    );
    let mut t = common::Target::spawn(Command::new(&py).args(["-c", &script]));
    t.wait_line("ready");
    std::thread::sleep(Duration::from_millis(200));
    common::stop(t.pid());
    let pid = t.pid();
    let cap = common::capture(pid, pid).expect("capture (needs root)");
    println!(
        "target: {} (pid {pid}), sample: {} stack bytes",
        py.display(),
        cap.stack.len()
    );

    // 1. Module parse cost: each executable mapping's module, parsed from scratch.
    println!("\nmodule parse on first use (fresh cache each):");
    let maps = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.maps())
        .expect("maps");
    let mut seen = std::collections::HashSet::new();
    let mut rows = Vec::new();
    for m in maps {
        let procfs::process::MMapPath::Path(path) = &m.pathname else {
            continue;
        };
        if !m.perms.contains(procfs::process::MMPermissions::EXECUTE) || !seen.insert(m.inode) {
            continue;
        }
        let mut u = Unwinder::new(UnwindConfig::default());
        // Reads the maps (address 0 is in no module), so only the module's parse is timed.
        let _ = u.normalize(pid, 0);
        let t0 = Instant::now();
        let n = u.normalize(pid, m.address.0);
        let dt = t0.elapsed();
        if let Some(n) = n {
            let size = std::fs::metadata(path).map(|md| md.len()).unwrap_or(0);
            rows.push((
                dt,
                n.module.name().to_string(),
                size,
                n.module.fde_count(),
                n.module.heap_bytes(),
            ));
        }
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    for (dt, name, size, fdes, heap) in rows.iter().take(12) {
        println!(
            "  {:>9.2} ms  {name:<44} file {:>6.1} MiB, {fdes:>6} FDEs, {:>7.1} KiB held",
            dt.as_secs_f64() * 1e3,
            *size as f64 / (1 << 20) as f64,
            *heap as f64 / 1024.0
        );
    }

    // 2. Per-sample unwind cost.
    let mut u = Unwinder::new(UnwindConfig::default());
    let t0 = Instant::now();
    let first = u.unwind(pid, cap.regs, &cap.stack);
    let first_dt = t0.elapsed();
    println!(
        "\nunwind: {} frames, {:?}; first sample (parses {} modules): {:.2} ms",
        first.frames.len(),
        first.outcome,
        u.stats().modules.loaded,
        first_dt.as_secs_f64() * 1e3
    );
    let mut warm = Vec::with_capacity(20000);
    for _ in 0..20000 {
        let t0 = Instant::now();
        let s = u.unwind(pid, cap.regs, &cap.stack);
        warm.push(t0.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(s);
    }
    let (med, p99) = quantiles(warm);
    println!(
        "  warm: median {med:.2} µs, p99 {p99:.2} µs per sample ({:.0} ns per frame)",
        med * 1e3 / first.frames.len() as f64
    );
    // framehop's rule cache (and the FDE classification) cold, modules already parsed: a fresh
    // unwinder per measurement, preloaded before the clock starts.
    let mut cold = Vec::new();
    for _ in 0..200 {
        let mut u2 = Unwinder::new(UnwindConfig::default());
        u2.preload(pid).expect("preload");
        let t0 = Instant::now();
        std::hint::black_box(u2.unwind(pid, cap.regs, &cap.stack));
        cold.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    let (cmed, cp99) = quantiles(cold);
    println!(
        "  rule cache cold (modules parsed): median {cmed:.2} µs, p99 {cp99:.2} µs per sample"
    );

    // 3. Symbolization per address.
    let norm: Vec<_> = first
        .lookup_addrs()
        .map(|a| u.normalize(pid, a).expect("frame in a module"))
        .collect();
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let mut per_module_first = Vec::new();
    let mut cold_rest = Vec::new();
    let mut modules_seen = std::collections::HashSet::new();
    for n in &norm {
        let t0 = Instant::now();
        let r = s.symbolize(&n.module, &[n.file_offset]);
        let dt = t0.elapsed();
        std::hint::black_box(r);
        if modules_seen.insert(n.module.id) {
            per_module_first.push((dt, n.module.name().to_string()));
        } else {
            cold_rest.push(dt.as_secs_f64() * 1e6);
        }
    }
    println!("\nsymbolize (per address):");
    for (dt, name) in &per_module_first {
        println!(
            "  cold, first address of {name}: {:.2} ms (opens and parses symbols + DWARF)",
            dt.as_secs_f64() * 1e3
        );
    }
    if !cold_rest.is_empty() {
        let (m, p) = quantiles(cold_rest);
        println!("  cold, later addresses of a parsed module: median {m:.1} µs, p99 {p:.1} µs");
    }
    // blazesym warm, our cache bypassed (a 2-entry cache).
    let mut s2 = Symbolizer::new(SymbolizerConfig {
        max_cached_addrs: 2,
        ..SymbolizerConfig::default()
    });
    for n in &norm {
        s2.symbolize(&n.module, &[n.file_offset]);
    }
    let mut bz = Vec::new();
    for _ in 0..20 {
        for n in &norm {
            let t0 = Instant::now();
            std::hint::black_box(s2.symbolize(&n.module, &[n.file_offset]));
            bz.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    let (m, p) = quantiles(bz);
    println!("  blazesym warm, uncached address: median {m:.1} µs, p99 {p:.1} µs");
    let mut hot = Vec::new();
    for _ in 0..2000 {
        for n in &norm {
            let t0 = Instant::now();
            std::hint::black_box(s.symbolize(&n.module, &[n.file_offset]));
            hot.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    let (m, p) = quantiles(hot);
    println!(
        "  warm (cached): median {:.0} ns, p99 {:.0} ns",
        m * 1e3,
        p * 1e3
    );
    println!("\n{:?}\n{:?}", u.stats(), s.stats());
}
