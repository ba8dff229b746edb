//! The initiator side of a session in full feature phase (RFC 7143, one connection, ERL 0).
//!
//! [`InitiatorSession`] is a sans-IO state machine. The driver feeds it the target's PDUs
//! ([`InitiatorSession::handle_pdu`]) and the clock ([`InitiatorSession::handle_timeout`]),
//! gives it work (`submit`, `task_management`, `text_request`, `logout`), and takes PDUs to
//! send ([`InitiatorSession::poll_transmit`]), [`Event`]s and the next deadline out.
//!
//! What it does:
//! - ITTs: one per task, from a wrapping counter that skips the reserved tag and any tag still
//!   in use; the caller's [`TaskId`] is mapped to it.
//! - The command window (§4.2.2.1): non-immediate requests (SCSI commands, Text Requests) take
//!   the next CmdSN when CmdSN ≤ MaxCmdSN, and wait in submission order otherwise. Task
//!   management, logout and NOP-Out are immediate and never wait.
//! - Write data: immediate data, unsolicited Data-Out up to FirstBurstLength, and the
//!   Data-Out each R2T solicits, all as slices of the caller's buffer (never copied).
//! - Read data: the Data-In segments of a task are kept as they arrived, slices of the
//!   receive buffer (no copy), and completed as a [`DataIn`]; only data out of order (allowed
//!   with DataPDUInOrder=No) is gathered into one buffer, zeros where nothing arrived yet.
//!   Status comes from the last Data-In (phase collapse) or a SCSI Response.
//! - NOP: the target's pings are answered; after `nop_interval` of silence we ping, and a
//!   further `nop_timeout` of silence fails the connection. Any PDU counts as an answer, so a
//!   busy connection is never declared dead.
//! - Task management, text (continuations gathered), logout, asynchronous messages, Reject.
//!
//! What it is not: no sockets, no clock, no retries. ERL 0 cannot recover a lost or corrupt
//! PDU, so every protocol violation by the target ends the connection with
//! [`Event::ConnectionFailed`]; the tasks stay for [`InitiatorSession::take_outstanding`],
//! and the driver re-issues them on a new session. A Data-In or R2T for a task we do not have
//! is such a violation (we cannot tell where its data belongs); any other response for an
//! unknown ITT is ignored (it may answer something we already gave up on).
//!
//! Additional header segments (§11.2.2, §11.3.5): a CDB longer than 16 bytes sends its
//! first 16 bytes in the header and the rest in an extended-CDB AHS (up to 260 bytes in all;
//! longer ones are refused with [`SubmitError::CdbTooLong`]), and a command with both
//! `read_len` and `data_out` carries a Bidirectional Read Data Length AHS with `read_len`
//! (its ExpectedDataTransferLength is the write length).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_wire::pdu::ahs;
use iscsi_wire::{
    AsyncEvent, AsyncMessage, Bhs, DataIn as DataInPdu, DataOut, Header, LogoutReason,
    LogoutRequest, LogoutResponse, LogoutResponseCode, NopIn, NopOut, Opcode, PduError, R2t,
    RawPdu, Reject, ScsiCommand, ScsiResponse, ServiceResponse, Status, TaskMgmtRequest,
    TaskMgmtResponse, TextRequest, TextResponse, TmfFunction, TmfResponse, BHS_LEN, RESERVED_TAG,
};

use super::{
    DataIn, Event, LoginResult, Residual, ScsiCompletion, ScsiRequest, SessionConfig, SubmitError,
    TargetNotice, TaskId,
};
use crate::keys::{self, SessionParams};
use crate::serial::Sn;
use crate::OutPdu;

/// Longest CDB the basic header holds; the rest of a longer one goes in an extended-CDB AHS.
const BHS_CDB_LEN: usize = 16;
/// Longest CDB we send (SPC-4's variable-length CDBs end at 260 bytes).
const MAX_CDB_LEN: usize = 260;
/// Most of a read buffer reserved when out-of-order Data-In makes us gather into one; larger
/// reads grow as data arrives, so a huge `read_len` answered with little data does not commit
/// memory.
const MAX_READ_PREALLOC: usize = 16 << 20;
/// Most text a target may send for one Text Request (SendTargets of many targets fits).
const MAX_TEXT_RESPONSE: usize = 1 << 20;

/// Hasher for ITTs and [`TaskId`]s. Both are chosen on our side (a counter, the driver's ids),
/// never by the target, so SipHash's flooding resistance buys nothing on the hot path; a
/// multiply spreads sequential tags over buckets and control bytes alike.
#[derive(Default)]
struct TagHasher(u64);

impl Hasher for TagHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(29) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type TagMap<K, V> = HashMap<K, V, BuildHasherDefault<TagHasher>>;

/// A protocol violation by the target: the connection cannot go on at ERL 0.
struct Fault(String);

fn fault(reason: impl Into<String>) -> Fault {
    Fault(reason.into())
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum State {
    Running,
    /// Logout Request sent: no new commands go out.
    LoggingOut,
    /// Logged out, failed, or the outstanding tasks were taken: nothing goes out any more.
    Finished,
}

/// A SCSI command from submission to completion.
struct ScsiTask {
    id: TaskId,
    /// Submission order, for [`InitiatorSession::take_outstanding`].
    seq: u64,
    request: ScsiRequest,
    /// Set when the command went out; None while it waits for the window.
    cmd_sn: Option<Sn>,
    /// The DataSN of the next Data-In, which is also the R2TSN of the next R2T: for a
    /// bidirectional command both share one numbering (§11.7.4, §11.8.3).
    next_in_sn: u32,
    data_in: Gather,
}

/// The Data-In of one task so far.
enum Gather {
    /// Every segment started where the previous one ended: the segments themselves.
    InOrder(DataIn),
    /// Some segment did not (DataPDUInOrder=No, or a target's bug): one buffer, zeros where
    /// nothing arrived yet, as long as the furthest byte received.
    Gathered(BytesMut),
}

impl Gather {
    fn new() -> Gather {
        Gather::InOrder(DataIn::new())
    }

    /// Places `data` (not empty, within the read) at `start`.
    fn add(&mut self, start: usize, data: Bytes, read_len: usize) {
        if let Gather::InOrder(segments) = self {
            if start == segments.len() {
                segments.push(data);
                return;
            }
            let mut buf = BytesMut::with_capacity(read_len.min(MAX_READ_PREALLOC));
            for s in segments.segments() {
                buf.extend_from_slice(s);
            }
            *self = Gather::Gathered(buf);
        }
        if let Gather::Gathered(buf) = self {
            if start > buf.len() {
                // A gap: zeros until it is filled.
                buf.resize(start, 0);
            }
            let overlap = (buf.len() - start).min(data.len());
            buf[start..start + overlap].copy_from_slice(&data[..overlap]);
            buf.extend_from_slice(&data[overlap..]);
        }
    }

    /// Bytes so far (to the furthest one received).
    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Gather::InOrder(segments) => segments.len(),
            Gather::Gathered(buf) => buf.len(),
        }
    }

    fn finish(self) -> DataIn {
        match self {
            Gather::InOrder(segments) => segments,
            Gather::Gathered(buf) => DataIn::from(buf.freeze()),
        }
    }
}

/// Requests other than SCSI commands (rare: kept apart so the hot map stays small).
enum OtherTask {
    Tmf {
        id: TaskId,
        function: TmfFunction,
        lun: u64,
        /// ITT of the task ABORT TASK names.
        referenced: u32,
        /// The TMF's CmdSN: tasks sent before it have lower ones (§11.5).
        cmd_sn: Sn,
    },
    Text {
        /// None for the empty Text Request that answers a negotiation request.
        id: Option<TaskId>,
        /// What the next Text Request carries (the caller's keys first, then nothing).
        request: Bytes,
        /// The TTT the next Text Request echoes (reserved for the first one).
        ttt: u32,
        gathered: Vec<u8>,
    },
    Logout {
        id: TaskId,
    },
}

/// One session over one connection in full feature phase, initiator side.
pub struct InitiatorSession {
    params: SessionParams,
    config: SessionConfig,
    cid: u16,
    state: State,
    /// The CmdSN the next non-immediate request takes.
    cmd_sn: Sn,
    exp_cmd_sn: Sn,
    max_cmd_sn: Sn,
    exp_stat_sn: Sn,
    next_itt: u32,
    next_seq: u64,
    scsi: TagMap<u32, ScsiTask>,
    others: TagMap<u32, OtherTask>,
    /// Every outstanding request of the caller: TaskId → ITT.
    ids: TagMap<TaskId, u32>,
    /// ITTs of non-immediate requests waiting for the window, in submission order.
    waiting: VecDeque<u32>,
    transmit: VecDeque<OutPdu>,
    events: VecDeque<Event>,
    last_rx: Instant,
    /// Our unanswered keepalive NOP-Out: (ITT, when sent).
    ping: Option<(u32, Instant)>,
}

impl InitiatorSession {
    pub fn new(login: &LoginResult, config: SessionConfig, now: Instant) -> Self {
        InitiatorSession {
            params: login.params.clone(),
            config,
            cid: login.cid,
            state: State::Running,
            cmd_sn: Sn(login.cmd_sn),
            exp_cmd_sn: Sn(login.exp_cmd_sn),
            max_cmd_sn: Sn(login.max_cmd_sn),
            exp_stat_sn: Sn(login.exp_stat_sn),
            next_itt: 1,
            next_seq: 0,
            scsi: TagMap::default(),
            others: TagMap::default(),
            ids: TagMap::default(),
            waiting: VecDeque::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            last_rx: now,
            ping: None,
        }
    }

    // ---- getters ----

    pub fn params(&self) -> &SessionParams {
        &self.params
    }
    /// Commands that may be sent now without exceeding MaxCmdSN.
    pub fn window(&self) -> u32 {
        if self.cmd_sn.le(self.max_cmd_sn) {
            self.cmd_sn.distance(self.max_cmd_sn) + 1
        } else {
            0
        }
    }
    /// Tasks submitted and not completed (sent or waiting for the window).
    pub fn outstanding(&self) -> usize {
        self.scsi.len()
    }
    /// Requests waiting for the command window to open.
    pub fn queued(&self) -> usize {
        self.waiting.len()
    }
    /// True once a logout completed or the connection failed.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }
    /// The CmdSN the next non-immediate request will take.
    pub fn cmd_sn(&self) -> u32 {
        self.cmd_sn.0
    }
    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.0
    }
    pub fn max_cmd_sn(&self) -> u32 {
        self.max_cmd_sn.0
    }
    /// The StatSN we expect next (sent as ExpStatSN).
    pub fn exp_stat_sn(&self) -> u32 {
        self.exp_stat_sn.0
    }

    // ---- commands ----

    /// Queues a SCSI command; it goes out as soon as the command window allows.
    pub fn submit(&mut self, task: TaskId, request: ScsiRequest) -> Result<(), SubmitError> {
        self.check_new(task)?;
        if request.cdb.len() > MAX_CDB_LEN {
            return Err(SubmitError::CdbTooLong);
        }
        let itt = self.alloc_itt();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.scsi.insert(
            itt,
            ScsiTask {
                id: task,
                seq,
                request,
                cmd_sn: None,
                next_in_sn: 0,
                data_in: Gather::new(),
            },
        );
        self.ids.insert(task, itt);
        self.waiting.push_back(itt);
        self.send_waiting();
        Ok(())
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
        self.check_new(task)?;
        let mut lun = lun;
        let mut referenced_itt = RESERVED_TAG;
        let mut ref_cmd_sn = 0;
        if function == TmfFunction::ABORT_TASK {
            let itt = referenced
                .and_then(|r| self.ids.get(&r).copied())
                .ok_or(SubmitError::UnknownTask)?;
            let target = self.scsi.get(&itt).ok_or(SubmitError::UnknownTask)?;
            let Some(sn) = target.cmd_sn else {
                // Never sent: the target knows nothing of it, so abort it here.
                self.abort_unsent(itt);
                self.events.push_back(Event::TaskManagementDone {
                    task,
                    response: TmfResponse::FUNCTION_COMPLETE,
                });
                return Ok(());
            };
            // §11.5.1: the LUN of an ABORT TASK is the referenced task's.
            lun = target.request.lun;
            referenced_itt = itt;
            ref_cmd_sn = sn.0;
        }
        let itt = self.alloc_itt();
        let req = TaskMgmtRequest {
            immediate: true,
            function,
            lun,
            itt,
            referenced_task_tag: referenced_itt,
            cmd_sn: self.cmd_sn.0,
            exp_stat_sn: self.exp_stat_sn.0,
            ref_cmd_sn,
            exp_data_sn: 0,
        };
        self.push(req.to_bhs(), Bytes::new());
        self.others.insert(
            itt,
            OtherTask::Tmf {
                id: task,
                function,
                lun,
                referenced: referenced_itt,
                cmd_sn: self.cmd_sn,
            },
        );
        self.ids.insert(task, itt);
        Ok(())
    }

    /// Sends a Text Request (e.g. `SendTargets=All`); continuations are gathered.
    ///
    /// The keys go out in one PDU: they must fit the target's MaxRecvDataSegmentLength.
    pub fn text_request(
        &mut self,
        task: TaskId,
        pairs: &[(String, String)],
    ) -> Result<(), SubmitError> {
        self.check_new(task)?;
        let itt = self.alloc_itt();
        self.others.insert(
            itt,
            OtherTask::Text {
                id: Some(task),
                request: Bytes::from(keys::encode_text(pairs)),
                ttt: RESERVED_TAG,
                gathered: Vec::new(),
            },
        );
        self.ids.insert(task, itt);
        self.waiting.push_back(itt);
        self.send_waiting();
        Ok(())
    }

    /// Sends a Logout Request (immediate). Commands still waiting for the window stay
    /// unsent (see [`Self::take_outstanding`]).
    pub fn logout(&mut self, task: TaskId, reason: LogoutReason) -> Result<(), SubmitError> {
        self.check_new(task)?;
        let itt = self.alloc_itt();
        let req = LogoutRequest {
            immediate: true,
            reason,
            itt,
            cid: self.cid,
            cmd_sn: self.cmd_sn.0,
            exp_stat_sn: self.exp_stat_sn.0,
        };
        self.push(req.to_bhs(), Bytes::new());
        self.others.insert(itt, OtherTask::Logout { id: task });
        self.ids.insert(task, itt);
        self.state = State::LoggingOut;
        Ok(())
    }

    /// Removes every SCSI task that has not completed, in submission order, for re-issue on
    /// a new session. Task management, text and logout requests are dropped (their callers
    /// get an error from the driver).
    ///
    /// The session is finished afterwards: a late answer for a task handed back must not
    /// complete it a second time.
    pub fn take_outstanding(&mut self) -> Vec<(TaskId, ScsiRequest)> {
        let mut tasks: Vec<ScsiTask> = self.scsi.drain().map(|(_, t)| t).collect();
        tasks.sort_unstable_by_key(|t| t.seq);
        self.others.clear();
        self.ids.clear();
        self.waiting.clear();
        self.transmit.clear();
        self.ping = None;
        self.state = State::Finished;
        tasks.into_iter().map(|t| (t.id, t.request)).collect()
    }

    // ---- input ----

    /// One PDU from the target (or the framer's complaint about one) arrived at `now`.
    pub fn handle_pdu(&mut self, pdu: Result<RawPdu, PduError>, now: Instant) {
        if self.state == State::Finished {
            return;
        }
        // Any PDU shows the connection is alive: that answers an outstanding ping.
        self.last_rx = now;
        self.ping = None;
        let result = match pdu {
            Ok(pdu) => self.dispatch(pdu),
            // ERL 0 has no SNACK: a corrupt or oversized PDU cannot be asked for again.
            Err(e) => Err(fault(format!(
                "{e} in a {:?} PDU from the target",
                e.bhs().opcode()
            ))),
        };
        match result {
            Ok(()) => self.send_waiting(),
            Err(Fault(reason)) => self.fail(reason),
        }
    }

    /// The clock moved to `now`: send a keepalive ping after silence, or give up on one.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Finished {
            return;
        }
        match self.keepalive_deadline() {
            Some(deadline) if now >= deadline => {}
            _ => return,
        }
        if self.ping.is_some() {
            let waited = now.duration_since(self.last_rx);
            self.fail(format!(
                "no PDU from the target for {waited:?}: NOP-Out ping unanswered"
            ));
        } else {
            let itt = self.alloc_itt();
            self.send_nop_out(itt, RESERVED_TAG, 0, Bytes::new());
            self.ping = Some((itt, now));
        }
    }

    // ---- output ----

    pub fn poll_transmit(&mut self) -> Option<OutPdu> {
        self.transmit.pop_front()
    }
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
    /// When [`Self::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Finished {
            return None;
        }
        self.keepalive_deadline()
    }
}

// ---- internals: sending ----

impl InitiatorSession {
    /// Checks common to every new request of the caller.
    fn check_new(&self, task: TaskId) -> Result<(), SubmitError> {
        if self.state != State::Running {
            return Err(SubmitError::NotUsable);
        }
        if self.ids.contains_key(&task) {
            return Err(SubmitError::DuplicateTask);
        }
        Ok(())
    }

    /// When the keepalive acts next: fail the unanswered ping, or ping after silence. None
    /// when pings are off (or a duration so long that the clock cannot hold it).
    fn keepalive_deadline(&self) -> Option<Instant> {
        match self.ping {
            Some((_, sent)) => sent.checked_add(self.config.nop_timeout),
            None => self.last_rx.checked_add(self.config.nop_interval?),
        }
    }

    /// A tag unique among outstanding tasks and the ping, never the reserved one.
    fn alloc_itt(&mut self) -> u32 {
        loop {
            let itt = self.next_itt;
            self.next_itt = self.next_itt.wrapping_add(1);
            let in_use = itt == RESERVED_TAG
                || self.scsi.contains_key(&itt)
                || self.others.contains_key(&itt)
                || self.ping.is_some_and(|(p, _)| p == itt);
            if !in_use {
                return itt;
            }
        }
    }

    /// Largest data segment we may send (the target's MaxRecvDataSegmentLength), kept within
    /// the RFC's range so that a bad value cannot stall segmentation.
    fn max_segment(&self) -> u32 {
        self.params
            .max_xmit_data_segment_length
            .clamp(512, 0xff_ffff)
    }

    fn push(&mut self, bhs: Bhs, data: Bytes) {
        self.transmit.push_back(OutPdu {
            bhs,
            ahs: Bytes::new(),
            data,
        });
    }

    /// Sends waiting non-immediate requests while CmdSN ≤ MaxCmdSN.
    fn send_waiting(&mut self) {
        while self.state == State::Running && self.cmd_sn.le(self.max_cmd_sn) {
            let Some(itt) = self.waiting.pop_front() else {
                return;
            };
            if self.scsi.contains_key(&itt) {
                self.send_scsi_command(itt);
            } else {
                self.send_text_request(itt);
            }
        }
    }

    fn take_cmd_sn(&mut self) -> Sn {
        let sn = self.cmd_sn;
        self.cmd_sn += 1;
        sn
    }

    /// The SCSI Command PDU, with immediate data and unsolicited Data-Out (§4.2.5.2).
    fn send_scsi_command(&mut self, itt: u32) {
        let cmd_sn = self.take_cmd_sn();
        let seg = self.max_segment();
        let exp_stat_sn = self.exp_stat_sn.0;
        let p = &self.params;
        let Some(task) = self.scsi.get_mut(&itt) else {
            return;
        };
        task.cmd_sn = Some(cmd_sn);
        let req = &task.request;
        let write_len = u32::try_from(req.data_out.len()).unwrap_or(u32::MAX);
        let mut immediate_len = 0;
        let mut unsolicited_end = 0;
        if write_len > 0 {
            if p.immediate_data {
                immediate_len = p.first_burst_length.min(seg).min(write_len);
            }
            unsolicited_end = if p.initial_r2t {
                immediate_len
            } else {
                p.first_burst_length.min(write_len).max(immediate_len)
            };
        }
        let mut cdb = [0u8; BHS_CDB_LEN];
        let n = req.cdb.len().min(BHS_CDB_LEN);
        cdb[..n].copy_from_slice(&req.cdb[..n]);
        let cmd = ScsiCommand {
            immediate: false,
            // F=0 announces unsolicited Data-Out after the command.
            final_: unsolicited_end == immediate_len,
            read: req.read_len > 0,
            write: write_len > 0,
            attr: req.attr.bits(),
            lun: req.lun,
            itt,
            expected_data_transfer_length: if write_len > 0 {
                write_len
            } else {
                req.read_len
            },
            cmd_sn: cmd_sn.0,
            exp_stat_sn,
            cdb,
        };
        let immediate = req.data_out.slice(..immediate_len as usize);
        self.transmit.push_back(OutPdu {
            bhs: cmd.to_bhs(),
            ahs: command_ahs(req, write_len),
            data: immediate,
        });
        push_data_out(
            &mut self.transmit,
            &req.data_out,
            DataOutSequence {
                lun: req.lun,
                itt,
                ttt: RESERVED_TAG,
                exp_stat_sn,
                seg,
                range: immediate_len..unsolicited_end,
            },
        );
    }

    /// A Text Request: the caller's keys first, then empty ones that fetch continuations.
    fn send_text_request(&mut self, itt: u32) {
        let Some(OtherTask::Text { request, ttt, .. }) = self.others.get_mut(&itt) else {
            return;
        };
        let data = std::mem::take(request);
        let ttt = *ttt;
        let cmd_sn = self.take_cmd_sn();
        let req = TextRequest {
            immediate: false,
            final_: true,
            continue_: false,
            lun: 0,
            itt,
            ttt,
            cmd_sn: cmd_sn.0,
            exp_stat_sn: self.exp_stat_sn.0,
        };
        self.push(req.to_bhs(), data);
    }

    /// NOP-Out: our ping (`ttt` reserved) or the answer to the target's (`itt` reserved).
    /// Immediate, so it takes no CmdSN.
    fn send_nop_out(&mut self, itt: u32, ttt: u32, lun: u64, data: Bytes) {
        let nop = NopOut {
            immediate: true,
            lun,
            itt,
            ttt,
            cmd_sn: self.cmd_sn.0,
            exp_stat_sn: self.exp_stat_sn.0,
        };
        self.push(nop.to_bhs(), data);
    }
}

/// The AHS of a SCSI Command (empty for almost all, §11.2.2): the CDB beyond its first 16
/// bytes (extended CDB: AHSLength = CDB length - 15, a reserved byte, the bytes, padding to 4),
/// then the read length of a bidirectional command (Bidirectional Read Expected Data Transfer
/// Length: AHSLength 5, a reserved byte, 4 bytes).
fn command_ahs(req: &ScsiRequest, write_len: u32) -> Bytes {
    let extended = req.cdb.get(BHS_CDB_LEN..).filter(|rest| !rest.is_empty());
    let bidi = write_len > 0 && req.read_len > 0;
    if extended.is_none() && !bidi {
        return Bytes::new();
    }
    let mut area = Vec::new();
    if let Some(rest) = extended {
        let mut specific = Vec::with_capacity(1 + rest.len());
        specific.push(0);
        specific.extend_from_slice(rest);
        ahs::encode(ahs::EXTENDED_CDB, &specific, &mut area);
    }
    if bidi {
        let mut specific = [0u8; 5];
        specific[1..].copy_from_slice(&req.read_len.to_be_bytes());
        ahs::encode(ahs::BIDI_READ_DATA_LENGTH, &specific, &mut area);
    }
    Bytes::from(area)
}

/// One sequence of Data-Out PDUs: unsolicited (TTT reserved) or answering one R2T.
struct DataOutSequence {
    lun: u64,
    itt: u32,
    ttt: u32,
    exp_stat_sn: u32,
    seg: u32,
    /// Buffer offsets to send; the caller checked they lie within the data.
    range: Range<u32>,
}

/// Queues Data-Out PDUs of at most `seg` bytes, DataSN from 0, F on the last; each payload is
/// a slice of `data`.
fn push_data_out(out: &mut VecDeque<OutPdu>, data: &Bytes, s: DataOutSequence) {
    let mut offset = s.range.start;
    let mut data_sn = 0u32;
    while offset < s.range.end {
        let len = s.seg.min(s.range.end - offset);
        let end = offset + len;
        let d = DataOut {
            final_: end == s.range.end,
            lun: s.lun,
            itt: s.itt,
            ttt: s.ttt,
            exp_stat_sn: s.exp_stat_sn,
            data_sn,
            buffer_offset: offset,
        };
        out.push_back(OutPdu {
            bhs: d.to_bhs(),
            ahs: Bytes::new(),
            data: data.slice(offset as usize..end as usize),
        });
        offset = end;
        data_sn = data_sn.wrapping_add(1);
    }
}

// ---- internals: receiving ----

impl InitiatorSession {
    fn dispatch(&mut self, pdu: RawPdu) -> Result<(), Fault> {
        let header = Header::parse(&pdu.bhs).map_err(|e| fault(format!("{e}")))?;
        match header {
            Header::DataIn(h) => self.handle_data_in(h, pdu.data),
            Header::ScsiResponse(h) => self.handle_scsi_response(h, pdu.data),
            Header::R2t(h) => self.handle_r2t(h),
            Header::NopIn(h) => {
                self.handle_nop_in(h, pdu.data);
                Ok(())
            }
            Header::TaskMgmtResponse(h) => self.handle_tmf_response(h),
            Header::TextResponse(h) => self.handle_text_response(h, pdu.data),
            Header::LogoutResponse(h) => self.handle_logout_response(h),
            Header::AsyncMessage(h) => {
                self.handle_async_message(h, pdu.data);
                Ok(())
            }
            Header::Reject(h) => self.handle_reject(h, pdu.data),
            other => Err(fault(format!(
                "unexpected {:?} PDU in full feature phase",
                other.to_bhs().opcode()
            ))),
        }
    }

    /// ExpCmdSN/MaxCmdSN from a response (§4.2.2.1): ignored when MaxCmdSN < ExpCmdSN - 1,
    /// otherwise each moves forward only. An ExpCmdSN beyond what we sent is ignored.
    fn update_window(&mut self, exp: u32, max: u32) {
        let (exp, max) = (Sn(exp), Sn(max));
        if max.lt(Sn(exp.0.wrapping_sub(1))) {
            return;
        }
        if exp.gt(self.exp_cmd_sn) && exp.le(self.cmd_sn) {
            self.exp_cmd_sn = exp;
        }
        if max.gt(self.max_cmd_sn) {
            self.max_cmd_sn = max;
        }
    }

    /// StatSN of a PDU that carries status: ExpStatSN moves past it.
    fn note_stat_sn(&mut self, stat_sn: u32) {
        let next = Sn(stat_sn) + 1;
        if next.gt(self.exp_stat_sn) {
            self.exp_stat_sn = next;
        }
    }

    fn handle_data_in(&mut self, d: DataInPdu, data: Bytes) -> Result<(), Fault> {
        self.update_window(d.exp_cmd_sn, d.max_cmd_sn);
        let task = match self.scsi.get_mut(&d.itt) {
            Some(t) if t.cmd_sn.is_some() => t,
            _ => return Err(fault(format!("Data-In for unknown ITT 0x{:08x}", d.itt))),
        };
        if d.data_sn != task.next_in_sn {
            return Err(fault(format!(
                "Data-In DataSN {} where {} was due (ITT 0x{:08x})",
                d.data_sn, task.next_in_sn, d.itt
            )));
        }
        task.next_in_sn = task.next_in_sn.wrapping_add(1);
        let read_len = task.request.read_len as usize;
        let start = d.buffer_offset as usize;
        let end = start.saturating_add(data.len());
        if end > read_len {
            return Err(fault(format!(
                "Data-In overrun: bytes {start}..{end} of a {read_len}-byte read (ITT 0x{:08x})",
                d.itt
            )));
        }
        if !data.is_empty() {
            task.data_in.add(start, data, read_len);
        }
        let Some(status) = d.status else {
            return Ok(());
        };
        if !d.final_ {
            return Err(fault("Data-In with status but without the F bit"));
        }
        let residual = residual(d.overflow, d.underflow, d.residual_count)?;
        self.note_stat_sn(d.stat_sn);
        self.complete(
            d.itt,
            ServiceResponse::COMMAND_COMPLETED,
            status,
            Bytes::new(),
            residual,
        );
        Ok(())
    }

    fn handle_scsi_response(&mut self, r: ScsiResponse, data: Bytes) -> Result<(), Fault> {
        self.update_window(r.exp_cmd_sn, r.max_cmd_sn);
        self.note_stat_sn(r.stat_sn);
        if !self.is_sent_scsi(r.itt) {
            if self.others.contains_key(&r.itt) {
                return Err(fault("SCSI Response for a non-SCSI task"));
            }
            // An answer to a task we no longer have (or never sent): nothing to complete.
            return Ok(());
        }
        let residual = residual(r.overflow, r.underflow, r.residual_count)?;
        // The data segment is SenseLength, sense data, then response data (§11.4.7).
        let sense = sense_data(&data);
        self.complete(r.itt, r.response, r.status, sense, residual);
        Ok(())
    }

    /// The target asks for `desired_data_transfer_length` bytes from `buffer_offset`.
    fn handle_r2t(&mut self, r: R2t) -> Result<(), Fault> {
        self.update_window(r.exp_cmd_sn, r.max_cmd_sn);
        let seg = self.max_segment();
        let max_burst = self.params.max_burst_length;
        let exp_stat_sn = self.exp_stat_sn.0;
        let task = match self.scsi.get_mut(&r.itt) {
            Some(t) if t.cmd_sn.is_some() => t,
            _ => return Err(fault(format!("R2T for unknown ITT 0x{:08x}", r.itt))),
        };
        if r.ttt == RESERVED_TAG {
            // Data-Out with this TTT would claim to be unsolicited: ERL 0 cannot go on.
            return Err(fault(format!(
                "R2T with the reserved Target Transfer Tag (ITT 0x{:08x})",
                r.itt
            )));
        }
        if r.r2t_sn != task.next_in_sn {
            return Err(fault(format!(
                "R2TSN {} where {} was due (ITT 0x{:08x})",
                r.r2t_sn, task.next_in_sn, r.itt
            )));
        }
        task.next_in_sn = task.next_in_sn.wrapping_add(1);
        let len = r.desired_data_transfer_length;
        // Offsets are 32-bit: a larger buffer can only be asked for its first 4 GiB.
        let write_len = (task.request.data_out.len() as u64).min(u64::from(u32::MAX));
        let end = u64::from(r.buffer_offset) + u64::from(len);
        if len == 0 || len > max_burst || end > write_len {
            return Err(fault(format!(
                "R2T for bytes {}..{end} of a {write_len}-byte write (MaxBurstLength {max_burst})",
                r.buffer_offset
            )));
        }
        push_data_out(
            &mut self.transmit,
            &task.request.data_out,
            DataOutSequence {
                lun: task.request.lun,
                itt: r.itt,
                ttt: r.ttt,
                exp_stat_sn,
                seg,
                range: r.buffer_offset..r.buffer_offset + len,
            },
        );
        Ok(())
    }

    fn handle_nop_in(&mut self, n: NopIn, data: Bytes) {
        self.update_window(n.exp_cmd_sn, n.max_cmd_sn);
        if n.ttt != RESERVED_TAG {
            // The target's ping (§11.19): echo it; its StatSN is not advanced.
            let max = self.max_segment() as usize;
            let echo = data.slice(..data.len().min(max));
            self.send_nop_out(RESERVED_TAG, n.ttt, n.lun, echo);
        } else if n.itt != RESERVED_TAG {
            // The answer to a NOP-Out of ours; liveness was noted on arrival.
            self.note_stat_sn(n.stat_sn);
        }
    }

    fn handle_tmf_response(&mut self, r: TaskMgmtResponse) -> Result<(), Fault> {
        self.update_window(r.exp_cmd_sn, r.max_cmd_sn);
        self.note_stat_sn(r.stat_sn);
        let Some(OtherTask::Tmf { .. }) = self.others.get(&r.itt) else {
            return self.unmatched_response(r.itt, "Task Management Response");
        };
        let Some(OtherTask::Tmf {
            id,
            function,
            lun,
            referenced,
            cmd_sn,
        }) = self.others.remove(&r.itt)
        else {
            return Ok(());
        };
        self.ids.remove(&id);
        let done = r.response == TmfResponse::FUNCTION_COMPLETE;
        // A target answers no task it aborted (§4.2.3.4): end them here so none hangs. With
        // TASK DOES NOT EXIST the referenced task cannot be answered any more either.
        let mut ended: Vec<(u64, u32)> = match function {
            TmfFunction::ABORT_TASK if done || r.response == TmfResponse::TASK_DOES_NOT_EXIST => {
                self.scsi
                    .get(&referenced)
                    .map(|t| (t.seq, referenced))
                    .into_iter()
                    .collect()
            }
            TmfFunction::ABORT_TASK_SET
            | TmfFunction::CLEAR_TASK_SET
            | TmfFunction::LOGICAL_UNIT_RESET
                if done =>
            {
                self.sent_before(cmd_sn, Some(lun))
            }
            TmfFunction::TARGET_WARM_RESET | TmfFunction::TARGET_COLD_RESET if done => {
                self.sent_before(cmd_sn, None)
            }
            _ => Vec::new(),
        };
        if !ended.is_empty() {
            ended.sort_unstable();
            // Data-Out still queued for them would only be dropped by the target.
            self.transmit.retain(|p| {
                p.bhs.opcode() != Opcode::DATA_OUT
                    || !ended.iter().any(|&(_, itt)| itt == p.bhs.itt())
            });
            for (_, itt) in ended {
                self.complete(
                    itt,
                    ServiceResponse::COMMAND_COMPLETED,
                    Status::TASK_ABORTED,
                    Bytes::new(),
                    Residual::None,
                );
            }
        }
        self.events.push_back(Event::TaskManagementDone {
            task: id,
            response: r.response,
        });
        Ok(())
    }

    /// (submission order, ITT) of the commands sent before CmdSN `before`, on `lun` if given.
    fn sent_before(&self, before: Sn, lun: Option<u64>) -> Vec<(u64, u32)> {
        self.scsi
            .iter()
            .filter(|(_, t)| t.cmd_sn.is_some_and(|sn| sn.lt(before)))
            .filter(|(_, t)| lun.is_none_or(|l| l == t.request.lun))
            .map(|(&itt, t)| (t.seq, itt))
            .collect()
    }

    fn handle_text_response(&mut self, r: TextResponse, data: Bytes) -> Result<(), Fault> {
        self.update_window(r.exp_cmd_sn, r.max_cmd_sn);
        self.note_stat_sn(r.stat_sn);
        let Some(OtherTask::Text {
            request,
            ttt,
            gathered,
            ..
        }) = self.others.get_mut(&r.itt)
        else {
            return self.unmatched_response(r.itt, "Text Response");
        };
        if r.final_ && r.continue_ {
            return Err(fault("Text Response with both F and C set"));
        }
        if self.waiting.contains(&r.itt) {
            // Our next Text Request for it has not gone out: nothing can answer it yet.
            return Ok(());
        }
        if gathered.len() + data.len() > MAX_TEXT_RESPONSE {
            return Err(fault("Text Response longer than 1 MiB"));
        }
        gathered.extend_from_slice(&data);
        if !r.final_ {
            // More to come (C=1) or the target awaits our turn: an empty Text Request with
            // its TTT fetches the next part (§11.10.4).
            if r.ttt == RESERVED_TAG {
                return Err(fault("Text Response with F=0 and no Target Transfer Tag"));
            }
            *ttt = r.ttt;
            *request = Bytes::new();
            // It continues an exchange already in progress: ahead of new requests.
            self.waiting.push_front(r.itt);
            return Ok(());
        }
        let Some(OtherTask::Text { id, gathered, .. }) = self.others.remove(&r.itt) else {
            return Ok(());
        };
        // SendTargets repeats TargetName/TargetAddress, so keys may occur more than once.
        let pairs = keys::parse_text_multi(&gathered)
            .map_err(|e| fault(format!("malformed Text Response: {e}")))?;
        if let Some(task) = id {
            self.ids.remove(&task);
            self.events.push_back(Event::TextDone { task, pairs });
        }
        Ok(())
    }

    fn handle_logout_response(&mut self, r: LogoutResponse) -> Result<(), Fault> {
        self.update_window(r.exp_cmd_sn, r.max_cmd_sn);
        self.note_stat_sn(r.stat_sn);
        let Some(OtherTask::Logout { id }) = self.others.get(&r.itt) else {
            return self.unmatched_response(r.itt, "Logout Response");
        };
        let task = *id;
        if r.response != LogoutResponseCode::CLOSED_SUCCESSFULLY {
            // The connection cannot go on half logged out; the driver recovers or closes.
            return Err(fault(format!("logout refused: {:?}", r.response)));
        }
        self.others.remove(&r.itt);
        self.ids.remove(&task);
        self.state = State::Finished;
        self.transmit.clear();
        self.ping = None;
        self.events.push_back(Event::LoggedOut { task });
        Ok(())
    }

    fn handle_async_message(&mut self, m: AsyncMessage, data: Bytes) {
        self.update_window(m.exp_cmd_sn, m.max_cmd_sn);
        self.note_stat_sn(m.stat_sn);
        // Parameters are in seconds (§11.9.1).
        let secs = |v: u16| Duration::from_secs(u64::from(v));
        let notice = match m.async_event {
            AsyncEvent::SCSI_ASYNC_EVENT => TargetNotice::ScsiEvent {
                lun: m.lun,
                sense: sense_data(&data),
            },
            AsyncEvent::LOGOUT_REQUESTED => TargetNotice::LogoutRequested {
                within: secs(m.parameter3),
            },
            AsyncEvent::CONNECTION_DROP => TargetNotice::ConnectionDrop {
                time2wait: secs(m.parameter2),
                time2retain: secs(m.parameter3),
            },
            AsyncEvent::SESSION_DROP => TargetNotice::SessionDrop {
                time2wait: secs(m.parameter2),
                time2retain: secs(m.parameter3),
            },
            AsyncEvent::NEGOTIATION_REQUEST => {
                self.answer_negotiation_request();
                TargetNotice::NegotiationRequested
            }
            other => TargetNotice::Other(other),
        };
        self.events.push_back(Event::Notice(notice));
    }

    /// §11.9.1 AsyncEvent 4: the initiator must send a Text Request, which may be empty: we
    /// renegotiate nothing.
    fn answer_negotiation_request(&mut self) {
        if self.state != State::Running {
            return;
        }
        let itt = self.alloc_itt();
        self.others.insert(
            itt,
            OtherTask::Text {
                id: None,
                request: Bytes::new(),
                ttt: RESERVED_TAG,
                gathered: Vec::new(),
            },
        );
        self.waiting.push_back(itt);
    }

    /// A Reject names the rejected PDU by its header, in the data segment (§11.17).
    fn handle_reject(&mut self, r: Reject, data: Bytes) -> Result<(), Fault> {
        self.update_window(r.exp_cmd_sn, r.max_cmd_sn);
        self.note_stat_sn(r.stat_sn);
        let Some(rejected) = data.get(..BHS_LEN) else {
            return Err(fault("Reject without the rejected header"));
        };
        let mut bhs = Bhs::default();
        bhs.0.copy_from_slice(rejected);
        let itt = bhs.itt();
        match bhs.opcode() {
            Opcode::SCSI_COMMAND if self.is_sent_scsi(itt) => {
                // The command never ran: a service failure the caller may retry.
                self.complete(
                    itt,
                    ServiceResponse::TARGET_FAILURE,
                    Status::TASK_ABORTED,
                    Bytes::new(),
                    Residual::None,
                );
                Ok(())
            }
            // A command we do not have (any more): nothing to end.
            Opcode::SCSI_COMMAND => Ok(()),
            Opcode::TASK_MGMT_REQUEST => {
                if let Some(OtherTask::Tmf { id, .. }) = self.others.get(&itt) {
                    let task = *id;
                    self.others.remove(&itt);
                    self.ids.remove(&task);
                    self.events.push_back(Event::TaskManagementDone {
                        task,
                        response: TmfResponse::FUNCTION_REJECTED,
                    });
                }
                Ok(())
            }
            // A rejected Data-Out, NOP-Out, Text or Logout leaves a sequence ERL 0 cannot
            // repair.
            op => Err(fault(format!(
                "target rejected a {op:?} PDU: {:?}",
                r.reason
            ))),
        }
    }

    /// True if `itt` is a SCSI command that went out (the target can only name those).
    fn is_sent_scsi(&self, itt: u32) -> bool {
        self.scsi.get(&itt).is_some_and(|t| t.cmd_sn.is_some())
    }

    /// A response whose ITT is not a request of its kind: ignored if the ITT is free (a task
    /// we gave up on), a protocol error if it names a request of another kind.
    fn unmatched_response(&self, itt: u32, what: &str) -> Result<(), Fault> {
        if self.scsi.contains_key(&itt) || self.others.contains_key(&itt) {
            Err(fault(format!(
                "{what} for ITT 0x{itt:08x} of another kind of request"
            )))
        } else {
            Ok(())
        }
    }

    /// Removes a task that never went out and reports it aborted.
    fn abort_unsent(&mut self, itt: u32) {
        if let Some(pos) = self.waiting.iter().position(|&w| w == itt) {
            self.waiting.remove(pos);
        }
        self.complete(
            itt,
            ServiceResponse::COMMAND_COMPLETED,
            Status::TASK_ABORTED,
            Bytes::new(),
            Residual::None,
        );
    }

    /// Ends a SCSI task exactly once: it leaves the maps, its ITT becomes free.
    fn complete(
        &mut self,
        itt: u32,
        response: ServiceResponse,
        status: Status,
        sense: Bytes,
        residual: Residual,
    ) {
        let Some(task) = self.scsi.remove(&itt) else {
            return;
        };
        self.ids.remove(&task.id);
        self.events.push_back(Event::Completed(ScsiCompletion {
            task: task.id,
            response,
            status,
            sense,
            data: task.data_in.finish(),
            residual,
        }));
    }

    /// The connection is unusable: report it once and send nothing more.
    fn fail(&mut self, reason: String) {
        if self.state == State::Finished {
            return;
        }
        self.state = State::Finished;
        self.transmit.clear();
        self.ping = None;
        self.events.push_back(Event::ConnectionFailed { reason });
    }
}

/// Residual flags and count of a SCSI Response or a Data-In with status (§11.4.5).
fn residual(overflow: bool, underflow: bool, count: u32) -> Result<Residual, Fault> {
    match (overflow, underflow) {
        (false, false) => Ok(Residual::None),
        (true, false) => Ok(Residual::Overflow(count)),
        (false, true) => Ok(Residual::Underflow(count)),
        (true, true) => Err(fault("residual overflow and underflow both set")),
    }
}

/// The sense data of a data segment that starts with a 2-byte SenseLength (SCSI Response,
/// SCSI asynchronous event). A length beyond the segment is cut to what is there.
fn sense_data(data: &Bytes) -> Bytes {
    if data.len() < 2 {
        return Bytes::new();
    }
    let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
    data.slice(2..(2 + len).min(data.len()))
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
