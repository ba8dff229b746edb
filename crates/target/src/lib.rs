//! The viscsi iSCSI target: portals, sessions, LUN maps, CHAP and initiator ACLs.
//!
//! This crate is the tokio driver around the sans-IO target role of `iscsi-proto`: it accepts
//! TCP connections, frames PDUs (`iscsi-net`), places sessions (TSIH allocation, session
//! reinstatement) and executes SCSI commands on the logical units of the `scsi` crate. It has
//! no protocol logic of its own and no SCSI semantics.

pub mod config;
mod connection;
mod server;
mod sessions;

pub use config::{BackendSpec, ChapConfig, LunConfig, TargetConfig, TargetDef};
pub use server::{RunningTarget, Target, TargetError};
