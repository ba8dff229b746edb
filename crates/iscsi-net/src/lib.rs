//! tokio driver for iSCSI byte streams: reads framed PDUs and writes them back, batched.
//!
//! This crate moves bytes and nothing else: it frames with `iscsi-wire`, never interprets a
//! PDU and keeps no protocol state beyond the negotiated limits pushed into it. Payload is
//! never copied on the way out: headers are encoded into a scratch buffer and the data
//! segments are handed to `write_vectored` as they are.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use iscsi_wire::frame::{encode_head, encode_tail};
use iscsi_wire::{Bhs, FrameDecoder, FrameError, FrameLimits, PduError, RawPdu, BHS_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What reading produced: a PDU, a PDU to answer with a Reject, or the end of the stream.
pub type ReadItem = Option<Result<RawPdu, PduError>>;

/// Room a read between small PDUs is given (the receive buffer grows by this much at a time).
const MIN_READ: usize = 64 * 1024;
/// About how much room reads get for PDUs of a predicted length (a whole number of them).
const PREDICTED_BYTES: usize = 1 << 20;

/// Reads PDUs from a byte stream.
///
/// PDUs are split off the front of one receive buffer without a copy, so their data segments
/// keep the buffer's memory alive for as long as the caller holds them (the initiator holds
/// Data-In until its read completes). Such a buffer cannot be reused: the next read goes into
/// a new allocation, and the part of a PDU already read into the old one is copied over.
/// Large PDUs are therefore read so that they rarely straddle two allocations:
/// - inside a PDU a read never goes past its end (the framer reserves exactly the rest);
/// - between PDUs, after two large PDUs of the same length (the Data-In of large reads), the
///   buffer gets room for a whole number of such PDUs (about `PREDICTED_BYTES`): an
///   allocation per few PDUs, reads as large as the socket allows, no copy;
/// - between PDUs of differing lengths where one was large, if the buffer cannot be reused
///   (its data is still held), the read takes the next basic header alone and the rest of
///   the PDU gets an allocation of its own size: one more small read, no copy;
/// - between small PDUs, reads get `MIN_READ` bytes of room and take as many PDUs as came.
pub struct PduReader<R> {
    inner: R,
    buf: BytesMut,
    decoder: FrameDecoder,
    /// Wire lengths of the last PDU framed and of the one before it.
    last: usize,
    before_last: usize,
}

impl<R: AsyncRead + Unpin> PduReader<R> {
    pub fn new(inner: R) -> Self {
        PduReader {
            inner,
            buf: BytesMut::with_capacity(MIN_READ),
            decoder: FrameDecoder::default(),
            last: 0,
            before_last: 0,
        }
    }

    pub fn set_limits(&mut self, limits: FrameLimits) {
        self.decoder.set_limits(limits);
    }

    /// The byte stream read from.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// A PDU already in the buffer, without waiting for the socket.
    pub fn try_next(&mut self) -> Result<ReadItem, io::Error> {
        let before = self.buf.len();
        let item = self.decoder.decode(&mut self.buf).map_err(framing_lost)?;
        if item.is_some() {
            self.before_last = self.last;
            self.last = before - self.buf.len();
        }
        Ok(item)
    }

    /// Waits for the next PDU. `Ok(None)` is a clean end of stream between PDUs.
    pub async fn next(&mut self) -> Result<ReadItem, io::Error> {
        loop {
            if let Some(item) = self.try_next()? {
                return Ok(Some(item));
            }
            let limit = self.make_room();
            let n = if let Some(limit) = limit {
                (&mut self.inner)
                    .take(limit)
                    .read_buf(&mut self.buf)
                    .await?
            } else {
                self.inner.read_buf(&mut self.buf).await?
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a PDU",
                    ))
                };
            }
        }
    }

    /// Makes room in the buffer for the next read; returns the most it may read (None: as
    /// much as fits).
    fn make_room(&mut self) -> Option<u64> {
        let len = self.buf.len();
        let spare = self.buf.capacity() - len;
        if self.decoder.next_pdu_len(&self.buf).is_some() {
            // Inside a PDU: the framer has reserved room for exactly the rest of it.
            return None;
        }
        // Between PDUs, or inside the basic header of the next one.
        let large = self.last.max(self.before_last);
        if large <= MIN_READ {
            if spare < 16 * 1024 {
                self.buf.reserve(MIN_READ);
            }
            return None;
        }
        if self.last == self.before_last {
            // More PDUs like the last two, probably: room for a whole number of them.
            let room = self.last * PREDICTED_BYTES.div_ceil(self.last);
            if spare < self.last - len {
                self.buf.reserve(room - len);
            }
            return None;
        }
        if len == 0 && self.buf.try_reclaim(large) {
            // Nobody holds on to this buffer's data, or it has room for a large PDU.
            return None;
        }
        // The data is being kept and the next PDU's size is anyone's guess: read its basic
        // header alone, and the framer gives the rest an allocation of the right size.
        let header = BHS_LEN - len;
        if len == 0 {
            self.buf = BytesMut::with_capacity(BHS_LEN);
        } else if spare < header {
            self.buf.reserve(header);
        }
        Some(header as u64)
    }
}

fn framing_lost(e: FrameError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Writes `segments` front first with vectored writes (64 at a time), taking written bytes
/// off the queue and off `queued` as they go, so that a cancelled call leaves exactly what is
/// unwritten for the next one. Does not flush `io`.
pub async fn write_segments<W: AsyncWrite + Unpin>(
    io: &mut W,
    segments: &mut VecDeque<Bytes>,
    queued: &mut usize,
) -> io::Result<()> {
    while !segments.is_empty() {
        let slices: Vec<IoSlice<'_>> = segments.iter().take(64).map(|b| IoSlice::new(b)).collect();
        let mut n = io.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *queued = queued.saturating_sub(n);
        while n > 0 {
            let Some(seg) = segments.front_mut() else {
                break;
            };
            if n >= seg.len() {
                n -= seg.len();
                segments.pop_front();
            } else {
                seg.advance(n);
                n = 0;
            }
        }
    }
    *queued = 0;
    Ok(())
}

/// Collects PDUs and writes them in one vectored write per flush.
pub struct PduWriter<W> {
    inner: W,
    limits: FrameLimits,
    scratch: BytesMut,
    /// Segments not yet written, front first. Written bytes leave at once, so an interrupted
    /// flush resumes where it stopped.
    segments: VecDeque<Bytes>,
    queued: usize,
}

impl<W: AsyncWrite + Unpin> PduWriter<W> {
    pub fn new(inner: W) -> Self {
        PduWriter {
            inner,
            limits: FrameLimits::default(),
            scratch: BytesMut::new(),
            segments: VecDeque::new(),
            queued: 0,
        }
    }

    /// Digests for PDUs queued from now on.
    pub fn set_limits(&mut self, limits: FrameLimits) {
        self.limits = limits;
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Queues one PDU: `ahs` is its additional header segments (a multiple of 4 bytes, usually
    /// empty), copied with the header; `data` is written as it is, without a copy when large.
    pub fn queue(&mut self, bhs: &Bhs, ahs: &[u8], data: Bytes) {
        debug_assert_eq!(ahs.len() % 4, 0, "AHS must be padded to 4 bytes");
        let mut head = Vec::with_capacity(56 + ahs.len());
        encode_head(bhs, ahs, data.len(), self.limits, &mut head);
        self.scratch.extend_from_slice(&head);
        if data.len() <= 1024 {
            // Small segments are cheaper to copy than to give their own iovec.
            self.scratch.extend_from_slice(&data);
            let mut tail = Vec::new();
            encode_tail(&data, self.limits, &mut tail);
            self.scratch.extend_from_slice(&tail);
            self.queued += data.len() + tail.len();
        } else {
            let mut tail = Vec::with_capacity(8);
            encode_tail(&data, self.limits, &mut tail);
            self.segments.push_back(self.scratch.split().freeze());
            self.queued += data.len() + tail.len();
            self.segments.push_back(data);
            self.scratch.extend_from_slice(&tail);
        }
        self.queued += head.len();
    }

    /// Writes everything queued. Cancel-safe: if the future is dropped, what was not written
    /// stays queued and the next `flush` continues with it.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.scratch.is_empty() {
            self.segments.push_back(self.scratch.split().freeze());
        }
        write_segments(&mut self.inner, &mut self.segments, &mut self.queued).await?;
        self.queued = 0;
        self.inner.flush().await
    }

    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iscsi_wire::pdu::ahs;
    use iscsi_wire::{DataIn, Header, ScsiCommand, RESERVED_TAG};
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    /// A byte stream handing out `sizes[i % len]` bytes (at most) on the i-th read.
    struct Chunked {
        bytes: Vec<u8>,
        at: usize,
        sizes: Vec<usize>,
        reads: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let want = self.sizes[self.reads % self.sizes.len()];
            let n = buf.remaining().min(want).min(self.bytes.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.bytes[at..at + n]);
            self.at += n;
            self.reads += 1;
            Poll::Ready(Ok(()))
        }
    }

    /// PDUs of all sizes, read in chunks of all sizes, arrive whole and in order whatever the
    /// reader's choice of room and read limits, also with their data kept.
    #[tokio::test]
    async fn mixed_pdus_arrive_intact_through_any_chunking() {
        let lens = [
            256 * 1024,
            256 * 1024,
            0,
            4096,
            256 * 1024,
            100_000,
            256 * 1024,
            256 * 1024,
            256 * 1024,
            1,
            70_000,
            70_000,
            3,
            256 * 1024,
        ];
        for digests in [false, true] {
            let limits = FrameLimits {
                header_digest: digests,
                data_digest: digests,
                max_recv_data_segment_len: 256 * 1024,
            };
            let mut wire = Vec::new();
            for (sn, &len) in lens.iter().enumerate() {
                let d = DataIn {
                    itt: 1,
                    ttt: RESERVED_TAG,
                    data_sn: sn as u32,
                    ..Default::default()
                };
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + sn) as u8).collect();
                iscsi_wire::encode_pdu(&d.to_bhs(), &[], &data, limits, &mut wire);
            }
            for sizes in [
                vec![usize::MAX],
                vec![1],
                vec![7, 48, 1000],
                vec![47, 65_536, 3],
                vec![300_000, 5],
            ] {
                let mut reader = PduReader::new(Chunked {
                    bytes: wire.clone(),
                    at: 0,
                    sizes,
                    reads: 0,
                });
                reader.set_limits(limits);
                let mut kept = Vec::new();
                while let Some(item) = reader.next().await.unwrap() {
                    kept.push(item.unwrap());
                }
                assert_eq!(kept.len(), lens.len());
                for (sn, pdu) in kept.iter().enumerate() {
                    let Ok(Header::DataIn(d)) = Header::parse(&pdu.bhs) else {
                        panic!("PDU {sn} is not a Data-In")
                    };
                    assert_eq!(d.data_sn, sn as u32);
                    assert_eq!(pdu.data.len(), lens[sn]);
                    assert!(pdu
                        .data
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == (i * 7 + sn) as u8));
                }
            }
        }
    }

    /// A queued AHS goes out between the header and the data, counted in TotalAHSLength and
    /// covered by the header digest.
    #[tokio::test]
    async fn queue_writes_the_ahs() {
        let limits = FrameLimits {
            header_digest: true,
            data_digest: true,
            max_recv_data_segment_len: 1 << 20,
        };
        let mut area = Vec::new();
        ahs::encode(ahs::EXTENDED_CDB, &[0, 0xaa, 0xbb, 0xcc], &mut area);
        ahs::encode(ahs::BIDI_READ_DATA_LENGTH, &[0, 0, 0, 2, 0], &mut area);
        let cmd = ScsiCommand {
            final_: true,
            read: true,
            write: true,
            itt: 7,
            expected_data_transfer_length: 4096,
            ..Default::default()
        };
        let mut writer = PduWriter::new(Vec::new());
        writer.set_limits(limits);
        // One small payload (copied) and one large (its own iovec).
        writer.queue(&cmd.to_bhs(), &area, Bytes::from(vec![1u8; 100]));
        writer.queue(&cmd.to_bhs(), &area, Bytes::from(vec![2u8; 4096]));
        writer.queue(&cmd.to_bhs(), &[], Bytes::new());
        writer.flush().await.unwrap();
        let mut buf = BytesMut::from(&writer.inner[..]);
        let mut dec = FrameDecoder::new(limits);
        for (len, with_ahs) in [(100, true), (4096, true), (0, false)] {
            let pdu = dec.decode(&mut buf).unwrap().unwrap().unwrap();
            assert_eq!(pdu.data.len(), len);
            let want: &[u8] = if with_ahs { &area } else { &[] };
            assert_eq!(&pdu.ahs[..], want);
            assert_eq!(pdu.bhs.total_ahs_len(), want.len());
            assert!(matches!(
                Header::parse(&pdu.bhs),
                Ok(Header::ScsiCommand(_))
            ));
        }
        assert!(buf.is_empty());
    }
}
