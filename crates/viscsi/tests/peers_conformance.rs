//! Conformance of `viscsi target` with libiscsi's SCSI/iSCSI test suite, `iscsi-test-cu`.
//!
//! Runs every family (`-t ALL`, destructive tests allowed) against a 256 MiB memory LUN, with a
//! second URL so the MultipathIO suite runs too (iscsi-test-cu logs in there with its second
//! initiator name, `-I`). Passes only with zero failures, at least as many passes as tgtd's
//! baseline (162 of 230) and fewer skips than tgtd (59).
//!
//! `VISCSI_TEST_TARGET=tgtd` runs it against tgtd instead (expect 162 pass / 9 fail / 59 skip).

use std::time::Duration;

use peer_harness::target::MIB;
use peer_harness::testcu::run_testcu;
use peer_harness::{run_tool, RunningTarget, TargetConfig, TargetKind};

/// tgtd 1.0.85's result on this suite: the bar to meet.
const TGTD_PASSES: u32 = 162;
const TGTD_SKIPS: u32 = 59;

/// Number of tests in the ALL family, from `iscsi-test-cu --list` (`ALL.Suite.Test` lines).
fn listed_test_count() -> u32 {
    let out = run_tool("iscsi-test-cu", &["--list"], Duration::from_secs(30));
    out.stdout
        .lines()
        .filter(|l| l.starts_with("ALL.") && l.trim().split('.').count() == 3)
        .count() as u32
}

#[test]
fn iscsi_test_cu_all_families_pass() {
    let kind = TargetKind::from_env(env!("CARGO_BIN_EXE_viscsi"));
    let mut target = RunningTarget::start(
        &kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:conformance").mem_lun(256 * MIB),
    );
    let listed = listed_test_count();
    let url = target.url(0);
    let (output, report) = run_testcu("ALL", &url, Some(&url), Duration::from_secs(600));
    let counts = report.counts();
    println!(
        "iscsi-test-cu -d -t ALL against {} in {:.1} s:\n{}",
        kind.name(),
        output.elapsed.as_secs_f64(),
        report.table()
    );
    println!(
        "{} passed, {} failed, {} skipped, {} unfinished (of {listed} listed)",
        counts.pass, counts.fail, counts.skip, counts.unfinished
    );
    assert!(!output.timed_out, "iscsi-test-cu timed out: {output}");
    assert!(
        output.signal().is_none(),
        "iscsi-test-cu was killed by a signal: {output}"
    );
    target.assert_alive();
    let problems: Vec<String> = report
        .problems()
        .iter()
        .map(|t| format!("{}.{} ({:?})", t.suite, t.name, t.outcome))
        .collect();
    assert!(
        problems.is_empty(),
        "{} conformance failures (details in the table above): {}",
        problems.len(),
        problems.join(", ")
    );
    assert_eq!(
        counts.total(),
        listed,
        "not every listed test ran (tool crash?)"
    );
    assert!(
        counts.pass >= TGTD_PASSES,
        "only {} tests passed, tgtd passes {TGTD_PASSES}",
        counts.pass
    );
    assert!(
        counts.skip < TGTD_SKIPS,
        "{} tests skipped, tgtd skips {TGTD_SKIPS}",
        counts.skip
    );
    target.shutdown_cleanly();
}
