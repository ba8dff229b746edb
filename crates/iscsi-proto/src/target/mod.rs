//! The target role, sans-IO: one [`TargetConnection`] per TCP connection.
//!
//! Feed it framed PDUs ([`TargetConnection::handle_pdu`]) and the current time
//! ([`TargetConnection::handle_timeout`]); take PDUs to send from
//! [`TargetConnection::poll_transmit`] and work for the driver from
//! [`TargetConnection::poll_event`]. SCSI commands leave as [`Event::Execute`] with all their
//! Data-Out gathered, and come back through [`TargetConnection::complete`]. The connection
//! never executes SCSI itself and never touches a socket or a clock.

mod config;
mod connection;
mod login;

pub use config::{AuthPolicy, PortalConfig, TargetEntry};
pub use connection::{Command, Event, OutPdu, SessionRequest, TargetConnection, TmfRequest};
pub use login::LoginOutcome;

#[cfg(test)]
mod tests;
