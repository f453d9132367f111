//! `infertap`: the command line. All logic lives in the library (`pipeline` and its stages).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use infertap::{
    gpu::{cupti::DetailLevel, stage::GpuOptions},
    pipeline::{AgentOptions, CudaOptions, Pipeline},
    probes::{
        profile::{ProfileConfig, SwitchHook},
        ProbeConfig,
    },
    profiling::{aggregate::ProfileType, stage::ProfilerOptions},
    sinks::explain::{render_explain_with, ExplainOptions, RankBy},
    sinks::otlp::OtlpConfig,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "infertap",
    version,
    about = "Zero-code profiler for LLM inference servers: per-request and per-token timings from eBPF, joined with GPU activity",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent (the default when no subcommand is given).
    Run(Box<AgentArgs>),
    /// Record a Perfetto-loadable timeline (requests, tokens, CUDA calls, GPU kernels, power).
    Trace(TraceArgs),
    /// Watch for a while, then explain the slowest requests and tokens with their GPU causes.
    Explain(ExplainArgs),
    /// Record a profile (pprof) of the traced processes for a while.
    Profile(ProfileArgs),
}

/// Which processes to watch and how.
#[derive(Args, Debug, Clone)]
struct TargetArgs {
    /// Process to trace (repeatable). Its children are followed.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Trace the process(es) listening on this TCP port (repeatable); re-resolved periodically.
    #[arg(long = "port", value_name = "PORT")]
    ports: Vec<u16>,
    /// Payload bytes captured per syscall (max 4096). Larger values see more of big requests.
    #[arg(long, default_value_t = infertap_common::DEFAULT_CAPTURE, value_name = "BYTES")]
    capture_bytes: u32,
    /// Do not stamp requests' arrival at the socket (TCP tracepoints): requests then start when
    /// the server reads them and queueing before the read is not seen.
    #[arg(long)]
    no_arrival: bool,
    /// Size of the kernel→agent event ring buffer (a power of two).
    #[arg(long, default_value = "16777216", value_name = "BYTES")]
    ringbuf_bytes: u32,
    /// How often the agent drains the ring buffer (the kernel also wakes it when the ring fills).
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Do not probe the CUDA launch path (libcuda/libcudart uprobes).
    #[arg(long)]
    no_cuda: bool,
    /// Also probe this CUDA library (repeatable); libraries mapped by traced processes are found
    /// automatically.
    #[arg(long = "cuda-lib", value_name = "PATH")]
    cuda_libs: Vec<PathBuf>,
    /// Probe CUDA calls of every process using the libraries, not only the traced processes
    /// (for engines that are not children of the traced server).
    #[arg(long)]
    cuda_all_processes: bool,
    /// Record every CUDA call individually (costly; default: aggregate in the kernel).
    #[arg(long)]
    cuda_events: bool,
    /// Do not sample NVML.
    #[arg(long)]
    no_nvml: bool,
    /// NVML library to load (default: libnvidia-ml.so.1 from the loader path).
    #[arg(long, value_name = "PATH")]
    nvml_lib: Option<PathBuf>,
    /// NVML power/energy sampling period (at most 100ms).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    power_period: Duration,
    /// Unix socket for the CUPTI injection library (`off` disables).
    #[arg(long, default_value = infertap::gpu::cupti::DEFAULT_SOCKET, value_name = "PATH|off")]
    cupti_socket: String,
    /// CUPTI detail: full (every kernel and copy), graphs (one record per CUDA graph launch), off.
    #[arg(long, value_enum, default_value_t = Detail::Full)]
    cupti_detail: Detail,
    /// On-CPU profiling: timer samples per second per CPU of the traced processes' threads
    /// (kernel and user stacks, native and Python frames). 0 turns CPU sampling off. Default:
    /// 49 (199 for `explain`, whose attribution of single token gaps needs denser samples).
    #[arg(long, value_name = "HZ")]
    profile_hz: Option<u64>,
    /// Off-CPU profiling: capture the stack of 1 in N switch-outs of traced threads (each stands
    /// for N). 0 turns off-CPU profiling off. Default: 16 (4 for `explain`).
    #[arg(long, value_name = "N")]
    offcpu_every: Option<u32>,
    /// Most off-CPU captures per second: when the traced threads switch more often, N above is
    /// raised so captures stay near this rate (each stands for the N it was taken at). 0 keeps
    /// N fixed. Default: 100 (1000 for `explain`).
    #[arg(long, value_name = "PER_S")]
    offcpu_budget: Option<u32>,
    /// The context-switch hook of off-CPU profiling: auto (the raw tracepoint when the kernel's
    /// BTF describes struct task_struct, the classic tracepoint otherwise), raw, or classic.
    /// The raw one costs every context switch of the machine less.
    #[arg(long, value_enum, default_value_t = SwitchHookArg::Auto)]
    offcpu_hook: SwitchHookArg,
    /// GPU time by call path: capture the launching stack of 1 in N CUDA kernel/graph launches
    /// (each stands for N). 0 turns it off.
    #[arg(long, default_value_t = 64, value_name = "N")]
    gpu_stack_every: u32,
    /// User stack bytes copied per sample for unwinding (at most the kernel's maximum).
    #[arg(long, default_value_t = infertap_common::profile::DEFAULT_STACK_BYTES, value_name = "BYTES")]
    profile_stack_bytes: u32,
    /// No profiling at all (no perf events, no sched_switch, no stack captures).
    #[arg(long)]
    no_profile: bool,
    /// Stop after this long (default: run until SIGINT/SIGTERM).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Create this file once the probes are attached (for scripts and tests).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, default_value = "info", env = "INFERTAP_LOG")]
    log: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SwitchHookArg {
    Auto,
    Raw,
    Classic,
}

impl From<SwitchHookArg> for SwitchHook {
    fn from(a: SwitchHookArg) -> Self {
        match a {
            SwitchHookArg::Auto => SwitchHook::Auto,
            SwitchHookArg::Raw => SwitchHook::RawTracepoint,
            SwitchHookArg::Classic => SwitchHook::Tracepoint,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Detail {
    Full,
    Graphs,
    Off,
}

#[derive(Args, Debug, Clone)]
struct AgentArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Write one JSON line per completed request to this file (`-` for stdout).
    #[arg(long, value_name = "PATH|-")]
    requests: Option<String>,
    /// Print a short human-readable line per completed request to stderr.
    #[arg(long)]
    print: bool,
    /// Prometheus endpoint (/metrics, /healthz). `off` disables it.
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR|off")]
    metrics_addr: String,
    /// Stream interval aggregates to this collector (e.g. http://collector:50051).
    #[arg(long, value_name = "URL")]
    collector: Option<String>,
    /// Aggregation interval for the collector stream.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Node name reported to the collector (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// Agent name reported to the collector (its `agent` label). Default: an id generated once
    /// and kept in `--state-dir`, so restarts keep their series.
    #[arg(long, env = "INFERTAP_AGENT_ID")]
    agent_id: Option<String>,
    /// Where the agent keeps its generated id.
    #[arg(long, default_value = infertap::identity::DEFAULT_STATE_DIR, env = "INFERTAP_STATE_DIR")]
    state_dir: PathBuf,
    /// Also write each interval's profiles (pprof) into this directory as
    /// <type>-<start unix ms>.pb.gz; the newest 360 per type are kept.
    #[arg(long, value_name = "DIR")]
    profile_dir: Option<PathBuf>,
    /// Do not read the traced servers' own Prometheus `/metrics` (vLLM, SGLang, TGI,
    /// llama.cpp) for the `infertap_server_*` series.
    #[arg(long)]
    no_server_metrics: bool,
    #[command(flatten)]
    otlp: OtlpArgs,
    #[command(flatten)]
    k8s: K8sArgs,
}

/// OTLP export (spans per request, the metrics of the Prometheus endpoint).
#[derive(Args, Debug, Clone)]
struct OtlpArgs {
    /// Export one span per request and the metrics to this OTLP/gRPC endpoint (e.g.
    /// http://otel-collector:4317).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// gRPC metadata sent with every OTLP export, e.g. `authorization=Bearer …` (repeatable).
    #[arg(long = "otlp-header", value_name = "KEY=VALUE", value_parser = infertap::sinks::otlp::parse_header)]
    otlp_headers: Vec<(String, String)>,
    /// `service.name` of the exported resources.
    #[arg(long, default_value = "infertap", value_name = "NAME")]
    otlp_service_name: String,
    /// How often the metrics are exported over OTLP (default: the aggregation --interval; 0s
    /// exports spans only).
    #[arg(long, value_parser = humantime::parse_duration)]
    otlp_interval: Option<Duration>,
    /// Spans held for the OTLP exporter while it is busy; beyond it spans are dropped and
    /// counted (`infertap_events_dropped_total{reason="otlp_queue_full"}`).
    #[arg(long, default_value_t = 4096, value_name = "SPANS")]
    otlp_queue_size: usize,
}

/// Kubernetes pod metadata on series and request lines.
#[derive(Args, Debug, Clone)]
struct K8sArgs {
    /// Pod metadata: auto (on inside a pod, i.e. with KUBERNETES_SERVICE_HOST set, or with
    /// --kubelet-url), on, off.
    #[arg(long = "k8s", value_enum, default_value_t = infertap::metadata::K8sMode::Auto)]
    mode: infertap::metadata::K8sMode,
    /// Kubelet base URL for pod names (`/pods` is appended). Default: https://$NODE_IP:10250.
    #[arg(long, value_name = "URL")]
    kubelet_url: Option<String>,
    /// Bearer token for the kubelet (re-read per request). Default: the pod's service-account
    /// token when present.
    #[arg(long, value_name = "PATH")]
    kubelet_token_file: Option<PathBuf>,
    /// CA bundle the kubelet's serving certificate must chain to. Default: the pod's
    /// service-account CA when present.
    #[arg(long, value_name = "PATH")]
    kubelet_ca_file: Option<PathBuf>,
    /// Do not verify the kubelet's certificate (self-signed kubelet serving certificates).
    #[arg(long)]
    kubelet_insecure_tls: bool,
}

#[derive(Args, Debug, Clone)]
struct TraceArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Where to write the Chrome/Perfetto trace JSON.
    #[arg(long, default_value = "trace.json")]
    out: PathBuf,
}

#[derive(Args, Debug, Clone)]
struct ExplainArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Requests to explain.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Slow tokens to explain per request.
    #[arg(long, default_value_t = 3)]
    top_tokens: usize,
    /// Rank requests by end-to-end latency, time to first token, or their longest token gap.
    #[arg(long, value_enum, default_value_t = Rank::E2e)]
    rank_by: Rank,
    /// Also write the requests' JSON lines (with GPU attribution) here.
    #[arg(long, value_name = "PATH|-")]
    requests: Option<String>,
}

#[derive(Args, Debug, Clone)]
struct ProfileArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Which profile to write: cpu (on-CPU samples), offcpu (blocked/preempted time), gpu (CUDA
    /// launches by call path), slow_tokens (time inside slow token gaps).
    #[arg(long = "type", value_enum, default_value_t = Kind::Cpu)]
    kind: Kind,
    /// Where to write the gzipped pprof (`go tool pprof` reads it).
    #[arg(long, default_value = "profile.pb.gz")]
    out: PathBuf,
    /// Also write every profile type that has samples into this directory as <type>.pb.gz.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Node name put on the samples (default: the host name).
    #[arg(long)]
    node: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Cpu,
    Offcpu,
    Gpu,
    SlowTokens,
}

impl Kind {
    fn profile_type(self) -> ProfileType {
        match self {
            Kind::Cpu => ProfileType::Cpu,
            Kind::Offcpu => ProfileType::OffCpu,
            Kind::Gpu => ProfileType::Gpu,
            Kind::SlowTokens => ProfileType::SlowTokens,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Rank {
    E2e,
    Ttft,
    MaxGap,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Sampling defaults: continuous profiling is cheap enough to leave on; a diagnostic window
/// (`explain`) samples denser.
#[derive(Clone, Copy)]
struct SamplingDefaults {
    hz: u64,
    offcpu_every: u32,
    offcpu_budget: u32,
}

const CONTINUOUS: SamplingDefaults = SamplingDefaults {
    hz: 49,
    offcpu_every: 16,
    offcpu_budget: 100,
};
const DIAGNOSTIC: SamplingDefaults = SamplingDefaults {
    hz: 199,
    offcpu_every: 4,
    offcpu_budget: 1000,
};

fn options(t: &TargetArgs) -> Result<AgentOptions> {
    options_with(t, CONTINUOUS)
}

fn options_with(t: &TargetArgs, d: SamplingDefaults) -> Result<AgentOptions> {
    let profile_hz = t.profile_hz.unwrap_or(d.hz);
    let offcpu_every = t.offcpu_every.unwrap_or(d.offcpu_every);
    if t.pids.is_empty() && t.ports.is_empty() {
        bail!("nothing to trace: give --pid <PID> or --port <PORT>");
    }
    let cupti_socket = (t.cupti_socket != "off").then(|| PathBuf::from(&t.cupti_socket));
    let profiling = !t.no_profile && (profile_hz > 0 || offcpu_every > 0 || t.gpu_stack_every > 0);
    let profile = if profiling {
        ProfileConfig {
            hz: profile_hz,
            offcpu_sample_every: offcpu_every,
            launch_sample_every: if t.no_cuda { 0 } else { t.gpu_stack_every },
            stack_bytes: t.profile_stack_bytes,
            switch_hook: t.offcpu_hook.into(),
            ..ProfileConfig::default()
        }
    } else {
        ProfileConfig {
            hz: 0,
            offcpu_sample_every: 0,
            launch_sample_every: 0,
            ..ProfileConfig::default()
        }
    };
    let profiler = profiling.then(|| ProfilerOptions {
        hz: profile_hz,
        node: host_name(),
        offcpu_every,
        offcpu_budget: t.offcpu_budget.unwrap_or(d.offcpu_budget),
        launch_every: profile.launch_sample_every,
        ..ProfilerOptions::default()
    });
    Ok(AgentOptions {
        pids: t.pids.clone(),
        ports: t.ports.clone(),
        requests: None,
        print: false,
        probe: ProbeConfig {
            capture_bytes: t.capture_bytes,
            ringbuf_bytes: t.ringbuf_bytes,
            profile,
            arrival: !t.no_arrival,
            ..ProbeConfig::default()
        },
        poll_interval: t.poll_interval,
        duration: t.duration,
        ready_file: t.ready_file.clone(),
        rescan_interval: Duration::from_secs(1),
        cuda: CudaOptions {
            enabled: !t.no_cuda,
            libs: t.cuda_libs.clone(),
            all_processes: t.cuda_all_processes,
            per_event: t.cuda_events,
        },
        gpu: GpuOptions {
            nvml: !t.no_nvml,
            nvml_lib: t.nvml_lib.clone(),
            power_period: t.power_period,
            cupti_socket,
            cupti_detail: match t.cupti_detail {
                Detail::Full => DetailLevel::Full,
                Detail::Graphs => DetailLevel::Graphs,
                Detail::Off => DetailLevel::Off,
            },
            ..GpuOptions::default()
        },
        metrics_addr: None,
        collector: None,
        interval: Duration::from_secs(10),
        node: host_name(),
        agent_id: None,
        state_dir: PathBuf::from(infertap::identity::DEFAULT_STATE_DIR),
        keep_requests: false,
        trace: false,
        profiler,
        profile_dir: None,
        otlp: None,
        server_metrics: false,
        k8s: None,
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn summary(p: &Pipeline) {
    let s = p.reconstructor().stats();
    tracing::info!(
        "stopped: {} requests, {} connections, {} malformed, {} kernel events lost",
        s.records,
        s.connections_opened + s.connections_adopted,
        s.malformed,
        p.probes().counters().lost()
    );
}

async fn run_agent(a: AgentArgs) -> Result<()> {
    let mut opts = options(&a.target)?;
    opts.requests = a.requests.clone();
    opts.print = a.print;
    opts.metrics_addr = match a.metrics_addr.as_str() {
        "off" => None,
        s => Some(
            s.parse::<SocketAddr>()
                .with_context(|| format!("--metrics-addr {s}"))?,
        ),
    };
    opts.collector = a.collector.clone();
    opts.agent_id = a.agent_id.clone();
    opts.state_dir = a.state_dir.clone();
    opts.interval = a.interval;
    opts.profile_dir = a.profile_dir.clone();
    opts.server_metrics = !a.no_server_metrics;
    opts.k8s = infertap::metadata::K8sOptions::resolve(
        a.k8s.mode,
        a.k8s.kubelet_url.clone(),
        a.k8s.kubelet_token_file.clone(),
        a.k8s.kubelet_ca_file.clone(),
        a.k8s.kubelet_insecure_tls,
    );
    if let Some(n) = &a.node {
        opts.node = n.clone();
    }
    if let Some(p) = opts.profiler.as_mut() {
        p.node = opts.node.clone();
    }
    if let Some(url) = &a.otlp.otlp_endpoint {
        let mut cfg = OtlpConfig::new(url.clone(), opts.node.clone());
        cfg.client.headers = a.otlp.otlp_headers.clone();
        cfg.service_name = a.otlp.otlp_service_name.clone();
        cfg.queue_capacity = a.otlp.otlp_queue_size;
        let every = a.otlp.otlp_interval.unwrap_or(a.interval);
        cfg.metrics_interval = (!every.is_zero()).then_some(every);
        opts.otlp = Some(cfg);
    }
    let p = Pipeline::new(opts).await?.run(shutdown_signal()).await?;
    summary(&p);
    Ok(())
}

async fn run_trace(a: TraceArgs) -> Result<()> {
    let mut opts = options(&a.target)?;
    if opts.duration.is_none() {
        opts.duration = Some(Duration::from_secs(10));
    }
    opts.trace = true;
    // A trace window records every CUDA call, not just the aggregates.
    opts.cuda.per_event = true;
    let mut p = Pipeline::new(opts).await?.run(shutdown_signal()).await?;
    let trace = p.take_trace().context("trace writer missing")?;
    trace
        .write_file(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {} trace events to {} (open it in https://ui.perfetto.dev){}",
        trace.len(),
        a.out.display(),
        if trace.dropped() > 0 {
            format!("; {} events over the cap were dropped", trace.dropped())
        } else {
            String::new()
        }
    );
    summary(&p);
    Ok(())
}

async fn run_explain(a: ExplainArgs) -> Result<()> {
    let mut opts = options_with(&a.target, DIAGNOSTIC)?;
    if let Some(p) = opts.profiler.as_mut() {
        p.keep_attributions = true;
    }
    if opts.duration.is_none() {
        opts.duration = Some(Duration::from_secs(30));
    }
    opts.keep_requests = true;
    opts.requests = a.requests.clone();
    opts.cuda.per_event = true;
    let mut p = Pipeline::new(opts).await?.run(shutdown_signal()).await?;
    let reqs = p.take_kept();
    let cpu = p
        .take_profiler_report()
        .map(|r| r.attributions)
        .unwrap_or_default();
    let eo = ExplainOptions {
        rank_by: match a.rank_by {
            Rank::E2e => RankBy::E2e,
            Rank::Ttft => RankBy::Ttft,
            Rank::MaxGap => RankBy::MaxGap,
        },
        top_requests: a.top,
        top_tokens: a.top_tokens,
        show_gpu: p.gpu_active(),
        ..ExplainOptions::default()
    };
    print!("{}", render_explain_with(&reqs, &cpu, &eo));
    summary(&p);
    Ok(())
}

async fn run_profile(a: ProfileArgs) -> Result<()> {
    let mut opts = options(&a.target)?;
    if opts.duration.is_none() {
        opts.duration = Some(Duration::from_secs(10));
    }
    if let Some(n) = &a.node {
        opts.node = n.clone();
    }
    let node = opts.node.clone();
    let Some(po) = opts.profiler.as_mut() else {
        bail!("profiling is off (--no-profile, or every source set to 0)");
    };
    po.keep_whole = true;
    po.node = node;
    let mut p = Pipeline::new(opts).await?.run(shutdown_signal()).await?;
    let report = p
        .take_profiler_report()
        .context("the profiler did not report (see the log above)")?;
    let want = a.kind.profile_type();
    let mut wrote_main = false;
    for prof in &report.whole {
        let Some(kind) = infertap_proto::pb::ProfileType::try_from(prof.r#type)
            .ok()
            .and_then(infertap_proto::pprof::ProfileKind::from_pb)
        else {
            continue;
        };
        if let Some(dir) = &a.out_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let f = dir.join(format!("{}.pb.gz", kind.name()));
            std::fs::write(&f, &prof.pprof).with_context(|| format!("writing {}", f.display()))?;
            eprintln!("wrote {} ({} samples)", f.display(), prof.sample_count);
        }
        if kind == want {
            std::fs::write(&a.out, &prof.pprof)
                .with_context(|| format!("writing {}", a.out.display()))?;
            eprintln!(
                "wrote {} profile to {} ({} samples); read it with `go tool pprof -top {}`",
                kind.name(),
                a.out.display(),
                prof.sample_count,
                a.out.display()
            );
            wrote_main = true;
        }
    }
    if !wrote_main {
        // An empty but valid profile: the traced processes did not run (or had no launches).
        let (start, end) = (infertap::clock::unix_ns(), infertap::clock::unix_ns());
        let empty = infertap_proto::pprof::empty(want, start, end);
        std::fs::write(&a.out, infertap_proto::pprof::encode_gzip(&empty))
            .with_context(|| format!("writing {}", a.out.display()))?;
        eprintln!(
            "no {} samples in the window; wrote an empty profile to {}",
            want.name(),
            a.out.display()
        );
    }
    summary(&p);
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run(Box::new(cli.agent)));
    let log = match &command {
        Command::Run(a) => &a.target.log,
        Command::Trace(a) => &a.target.log,
        Command::Explain(a) => &a.target.log,
        Command::Profile(a) => &a.target.log,
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        match command {
            Command::Run(a) => run_agent(*a).await,
            Command::Trace(a) => run_trace(a).await,
            Command::Explain(a) => run_explain(a).await,
            Command::Profile(a) => run_profile(a).await,
        }
    })
}
