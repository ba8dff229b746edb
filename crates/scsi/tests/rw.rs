//! READ/WRITE/VERIFY/WRITE AND VERIFY/COMPARE AND WRITE/ORWRITE/WRITE ATOMIC and friends.

mod common;
use common::*;
use scsi::{AscAscq, LuConfig, SenseKey};
use std::sync::Arc;

#[test]
fn write_then_read_all_sizes() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    let data = pattern(4, 1);
    assert_good(&lu.execute(&n, &[0x0a, 0, 0, 10, 4, 0], &data)); // WRITE(6)
    assert_eq!(lu.execute(&n, &[0x08, 0, 0, 10, 4, 0], &[]).data, data);
    assert_eq!(lu.execute(&n, &read10(10, 4), &[]).data, data);
    assert_eq!(lu.execute(&n, &rw12(0xa8, 10, 4, 0), &[]).data, data);
    assert_eq!(lu.execute(&n, &read16(10, 4), &[]).data, data);
    let d2 = pattern(2, 7);
    assert_good(&lu.execute(&n, &rw12(0xaa, 100, 2, 0x08), &d2)); // WRITE(12) FUA
    assert_good(&lu.execute(&n, &write16(200, 2), &d2));
    assert_eq!(lu.execute(&n, &read16(100, 2), &[]).data, d2);
    assert_eq!(lu.execute(&n, &read16(200, 2), &[]).data, d2);
    // READ(6) with length 0 transfers 256 blocks.
    assert_eq!(
        lu.execute(&n, &[0x08, 0, 0, 0, 0, 0], &[]).data.len(),
        256 * BS
    );
    // Zero blocks is fine; DPO/FUA accepted.
    assert_good(&lu.execute(&n, &read10(0, 0), &[]));
    assert_good(&lu.execute(&n, &rw10(0x28, 0, 1, 0x18), &[]));
    assert_good(&lu.execute(&n, &rw10(0x2a, 0, 1, 0x18), &pattern(1, 3)));
}

#[test]
fn lba_out_of_range() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    let last = BLOCKS as u32 - 1;
    assert_good(&lu.execute(&n, &read10(last, 1), &[]));
    for cdb in [
        read10(last, 2),
        read10(last + 2, 0),
        read10(u32::MAX, 1),
        read16(u64::MAX, 1),
        read16(1 << 63, 1),
    ] {
        assert_illegal(
            &lu.execute(&n, &cdb, &[]),
            AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );
    }
    assert_illegal(
        &lu.execute(&n, &write10(last, 2), &pattern(2, 0)),
        AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
    );
    assert_illegal(
        &lu.execute(&n, &rw10(0x2f, last, 2, 0), &[]),
        AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
    );
    // READ(6) LBA is 21 bits.
    assert_illegal(
        &lu.execute(&n, &[0x08, 0x1f, 0xff, 0xff, 1, 0], &[]),
        AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
    );
}

#[test]
fn protection_fields_rejected() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    for p in 1..8u8 {
        assert_illegal(
            &lu.execute(&n, &rw10(0x28, 0, 1, p << 5), &[]),
            AscAscq::INVALID_FIELD_IN_CDB,
        );
        assert_illegal(
            &lu.execute(&n, &rw10(0x2a, 0, 1, p << 5), &pattern(1, 0)),
            AscAscq::INVALID_FIELD_IN_CDB,
        );
        assert_illegal(
            &lu.execute(&n, &rw10(0x2f, 0, 1, p << 5 | 2), &pattern(1, 0)),
            AscAscq::INVALID_FIELD_IN_CDB,
        );
    }
    let r = lu.execute(&n, &rw10(0x28, 0, 1, 0x20), &[]);
    let fp = sense(&r).field_pointer.unwrap();
    assert!(fp.in_cdb);
    assert_eq!((fp.byte, fp.bit), (1, Some(7)));
}

#[test]
fn short_and_long_data_out() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    let a = vec![b'a'; 2 * BS];
    assert_good(&lu.execute(&n, &write10(0, 2), &a));
    // Two blocks asked, one sent: the first is written, the second untouched.
    assert_good(&lu.execute(&n, &write10(0, 2), &vec![b'b'; BS]));
    let r = lu.execute(&n, &read10(0, 2), &[]).data;
    assert!(r[..BS].iter().all(|&c| c == b'b'));
    assert!(r[BS..].iter().all(|&c| c == b'a'));
    // No data at all, or a partial block: nothing written, still GOOD.
    assert_good(&lu.execute(&n, &write10(0, 1), &[]));
    assert_good(&lu.execute(&n, &write10(0, 1), &[b'c'; 200]));
    assert_eq!(lu.execute(&n, &read10(0, 1), &[]).data[0], b'b');
    // More data than asked: the extra is ignored.
    assert_good(&lu.execute(&n, &write10(0, 1), &vec![b'd'; 10000]));
    assert_eq!(lu.execute(&n, &read10(1, 1), &[]).data[0], b'a');
}

#[test]
fn verify_and_miscompare() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    let data = pattern(8, 5);
    assert_good(&lu.execute(&n, &write10(16, 8), &data));
    assert_good(&lu.execute(&n, &rw10(0x2f, 16, 8, 0x02), &data)); // BYTCHK=1
    assert_good(&lu.execute(&n, &rw10(0x2f, 16, 8, 0x00), &[])); // medium verification
    assert_good(&lu.execute(&n, &rw16(0x8f, 16, 8, 0x12), &data)); // DPO
    let mut bad = data.clone();
    bad[1234] ^= b'X';
    let r = lu.execute(&n, &rw10(0x2f, 16, 8, 0x02), &bad);
    assert_check(
        &r,
        SenseKey::MISCOMPARE,
        AscAscq::MISCOMPARE_DURING_VERIFY_OPERATION,
    );
    assert_eq!(sense(&r).information, Some(1234));
    // BYTCHK=0 ignores data; BYTCHK=2 is reserved; BYTCHK=3 compares one block against each.
    assert_good(&lu.execute(&n, &rw12(0xaf, 16, 8, 0), &[]));
    assert_illegal(
        &lu.execute(&n, &rw10(0x2f, 16, 1, 0x04), &data[..BS]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    assert_good(&lu.execute(&n, &write10(40, 2), &vec![7u8; 2 * BS]));
    assert_good(&lu.execute(&n, &rw10(0x2f, 40, 2, 0x06), &[7u8; BS]));
    let r = lu.execute(&n, &rw10(0x2f, 39, 3, 0x06), &[7u8; BS]);
    assert_check(
        &r,
        SenseKey::MISCOMPARE,
        AscAscq::MISCOMPARE_DURING_VERIFY_OPERATION,
    );
}

#[test]
fn write_and_verify() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    let data = pattern(3, 9);
    assert_good(&lu.execute(&n, &rw10(0x2e, 5, 3, 0x02), &data));
    assert_good(&lu.execute(&n, &rw12(0xae, 50, 3, 0x10), &data));
    assert_good(&lu.execute(&n, &rw16(0x8e, 500, 3, 0), &data));
    for lba in [5, 50, 500] {
        assert_eq!(lu.execute(&n, &read16(lba, 3), &[]).data, data);
    }
}

#[test]
fn compare_and_write() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    let a = vec![b'A'; 4 * BS];
    assert_good(&lu.execute(&n, &write16(0, 4), &a));
    let mut buf = a.clone();
    buf.extend(vec![b'B'; 4 * BS]);
    assert_good(&lu.execute(&n, &caw(0, 4), &buf));
    assert!(lu
        .execute(&n, &read16(0, 4), &[])
        .data
        .iter()
        .all(|&c| c == b'B'));
    // Miscompare: INFORMATION holds the offset, nothing is written.
    let mut buf = vec![b'B'; 4 * BS];
    buf[4 * BS - 27] = b'C';
    buf.extend(vec![b'Z'; 4 * BS]);
    let r = lu.execute(&n, &caw(0, 4), &buf);
    assert_check(
        &r,
        SenseKey::MISCOMPARE,
        AscAscq::MISCOMPARE_DURING_VERIFY_OPERATION,
    );
    assert_eq!(sense(&r).information, Some(4 * BS as u64 - 27));
    assert!(lu
        .execute(&n, &read16(0, 4), &[])
        .data
        .iter()
        .all(|&c| c == b'B'));
    // Data-Out size disagreeing with the CDB.
    assert_illegal(
        &lu.execute(&n, &caw(0, 1), &vec![0; 4 * BS]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    assert_illegal(
        &lu.execute(&n, &caw(0, 0), &vec![0; 512 * BS]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    assert_good(&lu.execute(&n, &caw(0, 0), &[]));
    assert_illegal(
        &lu.execute(&n, &caw(BLOCKS, 1), &vec![0; 2 * BS]),
        AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
    );
}

/// Two threads race COMPARE AND WRITE on one block against a writer of the same block; each
/// CAW increments a counter in the block, so lost updates would show.
#[test]
fn compare_and_write_is_atomic() {
    let lu = Arc::new(lu());
    let counter_block = |v: u64| {
        let mut b = vec![0u8; BS];
        b[..8].copy_from_slice(&v.to_le_bytes());
        b
    };
    let n0 = nexus(9);
    ready(&lu, &n0);
    assert_good(&lu.execute(&n0, &write16(7, 1), &counter_block(0)));
    let per_thread = 200;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let lu = lu.clone();
            std::thread::spawn(move || {
                let n = nexus(t);
                let _ = lu.execute(&n, &tur(), &[]);
                let mut done = 0;
                while done < per_thread {
                    let cur = lu.execute(&n, &read16(7, 1), &[]).data;
                    let v = u64::from_le_bytes(cur[..8].try_into().unwrap());
                    let mut buf = cur.clone();
                    buf.extend(counter_block(v + 1));
                    let r = lu.execute(&n, &caw(7, 1), &buf);
                    if r.status == scsi::ScsiStatus::GOOD {
                        done += 1;
                    } else {
                        assert_eq!(sense(&r).key, SenseKey::MISCOMPARE);
                    }
                    // Plain writes elsewhere in the same stripe keep going.
                    assert_good(&lu.execute(&n, &write16(8 + u64::from(t), 1), &counter_block(0)));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let v = lu.execute(&n0, &read16(7, 1), &[]).data;
    assert_eq!(
        u64::from_le_bytes(v[..8].try_into().unwrap()),
        4 * per_thread
    );
}

#[test]
fn orwrite_and_write_atomic() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    assert_good(&lu.execute(&n, &write16(3, 2), &vec![0xa5; 2 * BS]));
    assert_good(&lu.execute(&n, &rw16(0x8b, 3, 2, 0), &vec![0x5a; 2 * BS]));
    assert!(lu
        .execute(&n, &read16(3, 2), &[])
        .data
        .iter()
        .all(|&c| c == 0xff));
    let mut wa = vec![0x9c, 0];
    wa.extend_from_slice(&9u64.to_be_bytes());
    wa.extend_from_slice(&[0, 0, 0, 2, 0, 0]);
    assert_good(&lu.execute(&n, &wa, &vec![3u8; 2 * BS]));
    assert!(lu
        .execute(&n, &read16(9, 2), &[])
        .data
        .iter()
        .all(|&c| c == 3));
    wa[11] = 1; // atomic boundary
    assert_illegal(
        &lu.execute(&n, &wa, &vec![3u8; 2 * BS]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn prefetch_sync_and_transfer_limit() {
    let lu = lu_with(LuConfig {
        max_transfer_bytes: 64 * 1024,
        ..Default::default()
    });
    let n = nexus(1);
    ready(&lu, &n);
    assert_good(&lu.execute(&n, &rw10(0x34, 0, 16, 0x02), &[]));
    assert_good(&lu.execute(&n, &rw16(0x90, 0, 16, 0), &[]));
    assert_illegal(
        &lu.execute(&n, &rw10(0x34, BLOCKS as u32, 1, 0), &[]),
        AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
    );
    assert_good(&lu.execute(&n, &rw10(0x35, 0, 0, 0), &[]));
    assert_good(&lu.execute(&n, &rw16(0x91, 0, 0, 0), &[]));
    assert_illegal(
        &lu.execute(&n, &rw16(0x91, BLOCKS + 1, 0, 0), &[]),
        AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
    );
    assert_good(&lu.execute(&n, &read10(0, 128), &[]));
    assert_illegal(
        &lu.execute(&n, &read10(0, 129), &[]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn read_only_backend() {
    let backend = scsi::backend::ReadOnly(scsi::backend::MemoryBackend::new(BLOCKS * BS as u64));
    let lu = scsi::LogicalUnit::new(Arc::new(backend), LuConfig::default());
    let n = nexus(1);
    ready(&lu, &n);
    assert!(!lu.thin_provisioned());
    let ms = lu.execute(&n, &mode_sense6(0, 0x3f, 255, false), &[]);
    assert_eq!(ms.data[2] & 0x80, 0x80);
    assert_good(&lu.execute(&n, &read10(0, 1), &[]));
    let prot =
        |r: &scsi::ScsiResponse| assert_check(r, SenseKey::DATA_PROTECT, AscAscq::WRITE_PROTECTED);
    prot(&lu.execute(&n, &write10(0, 1), &pattern(1, 0)));
    prot(&lu.execute(&n, &write16(0, 1), &pattern(1, 0)));
    prot(&lu.execute(&n, &rw10(0x2e, 0, 1, 2), &pattern(1, 0)));
    prot(&lu.execute(&n, &rw10(0x41, 0, 1, 0), &pattern(1, 0)));
    prot(&lu.execute(&n, &caw(0, 1), &vec![0; 2 * BS]));
    prot(&lu.execute(&n, &rw16(0x8b, 0, 1, 0), &pattern(1, 0)));
}

#[test]
fn expected_data_out_len() {
    let lu = lu();
    assert_eq!(lu.expected_data_out_len(&write10(0, 3)), Some(3 * BS));
    assert_eq!(
        lu.expected_data_out_len(&[0x0a, 0, 0, 0, 0, 0]),
        Some(256 * BS)
    );
    assert_eq!(lu.expected_data_out_len(&caw(0, 2)), Some(4 * BS));
    assert_eq!(lu.expected_data_out_len(&rw16(0x93, 0, 8, 0x01)), Some(0));
    assert_eq!(lu.expected_data_out_len(&rw10(0x41, 0, 8, 0)), Some(BS));
    assert_eq!(lu.expected_data_out_len(&rw10(0x2f, 0, 8, 0)), None);
    assert_eq!(lu.expected_data_out_len(&rw10(0x2f, 0, 8, 2)), Some(8 * BS));
    assert_eq!(lu.expected_data_out_len(&prout(0, 0)), Some(24));
    assert_eq!(lu.expected_data_out_len(&read10(0, 3)), None);
    assert_eq!(lu.expected_data_out_len(&[]), None);
    assert_eq!(lu.expected_data_out_len(&[0x2a]), Some(0));
}
