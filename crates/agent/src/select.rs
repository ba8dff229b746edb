//! Choosing a VM's data path: offload when an offload adapter with a free function reaches
//! the target, else software — and saying why.

use std::sync::Arc;

use datapath::{
    Adapter, AdapterHealth, AdapterKind, BoxFuture, DataPath, PathError, PathInfo, SessionState,
};

use crate::host::Shared;
use crate::model::{PathPolicy, VmRecord};

/// A path that was opened, and why it was chosen.
pub(crate) struct Chosen {
    pub path: Arc<dyn DataPath>,
    pub adapter: String,
    pub kind: AdapterKind,
    pub reason: String,
}

/// A path proven usable on this host but not opened yet (a migration's destination).
pub(crate) struct Prepared {
    pub adapter: Arc<dyn Adapter>,
    pub name: String,
    pub kind: AdapterKind,
    pub reason: String,
    /// What the trial login used.
    pub trial: PathInfo,
}

/// Opens a path for `record` as its policy says. Credentials the target refuses end the
/// search at once (another path would be refused too).
pub(crate) async fn open_path(
    shared: &Shared,
    record: &VmRecord,
    state: Option<&SessionState>,
) -> Result<Chosen, PathError> {
    let client = record.client.clone();
    let state = state.cloned();
    let (path, name, kind, _, reason) = choose(shared, record, move |adapter| {
        let client = client.clone();
        let state = state.clone();
        Box::pin(async move { adapter.open(&client, state.as_ref()).await })
    })
    .await?;
    Ok(Chosen {
        path,
        adapter: name,
        kind,
        reason,
    })
}

/// Chooses a path for `record` as [`open_path`] would and proves it with a trial login
/// ([`Adapter::probe`]), leaving the VM's own session alone.
pub(crate) async fn prepare_path(
    shared: &Shared,
    record: &VmRecord,
) -> Result<Prepared, PathError> {
    let client = record.client.clone();
    let (trial, name, kind, adapter, reason) = choose(shared, record, move |adapter| {
        let client = client.clone();
        Box::pin(async move { adapter.probe(&client).await })
    })
    .await?;
    Ok(Prepared {
        adapter,
        name,
        kind,
        reason,
        trial,
    })
}

/// Tries the adapters the policy allows, offload first, with `attempt`; returns its result,
/// the adapter's name, kind and handle, and why it was chosen.
async fn choose<T>(
    shared: &Shared,
    record: &VmRecord,
    attempt: impl Fn(Arc<dyn Adapter>) -> BoxFuture<'static, Result<T, PathError>> + Send + Sync,
) -> Result<(T, String, AdapterKind, Arc<dyn Adapter>, String), PathError> {
    let client = &record.client;
    let mut notes: Vec<String> = Vec::new();
    if record.policy != PathPolicy::Software {
        let candidates = shared.offload_adapters();
        if candidates.is_empty() {
            notes.push("no offload adapter on this host".into());
        }
        for entry in candidates {
            if record.adapter.as_ref().is_some_and(|a| *a != entry.name) {
                continue;
            }
            let info = entry.adapter.info();
            if let AdapterHealth::Failed(why) = &info.health {
                notes.push(format!("{}: failed ({why})", entry.name));
                continue;
            }
            if let Some(total) = info.vfs_total {
                if info.vfs_in_use >= total {
                    notes.push(format!("{}: no free VF ({total} in use)", entry.name));
                    continue;
                }
            }
            let mut reached = None;
            for portal in &client.portals {
                if entry.adapter.reaches(portal).await {
                    reached = Some(portal.clone());
                    break;
                }
            }
            let Some(portal) = reached else {
                notes.push(format!(
                    "{}: cannot reach {}",
                    entry.name,
                    client.portals.join(", ")
                ));
                continue;
            };
            match attempt(entry.adapter.clone()).await {
                Ok(done) => {
                    let free = info
                        .vfs_total
                        .map(|t| format!("{} of {t} VFs free", t - info.vfs_in_use))
                        .unwrap_or_else(|| "free VF".into());
                    return Ok((
                        done,
                        entry.name.clone(),
                        AdapterKind::Offload,
                        entry.adapter.clone(),
                        format!(
                            "offload adapter {} has a free VF ({free}) and reaches {portal}",
                            entry.name
                        ),
                    ));
                }
                Err(e @ PathError::Auth { .. }) | Err(e @ PathError::Client(_)) => return Err(e),
                Err(e) => notes.push(format!("{}: {e}", entry.name)),
            }
        }
        if record.policy == PathPolicy::Offload {
            return Err(PathError::Unreachable(format!(
                "policy is offload and no offload adapter can serve the VM: {}",
                notes.join("; ")
            )));
        }
    }
    let done = attempt(shared.software.clone()).await?;
    let reason = match record.policy {
        PathPolicy::Software => "policy is software".to_owned(),
        _ => format!("software path: {}", notes.join("; ")),
    };
    Ok((
        done,
        datapath::software::SOFTWARE_ADAPTER.into(),
        AdapterKind::Software,
        shared.software.clone(),
        reason,
    ))
}
