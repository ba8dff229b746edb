//! The session table: TSIH allocation and session reinstatement (RFC 7143 §6.3.5).
//!
//! A session is identified by its initiator port (InitiatorName + ISID) and its target. A new
//! login from the same initiator port with TSIH 0 reinstates: the old session is told to end
//! and its tasks die with its connection. The old session's clean-up then must not report an
//! I_T nexus loss, because the nexus lives on in the new session; `generation` tells them apart.

use std::collections::HashMap;
use std::sync::Arc;

use iscsi_proto::target::SessionRequest;
use iscsi_wire::LoginStatus;
use tokio::sync::Notify;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SessionKey {
    initiator: String,
    isid: u64,
    target: String,
}

impl SessionKey {
    pub(crate) fn of(req: &SessionRequest) -> Self {
        SessionKey {
            initiator: req.initiator_name.to_ascii_lowercase(),
            isid: req.isid.0,
            target: req
                .target_name
                .as_deref()
                .unwrap_or("")
                .to_ascii_lowercase(),
        }
    }
}

struct Entry {
    tsih: u16,
    generation: u64,
    end: Arc<Notify>,
}

/// A placed session, held by its connection task.
pub(crate) struct Placement {
    pub key: SessionKey,
    pub tsih: u16,
    pub generation: u64,
    /// Notified when a newer login reinstates this session.
    pub end: Arc<Notify>,
    pub reinstated_older: bool,
}

#[derive(Default)]
pub(crate) struct SessionTable {
    next_tsih: u16,
    next_generation: u64,
    sessions: HashMap<SessionKey, Entry>,
}

impl SessionTable {
    pub(crate) fn place(&mut self, req: &SessionRequest) -> Result<Placement, LoginStatus> {
        let key = SessionKey::of(req);
        if req.tsih != 0 {
            // Adding a connection to a session: MaxConnections is 1 and ERL is 0.
            let exists = self.sessions.get(&key).is_some_and(|e| e.tsih == req.tsih);
            return Err(if exists {
                LoginStatus::CANT_INCLUDE_IN_SESSION
            } else {
                LoginStatus::SESSION_DOES_NOT_EXIST
            });
        }
        if self.sessions.len() >= usize::from(u16::MAX) - 1 {
            return Err(LoginStatus::OUT_OF_RESOURCES);
        }
        let reinstated_older = match self.sessions.remove(&key) {
            Some(old) => {
                old.end.notify_one();
                true
            }
            None => false,
        };
        let tsih = self.alloc_tsih();
        self.next_generation += 1;
        let generation = self.next_generation;
        let end = Arc::new(Notify::new());
        self.sessions.insert(
            key.clone(),
            Entry {
                tsih,
                generation,
                end: end.clone(),
            },
        );
        Ok(Placement {
            key,
            tsih,
            generation,
            end,
            reinstated_older,
        })
    }

    /// Removes a session that ended. Returns false if a newer session took its place.
    pub(crate) fn remove(&mut self, key: &SessionKey, generation: u64) -> bool {
        match self.sessions.get(key) {
            Some(e) if e.generation == generation => {
                self.sessions.remove(key);
                true
            }
            _ => false,
        }
    }

    /// Tells every session to end (target cold reset).
    pub(crate) fn end_all(&self) {
        for e in self.sessions.values() {
            e.end.notify_one();
        }
    }

    fn alloc_tsih(&mut self) -> u16 {
        loop {
            self.next_tsih = self.next_tsih.wrapping_add(1);
            let t = self.next_tsih;
            if t != 0 && !self.sessions.values().any(|e| e.tsih == t) {
                return t;
            }
        }
    }
}
