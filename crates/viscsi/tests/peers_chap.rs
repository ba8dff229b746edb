//! CHAP with libiscsi's tools against `viscsi target` started with `--chap` and
//! `--mutual-chap`: the right secret logs in, a wrong or missing one is refused, and with
//! `?target_user=…&target_password=…` the initiator also authenticates the target (mutual CHAP),
//! refusing a target that does not know the right secret.

use std::time::Duration;

use peer_harness::target::MIB;
use peer_harness::{run_tool, Chap, RunningTarget, TargetConfig, TargetKind};

const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
const IQN: &str = "iqn.2024-01.test.viscsi:chap";

fn initiator() -> Chap {
    Chap::new("inuser", "insecret1234")
}

fn target_credential() -> Chap {
    Chap::new("outuser", "outsecret5678")
}

fn start() -> RunningTarget {
    let kind = TargetKind::from_env(env!("CARGO_BIN_EXE_viscsi"));
    let (i, t) = (initiator(), target_credential());
    RunningTarget::start(
        &kind,
        TargetConfig::new(IQN)
            .mem_lun(32 * MIB)
            .chap(&i.user, &i.secret)
            .mutual_chap(&t.user, &t.secret),
    )
}

#[test]
fn one_way_chap_with_right_secret_logs_in() {
    let mut target = start();
    let inq = run_tool(
        "iscsi-inq",
        &[&target.url_with_chap(0, &initiator())],
        TOOL_TIMEOUT,
    );
    inq.assert_success();
    assert!(inq.stdout.contains("DIRECT_ACCESS"), "{inq}");
    let ls_url = format!(
        "iscsi://{}%{}@{}/",
        initiator().user,
        initiator().secret,
        target.portal()
    );
    let ls = run_tool("iscsi-ls", &["-s", &ls_url], TOOL_TIMEOUT);
    ls.assert_success();
    assert!(ls.stdout.contains(&format!("Target:{IQN}")), "{ls}");
    assert!(
        ls.stdout.contains(&format!("Lun:{} ", target.lun_id(0))),
        "LUN not listed with CHAP: {ls}"
    );
    target.assert_alive();
    target.shutdown_cleanly();
}

#[test]
fn wrong_or_missing_secret_is_refused() {
    let mut target = start();
    let wrong = Chap::new(&initiator().user, "wrongsecret99");
    run_tool(
        "iscsi-inq",
        &[&target.url_with_chap(0, &wrong)],
        TOOL_TIMEOUT,
    )
    .assert_failure();
    let unknown_user = Chap::new("nobody", &initiator().secret);
    run_tool(
        "iscsi-inq",
        &[&target.url_with_chap(0, &unknown_user)],
        TOOL_TIMEOUT,
    )
    .assert_failure();
    run_tool("iscsi-inq", &[&target.url(0)], TOOL_TIMEOUT).assert_failure();
    let ls_url = format!(
        "iscsi://{}%{}@{}/",
        wrong.user,
        wrong.secret,
        target.portal()
    );
    let ls = run_tool("iscsi-ls", &["-s", &ls_url], TOOL_TIMEOUT);
    // Discovery may or may not need CHAP; logging in to list the LUNs must fail either way.
    ls.assert_failure();
    assert!(
        !ls.stdout.contains(&format!("Lun:{} ", target.lun_id(0))),
        "LUNs listed with a wrong secret: {ls}"
    );
    target.assert_alive();
    target.shutdown_cleanly();
}

#[test]
fn mutual_chap_authenticates_the_target() {
    let mut target = start();
    let good = target.url_with_mutual_chap(0, &initiator(), &target_credential());
    let inq = run_tool("iscsi-inq", &[&good], TOOL_TIMEOUT);
    inq.assert_success();
    assert!(inq.stdout.contains("DIRECT_ACCESS"), "{inq}");
    let impostor = Chap::new(&target_credential().user, "notthetarget1");
    let bad = target.url_with_mutual_chap(0, &initiator(), &impostor);
    run_tool("iscsi-inq", &[&bad], TOOL_TIMEOUT).assert_failure();
    target.assert_alive();
    target.shutdown_cleanly();
}
