//! Wire codes as newtypes with named constants, so unknown values survive and print in hex.

use std::fmt;

macro_rules! code_newtype {
    ($(#[$meta:meta])* $name:ident($inner:ty) { $($(#[$cmeta:meta])* $cname:ident = $val:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub $inner);

        impl $name {
            $($(#[$cmeta])* pub const $cname: $name = $name($val);)*

            /// The standard's name for this value, if it is one we know.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $($name::$cname => Some(stringify!($cname)),)*
                    _ => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, concat!(stringify!($name), "({:#x})"), self.0),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

code_newtype! {
    /// SAM-5 status byte.
    ScsiStatus(u8) {
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

code_newtype! {
    /// SPC-4 sense key (4 bits).
    SenseKey(u8) {
        NO_SENSE = 0x0,
        RECOVERED_ERROR = 0x1,
        NOT_READY = 0x2,
        MEDIUM_ERROR = 0x3,
        HARDWARE_ERROR = 0x4,
        ILLEGAL_REQUEST = 0x5,
        UNIT_ATTENTION = 0x6,
        DATA_PROTECT = 0x7,
        BLANK_CHECK = 0x8,
        VENDOR_SPECIFIC = 0x9,
        COPY_ABORTED = 0xa,
        ABORTED_COMMAND = 0xb,
        VOLUME_OVERFLOW = 0xd,
        MISCOMPARE = 0xe,
    }
}

code_newtype! {
    /// Additional sense code and qualifier, ASC in the high byte.
    AscAscq(u16) {
        NO_ADDITIONAL_SENSE = 0x0000,
        LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE = 0x0400,
        LOGICAL_UNIT_NOT_READY_INITIALIZING_COMMAND_REQUIRED = 0x0402,
        LOGICAL_UNIT_COMMUNICATION_FAILURE = 0x0800,
        WRITE_ERROR = 0x0c00,
        INVALID_FIELD_IN_INFORMATION_UNIT = 0x0e03,
        UNRECOVERED_READ_ERROR = 0x1100,
        PARAMETER_LIST_LENGTH_ERROR = 0x1a00,
        DEFECT_LIST_NOT_FOUND = 0x1c00,
        MISCOMPARE_DURING_VERIFY_OPERATION = 0x1d00,
        INVALID_COMMAND_OPERATION_CODE = 0x2000,
        LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE = 0x2100,
        INVALID_FIELD_IN_CDB = 0x2400,
        LOGICAL_UNIT_NOT_SUPPORTED = 0x2500,
        INVALID_FIELD_IN_PARAMETER_LIST = 0x2600,
        INVALID_RELEASE_OF_PERSISTENT_RESERVATION = 0x2604,
        WRITE_PROTECTED = 0x2700,
        SOFTWARE_WRITE_PROTECTED = 0x2702,
        POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED = 0x2900,
        POWER_ON_OCCURRED = 0x2901,
        SCSI_BUS_RESET_OCCURRED = 0x2902,
        BUS_DEVICE_RESET_FUNCTION_OCCURRED = 0x2903,
        I_T_NEXUS_LOSS_OCCURRED = 0x2907,
        PARAMETERS_CHANGED = 0x2a00,
        MODE_PARAMETERS_CHANGED = 0x2a01,
        RESERVATIONS_PREEMPTED = 0x2a03,
        RESERVATIONS_RELEASED = 0x2a04,
        REGISTRATIONS_PREEMPTED = 0x2a05,
        CAPACITY_DATA_HAS_CHANGED = 0x2a09,
        SAVING_PARAMETERS_NOT_SUPPORTED = 0x3900,
        MEDIUM_NOT_PRESENT = 0x3a00,
        REPORTED_LUNS_DATA_HAS_CHANGED = 0x3f0e,
        INTERNAL_TARGET_FAILURE = 0x4400,
        MEDIUM_REMOVAL_PREVENTED = 0x5302,
        INSUFFICIENT_REGISTRATION_RESOURCES = 0x5504,
    }
}

impl AscAscq {
    /// The additional sense code (high byte).
    pub fn asc(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// The additional sense code qualifier (low byte).
    pub fn ascq(self) -> u8 {
        self.0 as u8
    }
}
