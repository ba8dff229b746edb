//! The host agent's subcommands: `host` runs the agent; `vm` and `adapters` talk to a
//! running agent over its control socket.
//!
//! Where things live unless told otherwise: the control socket at `$VISCSI_HOST_SOCKET`, else
//! `/run/viscsi/host.sock` for root and `$XDG_RUNTIME_DIR/viscsi/host.sock` for others; the
//! VM store in `/var/lib/viscsi` for root and `$XDG_STATE_HOME/viscsi` (or
//! `~/.local/state/viscsi`) for others.

mod adapters;
pub mod host;
mod migrate;
mod show;
mod vm;

use std::path::PathBuf;

use clap::{Args, Subcommand};

pub use host::HostArgs;

/// The agent's client subcommands (flattened into the binary's command list).
#[derive(Subcommand)]
pub enum AgentCommand {
    /// Create, list, show and delete the VMs of a host agent.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Show the adapters a host agent found, what each can do and which VMs use it.
    Adapters(adapters::AdaptersArgs),
    /// Move a VM's storage session to another host's agent (live, with its in-flight and
    /// held commands): `viscsi migrate VM --to HOST`.
    Migrate(migrate::MigrateArgs),
    /// Show the last migration of each VM from a host agent.
    Migrations(migrate::MigrationsArgs),
    /// Write a new cluster key file (mode 0600) for the agents VMs migrate between.
    ClusterKey(migrate::ClusterKeyArgs),
}

/// Which agent to talk to.
#[derive(Args, Clone)]
pub struct SocketArgs {
    /// The agent's control socket [default: $VISCSI_HOST_SOCKET, /run/viscsi/host.sock for
    /// root, else $XDG_RUNTIME_DIR/viscsi/host.sock].
    #[arg(long, env = "VISCSI_HOST_SOCKET")]
    pub socket: Option<PathBuf>,
}

impl SocketArgs {
    pub fn client(&self) -> agent::client::ControlClient {
        agent::client::ControlClient::new(self.socket.clone().unwrap_or_else(default_socket))
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The control socket when none is given.
pub fn default_socket() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/viscsi/host.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("viscsi/host.sock"),
        None => std::env::temp_dir().join(format!(
            "viscsi-{}/host.sock",
            rustix::process::geteuid().as_raw()
        )),
    }
}

/// The state directory when none is given.
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/viscsi");
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("viscsi");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/state/viscsi"),
        None => std::env::temp_dir().join("viscsi-state"),
    }
}

/// Runs one client subcommand on a small runtime.
pub fn run(command: AgentCommand) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        match command {
            AgentCommand::Vm(c) => vm::run(c).await,
            AgentCommand::Adapters(a) => adapters::run(a).await,
            AgentCommand::Migrate(a) => migrate::run(a).await,
            AgentCommand::Migrations(a) => migrate::list(a).await,
            AgentCommand::ClusterKey(a) => migrate::write_key(a),
        }
    })
}

/// Prints a value as pretty JSON.
fn print_json<T: serde::Serialize>(value: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}
