//! `outpost`: the user's command. `outpost up` runs a one-machine cluster and writes a
//! kubeconfig for it; `outpost kubeconfig` issues one for another user.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_control::api::{self, ServeConfig};
use outpost_control::pki;
use outpost_control::store::{Config, Store};

#[derive(Parser, Debug)]
#[command(version, about = "Run and manage an Outpost cluster")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a one-machine cluster until interrupted; writes DATA_DIR/kubeconfig.
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Up {
            data_dir,
            listen,
            tls_san,
            admin_listen,
        } => {
            let control = data_dir.join("control");
            let pki_dir = control.join("pki");
            let cfg = Config::new(1, &control, "127.0.0.1:0".parse()?);
            let store = Store::open(cfg)
                .await
                .context("starting the control plane")?;
            pki::ensure_cluster_ca(&pki_dir).context("creating the cluster CA")?;
            let mut names = vec![
                "localhost".to_string(),
                "127.0.0.1".into(),
                "::1".into(),
                "kubernetes".into(),
                "kubernetes.default".into(),
                "10.96.0.1".into(),
            ];
            names.push(listen.ip().to_string());
            names.extend(tls_san);
            let (addr, api_task) = api::start(
                store.clone(),
                ServeConfig {
                    listen,
                    pki_dir: pki_dir.clone(),
                    names,
                    token_file: Some(pki_dir.join("tokens.csv")),
                },
            )
            .await?;
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
            api_task.abort();
            store.shutdown().await;
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
