//! `outpost-control`: one member of the Outpost control plane.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use outpost_control::store::{Compaction, Config, Store};

#[cfg(target_env = "gnu")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "One member of the Outpost control plane",
    args_override_self = true
)]
struct Args {
    /// A TOML file of these settings: keys are the flags without the leading dashes
    /// (`data-dir = "/var/lib/x"`); flags on the command line override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This member's id, unique in the cluster.
    #[arg(long, default_value_t = 1, env = "OUTPOST_ID")]
    id: u64,
    /// Where the store and certificates live.
    #[arg(long, default_value = ".outpost/control", env = "OUTPOST_DATA_DIR")]
    data_dir: PathBuf,
    /// UDP address for member (Raft) traffic.
    #[arg(long, default_value = "127.0.0.1:7480")]
    peer_listen: SocketAddr,
    /// Address other members reach this one at (defaults to --peer-listen).
    #[arg(long)]
    advertise: Option<String>,
    /// TCP address of the admin interface (keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:7481")]
    admin_listen: SocketAddr,
    /// Directory holding the peer CA (defaults to DATA_DIR/pki).
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// Join the cluster through this member's peer address instead of starting a new one
    /// (the pki directory must hold copies of the cluster's CAs).
    #[arg(long, conflicts_with = "server")]
    join: Option<String>,
    /// Join the cluster through this member's API address (HOST:PORT) with a member token
    /// (`outpost token create --member`): the cluster's CAs come with it.
    #[arg(long, requires = "token")]
    server: Option<String>,
    /// The member token for --server.
    #[arg(long, requires = "server")]
    token: Option<String>,
    /// Keep this many revisions of watch history (instead of --retain-seconds).
    #[arg(long)]
    retain_revisions: Option<u64>,
    /// Keep watch history for this long.
    #[arg(long, default_value_t = 300)]
    retain_seconds: u64,
    /// Build a snapshot every this many log entries (etcd's --snapshot-count default).
    #[arg(long, default_value_t = 100_000)]
    snapshot_every: u64,
    /// Log entries kept behind a snapshot.
    #[arg(long, default_value_t = 1_000)]
    keep_logs: u64,
    /// Raft election timeout in milliseconds.
    #[arg(long, default_value_t = 800)]
    election_ms: u64,
    /// Seconds between watch progress notifications.
    #[arg(long, default_value_t = 5)]
    progress_seconds: u64,
    /// Serve the Kubernetes API (HTTPS) on this address.
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// Names and addresses for the API's certificate, besides localhost and 127.0.0.1.
    #[arg(long = "tls-san")]
    tls_san: Vec<String>,
    /// Kubernetes token file (`token,user,uid,"group1,group2"` per line).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// UDP address of the node gateway (defaults to the API's address, on UDP).
    #[arg(long)]
    node_listen: Option<SocketAddr>,
    /// Seconds a node's client certificate is valid (a year by default). Nodes renew theirs
    /// while connected when a third is left; keep it longer than the nodes' autonomy window
    /// so a node offline for all of it can still reconnect.
    #[arg(long, default_value_t = outpost_control::pki::NODE_CERT_TTL.as_secs())]
    node_cert_ttl: u64,
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
}

/// Where a member that joined by token keeps the address it joins through, should it stop
/// before the join completes.
const JOIN_VIA: &str = "join-via";

/// Get the cluster's CAs from the member at `server` with a member `token` (once: a restart
/// finds them in `pki_dir`); returns the peer address to join through.
async fn bootstrap(server: &str, token: &str, id: u64, pki_dir: &Path) -> anyhow::Result<String> {
    use outpost_control::pki::{write_secret, PkiError};
    let via = pki_dir.join(JOIN_VIA);
    if pki_dir.join("ca.key").exists() && pki_dir.join("peer-ca.key").exists() {
        return std::fs::read_to_string(&via)
            .map(|s| s.trim().to_string())
            .with_context(|| format!("reading {}", via.display()));
    }
    let token = outpost_api::link::Token::parse(token).map_err(anyhow::Error::msg)?;
    let files = outpost_edge_node::link::join_member(server, &token, id)
        .await
        .with_context(|| format!("joining the cluster through {server}"))?;
    std::fs::create_dir_all(pki_dir).with_context(|| format!("creating {}", pki_dir.display()))?;
    let public = |name: &str, data: &str| -> Result<(), PkiError> {
        let path = pki_dir.join(name);
        std::fs::write(&path, data).map_err(|source| PkiError::Io { path, source })
    };
    // Keys last: their presence is what says the bootstrap is done.
    public("peer-ca.crt", &files.peer_ca_crt)?;
    public("ca.crt", &files.ca_crt)?;
    public(JOIN_VIA, &files.join)?;
    write_secret(&pki_dir.join("ca.key"), &files.ca_key)?;
    write_secret(&pki_dir.join("peer-ca.key"), &files.peer_ca_key)?;
    tracing::info!(server, join = %files.join, "received the cluster's CAs");
    Ok(files.join)
}

fn main() -> std::process::ExitCode {
    let done = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run()));
    outpost_api::exit(done)
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,fjall=warn,lsm_tree=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let argv = outpost_edge_node::conf::expand(std::env::args_os().collect(), &Args::command())
        .map_err(anyhow::Error::msg)?;
    let a = Args::parse_from(argv);
    let mut cfg = Config::new(a.id, &a.data_dir, a.peer_listen);
    cfg.advertise = a.advertise;
    cfg.pki_dir = a.pki_dir.clone();
    cfg.join = a.join.clone();
    cfg.compaction = match a.retain_revisions {
        Some(n) => Compaction::Revisions(n),
        None => Compaction::Age(Duration::from_secs(a.retain_seconds)),
    };
    cfg.snapshot_every = a.snapshot_every;
    cfg.keep_logs = a.keep_logs;
    cfg.election_timeout = Duration::from_millis(a.election_ms);
    cfg.heartbeat = Duration::from_millis((a.election_ms / 8).max(20));
    cfg.progress_every = Duration::from_secs(a.progress_seconds.max(1));
    let pki_dir = a.pki_dir.clone().unwrap_or_else(|| a.data_dir.join("pki"));
    if let (Some(server), Some(token)) = (&a.server, &a.token) {
        cfg.join = Some(bootstrap(server, token, a.id, &pki_dir).await?);
    }
    if cfg.join.is_none() {
        outpost_control::pki::ensure_cluster_ca(&pki_dir).context("creating the cluster CA")?;
    }
    let store = Store::open(cfg)
        .await
        .with_context(|| format!("starting the store in {}", a.data_dir.display()))?;
    let mut api_task = None;
    if let Some(listen) = a.api_listen {
        if !pki_dir.join("ca.crt").exists() {
            anyhow::bail!(
                "no cluster CA in {}: copy ca.crt and ca.key from a member of the cluster",
                pki_dir.display()
            );
        }
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".into(),
            listen.ip().to_string(),
        ];
        names.extend(a.tls_san.clone());
        let cfg = outpost_control::api::ServeConfig {
            listen,
            pki_dir: pki_dir.clone(),
            names,
            token_file: a.token_file.clone(),
            gateway: Some(a.node_listen.unwrap_or(listen)),
            node_cert_ttl: std::time::Duration::from_secs(a.node_cert_ttl.max(10)),
            lifecycle: outpost_control::controllers::nodes::Lifecycle {
                grace: std::time::Duration::from_secs(a.node_grace),
                window: std::time::Duration::from_secs(a.autonomy_window),
            },
            event_ttl: std::time::Duration::from_secs(a.event_ttl.max(1)),
        };
        let started = outpost_control::api::start(store.clone(), cfg).await?;
        api_task = Some(started.task);
    }
    let listener = tokio::net::TcpListener::bind(a.admin_listen)
        .await
        .with_context(|| format!("binding the admin interface on {}", a.admin_listen))?;
    tracing::info!(admin = %a.admin_listen, "admin interface listening");
    let app = outpost_control::admin::router(store.clone());
    tokio::select! {
        r = axum::serve(listener, app) => r.context("admin interface")?,
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
    }
    if let Some(t) = api_task {
        t.abort();
    }
    store.shutdown().await;
    Ok(())
}
