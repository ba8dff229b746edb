//! The driver against a real vhost-user-blk back end: qemu-storage-daemon exporting a raw file.
//! Fails (does not skip) when qemu-storage-daemon is missing.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vhost_driver::wire::blk;
use vhost_driver::{DeviceKind, Driver, DriverError, DriverOptions};

const IMAGE_BYTES: u64 = 64 << 20;
const KIB4: u32 = 4096;
const MIB: u32 = 1 << 20;

struct Qsd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Qsd {
    fn start() -> Qsd {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(IMAGE_BYTES)
            .unwrap();
        let socket = dir.path().join("blk.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=1",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon must be installed (package qemu-utils)");
        Qsd { child, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("blk.sock")
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("disk.raw")
    }

    fn connect(&self, memory_bytes: u64) -> Driver {
        Driver::connect(
            &self.socket(),
            DriverOptions {
                kind: DeviceKind::Blk,
                request_queues: 1,
                queue_size: 128,
                memory_bytes,
            },
        )
        .expect("connect to qemu-storage-daemon")
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// xorshift64*: deterministic random bytes.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut v = vec![0; len];
    f.read_exact_at(&mut v, offset).unwrap();
    v
}

#[test]
fn blk_io_against_qemu_storage_daemon() {
    let qsd = Qsd::start();
    let mut d = qsd.connect(128 << 20);
    let offered = d.features();
    assert_ne!(offered & (1 << 32), 0, "VERSION_1 offered: {offered:#x}");

    let cfg = d.blk_config().unwrap();
    assert_eq!(cfg.capacity_sectors, IMAGE_BYTES / 512);
    assert_eq!(cfg.blk_size, 512);
    assert_eq!(cfg.num_queues, 1);

    // Single requests, 4 KiB and 1 MiB, at several sectors.
    for (i, (sector, len)) in [
        (0u64, KIB4),
        (8, KIB4),
        (12345, KIB4),
        (2048, MIB),
        (100_000, MIB),
    ]
    .into_iter()
    .enumerate()
    {
        let data = random_bytes(i as u64 + 1, len as usize);
        let (status, _) = d.blk_request(blk::T_OUT, sector, &data, 0).unwrap();
        assert_eq!(status, blk::S_OK);
        let (status, back) = d.blk_request(blk::T_IN, sector, &[], len).unwrap();
        assert_eq!(status, blk::S_OK);
        assert!(back == data, "read back at sector {sector} differs");
        let (status, _) = d.blk_request(blk::T_FLUSH, 0, &[], 0).unwrap();
        assert_eq!(status, blk::S_OK);
        assert!(
            file_bytes(&qsd.image(), sector * 512, len as usize) == data,
            "file at sector {sector} differs"
        );
    }

    // Pipelined, QD32, with caller buffers: write, then read into other buffers and compare.
    for len in [KIB4, MIB] {
        let per = u64::from(len / 512);
        let base = 4096u64; // sector 4096 = 2 MiB in
        let bufs: Vec<u64> = (0..32).map(|_| d.alloc(len)).collect();
        let data: Vec<Vec<u8>> = (0..32)
            .map(|i| random_bytes(1000 + i + u64::from(len), len as usize))
            .collect();
        for (i, (&addr, bytes)) in bufs.iter().zip(&data).enumerate() {
            d.write_guest(addr, bytes);
            d.submit_blk_buf(0, i as u64, blk::T_OUT, base + i as u64 * per, addr, len)
                .unwrap();
        }
        let mut done = [false; 32];
        let mut n = 0;
        while n < 32 {
            let cs = d.reap(Duration::from_secs(10)).unwrap();
            assert!(!cs.is_empty(), "pipelined writes timed out");
            for c in cs {
                assert_eq!((c.queue, c.status), (0, blk::S_OK), "{c:?}");
                assert!(!done[c.id as usize]);
                done[c.id as usize] = true;
                n += 1;
            }
        }
        let rbufs: Vec<u64> = (0..32).map(|_| d.alloc(len)).collect();
        for (i, &addr) in rbufs.iter().enumerate() {
            d.submit_blk_buf(
                0,
                100 + i as u64,
                blk::T_IN,
                base + i as u64 * per,
                addr,
                len,
            )
            .unwrap();
        }
        let mut n = 0;
        while n < 32 {
            let cs = d.reap(Duration::from_secs(10)).unwrap();
            assert!(!cs.is_empty(), "pipelined reads timed out");
            for c in cs {
                assert_eq!(c.status, blk::S_OK);
                assert_eq!(c.used_len, len + 1, "data plus status written");
                let i = (c.id - 100) as usize;
                assert!(
                    d.read_guest(rbufs[i], len as usize) == data[i],
                    "QD32 read {i}"
                );
                n += 1;
            }
        }
        let (status, _) = d.blk_request(blk::T_FLUSH, 0, &[], 0).unwrap();
        assert_eq!(status, blk::S_OK);
        for (i, bytes) in data.iter().enumerate() {
            let off = (base + i as u64 * per) * 512;
            assert!(
                file_bytes(&qsd.image(), off, len as usize) == *bytes,
                "file QD32 {i}"
            );
        }
    }

    // Preallocated slot buffers (the benchmark's path): 64 reads in flight over two rounds.
    for round in 0..2u64 {
        for i in 0..32u64 {
            d.submit_blk(0, round * 32 + i, blk::T_IN, i * 8, KIB4)
                .unwrap();
        }
        let mut n = 0;
        while n < 32 {
            let cs = d.reap(Duration::from_secs(10)).unwrap();
            assert!(!cs.is_empty());
            assert!(cs.iter().all(|c| c.status == blk::S_OK));
            n += cs.len();
        }
    }

    // GET_ID: 20 bytes of serial (qsd answers OK; the serial may be empty).
    let (status, id) = d.blk_request(blk::T_GET_ID, 0, &[], 20).unwrap();
    assert_eq!(status, blk::S_OK);
    assert_eq!(id.len(), 20);

    // Reading past the end fails with IOERR, not a hang.
    let (status, _) = d
        .blk_request(blk::T_IN, IMAGE_BYTES / 512, &[], KIB4)
        .unwrap();
    assert_ne!(status, blk::S_OK);

    // Everything was reaped: the back end's next avail index is the number of chains made
    // available: 5 x (write, read, flush), 2 x (64 pipelined + flush), 64 slot reads, GET_ID,
    // the read past the end.
    assert_eq!(d.in_flight(0), 0);
    assert_eq!(d.stop_queue(0).unwrap(), 15 + 2 * 65 + 64 + 1 + 1);
    d.disconnect();
}

#[test]
fn dirty_log_marks_read_buffers() {
    let qsd = Qsd::start();
    let mut d = qsd.connect(64 << 20);
    let offered = d.features();
    match d.enable_dirty_log() {
        Ok(()) => {}
        Err(DriverError::Protocol(why)) => {
            // qsd without LOG_ALL: the driver says so cleanly.
            assert_eq!(offered & (1 << 26), 0, "LOG_ALL offered but refused: {why}");
            return;
        }
        Err(e) => panic!("enable_dirty_log: {e}"),
    }
    let _ = d.dirty_pages();
    let buf = d.alloc(MIB + KIB4);
    let buf = buf.next_multiple_of(4096);
    d.submit_blk_buf(0, 7, blk::T_IN, 0, buf, MIB).unwrap();
    let cs = d.reap(Duration::from_secs(10)).unwrap();
    assert_eq!(cs.len(), 1);
    assert_eq!(cs[0].status, blk::S_OK);
    let dirty = d.dirty_pages();
    let first = buf / 4096;
    for page in first..first + u64::from(MIB / 4096) {
        assert!(
            dirty.contains(&page),
            "page {page} of the read buffer not dirty: {dirty:?}"
        );
    }
    // Cleared by the call; a write (device reads guest memory) dirties no data pages.
    assert!(d.dirty_pages().is_empty());
    let wbuf = d.alloc(KIB4);
    d.submit_blk_buf(0, 8, blk::T_OUT, 0, wbuf, KIB4).unwrap();
    assert_eq!(d.reap(Duration::from_secs(10)).unwrap().len(), 1);
    let dirty = d.dirty_pages();
    assert!(!dirty.contains(&(wbuf / 4096)), "{dirty:?}");
    d.disconnect();
}
