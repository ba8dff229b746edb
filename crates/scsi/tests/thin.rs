//! Thin provisioning: UNMAP, WRITE SAME (with and without UNMAP), GET LBA STATUS.

mod common;
use common::*;
use scsi::backend::MemoryBackend;
use scsi::{AscAscq, LogicalUnit, LuConfig};
use std::sync::Arc;

fn lba_status(lu: &LogicalUnit, n: &scsi::ItNexus, lba: u64) -> Vec<(u64, u32, u8)> {
    let r = lu.execute(n, &get_lba_status(lba, 8 + 16 * 8), &[]);
    assert_good(&r);
    let len = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, r.data.len());
    r.data[8..]
        .chunks(16)
        .map(|d| {
            (
                u64::from_be_bytes(d[0..8].try_into().unwrap()),
                u32::from_be_bytes(d[8..12].try_into().unwrap()),
                d[12],
            )
        })
        .collect()
}

#[test]
fn write_unmap_get_lba_status() {
    let backend = Arc::new(MemoryBackend::new(BLOCKS * BS as u64));
    let lu = LogicalUnit::new(backend.clone(), LuConfig::default());
    let n = nexus(1);
    ready(&lu, &n);
    // Nothing written: one deallocated extent covering the whole unit.
    assert_eq!(lba_status(&lu, &n, 0), vec![(0, BLOCKS as u32, 1)]);
    let chunk_blocks = (backend.chunk_size() / BS as u64) as u32;
    assert_good(&lu.execute(&n, &write10(0, 256), &vec![b'a'; 256 * BS]));
    let mapped = 256u32.div_ceil(chunk_blocks) * chunk_blocks;
    let st = lba_status(&lu, &n, 0);
    assert_eq!(st[0], (0, mapped, 0));
    assert_eq!(st[1], (u64::from(mapped), BLOCKS as u32 - mapped, 1));
    // Starting in the middle: the first descriptor starts at the requested LBA.
    assert_eq!(lba_status(&lu, &n, 5)[0], (5, mapped - 5, 0));

    // UNMAP of a few blocks reads back as zeros (LBPRZ).
    let p = unmap_params(&[(0, 3), (10, 1)]);
    assert_good(&lu.execute(&n, &unmap_cdb(p.len() as u16), &p));
    let r = lu.execute(&n, &read10(0, 11), &[]).data;
    assert!(r[..3 * BS].iter().all(|&c| c == 0));
    assert!(r[3 * BS..10 * BS].iter().all(|&c| c == b'a'));
    assert!(r[10 * BS..].iter().all(|&c| c == 0));
    // Whole chunks unmapped are deallocated.
    let p = unmap_params(&[(0, mapped)]);
    assert_good(&lu.execute(&n, &unmap_cdb(p.len() as u16), &p));
    assert_eq!(lba_status(&lu, &n, 0)[0].2, 1);
    assert_eq!(backend.allocated_chunks(), 0);

    // Zero-block descriptors, an empty list, and a descriptor at the end are fine.
    let p = unmap_params(&[(BLOCKS, 0), (5, 0)]);
    assert_good(&lu.execute(&n, &unmap_cdb(p.len() as u16), &p));
    let p = unmap_params(&[]);
    assert_good(&lu.execute(&n, &unmap_cdb(p.len() as u16), &p));
    assert_good(&lu.execute(&n, &unmap_cdb(0), &[]));
    // Out of range, too many descriptors, truncated header.
    let p = unmap_params(&[(BLOCKS - 1, 2)]);
    assert_illegal(
        &lu.execute(&n, &unmap_cdb(p.len() as u16), &p),
        AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
    );
    let many: Vec<(u64, u32)> = (0..257).map(|i| (i, 1)).collect();
    let p = unmap_params(&many);
    assert_illegal(
        &lu.execute(&n, &unmap_cdb(p.len() as u16), &p),
        AscAscq::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    assert_illegal(
        &lu.execute(&n, &unmap_cdb(4), &[0; 4]),
        AscAscq::PARAMETER_LIST_LENGTH_ERROR,
    );

    // GET LBA STATUS beyond the end.
    for lba in [BLOCKS, BLOCKS + 1, 1 << 63, u64::MAX] {
        assert_illegal(
            &lu.execute(&n, &get_lba_status(lba, 24), &[]),
            AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );
    }
    assert_eq!(
        lu.execute(&n, &get_lba_status(BLOCKS - 1, 24), &[])
            .data
            .len(),
        24
    );
}

#[test]
fn write_same() {
    let lu = lu();
    let n = nexus(1);
    ready(&lu, &n);
    let ws10 = |lba: u32, blocks: u16, flags: u8| rw10(0x41, lba, blocks, flags);
    let ws16 = |lba: u64, blocks: u32, flags: u8| rw16(0x93, lba, blocks, flags);
    let block: Vec<u8> = (0..BS).map(|i| i as u8).collect();
    assert_good(&lu.execute(&n, &ws10(20, 5, 0), &block));
    let r = lu.execute(&n, &read10(20, 5), &[]).data;
    assert!(r.chunks(BS).all(|c| c == block.as_slice()));
    assert_good(&lu.execute(&n, &ws16(BLOCKS - 3, 3, 0), &block));
    // UNMAP with zero data deallocates; the data reads as zeros.
    assert_good(&lu.execute(&n, &ws16(20, 5, 0x08), &vec![0; BS]));
    assert!(lu
        .execute(&n, &read10(20, 5), &[])
        .data
        .iter()
        .all(|&c| c == 0));
    // NDOB: no data-out at all.
    assert_good(&lu.execute(&n, &ws16(BLOCKS - 3, 3, 0x09), &[]));
    assert!(lu
        .execute(&n, &read16(BLOCKS - 3, 3), &[])
        .data
        .iter()
        .all(|&c| c == 0));
    // Zero blocks means "to the end of the medium".
    assert_good(&lu.execute(&n, &ws16(BLOCKS - 10, 0, 0x08), &vec![0; BS]));
    // ANCHOR is not supported; ANCHOR without UNMAP is invalid anyway.
    assert_illegal(
        &lu.execute(&n, &ws16(0, 1, 0x10), &block),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    assert_illegal(
        &lu.execute(&n, &ws16(0, 1, 0x18), &block),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    // Wrong data-out size.
    assert_illegal(
        &lu.execute(&n, &ws10(0, 1, 0), &block[..BS / 2]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    assert_illegal(
        &lu.execute(&n, &ws10(0, 1, 0), &[block.clone(), block.clone()].concat()),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    // Beyond the end.
    for (lba, n_) in [(BLOCKS, 1), (BLOCKS - 1, 2), (u64::MAX, 1), (1 << 63, 1)] {
        assert_illegal(
            &lu.execute(&n, &ws16(lba, n_, 0), &block),
            AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        );
    }
    // Protection field.
    assert_illegal(
        &lu.execute(&n, &ws16(0, 1, 0x20), &block),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn write_same_unmap_refused_when_thick() {
    let lu = lu_with(LuConfig {
        thin_provisioning: false,
        ..Default::default()
    });
    let n = nexus(1);
    ready(&lu, &n);
    assert_illegal(
        &lu.execute(&n, &rw10(0x41, 0, 1, 0x08), &vec![0; BS]),
        AscAscq::INVALID_FIELD_IN_CDB,
    );
    // GET LBA STATUS: everything mapped.
    let r = lu.execute(&n, &get_lba_status(10, 24), &[]);
    assert_good(&r);
    assert_eq!(&r.data[8..16], &10u64.to_be_bytes());
    assert_eq!(r.data[20], 0);
}

#[test]
fn block_size_4096() {
    let lu = lu_with(LuConfig {
        block_size: 4096,
        ..Default::default()
    });
    let n = nexus(1);
    ready(&lu, &n);
    let r = lu.execute(&n, &read_capacity_16(32), &[]);
    assert_eq!(u32::from_be_bytes(r.data[8..12].try_into().unwrap()), 4096);
    assert_eq!(lu.num_blocks(), BLOCKS * BS as u64 / 4096);
    assert_good(&lu.execute(&n, &write10(1, 1), &vec![9; 4096]));
    assert_eq!(lu.execute(&n, &read10(1, 1), &[]).data, vec![9; 4096]);
    assert_eq!(lu.expected_data_out_len(&write10(0, 2)), Some(8192));
}
