//! The initiator role, sans-IO: [`InitiatorLogin`] for one connection's login, then
//! [`InitiatorSession`] for full feature phase.
//!
//! The two halves meet at [`LoginResult`]: login ends with the negotiated parameters and the
//! sequence numbers the session starts from. A driver opens a TCP connection, feeds the login
//! the Login Responses until it returns a result (or a redirection, or a refusal), pushes the
//! negotiated digests and segment limits into its framing, and builds an
//! [`InitiatorSession`] from the result.
//!
//! In full feature phase the session takes SCSI commands tagged with the caller's own
//! [`TaskId`] (stable across reconnects, unlike the ITT), keeps the command window
//! (CmdSN/ExpCmdSN/MaxCmdSN), sends immediate and unsolicited data and the Data-Out that R2Ts
//! solicit, keeps the Data-In segments of each task as they arrived (a [`DataIn`], no copy),
//! and reports completions, task management and text answers as [`Event`]s. When the connection fails the driver takes the tasks that
//! did not complete with [`InitiatorSession::take_outstanding`], logs in again with the same
//! InitiatorName + ISID (the target reinstates the session) and submits them to the new
//! session in their original order: no task completes twice, because the old session's PDUs
//! can no longer arrive.
//!
//! Not here: sockets, timers, retry policy and backoff (the driver decides when to reconnect),
//! SCSI semantics (CDBs and sense data are opaque bytes), ErrorRecoveryLevel > 0 and more
//! than one connection per session.

mod login;
mod session;

pub use login::InitiatorLogin;
pub use session::InitiatorSession;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iscsi_wire::{AsyncEvent, Isid, LoginStatus, ServiceResponse, Status, TmfResponse};

use crate::chap::{AuthError, ChapAlgorithm, Credentials};
use crate::keys::{NegotiationConfig, NegotiationError, SessionParams, SessionType};

pub use crate::OutPdu;

// ---------------------------------------------------------------------------------------------
// Login
// ---------------------------------------------------------------------------------------------

/// CHAP settings of an initiator.
#[derive(Clone, Debug)]
pub struct ChapConfig {
    /// Our CHAP_N and secret.
    pub credentials: Credentials,
    /// The target's expected CHAP_N and secret: mutual CHAP when set.
    pub target: Option<Credentials>,
    /// Algorithms in preference order (empty: SHA3-256, SHA-256, SHA-1, MD5).
    pub algorithms: Vec<ChapAlgorithm>,
}

/// Everything one login needs.
#[derive(Clone, Debug)]
pub struct LoginConfig {
    /// InitiatorName (an IQN or EUI name).
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// The caller's stable ISID: the initiator port is InitiatorName + ISID.
    pub isid: Isid,
    /// 0 for a new session (and for reinstatement of an old one).
    pub tsih: u16,
    /// Connection ID.
    pub cid: u16,
    /// Normal or Discovery. A normal session needs `negotiation.target_name`.
    pub session_type: SessionType,
    /// None: offer `AuthMethod=None` only.
    pub chap: Option<ChapConfig>,
    /// What we offer: digests, MaxRecvDataSegmentLength, bursts, InitialR2T, ImmediateData,
    /// ... `initiator_name`, `target_name` and `session_type` are taken from this config's
    /// fields of the same name and need not be set there.
    pub negotiation: NegotiationConfig,
    /// CmdSN of the login (and of the first command after it).
    pub cmd_sn: u32,
    /// ExpStatSN to send in the first Login Request (0 on a new connection).
    pub exp_stat_sn: u32,
}

/// What a successful login hands to [`InitiatorSession::new`].
#[derive(Clone, Debug)]
pub struct LoginResult {
    /// The operational parameters in force. `max_xmit_data_segment_length` bounds what we send.
    pub params: SessionParams,
    /// The TSIH the target gave the session.
    pub tsih: u16,
    pub isid: Isid,
    pub cid: u16,
    /// The next CmdSN to use.
    pub cmd_sn: u32,
    /// The next StatSN we expect (last Login Response's StatSN + 1).
    pub exp_stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    /// TargetPortalGroupTag the target declared.
    pub target_portal_group_tag: Option<u16>,
    /// The target's CHAP_N after mutual authentication.
    pub authenticated_target: Option<String>,
    /// A CHAP secret used is shorter than 12 bytes.
    pub weak_secret: bool,
}

/// Progress of a login after a Login Response.
#[derive(Debug)]
pub enum LoginStep {
    /// Send this Login Request and feed the next response.
    Send(OutPdu),
    /// Full feature phase: switch the framing to the negotiated limits and build the session.
    Done(Box<LoginResult>),
}

/// Why a login did not reach full feature phase. Messages never contain secrets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoginError {
    /// Status class 1: log in at `address` (`host:port` or `[v6]:port`, from TargetAddress)
    /// instead; `permanent` for 0x0102.
    #[error("target moved {}: {address}", if *permanent { "permanently" } else { "temporarily" })]
    Redirected { address: String, permanent: bool },
    /// The target refused with a class 2 or 3 status.
    #[error("login refused: {status:?}")]
    Refused { status: LoginStatus },
    /// CHAP failed on our side (the target's response was wrong, no common algorithm, ...).
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
    /// The target's keys break negotiation rules.
    #[error("negotiation: {0}")]
    Negotiation(#[from] NegotiationError),
    /// Anything else the target did wrong during login (bad opcode, ITT, stage, version).
    #[error("protocol error during login: {0}")]
    Protocol(&'static str),
}

impl LoginError {
    /// Worth retrying later (the target may be restarting): class 3 statuses and
    /// protocol errors. Authentication, authorization and "not found" are not.
    pub fn is_transient(&self) -> bool {
        match self {
            LoginError::Refused { status } => status.class() == 3,
            LoginError::Redirected { .. } => true,
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Full feature phase
// ---------------------------------------------------------------------------------------------

/// The caller's handle for a task: any number unique among the caller's outstanding tasks.
/// It survives reconnects; ITTs do not.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u64);

/// SAM task attribute of a SCSI command.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum TaskAttr {
    Untagged,
    #[default]
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

impl TaskAttr {
    /// The 3-bit ATTR field of the SCSI Command PDU.
    pub fn bits(self) -> u8 {
        match self {
            TaskAttr::Untagged => 0,
            TaskAttr::Simple => 1,
            TaskAttr::Ordered => 2,
            TaskAttr::HeadOfQueue => 3,
            TaskAttr::Aca => 4,
        }
    }
}

/// One SCSI command as the caller gives it.
#[derive(Clone, Debug)]
pub struct ScsiRequest {
    /// The 8-byte LUN field (SAM encoding, e.g. `scsi::lun::encode`).
    pub lun: u64,
    /// The CDB; longer than 16 bytes goes into an extended-CDB AHS.
    pub cdb: Bytes,
    /// Write payload (empty when the command sends none). Sent as slices of this buffer.
    pub data_out: Bytes,
    /// Bytes of Data-In the caller expects (0 when the command reads nothing).
    pub read_len: u32,
    pub attr: TaskAttr,
}

/// A residual reported by the target (RFC 7143 §11.4.5).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Residual {
    #[default]
    None,
    /// The target transferred this many bytes fewer than expected.
    Underflow(u32),
    /// The command wanted this many bytes more than expected.
    Overflow(u32),
}

/// A finished SCSI command.
#[derive(Clone, Debug)]
pub struct ScsiCompletion {
    pub task: TaskId,
    /// COMMAND_COMPLETED, or TARGET_FAILURE (then `status` is meaningless).
    pub response: ServiceResponse,
    pub status: Status,
    /// Sense data (without the 2-byte SenseLength), empty if none.
    pub sense: Bytes,
    /// Data-In as received, at most `read_len` bytes: the received segments themselves.
    pub data: DataIn,
    pub residual: Residual,
}

/// The data of a read: the Data-In segments as they came off the wire, in order.
///
/// Each segment is a slice of the connection's receive buffer, so gathering a read copies
/// nothing. A caller that needs one contiguous buffer takes [`DataIn::to_bytes`] (free for one
/// segment, one copy otherwise); one with a buffer of its own uses [`DataIn::copy_to_slice`]
/// (exactly one copy) or writes the [`segments`](DataIn::segments) out with a vectored write.
/// Equality compares contents, not where the segments are cut.
#[derive(Clone, Default)]
pub struct DataIn {
    /// Never empty ones.
    segments: Vec<Bytes>,
    len: usize,
}

impl DataIn {
    pub fn new() -> DataIn {
        DataIn::default()
    }

    /// Appends a segment (an empty one is dropped).
    pub fn push(&mut self, segment: Bytes) {
        if !segment.is_empty() {
            self.len += segment.len();
            self.segments.push(segment);
        }
    }

    /// Bytes in all segments.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments in order, none of them empty.
    pub fn segments(&self) -> &[Bytes] {
        &self.segments
    }

    /// The segments in order as byte slices.
    pub fn iter(&self) -> Chunks<'_> {
        Chunks(self.segments.iter())
    }

    /// The data as one buffer: the segment itself when there is only one (no copy), else one
    /// copy.
    pub fn to_bytes(&self) -> Bytes {
        match self.segments.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => concat(many, self.len),
        }
    }

    /// [`to_bytes`](DataIn::to_bytes), consuming the segments.
    pub fn into_bytes(mut self) -> Bytes {
        match self.segments.len() {
            0 => Bytes::new(),
            1 => self.segments.swap_remove(0),
            _ => concat(&self.segments, self.len),
        }
    }

    /// Copies the data to the start of `dst` (one copy); the rest of `dst` is left as it is.
    ///
    /// # Panics
    ///
    /// If `dst` is shorter than [`len`](DataIn::len).
    pub fn copy_to_slice(&self, dst: &mut [u8]) {
        assert!(
            dst.len() >= self.len,
            "copy_to_slice: {} bytes of data into {} bytes",
            self.len,
            dst.len()
        );
        let mut at = 0;
        for s in &self.segments {
            dst[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
    }

    /// Same contents as the chunks of `other`, `other_len` bytes in all.
    fn same_as<'a>(&self, other: impl IntoIterator<Item = &'a [u8]>, other_len: usize) -> bool {
        if self.len != other_len {
            return false;
        }
        let mut ours = self.iter();
        let (mut a, mut b): (&[u8], &[u8]) = (&[], &[]);
        for chunk in other {
            b = chunk;
            while !b.is_empty() {
                if a.is_empty() {
                    // The lengths are equal, so ours cannot run out first.
                    a = ours.next().unwrap_or_default();
                    if a.is_empty() {
                        return false;
                    }
                }
                let n = a.len().min(b.len());
                if a[..n] != b[..n] {
                    return false;
                }
                (a, b) = (&a[n..], &b[n..]);
            }
        }
        debug_assert!(b.is_empty() && a.is_empty());
        true
    }
}

fn concat(segments: &[Bytes], len: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(len);
    for s in segments {
        buf.extend_from_slice(s);
    }
    buf.freeze()
}

impl std::fmt::Debug for DataIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataIn")
            .field("len", &self.len)
            .field("segments", &self.segments.len())
            .finish()
    }
}

impl From<Bytes> for DataIn {
    fn from(b: Bytes) -> DataIn {
        let mut d = DataIn::new();
        d.push(b);
        d
    }
}

impl From<Vec<u8>> for DataIn {
    fn from(v: Vec<u8>) -> DataIn {
        DataIn::from(Bytes::from(v))
    }
}

impl FromIterator<Bytes> for DataIn {
    fn from_iter<I: IntoIterator<Item = Bytes>>(iter: I) -> DataIn {
        let mut d = DataIn::new();
        for b in iter {
            d.push(b);
        }
        d
    }
}

impl<'a> IntoIterator for &'a DataIn {
    type Item = &'a [u8];
    type IntoIter = Chunks<'a>;
    fn into_iter(self) -> Chunks<'a> {
        self.iter()
    }
}

impl PartialEq for DataIn {
    fn eq(&self, other: &DataIn) -> bool {
        self.same_as(other, other.len)
    }
}

impl Eq for DataIn {}

impl PartialEq<[u8]> for DataIn {
    fn eq(&self, other: &[u8]) -> bool {
        self.same_as([other], other.len())
    }
}

impl PartialEq<&[u8]> for DataIn {
    fn eq(&self, other: &&[u8]) -> bool {
        *self == **other
    }
}

impl PartialEq<Bytes> for DataIn {
    fn eq(&self, other: &Bytes) -> bool {
        *self == other[..]
    }
}

/// The segments of a [`DataIn`] as byte slices, from [`DataIn::iter`].
#[derive(Clone, Debug)]
pub struct Chunks<'a>(std::slice::Iter<'a, Bytes>);

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        self.0.next().map(|b| &b[..])
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Chunks<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|b| &b[..])
    }
}

impl ExactSizeIterator for Chunks<'_> {}

impl std::iter::FusedIterator for Chunks<'_> {}

/// Something the target told us outside a task (§11.9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetNotice {
    /// A SCSI asynchronous event: sense data for a LUN.
    ScsiEvent { lun: u64, sense: Bytes },
    /// The target asks us to log out within `within`.
    LogoutRequested { within: Duration },
    /// The target will drop (or has dropped) the connection; reconnect after `time2wait`.
    ConnectionDrop {
        time2wait: Duration,
        time2retain: Duration,
    },
    /// The target will drop the whole session.
    SessionDrop {
        time2wait: Duration,
        time2retain: Duration,
    },
    /// The target asks for a text renegotiation (we answer with none).
    NegotiationRequested,
    /// Any other event code.
    Other(AsyncEvent),
}

/// Work for the driver.
#[derive(Debug)]
pub enum Event {
    Completed(ScsiCompletion),
    /// Answer to [`InitiatorSession::task_management`].
    TaskManagementDone {
        task: TaskId,
        response: TmfResponse,
    },
    /// Answer to [`InitiatorSession::text_request`], continuations gathered.
    TextDone {
        task: TaskId,
        pairs: Vec<(String, String)>,
    },
    /// The target accepted [`InitiatorSession::logout`]; close the connection.
    LoggedOut {
        task: TaskId,
    },
    /// An asynchronous message from the target.
    Notice(TargetNotice),
    /// The connection is no longer usable (protocol violation by the target, a Reject at
    /// connection scope, keepalive timed out). The driver closes it, takes the outstanding
    /// tasks and recovers.
    ConnectionFailed {
        reason: String,
    },
}

/// Per-session settings of the full feature phase.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// After this long without any PDU from the target, send a NOP-Out ping (None: never).
    pub nop_interval: Option<Duration>,
    /// A ping unanswered for this long fails the connection.
    pub nop_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            nop_interval: Some(Duration::from_secs(5)),
            nop_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the session refused a command from the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    #[error("task id already in use")]
    DuplicateTask,
    #[error("CDB longer than 260 bytes")]
    CdbTooLong,
    #[error("the session is logging out or failed")]
    NotUsable,
    #[error("referenced task is not outstanding")]
    UnknownTask,
}

#[cfg(test)]
mod tests;
