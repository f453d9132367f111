//! Builds and locates the injection library (`libinfertap_cupti.so`) for these tests.

use std::path::PathBuf;
use std::process::Command;

/// Builds the cdylib with cargo (a no-op when fresh) into its own target dir next to the test
/// binary's, so the outer cargo's build lock is not contended, and returns its path.
pub fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    let profile = exe.parent().and_then(|d| d.parent()).expect("profile dir");
    let target = profile.join("cupti-cdylib");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "infertap-cupti", "--lib"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the injection library failed");
    let built = target.join("debug/libinfertap_cupti.so");
    assert!(built.exists(), "{built:?} missing after build");
    built
}
