//! A sparse in-memory disk: chunks are allocated on first write and freed by discard.

use std::io;
use std::sync::RwLock;

use super::{check_range, BlockBackend, Discard, MapExtent};

/// Smallest chunk; larger disks use larger chunks to bound the chunk table to ~1M entries.
const MIN_CHUNK: u64 = 64 * 1024;
const MAX_CHUNKS: u64 = 1 << 20;

/// One chunk: `None` until first written.
type Chunk = RwLock<Option<Box<[u8]>>>;

/// Sparse RAM disk. Unwritten chunks read as zeros; each chunk has its own lock so I/O to
/// different chunks never contends. Thin-provisioned: discards free whole chunks.
pub struct MemoryBackend {
    len: u64,
    chunk: u64,
    chunks: Box<[Chunk]>,
}

impl MemoryBackend {
    /// A zero-filled disk of `len` bytes that uses no memory until written.
    pub fn new(len: u64) -> Self {
        let mut chunk = MIN_CHUNK;
        while len.div_ceil(chunk) > MAX_CHUNKS {
            chunk *= 2;
        }
        let n = len.div_ceil(chunk) as usize;
        let chunks = (0..n).map(|_| RwLock::new(None)).collect();
        MemoryBackend { len, chunk, chunks }
    }

    /// Chunk size in bytes (the allocation and discard unit).
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Number of allocated chunks (for tests and statistics).
    pub fn allocated_chunks(&self) -> usize {
        self.chunks
            .iter()
            .filter(|c| c.read().map(|g| g.is_some()).unwrap_or(true))
            .count()
    }

    fn chunk_len(&self, idx: usize) -> usize {
        let start = idx as u64 * self.chunk;
        (self.len - start).min(self.chunk) as usize
    }

    /// Calls `f(chunk index, offset within chunk, range within the caller's buffer)` per chunk.
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let idx = (pos / self.chunk) as usize;
            let within = pos % self.chunk;
            let n = (self.chunk - within).min(len - done);
            f(idx, within as usize, done as usize..(done + n) as usize)?;
            done += n;
        }
        Ok(())
    }
}

fn poisoned() -> io::Error {
    io::Error::other("memory back-end lock poisoned")
}

impl BlockBackend for MemoryBackend {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.len)?;
        self.for_each_piece(offset, buf.len() as u64, |idx, within, range| {
            let slot = self.chunks[idx].read().map_err(|_| poisoned())?;
            let dst = &mut buf[range];
            match slot.as_deref() {
                Some(data) => dst.copy_from_slice(&data[within..within + dst.len()]),
                None => dst.fill(0),
            }
            Ok(())
        })
    }

    fn write_at(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        check_range(offset, data.len() as u64, self.len)?;
        self.for_each_piece(offset, data.len() as u64, |idx, within, range| {
            let mut slot = self.chunks[idx].write().map_err(|_| poisoned())?;
            let src = &data[range];
            let chunk =
                slot.get_or_insert_with(|| vec![0u8; self.chunk_len(idx)].into_boxed_slice());
            chunk[within..within + src.len()].copy_from_slice(src);
            Ok(())
        })
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn as_discard(&self) -> Option<&dyn Discard> {
        Some(self)
    }
}

impl Discard for MemoryBackend {
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.len)?;
        self.for_each_piece(offset, len, |idx, within, range| {
            let mut slot = self.chunks[idx].write().map_err(|_| poisoned())?;
            if within == 0 && range.len() == self.chunk_len(idx) {
                *slot = None;
            } else if let Some(chunk) = slot.as_deref_mut() {
                chunk[within..within + range.len()].fill(0);
            }
            Ok(())
        })
    }

    fn is_mapped(&self, offset: u64, len: u64) -> io::Result<MapExtent> {
        check_range(offset, len, self.len)?;
        let mut state = None;
        let mut run = 0u64;
        let mut pos = offset;
        while run < len {
            let idx = (pos / self.chunk) as usize;
            let mapped = self.chunks[idx].read().map_err(|_| poisoned())?.is_some();
            match state {
                None => state = Some(mapped),
                Some(s) if s != mapped => break,
                _ => {}
            }
            let n = (self.chunk - pos % self.chunk).min(len - run);
            run += n;
            pos += n;
        }
        Ok(MapExtent {
            mapped: state.unwrap_or(false),
            len: run,
        })
    }

    fn granularity(&self) -> u64 {
        self.chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_read_write_discard() {
        let m = MemoryBackend::new(1 << 20);
        let mut buf = vec![1u8; 4096];
        m.read_at(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(m.allocated_chunks(), 0);
        m.write_at(MIN_CHUNK - 512, &[7u8; 1024], false).unwrap();
        assert_eq!(m.allocated_chunks(), 2);
        let mut two = vec![0u8; 1024];
        m.read_at(MIN_CHUNK - 512, &mut two).unwrap();
        assert!(two.iter().all(|&b| b == 7));
        assert!(
            m.is_mapped(0, 1 << 20).unwrap()
                == MapExtent {
                    mapped: true,
                    len: 2 * MIN_CHUNK
                }
        );
        m.discard(0, MIN_CHUNK).unwrap();
        assert_eq!(m.allocated_chunks(), 1);
        // Partial discard zeroes but keeps the chunk.
        m.discard(MIN_CHUNK, 512).unwrap();
        m.read_at(MIN_CHUNK - 512, &mut two).unwrap();
        assert!(two.iter().all(|&b| b == 0));
        assert_eq!(m.allocated_chunks(), 1);
        assert!(m.read_at(1 << 20, &mut buf).is_err());
    }

    #[test]
    fn odd_length_tail_chunk() {
        let m = MemoryBackend::new(MIN_CHUNK + 512);
        m.write_at(MIN_CHUNK, &[9u8; 512], false).unwrap();
        m.discard(MIN_CHUNK, 512).unwrap();
        assert_eq!(m.allocated_chunks(), 0);
    }
}
