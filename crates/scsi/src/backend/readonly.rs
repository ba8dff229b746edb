//! A read-only view of any back-end.

use std::io;

use super::BlockBackend;

/// Wraps a back-end so that every write fails and the logical unit reports WRITE PROTECTED.
pub struct ReadOnly<B>(pub B);

impl<B: BlockBackend> BlockBackend for ReadOnly<B> {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, _offset: u64, _data: &[u8], _fua: bool) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "read-only back-end",
        ))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn read_only(&self) -> bool {
        true
    }
}
