//! The adapter protocol: what the host's adapter driver and the adapter say to each other.
//!
//! Everything travels in frames on a unix stream socket:
//!
//! ```text
//! u32 BE length (of kind + payload, 1 ..= MAX_FRAME) | u8 kind | payload
//! ```
//!
//! Control traffic is JSON inside a frame — it is rare and must stay readable:
//! [`FrameKind::CONTROL_REQUEST`] carries a [`ControlRequest`] (an id and a [`Request`]),
//! [`FrameKind::CONTROL_REPLY`] the [`ControlReply`] with the same id, and
//! [`FrameKind::EVENT`] an unsolicited [`Event`] (link down, …). Every connection starts with
//! a [`Request::Hello`] naming the protocol version; a connection whose hello names a
//! virtual function becomes that function's command queue.
//!
//! Queue traffic is binary, big-endian, with the payload bytes last so that they are written
//! and read without copies:
//!
//! ```text
//! SUBMIT          tag u64 | lun u64 (SAM) | attr u8 | read_len u32 | buffer u64 | cdb_len u16 | cdb | data-out
//! COMPLETE        tag u64 | status u8 | residual kind u8 | residual u32 | sense_len u16 | sense | data-in
//! COMPLETE_SHM    tag u64 | status u8 | residual kind u8 | residual u32 | sense_len u16 | data_len u32 | sense
//! FAIL            tag u64 | FailCode u8 | reason (UTF-8)
//! TASK_MGMT       tag u64 | function u8 | lun u64 (LUN number)
//! TASK_MGMT_DONE  tag u64 | FailCode u8 (0: function complete) | reason (UTF-8)
//! ```
//!
//! A queue's hello may carry a shared-memory region (a memfd passed with the hello as
//! SCM_RIGHTS, see [`crate::shm`]). A SUBMIT then names a buffer in it for the command's
//! data-in (its offset; `u64::MAX` for none), and the adapter completes such a command with
//! COMPLETE_SHM: the data is in the buffer, not in the frame.
//!
//! Decoding checks everything it reads: frame length (at most [`MAX_FRAME`]), kind, field
//! ranges, truncation and trailing bytes; a bad frame is an error, never a panic.

use std::collections::VecDeque;
use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use datapath::{AdapterHealth, InitiatorClient, Residual, TaskAttr};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this build speaks (in [`Hello`]).
pub const PROTOCOL_VERSION: u32 = 1;

/// Names the protocol in [`Hello`], so a socket of something else is recognised as such.
pub const MAGIC: &str = "viscsi-hba";

/// Largest frame (kind + payload) either side accepts.
pub const MAX_FRAME: u32 = 64 << 20;

/// Length prefix and kind.
pub const FRAME_HEADER: usize = 5;

/// Largest CDB (an extended CDB of RFC 7143 §11.2.1).
pub const MAX_CDB: usize = 260;

/// Largest reason text in a FAIL frame.
pub const MAX_REASON: usize = 1024;

/// The buffer field of a SUBMIT without a shared-memory buffer.
pub const NO_BUFFER: u64 = u64::MAX;

/// Fixed fields of a SUBMIT (before the CDB).
const SUBMIT_FIXED: usize = 8 + 8 + 1 + 4 + 8 + 2;

macro_rules! wire_code {
    ($(#[$meta:meta])* $name:ident { $($(#[$cmeta:meta])* $konst:ident = $val:expr,)* }) => {
        $(#[$meta])*
        #[derive(Copy, Clone, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub u8);

        impl $name {
            $($(#[$cmeta])* pub const $konst: $name = $name($val);)*

            /// The name of a known code.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $($name::$konst => Some(stringify!($konst)),)*
                    _ => None,
                }
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}(0x{:02x})", stringify!($name), self.0),
                }
            }
        }
    };
}

wire_code! {
    /// What a frame carries.
    FrameKind {
        CONTROL_REQUEST = 0x01,
        CONTROL_REPLY = 0x02,
        EVENT = 0x03,
        SUBMIT = 0x10,
        COMPLETE = 0x11,
        FAIL = 0x12,
        TASK_MGMT = 0x13,
        TASK_MGMT_DONE = 0x14,
        COMPLETE_SHM = 0x15,
    }
}

impl FrameKind {
    fn is_known(self) -> bool {
        self.name().is_some()
    }
}

wire_code! {
    /// Why the adapter could not complete a command (FAIL) or a task management function.
    FailCode {
        /// Task management only: the function completed.
        OK = 0,
        /// The adapter or the function failed; the command may be re-issued elsewhere.
        PATH_FAILED = 1,
        /// The adapter's port is down.
        LINK_DOWN = 2,
        /// The VF's session recovery gave up.
        SESSION_LOST = 3,
        /// The VF was released or its session closed.
        CLOSED = 4,
        /// The target answered with a service response other than COMMAND COMPLETED.
        TARGET_FAILURE = 5,
        /// The request is malformed or unsupported.
        REFUSED = 6,
    }
}

/// A frame as read: its kind and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Bytes,
}

/// A frame or message that breaks the protocol. One line, naming what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(u32),
    #[error("empty frame (no kind byte)")]
    Empty,
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("{0} has trailing bytes")]
    Trailing(&'static str),
    #[error("bad {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("connection closed inside a frame")]
    ClosedInFrame,
}

fn invalid(what: &'static str, why: impl Into<String>) -> ProtocolError {
    ProtocolError::Invalid {
        what,
        why: why.into(),
    }
}

/// Takes one whole frame off the front of `buf`, if there is one. The length and the kind are
/// checked as soon as the header is in, so an oversized or unknown frame is refused before
/// its payload is waited for.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let kind = FrameKind(buf.get_u8());
    let payload = buf.split_to(len - 1).freeze();
    Ok(Some(Frame { kind, payload }))
}

/// The length (kind + payload) of the frame at the front of `buf`, once its header is in.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    if len == 0 {
        return Err(ProtocolError::Empty);
    }
    if buf.len() >= FRAME_HEADER && !FrameKind(buf[4]).is_known() {
        return Err(ProtocolError::UnknownKind(buf[4]));
    }
    Ok(Some(len as usize))
}

// ---------------------------------------------------------------------------------------------
// Control messages (JSON)
// ---------------------------------------------------------------------------------------------

/// The first request on every connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`MAGIC`].
    pub magic: String,
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol: u32,
    /// Who is connecting (driver name, `viscsi hba status`, …), for the adapter's log.
    pub client: String,
    /// Makes this connection the command queue of this virtual function (which must be
    /// programmed); none: a control connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    /// Queues only: the size of the shared-memory region passed with this hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm: Option<u64>,
}

impl Hello {
    pub fn new(client: impl Into<String>, queue: Option<u32>) -> Hello {
        Hello {
            magic: MAGIC.into(),
            protocol: PROTOCOL_VERSION,
            client: client.into(),
            queue,
            shm: None,
        }
    }
}

/// A fault the adapter can be told to have, for testing error detection.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The process exits at once (exit code 101); every connection drops.
    Crash,
    /// The adapter stops answering anything but [`Fault::Recover`]; commands in flight are
    /// held, not completed.
    Hang,
    /// The port goes down: sessions drop, commands fail with [`FailCode::LINK_DOWN`].
    LinkDown,
    /// The port comes back.
    LinkUp,
    /// Back to normal from a hang or a link down.
    Recover,
}

impl Fault {
    pub const ALL: [Fault; 5] = [
        Fault::Crash,
        Fault::Hang,
        Fault::LinkDown,
        Fault::LinkUp,
        Fault::Recover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Crash => "crash",
            Fault::Hang => "hang",
            Fault::LinkDown => "link-down",
            Fault::LinkUp => "link-up",
            Fault::Recover => "recover",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                format!("unknown fault {s:?} (crash, hang, link-down, link-up, recover)")
            })
    }
}

/// A control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Hello(Hello),
    /// The adapter's summary ([`Reply::Info`]).
    Info,
    /// The adapter and every VF ([`Reply::Status`]).
    Status,
    /// Allocates a free virtual function to `owner` (a VM's InitiatorName); the VF stays
    /// allocated until released or until this control connection closes.
    AllocVf {
        owner: String,
    },
    /// Gives an allocated VF its identity and logs it in ([`Reply::Programmed`]). Secrets in
    /// the client are values (the adapter reads no host files). On failure the VF is freed.
    ProgramVf {
        vf: u32,
        client: Box<InitiatorClient>,
    },
    /// Logs the VF's session out and frees it.
    ReleaseVf {
        vf: u32,
    },
    /// Whether the adapter can reach a portal `host:port` ([`Reply::Probe`]).
    Probe {
        portal: String,
    },
    /// Heartbeat ([`Reply::Pong`]).
    Ping {
        seq: u64,
    },
    /// Fault injection ([`Reply::Done`]).
    Fault {
        fault: Fault,
    },
}

/// A control request with its id (the reply carries the same id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    pub id: u64,
    pub request: Request,
}

/// The adapter's summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterSummary {
    pub name: String,
    pub model: String,
    pub firmware: String,
    pub protocol: u32,
    pub vfs_total: u32,
    pub vfs_in_use: u32,
    pub link_up: bool,
}

/// A virtual function's state.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VfState {
    Free,
    /// Allocated to an owner, not programmed yet.
    Allocated,
    /// Programmed, logging in.
    LoggingIn,
    /// Programmed and logged in.
    LoggedIn,
    /// Programmed, session down (link down, or waiting to log in again).
    Down,
}

/// Counters of one VF since it was programmed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfStats {
    pub commands: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub in_flight: u64,
    pub recoveries: u64,
}

/// One VF in [`AdapterStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfStatus {
    pub index: u32,
    pub state: VfState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isid: Option<String>,
    pub queue_open: bool,
    pub stats: VfStats,
}

/// The adapter and its VFs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterStatus {
    pub adapter: AdapterSummary,
    pub vfs: Vec<VfStatus>,
}

/// What a VF negotiated when it logged in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Programmed {
    pub portal: String,
    pub header_digest: bool,
    pub data_digest: bool,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    Hello {
        protocol: u32,
        adapter: AdapterSummary,
        /// Queues: whether the adapter took the shared-memory region of the hello.
        #[serde(default)]
        shm: bool,
    },
    Info(AdapterSummary),
    Status(AdapterStatus),
    Vf {
        vf: u32,
    },
    Programmed(Programmed),
    Probe {
        reachable: bool,
    },
    Pong {
        seq: u64,
        vfs_in_use: u32,
        link_up: bool,
    },
    Done,
}

/// Why a control request failed. Messages never hold secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "error", content = "detail", rename_all = "snake_case")]
pub enum ControlError {
    /// The target refused the VF's credentials.
    #[error("authentication failed at {portal}")]
    Auth { portal: String },
    #[error("target unreachable: {0}")]
    Unreachable(String),
    #[error("no free virtual function on {0}")]
    NoCapacity(String),
    /// The initiator client is not usable.
    #[error("{0}")]
    Client(String),
    #[error("link down")]
    LinkDown,
    /// No such VF, or not in the right state (not allocated to this connection, not
    /// programmed, queue already open).
    #[error("{0}")]
    BadVf(String),
    /// The protocol version or the hello is not acceptable.
    #[error("{0}")]
    Version(String),
    #[error("{0}")]
    Refused(String),
}

/// The answer to a [`ControlRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlReply {
    pub id: u64,
    pub result: Result<Reply, ControlError>,
}

/// Something the adapter tells every control connection unasked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    LinkDown,
    LinkUp,
    /// The adapter is shutting down (SIGTERM).
    ShuttingDown,
}

impl AdapterSummary {
    /// The summary as `datapath`'s adapter information.
    pub fn to_info(&self, health: AdapterHealth) -> datapath::AdapterInfo {
        datapath::AdapterInfo {
            name: self.name.clone(),
            kind: datapath::AdapterKind::Offload,
            model: self.model.clone(),
            vfs_total: Some(self.vfs_total),
            vfs_in_use: self.vfs_in_use,
            health,
            details: vec![
                ("firmware".into(), self.firmware.clone()),
                ("protocol".into(), self.protocol.to_string()),
                (
                    "link".into(),
                    if self.link_up { "up" } else { "down" }.into(),
                ),
            ],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Queue messages (binary)
// ---------------------------------------------------------------------------------------------

/// A SCSI command for a VF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submit {
    pub tag: u64,
    /// 8-byte SAM LUN.
    pub lun: u64,
    pub attr: TaskAttr,
    pub read_len: u32,
    /// Offset of the data-in buffer in the queue's shared memory, if any.
    pub buffer: Option<u64>,
    pub cdb: Bytes,
    pub data_out: Bytes,
}

/// A command's completion with a SCSI status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Complete {
    pub tag: u64,
    pub status: u8,
    pub residual: Residual,
    pub sense: Bytes,
    /// Data-In, as the segments it is made of (one when decoded).
    pub data: Vec<Bytes>,
}

/// A command's completion whose data-in is in its shared-memory buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompleteShm {
    pub tag: u64,
    pub status: u8,
    pub residual: Residual,
    pub sense: Bytes,
    /// Bytes of data-in at the start of the buffer.
    pub data_len: u32,
}

/// A command the adapter could not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fail {
    pub tag: u64,
    pub code: FailCode,
    pub reason: String,
}

/// A task management request (LUN number, not SAM-encoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmt {
    pub tag: u64,
    pub function: u8,
    pub lun: u64,
}

/// The answer to a [`TaskMgmt`]: [`FailCode::OK`] or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtDone {
    pub tag: u64,
    pub code: FailCode,
    pub reason: String,
}

/// Any message, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Request(ControlRequest),
    Reply(ControlReply),
    Event(Event),
    Submit(Submit),
    Complete(Complete),
    CompleteShm(CompleteShm),
    Fail(Fail),
    TaskMgmt(TaskMgmt),
    TaskMgmtDone(TaskMgmtDone),
}

fn attr_from_bits(bits: u8) -> Option<TaskAttr> {
    Some(match bits {
        0 => TaskAttr::Untagged,
        1 => TaskAttr::Simple,
        2 => TaskAttr::Ordered,
        3 => TaskAttr::HeadOfQueue,
        4 => TaskAttr::Aca,
        _ => return None,
    })
}

fn residual_parts(r: Residual) -> (u8, u32) {
    match r {
        Residual::None => (0, 0),
        Residual::Underflow(n) => (1, n),
        Residual::Overflow(n) => (2, n),
    }
}

/// Reads fixed fields off a payload, refusing short ones.
struct Fields<'a> {
    what: &'static str,
    buf: &'a mut Bytes,
}

impl Fields<'_> {
    fn need(&self, n: usize) -> Result<(), ProtocolError> {
        if self.buf.len() < n {
            Err(ProtocolError::Truncated(self.what))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, ProtocolError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn end(self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Trailing(self.what))
        }
    }
    fn reason(self) -> Result<String, ProtocolError> {
        if self.buf.len() > MAX_REASON {
            return Err(invalid(self.what, "reason longer than 1024 bytes"));
        }
        String::from_utf8(self.buf.to_vec()).map_err(|_| invalid(self.what, "reason is not UTF-8"))
    }
}

fn json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| invalid(what, e.to_string()))
}

impl Message {
    /// What the message is, for errors and logs (never its contents).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Request(_) => "a control request",
            Message::Reply(_) => "a control reply",
            Message::Event(_) => "an event",
            Message::Submit(_) => "SUBMIT",
            Message::Complete(_) => "COMPLETE",
            Message::CompleteShm(_) => "COMPLETE_SHM",
            Message::Fail(_) => "FAIL",
            Message::TaskMgmt(_) => "TASK_MGMT",
            Message::TaskMgmtDone(_) => "TASK_MGMT_DONE",
        }
    }

    /// Types a frame's payload.
    pub fn decode(frame: Frame) -> Result<Message, ProtocolError> {
        let mut p = frame.payload;
        Ok(match frame.kind {
            FrameKind::CONTROL_REQUEST => Message::Request(json("control request", &p)?),
            FrameKind::CONTROL_REPLY => Message::Reply(json("control reply", &p)?),
            FrameKind::EVENT => Message::Event(json("event", &p)?),
            FrameKind::SUBMIT => {
                let mut f = Fields {
                    what: "SUBMIT",
                    buf: &mut p,
                };
                let tag = f.u64()?;
                let lun = f.u64()?;
                let attr = f.u8()?;
                let attr = attr_from_bits(attr)
                    .ok_or_else(|| invalid("SUBMIT", format!("task attribute {attr}")))?;
                let read_len = f.u32()?;
                let buffer = Some(f.u64()?).filter(|&b| b != NO_BUFFER);
                let cdb_len = usize::from(f.u16()?);
                if cdb_len == 0 || cdb_len > MAX_CDB {
                    return Err(invalid("SUBMIT", format!("CDB of {cdb_len} bytes")));
                }
                let cdb = f.bytes(cdb_len)?;
                Message::Submit(Submit {
                    tag,
                    lun,
                    attr,
                    read_len,
                    buffer,
                    cdb,
                    data_out: p,
                })
            }
            FrameKind::COMPLETE | FrameKind::COMPLETE_SHM => {
                let shm = frame.kind == FrameKind::COMPLETE_SHM;
                let what = if shm { "COMPLETE_SHM" } else { "COMPLETE" };
                let mut f = Fields { what, buf: &mut p };
                let tag = f.u64()?;
                let status = f.u8()?;
                let kind = f.u8()?;
                let n = f.u32()?;
                let residual = match kind {
                    0 if n == 0 => Residual::None,
                    1 => Residual::Underflow(n),
                    2 => Residual::Overflow(n),
                    _ => return Err(invalid(what, format!("residual kind {kind}/{n}"))),
                };
                let sense_len = usize::from(f.u16()?);
                if shm {
                    let data_len = f.u32()?;
                    let sense = f.bytes(sense_len)?;
                    f.end()?;
                    Message::CompleteShm(CompleteShm {
                        tag,
                        status,
                        residual,
                        sense,
                        data_len,
                    })
                } else {
                    let sense = f.bytes(sense_len)?;
                    let data = if p.is_empty() { Vec::new() } else { vec![p] };
                    Message::Complete(Complete {
                        tag,
                        status,
                        residual,
                        sense,
                        data,
                    })
                }
            }
            FrameKind::FAIL | FrameKind::TASK_MGMT_DONE => {
                let what = if frame.kind == FrameKind::FAIL {
                    "FAIL"
                } else {
                    "TASK_MGMT_DONE"
                };
                let mut f = Fields { what, buf: &mut p };
                let tag = f.u64()?;
                let code = FailCode(f.u8()?);
                if code.name().is_none() || (code == FailCode::OK && what == "FAIL") {
                    return Err(invalid(what, format!("code {}", code.0)));
                }
                let reason = f.reason()?;
                if what == "FAIL" {
                    Message::Fail(Fail { tag, code, reason })
                } else {
                    Message::TaskMgmtDone(TaskMgmtDone { tag, code, reason })
                }
            }
            FrameKind::TASK_MGMT => {
                let mut f = Fields {
                    what: "TASK_MGMT",
                    buf: &mut p,
                };
                let tag = f.u64()?;
                let function = f.u8()?;
                let lun = f.u64()?;
                f.end()?;
                Message::TaskMgmt(TaskMgmt { tag, function, lun })
            }
            other => return Err(ProtocolError::UnknownKind(other.0)),
        })
    }

    /// Encodes the message as one contiguous frame (tests, control traffic).
    pub fn to_frame_bytes(&self) -> Bytes {
        let mut w = FrameBuffer::default();
        w.queue(self);
        let mut out = BytesMut::new();
        w.flush_pending();
        for s in w.segments {
            out.extend_from_slice(&s);
        }
        out.freeze()
    }
}

/// Frames queued for writing: headers and small fields gathered in a scratch buffer, payload
/// bytes (data-out, data-in segments) kept as the `Bytes` they are, never copied.
#[derive(Default)]
pub struct FrameBuffer {
    scratch: BytesMut,
    segments: VecDeque<Bytes>,
    queued: usize,
}

/// Payloads up to this size are copied into the scratch buffer rather than given an iovec.
const COPY_BELOW: usize = 1024;

impl FrameBuffer {
    /// Bytes queued and not written.
    pub fn queued(&self) -> usize {
        self.queued
    }

    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    fn header(&mut self, kind: FrameKind, len: usize) {
        // Lengths are bounded by the senders (CDB, sense, reasons, data of at most 16 MiB).
        let len = u32::try_from(len + 1).unwrap_or(u32::MAX);
        self.scratch.put_u32(len);
        self.scratch.put_u8(kind.0);
        self.queued += FRAME_HEADER;
    }

    fn small(&mut self, b: &[u8]) {
        self.scratch.extend_from_slice(b);
        self.queued += b.len();
    }

    fn payload(&mut self, b: &Bytes) {
        if b.len() < COPY_BELOW {
            self.small(b);
        } else {
            self.flush_pending();
            self.queued += b.len();
            self.segments.push_back(b.clone());
        }
    }

    fn flush_pending(&mut self) {
        if !self.scratch.is_empty() {
            self.segments.push_back(self.scratch.split().freeze());
        }
    }

    fn json(&mut self, kind: FrameKind, value: &impl Serialize) {
        // Serializing these plain types cannot fail; an empty object keeps the frame valid.
        let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        self.header(kind, body.len());
        self.small(&body);
    }

    /// Queues one message.
    pub fn queue(&mut self, m: &Message) {
        match m {
            Message::Request(r) => self.json(FrameKind::CONTROL_REQUEST, r),
            Message::Reply(r) => self.json(FrameKind::CONTROL_REPLY, r),
            Message::Event(e) => self.json(FrameKind::EVENT, e),
            Message::Submit(s) => self.queue_submit(s),
            Message::Complete(c) => {
                self.queue_complete(c.tag, c.status, c.residual, &c.sense, &c.data)
            }
            Message::CompleteShm(c) => {
                self.queue_complete_shm(c.tag, c.status, c.residual, &c.sense, c.data_len)
            }
            Message::Fail(f) => self.queue_fail(FrameKind::FAIL, f.tag, f.code, &f.reason),
            Message::TaskMgmt(t) => {
                self.header(FrameKind::TASK_MGMT, 17);
                let mut b = [0u8; 17];
                b[..8].copy_from_slice(&t.tag.to_be_bytes());
                b[8] = t.function;
                b[9..].copy_from_slice(&t.lun.to_be_bytes());
                self.small(&b);
            }
            Message::TaskMgmtDone(t) => {
                self.queue_fail(FrameKind::TASK_MGMT_DONE, t.tag, t.code, &t.reason)
            }
        }
    }

    /// Queues a SUBMIT (the CDB is at most [`MAX_CDB`] bytes; the caller checks).
    pub fn queue_submit(&mut self, s: &Submit) {
        let len = SUBMIT_FIXED + s.cdb.len() + s.data_out.len();
        self.header(FrameKind::SUBMIT, len);
        let mut b = [0u8; SUBMIT_FIXED];
        b[..8].copy_from_slice(&s.tag.to_be_bytes());
        b[8..16].copy_from_slice(&s.lun.to_be_bytes());
        b[16] = s.attr.bits();
        b[17..21].copy_from_slice(&s.read_len.to_be_bytes());
        b[21..29].copy_from_slice(&s.buffer.unwrap_or(NO_BUFFER).to_be_bytes());
        b[29..31].copy_from_slice(&(s.cdb.len() as u16).to_be_bytes());
        self.small(&b);
        self.small(&s.cdb);
        self.payload(&s.data_out);
    }

    /// Queues a COMPLETE whose data-in is `data` (segments, written without a copy).
    pub fn queue_complete(
        &mut self,
        tag: u64,
        status: u8,
        residual: Residual,
        sense: &[u8],
        data: &[Bytes],
    ) {
        let sense = &sense[..sense.len().min(usize::from(u16::MAX))];
        let data_len: usize = data.iter().map(Bytes::len).sum();
        let len = 8 + 1 + 1 + 4 + 2 + sense.len() + data_len;
        self.header(FrameKind::COMPLETE, len);
        let (kind, n) = residual_parts(residual);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&tag.to_be_bytes());
        b[8] = status;
        b[9] = kind;
        b[10..14].copy_from_slice(&n.to_be_bytes());
        b[14..16].copy_from_slice(&(sense.len() as u16).to_be_bytes());
        self.small(&b);
        self.small(sense);
        for d in data {
            self.payload(d);
        }
    }

    /// Queues a COMPLETE_SHM: the data-in (`data_len` bytes) is in the command's buffer.
    pub fn queue_complete_shm(
        &mut self,
        tag: u64,
        status: u8,
        residual: Residual,
        sense: &[u8],
        data_len: u32,
    ) {
        let sense = &sense[..sense.len().min(usize::from(u16::MAX))];
        self.header(FrameKind::COMPLETE_SHM, 20 + sense.len());
        let (kind, n) = residual_parts(residual);
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&tag.to_be_bytes());
        b[8] = status;
        b[9] = kind;
        b[10..14].copy_from_slice(&n.to_be_bytes());
        b[14..16].copy_from_slice(&(sense.len() as u16).to_be_bytes());
        b[16..20].copy_from_slice(&data_len.to_be_bytes());
        self.small(&b);
        self.small(sense);
    }

    /// Queues a FAIL (or TASK_MGMT_DONE); the reason is cut to [`MAX_REASON`] bytes.
    pub fn queue_fail(&mut self, kind: FrameKind, tag: u64, code: FailCode, reason: &str) {
        let mut end = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = &reason.as_bytes()[..end];
        self.header(kind, 9 + reason.len());
        let mut b = [0u8; 9];
        b[..8].copy_from_slice(&tag.to_be_bytes());
        b[8] = code.0;
        self.small(&b);
        self.small(reason);
    }

    /// Writes everything queued with vectored writes. Cancel-safe: what was not written
    /// stays queued.
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> io::Result<()> {
        self.flush_pending();
        iscsi_net::write_segments(io, &mut self.segments, &mut self.queued).await?;
        io.flush().await
    }
}

/// Reads frames off a byte stream.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
}

/// Room for small frames per read.
const READ_CHUNK: usize = 64 * 1024;
/// Less room than this before a read: make more.
const MIN_ROOM: usize = 8 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// A reader whose first bytes were read already.
    pub fn with_buffer(io: R, buf: BytesMut) -> Self {
        FrameReader { io, buf }
    }

    /// A frame already in the buffer, without reading.
    pub fn try_next(&mut self) -> Result<Option<Frame>, ProtocolError> {
        decode_frame(&mut self.buf)
    }

    /// The next frame; `Ok(None)` at a clean end of stream (between frames).
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(f) = decode_frame(&mut self.buf)? {
                return Ok(Some(f));
            }
            // Room for the rest of the frame being read (its payload then needs no copy
            // between buffers), or for a batch of small ones.
            let rest = frame_len(&self.buf)?.map_or(0, |len| 4 + len - self.buf.len());
            if self.buf.capacity() - self.buf.len() < rest.max(MIN_ROOM) {
                self.buf.reserve(rest.max(READ_CHUNK));
            }
            let n = self.io.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtocolError::ClosedInFrame.into())
                };
            }
        }
    }

    /// The next frame as a typed message.
    pub async fn next_message(&mut self) -> Result<Option<Message>, ReadError> {
        match self.next().await? {
            Some(f) => Ok(Some(Message::decode(f)?)),
            None => Ok(None),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.io
    }
}

/// Reading a frame failed: the stream, or the peer broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
}

/// Socket buffer of queue connections: room for a few large frames, so that a 1 MiB
/// completion does not cross in many small steps.
pub const QUEUE_SOCKET_BUFFER: usize = 4 << 20;

/// Sizes a queue connection's socket buffers (best effort: the system caps them).
pub fn size_queue_socket(socket: &impl std::os::fd::AsFd) {
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(socket, QUEUE_SOCKET_BUFFER);
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(socket, QUEUE_SOCKET_BUFFER);
}

/// Writes one message at once (control traffic).
pub async fn write_message<W: AsyncWrite + Unpin>(io: &mut W, m: &Message) -> io::Result<()> {
    let mut b = FrameBuffer::default();
    b.queue(m);
    b.write_to(io).await
}

#[cfg(test)]
mod tests;
