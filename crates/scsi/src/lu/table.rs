//! The commands a logical unit supports: one row per operation code (and service action), used
//! for dispatch checks, reservation conflicts and REPORT SUPPORTED OPERATION CODES.

use crate::cdb::{op, sa};

/// How a command interacts with reservations and unit attentions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// INQUIRY, REPORT LUNS, REQUEST SENSE: never report unit attentions, never conflict.
    Exempt,
    /// Reports state without touching the medium (TEST UNIT READY, READ CAPACITY, RSOC, PRIN).
    Info,
    /// Reads the medium or its metadata.
    Read,
    /// Modifies the medium or shared state.
    Write,
    /// PERSISTENT RESERVE OUT: conflicts are decided by the persistent reservation rules.
    PrOut,
    /// RESERVE/RELEASE(6/10).
    Reserve,
    /// RELEASE(6/10).
    Release,
}

/// Which optional feature must be on for the command to exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Needs {
    Nothing,
    Thin,
}

pub(crate) struct CmdInfo {
    pub opcode: u8,
    /// Service action, for opcodes that have them.
    pub sa: Option<u8>,
    pub class: Class,
    /// Fails with NOT READY / MEDIUM NOT PRESENT when the medium is ejected.
    pub medium: bool,
    pub needs: Needs,
    /// CDB usage data for RSOC; its length is the CDB length.
    pub usage: &'static [u8],
}

macro_rules! cmd {
    ($name:ident, $op:expr, $sa:expr, $class:ident, $medium:expr, $needs:ident, [$($u:expr),*]) => {
        pub(crate) static $name: CmdInfo = CmdInfo {
            opcode: $op,
            sa: $sa,
            class: Class::$class,
            medium: $medium,
            needs: Needs::$needs,
            usage: &[$($u),*],
        };
    };
}

const C: u8 = 0x04; // control byte: NACA is evaluated (and refused)
const F: u8 = 0xff;

cmd!(
    TEST_UNIT_READY,
    op::TEST_UNIT_READY,
    None,
    Info,
    true,
    Nothing,
    [0x00, 0, 0, 0, 0, C]
);
cmd!(
    REQUEST_SENSE,
    op::REQUEST_SENSE,
    None,
    Exempt,
    false,
    Nothing,
    [0x03, 0x01, 0, 0, F, C]
);
cmd!(
    READ_6,
    op::READ_6,
    None,
    Read,
    true,
    Nothing,
    [0x08, 0x1f, F, F, F, C]
);
cmd!(
    WRITE_6,
    op::WRITE_6,
    None,
    Write,
    true,
    Nothing,
    [0x0a, 0x1f, F, F, F, C]
);
cmd!(
    INQUIRY,
    op::INQUIRY,
    None,
    Exempt,
    false,
    Nothing,
    [0x12, 0x01, F, F, F, C]
);
cmd!(
    MODE_SELECT_6,
    op::MODE_SELECT_6,
    None,
    Write,
    false,
    Nothing,
    [0x15, 0x11, 0, 0, F, C]
);
cmd!(
    RESERVE_6,
    op::RESERVE_6,
    None,
    Reserve,
    false,
    Nothing,
    [0x16, 0, 0, 0, 0, C]
);
cmd!(
    RELEASE_6,
    op::RELEASE_6,
    None,
    Release,
    false,
    Nothing,
    [0x17, 0, 0, 0, 0, C]
);
cmd!(
    MODE_SENSE_6,
    op::MODE_SENSE_6,
    None,
    Read,
    false,
    Nothing,
    [0x1a, 0x08, F, F, F, C]
);
cmd!(
    START_STOP_UNIT,
    op::START_STOP_UNIT,
    None,
    Write,
    false,
    Nothing,
    [0x1b, 0x01, 0, 0x0f, 0xf7, C]
);
cmd!(
    PREVENT_ALLOW,
    op::PREVENT_ALLOW_MEDIUM_REMOVAL,
    None,
    Read,
    false,
    Nothing,
    [0x1e, 0, 0, 0, 0x03, C]
);
cmd!(
    READ_CAPACITY_10,
    op::READ_CAPACITY_10,
    None,
    Info,
    true,
    Nothing,
    [0x25, 0, F, F, F, F, 0, 0, 0x01, C]
);
cmd!(
    READ_10,
    op::READ_10,
    None,
    Read,
    true,
    Nothing,
    [0x28, 0x18, F, F, F, F, 0, F, F, C]
);
cmd!(
    WRITE_10,
    op::WRITE_10,
    None,
    Write,
    true,
    Nothing,
    [0x2a, 0x18, F, F, F, F, 0, F, F, C]
);
cmd!(
    WRITE_AND_VERIFY_10,
    op::WRITE_AND_VERIFY_10,
    None,
    Write,
    true,
    Nothing,
    [0x2e, 0x12, F, F, F, F, 0, F, F, C]
);
cmd!(
    VERIFY_10,
    op::VERIFY_10,
    None,
    Read,
    true,
    Nothing,
    [0x2f, 0x16, F, F, F, F, 0, F, F, C]
);
cmd!(
    PRE_FETCH_10,
    op::PRE_FETCH_10,
    None,
    Read,
    true,
    Nothing,
    [0x34, 0x02, F, F, F, F, 0, F, F, C]
);
cmd!(
    SYNCHRONIZE_CACHE_10,
    op::SYNCHRONIZE_CACHE_10,
    None,
    Write,
    true,
    Nothing,
    [0x35, 0x02, F, F, F, F, 0, F, F, C]
);
cmd!(
    READ_DEFECT_DATA_10,
    op::READ_DEFECT_DATA_10,
    None,
    Read,
    false,
    Nothing,
    [0x37, 0, 0x1f, 0, 0, 0, 0, F, F, C]
);
cmd!(
    WRITE_SAME_10,
    op::WRITE_SAME_10,
    None,
    Write,
    true,
    Nothing,
    [0x41, 0x08, F, F, F, F, 0, F, F, C]
);
cmd!(
    UNMAP,
    op::UNMAP,
    None,
    Write,
    true,
    Thin,
    [0x42, 0, 0, 0, 0, 0, 0, F, F, C]
);
cmd!(
    MODE_SELECT_10,
    op::MODE_SELECT_10,
    None,
    Write,
    false,
    Nothing,
    [0x55, 0x11, 0, 0, 0, 0, 0, F, F, C]
);
cmd!(
    RESERVE_10,
    op::RESERVE_10,
    None,
    Reserve,
    false,
    Nothing,
    [0x56, 0, 0, 0, 0, 0, 0, 0, 0, C]
);
cmd!(
    RELEASE_10,
    op::RELEASE_10,
    None,
    Release,
    false,
    Nothing,
    [0x57, 0, 0, 0, 0, 0, 0, 0, 0, C]
);
cmd!(
    MODE_SENSE_10,
    op::MODE_SENSE_10,
    None,
    Read,
    false,
    Nothing,
    [0x5a, 0x18, F, F, 0, 0, 0, F, F, C]
);
cmd!(
    PRIN_READ_KEYS,
    op::PERSISTENT_RESERVE_IN,
    Some(0),
    Info,
    false,
    Nothing,
    [0x5e, 0x1f, 0, 0, 0, 0, 0, F, F, C]
);
cmd!(
    PRIN_READ_RESERVATION,
    op::PERSISTENT_RESERVE_IN,
    Some(1),
    Info,
    false,
    Nothing,
    [0x5e, 0x1f, 0, 0, 0, 0, 0, F, F, C]
);
cmd!(
    PRIN_REPORT_CAPABILITIES,
    op::PERSISTENT_RESERVE_IN,
    Some(2),
    Info,
    false,
    Nothing,
    [0x5e, 0x1f, 0, 0, 0, 0, 0, F, F, C]
);
cmd!(
    PRIN_READ_FULL_STATUS,
    op::PERSISTENT_RESERVE_IN,
    Some(3),
    Info,
    false,
    Nothing,
    [0x5e, 0x1f, 0, 0, 0, 0, 0, F, F, C]
);
cmd!(
    PROUT_REGISTER,
    op::PERSISTENT_RESERVE_OUT,
    Some(0),
    PrOut,
    false,
    Nothing,
    [0x5f, 0x1f, F, 0, 0, F, F, F, F, C]
);
cmd!(
    PROUT_RESERVE,
    op::PERSISTENT_RESERVE_OUT,
    Some(1),
    PrOut,
    false,
    Nothing,
    [0x5f, 0x1f, F, 0, 0, F, F, F, F, C]
);
cmd!(
    PROUT_RELEASE,
    op::PERSISTENT_RESERVE_OUT,
    Some(2),
    PrOut,
    false,
    Nothing,
    [0x5f, 0x1f, F, 0, 0, F, F, F, F, C]
);
cmd!(
    PROUT_CLEAR,
    op::PERSISTENT_RESERVE_OUT,
    Some(3),
    PrOut,
    false,
    Nothing,
    [0x5f, 0x1f, F, 0, 0, F, F, F, F, C]
);
cmd!(
    PROUT_PREEMPT,
    op::PERSISTENT_RESERVE_OUT,
    Some(4),
    PrOut,
    false,
    Nothing,
    [0x5f, 0x1f, F, 0, 0, F, F, F, F, C]
);
cmd!(
    PROUT_PREEMPT_AND_ABORT,
    op::PERSISTENT_RESERVE_OUT,
    Some(5),
    PrOut,
    false,
    Nothing,
    [0x5f, 0x1f, F, 0, 0, F, F, F, F, C]
);
cmd!(
    PROUT_REGISTER_AND_IGNORE,
    op::PERSISTENT_RESERVE_OUT,
    Some(6),
    PrOut,
    false,
    Nothing,
    [0x5f, 0x1f, F, 0, 0, F, F, F, F, C]
);
cmd!(
    PROUT_REGISTER_AND_MOVE,
    op::PERSISTENT_RESERVE_OUT,
    Some(7),
    PrOut,
    false,
    Nothing,
    [0x5f, 0x1f, F, 0, 0, F, F, F, F, C]
);
cmd!(
    READ_16,
    op::READ_16,
    None,
    Read,
    true,
    Nothing,
    [0x88, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    COMPARE_AND_WRITE,
    op::COMPARE_AND_WRITE,
    None,
    Write,
    true,
    Nothing,
    [0x89, 0x18, F, F, F, F, F, F, F, F, 0, 0, 0, F, 0, C]
);
cmd!(
    WRITE_16,
    op::WRITE_16,
    None,
    Write,
    true,
    Nothing,
    [0x8a, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    ORWRITE_16,
    op::ORWRITE_16,
    None,
    Write,
    true,
    Nothing,
    [0x8b, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    WRITE_AND_VERIFY_16,
    op::WRITE_AND_VERIFY_16,
    None,
    Write,
    true,
    Nothing,
    [0x8e, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    VERIFY_16,
    op::VERIFY_16,
    None,
    Read,
    true,
    Nothing,
    [0x8f, 0x16, F, F, F, F, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    PRE_FETCH_16,
    op::PRE_FETCH_16,
    None,
    Read,
    true,
    Nothing,
    [0x90, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    SYNCHRONIZE_CACHE_16,
    op::SYNCHRONIZE_CACHE_16,
    None,
    Write,
    true,
    Nothing,
    [0x91, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    WRITE_SAME_16,
    op::WRITE_SAME_16,
    None,
    Write,
    true,
    Nothing,
    [0x93, 0x09, F, F, F, F, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    WRITE_ATOMIC_16,
    op::WRITE_ATOMIC_16,
    None,
    Write,
    true,
    Nothing,
    [0x9c, 0x18, F, F, F, F, F, F, F, F, 0, 0, F, F, 0, C]
);
cmd!(
    READ_CAPACITY_16,
    op::SERVICE_ACTION_IN_16,
    Some(sa::READ_CAPACITY_16),
    Info,
    true,
    Nothing,
    [0x9e, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, C]
);
cmd!(
    GET_LBA_STATUS,
    op::SERVICE_ACTION_IN_16,
    Some(sa::GET_LBA_STATUS),
    Read,
    true,
    Nothing,
    [0x9e, 0x1f, F, F, F, F, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    REPORT_LUNS,
    op::REPORT_LUNS,
    None,
    Exempt,
    false,
    Nothing,
    [0xa0, 0, F, 0, 0, 0, F, F, F, F, 0, C]
);
cmd!(
    REPORT_SUPPORTED_OPCODES,
    op::MAINTENANCE_IN,
    Some(sa::REPORT_SUPPORTED_OPERATION_CODES),
    Info,
    false,
    Nothing,
    [0xa3, 0x1f, 0x87, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    REPORT_SUPPORTED_TMFS,
    op::MAINTENANCE_IN,
    Some(sa::REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS),
    Info,
    false,
    Nothing,
    [0xa3, 0x1f, 0x80, 0, 0, 0, F, F, F, F, 0, C]
);
cmd!(
    READ_12,
    op::READ_12,
    None,
    Read,
    true,
    Nothing,
    [0xa8, 0x18, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    WRITE_12,
    op::WRITE_12,
    None,
    Write,
    true,
    Nothing,
    [0xaa, 0x18, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    WRITE_AND_VERIFY_12,
    op::WRITE_AND_VERIFY_12,
    None,
    Write,
    true,
    Nothing,
    [0xae, 0x12, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    VERIFY_12,
    op::VERIFY_12,
    None,
    Read,
    true,
    Nothing,
    [0xaf, 0x16, F, F, F, F, F, F, F, F, 0, C]
);
cmd!(
    READ_DEFECT_DATA_12,
    op::READ_DEFECT_DATA_12,
    None,
    Read,
    false,
    Nothing,
    [0xb7, 0x1f, 0, 0, 0, 0, F, F, F, F, 0, C]
);

/// Every supported command, in opcode order (the order RSOC reports them).
pub(crate) static ALL: &[&CmdInfo] = &[
    &TEST_UNIT_READY,
    &REQUEST_SENSE,
    &READ_6,
    &WRITE_6,
    &INQUIRY,
    &MODE_SELECT_6,
    &RESERVE_6,
    &RELEASE_6,
    &MODE_SENSE_6,
    &START_STOP_UNIT,
    &PREVENT_ALLOW,
    &READ_CAPACITY_10,
    &READ_10,
    &WRITE_10,
    &WRITE_AND_VERIFY_10,
    &VERIFY_10,
    &PRE_FETCH_10,
    &SYNCHRONIZE_CACHE_10,
    &READ_DEFECT_DATA_10,
    &WRITE_SAME_10,
    &UNMAP,
    &MODE_SELECT_10,
    &RESERVE_10,
    &RELEASE_10,
    &MODE_SENSE_10,
    &PRIN_READ_KEYS,
    &PRIN_READ_RESERVATION,
    &PRIN_REPORT_CAPABILITIES,
    &PRIN_READ_FULL_STATUS,
    &PROUT_REGISTER,
    &PROUT_RESERVE,
    &PROUT_RELEASE,
    &PROUT_CLEAR,
    &PROUT_PREEMPT,
    &PROUT_PREEMPT_AND_ABORT,
    &PROUT_REGISTER_AND_IGNORE,
    &PROUT_REGISTER_AND_MOVE,
    &READ_16,
    &COMPARE_AND_WRITE,
    &WRITE_16,
    &ORWRITE_16,
    &WRITE_AND_VERIFY_16,
    &VERIFY_16,
    &PRE_FETCH_16,
    &SYNCHRONIZE_CACHE_16,
    &WRITE_SAME_16,
    &WRITE_ATOMIC_16,
    &READ_CAPACITY_16,
    &GET_LBA_STATUS,
    &REPORT_LUNS,
    &REPORT_SUPPORTED_OPCODES,
    &REPORT_SUPPORTED_TMFS,
    &READ_12,
    &WRITE_12,
    &WRITE_AND_VERIFY_12,
    &VERIFY_12,
    &READ_DEFECT_DATA_12,
];

/// The row for an opcode and (if the opcode has them) service action.
pub(crate) fn lookup(opcode: u8, service_action: u8) -> Option<&'static CmdInfo> {
    Some(match opcode {
        op::TEST_UNIT_READY => &TEST_UNIT_READY,
        op::REQUEST_SENSE => &REQUEST_SENSE,
        op::READ_6 => &READ_6,
        op::WRITE_6 => &WRITE_6,
        op::INQUIRY => &INQUIRY,
        op::MODE_SELECT_6 => &MODE_SELECT_6,
        op::RESERVE_6 => &RESERVE_6,
        op::RELEASE_6 => &RELEASE_6,
        op::MODE_SENSE_6 => &MODE_SENSE_6,
        op::START_STOP_UNIT => &START_STOP_UNIT,
        op::PREVENT_ALLOW_MEDIUM_REMOVAL => &PREVENT_ALLOW,
        op::READ_CAPACITY_10 => &READ_CAPACITY_10,
        op::READ_10 => &READ_10,
        op::WRITE_10 => &WRITE_10,
        op::WRITE_AND_VERIFY_10 => &WRITE_AND_VERIFY_10,
        op::VERIFY_10 => &VERIFY_10,
        op::PRE_FETCH_10 => &PRE_FETCH_10,
        op::SYNCHRONIZE_CACHE_10 => &SYNCHRONIZE_CACHE_10,
        op::READ_DEFECT_DATA_10 => &READ_DEFECT_DATA_10,
        op::WRITE_SAME_10 => &WRITE_SAME_10,
        op::UNMAP => &UNMAP,
        op::MODE_SELECT_10 => &MODE_SELECT_10,
        op::RESERVE_10 => &RESERVE_10,
        op::RELEASE_10 => &RELEASE_10,
        op::MODE_SENSE_10 => &MODE_SENSE_10,
        op::PERSISTENT_RESERVE_IN => match service_action {
            0 => &PRIN_READ_KEYS,
            1 => &PRIN_READ_RESERVATION,
            2 => &PRIN_REPORT_CAPABILITIES,
            3 => &PRIN_READ_FULL_STATUS,
            _ => return None,
        },
        op::PERSISTENT_RESERVE_OUT => match service_action {
            0 => &PROUT_REGISTER,
            1 => &PROUT_RESERVE,
            2 => &PROUT_RELEASE,
            3 => &PROUT_CLEAR,
            4 => &PROUT_PREEMPT,
            5 => &PROUT_PREEMPT_AND_ABORT,
            6 => &PROUT_REGISTER_AND_IGNORE,
            7 => &PROUT_REGISTER_AND_MOVE,
            _ => return None,
        },
        op::READ_16 => &READ_16,
        op::COMPARE_AND_WRITE => &COMPARE_AND_WRITE,
        op::WRITE_16 => &WRITE_16,
        op::ORWRITE_16 => &ORWRITE_16,
        op::WRITE_AND_VERIFY_16 => &WRITE_AND_VERIFY_16,
        op::VERIFY_16 => &VERIFY_16,
        op::PRE_FETCH_16 => &PRE_FETCH_16,
        op::SYNCHRONIZE_CACHE_16 => &SYNCHRONIZE_CACHE_16,
        op::WRITE_SAME_16 => &WRITE_SAME_16,
        op::WRITE_ATOMIC_16 => &WRITE_ATOMIC_16,
        op::SERVICE_ACTION_IN_16 => match service_action {
            sa::READ_CAPACITY_16 => &READ_CAPACITY_16,
            sa::GET_LBA_STATUS => &GET_LBA_STATUS,
            _ => return None,
        },
        op::REPORT_LUNS => &REPORT_LUNS,
        op::MAINTENANCE_IN => match service_action {
            sa::REPORT_SUPPORTED_OPERATION_CODES => &REPORT_SUPPORTED_OPCODES,
            sa::REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS => &REPORT_SUPPORTED_TMFS,
            _ => return None,
        },
        op::READ_12 => &READ_12,
        op::WRITE_12 => &WRITE_12,
        op::WRITE_AND_VERIFY_12 => &WRITE_AND_VERIFY_12,
        op::VERIFY_12 => &VERIFY_12,
        op::READ_DEFECT_DATA_12 => &READ_DEFECT_DATA_12,
        _ => return None,
    })
}

/// True if the opcode carries a service action in byte 1.
pub(crate) fn has_service_actions(opcode: u8) -> bool {
    matches!(
        opcode,
        op::PERSISTENT_RESERVE_IN
            | op::PERSISTENT_RESERVE_OUT
            | op::SERVICE_ACTION_IN_16
            | op::MAINTENANCE_IN
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        for c in ALL {
            assert_eq!(c.usage[0], c.opcode);
            assert_eq!(
                Some(c.usage.len()),
                crate::cdb::cdb_len(c.opcode),
                "{:#x}",
                c.opcode
            );
            let found = lookup(c.opcode, c.sa.unwrap_or(0)).expect("listed command must be found");
            assert!(std::ptr::eq(found, *c));
            assert_eq!(c.sa.is_some(), has_service_actions(c.opcode));
        }
        // Opcode order.
        for w in ALL.windows(2) {
            assert!((w[0].opcode, w[0].sa) < (w[1].opcode, w[1].sa));
        }
    }
}
