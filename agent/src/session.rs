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

use crate::config::SessionLimits;
use crate::context::{SessionSlot, Shared, SlotState};
use crate::deploy::journal::{Journal, Phase};
use crate::deploy::{Events, Run};
use crate::history;
use crate::lock::LockGuard;
use crate::release::layout::{Layout, release_id_problem};
use crate::release::unpack;

type Reply = Result<Response, ProtoError>;
/// A run ready to start, and the receiving end of its progress.
type Pending = (Run, mpsc::UnboundedReceiver<Event>);

/// Serves one connection. Every wait has a bound: the handshake (WebSocket upgrade and
/// `hello`) must end within `handshake_timeout`, the controller may stay silent between
/// requests for `idle_timeout` (and mid-upload for [`SessionLimits::upload_stall`]), and
/// each message to it must be sent within [`SessionLimits::SEND_TIMEOUT`]. Past any of
/// them, or when evicted to make room, the session ends and its locks are freed.
pub async fn serve<S>(shared: Arc<Shared>, stream: S, slot: SessionSlot)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = shared.config.sessions;
    let (stream, activity) = Tracked::new(stream);
    let mut session = Session {
        shared: shared.clone(),
        locks: HashMap::new(),
        slot,
        limits,
        activity,
    };
    let handshake = async {
        let mut conn = codec::accept(stream).await?;
        let go_on = hello(&shared, &mut conn).await?;
        Ok::<_, SessionError>(go_on.then_some(conn))
    };
    let conn = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout, handshake) => match r {
            Ok(Ok(Some(conn))) => conn,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!("handshake failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("no hello within {:?}; closing", limits.handshake_timeout);
                return;
            }
        },
        _ = &mut session.slot.evicted => {
            tracing::debug!("evicted during the handshake to make room");
            return;
        }
    };
    let mut conn = conn;
    if let Err(e) = session.run(&mut conn).await {
        match (&e, session.locks.is_empty()) {
            (SessionError::Idle(_) | SessionError::SendTimeout, false) => tracing::info!(
                "session ended: {e}; freeing its lock on {}",
                session
                    .locks
                    .keys()
                    .map(|k| k.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => tracing::debug!("session ended: {e}"),
        }
    }
    // Dropping `session` drops the locks it holds; runs in flight keep their own.
}

struct Session {
    shared: Arc<Shared>,
    /// Locks taken with `Lock`, by the real path of deploy_to. A push, rollback or
    /// destroy of the app hands the session's lock over to its run, which frees it
    /// when it ends, before its answer is sent.
    locks: HashMap<PathBuf, Arc<LockGuard>>,
    slot: SessionSlot,
    limits: SessionLimits,
    /// When the controller last sent a byte.
    activity: Arc<Activity>,
}

/// When a stream last delivered bytes: the idle and stall limits count silence, not
/// frames, so a slow link sending a large frame is not taken for a dead one.
pub struct Activity {
    base: std::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the stream has been silent.
    fn silent_for(&self) -> Duration {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.base
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// A stream that records in [`Activity`] each read that delivers bytes.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    fn new(inner: S) -> (Self, Arc<Activity>) {
        let activity = Arc::new(Activity {
            base: std::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        });
        (
            Self {
                inner,
                activity: activity.clone(),
            },
            activity,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The next frame, or `None` once the controller has sent no byte for `limit`.
async fn recv_or_silent<S>(
    conn: &mut Connection<S>,
    activity: &Activity,
    limit: Duration,
) -> Option<Result<Frame, codec::CodecError>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    activity.touch();
    let recv = conn.recv();
    tokio::pin!(recv);
    loop {
        let left = limit.saturating_sub(activity.silent_for());
        if left.is_zero() {
            return None;
        }
        tokio::select! {
            f = &mut recv => return Some(f),
            _ = tokio::time::sleep(left) => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the controller sent nothing for {0:?}")]
    Idle(Duration),
    #[error(
        "the controller did not take a message within {:?}",
        SessionLimits::SEND_TIMEOUT
    )]
    SendTimeout,
    #[error("evicted to make room for a new session")]
    Evicted,
}

/// Sends one message, giving up after [`SessionLimits::SEND_TIMEOUT`] (a controller that
/// stopped reading).
async fn send<S, T>(conn: &mut Connection<S>, message: &T) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: serde::Serialize,
{
    match tokio::time::timeout(SessionLimits::SEND_TIMEOUT, conn.send(message)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SessionError::SendTimeout),
    }
}

/// The `hello` exchange; false when the session ends here (a version mismatch).
async fn hello<S>(shared: &Shared, conn: &mut Connection<S>) -> Result<bool, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match conn.recv_json::<Request>().await? {
        Request::Hello(h) if h.protocol == PROTOCOL_VERSION => {
            conn.send(&Response::Hello(HelloReply {
                protocol: PROTOCOL_VERSION,
                version: env!("CARGO_PKG_VERSION").into(),
                hostname: shared.hostname.clone(),
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
            return Ok(false);
        }
        _ => {
            let e = ProtoError::new(ErrorCode::BadRequest, "the first message must be hello");
            conn.send(&Response::Error(e)).await?;
            return Ok(false);
        }
    }
    Ok(true)
}

impl Session {
    async fn run<S>(&mut self, conn: &mut Connection<S>) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            self.slot.set(if self.locks.is_empty() {
                SlotState::Idle
            } else {
                SlotState::IdleLocked
            });
            let idle = self.limits.idle_timeout;
            let frame = tokio::select! {
                r = recv_or_silent(conn, &self.activity, idle) => match r {
                    Some(f) => f?,
                    None => return Err(SessionError::Idle(idle)),
                },
                _ = &mut self.slot.evicted => return Err(SessionError::Evicted),
            };
            self.slot.set(SlotState::Busy);
            let request = match frame {
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
                send(conn, &Response::Error(e)).await?;
                return Ok(());
            }
            // An upload is work in flight until its answer is sent: a shutdown waits for
            // it to clean up and say why.
            let mut _busy = None;
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
                Request::Push(p) => {
                    _busy = Some(self.shared.tasks.hold());
                    let app = p.app.clone();
                    let pushed = self.push(conn, p).await;
                    // Whatever happened, this push ends the session's hold on the lock:
                    // a run keeps its own until it ends; a refused push frees it now,
                    // before the answer goes out.
                    self.hand_over_lock(&app);
                    match pushed? {
                        Ok(run) => Ok(Response::Deploy(self.forward(conn, run).await?)),
                        Err(e) => Err(e),
                    }
                }
                Request::UploadEnd(_) => Err(bad("upload_end without push")),
                Request::DeltaOffer(_) => Err(bad("delta_offer outside an upload")),
                Request::DeltaPlan(p) => match self.layout(&p.app) {
                    Ok(l) => crate::plan::delta_need(l, p.offer)
                        .await
                        .map(|files| Response::DeltaNeed(proto::DeltaNeed { files }))
                        .map_err(|e| ProtoError::new(ErrorCode::Internal, e)),
                    Err(e) => Err(e),
                },
                Request::Rollback(r) => {
                    let app = r.app.clone();
                    let run = self.rollback(r).await;
                    self.hand_over_lock(&app);
                    match run {
                        Ok(run) => Ok(Response::Deploy(self.forward(conn, run).await?)),
                        Err(e) => Err(e),
                    }
                }
                Request::Status(s) => self.status(s).await,
                Request::Releases(r) => self
                    .layout(&r.app)
                    .map(|l| Response::Releases(ReleasesReply { releases: l.list() })),
                Request::History(h) => self.layout(&h.app).map(|l| {
                    let (entries, skipped_lines) =
                        history::read_history_counted(&l, h.limit as usize);
                    Response::History(HistoryReply {
                        entries,
                        skipped_lines,
                    })
                }),
                Request::Destroy(d) => {
                    let app = d.app.clone();
                    let r = self.destroy(d).await;
                    self.hand_over_lock(&app);
                    r
                }
                Request::Logs(l) => {
                    _busy = Some(self.shared.tasks.hold());
                    let activity = self.activity.clone();
                    let silent = move || activity.silent_for();
                    let shared = self.shared.clone();
                    let bounds = crate::pump::Bounds {
                        timeout: None,
                        idle: self.limits.idle_timeout,
                        silent_for: &silent,
                        stopping: Box::pin(async move { shared.shutdown_signal().await }),
                    };
                    match self.layout(&l.app) {
                        Ok(layout) => match crate::logs::serve(conn, &layout, &l, bounds).await {
                            Ok(r) => r.map(Response::LogsEnd),
                            Err(gone) => return Err(SessionError::Protocol(gone)),
                        },
                        Err(e) => Err(e),
                    }
                }
                Request::Exec(x) => {
                    _busy = Some(self.shared.tasks.hold());
                    match self.exec(conn, x).await {
                        Ok(r) => r,
                        Err(gone) => return Err(SessionError::Protocol(gone)),
                    }
                }
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
            send(conn, &response).await?;
            drop(_busy);
        }
    }

    /// `deployctl exec`: with `lock`, the app's lock (the session's own, or taken now
    /// without waiting) is held until the command ends. `Err`: the controller went away.
    async fn exec<S>(&mut self, conn: &mut Connection<S>, x: proto::Exec) -> Result<Reply, String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let layout = match self.layout(&x.app) {
            Ok(l) => l,
            Err(e) => return Ok(Err(e)),
        };
        let _lock = if x.lock {
            match self.lock_for(&x.app, &layout, &x.holder, None).await {
                Ok(g) => Some(g),
                Err(e) => return Ok(Err(e)),
            }
        } else {
            None
        };
        let prepared = match crate::oneoff::prepare(&layout, &x).await {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let activity = self.activity.clone();
        let silent = move || activity.silent_for();
        let shared = self.shared.clone();
        let bounds = crate::pump::Bounds {
            timeout: None,
            idle: self.limits.idle_timeout,
            silent_for: &silent,
            stopping: Box::pin(async move { shared.shutdown_signal().await }),
        };
        match crate::oneoff::run(conn, prepared, &x, bounds).await {
            Ok(Ok(end)) => Ok(Ok(Response::ExecEnd(end))),
            Ok(Err(gone)) => Err(gone),
            Err(e) => Ok(Err(e)),
        }
    }

    /// Drops the session's own hold on the app's lock (taken with `Lock`): the run, if
    /// one started, holds its own and frees it when it ends.
    fn hand_over_lock(&mut self, app: &AppRef) {
        if let Ok(l) = self.layout(app) {
            self.locks.remove(&l.root);
        }
    }

    /// The app's layout at the real path of its deploy_to: two spellings of one
    /// directory (through a symlink inside the root) are one app with one lock.
    fn layout(&self, app: &AppRef) -> Result<Layout, ProtoError> {
        let path = Path::new(&app.deploy_to);
        let Some(real) = self.shared.config.real_path(path) else {
            return Err(ProtoError::new(
                ErrorCode::PathNotAllowed,
                format!(
                    "deploy_to {} is outside this agent's allowed roots ({}); {}",
                    app.deploy_to,
                    self.shared
                        .config
                        .allowed_roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.shared.config.roots_from.hint()
                ),
            )
            .with("deploy_to", &app.deploy_to));
        };
        crate::ports::layout_of(&real, app.instance.as_deref())
    }

    fn check(&self, deploy_to: Option<&str>) -> Response {
        let deploy_to = deploy_to.map(|p| {
            let path = Path::new(p);
            // Outside the allowed roots the agent says nothing about the path: not
            // whether it exists, not the free space there.
            match self.shared.config.real_path(path) {
                Some(real) => PathCheck {
                    path: p.to_owned(),
                    allowed: true,
                    free_bytes: free_bytes(&real),
                    exists: real.is_dir(),
                },
                None => PathCheck {
                    path: p.to_owned(),
                    allowed: false,
                    free_bytes: None,
                    exists: false,
                },
            }
        });
        Response::Check(CheckReply {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            deploy_to,
            allowed_roots: self
                .shared
                .config
                .allowed_roots
                .iter()
                .map(|r| r.display().to_string())
                .collect(),
            roots_from: Some(self.shared.config.roots_from.label()),
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
            since: history::now_rfc3339(),
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
            since: history::now_rfc3339(),
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
        // Every way out of here but a finished release removes the partial dir and the
        // journal, before the lock (declared earlier) is freed.
        let mut upload = UploadGuard {
            layout: layout.clone(),
            release: p.release.clone(),
            keep: false,
        };
        // Unpack on a blocking thread while the frames arrive.
        let (tx, rx) = mpsc::channel::<bytes::Bytes>(8);
        let limits = unpack::Limits {
            max_total_bytes: self
                .shared
                .config
                .max_unpacked_bytes
                .min(p.spec.max_unpacked_bytes.max(1)),
            ..unpack::Limits::default()
        };
        let dest = partial.clone();
        let check = p.check;
        let worker = tokio::task::spawn_blocking(move || {
            // The received frames go to the gzip decoder as they are; the stream is
            // checked (CRC-32, or SHA-256 for a controller that asks for it) as they pass.
            let mut reader = unpack::ChannelReader::new(rx, check);
            let result = unpack::unpack_tar_gz_buffered(&mut reader, &dest, &limits);
            (result, reader.finish())
        });
        send(
            conn,
            &Response::PushReady(PushReady {
                previous: journal.previous.clone(),
            }),
        )
        .await?;
        let mut tx = Some(tx);
        // Set by a delta offer: the upload then carries only the files we lack.
        let mut delta: Option<(proto::DeltaOffer, Arc<crate::release::delta::Sources>)> = None;
        let mut got_data = false;
        let end = loop {
            let stall = self.limits.upload_stall();
            let frame = tokio::select! {
                f = recv_or_silent(conn, &self.activity, stall) => match f {
                    Some(f) => f,
                    None => {
                        drop(tx.take());
                        let _ = worker.await;
                        tracing::info!(
                            app = %p.app.name,
                            "upload stalled for {stall:?}; discarded, lock freed"
                        );
                        return Err(SessionError::Idle(stall));
                    }
                },
                _ = self.shared.shutdown_signal() => {
                    drop(tx.take());
                    let _ = worker.await;
                    tracing::info!(
                        app = %p.app.name,
                        release = %p.release,
                        "shutting down: upload discarded, partial release and journal removed"
                    );
                    return Ok(Err(ProtoError::new(ErrorCode::ShuttingDown,
                        "the agent is shutting down (SIGTERM): the upload was discarded and \
                         nothing was changed; push again once deploy-agent is back")));
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
                        send(conn, &Response::DeltaNeed(proto::DeltaNeed { files })).await?;
                        delta = Some((offer, Arc::new(sources)));
                    }
                    _ => {
                        drop(tx.take());
                        let _ = worker.await;
                        return Ok(Err(bad("expected data or upload_end during an upload")));
                    }
                },
                Err(e) => {
                    // The controller went away mid-upload: leave nothing behind.
                    drop(tx.take());
                    let _ = worker.await;
                    return Err(e.into());
                }
            }
        };
        drop(tx);
        let (result, summed) = match worker.await {
            Ok(r) => r,
            Err(e) => {
                return Ok(Err(ProtoError::new(
                    ErrorCode::Internal,
                    format!("unpack task: {e}"),
                )));
            }
        };
        let unpacked = match result {
            Ok(u) => u,
            Err(e) => {
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
        if let Err(e) = check_upload(p.check, &summed, &end) {
            return Ok(Err(e));
        }
        // The artifact's digest as the controller read it: checked above (sha256), or the
        // bytes checked (crc32) and the digest taken as given.
        let sha256 = end.sha256.to_ascii_lowercase();
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
            created: history::now_rfc3339(),
            status: ReleaseStatus::Prepared,
            current: false,
            content: Some(content),
        };
        let releases = layout.releases();
        let finalize = Layout::write_manifest_in(&partial, &manifest)
            .and_then(|_| Layout::write_meta_in(&partial, &info));
        // The release's files reach the disk before it is complete: written through the
        // page cache, a power loss could otherwise leave `current` on a release whose
        // files are empty (the rename and the switch are metadata, journaled first).
        let finalize = match finalize {
            Ok(()) => {
                let dir = partial.clone();
                tokio::task::spawn_blocking(move || {
                    rustix::fs::syncfs(std::fs::File::open(&dir)?).map_err(std::io::Error::from)
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            }
            Err(e) => Err(e),
        };
        let finalize = finalize
            .and_then(|_| std::fs::rename(&partial, layout.release(&p.release)))
            .and_then(|_| crate::release::layout::sync_dir(&releases))
            .and_then(|_| journal.set(&layout, Phase::Prepared));
        if let Err(e) = finalize {
            let _ = std::fs::remove_dir_all(layout.release(&p.release));
            return Ok(Err(io_err("cannot finish the release dir", e)));
        }
        upload.keep = true;
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
        if let Some(problem) = release_id_problem(&p.release) {
            return Err(bad(problem));
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
        keep_webhooks(&layout, &p.spec);
        let journal = Journal {
            action: Action::Deploy,
            app: p.app.clone(),
            release: p.release.clone(),
            version: p.version.clone(),
            previous: rollback_target(&layout),
            holder: p.holder.clone(),
            started: history::now_rfc3339(),
            skip_migrations: p.skip_migrations,
            spec: p.spec.clone(),
            phase: Phase::Uploading,
            error: None,
            origin: p.origin.clone(),
            slots: None,
        };
        journal
            .save(&layout)
            .map_err(|e| io_err("cannot write the journal", e))?;
        std::fs::create_dir(layout.partial(&p.release)).map_err(|e| {
            let _ = Journal::clear(&layout);
            io_err("cannot create the release dir", e)
        })?;
        // Holding the lock, with the push under way: it ends the watch of the release
        // before it (a push refused above leaves the watch alone).
        crate::deploy::watch::end(
            &self.shared,
            &layout,
            &format!(
                "ended by a new push (release {}) by {}",
                p.release, p.holder
            ),
        );
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
        // A release that never went live, or that failed its health check and was switched
        // away from, is refused rather than tried again: the rollback would fail the same
        // way, slowly. To retry it, push its artifact again. (docs/exit-codes.md, 2)
        match target.status {
            ReleaseStatus::Failed => {
                return Err(bad(format!(
                    "release {} failed before it went live (its migration \
                     did not finish); refusing to roll back to it",
                    target.id
                )));
            }
            ReleaseStatus::RolledBack => {
                return Err(bad(format!(
                    "release {} failed its health check and was rolled back; refusing to \
                     roll back to it (push it again to retry it)",
                    target.id
                )));
            }
            ReleaseStatus::Prepared | ReleaseStatus::Live => {}
        }
        keep_webhooks(&layout, &r.spec);
        // Holding the lock, with a target it will try: the rollback ends the watch.
        crate::deploy::watch::end(
            &self.shared,
            &layout,
            &format!("ended by a rollback by {}", r.holder),
        );
        let (etx, erx) = mpsc::unbounded_channel();
        let journal = Journal {
            action: Action::Rollback,
            app: r.app.clone(),
            release: target.id.clone(),
            version: target.version.clone(),
            previous: rollback_target(&layout).or(current),
            holder: r.holder,
            started: history::now_rfc3339(),
            skip_migrations: true,
            spec: r.spec,
            phase: Phase::Switching,
            error: None,
            origin: None,
            slots: None,
        };
        Ok((Run::new(layout, journal, Events::new(etx), lock), erx))
    }

    /// Runs a deploy or rollback in its own task, sending its progress to the session for
    /// as long as the session is there. The task finishes even if the session does not.
    async fn forward<S>(
        &self,
        conn: &mut Connection<S>,
        (run, mut events): Pending,
    ) -> Result<DeployReport, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let layout = run.layout.clone();
        // The secret values to mask stay in memory, for the watch too.
        let redact = run.journal.spec.redact.clone();
        let shared = self.shared.clone();
        // A deploy that went live under watch starts its watch task as it ends, whether
        // or not this session is still there.
        let task = self.shared.tasks.spawn(async move {
            let report = run.start().await;
            if report.outcome == Outcome::Live {
                crate::deploy::watch::spawn(&shared, &layout, redact);
            }
            report
        });
        tokio::pin!(task);
        loop {
            tokio::select! {
                Some(ev) = events.recv() => {
                    send(conn, &Response::Event(ev)).await?;
                }
                report = &mut task => {
                    while let Ok(ev) = events.try_recv() {
                        send(conn, &Response::Event(ev)).await?;
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
        let current = layout.current_release();
        let missing = current.as_deref().filter(|id| !layout.release(id).is_dir());
        let health = match s.health {
            // `current` points at a release that is gone: say so, rather than what a
            // health check of whatever still runs happens to answer.
            spec if missing.is_some() => Some(proto::HealthReport {
                url: spec
                    .map(|spec| crate::ports::expand(&s.app, &spec.url))
                    .unwrap_or_default(),
                healthy: false,
                attempts: 0,
                last_status: None,
                last_error: Some(missing_current(missing.unwrap_or_default())),
                body_snippet: None,
            }),
            Some(mut spec) if current.is_some() => {
                spec.retries = 1;
                spec.url = crate::ports::expand(&s.app, &spec.url);
                // With `[cutover]`, `${DEPLOY_PORT}` is the slot the proxy is on.
                if let Some(serving) = crate::deploy::journal::Serving::load(&layout) {
                    spec.url = spec
                        .url
                        .replace("${DEPLOY_PORT}", &serving.port.to_string());
                }
                Some(crate::health::wait_healthy(&spec, |_, _| {}).await)
            }
            _ => None,
        };
        let mut last = history::read_history(&layout, 1).pop();
        if let Some(problem) = crate::deploy::recover::unreadable_journal(&layout) {
            // A journal recovery could not read: the deploy it describes is unfinished.
            last = Some(proto::HistoryEntry {
                action: Action::Deploy,
                release: current.clone().unwrap_or_default(),
                version: None,
                previous: None,
                outcome: Outcome::RollbackFailed,
                holder: "deploy-agent".into(),
                started: String::new(),
                finished: String::new(),
                error: Some(problem),
                origin: None,
                instance: s.app.instance.clone(),
            });
        }
        Ok(Response::Status(StatusReply {
            current: list.into_iter().find(|r| r.current),
            last,
            lock: self.shared.locks.holder(&layout.root),
            health,
            watch: crate::deploy::watch::status(&layout),
        }))
    }
}

/// An upload in progress: dropped without [`UploadGuard::keep`] set, it removes the
/// partial release dir and the journal, so no exit path of a push can forget them.
struct UploadGuard {
    layout: Layout,
    release: String,
    /// Set once the upload is a release: then nothing is removed.
    keep: bool,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(self.layout.partial(&self.release));
            let _ = Journal::clear(&self.layout);
        }
    }
}

fn missing_current(id: &str) -> String {
    format!(
        "current points at releases/{id}, which does not exist on this host (deleted?); \
         push a release or `deployctl rollback ENV --to` a release that exists"
    )
}

/// What a new deploy goes back to if it fails: `current` when its release exists, or
/// else the newest live release that does (never a release that is gone).
fn rollback_target(layout: &Layout) -> Option<String> {
    let current = layout.current_release();
    if let Some(c) = &current
        && layout.release(c).is_dir()
    {
        return current;
    }
    layout
        .list()
        .into_iter()
        .rev()
        .find(|r| r.status == ReleaseStatus::Live && layout.release(&r.id).is_dir())
        .map(|r| r.id)
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

/// Whether the bytes received are the ones the controller sent ([`proto::StreamCheck`]):
/// the same count, and the same SHA-256 or CRC-32. The digest the controller names must
/// look like one: it is recorded as the release's.
fn check_upload(
    check: proto::StreamCheck,
    got: &unpack::Summed,
    end: &proto::UploadEnd,
) -> Result<(), ProtoError> {
    if end.sha256.len() != 64 || !end.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!(
            "upload_end: {:?} is not a hex sha256",
            end.sha256
        )));
    }
    let (what, received, sent) = match check {
        proto::StreamCheck::Sha256 => (
            "sha256",
            got.sha256.clone().unwrap_or_default(),
            end.sha256.to_ascii_lowercase(),
        ),
        proto::StreamCheck::Crc32 => (
            "crc32",
            format!("{:08x}", got.crc32),
            end.crc32
                .map_or_else(|| "(none)".to_owned(), |c| format!("{c:08x}")),
        ),
    };
    if got.bytes != end.size || received != sent {
        return Err(ProtoError::new(
            ErrorCode::ChecksumMismatch,
            format!(
                "upload corrupted: received {} bytes with {what} {received}, the controller \
                 sent {} bytes with {what} {sent}; nothing was changed",
                got.bytes, end.size
            ),
        ));
    }
    Ok(())
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

/// Keeps the webhooks of this push or rollback for recovery ([`crate::notify::store`]).
/// A failure only costs a later notification: logged, the deploy goes on.
fn keep_webhooks(layout: &Layout, spec: &proto::ReleaseSpec) {
    if let Err(e) = crate::notify::store(layout, spec.notify.as_ref()) {
        tracing::warn!(
            "{}: cannot keep the webhooks for recovery: {e}",
            layout.root.display()
        );
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
        let slot = shared.sessions.admit(8).unwrap();
        tokio::spawn(serve(shared, b, slot));
        let mut conn = codec::connect(a).await.unwrap();
        conn.send(&Request::Hello(Hello {
            protocol,
            version: "9.9.9".into(),
        }))
        .await
        .unwrap();
        conn.recv_json::<Response>().await.unwrap()
    }

    /// A session with a 300 ms idle limit, reached through a relay that passes the
    /// controller's bytes on `step` bytes every 20 ms (None: passes nothing after hello).
    async fn slow_session(
        step: Option<usize>,
    ) -> (Connection<tokio::io::DuplexStream>, Arc<Shared>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let mut config = AgentConfig::load(&Overrides {
            config: None,
            socket: Some(dir.path().join("s.sock")),
            socket_group: None,
            allowed_roots: vec![dir.path().to_path_buf()],
        })
        .unwrap();
        config.sessions.idle_timeout = Duration::from_millis(300);
        let (_tx, rx) = tokio::sync::watch::channel(false);
        std::mem::forget(_tx);
        let shared = Arc::new(Shared::new(config, rx));
        let (client, relay_in) = tokio::io::duplex(1 << 20);
        let (relay_out, server) = tokio::io::duplex(1 << 20);
        let slot = shared.sessions.admit(8).unwrap();
        tokio::spawn(serve(shared.clone(), server, slot));
        let (mut from_client, mut to_client) = tokio::io::split(relay_in);
        let (mut from_server, mut to_server) = tokio::io::split(relay_out);
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        });
        let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let slow2 = slow.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if !slow2.load(std::sync::atomic::Ordering::SeqCst) {
                    // the upgrade request, then hello: at full speed
                    let _ = to_server.write_all(&buf[..n]).await;
                    continue;
                }
                match step {
                    None => {}
                    Some(step) => {
                        for chunk in buf[..n].chunks(step) {
                            let _ = to_server.write_all(chunk).await;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
        });
        let mut conn = codec::connect(client).await.unwrap();
        conn.send(&Request::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            version: "9.9.9".into(),
        }))
        .await
        .unwrap();
        assert!(matches!(
            conn.recv_json::<Response>().await.unwrap(),
            Response::Hello(_)
        ));
        slow.store(true, std::sync::atomic::Ordering::SeqCst);
        (conn, shared)
    }

    #[tokio::test]
    async fn a_slow_controller_is_not_taken_for_a_silent_one() {
        // See: #16
        // ~3 KB at 100 bytes per 20 ms: about 0.6 s for one frame, twice the idle limit.
        let (mut conn, _shared) = slow_session(Some(100)).await;
        let long = format!("/{}", "x".repeat(3000));
        conn.send(&Request::Check(proto::Check {
            deploy_to: Some(long),
        }))
        .await
        .unwrap();
        match conn.recv_json::<Response>().await {
            Ok(Response::Check(c)) => assert!(!c.deploy_to.unwrap().allowed),
            other => panic!("the slow request was not answered: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_silent_controller_is_dropped_after_the_idle_limit() {
        // See: #16
        let (conn, shared) = slow_session(None).await;
        let started = std::time::Instant::now();
        // The relay keeps the client's end open: watch the agent's side instead.
        let deadline = started + Duration::from_secs(10);
        while !shared.sessions.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            shared.sessions.is_empty(),
            "the silent session is still open"
        );
        assert!(started.elapsed() >= Duration::from_millis(250));
        drop(conn);
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
