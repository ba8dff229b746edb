//! CRC32C header and data digests (RFC 7143 §11.2.1.6 and RFC 3385).
//!
//! The digest is computed over the segment including its padding, and sent in little-endian
//! byte order as the RFC's examples show.

/// CRC32C of `parts` taken as one byte string.
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p))
}

/// Digest of a data segment plus its zero padding.
pub fn data_digest(data: &[u8]) -> u32 {
    let pad = [0u8; 3];
    crc32c(&[data, &pad[..crate::pad_len(data.len())]])
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3720_vectors() {
        // RFC 3720 Appendix B.4: 32 bytes of zeros give aa 36 91 8a (sent little endian).
        assert_eq!(
            super::crc32c(&[&[0u8; 32]]).to_le_bytes(),
            [0xaa, 0x36, 0x91, 0x8a]
        );
        assert_eq!(
            super::crc32c(&[&[0xffu8; 32]]).to_le_bytes(),
            [0x43, 0xab, 0xa8, 0x62]
        );
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(
            super::crc32c(&[&inc]).to_le_bytes(),
            [0x4e, 0x79, 0xdd, 0x46]
        );
    }
}
