//! virtio-scsi (virtio 1.2 §5.6) and virtio-blk (§5.2) request and response layouts, and the
//! feature bits this driver negotiates. All fields little-endian.

/// Feature bits (virtio 1.2 §6 and the device sections).
pub mod features {
    /// virtio-blk: size_max is valid.
    pub const BLK_SIZE_MAX: u64 = 1 << 1;
    /// virtio-blk: seg_max is valid.
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    /// virtio-blk: geometry is valid.
    pub const BLK_GEOMETRY: u64 = 1 << 4;
    /// virtio-blk: read-only.
    pub const BLK_RO: u64 = 1 << 5;
    /// virtio-blk: blk_size is valid.
    pub const BLK_BLK_SIZE: u64 = 1 << 6;
    /// virtio-blk: FLUSH.
    pub const BLK_FLUSH: u64 = 1 << 9;
    /// virtio-blk: topology fields are valid.
    pub const BLK_TOPOLOGY: u64 = 1 << 10;
    /// virtio-blk: writeback is configurable.
    pub const BLK_CONFIG_WCE: u64 = 1 << 11;
    /// virtio-blk: num_queues is valid.
    pub const BLK_MQ: u64 = 1 << 12;
    /// virtio-blk: DISCARD.
    pub const BLK_DISCARD: u64 = 1 << 13;
    /// virtio-blk: WRITE_ZEROES.
    pub const BLK_WRITE_ZEROES: u64 = 1 << 14;
    /// virtio-scsi: requests with both data-out and data-in.
    pub const SCSI_INOUT: u64 = 1 << 0;
    /// virtio-scsi: hotplug events.
    pub const SCSI_HOTPLUG: u64 = 1 << 1;
    /// virtio-scsi: parameter change events.
    pub const SCSI_CHANGE: u64 = 1 << 2;
    /// vhost: log all writes (live migration).
    pub const LOG_ALL: u64 = 1 << 26;
    /// vhost-user: protocol features are negotiated.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// virtio 1.0 or later.
    pub const VERSION_1: u64 = 1 << 32;

    /// Device features this driver understands (it acks those the device offers).
    pub const BLK_UNDERSTOOD: u64 = BLK_SIZE_MAX
        | BLK_SEG_MAX
        | BLK_GEOMETRY
        | BLK_RO
        | BLK_BLK_SIZE
        | BLK_FLUSH
        | BLK_TOPOLOGY
        | BLK_CONFIG_WCE
        | BLK_MQ
        | BLK_DISCARD
        | BLK_WRITE_ZEROES;
    /// virtio-scsi features understood (not T10_PI, which changes the request layout).
    pub const SCSI_UNDERSTOOD: u64 = SCSI_INOUT | SCSI_HOTPLUG | SCSI_CHANGE;
}

/// virtio-blk request types.
pub mod blk {
    /// VIRTIO_BLK_T_IN (read).
    pub const T_IN: u32 = 0;
    /// VIRTIO_BLK_T_OUT (write).
    pub const T_OUT: u32 = 1;
    /// VIRTIO_BLK_T_FLUSH.
    pub const T_FLUSH: u32 = 4;
    /// VIRTIO_BLK_T_GET_ID (20 bytes of serial).
    pub const T_GET_ID: u32 = 8;
    /// VIRTIO_BLK_T_DISCARD.
    pub const T_DISCARD: u32 = 11;
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    pub const T_WRITE_ZEROES: u32 = 13;
    /// Status: OK.
    pub const S_OK: u8 = 0;
    /// Status: I/O error.
    pub const S_IOERR: u8 = 1;
    /// Status: unsupported.
    pub const S_UNSUPP: u8 = 2;
}

/// virtio-scsi constants.
pub mod scsi {
    /// Control request type: task management.
    pub const T_TMF: u32 = 0;
    /// Control request type: asynchronous notification query.
    pub const T_AN_QUERY: u32 = 1;
    /// Control request type: asynchronous notification subscribe.
    pub const T_AN_SUBSCRIBE: u32 = 2;
    /// TMF subtypes.
    pub const T_TMF_ABORT_TASK: u32 = 0;
    /// TMF: abort task set.
    pub const T_TMF_ABORT_TASK_SET: u32 = 1;
    /// TMF: clear ACA.
    pub const T_TMF_CLEAR_ACA: u32 = 2;
    /// TMF: clear task set.
    pub const T_TMF_CLEAR_TASK_SET: u32 = 3;
    /// TMF: I_T nexus reset.
    pub const T_TMF_I_T_NEXUS_RESET: u32 = 4;
    /// TMF: logical unit reset.
    pub const T_TMF_LOGICAL_UNIT_RESET: u32 = 5;
    /// TMF: query task.
    pub const T_TMF_QUERY_TASK: u32 = 6;
    /// TMF: query task set.
    pub const T_TMF_QUERY_TASK_SET: u32 = 7;
    /// Response: OK.
    pub const S_OK: u8 = 0;
    /// Response: overrun.
    pub const S_OVERRUN: u8 = 1;
    /// Response: aborted.
    pub const S_ABORTED: u8 = 2;
    /// Response: bad target.
    pub const S_BAD_TARGET: u8 = 3;
    /// Response: reset.
    pub const S_RESET: u8 = 4;
    /// Response: busy.
    pub const S_BUSY: u8 = 5;
    /// Response: transport failure.
    pub const S_TRANSPORT_FAILURE: u8 = 6;
    /// Response: target failure.
    pub const S_TARGET_FAILURE: u8 = 7;
    /// Response: nexus failure.
    pub const S_NEXUS_FAILURE: u8 = 8;
    /// Response: failure.
    pub const S_FAILURE: u8 = 9;
    /// Response: function succeeded (TMF).
    pub const S_FUNCTION_SUCCEEDED: u8 = 10;
    /// Response: function rejected (TMF).
    pub const S_FUNCTION_REJECTED: u8 = 11;
    /// Response: incorrect LUN.
    pub const S_INCORRECT_LUN: u8 = 12;
    /// Event: no event (with EVENTS_MISSED possibly or'ed in).
    pub const T_NO_EVENT: u32 = 0;
    /// Event: transport reset.
    pub const T_TRANSPORT_RESET: u32 = 1;
    /// Event: asynchronous notification.
    pub const T_ASYNC_NOTIFY: u32 = 2;
    /// Event: parameter change.
    pub const T_PARAM_CHANGE: u32 = 3;
    /// Event flag: events were missed.
    pub const T_EVENTS_MISSED: u32 = 0x8000_0000;
}

/// Default CDB size in the request header (virtio-scsi config default).
pub(crate) const CDB_SIZE: usize = 32;
/// Default sense size in the response (virtio-scsi config default).
pub(crate) const SENSE_SIZE: usize = 96;
/// virtio_scsi_req_cmd's device-readable part: lun[8], id u64, task_attr, prio, crn, cdb[32].
pub(crate) const SCSI_REQ_LEN: usize = 8 + 8 + 3 + CDB_SIZE;
/// Device-writable part: sense_len u32, resid u32, status_qualifier u16, status, response,
/// sense[96].
pub(crate) const SCSI_RESP_LEN: usize = 4 + 4 + 2 + 1 + 1 + SENSE_SIZE;
/// virtio_blk_req header: type u32, reserved u32, sector u64.
pub(crate) const BLK_HDR_LEN: usize = 16;
/// Bytes of virtio_blk_config this driver reads (up to max_write_zeroes_seg).
pub(crate) const BLK_CONFIG_LEN: usize = 56;

/// The virtio-scsi LUN field: single-level LUN addressing of target 0.
pub fn scsi_lun(lun: u16) -> [u8; 8] {
    [1, 0, 0x40 | (lun >> 8) as u8, lun as u8, 0, 0, 0, 0]
}

/// A virtio-scsi command request header (simple task attribute); the CDB padded to 32 bytes.
pub(crate) fn scsi_cmd_req(lun: u16, tag: u64, cdb: &[u8]) -> [u8; SCSI_REQ_LEN] {
    assert!(cdb.len() <= CDB_SIZE, "CDB longer than {CDB_SIZE} bytes");
    let mut r = [0u8; SCSI_REQ_LEN];
    r[0..8].copy_from_slice(&scsi_lun(lun));
    r[8..16].copy_from_slice(&tag.to_le_bytes());
    // task_attr 0 (SIMPLE), prio 0, crn 0
    r[19..19 + cdb.len()].copy_from_slice(cdb);
    r
}

/// The parsed device-writable part of a virtio-scsi command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScsiResp {
    pub sense_len: u32,
    pub resid: u32,
    pub status: u8,
    pub response: u8,
}

pub(crate) fn parse_scsi_resp(b: &[u8; SCSI_RESP_LEN]) -> ScsiResp {
    ScsiResp {
        sense_len: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
        resid: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
        status: b[10],
        response: b[11],
    }
}

/// virtio_scsi_ctrl_tmf device-readable part: type, subtype, lun[8], id.
pub(crate) fn tmf_req(subtype: u32, lun: u16, tag: u64) -> [u8; 24] {
    let mut r = [0u8; 24];
    r[0..4].copy_from_slice(&scsi::T_TMF.to_le_bytes());
    r[4..8].copy_from_slice(&subtype.to_le_bytes());
    r[8..16].copy_from_slice(&scsi_lun(lun));
    r[16..24].copy_from_slice(&tag.to_le_bytes());
    r
}

/// virtio_scsi_ctrl_an device-readable part: type, lun[8], event_requested.
pub(crate) fn an_query_req(lun: u16, event_requested: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0..4].copy_from_slice(&scsi::T_AN_QUERY.to_le_bytes());
    r[4..12].copy_from_slice(&scsi_lun(lun));
    r[12..16].copy_from_slice(&event_requested.to_le_bytes());
    r
}

/// The virtio-blk request header.
pub(crate) fn blk_header(req_type: u32, sector: u64) -> [u8; BLK_HDR_LEN] {
    let mut r = [0u8; BLK_HDR_LEN];
    r[0..4].copy_from_slice(&req_type.to_le_bytes());
    r[8..16].copy_from_slice(&sector.to_le_bytes());
    r
}

/// The fields of virtio_blk_config this driver reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size (valid with VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// Request queues (valid with VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Maximum segments per request (valid with VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Maximum discard sectors (valid with VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: u32,
    /// Maximum write-zeroes sectors (valid with VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
}

impl BlkConfig {
    /// Parses the first `BLK_CONFIG_LEN` bytes of the config space.
    pub(crate) fn parse(b: &[u8; BLK_CONFIG_LEN]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        BlkConfig {
            capacity_sectors: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            num_queues: u16::from_le_bytes([b[34], b[35]]),
            max_discard_sectors: u32_at(36),
            max_write_zeroes_sectors: u32_at(48),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scsi_request_layout() {
        assert_eq!(SCSI_REQ_LEN, 51);
        assert_eq!(SCSI_RESP_LEN, 108);
        let r = scsi_cmd_req(0x123, 0xaabb, &[0x28, 1, 2]);
        assert_eq!(&r[0..8], &[1, 0, 0x41, 0x23, 0, 0, 0, 0]);
        assert_eq!(&r[8..16], &0xaabbu64.to_le_bytes());
        assert_eq!(&r[16..19], &[0, 0, 0]);
        assert_eq!(&r[19..22], &[0x28, 1, 2]);
        assert!(r[22..].iter().all(|&b| b == 0));
        let mut resp = [0u8; SCSI_RESP_LEN];
        resp[0] = 18;
        resp[4] = 7;
        resp[10] = 2;
        resp[11] = 3;
        assert_eq!(
            parse_scsi_resp(&resp),
            ScsiResp {
                sense_len: 18,
                resid: 7,
                status: 2,
                response: 3
            }
        );
    }

    #[test]
    fn control_and_blk_layouts() {
        let t = tmf_req(scsi::T_TMF_LOGICAL_UNIT_RESET, 2, 9);
        assert_eq!(&t[0..8], &[0, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(&t[8..12], &[1, 0, 0x40, 2]);
        assert_eq!(t[16], 9);
        let a = an_query_req(0, 0x10);
        assert_eq!(&a[0..4], &[1, 0, 0, 0]);
        assert_eq!(&a[12..16], &[0x10, 0, 0, 0]);
        let h = blk_header(blk::T_OUT, 0x0102);
        assert_eq!(h, [1, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
        let mut c = [0u8; BLK_CONFIG_LEN];
        c[0] = 8;
        c[12] = 126;
        c[20..22].copy_from_slice(&[0, 2]);
        c[34] = 4;
        c[36] = 1;
        c[48] = 2;
        let cfg = BlkConfig::parse(&c);
        assert_eq!(
            cfg,
            BlkConfig {
                capacity_sectors: 8,
                blk_size: 512,
                num_queues: 4,
                seg_max: 126,
                max_discard_sectors: 1,
                max_write_zeroes_sectors: 2
            }
        );
    }
}
