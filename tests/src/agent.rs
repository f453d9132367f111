//! The agent (and collector) as child processes, driven through their public CLI contract.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::paths;
use crate::servers::{free_port, http_get, read_jsonl, wait_for};

/// One line of the agent's `--requests` output.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentRecord {
    pub pid: u32,
    /// The client's "ip:port".
    pub peer: Option<String>,
    pub conn_id: u64,
    pub seq_on_conn: u32,
    pub method: String,
    pub path: String,
    pub status: Option<u16>,
    pub model: Option<String>,
    pub stream: bool,
    /// The request's start: its arrival once the agent measures arrival, else its first read.
    pub start_unix_ns: u64,
    /// When the request's first byte reached the server's socket (kernel time), if reported.
    pub arrival_unix_ns: Option<u64>,
    /// First request on a new connection: when its handshake completed and when the server
    /// accepted it, if reported.
    pub connected_unix_ns: Option<u64>,
    pub accepted_unix_ns: Option<u64>,
    /// `accepted - connected`, if reported.
    pub accept_queue_ms: Option<f64>,
    /// When the server first read the request, if reported separately from the start.
    pub read_unix_ns: Option<u64>,
    /// Time the request waited before the server read it, if reported.
    pub queue_ms: Option<f64>,
    pub first_token_unix_ns: Option<u64>,
    pub end_unix_ns: u64,
    pub ttft_ms: Option<f64>,
    pub e2e_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub output_tokens: Option<u64>,
    pub token_count_source: Option<String>,
    pub token_unix_ns: Vec<u64>,
    pub content_events: Option<usize>,
    pub prompt_tokens: Option<u64>,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    pub stream_kind: Option<String>,
    /// Choice index of each `token_unix_ns` entry (only with parallel choices).
    pub token_choice: Vec<u32>,
    /// Per-choice figures (only with parallel choices).
    pub choices: Vec<AgentChoice>,
    /// Whole request / response sizes (head, framing, body), bytes.
    #[serde(default)]
    pub request_bytes: u64,
    #[serde(default)]
    pub response_bytes: u64,
    /// The serving container and pod (`namespace`, `pod`, `container`, `container_id`,
    /// `pod_uid`), when pod metadata is on.
    pub k8s: Option<serde_json::Value>,
}

/// One entry of a request line's `choices`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentChoice {
    pub index: u32,
    pub output_tokens: u64,
    pub content_events: u64,
    pub first_token_unix_ns: Option<u64>,
    pub ttft_ms: Option<f64>,
    pub itl_ms_median: Option<f64>,
    pub itl_ms_max: Option<f64>,
    pub finish_reason: Option<String>,
}

impl AgentRecord {
    pub fn itl_ns(&self) -> impl Iterator<Item = u64> + '_ {
        self.token_unix_ns
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]))
    }
}

/// How to launch the agent. Paths for `--requests` and `--ready-file` and a free
/// `--metrics-addr` are chosen by [`Agent::spawn`].
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub collector: Option<String>,
    pub interval: Option<String>,
    pub node: Option<String>,
    pub capture_bytes: Option<u32>,
    pub duration: Option<String>,
    pub extra_args: Vec<String>,
    /// How long to wait for the ready file (default 60 s).
    pub ready_timeout: Option<Duration>,
    /// Command the agent runs under (e.g. `setpriv --bounding-set ... --`); empty: none.
    pub wrapper: Vec<String>,
}

impl AgentOptions {
    pub fn pid(pid: u32) -> Self {
        AgentOptions {
            pids: vec![pid],
            ..Default::default()
        }
    }
}

/// A running agent. Dropping it kills the process; [`Agent::stop`] stops it cleanly.
pub struct Agent {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub requests_path: PathBuf,
    pub metrics_addr: SocketAddr,
    pub log_path: PathBuf,
}

/// How an agent ended.
#[derive(Debug)]
pub struct AgentExit {
    pub status: ExitStatus,
    pub log: String,
}

impl Agent {
    /// Spawns the agent binary and waits until it has created its ready file (probes attached).
    pub fn spawn(opts: &AgentOptions) -> Result<Agent> {
        let bin = paths::agent_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("infertap-agent-")
            .tempdir()?;
        let requests_path = dir.path().join("requests.jsonl");
        let ready = dir.path().join("ready");
        let log_path = dir.path().join("agent.log");
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut cmd = match opts.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        for p in &opts.pids {
            cmd.arg("--pid").arg(p.to_string());
        }
        for p in &opts.ports {
            cmd.arg("--port").arg(p.to_string());
        }
        cmd.arg("--requests").arg(&requests_path);
        cmd.arg("--ready-file").arg(&ready);
        cmd.arg("--metrics-addr").arg(metrics_addr.to_string());
        let opt = |cmd: &mut Command, flag: &str, v: &Option<String>| {
            if let Some(v) = v {
                cmd.arg(flag).arg(v);
            }
        };
        opt(&mut cmd, "--collector", &opts.collector);
        opt(&mut cmd, "--interval", &opts.interval);
        opt(&mut cmd, "--node", &opts.node);
        opt(&mut cmd, "--duration", &opts.duration);
        opt(
            &mut cmd,
            "--capture-bytes",
            &opts.capture_bytes.map(|n| n.to_string()),
        );
        cmd.args(&opts.extra_args);
        let log = std::fs::File::create(&log_path)?;
        cmd.stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut agent = Agent {
            child: Some(child),
            dir,
            requests_path,
            metrics_addr,
            log_path,
        };
        let timeout = opts.ready_timeout.unwrap_or(Duration::from_secs(60));
        let res = wait_for(timeout, "agent ready file", || {
            if ready.exists() {
                return Some(Ok(()));
            }
            match agent.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(st))) => Some(Err(anyhow::anyhow!("agent exited early: {st}"))),
                _ => None,
            }
        });
        match res {
            Ok(Ok(())) => Ok(agent),
            Ok(Err(e)) | Err(e) => bail!("{e:#}\n--- agent log ---\n{}", agent.log()),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The agent's stdout+stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Every record written so far.
    pub fn records(&self) -> Result<Vec<AgentRecord>> {
        read_jsonl(&self.requests_path)
    }

    /// Waits until at least `n` records are written.
    pub fn wait_records(&self, n: usize, timeout: Duration) -> Result<Vec<AgentRecord>> {
        let r = wait_for(timeout, &format!("{n} agent records"), || {
            self.records().ok().filter(|r| r.len() >= n)
        });
        r.with_context(|| {
            format!(
                "have {} records\n--- agent log ---\n{}",
                self.records().map(|r| r.len()).unwrap_or(0),
                self.log()
            )
        })
    }

    /// Scrapes `/metrics`.
    pub fn metrics(&self) -> Result<Metrics> {
        let (status, body) = http_get(self.metrics_addr, "/metrics")
            .with_context(|| format!("agent metrics endpoint {}", self.metrics_addr))?;
        if status != 200 {
            bail!("/metrics returned {status}");
        }
        Ok(Metrics::parse(&body))
    }

    /// `/healthz` status code.
    pub fn healthz(&self) -> Result<u16> {
        Ok(http_get(self.metrics_addr, "/healthz")
            .with_context(|| format!("agent health endpoint {}", self.metrics_addr))?
            .0)
    }

    /// Sends SIGINT and waits (20 s) for a clean exit; kills it if it hangs and fails.
    pub fn stop(mut self) -> Result<AgentExit> {
        let mut child = self.child.take().context("agent already stopped")?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let st = wait_for(Duration::from_secs(20), "agent exit after SIGINT", || {
            child.try_wait().ok().flatten()
        });
        match st {
            Ok(status) => Ok(AgentExit {
                status,
                log: self.log(),
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{e:#} (killed)\n--- agent log ---\n{}", self.log())
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running collector (`infertap-collector --grpc-addr A --metrics-addr B`).
pub struct Collector {
    child: Child,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Collector {
    /// Starts the collector on free ports and waits until its gRPC port accepts connections.
    pub fn spawn() -> Result<Collector> {
        let bin = paths::collector_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("infertap-collector-")
            .tempdir()?;
        let log_path = dir.path().join("collector.log");
        let grpc_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(&bin)
            .arg("--grpc-addr")
            .arg(grpc_addr.to_string())
            .arg("--metrics-addr")
            .arg(metrics_addr.to_string())
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let up = wait_for(Duration::from_secs(20), "collector gRPC port", || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(anyhow::anyhow!("collector exited: {st}")));
            }
            std::net::TcpStream::connect(grpc_addr).ok().map(|_| Ok(()))
        });
        match up {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{e:#}\n--- collector log ---\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                )
            }
        }
        Ok(Collector {
            child,
            grpc_addr,
            metrics_addr,
            log_path,
            _dir: dir,
        })
    }

    /// The URL to pass as the agent's `--collector`.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub fn metrics(&self) -> Result<Metrics> {
        let (status, body) = http_get(self.metrics_addr, "/metrics")?;
        if status != 200 {
            bail!("collector /metrics returned {status}");
        }
        Ok(Metrics::parse(&body))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = wait_for(Duration::from_secs(5), "collector exit", || {
            self.child.try_wait().ok().flatten()
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One Prometheus sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed Prometheus / OpenMetrics text exposition.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, rest) = match line.find('{') {
                Some(i) => match line[i..].find('}') {
                    Some(j) => (&line[..i + j + 1], line[i + j + 1..].trim()),
                    None => continue,
                },
                None => match line.split_once(' ') {
                    Some((a, b)) => (a, b.trim()),
                    None => continue,
                },
            };
            let value = rest.split_whitespace().next().unwrap_or("");
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, parse_labels(l.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        Metrics { samples }
    }

    /// Sum of every sample named `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(|x| x.as_str()) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Sum of every counter sample (`*_total`) that carries a label with this value, whatever
    /// the label's name (e.g. `error="client_disconnect"`).
    pub fn sum_counters_with_label_value(&self, value: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name.ends_with("_total"))
            .filter(|s| s.labels.values().any(|v| v == value))
            .map(|s| s.value)
            .sum()
    }

    /// Names of all series, deduplicated.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.samples.iter().map(|s| s.name.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(after) = after.strip_prefix('"') else {
            break;
        };
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.insert(key, val);
        rest = &after[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let m = Metrics::parse(
            "# HELP x y\nfoo_total{a=\"1\",b=\"x,\\\"y\"} 3\nfoo_total{a=\"2\"} 4 1700000000\nbar 1.5\n# EOF\n",
        );
        assert_eq!(m.sum("foo_total", &[]), 7.0);
        assert_eq!(m.sum("foo_total", &[("a", "1")]), 3.0);
        assert_eq!(m.samples[0].labels["b"], "x,\"y");
        assert_eq!(m.sum("bar", &[]), 1.5);
        assert_eq!(m.names(), vec!["bar".to_string(), "foo_total".to_string()]);
    }
}
