//! A set of logical units seen as one SCSI target device.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cdb::{self, op};
use crate::codes::{AscAscq, SenseKey};
use crate::lu::{info, ItNexus, LogicalUnit, ScsiResponse};
use crate::sense::Sense;

/// LUN number → logical unit. Answers REPORT LUNS itself and commands to absent LUNs (INQUIRY
/// with peripheral qualifier 3 / device type 1Fh; anything else ILLEGAL REQUEST, LOGICAL UNIT
/// NOT SUPPORTED).
#[derive(Default, Clone)]
pub struct LunMap {
    luns: BTreeMap<u64, Arc<LogicalUnit>>,
}

impl LunMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a LUN.
    pub fn insert(&mut self, lun: u64, lu: Arc<LogicalUnit>) {
        self.luns.insert(lun, lu);
    }

    /// Removes a LUN, returning it.
    pub fn remove(&mut self, lun: u64) -> Option<Arc<LogicalUnit>> {
        self.luns.remove(&lun)
    }

    pub fn get(&self, lun: u64) -> Option<&Arc<LogicalUnit>> {
        self.luns.get(&lun)
    }

    /// LUN numbers in ascending order.
    pub fn luns(&self) -> impl Iterator<Item = u64> + '_ {
        self.luns.keys().copied()
    }

    /// Executes a command addressed to `lun` (a LUN number, see [`crate::lun::decode`]).
    pub fn execute(&self, nexus: &ItNexus, lun: u64, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        if cdb.first() == Some(&op::REPORT_LUNS) {
            if let Some(lu) = self.luns.get(&lun) {
                // Let the unit check the CDB (and register the nexus), then list all LUNs.
                let r = lu.execute(nexus, cdb, data_out);
                if r.status != crate::ScsiStatus::GOOD {
                    return r;
                }
            }
            return match info::report_luns(cdb, self.luns()) {
                Ok(data) => ScsiResponse::good(data),
                Err(crate::lu::Fail::Check(s)) => ScsiResponse::check(&s, false),
                Err(crate::lu::Fail::Conflict) => ScsiResponse::reservation_conflict(),
            };
        }
        if let Some(lu) = self.luns.get(&lun) {
            return lu.execute(nexus, cdb, data_out);
        }
        let not_supported = Sense::new(
            SenseKey::ILLEGAL_REQUEST,
            AscAscq::LOGICAL_UNIT_NOT_SUPPORTED,
        );
        match cdb.first() {
            Some(&op::INQUIRY) if cdb::byte(cdb, 1) & 0x03 == 0 && cdb::byte(cdb, 2) == 0 => {
                let alloc = usize::from(cdb::be16(cdb, 3));
                let mut d = info::inquiry_no_lun();
                d.truncate(alloc);
                ScsiResponse::good(d)
            }
            Some(&op::REQUEST_SENSE) => {
                let alloc = usize::from(cdb::byte(cdb, 4));
                let mut d = not_supported.encode(cdb::byte(cdb, 1) & 0x01 != 0);
                d.truncate(alloc);
                ScsiResponse::good(d)
            }
            _ => ScsiResponse::check(&not_supported, false),
        }
    }
}
