//! `deploy-agent serve`: the Unix socket, the accept loop, recovery at start, and a
//! graceful shutdown on SIGTERM that lets every deploy in flight finish.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::AgentConfig;
use crate::lock::Locks;
use crate::recover;

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

/// Logs a recurring condition at most once per interval, with how often it happened.
struct Throttled {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    fn warn(&mut self, msg: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            tracing::warn!("{msg} ({} more since the last report)", self.suppressed);
        } else {
            tracing::warn!("{msg}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// How long the accept loop pauses after running out of descriptors (or memory), so a
/// flood cannot make it spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this interval for accept errors and refused connections.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Binds the socket: a stale socket file from a crashed agent is replaced, a live one
/// is an error. The socket is created 0660 (umask) and given the configured group.
pub fn bind(config: &AgentConfig) -> anyhow::Result<UnixListener> {
    let path = &config.socket;
    // Resolve the group first: an unknown group must not leave a socket file behind.
    let gid = match &config.socket_group {
        Some(group) => Some(crate::config::group_id(group).with_context(|| {
            format!(
                "unknown socket_group {group:?} (no such group in `getent group`, nor a number); \
                 create it (groupadd {group}) or fix socket_group in agent.toml"
            )
        })?),
        None => None,
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create socket dir {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another deploy-agent is already listening on {}",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => {}
    }
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o117));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
    let finish = || -> anyhow::Result<()> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        if let (Some(gid), Some(group)) = (gid, &config.socket_group) {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("cannot give {} to group {group}", path.display()))?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        drop(listener);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared::new(config, stop_rx));
    // Take the locks of unfinished deploys before anyone can connect.
    let pending = recover::lock_unfinished(&shared).await;
    let listener = bind(&shared.config)?;
    for job in pending {
        let s = shared.clone();
        shared
            .tasks
            .spawn(async move { recover::finish(&s, job).await });
    }
    // Review-app instances past their instance_ttl: now, then every minute.
    tokio::spawn(crate::instances::expiry_loop(shared.clone()));
    tracing::info!(
        socket = %shared.config.socket.display(),
        "deploy-agent {} ready",
        env!("CARGO_PKG_VERSION")
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // A deploy must outlive the terminal or SSH session that started the agent.
    let mut hup = signal(SignalKind::hangup())?;
    let max = shared.config.sessions.max_sessions;
    let mut accept_errors = Throttled::new(LOG_EVERY);
    let mut refused = Throttled::new(LOG_EVERY);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match shared.sessions.admit(max) {
                    Some(slot) => {
                        let s = shared.clone();
                        tokio::spawn(crate::session::serve(s, stream, slot));
                    }
                    None => {
                        drop(stream);
                        refused.warn(&format!(
                            "{max} sessions are open and all busy or holding a lock \
                             (max_sessions); refusing a new connection"
                        ));
                    }
                },
                Err(e) => {
                    let out_of_fds = matches!(
                        e.raw_os_error(),
                        Some(libc_errno::EMFILE | libc_errno::ENFILE
                            | libc_errno::ENOBUFS | libc_errno::ENOMEM)
                    );
                    accept_errors.warn(&format!(
                        "accept: {e}; {} session(s) open{}",
                        shared.sessions.len(),
                        if out_of_fds { "; pausing the accept loop" } else { "" }
                    ));
                    if out_of_fds {
                        // Free a descriptor if a silent session holds one, then pause.
                        shared.sessions.evict_one();
                    }
                    tokio::time::sleep(if out_of_fds { ACCEPT_BACKOFF } else { ACCEPT_BACKOFF / 10 }).await;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => tracing::info!("SIGHUP ignored"),
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    drop(listener);
    let _ = std::fs::remove_file(&shared.config.socket);
    let _ = stop_tx.send(true);
    let n = shared.tasks.in_flight();
    if n > 0 {
        tracing::info!("waiting for {n} deploy(s) in flight to finish");
    }
    shared.tasks.wait_idle().await;
    tracing::info!("deploy-agent stopped");
    Ok(())
}

/// The errno values the accept loop backs off on.
mod libc_errno {
    pub const EMFILE: i32 = rustix::io::Errno::MFILE.raw_os_error();
    pub const ENFILE: i32 = rustix::io::Errno::NFILE.raw_os_error();
    pub const ENOBUFS: i32 = rustix::io::Errno::NOBUFS.raw_os_error();
    pub const ENOMEM: i32 = rustix::io::Errno::NOMEM.raw_os_error();
}

/// `deploy-agent bridge`: splices stdin/stdout to the agent's socket, for servers whose
/// sshd forbids streamlocal forwarding.
pub async fn bridge(socket: &Path) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot connect to the deploy-agent socket {}; is deploy-agent running?",
            socket.display()
        )
    })?;
    let (mut rd, mut wr) = stream.into_split();
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let up = async {
        let r = tokio::io::copy(&mut stdin, &mut wr).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
        r
    };
    let down = async {
        let r = tokio::io::copy(&mut rd, &mut stdout).await;
        let _ = tokio::io::AsyncWriteExt::flush(&mut stdout).await;
        r
    };
    // The agent closing its side ends the bridge; stdin closing only half-closes.
    tokio::pin!(up);
    tokio::pin!(down);
    tokio::select! {
        r = &mut down => { r?; }
        r = &mut up => { r?; down.await?; }
    }
    Ok(())
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

    #[test]
    fn throttled_logs_once_per_interval() {
        let mut t = Throttled::new(Duration::from_secs(3600));
        t.warn("a");
        t.warn("b");
        t.warn("c");
        assert_eq!(t.suppressed, 2);
    }
}
