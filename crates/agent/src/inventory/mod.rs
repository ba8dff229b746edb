//! The host's adapters as sysfs shows them, and the agent's configuration of them.
//!
//! [`scan_sysfs`] reads iSCSI hosts (offload HBAs and software sessions' hosts), the loaded
//! iSCSI transports and the network interfaces, with their PCI device and SR-IOV counts, from
//! a sysfs tree whose root is a parameter so that tests can supply fixture trees. It never
//! fails: what is missing or unreadable is left out or reported as `None`.
//! [`HostConfig`] is the agent's TOML configuration file.
//!
//! Not here: deciding which adapter serves which VM, talking to adapters, watching for changes
//! (callers scan again), creating or removing virtual functions.

mod config;
mod sysfs;

pub use config::{AdapterConfig, HostConfig};
pub use sysfs::scan_sysfs;

use serde::{Deserialize, Serialize};

/// Everything [`scan_sysfs`] found, each list sorted by name (numbers in names compared as
/// numbers, so `host3` comes before `host10`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysfsInventory {
    pub iscsi_hosts: Vec<IscsiHost>,
    pub transports: Vec<IscsiTransport>,
    pub nics: Vec<Nic>,
}

/// One entry of `/sys/class/iscsi_host`: an offload HBA port, or the host the kernel's
/// software initiator made for a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IscsiHost {
    /// The SCSI host name, e.g. `host3`.
    pub name: String,
    /// The iSCSI transport name (`tcp`, `iser`, `qla4xxx`, …), from the SCSI host's driver.
    pub transport: Option<String>,
    pub initiator_name: Option<String>,
    pub ip_address: Option<String>,
    pub hw_address: Option<String>,
    pub netdev: Option<String>,
    pub port_state: Option<String>,
    pub port_speed: Option<String>,
    /// PCI address (`0000:0b:00.1`) of the device the host hangs off, if it is a PCI device.
    pub pci_device: Option<String>,
    pub sriov: Option<Sriov>,
}

/// One entry of `/sys/class/iscsi_transport`: a loaded iSCSI transport module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IscsiTransport {
    /// `tcp`, `iser`, `qla4xxx`, `be2iscsi`, `bnx2i`, `cxgb4i`, `qedi`, …
    pub name: String,
    pub handle: Option<String>,
    pub caps: Option<String>,
    /// True for hardware transports: everything but `tcp` and `iser`, which run on the host.
    pub offload: bool,
}

/// One entry of `/sys/class/net`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub mac: Option<String>,
    pub operstate: Option<String>,
    /// Link speed; `None` when the link is down or the driver does not know it.
    pub speed_mbps: Option<u32>,
    pub mtu: Option<u32>,
    /// Kernel driver of the interface's device, e.g. `ixgbe` or `virtio_net`.
    pub driver: Option<String>,
    pub pci_device: Option<String>,
    pub sriov: Option<Sriov>,
    /// Software interfaces (loopback, veth, bridges…) live under `/sys/devices/virtual`.
    pub virtual_device: bool,
}

/// SR-IOV capacity of a PCI physical function.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sriov {
    pub total_vfs: u32,
    pub num_vfs: u32,
}

#[cfg(test)]
mod tests;
