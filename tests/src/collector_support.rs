//! Helpers for the collector tests: run the real `infertap-collector` binary, scrape a
//! Prometheus endpoint over plain HTTP/1.1 and look samples up in OpenMetrics text.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Path of the `infertap-collector` binary: `$INFERTAP_COLLECTOR_BIN`, or built once with cargo
/// into the target directory this test binary lives in.
pub fn collector_binary() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_collector().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_collector() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("INFERTAP_COLLECTOR_BIN") {
        return Ok(PathBuf::from(p));
    }
    // <target>/<profile>/deps/<test binary>
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .context("test binary outside a target dir")?;
    let target_dir = profile_dir.parent().context("profile dir without parent")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-q",
        "-p",
        "infertap-collector",
        "--bin",
        "infertap-collector",
    ])
    .env("CARGO_TARGET_DIR", target_dir)
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    anyhow::ensure!(
        status.success(),
        "cargo build -p infertap-collector failed: {status}"
    );
    let bin = profile_dir.join("infertap-collector");
    anyhow::ensure!(bin.exists(), "{} missing after build", bin.display());
    Ok(bin)
}

/// A running collector process, killed on drop.
pub struct CollectorProcess {
    child: Child,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Temporary `--state-dir` when the caller gave none.
    _state: Option<tempfile::TempDir>,
}

impl CollectorProcess {
    /// Starts the collector with `--grpc-addr grpc --metrics-addr 127.0.0.1:0` plus `extra` args
    /// and waits for its "listening" line.
    /// Without `--state-dir`/`--no-state` in `extra`, the state goes to a temporary directory
    /// (the default `/var/lib/infertap-collector` would be shared by parallel tests).
    pub fn start(grpc: SocketAddr, extra: &[&str]) -> anyhow::Result<CollectorProcess> {
        let own_state = !extra
            .iter()
            .any(|a| *a == "--state-dir" || *a == "--no-state");
        let state = if own_state {
            Some(
                tempfile::Builder::new()
                    .prefix("infertap-cstate-")
                    .tempdir()?,
            )
        } else {
            None
        };
        let mut cmd = Command::new(collector_binary()?);
        if let Some(d) = &state {
            cmd.arg("--state-dir").arg(d.path());
        }
        let mut child = cmd
            .args([
                "--grpc-addr",
                &grpc.to_string(),
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning infertap-collector")?;
        let stdout = child.stdout.take().context("no stdout")?;
        // Read the one line on a thread so a collector that never prints cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                bail!("collector did not report its addresses");
            }
        };
        let addr = |key: &str| -> anyhow::Result<SocketAddr> {
            let v = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .with_context(|| format!("no {key} in {line:?}"))?;
            Ok(v.parse()?)
        };
        let (grpc_addr, metrics_addr) = match (addr("grpc="), addr("metrics=")) {
            (Ok(g), Ok(m)) => (g, m),
            (Err(e), _) | (_, Err(e)) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(CollectorProcess {
            child,
            grpc_addr,
            metrics_addr,
            _state: state,
        })
    }

    /// The collector's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no graceful shutdown, like a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn terminate(mut self) -> anyhow::Result<bool> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        Ok(self.child.wait()?.success())
    }

    pub fn scrape(&self) -> anyhow::Result<Metrics> {
        scrape(self.metrics_addr)
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 answer with a binary body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// GET `path` over HTTP/1.1 with `Connection: close`, binary-safe (no chunked bodies).
pub fn http_get_bytes(addr: SocketAddr, path: &str) -> anyhow::Result<HttpAnswer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?;
    let head = String::from_utf8_lossy(&resp[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no status")?
        .parse()
        .context("bad status")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    anyhow::ensure!(
        !headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")),
        "chunked responses not expected"
    );
    Ok(HttpAnswer {
        status,
        headers,
        body: resp[end + 4..].to_vec(),
    })
}

/// GET `path` over HTTP/1.1; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()
        .context("bad status")?;
    anyhow::ensure!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked responses not expected from the metrics endpoints"
    );
    Ok((status, body.to_owned()))
}

/// Scrapes `/metrics` and parses it.
pub fn scrape(addr: SocketAddr) -> anyhow::Result<Metrics> {
    let (status, body) = http_get(addr, "/metrics")?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Metrics::parse(&body)
}

/// Parsed samples of an OpenMetrics/Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> anyhow::Result<Metrics> {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("bad line {line:?}"))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .with_context(|| format!("bad value in {line:?}"))?,
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .with_context(|| format!("bad labels in {line:?}"))?;
                    let mut labels = BTreeMap::new();
                    // Our label values never contain quotes or commas.
                    for pair in inner.split(',').filter(|p| !p.is_empty()) {
                        let (k, v) = pair
                            .split_once('=')
                            .with_context(|| format!("bad label in {line:?}"))?;
                        labels.insert(k.to_owned(), v.trim_matches('"').to_owned());
                    }
                    (name.to_owned(), labels)
                }
            };
            samples.push((name, labels, value));
        }
        Ok(Metrics {
            text: text.to_owned(),
            samples,
        })
    }

    /// Every sample: name, labels, value.
    pub fn samples(&self) -> &[(String, BTreeMap<String, String>, f64)] {
        &self.samples
    }

    /// The sample `name` whose labels are exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|s| s.2)
    }

    /// Sum of every sample `name` whose labels include `labels` (PromQL `sum(name{labels})`).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.2)
            .sum()
    }

    /// Whether any sample of `name` has all of `labels`.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples.iter().any(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

/// A 127.0.0.1 port nothing listens on right now.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
