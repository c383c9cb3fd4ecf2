//! `outpost`: the user's command. `outpost up` runs a one-machine cluster and writes a
//! kubeconfig for it; `outpost kubeconfig` issues one for another user.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_control::api::{self, ServeConfig};
use outpost_control::client::{self, Client};
use outpost_control::pki;
use outpost_control::store::{Config, Store};

/// As `outpost-control`'s (see control/Cargo.toml).
#[cfg(target_env = "gnu")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(version, about = "Run and manage an Outpost cluster")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a one-machine cluster (control plane and a node) until interrupted; writes
    /// DATA_DIR/kubeconfig.
    Up {
        /// Where the cluster keeps its state; starting again with the same dir keeps it.
        #[arg(long, default_value = ".outpost")]
        data_dir: PathBuf,
        /// Address of the Kubernetes API (HTTPS).
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: SocketAddr,
        /// Extra names or addresses for the API's certificate (e.g. a LAN address).
        #[arg(long = "tls-san")]
        tls_san: Vec<String>,
        /// Admin interface of the store (loopback only).
        #[arg(long, default_value = "127.0.0.1:7481")]
        admin_listen: SocketAddr,
        /// Run the control plane only, without a node on this machine.
        #[arg(long)]
        no_node: bool,
        /// The name of this machine's node (defaults to the host name).
        #[arg(long)]
        node_name: Option<String>,
        /// Seconds without a link before a node is marked Unknown and tainted unreachable.
        #[arg(long, default_value_t = 40)]
        node_grace: u64,
        /// Seconds a node may be unreachable before its pods are evicted (its autonomy window;
        /// the Node annotation outpost.dev/autonomy-window overrides it per node).
        #[arg(long, default_value_t = 86400)]
        autonomy_window: u64,
        /// Seconds an Event is kept after its last write (kube-apiserver's --event-ttl).
        #[arg(long, default_value_t = outpost_control::controllers::events::TTL.as_secs())]
        event_ttl: u64,
    },
    /// Bootstrap tokens for nodes to join.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
        /// The kubeconfig to reach the cluster with (as kubectl finds it by default).
        #[arg(long, global = true)]
        kubeconfig: Option<PathBuf>,
    },
    /// The control plane's Wasm module store.
    Module {
        #[command(subcommand)]
        cmd: ModuleCmd,
        #[arg(long, global = true)]
        kubeconfig: Option<PathBuf>,
    },
    /// Put a node agent onto a board's disk image before its first boot: the agent, its
    /// systemd unit (enabled) and /etc/outpost/node.toml with the server and a join token go
    /// into the image's ext4 root partition, so the board joins when it boots.
    BoardImage {
        /// The raw disk image (MBR or GPT), written in place.
        image: PathBuf,
        /// The agent binary for the board (deploy/build.sh makes aarch64 ones).
        #[arg(long)]
        agent: PathBuf,
        /// The control plane's node gateway, HOST:PORT, as the board will reach it.
        #[arg(long)]
        server: String,
        /// A join token (`outpost token create`).
        #[arg(long)]
        token: String,
        /// The node's name (defaults to the board's host name when it joins).
        #[arg(long)]
        name: Option<String>,
        /// The root partition's number, if not the largest ext4 partition.
        #[arg(long)]
        partition: Option<usize>,
    },
    /// Print a kubeconfig with a new client certificate from the cluster CA.
    Kubeconfig {
        /// Directory of the cluster CA (DATA_DIR/control/pki for `outpost up`).
        #[arg(long, default_value = ".outpost/control/pki")]
        pki_dir: PathBuf,
        /// API server URL.
        #[arg(long, default_value = "https://127.0.0.1:6443")]
        server: String,
        /// User name (the certificate's CN).
        #[arg(long, default_value = "admin")]
        user: String,
        /// Groups (the certificate's O); `system:masters` may do anything.
        #[arg(long = "group")]
        groups: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Print a new token: `outpost-node --server HOST:PORT --token TOKEN` joins with it (or,
    /// with --member, `outpost-control --server HOST:PORT --token TOKEN`).
    Create {
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
        /// How many nodes (or members) may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// A token for a new control-plane member: it hands out the cluster's CA keys, so
        /// keep it as secret as they are.
        #[arg(long)]
        member: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ModuleCmd {
    /// Store a Wasm module or component; prints the image reference (by digest) pods use
    /// for it. It is also named (by default after the file), so `module:NAME` works too.
    Push {
        file: PathBuf,
        /// The name pods may use instead of the digest (`module:NAME`).
        #[arg(long)]
        name: Option<String>,
    },
}

fn kubeconfig_for(
    pki_dir: &Path,
    server: &str,
    user: &str,
    groups: &[&str],
) -> anyhow::Result<String> {
    let (cert, key) = pki::issue_client(pki_dir, user, groups)
        .with_context(|| format!("issuing a certificate from the CA in {}", pki_dir.display()))?;
    let ca = std::fs::read_to_string(pki_dir.join("ca.crt"))
        .with_context(|| format!("reading {}", pki_dir.join("ca.crt").display()))?;
    Ok(pki::kubeconfig(server, &ca, &cert, &key, user))
}

fn main() -> std::process::ExitCode {
    outpost_api::exit(run())
}

fn run() -> anyhow::Result<()> {
    outpost_oci_shim::run::dispatch();
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Up { .. }) {
        // The local node's mount namespace: before the runtime's threads.
        outpost_edge_node::volatile::enter();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(cli))
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,fjall=warn,lsm_tree=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Up {
            data_dir,
            listen,
            tls_san,
            admin_listen,
            no_node,
            node_name,
            node_grace,
            autonomy_window,
            event_ttl,
        } => {
            let control = data_dir.join("control");
            let pki_dir = control.join("pki");
            let mut cfg = Config::new(1, &control, "127.0.0.1:0".parse()?);
            cfg.lone = true;
            let store = Store::open(cfg)
                .await
                .context("starting the control plane")?;
            pki::ensure_cluster_ca(&pki_dir).context("creating the cluster CA")?;
            let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
            names.push(listen.ip().to_string());
            names.extend(tls_san);
            let started = api::start(
                store.clone(),
                ServeConfig {
                    listen,
                    pki_dir: pki_dir.clone(),
                    names,
                    token_file: Some(pki_dir.join("tokens.csv")),
                    gateway: Some(listen),
                    node_cert_ttl: outpost_control::pki::NODE_CERT_TTL,
                    lifecycle: outpost_control::controllers::nodes::Lifecycle {
                        grace: std::time::Duration::from_secs(node_grace),
                        window: std::time::Duration::from_secs(autonomy_window),
                    },
                    event_ttl: std::time::Duration::from_secs(event_ttl.max(1)),
                },
            )
            .await?;
            let (addr, api_task) = (started.addr, started.task);
            let node_task = if no_node {
                None
            } else {
                Some(local_node(&data_dir, &pki_dir, started.gateway, node_name)?)
            };
            let host = if addr.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                addr.ip().to_string()
            };
            let server = if addr.is_ipv6() {
                format!("https://[{host}]:{}", addr.port())
            } else {
                format!("https://{host}:{}", addr.port())
            };
            let kubeconfig = data_dir.join("kubeconfig");
            let text = kubeconfig_for(&pki_dir, &server, "admin", &["system:masters"])?;
            pki::write_secret(&kubeconfig, &text).context("writing the kubeconfig")?;
            let admin = tokio::net::TcpListener::bind(admin_listen)
                .await
                .with_context(|| format!("binding {admin_listen}"))?;
            let shown = std::fs::canonicalize(&kubeconfig).unwrap_or(kubeconfig);
            println!(
                "Outpost is up: Kubernetes API at {server}, state in {}.",
                data_dir.display()
            );
            println!(
                "Use it with:\n  export KUBECONFIG={}\n  kubectl get namespaces",
                shown.display()
            );
            tokio::select! {
                r = axum::serve(admin, outpost_control::admin::router(store.clone())) => r?,
                _ = tokio::signal::ctrl_c() => {}
            }
            if let Some(t) = node_task {
                t.abort();
            }
            api_task.abort();
            store.shutdown().await;
        }
        Cmd::Token {
            cmd: TokenCmd::Create { ttl, uses, member },
            kubeconfig,
        } => {
            let c = Client::from_kubeconfig(&client::kubeconfig_path(kubeconfig.as_deref()))?;
            let path = if member { "tokens/member" } else { "tokens" };
            let v = c
                .json(
                    "POST",
                    &format!("/outpost/v1/{path}?ttl={ttl}&uses={uses}"),
                    "application/json",
                    Vec::new(),
                )
                .await
                .context("creating a token")?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        Cmd::Module {
            cmd: ModuleCmd::Push { file, name },
            kubeconfig,
        } => {
            let name = name.unwrap_or_else(|| {
                file.file_stem()
                    .map(|s| s.to_string_lossy().to_lowercase().replace('_', "-"))
                    .unwrap_or_default()
            });
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let c = Client::from_kubeconfig(&client::kubeconfig_path(kubeconfig.as_deref()))?;
            let v = c
                .json(
                    "POST",
                    &format!("/outpost/v1/modules?name={name}"),
                    "application/wasm",
                    bytes,
                )
                .await
                .with_context(|| format!("pushing {}", file.display()))?;
            println!("{}", v["image"].as_str().unwrap_or_default());
            if let Some(n) = v["name"].as_str() {
                eprintln!("also available as {n}");
            }
        }
        Cmd::BoardImage {
            image,
            agent,
            server,
            token,
            name,
            partition,
        } => {
            let part = outpost_control::board::write(&outpost_control::board::Board {
                image: &image,
                agent: &agent,
                server: &server,
                token: &token,
                name: name.as_deref(),
                partition,
            })?;
            println!(
                "{}: the agent, its unit and its config are in partition {} (ext4 at byte {}); the board joins {server} when it boots",
                image.display(),
                part.number,
                part.offset
            );
        }
        Cmd::Kubeconfig {
            pki_dir,
            server,
            user,
            groups,
        } => {
            let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
            print!("{}", kubeconfig_for(&pki_dir, &server, &user, &groups)?);
        }
    }
    Ok(())
}

/// This machine's own node, in this process: a certificate straight from the cluster CA (no
/// token needed), then the same agent and link any node uses, to the local gateway.
/// The local node's service proxy: netd where the machine allows, unless
/// `OUTPOST_SERVICE_PROXY` says `off` (or `on`: fail without it).
fn service_proxy() -> anyhow::Result<outpost_edge_node::services::Config> {
    let mut c = outpost_edge_node::services::Config::default();
    if let Ok(m) = std::env::var("OUTPOST_SERVICE_PROXY") {
        c.mode = m.parse().map_err(anyhow::Error::msg)?;
    }
    if let Ok(m) = std::env::var("OUTPOST_PROXY_METRICS") {
        c.metrics = match m.as_str() {
            "off" => None,
            m => Some(m.parse().context("OUTPOST_PROXY_METRICS: IP:PORT or off")?),
        };
    }
    Ok(c)
}

fn local_node(
    data_dir: &Path,
    pki_dir: &Path,
    gateway: Option<SocketAddr>,
    name: Option<String>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use outpost_edge_node::{agent, link};
    let gateway = gateway.context("the node gateway is not running")?;
    let dir = data_dir.join("node");
    let node_pki = link::Pki::new(&dir);
    if !node_pki.joined() {
        let name = name.unwrap_or_else(agent::hostname);
        let (cert, key) =
            pki::issue_client(pki_dir, &format!("system:node:{name}"), &["system:nodes"])?;
        let ca = std::fs::read_to_string(pki_dir.join("ca.crt"))?;
        link::install(&node_pki, &ca, &cert, &key)?;
    }
    let server = if gateway.ip().is_unspecified() {
        format!("127.0.0.1:{}", gateway.port())
    } else {
        gateway.to_string()
    };
    let cfg = agent::Config {
        data_dir: dir,
        server: Some(server),
        token: None,
        name: None,
        insecure_registries: Vec::new(),
        max_pods: 110,
        pod_cidr: outpost_edge_node::net::DEFAULT_POD_CIDR.to_string(),
        node_ip: None,
        services: service_proxy()?,
        compile: agent::Compile::default(),
        events: agent::EventLimit::default(),
        sync: std::time::Duration::from_secs(60),
    };
    Ok(tokio::spawn(async move {
        if let Err(e) = agent::run(cfg).await {
            tracing::error!(error = %e, "the local node stopped");
        }
    }))
}
