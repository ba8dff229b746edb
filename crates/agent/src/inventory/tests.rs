//! Scans of fixture trees built with real symlinks, laid out as the kernel lays out sysfs.

use std::os::unix::fs::symlink;
use std::path::Path;

use peer_harness::TempDir;

use super::*;

fn write(root: &Path, path: &str, contents: &[u8]) {
    let path = root.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

fn mkdir(root: &Path, path: &str) {
    std::fs::create_dir_all(root.join(path)).unwrap();
}

fn link(root: &Path, path: &str, target: &str) {
    let path = root.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    symlink(target, path).unwrap();
}

const QLA_PCI: &str = "devices/pci0000:00/0000:00:1c.0/0000:0b:00.1";
const IXGBE_PCI: &str = "devices/pci0000:00/0000:00:01.0/0000:01:00.0";
const VIRTIO_PCI: &str = "devices/pci0000:00/0000:00:03.0";

/// An HBA port (qla4xxx, SR-IOV), a software-initiator host, two transports, an SR-IOV NIC, a
/// virtio NIC, lo and a veth with garbage attributes, a NIC whose SR-IOV counts are garbage,
/// and the odd files real sysfs has.
fn fixture() -> TempDir {
    let dir = TempDir::new("inventory");
    let r = dir.path();

    // qla4xxx port: the PCI function holds the SCSI host, which holds scsi_host and iscsi_host.
    write(r, &format!("{QLA_PCI}/sriov_totalvfs"), b"8\n");
    write(r, &format!("{QLA_PCI}/sriov_numvfs"), b"2\n");
    mkdir(r, "bus/pci/drivers/qla4xxx");
    link(
        r,
        &format!("{QLA_PCI}/driver"),
        "../../../../bus/pci/drivers/qla4xxx",
    );
    write(
        r,
        &format!("{QLA_PCI}/host3/scsi_host/host3/proc_name"),
        b"qla4xxx\n",
    );
    let qla_host = format!("{QLA_PCI}/host3/iscsi_host/host3");
    write(r, &format!("{qla_host}/hwaddress"), b"00:0e:1e:04:8b:2e\n");
    write(r, &format!("{qla_host}/ipaddress"), b"192.0.2.10\n");
    write(
        r,
        &format!("{qla_host}/initiatorname"),
        b"iqn.2000-04.com.qlogic:isp4032.hba0\n",
    );
    write(r, &format!("{qla_host}/netdev"), b"(null)\n");
    write(r, &format!("{qla_host}/port_state"), b"LINK_UP\n");
    write(r, &format!("{qla_host}/port_speed"), b"10 Gbps\n");
    link(
        r,
        "class/scsi_host/host3",
        &format!("../../{QLA_PCI}/host3/scsi_host/host3"),
    );
    link(r, "class/iscsi_host/host3", &format!("../../{qla_host}"));

    // iscsi_tcp session host: a platform device, no PCI, most attributes empty.
    write(
        r,
        "devices/platform/host10/scsi_host/host10/proc_name",
        b"iscsi_tcp\n",
    );
    write(
        r,
        "devices/platform/host10/iscsi_host/host10/ipaddress",
        b"\n",
    );
    write(
        r,
        "devices/platform/host10/iscsi_host/host10/initiatorname",
        b"iqn.2004-10.com.example:host\n",
    );
    link(
        r,
        "class/scsi_host/host10",
        "../../devices/platform/host10/scsi_host/host10",
    );
    link(
        r,
        "class/iscsi_host/host10",
        "../../devices/platform/host10/iscsi_host/host10",
    );

    for (name, handle, caps) in [
        ("tcp", "18446744072107094112", "0x39"),
        ("qla4xxx", "1", "0x3e"),
    ] {
        write(
            r,
            &format!("devices/virtual/iscsi_transport/{name}/handle"),
            handle.as_bytes(),
        );
        write(
            r,
            &format!("devices/virtual/iscsi_transport/{name}/caps"),
            caps.as_bytes(),
        );
        link(
            r,
            &format!("class/iscsi_transport/{name}"),
            &format!("../../devices/virtual/iscsi_transport/{name}"),
        );
    }

    // SR-IOV NIC: the netdev's `device` points at the PCI function.
    write(r, &format!("{IXGBE_PCI}/sriov_totalvfs"), b"63\n");
    write(r, &format!("{IXGBE_PCI}/sriov_numvfs"), b"4\n");
    mkdir(r, "bus/pci/drivers/ixgbe");
    link(
        r,
        &format!("{IXGBE_PCI}/driver"),
        "../../../../bus/pci/drivers/ixgbe",
    );
    let ixgbe = format!("{IXGBE_PCI}/net/enp1s0f0");
    write(r, &format!("{ixgbe}/address"), b"a0:36:9f:00:00:01\n");
    write(r, &format!("{ixgbe}/operstate"), b"up\n");
    write(r, &format!("{ixgbe}/speed"), b"10000\n");
    write(r, &format!("{ixgbe}/mtu"), b"9000\n");
    link(r, &format!("{ixgbe}/device"), "../../../0000:01:00.0");
    link(r, "class/net/enp1s0f0", &format!("../../{ixgbe}"));

    // virtio NIC: `device` points at the virtio device, whose parent is the PCI function.
    mkdir(r, "bus/virtio/drivers/virtio_net");
    link(
        r,
        &format!("{VIRTIO_PCI}/virtio2/driver"),
        "../../../../bus/virtio/drivers/virtio_net",
    );
    let virtio = format!("{VIRTIO_PCI}/virtio2/net/eth0");
    write(r, &format!("{virtio}/address"), b"52:54:00:12:34:56\n");
    write(r, &format!("{virtio}/operstate"), b"down\n");
    write(r, &format!("{virtio}/speed"), b"-1\n");
    write(r, &format!("{virtio}/mtu"), b"1500\n");
    link(r, &format!("{virtio}/device"), "../../../virtio2");
    link(r, "class/net/eth0", &format!("../../{virtio}"));

    // A NIC whose SR-IOV counts are garbage.
    let odd_pci = "devices/pci0000:00/0000:00:02.0/0000:02:00.0";
    write(r, &format!("{odd_pci}/sriov_totalvfs"), b"lots\n");
    write(r, &format!("{odd_pci}/sriov_numvfs"), b"0\n");
    write(r, &format!("{odd_pci}/net/eth10/speed"), b"4294967295\n");
    write(r, &format!("{odd_pci}/net/eth10/mtu"), &[b'9'; 5000]);
    link(
        r,
        &format!("{odd_pci}/net/eth10/device"),
        "../../../0000:02:00.0",
    );
    link(r, "class/net/eth10", &format!("../../{odd_pci}/net/eth10"));

    // Virtual interfaces; lo has no speed (the kernel fails the read), veth has garbage.
    write(r, "devices/virtual/net/lo/address", b"00:00:00:00:00:00\n");
    write(r, "devices/virtual/net/lo/operstate", b"unknown\n");
    write(r, "devices/virtual/net/lo/mtu", b"65536\n");
    link(r, "class/net/lo", "../../devices/virtual/net/lo");
    write(
        r,
        "devices/virtual/net/veth0/address",
        &[0xff, 0xfe, b':', 0x80],
    );
    write(r, "devices/virtual/net/veth0/operstate", b"  \n");
    write(r, "devices/virtual/net/veth0/speed", b"10000\n");
    write(r, "devices/virtual/net/veth0/mtu", b"abc\n");
    link(r, "class/net/veth0", "../../devices/virtual/net/veth0");

    // Not interfaces: the bonding driver's control file and a dangling link.
    write(r, "class/net/bonding_masters", b"bond0\n");
    link(r, "class/net/gone0", "../../devices/virtual/net/gone0");
    dir
}

#[test]
fn hba_host_with_qla4xxx_transport_and_sriov() {
    let dir = fixture();
    let inv = scan_sysfs(dir.path());
    let names: Vec<_> = inv.iscsi_hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["host3", "host10"]);
    assert_eq!(
        inv.iscsi_hosts[0],
        IscsiHost {
            name: "host3".into(),
            transport: Some("qla4xxx".into()),
            initiator_name: Some("iqn.2000-04.com.qlogic:isp4032.hba0".into()),
            ip_address: Some("192.0.2.10".into()),
            hw_address: Some("00:0e:1e:04:8b:2e".into()),
            netdev: None,
            port_state: Some("LINK_UP".into()),
            port_speed: Some("10 Gbps".into()),
            pci_device: Some("0000:0b:00.1".into()),
            sriov: Some(Sriov {
                total_vfs: 8,
                num_vfs: 2
            }),
        }
    );
}

#[test]
fn software_host_has_no_pci_device() {
    let dir = fixture();
    let host = &scan_sysfs(dir.path()).iscsi_hosts[1];
    assert_eq!(host.transport.as_deref(), Some("tcp"));
    assert_eq!(
        host.initiator_name.as_deref(),
        Some("iqn.2004-10.com.example:host")
    );
    assert_eq!(host.ip_address, None);
    assert_eq!(host.port_state, None);
    assert_eq!(host.pci_device, None);
    assert_eq!(host.sriov, None);
}

#[test]
fn transports_marked_offload_except_tcp() {
    let dir = fixture();
    let inv = scan_sysfs(dir.path());
    assert_eq!(
        inv.transports,
        [
            IscsiTransport {
                name: "qla4xxx".into(),
                handle: Some("1".into()),
                caps: Some("0x3e".into()),
                offload: true,
            },
            IscsiTransport {
                name: "tcp".into(),
                handle: Some("18446744072107094112".into()),
                caps: Some("0x39".into()),
                offload: false,
            },
        ]
    );
}

#[test]
fn nics_physical_virtual_and_garbage() {
    let dir = fixture();
    let inv = scan_sysfs(dir.path());
    let names: Vec<_> = inv.nics.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["enp1s0f0", "eth0", "eth10", "lo", "veth0"]);
    let nic = |name: &str| inv.nics.iter().find(|n| n.name == name).unwrap();

    assert_eq!(
        *nic("enp1s0f0"),
        Nic {
            name: "enp1s0f0".into(),
            mac: Some("a0:36:9f:00:00:01".into()),
            operstate: Some("up".into()),
            speed_mbps: Some(10000),
            mtu: Some(9000),
            driver: Some("ixgbe".into()),
            pci_device: Some("0000:01:00.0".into()),
            sriov: Some(Sriov {
                total_vfs: 63,
                num_vfs: 4
            }),
            virtual_device: false,
        }
    );

    let eth0 = nic("eth0");
    assert_eq!(eth0.driver.as_deref(), Some("virtio_net"));
    assert_eq!(eth0.pci_device.as_deref(), Some("0000:00:03.0"));
    assert_eq!(
        (eth0.speed_mbps, eth0.mtu, eth0.sriov),
        (None, Some(1500), None)
    );
    assert!(!eth0.virtual_device);

    let eth10 = nic("eth10");
    assert_eq!(eth10.pci_device.as_deref(), Some("0000:02:00.0"));
    assert_eq!(
        (
            eth10.speed_mbps,
            eth10.mtu,
            eth10.sriov,
            eth10.driver.as_deref()
        ),
        (None, None, None, None)
    );

    let lo = nic("lo");
    assert!(lo.virtual_device);
    assert_eq!((lo.speed_mbps, lo.mtu), (None, Some(65536)));
    assert_eq!(
        (lo.pci_device.as_deref(), lo.driver.as_deref()),
        (None, None)
    );

    assert_eq!(
        *nic("veth0"),
        Nic {
            name: "veth0".into(),
            mac: None,
            operstate: None,
            speed_mbps: Some(10000),
            mtu: None,
            driver: None,
            pci_device: None,
            sriov: None,
            virtual_device: true,
        }
    );
}

#[test]
fn missing_or_empty_root_gives_empty_inventory() {
    let dir = TempDir::new("inventory-empty");
    assert_eq!(scan_sysfs(dir.path()), SysfsInventory::default());
    assert_eq!(scan_sysfs(&dir.join("absent")), SysfsInventory::default());
    // A class that is a file rather than a directory.
    write(dir.path(), "class/net", b"x");
    assert_eq!(scan_sysfs(dir.path()), SysfsInventory::default());
}

#[test]
fn root_reached_through_a_symlink() {
    let dir = fixture();
    let outer = TempDir::new("inventory-link");
    symlink(dir.path(), outer.join("sys")).unwrap();
    assert_eq!(scan_sysfs(&outer.join("sys")), scan_sysfs(dir.path()));
    assert!(scan_sysfs(&outer.join("sys"))
        .nics
        .iter()
        .any(|n| n.name == "lo" && n.virtual_device));
}

#[test]
fn inventory_roundtrips_through_json() {
    let dir = fixture();
    let inv = scan_sysfs(dir.path());
    let json = serde_json::to_string(&inv).unwrap();
    assert_eq!(serde_json::from_str::<SysfsInventory>(&json).unwrap(), inv);
}

#[test]
fn this_machine_has_a_virtual_lo() {
    let inv = scan_sysfs(Path::new("/sys"));
    let lo = inv
        .nics
        .iter()
        .find(|n| n.name == "lo")
        .expect("lo in /sys/class/net");
    assert!(lo.virtual_device, "{lo:?}");
    assert_eq!(lo.pci_device, None);
    assert_eq!(lo.speed_mbps, None);
    assert!(lo.mtu.is_some());
}

mod config {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(HostConfig::from_toml("").unwrap(), HostConfig::default());
    }

    #[test]
    fn full_file() {
        let config = HostConfig::from_toml(
            r#"
            name = "rack1-h07"
            state_dir = "/var/lib/viscsi"
            control_socket = "/run/viscsi/agent.sock"
            metrics_listen = "[::1]:9410"
            sysfs_root = "/sys"

            [[adapters]]
            name = "hba0"
            socket = "/run/viscsi/hba0.sock"

            [[adapters]]
            name = "qla-port_1"
            socket = "/run/viscsi/hba1.sock"
            "#,
        )
        .unwrap();
        assert_eq!(config.host_name(), "rack1-h07");
        assert_eq!(config.metrics_listen.as_deref(), Some("[::1]:9410"));
        assert_eq!(
            config.adapters,
            [
                AdapterConfig {
                    name: "hba0".into(),
                    socket: "/run/viscsi/hba0.sock".into()
                },
                AdapterConfig {
                    name: "qla-port_1".into(),
                    socket: "/run/viscsi/hba1.sock".into()
                },
            ]
        );
    }

    fn error(text: &str) -> String {
        let e = HostConfig::from_toml(text).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn errors_are_one_line_and_name_the_field() {
        let e = error("nmae = \"x\"\n");
        assert!(e.contains("nmae") && e.contains("line 1"), "{e}");
        let e = error("[[adapters]]\nname = \"a\"\nsocket = \"/s\"\nport = 3\n");
        assert!(e.contains("port"), "{e}");
        let e = error("[[adapters]]\nname = \"a\"\n");
        assert!(e.contains("socket"), "{e}");
        let e = error("metrics_listen = 9410\n");
        assert!(e.contains("metrics_listen") || e.contains("line 1"), "{e}");
        let e = error("metrics_listen = \"localhost\"\n");
        assert!(e.starts_with("metrics_listen:"), "{e}");
        let e = error("name = \"\"\n");
        assert!(e.starts_with("name:"), "{e}");
        let e = error("state_dir = \"\"\n");
        assert!(e.starts_with("state_dir:"), "{e}");
    }

    #[test]
    fn adapter_names_checked() {
        let one = |name: &str| format!("[[adapters]]\nname = {name:?}\nsocket = \"/s\"\n");
        for (name, problem) in [
            ("", "empty"),
            ("Hba0", "a-z"),
            ("hba 0", "a-z"),
            ("hbä", "a-z"),
            ("software", "reserved"),
        ] {
            let e = error(&one(name));
            assert!(
                e.starts_with("adapters[0].name:") && e.contains(problem),
                "{name}: {e}"
            );
        }
        let e = error(&format!("{}{}", one("a"), one("a")));
        assert!(
            e.starts_with("adapters[1].name:") && e.contains("earlier"),
            "{e}"
        );
        let e = error("[[adapters]]\nname = \"a\"\nsocket = \"\"\n");
        assert!(e.starts_with("adapters[0].socket:"), "{e}");
    }

    #[test]
    fn from_file_prefixes_the_path() {
        let dir = TempDir::new("host-config");
        let path = dir.join("agent.toml");
        let e = HostConfig::from_file(&path).unwrap_err();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        std::fs::write(&path, b"adapters = 1\n").unwrap();
        let e = HostConfig::from_file(&path).unwrap_err();
        assert!(
            e.starts_with(&path.display().to_string()) && !e.contains('\n'),
            "{e}"
        );
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(HostConfig::from_file(&path).unwrap_err().contains("UTF-8"));
        std::fs::write(&path, b"sysfs_root = \"/sys\"\n").unwrap();
        let config = HostConfig::from_file(&path).unwrap();
        assert_eq!(config.sysfs_root.as_deref(), Some(Path::new("/sys")));
        assert!(!config.host_name().is_empty());
    }
}
