//! The driver side of a split virtqueue (virtio 1.2 §2.7): descriptor table, available ring
//! (written here), used ring (read here), all in shared guest memory.
//!
//! No EVENT_IDX, no indirect descriptors: the driver asks for every interrupt (avail flags 0)
//! and kicks unless the device sets VRING_USED_F_NO_NOTIFY.

use std::sync::atomic::{fence, Ordering};

use crate::memory::SharedMemory;

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (otherwise it reads it).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Used ring flag: the device does not need kicks.
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Where the three parts of one virtqueue live in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Layout {
    /// The layout of a queue of `size` entries starting at `base` (16-aligned), and the first
    /// address after it.
    pub(crate) fn at(base: u64, size: u16) -> (Layout, u64) {
        let n = u64::from(size);
        let desc = base.next_multiple_of(16);
        let avail = desc + 16 * n;
        // flags, idx, ring[n], used_event
        let used = (avail + 4 + 2 * n + 2).next_multiple_of(4);
        // flags, idx, ring[n] of {id u32, len u32}, avail_event
        let end = used + 4 + 8 * n + 2;
        (
            Layout {
                size,
                desc,
                avail,
                used,
            },
            end,
        )
    }
}

/// One descriptor of a chain as the driver means it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A descriptor written verbatim (for bad-input tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Guest-physical address (may be made invalid on purpose).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// VIRTQ_DESC_F_* flags (1 NEXT, 2 WRITE, 4 INDIRECT).
    pub flags: u16,
    /// Index of the next descriptor, written as given.
    pub next: u16,
}

/// Driver-side state of one split virtqueue.
pub(crate) struct Ring {
    pub layout: Layout,
    free: Vec<u16>,
    is_free: Vec<bool>,
    next_avail: u16,
    last_used: u16,
}

impl Ring {
    /// A ring over zeroed memory at `layout` (the memfd starts zeroed: flags and indexes 0).
    pub(crate) fn new(layout: Layout) -> Self {
        let n = layout.size;
        Ring {
            layout,
            // Popped from the end: lowest index first.
            free: (0..n).rev().collect(),
            is_free: vec![true; usize::from(n)],
            next_avail: 0,
            last_used: 0,
        }
    }

    pub(crate) fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains handed to the device and not yet used.
    pub(crate) fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }

    /// Writes a chain into free descriptors; returns the head and the descriptor indexes used
    /// (into `taken`). None if there are not enough free descriptors.
    pub(crate) fn add_chain(
        &mut self,
        mem: &SharedMemory,
        bufs: &[Buf],
        taken: &mut [u16],
    ) -> Option<u16> {
        assert!(!bufs.is_empty() && taken.len() >= bufs.len());
        if self.free.len() < bufs.len() {
            return None;
        }
        for t in taken.iter_mut().take(bufs.len()) {
            *t = self.free.pop().expect("counted above");
            self.is_free[usize::from(*t)] = false;
        }
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if b.writable { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = if last {
                0
            } else {
                flags |= VIRTQ_DESC_F_NEXT;
                taken[i + 1]
            };
            self.write_desc(
                mem,
                taken[i],
                RawDescriptor {
                    addr: b.addr,
                    len: b.len,
                    flags,
                    next,
                },
            );
        }
        Some(taken[0])
    }

    /// Where `add_raw` of `n` descriptors would put its head: the lowest run of `n` free
    /// consecutive descriptors.
    pub(crate) fn raw_head(&self, n: usize) -> Option<u16> {
        if n == 0 || n > self.is_free.len() {
            return None;
        }
        let mut run = 0;
        for (i, &f) in self.is_free.iter().enumerate() {
            run = if f { run + 1 } else { 0 };
            if run == n {
                return Some((i + 1 - n) as u16);
            }
        }
        None
    }

    /// Writes `chain` verbatim into consecutive free descriptors; returns the head.
    pub(crate) fn add_raw(&mut self, mem: &SharedMemory, chain: &[RawDescriptor]) -> Option<u16> {
        let head = self.raw_head(chain.len())?;
        for (i, d) in chain.iter().enumerate() {
            let idx = head + i as u16;
            self.is_free[usize::from(idx)] = false;
            self.write_desc(mem, idx, *d);
        }
        self.free
            .retain(|&d| !(head..head + chain.len() as u16).contains(&d));
        Some(head)
    }

    fn write_desc(&self, mem: &SharedMemory, idx: u16, d: RawDescriptor) {
        let at = self.layout.desc + 16 * u64::from(idx);
        mem.write_u64(at, d.addr);
        mem.write_u32(at + 8, d.len);
        mem.write_u16(at + 12, d.flags);
        mem.write_u16(at + 14, d.next);
    }

    /// Gives descriptors back.
    pub(crate) fn release(&mut self, descriptors: impl IntoIterator<Item = u16>) {
        for d in descriptors {
            let slot = &mut self.is_free[usize::from(d)];
            assert!(!*slot, "descriptor {d} freed twice");
            *slot = true;
            self.free.push(d);
        }
    }

    /// Makes the chain at `head` available to the device. Returns whether the device wants a
    /// kick.
    pub(crate) fn publish(&mut self, mem: &SharedMemory, head: u16) -> bool {
        let slot = u64::from(self.next_avail % self.layout.size);
        mem.write_u16(self.layout.avail + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        // Release: the descriptors and the ring entry are visible before the index.
        mem.atomic_u16(self.layout.avail + 2)
            .store(self.next_avail.to_le(), Ordering::Release);
        // The index store must be ordered before reading the device's flags (a store-load
        // ordering: only a full fence gives it).
        fence(Ordering::SeqCst);
        let flags = u16::from_le(mem.atomic_u16(self.layout.used).load(Ordering::Relaxed));
        flags & VIRTQ_USED_F_NO_NOTIFY == 0
    }

    /// The next used element (id, len), if the device has produced one.
    pub(crate) fn pop_used(&mut self, mem: &SharedMemory) -> Option<(u32, u32)> {
        let idx = u16::from_le(mem.atomic_u16(self.layout.used + 2).load(Ordering::Acquire));
        if idx == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.layout.size);
        let at = self.layout.used + 4 + 8 * slot;
        let id = mem.read_u32(at);
        let len = mem.read_u32(at + 4);
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A device that consumes the ring from the same shared memory, as a back end would.
    pub(crate) struct FakeDevice {
        pub layout: Layout,
        pub last_avail: u16,
        pub used_idx: u16,
    }

    impl FakeDevice {
        pub(crate) fn new(layout: Layout) -> Self {
            FakeDevice {
                layout,
                last_avail: 0,
                used_idx: 0,
            }
        }

        /// Serves every available chain with `f(descriptors) -> used len`.
        pub(crate) fn serve(
            &mut self,
            mem: &SharedMemory,
            mut f: impl FnMut(&SharedMemory, &[RawDescriptor]) -> u32,
        ) -> usize {
            let n = self.layout.size;
            let avail_idx = u16::from_le(
                mem.atomic_u16(self.layout.avail + 2)
                    .load(Ordering::Acquire),
            );
            let mut served = 0;
            while self.last_avail != avail_idx {
                let slot = u64::from(self.last_avail % n);
                let b = mem.read(self.layout.avail + 4 + 2 * slot, 2);
                let head = u16::from_le_bytes([b[0], b[1]]);
                let mut chain = Vec::new();
                let mut i = head;
                loop {
                    let d = mem.read(self.layout.desc + 16 * u64::from(i), 16);
                    let desc = RawDescriptor {
                        addr: u64::from_le_bytes(d[0..8].try_into().unwrap()),
                        len: u32::from_le_bytes(d[8..12].try_into().unwrap()),
                        flags: u16::from_le_bytes([d[12], d[13]]),
                        next: u16::from_le_bytes([d[14], d[15]]),
                    };
                    chain.push(desc);
                    if desc.flags & VIRTQ_DESC_F_NEXT == 0 {
                        break;
                    }
                    assert!(chain.len() <= usize::from(n), "descriptor loop");
                    i = desc.next;
                }
                let len = f(mem, &chain);
                let uslot = u64::from(self.used_idx % n);
                mem.write_u32(self.layout.used + 4 + 8 * uslot, u32::from(head));
                mem.write_u32(self.layout.used + 8 + 8 * uslot, len);
                self.used_idx = self.used_idx.wrapping_add(1);
                mem.atomic_u16(self.layout.used + 2)
                    .store(self.used_idx.to_le(), Ordering::Release);
                self.last_avail = self.last_avail.wrapping_add(1);
                served += 1;
            }
            served
        }
    }

    #[test]
    fn layout_matches_the_spec_sizes() {
        let (l, end) = Layout::at(0, 128);
        assert_eq!(l.desc, 0);
        assert_eq!(l.avail, 2048);
        // 2048 + 4 + 256 + 2 = 2310 -> aligned to 4
        assert_eq!(l.used, 2312);
        assert_eq!(end, 2312 + 4 + 1024 + 2);
        let (l, _) = Layout::at(5, 4);
        assert_eq!(l.desc, 16);
    }

    #[test]
    fn chains_round_trip_through_a_fake_device() {
        let mem = SharedMemory::new("ring", 1 << 16).unwrap();
        let (layout, _) = Layout::at(0, 8);
        let mut ring = Ring::new(layout);
        let mut dev = FakeDevice::new(layout);
        mem.write(0x1000, b"request");
        let mut taken = [0u16; 4];
        // Wraps the 8-entry ring several times.
        for round in 0..20u32 {
            let bufs = [
                Buf {
                    addr: 0x1000,
                    len: 7,
                    writable: false,
                },
                Buf {
                    addr: 0x2000,
                    len: 4,
                    writable: true,
                },
            ];
            let head = ring.add_chain(&mem, &bufs, &mut taken).unwrap();
            assert!(ring.publish(&mem, head));
            assert_eq!(ring.in_flight(), 1);
            let served = dev.serve(&mem, |m, chain| {
                assert_eq!(chain.len(), 2);
                assert_eq!(chain[0].flags, VIRTQ_DESC_F_NEXT);
                assert_eq!(chain[1].flags, VIRTQ_DESC_F_WRITE);
                assert_eq!(m.read(chain[0].addr, chain[0].len as usize), b"request");
                m.write(chain[1].addr, &round.to_le_bytes());
                4
            });
            assert_eq!(served, 1);
            assert_eq!(ring.pop_used(&mem), Some((u32::from(head), 4)));
            assert_eq!(ring.pop_used(&mem), None);
            assert_eq!(mem.read(0x2000, 4), round.to_le_bytes());
            ring.release(taken[..2].iter().copied());
            assert_eq!(ring.free_descriptors(), 8);
        }
    }

    #[test]
    fn full_ring_and_raw_runs() {
        let mem = SharedMemory::new("ring", 1 << 16).unwrap();
        let (layout, _) = Layout::at(0, 4);
        let mut ring = Ring::new(layout);
        let mut taken = [0u16; 4];
        let b = Buf {
            addr: 0x1000,
            len: 1,
            writable: false,
        };
        let h = ring.add_chain(&mem, &[b, b, b], &mut taken).unwrap();
        assert_eq!(h, 0);
        assert!(ring.add_chain(&mem, &[b, b], &mut taken).is_none());
        assert_eq!(ring.raw_head(1), Some(3));
        assert_eq!(ring.raw_head(2), None);
        ring.release([1]);
        assert_eq!(ring.raw_head(1), Some(1));
        let raw = RawDescriptor {
            addr: u64::MAX - 3,
            len: 100,
            flags: 0,
            next: 0,
        };
        assert_eq!(ring.add_raw(&mem, &[raw]), Some(1));
        assert_eq!(ring.free_descriptors(), 1);
        let d = mem.read(layout.desc + 16, 16);
        assert_eq!(
            u64::from_le_bytes(d[0..8].try_into().unwrap()),
            u64::MAX - 3
        );
    }
}
