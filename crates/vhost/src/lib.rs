//! A VM's virtual bus: the vhost-user-scsi or vhost-user-blk device a VMM (QEMU, Cloud
//! Hypervisor) attaches, served from the host agent over the VM's data path.
//!
//! - [`serve`] listens on the VM's socket and serves one VMM connection at a time, for as long
//!   as the returned [`VhostServer`] lives; a VMM that reconnects (after the agent restarted, or
//!   its own reconnect) gets a fresh device over the same [`Storage`].
//! - virtio-scsi passes the guest's own CDBs to the VM's LUNs unchanged, so the guest sees the
//!   LUN's real identity and reservations whatever the data path; the control queue's task
//!   management becomes iSCSI task management; the event queue reports capacity changes.
//! - virtio-blk turns reads, writes and flushes into SCSI commands on the VM's first LUN.
//! - Live migration support: dirty-page logging (`VHOST_F_LOG_ALL`, `LOG_SHMFD`) for every
//!   guest write, and a vring stop (`GET_VRING_BASE`) that answers only once every request
//!   taken from that ring has completed.
//!
//! Not here: choosing or failing over the data path (the agent's [`Storage`] does that), the
//! VMM's side (`viscsi-vhost-driver` plays it in tests), handing in-flight requests to another
//! host (issue 6).

mod device;
pub mod virtio_blk;
pub mod virtio_scsi;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use datapath::{BoxFuture, Command, Completion, PathError, TaskAttr, TmfFunction};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use device::MAX_TRANSFER;

/// Where the bus sends a VM's commands: the agent's VM, with its data path and failover.
pub trait Storage: Send + Sync + 'static {
    /// One SCSI command (`lun` in the 8-byte SAM encoding).
    fn submit(&self, command: Command) -> BoxFuture<'static, Result<Completion, PathError>>;
    /// Task management on LUN number `lun`.
    fn task_management(
        &self,
        function: TmfFunction,
        lun: u64,
    ) -> BoxFuture<'static, Result<(), PathError>>;
    /// LUN numbers the VM may use (empty: every LUN the target has). Asked for every command:
    /// a shared list, not a copy.
    fn luns(&self) -> std::sync::Arc<[u64]>;
}

/// The device the VMM sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrontendKind {
    /// vhost-user-scsi: the guest's CDBs go to the LUNs unchanged.
    Scsi,
    /// vhost-user-blk: one LUN as a block device.
    Blk,
}

impl FrontendKind {
    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::Scsi => "scsi",
            FrontendKind::Blk => "blk",
        }
    }
}

/// How one VM's bus is served.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// The VM's name (logs, thread names).
    pub name: String,
    pub kind: FrontendKind,
    pub socket: PathBuf,
    /// Request queues offered (the VMM may use fewer).
    pub request_queues: u16,
    /// Largest ring the VMM may set up.
    pub queue_size: u16,
}

impl BusConfig {
    pub fn new(name: &str, kind: FrontendKind, socket: &Path) -> BusConfig {
        BusConfig {
            name: name.to_string(),
            kind,
            socket: socket.to_path_buf(),
            request_queues: 4,
            queue_size: 1024,
        }
    }
}

/// State of one VM's bus that outlives VMM connections.
pub(crate) struct Bus {
    config: BusConfig,
    /// Vring stops (GET_VRING_BASE) answered since the bus started: a VMM stopping the
    /// device (the end of a live migration, a reset).
    ring_stops: Arc<std::sync::atomic::AtomicU64>,
    storage: Arc<dyn Storage>,
    runtime: tokio::runtime::Handle,
    blk: tokio::sync::Mutex<Option<BlkIdentity>>,
}

/// What virtio-blk tells the guest about its LUN.
#[derive(Clone, Debug)]
pub(crate) struct BlkIdentity {
    geometry: virtio_blk::Geometry,
    id: [u8; virtio_blk::ID_LEN],
}

/// How long the bus waits for the VM's data path to answer the first commands.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(30);

impl Bus {
    fn blk_lun(&self) -> u64 {
        self.storage.luns().first().copied().unwrap_or(0)
    }

    /// READ CAPACITY(16) and the unit serial number, asked once per bus (retried while the
    /// data path comes up or reports a UNIT ATTENTION).
    async fn blk_identity(&self) -> Option<BlkIdentity> {
        let mut cached = self.blk.lock().await;
        if let Some(identity) = cached.as_ref() {
            return Some(identity.clone());
        }
        let lun = self.blk_lun();
        let mut rc16 = vec![0u8; 16];
        rc16[0] = 0x9e;
        rc16[1] = 0x10;
        rc16[13] = 32;
        let capacity = self.ask(lun, rc16, 32).await?;
        let Some(geometry) = virtio_blk::Geometry::from_read_capacity16(&capacity) else {
            tracing::warn!(vm = %self.config.name, "READ CAPACITY(16) data unusable");
            return None;
        };
        let serial = match self.ask(lun, vec![0x12, 1, 0x80, 0, 255, 0], 255).await {
            Some(page) if page.len() > 4 && page[1] == 0x80 => {
                let len = usize::from(u16::from_be_bytes([page[2], page[3]]));
                page[4..(4 + len).min(page.len())].to_vec()
            }
            _ => self.config.name.as_bytes().to_vec(),
        };
        let identity = BlkIdentity {
            geometry,
            id: virtio_blk::device_id(&serial),
        };
        *cached = Some(identity.clone());
        Some(identity)
    }

    /// A small command the bus issues itself; GOOD data or `None`.
    async fn ask(&self, lun: u64, cdb: Vec<u8>, read_len: u32) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + IDENTITY_TIMEOUT;
        loop {
            let command = Command {
                lun: scsi::lun::encode(lun),
                cdb: Bytes::from(cdb.clone()),
                data_out: Bytes::new(),
                read_len,
                attr: TaskAttr::Simple,
            };
            let retry = match self.storage.submit(command).await {
                Ok(done) if done.status.0 == 0 => return Some(done.data.to_bytes().to_vec()),
                // CHECK CONDITION (a UNIT ATTENTION on a new nexus) or BUSY: once more.
                Ok(done) => format!("status {:#x}", done.status.0),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(vm = %self.config.name, "LUN {lun} did not answer: {retry}");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A VM's bus being served; stops (and removes the socket) when dropped or [`stop`]ped.
///
/// [`stop`]: VhostServer::stop
pub struct VhostServer {
    config: BusConfig,
    ring_stops: Arc<std::sync::atomic::AtomicU64>,
    stopping: Arc<AtomicBool>,
    connection: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
}

/// Starts serving `config.socket` (an existing file there is replaced). Request processing
/// runs as tasks on `runtime`; the vhost-user protocol on threads of its own.
pub fn serve(
    config: BusConfig,
    storage: Arc<dyn Storage>,
    runtime: tokio::runtime::Handle,
) -> io::Result<VhostServer> {
    if config.request_queues == 0 || config.queue_size == 0 || !config.queue_size.is_power_of_two()
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "request queues must be at least 1 and the queue size a power of two",
        ));
    }
    if let Some(dir) = config.socket.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let mut listener = Listener::new(&config.socket, true).map_err(|e| {
        io::Error::other(format!("cannot listen on {}: {e}", config.socket.display()))
    })?;
    set_mode(&config.socket, 0o660)?;
    let ring_stops = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bus = Arc::new(Bus {
        ring_stops: Arc::clone(&ring_stops),
        config: config.clone(),
        storage,
        runtime,
        blk: tokio::sync::Mutex::new(None),
    });
    let stopping = Arc::new(AtomicBool::new(false));
    let connection = Arc::new(Mutex::new(None));
    let thread = {
        let stopping = Arc::clone(&stopping);
        let connection = Arc::clone(&connection);
        std::thread::Builder::new()
            .name(format!("vhost-{}", config.name))
            .spawn(move || accept_loop(bus, &mut listener, &stopping, &connection))?
    };
    tracing::info!(vm = %config.name, socket = %config.socket.display(), frontend = config.kind.name(), "vhost-user socket ready");
    Ok(VhostServer {
        config,
        ring_stops,
        stopping,
        connection,
        thread: Some(thread),
    })
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Serves one VMM connection after another until stopped.
fn accept_loop(
    bus: Arc<Bus>,
    listener: &mut Listener,
    stopping: &AtomicBool,
    connection: &Mutex<Option<ShutdownHandle>>,
) {
    let name = bus.config.name.clone();
    while !stopping.load(Ordering::Acquire) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = match device::Device::new(Arc::clone(&bus), mem.clone()) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                tracing::error!(vm = %name, "cannot create the device: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let backend = device::SharedDevice(Arc::clone(&device));
        let mut daemon = match VhostUserDaemon::new(format!("vhost-{name}"), backend, mem) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(vm = %name, "cannot create the vhost-user daemon: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if let Err(e) = daemon.start(listener) {
            if !stopping.load(Ordering::Acquire) {
                tracing::warn!(vm = %name, "vhost-user connection failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        *connection.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        if stopping.load(Ordering::Acquire) {
            daemon.request_shutdown();
        } else {
            tracing::info!(vm = %name, "VMM connected");
        }
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!(vm = %name, "VMM disconnected"),
            Err(e) => tracing::warn!(vm = %name, "VMM connection ended: {e}"),
        }
        device.close();
        *connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl VhostServer {
    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// Vring stops answered so far (each after the ring's requests completed).
    pub fn ring_stops(&self) -> u64 {
        self.ring_stops.load(Ordering::Acquire)
    }

    /// Whether a VMM is connected now.
    pub fn vmm_connected(&self) -> bool {
        self.connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Closes the VMM's connection, stops listening and removes the socket.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(connection) = self
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            connection.shutdown();
        }
        // Wake a blocked accept.
        let _ = std::os::unix::net::UnixStream::connect(&self.config.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.config.socket);
    }
}

impl Drop for VhostServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// QEMU options that attach a VM to its bus: shared guest memory (vhost-user needs it),
/// the socket (reconnecting after an agent restart) and the device.
pub fn qemu_options(
    kind: FrontendKind,
    socket: &Path,
    memory_mib: u64,
    queues: u16,
) -> Vec<String> {
    let device = match kind {
        FrontendKind::Scsi => format!("vhost-user-scsi-pci,chardev=viscsi0,num_queues={queues}"),
        FrontendKind::Blk => format!("vhost-user-blk-pci,chardev=viscsi0,num-queues={queues}"),
    };
    vec![
        "-object".into(),
        format!("memory-backend-memfd,id=viscsi-mem,size={memory_mib}M,share=on"),
        "-machine".into(),
        "memory-backend=viscsi-mem".into(),
        "-chardev".into(),
        format!(
            "socket,id=viscsi0,path={},reconnect-ms=1000",
            socket.display()
        ),
        "-device".into(),
        device,
    ]
}
