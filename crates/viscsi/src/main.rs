//! `viscsi`: one binary, many subcommands. This file only parses arguments and hands a
//! validated configuration to the library crates; the initiator's subcommands live in `cli`.

mod agent_cli;
mod cli;
mod demo;
mod hba;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use target::config::Limits;
use target::{ChapConfig, LunConfig, Target, TargetConfig, TargetDef};

/// viscsi: an iSCSI layer for virtual machines.
#[derive(Parser)]
#[command(name = "viscsi", version, about)]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `target=trace` (or set RUST_LOG) [default: info for
    /// `target`, warn for the initiator's commands].
    #[arg(long, global = true)]
    log: Option<String>,
    /// Log lines as text, or as JSON objects one per line (for log collectors).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve iSCSI targets (with no arguments: a 1 GiB memory LUN on 127.0.0.1:3260).
    Target(TargetArgs),
    #[command(flatten)]
    Initiator(cli::InitiatorCommand),
    /// Run or control the reference offload adapter (a software model of an iSCSI offload HBA).
    #[command(subcommand)]
    Hba(hba::HbaCommand),
    /// Run the host agent: it owns this host's VMs, picks each one's data path (offload or
    /// software), fails VMs over when an adapter fails, and serves the control API.
    Host(agent_cli::HostArgs),
    #[command(flatten)]
    Agent(agent_cli::AgentCommand),
    /// Everything in one process: a target, host A with an offload adapter, host B with
    /// software only, a VM writing through its virtual bus; migrates it A→B→A under load,
    /// fails its adapter, and verifies every block.
    Demo(demo::DemoArgs),
}

/// The target's flags. They add to (and for portals and limits, override) a --config file.
#[derive(Args)]
struct TargetArgs {
    /// TOML configuration file (see README).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Listening address, repeatable (IPv6 as [::1]:3260).
    #[arg(long = "portal")]
    portals: Vec<SocketAddr>,
    /// Target name for the LUNs given with --lun.
    #[arg(long)]
    iqn: Option<String>,
    /// A LUN as ID=mem:SIZE or ID=file:PATH, repeatable.
    #[arg(long = "lun", value_parser = LunConfig::from_flag)]
    luns: Vec<LunConfig>,
    /// Require CHAP from initiators: USER:SECRET, repeatable. Also VISCSI_CHAP.
    #[arg(long = "chap", value_parser = ChapConfig::from_flag, env = "VISCSI_CHAP", hide_env_values = true)]
    chap: Vec<ChapConfig>,
    /// CHAP user whose secret is read from a file: USER:PATH.
    #[arg(long = "chap-file", value_parser = chap_from_file_flag)]
    chap_file: Vec<ChapConfig>,
    /// The target's credentials for mutual CHAP: USER:SECRET. Also VISCSI_MUTUAL_CHAP.
    #[arg(long = "mutual-chap", value_parser = ChapConfig::from_flag, env = "VISCSI_MUTUAL_CHAP", hide_env_values = true)]
    mutual_chap: Option<ChapConfig>,
    /// Require CHAP for discovery sessions: USER:SECRET.
    #[arg(long = "discovery-chap", value_parser = ChapConfig::from_flag, hide_env_values = true)]
    discovery_chap: Vec<ChapConfig>,
    /// Only these initiator names may log in, repeatable (default: all).
    #[arg(long = "allow-initiator")]
    allow_initiators: Vec<String>,
    /// Do not offer CRC32C header and data digests.
    #[arg(long)]
    no_digests: bool,
    /// Seconds of idle time before a NOP-In ping (0 disables).
    #[arg(long)]
    nop_interval: Option<u64>,
}

const DEFAULT_IQN: &str = "iqn.2024-01.org.viscsi:default";
const DEFAULT_PORTAL: &str = "127.0.0.1:3260";

fn chap_from_file_flag(s: &str) -> Result<ChapConfig, String> {
    let (user, path) = s.split_once(':').ok_or("expected USER:PATH")?;
    Ok(ChapConfig {
        user: user.into(),
        secret: None,
        secret_file: Some(path.into()),
        secret_env: None,
    })
}

impl TryFrom<TargetArgs> for TargetConfig {
    type Error = String;
    fn try_from(a: TargetArgs) -> Result<Self, String> {
        let mut cfg = match &a.config {
            Some(p) => TargetConfig::from_file(p)?,
            None => TargetConfig {
                portals: Vec::new(),
                targets: Vec::new(),
                discovery_chap: Vec::new(),
                limits: Limits::default(),
            },
        };
        if !a.portals.is_empty() {
            cfg.portals = a.portals;
        }
        let mut chap = a.chap;
        chap.extend(a.chap_file);
        let flag_target = a.iqn.is_some() || !a.luns.is_empty();
        if flag_target || cfg.targets.is_empty() {
            let luns = if a.luns.is_empty() {
                vec![LunConfig::from_flag("0=mem:1GiB")?]
            } else {
                a.luns
            };
            cfg.targets.push(TargetDef {
                iqn: a.iqn.unwrap_or_else(|| DEFAULT_IQN.into()),
                alias: None,
                luns,
                chap,
                mutual_chap: a.mutual_chap,
                allowed_initiators: a.allow_initiators,
            });
        } else if !chap.is_empty() || a.mutual_chap.is_some() || !a.allow_initiators.is_empty() {
            return Err(
                "--chap, --mutual-chap and --allow-initiator apply to the --iqn target; give --iqn"
                    .into(),
            );
        }
        if cfg.portals.is_empty() {
            cfg.portals
                .push(DEFAULT_PORTAL.parse().map_err(|_| "bad default portal")?);
        }
        cfg.discovery_chap.extend(a.discovery_chap);
        if a.no_digests {
            cfg.limits.digests = false;
        }
        if let Some(n) = a.nop_interval {
            cfg.limits.nop_in_interval_secs = n;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Keeps freed memory in the process instead of handing it back to the kernel at once.
///
/// Data segments and per-command buffers are 256 KiB – 16 MiB: with glibc's defaults each is
/// mmap'ed or trimmed from the heap when freed and page-faulted in again on the next command,
/// which measured as a fifth of the initiator's CPU at 1 MiB reads. 64 MiB of slack is cheap
/// next to the throughput it buys.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists, with valid parameter numbers and values.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::report_usage_error(e),
    };
    let default_log = match cli.command {
        Command::Target(_) => "info",
        Command::Initiator(_) => cli::InitiatorCommand::DEFAULT_LOG,
        Command::Hba(_) => hba::HbaCommand::DEFAULT_LOG,
        Command::Host(_) => "info",
        Command::Agent(_) => "warn",
        // The demo reports what happens itself, the injected adapter fault included.
        Command::Demo(_) => "off",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| {
            tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or(default_log))
        })
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let result = match cli.command {
        Command::Target(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))
            .and_then(|runtime| runtime.block_on(run_target(args))),
        Command::Initiator(command) => cli::run(command),
        Command::Hba(command) => hba::run(command),
        Command::Host(args) => agent_cli::host::run(args),
        Command::Agent(command) => agent_cli::run(command),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("viscsi: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_target(args: TargetArgs) -> Result<(), String> {
    let config = TargetConfig::try_from(args)?;
    let names: Vec<String> = config.targets.iter().map(|t| t.iqn.clone()).collect();
    let running = Target::build(config)
        .map_err(|e| e.to_string())?
        .serve()
        .await
        .map_err(|e| e.to_string())?;
    for addr in running.local_addrs() {
        tracing::info!(portal = %addr, targets = ?names, "viscsi target listening");
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
