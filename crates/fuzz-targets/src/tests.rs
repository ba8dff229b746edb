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
