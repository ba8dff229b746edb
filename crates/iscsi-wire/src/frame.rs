//! Framing: whole PDUs out of a byte stream, and PDUs into bytes.
//!
//! A PDU that can be delimited but is wrong in itself (bad data digest, data segment longer
//! than negotiated) comes out as an item, `Err(PduError)`, so the session can answer it with a
//! Reject and go on. Only when the stream can no longer be delimited (bad header digest, an
//! impossible length) does decoding fail with [`FrameError`] and the connection must close.
//! Limits negotiated at login are pushed in with [`FrameDecoder::set_limits`].

use bytes::{Buf, Bytes, BytesMut};

use crate::bhs::{Bhs, BHS_LEN};
use crate::digest::{crc32c, data_digest};
use crate::pad_len;

/// Digests in force and the largest data segment this side accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Our MaxRecvDataSegmentLength. Longer segments are still framed, then reported.
    pub max_recv_data_segment_len: u32,
}

impl Default for FrameLimits {
    /// Login-phase limits: no digests, 8 KiB segments (RFC 7143 §13.12 default).
    fn default() -> Self {
        FrameLimits {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_len: 8192,
        }
    }
}

/// One framed PDU: header, additional header segments and data (without padding or digests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawPdu {
    pub bhs: Bhs,
    pub ahs: Bytes,
    pub data: Bytes,
}

/// A PDU that was delimited but must be answered rather than processed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("data digest mismatch")]
    DataDigest { bhs: Bhs },
    #[error("data segment of {len} bytes exceeds the negotiated {max}")]
    DataSegmentTooLong { bhs: Bhs, len: u32, max: u32 },
}

impl PduError {
    /// The header of the offending PDU (it goes back in the Reject's data segment).
    pub fn bhs(&self) -> &Bhs {
        match self {
            PduError::DataDigest { bhs } | PduError::DataSegmentTooLong { bhs, .. } => bhs,
        }
    }
}

/// The byte stream can no longer be delimited: the connection must be closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("header digest mismatch")]
    HeaderDigest,
}

/// Incremental PDU decoder over a growing buffer.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    limits: FrameLimits,
}

impl FrameDecoder {
    pub fn new(limits: FrameLimits) -> Self {
        FrameDecoder { limits }
    }

    pub fn limits(&self) -> FrameLimits {
        self.limits
    }

    /// Takes effect from the next PDU (RFC 7143 §6.2: digests start after the login response).
    pub fn set_limits(&mut self, limits: FrameLimits) {
        self.limits = limits;
    }

    /// Bytes the next PDU occupies on the wire, once its header is in `buf`.
    pub fn next_pdu_len(&self, buf: &[u8]) -> Option<usize> {
        let bhs: &[u8; BHS_LEN] = buf.get(..BHS_LEN)?.try_into().ok()?;
        let bhs = Bhs(*bhs);
        Some(self.wire_len(&bhs))
    }

    fn wire_len(&self, bhs: &Bhs) -> usize {
        let hd = if self.limits.header_digest { 4 } else { 0 };
        let dsl = bhs.data_segment_len() as usize;
        let data = if dsl > 0 {
            dsl + pad_len(dsl) + if self.limits.data_digest { 4 } else { 0 }
        } else {
            0
        };
        BHS_LEN + bhs.total_ahs_len() + hd + data
    }

    /// Removes one PDU from the front of `buf` if it is complete.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<Result<RawPdu, PduError>>, FrameError> {
        let Some(total) = self.next_pdu_len(buf) else {
            return Ok(None);
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut bhs = Bhs::default();
        bhs.0.copy_from_slice(&buf[..BHS_LEN]);
        let ahs_len = bhs.total_ahs_len();
        if self.limits.header_digest {
            let got = read_le32(&buf[BHS_LEN + ahs_len..]);
            if crc32c(&[&buf[..BHS_LEN + ahs_len]]) != got {
                return Err(FrameError::HeaderDigest);
            }
        }
        let mut pdu = buf.split_to(total);
        pdu.advance(BHS_LEN);
        let ahs = pdu.split_to(ahs_len).freeze();
        if self.limits.header_digest {
            pdu.advance(4);
        }
        let dsl = bhs.data_segment_len();
        let data = pdu.split_to(dsl as usize).freeze();
        if dsl > 0 && self.limits.data_digest {
            let pad = pad_len(dsl as usize);
            let got = read_le32(&pdu[pad..]);
            if crc32c(&[&data, &pdu[..pad]]) != got {
                return Ok(Some(Err(PduError::DataDigest { bhs })));
            }
        }
        if dsl > self.limits.max_recv_data_segment_len {
            let max = self.limits.max_recv_data_segment_len;
            return Ok(Some(Err(PduError::DataSegmentTooLong {
                bhs,
                len: dsl,
                max,
            })));
        }
        Ok(Some(Ok(RawPdu { bhs, ahs, data })))
    }
}

fn read_le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Appends the header part of a PDU (BHS, AHS, header digest) whose data segment is
/// `data_len` bytes long. DataSegmentLength and TotalAHSLength are set here.
pub fn encode_head(
    bhs: &Bhs,
    ahs: &[u8],
    data_len: usize,
    digests: FrameLimits,
    out: &mut Vec<u8>,
) {
    let mut bhs = *bhs;
    bhs.set_data_segment_len(data_len as u32);
    bhs.set_total_ahs_words((ahs.len() / 4) as u8);
    let start = out.len();
    out.extend_from_slice(&bhs.0);
    out.extend_from_slice(ahs);
    if digests.header_digest {
        let d = crc32c(&[&out[start..]]);
        out.extend_from_slice(&d.to_le_bytes());
    }
}

/// Appends what follows a data segment on the wire: padding and the data digest.
pub fn encode_tail(data: &[u8], digests: FrameLimits, out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(&[0u8; 3][..pad_len(data.len())]);
    if digests.data_digest {
        out.extend_from_slice(&data_digest(data).to_le_bytes());
    }
}

/// Appends a whole PDU. `ahs` must be a multiple of 4 bytes (see [`crate::pdu::ahs::encode`]).
pub fn encode_pdu(bhs: &Bhs, ahs: &[u8], data: &[u8], digests: FrameLimits, out: &mut Vec<u8>) {
    encode_head(bhs, ahs, data.len(), digests, out);
    out.extend_from_slice(data);
    encode_tail(data, digests, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::*;
    use proptest::prelude::*;

    fn limits(hd: bool, dd: bool) -> FrameLimits {
        FrameLimits {
            header_digest: hd,
            data_digest: dd,
            max_recv_data_segment_len: 1 << 20,
        }
    }

    #[test]
    fn partial_input_waits() {
        let mut out = Vec::new();
        let h = NopOut {
            itt: 5,
            ..Default::default()
        }
        .to_bhs();
        encode_pdu(&h, &[], b"hello", limits(true, true), &mut out);
        let mut dec = FrameDecoder::new(limits(true, true));
        for cut in 0..out.len() {
            let mut buf = BytesMut::from(&out[..cut]);
            assert_eq!(dec.decode(&mut buf), Ok(None));
        }
        let mut buf = BytesMut::from(&out[..]);
        let pdu = dec.decode(&mut buf).unwrap().unwrap().unwrap();
        assert_eq!(&pdu.data[..], b"hello");
        assert!(buf.is_empty());
    }

    #[test]
    fn corrupted_data_digest_is_an_item() {
        let mut out = Vec::new();
        encode_pdu(
            &NopOut::default().to_bhs(),
            &[],
            b"abcd",
            limits(false, true),
            &mut out,
        );
        out[48] ^= 1;
        let mut buf = BytesMut::from(&out[..]);
        let mut dec = FrameDecoder::new(limits(false, true));
        assert!(matches!(
            dec.decode(&mut buf),
            Ok(Some(Err(PduError::DataDigest { .. })))
        ));
        assert!(
            buf.is_empty(),
            "the bad PDU is consumed so the stream stays in sync"
        );
    }

    #[test]
    fn corrupted_header_digest_loses_framing() {
        let mut out = Vec::new();
        encode_pdu(
            &NopOut::default().to_bhs(),
            &[],
            &[],
            limits(true, false),
            &mut out,
        );
        out[3] ^= 1;
        let mut buf = BytesMut::from(&out[..]);
        assert_eq!(
            FrameDecoder::new(limits(true, false)).decode(&mut buf),
            Err(FrameError::HeaderDigest)
        );
    }

    fn any_header() -> impl Strategy<Value = Bhs> {
        (
            proptest::array::uniform32(any::<u8>()),
            proptest::array::uniform16(any::<u8>()),
        )
            .prop_map(|(a, b)| {
                let mut bhs = Bhs::default();
                bhs.0[..32].copy_from_slice(&a);
                bhs.0[32..].copy_from_slice(&b);
                bhs.0[4] = 0;
                bhs
            })
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), hd: bool, dd: bool) {
            let mut dec = FrameDecoder::new(FrameLimits { header_digest: hd, data_digest: dd, max_recv_data_segment_len: 64 });
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(item)) = dec.decode(&mut buf) {
                if let Ok(pdu) = item {
                    let _ = Header::parse(&pdu.bhs);
                    let _ = ahs::parse(&pdu.ahs);
                }
            }
        }

        #[test]
        fn typed_headers_round_trip(bhs in any_header()) {
            if let Ok(h) = Header::parse(&bhs) {
                let again = Header::parse(&h.to_bhs()).unwrap();
                prop_assert_eq!(h, again);
            }
        }

        #[test]
        fn frames_round_trip(bhs in any_header(), data in proptest::collection::vec(any::<u8>(), 0..300), hd: bool, dd: bool) {
            let lim = limits(hd, dd);
            let mut out = Vec::new();
            encode_pdu(&bhs, &[], &data, lim, &mut out);
            prop_assert_eq!(out.len() % 4, 0);
            let mut buf = BytesMut::from(&out[..]);
            let pdu = FrameDecoder::new(lim).decode(&mut buf).unwrap().unwrap().unwrap();
            prop_assert_eq!(&pdu.data[..], &data[..]);
            prop_assert_eq!(pdu.bhs.opcode(), bhs.opcode());
            prop_assert!(buf.is_empty());
        }
    }
}
