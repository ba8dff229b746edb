//! viscsi's software initiator: iSCSI sessions over tokio TCP, built on the sans-IO initiator
//! role of `iscsi-proto`.
//!
//! [`Session::connect`] logs in with the caller's stable identity (InitiatorName + ISID) and
//! returns a handle that any number of tasks can share; [`Session::execute`] sends one SCSI
//! command and waits for its completion, with as many in flight as the target's command
//! window allows. When the connection drops or stops answering, the session logs in again
//! with the same identity (the target reinstates it) and re-issues the commands that had not
//! completed: callers see an error only when the [`RecoveryPolicy`] gives up.
//! [`discover`] runs a SendTargets discovery session. [`url`] parses libiscsi-style
//! `iscsi://` URLs.
//!
//! Not here: the wire format (`iscsi-wire`), protocol decisions (`iscsi-proto`), SCSI
//! emulation (`scsi`), command-line parsing (`viscsi`).
#![forbid(unsafe_code)]

mod commands;
mod connection;
mod discovery;
mod error;
mod options;
mod session;
pub mod url;

pub use commands::{Capacity, InquiryData};
pub use discovery::{discover, parse_send_targets, DiscoveredTarget};
pub use error::Error;
pub use iscsi_proto::chap::{ChapAlgorithm, Credentials};
pub use iscsi_proto::initiator::{
    ChapConfig, DataIn, Residual, ScsiCompletion, ScsiRequest, TargetNotice, TaskAttr,
};
pub use iscsi_proto::keys::Digest;
pub use iscsi_wire::Isid;
pub use options::{
    default_negotiation, DiscoveryOptions, Identity, RecoveryPolicy, SessionOptions,
};
pub use session::{Session, SessionStats};
