//! `viscsi ls URL`: the targets behind a portal (or the one in the URL) and each target's LUNs
//! with device type, vendor, product, revision and, for block devices, the size from
//! READ CAPACITY (16).

use clap::Args;
use initiator::url::IscsiUrl;
use initiator::Session;

use super::inquiry::{device_type_name, has_capacity};
use super::units::human_bytes;
use super::{close, describe_error, discover::discover_targets, ConnectArgs, Connection};

/// `viscsi ls` flags.
#[derive(Args)]
pub struct LsArgs {
    /// iscsi://[USER[%PASSWORD]@]HOST[:PORT]/[TARGET-IQN[/LUN]]: a portal lists all targets.
    #[arg(value_name = "URL")]
    url: String,
    #[command(flatten)]
    pub(super) connect: ConnectArgs,
}

pub struct LsConfig {
    connection: Connection,
    url: IscsiUrl,
}

impl TryFrom<LsArgs> for LsConfig {
    type Error = String;
    fn try_from(a: LsArgs) -> Result<Self, String> {
        let connection = Connection::try_from(a.connect)?;
        let url = connection.portal_url(&a.url)?;
        Ok(LsConfig { connection, url })
    }
}

pub async fn run(config: LsConfig) -> Result<(), String> {
    let LsConfig { connection, url } = config;
    let targets: Vec<(String, Vec<(String, u16)>)> = match &url.target {
        Some(t) => vec![(t.clone(), Vec::new())],
        None => discover_targets(&connection, &url)
            .await?
            .into_iter()
            .map(|t| (t.name, t.addresses))
            .collect(),
    };
    if targets.is_empty() {
        eprintln!("viscsi: {} offers no targets to us", url.portal);
        return Ok(());
    }
    let single = targets.len() == 1;
    let mut failed = 0;
    for (name, addresses) in &targets {
        let mut target_url = url.clone();
        target_url.target = Some(name.clone());
        // Each target's block is printed whole, once its LUNs are known.
        let luns = match list_target(&connection, &target_url).await {
            Ok(lines) => lines,
            Err(e) if single => return Err(e),
            Err(e) => {
                eprintln!("viscsi: {name}: {e}");
                failed += 1;
                continue;
            }
        };
        println!("Target: {name}");
        for (address, tag) in addresses {
            println!("  Portal: {address},{tag}");
        }
        for line in luns {
            println!("  {line}");
        }
    }
    if failed > 0 {
        return Err(format!(
            "could not list {failed} of {} targets",
            targets.len()
        ));
    }
    Ok(())
}

/// Logs in to one target and describes its LUNs (only the URL's LUN if it names one).
async fn list_target(connection: &Connection, url: &IscsiUrl) -> Result<Vec<String>, String> {
    let session = connection.connect(url).await?;
    let result = describe_luns(&session, url.lun).await;
    close(&session).await;
    result
}

async fn describe_luns(session: &Session, only: Option<u64>) -> Result<Vec<String>, String> {
    let luns = match only {
        Some(lun) => vec![lun],
        None => session
            .report_luns()
            .await
            .map_err(|e| format!("REPORT LUNS: {}", describe_error(&e)))?,
    };
    let mut lines = Vec::with_capacity(luns.len());
    for lun in luns {
        lines.push(describe_lun(session, lun).await);
    }
    Ok(lines)
}

/// `LUN 1: disk, IET VIRTUAL-DISK 0001, 1.00 GiB (2097152 blocks of 512 B)`; problems with
/// one LUN are shown in its line rather than ending the listing.
async fn describe_lun(session: &Session, lun: u64) -> String {
    let inquiry = match session.inquiry(lun).await {
        Ok(i) => i,
        Err(e) => return format!("LUN {lun}: INQUIRY failed: {}", describe_error(&e)),
    };
    let mut line = format!(
        "LUN {lun}: {}, {} {} {}",
        device_type_name(inquiry.device_type),
        inquiry.vendor,
        inquiry.product,
        inquiry.revision
    );
    if inquiry.removable {
        line.push_str(", removable");
    }
    if has_capacity(inquiry.device_type) {
        match session.read_capacity(lun).await {
            Ok(c) => line.push_str(&format!(
                ", {} ({} blocks of {} B{})",
                human_bytes(c.bytes()),
                c.blocks,
                c.block_size,
                if c.thin { ", thin" } else { "" }
            )),
            Err(e) => line.push_str(&format!(", size unknown ({})", describe_error(&e))),
        }
    }
    line
}
