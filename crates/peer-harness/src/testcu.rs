//! Running libiscsi's conformance suite `iscsi-test-cu` and parsing its verbose output.
//!
//! The verbose (default) mode prints `Suite: NAME`, then per test `  Test: NAME ...` followed by
//! the outcome, either on the same line or after messages on later lines:
//!
//! ```text
//!   Test: Standard ...passed
//!   Test: Simple ...    [SKIPPED] COMPAREANDWRITE is not implemented.
//!     [SKIPPED] COMPAREANDWRITE is not implemented.
//! passed
//!   Test: Range ...    [FAILED] PRIN/SA=0x3 failed: SENSE KEY:ILLEGAL_REQUEST(5) ...
//! FAILED
//!     1. test_prin_serviceaction_range.c:50  - CU_ASSERT_EQUAL(ret,0)
//! ```
//!
//! CUnit counts a skipped test as passed, so a test is classified here as:
//! * **fail** if its outcome token is `FAILED`;
//! * **skip** if its outcome is `passed` and a `[SKIPPED]` message came before the outcome;
//! * **pass** if its outcome is `passed` otherwise;
//! * **unfinished** if the output ends (tool crash, timeout) or the next test starts before any
//!   outcome — counted as a failure by the tests.
//!
//! The outcome token is the first `passed` or `FAILED` at the start of the text after `...` or
//! at the start of a later line. Bracketed `[FAILED] …` messages are not outcomes: stdout and
//! stderr interleave, so a message printed by the next test's setup can follow `passed` on the
//! same line (`Test: Residuals ...passed    [FAILED] PRIN command …`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use crate::process::{run_with_timeout, CommandOutput};
use crate::tools::require_tool;

/// Outcome of one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Passed and did not skip.
    Pass,
    /// Printed `FAILED`.
    Fail,
    /// Passed after printing `[SKIPPED]`.
    Skip,
    /// No outcome was printed.
    Unfinished,
}

/// One test's result and the messages it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// Suite name, e.g. `Read10`.
    pub suite: String,
    /// Test name within the suite, e.g. `Simple`.
    pub name: String,
    /// Classification.
    pub outcome: Outcome,
    /// Messages and assertion failures printed for it.
    pub messages: Vec<String>,
}

/// CUnit's own `Run Summary` line for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CunitSummary {
    /// Tests run.
    pub ran: u32,
    /// Passed, skips included.
    pub passed: u32,
    /// Failed.
    pub failed: u32,
}

/// Counts per outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Passed.
    pub pass: u32,
    /// Failed.
    pub fail: u32,
    /// Skipped.
    pub skip: u32,
    /// Without outcome.
    pub unfinished: u32,
}

impl Counts {
    /// All tests.
    pub fn total(&self) -> u32 {
        self.pass + self.fail + self.skip + self.unfinished
    }

    fn add(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Pass => self.pass += 1,
            Outcome::Fail => self.fail += 1,
            Outcome::Skip => self.skip += 1,
            Outcome::Unfinished => self.unfinished += 1,
        }
    }
}

/// Parsed output of one `iscsi-test-cu` run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestcuReport {
    /// Tests in output order.
    pub tests: Vec<TestResult>,
    /// CUnit's summary, if the run got that far.
    pub cunit: Option<CunitSummary>,
}

/// Parser state for the test whose outcome is still open.
struct Open {
    result: TestResult,
    skipped: bool,
    decided: bool,
}

impl TestcuReport {
    /// Parses verbose `iscsi-test-cu` output (stdout and stderr, in any interleaving).
    pub fn parse(text: &str) -> TestcuReport {
        let mut report = TestcuReport::default();
        let mut suite = String::new();
        let mut open: Option<Open> = None;
        let mut lines = text.lines();
        while let Some(raw) = lines.next() {
            let line = raw.trim_end();
            if let Some(name) = line.strip_prefix("Suite: ") {
                report.close(open.take());
                suite = name.trim().to_string();
                continue;
            }
            if let Some(rest) = line.strip_prefix("  Test: ") {
                report.close(open.take());
                let (name, after) = match rest.split_once(" ...") {
                    Some((name, after)) => (name.trim(), after),
                    None => (rest.trim(), ""),
                };
                let mut test = Open {
                    result: TestResult {
                        suite: suite.clone(),
                        name: name.to_string(),
                        outcome: Outcome::Unfinished,
                        messages: Vec::new(),
                    },
                    skipped: false,
                    decided: false,
                };
                test.feed(after);
                open = Some(test);
                continue;
            }
            if line.starts_with("Run Summary:") {
                report.close(open.take());
                report.cunit = parse_summary(&mut lines);
                continue;
            }
            if let Some(test) = open.as_mut() {
                test.feed(line);
            }
        }
        report.close(open.take());
        report
    }

    fn close(&mut self, open: Option<Open>) {
        if let Some(open) = open {
            self.tests.push(open.result);
        }
    }

    /// Totals.
    pub fn counts(&self) -> Counts {
        let mut counts = Counts::default();
        for test in &self.tests {
            counts.add(test.outcome);
        }
        counts
    }

    /// Totals per suite, in output order of first appearance (map keyed by suite name).
    pub fn suites(&self) -> Vec<(String, Counts)> {
        let mut order: Vec<String> = Vec::new();
        let mut map: BTreeMap<String, Counts> = BTreeMap::new();
        for test in &self.tests {
            if !map.contains_key(&test.suite) {
                order.push(test.suite.clone());
            }
            map.entry(test.suite.clone()).or_default().add(test.outcome);
        }
        order
            .into_iter()
            .map(|s| {
                let c = map[&s];
                (s, c)
            })
            .collect()
    }

    /// Tests that failed or did not finish.
    pub fn problems(&self) -> Vec<&TestResult> {
        self.tests
            .iter()
            .filter(|t| matches!(t.outcome, Outcome::Fail | Outcome::Unfinished))
            .collect()
    }

    /// A per-suite table with totals, the failed tests of each suite and their messages.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<28} {:>5} {:>5} {:>5} {:>5} {:>5}  failed/unfinished",
            "suite", "tests", "pass", "fail", "skip", "unfin"
        );
        for (suite, c) in self.suites() {
            let bad: Vec<&str> = self
                .tests
                .iter()
                .filter(|t| {
                    t.suite == suite && matches!(t.outcome, Outcome::Fail | Outcome::Unfinished)
                })
                .map(|t| t.name.as_str())
                .collect();
            let _ = writeln!(
                out,
                "{suite:<28} {:>5} {:>5} {:>5} {:>5} {:>5}  {}",
                c.total(),
                c.pass,
                c.fail,
                c.skip,
                c.unfinished,
                bad.join(" ")
            );
        }
        let c = self.counts();
        let _ = writeln!(
            out,
            "{:<28} {:>5} {:>5} {:>5} {:>5} {:>5}",
            "TOTAL",
            c.total(),
            c.pass,
            c.fail,
            c.skip,
            c.unfinished
        );
        if let Some(s) = self.cunit {
            let _ = writeln!(
                out,
                "CUnit summary: ran {}, passed {} (skips included), failed {}",
                s.ran, s.passed, s.failed
            );
        }
        for test in self.problems() {
            let _ = writeln!(out, "{:?}: {}.{}", test.outcome, test.suite, test.name);
            for message in test.messages.iter().take(5) {
                let _ = writeln!(out, "    {message}");
            }
        }
        out
    }
}

impl Open {
    fn feed(&mut self, text: &str) {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return;
        }
        if self.decided {
            // Assertion details after FAILED belong to this test; anything else is noise.
            if self.result.outcome == Outcome::Fail {
                self.result.messages.push(trimmed.to_string());
            }
            return;
        }
        if let Some(after) = trimmed.strip_prefix("passed") {
            self.decided = true;
            self.result.outcome = if self.skipped {
                Outcome::Skip
            } else {
                Outcome::Pass
            };
            let _ = after;
            return;
        }
        if trimmed.starts_with("FAILED") {
            self.decided = true;
            self.result.outcome = Outcome::Fail;
            return;
        }
        if trimmed.contains("[SKIPPED]") {
            self.skipped = true;
        }
        self.result.messages.push(trimmed.to_string());
    }
}

fn parse_summary<'a>(lines: &mut impl Iterator<Item = &'a str>) -> Option<CunitSummary> {
    for line in lines.by_ref().take(4) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first() == Some(&"tests") && fields.len() >= 5 {
            return Some(CunitSummary {
                ran: fields[2].parse().ok()?,
                passed: fields[3].parse().ok()?,
                failed: fields[4].parse().ok()?,
            });
        }
    }
    None
}

/// Runs `iscsi-test-cu -d -t FILTER URL [URL2]` (destructive tests allowed) with a timeout.
///
/// With a second URL the MultipathIO suite runs; iscsi-test-cu logs in there with its second
/// initiator name (`-I`, default `…:iscsi-test-2`), so the target sees two I_T nexuses.
pub fn run_testcu(
    filter: &str,
    url: &str,
    multipath_url: Option<&str>,
    timeout: Duration,
) -> (CommandOutput, TestcuReport) {
    let tool = require_tool("iscsi-test-cu");
    // One stream, so that messages stay next to the outcome lines they belong to.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "exec \"$0\" \"$@\" 2>&1"])
        .arg(tool)
        .args(["-d", "-t", filter, url]);
    if let Some(second) = multipath_url {
        cmd.arg(second);
    }
    let output = run_with_timeout(&mut cmd, timeout);
    let report = TestcuReport::parse(&output.combined());
    (output, report)
}
