//! virtio-scsi (virtio 1.2 §5.6) as bytes: request and response layouts, the LUN field, task
//! management codes, events, and what the bus answers itself instead of the target.
//!
//! Pure functions over byte slices; the queues and guest memory are `device`'s business.

use scsi::sense::Sense;
use scsi::{AscAscq, SenseKey};

/// Queue indices: control, event, then the request queues.
pub const CONTROL_QUEUE: u16 = 0;
pub const EVENT_QUEUE: u16 = 1;
pub const FIRST_REQUEST_QUEUE: u16 = 2;

/// Size of the CDB field in a request (the device's `cdb_size`; QEMU and Linux use 32).
pub const CDB_SIZE: usize = 32;
/// Size of the sense field in a response (`sense_size`).
pub const SENSE_SIZE: usize = 96;
/// `struct virtio_scsi_cmd_req`: lun[8] tag u64 task_attr u8 prio u8 crn u8 cdb[32].
pub const REQUEST_HEADER_LEN: usize = 8 + 8 + 3 + CDB_SIZE;
/// `struct virtio_scsi_cmd_resp`: sense_len u32 resid u32 status_qualifier u16 status u8
/// response u8 sense[96].
pub const RESPONSE_HEADER_LEN: usize = 4 + 4 + 2 + 1 + 1 + SENSE_SIZE;

/// Response codes (the `response` byte).
pub const S_OK: u8 = 0;
pub const S_OVERRUN: u8 = 1;
pub const S_ABORTED: u8 = 2;
pub const S_BAD_TARGET: u8 = 3;
pub const S_RESET: u8 = 4;
pub const S_BUSY: u8 = 5;
pub const S_TRANSPORT_FAILURE: u8 = 6;
pub const S_TARGET_FAILURE: u8 = 7;
pub const S_NEXUS_FAILURE: u8 = 8;
pub const S_FAILURE: u8 = 9;
pub const S_FUNCTION_SUCCEEDED: u8 = 10;
pub const S_FUNCTION_REJECTED: u8 = 11;
pub const S_INCORRECT_LUN: u8 = 12;

/// Control queue request types.
pub const T_TMF: u32 = 0;
pub const T_AN_QUERY: u32 = 1;
pub const T_AN_SUBSCRIBE: u32 = 2;

/// Task management subtypes.
pub const TMF_ABORT_TASK: u32 = 0;
pub const TMF_ABORT_TASK_SET: u32 = 1;
pub const TMF_CLEAR_ACA: u32 = 2;
pub const TMF_CLEAR_TASK_SET: u32 = 3;
pub const TMF_I_T_NEXUS_RESET: u32 = 4;
pub const TMF_LOGICAL_UNIT_RESET: u32 = 5;
pub const TMF_QUERY_TASK: u32 = 6;
pub const TMF_QUERY_TASK_SET: u32 = 7;

/// `struct virtio_scsi_ctrl_tmf_req`: type u32 subtype u32 lun[8] tag u64.
pub const TMF_REQUEST_LEN: usize = 4 + 4 + 8 + 8;
/// `struct virtio_scsi_ctrl_an_req`: type u32 lun[8] event_requested u32.
pub const AN_REQUEST_LEN: usize = 4 + 8 + 4;

/// Events (event queue).
pub const T_NO_EVENT: u32 = 0;
pub const T_TRANSPORT_RESET: u32 = 1;
pub const T_PARAM_CHANGE: u32 = 3;
pub const T_EVENTS_MISSED: u32 = 0x8000_0000;
/// `struct virtio_scsi_event`: event u32 lun[8] reason u32.
pub const EVENT_LEN: usize = 16;

/// Feature bits of the device.
pub const F_CHANGE: u64 = 1 << 2;

/// The highest LUN number the bus addresses (flat space addressing).
pub const MAX_LUN: u16 = 16383;

/// Where a virtio-scsi LUN field points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Address {
    /// Target 0 (the only one), this LUN number.
    Lun(u16),
    /// Another target, or a field that is not the virtio-scsi format.
    BadTarget,
}

/// Decodes the 8-byte virtio-scsi LUN field: byte 0 is 1, byte 1 the target, bytes 2–3 the LUN
/// in SAM single-level format (peripheral or flat space), bytes 4–7 zero.
pub fn decode_lun(field: &[u8; 8]) -> Address {
    if field[0] != 1 || field[1] != 0 || field[4..] != [0, 0, 0, 0] {
        return Address::BadTarget;
    }
    let level = u16::from_be_bytes([field[2], field[3]]);
    match level >> 14 {
        0 if level >> 8 == 0 => Address::Lun(level & 0xff),
        1 => Address::Lun(level & 0x3fff),
        _ => Address::BadTarget,
    }
}

/// The parsed fixed part of a command request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub lun: [u8; 8],
    pub tag: u64,
    pub task_attr: u8,
    /// The CDB with trailing bytes beyond its length dropped (a slice of the request).
    pub cdb: bytes::Bytes,
}

/// Parses a command request header (`REQUEST_HEADER_LEN` bytes); `None` if short.
pub fn parse_request(bytes: &bytes::Bytes) -> Option<RequestHeader> {
    if bytes.len() < REQUEST_HEADER_LEN {
        return None;
    }
    let mut lun = [0u8; 8];
    lun.copy_from_slice(&bytes[..8]);
    let tag = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    let task_attr = bytes[16];
    let cdb_field = &bytes[19..19 + CDB_SIZE];
    let cdb = bytes.slice(19..19 + cdb_length(cdb_field));
    Some(RequestHeader {
        lun,
        tag,
        task_attr,
        cdb,
    })
}

/// Length of the CDB from its operation code's group (SPC-4 4.2.5.1); variable-length CDBs
/// (0x7f) carry their additional length in byte 7.
pub fn cdb_length(cdb: &[u8]) -> usize {
    let len = match cdb.first().map(|op| op >> 5) {
        Some(0) => 6,
        Some(1) | Some(2) => 10,
        Some(4) => 16,
        Some(5) => 12,
        Some(3) if cdb[0] == 0x7f => cdb.get(7).map_or(8, |&n| 8 + usize::from(n)),
        // Reserved and vendor-specific groups: pass the whole field.
        _ => cdb.len(),
    };
    len.min(cdb.len())
}

/// The response header the guest reads: `RESPONSE_HEADER_LEN` bytes.
pub fn encode_response(
    response: u8,
    status: u8,
    resid: u32,
    sense: &[u8],
) -> [u8; RESPONSE_HEADER_LEN] {
    let mut out = [0u8; RESPONSE_HEADER_LEN];
    let sense = &sense[..sense.len().min(SENSE_SIZE)];
    out[0..4].copy_from_slice(&(sense.len() as u32).to_le_bytes());
    out[4..8].copy_from_slice(&resid.to_le_bytes());
    out[10] = status;
    out[11] = response;
    out[12..12 + sense.len()].copy_from_slice(sense);
    out
}

/// A response that never reached a LUN (`response` other than OK, status GOOD).
pub fn failure_response(response: u8, resid: u32) -> [u8; RESPONSE_HEADER_LEN] {
    encode_response(response, 0, resid, &[])
}

/// CHECK CONDITION with fixed-format sense.
pub fn check_condition(key: SenseKey, asc: AscAscq, resid: u32) -> [u8; RESPONSE_HEADER_LEN] {
    encode_response(S_OK, 0x02, resid, &Sense::new(key, asc).encode_fixed())
}

/// Parsed task management request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmfRequest {
    pub subtype: u32,
    pub lun: [u8; 8],
    pub tag: u64,
}

/// Parses a TMF request (the control request's type already known to be `T_TMF`).
pub fn parse_tmf(bytes: &[u8]) -> Option<TmfRequest> {
    if bytes.len() < TMF_REQUEST_LEN {
        return None;
    }
    let mut lun = [0u8; 8];
    lun.copy_from_slice(&bytes[8..16]);
    Some(TmfRequest {
        subtype: u32::from_le_bytes(bytes[4..8].try_into().ok()?),
        lun,
        tag: u64::from_le_bytes(bytes[16..24].try_into().ok()?),
    })
}

/// An event for the event queue.
pub fn encode_event(event: u32, lun: u16, reason: u32) -> [u8; EVENT_LEN] {
    let mut out = [0u8; EVENT_LEN];
    out[0..4].copy_from_slice(&event.to_le_bytes());
    out[4] = 1;
    let level = 0x4000 | lun;
    out[6..8].copy_from_slice(&level.to_be_bytes());
    out[12..16].copy_from_slice(&reason.to_le_bytes());
    out
}

/// When the VM may use only some LUNs: what the bus answers itself for a command to `lun`.
///
/// - REPORT LUNS (any LUN): the VM's LUNs.
/// - INQUIRY to a LUN outside the set: peripheral qualifier 011b ("no logical unit here"), so
///   the guest's scan skips it without errors.
/// - Anything else to such a LUN: CHECK CONDITION, LOGICAL UNIT NOT SUPPORTED.
///
/// `None` means the command goes to the target.
pub fn answer_locally(luns: &[u64], lun: u16, cdb: &[u8]) -> Option<LocalAnswer> {
    if luns.is_empty() {
        return None;
    }
    let op = *cdb.first()?;
    if op == 0xa0 {
        return Some(LocalAnswer::Data(report_luns(luns)));
    }
    if luns.contains(&u64::from(lun)) {
        return None;
    }
    if op == 0x12 {
        let mut data = vec![0u8; 36];
        data[0] = 0x7f;
        data[2] = 0x06; // SPC-4
        data[3] = 0x02;
        data[4] = 31;
        return Some(LocalAnswer::Data(data));
    }
    Some(LocalAnswer::Check(
        SenseKey::ILLEGAL_REQUEST,
        AscAscq::LOGICAL_UNIT_NOT_SUPPORTED,
    ))
}

/// An answer the bus gives without the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalAnswer {
    /// GOOD with this Data-In (cut to the allocation length by the caller's buffer).
    Data(Vec<u8>),
    Check(SenseKey, AscAscq),
}

/// REPORT LUNS parameter data for `luns` (SPC-4 6.33).
pub fn report_luns(luns: &[u64]) -> Vec<u8> {
    let mut sorted: Vec<u64> = luns.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = Vec::with_capacity(8 + 8 * sorted.len());
    out.extend_from_slice(&((8 * sorted.len()) as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for lun in sorted {
        out.extend_from_slice(&scsi::lun::encode(lun).to_be_bytes());
    }
    out
}

/// Allocation length of an INQUIRY or REPORT LUNS CDB (what the guest's buffer holds).
pub fn allocation_length(cdb: &[u8]) -> Option<usize> {
    match cdb.first()? {
        0x12 if cdb.len() >= 5 => Some(usize::from(u16::from_be_bytes([cdb[3], cdb[4]]))),
        0xa0 if cdb.len() >= 10 => {
            Some(u32::from_be_bytes([cdb[6], cdb[7], cdb[8], cdb[9]]) as usize)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_field_decodes_target_zero_only() {
        assert_eq!(decode_lun(&[1, 0, 0, 0, 0, 0, 0, 0]), Address::Lun(0));
        assert_eq!(decode_lun(&[1, 0, 0x40, 5, 0, 0, 0, 0]), Address::Lun(5));
        assert_eq!(
            decode_lun(&[1, 0, 0x7f, 0xff, 0, 0, 0, 0]),
            Address::Lun(16383)
        );
        assert_eq!(decode_lun(&[1, 0, 0, 7, 0, 0, 0, 0]), Address::Lun(7));
        assert_eq!(decode_lun(&[1, 1, 0, 0, 0, 0, 0, 0]), Address::BadTarget);
        assert_eq!(decode_lun(&[0, 0, 0, 0, 0, 0, 0, 0]), Address::BadTarget);
        assert_eq!(decode_lun(&[1, 0, 0x80, 0, 0, 0, 0, 0]), Address::BadTarget);
        assert_eq!(decode_lun(&[1, 0, 0, 0, 0, 0, 0, 1]), Address::BadTarget);
    }

    #[test]
    fn request_header_parses_and_trims_the_cdb() {
        let mut req = vec![0u8; REQUEST_HEADER_LEN];
        req[..8].copy_from_slice(&[1, 0, 0x40, 2, 0, 0, 0, 0]);
        req[8..16].copy_from_slice(&0x1122u64.to_le_bytes());
        req[16] = 1;
        req[19] = 0x28;
        req[27] = 8;
        let req = bytes::Bytes::from(req);
        let h = parse_request(&req).unwrap();
        assert_eq!(h.tag, 0x1122);
        assert_eq!(h.task_attr, 1);
        assert_eq!(h.cdb.len(), 10);
        assert_eq!(h.cdb[0], 0x28);
        assert!(parse_request(&req.slice(..REQUEST_HEADER_LEN - 1)).is_none());
    }

    #[test]
    fn cdb_lengths_follow_the_group_code() {
        assert_eq!(cdb_length(&[0x12; 32]), 6);
        assert_eq!(cdb_length(&[0x28; 32]), 10);
        assert_eq!(cdb_length(&[0x88; 32]), 16);
        assert_eq!(cdb_length(&[0xa0; 32]), 12);
        let mut var = [0u8; 32];
        var[0] = 0x7f;
        var[7] = 0x18;
        assert_eq!(cdb_length(&var), 32);
        var[7] = 0x40;
        assert_eq!(cdb_length(&var), 32, "clamped to the field");
        assert_eq!(cdb_length(&[]), 0);
    }

    #[test]
    fn response_layout() {
        let sense = [0x70, 0, 5, 0, 0, 0, 0, 10];
        let r = encode_response(S_OK, 2, 512, &sense);
        assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 8);
        assert_eq!(u32::from_le_bytes(r[4..8].try_into().unwrap()), 512);
        assert_eq!(r[10], 2);
        assert_eq!(r[11], S_OK);
        assert_eq!(&r[12..20], &sense);
        let long = [0xaa; 200];
        let r = encode_response(S_OK, 2, 0, &long);
        assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 96);
    }

    #[test]
    fn local_answers_only_with_a_lun_list() {
        assert_eq!(answer_locally(&[], 3, &[0x12, 0, 0, 0, 36, 0]), None);
        let luns = [1, 2];
        let Some(LocalAnswer::Data(d)) = answer_locally(&luns, 0, &[0xa0; 12]) else {
            panic!("REPORT LUNS answered locally")
        };
        assert_eq!(&d[..4], &16u32.to_be_bytes());
        assert_eq!(&d[8..16], &scsi::lun::encode(1).to_be_bytes());
        assert_eq!(answer_locally(&luns, 1, &[0x28; 10]), None);
        let Some(LocalAnswer::Data(inq)) = answer_locally(&luns, 0, &[0x12, 0, 0, 0, 36, 0]) else {
            panic!("INQUIRY to a hidden LUN answered locally")
        };
        assert_eq!(inq[0], 0x7f);
        assert_eq!(
            answer_locally(&luns, 5, &[0x28; 10]),
            Some(LocalAnswer::Check(
                SenseKey::ILLEGAL_REQUEST,
                AscAscq::LOGICAL_UNIT_NOT_SUPPORTED
            ))
        );
    }

    #[test]
    fn tmf_and_event_layouts() {
        let mut req = vec![0u8; TMF_REQUEST_LEN];
        req[4..8].copy_from_slice(&TMF_LOGICAL_UNIT_RESET.to_le_bytes());
        req[8..16].copy_from_slice(&[1, 0, 0, 3, 0, 0, 0, 0]);
        req[16..24].copy_from_slice(&77u64.to_le_bytes());
        let t = parse_tmf(&req).unwrap();
        assert_eq!(t.subtype, TMF_LOGICAL_UNIT_RESET);
        assert_eq!(decode_lun(&t.lun), Address::Lun(3));
        assert_eq!(t.tag, 77);
        assert!(parse_tmf(&req[..20]).is_none());
        let e = encode_event(T_PARAM_CHANGE, 3, 0x092a);
        assert_eq!(
            u32::from_le_bytes(e[0..4].try_into().unwrap()),
            T_PARAM_CHANGE
        );
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&e[4..12]);
        assert_eq!(decode_lun(&lun), Address::Lun(3));
    }
}
