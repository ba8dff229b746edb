//! `viscsi target` seen through libiscsi's command-line tools (package libiscsi-bin):
//! discovery and LUN listing (`iscsi-ls -s`), INQUIRY and VPD pages (`iscsi-inq`), capacity
//! (`iscsi-readcapacity16`) and a short load (`iscsi-perf`). CHAP variants live in
//! `peers_chap.rs`. `VISCSI_TEST_TARGET=tgtd` runs the same checks against tgtd.

use std::time::Duration;

use peer_harness::target::MIB;
use peer_harness::{parse_iscsi_perf, run_tool, RunningTarget, TargetConfig, TargetKind};

const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

fn start(config: TargetConfig) -> RunningTarget {
    RunningTarget::start(&TargetKind::from_env(env!("CARGO_BIN_EXE_viscsi")), config)
}

#[test]
fn iscsi_ls_discovers_target_and_lists_luns() {
    let iqn = "iqn.2024-01.test.viscsi:ls";
    let mut target = start(TargetConfig::new(iqn).mem_lun(64 * MIB).mem_lun(32 * MIB));
    let out = run_tool("iscsi-ls", &["-s", &target.discovery_url()], TOOL_TIMEOUT);
    out.assert_success();
    println!("{}", out.stdout);
    let target_line = format!("Target:{iqn} Portal:{},", target.portal());
    assert!(
        out.stdout.contains(&target_line),
        "no `{target_line}` in:\n{out}"
    );
    for index in 0..2 {
        let lun_line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("Lun:{} ", target.lun_id(index))))
            .unwrap_or_else(|| panic!("LUN {} not listed:\n{out}", target.lun_id(index)));
        assert!(lun_line.contains("DIRECT_ACCESS"), "{lun_line}");
    }
    target.assert_alive();
    target.shutdown_cleanly();
}

#[test]
fn iscsi_inq_standard_inquiry_and_vpd_pages() {
    let mut target = start(TargetConfig::new("iqn.2024-01.test.viscsi:inq").mem_lun(64 * MIB));
    let url = target.url(0);
    let standard = run_tool("iscsi-inq", &[&url], TOOL_TIMEOUT);
    standard.assert_success();
    println!("{}", standard.stdout);
    for expected in [
        "Peripheral Qualifier:CONNECTED",
        "Peripheral Device Type:DIRECT_ACCESS",
        "Vendor:",
        "Product:",
    ] {
        assert!(
            standard.stdout.contains(expected),
            "no `{expected}`: {standard}"
        );
    }
    // Page codes are decimal for iscsi-inq's option parser: 0 = supported pages, 128 = 0x80
    // unit serial number, 131 = 0x83 device identification.
    let supported = run_tool("iscsi-inq", &["-e", "1", "-c", "0", &url], TOOL_TIMEOUT);
    supported.assert_success();
    for page in ["Page:0x80", "Page:0x83"] {
        assert!(
            supported.stdout.contains(page),
            "{page} not supported: {supported}"
        );
    }
    let serial = run_tool("iscsi-inq", &["-e", "1", "-c", "128", &url], TOOL_TIMEOUT);
    serial.assert_success();
    let serial_value = serial
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Unit Serial Number:"))
        .unwrap_or_else(|| panic!("no unit serial number: {serial}"));
    assert!(
        !serial_value.trim_matches(['[', ']', ' ']).is_empty(),
        "empty unit serial number: {serial}"
    );
    let ids = run_tool("iscsi-inq", &["-e", "1", "-c", "131", &url], TOOL_TIMEOUT);
    ids.assert_success();
    println!("{}", ids.stdout);
    assert!(
        ids.stdout.contains("Designator") || ids.stdout.contains("DESIGNATOR"),
        "no designation descriptor in VPD 0x83: {ids}"
    );
    target.assert_alive();
    target.shutdown_cleanly();
}

#[test]
fn iscsi_readcapacity16_reports_configured_size() {
    let size = 96 * MIB;
    let mut target = start(TargetConfig::new("iqn.2024-01.test.viscsi:readcap").mem_lun(size));
    let out = run_tool("iscsi-readcapacity16", &[&target.url(0)], TOOL_TIMEOUT);
    out.assert_success();
    println!("{}", out.stdout);
    let field = |name: &str| -> u64 {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{name}` in {out}"))
    };
    let last_lba = field("RETURNED LOGICAL BLOCK ADDRESS:");
    let block = field("LOGICAL BLOCK LENGTH IN BYTES:");
    assert_eq!(field("Total size:"), size);
    assert_eq!((last_lba + 1) * block, size);
    target.assert_alive();
    target.shutdown_cleanly();
}

#[test]
fn iscsi_perf_random_reads_for_two_seconds() {
    let mut target = start(TargetConfig::new("iqn.2024-01.test.viscsi:perf").mem_lun(256 * MIB));
    let url = target.url(0);
    let out = run_tool(
        "iscsi-perf",
        &["-t", "2", "-m", "32", "-b", "8", "-r", &url],
        Duration::from_secs(30),
    );
    assert!(!out.timed_out, "iscsi-perf did not stop after 2 s: {out}");
    assert_eq!(out.code(), Some(0), "iscsi-perf failed: {out}");
    let result = parse_iscsi_perf(&out.stdout)
        .unwrap_or_else(|| panic!("no `iops average` in iscsi-perf output: {out}"));
    println!(
        "iscsi-perf 4 KiB random read QD32 against {}: {} IOPS, {} MiB/s",
        target.kind().name(),
        result.iops,
        result.mib_per_s
    );
    assert!(result.iops > 0, "zero IOPS: {out}");
    target.assert_alive();
    target.shutdown_cleanly();
}
