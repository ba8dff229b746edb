//! viscsi's reference offload adapter and its host driver.
//!
//! The machines viscsi is developed on have no iSCSI offload HBA (no qla4xxx, be2iscsi,
//! qedi, bnx2i or cxgb4i, no DPU), so this crate ships one as **a software model**: a separate
//! process that behaves like an offload adapter seen from the host. It is not hardware and
//! offloads nothing — its iSCSI runs on the same CPUs and TCP/IP stack as everything else —
//! but the host talks to it the way a driver talks to an adapter, so the offload data path,
//! its failures and their detection are real code paths that can be tested.
//!
//! - [`device`]: the adapter process (`viscsi hba serve`). It owns its TCP connections and
//!   runs iSCSI itself (viscsi's own `initiator::Session`, one per virtual function), has a
//!   fixed number of virtual functions, takes each VF's identity (the VM's
//!   `datapath::InitiatorClient`) from the driver, logs the VF in, and moves SCSI commands
//!   and completions per VF over the VF's queue. It can be told to crash, hang or lose its
//!   link, so that error detection can be tested.
//! - [`protocol`]: the adapter protocol between the two sides, length-prefixed frames on a
//!   unix socket: JSON control messages (hello with the protocol version, VF allocation and
//!   programming, status, portal probes, heartbeats, faults, events) and binary queue
//!   messages (submit, complete, fail, task management).
//! - [`shm`]: the queue's shared memory, the model of DMA: the driver hands the adapter a
//!   buffer per read, the adapter puts the data there, the host reads it without a copy.
//! - [`driver`]: the host side. [`driver::HbaAdapter`] implements `datapath::Adapter` (a VF
//!   per VM; health by heartbeats, connection loss and link events) and its
//!   [`driver::OffloadPath`] implements `datapath::DataPath`, so nothing above the data-path
//!   trait can tell it from the software initiator.
//!
//! What the model does not do: no real offload (no TOE; the adapter's TCP, iSCSI and copies
//! run on the host's CPUs; data-out crosses the unix socket, data-in is copied once into the
//! shared memory), no SR-IOV or PCI (a "VF" is an index and a queue
//! connection), one connection per session (MaxConnections=1, ErrorRecoveryLevel=0, as the
//! software initiator), no boot from SAN, no iSNS, no IPv6 or VLAN configuration of its
//! own port, and no persistence: the adapter forgets its VFs when it restarts, and VFs are
//! freed when the driver's control connection closes. CHAP secrets reach it as values in the
//! programming request (resolved by the driver on the host; the socket is mode 0600); it
//! reads no host files or environment.
// Unsafe code only in `shm` (mapping the shared memory).
#![deny(unsafe_code)]

pub mod device;
pub mod driver;
pub mod protocol;
pub mod shm;
