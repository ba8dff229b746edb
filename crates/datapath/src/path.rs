//! The data-path and adapter traits and the types that cross them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use initiator::{DataIn, Residual, ScsiRequest};
use iscsi_wire::{Status, TmfFunction};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{ClientError, InitiatorClient};

/// A boxed future, so that the traits can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A finished SCSI command, whatever path carried it.
#[derive(Clone, Debug)]
pub struct Completion {
    pub status: Status,
    /// Sense data (fixed or descriptor format), empty if none.
    pub sense: Bytes,
    /// Data-In, at most the command's `read_len` bytes.
    pub data: DataIn,
    pub residual: Residual,
}

/// Why a data path could not do what was asked. Messages are one line, without secrets.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The initiator client is not usable (bad field, unreadable secret).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The target refused the client's credentials.
    #[error("authentication failed at {portal}")]
    Auth { portal: String },
    /// No portal could be reached or logged in to.
    #[error("target unreachable: {0}")]
    Unreachable(String),
    /// The path itself failed (adapter crashed, hung, link down, function reset). The command
    /// did not complete here and may be re-issued on another path.
    #[error("data path failed: {0}")]
    PathFailed(String),
    /// The session's recovery policy gave up (the target was gone too long).
    #[error("session lost: {0}")]
    SessionLost(String),
    /// The target answered with a service response other than COMMAND COMPLETED.
    #[error("target failure")]
    TargetFailure,
    /// The path refused this request (malformed, too large, unsupported).
    #[error("request refused: {0}")]
    Refused(String),
    /// The adapter has no free function for another VM.
    #[error("no free virtual function on {0}")]
    NoCapacity(String),
    /// The path was closed.
    #[error("data path closed")]
    Closed,
}

impl PathError {
    /// True when the failure belongs to the path, not to the command or the target: the
    /// VM should move to another path and re-issue.
    pub fn is_path_failure(&self) -> bool {
        matches!(self, PathError::PathFailed(_))
    }
}

/// The kind of an adapter (and of the data paths it opens).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    /// An iSCSI offload HBA: the adapter runs iSCSI and TCP, one virtual function per VM.
    Offload,
    /// viscsi's software initiator on the host's TCP/IP stack.
    Software,
}

impl std::fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdapterKind::Offload => "offload",
            AdapterKind::Software => "software",
        })
    }
}

/// Health of a data path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum Health {
    Up,
    /// Reconnecting to the target; commands wait.
    Recovering,
    /// Unusable; commands fail.
    Failed(String),
}

/// Health of an adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum AdapterHealth {
    Ok,
    /// Crashed, hung, link down, unreachable driver socket, …: every VM on it must move.
    Failed(String),
}

/// What a data path is, for operators and the agent's records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathInfo {
    pub kind: AdapterKind,
    /// The adapter's name (`software` for the emulator).
    pub adapter: String,
    /// The virtual function (offload only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vf: Option<u32>,
    /// The portal the session is logged in to.
    pub portal: String,
    pub target: String,
    pub initiator_name: String,
    pub isid: String,
    pub header_digest: bool,
    pub data_digest: bool,
}

/// Counters of a data path since it was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStats {
    pub commands: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Commands that ended with an error (not a SCSI status).
    pub errors: u64,
    /// Session recoveries (re-logins) inside the path.
    pub recoveries: u64,
}

/// A path's session state, exported for another path (or host) to continue the session.
///
/// At ErrorRecoveryLevel 0 the continuation is session reinstatement: the next path logs in
/// with the same InitiatorName + ISID, and the target ends this session and its tasks. So the
/// state is the identity and where it was logged in; commands still outstanding are handed
/// over by the caller, which re-issues them once on the next path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    pub initiator_name: String,
    pub isid: String,
    pub target: String,
    pub portal: String,
    pub stats: PathStats,
}

/// One VM's session on one iSCSI implementation.
///
/// Every method may be called from many tasks at once. Commands that were submitted before
/// [`DataPath::quiesce`] complete normally; commands submitted while quiesced wait until
/// [`DataPath::resume`].
pub trait DataPath: Send + Sync {
    fn info(&self) -> PathInfo;

    /// Sends one SCSI command (`lun` in the 8-byte SAM encoding) and completes it once.
    fn submit(&self, command: ScsiRequest) -> BoxFuture<'static, Result<Completion, PathError>>;

    /// Task management on LUN number `lun` (ABORT TASK SET, LOGICAL UNIT RESET, …).
    fn task_management(
        &self,
        function: TmfFunction,
        lun: u64,
    ) -> BoxFuture<'static, Result<(), PathError>>;

    /// Stops admitting commands and returns when every admitted one has completed.
    fn quiesce(&self) -> BoxFuture<'static, ()>;

    /// Admits commands again.
    fn resume(&self);

    /// The state another path needs to continue this session.
    fn export_state(&self) -> SessionState;

    fn health(&self) -> Health;

    fn stats(&self) -> PathStats;

    /// Logs out and releases the path's resources (a VF goes back to its adapter).
    fn close(&self) -> BoxFuture<'static, Result<(), PathError>>;
}

/// What an adapter is, what it can do and how it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterInfo {
    pub name: String,
    pub kind: AdapterKind,
    /// Model and driver, e.g. `viscsi reference offload adapter`.
    pub model: String,
    /// Virtual functions in total (None: not limited).
    pub vfs_total: Option<u32>,
    pub vfs_in_use: u32,
    pub health: AdapterHealth,
    /// Further facts worth showing (firmware, ports, capabilities), as key/value pairs.
    #[serde(default)]
    pub details: Vec<(String, String)>,
}

/// Something that opens data paths for VMs: an offload adapter's driver or the software
/// emulator.
pub trait Adapter: Send + Sync {
    fn info(&self) -> AdapterInfo;

    /// Health updates; the agent moves the adapter's VMs away when it turns `Failed`.
    fn watch_health(&self) -> watch::Receiver<AdapterHealth>;

    /// Whether the adapter can reach `portal` (`host:port`) now.
    fn reaches<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, bool>;

    /// Brings up `client`'s session on this adapter (a VF is allocated and programmed for an
    /// offload adapter). With `state`, the session continues that one (see
    /// [`SessionState`]).
    fn open<'a>(
        &'a self,
        client: &'a InitiatorClient,
        state: Option<&'a SessionState>,
    ) -> BoxFuture<'a, Result<Arc<dyn DataPath>, PathError>>;

    /// Proves, without touching the VM's own session, that [`Adapter::open`] would succeed
    /// here: the client's secrets resolve, a portal is reached and the target accepts the
    /// login. The trial logs in with [`probe_isid`] (a separate I_T nexus, so the VM's
    /// session, its tasks and reservations are untouched) and logs out at once. Returns what
    /// the trial path was.
    fn probe<'a>(
        &'a self,
        client: &'a InitiatorClient,
    ) -> BoxFuture<'a, Result<PathInfo, PathError>> {
        Box::pin(async move {
            let mut trial = client.clone();
            trial.isid = format!("{:012x}", probe_isid(client.isid_value()?));
            let path = self.open(&trial, None).await?;
            let info = path.info();
            let _ = path.close().await;
            Ok(info)
        })
    }
}

/// The ISID a [`Adapter::probe`] logs in with: the VM's ISID with the top bit of its
/// qualifier flipped, so it never equals the VM's own and stays of the same ISID type.
pub fn probe_isid(isid: u64) -> u64 {
    (isid ^ 0x8000) & 0xffff_ffff_ffff
}
