//! Discovery of interpreters laid out as they are in the field: a venv, a distribution's
//! statically linked `python3` (Debian's: no `.symtab`, symbols only in `.dynsym`), and a
//! `libpython` deleted while it is mapped (an upgraded package, a container layer gone),
//! which is only reachable through `/proc/<pid>/map_files`. Each is then walked and resolved,
//! and checked against py-spy.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use infertap_stacks::python::mem::ProcMem;
use infertap_stacks::python::stop::Stopped;
use infertap_stacks::python::walk;
use infertap_stacks::python::{discover, Resolver};

/// Runs chain.py under `cmd`, checks discovery, then the main thread's exact stack against the
/// script's markers and py-spy.
fn check_chain(what: &str, mut cmd: Command, minor: u8, binary_contains: &str) {
    let script = support::support_file("chain.py");
    let at = support::markers(&script);
    let child = cmd
        .arg(&script)
        .arg("10")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let child = support::Script::wait_ready(child);
    let pid = child.pid();
    std::thread::sleep(std::time::Duration::from_millis(200));

    let p = discover(pid).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!((p.version.major, p.version.minor), (3, minor), "{what}");
    assert!(
        p.binary.to_string_lossy().contains(binary_contains),
        "{what}: found the interpreter in {}",
        p.binary.display()
    );
    let proc = p.py_proc();
    let stopped = Stopped::attach(pid).unwrap();
    let mem = ProcMem::open(pid).unwrap();
    let w = walk::walk(&mem, &proc, stopped.thread(pid).unwrap().tid);
    assert_eq!(w.flags, 0, "{what}: {w:?}");
    let mut r = Resolver::default();
    r.add_process(&p).unwrap();
    let got: Vec<(String, Option<u32>)> = w
        .frames
        .iter()
        .map(|f| {
            let loc = r.resolve(pid, *f).unwrap();
            (
                r.function(loc.function).unwrap().qualname.to_string(),
                loc.line,
            )
        })
        .collect();
    let method = if minor == 10 {
        "method"
    } else {
        "Klass.method"
    };
    assert_eq!(
        got,
        [
            ("inner".to_string(), Some(at["inner"])),
            (method.to_string(), Some(at["method"])),
            ("outer".to_string(), Some(at["outer"])),
            ("<module>".to_string(), Some(at["main"])),
        ],
        "{what}"
    );

    let config = py_spy::Config {
        blocking: py_spy::config::LockingStrategy::NonBlocking,
        ..Default::default()
    };
    let mut spy = py_spy::PythonSpy::new(pid as py_spy::Pid, &config)
        .unwrap_or_else(|e| panic!("{what}: py-spy: {e:#}"));
    assert_eq!(spy.addresses.interpreter_address as u64, p.interp, "{what}");
    let trace = spy
        .get_stack_traces()
        .unwrap()
        .into_iter()
        .find(|t| {
            t.os_thread_id == Some(pid as u64)
                || t.frames.first().is_some_and(|f| f.name == "inner")
        })
        .expect("py-spy sees the main thread");
    let theirs: Vec<(String, Option<u32>)> = trace
        .frames
        .iter()
        .map(|f| (f.name.clone(), Some(f.line as u32)))
        .collect();
    assert_eq!(got, theirs, "{what}: py-spy");
    eprintln!("{what}: CPython {} in {}", p.version, p.binary.display());
}

#[test]
fn venv_interpreter() {
    const TEST: &str = "venv_interpreter";
    if !support::require_root(TEST) {
        return;
    }
    let Some(interp) = support::interpreter("3.12.1", 12) else {
        support::skip(TEST, "pyenv 3.12.1 not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let venv = dir.path().join("venv");
    let ok = Command::new(interp.python())
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(ok.success());
    check_chain(
        "venv",
        Command::new(venv.join("bin/python")),
        12,
        "libpython3.12",
    );
}

#[test]
fn distribution_static_python() {
    const TEST: &str = "distribution_static_python";
    if !support::require_root(TEST) {
        return;
    }
    // Debian's python3.11 links libpython statically and strips .symtab.
    let python = Path::new("/usr/bin/python3.11");
    if !python.exists() {
        support::skip(TEST, "/usr/bin/python3.11 not installed");
        return;
    }
    check_chain(
        "debian python3.11",
        Command::new(python),
        11,
        "/usr/bin/python3.11",
    );
}

#[test]
fn deleted_libpython_is_read_through_map_files() {
    const TEST: &str = "deleted_libpython_is_read_through_map_files";
    if !support::require_root(TEST) {
        return;
    }
    let Some(interp) = support::interpreter("3.13.0", 13) else {
        support::skip(TEST, "pyenv 3.13.0 not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libpython3.13.so.1.0");
    std::fs::copy(interp.root.join("lib/libpython3.13.so.1.0"), &lib).unwrap();
    let mut cmd = Command::new(interp.python());
    cmd.env("LD_LIBRARY_PATH", dir.path());
    // Delete the copy once the loader has mapped it: the wrapper waits for the file to be
    // gone before running the script, so discovery only ever sees a deleted mapping.
    let gate = dir.path().join("gate.py");
    std::fs::write(
        &gate,
        format!(
            "import os, runpy, sys\nos.unlink({:?})\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n",
            lib.to_str().unwrap()
        ),
    )
    .unwrap();
    cmd.arg(&gate);
    // runpy adds its own frames below <module>; check discovery and the deleted mapping here,
    // the exact stack through check_chain's markers would include them, so check directly.
    let script = support::support_file("chain.py");
    let child = cmd
        .arg(&script)
        .arg("10")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let child = support::Script::wait_ready(child);
    let pid = child.pid();
    assert!(!lib.exists());
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.lines()
            .any(|l| l.contains("libpython3.13.so.1.0 (deleted)")),
        "the copy is mapped and deleted"
    );
    let p = discover(pid).unwrap_or_else(|e| panic!("deleted libpython: {e}"));
    assert_eq!(p.version.minor, 13);
    assert!(
        p.binary.to_string_lossy().ends_with("(deleted)"),
        "{}",
        p.binary.display()
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let stopped = Stopped::attach(pid).unwrap();
    let mem = ProcMem::open(pid).unwrap();
    let w = walk::walk(&mem, &p.py_proc(), stopped.thread(pid).unwrap().tid);
    let mut r = Resolver::default();
    r.add_process(&p).unwrap();
    let names: Vec<String> = w
        .frames
        .iter()
        .map(|f| {
            let loc = r.resolve(pid, *f).unwrap();
            r.function(loc.function).unwrap().qualname.to_string()
        })
        .collect();
    assert_eq!(names[..4], ["inner", "Klass.method", "outer", "<module>"]);
    assert!(names.iter().any(|n| n == "run_path"), "{names:?}");
}
