//! The source's side of the agent-to-agent channel: requests with ids, replies matched to
//! them, any number in flight. Commands that reach a VM after it migrated away are
//! forwarded through it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use datapath::{Command, Completion, DataIn, PathError, Residual, Status, TmfFunction};
use tokio::sync::{mpsc, oneshot};

use super::channel::{self, Channel, ChannelReceiver, ClusterKey};
use super::protocol::{self, Reply, Request};

type Waiter = oneshot::Sender<Result<(Reply, Bytes), String>>;

/// A channel to a destination agent.
pub struct Link {
    peer: String,
    next_id: AtomicU64,
    pending: Arc<Mutex<Pending>>,
    outgoing: mpsc::UnboundedSender<Vec<u8>>,
    /// Commands forwarded through this link.
    forwarded: AtomicU64,
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Why the channel ended, once it has.
    closed: Option<String>,
}

impl Pending {
    fn fail_all(&mut self, why: String) {
        for (_, w) in self.waiters.drain() {
            let _ = w.send(Err(why.clone()));
        }
        self.closed = Some(why);
    }
}

impl Link {
    /// Opens the channel to the agent listening on `addr`.
    pub async fn open(addr: &str, key: &ClusterKey, host: &str) -> Result<Arc<Link>, String> {
        let channel: Channel = channel::connect(addr, key, host)
            .await
            .map_err(|e| e.to_string())?;
        let peer = channel.peer().to_owned();
        let (mut sender, receiver) = channel.split();
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (outgoing, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
        {
            let pending = Arc::clone(&pending);
            tokio::spawn(async move {
                while let Some(frame) = queue.recv().await {
                    if let Err(e) = sender.send(&frame).await {
                        lock(&pending).fail_all(e.to_string());
                        return;
                    }
                }
            });
        }
        tokio::spawn(read_replies(receiver, Arc::clone(&pending)));
        Ok(Arc::new(Link {
            peer,
            next_id: AtomicU64::new(1),
            pending,
            outgoing,
            forwarded: AtomicU64::new(0),
        }))
    }

    /// The destination's host name.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Sends one request and waits for its reply (at most `timeout`). Errors are one line.
    pub async fn call(
        &self,
        request: &Request,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(Reply, Bytes), String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if let Some(why) = &pending.closed {
                return Err(why.clone());
            }
            pending.waiters.insert(id, tx);
        }
        if self
            .outgoing
            .send(protocol::encode(id, request, payload))
            .is_err()
        {
            lock(&self.pending).waiters.remove(&id);
            return Err(format!("channel to {} closed", self.peer));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(format!("channel to {} closed", self.peer)),
            Err(_) => {
                lock(&self.pending).waiters.remove(&id);
                Err(format!(
                    "no answer from {} within {} s",
                    self.peer,
                    timeout.as_secs()
                ))
            }
        }
    }

    /// Forwards a command to the host that has the VM's session now.
    pub async fn submit(&self, command: Command) -> Result<Completion, PathError> {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        let request = Request::Command {
            lun: command.lun,
            cdb: protocol::to_hex(&command.cdb),
            read_len: command.read_len,
            attr: protocol::attr_code(command.attr),
        };
        // A command can wait long at the destination (its own failover); no tighter bound
        // than the initiator's own.
        let gone = |why: String| PathError::Unreachable(format!("VM migrated: {why}"));
        match self
            .call(&request, &command.data_out, Duration::from_secs(300))
            .await
        {
            Ok((
                Reply::Completion {
                    status,
                    sense,
                    residual,
                },
                data,
            )) => Ok(Completion {
                status: Status(status),
                sense: Bytes::from(protocol::from_hex(&sense).unwrap_or_default()),
                data: DataIn::from(data),
                residual: match residual {
                    0 => Residual::None,
                    n if n > 0 => Residual::Underflow(n as u32),
                    n => Residual::Overflow(n.unsigned_abs() as u32),
                },
            }),
            Ok((Reply::Failed { kind, message }, _)) => Err(protocol::path_error(&kind, message)),
            Ok((other, _)) => Err(gone(format!("unexpected answer {other:?}"))),
            Err(why) => Err(gone(why)),
        }
    }

    /// Forwards task management.
    pub async fn task_management(&self, function: TmfFunction, lun: u64) -> Result<(), PathError> {
        let request = Request::TaskManagement {
            function: function.0,
            lun,
        };
        match self.call(&request, &[], Duration::from_secs(60)).await {
            Ok((Reply::Done, _)) => Ok(()),
            Ok((Reply::Failed { kind, message }, _)) => Err(protocol::path_error(&kind, message)),
            Ok((other, _)) => Err(PathError::Refused(format!("unexpected answer {other:?}"))),
            Err(why) => Err(PathError::Unreachable(format!("VM migrated: {why}"))),
        }
    }
}

async fn read_replies(mut receiver: ChannelReceiver, pending: Arc<Mutex<Pending>>) {
    let why = loop {
        let frame = match receiver.recv().await {
            Ok(f) => f,
            Err(e) => break e.to_string(),
        };
        match protocol::decode::<Reply>(frame) {
            Ok((envelope, payload)) => {
                if let Some(w) = lock(&pending).waiters.remove(&envelope.id) {
                    let _ = w.send(Ok((envelope.body, payload)));
                }
            }
            Err(e) => break format!("{}: {e}", receiver.peer()),
        }
    };
    tracing::debug!(peer = %receiver.peer(), reason = %why, "migration channel ended");
    lock(&pending).fail_all(why);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
