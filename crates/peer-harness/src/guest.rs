//! A minimal Linux guest booted under QEMU (TCG) with iSCSI disks.
//!
//! [`GuestImage::get`] builds, once, a Debian cloud kernel and a busybox initramfs whose `/init`
//! (`guest_init.sh`, ours) loads the virtio and SCSI modules and runs the mode chosen on the
//! kernel command line. The kernel comes from the Debian archive the machine is configured for:
//! `apt-cache depends linux-image-cloud-amd64` names the versioned package, `apt-get download`
//! fetches it and `dpkg -x` unpacks it. Everything is cached under the peer cache directory
//! (`<cargo target dir>/peer-cache`, or `$PEER_HARNESS_CACHE`) and guarded by a file lock, so
//! parallel tests build it once.
//!
//! [`boot_guest`] runs `qemu-system-x86_64 -accel tcg` with the serial console in a file and
//! QEMU's own libiscsi initiator attaching the disks (`-drive file=iscsi://…`), on virtio-scsi
//! (`scsi-hd`) or virtio-blk.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{run_with_timeout, CommandOutput};
use crate::tools::require_tool;

/// The guest's `/init`.
pub const GUEST_INIT: &str = include_str!("guest_init.sh");

/// Kernel modules the guest needs, in load order (virtio and SCSI are modules in Debian's
/// cloud kernel).
pub const GUEST_MODULES: [&str; 10] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "scsi_common",
    "scsi_mod",
    "sd_mod",
    "virtio_scsi",
];

/// Meta package whose first `linux-image-*` dependency is the kernel we boot.
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Directory for downloaded and built peer artefacts (guest kernel, initramfs).
pub fn peer_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PEER_HARNESS_CACHE") {
        return PathBuf::from(dir);
    }
    // Test executables live in <target>/<profile>/deps/.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(deps) = exe.parent() {
            if deps.file_name().is_some_and(|n| n == "deps") {
                if let Some(target) = deps.parent().and_then(Path::parent) {
                    return target.join("peer-cache");
                }
            }
        }
    }
    std::env::temp_dir().join("peer-harness-cache")
}

/// Kernel and initramfs ready to boot.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// bzImage.
    pub kernel: PathBuf,
    /// gzip'ed newc cpio.
    pub initrd: PathBuf,
}

/// An exclusive `flock` held until drop.
struct FileLock(#[allow(dead_code)] std::fs::File);

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock {}: {e}", path.display()));
        // SAFETY: flock(2) on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}", path.display());
        FileLock(file)
    }
}

impl GuestImage {
    /// Returns the cached image, building whatever is missing.
    pub fn get() -> GuestImage {
        let cache = peer_cache_dir().join("guest");
        std::fs::create_dir_all(&cache)
            .unwrap_or_else(|e| panic!("create {}: {e}", cache.display()));
        let _lock = FileLock::acquire(&cache.join(".lock"));
        let kernel_dir = cache.join("kernel");
        if !kernel_dir.join("vmlinuz").exists() {
            fetch_kernel(&cache, &kernel_dir);
        }
        let initrd = cache.join(format!("initrd-{:016x}.gz", initrd_fingerprint()));
        if !initrd.exists() {
            build_initrd(&cache, &kernel_dir, &initrd);
        }
        GuestImage {
            kernel: kernel_dir.join("vmlinuz"),
            initrd,
        }
    }
}

/// Changes whenever the initramfs contents would change.
fn initrd_fingerprint() -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let busybox_len = std::fs::metadata("/bin/busybox")
        .map(|m| m.len())
        .unwrap_or(0);
    let material = format!("{GUEST_INIT}{GUEST_MODULES:?}{busybox_len}");
    for byte in material.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn check(out: CommandOutput, what: &str) -> CommandOutput {
    assert!(out.success(), "{what} failed: {out}");
    out
}

/// Downloads the cloud kernel package and keeps vmlinuz and our modules in `kernel_dir`.
fn fetch_kernel(cache: &Path, kernel_dir: &Path) {
    require_tool("apt-get");
    require_tool("dpkg");
    let depends = check(
        run_with_timeout(
            Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]),
            Duration::from_secs(60),
        ),
        "apt-cache depends",
    );
    let package = depends
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .unwrap_or_else(|| {
            panic!(
                "apt-cache knows no kernel behind {KERNEL_META_PACKAGE} (run `apt-get update`, \
                 or scripts/install-peers):\n{depends}"
            )
        })
        .to_string();
    let download = cache.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download).expect("create download dir");
    eprintln!("peer-harness: downloading guest kernel {package}");
    check(
        run_with_timeout(
            Command::new("apt-get")
                .args(["download", &package])
                .current_dir(&download),
            Duration::from_secs(600),
        ),
        "apt-get download (the guest kernel)",
    );
    let deb = std::fs::read_dir(&download)
        .expect("read download dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("apt-get download produced no .deb");
    let root = download.join("root");
    check(
        run_with_timeout(
            Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
            Duration::from_secs(300),
        ),
        "dpkg -x",
    );
    let staging = cache.join("kernel.tmp");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.join("modules")).expect("create kernel staging dir");
    let vmlinuz = std::fs::read_dir(root.join("boot"))
        .expect("kernel package has /boot")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .expect("kernel package has a vmlinuz");
    std::fs::copy(&vmlinuz, staging.join("vmlinuz")).expect("copy vmlinuz");
    let mut found = Vec::new();
    find_modules(&root.join("lib/modules"), &mut found);
    find_modules(&root.join("usr/lib/modules"), &mut found);
    for module in GUEST_MODULES {
        // Built-in modules have no file; that is fine.
        if let Some(path) = found.iter().find(|p| module_name(p) == Some(module)) {
            let dest = staging.join("modules").join(format!("{module}.ko"));
            let name = path.to_string_lossy();
            if name.ends_with(".ko") {
                std::fs::copy(path, &dest).expect("copy module");
            } else if name.ends_with(".ko.xz") {
                let out = check(
                    run_with_timeout(
                        Command::new("sh").arg("-c").arg(format!(
                            "xz -dc '{}' > '{}'",
                            path.display(),
                            dest.display()
                        )),
                        Duration::from_secs(60),
                    ),
                    "xz -d module",
                );
                drop(out);
            }
        }
    }
    std::fs::write(staging.join("package.txt"), &package).expect("write package.txt");
    let _ = std::fs::remove_dir_all(kernel_dir);
    std::fs::rename(&staging, kernel_dir).expect("install kernel dir");
    let _ = std::fs::remove_dir_all(&download);
}

fn module_name(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".ko")
        .or_else(|| name.strip_suffix(".ko.xz"))
}

fn find_modules(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            find_modules(&path, out);
        } else if module_name(&path).is_some() {
            out.push(path);
        }
    }
}

/// Builds the initramfs: static busybox, our `/init`, the modules.
fn build_initrd(cache: &Path, kernel_dir: &Path, initrd: &Path) {
    let busybox = require_tool("busybox");
    require_tool("cpio");
    require_tool("gzip");
    let staging = cache.join("initramfs.tmp");
    let _ = std::fs::remove_dir_all(&staging);
    for dir in ["bin", "dev", "proc", "sys", "tmp", "lib/modules"] {
        std::fs::create_dir_all(staging.join(dir)).expect("create initramfs dir");
    }
    std::fs::copy(&busybox, staging.join("bin/busybox")).expect("copy busybox");
    std::fs::write(staging.join("init"), GUEST_INIT).expect("write init");
    set_executable(&staging.join("init"));
    set_executable(&staging.join("bin/busybox"));
    for entry in std::fs::read_dir(kernel_dir.join("modules"))
        .expect("kernel modules dir")
        .filter_map(Result::ok)
    {
        std::fs::copy(
            entry.path(),
            staging.join("lib/modules").join(entry.file_name()),
        )
        .expect("copy module");
    }
    let tmp = initrd.with_extension("tmp");
    check(
        run_with_timeout(
            Command::new("sh")
                .arg("-c")
                .arg("find . | cpio -o -H newc --quiet | gzip -1 > \"$0\"")
                .arg(&tmp)
                .current_dir(&staging),
            Duration::from_secs(120),
        ),
        "cpio | gzip (initramfs)",
    );
    std::fs::rename(&tmp, initrd).expect("install initramfs");
    let _ = std::fs::remove_dir_all(&staging);
}

fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod +x");
}

/// How a disk is attached to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// `virtio-scsi-pci` + `scsi-hd` (guest sees `sdX`).
    VirtioScsi,
    /// `virtio-blk-pci` (guest sees `vdX`).
    VirtioBlk,
}

/// One iSCSI disk of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    /// `iscsi://…` URL, opened by QEMU's libiscsi driver.
    pub url: String,
    /// Attachment.
    pub bus: DiskBus,
}

/// Result of one boot.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// QEMU's own output and status.
    pub qemu: CommandOutput,
    /// Serial console.
    pub serial: String,
}

/// One `VISCSI-GUEST KIND key=value …` line of the serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// `DISK`, `WRITE`, `READ`, `DONE`, `ERROR`, …
    pub kind: String,
    /// Its fields.
    pub fields: BTreeMap<String, String>,
}

impl GuestRun {
    /// The guest's marker lines, in order.
    pub fn markers(&self) -> Vec<Marker> {
        self.serial
            .lines()
            .filter_map(|l| {
                let rest = &l[l.find("VISCSI-GUEST ")? + "VISCSI-GUEST ".len()..];
                let mut words = rest.split_whitespace();
                let kind = words.next()?.to_string();
                let fields = words
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                Some(Marker { kind, fields })
            })
            .collect()
    }

    /// The field `key` of the marker `kind` whose `name` field is `disk`.
    pub fn disk_field(&self, kind: &str, disk: &str, key: &str) -> Option<String> {
        self.markers()
            .into_iter()
            .find(|m| m.kind == kind && m.fields.get("name").map(String::as_str) == Some(disk))
            .and_then(|m| m.fields.get(key).cloned())
    }
}

/// Boots `image` under TCG with `disks`, `kernel_args` appended to the command line, the serial
/// console in `serial_path`; QEMU is killed after `timeout`.
pub fn boot_guest(
    image: &GuestImage,
    disks: &[GuestDisk],
    kernel_args: &str,
    serial_path: &Path,
    timeout: Duration,
) -> GuestRun {
    let qemu = require_tool("qemu-system-x86_64");
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-m", "512", "-smp", "1", "-nodefaults"])
        .args(["-no-reboot", "-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial_path.display()))
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 {kernel_args}"));
    if disks.iter().any(|d| d.bus == DiskBus::VirtioScsi) {
        cmd.args(["-device", "virtio-scsi-pci,id=scsi0"]);
    }
    for (i, disk) in disks.iter().enumerate() {
        cmd.arg("-drive").arg(format!(
            "file={},if=none,id=d{i},format=raw,cache=none",
            disk.url
        ));
        let device = match disk.bus {
            DiskBus::VirtioScsi => format!("scsi-hd,drive=d{i},bus=scsi0.0"),
            DiskBus::VirtioBlk => format!("virtio-blk-pci,drive=d{i}"),
        };
        cmd.arg("-device").arg(device);
    }
    let output = run_with_timeout(&mut cmd, timeout);
    let serial = std::fs::read(serial_path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    GuestRun {
        qemu: output,
        serial,
    }
}
