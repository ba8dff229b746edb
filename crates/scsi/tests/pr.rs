//! Persistent reservations and RESERVE/RELEASE(6) with two (or three) I_T nexuses.

mod common;
use common::*;
use scsi::{AscAscq, ItNexus, LogicalUnit, ScsiStatus, SenseKey};

fn register(lu: &LogicalUnit, n: &ItNexus, key: u64) {
    assert_good(&lu.execute(n, &prout(6, 0), &prout_params(0, key)));
}

fn keys(lu: &LogicalUnit, n: &ItNexus) -> (u32, Vec<u64>) {
    let r = lu.execute(n, &prin(0, 4096), &[]);
    assert_good(&r);
    let gen = u32::from_be_bytes(r.data[0..4].try_into().unwrap());
    let len = u32::from_be_bytes(r.data[4..8].try_into().unwrap()) as usize;
    assert_eq!(len + 8, r.data.len());
    (
        gen,
        r.data[8..]
            .chunks(8)
            .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
            .collect(),
    )
}

/// (reserved, key, type) from READ RESERVATION.
fn reservation(lu: &LogicalUnit, n: &ItNexus) -> Option<(u64, u8)> {
    let r = lu.execute(n, &prin(1, 4096), &[]);
    assert_good(&r);
    if r.data[4..8] == [0, 0, 0, 0] {
        return None;
    }
    Some((
        u64::from_be_bytes(r.data[8..16].try_into().unwrap()),
        r.data[21] & 0x0f,
    ))
}

fn two() -> (LogicalUnit, ItNexus, ItNexus) {
    let lu = lu();
    let (a, b) = (nexus(1), nexus(2));
    ready(&lu, &a);
    ready(&lu, &b);
    (lu, a, b)
}

#[test]
fn register_unregister() {
    let (lu, a, _) = two();
    let (g0, k) = keys(&lu, &a);
    assert!(k.is_empty());
    register(&lu, &a, 0x1111);
    assert_eq!(keys(&lu, &a), (g0 + 1, vec![0x1111]));
    // REGISTER with a wrong reservation key conflicts.
    assert_conflict(&lu.execute(&a, &prout(0, 0), &prout_params(0x2222, 0x3333)));
    assert_conflict(&lu.execute(&a, &prout(0, 0), &prout_params(0, 0x1112)));
    // Change key, then unregister.
    assert_good(&lu.execute(&a, &prout(0, 0), &prout_params(0x1111, 0x4444)));
    assert_eq!(keys(&lu, &a).1, vec![0x4444]);
    assert_good(&lu.execute(&a, &prout(0, 0), &prout_params(0x4444, 0)));
    assert!(keys(&lu, &a).1.is_empty());
    // READ KEYS truncated to 8 bytes still reports the additional length.
    register(&lu, &a, 0x1111);
    let r = lu.execute(&a, &prin(0, 8), &[]);
    assert_eq!(r.data.len(), 8);
    assert_eq!(&r.data[4..8], &[0, 0, 0, 8]);
    // APTPL, SPEC_I_PT and ALL_TG_PT are refused cleanly; wrong parameter length too.
    let mut p = prout_params(0, 0x5555);
    p[20] = 0x01;
    assert_illegal(
        &lu.execute(&a, &prout(6, 0), &p),
        AscAscq::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    assert_illegal(
        &lu.execute(&a, &prout(6, 0), &p[..20]),
        AscAscq::PARAMETER_LIST_LENGTH_ERROR,
    );
}

#[test]
fn service_action_range_and_capabilities() {
    let (lu, a, _) = two();
    for sa in 0..4 {
        assert_good(&lu.execute(&a, &prin(sa, 4096), &[]));
    }
    for sa in 4..0x20 {
        assert_illegal(
            &lu.execute(&a, &prin(sa, 4096), &[]),
            AscAscq::INVALID_FIELD_IN_CDB,
        );
    }
    let r = lu.execute(&a, &prin(2, 4096), &[]);
    assert_eq!(&r.data[0..2], &[0, 8]);
    assert_eq!(r.data[3] & 0x80, 0x80);
    assert_eq!((r.data[4], r.data[5]), (0xea, 0x01));
}

/// (registered can read, registered can write, unregistered can read, unregistered can write)
fn access(ty: u8) -> (bool, bool, bool, bool) {
    let (lu, a, b) = two();
    register(&lu, &a, 0xa);
    register(&lu, &b, 0xb);
    assert_good(&lu.execute(&a, &prout(1, ty), &prout_params(0xa, 0)));
    let all_reg = ty == 7 || ty == 8;
    assert_eq!(
        reservation(&lu, &a),
        Some((if all_reg { 0 } else { 0xa }, ty))
    );
    assert_good(&lu.execute(&a, &read10(0, 1), &[]));
    assert_good(&lu.execute(&a, &write10(0, 1), &pattern(1, 0)));
    let can = |r: scsi::ScsiResponse| match r.status {
        ScsiStatus::GOOD => true,
        ScsiStatus::RESERVATION_CONFLICT => false,
        s => panic!("unexpected {s:?}"),
    };
    let rr = can(lu.execute(&b, &read10(0, 1), &[]));
    let rw = can(lu.execute(&b, &write10(0, 1), &pattern(1, 0)));
    assert_good(&lu.execute(&b, &prout(0, 0), &prout_params(0xb, 0)));
    let ur = can(lu.execute(&b, &read10(0, 1), &[]));
    let uw = can(lu.execute(&b, &write10(0, 1), &pattern(1, 0)));
    // TEST UNIT READY, INQUIRY, READ CAPACITY never conflict.
    assert_good(&lu.execute(&b, &tur(), &[]));
    assert_good(&lu.execute(&b, &read_capacity_16(32), &[]));
    assert_good(&lu.execute(&a, &prout(2, ty), &prout_params(0xa, 0)));
    assert_eq!(reservation(&lu, &a), None);
    (rr, rw, ur, uw)
}

#[test]
fn reservation_types_access() {
    assert_eq!(access(3), (false, false, false, false)); // EA
    assert_eq!(access(1), (true, false, true, false)); // WE
    assert_eq!(access(6), (true, true, false, false)); // EA-RO
    assert_eq!(access(5), (true, true, true, false)); // WE-RO
    assert_eq!(access(8), (true, true, false, false)); // EA-AR
    assert_eq!(access(7), (true, true, true, false)); // WE-AR
}

#[test]
fn ownership_on_unregister() {
    for ty in [1u8, 3, 5, 6, 7, 8] {
        let (lu, a, b) = two();
        register(&lu, &a, 0xa);
        register(&lu, &b, 0xb);
        assert_good(&lu.execute(&a, &prout(1, ty), &prout_params(0xa, 0)));
        // Reserving again with the same type is fine; another type or nexus conflicts.
        assert_good(&lu.execute(&a, &prout(1, ty), &prout_params(0xa, 0)));
        if ty != 7 && ty != 8 {
            assert_conflict(&lu.execute(&b, &prout(1, ty), &prout_params(0xb, 0)));
        }
        assert_good(&lu.execute(&a, &prout(0, 0), &prout_params(0xa, 0)));
        if ty == 7 || ty == 8 {
            assert_eq!(reservation(&lu, &b), Some((0, ty)));
            assert_good(&lu.execute(&b, &prout(2, ty), &prout_params(0xb, 0)));
            assert_eq!(reservation(&lu, &b), None);
        } else {
            assert_eq!(reservation(&lu, &a), None);
        }
        if ty == 5 || ty == 6 {
            // Registrants-only reservation released by unregistering: the other registrant is told.
            assert_check(
                &lu.execute(&b, &tur(), &[]),
                SenseKey::UNIT_ATTENTION,
                AscAscq::RESERVATIONS_RELEASED,
            );
        }
        assert_good(&lu.execute(&b, &tur(), &[]));
    }
}

#[test]
fn release_with_wrong_type_and_non_holder() {
    let (lu, a, b) = two();
    register(&lu, &a, 0xa);
    register(&lu, &b, 0xb);
    assert_good(&lu.execute(&a, &prout(1, 3), &prout_params(0xa, 0)));
    assert_illegal(
        &lu.execute(&a, &prout(2, 1), &prout_params(0xa, 0)),
        AscAscq::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    );
    // A registered non-holder's RELEASE does nothing.
    assert_good(&lu.execute(&b, &prout(2, 3), &prout_params(0xb, 0)));
    assert_eq!(reservation(&lu, &a), Some((0xa, 3)));
    // Unregistered or wrong key: conflict.
    assert_conflict(&lu.execute(&b, &prout(2, 3), &prout_params(0xc, 0)));
    let c = nexus(3);
    ready(&lu, &c);
    assert_conflict(&lu.execute(&c, &prout(1, 3), &prout_params(0, 0)));
    // Invalid type and scope.
    assert_good(&lu.execute(&a, &prout(2, 3), &prout_params(0xa, 0)));
    assert_illegal(
        &lu.execute(&a, &prout(1, 2), &prout_params(0xa, 0)),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    assert_illegal(
        &lu.execute(&a, &prout(1, 0x13), &prout_params(0xa, 0)),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn clear() {
    let (lu, a, b) = two();
    register(&lu, &a, 0xa);
    register(&lu, &b, 0xb);
    assert_good(&lu.execute(&a, &prout(1, 3), &prout_params(0xa, 0)));
    let (g, _) = keys(&lu, &a);
    assert_good(&lu.execute(&a, &prout(3, 0), &prout_params(0xa, 0)));
    assert_eq!(keys(&lu, &a), (g + 1, vec![]));
    assert_eq!(reservation(&lu, &a), None);
    assert_check(
        &lu.execute(&b, &tur(), &[]),
        SenseKey::UNIT_ATTENTION,
        AscAscq::RESERVATIONS_PREEMPTED,
    );
}

#[test]
fn preempt_registration_and_reservation() {
    let (lu, a, b) = two();
    register(&lu, &a, 0xa);
    register(&lu, &b, 0xb);
    let (g, _) = keys(&lu, &a);
    // No reservation: PREEMPT removes the registration and tells its owner.
    assert_good(&lu.execute(&b, &prout(4, 3), &prout_params(0xb, 0xa)));
    assert_eq!(keys(&lu, &b), (g + 1, vec![0xb]));
    assert_check(
        &lu.execute(&a, &tur(), &[]),
        SenseKey::UNIT_ATTENTION,
        AscAscq::REGISTRATIONS_PREEMPTED,
    );
    assert_good(&lu.execute(&a, &tur(), &[]));
    // Preempting a key nobody has conflicts; a zero key without an all-registrants reservation
    // is an invalid parameter.
    assert_conflict(&lu.execute(&b, &prout(4, 3), &prout_params(0xb, 0x77)));
    assert_illegal(
        &lu.execute(&b, &prout(4, 3), &prout_params(0xb, 0)),
        AscAscq::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    // With a reservation: PREEMPT AND ABORT takes it over with a new type.
    register(&lu, &a, 0xa);
    assert_good(&lu.execute(&a, &prout(1, 1), &prout_params(0xa, 0)));
    assert_good(&lu.execute(&b, &prout(5, 3), &prout_params(0xb, 0xa)));
    assert_eq!(reservation(&lu, &b), Some((0xb, 3)));
    assert_eq!(keys(&lu, &b).1, vec![0xb]);
    let r = lu.execute(&a, &read10(0, 1), &[]);
    assert_eq!(sense(&r).asc, AscAscq::REGISTRATIONS_PREEMPTED);
    assert_conflict(&lu.execute(&a, &read10(0, 1), &[]));
}

#[test]
fn preempt_all_registrants() {
    let (lu, a, b) = two();
    let c = nexus(3);
    ready(&lu, &c);
    register(&lu, &a, 0xa);
    register(&lu, &b, 0xb);
    register(&lu, &c, 0xc);
    assert_good(&lu.execute(&a, &prout(1, 8), &prout_params(0xa, 0)));
    assert_good(&lu.execute(&c, &prout(4, 3), &prout_params(0xc, 0)));
    assert_eq!(keys(&lu, &c).1, vec![0xc]);
    assert_eq!(reservation(&lu, &c), Some((0xc, 3)));
}

#[test]
fn read_full_status_and_register_and_move() {
    let (lu, a, b) = two();
    register(&lu, &a, 0xa);
    register(&lu, &b, 0xb);
    assert_good(&lu.execute(&a, &prout(1, 1), &prout_params(0xa, 0)));
    let r = lu.execute(&a, &prin(3, 4096), &[]);
    assert_good(&r);
    let first = &r.data[8..];
    assert_eq!(u64::from_be_bytes(first[0..8].try_into().unwrap()), 0xa);
    assert_eq!(first[12] & 1, 1); // R_HOLDER
    assert_eq!(first[13], 1);
    let tid_len = u32::from_be_bytes(first[20..24].try_into().unwrap()) as usize;
    let tid = &first[24..24 + tid_len];
    assert_eq!(tid[0], 0x45);
    // REGISTER AND MOVE the reservation to b's I_T nexus, unregistering a.
    let b_tid = {
        let name = format!("{}\0", b.initiator_port);
        let mut name = name.into_bytes();
        while name.len() % 4 != 0 {
            name.push(0);
        }
        let mut t = vec![0x45, 0];
        t.extend_from_slice(&(name.len() as u16).to_be_bytes());
        t.extend(name);
        t
    };
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&0xau64.to_be_bytes());
    p[8..16].copy_from_slice(&0xbbu64.to_be_bytes());
    p[17] = 0x02; // UNREG
    p[18..20].copy_from_slice(&1u16.to_be_bytes());
    p[20..24].copy_from_slice(&(b_tid.len() as u32).to_be_bytes());
    p.extend(&b_tid);
    let plen = (p.len() as u32).to_be_bytes();
    let cdb = [0x5f, 7, 1, 0, 0, plen[0], plen[1], plen[2], plen[3], 0];
    assert_good(&lu.execute(&a, &cdb, &p));
    assert_eq!(reservation(&lu, &b), Some((0xbb, 1)));
    assert_eq!(keys(&lu, &b).1, vec![0xbb]);
}

#[test]
fn reserve6() {
    let (lu, a, b) = two();
    assert_good(&lu.execute(&a, &[0x16, 0, 0, 0, 0, 0], &[]));
    assert_good(&lu.execute(&a, &[0x16, 0, 0, 0, 0, 0], &[]));
    assert_conflict(&lu.execute(&b, &[0x16, 0, 0, 0, 0, 0], &[]));
    // A non-holder's RELEASE is a no-op.
    assert_good(&lu.execute(&b, &[0x17, 0, 0, 0, 0, 0], &[]));
    assert_good(&lu.execute(&a, &mode_sense6(0, 0x3f, 255, false), &[]));
    assert_conflict(&lu.execute(&b, &mode_sense6(0, 0x3f, 255, false), &[]));
    assert_conflict(&lu.execute(&b, &read10(0, 1), &[]));
    assert_good(&lu.execute(&b, &inquiry(false, 0, 96), &[]));
    assert_conflict(&lu.execute(&b, &prout(6, 0), &prout_params(0, 1)));
    assert_good(&lu.execute(&a, &[0x17, 0, 0, 0, 0, 0], &[]));
    assert_good(&lu.execute(&b, &[0x16, 0, 0, 0, 0, 0], &[]));
    // Nexus loss releases it; PR registrations stay.
    register(&lu, &b, 0xb);
    lu.nexus_lost(&b);
    assert_good(&lu.execute(&a, &read10(0, 1), &[]));
    assert_eq!(keys(&lu, &a).1, vec![0xb]);
    // LU reset releases it too (and reports the reset to everyone).
    assert_good(&lu.execute(&a, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
    lu.logical_unit_reset(&a);
    assert_check(
        &lu.execute(&b, &tur(), &[]),
        SenseKey::UNIT_ATTENTION,
        AscAscq::BUS_DEVICE_RESET_FUNCTION_OCCURRED,
    );
    assert_good(&lu.execute(&b, &[0x16, 0, 0, 0, 0, 0], &[]));
    // RESERVE(6) conflicts with a persistent reservation.
    assert_good(&lu.execute(&b, &[0x17, 0, 0, 0, 0, 0], &[]));
    assert_good(&lu.execute(&b, &prout(1, 1), &prout_params(0xb, 0)));
    assert_conflict(&lu.execute(&b, &[0x16, 0, 0, 0, 0, 0], &[]));
}
