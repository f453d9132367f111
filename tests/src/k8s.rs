//! Kubernetes support of the tests: the manifests' schema validator (PyPI
//! `kubernetes-validate` in its own venv), YAML reading through that venv's PyYAML, the agent's
//! capability set as the DaemonSet grants it, and a kubelet-shaped cgroup v2 hierarchy to run a
//! server in.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// Capabilities the DaemonSet adds (and drops everything else), in `capabilities.add` spelling.
/// `k8s_manifests` checks the manifest lists exactly these; `k8s_capabilities` runs the agent
/// with exactly these.
pub const AGENT_CAPABILITIES: &[&str] = &[
    "BPF",
    "PERFMON",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "CHECKPOINT_RESTORE",
    "SYS_RESOURCE",
];

/// Kubernetes versions the manifests are validated against: the oldest they support (1.30
/// added `securityContext.appArmorProfile`) and the newest the validator ships.
pub const VALIDATE_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// `deploy/kubernetes`.
pub fn manifests_dir() -> PathBuf {
    crate::paths::workspace_root().join("deploy/kubernetes")
}

/// The venv `cargo xtask setup` installs `kubernetes-validate` into
/// (`INFERTAP_K8S_VENV` or `~/.cache/infertap/kubernetes-validate`).
pub fn validator_venv() -> PathBuf {
    if let Some(p) = std::env::var_os("INFERTAP_K8S_VENV") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/infertap/kubernetes-validate")
}

/// The `kubernetes-validate` executable, if installed.
pub fn validator() -> Result<PathBuf> {
    let bin = validator_venv().join("bin/kubernetes-validate");
    if !bin.is_file() {
        bail!(
            "kubernetes-validate not installed at {} (run `cargo xtask setup`)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Runs the validator (`--strict`: unknown fields are errors) on `files` against `version`;
/// returns its output, or an error with it when any document fails.
pub fn validate(files: &[PathBuf], version: &str) -> Result<String> {
    let out = Command::new(validator()?)
        .args(["--strict", "--kubernetes-version", version])
        .args(files)
        .output()
        .context("running kubernetes-validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("kubernetes-validate -k {version} failed:\n{text}");
    }
    Ok(text)
}

/// Every YAML document of `path` as JSON (PyYAML of the validator's venv, which the
/// validator itself parses with).
pub fn yaml_documents(path: &Path) -> Result<Vec<serde_json::Value>> {
    let python = validator_venv().join("bin/python");
    let out = Command::new(&python)
        .args([
            "-c",
            "import sys, json, yaml\n\
             print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
        ])
        .arg(path)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "reading {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one), if any.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

/// A pod's container cgroup as the kubelet (systemd driver) and containerd create it:
/// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`
/// under the cgroup v2 root. Processes moved into it are moved back to the root and the
/// directories removed on drop.
pub struct PodCgroup {
    root: PathBuf,
    /// Created directories, outermost first.
    dirs: Vec<PathBuf>,
    pub pod_uid: String,
    pub container_id: String,
}

impl PodCgroup {
    /// Creates the hierarchy for `pod_uid` / `container_id` (parents that exist are kept).
    pub fn create(pod_uid: &str, container_id: &str) -> Result<Self> {
        let root = cgroup2_root().context("no cgroup2 mount")?;
        let u = pod_uid.replace('-', "_");
        let rel = [
            "kubepods.slice".to_owned(),
            "kubepods-burstable.slice".to_owned(),
            format!("kubepods-burstable-pod{u}.slice"),
            format!("cri-containerd-{container_id}.scope"),
        ];
        let mut dirs = Vec::new();
        let mut p = root.clone();
        for r in rel {
            p = p.join(r);
            if !p.exists() {
                std::fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))?;
                dirs.push(p.clone());
            }
        }
        Ok(PodCgroup {
            root,
            dirs,
            pod_uid: pod_uid.to_owned(),
            container_id: container_id.to_owned(),
        })
    }

    /// The container cgroup's directory.
    pub fn leaf(&self) -> PathBuf {
        let u = self.pod_uid.replace('-', "_");
        self.root
            .join("kubepods.slice/kubepods-burstable.slice")
            .join(format!("kubepods-burstable-pod{u}.slice"))
            .join(format!("cri-containerd-{}.scope", self.container_id))
    }

    /// Moves a process (all its threads) into the container cgroup.
    pub fn add(&self, pid: u32) -> Result<()> {
        let procs = self.leaf().join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving {pid} into {}", procs.display()))
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let leaf = self.leaf();
        if let Ok(text) = std::fs::read_to_string(leaf.join("cgroup.procs")) {
            for pid in text.lines() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}
