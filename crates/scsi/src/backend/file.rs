//! A regular file or block device, with positional I/O from any thread.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::{FallocateFlags, OFlags};
use rustix::io::Errno;

use super::{check_range, BlockBackend, Discard, MapExtent};

/// Buffer and offset alignment for `O_DIRECT` (covers 512- and 4096-byte sector devices).
const DIRECT_ALIGN: usize = 4096;

/// How to open a [`FileBackend`].
#[derive(Clone, Debug, Default)]
pub struct FileOptions {
    /// Bypass the page cache (`O_DIRECT`); I/O then goes through aligned bounce buffers.
    pub direct: bool,
    /// Open read-only; the logical unit reports WRITE PROTECTED.
    pub read_only: bool,
    /// Create the file if missing and make it this many bytes long (sparse). Ignored for block
    /// devices.
    pub create_len: Option<u64>,
}

/// A file or block device. FUA writes go through a second descriptor opened with `O_DSYNC`, so
/// only that write is waited for; `flush` is `fdatasync`. Discard punches holes
/// (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`) and falls back to writing zeros where the file
/// system cannot.
pub struct FileBackend {
    file: File,
    dsync: Option<File>,
    len: u64,
    read_only: bool,
    direct: bool,
    block_device: bool,
}

thread_local! {
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with an aligned scratch buffer of `len` bytes (reused per thread).
fn with_aligned<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|cell| {
        let mut v = cell.borrow_mut();
        if v.len() < len + DIRECT_ALIGN {
            v.resize(len + DIRECT_ALIGN, 0);
        }
        let addr = v.as_ptr() as usize;
        let skip = (DIRECT_ALIGN - addr % DIRECT_ALIGN) % DIRECT_ALIGN;
        f(&mut v[skip..skip + len])
    })
}

impl FileBackend {
    /// Opens (and with `create_len`, creates or resizes) `path`.
    pub fn open(path: &Path, opts: FileOptions) -> io::Result<Self> {
        let mut flags = OFlags::empty();
        if opts.direct {
            flags |= OFlags::DIRECT;
        }
        let mut oo = OpenOptions::new();
        oo.read(true)
            .write(!opts.read_only)
            .custom_flags(flags.bits() as i32);
        if opts.create_len.is_some() && !opts.read_only {
            oo.create(true);
        }
        let mut file = oo.open(path)?;
        let block_device = file.metadata()?.file_type().is_block_device();
        if let (Some(len), false, false) = (opts.create_len, block_device, opts.read_only) {
            if file.metadata()?.len() != len {
                file.set_len(len)?;
            }
        }
        let len = file.seek(SeekFrom::End(0))?;
        let dsync = if opts.read_only {
            None
        } else {
            let mut o = OpenOptions::new();
            o.write(true)
                .custom_flags((flags | OFlags::DSYNC).bits() as i32);
            Some(o.open(path)?)
        };
        Ok(FileBackend {
            file,
            dsync,
            len,
            read_only: opts.read_only,
            direct: opts.direct,
            block_device,
        })
    }

    fn write_plain(&self, f: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.direct && !is_aligned(offset, data) {
            return with_aligned(data.len(), |buf| {
                buf.copy_from_slice(data);
                f.write_all_at(buf, offset)
            });
        }
        f.write_all_at(data, offset)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        const STEP: u64 = 1 << 20;
        let zeros = vec![0u8; STEP.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = STEP.min(len - done) as usize;
            self.write_plain(&self.file, offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

fn is_aligned(offset: u64, data: &[u8]) -> bool {
    offset % DIRECT_ALIGN as u64 == 0
        && data.len() % DIRECT_ALIGN == 0
        && (data.as_ptr() as usize) % DIRECT_ALIGN == 0
}

impl BlockBackend for FileBackend {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.len)?;
        if self.direct && !is_aligned(offset, buf) {
            return with_aligned(buf.len(), |b| {
                self.file.read_exact_at(b, offset)?;
                buf.copy_from_slice(b);
                Ok(())
            });
        }
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only back-end",
            ));
        }
        check_range(offset, data.len() as u64, self.len)?;
        match (&self.dsync, fua) {
            (Some(d), true) => self.write_plain(d, offset, data),
            _ => self.write_plain(&self.file, offset, data),
        }
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn as_discard(&self) -> Option<&dyn Discard> {
        if self.read_only {
            None
        } else {
            Some(self)
        }
    }
}

impl Discard for FileBackend {
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.len)?;
        if len == 0 {
            return Ok(());
        }
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) | Err(Errno::INVAL) => {
                self.write_zeros(offset, len)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn is_mapped(&self, offset: u64, len: u64) -> io::Result<MapExtent> {
        check_range(offset, len, self.len)?;
        if self.block_device || len == 0 {
            return Ok(MapExtent { mapped: true, len });
        }
        let end = offset + len;
        let start = i64::try_from(offset).map_err(|_| super::out_of_range())?;
        // SEEK_DATA finds the next data at or after `offset`; ENXIO means only a hole follows.
        let data = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(start)) {
            Ok(d) => d,
            Err(Errno::NXIO) => return Ok(MapExtent { mapped: false, len }),
            // No SEEK_DATA support: everything is mapped.
            Err(_) => return Ok(MapExtent { mapped: true, len }),
        };
        if data > offset {
            return Ok(MapExtent {
                mapped: false,
                len: (data - offset).min(len),
            });
        }
        let hole = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(start)) {
            Ok(h) => h,
            Err(_) => end,
        };
        Ok(MapExtent {
            mapped: true,
            len: (hole.max(offset + 1) - offset).min(len),
        })
    }

    fn granularity(&self) -> u64 {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("scsi-file-{}-{}", std::process::id(), name))
    }

    #[test]
    fn create_write_read_punch() {
        let p = temp_path("basic");
        let b = FileBackend::open(
            &p,
            FileOptions {
                create_len: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(b.len(), 1 << 20);
        b.write_at(8192, &[0xabu8; 4096], true).unwrap();
        b.flush().unwrap();
        let mut buf = vec![0u8; 4096];
        b.read_at(8192, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0xab));
        b.discard(8192, 4096).unwrap();
        b.read_at(8192, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        assert!(b.read_at(1 << 20, &mut buf).is_err());
        let ro = FileBackend::open(
            &p,
            FileOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(ro.read_only());
        assert!(ro.write_at(0, &[0u8; 512], false).is_err());
        std::fs::remove_file(&p).unwrap();
    }
}
