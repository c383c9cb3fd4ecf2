//! `outpost`: the user's command. `outpost up` runs a one-machine control plane.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_control::store::{Config, Store};

#[derive(Parser, Debug)]
#[command(version, about = "Run and manage an Outpost cluster")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a one-machine cluster (one control-plane member) until interrupted.
    Up {
        /// Where the cluster keeps its state; starting again with the same dir keeps it.
        #[arg(long, default_value = ".outpost")]
        data_dir: PathBuf,
        /// Admin interface address.
        #[arg(long, default_value = "127.0.0.1:7481")]
        admin_listen: std::net::SocketAddr,
    },
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
            admin_listen,
        } => {
            let cfg = Config::new(1, data_dir.join("control"), "127.0.0.1:0".parse()?);
            let store = Store::open(cfg)
                .await
                .context("starting the control plane")?;
            let listener = tokio::net::TcpListener::bind(admin_listen)
                .await
                .with_context(|| format!("binding {admin_listen}"))?;
            println!(
                "Outpost control plane is up (data in {}).",
                data_dir.display()
            );
            println!("Store admin interface: http://{admin_listen}/v1/status");
            tokio::select! {
                r = axum::serve(listener, outpost_control::admin::router(store.clone())) => r?,
                _ = tokio::signal::ctrl_c() => {}
            }
            store.shutdown().await;
        }
    }
    Ok(())
}
