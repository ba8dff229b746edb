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
//! solicit, gathers Data-In into one buffer per task, and reports completions, task management
//! and text answers as [`Event`]s. When the connection fails the driver takes the tasks that
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

use bytes::Bytes;
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
    /// Data-In as received, at most `read_len` bytes.
    pub data: Bytes,
    pub residual: Residual,
}

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
