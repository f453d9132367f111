//! `deploy/kubernetes`: every manifest validates (strict: unknown fields are errors) against the
//! real Kubernetes schemas `kubernetes-validate` ships, for the oldest and newest supported
//! versions; the kustomization lists every manifest; and the DaemonSet and collector say what the
//! README promises (capability set, probes, mounts, node name, collector address, the flags the
//! real binaries accept). Needs the validator venv (`cargo xtask setup`): skips locally, fails
//! in CI without it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use infertap_tests::k8s::{self, AGENT_CAPABILITIES, VALIDATE_VERSIONS};
use infertap_tests::{paths, prereq};
use serde_json::Value;

fn manifests() -> (Vec<PathBuf>, Vec<Value>) {
    let dir = k8s::manifests_dir();
    let kust = k8s::yaml_documents(&dir.join("kustomization.yaml")).unwrap();
    let listed: Vec<PathBuf> = kust[0]["resources"]
        .as_array()
        .expect("kustomization resources")
        .iter()
        .map(|r| dir.join(r.as_str().unwrap()))
        .collect();
    let mut docs = Vec::new();
    for f in &listed {
        docs.extend(k8s::yaml_documents(f).unwrap());
    }
    (listed, docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn manifests_validate_against_kubernetes_schemas() {
    if !prereq::check(
        "manifests_validate_against_kubernetes_schemas",
        k8s::validator().err().map(|e| format!("{e:#}")),
    ) {
        return;
    }
    let dir = k8s::manifests_dir();
    let (listed, docs) = manifests();
    // The kustomization lists every manifest of the directory, and only those.
    let on_disk: BTreeSet<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    assert_eq!(on_disk, listed.iter().cloned().collect::<BTreeSet<_>>());
    for v in VALIDATE_VERSIONS {
        let out = k8s::validate(&listed, v).unwrap_or_else(|e| panic!("{e:#}"));
        let passed = out.matches(" passed for resource ").count();
        assert_eq!(passed, docs.len(), "{out}");
    }
    // The validator does reject what is wrong (so a pass above means something).
    let bad = tempfile::NamedTempFile::new().unwrap();
    let ds = std::fs::read_to_string(dir.join("agent-daemonset.yaml")).unwrap();
    std::fs::write(bad.path(), ds.replace("hostPID: true", "hostPid: true")).unwrap();
    let err = k8s::validate(&[bad.path().to_owned()], VALIDATE_VERSIONS[1]).unwrap_err();
    assert!(format!("{err:#}").contains("hostPid"), "{err:#}");
}

#[test]
fn daemonset_and_collector_say_what_the_readme_says() {
    if !prereq::check(
        "daemonset_and_collector_say_what_the_readme_says",
        k8s::validator().err().map(|e| format!("{e:#}")),
    ) {
        return;
    }
    let (_, docs) = manifests();
    let ds = find(&docs, "DaemonSet", "infertap-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert!(
        pod["hostNetwork"].is_null(),
        "the agent keeps its own network"
    );
    assert!(!strs(&Value::Array(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["key"].clone())
            .collect()
    ))
    .is_empty());
    assert!(pod["nodeSelector"].is_object());
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), vec!["ALL"]);
    let added: BTreeSet<String> = strs(&sc["capabilities"]["add"]).into_iter().collect();
    let want: BTreeSet<String> = AGENT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        added, want,
        "the DaemonSet's capabilities are the tested set"
    );

    // Probes on the metrics port, which the agent is told to listen on.
    let args = strs(&c["args"]);
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert!(
        args.contains(&format!("--metrics-addr=0.0.0.0:{port}")),
        "{args:?}"
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    for k in ["requests", "limits"] {
        assert!(c["resources"][k]["cpu"].is_string() && c["resources"][k]["memory"].is_string());
    }

    // Node name from the downward API, passed as --node; kubelet at the node's IP.
    let env = c["env"].as_array().unwrap();
    let field = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
    };
    assert_eq!(field("NODE_NAME"), Some(Value::from("spec.nodeName")));
    assert_eq!(field("NODE_IP"), Some(Value::from("status.hostIP")));
    assert!(args.contains(&"--node=$(NODE_NAME)".to_owned()));
    assert!(args.contains(&"--kubelet-url=https://$(NODE_IP):10250".to_owned()));

    // Mounts: BTF read-only, tracefs, debugfs, cgroupfs read-only, the CUPTI socket's
    // directory (the agent's default socket path), the state dir.
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("no mount at {path}"))
    };
    assert_eq!(mount("/sys/kernel/btf")["readOnly"], true);
    assert_eq!(mount("/sys/fs/cgroup")["readOnly"], true);
    mount("/sys/kernel/tracing");
    mount("/sys/kernel/debug");
    mount("/var/lib/infertap");
    let cupti_dir = std::path::Path::new(infertap_cupti::wire::DEFAULT_SOCKET)
        .parent()
        .unwrap();
    mount(cupti_dir.to_str().unwrap());
    for m in mounts {
        let vol = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("mount {} has no volume", m["name"]));
        if let Some(host) = vol["hostPath"]["path"].as_str() {
            assert_eq!(
                Some(host),
                m["mountPath"].as_str(),
                "host paths mount where they are"
            );
        }
    }

    // The collector address is the Service's gRPC port.
    let svc = find(&docs, "Service", "infertap-collector");
    let ns = svc["metadata"]["namespace"].as_str().unwrap();
    let grpc = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .unwrap();
    assert_eq!(grpc["port"], 50051);
    assert!(args.contains(&format!(
        "--collector=http://infertap-collector.{ns}.svc:{}",
        grpc["port"]
    )));
    let http = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http")
        .unwrap();
    assert_eq!(http["port"], 9464);

    // The collector: readiness on /healthz, its state dir on the claim.
    let dep = find(&docs, "Deployment", "infertap-collector");
    let cc = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(cc["readinessProbe"]["httpGet"]["path"], "/healthz");
    let claim = dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
        .as_str()
        .unwrap();
    find(&docs, "PersistentVolumeClaim", claim);
    let cargs = strs(&cc["args"]);

    // RBAC: the kubelet's /pods is nodes/proxy get, and nothing more.
    let role = find(&docs, "ClusterRole", "infertap-agent");
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]}])
    );

    // Every flag the manifests pass is one the real binaries accept.
    let help = |bin: Result<PathBuf, anyhow::Error>, sub: &[&str]| -> Option<String> {
        let bin = bin.ok()?;
        let out = Command::new(bin).args(sub).arg("--help").output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    for (bin, sub, args) in [
        (paths::agent_binary(), &["run"][..], &args),
        (paths::collector_binary(), &[][..], &cargs),
    ] {
        let Some(text) = help(bin, sub) else {
            prereq::check(
                "daemonset_and_collector_say_what_the_readme_says (flags)",
                Some("binary not built".into()),
            );
            continue;
        };
        for a in args {
            let flag = a.split('=').next().unwrap();
            assert!(
                text.contains(&format!("{flag} "))
                    || text.contains(&format!("{flag}\n"))
                    || text.contains(&format!("{flag} <")),
                "{flag} unknown to the binary:\n{text}"
            );
        }
    }
}
