//! The implementation-independent interface between a VM's storage and the host's iSCSI
//! implementation.
//!
//! - [`InitiatorClient`]: the VM's iSCSI identity and configuration, a versioned record that
//!   belongs to the VM and is validated whenever it is read.
//! - [`DataPath`]: one VM's session on one implementation — submit SCSI commands, task
//!   management, quiesce/drain, export of session state, health. Nothing above this trait can
//!   tell an offload VF from the software initiator.
//! - [`Adapter`]: something that opens data paths: an offload HBA (with a limited number of
//!   virtual functions) or the software emulator ([`software::SoftwareAdapter`], on every host).
//!
//! Not here: choosing an adapter for a VM, failover and persistence (the host agent), the
//! offload adapter's driver (`viscsi-hba`), the VM's virtual bus.
#![forbid(unsafe_code)]

mod client;
mod gate;
mod path;
pub mod software;

pub use client::{
    valid_iscsi_name, ChapSettings, ClientError, InitiatorClient, RecoverySettings, Secret,
    SessionSettings, CLIENT_VERSION,
};
pub use gate::{Gate, Ticket};
pub use initiator::{DataIn, Residual, ScsiRequest as Command, TaskAttr};
pub use iscsi_wire::{Isid, Status, TmfFunction};
pub use path::{probe_isid, Adapter};
pub use path::{
    AdapterHealth, AdapterInfo, AdapterKind, BoxFuture, Completion, DataPath, Health, PathError,
    PathInfo, PathStats, SessionState,
};
