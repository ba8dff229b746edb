//! Seeds of the initiator targets, recorded from conversations of the initiator core with the
//! real target core (`TargetConnection` with a fake SCSI executor): what the target sent is
//! the seed, so that the fuzzer starts from a target that behaves.

use std::time::Instant;

use bytes::Bytes;
use iscsi_proto::initiator::{InitiatorLogin, LoginConfig, LoginStep, OutPdu};
use iscsi_proto::keys;
use iscsi_proto::target::{self, TargetConnection};
use iscsi_wire::*;

use super::{seed, Seed, SENSE_INVALID_FIELD};
use crate::initiator::{
    canned_session_login, login_config, record, reframe, SessionDrive, BLOCK, ISID,
};
use crate::{portal, CHAP_R_AUTO};

pub(super) fn all() -> Vec<Seed> {
    let mut v = initiator_login_seeds();
    v.extend(initiator_session_seeds());
    v
}

// -------------------------------------------------------------------------------------------
// initiator_login
// -------------------------------------------------------------------------------------------

/// Encodes PDUs as a target sends them during login (no digests).
fn login_bytes(pdus: &[(Bhs, Bytes)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (bhs, data) in pdus {
        encode_pdu(bhs, &[], data, FrameLimits::default(), &mut out);
    }
    out
}

/// Runs a login of `login_config(flags)` (changed by `tweak`) against the target core's plain
/// or CHAP portal and returns the target's Login Responses. With `auto`, the target's
/// mutual CHAP_R becomes `auto` (the fuzz target answers our own challenge with it).
fn converse_login(
    flags: u8,
    chap_portal: bool,
    auto: bool,
    tweak: impl FnOnce(&mut LoginConfig),
) -> Vec<(Bhs, Bytes)> {
    let now = Instant::now();
    let mut config = login_config(flags);
    tweak(&mut config);
    let mut login = InitiatorLogin::new(config);
    let mut target = TargetConnection::new(portal(chap_portal));
    let mut next = Some(login.start());
    let mut responses = Vec::new();
    while let Some(req) = next.take() {
        assert!(responses.len() < 32, "login does not end");
        target.handle_pdu(reframe(&req, FrameLimits::default()), now);
        while let Some(event) = target.poll_event() {
            if let target::Event::SessionRequested(r) = event {
                target.accept_session(if r.tsih != 0 { r.tsih } else { 1 });
            }
        }
        let Some(resp) = target.poll_transmit() else {
            break;
        };
        let mut recorded = resp.data.clone();
        if auto {
            if let Ok(mut pairs) = keys::parse_text_multi(&resp.data) {
                let mut changed = false;
                for (k, v) in &mut pairs {
                    if k == "CHAP_R" {
                        *v = CHAP_R_AUTO.into();
                        changed = true;
                    }
                }
                if changed {
                    recorded = Bytes::from(keys::encode_text(&pairs));
                }
            }
        }
        responses.push((resp.bhs, recorded));
        if let Ok(LoginStep::Send(out)) =
            login.handle_pdu(reframe(&resp, FrameLimits::default()), now)
        {
            next = Some(out);
        }
    }
    responses
}

fn login_seed(name: &str, flags: u8, pdus: &[(Bhs, Bytes)]) -> Seed {
    let mut bytes = vec![flags];
    bytes.extend(login_bytes(pdus));
    seed("initiator_login", name, bytes)
}

/// The first response with text, split in two: C=1 with the first half, then the rest.
fn split_first_response(pdus: &[(Bhs, Bytes)]) -> Vec<(Bhs, Bytes)> {
    let mut out = Vec::new();
    let mut done = false;
    for (bhs, data) in pdus {
        if done || data.len() < 2 {
            out.push((*bhs, data.clone()));
            continue;
        }
        done = true;
        let mut r = LoginResponse::parse(bhs);
        let (transit, nsg) = (r.transit, r.nsg);
        r.transit = false;
        r.nsg = 0;
        r.continue_ = true;
        let half = data.len() / 2;
        out.push((r.to_bhs(), data.slice(..half)));
        r.transit = transit;
        r.nsg = nsg;
        r.continue_ = false;
        r.stat_sn = r.stat_sn.wrapping_add(1);
        out.push((r.to_bhs(), data.slice(half..)));
    }
    out
}

fn login_response(status: LoginStatus, text: &[(&str, &str)]) -> (Bhs, Bytes) {
    let r = LoginResponse {
        isid: ISID,
        status,
        ..LoginResponse::default()
    };
    (r.to_bhs(), Bytes::from(keys::encode_text(text)))
}

fn initiator_login_seeds() -> Vec<Seed> {
    let mut v = Vec::new();
    let plain = converse_login(0, false, false, |_| {});
    v.push(login_seed("none", 0, &plain));
    v.push(login_seed(
        "continued-response",
        0,
        &split_first_response(&plain),
    ));
    v.push(login_seed(
        "chap",
        1,
        &converse_login(1, true, false, |_| {}),
    ));
    v.push(login_seed(
        "chap-mutual",
        2,
        &converse_login(2, true, true, |_| {}),
    ));
    // Without `auto` the target's proof answers another challenge: authentication fails.
    v.push(login_seed(
        "chap-mutual-bad-proof",
        2,
        &converse_login(2, true, false, |_| {}),
    ));
    v.push(login_seed(
        "chap-md5",
        3,
        &converse_login(3, true, false, |_| {}),
    ));
    v.push(login_seed(
        "chap-wrong-secret",
        1,
        &converse_login(1, true, false, |c| {
            if let Some(chap) = &mut c.chap {
                chap.credentials = iscsi_proto::chap::Credentials::new(
                    crate::CHAP_USER,
                    b"not-the-right-secret".to_vec(),
                );
            }
        }),
    ));
    v.push(login_seed(
        "none-at-chap-portal",
        0,
        &converse_login(0, true, false, |_| {}),
    ));
    v.push(login_seed(
        "discovery",
        0x04,
        &converse_login(0x04, false, false, |_| {}),
    ));
    v.push(login_seed(
        "discovery-chap",
        0x05,
        &converse_login(0x05, true, false, |_| {}),
    ));
    v.push(login_seed(
        "existing-session",
        0x08,
        &converse_login(0x08, false, false, |_| {}),
    ));
    v.push(login_seed(
        "digests-and-small-limits",
        0x10,
        &converse_login(0x10, false, false, |_| {}),
    ));
    v.push(login_seed(
        "chap-mutual-digests",
        0x12,
        &converse_login(0x12, true, true, |_| {}),
    ));
    v.push(login_seed(
        "restricted-target",
        0x20,
        &converse_login(0x20, false, false, |_| {}),
    ));
    v.push(login_seed(
        "redirect",
        0,
        &[login_response(
            LoginStatus(0x0101),
            &[("TargetAddress", "[fd00::2]:3260,1")],
        )],
    ));
    v.push(login_seed(
        "refused-out-of-resources",
        0,
        &[login_response(LoginStatus(0x0302), &[])],
    ));
    v
}

// -------------------------------------------------------------------------------------------
// initiator_session
// -------------------------------------------------------------------------------------------

/// An initiator session (the fuzz target's own driver) and a target core, joined in memory;
/// what the target sends becomes records of the seed.
struct Conversation {
    flags: u8,
    drive: SessionDrive,
    target: TargetConnection,
    /// How the target frames what it receives and what it sends.
    target_rx: FrameDecoder,
    target_tx: FrameLimits,
    hold: bool,
    held: Vec<target::Command>,
    /// Everything the initiator sent (for hand-made answers).
    sent: Vec<OutPdu>,
    bytes: Vec<u8>,
}

impl Conversation {
    fn new(flags: u8) -> Self {
        Self::start(flags, false)
    }

    /// The target holds the commands it gets until [`Self::release`].
    fn held(flags: u8) -> Self {
        Self::start(flags, true)
    }

    fn start(flags: u8, hold: bool) -> Self {
        let mut c = Conversation {
            flags,
            drive: SessionDrive::new(flags, true),
            target: TargetConnection::new(portal(false)),
            target_rx: FrameDecoder::default(),
            target_tx: FrameLimits::default(),
            hold,
            held: Vec::new(),
            sent: Vec::new(),
            bytes: vec![flags],
        };
        c.login_target();
        c.pump();
        c
    }

    /// A target logged in with the same canned login as the drive's session.
    fn login_target(&mut self) {
        let (target, _) = canned_session_login(self.flags & 3);
        let p = target.params();
        self.target_rx = FrameDecoder::new(FrameLimits {
            header_digest: p.header_digest,
            data_digest: p.data_digest,
            max_recv_data_segment_len: p.max_recv_data_segment_length,
        });
        self.target_tx = FrameLimits {
            header_digest: p.header_digest,
            data_digest: p.data_digest,
            max_recv_data_segment_len: p.max_xmit_data_segment_length,
        };
        self.target = target;
        self.held.clear();
    }

    fn record(&mut self, kind: u8, payload: &[u8]) {
        self.bytes.push(kind);
        let len = u16::try_from(payload.len()).expect("a record fits 64 KiB");
        self.bytes.extend_from_slice(&len.to_le_bytes());
        self.bytes.extend_from_slice(payload);
    }

    /// A record for the initiator; then the conversation runs until it is quiet.
    fn op(&mut self, kind: u8, payload: &[u8]) -> &mut Self {
        self.record(kind, payload);
        self.drive.apply(kind, payload);
        if kind == record::RECONNECT {
            self.login_target();
        }
        self.pump();
        self
    }

    fn submit(&mut self, payload: &[u8]) -> &mut Self {
        self.op(record::SUBMIT, payload)
    }

    /// Time passes for both sides (`ticks` × 50 ms).
    fn clock(&mut self, ticks: u8) -> &mut Self {
        self.record(record::CLOCK, &[ticks]);
        self.drive.apply(record::CLOCK, &[ticks]);
        self.target.handle_timeout(self.drive.now);
        self.pump();
        self
    }

    /// Time passes for the initiator while the target is unreachable.
    fn clock_silent(&mut self, ticks: u8) -> &mut Self {
        self.record(record::CLOCK, &[ticks]);
        self.drive.apply(record::CLOCK, &[ticks]);
        self.drive.capture.as_mut().map(std::mem::take);
        self
    }

    /// Hand-made target bytes.
    fn inject(&mut self, bytes: &[u8]) -> &mut Self {
        self.record(record::TARGET_BYTES, bytes);
        self.drive.apply(record::TARGET_BYTES, bytes);
        self.pump();
        self
    }

    /// Runs the commands the target holds.
    fn release(&mut self) -> &mut Self {
        for cmd in std::mem::take(&mut self.held) {
            self.execute(cmd);
        }
        self.pump();
        self
    }

    /// The numbers a hand-made target PDU needs now: (StatSN, ExpCmdSN, MaxCmdSN).
    fn numbers(&self) -> (u32, u32, u32) {
        let s = &self.drive.s;
        (s.exp_stat_sn(), s.exp_cmd_sn(), s.max_cmd_sn())
    }

    fn pump(&mut self) {
        loop {
            let mut moved = false;
            let out = self.drive.capture.as_mut().map(std::mem::take);
            for pdu in out.unwrap_or_default() {
                moved = true;
                let mut wire = Vec::new();
                encode_pdu(&pdu.bhs, &pdu.ahs, &pdu.data, self.drive.tx, &mut wire);
                let mut buf = bytes::BytesMut::from(&wire[..]);
                while let Ok(Some(item)) = self.target_rx.decode(&mut buf) {
                    self.target.handle_pdu(item, self.drive.now);
                }
                self.sent.push(pdu);
            }
            while let Some(event) = self.target.poll_event() {
                moved = true;
                match event {
                    target::Event::Execute(cmd) if self.hold => self.held.push(cmd),
                    target::Event::Execute(cmd) => self.execute(cmd),
                    target::Event::TaskManagement(t) => {
                        self.target.tmf_done(t.itt, TmfResponse::FUNCTION_COMPLETE)
                    }
                    target::Event::Close { .. } => {}
                    other => panic!("unexpected target event {other:?}"),
                }
            }
            let mut wire = Vec::new();
            while let Some(pdu) = self.target.poll_transmit() {
                encode_pdu(&pdu.bhs, &pdu.ahs, &pdu.data, self.target_tx, &mut wire);
            }
            for chunk in wire.chunks(u16::MAX as usize) {
                moved = true;
                self.record(record::TARGET_BYTES, chunk);
                self.drive.apply(record::TARGET_BYTES, chunk);
            }
            if !moved {
                return;
            }
        }
    }

    /// The fake SCSI executor: byte 6 of the CDB picks a full, short or long transfer, or a
    /// CHECK CONDITION.
    fn execute(&mut self, cmd: target::Command) {
        let edtl = cmd.expected_data_transfer_length as usize;
        let behaviour = cmd.cdb.get(6).copied().unwrap_or(0) & 3;
        let write_len = cmd.write.then_some(cmd.expected_data_transfer_length);
        let (status, sense, len) = match behaviour {
            0 => (Status::GOOD, &[][..], edtl),
            1 => (Status::GOOD, &[][..], edtl / 2),
            2 => (Status::CHECK_CONDITION, &SENSE_INVALID_FIELD[..], 0),
            _ => (Status::GOOD, &[][..], edtl + 512),
        };
        let data = if cmd.read && status == Status::GOOD {
            Bytes::from(vec![cmd.itt as u8; len])
        } else {
            Bytes::new()
        };
        self.target
            .complete(cmd.itt, status, sense, data, write_len);
    }

    fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}

/// A submit record (see `request_from`): direction, blocks - 1, CDB length index, behaviour.
fn req(dir: u8, blocks: u8, cdb: u8, behaviour: u8) -> [u8; 7] {
    [dir, blocks.saturating_sub(1), cdb, 0, 0, 0, behaviour]
}

const READ: u8 = 0;
const WRITE: u8 = 1;
const BIDI: u8 = 2;
const NO_DATA: u8 = 3;
/// Indexes into the CDB lengths of `request_from`: 10, 16, 32, 6, 17, 260, 261 bytes.
const CDB10: u8 = 0;
const CDB16: u8 = 1;
const CDB32: u8 = 2;
const CDB6: u8 = 3;
const CDB17: u8 = 4;
const CDB260: u8 = 5;
const CDB261: u8 = 6;

/// Flags of a session input: canned login variant, initial commands, keepalive off.
const fn flags(variant: u8, initial: u8, quiet: bool) -> u8 {
    variant | (initial << 2) | if quiet { 0x10 } else { 0 }
}

fn hand_pdu(limits: FrameLimits, bhs: Bhs, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut bhs = bhs;
    bhs.set_data_segment_len(data.len() as u32);
    encode_pdu(&bhs, &[], data, limits, &mut out);
    out
}

fn initiator_session_seeds() -> Vec<Seed> {
    const T: &str = "initiator_session";
    let mut v = Vec::new();
    let mut add = |name: &str, c: &mut Conversation| v.push(seed(T, name, c.finish()));

    add("read", &mut Conversation::new(flags(0, 1, true)));
    add("read-write", &mut Conversation::new(flags(0, 2, true)));
    add("mix-defaults", &mut Conversation::new(flags(0, 3, true)));
    add("mix-unsolicited", &mut Conversation::new(flags(1, 3, true)));
    add(
        "mix-small-limits",
        &mut Conversation::new(flags(2, 3, true)),
    );
    add("mix-digests", &mut Conversation::new(flags(3, 3, true)));
    add(
        "submit-various",
        Conversation::new(flags(0, 0, true))
            .submit(&req(READ, 2, CDB16, 0))
            .submit(&req(WRITE, 2, CDB10, 0))
            .submit(&req(NO_DATA, 1, CDB6, 0))
            .submit(&req(READ, 1, CDB17, 0))
            .submit(&req(READ, 1, CDB260, 0))
            .submit(&req(READ, 1, CDB261, 0))
            .submit(&[READ, 0, CDB10, 0x81, 1, 1, 0]),
    );
    add(
        "statuses",
        Conversation::new(flags(1, 0, true))
            .submit(&req(READ, 2, CDB10, 1))
            .submit(&req(READ, 1, CDB10, 2))
            .submit(&req(READ, 1, CDB10, 3))
            .submit(&req(WRITE, 4, CDB10, 2)),
    );
    add(
        "bidirectional",
        Conversation::held(flags(0, 0, true))
            .submit(&req(BIDI, 1, CDB32, 0))
            .release(),
    );
    add(
        "r2t-small-bursts",
        Conversation::new(flags(2, 0, true))
            .submit(&req(WRITE, 8, CDB10, 0))
            .submit(&req(READ, 4, CDB10, 0)),
    );
    add(
        "abort-task",
        Conversation::held(flags(0, 2, true))
            .op(record::TMF, &[0, 1, 0])
            .release(),
    );
    add(
        "abort-task-set-and-lun-reset",
        Conversation::held(flags(1, 3, true))
            .op(record::TMF, &[1, 0, 0])
            .submit(&req(WRITE, 2, CDB10, 0))
            .op(record::TMF, &[4, 0, 0])
            .release(),
    );
    add(
        "text-and-logout",
        Conversation::new(flags(0, 1, true))
            .op(record::TEXT, &[])
            .op(record::LOGOUT, &[0])
            .submit(&req(READ, 1, CDB10, 0)),
    );
    add(
        "keepalive",
        Conversation::new(flags(0, 1, false))
            .clock(120)
            .clock(120)
            .clock(20),
    );
    add(
        "keepalive-timeout",
        Conversation::held(flags(0, 0, false))
            .submit(&req(READ, 1, CDB10, 0))
            .clock_silent(110)
            .clock_silent(110)
            .op(record::RECONNECT, &[])
            .release(),
    );
    add(
        "reconnect-with-tasks",
        Conversation::held(flags(2, 3, true))
            .op(record::RECONNECT, &[])
            .release(),
    );

    // Hand-made answers to the commands of real conversations.
    let mut c = Conversation::held(flags(0, 2, true));
    let (stat_sn, exp, max) = c.numbers();
    let first = c.sent[0].bhs;
    let reject = Reject {
        reason: RejectReason::PROTOCOL_ERROR,
        stat_sn,
        exp_cmd_sn: exp,
        max_cmd_sn: max,
        data_sn_or_r2t_sn: 0,
    };
    let pdu = hand_pdu(c.drive.tx, reject.to_bhs(), &first.0);
    c.inject(&pdu).release();
    add("reject-command", &mut c);

    let mut c = Conversation::held(flags(0, 1, true));
    let limits = c.drive.tx;
    let mut stream = Vec::new();
    let (mut stat_sn, exp, max) = c.numbers();
    let mut sense = vec![0, 18];
    sense.extend_from_slice(&SENSE_INVALID_FIELD);
    for (event, p2, p3, data) in [
        (AsyncEvent::SCSI_ASYNC_EVENT, 0, 0, &sense[..]),
        (AsyncEvent::NEGOTIATION_REQUEST, 0, 0, &[][..]),
        (AsyncEvent::VENDOR_SPECIFIC, 0, 0, &[][..]),
        (AsyncEvent::CONNECTION_DROP, 2, 20, &[][..]),
        (AsyncEvent::LOGOUT_REQUESTED, 0, 5, &[][..]),
    ] {
        let m = AsyncMessage {
            lun: 0,
            stat_sn,
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            async_event: event,
            async_vcode: 0,
            parameter1: 0,
            parameter2: p2,
            parameter3: p3,
        };
        stat_sn += 1;
        stream.extend(hand_pdu(limits, m.to_bhs(), data));
    }
    c.inject(&stream).release().op(record::LOGOUT, &[0]);
    add("async-messages", &mut c);

    let mut c = Conversation::held(flags(1, 2, true));
    let (stat_sn, exp, max) = c.numbers();
    let write_itt = c
        .sent
        .iter()
        .filter(|p| p.bhs.opcode() == Opcode::SCSI_COMMAND)
        .map(|p| p.bhs.itt())
        .nth(1)
        .expect("two commands sent");
    let r2t = R2t {
        itt: write_itt,
        ttt: 0x77,
        stat_sn,
        exp_cmd_sn: exp,
        max_cmd_sn: max,
        r2t_sn: 0,
        buffer_offset: BLOCK,
        desired_data_transfer_length: 4 * BLOCK,
        ..R2t::default()
    };
    let pdu = hand_pdu(c.drive.tx, r2t.to_bhs(), &[]);
    c.inject(&pdu).op(record::RECONNECT, &[]).release();
    add("r2t-beyond-data-then-reconnect", &mut c);

    let mut c = Conversation::held(flags(3, 1, true));
    let first = c.sent[0].bhs;
    c.op(record::FRAMING, &first.0)
        .op(record::RECONNECT, &[])
        .release();
    add("framing-complaint-then-reconnect", &mut c);

    v
}
