//! A virtual function's command queue: SUBMIT and TASK_MGMT frames in, COMPLETE, FAIL and
//! TASK_MGMT_DONE frames out, in completion order.
//!
//! Every command runs as its own task on the VF's session, so commands run concurrently up
//! to the target's command window. Completions go through a channel to one writer task,
//! which writes whatever has gathered in one vectored write. A read's data goes into the
//! buffer its SUBMIT named in the driver's shared memory (one copy, the model's DMA); without
//! one, the data-in segments are written to the socket as received.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datapath::TmfFunction;
use initiator::{ScsiCompletion, ScsiRequest, Session};
use iscsi_wire::ServiceResponse;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use super::{lock, Device, Poller, Vf};
use crate::protocol::{
    ControlError, FailCode, FrameBuffer, FrameKind, FrameReader, Message, ReadError, Submit,
    TaskMgmt,
};
use crate::shm::Region;

/// Most bytes gathered for one write.
const MAX_BATCH: usize = 4 << 20;

/// After a hang, held commands go out again this much later, so that a driver that gave up
/// on the adapter (and closed the queue) is noticed first.
const RESUME_GRACE: Duration = Duration::from_millis(50);

/// What the writer sends.
enum Out {
    /// A completion, and the data-in buffer in shared memory its command named.
    Complete(u64, ScsiCompletion, Option<u64>),
    Fail(u64, FailCode, String),
    TmfDone(u64, FailCode, String),
}

/// Work in flight, kept so that it can be failed or held when the port goes down or the
/// adapter hangs.
enum Work {
    Scsi(Submit),
    Tmf(TaskMgmt),
}

impl Work {
    fn fail(&self, code: FailCode, reason: &str) -> Out {
        match self {
            Work::Scsi(s) => Out::Fail(s.tag, code, reason.into()),
            Work::Tmf(t) => Out::TmfDone(t.tag, code, reason.into()),
        }
    }
}

/// A session handle and the epoch it was logged in at.
type Current = (Session, u64);

struct Inflight {
    abort: AbortHandle,
    work: Work,
}

#[derive(Default)]
struct State {
    inflight: HashMap<u64, Inflight>,
    held: Vec<Work>,
    closed: bool,
}

/// The part of a queue the device reaches from outside (faults, release).
pub(crate) struct QueueShared {
    out: mpsc::UnboundedSender<Out>,
    state: Mutex<State>,
    stop: watch::Sender<bool>,
    /// The driver's shared memory for data-in, if it gave some.
    shm: Option<Region>,
    poller: Arc<Poller>,
}

impl QueueShared {
    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.state).inflight.len()
    }

    /// Ends the queue: work in flight is abandoned (the VF is gone) and the connection
    /// closes, which tells the driver.
    pub(crate) fn close(&self, why: &str) {
        let mut st = lock(&self.state);
        st.closed = true;
        self.poller.ended(st.inflight.len());
        for (_, i) in st.inflight.drain() {
            i.abort.abort();
        }
        st.held.clear();
        drop(st);
        tracing::debug!(why, "queue closed");
        self.stop.send_replace(true);
    }

    /// The session under the queue went away: work in flight fails with LINK_DOWN, or (a
    /// hang) is held to be issued again after recovery.
    pub(crate) fn interrupt(&self, hold: bool) {
        let mut st = lock(&self.state);
        let drained: Vec<Inflight> = st.inflight.drain().map(|(_, i)| i).collect();
        self.poller.ended(drained.len());
        for i in drained {
            i.abort.abort();
            if hold {
                st.held.push(i.work);
            } else {
                let _ = self.out.send(i.work.fail(FailCode::LINK_DOWN, "link down"));
            }
        }
    }

    /// Sends the result of `tag` unless it was failed or abandoned meanwhile.
    fn finish(&self, tag: u64, out: Out) {
        if lock(&self.state).inflight.remove(&tag).is_some() {
            self.poller.ended(1);
            let _ = self.out.send(out);
        }
    }
}

/// A queue connection being served.
struct Queue {
    device: Arc<Device>,
    vf: Arc<Vf>,
    generation: u64,
    shared: Arc<QueueShared>,
}

/// Makes a new connection VF `index`'s queue; the error is for the hello's reply.
pub(super) fn attach(
    device: &Arc<Device>,
    index: u32,
    shm: Option<Region>,
) -> Result<Attached, ControlError> {
    let vf = device.vf(index)?.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(QueueShared {
        out: tx,
        state: Mutex::new(State::default()),
        stop: watch::Sender::new(false),
        shm,
        poller: device.poller.clone(),
    });
    let generation = {
        let mut inner = lock(&vf.inner);
        if inner.client.is_none() {
            return Err(ControlError::BadVf(format!("VF {index} is not programmed")));
        }
        if inner.queue.is_some() {
            return Err(ControlError::BadVf(format!(
                "VF {index} already has a queue open"
            )));
        }
        inner.queue = Some(shared.clone());
        inner.generation
    };
    Ok(Attached {
        queue: Queue {
            device: device.clone(),
            vf,
            generation,
            shared,
        },
        rx,
    })
}

/// A queue attached to its VF, to be served once the hello reply is written.
pub(super) struct Attached {
    queue: Queue,
    rx: mpsc::UnboundedReceiver<Out>,
}

impl Attached {
    /// Serves the connection until it ends, then detaches from the VF.
    pub(super) async fn run(self, mut reader: FrameReader<OwnedReadHalf>, writer: OwnedWriteHalf) {
        let Attached { queue, rx } = self;
        let writer = tokio::spawn(write_loop(
            queue.device.clone(),
            queue.shared.clone(),
            rx,
            writer,
        ));
        let why = queue.read_loop(&mut reader).await;
        tracing::debug!(vf = queue.vf.index, %why, "queue connection ends");
        queue.detach(&why);
        writer.abort();
    }

    /// Gives up the VF without serving (the hello reply could not be written).
    pub(super) fn detach(self) {
        self.queue.detach("not served");
    }
}

impl Queue {
    fn detach(&self, why: &str) {
        self.shared.close(why);
        let mut inner = lock(&self.vf.inner);
        if inner
            .queue
            .as_ref()
            .is_some_and(|q| Arc::ptr_eq(q, &self.shared))
        {
            inner.queue = None;
        }
    }

    /// Serves frames until the connection ends; returns why.
    async fn read_loop(&self, reader: &mut FrameReader<OwnedReadHalf>) -> String {
        let mut stop = self.shared.stop.subscribe();
        let mut hung = self.device.hung.subscribe();
        let mut resume_at: Option<tokio::time::Instant> = None;
        loop {
            let resume = async {
                match resume_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = async { drop(stop.wait_for(|s| *s).await) } => {
                    return "closed by the adapter".into();
                }
                changed = hung.changed() => {
                    if changed.is_err() {
                        return "adapter stopped".into();
                    }
                    if !*hung.borrow_and_update() {
                        resume_at = Some(tokio::time::Instant::now() + RESUME_GRACE);
                    }
                }
                () = resume => {
                    resume_at = None;
                    self.resume_held();
                }
                frame = reader.next_message() => {
                    // A hung adapter reads nothing: what arrived waits for recovery.
                    self.device.wait_not_hung().await;
                    if let Some(why) = self.handle(frame) {
                        return why;
                    }
                    // Whatever else the same read brought, without going round the loop.
                    while !*self.device.hung.borrow() {
                        let frame = match reader.try_next() {
                            Ok(None) => break,
                            Ok(Some(f)) => Message::decode(f).map(Some).map_err(Into::into),
                            Err(e) => Err(e.into()),
                        };
                        if let Some(why) = self.handle(frame) {
                            return why;
                        }
                    }
                }
            }
        }
    }

    /// Handles one frame off the connection; why to stop, if it ends the connection.
    fn handle(&self, frame: Result<Option<Message>, ReadError>) -> Option<String> {
        match frame {
            Ok(Some(Message::Submit(s))) => self.submit(Work::Scsi(s)).err(),
            Ok(Some(Message::TaskMgmt(t))) => self.submit(Work::Tmf(t)).err(),
            Ok(Some(other)) => {
                tracing::warn!(
                    vf = self.vf.index,
                    "unexpected {} on a queue; dropping the connection",
                    other.name()
                );
                Some("protocol violation".into())
            }
            Ok(None) => Some("closed by the driver".into()),
            Err(e) => {
                tracing::warn!(vf = self.vf.index, error = %e, "bad queue frame; dropping the connection");
                Some(e.to_string())
            }
        }
    }

    fn resume_held(&self) {
        let held = std::mem::take(&mut lock(&self.shared.state).held);
        if !held.is_empty() {
            tracing::info!(
                vf = self.vf.index,
                commands = held.len(),
                "re-issuing commands held during the hang"
            );
        }
        for work in held {
            // Tags of held work are not in flight, so they cannot collide.
            let _ = self.submit(work);
        }
    }

    /// Starts one command or task management function.
    fn submit(&self, work: Work) -> Result<(), String> {
        let tag = match &work {
            Work::Scsi(s) => s.tag,
            Work::Tmf(t) => t.tag,
        };
        if !self.device.is_link_up() {
            let _ = self
                .shared
                .out
                .send(work.fail(FailCode::LINK_DOWN, "link down"));
            return Ok(());
        }
        let session = {
            let inner = lock(&self.vf.inner);
            inner.session.clone().map(|s| (s, inner.session_epoch))
        };
        let mut st = lock(&self.shared.state);
        if st.closed {
            return Ok(());
        }
        if st.inflight.contains_key(&tag) {
            return Err(format!("tag {tag} is already in flight"));
        }
        if let Work::Scsi(Submit {
            buffer: Some(offset),
            read_len,
            ..
        }) = &work
        {
            let fits = self
                .shared
                .shm
                .as_ref()
                .is_some_and(|r| r.contains(*offset, u64::from(*read_len)));
            if !fits {
                let _ = self.shared.out.send(work.fail(
                    FailCode::REFUSED,
                    "the data-in buffer is not inside the queue's shared memory",
                ));
                return Ok(());
            }
        }
        let task = match &work {
            Work::Scsi(s) => {
                let request = ScsiRequest {
                    lun: s.lun,
                    cdb: s.cdb.clone(),
                    data_out: s.data_out.clone(),
                    read_len: s.read_len,
                    attr: s.attr,
                };
                let buffer = s.buffer;
                tokio::spawn(self.clone_parts().run_scsi(session, tag, request, buffer))
            }
            Work::Tmf(t) => tokio::spawn(self.clone_parts().run_tmf(
                session,
                tag,
                TmfFunction(t.function),
                t.lun,
            )),
        };
        self.shared.poller.started();
        st.inflight.insert(
            tag,
            Inflight {
                abort: task.abort_handle(),
                work,
            },
        );
        Ok(())
    }

    fn clone_parts(&self) -> Queue {
        Queue {
            device: self.device.clone(),
            vf: self.vf.clone(),
            generation: self.generation,
            shared: self.shared.clone(),
        }
    }

    /// The VF's session, logging in again if it was dropped (after a hang or link down).
    async fn session(&self, session: Option<Current>) -> Result<Current, (FailCode, String)> {
        if let Some(s) = session {
            return Ok(s);
        }
        // Boxed: logging in is rare, and its future would make every command's task large.
        Box::pin(self.device.login(&self.vf, self.generation))
            .await
            .map_err(|e| match e {
                ControlError::LinkDown => (FailCode::LINK_DOWN, "link down".to_string()),
                ControlError::BadVf(why) => (FailCode::CLOSED, why),
                other => (FailCode::SESSION_LOST, other.to_string()),
            })
    }

    async fn run_scsi(
        self,
        session: Option<Current>,
        tag: u64,
        request: ScsiRequest,
        buffer: Option<u64>,
    ) {
        let written = request.data_out.len() as u64;
        let session = match self.session(session).await {
            Ok(s) => s,
            Err((code, why)) => {
                self.count(|s| s.errors += 1);
                self.shared.finish(tag, Out::Fail(tag, code, why));
                return;
            }
        };
        let out = match session.0.execute(request).await {
            Ok(c) if c.response == ServiceResponse::COMMAND_COMPLETED => {
                let read = c.data.len() as u64;
                self.count(|s| {
                    s.commands += 1;
                    s.bytes_read += read;
                    s.bytes_written += written;
                });
                Out::Complete(tag, c, buffer)
            }
            Ok(c) => {
                self.count(|s| s.errors += 1);
                Out::Fail(
                    tag,
                    FailCode::TARGET_FAILURE,
                    format!("target failure ({:?})", c.response),
                )
            }
            Err(e) => {
                self.count(|s| s.errors += 1);
                let code = self.error_code(&e, &session);
                Out::Fail(tag, code, e.to_string())
            }
        };
        self.shared.finish(tag, out);
    }

    async fn run_tmf(self, session: Option<Current>, tag: u64, function: TmfFunction, lun: u64) {
        let session = match self.session(session).await {
            Ok(s) => s,
            Err((code, why)) => {
                self.shared.finish(tag, Out::TmfDone(tag, code, why));
                return;
            }
        };
        let out = match session.0.task_management(function, lun).await {
            Ok(()) => Out::TmfDone(tag, FailCode::OK, String::new()),
            Err(initiator::Error::TaskManagement(r)) => Out::TmfDone(tag, FailCode::REFUSED, r),
            Err(e) => {
                let code = self.error_code(&e, &session);
                Out::TmfDone(tag, code, e.to_string())
            }
        };
        self.shared.finish(tag, out);
    }

    /// The FAIL code of an initiator error; a session that gave up is dropped, so the next
    /// command logs in again.
    fn error_code(&self, e: &initiator::Error, session: &Current) -> FailCode {
        match e {
            initiator::Error::SessionLost(_) | initiator::Error::Closed => {
                let mut inner = lock(&self.vf.inner);
                if inner.generation == self.generation && inner.session_epoch == session.1 {
                    inner.session = None;
                }
                if matches!(e, initiator::Error::Closed) {
                    FailCode::CLOSED
                } else {
                    FailCode::SESSION_LOST
                }
            }
            initiator::Error::Submit(_) => FailCode::REFUSED,
            _ => FailCode::PATH_FAILED,
        }
    }

    fn count(&self, f: impl FnOnce(&mut crate::protocol::VfStats)) {
        let mut inner = lock(&self.vf.inner);
        if inner.generation == self.generation {
            f(&mut inner.stats);
        }
    }
}

/// Writes completions as they come, in batches; holds them while the adapter is hung.
async fn write_loop(
    device: Arc<Device>,
    shared: Arc<QueueShared>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    mut writer: OwnedWriteHalf,
) {
    let shm = shared.shm.as_ref();
    let mut buf = FrameBuffer::default();
    while let Some(first) = rx.recv().await {
        queue_out(&mut buf, shm, first);
        while buf.queued() < MAX_BATCH {
            match rx.try_recv() {
                Ok(o) => queue_out(&mut buf, shm, o),
                Err(_) => break,
            }
        }
        device.wait_not_hung().await;
        if let Err(e) = buf.write_to(&mut writer).await {
            tracing::debug!(error = %e, "queue write failed");
            return;
        }
    }
}

/// Queues one message; a completion whose command named a buffer has its data copied there
/// (the model of the adapter's DMA) and goes out as COMPLETE_SHM.
fn queue_out(buf: &mut FrameBuffer, shm: Option<&Region>, out: Out) {
    match out {
        Out::Complete(tag, c, Some(offset))
            if shm.is_some_and(|r| r.write(offset, c.data.segments())) =>
        {
            // At most read_len (a u32) bytes.
            let len = u32::try_from(c.data.len()).unwrap_or(u32::MAX);
            buf.queue_complete_shm(tag, c.status.0, c.residual, &c.sense, len)
        }
        Out::Complete(tag, c, _) => {
            buf.queue_complete(tag, c.status.0, c.residual, &c.sense, c.data.segments())
        }
        Out::Fail(tag, code, why) => buf.queue_fail(FrameKind::FAIL, tag, code, &why),
        Out::TmfDone(tag, code, why) => buf.queue_fail(FrameKind::TASK_MGMT_DONE, tag, code, &why),
    }
}
