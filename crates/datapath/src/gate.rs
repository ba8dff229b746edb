//! Quiesce and drain for any data path: commands pass a gate that can be closed, and the
//! closer waits until every command that passed has completed.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
struct State {
    closed: bool,
    in_flight: usize,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    changed: Notify,
}

/// The gate in front of a data path. Cheap to clone; clones share the state.
#[derive(Clone, Default)]
pub struct Gate {
    inner: Arc<Inner>,
}

/// A command inside the gate; dropping it (on completion, error or cancellation) lets the
/// gate drain.
pub struct Ticket {
    inner: Arc<Inner>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut s) = self.inner.state.lock() {
            s.in_flight -= 1;
        }
        self.inner.changed.notify_waiters();
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    /// Waits while the gate is closed, then admits one command.
    pub async fn enter(&self) -> Ticket {
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
                if !s.closed {
                    s.in_flight += 1;
                    return Ticket {
                        inner: self.inner.clone(),
                    };
                }
            }
            notified.await;
        }
    }

    /// Closes the gate (new commands wait) and returns once no admitted command is left.
    pub async fn quiesce(&self) {
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
                s.closed = true;
                if s.in_flight == 0 {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Closes the gate without waiting: commands arriving from now on wait.
    pub fn close(&self) {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed = true;
    }

    /// Opens the gate again; waiting commands proceed.
    pub fn resume(&self) {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed = false;
        self.inner.changed.notify_waiters();
    }

    /// Commands admitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_flight
    }

    pub fn is_closed(&self) -> bool {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn quiesce_waits_for_admitted_commands_and_holds_new_ones() {
        let gate = Gate::new();
        let t = gate.enter().await;
        let g2 = gate.clone();
        let drained = tokio::spawn(async move { g2.quiesce().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!drained.is_finished(), "drained with a command in flight");
        drop(t);
        drained.await.unwrap();
        assert!(gate.is_closed());
        let g3 = gate.clone();
        let waiting = tokio::spawn(async move { g3.enter().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "admitted while closed");
        gate.resume();
        let _t = waiting.await.unwrap();
        assert_eq!(gate.in_flight(), 1);
    }
}
