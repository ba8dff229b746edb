//! `viscsi hba`: run the reference offload adapter (a software model of an iSCSI offload
//! HBA, crate `viscsi-hba`), show its state, inject faults.

use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Subcommand};
use hba::device::{DeviceConfig, DeviceOptions};
use hba::protocol::{AdapterStatus, Fault, VfState};

/// The adapter's subcommands.
#[derive(Subcommand)]
pub enum HbaCommand {
    /// Run the adapter process until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Show the adapter and its virtual functions.
    Status(StatusArgs),
    /// Make the adapter fail, to test error detection: crash, hang, link-down, link-up,
    /// recover.
    Fault(FaultArgs),
}

impl HbaCommand {
    /// The log filter when `--log` is not given.
    pub const DEFAULT_LOG: &'static str = "info";
}

#[derive(Args)]
pub struct ServeArgs {
    /// The unix socket the adapter driver connects to (created with mode 0600).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Number of virtual functions.
    #[arg(long, value_name = "N", default_value_t = 8)]
    vfs: u32,
    /// The adapter's name.
    #[arg(long, value_name = "NAME", default_value = "hba0")]
    name: String,
    /// Runtime threads of the adapter process (1: everything on one thread, which measured
    /// fastest on small machines).
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: usize,
    /// Busy-poll while commands are in flight, as adapter firmware polls its rings: faster
    /// on an otherwise idle host, slower on a busy one (it takes CPU from everything else).
    #[arg(long)]
    poll: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    /// The adapter's socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct FaultArgs {
    /// The adapter's socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The fault.
    #[arg(value_name = "FAULT", value_parser = fault_parser())]
    fault: Fault,
}

fn fault_parser() -> impl TypedValueParser<Value = Fault> {
    PossibleValuesParser::new(Fault::ALL.map(Fault::name)).try_map(|s| s.parse::<Fault>())
}

/// Runs one `viscsi hba` subcommand.
pub fn run(command: HbaCommand) -> Result<(), String> {
    match command {
        HbaCommand::Serve(a) => {
            if a.threads == 0 || a.threads > 64 {
                return Err("--threads must be from 1 to 64".into());
            }
            let config = DeviceConfig {
                socket: a.socket,
                name: a.name,
                vfs: a.vfs,
            };
            let mut builder = if a.threads > 1 {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(a.threads);
                b
            } else {
                tokio::runtime::Builder::new_current_thread()
            };
            builder
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?
                .block_on(hba::device::serve_options(
                    config,
                    DeviceOptions { poll: a.poll },
                ))
                .map_err(|e| e.to_string())
        }
        HbaCommand::Status(a) => {
            let status = runtime()?
                .block_on(hba::driver::adapter_status(&a.socket))
                .map_err(|e| e.to_string())?;
            if a.json {
                let text = serde_json::to_string_pretty(&status)
                    .map_err(|e| format!("cannot print the status: {e}"))?;
                println!("{text}");
            } else {
                print_status(&status);
            }
            Ok(())
        }
        HbaCommand::Fault(a) => {
            runtime()?
                .block_on(hba::driver::inject_fault(&a.socket, a.fault))
                .map_err(|e| e.to_string())?;
            println!("fault {} injected", a.fault);
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn state_name(s: VfState) -> &'static str {
    match s {
        VfState::Free => "free",
        VfState::Allocated => "allocated",
        VfState::LoggingIn => "logging-in",
        VfState::LoggedIn => "logged-in",
        VfState::Down => "down",
    }
}

fn print_status(s: &AdapterStatus) {
    let a = &s.adapter;
    println!(
        "{}: {}, firmware {}, protocol {}",
        a.name, a.model, a.firmware, a.protocol
    );
    println!(
        "  link {}, {} of {} VFs in use",
        if a.link_up { "up" } else { "down" },
        a.vfs_in_use,
        a.vfs_total
    );
    let used: Vec<_> = s.vfs.iter().filter(|v| v.state != VfState::Free).collect();
    if used.is_empty() {
        return;
    }
    println!(
        "  {:>3}  {:<10}  {:<5}  {:>9}  {:>10}  {:>10}  {:>6}  {:>8}  owner / target @ portal",
        "VF", "state", "queue", "commands", "read", "written", "errors", "inflight"
    );
    for v in used {
        println!(
            "  {:>3}  {:<10}  {:<5}  {:>9}  {:>10}  {:>10}  {:>6}  {:>8}  {} / {} @ {}",
            v.index,
            state_name(v.state),
            if v.queue_open { "open" } else { "-" },
            v.stats.commands,
            bytes(v.stats.bytes_read),
            bytes(v.stats.bytes_written),
            v.stats.errors,
            v.stats.in_flight,
            v.owner.as_deref().unwrap_or("-"),
            v.target.as_deref().unwrap_or("-"),
            v.portal.as_deref().unwrap_or("-"),
        );
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct TestCli {
        #[command(subcommand)]
        command: HbaCommand,
    }

    #[test]
    fn subcommands_parse() {
        let cli = TestCli::try_parse_from(["x", "serve", "--socket", "/tmp/s"]).unwrap();
        let HbaCommand::Serve(a) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(
            (a.vfs, a.name.as_str(), a.threads, a.poll),
            (8, "hba0", 1, false)
        );
        let cli = TestCli::try_parse_from(["x", "serve", "--socket", "/s", "--poll"]).unwrap();
        assert!(matches!(
            cli.command,
            HbaCommand::Serve(ServeArgs { poll: true, .. })
        ));
        for f in Fault::ALL {
            let cli = TestCli::try_parse_from(["x", "fault", "--socket", "/s", f.name()]).unwrap();
            let HbaCommand::Fault(a) = cli.command else {
                panic!("not fault")
            };
            assert_eq!(a.fault, f);
        }
        let err = TestCli::try_parse_from(["x", "fault", "--socket", "/s", "explode"])
            .err()
            .expect("refused");
        assert!(err.to_string().contains("link-down"), "{err}");
        assert!(TestCli::try_parse_from(["x", "status", "--socket", "/s", "--json"]).is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(bytes(10), "10 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
