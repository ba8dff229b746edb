//! The destination's side of a migration: accept agents of the cluster, take an offered VM
//! (serve its bus, prove a data path with a trial login), log in at the switchover, and
//! run the commands the source forwards afterwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use datapath::{Command, PathError, TmfFunction};
use tokio::sync::mpsc;

use super::channel::{Channel, ChannelListener};
use super::protocol::{self, Reply, Request};
use crate::host::{Agent, Shared};
use crate::model::{PathPolicy, VmEvent, VmRecord};
use crate::select::Prepared;
use crate::vm::Vm;

/// Starts accepting migrations on `addr`; returns the bound address.
pub(crate) async fn listen(agent: &Agent, addr: &str) -> Result<SocketAddr, String> {
    let Some(options) = agent.shared().migration.clone() else {
        return Err("migration listener without a cluster key".into());
    };
    let listener = ChannelListener::bind(addr, options.key, agent.name().to_owned())
        .await
        .map_err(|e| format!("migration listener {addr}: {e}"))?;
    let local = listener.local_addr();
    tracing::info!(addr = %local, "accepting migrations");
    let weak = Arc::downgrade(agent.shared());
    tokio::spawn(async move {
        loop {
            let incoming = match listener.accept().await {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(error = %e, "migration accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(shared) = weak.upgrade() else { return };
            tokio::spawn(async move {
                let remote = incoming.remote_addr();
                match incoming.handshake().await {
                    Ok(channel) => serve(shared, channel).await,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "migration channel refused")
                    }
                }
            });
        }
    });
    Ok(local)
}

/// What one channel has taken on.
enum Stage {
    Idle,
    /// Offered and prepared, not switched.
    Prepared {
        vm: Arc<Vm>,
        path: Box<Prepared>,
        from: String,
    },
    /// Switched: the VM is this host's; the channel carries forwarded commands.
    Owner {
        vm: Arc<Vm>,
    },
}

async fn serve(shared: Arc<Shared>, channel: Channel) {
    let peer = channel.peer().to_owned();
    tracing::info!(%peer, "migration channel open");
    let (mut sender, mut receiver) = channel.split();
    let (replies, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Some(frame) = queue.recv().await {
            if sender.send(&frame).await.is_err() {
                return;
            }
        }
    });
    let mut stage = Stage::Idle;
    loop {
        let frame = match receiver.recv().await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(%peer, reason = %e, "migration channel ended");
                break;
            }
        };
        let (envelope, payload) = match protocol::decode::<Request>(frame) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "bad migration message; closing");
                break;
            }
        };
        let id = envelope.id;
        let reply = |body: Reply, payload: &[u8]| {
            let _ = replies.send(protocol::encode(id, &body, payload));
        };
        match (envelope.body, &stage) {
            (
                Request::Offer {
                    record,
                    from_host,
                    path,
                    adapter,
                    vhost_socket,
                },
                Stage::Idle,
            ) => match offer(&shared, *record, &from_host, path, adapter, vhost_socket).await {
                Ok((vm, prepared)) => {
                    let described = describe_prepared(&prepared);
                    reply(
                        Reply::Prepared {
                            host: shared.name.clone(),
                            path: described,
                            socket: vm.record().frontend.and_then(|f| f.socket),
                        },
                        &[],
                    );
                    stage = Stage::Prepared {
                        vm,
                        path: Box::new(prepared),
                        from: from_host,
                    };
                }
                Err(why) => reply(
                    Reply::Failed {
                        kind: "refused".into(),
                        message: why,
                    },
                    &[],
                ),
            },
            (Request::Switch { state }, Stage::Prepared { vm, path, from }) => {
                let t0 = Instant::now();
                let record = vm.record();
                match path.adapter.open(&record.client, Some(&state)).await {
                    Ok(opened) => {
                        let login_ms = t0.elapsed().as_secs_f64() * 1e3;
                        let settled = crate::settle::settle(opened.as_ref(), &record.client).await;
                        vm.owe_sense(settled.kept);
                        let mut notes = String::new();
                        if settled.absorbed > 0 {
                            notes.push_str(&format!(
                                "; {} reconnect unit attention(s) taken",
                                settled.absorbed
                            ));
                        }
                        if let Some(r) = &settled.reservation {
                            notes.push_str(&format!("; {r}"));
                        }
                        let described = describe_prepared(path);
                        vm.switched_in(
                            opened,
                            path.name.clone(),
                            path.kind,
                            format!("migrated from host {from}; {}", path.reason),
                        );
                        vm.event(
                            "migration",
                            format!(
                                "arrived from host {from} on {described}: logged in with the same ISID in {login_ms:.1} ms{notes}"
                            ),
                        );
                        if std::env::var_os("VISCSI_MIGRATION_DROP_SWITCHED").is_some() {
                            // Fault test: the answer is lost with the channel.
                            tracing::warn!(vm = %vm.name(), "dropping the switch answer (VISCSI_MIGRATION_DROP_SWITCHED)");
                            stage = Stage::Owner { vm: vm.clone() };
                            break;
                        }
                        reply(
                            Reply::Switched {
                                path: described,
                                login_ms,
                            },
                            &[],
                        );
                        stage = Stage::Owner { vm: vm.clone() };
                    }
                    Err(e) => {
                        reply(protocol::failed(&e), &[]);
                        forget(&shared, vm).await;
                        stage = Stage::Idle;
                    }
                }
            }
            (Request::Abandon { reason }, Stage::Prepared { vm, from, .. }) => {
                tracing::info!(vm = %vm.name(), %from, %reason, "incoming migration abandoned");
                forget(&shared, vm).await;
                stage = Stage::Idle;
                reply(Reply::Done, &[]);
            }
            (Request::Abandon { .. }, Stage::Idle) => reply(Reply::Done, &[]),
            (Request::Owns { vm }, Stage::Idle) => {
                let owned = shared
                    .vm(&vm)
                    .filter(|v| v.state() == crate::model::VmState::Running)
                    .filter(|v| v.current().is_some());
                let path = owned.as_ref().map(|v| super::source::describe(v));
                reply(Reply::Owner { path }, &[]);
                // This channel now carries the source's forwarded commands.
                if let Some(vm) = owned {
                    stage = Stage::Owner { vm };
                }
            }
            (
                Request::Command {
                    lun,
                    cdb,
                    read_len,
                    attr,
                },
                Stage::Owner { vm },
            ) => {
                let vm = vm.clone();
                let replies = replies.clone();
                tokio::spawn(async move {
                    let body = run_command(&vm, lun, &cdb, read_len, attr, payload).await;
                    let (body, data) = match body {
                        Ok((body, data)) => (body, data),
                        Err(e) => (protocol::failed(&e), Bytes::new()),
                    };
                    let _ = replies.send(protocol::encode(id, &body, &data));
                });
            }
            (Request::Note { message }, Stage::Owner { vm }) => {
                vm.event("migration", message);
                reply(Reply::Done, &[]);
            }
            (Request::TaskManagement { function, lun }, Stage::Owner { vm }) => {
                let vm = vm.clone();
                let replies = replies.clone();
                tokio::spawn(async move {
                    let body = match vm.task_management(TmfFunction(function), lun).await {
                        Ok(()) => Reply::Done,
                        Err(e) => protocol::failed(&e),
                    };
                    let _ = replies.send(protocol::encode(id, &body, &[]));
                });
            }
            (other, _) => reply(
                Reply::Failed {
                    kind: "refused".into(),
                    message: format!("{} is not expected now", request_name(&other)),
                },
                &[],
            ),
        }
    }
    // The source is gone before the switchover: the VM stays there.
    if let Stage::Prepared { vm, from, .. } = stage {
        tracing::warn!(vm = %vm.name(), %from, "source left before the switchover; incoming VM dropped");
        forget(&shared, &vm).await;
    }
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Offer { .. } => "offer",
        Request::Switch { .. } => "switch",
        Request::Abandon { .. } => "abandon",
        Request::Command { .. } => "command",
        Request::TaskManagement { .. } => "task management",
        Request::Note { .. } => "note",
        Request::Owns { .. } => "owns",
    }
}

fn describe_prepared(p: &Prepared) -> String {
    match p.trial.vf {
        Some(_) => format!("offload {}", p.name),
        None => p.kind.to_string(),
    }
}

async fn run_command(
    vm: &Vm,
    lun: u64,
    cdb: &str,
    read_len: u32,
    attr: u8,
    data_out: Bytes,
) -> Result<(Reply, Bytes), PathError> {
    let cdb = protocol::from_hex(cdb)
        .filter(|c| !c.is_empty() && c.len() <= 260)
        .ok_or_else(|| PathError::Refused("malformed CDB".into()))?;
    let command = Command {
        lun,
        cdb: Bytes::from(cdb),
        data_out,
        read_len,
        attr: protocol::attr_of(attr),
    };
    let c = vm.submit(command).await?;
    let residual = match c.residual {
        datapath::Residual::None => 0,
        datapath::Residual::Underflow(n) => i64::from(n),
        datapath::Residual::Overflow(n) => -i64::from(n),
    };
    Ok((
        Reply::Completion {
            status: c.status.0,
            sense: protocol::to_hex(&c.sense),
            residual,
        },
        c.data.to_bytes(),
    ))
}

/// Takes an offered VM: checks it, serves its bus, proves a path. The VM is in the agent's
/// table (state incoming) but not stored until the switchover.
async fn offer(
    shared: &Arc<Shared>,
    mut record: VmRecord,
    from: &str,
    path: Option<PathPolicy>,
    adapter: Option<String>,
    vhost_socket: Option<std::path::PathBuf>,
) -> Result<(Arc<Vm>, Prepared), String> {
    record.validate()?;
    if let Some(p) = path {
        record.policy = p;
        if p == PathPolicy::Software {
            record.adapter = None;
        }
    }
    if let Some(a) = adapter {
        if !shared.adapter_known(&a) {
            return Err(format!("no adapter named {a}"));
        }
        record.adapter = Some(a);
    }
    record.moved_to = None;
    let vm = {
        let _admin = shared.admin.lock().await;
        if shared.vm(&record.name).is_some() {
            return Err(format!("a VM named {} exists here", record.name));
        }
        if let Some(other) = shared.initiator_user(&record.client.initiator_name) {
            return Err(format!(
                "InitiatorName {} is already used here by VM {other}",
                record.client.initiator_name
            ));
        }
        if let Some(frontend) = &mut record.frontend {
            let socket = vhost_socket.unwrap_or_else(|| shared.default_socket(&record.name));
            if let Some(other) = shared.socket_user(&socket) {
                return Err(format!(
                    "socket {} is already used here by VM {other}",
                    socket.display()
                ));
            }
            frontend.socket = Some(socket);
        }
        record.push_event(VmEvent::new(
            "migration",
            format!("offered by host {from} to host {}", shared.name),
        ));
        let vm = Vm::new_incoming(shared, record.clone(), from);
        shared
            .vm_table()
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.name.clone(), vm.clone());
        vm
    };
    if let Err(e) = vm.start_bus() {
        forget(shared, &vm).await;
        return Err(e);
    }
    if let Some(delay) = prepare_delay() {
        tokio::time::sleep(delay).await;
    }
    match crate::select::prepare_path(shared, &record).await {
        Ok(prepared) => {
            tracing::info!(vm = %record.name, %from, adapter = %prepared.name, "incoming VM prepared");
            Ok((vm, prepared))
        }
        Err(e) => {
            forget(shared, &vm).await;
            Err(format!("no data path here: {e}"))
        }
    }
}

/// Drops an incoming VM that did not switch over (its commands, if any, fail).
async fn forget(shared: &Shared, vm: &Arc<Vm>) {
    vm.shutdown().await;
    let mut table = shared.vm_table().write().unwrap_or_else(|p| p.into_inner());
    if table.get(vm.name()).is_some_and(|v| Arc::ptr_eq(v, vm)) {
        table.remove(vm.name());
    }
}

/// A pause before preparing, for fault tests that stop the destination mid-migration
/// (`VISCSI_MIGRATION_PREPARE_DELAY_MS`).
fn prepare_delay() -> Option<std::time::Duration> {
    std::env::var("VISCSI_MIGRATION_PREPARE_DELAY_MS")
        .ok()?
        .parse()
        .ok()
        .map(std::time::Duration::from_millis)
}
