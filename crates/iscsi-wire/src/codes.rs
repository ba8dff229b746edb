//! Wire codes as newtypes with named constants (opcodes, status and reason codes).
//!
//! Unknown values are kept as they are so that a PDU can be answered (for example with a
//! Reject naming the header) and logged in hex.

macro_rules! wire_code {
    ($(#[$meta:meta])* $name:ident($repr:ty) { $($(#[$cmeta:meta])* $konst:ident = $val:expr,)* }) => {
        $(#[$meta])*
        #[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub $repr);

        impl $name {
            $($(#[$cmeta])* pub const $konst: $name = $name($val);)*

            /// The RFC's name of this code, if it is a known one.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $($name::$konst => Some(stringify!($konst)),)*
                    _ => None,
                }
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}(0x{:x})", stringify!($name), self.0),
                }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::Debug::fmt(self, f)
            }
        }
    };
}

wire_code! {
    /// The 6-bit opcode of a PDU (RFC 7143 §11.2.1.2).
    Opcode(u8) {
        NOP_OUT = 0x00,
        SCSI_COMMAND = 0x01,
        TASK_MGMT_REQUEST = 0x02,
        LOGIN_REQUEST = 0x03,
        TEXT_REQUEST = 0x04,
        DATA_OUT = 0x05,
        LOGOUT_REQUEST = 0x06,
        SNACK_REQUEST = 0x10,
        NOP_IN = 0x20,
        SCSI_RESPONSE = 0x21,
        TASK_MGMT_RESPONSE = 0x22,
        LOGIN_RESPONSE = 0x23,
        TEXT_RESPONSE = 0x24,
        DATA_IN = 0x25,
        LOGOUT_RESPONSE = 0x26,
        R2T = 0x31,
        ASYNC_MESSAGE = 0x32,
        REJECT = 0x3f,
    }
}

impl Opcode {
    /// True for opcodes an initiator sends.
    pub fn is_initiator_opcode(self) -> bool {
        self.0 & 0x20 == 0
    }
}

wire_code! {
    /// Login response status, class in the high byte and detail in the low byte (§11.13.5).
    LoginStatus(u16) {
        SUCCESS = 0x0000,
        TARGET_MOVED_TEMPORARILY = 0x0101,
        TARGET_MOVED_PERMANENTLY = 0x0102,
        INITIATOR_ERROR = 0x0200,
        AUTHENTICATION_FAILURE = 0x0201,
        AUTHORIZATION_FAILURE = 0x0202,
        NOT_FOUND = 0x0203,
        TARGET_REMOVED = 0x0204,
        UNSUPPORTED_VERSION = 0x0205,
        TOO_MANY_CONNECTIONS = 0x0206,
        MISSING_PARAMETER = 0x0207,
        CANT_INCLUDE_IN_SESSION = 0x0208,
        SESSION_TYPE_NOT_SUPPORTED = 0x0209,
        SESSION_DOES_NOT_EXIST = 0x020a,
        INVALID_DURING_LOGIN = 0x020b,
        TARGET_ERROR = 0x0300,
        SERVICE_UNAVAILABLE = 0x0301,
        OUT_OF_RESOURCES = 0x0302,
    }
}

impl LoginStatus {
    /// Status-Class: 0 success, 1 redirection, 2 initiator error, 3 target error.
    pub fn class(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub fn detail(self) -> u8 {
        self.0 as u8
    }
    pub fn from_parts(class: u8, detail: u8) -> Self {
        LoginStatus(u16::from(class) << 8 | u16::from(detail))
    }
}

wire_code! {
    /// Reason code of a Reject PDU (§11.17.1).
    RejectReason(u8) {
        DATA_DIGEST_ERROR = 0x02,
        SNACK_REJECT = 0x03,
        PROTOCOL_ERROR = 0x04,
        COMMAND_NOT_SUPPORTED = 0x05,
        IMMEDIATE_COMMAND_REJECT = 0x06,
        TASK_IN_PROGRESS = 0x07,
        INVALID_DATA_ACK = 0x08,
        INVALID_PDU_FIELD = 0x09,
        LONG_OPERATION_REJECT = 0x0a,
        DEPRECATED_NEGOTIATION_RESET = 0x0b,
        WAITING_FOR_LOGOUT = 0x0c,
    }
}

wire_code! {
    /// Task management function (§11.5.1).
    TmfFunction(u8) {
        ABORT_TASK = 1,
        ABORT_TASK_SET = 2,
        CLEAR_ACA = 3,
        CLEAR_TASK_SET = 4,
        LOGICAL_UNIT_RESET = 5,
        TARGET_WARM_RESET = 6,
        TARGET_COLD_RESET = 7,
        TASK_REASSIGN = 8,
    }
}

wire_code! {
    /// Task management response (§11.6.1).
    TmfResponse(u8) {
        FUNCTION_COMPLETE = 0,
        TASK_DOES_NOT_EXIST = 1,
        LUN_DOES_NOT_EXIST = 2,
        TASK_STILL_ALLEGIANT = 3,
        TASK_REASSIGNMENT_NOT_SUPPORTED = 4,
        FUNCTION_NOT_SUPPORTED = 5,
        AUTHORIZATION_FAILED = 6,
        FUNCTION_REJECTED = 255,
    }
}

wire_code! {
    /// Reason of a Logout Request (§11.14.1).
    LogoutReason(u8) {
        CLOSE_SESSION = 0,
        CLOSE_CONNECTION = 1,
        REMOVE_CONNECTION_FOR_RECOVERY = 2,
    }
}

wire_code! {
    /// Response of a Logout Response (§11.15.1).
    LogoutResponseCode(u8) {
        CLOSED_SUCCESSFULLY = 0,
        CID_NOT_FOUND = 1,
        RECOVERY_NOT_SUPPORTED = 2,
        CLEANUP_FAILED = 3,
    }
}

wire_code! {
    /// iSCSI service response of a SCSI Response PDU (§11.4.3).
    ServiceResponse(u8) {
        COMMAND_COMPLETED = 0,
        TARGET_FAILURE = 1,
    }
}

wire_code! {
    /// SCSI status carried in SCSI Response and Data-In PDUs (SAM-5).
    Status(u8) {
        GOOD = 0x00,
        CHECK_CONDITION = 0x02,
        CONDITION_MET = 0x04,
        BUSY = 0x08,
        RESERVATION_CONFLICT = 0x18,
        TASK_SET_FULL = 0x28,
        ACA_ACTIVE = 0x30,
        TASK_ABORTED = 0x40,
    }
}

wire_code! {
    /// AsyncEvent of an Asynchronous Message (§11.9.1).
    AsyncEvent(u8) {
        SCSI_ASYNC_EVENT = 0,
        LOGOUT_REQUESTED = 1,
        CONNECTION_DROP = 2,
        SESSION_DROP = 3,
        NEGOTIATION_REQUEST = 4,
        TASK_TERMINATION = 5,
        VENDOR_SPECIFIC = 255,
    }
}

wire_code! {
    /// SNACK type (§11.16.1).
    SnackType(u8) {
        DATA_R2T = 0,
        STATUS = 1,
        DATA_ACK = 2,
        RDATA = 3,
    }
}

/// Login stages (CSG/NSG, §11.12.3).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    SecurityNegotiation,
    LoginOperationalNegotiation,
    FullFeaturePhase,
}

impl Stage {
    pub fn from_bits(bits: u8) -> Option<Stage> {
        match bits & 3 {
            0 => Some(Stage::SecurityNegotiation),
            1 => Some(Stage::LoginOperationalNegotiation),
            3 => Some(Stage::FullFeaturePhase),
            _ => None,
        }
    }
    pub fn bits(self) -> u8 {
        match self {
            Stage::SecurityNegotiation => 0,
            Stage::LoginOperationalNegotiation => 1,
            Stage::FullFeaturePhase => 3,
        }
    }
}

/// The reserved tag value (`0xffffffff`) used where no task tag applies.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_codes_print_in_hex() {
        assert_eq!(format!("{:?}", Opcode(0x1e)), "Opcode(0x1e)");
        assert_eq!(format!("{:?}", Opcode::R2T), "R2T");
        assert_eq!(LoginStatus::AUTHENTICATION_FAILURE.class(), 2);
        assert_eq!(LoginStatus::from_parts(3, 2), LoginStatus::OUT_OF_RESOURCES);
    }
}
