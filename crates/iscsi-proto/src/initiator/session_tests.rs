//! The initiator session as conversations in memory: against hand-built target PDUs, and
//! paired with the real target core ([`TargetConnection`]) over the real framer, with a tiny
//! in-memory disk executing READ(16) and WRITE(16).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_wire::frame::encode_pdu;
use iscsi_wire::pdu::ahs;
use iscsi_wire::*;
// The Data-In PDU header, not the initiator's gathered data of the same name.
use iscsi_wire::DataIn;
use proptest::prelude::*;

use super::*;
use crate::initiator::{Event, LoginResult, Residual, ScsiCompletion, ScsiRequest, TaskAttr};
use crate::initiator::{SessionConfig, SubmitError, TargetNotice, TaskId};
use crate::keys::{self, NegotiationConfig, SessionParams};
use crate::target::{self, AuthPolicy, PortalConfig, TargetConnection, TargetEntry};

// ---------------------------------------------------------------------------------------------
// Helpers: requests, hand-built target PDUs
// ---------------------------------------------------------------------------------------------

const BLOCK: usize = 512;

fn cdb16(op: u8, lba: u64, blocks: u32) -> Bytes {
    let mut cdb = [0u8; 16];
    cdb[0] = op;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    Bytes::copy_from_slice(&cdb)
}

fn read(lba: u64, blocks: u32) -> ScsiRequest {
    ScsiRequest {
        lun: 0,
        cdb: cdb16(0x88, lba, blocks),
        data_out: Bytes::new(),
        read_len: blocks * BLOCK as u32,
        attr: TaskAttr::Simple,
    }
}

fn write(lba: u64, data: Bytes) -> ScsiRequest {
    ScsiRequest {
        lun: 0,
        cdb: cdb16(0x8a, lba, (data.len() / BLOCK) as u32),
        data_out: data,
        read_len: 0,
        attr: TaskAttr::Simple,
    }
}

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn quiet() -> SessionConfig {
    SessionConfig {
        nop_interval: None,
        nop_timeout: Duration::from_secs(5),
    }
}

fn login_result(params: SessionParams) -> LoginResult {
    LoginResult {
        params,
        tsih: 1,
        isid: Isid(0x23d000001),
        cid: 0,
        cmd_sn: 100,
        exp_stat_sn: 50,
        exp_cmd_sn: 100,
        max_cmd_sn: 131,
        target_portal_group_tag: Some(1),
        authenticated_target: None,
        weak_secret: false,
    }
}

fn session_with(params: SessionParams, config: SessionConfig, now: Instant) -> InitiatorSession {
    InitiatorSession::new(&login_result(params), config, now)
}

fn session() -> InitiatorSession {
    session_with(SessionParams::default(), quiet(), Instant::now())
}

fn raw(bhs: Bhs, data: impl Into<Bytes>) -> Result<RawPdu, PduError> {
    let data = data.into();
    let mut bhs = bhs;
    bhs.set_data_segment_len(data.len() as u32);
    Ok(RawPdu {
        bhs,
        ahs: Bytes::new(),
        data,
    })
}

fn sent(s: &mut InitiatorSession) -> Vec<(Header, Bytes)> {
    std::iter::from_fn(|| s.poll_transmit())
        .map(|o| (Header::parse(&o.bhs).unwrap(), o.data))
        .collect()
}

fn events(s: &mut InitiatorSession) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn completions(events: Vec<Event>) -> Vec<ScsiCompletion> {
    events
        .into_iter()
        .map(|e| match e {
            Event::Completed(c) => c,
            other => panic!("expected a completion, got {other:?}"),
        })
        .collect()
}

fn failed(events: &[Event]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::ConnectionFailed { .. }))
}

/// The one SCSI Command in `out`.
fn command(out: &[(Header, Bytes)]) -> ScsiCommand {
    let cmds: Vec<_> = out
        .iter()
        .filter_map(|(h, _)| match h {
            Header::ScsiCommand(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(cmds.len(), 1, "{out:?}");
    cmds[0].clone()
}

/// A Data-In as a target sends it (window numbers match the hand-made login).
fn data_in(itt: u32, data_sn: u32, offset: u32, status: Option<(Status, u32)>) -> DataIn {
    DataIn {
        final_: status.is_some(),
        status: status.map(|(s, _)| s),
        itt,
        ttt: RESERVED_TAG,
        stat_sn: status.map_or(0, |(_, sn)| sn),
        exp_cmd_sn: 101,
        max_cmd_sn: 132,
        data_sn,
        buffer_offset: offset,
        ..Default::default()
    }
}

fn response(itt: u32, stat_sn: u32, status: Status) -> ScsiResponse {
    ScsiResponse {
        status,
        itt,
        stat_sn,
        exp_cmd_sn: 101,
        max_cmd_sn: 132,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers: the real target core and a tiny disk
// ---------------------------------------------------------------------------------------------

const TARGET_NAME: &str = "iqn.2024-01.test:disk";

fn portal(negotiation: NegotiationConfig, window: u32, nop: Option<Duration>) -> Arc<PortalConfig> {
    Arc::new(PortalConfig {
        targets: vec![TargetEntry {
            name: TARGET_NAME.into(),
            alias: None,
            auth: AuthPolicy::default(),
            allowed_initiators: Vec::new(),
        }],
        discovery_auth: AuthPolicy::default(),
        negotiation,
        portal_group_tag: 1,
        addresses: vec!["127.0.0.1:3260,1".into()],
        command_window: window,
        nop_in_interval: nop,
        nop_in_timeout: Duration::from_secs(5),
    })
}

/// Fixed-format sense ILLEGAL REQUEST, LBA OUT OF RANGE (21/00).
const LBA_OUT_OF_RANGE: [u8; 18] = [
    0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0,
];

/// Runs READ(16)/WRITE(16) on `disk`: (status, sense, data, write_len).
fn disk_io(disk: &mut [u8], cmd: &target::Command) -> (Status, Vec<u8>, Bytes, Option<u32>) {
    let c = &cmd.cdb;
    let lba = u64::from_be_bytes(c[2..10].try_into().unwrap()) as usize;
    let blocks = u32::from_be_bytes(c[10..14].try_into().unwrap()) as usize;
    let (start, len) = (lba * BLOCK, blocks * BLOCK);
    if start + len > disk.len() {
        return (
            Status::CHECK_CONDITION,
            LBA_OUT_OF_RANGE.to_vec(),
            Bytes::new(),
            None,
        );
    }
    match c[0] {
        0x88 => (
            Status::GOOD,
            Vec::new(),
            Bytes::copy_from_slice(&disk[start..start + len]),
            None,
        ),
        0x8a => {
            let n = cmd.data_out.len().min(len);
            disk[start..start + n].copy_from_slice(&cmd.data_out[..n]);
            (Status::GOOD, Vec::new(), Bytes::new(), Some(len as u32))
        }
        op => panic!("the test disk does not know opcode 0x{op:02x}"),
    }
}

/// Through the real framer, as the network would deliver it.
fn frame(out: OutPdu) -> Result<RawPdu, PduError> {
    let limits = FrameLimits {
        header_digest: true,
        data_digest: true,
        max_recv_data_segment_len: 1 << 24,
    };
    let mut wire = Vec::new();
    encode_pdu(&out.bhs, &out.ahs, &out.data, limits, &mut wire);
    let mut buf = BytesMut::from(&wire[..]);
    let item = FrameDecoder::new(limits).decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    item
}

/// An initiator session and a target connection joined in memory.
struct Pair {
    target: TargetConnection,
    init: InitiatorSession,
    disk: Vec<u8>,
    now: Instant,
    /// Keep Execute events in `held` instead of running them.
    hold: bool,
    held: Vec<target::Command>,
    /// What the initiator sent, in order.
    wire: Vec<(Header, usize)>,
    target_closed: Option<String>,
}

/// Logs a target connection in by hand (operational keys `offers` from the initiator) and
/// builds the initiator session from what the login negotiated.
fn pair_with(portal: Arc<PortalConfig>, offers: &[(&str, &str)], config: SessionConfig) -> Pair {
    let now = Instant::now();
    let mut target = TargetConnection::new(portal);
    let security = keys::encode_text(&[
        ("InitiatorName", "iqn.2024-01.test:init"),
        ("TargetName", TARGET_NAME),
        ("SessionType", "Normal"),
        ("AuthMethod", "None"),
    ]);
    let login = LoginRequest {
        transit: true,
        csg: 0,
        nsg: 1,
        isid: Isid(0x23d000001),
        itt: 0,
        cmd_sn: 10,
        ..Default::default()
    };
    target.handle_pdu(raw(login.to_bhs(), security), now);
    let Some(Header::LoginResponse(r)) = target
        .poll_transmit()
        .map(|o| Header::parse(&o.bhs).unwrap())
    else {
        panic!("no login response")
    };
    assert_eq!(r.status, LoginStatus::SUCCESS);
    let login = LoginRequest {
        transit: true,
        csg: 1,
        nsg: 3,
        isid: Isid(0x23d000001),
        itt: 0,
        cmd_sn: 10,
        exp_stat_sn: r.stat_sn + 1,
        ..Default::default()
    };
    target.handle_pdu(raw(login.to_bhs(), keys::encode_text(offers)), now);
    assert!(matches!(
        target.poll_event(),
        Some(target::Event::SessionRequested(_))
    ));
    target.accept_session(7);
    let Some(Header::LoginResponse(last)) = target
        .poll_transmit()
        .map(|o| Header::parse(&o.bhs).unwrap())
    else {
        panic!("no final login response")
    };
    assert_eq!((last.status, last.nsg), (LoginStatus::SUCCESS, 3));
    assert!(matches!(
        target.poll_event(),
        Some(target::Event::FullFeature { .. })
    ));
    // The target's view with the directions swapped is the initiator's.
    let mut params = target.params().clone();
    std::mem::swap(
        &mut params.max_recv_data_segment_length,
        &mut params.max_xmit_data_segment_length,
    );
    let result = LoginResult {
        params,
        tsih: 7,
        isid: Isid(0x23d000001),
        cid: 0,
        cmd_sn: 10,
        exp_stat_sn: last.stat_sn + 1,
        exp_cmd_sn: last.exp_cmd_sn,
        max_cmd_sn: last.max_cmd_sn,
        target_portal_group_tag: Some(1),
        authenticated_target: None,
        weak_secret: false,
    };
    Pair {
        target,
        init: InitiatorSession::new(&result, config, now),
        disk: (0..1024 * BLOCK).map(|i| (i / BLOCK) as u8).collect(),
        now,
        hold: false,
        held: Vec::new(),
        wire: Vec::new(),
        target_closed: None,
    }
}

fn pair(offers: &[(&str, &str)]) -> Pair {
    pair_with(
        portal(NegotiationConfig::default(), 32, None),
        offers,
        quiet(),
    )
}

impl Pair {
    /// Moves PDUs both ways and runs the target's work until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(out) = self.init.poll_transmit() {
                moved = true;
                self.wire
                    .push((Header::parse(&out.bhs).unwrap(), out.data.len()));
                self.target.handle_pdu(frame(out), self.now);
            }
            while let Some(ev) = self.target.poll_event() {
                moved = true;
                match ev {
                    target::Event::Execute(cmd) if self.hold => self.held.push(cmd),
                    target::Event::Execute(cmd) => self.execute(cmd),
                    target::Event::TaskManagement(t) => {
                        self.target.tmf_done(t.itt, TmfResponse::FUNCTION_COMPLETE)
                    }
                    target::Event::Close { reason } => self.target_closed = Some(reason),
                    other => panic!("unexpected target event {other:?}"),
                }
            }
            while let Some(out) = self.target.poll_transmit() {
                moved = true;
                self.init.handle_pdu(frame(out), self.now);
            }
            if !moved {
                return;
            }
        }
    }

    fn execute(&mut self, cmd: target::Command) {
        let (status, sense, data, write_len) = disk_io(&mut self.disk, &cmd);
        self.target
            .complete(cmd.itt, status, &sense, data, write_len);
    }

    fn run_held(&mut self, n: usize) {
        for cmd in self.held.drain(..n).collect::<Vec<_>>() {
            self.execute(cmd);
        }
        self.pump();
    }

    fn events(&mut self) -> Vec<Event> {
        events(&mut self.init)
    }

    /// Submits and runs one command to completion.
    fn run(&mut self, task: u64, req: ScsiRequest) -> ScsiCompletion {
        self.init.submit(TaskId(task), req).unwrap();
        self.pump();
        let mut c = completions(self.events());
        assert_eq!(c.len(), 1);
        c.pop().unwrap()
    }

    fn sent_of<T>(&self, pick: impl Fn(&Header) -> Option<T>) -> Vec<(T, usize)> {
        self.wire
            .iter()
            .filter_map(|(h, len)| pick(h).map(|x| (x, *len)))
            .collect()
    }
}

fn block(disk: &[u8], lba: usize, blocks: usize) -> &[u8] {
    &disk[lba * BLOCK..(lba + blocks) * BLOCK]
}

// ---------------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------------

#[test]
fn read_with_phase_collapsed_status() {
    let mut p = pair(&[]);
    let c = p.run(1, read(3, 4));
    assert_eq!(c.task, TaskId(1));
    assert_eq!(c.response, ServiceResponse::COMMAND_COMPLETED);
    assert_eq!(c.status, Status::GOOD);
    assert_eq!(c.residual, Residual::None);
    assert!(c.sense.is_empty());
    assert_eq!(c.data, block(&p.disk, 3, 4));
    assert_eq!(p.init.outstanding(), 0);
    // The command carried the read length; nothing else went out.
    assert_eq!(p.wire.len(), 1);
    let Header::ScsiCommand(cmd) = &p.wire[0].0 else {
        panic!()
    };
    assert!(cmd.read && !cmd.write && cmd.final_);
    assert_eq!(cmd.expected_data_transfer_length, 4 * BLOCK as u32);
    assert_eq!((cmd.cmd_sn, cmd.attr), (10, 1));
}

#[test]
fn read_split_into_many_data_in() {
    // We receive 512-byte segments in 1 KiB sequences: 256 Data-In PDUs for 128 KiB.
    let mut p = pair(&[
        ("MaxRecvDataSegmentLength", "512"),
        ("MaxBurstLength", "1024"),
        ("FirstBurstLength", "512"),
    ]);
    assert_eq!(p.init.params().max_recv_data_segment_length, 512);
    let c = p.run(1, read(0, 256));
    assert_eq!(c.status, Status::GOOD);
    assert_eq!(c.data.len(), 256 * BLOCK);
    assert_eq!(c.data, block(&p.disk, 0, 256));
}

#[test]
fn read_gathers_with_gaps_and_truncates_to_what_arrived() {
    let mut s = session();
    s.submit(TaskId(1), read(0, 4)).unwrap();
    let itt = command(&sent(&mut s)).itt;
    let now = Instant::now();
    s.handle_pdu(raw(data_in(itt, 0, 0, None).to_bhs(), vec![1u8; 512]), now);
    // A hole of 512 bytes, then data up to 1536: the hole reads as zeros.
    s.handle_pdu(
        raw(data_in(itt, 1, 1024, None).to_bhs(), vec![3u8; 512]),
        now,
    );
    let mut last = data_in(itt, 2, 1536, Some((Status::GOOD, 50)));
    last.underflow = true;
    last.residual_count = 512;
    s.handle_pdu(raw(last.to_bhs(), Bytes::new()), now);
    let c = completions(events(&mut s)).pop().unwrap();
    assert_eq!(c.data.len(), 1536);
    let data = c.data.to_bytes();
    assert_eq!(&data[..512], &[1u8; 512][..]);
    assert_eq!(&data[512..1024], &[0u8; 512][..]);
    assert_eq!(&data[1024..], &[3u8; 512][..]);
    assert_eq!(c.residual, Residual::Underflow(512));
    assert_eq!(s.exp_stat_sn(), 51);
    assert_eq!(s.exp_cmd_sn(), 101);
    assert_eq!(s.max_cmd_sn(), 132);
}

#[test]
fn read_keeps_the_received_segments_without_copying() {
    let mut s = session();
    s.submit(TaskId(1), read(0, 6)).unwrap();
    let itt = command(&sent(&mut s)).itt;
    let now = Instant::now();
    // As the framer hands them out: slices of one receive buffer, and one of another.
    let rx = pattern(2048, 9);
    let fed = [rx.slice(..1024), rx.slice(1024..), pattern(1024, 4)];
    let mut offset = 0;
    for (sn, seg) in fed.iter().enumerate() {
        let status = (sn == 2).then_some((Status::GOOD, 50));
        let d = data_in(itt, sn as u32, offset, status);
        s.handle_pdu(raw(d.to_bhs(), seg.clone()), now);
        offset += seg.len() as u32;
    }
    let c = completions(events(&mut s)).pop().unwrap();
    assert_eq!(c.status, Status::GOOD);
    assert_eq!(c.data.len(), 3072);
    let got: Vec<(*const u8, usize)> = c
        .data
        .segments()
        .iter()
        .map(|b| (b.as_ptr(), b.len()))
        .collect();
    let want: Vec<(*const u8, usize)> = fed.iter().map(|b| (b.as_ptr(), b.len())).collect();
    assert_eq!(got, want, "the completion holds the fed buffers themselves");
    let whole: Vec<u8> = fed.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(c.data, whole[..]);
    assert_eq!(c.data.to_bytes(), whole);

    // Through the real target and framer: one segment per Data-In PDU.
    let mut p = pair(&[("MaxRecvDataSegmentLength", "4096")]);
    let c = p.run(1, read(0, 64));
    assert_eq!(c.data.segments().len(), 8);
    assert!(c.data.segments().iter().all(|b| b.len() == 4096));
    assert_eq!(c.data, block(&p.disk, 0, 64));
}

#[test]
fn read_out_of_order_falls_back_to_one_buffer() {
    let mut s = session();
    s.submit(TaskId(1), read(0, 5)).unwrap();
    let itt = command(&sent(&mut s)).itt;
    let now = Instant::now();
    // (offset, fill byte) of five 512-byte Data-In; the last one carries the status.
    let pdus = [
        (0, 1),
        (512, 2),
        // Out of order from here: the kept segments are gathered into one buffer.
        (2048, 5),
        (1536, 4),
        (1024, 3),
    ];
    for (sn, (offset, fill)) in pdus.into_iter().enumerate() {
        let status = (sn == 4).then_some((Status::GOOD, 50));
        let d = data_in(itt, sn as u32, offset, status);
        s.handle_pdu(raw(d.to_bhs(), vec![fill; 512]), now);
    }
    let c = completions(events(&mut s)).pop().unwrap();
    assert_eq!(c.status, Status::GOOD);
    assert_eq!(c.data.segments().len(), 1);
    let want: Vec<u8> = (1..=5u8).flat_map(|f| [f; 512]).collect();
    assert_eq!(c.data, want[..]);

    // Data sent again over what arrived (the later bytes win), then in order again: still one
    // buffer, still never beyond read_len.
    s.submit(TaskId(2), read(0, 2)).unwrap();
    let itt = command(&sent(&mut s)).itt;
    s.handle_pdu(raw(data_in(itt, 0, 0, None).to_bhs(), vec![1u8; 768]), now);
    s.handle_pdu(
        raw(data_in(itt, 1, 256, None).to_bhs(), vec![2u8; 256]),
        now,
    );
    let last = data_in(itt, 2, 768, Some((Status::GOOD, 51)));
    s.handle_pdu(raw(last.to_bhs(), vec![3u8; 256]), now);
    let c = completions(events(&mut s)).pop().unwrap();
    let want: Vec<u8> = [[1u8; 256], [2; 256], [1; 256], [3; 256]].concat();
    assert_eq!(c.data, want[..]);
    assert_eq!(c.data.segments().len(), 1);

    // Out of order past the end is still an overrun.
    s.submit(TaskId(3), read(0, 1)).unwrap();
    let itt = command(&sent(&mut s)).itt;
    s.handle_pdu(
        raw(data_in(itt, 0, 256, None).to_bhs(), vec![1u8; 257]),
        now,
    );
    assert!(failed(&events(&mut s)));
}

#[test]
fn underflow_residual() {
    let mut p = pair(&[]);
    // The caller expects 8 KiB; the CDB asks for 2 blocks.
    let mut req = read(5, 2);
    req.read_len = 8192;
    let c = p.run(1, req);
    assert_eq!(c.status, Status::GOOD);
    assert_eq!(c.residual, Residual::Underflow(8192 - 1024));
    assert_eq!(c.data, block(&p.disk, 5, 2));

    // And from a SCSI Response, with overflow.
    let mut s = session();
    s.submit(TaskId(9), read(0, 1)).unwrap();
    let itt = command(&sent(&mut s)).itt;
    let mut r = response(itt, 50, Status::GOOD);
    r.overflow = true;
    r.residual_count = 4096;
    s.handle_pdu(raw(r.to_bhs(), Bytes::new()), Instant::now());
    let c = completions(events(&mut s)).pop().unwrap();
    assert_eq!(c.residual, Residual::Overflow(4096));
    assert!(c.data.is_empty());
}

#[test]
fn check_condition_with_sense() {
    let mut p = pair(&[]);
    let c = p.run(1, read(5000, 1));
    assert_eq!(c.response, ServiceResponse::COMMAND_COMPLETED);
    assert_eq!(c.status, Status::CHECK_CONDITION);
    assert_eq!(&c.sense[..], &LBA_OUT_OF_RANGE[..]);
    assert!(c.data.is_empty());
    // The session goes on.
    let c = p.run(2, read(1, 1));
    assert_eq!(c.status, Status::GOOD);
}

#[test]
fn status_is_reported_exactly_once() {
    let mut s = session();
    s.submit(TaskId(1), read(0, 1)).unwrap();
    let itt = command(&sent(&mut s)).itt;
    let now = Instant::now();
    let din = data_in(itt, 0, 0, Some((Status::GOOD, 50)));
    s.handle_pdu(raw(din.to_bhs(), vec![0u8; 512]), now);
    // A stray SCSI Response for the finished task is ignored.
    s.handle_pdu(
        raw(response(itt, 51, Status::GOOD).to_bhs(), Bytes::new()),
        now,
    );
    let ev = events(&mut s);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(!s.is_finished());
    // Its ITT is free: more Data-In for it breaks the connection.
    s.handle_pdu(raw(data_in(itt, 1, 0, None).to_bhs(), vec![0u8; 4]), now);
    assert!(failed(&events(&mut s)));
}

// ---------------------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------------------

#[test]
fn write_with_immediate_data() {
    let mut p = pair(&[("ImmediateData", "Yes"), ("InitialR2T", "Yes")]);
    let data = pattern(4096, 7);
    let c = p.run(1, write(10, data.clone()));
    assert_eq!((c.status, c.residual), (Status::GOOD, Residual::None));
    assert_eq!(block(&p.disk, 10, 8), &data[..]);
    // One PDU: the command with all the data, F set, no Data-Out.
    assert_eq!(p.wire.len(), 1);
    let Header::ScsiCommand(cmd) = &p.wire[0].0 else {
        panic!()
    };
    assert!(cmd.write && !cmd.read && cmd.final_);
    assert_eq!(cmd.expected_data_transfer_length, 4096);
    assert_eq!(p.wire[0].1, 4096);
}

#[test]
fn payload_is_sliced_not_copied() {
    let params = SessionParams {
        max_xmit_data_segment_length: 1024,
        initial_r2t: false,
        first_burst_length: 4096,
        ..SessionParams::default()
    };
    let mut s = session_with(params, quiet(), Instant::now());
    let data = pattern(8192, 1);
    s.submit(TaskId(1), write(0, data.clone())).unwrap();
    let out: Vec<OutPdu> = std::iter::from_fn(|| s.poll_transmit()).collect();
    // Command with 1 KiB immediate, three unsolicited Data-Out up to FirstBurstLength.
    assert_eq!(out.len(), 4);
    let base = data.as_ptr() as usize;
    let mut offset = 0;
    for o in &out {
        assert_eq!(
            o.data.as_ptr() as usize,
            base + offset,
            "a slice of the caller's buffer"
        );
        offset += o.data.len();
    }
    assert_eq!(offset, 4096);
}

#[test]
fn write_with_unsolicited_data_out_and_r2ts() {
    // InitialR2T=No on both sides; FirstBurstLength 8 KiB, MaxBurstLength 16 KiB, and the
    // target receives only 1 KiB segments.
    let negotiation = NegotiationConfig {
        initial_r2t: false,
        max_recv_data_segment_length: 1024,
        ..NegotiationConfig::default()
    };
    let mut p = pair_with(
        portal(negotiation, 32, None),
        &[
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("FirstBurstLength", "8192"),
            ("MaxBurstLength", "16384"),
        ],
        quiet(),
    );
    let params = p.init.params().clone();
    assert!(!params.initial_r2t && params.immediate_data);
    assert_eq!(params.max_xmit_data_segment_length, 1024);
    assert_eq!(
        (params.first_burst_length, params.max_burst_length),
        (8192, 16384)
    );

    let data = pattern(64 * 1024, 3);
    let c = p.run(1, write(100, data.clone()));
    assert_eq!((c.status, c.residual), (Status::GOOD, Residual::None));
    assert_eq!(block(&p.disk, 100, 128), &data[..]);

    // The command: 1 KiB of immediate data, F=0 since unsolicited Data-Out follows.
    let Header::ScsiCommand(cmd) = &p.wire[0].0 else {
        panic!()
    };
    assert!(!cmd.final_);
    assert_eq!(p.wire[0].1, 1024);
    let outs = p.sent_of(|h| match h {
        Header::DataOut(d) => Some(d.clone()),
        _ => None,
    });
    // Unsolicited: 1 KiB .. 8 KiB in 7 PDUs, DataSN 0..7, F on the last.
    let unsolicited: Vec<_> = outs.iter().filter(|(d, _)| d.ttt == RESERVED_TAG).collect();
    assert_eq!(unsolicited.len(), 7);
    for (i, (d, len)) in unsolicited.iter().enumerate() {
        assert_eq!(d.data_sn, i as u32);
        assert_eq!(d.buffer_offset, 1024 * (i as u32 + 1));
        assert_eq!(*len, 1024);
        assert_eq!(d.final_, i == 6);
    }
    // Solicited: 56 KiB in bursts of at most 16 KiB, DataSN restarting per R2T.
    let solicited: Vec<_> = outs.iter().filter(|(d, _)| d.ttt != RESERVED_TAG).collect();
    assert_eq!(solicited.len(), 56);
    let mut bursts: HashMap<u32, Vec<&DataOut>> = HashMap::new();
    for (d, len) in &solicited {
        assert!(*len <= 1024);
        bursts.entry(d.ttt).or_default().push(d);
    }
    assert_eq!(bursts.len(), 4, "16 + 16 + 16 + 8 KiB");
    for seq in bursts.values() {
        for (i, d) in seq.iter().enumerate() {
            assert_eq!(d.data_sn, i as u32);
            assert_eq!(d.final_, i == seq.len() - 1);
        }
    }
}

#[test]
fn write_solicited_only_without_immediate_data() {
    let mut p = pair(&[("ImmediateData", "No"), ("MaxBurstLength", "8192")]);
    let data = pattern(20 * 1024, 9);
    let c = p.run(1, write(0, data.clone()));
    assert_eq!(c.status, Status::GOOD);
    assert_eq!(block(&p.disk, 0, 40), &data[..]);
    assert_eq!(p.wire[0].1, 0, "no immediate data");
    let r2t_bursts: HashSet<u32> = p
        .sent_of(|h| match h {
            Header::DataOut(d) => Some(d.ttt),
            _ => None,
        })
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(r2t_bursts.len(), 3, "8 + 8 + 4 KiB");
}

#[test]
fn r2t_outside_the_data_fails_the_connection() {
    let mut s = session();
    s.submit(TaskId(1), write(0, pattern(4096, 0))).unwrap();
    let itt = command(&sent(&mut s)).itt;
    let r2t = R2t {
        itt,
        ttt: 5,
        r2t_sn: 0,
        buffer_offset: 2048,
        desired_data_transfer_length: 4096,
        exp_cmd_sn: 101,
        max_cmd_sn: 132,
        ..Default::default()
    };
    s.handle_pdu(raw(r2t.to_bhs(), Bytes::new()), Instant::now());
    assert!(failed(&events(&mut s)));
    assert!(s.is_finished());
    assert!(s.poll_transmit().is_none());
    // The task is still there for re-issue.
    let out = s.take_outstanding();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, TaskId(1));
}

/// Found by fuzzing: an R2T with the reserved Target Transfer Tag was answered, with Data-Out
/// whose TTT 0xffffffff tells the target they are unsolicited (beyond FirstBurstLength, or
/// with InitialR2T=Yes, where none may be sent).
#[test]
fn r2t_with_the_reserved_ttt_fails_the_connection() {
    let mut s = session();
    s.submit(TaskId(1), write(0, pattern(4096, 0))).unwrap();
    let itt = command(&sent(&mut s)).itt;
    let r2t = R2t {
        itt,
        ttt: RESERVED_TAG,
        r2t_sn: 0,
        buffer_offset: 0,
        desired_data_transfer_length: 4096,
        exp_cmd_sn: 101,
        max_cmd_sn: 132,
        ..Default::default()
    };
    s.handle_pdu(raw(r2t.to_bhs(), Bytes::new()), Instant::now());
    assert!(failed(&events(&mut s)));
    assert!(s.poll_transmit().is_none(), "no Data-Out answers it");
    assert_eq!(s.take_outstanding().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Command window
// ---------------------------------------------------------------------------------------------

#[test]
fn window_full_commands_queue_until_max_cmd_sn_grows() {
    let mut p = pair_with(portal(NegotiationConfig::default(), 2, None), &[], quiet());
    assert_eq!(p.init.window(), 2);
    p.hold = true;
    for t in 0..5 {
        p.init.submit(TaskId(t), read(t, 1)).unwrap();
    }
    p.pump();
    assert_eq!(p.held.len(), 2, "two commands fit the window");
    assert_eq!(p.init.outstanding(), 5);
    assert_eq!(p.init.queued(), 3);
    assert_eq!(p.init.window(), 0);
    // The target moved its MaxCmdSN as the two arrived; the first completion tells us, and
    // two more go, in submission order.
    p.run_held(1);
    assert_eq!((p.held.len(), p.init.queued()), (3, 1));
    p.run_held(1);
    assert_eq!((p.held.len(), p.init.queued()), (3, 0));
    p.run_held(3);
    assert!(p.held.is_empty());
    let done = completions(p.events());
    let order: Vec<u64> = done.iter().map(|c| c.task.0).collect();
    assert_eq!(order, vec![0, 1, 2, 3, 4]);
    for c in &done {
        assert_eq!(c.data, block(&p.disk, c.task.0 as usize, 1));
    }
    let sns: Vec<u32> = p
        .sent_of(|h| match h {
            Header::ScsiCommand(c) => Some(c.cmd_sn),
            _ => None,
        })
        .into_iter()
        .map(|(sn, _)| sn)
        .collect();
    assert_eq!(sns, vec![10, 11, 12, 13, 14]);
}

#[test]
fn window_updates_follow_the_rfc_rules() {
    let mut s = session();
    // CmdSN 100, window 100..=131.
    assert_eq!(s.window(), 32);
    let nop = |exp: u32, max: u32| NopIn {
        itt: RESERVED_TAG,
        ttt: RESERVED_TAG,
        stat_sn: 50,
        exp_cmd_sn: exp,
        max_cmd_sn: max,
        ..Default::default()
    };
    let now = Instant::now();
    // MaxCmdSN < ExpCmdSN - 1: both ignored.
    s.handle_pdu(raw(nop(100, 90).to_bhs(), Bytes::new()), now);
    assert_eq!((s.exp_cmd_sn(), s.max_cmd_sn()), (100, 131));
    // Backwards: ignored.
    s.handle_pdu(raw(nop(100, 120).to_bhs(), Bytes::new()), now);
    assert_eq!(s.max_cmd_sn(), 131);
    // MaxCmdSN = ExpCmdSN - 1 closes nothing we already have, but is valid.
    s.handle_pdu(raw(nop(100, 99).to_bhs(), Bytes::new()), now);
    assert_eq!(s.max_cmd_sn(), 131);
    // Forward: taken. An ExpCmdSN beyond what we sent is not.
    s.handle_pdu(raw(nop(105, 140).to_bhs(), Bytes::new()), now);
    assert_eq!((s.exp_cmd_sn(), s.max_cmd_sn()), (100, 140));
    assert!(events(&mut s).is_empty());
    assert!(
        sent(&mut s).is_empty(),
        "an unsolicited NOP-In needs no answer"
    );
    // Serial arithmetic across the wrap.
    let mut login = login_result(SessionParams::default());
    login.cmd_sn = u32::MAX;
    login.exp_cmd_sn = u32::MAX;
    login.max_cmd_sn = 0;
    let mut s = InitiatorSession::new(&login, quiet(), now);
    for t in 0..3 {
        s.submit(TaskId(t), read(0, 1)).unwrap();
    }
    let sns: Vec<u32> = sent(&mut s)
        .iter()
        .map(|(h, _)| match h {
            Header::ScsiCommand(c) => c.cmd_sn,
            _ => panic!(),
        })
        .collect();
    assert_eq!(sns, vec![u32::MAX, 0]);
    assert_eq!(s.queued(), 1);
    s.handle_pdu(raw(nop(1, 1).to_bhs(), Bytes::new()), now);
    let (h, _) = &sent(&mut s)[0];
    assert!(matches!(h, Header::ScsiCommand(c) if c.cmd_sn == 1));
}

#[test]
fn every_pdu_carries_exp_stat_sn() {
    let mut s = session();
    s.submit(TaskId(1), read(0, 1)).unwrap();
    let first = command(&sent(&mut s));
    assert_eq!(first.exp_stat_sn, 50);
    let r = response(first.itt, 50, Status::GOOD);
    s.handle_pdu(raw(r.to_bhs(), Bytes::new()), Instant::now());
    s.submit(TaskId(2), write(0, pattern(512, 0))).unwrap();
    assert_eq!(command(&sent(&mut s)).exp_stat_sn, 51);
    s.task_management(TaskId(3), TmfFunction::LOGICAL_UNIT_RESET, 0, None)
        .unwrap();
    let Header::TaskMgmtRequest(t) = &sent(&mut s)[0].0 else {
        panic!()
    };
    assert_eq!(t.exp_stat_sn, 51);
    assert!(t.immediate);
    assert_eq!(t.cmd_sn, 102, "immediate: the next CmdSN, not consumed");
    assert_eq!(s.cmd_sn(), 102);
}

// ---------------------------------------------------------------------------------------------
// Tags and submission errors
// ---------------------------------------------------------------------------------------------

#[test]
fn itts_are_unique_and_never_reserved() {
    let mut s = session();
    s.next_itt = RESERVED_TAG - 2;
    for t in 0..6 {
        s.submit(TaskId(t), read(0, 1)).unwrap();
    }
    let itts: Vec<u32> = sent(&mut s)
        .iter()
        .map(|(h, _)| match h {
            Header::ScsiCommand(c) => c.itt,
            _ => panic!(),
        })
        .collect();
    assert!(!itts.contains(&RESERVED_TAG));
    assert_eq!(itts.iter().collect::<HashSet<_>>().len(), 6);
    // After a wrap, tags still in use are skipped.
    s.next_itt = itts[0];
    s.submit(TaskId(10), read(0, 1)).unwrap();
    let itt = command(&sent(&mut s)).itt;
    assert!(!itts.contains(&itt));
}

#[test]
fn submission_errors() {
    let mut s = session();
    s.submit(TaskId(1), read(0, 1)).unwrap();
    assert_eq!(
        s.submit(TaskId(1), read(0, 1)).unwrap_err(),
        SubmitError::DuplicateTask
    );
    assert_eq!(
        s.text_request(TaskId(1), &[]).unwrap_err(),
        SubmitError::DuplicateTask
    );
    // Up to 260 bytes go out with an extended-CDB AHS (see below); beyond, refused.
    let mut long = read(0, 1);
    long.cdb = Bytes::from(vec![0u8; 261]);
    assert_eq!(
        s.submit(TaskId(2), long).unwrap_err(),
        SubmitError::CdbTooLong
    );
    assert_eq!(
        s.task_management(TaskId(3), TmfFunction::ABORT_TASK, 0, Some(TaskId(99)))
            .unwrap_err(),
        SubmitError::UnknownTask
    );
    assert_eq!(
        s.task_management(TaskId(3), TmfFunction::ABORT_TASK, 0, None)
            .unwrap_err(),
        SubmitError::UnknownTask
    );
    // A short CDB is padded into the header.
    let mut short = read(0, 1);
    short.cdb = Bytes::from_static(&[0x00, 0, 0, 0, 0, 0]);
    s.submit(TaskId(4), short).unwrap();
    let cmds: Vec<_> = sent(&mut s);
    let Header::ScsiCommand(c) = &cmds[1].0 else {
        panic!()
    };
    assert_eq!(c.cdb, [0u8; 16]);
    assert_eq!(s.outstanding(), 2);
}

// ---------------------------------------------------------------------------------------------
// NOP
// ---------------------------------------------------------------------------------------------

#[test]
fn nop_in_ping_is_answered() {
    let mut p = pair_with(
        portal(
            NegotiationConfig::default(),
            32,
            Some(Duration::from_secs(5)),
        ),
        &[],
        quiet(),
    );
    // The target pings after 5 s of silence; we echo it and the target stays up.
    let deadline = p.target.poll_timeout().unwrap();
    p.now = deadline;
    p.target.handle_timeout(deadline);
    p.pump();
    let answers = p.sent_of(|h| match h {
        Header::NopOut(n) => Some(n.clone()),
        _ => None,
    });
    assert_eq!(answers.len(), 1);
    let (n, _) = &answers[0];
    assert_eq!(n.itt, RESERVED_TAG);
    assert_ne!(n.ttt, RESERVED_TAG);
    assert!(n.immediate);
    p.target.handle_timeout(deadline + Duration::from_secs(5));
    assert!(p.target_closed.is_none());
    assert!(!p.target.is_closed());

    // By hand: same TTT, same LUN, the data echoed.
    let mut s = session();
    let ping = NopIn {
        lun: 0x0001_0000_0000_0000,
        itt: RESERVED_TAG,
        ttt: 0x77,
        stat_sn: 50,
        exp_cmd_sn: 100,
        max_cmd_sn: 131,
    };
    s.handle_pdu(raw(ping.to_bhs(), &b"hello"[..]), Instant::now());
    let out = sent(&mut s);
    let Header::NopOut(n) = &out[0].0 else {
        panic!()
    };
    assert_eq!(
        (n.itt, n.ttt, n.lun, n.cmd_sn, n.immediate),
        (RESERVED_TAG, 0x77, ping.lun, 100, true)
    );
    assert_eq!(&out[0].1[..], b"hello");
    assert_eq!(s.exp_stat_sn(), 50, "a target ping does not advance StatSN");
}

#[test]
fn keepalive_ping_after_silence_and_failure_on_timeout() {
    let t0 = Instant::now();
    let config = SessionConfig {
        nop_interval: Some(Duration::from_secs(5)),
        nop_timeout: Duration::from_secs(3),
    };
    let mut s = session_with(SessionParams::default(), config, t0);
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    s.handle_timeout(t0 + Duration::from_secs(4));
    assert!(sent(&mut s).is_empty());
    s.handle_timeout(t0 + Duration::from_secs(5));
    let out = sent(&mut s);
    let Header::NopOut(ping) = &out[0].0 else {
        panic!("{out:?}")
    };
    assert_ne!(ping.itt, RESERVED_TAG);
    assert_eq!(ping.ttt, RESERVED_TAG);
    assert!(ping.immediate);
    assert_eq!(s.cmd_sn(), 100, "a ping takes no CmdSN");
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(8)));
    s.handle_timeout(t0 + Duration::from_secs(8));
    let ev = events(&mut s);
    assert!(
        matches!(&ev[..], [Event::ConnectionFailed { .. }]),
        "{ev:?}"
    );
    assert!(s.is_finished());
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(t0 + Duration::from_secs(100));
    assert!(events(&mut s).is_empty(), "failure is reported once");
}

#[test]
fn keepalive_never_fails_a_busy_connection() {
    let t0 = Instant::now();
    let config = SessionConfig {
        nop_interval: Some(Duration::from_secs(2)),
        nop_timeout: Duration::from_secs(1),
    };
    let mut s = session_with(SessionParams::default(), config, t0);
    s.submit(TaskId(1), read(0, 1000)).unwrap();
    let itt = command(&sent(&mut s)).itt;
    // The target streams a slow read, one Data-In every 2.5 s, and never answers a ping:
    // each silence of 2 s sends one, and the next Data-In comes within its 1 s timeout.
    let mut now = t0;
    let mut pings = 0;
    for sn in 0..100u32 {
        let next_pdu = now + Duration::from_millis(2500);
        while let Some(deadline) = s.poll_timeout().filter(|d| *d <= next_pdu) {
            s.handle_timeout(deadline);
            pings += sent(&mut s).len();
        }
        now = next_pdu;
        let din = data_in(itt, sn, sn * 512, None);
        s.handle_pdu(raw(din.to_bhs(), vec![0u8; 512]), now);
        assert!(events(&mut s).is_empty());
    }
    assert!(!s.is_finished());
    assert_eq!(pings, 100);
}

#[test]
fn keepalive_against_the_target() {
    let config = SessionConfig {
        nop_interval: Some(Duration::from_secs(5)),
        nop_timeout: Duration::from_secs(5),
    };
    let mut p = pair_with(portal(NegotiationConfig::default(), 32, None), &[], config);
    let deadline = p.init.poll_timeout().unwrap();
    p.now = deadline;
    p.init.handle_timeout(deadline);
    p.pump();
    // The target answered: the next deadline is a new interval, not a failure.
    assert_eq!(
        p.init.poll_timeout(),
        Some(deadline + Duration::from_secs(5))
    );
    assert!(p.events().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Additional header segments: extended CDBs, bidirectional commands
// ---------------------------------------------------------------------------------------------

/// READ(32) (variable-length CDB, service action 0x0009), padded with a marker pattern to
/// `len` bytes so that every byte of the CDB is distinguishable.
fn read32_cdb(lba: u64, blocks: u32, len: usize) -> Bytes {
    let mut cdb: Vec<u8> = (0..len).map(|i| 0x40 ^ (i as u8)).collect();
    cdb[0] = 0x7f;
    cdb[7] = (len - 8).min(255) as u8;
    cdb[8..10].copy_from_slice(&0x0009u16.to_be_bytes());
    cdb[12..20].copy_from_slice(&lba.to_be_bytes());
    cdb[28..32].copy_from_slice(&blocks.to_be_bytes());
    Bytes::from(cdb)
}

/// The only PDU `s` has to send, with its AHS.
fn only_pdu(s: &mut InitiatorSession) -> OutPdu {
    let out: Vec<OutPdu> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert_eq!(out.len(), 1, "{out:?}");
    out.into_iter().next().unwrap()
}

#[test]
fn extended_cdb_round_trips_through_the_target() {
    let mut p = pair(&[]);
    p.hold = true;
    let cdb = read32_cdb(5, 2, 32);
    let req = ScsiRequest {
        cdb: cdb.clone(),
        ..read(0, 2)
    };
    p.init.submit(TaskId(1), req).unwrap();
    p.pump();
    // The header holds the first 16 bytes; the target puts the rest back from the AHS.
    let Header::ScsiCommand(sent) = &p.wire[0].0 else {
        panic!()
    };
    assert_eq!(sent.cdb[..], cdb[..16]);
    assert_eq!(p.held.len(), 1);
    let cmd = p.held.pop().unwrap();
    assert_eq!(cmd.cdb, &cdb[..], "Execute carries the whole 32-byte CDB");
    assert!(cmd.read && !cmd.write);
    assert_eq!(cmd.expected_data_transfer_length, 2 * BLOCK as u32);
    // Executed by hand (the test disk knows only READ(16)/WRITE(16)).
    let data = Bytes::copy_from_slice(block(&p.disk, 5, 2));
    p.target.complete(cmd.itt, Status::GOOD, &[], data, None);
    p.pump();
    let c = completions(p.events());
    assert_eq!((c[0].task, c[0].status), (TaskId(1), Status::GOOD));
    assert_eq!(c[0].data, block(&p.disk, 5, 2));
    assert!(p.target_closed.is_none());
}

#[test]
fn every_cdb_length_up_to_260_reaches_the_target_whole() {
    let mut p = pair(&[]);
    p.hold = true;
    for (task, len) in [1usize, 6, 16, 17, 18, 19, 20, 21, 33, 100, 259, 260]
        .into_iter()
        .enumerate()
    {
        let cdb: Bytes = (0..len).map(|i| (i as u8) ^ 0xa5).collect();
        let req = ScsiRequest {
            cdb: cdb.clone(),
            ..read(0, 1)
        };
        p.init.submit(TaskId(task as u64), req).unwrap();
        p.pump();
        let cmd = p.held.pop().expect("executed");
        // Shorter CDBs are zero-padded to the header's 16 bytes.
        let mut want = cdb.to_vec();
        want.resize(len.max(16), 0);
        assert_eq!(cmd.cdb, want, "CDB of {len} bytes");
        p.target
            .complete(cmd.itt, Status::GOOD, &[], Bytes::new(), None);
        p.pump();
        assert_eq!(completions(p.events()).len(), 1);
    }
    assert!(p.target_closed.is_none());
}

#[test]
fn extended_cdb_ahs_layout() {
    let mut s = session();
    for len in [17usize, 20, 32, 260] {
        let cdb: Bytes = (0..len).map(|i| i as u8).collect();
        let req = ScsiRequest {
            cdb: cdb.clone(),
            ..read(0, 1)
        };
        s.submit(TaskId(len as u64), req).unwrap();
        let out = only_pdu(&mut s);
        // §11.2.2: AHSLength = CDB length - 15 (reserved byte + the bytes beyond 16), padded.
        let ahs_len = u16::from_be_bytes([out.ahs[0], out.ahs[1]]);
        assert_eq!(usize::from(ahs_len), len - 15);
        assert_eq!(out.ahs[2], ahs::EXTENDED_CDB);
        assert_eq!(out.ahs[3], 0, "reserved");
        assert_eq!(out.ahs.len(), (4 + len - 16).div_ceil(4) * 4);
        assert!(
            out.ahs[4 + len - 16..].iter().all(|&b| b == 0),
            "zero padding"
        );
        // Through the framer: TotalAHSLength counts it, the full CDB comes back.
        let pdu = frame(out).unwrap();
        assert_eq!(pdu.bhs.total_ahs_len(), pdu.ahs.len());
        let Ok(Header::ScsiCommand(cmd)) = Header::parse(&pdu.bhs) else {
            panic!()
        };
        assert_eq!(ahs::full_cdb(&cmd.cdb, &pdu.ahs).unwrap(), &cdb[..]);
    }
    // 16 bytes or fewer, and ordinary commands: no AHS at all.
    s.submit(TaskId(1), read(0, 1)).unwrap();
    assert!(only_pdu(&mut s).ahs.is_empty());
    s.submit(TaskId(2), write(0, pattern(512, 1))).unwrap();
    assert!(only_pdu(&mut s).ahs.is_empty());
}

#[test]
fn bidirectional_command_carries_the_read_length_ahs() {
    let mut s = session();
    let req = ScsiRequest {
        lun: 0,
        cdb: cdb16(0x53, 0, 2), // XDWRITEREAD(10)-like: writes and reads
        data_out: pattern(1024, 3),
        read_len: 3000,
        attr: TaskAttr::Simple,
    };
    s.submit(TaskId(1), req).unwrap();
    let out = only_pdu(&mut s);
    let segs = ahs::parse(&out.ahs).unwrap();
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].ahs_type, ahs::BIDI_READ_DATA_LENGTH);
    assert_eq!(
        segs[0].specific,
        &[0, 0, 0, 0x0b, 0xb8],
        "reserved byte, 3000 BE"
    );
    assert_eq!(out.ahs.len(), 8);
    let Ok(Header::ScsiCommand(cmd)) = Header::parse(&out.bhs) else {
        panic!()
    };
    assert!(cmd.read && cmd.write);
    assert_eq!(cmd.expected_data_transfer_length, 1024, "the write length");

    // With a long CDB too: the extended CDB first, then the read length.
    let req = ScsiRequest {
        lun: 0,
        cdb: read32_cdb(0, 1, 32),
        data_out: pattern(512, 4),
        read_len: 512,
        attr: TaskAttr::Simple,
    };
    s.submit(TaskId(2), req).unwrap();
    let out = only_pdu(&mut s);
    let segs = ahs::parse(&out.ahs).unwrap();
    let types: Vec<u8> = segs.iter().map(|a| a.ahs_type).collect();
    assert_eq!(types, [ahs::EXTENDED_CDB, ahs::BIDI_READ_DATA_LENGTH]);
    assert_eq!(segs[1].specific, &[0, 0, 0, 2, 0]);
    let pdu = frame(out).unwrap();
    assert_eq!(pdu.ahs.len(), 20 + 8);
}

#[test]
fn bidirectional_command_reaches_the_target() {
    let mut p = pair(&[("ImmediateData", "Yes")]);
    p.hold = true;
    let data = pattern(1024, 9);
    let req = ScsiRequest {
        lun: 0,
        cdb: read32_cdb(0, 2, 32),
        data_out: data.clone(),
        read_len: 1024,
        attr: TaskAttr::Simple,
    };
    p.init.submit(TaskId(1), req).unwrap();
    p.pump();
    assert!(p.target_closed.is_none());
    let cmd = p.held.pop().expect("executed");
    assert!(cmd.read && cmd.write);
    assert_eq!(cmd.cdb.len(), 32);
    assert_eq!(cmd.data_out, data);
}

// ---------------------------------------------------------------------------------------------
// Task management
// ---------------------------------------------------------------------------------------------

#[test]
fn abort_task_against_the_target() {
    let mut p = pair(&[]);
    p.hold = true;
    p.init.submit(TaskId(1), read(0, 1)).unwrap();
    p.init.submit(TaskId(2), read(1, 1)).unwrap();
    p.pump();
    assert_eq!(p.held.len(), 2);
    p.init
        .task_management(TaskId(3), TmfFunction::ABORT_TASK, 0, Some(TaskId(1)))
        .unwrap();
    p.pump();
    let tmf = p.sent_of(|h| match h {
        Header::TaskMgmtRequest(t) => Some(t.clone()),
        _ => None,
    });
    let Header::ScsiCommand(first) = &p.wire[0].0 else {
        panic!()
    };
    assert_eq!(tmf[0].0.referenced_task_tag, first.itt);
    assert_eq!(tmf[0].0.ref_cmd_sn, first.cmd_sn);
    let ev = p.events();
    let [Event::Completed(c), Event::TaskManagementDone { task, response }] = &ev[..] else {
        panic!("{ev:?}")
    };
    assert_eq!((c.task, c.status), (TaskId(1), Status::TASK_ABORTED));
    assert_eq!(
        (*task, *response),
        (TaskId(3), TmfResponse::FUNCTION_COMPLETE)
    );
    assert_eq!(p.init.outstanding(), 1);
    // The other task is untouched and completes normally; the aborted one is gone at the
    // target, so running it produces nothing.
    p.run_held(2);
    let done = completions(p.events());
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].task, TaskId(2));
}

#[test]
fn abort_task_set_ends_the_lun_tasks_sent_before_it() {
    let mut s = session();
    let mut on_lun1 = read(0, 1);
    on_lun1.lun = 0x0001_0000_0000_0000;
    s.submit(TaskId(1), read(0, 1)).unwrap();
    s.submit(TaskId(2), on_lun1.clone()).unwrap();
    s.submit(TaskId(3), read(0, 1)).unwrap();
    s.submit(TaskId(4), write(0, pattern(8192, 0))).unwrap();
    sent(&mut s);
    s.task_management(TaskId(5), TmfFunction::ABORT_TASK_SET, 0, None)
        .unwrap();
    let Header::TaskMgmtRequest(t) = &sent(&mut s)[0].0 else {
        panic!()
    };
    assert_eq!(t.referenced_task_tag, RESERVED_TAG);
    // Sent after the TMF: not affected.
    s.submit(TaskId(6), read(0, 1)).unwrap();
    sent(&mut s);
    let r = TaskMgmtResponse {
        response: TmfResponse::FUNCTION_COMPLETE,
        itt: t.itt,
        stat_sn: 50,
        exp_cmd_sn: 104,
        max_cmd_sn: 140,
    };
    s.handle_pdu(raw(r.to_bhs(), Bytes::new()), Instant::now());
    let ev = events(&mut s);
    let aborted: Vec<u64> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Completed(c) => {
                assert_eq!(c.status, Status::TASK_ABORTED);
                Some(c.task.0)
            }
            _ => None,
        })
        .collect();
    assert_eq!(aborted, vec![1, 3, 4]);
    assert!(matches!(
        ev.last(),
        Some(Event::TaskManagementDone {
            task: TaskId(5),
            ..
        })
    ));
    let left: Vec<u64> = s.take_outstanding().iter().map(|(t, _)| t.0).collect();
    assert_eq!(left, vec![2, 6]);
}

#[test]
fn abort_of_a_task_still_waiting_for_the_window_is_local() {
    let mut login = login_result(SessionParams::default());
    login.max_cmd_sn = 100;
    let mut s = InitiatorSession::new(&login, quiet(), Instant::now());
    s.submit(TaskId(1), read(0, 1)).unwrap();
    s.submit(TaskId(2), read(0, 1)).unwrap();
    assert_eq!(sent(&mut s).len(), 1);
    s.task_management(TaskId(3), TmfFunction::ABORT_TASK, 0, Some(TaskId(2)))
        .unwrap();
    assert!(sent(&mut s).is_empty(), "the target never saw it");
    let ev = events(&mut s);
    assert!(
        matches!(&ev[0], Event::Completed(c) if c.task == TaskId(2) && c.status == Status::TASK_ABORTED)
    );
    assert!(matches!(
        &ev[1],
        Event::TaskManagementDone {
            task: TaskId(3),
            response: TmfResponse::FUNCTION_COMPLETE
        }
    ));
    assert_eq!(s.queued(), 0);
    assert_eq!(s.outstanding(), 1);
}

#[test]
fn logical_unit_reset_against_the_target() {
    let mut p = pair(&[]);
    p.hold = true;
    p.init.submit(TaskId(1), read(0, 1)).unwrap();
    p.init.submit(TaskId(2), write(0, pattern(512, 0))).unwrap();
    p.pump();
    p.init
        .task_management(TaskId(3), TmfFunction::LOGICAL_UNIT_RESET, 0, None)
        .unwrap();
    p.pump();
    let ev = p.events();
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert!(matches!(
        ev[2],
        Event::TaskManagementDone {
            task: TaskId(3),
            response: TmfResponse::FUNCTION_COMPLETE
        }
    ));
    assert_eq!(p.init.outstanding(), 0);
}

// ---------------------------------------------------------------------------------------------
// Text, logout, asynchronous messages
// ---------------------------------------------------------------------------------------------

#[test]
fn send_targets_with_continuations() {
    let mut portal = (*portal(NegotiationConfig::default(), 32, None)).clone();
    portal.addresses = (0..40).map(|i| format!("192.168.100.{i}:3260,1")).collect();
    // We receive 512-byte segments: the answer comes in several parts.
    let mut p = pair_with(
        Arc::new(portal),
        &[("MaxRecvDataSegmentLength", "512")],
        quiet(),
    );
    p.init
        .text_request(TaskId(1), &[("SendTargets".into(), TARGET_NAME.into())])
        .unwrap();
    p.pump();
    let ev = p.events();
    let [Event::TextDone { task, pairs }] = &ev[..] else {
        panic!("{ev:?}")
    };
    assert_eq!(*task, TaskId(1));
    assert_eq!(
        pairs[0],
        ("TargetName".to_string(), TARGET_NAME.to_string())
    );
    assert_eq!(pairs.len(), 41);
    assert_eq!(pairs[40].1, "192.168.100.39:3260,1");
    let requests = p.sent_of(|h| match h {
        Header::TextRequest(t) => Some(t.clone()),
        _ => None,
    });
    assert!(requests.len() >= 3, "{requests:?}");
    assert_eq!(requests[0].0.ttt, RESERVED_TAG);
    for (i, (t, len)) in requests.iter().enumerate() {
        assert!(t.final_ && !t.immediate);
        assert_eq!(t.cmd_sn, 10 + i as u32, "each Text Request takes a CmdSN");
        if i > 0 {
            assert_ne!(t.ttt, RESERVED_TAG);
            assert_eq!(*len, 0);
        }
    }
    // The session goes on.
    assert_eq!(p.run(2, read(0, 1)).status, Status::GOOD);
}

#[test]
fn logout_against_the_target() {
    let mut p = pair(&[]);
    assert_eq!(p.run(1, read(0, 1)).status, Status::GOOD);
    p.init
        .logout(TaskId(2), LogoutReason::CLOSE_SESSION)
        .unwrap();
    assert_eq!(
        p.init.submit(TaskId(3), read(0, 1)).unwrap_err(),
        SubmitError::NotUsable
    );
    assert_eq!(
        p.init
            .logout(TaskId(4), LogoutReason::CLOSE_SESSION)
            .unwrap_err(),
        SubmitError::NotUsable
    );
    p.pump();
    let ev = p.events();
    assert!(
        matches!(&ev[..], [Event::LoggedOut { task: TaskId(2) }]),
        "{ev:?}"
    );
    assert!(p.init.is_finished());
    assert!(p.target_closed.is_some());
    let Header::LogoutRequest(l) = &p.wire[1].0 else {
        panic!()
    };
    assert!(l.immediate);
    assert_eq!((l.reason, l.cmd_sn), (LogoutReason::CLOSE_SESSION, 11));
    assert_eq!(
        p.init.submit(TaskId(5), read(0, 1)).unwrap_err(),
        SubmitError::NotUsable
    );
    assert_eq!(p.init.poll_timeout(), None);
}

#[test]
fn refused_logout_fails_the_connection() {
    let mut s = session();
    s.logout(TaskId(1), LogoutReason::CLOSE_CONNECTION).unwrap();
    let Header::LogoutRequest(l) = &sent(&mut s)[0].0 else {
        panic!()
    };
    let r = LogoutResponse {
        response: LogoutResponseCode::CLEANUP_FAILED,
        itt: l.itt,
        stat_sn: 50,
        exp_cmd_sn: 100,
        max_cmd_sn: 131,
        ..Default::default()
    };
    s.handle_pdu(raw(r.to_bhs(), Bytes::new()), Instant::now());
    assert!(failed(&events(&mut s)));
}

#[test]
fn async_messages_become_notices() {
    let mut s = session();
    let now = Instant::now();
    let msg = |event: AsyncEvent, stat_sn: u32| AsyncMessage {
        lun: 0x0002_0000_0000_0000,
        stat_sn,
        exp_cmd_sn: 100,
        max_cmd_sn: 150,
        async_event: event,
        async_vcode: 0,
        parameter1: 1,
        parameter2: 2,
        parameter3: 30,
    };
    let mut segment = vec![0, 18];
    segment.extend_from_slice(&LBA_OUT_OF_RANGE);
    s.handle_pdu(
        raw(msg(AsyncEvent::SCSI_ASYNC_EVENT, 50).to_bhs(), segment),
        now,
    );
    s.handle_pdu(
        raw(msg(AsyncEvent::LOGOUT_REQUESTED, 51).to_bhs(), Bytes::new()),
        now,
    );
    s.handle_pdu(
        raw(msg(AsyncEvent::CONNECTION_DROP, 52).to_bhs(), Bytes::new()),
        now,
    );
    s.handle_pdu(
        raw(msg(AsyncEvent::SESSION_DROP, 53).to_bhs(), Bytes::new()),
        now,
    );
    s.handle_pdu(
        raw(msg(AsyncEvent::VENDOR_SPECIFIC, 54).to_bhs(), Bytes::new()),
        now,
    );
    let notices: Vec<TargetNotice> = events(&mut s)
        .into_iter()
        .map(|e| match e {
            Event::Notice(n) => n,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        notices,
        vec![
            TargetNotice::ScsiEvent {
                lun: 0x0002_0000_0000_0000,
                sense: Bytes::copy_from_slice(&LBA_OUT_OF_RANGE),
            },
            TargetNotice::LogoutRequested {
                within: Duration::from_secs(30)
            },
            TargetNotice::ConnectionDrop {
                time2wait: Duration::from_secs(2),
                time2retain: Duration::from_secs(30)
            },
            TargetNotice::SessionDrop {
                time2wait: Duration::from_secs(2),
                time2retain: Duration::from_secs(30)
            },
            TargetNotice::Other(AsyncEvent::VENDOR_SPECIFIC),
        ]
    );
    assert_eq!(s.exp_stat_sn(), 55);
    assert_eq!(s.max_cmd_sn(), 150);
    assert!(!s.is_finished(), "the driver decides what to do");
    assert!(sent(&mut s).is_empty());

    // A negotiation request is answered with an empty Text Request, and its answer is
    // consumed without an event.
    s.handle_pdu(
        raw(
            msg(AsyncEvent::NEGOTIATION_REQUEST, 55).to_bhs(),
            Bytes::new(),
        ),
        now,
    );
    assert!(matches!(
        &events(&mut s)[..],
        [Event::Notice(TargetNotice::NegotiationRequested)]
    ));
    let out = sent(&mut s);
    let Header::TextRequest(t) = &out[0].0 else {
        panic!()
    };
    assert!(out[0].1.is_empty() && t.final_ && t.ttt == RESERVED_TAG);
    let answer = TextResponse {
        final_: true,
        itt: t.itt,
        ttt: RESERVED_TAG,
        stat_sn: 56,
        exp_cmd_sn: 101,
        max_cmd_sn: 150,
        ..Default::default()
    };
    s.handle_pdu(raw(answer.to_bhs(), Bytes::new()), now);
    assert!(events(&mut s).is_empty());
    assert_eq!(s.exp_stat_sn(), 57);
}

// ---------------------------------------------------------------------------------------------
// Reject and protocol errors
// ---------------------------------------------------------------------------------------------

fn reject_of(bhs: &Bhs, reason: RejectReason) -> Result<RawPdu, PduError> {
    let r = Reject {
        reason,
        stat_sn: 50,
        exp_cmd_sn: 101,
        max_cmd_sn: 132,
        data_sn_or_r2t_sn: 0,
    };
    raw(r.to_bhs(), Bytes::copy_from_slice(&bhs.0))
}

#[test]
fn reject_of_a_command_completes_it() {
    let mut s = session();
    s.submit(TaskId(1), read(0, 1)).unwrap();
    s.submit(TaskId(2), read(0, 1)).unwrap();
    let out: Vec<OutPdu> = std::iter::from_fn(|| s.poll_transmit()).collect();
    s.handle_pdu(
        reject_of(&out[0].bhs, RejectReason::COMMAND_NOT_SUPPORTED),
        Instant::now(),
    );
    let c = completions(events(&mut s)).pop().unwrap();
    assert_eq!(
        (c.task, c.response),
        (TaskId(1), ServiceResponse::TARGET_FAILURE)
    );
    assert_ne!(c.status, Status::GOOD);
    assert!(!s.is_finished());
    assert_eq!(s.exp_stat_sn(), 51);
    assert_eq!(s.outstanding(), 1);

    // A rejected TMF is answered as rejected.
    s.task_management(TaskId(3), TmfFunction::CLEAR_ACA, 0, None)
        .unwrap();
    let tmf = s.poll_transmit().unwrap();
    s.handle_pdu(
        reject_of(&tmf.bhs, RejectReason::PROTOCOL_ERROR),
        Instant::now(),
    );
    assert!(matches!(
        &events(&mut s)[..],
        [Event::TaskManagementDone {
            task: TaskId(3),
            response: TmfResponse::FUNCTION_REJECTED
        }]
    ));
}

#[test]
fn reject_of_data_out_fails_the_connection() {
    let params = SessionParams {
        initial_r2t: false,
        immediate_data: false,
        ..SessionParams::default()
    };
    let mut s = session_with(params, quiet(), Instant::now());
    s.submit(TaskId(1), write(0, pattern(4096, 0))).unwrap();
    let out: Vec<OutPdu> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert_eq!(out[1].bhs.opcode(), Opcode::DATA_OUT);
    s.handle_pdu(
        reject_of(&out[1].bhs, RejectReason::DATA_DIGEST_ERROR),
        Instant::now(),
    );
    let ev = events(&mut s);
    assert!(
        matches!(&ev[..], [Event::ConnectionFailed { .. }]),
        "{ev:?}"
    );
    assert_eq!(s.take_outstanding().len(), 1);
}

#[test]
fn protocol_errors_fail_the_connection_once() {
    type BadPdu = Box<dyn Fn(u32) -> Result<RawPdu, PduError>>;
    let cases: Vec<(&str, BadPdu)> = vec![
        (
            "Data-In for an unknown task",
            Box::new(|itt| raw(data_in(itt + 1000, 0, 0, None).to_bhs(), vec![0u8; 8])),
        ),
        (
            "Data-In overrun",
            Box::new(|itt| raw(data_in(itt, 0, 0, None).to_bhs(), vec![0u8; 1024])),
        ),
        (
            "DataSN gap",
            Box::new(|itt| raw(data_in(itt, 1, 0, None).to_bhs(), vec![0u8; 8])),
        ),
        (
            "data digest error",
            Box::new(|itt| {
                Err(PduError::DataDigest {
                    bhs: data_in(itt, 0, 0, None).to_bhs(),
                })
            }),
        ),
        (
            "unknown opcode",
            Box::new(|_| {
                let mut b = Bhs::default();
                b.0[0] = 0x3a;
                raw(b, Bytes::new())
            }),
        ),
        (
            "initiator opcode",
            Box::new(|_| raw(NopOut::default().to_bhs(), Bytes::new())),
        ),
        (
            "short Reject",
            Box::new(|_| raw(Reject::default().to_bhs(), vec![0u8; 10])),
        ),
        (
            "both residual flags",
            Box::new(|itt| {
                let mut r = response(itt, 50, Status::GOOD);
                r.overflow = true;
                r.underflow = true;
                raw(r.to_bhs(), Bytes::new())
            }),
        ),
    ];
    for (what, bad) in cases {
        let mut s = session();
        s.submit(TaskId(1), read(0, 1)).unwrap();
        s.submit(TaskId(2), read(0, 1)).unwrap();
        let itt = command(&sent(&mut s)[..1]).itt;
        s.handle_pdu(bad(itt), Instant::now());
        let ev = events(&mut s);
        assert!(
            matches!(&ev[..], [Event::ConnectionFailed { .. }]),
            "{what}: {ev:?}"
        );
        assert!(s.is_finished(), "{what}");
        // Nothing more goes out or comes back, whatever arrives.
        s.submit(TaskId(3), read(0, 1)).unwrap_err();
        let good = data_in(itt, 0, 0, Some((Status::GOOD, 50)));
        s.handle_pdu(raw(good.to_bhs(), vec![0u8; 512]), Instant::now());
        s.handle_timeout(Instant::now() + Duration::from_secs(3600));
        assert!(events(&mut s).is_empty(), "{what}");
        assert!(s.poll_transmit().is_none(), "{what}");
        assert_eq!(s.take_outstanding().len(), 2, "{what}");
    }
}

#[test]
fn answers_naming_a_command_not_yet_sent_are_ignored() {
    let mut login = login_result(SessionParams::default());
    login.max_cmd_sn = 100;
    let mut s = InitiatorSession::new(&login, quiet(), Instant::now());
    s.submit(TaskId(1), read(0, 1)).unwrap();
    s.submit(TaskId(2), read(0, 1)).unwrap();
    let first = command(&sent(&mut s));
    // The target cannot know the waiting command's ITT; a guess at it changes nothing.
    let waiting = s.ids[&TaskId(2)];
    assert_ne!(waiting, first.itt);
    let now = Instant::now();
    let mut r = response(waiting, 50, Status::GOOD);
    r.max_cmd_sn = 99;
    s.handle_pdu(raw(r.to_bhs(), Bytes::new()), now);
    let mut guessed = first.clone();
    guessed.itt = waiting;
    s.handle_pdu(
        reject_of(&guessed.to_bhs(), RejectReason::PROTOCOL_ERROR),
        now,
    );
    assert!(events(&mut s).is_empty());
    assert_eq!(s.outstanding(), 2);
    // When the window opens it goes out, once.
    let open = NopIn {
        itt: RESERVED_TAG,
        ttt: RESERVED_TAG,
        stat_sn: 52,
        exp_cmd_sn: 101,
        max_cmd_sn: 101,
        ..Default::default()
    };
    s.handle_pdu(raw(open.to_bhs(), Bytes::new()), now);
    let second = command(&sent(&mut s));
    assert_eq!((second.itt, second.cmd_sn), (waiting, 101));
    assert_eq!(
        second.exp_stat_sn, 51,
        "an unsolicited NOP-In carries no status"
    );
}

#[test]
fn durations_beyond_the_clock_do_not_panic() {
    let now = Instant::now();
    let config = SessionConfig {
        nop_interval: Some(Duration::MAX),
        nop_timeout: Duration::MAX,
    };
    let mut s = session_with(SessionParams::default(), config, now);
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(now + Duration::from_secs(1 << 30));
    assert!(sent(&mut s).is_empty());
    let config = SessionConfig {
        nop_interval: Some(Duration::ZERO),
        nop_timeout: Duration::MAX,
    };
    let mut s = session_with(SessionParams::default(), config, now);
    s.handle_timeout(now);
    assert_eq!(sent(&mut s).len(), 1, "pinged");
    assert_eq!(s.poll_timeout(), None, "the ping never times out");
    s.handle_timeout(now + Duration::from_secs(1 << 30));
    assert!(!s.is_finished());
}

// ---------------------------------------------------------------------------------------------
// take_outstanding
// ---------------------------------------------------------------------------------------------

#[test]
fn take_outstanding_returns_unfinished_tasks_in_submission_order() {
    let mut login = login_result(SessionParams::default());
    login.max_cmd_sn = 102; // three commands fit
    let mut s = InitiatorSession::new(&login, quiet(), Instant::now());
    for t in [50, 10, 40, 20, 30] {
        s.submit(TaskId(t), read(t, 1)).unwrap();
    }
    s.text_request(TaskId(99), &[("SendTargets".into(), "All".into())])
        .unwrap();
    let out = sent(&mut s);
    assert_eq!(out.len(), 3);
    // The second one sent (TaskId 10) completes.
    let Header::ScsiCommand(second) = &out[1].0 else {
        panic!()
    };
    s.handle_pdu(
        raw(
            response(second.itt, 50, Status::GOOD).to_bhs(),
            Bytes::new(),
        ),
        Instant::now(),
    );
    assert_eq!(completions(events(&mut s))[0].task, TaskId(10));
    s.task_management(TaskId(98), TmfFunction::LOGICAL_UNIT_RESET, 0, None)
        .unwrap();
    let taken = s.take_outstanding();
    let ids: Vec<u64> = taken.iter().map(|(t, _)| t.0).collect();
    assert_eq!(
        ids,
        vec![50, 40, 20, 30],
        "sent and queued, in submission order"
    );
    // The original requests come back.
    assert_eq!(taken[2].1.cdb, cdb16(0x88, 20, 1));
    assert_eq!(s.outstanding(), 0);
    assert!(s.is_finished());
    assert!(s.take_outstanding().is_empty());
    // TaskIds can be reused on a new session.
    let mut fresh = session();
    for (t, req) in taken {
        fresh.submit(t, req).unwrap();
    }
    assert_eq!(fresh.outstanding(), 4);
}

// ---------------------------------------------------------------------------------------------
// Random input never panics, and every task ends exactly once
// ---------------------------------------------------------------------------------------------

/// Opcodes a target sends, plus a few it must not.
const OPCODES: [u8; 12] = [
    0x20, 0x21, 0x22, 0x24, 0x25, 0x26, 0x31, 0x32, 0x3f, 0x23, 0x01, 0x1c,
];

#[derive(Clone, Debug)]
struct Op {
    kind: u8,
    head: [u8; 32],
    tail: [u8; 16],
    data: Vec<u8>,
}

fn any_op() -> impl Strategy<Value = Op> {
    (
        any::<u8>(),
        proptest::array::uniform32(any::<u8>()),
        proptest::array::uniform16(any::<u8>()),
        proptest::collection::vec(any::<u8>(), 0..120),
    )
        .prop_map(|(kind, head, tail, data)| Op {
            kind,
            head,
            tail,
            data,
        })
}

/// A header aimed at the session's state: small ITTs, small sequence numbers, offsets on
/// block boundaries, window numbers near the current CmdSN.
fn aimed_bhs(op: &Op, cmd_sn: u32) -> Bhs {
    let mut b = Bhs::default();
    b.0[..32].copy_from_slice(&op.head);
    b.0[32..].copy_from_slice(&op.tail);
    let h = &op.head;
    b.0[0] = OPCODES[usize::from(h[0]) % OPCODES.len()];
    b.0[4] = 0;
    let itt = match h[16] % 10 {
        9 => RESERVED_TAG,
        n => u32::from(n),
    };
    b.0[16..20].copy_from_slice(&itt.to_be_bytes());
    if h[20] % 2 == 0 {
        b.0[20..24].copy_from_slice(&RESERVED_TAG.to_be_bytes());
    }
    let exp = cmd_sn.wrapping_sub(u32::from(h[28] % 4));
    let max = exp.wrapping_add(u32::from(op.tail[0] % 40)).wrapping_sub(2);
    b.0[28..32].copy_from_slice(&exp.to_be_bytes());
    b.0[32..36].copy_from_slice(&max.to_be_bytes());
    b.0[36..40].copy_from_slice(&u32::from(op.tail[4] % 3).to_be_bytes());
    b.0[40..44].copy_from_slice(&(u32::from(op.tail[8] % 8) * 512).to_be_bytes());
    b.0[44..48].copy_from_slice(&(u32::from(op.tail[12] % 5) * 512).to_be_bytes());
    b
}

/// A PDU a correct target could send now, aimed at one of the session's own requests (read
/// through the private maps), so that random runs get deep rather than failing at once.
fn plausible(s: &InitiatorSession, op: &Op) -> Option<RawPdu> {
    let h = &op.head;
    let exp = s.exp_cmd_sn;
    let max = s.max_cmd_sn + u32::from(h[6] % 3);
    let stat_sn = s.exp_stat_sn.0;
    let mut scsi: Vec<u32> = s
        .scsi
        .iter()
        .filter(|(_, t)| t.cmd_sn.is_some())
        .map(|(&itt, _)| itt)
        .collect();
    scsi.sort_unstable();
    let mut others: Vec<u32> = s.others.keys().copied().collect();
    others.sort_unstable();
    let (bhs, data) = if h[1] % 4 != 0 && !scsi.is_empty() {
        let itt = scsi[usize::from(h[2]) % scsi.len()];
        let t = &s.scsi[&itt];
        let read_len = t.request.read_len as usize;
        let write_len = t.request.data_out.len() as u32;
        let have = t.data_in.len();
        match h[3] % 3 {
            0 if read_len > have => {
                let len = (usize::from(h[4]) * 16).clamp(1, read_len - have);
                let last = have + len == read_len || h[5] % 3 == 0;
                let d = DataIn {
                    final_: last,
                    status: last.then_some(Status::GOOD),
                    itt,
                    ttt: RESERVED_TAG,
                    stat_sn,
                    exp_cmd_sn: exp.0,
                    max_cmd_sn: max.0,
                    data_sn: t.next_in_sn,
                    buffer_offset: have as u32,
                    underflow: last && have + len < read_len,
                    residual_count: (read_len - have - len) as u32,
                    ..Default::default()
                };
                (d.to_bhs(), Bytes::from(vec![h[7]; len]))
            }
            1 if write_len > 0 => {
                let offset = u32::from(h[4] % 8) * 512 % write_len;
                let len = (u32::from(h[5] % 4) + 1) * 512;
                let r = R2t {
                    itt,
                    ttt: u32::from(h[8]),
                    stat_sn,
                    exp_cmd_sn: exp.0,
                    max_cmd_sn: max.0,
                    r2t_sn: t.next_in_sn,
                    buffer_offset: offset,
                    desired_data_transfer_length: len.min(write_len - offset),
                    ..Default::default()
                };
                (r.to_bhs(), Bytes::new())
            }
            _ => {
                let status =
                    [Status::GOOD, Status::CHECK_CONDITION, Status::BUSY][usize::from(h[4] % 3)];
                let r = ScsiResponse {
                    status,
                    itt,
                    stat_sn,
                    exp_cmd_sn: exp.0,
                    max_cmd_sn: max.0,
                    ..Default::default()
                };
                (r.to_bhs(), Bytes::from(op.data.clone()))
            }
        }
    } else if !others.is_empty() {
        let itt = others[usize::from(h[2]) % others.len()];
        match &s.others[&itt] {
            OtherTask::Tmf { .. } => {
                let r = TaskMgmtResponse {
                    response: TmfResponse(h[4] % 7),
                    itt,
                    stat_sn,
                    exp_cmd_sn: exp.0,
                    max_cmd_sn: max.0,
                };
                (r.to_bhs(), Bytes::new())
            }
            OtherTask::Text { .. } => {
                let more = h[4] % 2 == 0;
                let r = TextResponse {
                    final_: !more,
                    continue_: more,
                    itt,
                    ttt: if more { 9 } else { RESERVED_TAG },
                    stat_sn,
                    exp_cmd_sn: exp.0,
                    max_cmd_sn: max.0,
                    ..Default::default()
                };
                (r.to_bhs(), Bytes::from_static(b"TargetName=iqn.x:y\0"))
            }
            OtherTask::Logout { .. } => {
                let r = LogoutResponse {
                    response: LogoutResponseCode(h[4] % 2),
                    itt,
                    stat_sn,
                    exp_cmd_sn: exp.0,
                    max_cmd_sn: max.0,
                    ..Default::default()
                };
                (r.to_bhs(), Bytes::new())
            }
        }
    } else {
        let n = NopIn {
            itt: RESERVED_TAG,
            ttt: if h[4] % 2 == 0 { 3 } else { RESERVED_TAG },
            stat_sn,
            exp_cmd_sn: exp.0,
            max_cmd_sn: max.0,
            ..Default::default()
        };
        (n.to_bhs(), Bytes::from(op.data.clone()))
    };
    let mut bhs = bhs;
    bhs.set_data_segment_len(data.len() as u32);
    Some(RawPdu {
        bhs,
        ahs: Bytes::new(),
        data,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_pdus_never_panic(ops in proptest::collection::vec(any_op(), 0..100),
                               initial_r2t: bool, immediate: bool, seg in 0u32..3) {
        let t0 = Instant::now();
        let params = SessionParams {
            initial_r2t,
            immediate_data: immediate,
            max_xmit_data_segment_length: [0, 512, 1500][seg as usize],
            first_burst_length: 2048,
            max_burst_length: 2048,
            ..SessionParams::default()
        };
        let config = SessionConfig {
            nop_interval: Some(Duration::from_secs(5)),
            nop_timeout: Duration::from_secs(5),
        };
        let mut login = login_result(params);
        login.max_cmd_sn = 103;
        let mut s = InitiatorSession::new(&login, config, t0);
        let mut now = t0;
        let mut submitted = HashSet::new();
        let mut completed = HashSet::new();
        let mut failures = 0;
        let mut next_task = 0u64;
        for (i, op) in ops.iter().enumerate() {
            match op.kind % 16 {
                0 => {
                    now += Duration::from_millis(u64::from(op.head[1]) * 40);
                    s.handle_timeout(now);
                }
                1 if op.head[5] % 4 == 0 => {
                    let bhs = aimed_bhs(op, s.cmd_sn());
                    s.handle_pdu(Err(PduError::DataDigest { bhs }), now);
                }
                2 | 3 => {
                    next_task += 1;
                    let req = if op.head[1] % 2 == 0 {
                        read(0, 4)
                    } else {
                        write(0, pattern(4096, op.head[2]))
                    };
                    if s.submit(TaskId(next_task), req).is_ok() {
                        submitted.insert(next_task);
                    }
                }
                4 => {
                    next_task += 1;
                    let target = TaskId(u64::from(op.head[1] % 8));
                    let f = TmfFunction(op.head[2] % 9);
                    let _ = s.task_management(TaskId(next_task), f, 0, Some(target));
                }
                5 => {
                    next_task += 1;
                    let _ = s.text_request(TaskId(next_task), &[("SendTargets".into(), "All".into())]);
                }
                6 if i > 60 => {
                    next_task += 1;
                    let _ = s.logout(TaskId(next_task), LogoutReason::CLOSE_SESSION);
                }
                7 => {
                    let mut bhs = aimed_bhs(op, s.cmd_sn());
                    let mut data = Bytes::from(op.data.clone());
                    if bhs.opcode() == Opcode::REJECT && op.head[3] % 2 == 0 {
                        // Reject one of our own PDUs.
                        let mut rejected = aimed_bhs(op, 0);
                        rejected.0[0] = [0x01, 0x05, 0x00, 0x02, 0x04][usize::from(op.head[4]) % 5];
                        data = Bytes::copy_from_slice(&rejected.0);
                    }
                    bhs.set_data_segment_len(data.len() as u32);
                    s.handle_pdu(Ok(RawPdu { bhs, ahs: Bytes::new(), data }), now);
                }
                _ => {
                    if let Some(pdu) = plausible(&s, op) {
                        s.handle_pdu(Ok(pdu), now);
                    }
                }
            }
            let finished = s.is_finished();
            for o in std::iter::from_fn(|| s.poll_transmit()) {
                prop_assert!(!finished, "nothing goes out after the end");
                prop_assert!(o.data.len() <= 0xff_ffff);
                if o.bhs.opcode() == Opcode::SCSI_COMMAND {
                    prop_assert_ne!(o.bhs.itt(), RESERVED_TAG);
                }
            }
            for e in std::iter::from_fn(|| s.poll_event()) {
                match e {
                    Event::Completed(c) => {
                        prop_assert!(submitted.contains(&c.task.0), "completed an unknown task");
                        prop_assert!(completed.insert(c.task.0), "completed twice");
                        prop_assert!(c.data.len() <= 2048);
                    }
                    Event::ConnectionFailed { .. } => failures += 1,
                    _ => {}
                }
            }
            prop_assert!(failures <= 1);
            if let Some(d) = s.poll_timeout() {
                prop_assert!(d >= t0);
            }
        }
        // Every task submitted either completed once or comes back for re-issue.
        let taken: Vec<u64> = s.take_outstanding().into_iter().map(|(t, _)| t.0).collect();
        let mut sorted = taken.clone();
        sorted.sort_unstable();
        prop_assert_eq!(&taken, &sorted, "submission order");
        for t in &taken {
            prop_assert!(!completed.contains(t));
        }
        prop_assert_eq!(taken.len() + completed.len(), submitted.len());
    }
}
