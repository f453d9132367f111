//! Test servers as child processes: the scripted SSE server and the real llama.cpp server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::paths;

/// A free loopback TCP port (bound then released; good enough for tests on one machine).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Minimal blocking HTTP GET on loopback; returns (status, body). For health and metrics.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no response head")?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("bad status line")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Waits until `f` returns `Some`, polling every 20 ms.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One exchange as the scripted server logged it (see `tests/servers/scripted_sse.py`).
#[derive(Clone, Debug, Deserialize)]
pub struct Emission {
    pub peer: String,
    pub seq_on_conn: u32,
    pub method: String,
    pub path: String,
    pub scenario: String,
    pub status: Option<u16>,
    pub stream: bool,
    pub request_unix_ns: Option<u64>,
    pub response_start_unix_ns: Option<u64>,
    /// Time right after the send that completed each content event.
    pub events_unix_ns: Vec<u64>,
    /// Time right before that send: the kernel saw the bytes between the two.
    #[serde(default)]
    pub events_send_start_unix_ns: Vec<u64>,
    pub tokens_per_event: Vec<u32>,
    pub output_tokens: u64,
    pub end_unix_ns: u64,
    pub completed: bool,
    /// Streams: the shape spoken (`--script` `shape`).
    #[serde(default)]
    pub shape: Option<String>,
    /// The `stream_kind` the agent must report.
    #[serde(default)]
    pub stream_kind: Option<String>,
    /// The finish reason the agent must report (closed vocabulary), when the shape has one.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// The output-token usage the stream reported, when it did.
    #[serde(default)]
    pub usage_output_tokens: Option<u64>,
    /// False for shapes without token semantics (the agent must then report no token count).
    #[serde(default = "yes")]
    pub tokens_known: bool,
    /// Choice index of each content event.
    #[serde(default)]
    pub choice_per_event: Vec<u32>,
}

fn yes() -> bool {
    true
}

/// The scripted OpenAI-compatible server (python3, stdlib only).
pub struct ScriptedServer {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    emit_log: PathBuf,
}

impl ScriptedServer {
    /// Starts the server with `script` (see the script format in `scripted_sse.py`).
    pub fn start(script: &serde_json::Value) -> Result<Self> {
        Self::start_with(script, &[])
    }

    /// Like [`ScriptedServer::start`] with extra command-line options (e.g. `--max-conns 4`,
    /// `--accept-delay-ms 20`, `--backlog 8` for overload).
    pub fn start_with(script: &serde_json::Value, args: &[&str]) -> Result<Self> {
        Self::start_under(script, args, &[], "python3")
    }

    /// Like [`ScriptedServer::start_with`], run by `python` under the command `wrapper` (e.g.
    /// `setpriv --reuid 65534 ...`: a server of another user, as in another container). The
    /// server's directory is then world-writable so that user can write its port and log.
    pub fn start_under(
        script: &serde_json::Value,
        args: &[&str],
        wrapper: &[String],
        python: &str,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("infertap-scripted-")
            .tempdir()?;
        if !wrapper.is_empty() {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        }
        let script_path = dir.path().join("script.json");
        std::fs::write(&script_path, serde_json::to_vec(script)?)?;
        let port_file = dir.path().join("port");
        let emit_log = dir.path().join("emissions.jsonl");
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(python);
                c
            }
            None => Command::new(python),
        };
        let child = cmd
            .arg(paths::scripted_server_script())
            .arg("--script")
            .arg(&script_path)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--emit-log")
            .arg(&emit_log)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawn {python} scripted_sse.py"))?;
        let mut s = ScriptedServer {
            child,
            port: 0,
            dir,
            emit_log,
        };
        s.port = wait_for(Duration::from_secs(10), "scripted server port", || {
            std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
        })?;
        Ok(s)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every exchange logged so far, but the agent's own reads of the server's `/metrics`
    /// (`GET /metrics`: the tests' clients never ask for it; the agent reads it on every
    /// listening port of a traced server and does not report those reads as requests).
    pub fn emissions(&self) -> Result<Vec<Emission>> {
        let all: Vec<Emission> = read_jsonl(&self.emit_log)?;
        Ok(all
            .into_iter()
            .filter(|e| !(e.method == "GET" && e.path == "/metrics"))
            .collect())
    }

    /// Waits until at least `n` exchanges are logged.
    pub fn wait_emissions(&self, n: usize, timeout: Duration) -> Result<Vec<Emission>> {
        wait_for(timeout, &format!("{n} server emissions"), || {
            self.emissions().ok().filter(|e| e.len() >= n)
        })
    }

    /// Waits for the server process to exit (e.g. a scenario with `exit_after`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        wait_for(timeout, "scripted server exit", || {
            self.child.try_wait().ok().flatten()
        })
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a JSON-lines file, skipping a partially written last line.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            Err(_) if !text.ends_with('\n') && text.ends_with(line) => break,
            Err(e) => bail!("{}: bad line {line:?}: {e}", path.display()),
        }
    }
    Ok(out)
}

/// The `model` name the real server reports.
pub const MODEL_ALIAS: &str = "SmolLM2-135M-Instruct";

/// The real llama.cpp server (llama-cpp-python) with SmolLM2-135M.
pub struct LlamaServer {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl LlamaServer {
    /// Starts it on a free port and waits (up to 180 s) until the model answers `/v1/models`.
    pub fn start(n_threads: u32) -> Result<Self> {
        let (python, model) = paths::real_server_parts()?;
        let port = free_port()?;
        let dir = tempfile::Builder::new()
            .prefix("infertap-llama-")
            .tempdir()?;
        let log = dir.path().join("server.log");
        let logf = std::fs::File::create(&log)?;
        let child = Command::new(python)
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--n_threads", &n_threads.to_string(), "--verbose", "false"])
            // By default a new request cancels the stream in progress; we want real concurrency
            // (requests queue for the model and stream one after another).
            .args(["--interrupt_requests", "false"])
            // A short model name in responses and metrics labels instead of the gguf path.
            .args(["--model_alias", MODEL_ALIAS])
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("spawn llama_cpp.server")?;
        let mut s = LlamaServer {
            child,
            port,
            log,
            _dir: dir,
        };
        let addr = s.addr();
        let res = wait_for(Duration::from_secs(180), "llama server /v1/models", || {
            if let Ok(Some(st)) = s.child.try_wait() {
                return Some(Err(anyhow::anyhow!("llama server exited: {st}")));
            }
            match http_get(addr, "/v1/models") {
                Ok((200, _)) => Some(Ok(())),
                _ => None,
            }
        });
        match res {
            Ok(Ok(())) => Ok(s),
            Ok(Err(e)) | Err(e) => {
                let tail = std::fs::read_to_string(&s.log).unwrap_or_default();
                let tail: String = tail
                    .chars()
                    .rev()
                    .take(2000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                bail!("{e:#}\n--- server log tail ---\n{tail}")
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
