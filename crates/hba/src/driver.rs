//! The host side: the adapter driver.
//!
//! [`HbaAdapter::connect`] opens the adapter's control connection and implements
//! [`datapath::Adapter`] over it: [`open`](datapath::Adapter::open) allocates a virtual
//! function, programs it with the VM's identity (the adapter logs in) and opens the VF's
//! command queue, giving an [`OffloadPath`] that implements [`datapath::DataPath`].
//!
//! Health: a heartbeat goes out every [`DriverOptions::heartbeat_interval`]; when nothing at
//! all (pong, reply, completion) arrived from the adapter for
//! [`DriverOptions::heartbeat_timeout`], and still nothing after a short grace that lets this
//! process read what may be waiting (it may have been held up itself), the adapter hung.
//! The end of the control connection means it crashed; a link-down event means its port is down. Any of
//! these turns the adapter's health to [`AdapterHealth::Failed`] for good: every command in
//! flight on its paths fails at once with [`PathError::PathFailed`] (the caller re-issues it
//! on another path), new ones fail the same way, and the driver closes its connections (so
//! the adapter, if it still runs, frees the VFs and their sessions). A failed adapter is not
//! revived: connect again.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datapath::{
    Adapter, AdapterHealth, AdapterInfo, AdapterKind, BoxFuture, ClientError, Command, Completion,
    DataIn, DataPath, Gate, Health, InitiatorClient, PathError, PathInfo, PathStats, Residual,
    Secret, SessionState, Status, TmfFunction,
};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use crate::protocol::{
    write_message, AdapterStatus, AdapterSummary, Complete, CompleteShm, ControlError,
    ControlReply, ControlRequest, Event, Fail, FailCode, Fault, FrameBuffer, FrameReader, Hello,
    Message, Programmed, Reply, Request, Submit, TaskMgmt, TaskMgmtDone, FRAME_HEADER, MAX_CDB,
    MAX_FRAME, PROTOCOL_VERSION,
};
use crate::shm::{Buffer, Pool, Region, REGION_SIZE};

/// Timing of the driver.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Time between heartbeats (100 ms).
    pub heartbeat_interval: Duration,
    /// Nothing at all from the adapter (pongs, replies, events, completions) for this long
    /// means it hung (500 ms).
    pub heartbeat_timeout: Duration,
    /// Bound on the hello of a new connection (2 s).
    pub hello_timeout: Duration,
    /// Bound on control requests other than programming a VF (10 s).
    pub request_timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(500),
            hello_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the driver could not talk to an adapter. One line, no secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    #[error("cannot connect to adapter socket {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} does not speak the viscsi adapter protocol: {why}", socket.display())]
    NotAnAdapter { socket: PathBuf, why: String },
    #[error("adapter at {}: {why}", socket.display())]
    Version { socket: PathBuf, why: String },
    #[error("adapter at {} did not answer within {} ms", socket.display(), timeout.as_millis())]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("adapter at {} closed the connection", socket.display())]
    Closed { socket: PathBuf },
    #[error("adapter at {} refused: {error}", socket.display())]
    Refused {
        socket: PathBuf,
        error: ControlError,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh connection after its hello.
struct Connection {
    reader: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    adapter: AdapterSummary,
    /// A queue's shared memory, if the adapter took it.
    pool: Option<Arc<Pool>>,
}

/// Sends `bytes` with `fd` attached (SCM_RIGHTS).
async fn send_with_fd(stream: &mut UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let sent = loop {
        stream.writable().await?;
        let result = stream.try_io(Interest::WRITABLE, || {
            let mut space = [0u8; rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [fd];
            control.push(SendAncillaryMessage::ScmRights(&fds));
            Ok(rustix::net::sendmsg(
                &*stream,
                &[io::IoSlice::new(bytes)],
                &mut control,
                SendFlags::NOSIGNAL,
            )?)
        });
        match result {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    stream.write_all(&bytes[sent..]).await
}

/// The id of every hello.
const HELLO_ID: u64 = 0;

/// Connects to `socket` and says hello (as a control connection, or as VF `queue`'s queue).
async fn handshake(
    socket: &Path,
    client: &str,
    queue: Option<u32>,
    shm: Option<(Region, OwnedFd)>,
    timeout: Duration,
) -> Result<Connection, DriverError> {
    let socket_owned = || socket.to_owned();
    let work = async {
        let mut stream =
            UnixStream::connect(socket)
                .await
                .map_err(|source| DriverError::Connect {
                    socket: socket_owned(),
                    source,
                })?;
        if queue.is_some() {
            crate::protocol::size_queue_socket(&stream);
        }
        let mut hello = Hello::new(client, queue);
        hello.shm = shm.as_ref().map(|(r, _)| r.len());
        let hello = Message::Request(ControlRequest {
            id: HELLO_ID,
            request: Request::Hello(hello),
        });
        let closed = || DriverError::Closed {
            socket: socket_owned(),
        };
        let (region, fd) = match shm {
            Some((r, fd)) => (Some(r), Some(fd)),
            None => (None, None),
        };
        match &fd {
            Some(fd) => send_with_fd(&mut stream, &hello.to_frame_bytes(), fd.as_fd()).await,
            None => write_message(&mut stream, &hello).await,
        }
        .map_err(|_| closed())?;
        drop(fd);
        let (r, writer) = stream.into_split();
        let mut reader = FrameReader::new(r);
        let not_adapter = |why: String| DriverError::NotAnAdapter {
            socket: socket_owned(),
            why,
        };
        let reply = match reader.next_message().await {
            Ok(Some(Message::Reply(r))) if r.id == HELLO_ID => r.result,
            Ok(Some(other)) => {
                return Err(not_adapter(format!(
                    "unexpected answer to the hello ({})",
                    other.name()
                )))
            }
            Ok(None) => return Err(closed()),
            Err(crate::protocol::ReadError::Protocol(e)) => return Err(not_adapter(e.to_string())),
            Err(crate::protocol::ReadError::Io(e)) => return Err(not_adapter(e.to_string())),
        };
        match reply {
            Ok(Reply::Hello {
                protocol,
                adapter,
                shm,
            }) if protocol == PROTOCOL_VERSION => Ok(Connection {
                reader,
                writer,
                adapter,
                pool: region.filter(|_| shm).map(Pool::new),
            }),
            Ok(Reply::Hello { protocol, .. }) => Err(DriverError::Version {
                socket: socket_owned(),
                why: format!(
                    "the adapter speaks protocol version {protocol}, this driver {PROTOCOL_VERSION}"
                ),
            }),
            Ok(_) => Err(not_adapter("unexpected answer to the hello".into())),
            Err(ControlError::Version(why)) => Err(DriverError::Version {
                socket: socket_owned(),
                why,
            }),
            Err(error) => Err(DriverError::Refused {
                socket: socket_owned(),
                error,
            }),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(DriverError::Timeout {
                socket: socket.to_owned(),
                timeout,
            })
        })
}

/// How long tools wait for the adapter.
const TOOL_TIMEOUT: Duration = Duration::from_secs(3);

/// One request on a fresh control connection (for tools: status, faults).
async fn one_request(socket: &Path, request: Request) -> Result<Reply, DriverError> {
    let timeout = TOOL_TIMEOUT;
    let mut c = handshake(socket, "viscsi hba", None, None, timeout).await?;
    let id = 1;
    write_message(
        &mut c.writer,
        &Message::Request(ControlRequest { id, request }),
    )
    .await
    .map_err(|_| DriverError::Closed {
        socket: socket.to_owned(),
    })?;
    let wait = async {
        loop {
            match c.reader.next_message().await {
                Ok(Some(Message::Reply(r))) if r.id == id => {
                    return r.result.map_err(|error| DriverError::Refused {
                        socket: socket.to_owned(),
                        error,
                    })
                }
                Ok(Some(Message::Event(_))) => continue,
                Ok(Some(other)) => {
                    return Err(DriverError::NotAnAdapter {
                        socket: socket.to_owned(),
                        why: format!("unexpected {}", other.name()),
                    })
                }
                Ok(None) => {
                    return Err(DriverError::Closed {
                        socket: socket.to_owned(),
                    })
                }
                Err(e) => {
                    return Err(DriverError::NotAnAdapter {
                        socket: socket.to_owned(),
                        why: e.to_string(),
                    })
                }
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or_else(|_| {
            Err(DriverError::Timeout {
                socket: socket.to_owned(),
                timeout,
            })
        })
}

/// Tells the adapter at `socket` to have `fault` (see [`Fault`]).
pub async fn inject_fault(socket: &Path, fault: Fault) -> Result<(), DriverError> {
    match one_request(socket, Request::Fault { fault }).await {
        Ok(_) => Ok(()),
        // The adapter may be gone before its answer is read.
        Err(DriverError::Closed { .. }) if fault == Fault::Crash => Ok(()),
        Err(e) => Err(e),
    }
}

/// The adapter's and every VF's state.
pub async fn adapter_status(socket: &Path) -> Result<AdapterStatus, DriverError> {
    match one_request(socket, Request::Status).await? {
        Reply::Status(s) => Ok(s),
        _ => Err(DriverError::NotAnAdapter {
            socket: socket.to_owned(),
            why: "unexpected answer to a status request".into(),
        }),
    }
}

/// Why a control request got no answer.
enum RequestError {
    Control(ControlError),
    /// The adapter failed (the reason).
    Failed(String),
    Timeout,
}

impl RequestError {
    fn into_path_error(self, adapter: &str) -> PathError {
        match self {
            RequestError::Control(e) => match e {
                ControlError::Auth { portal } => PathError::Auth { portal },
                ControlError::Unreachable(why) => PathError::Unreachable(why),
                ControlError::NoCapacity(name) => PathError::NoCapacity(name),
                ControlError::LinkDown => {
                    PathError::PathFailed(format!("adapter {adapter}: link down"))
                }
                other => PathError::Refused(other.to_string()),
            },
            RequestError::Failed(why) => PathError::PathFailed(why),
            RequestError::Timeout => {
                PathError::PathFailed(format!("adapter {adapter} did not answer"))
            }
        }
    }
}

#[derive(Default)]
struct Pending {
    replies: HashMap<u64, oneshot::Sender<Result<Reply, ControlError>>>,
    failed: Option<String>,
}

struct AdapterShared {
    name: String,
    socket: PathBuf,
    options: DriverOptions,
    out: mpsc::UnboundedSender<Message>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    summary: Mutex<AdapterSummary>,
    health: watch::Sender<AdapterHealth>,
    paths: Mutex<Vec<Weak<PathShared>>>,
    tasks: Mutex<Vec<AbortHandle>>,
    /// When the driver connected; `heard` counts from it.
    connected: Instant,
    /// When something last arrived from the adapter, in microseconds since `connected`.
    last_heard: AtomicU64,
}

impl Drop for AdapterShared {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

impl AdapterShared {
    /// Something arrived from the adapter.
    fn heard(&self) {
        let us = self.connected.elapsed().as_micros() as u64;
        self.last_heard.fetch_max(us, Ordering::Relaxed);
    }

    /// How long nothing arrived from the adapter.
    fn silent_for(&self) -> Duration {
        let last = Duration::from_micros(self.last_heard.load(Ordering::Relaxed));
        self.connected.elapsed().saturating_sub(last)
    }

    fn failed(&self) -> Option<String> {
        lock(&self.pending).failed.clone()
    }

    async fn request(&self, request: Request, timeout: Duration) -> Result<Reply, RequestError> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut p = lock(&self.pending);
            if let Some(why) = &p.failed {
                return Err(RequestError::Failed(why.clone()));
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            p.replies.insert(id, tx);
            id
        };
        if self
            .out
            .send(Message::Request(ControlRequest { id, request }))
            .is_err()
        {
            lock(&self.pending).replies.remove(&id);
            return Err(RequestError::Failed(self.failed().unwrap_or_else(|| {
                format!("adapter {}: control connection closed", self.name)
            })));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result.map_err(RequestError::Control),
            Ok(Err(_)) => Err(RequestError::Failed(
                self.failed()
                    .unwrap_or_else(|| format!("adapter {} failed", self.name)),
            )),
            Err(_) => {
                lock(&self.pending).replies.remove(&id);
                Err(RequestError::Timeout)
            }
        }
    }

    /// A request whose answer nobody waits for.
    fn send(&self, request: Request) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .out
            .send(Message::Request(ControlRequest { id, request }));
    }

    fn deliver(&self, reply: ControlReply) {
        if let Some(tx) = lock(&self.pending).replies.remove(&reply.id) {
            let _ = tx.send(reply.result);
        }
    }

    /// The adapter failed: health, every path's commands, the connections. Once.
    fn fail(&self, why: String) {
        let replies = {
            let mut p = lock(&self.pending);
            if p.failed.is_some() {
                return;
            }
            p.failed = Some(why.clone());
            std::mem::take(&mut p.replies)
        };
        tracing::warn!(adapter = %self.name, reason = %why, "offload adapter failed");
        self.health.send_replace(AdapterHealth::Failed(why.clone()));
        drop(replies);
        let paths: Vec<Arc<PathShared>> = lock(&self.paths)
            .drain(..)
            .filter_map(|p| p.upgrade())
            .collect();
        for p in paths {
            p.fail_all(PathError::PathFailed(why.clone()));
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

async fn control_reader(weak: Weak<AdapterShared>, mut reader: FrameReader<OwnedReadHalf>) {
    loop {
        let message = reader.next_message().await;
        let Some(a) = weak.upgrade() else { return };
        match message {
            Ok(Some(Message::Reply(r))) => {
                a.heard();
                if let Ok(Reply::Pong {
                    vfs_in_use,
                    link_up,
                    ..
                }) = &r.result
                {
                    let mut s = lock(&a.summary);
                    s.vfs_in_use = *vfs_in_use;
                    s.link_up = *link_up;
                }
                a.deliver(r);
            }
            Ok(Some(Message::Event(Event::LinkDown))) => {
                a.fail(format!("adapter {}: link down", a.name));
                return;
            }
            Ok(Some(Message::Event(Event::LinkUp))) => a.heard(),
            Ok(Some(Message::Event(Event::ShuttingDown))) => {
                a.fail(format!("adapter {} is shutting down", a.name));
                return;
            }
            Ok(Some(other)) => {
                a.fail(format!(
                    "adapter {} broke the protocol: unexpected {} on the control connection",
                    a.name,
                    other.name()
                ));
                return;
            }
            Ok(None) => {
                a.fail(format!(
                    "adapter {} is gone (control connection closed)",
                    a.name
                ));
                return;
            }
            Err(e) => {
                a.fail(format!("adapter {}: control connection: {e}", a.name));
                return;
            }
        }
    }
}

async fn control_writer(
    weak: Weak<AdapterShared>,
    mut rx: mpsc::UnboundedReceiver<Message>,
    mut w: OwnedWriteHalf,
) {
    let mut buf = FrameBuffer::default();
    while let Some(m) = rx.recv().await {
        buf.queue(&m);
        while let Ok(m) = rx.try_recv() {
            buf.queue(&m);
        }
        if let Err(e) = buf.write_to(&mut w).await {
            if let Some(a) = weak.upgrade() {
                a.fail(format!("adapter {}: control connection: {e}", a.name));
            }
            return;
        }
    }
}

/// After the adapter seemed silent for too long, how long the readers get to take in what
/// may be waiting unread (if this process itself was held up) before the adapter counts as
/// hung.
const SILENCE_GRACE: Duration = Duration::from_millis(50);

/// Pings every `interval`; an adapter from which nothing at all (pong, reply, event,
/// completion) arrived for `timeout` hung.
async fn heartbeat(weak: Weak<AdapterShared>, interval: Duration, timeout: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tick.tick().await;
        let Some(a) = weak.upgrade() else { return };
        if a.failed().is_some() {
            return;
        }
        seq += 1;
        a.send(Request::Ping { seq });
        if a.silent_for() <= timeout {
            continue;
        }
        drop(a);
        tokio::time::sleep(SILENCE_GRACE).await;
        let Some(a) = weak.upgrade() else { return };
        if a.silent_for() > timeout {
            a.fail(format!(
                "adapter {} hung (no answer for {} ms)",
                a.name,
                timeout.as_millis()
            ));
            return;
        }
    }
}

/// The driver of one reference offload adapter.
pub struct HbaAdapter {
    shared: Arc<AdapterShared>,
}

impl HbaAdapter {
    /// Connects to the adapter at `socket` (hello with a timeout) and starts watching its
    /// health. A socket that is not an adapter, or one of another protocol version, is a
    /// one-line error.
    pub async fn connect(name: &str, socket: &Path) -> Result<Arc<HbaAdapter>, DriverError> {
        Self::connect_with(name, socket, DriverOptions::default()).await
    }

    /// [`connect`](Self::connect) with other timing.
    pub async fn connect_with(
        name: &str,
        socket: &Path,
        options: DriverOptions,
    ) -> Result<Arc<HbaAdapter>, DriverError> {
        let c = handshake(
            socket,
            &format!("driver {name}"),
            None,
            None,
            options.hello_timeout,
        )
        .await?;
        if c.adapter.name != name {
            tracing::info!(configured = %name, reported = %c.adapter.name, "adapter reports another name; using the configured one");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut summary = c.adapter;
        summary.name = name.to_owned();
        let shared = Arc::new(AdapterShared {
            name: name.to_owned(),
            socket: socket.to_owned(),
            options: options.clone(),
            out: tx,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            summary: Mutex::new(summary),
            health: watch::Sender::new(AdapterHealth::Ok),
            paths: Mutex::default(),
            tasks: Mutex::default(),
            connected: Instant::now(),
            last_heard: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&shared);
        let tasks = [
            tokio::spawn(control_reader(weak.clone(), c.reader)).abort_handle(),
            tokio::spawn(control_writer(weak.clone(), rx, c.writer)).abort_handle(),
            tokio::spawn(heartbeat(
                weak,
                options.heartbeat_interval,
                options.heartbeat_timeout,
            ))
            .abort_handle(),
        ];
        lock(&shared.tasks).extend(tasks);
        let adapter = Arc::new(HbaAdapter { shared });
        // A hung adapter still answers hellos (so that `recover` gets through); one heartbeat
        // tells whether it serves.
        match adapter
            .shared
            .request(Request::Ping { seq: 0 }, options.heartbeat_timeout)
            .await
        {
            Ok(Reply::Pong { .. }) => Ok(adapter),
            Err(RequestError::Timeout) => Err(DriverError::Timeout {
                socket: socket.to_owned(),
                timeout: options.heartbeat_timeout,
            }),
            _ => Err(DriverError::Closed {
                socket: socket.to_owned(),
            }),
        }
    }

    /// The adapter's socket.
    pub fn socket(&self) -> &Path {
        &self.shared.socket
    }

    /// The adapter's and every VF's state, as the adapter reports it.
    pub async fn status(&self) -> Result<AdapterStatus, PathError> {
        let a = &self.shared;
        match a.request(Request::Status, a.options.request_timeout).await {
            Ok(Reply::Status(s)) => Ok(s),
            Ok(_) => Err(PathError::Refused("unexpected answer".into())),
            Err(e) => Err(e.into_path_error(&a.name)),
        }
    }

    async fn open_path(&self, client: &InitiatorClient) -> Result<Arc<dyn DataPath>, PathError> {
        let a = &self.shared;
        if let Some(why) = a.failed() {
            return Err(PathError::PathFailed(why));
        }
        let client = resolve_secrets(client)?;
        client.validate()?;
        let vf = match a
            .request(
                Request::AllocVf {
                    owner: client.initiator_name.clone(),
                },
                a.options.request_timeout,
            )
            .await
        {
            Ok(Reply::Vf { vf }) => vf,
            Ok(_) => return Err(PathError::Refused("unexpected answer to alloc".into())),
            Err(e) => return Err(e.into_path_error(&a.name)),
        };
        let programmed = match a
            .request(
                Request::ProgramVf {
                    vf,
                    client: Box::new(client.clone()),
                },
                login_budget(&client),
            )
            .await
        {
            Ok(Reply::Programmed(p)) => p,
            Ok(_) => {
                a.send(Request::ReleaseVf { vf });
                return Err(PathError::Refused("unexpected answer to program".into()));
            }
            // The adapter freed the VF (except after a timeout: then it is released here).
            Err(e) => {
                if matches!(e, RequestError::Timeout) {
                    a.send(Request::ReleaseVf { vf });
                }
                return Err(e.into_path_error(&a.name));
            }
        };
        // Data-in comes through shared memory when it can be made; else the socket.
        let shm = Region::create(REGION_SIZE)
            .map_err(|e| tracing::debug!(error = %e, "no shared memory for the queue"))
            .ok();
        let queue = match handshake(
            &a.socket,
            &format!("driver {} VF {vf}", a.name),
            Some(vf),
            shm,
            a.options.hello_timeout,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                a.send(Request::ReleaseVf { vf });
                return Err(PathError::PathFailed(format!("VF {vf} queue: {e}")));
            }
        };
        let path = PathShared::start(
            a.clone(),
            vf,
            path_info(&a.name, vf, &client, programmed),
            queue,
        );
        lock(&a.paths).retain(|p| p.strong_count() > 0);
        lock(&a.paths).push(Arc::downgrade(&path));
        // Failed while the path was being set up: it fails too.
        if let Some(why) = a.failed() {
            path.fail_all(PathError::PathFailed(why));
        }
        Ok(Arc::new(OffloadPath { shared: path }))
    }
}

/// How long programming may take: every portal's connect and login, and some slack.
fn login_budget(client: &InitiatorClient) -> Duration {
    let per_portal = client
        .recovery
        .connect_timeout_ms
        .saturating_add(client.recovery.login_timeout_ms);
    Duration::from_millis(per_portal.saturating_mul(client.portals.len() as u64))
        + Duration::from_secs(5)
}

/// The client with its secrets as values: the adapter reads no files or environment of
/// the host.
fn resolve_secrets(client: &InitiatorClient) -> Result<InitiatorClient, PathError> {
    let mut c = client.clone();
    if let Some(chap) = &mut c.chap {
        let value = |s: &Secret| -> Result<Secret, ClientError> {
            String::from_utf8(s.resolve()?)
                .map(Secret::Value)
                .map_err(|_| ClientError::new("chap", "the secret is not UTF-8 text"))
        };
        chap.secret = value(&chap.secret)?;
        if let Some(t) = &chap.target_secret {
            chap.target_secret = Some(value(t)?);
        }
    }
    Ok(c)
}

fn path_info(adapter: &str, vf: u32, client: &InitiatorClient, p: Programmed) -> PathInfo {
    PathInfo {
        kind: AdapterKind::Offload,
        adapter: adapter.to_owned(),
        vf: Some(vf),
        portal: p.portal,
        target: client.target.clone(),
        initiator_name: client.initiator_name.clone(),
        isid: client.isid.clone(),
        header_digest: p.header_digest,
        data_digest: p.data_digest,
    }
}

impl Adapter for HbaAdapter {
    fn info(&self) -> AdapterInfo {
        let health = self.shared.health.borrow().clone();
        lock(&self.shared.summary).to_info(health)
    }

    fn watch_health(&self) -> watch::Receiver<AdapterHealth> {
        self.shared.health.subscribe()
    }

    fn reaches<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let a = &self.shared;
            matches!(
                a.request(
                    Request::Probe {
                        portal: portal.to_owned()
                    },
                    Duration::from_secs(3)
                )
                .await,
                Ok(Reply::Probe { reachable: true })
            )
        })
    }

    fn open<'a>(
        &'a self,
        client: &'a InitiatorClient,
        _state: Option<&'a SessionState>,
    ) -> BoxFuture<'a, Result<Arc<dyn DataPath>, PathError>> {
        // Continuing a session is logging in with the same identity (the target reinstates
        // it), which programming the VF with `client` does.
        Box::pin(self.open_path(client))
    }
}

// ---------------------------------------------------------------------------------------------
// The offload data path
// ---------------------------------------------------------------------------------------------

enum Waiter {
    Scsi {
        tx: oneshot::Sender<Result<Completion, PathError>>,
        written: u64,
        /// The data-in buffer in shared memory, if the command has one.
        buffer: Option<Buffer>,
    },
    Tmf(oneshot::Sender<Result<(), PathError>>),
}

impl Waiter {
    /// Fails the command. `answered`: the adapter answered it (so its buffer is free
    /// again); else the adapter may still write the buffer, which stays out of the pool.
    fn fail(self, e: PathError, answered: bool) {
        match self {
            Waiter::Scsi { tx, buffer, .. } => {
                if let (Some(b), false) = (buffer, answered) {
                    b.keep_out();
                }
                drop(tx.send(Err(e)))
            }
            Waiter::Tmf(tx) => drop(tx.send(Err(e))),
        }
    }
}

#[derive(Default)]
struct Waiters {
    map: HashMap<u64, Waiter>,
    /// Set once the path failed or closed: what every command gets from then on.
    failed: Option<PathError>,
}

#[derive(Default)]
struct Counters {
    commands: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

struct PathShared {
    adapter: Arc<AdapterShared>,
    vf: u32,
    info: PathInfo,
    gate: Gate,
    out: mpsc::UnboundedSender<Message>,
    waiters: Mutex<Waiters>,
    next_tag: AtomicU64,
    counters: Counters,
    closed: AtomicBool,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Shared memory for data-in, if the adapter took it.
    pool: Option<Arc<Pool>>,
}

impl Drop for PathShared {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            self.adapter.send(Request::ReleaseVf { vf: self.vf });
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

impl PathShared {
    fn start(adapter: Arc<AdapterShared>, vf: u32, info: PathInfo, c: Connection) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let path = Arc::new(PathShared {
            adapter,
            vf,
            info,
            gate: Gate::new(),
            out: tx,
            waiters: Mutex::default(),
            next_tag: AtomicU64::new(1),
            counters: Counters::default(),
            closed: AtomicBool::new(false),
            tasks: Mutex::default(),
            pool: c.pool,
        });
        let weak = Arc::downgrade(&path);
        let tasks = [
            tokio::spawn(queue_reader(weak.clone(), c.reader)).abort_handle(),
            tokio::spawn(queue_writer(weak, rx, c.writer)).abort_handle(),
        ];
        lock(&path.tasks).extend(tasks);
        path
    }

    /// Every waiting command fails with `e`, and so does every later one; the queue closes.
    fn fail_all(&self, e: PathError) {
        let waiting = {
            let mut w = lock(&self.waiters);
            if w.failed.is_none() {
                w.failed = Some(e.clone());
            }
            std::mem::take(&mut w.map)
        };
        if !waiting.is_empty() {
            tracing::debug!(vf = self.vf, commands = waiting.len(), error = %e, "failing commands in flight");
        }
        for (_, waiter) in waiting {
            if matches!(waiter, Waiter::Scsi { .. }) {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            waiter.fail(e.clone(), false);
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    fn take(&self, tag: u64) -> Option<Waiter> {
        lock(&self.waiters).map.remove(&tag)
    }

    fn complete(&self, c: Complete) {
        let mut data = DataIn::new();
        for segment in c.data {
            data.push(segment);
        }
        // A buffer the adapter did not use goes back to the pool.
        self.completed(c.tag, c.status, c.sense, c.residual, |_| Ok(data));
    }

    fn complete_shm(&self, c: CompleteShm) {
        let len = c.data_len as usize;
        self.completed(c.tag, c.status, c.sense, c.residual, |buffer| {
            let mut data = DataIn::new();
            if len > 0 {
                match buffer.and_then(|b| b.into_bytes(len)) {
                    Some(bytes) => data.push(bytes),
                    None => {
                        return Err(PathError::PathFailed(format!(
                            "adapter {}: data-in of {len} bytes outside the command's buffer",
                            self.info.adapter
                        )))
                    }
                }
            }
            Ok(data)
        });
    }

    /// Completes command `tag` (once) with the data `data` makes of its buffer.
    fn completed(
        &self,
        tag: u64,
        status: u8,
        sense: Bytes,
        residual: Residual,
        data: impl FnOnce(Option<Buffer>) -> Result<DataIn, PathError>,
    ) {
        match self.take(tag) {
            Some(Waiter::Scsi {
                tx,
                written,
                buffer,
            }) => {
                let result = data(buffer).map(|data| {
                    let k = &self.counters;
                    k.commands.fetch_add(1, Ordering::Relaxed);
                    k.bytes_read.fetch_add(data.len() as u64, Ordering::Relaxed);
                    k.bytes_written.fetch_add(written, Ordering::Relaxed);
                    Completion {
                        status: Status(status),
                        sense,
                        data,
                        residual,
                    }
                });
                if result.is_err() {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                let _ = tx.send(result);
            }
            Some(Waiter::Tmf(tx)) => {
                let _ = tx.send(Err(PathError::Refused(
                    "the adapter completed a task management request as a command".into(),
                )));
            }
            // Already failed (the path or adapter failed first): completed only once.
            None => {}
        }
    }

    fn error_of(&self, code: FailCode, reason: String) -> PathError {
        match code {
            FailCode::SESSION_LOST => PathError::SessionLost(reason),
            FailCode::TARGET_FAILURE => PathError::TargetFailure,
            FailCode::REFUSED => PathError::Refused(reason),
            FailCode::CLOSED if self.closed.load(Ordering::Relaxed) => PathError::Closed,
            FailCode::LINK_DOWN => {
                PathError::PathFailed(format!("adapter {}: link down", self.info.adapter))
            }
            _ => PathError::PathFailed(format!(
                "adapter {} VF {}: {reason}",
                self.info.adapter, self.vf
            )),
        }
    }

    fn failed_one(&self, f: Fail) {
        if let Some(w) = self.take(f.tag) {
            if matches!(w, Waiter::Scsi { .. }) {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            w.fail(self.error_of(f.code, f.reason), true);
        }
    }

    fn tmf_done(&self, t: TaskMgmtDone) {
        match self.take(t.tag) {
            Some(Waiter::Tmf(tx)) => {
                let result = if t.code == FailCode::OK {
                    Ok(())
                } else {
                    Err(self.error_of(t.code, t.reason))
                };
                let _ = tx.send(result);
            }
            Some(w) => w.fail(
                PathError::PathFailed("the adapter answered a command as task management".into()),
                true,
            ),
            None => {}
        }
    }

    /// Registers a waiter and queues its frame; the error if the path failed.
    fn enqueue(&self, waiter: Waiter, make: impl FnOnce(u64) -> Message) -> Result<(), PathError> {
        let tag = {
            let mut w = lock(&self.waiters);
            if let Some(e) = &w.failed {
                if matches!(waiter, Waiter::Scsi { .. }) {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e.clone());
            }
            let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
            w.map.insert(tag, waiter);
            tag
        };
        if self.out.send(make(tag)).is_err() {
            if let Some(w) = self.take(tag) {
                w.fail(
                    PathError::PathFailed(format!(
                        "adapter {} VF {}: queue closed",
                        self.info.adapter, self.vf
                    )),
                    false,
                );
            }
        }
        Ok(())
    }
}

async fn queue_reader(weak: Weak<PathShared>, mut reader: FrameReader<OwnedReadHalf>) {
    loop {
        let message = reader.next_message().await;
        let Some(p) = weak.upgrade() else { return };
        p.adapter.heard();
        match message {
            Ok(Some(Message::Complete(c))) => p.complete(c),
            Ok(Some(Message::CompleteShm(c))) => p.complete_shm(c),
            Ok(Some(Message::Fail(f))) => p.failed_one(f),
            Ok(Some(Message::TaskMgmtDone(t))) => p.tmf_done(t),
            other => {
                let why = match other {
                    Ok(Some(m)) => format!("unexpected {} on the queue", m.name()),
                    Ok(None) => "queue closed by the adapter".into(),
                    Err(e) => format!("queue: {e}"),
                };
                let e = if p.closed.load(Ordering::Relaxed) {
                    PathError::Closed
                } else {
                    // A crash shows here too; the control connection tells the adapter.
                    PathError::PathFailed(format!("adapter {} VF {}: {why}", p.info.adapter, p.vf))
                };
                p.fail_all(e);
                return;
            }
        }
    }
}

/// Gathers what callers submitted since the last write into one vectored write.
async fn queue_writer(
    weak: Weak<PathShared>,
    mut rx: mpsc::UnboundedReceiver<Message>,
    mut w: OwnedWriteHalf,
) {
    const MAX_BATCH: usize = 4 << 20;
    let mut buf = FrameBuffer::default();
    while let Some(m) = rx.recv().await {
        buf.queue(&m);
        while buf.queued() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => buf.queue(&m),
                Err(_) => break,
            }
        }
        if let Err(e) = buf.write_to(&mut w).await {
            if let Some(p) = weak.upgrade() {
                p.fail_all(PathError::PathFailed(format!(
                    "adapter {} VF {}: queue: {e}",
                    p.info.adapter, p.vf
                )));
            }
            return;
        }
    }
}

/// A VM's session on a virtual function of the reference offload adapter.
pub struct OffloadPath {
    shared: Arc<PathShared>,
}

impl OffloadPath {
    /// The virtual function.
    pub fn vf(&self) -> u32 {
        self.shared.vf
    }
}

impl DataPath for OffloadPath {
    fn info(&self) -> PathInfo {
        self.shared.info.clone()
    }

    fn submit(&self, command: Command) -> BoxFuture<'static, Result<Completion, PathError>> {
        let p = self.shared.clone();
        Box::pin(async move {
            let _ticket = p.gate.enter().await;
            if command.cdb.is_empty() || command.cdb.len() > MAX_CDB {
                return Err(PathError::Refused(format!(
                    "CDB of {} bytes",
                    command.cdb.len()
                )));
            }
            if command.data_out.len() + MAX_CDB + 64 + FRAME_HEADER > MAX_FRAME as usize {
                return Err(PathError::Refused("data-out too large".into()));
            }
            let (tx, rx) = oneshot::channel();
            let written = command.data_out.len() as u64;
            // Reads get a buffer in shared memory while there is room (else data-in comes
            // through the socket).
            let buffer = match &p.pool {
                Some(pool) if command.read_len > 0 => pool.alloc(command.read_len),
                _ => None,
            };
            let offset = buffer.as_ref().map(Buffer::offset);
            let waiter = Waiter::Scsi {
                tx,
                written,
                buffer,
            };
            p.enqueue(waiter, |tag| {
                Message::Submit(Submit {
                    tag,
                    lun: command.lun,
                    attr: command.attr,
                    read_len: command.read_len,
                    buffer: offset,
                    cdb: command.cdb,
                    data_out: command.data_out,
                })
            })?;
            rx.await.unwrap_or_else(|_| {
                Err(PathError::PathFailed(format!(
                    "adapter {} VF {}: queue closed",
                    p.info.adapter, p.vf
                )))
            })
        })
    }

    fn task_management(
        &self,
        function: TmfFunction,
        lun: u64,
    ) -> BoxFuture<'static, Result<(), PathError>> {
        let p = self.shared.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            p.enqueue(Waiter::Tmf(tx), |tag| {
                Message::TaskMgmt(TaskMgmt {
                    tag,
                    function: function.0,
                    lun,
                })
            })?;
            rx.await.unwrap_or(Err(PathError::Closed))
        })
    }

    fn quiesce(&self) -> BoxFuture<'static, ()> {
        let gate = self.shared.gate.clone();
        Box::pin(async move { gate.quiesce().await })
    }

    fn resume(&self) {
        self.shared.gate.resume();
    }

    fn export_state(&self) -> SessionState {
        let i = &self.shared.info;
        SessionState {
            initiator_name: i.initiator_name.clone(),
            isid: i.isid.clone(),
            target: i.target.clone(),
            portal: i.portal.clone(),
            stats: self.stats(),
        }
    }

    fn health(&self) -> Health {
        if let Some(e) = &lock(&self.shared.waiters).failed {
            return Health::Failed(e.to_string());
        }
        match self.shared.adapter.failed() {
            Some(why) => Health::Failed(why),
            None => Health::Up,
        }
    }

    fn stats(&self) -> PathStats {
        let k = &self.shared.counters;
        PathStats {
            commands: k.commands.load(Ordering::Relaxed),
            bytes_read: k.bytes_read.load(Ordering::Relaxed),
            bytes_written: k.bytes_written.load(Ordering::Relaxed),
            errors: k.errors.load(Ordering::Relaxed),
            recoveries: 0,
        }
    }

    fn close(&self) -> BoxFuture<'static, Result<(), PathError>> {
        let p = self.shared.clone();
        let first = !p.closed.swap(true, Ordering::Relaxed);
        Box::pin(async move {
            if !first {
                return Ok(());
            }
            let a = &p.adapter;
            let released = a
                .request(Request::ReleaseVf { vf: p.vf }, a.options.request_timeout)
                .await;
            p.fail_all(PathError::Closed);
            match released {
                // A failed adapter took the VF with it.
                Ok(_) | Err(RequestError::Failed(_)) => Ok(()),
                Err(e) => Err(e.into_path_error(&a.name)),
            }
        })
    }
}
