//! External reference tools the profile tests check against: `go tool pprof` (Debian
//! `golang-go`) reading our pprof output, headless Chromium (Debian `chromium`) loading the
//! collector's page, and the per-test artefacts folder (`target/test-artifacts/<test>/`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Why `go tool pprof` cannot run here, if it cannot.
pub fn missing_go() -> Option<String> {
    match Command::new("go").arg("version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("`go` not found (Debian golang-go; `cargo xtask setup` installs it)".into()),
    }
}

/// The Chromium binary, if installed.
pub fn chromium_binary() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        })
}

/// Why headless Chromium cannot run here, if it cannot.
pub fn missing_chromium() -> Option<String> {
    chromium_binary()
        .is_none()
        .then(|| "chromium not found (Debian chromium; `cargo xtask setup` installs it)".into())
}

/// Runs `go tool pprof <args> <file>` and returns its stdout (stderr on failure in the error).
pub fn go_pprof(args: &[&str], file: &Path) -> anyhow::Result<String> {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(file)
        // pprof must not try to reach a symbol server or open a browser.
        .env("PPROF_TOOLS", "")
        .env("PPROF_BINARY_PATH", "/nonexistent")
        .env("HOME", std::env::temp_dir())
        .output()
        .context("running go tool pprof")?;
    if !out.status.success() {
        bail!(
            "go tool pprof {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `target/test-artifacts/<test>/`, created.
pub fn artifacts_dir(test: &str) -> anyhow::Result<PathBuf> {
    let d = crate::paths::target_dir().join("test-artifacts").join(test);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

fn chromium(
    extra: &[String],
    url: &str,
    timeout: Duration,
) -> anyhow::Result<std::process::Output> {
    let bin = chromium_binary().context("chromium not installed")?;
    let profile = tempfile::tempdir()?;
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting chromium")?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "chromium did not finish within {timeout:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The DOM of `url` after its scripts ran (`--dump-dom`), with Chromium's console messages
/// (stderr) second.
pub fn chromium_dump_dom(url: &str) -> anyhow::Result<(String, String)> {
    let out = chromium(
        &[
            "--dump-dom".into(),
            "--virtual-time-budget=3000".into(),
            "--enable-logging=stderr".into(),
            "--v=0".into(),
        ],
        url,
        Duration::from_secs(90),
    )?;
    anyhow::ensure!(
        out.status.success(),
        "chromium --dump-dom failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A PNG screenshot of `url` at `width`×`height` into `path`.
pub fn chromium_screenshot(url: &str, path: &Path, width: u32, height: u32) -> anyhow::Result<()> {
    let out = chromium(
        &[
            format!("--screenshot={}", path.display()),
            format!("--window-size={width},{height}"),
            "--virtual-time-budget=3000".into(),
        ],
        url,
        Duration::from_secs(90),
    )?;
    anyhow::ensure!(
        out.status.success() && path.is_file(),
        "chromium --screenshot failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
