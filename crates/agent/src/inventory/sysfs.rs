//! Reading the inventory out of a sysfs tree.

use std::cmp::Ordering;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{IscsiHost, IscsiTransport, Nic, Sriov, SysfsInventory};

/// Attributes are at most a page in real sysfs; anything longer is not an attribute we know.
const MAX_ATTR_BYTES: u64 = 4096;

/// Scans the sysfs tree mounted at `root` (normally `/sys`).
///
/// Never fails: a missing class directory gives an empty list, an unreadable, empty,
/// non-UTF-8 or unparsable attribute gives `None`.
pub fn scan_sysfs(root: &Path) -> SysfsInventory {
    // Canonical so that "is this under devices/virtual" works when root itself is a symlink.
    let root = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    SysfsInventory {
        iscsi_hosts: class_entries(&root, "iscsi_host")
            .into_iter()
            .map(|(name, dir)| iscsi_host(&root, name, &dir))
            .collect(),
        transports: class_entries(&root, "iscsi_transport")
            .into_iter()
            .map(|(name, dir)| IscsiTransport {
                offload: !matches!(name.as_str(), "tcp" | "iser"),
                handle: read_attr(&dir.join("handle")),
                caps: read_attr(&dir.join("caps")),
                name,
            })
            .collect(),
        nics: class_entries(&root, "net")
            .into_iter()
            .map(|(name, dir)| nic(&root, name, &dir))
            .collect(),
    }
}

fn iscsi_host(root: &Path, name: String, dir: &Path) -> IscsiHost {
    // The SCSI host's driver names the transport: iscsi_tcp → tcp, iscsi_iser → iser, and
    // offload drivers register a transport of their own name (qla4xxx, bnx2i, …).
    let transport =
        read_attr(&root.join("class/scsi_host").join(&name).join("proc_name")).map(|driver| {
            match driver.strip_prefix("iscsi_") {
                Some(short) if !short.is_empty() => short.to_string(),
                _ => driver,
            }
        });
    let pci = fs::canonicalize(dir)
        .ok()
        .and_then(|dir| pci_ancestor(root, &dir));
    IscsiHost {
        transport,
        initiator_name: read_attr(&dir.join("initiatorname")),
        ip_address: read_attr(&dir.join("ipaddress")),
        hw_address: read_attr(&dir.join("hwaddress")),
        netdev: read_attr(&dir.join("netdev")),
        port_state: read_attr(&dir.join("port_state")),
        port_speed: read_attr(&dir.join("port_speed")),
        sriov: pci.as_deref().and_then(sriov),
        pci_device: pci.as_deref().and_then(file_name),
        name,
    }
}

fn nic(root: &Path, name: String, dir: &Path) -> Nic {
    let virtual_device = fs::canonicalize(dir)
        .map(|dir| dir.starts_with(root.join("devices/virtual")))
        .unwrap_or(false);
    let device = dir.join("device");
    let pci = fs::canonicalize(&device)
        .ok()
        .and_then(|device| pci_ancestor(root, &device));
    Nic {
        mac: read_attr(&dir.join("address")),
        operstate: read_attr(&dir.join("operstate")),
        // The kernel prints -1 (or, in old kernels, its u32 form) for an unknown speed, and
        // fails the read when the link is down.
        speed_mbps: read_u32(&dir.join("speed")).filter(|&s| s > 0 && s != u32::MAX),
        mtu: read_u32(&dir.join("mtu")),
        driver: link_name(&device.join("driver")),
        sriov: pci.as_deref().and_then(sriov),
        pci_device: pci.as_deref().and_then(file_name),
        virtual_device,
        name,
    }
}

/// The entries of `<root>/class/<class>` that are directories (after following symlinks, as
/// every real entry is one), with UTF-8 names, sorted. Files such as `net/bonding_masters`
/// are skipped.
fn class_entries(root: &Path, class: &str) -> Vec<(String, PathBuf)> {
    let Ok(dir) = fs::read_dir(root.join("class").join(class)) else {
        return Vec::new();
    };
    let mut entries: Vec<(String, PathBuf)> = dir
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let path = entry.path();
            fs::metadata(&path).ok()?.is_dir().then_some((name, path))
        })
        .collect();
    entries.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    entries
}

/// Orders `host3` before `host10`: names that differ only in a trailing number compare by it.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn split(s: &str) -> (&str, Option<u128>) {
        let prefix = s.trim_end_matches(|c: char| c.is_ascii_digit());
        (prefix, s[prefix.len()..].parse().ok())
    }
    split(a).cmp(&split(b)).then_with(|| a.cmp(b))
}

/// The nearest directory at or above `path` (inside `root`) named like a PCI function.
fn pci_ancestor(root: &Path, path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .take_while(|dir| dir.starts_with(root) && *dir != root)
        .find(|dir| {
            dir.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_pci_address)
        })
        .map(Path::to_path_buf)
}

/// `DDDD:BB:SS.F` in hex (the domain may be longer than four digits).
fn is_pci_address(name: &str) -> bool {
    fn hex(s: &str, len: std::ops::RangeInclusive<usize>) -> bool {
        len.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
    }
    let mut parts = name.split(':');
    let (Some(domain), Some(bus), Some(slot_fn), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some((slot, func)) = slot_fn.split_once('.') else {
        return false;
    };
    hex(domain, 4..=8) && hex(bus, 2..=2) && hex(slot, 2..=2) && hex(func, 1..=1)
}

/// SR-IOV counts of a PCI function; `None` unless both attributes parse.
fn sriov(pci_dir: &Path) -> Option<Sriov> {
    Some(Sriov {
        total_vfs: read_u32(&pci_dir.join("sriov_totalvfs"))?,
        num_vfs: read_u32(&pci_dir.join("sriov_numvfs"))?,
    })
}

fn file_name(path: &Path) -> Option<String> {
    path.file_name()?.to_str().map(str::to_string)
}

/// The last component of a symlink's target (`driver` → `…/drivers/ixgbe` gives `ixgbe`).
fn link_name(link: &Path) -> Option<String> {
    file_name(&fs::read_link(link).ok()?)
}

/// An attribute's text without surrounding whitespace; `None` when missing, unreadable,
/// too long, not UTF-8, empty, or the kernel's `(null)` for an unset string.
fn read_attr(path: &Path) -> Option<String> {
    let mut bytes = Vec::new();
    fs::File::open(path)
        .ok()?
        .take(MAX_ATTR_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() as u64 > MAX_ATTR_BYTES {
        return None;
    }
    let text = String::from_utf8(bytes).ok()?;
    let text = text.trim();
    (!text.is_empty() && text != "(null)").then(|| text.to_string())
}

fn read_u32(path: &Path) -> Option<u32> {
    read_attr(path)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses() {
        assert!(is_pci_address("0000:0b:00.1"));
        assert!(is_pci_address("10000:e1:1f.7"));
        for bad in [
            "pci0000:00",
            "0000:0b:00",
            "0000:0b:00.10",
            "virtio2",
            "0000:0g:00.1",
            "",
        ] {
            assert!(!is_pci_address(bad), "{bad}");
        }
    }

    #[test]
    fn natural_order() {
        let mut names = vec![
            "host10", "host3", "eth1", "host", "eth0", "lo", "eth10", "eth2",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            ["eth0", "eth1", "eth2", "eth10", "host", "host3", "host10", "lo"]
        );
    }
}
