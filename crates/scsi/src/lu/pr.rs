//! Reservations: SPC-4 persistent reservations (PERSISTENT RESERVE IN/OUT) and the older
//! RESERVE/RELEASE(6/10).
//!
//! Registrations are per I_T nexus. Persist Through Power Loss is not supported (APTPL is
//! refused with INVALID FIELD IN PARAMETER LIST), nor are SPEC_I_PT and ALL_TG_PT.

use super::{CmdResult, Fail, ItNexus, LogicalUnit, LuState};
use crate::cdb;
use crate::codes::AscAscq;
use crate::sense::Sense;

/// Persistent reservation types (SPC-4 table 169).
pub(crate) mod pr_type {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
    pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
    pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
    pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;
}
use pr_type::*;

fn valid_type(t: u8) -> bool {
    matches!(
        t,
        WRITE_EXCLUSIVE
            | EXCLUSIVE_ACCESS
            | WRITE_EXCLUSIVE_REGISTRANTS_ONLY
            | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
            | WRITE_EXCLUSIVE_ALL_REGISTRANTS
            | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    )
}

fn all_registrants(t: u8) -> bool {
    t == WRITE_EXCLUSIVE_ALL_REGISTRANTS || t == EXCLUSIVE_ACCESS_ALL_REGISTRANTS
}

fn registrants_only(t: u8) -> bool {
    t == WRITE_EXCLUSIVE_REGISTRANTS_ONLY || t == EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
}

#[derive(Clone, Debug)]
pub(crate) struct Registration {
    pub nexus: ItNexus,
    pub key: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct Reservation {
    /// The holder (for all-registrants types, the nexus that reserved; every registrant holds).
    pub holder: ItNexus,
    pub pr_type: u8,
}

#[derive(Default)]
pub(crate) struct PrState {
    pub generation: u32,
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
}

impl PrState {
    fn key_of(&self, nexus: &ItNexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|r| &r.nexus == nexus)
            .map(|r| r.key)
    }

    fn is_holder(&self, nexus: &ItNexus) -> bool {
        match &self.reservation {
            Some(r) if all_registrants(r.pr_type) => self.key_of(nexus).is_some(),
            Some(r) => &r.holder == nexus,
            None => false,
        }
    }

    /// True if a read (or, with `write`, a write) by `nexus` conflicts with the reservation.
    pub fn conflicts(&self, nexus: &ItNexus, write: bool) -> bool {
        let Some(r) = &self.reservation else {
            return false;
        };
        if self.is_holder(nexus) {
            return false;
        }
        if (registrants_only(r.pr_type) || all_registrants(r.pr_type))
            && self.key_of(nexus).is_some()
        {
            return false;
        }
        let exclusive_access = matches!(
            r.pr_type,
            EXCLUSIVE_ACCESS | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
        );
        write || exclusive_access
    }
}

/// Basic PERSISTENT RESERVE OUT parameter list (24 bytes).
struct ProutParams {
    key: u64,
    sa_key: u64,
    flags: u8,
}

/// Builds a TransportID for an initiator port name: iSCSI format 01b ("name,i,0xISID") when
/// the name has an ISID, else format 00b.
fn transport_id(protocol_id: u8, initiator_port: &str) -> Vec<u8> {
    let format = if initiator_port.contains(",i,0x") {
        0x40
    } else {
        0x00
    };
    let mut name: Vec<u8> = initiator_port.bytes().take(2000).collect();
    name.push(0);
    while name.len() % 4 != 0 {
        name.push(0);
    }
    let mut t = vec![format | (protocol_id & 0x0f), 0];
    t.extend_from_slice(&(name.len() as u16).to_be_bytes());
    t.extend_from_slice(&name);
    t
}

/// Parses an iSCSI TransportID back to an initiator port name.
fn parse_transport_id(protocol_id: u8, t: &[u8]) -> Option<String> {
    let b0 = *t.first()?;
    if b0 & 0x0f != protocol_id & 0x0f || b0 >> 6 > 1 {
        return None;
    }
    let len = usize::from(cdb::be16(t, 2));
    let name = t.get(4..4 + len)?;
    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    String::from_utf8(name[..end].to_vec())
        .ok()
        .filter(|s| !s.is_empty())
}

impl LogicalUnit {
    pub(super) fn persistent_reserve_in(&self, _nexus: &ItNexus, cdb: &[u8]) -> CmdResult {
        let sa = cdb::byte(cdb, 1) & 0x1f;
        let alloc = usize::from(cdb::be16(cdb, 7));
        let st = self.lock_read();
        let pr = &st.pr;
        let mut d = Vec::new();
        d.extend_from_slice(&pr.generation.to_be_bytes());
        d.extend_from_slice(&[0, 0, 0, 0]);
        match sa {
            0 => {
                for r in &pr.registrations {
                    d.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            1 => {
                if let Some(r) = &pr.reservation {
                    let key = if all_registrants(r.pr_type) {
                        0
                    } else {
                        pr.key_of(&r.holder).unwrap_or(0)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, r.pr_type & 0x0f, 0, 0]);
                }
            }
            2 => {
                d.clear();
                d.extend_from_slice(&8u16.to_be_bytes());
                d.push(0x00); // no CRH, SIP_C, ATP_C, PTPL_C
                d.push(0x80); // TMV: the type mask is valid
                d.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02); // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
                d.push(0x01); // EX_AC_AR
                d.extend_from_slice(&[0, 0]);
            }
            3 => {
                for r in &pr.registrations {
                    let holder = pr.is_holder(&r.nexus);
                    d.extend_from_slice(&r.key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0]);
                    d.push(u8::from(holder));
                    d.push(match (&pr.reservation, holder) {
                        (Some(res), true) => res.pr_type & 0x0f,
                        _ => 0,
                    });
                    d.extend_from_slice(&[0, 0, 0, 0]);
                    d.extend_from_slice(&r.nexus.relative_target_port.to_be_bytes());
                    let tid = transport_id(self.config.protocol_id, &r.nexus.initiator_port);
                    d.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    d.extend_from_slice(&tid);
                }
            }
            _ => return Err(Sense::invalid_field_in_cdb(1, Some(4)).into()),
        }
        if sa != 2 {
            let len = (d.len() - 8) as u32;
            d[4..8].copy_from_slice(&len.to_be_bytes());
        }
        Ok(super::truncate(d, alloc))
    }

    pub(super) fn persistent_reserve_out(
        &self,
        nexus: &ItNexus,
        cdb: &[u8],
        data_out: &[u8],
    ) -> CmdResult {
        let sa = cdb::byte(cdb, 1) & 0x1f;
        let scope = cdb::byte(cdb, 2) >> 4;
        let ty = cdb::byte(cdb, 2) & 0x0f;
        let plen = cdb::be32(cdb, 5) as usize;
        if sa == 7 {
            return self.register_and_move(nexus, ty, plen, data_out);
        }
        if plen != 24 {
            return Err(Sense::param_list_length_error().into());
        }
        let Some(p) = data_out.get(..24) else {
            return Err(Sense::param_list_length_error().into());
        };
        let params = ProutParams {
            key: cdb::be64(p, 0),
            sa_key: cdb::be64(p, 8),
            flags: p[20],
        };
        if params.flags & 0x08 != 0 {
            return Err(Sense::invalid_field_in_param(20, Some(3)).into()); // SPEC_I_PT
        }
        if params.flags & 0x04 != 0 {
            return Err(Sense::invalid_field_in_param(20, Some(2)).into()); // ALL_TG_PT
        }
        if params.flags & 0x01 != 0 {
            return Err(Sense::invalid_field_in_param(20, Some(0)).into()); // APTPL
        }
        let mut st = self.lock_write();
        // PERSISTENT RESERVE OUT conflicts with an SPC-2 reservation held by another nexus.
        if st.reserve6.as_ref().is_some_and(|h| h != nexus) {
            return Err(Fail::Conflict);
        }
        match sa {
            0 | 6 => register(&mut st, nexus, &params, sa == 6),
            1..=5 => {
                let Some(key) = st.pr.key_of(nexus) else {
                    return Err(Fail::Conflict);
                };
                if key != params.key {
                    return Err(Fail::Conflict);
                }
                if sa == 1 && scope != 0 {
                    // Only LU_SCOPE exists.
                    return Err(Sense::invalid_field_in_cdb(2, Some(7)).into());
                }
                match sa {
                    1 => reserve(&mut st, nexus, ty),
                    2 => release(&mut st, nexus, scope, ty),
                    3 => {
                        clear(&mut st, nexus);
                        Ok(Vec::new())
                    }
                    _ => preempt(&mut st, nexus, &params, scope, ty),
                }
            }
            _ => Err(Sense::invalid_field_in_cdb(1, Some(4)).into()),
        }
    }

    fn register_and_move(
        &self,
        nexus: &ItNexus,
        ty: u8,
        plen: usize,
        data_out: &[u8],
    ) -> CmdResult {
        if plen < 24 {
            return Err(Sense::param_list_length_error().into());
        }
        let Some(p) = data_out.get(..plen) else {
            return Err(Sense::param_list_length_error().into());
        };
        let key = cdb::be64(p, 0);
        let sa_key = cdb::be64(p, 8);
        let unreg = p[17] & 0x02 != 0;
        if p[17] & 0x01 != 0 {
            return Err(Sense::invalid_field_in_param(17, Some(0)).into());
        }
        let rtp = cdb::be16(p, 18);
        let tid_len = cdb::be32(p, 20) as usize;
        let Some(tid) = p.get(24..24usize.saturating_add(tid_len)) else {
            return Err(Sense::param_list_length_error().into());
        };
        let Some(dest_port) = parse_transport_id(self.config.protocol_id, tid) else {
            return Err(Sense::invalid_field_in_param(24, None).into());
        };
        let mut st = self.lock_write();
        let Some(own) = st.pr.key_of(nexus) else {
            return Err(Fail::Conflict);
        };
        if own != key {
            return Err(Fail::Conflict);
        }
        let Some(res) = st.pr.reservation.clone() else {
            return Err(Fail::Conflict);
        };
        if all_registrants(res.pr_type) || res.holder != *nexus {
            return Err(Fail::Conflict);
        }
        if sa_key == 0 {
            return Err(Sense::invalid_field_in_param(8, None).into());
        }
        // The destination target port: any nexus we know on that relative port tells us its name.
        let target_port = st
            .nexuses
            .keys()
            .chain(std::iter::once(nexus))
            .find(|n| n.relative_target_port == rtp)
            .map(|n| n.target_port.clone());
        let Some(target_port) = target_port else {
            return Err(Sense::invalid_field_in_param(18, None).into());
        };
        let dest = ItNexus {
            initiator_port: dest_port,
            target_port,
            relative_target_port: rtp,
        };
        if dest == *nexus {
            return Err(Sense::invalid_field_in_param(24, None).into());
        }
        match st.pr.registrations.iter_mut().find(|r| r.nexus == dest) {
            Some(r) => r.key = sa_key,
            None => st.pr.registrations.push(Registration {
                nexus: dest.clone(),
                key: sa_key,
            }),
        }
        st.pr.reservation = Some(Reservation {
            holder: dest,
            pr_type: if ty == 0 { res.pr_type } else { ty },
        });
        if unreg {
            st.pr.registrations.retain(|r| r.nexus != *nexus);
        }
        st.pr.generation = st.pr.generation.wrapping_add(1);
        Ok(Vec::new())
    }

    pub(super) fn reserve_6(&self, nexus: &ItNexus, cdb: &[u8]) -> CmdResult {
        if cdb::byte(cdb, 0) == cdb::op::RESERVE_10 && cdb::byte(cdb, 1) & 0x12 != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(4)).into()); // 3RDPTY / LONGID
        }
        let mut st = self.lock_write();
        if st.pr.reservation.is_some() {
            return Err(Fail::Conflict);
        }
        match &st.reserve6 {
            Some(h) if h != nexus => Err(Fail::Conflict),
            _ => {
                st.reserve6 = Some(nexus.clone());
                Ok(Vec::new())
            }
        }
    }

    pub(super) fn release_6(&self, nexus: &ItNexus, _cdb: &[u8]) -> CmdResult {
        let mut st = self.lock_write();
        if st.reserve6.as_ref() == Some(nexus) {
            st.reserve6 = None;
        }
        Ok(Vec::new())
    }
}

fn register(
    st: &mut LuState,
    nexus: &ItNexus,
    p: &ProutParams,
    ignore_existing: bool,
) -> CmdResult {
    let existing = st.pr.key_of(nexus);
    match existing {
        None => {
            if !ignore_existing && p.key != 0 {
                return Err(Fail::Conflict);
            }
            if p.sa_key != 0 {
                st.pr.registrations.push(Registration {
                    nexus: nexus.clone(),
                    key: p.sa_key,
                });
                st.pr.generation = st.pr.generation.wrapping_add(1);
            }
        }
        Some(key) => {
            if !ignore_existing && p.key != key {
                return Err(Fail::Conflict);
            }
            if p.sa_key == 0 {
                unregister(st, nexus);
            } else if let Some(r) = st.pr.registrations.iter_mut().find(|r| &r.nexus == nexus) {
                r.key = p.sa_key;
            }
            st.pr.generation = st.pr.generation.wrapping_add(1);
        }
    }
    Ok(Vec::new())
}

/// Removes `nexus`'s registration and releases a reservation that depended on it.
fn unregister(st: &mut LuState, nexus: &ItNexus) {
    st.pr.registrations.retain(|r| &r.nexus != nexus);
    let Some(res) = st.pr.reservation.clone() else {
        return;
    };
    let release = if all_registrants(res.pr_type) {
        st.pr.registrations.is_empty()
    } else {
        res.holder == *nexus
    };
    if release {
        st.pr.reservation = None;
        if registrants_only(res.pr_type) {
            released_ua(st, nexus);
        }
    }
}

/// RESERVATIONS RELEASED to every registrant but `by`.
fn released_ua(st: &mut LuState, by: &ItNexus) {
    let others: Vec<ItNexus> = st
        .pr
        .registrations
        .iter()
        .map(|r| r.nexus.clone())
        .filter(|n| n != by)
        .collect();
    for n in others {
        st.queue_ua(&n, AscAscq::RESERVATIONS_RELEASED);
    }
}

fn reserve(st: &mut LuState, nexus: &ItNexus, ty: u8) -> CmdResult {
    if !valid_type(ty) {
        return Err(Sense::invalid_field_in_cdb(2, Some(3)).into());
    }
    if st.reserve6.is_some() {
        return Err(Fail::Conflict);
    }
    match &st.pr.reservation {
        Some(r) => {
            if st.pr.is_holder(nexus) && r.pr_type == ty {
                Ok(Vec::new())
            } else {
                Err(Fail::Conflict)
            }
        }
        None => {
            st.pr.reservation = Some(Reservation {
                holder: nexus.clone(),
                pr_type: ty,
            });
            Ok(Vec::new())
        }
    }
}

fn release(st: &mut LuState, nexus: &ItNexus, scope: u8, ty: u8) -> CmdResult {
    let Some(r) = st.pr.reservation.clone() else {
        return Ok(Vec::new());
    };
    if !st.pr.is_holder(nexus) {
        return Ok(Vec::new());
    }
    if scope != 0 || r.pr_type != ty {
        return Err(Sense::illegal(AscAscq::INVALID_RELEASE_OF_PERSISTENT_RESERVATION).into());
    }
    st.pr.reservation = None;
    if registrants_only(ty) || all_registrants(ty) {
        released_ua(st, nexus);
    }
    Ok(Vec::new())
}

fn clear(st: &mut LuState, nexus: &ItNexus) {
    let others: Vec<ItNexus> = st
        .pr
        .registrations
        .iter()
        .map(|r| r.nexus.clone())
        .filter(|n| n != nexus)
        .collect();
    st.pr.registrations.clear();
    st.pr.reservation = None;
    st.pr.generation = st.pr.generation.wrapping_add(1);
    for n in others {
        st.queue_ua(&n, AscAscq::RESERVATIONS_PREEMPTED);
    }
}

fn preempt(st: &mut LuState, nexus: &ItNexus, p: &ProutParams, scope: u8, ty: u8) -> CmdResult {
    let res = st.pr.reservation.clone();
    let ar = res.as_ref().is_some_and(|r| all_registrants(r.pr_type));
    if p.sa_key == 0 && !ar {
        return Err(Sense::invalid_field_in_param(8, None).into());
    }
    // Which registrations go: all others (all-registrants reservation and a zero key), or
    // those holding the named key.
    let victims: Vec<ItNexus> = st
        .pr
        .registrations
        .iter()
        .filter(|r| {
            &r.nexus != nexus
                && (if ar && p.sa_key == 0 {
                    true
                } else {
                    r.key == p.sa_key
                })
        })
        .map(|r| r.nexus.clone())
        .collect();
    let takes_reservation = match &res {
        Some(_) if ar => p.sa_key == 0,
        Some(r) => st.pr.key_of(&r.holder) == Some(p.sa_key),
        None => false,
    };
    if takes_reservation {
        if scope != 0 {
            return Err(Sense::invalid_field_in_cdb(2, Some(7)).into());
        }
        if !valid_type(ty) {
            return Err(Sense::invalid_field_in_cdb(2, Some(3)).into());
        }
    } else if victims.is_empty() && st.pr.key_of(nexus) != Some(p.sa_key) {
        return Err(Fail::Conflict);
    }
    st.pr.registrations.retain(|r| !victims.contains(&r.nexus));
    for v in &victims {
        st.queue_ua(v, AscAscq::REGISTRATIONS_PREEMPTED);
    }
    if takes_reservation {
        let old_type = res.map(|r| r.pr_type).unwrap_or(ty);
        st.pr.reservation = Some(Reservation {
            holder: nexus.clone(),
            pr_type: ty,
        });
        if old_type != ty {
            // Other registrants see the reservation change.
            let others: Vec<ItNexus> = st
                .pr
                .registrations
                .iter()
                .map(|r| r.nexus.clone())
                .filter(|n| n != nexus && !victims.contains(n))
                .collect();
            for n in others {
                st.queue_ua(&n, AscAscq::RESERVATIONS_RELEASED);
            }
        }
    }
    st.pr.generation = st.pr.generation.wrapping_add(1);
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_id_round_trip() {
        let t = transport_id(5, "iqn.2000-01.x:y,i,0x00023d000001");
        assert_eq!(t[0], 0x45);
        assert_eq!(t.len() % 4, 0);
        assert_eq!(
            parse_transport_id(5, &t).as_deref(),
            Some("iqn.2000-01.x:y,i,0x00023d000001")
        );
        assert_eq!(parse_transport_id(5, &[]), None);
        assert_eq!(parse_transport_id(5, &[0x45, 0, 0xff, 0xff]), None);
    }
}
