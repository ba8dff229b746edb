//! Shared by the adapter's peer tests: the `viscsi` binary, a `viscsi hba serve` process,
//! initiator clients for a target, and SCSI reads and writes through a `DataPath`.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use datapath::{Command as ScsiCommand, DataPath, InitiatorClient, PathError, Status, TaskAttr};
use peer_harness::{Daemon, RunningTarget, TargetConfig, TargetKind, TempDir};

/// The `viscsi` binary cargo built for these tests.
pub fn viscsi_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_viscsi"))
}

pub fn viscsi_target() -> TargetKind {
    TargetKind::Viscsi {
        binary: viscsi_bin().to_owned(),
    }
}

/// A `viscsi hba serve` process; killed on drop.
pub struct Hba {
    pub daemon: Daemon,
    pub socket: PathBuf,
    pub name: String,
    _dir: TempDir,
}

impl Hba {
    pub fn start(name: &str, vfs: u32) -> Hba {
        let dir = TempDir::new("hba");
        let socket = dir.join(&format!("{name}.sock"));
        let mut cmd = Command::new(viscsi_bin());
        cmd.args(["hba", "serve", "--name", name, "--vfs"])
            .arg(vfs.to_string())
            .arg("--socket")
            .arg(&socket);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,hba=debug");
        }
        let mut daemon = Daemon::spawn(&format!("hba {name}"), &mut cmd, &dir.join("hba.log"));
        let start = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            if let Some(status) = daemon.exit_status() {
                panic!("hba exited ({status}):\n{}", daemon.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "hba does not listen:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Hba {
            daemon,
            socket,
            name: name.to_owned(),
            _dir: dir,
        }
    }

    /// The adapter's log, without terminal colours.
    pub fn log(&self) -> String {
        let log = self.daemon.log();
        let mut plain = String::with_capacity(log.len());
        let mut rest = log.as_str();
        while let Some(at) = rest.find('\x1b') {
            plain.push_str(&rest[..at]);
            rest = &rest[at..];
            rest = rest.find('m').map_or("", |end| &rest[end + 1..]);
        }
        plain.push_str(rest);
        plain
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A 64 MiB memory LUN on `kind`.
pub fn start_target(kind: &TargetKind, iqn: &str) -> RunningTarget {
    RunningTarget::start(kind, TargetConfig::new(iqn).mem_lun(64 << 20))
}

/// A fresh VM identity for `target`.
pub fn client_for(target: &RunningTarget, vm: &str) -> InitiatorClient {
    let mut c = InitiatorClient::new_for_vm(vm, vec![target.portal()], target.iqn().to_owned());
    c.recovery.connect_timeout_ms = 2000;
    c.recovery.login_timeout_ms = 2000;
    c
}

/// The LUN field of data LUN `index` of `target`.
pub fn lun_of(target: &RunningTarget, index: usize) -> u64 {
    scsi::lun::encode(u64::from(target.lun_id(index)))
}

fn rw16(op: u8, lba: u64, blocks: u32) -> Bytes {
    let mut cdb = [0u8; 16];
    cdb[0] = op;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    Bytes::copy_from_slice(&cdb)
}

pub fn read16(lun: u64, lba: u64, bytes: u32) -> ScsiCommand {
    ScsiCommand {
        lun,
        cdb: rw16(0x88, lba, bytes / 512),
        data_out: Bytes::new(),
        read_len: bytes,
        attr: TaskAttr::Simple,
    }
}

pub fn write16(lun: u64, lba: u64, data: Bytes) -> ScsiCommand {
    ScsiCommand {
        lun,
        cdb: rw16(0x8a, lba, (data.len() / 512) as u32),
        data_out: data,
        read_len: 0,
        attr: TaskAttr::Simple,
    }
}

pub fn inquiry_cmd(lun: u64) -> ScsiCommand {
    ScsiCommand {
        lun,
        cdb: Bytes::from_static(&[0x12, 0, 0, 0, 255, 0]),
        data_out: Bytes::new(),
        read_len: 255,
        attr: TaskAttr::Simple,
    }
}

/// Runs `cmd` and requires GOOD (retrying once-per-nexus UNIT ATTENTIONs).
pub async fn good(path: &dyn DataPath, cmd: ScsiCommand) -> Result<Bytes, PathError> {
    for _ in 0..4 {
        let c = path.submit(cmd.clone()).await?;
        if c.status == Status::GOOD {
            return Ok(c.data.into_bytes());
        }
        let unit_attention =
            c.status == Status::CHECK_CONDITION && c.sense.len() > 2 && (c.sense[2] & 0x0f) == 6;
        assert!(
            unit_attention,
            "status {:?} sense {:02x?}",
            c.status,
            &c.sense[..]
        );
    }
    panic!("unit attentions do not stop")
}

/// TEST UNIT READY until GOOD: takes the first UNIT ATTENTION of a new I_T nexus out of
/// the way, so that counters of the commands that follow are exact.
pub async fn ready(path: &dyn DataPath, lun: u64) {
    let tur = ScsiCommand {
        lun,
        cdb: Bytes::from_static(&[0; 6]),
        data_out: Bytes::new(),
        read_len: 0,
        attr: TaskAttr::Simple,
    };
    good(path, tur).await.expect("TEST UNIT READY");
}

/// Pseudo-random bytes (xorshift), a multiple of 512.
pub fn random_data(len: usize, seed: u64) -> Bytes {
    let mut s = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.extend_from_slice(&s.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}
