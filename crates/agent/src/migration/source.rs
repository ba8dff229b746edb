//! The source's side of a migration: offer the VM, let the destination prepare, switch the
//! session over, forward what still arrives here, retire the VM.
//!
//! The switchover, in order:
//! 1. The VM's gate closes: new commands wait here; the admitted ones complete on this
//!    host's path (drain).
//! 2. The record is marked as moved (a restarted agent will not log in with the VM's
//!    identity again), and the path logs out.
//! 3. The destination logs in with the same InitiatorName + ISID. Had the logout not reached
//!    the target, this login reinstates the session and the target ends ours (the fence).
//! 4. The held commands, and any arriving later, are forwarded to the destination, so each
//!    is issued exactly once, there.
//!
//! Anything failing before step 3 completes leaves the VM here: the path is opened again if
//! it was closed, the held commands go on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datapath::PathError;

use super::link::Link;
use super::protocol::{Reply, Request};
use crate::host::{Agent, AgentError, Shared};
use crate::model::{now_ms, MigrateRequest, MigrationPhase, MigrationView, VmState};
use crate::vm::Vm;

/// How long the destination may take to prepare (trial login included).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the admitted commands may take to drain before the migration is abandoned.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination may take to log in at the switchover.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `with_vmm` migration waits for the VMM's own migration.
const VMM_TIMEOUT: Duration = Duration::from_secs(600);

impl Agent {
    /// Starts migrating VM `name`; the returned view is the first step. The migration goes
    /// on in the background ([`Agent::migration`]).
    pub async fn migrate(
        &self,
        name: &str,
        request: MigrateRequest,
    ) -> Result<MigrationView, AgentError> {
        let shared = self.shared().clone();
        let Some(options) = shared.migration.clone() else {
            return Err(AgentError::BadRequest(
                "this agent has no cluster key: start it with --cluster-key to migrate VMs".into(),
            ));
        };
        let vm = shared
            .vm(name)
            .ok_or_else(|| AgentError::NotFound(format!("no VM named {name}")))?;
        if request.to.trim().is_empty() {
            return Err(AgentError::BadRequest("destination is missing".into()));
        }
        let addr = match options.peers.get(&request.to) {
            Some(addr) => addr.clone(),
            None if request.to.contains(':') => request.to.clone(),
            None => {
                return Err(AgentError::BadRequest(format!(
                    "unknown destination {:?}: give a peer name ({}) or host:port",
                    request.to,
                    options.peers.keys().cloned().collect::<Vec<_>>().join(", ")
                )))
            }
        };
        if let Some(socket) = &request.vhost_socket {
            if !socket.is_absolute() {
                return Err(AgentError::BadRequest(format!(
                    "vhost socket {} is not an absolute path",
                    socket.display()
                )));
            }
        }
        let view = {
            let mut table = shared.migrations.lock().unwrap_or_else(|p| p.into_inner());
            if table.get(name).is_some_and(|m| !m.phase.finished()) {
                return Err(AgentError::Conflict(format!(
                    "VM {name} is already migrating"
                )));
            }
            match vm.state() {
                VmState::Running => {}
                other => {
                    return Err(AgentError::Conflict(format!(
                        "VM {name} cannot migrate while {}",
                        serde_json::to_value(other)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default()
                    )))
                }
            }
            let view = MigrationView {
                vm: name.to_owned(),
                to: request.to.clone(),
                to_host: None,
                phase: MigrationPhase::Connecting,
                detail: format!("connecting to {addr}"),
                started_ms: now_ms(),
                from_path: describe(&vm),
                to_path: None,
                to_socket: None,
                switchover_ms: None,
                forwarded: 0,
                error: None,
            };
            table.insert(name.to_owned(), view.clone());
            view
        };
        let key = options.key.clone();
        tokio::spawn(async move {
            let run = Run {
                shared: shared.clone(),
                vm: vm.clone(),
            };
            if let Err(why) = run.migrate(&addr, &key, request).await {
                tracing::warn!(vm = %vm.name(), reason = %why, "migration abandoned; the VM stays here");
                vm.event("migration", format!("abandoned: {why}"));
                run.update(|m| {
                    m.phase = MigrationPhase::Abandoned;
                    m.detail = format!("abandoned; the VM runs on host {}", shared.name);
                    m.error = Some(why);
                });
            }
        });
        Ok(view)
    }

    /// The last migration of VM `name` from this host.
    pub fn migration(&self, name: &str) -> Option<MigrationView> {
        self.shared()
            .migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The last migration of every VM that left (or tried to leave) this host.
    pub fn migrations(&self) -> Vec<MigrationView> {
        self.shared()
            .migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// The data path a VM runs on, for operators.
pub(crate) fn describe(vm: &Vm) -> String {
    vm.current()
        .map(|cur| cur.describe())
        .unwrap_or_else(|| "none".into())
}

struct Run {
    shared: Arc<Shared>,
    vm: Arc<Vm>,
}

impl Run {
    fn update(&self, change: impl FnOnce(&mut MigrationView)) {
        if let Some(m) = self
            .shared
            .migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(self.vm.name())
        {
            change(m);
        }
    }

    async fn migrate(
        &self,
        addr: &str,
        key: &super::channel::ClusterKey,
        request: MigrateRequest,
    ) -> Result<(), String> {
        let link = Link::open(addr, key, &self.shared.name).await?;
        let to_host = link.peer().to_owned();
        self.update(|m| {
            m.to_host = Some(to_host.clone());
            m.phase = MigrationPhase::Preparing;
            m.detail = format!("host {to_host} prepares its data path");
        });
        let mut record = self.vm.record();
        record.moved_to = None;
        let offer = Request::Offer {
            record: Box::new(record),
            from_host: self.shared.name.clone(),
            path: request.path,
            adapter: request.adapter.clone(),
            vhost_socket: request.vhost_socket.clone(),
        };
        let (to_path, to_socket) = match link.call(&offer, &[], PREPARE_TIMEOUT).await? {
            (Reply::Prepared { path, socket, .. }, _) => (path, socket),
            (Reply::Failed { message, .. }, _) => return Err(format!("host {to_host}: {message}")),
            (other, _) => return Err(format!("host {to_host} answered {other:?}")),
        };
        self.update(|m| {
            m.to_path = Some(to_path.clone());
            m.to_socket = to_socket.clone();
        });
        let abandon = |why: String| {
            let link = link.clone();
            async move {
                let _ = link
                    .call(
                        &Request::Abandon {
                            reason: why.clone(),
                        },
                        &[],
                        Duration::from_secs(5),
                    )
                    .await;
                why
            }
        };
        if request.with_vmm {
            let socket = to_socket
                .as_ref()
                .map(|s| format!(" at {}", s.display()))
                .unwrap_or_default();
            self.update(|m| {
                m.phase = MigrationPhase::AwaitingVmm;
                m.detail = format!(
                    "prepared on host {to_host} ({to_path}); switching when the VMM stops the VM's rings here (migrate the VMM to host {to_host}'s socket{socket})"
                );
            });
            if let Err(why) = self.await_vmm_stop().await {
                return Err(abandon(why).await);
            }
        }
        self.update(|m| {
            m.phase = MigrationPhase::Switching;
            m.detail = format!("switching over to {to_path} on host {to_host}");
        });

        // 1. Hold new commands, drain the admitted ones.
        let held = Instant::now();
        let gate = self.vm.gate();
        if tokio::time::timeout(DRAIN_TIMEOUT, gate.quiesce())
            .await
            .is_err()
        {
            gate.resume();
            return Err(abandon(format!(
                "commands did not drain within {} s",
                DRAIN_TIMEOUT.as_secs()
            ))
            .await);
        }
        let drained = held.elapsed();
        let _switch = self.vm.switch_lock().lock().await;
        let Some(current) = self.vm.take_path() else {
            gate.resume();
            return Err(abandon("the VM lost its data path".into()).await);
        };
        let from = current.describe();
        // 2. Never log in with this identity again from here (persisted), and log out; both
        //    at once, since each waits for a device or the network.
        let state = current.path.export_state();
        let persisted = {
            let vm = self.vm.clone();
            let host = to_host.clone();
            tokio::task::spawn_blocking(move || vm.update_record(|r| r.moved_to = Some(host)))
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), current.path.close()).await;
        let _ = persisted.await;

        // 3. The destination logs in.
        let switched = link
            .call(
                &Request::Switch {
                    state: state.clone(),
                },
                &[],
                SWITCH_TIMEOUT,
            )
            .await;
        // An answer lost with the channel: ask the destination on a new one before taking
        // the session back, so that a destination that did log in keeps it.
        let (switched, link) = match switched {
            Err(lost) => match self.ask_owner(addr, key, &to_host).await {
                Some((path, fresh)) => (
                    Ok((
                        Reply::Switched {
                            path,
                            login_ms: 0.0,
                        },
                        Default::default(),
                    )),
                    fresh,
                ),
                None => (Err(lost), link),
            },
            answered => (answered, link),
        };
        let (path, login_ms) = match switched {
            Ok((Reply::Switched { path, login_ms }, _)) => (path, login_ms),
            other => {
                let why = match other {
                    Ok((Reply::Failed { message, .. }, _)) => format!("host {to_host}: {message}"),
                    Ok((reply, _)) => format!("host {to_host} answered {reply:?}"),
                    Err(e) => e,
                };
                // The session comes back here; a destination that did log in is fenced
                // by this login.
                self.take_back(&state, &from).await;
                self.vm.update_record(|r| r.moved_to = None);
                gate.resume();
                return Err(why);
            }
        };
        // 4. Held and later commands go to the destination.
        self.vm.moved_out(link.clone(), &to_host);
        gate.resume();
        let switchover = held.elapsed();
        drop(_switch);
        let ms = switchover.as_secs_f64() * 1e3;
        tracing::info!(vm = %self.vm.name(), to = %to_host, %path, switchover_ms = ms, drain_ms = drained.as_secs_f64() * 1e3, login_ms, "migrated");
        let note = format!(
            "moved from host {} to host {to_host} ({from} -> {path}): commands held {ms:.1} ms (drain {:.1} ms, login {login_ms:.1} ms)",
            self.shared.name,
            drained.as_secs_f64() * 1e3
        );
        self.vm.event("migration", note.clone());
        // The destination keeps the VM's history from now on.
        let _ = link
            .call(
                &Request::Note { message: note },
                &[],
                Duration::from_secs(5),
            )
            .await;
        self.update(|m| {
            m.phase = MigrationPhase::Forwarding;
            m.switchover_ms = Some(ms);
            m.detail =
                format!("the session is on host {to_host}; forwarding until the VMM has moved");
        });

        // Forward until the VMM has left this host's bus and nothing is in flight.
        loop {
            let forwarded = link.forwarded();
            self.update(|m| m.forwarded = forwarded);
            if !self.vm.bus_connected() && gate.in_flight() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.retire().await;
        let forwarded = link.forwarded();
        self.update(|m| {
            m.forwarded = forwarded;
            m.phase = MigrationPhase::Completed;
            m.detail = format!("the VM runs on host {to_host}");
        });
        Ok(())
    }

    /// After a lost answer to `Switch`: whether the destination runs the VM now (then the
    /// new channel to it, for forwarding). Three tries over a new channel.
    async fn ask_owner(
        &self,
        addr: &str,
        key: &super::channel::ClusterKey,
        to_host: &str,
    ) -> Option<(String, Arc<Link>)> {
        for _ in 0..3 {
            if let Ok(fresh) = Link::open(addr, key, &self.shared.name).await {
                let ask = Request::Owns {
                    vm: self.vm.name().to_owned(),
                };
                match fresh.call(&ask, &[], Duration::from_secs(5)).await {
                    Ok((Reply::Owner { path: Some(path) }, _)) => {
                        tracing::warn!(vm = %self.vm.name(), to = %to_host, "switch answer lost; the destination has the VM");
                        return Some((path, fresh));
                    }
                    Ok((Reply::Owner { path: None }, _)) => return None,
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// Waits until the VMM stops one of the VM's rings here, or leaves the bus.
    async fn await_vmm_stop(&self) -> Result<(), String> {
        let Some(stops) = self.vm.bus_ring_stops() else {
            return Ok(());
        };
        let deadline = Instant::now() + VMM_TIMEOUT;
        loop {
            let now = self.vm.bus_ring_stops().unwrap_or(u64::MAX);
            if now > stops || !self.vm.bus_connected() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the VMM did not stop the VM's rings within {} s",
                    VMM_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Opens the VM's path here again after a failed switchover.
    async fn take_back(&self, state: &datapath::SessionState, from: &str) {
        let record = self.vm.record();
        let mut last: Option<PathError> = None;
        for _ in 0..3 {
            match crate::select::open_path(&self.shared, &record, Some(state)).await {
                Ok(chosen) => {
                    let settled = crate::settle::settle(chosen.path.as_ref(), &record.client).await;
                    self.vm.owe_sense(settled.kept);
                    self.vm.install_path(
                        chosen.path,
                        chosen.adapter,
                        chosen.kind,
                        format!("migration abandoned; back on this host (was {from})"),
                    );
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let why = last.map(|e| e.to_string()).unwrap_or_default();
        self.vm.set_status(
            VmState::Waiting,
            format!("taking the session back failed: {why}"),
        );
        if let Some(vm) = self.shared.vm(self.vm.name()) {
            vm.spawn_bring_up();
        }
    }

    /// Forgets the VM here: it is the destination's.
    async fn retire(&self) {
        let _admin = self.shared.admin.lock().await;
        self.vm.shutdown().await;
        self.shared
            .vm_table()
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.vm.name());
        if let Err(e) = self.shared.store.delete(self.vm.name()) {
            tracing::warn!(vm = %self.vm.name(), error = %e, "cannot remove the migrated VM's record");
        }
    }
}
