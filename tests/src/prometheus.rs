//! A real Prometheus server (Debian `prometheus`, installed by `cargo xtask setup`) as a child
//! process on loopback with its own temporary TSDB, and the parts of its HTTP API the tests read:
//! instant queries, label values and the rule states.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;

use crate::servers::{free_port, http_get, wait_for};

/// The Prometheus binary: `$PROMETHEUS` or `prometheus` on the `PATH`.
pub fn prometheus_binary() -> PathBuf {
    std::env::var_os("PROMETHEUS").map_or_else(|| PathBuf::from("prometheus"), PathBuf::from)
}

/// Why Prometheus cannot run here, if it cannot.
pub fn missing_prometheus() -> Option<String> {
    let bin = prometheus_binary();
    match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some(format!(
            "{} not runnable (Debian prometheus; `cargo xtask setup` installs it)",
            bin.display()
        )),
    }
}

/// A running Prometheus, killed on drop.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
    dir: tempfile::TempDir,
}

/// One series of an instant query's answer.
#[derive(Clone, Debug)]
pub struct QuerySample {
    pub labels: serde_json::Map<String, serde_json::Value>,
    pub value: f64,
}

#[derive(Deserialize)]
struct ApiAnswer {
    status: String,
    #[serde(default)]
    data: serde_json::Value,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    warnings: Vec<String>,
}

/// One rule as `/api/v1/rules` reports it.
#[derive(Clone, Debug, Deserialize)]
pub struct RuleState {
    pub name: String,
    /// The rule's expression as Prometheus parsed and printed it.
    pub query: String,
    /// `ok`, `err` or `unknown` (not evaluated yet).
    pub health: String,
    #[serde(default, rename = "lastError")]
    pub last_error: Option<String>,
    #[serde(default, rename = "lastEvaluation")]
    pub last_evaluation: String,
    /// `alerting` or `recording`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Alerting rules: `inactive`, `pending` or `firing`.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub labels: serde_json::Map<String, serde_json::Value>,
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML) as its configuration file, a fresh TSDB and a web
    /// address on a free port, and waits until `/-/ready` answers 200.
    pub fn start(config: &str) -> Result<Prometheus> {
        let dir = tempfile::Builder::new()
            .prefix("infertap-prometheus-")
            .tempdir()?;
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(prometheus_binary())
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("spawning prometheus")?;
        let mut p = Prometheus {
            child,
            addr,
            log_path,
            dir,
        };
        let res = wait_for(Duration::from_secs(30), "prometheus /-/ready", || {
            if let Ok(Some(st)) = p.child.try_wait() {
                return Some(Err(anyhow::anyhow!("prometheus exited: {st}")));
            }
            matches!(http_get(p.addr, "/-/ready"), Ok((200, _))).then_some(Ok(()))
        });
        match res {
            Ok(Ok(())) => Ok(p),
            Ok(Err(e)) | Err(e) => bail!("{e:#}\n--- prometheus log ---\n{}", p.log()),
        }
    }

    /// The temporary directory holding the configuration and the TSDB.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn api(&self, path_and_query: &str) -> Result<serde_json::Value> {
        let (status, body) = http_get(self.addr, path_and_query)?;
        let a: ApiAnswer = serde_json::from_str(&body)
            .with_context(|| format!("{path_and_query}: HTTP {status}: {body}"))?;
        if a.status != "success" {
            bail!(
                "{path_and_query}: HTTP {status}: {}",
                a.error.unwrap_or(body)
            );
        }
        if !a.warnings.is_empty() {
            bail!("{path_and_query}: warnings {:?}", a.warnings);
        }
        Ok(a.data)
    }

    /// An instant query at the current time (`/api/v1/query`): the vector's samples, or the one
    /// scalar as a sample without labels. A query Prometheus refuses is an error.
    pub fn query(&self, expr: &str) -> Result<Vec<QuerySample>> {
        let q = utf8_percent_encode(expr, NON_ALPHANUMERIC);
        let data = self.api(&format!("/api/v1/query?query={q}"))?;
        let value = |v: &serde_json::Value| -> Result<f64> {
            let s = v[1].as_str().context("sample value is not a string")?;
            // Prometheus writes NaN and ±Inf as "NaN", "+Inf", "-Inf".
            Ok(match s {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                s => s.parse()?,
            })
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .context("vector without result")?
                .iter()
                .map(|s| {
                    Ok(QuerySample {
                        labels: s["metric"].as_object().cloned().unwrap_or_default(),
                        value: value(&s["value"])?,
                    })
                })
                .collect(),
            Some("scalar") => Ok(vec![QuerySample {
                labels: Default::default(),
                value: value(&data["result"])?,
            }]),
            other => bail!("{expr}: unexpected result type {other:?}"),
        }
    }

    /// The values of label `name` on series matching `selector` (`/api/v1/label/<name>/values`,
    /// what Grafana's `label_values(selector, name)` asks).
    pub fn label_values(&self, name: &str, selector: &str) -> Result<Vec<String>> {
        let m = utf8_percent_encode(selector, NON_ALPHANUMERIC);
        let data = self.api(&format!("/api/v1/label/{name}/values?match[]={m}"))?;
        Ok(data
            .as_array()
            .context("label values not a list")?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect())
    }

    /// Every rule Prometheus loaded, with its group name.
    pub fn rules(&self) -> Result<Vec<(String, RuleState)>> {
        let data = self.api("/api/v1/rules")?;
        let mut out = Vec::new();
        for g in data["groups"].as_array().context("no groups")? {
            let group = g["name"].as_str().unwrap_or_default().to_owned();
            for r in g["rules"].as_array().context("group without rules")? {
                out.push((group.clone(), serde_json::from_value(r.clone())?));
            }
        }
        Ok(out)
    }

    /// Scrape targets and their health (`up`, `down`, `unknown`), by scrape URL.
    pub fn targets(&self) -> Result<Vec<(String, String, String)>> {
        let data = self.api("/api/v1/targets?state=active")?;
        Ok(data["activeTargets"]
            .as_array()
            .context("no activeTargets")?
            .iter()
            .map(|t| {
                let s = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
                (s("scrapeUrl"), s("health"), s("lastError"))
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; SIGTERM lets it close the TSDB.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = wait_for(Duration::from_secs(10), "prometheus exit", || {
            self.child.try_wait().ok().flatten()
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
