//! Unit attentions, sense formats, mode pages and removable-medium commands.

mod common;
use common::*;
use scsi::{AscAscq, LuConfig, ScsiStatus, Sense, SenseKey};

#[test]
fn unit_attention_order_and_exemptions() {
    let lu = lu();
    let (a, b) = (nexus(1), nexus(2));
    ready(&lu, &a);
    ready(&lu, &b);
    lu.logical_unit_reset(&a);
    lu.capacity_changed();
    // INQUIRY and REPORT LUNS neither report nor clear UAs.
    assert_good(&lu.execute(&a, &inquiry(false, 0, 96), &[]));
    assert_good(&lu.execute(&a, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]));
    // The issuing nexus sees the reset too; UAs come out oldest first.
    assert_check(
        &lu.execute(&a, &read10(0, 1), &[]),
        SenseKey::UNIT_ATTENTION,
        AscAscq::BUS_DEVICE_RESET_FUNCTION_OCCURRED,
    );
    assert_check(
        &lu.execute(&a, &tur(), &[]),
        SenseKey::UNIT_ATTENTION,
        AscAscq::CAPACITY_DATA_HAS_CHANGED,
    );
    assert_good(&lu.execute(&a, &tur(), &[]));
    // REQUEST SENSE reports (and clears) a pending UA as data, with GOOD status.
    let r = lu.execute(&b, &[0x03, 0, 0, 0, 252, 0], &[]);
    assert_good(&r);
    let s = Sense::parse(&r.data).unwrap();
    assert_eq!(
        (s.key, s.asc),
        (
            SenseKey::UNIT_ATTENTION,
            AscAscq::BUS_DEVICE_RESET_FUNCTION_OCCURRED
        )
    );
    assert_check(
        &lu.execute(&b, &tur(), &[]),
        SenseKey::UNIT_ATTENTION,
        AscAscq::CAPACITY_DATA_HAS_CHANGED,
    );
    let r = lu.execute(&b, &[0x03, 1, 0, 0, 252, 0], &[]);
    assert_eq!(r.data[0], 0x72);
    assert_eq!(Sense::parse(&r.data).unwrap().key, SenseKey::NO_SENSE);
    // Target reset uses 29/02.
    lu.target_reset(&b);
    assert_check(
        &lu.execute(&a, &tur(), &[]),
        SenseKey::UNIT_ATTENTION,
        AscAscq::SCSI_BUS_RESET_OCCURRED,
    );
}

#[test]
fn nexus_loss_queues_nothing_for_the_lost_nexus() {
    let lu = lu();
    let (a, b) = (nexus(1), nexus(2));
    ready(&lu, &a);
    ready(&lu, &b);
    lu.nexus_lost(&a);
    // Reinstated with the same identity: no POWER ON, no I_T NEXUS LOSS.
    assert_good(&lu.execute(&a, &tur(), &[]));
    assert_good(&lu.execute(&b, &tur(), &[]));
}

#[test]
fn sense_format_follows_d_sense() {
    let lu = lu();
    let (a, b) = (nexus(1), nexus(2));
    ready(&lu, &a);
    ready(&lu, &b);
    let r = lu.execute(&a, &read16(u64::MAX, 1), &[]);
    assert_eq!(r.sense[0], 0x70);
    // Set D_SENSE through MODE SELECT(6) of the control page.
    let ms = lu.execute(&a, &mode_sense6(0, 0x0a, 255, true), &[]);
    assert_good(&ms);
    let mut page = ms.data[4..].to_vec();
    assert_eq!(page[0], 0x0a);
    page[2] |= 0x04;
    let mut params = vec![0, 0, 0, 0];
    params.extend(&page);
    assert_good(&lu.execute(&a, &mode_select6(false, params.len() as u8), &params));
    let r = lu.execute(&a, &read16(u64::MAX, 1), &[]);
    assert_illegal(&r, AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE);
    assert_eq!(r.sense[0], 0x72);
    // The other nexus is told the mode parameters changed (in descriptor format now).
    let r = lu.execute(&b, &tur(), &[]);
    assert_check(
        &r,
        SenseKey::UNIT_ATTENTION,
        AscAscq::MODE_PARAMETERS_CHANGED,
    );
    assert_eq!(r.sense[0], 0x72);
    assert_good(&lu.execute(&a, &tur(), &[]));
}

#[test]
fn mode_sense_variants() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    let all = lu.execute(&n, &mode_sense6(0, 0x3f, 255, false), &[]);
    assert_good(&all);
    let d = &all.data;
    assert_eq!(usize::from(d[0]) + 1, d.len());
    assert_eq!(d[2] & 0x10, 0x10); // DPOFUA
    assert_eq!(d[3], 8); // block descriptor
    assert_eq!(&d[4..8], &(BLOCKS as u32).to_be_bytes());
    let pages = &d[12..];
    assert_eq!(pages[0], 0x08);
    assert_eq!(pages[2] & 0x04, 0x04); // WCE
    assert_eq!(pages[20], 0x0a);
    // Control page alone matches the one in all pages.
    let ctl = lu.execute(&n, &mode_sense6(0, 0x0a, 255, false), &[]);
    assert_eq!(&ctl.data[12..], &pages[20..32]);
    // Residual: allocation length 4.
    assert_eq!(
        lu.execute(&n, &mode_sense6(0, 0x3f, 4, false), &[])
            .data
            .len(),
        4
    );
    // Changeable values: WCE, D_SENSE, SWP.
    let ch = lu.execute(&n, &mode_sense6(1, 0x3f, 255, true), &[]).data;
    assert_eq!(ch[4 + 2], 0x04);
    assert_eq!(ch[4 + 20 + 2], 0x04);
    assert_eq!(ch[4 + 20 + 4], 0x08);
    // Default and saved work; unknown page or subpage is invalid.
    assert_good(&lu.execute(&n, &mode_sense6(2, 0x08, 255, false), &[]));
    assert_good(&lu.execute(&n, &mode_sense6(3, 0x08, 255, false), &[]));
    assert_illegal(
        &lu.execute(&n, &mode_sense6(0, 0x19, 255, false), &[]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    assert_illegal(
        &lu.execute(&n, &[0x1a, 0, 0x08, 0x05, 255, 0], &[]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    // MODE SENSE(10) with LLBAA gives a long block descriptor.
    let r = lu.execute(&n, &[0x5a, 0x10, 0x3f, 0, 0, 0, 0, 0x01, 0, 0], &[]);
    assert_good(&r);
    assert_eq!(r.data[4] & 1, 1);
    assert_eq!(&r.data[6..8], &[0, 16]);
    assert_eq!(
        u16::from_be_bytes([r.data[0], r.data[1]]) as usize + 2,
        r.data.len()
    );
}

#[test]
fn mode_select_round_trip_and_errors() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    // Clear WCE and save, via MODE SELECT(10).
    let cur = lu
        .execute(&n, &[0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 255, 0], &[])
        .data;
    let mut page = cur[8..].to_vec();
    page[2] &= !0x04;
    let mut params = vec![0u8; 8];
    params.extend(&page);
    let len = params.len() as u8;
    assert_good(&lu.execute(&n, &[0x55, 0x11, 0, 0, 0, 0, 0, 0, len, 0], &params));
    for pc in [0, 3] {
        let d = lu.execute(&n, &mode_sense6(pc, 0x08, 255, true), &[]).data;
        assert_eq!(d[4 + 2] & 0x04, 0, "page control {pc}");
    }
    assert_eq!(
        lu.execute(&n, &mode_sense6(2, 0x08, 255, true), &[]).data[4 + 2] & 0x04,
        0x04
    );
    // Writes still work with the cache off (they are forced to the medium).
    assert_good(&lu.execute(&n, &write10(0, 1), &pattern(1, 1)));
    // Changing a non-changeable bit, an unknown page, or a short list fails.
    let mut bad = params.clone();
    bad[8 + 2] |= 0x01; // RCD
    assert_illegal(
        &lu.execute(&n, &[0x55, 0x10, 0, 0, 0, 0, 0, 0, len, 0], &bad),
        AscAscq::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    let mut bad = params.clone();
    bad[8] = 0x19;
    assert_illegal(
        &lu.execute(&n, &[0x55, 0x10, 0, 0, 0, 0, 0, 0, len, 0], &bad),
        AscAscq::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    assert_illegal(
        &lu.execute(&n, &mode_select6(false, 3), &[0, 0, 0]),
        AscAscq::PARAMETER_LIST_LENGTH_ERROR,
    );
    assert_illegal(
        &lu.execute(&n, &mode_select6(false, 12), &[0; 4]),
        AscAscq::PARAMETER_LIST_LENGTH_ERROR,
    );
    // A block descriptor with our block size is accepted, another is not.
    let mut with_bd = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 2, 0];
    assert_good(&lu.execute(&n, &mode_select6(false, 12), &with_bd));
    with_bd[10] = 4;
    assert_illegal(
        &lu.execute(&n, &mode_select6(false, 12), &with_bd),
        AscAscq::INVALID_FIELD_IN_PARAMETER_LIST,
    );
}

#[test]
fn software_write_protect() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    let set_swp = |on: bool| {
        let d = lu.execute(&n, &mode_sense6(0, 0x0a, 255, true), &[]).data;
        let mut p = vec![0, 0, 0, 0];
        p.extend(&d[4..]);
        p[4 + 4] = if on { p[8] | 0x08 } else { p[8] & !0x08 };
        assert_good(&lu.execute(&n, &mode_select6(false, p.len() as u8), &p));
    };
    set_swp(true);
    assert_eq!(
        lu.execute(&n, &mode_sense6(0, 0x3f, 255, true), &[]).data[2] & 0x80,
        0x80
    );
    assert_good(&lu.execute(&n, &read10(0, 1), &[]));
    assert_check(
        &lu.execute(&n, &write10(0, 1), &pattern(1, 0)),
        SenseKey::DATA_PROTECT,
        AscAscq::SOFTWARE_WRITE_PROTECTED,
    );
    set_swp(false);
    assert_good(&lu.execute(&n, &write10(0, 1), &pattern(1, 0)));
}

#[test]
fn removable_medium() {
    let lu = lu_with(LuConfig {
        removable: true,
        ..Default::default()
    });
    let (a, b) = (nexus(1), nexus(2));
    ready(&lu, &a);
    ready(&lu, &b);
    assert_eq!(lu.execute(&a, &inquiry(false, 0, 96), &[]).data[1], 0x80);
    let ssu = |immed: bool, pc: u8, loej: bool, start: bool| {
        vec![
            0x1b,
            u8::from(immed),
            0,
            0,
            pc << 4 | u8::from(loej) << 1 | u8::from(start),
            0,
        ]
    };
    let prevent = |p: u8| vec![0x1e, 0, 0, 0, p, 0];
    assert_good(&lu.execute(&a, &prevent(1), &[]));
    assert_illegal(
        &lu.execute(&a, &ssu(false, 0, true, false), &[]),
        AscAscq::MEDIUM_REMOVAL_PREVENTED,
    );
    assert_illegal(
        &lu.execute(&b, &ssu(false, 0, true, false), &[]),
        AscAscq::MEDIUM_REMOVAL_PREVENTED,
    );
    assert_good(&lu.execute(&a, &tur(), &[]));
    assert_good(&lu.execute(&a, &prevent(0), &[]));
    // Eject: media commands fail with MEDIUM NOT PRESENT; others still work.
    assert_good(&lu.execute(&a, &ssu(true, 0, true, false), &[]));
    let np =
        |r: &scsi::ScsiResponse| assert_check(r, SenseKey::NOT_READY, AscAscq::MEDIUM_NOT_PRESENT);
    np(&lu.execute(&a, &tur(), &[]));
    np(&lu.execute(&a, &read10(0, 1), &[]));
    np(&lu.execute(&a, &write16(0, 1), &pattern(1, 0)));
    np(&lu.execute(&a, &read_capacity_16(32), &[]));
    np(&lu.execute(&a, &rw10(0x35, 0, 1, 0), &[]));
    assert_good(&lu.execute(&a, &inquiry(false, 0, 96), &[]));
    assert_good(&lu.execute(&a, &mode_sense6(0, 0x3f, 255, false), &[]));
    // Power conditions ignore LOEJ/START; stopping without LOEJ is a no-op.
    for pc in 1..16 {
        assert_good(&lu.execute(&a, &ssu(true, pc, true, false), &[]));
    }
    np(&lu.execute(&a, &tur(), &[]));
    assert_good(&lu.execute(&a, &ssu(false, 0, true, true), &[]));
    assert_good(&lu.execute(&a, &ssu(false, 0, false, false), &[]));
    assert_good(&lu.execute(&a, &tur(), &[]));
    // Prevention is cleared by nexus loss and by LU reset.
    assert_good(&lu.execute(&a, &prevent(1), &[]));
    lu.nexus_lost(&a);
    assert_good(&lu.execute(&b, &ssu(false, 0, true, false), &[]));
    assert_good(&lu.execute(&b, &ssu(false, 0, true, true), &[]));
    assert_good(&lu.execute(&b, &prevent(1), &[]));
    lu.logical_unit_reset(&b);
    let r = lu.execute(&b, &tur(), &[]);
    assert_eq!(r.status, ScsiStatus::CHECK_CONDITION);
    assert_good(&lu.execute(&b, &ssu(false, 0, true, false), &[]));
    assert_illegal(
        &lu.execute(&b, &prevent(2), &[]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
}
