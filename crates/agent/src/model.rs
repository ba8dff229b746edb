//! What the control API exchanges and what the store keeps: VM records and their views.

use datapath::{
    AdapterInfo, ChapSettings, Health, InitiatorClient, PathInfo, PathStats, CLIENT_VERSION,
};
use serde::{Deserialize, Serialize};

use crate::metrics::MetricsSnapshot;

/// Which data paths a VM may use.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathPolicy {
    /// Offload when an offload adapter with a free function reaches the target, else software.
    #[default]
    Auto,
    /// The software initiator only.
    Software,
    /// An offload adapter only (the VM does not run without one).
    Offload,
}

impl std::fmt::Display for PathPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathPolicy::Auto => "auto",
            PathPolicy::Software => "software",
            PathPolicy::Offload => "offload",
        })
    }
}

/// `POST /v1/vms`: a VM to create. Either a complete `client` record, or the parts of one
/// (then the VM gets a fresh unique InitiatorName and a fixed ISID unless given).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    #[serde(default)]
    pub path: PathPolicy,
    /// With `path: offload` or `auto`: only this adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<InitiatorClient>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub portals: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub luns: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<ChapSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_key: Option<String>,
    /// The virtual bus the agent serves for the VMM (none: the VM's I/O comes only through
    /// the control API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<Frontend>,
}

/// Which device the VM's VMM attaches, on which vhost-user socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frontend {
    pub kind: FrontendKind,
    /// Absolute path of the socket; default `<state dir>/vhost/<VM>.sock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<std::path::PathBuf>,
    /// Request queues offered to the VMM (1–16; default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    /// The VM's memory in MiB, only for the QEMU options shown (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

/// The device kind of a [`Frontend`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrontendKind {
    /// vhost-user-scsi: the guest's SCSI commands go to the LUNs unchanged.
    Scsi,
    /// vhost-user-blk: the VM's first LUN as a block device.
    Blk,
}

impl Frontend {
    pub const MAX_QUEUES: u16 = 16;
    pub const DEFAULT_QUEUES: u16 = 4;

    pub fn queues(&self) -> u16 {
        self.queues.unwrap_or(Self::DEFAULT_QUEUES)
    }

    /// Checks what a user gave.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(socket) = &self.socket {
            if !socket.is_absolute() {
                return Err(format!(
                    "frontend socket {} is not an absolute path",
                    socket.display()
                ));
            }
            if socket.file_name().is_none() {
                return Err(format!(
                    "frontend socket {} names no file",
                    socket.display()
                ));
            }
        }
        if self.memory_mib == Some(0) {
            return Err("frontend memory_mib must not be 0".into());
        }
        if !(1..=Self::MAX_QUEUES).contains(&self.queues()) {
            return Err(format!(
                "frontend queues must be 1 to {}, not {}",
                Self::MAX_QUEUES,
                self.queues()
            ));
        }
        Ok(())
    }
}

impl CreateVm {
    /// The VM's initiator client, validated.
    pub fn client(&self) -> Result<InitiatorClient, String> {
        let parts_given = !self.portals.is_empty()
            || self.target.is_some()
            || !self.luns.is_empty()
            || self.initiator_name.is_some()
            || self.isid.is_some()
            || self.chap.is_some()
            || self.reservation_key.is_some();
        let client = match &self.client {
            Some(_) if parts_given => {
                return Err("give either a complete client record or its parts, not both".into())
            }
            Some(c) => c.clone(),
            None => {
                let target = self.target.clone().ok_or("target is missing")?;
                let mut c = InitiatorClient::new_for_vm(&self.name, self.portals.clone(), target);
                if let Some(n) = &self.initiator_name {
                    c.initiator_name = n.clone();
                }
                if let Some(i) = &self.isid {
                    c.isid = i.to_ascii_lowercase();
                }
                c.luns = self.luns.clone();
                c.chap = self.chap.clone();
                c.reservation_key = self.reservation_key.clone();
                c
            }
        };
        client.validate().map_err(|e| e.to_string())?;
        Ok(client)
    }
}

/// A VM name: 1–64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn valid_vm_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// What the store keeps for a VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRecord {
    pub version: u32,
    pub name: String,
    pub client: InitiatorClient,
    pub policy: PathPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    pub created_ms: u64,
    /// The most recent events, oldest first (at most [`VmRecord::HISTORY`]).
    #[serde(default)]
    pub history: Vec<VmEvent>,
    /// The virtual bus, with its socket resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<Frontend>,
    /// Set when the VM's session was handed to another host: this host must not log in
    /// with the VM's identity again (it would take the session from that host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
}

impl VmRecord {
    pub const HISTORY: usize = 100;

    pub fn new(
        name: String,
        client: InitiatorClient,
        policy: PathPolicy,
        adapter: Option<String>,
    ) -> Self {
        VmRecord {
            version: CLIENT_VERSION,
            name,
            client,
            policy,
            adapter,
            created_ms: now_ms(),
            history: Vec::new(),
            frontend: None,
            moved_to: None,
        }
    }

    pub fn push_event(&mut self, event: VmEvent) {
        self.history.push(event);
        let excess = self.history.len().saturating_sub(Self::HISTORY);
        self.history.drain(..excess);
    }

    /// Checks a record read back from the store.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_vm_name(&self.name) {
            return Err(format!("VM name {:?} is not valid", self.name));
        }
        if let Some(frontend) = &self.frontend {
            frontend.validate()?;
        }
        self.client.validate().map_err(|e| e.to_string())
    }
}

/// Something that happened to a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEvent {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `created`, `path`, `failover`, `error`, `restored`, `deleted`.
    pub kind: String,
    pub message: String,
}

impl VmEvent {
    pub fn new(kind: &str, message: impl Into<String>) -> VmEvent {
        VmEvent {
            at_ms: now_ms(),
            kind: kind.into(),
            message: message.into(),
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where a VM is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Bringing up a data path.
    Starting,
    Running,
    /// No data path; the agent keeps trying.
    Waiting,
    /// Arriving by migration: the path is prepared, the session is still on the source
    /// host; commands from the VM's bus wait for the switchover.
    Incoming,
    /// Migrated away: the session is on another host, and commands still arriving here
    /// (from a VMM not moved yet) are forwarded to it.
    Moved,
}

/// `POST /v1/vms/{name}/migrate`: move the VM's storage session to another host's agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination: a peer name from the agent's `--peer` list, or `host:port` of the
    /// other agent's migration listener.
    pub to: String,
    /// The path policy on the destination (default: the VM's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathPolicy>,
    /// Only this offload adapter on the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// The vhost-user socket on the destination (default: the destination's
    /// `<state dir>/vhost/<VM>.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<std::path::PathBuf>,
    /// Switch over when this host's VMM stops the VM's rings (the end of the VMM's own live
    /// migration) instead of at once: then nothing needs forwarding.
    #[serde(default)]
    pub with_vmm: bool,
}

/// Where a migration is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Opening the encrypted channel to the destination agent.
    Connecting,
    /// The destination checks the VM and prepares its data path (trial login).
    Preparing,
    /// Prepared; waiting for the VMM to stop the VM's rings here (`with_vmm`).
    AwaitingVmm,
    /// Commands are held, the source drains and hands the session over.
    Switching,
    /// The session is on the destination; commands still arriving here are forwarded.
    Forwarding,
    /// Done: the VM is the destination's.
    Completed,
    /// Given up before the switchover: the VM runs on the source.
    Abandoned,
}

impl MigrationPhase {
    /// Whether the migration is over.
    pub fn finished(self) -> bool {
        matches!(self, MigrationPhase::Completed | MigrationPhase::Abandoned)
    }
}

/// `GET /v1/migrations/{name}`: the last migration of a VM from this host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationView {
    pub vm: String,
    /// The destination as asked for, and the host name it gave.
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_host: Option<String>,
    pub phase: MigrationPhase,
    /// What happens now, or why the migration was abandoned.
    pub detail: String,
    pub started_ms: u64,
    /// The path the VM had here, and the one prepared on the destination.
    #[serde(default)]
    pub from_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_path: Option<String>,
    /// The VM's vhost-user socket on the destination (where its VMM attaches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_socket: Option<std::path::PathBuf>,
    /// Commands held here during the switchover (last one drained to destination path
    /// up), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_ms: Option<f64>,
    /// Commands forwarded to the destination after the switchover.
    #[serde(default)]
    pub forwarded: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/vms/{name}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmView {
    pub name: String,
    pub state: VmState,
    pub policy: PathPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// The data path in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathInfo>,
    /// Why this path was chosen (or why there is none).
    pub path_reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// The initiator client with secrets redacted.
    pub client: InitiatorClient,
    #[serde(default)]
    pub path_stats: PathStats,
    /// Commands re-issued on a new path after their path failed.
    #[serde(default)]
    pub reissued: u64,
    pub metrics: MetricsSnapshot,
    pub history: Vec<VmEvent>,
    /// The virtual bus and how QEMU attaches to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<FrontendView>,
}

/// A VM's virtual bus in [`VmView`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FrontendView {
    pub kind: FrontendKind,
    pub socket: std::path::PathBuf,
    pub queues: u16,
    /// Whether the agent serves the socket now (and why not, if not).
    pub serving: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// QEMU options that attach the VM (add the VM's `-m` size to the memory backend).
    pub qemu_options: Vec<String>,
}

/// `GET /v1/adapters`: one adapter the agent can use.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdapterView {
    #[serde(flatten)]
    pub info: AdapterInfo,
    /// Where it came from: `builtin` or the configured socket.
    pub source: String,
    /// The VMs whose data path runs on it.
    pub vms: Vec<String>,
}

/// `GET /v1/adapters`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdaptersView {
    pub host: String,
    pub adapters: Vec<AdapterView>,
    /// Configured adapters that could not be used, with the reason.
    pub unavailable: Vec<(String, String)>,
    /// What sysfs shows: iSCSI hosts and transports of offload HBAs, SR-IOV, NICs.
    pub sysfs: crate::inventory::SysfsInventory,
}

/// `GET /v1/host`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostView {
    pub name: String,
    pub version: String,
    pub vms: usize,
    pub adapters: usize,
    pub uptime_s: u64,
}

/// `POST /v1/vms/{name}/scsi`: one SCSI command through the VM's data path (like sg_raw).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScsiPassthrough {
    /// LUN number.
    pub lun: u64,
    /// The CDB in hex.
    pub cdb: String,
    /// Data-Out, base64.
    #[serde(default)]
    pub data: String,
    /// Data-In bytes expected.
    #[serde(default)]
    pub read_len: u32,
}

/// The answer to a [`ScsiPassthrough`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScsiResult {
    pub status: u8,
    /// Sense data in hex (empty if none).
    pub sense: String,
    /// Data-In, base64.
    pub data: String,
    /// Residual count (positive: underflow, negative: overflow).
    pub residual: i64,
    /// The data path that carried the command.
    pub path: String,
}

/// An error answer: `{"error": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
