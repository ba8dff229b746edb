//! The seeds do what their names say: logins reach full feature phase, commands execute.

use super::*;

fn run_login(input: &[u8]) -> Drive {
    let (&flags, stream) = input.split_first().unwrap();
    let mut drive = Drive::new(flags & 0x20 != 0, DriveOptions::from_flags(flags));
    drive.feed(stream);
    drive.finish();
    drive
}

fn login_seed(name: &str) -> Vec<u8> {
    seeds::all()
        .into_iter()
        .find(|s| s.target == "target_login" && s.name == name)
        .unwrap_or_else(|| panic!("no seed {name}"))
        .bytes
}

#[test]
fn canned_logins_reach_full_feature_phase() {
    for variant in 0..4 {
        let mut drive = Drive::new(false, DriveOptions::from_flags(0));
        drive.feed(&seeds::canned_login(variant));
        assert!(drive.full_feature, "variant {variant}");
        assert!(!drive.closed, "variant {variant}");
    }
}

#[test]
fn plain_login_seeds_reach_full_feature_and_execute() {
    for name in [
        "libiscsi-login-read-logout",
        "digests",
        "skip-security",
        "continued-text",
        "security-then-stay",
    ] {
        let drive = run_login(&login_seed(name));
        assert!(drive.full_feature, "{name}: no full feature phase");
        if name == "libiscsi-login-read-logout" || name == "digests" {
            assert_eq!(
                drive.executed, 3,
                "{name}: READ, WRITE with immediate data, WRITE with R2T"
            );
            assert!(drive.closed, "{name}: logout closes");
        }
    }
}

#[test]
fn failing_login_seeds_close_the_connection() {
    for name in [
        "unknown-target",
        "restricted-target",
        "missing-initiator-name",
        "bad-version-and-stage",
        "non-login-first",
    ] {
        let drive = run_login(&login_seed(name));
        assert!(!drive.full_feature && drive.closed, "{name}");
    }
}

#[test]
fn chap_seeds_reach_full_feature_phase() {
    for name in ["chap-md5", "chap-sha256-first-pdu", "chap-mutual"] {
        let drive = run_login(&login_seed(name));
        assert!(
            drive.full_feature,
            "{name}: CHAP login did not reach full feature phase"
        );
    }
    let drive = run_login(&login_seed("chap-wrong-response"));
    assert!(!drive.full_feature && drive.closed);
}

#[test]
fn every_seed_runs() {
    let all = seeds::all();
    for s in &all {
        assert!(
            s.bytes.len() < 4096,
            "{}/{} is {} bytes",
            s.target,
            s.name,
            s.bytes.len()
        );
        crate::run(s.target, &s.bytes).expect("known target");
    }
}

fn run_full_feature(input: &[u8]) -> Drive {
    let (&flags, stream) = input.split_first().unwrap();
    let mut drive = Drive::new(false, DriveOptions::from_flags(flags));
    drive.feed(&seeds::canned_login(flags >> 6));
    assert!(drive.full_feature);
    drive.feed(stream);
    drive.finish();
    drive
}

#[test]
fn full_feature_io_seeds_execute_without_rejects() {
    let all = seeds::all();
    for name in [
        "read10",
        "read16-underflow",
        "write-immediate",
        "write-r2t",
        "write-immediate-then-r2t",
        "write-unsolicited",
        "write-multiple-r2t",
        "read-split-small-mrdsl",
        "extended-cdb",
    ] {
        let s = all
            .iter()
            .find(|s| s.target == "target_full_feature" && s.name == name)
            .unwrap();
        let drive = run_full_feature(&s.bytes);
        assert_eq!((drive.executed, drive.rejects), (1, 0), "{name}");
    }
}

// ---- the initiator targets ----

fn seed_of(target: &str, name: &str) -> Vec<u8> {
    seeds::all()
        .into_iter()
        .find(|s| s.target == target && s.name == name)
        .unwrap_or_else(|| panic!("no seed {target}/{name}"))
        .bytes
}

#[test]
fn initiator_login_seeds_end_as_named() {
    use crate::initiator::{run_login, LoginOutcome};
    use iscsi_proto::chap::AuthError;
    use iscsi_proto::initiator::LoginError;

    for name in [
        "none",
        "continued-response",
        "chap",
        "chap-mutual",
        "chap-md5",
        "discovery",
        "discovery-chap",
        "existing-session",
        "digests-and-small-limits",
        "chap-mutual-digests",
    ] {
        let outcome = run_login(&seed_of("initiator_login", name));
        assert!(
            matches!(outcome, LoginOutcome::Done(_)),
            "{name}: {outcome:?}"
        );
    }
    let done = |name| match run_login(&seed_of("initiator_login", name)) {
        LoginOutcome::Done(r) => r,
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(
        done("chap-mutual").authenticated_target.as_deref(),
        Some(CHAP_TARGET_USER)
    );
    let p = done("digests-and-small-limits").params;
    assert!(p.header_digest && p.data_digest && !p.initial_r2t);
    assert_eq!(done("existing-session").tsih, 1);

    let failed = |name| match run_login(&seed_of("initiator_login", name)) {
        LoginOutcome::Failed(e) => e,
        other => panic!("{name}: {other:?}"),
    };
    assert!(matches!(
        failed("chap-mutual-bad-proof"),
        LoginError::Auth(AuthError::BadResponse)
    ));
    for name in [
        "chap-wrong-secret",
        "none-at-chap-portal",
        "restricted-target",
        "refused-out-of-resources",
    ] {
        assert!(matches!(failed(name), LoginError::Refused { .. }), "{name}");
    }
    assert!(matches!(
        failed("redirect"),
        LoginError::Redirected { address, permanent: false } if address == "[fd00::2]:3260"
    ));
}

#[test]
fn initiator_session_seeds_do_what_they_say() {
    use crate::initiator::run_session;

    let run = |name| run_session(&seed_of("initiator_session", name));
    for (name, good) in [
        ("read", 1),
        ("read-write", 2),
        ("mix-defaults", 4),
        ("mix-unsolicited", 4),
        ("mix-small-limits", 4),
        ("mix-digests", 4),
        ("bidirectional", 1),
        ("r2t-small-bursts", 2),
        ("reconnect-with-tasks", 4),
        ("keepalive-timeout", 1),
        ("r2t-beyond-data-then-reconnect", 2),
        ("framing-complaint-then-reconnect", 1),
    ] {
        let s = run(name);
        assert_eq!(
            (s.completed, s.good, s.left),
            (good, good, 0),
            "{name}: {s:?}"
        );
    }
    let s = run("submit-various");
    // READ, WRITE, TEST UNIT READY-like, 17- and 260-byte CDBs, and a reused id; the
    // 261-byte CDB is refused.
    assert_eq!((s.completed, s.good, s.failures), (6, 6, 0), "{s:?}");
    let s = run("statuses");
    assert_eq!((s.completed, s.good, s.failures), (4, 2, 0), "{s:?}");
    let s = run("abort-task");
    assert_eq!((s.completed, s.tmf_done, s.good), (2, 1, 1), "{s:?}");
    let s = run("abort-task-set-and-lun-reset");
    assert_eq!((s.completed, s.tmf_done, s.good), (5, 2, 0), "{s:?}");
    let s = run("text-and-logout");
    assert_eq!((s.text_done, s.logged_out, s.good), (1, 1, 1), "{s:?}");
    let s = run("keepalive");
    assert_eq!((s.good, s.failures), (1, 0), "{s:?}");
    let s = run("reject-command");
    assert_eq!(s.failures, 1, "Data-In for the rejected command: {s:?}");
    let s = run("async-messages");
    assert_eq!((s.notices, s.logged_out, s.good), (5, 1, 1), "{s:?}");
}
