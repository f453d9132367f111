//! Bad input on real processes: a non-Python process, unsupported interpreters, a process that
//! exits while being read, and garbage addresses. Every case is an error value (or a walk
//! flag), never a panic, a hang or an unbounded read.

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use infertap_common::profile::{sample_flags, PyFrame, PY_FRAME_ENTRY};
use infertap_stacks::python::code::CodeReader;
use infertap_stacks::python::mem::{Memory, ProcMem, ReadError};
use infertap_stacks::python::stop::Stopped;
use infertap_stacks::python::walk;
use infertap_stacks::python::{discover, DiscoverError, ResolveError, Resolver};

const SLEEPER: &str =
    "import sys, time\nsys.stdout.write('ready\\n')\nsys.stdout.flush()\ntime.sleep(120)\n";

fn sleeper(python: &std::path::Path) -> support::Script {
    let child = Command::new(python)
        .args(["-c", SLEEPER])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    support::Script::wait_ready(child)
}

#[test]
fn non_python_and_unsupported_processes_are_refused_with_a_reason() {
    const TEST: &str = "non_python_and_unsupported_processes_are_refused_with_a_reason";
    if !support::require_root(TEST) {
        return;
    }
    let mut sleep = Command::new("sleep").arg("60").spawn().unwrap();
    match discover(sleep.id()) {
        Err(e @ DiscoverError::NotPython) => assert_eq!(e.reason(), "not_python"),
        other => panic!("sleep: {other:?}"),
    }
    let _ = sleep.kill();
    let _ = sleep.wait();
    // Reaped: the pid is gone.
    assert!(matches!(discover(sleep.id()), Err(DiscoverError::Gone)));

    // Older interpreters, when installed: refused and named.
    for (version, bin, named) in [
        ("3.9.18", "python3.9", "3.9"),
        ("3.6.15", "python3.6", "3.6"),
        ("2.7.18", "python2.7", "2.7"),
    ] {
        let python = support::pyenv_root().join(version).join("bin").join(bin);
        if !python.exists() {
            support::skip(&format!("{TEST}[{version}]"), "not installed");
            continue;
        }
        let s = sleeper(&python);
        match discover(s.pid()) {
            Err(e @ DiscoverError::Unsupported { .. }) => {
                assert_eq!(e.reason(), "unsupported_version");
                assert_eq!(e.to_string(), format!("unsupported CPython {named}"));
            }
            other => panic!("{version}: {other:?}"),
        }
    }
}

#[test]
fn a_process_exiting_mid_read_gives_errors_not_panics() {
    const TEST: &str = "a_process_exiting_mid_read_gives_errors_not_panics";
    if !support::require_root(TEST) {
        return;
    }
    for interp in support::interpreters(TEST) {
        let v = interp.version;
        let mut child = support::Script::start(
            &interp.python(),
            &support::support_file("chain.py"),
            &["20"],
        );
        let pid = child.pid();
        std::thread::sleep(Duration::from_millis(200));
        let p = discover(pid).unwrap();
        let proc = p.py_proc();
        let keys: Vec<_> = {
            let s = Stopped::attach(pid).unwrap();
            s.threads().iter().map(|t| t.tid).collect()
        };

        // A reader hammering the process (walk + cold resolution) while it is killed.
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            let p = p.clone();
            std::thread::spawn(move || {
                let mem = ProcMem::open(pid).unwrap();
                let (mut ok, mut failed_walks, mut failed_resolves) = (0u64, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    // The walk reads through an fd opened before the exit; the resolver opens
                    // the memory anew (which fails once the process is gone).
                    let walks: Vec<_> = keys.iter().map(|k| walk::walk(&mem, &proc, *k)).collect();
                    failed_walks += walks
                        .iter()
                        .filter(|w| w.flags & sample_flags::PY_ERROR != 0)
                        .count() as u64;
                    let mut r = Resolver::default();
                    if r.add_process(&p).is_err() {
                        failed_resolves += 1;
                        continue;
                    }
                    for f in walks.iter().flat_map(|w| &w.frames) {
                        match r.resolve(pid, *f) {
                            Ok(_) => ok += 1,
                            Err(_) => failed_resolves += 1,
                        }
                    }
                }
                (ok, failed_walks, failed_resolves)
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        child.kill();
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let (ok, failed_walks, _) = reader.join().expect("reader thread must not panic");
        assert!(ok > 0, "{v}: resolved nothing before the kill");
        assert!(failed_walks > 0, "{v}: walks after the exit must fail");

        // After exit: every entry point reports an error.
        let mem = ProcMem::open(pid);
        assert!(mem.is_err(), "{v}: /proc/{pid}/mem of a reaped process");
        assert!(matches!(discover(pid), Err(DiscoverError::Gone)), "{v}");
        let mut r = Resolver::default();
        assert!(r.add_process(&p).is_err());
        let frame = PyFrame {
            code: p.code_type,
            instr: 0,
        };
        assert_eq!(
            r.resolve(pid, frame),
            Err(ResolveError::UnknownProcess(pid))
        );
    }
}

#[test]
fn garbage_addresses_are_bounded_errors() {
    const TEST: &str = "garbage_addresses_are_bounded_errors";
    if !support::require_root(TEST) {
        return;
    }
    for interp in support::interpreters(TEST) {
        let v = interp.version;
        let child = support::Script::start(
            &interp.python(),
            &support::support_file("chain.py"),
            &["20"],
        );
        let pid = child.pid();
        std::thread::sleep(Duration::from_millis(200));
        let p = discover(pid).unwrap();
        let proc = p.py_proc();
        let mem = ProcMem::open(pid).unwrap();
        let main = walk::walk(
            &mem,
            &proc,
            Stopped::attach(pid).unwrap().thread(pid).unwrap().tid,
        );
        let real = main.frames[0];
        let mut r = Resolver::default();
        r.add_process(&p).unwrap();
        r.resolve(pid, real).unwrap();

        let mut at = |code: u64, instr: u64| r_resolve(&mut r, pid, code, instr);
        fn r_resolve(r: &mut Resolver, pid: u32, code: u64, instr: u64) -> ResolveError {
            r.resolve(pid, PyFrame { code, instr }).unwrap_err()
        }
        // Null, unmapped, kernel-half and wrapping addresses.
        assert!(
            matches!(at(0, 0), ResolveError::Read(ReadError::Unreadable { .. })),
            "{v}"
        );
        assert!(matches!(at(8, 0), ResolveError::Read(_)), "{v}");
        assert!(matches!(
            at(0x7fff_ffff_ffff_fff8 | PY_FRAME_ENTRY, 0),
            ResolveError::Read(ReadError::BadAddress { .. })
        ));
        // Real objects of the wrong type: the interpreter state, a type object, a string.
        assert!(
            matches!(
                at(p.interp, 0),
                ResolveError::WrongType { what: "code", .. }
            ),
            "{v}"
        );
        assert!(
            matches!(at(p.code_type, 0), ResolveError::WrongType { .. }),
            "{v}"
        );
        assert!(matches!(
            at(real.code_addr() + 8, 0),
            ResolveError::WrongType { .. } | ResolveError::Read(_)
        ));
        // A real code object with an instruction that cannot be in it.
        assert!(
            matches!(
                at(real.code_addr(), real.instr ^ 0x4000_0000),
                ResolveError::InstrOutOfRange { .. }
            ),
            "{v}"
        );
        let reader = CodeReader::new(ProcMem::open(pid).unwrap(), &p);
        assert!(matches!(
            reader.read_str(real.code_addr(), 100),
            Err(ResolveError::WrongType { what: "str", .. })
        ));
        assert!(matches!(
            reader.read_bytes(p.interp, 100),
            Err(ResolveError::WrongType { what: "bytes", .. })
        ));
        let code = reader.read_code(real.code_addr()).unwrap();
        assert_eq!(code.qualname, "inner");
        // Length limits are enforced before anything is read.
        let qual_field = p.layout.code_qualname.unwrap_or(p.layout.code_name);
        let name_addr = mem.read_u64(real.code_addr() + qual_field).unwrap();
        assert_eq!(reader.read_str(name_addr, 64).unwrap(), "inner");
        assert!(matches!(
            reader.read_str(name_addr, 3),
            Err(ResolveError::Malformed { .. })
        ));

        // The walker pointed at garbage interpreters: fast and bounded, whatever it finds.
        let key = pid;
        let t0 = Instant::now();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut outcomes = [0usize; 3];
        for i in 0..2000u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut bad = proc;
            bad.interp = match i % 4 {
                0 => seed,
                1 => p.interp + (seed % 4096) * 8,
                2 => real.code_addr() + (seed % 512) * 8,
                _ => p.code_type + (seed % 512) * 8,
            };
            let w = walk::walk(&mem, &bad, key);
            assert!(w.frames.len() <= infertap_common::profile::MAX_PY_FRAMES);
            if w.flags & sample_flags::PY_ERROR != 0 {
                outcomes[0] += 1;
            } else if w.flags & sample_flags::PY_NO_THREAD != 0 {
                outcomes[1] += 1;
            } else {
                outcomes[2] += 1;
            }
        }
        let elapsed = t0.elapsed();
        assert!(elapsed < Duration::from_secs(20), "{v}: {elapsed:?}");
        eprintln!(
            "{v}: 2000 garbage interpreters: {} read errors, {} no thread, {} other, {elapsed:?}",
            outcomes[0], outcomes[1], outcomes[2]
        );
        drop(child);
    }
}
