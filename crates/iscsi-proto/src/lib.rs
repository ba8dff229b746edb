//! Sans-IO iSCSI protocol core (RFC 7143): text key negotiation, CHAP, serial number
//! arithmetic, and the two roles as state machines: [`target`] and [`initiator`].
//!
//! Nothing here opens a socket or reads a clock: drivers feed framed PDUs and the current time
//! in, and take PDUs to send, events and the next deadline out.
#![forbid(unsafe_code)]

pub mod chap;
pub mod initiator;
pub mod keys;
pub mod serial;
pub mod target;

/// A PDU ready to be framed: the driver adds lengths, padding and digests.
#[derive(Clone, Debug)]
pub struct OutPdu {
    pub bhs: iscsi_wire::Bhs,
    /// Additional header segments, already padded to 4 bytes each (see
    /// [`iscsi_wire::pdu::ahs::encode`]); empty for almost every PDU. The framer fills
    /// TotalAHSLength from its length.
    pub ahs: bytes::Bytes,
    pub data: bytes::Bytes,
}
