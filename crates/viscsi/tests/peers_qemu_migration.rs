//! QEMU live migration together with the agents: a real Linux guest (QEMU TCG, Debian cloud
//! kernel, busybox initramfs) writes to its vhost-user-scsi disk without pause while it is
//! live-migrated from host A to host B and back to A, and the agents move the VM's iSCSI
//! session along (`viscsi migrate --with-vmm`), against `viscsi target` and tgtd.
//!
//! - Host A has the reference offload adapter, host B only the software initiator; both agents
//!   share a cluster key and listen for migrations.
//! - The guest (`viscsi.mode=stamp`) writes 4 KiB blocks with O_DIRECT, one after the other,
//!   write number n into block n mod N of a region, each block stamped "SEQ n BLK b".
//! - Each hop: the source agent offers the VM (`--with-vmm`) and waits in `awaiting_vmm`; the
//!   destination QEMU starts with `-incoming` on the socket the destination agent now serves;
//!   the source QEMU migrates over QMP (`migrate`). QEMU stopping the VM's rings on the source
//!   switches the session over; the source agent's migration reaches `forwarding` with the
//!   destination path and a switchover time, and `completed` once the source QEMU quits. The
//!   destination agent shows the VM on its path, with a "commands held" migration event, and
//!   the guest goes on writing there.
//! - After A → B → A the host writes STOP into the control block (through the VM's data path);
//!   the guest prints the number of its last write and powers off. The host reads the region
//!   with libiscsi (`qemu-img dd`): every block holds exactly the last stamp that maps to it —
//!   no write lost, replayed or reordered across the two switchovers — and the guest saw no
//!   I/O error.
//! - QEMU's downtime (`query-migrate`) and the agents' switchover times are printed.

use std::path::Path;
use std::time::{Duration, Instant};

use peer_harness::agent::{HostAgent, ReferenceHba};
use peer_harness::guest::{spawn_guest_with, Attachment, GuestImage, GuestOptions, RunningGuest};
use peer_harness::ports::{lease_tcp_port, PortLease};
use peer_harness::target::MIB;
use peer_harness::{run_tool, RunningTarget, TargetConfig, TargetKind, TempDir};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_viscsi");
const LUN_BYTES: u64 = 64 * MIB;
const VM: &str = "vm-mig";
/// Guest RAM: what QEMU moves (mostly zero pages).
const MEMORY_MIB: u32 = 256;
/// The stamped region: 32 blocks of 4 KiB from 1 MiB (the guest goes round it every 2 s or
/// so); the control block is the 4 KiB before.
const REGION_OFFSET_MIB: u64 = 1;
const REGION_BLOCKS: u64 = 32;
/// Writes the guest makes at least before it is stopped: several times round the region.
const MIN_WRITES: u64 = 5 * REGION_BLOCKS;
const BLOCK: usize = 4096;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn viscsi() -> TargetKind {
    TargetKind::Viscsi { binary: BIN.into() }
}

struct Cluster {
    a: HostAgent,
    b: HostAgent,
    a_listen: PortLease,
    b_listen: PortLease,
    _hba: ReferenceHba,
    target: RunningTarget,
    dir: TempDir,
}

fn cluster(kind: &TargetKind) -> Cluster {
    let dir = TempDir::new("qemu-migration");
    let target = RunningTarget::start(
        kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:qemu-migration").mem_lun(LUN_BYTES),
    );
    let key = dir.join("cluster.key");
    let out = peer_harness::run_with_timeout(
        std::process::Command::new(BIN).arg("cluster-key").arg(&key),
        Duration::from_secs(10),
    );
    assert!(out.success(), "cluster-key: {out}");
    let key = key.display().to_string();
    let hba = ReferenceHba::start(Path::new(BIN), &dir, "hba0", 4);
    let a_listen = lease_tcp_port();
    let b_listen = lease_tcp_port();
    let agent = |name: &str, adapters: &[(&str, &Path)], port: u16| {
        let listen = format!("127.0.0.1:{port}");
        HostAgent::start(
            Path::new(BIN),
            &dir,
            name,
            adapters,
            &["--cluster-key", &key, "--migration-listen", &listen],
        )
    };
    let a = agent("host-a", &[("hba0", hba.socket())], a_listen.get());
    let b = agent("host-b", &[], b_listen.get());
    Cluster {
        a,
        b,
        a_listen,
        b_listen,
        _hba: hba,
        target,
        dir,
    }
}

/// Runs `viscsi ARGS --json` on `agent` and parses its output.
fn json(agent: &HostAgent, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = agent.cli(&all);
    assert!(out.success(), "viscsi {all:?}: {out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{all:?}: {e}: {out}"))
}

fn migration(agent: &HostAgent) -> Value {
    let list = json(agent, &["migrations", VM]);
    list.as_array()
        .and_then(|l| l.first())
        .cloned()
        .unwrap_or_else(|| panic!("no migration of {VM}: {list}"))
}

/// Waits until the migration of the VM on `agent` is in one of `phases`.
fn wait_phase(agent: &HostAgent, phases: &[&str], timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let m = migration(agent);
        let phase = m["phase"].as_str().unwrap_or_default();
        if phases.contains(&phase) {
            return m;
        }
        assert!(
            phase != "abandoned",
            "migration abandoned: {m}\nagent log:\n{}",
            agent.log()
        );
        assert!(
            start.elapsed() < timeout,
            "migration not {phases:?} after {timeout:?}: {m}\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One QMP command; panics on an error answer.
fn qmp(guest: &RunningGuest, command: &str) -> Value {
    let answer = guest
        .qmp(command)
        .unwrap_or_else(|e| panic!("QMP {command}: {e}\nQEMU: {}", guest.qemu_log()));
    let v: Value = serde_json::from_str(&answer).expect("QMP answer is JSON");
    assert!(
        v.get("error").is_none(),
        "QMP {command}: {v}\nQEMU: {}",
        guest.qemu_log()
    );
    v["return"].clone()
}

/// The highest `STAMP n=` the guest has printed on this QEMU's console.
fn last_stamp(guest: &RunningGuest) -> u64 {
    guest
        .markers()
        .iter()
        .filter(|m| m.kind == "STAMP")
        .filter_map(|m| m.field("n")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits for a `STAMP` beyond `after` on `guest`'s console.
fn wait_stamp_beyond(guest: &mut RunningGuest, after: u64, what: &str) -> u64 {
    let found = guest.wait_for(BOOT_TIMEOUT, |m| {
        m.kind == "STAMP" && m.field("n").and_then(|n| n.parse::<u64>().ok()) > Some(after)
    });
    let serial = guest.serial();
    let errors: Vec<_> = guest
        .markers()
        .into_iter()
        .filter(|m| m.kind == "ERROR")
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: guest errors {errors:?}\n{serial}"
    );
    assert!(
        found.is_some(),
        "{what}: the guest wrote nothing beyond {after}\nserial:\n{serial}\nQEMU: {}",
        guest.qemu_log()
    );
    last_stamp(guest)
}

/// What one hop measured.
#[derive(Debug)]
struct Hop {
    label: String,
    qemu_downtime_ms: u64,
    qemu_total_ms: u64,
    switchover_ms: f64,
    to_path: String,
    forwarded: u64,
    held_note: String,
}

/// The options of every QEMU of the VM: the same machine, only the socket and the QMP socket
/// differ (and the destination's `-incoming`).
fn qemu_options(dir: &TempDir, label: &str, incoming: Option<String>) -> GuestOptions {
    GuestOptions {
        memory_mib: MEMORY_MIB,
        // The destination agent serves the socket before its QEMU starts; a source QEMU must
        // not reconnect to its old agent after the hop.
        reconnect_ms: None,
        qmp_socket: Some(dir.join(&format!("qmp-{label}.sock"))),
        incoming,
        ..GuestOptions::default()
    }
}

fn stamp_args() -> String {
    format!(
        "viscsi.mode=stamp viscsi.disks=sda viscsi.offset_mib={REGION_OFFSET_MIB} \
         viscsi.blocks={REGION_BLOCKS} viscsi.every=16 viscsi.seconds=300"
    )
}

/// Moves the running guest `src` (attached to `from`) to a new QEMU on `to`'s socket `socket`,
/// together with the VM's session; returns the new QEMU and the figures.
#[allow(clippy::too_many_arguments)]
fn hop(
    c: &Cluster,
    image: &GuestImage,
    from: &HostAgent,
    to: &HostAgent,
    to_listen: u16,
    mut src: RunningGuest,
    socket: &Path,
    label: &str,
) -> (RunningGuest, Hop) {
    // The source agent offers the VM; the destination serves its socket at once.
    let offer = json(
        from,
        &[
            "migrate",
            VM,
            "--to",
            &format!("127.0.0.1:{to_listen}"),
            "--vhost-socket",
            &socket.display().to_string(),
            "--with-vmm",
            "--no-wait",
        ],
    );
    eprintln!("{label}: offered: {offer}");
    let waiting = wait_phase(from, &["awaiting_vmm"], Duration::from_secs(30));
    assert_eq!(
        waiting["to_socket"].as_str(),
        Some(socket.display().to_string().as_str()),
        "{waiting}"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(socket).is_ok(),
        "{label}: the destination does not serve {}\n{}",
        socket.display(),
        to.log()
    );

    // The destination QEMU waits for the guest's state.
    let port = lease_tcp_port();
    let mut dest = spawn_guest_with(
        image,
        &[Attachment::vhost_user_scsi(socket)],
        &stamp_args(),
        &c.dir.join(&format!("guest-{label}.serial")),
        &qemu_options(&c.dir, label, Some("defer".to_string())),
    );
    // `defer`, then `migrate-incoming`: it answers once QEMU listens (a probe connection
    // would be taken for the migration stream).
    qmp(
        &dest,
        &format!(
            r#"{{"execute":"migrate-incoming","arguments":{{"uri":"tcp:127.0.0.1:{}"}}}}"#,
            port.get()
        ),
    );

    // The guest is writing right now.
    let seen = last_stamp(&src);
    let before = wait_stamp_beyond(&mut src, seen, &format!("{label} (source)"));
    qmp(
        &src,
        r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1073741824}}"#,
    );
    qmp(
        &src,
        &format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{}"}}}}"#,
            port.get()
        ),
    );
    let start = Instant::now();
    let info = loop {
        let info = qmp(&src, r#"{"execute":"query-migrate"}"#);
        match info["status"].as_str().unwrap_or_default() {
            "completed" => break info,
            "failed" | "cancelled" => panic!(
                "{label}: QEMU migration {info}\nsource QEMU: {}\ndestination QEMU: {}\n\
                 source agent:\n{}\ndestination agent:\n{}",
                src.qemu_log(),
                dest.qemu_log(),
                from.log(),
                to.log()
            ),
            _ => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{label}: QEMU migration still {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{label}: QEMU migration {info}");
    let status = qmp(&dest, r#"{"execute":"query-status"}"#);
    assert_eq!(status["status"], "running", "{label}: destination {status}");

    // QEMU stopped the rings on the source: the session has moved.
    let moved = wait_phase(from, &["forwarding", "completed"], Duration::from_secs(30));
    let to_path = moved["to_path"].as_str().unwrap_or_default().to_string();
    assert!(!to_path.is_empty(), "{label}: no to_path in {moved}");
    let switchover_ms = moved["switchover_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("{label}: no switchover_ms in {moved}"));

    // The source QEMU leaves; the source agent forgets the VM.
    let _ = src.qmp(r#"{"execute":"quit"}"#);
    let run = src.wait(Duration::from_secs(10));
    let done = wait_phase(from, &["completed"], Duration::from_secs(30));
    eprintln!("{label}: source agent: {done}");
    let source_errors: Vec<_> = run
        .markers()
        .into_iter()
        .filter(|m| m.kind == "ERROR")
        .collect();
    assert!(source_errors.is_empty(), "{label}: {source_errors:?}");

    // The destination agent has the VM, on its path, with the switchover in its history.
    let vm = json(to, &["vm", "show", VM]);
    assert!(
        vm["path"].is_object(),
        "{label}: no path on the destination: {vm}"
    );
    let held_note = vm["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "migration")
        .filter_map(|e| e["message"].as_str())
        .rfind(|m| m.contains("commands held"))
        .unwrap_or_else(|| panic!("{label}: no \"commands held\" event: {vm}"))
        .to_string();
    let to_host = done["to_host"].as_str().unwrap_or_default();
    assert!(
        !to_host.is_empty() && held_note.contains(&format!("to host {to_host} ")),
        "{label}: the last migration event is not this hop's: {held_note:?} ({done})"
    );

    // The guest goes on writing on the destination.
    let after = wait_stamp_beyond(&mut dest, before, &format!("{label} (destination)"));
    eprintln!("{label}: guest stamps: {before} before the hop, {after} after");
    let hop = Hop {
        label: label.to_string(),
        qemu_downtime_ms: info["downtime"].as_u64().unwrap_or_default(),
        qemu_total_ms: info["total-time"].as_u64().unwrap_or_default(),
        switchover_ms,
        to_path,
        forwarded: done["forwarded"].as_u64().unwrap_or_default(),
        held_note,
    };
    (dest, hop)
}

/// The block `b` of the region after writes 1..=last: the last stamp that maps to it.
fn expected_block(b: u64, last: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    // The largest n <= last with n mod blocks == b (n counts from 1).
    let n = if last >= b {
        b + (last - b) / REGION_BLOCKS * REGION_BLOCKS
    } else {
        0
    };
    if n > 0 {
        let text = format!("SEQ {n} BLK {b}\n");
        block[..text.len()].copy_from_slice(text.as_bytes());
    }
    block
}

fn stamp_text(block: &[u8]) -> String {
    let end = block.iter().position(|&c| c == 0).unwrap_or(block.len());
    String::from_utf8_lossy(&block[..end.min(40)])
        .trim()
        .to_string()
}

/// Writes STOP into the control block through the VM's data path on `agent`.
fn stop_guest(c: &Cluster, agent: &HostAgent) {
    let ctl_lba = (REGION_OFFSET_MIB * MIB / BLOCK as u64 - 1) * (BLOCK as u64 / 512);
    let mut data = vec![0u8; BLOCK];
    data[..4].copy_from_slice(b"STOP");
    let file = c.dir.join("stop.bin");
    std::fs::write(&file, &data).expect("write stop block");
    // WRITE(10) of 8 sectors at the control block.
    let cdb = format!("2a00{ctl_lba:08x}00000800");
    let lun = c.target.lun_id(0).to_string();
    let result = json(
        agent,
        &[
            "vm",
            "scsi",
            VM,
            "--lun",
            &lun,
            "--cdb",
            &cdb,
            "--data-file",
            &file.display().to_string(),
        ],
    );
    assert_eq!(result["status"], 0, "STOP write: {result}");
}

/// The region and the control block as the target holds them, read by libiscsi.
fn read_region(c: &Cluster) -> Vec<u8> {
    let file = c.dir.join("region.bin");
    let mib = REGION_OFFSET_MIB + 1;
    let dd = run_tool(
        "qemu-img",
        &[
            "dd",
            "-f",
            "raw",
            "-O",
            "raw",
            "bs=1M",
            &format!("count={mib}"),
            &format!("if={}", c.target.url(0)),
            &format!("of={}", file.display()),
        ],
        Duration::from_secs(60),
    );
    dd.assert_success();
    let bytes = std::fs::read(&file).expect("read region file");
    assert_eq!(bytes.len() as u64, mib * MIB, "qemu-img dd output size");
    bytes
}

fn migrate_there_and_back(kind: TargetKind) {
    let started = Instant::now();
    let image = GuestImage::get();
    let c = cluster(&kind);
    let socket_a = c.dir.join("vm-a.sock");
    let out = c.a.cli(&[
        "vm",
        "create",
        VM,
        "--portal",
        &c.target.portal(),
        "--target",
        c.target.iqn(),
        "--lun",
        &c.target.lun_id(0).to_string(),
        "--path",
        "auto",
        "--frontend",
        "scsi",
        "--vhost-socket",
        &socket_a.display().to_string(),
        "--queues",
        "1",
        "--memory-mib",
        &MEMORY_MIB.to_string(),
    ]);
    assert!(out.success(), "vm create: {out}");
    let vm = json(&c.a, &["vm", "show", VM]);
    let path_a = vm["path"].clone();
    assert!(
        path_a.to_string().contains("offload"),
        "host A puts the VM on its adapter: {vm}"
    );

    let mut guest = spawn_guest_with(
        &image,
        &[Attachment::vhost_user_scsi(&socket_a)],
        &stamp_args(),
        &c.dir.join("guest-a.serial"),
        &qemu_options(&c.dir, "a", None),
    );
    let first = wait_stamp_beyond(&mut guest, 0, "boot on A");
    eprintln!("guest writing on A (stamp {first})");

    let (guest, there) = hop(
        &c,
        &image,
        &c.a,
        &c.b,
        c.b_listen.get(),
        guest,
        &c.dir.join("vm-b.sock"),
        "a-to-b",
    );
    assert!(
        there.to_path.contains("software"),
        "host B has only the software path: {there:?}"
    );
    let (mut guest, back) = hop(
        &c,
        &image,
        &c.b,
        &c.a,
        c.a_listen.get(),
        guest,
        &c.dir.join("vm-a2.sock"),
        "b-to-a",
    );
    assert!(
        back.to_path.contains("offload"),
        "back on A, the VM is on the adapter again: {back:?}"
    );

    let seen = last_stamp(&guest);
    if seen < MIN_WRITES {
        wait_stamp_beyond(&mut guest, MIN_WRITES - 1, "back on A");
    }
    stop_guest(&c, &c.a);
    let run = guest.wait(BOOT_TIMEOUT);
    let markers = run.markers();
    let errors: Vec<_> = markers.iter().filter(|m| m.kind == "ERROR").collect();
    assert!(
        errors.is_empty(),
        "guest errors: {errors:?}\n{}",
        run.serial
    );
    let stamped = markers
        .iter()
        .find(|m| m.kind == "STAMPED")
        .unwrap_or_else(|| panic!("guest did not finish:\n{}\nQEMU: {}", run.serial, run.qemu));
    assert_eq!(stamped.field("stop"), Some("host"), "{stamped:?}");
    let last: u64 = stamped
        .field("last")
        .and_then(|n| n.parse().ok())
        .expect("STAMPED last=");
    assert!(last >= MIN_WRITES, "the guest wrote only {last} blocks");

    // Every block holds the last stamp that maps to it.
    let bytes = read_region(&c);
    let first_block = (REGION_OFFSET_MIB * MIB) as usize;
    assert_eq!(
        &bytes[first_block - BLOCK..first_block - BLOCK + 4],
        b"STOP"
    );
    let mut wrong = Vec::new();
    for b in 0..REGION_BLOCKS {
        let at = first_block + b as usize * BLOCK;
        let got = &bytes[at..at + BLOCK];
        let want = expected_block(b, last);
        if got != want.as_slice() {
            wrong.push(format!(
                "block {b}: {:?}, expected {:?}",
                stamp_text(got),
                stamp_text(&want)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "after {last} writes the region holds other stamps:\n{}",
        wrong.join("\n")
    );

    for hop in [&there, &back] {
        eprintln!(
            "{}: QEMU downtime {} ms (migration {} ms); agents: commands held {:.1} ms, \
             {} forwarded, now on {}; \"{}\"",
            hop.label,
            hop.qemu_downtime_ms,
            hop.qemu_total_ms,
            hop.switchover_ms,
            hop.forwarded,
            hop.to_path,
            hop.held_note
        );
    }
    eprintln!(
        "{}: {last} stamped 4 KiB writes across A -> B -> A verified in {:.1} s",
        kind.name(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn the_expected_stamps_are_the_last_writes_to_each_block() {
    let text = |b, last| stamp_text(&expected_block(b, last));
    assert_eq!(text(0, 5), "");
    assert_eq!(text(5, 5), "SEQ 5 BLK 5");
    assert_eq!(text(6, 5), "");
    assert_eq!(text(0, REGION_BLOCKS), format!("SEQ {REGION_BLOCKS} BLK 0"));
    assert_eq!(
        text(1, 3 * REGION_BLOCKS + 1),
        format!("SEQ {} BLK 1", 3 * REGION_BLOCKS + 1)
    );
    assert_eq!(
        text(2, 3 * REGION_BLOCKS + 1),
        format!("SEQ {} BLK 2", 2 * REGION_BLOCKS + 2)
    );
}

#[test]
fn guest_writes_through_live_migration_there_and_back() {
    migrate_there_and_back(viscsi());
}

#[test]
fn guest_writes_through_live_migration_there_and_back_tgtd() {
    migrate_there_and_back(TargetKind::Tgtd);
}
