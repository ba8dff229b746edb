//! One target-side connection in full: login, the command window, Data-Out gathering with
//! R2Ts, Data-In and status, task management, text, NOP keepalive and logout (ERL 0).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use iscsi_wire::pdu::ahs;
use iscsi_wire::*;

use crate::keys::{self, SessionParams, SessionType};
use crate::serial::Sn;

use super::config::PortalConfig;
use super::login::{LoginOutcome, TargetLogin};

pub use crate::OutPdu;

/// Login has finished on the wire: the driver must place the session (allocate a TSIH,
/// reinstate an older session of the same initiator port) and answer with
/// [`TargetConnection::accept_session`] or [`TargetConnection::refuse_session`].
#[derive(Clone, Debug)]
pub struct SessionRequest {
    pub initiator_name: String,
    pub isid: Isid,
    pub tsih: u16,
    pub cid: u16,
    pub target_name: Option<String>,
    pub session_type: SessionType,
}

/// A SCSI command whose Data-Out has fully arrived, to be executed by the driver.
#[derive(Clone, Debug)]
pub struct Command {
    pub itt: u32,
    /// The 8-byte LUN field as sent.
    pub raw_lun: u64,
    pub cdb: Vec<u8>,
    pub data_out: Bytes,
    pub expected_data_transfer_length: u32,
    pub read: bool,
    pub write: bool,
}

/// A task management function the driver must carry out on the logical units.
#[derive(Clone, Debug)]
pub struct TmfRequest {
    pub itt: u32,
    pub function: TmfFunction,
    pub raw_lun: u64,
}

/// Work for the driver.
#[derive(Debug)]
pub enum Event {
    SessionRequested(SessionRequest),
    /// Login completed: from now on these limits apply (send side: `tx`, receive side: `rx`).
    FullFeature {
        params: Box<SessionParams>,
        rx: FrameLimits,
        tx: FrameLimits,
    },
    Execute(Command),
    /// Answer with [`TargetConnection::tmf_done`].
    TaskManagement(TmfRequest),
    /// Flush what is queued, then close the connection.
    Close {
        reason: String,
    },
}

enum Phase {
    Login(Box<TargetLogin>),
    /// Final login answer held until the driver places the session.
    AwaitingSession {
        csg: Stage,
        text: Vec<u8>,
        params: Box<SessionParams>,
    },
    FullFeature,
    Closed,
}

/// A command that is waiting for Data-Out.
struct WriteTask {
    cmd: Command,
    buf: BytesMut,
    received: u32,
    /// Bytes expected without solicitation (immediate + unsolicited Data-Out).
    unsolicited_end: u32,
    next_r2t_offset: u32,
    next_r2t_sn: u32,
    /// Outstanding R2Ts by target transfer tag: (offset, length, next DataSN).
    r2ts: HashMap<u32, R2tState>,
    unsolicited_data_sn: u32,
}

/// What completion needs to know about a task handed to the driver.
struct Executing {
    read: bool,
    write: bool,
    raw_lun: u64,
    expected_data_transfer_length: u32,
}

struct R2tState {
    offset: u32,
    len: u32,
    received: u32,
    next_data_sn: u32,
}

/// The target side of one iSCSI connection (its session has one connection: MaxConnections=1).
pub struct TargetConnection {
    config: std::sync::Arc<PortalConfig>,
    phase: Phase,
    params: SessionParams,
    stat_sn: u32,
    exp_cmd_sn: Sn,
    max_cmd_sn: Sn,
    /// Non-immediate requests that arrived ahead of ExpCmdSN.
    waiting: BTreeMap<u32, (Header, RawPdu)>,
    writes: HashMap<u32, WriteTask>,
    /// Tasks handed to the driver and not yet completed.
    executing: HashMap<u32, Executing>,
    login_itt: u32,
    next_ttt: u32,
    isid: Isid,
    tsih: u16,
    initiator_name: String,
    target_name: Option<String>,
    transmit: VecDeque<OutPdu>,
    events: VecDeque<Event>,
    last_rx: Option<Instant>,
    ping: Option<(u32, Instant)>,
    /// A long Text response being sent in parts: (ITT, TTT, remaining text).
    text_continuation: Option<(u32, u32, Bytes)>,
}

impl TargetConnection {
    pub fn new(config: std::sync::Arc<PortalConfig>) -> Self {
        let login = Box::new(TargetLogin::new(&config));
        TargetConnection {
            config,
            phase: Phase::Login(login),
            params: SessionParams::default(),
            stat_sn: 0,
            exp_cmd_sn: Sn(0),
            max_cmd_sn: Sn(0),
            waiting: BTreeMap::new(),
            writes: HashMap::new(),
            executing: HashMap::new(),
            login_itt: 0,
            next_ttt: 1,
            isid: Isid(0),
            tsih: 0,
            initiator_name: String::new(),
            target_name: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            last_rx: None,
            ping: None,
            text_continuation: None,
        }
    }

    // ---- getters ----

    pub fn is_full_feature(&self) -> bool {
        matches!(self.phase, Phase::FullFeature)
    }
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }
    pub fn params(&self) -> &SessionParams {
        &self.params
    }
    pub fn initiator_name(&self) -> &str {
        &self.initiator_name
    }
    pub fn target_name(&self) -> Option<&str> {
        self.target_name.as_deref()
    }
    pub fn isid(&self) -> Isid {
        self.isid
    }
    pub fn tsih(&self) -> u16 {
        self.tsih
    }

    // ---- poll_* ----

    pub fn poll_transmit(&mut self) -> Option<OutPdu> {
        self.transmit.pop_front()
    }
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
    /// When [`Self::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.is_full_feature() {
            return None;
        }
        if let Some((_, sent)) = self.ping {
            return Some(sent + self.config.nop_in_timeout);
        }
        let interval = self.config.nop_in_interval?;
        Some(self.last_rx? + interval)
    }

    // ---- handle_* ----

    /// One framed PDU (or a framing-level complaint about one) arrived at `now`.
    pub fn handle_pdu(&mut self, pdu: Result<RawPdu, PduError>, now: Instant) {
        self.last_rx = Some(now);
        let pdu = match pdu {
            Ok(p) => p,
            Err(e) => {
                let reason = match e {
                    PduError::DataDigest { .. } => RejectReason::DATA_DIGEST_ERROR,
                    PduError::DataSegmentTooLong { .. } => RejectReason::PROTOCOL_ERROR,
                };
                if self.is_full_feature() {
                    self.reject(reason, e.bhs());
                } else {
                    self.close("malformed PDU during login");
                }
                return;
            }
        };
        let header = match Header::parse(&pdu.bhs) {
            Ok(h) => h,
            Err(_) => {
                if self.is_full_feature() {
                    self.reject(RejectReason::COMMAND_NOT_SUPPORTED, &pdu.bhs);
                } else {
                    self.close("unknown opcode during login");
                }
                return;
            }
        };
        match &self.phase {
            Phase::Login(_) => match header {
                Header::LoginRequest(req) => self.handle_login(req, &pdu.data),
                _ => self.close("non-login PDU during login"),
            },
            Phase::AwaitingSession { .. } => self.close("PDU before login completed"),
            Phase::Closed => {}
            Phase::FullFeature => self.handle_full_feature(header, pdu),
        }
    }

    /// The clock moved to `now`: send a NOP-In ping or give up on an unanswered one.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.is_full_feature() {
            return;
        }
        if let Some((_, sent)) = self.ping {
            if now >= sent + self.config.nop_in_timeout {
                self.close("NOP-In ping timed out");
            }
            return;
        }
        let (Some(interval), Some(last)) = (self.config.nop_in_interval, self.last_rx) else {
            return;
        };
        if now >= last + interval {
            let ttt = self.alloc_ttt();
            let bhs = NopIn {
                lun: 0,
                itt: RESERVED_TAG,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn.0,
                max_cmd_sn: self.max_cmd_sn.0,
            }
            .to_bhs();
            self.push(bhs, Bytes::new());
            self.ping = Some((ttt, now));
        }
    }

    // ---- commands from the driver ----

    /// The driver placed the session: send the final login response.
    pub fn accept_session(&mut self, tsih: u16) {
        let Phase::AwaitingSession { csg, text, params } =
            std::mem::replace(&mut self.phase, Phase::FullFeature)
        else {
            return;
        };
        self.tsih = tsih;
        self.params = *params;
        self.send_login_response(
            true,
            csg,
            Stage::FullFeaturePhase,
            LoginStatus::SUCCESS,
            text,
        );
        let rx = FrameLimits {
            header_digest: self.params.header_digest,
            data_digest: self.params.data_digest,
            max_recv_data_segment_len: self.params.max_recv_data_segment_length,
        };
        let tx = FrameLimits {
            max_recv_data_segment_len: self.params.max_xmit_data_segment_length,
            ..rx
        };
        self.events.push_back(Event::FullFeature {
            params: Box::new(self.params.clone()),
            rx,
            tx,
        });
    }

    pub fn refuse_session(&mut self, status: LoginStatus) {
        if let Phase::AwaitingSession { csg, .. } = self.phase {
            self.send_login_response(false, csg, csg, status, Vec::new());
            self.close("login refused");
        }
    }

    /// A command finished. `data` is what the command produced (before truncation to the
    /// expected length); `write_len` is the Data-Out length the command needed, if any.
    pub fn complete(
        &mut self,
        itt: u32,
        status: Status,
        sense: &[u8],
        data: Bytes,
        write_len: Option<u32>,
    ) {
        let Some(cmd) = self.executing.remove(&itt) else {
            return;
        };
        self.update_window();
        let edtl = cmd.expected_data_transfer_length;
        let mut resp = ScsiResponse {
            status,
            itt,
            exp_cmd_sn: 0,
            ..Default::default()
        };
        // Residuals (§11.4.5): compare what the command transfers with what was expected.
        let natural = if cmd.read && !data.is_empty() {
            data.len() as u32
        } else {
            write_len.unwrap_or(data.len() as u32)
        };
        let natural = if !cmd.read && !cmd.write {
            data.len() as u32
        } else {
            natural
        };
        if natural < edtl {
            resp.underflow = true;
            resp.residual_count = edtl - natural;
        } else if natural > edtl {
            resp.overflow = true;
            resp.residual_count = natural - edtl;
        }
        let data_in = if cmd.read {
            data.slice(..data.len().min(edtl as usize))
        } else {
            Bytes::new()
        };
        if !data_in.is_empty() {
            let collapse = status == Status::GOOD && sense.is_empty();
            self.send_data_in(itt, &cmd, data_in, collapse.then_some(&resp));
            if collapse {
                return;
            }
        }
        let sense_segment = if sense.is_empty() {
            Bytes::new()
        } else {
            let mut seg = Vec::with_capacity(2 + sense.len());
            seg.extend_from_slice(&(sense.len() as u16).to_be_bytes());
            seg.extend_from_slice(sense);
            Bytes::from(seg)
        };
        resp.stat_sn = self.next_stat_sn();
        resp.exp_cmd_sn = self.exp_cmd_sn.0;
        resp.max_cmd_sn = self.max_cmd_sn.0;
        self.push(resp.to_bhs(), sense_segment);
    }

    /// The driver carried out a task management function.
    pub fn tmf_done(&mut self, itt: u32, response: TmfResponse) {
        self.send_tmf_response(itt, response);
    }

    // ---- internals: login ----

    fn handle_login(&mut self, req: LoginRequest, data: &[u8]) {
        let Phase::Login(login) = &mut self.phase else {
            return;
        };
        if login.first_request().is_none() {
            self.exp_cmd_sn = Sn(req.cmd_sn);
            self.max_cmd_sn = Sn(req.cmd_sn);
            self.isid = req.isid;
            self.login_itt = req.itt;
            self.stat_sn = req.exp_stat_sn;
        }
        let outcome = login.step(&req, data, &self.config);
        match outcome {
            LoginOutcome::Respond {
                transit,
                csg,
                nsg,
                text,
            } => self.send_login_response(transit, csg, nsg, LoginStatus::SUCCESS, text),
            LoginOutcome::Fail(status) => {
                let csg = Stage::from_bits(req.csg).unwrap_or(Stage::SecurityNegotiation);
                self.send_login_response(false, csg, csg, status, Vec::new());
                self.close(&format!("login failed with status {status:?}"));
            }
            LoginOutcome::Complete {
                csg,
                text,
                params,
                initiator_name,
                target_name,
            } => {
                self.initiator_name = initiator_name.clone();
                self.target_name = target_name.clone();
                let session_type = params.session_type;
                self.phase = Phase::AwaitingSession { csg, text, params };
                self.events
                    .push_back(Event::SessionRequested(SessionRequest {
                        initiator_name,
                        isid: req.isid,
                        tsih: req.tsih,
                        cid: req.cid,
                        target_name,
                        session_type,
                    }));
            }
        }
    }

    fn send_login_response(
        &mut self,
        transit: bool,
        csg: Stage,
        nsg: Stage,
        status: LoginStatus,
        text: Vec<u8>,
    ) {
        self.update_window();
        let itt = self.login_itt;
        let resp = LoginResponse {
            transit,
            continue_: false,
            csg: csg.bits(),
            nsg: if transit { nsg.bits() } else { 0 },
            version_max: 0,
            version_active: 0,
            isid: self.isid,
            tsih: if status == LoginStatus::SUCCESS {
                self.tsih
            } else {
                0
            },
            itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.max_cmd_sn.0,
            status,
        };
        self.push(resp.to_bhs(), Bytes::from(text));
    }
}

/// Which requests take a place in the command window.
fn ordered_cmd_sn(h: &Header) -> Option<(bool, u32)> {
    match h {
        Header::NopOut(x) => Some((x.immediate, x.cmd_sn)),
        Header::ScsiCommand(x) => Some((x.immediate, x.cmd_sn)),
        Header::TaskMgmtRequest(x) => Some((x.immediate, x.cmd_sn)),
        Header::TextRequest(x) => Some((x.immediate, x.cmd_sn)),
        Header::LogoutRequest(x) => Some((x.immediate, x.cmd_sn)),
        _ => None,
    }
}

/// Fixed-format sense ABORTED COMMAND, DATA PHASE ERROR (4B/00): a broken Data-Out sequence.
const DATA_PHASE_ERROR: [u8; 18] = [
    0x70, 0, 0x0b, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4b, 0, 0, 0, 0, 0,
];
/// Fixed-format sense ILLEGAL REQUEST, INVALID FIELD IN CDB (24/00).
const INVALID_FIELD_IN_CDB: [u8; 18] = [
    0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0,
];
/// Largest write the target gathers in memory (well above any LU's maximum transfer).
const MAX_WRITE_BUFFER: u32 = 256 << 20;
/// What a write buffer starts with before Data-Out arrives.
const INITIAL_WRITE_BUFFER: usize = 1 << 20;

/// Most out-of-order commands a session may queue (bounds memory per session).
const MAX_WAITING: usize = 1024;

impl TargetConnection {
    // ---- internals: full feature phase ----

    fn handle_full_feature(&mut self, header: Header, pdu: RawPdu) {
        match ordered_cmd_sn(&header) {
            Some((true, _)) | None => self.dispatch(header, pdu),
            Some((false, cmd_sn)) => {
                let sn = Sn(cmd_sn);
                if !sn.in_window(self.exp_cmd_sn, self.max_cmd_sn) {
                    // RFC 7143 §4.2.2.1: outside the window, silently ignored.
                    return;
                }
                if sn != self.exp_cmd_sn {
                    if self.waiting.len() < MAX_WAITING {
                        self.waiting
                            .insert(self.exp_cmd_sn.distance(sn), (header, pdu));
                    }
                    return;
                }
                self.exp_cmd_sn += 1;
                self.update_window();
                self.dispatch(header, pdu);
                self.drain_waiting();
            }
        }
    }

    /// Delivers queued commands whose turn has come.
    fn drain_waiting(&mut self) {
        while !self.waiting.is_empty() {
            // Keys are distances from the ExpCmdSN at insertion; recompute against now.
            let next = self
                .waiting
                .iter()
                .find(|(_, (h, _))| {
                    ordered_cmd_sn(h).is_some_and(|(_, sn)| Sn(sn) == self.exp_cmd_sn)
                })
                .map(|(k, _)| *k);
            let Some(k) = next else { break };
            let Some((h, p)) = self.waiting.remove(&k) else {
                break;
            };
            self.exp_cmd_sn += 1;
            self.update_window();
            self.dispatch(h, p);
        }
    }

    fn dispatch(&mut self, header: Header, pdu: RawPdu) {
        if self.is_closed() {
            return;
        }
        match header {
            Header::ScsiCommand(cmd) => self.handle_scsi_command(cmd, pdu),
            Header::DataOut(d) => self.handle_data_out(d, pdu),
            Header::NopOut(n) => self.handle_nop_out(n, pdu),
            Header::TaskMgmtRequest(t) => self.handle_tmf(t),
            Header::TextRequest(t) => self.handle_text(t, pdu),
            Header::LogoutRequest(l) => self.handle_logout(l),
            Header::SnackRequest(_) => self.reject(RejectReason::PROTOCOL_ERROR, &pdu.bhs),
            Header::LoginRequest(_) => self.reject(RejectReason::PROTOCOL_ERROR, &pdu.bhs),
            // Target-to-initiator opcodes sent to a target.
            _ => self.reject(RejectReason::PROTOCOL_ERROR, &pdu.bhs),
        }
    }

    fn handle_scsi_command(&mut self, cmd: ScsiCommand, pdu: RawPdu) {
        if self.writes.contains_key(&cmd.itt) || self.executing.contains_key(&cmd.itt) {
            // An ITT must be unique among the tasks in progress (§11.2.1.8).
            self.reject(RejectReason::TASK_IN_PROGRESS, &pdu.bhs);
            return;
        }
        let cdb = match ahs::full_cdb(&cmd.cdb, &pdu.ahs) {
            Ok(c) => c,
            Err(_) => return self.reject(RejectReason::INVALID_PDU_FIELD, &pdu.bhs),
        };
        let edtl = cmd.expected_data_transfer_length;
        let immediate_len = pdu.data.len() as u32;
        if immediate_len > 0
            && (!cmd.write
                || !self.params.immediate_data
                || immediate_len > edtl
                || immediate_len > self.params.first_burst_length)
        {
            return self.reject(RejectReason::PROTOCOL_ERROR, &pdu.bhs);
        }
        let command = Command {
            itt: cmd.itt,
            raw_lun: cmd.lun,
            cdb,
            data_out: Bytes::new(),
            expected_data_transfer_length: edtl,
            read: cmd.read,
            write: cmd.write,
        };
        if !cmd.write || edtl == 0 || immediate_len == edtl {
            let data_out = pdu.data.clone();
            return self.execute(Command {
                data_out,
                ..command
            });
        }
        // Unsolicited data may follow only with InitialR2T=No, up to FirstBurstLength.
        let unsolicited_end = if !self.params.initial_r2t && !cmd.final_ {
            edtl.min(self.params.first_burst_length)
        } else {
            immediate_len
        };
        if edtl > MAX_WRITE_BUFFER {
            // Far beyond any LU's transfer limit: refuse before soliciting any data.
            self.fail_task(cmd.itt, cmd.read, cmd.write, edtl, &INVALID_FIELD_IN_CDB);
            return;
        }
        // Grown as Data-Out arrives: the header alone must not commit memory.
        let mut buf = BytesMut::with_capacity((edtl as usize).min(INITIAL_WRITE_BUFFER));
        buf.extend_from_slice(&pdu.data);
        let task = WriteTask {
            cmd: command,
            buf,
            received: immediate_len,
            unsolicited_end,
            next_r2t_offset: unsolicited_end,
            next_r2t_sn: 0,
            r2ts: HashMap::new(),
            unsolicited_data_sn: 0,
        };
        self.writes.insert(cmd.itt, task);
        self.send_r2ts(cmd.itt);
    }

    /// Solicits Data-Out up to MaxOutstandingR2T bursts of at most MaxBurstLength.
    fn send_r2ts(&mut self, itt: u32) {
        let max_out = usize::from(self.params.max_outstanding_r2t.max(1));
        let burst = self.params.max_burst_length.max(512);
        loop {
            let ttt = self.next_ttt;
            let Some(task) = self.writes.get_mut(&itt) else {
                return;
            };
            let edtl = task.cmd.expected_data_transfer_length;
            // Wait for the unsolicited part before soliciting the rest.
            if task.r2ts.len() >= max_out || task.next_r2t_offset >= edtl {
                return;
            }
            let len = burst.min(edtl - task.next_r2t_offset);
            let r2t = R2t {
                lun: task.cmd.raw_lun,
                itt,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.exp_cmd_sn.0,
                max_cmd_sn: self.max_cmd_sn.0,
                r2t_sn: task.next_r2t_sn,
                buffer_offset: task.next_r2t_offset,
                desired_data_transfer_length: len,
            };
            task.r2ts.insert(
                ttt,
                R2tState {
                    offset: task.next_r2t_offset,
                    len,
                    received: 0,
                    next_data_sn: 0,
                },
            );
            task.next_r2t_offset += len;
            task.next_r2t_sn += 1;
            self.alloc_ttt();
            self.push(r2t.to_bhs(), Bytes::new());
        }
    }

    fn handle_data_out(&mut self, d: DataOut, pdu: RawPdu) {
        let Some(task) = self.writes.get_mut(&d.itt) else {
            // Data for a task we no longer have (failed or aborted): §4.2.3.3 lets us drop it,
            // and a Reject would name a task the initiator may already have forgotten.
            return;
        };
        let len = pdu.data.len() as u32;
        let edtl = task.cmd.expected_data_transfer_length;
        let end = d.buffer_offset.checked_add(len);
        let in_range = end.is_some_and(|e| e <= edtl);
        let sequence_ok = if d.ttt == RESERVED_TAG {
            let ok = d.data_sn == task.unsolicited_data_sn
                && end.is_some_and(|e| e <= task.unsolicited_end);
            task.unsolicited_data_sn = task.unsolicited_data_sn.wrapping_add(1);
            ok
        } else {
            match task.r2ts.get_mut(&d.ttt) {
                Some(r) => {
                    let ok = d.data_sn == r.next_data_sn
                        && d.buffer_offset >= r.offset
                        && end.is_some_and(|e| e <= r.offset + r.len);
                    r.next_data_sn = r.next_data_sn.wrapping_add(1);
                    ok
                }
                None => false,
            }
        };
        if !in_range || !sequence_ok {
            // ERL 0 cannot recover a Data-Out sequence: fail the command, drop the rest of its data.
            if let Some(task) = self.writes.remove(&d.itt) {
                let c = &task.cmd;
                let edtl = c.expected_data_transfer_length;
                self.fail_task(c.itt, c.read, c.write, edtl, &DATA_PHASE_ERROR);
            }
            return;
        }
        let start = d.buffer_offset as usize;
        if task.buf.len() < start {
            task.buf.resize(start, 0);
        }
        let overlap = task.buf.len().saturating_sub(start).min(pdu.data.len());
        task.buf[start..start + overlap].copy_from_slice(&pdu.data[..overlap]);
        task.buf.extend_from_slice(&pdu.data[overlap..]);
        task.received += len;
        let mut burst_done = false;
        if d.ttt != RESERVED_TAG {
            if let Some(r) = task.r2ts.get_mut(&d.ttt) {
                r.received += len;
                if d.final_ || r.received >= r.len {
                    burst_done = true;
                }
            }
            if burst_done {
                task.r2ts.remove(&d.ttt);
            }
        }
        if task.received >= edtl {
            if let Some(task) = self.writes.remove(&d.itt) {
                let data_out = task.buf.freeze();
                self.execute(Command {
                    data_out,
                    ..task.cmd
                });
            }
        } else if burst_done || (d.ttt == RESERVED_TAG && d.final_) {
            self.send_r2ts(d.itt);
        }
    }

    /// A command that cannot run ends with CHECK CONDITION and the given sense.
    fn fail_task(&mut self, itt: u32, read: bool, write: bool, edtl: u32, sense: &[u8]) {
        let expected_data_transfer_length = edtl;
        let task = Executing {
            read,
            write,
            raw_lun: 0,
            expected_data_transfer_length,
        };
        self.executing.insert(itt, task);
        self.complete(
            itt,
            Status::CHECK_CONDITION,
            sense,
            Bytes::new(),
            Some(edtl),
        );
    }

    fn execute(&mut self, cmd: Command) {
        self.executing.insert(
            cmd.itt,
            Executing {
                read: cmd.read,
                write: cmd.write,
                raw_lun: cmd.raw_lun,
                expected_data_transfer_length: cmd.expected_data_transfer_length,
            },
        );
        self.events.push_back(Event::Execute(cmd));
    }

    /// Sends read data in PDUs of at most the initiator's MaxRecvDataSegmentLength, in
    /// sequences of at most MaxBurstLength; the last one carries the status if `status` is set.
    fn send_data_in(
        &mut self,
        itt: u32,
        cmd: &Executing,
        data: Bytes,
        status: Option<&ScsiResponse>,
    ) {
        let seg = self.params.max_xmit_data_segment_length.max(512) as usize;
        let burst = self.params.max_burst_length.max(512) as usize;
        let total = data.len();
        let mut offset = 0usize;
        let mut data_sn = 0u32;
        while offset < total {
            let burst_end = (offset / burst + 1) * burst;
            let len = seg.min(total - offset).min(burst_end - offset);
            let last = offset + len == total;
            let mut din = DataIn {
                final_: last || offset + len == burst_end,
                lun: cmd.raw_lun,
                itt,
                ttt: RESERVED_TAG,
                data_sn,
                buffer_offset: offset as u32,
                ..Default::default()
            };
            if let (true, Some(resp)) = (last, status) {
                din.status = Some(resp.status);
                din.overflow = resp.overflow;
                din.underflow = resp.underflow;
                din.residual_count = resp.residual_count;
                din.stat_sn = self.next_stat_sn();
            }
            din.exp_cmd_sn = self.exp_cmd_sn.0;
            din.max_cmd_sn = self.max_cmd_sn.0;
            self.push(din.to_bhs(), data.slice(offset..offset + len));
            offset += len;
            data_sn += 1;
        }
    }

    fn handle_nop_out(&mut self, n: NopOut, pdu: RawPdu) {
        if n.itt == RESERVED_TAG {
            // The answer to our ping.
            if self.ping.is_some_and(|(ttt, _)| ttt == n.ttt) {
                self.ping = None;
            }
            return;
        }
        let resp = NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: RESERVED_TAG,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.max_cmd_sn.0,
        };
        // The echo must fit the initiator's MaxRecvDataSegmentLength.
        let max = self.params.max_xmit_data_segment_length as usize;
        let data = pdu.data.slice(..pdu.data.len().min(max));
        self.push(resp.to_bhs(), data);
    }

    fn handle_tmf(&mut self, t: TaskMgmtRequest) {
        match t.function {
            TmfFunction::ABORT_TASK => {
                let rtt = t.referenced_task_tag;
                let found = self.writes.remove(&rtt).is_some()
                    || self.executing.remove(&rtt).is_some()
                    || self.remove_waiting(|h| header_itt(h) == Some(rtt));
                // §11.5.1: a task never received but inside the window counts as received.
                // §11.5.1: a referenced command not yet received (its CmdSN still inside the
                // window) counts as received and aborted; a finished one does not exist.
                let never_received = Sn(t.ref_cmd_sn).lt(Sn(t.cmd_sn))
                    && Sn(t.ref_cmd_sn).in_window(self.exp_cmd_sn, self.max_cmd_sn);
                let response = if found || never_received {
                    TmfResponse::FUNCTION_COMPLETE
                } else {
                    TmfResponse::TASK_DOES_NOT_EXIST
                };
                self.send_tmf_response(t.itt, response);
            }
            TmfFunction::ABORT_TASK_SET | TmfFunction::CLEAR_TASK_SET => {
                self.abort_lun_tasks(Some(t.lun));
                self.send_tmf_response(t.itt, TmfResponse::FUNCTION_COMPLETE);
            }
            TmfFunction::CLEAR_ACA => self.send_tmf_response(t.itt, TmfResponse::FUNCTION_COMPLETE),
            TmfFunction::LOGICAL_UNIT_RESET => {
                self.abort_lun_tasks(Some(t.lun));
                self.events.push_back(Event::TaskManagement(TmfRequest {
                    itt: t.itt,
                    function: t.function,
                    raw_lun: t.lun,
                }));
            }
            TmfFunction::TARGET_WARM_RESET | TmfFunction::TARGET_COLD_RESET => {
                self.abort_lun_tasks(None);
                self.events.push_back(Event::TaskManagement(TmfRequest {
                    itt: t.itt,
                    function: t.function,
                    raw_lun: t.lun,
                }));
            }
            TmfFunction::TASK_REASSIGN => {
                self.send_tmf_response(t.itt, TmfResponse::TASK_REASSIGNMENT_NOT_SUPPORTED)
            }
            _ => self.send_tmf_response(t.itt, TmfResponse::FUNCTION_NOT_SUPPORTED),
        }
    }

    fn abort_lun_tasks(&mut self, lun: Option<u64>) {
        self.writes
            .retain(|_, t| lun.is_some_and(|l| l != t.cmd.raw_lun));
        self.executing
            .retain(|_, t| lun.is_some_and(|l| l != t.raw_lun));
        self.remove_waiting(
            |h| matches!(h, Header::ScsiCommand(c) if lun.is_none_or(|l| l == c.lun)),
        );
    }

    fn remove_waiting(&mut self, pred: impl Fn(&Header) -> bool) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|_, (h, _)| !pred(h));
        before != self.waiting.len()
    }

    fn send_tmf_response(&mut self, itt: u32, response: TmfResponse) {
        let resp = TaskMgmtResponse {
            response,
            itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.max_cmd_sn.0,
        };
        self.push(resp.to_bhs(), Bytes::new());
    }

    fn handle_text(&mut self, t: TextRequest, pdu: RawPdu) {
        // Continuation of a long answer: the initiator asks for the next part.
        if let Some((itt, ttt, rest)) = self.text_continuation.take() {
            if t.itt == itt && t.ttt == ttt {
                return self.send_text_parts(t.itt, rest);
            }
        }
        let offers = match keys::parse_text(&pdu.data) {
            Ok(o) => o,
            Err(_) => return self.reject(RejectReason::PROTOCOL_ERROR, &pdu.bhs),
        };
        let mut answers: Vec<(String, String)> = Vec::new();
        let mut rest: Vec<(String, String)> = Vec::new();
        for (k, v) in offers {
            if k == "SendTargets" {
                self.send_targets(&v, &mut answers);
            } else {
                rest.push((k, v));
            }
        }
        if !rest.is_empty() {
            let mut neg =
                keys::Negotiation::new(keys::Role::Target, self.config.negotiation.clone());
            match neg.respond(keys::Stage::FullFeature, false, &rest) {
                Ok(r) => answers.extend(r.answers),
                Err(_) => return self.reject(RejectReason::PROTOCOL_ERROR, &pdu.bhs),
            }
        }
        self.send_text_parts(t.itt, Bytes::from(keys::encode_text(&answers)));
    }

    fn send_targets(&self, which: &str, answers: &mut Vec<(String, String)>) {
        let allowed = self
            .config
            .targets
            .iter()
            .filter(|t| t.allows(&self.initiator_name));
        for target in allowed {
            let wanted = match which {
                "All" => self.params.session_type == SessionType::Discovery,
                "" => self
                    .target_name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(&target.name)),
                name => name.eq_ignore_ascii_case(&target.name),
            };
            if wanted {
                answers.push(("TargetName".into(), target.name.clone()));
                for a in &self.config.addresses {
                    answers.push(("TargetAddress".into(), a.clone()));
                }
            }
        }
    }

    fn send_text_parts(&mut self, itt: u32, text: Bytes) {
        let max = self.params.max_xmit_data_segment_length.max(512) as usize;
        let (part, rest) = if text.len() > max {
            (text.slice(..max), text.slice(max..))
        } else {
            (text, Bytes::new())
        };
        let more = !rest.is_empty();
        let ttt = if more { self.alloc_ttt() } else { RESERVED_TAG };
        if more {
            self.text_continuation = Some((itt, ttt, rest));
        }
        let resp = TextResponse {
            final_: !more,
            continue_: more,
            lun: 0,
            itt,
            ttt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.max_cmd_sn.0,
        };
        self.push(resp.to_bhs(), part);
    }

    fn handle_logout(&mut self, l: LogoutRequest) {
        let response = match l.reason {
            LogoutReason::CLOSE_SESSION | LogoutReason::CLOSE_CONNECTION => {
                LogoutResponseCode::CLOSED_SUCCESSFULLY
            }
            _ => LogoutResponseCode::RECOVERY_NOT_SUPPORTED,
        };
        let resp = LogoutResponse {
            response,
            itt: l.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.max_cmd_sn.0,
            time2wait: 0,
            time2retain: 0,
        };
        self.push(resp.to_bhs(), Bytes::new());
        if response == LogoutResponseCode::CLOSED_SUCCESSFULLY {
            self.close("logout");
        }
    }

    fn reject(&mut self, reason: RejectReason, bhs: &Bhs) {
        let rej = Reject {
            reason,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn.0,
            max_cmd_sn: self.max_cmd_sn.0,
            data_sn_or_r2t_sn: 0,
        };
        self.push(rej.to_bhs(), Bytes::copy_from_slice(&bhs.0));
    }

    // ---- small helpers ----

    fn push(&mut self, bhs: Bhs, data: Bytes) {
        self.transmit.push_back(OutPdu {
            bhs,
            ahs: Bytes::new(),
            data,
        });
    }

    fn next_stat_sn(&mut self) -> u32 {
        let sn = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        sn
    }

    fn alloc_ttt(&mut self) -> u32 {
        let ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        ttt
    }

    /// MaxCmdSN = ExpCmdSN + window - 1, never moving backwards (§4.2.2.1).
    fn update_window(&mut self) {
        let window = self.config.command_window.max(1);
        let max = self.exp_cmd_sn + (window - 1);
        if max.gt(self.max_cmd_sn) || self.max_cmd_sn == self.exp_cmd_sn {
            self.max_cmd_sn = max;
        }
    }

    fn close(&mut self, reason: &str) {
        if !self.is_closed() {
            self.phase = Phase::Closed;
            self.events.push_back(Event::Close {
                reason: reason.to_string(),
            });
        }
    }
}

fn header_itt(h: &Header) -> Option<u32> {
    match h {
        Header::ScsiCommand(c) => Some(c.itt),
        _ => None,
    }
}
