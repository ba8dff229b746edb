//! virtio-blk (virtio 1.2 §5.2) as bytes, and its translation to SCSI commands on one LUN.
//!
//! virtio-blk has no SCSI inside: reads, writes and flushes become READ(16), WRITE(16) and
//! SYNCHRONIZE CACHE(10) on the VM's LUN; GET_ID answers the LUN's serial number. Sectors are
//! always 512 bytes on virtio-blk; a LUN with larger blocks takes only aligned requests.

/// `struct virtio_blk_outhdr`: type u32, reserved u32, sector u64.
pub const HEADER_LEN: usize = 16;
/// virtio-blk sector size.
pub const SECTOR: u64 = 512;
/// GET_ID answer length.
pub const ID_LEN: usize = 20;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_TOPOLOGY: u64 = 1 << 10;
pub const F_MQ: u64 = 1 << 12;

/// The request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub req_type: u32,
    pub sector: u64,
}

/// Parses the 16-byte header; `None` if short.
pub fn parse_header(bytes: &[u8]) -> Option<Header> {
    if bytes.len() < HEADER_LEN {
        return None;
    }
    Some(Header {
        req_type: u32::from_le_bytes(bytes[0..4].try_into().ok()?),
        sector: u64::from_le_bytes(bytes[8..16].try_into().ok()?),
    })
}

/// What the device is, as the config space tells the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Logical block size of the LUN.
    pub block_size: u32,
    /// Number of logical blocks.
    pub blocks: u64,
    /// Physical blocks per logical block, as a power of two (READ CAPACITY(16) byte 13).
    pub physical_exponent: u8,
}

impl Geometry {
    pub fn capacity_sectors(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size)) / SECTOR
    }

    /// Parses READ CAPACITY(16) parameter data.
    pub fn from_read_capacity16(data: &[u8]) -> Option<Geometry> {
        if data.len() < 14 {
            return None;
        }
        let last = u64::from_be_bytes(data[0..8].try_into().ok()?);
        let block_size = u32::from_be_bytes(data[8..12].try_into().ok()?);
        if block_size < 512 || !block_size.is_power_of_two() {
            return None;
        }
        Some(Geometry {
            block_size,
            blocks: last.checked_add(1)?,
            physical_exponent: data[13] & 0x0f,
        })
    }
}

/// Size of the config space we expose (up to and including `num_queues`).
pub const CONFIG_LEN: usize = 36;

/// The config space (`struct virtio_blk_config`) up to `num_queues`.
pub fn encode_config(geometry: &Geometry, seg_max: u32, num_queues: u16) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[0..8].copy_from_slice(&geometry.capacity_sectors().to_le_bytes());
    c[12..16].copy_from_slice(&seg_max.to_le_bytes());
    c[20..24].copy_from_slice(&geometry.block_size.to_le_bytes());
    c[24] = geometry.physical_exponent;
    c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size, in blocks
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    c
}

/// A virtio-blk request as a SCSI command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Translated {
    /// Send this CDB; `read_len` bytes come back.
    Scsi { cdb: Vec<u8>, read_len: u32 },
    /// Answer GET_ID from the LUN's identity.
    GetId,
    /// Fail with this status without touching the LUN.
    Fail(u8),
}

/// Translates a request with `data_len` bytes of data (to write for OUT, to read for IN).
pub fn translate(header: &Header, data_len: u64, geometry: &Geometry) -> Translated {
    match header.req_type {
        T_IN | T_OUT => {
            let bs = u64::from(geometry.block_size);
            let Some(byte_offset) = header.sector.checked_mul(SECTOR) else {
                return Translated::Fail(S_IOERR);
            };
            if byte_offset % bs != 0 || data_len % bs != 0 {
                return Translated::Fail(S_IOERR);
            }
            let lba = byte_offset / bs;
            let blocks = data_len / bs;
            if blocks > u64::from(u32::MAX)
                || lba
                    .checked_add(blocks)
                    .is_none_or(|end| end > geometry.blocks)
            {
                return Translated::Fail(S_IOERR);
            }
            let op = if header.req_type == T_IN { 0x88 } else { 0x8a };
            let mut cdb = vec![0u8; 16];
            cdb[0] = op;
            cdb[2..10].copy_from_slice(&lba.to_be_bytes());
            cdb[10..14].copy_from_slice(&(blocks as u32).to_be_bytes());
            let read_len = if header.req_type == T_IN {
                data_len as u32
            } else {
                0
            };
            Translated::Scsi { cdb, read_len }
        }
        T_FLUSH => Translated::Scsi {
            cdb: vec![0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            read_len: 0,
        },
        T_GET_ID => Translated::GetId,
        _ => Translated::Fail(S_UNSUPP),
    }
}

/// The GET_ID answer: the unit serial number (VPD 0x80) or, without one, the designator of
/// VPD 0x83, cut or zero-padded to 20 bytes.
pub fn device_id(serial: &[u8]) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let trimmed: Vec<u8> = serial
        .iter()
        .copied()
        .filter(|b| b.is_ascii_graphic())
        .take(ID_LEN)
        .collect();
    id[..trimmed.len()].copy_from_slice(&trimmed);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const G512: Geometry = Geometry {
        block_size: 512,
        blocks: 2048,
        physical_exponent: 0,
    };
    const G4K: Geometry = Geometry {
        block_size: 4096,
        blocks: 256,
        physical_exponent: 0,
    };

    fn header(req_type: u32, sector: u64) -> Header {
        Header { req_type, sector }
    }

    #[test]
    fn reads_and_writes_become_read16_and_write16() {
        let Translated::Scsi { cdb, read_len } = translate(&header(T_IN, 8), 4096, &G512) else {
            panic!()
        };
        assert_eq!(cdb[0], 0x88);
        assert_eq!(u64::from_be_bytes(cdb[2..10].try_into().unwrap()), 8);
        assert_eq!(u32::from_be_bytes(cdb[10..14].try_into().unwrap()), 8);
        assert_eq!(read_len, 4096);
        let Translated::Scsi { cdb, read_len } = translate(&header(T_OUT, 8), 8192, &G4K) else {
            panic!()
        };
        assert_eq!(cdb[0], 0x8a);
        assert_eq!(u64::from_be_bytes(cdb[2..10].try_into().unwrap()), 1);
        assert_eq!(u32::from_be_bytes(cdb[10..14].try_into().unwrap()), 2);
        assert_eq!(read_len, 0);
    }

    #[test]
    fn out_of_range_misaligned_and_unknown_requests_fail() {
        assert_eq!(
            translate(&header(T_IN, 2047), 1024, &G512),
            Translated::Fail(S_IOERR)
        );
        assert_eq!(
            translate(&header(T_IN, u64::MAX), 512, &G512),
            Translated::Fail(S_IOERR)
        );
        assert_eq!(
            translate(&header(T_IN, 1), 4096, &G4K),
            Translated::Fail(S_IOERR)
        );
        assert_eq!(
            translate(&header(T_OUT, 0), 100, &G512),
            Translated::Fail(S_IOERR)
        );
        assert_eq!(
            translate(&header(99, 0), 0, &G512),
            Translated::Fail(S_UNSUPP)
        );
        assert_eq!(
            translate(&header(T_GET_ID, 0), 20, &G512),
            Translated::GetId
        );
        assert!(matches!(
            translate(&header(T_FLUSH, 0), 0, &G512),
            Translated::Scsi { .. }
        ));
    }

    #[test]
    fn config_and_capacity() {
        let mut rc = [0u8; 32];
        rc[0..8].copy_from_slice(&255u64.to_be_bytes());
        rc[8..12].copy_from_slice(&4096u32.to_be_bytes());
        let g = Geometry::from_read_capacity16(&rc).unwrap();
        assert_eq!(g, G4K);
        assert_eq!(g.capacity_sectors(), 2048);
        let c = encode_config(&g, 126, 2);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        rc[8..12].copy_from_slice(&1000u32.to_be_bytes());
        assert!(Geometry::from_read_capacity16(&rc).is_none());
        assert!(Geometry::from_read_capacity16(&rc[..10]).is_none());
    }

    #[test]
    fn id_is_printable_and_padded() {
        assert_eq!(&device_id(b"  abc ")[..4], b"abc\0");
        assert_eq!(device_id(&[b'x'; 40]), [b'x'; 20]);
    }
}
