//! Checks that the third-party peers a test needs are installed.
//!
//! A missing peer is a broken test bed, not a reason to skip: [`require_tool`] panics with the
//! Debian package to install and the script that installs all of them.

use std::path::PathBuf;

/// The script (relative to the repository root) that installs every peer.
pub const INSTALL_SCRIPT: &str = "scripts/install-peers";

/// Debian package that ships `tool`, for the error message.
pub fn package_of(tool: &str) -> &'static str {
    match tool {
        "iscsi-test-cu"
        | "iscsi-ls"
        | "iscsi-inq"
        | "iscsi-readcapacity16"
        | "iscsi-perf"
        | "iscsi-swp" => "libiscsi-bin",
        "tgtd" | "tgtadm" => "tgt",
        "tshark" => "tshark",
        "qemu-img" => "qemu-utils (from bookworm-backports)",
        "qemu-system-x86_64" => "qemu-system-x86 (from bookworm-backports)",
        "busybox" => "busybox-static",
        "cpio" => "cpio",
        "gzip" => "gzip",
        "apt-get" | "apt-cache" => "apt",
        "dpkg" => "dpkg",
        "ss" | "ip" => "iproute2",
        "nft" => "nftables",
        "iperf3" => "iperf3",
        _ => "(unknown package)",
    }
}

/// Finds `tool` on `PATH`.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Returns the path of `tool`, or panics naming the package and the install script.
#[track_caller]
pub fn require_tool(tool: &str) -> PathBuf {
    find_tool(tool).unwrap_or_else(|| {
        panic!(
            "required peer `{tool}` is not installed (Debian package {}). \
             Run `{INSTALL_SCRIPT}` as root (or `scripts/test`, which runs it) to install all peers.",
            package_of(tool)
        )
    })
}

/// Panics unless QEMU's iSCSI block driver (package qemu-block-extra, matching qemu-utils) loads.
#[track_caller]
pub fn require_qemu_iscsi_driver() {
    let qemu_img = require_tool("qemu-img");
    let out = std::process::Command::new(qemu_img)
        .args(["info", "--image-opts", "driver=iscsi"])
        .output()
        .expect("run qemu-img");
    let text = String::from_utf8_lossy(&out.stderr);
    if text.contains("Unknown driver") || text.contains("Unknown protocol") {
        panic!(
            "qemu-img has no iSCSI driver ({}): install qemu-block-extra from bookworm-backports, \
             the same version as qemu-utils; `{INSTALL_SCRIPT}` does this",
            text.trim()
        );
    }
}
