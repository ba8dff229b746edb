//! Bodies of viscsi's fuzz targets, kept in an ordinary library so that the same code runs
//! under libFuzzer (`fuzz/`, nightly, `cargo fuzz run <target>`) and as stable tests that replay
//! the committed corpus (`tests/replay_corpus.rs`).
//!
//! Each `pub fn` takes the raw fuzz input and must never panic while the code under test is
//! correct: a panic is either a crash in the code under test or a broken invariant checked
//! here (round trips, limits the peer negotiated, answers that are valid text).
//!
//! | target                | input layout                                                     |
//! |-----------------------|------------------------------------------------------------------|
//! | [`pdu_stream`]        | `[limit selector] [byte stream]`                                 |
//! | [`text_negotiation`]  | `[flags] ([stage] [key=value\0...] 0xff)*`                       |
//! | [`target_login`]      | `[flags] [PDU stream from the start of the connection]`          |
//! | [`target_full_feature`] | `[flags] [PDU stream after a canned login]`                    |
//! | [`scsi_cdb`]          | `[LU flags] ([ctrl] [cdb len] [cdb] [data len u16 LE] [data])*` |
//! | [`initiator_login`]   | `[flags] [Login Response stream]`                                |
//! | [`initiator_session`] | `[flags] ([kind] [len u16 LE] [payload])*`                       |
//!
//! [`seeds`] builds the committed seed corpus from realistic PDUs and CDBs, and for the
//! initiator targets from conversations with the real target core.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_proto::chap::{ChapAlgorithm, Credentials};
use iscsi_proto::keys::{self, Negotiation, NegotiationConfig, Role};
use iscsi_proto::target::{
    AuthPolicy, Command, Event, OutPdu, PortalConfig, TargetConnection, TargetEntry,
};
use iscsi_wire::pdu::ahs;
use iscsi_wire::*;

pub mod initiator;
pub mod seeds;

pub use initiator::{initiator_login, initiator_session};

// -------------------------------------------------------------------------------------------
// (1) PDU framing and typed headers
// -------------------------------------------------------------------------------------------

/// MaxRecvDataSegmentLength values the framer is tried with, picked by the first input byte.
const FRAME_MAX_RECV: [u32; 4] = [8192, 512, 262_144, (1 << 24) - 1];

/// Frames the input with every combination of header and data digest, types every header and
/// its AHS, and checks that typed headers and whole frames survive a re-encode.
pub fn pdu_stream(data: &[u8]) {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let max_recv_data_segment_len = FRAME_MAX_RECV[usize::from(sel & 3)];
    for (header_digest, data_digest) in [(false, false), (true, false), (false, true), (true, true)]
    {
        let limits = FrameLimits {
            header_digest,
            data_digest,
            max_recv_data_segment_len,
        };
        frame_all(stream, limits);
    }
}

fn frame_all(stream: &[u8], limits: FrameLimits) {
    let mut dec = FrameDecoder::new(limits);
    let mut buf = BytesMut::from(stream);
    loop {
        let before = buf.len();
        let item = match dec.decode(&mut buf) {
            Ok(Some(item)) => item,
            Ok(None) => {
                assert_eq!(
                    buf.len(),
                    before,
                    "an incomplete PDU must not consume input"
                );
                let need = dec.next_pdu_len(&buf);
                assert!(
                    need.is_none_or(|n| n > buf.len()),
                    "decode waited although a whole PDU is buffered"
                );
                return;
            }
            Err(FrameError::HeaderDigest) => {
                assert!(
                    limits.header_digest,
                    "header digest error without header digests"
                );
                return;
            }
        };
        assert!(buf.len() < before, "a decoded item must consume input");
        match item {
            Ok(pdu) => check_raw_pdu(&pdu, limits),
            Err(e) => {
                let bhs = *e.bhs();
                if let PduError::DataSegmentTooLong { len, max, .. } = e {
                    assert_eq!(len, bhs.data_segment_len());
                    assert!(len > max);
                } else {
                    assert!(limits.data_digest, "data digest error without data digests");
                }
                let _ = Header::parse(&bhs);
            }
        }
    }
}

fn check_raw_pdu(pdu: &RawPdu, limits: FrameLimits) {
    assert_eq!(pdu.ahs.len(), pdu.bhs.total_ahs_len());
    assert_eq!(pdu.data.len(), pdu.bhs.data_segment_len() as usize);
    assert!(pdu.bhs.data_segment_len() <= limits.max_recv_data_segment_len);

    // Typed header: parse, re-encode, parse again.
    if let Ok(header) = Header::parse(&pdu.bhs) {
        let again =
            Header::parse(&header.to_bhs()).expect("a typed header re-encodes to a known opcode");
        assert_eq!(header, again, "typed header round trip");
        if let Header::ScsiCommand(cmd) = &header {
            if let Ok(cdb) = ahs::full_cdb(&cmd.cdb, &pdu.ahs) {
                assert!(cdb.len() >= 16 && cdb[..16] == cmd.cdb[..]);
                assert!(cdb.len() <= 16 + pdu.ahs.len());
            }
        }
    }
    if let Ok(segments) = ahs::parse(&pdu.ahs) {
        // Re-encoding the segments gives back the area (padding aside, which must be zero to
        // compare; so compare the parsed form instead).
        let mut area = Vec::new();
        for s in &segments {
            ahs::encode(s.ahs_type, s.specific, &mut area);
        }
        assert_eq!(
            area.len(),
            pdu.ahs.len(),
            "AHS segments re-encode to the same length"
        );
        let reparsed = ahs::parse(&area).expect("encoded AHS parses");
        assert_eq!(reparsed, segments);
    }

    // Whole frame: encode with the same digests and decode again.
    let mut out = Vec::new();
    encode_pdu(&pdu.bhs, &pdu.ahs, &pdu.data, limits, &mut out);
    assert_eq!(out.len() % 4, 0);
    let mut buf = BytesMut::from(&out[..]);
    let again = FrameDecoder::new(limits)
        .decode(&mut buf)
        .expect("re-encoded PDU frames")
        .expect("re-encoded PDU is complete")
        .expect("re-encoded PDU is valid");
    assert_eq!(&again, pdu, "frame round trip");
    assert!(buf.is_empty());
}

// -------------------------------------------------------------------------------------------
// (2) Text negotiation
// -------------------------------------------------------------------------------------------

/// Separates the text batches of [`text_negotiation`] (0xff never occurs in UTF-8).
pub const BATCH_SEPARATOR: u8 = 0xff;

fn negotiation_config(flags: u8, role: Role) -> NegotiationConfig {
    let mut cfg = NegotiationConfig::default();
    if flags & 0x02 != 0 {
        cfg.header_digest = vec![keys::Digest::Crc32c, keys::Digest::None];
        cfg.data_digest = vec![keys::Digest::Crc32c];
        cfg.max_recv_data_segment_length = 8192;
        cfg.max_burst_length = 1 << 20;
        cfg.first_burst_length = 1 << 20;
        cfg.initial_r2t = false;
        cfg.max_outstanding_r2t = 8;
        cfg.max_connections = 4;
        cfg.default_time2wait = 0;
        cfg.default_time2retain = 0;
        cfg.data_pdu_in_order = false;
        cfg.error_recovery_level = 2;
    }
    match role {
        Role::Target => {
            cfg.target_alias = Some("fuzz target".into());
            cfg.target_portal_group_tag = Some(1);
        }
        Role::Initiator => {
            cfg.initiator_name = Some(seeds::INITIATOR_NAME.into());
            cfg.initiator_alias = Some("fuzz".into());
            if flags & 0x04 != 0 {
                cfg.session_type = keys::SessionType::Discovery;
            } else {
                cfg.target_name = Some(seeds::TARGET_NAME.into());
            }
        }
    }
    cfg
}

fn key_stage(b: u8) -> keys::Stage {
    match b % 3 {
        0 => keys::Stage::Security,
        1 => keys::Stage::Operational,
        _ => keys::Stage::FullFeature,
    }
}

/// Parses each batch of the input as a Login/Text data segment; a target-role negotiation
/// answers it as offers and an initiator-role negotiation takes it as answers to its offers.
pub fn text_negotiation(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let leading = flags & 0x01 == 0;
    let mut target = Negotiation::new(Role::Target, negotiation_config(flags, Role::Target));
    let mut initiator =
        Negotiation::new(Role::Initiator, negotiation_config(flags, Role::Initiator));
    let (mut target_ok, mut initiator_ok) = (true, true);
    for batch in rest.split(|&b| b == BATCH_SEPARATOR).take(16) {
        let Some((&stage, text)) = batch.split_first() else {
            continue;
        };
        let stage = key_stage(stage);
        let _ = keys::parse_text_multi(text);
        let Ok(pairs) = keys::parse_text(text) else {
            continue;
        };
        for (k, v) in &pairs {
            let _ = keys::parse_numeric(v);
            let _ = keys::parse_binary(v);
            let _ = keys::lookup(k);
        }
        if target_ok {
            match target.respond(stage, leading, &pairs) {
                Ok(resp) => check_text_out(&resp.answers),
                // A failed login ends the negotiation.
                Err(e) => {
                    let _ = e.login_status();
                    target_ok = false;
                }
            }
        }
        if initiator_ok {
            let offers = initiator.offers(stage, leading);
            check_text_out(&offers);
            match initiator.accept_answers(stage, &pairs) {
                Ok(reply) => check_text_out(&reply),
                Err(_) => initiator_ok = false,
            }
            let _ = initiator.unanswered();
        }
    }
    check_params(&target);
    check_params(&initiator);
}

/// What we send must be text the peer can parse.
fn check_text_out(pairs: &[(String, String)]) {
    let encoded = keys::encode_text(pairs);
    let parsed = keys::parse_text_multi(&encoded).expect("our own key=value text parses");
    assert_eq!(parsed.len(), pairs.len(), "our own text keeps its pairs");
}

/// The negotiated parameters stay within the RFC's ranges and on our side of each result
/// function.
fn check_params(neg: &Negotiation) {
    check_session_params(&neg.params(), neg.config());
}

/// [`check_params`] for parameters `p` negotiated from our side's `cfg`.
pub(crate) fn check_session_params(p: &keys::SessionParams, cfg: &NegotiationConfig) {
    let defaults = keys::SessionParams::default();
    let seg = 512..=(1 << 24) - 1;
    assert!(
        seg.contains(&p.max_xmit_data_segment_length),
        "MaxRecvDataSegmentLength out of range: {p:?}"
    );
    assert!(
        seg.contains(&p.max_recv_data_segment_length),
        "our MaxRecvDataSegmentLength out of range: {p:?}"
    );
    assert!(
        seg.contains(&p.max_burst_length),
        "MaxBurstLength out of range: {p:?}"
    );
    assert!(
        (512..=p.max_burst_length).contains(&p.first_burst_length),
        "FirstBurstLength out of range: {p:?}"
    );
    assert!(
        p.max_outstanding_r2t >= 1 && p.max_connections >= 1,
        "{p:?}"
    );
    // Minimum functions: never above what we allow (or the default, if not negotiated).
    assert!(
        p.max_burst_length <= cfg.max_burst_length.max(defaults.max_burst_length),
        "{p:?}"
    );
    assert!(
        p.max_outstanding_r2t <= cfg.max_outstanding_r2t.max(defaults.max_outstanding_r2t),
        "{p:?}"
    );
    assert!(
        p.max_connections <= cfg.max_connections.max(defaults.max_connections),
        "{p:?}"
    );
    assert!(
        p.error_recovery_level <= cfg.error_recovery_level.max(defaults.error_recovery_level),
        "{p:?}"
    );
    assert!(
        p.default_time2retain <= cfg.default_time2retain.max(defaults.default_time2retain),
        "{p:?}"
    );
    assert!(
        p.default_time2retain <= 3600 && p.default_time2wait <= 3600,
        "{p:?}"
    );
    // Maximum function.
    assert!(
        p.default_time2wait >= cfg.default_time2wait.min(defaults.default_time2wait),
        "{p:?}"
    );
    // Digests only if we accept them.
    if p.header_digest {
        assert!(cfg.header_digest.contains(&keys::Digest::Crc32c));
    }
    if p.data_digest {
        assert!(cfg.data_digest.contains(&keys::Digest::Crc32c));
    }
}

// -------------------------------------------------------------------------------------------
// (3) Target-side connection: login and full feature phase
// -------------------------------------------------------------------------------------------

/// Options a target input selects with its first byte.
#[derive(Clone, Copy, Debug)]
struct DriveOptions {
    /// Fake time that passes between two PDUs.
    step: Duration,
    /// Hold Execute events and complete one per incoming PDU (tasks stay in flight, so task
    /// management and duplicate tags meet them); otherwise complete at once.
    defer: bool,
    /// Refuse the session instead of accepting it.
    refuse: bool,
}

impl DriveOptions {
    fn from_flags(flags: u8) -> Self {
        const STEPS: [Duration; 4] = [
            Duration::ZERO,
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(6),
        ];
        DriveOptions {
            step: STEPS[usize::from(flags & 3)],
            defer: flags & 0x04 != 0,
            refuse: flags & 0x18 == 0x18,
        }
    }
}

/// The known CHAP parties of the CHAP-protected portal.
pub const CHAP_USER: &str = "iqn.2024-01.org.viscsi:fuzz-initiator";
pub const CHAP_SECRET: &[u8] = b"fuzz-initiator-secret";
pub const CHAP_TARGET_USER: &str = "iqn.2024-01.org.viscsi:fuzz-target";
pub const CHAP_TARGET_SECRET: &[u8] = b"fuzz-target-secret-2";
/// A `CHAP_R` with this value is replaced by the correct response to the target's last
/// challenge before the PDU reaches the target, so the fuzzer can get past authentication.
pub const CHAP_R_AUTO: &str = "auto";

pub(crate) fn portal(chap: bool) -> Arc<PortalConfig> {
    static PLAIN: OnceLock<Arc<PortalConfig>> = OnceLock::new();
    static CHAP: OnceLock<Arc<PortalConfig>> = OnceLock::new();
    let cell = if chap { &CHAP } else { &PLAIN };
    cell.get_or_init(|| {
        let auth = if chap {
            AuthPolicy {
                initiators: vec![Credentials::new(CHAP_USER, CHAP_SECRET)],
                target: Some(Credentials::new(CHAP_TARGET_USER, CHAP_TARGET_SECRET)),
                algorithms: Vec::new(),
            }
        } else {
            AuthPolicy::default()
        };
        let negotiation = NegotiationConfig {
            max_outstanding_r2t: 4,
            // Let initiators that offer InitialR2T=No send unsolicited Data-Out.
            initial_r2t: false,
            target_alias: Some("fuzz".into()),
            ..NegotiationConfig::default()
        };
        Arc::new(PortalConfig {
            targets: vec![
                TargetEntry {
                    name: seeds::TARGET_NAME.into(),
                    alias: Some("fuzz".into()),
                    auth,
                    allowed_initiators: Vec::new(),
                },
                TargetEntry {
                    name: seeds::RESTRICTED_TARGET_NAME.into(),
                    alias: None,
                    auth: AuthPolicy::default(),
                    allowed_initiators: vec!["iqn.2024-01.org.viscsi:someone-else".into()],
                },
            ],
            discovery_auth: AuthPolicy::default(),
            negotiation,
            portal_group_tag: 1,
            addresses: vec!["127.0.0.1:3260,1".into(), "[::1]:3260,1".into()],
            command_window: 16,
            nop_in_interval: Some(Duration::from_secs(5)),
            nop_in_timeout: Duration::from_secs(5),
        })
    })
    .clone()
}

/// Largest Data-In the fake executor produces for one command.
const MAX_FAKE_DATA_IN: usize = 64 * 1024;

/// Drives one [`TargetConnection`] as the network driver would, with a fake clock and a fake
/// SCSI executor, checking every PDU the target sends.
struct Drive {
    conn: TargetConnection,
    rx: FrameDecoder,
    tx: FrameLimits,
    opts: DriveOptions,
    now: Instant,
    pending: VecDeque<Command>,
    next_tsih: u16,
    closed: bool,
    full_feature: bool,
    /// Commands handed to the fake executor (for tests of the seeds).
    executed: usize,
    /// Reject PDUs the target sent (for tests of the seeds).
    rejects: usize,
    /// (algorithm, identifier, challenge) of the last CHAP challenge the target sent.
    chap_challenge: Option<(ChapAlgorithm, u8, Vec<u8>)>,
}

impl Drive {
    fn new(chap: bool, opts: DriveOptions) -> Self {
        Drive {
            conn: TargetConnection::new(portal(chap)),
            rx: FrameDecoder::new(FrameLimits::default()),
            tx: FrameLimits::default(),
            opts,
            now: Instant::now(),
            pending: VecDeque::new(),
            next_tsih: 1,
            closed: false,
            full_feature: false,
            executed: 0,
            rejects: 0,
            chap_challenge: None,
        }
    }

    /// Feeds a byte stream; returns when it is used up or the connection is closed.
    fn feed(&mut self, stream: &[u8]) {
        let mut buf = BytesMut::from(stream);
        while !self.closed {
            let item = match self.rx.decode(&mut buf) {
                Ok(Some(item)) => item,
                Ok(None) => break,
                // Framing is lost: the driver closes the connection.
                Err(FrameError::HeaderDigest) => {
                    self.closed = true;
                    break;
                }
            };
            let item = item.map(|pdu| self.auto_chap(pdu));
            self.conn.handle_pdu(item, self.now);
            self.service();
            if self.opts.defer {
                self.complete_one();
            } else {
                self.complete_all();
            }
            self.now += self.opts.step;
            if self.conn.poll_timeout().is_some_and(|t| t <= self.now) {
                self.conn.handle_timeout(self.now);
                self.service();
            }
        }
    }

    /// End of input: finish the commands in flight and let the keepalive timers run out.
    fn finish(&mut self) {
        self.complete_all();
        for _ in 0..3 {
            if self.closed {
                break;
            }
            let Some(t) = self.conn.poll_timeout() else {
                break;
            };
            self.now = self.now.max(t);
            self.conn.handle_timeout(self.now);
            self.service();
        }
    }

    fn complete_one(&mut self) {
        if let Some(cmd) = self.pending.pop_front() {
            self.complete(cmd);
            self.service();
        }
    }

    fn complete_all(&mut self) {
        while !self.pending.is_empty() {
            self.complete_one();
        }
    }

    /// A fake execution: the ITT picks a full, short, long or failed completion.
    fn complete(&mut self, cmd: Command) {
        let edtl = (cmd.expected_data_transfer_length as usize).min(MAX_FAKE_DATA_IN);
        let fill = cmd.itt as u8;
        let write_len = cmd.write.then_some(cmd.expected_data_transfer_length);
        let (status, sense, len) = match cmd.itt % 4 {
            0 => (Status::GOOD, &[][..], edtl),
            1 => (Status::GOOD, &[][..], edtl / 2),
            2 => (Status::GOOD, &[][..], edtl + 512),
            _ => (Status::CHECK_CONDITION, &seeds::SENSE_INVALID_FIELD[..], 0),
        };
        let data = if cmd.read {
            Bytes::from(vec![fill; len])
        } else {
            Bytes::new()
        };
        self.conn.complete(cmd.itt, status, sense, data, write_len);
    }

    /// Handles the target's events and checks what it sends.
    fn service(&mut self) {
        loop {
            while let Some(out) = self.conn.poll_transmit() {
                self.check_out(&out);
            }
            let Some(event) = self.conn.poll_event() else {
                break;
            };
            match event {
                Event::SessionRequested(req) => {
                    assert!(!req.initiator_name.is_empty());
                    if self.opts.refuse {
                        self.conn.refuse_session(LoginStatus::OUT_OF_RESOURCES);
                    } else {
                        let tsih = if req.tsih != 0 {
                            req.tsih
                        } else {
                            self.next_tsih
                        };
                        self.next_tsih = self.next_tsih.wrapping_add(1).max(1);
                        self.conn.accept_session(tsih);
                    }
                }
                Event::FullFeature { params, rx, tx } => {
                    assert!(!self.full_feature, "full feature phase entered twice");
                    assert!(self.conn.is_full_feature());
                    assert_eq!(
                        rx.max_recv_data_segment_len,
                        params.max_recv_data_segment_length
                    );
                    assert_eq!(
                        tx.max_recv_data_segment_len,
                        params.max_xmit_data_segment_length
                    );
                    self.full_feature = true;
                    self.rx.set_limits(rx);
                    self.tx = tx;
                }
                Event::Execute(cmd) => {
                    assert!(
                        self.full_feature,
                        "command executed outside full feature phase"
                    );
                    if cmd.write && cmd.expected_data_transfer_length > 0 {
                        assert!(
                            cmd.data_out.len() as u64
                                <= u64::from(cmd.expected_data_transfer_length)
                        );
                    }
                    assert!(
                        self.pending.iter().all(|p| p.itt != cmd.itt),
                        "two tasks in flight with one ITT"
                    );
                    self.executed += 1;
                    self.pending.push_back(cmd);
                }
                Event::TaskManagement(t) => {
                    let response = if t.itt % 2 == 0 {
                        TmfResponse::FUNCTION_COMPLETE
                    } else {
                        TmfResponse::FUNCTION_REJECTED
                    };
                    // Tasks the function aborted will not be completed by the driver.
                    self.pending.retain(|c| {
                        t.function != TmfFunction::LOGICAL_UNIT_RESET || c.raw_lun != t.raw_lun
                    });
                    self.conn.tmf_done(t.itt, response);
                }
                Event::Close { .. } => {
                    assert!(self.conn.is_closed());
                    self.closed = true;
                }
            }
        }
    }

    /// Every PDU the target sends is a target opcode that frames under the limits in force.
    fn check_out(&mut self, out: &OutPdu) {
        let header = Header::parse(&out.bhs).expect("the target sends known opcodes");
        assert!(
            !out.bhs.opcode().is_initiator_opcode(),
            "target sent an initiator opcode: {header:?}"
        );
        assert!(
            out.data.len() < 1 << 24,
            "data segment longer than DataSegmentLength can say"
        );
        let limit = if self.full_feature {
            self.tx.max_recv_data_segment_len
        } else {
            8192
        };
        assert!(
            out.data.len() <= limit as usize,
            "{} data bytes exceed the initiator's MaxRecvDataSegmentLength {limit}: {header:?}",
            out.data.len()
        );
        let mut wire = Vec::new();
        assert!(out.ahs.is_empty(), "the target sends no AHS: {header:?}");
        encode_pdu(&out.bhs, &out.ahs, &out.data, self.tx, &mut wire);
        let mut buf = BytesMut::from(&wire[..]);
        let mut dec = FrameDecoder::new(FrameLimits {
            max_recv_data_segment_len: 1 << 24,
            ..self.tx
        });
        let back = dec
            .decode(&mut buf)
            .expect("frames")
            .expect("complete")
            .expect("valid");
        assert_eq!(back.data, out.data);
        match &header {
            Header::LoginResponse(r) => {
                if let Ok(pairs) = keys::parse_text_multi(&out.data) {
                    self.note_chap_challenge(&pairs);
                } else {
                    panic!(
                        "login response text does not parse: {:?}",
                        String::from_utf8_lossy(&out.data)
                    );
                }
                assert!(
                    r.status == LoginStatus::SUCCESS || !r.transit,
                    "failed login response with T set"
                );
            }
            Header::Reject(_) => self.rejects += 1,
            Header::DataIn(d) => {
                assert!(
                    d.status.is_none() || d.final_,
                    "status in a non-final Data-In"
                );
            }
            _ => {}
        }
    }

    fn note_chap_challenge(&mut self, pairs: &[(String, String)]) {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let alg = get("CHAP_A")
            .and_then(keys::parse_numeric)
            .and_then(|n| u8::try_from(n).ok());
        let id = get("CHAP_I")
            .and_then(keys::parse_numeric)
            .and_then(|n| u8::try_from(n).ok());
        let challenge = get("CHAP_C").and_then(keys::parse_binary);
        if let (Some(alg), Some(id), Some(challenge)) = (alg, id, challenge) {
            self.chap_challenge = Some((ChapAlgorithm(alg), id, challenge));
        }
    }

    /// Replaces `CHAP_R=auto` in a Login Request with the right answer to the last challenge.
    fn auto_chap(&self, mut pdu: RawPdu) -> RawPdu {
        let Some((alg, id, challenge)) = &self.chap_challenge else {
            return pdu;
        };
        if pdu.bhs.opcode() != Opcode::LOGIN_REQUEST {
            return pdu;
        }
        let Ok(mut pairs) = keys::parse_text_multi(&pdu.data) else {
            return pdu;
        };
        let Some(slot) = pairs
            .iter_mut()
            .find(|(k, v)| k == "CHAP_R" && v == CHAP_R_AUTO)
        else {
            return pdu;
        };
        let Some(digest) = alg.digest(*id, CHAP_SECRET, challenge) else {
            return pdu;
        };
        slot.1 = keys::encode_hex(&digest);
        pdu.data = Bytes::from(keys::encode_text(&pairs));
        pdu.bhs.set_data_segment_len(pdu.data.len() as u32);
        pdu
    }
}

/// A connection from its first byte: login (plain or CHAP-protected portal, chosen by bit 5 of
/// the first byte), then whatever follows.
pub fn target_login(data: &[u8]) {
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    let mut drive = Drive::new(flags & 0x20 != 0, DriveOptions::from_flags(flags));
    drive.feed(stream);
    drive.finish();
}

/// A connection that a canned login (variant chosen by bits 6-7 of the first byte, see
/// [`seeds::canned_login`]) has brought to full feature phase; the input is what follows.
pub fn target_full_feature(data: &[u8]) {
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    let mut drive = Drive::new(
        false,
        DriveOptions {
            refuse: false,
            ..DriveOptions::from_flags(flags)
        },
    );
    drive.feed(&seeds::canned_login(flags >> 6));
    assert!(
        drive.full_feature && drive.conn.is_full_feature(),
        "canned login did not reach full feature phase"
    );
    drive.feed(stream);
    drive.finish();
}

// -------------------------------------------------------------------------------------------
// (4) SCSI logical unit
// -------------------------------------------------------------------------------------------

/// Size of the RAM disk behind the fuzzed logical unit.
pub const LU_BYTES: u64 = 1 << 20;

/// Commands run against one fresh logical unit per input.
const MAX_COMMANDS: usize = 64;

/// Runs a sequence of CDBs with Data-Out on a 1 MiB RAM-disk logical unit, from two I_T
/// nexuses in turn.
///
/// First byte: bit 0 block size 4096, bit 1 no thin provisioning, bit 2 write cache off,
/// bit 3 removable, bit 4 read-only back-end, bit 5 small max transfer.
/// Each command: `ctrl` (bits 0-1: 1 LU reset, 2 target reset, 3 nexus lost, by this nexus,
/// before the command; bit 2: size the Data-Out to what the CDB asks for), CDB length (mod 33),
/// CDB, Data-Out length (u16 LE, mod 8193), Data-Out.
pub fn scsi_cdb(data: &[u8]) {
    use scsi::backend::{MemoryBackend, ReadOnly};
    use scsi::{BlockBackend, ItNexus, LogicalUnit, LuConfig, ScsiStatus};

    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let config = LuConfig {
        block_size: if flags & 0x01 != 0 { 4096 } else { 512 },
        thin_provisioning: flags & 0x02 == 0,
        write_cache: flags & 0x04 == 0,
        removable: flags & 0x08 != 0,
        max_transfer_bytes: if flags & 0x20 != 0 {
            64 * 1024
        } else {
            32 << 20
        },
        serial: "fuzz0001".into(),
        ..LuConfig::default()
    };
    let backend: Arc<dyn BlockBackend> = if flags & 0x10 != 0 {
        Arc::new(ReadOnly(MemoryBackend::new(LU_BYTES)))
    } else {
        Arc::new(MemoryBackend::new(LU_BYTES))
    };
    let lu = LogicalUnit::new(backend, config);
    let block = u64::from(lu.block_size());
    assert_eq!(lu.num_blocks() * block, LU_BYTES);
    let nexuses = [
        ItNexus {
            initiator_port: format!("{},i,0x00023d000001", seeds::INITIATOR_NAME),
            target_port: format!("{},t,0x0001", seeds::TARGET_NAME),
            relative_target_port: 1,
        },
        ItNexus {
            initiator_port: "iqn.1994-05.com.redhat:peer,i,0x00023d000002".into(),
            target_port: format!("{},t,0x0002", seeds::TARGET_NAME),
            relative_target_port: 2,
        },
    ];

    for i in 0..MAX_COMMANDS {
        let Some((&ctrl, r)) = rest.split_first() else {
            break;
        };
        let Some((&cdb_len, r)) = r.split_first() else {
            break;
        };
        let cdb_len = usize::from(cdb_len % 33).min(r.len());
        let (cdb, r) = r.split_at(cdb_len);
        let (dlen, r) = match r {
            [a, b, r @ ..] => (usize::from(u16::from_le_bytes([*a, *b])) % 8193, r),
            _ => (0, &[][..]),
        };
        let dlen = dlen.min(r.len());
        let (given, r) = r.split_at(dlen);
        rest = r;

        let nexus = &nexuses[i % 2];
        match ctrl & 3 {
            1 => lu.logical_unit_reset(nexus),
            2 => lu.target_reset(nexus),
            3 => lu.nexus_lost(nexus),
            _ => {}
        }
        let expected = lu.expected_data_out_len(cdb);
        let data_out: Vec<u8> = match expected {
            // Size the Data-Out as an initiator would, repeating the given bytes.
            Some(n) if ctrl & 4 != 0 && n <= 1 << 20 => {
                if given.is_empty() {
                    vec![0; n]
                } else {
                    given.iter().copied().cycle().take(n).collect()
                }
            }
            _ => given.to_vec(),
        };
        let _ = scsi::cdb::describe(cdb);
        let _ = scsi::cdb::data_direction(cdb);
        let _ = scsi::cdb::lba_and_length(cdb);
        let resp = lu.execute(nexus, cdb, &data_out);
        match resp.status {
            ScsiStatus::GOOD => assert!(resp.sense.is_empty(), "GOOD with sense data"),
            ScsiStatus::CHECK_CONDITION => {
                assert!(resp.data.is_empty(), "CHECK CONDITION with Data-In");
                let sense = resp
                    .parsed_sense()
                    .expect("CHECK CONDITION carries well-formed sense");
                assert_ne!(sense.key.0, 0, "CHECK CONDITION with NO SENSE");
            }
            ScsiStatus::RESERVATION_CONFLICT => {
                assert!(resp.data.is_empty() && resp.sense.is_empty())
            }
            other => panic!("unexpected status {other:?}"),
        }
        assert!(
            resp.data.len() <= (1 << 24),
            "Data-In larger than any CDB can ask for"
        );
    }
}

/// The names of the fuzz targets, as in `fuzz/fuzz_targets/` and `fuzz/corpus/`.
pub const TARGETS: [&str; 7] = [
    "pdu_stream",
    "text_negotiation",
    "target_login",
    "target_full_feature",
    "scsi_cdb",
    "initiator_login",
    "initiator_session",
];

/// Runs the target called `name` on `data`; `None` for an unknown name.
pub fn run(name: &str, data: &[u8]) -> Option<()> {
    match name {
        "pdu_stream" => pdu_stream(data),
        "text_negotiation" => text_negotiation(data),
        "target_login" => target_login(data),
        "target_full_feature" => target_full_feature(data),
        "scsi_cdb" => scsi_cdb(data),
        "initiator_login" => initiator_login(data),
        "initiator_session" => initiator_session(data),
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests;
