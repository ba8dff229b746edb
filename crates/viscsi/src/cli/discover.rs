//! `viscsi discover PORTAL`: a SendTargets discovery session, printed as one target per line
//! followed by its portals.

use clap::Args;
use initiator::url::IscsiUrl;
use initiator::{discover, DiscoveredTarget};

use super::{describe_error, ConnectArgs, Connection};

/// `viscsi discover` flags.
#[derive(Args)]
pub struct DiscoverArgs {
    /// HOST[:PORT], [IPv6][:PORT] or iscsi://[USER[%PASSWORD]@]HOST[:PORT]/
    #[arg(value_name = "PORTAL")]
    portal: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub struct DiscoverConfig {
    connection: Connection,
    portal: IscsiUrl,
}

impl TryFrom<DiscoverArgs> for DiscoverConfig {
    type Error = String;
    fn try_from(a: DiscoverArgs) -> Result<Self, String> {
        let connection = Connection::try_from(a.connect)?;
        let portal = connection.portal_url(&a.portal)?;
        Ok(DiscoverConfig { connection, portal })
    }
}

/// The targets a portal reports (discovery CHAP from the URL or the CHAP flags).
pub async fn discover_targets(
    connection: &Connection,
    portal: &IscsiUrl,
) -> Result<Vec<DiscoveredTarget>, String> {
    discover(connection.discovery_options(portal))
        .await
        .map_err(|e| format!("discovery at {}: {}", portal.portal, describe_error(&e)))
}

pub async fn run(config: DiscoverConfig) -> Result<(), String> {
    let targets = discover_targets(&config.connection, &config.portal).await?;
    if targets.is_empty() {
        eprintln!("viscsi: {} offers no targets to us", config.portal.portal);
    }
    for t in targets {
        println!("{}", t.name);
        for (address, tag) in t.addresses {
            println!("    {address},{tag}");
        }
    }
    Ok(())
}
