//! The iSCSI target under test: `viscsi target`, or `tgtd` as a reference.
//!
//! [`RunningTarget::start`] starts either on a leased `127.0.0.1` port with one target IQN, the
//! LUNs of a [`TargetConfig`] and optional one-way and mutual CHAP, waits until it accepts TCP
//! connections, and stops it when dropped.
//!
//! LUN numbers differ between the two: viscsi numbers data LUNs from 0, tgtd reserves LUN 0 for
//! its controller and numbers data LUNs from 1. Tests therefore address LUNs by their index in
//! the config ([`RunningTarget::url`]), never by number.
//!
//! The viscsi command line is built in one place, [`viscsi_args`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::ports::{lease_tcp_port, lease_tgtd_control_port, PortLease};
use crate::process::{run_with_timeout, wait_for_listener_at, Daemon};
use crate::tempdir::TempDir;
use crate::tools::require_tool;

/// Environment variable that selects the target the peer tests run against: `viscsi` (default)
/// or `tgtd` (to validate the tests themselves, or to compare).
pub const TARGET_ENV: &str = "VISCSI_TEST_TARGET";

/// How long a target may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Which implementation to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    /// `viscsi target`, from the given binary.
    Viscsi {
        /// Path of the `viscsi` executable (`env!("CARGO_BIN_EXE_viscsi")` in tests).
        binary: PathBuf,
    },
    /// Linux SCSI target framework's userspace daemon, `tgtd` + `tgtadm` (package tgt).
    Tgtd,
}

impl TargetKind {
    /// The target selected by [`TARGET_ENV`]; `viscsi_binary` is used for `viscsi` (the default).
    pub fn from_env(viscsi_binary: &str) -> TargetKind {
        match std::env::var(TARGET_ENV).as_deref() {
            Ok("tgtd") | Ok("tgt") => TargetKind::Tgtd,
            Ok("viscsi") | Ok("") | Err(_) => TargetKind::Viscsi {
                binary: PathBuf::from(viscsi_binary),
            },
            Ok(other) => panic!("{TARGET_ENV}={other}: expected `viscsi` or `tgtd`"),
        }
    }

    /// Short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            TargetKind::Viscsi { .. } => "viscsi",
            TargetKind::Tgtd => "tgtd",
        }
    }
}

/// Backing store of one LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LunBacking {
    /// RAM of the target (`mem:` for viscsi; a sparse file on tmpfs for tgtd).
    Memory {
        /// Size in bytes (a multiple of 512).
        bytes: u64,
    },
    /// An existing file, used as is.
    File {
        /// The file.
        path: PathBuf,
    },
}

/// A CHAP user name and secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chap {
    /// CHAP_N.
    pub user: String,
    /// Shared secret (use at least 12 characters, URL-safe).
    pub secret: String,
}

impl Chap {
    /// Builds a credential.
    pub fn new(user: &str, secret: &str) -> Chap {
        Chap {
            user: user.to_string(),
            secret: secret.to_string(),
        }
    }
}

/// What to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// Target IQN.
    pub iqn: String,
    /// LUNs in order.
    pub luns: Vec<LunBacking>,
    /// Credential the initiator must present (one-way CHAP).
    pub chap: Option<Chap>,
    /// Credential the target presents when the initiator asks (mutual CHAP).
    pub mutual_chap: Option<Chap>,
    /// Run inside this network namespace, listening on this address (see [`crate::netns`]).
    pub netns: Option<(String, String)>,
}

/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;

impl TargetConfig {
    /// A target with no LUNs yet.
    pub fn new(iqn: &str) -> TargetConfig {
        TargetConfig {
            iqn: iqn.to_string(),
            luns: Vec::new(),
            chap: None,
            mutual_chap: None,
            netns: None,
        }
    }

    /// Runs the target inside `ns`, listening on its inside address.
    pub fn in_netns(mut self, ns: &crate::netns::NetNs) -> Self {
        self.netns = Some((ns.name().to_string(), ns.inside_addr.clone()));
        self
    }

    /// Adds a RAM-backed LUN of `bytes`.
    pub fn mem_lun(mut self, bytes: u64) -> Self {
        self.luns.push(LunBacking::Memory { bytes });
        self
    }

    /// Adds a file-backed LUN.
    pub fn file_lun(mut self, path: &Path) -> Self {
        self.luns.push(LunBacking::File {
            path: path.to_path_buf(),
        });
        self
    }

    /// Requires one-way CHAP with this credential.
    pub fn chap(mut self, user: &str, secret: &str) -> Self {
        self.chap = Some(Chap::new(user, secret));
        self
    }

    /// Lets initiators authenticate the target with this credential.
    pub fn mutual_chap(mut self, user: &str, secret: &str) -> Self {
        self.mutual_chap = Some(Chap::new(user, secret));
        self
    }
}

/// Size as the viscsi CLI writes it: `1GiB`, `256MiB`, or plain bytes.
pub fn format_size(bytes: u64) -> String {
    if bytes >= GIB && bytes & (GIB - 1) == 0 {
        format!("{}GiB", bytes / GIB)
    } else if bytes >= MIB && bytes & (MIB - 1) == 0 {
        format!("{}MiB", bytes / MIB)
    } else {
        bytes.to_string()
    }
}

/// The `viscsi target …` arguments for `config` on `portal`. The one place that knows the CLI.
pub fn viscsi_args(portal: &str, config: &TargetConfig) -> Vec<String> {
    let mut args = vec![
        "target".to_string(),
        "--portal".to_string(),
        portal.to_string(),
        "--iqn".to_string(),
        config.iqn.clone(),
    ];
    for (index, lun) in config.luns.iter().enumerate() {
        let backing = match lun {
            LunBacking::Memory { bytes } => format!("mem:{}", format_size(*bytes)),
            LunBacking::File { path } => format!("file:{}", path.display()),
        };
        args.push("--lun".to_string());
        args.push(format!("{index}={backing}"));
    }
    if let Some(chap) = &config.chap {
        args.push("--chap".to_string());
        args.push(format!("{}:{}", chap.user, chap.secret));
    }
    if let Some(chap) = &config.mutual_chap {
        args.push("--mutual-chap".to_string());
        args.push(format!("{}:{}", chap.user, chap.secret));
    }
    args
}

/// A started target; stopped (and its scratch files removed) on drop.
#[derive(Debug)]
pub struct RunningTarget {
    kind: TargetKind,
    config: TargetConfig,
    port: PortLease,
    /// tgtd only: leased control port.
    tgt_control: Option<PortLease>,
    lun_ids: Vec<u32>,
    daemon: Option<Daemon>,
    /// tgtd memory LUNs: tmpfs files to delete after the daemon has stopped.
    scratch_files: Vec<PathBuf>,
    dir: TempDir,
    startup: Duration,
}

impl RunningTarget {
    /// Starts `kind` with `config`. Panics (with the target's log) if it does not come up.
    pub fn start(kind: &TargetKind, config: TargetConfig) -> RunningTarget {
        assert!(!config.luns.is_empty(), "a target needs at least one LUN");
        let dir = TempDir::new(kind.name());
        let port = lease_tcp_port();
        let mut target = RunningTarget {
            kind: kind.clone(),
            config,
            port,
            tgt_control: None,
            lun_ids: Vec::new(),
            daemon: None,
            scratch_files: Vec::new(),
            dir,
            startup: Duration::ZERO,
        };
        match kind {
            TargetKind::Viscsi { binary } => target.start_viscsi(binary),
            TargetKind::Tgtd => target.start_tgtd(),
        }
        eprintln!(
            "peer-harness: {} pid {} listening on {} after {:.2} s (log {})",
            target.kind.name(),
            target.pid(),
            target.portal(),
            target.startup.as_secs_f64(),
            target.log_path().display()
        );
        target
    }

    fn start_viscsi(&mut self, binary: &Path) {
        assert!(
            binary.exists(),
            "viscsi binary {} does not exist",
            binary.display()
        );
        let mut cmd = self.command_in_netns(binary);
        cmd.args(viscsi_args(&self.portal(), &self.config));
        // Hermetic: credentials come from the config only, never from the caller's environment.
        cmd.env_remove("VISCSI_CHAP")
            .env_remove("VISCSI_MUTUAL_CHAP");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let log = self.dir.join("viscsi.log");
        self.daemon = Some(Daemon::spawn("viscsi target", &mut cmd, &log));
        self.lun_ids = (0..self.config.luns.len() as u32).collect();
        self.wait_until_listening();
    }

    fn start_tgtd(&mut self) {
        let tgtd = require_tool("tgtd");
        require_tool("tgtadm");
        let control = match self.tgt_control.take() {
            Some(control) => control,
            None => lease_tgtd_control_port(),
        };
        let mut cmd = self.command_in_netns(&tgtd);
        cmd.args(["-f", "-C", &control.get().to_string(), "--iscsi"])
            .arg(format!("portal={}", self.portal()));
        self.tgt_control = Some(control);
        let log = self.dir.join("tgtd.log");
        self.daemon = Some(Daemon::spawn("tgtd", &mut cmd, &log));
        self.wait_until_listening();
        // The control socket may come up a little after the portal.
        let mut attempts = 0;
        while !self.tgtadm(&["--op", "show", "--mode", "sys"], false) {
            attempts += 1;
            assert!(attempts < 100, "tgtadm cannot reach tgtd:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        self.configure_tgtd();
    }

    fn configure_tgtd(&mut self) {
        let iqn = self.config.iqn.clone();
        self.tgtadm_ok(&["--op", "new", "--mode", "target", "--tid", "1", "-T", &iqn]);
        let shm = Path::new("/dev/shm");
        for (index, lun) in self.config.luns.clone().iter().enumerate() {
            let lun_id = index as u32 + 1;
            let backing = match lun {
                LunBacking::File { path } => path.clone(),
                LunBacking::Memory { bytes } => {
                    let parent = if shm.is_dir() {
                        shm.to_path_buf()
                    } else {
                        self.dir.path().to_path_buf()
                    };
                    let path = parent.join(format!(
                        "{}-lun{index}.img",
                        self.dir.path().file_name().unwrap().to_string_lossy()
                    ));
                    // Kept (not truncated) across a restart: the LUN's data survives it.
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&path)
                        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
                    file.set_len(*bytes).expect("size tmpfs LUN file");
                    if !self.scratch_files.contains(&path) {
                        self.scratch_files.push(path.clone());
                    }
                    path
                }
            };
            self.tgtadm_ok(&[
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                &lun_id.to_string(),
                "-b",
                &backing.to_string_lossy(),
            ]);
            self.lun_ids.push(lun_id);
        }
        self.tgtadm_ok(&[
            "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
        ]);
        // tgt negotiates no digests by default; allow CRC32C so digest tests can compare.
        for key in ["HeaderDigest", "DataDigest"] {
            self.tgtadm_ok(&[
                "--op",
                "update",
                "--mode",
                "target",
                "--tid",
                "1",
                "-n",
                key,
                "-v",
                "CRC32C,None",
            ]);
        }
        if let Some(chap) = self.config.chap.clone() {
            self.tgtadm_ok(&[
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                &chap.user,
                "--password",
                &chap.secret,
            ]);
            self.tgtadm_ok(&[
                "--op", "bind", "--mode", "account", "--tid", "1", "--user", &chap.user,
            ]);
        }
        if let Some(chap) = self.config.mutual_chap.clone() {
            self.tgtadm_ok(&[
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                &chap.user,
                "--password",
                &chap.secret,
            ]);
            self.tgtadm_ok(&[
                "--op",
                "bind",
                "--mode",
                "account",
                "--tid",
                "1",
                "--user",
                &chap.user,
                "--outgoing",
            ]);
        }
    }

    /// Runs `tgtadm -C N --lld iscsi ARGS`; returns success.
    fn tgtadm(&self, args: &[&str], report: bool) -> bool {
        let control = self.tgt_control.as_ref().expect("tgtd control port").get();
        let out = run_with_timeout(
            Command::new("tgtadm")
                .args(["-C", &control.to_string(), "--lld", "iscsi"])
                .args(args),
            Duration::from_secs(20),
        );
        if report && !out.success() {
            eprintln!("peer-harness: {out}");
        }
        out.success()
    }

    fn tgtadm_ok(&self, args: &[&str]) {
        assert!(
            self.tgtadm(args, true),
            "tgtadm {args:?} failed; tgtd log:\n{}",
            self.log()
        );
    }

    fn command_in_netns(&self, program: &Path) -> Command {
        match &self.config.netns {
            Some((ns, _)) => {
                let mut cmd = Command::new(require_tool("ip"));
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// SIGKILLs the target process (a crash: no logout, no FIN from a clean shutdown).
    /// The port stays leased for [`restart`](Self::restart).
    pub fn kill(&mut self) {
        if let Some(daemon) = self.daemon.as_mut() {
            daemon.kill();
        }
        if self.kind == TargetKind::Tgtd {
            // Only now that it is dead: its control socket file may linger.
            let control = self.tgt_control.as_ref().map(|c| c.get());
            if let Some(c) = control {
                let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{c}"));
                let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{c}.lock"));
            }
        }
    }

    /// Starts the target again on the same port with the same configuration (memory LUNs of
    /// tgtd keep their tmpfs files; use file LUNs for viscsi when data must survive).
    pub fn restart(&mut self) {
        self.kill();
        self.daemon = None;
        self.lun_ids.clear();
        match self.kind.clone() {
            TargetKind::Viscsi { binary } => self.start_viscsi(&binary),
            TargetKind::Tgtd => self.start_tgtd(),
        }
    }

    fn wait_until_listening(&mut self) {
        let port = self.port.get();
        let host: std::net::IpAddr = self.host().parse().expect("target address");
        let daemon = self.daemon.as_mut().expect("daemon started");
        let result = wait_for_listener_at((host, port).into(), START_TIMEOUT, || {
            match daemon.exit_status() {
                Some(status) => Err(format!("{} exited early with {status}", daemon.name())),
                None => Ok(()),
            }
        });
        match result {
            Ok(elapsed) => self.startup = elapsed,
            Err(why) => panic!(
                "{} did not start (`{}`): {why}\n--- log ---\n{}",
                self.kind.name(),
                self.daemon.as_ref().unwrap().command(),
                crate::process::tail(&self.log(), 100)
            ),
        }
    }

    /// Which implementation this is.
    pub fn kind(&self) -> &TargetKind {
        &self.kind
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &TargetConfig {
        &self.config
    }

    /// Its TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port.get()
    }

    /// The address it listens on: 127.0.0.1, or its namespace's address.
    pub fn host(&self) -> &str {
        self.config
            .netns
            .as_ref()
            .map_or("127.0.0.1", |(_, addr)| addr.as_str())
    }

    /// `HOST:PORT`.
    pub fn portal(&self) -> String {
        format!("{}:{}", self.host(), self.port())
    }

    /// Target IQN.
    pub fn iqn(&self) -> &str {
        &self.config.iqn
    }

    /// SCSI LUN number of the `index`-th configured LUN.
    pub fn lun_id(&self, index: usize) -> u32 {
        self.lun_ids[index]
    }

    /// `iscsi://127.0.0.1:PORT/IQN/LUN` for the `index`-th LUN (libiscsi / QEMU URL).
    pub fn url(&self, index: usize) -> String {
        format!(
            "iscsi://{}/{}/{}",
            self.portal(),
            self.iqn(),
            self.lun_id(index)
        )
    }

    /// Like [`url`](Self::url), logging in with one-way CHAP as `user%secret@`.
    pub fn url_with_chap(&self, index: usize, chap: &Chap) -> String {
        format!(
            "iscsi://{}%{}@{}/{}/{}",
            chap.user,
            chap.secret,
            self.portal(),
            self.iqn(),
            self.lun_id(index)
        )
    }

    /// Like [`url_with_chap`](Self::url_with_chap), also asking the target to authenticate
    /// itself as `target` (libiscsi's `target_user` / `target_password` URL arguments).
    pub fn url_with_mutual_chap(&self, index: usize, initiator: &Chap, target: &Chap) -> String {
        format!(
            "{}?target_user={}&target_password={}",
            self.url_with_chap(index, initiator),
            target.user,
            target.secret
        )
    }

    /// `iscsi://127.0.0.1:PORT/` (discovery session, e.g. for `iscsi-ls`).
    pub fn discovery_url(&self) -> String {
        format!("iscsi://{}/", self.portal())
    }

    /// PID of the target process.
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("daemon").pid()
    }

    /// Path of the target's log (stdout + stderr).
    pub fn log_path(&self) -> &Path {
        self.daemon.as_ref().expect("daemon").log_path()
    }

    /// The target's log so far.
    pub fn log(&self) -> String {
        self.daemon.as_ref().map(|d| d.log()).unwrap_or_default()
    }

    /// Scratch directory of this target (also a good place for test files).
    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// Panics (with the log) if the target process has exited, e.g. crashed during a test.
    #[track_caller]
    pub fn assert_alive(&mut self) {
        let daemon = self.daemon.as_mut().expect("daemon");
        if let Some(status) = daemon.exit_status() {
            panic!(
                "{} exited unexpectedly with {status}\n--- log ---\n{}",
                self.kind.name(),
                crate::process::tail(&daemon.log(), 200)
            );
        }
    }

    /// Stops the target the way an operator would and checks that it went cleanly:
    /// viscsi gets SIGTERM and must exit with status 0 within ten seconds; tgtd is shut down
    /// with tgtadm (it ignores signals). Panics otherwise.
    #[track_caller]
    pub fn shutdown_cleanly(mut self) {
        self.assert_alive();
        match self.kind {
            TargetKind::Viscsi { .. } => {
                let daemon = self.daemon.as_mut().expect("daemon");
                match daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)) {
                    Some(status) if status.success() => {}
                    Some(status) => panic!(
                        "viscsi target exited with {status} on SIGTERM\n--- log ---\n{}",
                        crate::process::tail(&daemon.log(), 100)
                    ),
                    None => panic!(
                        "viscsi target still running 10 s after SIGTERM\n--- log ---\n{}",
                        crate::process::tail(&daemon.log(), 100)
                    ),
                }
            }
            TargetKind::Tgtd => {
                self.stop_tgtd();
                let daemon = self.daemon.as_mut().expect("daemon");
                assert!(
                    daemon.wait_timeout(Duration::from_secs(10)).is_some(),
                    "tgtd did not exit after `tgtadm --op delete --mode system`"
                );
            }
        }
    }

    fn stop_tgtd(&mut self) {
        if !self.daemon.as_mut().is_some_and(|d| d.is_running()) {
            return;
        }
        // tgtd ignores SIGTERM: delete the target (kicking sessions), then the system.
        self.tgtadm(
            &[
                "--op", "delete", "--mode", "target", "--tid", "1", "--force",
            ],
            false,
        );
        let control = self.tgt_control.as_ref().expect("tgtd control port").get();
        let _ = run_with_timeout(
            Command::new("tgtadm").args([
                "-C",
                &control.to_string(),
                "--op",
                "delete",
                "--mode",
                "system",
            ]),
            Duration::from_secs(10),
        );
        if let Some(daemon) = self.daemon.as_mut() {
            daemon.wait_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for RunningTarget {
    fn drop(&mut self) {
        if self.kind == TargetKind::Tgtd {
            self.stop_tgtd();
        }
        if let Some(daemon) = self.daemon.as_mut() {
            if std::thread::panicking() {
                eprintln!(
                    "peer-harness: {} log ({}), last lines:\n{}",
                    self.kind.name(),
                    daemon.log_path().display(),
                    crate::process::tail(&daemon.log(), 60)
                );
            }
        }
        // Daemon's own drop: SIGTERM, grace period, SIGKILL.
        self.daemon.take();
        for file in &self.scratch_files {
            let _ = std::fs::remove_file(file);
        }
    }
}
