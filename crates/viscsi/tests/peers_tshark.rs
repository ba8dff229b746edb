//! Wire-level check of `viscsi target` with Wireshark's iSCSI dissector (`tshark`).
//!
//! Captures the target's port on `lo` while libiscsi exercises it — a discovery session
//! (`iscsi-ls -s`), the iSCSI family of `iscsi-test-cu` (protocol edge cases), and QEMU's driver
//! with `header-digest=crc32c` (libiscsi's own tools always offer None first) reading 32 MiB —
//! then decodes every PDU and requires: no malformed iSCSI PDU, no bad header or data digest,
//! and header digests actually present. Needs root for the capture.

use std::time::Duration;

use peer_harness::target::MIB;
use peer_harness::testcu::run_testcu;
use peer_harness::tshark::{analyze, Capture};
use peer_harness::{run_tool, tools, RunningTarget, TargetConfig, TargetKind};

#[test]
fn captured_pdus_decode_cleanly_with_good_digests() {
    tools::require_qemu_iscsi_driver();
    let kind = TargetKind::from_env(env!("CARGO_BIN_EXE_viscsi"));
    let iqn = "iqn.2024-01.test.viscsi:tshark";
    let mut target = RunningTarget::start(&kind, TargetConfig::new(iqn).mem_lun(64 * MIB));
    let pcap = target.dir().join("capture.pcapng");
    let capture = Capture::start(target.port(), &pcap);

    let ls = run_tool(
        "iscsi-ls",
        &["-s", &target.discovery_url()],
        Duration::from_secs(30),
    );
    ls.assert_success();
    let (testcu, report) = run_testcu("iSCSI", &target.url(0), None, Duration::from_secs(180));
    println!("iSCSI family:\n{}", report.table());
    assert!(!testcu.timed_out, "iscsi-test-cu timed out: {testcu}");
    let image_opts = format!(
        "driver=iscsi,transport=tcp,portal={},target={iqn},lun={},header-digest=crc32c",
        target.portal(),
        target.lun_id(0)
    );
    let copy = target.dir().join("digest-read.raw");
    let read = run_tool(
        "qemu-img",
        &[
            "dd",
            "--image-opts",
            "-O",
            "raw",
            "bs=1M",
            "count=32",
            &format!("if={image_opts}"),
            &format!("of={}", copy.display()),
        ],
        Duration::from_secs(60),
    );
    read.assert_success();
    let pcap = capture.stop();
    target.assert_alive();

    let analysis = analyze(&pcap, target.port());
    println!(
        "capture of {} on port {}:\n{analysis}",
        kind.name(),
        target.port()
    );
    assert!(analysis.iscsi_pdus > 100, "too few iSCSI PDUs decoded");
    for (opcode, what) in [
        ("0x03", "Login Request"),
        ("0x23", "Login Response"),
        ("0x04", "Text Request (SendTargets)"),
        ("0x01", "SCSI Command"),
        ("0x25", "SCSI Data-In"),
        ("0x21", "SCSI Response"),
    ] {
        assert!(analysis.opcode(opcode) > 0, "no {what} ({opcode}) decoded");
    }
    assert_eq!(
        analysis.malformed_iscsi(),
        0,
        "malformed iSCSI PDUs (inspect with tshark -r {} -d tcp.port=={},iscsi -Y _ws.malformed)",
        pcap.display(),
        target.port()
    );
    assert_eq!(analysis.header_digests_bad, 0, "bad header digests");
    assert_eq!(analysis.data_digests_bad, 0, "bad data digests");
    assert!(
        analysis.header_digests_good > 0,
        "no header digest on the wire: the CRC32C login did not negotiate digests"
    );
    target.shutdown_cleanly();
}
