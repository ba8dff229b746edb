//! Building a target from its configuration, listening on portals, and shutting down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iscsi_proto::chap::{Credentials, Secret};
use iscsi_proto::keys::{Digest, NegotiationConfig};
use iscsi_proto::target::{AuthPolicy, PortalConfig, TargetEntry};
use scsi::backend::{FileBackend, FileOptions, MemoryBackend, ReadOnly};
use scsi::{BlockBackend, LogicalUnit, LuConfig, LunMap};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{BackendSpec, ChapConfig, LunConfig, TargetConfig};
use crate::sessions::SessionTable;

/// Why the target could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("LUN {lun} of {target}: {source}")]
    Backend {
        target: String,
        lun: u64,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// State shared by every connection of the target.
pub(crate) struct Shared {
    pub portal: Arc<PortalConfig>,
    pub luns: HashMap<String, Arc<LunMap>>,
    pub sessions: Mutex<SessionTable>,
    pub portal_group_tag: u16,
}

impl Shared {
    pub(crate) fn luns_of(&self, target: &str) -> Option<Arc<LunMap>> {
        self.luns.get(&target.to_ascii_lowercase()).cloned()
    }
}

/// A configured target, ready to listen.
pub struct Target {
    config: TargetConfig,
    luns: HashMap<String, Arc<LunMap>>,
}

impl Target {
    /// Validates the configuration and opens every back-end.
    pub fn build(config: TargetConfig) -> Result<Self, TargetError> {
        config.validate().map_err(TargetError::Config)?;
        let mut luns = HashMap::new();
        for t in &config.targets {
            let mut map = LunMap::new();
            for l in &t.luns {
                let backend = open_backend(l).map_err(|source| TargetError::Backend {
                    target: t.iqn.clone(),
                    lun: l.id,
                    source,
                })?;
                let naa = naa_id(&t.iqn, l.id);
                let lu_config = LuConfig {
                    // Unique per target name and LUN (guests and multipath tell disks apart by
                    // it), like the NAA identifier it is derived from.
                    serial: l
                        .serial
                        .clone()
                        .unwrap_or_else(|| format!("viscsi{:014x}", naa >> 8)),
                    naa_id: naa,
                    block_size: l.block_size.unwrap_or(512),
                    thin_provisioning: backend.as_discard().is_some(),
                    ..LuConfig::default()
                };
                map.insert(l.id, Arc::new(LogicalUnit::new(backend, lu_config)));
            }
            luns.insert(t.iqn.to_ascii_lowercase(), Arc::new(map));
        }
        Ok(Target { config, luns })
    }

    /// Binds every portal and starts accepting connections.
    pub async fn serve(self) -> Result<RunningTarget, TargetError> {
        let mut listeners = Vec::new();
        for addr in &self.config.portals {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| TargetError::Listen {
                    addr: *addr,
                    source,
                })?;
            listeners.push(l);
        }
        let local_addrs: Vec<SocketAddr> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let portal = portal_config(&self.config, &local_addrs)?;
        let shared = Arc::new(Shared {
            portal: Arc::new(portal),
            luns: self.luns,
            sessions: Mutex::new(SessionTable::default()),
            portal_group_tag: 1,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for listener in listeners {
            let shared = shared.clone();
            let stop = stop_rx.clone();
            tasks.spawn(accept_loop(listener, shared, stop));
        }
        Ok(RunningTarget {
            local_addrs,
            stop: stop_tx,
            tasks,
            shared,
        })
    }
}

/// A target that is listening. Dropping it does not stop it; call [`RunningTarget::shutdown`].
pub struct RunningTarget {
    local_addrs: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
}

impl RunningTarget {
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Stops accepting, ends every session, flushes the back-ends.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        for map in self.shared.luns.values() {
            for lun in map.luns() {
                if let Some(lu) = map.get(lun) {
                    if let Err(e) = lu.backend().flush() {
                        tracing::warn!(lun, error = %e, "flush at shutdown failed");
                    }
                }
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tracing::debug!(%peer, "connection accepted");
                    conns.spawn(crate::connection::serve(stream, peer, shared.clone(), stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    while conns.join_next().await.is_some() {}
}

fn open_backend(l: &LunConfig) -> std::io::Result<Arc<dyn BlockBackend>> {
    fn shared<B: BlockBackend + 'static>(b: B, read_only: bool) -> Arc<dyn BlockBackend> {
        if read_only {
            Arc::new(ReadOnly(b))
        } else {
            Arc::new(b)
        }
    }
    let spec = l.spec().map_err(std::io::Error::other)?;
    Ok(match spec {
        BackendSpec::Memory { size } => shared(MemoryBackend::new(size), l.read_only),
        BackendSpec::File { path } => {
            let create_len = match &l.size {
                Some(s) => Some(crate::config::parse_size(s).map_err(std::io::Error::other)?),
                None => None,
            };
            let opts = FileOptions {
                direct: l.direct,
                read_only: l.read_only,
                create_len,
            };
            shared(FileBackend::open(&path, opts)?, l.read_only)
        }
    })
}

/// A stable 60-bit identifier for an LU, derived from its target name and LUN so that it
/// survives restarts (VPD page 0x83 NAA designator).
fn naa_id(iqn: &str, lun: u64) -> u64 {
    // FNV-1a: stable across Rust versions, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in iqn.to_ascii_lowercase().bytes().chain(lun.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn credentials(c: &ChapConfig) -> Result<Credentials, TargetError> {
    let secret = c.resolve_secret().map_err(TargetError::Config)?;
    Ok(Credentials {
        user: c.user.clone(),
        secret: Secret::new(secret),
    })
}

fn portal_config(config: &TargetConfig, local: &[SocketAddr]) -> Result<PortalConfig, TargetError> {
    let mut targets = Vec::new();
    for t in &config.targets {
        let initiators = t
            .chap
            .iter()
            .map(credentials)
            .collect::<Result<Vec<_>, _>>()?;
        let target = t.mutual_chap.as_ref().map(credentials).transpose()?;
        targets.push(TargetEntry {
            name: t.iqn.clone(),
            alias: t.alias.clone(),
            auth: AuthPolicy {
                initiators,
                target,
                algorithms: Vec::new(),
            },
            allowed_initiators: t.allowed_initiators.clone(),
        });
    }
    let discovery = config
        .discovery_chap
        .iter()
        .map(credentials)
        .collect::<Result<Vec<_>, _>>()?;
    let l = &config.limits;
    let digests = if l.digests {
        vec![Digest::None, Digest::Crc32c]
    } else {
        vec![Digest::None]
    };
    let negotiation = NegotiationConfig {
        header_digest: digests.clone(),
        data_digest: digests,
        max_recv_data_segment_length: l.max_recv_data_segment_length,
        max_burst_length: l.max_burst_length,
        first_burst_length: l.first_burst_length,
        initial_r2t: l.initial_r2t,
        immediate_data: l.immediate_data,
        max_outstanding_r2t: l.max_outstanding_r2t,
        max_connections: 1,
        ..NegotiationConfig::default()
    };
    let addresses = local
        .iter()
        .map(|a| match a {
            SocketAddr::V4(v4) => format!("{}:{},1", v4.ip(), v4.port()),
            SocketAddr::V6(v6) => format!("[{}]:{},1", v6.ip(), v6.port()),
        })
        .collect();
    Ok(PortalConfig {
        targets,
        discovery_auth: AuthPolicy {
            initiators: discovery,
            target: None,
            algorithms: Vec::new(),
        },
        negotiation,
        portal_group_tag: 1,
        addresses,
        command_window: l.command_window,
        nop_in_interval: (l.nop_in_interval_secs > 0)
            .then(|| Duration::from_secs(l.nop_in_interval_secs)),
        nop_in_timeout: Duration::from_secs(l.nop_in_timeout_secs.max(1)),
    })
}
