//! The agent's identity towards the collector: `--agent-id NAME`, or an id generated once and
//! kept in `<state-dir>/agent-id`, so a restarted agent keeps its series (same `agent` label)
//! instead of starting new ones. Its random per-process `instance_id` still tells restarts
//! apart for the collector's exactly-once dedupe.
//!
//! When the state directory cannot be read or written (read-only root, no permission), the id
//! falls back, with a warning, to one derived from `/etc/machine-id` (or the node name): still
//! stable across restarts on that machine, but shared by every agent on it that also falls
//! back. Two agents on one node that send to the same collector need distinct `--agent-id`s
//! or state directories, or their series merge.

use std::hash::{BuildHasher as _, Hasher as _};
use std::io::Write as _;
use std::path::Path;

/// Default `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/infertap";
const ID_FILE: &str = "agent-id";

/// Longest id accepted from the file (the collector clamps label values at 128 bytes).
const MAX_ID_LEN: usize = 64;

fn valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A fresh random id: 16 hex digits.
fn random_id() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// A stable id from the machine (FNV-1a of `/etc/machine-id`, else of the node name).
fn machine_id(node: &str) -> String {
    let seed = std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| node.to_owned());
    let mut x: u64 = 0xcbf29ce484222325;
    for b in seed.bytes() {
        x ^= u64::from(b);
        x = x.wrapping_mul(0x100000001b3);
    }
    format!("m{x:015x}")
}

/// Reads the persisted id from `dir`, creating it (atomically: temp file + rename) if missing.
pub fn persisted_id(dir: &Path) -> std::io::Result<String> {
    let path = dir.join(ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if valid(s.trim()) => return Ok(s.trim().to_owned()),
        Ok(s) => {
            tracing::warn!(path = %path.display(), content = %s.chars().take(80).collect::<String>(), "agent id file is not a valid id; writing a new one")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)?;
    let id = random_id();
    let tmp = dir.join(format!("{ID_FILE}.tmp.{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{id}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    tracing::info!(path = %path.display(), %id, "generated this agent's id");
    Ok(id)
}

/// The agent id to announce: `explicit`, else the persisted one, else the machine-derived one.
pub fn agent_id(explicit: Option<&str>, state_dir: &Path, node: &str) -> String {
    if let Some(id) = explicit.filter(|s| !s.trim().is_empty()) {
        return id.trim().to_owned();
    }
    match persisted_id(state_dir) {
        Ok(id) => id,
        Err(e) => {
            let id = machine_id(node);
            tracing::warn!(dir = %state_dir.display(), %id, "cannot keep the agent id in --state-dir ({e}); using one derived from the machine instead (pass --agent-id to choose)");
            id
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent_id(None, dir.path(), "n");
        assert!(valid(&a), "{a}");
        assert_eq!(
            agent_id(None, dir.path(), "n"),
            a,
            "same id after a restart"
        );
        assert_eq!(agent_id(Some("vllm-0"), dir.path(), "n"), "vllm-0");
        std::fs::write(dir.path().join(ID_FILE), "bad id with spaces\n").unwrap();
        let b = agent_id(None, dir.path(), "n");
        assert!(valid(&b) && b != a);
    }

    #[test]
    fn unwritable_dir_falls_back_to_a_stable_machine_id() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let a = agent_id(None, &file.join("sub"), "node-1");
        assert_eq!(a, agent_id(None, &file.join("sub"), "node-1"));
        assert!(a.starts_with('m'));
    }
}
