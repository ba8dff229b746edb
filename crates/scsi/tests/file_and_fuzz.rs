//! The file back-end behind a logical unit, and a property test that no input panics.

mod common;
use common::*;
use proptest::prelude::*;
use scsi::backend::{FileBackend, FileOptions};
use scsi::{AscAscq, LogicalUnit, LuConfig, ScsiStatus, Sense};
use std::sync::Arc;

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("scsi-lu-{}-{name}", std::process::id()))
}

#[test]
fn file_backend_lu() {
    let path = temp("lu");
    let len = 8 << 20;
    let backend = FileBackend::open(
        &path,
        FileOptions {
            create_len: Some(len),
            ..Default::default()
        },
    )
    .unwrap();
    let lu = LogicalUnit::new(Arc::new(backend), LuConfig::default());
    assert!(lu.thin_provisioned());
    let n = nexus(1);
    ready(&lu, &n);
    let data = pattern(16, 3);
    assert_good(&lu.execute(&n, &rw10(0x2a, 64, 16, 0x08), &data)); // FUA
    assert_good(&lu.execute(&n, &rw10(0x35, 0, 0, 0), &[]));
    assert_eq!(lu.execute(&n, &read10(64, 16), &[]).data, data);
    // Punch a hole and see it as deallocated and zero.
    let p = unmap_params(&[(64, 16)]);
    assert_good(&lu.execute(&n, &unmap_cdb(p.len() as u16), &p));
    assert!(lu
        .execute(&n, &read10(64, 16), &[])
        .data
        .iter()
        .all(|&b| b == 0));
    let r = lu.execute(&n, &get_lba_status(64, 24), &[]);
    assert_good(&r);
    assert_eq!(&r.data[8..16], &64u64.to_be_bytes());
    drop(lu);
    // Reopened read-only: data persists and writes are refused.
    let ro = FileBackend::open(
        &path,
        FileOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let lu = LogicalUnit::new(Arc::new(ro), LuConfig::default());
    ready(&lu, &n);
    assert_check(
        &lu.execute(&n, &write10(0, 1), &pattern(1, 0)),
        scsi::SenseKey::DATA_PROTECT,
        AscAscq::WRITE_PROTECTED,
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn file_backend_direct_io() {
    let path = temp("direct");
    let opened = FileBackend::open(
        &path,
        FileOptions {
            direct: true,
            create_len: Some(1 << 20),
            ..Default::default()
        },
    );
    let Ok(backend) = opened else {
        // tmpfs refuses O_DIRECT; nothing to test there.
        let _ = std::fs::remove_file(&path);
        return;
    };
    let lu = LogicalUnit::new(Arc::new(backend), LuConfig::default());
    let n = nexus(1);
    ready(&lu, &n);
    let data = pattern(8, 1);
    assert_good(&lu.execute(&n, &write10(8, 8), &data));
    assert_eq!(lu.execute(&n, &read10(8, 8), &[]).data, data);
    std::fs::remove_file(&path).unwrap();
}

fn well_formed(r: &scsi::ScsiResponse) {
    match r.status {
        ScsiStatus::GOOD => assert!(r.sense.is_empty()),
        ScsiStatus::CHECK_CONDITION => {
            assert!(r.data.is_empty());
            assert!(Sense::parse(&r.sense).is_some(), "bad sense {:?}", r.sense);
        }
        ScsiStatus::RESERVATION_CONFLICT => assert!(r.sense.is_empty() && r.data.is_empty()),
        s => panic!("unexpected status {s:?}"),
    }
}

/// Opcodes we implement, so random CDBs reach the command code and not just the opcode check.
const OPCODES: &[u8] = &[
    0x00, 0x03, 0x08, 0x0a, 0x12, 0x15, 0x16, 0x17, 0x1a, 0x1b, 0x1e, 0x25, 0x28, 0x2a, 0x2e, 0x2f,
    0x34, 0x35, 0x37, 0x41, 0x42, 0x55, 0x56, 0x57, 0x5a, 0x5e, 0x5f, 0x88, 0x89, 0x8a, 0x8b, 0x8e,
    0x8f, 0x90, 0x91, 0x93, 0x9c, 0x9e, 0xa0, 0xa3, 0xa8, 0xaa, 0xae, 0xaf, 0xb7,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_commands_never_panic(
        cmds in proptest::collection::vec(
            (any::<prop::sample::Index>(), proptest::collection::vec(any::<u8>(), 0..20),
             proptest::collection::vec(any::<u8>(), 0..2048), 0u32..3, any::<bool>()),
            1..8),
        removable in any::<bool>(),
    ) {
        let lu = lu_with(LuConfig { removable, ..Default::default() });
        for (op, mut cdb, data, who, small_lba) in cmds {
            if !cdb.is_empty() {
                cdb[0] = OPCODES[op.index(OPCODES.len())];
                if small_lba {
                    // Keep LBAs and lengths small so transfers really happen.
                    for b in cdb.iter_mut().skip(2).take(6) { *b = 0; }
                    if cdb.len() > 13 { cdb[9] &= 0x0f; cdb[13] &= 0x07; cdb[10..13].fill(0); }
                    if cdb.len() > 8 && cdb.len() <= 12 { cdb[7] = 0; cdb[8] &= 0x0f; }
                }
            }
            let n = nexus(who);
            let r = lu.execute(&n, &cdb, &data);
            well_formed(&r);
            let _ = lu.expected_data_out_len(&cdb);
            let _ = scsi::cdb::describe(&cdb);
            if who == 2 { lu.logical_unit_reset(&n); }
        }
    }

    #[test]
    fn any_bytes_never_panic(cdb in proptest::collection::vec(any::<u8>(), 0..40),
                             data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let lu = lu();
        let map = {
            let mut m = scsi::LunMap::new();
            m.insert(0, Arc::new(lu_with(LuConfig::default())));
            m
        };
        let n = nexus(1);
        well_formed(&lu.execute(&n, &cdb, &data));
        well_formed(&lu.execute(&n, &cdb, &data));
        well_formed(&map.execute(&n, 1, &cdb, &data));
        let _ = Sense::parse(&cdb);
    }
}
