//! Sense data (SPC-4 4.5): one representation, two encoders (fixed and descriptor).
//!
//! The control mode page's D_SENSE bit picks the encoder; everything else in the crate builds a
//! [`Sense`] and lets the logical unit decide the format.

use crate::codes::{AscAscq, SenseKey};

/// Sense-key-specific field pointer (SPC-4 4.5.2.4.2): which CDB or parameter-list byte was bad.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// True if the error is in the CDB, false if in the parameter data.
    pub in_cdb: bool,
    /// Byte offset of the offending field.
    pub byte: u16,
    /// Bit of the offending field's most significant bit, if known.
    pub bit: Option<u8>,
}

/// Sense data before encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: AscAscq,
    /// INFORMATION field (e.g. the miscompare offset); `None` leaves VALID clear.
    pub information: Option<u64>,
    /// Sense-key-specific field pointer, for ILLEGAL REQUEST.
    pub field_pointer: Option<FieldPointer>,
}

/// Length of fixed-format sense data as we build it (18 bytes).
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    pub fn new(key: SenseKey, asc: AscAscq) -> Self {
        Sense {
            key,
            asc,
            information: None,
            field_pointer: None,
        }
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at `byte` (and `bit` if given).
    pub fn invalid_field_in_cdb(byte: u16, bit: Option<u8>) -> Self {
        Sense {
            field_pointer: Some(FieldPointer {
                in_cdb: true,
                byte,
                bit,
            }),
            ..Sense::new(SenseKey::ILLEGAL_REQUEST, AscAscq::INVALID_FIELD_IN_CDB)
        }
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST pointing at `byte`.
    pub fn invalid_field_in_param(byte: u16, bit: Option<u8>) -> Self {
        Sense {
            field_pointer: Some(FieldPointer {
                in_cdb: false,
                byte,
                bit,
            }),
            ..Sense::new(
                SenseKey::ILLEGAL_REQUEST,
                AscAscq::INVALID_FIELD_IN_PARAMETER_LIST,
            )
        }
    }

    pub fn illegal(asc: AscAscq) -> Self {
        Sense::new(SenseKey::ILLEGAL_REQUEST, asc)
    }

    pub fn lba_out_of_range() -> Self {
        Sense::illegal(AscAscq::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE)
    }

    pub fn invalid_opcode() -> Self {
        Sense {
            field_pointer: Some(FieldPointer {
                in_cdb: true,
                byte: 0,
                bit: None,
            }),
            ..Sense::illegal(AscAscq::INVALID_COMMAND_OPERATION_CODE)
        }
    }

    pub fn param_list_length_error() -> Self {
        Sense::illegal(AscAscq::PARAMETER_LIST_LENGTH_ERROR)
    }

    pub fn with_information(mut self, info: u64) -> Self {
        self.information = Some(info);
        self
    }

    fn sks_bytes(&self) -> Option<[u8; 3]> {
        let fp = self.field_pointer?;
        let mut b0 = 0x80; // SKSV
        if fp.in_cdb {
            b0 |= 0x40; // C/D
        }
        if let Some(bit) = fp.bit {
            b0 |= 0x08 | (bit & 0x07); // BPV + bit pointer
        }
        let [hi, lo] = fp.byte.to_be_bytes();
        Some([b0, hi, lo])
    }

    /// Fixed format (response code 70h), 18 bytes.
    pub fn encode_fixed(&self) -> Vec<u8> {
        let mut s = vec![0u8; FIXED_SENSE_LEN];
        s[0] = 0x70;
        s[2] = self.key.0 & 0x0f;
        if let Some(info) = self.information {
            // Fixed format holds 32 bits; larger values cannot be VALID.
            if let Ok(v) = u32::try_from(info) {
                s[0] |= 0x80;
                s[3..7].copy_from_slice(&v.to_be_bytes());
            }
        }
        s[7] = (FIXED_SENSE_LEN - 8) as u8;
        s[12] = self.asc.asc();
        s[13] = self.asc.ascq();
        if let Some(sks) = self.sks_bytes() {
            s[15..18].copy_from_slice(&sks);
        }
        s
    }

    /// Descriptor format (response code 72h) with information and sense-key-specific descriptors.
    pub fn encode_descriptor(&self) -> Vec<u8> {
        let mut s = Vec::with_capacity(8 + 12 + 8);
        s.extend_from_slice(&[
            0x72,
            self.key.0 & 0x0f,
            self.asc.asc(),
            self.asc.ascq(),
            0,
            0,
            0,
            0,
        ]);
        if let Some(info) = self.information {
            s.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
            s.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(sks) = self.sks_bytes() {
            s.extend_from_slice(&[0x02, 0x06, 0, 0, sks[0], sks[1], sks[2], 0]);
        }
        s[7] = (s.len() - 8) as u8;
        s
    }

    /// Encodes in descriptor format if `descriptor`, else fixed.
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            self.encode_descriptor()
        } else {
            self.encode_fixed()
        }
    }

    /// Parses fixed or descriptor sense data (for tests and initiators); `None` if malformed.
    pub fn parse(data: &[u8]) -> Option<Sense> {
        let code = data.first()? & 0x7f;
        match code {
            0x70 | 0x71 => {
                if data.len() < 14 {
                    return None;
                }
                let info = (data[0] & 0x80 != 0)
                    .then(|| u64::from(u32::from_be_bytes([data[3], data[4], data[5], data[6]])));
                let fp = data.get(15..18).and_then(parse_sks);
                Some(Sense {
                    key: SenseKey(data[2] & 0x0f),
                    asc: AscAscq(u16::from_be_bytes([data[12], data[13]])),
                    information: info,
                    field_pointer: fp,
                })
            }
            0x72 | 0x73 => {
                if data.len() < 8 {
                    return None;
                }
                let mut sense = Sense::new(
                    SenseKey(data[1] & 0x0f),
                    AscAscq(u16::from_be_bytes([data[2], data[3]])),
                );
                let end = (8 + usize::from(data[7])).min(data.len());
                let mut i = 8;
                while i + 2 <= end {
                    let ty = data[i];
                    let len = usize::from(data[i + 1]);
                    let body = data.get(i + 2..(i + 2 + len).min(end))?;
                    match ty {
                        0x00 if body.len() >= 10 && body[0] & 0x80 != 0 => {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(&body[2..10]);
                            sense.information = Some(u64::from_be_bytes(b));
                        }
                        0x02 if body.len() >= 5 => sense.field_pointer = parse_sks(&body[2..5]),
                        _ => {}
                    }
                    i += 2 + len;
                }
                Some(sense)
            }
            _ => None,
        }
    }
}

fn parse_sks(b: &[u8]) -> Option<FieldPointer> {
    if b.len() < 3 || b[0] & 0x80 == 0 {
        return None;
    }
    Some(FieldPointer {
        in_cdb: b[0] & 0x40 != 0,
        byte: u16::from_be_bytes([b[1], b[2]]),
        bit: (b[0] & 0x08 != 0).then_some(b[0] & 0x07),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_round_trip() {
        let s = Sense::invalid_field_in_cdb(2, Some(7)).with_information(0x1234);
        let enc = s.encode_fixed();
        assert_eq!(enc.len(), 18);
        assert_eq!(enc[0], 0xf0);
        assert_eq!(enc[2], 5);
        assert_eq!(&enc[12..14], &[0x24, 0x00]);
        assert_eq!(&enc[15..18], &[0xcf, 0x00, 0x02]);
        assert_eq!(Sense::parse(&enc), Some(s));
    }

    #[test]
    fn descriptor_round_trip() {
        let s = Sense::new(
            SenseKey::MISCOMPARE,
            AscAscq::MISCOMPARE_DURING_VERIFY_OPERATION,
        )
        .with_information(0x1_0000_0001);
        let enc = s.encode_descriptor();
        assert_eq!(enc[0], 0x72);
        assert_eq!(usize::from(enc[7]) + 8, enc.len());
        assert_eq!(Sense::parse(&enc), Some(s.clone()));
        // A 33-bit value cannot be VALID in fixed format.
        assert_eq!(s.encode_fixed()[0], 0x70);
    }
}
