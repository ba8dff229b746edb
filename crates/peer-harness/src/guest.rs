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
//! [`spawn_guest`] starts `qemu-system-x86_64 -accel tcg` in the background with the serial
//! console in a file, and returns a [`RunningGuest`] to wait for the guest's markers on, talk to
//! QEMU over QMP, and collect the run. Disks ([`Attachment`]) are either iSCSI LUNs that QEMU's
//! own libiscsi initiator opens (`-drive file=iscsi://…`, on virtio-scsi `scsi-hd` or
//! virtio-blk), or vhost-user-scsi / vhost-user-blk devices whose back end listens on a unix
//! socket; with any of the latter, guest RAM is a shared memfd so that the back end can map it,
//! and the chardevs reconnect (`reconnect-ms`) to a back end that restarts.
//! [`boot_guest`] is the one-shot form for iSCSI disks: spawn, wait for power-off.
//!
//! The guest's `/init` reports with `VISCSI-GUEST KIND key=value …` lines ([`Marker`]); the
//! kernel command line options it understands are listed at the top of `guest_init.sh`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{run_with_timeout, CommandOutput, Daemon};
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

/// The bus of an iSCSI disk that QEMU's own initiator opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// `virtio-scsi-pci` + `scsi-hd` (guest sees `sdX`).
    VirtioScsi,
    /// `virtio-blk-pci` (guest sees `vdX`).
    VirtioBlk,
}

/// One iSCSI disk of the guest, opened by QEMU's libiscsi driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    /// `iscsi://…` URL, opened by QEMU's libiscsi driver.
    pub url: String,
    /// Attachment.
    pub bus: DiskBus,
}

/// One disk of the guest and how QEMU attaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// QEMU's libiscsi initiator opens `url`; the disk sits on `bus`.
    Iscsi {
        /// `iscsi://…` URL.
        url: String,
        /// virtio-scsi or virtio-blk.
        bus: DiskBus,
    },
    /// `vhost-user-scsi-pci`: the back end on `socket` is the whole SCSI target; the guest
    /// scans its LUNs and sees `sdX`.
    VhostUserScsi {
        /// The back end's unix socket (QEMU connects to it).
        socket: PathBuf,
        /// Request queues (`num_queues`).
        queues: u16,
    },
    /// `vhost-user-blk-pci`: the back end on `socket` is one block device; the guest sees `vdX`.
    VhostUserBlk {
        /// The back end's unix socket (QEMU connects to it).
        socket: PathBuf,
        /// Request queues (`num-queues`).
        queues: u16,
    },
}

impl Attachment {
    /// A vhost-user-scsi disk with one request queue.
    pub fn vhost_user_scsi(socket: impl Into<PathBuf>) -> Attachment {
        Attachment::VhostUserScsi {
            socket: socket.into(),
            queues: 1,
        }
    }

    /// A vhost-user-blk disk with one request queue.
    pub fn vhost_user_blk(socket: impl Into<PathBuf>) -> Attachment {
        Attachment::VhostUserBlk {
            socket: socket.into(),
            queues: 1,
        }
    }

    /// Whether the device talks vhost-user (and so needs shared guest memory).
    pub fn is_vhost_user(&self) -> bool {
        !matches!(self, Attachment::Iscsi { .. })
    }
}

impl From<GuestDisk> for Attachment {
    fn from(disk: GuestDisk) -> Attachment {
        Attachment::Iscsi {
            url: disk.url,
            bus: disk.bus,
        }
    }
}

/// Machine settings of a guest; [`GuestOptions::default`] is what [`spawn_guest`] uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestOptions {
    /// Guest RAM in MiB (default 512). With a vhost-user disk it is a shared memfd of this size.
    pub memory_mib: u32,
    /// Virtual CPUs (default 1).
    pub cpus: u32,
    /// `reconnect-ms` of every vhost-user chardev (default `Some(1000)`): QEMU waits for a back
    /// end that is not listening yet and reconnects to one that went away. `None` leaves it out:
    /// QEMU then fails at start if the socket is not there, and never reconnects.
    pub reconnect_ms: Option<u32>,
    /// A QMP monitor on this unix socket (server, no wait), for [`RunningGuest::qmp`] and
    /// [`RunningGuest::hmp`]. Default none.
    pub qmp_socket: Option<PathBuf>,
    /// `-incoming URI` (e.g. `tcp:127.0.0.1:PORT` or `defer`): QEMU waits for the state of a
    /// live migration instead of booting; the other options must match the source's. Default
    /// none.
    pub incoming: Option<String>,
}

impl Default for GuestOptions {
    fn default() -> GuestOptions {
        GuestOptions {
            memory_mib: 512,
            cpus: 1,
            reconnect_ms: Some(1000),
            qmp_socket: None,
            incoming: None,
        }
    }
}

/// Result of one boot.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// QEMU's own output and status (QEMU's stdout and stderr both land in `stderr`).
    pub qemu: CommandOutput,
    /// Serial console.
    pub serial: String,
}

/// One `VISCSI-GUEST KIND key=value …` line of the serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// `START`, `DISK`, `WRITE`, `READ`, `PAUSE`, `DONE`, `ERROR`, …
    pub kind: String,
    /// Its fields.
    pub fields: BTreeMap<String, String>,
}

impl Marker {
    /// The value of `key`, if present.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// The `round=` field (rounds count from 1), if present and numeric.
    pub fn round(&self) -> Option<u32> {
        self.field("round")?.parse().ok()
    }

    /// Whether this is a `kind` marker about disk `name`.
    pub fn is(&self, kind: &str, name: &str) -> bool {
        self.kind == kind && self.field("name") == Some(name)
    }
}

/// The marker lines of a serial console, in order. A line may carry kernel output before
/// the marker; the last line is ignored unless it ends in a newline (it may be half written).
pub fn parse_markers(serial: &str) -> Vec<Marker> {
    const TAG: &str = "VISCSI-GUEST ";
    let complete = match serial.rfind('\n') {
        Some(end) => &serial[..end],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(TAG)? + TAG.len()..];
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

impl GuestRun {
    /// The guest's marker lines, in order.
    pub fn markers(&self) -> Vec<Marker> {
        parse_markers(&self.serial)
    }

    /// The field `key` of the first marker `kind` whose `name` field is `disk`.
    pub fn disk_field(&self, kind: &str, disk: &str, key: &str) -> Option<String> {
        self.markers()
            .into_iter()
            .find(|m| m.is(kind, disk))
            .and_then(|m| m.fields.get(key).cloned())
    }

    /// The field `key` of the marker `kind` about `disk` in round `round` (from 1).
    pub fn round_field(&self, kind: &str, disk: &str, round: u32, key: &str) -> Option<String> {
        self.markers()
            .into_iter()
            .find(|m| m.is(kind, disk) && m.round() == Some(round))
            .and_then(|m| m.fields.get(key).cloned())
    }
}

/// The QEMU command line for `disks`.
fn qemu_command(
    image: &GuestImage,
    disks: &[Attachment],
    kernel_args: &str,
    serial_path: &Path,
    options: &GuestOptions,
) -> Command {
    let qemu = require_tool("qemu-system-x86_64");
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
    ])
    .arg("-m")
    .arg(format!("{}M", options.memory_mib))
    .arg("-smp")
    .arg(options.cpus.to_string())
    .arg("-serial")
    .arg(format!("file:{}", serial_path.display()))
    .arg("-kernel")
    .arg(&image.kernel)
    .arg("-initrd")
    .arg(&image.initrd)
    .arg("-append")
    .arg(format!("console=ttyS0 quiet panic=-1 {kernel_args}"));
    if let Some(qmp) = &options.qmp_socket {
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    }
    if let Some(uri) = &options.incoming {
        cmd.arg("-incoming").arg(uri);
    }
    if disks.iter().any(Attachment::is_vhost_user) {
        // A vhost-user back end maps guest RAM, so it must be a shareable file.
        cmd.arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem0,size={}M,share=on",
                options.memory_mib
            ))
            .args(["-machine", "memory-backend=mem0"]);
    }
    if disks.iter().any(|d| {
        matches!(
            d,
            Attachment::Iscsi {
                bus: DiskBus::VirtioScsi,
                ..
            }
        )
    }) {
        cmd.args(["-device", "virtio-scsi-pci,id=scsi0"]);
    }
    let chardev = |i: usize, socket: &Path| {
        let mut spec = format!("socket,id=vu{i},path={}", socket.display());
        if let Some(ms) = options.reconnect_ms {
            spec.push_str(&format!(",reconnect-ms={ms}"));
        }
        spec
    };
    for (i, disk) in disks.iter().enumerate() {
        let device = match disk {
            Attachment::Iscsi { url, bus } => {
                cmd.arg("-drive")
                    .arg(format!("file={url},if=none,id=d{i},format=raw,cache=none"));
                match bus {
                    DiskBus::VirtioScsi => format!("scsi-hd,drive=d{i},bus=scsi0.0"),
                    DiskBus::VirtioBlk => format!("virtio-blk-pci,drive=d{i}"),
                }
            }
            Attachment::VhostUserScsi { socket, queues } => {
                cmd.arg("-chardev").arg(chardev(i, socket));
                format!("vhost-user-scsi-pci,id=disk{i},chardev=vu{i},num_queues={queues}")
            }
            Attachment::VhostUserBlk { socket, queues } => {
                cmd.arg("-chardev").arg(chardev(i, socket));
                format!("vhost-user-blk-pci,id=disk{i},chardev=vu{i},num-queues={queues}")
            }
        };
        cmd.arg("-device").arg(device);
    }
    cmd
}

/// A guest running in the background: QEMU in its own process group (killed with the test, and
/// on drop), its serial console in a file that the `wait_*` methods poll.
#[derive(Debug)]
pub struct RunningGuest {
    qemu: Daemon,
    serial_path: PathBuf,
    qmp_socket: Option<PathBuf>,
    started: Instant,
}

/// How often the serial file is read while waiting.
const POLL: Duration = Duration::from_millis(50);

/// Starts `image` under TCG with `disks` and the default [`GuestOptions`], `kernel_args`
/// appended to the command line, the serial console in `serial_path` (QEMU's own output goes
/// next to it, in `<serial_path>.qemu.log`).
pub fn spawn_guest(
    image: &GuestImage,
    disks: &[Attachment],
    kernel_args: &str,
    serial_path: &Path,
) -> RunningGuest {
    spawn_guest_with(
        image,
        disks,
        kernel_args,
        serial_path,
        &GuestOptions::default(),
    )
}

/// [`spawn_guest`] with other machine settings.
pub fn spawn_guest_with(
    image: &GuestImage,
    disks: &[Attachment],
    kernel_args: &str,
    serial_path: &Path,
    options: &GuestOptions,
) -> RunningGuest {
    let mut cmd = qemu_command(image, disks, kernel_args, serial_path, options);
    // A stale file would be read as this guest's console.
    let _ = std::fs::remove_file(serial_path);
    if let Some(qmp) = &options.qmp_socket {
        let _ = std::fs::remove_file(qmp);
    }
    let mut log = serial_path.as_os_str().to_owned();
    log.push(".qemu.log");
    let qemu = Daemon::spawn("qemu-system-x86_64", &mut cmd, Path::new(&log));
    RunningGuest {
        qemu,
        serial_path: serial_path.to_path_buf(),
        qmp_socket: options.qmp_socket.clone(),
        started: Instant::now(),
    }
}

impl RunningGuest {
    /// QEMU's process id (also its process group).
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read(&self.serial_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// QEMU's own stdout and stderr so far.
    pub fn qemu_log(&self) -> String {
        self.qemu.log()
    }

    /// The guest's complete marker lines so far.
    pub fn markers(&self) -> Vec<Marker> {
        parse_markers(&self.serial())
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        self.qemu.is_running()
    }

    /// Waits for the first marker of `kind`; `None` after `timeout`, or as soon as QEMU has
    /// exited without printing it.
    pub fn wait_for_marker(&mut self, kind: &str, timeout: Duration) -> Option<Marker> {
        self.wait_for(timeout, |m| m.kind == kind)
    }

    /// Waits for the first marker that satisfies `matches` (see [`RunningGuest::wait_for_marker`]).
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        mut matches: impl FnMut(&Marker) -> bool,
    ) -> Option<Marker> {
        let start = Instant::now();
        loop {
            // Check for exit first, so that a marker written just before exit is still seen.
            let exited = !self.qemu.is_running();
            if let Some(found) = self.markers().into_iter().find(&mut matches) {
                return Some(found);
            }
            if exited || start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits up to `timeout` for QEMU to exit by itself (the guest powers off after `DONE`),
    /// then SIGTERMs it (SIGKILL two seconds later).
    pub fn wait(&mut self, timeout: Duration) -> GuestRun {
        let mut status = self.qemu.wait_timeout(timeout);
        let timed_out = status.is_none();
        if timed_out {
            status = self
                .qemu
                .signal_and_wait(libc::SIGTERM, Duration::from_secs(2))
                .or_else(|| self.qemu.kill());
        }
        GuestRun {
            qemu: CommandOutput {
                command: self.qemu.command().to_string(),
                status,
                timed_out,
                stdout: String::new(),
                stderr: self.qemu.log(),
                elapsed: self.started.elapsed(),
            },
            serial: self.serial(),
        }
    }

    /// SIGKILLs QEMU (the guest gets no chance to flush anything).
    pub fn kill(&mut self) {
        self.qemu.kill();
    }

    /// Sends one QMP command (a JSON object, e.g. `{"execute":"query-status"}`) and returns the
    /// raw JSON line of its answer (`{"return": …}` or `{"error": …}`); events are skipped.
    /// Needs [`GuestOptions::qmp_socket`].
    pub fn qmp(&self, command: &str) -> Result<String, String> {
        let path = self
            .qmp_socket
            .as_deref()
            .ok_or("the guest has no QMP socket (GuestOptions::qmp_socket)")?;
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if start.elapsed() > Duration::from_secs(10) => {
                    return Err(format!("connect {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(POLL),
            }
        };
        let io = |e: std::io::Error| format!("QMP {}: {e}", path.display());
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        let mut writer = stream.try_clone().map_err(io)?;
        let mut reader = BufReader::new(stream);
        let mut answer = || -> Result<String, String> {
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).map_err(io)? == 0 {
                    return Err("QMP connection closed".to_string());
                }
                let line = line.trim();
                if line.starts_with("{\"return\"") || line.starts_with("{\"error\"") {
                    return Ok(line.to_string());
                }
            }
        };
        // The greeting, then capabilities negotiation.
        writer
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .map_err(io)?;
        let negotiated = answer()?;
        if !negotiated.starts_with("{\"return\"") {
            return Err(format!("qmp_capabilities: {negotiated}"));
        }
        writer.write_all(command.as_bytes()).map_err(io)?;
        writer.write_all(b"\n").map_err(io)?;
        answer()
    }

    /// Runs a human monitor command (e.g. `info status`) over QMP and returns its output.
    pub fn hmp(&self, command_line: &str) -> Result<String, String> {
        let answer = self.qmp(&format!(
            "{{\"execute\":\"human-monitor-command\",\"arguments\":{{\"command-line\":\"{}\"}}}}",
            json_escape(command_line)
        ))?;
        answer
            .strip_prefix("{\"return\": \"")
            .and_then(|rest| rest.strip_suffix("\"}"))
            .map(json_unescape)
            .ok_or(answer)
    }
}

fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// Undoes JSON string escapes (QEMU escapes only ASCII control characters, quotes and
/// backslashes, and writes other characters as they are).
fn json_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('u') => {
                let code: String = chars.by_ref().take(4).collect();
                let decoded = u32::from_str_radix(&code, 16).ok().and_then(char::from_u32);
                out.push(decoded.unwrap_or('\u{fffd}'));
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// Boots `image` under TCG with iSCSI `disks`, `kernel_args` appended to the command line, the
/// serial console in `serial_path`; QEMU is killed after `timeout`.
pub fn boot_guest(
    image: &GuestImage,
    disks: &[GuestDisk],
    kernel_args: &str,
    serial_path: &Path,
    timeout: Duration,
) -> GuestRun {
    let disks: Vec<Attachment> = disks.iter().cloned().map(Attachment::from).collect();
    spawn_guest(image, &disks, kernel_args, serial_path).wait(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::describe;

    #[test]
    fn markers_skip_console_noise_and_a_half_written_last_line() {
        let serial = "[    2.5] random: crng init\n\
                      VISCSI-GUEST DISK name=vda sectors=131072 serial=\n\
                      x VISCSI-GUEST WRITE name=vda round=2 md5=ab\n\
                      VISCSI-GUEST READ name=vda rou";
        let markers = parse_markers(serial);
        assert_eq!(markers.len(), 2);
        assert!(markers[0].is("DISK", "vda"));
        assert_eq!(markers[0].field("serial"), Some(""));
        assert_eq!(markers[1].round(), Some(2));
        assert_eq!(markers[1].field("md5"), Some("ab"));
    }

    #[test]
    fn json_escapes_round_trip() {
        let text = "info \"block\"\\\n\u{1}";
        assert_eq!(json_unescape(&json_escape(text)), text);
    }

    #[test]
    fn vhost_user_disks_get_shared_memory_and_reconnecting_chardevs() {
        let image = GuestImage {
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let disks = [
            Attachment::vhost_user_blk("/s/blk.sock"),
            Attachment::VhostUserScsi {
                socket: "/s/scsi.sock".into(),
                queues: 2,
            },
        ];
        let options = GuestOptions {
            reconnect_ms: Some(250),
            ..GuestOptions::default()
        };
        let cmd = qemu_command(&image, &disks, "a=b", Path::new("/s/serial"), &options);
        let line = describe(&cmd);
        for part in [
            "-m 512M",
            "memory-backend-memfd,id=mem0,size=512M,share=on",
            "-machine memory-backend=mem0",
            "-chardev socket,id=vu0,path=/s/blk.sock,reconnect-ms=250",
            "vhost-user-blk-pci,id=disk0,chardev=vu0,num-queues=1",
            "-chardev socket,id=vu1,path=/s/scsi.sock,reconnect-ms=250",
            "vhost-user-scsi-pci,id=disk1,chardev=vu1,num_queues=2",
        ] {
            assert!(line.contains(part), "{part} missing in {line}");
        }
        assert!(!line.contains("virtio-scsi-pci"), "{line}");
    }
}
