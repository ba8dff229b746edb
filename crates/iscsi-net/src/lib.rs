//! tokio driver for iSCSI byte streams: reads framed PDUs and writes them back, batched.
//!
//! This crate moves bytes and nothing else: it frames with `iscsi-wire`, never interprets a
//! PDU and keeps no protocol state beyond the negotiated limits pushed into it. Payload is
//! never copied on the way out: headers are encoded into a scratch buffer and the data
//! segments are handed to `write_vectored` as they are.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Bytes, BytesMut};
use iscsi_wire::frame::{encode_head, encode_tail};
use iscsi_wire::{Bhs, FrameDecoder, FrameError, FrameLimits, PduError, RawPdu};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What reading produced: a PDU, a PDU to answer with a Reject, or the end of the stream.
pub type ReadItem = Option<Result<RawPdu, PduError>>;

/// Reads PDUs from a byte stream.
pub struct PduReader<R> {
    inner: R,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl<R: AsyncRead + Unpin> PduReader<R> {
    pub fn new(inner: R) -> Self {
        PduReader {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
            decoder: FrameDecoder::default(),
        }
    }

    pub fn set_limits(&mut self, limits: FrameLimits) {
        self.decoder.set_limits(limits);
    }

    /// A PDU already in the buffer, without waiting for the socket.
    pub fn try_next(&mut self) -> Result<ReadItem, io::Error> {
        self.decoder.decode(&mut self.buf).map_err(framing_lost)
    }

    /// Waits for the next PDU. `Ok(None)` is a clean end of stream between PDUs.
    pub async fn next(&mut self) -> Result<ReadItem, io::Error> {
        loop {
            if let Some(item) = self.try_next()? {
                return Ok(Some(item));
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
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
}

fn framing_lost(e: FrameError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
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
        while !self.segments.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .segments
                .iter()
                .take(64)
                .map(|b| IoSlice::new(b))
                .collect();
            let mut n = self.inner.write_vectored(&slices).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.queued = self.queued.saturating_sub(n);
            while n > 0 {
                let Some(seg) = self.segments.front_mut() else {
                    break;
                };
                if n >= seg.len() {
                    n -= seg.len();
                    self.segments.pop_front();
                } else {
                    let _ = seg.split_to(n);
                    n = 0;
                }
            }
        }
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
    use iscsi_wire::{Header, ScsiCommand};

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
