//! A Linux guest (QEMU TCG, Debian cloud kernel, busybox initramfs) uses LUNs of `viscsi target`
//! as its disks through QEMU's libiscsi driver: one on virtio-scsi (`scsi-hd`, guest `sda`), one
//! on virtio-blk (guest `vda`). The guest writes 16 MiB of fresh random data at offset 1 MiB of
//! each with O_DIRECT, reads it back and prints both MD5s on the serial console; the host then
//! reads the same range from the LUN with `qemu-img dd` and must get the same MD5.

use std::time::Duration;

use peer_harness::guest::{boot_guest, DiskBus, GuestDisk, GuestImage};
use peer_harness::target::MIB;
use peer_harness::{qemu_img_md5, tools, RunningTarget, TargetConfig, TargetKind};

const PATTERN_MIB: u64 = 16;
const OFFSET_MIB: u64 = 1;
const LUN_BYTES: u64 = 64 * MIB;

#[test]
fn guest_writes_and_reads_pattern_on_virtio_scsi_and_virtio_blk() {
    tools::require_qemu_iscsi_driver();
    let image = GuestImage::get();
    let kind = TargetKind::from_env(env!("CARGO_BIN_EXE_viscsi"));
    let mut target = RunningTarget::start(
        &kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:guest")
            .mem_lun(LUN_BYTES)
            .mem_lun(LUN_BYTES),
    );
    let disks = [
        GuestDisk {
            url: target.url(0),
            bus: DiskBus::VirtioScsi,
        },
        GuestDisk {
            url: target.url(1),
            bus: DiskBus::VirtioBlk,
        },
    ];
    let serial = target.dir().join("guest.serial");
    let run = boot_guest(
        &image,
        &disks,
        &format!("viscsi.mode=pattern viscsi.mib={PATTERN_MIB} viscsi.offset_mib={OFFSET_MIB}"),
        &serial,
        Duration::from_secs(120),
    );
    println!(
        "guest ran {:.1} s; serial console:\n{}",
        run.qemu.elapsed.as_secs_f64(),
        run.serial
    );
    assert!(run.qemu.success(), "QEMU failed: {}", run.qemu);
    let markers = run.markers();
    assert!(
        markers.iter().any(|m| m.kind == "DONE"),
        "guest did not finish"
    );
    assert!(
        !markers.iter().any(|m| m.kind == "ERROR"),
        "guest reported errors"
    );
    target.assert_alive();

    for (index, name) in [(0usize, "sda"), (1, "vda")] {
        let sectors = run
            .disk_field("DISK", name, "sectors")
            .unwrap_or_else(|| panic!("guest has no disk {name}"));
        assert_eq!(sectors, (LUN_BYTES / 512).to_string(), "{name} size");
        let written = run
            .disk_field("WRITE", name, "md5")
            .unwrap_or_else(|| panic!("guest did not write {name}"));
        let read = run
            .disk_field("READ", name, "md5")
            .unwrap_or_else(|| panic!("guest did not read {name}"));
        assert_eq!(
            read, written,
            "{name}: guest read back other data than it wrote"
        );

        let range = target.dir().join(&format!("{name}.range"));
        let host = qemu_img_md5(&target.url(index), OFFSET_MIB, PATTERN_MIB, &range);
        assert_eq!(
            host, written,
            "{name}: host reads other data than the guest wrote"
        );
        println!("{name}: guest wrote, guest read and host read md5 {host}");
    }
    target.shutdown_cleanly();
}
