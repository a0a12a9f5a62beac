//! One controller session: the handshake, then one request at a time. This is the one
//! dispatch point; each request's work lives in its own module.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::codec::{self, Connection, Frame};
use proto::{
    Action, AppRef, CheckReply, DeployReport, ErrorCode, Event, HelloReply, HistoryReply, LockInfo,
    Outcome, PROTOCOL_VERSION, PathCheck, ProtoError, PushReady, ReleaseInfo, ReleaseStatus,
    ReleasesReply, Request, Response, StatusReply, Unlocked,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::deploy::{Events, Run};
use crate::journal::{self, Journal, Phase};
use crate::lock::LockGuard;
use crate::release::layout::{Layout, valid_release_id};
use crate::release::unpack;
use crate::server::Shared;

type Reply = Result<Response, ProtoError>;
/// A run ready to start, and the receiving end of its progress.
type Pending = (Run, mpsc::UnboundedReceiver<Event>);

pub async fn serve<S>(shared: Arc<Shared>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = match codec::accept(stream).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("handshake failed: {e}");
            return;
        }
    };
    let mut session = Session {
        shared,
        locks: HashMap::new(),
    };
    if let Err(e) = session.run(&mut conn).await {
        tracing::debug!("session ended: {e}");
    }
    // Dropping `session` drops the locks it holds; runs in flight keep their own.
}

struct Session {
    shared: Arc<Shared>,
    /// Locks taken with `Lock`, by deploy_to.
    locks: HashMap<PathBuf, Arc<LockGuard>>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error("protocol: {0}")]
    Protocol(String),
}

impl Session {
    async fn run<S>(&mut self, conn: &mut Connection<S>) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match conn.recv_json::<Request>().await? {
            Request::Hello(h) if h.protocol == PROTOCOL_VERSION => {
                conn.send(&Response::Hello(HelloReply {
                    protocol: PROTOCOL_VERSION,
                    version: env!("CARGO_PKG_VERSION").into(),
                    hostname: self.shared.hostname.clone(),
                }))
                .await?;
            }
            Request::Hello(h) => {
                let upgrade = if h.protocol < PROTOCOL_VERSION {
                    "upgrade deployctl"
                } else {
                    "upgrade deploy-agent on this host (deployctl bootstrap ENV)"
                };
                let e = ProtoError::new(
                    ErrorCode::VersionMismatch,
                    format!(
                        "protocol mismatch: deployctl {} speaks protocol {}, deploy-agent {} speaks {}; {upgrade}",
                        h.version,
                        h.protocol,
                        env!("CARGO_PKG_VERSION"),
                        PROTOCOL_VERSION
                    ),
                )
                .with("agent_version", env!("CARGO_PKG_VERSION"))
                .with("agent_protocol", PROTOCOL_VERSION.to_string());
                conn.send(&Response::Error(e)).await?;
                return Ok(());
            }
            _ => {
                let e = ProtoError::new(ErrorCode::BadRequest, "the first message must be hello");
                conn.send(&Response::Error(e)).await?;
                return Ok(());
            }
        }
        loop {
            let request = match conn.recv().await? {
                Frame::Text(t) => serde_json::from_str::<Request>(&t)
                    .map_err(|e| SessionError::Protocol(format!("bad request: {e}")))?,
                Frame::Data(_) => {
                    return Err(SessionError::Protocol("data outside an upload".into()));
                }
            };
            if self.shared.shutting_down() {
                let e = ProtoError::new(
                    ErrorCode::ShuttingDown,
                    "deploy-agent is shutting down; retry when it is back",
                );
                conn.send(&Response::Error(e)).await?;
                return Ok(());
            }
            let reply = match request {
                Request::Hello(_) => Err(bad("hello was already exchanged")),
                Request::Fetch(f) => match self.layout(&f.app) {
                    Ok(l) => match crate::fetch::send(conn, &l, &f.release).await? {
                        Ok(end) => Ok(Response::FetchEnd(end)),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                },
                Request::Check(c) => Ok(self.check(c.deploy_to.as_deref())),
                Request::Lock(l) => self.lock(l).await,
                Request::Unlock(u) => Ok(Response::Unlocked(Unlocked {
                    released: self
                        .layout(&u.app)
                        .is_ok_and(|l| self.locks.remove(&l.root).is_some()),
                })),
                Request::Push(p) => match self.push(conn, p).await? {
                    Ok(run) => Ok(Response::Deploy(self.forward(conn, run).await?)),
                    Err(e) => Err(e),
                },
                Request::UploadEnd(_) => Err(bad("upload_end without push")),
                Request::DeltaOffer(_) => Err(bad("delta_offer outside an upload")),
                Request::Rollback(r) => match self.rollback(r).await {
                    Ok(run) => Ok(Response::Deploy(self.forward(conn, run).await?)),
                    Err(e) => Err(e),
                },
                Request::Status(s) => self.status(s).await,
                Request::Releases(r) => self
                    .layout(&r.app)
                    .map(|l| Response::Releases(ReleasesReply { releases: l.list() })),
                Request::History(h) => self.layout(&h.app).map(|l| {
                    let (entries, skipped_lines) =
                        journal::read_history_counted(&l, h.limit as usize);
                    Response::History(HistoryReply {
                        entries,
                        skipped_lines,
                    })
                }),
                Request::Destroy(d) => self.destroy(d).await,
                Request::Instances(i) => self
                    .layout(&AppRef {
                        instance: None,
                        ..i.app
                    })
                    .map(|l| {
                        Response::Instances(proto::InstancesReply {
                            instances: crate::instances::list(&l.root, &self.shared.locks),
                        })
                    }),
            };
            let response = reply.unwrap_or_else(Response::Error);
            conn.send(&response).await?;
        }
    }

    fn layout(&self, app: &AppRef) -> Result<Layout, ProtoError> {
        let path = Path::new(&app.deploy_to);
        if !self.shared.config.is_allowed(path) {
            return Err(ProtoError::new(
                ErrorCode::PathNotAllowed,
                format!(
                    "deploy_to {} is outside this agent's allowed roots ({}); \
                     add it to allowed_roots in /etc/deploy-agent/agent.toml",
                    app.deploy_to,
                    self.shared
                        .config
                        .allowed_roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .with("deploy_to", &app.deploy_to));
        }
        crate::instances::layout_of(path, app.instance.as_deref())
    }

    fn check(&self, deploy_to: Option<&str>) -> Response {
        let deploy_to = deploy_to.map(|p| {
            let path = Path::new(p);
            PathCheck {
                path: p.to_owned(),
                allowed: self.shared.config.is_allowed(path),
                free_bytes: free_bytes(path),
                exists: path.is_dir(),
            }
        });
        Response::Check(CheckReply {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            deploy_to,
        })
    }

    async fn lock(&mut self, l: proto::Lock) -> Reply {
        let layout = self.layout(&l.app)?;
        if let Some(v) = &l.version {
            proto::label::validate_label(v).map_err(bad)?;
        }
        let key = layout.root.clone();
        if let Some(g) = self.locks.get(&key) {
            return Ok(Response::Lock(g.info.clone()));
        }
        let info = LockInfo {
            holder: l.holder,
            version: l.version,
            since: journal::now_rfc3339(),
        };
        let guard = self
            .shared
            .locks
            .acquire(
                &key,
                layout.lock_file(),
                info,
                Duration::from_millis(l.wait_ms),
            )
            .await
            .map_err(|h| locked(&l.app, &h))?;
        let info = guard.info.clone();
        self.locks.insert(key, Arc::new(guard));
        Ok(Response::Lock(info))
    }

    /// The session's own lock for the app, or a fresh one taken without waiting.
    async fn lock_for(
        &self,
        app: &AppRef,
        layout: &Layout,
        holder: &str,
        version: Option<String>,
    ) -> Result<Arc<LockGuard>, ProtoError> {
        if let Some(g) = self.locks.get(&layout.root) {
            return Ok(g.clone());
        }
        let info = LockInfo {
            holder: holder.to_owned(),
            version,
            since: journal::now_rfc3339(),
        };
        self.shared
            .locks
            .acquire(&layout.root, layout.lock_file(), info, Duration::ZERO)
            .await
            .map(Arc::new)
            .map_err(|h| locked(app, &h))
    }

    /// Receives and unpacks the upload. The outer error ends the session; the inner
    /// one is the answer to the push.
    async fn push<S>(
        &mut self,
        conn: &mut Connection<S>,
        p: proto::Push,
    ) -> Result<Result<Pending, ProtoError>, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let prepared = match self.begin_push(&p).await {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        let (layout, lock, mut journal) = prepared;
        let partial = layout.partial(&p.release);
        let cleanup = |layout: &Layout| {
            let _ = std::fs::remove_dir_all(layout.partial(&p.release));
            let _ = Journal::clear(layout);
        };
        // Unpack on a blocking thread while the frames arrive.
        let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
        let limits = unpack::Limits {
            max_total_bytes: self
                .shared
                .config
                .max_unpacked_bytes
                .min(p.spec.max_unpacked_bytes.max(1)),
            ..unpack::Limits::default()
        };
        let dest = partial.clone();
        let worker = tokio::task::spawn_blocking(move || {
            let mut reader = unpack::HashingReader::new(unpack::ChannelReader::new(rx));
            let result = unpack::unpack_tar_gz(&mut reader, &dest, &limits);
            (result, reader.finish())
        });
        conn.send(&Response::PushReady(PushReady {
            previous: journal.previous.clone(),
        }))
        .await?;
        let mut tx = Some(tx);
        // Set by a delta offer: the upload then carries only the files we lack.
        let mut delta: Option<(proto::DeltaOffer, Arc<crate::release::delta::Sources>)> = None;
        let mut got_data = false;
        let end = loop {
            let frame = tokio::select! {
                f = conn.recv() => f,
                _ = self.shared.shutdown_signal() => {
                    drop(tx.take());
                    let _ = worker.await;
                    cleanup(&layout);
                    return Ok(Err(ProtoError::new(ErrorCode::ShuttingDown,
                        "deploy-agent is shutting down; the upload was discarded")));
                }
            };
            match frame {
                Ok(Frame::Data(d)) => {
                    got_data = true;
                    if let Some(t) = &tx
                        && t.send(d).await.is_err()
                    {
                        // The unpacker stopped early (a refused entry); keep reading
                        // so we can answer once the controller ends the upload.
                        tx = None;
                    }
                }
                Ok(Frame::Text(t)) => match serde_json::from_str::<Request>(&t) {
                    Ok(Request::UploadEnd(end)) => break end,
                    Ok(Request::DeltaOffer(offer)) if !got_data && delta.is_none() => {
                        let l = layout.clone();
                        let (sources, offer) = tokio::task::spawn_blocking(move || {
                            let sources = crate::release::delta::Sources::index(&l);
                            (sources, offer)
                        })
                        .await
                        .map_err(|e| SessionError::Protocol(format!("delta index: {e}")))?;
                        let files = crate::release::delta::need(&offer, &sources);
                        conn.send(&Response::DeltaNeed(proto::DeltaNeed { files }))
                            .await?;
                        delta = Some((offer, Arc::new(sources)));
                    }
                    _ => {
                        drop(tx.take());
                        let _ = worker.await;
                        cleanup(&layout);
                        return Ok(Err(bad("expected data or upload_end during an upload")));
                    }
                },
                Err(e) => {
                    // The controller went away mid-upload: leave nothing behind.
                    drop(tx.take());
                    let _ = worker.await;
                    cleanup(&layout);
                    return Err(e.into());
                }
            }
        };
        drop(tx);
        let (result, (sha256, size)) = match worker.await {
            Ok(r) => r,
            Err(e) => {
                cleanup(&layout);
                return Ok(Err(ProtoError::new(
                    ErrorCode::Internal,
                    format!("unpack task: {e}"),
                )));
            }
        };
        let unpacked = match result {
            Ok(u) => u,
            Err(e) => {
                cleanup(&layout);
                let mut err = if e.is_refusal() {
                    ProtoError::new(
                        ErrorCode::BadArtifact,
                        format!("artifact refused: {e}; nothing was changed"),
                    )
                } else {
                    ProtoError::new(
                        ErrorCode::Io,
                        format!("could not unpack the artifact: {e}; nothing was changed"),
                    )
                };
                if let Some(entry) = e.entry() {
                    err = err.with("entry", entry);
                }
                return Ok(Err(err));
            }
        };
        if sha256 != end.sha256 || size != end.size {
            cleanup(&layout);
            return Ok(Err(ProtoError::new(
                ErrorCode::ChecksumMismatch,
                format!(
                    "upload corrupted: received {size} bytes with sha256 {sha256}, \
                     the controller sent {} bytes with sha256 {}; nothing was changed",
                    end.size, end.sha256
                ),
            )));
        }
        // With a delta upload, build the rest of the release from files already here;
        // the release is then what was offered, entry by entry.
        let (manifest, sha256) = match delta {
            Some((offer, sources)) => {
                let dest = partial.clone();
                let uploaded = unpacked.manifest.clone();
                let built = tokio::task::spawn_blocking(move || {
                    crate::release::delta::materialize(&dest, &offer, &uploaded, &sources)
                        .map(|_| offer)
                })
                .await
                .unwrap_or_else(|e| Err(format!("delta task: {e}")));
                match built {
                    Ok(offer) => (offer.entries, offer.artifact_sha256),
                    Err(e) => {
                        cleanup(&layout);
                        return Ok(Err(ProtoError::new(
                            ErrorCode::BadArtifact,
                            format!("delta upload refused: {e}; nothing was changed"),
                        )));
                    }
                }
            }
            None => (unpacked.manifest, sha256),
        };
        let content = proto::manifest::content_digest(&manifest);
        if let Some(expected) = &p.expect_content
            && *expected != content
        {
            cleanup(&layout);
            return Ok(Err(ProtoError::new(
                ErrorCode::BadArtifact,
                format!(
                    "release content {content} differs from the expected {expected}; \
                     nothing was changed"
                ),
            )));
        }
        let info = ReleaseInfo {
            id: p.release.clone(),
            version: p.version.clone(),
            sha256: Some(sha256),
            created: journal::now_rfc3339(),
            status: ReleaseStatus::Prepared,
            current: false,
            content: Some(content),
        };
        let finalize = Layout::write_manifest_in(&partial, &manifest)
            .and_then(|_| Layout::write_meta_in(&partial, &info))
            .and_then(|_| std::fs::rename(&partial, layout.release(&p.release)))
            .and_then(|_| journal.set(&layout, Phase::Prepared));
        if let Err(e) = finalize {
            cleanup(&layout);
            let _ = std::fs::remove_dir_all(layout.release(&p.release));
            return Ok(Err(io_err("cannot finish the release dir", e)));
        }
        let (etx, erx) = mpsc::unbounded_channel();
        Ok(Ok((Run::new(layout, journal, Events::new(etx), lock), erx)))
    }

    async fn begin_push(
        &self,
        p: &proto::Push,
    ) -> Result<(Layout, Arc<LockGuard>, Journal), ProtoError> {
        let layout = self.layout(&p.app)?;
        if let Some(v) = &p.version {
            proto::label::validate_label(v).map_err(bad)?;
        }
        if !valid_release_id(&p.release) {
            return Err(bad(format!(
                "release id {:?} is not YYYYMMDDHHMMSS",
                p.release
            )));
        }
        let lock = self
            .lock_for(&p.app, &layout, &p.holder, p.version.clone())
            .await?;
        layout
            .ensure()
            .map_err(|e| io_err(&format!("cannot create {}", layout.root.display()), e))?;
        if layout.release(&p.release).exists() {
            return Err(bad(format!(
                "release {} already exists on this host",
                p.release
            )));
        }
        if let Some(free) = free_bytes(&layout.root)
            && free < p.size
        {
            return Err(ProtoError::new(
                ErrorCode::Io,
                format!(
                    "not enough disk space under {}: {} free, the artifact alone is {}",
                    layout.root.display(),
                    free,
                    p.size
                ),
            ));
        }
        // A leftover partial of the same id is from a dead upload: we hold the lock.
        let _ = std::fs::remove_dir_all(layout.partial(&p.release));
        let journal = Journal {
            action: Action::Deploy,
            app: p.app.clone(),
            release: p.release.clone(),
            version: p.version.clone(),
            previous: layout.current_release(),
            holder: p.holder.clone(),
            started: journal::now_rfc3339(),
            skip_migrations: p.skip_migrations,
            spec: p.spec.clone(),
            phase: Phase::Uploading,
            error: None,
            origin: p.origin.clone(),
        };
        journal
            .save(&layout)
            .map_err(|e| io_err("cannot write the journal", e))?;
        std::fs::create_dir(layout.partial(&p.release)).map_err(|e| {
            let _ = Journal::clear(&layout);
            io_err("cannot create the release dir", e)
        })?;
        Ok((layout, lock, journal))
    }

    async fn rollback(&mut self, r: proto::Rollback) -> Result<Pending, ProtoError> {
        let layout = self.layout(&r.app)?;
        let lock = self.lock_for(&r.app, &layout, &r.holder, None).await?;
        let current = layout.current_release();
        let target = match r.to.as_deref() {
            Some(to) => layout.resolve(to).ok_or_else(|| {
                ProtoError::new(
                    ErrorCode::NotFound,
                    format!("no release {to:?} on this host (neither an id nor a version label)"),
                )
                .with("to", to)
            })?,
            None => previous_live(&layout.list(), current.as_deref()).ok_or_else(|| {
                ProtoError::new(
                    ErrorCode::NotFound,
                    "no earlier live release to roll back to; name one with --to",
                )
            })?,
        };
        if target.status == ReleaseStatus::Failed {
            return Err(bad(format!(
                "release {} failed before it went live (its migration did not finish); \
                 refusing to roll back to it",
                target.id
            )));
        }
        let (etx, erx) = mpsc::unbounded_channel();
        let journal = Journal {
            action: Action::Rollback,
            app: r.app.clone(),
            release: target.id.clone(),
            version: target.version.clone(),
            previous: current,
            holder: r.holder,
            started: journal::now_rfc3339(),
            skip_migrations: true,
            spec: r.spec,
            phase: Phase::Switching,
            error: None,
            origin: None,
        };
        Ok((Run::new(layout, journal, Events::new(etx), lock), erx))
    }

    /// Runs a deploy or rollback in its own task, sending its progress to the session for
    /// as long as the session is there. The task finishes even if the session does not.
    async fn forward<S>(
        &self,
        conn: &mut Connection<S>,
        (run, mut events): Pending,
    ) -> Result<DeployReport, codec::CodecError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let task = self.shared.tasks.spawn(async move {
            match run.journal.phase {
                Phase::Switching => run.activate().await,
                _ => run.deploy().await,
            }
        });
        tokio::pin!(task);
        loop {
            tokio::select! {
                Some(ev) = events.recv() => {
                    conn.send(&Response::Event(ev)).await?;
                }
                report = &mut task => {
                    while let Ok(ev) = events.try_recv() {
                        conn.send(&Response::Event(ev)).await?;
                    }
                    return Ok(report.unwrap_or_else(|e| DeployReport {
                        release: String::new(),
                        version: None,
                        outcome: Outcome::RollbackFailed,
                        previous: None,
                        current: None,
                        steps: Vec::new(),
                        health: None,
                        error: Some(format!("deploy task failed: {e}")),
                        duration_ms: 0,
                    }));
                }
            }
        }
    }

    /// Removes a review-app instance under its lock, in a task of its own so it ends the
    /// same whether or not the session stays.
    async fn destroy(&mut self, d: proto::Destroy) -> Reply {
        if d.app.instance.is_none() {
            return Err(bad("destroy needs an instance name"));
        }
        let layout = self.layout(&d.app)?;
        let lock = self.lock_for(&d.app, &layout, &d.holder, None).await?;
        let task = self.shared.tasks.spawn(async move {
            let action = Action::Destroy;
            crate::instances::destroy(&d.app, &layout, &lock, Some(&d.spec), &d.holder, action)
                .await
        });
        match task.await {
            Ok(r) => r.map(Response::Destroyed),
            Err(e) => Err(ProtoError::new(
                ErrorCode::Internal,
                format!("destroy task: {e}"),
            )),
        }
    }

    async fn status(&self, s: proto::Status) -> Reply {
        let layout = self.layout(&s.app)?;
        let list = layout.list();
        let health = match s.health {
            Some(mut spec) if layout.current_release().is_some() => {
                spec.retries = 1;
                spec.url = crate::instances::expand(&s.app, &spec.url);
                Some(crate::health::wait_healthy(&spec, |_, _| {}).await)
            }
            _ => None,
        };
        Ok(Response::Status(StatusReply {
            current: list.into_iter().find(|r| r.current),
            last: journal::read_history(&layout, 1).pop(),
            lock: self.shared.locks.holder(&layout.root),
            health,
        }))
    }
}

/// The newest live release older than `current`.
fn previous_live(list: &[ReleaseInfo], current: Option<&str>) -> Option<ReleaseInfo> {
    let current = current?;
    list.iter()
        .rev()
        .filter(|r| r.id.as_str() < current && r.status == ReleaseStatus::Live)
        .find(|_| true)
        .cloned()
}

fn bad(msg: impl Into<String>) -> ProtoError {
    ProtoError::new(ErrorCode::BadRequest, msg)
}

fn io_err(what: &str, e: std::io::Error) -> ProtoError {
    ProtoError::new(ErrorCode::Io, format!("{what}: {e}"))
}

fn locked(app: &AppRef, h: &LockInfo) -> ProtoError {
    ProtoError::new(
        ErrorCode::Locked,
        format!(
            "{} is being deployed by {} since {}{}",
            app.name,
            h.holder,
            h.since,
            h.version
                .as_deref()
                .map(|v| format!(" (version {v})"))
                .unwrap_or_default()
        ),
    )
    .with("holder", &h.holder)
    .with("since", &h.since)
}

/// Free bytes on the filesystem holding `path`, or its nearest existing ancestor.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let mut p = path;
    loop {
        if p.exists() {
            let s = rustix::fs::statvfs(p).ok()?;
            return Some(s.f_bavail.saturating_mul(s.f_frsize));
        }
        p = p.parent()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previous_live_skips_failed_and_rolled_back() {
        let r = |id: &str, status| ReleaseInfo {
            id: id.into(),
            version: None,
            sha256: None,
            created: String::new(),
            status,
            current: false,
            content: None,
        };
        let list = vec![
            r("01", ReleaseStatus::Live),
            r("02", ReleaseStatus::Failed),
            r("03", ReleaseStatus::RolledBack),
            r("04", ReleaseStatus::Live),
            r("05", ReleaseStatus::Live),
        ];
        assert_eq!(previous_live(&list, Some("04")).unwrap().id, "01");
        assert_eq!(previous_live(&list, Some("05")).unwrap().id, "04");
        assert!(previous_live(&list, Some("01")).is_none());
        assert!(previous_live(&list, None).is_none());
    }
}

#[cfg(test)]
mod handshake_tests {
    use super::*;
    use crate::config::{AgentConfig, Overrides};
    use proto::{Hello, Request};

    async fn hello(protocol: u32) -> Response {
        let dir = tempfile::tempdir().unwrap();
        let config = AgentConfig::load(&Overrides {
            config: None,
            socket: Some(dir.path().join("s.sock")),
            socket_group: None,
            allowed_roots: vec![dir.path().to_path_buf()],
        })
        .unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared::new(config, rx));
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(shared, b));
        let mut conn = codec::connect(a).await.unwrap();
        conn.send(&Request::Hello(Hello {
            protocol,
            version: "9.9.9".into(),
        }))
        .await
        .unwrap();
        conn.recv_json::<Response>().await.unwrap()
    }

    #[tokio::test]
    async fn same_protocol_is_welcome() {
        match hello(PROTOCOL_VERSION).await {
            Response::Hello(h) => assert_eq!(h.protocol, PROTOCOL_VERSION),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_newer_controller_is_told_to_upgrade_the_agent() {
        match hello(PROTOCOL_VERSION + 1).await {
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::VersionMismatch);
                assert!(e.message.contains("upgrade deploy-agent"), "{}", e.message);
                assert!(e.message.contains("9.9.9"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_older_controller_is_told_to_upgrade_itself() {
        match hello(0).await {
            Response::Error(e) => assert!(e.message.contains("upgrade deployctl"), "{}", e.message),
            other => panic!("{other:?}"),
        }
    }
}
