//! iSCSI wire format (RFC 7143 §11): the 48-byte Basic Header Segment, additional header
//! segments, padding, CRC32C digests, and framing of whole PDUs out of a byte stream.
//!
//! This crate only turns bytes into checked, typed PDU headers and back. It performs no I/O,
//! keeps no session state and knows nothing of negotiation: the sans-IO protocol core
//! (`iscsi-proto`) decides what a PDU means, and the tokio driver (`iscsi-net`) moves bytes.
//!
//! Every header has a typed representation ([`pdu`]) whose fields are named after the RFC.
//! Codes that appear on the wire are newtypes with named constants ([`codes`]), so unknown
//! values survive a round trip and print in hex.
#![forbid(unsafe_code)]

pub mod bhs;
pub mod codes;
pub mod digest;
pub mod frame;
pub mod pdu;

pub use bhs::{Bhs, BHS_LEN};
pub use codes::*;
pub use frame::{encode_pdu, FrameDecoder, FrameError, FrameLimits, PduError, RawPdu};
pub use pdu::*;

/// Errors found while interpreting a header that was framed correctly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown opcode {0:?}")]
    UnknownOpcode(Opcode),
    #[error("invalid field in {opcode:?} header: {what}")]
    InvalidField { opcode: Opcode, what: &'static str },
    #[error("malformed additional header segment")]
    BadAhs,
}

/// Bytes of padding that follow a segment of `len` bytes (segments end on a 4-byte boundary).
pub const fn pad_len(len: usize) -> usize {
    (4 - (len % 4)) % 4
}
