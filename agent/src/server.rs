//! `deploy-agent serve`: the Unix socket, the accept loop, recovery at start, and a
//! graceful shutdown on SIGTERM that lets every deploy in flight finish.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};
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

/// Binds the socket: a stale socket file from a crashed agent is replaced, a live one
/// is an error. The socket is created 0660 (umask) and given the configured group.
pub fn bind(config: &AgentConfig) -> anyhow::Result<UnixListener> {
    let path = &config.socket;
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(group) = &config.socket_group {
        let gid = group_id(group).with_context(|| format!("unknown socket_group {group:?}"))?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {group}", path.display()))?;
    }
    Ok(listener)
}

/// Looks a group up in /etc/group (a numeric gid is taken as is).
fn group_id(name: &str) -> anyhow::Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let text = std::fs::read_to_string("/etc/group")?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let _ = f.next();
            let gid = f.next()?.parse().ok()?;
            (n == name).then_some(gid)
        })
        .next()
        .ok_or_else(|| anyhow::anyhow!("no such group in /etc/group"))
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
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let s = shared.clone();
                    tokio::spawn(crate::session::serve(s, stream));
                }
                Err(e) => tracing::warn!("accept: {e}"),
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
