//! Running peer commands with a timeout, and owning long-running daemons.
//!
//! Every child gets its own process group and `PR_SET_PDEATHSIG(SIGKILL)`, so nothing outlives
//! the test that started it, even when the test process itself is killed.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Makes `cmd` die with the test: own process group, SIGKILL when the parent goes away.
fn harden(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls the
    // async-signal-safe syscalls prctl(2) and setpgid(2); it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the process group led by `pid` (every child is a group leader).
pub fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-(pid as libc::pid_t), signal);
    }
}

/// The result of [`run_with_timeout`].
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit status (`None` only if the process could not be reaped).
    pub status: Option<ExitStatus>,
    /// Whether the timeout expired and the process was killed.
    pub timed_out: bool,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl CommandOutput {
    /// Exited by itself with status 0.
    pub fn success(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    /// Exit code, if it exited normally.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Signal that killed it, if any.
    pub fn signal(&self) -> Option<i32> {
        self.status.and_then(|s| s.signal())
    }

    /// stdout followed by stderr.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Panics (with the whole output) unless the command succeeded.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed: {self}");
        self
    }

    /// Panics (with the whole output) if the command succeeded or timed out: it must be refused.
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(
            !self.timed_out,
            "command timed out instead of failing: {self}"
        );
        assert!(
            self.signal().is_none(),
            "command crashed instead of failing: {self}"
        );
        assert!(
            !self.success(),
            "command succeeded but should have failed: {self}"
        );
        self
    }
}

impl fmt::Display for CommandOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (self.timed_out, self.status) {
            (true, _) => "TIMED OUT (killed)".to_string(),
            (false, Some(s)) => s.to_string(),
            (false, None) => "unknown status".to_string(),
        };
        write!(
            f,
            "`{}` -> {status} after {:.1} s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.elapsed.as_secs_f64(),
            tail(&self.stdout, 200),
            tail(&self.stderr, 200)
        )
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} lines cut ...]\n"));
    }
    out.push_str(&all[start..].join("\n"));
    out
}

/// Renders a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, capturing its output; after `timeout` it gets SIGTERM, then SIGKILL
/// two seconds later. stdin is /dev/null. Panics only if the program cannot be started.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> CommandOutput {
    let command = describe(cmd);
    harden(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let pid = child.id();
    let out_reader = spawn_reader(child.stdout.take().expect("piped stdout"));
    let err_reader = spawn_reader(child.stderr.take().expect("piped stderr"));
    let mut timed_out = false;
    let mut term_sent_at: Option<Instant> = None;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(_) => break None,
        }
        if start.elapsed() >= timeout {
            match term_sent_at {
                None => {
                    timed_out = true;
                    signal_group(pid, libc::SIGTERM);
                    term_sent_at = Some(Instant::now());
                }
                Some(t) if t.elapsed() > Duration::from_secs(2) => {
                    signal_group(pid, libc::SIGKILL);
                }
                Some(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Grandchildren may still hold the pipes open; they belong to the group.
    signal_group(pid, libc::SIGKILL);
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    CommandOutput {
        command,
        status,
        timed_out,
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// A long-running child process (target, tshark, …) whose stdout and stderr go to a log file.
/// Dropping it sends SIGTERM, waits up to five seconds, then SIGKILLs the whole process group.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    command: String,
    child: Child,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `cmd` with output to `log_path` (created or truncated).
    pub fn spawn(name: &str, cmd: &mut Command, log_path: &Path) -> Daemon {
        let command = describe(cmd);
        let log = File::create(log_path)
            .unwrap_or_else(|e| panic!("cannot create log {}: {e}", log_path.display()));
        let log2 = log.try_clone().expect("clone log file handle");
        harden(cmd);
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} (`{command}`): {e}"));
        Daemon {
            name: name.to_string(),
            command,
            child,
            log_path: log_path.to_path_buf(),
            exit: None,
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line it was started with.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Path of its log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Current contents of its log file.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `Some(status)` once it has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Waits up to `timeout` for it to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the daemon itself and waits up to `grace` for it to exit.
    /// Returns its exit status, or `None` if it is still running.
    pub fn signal_and_wait(&mut self, signal: libc::c_int, grace: Duration) -> Option<ExitStatus> {
        if self.is_running() {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, signal);
            }
        }
        self.wait_timeout(grace)
    }

    /// SIGKILLs the process group and reaps the daemon.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        signal_group(self.child.id(), libc::SIGKILL);
        if self.exit.is_none() {
            self.exit = self.child.wait().ok();
        }
        self.exit
    }

    /// Name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.is_running() {
            self.signal_and_wait(libc::SIGTERM, Duration::from_secs(5));
        }
        // Also reaps helpers the daemon may have left in its group.
        self.kill();
    }
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`, or panics after `timeout`.
/// `alive` is polled in between so that a daemon that died is reported at once.
pub fn wait_for_listener(
    port: u16,
    timeout: Duration,
    alive: impl FnMut() -> Result<(), String>,
) -> Result<Duration, String> {
    wait_for_listener_at(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        timeout,
        alive,
    )
}

/// [`wait_for_listener`] for any address.
pub fn wait_for_listener_at(
    addr: std::net::SocketAddr,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        alive()?;
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return Err(format!("nothing listening on {addr} after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
