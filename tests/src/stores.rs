//! Real remote-write stores for tests and benchmarks: VictoriaMetrics (`/usr/bin/victoria-metrics`)
//! and Prometheus (`/usr/bin/prometheus --web.enable-remote-write-receiver`), started on
//! loopback with their own data directory, and their query API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::collector_support::http_get;
use crate::servers::wait_for;

pub const VICTORIA_METRICS: &str = "/usr/bin/victoria-metrics";
pub const PROMETHEUS: &str = "/usr/bin/prometheus";

/// `Some(reason)` when the store binary is not installed (`cargo xtask setup` installs both).
pub fn missing(bin: &str) -> Option<String> {
    (!Path::new(bin).exists()).then(|| format!("{bin} not installed (cargo xtask setup)"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Victoria,
    Prometheus,
}

/// A running store; killed on drop. Its data directory outlives it (restart with [`Store::start`]
/// on the same directory and port).
pub struct Store {
    child: Child,
    pub kind: Kind,
    pub addr: SocketAddr,
    pub data: PathBuf,
}

/// One series read back: labels (`__name__` included) and its (unix ms, value) samples.
pub type SeriesSamples = (BTreeMap<String, String>, Vec<(i64, f64)>);

impl Store {
    /// Starts `kind` on `addr` storing into `data`, and waits until it is ready.
    pub fn start(kind: Kind, addr: SocketAddr, data: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(data)?;
        let mut cmd = match kind {
            Kind::Victoria => {
                let mut c = Command::new(VICTORIA_METRICS);
                c.arg(format!("-storageDataPath={}", data.join("vm").display()))
                    .arg(format!("-httpListenAddr={addr}"))
                    // Show samples at once (the default hides the last 30 s) and never cache.
                    .arg("-search.latencyOffset=0s")
                    .arg("-search.disableCache")
                    .arg("-loggerLevel=WARN");
                c
            }
            Kind::Prometheus => {
                let cfg = data.join("prometheus.yml");
                std::fs::write(&cfg, "global:\n  scrape_interval: 15s\n")?;
                let mut c = Command::new(PROMETHEUS);
                c.arg(format!("--config.file={}", cfg.display()))
                    .arg(format!(
                        "--storage.tsdb.path={}",
                        data.join("tsdb").display()
                    ))
                    .arg(format!("--web.listen-address={addr}"))
                    .arg("--web.enable-remote-write-receiver")
                    .arg("--log.level=warn");
                c
            }
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {kind:?}"))?;
        let store = Store {
            child,
            kind,
            addr,
            data: data.to_owned(),
        };
        let ready = match kind {
            Kind::Victoria => "/health",
            Kind::Prometheus => "/-/ready",
        };
        wait_for(
            Duration::from_secs(60),
            &format!("{kind:?} on {addr}"),
            || matches!(http_get(addr, ready), Ok((200, _))).then_some(()),
        )?;
        Ok(store)
    }

    /// The remote-write URL.
    pub fn write_url(&self) -> String {
        format!("http://{}/api/v1/write", self.addr)
    }

    /// Stops the store (SIGKILL, like an outage).
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Makes recently written samples searchable (VictoriaMetrics buffers them briefly).
    pub fn flush(&self) {
        if self.kind == Kind::Victoria {
            let _ = http_get(self.addr, "/internal/force_flush");
        }
    }

    fn api(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = get_http10(self.addr, path)?;
        anyhow::ensure!(status == 200, "{path}: HTTP {status}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        anyhow::ensure!(v["status"] == "success", "{path}: {body}");
        Ok(v)
    }

    /// Instant query at `time_s` (unix seconds): (labels, value) per series.
    pub fn query(
        &self,
        promql: &str,
        time_s: f64,
    ) -> anyhow::Result<Vec<(BTreeMap<String, String>, f64)>> {
        self.flush();
        let v = self.api(&format!(
            "/api/v1/query?query={}&time={time_s:.3}",
            encode(promql)
        ))?;
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().context("no result")? {
            let labels = labels_of(&r["metric"]);
            let val: f64 = r["value"][1].as_str().context("no value")?.parse()?;
            out.push((labels, val));
        }
        Ok(out)
    }

    /// Every raw sample of the series matching `selector` in the `window_s` seconds before
    /// `time_s` (a range-vector instant query, which both stores answer with raw samples).
    pub fn raw(
        &self,
        selector: &str,
        time_s: f64,
        window_s: u64,
    ) -> anyhow::Result<Vec<SeriesSamples>> {
        self.flush();
        let q = format!("{selector}[{window_s}s]");
        let v = self.api(&format!(
            "/api/v1/query?query={}&time={time_s:.3}",
            encode(&q)
        ))?;
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().context("no result")? {
            let labels = labels_of(&r["metric"]);
            let mut samples = Vec::new();
            for s in r["values"].as_array().context("no values")? {
                let ts = (s[0].as_f64().context("ts")? * 1000.0).round() as i64;
                let val: f64 = s[1].as_str().context("value")?.parse()?;
                samples.push((ts, val));
            }
            out.push((labels, samples));
        }
        Ok(out)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET over HTTP/1.0, so the answer is never chunked (the body runs to the close).
fn get_http10(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of the response head")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    Ok((status, body.to_owned()))
}

fn labels_of(m: &serde_json::Value) -> BTreeMap<String, String> {
    m.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
