//! Typed PDU headers, one struct per opcode (RFC 7143 §11), with fields named after the RFC.
//!
//! `parse` reads a [`Bhs`] that the framer has checked for length; `to_bhs` writes one.
//! DataSegmentLength and TotalAHSLength are not fields here: [`crate::encode_pdu`] fills them
//! in from the segments actually sent, so they cannot disagree.

use crate::bhs::Bhs;
use crate::codes::*;
use crate::WireError;

/// Initiator Session ID: the 6-byte ISID of §11.12.5, kept as a number (48 bits used).
#[derive(Copy, Clone, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Isid(pub u64);

impl Isid {
    pub fn from_bytes(b: &[u8; 6]) -> Isid {
        Isid(b.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
    }
    pub fn to_bytes(self) -> [u8; 6] {
        let b = self.0.to_be_bytes();
        [b[2], b[3], b[4], b[5], b[6], b[7]]
    }
}

impl core::fmt::Debug for Isid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "0x{:012x}", self.0 & 0xffff_ffff_ffff)
    }
}

impl core::fmt::Display for Isid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}

/// Offsets of the opcode-specific fields, by the RFC's names.
mod at {
    pub const BYTE2: usize = 2;
    pub const BYTE3: usize = 3;
    pub const LUN: usize = 8;
    pub const ISID: usize = 8;
    pub const TSIH: usize = 14;
    pub const ITT: usize = 16;
    pub const W20: usize = 20;
    pub const W24: usize = 24;
    pub const W28: usize = 28;
    pub const W32: usize = 32;
    pub const W36: usize = 36;
    pub const W40: usize = 40;
    pub const W44: usize = 44;
    pub const CDB: core::ops::Range<usize> = 32..48;
}

const F: u8 = 0x80;

fn flag(on: bool, mask: u8) -> u8 {
    if on {
        mask
    } else {
        0
    }
}

fn new_bhs(op: Opcode, immediate: bool, flags: u8) -> Bhs {
    let mut b = Bhs::default();
    b.set_opcode(op);
    b.set_immediate(immediate);
    b.set_flags(flags);
    b
}

/// NOP-Out (§11.18).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl NopOut {
    pub fn parse(b: &Bhs) -> Self {
        NopOut {
            immediate: b.immediate(),
            lun: b.u64_at(at::LUN),
            itt: b.itt(),
            ttt: b.u32_at(at::W20),
            cmd_sn: b.u32_at(at::W24),
            exp_stat_sn: b.u32_at(at::W28),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = new_bhs(Opcode::NOP_OUT, self.immediate, F);
        b.put_u64(at::LUN, self.lun);
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W20, self.ttt);
        b.put_u32(at::W24, self.cmd_sn);
        b.put_u32(at::W28, self.exp_stat_sn);
        b
    }
}

/// NOP-In (§11.19).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

impl NopIn {
    pub fn parse(b: &Bhs) -> Self {
        NopIn {
            lun: b.u64_at(at::LUN),
            itt: b.itt(),
            ttt: b.u32_at(at::W20),
            stat_sn: b.u32_at(at::W24),
            exp_cmd_sn: b.u32_at(at::W28),
            max_cmd_sn: b.u32_at(at::W32),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = new_bhs(Opcode::NOP_IN, false, F);
        b.put_u64(at::LUN, self.lun);
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W20, self.ttt);
        b.put_u32(at::W24, self.stat_sn);
        b.put_u32(at::W28, self.exp_cmd_sn);
        b.put_u32(at::W32, self.max_cmd_sn);
        b
    }
}

/// SCSI Command (§11.3). A CDB longer than 16 bytes continues in an extended-CDB AHS.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    /// Task attribute (0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA).
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
}

impl ScsiCommand {
    pub fn parse(b: &Bhs) -> Self {
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&b.0[at::CDB]);
        ScsiCommand {
            immediate: b.immediate(),
            final_: b.final_bit(),
            read: b.bit(1, 0x40),
            write: b.bit(1, 0x20),
            attr: b.flags() & 0x07,
            lun: b.u64_at(at::LUN),
            itt: b.itt(),
            expected_data_transfer_length: b.u32_at(at::W20),
            cmd_sn: b.u32_at(at::W24),
            exp_stat_sn: b.u32_at(at::W28),
            cdb,
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let flags =
            flag(self.final_, F) | flag(self.read, 0x40) | flag(self.write, 0x20) | (self.attr & 7);
        let mut b = new_bhs(Opcode::SCSI_COMMAND, self.immediate, flags);
        b.put_u64(at::LUN, self.lun);
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W20, self.expected_data_transfer_length);
        b.put_u32(at::W24, self.cmd_sn);
        b.put_u32(at::W28, self.exp_stat_sn);
        b.0[at::CDB].copy_from_slice(&self.cdb);
        b
    }
}

/// SCSI Response (§11.4).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    pub response: ServiceResponse,
    pub status: Status,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_read_residual_count: u32,
    pub residual_count: u32,
}

impl ScsiResponse {
    pub fn parse(b: &Bhs) -> Self {
        ScsiResponse {
            bidi_overflow: b.bit(1, 0x10),
            bidi_underflow: b.bit(1, 0x08),
            overflow: b.bit(1, 0x04),
            underflow: b.bit(1, 0x02),
            response: ServiceResponse(b.0[at::BYTE2]),
            status: Status(b.0[at::BYTE3]),
            itt: b.itt(),
            snack_tag: b.u32_at(at::W20),
            stat_sn: b.u32_at(at::W24),
            exp_cmd_sn: b.u32_at(at::W28),
            max_cmd_sn: b.u32_at(at::W32),
            exp_data_sn: b.u32_at(at::W36),
            bidi_read_residual_count: b.u32_at(at::W40),
            residual_count: b.u32_at(at::W44),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let flags = F
            | flag(self.bidi_overflow, 0x10)
            | flag(self.bidi_underflow, 0x08)
            | flag(self.overflow, 0x04)
            | flag(self.underflow, 0x02);
        let mut b = new_bhs(Opcode::SCSI_RESPONSE, false, flags);
        b.0[at::BYTE2] = self.response.0;
        b.0[at::BYTE3] = self.status.0;
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W20, self.snack_tag);
        b.put_u32(at::W24, self.stat_sn);
        b.put_u32(at::W28, self.exp_cmd_sn);
        b.put_u32(at::W32, self.max_cmd_sn);
        b.put_u32(at::W36, self.exp_data_sn);
        b.put_u32(at::W40, self.bidi_read_residual_count);
        b.put_u32(at::W44, self.residual_count);
        b
    }
}

/// Task Management Function Request (§11.5).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: TmfFunction,
    pub lun: u64,
    pub itt: u32,
    pub referenced_task_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

impl TaskMgmtRequest {
    pub fn parse(b: &Bhs) -> Self {
        TaskMgmtRequest {
            immediate: b.immediate(),
            function: TmfFunction(b.flags() & 0x7f),
            lun: b.u64_at(at::LUN),
            itt: b.itt(),
            referenced_task_tag: b.u32_at(at::W20),
            cmd_sn: b.u32_at(at::W24),
            exp_stat_sn: b.u32_at(at::W28),
            ref_cmd_sn: b.u32_at(at::W32),
            exp_data_sn: b.u32_at(at::W36),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = new_bhs(
            Opcode::TASK_MGMT_REQUEST,
            self.immediate,
            F | (self.function.0 & 0x7f),
        );
        b.put_u64(at::LUN, self.lun);
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W20, self.referenced_task_tag);
        b.put_u32(at::W24, self.cmd_sn);
        b.put_u32(at::W28, self.exp_stat_sn);
        b.put_u32(at::W32, self.ref_cmd_sn);
        b.put_u32(at::W36, self.exp_data_sn);
        b
    }
}

/// Task Management Function Response (§11.6).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TaskMgmtResponse {
    pub response: TmfResponse,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

impl TaskMgmtResponse {
    pub fn parse(b: &Bhs) -> Self {
        TaskMgmtResponse {
            response: TmfResponse(b.0[at::BYTE2]),
            itt: b.itt(),
            stat_sn: b.u32_at(at::W24),
            exp_cmd_sn: b.u32_at(at::W28),
            max_cmd_sn: b.u32_at(at::W32),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = new_bhs(Opcode::TASK_MGMT_RESPONSE, false, F);
        b.0[at::BYTE2] = self.response.0;
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W24, self.stat_sn);
        b.put_u32(at::W28, self.exp_cmd_sn);
        b.put_u32(at::W32, self.max_cmd_sn);
        b
    }
}

/// SCSI Data-Out (§11.7).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

impl DataOut {
    pub fn parse(b: &Bhs) -> Self {
        DataOut {
            final_: b.final_bit(),
            lun: b.u64_at(at::LUN),
            itt: b.itt(),
            ttt: b.u32_at(at::W20),
            exp_stat_sn: b.u32_at(at::W28),
            data_sn: b.u32_at(at::W36),
            buffer_offset: b.u32_at(at::W40),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = new_bhs(Opcode::DATA_OUT, false, flag(self.final_, F));
        b.put_u64(at::LUN, self.lun);
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W20, self.ttt);
        b.put_u32(at::W28, self.exp_stat_sn);
        b.put_u32(at::W36, self.data_sn);
        b.put_u32(at::W40, self.buffer_offset);
        b
    }
}

/// SCSI Data-In (§11.7). With `status` set the PDU also completes the command
/// (phase collapse), and `stat_sn` and `residual_count` are meaningful.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DataIn {
    pub final_: bool,
    pub acknowledge: bool,
    pub overflow: bool,
    pub underflow: bool,
    pub status: Option<Status>,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual_count: u32,
}

impl DataIn {
    pub fn parse(b: &Bhs) -> Self {
        let has_status = b.bit(1, 0x01);
        DataIn {
            final_: b.final_bit(),
            acknowledge: b.bit(1, 0x40),
            overflow: b.bit(1, 0x04),
            underflow: b.bit(1, 0x02),
            status: has_status.then(|| Status(b.0[at::BYTE3])),
            lun: b.u64_at(at::LUN),
            itt: b.itt(),
            ttt: b.u32_at(at::W20),
            stat_sn: b.u32_at(at::W24),
            exp_cmd_sn: b.u32_at(at::W28),
            max_cmd_sn: b.u32_at(at::W32),
            data_sn: b.u32_at(at::W36),
            buffer_offset: b.u32_at(at::W40),
            residual_count: b.u32_at(at::W44),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let flags = flag(self.final_, F)
            | flag(self.acknowledge, 0x40)
            | flag(self.overflow, 0x04)
            | flag(self.underflow, 0x02)
            | if self.status.is_some() { 0x01 } else { 0 };
        let mut b = new_bhs(Opcode::DATA_IN, false, flags);
        b.0[at::BYTE3] = self.status.map_or(0, |s| s.0);
        b.put_u64(at::LUN, self.lun);
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W20, self.ttt);
        b.put_u32(at::W24, self.stat_sn);
        b.put_u32(at::W28, self.exp_cmd_sn);
        b.put_u32(at::W32, self.max_cmd_sn);
        b.put_u32(at::W36, self.data_sn);
        b.put_u32(at::W40, self.buffer_offset);
        b.put_u32(at::W44, self.residual_count);
        b
    }
}

/// Ready To Transfer (§11.8).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_data_transfer_length: u32,
}

impl R2t {
    pub fn parse(b: &Bhs) -> Self {
        R2t {
            lun: b.u64_at(at::LUN),
            itt: b.itt(),
            ttt: b.u32_at(at::W20),
            stat_sn: b.u32_at(at::W24),
            exp_cmd_sn: b.u32_at(at::W28),
            max_cmd_sn: b.u32_at(at::W32),
            r2t_sn: b.u32_at(at::W36),
            buffer_offset: b.u32_at(at::W40),
            desired_data_transfer_length: b.u32_at(at::W44),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = new_bhs(Opcode::R2T, false, F);
        b.put_u64(at::LUN, self.lun);
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W20, self.ttt);
        b.put_u32(at::W24, self.stat_sn);
        b.put_u32(at::W28, self.exp_cmd_sn);
        b.put_u32(at::W32, self.max_cmd_sn);
        b.put_u32(at::W36, self.r2t_sn);
        b.put_u32(at::W40, self.buffer_offset);
        b.put_u32(at::W44, self.desired_data_transfer_length);
        b
    }
}

/// Asynchronous Message (§11.9).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub async_event: AsyncEvent,
    pub async_vcode: u8,
    pub parameter1: u16,
    pub parameter2: u16,
    pub parameter3: u16,
}

impl AsyncMessage {
    pub fn parse(b: &Bhs) -> Self {
        AsyncMessage {
            lun: b.u64_at(at::LUN),
            stat_sn: b.u32_at(at::W24),
            exp_cmd_sn: b.u32_at(at::W28),
            max_cmd_sn: b.u32_at(at::W32),
            async_event: AsyncEvent(b.0[36]),
            async_vcode: b.0[37],
            parameter1: b.u16_at(38),
            parameter2: b.u16_at(40),
            parameter3: b.u16_at(42),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = new_bhs(Opcode::ASYNC_MESSAGE, false, F);
        b.put_u64(at::LUN, self.lun);
        b.put_u32(at::ITT, RESERVED_TAG);
        b.put_u32(at::W24, self.stat_sn);
        b.put_u32(at::W28, self.exp_cmd_sn);
        b.put_u32(at::W32, self.max_cmd_sn);
        b.0[36] = self.async_event.0;
        b.0[37] = self.async_vcode;
        b.put_u16(38, self.parameter1);
        b.put_u16(40, self.parameter2);
        b.put_u16(42, self.parameter3);
        b
    }
}

/// Text Request (§11.10).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub continue_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl TextRequest {
    pub fn parse(b: &Bhs) -> Self {
        TextRequest {
            immediate: b.immediate(),
            final_: b.final_bit(),
            continue_: b.bit(1, 0x40),
            lun: b.u64_at(at::LUN),
            itt: b.itt(),
            ttt: b.u32_at(at::W20),
            cmd_sn: b.u32_at(at::W24),
            exp_stat_sn: b.u32_at(at::W28),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let flags = flag(self.final_, F) | flag(self.continue_, 0x40);
        let mut b = new_bhs(Opcode::TEXT_REQUEST, self.immediate, flags);
        b.put_u64(at::LUN, self.lun);
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W20, self.ttt);
        b.put_u32(at::W24, self.cmd_sn);
        b.put_u32(at::W28, self.exp_stat_sn);
        b
    }
}

/// Text Response (§11.11).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TextResponse {
    pub final_: bool,
    pub continue_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

impl TextResponse {
    pub fn parse(b: &Bhs) -> Self {
        TextResponse {
            final_: b.final_bit(),
            continue_: b.bit(1, 0x40),
            lun: b.u64_at(at::LUN),
            itt: b.itt(),
            ttt: b.u32_at(at::W20),
            stat_sn: b.u32_at(at::W24),
            exp_cmd_sn: b.u32_at(at::W28),
            max_cmd_sn: b.u32_at(at::W32),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let flags = flag(self.final_, F) | flag(self.continue_, 0x40);
        let mut b = new_bhs(Opcode::TEXT_RESPONSE, false, flags);
        b.put_u64(at::LUN, self.lun);
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W20, self.ttt);
        b.put_u32(at::W24, self.stat_sn);
        b.put_u32(at::W28, self.exp_cmd_sn);
        b.put_u32(at::W32, self.max_cmd_sn);
        b
    }
}

/// Login Request (§11.12). CSG and NSG are raw 2-bit values: the reserved value 2 must reach
/// the login state machine so that it can answer with an initiator error.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LoginRequest {
    pub transit: bool,
    pub continue_: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: Isid,
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl LoginRequest {
    pub fn parse(b: &Bhs) -> Self {
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&b.0[at::ISID..at::ISID + 6]);
        LoginRequest {
            transit: b.final_bit(),
            continue_: b.bit(1, 0x40),
            csg: (b.flags() >> 2) & 3,
            nsg: b.flags() & 3,
            version_max: b.0[at::BYTE2],
            version_min: b.0[at::BYTE3],
            isid: Isid::from_bytes(&isid),
            tsih: b.u16_at(at::TSIH),
            itt: b.itt(),
            cid: b.u16_at(at::W20),
            cmd_sn: b.u32_at(at::W24),
            exp_stat_sn: b.u32_at(at::W28),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let flags = login_flags(self.transit, self.continue_, self.csg, self.nsg);
        // The I bit is always 1 in a Login Request (§11.12).
        let mut b = new_bhs(Opcode::LOGIN_REQUEST, true, flags);
        b.0[at::BYTE2] = self.version_max;
        b.0[at::BYTE3] = self.version_min;
        b.0[at::ISID..at::ISID + 6].copy_from_slice(&self.isid.to_bytes());
        b.put_u16(at::TSIH, self.tsih);
        b.put_u32(at::ITT, self.itt);
        b.put_u16(at::W20, self.cid);
        b.put_u32(at::W24, self.cmd_sn);
        b.put_u32(at::W28, self.exp_stat_sn);
        b
    }
}

fn login_flags(transit: bool, cont: bool, csg: u8, nsg: u8) -> u8 {
    flag(transit, F) | flag(cont, 0x40) | (csg & 3) << 2 | (nsg & 3)
}

/// Login Response (§11.13).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LoginResponse {
    pub transit: bool,
    pub continue_: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: Isid,
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status: LoginStatus,
}

impl LoginResponse {
    pub fn parse(b: &Bhs) -> Self {
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&b.0[at::ISID..at::ISID + 6]);
        LoginResponse {
            transit: b.final_bit(),
            continue_: b.bit(1, 0x40),
            csg: (b.flags() >> 2) & 3,
            nsg: b.flags() & 3,
            version_max: b.0[at::BYTE2],
            version_active: b.0[at::BYTE3],
            isid: Isid::from_bytes(&isid),
            tsih: b.u16_at(at::TSIH),
            itt: b.itt(),
            stat_sn: b.u32_at(at::W24),
            exp_cmd_sn: b.u32_at(at::W28),
            max_cmd_sn: b.u32_at(at::W32),
            status: LoginStatus::from_parts(b.0[36], b.0[37]),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let flags = login_flags(self.transit, self.continue_, self.csg, self.nsg);
        let mut b = new_bhs(Opcode::LOGIN_RESPONSE, false, flags);
        b.0[at::BYTE2] = self.version_max;
        b.0[at::BYTE3] = self.version_active;
        b.0[at::ISID..at::ISID + 6].copy_from_slice(&self.isid.to_bytes());
        b.put_u16(at::TSIH, self.tsih);
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W24, self.stat_sn);
        b.put_u32(at::W28, self.exp_cmd_sn);
        b.put_u32(at::W32, self.max_cmd_sn);
        b.0[36] = self.status.class();
        b.0[37] = self.status.detail();
        b
    }
}

/// Logout Request (§11.14).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: LogoutReason,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl LogoutRequest {
    pub fn parse(b: &Bhs) -> Self {
        LogoutRequest {
            immediate: b.immediate(),
            reason: LogoutReason(b.flags() & 0x7f),
            itt: b.itt(),
            cid: b.u16_at(at::W20),
            cmd_sn: b.u32_at(at::W24),
            exp_stat_sn: b.u32_at(at::W28),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = new_bhs(
            Opcode::LOGOUT_REQUEST,
            self.immediate,
            F | (self.reason.0 & 0x7f),
        );
        b.put_u32(at::ITT, self.itt);
        b.put_u16(at::W20, self.cid);
        b.put_u32(at::W24, self.cmd_sn);
        b.put_u32(at::W28, self.exp_stat_sn);
        b
    }
}

/// Logout Response (§11.15).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LogoutResponse {
    pub response: LogoutResponseCode,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

impl LogoutResponse {
    pub fn parse(b: &Bhs) -> Self {
        LogoutResponse {
            response: LogoutResponseCode(b.0[at::BYTE2]),
            itt: b.itt(),
            stat_sn: b.u32_at(at::W24),
            exp_cmd_sn: b.u32_at(at::W28),
            max_cmd_sn: b.u32_at(at::W32),
            time2wait: b.u16_at(at::W40),
            time2retain: b.u16_at(at::W40 + 2),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = new_bhs(Opcode::LOGOUT_RESPONSE, false, F);
        b.0[at::BYTE2] = self.response.0;
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W24, self.stat_sn);
        b.put_u32(at::W28, self.exp_cmd_sn);
        b.put_u32(at::W32, self.max_cmd_sn);
        b.put_u16(at::W40, self.time2wait);
        b.put_u16(at::W40 + 2, self.time2retain);
        b
    }
}

/// SNACK Request (§11.16).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SnackRequest {
    pub snack_type: SnackType,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

impl SnackRequest {
    pub fn parse(b: &Bhs) -> Self {
        SnackRequest {
            snack_type: SnackType(b.flags() & 0x0f),
            lun: b.u64_at(at::LUN),
            itt: b.itt(),
            ttt: b.u32_at(at::W20),
            exp_stat_sn: b.u32_at(at::W28),
            beg_run: b.u32_at(at::W40),
            run_length: b.u32_at(at::W44),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = new_bhs(Opcode::SNACK_REQUEST, false, F | (self.snack_type.0 & 0x0f));
        b.put_u64(at::LUN, self.lun);
        b.put_u32(at::ITT, self.itt);
        b.put_u32(at::W20, self.ttt);
        b.put_u32(at::W28, self.exp_stat_sn);
        b.put_u32(at::W40, self.beg_run);
        b.put_u32(at::W44, self.run_length);
        b
    }
}

/// Reject (§11.17). The data segment carries the header of the rejected PDU.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Reject {
    pub reason: RejectReason,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn_or_r2t_sn: u32,
}

impl Reject {
    pub fn parse(b: &Bhs) -> Self {
        Reject {
            reason: RejectReason(b.0[at::BYTE2]),
            stat_sn: b.u32_at(at::W24),
            exp_cmd_sn: b.u32_at(at::W28),
            max_cmd_sn: b.u32_at(at::W32),
            data_sn_or_r2t_sn: b.u32_at(at::W36),
        }
    }
    pub fn to_bhs(&self) -> Bhs {
        let mut b = new_bhs(Opcode::REJECT, false, F);
        b.0[at::BYTE2] = self.reason.0;
        b.put_u32(at::ITT, RESERVED_TAG);
        b.put_u32(at::W24, self.stat_sn);
        b.put_u32(at::W28, self.exp_cmd_sn);
        b.put_u32(at::W32, self.max_cmd_sn);
        b.put_u32(at::W36, self.data_sn_or_r2t_sn);
        b
    }
}

/// Any PDU header, typed by opcode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Header {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

impl Header {
    /// Types a header. Only an unknown opcode fails here; field values are judged by the
    /// protocol core, which knows the session state needed to answer them.
    pub fn parse(b: &Bhs) -> Result<Header, WireError> {
        Ok(match b.opcode() {
            Opcode::NOP_OUT => Header::NopOut(NopOut::parse(b)),
            Opcode::SCSI_COMMAND => Header::ScsiCommand(ScsiCommand::parse(b)),
            Opcode::TASK_MGMT_REQUEST => Header::TaskMgmtRequest(TaskMgmtRequest::parse(b)),
            Opcode::LOGIN_REQUEST => Header::LoginRequest(LoginRequest::parse(b)),
            Opcode::TEXT_REQUEST => Header::TextRequest(TextRequest::parse(b)),
            Opcode::DATA_OUT => Header::DataOut(DataOut::parse(b)),
            Opcode::LOGOUT_REQUEST => Header::LogoutRequest(LogoutRequest::parse(b)),
            Opcode::SNACK_REQUEST => Header::SnackRequest(SnackRequest::parse(b)),
            Opcode::NOP_IN => Header::NopIn(NopIn::parse(b)),
            Opcode::SCSI_RESPONSE => Header::ScsiResponse(ScsiResponse::parse(b)),
            Opcode::TASK_MGMT_RESPONSE => Header::TaskMgmtResponse(TaskMgmtResponse::parse(b)),
            Opcode::LOGIN_RESPONSE => Header::LoginResponse(LoginResponse::parse(b)),
            Opcode::TEXT_RESPONSE => Header::TextResponse(TextResponse::parse(b)),
            Opcode::DATA_IN => Header::DataIn(DataIn::parse(b)),
            Opcode::LOGOUT_RESPONSE => Header::LogoutResponse(LogoutResponse::parse(b)),
            Opcode::R2T => Header::R2t(R2t::parse(b)),
            Opcode::ASYNC_MESSAGE => Header::AsyncMessage(AsyncMessage::parse(b)),
            Opcode::REJECT => Header::Reject(Reject::parse(b)),
            other => return Err(WireError::UnknownOpcode(other)),
        })
    }

    pub fn to_bhs(&self) -> Bhs {
        match self {
            Header::NopOut(h) => h.to_bhs(),
            Header::ScsiCommand(h) => h.to_bhs(),
            Header::TaskMgmtRequest(h) => h.to_bhs(),
            Header::LoginRequest(h) => h.to_bhs(),
            Header::TextRequest(h) => h.to_bhs(),
            Header::DataOut(h) => h.to_bhs(),
            Header::LogoutRequest(h) => h.to_bhs(),
            Header::SnackRequest(h) => h.to_bhs(),
            Header::NopIn(h) => h.to_bhs(),
            Header::ScsiResponse(h) => h.to_bhs(),
            Header::TaskMgmtResponse(h) => h.to_bhs(),
            Header::LoginResponse(h) => h.to_bhs(),
            Header::TextResponse(h) => h.to_bhs(),
            Header::DataIn(h) => h.to_bhs(),
            Header::LogoutResponse(h) => h.to_bhs(),
            Header::R2t(h) => h.to_bhs(),
            Header::AsyncMessage(h) => h.to_bhs(),
            Header::Reject(h) => h.to_bhs(),
        }
    }
}

/// Additional header segment types (§11.2.1.5).
pub mod ahs {
    use crate::WireError;

    pub const EXTENDED_CDB: u8 = 1;
    pub const BIDI_READ_DATA_LENGTH: u8 = 2;

    /// One additional header segment.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Ahs<'a> {
        pub ahs_type: u8,
        /// Type-specific bytes, without the padding. For an extended CDB the first byte is
        /// reserved and the CDB continues after it.
        pub specific: &'a [u8],
    }

    /// Splits the AHS area of a PDU into segments; refuses lengths that overrun it.
    pub fn parse(mut area: &[u8]) -> Result<Vec<Ahs<'_>>, WireError> {
        let mut out = Vec::new();
        while !area.is_empty() {
            if area.len() < 4 {
                return Err(WireError::BadAhs);
            }
            let len = usize::from(u16::from_be_bytes([area[0], area[1]]));
            let ahs_type = area[2];
            // AHSLength counts the type-specific bytes after the type byte, starting with
            // the reserved/first specific byte at offset 3.
            let total = 3 + len;
            let padded = total + crate::pad_len(total);
            if len == 0 || padded > area.len() {
                return Err(WireError::BadAhs);
            }
            out.push(Ahs {
                ahs_type,
                specific: &area[3..total],
            });
            area = &area[padded..];
        }
        Ok(out)
    }

    /// Encodes one segment with its padding.
    pub fn encode(ahs_type: u8, specific: &[u8], out: &mut Vec<u8>) {
        let len = specific.len() as u16;
        out.extend_from_slice(&len.to_be_bytes());
        out.push(ahs_type);
        out.extend_from_slice(specific);
        out.resize(out.len() + crate::pad_len(3 + specific.len()), 0);
    }

    /// The full CDB of a SCSI Command: the 16 header bytes followed by an extended-CDB AHS.
    pub fn full_cdb(cdb16: &[u8; 16], area: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut cdb = cdb16.to_vec();
        for seg in parse(area)? {
            if seg.ahs_type == EXTENDED_CDB {
                // First specific byte is reserved (§11.2.1.5.1 layout: length, type, reserved).
                cdb.extend_from_slice(seg.specific.get(1..).unwrap_or_default());
            }
        }
        Ok(cdb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_request_layout() {
        let req = LoginRequest {
            transit: true,
            continue_: false,
            csg: 1,
            nsg: 3,
            version_max: 0,
            version_min: 0,
            isid: Isid(0x0002_3d00_0001),
            tsih: 0,
            itt: 0x1234,
            cid: 1,
            cmd_sn: 7,
            exp_stat_sn: 0,
        };
        let b = req.to_bhs();
        assert_eq!(b.0[0], 0x43);
        assert_eq!(b.0[1], 0x87);
        assert_eq!(&b.0[8..14], &[0x00, 0x02, 0x3d, 0x00, 0x00, 0x01]);
        assert_eq!(LoginRequest::parse(&b), req);
    }

    #[test]
    fn unknown_opcode_is_an_error_not_a_panic() {
        let mut b = Bhs::default();
        b.0[0] = 0x1c;
        assert_eq!(
            Header::parse(&b),
            Err(WireError::UnknownOpcode(Opcode(0x1c)))
        );
    }

    #[test]
    fn ahs_overrun_is_refused() {
        assert!(ahs::parse(&[0, 40, 1, 0]).is_err());
        let mut area = Vec::new();
        ahs::encode(ahs::EXTENDED_CDB, &[0, 1, 2, 3, 4], &mut area);
        assert_eq!(area.len() % 4, 0);
        let segs = ahs::parse(&area).unwrap();
        assert_eq!(segs[0].specific, &[0, 1, 2, 3, 4]);
    }
}
