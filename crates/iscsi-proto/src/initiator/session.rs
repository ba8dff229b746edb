//! The initiator side of a session in full feature phase (one connection, ERL 0).

use std::time::Instant;

use bytes::Bytes;
use iscsi_wire::{LogoutReason, PduError, RawPdu, TmfFunction};

use super::{Event, LoginResult, ScsiRequest, SessionConfig, SubmitError, TaskId};
use crate::keys::SessionParams;
use crate::OutPdu;

/// One session over one connection in full feature phase, initiator side.
pub struct InitiatorSession {
    params: SessionParams,
}

impl InitiatorSession {
    pub fn new(login: &LoginResult, config: SessionConfig, now: Instant) -> Self {
        let _ = (config, now);
        InitiatorSession {
            params: login.params.clone(),
        }
    }

    // ---- getters ----

    pub fn params(&self) -> &SessionParams {
        &self.params
    }
    /// Commands that may be sent now without exceeding MaxCmdSN.
    pub fn window(&self) -> u32 {
        todo!()
    }
    /// Tasks submitted and not completed (sent or waiting for the window).
    pub fn outstanding(&self) -> usize {
        todo!()
    }
    /// True once a logout completed or the connection failed.
    pub fn is_finished(&self) -> bool {
        todo!()
    }

    // ---- commands ----

    /// Queues a SCSI command; it goes out as soon as the command window allows.
    pub fn submit(&mut self, task: TaskId, request: ScsiRequest) -> Result<(), SubmitError> {
        let _ = (task, request);
        todo!()
    }
    /// Sends a task management request (immediate). `referenced` names the task for
    /// ABORT TASK.
    pub fn task_management(
        &mut self,
        task: TaskId,
        function: TmfFunction,
        lun: u64,
        referenced: Option<TaskId>,
    ) -> Result<(), SubmitError> {
        let _ = (task, function, lun, referenced);
        todo!()
    }
    /// Sends a Text Request (e.g. `SendTargets=All`); continuations are gathered.
    pub fn text_request(
        &mut self,
        task: TaskId,
        pairs: &[(String, String)],
    ) -> Result<(), SubmitError> {
        let _ = (task, pairs);
        todo!()
    }
    /// Sends a Logout Request.
    pub fn logout(&mut self, task: TaskId, reason: LogoutReason) -> Result<(), SubmitError> {
        let _ = (task, reason);
        todo!()
    }
    /// Removes every SCSI task that has not completed, in submission order, for re-issue on
    /// a new session. Task management, text and logout requests are dropped (their callers
    /// get an error from the driver).
    pub fn take_outstanding(&mut self) -> Vec<(TaskId, ScsiRequest)> {
        todo!()
    }

    // ---- input ----

    pub fn handle_pdu(&mut self, pdu: Result<RawPdu, PduError>, now: Instant) {
        let _ = (pdu, now);
        todo!()
    }
    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
        todo!()
    }

    // ---- output ----

    pub fn poll_transmit(&mut self) -> Option<OutPdu> {
        todo!()
    }
    pub fn poll_event(&mut self) -> Option<Event> {
        todo!()
    }
    pub fn poll_timeout(&self) -> Option<Instant> {
        todo!()
    }
}

#[allow(dead_code)]
fn _unused(_: Bytes) {}
