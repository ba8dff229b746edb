//! `viscsi host` agents and `viscsi hba` reference offload adapters as processes, for tests
//! that run several hosts on one machine.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{run_with_timeout, CommandOutput, Daemon};
use crate::tempdir::TempDir;

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits until `socket` accepts connections; panics with the daemon's log if it dies first.
fn wait_for_socket(daemon: &mut Daemon, socket: &Path) {
    let start = Instant::now();
    loop {
        if let Some(status) = daemon.exit_status() {
            panic!(
                "{} exited ({status}) before serving {}:\n{}",
                daemon.name(),
                socket.display(),
                daemon.log()
            );
        }
        if UnixStream::connect(socket).is_ok() {
            return;
        }
        if start.elapsed() > START_TIMEOUT {
            panic!(
                "{} does not serve {} after {START_TIMEOUT:?}:\n{}",
                daemon.name(),
                socket.display(),
                daemon.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `viscsi hba serve` process: the reference offload adapter.
pub struct ReferenceHba {
    binary: PathBuf,
    name: String,
    vfs: u32,
    socket: PathBuf,
    log: PathBuf,
    daemon: Option<Daemon>,
}

impl ReferenceHba {
    /// Starts adapter `name` with `vfs` virtual functions, its socket and log in `dir`.
    pub fn start(binary: &Path, dir: &TempDir, name: &str, vfs: u32) -> ReferenceHba {
        let mut hba = ReferenceHba {
            binary: binary.to_owned(),
            name: name.to_owned(),
            vfs,
            socket: dir.join(&format!("{name}.sock")),
            log: dir.join(&format!("{name}.log")),
            daemon: None,
        };
        hba.spawn();
        hba
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["hba", "serve", "--name", &self.name, "--vfs"])
            .arg(self.vfs.to_string())
            .arg("--socket")
            .arg(&self.socket);
        let mut daemon = Daemon::spawn(&format!("hba {}", self.name), &mut cmd, &self.log);
        wait_for_socket(&mut daemon, &self.socket);
        self.daemon = Some(daemon);
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `viscsi hba fault --socket … KIND` (crash, hang, link-down, link-up, recover).
    pub fn fault(&self, kind: &str) -> CommandOutput {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["hba", "fault", "--socket"])
            .arg(&self.socket)
            .arg(kind);
        run_with_timeout(&mut cmd, Duration::from_secs(10))
    }

    /// Starts the adapter again after a crash (same socket and VF count).
    pub fn restart(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
        self.spawn();
    }

    pub fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }
}

/// A `viscsi host` agent with its own state directory and control socket.
pub struct HostAgent {
    binary: PathBuf,
    name: String,
    args: Vec<String>,
    socket: PathBuf,
    state: PathBuf,
    log: PathBuf,
    restarts: u32,
    daemon: Option<Daemon>,
    env: Vec<(String, String)>,
    /// Network namespace to run in (`ip netns exec`).
    netns: Option<String>,
}

impl HostAgent {
    /// Starts agent `name` in `dir` driving the given adapters (`(name, socket)`), plus any
    /// further flags.
    pub fn start(
        binary: &Path,
        dir: &TempDir,
        name: &str,
        adapters: &[(&str, &Path)],
        extra: &[&str],
    ) -> HostAgent {
        HostAgent::start_with(binary, dir, name, adapters, extra, &[], None)
    }

    /// [`HostAgent::start`] with environment variables, optionally inside a network
    /// namespace.
    pub fn start_with(
        binary: &Path,
        dir: &TempDir,
        name: &str,
        adapters: &[(&str, &Path)],
        extra: &[&str],
        env: &[(&str, &str)],
        netns: Option<&crate::netns::NetNs>,
    ) -> HostAgent {
        let mut args: Vec<String> = Vec::new();
        for (adapter, socket) in adapters {
            args.push("--adapter".into());
            args.push(format!("{adapter}={}", socket.display()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut host = HostAgent {
            binary: binary.to_owned(),
            name: name.to_owned(),
            args,
            socket: dir.join(&format!("{name}.sock")),
            state: dir.join(&format!("{name}-state")),
            log: dir.join(&format!("{name}.log")),
            restarts: 0,
            daemon: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: netns.map(|n| n.name().to_owned()),
        };
        host.spawn();
        host
    }

    fn spawn(&mut self) {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new(crate::tools::require_tool("ip"));
                cmd.args(["netns", "exec", ns]).arg(&self.binary);
                cmd
            }
            None => Command::new(&self.binary),
        };
        cmd.args(["host", "--name", &self.name, "--socket"])
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .args(&self.args)
            .env("RUST_LOG", "info,agent=debug,hba=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let log = if self.restarts == 0 {
            self.log.clone()
        } else {
            self.log.with_extension(format!("{}.log", self.restarts))
        };
        let mut daemon = Daemon::spawn(&format!("host {}", self.name), &mut cmd, &log);
        wait_for_socket(&mut daemon, &self.socket);
        self.daemon = Some(daemon);
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// SIGKILL, and no restart.
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// SIGKILL, then start again with the same state.
    pub fn kill_and_restart(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
        self.restarts += 1;
        self.spawn();
    }

    /// SIGTERM (the agent logs its sessions out), then start again with the same state.
    pub fn stop_and_restart(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
            assert!(
                status.is_some_and(|s| s.success()),
                "agent did not stop cleanly ({status:?}):\n{}",
                d.log()
            );
        }
        self.restarts += 1;
        self.spawn();
    }

    /// Panics with the log if the agent has exited.
    pub fn assert_alive(&mut self) {
        if let Some(d) = self.daemon.as_mut() {
            if let Some(status) = d.exit_status() {
                panic!("agent {} exited ({status}):\n{}", self.name, d.log());
            }
        }
    }

    pub fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// Runs `viscsi ARGS --socket <this agent>` and returns its output.
    pub fn cli(&self, args: &[&str]) -> CommandOutput {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args).arg("--socket").arg(&self.socket);
        run_with_timeout(&mut cmd, Duration::from_secs(30))
    }
}
