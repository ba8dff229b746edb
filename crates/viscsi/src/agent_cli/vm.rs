//! `viscsi vm create|list|show|delete|scsi`.

use std::path::PathBuf;

use agent::model::{
    CreateVm, Frontend, FrontendKind, PathPolicy, ScsiPassthrough, ScsiResult, VmView,
};
use base64::Engine;
use clap::{Args, Subcommand, ValueEnum};
use datapath::{ChapSettings, InitiatorClient, Secret};
use initiator::url::{self, IscsiUrl};

use super::show::{path_name, table, vm_details};
use super::{print_json, SocketArgs};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Create a VM: its initiator client is stored and its data path brought up.
    Create(Box<CreateArgs>),
    /// List the VMs with their data paths.
    List(ListArgs),
    /// Show one VM: data path and why, identity, metrics, history.
    Show(ShowArgs),
    /// Log the VM's session out and forget the VM.
    Delete(ShowArgs),
    /// Send one SCSI command through the VM's data path (like sg_raw).
    Scsi(ScsiArgs),
}

#[derive(Copy, Clone, ValueEnum)]
pub(super) enum PathArg {
    Auto,
    Software,
    Offload,
}

impl PathArg {
    pub(super) fn policy(self) -> PathPolicy {
        match self {
            PathArg::Auto => PathPolicy::Auto,
            PathArg::Software => PathPolicy::Software,
            PathArg::Offload => PathPolicy::Offload,
        }
    }
}

#[derive(Args)]
pub struct CreateArgs {
    /// The VM's name.
    name: String,
    /// The LUN(s) as iscsi://HOST[:PORT]/TARGET[/LUN] (no credentials in it: use the flags).
    #[arg(long)]
    url: Option<String>,
    /// Target portal HOST[:PORT], repeatable (instead of --url).
    #[arg(long = "portal")]
    portals: Vec<String>,
    /// TargetName (instead of --url).
    #[arg(long)]
    target: Option<String>,
    /// A LUN the VM uses, repeatable [default: all the target reports].
    #[arg(long = "lun")]
    luns: Vec<u64>,
    /// The VM's InitiatorName [default: a fresh unique one].
    #[arg(long)]
    initiator_name: Option<String>,
    /// The VM's ISID, 12 hex digits [default: a fixed random-type one].
    #[arg(long)]
    isid: Option<String>,
    /// CHAP user name.
    #[arg(long)]
    chap_user: Option<String>,
    /// File holding the CHAP secret (read here and stored by the agent). Also
    /// VISCSI_CHAP_SECRET.
    #[arg(long)]
    chap_secret_file: Option<PathBuf>,
    /// For mutual CHAP: the name the target must answer with.
    #[arg(long)]
    target_chap_user: Option<String>,
    /// File holding the target's CHAP secret. Also VISCSI_TARGET_CHAP_SECRET.
    #[arg(long)]
    target_chap_secret_file: Option<PathBuf>,
    /// The VM's persistent-reservation key, 16 hex digits.
    #[arg(long)]
    reservation_key: Option<String>,
    /// Which data paths the VM may use.
    #[arg(long, value_enum, default_value = "auto")]
    path: PathArg,
    /// Only this offload adapter.
    #[arg(long)]
    adapter: Option<String>,
    /// Serve the VM a virtual bus for its VMM: a vhost-user-scsi or vhost-user-blk device.
    #[arg(long, value_enum)]
    frontend: Option<FrontendArg>,
    /// The vhost-user socket [default: <agent state dir>/vhost/NAME.sock].
    #[arg(long = "vhost-socket", value_name = "PATH", requires = "frontend")]
    vhost_socket: Option<PathBuf>,
    /// Request queues of the device (1-16).
    #[arg(long, default_value_t = 4, requires = "frontend")]
    queues: u16,
    /// The VM's memory in MiB, for the QEMU options printed.
    #[arg(long, default_value_t = 1024, requires = "frontend")]
    memory_mib: u64,
    /// A complete initiator client record (JSON) instead of the flags above.
    #[arg(long, conflicts_with_all = ["url", "portals", "target", "luns", "initiator_name", "isid", "chap_user", "reservation_key"])]
    client_file: Option<PathBuf>,
    /// Print the created VM as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Args)]
pub struct ShowArgs {
    name: String,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Args)]
pub struct ScsiArgs {
    name: String,
    /// LUN number.
    #[arg(long, default_value_t = 0)]
    lun: u64,
    /// The CDB in hex, e.g. 12000000ff00 (INQUIRY).
    #[arg(long)]
    cdb: String,
    /// Data-Out from this file.
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// Data-In bytes to accept.
    #[arg(long, default_value_t = 0)]
    read_len: u32,
    /// Write the Data-In here instead of a hex dump.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

fn secret_from(file: &Option<PathBuf>, env: &str) -> Result<Option<Secret>, String> {
    if let Some(f) = file {
        let bytes =
            url::read_secret_file(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        let s = String::from_utf8(bytes)
            .map_err(|_| format!("{}: the secret is not UTF-8 text", f.display()))?;
        return Ok(Some(Secret::Value(s)));
    }
    Ok(std::env::var(env).ok().map(Secret::Value))
}

/// `--frontend`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum FrontendArg {
    Scsi,
    Blk,
}

fn create_request(a: &CreateArgs) -> Result<CreateVm, String> {
    let frontend = match a.frontend {
        Some(kind) => {
            let socket = match &a.vhost_socket {
                Some(p) if p.is_absolute() => Some(p.clone()),
                Some(p) => Some(
                    std::env::current_dir()
                        .map_err(|e| format!("--vhost-socket: {e}"))?
                        .join(p),
                ),
                None => None,
            };
            Some(Frontend {
                kind: match kind {
                    FrontendArg::Scsi => FrontendKind::Scsi,
                    FrontendArg::Blk => FrontendKind::Blk,
                },
                socket,
                queues: Some(a.queues),
                memory_mib: Some(a.memory_mib),
            })
        }
        None => None,
    };
    let mut req = CreateVm {
        frontend,
        name: a.name.clone(),
        path: a.path.policy(),
        adapter: a.adapter.clone(),
        ..CreateVm::default()
    };
    if let Some(f) = &a.client_file {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        let client =
            InitiatorClient::from_json(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        req.client = Some(client);
        return Ok(req);
    }
    let mut portals = Vec::new();
    for p in &a.portals {
        portals.push(url::parse_portal(p).map_err(|e| format!("--portal {p}: {e}"))?);
    }
    let mut target = a.target.clone();
    let mut luns = a.luns.clone();
    if let Some(u) = &a.url {
        let parsed: IscsiUrl = u.parse().map_err(|e| format!("--url: {e}"))?;
        if parsed.chap.is_some() {
            return Err(
                "--url: put no credentials in the URL; use --chap-user and --chap-secret-file"
                    .into(),
            );
        }
        portals.insert(0, parsed.portal.clone());
        target = Some(
            parsed
                .require_target()
                .map_err(|e| format!("--url: {e}"))?
                .to_owned(),
        );
        if let Some(l) = parsed.lun {
            luns.insert(0, l);
        }
    }
    if portals.is_empty() || target.is_none() {
        return Err("give --url iscsi://HOST/TARGET[/LUN], or --portal and --target".into());
    }
    req.portals = portals;
    req.target = target;
    req.luns = luns;
    req.initiator_name = a.initiator_name.clone();
    req.isid = a.isid.clone();
    req.reservation_key = a.reservation_key.clone();
    if let Some(user) = &a.chap_user {
        let secret = secret_from(&a.chap_secret_file, "VISCSI_CHAP_SECRET")?
            .ok_or("--chap-user needs --chap-secret-file (or VISCSI_CHAP_SECRET)")?;
        let target_secret = match &a.target_chap_user {
            Some(_) => Some(
                secret_from(&a.target_chap_secret_file, "VISCSI_TARGET_CHAP_SECRET")?.ok_or(
                    "--target-chap-user needs --target-chap-secret-file (or VISCSI_TARGET_CHAP_SECRET)",
                )?,
            ),
            None => None,
        };
        req.chap = Some(ChapSettings {
            user: user.clone(),
            secret,
            target_user: a.target_chap_user.clone(),
            target_secret,
        });
    } else if a.target_chap_user.is_some() {
        return Err("--target-chap-user needs --chap-user (mutual CHAP is two-way)".into());
    }
    Ok(req)
}

pub async fn run(command: VmCommand) -> Result<(), String> {
    match command {
        VmCommand::Create(a) => {
            let req = create_request(&a)?;
            let view: VmView = a.socket.client().post("/v1/vms", &req).await?;
            if a.json {
                return print_json(&view);
            }
            println!(
                "created VM {} on {}: {}",
                view.name,
                view.path
                    .as_ref()
                    .map(path_name)
                    .unwrap_or_else(|| "no path".into()),
                view.path_reason
            );
            println!(
                "initiator {} isid {}",
                view.client.initiator_name, view.client.isid
            );
            if let Some(f) = &view.frontend {
                println!(
                    "vhost-user-{} on {}; attach with these QEMU options:",
                    match f.kind {
                        FrontendKind::Scsi => "scsi",
                        FrontendKind::Blk => "blk",
                    },
                    f.socket.display()
                );
                println!("  {}", qemu_command_line(&f.qemu_options));
            }
            Ok(())
        }
        VmCommand::List(a) => {
            let views: Vec<VmView> = a.socket.client().get("/v1/vms").await?;
            if a.json {
                return print_json(&views);
            }
            let mut rows = vec![[
                "NAME",
                "STATE",
                "DATA PATH",
                "PORTAL",
                "TARGET",
                "COMMANDS",
                "FAILOVERS",
            ]
            .map(String::from)
            .to_vec()];
            for v in &views {
                let m = &v.metrics;
                rows.push(vec![
                    v.name.clone(),
                    format!("{:?}", v.state).to_lowercase(),
                    v.path
                        .as_ref()
                        .map(path_name)
                        .unwrap_or_else(|| "none".into()),
                    v.path
                        .as_ref()
                        .map(|p| p.portal.clone())
                        .unwrap_or_default(),
                    v.client.target.clone(),
                    (m.reads + m.writes + m.others).to_string(),
                    m.failovers.to_string(),
                ]);
            }
            print!("{}", table(&rows));
            Ok(())
        }
        VmCommand::Show(a) => {
            let view: VmView = a.socket.client().get(&vm_path(&a.name)?).await?;
            if a.json {
                return print_json(&view);
            }
            print!("{}", vm_details(&view));
            Ok(())
        }
        VmCommand::Delete(a) => {
            a.socket.client().delete(&vm_path(&a.name)?).await?;
            if !a.json {
                println!("deleted VM {}", a.name);
            }
            Ok(())
        }
        VmCommand::Scsi(a) => scsi(a).await,
    }
}

/// `/v1/vms/NAME`, refusing names that would change the path.
fn vm_path(name: &str) -> Result<String, String> {
    if !agent::model::valid_vm_name(name) {
        return Err(format!("{name:?} is not a valid VM name"));
    }
    Ok(format!("/v1/vms/{name}"))
}

async fn scsi(a: ScsiArgs) -> Result<(), String> {
    let data = match &a.data_file {
        Some(f) => std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?,
        None => Vec::new(),
    };
    let req = ScsiPassthrough {
        lun: a.lun,
        cdb: a.cdb.clone(),
        data: base64::engine::general_purpose::STANDARD.encode(&data),
        read_len: a.read_len,
    };
    let result: ScsiResult = a
        .socket
        .client()
        .post(&format!("{}/scsi", vm_path(&a.name)?), &req)
        .await?;
    if a.json {
        return print_json(&result);
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(result.data.as_bytes())
        .map_err(|_| "the agent sent data that is not base64")?;
    println!("status 0x{:02x} via {}", result.status, result.path);
    if !result.sense.is_empty() {
        println!("sense {}", result.sense);
    }
    if result.residual != 0 {
        println!("residual {}", result.residual);
    }
    match &a.out {
        Some(f) => {
            std::fs::write(f, &data).map_err(|e| format!("cannot write {}: {e}", f.display()))?
        }
        None => {
            for (i, chunk) in data.chunks(16).enumerate() {
                let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                let text: String = chunk
                    .iter()
                    .map(|&b| {
                        if b.is_ascii_graphic() || b == b' ' {
                            b as char
                        } else {
                            '.'
                        }
                    })
                    .collect();
                println!("{:08x}  {:<47}  {text}", i * 16, hex.join(" "));
            }
        }
    }
    if result.status != 0 {
        return Err(format!("SCSI status 0x{:02x}", result.status));
    }
    Ok(())
}

/// QEMU options as one shell line: each option with its argument, quoted where needed.
pub fn qemu_command_line(options: &[String]) -> String {
    let quoted: Vec<String> = options
        .iter()
        .map(|o| {
            if o.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=,./:+@%".contains(c))
            {
                o.clone()
            } else {
                format!("'{}'", o.replace('\'', "'\\''"))
            }
        })
        .collect();
    quoted
        .chunks(2)
        .map(|pair| pair.join(" "))
        .collect::<Vec<_>>()
        .join(" \\\n  ")
}
