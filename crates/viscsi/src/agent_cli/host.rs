//! `viscsi host`: runs the host agent until SIGTERM or SIGINT.

use std::path::PathBuf;

use agent::inventory::{AdapterConfig, HostConfig};
use agent::{Agent, HostOptions};
use clap::Args;

/// The agent's flags; they override a --config file.
#[derive(Args)]
pub struct HostArgs {
    /// TOML configuration file (see README).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// The host's name in views and metrics [default: the machine's host name].
    #[arg(long)]
    name: Option<String>,
    /// Directory of the VM store [default: /var/lib/viscsi for root, else
    /// $XDG_STATE_HOME/viscsi].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The control socket [default: see `viscsi vm --help`].
    #[arg(long, env = "VISCSI_HOST_SOCKET")]
    socket: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Root of the sysfs tree to scan for adapters [default: /sys].
    #[arg(long)]
    sysfs_root: Option<PathBuf>,
    /// A reference offload adapter to drive: NAME=SOCKET, repeatable.
    #[arg(long = "adapter", value_parser = adapter_flag)]
    adapters: Vec<AdapterConfig>,
    /// The cluster key file shared by the agents VMs migrate between (`viscsi cluster-key`
    /// writes one).
    #[arg(long)]
    cluster_key: Option<PathBuf>,
    /// Accept migrations from other agents on ADDR (host:port); needs --cluster-key.
    #[arg(long)]
    migration_listen: Option<String>,
    /// Another agent to migrate VMs to: NAME=HOST:PORT, repeatable.
    #[arg(long = "peer", value_parser = peer_flag)]
    peers: Vec<(String, String)>,
}

fn peer_flag(s: &str) -> Result<(String, String), String> {
    let (name, addr) = s.split_once('=').ok_or("expected NAME=HOST:PORT")?;
    Ok((name.into(), addr.into()))
}

fn adapter_flag(s: &str) -> Result<AdapterConfig, String> {
    let (name, socket) = s.split_once('=').ok_or("expected NAME=SOCKET")?;
    Ok(AdapterConfig {
        name: name.into(),
        socket: socket.into(),
    })
}

/// The flags merged over the file, validated.
fn host_config(a: HostArgs) -> Result<HostConfig, String> {
    let mut c = match &a.config {
        Some(p) => HostConfig::from_file(p)?,
        None => HostConfig::default(),
    };
    if a.name.is_some() {
        c.name = a.name;
    }
    if a.state_dir.is_some() {
        c.state_dir = a.state_dir;
    }
    if a.socket.is_some() {
        c.control_socket = a.socket;
    }
    if a.metrics_listen.is_some() {
        c.metrics_listen = a.metrics_listen;
    }
    if a.sysfs_root.is_some() {
        c.sysfs_root = a.sysfs_root;
    }
    c.adapters.extend(a.adapters);
    if a.cluster_key.is_some() {
        c.cluster_key = a.cluster_key;
    }
    if a.migration_listen.is_some() {
        c.migration_listen = a.migration_listen;
    }
    c.peers.extend(a.peers);
    c.validate()?;
    Ok(c)
}

pub fn run(args: HostArgs) -> Result<(), String> {
    let config = host_config(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(serve(config))
}

async fn serve(config: HostConfig) -> Result<(), String> {
    let socket = config
        .control_socket
        .clone()
        .unwrap_or_else(super::default_socket);
    let listener = agent::api::bind_control_socket(&socket)?;
    let metrics = match &config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?,
        ),
        None => None,
    };
    let options = HostOptions {
        name: config.host_name(),
        state_dir: config
            .state_dir
            .clone()
            .unwrap_or_else(super::default_state_dir),
        sysfs_root: config.sysfs_root.clone().unwrap_or_else(|| "/sys".into()),
        adapters: config.adapters.clone(),
        migration: match &config.cluster_key {
            Some(path) => Some(agent::MigrationOptions {
                key: agent::migration::channel::ClusterKey::from_file(path)?,
                listen: config.migration_listen.clone(),
                peers: config.peers.clone(),
            }),
            None => None,
        },
    };
    let agent = Agent::start(options).await?;
    tracing::info!(host = %agent.name(), socket = %socket.display(), "host agent serving");
    if let Some(addr) = agent.migration_addr() {
        tracing::info!(%addr, "accepting migrations");
    }
    let control = tokio::spawn(agent::api::serve_control(agent.clone(), listener));
    if let Some(listener) = metrics {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "metrics at http://{addr}/metrics");
        }
        tokio::spawn(agent::api::serve_metrics(agent.clone(), listener));
    }
    crate::wait_for_signal().await;
    tracing::info!("shutting down: logging out the VMs' sessions");
    control.abort();
    agent.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
