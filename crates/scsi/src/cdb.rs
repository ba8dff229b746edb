//! CDB helpers: operation codes, names for logs, lengths and data direction.
//!
//! Nothing here panics on short input: accessors read missing bytes as zero, and callers check
//! [`cdb_len`] before trusting a field.

/// Operation codes (SPC-4, SBC-3) we know by name.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const FORMAT_UNIT: u8 = 0x04;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const SEND_DIAGNOSTIC: u8 = 0x1d;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_BUFFER: u8 = 0x3b;
    pub const READ_BUFFER: u8 = 0x3c;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const LOG_SELECT: u8 = 0x4c;
    pub const LOG_SENSE: u8 = 0x4d;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const VARIABLE_LENGTH: u8 = 0x7f;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const ATA_PASS_THROUGH_16: u8 = 0x85;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9c;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const ATA_PASS_THROUGH_12: u8 = 0xa1;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const MAINTENANCE_OUT: u8 = 0xa4;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_AND_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;
}

/// Service actions of SERVICE ACTION IN(16) and MAINTENANCE IN.
pub mod sa {
    pub const READ_CAPACITY_16: u8 = 0x10;
    pub const GET_LBA_STATUS: u8 = 0x12;
    pub const REPORT_TARGET_PORT_GROUPS: u8 = 0x0a;
    pub const REPORT_SUPPORTED_OPERATION_CODES: u8 = 0x0c;
    pub const REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS: u8 = 0x0d;
}

/// Direction of the data phase a CDB asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDirection {
    None,
    /// Device to initiator (Data-In).
    In,
    /// Initiator to device (Data-Out).
    Out,
}

/// CDB length implied by the operation code's group (SPC-4 4.2.5.1); `None` for the
/// variable-length and vendor-specific groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Reads byte `i`, zero if absent.
#[inline]
pub fn byte(cdb: &[u8], i: usize) -> u8 {
    cdb.get(i).copied().unwrap_or(0)
}

/// Big-endian u16 at `i` (missing bytes read as zero).
#[inline]
pub fn be16(cdb: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([byte(cdb, i), byte(cdb, i + 1)])
}

/// Big-endian 24-bit value at `i`.
#[inline]
pub fn be24(cdb: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([0, byte(cdb, i), byte(cdb, i + 1), byte(cdb, i + 2)])
}

/// Big-endian u32 at `i`.
#[inline]
pub fn be32(cdb: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([
        byte(cdb, i),
        byte(cdb, i + 1),
        byte(cdb, i + 2),
        byte(cdb, i + 3),
    ])
}

/// Big-endian u64 at `i`.
#[inline]
pub fn be64(cdb: &[u8], i: usize) -> u64 {
    (u64::from(be32(cdb, i)) << 32) | u64::from(be32(cdb, i + 4))
}

/// The service action of opcodes that carry one in byte 1, else `None`.
pub fn service_action(cdb: &[u8]) -> Option<u8> {
    match byte(cdb, 0) {
        op::SERVICE_ACTION_IN_16
        | op::MAINTENANCE_IN
        | op::MAINTENANCE_OUT
        | op::PERSISTENT_RESERVE_IN
        | op::PERSISTENT_RESERVE_OUT => Some(byte(cdb, 1) & 0x1f),
        _ => None,
    }
}

/// The standard's name of the command, or `None` for opcodes we do not know.
pub fn name(cdb: &[u8]) -> Option<&'static str> {
    let sa = service_action(cdb).unwrap_or(0);
    Some(match byte(cdb, 0) {
        op::TEST_UNIT_READY => "TEST UNIT READY",
        op::REQUEST_SENSE => "REQUEST SENSE",
        op::FORMAT_UNIT => "FORMAT UNIT",
        op::READ_6 => "READ(6)",
        op::WRITE_6 => "WRITE(6)",
        op::INQUIRY => "INQUIRY",
        op::MODE_SELECT_6 => "MODE SELECT(6)",
        op::RESERVE_6 => "RESERVE(6)",
        op::RELEASE_6 => "RELEASE(6)",
        op::MODE_SENSE_6 => "MODE SENSE(6)",
        op::START_STOP_UNIT => "START STOP UNIT",
        op::SEND_DIAGNOSTIC => "SEND DIAGNOSTIC",
        op::PREVENT_ALLOW_MEDIUM_REMOVAL => "PREVENT ALLOW MEDIUM REMOVAL",
        op::READ_CAPACITY_10 => "READ CAPACITY(10)",
        op::READ_10 => "READ(10)",
        op::WRITE_10 => "WRITE(10)",
        op::WRITE_AND_VERIFY_10 => "WRITE AND VERIFY(10)",
        op::VERIFY_10 => "VERIFY(10)",
        op::PRE_FETCH_10 => "PRE-FETCH(10)",
        op::SYNCHRONIZE_CACHE_10 => "SYNCHRONIZE CACHE(10)",
        op::READ_DEFECT_DATA_10 => "READ DEFECT DATA(10)",
        op::WRITE_BUFFER => "WRITE BUFFER",
        op::READ_BUFFER => "READ BUFFER",
        op::WRITE_SAME_10 => "WRITE SAME(10)",
        op::UNMAP => "UNMAP",
        op::LOG_SELECT => "LOG SELECT",
        op::LOG_SENSE => "LOG SENSE",
        op::MODE_SELECT_10 => "MODE SELECT(10)",
        op::RESERVE_10 => "RESERVE(10)",
        op::RELEASE_10 => "RELEASE(10)",
        op::MODE_SENSE_10 => "MODE SENSE(10)",
        op::PERSISTENT_RESERVE_IN => match sa {
            0 => "PERSISTENT RESERVE IN/READ KEYS",
            1 => "PERSISTENT RESERVE IN/READ RESERVATION",
            2 => "PERSISTENT RESERVE IN/REPORT CAPABILITIES",
            3 => "PERSISTENT RESERVE IN/READ FULL STATUS",
            _ => "PERSISTENT RESERVE IN",
        },
        op::PERSISTENT_RESERVE_OUT => match sa {
            0 => "PERSISTENT RESERVE OUT/REGISTER",
            1 => "PERSISTENT RESERVE OUT/RESERVE",
            2 => "PERSISTENT RESERVE OUT/RELEASE",
            3 => "PERSISTENT RESERVE OUT/CLEAR",
            4 => "PERSISTENT RESERVE OUT/PREEMPT",
            5 => "PERSISTENT RESERVE OUT/PREEMPT AND ABORT",
            6 => "PERSISTENT RESERVE OUT/REGISTER AND IGNORE EXISTING KEY",
            7 => "PERSISTENT RESERVE OUT/REGISTER AND MOVE",
            _ => "PERSISTENT RESERVE OUT",
        },
        op::EXTENDED_COPY => "EXTENDED COPY",
        op::RECEIVE_COPY_RESULTS => "RECEIVE COPY RESULTS",
        op::READ_16 => "READ(16)",
        op::COMPARE_AND_WRITE => "COMPARE AND WRITE",
        op::WRITE_16 => "WRITE(16)",
        op::ORWRITE_16 => "ORWRITE(16)",
        op::WRITE_AND_VERIFY_16 => "WRITE AND VERIFY(16)",
        op::VERIFY_16 => "VERIFY(16)",
        op::PRE_FETCH_16 => "PRE-FETCH(16)",
        op::SYNCHRONIZE_CACHE_16 => "SYNCHRONIZE CACHE(16)",
        op::WRITE_SAME_16 => "WRITE SAME(16)",
        op::WRITE_ATOMIC_16 => "WRITE ATOMIC(16)",
        op::SERVICE_ACTION_IN_16 => match sa {
            sa::READ_CAPACITY_16 => "READ CAPACITY(16)",
            sa::GET_LBA_STATUS => "GET LBA STATUS",
            _ => "SERVICE ACTION IN(16)",
        },
        op::REPORT_LUNS => "REPORT LUNS",
        op::MAINTENANCE_IN => match sa {
            sa::REPORT_TARGET_PORT_GROUPS => "REPORT TARGET PORT GROUPS",
            sa::REPORT_SUPPORTED_OPERATION_CODES => "REPORT SUPPORTED OPERATION CODES",
            sa::REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS => {
                "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS"
            }
            _ => "MAINTENANCE IN",
        },
        op::MAINTENANCE_OUT => "MAINTENANCE OUT",
        op::READ_12 => "READ(12)",
        op::WRITE_12 => "WRITE(12)",
        op::WRITE_AND_VERIFY_12 => "WRITE AND VERIFY(12)",
        op::VERIFY_12 => "VERIFY(12)",
        op::READ_DEFECT_DATA_12 => "READ DEFECT DATA(12)",
        _ => return None,
    })
}

/// LBA and transfer length of block commands, for logs and for the transport.
pub fn lba_and_length(cdb: &[u8]) -> Option<(u64, u32)> {
    Some(match byte(cdb, 0) {
        op::READ_6 | op::WRITE_6 => {
            let len = u32::from(byte(cdb, 4));
            (
                u64::from(be24(cdb, 1) & 0x1f_ffff),
                if len == 0 { 256 } else { len },
            )
        }
        op::READ_10
        | op::WRITE_10
        | op::WRITE_AND_VERIFY_10
        | op::VERIFY_10
        | op::PRE_FETCH_10
        | op::SYNCHRONIZE_CACHE_10
        | op::WRITE_SAME_10 => (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7))),
        op::READ_12 | op::WRITE_12 | op::WRITE_AND_VERIFY_12 | op::VERIFY_12 => {
            (u64::from(be32(cdb, 2)), be32(cdb, 6))
        }
        op::READ_16
        | op::WRITE_16
        | op::ORWRITE_16
        | op::WRITE_AND_VERIFY_16
        | op::VERIFY_16
        | op::PRE_FETCH_16
        | op::SYNCHRONIZE_CACHE_16
        | op::WRITE_SAME_16 => (be64(cdb, 2), be32(cdb, 10)),
        op::WRITE_ATOMIC_16 => (be64(cdb, 2), u32::from(be16(cdb, 12))),
        op::COMPARE_AND_WRITE => (be64(cdb, 2), u32::from(byte(cdb, 13))),
        _ => return None,
    })
}

/// Data direction the CDB implies (without knowing the block size).
pub fn data_direction(cdb: &[u8]) -> DataDirection {
    match byte(cdb, 0) {
        op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::ORWRITE_16
        | op::WRITE_ATOMIC_16
        | op::WRITE_AND_VERIFY_10
        | op::WRITE_AND_VERIFY_12
        | op::WRITE_AND_VERIFY_16
        | op::WRITE_SAME_10
        | op::WRITE_SAME_16
        | op::COMPARE_AND_WRITE
        | op::UNMAP
        | op::MODE_SELECT_6
        | op::MODE_SELECT_10
        | op::PERSISTENT_RESERVE_OUT
        | op::WRITE_BUFFER
        | op::LOG_SELECT
        | op::EXTENDED_COPY
        | op::SEND_DIAGNOSTIC => DataDirection::Out,
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
            if byte(cdb, 1) & 0x06 != 0 {
                DataDirection::Out
            } else {
                DataDirection::None
            }
        }
        op::TEST_UNIT_READY
        | op::START_STOP_UNIT
        | op::PREVENT_ALLOW_MEDIUM_REMOVAL
        | op::SYNCHRONIZE_CACHE_10
        | op::SYNCHRONIZE_CACHE_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16
        | op::RESERVE_6
        | op::RELEASE_6
        | op::RESERVE_10
        | op::RELEASE_10
        | op::FORMAT_UNIT => DataDirection::None,
        _ => DataDirection::In,
    }
}

/// One line for logs, e.g. `READ(10) lba=2048 len=8`.
pub fn describe(cdb: &[u8]) -> String {
    let Some(&opcode) = cdb.first() else {
        return "empty CDB".to_string();
    };
    let name = match name(cdb) {
        Some(n) => n.to_string(),
        None => format!("opcode {opcode:#04x}"),
    };
    match lba_and_length(cdb) {
        Some((lba, len)) => format!("{name} lba={lba} len={len}"),
        None => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_is_total() {
        assert_eq!(describe(&[]), "empty CDB");
        assert_eq!(
            describe(&[0x28, 0, 0, 0, 0, 8, 0, 0, 4, 0]),
            "READ(10) lba=8 len=4"
        );
        assert_eq!(describe(&[0x08]), "READ(6) lba=0 len=256");
        assert_eq!(describe(&[0xff]), "opcode 0xff");
        assert_eq!(
            describe(&[0x9e, 0x10]),
            "READ CAPACITY(16) lba=0 len=0".replace(" lba=0 len=0", "")
        );
    }

    #[test]
    fn lengths() {
        assert_eq!(cdb_len(op::READ_6), Some(6));
        assert_eq!(cdb_len(op::READ_10), Some(10));
        assert_eq!(cdb_len(op::READ_12), Some(12));
        assert_eq!(cdb_len(op::READ_16), Some(16));
        assert_eq!(cdb_len(op::VARIABLE_LENGTH), None);
    }
}
