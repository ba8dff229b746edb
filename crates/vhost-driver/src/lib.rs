//! A host-side vhost-user front end (the role a VMM plays) for tests and benchmarks of
//! vhost-user-scsi and vhost-user-blk back ends.
//!
//! [`Driver::connect`] sets the back end up as a VMM would: owner, features, one memfd of guest
//! memory, and every virtqueue (split layout, driver side implemented here). Then requests go in
//! blocking ([`Driver::scsi_command`], [`Driver::blk_request`], control and event queues) or
//! pipelined ([`Driver::submit_scsi`], [`Driver::submit_blk`], then [`Driver::reap`]).
//! Bad-input tests write descriptors verbatim ([`Driver::submit_raw`]); migration tests turn on
//! dirty logging and stop queues.
//!
//! Queue numbering: `queue` in `submit_scsi`, `submit_blk` and [`Completion`] is the index of a
//! *request* queue (0 = the first one, for both kinds). `submit_raw`, `wait_used`,
//! `raw_head` and `stop_queue` take *virtqueue* indexes: for virtio-scsi 0 is the control
//! queue, 1 the event queue, 2.. the request queues; for virtio-blk 0.. are the request queues.
//!
//! Guest memory layout (guest-physical address 0 = offset 0 of the memfd): the virtqueues first
//! (4 KiB apart), then a 256-byte header area per request slot, then data buffers and
//! [`Driver::alloc`] allocations from a bump allocator.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

mod memory;
mod ring;
pub mod stamped;
pub mod wire;

use memory::{Bump, SharedMemory};
pub use ring::RawDescriptor;
use ring::{Buf, Layout, Ring};
use wire::features;
pub use wire::BlkConfig;

/// Which virtio device the back end serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-scsi: control, event and request queues.
    Scsi,
    /// virtio-blk: request queues only.
    Blk,
}

/// How to set the back end up.
#[derive(Clone, Copy, Debug)]
pub struct DriverOptions {
    /// Device type.
    pub kind: DeviceKind,
    /// Request queues (default 1).
    pub request_queues: u16,
    /// Entries per virtqueue, a power of two (default 128).
    pub queue_size: u16,
    /// Guest memory size (default 64 MiB).
    pub memory_bytes: u64,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            kind: DeviceKind::Scsi,
            request_queues: 1,
            queue_size: 128,
            memory_bytes: 64 << 20,
        }
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A system call failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A vhost-user message failed (the back end refused it or the socket broke).
    #[error("vhost-user: {0}")]
    Vhost(String),
    /// The back end did not complete something in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The back end or the caller broke the rules (bad used element, ring full, feature
    /// missing, memory exhausted).
    #[error("protocol: {0}")]
    Protocol(String),
}

fn vhost_err(what: &'static str) -> impl FnOnce(vhost::Error) -> DriverError {
    move |e| DriverError::Vhost(format!("{what}: {e}"))
}

/// The outcome of a blocking virtio-scsi command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiReply {
    /// virtio-scsi response (VIRTIO_SCSI_S_*; 0 = OK).
    pub response: u8,
    /// SCSI status byte.
    pub status: u8,
    /// Sense data (sense_len bytes, at most 96).
    pub sense: Vec<u8>,
    /// Residual count.
    pub resid: u32,
    /// Data-in: `read_len - resid` bytes.
    pub data: Vec<u8>,
}

/// A finished pipelined request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Request queue index (0 = first request queue).
    pub queue: u16,
    /// The caller's token.
    pub id: u64,
    /// Bytes the device reports written (the used element's len).
    pub used_len: u32,
    /// virtio-scsi: the SCSI status byte; virtio-blk: the request status (0 = OK).
    pub status: u8,
    /// virtio-scsi: the virtio-scsi response byte (0 = OK); virtio-blk: always 0.
    pub response: u8,
}

/// Header area per slot: request header at 0, response/status at 128.
const SLOT_HDR: u64 = 256;
const RESP_OFF: u64 = 128;
const NONE: u16 = u16::MAX;
/// How long a blocking request may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Read timeout on the vhost-user socket (a dead back end must not hang the caller forever).
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SlotKind {
    /// Pipelined virtio-scsi command: reaped as a Completion.
    Scsi,
    /// Pipelined virtio-blk request: reaped as a Completion.
    Blk,
    /// Blocking request: the waiter picks it up.
    Wait,
    /// Event-queue buffer.
    Event,
    /// A blocking request that timed out: freed when the device finally uses it.
    Abandoned,
}

struct Slot {
    kind: SlotKind,
    id: u64,
    descs: [u16; 4],
    ndesc: u8,
    /// Data buffer (lazily allocated, grown by reallocation).
    data: u64,
    data_cap: u32,
    done: Option<u32>,
}

struct Queue {
    ring: Ring,
    kick: EventFd,
    /// Chains published but not kicked yet (batching).
    kick_pending: bool,
    call: EventFd,
    hdr_base: u64,
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    /// Slot of the chain whose head is the index, or NONE.
    head_slot: Vec<u16>,
    /// Length of the raw chain whose head is the index, or 0.
    raw_len: Vec<u16>,
    raw_done: Vec<Option<u32>>,
    events_done: Vec<u16>,
}

impl Queue {
    fn slot_hdr(&self, slot: u16) -> u64 {
        self.hdr_base + SLOT_HDR * u64::from(slot)
    }
}

/// The dirty-log bitmap shared with the back end.
struct DirtyLog {
    map: SharedMemory,
    pages: u64,
}

/// A vhost-user front end with its own guest memory. `Send`; meant for one thread.
pub struct Driver {
    kind: DeviceKind,
    frontend: Frontend,
    /// A second handle on the vhost-user socket, for the one message written by hand
    /// (SET_LOG_BASE with a shared-memory log, whose reply the `vhost` crate cannot read from
    /// every back end).
    sock: UnixStream,
    mem: SharedMemory,
    bump: Bump,
    queues: Vec<Queue>,
    request_base: u16,
    offered: u64,
    acked: u64,
    protocol: VhostUserProtocolFeatures,
    ready: Vec<Completion>,
    /// Kicks deferred to [`Driver::kick`].
    batching: bool,
    log: Option<DirtyLog>,
}

impl Driver {
    /// Connects (retrying for up to 5 s while the socket is missing or refuses) and sets the
    /// back end up: SET_OWNER, features (VERSION_1, PROTOCOL_FEATURES and the device features
    /// understood; protocol features MQ, CONFIG, REPLY_ACK, LOG_SHMFD when offered), one memfd
    /// region, then every virtqueue (NUM, ADDR, BASE, CALL, KICK, ENABLE).
    pub fn connect(socket: &Path, options: DriverOptions) -> Result<Driver, DriverError> {
        let n = options.queue_size;
        if n == 0 || !n.is_power_of_two() || n > 32768 {
            return Err(DriverError::Protocol(format!(
                "queue size {n} is not a power of two up to 32768"
            )));
        }
        if options.request_queues == 0 {
            return Err(DriverError::Protocol("no request queues".into()));
        }
        let (request_base, nqueues) = match options.kind {
            DeviceKind::Scsi => (2u16, 2 + u64::from(options.request_queues)),
            DeviceKind::Blk => (0u16, u64::from(options.request_queues)),
        };
        let stream = connect_retry(socket, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(SOCKET_TIMEOUT))?;
        stream.set_write_timeout(Some(SOCKET_TIMEOUT))?;
        let sock = stream.try_clone()?;
        let mut frontend = Frontend::from_stream(stream, nqueues);

        frontend.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vhost_err("GET_FEATURES"))?;
        if offered & features::VERSION_1 == 0 {
            return Err(DriverError::Protocol(format!(
                "the back end does not offer VIRTIO_F_VERSION_1 (features {offered:#x})"
            )));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & features::PROTOCOL_FEATURES != 0 {
            let theirs = frontend
                .get_protocol_features()
                .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
            protocol = theirs
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::LOG_SHMFD);
            frontend
                .set_protocol_features(protocol)
                .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every message without a reply of its own gets an ack: errors surface at once.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let max = frontend
                    .get_queue_num()
                    .map_err(vhost_err("GET_QUEUE_NUM"))?;
                // For virtio-scsi back ends count request queues or all queues; accept either
                // as long as the requested request queues fit.
                let needed = u64::from(options.request_queues);
                if max < needed {
                    return Err(DriverError::Protocol(format!(
                        "the back end has {max} queues, {needed} request queues asked for"
                    )));
                }
            }
        }
        let device = match options.kind {
            DeviceKind::Scsi => features::SCSI_UNDERSTOOD,
            DeviceKind::Blk => features::BLK_UNDERSTOOD,
        };
        let acked = offered & (device | features::VERSION_1 | features::PROTOCOL_FEATURES);
        frontend
            .set_features(acked)
            .map_err(vhost_err("SET_FEATURES"))?;

        // Layout: rings, slot headers, then data.
        let mut at = 0u64;
        let mut layouts = Vec::new();
        for _ in 0..nqueues {
            let (l, end) = Layout::at(at, n);
            layouts.push(l);
            at = end.next_multiple_of(4096);
        }
        let mut hdr_bases = Vec::new();
        for _ in 0..nqueues {
            hdr_bases.push(at);
            at += SLOT_HDR * u64::from(n);
        }
        let fixed = at.next_multiple_of(4096);
        if options.memory_bytes < fixed + 4096 {
            return Err(DriverError::Protocol(format!(
                "{} bytes of guest memory do not hold the rings ({fixed} bytes)",
                options.memory_bytes
            )));
        }
        let mem = SharedMemory::new("viscsi-vhost-driver-guest", options.memory_bytes)?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.len(),
            userspace_addr: mem.host_addr(),
            mmap_offset: 0,
            mmap_handle: mem.fd(),
        };
        frontend
            .set_mem_table(&[region])
            .map_err(vhost_err("SET_MEM_TABLE"))?;

        let mut queues = Vec::new();
        for (i, (layout, hdr_base)) in layouts.into_iter().zip(hdr_bases).enumerate() {
            let kick = EventFd::new(EFD_NONBLOCK)?;
            let call = EventFd::new(EFD_NONBLOCK)?;
            frontend
                .set_vring_num(i, n)
                .map_err(vhost_err("SET_VRING_NUM"))?;
            frontend
                .set_vring_addr(i, &vring_config(mem.host_addr(), layout, None))
                .map_err(vhost_err("SET_VRING_ADDR"))?;
            frontend
                .set_vring_base(i, 0)
                .map_err(vhost_err("SET_VRING_BASE"))?;
            frontend
                .set_vring_call(i, &call)
                .map_err(vhost_err("SET_VRING_CALL"))?;
            frontend
                .set_vring_kick(i, &kick)
                .map_err(vhost_err("SET_VRING_KICK"))?;
            let nn = usize::from(n);
            queues.push(Queue {
                ring: Ring::new(layout),
                kick,
                kick_pending: false,
                call,
                hdr_base,
                slots: (0..n)
                    .map(|_| Slot {
                        kind: SlotKind::Wait,
                        id: 0,
                        descs: [0; 4],
                        ndesc: 0,
                        data: 0,
                        data_cap: 0,
                        done: None,
                    })
                    .collect(),
                free_slots: (0..n).rev().collect(),
                head_slot: vec![NONE; nn],
                raw_len: vec![0; nn],
                raw_done: vec![None; nn],
                events_done: Vec::new(),
            });
        }
        if acked & features::PROTOCOL_FEATURES != 0 {
            for i in 0..queues.len() {
                frontend
                    .set_vring_enable(i, true)
                    .map_err(vhost_err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(Driver {
            kind: options.kind,
            frontend,
            sock,
            bump: Bump::new(fixed, mem.len()),
            mem,
            queues,
            request_base,
            offered,
            acked,
            protocol,
            ready: Vec::new(),
            batching: false,
            log: None,
        })
    }

    /// The virtio features the back end offered.
    pub fn features(&self) -> u64 {
        self.offered
    }

    /// The virtio features this driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// The device kind.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Number of request queues.
    pub fn request_queues(&self) -> u16 {
        self.queues.len() as u16 - self.request_base
    }

    /// Free guest memory left for data buffers and `alloc`.
    pub fn memory_left(&self) -> u64 {
        self.bump.remaining()
    }

    /// The virtqueue index of request queue `queue`.
    pub fn request_vq(&self, queue: u16) -> u16 {
        self.request_base + queue
    }

    fn check_vq(&self, vq: u16) -> Result<usize, DriverError> {
        if usize::from(vq) < self.queues.len() {
            Ok(usize::from(vq))
        } else {
            Err(DriverError::Protocol(format!("no virtqueue {vq}")))
        }
    }

    fn request_queue(&self, queue: u16) -> Result<usize, DriverError> {
        if queue < self.request_queues() {
            Ok(usize::from(self.request_base + queue))
        } else {
            Err(DriverError::Protocol(format!("no request queue {queue}")))
        }
    }

    fn need_kind(&self, kind: DeviceKind) -> Result<(), DriverError> {
        if self.kind == kind {
            Ok(())
        } else {
            Err(DriverError::Protocol(format!(
                "not a {kind:?} device (this is {:?})",
                self.kind
            )))
        }
    }

    /// Takes a free slot whose data buffer holds at least `data_len` bytes.
    fn take_slot(&mut self, vq: usize, data_len: u32) -> Result<u16, DriverError> {
        let q = &mut self.queues[vq];
        let Some(slot) = q.free_slots.pop() else {
            return Err(DriverError::Protocol(format!("virtqueue {vq} is full")));
        };
        let s = &mut q.slots[usize::from(slot)];
        if s.data_cap < data_len {
            let Some(addr) = self.bump.alloc(u64::from(data_len), 4096) else {
                q.free_slots.push(slot);
                return Err(DriverError::Protocol(format!(
                    "guest memory exhausted ({} bytes left, {data_len} needed)",
                    self.bump.remaining()
                )));
            };
            s.data = addr;
            s.data_cap = data_len;
        }
        s.done = None;
        Ok(slot)
    }

    /// Puts the chain on the ring for `slot`, publishes it and kicks.
    fn push(
        &mut self,
        vq: usize,
        slot: u16,
        kind: SlotKind,
        id: u64,
        bufs: &[Buf],
    ) -> Result<(), DriverError> {
        let q = &mut self.queues[vq];
        let mut taken = [0u16; 4];
        let Some(head) = q.ring.add_chain(&self.mem, bufs, &mut taken) else {
            q.free_slots.push(slot);
            return Err(DriverError::Protocol(format!(
                "virtqueue {vq} is full ({} free descriptors)",
                q.ring.free_descriptors()
            )));
        };
        let s = &mut q.slots[usize::from(slot)];
        s.kind = kind;
        s.id = id;
        s.descs = taken;
        s.ndesc = bufs.len() as u8;
        q.head_slot[usize::from(head)] = slot;
        if q.ring.publish(&self.mem, head) {
            if self.batching {
                q.kick_pending = true;
            } else {
                q.kick.write(1)?;
            }
        }
        Ok(())
    }

    /// With batching on, submissions only publish their chains; [`Driver::kick`] then
    /// notifies the back end once for all of them, as a guest's block layer does at the end
    /// of a batch.
    pub fn set_batching(&mut self, on: bool) {
        self.batching = on;
    }

    /// Notifies the back end of every queue with chains published since the last kick.
    pub fn kick(&mut self) -> Result<(), DriverError> {
        for q in &mut self.queues {
            if std::mem::take(&mut q.kick_pending) {
                q.kick.write(1)?;
            }
        }
        Ok(())
    }

    /// Moves used elements of `vq` to where their owners look for them.
    fn harvest(&mut self, vq: usize) -> Result<(), DriverError> {
        let q = &mut self.queues[vq];
        while let Some((id, len)) = q.ring.pop_used(&self.mem) {
            let head = usize::try_from(id).unwrap_or(usize::MAX);
            if head >= q.head_slot.len() {
                return Err(DriverError::Protocol(format!(
                    "virtqueue {vq}: used id {id} out of range"
                )));
            }
            let slot = q.head_slot[head];
            if slot != NONE {
                q.head_slot[head] = NONE;
                let s = &mut q.slots[usize::from(slot)];
                q.ring
                    .release(s.descs[..usize::from(s.ndesc)].iter().copied());
                match s.kind {
                    SlotKind::Scsi | SlotKind::Blk => {
                        let at = q.hdr_base + SLOT_HDR * u64::from(slot) + RESP_OFF;
                        let (status, response) = if s.kind == SlotKind::Scsi {
                            let b = self.mem.read(at + 10, 2);
                            (b[0], b[1])
                        } else {
                            (self.mem.read(at, 1)[0], 0)
                        };
                        self.ready.push(Completion {
                            queue: vq as u16 - self.request_base,
                            id: s.id,
                            used_len: len,
                            status,
                            response,
                        });
                        q.free_slots.push(slot);
                    }
                    SlotKind::Wait => s.done = Some(len),
                    SlotKind::Event => q.events_done.push(slot),
                    SlotKind::Abandoned => q.free_slots.push(slot),
                }
            } else if q.raw_len[head] != 0 {
                q.raw_done[head] = Some(len);
            } else {
                return Err(DriverError::Protocol(format!(
                    "virtqueue {vq}: used id {id} is not in flight"
                )));
            }
        }
        Ok(())
    }

    /// Waits on the call eventfds of `vqs` (poll(2)) for at most `timeout`, then clears the
    /// ones that fired.
    fn wait_call(&self, vqs: &[usize], timeout: Duration) -> Result<(), DriverError> {
        let mut fds: Vec<libc::pollfd> = vqs
            .iter()
            .map(|&vq| libc::pollfd {
                fd: self.queues[vq].call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of fds.len() pollfd structures for the whole call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        for (p, &vq) in fds.iter().zip(vqs) {
            if p.revents & libc::POLLIN != 0 {
                // Non-blocking: EAGAIN just means someone read it already.
                let _ = self.queues[vq].call.read();
            }
        }
        Ok(())
    }

    /// Waits for the blocking request in `slot` of `vq`; returns the used length and frees the
    /// slot.
    fn wait_slot(
        &mut self,
        vq: usize,
        slot: u16,
        timeout: Duration,
        what: &'static str,
    ) -> Result<u32, DriverError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.harvest(vq)?;
            let q = &mut self.queues[vq];
            if let Some(len) = q.slots[usize::from(slot)].done.take() {
                q.free_slots.push(slot);
                return Ok(len);
            }
            let now = Instant::now();
            if now >= deadline {
                q.slots[usize::from(slot)].kind = SlotKind::Abandoned;
                return Err(DriverError::Timeout(what));
            }
            self.wait_call(&[vq], deadline - now)?;
        }
    }

    /// Sends one virtio-scsi command on request queue 0 and waits (10 s) for it. The LUN is
    /// single-level addressed on target 0; `cdb` is padded to 32 bytes.
    pub fn scsi_command(
        &mut self,
        lun: u16,
        cdb: &[u8],
        data_out: &[u8],
        read_len: u32,
    ) -> Result<ScsiReply, DriverError> {
        self.need_kind(DeviceKind::Scsi)?;
        let vq = self.request_queue(0)?;
        let out_len = u32::try_from(data_out.len())
            .map_err(|_| DriverError::Protocol("data-out too large".into()))?;
        let slot = self.take_slot(vq, out_len.saturating_add(read_len))?;
        let (hdr, data) = {
            let q = &self.queues[vq];
            (q.slot_hdr(slot), q.slots[usize::from(slot)].data)
        };
        self.mem
            .write(hdr, &wire::scsi_cmd_req(lun, u64::from(slot), cdb));
        self.mem.fill(hdr + RESP_OFF, wire::SCSI_RESP_LEN, 0);
        self.mem.write(data, data_out);
        let bufs = scsi_chain(hdr, data, out_len, read_len);
        self.push(vq, slot, SlotKind::Wait, 0, &bufs.0[..bufs.1])?;
        self.wait_slot(vq, slot, COMMAND_TIMEOUT, "a virtio-scsi command")?;
        let mut resp = [0u8; wire::SCSI_RESP_LEN];
        self.mem.read_into(hdr + RESP_OFF, &mut resp);
        let r = wire::parse_scsi_resp(&resp);
        let sense_len = (r.sense_len as usize).min(wire::SENSE_SIZE);
        let data_len = read_len.saturating_sub(r.resid) as usize;
        Ok(ScsiReply {
            response: r.response,
            status: r.status,
            sense: resp[12..12 + sense_len].to_vec(),
            resid: r.resid,
            data: self.mem.read(data + u64::from(out_len), data_len),
        })
    }

    /// A blocking control-queue request: `req` device-readable, `resp_len` bytes
    /// device-writable; returns the response bytes.
    fn control(&mut self, req: &[u8], resp_len: u32) -> Result<Vec<u8>, DriverError> {
        self.need_kind(DeviceKind::Scsi)?;
        let vq = 0;
        let slot = self.take_slot(vq, 0)?;
        let hdr = self.queues[vq].slot_hdr(slot);
        self.mem.write(hdr, req);
        self.mem.fill(hdr + RESP_OFF, resp_len as usize, 0);
        let bufs = [
            Buf {
                addr: hdr,
                len: req.len() as u32,
                writable: false,
            },
            Buf {
                addr: hdr + RESP_OFF,
                len: resp_len,
                writable: true,
            },
        ];
        self.push(vq, slot, SlotKind::Wait, 0, &bufs)?;
        self.wait_slot(vq, slot, COMMAND_TIMEOUT, "a virtio-scsi control request")?;
        Ok(self.mem.read(hdr + RESP_OFF, resp_len as usize))
    }

    /// A task management function (VIRTIO_SCSI_T_TMF with `subtype`) on the control queue;
    /// returns the response byte.
    pub fn scsi_tmf(&mut self, subtype: u32, lun: u16, tag: u64) -> Result<u8, DriverError> {
        let r = self.control(&wire::tmf_req(subtype, lun, tag), 1)?;
        Ok(r[0])
    }

    /// VIRTIO_SCSI_T_AN_QUERY for LUN 0; returns (event_actual, response).
    pub fn scsi_an_query(&mut self, event_requested: u32) -> Result<(u32, u8), DriverError> {
        let r = self.control(&wire::an_query_req(0, event_requested), 5)?;
        Ok((u32::from_le_bytes([r[0], r[1], r[2], r[3]]), r[4]))
    }

    /// Gives the event queue `count` 16-byte device-writable buffers.
    pub fn post_event_buffers(&mut self, count: u16) -> Result<(), DriverError> {
        self.need_kind(DeviceKind::Scsi)?;
        for _ in 0..count {
            let slot = self.take_slot(1, 0)?;
            self.post_event(slot)?;
        }
        Ok(())
    }

    fn post_event(&mut self, slot: u16) -> Result<(), DriverError> {
        let hdr = self.queues[1].slot_hdr(slot);
        self.mem.fill(hdr, 16, 0);
        let bufs = [Buf {
            addr: hdr,
            len: 16,
            writable: true,
        }];
        self.push(1, slot, SlotKind::Event, 0, &bufs)
    }

    /// Waits up to `timeout` for events (struct virtio_scsi_event) on the event queue; returns
    /// those that arrived (empty on timeout) and posts their buffers again.
    pub fn poll_events(&mut self, timeout: Duration) -> Result<Vec<[u8; 16]>, DriverError> {
        self.need_kind(DeviceKind::Scsi)?;
        let deadline = Instant::now() + timeout;
        loop {
            self.harvest(1)?;
            if !self.queues[1].events_done.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            self.wait_call(&[1], deadline - now)?;
        }
        let slots = std::mem::take(&mut self.queues[1].events_done);
        let mut events = Vec::with_capacity(slots.len());
        for slot in slots {
            let mut e = [0u8; 16];
            self.mem.read_into(self.queues[1].slot_hdr(slot), &mut e);
            events.push(e);
            self.post_event(slot)?;
        }
        Ok(events)
    }

    /// Reads the virtio-blk configuration space (GET_CONFIG; needs the CONFIG protocol
    /// feature).
    pub fn blk_config(&mut self) -> Result<BlkConfig, DriverError> {
        self.need_kind(DeviceKind::Blk)?;
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(DriverError::Protocol(
                "the back end does not offer VHOST_USER_PROTOCOL_F_CONFIG".into(),
            ));
        }
        let buf = [0u8; wire::BLK_CONFIG_LEN];
        let (_, payload) = self
            .frontend
            .get_config(0, buf.len() as u32, VhostUserConfigFlags::empty(), &buf)
            .map_err(vhost_err("GET_CONFIG"))?;
        let bytes: [u8; wire::BLK_CONFIG_LEN] = payload
            .get(..wire::BLK_CONFIG_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| DriverError::Protocol("short GET_CONFIG reply".into()))?;
        Ok(BlkConfig::parse(&bytes))
    }

    /// One virtio-blk request on request queue 0, waited for (10 s): header, `data_out`
    /// (device-readable) and/or `read_len` bytes (device-writable), 1-byte status. Returns the
    /// status and the bytes read.
    pub fn blk_request(
        &mut self,
        req_type: u32,
        sector: u64,
        data_out: &[u8],
        read_len: u32,
    ) -> Result<(u8, Vec<u8>), DriverError> {
        self.need_kind(DeviceKind::Blk)?;
        let vq = self.request_queue(0)?;
        let out_len = u32::try_from(data_out.len())
            .map_err(|_| DriverError::Protocol("data-out too large".into()))?;
        let slot = self.take_slot(vq, out_len.saturating_add(read_len))?;
        let (hdr, data) = {
            let q = &self.queues[vq];
            (q.slot_hdr(slot), q.slots[usize::from(slot)].data)
        };
        self.mem.write(hdr, &wire::blk_header(req_type, sector));
        self.mem.write(hdr + RESP_OFF, &[0xff]);
        self.mem.write(data, data_out);
        let bufs = blk_chain(hdr, data, out_len, read_len);
        self.push(vq, slot, SlotKind::Wait, 0, &bufs.0[..bufs.1])?;
        self.wait_slot(vq, slot, COMMAND_TIMEOUT, "a virtio-blk request")?;
        let status = self.mem.read(hdr + RESP_OFF, 1)[0];
        Ok((
            status,
            self.mem.read(data + u64::from(out_len), read_len as usize),
        ))
    }

    /// Submits a virtio-scsi command on request queue `queue` without waiting. Data comes from
    /// / goes to the slot's preallocated buffer in guest memory (data-out is whatever the
    /// buffer holds). Fails if the queue is full.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_scsi(
        &mut self,
        queue: u16,
        id: u64,
        lun: u16,
        cdb: &[u8],
        data_out_len: u32,
        read_len: u32,
    ) -> Result<(), DriverError> {
        self.need_kind(DeviceKind::Scsi)?;
        let vq = self.request_queue(queue)?;
        let slot = self.take_slot(vq, data_out_len.saturating_add(read_len))?;
        let (hdr, data) = {
            let q = &self.queues[vq];
            (q.slot_hdr(slot), q.slots[usize::from(slot)].data)
        };
        self.mem.write(hdr, &wire::scsi_cmd_req(lun, id, cdb));
        let bufs = scsi_chain(hdr, data, data_out_len, read_len);
        self.push(vq, slot, SlotKind::Scsi, id, &bufs.0[..bufs.1])
    }

    /// Like [`Driver::submit_scsi`], with the caller's buffer at guest address `addr` (from
    /// [`Driver::alloc`]): `data_out_len` bytes of data-out from its start, then `read_len`
    /// bytes of data-in after them. Fill it before a write, read it after a read completed.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_scsi_buf(
        &mut self,
        queue: u16,
        id: u64,
        lun: u16,
        cdb: &[u8],
        addr: u64,
        data_out_len: u32,
        read_len: u32,
    ) -> Result<(), DriverError> {
        self.need_kind(DeviceKind::Scsi)?;
        let vq = self.request_queue(queue)?;
        let slot = self.take_slot(vq, 0)?;
        let hdr = self.queues[vq].slot_hdr(slot);
        self.mem.write(hdr, &wire::scsi_cmd_req(lun, id, cdb));
        let bufs = scsi_chain(hdr, addr, data_out_len, read_len);
        self.push(vq, slot, SlotKind::Scsi, id, &bufs.0[..bufs.1])
    }

    /// Submits a virtio-blk request on request queue `queue` without waiting: `len` bytes of
    /// the slot's preallocated buffer, device-readable for writes (T_OUT, DISCARD,
    /// WRITE_ZEROES), device-writable otherwise. Fails if the queue is full.
    pub fn submit_blk(
        &mut self,
        queue: u16,
        id: u64,
        req_type: u32,
        sector: u64,
        len: u32,
    ) -> Result<(), DriverError> {
        self.submit_blk_inner(queue, id, req_type, sector, None, len)
    }

    /// Like [`Driver::submit_blk`], with the caller's buffer at guest address `addr` (from
    /// [`Driver::alloc`]): fill it before a write, read it after a read completed.
    pub fn submit_blk_buf(
        &mut self,
        queue: u16,
        id: u64,
        req_type: u32,
        sector: u64,
        addr: u64,
        len: u32,
    ) -> Result<(), DriverError> {
        self.submit_blk_inner(queue, id, req_type, sector, Some(addr), len)
    }

    fn submit_blk_inner(
        &mut self,
        queue: u16,
        id: u64,
        req_type: u32,
        sector: u64,
        buf: Option<u64>,
        len: u32,
    ) -> Result<(), DriverError> {
        self.need_kind(DeviceKind::Blk)?;
        let vq = self.request_queue(queue)?;
        let slot = self.take_slot(vq, if buf.is_some() { 0 } else { len })?;
        let (hdr, data) = {
            let q = &self.queues[vq];
            (
                q.slot_hdr(slot),
                buf.unwrap_or(q.slots[usize::from(slot)].data),
            )
        };
        self.mem.write(hdr, &wire::blk_header(req_type, sector));
        let writes = matches!(
            req_type,
            wire::blk::T_OUT | wire::blk::T_DISCARD | wire::blk::T_WRITE_ZEROES
        );
        let (out, inn) = if writes { (len, 0) } else { (0, len) };
        let bufs = blk_chain(hdr, data, out, inn);
        self.push(vq, slot, SlotKind::Blk, id, &bufs.0[..bufs.1])
    }

    /// Waits (poll(2) on the call eventfds) until at least one pipelined request completed or
    /// `timeout` passed; returns the completions (empty on timeout).
    pub fn reap(&mut self, timeout: Duration) -> Result<Vec<Completion>, DriverError> {
        let deadline = Instant::now() + timeout;
        let vqs: Vec<usize> = (usize::from(self.request_base)..self.queues.len()).collect();
        loop {
            for &vq in &vqs {
                self.harvest(vq)?;
            }
            if !self.ready.is_empty() {
                return Ok(std::mem::take(&mut self.ready));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            self.wait_call(&vqs, deadline - now)?;
        }
    }

    /// Writes `chain` verbatim into consecutive free descriptors of virtqueue `queue` and makes
    /// it available; returns the head. `next` fields are written as given: use
    /// [`Driver::raw_head`] first to know where the chain will land.
    pub fn submit_raw(&mut self, queue: u16, chain: &[RawDescriptor]) -> Result<u16, DriverError> {
        let vq = self.check_vq(queue)?;
        if chain.is_empty() {
            return Err(DriverError::Protocol("empty raw chain".into()));
        }
        let q = &mut self.queues[vq];
        let Some(head) = q.ring.add_raw(&self.mem, chain) else {
            return Err(DriverError::Protocol(format!(
                "virtqueue {vq}: no {} consecutive free descriptors",
                chain.len()
            )));
        };
        q.raw_len[usize::from(head)] = chain.len() as u16;
        q.raw_done[usize::from(head)] = None;
        if q.ring.publish(&self.mem, head) {
            q.kick.write(1)?;
        }
        Ok(head)
    }

    /// The head `submit_raw` would use for a chain of `len` descriptors on virtqueue `queue`.
    pub fn raw_head(&self, queue: u16, len: usize) -> Option<u16> {
        self.queues.get(usize::from(queue))?.ring.raw_head(len)
    }

    /// Guest address of a fresh zeroed buffer of `len` bytes (8-aligned). Panics when guest
    /// memory is exhausted (test helper).
    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self
            .bump
            .alloc(u64::from(len), 8)
            .expect("vhost-driver guest memory exhausted");
        self.mem.fill(addr, len as usize, 0);
        addr
    }

    /// Writes bytes into guest memory. Panics outside guest memory.
    pub fn write_guest(&mut self, addr: u64, bytes: &[u8]) {
        self.mem.write(addr, bytes);
    }

    /// Reads bytes from guest memory. Panics outside guest memory.
    pub fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        self.mem.read(addr, len)
    }

    /// Waits until the raw chain `head` of virtqueue `queue` is used; returns its used length
    /// (and frees its descriptors), or None on timeout.
    pub fn wait_used(
        &mut self,
        queue: u16,
        head: u16,
        timeout: Duration,
    ) -> Result<Option<u32>, DriverError> {
        let vq = self.check_vq(queue)?;
        let h = usize::from(head);
        if h >= self.queues[vq].raw_len.len() || self.queues[vq].raw_len[h] == 0 {
            return Err(DriverError::Protocol(format!(
                "virtqueue {vq}: no raw chain at head {head}"
            )));
        }
        let deadline = Instant::now() + timeout;
        loop {
            self.harvest(vq)?;
            let q = &mut self.queues[vq];
            if let Some(len) = q.raw_done[h].take() {
                let n = std::mem::take(&mut q.raw_len[h]);
                q.ring.release(head..head + n);
                return Ok(Some(len));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.wait_call(&[vq], deadline - now)?;
        }
    }

    /// Turns on dirty-page logging: SET_LOG_BASE with a memfd bitmap (1 bit per 4 KiB page of
    /// guest memory), SET_FEATURES with VHOST_F_LOG_ALL, and every ring's used-ring logging
    /// (SET_VRING_ADDR with VHOST_VRING_F_LOG, as a VMM does when migration starts). Fails if
    /// the back end does not offer LOG_ALL and LOG_SHMFD.
    pub fn enable_dirty_log(&mut self) -> Result<(), DriverError> {
        if self.offered & features::LOG_ALL == 0 {
            return Err(DriverError::Protocol(
                "the back end does not offer VHOST_F_LOG_ALL".into(),
            ));
        }
        if !self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
            return Err(DriverError::Protocol(
                "the back end does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD".into(),
            ));
        }
        let pages = self.mem.len().div_ceil(4096);
        let map = SharedMemory::new("viscsi-vhost-driver-log", pages.div_ceil(8))?;
        self.set_log_base(&map)?;
        self.acked |= features::LOG_ALL;
        self.frontend
            .set_features(self.acked)
            .map_err(vhost_err("SET_FEATURES (LOG_ALL)"))?;
        for (i, q) in self.queues.iter().enumerate() {
            self.frontend
                .set_vring_addr(
                    i,
                    &vring_config(
                        self.mem.host_addr(),
                        q.ring.layout,
                        Some(q.ring.layout.used),
                    ),
                )
                .map_err(vhost_err("SET_VRING_ADDR (log)"))?;
        }
        self.log = Some(DirtyLog { map, pages });
        Ok(())
    }

    /// SET_LOG_BASE with the log's memfd, written here: back ends answer it with a u64 or with
    /// the log description, and the `vhost` crate reads only the latter.
    fn set_log_base(&mut self, map: &SharedMemory) -> Result<(), DriverError> {
        const SET_LOG_BASE: u32 = 6;
        const VERSION: u32 = 0x1;
        const REPLY: u32 = 0x4;
        let mut msg = Vec::with_capacity(28);
        msg.extend_from_slice(&SET_LOG_BASE.to_le_bytes());
        msg.extend_from_slice(&VERSION.to_le_bytes());
        msg.extend_from_slice(&16u32.to_le_bytes());
        msg.extend_from_slice(&map.len().to_le_bytes()); // mmap_size
        msg.extend_from_slice(&0u64.to_le_bytes()); // mmap_offset
        let sent = self
            .sock
            .send_with_fd(&msg[..], map.fd())
            .map_err(|e| DriverError::Vhost(format!("SET_LOG_BASE: {e}")))?;
        if sent != msg.len() {
            return Err(DriverError::Vhost("SET_LOG_BASE: short send".into()));
        }
        let mut hdr = [0u8; 12];
        self.sock.read_exact(&mut hdr)?;
        let request = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(hdr[4..8].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes"));
        if request != SET_LOG_BASE || flags & REPLY == 0 || size > 64 {
            return Err(DriverError::Vhost(format!(
                "SET_LOG_BASE: unexpected reply (request {request}, flags {flags:#x}, size {size})"
            )));
        }
        // The body carries no status (libvhost-user echoes the first 8 bytes of the request).
        let mut body = vec![0u8; size as usize];
        self.sock.read_exact(&mut body)?;
        Ok(())
    }

    /// Guest page numbers (4 KiB pages) marked dirty since the last call; clears them. Empty
    /// if logging is off.
    pub fn dirty_pages(&mut self) -> Vec<u64> {
        let Some(log) = &self.log else {
            return Vec::new();
        };
        let mut pages = Vec::new();
        let words = log.map.len() / 8;
        for w in 0..words {
            let mut bits = u64::from_le(log.map.take_u64(w * 8));
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                let page = w * 64 + b;
                if page < log.pages {
                    pages.push(page);
                }
                bits &= bits - 1;
            }
        }
        pages
    }

    /// GET_VRING_BASE on virtqueue `queue`: the back end stops the queue (after draining it) and
    /// returns its next available index.
    pub fn stop_queue(&mut self, queue: u16) -> Result<u16, DriverError> {
        let vq = self.check_vq(queue)?;
        let base = self
            .frontend
            .get_vring_base(vq)
            .map_err(vhost_err("GET_VRING_BASE"))?;
        Ok(base as u16)
    }

    /// Requests handed to virtqueue `queue` and not yet used (0 for unknown queues).
    pub fn in_flight(&self, queue: u16) -> u16 {
        self.queues
            .get(usize::from(queue))
            .map_or(0, |q| q.ring.in_flight())
    }

    /// Closes the connection (the back end sees the socket close) and frees guest memory.
    pub fn disconnect(self) {
        drop(self);
    }
}

/// Connects to the socket, retrying while it is missing or refuses, up to `patience`.
fn connect_retry(socket: &Path, patience: Duration) -> Result<UnixStream, DriverError> {
    let deadline = Instant::now() + patience;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(DriverError::Io(std::io::Error::new(
                    e.kind(),
                    format!("connect {}: {e}", socket.display()),
                )))
            }
        }
    }
}

/// SET_VRING_ADDR's ring addresses are the front end's own (userspace) addresses, translated
/// by the back end through the memory table; the log address is guest-physical.
fn vring_config(host_base: u64, l: Layout, log: Option<u64>) -> VringConfigData {
    VringConfigData {
        queue_max_size: l.size,
        queue_size: l.size,
        flags: u32::from(log.is_some()),
        desc_table_addr: host_base + l.desc,
        used_ring_addr: host_base + l.used,
        avail_ring_addr: host_base + l.avail,
        log_addr: log,
    }
}

/// Up to four descriptors in chain order, without the empty ones.
fn chain_of(parts: [(u64, u32, bool); 4]) -> ([Buf; 4], usize) {
    let mut b = [Buf {
        addr: 0,
        len: 0,
        writable: false,
    }; 4];
    let mut n = 0;
    for (addr, len, writable) in parts {
        if len > 0 {
            b[n] = Buf {
                addr,
                len,
                writable,
            };
            n += 1;
        }
    }
    (b, n)
}

/// The virtio-scsi chain: request header, data-out, response, data-in.
fn scsi_chain(hdr: u64, data: u64, out: u32, inn: u32) -> ([Buf; 4], usize) {
    chain_of([
        (hdr, wire::SCSI_REQ_LEN as u32, false),
        (data, out, false),
        (hdr + RESP_OFF, wire::SCSI_RESP_LEN as u32, true),
        (data + u64::from(out), inn, true),
    ])
}

/// The virtio-blk chain: header, data-out, data-in, status.
fn blk_chain(hdr: u64, data: u64, out: u32, inn: u32) -> ([Buf; 4], usize) {
    chain_of([
        (hdr, wire::BLK_HDR_LEN as u32, false),
        (data, out, false),
        (data + u64::from(out), inn, true),
        (hdr + RESP_OFF, 1, true),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_put_readable_before_writable() {
        let (b, n) = scsi_chain(0x1000, 0x8000, 512, 4096);
        assert_eq!(n, 4);
        assert!(!b[0].writable && !b[1].writable && b[2].writable && b[3].writable);
        assert_eq!(b[3].addr, 0x8000 + 512);
        assert_eq!(b[2].len, 108);
        let (b, n) = scsi_chain(0x1000, 0x8000, 0, 0);
        assert_eq!(n, 2);
        assert!(b[1].writable);
        let (b, n) = blk_chain(0x1000, 0x8000, 0, 4096);
        assert_eq!(n, 3);
        assert!(!b[0].writable && b[1].writable && b[2].writable);
        assert_eq!((b[2].addr, b[2].len), (0x1000 + RESP_OFF, 1));
        let (_, n) = blk_chain(0x1000, 0x8000, 0, 0);
        assert_eq!(n, 2);
    }

    #[test]
    fn driver_is_send() {
        fn send<T: Send>() {}
        send::<Driver>();
    }
}
