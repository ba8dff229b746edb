//! Free TCP ports and tgtd control ports, safe across parallel test processes.
//!
//! cargo-nextest runs every test in its own process, so an in-process registry is not enough and
//! "bind port 0, close, hand the number on" races with other tests. A lease therefore holds an
//! exclusive `flock(2)` on `<temp_dir>/peer-harness-locks/<kind>-<n>.lock` for its lifetime (the
//! kernel drops it if the process dies), and TCP ports are taken below the kernel's ephemeral
//! range, so outgoing connections never grab them either.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// An exclusively held number (TCP port or tgtd control port), released on drop.
#[derive(Debug)]
pub struct PortLease {
    number: u16,
    _lock: File,
}

impl PortLease {
    /// The leased number.
    pub fn get(&self) -> u16 {
        self.number
    }
}

fn lock_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("peer-harness-locks");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

fn try_lock(kind: &str, number: u16) -> Option<File> {
    let path = lock_dir().join(format!("{kind}-{number}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ok()?;
    // SAFETY: flock(2) on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (rc == 0).then_some(file)
}

/// A start offset that differs between processes, so they do not all probe the same numbers.
fn spread(modulus: u32) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (std::process::id().wrapping_mul(2_654_435_761) ^ nanos) % modulus
}

/// Lowest port of the kernel's ephemeral (outgoing) range.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Leases a TCP port that is free on 127.0.0.1 and not leased by another test process.
pub fn lease_tcp_port() -> PortLease {
    const LOW: u16 = 20000;
    let high = ephemeral_low().clamp(LOW + 1000, 32768);
    let count = u32::from(high - LOW);
    let first = spread(count);
    for i in 0..count {
        let port = LOW + ((first + i) % count) as u16;
        let Some(lock) = try_lock("tcp", port) else {
            continue;
        };
        // Someone outside the harness (or a dying daemon) may still have it bound.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return PortLease {
                number: port,
                _lock: lock,
            };
        }
    }
    panic!("no free TCP port in {LOW}..{high}");
}

/// Leases a tgtd control port (`tgtd -C N`, socket `/var/run/tgtd/socket.N`) that no running
/// tgtd uses.
pub fn lease_tgtd_control_port() -> PortLease {
    const LOW: u16 = 1000;
    const COUNT: u32 = 8000;
    let first = spread(COUNT);
    for i in 0..COUNT {
        let number = LOW + ((first + i) % COUNT) as u16;
        let Some(lock) = try_lock("tgtd-ctl", number) else {
            continue;
        };
        let socket = format!("/var/run/tgtd/socket.{number}");
        // A live tgtd (not started by the harness) answers on its socket; a stale file does not.
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            continue;
        }
        return PortLease {
            number,
            _lock: lock,
        };
    }
    panic!("no free tgtd control port");
}

/// Leases a number in `low..low + count` under `kind` (e.g. network namespace slots).
pub fn lease_number(kind: &str, low: u16, count: u16) -> PortLease {
    let first = spread(u32::from(count));
    for i in 0..u32::from(count) {
        let number = low + ((first + i) % u32::from(count)) as u16;
        if let Some(lock) = try_lock(kind, number) {
            return PortLease {
                number,
                _lock: lock,
            };
        }
    }
    panic!("no free {kind} number in {low}..{}", low + count);
}
