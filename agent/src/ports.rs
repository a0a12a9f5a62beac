//! Review-app instances at the low level, for every module above: instance names to
//! layouts, the port registry, and what an instance adds to a command.
//!
//! ```text
//! <deploy_to>/.deploy/instances.json   name -> port, created, touched, ttl, last spec
//! ```
//!
//! Each instance gets a port from the pool the controller sends (`instance_ports`), kept
//! in `instances.json` (temp file, fsync, rename) for the instance's life, across agent
//! restarts. Every read-modify-write of a registry holds one process-wide mutex, so two
//! pushes of different instances never get one port. `DEPLOY_INSTANCE` / `DEPLOY_PORT`
//! are given to every command ([`vars`]), expanded in the health URL ([`expand`]) and
//! appended to a compose release's env file ([`append_env_file`]); the compose project
//! is `<project>-<name>` ([`compose_project`]). Destroy and expiry live in
//! [`crate::instances`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proto::{AppRef, ErrorCode, ProtoError, ReleaseSpec};
use serde::{Deserialize, Serialize};

use crate::history;
use crate::release::layout::{INSTANCES_DIR as DIR, Layout, write_atomic};

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

pub type Registry = BTreeMap<String, Entry>;

pub fn registry_path(deploy_to: &Path) -> PathBuf {
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
pub fn update<T>(deploy_to: &Path, f: impl FnOnce(&mut Registry) -> T) -> std::io::Result<T> {
    let _guard = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let mut registry = load(deploy_to)?;
    let out = f(&mut registry);
    save(deploy_to, &registry)?;
    Ok(out)
}

/// The registry of `deploy_to` as it is now.
pub fn snapshot(deploy_to: &Path) -> std::io::Result<Registry> {
    let _guard = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    load(deploy_to)
}

pub fn entry(deploy_to: &Path, name: &str) -> Option<Entry> {
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
pub fn port_free(port: u16) -> bool {
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
    let now = history::now_rfc3339();
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
    let now = history::now_rfc3339();
    let _ = update(Path::new(&app.deploy_to), |reg| {
        if let Some(e) = reg.get_mut(name) {
            e.touched = now;
        }
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proto::InstanceSpec;

    pub(crate) fn app(root: &Path, instance: Option<&str>) -> AppRef {
        AppRef {
            name: "app".into(),
            deploy_to: root.display().to_string(),
            instance: instance.map(str::to_owned),
        }
    }

    pub(crate) fn spec(first: u16, last: u16, ttl_ms: Option<u64>) -> ReleaseSpec {
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
    pub(crate) fn pool() -> (u16, u16) {
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
}
