//! The session handle and its connection task.

use std::sync::Arc;

use iscsi_proto::initiator::{ScsiCompletion, ScsiRequest};
use iscsi_proto::keys::SessionParams;
use iscsi_wire::TmfFunction;

use crate::{Error, SessionOptions};

/// Counters of one session, for statistics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Commands completed (each exactly once).
    pub commands: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Successful recoveries (re-logins after a lost connection).
    pub recoveries: u64,
    /// Commands re-issued after recoveries.
    pub reissued: u64,
    /// Failed reconnect attempts.
    pub failed_attempts: u64,
    /// Duration of the last recovery, from failure detection to the new session in full feature
    /// phase, in microseconds.
    pub last_recovery_us: Option<u64>,
}

/// A logged-in session. Cheap to clone; all clones share the connection. Dropping the last
/// clone closes the connection (without a logout); [`Session::logout`] ends it cleanly.
#[derive(Clone)]
pub struct Session {
    inner: Arc<()>,
}

impl Session {
    /// Connects and logs in. Login problems are not retried here: an unreachable target or
    /// a wrong secret is reported at once.
    pub async fn connect(options: SessionOptions) -> Result<Session, Error> {
        let _ = options;
        todo!()
    }

    /// Sends one SCSI command and waits for its completion (any status).
    pub async fn execute(&self, request: ScsiRequest) -> Result<ScsiCompletion, Error> {
        let _ = (request, &self.inner);
        todo!()
    }

    /// Task management on a LUN number (ABORT TASK SET, LOGICAL UNIT RESET, ...).
    pub async fn task_management(&self, function: TmfFunction, lun: u64) -> Result<(), Error> {
        let _ = (function, lun);
        todo!()
    }

    /// The parameters negotiated by the current connection's login.
    pub fn params(&self) -> SessionParams {
        todo!()
    }

    pub fn stats(&self) -> SessionStats {
        todo!()
    }

    /// Logs out and closes the connection; outstanding commands fail with [`Error::Closed`].
    pub async fn logout(&self) -> Result<(), Error> {
        todo!()
    }
}
