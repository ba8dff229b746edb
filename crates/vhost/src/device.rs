//! One vhost-user connection's device: the virtqueues of a virtio-scsi or virtio-blk device,
//! served by rust-vmm's `vhost-user-backend`, with every request sent to the VM's [`Storage`].
//!
//! A request is read out of guest memory (header and Data-Out: one copy into a buffer the
//! network stack sends from), submitted as a task on the tokio runtime, and completed by writing
//! the response and Data-In straight into the guest's buffers (one copy out of the receive
//! buffers). All guest writes go through vm-memory, so they are marked in the dirty log when
//! QEMU migrates the VM. `GET_VRING_BASE` waits until every request taken from that queue has
//! completed, so the ring QEMU hands over has nothing in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datapath::{Command, PathError, TaskAttr, TmfFunction};
use futures_util::future::FutureExt as _;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use scsi::SenseKey;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend as _;
use vm_memory::GuestMemoryRegion as _;
use vm_memory::{
    Bytes as _, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::{virtio_blk as blk, virtio_scsi as vscsi, Bus, FrontendKind};

/// Guest memory with the dirty-page bitmap QEMU asks for during migration.
pub(crate) type Memory = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap<BitmapMmapRegion>>>;

/// Largest Data-In or Data-Out of one request (QEMU's default `max_sectors` is 0xffff).
pub const MAX_TRANSFER: usize = 32 << 20;
/// How long GET_VRING_BASE waits for in-flight requests before giving up with an error.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests taken off a ring together: (head, buffers).
type Batch = Vec<(u16, Buffers)>;
type BatchSender = tokio::sync::mpsc::UnboundedSender<Batch>;

/// Per-queue bookkeeping.
#[derive(Default)]
struct QueueState {
    /// Held while taking requests off the ring, and by a vring stop, so none is taken after.
    taking: Mutex<()>,
    in_flight: Mutex<usize>,
    drained: Condvar,
}

/// Requests in flight as (LUN, tag), for the task management the guest sends. A short list
/// (at most the queue depth): cheaper than maps for the adds and removes of every command.
#[derive(Default)]
struct Tags {
    in_flight: Vec<(u16, u64)>,
}

impl Tags {
    fn busy(&self, lun: u16, tag: Option<u64>) -> bool {
        self.in_flight
            .iter()
            .any(|&(l, t)| l == lun && tag.is_none_or(|tag| tag == t))
    }
}

/// One connection's device.
pub(crate) struct Device {
    bus: Arc<Bus>,
    mem: Memory,
    num_queues: usize,
    event_idx: AtomicBool,
    acked: AtomicU64,
    queues: Vec<QueueState>,
    tags: Mutex<Tags>,
    tags_changed: Condvar,
    /// The event queue's vring, once known, and whether an event was lost for lack of a buffer.
    events: Mutex<EventQueue>,
    /// Per queue: where its requests go (the queue's task, started on the first request).
    workers: Mutex<Vec<Option<BatchSender>>>,
    /// Task-management waiters for `tags_changed` (completions notify only when there are).
    tag_waiters: std::sync::atomic::AtomicUsize,
    exit: Vec<(EventConsumer, EventNotifier)>,
}

#[derive(Default)]
struct EventQueue {
    vring: Option<VringRwLock<Memory>>,
    missed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Device {
    pub(crate) fn new(bus: Arc<Bus>, mem: Memory) -> std::io::Result<Device> {
        let num_queues = match bus.config.kind {
            FrontendKind::Scsi => usize::from(bus.config.request_queues) + 2,
            FrontendKind::Blk => usize::from(bus.config.request_queues),
        };
        let exit = vec![new_event_consumer_and_notifier(EventFlag::NONBLOCK)?];
        Ok(Device {
            bus,
            mem,
            num_queues,
            event_idx: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            queues: (0..num_queues).map(|_| QueueState::default()).collect(),
            tags: Mutex::new(Tags::default()),
            tags_changed: Condvar::new(),
            events: Mutex::new(EventQueue::default()),
            workers: Mutex::new((0..num_queues).map(|_| None).collect()),
            tag_waiters: Default::default(),
            exit,
        })
    }

    fn kind(&self) -> FrontendKind {
        self.bus.config.kind
    }

    /// Takes every available request off queue `index` and hands them, as one batch, to the
    /// queue's task on the runtime (one wake-up per kick, not per request).
    fn process_queue(self: &Arc<Self>, index: usize, vring: &VringRwLock<Memory>) {
        let _taking = lock(&self.queues[index].taking);
        let mut batch = Vec::new();
        loop {
            if self.event_idx.load(Ordering::Relaxed) {
                let _ = vring.disable_notification();
            }
            let chains: Vec<Chain> = {
                let mut state = vring.get_mut();
                match state.get_queue_mut().iter(self.mem.memory()) {
                    Ok(iter) => iter.collect(),
                    Err(e) => {
                        tracing::debug!(vm = %self.bus.config.name, queue = index, "queue not ready: {e}");
                        return;
                    }
                }
            };
            for chain in chains {
                let head = chain.head_index();
                match Buffers::from_chain(chain) {
                    Ok(buffers) => batch.push((head, buffers)),
                    Err(why) => {
                        tracing::warn!(vm = %self.bus.config.name, queue = index, head, "malformed request: {why}");
                        self.finish(index, vring, head, 0);
                        self.signal(vring);
                    }
                }
            }
            if !self.event_idx.load(Ordering::Relaxed) {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
        if batch.is_empty() {
            return;
        }
        *lock(&self.queues[index].in_flight) += batch.len();
        let mut workers = lock(&self.workers);
        let worker = workers[index].get_or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let device = Arc::clone(self);
            let vring = vring.clone();
            self.bus
                .runtime
                .spawn(async move { device.queue_task(index, vring, rx).await });
            tx
        });
        if worker.send(batch).is_err() {
            tracing::error!(vm = %self.bus.config.name, queue = index, "queue task gone");
        }
    }

    /// Runs one queue's requests concurrently and returns them to the guest, with one
    /// interrupt for all that complete together.
    async fn queue_task(
        self: Arc<Self>,
        queue: usize,
        vring: VringRwLock<Memory>,
        mut batches: tokio::sync::mpsc::UnboundedReceiver<Batch>,
    ) {
        let mut running = FuturesUnordered::new();
        let mut open = true;
        while open || !running.is_empty() {
            tokio::select! {
                batch = batches.recv(), if open => match batch {
                    Some(batch) => {
                        for (head, buffers) in batch {
                            running.push(Box::pin(Arc::clone(&self).handle(queue, head, buffers)));
                        }
                    }
                    None => open = false,
                },
                Some((head, used)) = running.next(), if !running.is_empty() => {
                    self.finish(queue, &vring, head, used);
                    let mut done = 1;
                    while let Some(Some((head, used))) = running.next().now_or_never() {
                        self.finish(queue, &vring, head, used);
                        done += 1;
                    }
                    self.signal(&vring);
                    let state = &self.queues[queue];
                    let mut n = lock(&state.in_flight);
                    *n -= done;
                    if *n == 0 {
                        state.drained.notify_all();
                    }
                }
            }
        }
    }

    /// One request; returns its head and the bytes written for the guest.
    async fn handle(self: Arc<Self>, queue: usize, head: u16, buffers: Buffers) -> (u16, u32) {
        let used = match self.kind() {
            FrontendKind::Scsi if queue == usize::from(vscsi::CONTROL_QUEUE) => {
                self.control(&buffers).await
            }
            FrontendKind::Scsi => self.scsi_command(&buffers).await,
            FrontendKind::Blk => self.blk_request(&buffers).await,
        };
        (head, used)
    }

    /// Ends the queue tasks once their requests are done (the VMM is gone).
    pub(crate) fn close(&self) {
        for worker in lock(&self.workers).iter_mut() {
            worker.take();
        }
    }

    /// Returns a used buffer to the guest (without interrupting it).
    fn finish(&self, queue: usize, vring: &VringRwLock<Memory>, head: u16, used: u32) {
        if let Err(e) = vring.add_used(head, used) {
            tracing::warn!(vm = %self.bus.config.name, queue, head, "cannot return a used buffer: {e}");
        }
    }

    /// Interrupts the guest if it wants that.
    fn signal(&self, vring: &VringRwLock<Memory>) {
        if vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
    }

    /// Waits until nothing taken from `queue` is in flight (GET_VRING_BASE).
    fn drain(&self, queue: usize) -> std::io::Result<()> {
        let Some(state) = self.queues.get(queue) else {
            return Ok(());
        };
        let _taking = lock(&state.taking);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut n = lock(&state.in_flight);
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::error!(vm = %self.bus.config.name, queue, in_flight = *n, "vring stop: requests still in flight");
                return Err(std::io::Error::other(format!(
                    "{} requests of queue {queue} still in flight",
                    *n
                )));
            }
            n = state
                .drained
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    // ---- virtio-scsi ----

    async fn scsi_command(&self, req: &Buffers) -> u32 {
        let mem = self.mem.memory();
        let writable = req.writable_len();
        if writable < vscsi::RESPONSE_HEADER_LEN {
            tracing::warn!(vm = %self.bus.config.name, "virtio-scsi request without room for a response");
            return 0;
        }
        let data_in_room = writable - vscsi::RESPONSE_HEADER_LEN;
        // The response header, then Data-In after the header's full size.
        let reply = |header: &[u8], data: &[u8]| -> u32 {
            let head = req.write(&mem, 0, header);
            let body = req.write(&mem, vscsi::RESPONSE_HEADER_LEN, data);
            (head + body) as u32
        };
        let Some(header) = vscsi::parse_request(&req.readable) else {
            return reply(&vscsi::failure_response(vscsi::S_FAILURE, 0), &[]);
        };
        let data_out = req.readable.slice(vscsi::REQUEST_HEADER_LEN..);
        let resid_all = (data_in_room + data_out.len()) as u32;
        if data_in_room > MAX_TRANSFER || data_out.len() > MAX_TRANSFER {
            tracing::warn!(vm = %self.bus.config.name, "virtio-scsi request over {MAX_TRANSFER} bytes refused");
            return reply(&vscsi::failure_response(vscsi::S_FAILURE, resid_all), &[]);
        }
        let lun = match vscsi::decode_lun(&header.lun) {
            vscsi::Address::Lun(l) => l,
            vscsi::Address::BadTarget => {
                return reply(
                    &vscsi::failure_response(vscsi::S_BAD_TARGET, resid_all),
                    &[],
                )
            }
        };
        if header.cdb.is_empty() {
            return reply(&vscsi::failure_response(vscsi::S_FAILURE, resid_all), &[]);
        }
        if let Some(answer) = vscsi::answer_locally(&self.bus.storage.luns(), lun, &header.cdb) {
            return match answer {
                vscsi::LocalAnswer::Data(data) => {
                    let allowed = vscsi::allocation_length(&header.cdb)
                        .unwrap_or(data.len())
                        .min(data.len())
                        .min(data_in_room);
                    let resid = (data_in_room - allowed) as u32;
                    reply(
                        &vscsi::encode_response(vscsi::S_OK, 0, resid, &[]),
                        &data[..allowed],
                    )
                }
                vscsi::LocalAnswer::Check(key, asc) => {
                    reply(&vscsi::check_condition(key, asc, resid_all), &[])
                }
            };
        }
        let command = Command {
            lun: scsi::lun::encode(u64::from(lun)),
            cdb: header.cdb.clone(),
            data_out,
            read_len: data_in_room as u32,
            attr: match header.task_attr {
                1 => TaskAttr::Ordered,
                2 => TaskAttr::HeadOfQueue,
                3 => TaskAttr::Aca,
                _ => TaskAttr::Simple,
            },
        };
        let _tag = self.track(lun, header.tag);
        match self.bus.storage.submit(command).await {
            Ok(done) => {
                let got = done.data.len().min(data_in_room);
                let resid = match done.residual {
                    datapath::Residual::Underflow(n) if data_in_room == 0 => n,
                    _ => (data_in_room - got) as u32,
                };
                if let Some(sense) = scsi::sense::Sense::parse(&done.sense) {
                    self.note_sense(lun, &sense);
                }
                let header = vscsi::encode_response(vscsi::S_OK, done.status.0, resid, &done.sense);
                let mut written = req.write(&mem, 0, &header);
                let mut offset = vscsi::RESPONSE_HEADER_LEN;
                for segment in done.data.segments() {
                    let room = (vscsi::RESPONSE_HEADER_LEN + data_in_room).saturating_sub(offset);
                    let part = &segment[..segment.len().min(room)];
                    written += req.write(&mem, offset, part);
                    offset += part.len();
                }
                written as u32
            }
            Err(e) => {
                let response = match e {
                    PathError::PathFailed(_) | PathError::Unreachable(_) => {
                        vscsi::S_TRANSPORT_FAILURE
                    }
                    _ => vscsi::S_FAILURE,
                };
                tracing::warn!(vm = %self.bus.config.name, lun, "command failed: {e}");
                reply(&vscsi::failure_response(response, resid_all), &[])
            }
        }
    }

    /// Remembers a command by (LUN, tag) until the returned guard drops.
    fn track(&self, lun: u16, tag: u64) -> TagGuard<'_> {
        lock(&self.tags).in_flight.push((lun, tag));
        TagGuard {
            device: self,
            lun,
            tag,
        }
    }

    fn tag_in_flight(&self, lun: u16, tag: Option<u64>) -> bool {
        lock(&self.tags).busy(lun, tag)
    }

    /// Waits (on a blocking thread) until the LUN's command `tag`, or all its commands, are done.
    async fn wait_tags(self: &Arc<Self>, lun: u16, tag: Option<u64>) -> bool {
        let device = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            device.tag_waiters.fetch_add(1, Ordering::SeqCst);
            let _waiting = WaiterGuard(&device.tag_waiters);
            let mut tags = lock(&device.tags);
            loop {
                let busy = tags.busy(lun, tag);
                let left = deadline.saturating_duration_since(Instant::now());
                if !busy {
                    return true;
                }
                if left.is_zero() {
                    return false;
                }
                tags = device
                    .tags_changed
                    .wait_timeout(tags, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        })
        .await
        .unwrap_or(false)
    }

    /// A UNIT ATTENTION that says the LUN's parameters changed also goes to the event queue,
    /// so the guest re-reads them even when the command that saw it was retried elsewhere.
    fn note_sense(&self, lun: u16, sense: &scsi::sense::Sense) {
        let asc = sense.asc.0;
        if sense.key != SenseKey::UNIT_ATTENTION
            || asc >> 8 != 0x2a
            || self.acked.load(Ordering::Relaxed) & vscsi::F_CHANGE == 0
        {
            return;
        }
        let reason = u32::from(asc >> 8) | (u32::from(asc & 0xff) << 8);
        self.send_event(vscsi::encode_event(vscsi::T_PARAM_CHANGE, lun, reason));
    }

    /// Puts an event into the guest's next event buffer; without one, remembers that one was
    /// missed (the next event then carries VIRTIO_SCSI_T_EVENTS_MISSED).
    fn send_event(&self, mut event: [u8; vscsi::EVENT_LEN]) {
        let mut events = lock(&self.events);
        let Some(vring) = events.vring.clone() else {
            events.missed = true;
            return;
        };
        let chain = {
            let mut state = vring.get_mut();
            state
                .get_queue_mut()
                .pop_descriptor_chain(self.mem.memory())
        };
        let Some(chain) = chain else {
            events.missed = true;
            return;
        };
        if events.missed {
            let flagged = u32::from_le_bytes([event[0], event[1], event[2], event[3]])
                | vscsi::T_EVENTS_MISSED;
            event[0..4].copy_from_slice(&flagged.to_le_bytes());
            events.missed = false;
        }
        let head = chain.head_index();
        let used = match Buffers::from_chain(chain) {
            Ok(b) => b.write(&self.mem.memory(), 0, &event) as u32,
            Err(_) => 0,
        };
        self.finish(usize::from(vscsi::EVENT_QUEUE), &vring, head, used);
        self.signal(&vring);
    }

    async fn control(self: &Arc<Self>, req: &Buffers) -> u32 {
        let mem = self.mem.memory();
        let Some(kind) = req.readable.get(..4) else {
            return 0;
        };
        let kind = u32::from_le_bytes([kind[0], kind[1], kind[2], kind[3]]);
        match kind {
            vscsi::T_TMF => {
                let response = match vscsi::parse_tmf(&req.readable) {
                    Some(tmf) => self.task_management(tmf).await,
                    None => vscsi::S_FAILURE,
                };
                req.write(&mem, 0, &[response]) as u32
            }
            vscsi::T_AN_QUERY | vscsi::T_AN_SUBSCRIBE => {
                // No asynchronous notifications are offered: event_actual 0, response OK.
                let mut answer = [0u8; 5];
                answer[4] = vscsi::S_OK;
                req.write(&mem, 0, &answer) as u32
            }
            other => {
                tracing::warn!(vm = %self.bus.config.name, "unknown virtio-scsi control request {other}");
                req.write(&mem, 0, &[vscsi::S_FAILURE]) as u32
            }
        }
    }

    /// virtio-scsi task management, mapped to iSCSI task management on the VM's data path.
    /// An ABORT TASK waits for the task to end (iSCSI would need its ITT, which the data path
    /// keeps to itself): the guest then sees the task complete normally, before the TMF.
    async fn task_management(self: &Arc<Self>, tmf: vscsi::TmfRequest) -> u8 {
        let lun = match vscsi::decode_lun(&tmf.lun) {
            vscsi::Address::Lun(l) => l,
            vscsi::Address::BadTarget => return vscsi::S_BAD_TARGET,
        };
        let function = match tmf.subtype {
            vscsi::TMF_ABORT_TASK => {
                return if self.wait_tags(lun, Some(tmf.tag)).await {
                    vscsi::S_OK
                } else {
                    vscsi::S_FAILURE
                };
            }
            vscsi::TMF_QUERY_TASK => {
                return if self.tag_in_flight(lun, Some(tmf.tag)) {
                    vscsi::S_FUNCTION_SUCCEEDED
                } else {
                    vscsi::S_OK
                };
            }
            vscsi::TMF_QUERY_TASK_SET => {
                return if self.tag_in_flight(lun, None) {
                    vscsi::S_FUNCTION_SUCCEEDED
                } else {
                    vscsi::S_OK
                };
            }
            vscsi::TMF_ABORT_TASK_SET => TmfFunction::ABORT_TASK_SET,
            vscsi::TMF_CLEAR_TASK_SET => TmfFunction::CLEAR_TASK_SET,
            vscsi::TMF_CLEAR_ACA => TmfFunction::CLEAR_ACA,
            vscsi::TMF_LOGICAL_UNIT_RESET => TmfFunction::LOGICAL_UNIT_RESET,
            _ => return vscsi::S_FUNCTION_REJECTED,
        };
        let luns = self.bus.storage.luns();
        if !luns.is_empty() && !luns.contains(&u64::from(lun)) {
            return vscsi::S_INCORRECT_LUN;
        }
        match self
            .bus
            .storage
            .task_management(function, u64::from(lun))
            .await
        {
            Ok(()) => {
                if self.wait_tags(lun, None).await {
                    vscsi::S_OK
                } else {
                    vscsi::S_FAILURE
                }
            }
            Err(e) => {
                tracing::warn!(vm = %self.bus.config.name, lun, "task management failed: {e}");
                vscsi::S_FAILURE
            }
        }
    }

    // ---- virtio-blk ----

    async fn blk_request(&self, req: &Buffers) -> u32 {
        let mem = self.mem.memory();
        let writable = req.writable_len();
        if writable == 0 {
            tracing::warn!(vm = %self.bus.config.name, "virtio-blk request without a status byte");
            return 0;
        }
        let data_room = writable - 1;
        let status_at = data_room;
        let status = |s: u8, data_len: usize| -> u32 {
            req.write(&mem, status_at, &[s]);
            (data_len + 1) as u32
        };
        let Some(header) = blk::parse_header(&req.readable) else {
            return status(blk::S_IOERR, 0);
        };
        let data_out = req.readable.slice(blk::HEADER_LEN..);
        let data_len = if header.req_type == blk::T_OUT {
            data_out.len()
        } else {
            data_room
        };
        if data_len > MAX_TRANSFER {
            tracing::warn!(vm = %self.bus.config.name, "virtio-blk request over {MAX_TRANSFER} bytes refused");
            return status(blk::S_IOERR, 0);
        }
        let Some(identity) = self.bus.blk_identity().await else {
            return status(blk::S_IOERR, 0);
        };
        match blk::translate(&header, data_len as u64, &identity.geometry) {
            blk::Translated::Fail(s) => status(s, 0),
            blk::Translated::GetId => {
                let n = req.write(&mem, 0, &identity.id[..blk::ID_LEN.min(data_room)]);
                status(blk::S_OK, n)
            }
            blk::Translated::Scsi { cdb, read_len } => {
                let command = Command {
                    lun: scsi::lun::encode(self.bus.blk_lun()),
                    cdb: Bytes::from(cdb),
                    data_out: if header.req_type == blk::T_OUT {
                        data_out
                    } else {
                        Bytes::new()
                    },
                    read_len,
                    attr: TaskAttr::Simple,
                };
                match self.bus.storage.submit(command).await {
                    Ok(done) if done.status.0 == 0 && done.data.len() == read_len as usize => {
                        let mut at = 0;
                        for segment in done.data.segments() {
                            at += req.write(&mem, at, segment);
                        }
                        status(blk::S_OK, at)
                    }
                    Ok(done) => {
                        tracing::warn!(vm = %self.bus.config.name, status = done.status.0, "virtio-blk request failed at the LUN");
                        status(blk::S_IOERR, 0)
                    }
                    Err(e) => {
                        tracing::warn!(vm = %self.bus.config.name, "virtio-blk request failed: {e}");
                        status(blk::S_IOERR, 0)
                    }
                }
            }
        }
    }
}

struct TagGuard<'a> {
    device: &'a Device,
    lun: u16,
    tag: u64,
}

impl Drop for TagGuard<'_> {
    fn drop(&mut self) {
        let mut tags = lock(&self.device.tags);
        if let Some(at) = tags
            .in_flight
            .iter()
            .position(|&(l, t)| l == self.lun && t == self.tag)
        {
            tags.in_flight.swap_remove(at);
        }
        drop(tags);
        // A futex wake costs a system call: only when task management waits.
        if self.device.tag_waiters.load(Ordering::SeqCst) > 0 {
            self.device.tags_changed.notify_all();
        }
    }
}

/// Counts a waiter for as long as it waits.
struct WaiterGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request's buffers: what the guest gave to read (copied out) and where to write.
pub(crate) struct Buffers {
    /// Device-readable bytes in chain order (header, then Data-Out).
    readable: Bytes,
    /// Device-writable regions in chain order.
    writable: Vec<(GuestAddress, u32)>,
}

impl Buffers {
    /// Reads a chain. Device-readable descriptors must come before device-writable ones, and
    /// the readable part is limited to the largest transfer plus headers.
    fn from_chain(chain: Chain) -> Result<Buffers, String> {
        let mem = chain.memory();
        let mut writable = Vec::new();
        let mut readable_len = 0usize;
        for desc in chain.clone() {
            if desc.is_write_only() {
                writable.push((desc.addr(), desc.len()));
            } else {
                if !writable.is_empty() {
                    return Err("a device-readable descriptor after a device-writable one".into());
                }
                readable_len += desc.len() as usize;
                if readable_len > MAX_TRANSFER + 4096 {
                    return Err(format!("more than {MAX_TRANSFER} bytes to read"));
                }
            }
        }
        if readable_len == 0 && writable.is_empty() {
            return Err("an empty or invalid descriptor chain".into());
        }
        let total_writable: u64 = writable.iter().map(|&(_, l)| u64::from(l)).sum();
        if total_writable > (MAX_TRANSFER as u64) * 2 {
            return Err(format!("more than {MAX_TRANSFER} bytes to write"));
        }
        // A second walk copies the readable descriptors (they come first) without a list of them.
        let mut readable = vec![0u8; readable_len];
        let mut at = 0;
        for desc in chain.clone() {
            if at == readable_len {
                break;
            }
            if desc.is_write_only() {
                continue;
            }
            let (addr, len) = (desc.addr(), desc.len() as usize);
            // The guest may rewrite its descriptors meanwhile: never past the buffer.
            let Some(into) = readable.get_mut(at..at + len) else {
                return Err("descriptors changed while being read".into());
            };
            read_guest(mem, addr, into)
                .map_err(|e| format!("unreadable descriptor at {:#x}: {e}", addr.0))?;
            at += len;
        }
        Ok(Buffers {
            readable: Bytes::from(readable),
            writable,
        })
    }

    fn writable_len(&self) -> usize {
        self.writable.iter().map(|&(_, l)| l as usize).sum()
    }

    /// Writes `bytes` at `offset` of the writable part; returns how many were written (less
    /// when the buffers end or a region is not guest memory).
    fn write(&self, mem: &GuestMemoryMmap<BitmapMmapRegion>, offset: usize, bytes: &[u8]) -> usize {
        let mut skip = offset;
        let mut done = 0;
        for &(addr, len) in &self.writable {
            let len = len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(bytes.len() - done);
            let Some(at) = addr.0.checked_add(skip as u64).map(GuestAddress) else {
                return done;
            };
            if write_guest(mem, at, &bytes[done..done + n]).is_err() {
                return done;
            }
            done += n;
            skip = 0;
            if done == bytes.len() {
                break;
            }
        }
        done
    }
}

/// Copies guest memory at `addr` into `buf`: one slice copy when the range lies in one
/// region (the common case; vm-memory's general path costs more than a small copy).
fn read_guest(
    mem: &GuestMemoryMmap<BitmapMmapRegion>,
    addr: GuestAddress,
    buf: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    if let Some((region, at)) = mem.to_region_addr(addr) {
        if let Ok(slice) = region.get_slice(at, buf.len()) {
            slice.copy_to(buf);
            return Ok(());
        }
    }
    mem.read_slice(buf, addr)
}

/// Copies `bytes` into guest memory at `addr`, marking the pages dirty for migration.
fn write_guest(
    mem: &GuestMemoryMmap<BitmapMmapRegion>,
    addr: GuestAddress,
    bytes: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    if let Some((region, at)) = mem.to_region_addr(addr) {
        if let Ok(slice) = region.get_slice(at, bytes.len()) {
            slice.copy_from(bytes);
            return Ok(());
        }
    }
    mem.write_slice(bytes, addr)
}

/// The rust-vmm back-end trait, for a shared device.
#[derive(Clone)]
pub(crate) struct SharedDevice(pub(crate) Arc<Device>);

impl VhostUserBackend for SharedDevice {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<Memory>;

    fn num_queues(&self) -> usize {
        self.0.num_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.bus.config.queue_size)
    }

    fn features(&self) -> u64 {
        let common = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        match self.0.kind() {
            FrontendKind::Scsi => common | vscsi::F_CHANGE,
            FrontendKind::Blk => {
                common
                    | blk::F_SEG_MAX
                    | blk::F_BLK_SIZE
                    | blk::F_FLUSH
                    | blk::F_TOPOLOGY
                    | blk::F_MQ
            }
        }
    }

    fn acked_features(&self, features: u64) {
        self.0.acked.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let common = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK;
        match self.0.kind() {
            FrontendKind::Scsi => common,
            FrontendKind::Blk => common | VhostUserProtocolFeatures::CONFIG,
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        if self.0.kind() != FrontendKind::Blk {
            return Vec::new();
        }
        let bus = &self.0.bus;
        let Some(identity) = bus.runtime.block_on(bus.blk_identity()) else {
            return Vec::new();
        };
        let seg_max = u32::from(bus.config.queue_size).saturating_sub(2).max(1);
        let config = blk::encode_config(&identity.geometry, seg_max, bus.config.request_queues);
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        let mut out = config[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, _mem: Memory) -> std::io::Result<()> {
        // The daemon replaces the mappings inside the shared GuestMemoryAtomic we gave it.
        Ok(())
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.0.exit.get(thread_index)?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        let drained = self.0.drain(queue_index as usize);
        self.0
            .bus
            .ring_stops
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        drained
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else {
            return Ok(());
        };
        if self.0.kind() == FrontendKind::Scsi && device_event == vscsi::EVENT_QUEUE {
            // Event buffers stay on the ring until there is something to tell; remember where.
            let mut events = lock(&self.0.events);
            events.vring = Some(vring.clone());
            let missed = events.missed;
            drop(events);
            if missed {
                self.0
                    .send_event(vscsi::encode_event(vscsi::T_NO_EVENT, 0, 0));
            }
            return Ok(());
        }
        self.0.process_queue(index, vring);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions(writable: &[(u64, u32)]) -> Buffers {
        Buffers {
            readable: Bytes::new(),
            writable: writable
                .iter()
                .map(|&(a, l)| (GuestAddress(a), l))
                .collect(),
        }
    }

    #[test]
    fn scattered_writes_land_in_order_and_stop_at_the_end() {
        let mem: GuestMemoryMmap<BitmapMmapRegion> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let b = regions(&[(0x100, 4), (0x200, 2), (0x300, 10)]);
        assert_eq!(b.writable_len(), 16);
        assert_eq!(b.write(&mem, 0, b"abcdefgh"), 8);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x100)).unwrap();
        assert_eq!(&got, b"abcd");
        mem.read_slice(&mut got[..2], GuestAddress(0x200)).unwrap();
        assert_eq!(&got[..2], b"ef");
        mem.read_slice(&mut got[..2], GuestAddress(0x300)).unwrap();
        assert_eq!(&got[..2], b"gh");
        assert_eq!(
            b.write(&mem, 14, b"xyz"),
            2,
            "cut at the end of the buffers"
        );
        assert_eq!(b.write(&mem, 5, b"Q"), 1);
        mem.read_slice(&mut got[..2], GuestAddress(0x200)).unwrap();
        assert_eq!(&got[..2], b"eQ");
        let outside = regions(&[(0x20000, 8)]);
        assert_eq!(outside.write(&mem, 0, b"abc"), 0, "not guest memory");
    }
}
