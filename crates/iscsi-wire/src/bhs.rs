//! The Basic Header Segment as a fixed 48-byte array with accessors for the fields every PDU
//! shares (RFC 7143 §11.2.1). Opcode-specific fields are read through the typed headers in
//! [`crate::pdu`], each with its own name, never through a shared "bytes 20..24" accessor.

use crate::codes::Opcode;

pub const BHS_LEN: usize = 48;

/// Field offsets shared by all PDUs.
pub(crate) mod field {
    use core::ops::Range;
    pub const OPCODE: usize = 0;
    pub const FLAGS: usize = 1;
    pub const TOTAL_AHS_LEN: usize = 4;
    pub const DATA_SEGMENT_LEN: Range<usize> = 5..8;
    pub const LUN: Range<usize> = 8..16;
    pub const ITT: Range<usize> = 16..20;
}

/// One Basic Header Segment. Any 48 bytes are a valid `Bhs`: no accessor here can panic.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_LEN])
    }
}

impl core::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Bhs({:?}, itt=0x{:08x}, dsl={})",
            self.opcode(),
            self.itt(),
            self.data_segment_len()
        )
    }
}

impl Bhs {
    pub fn opcode(&self) -> Opcode {
        Opcode(self.0[field::OPCODE] & 0x3f)
    }
    pub fn set_opcode(&mut self, op: Opcode) {
        self.0[field::OPCODE] = (self.0[field::OPCODE] & 0x40) | (op.0 & 0x3f);
    }
    /// The I bit: delivery for immediate processing (initiator PDUs only).
    pub fn immediate(&self) -> bool {
        self.0[field::OPCODE] & 0x40 != 0
    }
    pub fn set_immediate(&mut self, on: bool) {
        self.set_bit(field::OPCODE, 0x40, on)
    }
    pub fn flags(&self) -> u8 {
        self.0[field::FLAGS]
    }
    pub fn set_flags(&mut self, flags: u8) {
        self.0[field::FLAGS] = flags;
    }
    /// The F (final) bit, present in most PDUs.
    pub fn final_bit(&self) -> bool {
        self.0[field::FLAGS] & 0x80 != 0
    }
    /// Length of the additional header segments in bytes (the wire counts 4-byte words).
    pub fn total_ahs_len(&self) -> usize {
        usize::from(self.0[field::TOTAL_AHS_LEN]) * 4
    }
    pub fn set_total_ahs_words(&mut self, words: u8) {
        self.0[field::TOTAL_AHS_LEN] = words;
    }
    pub fn data_segment_len(&self) -> u32 {
        let d = &self.0[field::DATA_SEGMENT_LEN];
        u32::from(d[0]) << 16 | u32::from(d[1]) << 8 | u32::from(d[2])
    }
    /// Sets the 24-bit DataSegmentLength; larger values are truncated, callers check limits.
    pub fn set_data_segment_len(&mut self, len: u32) {
        self.0[5] = (len >> 16) as u8;
        self.0[6] = (len >> 8) as u8;
        self.0[7] = len as u8;
    }
    /// Bytes 8..16 as a raw 8-byte SAM LUN (meaningful only for opcodes that carry a LUN).
    pub fn raw_lun(&self) -> u64 {
        self.u64_at(field::LUN.start)
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(field::ITT.start)
    }

    pub(crate) fn set_bit(&mut self, at: usize, mask: u8, on: bool) {
        if on {
            self.0[at] |= mask;
        } else {
            self.0[at] &= !mask;
        }
    }
    pub(crate) fn bit(&self, at: usize, mask: u8) -> bool {
        self.0[at] & mask != 0
    }
    pub(crate) fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.0[at], self.0[at + 1]])
    }
    pub(crate) fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes([self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3]])
    }
    pub(crate) fn u64_at(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_be_bytes(b)
    }
    pub(crate) fn put_u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
}
