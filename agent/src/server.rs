//! `deploy-agent serve`: the Unix socket, the accept loop, recovery at start, and a
//! graceful shutdown on SIGTERM that lets every deploy in flight finish.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::context::Shared;
use crate::deploy::recover;

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
        Some(group) => Some(group_id(group).with_context(|| {
            format!(
                "unknown socket_group {group:?} (not a group name in /etc/group nor a number); \
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
    fn throttled_logs_once_per_interval() {
        let mut t = Throttled::new(Duration::from_secs(3600));
        t.warn("a");
        t.warn("b");
        t.warn("c");
        assert_eq!(t.suppressed, 2);
    }
}
