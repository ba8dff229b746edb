//! The `viscsi target` command line the harness builds, and the URLs it hands to peers.

use peer_harness::target::{format_size, viscsi_args, GIB, MIB};
use peer_harness::TargetConfig;

#[test]
fn sizes_use_binary_units_when_exact() {
    assert_eq!(format_size(GIB), "1GiB");
    assert_eq!(format_size(256 * MIB), "256MiB");
    assert_eq!(format_size(3 * GIB / 2), "1536MiB");
    assert_eq!(format_size(4096), "4096");
}

#[test]
fn viscsi_args_cover_portal_luns_and_chap() {
    let config = TargetConfig::new("iqn.2024-01.test:x")
        .mem_lun(GIB)
        .file_lun(std::path::Path::new("/srv/lun.img"))
        .chap("inuser", "insecret1234")
        .mutual_chap("outuser", "outsecret5678");
    assert_eq!(
        viscsi_args("127.0.0.1:3260", &config),
        [
            "target",
            "--portal",
            "127.0.0.1:3260",
            "--iqn",
            "iqn.2024-01.test:x",
            "--lun",
            "0=mem:1GiB",
            "--lun",
            "1=file:/srv/lun.img",
            "--chap",
            "inuser:insecret1234",
            "--mutual-chap",
            "outuser:outsecret5678",
        ]
    );
}
