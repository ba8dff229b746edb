//! The session handle and the task that owns its connection.
//!
//! [`Session`] handles send requests over a channel to one driver task per session. The
//! driver owns the socket and the sans-IO [`InitiatorSession`], and when the connection
//! fails it recovers: it takes the tasks that had not completed, logs in again with the same
//! identity (the target reinstates the session and so ends the old one), and re-issues them in
//! their original order. Requests that arrive meanwhile wait and go out after them. Each
//! caller's reply channel is answered exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use iscsi_proto::initiator::{
    Event, InitiatorSession, ScsiCompletion, ScsiRequest, SessionConfig, TargetNotice, TaskId,
};
use iscsi_proto::keys::{SessionParams, SessionType};
use iscsi_wire::{LogoutReason, TmfFunction, TmfResponse};
use tokio::sync::{mpsc, oneshot};

use crate::connection::{establish, Established, LoginPlan, Reader, Writer};
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
    /// Duration of the last recovery, from failure detection to the new session in full
    /// feature phase, in microseconds.
    pub last_recovery_us: Option<u64>,
}

/// Lock-free counters behind [`SessionStats`].
#[derive(Default)]
struct Counters {
    commands: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    recoveries: AtomicU64,
    reissued: AtomicU64,
    failed_attempts: AtomicU64,
    /// Microseconds + 1 (0: no recovery yet).
    last_recovery_us: AtomicU64,
}

struct Shared {
    counters: Counters,
    params: Mutex<SessionParams>,
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

enum Request {
    Scsi(ScsiRequest, Reply<ScsiCompletion>),
    TaskManagement(TmfFunction, u64, Reply<TmfResponse>),
    Text(Vec<(String, String)>, Reply<Vec<(String, String)>>),
    Logout(Reply<()>),
}

/// A caller waiting for something other than a SCSI command.
enum OtherWaiter {
    TaskManagement(Reply<TmfResponse>),
    Text(Reply<Vec<(String, String)>>),
    Logout(Reply<()>),
}

impl OtherWaiter {
    fn fail(self, e: impl Fn() -> Error) {
        match self {
            OtherWaiter::TaskManagement(r) => drop(r.send(Err(e()))),
            OtherWaiter::Text(r) => drop(r.send(Err(e()))),
            OtherWaiter::Logout(r) => drop(r.send(Err(e()))),
        }
    }
}

/// A logged-in session. Cheap to clone; all clones share the connection. Dropping the last
/// clone closes the connection (without a logout); [`Session::logout`] ends it cleanly.
#[derive(Clone)]
pub struct Session {
    tx: mpsc::UnboundedSender<Request>,
    shared: Arc<Shared>,
}

impl Session {
    /// Connects and logs in. Login problems are not retried here: an unreachable target or
    /// a wrong secret is reported at once.
    pub async fn connect(options: SessionOptions) -> Result<Session, Error> {
        let plan = LoginPlan {
            identity: options.identity,
            portal: options.portal,
            target: Some(options.target),
            session_type: SessionType::Normal,
            chap: options.chap,
            negotiation: options.negotiation,
            policy: options.policy,
        };
        Self::start(plan).await
    }

    /// Logs in with `plan` and spawns the driver (also used for discovery sessions).
    pub(crate) async fn start(mut plan: LoginPlan) -> Result<Session, Error> {
        let est = establish(&mut plan).await?;
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            params: Mutex::new(est.login.params.clone()),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = Driver {
            plan,
            shared: shared.clone(),
            rx,
            scsi: HashMap::new(),
            other: HashMap::new(),
            next_task: 1,
        };
        tokio::spawn(driver.run(est));
        Ok(Session { tx, shared })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Sends one SCSI command and waits for its completion (any status).
    pub async fn execute(&self, request: ScsiRequest) -> Result<ScsiCompletion, Error> {
        self.call(|r| Request::Scsi(request, r)).await
    }

    /// Task management on a LUN number (ABORT TASK SET, LOGICAL UNIT RESET, ...).
    pub async fn task_management(&self, function: TmfFunction, lun: u64) -> Result<(), Error> {
        let raw = scsi::lun::encode(lun);
        match self
            .call(|r| Request::TaskManagement(function, raw, r))
            .await?
        {
            TmfResponse::FUNCTION_COMPLETE => Ok(()),
            other => Err(Error::TaskManagement(format!("{other:?}"))),
        }
    }

    /// A Text Request in full feature phase (e.g. `SendTargets=All`), continuations gathered.
    pub async fn text(&self, pairs: Vec<(String, String)>) -> Result<Vec<(String, String)>, Error> {
        self.call(|r| Request::Text(pairs, r)).await
    }

    /// The parameters negotiated by the current connection's login.
    pub fn params(&self) -> SessionParams {
        self.shared
            .params
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    pub fn stats(&self) -> SessionStats {
        let c = &self.shared.counters;
        let last = c.last_recovery_us.load(Ordering::Relaxed);
        SessionStats {
            commands: c.commands.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            recoveries: c.recoveries.load(Ordering::Relaxed),
            reissued: c.reissued.load(Ordering::Relaxed),
            failed_attempts: c.failed_attempts.load(Ordering::Relaxed),
            last_recovery_us: (last > 0).then(|| last - 1),
        }
    }

    /// Logs out and closes the connection; outstanding commands fail with [`Error::Closed`].
    pub async fn logout(&self) -> Result<(), Error> {
        self.call(Request::Logout).await
    }
}

/// The connection in use.
struct Live {
    reader: Reader,
    writer: Writer,
    session: InitiatorSession,
}

/// Why serving a connection stopped.
enum Outcome {
    /// Every handle is gone.
    Closed,
    /// The caller logged out.
    LoggedOut,
    /// The connection failed; recover.
    Failed(String),
}

struct Driver {
    plan: LoginPlan,
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Request>,
    /// Callers of SCSI commands by task, with the direction's byte count for statistics.
    scsi: HashMap<TaskId, (Reply<ScsiCompletion>, u64)>,
    other: HashMap<TaskId, OtherWaiter>,
    next_task: u64,
}

impl Driver {
    fn session_config(&self) -> SessionConfig {
        SessionConfig {
            nop_interval: self.plan.policy.nop_interval,
            nop_timeout: self.plan.policy.nop_timeout,
        }
    }

    fn live(&self, est: Established) -> Live {
        if let Ok(mut p) = self.shared.params.lock() {
            *p = est.login.params.clone();
        }
        Live {
            reader: est.reader,
            writer: est.writer,
            session: InitiatorSession::new(&est.login, self.session_config(), Instant::now()),
        }
    }

    fn task_id(&mut self) -> TaskId {
        self.next_task += 1;
        TaskId(self.next_task)
    }

    async fn run(mut self, est: Established) {
        let mut live = self.live(est);
        loop {
            match self.serve(&mut live).await {
                Outcome::Closed => {
                    // Nobody can wait any more; say goodbye politely but briefly.
                    let task = self.task_id();
                    if live
                        .session
                        .logout(task, LogoutReason::CLOSE_SESSION)
                        .is_ok()
                    {
                        pump_transmit(&mut live);
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_millis(200),
                            live.writer.flush(),
                        )
                        .await;
                    }
                    return;
                }
                Outcome::LoggedOut => {
                    let _ = live.writer.flush().await;
                    let _ = live.writer.shutdown().await;
                    self.fail_all(|| Error::Closed);
                    self.refuse_until_closed(|| Error::Closed).await;
                    return;
                }
                Outcome::Failed(reason) => {
                    tracing::warn!(portal = %self.plan.portal, %reason, "connection failed; recovering");
                    let outstanding = live.session.take_outstanding();
                    for (_, w) in self.other.drain() {
                        w.fail(|| Error::SessionLost(format!("connection lost: {reason}")));
                    }
                    drop(live);
                    match self.recover(outstanding, &reason).await {
                        Some(next) => live = next,
                        None => return,
                    }
                }
            }
        }
    }

    /// Serves one connection until it fails or the session ends.
    async fn serve(&mut self, live: &mut Live) -> Outcome {
        loop {
            pump_transmit(live);
            while let Some(event) = live.session.poll_event() {
                if let Some(outcome) = self.on_event(event) {
                    return outcome;
                }
            }
            pump_transmit(live);
            let deadline = live.session.poll_timeout();
            let flush = live.writer.queued() > 0;
            tokio::select! {
                biased;
                // Writing first: the target may be waiting for our data.
                result = live.writer.flush(), if flush => {
                    if let Err(e) = result {
                        return Outcome::Failed(format!("write failed: {e}"));
                    }
                }
                item = live.reader.next() => match item {
                    Ok(Some(pdu)) => {
                        let now = Instant::now();
                        live.session.handle_pdu(pdu, now);
                        // Take whatever else already arrived before writing.
                        loop {
                            match live.reader.try_next() {
                                Ok(Some(pdu)) => live.session.handle_pdu(pdu, now),
                                Ok(None) => break,
                                Err(e) => return Outcome::Failed(format!("framing lost: {e}")),
                            }
                        }
                    }
                    Ok(None) => return Outcome::Failed("target closed the connection".into()),
                    Err(e) => return Outcome::Failed(format!("read failed: {e}")),
                },
                request = self.rx.recv() => match request {
                    Some(request) => {
                        self.submit(live, request);
                        while let Ok(request) = self.rx.try_recv() {
                            self.submit(live, request);
                        }
                    }
                    None => return Outcome::Closed,
                },
                _ = sleep_until(deadline) => live.session.handle_timeout(Instant::now()),
            }
        }
    }

    fn submit(&mut self, live: &mut Live, request: Request) {
        let task = self.task_id();
        match request {
            Request::Scsi(req, reply) => {
                let bytes = req.data_out.len() as u64;
                match live.session.submit(task, req) {
                    Ok(()) => {
                        self.scsi.insert(task, (reply, bytes));
                    }
                    Err(e) => drop(reply.send(Err(e.into()))),
                }
            }
            Request::TaskManagement(function, lun, reply) => {
                match live.session.task_management(task, function, lun, None) {
                    Ok(()) => {
                        self.other.insert(task, OtherWaiter::TaskManagement(reply));
                    }
                    Err(e) => drop(reply.send(Err(e.into()))),
                }
            }
            Request::Text(pairs, reply) => match live.session.text_request(task, &pairs) {
                Ok(()) => {
                    self.other.insert(task, OtherWaiter::Text(reply));
                }
                Err(e) => drop(reply.send(Err(e.into()))),
            },
            Request::Logout(reply) => {
                match live.session.logout(task, LogoutReason::CLOSE_SESSION) {
                    Ok(()) => {
                        self.other.insert(task, OtherWaiter::Logout(reply));
                    }
                    Err(e) => drop(reply.send(Err(e.into()))),
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) -> Option<Outcome> {
        match event {
            Event::Completed(c) => {
                let counters = &self.shared.counters;
                counters.commands.fetch_add(1, Ordering::Relaxed);
                if let Some((reply, written)) = self.scsi.remove(&c.task) {
                    counters
                        .bytes_read
                        .fetch_add(c.data.len() as u64, Ordering::Relaxed);
                    counters.bytes_written.fetch_add(written, Ordering::Relaxed);
                    let _ = reply.send(Ok(c));
                }
                None
            }
            Event::TaskManagementDone { task, response } => {
                if let Some(OtherWaiter::TaskManagement(r)) = self.other.remove(&task) {
                    let _ = r.send(Ok(response));
                }
                None
            }
            Event::TextDone { task, pairs } => {
                if let Some(OtherWaiter::Text(r)) = self.other.remove(&task) {
                    let _ = r.send(Ok(pairs));
                }
                None
            }
            Event::LoggedOut { task } => {
                if let Some(OtherWaiter::Logout(r)) = self.other.remove(&task) {
                    let _ = r.send(Ok(()));
                }
                Some(Outcome::LoggedOut)
            }
            Event::Notice(notice) => self.on_notice(notice),
            Event::ConnectionFailed { reason } => Some(Outcome::Failed(reason)),
        }
    }

    fn on_notice(&mut self, notice: TargetNotice) -> Option<Outcome> {
        match notice {
            // The target wants this connection gone: reinstating the session on a new one
            // does that and keeps the commands.
            TargetNotice::LogoutRequested { .. } => {
                Some(Outcome::Failed("the target requested a logout".into()))
            }
            TargetNotice::ConnectionDrop { .. } | TargetNotice::SessionDrop { .. } => Some(
                Outcome::Failed("the target is dropping the connection".into()),
            ),
            TargetNotice::ScsiEvent { lun, sense } => {
                tracing::info!(lun, sense_len = sense.len(), "SCSI asynchronous event");
                None
            }
            other => {
                tracing::debug!(?other, "asynchronous message ignored");
                None
            }
        }
    }

    /// Logs in again and re-issues `outstanding`; None if the policy gave up (every caller
    /// then has its error) or every handle is gone.
    async fn recover(
        &mut self,
        mut outstanding: Vec<(TaskId, ScsiRequest)>,
        reason: &str,
    ) -> Option<Live> {
        let started = Instant::now();
        let policy = self.plan.policy.clone();
        let mut attempt: u32 = 0;
        let mut last_error = reason.to_owned();
        loop {
            let delay = policy.backoff(attempt);
            if !delay.is_zero() && !self.wait_accepting(delay, &mut outstanding).await {
                return None;
            }
            let out_of_time = policy
                .give_up_after
                .is_some_and(|limit| started.elapsed() >= limit);
            let out_of_attempts = policy.max_attempts.is_some_and(|max| attempt >= max);
            if out_of_time || out_of_attempts {
                let msg = format!("gave up recovering after {attempt} attempts: {last_error}");
                tracing::error!(portal = %self.plan.portal, %msg);
                for (task, _) in outstanding.drain(..) {
                    if let Some((r, _)) = self.scsi.remove(&task) {
                        let _ = r.send(Err(Error::SessionLost(msg.clone())));
                    }
                }
                self.fail_all(|| Error::SessionLost(msg.clone()));
                self.refuse_until_closed(|| Error::SessionLost(msg.clone()))
                    .await;
                return None;
            }
            let mut plan = self.plan.clone();
            match establish(&mut plan).await {
                Ok(est) => {
                    self.plan = plan;
                    let mut live = self.live(est);
                    let counters = &self.shared.counters;
                    counters.recoveries.fetch_add(1, Ordering::Relaxed);
                    counters
                        .reissued
                        .fetch_add(outstanding.len() as u64, Ordering::Relaxed);
                    let took = started.elapsed().as_micros() as u64;
                    counters.last_recovery_us.store(took + 1, Ordering::Relaxed);
                    tracing::info!(
                        portal = %self.plan.portal, attempts = attempt + 1, reissued = outstanding.len(),
                        recovery_us = took, "session reinstated"
                    );
                    for (task, req) in outstanding {
                        if let Err(e) = live.session.submit(task, req) {
                            if let Some((r, _)) = self.scsi.remove(&task) {
                                let _ = r.send(Err(e.into()));
                            }
                        }
                    }
                    return Some(live);
                }
                Err(e) => {
                    self.shared
                        .counters
                        .failed_attempts
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(attempt, error = %e, "reconnect attempt failed");
                    last_error = e.to_string();
                    attempt += 1;
                }
            }
        }
    }

    /// Sleeps for `delay` while taking new requests: SCSI commands join `outstanding`, the
    /// rest fail. False when every handle is gone.
    async fn wait_accepting(
        &mut self,
        delay: std::time::Duration,
        outstanding: &mut Vec<(TaskId, ScsiRequest)>,
    ) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                request = self.rx.recv() => match request {
                    None => return false,
                    Some(Request::Scsi(req, reply)) => {
                        let task = self.task_id();
                        self.scsi.insert(task, (reply, req.data_out.len() as u64));
                        outstanding.push((task, req));
                    }
                    Some(Request::Logout(reply)) => {
                        // The connection is gone already; nothing more to end.
                        let _ = reply.send(Ok(()));
                        for (task, _) in outstanding.drain(..) {
                            if let Some((r, _)) = self.scsi.remove(&task) {
                                let _ = r.send(Err(Error::Closed));
                            }
                        }
                        self.refuse_until_closed(|| Error::Closed).await;
                        return false;
                    }
                    Some(Request::TaskManagement(_, _, reply)) => {
                        let _ = reply.send(Err(Error::SessionLost("recovering".into())));
                    }
                    Some(Request::Text(_, reply)) => {
                        let _ = reply.send(Err(Error::SessionLost("recovering".into())));
                    }
                },
            }
        }
    }

    fn fail_all(&mut self, e: impl Fn() -> Error) {
        for (_, (r, _)) in self.scsi.drain() {
            let _ = r.send(Err(e()));
        }
        for (_, w) in self.other.drain() {
            w.fail(&e);
        }
    }

    /// The session is over: answer every later request with an error until the handles go.
    async fn refuse_until_closed(&mut self, e: impl Fn() -> Error) {
        while let Some(request) = self.rx.recv().await {
            match request {
                Request::Scsi(_, r) => drop(r.send(Err(e()))),
                Request::TaskManagement(_, _, r) => drop(r.send(Err(e()))),
                Request::Text(_, r) => drop(r.send(Err(e()))),
                Request::Logout(r) => drop(r.send(Err(e()))),
            }
        }
    }
}

fn pump_transmit(live: &mut Live) {
    while let Some(out) = live.session.poll_transmit() {
        live.writer.queue(&out.bhs, &out.ahs, out.data);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
