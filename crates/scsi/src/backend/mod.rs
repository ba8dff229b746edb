//! Storage behind a logical unit: a small core trait plus capability traits.
//!
//! [`BlockBackend`] is all a logical unit needs to serve reads and writes. Capabilities a back-end
//! may or may not have are separate traits reached through `as_*` methods (for now only
//! [`Discard`], which makes thin provisioning possible), so "unsupported" is a type-level fact
//! rather than a run-time error code.
//!
//! All methods take `&self`: back-ends are shared between the threads serving one logical unit
//! and must do their own (fine-grained) locking.

use std::io;
use std::sync::Arc;

mod file;
mod memory;
mod readonly;

pub use file::{FileBackend, FileOptions};
pub use memory::MemoryBackend;
pub use readonly::ReadOnly;

/// Byte-addressed storage with positional I/O. Offsets and lengths passed by the logical unit are
/// always multiples of its block size and within `len()`.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;

    /// True if the back-end holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes `data` at `offset`; if `fua`, the data is durable when this returns.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;

    /// Makes all completed writes durable.
    fn flush(&self) -> io::Result<()>;

    /// True if writes will always fail (the logical unit reports WRITE PROTECTED).
    fn read_only(&self) -> bool {
        false
    }

    /// The discard capability, if the back-end can release storage.
    fn as_discard(&self) -> Option<&dyn Discard> {
        None
    }
}

/// A run of bytes with one provisioning state, as reported by [`Discard::is_mapped`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapExtent {
    /// True if storage is allocated for the run.
    pub mapped: bool,
    /// Length of the run in bytes (at least 1 byte, at most the length asked about).
    pub len: u64,
}

/// Capability: release storage (thin provisioning). After `discard`, the range reads as zeros.
pub trait Discard {
    /// Deallocates `len` bytes at `offset`; parts of the range that cannot be released are zeroed.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Provisioning state of the run starting at `offset`, looking no further than `len` bytes.
    fn is_mapped(&self, offset: u64, len: u64) -> io::Result<MapExtent>;

    /// Allocation unit in bytes that discards should be aligned to (0 if unknown).
    fn granularity(&self) -> u64 {
        0
    }
}

impl<T: BlockBackend + ?Sized> BlockBackend for Arc<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        (**self).write_at(offset, data, fua)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn as_discard(&self) -> Option<&dyn Discard> {
        (**self).as_discard()
    }
}

/// Error for an access outside the back-end (the logical unit never makes one).
pub(crate) fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "access beyond end of back-end")
}

/// Checks `offset..offset+len` lies within `size`.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(out_of_range()),
    }
}
