//! Prerequisites of end-to-end tests. Locally a missing prerequisite skips the test with a
//! printed reason; in CI (`CI` set to anything but `false`/`0`) it fails the test, so a broken
//! CI machine can never pass by skipping.

use std::io::Write;

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Returns true when the test may go on. On a missing prerequisite: panics in CI, otherwise
/// prints `SKIP <test>: <reason>` straight to stderr (bypassing the test harness' capture, so it
/// shows even for a passing test) and returns false.
pub fn check(test: &str, missing: Option<String>) -> bool {
    let Some(reason) = missing else { return true };
    if in_ci() {
        panic!("{test}: prerequisite missing in CI: {reason}");
    }
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
    false
}

pub fn missing_root() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    (euid != 0).then(|| format!("needs root for eBPF (euid {euid})"))
}

pub fn missing_agent() -> Option<String> {
    crate::paths::agent_binary().err().map(|e| format!("{e:#}"))
}

pub fn missing_collector() -> Option<String> {
    crate::paths::collector_binary()
        .err()
        .map(|e| format!("{e:#}"))
}

pub fn missing_real_server() -> Option<String> {
    crate::paths::real_server_parts()
        .err()
        .map(|e| format!("{e:#}"))
}

pub fn missing_python() -> Option<String> {
    match std::process::Command::new("python3")
        .arg("--version")
        .output()
    {
        Ok(o) if o.status.success() => None,
        _ => Some("python3 not found".into()),
    }
}

/// Standard gate for agent tests: root, the agent binary and python3.
/// Usage: `if !infertap_tests::prereq::agent_test("name") { return; }`
pub fn agent_test(test: &str) -> bool {
    check(test, missing_root()) && check(test, missing_agent()) && check(test, missing_python())
}

/// Serializes end-to-end tests inside one test binary: they measure timing and share 2 cores.
pub fn e2e_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
