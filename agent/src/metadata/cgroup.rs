//! Container and pod identity from a process's cgroup path (pure parsing, no I/O but
//! [`read_pid`]).
//!
//! The kubelet puts every pod in a cgroup named after its UID and the container runtime puts
//! each container in a child cgroup named after the container id. The shapes differ by cgroup
//! driver and runtime; those recognised (cgroup v2 `0::` lines, or any v1 hierarchy line):
//!
//! | driver / runtime | path |
//! |---|---|
//! | systemd + containerd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` |
//! | systemd + CRI-O | `…/kubepods-pod<uid>.slice/crio-<id>.scope` (`crio-conmon-<id>.scope` is the monitor, not the container) |
//! | systemd + Docker (cri-dockerd) | `…/kubepods-besteffort-pod<uid>.slice/docker-<id>.scope` |
//! | cgroupfs (any runtime) | `/kubepods/burstable/pod<uid>/<id>`, `/kubepods/pod<uid>/<id>` (Guaranteed) |
//! | kind, k3s-in-docker (nested) | the same under a prefix, e.g. `/kubelet.slice/kubelet-kubepods.slice/…` or `/docker/<node id>/kubepods/…` |
//! | plain Docker / Podman (no pod) | `/system.slice/docker-<id>.scope`, `/docker/<id>`, `…/libpod-<id>.scope` |
//!
//! A reader in another cgroup namespace sees the path relative to its own root (`/../../…`):
//! the parser looks at segments, not at the prefix. The innermost container-shaped segment wins
//! (a container that makes its own sub-cgroups stays that container).

use std::fmt;

/// The runtime that named a container's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
    /// A bare id under a cgroupfs pod directory: any CRI runtime.
    Unknown,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Unknown => "unknown",
        }
    }
}

/// What a cgroup path says about the process's container and pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupIds {
    /// Pod UID in its API form (`8a1b…-…`, dashes restored from the systemd slice name).
    pub pod_uid: Option<String>,
    /// Container id as the runtime names it (lower-case hex, usually 64 digits), without the
    /// `containerd://`-style scheme the kubelet's API adds.
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
}

impl CgroupIds {
    pub fn is_empty(&self) -> bool {
        self.pod_uid.is_none() && self.container_id.is_none()
    }
}

impl fmt::Display for CgroupIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pod_uid={} container_id={}",
            self.pod_uid.as_deref().unwrap_or("-"),
            self.container_id.as_deref().unwrap_or("-")
        )
    }
}

/// Container ids are hex; runtimes use 64 digits, some tools 12 or more. Shorter hex runs in a
/// path are not taken for ids.
const MIN_ID_LEN: usize = 12;
const MAX_ID_LEN: usize = 128;

fn is_container_id(s: &str) -> bool {
    (MIN_ID_LEN..=MAX_ID_LEN).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID: a UUID (`8-4-4-4-12` hex). Static pods get a 32-hex hash instead (the config
/// hash), also accepted.
fn normalise_pod_uid(raw: &str) -> Option<String> {
    let s = raw.replace('_', "-").to_ascii_lowercase();
    let groups: Vec<&str> = s.split('-').collect();
    let hex = |g: &str| !g.is_empty() && g.bytes().all(|b| b.is_ascii_hexdigit());
    let uuid = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && hex(g));
    let static_hash = groups.len() == 1 && s.len() == 32 && hex(&s);
    (uuid || static_hash).then_some(s)
}

/// The pod UID of one path segment, if it is a pod cgroup: `pod<uid>` (cgroupfs) or
/// `…kubepods[-<qos>]-pod<uid>.slice` (systemd).
fn pod_segment(seg: &str) -> Option<String> {
    if let Some(rest) = seg.strip_suffix(".slice") {
        let i = rest.rfind("-pod")?;
        if !rest[..i].ends_with("kubepods") && !rest[..i].contains("kubepods-") {
            return None;
        }
        return normalise_pod_uid(&rest[i + 4..]);
    }
    normalise_pod_uid(seg.strip_prefix("pod")?)
}

/// The container of one path segment, if it is a container cgroup. `in_pod`: the segment sits
/// under a pod cgroup, where cgroupfs names containers by their bare id.
fn container_segment(seg: &str, in_pod: bool) -> Option<(String, Runtime)> {
    if let Some(rest) = seg.strip_suffix(".scope") {
        // The CRI-O monitor process's scope is not the container.
        if rest.starts_with("crio-conmon-") {
            return None;
        }
        for (prefix, rt) in [
            ("cri-containerd-", Runtime::Containerd),
            ("crio-", Runtime::CriO),
            ("docker-", Runtime::Docker),
            ("libpod-", Runtime::Podman),
        ] {
            if let Some(id) = rest.strip_prefix(prefix) {
                return is_container_id(id).then(|| (id.to_ascii_lowercase(), rt));
            }
        }
        return None;
    }
    // cgroupfs: `/kubepods/<qos>/pod<uid>/<id>`; CRI-O with cgroupfs: `crio-<id>`.
    if let Some(id) = seg.strip_prefix("crio-") {
        return is_container_id(id).then(|| (id.to_ascii_lowercase(), Runtime::CriO));
    }
    if in_pod && is_container_id(seg) {
        return Some((seg.to_ascii_lowercase(), Runtime::Unknown));
    }
    None
}

/// Parses one cgroup path (the part after `0::` in `/proc/<pid>/cgroup`).
pub fn parse_path(path: &str) -> CgroupIds {
    let mut ids = CgroupIds::default();
    let mut prev: Option<&str> = None;
    for seg in path.split('/').filter(|s| !s.is_empty() && *s != "..") {
        if let Some(uid) = pod_segment(seg) {
            ids.pod_uid = Some(uid);
            // A container found above a pod belongs to the node (kind, docker-in-docker).
            ids.container_id = None;
            ids.runtime = None;
        } else {
            let in_pod = ids.pod_uid.is_some() && prev.is_some_and(|p| pod_segment(p).is_some());
            // Plain Docker with cgroupfs: `/docker/<id>`.
            let docker_dir = prev == Some("docker") && is_container_id(seg);
            if let Some((id, rt)) = container_segment(seg, in_pod) {
                ids.container_id = Some(id);
                ids.runtime = Some(rt);
            } else if docker_dir {
                ids.container_id = Some(seg.to_ascii_lowercase());
                ids.runtime = Some(Runtime::Docker);
            }
        }
        prev = Some(seg);
    }
    ids
}

/// Parses the text of `/proc/<pid>/cgroup`: the cgroup v2 line (`0::<path>`) when present,
/// else the first v1 hierarchy line that names a container or pod.
pub fn parse_proc_cgroup(text: &str) -> CgroupIds {
    let lines = || {
        text.lines()
            .filter_map(|l| l.splitn(3, ':').nth(2).map(|p| (l, p)))
    };
    if let Some((_, p)) = lines().find(|(l, _)| l.starts_with("0::")) {
        let ids = parse_path(p);
        if !ids.is_empty() {
            return ids;
        }
    }
    lines()
        .map(|(_, p)| parse_path(p))
        .find(|ids| !ids.is_empty())
        .unwrap_or_default()
}

/// Reads and parses `/proc/<pid>/cgroup` (through `procfs`). `None` when the process is gone
/// or its cgroup file unreadable.
pub fn read_pid(pid: u32) -> Option<CgroupIds> {
    let groups = procfs::process::Process::new(pid as i32)
        .ok()?
        .cgroups()
        .ok()?;
    let mut text = String::new();
    for g in groups.0 {
        text.push_str(&format!(
            "{}:{}:{}\n",
            g.hierarchy,
            g.controllers.join(","),
            g.pathname
        ));
    }
    Some(parse_proc_cgroup(&text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "8f3a1c2b9d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789abcd";
    const UID: &str = "4c2d8e0a-3b1f-4a6e-9c7d-1e2f3a4b5c6d";

    fn ids(uid: Option<&str>, id: Option<&str>, rt: Option<Runtime>) -> CgroupIds {
        CgroupIds {
            pod_uid: uid.map(str::to_owned),
            container_id: id.map(str::to_owned),
            runtime: rt,
        }
    }

    /// Path shapes as the kubelet and runtimes create them (copied from nodes of each kind:
    /// kubeadm + containerd with the systemd driver, OpenShift/CRI-O, cri-dockerd, k3s and
    /// minikube with cgroupfs, kind).
    #[test]
    fn real_path_shapes() {
        let u = UID.replace('-', "_");
        let cases: Vec<(String, CgroupIds)> = vec![
            (
                format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"),
                ids(Some(UID), Some(ID), Some(Runtime::Containerd)),
            ),
            (
                format!("0::/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope"),
                ids(Some(UID), Some(ID), Some(Runtime::Containerd)),
            ),
            (
                format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{ID}.scope"),
                ids(Some(UID), Some(ID), Some(Runtime::CriO)),
            ),
            (
                format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-conmon-{ID}.scope"),
                ids(Some(UID), None, None),
            ),
            (
                format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{ID}.scope"),
                ids(Some(UID), Some(ID), Some(Runtime::Docker)),
            ),
            (
                format!("0::/kubepods/burstable/pod{UID}/{ID}"),
                ids(Some(UID), Some(ID), Some(Runtime::Unknown)),
            ),
            (
                format!("0::/kubepods/pod{UID}/{ID}"),
                ids(Some(UID), Some(ID), Some(Runtime::Unknown)),
            ),
            (
                format!("0::/kubepods/besteffort/pod{UID}/crio-{ID}"),
                ids(Some(UID), Some(ID), Some(Runtime::CriO)),
            ),
            // kind: the node is itself a container; its pods nest under kubelet.slice.
            (
                format!("0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope"),
                ids(Some(UID), Some(ID), Some(Runtime::Containerd)),
            ),
            // k3s in docker, cgroupfs: the node container's id comes first and is not the pod's.
            (
                format!("0::/docker/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/kubepods/burstable/pod{UID}/{ID}"),
                ids(Some(UID), Some(ID), Some(Runtime::Unknown)),
            ),
            // Read from inside another cgroup namespace.
            (
                format!("0::/../../kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"),
                ids(Some(UID), Some(ID), Some(Runtime::Containerd)),
            ),
            // The pod's sandbox ("pause") lives in its own container cgroup too.
            (
                format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
                ids(Some(UID), None, None),
            ),
            // Plain Docker and Podman: a container, no pod.
            (
                format!("0::/system.slice/docker-{ID}.scope"),
                ids(None, Some(ID), Some(Runtime::Docker)),
            ),
            (format!("0::/docker/{ID}"), ids(None, Some(ID), Some(Runtime::Docker))),
            (
                format!("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"),
                ids(None, Some(ID), Some(Runtime::Podman)),
            ),
            // Not in a container at all.
            ("0::/user.slice/user-0.slice/session-3.scope".into(), CgroupIds::default()),
            ("0::/system.slice/containerd.service".into(), CgroupIds::default()),
            ("0::/".into(), CgroupIds::default()),
            // cgroup v1 (hybrid): the named hierarchies carry the path.
            (
                format!("12:memory:/kubepods/burstable/pod{UID}/{ID}\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n0::/"),
                ids(Some(UID), Some(ID), Some(Runtime::Unknown)),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_proc_cgroup(&text), want, "{text}");
        }
    }

    #[test]
    fn static_pods_have_hash_uids_and_ids_are_lower_cased() {
        let hash = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
        let up = ID.to_ascii_uppercase();
        let got = parse_path(&format!("/kubepods/burstable/pod{hash}/{up}"));
        assert_eq!(got, ids(Some(hash), Some(ID), Some(Runtime::Unknown)));
    }

    #[test]
    fn lookalikes_are_not_ids() {
        // Short hex runs, non-UUID pod names, a bare hex dir outside a pod.
        for p in [
            "/kubepods/burstable/podnotauid/abcdef",
            "/kubepods/burstable/pod1234/0123456789abcdef0123",
            "/system.slice/cri-containerd-xyz.scope",
            "/system.slice/0123456789abcdef0123456789abcdef",
            "/user.slice/podcast-4c2d8e0a_3b1f_4a6e_9c7d_1e2f3a4b5c6d.slice",
        ] {
            let got = parse_path(p);
            assert!(got.container_id.is_none(), "{p}: {got:?}");
            if p.contains("podcast") || p.contains("pod1234") || p.contains("notauid") {
                assert!(got.pod_uid.is_none(), "{p}: {got:?}");
            }
        }
    }

    #[test]
    fn reads_our_own_cgroup_without_failing() {
        // This process is (usually) in no pod; whatever it is in, the read succeeds.
        assert!(read_pid(std::process::id()).is_some());
        assert!(read_pid(u32::MAX - 1).is_none());
    }

    fn uid() -> impl Strategy<Value = String> {
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    }

    fn cid() -> impl Strategy<Value = String> {
        "[0-9a-f]{64}"
    }

    proptest! {
        /// Every driver × runtime × QoS shape round-trips to the ids it was built from.
        #[test]
        fn generated_shapes_round_trip(
            uid in uid(),
            id in cid(),
            qos in prop::sample::select(vec!["", "burstable", "besteffort"]),
            shape in 0usize..5,
            prefix in prop::sample::select(vec!["", "/kubelet.slice", "/../.."]),
        ) {
            let u = uid.replace('-', "_");
            let slice = |q: &str| if q.is_empty() {
                format!("/kubepods.slice/kubepods-pod{u}.slice")
            } else {
                format!("/kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{u}.slice")
            };
            let dir = if qos.is_empty() { format!("/kubepods/pod{uid}") } else { format!("/kubepods/{qos}/pod{uid}") };
            let (path, rt) = match shape {
                0 => (format!("{}/cri-containerd-{id}.scope", slice(qos)), Runtime::Containerd),
                1 => (format!("{}/crio-{id}.scope", slice(qos)), Runtime::CriO),
                2 => (format!("{}/docker-{id}.scope", slice(qos)), Runtime::Docker),
                3 => (format!("{dir}/{id}"), Runtime::Unknown),
                _ => (format!("{dir}/crio-{id}"), Runtime::CriO),
            };
            let got = parse_proc_cgroup(&format!("0::{prefix}{path}\n"));
            prop_assert_eq!(got, ids(Some(&uid), Some(&id), Some(rt)));
        }

        /// Arbitrary text never panics, and whatever comes out is well-formed.
        #[test]
        fn garbage_never_panics(text in "(?s).{0,300}") {
            let got = parse_proc_cgroup(&text);
            if let Some(id) = &got.container_id {
                prop_assert!(is_container_id(id));
            }
        }
    }
}
