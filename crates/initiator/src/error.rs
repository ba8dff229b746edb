//! The initiator's public error: what went wrong and who is at fault, without secrets.

use iscsi_proto::initiator::{LoginError, SubmitError};
use iscsi_wire::{ServiceResponse, Status};

/// Errors of sessions, commands and discovery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// TCP connect to the portal failed (or timed out).
    #[error("cannot connect to {portal}: {source}")]
    Connect {
        portal: String,
        #[source]
        source: std::io::Error,
    },
    /// The target refused the login or it broke the rules.
    #[error("login to {portal} failed: {source}")]
    Login {
        portal: String,
        #[source]
        source: LoginError,
    },
    /// A timeout of the recovery policy expired.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The policy gave up recovering the session; outstanding commands failed.
    #[error("session lost: {0}")]
    SessionLost(String),
    /// The session was logged out or dropped by the caller.
    #[error("session closed")]
    Closed,
    /// The session refused a request (duplicate task, CDB too long, ...).
    #[error("request refused: {0}")]
    Submit(#[from] SubmitError),
    /// The target reported a service response other than COMMAND COMPLETED.
    #[error("target failure ({0:?})")]
    TargetFailure(ServiceResponse),
    /// A typed helper's command ended with a SCSI status other than GOOD.
    #[error("SCSI {status:?}{}", sense.as_ref().map(|s| format!(", sense {s}")).unwrap_or_default())]
    Scsi {
        status: Status,
        /// "key/asc/ascq" rendering of the sense data, if any.
        sense: Option<String>,
    },
    /// The target's answer to a typed helper is malformed.
    #[error("malformed {0} data from the target")]
    BadData(&'static str),
    /// A task management request was answered with something other than FUNCTION COMPLETE.
    #[error("task management: {0}")]
    TaskManagement(String),
}

impl Error {
    /// True if the error is about credentials (wrong secret, unknown user).
    pub fn is_auth(&self) -> bool {
        match self {
            Error::Login { source, .. } => matches!(
                source,
                LoginError::Auth(_)
                    | LoginError::Refused {
                        status: iscsi_wire::LoginStatus::AUTHENTICATION_FAILURE
                            | iscsi_wire::LoginStatus::AUTHORIZATION_FAILURE
                    }
            ),
            _ => false,
        }
    }
}
