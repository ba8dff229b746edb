//! The guest harness against a third-party vhost-user back end: `qemu-storage-daemon` exports a
//! file as vhost-user-blk, a Linux guest (QEMU TCG, busybox initramfs) gets it as `vda` and writes
//! fresh random data, reads it back and prints both MD5s, twice. Between the two rounds the guest
//! pauses, and the test kills qemu-storage-daemon and starts a new one on the same socket: QEMU
//! (chardev `reconnect-ms`) must reconnect and the guest's second round must go through. The host
//! checks each round's data in the file.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use peer_harness::guest::{spawn_guest_with, Attachment, GuestImage, GuestOptions};
use peer_harness::target::MIB;
use peer_harness::{md5_of_file_range, tools, write_random_file, Daemon, TempDir};

const DISK_BYTES: u64 = 64 * MIB;
const PATTERN_MIB: u64 = 16;
const OFFSET_MIB: u64 = 1;
const PAUSE_S: u64 = 3;

/// Starts qemu-storage-daemon exporting `image` as vhost-user-blk on `socket`, and waits until
/// the socket exists.
fn start_qsd(image: &Path, socket: &Path, log: &Path) -> Daemon {
    let qsd = tools::require_tool("qemu-storage-daemon");
    let _ = std::fs::remove_file(socket);
    let mut cmd = Command::new(qsd);
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            socket.display()
        ));
    let mut daemon = Daemon::spawn("qemu-storage-daemon", &mut cmd, log);
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            daemon.is_running(),
            "qemu-storage-daemon exited: {}",
            daemon.log()
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "qemu-storage-daemon did not create {} within 10 s: {}",
            socket.display(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon
}

#[test]
fn guest_io_on_vhost_user_blk_survives_a_qemu_storage_daemon_restart() {
    let image = GuestImage::get();
    let dir = TempDir::new("vhost-qsd");
    let disk = dir.join("disk.img");
    write_random_file(&disk, DISK_BYTES, 0x5eed);
    let socket = dir.join("vub.sock");
    let mut qsd = start_qsd(&disk, &socket, &dir.join("qsd-1.log"));

    let options = GuestOptions {
        qmp_socket: Some(dir.join("qmp.sock")),
        ..GuestOptions::default()
    };
    let mut guest = spawn_guest_with(
        &image,
        &[Attachment::vhost_user_blk(&socket)],
        &format!(
            "viscsi.mode=pattern viscsi.mib={PATTERN_MIB} viscsi.offset_mib={OFFSET_MIB} \
             viscsi.rounds=2 viscsi.pause={PAUSE_S} viscsi.disks=vda"
        ),
        &dir.join("guest.serial"),
        &options,
    );

    let pause = guest.wait_for_marker("PAUSE", Duration::from_secs(120));
    assert!(
        pause.is_some(),
        "guest did not reach the pause; serial:\n{}\nQEMU:\n{}",
        guest.serial(),
        guest.qemu_log()
    );
    // Round 1 is on the disk by now (O_DIRECT + fsync).
    let round1 = guest
        .markers()
        .into_iter()
        .find(|m| m.is("WRITE", "vda") && m.round() == Some(1))
        .and_then(|m| m.field("md5").map(str::to_string))
        .unwrap_or_else(|| panic!("no round 1 write; serial:\n{}", guest.serial()));
    let host = md5_of_file_range(&disk, OFFSET_MIB * MIB, PATTERN_MIB * MIB);
    assert_eq!(
        host, round1,
        "round 1: the file holds other data than the guest wrote"
    );

    // Restart the back end while the guest sleeps.
    let restart = Instant::now();
    qsd.kill();
    let first_log = qsd.log();
    qsd = start_qsd(&disk, &socket, &dir.join("qsd-2.log"));
    println!(
        "qemu-storage-daemon restarted in {:.0} ms",
        restart.elapsed().as_secs_f64() * 1000.0
    );
    assert!(
        restart.elapsed() < Duration::from_secs(PAUSE_S) / 2,
        "the restart took too long to fall into the guest's pause"
    );
    std::thread::sleep(Duration::from_millis(1500));
    println!(
        "QEMU after the restart: {:?}",
        guest.hmp("info status").map(|s| s.trim().to_string())
    );

    let run = guest.wait(Duration::from_secs(180));
    println!(
        "guest ran {:.1} s; serial console:\n{}\n--- QEMU ---\n{}\n--- qemu-storage-daemon (first) ---\n{}\n--- qemu-storage-daemon (second) ---\n{}",
        run.qemu.elapsed.as_secs_f64(),
        run.serial,
        run.qemu.stderr,
        first_log,
        qsd.log()
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
    let sectors = run
        .disk_field("DISK", "vda", "sectors")
        .expect("guest has no vda");
    assert_eq!(sectors, (DISK_BYTES / 512).to_string(), "vda size");

    let mut last = String::new();
    for round in 1..=2 {
        let written = run
            .round_field("WRITE", "vda", round, "md5")
            .unwrap_or_else(|| panic!("round {round}: no write"));
        let read = run
            .round_field("READ", "vda", round, "md5")
            .unwrap_or_else(|| panic!("round {round}: no read"));
        assert_eq!(
            read, written,
            "round {round}: guest read other data than it wrote"
        );
        println!("round {round}: guest wrote and read md5 {written}");
        last = written;
    }
    assert_ne!(last, round1, "round 2 should write fresh data");
    let host = md5_of_file_range(&disk, OFFSET_MIB * MIB, PATTERN_MIB * MIB);
    assert_eq!(
        host, last,
        "round 2: the file holds other data than the guest wrote"
    );
    assert!(qsd.is_running(), "qemu-storage-daemon died: {}", qsd.log());
}
