//! SCSI block-device emulation (SBC-3 / SPC-4) for viscsi's target.
//!
//! A [`LogicalUnit`] is a disk: it takes a CDB and its Data-Out bytes and returns status, sense
//! data and Data-In ([`ScsiResponse`]). Behind it sits a [`BlockBackend`] — a sparse RAM disk, a
//! file or block device, or a read-only view of either — with the optional [`Discard`]
//! capability that makes thin provisioning possible. A [`LunMap`] groups units into one target
//! device and answers REPORT LUNS and commands to absent LUNs.
//!
//! What it does: standard and VPD INQUIRY, READ CAPACITY, READ/WRITE/VERIFY/WRITE AND VERIFY in
//! all CDB sizes, WRITE SAME, UNMAP and GET LBA STATUS, COMPARE AND WRITE, ORWRITE, WRITE
//! ATOMIC, caching and control mode pages, REPORT SUPPORTED OPERATION CODES, persistent
//! reservations and RESERVE/RELEASE, unit attentions per I_T nexus, fixed and descriptor sense.
//!
//! What it does not do: it knows nothing of iSCSI, virtio or any other transport (the caller
//! passes an [`ItNexus`] identity, handles task management by calling
//! [`LogicalUnit::logical_unit_reset`] and friends, and computes residuals); it has no task
//! set, queueing or ACA (commands run to completion on the caller's thread); no protection
//! information, no EXTENDED COPY, no SANITIZE, no persistence of reservations or mode pages
//! across restarts.

#![forbid(unsafe_code)]

pub mod backend;
pub mod cdb;
mod codes;
mod lu;
pub mod lun;
mod lunmap;
pub mod sense;

pub use backend::{BlockBackend, Discard, MapExtent};
pub use codes::{AscAscq, ScsiStatus, SenseKey};
pub use lu::{ItNexus, LogicalUnit, LuConfig, ScsiResponse};
pub use lunmap::LunMap;
pub use sense::Sense;
