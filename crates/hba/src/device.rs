//! The adapter process: a software model of an iSCSI offload HBA.
//!
//! [`serve`] listens on a unix socket (mode 0600). Each connection begins with a hello; a
//! control connection then allocates, programs and releases virtual functions, asks for
//! status, probes portals, sends heartbeats and injects faults (`control`); a connection
//! whose hello names a programmed VF becomes that VF's command queue (`queue`).
//!
//! Each programmed VF owns one `initiator::Session`, logged in with the VF's identity by the
//! adapter itself: the host never sees the iSCSI traffic. VFs are allocated to the control
//! connection that asked for them and freed when it closes, as a function-level reset frees
//! a real adapter's functions when its driver goes away.
//!
//! Faults ([`Fault`]): `crash` exits the process; `hang` stops answering anything but
//! `recover` (commands in flight are held: their sessions are dropped so that the target can
//! give the identities to another path, and they are re-issued if the driver is still there
//! after `recover`); `link-down` drops every session and fails commands with
//! [`FailCode::LINK_DOWN`] until `link-up` or `recover`, when the VFs log in again.

mod control;
mod queue;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use datapath::{InitiatorClient, PathError};
use initiator::Session;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch, Notify};

use crate::protocol::{
    AdapterStatus, AdapterSummary, ControlError, Event, Fault, VfState, VfStats, VfStatus,
    PROTOCOL_VERSION,
};

/// The adapter's model name.
pub const MODEL: &str = "viscsi reference offload adapter";

/// The "firmware" version: this crate's.
pub const FIRMWARE: &str = env!("CARGO_PKG_VERSION");

/// Most virtual functions an adapter may have.
pub const MAX_VFS: u32 = 1024;

/// Exit code of the `crash` fault.
pub const CRASH_EXIT_CODE: i32 = 101;

/// How the adapter process is set up.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// The unix socket to listen on (created with mode 0600; a stale one is replaced).
    pub socket: PathBuf,
    /// The adapter's name (`hba0`).
    pub name: String,
    /// Number of virtual functions.
    pub vfs: u32,
}

/// Why the adapter could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket {} is in use by a running adapter", .0.display())]
    InUse(PathBuf),
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
}

impl DeviceConfig {
    fn validate(&self) -> Result<(), DeviceError> {
        if self.vfs == 0 || self.vfs > MAX_VFS {
            return Err(DeviceError::Config(format!(
                "the number of VFs must be from 1 to {MAX_VFS}"
            )));
        }
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(DeviceError::Config(
                "the name must be 1 to 64 characters of a-z, 0-9, '-', '_' and '.'".into(),
            ));
        }
        Ok(())
    }
}

/// How the adapter runs (beyond what it is).
#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    /// Busy-poll while commands are in flight (and [`POLL_LINGER`] after), as adapter
    /// firmware polls its rings: responses and new commands are picked up without waiting to
    /// be woken. Measured on two cores: about a tenth more IOPS for 4 KiB reads at QD32 when
    /// the host is otherwise idle, a sixth less when other work competes for the CPUs (the
    /// polling takes their time). Off by default.
    pub poll: bool,
}

/// Runs the adapter until SIGTERM or SIGINT (or a `crash` fault, which exits the process).
pub async fn serve(config: DeviceConfig) -> Result<(), DeviceError> {
    serve_with(config, DeviceOptions::default(), wait_for_signal()).await
}

/// [`serve`] with options.
pub async fn serve_options(
    config: DeviceConfig,
    options: DeviceOptions,
) -> Result<(), DeviceError> {
    serve_with(config, options, wait_for_signal()).await
}

/// Runs the adapter until `shutdown` completes. The `crash` fault still exits the process.
pub async fn serve_until(
    config: DeviceConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DeviceError> {
    serve_with(config, DeviceOptions::default(), shutdown).await
}

/// [`serve_until`] with options.
pub async fn serve_with(
    config: DeviceConfig,
    options: DeviceOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DeviceError> {
    config.validate()?;
    let listener = bind(&config.socket).await?;
    let device = Device::new(&config);
    tracing::info!(
        adapter = %config.name,
        socket = %config.socket.display(),
        vfs = config.vfs,
        "reference offload adapter listening"
    );
    let poller = options
        .poll
        .then(|| tokio::spawn(device.poller.clone().run()));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let device = device.clone();
                    tokio::spawn(async move { control::serve_connection(device, stream).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    tracing::info!(adapter = %config.name, "shutting down");
    let _ = device.events.send(Event::ShuttingDown);
    device.release_all().await;
    if let Some(p) = poller {
        p.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Binds `path` with mode 0600 from the first moment: the socket is bound under a
/// temporary name, restricted, then renamed into place. A stale socket (nobody listening)
/// is replaced; a live one or anything that is not a socket is left alone.
async fn bind(path: &Path) -> Result<UnixListener, DeviceError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let sock_err = |source| DeviceError::Socket {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(DeviceError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(sock_err)?;
        }
        Ok(_) => return Err(DeviceError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| DeviceError::Config(format!("{} is not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(sock_err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(sock_err(e));
    }
    Ok(listener)
}

/// The adapter's state, shared by every connection.
pub(crate) struct Device {
    name: String,
    vfs: Vec<Arc<Vf>>,
    link_up: watch::Sender<bool>,
    hung: watch::Sender<bool>,
    events: broadcast::Sender<Event>,
    next_connection: AtomicU64,
    poller: Arc<Poller>,
}

/// How long a polling adapter keeps polling after its last command completed.
pub const POLL_LINGER: Duration = Duration::from_micros(200);

/// Busy-polling while commands are in flight ([`DeviceOptions::poll`]). An idle adapter
/// sleeps.
#[derive(Default)]
pub(crate) struct Poller {
    in_flight: AtomicUsize,
    work: Notify,
}

impl Poller {
    pub(crate) fn started(&self) {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) == 0 {
            self.work.notify_one();
        }
    }

    pub(crate) fn ended(&self, commands: usize) {
        self.in_flight.fetch_sub(commands, Ordering::Relaxed);
    }

    /// Keeps the runtime polling (each yield polls the I/O driver) while commands are in
    /// flight, and for [`POLL_LINGER`] after the last one (the next ones usually follow).
    async fn run(self: Arc<Self>) {
        let mut busy_at = tokio::time::Instant::now();
        loop {
            let work = self.work.notified();
            tokio::pin!(work);
            work.as_mut().enable();
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                busy_at = tokio::time::Instant::now();
            } else if busy_at.elapsed() > POLL_LINGER {
                work.await;
                busy_at = tokio::time::Instant::now();
                continue;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// One virtual function.
pub(crate) struct Vf {
    index: u32,
    inner: Mutex<VfInner>,
    /// One login at a time.
    login: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct VfInner {
    /// Bumped whenever the VF is allocated or freed, so that work for a former owner can
    /// tell it is stale.
    generation: u64,
    /// The control connection that allocated it, and the owner's name.
    owner: Option<(u64, String)>,
    client: Option<Arc<InitiatorClient>>,
    portal: Option<String>,
    /// Logging in (program or re-login).
    logging_in: bool,
    session: Option<Session>,
    /// Bumped with every login, so that a failure of a former session does not drop the
    /// current one.
    session_epoch: u64,
    queue: Option<Arc<queue::QueueShared>>,
    stats: VfStats,
}

impl VfInner {
    fn state(&self) -> VfState {
        match (&self.owner, &self.client) {
            (None, _) => VfState::Free,
            (Some(_), None) => VfState::Allocated,
            _ if self.session.is_some() => VfState::LoggedIn,
            _ if self.logging_in => VfState::LoggingIn,
            _ => VfState::Down,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Device {
    fn new(config: &DeviceConfig) -> Arc<Device> {
        Arc::new(Device {
            name: config.name.clone(),
            vfs: (0..config.vfs)
                .map(|index| {
                    Arc::new(Vf {
                        index,
                        inner: Mutex::new(VfInner::default()),
                        login: tokio::sync::Mutex::new(()),
                    })
                })
                .collect(),
            link_up: watch::Sender::new(true),
            hung: watch::Sender::new(false),
            events: broadcast::channel(16).0,
            next_connection: AtomicU64::new(1),
            poller: Arc::default(),
        })
    }

    fn connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    fn is_link_up(&self) -> bool {
        *self.link_up.borrow()
    }

    /// Returns at once unless the adapter is hung; then when it recovers.
    async fn wait_not_hung(&self) {
        if !*self.hung.borrow() {
            return;
        }
        let mut rx = self.hung.subscribe();
        let _ = rx.wait_for(|hung| !hung).await;
    }

    fn vf(&self, index: u32) -> Result<&Arc<Vf>, ControlError> {
        self.vfs
            .get(index as usize)
            .ok_or_else(|| ControlError::BadVf(format!("no VF {index} on {}", self.name)))
    }

    fn summary(&self) -> AdapterSummary {
        AdapterSummary {
            name: self.name.clone(),
            model: MODEL.into(),
            firmware: FIRMWARE.into(),
            protocol: PROTOCOL_VERSION,
            vfs_total: self.vfs.len() as u32,
            vfs_in_use: self.vfs_in_use(),
            link_up: self.is_link_up(),
        }
    }

    fn vfs_in_use(&self) -> u32 {
        self.vfs
            .iter()
            .filter(|vf| lock(&vf.inner).owner.is_some())
            .count() as u32
    }

    fn status(&self) -> AdapterStatus {
        let vfs = self
            .vfs
            .iter()
            .map(|vf| {
                let inner = lock(&vf.inner);
                let mut stats = inner.stats.clone();
                stats.in_flight = inner.queue.as_ref().map_or(0, |q| q.in_flight() as u64);
                if let Some(s) = &inner.session {
                    stats.recoveries = s.stats().recoveries;
                }
                VfStatus {
                    index: vf.index,
                    state: inner.state(),
                    owner: inner.owner.as_ref().map(|(_, o)| o.clone()),
                    target: inner.client.as_ref().map(|c| c.target.clone()),
                    portal: inner.portal.clone(),
                    isid: inner.client.as_ref().map(|c| c.isid.clone()),
                    queue_open: inner.queue.is_some(),
                    stats,
                }
            })
            .collect();
        AdapterStatus {
            adapter: self.summary(),
            vfs,
        }
    }

    fn alloc_vf(&self, connection: u64, owner: String) -> Result<u32, ControlError> {
        for vf in &self.vfs {
            let mut inner = lock(&vf.inner);
            if inner.owner.is_none() {
                inner.generation += 1;
                inner.owner = Some((connection, owner));
                inner.stats = VfStats::default();
                return Ok(vf.index);
            }
        }
        Err(ControlError::NoCapacity(self.name.clone()))
    }

    /// Programs an allocated VF with `client` and logs it in. On failure the VF is freed.
    async fn program_vf(
        &self,
        connection: u64,
        index: u32,
        client: InitiatorClient,
    ) -> Result<crate::protocol::Programmed, ControlError> {
        let vf = self.vf(index)?.clone();
        check_secrets(&client)?;
        let generation = {
            let mut inner = lock(&vf.inner);
            if inner.owner.as_ref().map(|(c, _)| *c) != Some(connection) {
                return Err(ControlError::BadVf(format!(
                    "VF {index} is not allocated to this connection"
                )));
            }
            if inner.client.is_some() {
                return Err(ControlError::BadVf(format!(
                    "VF {index} is already programmed"
                )));
            }
            inner.client = Some(Arc::new(client.clone()));
            inner.generation
        };
        let result = match self.login(&vf, generation).await {
            Ok((session, _)) => {
                let inner = lock(&vf.inner);
                let params = session.params();
                Ok(crate::protocol::Programmed {
                    portal: inner.portal.clone().unwrap_or_default(),
                    header_digest: params.header_digest,
                    data_digest: params.data_digest,
                })
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            tracing::info!(adapter = %self.name, vf = index, error = %e, "VF login failed; VF freed");
            self.free_vf(&vf, generation).await;
        } else {
            tracing::info!(adapter = %self.name, vf = index, target = %client.target, "VF programmed and logged in");
        }
        result
    }

    /// Logs the VF in (unless it already is), once at a time. Stale when the VF was freed
    /// or reprogrammed since `generation`.
    async fn login(&self, vf: &Arc<Vf>, generation: u64) -> Result<(Session, u64), ControlError> {
        let _one = vf.login.lock().await;
        let client = {
            let mut inner = lock(&vf.inner);
            if inner.generation != generation {
                return Err(ControlError::BadVf(format!("VF {} was released", vf.index)));
            }
            if let Some(s) = &inner.session {
                return Ok((s.clone(), inner.session_epoch));
            }
            let Some(client) = inner.client.clone() else {
                return Err(ControlError::BadVf(format!(
                    "VF {} is not programmed",
                    vf.index
                )));
            };
            inner.logging_in = true;
            client
        };
        let result = if self.is_link_up() {
            datapath::software::connect_client(&client).await
        } else {
            Err(PathError::PathFailed("link down".into()))
        };
        let mut inner = lock(&vf.inner);
        inner.logging_in = false;
        match result {
            Ok((session, portal)) => {
                if inner.generation != generation || !self.is_link_up() || *self.hung.borrow() {
                    drop(inner);
                    // Freed, or the port went down, while logging in.
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
                    });
                    return Err(ControlError::LinkDown);
                }
                inner.portal = Some(portal);
                inner.session = Some(session.clone());
                inner.session_epoch += 1;
                Ok((session, inner.session_epoch))
            }
            Err(PathError::Auth { portal }) => Err(ControlError::Auth { portal }),
            Err(PathError::Unreachable(why)) => Err(ControlError::Unreachable(why)),
            Err(PathError::Client(e)) => Err(ControlError::Client(e.to_string())),
            Err(PathError::PathFailed(_)) => Err(ControlError::LinkDown),
            Err(other) => Err(ControlError::Refused(other.to_string())),
        }
    }

    /// Frees a VF if it is still at `generation`: closes its queue (commands fail with
    /// CLOSED), logs its session out.
    async fn free_vf(&self, vf: &Vf, generation: u64) {
        let (session, queue) = {
            let mut inner = lock(&vf.inner);
            if inner.generation != generation {
                return;
            }
            let session = inner.session.take();
            let queue = inner.queue.take();
            *inner = VfInner {
                generation: generation + 1,
                ..VfInner::default()
            };
            (session, queue)
        };
        if let Some(q) = queue {
            q.close("VF released");
        }
        if let Some(s) = session {
            let _ = tokio::time::timeout(Duration::from_secs(2), s.logout()).await;
        }
    }

    async fn release_vf(&self, connection: u64, index: u32) -> Result<(), ControlError> {
        let vf = self.vf(index)?.clone();
        let generation = {
            let inner = lock(&vf.inner);
            if inner.owner.as_ref().map(|(c, _)| *c) != Some(connection) {
                return Err(ControlError::BadVf(format!(
                    "VF {index} is not allocated to this connection"
                )));
            }
            inner.generation
        };
        self.free_vf(&vf, generation).await;
        tracing::info!(adapter = %self.name, vf = index, "VF released");
        Ok(())
    }

    /// Frees every VF of a control connection that went away.
    async fn release_owned_by(&self, connection: u64) {
        for vf in &self.vfs {
            let generation = {
                let inner = lock(&vf.inner);
                match &inner.owner {
                    Some((c, _)) if *c == connection => inner.generation,
                    _ => continue,
                }
            };
            tracing::info!(adapter = %self.name, vf = vf.index, "driver connection closed; VF freed");
            self.free_vf(vf, generation).await;
        }
    }

    async fn release_all(&self) {
        for vf in &self.vfs {
            let generation = lock(&vf.inner).generation;
            self.free_vf(vf, generation).await;
        }
    }

    /// Drops every VF's session (without a logout: the port is down or the adapter hung).
    /// Commands in flight fail with LINK_DOWN (`hold == false`) or are held for later.
    fn drop_sessions(&self, hold: bool) {
        for vf in &self.vfs {
            let (session, queue) = {
                let mut inner = lock(&vf.inner);
                (inner.session.take(), inner.queue.clone())
            };
            if let Some(q) = queue {
                q.interrupt(hold);
            }
            drop(session);
        }
    }

    /// Logs every programmed VF in again (after the link came back).
    fn relogin_all(self: &Arc<Self>) {
        for vf in &self.vfs {
            let generation = {
                let inner = lock(&vf.inner);
                if inner.client.is_none() || inner.session.is_some() {
                    continue;
                }
                inner.generation
            };
            let device = self.clone();
            let vf = vf.clone();
            tokio::spawn(async move {
                if let Err(e) = device.login(&vf, generation).await {
                    tracing::info!(adapter = %device.name, vf = vf.index, error = %e, "VF could not log in again");
                }
            });
        }
    }

    fn inject(self: &Arc<Self>, fault: Fault) {
        tracing::warn!(adapter = %self.name, %fault, "fault injected");
        match fault {
            // The control connection exits after its reply is written.
            Fault::Crash => {}
            Fault::Hang => {
                self.hung.send_replace(true);
                self.drop_sessions(true);
            }
            Fault::LinkDown => {
                if self.link_up.send_replace(false) {
                    self.drop_sessions(false);
                    let _ = self.events.send(Event::LinkDown);
                }
            }
            Fault::LinkUp | Fault::Recover => {
                let was_hung = self.hung.send_replace(false);
                let was_down = !self.link_up.send_replace(true);
                if was_down {
                    let _ = self.events.send(Event::LinkUp);
                }
                if was_down || was_hung {
                    self.relogin_all();
                }
            }
        }
    }
}

/// The adapter takes secrets as values only: it reads no files or environment of the host.
fn check_secrets(client: &InitiatorClient) -> Result<(), ControlError> {
    let Some(chap) = &client.chap else {
        return Ok(());
    };
    let is_value = |s: &datapath::Secret| matches!(s, datapath::Secret::Value(_));
    if !is_value(&chap.secret) || chap.target_secret.as_ref().is_some_and(|s| !is_value(s)) {
        return Err(ControlError::Client(
            "initiator client: chap: the adapter takes secrets as values (resolve them on the host)"
                .into(),
        ));
    }
    Ok(())
}
