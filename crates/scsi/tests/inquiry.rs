//! INQUIRY, VPD pages, READ CAPACITY, REPORT LUNS, LunMap and REPORT SUPPORTED OPERATION CODES.

mod common;
use common::*;
use scsi::lun;
use scsi::{AscAscq, LuConfig, LunMap, ScsiStatus};
use std::sync::Arc;

#[test]
fn standard_inquiry() {
    let lu = lu();
    let n = nexus(1);
    let r = lu.execute(&n, &inquiry(false, 0, 260), &[]);
    assert_good(&r);
    let d = &r.data;
    assert_eq!(d.len(), 96);
    assert_eq!(d[0], 0); // qualifier 0, direct access
    assert_eq!(d[1] & 0x80, 0); // not removable by default
    assert_eq!(d[2], 6);
    assert_eq!(d[3] & 0x0f, 2);
    assert_eq!(usize::from(d[4]) + 5, d.len());
    assert_eq!(&d[8..16], b"VISCSI  ");
    assert!(d[8..36].iter().all(|&c| (0x20..=0x7e).contains(&c)));
    // SBC-3 version descriptor present (libiscsi's sbc3_support).
    assert!(d[58..74].chunks(2).any(|c| c == [0x04, 0xc0]));
    // Allocation length truncates, and 511 vs 512 return the same data.
    for alloc in 5..256u16 {
        assert_eq!(
            lu.execute(&n, &inquiry(false, 0, alloc), &[]).data.len(),
            usize::from(alloc).min(96)
        );
    }
    assert_eq!(
        lu.execute(&n, &inquiry(false, 0, 511), &[]).data,
        lu.execute(&n, &inquiry(false, 0, 512), &[]).data
    );
    // EVPD clear with a page code is invalid.
    assert_illegal(
        &lu.execute(&n, &inquiry(false, 1, 256), &[]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn inquiry_does_not_report_unit_attention() {
    let lu = lu();
    let n = nexus(1);
    assert_good(&lu.execute(&n, &inquiry(false, 0, 96), &[]));
    // The POWER ON UA is still pending for the next ordinary command.
    let r = lu.execute(&n, &tur(), &[]);
    assert_check(
        &r,
        scsi::SenseKey::UNIT_ATTENTION,
        AscAscq::POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED,
    );
    assert_good(&lu.execute(&n, &tur(), &[]));
}

#[test]
fn vpd_pages() {
    let lu = lu_with(LuConfig {
        serial: "SN123".into(),
        naa_id: 0x1234_5678_9abc_def0,
        ..Default::default()
    });
    let n = nexus(1);
    let r = lu.execute(&n, &inquiry(true, 0, 255), &[]);
    assert_good(&r);
    let pages = r.data[4..].to_vec();
    assert_eq!(pages, vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    for p in pages {
        let r = lu.execute(&n, &inquiry(true, p, 255), &[]);
        assert_good(&r);
        assert_eq!(r.data[1], p);
        assert_eq!(
            usize::from(u16::from_be_bytes([r.data[2], r.data[3]])) + 4,
            r.data.len()
        );
    }
    assert_eq!(
        &lu.execute(&n, &inquiry(true, 0x80, 255), &[]).data[4..],
        b"SN123"
    );
    assert_illegal(
        &lu.execute(&n, &inquiry(true, 0x99, 255), &[]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );

    // Device identification: NAA 6 designator first, stable and derived from naa_id.
    let d83 = lu.execute(&n, &inquiry(true, 0x83, 255), &[]).data;
    assert_eq!(&d83[4..8], &[0x01, 0x03, 0x00, 16]);
    assert_eq!(d83[8] >> 4, 6);
    assert_eq!(&d83[16..24], &0x1234_5678_9abc_def0u64.to_be_bytes());
    let again = lu.execute(&nexus(2), &inquiry(true, 0x83, 255), &[]).data;
    assert_eq!(d83[4..24], again[4..24]);
    // Relative target port designator is present.
    assert!(d83.windows(4).any(|w| w == [0x51, 0x94, 0x00, 0x04]));

    // Block limits: SBC-3 length, unmap limits when thin.
    let b0 = lu.execute(&n, &inquiry(true, 0xb0, 255), &[]).data;
    assert_eq!(b0[3], 0x3c);
    assert_eq!(b0[5], 255);
    assert_ne!(u32::from_be_bytes(b0[20..24].try_into().unwrap()), 0);
    // Logical block provisioning: LBPU, LBPWS, LBPWS10, LBPRZ.
    let b2 = lu.execute(&n, &inquiry(true, 0xb2, 255), &[]).data;
    assert_eq!(b2[5], 0xe4);
}

#[test]
fn read_capacity() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    let r = lu.execute(&n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_good(&r);
    assert_eq!(r.data, [0, 0, 0x0f, 0xff, 0, 0, 2, 0]);
    let r = lu.execute(&n, &read_capacity_16(32), &[]);
    assert_good(&r);
    assert_eq!(
        u64::from_be_bytes(r.data[0..8].try_into().unwrap()),
        BLOCKS - 1
    );
    assert_eq!(r.data[14] & 0xc0, 0xc0); // LBPME, LBPRZ
    for alloc in 0..16 {
        let r = lu.execute(&n, &read_capacity_16(alloc), &[]);
        assert_good(&r);
        assert_eq!(r.data.len(), alloc as usize);
    }
    // PMI clear with a non-zero LBA is invalid.
    assert_illegal(
        &lu.execute(&n, &[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn not_thin_when_disabled() {
    let lu = lu_with(LuConfig {
        thin_provisioning: false,
        ..Default::default()
    });
    let n = nexus(1);
    ready(&lu, &n);
    assert_eq!(
        lu.execute(&n, &read_capacity_16(32), &[]).data[14] & 0x80,
        0
    );
    let b0 = lu.execute(&n, &inquiry(true, 0xb0, 255), &[]).data;
    assert_eq!(&b0[20..28], &[0; 8]);
    let params = unmap_params(&[(0, 1)]);
    assert_illegal(
        &lu.execute(&n, &unmap_cdb(params.len() as u16), &params),
        AscAscq::INVALID_COMMAND_OPERATION_CODE,
    );
}

#[test]
fn report_luns_and_lun_map() {
    let mut map = LunMap::new();
    map.insert(0, Arc::new(lu()));
    map.insert(3, Arc::new(lu()));
    assert_eq!(map.luns().collect::<Vec<_>>(), vec![0, 3]);
    let n = nexus(1);
    let rl = [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    let r = map.execute(&n, 0, &rl, &[]);
    assert_good(&r);
    assert_eq!(&r.data[0..4], &[0, 0, 0, 16]);
    assert_eq!(&r.data[16..24], &lun::encode(3).to_be_bytes());
    // REPORT LUNS to an absent LUN works too; allocation length below 16 does not.
    assert_good(&map.execute(&n, 9, &rl, &[]));
    assert_illegal(
        &map.execute(&n, 9, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], &[]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    // Absent LUN: INQUIRY says qualifier 3, others LOGICAL UNIT NOT SUPPORTED.
    let r = map.execute(&n, 7, &inquiry(false, 0, 96), &[]);
    assert_good(&r);
    assert_eq!(r.data[0], 0x7f);
    assert_illegal(
        &map.execute(&n, 7, &tur(), &[]),
        AscAscq::LOGICAL_UNIT_NOT_SUPPORTED,
    );
    assert_eq!(
        map.execute(&n, 7, &[0x03, 0, 0, 0, 18, 0], &[]).status,
        ScsiStatus::GOOD
    );
}

#[test]
fn report_supported_opcodes() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    let all = |rctd: bool| {
        let r = lu.execute(
            &n,
            &[
                0xa3,
                0x0c,
                u8::from(rctd) << 7,
                0,
                0,
                0,
                0,
                0,
                0xff,
                0xff,
                0,
                0,
            ],
            &[],
        );
        assert_good(&r);
        r.data
    };
    let d = all(false);
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, d.len());
    let descs: Vec<&[u8]> = d[4..].chunks(8).collect();
    assert!(descs.iter().any(|c| c[0] == 0x28));
    for c in &descs {
        let servactv = c[5] & 1 != 0;
        let sa = u16::from_be_bytes([c[2], c[3]]);
        assert!(servactv || sa == 0);
        // One-command query agrees with the listing.
        let options = if servactv { 2 } else { 1 };
        let s = sa.to_be_bytes();
        let r = lu.execute(
            &n,
            &[
                0xa3, 0x0c, options, c[0], s[0], s[1], 0, 0, 0xff, 0xff, 0, 0,
            ],
            &[],
        );
        assert_good(&r);
        assert_eq!(r.data[1] & 7, 3);
        assert_eq!(r.data[4], c[0]);
        // The other option is an invalid field with a field pointer that is not byte 1.
        let wrong = if servactv { 1 } else { 2 };
        let r = lu.execute(
            &n,
            &[0xa3, 0x0c, wrong, c[0], s[0], s[1], 0, 0, 0xff, 0xff, 0, 0],
            &[],
        );
        assert_illegal(&r, AscAscq::INVALID_FIELD_IN_CDB);
        assert_eq!(sense(&r).field_pointer.unwrap().byte, 2);
    }
    // READ(10) advertises DPO and FUA.
    let r = lu.execute(
        &n,
        &[0xa3, 0x0c, 1, 0x28, 0, 0, 0, 0, 0xff, 0xff, 0, 0],
        &[],
    );
    assert_eq!(r.data[5] & 0x18, 0x18);
    // RCTD: every descriptor has a timeouts descriptor of length 0x0a.
    let d = all(true);
    for c in d[4..].chunks(20) {
        assert_eq!(c[5] & 2, 2);
        assert_eq!(&c[8..10], &[0, 0x0a]);
    }
    // Unknown MAINTENANCE IN service action: invalid field pointing at byte 1.
    let r = lu.execute(&n, &[0xa3, 0x1f, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], &[]);
    assert_eq!(sense(&r).field_pointer.unwrap().byte, 1);
    // REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS.
    let r = lu.execute(&n, &[0xa3, 0x0d, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], &[]);
    assert_good(&r);
    assert_eq!(r.data.len(), 4);
    assert_ne!(r.data[0] & 0x08, 0); // LURS
}

#[test]
fn unknown_opcode_and_short_cdb() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    assert_illegal(
        &lu.execute(&n, &[0xc5, 0, 0, 0, 0, 0], &[]),
        AscAscq::INVALID_COMMAND_OPERATION_CODE,
    );
    assert_illegal(
        &lu.execute(&n, &[], &[]),
        AscAscq::INVALID_COMMAND_OPERATION_CODE,
    );
    assert_illegal(
        &lu.execute(&n, &[0x28, 0, 0], &[]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    // NACA set in the control byte.
    assert_illegal(
        &lu.execute(&n, &[0, 0, 0, 0, 0, 0x04], &[]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
}
