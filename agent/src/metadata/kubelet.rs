//! The kubelet's `/pods` API: which pods (name, namespace, UID) and containers (name, id) run
//! on this node.
//!
//! The kubelet serves the node's `v1.PodList` on its authenticated port
//! (`https://<node IP>:10250/pods`, service-account bearer token, `nodes/proxy` RBAC) and, where
//! enabled, on the read-only port (`http://<node IP>:10255/pods`). Asking the kubelet rather
//! than the API server keeps the load on the node and needs no cluster-wide watch. The client is
//! blocking (one request per refresh) and runs on the metadata refresher's own thread, never on
//! the agent's drain.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

/// Where and how to reach the kubelet.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// Base URL, e.g. `https://10.0.0.5:10250` or `http://10.0.0.5:10255`; `/pods` is appended.
    pub url: String,
    /// Bearer token file (re-read on every request: projected tokens rotate). `None`: no
    /// `Authorization` header (read-only port).
    pub token_file: Option<PathBuf>,
    /// PEM bundle the kubelet's serving certificate must chain to. `None`: the Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// Skip certificate verification (kubelets with self-signed serving certificates, as
    /// metrics-server's `--kubelet-insecure-tls`). The token is still sent.
    pub insecure_tls: bool,
    /// Whole-request timeout.
    pub timeout: Duration,
}

/// Default service-account token and CA of a pod.
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const SERVICE_ACCOUNT_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// Largest `/pods` body accepted (a node at the 110-pod default is a few MB at most).
pub const MAX_BODY_BYTES: u64 = 64 << 20;

/// One container as the kubelet reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub container: String,
}

/// One pod as the kubelet reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub pod: String,
}

/// What one `/pods` answer says, indexed for lookups by container id and pod UID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIndex {
    /// By runtime container id (hex, without the `containerd://` scheme).
    pub containers: HashMap<String, Arc<ContainerInfo>>,
    /// By pod UID.
    pub pods: HashMap<String, Arc<PodInfo>>,
}

// The few fields of v1.PodList we read; everything else is ignored.
#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: ObjectMeta,
    #[serde(default)]
    status: Option<PodStatus>,
}

#[derive(Deserialize)]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    #[serde(default)]
    name: String,
    /// `<runtime>://<id>`; absent while the container is still being created.
    #[serde(default, rename = "containerID")]
    container_id: Option<String>,
}

/// The runtime id of a kubelet `containerID` (`containerd://abc…` → `abc…`).
pub fn strip_scheme(container_id: &str) -> &str {
    container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id)
}

impl PodIndex {
    /// Parses a `/pods` body (a `v1.PodList`).
    pub fn parse(body: &[u8]) -> Result<Self> {
        let list: PodList = serde_json::from_slice(body).context("parsing the kubelet's /pods")?;
        let mut index = PodIndex::default();
        for p in list.items {
            let m = p.metadata;
            if m.uid.is_empty() {
                continue;
            }
            index.pods.insert(
                m.uid.clone(),
                Arc::new(PodInfo {
                    namespace: m.namespace.clone(),
                    pod: m.name.clone(),
                }),
            );
            let status = p.status.unwrap_or_default();
            for c in status
                .container_statuses
                .into_iter()
                .chain(status.init_container_statuses)
                .chain(status.ephemeral_container_statuses)
            {
                let Some(id) = c.container_id.as_deref().map(strip_scheme) else {
                    continue;
                };
                if id.is_empty() {
                    continue;
                }
                index.containers.insert(
                    id.to_ascii_lowercase(),
                    Arc::new(ContainerInfo {
                        namespace: m.namespace.clone(),
                        pod: m.name.clone(),
                        pod_uid: m.uid.clone(),
                        container: c.name,
                    }),
                );
            }
        }
        Ok(index)
    }
}

/// A blocking `/pods` client.
pub struct KubeletClient {
    cfg: KubeletConfig,
    agent: ureq::Agent,
}

impl KubeletClient {
    /// Builds the client; fails on an unreadable or empty CA file.
    pub fn new(cfg: KubeletConfig) -> Result<Self> {
        use ureq::tls::{Certificate, RootCerts, TlsConfig};
        let mut tls = TlsConfig::builder();
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading the kubelet CA {}", ca.display()))?;
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                bail!("no certificate in the kubelet CA file {}", ca.display());
            }
            tls = tls.root_certs(RootCerts::Specific(Arc::new(certs)));
        }
        if cfg.insecure_tls {
            tls = tls.disable_verification(true);
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .timeout_global(Some(cfg.timeout))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Ok(Self { cfg, agent })
    }

    pub fn url(&self) -> String {
        format!("{}/pods", self.cfg.url.trim_end_matches('/'))
    }

    /// Fetches and parses `/pods`. Errors name the URL and the HTTP status.
    pub fn fetch(&self) -> Result<PodIndex> {
        let url = self.url();
        let mut req = self.agent.get(&url).header("Accept", "application/json");
        if let Some(path) = &self.cfg.token_file {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading the kubelet token {}", path.display()))?;
            req = req.header("Authorization", format!("Bearer {}", token.trim()));
        }
        let mut resp = req.call().with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            bail!(
                "GET {url}: HTTP {status}{}",
                match status.as_u16() {
                    401 => " (token rejected)",
                    403 => " (the service account needs nodes/proxy get)",
                    _ => "",
                }
            );
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_vec()
            .with_context(|| format!("reading GET {url}"))?;
        PodIndex::parse(&body)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    pub(crate) use crate::metadata::fake_kubelet::{fake_kubelet, FakeKubelet};
    use std::net::TcpListener;

    pub(crate) use crate::metadata::fake_kubelet::{RECORDED, RECORDED_ID, RECORDED_UID};

    #[test]
    fn parses_the_recorded_pod_list() {
        let idx = PodIndex::parse(RECORDED.as_bytes()).unwrap();
        let c = &idx.containers[RECORDED_ID];
        assert_eq!(
            **c,
            ContainerInfo {
                namespace: "default".into(),
                pod: "queue-l4dv8".into(),
                pod_uid: RECORDED_UID.into(),
                container: "queue".into(),
            }
        );
        assert_eq!(idx.pods[RECORDED_UID].pod, "queue-l4dv8");
        assert_eq!((idx.containers.len(), idx.pods.len()), (1, 1));
    }

    #[test]
    fn init_ephemeral_and_creating_containers() {
        // The recorded pod, plus (per the v1.PodStatus schema) an init container, an ephemeral
        // debug container and a container still being created (no containerID yet).
        let mut v: serde_json::Value = serde_json::from_str(RECORDED).unwrap();
        let st = &mut v["items"][0]["status"];
        st["initContainerStatuses"] = serde_json::json!([
            {"name": "fetch-model", "containerID": "containerd://AA11bb22cc33dd44ee55ff66aa11bb22cc33dd44ee55ff66aa11bb22cc33dd44"}
        ]);
        st["ephemeralContainerStatuses"] = serde_json::json!([
            {"name": "debugger", "containerID": "cri-o://0011223344556677889900112233445566778899001122334455667788990011"}
        ]);
        st["containerStatuses"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "sidecar", "ready": false}));
        let idx = PodIndex::parse(v.to_string().as_bytes()).unwrap();
        assert_eq!(idx.containers.len(), 3);
        assert_eq!(
            idx.containers["aa11bb22cc33dd44ee55ff66aa11bb22cc33dd44ee55ff66aa11bb22cc33dd44"]
                .container,
            "fetch-model"
        );
        assert_eq!(
            idx.containers["0011223344556677889900112233445566778899001122334455667788990011"]
                .container,
            "debugger"
        );
    }

    #[test]
    fn bad_bodies_are_errors() {
        for b in [&b""[..], b"{", b"[1,2]", b"{\"items\": 3}"] {
            assert!(
                PodIndex::parse(b).is_err(),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
        // An empty list is fine (a node with no pods yet).
        assert!(PodIndex::parse(b"{\"items\": []}").unwrap().pods.is_empty());
    }

    pub(crate) fn write_temp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("infertap-kubelet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn config(k: &FakeKubelet, token: &str) -> KubeletConfig {
        KubeletConfig {
            url: k.url.clone(),
            token_file: Some(write_temp(&format!("token-{token}"), &format!("{token}\n"))),
            ca_file: Some(write_temp("ca.pem", &k.ca_pem)),
            insecure_tls: false,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn fetches_the_recorded_response_over_https_with_the_token() {
        let k = fake_kubelet(RECORDED.to_owned(), "s3cret".into());
        let client = KubeletClient::new(config(&k, "s3cret")).unwrap();
        let idx = client.fetch().unwrap();
        assert_eq!(idx.containers[RECORDED_ID].pod, "queue-l4dv8");

        // A wrong token is a clear error naming the status.
        let bad = KubeletClient::new(config(&k, "wrong")).unwrap();
        let err = format!("{:#}", bad.fetch().unwrap_err());
        assert!(
            err.contains("401") && err.contains("token rejected"),
            "{err}"
        );

        // A server whose certificate does not chain to the CA is refused...
        let other = fake_kubelet(RECORDED.to_owned(), "s3cret".into());
        let mut cfg = config(&k, "s3cret");
        cfg.url = other.url.clone();
        let err = format!(
            "{:#}",
            KubeletClient::new(cfg.clone())
                .unwrap()
                .fetch()
                .unwrap_err()
        );
        assert!(err.contains("GET https://127.0.0.1"), "{err}");
        // ...unless verification is off.
        cfg.insecure_tls = true;
        assert!(KubeletClient::new(cfg).unwrap().fetch().is_ok());
    }

    #[test]
    fn unreachable_kubelet_and_bad_ca_are_errors() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = KubeletConfig {
            url: format!("https://127.0.0.1:{port}"),
            token_file: None,
            ca_file: None,
            insecure_tls: false,
            timeout: Duration::from_secs(2),
        };
        assert!(KubeletClient::new(cfg.clone()).unwrap().fetch().is_err());
        let mut bad_ca = cfg;
        bad_ca.ca_file = Some(write_temp("empty.pem", "not a certificate\n"));
        assert!(KubeletClient::new(bad_ca).is_err());
    }
}
