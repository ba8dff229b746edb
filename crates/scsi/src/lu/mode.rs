//! MODE SENSE and MODE SELECT for the caching (08h) and control (0Ah) mode pages.
//!
//! Values are kept as a small struct and rendered to page bytes on demand; MODE SELECT parses
//! the pages the initiator sent, rejects changes to bits that are not changeable and commits
//! atomically. "Saved" values live in memory only (they survive resets, not restarts).

use std::sync::atomic::Ordering;

use super::{truncate, CmdResult, ItNexus, LogicalUnit};
use crate::cdb::{self, op};
use crate::codes::AscAscq;
use crate::sense::Sense;

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0a;
const ALL_PAGES: u8 = 0x3f;

/// The changeable mode parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ModeParams {
    /// Caching page WCE: write-back cache enabled.
    pub wce: bool,
    /// Control page D_SENSE: descriptor-format sense data.
    pub d_sense: bool,
    /// Control page SWP: software write protect.
    pub swp: bool,
}

/// Page control field of MODE SENSE.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PageControl {
    Current,
    Changeable,
    Default,
    Saved,
}

fn caching_page(p: &ModeParams, pc: PageControl) -> Vec<u8> {
    let mut v = vec![0u8; 20];
    v[0] = CACHING;
    v[1] = 0x12;
    v[2] = match pc {
        PageControl::Changeable => 0x04,
        _ if p.wce => 0x04,
        _ => 0,
    };
    v
}

fn control_page(p: &ModeParams, pc: PageControl) -> Vec<u8> {
    let mut v = vec![0u8; 12];
    v[0] = CONTROL;
    v[1] = 0x0a;
    if pc == PageControl::Changeable {
        v[2] = 0x04; // D_SENSE
        v[4] = 0x08; // SWP
        return v;
    }
    v[2] = if p.d_sense { 0x04 } else { 0 };
    v[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering allowed
    v[4] = if p.swp { 0x08 } else { 0 };
    v[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // BUSY TIMEOUT PERIOD: unlimited
    v
}

impl LogicalUnit {
    fn default_mode(&self) -> ModeParams {
        ModeParams {
            wce: self.config.write_cache,
            d_sense: false,
            swp: false,
        }
    }

    pub(super) fn mode_sense(&self, cdb: &[u8]) -> CmdResult {
        let ten = cdb::byte(cdb, 0) == op::MODE_SENSE_10;
        let dbd = cdb::byte(cdb, 1) & 0x08 != 0;
        let llbaa = ten && cdb::byte(cdb, 1) & 0x10 != 0;
        let pc = match cdb::byte(cdb, 2) >> 6 {
            0 => PageControl::Current,
            1 => PageControl::Changeable,
            2 => PageControl::Default,
            _ => PageControl::Saved,
        };
        let page = cdb::byte(cdb, 2) & 0x3f;
        let subpage = cdb::byte(cdb, 3);
        let alloc = if ten {
            usize::from(cdb::be16(cdb, 7))
        } else {
            usize::from(cdb::byte(cdb, 4))
        };
        if subpage != 0 && subpage != 0xff {
            return Err(Sense::invalid_field_in_cdb(3, None).into());
        }
        let params = {
            let st = self.lock_read();
            match pc {
                PageControl::Current => st.mode_current,
                PageControl::Saved => st.mode_saved,
                _ => self.default_mode(),
            }
        };
        let mut pages = Vec::new();
        match page {
            CACHING => pages.extend(caching_page(&params, pc)),
            CONTROL => pages.extend(control_page(&params, pc)),
            ALL_PAGES => {
                pages.extend(caching_page(&params, pc));
                pages.extend(control_page(&params, pc));
            }
            _ => return Err(Sense::invalid_field_in_cdb(2, Some(5)).into()),
        }
        let write_protected = self.read_only || self.swp.load(Ordering::Relaxed);
        let dev_specific = if write_protected { 0x80 } else { 0 } | 0x10; // WP, DPOFUA
        let mut bd = Vec::new();
        if !dbd {
            let blocks = self.num_blocks();
            if llbaa {
                bd.extend_from_slice(&blocks.to_be_bytes());
                bd.extend_from_slice(&[0, 0, 0, 0]);
                bd.extend_from_slice(&self.config.block_size.to_be_bytes());
            } else {
                bd.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
                bd.push(0);
                bd.extend_from_slice(&self.config.block_size.to_be_bytes()[1..]);
            }
        }
        let mut d = Vec::with_capacity(8 + bd.len() + pages.len());
        if ten {
            let len = (6 + bd.len() + pages.len()) as u16;
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(&[0, dev_specific, u8::from(llbaa), 0]);
            d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
        } else {
            let len = (3 + bd.len() + pages.len()).min(255) as u8;
            d.extend_from_slice(&[len, 0, dev_specific, bd.len() as u8]);
        }
        d.extend_from_slice(&bd);
        d.extend_from_slice(&pages);
        Ok(truncate(d, alloc))
    }

    pub(super) fn mode_select(&self, nexus: &ItNexus, cdb: &[u8], data_out: &[u8]) -> CmdResult {
        let ten = cdb::byte(cdb, 0) == op::MODE_SELECT_10;
        let save = cdb::byte(cdb, 1) & 0x01 != 0;
        let plen = if ten {
            usize::from(cdb::be16(cdb, 7))
        } else {
            usize::from(cdb::byte(cdb, 4))
        };
        if plen == 0 {
            return Ok(Vec::new());
        }
        let Some(data) = data_out.get(..plen) else {
            return Err(Sense::param_list_length_error().into());
        };
        let hdr = if ten { 8 } else { 4 };
        if data.len() < hdr {
            return Err(Sense::param_list_length_error().into());
        }
        let bdl = if ten {
            usize::from(cdb::be16(data, 6))
        } else {
            usize::from(data[3])
        };
        let long = ten && data[4] & 0x01 != 0;
        let Some(bd) = data.get(hdr..hdr + bdl) else {
            return Err(Sense::param_list_length_error().into());
        };
        match (bdl, long) {
            (0, _) => {}
            (8, false) | (16, true) => {
                let len = if long {
                    cdb::be32(bd, 12)
                } else {
                    cdb::be24(bd, 5)
                };
                if len != 0 && len != self.config.block_size {
                    let at = hdr + if long { 12 } else { 5 };
                    return Err(Sense::invalid_field_in_param(at as u16, None).into());
                }
            }
            _ => return Err(Sense::invalid_field_in_param(if ten { 6 } else { 3 }, None).into()),
        }
        let mut st = self.lock_write();
        let old = st.mode_current;
        let mut new = old;
        let mut i = hdr + bdl;
        while i < data.len() {
            let (Some(&b0), Some(&plen)) = (data.get(i), data.get(i + 1)) else {
                return Err(Sense::param_list_length_error().into());
            };
            if b0 & 0x40 != 0 {
                return Err(Sense::invalid_field_in_param(i as u16, Some(6)).into());
            }
            let code = b0 & 0x3f;
            let Some(page) = data.get(i..i + 2 + usize::from(plen)) else {
                return Err(Sense::param_list_length_error().into());
            };
            let (current, changeable) = match code {
                CACHING => (
                    caching_page(&new, PageControl::Current),
                    caching_page(&new, PageControl::Changeable),
                ),
                CONTROL => (
                    control_page(&new, PageControl::Current),
                    control_page(&new, PageControl::Changeable),
                ),
                _ => return Err(Sense::invalid_field_in_param(i as u16, Some(5)).into()),
            };
            if page.len() != current.len() {
                return Err(Sense::invalid_field_in_param((i + 1) as u16, None).into());
            }
            for (j, ((&got, &cur), &mask)) in page
                .iter()
                .zip(&current)
                .zip(&changeable)
                .enumerate()
                .skip(2)
            {
                if (got ^ cur) & !mask != 0 {
                    return Err(Sense::invalid_field_in_param((i + j) as u16, None).into());
                }
            }
            match code {
                CACHING => new.wce = page[2] & 0x04 != 0,
                _ => {
                    new.d_sense = page[2] & 0x04 != 0;
                    new.swp = page[4] & 0x08 != 0;
                }
            }
            i += page.len();
        }
        st.mode_current = new;
        if save {
            st.mode_saved = new;
        }
        self.wce.store(new.wce, Ordering::Relaxed);
        self.d_sense.store(new.d_sense, Ordering::Relaxed);
        self.swp.store(new.swp, Ordering::Relaxed);
        if new != old {
            st.queue_ua_all_except(Some(nexus), AscAscq::MODE_PARAMETERS_CHANGED);
        }
        Ok(Vec::new())
    }
}
