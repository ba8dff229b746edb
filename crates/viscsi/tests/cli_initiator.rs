//! The initiator's subcommands without a live target: bad URLs, bad flags and an unreachable
//! portal each end with one line on stderr (`viscsi: …`) and a non-zero exit code, and no
//! password ever appears in the output.

use std::process::Command;
use std::time::Duration;

use peer_harness::{run_with_timeout, CommandOutput, TempDir};

const TIMEOUT: Duration = Duration::from_secs(30);
const SECRET: &str = "hunter2hunter2";
const TARGET_SECRET: &str = "swordfish9876";

/// Runs the binary with a clean CHAP environment.
fn viscsi(args: &[&str]) -> CommandOutput {
    viscsi_env(args, &[])
}

fn viscsi_env(args: &[&str], env: &[(&str, &str)]) -> CommandOutput {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_viscsi"));
    cmd.args(args);
    for var in [
        "VISCSI_CHAP_PASSWORD",
        "VISCSI_CHAP_TARGET_PASSWORD",
        "LIBISCSI_CHAP_PASSWORD",
        "LIBISCSI_CHAP_TARGET_USERNAME",
        "LIBISCSI_CHAP_TARGET_PASSWORD",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    run_with_timeout(&mut cmd, TIMEOUT)
}

/// Exited with `code`, printed nothing on stdout and exactly one `viscsi: ` line on stderr,
/// which contains every one of `mentions`; returns that line.
#[track_caller]
fn assert_one_line_error(out: &CommandOutput, code: i32, mentions: &[&str]) -> String {
    assert!(!out.timed_out, "{out}");
    assert_eq!(out.code(), Some(code), "{out}");
    assert_eq!(out.stdout, "", "{out}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line: {out}");
    assert!(lines[0].starts_with("viscsi: "), "{out}");
    for m in mentions {
        assert!(lines[0].contains(m), "expected {m:?} in: {out}");
    }
    assert_no_secret(out);
    lines[0].to_owned()
}

#[track_caller]
fn assert_no_secret(out: &CommandOutput) {
    for s in [SECRET, TARGET_SECRET] {
        assert!(!out.combined().contains(s), "secret printed: {out}");
    }
}

#[test]
fn bad_urls_are_one_line_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["inquiry", "http://127.0.0.1/iqn.a/0"], "iscsi://"),
        (&["inquiry", "iscsi://127.0.0.1/iqn.a/zz"], "LUN"),
        (&["inquiry", "iscsi://127.0.0.1/iqn.a"], "no LUN"),
        (&["inquiry", "iscsi://127.0.0.1/"], "no target"),
        (&["bench", "iscsi://127.0.0.1:99999/iqn.a/0"], "port"),
        (&["bench", "iscsi://::1/iqn.a/0"], "brackets"),
        (&["ls", "iscsi://127.0.0.1/iqn.a/0?color=blue"], "color"),
        (&["cp", "iscsi://127.0.0.1/iqn.a", "/tmp/x"], "no LUN"),
        (&["cp", "a", "b"], "iscsi://"),
        (&["discover", "host:port"], "port"),
    ];
    for (args, mention) in cases {
        let out = viscsi(args);
        assert_one_line_error(&out, 1, &[mention]);
    }
}

#[test]
fn bad_flags_name_the_flag() {
    let url = "iscsi://127.0.0.1:1/iqn.a/0";
    let cases: &[(&[&str], &str)] = &[
        (&["bench", url, "--qd", "abc"], "--qd"),
        (&["bench", url, "--rw", "sideways"], "--rw"),
        (&["bench", url, "--bs", "4q"], "--bs"),
        (&["bench", url, "--time", "forever"], "--time"),
        (&["bench", url, "--frobnicate"], "--frobnicate"),
        (&["cp", url, "/tmp/x", "--chunk", "1x"], "--chunk"),
        (&["inquiry", url, "--page", "0x1ff"], "--page"),
        (&["inquiry", url, "--isid", "0x1000000000000"], "--isid"),
        (&["ls", url, "--header-digest", "md5"], "--header-digest"),
        (&["ls", url, "--give-up-after", "soon"], "--give-up-after"),
        (&["bench"], "<URL>"),
    ];
    for (args, flag) in cases {
        let out = viscsi(args);
        assert_one_line_error(&out, 2, &[flag]);
    }
    // Values that parse but make no sense are refused before connecting.
    for (args, flag) in [
        (&["bench", url, "--qd", "0"][..], "--qd"),
        (&["cp", url, "/tmp/x", "--chunk", "1000"][..], "--chunk"),
        (&["bench", url, "--time", "0s"][..], "--time"),
    ] {
        assert_one_line_error(&viscsi(args), 1, &[flag]);
    }
}

#[test]
fn unreachable_portal_is_a_clean_error() {
    let url = "iscsi://127.0.0.1:1/iqn.2024-01.test:none/0";
    let dir = TempDir::new("cli-initiator");
    let file = dir.join("out.img");
    let file = file.to_str().expect("utf-8 path");
    for args in [
        &["discover", "127.0.0.1:1"][..],
        &["ls", "iscsi://127.0.0.1:1/"],
        &["ls", "iscsi://127.0.0.1:1/iqn.2024-01.test:none"],
        &["inquiry", url],
        &["inquiry", "--page", "0x83", url],
        &[
            "inquiry",
            "--header-digest",
            "crc32c",
            "--data-digest",
            "crc32c-none",
            "--nop-interval",
            "1s",
            "--give-up-after",
            "never",
            url,
        ],
        &["cp", url, file],
        &["bench", url, "--time", "1s"],
    ] {
        let out = viscsi(args);
        assert_one_line_error(&out, 1, &["127.0.0.1:1", "connect"]);
        assert!(out.elapsed < Duration::from_secs(10), "{out}");
    }
}

#[test]
fn passwords_never_appear_in_output() {
    let with_secret = format!(
        "iscsi://user%{SECRET}@127.0.0.1:1/iqn.2024-01.test:none/0?target_user=tgt&target_password={TARGET_SECRET}"
    );
    // Unreachable, with debug logging on.
    let out = viscsi(&["--log", "trace", "inquiry", &with_secret]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert_no_secret(&out);
    // Errors of the argument parser that quote the URL.
    let out = viscsi(&["inquiry", &with_secret, "extra-argument"]);
    assert_one_line_error(&out, 2, &["extra-argument"]);
    let out = viscsi(&["frobnicate", &with_secret]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert_no_secret(&out);
    // URL errors.
    for bad in [
        format!("iscsi://user%{SECRET}@127.0.0.1:1/iqn.a/bad-lun"),
        format!("iscsi://user%{SECRET}@127.0.0.1:x/iqn.a/0"),
        format!("iscsi://user%{SECRET}@127.0.0.1/iqn.a/0?unknown=1"),
        format!("iscsi://user%hunter2?{SECRET}@127.0.0.1/iqn.a/0"),
        format!("iscsi://user%{SECRET}@127.0.0.1/iqn.a/0?target_password={TARGET_SECRET}"),
    ] {
        assert_one_line_error(&viscsi(&["inquiry", &bad]), 1, &[]);
    }
    // Secrets from the environment and from files.
    let out = viscsi_env(
        &["ls", "iscsi://user@127.0.0.1:1/"],
        &[("VISCSI_CHAP_PASSWORD", SECRET)],
    );
    assert_one_line_error(&out, 1, &["127.0.0.1:1"]);
    let dir = TempDir::new("cli-initiator");
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("write secret");
    let out = viscsi(&[
        "inquiry",
        "--chap-user",
        "user",
        "--chap-secret-file",
        secret_file.to_str().expect("utf-8 path"),
        "iscsi://127.0.0.1:1/iqn.a/0",
    ]);
    assert_one_line_error(&out, 1, &["127.0.0.1:1"]);
}

#[test]
fn missing_secrets_are_explained() {
    let out = viscsi(&["inquiry", "iscsi://user@127.0.0.1:1/iqn.a/0"]);
    assert_one_line_error(&out, 1, &["no CHAP password", "VISCSI_CHAP_PASSWORD"]);
    let out = viscsi(&[
        "inquiry",
        "--chap-secret-file",
        "/nonexistent/secret",
        "iscsi://user@127.0.0.1:1/iqn.a/0",
    ]);
    assert_one_line_error(&out, 1, &["--chap-secret-file", "/nonexistent/secret"]);
    let out = viscsi(&[
        "inquiry",
        &format!("iscsi://user%{SECRET}@127.0.0.1:1/iqn.a/0?target_user=tgt"),
    ]);
    assert_one_line_error(&out, 1, &["tgt", "VISCSI_CHAP_TARGET_PASSWORD"]);
    // The environment completes it (then the portal is what fails).
    let out = viscsi_env(
        &[
            "inquiry",
            &format!("iscsi://user%{SECRET}@127.0.0.1:1/iqn.a/0?target_user=tgt"),
        ],
        &[("LIBISCSI_CHAP_TARGET_PASSWORD", TARGET_SECRET)],
    );
    assert_one_line_error(&out, 1, &["127.0.0.1:1"]);
}

#[test]
fn help_lists_the_initiator_commands() {
    let out = viscsi(&["--help"]);
    assert!(out.success(), "{out}");
    for command in ["target", "discover", "ls", "inquiry", "cp", "bench"] {
        assert!(out.stdout.contains(command), "{out}");
    }
    let out = viscsi(&["bench", "--help"]);
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains("--qd") && out.stdout.contains("--json"),
        "{out}"
    );
}
