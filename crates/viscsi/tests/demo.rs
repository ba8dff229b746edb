//! `viscsi demo`, the README's main-job command, runs to the end on its own: two hosts, the
//! migrations A→B→A and the adapter fault, and every block verified.

use std::process::Command;
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_viscsi");

#[test]
fn the_demo_migrates_fails_over_and_verifies() {
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["demo", "--dwell", "0.3"])
        .output()
        .expect("run viscsi demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for step in [
        "1. VM demo-vm created on host A: data path offload ref-a/vf0",
        "2. migrated A -> B under load: now software on host B",
        "3. migrated B -> A under load: now offload ref-a/vf0 on host A",
        "4. adapter ref-a lost its link: the VM failed over to software on host A",
        "0 errors",
        "0 wrong — OK: nothing lost, duplicated or reordered",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
    assert!(
        started.elapsed().as_secs() < 60,
        "the demo took {:?}",
        started.elapsed()
    );
    eprintln!("{stdout}");
}
