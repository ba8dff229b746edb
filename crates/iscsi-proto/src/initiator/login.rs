//! The initiator side of one connection's login (RFC 7143 §6.3, §11.12, §11.13).

use std::time::Instant;

use iscsi_wire::{PduError, RawPdu};

use super::{LoginConfig, LoginError, LoginStep};
use crate::OutPdu;

/// Login state machine of one connection, initiator side.
pub struct InitiatorLogin {
    config: LoginConfig,
}

impl InitiatorLogin {
    pub fn new(config: LoginConfig) -> Self {
        InitiatorLogin { config }
    }

    /// The first Login Request.
    pub fn start(&mut self) -> OutPdu {
        let _ = &self.config;
        todo!()
    }

    /// Feeds one PDU from the target (a framing complaint is a protocol error here).
    pub fn handle_pdu(
        &mut self,
        pdu: Result<RawPdu, PduError>,
        now: Instant,
    ) -> Result<LoginStep, LoginError> {
        let _ = (pdu, now);
        todo!()
    }
}
