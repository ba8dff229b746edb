//! Shared memory for data-in, the model of a read's DMA buffer.
//!
//! The driver creates a memfd per VF queue, seals its size, maps it read-only and passes it
//! to the adapter with the queue's hello. For each read command it hands out a part of the
//! region ([`Pool::alloc`]) and names it in the SUBMIT, as a real driver puts DMA addresses
//! in a command's scatter list; the adapter copies the read's data there and completes with
//! a short COMPLETE_SHM frame. The driver gives the data to the caller as `Bytes` over the
//! region itself, so data-in crosses from the adapter without going through the socket and
//! without a copy on the host side. The part goes back to the pool when the last `Bytes` of
//! it is dropped.
//!
//! The rules that keep this sound: the adapter writes a buffer only while its command is in
//! flight; the driver reads it only after the completion, and never hands out a buffer of a
//! command that did not complete (the adapter might still write it: such buffers are kept
//! out of the pool for good). Sizes are sealed, so neither side can shrink the file under
//! the other's mapping.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// Default size of a queue's region.
pub const REGION_SIZE: u64 = 64 << 20;

/// Largest region an adapter maps.
pub const MAX_REGION_SIZE: u64 = 1 << 30;

/// Buffers are handed out in units of this many bytes.
const UNIT: u64 = 4096;

/// A mapped shared-memory region.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory mapped for the region's lifetime; it holds no
// thread-bound state. Which parts may be read or written when is the protocol's business
// (see the module docs), not the thread's.
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` only gives out reads of parts the protocol has completed and
// writes (by the adapter) of parts handed to it, never the same part to both at once.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`, unmapped once here;
        // every slice into it borrows the region, so none outlives it.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Region {
    fn map(fd: impl AsFd, len: u64, prot: ProtFlags) -> io::Result<Region> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("region too large"))?;
        // SAFETY: a fresh shared mapping of `len` bytes of `fd` at an address the kernel
        // chooses; it aliases no Rust object. The file is at least `len` bytes and sealed
        // against shrinking (checked by the callers), so every page stays backed.
        let ptr =
            unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0) }?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("null mapping"))?;
        Ok(Region { ptr, len })
    }

    /// The driver's side: a new sealed memfd of `len` bytes, mapped read-only, and the file
    /// to pass to the adapter.
    pub fn create(len: u64) -> io::Result<(Region, OwnedFd)> {
        let fd = rustix::fs::memfd_create(
            "viscsi-hba-queue",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, len)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        let region = Region::map(&fd, len, ProtFlags::READ)?;
        Ok((region, fd))
    }

    /// The adapter's side: maps a region received from the driver for writing, after
    /// checking that it is as large as announced and cannot shrink.
    pub fn map_writable(fd: OwnedFd, len: u64) -> io::Result<Region> {
        if len == 0 || len > MAX_REGION_SIZE {
            return Err(io::Error::other(format!(
                "region of {len} bytes (1 to {MAX_REGION_SIZE})"
            )));
        }
        let seals = rustix::fs::fcntl_get_seals(&fd)?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(io::Error::other("region is not sealed against shrinking"));
        }
        let size = rustix::fs::fstat(&fd)?.st_size;
        if u64::try_from(size).unwrap_or(0) < len {
            return Err(io::Error::other(format!(
                "region file has {size} bytes, not {len}"
            )));
        }
        Region::map(&fd, len, ProtFlags::READ | ProtFlags::WRITE)
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `offset .. offset + len` lies inside the region.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.len as u64)
    }

    /// The adapter's side: copies `segments` one after the other to `offset`. False (and
    /// nothing written) if they do not fit.
    pub fn write(&self, offset: u64, segments: &[Bytes]) -> bool {
        let total: u64 = segments.iter().map(|s| s.len() as u64).sum();
        if !self.contains(offset, total) {
            return false;
        }
        let mut at = offset as usize;
        for s in segments {
            // SAFETY: `at .. at + s.len()` is inside the mapping (checked above), which is
            // writable on the adapter's side; the protocol gives this part to the adapter
            // alone until the completion is sent, and `s` is ordinary memory of this
            // process, so the ranges do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr(), self.ptr.as_ptr().add(at), s.len());
            }
            at += s.len();
        }
        true
    }

    /// The driver's side: the bytes at `offset .. offset + len` (inside the region).
    fn slice(&self, offset: u64, len: usize) -> &[u8] {
        debug_assert!(self.contains(offset, len as u64));
        // SAFETY: the range is inside the mapping (the pool only hands out parts inside it,
        // and lengths are checked against the part's size); the adapter completed the
        // command that wrote it and writes it no more until the part is freed, which waits
        // for this borrow's owner to be dropped.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset as usize), len) }
    }
}

/// The driver's allocator of buffers in a region.
pub struct Pool {
    region: Region,
    /// Free parts: offset → length, coalesced.
    free: Mutex<BTreeMap<u64, u64>>,
}

impl Pool {
    pub fn new(region: Region) -> Arc<Pool> {
        let mut free = BTreeMap::new();
        let usable = region.len() / UNIT * UNIT;
        if usable > 0 {
            free.insert(0, usable);
        }
        Arc::new(Pool {
            region,
            free: Mutex::new(free),
        })
    }

    /// A buffer of at least `len` bytes, if one is free (first fit).
    pub fn alloc(self: &Arc<Self>, len: u32) -> Option<Buffer> {
        let want = u64::from(len).div_ceil(UNIT).max(1) * UNIT;
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let (&offset, &size) = free.iter().find(|(_, &size)| size >= want)?;
        free.remove(&offset);
        if size > want {
            free.insert(offset + want, size - want);
        }
        Some(Buffer {
            pool: self.clone(),
            offset,
            len: want,
            keep_out: false,
        })
    }

    fn release(&self, offset: u64, len: u64) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let mut start = offset;
        let mut size = len;
        if let Some((&before, &before_len)) = free.range(..offset).next_back() {
            if before + before_len == offset {
                free.remove(&before);
                start = before;
                size += before_len;
            }
        }
        if let Some(after_len) = free.remove(&(offset + len)) {
            size += after_len;
        }
        free.insert(start, size);
    }

    /// Bytes free (for tests).
    pub fn free_bytes(&self) -> u64 {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }
}

/// A part of a region handed out for one read; back to the pool on drop.
pub struct Buffer {
    pool: Arc<Pool>,
    offset: u64,
    len: u64,
    /// The adapter may still write it: never reused.
    keep_out: bool,
}

impl Buffer {
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `data_len` bytes as `Bytes` that keep the buffer until dropped (`None` if
    /// `data_len` is larger than the buffer).
    pub fn into_bytes(self, data_len: usize) -> Option<Bytes> {
        if data_len as u64 > self.len {
            return None;
        }
        Some(Bytes::from_owner(Filled {
            buffer: self,
            len: data_len,
        }))
    }

    /// The command did not complete: the adapter may still write this buffer, so it never
    /// goes back to the pool.
    pub fn keep_out(mut self) {
        self.keep_out = true;
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if !self.keep_out {
            self.pool.release(self.offset, self.len);
        }
    }
}

/// A completed buffer's data.
struct Filled {
    buffer: Buffer,
    len: usize,
}

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        self.buffer.pool.region.slice(self.buffer.offset, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_written_by_one_side_and_read_by_the_other() {
        let (region, fd) = Region::create(1 << 20).unwrap();
        let writer = Region::map_writable(fd.try_clone().unwrap(), 1 << 20).unwrap();
        let pool = Pool::new(region);
        let a = pool.alloc(5000).unwrap();
        let b = pool.alloc(100).unwrap();
        assert_eq!((a.offset(), a.len()), (0, 8192));
        assert_eq!(b.offset(), 8192);
        let data = [Bytes::from(vec![1u8; 3000]), Bytes::from(vec![2u8; 2000])];
        assert!(writer.write(a.offset(), &data));
        assert!(!writer.write((1 << 20) - 10, &data));
        let bytes = a.into_bytes(5000).unwrap();
        assert_eq!(&bytes[..3000], &[1u8; 3000][..]);
        assert_eq!(&bytes[3000..], &[2u8; 2000][..]);
        let tail = bytes.slice(4000..);
        drop(bytes);
        assert_eq!(pool.free_bytes(), (1 << 20) - 8192 - 4096);
        drop(tail);
        assert_eq!(pool.free_bytes(), (1 << 20) - 4096);
        drop(b);
        assert_eq!(pool.free_bytes(), 1 << 20);
        // Exhausted, then coalesced again.
        let all: Vec<_> = (0..256).map(|_| pool.alloc(4096).unwrap()).collect();
        assert!(pool.alloc(1).is_none());
        drop(all);
        assert!(pool.alloc(1 << 20).is_some());
        // A buffer of a command that never completed stays out.
        let lost = pool.alloc(4096).unwrap();
        lost.keep_out();
        assert_eq!(pool.free_bytes(), (1 << 20) - 4096);
        assert!(pool.alloc(4096).unwrap().into_bytes(4097).is_none());
    }

    #[test]
    fn the_adapter_refuses_regions_that_could_shrink_or_are_short() {
        let fd = rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
        assert!(Region::map_writable(fd, 1 << 20).is_err());
        let (_r, fd) = Region::create(1 << 20).unwrap();
        assert!(Region::map_writable(fd.try_clone().unwrap(), 2 << 20).is_err());
        assert!(Region::map_writable(fd.try_clone().unwrap(), 0).is_err());
        assert!(Region::map_writable(fd, 1 << 20).is_ok());
    }
}
