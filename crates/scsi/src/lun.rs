//! SAM-5 LUN encoding: the 8-byte LUN field as a big-endian u64.
//!
//! LUNs below 256 use peripheral device addressing, LUNs below 16384 flat space addressing.

/// Marker returned by [`decode`] for LUN fields we cannot address (never a valid LUN number).
pub const INVALID: u64 = u64::MAX;

/// The 8-byte LUN field for `lun` (peripheral addressing below 256, flat space below 16384;
/// larger numbers are reduced to 14 bits).
pub fn encode(lun: u64) -> u64 {
    if lun < 256 {
        lun << 48
    } else {
        (0x4000 | (lun & 0x3fff)) << 48
    }
}

/// The LUN number in an 8-byte LUN field, or [`INVALID`] for addressing methods and
/// hierarchical levels we do not serve.
pub fn decode(raw: u64) -> u64 {
    if raw & 0x0000_ffff_ffff_ffff != 0 {
        return INVALID; // second-level LUNs
    }
    let first = (raw >> 48) as u16;
    match first >> 14 {
        0 if first >> 8 == 0 => u64::from(first & 0xff),
        1 => u64::from(first & 0x3fff),
        _ => INVALID,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for lun in [0u64, 1, 255, 256, 1000, 16383] {
            assert_eq!(decode(encode(lun)), lun);
        }
        assert_eq!(encode(0), 0);
        assert_eq!(encode(1).to_be_bytes(), [0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode(300).to_be_bytes(), [0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode(0x0101_0000_0000_0000), INVALID); // bus 1
        assert_eq!(decode(0x0001_0001_0000_0000), INVALID);
        assert_eq!(decode(0xc000_0000_0000_0000), INVALID);
    }
}
