//! Test harness for running viscsi against real third-party iSCSI peers on loopback.
//!
//! The integration tests of the `viscsi` binary (`crates/viscsi/tests/peers_*.rs`) and the
//! benchmark script use this crate to
//!
//! * start the target under test — `viscsi target` or, as a reference, `tgtd` — on a free
//!   `127.0.0.1` port with memory- or file-backed LUNs and optional (mutual) CHAP
//!   ([`target`]);
//! * run peer tools with a timeout and captured output ([`process`]), after checking that they
//!   are installed ([`tools::require_tool`], which fails loudly instead of skipping);
//! * parse the verbose output of libiscsi's conformance suite `iscsi-test-cu` ([`testcu`]);
//! * build a tiny Linux guest (Debian cloud kernel + busybox initramfs) and boot it under QEMU
//!   TCG with iSCSI disks ([`guest`]);
//! * capture the loopback traffic with `tshark` and check every iSCSI PDU ([`tshark`]).
//!
//! Every daemon the harness starts is owned by a guard that stops it on drop (also while a test
//! panics), and is killed by the kernel if the test process dies (`PR_SET_PDEATHSIG`). Ports,
//! tgtd control ports and temporary directories are unique per test process, so the tests can
//! run in parallel under cargo-nextest.
//!
//! The peers are system packages; `scripts/install-peers` installs them.

pub mod agent;
pub mod guest;
pub mod netns;
pub mod ports;
pub mod process;
pub mod target;
pub mod testcu;
pub mod tools;
pub mod tshark;

mod tempdir;

pub use ports::PortLease;
pub use process::{run_with_timeout, CommandOutput, Daemon};
pub use target::{Chap, LunBacking, RunningTarget, TargetConfig, TargetKind};
pub use tempdir::TempDir;
pub use tools::require_tool;

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs an installed peer tool (checked with [`require_tool`]) with a timeout.
pub fn run_tool(tool: &str, args: &[&str], timeout: Duration) -> CommandOutput {
    let path = require_tool(tool);
    run_with_timeout(Command::new(path).args(args), timeout)
}

/// Result of libiscsi's `iscsi-perf`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerfResult {
    /// Average I/O operations per second over the run.
    pub iops: u64,
    /// Average throughput in MiB/s (iscsi-perf's "MB/s" is MiB/s).
    pub mib_per_s: u64,
}

/// Parses the final `iops average N (M MB/s)` of iscsi-perf output (progress lines end in `\r`).
pub fn parse_iscsi_perf(text: &str) -> Option<PerfResult> {
    text.split(['\r', '\n'])
        .filter_map(|line| {
            let rest = &line[line.rfind("iops average ")? + "iops average ".len()..];
            let (iops, rest) = rest.split_once(" (")?;
            let mib = rest.split_whitespace().next()?;
            Some(PerfResult {
                iops: iops.trim().parse().ok()?,
                mib_per_s: mib.parse().ok()?,
            })
        })
        .next_back()
}

/// Hex MD5 of `len` bytes of `path` starting at `offset` (panics if the file is shorter).
pub fn md5_of_file_range(path: &Path, offset: u64, len: u64) -> String {
    use md5::Digest;
    use std::io::{Seek, SeekFrom};
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    file.seek(SeekFrom::Start(offset)).expect("seek");
    let mut hasher = md5::Md5::new();
    let mut remaining = len;
    let mut buf = vec![0u8; 1 << 20];
    while remaining > 0 {
        let want = remaining.min(buf.len() as u64) as usize;
        file.read_exact(&mut buf[..want]).unwrap_or_else(|e| {
            panic!(
                "{}: short read at {} (+{want}): {e}",
                path.display(),
                offset + len - remaining
            )
        });
        hasher.update(&buf[..want]);
        remaining -= want as u64;
    }
    hex(&hasher.finalize())
}

/// `len` pseudo-random (xorshift, seeded) bytes: test data that differs per seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// MD5 of `mib` MiB at `offset_mib` MiB of the LUN at `url` (`iscsi://…`), read by libiscsi
/// through `qemu-img dd` into the file `scratch`.
pub fn qemu_img_md5(url: &str, offset_mib: u64, mib: u64, scratch: &Path) -> String {
    const MIB: u64 = 1 << 20;
    let dd = run_tool(
        "qemu-img",
        &[
            "dd",
            "-f",
            "raw",
            "-O",
            "raw",
            "bs=1M",
            &format!("skip={offset_mib}"),
            // qemu-img dd counts the skipped blocks in `count`.
            &format!("count={}", offset_mib + mib),
            &format!("if={url}"),
            &format!("of={}", scratch.display()),
        ],
        Duration::from_secs(60),
    );
    dd.assert_success();
    let len = std::fs::metadata(scratch).expect("dd output").len();
    assert_eq!(len, mib * MIB, "qemu-img dd output size");
    md5_of_file_range(scratch, 0, mib * MIB)
}

/// Lower-case hex of a byte slice.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `len` pseudo-random (xorshift, seeded) bytes to a new file at `path`.
///
/// Fast enough for a GiB and incompressible enough that no layer can cheat by detecting zeros.
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    use std::io::Write;
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display())),
    );
    let mut state = seed | 1;
    let mut written = 0u64;
    let mut chunk = vec![0u8; 1 << 20];
    while written < len {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = (len - written).min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n]).expect("write random file");
        written += n as u64;
    }
    out.flush().expect("flush random file");
}
