//! A VM workload that proves nothing was lost, duplicated or reordered: a VMM stand-in on a
//! vhost-user-scsi socket that writes 4 KiB blocks to one LUN at queue depth 8, each stamped
//! with its sequence number, remembers the last stamp acknowledged per block, and at the end
//! reads every block back to check it. It can move to another socket the way a VMM does at
//! the end of a live migration.
//!
//! It also measures what the VM sees of a storage switchover: the longest pause between two
//! completions while a window is armed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{DeviceKind, Driver, DriverOptions};

const BLOCK: u32 = 4096;
const DEPTH: usize = 8;
const MAGIC: &[u8; 8] = b"viscsiDM";

/// What the controller asks of the workload.
pub enum Order {
    /// Move to another host's socket, as a VMM does at the end of a live migration: finish
    /// what is in flight, stop the rings (GET_VRING_BASE), connect to the new socket.
    MoveTo(PathBuf, mpsc::Sender<Result<Duration, String>>),
    /// Finish, read everything back, report.
    Stop,
}

/// Pauses between completions, measured while armed.
#[derive(Default)]
pub struct Gaps {
    armed: bool,
    last: Option<Instant>,
    longest: Duration,
    completions: u64,
}

impl Gaps {
    pub fn arm(&mut self) {
        self.armed = true;
        self.longest = Duration::ZERO;
        self.last = Some(Instant::now());
    }

    /// Disarms and returns the longest pause seen.
    pub fn disarm(&mut self) -> Duration {
        self.armed = false;
        self.longest
    }

    fn completed(&mut self) {
        let now = Instant::now();
        if self.armed {
            if let Some(last) = self.last {
                self.longest = self.longest.max(now - last);
            }
        }
        self.last = Some(now);
        self.completions += 1;
    }

    pub fn completions(&self) -> u64 {
        self.completions
    }
}

/// The workload's result.
pub struct Report {
    pub writes: u64,
    pub errors: u64,
    pub blocks_checked: u64,
    /// Blocks whose content was not the last acknowledged write (lost, stale or torn).
    pub mismatches: Vec<String>,
}

pub struct Workload {
    pub orders: mpsc::Sender<Order>,
    pub gaps: Arc<Mutex<Gaps>>,
    thread: std::thread::JoinHandle<Result<Report, String>>,
}

impl Workload {
    /// Connects to `socket` and starts writing to `lun` (`capacity` bytes).
    pub fn start(socket: &Path, lun: u16, capacity: u64) -> Result<Workload, String> {
        let driver = connect(socket)?;
        let gaps = Arc::new(Mutex::new(Gaps::default()));
        let (orders, inbox) = mpsc::channel();
        let blocks = (capacity / u64::from(BLOCK)).clamp(64, 4096) as u32;
        let thread = {
            let gaps = gaps.clone();
            std::thread::Builder::new()
                .name("demo-workload".into())
                .spawn(move || run(driver, lun, blocks, &inbox, &gaps))
                .map_err(|e| format!("cannot start the workload: {e}"))?
        };
        Ok(Workload {
            orders,
            gaps,
            thread,
        })
    }

    /// Moves the workload to `socket` (see [`Order::MoveTo`]); returns how long the VMM's
    /// own pause took.
    pub fn move_to(&self, socket: &Path) -> Result<Duration, String> {
        let (tx, rx) = mpsc::channel();
        self.orders
            .send(Order::MoveTo(socket.to_owned(), tx))
            .map_err(|_| "the workload stopped".to_string())?;
        rx.recv_timeout(Duration::from_secs(60))
            .map_err(|_| "the workload did not move".to_string())?
    }

    /// Arms the pause measurement.
    pub fn arm(&self) {
        if let Ok(mut g) = self.gaps.lock() {
            g.arm();
        }
    }

    /// The longest pause between completions since [`Workload::arm`].
    pub fn disarm(&self) -> Duration {
        self.gaps.lock().map(|mut g| g.disarm()).unwrap_or_default()
    }

    /// Writes completed so far.
    pub fn completions(&self) -> u64 {
        self.gaps.lock().map(|g| g.completions()).unwrap_or(0)
    }

    pub fn stop(self) -> Result<Report, String> {
        let _ = self.orders.send(Order::Stop);
        self.thread
            .join()
            .map_err(|_| "the workload panicked".to_string())?
    }
}

fn connect(socket: &Path) -> Result<Driver, String> {
    let options = DriverOptions {
        kind: DeviceKind::Scsi,
        request_queues: 1,
        queue_size: 128,
        memory_bytes: 16 << 20,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Driver::connect(socket, options) {
            Ok(d) => return Ok(d),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("cannot attach to {}: {e}", socket.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The stamped content of `block` written as write number `seq`.
fn stamp(seq: u64, block: u32) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK as usize];
    data[..8].copy_from_slice(MAGIC);
    data[8..16].copy_from_slice(&seq.to_le_bytes());
    data[16..20].copy_from_slice(&block.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(block);
    for chunk in data[20..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    data
}

fn rw10(opcode: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let n = blocks.to_be_bytes();
    [opcode, 0, l[0], l[1], l[2], l[3], 0, n[0], n[1], 0]
}

struct Attached {
    driver: Driver,
    /// One 4 KiB buffer per slot of the queue depth.
    buffers: Vec<u64>,
    free: Vec<usize>,
    /// Write id → (buffer, block).
    in_flight: HashMap<u64, (usize, u32)>,
}

impl Attached {
    fn new(mut driver: Driver) -> Attached {
        let buffers: Vec<u64> = (0..DEPTH).map(|_| driver.alloc(BLOCK)).collect();
        Attached {
            driver,
            free: (0..DEPTH).collect(),
            buffers,
            in_flight: HashMap::new(),
        }
    }
}

fn run(
    driver: Driver,
    lun: u16,
    blocks: u32,
    inbox: &mpsc::Receiver<Order>,
    gaps: &Mutex<Gaps>,
) -> Result<Report, String> {
    let mut bus = Attached::new(driver);
    let sectors_per_block = sector_ratio(&mut bus.driver, lun)?;
    let mut acknowledged: HashMap<u32, u64> = HashMap::new();
    let mut seq: u64 = 0;
    let mut errors = 0u64;
    let mut stopping = false;
    loop {
        match inbox.try_recv() {
            Ok(Order::MoveTo(socket, reply)) => {
                let started = Instant::now();
                let moved = drain(&mut bus, &mut acknowledged, &mut errors, gaps).and_then(|()| {
                    // The VMM stops its rings on the old host, then starts on the new one.
                    let vq = bus.driver.request_vq(0);
                    let _ = bus.driver.stop_queue(vq);
                    connect(&socket)
                });
                match moved {
                    Ok(driver) => {
                        let old = std::mem::replace(&mut bus, Attached::new(driver));
                        old.driver.disconnect();
                        let _ = reply.send(Ok(started.elapsed()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.clone()));
                        return Err(e);
                    }
                }
            }
            Ok(Order::Stop) | Err(mpsc::TryRecvError::Disconnected) => stopping = true,
            Err(mpsc::TryRecvError::Empty) => {}
        }
        if stopping {
            drain(&mut bus, &mut acknowledged, &mut errors, gaps)?;
            break;
        }
        while let Some(buffer) = bus.free.pop() {
            seq += 1;
            // Consecutive writes go to different blocks (7919 is prime to the block count
            // unless it divides it), so no two writes to one block are in flight together.
            let block = (seq.wrapping_mul(7919) % u64::from(blocks)) as u32;
            let addr = bus.buffers[buffer];
            bus.driver.write_guest(addr, &stamp(seq, block));
            let cdb = rw10(0x2a, block * sectors_per_block, sectors_per_block as u16);
            bus.driver
                .submit_scsi_buf(0, seq, lun, &cdb, addr, BLOCK, 0)
                .map_err(|e| format!("submit: {e}"))?;
            bus.in_flight.insert(seq, (buffer, block));
        }
        reap(&mut bus, &mut acknowledged, &mut errors, gaps)?;
    }
    let total_writes = gaps.lock().map(|g| g.completions()).unwrap_or(0);
    // Read every block back through the bus.
    let mut mismatches = Vec::new();
    let mut checked = 0u64;
    for (&block, &last) in &acknowledged {
        let cdb = rw10(0x28, block * sectors_per_block, sectors_per_block as u16);
        let reply = bus
            .driver
            .scsi_command(lun, &cdb, &[], BLOCK)
            .map_err(|e| format!("read back block {block}: {e}"))?;
        checked += 1;
        if reply.response != 0 || reply.status != 0 {
            mismatches.push(format!(
                "block {block}: read failed (response {}, status {:#x})",
                reply.response, reply.status
            ));
        } else if reply.data != stamp(last, block) {
            let found = reply
                .data
                .get(8..16)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                .unwrap_or(0);
            mismatches.push(format!(
                "block {block}: expected write #{last}, found #{found}"
            ));
        }
    }
    Ok(Report {
        writes: total_writes,
        errors,
        blocks_checked: checked,
        mismatches,
    })
}

/// 512-byte sectors (or whatever the LUN has) per 4 KiB block, from READ CAPACITY(10).
fn sector_ratio(driver: &mut Driver, lun: u16) -> Result<u32, String> {
    let cdb = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    // The first command of a new nexus may be answered with UNIT ATTENTION.
    for _ in 0..4 {
        let reply = driver
            .scsi_command(lun, &cdb, &[], 8)
            .map_err(|e| format!("READ CAPACITY: {e}"))?;
        if reply.response == 0 && reply.status == 0 && reply.data.len() == 8 {
            let size =
                u32::from_be_bytes([reply.data[4], reply.data[5], reply.data[6], reply.data[7]]);
            if size == 0 || BLOCK % size != 0 {
                return Err(format!("block size {size} does not divide 4096"));
            }
            return Ok(BLOCK / size);
        }
    }
    Err("READ CAPACITY failed".into())
}

fn reap(
    bus: &mut Attached,
    acknowledged: &mut HashMap<u32, u64>,
    errors: &mut u64,
    gaps: &Mutex<Gaps>,
) -> Result<(), String> {
    let done = bus
        .driver
        .reap(Duration::from_millis(100))
        .map_err(|e| format!("reap: {e}"))?;
    for c in done {
        let Some((buffer, block)) = bus.in_flight.remove(&c.id) else {
            continue;
        };
        bus.free.push(buffer);
        if c.response == 0 && c.status == 0 {
            // Writes to one block never overlap, so the later id is the later write.
            let last = acknowledged.entry(block).or_insert(0);
            *last = (*last).max(c.id);
            if let Ok(mut g) = gaps.lock() {
                g.completed();
            }
        } else {
            *errors += 1;
            // A failed write leaves the block undefined: stop checking it.
            acknowledged.remove(&block);
        }
    }
    Ok(())
}

fn drain(
    bus: &mut Attached,
    acknowledged: &mut HashMap<u32, u64>,
    errors: &mut u64,
    gaps: &Mutex<Gaps>,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !bus.in_flight.is_empty() {
        if Instant::now() > deadline {
            return Err(format!("{} writes never completed", bus.in_flight.len()));
        }
        reap(bus, acknowledged, errors, gaps)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_differ_per_write_and_block() {
        assert_ne!(stamp(1, 0), stamp(2, 0));
        assert_ne!(stamp(1, 0), stamp(1, 1));
        assert_eq!(&stamp(7, 3)[..8], MAGIC);
        assert_eq!(rw10(0x2a, 0x01020304, 8), [0x2a, 0, 1, 2, 3, 4, 0, 0, 8, 0]);
    }
}
