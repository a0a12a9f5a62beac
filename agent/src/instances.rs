//! Review apps: isolated instances of one app, one per name (e.g. `pr-42`).
//!
//! ```text
//! <deploy_to>/
//!   .deploy/instances.json          name -> port, created, touched, ttl, last spec
//!   instances/<name>/               a whole app layout: releases/, current, shared/,
//!                                   .deploy/ (its own journal, lock, history)
//! ```
//!
//! An instance is an ordinary [`Layout`] rooted at `instances/<name>`, so lock, journal,
//! recovery, health, rollback, prune and history work per instance unchanged. What this
//! module adds:
//!
//! - names: a DNS label ([`proto::instance_name_problem`]), so a name can never leave
//!   `instances/` and never meets the app's own `releases/` or `current`;
//! - ports: each instance gets a port from the pool the controller sends
//!   (`instance_ports`), kept in `instances.json` (temp file, fsync, rename) for the
//!   instance's life, across agent restarts. Every read-modify-write of a registry holds
//!   one process-wide mutex, so two pushes of different instances never get one port;
//! - `DEPLOY_INSTANCE` / `DEPLOY_PORT`: given to every command, expanded in the health
//!   URL, appended to a compose release's env file; the compose project is
//!   `<project>-<name>`;
//! - destroy: `stop` (or compose `down -v --remove-orphans`), then the instance dir is
//!   renamed away (atomic) and removed, the port freed, and a `destroy` line written to
//!   the app's own history;
//! - expiry: with `instance_ttl`, a periodic sweep ([`expiry_loop`]) destroys instances
//!   no deploy touched for that long and writes `expire` to the app's history.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::{
    Action, AppRef, ComposeSpec, Destroyed, ErrorCode, HistoryEntry, InstanceInfo, Outcome,
    ProtoError, ReleaseSpec, Stage, StepReport,
};
use serde::{Deserialize, Serialize};

use crate::compose::{self, Compose, Project};
use crate::exec;
use crate::journal;
use crate::lock::{LockGuard, Locks};
use crate::release::layout::{Layout, write_atomic};
use crate::server::Shared;

/// `<deploy_to>/instances`.
pub const DIR: &str = "instances";
/// Prefix of an instance dir being removed; never a valid name (it starts with `.`).
const DESTROYING: &str = ".destroying-";
/// How deep under an allowed root an app's `deploy_to` may be for its instances to expire.
const MAX_DEPTH: usize = 4;
/// How often idle instances are looked for, unless `DEPLOY_AGENT_EXPIRY_INTERVAL` says.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(60);
/// How long a destroy waits for a stopped instance's port to be released.
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Serializes every read-modify-write of every registry. The work under it is a small
/// file read and an atomic write.
static REGISTRY: Mutex<()> = Mutex::new(());

/// One instance in `instances.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The app's name (`DEPLOY_APP` for the commands expiry runs).
    #[serde(default)]
    pub app: String,
    pub port: u16,
    /// RFC 3339.
    pub created: String,
    /// The start or end of its last push or rollback (RFC 3339): what the TTL counts from.
    pub touched: String,
    /// `instance_ttl` as of its last push.
    pub ttl_ms: Option<u64>,
    /// How its last push was run: what expiry stops it with.
    pub spec: Option<ReleaseSpec>,
    /// The last failed expiry, so a stuck instance is reported once, not every sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_error: Option<String>,
}

type Registry = BTreeMap<String, Entry>;

fn registry_path(deploy_to: &Path) -> PathBuf {
    deploy_to.join(".deploy").join("instances.json")
}

fn load(deploy_to: &Path) -> std::io::Result<Registry> {
    match std::fs::read(registry_path(deploy_to)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", registry_path(deploy_to).display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::new()),
        Err(e) => Err(e),
    }
}

fn save(deploy_to: &Path, registry: &Registry) -> std::io::Result<()> {
    let path = registry_path(deploy_to);
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        // The agent's own state: private (see Layout::ensure).
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    write_atomic(&path, &serde_json::to_vec_pretty(registry)?)
}

/// Runs `f` on the registry of `deploy_to` under the process-wide mutex, and saves it.
fn update<T>(deploy_to: &Path, f: impl FnOnce(&mut Registry) -> T) -> std::io::Result<T> {
    let _guard = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let mut registry = load(deploy_to)?;
    let out = f(&mut registry);
    save(deploy_to, &registry)?;
    Ok(out)
}

fn entry(deploy_to: &Path, name: &str) -> Option<Entry> {
    let _guard = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    load(deploy_to).ok()?.get(name).cloned()
}

/// The port of instance `name` of the app at `deploy_to`.
pub fn port_of(deploy_to: &Path, name: &str) -> Option<u16> {
    entry(deploy_to, name).map(|e| e.port)
}

/// The layout a request is about: the app's own, or its instance's. The name is checked
/// first, and `instances/` (or the instance dir) must not be a symlink.
pub fn layout_of(deploy_to: &Path, instance: Option<&str>) -> Result<Layout, ProtoError> {
    let Some(name) = instance else {
        return Ok(Layout::new(deploy_to));
    };
    if let Some(why) = proto::instance_name_problem(name) {
        return Err(ProtoError::new(ErrorCode::BadRequest, why).with("instance", name));
    }
    let dir = deploy_to.join(DIR);
    for p in [&dir, &dir.join(name)] {
        if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(ProtoError::new(
                ErrorCode::PathNotAllowed,
                format!("{} is a symlink; refusing to follow it", p.display()),
            ));
        }
    }
    Ok(Layout::new(dir.join(name)))
}

/// `DEPLOY_INSTANCE` and `DEPLOY_PORT` of `app`, when it is an instance. The port is
/// empty when the instance has none (yet).
pub fn vars(app: &AppRef) -> Option<[(String, String); 2]> {
    let name = app.instance.as_deref()?;
    let port = port_of(Path::new(&app.deploy_to), name)
        .map(|p| p.to_string())
        .unwrap_or_default();
    Some([
        ("DEPLOY_INSTANCE".into(), name.to_owned()),
        ("DEPLOY_PORT".into(), port),
    ])
}

/// `text` with `${DEPLOY_INSTANCE}` and `${DEPLOY_PORT}` replaced for `app` (unchanged
/// for the app itself).
pub fn expand(app: &AppRef, text: &str) -> String {
    match vars(app) {
        Some(vars) => vars.iter().fold(text.to_owned(), |t, (k, v)| {
            t.replace(&format!("${{{k}}}"), v)
        }),
        None => text.to_owned(),
    }
}

/// The compose project of `app`: `<project>-<instance>` for an instance.
pub fn compose_project(app: &AppRef, project: &str) -> String {
    match &app.instance {
        Some(name) => format!("{project}-{name}"),
        None => project.to_owned(),
    }
}

/// Appends `DEPLOY_INSTANCE` and `DEPLOY_PORT` to a compose release's env file (earlier
/// values of both are dropped), so the compose file can publish `${DEPLOY_PORT}`.
pub fn append_env_file(path: &Path, app: &AppRef) -> std::io::Result<()> {
    let Some(vars) = vars(app) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(path)?;
    let mut out: String = text
        .lines()
        .filter(|l| {
            let key = l.trim_start().split('=').next().unwrap_or("").trim();
            !vars.iter().any(|(k, _)| k == key)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str("# added by deploy-agent for this review-app instance\n");
    for (k, v) in &vars {
        out.push_str(&format!("{k}={v}\n"));
    }
    write_atomic(path, out.as_bytes())
}

/// Whether nothing listens on `port` (any address; a listener on one address makes a
/// wildcard bind fail).
fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// The lowest port of `first..=last` that no other instance holds and nothing listens
/// on.
fn allocate(registry: &Registry, first: u16, last: u16) -> Option<u16> {
    let held: BTreeSet<u16> = registry.values().map(|e| e.port).collect();
    (first..=last).find(|p| !held.contains(p) && port_free(*p))
}

/// Before a push of an instance: gives it a port when it has none (or its port left the
/// pool), and records when it was touched, its TTL and spec. Returns the port; `None`
/// for the app itself.
pub fn register(app: &AppRef, spec: &ReleaseSpec) -> Result<Option<u16>, String> {
    let Some(name) = app.instance.as_deref() else {
        return Ok(None);
    };
    let Some(pool) = &spec.instance else {
        return Err(format!(
            "instance {name}: the push carries no port pool (instance_ports)"
        ));
    };
    let (first, last) = (pool.first_port, pool.last_port);
    if first > last || first == 0 {
        return Err(format!("bad port pool {first}-{last}"));
    }
    let now = journal::now_rfc3339();
    update(Path::new(&app.deploy_to), |reg| {
        let keep = reg
            .get(name)
            .map(|e| e.port)
            .filter(|p| (first..=last).contains(p));
        let port = match keep {
            Some(p) => p,
            None => {
                let mut others = reg.clone();
                others.remove(name);
                allocate(&others, first, last).ok_or_else(|| {
                    format!(
                        "no free port in instance_ports {first}-{last}: {} instance(s) hold \
                         ports there; destroy one (deployctl instances ENV lists them)",
                        others.len()
                    )
                })?
            }
        };
        let created = reg.get(name).map(|e| e.created.clone());
        reg.insert(
            name.to_owned(),
            Entry {
                app: app.name.clone(),
                port,
                created: created.unwrap_or_else(|| now.clone()),
                touched: now.clone(),
                ttl_ms: pool.ttl_ms,
                // The values to mask are secrets: they stay in memory only.
                spec: Some(ReleaseSpec {
                    redact: Vec::new(),
                    ..spec.clone()
                }),
                expire_error: None,
            },
        );
        Ok(Some(port))
    })
    .map_err(|e| format!("cannot update the instance registry: {e}"))?
}

/// After a deploy or rollback of an instance ended: it was touched now.
pub fn touch(app: &AppRef) {
    let Some(name) = app.instance.as_deref() else {
        return;
    };
    let now = journal::now_rfc3339();
    let _ = update(Path::new(&app.deploy_to), |reg| {
        if let Some(e) = reg.get_mut(name) {
            e.touched = now;
        }
    });
}

fn parse_time(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

fn format_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// When `e` expires, if it has a TTL.
fn expires(e: &Entry) -> Option<time::OffsetDateTime> {
    let ttl = e.ttl_ms?;
    Some(parse_time(&e.touched)? + time::Duration::milliseconds(ttl.min(i64::MAX as u64) as i64))
}

/// Names of the instance dirs under `<deploy_to>/instances`.
fn dir_names(deploy_to: &Path) -> Vec<String> {
    std::fs::read_dir(deploy_to.join(DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| proto::instance_name_problem(n).is_none())
        .collect()
}

/// Every instance of the app at `deploy_to`: those in the registry and any dir without
/// an entry (a registry restored from a backup, say), sorted by name.
pub fn list(deploy_to: &Path, locks: &Locks) -> Vec<InstanceInfo> {
    let registry = {
        let _guard = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        load(deploy_to).unwrap_or_default()
    };
    let mut names: BTreeSet<String> = registry.keys().cloned().collect();
    names.extend(dir_names(deploy_to));
    names
        .into_iter()
        .map(|name| {
            let layout = Layout::new(deploy_to.join(DIR).join(&name));
            let e = registry.get(&name);
            InstanceInfo {
                port: e.map(|e| e.port),
                current: layout.list().into_iter().find(|r| r.current),
                last: journal::read_history(&layout, 1).pop(),
                touched: e.map(|e| e.touched.clone()),
                expires: e.and_then(expires).map(format_time),
                lock: locks.holder(&layout.root),
                name,
            }
        })
        .collect()
}

/// Whether anything of instance `layout` is left to remove.
fn exists(layout: &Layout, registered: bool) -> bool {
    registered || layout.releases().exists() || std::fs::symlink_metadata(layout.current()).is_ok()
}

/// Why destroying stopped: the instance is still there.
fn stop_failed(name: &str, port: Option<u16>, why: &str) -> ProtoError {
    ProtoError::new(
        ErrorCode::DeployFailed,
        format!(
            "instance {name} could not be stopped ({why}); it was kept{}: fix the cause and \
             run destroy again",
            port.map(|p| format!(", with port {p}")).unwrap_or_default()
        ),
    )
    .with("instance", name)
}

/// Stops and removes instance `app.instance` (laid out at `layout`, whose lock `_lock`
/// is held), frees its port and writes `action` to the app's own history. `spec` says
/// how to stop it; without one, the spec of its last push.
pub async fn destroy(
    app: &AppRef,
    layout: &Layout,
    _lock: &LockGuard,
    spec: Option<&ReleaseSpec>,
    holder: &str,
    action: Action,
) -> Result<Destroyed, ProtoError> {
    let Some(name) = app.instance.as_deref() else {
        return Err(ProtoError::new(
            ErrorCode::BadRequest,
            "destroy needs an instance name; the app itself is never destroyed",
        ));
    };
    let deploy_to = Path::new(&app.deploy_to);
    let started = journal::now_rfc3339();
    let entry = entry(deploy_to, name);
    if !exists(layout, entry.is_some()) {
        // A `Lock` taken before this may have left `.deploy/` behind.
        let _ = std::fs::remove_dir_all(&layout.root);
        return Ok(Destroyed {
            existed: false,
            port: None,
            release: None,
            steps: Vec::new(),
        });
    }
    let port = entry.as_ref().map(|e| e.port);
    let spec = spec
        .cloned()
        .or_else(|| entry.as_ref().and_then(|e| e.spec.clone()));
    let current = layout.current_release();
    let version = current
        .as_deref()
        .and_then(|c| layout.read_meta(c))
        .and_then(|m| m.version);
    let steps = match &spec {
        Some(spec) => stop(app, layout, spec, current.as_deref())
            .await
            .map_err(|(why, _)| stop_failed(name, port, &why))?,
        None => Vec::new(),
    };
    if let Some(p) = port {
        // The port goes back to the pool: wait until whatever served on it has let go.
        let t = Instant::now();
        while !port_free(p) && t.elapsed() < PORT_RELEASE_WAIT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !port_free(p) {
            tracing::warn!(instance = name, port = p, "port still in use after stop");
        }
    }
    // Renamed first (atomic), so a half-removed instance is never mistaken for one.
    if layout.root.exists() {
        let gone = deploy_to.join(DIR).join(format!(
            "{DESTROYING}{name}-{}",
            time::OffsetDateTime::now_utc().unix_timestamp_nanos()
        ));
        std::fs::rename(&layout.root, &gone)
            .and_then(|()| std::fs::remove_dir_all(&gone))
            .map_err(|e| {
                ProtoError::new(
                    ErrorCode::Io,
                    format!("instance {name} was stopped but not removed: {e}"),
                )
            })?;
    }
    update(deploy_to, |reg| reg.remove(name)).map_err(|e| {
        ProtoError::new(
            ErrorCode::Io,
            format!("instance {name} was removed but its port stays reserved: {e}"),
        )
    })?;
    let base = Layout::new(deploy_to);
    let _ = journal::append_history(
        &base,
        &HistoryEntry {
            action,
            release: current.clone().unwrap_or_default(),
            version,
            previous: None,
            outcome: Outcome::Removed,
            holder: holder.to_owned(),
            started,
            finished: journal::now_rfc3339(),
            error: None,
            origin: None,
            instance: Some(name.to_owned()),
        },
    );
    tracing::info!(instance = name, ?action, "instance removed");
    Ok(Destroyed {
        existed: true,
        port,
        release: current,
        steps,
    })
}

/// The app's environment for a command run for instance `app` in `release`.
fn command_env(app: &AppRef, layout: &Layout, release: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("DEPLOY_APP".into(), app.name.clone());
    env.insert("DEPLOY_RELEASE".into(), release.to_owned());
    env.insert(
        "DEPLOY_RELEASE_DIR".into(),
        layout.release(release).display().to_string(),
    );
    let version = layout.read_meta(release).and_then(|m| m.version);
    env.insert("DEPLOY_VERSION".into(), version.unwrap_or_default());
    env.insert("DEPLOY_PREVIOUS_RELEASE".into(), String::new());
    env.insert("DEPLOY_TO".into(), layout.root.display().to_string());
    env.extend(vars(app).into_iter().flatten());
    env
}

type StopError = (String, Vec<StepReport>);

/// `stop` in the current release, or compose `down -v --remove-orphans` with the files of
/// the newest release that recorded them (the project's volumes go too). Nothing to run
/// when no release is left.
async fn stop(
    app: &AppRef,
    layout: &Layout,
    spec: &ReleaseSpec,
    current: Option<&str>,
) -> Result<Vec<StepReport>, StopError> {
    let timeout = Duration::from_millis(spec.command_timeout_ms.max(1));
    let mut steps = Vec::new();
    if let Some(now) = &spec.compose {
        let newest = current.map(str::to_owned).into_iter().chain(
            layout
                .release_ids()
                .into_iter()
                .rev()
                .filter(|id| compose::recorded(&layout.release(id)).is_some()),
        );
        let Some(release) = newest.into_iter().find(|id| layout.release(id).is_dir()) else {
            return Ok(steps);
        };
        let mut recorded: ComposeSpec =
            compose::recorded(&layout.release(&release)).unwrap_or_else(|| now.clone());
        recorded.project = compose_project(app, &now.project);
        recorded.command = now.command.clone();
        if let Err(e) = compose::check_spec(&recorded) {
            return Err((e, steps));
        }
        let env = command_env(app, layout, &release);
        let run = |name: &'static str, argv: Vec<String>, timeout| {
            let env = env.clone();
            let dir = layout.release(&release);
            let log = layout.logs().join(format!("destroy.{name}.log"));
            async move {
                let _ = std::fs::remove_file(&log);
                let shown = compose::display(&argv);
                exec::run(exec::Command {
                    stage: Stage::Rollback,
                    command: &shown,
                    argv: Some(&argv),
                    dir: &dir,
                    env: &env,
                    timeout,
                    log,
                })
                .await
            }
        };
        let candidates = match &recorded.command {
            Some(cmd) => vec![Compose::from_command(cmd).map_err(|e| (e, Vec::new()))?],
            None => Compose::candidates().to_vec(),
        };
        let mut bin = None;
        for c in candidates {
            if run("compose-version", c.version(), Duration::from_secs(60))
                .await
                .is_ok()
            {
                bin = Some(c);
                break;
            }
        }
        let Some(bin) = bin else {
            return Err((
                "no working `docker compose` or `docker-compose` on this host".into(),
                steps,
            ));
        };
        match run(
            "compose-down",
            bin.down_volumes(Project::of(&recorded)),
            timeout,
        )
        .await
        {
            Ok(step) => steps.push(step),
            Err((step, e)) => {
                let why = format!("{e}: {}", step.output.trim());
                steps.push(step);
                return Err((why, steps));
            }
        }
        return Ok(steps);
    }
    let (Some(cmd), Some(release)) = (&spec.stop, current) else {
        return Ok(steps);
    };
    let env = command_env(app, layout, release);
    let result = exec::run(exec::Command {
        stage: Stage::Rollback,
        command: cmd,
        argv: None,
        dir: &layout.release(release),
        env: &env,
        timeout,
        log: layout.logs().join("destroy.stop.log"),
    })
    .await;
    match result {
        Ok(step) => {
            steps.push(step);
            Ok(steps)
        }
        Err((step, e)) => {
            let why = format!("{e}: {}", step.output.trim());
            steps.push(step);
            Err((why, steps))
        }
    }
}

/// `DEPLOY_AGENT_EXPIRY_INTERVAL` (`500ms`, `2s`, `1m`, or seconds), else a minute.
pub fn expiry_interval() -> Duration {
    std::env::var("DEPLOY_AGENT_EXPIRY_INTERVAL")
        .ok()
        .and_then(|v| parse_duration(&v))
        .filter(|d| !d.is_zero())
        .unwrap_or(EXPIRY_INTERVAL)
}

fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    match s.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s).ok(),
    }
}

/// Every `deploy_to` under `roots` that has instances (a registry or an `instances/`
/// dir), at most `max_depth` levels down. Does not follow symlinks.
fn find_apps(roots: &[PathBuf], max_depth: usize) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, max: usize, out: &mut Vec<PathBuf>) {
        if registry_path(dir).is_file() || dir.join(DIR).is_dir() {
            out.push(dir.to_path_buf());
        }
        if depth >= max {
            return;
        }
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            if [DIR, "releases", "shared", ".deploy", "current"]
                .iter()
                .any(|n| name == *n)
            {
                continue;
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), depth + 1, max, out);
            }
        }
    }
    let mut out = Vec::new();
    for r in roots {
        walk(r, 0, max_depth, &mut out);
    }
    out
}

/// Destroys the expired instances found now; at start, and every [`expiry_interval`]
/// until shutdown. Each removal runs as an agent task, so shutdown waits for it.
pub async fn expiry_loop(shared: Arc<Shared>) {
    let every = expiry_interval();
    loop {
        sweep(&shared).await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.shutdown_signal() => return,
        }
    }
}

/// One pass: leftovers of interrupted removals go, and every instance past its TTL whose
/// lock is free is destroyed.
pub async fn sweep(shared: &Arc<Shared>) {
    let now = time::OffsetDateTime::now_utc();
    for deploy_to in find_apps(&shared.config.allowed_roots, MAX_DEPTH) {
        for e in std::fs::read_dir(deploy_to.join(DIR))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(DESTROYING) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let registry = {
            let _guard = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
            match load(&deploy_to) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("{e}");
                    continue;
                }
            }
        };
        for (name, entry) in registry {
            let Some(when) = expires(&entry) else {
                continue;
            };
            if when > now || shared.shutting_down() {
                continue;
            }
            let app = AppRef {
                name: entry.app.clone(),
                deploy_to: deploy_to.display().to_string(),
                instance: Some(name.clone()),
            };
            let Ok(layout) = layout_of(&deploy_to, Some(&name)) else {
                continue;
            };
            let ttl = humanize(Duration::from_millis(entry.ttl_ms.unwrap_or(0)));
            let holder = format!("deploy-agent (idle for longer than instance_ttl = {ttl})");
            let info = proto::LockInfo {
                holder: holder.clone(),
                version: None,
                since: journal::now_rfc3339(),
            };
            // A deploy in flight touches it anyway: try again next time.
            let Ok(lock) = shared
                .locks
                .acquire(&layout.root, layout.lock_file(), info, Duration::ZERO)
                .await
            else {
                continue;
            };
            // Touched since we read the registry (a push that just ended)?
            if self::entry(&deploy_to, &name)
                .and_then(|e| expires(&e))
                .is_none_or(|w| w > time::OffsetDateTime::now_utc())
            {
                continue;
            }
            tracing::info!(instance = %name, deploy_to = %deploy_to.display(), "expiring idle instance");
            let task = shared.tasks.spawn(async move {
                let r = destroy(&app, &layout, &lock, None, &holder, Action::Expire).await;
                (app, holder, r)
            });
            if let Ok((app, holder, Err(e))) = task.await {
                report_expiry_failure(&app, &holder, &e.message);
            }
        }
    }
}

/// Writes a failed expiry to the app's history, once per distinct error.
fn report_expiry_failure(app: &AppRef, holder: &str, error: &str) {
    let Some(name) = app.instance.as_deref() else {
        return;
    };
    tracing::warn!(instance = name, "expiry failed: {error}");
    let deploy_to = Path::new(&app.deploy_to);
    let first = update(deploy_to, |reg| match reg.get_mut(name) {
        Some(e) if e.expire_error.as_deref() != Some(error) => {
            e.expire_error = Some(error.to_owned());
            true
        }
        _ => false,
    })
    .unwrap_or(false);
    if first {
        let now = journal::now_rfc3339();
        let _ = journal::append_history(
            &Layout::new(deploy_to),
            &HistoryEntry {
                action: Action::Expire,
                release: String::new(),
                version: None,
                previous: None,
                outcome: Outcome::Failed,
                holder: holder.to_owned(),
                started: now.clone(),
                finished: now,
                error: Some(error.to_owned()),
                origin: None,
                instance: Some(name.to_owned()),
            },
        );
    }
}

fn humanize(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::InstanceSpec;

    fn app(root: &Path, instance: Option<&str>) -> AppRef {
        AppRef {
            name: "app".into(),
            deploy_to: root.display().to_string(),
            instance: instance.map(str::to_owned),
        }
    }

    fn spec(first: u16, last: u16, ttl_ms: Option<u64>) -> ReleaseSpec {
        ReleaseSpec {
            shared: vec![],
            migrate: None,
            restart: None,
            stop: None,
            command_timeout_ms: 1000,
            keep_releases: 3,
            health: None,
            max_unpacked_bytes: 1 << 20,
            compose: None,
            instance: Some(InstanceSpec {
                first_port: first,
                last_port: last,
                ttl_ms,
            }),
            redact: Vec::new(),
        }
    }

    /// A free port with the next one free too, for a two-port pool.
    fn pool() -> (u16, u16) {
        loop {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let p = l.local_addr().unwrap().port();
            drop(l);
            if p < u16::MAX && port_free(p) && port_free(p + 1) {
                return (p, p + 1);
            }
        }
    }

    #[test]
    fn names_are_checked_and_stay_under_instances() {
        let dir = tempfile::tempdir().unwrap();
        let l = layout_of(dir.path(), Some("pr-1")).unwrap();
        assert_eq!(l.root, dir.path().join("instances/pr-1"));
        assert_eq!(layout_of(dir.path(), None).unwrap().root, dir.path());
        // names a release or `current` would have are fine: they live under instances/
        for ok in ["current", "20261122214450", "releases"] {
            assert!(
                layout_of(dir.path(), Some(ok))
                    .unwrap()
                    .root
                    .starts_with(dir.path().join("instances"))
            );
        }
        for bad in ["../x", "PR_1", "a.b", "a b", "", "-x", &"a".repeat(64)] {
            let e = layout_of(dir.path(), Some(bad)).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad}");
        }
        std::os::unix::fs::symlink("/tmp", dir.path().join("instances")).unwrap();
        let e = layout_of(dir.path(), Some("pr-1")).unwrap_err();
        assert_eq!(e.code, ErrorCode::PathNotAllowed);
    }

    #[test]
    fn ports_are_kept_per_instance_and_reused_after_removal() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = pool();
        let s = spec(a, b, None);
        let p1 = register(&app(dir.path(), Some("pr-1")), &s).unwrap();
        let p2 = register(&app(dir.path(), Some("pr-2")), &s).unwrap();
        assert_eq!((p1, p2), (Some(a), Some(b)));
        // an update keeps the port, the registry survives (it is a file)
        assert_eq!(
            register(&app(dir.path(), Some("pr-1")), &s).unwrap(),
            Some(a)
        );
        assert_eq!(port_of(dir.path(), "pr-2"), Some(b));
        let full = register(&app(dir.path(), Some("pr-3")), &s).unwrap_err();
        assert!(full.contains("no free port"), "{full}");
        update(dir.path(), |r| r.remove("pr-1")).unwrap();
        assert_eq!(
            register(&app(dir.path(), Some("pr-3")), &s).unwrap(),
            Some(a)
        );
        // the app itself has no port
        assert_eq!(register(&app(dir.path(), None), &s).unwrap(), None);
    }

    // See: #16 (item 6)
    #[test]
    fn the_registry_keeps_no_secret_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = pool();
        let mut s = spec(a, b, None);
        s.redact = vec!["hunter2-secret".into()];
        register(&app(dir.path(), Some("pr-9")), &s).unwrap();
        let path = registry_path(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("hunter2-secret"), "{text}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }

    #[test]
    fn a_port_in_use_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = pool();
        let busy = std::net::TcpListener::bind(("127.0.0.1", a)).unwrap();
        let p = register(&app(dir.path(), Some("pr-1")), &spec(a, b, None)).unwrap();
        assert_eq!(p, Some(b));
        drop(busy);
    }

    #[test]
    fn vars_expand_in_urls_and_env_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = pool();
        let inst = app(dir.path(), Some("pr-7"));
        register(&inst, &spec(a, b, None)).unwrap();
        assert_eq!(
            expand(&inst, "http://127.0.0.1:${DEPLOY_PORT}/${DEPLOY_INSTANCE}"),
            format!("http://127.0.0.1:{a}/pr-7")
        );
        let base = app(dir.path(), None);
        assert_eq!(expand(&base, "x:${DEPLOY_PORT}"), "x:${DEPLOY_PORT}");
        assert_eq!(compose_project(&inst, "myapp"), "myapp-pr-7");
        assert_eq!(compose_project(&base, "myapp"), "myapp");
        let env = dir.path().join(".env");
        std::fs::write(&env, "A=1\nDEPLOY_PORT=1\nB=2").unwrap();
        append_env_file(&env, &inst).unwrap();
        append_env_file(&env, &inst).unwrap();
        let text = std::fs::read_to_string(&env).unwrap();
        assert!(text.starts_with("A=1\nB=2\n"), "{text}");
        assert_eq!(text.matches("DEPLOY_PORT=").count(), 1, "{text}");
        assert!(
            text.ends_with(&format!("DEPLOY_INSTANCE=pr-7\nDEPLOY_PORT={a}\n")),
            "{text}"
        );
    }

    #[test]
    fn expiry_counts_from_the_last_touch() {
        let e = Entry {
            app: "app".into(),
            port: 1,
            created: "2026-01-01T00:00:00Z".into(),
            touched: "2026-01-01T00:00:00Z".into(),
            ttl_ms: Some(2000),
            spec: None,
            expire_error: None,
        };
        assert_eq!(format_time(expires(&e).unwrap()), "2026-01-01T00:00:02Z");
        assert!(expires(&Entry { ttl_ms: None, ..e }).is_none());
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(humanize(Duration::from_secs(7 * 86400)), "7days");
        assert_eq!(humanize(Duration::from_millis(1500)), "1s 500ms");
    }

    #[tokio::test]
    async fn destroy_stops_removes_frees_and_writes_history() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = pool();
        let inst = app(dir.path(), Some("pr-1"));
        let mut s = spec(a, b, None);
        s.stop = Some("echo stopping $DEPLOY_INSTANCE on $DEPLOY_PORT".into());
        register(&inst, &s).unwrap();
        let layout = layout_of(dir.path(), Some("pr-1")).unwrap();
        layout.ensure().unwrap();
        let id = "20260101000000";
        std::fs::create_dir(layout.release(id)).unwrap();
        crate::release::switch::switch(&layout, id).unwrap();
        let locks = Arc::new(Locks::default());
        let info = proto::LockInfo {
            holder: "t".into(),
            version: None,
            since: "now".into(),
        };
        let lock = locks
            .acquire(&layout.root, layout.lock_file(), info, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(
            list(dir.path(), &locks)[0].lock.as_ref().unwrap().holder,
            "t"
        );
        let d = destroy(&inst, &layout, &lock, Some(&s), "alice", Action::Destroy)
            .await
            .unwrap();
        assert!(d.existed);
        assert_eq!(d.port, Some(a));
        assert_eq!(d.release.as_deref(), Some(id));
        assert!(
            d.steps[0].output.contains(&format!("stopping pr-1 on {a}")),
            "{:?}",
            d.steps
        );
        assert!(!layout.root.exists());
        assert_eq!(port_of(dir.path(), "pr-1"), None);
        assert!(list(dir.path(), &locks).is_empty());
        let h = journal::read_history(&Layout::new(dir.path()), 0);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].action, Action::Destroy);
        assert_eq!(h[0].outcome, Outcome::Removed);
        assert_eq!(h[0].instance.as_deref(), Some("pr-1"));
        // again: nothing to do, and it says so
        let d = destroy(&inst, &layout, &lock, Some(&s), "alice", Action::Destroy)
            .await
            .unwrap();
        assert!(!d.existed);
        assert_eq!(journal::read_history(&Layout::new(dir.path()), 0).len(), 1);
    }

    #[tokio::test]
    async fn a_failing_stop_keeps_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = pool();
        let inst = app(dir.path(), Some("pr-1"));
        let mut s = spec(a, b, None);
        s.stop = Some("echo cannot; exit 4".into());
        register(&inst, &s).unwrap();
        let layout = layout_of(dir.path(), Some("pr-1")).unwrap();
        layout.ensure().unwrap();
        std::fs::create_dir(layout.release("20260101000000")).unwrap();
        crate::release::switch::switch(&layout, "20260101000000").unwrap();
        let locks = Arc::new(Locks::default());
        let info = proto::LockInfo {
            holder: "t".into(),
            version: None,
            since: "now".into(),
        };
        let lock = locks
            .acquire(&layout.root, layout.lock_file(), info, Duration::ZERO)
            .await
            .unwrap();
        let e = destroy(&inst, &layout, &lock, Some(&s), "alice", Action::Destroy)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::DeployFailed);
        assert!(e.message.contains("cannot"), "{}", e.message);
        assert!(layout.current_release().is_some());
        assert_eq!(port_of(dir.path(), "pr-1"), Some(a));
    }

    #[test]
    fn apps_with_instances_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("team/app");
        std::fs::create_dir_all(app.join(".deploy")).unwrap();
        std::fs::write(registry_path(&app), "{}").unwrap();
        std::fs::create_dir_all(dir.path().join("other/releases")).unwrap();
        assert_eq!(find_apps(&[dir.path().to_path_buf()], 4), vec![app]);
    }
}
