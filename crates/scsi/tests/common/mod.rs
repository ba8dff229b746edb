//! Helpers shared by the integration tests: a unit on a RAM disk, nexuses and CDB builders.
#![allow(dead_code)]

use std::sync::Arc;

use scsi::backend::MemoryBackend;
use scsi::{AscAscq, ItNexus, LogicalUnit, LuConfig, ScsiResponse, ScsiStatus, Sense, SenseKey};

pub const BS: usize = 512;
pub const BLOCKS: u64 = 4096;

pub fn nexus(n: u32) -> ItNexus {
    ItNexus {
        initiator_port: format!("iqn.2024-01.test:init{n},i,0x00023d00000{n}"),
        target_port: "iqn.2024-01.test:target,t,0x0001".into(),
        relative_target_port: 1,
    }
}

pub fn lu_with(config: LuConfig) -> LogicalUnit {
    LogicalUnit::new(Arc::new(MemoryBackend::new(BLOCKS * BS as u64)), config)
}

pub fn lu() -> LogicalUnit {
    lu_with(LuConfig::default())
}

/// A unit whose power-on UA has already been consumed by `n`.
pub fn ready(lu: &LogicalUnit, n: &ItNexus) {
    let r = lu.execute(n, &tur(), &[]);
    assert_eq!(r.status, ScsiStatus::CHECK_CONDITION);
    assert_eq!(
        sense(&r).asc,
        AscAscq::POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED
    );
    assert_good(&lu.execute(n, &tur(), &[]));
}

pub fn sense(r: &ScsiResponse) -> Sense {
    r.parsed_sense().expect("sense data")
}

#[track_caller]
pub fn assert_good(r: &ScsiResponse) {
    assert_eq!(r.status, ScsiStatus::GOOD, "sense: {:?}", r.parsed_sense());
    assert!(r.sense.is_empty());
}

#[track_caller]
pub fn assert_check(r: &ScsiResponse, key: SenseKey, asc: AscAscq) {
    assert_eq!(r.status, ScsiStatus::CHECK_CONDITION);
    let s = sense(r);
    assert_eq!((s.key, s.asc), (key, asc), "{s:?}");
}

#[track_caller]
pub fn assert_illegal(r: &ScsiResponse, asc: AscAscq) {
    assert_check(r, SenseKey::ILLEGAL_REQUEST, asc);
}

#[track_caller]
pub fn assert_conflict(r: &ScsiResponse) {
    assert_eq!(r.status, ScsiStatus::RESERVATION_CONFLICT);
}

pub fn tur() -> Vec<u8> {
    vec![0; 6]
}

pub fn inquiry(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![0x12, u8::from(evpd), page, a[0], a[1], 0]
}

pub fn rw10(opcode: u8, lba: u32, blocks: u16, flags: u8) -> Vec<u8> {
    let l = lba.to_be_bytes();
    let n = blocks.to_be_bytes();
    vec![opcode, flags, l[0], l[1], l[2], l[3], 0, n[0], n[1], 0]
}

pub fn rw12(opcode: u8, lba: u32, blocks: u32, flags: u8) -> Vec<u8> {
    let mut c = vec![opcode, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

pub fn rw16(opcode: u8, lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
    let mut c = vec![opcode, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

pub fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    rw10(0x28, lba, blocks, 0)
}

pub fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    rw10(0x2a, lba, blocks, 0)
}

pub fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    rw16(0x88, lba, blocks, 0)
}

pub fn write16(lba: u64, blocks: u32) -> Vec<u8> {
    rw16(0x8a, lba, blocks, 0)
}

pub fn caw(lba: u64, blocks: u8) -> Vec<u8> {
    let mut c = rw16(0x89, lba, 0, 0);
    c[10..14].fill(0);
    c[13] = blocks;
    c
}

pub fn read_capacity_16(alloc: u32) -> Vec<u8> {
    let mut c = vec![0x9e, 0x10];
    c.extend_from_slice(&[0; 8]);
    c.extend_from_slice(&alloc.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

pub fn get_lba_status(lba: u64, alloc: u32) -> Vec<u8> {
    let mut c = vec![0x9e, 0x12];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&alloc.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

pub fn unmap_cdb(param_len: u16) -> Vec<u8> {
    let p = param_len.to_be_bytes();
    vec![0x42, 0, 0, 0, 0, 0, 0, p[0], p[1], 0]
}

pub fn unmap_params(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    d[0..2].copy_from_slice(&((6 + 16 * ranges.len()) as u16).to_be_bytes());
    d[2..4].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
    for &(lba, n) in ranges {
        d.extend_from_slice(&lba.to_be_bytes());
        d.extend_from_slice(&n.to_be_bytes());
        d.extend_from_slice(&[0; 4]);
    }
    d
}

pub fn mode_sense6(pc: u8, page: u8, alloc: u8, dbd: bool) -> Vec<u8> {
    vec![
        0x1a,
        if dbd { 0x08 } else { 0 },
        pc << 6 | page,
        0,
        alloc,
        0,
    ]
}

pub fn mode_select6(save: bool, len: u8) -> Vec<u8> {
    vec![0x15, 0x10 | u8::from(save), 0, 0, len, 0]
}

pub fn prin(sa: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![0x5e, sa, 0, 0, 0, 0, 0, a[0], a[1], 0]
}

pub fn prout(sa: u8, ty: u8) -> Vec<u8> {
    vec![0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0]
}

pub fn prout_params(key: u64, sa_key: u64) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p
}

pub fn pattern(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * BS)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
