//! Kernel samples through the production user-space code, on real programs: the eBPF sampler's
//! records go to `infertap_stacks` exactly as the profiler hands them on.
//!
//! - Every installed pyenv CPython (3.10.13, 3.11.7, 3.12.1, 3.13.0): `python::discover` →
//!   `set_python_process` → kernel-walked frames → `Resolver::resolve`, for a known call chain
//!   in the main thread and another in a `threading.Thread` (3.10 tells its threads apart
//!   through glibc's `struct pthread`), checked against the script's own source lines and
//!   against the reference walker on a stopped snapshot (entry marks included).
//! - The real llama.cpp server under streaming load: kernel samples of its decode threads, their
//!   copies bounded by the stack tops user space registers (`Unwinder::stack_top` →
//!   `set_stack_top`, as the profiler does), unwound with `unwind::Unwinder` and symbolized with
//!   `symbolize::Symbolizer`.
//!
//! Needs root; the Python test needs the pyenv interpreters (in CI at least 3.11.7), the llama
//! test the venv with llama-cpp-python and the model (`cargo xtask setup`).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use infertap::probes::{
    profile::{decode_sample, ProfileConfig, SampleKind, SampleView},
    ProbeConfig, Probes,
};
use infertap_common::{
    counter,
    profile::{sample_flags as sf, PyFrame, StackTop, MAX_STACK_BYTES},
};
use infertap_stacks::{
    python::{discover, mem::ProcMem, stop::Stopped, walk, Resolver},
    symbolize::{Symbolizer, SymbolizerConfig},
    unwind::{lookup_address, ModuleInfo, UnwindConfig, UnwindOutcome, Unwinder},
    UserRegs,
};
use infertap_tests::{load, prereq, servers};

/// ≈5 ms apart, a prime so it locks onto no periodic work.
const HZ: u64 = 199;

/// One test at a time: each attaches perf events on every CPU of a small shared machine.
fn lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn load_probes() -> Probes {
    Probes::load(&ProbeConfig {
        profile: ProfileConfig {
            hz: HZ,
            offcpu_sample_every: 0,
            ..ProfileConfig::default()
        },
        ..ProbeConfig::default()
    })
    .expect("load probes")
}

/// Hands every sample waiting in the ring to `f` (decoded in place: nothing is copied).
fn drain(ring: &mut RingBuf<MapData>, mut f: impl FnMut(&SampleView<'_>)) {
    while let Some(item) = ring.next() {
        let v = decode_sample(&item).expect("the kernel writes well-formed samples");
        f(&v);
    }
}

/// Drains for `d`, every 20 ms.
fn drain_for(ring: &mut RingBuf<MapData>, d: Duration, mut f: impl FnMut(&SampleView<'_>)) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        drain(ring, &mut f);
        std::thread::sleep(Duration::from_millis(20));
    }
    drain(ring, &mut f);
}

// ---- CPython ---------------------------------------------------------------------------------

/// A main-thread chain (`<module> → outer → map() → middle → leaf`, `middle` entered from C)
/// and a thread's (`Thread._bootstrap … → worker → Worker.run_chain → Worker.spin`), each
/// spinning on its last line. `# @name` marks the lines the frames must resolve to.
const CHAINS: &str = r#"import os, threading

def ready(tag):
    # One write(2) per line: the two threads' lines never interleave.
    os.write(1, b"%s %d\n" % (tag, threading.get_native_id()))

def leaf():
    ready(b"main")
    x = 0
    while True:  # @leaf
        x += 1

def middle(_):
    leaf()  # @middle

def outer():
    list(map(middle, [0]))  # @outer

class Worker:
    def run_chain(self):
        self.spin()  # @run_chain

    def spin(self):
        ready(b"thread")
        y = 0
        while True:  # @spin
            y += 1

def worker():
    Worker().run_chain()  # @worker

threading.Thread(target=worker, daemon=True).start()
outer()  # @module
"#;

/// Line numbers of the `# @name` markers of `src`.
fn markers(src: &str) -> HashMap<String, u32> {
    src.lines()
        .enumerate()
        .filter_map(|(i, l)| Some((l.split("# @").nth(1)?.trim().to_string(), i as u32 + 1)))
        .collect()
}

const PYENV: &str = "/root/.pyenv/versions";
const PYTHONS: [(&str, u8); 4] = [
    ("3.10.13", 10),
    ("3.11.7", 11),
    ("3.12.1", 12),
    ("3.13.0", 13),
];

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One resolved frame: (qualified name, file, line, entry).
type Resolved = (String, String, Option<u32>, bool);

/// The offset of `tid` in glibc's `struct pthread` as this test's own libc describes it (the
/// same file a pyenv interpreter maps here), read with `object` independently of discovery.
fn own_glibc_pthread_tid() -> Option<u16> {
    use object::{Object, ObjectSegment, ObjectSymbol};
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let libc = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libc.so.6"))?;
    let data = std::fs::read(libc).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let sym = file
        .dynamic_symbols()
        .find(|s| s.name() == Ok("_thread_db_pthread_tid"))?;
    let bytes = file
        .segments()
        .find_map(|s| s.data_range(sym.address(), 12).ok().flatten())?;
    Some(u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as u16)
}

#[test]
fn python_threads_resolve_from_kernel_samples_on_every_interpreter() {
    const TEST: &str = "python_threads_resolve_from_kernel_samples_on_every_interpreter";
    if !prereq::check(TEST, prereq::missing_root()) {
        return;
    }
    let installed: Vec<(&str, u8, PathBuf)> = PYTHONS
        .iter()
        .filter_map(|&(v, m)| {
            let python = Path::new(PYENV).join(v).join(format!("bin/python3.{m}"));
            if python.exists() {
                return Some((v, m, python));
            }
            // In CI 3.11 at least must be there; the others may be missing anywhere.
            let why = format!("{} not installed", python.display());
            if m == 11 {
                prereq::check(TEST, Some(why));
            } else {
                eprintln!("SKIP {TEST}[{v}]: {why}");
            }
            None
        })
        .collect();
    if installed.is_empty() {
        return;
    }
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("chains.py");
    std::fs::write(&script, CHAINS).unwrap();
    let script_name = script.to_str().unwrap().to_string();
    let at = markers(CHAINS);
    let mut probes = load_probes();
    let mut ring = probes.profile.take_samples().unwrap();

    for (v, m, python) in installed {
        let mut child = Proc(
            Command::new(&python)
                .arg(&script)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{v}: {e}")),
        );
        let pid = child.0.id();
        let mut out = BufReader::new(child.0.stdout.take().unwrap());
        let mut tids = HashMap::new();
        for _ in 0..2 {
            let mut l = String::new();
            out.read_line(&mut l).unwrap();
            let (tag, tid) = l
                .trim()
                .split_once(' ')
                .unwrap_or_else(|| panic!("{v}: {l:?}"));
            tids.insert(tag.to_string(), tid.parse::<u32>().unwrap());
        }
        let (main, thread) = (tids["main"], tids["thread"]);
        assert_eq!(main, pid, "{v}");

        // Discovery, as the profiler runs it, and the kernel's per-process record.
        let p = discover(pid).unwrap_or_else(|e| panic!("{v}: discover: {e}"));
        assert_eq!(p.version.minor, m, "{v}");
        let proc_ = p.py_proc();
        if m == 10 {
            let off = p
                .pthread_tid
                .expect("3.10 matches threads through struct pthread");
            assert_eq!(proc_.offsets.pthread_tid, off);
            assert_eq!(
                Some(off),
                own_glibc_pthread_tid(),
                "{v}: libc's own descriptor"
            );
        } else {
            assert_eq!(p.pthread_tid, None, "{v}");
        }
        let mut resolver = Resolver::default();
        resolver.add_process(&p).unwrap();
        probes.profile.set_python_process(pid, &proc_).unwrap();
        probes.add_target(pid).unwrap();

        let mut samples: Vec<(u32, u8, Vec<PyFrame>)> = Vec::new();
        drain_for(&mut ring, Duration::from_millis(1500), |s| {
            if s.pid() == pid && s.kind == SampleKind::Cpu {
                samples.push((s.tid(), s.header.flags, s.python_frames().collect()));
            }
        });
        // The reference walker on a stopped snapshot: what the kernel should emit per thread.
        let reference: HashMap<u32, Vec<(u64, bool)>> = {
            let stopped = Stopped::attach(pid).unwrap();
            let mem = ProcMem::open(pid).unwrap();
            [main, thread]
                .into_iter()
                .map(|t| {
                    let tid = stopped.thread(t).unwrap().tid;
                    let w = walk::walk(&mem, &proc_, tid);
                    assert_eq!((w.flags, &w.error), (0, &None), "{v}: tid {t}");
                    (
                        t,
                        w.frames
                            .iter()
                            .map(|f| (f.code_addr(), f.is_entry()))
                            .collect(),
                    )
                })
                .collect()
        };

        let ours = |name: &str, class: &str, marker: &str| -> (String, String, Vec<u32>) {
            // 3.10 has no co_qualname: the name is co_name.
            let q = if m == 10 || class.is_empty() {
                name.to_string()
            } else {
                format!("{class}.{name}")
            };
            let line = at[marker];
            // A spinning frame is on its loop's test or its body.
            let lines = if marker == "leaf" || marker == "spin" {
                vec![line, line + 1]
            } else {
                vec![line]
            };
            (q, script_name.clone(), lines)
        };
        let main_chain = [
            ours("leaf", "", "leaf"),
            ours("middle", "", "middle"),
            ours("outer", "", "outer"),
            ours("<module>", "", "module"),
        ];
        let thread_chain = [
            ours("spin", "Worker", "spin"),
            ours("run_chain", "Worker", "run_chain"),
            ours("worker", "", "worker"),
        ];
        let threading = ["run", "_bootstrap_inner", "_bootstrap"];
        let mut per_thread: BTreeMap<u32, usize> = BTreeMap::new();
        for (tid, flags, frames) in &samples {
            assert!(
                *tid == main || *tid == thread,
                "{v}: only the two Python threads run: {tid}"
            );
            assert_eq!(
                flags & (sf::PY_ERROR | sf::PY_NO_THREAD | sf::PY_TRUNCATED),
                0,
                "{v}: tid {tid} flags {flags:#x}"
            );
            let got: Vec<Resolved> = frames
                .iter()
                .map(|f| {
                    let loc = resolver
                        .resolve(pid, *f)
                        .unwrap_or_else(|e| panic!("{v}: resolving {f:x?}: {e}"));
                    let func = resolver.function(loc.function).unwrap();
                    (
                        func.qualname.to_string(),
                        func.filename.to_string(),
                        loc.line,
                        loc.entry,
                    )
                })
                .collect();
            let want: &[(String, String, Vec<u32>)] = if *tid == main {
                &main_chain
            } else {
                &thread_chain
            };
            assert!(got.len() >= want.len(), "{v}: tid {tid}: {got:#?}");
            for (g, w) in got.iter().zip(want) {
                assert_eq!((&g.0, &g.1), (&w.0, &w.1), "{v}: tid {tid}: {got:#?}");
                assert!(
                    g.2.is_some_and(|l| w.2.contains(&l)),
                    "{v}: {} at line {:?}, expected {:?}",
                    g.0,
                    g.2,
                    w.2
                );
            }
            if *tid == main {
                assert_eq!(got.len(), main_chain.len(), "{v}: {got:#?}");
            } else {
                let tail: Vec<&str> = got[thread_chain.len()..]
                    .iter()
                    .map(|f| f.0.rsplit('.').next().unwrap())
                    .collect();
                assert_eq!(tail, threading, "{v}: {got:#?}");
                for f in &got[thread_chain.len()..] {
                    assert!(
                        f.1.ends_with(&format!("python3.{m}/threading.py")),
                        "{v}: {f:?}"
                    );
                }
            }
            // Entry marks: the outermost frame always; every frame on 3.10 (one eval-loop
            // call per frame); on 3.11+ frames entered from C (middle, through map(); the
            // module; Thread._bootstrap) and not those called from Python directly. And all
            // of them as the reference walker marks them on the stopped process.
            let entries: Vec<bool> = got.iter().map(|f| f.3).collect();
            assert!(entries.last().copied().unwrap_or(false), "{v}: {got:#?}");
            if m == 10 {
                assert!(entries.iter().all(|&e| e), "{v}: {got:#?}");
            } else if *tid == main {
                assert_eq!(entries, [false, true, false, true], "{v}");
            } else {
                assert_eq!((entries[0], entries[1]), (false, false), "{v}: {got:#?}");
            }
            let codes: Vec<(u64, bool)> = frames
                .iter()
                .map(|f| (f.code_addr(), f.is_entry()))
                .collect();
            assert_eq!(
                codes, reference[tid],
                "{v}: tid {tid}: kernel vs reference walker"
            );
            *per_thread.entry(*tid).or_default() += 1;
        }
        eprintln!(
            "CPython {v}: walked samples per thread {per_thread:?} (main {main}, thread {thread})"
        );
        assert_eq!(
            per_thread.len(),
            2,
            "{v}: both threads sampled: {per_thread:?}"
        );
        assert!(per_thread.values().all(|&n| n >= 20), "{v}: {per_thread:?}");
        probes.profile.forget_process(pid);
        drop(child);
    }
    let c = probes.counters();
    assert_eq!(c.get(counter::SAMPLE_FAILED), 0);
    assert_eq!(c.get(counter::SAMPLE_RING_FULL), 0);
}

// ---- llama.cpp ---------------------------------------------------------------------------------

/// Whether a module is llama.cpp's own compute code (libllama, libggml*).
fn is_compute_module(m: &ModuleInfo) -> bool {
    let n = m.name();
    n.starts_with("libllama") || n.starts_with("libggml")
}

/// The function names (innermost first, inlined frames included) of one address.
fn names_at(u: &mut Unwinder, s: &mut Symbolizer, pid: u32, lookup: u64) -> Vec<String> {
    match u.normalize(pid, lookup) {
        Some(n) => s
            .symbolize(&n.module, &[n.file_offset])
            .remove(0)
            .iter()
            .map(|f| f.function.clone())
            .collect(),
        None => vec![format!("{lookup:#x}")],
    }
}

#[test]
fn llama_decode_threads_unwind_from_kernel_samples() {
    const TEST: &str = "llama_decode_threads_unwind_from_kernel_samples";
    if !prereq::check(TEST, prereq::missing_root())
        || !prereq::check(TEST, prereq::missing_real_server())
    {
        return;
    }
    let _g = lock();
    let server = servers::LlamaServer::start(2).expect("llama server");
    let pid = server.pid();
    let mut probes = load_probes();
    let mut ring = probes.profile.take_samples().unwrap();
    let mut u = Unwinder::new(UnwindConfig::default());
    u.preload(pid).unwrap();
    let mut sym = Symbolizer::new(SymbolizerConfig::default());
    probes.add_target(pid).unwrap();

    let mut cfg = load::LoadConfig::new(server.addr());
    cfg.concurrency = 2;
    cfg.requests = None;
    cfg.duration = Some(Duration::from_secs(15));
    cfg.max_tokens = 96;
    cfg.endpoint = load::EndpointMix::Completions;
    cfg.model = Some(servers::MODEL_ALIAS.to_string());
    let client = std::thread::spawn(move || load::run_load_blocking(&cfg));

    // What the profiler does with each sample: register the thread's stack on its first sample
    // (and look again when a sample says the registered range may no longer fit), unwind,
    // normalize the leaf.
    let mut tops: HashMap<u32, StackTop> = HashMap::new();
    let (mut relooked, mut reregistered) = (0u64, 0u64);
    #[derive(Default)]
    struct Tally {
        samples: u64,
        complete: u64,
        /// Complete when only the first 16 KiB of the copy are unwound (the old window).
        complete_16k: u64,
        to_top: u64,
        short: u64,
        bytes: u64,
        bytes_to_top: u64,
        frames: u64,
        truncated: BTreeMap<&'static str, u64>,
    }
    let (mut all, mut compute) = (Tally::default(), Tally::default());
    // (module, file offset) of compute leaves, and of the outermost frame of complete stacks.
    let mut leaves: Vec<(std::sync::Arc<ModuleInfo>, u64)> = Vec::new();
    let mut outermost: HashMap<(u64, u64), u64> = HashMap::new();
    let mut outer_example: HashMap<(u64, u64), (u32, u64)> = HashMap::new();
    let mut threads: HashSet<u32> = HashSet::new();
    let t0 = Instant::now();
    while !client.is_finished() && t0.elapsed() < Duration::from_secs(60) {
        drain_for(&mut ring, Duration::from_millis(100), |s| {
            if s.pid() != pid || s.kind != SampleKind::Cpu {
                return;
            }
            let h = &s.header;
            let tid = s.tid();
            let known = tops.get(&tid).copied();
            let look = match known {
                None => true,
                Some(t) => {
                    (s.has_flag(sf::STACK_TO_TOP) && s.has_flag(sf::STACK_SHORT))
                        || !(t.low <= h.sp && h.sp < t.top)
                }
            };
            if look {
                relooked += u64::from(known.is_some());
                if let Some(t) = u.stack_top(pid, h.sp).filter(|t| Some(*t) != known) {
                    reregistered += u64::from(known.is_some());
                    probes.profile.set_stack_top(pid, tid, t).unwrap();
                    tops.insert(tid, t);
                }
            }
            let regs = UserRegs {
                ip: h.ip,
                sp: h.sp,
                bp: h.bp,
            };
            let stack = u.unwind(pid, regs, s.stack());
            let cut = &s.stack()[..s.stack().len().min(16384)];
            let complete_16k = u.unwind(pid, regs, cut).outcome.is_complete();
            let leaf = u.normalize(pid, lookup_address(0, h.ip));
            let in_compute = leaf.as_ref().is_some_and(|n| is_compute_module(&n.module));
            if let Some(n) = leaf.filter(|_| in_compute) {
                threads.insert(tid);
                leaves.push((n.module, n.file_offset));
            }
            let tallies = if in_compute {
                vec![&mut all, &mut compute]
            } else {
                vec![&mut all]
            };
            for t in tallies {
                t.samples += 1;
                t.complete_16k += u64::from(complete_16k);
                t.frames += stack.frames.len() as u64;
                t.bytes += s.stack().len() as u64;
                if s.has_flag(sf::STACK_TO_TOP) {
                    t.to_top += 1;
                    t.bytes_to_top += s.stack().len() as u64;
                }
                t.short += u64::from(s.has_flag(sf::STACK_SHORT));
                match stack.outcome {
                    UnwindOutcome::Complete => t.complete += 1,
                    UnwindOutcome::Truncated(r) => *t.truncated.entry(r.as_str()).or_default() += 1,
                }
            }
            if in_compute && stack.outcome.is_complete() {
                let last = stack.frames.len() - 1;
                if let Some(n) = u.normalize(pid, lookup_address(last, stack.frames[last])) {
                    let key = (n.module.inode, n.file_offset);
                    *outermost.entry(key).or_default() += 1;
                    outer_example
                        .entry(key)
                        .or_insert((tid, stack.frames[last]));
                }
            }
        });
    }
    let records = client.join().unwrap().expect("load ran");
    let ok = records
        .iter()
        .filter(|r| r.error.is_none() && r.output_tokens > 0)
        .count();
    assert!(
        ok >= 2,
        "{ok} of {} streamed requests succeeded",
        records.len()
    );

    // Symbolize the compute leaves and the outermost frames while the server still runs.
    let mut leaf_names: BTreeMap<String, u64> = BTreeMap::new();
    // Leaves the module's symbols name (the wheel's libraries are stripped to .dynsym: internal
    // functions have no name), and those named as ggml or llama functions.
    let (mut resolved, mut named) = (0u64, 0u64);
    for (module, off) in &leaves {
        let f = sym.symbolize(module, &[*off]).remove(0);
        // The physical function the ip is in (the outermost entry at that address).
        let physical = f.last().unwrap();
        let lower = physical.function.to_ascii_lowercase();
        resolved += u64::from(physical.resolved);
        named +=
            u64::from(physical.resolved && (lower.contains("ggml") || lower.contains("llama")));
        *leaf_names.entry(physical.function.clone()).or_default() += 1;
    }
    let mut outer_names: BTreeMap<String, u64> = BTreeMap::new();
    for (key, n) in &outermost {
        let (_, addr) = outer_example[key];
        let names = names_at(&mut u, &mut sym, pid, addr.saturating_sub(1));
        *outer_names
            .entry(names.last().unwrap().clone())
            .or_default() += n;
    }
    drop(server);

    let pct = |n: u64, of: u64| 100.0 * n as f64 / of.max(1) as f64;
    let mean = |b: u64, n: u64| b as f64 / n.max(1) as f64;
    for (what, t) in [("all samples", &all), ("in libllama/libggml", &compute)] {
        eprintln!(
            "llama server, {what}: {} samples, complete {} ({:.1} %), truncated {:?}, complete \
             within 16 KiB {:.1} %; {:.1} frames; copies: {:.0} B mean, {} bounded by the stack \
             top ({:.0} B mean), {} short",
            t.samples,
            t.complete,
            pct(t.complete, t.samples),
            t.truncated,
            pct(t.complete_16k, t.samples),
            mean(t.frames, t.samples),
            mean(t.bytes, t.samples),
            t.to_top,
            mean(t.bytes_to_top, t.to_top),
            t.short,
        );
    }
    let mut top_leaves: Vec<(&String, &u64)> = leaf_names.iter().collect();
    top_leaves.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
    eprintln!(
        "compute threads {threads:?}, stacks registered for {} threads ({relooked} looked up \
         again, {reregistered} re-registered); leaf functions: {:?}; outermost frames of \
         complete stacks: {outer_names:?}",
        tops.len(),
        &top_leaves[..top_leaves.len().min(10)]
    );

    assert!(
        compute.samples >= 200,
        "{} compute samples",
        compute.samples
    );
    assert!(
        pct(compute.complete, compute.samples) >= 95.0,
        "{} of {} compute samples unwound to their thread's start",
        compute.complete,
        compute.samples
    );
    // Once registered, a thread's copies stop at its stack top.
    assert!(
        compute.to_top * 10 >= compute.samples * 9,
        "{} of {} compute samples bounded by their stack top",
        compute.to_top,
        compute.samples
    );
    assert!(mean(compute.bytes, compute.samples) <= MAX_STACK_BYTES as f64);
    // Complete stacks end where the unwind info says threads and processes start.
    for name in outer_names.keys() {
        assert!(
            ["clone3", "__clone3", "_start", "clone", "__clone"].contains(&name.as_str()),
            "outermost frame {name}: {outer_names:?}"
        );
    }
    // The innermost frames are ggml's and llama's compute functions.
    eprintln!(
        "compute leaves: {} ({resolved} named by the module's symbols, {named} of them ggml/llama \
         functions: {:.1} %)",
        leaves.len(),
        pct(named, resolved)
    );
    assert!(
        pct(resolved, leaves.len() as u64) >= 80.0,
        "{resolved} of {} compute leaves named: {top_leaves:?}",
        leaves.len()
    );
    assert!(
        pct(named, resolved) >= 95.0,
        "{named} of {resolved} named compute leaves are ggml/llama functions: {top_leaves:?}"
    );
    let c = probes.counters();
    assert_eq!(c.get(counter::SAMPLE_FAILED), 0);
    assert_eq!(c.get(counter::SAMPLE_RING_FULL), 0);
}
