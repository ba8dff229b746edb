//! The agent: its adapters, its VMs, and what ties them together (path choice, adapter
//! watching and failover, persistence).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use datapath::software::SoftwareAdapter;
use datapath::{Adapter, AdapterHealth, AdapterKind};

use crate::inventory::{scan_sysfs, AdapterConfig};
use crate::metrics::{self, AdapterSample, VmSample};
use crate::model::{
    valid_vm_name, AdapterView, AdaptersView, CreateVm, HostView, VmEvent, VmRecord, VmView,
};
use crate::store::Store;
use crate::vm::Vm;

/// How an agent is set up.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// The host's name in views and metrics.
    pub name: String,
    /// Where the VM store lives (`vms.redb`).
    pub state_dir: PathBuf,
    /// Root of the sysfs tree to scan (`/sys`; tests give fixture trees).
    pub sysfs_root: PathBuf,
    /// Reference offload adapters to drive.
    pub adapters: Vec<AdapterConfig>,
    /// Live migration to and from other agents (none: this agent neither sends nor takes
    /// VMs).
    pub migration: Option<MigrationOptions>,
}

/// How an agent takes part in migrations.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    /// The cluster's shared key: only agents holding it talk to each other.
    pub key: crate::migration::channel::ClusterKey,
    /// Where to listen for incoming migrations (`host:port`; none: send only).
    pub listen: Option<String>,
    /// Other agents by name: `name` → `host:port`.
    pub peers: BTreeMap<String, String>,
}

/// Why the agent refused a request. The HTTP status follows the kind.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The VM's data path could not be brought up (target unreachable, wrong secret, …).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// An offload adapter the agent drives.
pub(crate) struct OffloadEntry {
    pub name: String,
    pub source: String,
    pub adapter: Arc<dyn Adapter>,
}

pub(crate) struct Shared {
    pub name: String,
    pub store: Store,
    pub software: Arc<dyn Adapter>,
    offload: RwLock<Vec<Arc<OffloadEntry>>>,
    /// Configured adapters not in use now, with the reason.
    unavailable: RwLock<BTreeMap<String, String>>,
    vms: RwLock<BTreeMap<String, Arc<Vm>>>,
    sysfs_root: PathBuf,
    /// Where default vhost-user sockets go (`vhost/<VM>.sock`).
    state_dir: PathBuf,
    configured: Vec<AdapterConfig>,
    started: Instant,
    /// Serializes creates and deletes (name and InitiatorName uniqueness).
    pub(crate) admin: tokio::sync::Mutex<()>,
    pub(crate) migration: Option<MigrationOptions>,
    /// The address incoming migrations are accepted on.
    migration_addr: std::sync::Mutex<Option<std::net::SocketAddr>>,
    /// The last migration of each VM from this host.
    pub(crate) migrations: std::sync::Mutex<BTreeMap<String, crate::model::MigrationView>>,
}

impl Shared {
    pub(crate) fn offload_adapters(&self) -> Vec<Arc<OffloadEntry>> {
        read(&self.offload).clone()
    }

    pub(crate) fn vm(&self, name: &str) -> Option<Arc<Vm>> {
        read(&self.vms).get(name).cloned()
    }

    pub(crate) fn vm_table(&self) -> &RwLock<BTreeMap<String, Arc<Vm>>> {
        &self.vms
    }

    /// Where a VM's bus socket goes unless its record says otherwise.
    pub(crate) fn default_socket(&self, vm: &str) -> PathBuf {
        self.state_dir.join("vhost").join(format!("{vm}.sock"))
    }

    pub(crate) fn adapter_known(&self, name: &str) -> bool {
        self.configured.iter().any(|c| c.name == name)
            || self.offload_adapters().iter().any(|e| e.name == name)
    }

    /// The VM (other than `except`) whose bus uses `socket`, if any.
    pub(crate) fn socket_user(&self, socket: &std::path::Path) -> Option<String> {
        read(&self.vms)
            .values()
            .find(|vm| vm.record().frontend.and_then(|f| f.socket).as_deref() == Some(socket))
            .map(|vm| vm.name().to_owned())
    }

    /// The VM using `initiator_name`, if any.
    pub(crate) fn initiator_user(&self, initiator_name: &str) -> Option<String> {
        read(&self.vms)
            .values()
            .find(|vm| vm.record().client.initiator_name == initiator_name)
            .map(|vm| vm.name().to_owned())
    }
}

fn record_moved(vm: &Vm) -> bool {
    vm.record().moved_to.is_some()
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// The host agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    /// Opens the store, connects the configured adapters (those not up yet are retried in
    /// the background) and takes back the VMs of the store.
    pub async fn start(options: HostOptions) -> Result<Agent, String> {
        Self::start_with(options, Vec::new()).await
    }

    /// [`Agent::start`] with further offload adapters supplied by the caller (drivers of
    /// other hardware, test doubles), named, next to the configured ones.
    pub async fn start_with(
        options: HostOptions,
        extra: Vec<(String, Arc<dyn Adapter>)>,
    ) -> Result<Agent, String> {
        let store = Store::open(&options.state_dir.join("vms.redb")).map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared {
            name: options.name,
            store,
            software: Arc::new(SoftwareAdapter::new()),
            offload: RwLock::new(Vec::new()),
            unavailable: RwLock::new(BTreeMap::new()),
            vms: RwLock::new(BTreeMap::new()),
            sysfs_root: options.sysfs_root,
            state_dir: options.state_dir.clone(),
            configured: options.adapters,
            started: Instant::now(),
            admin: tokio::sync::Mutex::new(()),
            migration: options.migration.clone(),
            migration_addr: Default::default(),
            migrations: Default::default(),
        });
        let agent = Agent { shared };
        for config in agent.shared.configured.clone() {
            if let Err(why) = agent.connect_adapter(&config).await {
                tracing::warn!(adapter = %config.name, error = %why, "adapter not available; retrying");
                write(&agent.shared.unavailable).insert(config.name.clone(), why);
            }
        }
        for (name, adapter) in extra {
            let entry = Arc::new(OffloadEntry {
                name,
                source: "in-process".into(),
                adapter,
            });
            write(&agent.shared.offload).push(entry.clone());
            agent.spawn_watch(entry);
        }
        agent.spawn_adapter_reconnects();
        agent.restore_vms()?;
        if let Some(listen) = options.migration.as_ref().and_then(|m| m.listen.clone()) {
            let addr = crate::migration::destination::listen(&agent, &listen).await?;
            *agent
                .shared
                .migration_addr
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(addr);
        }
        Ok(agent)
    }

    async fn connect_adapter(&self, config: &AdapterConfig) -> Result<(), String> {
        let adapter = tokio::time::timeout(
            Duration::from_secs(3),
            hba::driver::HbaAdapter::connect(&config.name, &config.socket),
        )
        .await
        .map_err(|_| {
            format!(
                "{}: no answer from {}",
                config.name,
                config.socket.display()
            )
        })?
        .map_err(|e| e.to_string())?;
        // A device that answers but cannot serve (failed, or its port down) is not used yet.
        let info = adapter.info();
        if let AdapterHealth::Failed(why) = info.health {
            return Err(format!("{}: {why}", config.name));
        }
        if info.details.iter().any(|(k, v)| k == "link" && v == "down") {
            return Err(format!("{}: link down", config.name));
        }
        let entry = Arc::new(OffloadEntry {
            name: config.name.clone(),
            source: config.socket.display().to_string(),
            adapter,
        });
        write(&self.shared.unavailable).remove(&config.name);
        write(&self.shared.offload).push(entry.clone());
        tracing::info!(adapter = %config.name, socket = %config.socket.display(), "offload adapter connected");
        self.spawn_watch(entry);
        Ok(())
    }

    /// Watches one adapter: when it fails, exactly the VMs on it move to the software path,
    /// and the adapter is dropped until it can be connected again.
    fn spawn_watch(&self, entry: Arc<OffloadEntry>) {
        let weak = Arc::downgrade(&self.shared);
        let mut health = entry.adapter.watch_health();
        tokio::spawn(async move {
            let why = loop {
                let state = health.borrow_and_update().clone();
                if let AdapterHealth::Failed(why) = state {
                    break why;
                }
                if health.changed().await.is_err() {
                    break "driver stopped".into();
                }
            };
            if let Some(shared) = weak.upgrade() {
                Agent { shared }.adapter_failed(&entry, &why).await;
            }
        });
    }

    async fn adapter_failed(&self, entry: &Arc<OffloadEntry>, why: &str) {
        tracing::error!(adapter = %entry.name, reason = %why, "offload adapter failed");
        write(&self.shared.offload).retain(|e| !Arc::ptr_eq(e, entry));
        write(&self.shared.unavailable).insert(entry.name.clone(), format!("failed: {why}"));
        let affected: Vec<Arc<Vm>> = read(&self.shared.vms)
            .values()
            .filter(|vm| vm.adapter().as_deref() == Some(entry.name.as_str()))
            .cloned()
            .collect();
        let reason = format!("adapter {} failed: {why}", entry.name);
        let moves = affected.into_iter().filter_map(|vm| {
            let generation = vm.current()?.generation;
            let reason = reason.clone();
            Some(tokio::spawn(async move {
                vm.failover(generation, &reason).await
            }))
        });
        for m in moves.collect::<Vec<_>>() {
            let _ = m.await;
        }
    }

    /// Every second, tries the configured adapters that are not in use.
    fn spawn_adapter_reconnects(&self) {
        let weak = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(shared) = weak.upgrade() else { return };
                let agent = Agent { shared };
                let missing: Vec<AdapterConfig> = {
                    let down = read(&agent.shared.unavailable);
                    agent
                        .shared
                        .configured
                        .iter()
                        .filter(|c| down.contains_key(&c.name))
                        .cloned()
                        .collect()
                };
                for config in missing {
                    if let Err(why) = agent.connect_adapter(&config).await {
                        tracing::debug!(adapter = %config.name, error = %why, "adapter still unavailable");
                    }
                }
            }
        });
    }

    fn restore_vms(&self) -> Result<(), String> {
        let records = self
            .shared
            .store
            .list::<VmRecord>()
            .map_err(|e| e.to_string())?;
        for (name, record) in records {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(vm = %name, error = %e, "VM record unreadable; left in the store");
                    continue;
                }
            };
            if let Err(e) = record.validate() {
                tracing::error!(vm = %name, error = %e, "VM record invalid; left in the store");
                continue;
            }
            let vm = Vm::new(&self.shared, record);
            vm.event(
                "restored",
                format!("taken back by host {}", self.shared.name),
            );
            write(&self.shared.vms).insert(name.clone(), vm.clone());
            if record_moved(&vm) {
                // Its session is another host's now; only `vm delete` is left to do.
                continue;
            }
            if let Err(e) = vm.start_bus() {
                tracing::error!(vm = %name, error = %e, "virtual bus not served");
                vm.event("error", e);
            }
            vm.spawn_bring_up();
        }
        Ok(())
    }

    /// Creates a VM: validates it, brings up its data path, then stores it. If anything
    /// fails, nothing is stored.
    pub async fn create_vm(&self, request: CreateVm) -> Result<VmView, AgentError> {
        if !valid_vm_name(&request.name) {
            return Err(AgentError::BadRequest(format!(
                "VM name {:?} is not valid (1-64 of A-Z a-z 0-9 . _ -, not starting with . or -)",
                request.name
            )));
        }
        let client = request.client().map_err(AgentError::BadRequest)?;
        let _admin = self.shared.admin.lock().await;
        if self.shared.vm(&request.name).is_some() {
            return Err(AgentError::Conflict(format!("VM {} exists", request.name)));
        }
        if let Some(other) = self.shared.initiator_user(&client.initiator_name) {
            return Err(AgentError::Conflict(format!(
                "InitiatorName {} is already used by VM {other}",
                client.initiator_name,
            )));
        }
        if let Some(a) = &request.adapter {
            if !self.shared.adapter_known(a) {
                return Err(AgentError::BadRequest(format!("no adapter named {a}")));
            }
        }
        let frontend = match &request.frontend {
            Some(f) => {
                f.validate().map_err(AgentError::BadRequest)?;
                let mut f = f.clone();
                let socket = f
                    .socket
                    .clone()
                    .unwrap_or_else(|| self.shared.default_socket(&request.name));
                if let Some(other) = self.shared.socket_user(&socket) {
                    return Err(AgentError::Conflict(format!(
                        "socket {} is already used by VM {other}",
                        socket.display(),
                    )));
                }
                f.socket = Some(socket);
                Some(f)
            }
            None => None,
        };
        let mut record = VmRecord::new(request.name.clone(), client, request.path, request.adapter);
        record.frontend = frontend;
        record.push_event(VmEvent::new(
            "created",
            format!("on host {}", self.shared.name),
        ));
        // Stored with its first path event; nothing is stored if no path comes up.
        let vm = Vm::new(&self.shared, record);
        vm.start_bus()
            .map_err(|e| AgentError::BadRequest(format!("VM {} not created: {e}", request.name)))?;
        if let Err(e) = vm.bring_up().await {
            vm.shutdown().await;
            return Err(AgentError::Unavailable(format!(
                "VM {} not created: {e}",
                request.name
            )));
        }
        write(&self.shared.vms).insert(request.name.clone(), vm.clone());
        Ok(vm.view())
    }

    /// Logs the VM's session out and forgets the VM.
    pub async fn delete_vm(&self, name: &str) -> Result<(), AgentError> {
        let _admin = self.shared.admin.lock().await;
        let vm = self
            .shared
            .vm(name)
            .ok_or_else(|| AgentError::NotFound(format!("no VM named {name}")))?;
        vm.shutdown().await;
        write(&self.shared.vms).remove(name);
        self.shared
            .store
            .delete(name)
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        tracing::info!(vm = %name, "VM deleted");
        Ok(())
    }

    pub fn vm(&self, name: &str) -> Option<Arc<Vm>> {
        self.shared.vm(name)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The address incoming migrations are accepted on, if this agent takes them.
    pub fn migration_addr(&self) -> Option<std::net::SocketAddr> {
        *self
            .shared
            .migration_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn vms(&self) -> Vec<Arc<Vm>> {
        read(&self.shared.vms).values().cloned().collect()
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    fn vms_on(&self, adapter: &str) -> Vec<String> {
        read(&self.shared.vms)
            .values()
            .filter(|vm| vm.adapter().as_deref() == Some(adapter))
            .map(|vm| vm.name().to_owned())
            .collect()
    }

    pub fn adapters(&self) -> AdaptersView {
        let mut adapters = vec![AdapterView {
            info: self.shared.software.info(),
            source: "builtin".into(),
            vms: self.vms_on(datapath::software::SOFTWARE_ADAPTER),
        }];
        for e in self.shared.offload_adapters() {
            adapters.push(AdapterView {
                info: e.adapter.info(),
                source: e.source.clone(),
                vms: self.vms_on(&e.name),
            });
        }
        AdaptersView {
            host: self.shared.name.clone(),
            adapters,
            unavailable: read(&self.shared.unavailable)
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            sysfs: scan_sysfs(&self.shared.sysfs_root),
        }
    }

    pub fn host_view(&self) -> HostView {
        HostView {
            name: self.shared.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            vms: read(&self.shared.vms).len(),
            adapters: 1 + read(&self.shared.offload).len(),
            uptime_s: self.shared.started.elapsed().as_secs(),
        }
    }

    /// Prometheus text exposition of every VM and adapter.
    pub fn metrics_text(&self) -> String {
        let vms = self.vms();
        let views: Vec<_> = vms
            .iter()
            .map(|vm| {
                let cur = vm.current();
                let (kind, adapter) = match &cur {
                    Some(c) => (c.kind.to_string(), c.adapter.to_string()),
                    None => ("none".to_owned(), String::new()),
                };
                let recoveries = cur.map(|c| c.path.stats().recoveries).unwrap_or(0);
                (vm.clone(), kind, adapter, recoveries)
            })
            .collect();
        let samples: Vec<VmSample> = views
            .iter()
            .map(|(vm, kind, adapter, recoveries)| VmSample {
                vm: vm.name(),
                path_kind: kind,
                adapter,
                metrics: vm.metrics(),
                path_recoveries: *recoveries,
            })
            .collect();
        let adapters = self.adapters().adapters;
        let adapter_samples: Vec<AdapterSample> = adapters
            .iter()
            .map(|a| AdapterSample {
                name: &a.info.name,
                kind: match a.info.kind {
                    AdapterKind::Offload => "offload",
                    AdapterKind::Software => "software",
                },
                healthy: a.info.health == AdapterHealth::Ok,
                vfs_total: a.info.vfs_total,
                vfs_in_use: a.info.vfs_in_use,
                vms: a.vms.len() as u32,
            })
            .collect();
        metrics::render(&self.shared.name, &samples, &adapter_samples)
    }

    /// Logs every VM's session out (the records stay for the next start) and lets go of
    /// them, so that the store closes when the last handle is dropped.
    pub async fn shutdown(&self) {
        for vm in self.vms() {
            vm.shutdown().await;
        }
        write(&self.shared.vms).clear();
        write(&self.shared.offload).clear();
    }
}
