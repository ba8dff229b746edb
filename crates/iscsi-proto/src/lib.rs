//! Sans-IO iSCSI protocol core (RFC 7143): text key negotiation, CHAP, serial number arithmetic.
#![forbid(unsafe_code)]

pub mod chap;
pub mod keys;
pub mod serial;
pub mod target;
