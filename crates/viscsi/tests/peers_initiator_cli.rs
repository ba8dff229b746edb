//! The initiator's subcommands against real targets: every test runs once against
//! `viscsi target` (module `viscsi_target`) and once against tgtd (module `tgtd`).
//!
//! `discover`, `ls` and `inquiry` print what the target exports; `cp` moves 256 MiB of random
//! data into a LUN and back out unchanged, pads a partial last block, copies LUN to LUN (with
//! CRC32C digests) and LUN to standard output; `bench --json` reports positive numbers, and rides through a
//! restart of the target, counting the recovery; CHAP works with the
//! right secrets and fails in one line, without printing them, with wrong ones.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use peer_harness::target::MIB;
use peer_harness::{
    md5_of_file_range, run_with_timeout, write_random_file, CommandOutput, RunningTarget,
    TargetConfig, TargetKind,
};

const TIMEOUT: Duration = Duration::from_secs(120);

fn viscsi_kind() -> TargetKind {
    TargetKind::Viscsi {
        binary: env!("CARGO_BIN_EXE_viscsi").into(),
    }
}

/// Runs the binary with a clean CHAP environment.
fn viscsi(args: &[&str]) -> CommandOutput {
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
    run_with_timeout(&mut cmd, TIMEOUT)
}

#[track_caller]
fn ok(args: &[&str]) -> CommandOutput {
    let out = viscsi(args);
    out.assert_success();
    out
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Declares each test once per target kind.
macro_rules! against_both_targets {
    ($($test:ident),* $(,)?) => {
        mod viscsi_target {
            $( #[test] fn $test() { super::$test(&super::viscsi_kind()) } )*
        }
        mod tgtd {
            $( #[test] fn $test() { super::$test(&peer_harness::TargetKind::Tgtd) } )*
        }
    };
}

against_both_targets!(
    discover_lists_the_target,
    ls_lists_luns_with_type_and_size,
    inquiry_shows_standard_data_and_vpd_pages,
    cp_round_trip_of_256_mib_is_identical,
    cp_pads_partial_blocks_and_copies_lun_to_lun_and_stdout,
    bench_json_reports_positive_numbers,
    bench_counts_recoveries_across_a_target_restart,
    chap_right_secrets_work_and_wrong_ones_fail_quietly,
);

fn discover_lists_the_target(kind: &TargetKind) {
    let mut target = RunningTarget::start(
        kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:cli-discover").mem_lun(16 * MIB),
    );
    for portal in [target.portal(), target.discovery_url()] {
        let out = ok(&["discover", &portal]);
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert!(lines.contains(&target.iqn()), "{out}");
        assert!(
            lines.iter().any(|l| l.trim().starts_with(&format!(
                "{}:{},",
                target.host(),
                target.port()
            ))),
            "{out}"
        );
    }
    target.assert_alive();
    target.shutdown_cleanly();
}

fn ls_lists_luns_with_type_and_size(kind: &TargetKind) {
    let mut target = RunningTarget::start(
        kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:cli-ls")
            .mem_lun(64 * MIB)
            .mem_lun(32 * MIB),
    );
    let lun_line = |out: &CommandOutput, index: usize| -> String {
        let prefix = format!("LUN {}: ", target.lun_id(index));
        out.stdout
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line: {out}"))
            .to_owned()
    };
    let all = ok(&["ls", &target.discovery_url()]);
    assert!(
        all.stdout.contains(&format!("Target: {}", target.iqn())),
        "{all}"
    );
    assert!(all.stdout.contains("Portal: "), "{all}");
    let first = lun_line(&all, 0);
    assert!(first.contains(": disk, "), "{first}");
    assert!(
        first.contains("64.0 MiB (131072 blocks of 512 B"),
        "{first}"
    );
    assert!(lun_line(&all, 1).contains("32.0 MiB"), "{all}");
    if matches!(kind, TargetKind::Tgtd) {
        // tgtd's LUN 0 is its controller: listed, without a size.
        assert!(
            all.stdout.contains("LUN 0: storage array controller"),
            "{all}"
        );
    }

    let target_url = format!("iscsi://{}/{}", target.portal(), target.iqn());
    let one_target = ok(&["ls", &target_url]);
    assert!(
        lun_line(&one_target, 1).contains("32.0 MiB"),
        "{one_target}"
    );
    let one_lun = ok(&["ls", &target.url(1)]);
    assert_eq!(
        one_lun
            .stdout
            .lines()
            .filter(|l| l.contains("LUN "))
            .count(),
        1,
        "{one_lun}"
    );
    target.assert_alive();
    target.shutdown_cleanly();
}

fn inquiry_shows_standard_data_and_vpd_pages(kind: &TargetKind) {
    let mut target = RunningTarget::start(
        kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:cli-inq").mem_lun(16 * MIB),
    );
    let url = target.url(0);
    let standard = ok(&["inquiry", &url]);
    for field in [
        "Device type             0x00 (disk)",
        "Peripheral qualifier    0 (connected)",
        "Vendor ",
        "Product ",
        "Revision ",
    ] {
        assert!(standard.stdout.contains(field), "{field:?}: {standard}");
    }
    let pages = ok(&["inquiry", "--page", "0", &url]);
    assert!(pages.stdout.contains("0x80  Unit serial number"), "{pages}");
    assert!(
        pages.stdout.contains("0x83  Device identification"),
        "{pages}"
    );
    let serial = ok(&["inquiry", "--page", "0x80", &url]);
    assert!(serial.stdout.contains("Serial number: "), "{serial}");
    let ids = ok(&["inquiry", "--page", "0x83", &url]);
    assert!(ids.stdout.contains("(Device identification)"), "{ids}");
    assert!(ids.stdout.contains("(logical unit"), "{ids}");
    // A page that is not decoded is dumped in hex.
    let other = pages
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("0x"))
        .filter_map(|l| u8::from_str_radix(l.get(..2)?, 16).ok())
        .find(|p| ![0x00, 0x80, 0x83].contains(p));
    if let Some(page) = other {
        let dump = ok(&["inquiry", "--page", &format!("0x{page:02x}"), &url]);
        assert!(dump.stdout.contains("\n  0000  "), "{dump}");
    }
    target.assert_alive();
    target.shutdown_cleanly();
}

fn cp_round_trip_of_256_mib_is_identical(kind: &TargetKind) {
    const SIZE: u64 = 256 * MIB;
    let mut target = RunningTarget::start(
        kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:cli-cp").mem_lun(SIZE),
    );
    let original = target.dir().join("original.raw");
    let copy = target.dir().join("copy.raw");
    write_random_file(&original, SIZE, 0xc0ff_ee00 + target.port() as u64);
    let url = target.url(0);

    let upload = ok(&["cp", path(&original), &url]);
    assert!(
        upload
            .stdout
            .contains(&format!("copied {SIZE} bytes (256.0 MiB) in ")),
        "{upload}"
    );
    assert!(upload.stdout.contains(" MiB/s"), "{upload}");
    assert!(!upload.stderr.contains("padded"), "{upload}");
    println!("{}: file -> LUN: {}", kind.name(), upload.stdout.trim());

    let download = ok(&["cp", "--qd", "4", "--chunk", "512k", &url, path(&copy)]);
    println!("{}: LUN -> file: {}", kind.name(), download.stdout.trim());
    assert_eq!(std::fs::metadata(&copy).expect("copy").len(), SIZE);
    assert_eq!(
        md5_of_file_range(&original, 0, SIZE),
        md5_of_file_range(&copy, 0, SIZE)
    );
    target.assert_alive();
    target.shutdown_cleanly();
}

fn cp_pads_partial_blocks_and_copies_lun_to_lun_and_stdout(kind: &TargetKind) {
    const PARTIAL: u64 = MIB + 100;
    let mut target = RunningTarget::start(
        kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:cli-cp2")
            .mem_lun(8 * MIB)
            .mem_lun(8 * MIB),
    );
    let dir = target.dir();
    let original = dir.join("partial.raw");
    write_random_file(&original, PARTIAL, 77);
    let (first, second) = (target.url(0), target.url(1));

    let upload = ok(&["cp", path(&original), &first]);
    assert!(
        upload.stderr.contains("padded with 412 zero bytes"),
        "{upload}"
    );
    // LUN to LUN on the same target (one session), small chunks, a deep queue and CRC32C
    // digests on headers and data.
    ok(&[
        "cp",
        "--chunk",
        "64k",
        "--qd",
        "16",
        "--header-digest",
        "crc32c",
        "--data-digest",
        "crc32c",
        &first,
        &second,
    ]);
    // LUN to standard output, in order.
    let piped = dir.join("piped.raw");
    let shell = run_with_timeout(
        Command::new("sh").arg("-c").arg(format!(
            "'{}' cp --qd 8 --chunk 128k '{second}' - > '{}'",
            env!("CARGO_BIN_EXE_viscsi"),
            path(&piped)
        )),
        TIMEOUT,
    );
    shell.assert_success();
    assert!(shell.stderr.contains("copied 8388608 bytes"), "{shell}");
    assert_eq!(std::fs::metadata(&piped).expect("piped").len(), 8 * MIB);
    assert_eq!(
        md5_of_file_range(&original, 0, PARTIAL),
        md5_of_file_range(&piped, 0, PARTIAL)
    );
    let rest = std::fs::read(&piped).expect("read piped");
    assert!(
        rest[PARTIAL as usize..].iter().all(|&b| b == 0),
        "padding and the untouched rest of the LUN must be zeros"
    );
    // A file larger than the LUN is refused before anything is written.
    let big = dir.join("big.raw");
    write_random_file(&big, 9 * MIB, 5);
    let refused = viscsi(&["cp", path(&big), &first]);
    assert_eq!(refused.code(), Some(1), "{refused}");
    assert!(refused.stderr.contains("does not fit"), "{refused}");
    target.assert_alive();
    target.shutdown_cleanly();
}

fn bench_json_reports_positive_numbers(kind: &TargetKind) {
    let mut target = RunningTarget::start(
        kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:cli-bench").mem_lun(64 * MIB),
    );
    let url = target.url(0);
    for args in [
        &["--rw", "randread", "--bs", "4k", "--qd", "16"][..],
        &[
            "--rw",
            "randwrite",
            "--bs",
            "4k",
            "--qd",
            "8",
            "--size",
            "8M",
        ],
        &["--rw", "read", "--bs", "1M", "--qd", "4"],
        &["--rw", "write", "--bs", "64k", "--qd", "1"],
    ] {
        let mut all = vec!["bench", &url, "--time", "2s", "--json"];
        all.extend_from_slice(args);
        let out = ok(&all);
        let line = out.stdout.trim();
        assert_eq!(line.lines().count(), 1, "{out}");
        let report: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
        println!("{}: {line}", kind.name());
        for key in [
            "iops",
            "mib_per_sec",
            "lat_p50_us",
            "lat_p99_us",
            "lat_p999_us",
            "lat_max_us",
            "cpu_percent",
            "seconds",
        ] {
            let value = report[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing: {line}"));
            assert!(value > 0.0, "{key} = {value}: {line}");
        }
        assert!(report["lat_p50_us"].as_f64() <= report["lat_p99_us"].as_f64());
        assert_eq!(report["recoveries"].as_u64(), Some(0), "{line}");
    }
    // The text form has the same parts.
    let text = ok(&["bench", &url, "--time", "1s", "--qd", "4"]);
    for part in [
        "IOPS",
        "MiB/s",
        "p50",
        "p99",
        "p99.9",
        "max",
        "CPU",
        "recoveries",
    ] {
        assert!(text.stdout.contains(part), "{part}: {text}");
    }
    target.assert_alive();
    target.shutdown_cleanly();
}

fn bench_counts_recoveries_across_a_target_restart(kind: &TargetKind) {
    let mut target = RunningTarget::start(
        kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:cli-recover").mem_lun(16 * MIB),
    );
    let url = target.url(0);
    let bench = Command::new(env!("CARGO_BIN_EXE_viscsi"))
        .args([
            "bench",
            &url,
            "--rw",
            "randread",
            "--qd",
            "8",
            "--time",
            "4s",
            "--json",
            "--nop-interval",
            "1s",
            "--nop-timeout",
            "1s",
            "--give-up-after",
            "30s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start viscsi bench");
    std::thread::sleep(Duration::from_secs(1));
    target.restart();
    let out = bench.wait_with_output().expect("viscsi bench");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"));
    println!("{}: {report}", kind.name());
    assert!(
        report["recoveries"].as_u64() >= Some(1),
        "no recovery counted: {report}"
    );
    assert!(report["iops"].as_f64() > Some(0.0), "{report}");
    target.assert_alive();
    target.shutdown_cleanly();
}

fn chap_right_secrets_work_and_wrong_ones_fail_quietly(kind: &TargetKind) {
    const SECRET: &str = "insecret1234";
    const TARGET_SECRET: &str = "outsecret5678";
    const WRONG: &str = "wrongsecret99";
    let mut target = RunningTarget::start(
        kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:cli-chap")
            .mem_lun(16 * MIB)
            .chap("inuser", SECRET)
            .mutual_chap("outuser", TARGET_SECRET),
    );
    let lun_path = format!("{}/{}/{}", target.portal(), target.iqn(), target.lun_id(0));
    let quiet = |out: &CommandOutput| {
        for s in [SECRET, TARGET_SECRET, WRONG] {
            assert!(!out.combined().contains(s), "secret printed: {out}");
        }
    };

    let good = ok(&["inquiry", &format!("iscsi://inuser%{SECRET}@{lun_path}")]);
    assert!(good.stdout.contains("(disk)"), "{good}");
    quiet(&good);

    // Mutual CHAP with both secrets from files.
    let dir = target.dir();
    let (secret_file, target_file) = (dir.join("secret"), dir.join("target-secret"));
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("write");
    std::fs::write(&target_file, format!("{TARGET_SECRET}\n")).expect("write");
    let mutual = ok(&[
        "ls",
        "--chap-secret-file",
        path(&secret_file),
        "--target-chap-user",
        "outuser",
        "--target-chap-secret-file",
        path(&target_file),
        &format!("iscsi://inuser@{lun_path}"),
    ]);
    assert!(mutual.stdout.contains(": disk, "), "{mutual}");

    for bad in [
        format!("iscsi://inuser%{WRONG}@{lun_path}"),
        format!("iscsi://nobody%{SECRET}@{lun_path}"),
        format!("iscsi://inuser%{SECRET}@{lun_path}?target_user=outuser&target_password={WRONG}"),
    ] {
        let out = viscsi(&["inquiry", &bad]);
        assert_eq!(out.code(), Some(1), "{out}");
        assert_eq!(out.stdout, "", "{out}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert!(lines[0].starts_with("viscsi: login to "), "{out}");
        quiet(&out);
    }
    let none = viscsi(&["inquiry", &target.url(0)]);
    assert_eq!(none.code(), Some(1), "{none}");
    target.assert_alive();
    target.shutdown_cleanly();
}
