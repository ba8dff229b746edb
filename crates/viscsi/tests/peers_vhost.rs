//! The VM's virtual bus served by `viscsi host`, driven by a host-side vhost-user front end
//! (`viscsi-vhost-driver`, playing QEMU's role) against `viscsi target` and tgtd, with VMs on
//! the offload path (the reference adapter) and the software path.
//!
//! - vhost-user-scsi passes the guest's CDBs through: INQUIRY, VPD 0x80/0x83 and READ
//!   CAPACITY are byte-identical on both paths; data written through one VM's bus reads back
//!   through the other's; pipelined commands on several queues all complete.
//! - vhost-user-blk: capacity in the config space, reads, writes, flush, GET_ID = the LUN's
//!   serial number.
//! - Bad input from the guest side (malformed descriptor chains, addresses outside guest
//!   memory, short headers, other targets, hidden LUNs, oversized requests) fails that request
//!   with the virtio/SCSI status the spec names; the agent and other VMs carry on.
//! - The control queue: task management and asynchronous-notification queries.
//! - Live-migration support: guest writes are marked in the dirty log; a vring stop returns
//!   only when every request taken from the ring has completed.
//! - The agent restarts: the socket comes back and a reconnecting front end finds its data.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use peer_harness::agent::{HostAgent, ReferenceHba};
use peer_harness::pattern;
use peer_harness::target::MIB;
use peer_harness::{RunningTarget, TargetConfig, TargetKind, TempDir};
use vhost_driver::{DeviceKind, Driver, DriverOptions, RawDescriptor, ScsiReply};

const BIN: &str = env!("CARGO_BIN_EXE_viscsi");
const LUN_BYTES: u64 = 64 * MIB;

/// Virtqueue indices of virtio-scsi.
const CONTROL_VQ: u16 = 0;
const FIRST_REQUEST_VQ: u16 = 2;

/// virtio-scsi response codes.
const S_OK: u8 = 0;
const S_BAD_TARGET: u8 = 3;
const S_FAILURE: u8 = 9;
const S_FUNCTION_REJECTED: u8 = 11;

/// virtio-blk.
const BLK_IN: u32 = 0;
const BLK_OUT: u32 = 1;
const BLK_FLUSH: u32 = 4;
const BLK_GET_ID: u32 = 8;
const BLK_S_OK: u8 = 0;
const BLK_S_IOERR: u8 = 1;
const BLK_S_UNSUPP: u8 = 2;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn viscsi() -> TargetKind {
    TargetKind::Viscsi { binary: BIN.into() }
}

/// Creates a VM with a virtual bus through the CLI; returns the CLI's output.
fn create_vm(
    host: &HostAgent,
    target: &RunningTarget,
    name: &str,
    path: &str,
    frontend: &str,
    socket: &Path,
    luns: &[u32],
) -> String {
    let portal = target.portal();
    let socket = socket.display().to_string();
    let mut args = vec![
        "vm",
        "create",
        name,
        "--portal",
        &portal,
        "--target",
        target.iqn(),
        "--path",
        path,
        "--frontend",
        frontend,
        "--vhost-socket",
        &socket,
        "--queues",
        "2",
        "--memory-mib",
        "512",
    ];
    let luns: Vec<String> = luns.iter().map(u32::to_string).collect();
    for l in &luns {
        args.push("--lun");
        args.push(l);
    }
    let out = host.cli(&args);
    assert!(out.success(), "vm create {name}: {out}");
    out.stdout.clone()
}

fn connect(socket: &Path, kind: DeviceKind) -> Driver {
    Driver::connect(
        socket,
        DriverOptions {
            kind,
            request_queues: 2,
            queue_size: 128,
            memory_bytes: 96 << 20,
        },
    )
    .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()))
}

/// A command through the bus; a UNIT ATTENTION (first command of a new I_T nexus) is retried
/// as a guest would.
fn scsi(d: &mut Driver, lun: u16, cdb: &[u8], out: &[u8], read_len: u32) -> ScsiReply {
    for _ in 0..5 {
        let r = d
            .scsi_command(lun, cdb, out, read_len)
            .unwrap_or_else(|e| panic!("CDB {cdb:02x?}: {e}"));
        let unit_attention = r.status == 2 && r.sense.get(2).map(|k| k & 0x0f) == Some(6);
        if !unit_attention {
            return r;
        }
    }
    panic!("CDB {cdb:02x?}: UNIT ATTENTION five times")
}

fn good(d: &mut Driver, lun: u16, cdb: &[u8], out: &[u8], read_len: u32) -> Vec<u8> {
    let r = scsi(d, lun, cdb, out, read_len);
    assert_eq!(
        (r.response, r.status),
        (S_OK, 0),
        "CDB {cdb:02x?}: sense {:02x?}",
        r.sense
    );
    r.data
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

/// The LUN identity a guest reads: standard INQUIRY, VPD 0x80 and 0x83, READ CAPACITY(16).
fn identity(d: &mut Driver, lun: u16) -> Vec<Vec<u8>> {
    vec![
        good(d, lun, &[0x12, 0, 0, 0, 96, 0], &[], 96),
        good(d, lun, &[0x12, 1, 0x80, 0, 255, 0], &[], 255),
        good(d, lun, &[0x12, 1, 0x83, 0, 255, 0], &[], 255),
        good(
            d,
            lun,
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            &[],
            32,
        ),
    ]
}

/// Dropped in field order: the agent first, so that it does not see its adapter and target
/// go away under it.
struct Bench {
    host: HostAgent,
    _hba: ReferenceHba,
    target: RunningTarget,
    sockets: PathBuf,
    _dir: TempDir,
}

fn start(kind: &TargetKind) -> Bench {
    let dir = TempDir::new("vhost");
    let target = RunningTarget::start(
        kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:vhost")
            .mem_lun(LUN_BYTES)
            .mem_lun(LUN_BYTES / 2),
    );
    let hba = ReferenceHba::start(Path::new(BIN), &dir, "hba0", 4);
    let host = HostAgent::start(
        Path::new(BIN),
        &dir,
        "host-a",
        &[("hba0", hba.socket())],
        &[],
    );
    let sockets = dir.join("vms");
    Bench {
        host,
        _hba: hba,
        target,
        sockets,
        _dir: dir,
    }
}

fn same_lun_through_both_paths(kind: TargetKind) {
    let mut b = start(&kind);
    let lun = b.target.lun_id(0) as u16;
    let (off_sock, sw_sock) = (b.sockets.join("off.sock"), b.sockets.join("sw.sock"));
    let printed = create_vm(
        &b.host,
        &b.target,
        "vm-off",
        "offload",
        "scsi",
        &off_sock,
        &[],
    );
    assert!(
        printed.contains("-device vhost-user-scsi-pci,chardev=viscsi0,num_queues=2")
            && printed.contains("share=on")
            && printed.contains(&format!("path={}", off_sock.display())),
        "QEMU options printed:\n{printed}"
    );
    create_vm(
        &b.host,
        &b.target,
        "vm-sw",
        "software",
        "scsi",
        &sw_sock,
        &[],
    );
    let show = b.host.cli(&["vm", "show", "vm-off"]);
    assert!(
        show.stdout.contains("offload hba0") && show.stdout.contains("vhost-user-scsi"),
        "{show}"
    );

    let mut off = connect(&off_sock, DeviceKind::Scsi);
    let mut sw = connect(&sw_sock, DeviceKind::Scsi);
    // The guest sees the LUN itself, whatever the path.
    let id_off = identity(&mut off, lun);
    let id_sw = identity(&mut sw, lun);
    assert_eq!(id_off, id_sw, "LUN identity differs between the paths");
    let capacity = u64::from_be_bytes(id_off[3][..8].try_into().unwrap()) + 1;
    assert_eq!(capacity * 512, LUN_BYTES);
    // Every LUN of the target is there (no LUN list given).
    let report = good(
        &mut sw,
        0,
        &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        &[],
        256,
    );
    let listed = u32::from_be_bytes(report[..4].try_into().unwrap()) as usize;
    let luns: Vec<u16> = report[8..8 + listed]
        .chunks(8)
        .map(|e| u16::from_be_bytes([e[0], e[1]]) & 0x3fff)
        .collect();
    for index in 0..2 {
        let id = b.target.lun_id(index) as u16;
        assert!(luns.contains(&id), "LUN {id} not in REPORT LUNS {luns:?}");
    }

    // Written through one bus, read through the other (another path, another session).
    for (i, blocks) in [1u16, 8, 256, 2048].into_iter().enumerate() {
        let lba = 1000 * i as u32;
        let data = pattern(usize::from(blocks) * 512, i as u64 + 7);
        let (writer, reader) = if i % 2 == 0 {
            (&mut off, &mut sw)
        } else {
            (&mut sw, &mut off)
        };
        good(writer, lun, &write10(lba, blocks), &data, 0);
        let back = good(reader, lun, &read10(lba, blocks), &[], data.len() as u32);
        assert!(back == data, "{blocks} blocks at {lba} differ");
    }

    // Pipelined: 64 reads of 4 KiB over both request queues, all complete GOOD.
    for d in [&mut off, &mut sw] {
        let mut done = 0;
        for id in 0..64u64 {
            let queue = (id % 2) as u16;
            d.submit_scsi(queue, id, lun, &read10(id as u32 * 8, 8), 0, 4096)
                .expect("submit");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while done < 64 && Instant::now() < deadline {
            for c in d.reap(Duration::from_secs(1)).expect("reap") {
                assert_eq!((c.response, c.status), (S_OK, 0), "{c:?}");
                done += 1;
            }
        }
        assert_eq!(done, 64, "pipelined reads completed");
    }
    b.host.assert_alive();
    b.target.assert_alive();
}

#[test]
fn scsi_bus_same_lun_through_offload_and_software_paths() {
    same_lun_through_both_paths(viscsi());
}

#[test]
fn scsi_bus_same_lun_through_offload_and_software_paths_tgtd() {
    same_lun_through_both_paths(TargetKind::Tgtd);
}

#[test]
fn blk_bus_reads_writes_flushes_and_identifies() {
    let b = start(&viscsi());
    let lun = b.target.lun_id(1);
    let socket = b.sockets.join("blk.sock");
    let printed = create_vm(
        &b.host,
        &b.target,
        "vm-blk",
        "offload",
        "blk",
        &socket,
        &[lun],
    );
    assert!(printed.contains("-device vhost-user-blk-pci,chardev=viscsi0,num-queues=2"));
    let scsi_socket = b.sockets.join("scsi.sock");
    create_vm(
        &b.host,
        &b.target,
        "vm-scsi",
        "software",
        "scsi",
        &scsi_socket,
        &[lun],
    );

    let mut blk = connect(&socket, DeviceKind::Blk);
    let config = blk.blk_config().expect("config");
    assert_eq!(config.capacity_sectors, LUN_BYTES / 2 / 512);
    assert_eq!(config.blk_size, 512);
    assert_eq!(config.num_queues, 2);

    let mut scsi_bus = connect(&scsi_socket, DeviceKind::Scsi);
    for (sector, len) in [(0u64, 512usize), (8, 4096), (4096, 1 << 20)] {
        let data = pattern(len, sector);
        let (status, _) = blk.blk_request(BLK_OUT, sector, &data, 0).expect("write");
        assert_eq!(status, BLK_S_OK);
        let (status, back) = blk
            .blk_request(BLK_IN, sector, &[], len as u32)
            .expect("read");
        assert_eq!(status, BLK_S_OK);
        assert!(back == data, "blk read back at sector {sector}");
        // The same blocks through the other VM's virtio-scsi bus.
        let other = good(
            &mut scsi_bus,
            lun as u16,
            &read10(sector as u32, (len / 512) as u16),
            &[],
            len as u32,
        );
        assert!(other == data, "scsi read of blk's write at sector {sector}");
    }
    let (status, _) = blk.blk_request(BLK_FLUSH, 0, &[], 0).expect("flush");
    assert_eq!(status, BLK_S_OK);
    let (status, id) = blk.blk_request(BLK_GET_ID, 0, &[], 20).expect("get id");
    assert_eq!(status, BLK_S_OK);
    let serial_page = good(
        &mut scsi_bus,
        lun as u16,
        &[0x12, 1, 0x80, 0, 255, 0],
        &[],
        255,
    );
    let serial: Vec<u8> = serial_page[4..]
        .iter()
        .copied()
        .filter(u8::is_ascii_graphic)
        .take(20)
        .collect();
    assert!(!serial.is_empty());
    assert_eq!(
        &id[..serial.len()],
        &serial[..],
        "GET_ID is the unit serial number"
    );

    // Out of range and unknown requests fail with the right status.
    let end = config.capacity_sectors;
    assert_eq!(
        blk.blk_request(BLK_IN, end, &[], 512).unwrap().0,
        BLK_S_IOERR
    );
    assert_eq!(
        blk.blk_request(BLK_IN, end - 1, &[], 1024).unwrap().0,
        BLK_S_IOERR
    );
    assert_eq!(
        blk.blk_request(BLK_OUT, 0, &[0; 100], 0).unwrap().0,
        BLK_S_IOERR
    );
    assert_eq!(blk.blk_request(77, 0, &[], 0).unwrap().0, BLK_S_UNSUPP);
    let (status, _) = blk
        .blk_request(BLK_IN, 0, &[], 512)
        .expect("read after errors");
    assert_eq!(status, BLK_S_OK);
}

/// Submits a raw chain on `vq` and returns the used length (None: not used in time).
fn raw(d: &mut Driver, vq: u16, chain: &[RawDescriptor]) -> Option<u32> {
    let head = d.submit_raw(vq, chain).expect("submit raw");
    d.wait_used(vq, head, Duration::from_secs(10))
        .expect("wait used")
}

/// A chain of `parts` (address, length, device-writable) linked from the driver's next head.
fn chain(d: &Driver, vq: u16, parts: &[(u64, u32, bool)]) -> Vec<RawDescriptor> {
    let head = d.raw_head(vq, parts.len()).expect("free descriptors");
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let last = i + 1 == parts.len();
            RawDescriptor {
                addr,
                len,
                flags: if last { 0 } else { F_NEXT } | if writable { F_WRITE } else { 0 },
                next: if last { 0 } else { head + i as u16 + 1 },
            }
        })
        .collect()
}

/// A virtio-scsi request header for `lun_field` and `cdb`.
fn scsi_header(lun_field: [u8; 8], cdb: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 51];
    h[..8].copy_from_slice(&lun_field);
    h[19..19 + cdb.len()].copy_from_slice(cdb);
    h
}

fn lun_field(target: u8, lun: u16) -> [u8; 8] {
    let level = 0x4000 | lun;
    [1, target, (level >> 8) as u8, level as u8, 0, 0, 0, 0]
}

#[test]
fn bad_guest_input_fails_only_that_request() {
    let mut b = start(&viscsi());
    let lun = b.target.lun_id(0);
    let socket = b.sockets.join("bad.sock");
    // The VM may use only LUN `lun`: the target's other LUN is hidden from it.
    create_vm(
        &b.host,
        &b.target,
        "vm-bad",
        "software",
        "scsi",
        &socket,
        &[lun],
    );
    let hidden = b.target.lun_id(1) as u16;
    let other_socket = b.sockets.join("other.sock");
    create_vm(
        &b.host,
        &b.target,
        "vm-other",
        "offload",
        "blk",
        &other_socket,
        &[lun],
    );
    let mut d = connect(&socket, DeviceKind::Scsi);
    let mut other = connect(&other_socket, DeviceKind::Blk);
    let lun = lun as u16;
    let vq = FIRST_REQUEST_VQ;
    let resp = d.alloc(108);
    let inquiry = scsi_header(lun_field(0, lun), &[0x12, 0, 0, 0, 36, 0]);
    let hdr = d.alloc(inquiry.len() as u32);
    d.write_guest(hdr, &inquiry);
    let data = d.alloc(4096);

    // A device-readable descriptor after a device-writable one: consumed, nothing written.
    let c = chain(&d, vq, &[(resp, 108, true), (hdr, 51, false)]);
    assert_eq!(raw(&mut d, vq, &c), Some(0), "readable after writable");
    // A descriptor outside guest memory.
    let c = chain(&d, vq, &[(1 << 40, 51, false), (resp, 108, true)]);
    assert_eq!(raw(&mut d, vq, &c), Some(0), "address outside guest memory");
    // A response buffer outside guest memory: nothing can be written.
    let c = chain(&d, vq, &[(hdr, 51, false), (1 << 40, 108, true)]);
    assert_eq!(
        raw(&mut d, vq, &c),
        Some(0),
        "response outside guest memory"
    );
    // No room for a response.
    let c = chain(&d, vq, &[(hdr, 51, false), (resp, 20, true)]);
    assert_eq!(raw(&mut d, vq, &c), Some(0), "response buffer too small");
    // A request header shorter than the virtio-scsi header: VIRTIO_SCSI_S_FAILURE.
    let c = chain(&d, vq, &[(hdr, 30, false), (resp, 108, true)]);
    assert!(raw(&mut d, vq, &c).is_some_and(|n| n >= 12));
    assert_eq!(d.read_guest(resp + 11, 1)[0], S_FAILURE, "short header");
    // Another target: VIRTIO_SCSI_S_BAD_TARGET.
    let other_target = scsi_header(lun_field(3, lun), &[0x12, 0, 0, 0, 36, 0]);
    d.write_guest(hdr, &other_target);
    let c = chain(
        &d,
        vq,
        &[(hdr, 51, false), (resp, 108, true), (data, 36, true)],
    );
    raw(&mut d, vq, &c).expect("used");
    assert_eq!(d.read_guest(resp + 11, 1)[0], S_BAD_TARGET, "other target");
    // Oversized: 40 MiB of Data-In (the bus takes at most 32 MiB): VIRTIO_SCSI_S_FAILURE.
    let big = d.alloc(40 << 20);
    d.write_guest(hdr, &scsi_header(lun_field(0, lun), &read10(0, 0xffff)));
    let c = chain(
        &d,
        vq,
        &[(hdr, 51, false), (resp, 108, true), (big, 40 << 20, true)],
    );
    raw(&mut d, vq, &c).expect("used");
    assert_eq!(
        d.read_guest(resp + 11, 1)[0],
        S_FAILURE,
        "oversized request"
    );

    // A hidden LUN: INQUIRY says "no logical unit" (peripheral qualifier 3), anything else
    // is CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    let inq = good(&mut d, hidden, &[0x12, 0, 0, 0, 36, 0], &[], 36);
    assert_eq!(inq[0], 0x7f);
    let r = scsi(&mut d, hidden, &read10(0, 1), &[], 512);
    assert_eq!((r.response, r.status), (S_OK, 2));
    assert_eq!((r.sense[2] & 0x0f, r.sense[12], r.sense[13]), (5, 0x25, 0));
    // REPORT LUNS lists only the VM's LUN.
    let report = good(
        &mut d,
        0,
        &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        &[],
        256,
    );
    assert_eq!(u32::from_be_bytes(report[..4].try_into().unwrap()), 8);
    // A CDB the LUN rejects: CHECK CONDITION from the target, passed through.
    let r = scsi(&mut d, lun, &[0xff, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!((r.response, r.status, r.sense[2] & 0x0f), (S_OK, 2, 5));

    // Malformed blk requests: a short header fails with IOERR; no status byte, nothing.
    let bvq = 0;
    let bresp = other.alloc(1);
    let bhdr = other.alloc(16);
    let c = chain(&other, bvq, &[(bhdr, 8, false), (bresp, 1, true)]);
    assert_eq!(raw(&mut other, bvq, &c), Some(1));
    assert_eq!(
        other.read_guest(bresp, 1)[0],
        BLK_S_IOERR,
        "short blk header"
    );
    let c = chain(&other, bvq, &[(bhdr, 16, false)]);
    assert_eq!(
        raw(&mut other, bvq, &c),
        Some(0),
        "blk request without status"
    );

    // Bad bus requests from the operator: one-line errors, nothing created.
    let portal = b.target.portal();
    let taken = socket.display().to_string();
    for (args, expect) in [
        (
            vec!["--frontend", "scsi", "--vhost-socket", taken.as_str()],
            "already used by VM vm-bad",
        ),
        (
            vec!["--frontend", "scsi", "--queues", "0"],
            "queues must be 1 to 16",
        ),
        (vec!["--frontend", "floppy"], "invalid value 'floppy'"),
        (vec!["--vhost-socket", "/tmp/x.sock"], "--frontend"),
    ] {
        let mut full = vec![
            "vm",
            "create",
            "vm-refused",
            "--portal",
            &portal,
            "--target",
            b.target.iqn(),
        ];
        full.extend(args.iter().copied());
        let out = b.host.cli(&full);
        assert!(!out.success(), "{args:?} accepted: {out}");
        assert!(out.stderr.contains(expect), "{args:?}: {out}");
    }
    let list = b.host.cli(&["vm", "list"]);
    assert!(!list.stdout.contains("vm-refused"), "{list}");

    // The buses still work, and the agent is up.
    let data = pattern(8192, 99);
    good(&mut d, lun, &write10(64, 16), &data, 0);
    let (status, back) = other.blk_request(BLK_IN, 64, &[], 8192).expect("blk read");
    assert_eq!(status, BLK_S_OK);
    assert!(back == data, "the other VM reads the first one's write");
    b.host.assert_alive();
    let list = b.host.cli(&["vm", "list"]);
    assert!(list.success() && list.stdout.contains("vm-other"), "{list}");
}

#[test]
fn control_queue_task_management_and_notifications() {
    let b = start(&viscsi());
    let lun = b.target.lun_id(0) as u16;
    let socket = b.sockets.join("ctl.sock");
    create_vm(
        &b.host,
        &b.target,
        "vm-ctl",
        "offload",
        "scsi",
        &socket,
        &[],
    );
    let mut d = connect(&socket, DeviceKind::Scsi);
    good(&mut d, lun, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    // LOGICAL UNIT RESET goes to the target (a UNIT ATTENTION follows), then the LUN works.
    assert_eq!(d.scsi_tmf(5, lun, 0).expect("LU reset"), S_OK);
    let r = d
        .scsi_command(lun, &[0x00, 0, 0, 0, 0, 0], &[], 0)
        .expect("TUR");
    assert_eq!(
        (r.status, r.sense.get(2).map(|k| k & 0x0f)),
        (2, Some(6)),
        "UNIT ATTENTION after the reset: {r:?}"
    );
    good(&mut d, lun, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    // ABORT TASK SET, ABORT TASK and QUERY TASK of a task that is not there.
    assert_eq!(d.scsi_tmf(1, lun, 0).expect("abort task set"), S_OK);
    assert_eq!(d.scsi_tmf(0, lun, 12345).expect("abort task"), S_OK);
    assert_eq!(d.scsi_tmf(6, lun, 12345).expect("query task"), S_OK);
    // I_T NEXUS RESET has no iSCSI counterpart: rejected. Unknown subtypes too.
    assert_eq!(
        d.scsi_tmf(4, lun, 0).expect("nexus reset"),
        S_FUNCTION_REJECTED
    );
    assert_eq!(
        d.scsi_tmf(99, lun, 0).expect("unknown"),
        S_FUNCTION_REJECTED
    );
    // Another target.
    let head = d.raw_head(CONTROL_VQ, 2).expect("free");
    let tmf_req = d.alloc(24);
    let mut req = [0u8; 24];
    req[4..8].copy_from_slice(&5u32.to_le_bytes());
    req[8..16].copy_from_slice(&lun_field(9, lun));
    d.write_guest(tmf_req, &req);
    let tmf_resp = d.alloc(1);
    let c = [
        RawDescriptor {
            addr: tmf_req,
            len: 24,
            flags: F_NEXT,
            next: head + 1,
        },
        RawDescriptor {
            addr: tmf_resp,
            len: 1,
            flags: F_WRITE,
            next: 0,
        },
    ];
    assert_eq!(raw(&mut d, CONTROL_VQ, &c), Some(1));
    assert_eq!(d.read_guest(tmf_resp, 1)[0], S_BAD_TARGET);
    // No asynchronous notifications are offered.
    assert_eq!(d.scsi_an_query(0xfe).expect("AN query"), (0, S_OK));
    d.post_event_buffers(4).expect("event buffers");
    assert!(d
        .poll_events(Duration::from_millis(200))
        .unwrap()
        .is_empty());
    good(&mut d, lun, &read10(0, 8), &[], 4096);
}

#[test]
fn dirty_log_and_vring_stop_for_migration() {
    let b = start(&viscsi());
    let lun = b.target.lun_id(0) as u16;
    let socket = b.sockets.join("mig.sock");
    create_vm(
        &b.host,
        &b.target,
        "vm-mig",
        "software",
        "scsi",
        &socket,
        &[],
    );
    let mut d = connect(&socket, DeviceKind::Scsi);
    good(&mut d, lun, &[0x00, 0, 0, 0, 0, 0], &[], 0);
    d.enable_dirty_log().expect("the bus offers dirty logging");
    let _ = d.dirty_pages();
    // A read into a fresh buffer: its pages (and the used ring) are reported dirty.
    let head = d.raw_head(FIRST_REQUEST_VQ, 3).expect("free");
    let hdr = d.alloc(51);
    d.write_guest(hdr, &scsi_header(lun_field(0, lun), &read10(0, 64)));
    let resp = d.alloc(108);
    let buf = d.alloc(32768 + 4096);
    let buf = (buf + 4095) & !4095;
    let c = [
        RawDescriptor {
            addr: hdr,
            len: 51,
            flags: F_NEXT,
            next: head + 1,
        },
        RawDescriptor {
            addr: resp,
            len: 108,
            flags: F_NEXT | F_WRITE,
            next: head + 2,
        },
        RawDescriptor {
            addr: buf,
            len: 32768,
            flags: F_WRITE,
            next: 0,
        },
    ];
    assert!(raw(&mut d, FIRST_REQUEST_VQ, &c).is_some());
    let dirty = d.dirty_pages();
    for page in buf / 4096..(buf + 32768) / 4096 {
        assert!(
            dirty.contains(&page),
            "page {page} of the read buffer not logged: {dirty:?}"
        );
    }
    assert!(dirty.contains(&(resp / 4096)), "response page not logged");
    // Nothing the device did not write is logged.
    assert!(!dirty.contains(&(hdr / 4096)) || hdr / 4096 == resp / 4096);

    // Vring stop with 40 writes in flight, on a fresh connection (its ring starts at 0):
    // GET_VRING_BASE answers with the number of requests the device took, and by then every
    // one of them has completed and is in the used ring; nothing completes afterwards.
    drop(d);
    let mut d = connect(&socket, DeviceKind::Scsi);
    // Three descriptors each: 40 fill most of the 128-entry ring.
    for id in 0..40u64 {
        d.submit_scsi(0, id, lun, &write10(id as u32 * 64, 64), 32768, 0)
            .expect("submit");
    }
    // Once the first has completed, the back end has taken the batch (it takes what the kick
    // made available); the rest are in flight when the ring stops.
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.is_empty() && Instant::now() < deadline {
        done.extend(d.reap(Duration::from_millis(100)).expect("reap"));
    }
    let before_stop = done.len();
    let base = d.stop_queue(FIRST_REQUEST_VQ).expect("GET_VRING_BASE");
    assert!(base > 0 && base <= 40, "base {base}");
    // The used ring is read directly (the call eventfd is gone once the ring stopped).
    done.extend(d.reap(Duration::ZERO).expect("reap"));
    assert_eq!(
        done.len(),
        usize::from(base),
        "every request taken had completed when the ring stopped ({before_stop} before the stop)"
    );
    assert!(done.iter().all(|c| c.response == S_OK && c.status == 0));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        d.reap(Duration::ZERO).expect("reap").is_empty(),
        "completion after the stop"
    );
}

#[test]
fn agent_restart_brings_the_socket_back() {
    let mut b = start(&viscsi());
    let lun = b.target.lun_id(0) as u16;
    let socket = b.sockets.join("restart.sock");
    create_vm(&b.host, &b.target, "vm-r", "offload", "scsi", &socket, &[]);
    let data = pattern(65536, 5);
    {
        let mut d = connect(&socket, DeviceKind::Scsi);
        good(&mut d, lun, &write10(4096, 128), &data, 0);
    }
    b.host.kill_and_restart();
    let mut d = connect(&socket, DeviceKind::Scsi);
    let back = good(&mut d, lun, &read10(4096, 128), &[], 65536);
    assert!(back == data, "data after the agent restart");
    b.host.stop_and_restart();
    let mut d = connect(&socket, DeviceKind::Scsi);
    let back = good(&mut d, lun, &read10(4096, 128), &[], 65536);
    assert!(back == data, "data after the second restart");
    // Deleting the VM removes its socket.
    drop(d);
    let out = b.host.cli(&["vm", "delete", "vm-r"]);
    assert!(out.success(), "{out}");
    assert!(!socket.exists(), "socket left behind after delete");
}

/// PERSISTENT RESERVE OUT with `action`, reservation key `key`, service action key `sa_key`,
/// type `ty` (1 = Write Exclusive).
fn pr_out(d: &mut Driver, lun: u16, action: u8, ty: u8, key: u64, sa_key: u64) -> ScsiReply {
    let mut params = [0u8; 24];
    params[..8].copy_from_slice(&key.to_be_bytes());
    params[8..16].copy_from_slice(&sa_key.to_be_bytes());
    scsi(
        d,
        lun,
        &[0x5f, action, ty, 0, 0, 0, 0, 0, 24, 0],
        &params,
        0,
    )
}

#[test]
fn a_parameter_change_reaches_the_event_queue() {
    let b = start(&viscsi());
    let lun = b.target.lun_id(0) as u16;
    let (sa, sb) = (b.sockets.join("pa.sock"), b.sockets.join("pb.sock"));
    create_vm(&b.host, &b.target, "vm-pa", "offload", "scsi", &sa, &[]);
    create_vm(&b.host, &b.target, "vm-pb", "software", "scsi", &sb, &[]);
    let mut a = connect(&sa, DeviceKind::Scsi);
    let mut p = connect(&sb, DeviceKind::Scsi);
    p.post_event_buffers(4).expect("event buffers");
    good(&mut p, lun, &[0, 0, 0, 0, 0, 0], &[], 0);
    // Register both, reserve with A, and let A preempt B: B's nexus gets a UNIT ATTENTION,
    // REGISTRATIONS PREEMPTED (2A/05), on its next command.
    for (d, key) in [(&mut a, 0xaa), (&mut p, 0xbb)] {
        let r = pr_out(d, lun, 0, 0, 0, key);
        assert_eq!(r.status, 0, "REGISTER: {r:?}");
    }
    assert_eq!(pr_out(&mut a, lun, 1, 1, 0xaa, 0).status, 0, "RESERVE");
    assert!(
        p.poll_events(Duration::from_millis(100))
            .unwrap()
            .is_empty(),
        "no event before a change"
    );
    assert_eq!(pr_out(&mut a, lun, 4, 1, 0xaa, 0xbb).status, 0, "PREEMPT");
    let r = p
        .scsi_command(lun, &[0, 0, 0, 0, 0, 0], &[], 0)
        .expect("TUR");
    assert_eq!(
        (r.status, r.sense[2] & 0x0f, r.sense[12], r.sense[13]),
        (2, 6, 0x2a, 0x05),
        "the preempted nexus sees the UNIT ATTENTION"
    );
    let events = p.poll_events(Duration::from_secs(5)).expect("events");
    let event = events.first().expect("a VIRTIO_SCSI_T_PARAM_CHANGE event");
    assert_eq!(
        u32::from_le_bytes(event[0..4].try_into().unwrap()),
        3,
        "{event:02x?}"
    );
    assert_eq!(&event[4..8], &[1, 0, 0x40 | (lun >> 8) as u8, lun as u8]);
    assert_eq!(
        u32::from_le_bytes(event[12..16].try_into().unwrap()),
        0x052a,
        "reason: ASC 0x2a, ASCQ 0x05"
    );
    // Clean up the reservation for other users of the LUN.
    assert_eq!(pr_out(&mut a, lun, 3, 0, 0xaa, 0).status, 0, "CLEAR");
}
