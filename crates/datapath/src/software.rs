//! The software data path ("emulator"): viscsi's own initiator on the host's TCP/IP stack,
//! one session per VM. Every host has it; it has no function limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use initiator::{ScsiCompletion, ScsiRequest, Session};
use iscsi_wire::{ServiceResponse, TmfFunction};
use tokio::sync::watch;

use crate::{
    Adapter, AdapterHealth, AdapterInfo, AdapterKind, BoxFuture, Completion, DataPath, Gate,
    Health, InitiatorClient, PathError, PathInfo, PathStats, SessionState,
};

/// The adapter name of the software path.
pub const SOFTWARE_ADAPTER: &str = "software";

/// Maps an initiator error to a path error (secrets never appear in either).
pub fn path_error(e: &initiator::Error, portal: &str) -> PathError {
    use initiator::Error as E;
    match e {
        _ if e.is_auth() => PathError::Auth {
            portal: portal.to_owned(),
        },
        E::Connect { .. } | E::Login { .. } | E::Timeout(_) => {
            PathError::Unreachable(e.to_string())
        }
        E::SessionLost(why) => PathError::SessionLost(why.clone()),
        E::Closed => PathError::Closed,
        E::TargetFailure(_) => PathError::TargetFailure,
        other => PathError::Refused(other.to_string()),
    }
}

/// A completion of the initiator as a path completion.
pub fn completion(c: ScsiCompletion) -> Result<Completion, PathError> {
    if c.response != ServiceResponse::COMMAND_COMPLETED {
        return Err(PathError::TargetFailure);
    }
    Ok(Completion {
        status: c.status,
        sense: c.sense,
        data: c.data,
        residual: c.residual,
    })
}

/// Logs `client` in on the first portal that answers (in the client's order). An
/// authentication failure stops at once: another portal of the same target would refuse too.
pub async fn connect_client(client: &InitiatorClient) -> Result<(Session, String), PathError> {
    client.validate()?;
    let mut last = None;
    for portal in &client.portals {
        let options = client.session_options(portal)?;
        match Session::connect(options).await {
            Ok(s) => return Ok((s, portal.clone())),
            Err(e) => {
                let err = path_error(&e, portal);
                if matches!(err, PathError::Auth { .. }) {
                    return Err(err);
                }
                tracing::debug!(%portal, error = %e, "portal failed");
                last = Some(err);
            }
        }
    }
    Err(last.unwrap_or_else(|| PathError::Unreachable("no portal".into())))
}

/// Whether a TCP connection to `portal` can be opened within `timeout`.
pub async fn tcp_reaches(portal: &str, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(portal)).await,
        Ok(Ok(_))
    )
}

/// The software "adapter": opens [`SoftwarePath`]s.
pub struct SoftwareAdapter {
    health: watch::Sender<AdapterHealth>,
    in_use: Arc<AtomicU64>,
}

impl Default for SoftwareAdapter {
    fn default() -> Self {
        SoftwareAdapter {
            health: watch::Sender::new(AdapterHealth::Ok),
            in_use: Arc::default(),
        }
    }
}

impl SoftwareAdapter {
    pub fn new() -> SoftwareAdapter {
        SoftwareAdapter::default()
    }
}

impl Adapter for SoftwareAdapter {
    fn info(&self) -> AdapterInfo {
        AdapterInfo {
            name: SOFTWARE_ADAPTER.into(),
            kind: AdapterKind::Software,
            model: "viscsi software initiator (host TCP/IP stack)".into(),
            vfs_total: None,
            vfs_in_use: self.in_use.load(Ordering::Relaxed) as u32,
            health: self.health.borrow().clone(),
            details: vec![
                ("digests".into(), "none, crc32c".into()),
                ("chap".into(), "md5, sha1, sha256, sha3-256, mutual".into()),
                ("error_recovery_level".into(), "0".into()),
            ],
        }
    }

    fn watch_health(&self) -> watch::Receiver<AdapterHealth> {
        self.health.subscribe()
    }

    fn reaches<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(tcp_reaches(portal, Duration::from_secs(2)))
    }

    fn open<'a>(
        &'a self,
        client: &'a InitiatorClient,
        _state: Option<&'a SessionState>,
    ) -> BoxFuture<'a, Result<Arc<dyn DataPath>, PathError>> {
        Box::pin(async move {
            let (session, portal) = connect_client(client).await?;
            self.in_use.fetch_add(1, Ordering::Relaxed);
            let path: Arc<dyn DataPath> = Arc::new(SoftwarePath {
                portal: portal.as_str().into(),
                info: path_info(client, &session, portal),
                session,
                gate: Gate::new(),
                errors: Arc::default(),
                failed: Arc::default(),
                in_use: self.in_use.clone(),
                closed: Mutex::new(false),
            });
            Ok(path)
        })
    }
}

fn path_info(client: &InitiatorClient, session: &Session, portal: String) -> PathInfo {
    let params = session.params();
    PathInfo {
        kind: AdapterKind::Software,
        adapter: SOFTWARE_ADAPTER.into(),
        vf: None,
        portal,
        target: client.target.clone(),
        initiator_name: client.initiator_name.clone(),
        isid: client.isid.clone(),
        header_digest: params.header_digest,
        data_digest: params.data_digest,
    }
}

/// One VM's session on the software initiator.
pub struct SoftwarePath {
    info: PathInfo,
    /// `info.portal`, shared with every command's future (for its error message).
    portal: Arc<str>,
    session: Session,
    gate: Gate,
    errors: Arc<AtomicU64>,
    /// Set when the session gave up: the reason.
    failed: Arc<Mutex<Option<String>>>,
    in_use: Arc<AtomicU64>,
    closed: Mutex<bool>,
}

impl SoftwarePath {
    /// The initiator session underneath (for callers that want its typed helpers).
    pub fn session(&self) -> &Session {
        &self.session
    }
}

impl DataPath for SoftwarePath {
    fn info(&self) -> PathInfo {
        self.info.clone()
    }

    fn submit(&self, command: ScsiRequest) -> BoxFuture<'static, Result<Completion, PathError>> {
        let session = self.session.clone();
        let gate = self.gate.clone();
        let errors = self.errors.clone();
        let failed = self.failed.clone();
        let portal = Arc::clone(&self.portal);
        Box::pin(async move {
            let _ticket = gate.enter().await;
            match session.execute(command).await {
                Ok(c) => completion(c),
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    let err = path_error(&e, &portal);
                    if let PathError::SessionLost(why) = &err {
                        if let Ok(mut f) = failed.lock() {
                            *f = Some(why.clone());
                        }
                    }
                    Err(err)
                }
            }
        })
    }

    fn task_management(
        &self,
        function: TmfFunction,
        lun: u64,
    ) -> BoxFuture<'static, Result<(), PathError>> {
        let session = self.session.clone();
        let portal = self.info.portal.clone();
        Box::pin(async move {
            session
                .task_management(function, lun)
                .await
                .map_err(|e| match e {
                    initiator::Error::TaskManagement(r) => PathError::Refused(r),
                    other => path_error(&other, &portal),
                })
        })
    }

    fn quiesce(&self) -> BoxFuture<'static, ()> {
        let gate = self.gate.clone();
        Box::pin(async move { gate.quiesce().await })
    }

    fn resume(&self) {
        self.gate.resume();
    }

    fn export_state(&self) -> SessionState {
        SessionState {
            initiator_name: self.info.initiator_name.clone(),
            isid: self.info.isid.clone(),
            target: self.info.target.clone(),
            portal: self.info.portal.clone(),
            stats: self.stats(),
        }
    }

    fn health(&self) -> Health {
        match self.failed.lock().ok().and_then(|f| f.clone()) {
            Some(why) => Health::Failed(why),
            None => Health::Up,
        }
    }

    fn stats(&self) -> PathStats {
        let s = self.session.stats();
        PathStats {
            commands: s.commands,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
            errors: self.errors.load(Ordering::Relaxed),
            recoveries: s.recoveries,
        }
    }

    fn close(&self) -> BoxFuture<'static, Result<(), PathError>> {
        let first = match self.closed.lock() {
            Ok(mut c) => !std::mem::replace(&mut *c, true),
            Err(_) => false,
        };
        if first {
            self.in_use.fetch_sub(1, Ordering::Relaxed);
        }
        let session = self.session.clone();
        let portal = self.info.portal.clone();
        Box::pin(async move {
            if !first {
                return Ok(());
            }
            match session.logout().await {
                Ok(()) | Err(initiator::Error::Closed) => Ok(()),
                Err(e) => Err(path_error(&e, &portal)),
            }
        })
    }
}
