//! Shared memory: a memfd mapped into this process, handed to the back end by its fd.
//!
//! Guest memory is one memfd; guest-physical address 0 is offset 0 of the file. The same type
//! maps the dirty-log bitmap. Everything the back end may touch concurrently is accessed
//! through volatile or atomic operations at guest addresses, never through references.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

/// A shared mapping of a whole memfd.
pub(crate) struct SharedMemory {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value (unmapped on drop) and all access to it goes through
// bounds-checked methods using raw volatile/atomic operations; moving it to another thread moves
// that ownership.
unsafe impl Send for SharedMemory {}

impl SharedMemory {
    /// Creates a zero-filled memfd of `len` bytes (rounded up to 4 KiB) and maps it shared.
    pub(crate) fn new(name: &str, len: u64) -> std::io::Result<Self> {
        let len = len.div_ceil(4096).max(1) * 4096;
        let len_usize = usize::try_from(len)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "too large"))?;
        let cname = CString::new(name).expect("no NUL in memfd name");
        // SAFETY: cname is a valid NUL-terminated string; memfd_create has no other preconditions.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fd is a valid memfd; ftruncate only changes its size.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: mapping a fresh shared file mapping at an address of the kernel's choosing
        // cannot alias any Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>()).expect("mmap does not return NULL on success");
        Ok(SharedMemory {
            fd,
            base,
            len: len_usize,
        })
    }

    pub(crate) fn len(&self) -> u64 {
        self.len as u64
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Userspace address of the mapping (what vhost-user calls the front end's address).
    pub(crate) fn host_addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// The pointer to `len` bytes at `addr`; panics if out of range.
    fn at(&self, addr: u64, len: usize) -> *mut u8 {
        let end = addr.checked_add(len as u64);
        assert!(
            end.is_some_and(|e| e <= self.len as u64),
            "guest access {addr:#x}+{len} outside {} bytes of memory",
            self.len
        );
        // SAFETY: addr + len is within the mapping (checked just above).
        unsafe { self.base.as_ptr().add(addr as usize) }
    }

    pub(crate) fn write(&self, addr: u64, bytes: &[u8]) {
        let p = self.at(addr, bytes.len());
        // SAFETY: p..p+len is inside the mapping; the back end may read these bytes concurrently,
        // which is the contract of shared guest memory (no Rust reference to it exists).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    }

    pub(crate) fn read_into(&self, addr: u64, out: &mut [u8]) {
        let p = self.at(addr, out.len());
        // SAFETY: as in `write`, the range is inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
    }

    pub(crate) fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read_into(addr, &mut v);
        v
    }

    pub(crate) fn fill(&self, addr: u64, len: usize, byte: u8) {
        let p = self.at(addr, len);
        // SAFETY: the range is inside the mapping.
        unsafe { std::ptr::write_bytes(p, byte, len) };
    }

    pub(crate) fn write_u16(&self, addr: u64, v: u16) {
        let p = self.at(addr, 2).cast::<u16>();
        // SAFETY: in range; unaligned write allowed by write_unaligned.
        unsafe { p.write_unaligned(v.to_le()) }
    }

    pub(crate) fn write_u32(&self, addr: u64, v: u32) {
        let p = self.at(addr, 4).cast::<u32>();
        // SAFETY: in range.
        unsafe { p.write_unaligned(v.to_le()) }
    }

    pub(crate) fn write_u64(&self, addr: u64, v: u64) {
        let p = self.at(addr, 8).cast::<u64>();
        // SAFETY: in range.
        unsafe { p.write_unaligned(v.to_le()) }
    }

    pub(crate) fn read_u32(&self, addr: u64) -> u32 {
        let p = self.at(addr, 4).cast::<u32>();
        // SAFETY: in range; volatile since the back end writes it.
        u32::from_le(unsafe { p.read_volatile() })
    }

    /// A 16-bit field the other side updates concurrently (ring indexes and flags).
    pub(crate) fn atomic_u16(&self, addr: u64) -> &AtomicU16 {
        assert!(addr % 2 == 0, "unaligned atomic at {addr:#x}");
        let p = self.at(addr, 2).cast::<AtomicU16>();
        // SAFETY: in range and 2-aligned (the mapping is page aligned); AtomicU16 has the layout of
        // u16 and all concurrent access by either side is atomic. The reference lives no longer
        // than &self, i.e. the mapping.
        unsafe { &*p }
    }

    /// A 64-bit word for the dirty bitmap (the back end sets bits with atomic or).
    pub(crate) fn atomic_u64(&self, addr: u64) -> &AtomicU64 {
        assert!(addr % 8 == 0, "unaligned atomic at {addr:#x}");
        let p = self.at(addr, 8).cast::<AtomicU64>();
        // SAFETY: in range and 8-aligned; as in atomic_u16.
        unsafe { &*p }
    }

    /// Takes and clears the 64-bit word at `addr`.
    pub(crate) fn take_u64(&self, addr: u64) -> u64 {
        self.atomic_u64(addr).swap(0, Ordering::AcqRel)
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly the mapping made in `new`, and no reference into it
        // outlives self.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A bump allocator over a guest address range.
pub(crate) struct Bump {
    next: u64,
    end: u64,
}

impl Bump {
    pub(crate) fn new(start: u64, end: u64) -> Self {
        Bump { next: start, end }
    }

    /// `len` bytes aligned to `align` (a power of two), or None when memory is exhausted.
    pub(crate) fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(len.max(1))?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }

    pub(crate) fn remaining(&self) -> u64 {
        self.end - self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_round_trip_and_bounds() {
        let m = SharedMemory::new("t", 5000).unwrap();
        assert_eq!(m.len(), 8192);
        m.write(8000, b"hello");
        assert_eq!(m.read(8000, 5), b"hello");
        m.write_u32(100, 0x1234_5678);
        assert_eq!(m.read(100, 4), [0x78, 0x56, 0x34, 0x12]);
        assert_eq!(m.read_u32(100), 0x1234_5678);
        assert!(std::panic::catch_unwind(|| m.read(8190, 4)).is_err());
    }

    #[test]
    fn bump_aligns_and_exhausts() {
        let mut b = Bump::new(10, 100);
        assert_eq!(b.alloc(8, 16), Some(16));
        assert_eq!(b.alloc(8, 16), Some(32));
        assert_eq!(b.alloc(100, 1), None);
        assert_eq!(b.remaining(), 60);
    }
}
