//! The OTLP/gRPC receiver (`tests/servers/otlp_receiver.py`) as a child process: it decodes
//! with the official OpenTelemetry protobuf definitions (PyPI `opentelemetry-proto`, `grpcio`),
//! independent of the agent's code, and logs every export as JSON (protobuf JSON mapping:
//! camelCase names, 64-bit integers as strings, enums by name).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::paths;
use crate::servers::wait_for;

/// The venv with `opentelemetry-proto` and `grpcio` (`INFERTAP_OTLP_VENV` or
/// `~/.cache/infertap/otlp-venv`; `cargo xtask setup` creates it).
pub fn venv_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("INFERTAP_OTLP_VENV") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/infertap/otlp-venv")
}

/// Why the receiver cannot run here, if it cannot.
pub fn missing_receiver() -> Option<String> {
    let python = venv_dir().join("bin/python");
    let ok = Command::new(&python)
        .args([
            "-c",
            "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| {
        format!(
            "no OTLP receiver venv at {} (run `cargo xtask setup`)",
            venv_dir().display()
        )
    })
}

/// One export call the receiver got.
#[derive(Clone, Debug)]
pub struct Export {
    /// `traces` or `metrics`.
    pub signal: String,
    pub unix_ns: u64,
    /// gRPC metadata of the call.
    pub metadata: serde_json::Map<String, Value>,
    /// The request in protobuf JSON mapping.
    pub request: Value,
    /// The request's bytes as the receiver re-serialized them.
    pub raw: Vec<u8>,
}

/// A running receiver; killed on drop.
pub struct OtlpReceiver {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    out: PathBuf,
}

impl OtlpReceiver {
    /// Starts the receiver on `port` (0: a free one) with extra options (`--delay-ms N`,
    /// `--status UNAVAILABLE`).
    pub fn start(port: u16, args: &[&str]) -> Result<OtlpReceiver> {
        let dir = tempfile::Builder::new()
            .prefix("infertap-otlp-")
            .tempdir()?;
        let port_file = dir.path().join("port");
        let out = dir.path().join("exports.jsonl");
        let child = Command::new(venv_dir().join("bin/python"))
            .arg(paths::workspace_root().join("tests/servers/otlp_receiver.py"))
            .arg("--port")
            .arg(port.to_string())
            .arg("--port-file")
            .arg(&port_file)
            .arg("--out")
            .arg(&out)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn otlp_receiver.py")?;
        let mut r = OtlpReceiver {
            child,
            port: 0,
            dir,
            out,
        };
        r.port = wait_for(Duration::from_secs(20), "OTLP receiver port", || {
            std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
        })?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every export received so far.
    pub fn exports(&self) -> Result<Vec<Export>> {
        let text = match std::fs::read_to_string(&self.out) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        // The last line may be half written.
        for line in text.lines().filter(|l| l.ends_with('}')) {
            let v: Value = serde_json::from_str(line).context("receiver line")?;
            let raw_hex = v["raw_hex"].as_str().unwrap_or("");
            let raw = (0..raw_hex.len() / 2)
                .map(|i| u8::from_str_radix(&raw_hex[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .context("raw_hex")?;
            out.push(Export {
                signal: v["signal"].as_str().unwrap_or("").to_owned(),
                unix_ns: v["unix_ns"].as_u64().unwrap_or(0),
                metadata: v["metadata"].as_object().cloned().unwrap_or_default(),
                request: v["request"].clone(),
                raw,
            });
        }
        Ok(out)
    }

    /// Every span received, with its resource's attributes.
    pub fn spans(&self) -> Result<Vec<ReceivedSpan>> {
        let mut out = Vec::new();
        for e in self.exports()?.iter().filter(|e| e.signal == "traces") {
            for rs in array(&e.request["resourceSpans"]) {
                let resource = attributes(&rs["resource"]["attributes"]);
                for ss in array(&rs["scopeSpans"]) {
                    for s in array(&ss["spans"]) {
                        out.push(ReceivedSpan {
                            resource: resource.clone(),
                            span: s.clone(),
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// The metrics of the newest metrics export: name → the metric object.
    pub fn last_metrics(&self) -> Result<Option<serde_json::Map<String, Value>>> {
        let exports = self.exports()?;
        let Some(e) = exports.iter().rev().find(|e| e.signal == "metrics") else {
            return Ok(None);
        };
        let mut out = serde_json::Map::new();
        for rm in array(&e.request["resourceMetrics"]) {
            for sm in array(&rm["scopeMetrics"]) {
                for m in array(&sm["metrics"]) {
                    if let Some(name) = m["name"].as_str() {
                        out.insert(name.to_owned(), m.clone());
                    }
                }
            }
        }
        Ok(Some(out))
    }

    /// Fails if the receiver process died.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("OTLP receiver exited: {st}");
        }
        Ok(())
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A span and its resource's attributes.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub resource: serde_json::Map<String, Value>,
    pub span: Value,
}

impl ReceivedSpan {
    pub fn attrs(&self) -> serde_json::Map<String, Value> {
        attributes(&self.span["attributes"])
    }

    /// A 64-bit field of the protobuf JSON mapping (a string there).
    pub fn u64_field(&self, name: &str) -> Option<u64> {
        as_u64(&self.span[name])
    }
}

/// `[]` for a missing field.
pub fn array(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

/// OTLP `KeyValue`s as a map of key → plain JSON value (ints as numbers, arrays as arrays).
pub fn attributes(v: &Value) -> serde_json::Map<String, Value> {
    array(v)
        .iter()
        .filter_map(|kv| Some((kv["key"].as_str()?.to_owned(), any_value(&kv["value"]))))
        .collect()
}

fn any_value(v: &Value) -> Value {
    if let Some(s) = v.get("stringValue") {
        return s.clone();
    }
    if let Some(i) = v.get("intValue") {
        return as_u64(i)
            .map(Value::from)
            .or_else(|| {
                i.as_str()
                    .and_then(|s| s.parse::<i64>().ok())
                    .map(Value::from)
            })
            .unwrap_or(Value::Null);
    }
    if let Some(d) = v.get("doubleValue") {
        return d.clone();
    }
    if let Some(b) = v.get("boolValue") {
        return b.clone();
    }
    if let Some(a) = v.get("arrayValue") {
        return Value::Array(array(&a["values"]).iter().map(any_value).collect());
    }
    Value::Null
}

/// A 64-bit integer of the protobuf JSON mapping (string or number); absent means 0 there.
pub fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}
