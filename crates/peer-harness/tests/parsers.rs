//! The output parsers against real tool output. The iscsi-test-cu log is a verbose
//! `iscsi-test-cu -d -t ALL URL URL` run against tgtd 1.0.85 (libiscsi-bin 1.19.0), assertion
//! lists shortened; CUnit's own summary of that run says 230 ran, 221 passed (skips
//! included), 9 failed.

use peer_harness::testcu::{Outcome, TestcuReport};

const TGTD_LOG: &str = include_str!("fixtures/testcu_tgtd_all.log");

#[test]
fn tgtd_log_classifies_162_pass_9_fail_59_skip() {
    let report = TestcuReport::parse(TGTD_LOG);
    let counts = report.counts();
    println!("{}", report.table());
    assert_eq!(counts.total(), 230);
    assert_eq!(counts.pass, 162);
    assert_eq!(counts.fail, 9);
    assert_eq!(counts.skip, 59);
    assert_eq!(counts.unfinished, 0);
    let cunit = report.cunit.expect("CUnit run summary");
    assert_eq!((cunit.ran, cunit.passed, cunit.failed), (230, 221, 9));
    assert_eq!(
        counts.pass + counts.skip,
        cunit.passed,
        "CUnit counts skips as passes"
    );
    assert_eq!(report.suites().len(), 51);
}

#[test]
fn interleaved_failure_message_does_not_fail_the_passed_test() {
    let report = TestcuReport::parse(TGTD_LOG);
    let residuals = report
        .tests
        .iter()
        .find(|t| t.suite == "ModeSense6" && t.name == "Residuals")
        .expect("ModeSense6.Residuals");
    assert_eq!(residuals.outcome, Outcome::Pass);
    let range = report
        .tests
        .iter()
        .find(|t| t.suite == "PrinServiceactionRange" && t.name == "Range")
        .expect("PrinServiceactionRange.Range");
    assert_eq!(range.outcome, Outcome::Fail);
    assert!(range.messages.iter().any(|m| m.contains("CU_ASSERT_EQUAL")));
}

#[test]
fn truncated_output_marks_last_test_unfinished() {
    let text = "Suite: Read10\n  Test: Simple ...passed\n  Test: BeyondEol ...\n";
    let report = TestcuReport::parse(text);
    assert_eq!(report.tests.len(), 2);
    assert_eq!(report.tests[0].outcome, Outcome::Pass);
    assert_eq!(report.tests[1].outcome, Outcome::Unfinished);
    assert_eq!(report.problems().len(), 1);
}

#[test]
fn skip_message_then_passed_on_its_own_line_is_a_skip() {
    let text = "Suite: CompareAndWrite\n  Test: Simple ...    [SKIPPED] not implemented.\n    [SKIPPED] not implemented.\npassed\n";
    let report = TestcuReport::parse(text);
    assert_eq!(report.tests[0].outcome, Outcome::Skip);
}

#[test]
fn iscsi_perf_final_average_is_parsed() {
    let text = "00:00:01 - lba 364879, iops current 33565 (131 MB/s), iops average 33565 (131 MB/s), in_flight 32, busy 0        \riops average 35543 (138 MB/s)             \n\nfinished.\n";
    let result = peer_harness::parse_iscsi_perf(text).expect("parsed");
    assert_eq!(result.iops, 35543);
    assert_eq!(result.mib_per_s, 138);
}
