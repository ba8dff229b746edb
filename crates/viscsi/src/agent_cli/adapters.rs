//! `viscsi adapters`: what the agent found and uses.

use agent::model::AdaptersView;
use clap::Args;
use datapath::AdapterHealth;

use super::show::table;
use super::{print_json, SocketArgs};

#[derive(Args)]
pub struct AdaptersArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

pub async fn run(a: AdaptersArgs) -> Result<(), String> {
    let view: AdaptersView = a.socket.client().get("/v1/adapters").await?;
    if a.json {
        return print_json(&view);
    }
    println!("host {}", view.host);
    let mut rows = vec![
        ["ADAPTER", "KIND", "HEALTH", "VFS", "VMS", "MODEL / SOURCE"]
            .map(String::from)
            .to_vec(),
    ];
    for ad in &view.adapters {
        let i = &ad.info;
        rows.push(vec![
            i.name.clone(),
            i.kind.to_string(),
            match &i.health {
                AdapterHealth::Ok => "ok".into(),
                AdapterHealth::Failed(r) => format!("failed: {r}"),
            },
            match i.vfs_total {
                Some(t) => format!("{}/{t}", i.vfs_in_use),
                None => format!("{}/-", i.vfs_in_use),
            },
            if ad.vms.is_empty() {
                "-".into()
            } else {
                ad.vms.join(",")
            },
            format!("{} ({})", i.model, ad.source),
        ]);
    }
    print!("{}", table(&rows));
    for ad in &view.adapters {
        if !ad.info.details.is_empty() {
            let d: Vec<String> = ad
                .info
                .details
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("  {}: {}", ad.info.name, d.join(", "));
        }
    }
    for (name, why) in &view.unavailable {
        println!("unavailable: {name}: {why}");
    }
    let s = &view.sysfs;
    println!(
        "sysfs: {} iSCSI hosts, {} iSCSI transports, {} NICs",
        s.iscsi_hosts.len(),
        s.transports.len(),
        s.nics.len()
    );
    for h in &s.iscsi_hosts {
        println!(
            "  iscsi host {}: transport {}, ip {}, state {}, sr-iov {}",
            h.name,
            h.transport.as_deref().unwrap_or("?"),
            h.ip_address.as_deref().unwrap_or("-"),
            h.port_state.as_deref().unwrap_or("-"),
            h.sriov
                .as_ref()
                .map(|v| format!("{}/{} VFs", v.num_vfs, v.total_vfs))
                .unwrap_or_else(|| "no".into()),
        );
    }
    for t in &s.transports {
        println!(
            "  transport {}{}",
            t.name,
            if t.offload { " (offload)" } else { "" }
        );
    }
    for n in &s.nics {
        println!(
            "  nic {}: {}{}, {}{}",
            n.name,
            n.operstate.as_deref().unwrap_or("?"),
            n.speed_mbps
                .map(|s| format!(" {s} Mb/s"))
                .unwrap_or_default(),
            if n.virtual_device {
                "virtual"
            } else {
                n.driver.as_deref().unwrap_or("physical")
            },
            n.sriov
                .as_ref()
                .map(|v| format!(", sr-iov {}/{} VFs", v.num_vfs, v.total_vfs))
                .unwrap_or_default(),
        );
    }
    Ok(())
}
