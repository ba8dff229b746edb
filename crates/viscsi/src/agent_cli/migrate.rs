//! `viscsi migrate VM --to HOST` and `viscsi migrations`: move a VM's storage session to
//! another host's agent, with a progress bar, and show past migrations.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agent::model::{MigrateRequest, MigrationPhase, MigrationView};
use clap::Args;

use super::show::{table, utc};
use super::vm::PathArg;
use super::{print_json, SocketArgs};

#[derive(Args)]
pub struct MigrateArgs {
    /// The VM to move.
    name: String,
    /// The destination agent: a name from the agent's --peer list, or HOST:PORT of its
    /// migration listener.
    #[arg(long)]
    to: String,
    /// The data path policy on the destination [default: the VM's own].
    #[arg(long, value_enum)]
    path: Option<PathArg>,
    /// Only this offload adapter on the destination.
    #[arg(long)]
    adapter: Option<String>,
    /// The vhost-user socket on the destination [default: <its state dir>/vhost/NAME.sock].
    #[arg(long = "vhost-socket", value_name = "PATH")]
    vhost_socket: Option<PathBuf>,
    /// Prepare now, switch over when this host's VMM stops the VM's rings (at the end of
    /// QEMU's live migration to the destination's socket); nothing is forwarded then.
    #[arg(long)]
    with_vmm: bool,
    /// Start the migration and return at once.
    #[arg(long)]
    no_wait: bool,
    /// Draw the progress bar even when stderr is not a terminal.
    #[arg(long)]
    progress: bool,
    /// Print the migration's final state as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Args)]
pub struct MigrationsArgs {
    /// Only this VM.
    name: Option<String>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Args)]
pub struct ClusterKeyArgs {
    /// The file to create (it must not exist); copy it to every agent of the cluster.
    file: PathBuf,
}

pub fn write_key(a: ClusterKeyArgs) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.file)
        .map_err(|e| format!("cannot create {}: {e}", a.file.display()))?;
    file.write_all(agent::migration::channel::ClusterKey::generate_file_contents().as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", a.file.display()))?;
    eprintln!("cluster key written to {}", a.file.display());
    Ok(())
}

/// Where the bar stands in each phase.
fn percent(phase: MigrationPhase) -> usize {
    match phase {
        MigrationPhase::Connecting => 5,
        MigrationPhase::Preparing => 30,
        MigrationPhase::AwaitingVmm => 50,
        MigrationPhase::Switching => 70,
        MigrationPhase::Forwarding | MigrationPhase::Completed | MigrationPhase::Abandoned => 100,
    }
}

fn phase_name(phase: MigrationPhase) -> &'static str {
    match phase {
        MigrationPhase::Connecting => "connecting",
        MigrationPhase::Preparing => "preparing",
        MigrationPhase::AwaitingVmm => "awaiting-vmm",
        MigrationPhase::Switching => "switching",
        MigrationPhase::Forwarding => "switched",
        MigrationPhase::Completed => "completed",
        MigrationPhase::Abandoned => "abandoned",
    }
}

fn bar(m: &MigrationView, elapsed: Duration) -> String {
    const WIDTH: usize = 30;
    let filled = percent(m.phase) * WIDTH / 100;
    format!(
        "\r\x1b[2K{} [{}{}] {:>3}% {:<10} {:>5.1}s  {}",
        m.vm,
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        percent(m.phase),
        phase_name(m.phase),
        elapsed.as_secs_f64(),
        m.detail
    )
}

pub async fn run(a: MigrateArgs) -> Result<(), String> {
    let client = a.socket.client();
    let request = MigrateRequest {
        to: a.to.clone(),
        path: a.path.map(PathArg::policy),
        adapter: a.adapter.clone(),
        vhost_socket: a.vhost_socket.clone(),
        with_vmm: a.with_vmm,
    };
    let started = Instant::now();
    let mut view: MigrationView = client
        .post(&format!("/v1/vms/{}/migrate", a.name), &request)
        .await?;
    let draw = a.progress || std::io::stderr().is_terminal();
    if !a.no_wait {
        let path = format!("/v1/migrations/{}", a.name);
        let mut last_phase = None;
        // Done for this command once the session has moved (forwarding may go on until
        // the VMM leaves this host) or the migration was abandoned.
        while !matches!(
            view.phase,
            MigrationPhase::Forwarding | MigrationPhase::Completed | MigrationPhase::Abandoned
        ) {
            if draw {
                eprint!("{}", bar(&view, started.elapsed()));
                let _ = std::io::stderr().flush();
            } else if last_phase != Some(view.phase) {
                eprintln!("{}: {}", phase_name(view.phase), view.detail);
            }
            last_phase = Some(view.phase);
            tokio::time::sleep(Duration::from_millis(50)).await;
            view = client.get(&path).await?;
        }
        if draw {
            eprintln!("{}", bar(&view, started.elapsed()));
        }
    }
    if a.json {
        print_json(&view)?;
    } else {
        println!("{}", summary(&view));
    }
    if view.phase == MigrationPhase::Abandoned {
        return Err(format!(
            "migration of VM {} abandoned: {}",
            view.vm,
            view.error.as_deref().unwrap_or("unknown reason")
        ));
    }
    Ok(())
}

fn summary(m: &MigrationView) -> String {
    let to = m.to_host.as_deref().unwrap_or(&m.to);
    match m.phase {
        MigrationPhase::Forwarding | MigrationPhase::Completed => format!(
            "VM {} moved to host {to}: {} -> {}, commands held {:.1} ms{}",
            m.vm,
            m.from_path,
            m.to_path.as_deref().unwrap_or("?"),
            m.switchover_ms.unwrap_or(0.0),
            if m.phase == MigrationPhase::Forwarding {
                "; this host forwards the VM's commands until its VMM has moved"
            } else {
                ""
            }
        ),
        MigrationPhase::Abandoned => format!("VM {} stays on this host", m.vm),
        _ => format!("VM {}: {} ({})", m.vm, phase_name(m.phase), m.detail),
    }
}

pub async fn list(a: MigrationsArgs) -> Result<(), String> {
    let client = a.socket.client();
    let views: Vec<MigrationView> = match &a.name {
        Some(name) => vec![client.get(&format!("/v1/migrations/{name}")).await?],
        None => client.get("/v1/migrations").await?,
    };
    if a.json {
        return print_json(&views);
    }
    let mut rows = vec![vec![
        "VM".to_owned(),
        "TO".into(),
        "STARTED".into(),
        "PHASE".into(),
        "FROM PATH".into(),
        "TO PATH".into(),
        "HELD MS".into(),
        "FORWARDED".into(),
        "ERROR".into(),
    ]];
    for m in &views {
        rows.push(vec![
            m.vm.clone(),
            m.to_host.clone().unwrap_or_else(|| m.to.clone()),
            utc(m.started_ms),
            phase_name(m.phase).into(),
            m.from_path.clone(),
            m.to_path.clone().unwrap_or_default(),
            m.switchover_ms
                .map(|v| format!("{v:.1}"))
                .unwrap_or_default(),
            m.forwarded.to_string(),
            m.error.clone().unwrap_or_default(),
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}
