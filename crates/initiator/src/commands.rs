//! Typed helpers for the common SCSI commands: CDBs built here, answers parsed here.
//!
//! LUN arguments are LUN numbers (0, 1, ...); the 8-byte LUN field is built with
//! `scsi::lun::encode`.

use bytes::Bytes;
use iscsi_proto::initiator::{DataIn, ScsiCompletion, ScsiRequest, TaskAttr};
use iscsi_wire::{ServiceResponse, Status};

use crate::{Error, Session};

/// Standard INQUIRY data, the fields people look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InquiryData {
    /// Peripheral device type (0 = direct access block device).
    pub device_type: u8,
    pub removable: bool,
    pub version: u8,
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

/// READ CAPACITY (16).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Number of logical blocks.
    pub blocks: u64,
    pub block_size: u32,
    /// Logical block provisioning enabled (thin).
    pub thin: bool,
}

impl Capacity {
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }
}

fn request(lun: u64, cdb: &[u8], data_out: Bytes, read_len: u32) -> ScsiRequest {
    ScsiRequest {
        lun: scsi::lun::encode(lun),
        cdb: Bytes::copy_from_slice(cdb),
        data_out,
        read_len,
        attr: TaskAttr::Simple,
    }
}

/// GOOD, or the status and sense as an error.
pub(crate) fn check(c: ScsiCompletion) -> Result<ScsiCompletion, Error> {
    if c.response != ServiceResponse::COMMAND_COMPLETED {
        return Err(Error::TargetFailure(c.response));
    }
    if c.status == Status::GOOD || c.status == Status::CONDITION_MET {
        return Ok(c);
    }
    let sense = scsi::sense::Sense::parse(&c.sense)
        .map(|s| format!("{:?}/{:02x}/{:02x}", s.key, s.asc.0 >> 8, s.asc.0 & 0xff));
    Err(Error::Scsi {
        status: c.status,
        sense,
    })
}

/// Retries of a command answered with UNIT ATTENTION (one per pending condition).
const UNIT_ATTENTION_RETRIES: u32 = 8;

fn is_unit_attention(c: &ScsiCompletion) -> bool {
    c.response == ServiceResponse::COMMAND_COMPLETED
        && c.status == Status::CHECK_CONDITION
        && scsi::sense::Sense::parse(&c.sense)
            .is_some_and(|s| s.key == scsi::SenseKey::UNIT_ATTENTION)
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_owned()
}

impl Session {
    /// Runs a CDB and requires GOOD status. A UNIT ATTENTION (power on, reset, parameters
    /// changed, ...) is reported by the target once per I_T nexus and the command was not
    /// executed: it is retried, a few times at most, as SCSI initiators do.
    pub async fn command(
        &self,
        lun: u64,
        cdb: &[u8],
        data_out: Bytes,
        read_len: u32,
    ) -> Result<ScsiCompletion, Error> {
        let mut attempts = 0;
        loop {
            let c = self
                .execute(request(lun, cdb, data_out.clone(), read_len))
                .await?;
            attempts += 1;
            if attempts < UNIT_ATTENTION_RETRIES && is_unit_attention(&c) {
                tracing::debug!(lun, "unit attention; retrying the command");
                continue;
            }
            return check(c);
        }
    }

    /// TEST UNIT READY.
    pub async fn test_unit_ready(&self, lun: u64) -> Result<(), Error> {
        self.command(lun, &[0u8; 6], Bytes::new(), 0)
            .await
            .map(drop)
    }

    /// Standard INQUIRY.
    pub async fn inquiry(&self, lun: u64) -> Result<InquiryData, Error> {
        let c = self
            .command(lun, &[0x12, 0, 0, 0, 255, 0], Bytes::new(), 255)
            .await?;
        let d = c.data.into_bytes();
        if d.len() < 36 {
            return Err(Error::BadData("INQUIRY"));
        }
        Ok(InquiryData {
            device_type: d[0] & 0x1f,
            removable: d[1] & 0x80 != 0,
            version: d[2],
            vendor: ascii(&d[8..16]),
            product: ascii(&d[16..32]),
            revision: ascii(&d[32..36]),
        })
    }

    /// An INQUIRY VPD page, whole (header included).
    pub async fn vpd_page(&self, lun: u64, page: u8) -> Result<Bytes, Error> {
        let c = self
            .command(lun, &[0x12, 1, page, 0x10, 0, 0], Bytes::new(), 4096)
            .await?;
        let d = c.data.into_bytes();
        if d.len() < 4 || d[1] != page {
            return Err(Error::BadData("VPD page"));
        }
        Ok(d)
    }

    /// READ CAPACITY (16).
    pub async fn read_capacity(&self, lun: u64) -> Result<Capacity, Error> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[13] = 32;
        let c = self.command(lun, &cdb, Bytes::new(), 32).await?;
        let d = c.data.into_bytes();
        if d.len() < 15 {
            return Err(Error::BadData("READ CAPACITY (16)"));
        }
        let last = u64::from_be_bytes(
            d[0..8]
                .try_into()
                .map_err(|_| Error::BadData("READ CAPACITY (16)"))?,
        );
        let block_size = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
        if block_size == 0 {
            return Err(Error::BadData("READ CAPACITY (16)"));
        }
        Ok(Capacity {
            blocks: last.saturating_add(1),
            block_size,
            thin: d[14] & 0x80 != 0,
        })
    }

    /// REPORT LUNS: the LUN numbers the target exposes to us.
    pub async fn report_luns(&self) -> Result<Vec<u64>, Error> {
        let alloc: u32 = 16 + 8 * 1024;
        let mut cdb = [0u8; 12];
        cdb[0] = 0xa0;
        cdb[6..10].copy_from_slice(&alloc.to_be_bytes());
        let c = self.command(0, &cdb, Bytes::new(), alloc).await?;
        let d = c.data.into_bytes();
        if d.len() < 8 {
            return Err(Error::BadData("REPORT LUNS"));
        }
        let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
        let end = (8 + len).min(d.len());
        Ok(d[8..end]
            .chunks_exact(8)
            .filter_map(|e| {
                let raw = u64::from_be_bytes(e.try_into().ok()?);
                let lun = scsi::lun::decode(raw);
                (lun != scsi::lun::INVALID).then_some(lun)
            })
            .collect())
    }

    /// READ (16) of `blocks` blocks of `block_size` bytes at `lba`, as one buffer (a copy
    /// when the data came in more than one Data-In PDU; see [`Session::read_segments`]).
    pub async fn read(
        &self,
        lun: u64,
        lba: u64,
        blocks: u32,
        block_size: u32,
    ) -> Result<Bytes, Error> {
        Ok(self
            .read_segments(lun, lba, blocks, block_size)
            .await?
            .into_bytes())
    }

    /// READ (16) of `blocks` blocks of `block_size` bytes at `lba`, as the Data-In segments
    /// received (slices of the receive buffer, never copied).
    pub async fn read_segments(
        &self,
        lun: u64,
        lba: u64,
        blocks: u32,
        block_size: u32,
    ) -> Result<DataIn, Error> {
        let len = blocks
            .checked_mul(block_size)
            .ok_or(Error::BadData("read length"))?;
        let c = self
            .command(lun, &rw16(0x88, lba, blocks), Bytes::new(), len)
            .await?;
        Ok(c.data)
    }

    /// WRITE (16) of `data` (a whole number of `block_size` blocks) at `lba`.
    pub async fn write(
        &self,
        lun: u64,
        lba: u64,
        data: Bytes,
        block_size: u32,
    ) -> Result<(), Error> {
        if block_size == 0 || data.len() % block_size as usize != 0 {
            return Err(Error::BadData("write length"));
        }
        let blocks = u32::try_from(data.len() / block_size as usize)
            .map_err(|_| Error::BadData("write length"))?;
        self.command(lun, &rw16(0x8a, lba, blocks), data, 0)
            .await
            .map(drop)
    }

    /// SYNCHRONIZE CACHE (16) of the whole LUN.
    pub async fn synchronize_cache(&self, lun: u64) -> Result<(), Error> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x91;
        self.command(lun, &cdb, Bytes::new(), 0).await.map(drop)
    }
}

fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = op;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}
