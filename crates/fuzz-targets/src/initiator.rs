//! Fuzz targets of the initiator role: [`initiator_login`] ([`InitiatorLogin`] fed Login
//! Responses) and [`initiator_session`] ([`InitiatorSession`] fed target PDUs, clock ticks,
//! new requests and reconnects).
//!
//! Both play the driver of `crates/initiator` with a fake clock and check, besides "never
//! panics", what the driver relies on: every request we send is well formed and within the
//! negotiated limits, every task completes at most once, and what
//! [`InitiatorSession::take_outstanding`] hands back plus the completions account for every
//! task submitted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_proto::chap::{ChapAlgorithm, Credentials};
use iscsi_proto::initiator::{
    ChapConfig, Event, InitiatorLogin, InitiatorSession, LoginConfig, LoginError, LoginResult,
    LoginStep, OutPdu, ScsiRequest, SessionConfig, SubmitError, TaskAttr, TaskId,
};
use iscsi_proto::keys::{self, Digest, NegotiationConfig, SessionType};
use iscsi_proto::serial::Sn;
use iscsi_proto::target::{self, TargetConnection};
use iscsi_wire::pdu::ahs;
use iscsi_wire::*;

use crate::{
    check_session_params, portal, seeds, CHAP_R_AUTO, CHAP_SECRET, CHAP_TARGET_SECRET,
    CHAP_TARGET_USER, CHAP_USER,
};

/// The ISID of every fuzzed initiator (the target harness uses the same).
pub const ISID: Isid = Isid(0x0002_3d00_0001);
/// CmdSN of fuzzed logins (and so of the first command after them).
pub const LOGIN_CMD_SN: u32 = 1;

// -------------------------------------------------------------------------------------------
// initiator_login
// -------------------------------------------------------------------------------------------

/// What an [`initiator_login`] input selects with its first byte.
///
/// Bits 0-1: authentication (0 none, 1 CHAP, 2 mutual CHAP, 3 CHAP with MD5 only); bit 2:
/// discovery session; bit 3: TSIH 1 (a connection of an existing session); bit 4: other
/// operational offers (CRC32C digests, InitialR2T=No, small segments); bit 5: ask for the
/// target whose access list excludes us.
pub fn login_config(flags: u8) -> LoginConfig {
    let chap = match flags & 3 {
        0 => None,
        n => Some(ChapConfig {
            credentials: Credentials::new(CHAP_USER, CHAP_SECRET),
            target: (n == 2).then(|| Credentials::new(CHAP_TARGET_USER, CHAP_TARGET_SECRET)),
            algorithms: if n == 3 {
                vec![ChapAlgorithm::MD5]
            } else {
                Vec::new()
            },
        }),
    };
    let discovery = flags & 0x04 != 0;
    let mut negotiation = if flags & 0x10 != 0 {
        NegotiationConfig {
            header_digest: vec![Digest::Crc32c, Digest::None],
            data_digest: vec![Digest::Crc32c],
            max_recv_data_segment_length: 4096,
            max_burst_length: 16384,
            first_burst_length: 8192,
            initial_r2t: false,
            immediate_data: false,
            max_outstanding_r2t: 4,
            default_time2wait: 0,
            default_time2retain: 0,
            ..NegotiationConfig::default()
        }
    } else {
        NegotiationConfig::default()
    };
    if !discovery {
        let name = if flags & 0x20 != 0 {
            seeds::RESTRICTED_TARGET_NAME
        } else {
            seeds::TARGET_NAME
        };
        negotiation.target_name = Some(name.into());
    }
    LoginConfig {
        initiator_name: seeds::INITIATOR_NAME.into(),
        initiator_alias: Some("fuzz".into()),
        isid: ISID,
        tsih: if flags & 0x08 != 0 { 1 } else { 0 },
        cid: 0,
        session_type: if discovery {
            SessionType::Discovery
        } else {
            SessionType::Normal
        },
        chap,
        negotiation,
        cmd_sn: LOGIN_CMD_SN,
        exp_stat_sn: 0,
    }
}

/// How a fuzzed login ended.
#[derive(Debug)]
pub enum LoginOutcome {
    /// The input ended while the login went on.
    Unfinished,
    Done(Box<LoginResult>),
    Failed(LoginError),
}

/// Checks the Login Requests of one login and helps the fuzzer through mutual CHAP.
struct LoginWatch {
    config: LoginConfig,
    itt: Option<u32>,
    /// Text of our requests sent in parts (C=1), awaiting the last part.
    partial: Vec<u8>,
    /// The mutual challenge (CHAP_I, CHAP_C) of our last request that carried one.
    our_challenge: Option<(u8, Vec<u8>)>,
    /// The CHAP algorithm the target chose (its last CHAP_A).
    target_alg: Option<ChapAlgorithm>,
    /// The target itself sent a secret's bytes (we may echo them as an unknown key).
    echoes: bool,
    /// The ExpStatSN our next request must carry: the last response's StatSN + 1.
    exp_stat_sn: u32,
}

/// True if `needle` occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn find<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

impl LoginWatch {
    fn request(&mut self, out: &OutPdu) {
        let header = Header::parse(&out.bhs).expect("login sends a known opcode");
        let Header::LoginRequest(r) = header else {
            panic!("login sent {header:?}");
        };
        assert!(out.ahs.is_empty(), "Login Request with an AHS");
        assert!(out.data.len() <= 8192, "Login Request over 8192 bytes");
        assert_eq!(r.isid, self.config.isid);
        assert_eq!(r.tsih, self.config.tsih);
        assert_eq!(r.cid, self.config.cid);
        assert_eq!(r.cmd_sn, self.config.cmd_sn, "Login Requests are immediate");
        assert_eq!((r.version_max, r.version_min), (0, 0));
        assert_eq!(
            r.exp_stat_sn, self.exp_stat_sn,
            "ExpStatSN of a Login Request"
        );
        assert_eq!(*self.itt.get_or_insert(r.itt), r.itt, "one ITT per login");
        assert!(!(r.transit && r.continue_), "T and C both set");
        assert!(r.csg <= 1, "CSG {} in a Login Request", r.csg);
        if r.transit {
            assert!(
                r.nsg > r.csg && (r.nsg == 1 || r.nsg == 3),
                "bad NSG {}",
                r.nsg
            );
        } else {
            assert_eq!(r.nsg, 0, "NSG is reserved when T=0");
        }
        for secret in [CHAP_SECRET, CHAP_TARGET_SECRET] {
            // Unless the target sent it first (an unknown key we answer NotUnderstood).
            assert!(
                self.echoes || !contains(&out.data, secret),
                "a CHAP secret on the wire"
            );
        }
        self.partial.extend_from_slice(&out.data);
        if r.continue_ {
            return;
        }
        let text = std::mem::take(&mut self.partial);
        let pairs = keys::parse_text_multi(&text).expect("our login text parses");
        if r.csg == 1 {
            // (An unknown key of the target's, such as `CHAP_X`, may be answered here.)
            assert!(
                pairs
                    .iter()
                    .all(|(k, _)| keys::lookup(k).is_none_or(|d| d.kind != keys::KeyKind::Auth)),
                "authentication keys in the operational stage: {pairs:?}"
            );
        }
        let id = find(&pairs, "CHAP_I")
            .and_then(keys::parse_numeric)
            .and_then(|n| u8::try_from(n).ok());
        let challenge = find(&pairs, "CHAP_C").and_then(keys::parse_binary);
        if let (Some(id), Some(c)) = (id, challenge) {
            self.our_challenge = Some((id, c));
        }
    }

    /// Notes the target's CHAP_A and replaces `CHAP_R=auto` with the right answer to our
    /// mutual challenge, so that the fuzzer gets past mutual CHAP.
    fn response(&mut self, mut pdu: RawPdu) -> RawPdu {
        self.echoes |= [CHAP_SECRET, CHAP_TARGET_SECRET]
            .iter()
            .any(|s| contains(&pdu.data, s));
        if pdu.bhs.opcode() != Opcode::LOGIN_RESPONSE {
            return pdu;
        }
        self.exp_stat_sn = LoginResponse::parse(&pdu.bhs).stat_sn.wrapping_add(1);
        let Ok(mut pairs) = keys::parse_text_multi(&pdu.data) else {
            return pdu;
        };
        if let Some(a) = find(&pairs, "CHAP_A")
            .and_then(keys::parse_numeric)
            .and_then(|n| u8::try_from(n).ok())
        {
            self.target_alg = Some(ChapAlgorithm(a));
        }
        let (Some(alg), Some((id, challenge))) = (self.target_alg, &self.our_challenge) else {
            return pdu;
        };
        let Some(slot) = pairs
            .iter_mut()
            .find(|(k, v)| k == "CHAP_R" && v == CHAP_R_AUTO)
        else {
            return pdu;
        };
        let Some(digest) = alg.digest(*id, CHAP_TARGET_SECRET, challenge) else {
            return pdu;
        };
        slot.1 = keys::encode_hex(&digest);
        pdu.data = Bytes::from(keys::encode_text(&pairs));
        pdu.bhs.set_data_segment_len(pdu.data.len() as u32);
        pdu
    }

    fn result(&self, r: &LoginResult) {
        check_session_params(&r.params, &self.config.negotiation);
        match self.config.tsih {
            0 => assert_ne!(r.tsih, 0, "a new session without a TSIH"),
            t => assert_eq!(r.tsih, t, "an existing session changed its TSIH"),
        }
        assert_eq!((r.isid, r.cid), (self.config.isid, self.config.cid));
        assert_eq!(r.cmd_sn, self.config.cmd_sn);
        assert_eq!(r.params.session_type, self.config.session_type);
        let mutual = self
            .config
            .chap
            .as_ref()
            .is_some_and(|c| c.target.is_some());
        if mutual {
            assert_eq!(
                r.authenticated_target.as_deref(),
                Some(CHAP_TARGET_USER),
                "mutual CHAP configured, login done without the target's proof"
            );
        } else {
            assert!(r.authenticated_target.is_none());
        }
        assert!(!r.weak_secret, "the fuzz secrets are long enough");
    }

    fn error(&self, e: &LoginError) {
        let text = e.to_string();
        for secret in [CHAP_SECRET, CHAP_TARGET_SECRET] {
            assert!(!contains(text.as_bytes(), secret), "secret in an error");
        }
        if let LoginError::Redirected { address, .. } = e {
            assert!(!address.is_empty() && !address.contains(','), "{address:?}");
        }
    }
}

/// An [`InitiatorLogin`] (configured by the first byte, see [`login_config`]) fed the rest
/// as the target's byte stream. `CHAP_R=auto` in a Login Response becomes the right answer to
/// our mutual challenge.
pub fn initiator_login(data: &[u8]) {
    let _ = run_login(data);
}

/// [`initiator_login`], telling how the login ended (for tests of the seeds).
pub fn run_login(data: &[u8]) -> LoginOutcome {
    let Some((&flags, stream)) = data.split_first() else {
        return LoginOutcome::Unfinished;
    };
    let config = login_config(flags);
    let mut login = InitiatorLogin::new(config.clone());
    let mut watch = LoginWatch {
        exp_stat_sn: config.exp_stat_sn,
        config,
        itt: None,
        partial: Vec::new(),
        our_challenge: None,
        target_alg: None,
        echoes: false,
    };
    let first = login.start();
    let again = login.start();
    assert_eq!((first.bhs, &first.data), (again.bhs, &again.data));
    watch.request(&first);
    let now = Instant::now();
    let mut dec = FrameDecoder::new(FrameLimits::default());
    let mut buf = BytesMut::from(stream);
    let mut outcome = LoginOutcome::Unfinished;
    loop {
        let item = match dec.decode(&mut buf) {
            Ok(Some(item)) => item,
            // Framing lost: the driver closes the connection.
            Ok(None) | Err(_) => break,
        };
        let item = item.map(|pdu| watch.response(pdu));
        let step = login.handle_pdu(item, now);
        if !matches!(outcome, LoginOutcome::Unfinished) {
            assert!(step.is_err(), "a PDU accepted after the login ended");
            assert!(login.is_finished());
            break;
        }
        match step {
            Ok(LoginStep::Send(out)) => {
                assert!(!login.is_finished());
                watch.request(&out);
            }
            Ok(LoginStep::Done(result)) => {
                assert!(login.is_finished());
                assert!(login.is_authenticated(), "logged in, yet not authenticated");
                assert_eq!(login.stage(), Stage::FullFeaturePhase);
                watch.result(&result);
                outcome = LoginOutcome::Done(result);
            }
            Err(e) => {
                assert!(login.is_finished());
                watch.error(&e);
                outcome = LoginOutcome::Failed(e);
            }
        }
    }
    outcome
}

// -------------------------------------------------------------------------------------------
// initiator_session: the canned logins
// -------------------------------------------------------------------------------------------

/// The operational offers of the four canned session logins: 0 defaults, 1 InitialR2T=No and
/// ImmediateData=No (unsolicited Data-Out), 2 small segments and bursts (Data-In and R2Ts
/// split), 3 CRC32C digests.
fn session_negotiation(variant: u8) -> NegotiationConfig {
    let mut n = NegotiationConfig::default();
    match variant & 3 {
        0 => {}
        1 => {
            n.initial_r2t = false;
            n.immediate_data = false;
            n.first_burst_length = 1024;
            n.max_outstanding_r2t = 4;
        }
        2 => {
            n.max_recv_data_segment_length = 512;
            n.max_burst_length = 1024;
            n.first_burst_length = 512;
            n.immediate_data = false;
            n.max_outstanding_r2t = 2;
        }
        _ => {
            n.header_digest = vec![Digest::Crc32c];
            n.data_digest = vec![Digest::Crc32c];
            n.max_recv_data_segment_length = 1024;
        }
    }
    n
}

/// Frames `out` with `limits` and decodes it again, as the network would deliver it.
pub(crate) fn reframe(out: &OutPdu, limits: FrameLimits) -> Result<RawPdu, PduError> {
    let mut wire = Vec::new();
    encode_pdu(&out.bhs, &out.ahs, &out.data, limits, &mut wire);
    let mut buf = BytesMut::from(&wire[..]);
    let item = FrameDecoder::new(FrameLimits {
        max_recv_data_segment_len: 1 << 24,
        ..limits
    })
    .decode(&mut buf)
    .expect("our own PDU frames")
    .expect("our own PDU is complete");
    assert!(buf.is_empty());
    item
}

/// Logs an initiator into the fuzz target's plain portal with the offers of `variant`, over
/// the real target core. Deterministic: the same result every time.
pub fn canned_session_login(variant: u8) -> (TargetConnection, LoginResult) {
    let now = Instant::now();
    let mut config = login_config(0);
    config.negotiation = NegotiationConfig {
        target_name: Some(seeds::TARGET_NAME.into()),
        ..session_negotiation(variant)
    };
    let mut login = InitiatorLogin::new(config);
    let mut target = TargetConnection::new(portal(false));
    let mut next = login.start();
    for _ in 0..16 {
        target.handle_pdu(reframe(&next, FrameLimits::default()), now);
        while let Some(event) = target.poll_event() {
            if let target::Event::SessionRequested(_) = event {
                target.accept_session(1);
            }
        }
        let resp = target.poll_transmit().expect("a Login Response");
        match login.handle_pdu(reframe(&resp, FrameLimits::default()), now) {
            Ok(LoginStep::Send(out)) => next = out,
            Ok(LoginStep::Done(result)) => {
                assert!(target.is_full_feature());
                return (target, *result);
            }
            Err(e) => panic!("canned login {variant} failed: {e}"),
        }
    }
    panic!("canned login {variant} did not end");
}

fn canned_result(variant: u8) -> &'static LoginResult {
    static RESULTS: OnceLock<Vec<LoginResult>> = OnceLock::new();
    &RESULTS.get_or_init(|| (0..4).map(|v| canned_session_login(v).1).collect())
        [usize::from(variant & 3)]
}

// -------------------------------------------------------------------------------------------
// initiator_session: requests
// -------------------------------------------------------------------------------------------

pub const BLOCK: u32 = 512;

/// A READ(10) or WRITE(10) CDB; byte 6 (the group number) tells the fake executor of the
/// seed generator how to answer: 0 in full, 1 short (underflow), 2 CHECK CONDITION, 3 long.
pub fn rw10(write: bool, lba: u32, blocks: u16, behaviour: u8) -> Vec<u8> {
    let mut c = vec![if write { 0x2a } else { 0x28 }, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(behaviour & 3);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

/// CDB lengths a request record can pick: common ones, extended ones, the longest and one
/// too long.
const CDB_LENS: [usize; 8] = [10, 16, 32, 6, 17, 260, 261, 0];

/// The request a submit record describes: `[direction] [blocks] [CDB length] [task] [LUN]
/// [attribute] [behaviour]`, missing bytes 0. Direction 0 read, 1 write, 2 both, 3 none.
pub fn request_from(p: &[u8], seed: u8) -> ScsiRequest {
    let b = |i: usize| p.get(i).copied().unwrap_or(0);
    let blocks = 1 + u32::from(b(1) % 16);
    let len = blocks * BLOCK;
    let dir = b(0) % 4;
    let cdb_len = CDB_LENS[usize::from(b(2) % 8)];
    let mut cdb = vec![0u8; cdb_len];
    if cdb_len >= 10 {
        cdb[..10].copy_from_slice(&rw10(dir == 1, 0, blocks as u16, b(6)));
    } else if cdb_len >= 7 {
        cdb[6] = b(6) & 3;
    }
    for (i, byte) in cdb.iter_mut().enumerate().skip(16) {
        *byte = i as u8;
    }
    ScsiRequest {
        lun: u64::from(b(4) % 2) << 48,
        cdb: Bytes::from(cdb),
        data_out: if dir == 1 || dir == 2 {
            pattern(len as usize, seed)
        } else {
            Bytes::new()
        },
        read_len: if dir == 0 || dir == 2 { len } else { 0 },
        attr: [
            TaskAttr::Simple,
            TaskAttr::Ordered,
            TaskAttr::HeadOfQueue,
            TaskAttr::Untagged,
            TaskAttr::Aca,
        ][usize::from(b(5) % 5)],
    }
}

/// The commands submitted before the first record (bits 2-3 of the flags): none; a read; a
/// read and a write; a read, a write, a read with a 32-byte CDB and a longer write.
fn initial_requests(sel: u8) -> Vec<ScsiRequest> {
    let read = |lba, blocks| ScsiRequest {
        lun: 0,
        cdb: Bytes::from(rw10(false, lba, blocks, 0)),
        data_out: Bytes::new(),
        read_len: u32::from(blocks) * BLOCK,
        attr: TaskAttr::Simple,
    };
    let write = |lba, blocks: u16| ScsiRequest {
        lun: 0,
        cdb: Bytes::from(rw10(true, lba, blocks, 0)),
        data_out: pattern(usize::from(blocks) * BLOCK as usize, lba as u8),
        read_len: 0,
        attr: TaskAttr::Simple,
    };
    match sel & 3 {
        0 => Vec::new(),
        1 => vec![read(0, 1)],
        2 => vec![read(0, 2), write(8, 2)],
        _ => {
            let mut long = read(4, 1);
            let mut cdb = rw10(false, 4, 1, 0);
            cdb.resize(32, 0x5a);
            long.cdb = Bytes::from(cdb);
            vec![read(0, 1), write(8, 2), long, write(16, 4)]
        }
    }
}

// -------------------------------------------------------------------------------------------
// initiator_session: the driver
// -------------------------------------------------------------------------------------------

/// Record kinds of an [`initiator_session`] input (kind byte mod 8).
pub mod record {
    /// Bytes from the target (a PDU may span records).
    pub const TARGET_BYTES: u8 = 0;
    /// The clock moves by `payload[0]` × 50 ms; then `handle_timeout`.
    pub const CLOCK: u8 = 1;
    /// Submit a SCSI command, see [`super::request_from`].
    pub const SUBMIT: u8 = 2;
    /// The connection is lost: take the outstanding tasks, log in again (same canned login)
    /// and re-submit them, as the driver's recovery does.
    pub const RECONNECT: u8 = 3;
    /// Task management: `[function - 1] [referenced task] [LUN]`.
    pub const TMF: u8 = 4;
    /// Text Request `SendTargets=All`.
    pub const TEXT: u8 = 5;
    /// Logout: `[reason]`.
    pub const LOGOUT: u8 = 6;
    /// The framer's complaint about a PDU whose header is the payload.
    pub const FRAMING: u8 = 7;
}

/// Most records one input may hold (bounds the time per input).
const MAX_RECORDS: usize = 256;

/// What a fuzzed session did (for tests of the seeds).
#[derive(Clone, Debug, Default)]
pub struct SessionSummary {
    pub completed: usize,
    pub good: usize,
    pub failures: usize,
    /// The reason of the last connection failure.
    pub failure: Option<String>,
    pub tmf_done: usize,
    pub text_done: usize,
    pub logged_out: usize,
    pub notices: usize,
    pub sessions: usize,
    /// Tasks handed back by `take_outstanding` at the end.
    pub left: usize,
    /// The keepalive failed the connection after the input ended (not in `failures`).
    pub timed_out_at_end: bool,
}

/// A sequence of Data-Out PDUs the session owes.
#[derive(Clone, Copy, Debug)]
struct Burst {
    itt: u32,
    ttt: u32,
    next_offset: u32,
    next_data_sn: u32,
    end: u32,
    started: bool,
}

impl Burst {
    /// Checks one Data-Out of this sequence: in order, DataSN from 0, F on the last.
    fn take(&mut self, d: &DataOut, len: u32) {
        assert_eq!(
            (d.itt, d.ttt),
            (self.itt, self.ttt),
            "Data-Out of another sequence"
        );
        assert_eq!(d.buffer_offset, self.next_offset, "Data-Out out of order");
        assert_eq!(d.data_sn, self.next_data_sn, "DataSN");
        self.next_offset += len;
        self.next_data_sn += 1;
        self.started = true;
        assert!(self.next_offset <= self.end, "Data-Out beyond its sequence");
        assert_eq!(d.final_, self.next_offset == self.end, "F bit of Data-Out");
    }

    fn done(&self) -> bool {
        self.next_offset == self.end
    }
}

/// Plays the initiator driver around one [`InitiatorSession`] (and its successors after
/// reconnects), checking everything that goes out and every event.
pub(crate) struct SessionDrive {
    variant: u8,
    config: SessionConfig,
    pub(crate) s: InitiatorSession,
    rx: FrameDecoder,
    buf: BytesMut,
    /// Our sending side's framing (digests as negotiated).
    pub(crate) tx: FrameLimits,
    framing_lost: bool,
    pub(crate) now: Instant,
    next_task: u64,
    next_seq: u64,
    /// The latest request accepted under each TaskId.
    requests: HashMap<TaskId, ScsiRequest>,
    /// SCSI tasks not completed: TaskId → submission number.
    live_scsi: HashMap<TaskId, u64>,
    /// Task management, text and logout requests not answered.
    live_other: HashSet<TaskId>,
    /// SCSI tasks of the current session not sent yet, in submission order.
    unsent: VecDeque<TaskId>,
    /// ITT → (task, submission number) of the commands the current session sent.
    itts: HashMap<u32, (TaskId, u64)>,
    logging_out: bool,
    failed: bool,
    /// The CmdSN the next non-immediate request must carry (immediate ones carry it too).
    next_cmd_sn: u32,
    /// The ExpStatSN of the last PDU sent.
    last_exp_stat_sn: u32,
    /// Unsolicited Data-Out still due after the command just sent.
    unsolicited: Option<Burst>,
    /// The Data-Out the R2T just received solicits, if the session accepts it.
    solicited: Option<Burst>,
    /// Data-In as received per task, gathered as the session should: bytes at their
    /// offsets, zeros in gaps. A completion carries exactly this.
    data_in: HashMap<TaskId, Vec<u8>>,
    /// With `Some`, what the session sends is kept (the seed generator hands it to a target).
    pub(crate) capture: Option<Vec<OutPdu>>,
    pub(crate) summary: SessionSummary,
}

impl SessionDrive {
    /// Bits 0-1 of `flags`: canned login; bits 2-3: initial commands; bit 4: keepalive off.
    pub(crate) fn new(flags: u8, capture: bool) -> Self {
        let variant = flags & 3;
        let login = canned_result(variant);
        let config = SessionConfig {
            nop_interval: (flags & 0x10 == 0).then_some(Duration::from_secs(5)),
            nop_timeout: Duration::from_secs(5),
        };
        let now = Instant::now();
        let p = &login.params;
        let mut d = SessionDrive {
            variant,
            s: InitiatorSession::new(login, config.clone(), now),
            config,
            rx: FrameDecoder::new(FrameLimits {
                header_digest: p.header_digest,
                data_digest: p.data_digest,
                max_recv_data_segment_len: p.max_recv_data_segment_length,
            }),
            buf: BytesMut::new(),
            tx: FrameLimits {
                header_digest: p.header_digest,
                data_digest: p.data_digest,
                max_recv_data_segment_len: p.max_xmit_data_segment_length,
            },
            framing_lost: false,
            now,
            next_task: 0,
            next_seq: 0,
            requests: HashMap::new(),
            live_scsi: HashMap::new(),
            live_other: HashSet::new(),
            unsent: VecDeque::new(),
            itts: HashMap::new(),
            logging_out: false,
            failed: false,
            next_cmd_sn: login.cmd_sn,
            last_exp_stat_sn: login.exp_stat_sn,
            unsolicited: None,
            solicited: None,
            data_in: HashMap::new(),
            capture: capture.then(Vec::new),
            summary: SessionSummary {
                sessions: 1,
                ..SessionSummary::default()
            },
        };
        for req in initial_requests(flags >> 2) {
            d.next_task += 1;
            let id = TaskId(d.next_task);
            d.submit(id, req);
        }
        d
    }

    fn login(&self) -> &'static LoginResult {
        canned_result(self.variant)
    }

    /// One record.
    pub(crate) fn apply(&mut self, kind: u8, payload: &[u8]) {
        let b = |i: usize| payload.get(i).copied().unwrap_or(0);
        match kind % 8 {
            record::TARGET_BYTES => self.target_bytes(payload),
            record::CLOCK => {
                self.now += Duration::from_millis(u64::from(b(0)) * 50);
                let before = self.s.is_finished();
                self.s.handle_timeout(self.now);
                self.after(before);
            }
            record::SUBMIT => {
                let id = if b(3) & 0x80 != 0 {
                    // An id that may be in use.
                    TaskId(u64::from(b(3) % 8))
                } else {
                    self.fresh_id()
                };
                self.submit(id, request_from(payload, id.0 as u8));
            }
            record::RECONNECT => self.reconnect(),
            record::TMF => {
                let function = TmfFunction(1 + b(0) % 8);
                let referenced = TaskId(u64::from(b(1)) % (self.next_task + 2));
                let id = self.fresh_id();
                let expected = self.usable().and_then(|()| {
                    let known = self.live_scsi.contains_key(&referenced);
                    if function == TmfFunction::ABORT_TASK && !known {
                        Err(SubmitError::UnknownTask)
                    } else {
                        Ok(())
                    }
                });
                let before = self.s.is_finished();
                let lun = u64::from(b(2) % 2) << 48;
                let got = self.s.task_management(id, function, lun, Some(referenced));
                assert_eq!(got, expected, "task_management({function:?})");
                if got.is_ok() {
                    self.live_other.insert(id);
                }
                self.after(before);
            }
            record::TEXT => {
                let id = self.fresh_id();
                let expected = self.usable();
                let before = self.s.is_finished();
                let got = self
                    .s
                    .text_request(id, &[("SendTargets".into(), "All".into())]);
                assert_eq!(got, expected, "text_request");
                if got.is_ok() {
                    self.live_other.insert(id);
                }
                self.after(before);
            }
            record::LOGOUT => {
                let id = self.fresh_id();
                let expected = self.usable();
                let before = self.s.is_finished();
                let got = self.s.logout(id, LogoutReason(b(0) % 3));
                assert_eq!(got, expected, "logout");
                if got.is_ok() {
                    self.live_other.insert(id);
                    self.logging_out = true;
                }
                self.after(before);
            }
            _ => {
                let mut bhs = Bhs::default();
                let n = payload.len().min(BHS_LEN);
                bhs.0[..n].copy_from_slice(&payload[..n]);
                let e = if payload.len() % 2 == 0 {
                    PduError::DataDigest { bhs }
                } else {
                    PduError::DataSegmentTooLong {
                        bhs,
                        len: bhs.data_segment_len(),
                        max: self.rx.limits().max_recv_data_segment_len,
                    }
                };
                let before = self.s.is_finished();
                self.s.handle_pdu(Err(e), self.now);
                self.after(before);
            }
        }
    }

    /// A TaskId no request holds (records may also pick small ids that are in use).
    fn fresh_id(&mut self) -> TaskId {
        loop {
            self.next_task += 1;
            let id = TaskId(self.next_task);
            if !self.live_scsi.contains_key(&id) && !self.live_other.contains(&id) {
                return id;
            }
        }
    }

    /// What a new request of any kind must get from `check_new`.
    fn usable(&self) -> Result<(), SubmitError> {
        if self.s.is_finished() || self.logging_out {
            Err(SubmitError::NotUsable)
        } else {
            Ok(())
        }
    }

    fn submit(&mut self, id: TaskId, req: ScsiRequest) {
        let duplicate = self.live_scsi.contains_key(&id) || self.live_other.contains(&id);
        let expected = self.usable().and_then(|()| {
            if duplicate {
                Err(SubmitError::DuplicateTask)
            } else if req.cdb.len() > 260 {
                Err(SubmitError::CdbTooLong)
            } else {
                Ok(())
            }
        });
        let before = self.s.is_finished();
        let got = self.s.submit(id, req.clone());
        assert_eq!(got, expected, "submit of {} CDB bytes", req.cdb.len());
        if got.is_ok() {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.live_scsi.insert(id, seq);
            self.requests.insert(id, req);
            self.unsent.push_back(id);
        }
        self.after(before);
    }

    fn target_bytes(&mut self, payload: &[u8]) {
        if self.framing_lost {
            return;
        }
        self.buf.extend_from_slice(payload);
        loop {
            match self.rx.decode(&mut self.buf) {
                Ok(Some(item)) => {
                    if let Ok(pdu) = &item {
                        self.peek(pdu);
                    }
                    let before = self.s.is_finished();
                    self.s.handle_pdu(item, self.now);
                    self.after(before);
                }
                Ok(None) => return,
                // The driver drops the connection; a reconnect record or the end follows.
                Err(_) => {
                    self.framing_lost = true;
                    return;
                }
            }
        }
    }

    /// Notes what a target PDU should make the session do: the Data-Out an R2T solicits,
    /// where Data-In goes.
    fn peek(&mut self, pdu: &RawPdu) {
        let Some(&(task, seq)) = self.itts.get(&pdu.bhs.itt()) else {
            return;
        };
        if self.live_scsi.get(&task) != Some(&seq) {
            return;
        }
        match Header::parse(&pdu.bhs) {
            Ok(Header::R2t(r)) => {
                self.solicited = Some(Burst {
                    itt: r.itt,
                    ttt: r.ttt,
                    next_offset: r.buffer_offset,
                    next_data_sn: 0,
                    end: r
                        .buffer_offset
                        .saturating_add(r.desired_data_transfer_length),
                    started: false,
                });
            }
            Ok(Header::DataIn(d)) if !pdu.data.is_empty() => {
                let buf = self.data_in.entry(task).or_default();
                let start = d.buffer_offset as usize;
                if start > (1 << 20) {
                    // Beyond any read of ours: the session must refuse it.
                    return;
                }
                if buf.len() < start {
                    buf.resize(start, 0);
                }
                let overlap = (buf.len() - start).min(pdu.data.len());
                buf[start..start + overlap].copy_from_slice(&pdu.data[..overlap]);
                buf.extend_from_slice(&pdu.data[overlap..]);
            }
            _ => {}
        }
    }

    /// After each call into the session: check what it sends, then its events.
    fn after(&mut self, finished_before: bool) {
        while let Some(out) = self.s.poll_transmit() {
            assert!(!finished_before, "a PDU sent after the session finished");
            self.check_out(&out);
            if let Some(c) = &mut self.capture {
                c.push(out);
            }
        }
        assert!(
            self.unsolicited.is_none_or(|b| b.done()),
            "unsolicited Data-Out missing: {:?}",
            self.unsolicited
        );
        self.unsolicited = None;
        if let Some(b) = self.solicited.take() {
            assert!(!b.started || b.done(), "an R2T answered in part: {b:?}");
        }
        while let Some(event) = self.s.poll_event() {
            self.check_event(event);
        }
    }

    fn check_out(&mut self, out: &OutPdu) {
        let header = Header::parse(&out.bhs).expect("the initiator sends known opcodes");
        assert!(
            out.bhs.opcode().is_initiator_opcode(),
            "initiator sent a target opcode: {header:?}"
        );
        let p = &self.login().params;
        let seg = p.max_xmit_data_segment_length.clamp(512, 0xff_ffff);
        assert!(
            out.data.len() <= seg as usize,
            "{} data bytes exceed the target's MaxRecvDataSegmentLength {seg}",
            out.data.len()
        );
        assert_eq!(out.ahs.len() % 4, 0, "unpadded AHS");
        if !out.ahs.is_empty() {
            assert!(
                matches!(header, Header::ScsiCommand(_)),
                "AHS on {header:?}"
            );
            ahs::parse(&out.ahs).expect("our AHS parses");
        }
        let back = reframe(out, self.tx).expect("our PDU frames");
        assert_eq!((&back.ahs, &back.data), (&out.ahs, &out.data));
        // CmdSN: consecutive for non-immediate requests; immediate ones carry the next.
        let cmd_sn = match &header {
            Header::ScsiCommand(c) => Some((c.cmd_sn, c.immediate)),
            Header::TextRequest(t) => Some((t.cmd_sn, t.immediate)),
            Header::TaskMgmtRequest(t) => Some((t.cmd_sn, t.immediate)),
            Header::NopOut(n) => Some((n.cmd_sn, n.immediate)),
            Header::LogoutRequest(l) => Some((l.cmd_sn, l.immediate)),
            _ => None,
        };
        if let Some((sn, immediate)) = cmd_sn {
            assert_eq!(sn, self.next_cmd_sn, "CmdSN of {header:?}");
            if !immediate {
                self.next_cmd_sn = self.next_cmd_sn.wrapping_add(1);
            }
        }
        let exp_stat_sn = match &header {
            Header::ScsiCommand(c) => c.exp_stat_sn,
            Header::DataOut(d) => d.exp_stat_sn,
            Header::TextRequest(t) => t.exp_stat_sn,
            Header::TaskMgmtRequest(t) => t.exp_stat_sn,
            Header::NopOut(n) => n.exp_stat_sn,
            Header::LogoutRequest(l) => l.exp_stat_sn,
            _ => self.last_exp_stat_sn,
        };
        // Everything goes out right after the call that queued it: it acknowledges all
        // status received so far.
        assert_eq!(
            exp_stat_sn,
            self.s.exp_stat_sn(),
            "ExpStatSN of {header:?} (the last sent was {})",
            self.last_exp_stat_sn
        );
        self.last_exp_stat_sn = exp_stat_sn;
        match header {
            Header::ScsiCommand(c) => self.check_command(&c, out),
            Header::DataOut(d) => {
                let (id, seq) = *self
                    .itts
                    .get(&d.itt)
                    .expect("Data-Out for a command never sent");
                assert_eq!(
                    self.live_scsi.get(&id),
                    Some(&seq),
                    "Data-Out for a finished task"
                );
                let req = &self.requests[&id];
                let start = d.buffer_offset as usize;
                let end = start + out.data.len();
                assert!(!out.data.is_empty(), "empty Data-Out");
                assert!(end <= req.data_out.len(), "Data-Out beyond the write data");
                assert_eq!(out.data, req.data_out.slice(start..end), "Data-Out content");
                let len = out.data.len() as u32;
                if d.ttt == RESERVED_TAG {
                    assert!(!p.initial_r2t, "unsolicited Data-Out with InitialR2T=Yes");
                    assert!(
                        end as u32 <= p.first_burst_length,
                        "beyond FirstBurstLength"
                    );
                    self.unsolicited
                        .as_mut()
                        .expect("unsolicited Data-Out not announced by F=0")
                        .take(&d, len);
                } else {
                    self.solicited
                        .as_mut()
                        .expect("Data-Out no R2T asked for")
                        .take(&d, len);
                }
            }
            Header::NopOut(n) => {
                assert!(n.immediate, "NOP-Out without I");
                assert!(
                    (n.itt == RESERVED_TAG) != (n.ttt == RESERVED_TAG),
                    "NOP-Out is neither a ping nor an answer: {n:?}"
                );
            }
            Header::TextRequest(_) | Header::TaskMgmtRequest(_) | Header::LogoutRequest(_) => {}
            other => panic!("the initiator sent {other:?}"),
        }
    }

    fn check_command(&mut self, c: &ScsiCommand, out: &OutPdu) {
        assert_ne!(c.itt, RESERVED_TAG);
        assert!(
            Sn(c.cmd_sn).le(Sn(self.s.max_cmd_sn())),
            "command with CmdSN {} beyond MaxCmdSN {}",
            c.cmd_sn,
            self.s.max_cmd_sn()
        );
        // Commands go out in submission order.
        let id = loop {
            let id = self.unsent.pop_front().expect("a command nobody submitted");
            if self.live_scsi.contains_key(&id) {
                break id;
            }
        };
        let seq = self.live_scsi[&id];
        if let Some((prev, prev_seq)) = self.itts.get(&c.itt) {
            assert_ne!(
                self.live_scsi.get(prev),
                Some(prev_seq),
                "ITT 0x{:08x} of a task in progress reused",
                c.itt
            );
        }
        self.itts.insert(c.itt, (id, seq));
        let req = &self.requests[&id];
        let mut want = req.cdb.to_vec();
        want.resize(want.len().max(16), 0);
        assert_eq!(
            ahs::full_cdb(&c.cdb, &out.ahs).expect("AHS parses"),
            want,
            "CDB"
        );
        let write_len = req.data_out.len() as u32;
        assert_eq!((c.read, c.write), (req.read_len > 0, write_len > 0));
        let edtl = if write_len > 0 {
            write_len
        } else {
            req.read_len
        };
        assert_eq!(c.expected_data_transfer_length, edtl);
        let bidi: Vec<u32> = ahs::parse(&out.ahs)
            .expect("AHS parses")
            .iter()
            .filter(|a| a.ahs_type == ahs::BIDI_READ_DATA_LENGTH)
            .map(|a| {
                assert_eq!(a.specific.len(), 5);
                u32::from_be_bytes(a.specific[1..5].try_into().expect("4 bytes"))
            })
            .collect();
        if c.read && c.write {
            assert_eq!(bidi, [req.read_len], "Bidirectional Read Data Length AHS");
        } else {
            assert!(bidi.is_empty());
        }
        let p = &self.login().params;
        let immediate = out.data.len() as u32;
        if immediate > 0 {
            assert!(p.immediate_data, "immediate data with ImmediateData=No");
            assert!(immediate <= p.first_burst_length);
            assert_eq!(out.data, req.data_out.slice(..out.data.len()));
        }
        let unsolicited_end = if write_len == 0 || p.initial_r2t {
            immediate
        } else {
            p.first_burst_length.min(write_len).max(immediate)
        };
        assert_eq!(
            c.final_,
            unsolicited_end == immediate,
            "F=0 exactly when unsolicited Data-Out follows"
        );
        assert!(self.unsolicited.is_none_or(|b| b.done()));
        self.unsolicited = (!c.final_).then_some(Burst {
            itt: c.itt,
            ttt: RESERVED_TAG,
            next_offset: immediate,
            next_data_sn: 0,
            end: unsolicited_end,
            started: false,
        });
    }

    fn check_event(&mut self, event: Event) {
        match event {
            Event::Completed(c) => {
                assert!(
                    self.live_scsi.remove(&c.task).is_some(),
                    "completion of {:?}, which is not outstanding (twice?)",
                    c.task
                );
                self.unsent.retain(|t| *t != c.task);
                let req = &self.requests[&c.task];
                assert!(
                    c.data.len() <= req.read_len as usize,
                    "more Data-In than read_len"
                );
                let gathered = self.data_in.remove(&c.task).unwrap_or_default();
                assert!(
                    c.data == gathered[..],
                    "completion data differs from the Data-In sent"
                );
                self.summary.completed += 1;
                if c.response == ServiceResponse::COMMAND_COMPLETED && c.status == Status::GOOD {
                    self.summary.good += 1;
                }
            }
            Event::TaskManagementDone { task, .. } => {
                assert!(self.live_other.remove(&task), "TMF answer for {task:?}");
                self.summary.tmf_done += 1;
            }
            Event::TextDone { task, pairs } => {
                assert!(self.live_other.remove(&task), "text answer for {task:?}");
                let _ = pairs;
                self.summary.text_done += 1;
            }
            Event::LoggedOut { task } => {
                assert!(self.live_other.remove(&task), "logout answer for {task:?}");
                assert!(self.s.is_finished());
                self.summary.logged_out += 1;
            }
            Event::Notice(_) => self.summary.notices += 1,
            Event::ConnectionFailed { reason } => {
                assert!(!self.failed, "connection failed twice: {reason}");
                assert!(self.s.is_finished());
                self.failed = true;
                self.summary.failures += 1;
                self.summary.failure = Some(reason);
            }
        }
    }

    /// Takes the unfinished tasks and checks they are exactly the live ones, in submission
    /// order.
    fn take(&mut self) -> Vec<(TaskId, ScsiRequest)> {
        let taken = self.s.take_outstanding();
        assert!(self.s.is_finished());
        assert!(self.s.poll_transmit().is_none());
        let mut live: Vec<(u64, TaskId)> = self.live_scsi.iter().map(|(t, s)| (*s, *t)).collect();
        live.sort_unstable();
        let ids: Vec<TaskId> = taken.iter().map(|(t, _)| *t).collect();
        let want: Vec<TaskId> = live.iter().map(|(_, t)| *t).collect();
        assert_eq!(
            ids, want,
            "take_outstanding: the unfinished tasks in submission order"
        );
        for (id, req) in &taken {
            let mine = &self.requests[id];
            assert_eq!((&req.cdb, &req.data_out), (&mine.cdb, &mine.data_out));
            assert_eq!(req.read_len, mine.read_len);
        }
        if let Some(event) = self.s.poll_event() {
            panic!("event after take_outstanding: {event:?}");
        }
        taken
    }

    /// The driver's recovery: take the tasks, log in again, submit them in their order.
    fn reconnect(&mut self) {
        let taken = self.take();
        let login = self.login();
        self.s = InitiatorSession::new(login, self.config.clone(), self.now);
        self.rx = FrameDecoder::new(self.rx.limits());
        self.buf.clear();
        self.framing_lost = false;
        self.live_other.clear();
        self.unsent.clear();
        self.itts.clear();
        self.logging_out = false;
        self.failed = false;
        self.next_cmd_sn = login.cmd_sn;
        self.last_exp_stat_sn = login.exp_stat_sn;
        self.data_in.clear();
        self.summary.sessions += 1;
        for (id, req) in taken {
            self.s
                .submit(id, req)
                .expect("a re-issued task is accepted by the new session");
            self.unsent.push_back(id);
        }
        self.after(false);
    }

    /// End of input: let the keepalive run out, then account for every task.
    fn finish(&mut self) {
        let failures = self.summary.failures;
        for _ in 0..3 {
            let Some(t) = self.s.poll_timeout() else {
                break;
            };
            self.now = self.now.max(t);
            let before = self.s.is_finished();
            self.s.handle_timeout(self.now);
            self.after(before);
        }
        self.summary.timed_out_at_end = self.summary.failures > failures;
        self.summary.failures = failures;
        let taken = self.take();
        self.summary.left = taken.len();
        // Completions and take_outstanding together account for every task: none is left
        // live, and the taken ones are accepted again by a new session.
        self.live_scsi.clear();
        let mut fresh = InitiatorSession::new(self.login(), self.config.clone(), self.now);
        for (id, req) in taken {
            fresh.submit(id, req).expect("re-issue after the end");
        }
    }
}

/// An [`InitiatorSession`] after a canned login (bits 0-1 of the first byte), with a few
/// commands submitted (bits 2-3), fed records (see [`record`]): the target's bytes, clock
/// ticks, new commands, task management, text, logout, framing complaints and reconnects.
pub fn initiator_session(data: &[u8]) {
    let _ = run_session(data);
}

/// [`initiator_session`], telling what happened (for tests of the seeds).
pub fn run_session(data: &[u8]) -> SessionSummary {
    let Some((&flags, mut rest)) = data.split_first() else {
        return SessionSummary::default();
    };
    let mut d = SessionDrive::new(flags, false);
    for _ in 0..MAX_RECORDS {
        let Some((&kind, r)) = rest.split_first() else {
            break;
        };
        let (len, r) = match r {
            [a, b, r @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), r),
            _ => (0, &[][..]),
        };
        let (payload, r) = r.split_at(len.min(r.len()));
        rest = r;
        d.apply(kind, payload);
    }
    d.finish();
    d.summary
}
