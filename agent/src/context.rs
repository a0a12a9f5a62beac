//! The context every part of the agent shares: the config, the locks, the deploy tasks
//! in flight (shutdown waits for them), the open sessions (the cap and eviction), and
//! the shutdown signal. It sits at the bottom of the dependency rule: it names only the
//! leaf modules [`crate::config`] and [`crate::lock`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::AgentConfig;
use crate::lock::Locks;

/// What every session shares.
pub struct Shared {
    pub config: AgentConfig,
    pub locks: Arc<Locks>,
    pub hostname: String,
    pub tasks: Tasks,
    /// Every open session, for the cap and eviction.
    pub sessions: Arc<Registry>,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    pub fn new(config: AgentConfig, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            config,
            locks: Arc::new(Locks::default()),
            hostname: rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
            tasks: Tasks::default(),
            sessions: Arc::new(Registry::default()),
            shutdown,
        }
    }

    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves once shutdown has begun.
    pub async fn shutdown_signal(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Deploy tasks in flight; shutdown waits for them.
#[derive(Clone, Default)]
pub struct Tasks {
    count: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

struct TaskToken(Tasks);

impl Drop for TaskToken {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tasks {
    /// Counts the caller as work in flight until the token drops: shutdown waits for it
    /// (an upload cleaning up and telling its controller why).
    pub fn hold(&self) -> impl Drop + Send + use<> {
        self.count.fetch_add(1, Ordering::SeqCst);
        TaskToken(self.clone())
    }

    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.count.fetch_add(1, Ordering::SeqCst);
        let token = TaskToken(self.clone());
        tokio::spawn(async move {
            let _token = token;
            fut.await
        })
    }

    pub fn in_flight(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// What a session is doing, for eviction: only sessions that hold nothing and are not
/// working for anyone can be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Accepted, `hello` not exchanged yet.
    Handshake,
    /// Waiting for the next request, holding no lock.
    Idle,
    /// Waiting for the next request while holding a lock: never evicted (the idle
    /// timeout frees it).
    IdleLocked,
    /// Serving a request.
    Busy,
}

struct Slot {
    since: Instant,
    state: SlotState,
    evict: Option<oneshot::Sender<()>>,
}

/// The open sessions. At the cap a new connection evicts the oldest session still in its
/// handshake, then the longest-idle one holding no lock; with none of those it is
/// refused. A flood of silent connections so never keeps out the next real client.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    next: u64,
    slots: HashMap<u64, Slot>,
}

impl RegistryInner {
    fn evict_one(&mut self) -> bool {
        let victim = self
            .slots
            .iter()
            .filter_map(|(id, s)| {
                let rank = match s.state {
                    SlotState::Handshake => 0,
                    SlotState::Idle => 1,
                    SlotState::IdleLocked | SlotState::Busy => return None,
                };
                Some((rank, s.since, *id))
            })
            .min();
        match victim.and_then(|(_, _, id)| self.slots.remove(&id)) {
            Some(mut slot) => {
                if let Some(tx) = slot.evict.take() {
                    let _ = tx.send(());
                }
                true
            }
            None => false,
        }
    }
}

/// A session's place in the [`Registry`]; freed on drop.
pub struct SessionSlot {
    registry: Arc<Registry>,
    id: u64,
    /// Resolves when the session was evicted to make room.
    pub evicted: oneshot::Receiver<()>,
}

impl Registry {
    fn inner(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new session, evicting one if `max` are open; `None` if every
    /// session is working or holds a lock.
    pub fn admit(self: &Arc<Self>, max: usize) -> Option<SessionSlot> {
        let mut inner = self.inner();
        if inner.slots.len() >= max && !inner.evict_one() {
            return None;
        }
        let id = inner.next;
        inner.next += 1;
        let (tx, rx) = oneshot::channel();
        inner.slots.insert(
            id,
            Slot {
                since: Instant::now(),
                state: SlotState::Handshake,
                evict: Some(tx),
            },
        );
        Some(SessionSlot {
            registry: self.clone(),
            id,
            evicted: rx,
        })
    }

    /// Evicts one idle or handshaking session (to free a descriptor).
    pub fn evict_one(&self) -> bool {
        self.inner().evict_one()
    }

    pub fn len(&self) -> usize {
        self.inner().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SessionSlot {
    pub fn set(&self, state: SlotState) {
        if let Some(slot) = self.registry.inner().slots.get_mut(&self.id) {
            slot.state = state;
            slot.since = Instant::now();
        }
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.registry.inner().slots.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_silent_session_makes_room() {
        let reg = Arc::new(Registry::default());
        let mut busy = reg.admit(3).unwrap();
        busy.set(SlotState::Busy);
        let mut locked = reg.admit(3).unwrap();
        locked.set(SlotState::IdleLocked);
        let mut old = reg.admit(3).unwrap();
        // Full: the one still in its handshake goes, not the busy or locked ones.
        let mut new = reg.admit(3).expect("room is made");
        assert_eq!(reg.len(), 3);
        assert!(old.evicted.try_recv().is_ok(), "the silent one was told");
        assert!(busy.evicted.try_recv().is_err());
        assert!(locked.evicted.try_recv().is_err());
        // An idle session without a lock can go too; once all work, a newcomer cannot.
        new.set(SlotState::Idle);
        let mut newest = reg.admit(3).expect("the idle one makes room");
        assert!(new.evicted.try_recv().is_ok());
        newest.set(SlotState::Busy);
        assert!(reg.admit(3).is_none(), "all busy or locked: refused");
        drop(busy);
        assert!(reg.admit(3).is_some(), "a freed slot is reused");
        drop(old);
        let _ = (&mut locked, &mut newest);
    }
}
