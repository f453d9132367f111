//! Shared helpers of the stacks crate's integration tests: prerequisites (SKIP locally, fail in
//! CI, as `tests/src/prereq.rs` does for the end-to-end suite), the pyenv interpreters, and
//! Python scripts run as child processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Prints `SKIP <test>: <reason>` (panics in CI, where a missing prerequisite is a failure).
pub fn skip(test: &str, reason: &str) {
    if in_ci() {
        panic!("{test}: prerequisite missing in CI: {reason}");
    }
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
}

/// Reading another process's memory and ptrace need root (or a child of ours with
/// `ptrace_scope` ≤ 1); the suite runs as root.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "needs root (ptrace, /proc/<pid>/mem)");
        return false;
    }
    true
}

/// One pyenv CPython.
#[derive(Clone, Debug)]
pub struct Interp {
    pub version: &'static str,
    pub minor: u8,
    pub root: PathBuf,
}

impl Interp {
    pub fn python(&self) -> PathBuf {
        self.root.join(format!("bin/python3.{}", self.minor))
    }
    pub fn include(&self) -> PathBuf {
        self.root.join(format!("include/python3.{}", self.minor))
    }
}

/// The interpreters the tests cover.
pub const VERSIONS: [(&str, u8); 4] = [
    ("3.10.13", 10),
    ("3.11.7", 11),
    ("3.12.1", 12),
    ("3.13.0", 13),
];

pub fn pyenv_root() -> PathBuf {
    std::env::var_os("INFERTAP_PYENV_VERSIONS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.pyenv/versions"))
}

/// A pyenv interpreter by version string, `None` when not installed.
pub fn interpreter(version: &'static str, minor: u8) -> Option<Interp> {
    let i = Interp {
        version,
        minor,
        root: pyenv_root().join(version),
    };
    i.python().exists().then_some(i)
}

/// The installed interpreters among [`VERSIONS`], with a SKIP line for each missing one.
pub fn interpreters(test: &str) -> Vec<Interp> {
    VERSIONS
        .iter()
        .filter_map(|&(v, m)| {
            let i = interpreter(v, m);
            if i.is_none() {
                skip(
                    &format!("{test}[{v}]"),
                    &format!("{} not installed", pyenv_root().join(v).display()),
                );
            }
            i
        })
        .collect()
}

pub fn support_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python_support")
        .join(name)
}

/// A child process killed (and reaped) on drop.
pub struct Script {
    pub child: Child,
    pub stdout: BufReader<ChildStdout>,
}

impl Script {
    /// Starts `python script args…` and waits (≤ 30 s) for it to print `ready`.
    pub fn start(python: &Path, script: &Path, args: &[&str]) -> Script {
        let child = Command::new(python)
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", python.display()));
        Script::wait_ready(child)
    }

    /// Starts any command and waits for `ready` on its stdout.
    pub fn wait_ready(mut child: Child) -> Script {
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut line = String::new();
        loop {
            line.clear();
            let n = stdout.read_line(&mut line).expect("reading child stdout");
            if n == 0 {
                let _ = child.kill();
                panic!("child exited before printing ready: {:?}", child.wait());
            }
            if line.trim() == "ready" {
                break;
            }
            assert!(Instant::now() < deadline, "child never printed ready");
        }
        Script { child, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills and reaps the child.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Line numbers of `# @name` markers in a script.
pub fn markers(script: &Path) -> std::collections::HashMap<String, u32> {
    let src = std::fs::read_to_string(script).expect("reading script");
    src.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let at = l.find("# @")?;
            Some((l[at + 3..].trim().to_string(), i as u32 + 1))
        })
        .collect()
}
