//! The messages two agents exchange during a migration, and their encoding.
//!
//! The source sends requests, each with an id; the destination answers each with one reply
//! carrying the same id. A frame is a 4-byte big-endian header length, the header as JSON,
//! then the payload bytes (write data of a command, read data of its completion), so bulk
//! data is not inflated by the JSON encoding. Frames travel inside the encrypted channel.

use bytes::Bytes;
use datapath::{PathError, SessionState, TaskAttr};
use serde::{Deserialize, Serialize};

use crate::model::{PathPolicy, VmRecord};

/// Source → destination.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Take this VM: check it, serve its bus, prepare a data path (trial login), but do
    /// not log in with the VM's ISID yet.
    Offer {
        record: Box<VmRecord>,
        from_host: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathPolicy>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        adapter: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vhost_socket: Option<std::path::PathBuf>,
    },
    /// The source has drained and released the session: log in with it now (session
    /// reinstatement fences the source if its logout did not reach the target).
    Switch { state: SessionState },
    /// The migration is off: forget the prepared VM.
    Abandon { reason: String },
    /// A command that reached the source after the switchover; payload = Data-Out.
    Command {
        lun: u64,
        /// The CDB in hex.
        cdb: String,
        read_len: u32,
        attr: u8,
    },
    /// Task management that reached the source after the switchover.
    TaskManagement { function: u8, lun: u64 },
    /// An event for the VM's history (the switchover as the source measured it).
    Note { message: String },
    /// Does this host run VM `vm` on a path of its own? Asked on a new channel when the
    /// answer to `Switch` was lost.
    Owns { vm: String },
}

/// Destination → source.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The destination is ready for the switchover; `path` says which path it will use.
    Prepared {
        host: String,
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        socket: Option<std::path::PathBuf>,
    },
    /// The destination logged in: the VM is its now.
    Switched { path: String, login_ms: f64 },
    /// Done (abandon, task management).
    Done,
    /// The answer to `Owns`: the VM's path here, if it has one.
    Owner {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// A forwarded command completed; payload = Data-In.
    Completion {
        status: u8,
        /// Sense data in hex.
        sense: String,
        /// Positive: underflow, negative: overflow.
        residual: i64,
    },
    /// The request failed; `kind` names the [`PathError`] variant.
    Failed { kind: String, message: String },
}

/// One frame: which request it is, what it says, the bulk data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub id: u64,
    pub body: T,
}

/// Encodes a frame.
pub fn encode<T: Serialize>(id: u64, body: &T, payload: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(&Envelope { id, body }).unwrap_or_default();
    let mut frame = Vec::with_capacity(4 + header.len() + payload.len());
    frame.extend_from_slice(&(header.len() as u32).to_be_bytes());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(payload);
    frame
}

/// Decodes a frame; the error is one line.
pub fn decode<T: for<'de> Deserialize<'de>>(
    frame: Vec<u8>,
) -> Result<(Envelope<T>, Bytes), String> {
    let frame = Bytes::from(frame);
    let len = frame
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("frame shorter than its header length")?;
    let header = frame
        .get(4..4 + len)
        .ok_or("frame shorter than its header")?;
    let envelope = serde_json::from_slice(header).map_err(|e| format!("malformed message: {e}"))?;
    Ok((envelope, frame.slice(4 + len..)))
}

/// A path error as sent back to the source.
pub fn failed(e: &PathError) -> Reply {
    let kind = match e {
        PathError::Client(_) => "client",
        PathError::Auth { .. } => "auth",
        PathError::Unreachable(_) => "unreachable",
        PathError::PathFailed(_) => "path_failed",
        PathError::SessionLost(_) => "session_lost",
        PathError::TargetFailure => "target_failure",
        PathError::NoCapacity(_) => "no_capacity",
        PathError::Closed => "closed",
        _ => "refused",
    };
    Reply::Failed {
        kind: kind.into(),
        message: e.to_string(),
    }
}

/// The source's view of a [`Reply::Failed`]: a forwarded command never counts as a path
/// failure here (the destination already failed over and re-issued where it could).
pub fn path_error(kind: &str, message: String) -> PathError {
    match kind {
        "auth" => PathError::Auth { portal: message },
        "session_lost" => PathError::SessionLost(message),
        "target_failure" => PathError::TargetFailure,
        "closed" => PathError::Closed,
        "refused" | "client" => PathError::Refused(message),
        _ => PathError::Unreachable(message),
    }
}

pub fn attr_code(attr: TaskAttr) -> u8 {
    match attr {
        TaskAttr::Untagged => 0,
        TaskAttr::Simple => 1,
        TaskAttr::Ordered => 2,
        TaskAttr::HeadOfQueue => 3,
        TaskAttr::Aca => 4,
    }
}

pub fn attr_of(code: u8) -> TaskAttr {
    match code {
        0 => TaskAttr::Untagged,
        2 => TaskAttr::Ordered,
        3 => TaskAttr::HeadOfQueue,
        4 => TaskAttr::Aca,
        _ => TaskAttr::Simple,
    }
}

/// Lower-case hex of `b` (CDBs and sense in messages and the control API).
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes from hex; None unless every pair is a hex byte.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_frames_are_errors() {
        let frame = encode(
            7,
            &Request::Command {
                lun: 1,
                cdb: "2a00".into(),
                read_len: 0,
                attr: 1,
            },
            b"data",
        );
        let (env, payload) = decode::<Request>(frame).unwrap();
        assert_eq!(env.id, 7);
        assert!(matches!(env.body, Request::Command { lun: 1, .. }));
        assert_eq!(&payload[..], b"data");
        assert!(decode::<Request>(vec![0, 0]).is_err());
        assert!(decode::<Request>(vec![0, 0, 0, 9, b'{']).is_err());
        assert!(decode::<Request>(vec![0, 0, 0, 2, b'{', b'}']).is_err());
        assert!(decode::<Reply>(encode(1, &Reply::Done, &[])).is_ok());
    }

    #[test]
    fn errors_keep_their_kind_but_never_read_as_path_failures() {
        let Reply::Failed { kind, message } = failed(&PathError::PathFailed("x".into())) else {
            panic!()
        };
        assert!(!path_error(&kind, message).is_path_failure());
        let Reply::Failed { kind, message } = failed(&PathError::TargetFailure) else {
            panic!()
        };
        assert!(matches!(
            path_error(&kind, message),
            PathError::TargetFailure
        ));
        assert_eq!(
            from_hex(&to_hex(&[0, 0xff, 0x12])).unwrap(),
            vec![0, 0xff, 0x12]
        );
        assert!(from_hex("zz").is_none());
        for code in 0..5 {
            assert_eq!(attr_code(attr_of(code)), code);
        }
    }
}
