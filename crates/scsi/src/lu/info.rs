//! Commands that describe the unit: INQUIRY and its VPD pages, READ CAPACITY, REPORT LUNS,
//! REQUEST SENSE, REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS, READ DEFECT
//! DATA; and the removable-medium commands START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL.

use std::sync::atomic::Ordering;

use super::io::{MAX_COMPARE_AND_WRITE_BLOCKS, MAX_UNMAP_DESCRIPTORS, MAX_UNMAP_LBA_COUNT};
use super::table::{self, CmdInfo};
use super::{truncate, CmdResult, ItNexus, LogicalUnit};
use crate::cdb::{self, op};
use crate::codes::{AscAscq, SenseKey};
use crate::sense::Sense;

/// Version descriptors: SAM-5, SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 3] = [0x00a0, 0x0460, 0x04c0];

/// VPD pages we support, in ascending order.
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// Copies `s` into a space-padded ASCII field of `len` bytes; non-printable characters become
/// spaces.
pub(crate) fn ascii_field(out: &mut Vec<u8>, s: &str, len: usize) {
    let mut b: Vec<u8> = s
        .bytes()
        .take(len)
        .map(|c| if (0x20..=0x7e).contains(&c) { c } else { b' ' })
        .collect();
    b.resize(len, b' ');
    out.extend_from_slice(&b);
}

/// Standard INQUIRY data for a LUN that is not there (peripheral qualifier 3, type 1Fh).
pub(crate) fn inquiry_no_lun() -> Vec<u8> {
    let mut d = vec![0u8; 36];
    d[0] = 0x7f;
    d[2] = 0x06;
    d[3] = 0x02;
    d[4] = 31;
    d
}

impl LogicalUnit {
    pub(super) fn inquiry(&self, nexus: &ItNexus, cdb: &[u8]) -> CmdResult {
        let evpd = cdb::byte(cdb, 1) & 0x01 != 0;
        if cdb::byte(cdb, 1) & 0x02 != 0 {
            // CMDDT is obsolete.
            return Err(Sense::invalid_field_in_cdb(1, Some(1)).into());
        }
        let page = cdb::byte(cdb, 2);
        let alloc = usize::from(cdb::be16(cdb, 3));
        if !evpd {
            if page != 0 {
                return Err(Sense::invalid_field_in_cdb(2, None).into());
            }
            return Ok(truncate(self.standard_inquiry(), alloc));
        }
        let body = match page {
            0x00 => VPD_PAGES.to_vec(),
            0x80 => {
                let mut v = Vec::new();
                ascii_field(
                    &mut v,
                    &self.config.serial,
                    self.config.serial.len().min(252),
                );
                v
            }
            0x83 => self.device_identification(nexus),
            0xb0 => self.block_limits(),
            0xb1 => {
                let mut v = vec![0u8; 0x3c];
                v[1] = 0x01; // MEDIUM ROTATION RATE: non-rotating medium
                v
            }
            0xb2 => self.logical_block_provisioning(),
            _ => return Err(Sense::invalid_field_in_cdb(2, None).into()),
        };
        let mut d = vec![0x00, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        Ok(truncate(d, alloc))
    }

    fn standard_inquiry(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(96);
        d.push(0x00); // connected, direct-access block device
        d.push(if self.config.removable { 0x80 } else { 0 });
        d.push(0x06); // SPC-4
        d.push(0x12); // HISUP, response data format 2
        d.push(0); // additional length, below
        d.push(0); // no SCCS/ACC/TPGS/3PC/PROTECT
        d.push(0);
        d.push(0x02); // CMDQUE
        ascii_field(&mut d, &self.config.vendor, 8);
        ascii_field(&mut d, &self.config.product, 16);
        ascii_field(&mut d, &self.config.revision, 4);
        d.resize(58, 0);
        for v in VERSION_DESCRIPTORS {
            d.extend_from_slice(&v.to_be_bytes());
        }
        d.resize(96, 0);
        d[4] = (d.len() - 5) as u8;
        d
    }

    fn naa_designator(&self) -> [u8; 16] {
        // NAA 6 (IEEE Registered Extended): NAA | company id (24) | vendor specific (36) |
        // extension (64). The vendor-specific part is the high 36 bits of naa_id and the
        // extension the whole id, so distinct ids give distinct names.
        let oui = u128::from(self.config.ieee_company_id & 0xff_ffff);
        let id = u128::from(self.config.naa_id);
        let v = (6u128 << 124) | (oui << 100) | ((id >> 28) << 64) | id;
        v.to_be_bytes()
    }

    fn device_identification(&self, nexus: &ItNexus) -> Vec<u8> {
        let mut v = Vec::new();
        // NAA, associated with the logical unit.
        v.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
        v.extend_from_slice(&self.naa_designator());
        // T10 vendor identification: vendor + serial.
        let mut t10 = Vec::new();
        ascii_field(&mut t10, &self.config.vendor, 8);
        t10.extend(
            self.config
                .serial
                .bytes()
                .filter(|c| (0x21..=0x7e).contains(c))
                .take(200),
        );
        v.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
        v.extend_from_slice(&t10);
        let proto = (self.config.protocol_id & 0x0f) << 4;
        // Relative target port, associated with the target port.
        v.extend_from_slice(&[proto | 0x01, 0x80 | 0x10 | 0x04, 0x00, 4, 0, 0]);
        v.extend_from_slice(&nexus.relative_target_port.to_be_bytes());
        // SCSI name string of the target port.
        if !nexus.target_port.is_empty() {
            let mut name: Vec<u8> = nexus.target_port.bytes().take(251).collect();
            name.push(0);
            while name.len() % 4 != 0 {
                name.push(0);
            }
            v.extend_from_slice(&[proto | 0x03, 0x80 | 0x10 | 0x08, 0x00, name.len() as u8]);
            v.extend_from_slice(&name);
        }
        v
    }

    fn block_limits(&self) -> Vec<u8> {
        let max = self.max_transfer_blocks() as u32;
        let mut v = vec![0u8; 0x3c];
        // WSNZ (byte 0 of the body) is zero: WRITE SAME with zero blocks means "to the end".
        v[1] = MAX_COMPARE_AND_WRITE_BLOCKS as u8;
        v[2..4].copy_from_slice(&1u16.to_be_bytes()); // OPTIMAL TRANSFER LENGTH GRANULARITY
        v[4..8].copy_from_slice(&max.to_be_bytes()); // MAXIMUM TRANSFER LENGTH
        v[12..16].copy_from_slice(&max.to_be_bytes()); // MAXIMUM PREFETCH LENGTH
        if self.thin {
            v[16..20].copy_from_slice(&(MAX_UNMAP_LBA_COUNT as u32).to_be_bytes());
            v[20..24].copy_from_slice(&(MAX_UNMAP_DESCRIPTORS as u32).to_be_bytes());
            let gran = self.backend.as_discard().map_or(0, |d| d.granularity()) >> self.block_shift;
            v[24..28].copy_from_slice(&(gran.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        }
        v[32..40].copy_from_slice(&u64::from(max).to_be_bytes()); // MAXIMUM WRITE SAME LENGTH
        v[40..44].copy_from_slice(&max.to_be_bytes()); // MAXIMUM ATOMIC TRANSFER LENGTH
                                                       // ATOMIC ALIGNMENT, ATOMIC TRANSFER LENGTH GRANULARITY: 0 (any); no atomic boundaries.
        v
    }

    fn logical_block_provisioning(&self) -> Vec<u8> {
        let mut v = vec![0u8; 4];
        if self.thin {
            v[1] = 0x80 | 0x40 | 0x20 | 0x04; // LBPU, LBPWS, LBPWS10, LBPRZ
            v[2] = 0x02; // thin provisioned
        }
        v
    }

    pub(super) fn read_capacity_10(&self, cdb: &[u8]) -> CmdResult {
        if cdb::byte(cdb, 8) & 0x01 == 0 && cdb::be32(cdb, 2) != 0 {
            return Err(Sense::invalid_field_in_cdb(2, None).into());
        }
        let last = self.num_blocks().saturating_sub(1);
        let mut d = Vec::with_capacity(8);
        d.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
        d.extend_from_slice(&self.config.block_size.to_be_bytes());
        Ok(d)
    }

    pub(super) fn read_capacity_16(&self, cdb: &[u8]) -> CmdResult {
        let alloc = cdb::be32(cdb, 10) as usize;
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.num_blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.config.block_size.to_be_bytes());
        if self.thin {
            d[14] = 0x80 | 0x40; // LBPME, LBPRZ
        }
        Ok(truncate(d, alloc))
    }

    pub(super) fn request_sense(&self, nexus: &ItNexus, cdb: &[u8]) -> CmdResult {
        let desc = cdb::byte(cdb, 1) & 0x01 != 0;
        let alloc = usize::from(cdb::byte(cdb, 4));
        // A pending unit attention is reported (and cleared) as parameter data.
        let ua = {
            let mut st = self.lock_write();
            self.touch_nexus(&mut st, nexus).ua.pop_front()
        };
        let sense = match ua {
            Some(code) => Sense::new(SenseKey::UNIT_ATTENTION, code),
            None if !self.medium_present.load(Ordering::Relaxed) => {
                Sense::new(SenseKey::NOT_READY, AscAscq::MEDIUM_NOT_PRESENT)
            }
            None => Sense::new(SenseKey::NO_SENSE, AscAscq::NO_ADDITIONAL_SENSE),
        };
        Ok(truncate(sense.encode(desc), alloc))
    }

    pub(super) fn report_supported_opcodes(&self, cdb: &[u8]) -> CmdResult {
        let rctd = cdb::byte(cdb, 2) & 0x80 != 0;
        let options = cdb::byte(cdb, 2) & 0x07;
        let req_op = cdb::byte(cdb, 3);
        let req_sa = cdb::be16(cdb, 4);
        let alloc = cdb::be32(cdb, 6) as usize;
        let supported: Vec<&CmdInfo> = table::ALL
            .iter()
            .copied()
            .filter(|c| self.available(c))
            .collect();
        let timeouts = |d: &mut Vec<u8>| {
            if rctd {
                d.extend_from_slice(&[0x00, 0x0a, 0, 0]);
                d.extend_from_slice(&0u32.to_be_bytes()); // nominal: not specified
                d.extend_from_slice(&30u32.to_be_bytes()); // recommended: 30 s
            }
        };
        let data = match options {
            0 => {
                let mut d = vec![0u8; 4];
                for c in &supported {
                    d.extend_from_slice(&[c.opcode, 0]);
                    d.extend_from_slice(&u16::from(c.sa.unwrap_or(0)).to_be_bytes());
                    d.push(0);
                    d.push(u8::from(rctd) << 1 | u8::from(c.sa.is_some()));
                    d.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                    timeouts(&mut d);
                }
                let len = (d.len() - 4) as u32;
                d[0..4].copy_from_slice(&len.to_be_bytes());
                d
            }
            1..=3 => {
                let has_sa = table::has_service_actions(req_op);
                match (options, has_sa) {
                    (1, true) | (2, false) => {
                        return Err(Sense::invalid_field_in_cdb(2, Some(2)).into())
                    }
                    _ => {}
                }
                let found = supported.iter().find(|c| {
                    c.opcode == req_op && (!has_sa || c.sa.map(u16::from) == Some(req_sa))
                });
                let mut d = vec![0u8, 0, 0, 0];
                match found {
                    Some(c) => {
                        d[1] = u8::from(rctd) << 7 | 0x03; // supported as in the standard
                        d[2..4].copy_from_slice(&(c.usage.len() as u16).to_be_bytes());
                        d.extend_from_slice(c.usage);
                        if let Some(sa) = c.sa {
                            d[5] = (d[5] & !0x1f) | sa;
                        }
                        timeouts(&mut d);
                    }
                    None => d[1] = 0x01, // not supported
                }
                d
            }
            _ => return Err(Sense::invalid_field_in_cdb(2, Some(2)).into()),
        };
        Ok(truncate(data, alloc))
    }

    pub(super) fn start_stop_unit(&self, cdb: &[u8]) -> CmdResult {
        let b4 = cdb::byte(cdb, 4);
        let power_condition = b4 >> 4;
        let loej = b4 & 0x02 != 0;
        let start = b4 & 0x01 != 0;
        // A power condition change ignores LOEJ and START; a virtual disk has no power states,
        // and it never spins down, so without LOEJ there is nothing to do either.
        if power_condition != 0 || !loej || !self.config.removable {
            return Ok(Vec::new());
        }
        let mut st = self.lock_write();
        if st.nexuses.values().any(|n| n.prevent) {
            return Err(Sense::illegal(AscAscq::MEDIUM_REMOVAL_PREVENTED).into());
        }
        if !start {
            let _ = self.backend.flush();
        }
        st.medium_present = start;
        self.medium_present.store(start, Ordering::Relaxed);
        Ok(Vec::new())
    }

    pub(super) fn prevent_allow(&self, nexus: &ItNexus, cdb: &[u8]) -> CmdResult {
        let prevent = cdb::byte(cdb, 4) & 0x03;
        if prevent > 1 {
            return Err(Sense::invalid_field_in_cdb(4, Some(1)).into());
        }
        if self.config.removable {
            let mut st = self.lock_write();
            self.touch_nexus(&mut st, nexus).prevent = prevent == 1;
        }
        Ok(Vec::new())
    }
}

/// REPORT LUNS over `luns` (select report 0, 1 or 2).
pub(crate) fn report_luns(cdb: &[u8], luns: impl Iterator<Item = u64>) -> CmdResult {
    let select = cdb::byte(cdb, 2);
    if select > 2 {
        return Err(Sense::invalid_field_in_cdb(2, None).into());
    }
    let alloc = cdb::be32(cdb, 6) as usize;
    if alloc < 16 {
        return Err(Sense::invalid_field_in_cdb(6, None).into());
    }
    let mut d = vec![0u8; 8];
    if select != 1 {
        for lun in luns {
            d.extend_from_slice(&crate::lun::encode(lun).to_be_bytes());
        }
    }
    let len = (d.len() - 8) as u32;
    d[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(truncate(d, alloc))
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS: the transport implements them; we say which.
pub(crate) fn report_supported_tmfs(cdb: &[u8]) -> CmdResult {
    let repd = cdb::byte(cdb, 2) & 0x80 != 0;
    let alloc = cdb::be32(cdb, 6) as usize;
    if alloc < 4 {
        return Err(Sense::invalid_field_in_cdb(6, None).into());
    }
    // ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET.
    let mut d = vec![0x80 | 0x40 | 0x10 | 0x08 | 0x02, 0, 0, 0];
    if repd {
        d[3] = 0x0c;
        d.resize(16, 0);
    }
    Ok(truncate(d, alloc))
}

/// READ DEFECT DATA: a virtual disk has no defects; report empty lists in the requested format.
pub(crate) fn read_defect_data(cdb: &[u8]) -> CmdResult {
    if cdb::byte(cdb, 0) == op::READ_DEFECT_DATA_10 {
        let flags = cdb::byte(cdb, 2) & 0x1f;
        let alloc = usize::from(cdb::be16(cdb, 7));
        Ok(truncate(vec![0, flags, 0, 0], alloc))
    } else {
        let flags = cdb::byte(cdb, 1) & 0x1f;
        let alloc = cdb::be32(cdb, 6) as usize;
        Ok(truncate(vec![0, flags, 0, 0, 0, 0, 0, 0], alloc))
    }
}
