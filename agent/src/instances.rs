//! Review apps: isolated instances of one app, one per name (e.g. `pr-42`): listing,
//! destroy, and expiry.
//!
//! ```text
//! <deploy_to>/
//!   .deploy/instances.json          name -> port, created, touched, ttl, last spec
//!   instances/<name>/               a whole app layout: releases/, current, shared/,
//!                                   .deploy/ (its own journal, lock, history)
//! ```
//!
//! An instance is an ordinary [`Layout`] rooted at `instances/<name>`, so lock, journal,
//! recovery, health, rollback, prune and history work per instance unchanged. Names,
//! ports and `DEPLOY_INSTANCE` / `DEPLOY_PORT` live below, in [`crate::ports`], since the
//! deploy needs them too. What this module adds:
//!
//! - destroy: `stop` (or compose `down -v --remove-orphans`), then the instance dir is
//!   renamed away (atomic) and removed, the port freed, and a `destroy` line written to
//!   the app's own history;
//! - expiry: with `instance_ttl`, a periodic sweep ([`expiry_loop`]) destroys instances
//!   no deploy touched for that long and writes `expire` to the app's history.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{
    Action, AppRef, ComposeSpec, Destroyed, ErrorCode, HistoryEntry, InstanceInfo, Outcome,
    ProtoError, ReleaseSpec, Stage, StepReport,
};

use crate::command_env::command_env;
use crate::compose::{self, Project};
use crate::context::Shared;
use crate::exec;
use crate::history;
use crate::lock::{LockGuard, Locks};
use crate::ports::{self, Entry, compose_project, layout_of, port_free, update};
use crate::release::layout::{INSTANCES_DIR as DIR, Layout, app_dirs};

/// Prefix of an instance dir being removed; never a valid name (it starts with `.`).
const DESTROYING: &str = ".destroying-";
/// How deep under an allowed root an app's `deploy_to` may be for its instances to expire.
const MAX_DEPTH: usize = 4;
/// How often idle instances are looked for, unless `DEPLOY_AGENT_EXPIRY_INTERVAL` says.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(60);
/// How long a destroy waits for a stopped instance's port to be released.
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(5);

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
    let registry = { ports::snapshot(deploy_to).unwrap_or_default() };
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
                last: history::read_history(&layout, 1).pop(),
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
    let started = history::now_rfc3339();
    let entry = ports::entry(deploy_to, name);
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
    let _ = history::append_history(
        &base,
        &HistoryEntry {
            action,
            release: current.clone().unwrap_or_default(),
            version,
            previous: None,
            outcome: Outcome::Removed,
            holder: holder.to_owned(),
            started,
            finished: history::now_rfc3339(),
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

/// The app's environment for a command run for instance `app` in `release`: no
/// deploy is in flight, so there is no previous release.
fn current_env(app: &AppRef, layout: &Layout, release: &str) -> BTreeMap<String, String> {
    let version = layout.read_meta(release).and_then(|m| m.version);
    command_env(app, layout, release, version, None)
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
        let env = current_env(app, layout, &release);
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
        let bin = compose::detect(recorded.command.as_deref(), |argv| {
            run("compose-version", argv, compose::PROBE_TIMEOUT)
        })
        .await
        .map_err(|(why, _)| (why, Vec::new()))?;
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
    let env = current_env(app, layout, release);
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
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(Duration::from_millis(n.checked_mul(ms)?))
}

/// Every `deploy_to` under `roots` that has instances (a registry or an `instances/`
/// dir), at most `max_depth` levels down. Does not follow symlinks.
fn find_apps(roots: &[PathBuf], max_depth: usize) -> Vec<PathBuf> {
    app_dirs(roots, max_depth)
        .into_iter()
        .filter(|d| ports::registry_path(d).is_file() || d.join(DIR).is_dir())
        .collect()
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
        let registry = match ports::snapshot(&deploy_to) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
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
                since: history::now_rfc3339(),
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
            if ports::entry(&deploy_to, &name)
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
        let now = history::now_rfc3339();
        let _ = history::append_history(
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
    let ms = d.as_millis() as u64;
    for (unit, n) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= n && ms.is_multiple_of(n) {
            return format!("{}{unit}", ms / n);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::tests::{app, pool, spec};
    use crate::ports::{port_of, register, registry_path};

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
        assert_eq!(humanize(Duration::from_secs(7 * 86400)), "7d");
        assert_eq!(humanize(Duration::from_millis(1500)), "1500ms");
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
        let h = history::read_history(&Layout::new(dir.path()), 0);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].action, Action::Destroy);
        assert_eq!(h[0].outcome, Outcome::Removed);
        assert_eq!(h[0].instance.as_deref(), Some("pr-1"));
        // again: nothing to do, and it says so
        let d = destroy(&inst, &layout, &lock, Some(&s), "alice", Action::Destroy)
            .await
            .unwrap();
        assert!(!d.existed);
        assert_eq!(history::read_history(&Layout::new(dir.path()), 0).len(), 1);
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
