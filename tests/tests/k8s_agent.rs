//! The agent as the Kubernetes DaemonSet runs it.
//!
//! - `agent_runs_with_only_the_daemonset_capabilities`: the real agent under `setpriv` with
//!   exactly the DaemonSet's capabilities (bounding, inheritable and ambient sets; no new
//!   privileges) traces a scripted server running as another user (uid 65534, no capabilities,
//!   as in another container), including a connection that existed before it started; then one
//!   capability at a time is taken away and what breaks is checked and printed.
//! - `pod_metadata_from_cgroup_and_kubelet`: a scripted server moved into a kubelet-shaped cgroup
//!   v2 hierarchy (`kubepods.slice/…/cri-containerd-<id>.scope`), the agent pointed at a local
//!   HTTPS fake kubelet replaying a recorded `/pods` response rewritten to that pod UID and
//!   container id: JSON lines carry the `k8s` object and per-request series the pod labels; a
//!   second server outside any pod gets neither.
//!
//! Need root, the agent, python3 (and `setpriv`, `/usr/bin/python3`, a cgroup2 mount): skip
//! locally, fail in CI.

use std::collections::BTreeSet;
use std::time::Duration;

use infertap::metadata::fake_kubelet::{self, RECORDED, RECORDED_ID, RECORDED_UID};
use infertap_tests::agent::{Agent, AgentOptions, Collector};
use infertap_tests::client::{ClientConn, Endpoint, RequestSpec};
use infertap_tests::k8s::{self, PodCgroup, AGENT_CAPABILITIES};
use infertap_tests::load::run_sequences_blocking;
use infertap_tests::prereq;
use infertap_tests::servers::{http_get, wait_for, ScriptedServer};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
/// The interpreter for a server of another user: the pyenv shims under /root are not readable
/// by uid 65534.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

fn script() -> serde_json::Value {
    json!({"default": {"ttft_ms": 5, "itl_ms": [2, 3], "tokens": 6}})
}

/// Capability numbers (linux/capability.h) of the names `capabilities.add` uses.
fn cap_number(name: &str) -> u32 {
    match name {
        "DAC_READ_SEARCH" => 2,
        "SYS_PTRACE" => 19,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        "CHECKPOINT_RESTORE" => 40,
        other => panic!("capability {other} not mapped"),
    }
}

/// A capability mask line of a `/proc/<pid>/status` (`CapBnd`, `CapEff`, ...).
fn cap_mask(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap();
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

/// `setpriv` running a command with exactly `caps` as a container runtime grants them to a
/// root container: bounding = inheritable = ambient = `caps`, no_new_privs
/// (allowPrivilegeEscalation: false).
fn setpriv(caps: &[&str]) -> Vec<String> {
    let list: String = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    [
        "setpriv",
        "--bounding-set",
        &list,
        "--inh-caps",
        &list,
        "--ambient-caps",
        &list,
        "--no-new-privs",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A user without capabilities or groups, as a server in another container.
fn as_nobody() -> Vec<String> {
    [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps",
        "-all",
        "--bounding-set",
        "-all",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn missing_setpriv() -> Option<String> {
    let ok = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--", SYSTEM_PYTHON, "-c", "pass"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then(|| format!("setpriv or {SYSTEM_PYTHON} missing (util-linux, python3)"))
}

fn spec() -> RequestSpec {
    RequestSpec::new(Endpoint::Chat, 6)
}

/// Sends requests to `server` (the profiler looks at a process once it samples it, so an idle
/// server may not be looked at for a while) until the agent's log contains `line`.
fn busy_until(server: &ScriptedServer, agent: &Agent, line: &str) {
    let seen = wait_for(WAIT, &format!("{line:?} in the agent's log"), || {
        let c = run_sequences_blocking(server.addr(), vec![vec![spec(); 4]]).ok()?;
        assert!(c.iter().flatten().all(|r| r.error.is_none()));
        agent.log().contains(line).then_some(())
    });
    assert!(seen.is_ok(), "{line:?} not logged:\n{}", agent.log());
}

/// What taking one capability away does, as observed.
#[derive(Debug)]
enum Without {
    /// The agent does not start; its error says why.
    Fails(String),
    /// It runs and traces requests, but logs this.
    Degraded(String),
}

#[test]
fn agent_runs_with_only_the_daemonset_capabilities() {
    let t = "agent_runs_with_only_the_daemonset_capabilities";
    if !prereq::agent_test(t) || !prereq::check(t, missing_setpriv()) {
        return;
    }
    let _g = prereq::e2e_lock();
    // Capabilities this machine can grant at all (a container may lack some in its own
    // bounding set, e.g. SYS_RESOURCE; the agent does not need it on kernels >= 5.11).
    let bounding = cap_mask("self", "CapBnd");
    let (caps, absent): (Vec<&str>, Vec<&str>) = AGENT_CAPABILITIES
        .iter()
        .partition(|c| bounding & (1 << cap_number(c)) != 0);
    if !absent.is_empty() {
        eprintln!("{t}: not in this machine's bounding set, so not granted: {absent:?}");
    }
    assert!(caps.contains(&"BPF") && caps.contains(&"PERFMON"));
    let server = ScriptedServer::start_under(&script(), &[], &as_nobody(), SYSTEM_PYTHON).unwrap();
    assert_eq!(cap_mask(&server.pid().to_string(), "CapEff"), 0);
    let rt = infertap_tests::runtime();
    // A keep-alive connection from before the agent started (adopted through /proc).
    let mut early = rt.block_on(ClientConn::connect(server.addr())).unwrap();
    assert!(rt.block_on(early.request(&spec())).error.is_none());

    let agent = Agent::spawn(&AgentOptions {
        wrapper: setpriv(&caps),
        ..AgentOptions::pid(server.pid())
    })
    .unwrap();
    let want: u64 = caps.iter().map(|c| 1u64 << cap_number(c)).sum();
    let apid = agent.pid().unwrap().to_string();
    assert_eq!(
        cap_mask(&apid, "CapEff"),
        want,
        "the agent has exactly the set"
    );
    assert_eq!(cap_mask(&apid, "CapBnd"), want);
    let adopted = rt.block_on(early.request(&spec()));
    assert!(adopted.error.is_none());
    let fresh = run_sequences_blocking(server.addr(), vec![vec![spec(), spec()]]).unwrap();
    assert!(fresh.iter().flatten().all(|c| c.error.is_none()));
    let recs = agent.wait_records(3, WAIT).unwrap();
    assert!(
        recs.iter()
            .any(|r| r.peer.as_deref() == Some(&adopted.local_addr)),
        "the pre-existing connection was adopted: {recs:#?}"
    );
    assert!(recs.iter().all(|r| r.output_tokens == Some(6)), "{recs:#?}");
    assert_eq!(http_get(agent.metrics_addr, "/readyz").unwrap().0, 200);
    // The profiler walks the server's Python frames (it reads the other user's memory).
    let frames_on = format!("pid {}: CPython", server.pid());
    busy_until(&server, &agent, &frames_on);
    assert!(agent.log().contains("Python frames on"), "{}", agent.log());
    let exit = agent.stop().unwrap();
    assert!(exit.status.success(), "{}", exit.log);
    assert!(
        exit.log.contains(&format!(
            "tracing pid {} (1 open connection(s) adopted)",
            server.pid()
        )),
        "{}",
        exit.log
    );
    for bad in ["Permission denied", "Operation not permitted"] {
        assert!(
            !exit.log.contains(bad),
            "with the full set: {bad}\n{}",
            exit.log
        );
    }

    // One capability at a time taken away.
    let mem_denied = format!("opening /proc/{}/mem: Permission denied", server.pid());
    let mut observed = Vec::new();
    for (drop, expect) in [
        ("BPF", Without::Fails("Operation not permitted".into())),
        ("PERFMON", Without::Fails("Operation not permitted".into())),
        // Python frames of the profiles read the server's memory: ptrace access to another
        // user's process, and its 0600 /proc/<pid>/mem.
        ("SYS_PTRACE", Without::Degraded(mem_denied.clone())),
        ("DAC_READ_SEARCH", Without::Degraded(mem_denied.clone())),
    ] {
        let fewer: Vec<&str> = caps.iter().copied().filter(|c| *c != drop).collect();
        let res = Agent::spawn(&AgentOptions {
            wrapper: setpriv(&fewer),
            ready_timeout: Some(Duration::from_secs(30)),
            ..AgentOptions::pid(server.pid())
        });
        match (&expect, res) {
            (Without::Fails(msg), Err(e)) => {
                let e = format!("{e:#}");
                assert!(e.contains(msg), "without {drop}: {e}");
                let first = e
                    .lines()
                    .find(|l| l.starts_with("Error:"))
                    .unwrap_or("")
                    .to_owned();
                observed.push((drop, format!("does not start: {first}")));
            }
            (Without::Degraded(msg), Ok(agent)) => {
                busy_until(&server, &agent, msg);
                agent.wait_records(1, WAIT).unwrap();
                // The early keep-alive connection is still open: did it get adopted?
                let log = agent.log();
                let adopted = log
                    .lines()
                    .find_map(|l| l.split_once("tracing pid ").map(|x| x.1.to_owned()))
                    .unwrap_or_default();
                observed.push((drop, format!("traces requests; logs \"{msg}\"; {adopted}")));
                agent.stop().unwrap();
            }
            (e, Ok(agent)) => panic!("without {drop}: expected {e:?}, it ran:\n{}", agent.log()),
            (e, Err(err)) => panic!("without {drop}: expected {e:?}, got {err:#}"),
        }
    }
    // The early connection stayed open through every run above, so "0 adopted" there is the
    // missing capability, not a closed connection.
    assert!(rt.block_on(early.request(&spec())).error.is_none());
    assert!(observed
        .iter()
        .filter(|(c, _)| *c == "SYS_PTRACE" || *c == "DAC_READ_SEARCH")
        .all(|(_, w)| w.contains("(0 open connection(s) adopted)")));

    // CHECKPOINT_RESTORE: the unwinder opens the server's modules through
    // /proc/<pid>/map_files/ (libraries deleted or replaced on disk) and falls back to
    // /proc/<pid>/root paths without it; the kernel allows that open only with it.
    let first_map = std::fs::read_dir(format!("/proc/{}/map_files", server.pid()))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let open_map = |caps: &[&str]| {
        let mut cmd = std::process::Command::new(&setpriv(caps)[0]);
        cmd.args(&setpriv(caps)[1..])
            .args(["head", "-c", "4"])
            .arg(&first_map);
        cmd.output().unwrap()
    };
    let with = open_map(&caps);
    assert_eq!(&with.stdout[..], b"\x7fELF", "{with:?}");
    let fewer: Vec<&str> = caps
        .iter()
        .copied()
        .filter(|c| *c != "CHECKPOINT_RESTORE")
        .collect();
    let without = open_map(&fewer);
    assert!(
        String::from_utf8_lossy(&without.stderr).contains("Operation not permitted"),
        "{without:?}"
    );
    observed.push((
        "CHECKPOINT_RESTORE",
        "/proc/<pid>/map_files/* cannot be opened (Operation not permitted); the unwinder then reads modules through /proc/<pid>/root".into(),
    ));
    for (cap, what) in &observed {
        eprintln!("{t}: without CAP_{cap}: {what}");
    }
}

/// A UUID-shaped pod UID and a 64-hex container id, unique per run.
fn ids() -> (String, String) {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let h = format!(
        "{n:016x}{:016x}",
        n.rotate_left(29) ^ u64::from(std::process::id())
    );
    let uid = format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    );
    (uid, h.repeat(2))
}

#[test]
fn pod_metadata_from_cgroup_and_kubelet() {
    let t = "pod_metadata_from_cgroup_and_kubelet";
    if !prereq::agent_test(t)
        || !prereq::check(
            t,
            k8s::cgroup2_root()
                .is_none()
                .then(|| "no cgroup2 mount".to_owned()),
        )
    {
        return;
    }
    let _g = prereq::e2e_lock();
    let (uid, cid) = ids();
    let cg = PodCgroup::create(&uid, &cid).unwrap();
    let in_pod = ScriptedServer::start(&script()).unwrap();
    cg.add(in_pod.pid()).unwrap();
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", in_pod.pid())).unwrap();
    assert!(
        own.contains(&format!("/cri-containerd-{cid}.scope")),
        "server's cgroup: {own}"
    );
    let outside = ScriptedServer::start(&script()).unwrap();

    // The recorded /pods body with this run's pod UID and container id in place of the
    // recorded ones (everything else as the kubelet sent it).
    let body = RECORDED
        .replace(RECORDED_UID, &uid)
        .replace(RECORDED_ID, &cid);
    let kubelet = fake_kubelet::fake_kubelet(body, "e2e-token".into());
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let ca = dir.path().join("ca.crt");
    std::fs::write(&token, "e2e-token\n").unwrap();
    std::fs::write(&ca, &kubelet.ca_pem).unwrap();
    let collector = Collector::spawn().unwrap();
    let agent = Agent::spawn(&AgentOptions {
        pids: vec![in_pod.pid(), outside.pid()],
        collector: Some(collector.url()),
        interval: Some("1s".into()),
        extra_args: vec![
            "--k8s".into(),
            "on".into(),
            "--kubelet-url".into(),
            kubelet.url.clone(),
            "--kubelet-token-file".into(),
            token.display().to_string(),
            "--kubelet-ca-file".into(),
            ca.display().to_string(),
        ],
        ..Default::default()
    })
    .unwrap();
    let want = json!({
        "namespace": "default",
        "pod": "queue-l4dv8",
        "container": "queue",
        "container_id": cid,
        "pod_uid": uid,
    });
    // The agent asks the kubelet as soon as it traces a containerised process; requests that
    // complete before the answer is in carry the ids only. Warm up until one has the names.
    wait_for(WAIT, "a request line with the pod's names", || {
        let c = run_sequences_blocking(in_pod.addr(), vec![vec![spec()]]).ok()?;
        assert!(c[0][0].error.is_none());
        let n = c.len();
        let recs = agent.wait_records(n, WAIT).ok()?;
        recs.iter()
            .any(|r| r.k8s.as_ref() == Some(&want))
            .then_some(())
    })
    .unwrap();
    let warm = agent.records().unwrap().len();
    let c = run_sequences_blocking(in_pod.addr(), vec![vec![spec(), spec(), spec()]]).unwrap();
    assert!(c.iter().flatten().all(|r| r.error.is_none()));
    let c = run_sequences_blocking(outside.addr(), vec![vec![spec()]]).unwrap();
    assert!(c[0][0].error.is_none());
    let recs = agent.wait_records(warm + 4, WAIT).unwrap();
    let pod_recs: Vec<_> = recs.iter().filter(|r| r.pid == in_pod.pid()).collect();
    assert_eq!(pod_recs.len(), warm + 3);
    // Every line of the pod's server has its ids (from the cgroup); all after the warm-up
    // have the names too.
    for r in &pod_recs {
        let k = r.k8s.as_ref().expect("k8s object");
        assert_eq!(
            (&k["container_id"], &k["pod_uid"]),
            (&want["container_id"], &want["pod_uid"])
        );
    }
    for r in &pod_recs[warm..] {
        assert_eq!(r.k8s.as_ref(), Some(&want), "{r:#?}");
    }
    let named = pod_recs
        .iter()
        .filter(|r| r.k8s.as_ref() == Some(&want))
        .count() as f64;
    let unnamed = pod_recs.len() as f64 - named;
    eprintln!("{t}: {named} request lines with the pod's names, {unnamed} (ids only) before the kubelet's answer was in");
    let plain: Vec<_> = recs.iter().filter(|r| r.pid == outside.pid()).collect();
    assert_eq!(plain.len(), 1);
    assert!(plain[0].k8s.is_none(), "{:#?}", plain[0]);

    let m = agent.metrics().unwrap();
    let pod = [
        ("namespace", "default"),
        ("pod", "queue-l4dv8"),
        ("container", "queue"),
    ];
    let mut with_pod = vec![("outcome", "ok")];
    with_pod.extend(pod);
    assert_eq!(m.sum("infertap_requests_total", &with_pod), named);
    assert_eq!(
        m.sum("infertap_requests_total", &[("outcome", "ok")]),
        recs.len() as f64
    );
    assert_eq!(
        m.sum("infertap_time_to_first_token_seconds_count", &pod),
        named
    );
    assert_eq!(m.sum("infertap_output_tokens_total", &pod), 6.0 * named);
    // The request outside any pod (and any pod request before the names came): series without
    // pod labels, counted as unresolved; node-level series never get them.
    let unlabelled: f64 = m
        .samples
        .iter()
        .filter(|s| s.name == "infertap_requests_total" && !s.labels.contains_key("pod"))
        .map(|s| s.value)
        .sum();
    assert_eq!(unlabelled, 1.0 + unnamed);
    assert_eq!(
        m.sum(
            "infertap_events_dropped_total",
            &[("reason", "k8s_metadata_unresolved")]
        ),
        unnamed
    );
    let pod_label_names: BTreeSet<&str> = m
        .samples
        .iter()
        .filter(|s| s.labels.contains_key("pod"))
        .map(|s| s.name.as_str())
        .collect();
    assert!(
        pod_label_names
            .iter()
            .all(|n| !n.starts_with("infertap_events_dropped") && !n.contains("requests_running")),
        "{pod_label_names:?}"
    );
    // The collector accepts the pod labels and keeps them next to its node/agent labels.
    let merged = wait_for(WAIT, "pod-labelled series on the collector", || {
        let cm = collector.metrics().ok()?;
        let all = cm.sum("infertap_requests_total", &[("outcome", "ok")]);
        (cm.sum("infertap_requests_total", &with_pod) == named && all == recs.len() as f64)
            .then_some(cm)
    })
    .unwrap();
    assert!(merged
        .samples
        .iter()
        .filter(|s| s.labels.contains_key("pod"))
        .all(|s| s.labels.contains_key("node") && s.labels.contains_key("agent")));
    agent.stop().unwrap();
    drop(in_pod);
    drop(cg);
}
