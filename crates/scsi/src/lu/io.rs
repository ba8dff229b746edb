//! Block commands (SBC-3): READ, WRITE, VERIFY, WRITE AND VERIFY, WRITE SAME, UNMAP,
//! COMPARE AND WRITE, ORWRITE, WRITE ATOMIC, PRE-FETCH, SYNCHRONIZE CACHE, GET LBA STATUS.

use std::io;
use std::sync::atomic::Ordering;

use super::{CmdResult, Fail, LogicalUnit};
use crate::cdb::{self, op};
use crate::codes::{AscAscq, SenseKey};
use crate::sense::Sense;

/// MAXIMUM COMPARE AND WRITE LENGTH (the CDB field is one byte).
pub(crate) const MAX_COMPARE_AND_WRITE_BLOCKS: u64 = 255;
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
pub(crate) const MAX_UNMAP_DESCRIPTORS: usize = 256;
/// MAXIMUM UNMAP LBA COUNT per descriptor (0xffffffff: unlimited).
pub(crate) const MAX_UNMAP_LBA_COUNT: u64 = 0xffff_ffff;
/// GET LBA STATUS returns at most this many descriptors.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 32;
/// WRITE SAME builds its repeated pattern in buffers of this size.
const WRITE_SAME_BUFFER: u64 = 1 << 20;

fn read_error(e: io::Error) -> Fail {
    tracing::warn!(error = %e, "back-end read failed");
    Sense::new(SenseKey::MEDIUM_ERROR, AscAscq::UNRECOVERED_READ_ERROR).into()
}

fn write_error(e: io::Error) -> Fail {
    if e.kind() == io::ErrorKind::PermissionDenied {
        return Sense::new(SenseKey::DATA_PROTECT, AscAscq::WRITE_PROTECTED).into();
    }
    tracing::warn!(error = %e, "back-end write failed");
    Sense::new(SenseKey::MEDIUM_ERROR, AscAscq::WRITE_ERROR).into()
}

/// Offset of the transfer length field (for field pointers).
fn length_field(opcode: u8) -> u16 {
    match opcode {
        op::READ_6 | op::WRITE_6 => 4,
        op::READ_12 | op::WRITE_12 | op::VERIFY_12 | op::WRITE_AND_VERIFY_12 => 6,
        op::COMPARE_AND_WRITE => 13,
        op::WRITE_ATOMIC_16 => 12,
        o if o >> 5 == 4 => 10,
        _ => 7,
    }
}

impl LogicalUnit {
    pub(super) fn max_transfer_blocks(&self) -> u64 {
        (u64::from(self.config.max_transfer_bytes) >> self.block_shift).max(1)
    }

    fn bytes(&self, blocks: u64) -> u64 {
        blocks << self.block_shift
    }

    /// LBA OUT OF RANGE unless `lba..lba+blocks` lies within the medium.
    pub(super) fn check_lba(&self, lba: u64, blocks: u64) -> Result<(), Fail> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.num_blocks() => Ok(()),
            _ => Err(Sense::lba_out_of_range().into()),
        }
    }

    /// DATA PROTECT unless the medium may be written.
    pub(super) fn check_writable(&self) -> Result<(), Fail> {
        if self.read_only {
            return Err(Sense::new(SenseKey::DATA_PROTECT, AscAscq::WRITE_PROTECTED).into());
        }
        if self.swp.load(Ordering::Relaxed) {
            return Err(
                Sense::new(SenseKey::DATA_PROTECT, AscAscq::SOFTWARE_WRITE_PROTECTED).into(),
            );
        }
        Ok(())
    }

    /// Protection information is not supported: RDPROTECT/WRPROTECT/VRPROTECT must be zero.
    fn check_no_protection(cdb: &[u8]) -> Result<(), Fail> {
        if cdb::byte(cdb, 1) & 0xe0 != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(7)).into());
        }
        Ok(())
    }

    /// Common checks of block commands; returns (lba, blocks).
    fn block_params(&self, cdb: &[u8], max: u64) -> Result<(u64, u64), Fail> {
        let opcode = cdb::byte(cdb, 0);
        if opcode != op::READ_6 && opcode != op::WRITE_6 {
            Self::check_no_protection(cdb)?;
        }
        let (lba, n) = cdb::lba_and_length(cdb).unwrap_or((0, 0));
        let n = u64::from(n);
        if n > max {
            return Err(Sense::invalid_field_in_cdb(length_field(opcode), None).into());
        }
        Ok((lba, n))
    }

    fn fua(&self, cdb: &[u8]) -> bool {
        let opcode = cdb::byte(cdb, 0);
        let bit = opcode != op::READ_6 && opcode != op::WRITE_6 && cdb::byte(cdb, 1) & 0x08 != 0;
        bit || !self.wce.load(Ordering::Relaxed)
    }

    pub(super) fn read(&self, cdb: &[u8]) -> CmdResult {
        let (lba, n) = self.block_params(cdb, self.max_transfer_blocks())?;
        self.check_lba(lba, n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let (off, len) = (self.bytes(lba), self.bytes(n));
        let mut buf = vec![0u8; len as usize];
        self.with_stripes(off, len, false, || self.backend.read_at(off, &mut buf))
            .map_err(read_error)?;
        Ok(buf)
    }

    /// WRITE and WRITE AND VERIFY. If the initiator sent fewer bytes than the CDB asks for, the
    /// whole blocks that arrived are written (the transport reports the residual).
    pub(super) fn write(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let (lba, n) = self.block_params(cdb, self.max_transfer_blocks())?;
        self.check_writable()?;
        self.check_lba(lba, n)?;
        let blocks = n.min(data_out.len() as u64 >> self.block_shift);
        if blocks == 0 {
            return Ok(Vec::new());
        }
        let verify = matches!(
            cdb::byte(cdb, 0),
            op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16
        );
        let fua = verify || self.fua(cdb);
        let (off, len) = (self.bytes(lba), self.bytes(blocks));
        let data = &data_out[..len as usize];
        self.with_stripes(off, len, false, || self.backend.write_at(off, data, fua))
            .map_err(write_error)?;
        Ok(Vec::new())
    }

    pub(super) fn verify(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let (lba, n) = self.block_params(cdb, self.max_transfer_blocks())?;
        let bytchk = (cdb::byte(cdb, 1) >> 1) & 3;
        if bytchk == 2 {
            return Err(Sense::invalid_field_in_cdb(1, Some(2)).into());
        }
        self.check_lba(lba, n)?;
        if bytchk == 0 || n == 0 {
            return Ok(Vec::new());
        }
        let bs = self.bytes(1) as usize;
        let need = if bytchk == 1 {
            self.bytes(n) as usize
        } else {
            bs
        };
        let Some(expected) = data_out.get(..need) else {
            return Err(Sense::invalid_field_in_cdb(length_field(cdb::byte(cdb, 0)), None).into());
        };
        let (off, len) = (self.bytes(lba), self.bytes(n));
        let mut medium = vec![0u8; len as usize];
        self.with_stripes(off, len, false, || self.backend.read_at(off, &mut medium))
            .map_err(read_error)?;
        let mismatch = if bytchk == 1 {
            first_difference(&medium, expected)
        } else {
            medium
                .chunks(bs)
                .enumerate()
                .find_map(|(i, blk)| first_difference(blk, expected).map(|o| i * bs + o))
        };
        match mismatch {
            Some(offset) => Err(miscompare(offset)),
            None => Ok(Vec::new()),
        }
    }

    pub(super) fn compare_and_write(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        Self::check_no_protection(cdb)?;
        let lba = cdb::be64(cdb, 2);
        let n = u64::from(cdb::byte(cdb, 13));
        self.check_writable()?;
        // The Data-Out holds the verify data followed by the write data; any other length means
        // the CDB and the transfer disagree.
        if data_out.len() as u64 != 2 * self.bytes(n) {
            return Err(Sense::invalid_field_in_cdb(13, None).into());
        }
        self.check_lba(lba, n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let (off, len) = (self.bytes(lba), self.bytes(n));
        let (verify, write) = data_out.split_at(len as usize);
        let fua = self.fua(cdb);
        self.with_stripes(off, len, true, || {
            let mut medium = vec![0u8; len as usize];
            self.backend.read_at(off, &mut medium).map_err(read_error)?;
            if let Some(offset) = first_difference(&medium, verify) {
                return Err(miscompare(offset));
            }
            self.backend.write_at(off, write, fua).map_err(write_error)
        })?;
        Ok(Vec::new())
    }

    pub(super) fn orwrite(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let (lba, n) = self.block_params(cdb, self.max_transfer_blocks())?;
        self.check_writable()?;
        self.check_lba(lba, n)?;
        let blocks = n.min(data_out.len() as u64 >> self.block_shift);
        if blocks == 0 {
            return Ok(Vec::new());
        }
        let (off, len) = (self.bytes(lba), self.bytes(blocks));
        let fua = self.fua(cdb);
        self.with_stripes(off, len, true, || {
            let mut medium = vec![0u8; len as usize];
            self.backend.read_at(off, &mut medium).map_err(read_error)?;
            for (m, d) in medium.iter_mut().zip(data_out) {
                *m |= *d;
            }
            self.backend
                .write_at(off, &medium, fua)
                .map_err(write_error)
        })?;
        Ok(Vec::new())
    }

    /// WRITE ATOMIC(16): all of the data or none of it is ever visible to other commands.
    pub(super) fn write_atomic(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let (lba, n) = self.block_params(cdb, self.max_transfer_blocks())?;
        if cdb::be16(cdb, 10) != 0 {
            // ATOMIC BOUNDARY: we report a MAXIMUM ATOMIC BOUNDARY SIZE of zero.
            return Err(Sense::invalid_field_in_cdb(10, None).into());
        }
        self.check_writable()?;
        self.check_lba(lba, n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let (off, len) = (self.bytes(lba), self.bytes(n));
        let Some(data) = data_out.get(..len as usize) else {
            return Err(Sense::invalid_field_in_cdb(12, None).into());
        };
        let fua = self.fua(cdb);
        self.with_stripes(off, len, true, || self.backend.write_at(off, data, fua))
            .map_err(write_error)?;
        Ok(Vec::new())
    }

    pub(super) fn write_same(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let ws16 = cdb::byte(cdb, 0) == op::WRITE_SAME_16;
        let flags = cdb::byte(cdb, 1);
        Self::check_no_protection(cdb)?;
        let anchor = flags & 0x10 != 0;
        let unmap = flags & 0x08 != 0;
        let ndob = ws16 && flags & 0x01 != 0;
        if anchor {
            // ANC_SUP is zero: anchored state is not supported (and ANCHOR needs UNMAP anyway).
            return Err(Sense::invalid_field_in_cdb(1, Some(4)).into());
        }
        if unmap && !self.thin {
            return Err(Sense::invalid_field_in_cdb(1, Some(3)).into());
        }
        self.check_writable()?;
        let (lba, n) = cdb::lba_and_length(cdb).unwrap_or((0, 0));
        let num = self.num_blocks();
        if lba > num {
            return Err(Sense::lba_out_of_range().into());
        }
        // WSNZ is zero: a NUMBER OF LOGICAL BLOCKS of zero means "to the end of the medium".
        let count = if n == 0 { num - lba } else { u64::from(n) };
        if count > self.max_transfer_blocks() {
            return Err(Sense::invalid_field_in_cdb(if ws16 { 10 } else { 7 }, None).into());
        }
        self.check_lba(lba, count)?;
        let bs = self.bytes(1) as usize;
        let zero_block;
        let pattern: &[u8] = if ndob {
            zero_block = vec![0u8; bs];
            &zero_block
        } else {
            match data_out.get(..bs) {
                Some(p) if data_out.len() == bs => p,
                _ => {
                    return Err(Sense::invalid_field_in_cdb(if ws16 { 10 } else { 7 }, None).into())
                }
            }
        };
        if count == 0 {
            return Ok(Vec::new());
        }
        let (off, len) = (self.bytes(lba), self.bytes(count));
        // With UNMAP set and LBPWS advertised the range is deallocated whatever the pattern
        // (SBC-3 §5.43); reads then return zeros, as LBPRZ promises.
        if unmap {
            if let Some(d) = self.backend.as_discard() {
                return self
                    .with_stripes(off, len, false, || d.discard(off, len))
                    .map(|()| Vec::new())
                    .map_err(write_error);
            }
        }
        let fua = !self.wce.load(Ordering::Relaxed);
        let chunk = len.min(WRITE_SAME_BUFFER.max(bs as u64));
        let buf: Vec<u8> = pattern
            .iter()
            .copied()
            .cycle()
            .take(chunk as usize)
            .collect();
        self.with_stripes(off, len, false, || {
            let mut done = 0;
            while done < len {
                let n = chunk.min(len - done) as usize;
                self.backend.write_at(off + done, &buf[..n], fua)?;
                done += n as u64;
            }
            Ok(())
        })
        .map_err(write_error)?;
        Ok(Vec::new())
    }

    pub(super) fn unmap(&self, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        if cdb::byte(cdb, 1) & 0x01 != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(0)).into());
        }
        self.check_writable()?;
        let plen = usize::from(cdb::be16(cdb, 7));
        if plen == 0 {
            return Ok(Vec::new());
        }
        let data = &data_out[..plen.min(data_out.len())];
        if data.len() < 8 {
            return Err(Sense::param_list_length_error().into());
        }
        let bddl = usize::from(cdb::be16(data, 2));
        let descs = &data[8..];
        let count = bddl.min(descs.len()) / 16;
        if count > MAX_UNMAP_DESCRIPTORS {
            return Err(Sense::invalid_field_in_param(2, None).into());
        }
        let Some(discard) = self.backend.as_discard() else {
            return Err(Sense::invalid_opcode().into());
        };
        let ranges = || {
            descs
                .chunks_exact(16)
                .take(count)
                .map(|d| (cdb::be64(d, 0), u64::from(cdb::be32(d, 8))))
        };
        for (i, (lba, n)) in ranges().enumerate() {
            if n > MAX_UNMAP_LBA_COUNT {
                return Err(Sense::invalid_field_in_param((8 + 16 * i + 8) as u16, None).into());
            }
            self.check_lba(lba, n)?;
        }
        for (lba, n) in ranges() {
            if n == 0 {
                continue;
            }
            let (off, len) = (self.bytes(lba), self.bytes(n));
            self.with_stripes(off, len, false, || discard.discard(off, len))
                .map_err(write_error)?;
        }
        Ok(Vec::new())
    }

    pub(super) fn prefetch(&self, cdb: &[u8]) -> CmdResult {
        let (lba, n) = cdb::lba_and_length(cdb).unwrap_or((0, 0));
        self.check_lba(lba, u64::from(n))?;
        // Nothing is cached separately from the back-end, so there is nothing to do; GOOD (not
        // CONDITION MET) says the blocks were not placed in a cache.
        Ok(Vec::new())
    }

    pub(super) fn synchronize_cache(&self, cdb: &[u8]) -> CmdResult {
        let (lba, n) = cdb::lba_and_length(cdb).unwrap_or((0, 0));
        self.check_lba(lba, u64::from(n))?;
        self.backend.flush().map_err(write_error)?;
        Ok(Vec::new())
    }

    pub(super) fn get_lba_status(&self, cdb: &[u8]) -> CmdResult {
        let lba = cdb::be64(cdb, 2);
        let alloc = cdb::be32(cdb, 10) as usize;
        let num = self.num_blocks();
        if lba >= num {
            return Err(Sense::lba_out_of_range().into());
        }
        let max_desc = (alloc.saturating_sub(8) / 16).clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
        let mut out = vec![0u8; 8];
        let mut pos = lba;
        let bs = self.bytes(1);
        while pos < num && (out.len() - 8) / 16 < max_desc {
            let remaining = (num - pos).min(0xffff_ffff);
            let (mapped, blocks) = match self.backend.as_discard().filter(|_| self.thin) {
                Some(d) => {
                    let e = d
                        .is_mapped(self.bytes(pos), self.bytes(remaining))
                        .map_err(read_error)?;
                    (e.mapped, e.len.div_ceil(bs).clamp(1, remaining))
                }
                None => (true, remaining),
            };
            out.extend_from_slice(&pos.to_be_bytes());
            out.extend_from_slice(&(blocks as u32).to_be_bytes());
            out.extend_from_slice(&[if mapped { 0 } else { 1 }, 0, 0, 0]);
            pos += blocks;
        }
        let plen = (out.len() - 4) as u32;
        out[0..4].copy_from_slice(&plen.to_be_bytes());
        Ok(super::truncate(out, alloc))
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(Some(a.len().min(b.len())))
}

fn miscompare(offset: usize) -> Fail {
    Sense::new(
        SenseKey::MISCOMPARE,
        AscAscq::MISCOMPARE_DURING_VERIFY_OPERATION,
    )
    .with_information(offset as u64)
    .into()
}
