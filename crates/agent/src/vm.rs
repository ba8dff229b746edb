//! A VM at run time: its record, the data path in use, failover, metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use datapath::{
    AdapterKind, BoxFuture, Command, Completion, DataPath, Gate, PathError, SessionState,
};

use crate::host::Shared;
use crate::metrics::{Op, VmMetrics};
use crate::migration::link::Link;
use crate::model::{Frontend, FrontendKind, FrontendView, VmEvent, VmRecord, VmState, VmView};

/// The path a VM runs on now.
#[derive(Clone)]
pub(crate) struct Current {
    pub path: Arc<dyn DataPath>,
    /// Shared, so that taking the current path for every command allocates nothing.
    pub adapter: Arc<str>,
    pub kind: AdapterKind,
    /// Which switch produced this path; a failure report for an older one is stale.
    pub generation: u64,
}

impl Current {
    /// `offload hba0/vf2` or `software`, for operators.
    pub fn describe(&self) -> String {
        match self.path.info().vf {
            Some(vf) => format!("offload {}/vf{vf}", self.adapter),
            None => self.kind.to_string(),
        }
    }
}

/// One VM owned by the agent.
pub struct Vm {
    name: String,
    /// The agent; weak, because the agent's table holds the VM.
    shared: Weak<Shared>,
    record: Mutex<VmRecord>,
    current: RwLock<Option<Current>>,
    generation: AtomicU64,
    status: Mutex<(VmState, String)>,
    metrics: VmMetrics,
    reissued: AtomicU64,
    /// Serializes path changes (bring-up, failover, delete).
    switch: tokio::sync::Mutex<()>,
    /// Deleted, or the agent stopped: no more paths, events or retries.
    stopped: std::sync::atomic::AtomicBool,
    /// The LUNs the VM may use (from its client record, which does not change).
    luns: Arc<[u64]>,
    /// The virtual bus being served, or why it is not.
    bus: Mutex<BusState>,
    /// Every command passes it; a migration closes it to hold new commands and drain the
    /// admitted ones, an incoming VM keeps it closed until its switchover.
    gate: Gate,
    /// Set once the VM has migrated away: commands go to the host that has the session.
    forward: RwLock<Option<Arc<Link>>>,
    /// Unit attentions found while settling a new session, owed to the guest: (encoded
    /// LUN, sense). `owed` says whether there are any, so that commands need not lock.
    owed_sense: Mutex<Vec<(u64, bytes::Bytes)>>,
    owed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct BusState {
    server: Option<vhost_frontend::VhostServer>,
    error: Option<String>,
}

/// The VM as its virtual bus sees it: commands go through [`Vm::submit`] (with failover).
/// Weak, because the VM owns the bus.
struct BusStorage(Weak<Vm>);

impl vhost_frontend::Storage for BusStorage {
    fn submit(&self, command: Command) -> BoxFuture<'static, Result<Completion, PathError>> {
        let vm = self.0.upgrade();
        Box::pin(async move {
            match vm {
                Some(vm) => vm.submit(command).await,
                None => Err(PathError::Closed),
            }
        })
    }

    fn task_management(
        &self,
        function: datapath::TmfFunction,
        lun: u64,
    ) -> BoxFuture<'static, Result<(), PathError>> {
        let vm = self.0.upgrade();
        Box::pin(async move {
            match vm {
                Some(vm) => vm.task_management(function, lun).await,
                None => Err(PathError::Closed),
            }
        })
    }

    fn luns(&self) -> Arc<[u64]> {
        self.0
            .upgrade()
            .map(|vm| Arc::clone(&vm.luns))
            .unwrap_or_else(|| Arc::new([]))
    }
}

fn op_of(cdb: &[u8]) -> Op {
    match cdb.first() {
        Some(0x08 | 0x28 | 0xa8 | 0x88) => Op::Read,
        Some(0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0x8e | 0x93 | 0x89) => Op::Write,
        _ => Op::Other,
    }
}

impl Vm {
    pub(crate) fn new(shared: &Arc<Shared>, record: VmRecord) -> Arc<Vm> {
        let moved = record.moved_to.clone();
        let vm = Vm::build(shared, record);
        if let Some(host) = moved {
            *lock(&vm.status) = (VmState::Moved, format!("migrated to host {host}"));
        }
        Arc::new(vm)
    }

    /// A VM arriving by migration: commands wait until [`Vm::switched_in`].
    pub(crate) fn new_incoming(shared: &Arc<Shared>, record: VmRecord, from: &str) -> Arc<Vm> {
        let vm = Vm::build(shared, record);
        *lock(&vm.status) = (VmState::Incoming, format!("arriving from host {from}"));
        vm.gate.close();
        Arc::new(vm)
    }

    fn build(shared: &Arc<Shared>, record: VmRecord) -> Vm {
        Vm {
            gate: Gate::new(),
            forward: RwLock::new(None),
            owed_sense: Mutex::new(Vec::new()),
            owed: Default::default(),
            name: record.name.clone(),
            luns: record.client.luns.as_slice().into(),
            bus: Mutex::new(BusState::default()),
            shared: Arc::downgrade(shared),
            record: Mutex::new(record),
            current: RwLock::new(None),
            generation: AtomicU64::new(0),
            status: Mutex::new((VmState::Starting, "starting".into())),
            metrics: VmMetrics::default(),
            reissued: AtomicU64::new(0),
            switch: tokio::sync::Mutex::new(()),
            stopped: Default::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn record(&self) -> VmRecord {
        lock(&self.record).clone()
    }

    pub fn metrics(&self) -> &VmMetrics {
        &self.metrics
    }

    pub(crate) fn current(&self) -> Option<Current> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The adapter the VM's path runs on, if any.
    pub fn adapter(&self) -> Option<String> {
        self.current().map(|c| c.adapter.to_string())
    }

    pub fn state(&self) -> VmState {
        lock(&self.status).0
    }

    /// Sends one SCSI command through the VM's data path. When the path itself fails (an
    /// adapter fault), the VM moves to the software path and the command is re-issued there
    /// once.
    pub async fn submit(&self, command: Command) -> Result<Completion, PathError> {
        let started = Instant::now();
        let op = op_of(&command.cdb);
        let out_len = command.data_out.len() as u64;
        let mut reissued = false;
        let _ticket = self.gate.enter().await;
        let result = if let Some(link) = self.forward() {
            link.submit(command).await
        } else {
            self.submit_here(command, &mut reissued).await
        };
        let bytes = match (&result, op) {
            (Ok(c), Op::Read) => c.data.len() as u64,
            (Ok(_), Op::Write) => out_len,
            _ => 0,
        };
        self.metrics
            .record(op, bytes, started.elapsed(), result.is_ok());
        result
    }

    /// [`Vm::submit`] on this host's path, with failover and one re-issue.
    async fn submit_here(
        &self,
        command: Command,
        reissued: &mut bool,
    ) -> Result<Completion, PathError> {
        if self.owed.load(Ordering::Acquire) {
            if let Some(owed) = self.owed_unit_attention(&command) {
                return Ok(owed);
            }
        }
        loop {
            let Some(cur) = self.current() else {
                return Err(PathError::Unreachable(format!(
                    "VM {} has no data path: {}",
                    self.name,
                    lock(&self.status).1
                )));
            };
            match cur.path.submit(command.clone()).await {
                Err(e) if e.is_path_failure() && !*reissued => {
                    self.failover(cur.generation, &e.to_string()).await;
                    *reissued = true;
                    self.reissued.fetch_add(1, Ordering::Relaxed);
                }
                other => break other,
            }
        }
    }

    /// Task management on LUN number `lun` through the current path.
    pub async fn task_management(
        &self,
        function: datapath::TmfFunction,
        lun: u64,
    ) -> Result<(), PathError> {
        if let Some(link) = self.forward() {
            return link.task_management(function, lun).await;
        }
        match self.current() {
            Some(cur) => cur.path.task_management(function, lun).await,
            None => Err(PathError::Unreachable("no data path".into())),
        }
    }

    /// Keeps unit attentions for the guest (see [`crate::settle`]).
    pub(crate) fn owe_sense(&self, kept: Vec<(u64, bytes::Bytes)>) {
        if kept.is_empty() {
            return;
        }
        lock(&self.owed_sense).extend(kept);
        self.owed.store(true, Ordering::Release);
    }

    /// A kept unit attention for this command's LUN, as the target would have answered it
    /// (INQUIRY, REPORT LUNS and REQUEST SENSE are not affected by unit attentions).
    fn owed_unit_attention(&self, command: &Command) -> Option<Completion> {
        if matches!(command.cdb.first(), Some(0x12 | 0xa0 | 0x03)) {
            return None;
        }
        let mut owed = lock(&self.owed_sense);
        let at = owed.iter().position(|(lun, _)| *lun == command.lun)?;
        let (_, sense) = owed.remove(at);
        if owed.is_empty() {
            self.owed.store(false, Ordering::Release);
        }
        Some(Completion {
            status: datapath::Status(2),
            sense,
            data: datapath::DataIn::default(),
            residual: match command.read_len {
                0 => datapath::Residual::None,
                n => datapath::Residual::Underflow(n),
            },
        })
    }

    pub(crate) fn forward(&self) -> Option<Arc<Link>> {
        self.forward
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The lock that serializes path changes.
    pub(crate) fn switch_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.switch
    }

    pub(crate) fn set_status(&self, state: VmState, reason: String) {
        *lock(&self.status) = (state, reason);
    }

    /// Takes the current path away (the migration hands its session over).
    pub(crate) fn take_path(&self) -> Option<Current> {
        self.current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The session is now on another host: commands go there through `link`.
    pub(crate) fn moved_out(&self, link: Arc<Link>, host: &str) {
        *self.forward.write().unwrap_or_else(|p| p.into_inner()) = Some(link);
        *lock(&self.status) = (VmState::Moved, format!("migrated to host {host}"));
    }

    /// Installs the path a migration brought up here and lets held commands go.
    pub(crate) fn switched_in(
        &self,
        path: Arc<dyn DataPath>,
        adapter: String,
        kind: AdapterKind,
        reason: String,
    ) {
        // The store is written after the held commands go (a write there costs an fsync).
        self.install_with(path, adapter, kind, reason, false);
        self.gate.resume();
        self.persist();
    }

    /// Installs a path opened by the caller (a migration taking its session back).
    pub(crate) fn install_path(
        &self,
        path: Arc<dyn DataPath>,
        adapter: String,
        kind: AdapterKind,
        reason: String,
    ) {
        self.install(path, adapter, kind, reason);
    }

    /// Changes the record and persists it.
    pub(crate) fn update_record(&self, change: impl FnOnce(&mut VmRecord)) {
        let record = {
            let mut r = lock(&self.record);
            change(&mut r);
            r.clone()
        };
        if let Some(shared) = self.shared.upgrade() {
            if let Err(e) = shared.store.put(&self.name, &record) {
                tracing::warn!(vm = %self.name, error = %e, "cannot persist VM record");
            }
        }
    }

    /// Vring stops the VM's bus has answered (None: no bus).
    pub(crate) fn bus_ring_stops(&self) -> Option<u64> {
        lock(&self.bus).server.as_ref().map(|s| s.ring_stops())
    }

    /// Whether a VMM is connected to the VM's bus now.
    pub(crate) fn bus_connected(&self) -> bool {
        lock(&self.bus)
            .server
            .as_ref()
            .is_some_and(|s| s.vmm_connected())
    }

    /// Installs a freshly opened path.
    fn install(&self, path: Arc<dyn DataPath>, adapter: String, kind: AdapterKind, reason: String) {
        self.install_with(path, adapter, kind, reason, true);
    }

    /// [`Vm::install`]; without `persist` the event is only noted in memory (the caller
    /// persists later, off the critical path).
    fn install_with(
        &self,
        path: Arc<dyn DataPath>,
        adapter: String,
        kind: AdapterKind,
        reason: String,
        persist: bool,
    ) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let info = path.info();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Current {
            path,
            adapter: adapter.into(),
            kind,
            generation,
        });
        let described = match info.vf {
            Some(vf) => format!("{} {}/vf{vf} to {}", info.kind, info.adapter, info.portal),
            None => format!("{} to {}", info.kind, info.portal),
        };
        *lock(&self.status) = (VmState::Running, reason.clone());
        tracing::info!(vm = %self.name, path = %described, %reason, "data path up");
        self.note("path", format!("{described}: {reason}"));
        if persist {
            self.persist();
        }
    }

    /// Records an event and persists the record.
    pub(crate) fn event(&self, kind: &str, message: String) {
        self.note(kind, message);
        self.persist();
    }

    /// Records an event in memory only.
    pub(crate) fn note(&self, kind: &str, message: String) {
        lock(&self.record).push_event(VmEvent::new(kind, message));
    }

    /// Writes the record to the store.
    pub(crate) fn persist(&self) {
        let record = lock(&self.record).clone();
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        if self.stopped.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = shared.store.put(&self.name, &record) {
            tracing::warn!(vm = %self.name, error = %e, "cannot persist VM record");
        }
    }

    /// Brings up a data path as the VM's policy says (the caller reports errors).
    pub(crate) async fn bring_up(&self) -> Result<(), PathError> {
        let _switch = self.switch.lock().await;
        if self.current().is_some() {
            return Ok(());
        }
        let record = self.record();
        let shared = self.shared.upgrade().ok_or(PathError::Closed)?;
        if self.stopped.load(Ordering::Relaxed) {
            return Err(PathError::Closed);
        }
        match crate::select::open_path(&shared, &record, None).await {
            Ok(chosen) => {
                self.install(chosen.path, chosen.adapter, chosen.kind, chosen.reason);
                Ok(())
            }
            Err(e) => {
                *lock(&self.status) = (VmState::Waiting, e.to_string());
                Err(e)
            }
        }
    }

    /// Keeps trying to bring up a path until one is up or the VM is deleted (after an agent
    /// restart, or when failover found no path).
    pub(crate) fn spawn_bring_up(self: &Arc<Self>) {
        let vm = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            let mut reported = String::new();
            loop {
                if vm.stopped.load(Ordering::Relaxed) {
                    return;
                }
                match vm.bring_up().await {
                    Ok(()) => return,
                    Err(e) => {
                        let msg = e.to_string();
                        if msg != reported {
                            tracing::warn!(vm = %vm.name, error = %msg, "no data path yet; retrying");
                            vm.event("error", format!("no data path: {msg}"));
                            reported = msg;
                        }
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Moves the VM off a failed path (generation `failed`) to the software path. Commands
    /// in flight on the failed path come back with a path failure and are re-issued by
    /// [`Vm::submit`]; a report about a path already replaced does nothing.
    pub async fn failover(&self, failed: u64, reason: &str) {
        let _switch = self.switch.lock().await;
        let Some(old) = self.current() else { return };
        if old.generation != failed || self.stopped.load(Ordering::Relaxed) {
            return;
        }
        let t0 = Instant::now();
        let from = match old.path.info().vf {
            Some(vf) => format!("{} {}/vf{vf}", old.kind, old.adapter),
            None => old.kind.to_string(),
        };
        let state: SessionState = old.path.export_state();
        // The failed path stays installed until its successor is up: commands submitted
        // meanwhile fail on it as path failures, wait for this switch and are re-issued.
        // Then it goes back to its adapter in the background: a hung adapter must not hold
        // up the VM.
        let closing = old.path.clone();
        let _release = ReleaseOnDrop(Some(closing));
        let record = self.record();
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let software = shared.software.clone();
        match software.open(&record.client, Some(&state)).await {
            Ok(path) => {
                let settled = crate::settle::settle(path.as_ref(), &record.client).await;
                self.owe_sense(settled.kept);
                self.metrics.failover();
                let took = t0.elapsed();
                tracing::warn!(vm = %self.name, %from, %reason, took_ms = took.as_millis() as u64, "failed over to the software path");
                self.event(
                    "failover",
                    format!(
                        "{from} failed ({reason}); moved to the software path in {:.1} ms",
                        took.as_secs_f64() * 1e3
                    ),
                );
                self.install(
                    path,
                    datapath::software::SOFTWARE_ADAPTER.into(),
                    AdapterKind::Software,
                    format!("failover from {from}"),
                );
            }
            Err(e) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = None;
                *lock(&self.status) = (
                    VmState::Waiting,
                    format!("failover from {from} failed: {e}"),
                );
                self.event(
                    "error",
                    format!("{from} failed ({reason}); software path: {e}"),
                );
                drop(_switch);
                // The retry loop needs an `Arc`; it is found through the agent's table.
                if let Some(vm) = shared.vm(&self.name) {
                    vm.spawn_bring_up();
                }
            }
        }
    }

    /// Starts serving the VM's virtual bus, if its record has one (socket resolved).
    pub(crate) fn start_bus(self: &Arc<Self>) -> Result<(), String> {
        let Some(frontend) = self.record().frontend else {
            return Ok(());
        };
        let Some(socket) = frontend.socket.clone() else {
            return Err("frontend socket not resolved".into());
        };
        let kind = match frontend.kind {
            FrontendKind::Scsi => vhost_frontend::FrontendKind::Scsi,
            FrontendKind::Blk => vhost_frontend::FrontendKind::Blk,
        };
        let mut config = vhost_frontend::BusConfig::new(&self.name, kind, &socket);
        config.request_queues = frontend.queues();
        let storage = Arc::new(BusStorage(Arc::downgrade(self)));
        let result = vhost_frontend::serve(config, storage, tokio::runtime::Handle::current());
        let mut bus = lock(&self.bus);
        match result {
            Ok(server) => {
                bus.server = Some(server);
                bus.error = None;
                Ok(())
            }
            Err(e) => {
                let why = format!("vhost-user socket {}: {e}", socket.display());
                bus.error = Some(why.clone());
                Err(why)
            }
        }
    }

    /// Stops serving the virtual bus (the VMM sees its socket close).
    pub(crate) async fn stop_bus(&self) {
        let server = lock(&self.bus).server.take();
        if let Some(mut server) = server {
            let _ = tokio::task::spawn_blocking(move || server.stop()).await;
        }
    }

    fn frontend_view(&self, frontend: &Frontend) -> FrontendView {
        let bus = lock(&self.bus);
        let socket = frontend.socket.clone().unwrap_or_default();
        let kind = match frontend.kind {
            FrontendKind::Scsi => vhost_frontend::FrontendKind::Scsi,
            FrontendKind::Blk => vhost_frontend::FrontendKind::Blk,
        };
        FrontendView {
            kind: frontend.kind,
            qemu_options: vhost_frontend::qemu_options(
                kind,
                &socket,
                frontend.memory_mib.unwrap_or(1024),
                frontend.queues(),
            ),
            socket,
            queues: frontend.queues(),
            serving: bus.server.is_some(),
            error: bus.error.clone(),
        }
    }

    /// Ends the VM's session (logout) and stops all retries: the VM is deleted or the agent
    /// is stopping.
    pub(crate) async fn shutdown(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        // Commands held at the gate (an incoming VM) go on, find no path and fail.
        self.gate.resume();
        self.stop_bus().await;
        let _switch = self.switch.lock().await;
        let cur = self
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(cur) = cur {
            let _ = tokio::time::timeout(Duration::from_secs(5), cur.path.quiesce()).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), cur.path.close()).await;
        }
    }

    pub fn view(&self) -> VmView {
        let record = self.record();
        let cur = self.current();
        let (state, reason) = lock(&self.status).clone();
        VmView {
            name: self.name.clone(),
            state,
            policy: record.policy,
            adapter: record.adapter.clone(),
            path: cur.as_ref().map(|c| c.path.info()),
            path_reason: reason,
            health: cur.as_ref().map(|c| c.path.health()),
            client: record.client.redacted(),
            path_stats: cur.as_ref().map(|c| c.path.stats()).unwrap_or_default(),
            reissued: self.reissued.load(Ordering::Relaxed),
            metrics: self.metrics.snapshot(),
            frontend: record.frontend.as_ref().map(|f| self.frontend_view(f)),
            history: record.history,
        }
    }
}

/// Closes a replaced path in the background when dropped.
struct ReleaseOnDrop(Option<Arc<dyn DataPath>>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), path.close()).await;
            });
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
