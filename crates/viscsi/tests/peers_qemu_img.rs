//! Bulk data through QEMU's libiscsi block driver (`qemu-img`, packages qemu-utils and
//! qemu-block-extra): a 1 GiB random image is written into a 1 GiB LUN, compared against the
//! LUN in place, read back into a file and compared again.

use std::time::Duration;

use peer_harness::target::GIB;
use peer_harness::{
    md5_of_file_range, run_tool, tools, write_random_file, RunningTarget, TargetConfig, TargetKind,
};

const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn qemu_img_round_trip_of_one_gib_is_identical() {
    tools::require_qemu_iscsi_driver();
    let kind = TargetKind::from_env(env!("CARGO_BIN_EXE_viscsi"));
    let mut target = RunningTarget::start(
        &kind,
        TargetConfig::new("iqn.2024-01.test.viscsi:qemu-img").mem_lun(GIB),
    );
    let url = target.url(0);
    let original = target.dir().join("original.raw");
    let copy = target.dir().join("copy.raw");
    write_random_file(&original, GIB, 0x5eed_1234);
    let original_s = original.to_string_lossy().into_owned();
    let copy_s = copy.to_string_lossy().into_owned();

    let info = run_tool(
        "qemu-img",
        &["info", "--output=json", &url],
        QEMU_IMG_TIMEOUT,
    );
    info.assert_success();
    assert!(
        info.stdout.contains(&format!("\"virtual-size\": {GIB}")),
        "LUN is not 1 GiB: {info}"
    );

    let upload = run_tool(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &original_s, &url],
        QEMU_IMG_TIMEOUT,
    );
    upload.assert_success();
    println!("file -> LUN: {:.1} s", upload.elapsed.as_secs_f64());

    let in_place = run_tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &original_s, &url],
        QEMU_IMG_TIMEOUT,
    );
    in_place.assert_success();
    assert!(
        in_place.stdout.contains("Images are identical"),
        "{in_place}"
    );
    println!(
        "compare file vs LUN: {:.1} s",
        in_place.elapsed.as_secs_f64()
    );

    let download = run_tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &url, &copy_s],
        QEMU_IMG_TIMEOUT,
    );
    download.assert_success();
    println!("LUN -> file: {:.1} s", download.elapsed.as_secs_f64());

    let files = run_tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &original_s, &copy_s],
        QEMU_IMG_TIMEOUT,
    );
    files.assert_success();
    assert!(files.stdout.contains("Images are identical"), "{files}");
    assert_eq!(
        md5_of_file_range(&original, 0, GIB),
        md5_of_file_range(&copy, 0, GIB)
    );
    target.assert_alive();
    target.shutdown_cleanly();
}
