//! The registry of live sessions on this server instance: one per agent id, the newest wins.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::protocol::AgentId;

/// Something a session must act on that did not come from its own socket.
#[derive(Clone, Debug)]
pub(crate) enum Event {
    /// The directory changed; send the agent this encoded `Directory` frame (encoded once
    /// for all sessions).
    Directory(bytes::Bytes),
    /// End the session with this reason (replaced, removed, re-keyed, shutdown).
    Close(String),
}

struct Entry {
    session: u64,
    events: async_channel::Sender<Event>,
}

/// Live sessions by agent id.
#[derive(Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<AgentId, Entry>>,
    next: AtomicU64,
}

impl Sessions {
    /// Registers a session for `agent` if `still_valid` (the agent is still in the current
    /// directory with the key its proof was checked against), closing any older session;
    /// returns the session number and the session's event stream. `None`: the directory
    /// changed during the handshake and nothing was registered (nor any older session closed).
    ///
    /// `still_valid` runs under the registry's lock. The directory watcher swaps the
    /// directory first and only then takes this lock to close sessions of removed or
    /// re-keyed agents, so either `still_valid` already sees the new directory, or the
    /// watcher finds this session registered and closes it: a handshake that raced a
    /// revocation never ends as a live session.
    pub(crate) fn register(
        &self,
        agent: &AgentId,
        still_valid: impl FnOnce() -> bool,
    ) -> Option<(u64, async_channel::Receiver<Event>)> {
        let mut map = self.lock();
        if !still_valid() {
            return None;
        }
        let session = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = async_channel::unbounded();
        let old = map.insert(
            agent.clone(),
            Entry {
                session,
                events: tx,
            },
        );
        drop(map);
        if let Some(old) = old {
            log::info!("agent {agent}: a newer session replaces the current one");
            let _ = old
                .events
                .try_send(Event::Close("replaced by a newer session".into()));
        }
        Some((session, rx))
    }

    /// Removes `agent`'s entry if it is still `session` (a newer one may have replaced it).
    pub(crate) fn unregister(&self, agent: &AgentId, session: u64) {
        let mut map = self.lock();
        if map.get(agent).is_some_and(|e| e.session == session) {
            map.remove(agent);
        }
    }

    pub(crate) fn send(&self, agent: &AgentId, event: Event) {
        if let Some(e) = self.lock().get(agent) {
            let _ = e.events.try_send(event);
        }
    }

    pub(crate) fn broadcast(&self, event: Event) {
        for e in self.lock().values() {
            let _ = e.events.try_send(event.clone());
        }
    }

    pub(crate) fn close_all(&self, reason: &str) {
        self.broadcast(Event::Close(reason.to_owned()));
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AgentId, Entry>> {
        crate::sync::lock(&self.map)
    }
}
