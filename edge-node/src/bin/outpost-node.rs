//! `outpost-node`: the node agent. Joins a cluster once with a bootstrap token, then runs the
//! pods bound to this machine, with or without a link to the control plane.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use outpost_edge_node::agent::{self, Config};
use outpost_edge_node::net::DEFAULT_POD_CIDR;
use outpost_edge_node::services;

// musl's allocator takes one lock for every allocation: in a burst of pods the board agent
// (a static musl build) spent 1.7 times the CPU of the glibc build, much of it waiting on
// that lock. mimalloc, with its arenas committed as they are used (committed up front, it
// held 29 MB at idle), takes a third off a burst's CPU for a few MB more
// (docs/benchmarks.md, session 32).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(target_env = "musl")]
#[allow(unsafe_code)]
fn commit_as_used() {
    // `mi_option_arena_eager_commit` in the `mi_option_t` of the mimalloc the crate builds.
    const ARENA_EAGER_COMMIT: std::ffi::c_int = 4;
    extern "C" {
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    }
    // SAFETY: sets an option by its index; every value is valid for this one.
    unsafe { mi_option_set(ARENA_EAGER_COMMIT, 0) }
}

#[derive(Parser, Debug)]
#[command(version, about = "The Outpost node agent", args_override_self = true)]
struct Args {
    /// A TOML file of these settings: keys are the flags without the leading dashes
    /// (`data-dir = "/var/lib/x"`); flags on the command line override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The control plane's node gateway, HOST:PORT (UDP; the API's port by default).
    /// Remembered in the data dir after the first start.
    #[arg(long, env = "OUTPOST_SERVER")]
    server: Option<String>,
    /// Bootstrap token from `outpost token create`; needed only to join.
    #[arg(long, env = "OUTPOST_TOKEN")]
    token: Option<String>,
    /// Where the node keeps its identity, cache, pods and logs.
    #[arg(
        long,
        default_value = "/var/lib/outpost-node",
        env = "OUTPOST_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// The node's name when it joins (defaults to the host name).
    #[arg(long)]
    name: Option<String>,
    /// A registry (HOST or HOST:PORT) to pull from over plain HTTP; repeatable. Registries on
    /// loopback always are.
    #[arg(
        long = "insecure-registry",
        env = "OUTPOST_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
    /// Pods the scheduler may place here (the node's `pods` capacity), as kubelet's
    /// --max-pods.
    #[arg(long, default_value_t = 110, env = "OUTPOST_MAX_PODS")]
    max_pods: u32,
    /// The network OCI pods take their addresses from, behind the node bridge `outpost0`
    /// (give each node its own on a LAN).
    #[arg(long, default_value = DEFAULT_POD_CIDR, env = "OUTPOST_POD_CIDR")]
    pod_cidr: String,
    /// The address the node is known by (its InternalIP: where other nodes route its pods,
    /// its LoadBalancers' ingress), as K3s's --node-ip. By default the one it reaches the
    /// control plane from, or its default route's when that is loopback.
    #[arg(long, env = "OUTPOST_NODE_IP")]
    node_ip: Option<std::net::IpAddr>,
    /// The service proxy and cluster DNS (netd over a TUN device): auto (where the node can:
    /// root and /dev/net/tun), on (fail if it cannot), or off.
    #[arg(long, default_value = "auto", env = "OUTPOST_SERVICE_PROXY")]
    service_proxy: services::Mode,
    /// The cluster's service network (the control plane's), routed to netd's device.
    #[arg(long, default_value = services::DEFAULT_CIDR, env = "OUTPOST_SERVICE_CIDR")]
    service_cidr: String,
    /// The service IP cluster DNS answers on; pods get it as their nameserver.
    #[arg(long, default_value = services::DEFAULT_DNS, env = "OUTPOST_CLUSTER_DNS")]
    cluster_dns: std::net::Ipv4Addr,
    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local", env = "OUTPOST_CLUSTER_DOMAIN")]
    cluster_domain: String,
    /// Where netd's per-service counters are served (`GET /metrics`), or `off`.
    #[arg(long, default_value = services::DEFAULT_METRICS, env = "OUTPOST_PROXY_METRICS")]
    proxy_metrics: String,
    /// Where Wasm modules are compiled: node (here; agents built with the compiler) or
    /// control (the control plane compiles them ahead of time for this architecture; the
    /// only choice of an agent built without the compiler).
    #[arg(long, env = "OUTPOST_WASM_COMPILE")]
    wasm_compile: Option<agent::Compile>,
    /// Events posted per second at most, as kubelet's --event-qps (0: no limit); those over
    /// it wait in memory.
    #[arg(long, default_value_t = 50.0, env = "OUTPOST_EVENT_QPS")]
    event_qps: f64,
    /// Events posted at once after a quiet spell, as kubelet's --event-burst.
    #[arg(long, default_value_t = 100, env = "OUTPOST_EVENT_BURST")]
    event_burst: u32,
    /// Seconds between updates of running containers' configMap and secret volumes from
    /// their objects, as kubelet's --sync-frequency (one minute).
    #[arg(long, default_value_t = 60, env = "OUTPOST_SYNC_FREQUENCY")]
    sync_frequency: u64,
}

fn main() -> std::process::ExitCode {
    outpost_api::exit(run())
}

fn run() -> anyhow::Result<()> {
    #[cfg(target_env = "musl")]
    commit_as_used();
    outpost_oci_shim::run::dispatch();
    outpost_edge_node::volatile::enter();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    // `Targets` reads RUST_LOG's `level` and `target=level` directives without the regex
    // engine EnvFilter brings, which a board's binary would carry for nothing.
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            // The store's own progress (tables flushed, ingestion) is not the node's news.
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing::Level::INFO)
                .with_target("fjall", tracing::Level::WARN)
                .with_target("lsm_tree", tracing::Level::WARN)
        });
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let argv = outpost_edge_node::conf::expand(std::env::args_os().collect(), &Args::command())
        .map_err(anyhow::Error::msg)?;
    let a = Args::parse_from(argv);
    let cfg = Config {
        data_dir: a.data_dir,
        server: a.server,
        token: a.token,
        name: a.name,
        insecure_registries: a.insecure_registries,
        max_pods: a.max_pods,
        pod_cidr: a.pod_cidr,
        node_ip: a.node_ip,
        services: services::Config {
            mode: a.service_proxy,
            cidr: a.service_cidr,
            dns: a.cluster_dns,
            domain: a.cluster_domain,
            metrics: match a.proxy_metrics.as_str() {
                "off" => None,
                m => Some(m.parse().map_err(|_| {
                    anyhow::anyhow!("--proxy-metrics {m:?}: an address (IP:PORT) or off")
                })?),
            },
        },
        compile: a.wasm_compile.unwrap_or_default(),
        events: agent::EventLimit {
            qps: a.event_qps,
            burst: a.event_burst,
        },
        sync: std::time::Duration::from_secs(a.sync_frequency.max(1)),
    };
    tokio::select! {
        r = agent::run(cfg) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
