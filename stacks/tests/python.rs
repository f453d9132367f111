//! Native stacks of the real CPython 3.11 (pyenv's shared libpython, `-O3 -g`, no frame
//! pointers): stopped in `time.sleep`, in a bytecode loop, in a C loop (`_sre`), and on a
//! `threading.Thread`; unwound from a kernel-style sample and checked against gdb.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use infertap_stacks::symbolize::{Symbolizer, SymbolizerConfig};
use infertap_stacks::unwind::{UnwindConfig, UnwindOutcome, Unwinder};

const PYTHON: &str = "/root/.pyenv/versions/3.11.7/bin/python3.11";

fn python_prereqs(test: &str) -> bool {
    native_prereqs(test)
        && prereq(
            test,
            (!Path::new(PYTHON).is_file()).then(|| format!("{PYTHON} not installed")),
        )
}

/// Runs `script` until it prints `ready`, lets it settle, stops it.
fn start_python(script: &str) -> Target {
    let mut t = Target::spawn(Command::new(PYTHON).args(["-c", script]));
    t.wait_line("ready");
    std::thread::sleep(Duration::from_millis(200));
    stop(t.pid());
    t
}

/// Unwinds every thread of the stopped process, checks each against gdb, and returns the
/// physical function names per thread.
fn check_all_threads(pid: u32, ctx: &str) -> Vec<(u32, Vec<String>)> {
    let gdb = gdb_backtraces(pid);
    let mut u = Unwinder::new(UnwindConfig::default());
    let mut s = Symbolizer::new(SymbolizerConfig::default());
    let mut out = Vec::new();
    for cap in capture_all(pid) {
        let ctx = format!("{ctx} tid {}", cap.tid);
        let (stack, syms) = unwind_and_symbolize(&mut u, &mut s, pid, &cap);
        let lines = assert_matches_gdb(
            &ctx,
            &stack,
            &syms,
            &gdb[&cap.tid],
            false,
            Some(Path::new("/")),
        );
        // libpython and libc (libc6-dbg) have DWARF: most frames' lines are checked.
        assert!(
            lines * 2 >= stack.frames.len(),
            "{ctx}: only {lines} lines compared"
        );
        assert_eq!(
            stack.outcome,
            UnwindOutcome::Complete,
            "{ctx}\n{}",
            describe(&stack, &syms)
        );
        assert_eq!(stack.guessed_frames, 0, "{ctx}");
        let names: Vec<String> = syms
            .iter()
            .map(|fs| fs.last().unwrap().function.clone())
            .collect();
        let want_end: &[&str] = if cap.tid == pid {
            // python's main() tail-calls Py_BytesMain, so main itself is not on the stack.
            &[
                "Py_BytesMain",
                "__libc_start_call_main",
                "__libc_start_main_impl",
                "_start",
            ]
        } else {
            &["start_thread", "clone3"]
        };
        assert!(
            names.ends_with(&want_end.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            "{ctx}: {names:?}"
        );
        out.push((cap.tid, names));
    }
    out
}

fn count(names: &[String], f: &str) -> usize {
    names.iter().filter(|n| *n == f).count()
}

#[test]
fn python311_in_time_sleep_unwinds_to_main() {
    if !python_prereqs("python311_in_time_sleep_unwinds_to_main") {
        return;
    }
    let script = "import time\n\
def inner():\n    print('ready', flush=True)\n    time.sleep(1000)\n\
def middle():\n    inner()\n\
def outer():\n    middle()\n\
outer()\n";
    let t = start_python(script);
    let threads = check_all_threads(t.pid(), "sleep");
    let (_, names) = &threads[0];
    assert!(names.iter().any(|n| n == "time_sleep"), "{names:?}");
    // 3.11 runs Python-to-Python calls in one eval loop invocation: one C frame for the
    // module and its three functions.
    assert!(count(names, "_PyEval_EvalFrameDefault") >= 1, "{names:?}");
    for f in [
        "time_sleep",
        "PyEval_EvalCode",
        "PyRun_SimpleStringFlags",
        "Py_RunMain",
    ] {
        assert!(names.iter().any(|n| n == f), "{f} missing: {names:?}");
    }
}

#[test]
fn python311_in_a_bytecode_loop() {
    if !python_prereqs("python311_in_a_bytecode_loop") {
        return;
    }
    let script =
        "def spin():\n    print('ready', flush=True)\n    x = 0\n    while True:\n        x += 1\n\
def outer():\n    spin()\n\
outer()\n";
    let t = start_python(script);
    let pid = t.pid();
    // Several stop points inside the eval loop.
    for round in 0..4 {
        let threads = check_all_threads(pid, &format!("bytecode round {round}"));
        let (_, names) = &threads[0];
        assert!(count(names, "_PyEval_EvalFrameDefault") >= 1, "{names:?}");
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(37));
        stop(pid);
    }
}

#[test]
fn python311_in_a_c_loop() {
    if !python_prereqs("python311_in_a_c_loop") {
        return;
    }
    // Catastrophic backtracking: the thread stays in _sre's C matcher.
    let script = "import re\n\
def work():\n    print('ready', flush=True)\n    re.match(r'(a*)*b', 'a' * 64)\n\
work()\n";
    let t = start_python(script);
    let threads = check_all_threads(t.pid(), "sre");
    let (_, names) = &threads[0];
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("sre_ucs1_match") || n.starts_with("sre_")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "_PyEval_EvalFrameDefault"),
        "{names:?}"
    );
}

#[test]
fn python311_thread_unwinds_to_thread_start() {
    if !python_prereqs("python311_thread_unwinds_to_thread_start") {
        return;
    }
    let script = "import threading, time\n\
def worker():\n    print('ready', flush=True)\n    time.sleep(1000)\n\
t = threading.Thread(target=worker)\nt.start()\nt.join()\n";
    let t = start_python(script);
    let threads = check_all_threads(t.pid(), "thread");
    assert_eq!(threads.len(), 2);
    let (_, worker) = threads.iter().find(|(tid, _)| *tid != t.pid()).unwrap();
    assert!(worker.iter().any(|n| n == "thread_run"), "{worker:?}");
    assert!(worker.iter().any(|n| n == "time_sleep"), "{worker:?}");
    assert!(
        worker.iter().any(|n| n == "_PyEval_EvalFrameDefault"),
        "{worker:?}"
    );
}
