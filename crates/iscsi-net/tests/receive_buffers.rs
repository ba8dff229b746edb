//! How many allocations and reads [`PduReader`] needs for large PDUs whose data segments the
//! caller keeps (as the initiator keeps Data-In segments until the read completes).
//!
//! The allocator of this test binary counts large allocations; the byte stream counts reads.
//! One test only, so nothing else allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use iscsi_net::PduReader;
use iscsi_wire::frame::encode_pdu;
use iscsi_wire::{DataIn, FrameLimits, RESERVED_TAG};
use tokio::io::{AsyncRead, ReadBuf};

/// Allocations (and reallocations) of at least this size are counted.
const LARGE: usize = 16 * 1024;

static LARGE_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static LARGE_BYTES: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; counting has no effect
// on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's guarantees for `alloc` are passed on as they are.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout (every allocation here does).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`, and the caller's guarantees for `realloc` hold.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    if size >= LARGE {
        LARGE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        LARGE_BYTES.fetch_add(size, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A byte stream that hands out at most `max_read` bytes per read, counting reads.
struct Wire {
    bytes: Vec<u8>,
    at: usize,
    max_read: usize,
    reads: usize,
}

impl AsyncRead for Wire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = buf
            .remaining()
            .min(self.max_read)
            .min(self.bytes.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.bytes[at..at + n]);
        self.at += n;
        self.reads += 1;
        Poll::Ready(Ok(()))
    }
}

/// Data-In PDUs with data segments of these sizes, framed with `limits`.
fn stream(segments: impl IntoIterator<Item = usize>, limits: FrameLimits) -> Vec<u8> {
    let mut wire = Vec::new();
    for (sn, len) in segments.into_iter().enumerate() {
        let d = DataIn {
            itt: 1,
            ttt: RESERVED_TAG,
            data_sn: sn as u32,
            ..Default::default()
        };
        encode_pdu(&d.to_bhs(), &[], &vec![0x5a; len], limits, &mut wire);
    }
    wire
}

struct Measured {
    allocs: usize,
    alloc_bytes: usize,
    reads: usize,
}

/// Reads every PDU of `bytes`, keeping the data segments of the last `keep` PDUs alive.
async fn receive(bytes: Vec<u8>, limits: FrameLimits, max_read: usize, keep: usize) -> Measured {
    let total = bytes.len();
    let wire = Wire {
        bytes,
        at: 0,
        max_read,
        reads: 0,
    };
    let mut reader = PduReader::new(wire);
    reader.set_limits(limits);
    let mut kept = VecDeque::with_capacity(keep + 1);
    let (allocs, alloc_bytes) = (
        LARGE_ALLOCS.load(Ordering::Relaxed),
        LARGE_BYTES.load(Ordering::Relaxed),
    );
    let mut received = 0;
    while let Some(item) = reader.next().await.expect("read") {
        let pdu = item.expect("PDU");
        received += pdu.data.len();
        kept.push_back(pdu.data);
        if kept.len() > keep {
            kept.pop_front();
        }
    }
    let measured = Measured {
        allocs: LARGE_ALLOCS.load(Ordering::Relaxed) - allocs,
        alloc_bytes: LARGE_BYTES.load(Ordering::Relaxed) - alloc_bytes,
        reads: reader.get_ref().reads,
    };
    assert!(received > 0 && received <= total);
    measured
}

const K: usize = 1024;

/// Runs `sizes` with and without digests, reads as large as the reader asks for, the last
/// `keep` PDUs held; prints what it took (`--nocapture`) and returns the worst run.
async fn worst(name: &str, sizes: &[usize], keep: usize) -> (f64, f64, f64) {
    let pdus = sizes.len() as f64;
    let data = sizes.iter().sum::<usize>() as f64;
    let mut worst = (0f64, 0f64, 0f64);
    for digests in [false, true] {
        let limits = FrameLimits {
            header_digest: digests,
            data_digest: digests,
            max_recv_data_segment_len: 256 * K as u32,
        };
        let wire = stream(sizes.iter().copied(), limits);
        let m = receive(wire, limits, usize::MAX, keep).await;
        let (allocs, bytes, reads) = (
            m.allocs as f64 / pdus,
            m.alloc_bytes as f64 / data,
            m.reads as f64 / pdus,
        );
        println!(
            "{name:10} keep {keep:2} digests {digests:5}: {allocs:.2} allocations and {reads:.2} \
             reads per PDU, {bytes:.2} bytes allocated per byte of data"
        );
        worst = (worst.0.max(allocs), worst.1.max(bytes), worst.2.max(reads));
    }
    worst
}

#[tokio::test(flavor = "current_thread")]
async fn kept_large_segments_need_one_allocation_each_and_no_copy() {
    // Equal large PDUs (the Data-In of 1 MiB reads): an allocation for about four of them,
    // no copy, as few reads as the stream allows. (Before: per PDU a 64 KiB read, then an
    // allocation for the rest with those 64 KiB copied over: 2 allocations and 2 reads per
    // PDU, 1.25 bytes allocated per byte.)
    let (allocs, bytes, reads) = worst("256K", &[256 * K; 64], 32).await;
    assert!(
        allocs < 0.3 && bytes < 1.05 && reads < 0.4,
        "{allocs} {bytes} {reads}"
    );

    // Large and small PDUs alternating: no large PDU is copied (at most one more small read
    // per PDU for its header).
    for (name, sizes) in [
        ("256K,4K", [256 * K, 4 * K].repeat(32)),
        ("256K,44K", [256 * K, 44 * K].repeat(32)),
    ] {
        let (allocs, bytes, reads) = worst(name, &sizes, 32).await;
        assert!(
            allocs <= 1.0 && bytes < 1.05 && reads < 2.1,
            "{allocs} {bytes} {reads}"
        );
    }

    // Small PDUs come many to a read, as before.
    let (_, bytes, reads) = worst("4K", &[4 * K; 4096], 32).await;
    assert!(bytes < 1.1 && reads < 0.1, "{bytes} {reads}");
    let mostly_small: Vec<usize> = std::iter::once(256 * K)
        .chain(std::iter::repeat_n(4 * K, 31))
        .collect();
    let (_, bytes, reads) = worst("256K,31x4K", &mostly_small.repeat(8), 32).await;
    assert!(bytes < 1.1 && reads < 0.3, "{bytes} {reads}");

    // Nothing kept (the target copies Data-Out out at once): the buffer is reused.
    for (name, sizes) in [
        ("256K", vec![256 * K; 64]),
        ("256K,4K", [256 * K, 4 * K].repeat(32)),
        ("4K", vec![4 * K; 4096]),
    ] {
        let (_, bytes, reads) = worst(name, &sizes, 0).await;
        assert!(bytes < 0.1 && reads < 1.1, "{bytes} {reads}");
    }
}
