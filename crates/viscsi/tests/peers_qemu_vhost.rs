//! Real Linux guests (QEMU TCG, Debian cloud kernel, busybox initramfs) on the virtual bus that
//! `viscsi host` serves: vhost-user-scsi and vhost-user-blk, with the VM's data path on the
//! reference offload adapter or the software initiator, against `viscsi target` and tgtd.
//!
//! - vhost-user-scsi: the guest sees the LUN's own INQUIRY vendor/product and VPD 0x83 page
//!   (the same bytes the target gives any initiator), writes fresh random data with O_DIRECT,
//!   reads it back; the host reads the same range with `qemu-img dd` (libiscsi) and gets the
//!   same MD5. The same on the offload path and on the software path.
//! - vhost-user-blk: the guest sees the LUN's size and its unit serial number.
//! - The agent is killed (SIGKILL) and restarted while the guest is idle between two rounds of
//!   I/O: QEMU reconnects to the socket the restarted agent serves, and the second round goes
//!   through with its data on the LUN.

use std::path::Path;
use std::time::Duration;

use peer_harness::agent::{HostAgent, ReferenceHba};
use peer_harness::guest::{spawn_guest, Attachment, GuestImage, GuestRun, RunningGuest};
use peer_harness::target::MIB;
use peer_harness::{qemu_img_md5, RunningTarget, TargetConfig, TargetKind, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_viscsi");
const LUN_BYTES: u64 = 64 * MIB;
const PATTERN_MIB: u64 = 8;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn viscsi() -> TargetKind {
    TargetKind::Viscsi { binary: BIN.into() }
}

struct Setup {
    host: HostAgent,
    _hba: ReferenceHba,
    target: RunningTarget,
    dir: TempDir,
}

fn setup(kind: &TargetKind) -> Setup {
    let dir = TempDir::new("qemu-vhost");
    let target = RunningTarget::start(
        kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:qemu-vhost").mem_lun(LUN_BYTES),
    );
    let hba = ReferenceHba::start(Path::new(BIN), &dir, "hba0", 4);
    let host = HostAgent::start(
        Path::new(BIN),
        &dir,
        "host-a",
        &[("hba0", hba.socket())],
        &[],
    );
    Setup {
        host,
        _hba: hba,
        target,
        dir,
    }
}

impl Setup {
    /// Creates VM `name` with a virtual bus and returns its socket.
    fn vm(&self, name: &str, path: &str, frontend: &str) -> std::path::PathBuf {
        let socket = self.dir.join(&format!("{name}.sock"));
        let lun = self.target.lun_id(0).to_string();
        let portal = self.target.portal();
        let out = self.host.cli(&[
            "vm",
            "create",
            name,
            "--portal",
            &portal,
            "--target",
            self.target.iqn(),
            "--lun",
            &lun,
            "--path",
            path,
            "--frontend",
            frontend,
            "--vhost-socket",
            &socket.display().to_string(),
            "--queues",
            "1",
        ]);
        assert!(out.success(), "vm create {name}: {out}");
        assert!(out.stdout.contains("reconnect-ms"), "{out}");
        socket
    }

    /// A command through the VM's data path (the control API's passthrough), retried over
    /// a UNIT ATTENTION; returns the Data-In.
    fn scsi(&self, vm: &str, cdb: &str, read_len: u32) -> Vec<u8> {
        let lun = self.target.lun_id(0).to_string();
        for _ in 0..5 {
            let out = self.host.cli(&[
                "vm",
                "scsi",
                vm,
                "--lun",
                &lun,
                "--cdb",
                cdb,
                "--read-len",
                &read_len.to_string(),
                "--json",
            ]);
            assert!(out.success(), "vm scsi: {out}");
            let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
            if v["status"] == 0 {
                let data = v["data"].as_str().expect("data");
                use base64::Engine;
                return base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .expect("base64");
            }
        }
        panic!("{cdb} did not succeed through {vm}")
    }

    /// MD5 of `mib` MiB at `offset_mib` of the LUN, read by libiscsi (qemu-img dd).
    fn host_md5(&self, offset_mib: u64, mib: u64) -> String {
        let range = self.dir.join(&format!("range-{offset_mib}"));
        qemu_img_md5(&self.target.url(0), offset_mib, mib, &range)
    }
}

fn finish(mut guest: RunningGuest) -> GuestRun {
    let run = guest.wait(BOOT_TIMEOUT);
    println!("serial console:\n{}", run.serial);
    let markers = run.markers();
    assert!(
        markers.iter().any(|m| m.kind == "DONE"),
        "guest did not finish; QEMU: {}",
        run.qemu
    );
    let errors: Vec<_> = markers.iter().filter(|m| m.kind == "ERROR").collect();
    assert!(errors.is_empty(), "guest reported errors: {errors:?}");
    run
}

fn pattern_args(offset_mib: u64, extra: &str) -> String {
    format!("viscsi.mode=pattern viscsi.mib={PATTERN_MIB} viscsi.offset_mib={offset_mib} {extra}")
}

/// The guest's write, read-back and the host's read of `disk` agree.
fn check_data(s: &Setup, run: &GuestRun, disk: &str, offset_mib: u64, round: Option<u32>) {
    let field = |kind: &str| match round {
        Some(r) => run.round_field(kind, disk, r, "md5"),
        None => run.disk_field(kind, disk, "md5"),
    };
    let written = field("WRITE").unwrap_or_else(|| panic!("no WRITE of {disk}"));
    let read = field("READ").unwrap_or_else(|| panic!("no READ of {disk}"));
    assert_eq!(read, written, "{disk}: guest read back other data");
    assert_eq!(
        s.host_md5(offset_mib, PATTERN_MIB),
        written,
        "{disk}: the LUN holds other data than the guest wrote"
    );
}

fn scsi_guests_on_both_paths(kind: TargetKind) {
    let image = GuestImage::get();
    let s = setup(&kind);
    let off = s.vm("vm-off", "offload", "scsi");
    let sw = s.vm("vm-sw", "software", "scsi");
    let show = s.host.cli(&["vm", "show", "vm-off"]);
    assert!(show.stdout.contains("offload hba0"), "{show}");

    // What the target says about its LUN, through a data path (iSCSI, not the bus).
    let inquiry = s.scsi("vm-sw", "120000006000", 96);
    let vpd83 = s.scsi("vm-sw", "120183 00ff00".replace(' ', "").as_str(), 255);
    let vpd83 = &vpd83[..4 + usize::from(u16::from_be_bytes([vpd83[2], vpd83[3]]))];
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().replace(' ', "_");
    let vendor = text(&inquiry[8..16]);
    let product = text(&inquiry[16..32]);

    let mut seen = Vec::new();
    for (socket, offset, path) in [(&off, 1u64, "offload"), (&sw, 24, "software")] {
        let serial = s.dir.join(&format!("{path}.serial"));
        let guest = spawn_guest(
            &image,
            &[Attachment::vhost_user_scsi(socket)],
            &pattern_args(offset, "viscsi.disks=sda"),
            &serial,
        );
        let run = finish(guest);
        let field = |k: &str| run.disk_field("DISK", "sda", k).unwrap_or_default();
        assert_eq!(field("vendor"), vendor, "{path}: INQUIRY vendor");
        assert_eq!(field("model"), product, "{path}: INQUIRY product");
        assert_eq!(
            field("vpd83"),
            peer_harness::hex(vpd83),
            "{path}: VPD 0x83 as the guest reads it"
        );
        assert_eq!(field("sectors"), (LUN_BYTES / 512).to_string());
        check_data(&s, &run, "sda", offset, None);
        seen.push((field("vendor"), field("model"), field("vpd83")));
        println!("{path} path: guest saw {vendor} {product}; data verified by qemu-img");
    }
    assert_eq!(seen[0], seen[1], "the guest sees one LUN whatever the path");
}

#[test]
fn guest_on_vhost_user_scsi_offload_and_software_paths() {
    scsi_guests_on_both_paths(viscsi());
}

#[test]
fn guest_on_vhost_user_scsi_offload_and_software_paths_tgtd() {
    scsi_guests_on_both_paths(TargetKind::Tgtd);
}

#[test]
fn guest_on_vhost_user_blk() {
    let image = GuestImage::get();
    let s = setup(&viscsi());
    let socket = s.vm("vm-blk", "offload", "blk");
    let page = s.scsi("vm-blk", "120180 00ff00".replace(' ', "").as_str(), 255);
    let serial_number: String = page[4..]
        .iter()
        .map(|&b| b as char)
        .filter(char::is_ascii_graphic)
        .take(20)
        .collect();
    let guest = spawn_guest(
        &image,
        &[Attachment::vhost_user_blk(&socket)],
        &pattern_args(2, "viscsi.disks=vda"),
        &s.dir.join("blk.serial"),
    );
    let run = finish(guest);
    assert_eq!(
        run.disk_field("DISK", "vda", "sectors").as_deref(),
        Some((LUN_BYTES / 512).to_string().as_str())
    );
    assert_eq!(
        run.disk_field("DISK", "vda", "serial").as_deref(),
        Some(serial_number.as_str()),
        "virtio-blk serial is the LUN's unit serial number"
    );
    check_data(&s, &run, "vda", 2, None);
}

fn restart_while_idle(frontend: &str, disk: &str) {
    let image = GuestImage::get();
    let mut s = setup(&viscsi());
    let socket = s.vm("vm-r", "software", frontend);
    let attachment = if frontend == "scsi" {
        Attachment::vhost_user_scsi(&socket)
    } else {
        Attachment::vhost_user_blk(&socket)
    };
    let mut guest = spawn_guest(
        &image,
        &[attachment],
        &pattern_args(
            4,
            &format!("viscsi.disks={disk} viscsi.rounds=2 viscsi.pause=8"),
        ),
        &s.dir.join("restart.serial"),
    );
    let paused = guest.wait_for_marker("PAUSE", BOOT_TIMEOUT);
    assert!(paused.is_some(), "guest never paused:\n{}", guest.serial());
    // The guest is idle: the agent dies and comes back with the same state.
    s.host.kill_and_restart();
    let run = finish(guest);
    for round in [1, 2] {
        let w = run.round_field("WRITE", disk, round, "md5");
        let r = run.round_field("READ", disk, round, "md5");
        assert!(w.is_some() && w == r, "round {round}: {w:?} vs {r:?}");
    }
    // The second round's data is what the LUN holds now.
    check_data(&s, &run, disk, 4, Some(2));
    s.host.assert_alive();
}

#[test]
fn agent_restart_while_the_guest_is_idle_scsi() {
    restart_while_idle("scsi", "sda");
}

#[test]
fn agent_restart_while_the_guest_is_idle_blk() {
    restart_while_idle("blk", "vda");
}
