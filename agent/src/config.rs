//! The agent's own config, `/etc/deploy-agent/agent.toml` by default. Every key can be
//! given as a flag instead, and the file may be absent when the flags say enough.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/deploy-agent/agent.toml";
pub const DEFAULT_SOCKET: &str = "/run/deploy-agent/agent.sock";

/// The file as written. Unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    allowed_roots: Option<Vec<PathBuf>>,
    max_unpacked_bytes: Option<u64>,
    handshake_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    max_sessions: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub socket: PathBuf,
    /// Group that owns the socket (mode 0660). `None` keeps the agent's own group.
    pub socket_group: Option<String>,
    /// A `deploy_to` must lie under one of these.
    pub allowed_roots: Vec<PathBuf>,
    /// Where `allowed_roots` came from, for messages: see [`RootsFrom`].
    pub roots_from: RootsFrom,
    /// Cap on the unpacked size of one release.
    pub max_unpacked_bytes: u64,
    /// Limits on sessions: see [`SessionLimits`].
    pub sessions: SessionLimits,
}

/// How long a session may stay silent, and how many there may be. The defaults are
/// documented in docs/agent-setup.md ("Session limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// From accept to the end of `hello`: a connection that has not said hello by then
    /// is closed.
    pub handshake_timeout: std::time::Duration,
    /// Between two requests (and between two frames of an upload, capped at
    /// [`SessionLimits::UPLOAD_STALL_CAP`]): a session silent that long is closed and its
    /// locks are freed.
    pub idle_timeout: std::time::Duration,
    /// Sessions at once. At the cap, a new connection evicts the oldest session still in
    /// its handshake (or idle without a lock); only if there is none is it refused.
    pub max_sessions: usize,
}

impl SessionLimits {
    pub const DEFAULT_HANDSHAKE_SECS: u64 = 10;
    pub const DEFAULT_IDLE_SECS: u64 = 600;
    pub const DEFAULT_MAX_SESSIONS: usize = 128;
    /// An upload that stalls this long is dead, whatever `idle_timeout` says.
    pub const UPLOAD_STALL_CAP: std::time::Duration = std::time::Duration::from_secs(60);
    /// One message to the controller may take this long to be sent.
    pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

    pub fn upload_stall(&self) -> std::time::Duration {
        self.idle_timeout.min(Self::UPLOAD_STALL_CAP)
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: std::time::Duration::from_secs(Self::DEFAULT_HANDSHAKE_SECS),
            idle_timeout: std::time::Duration::from_secs(Self::DEFAULT_IDLE_SECS),
            max_sessions: Self::DEFAULT_MAX_SESSIONS,
        }
    }
}

/// Where the allowed roots were set, so a message names the place to change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootsFrom {
    /// `allowed_roots` in this config file.
    File(PathBuf),
    /// The agent's `--allowed-root` flags (they override the file).
    Flags,
}

impl RootsFrom {
    /// Short, for `check`: the file's path, or `--allowed-root flags`.
    pub fn label(&self) -> String {
        match self {
            RootsFrom::File(p) => p.display().to_string(),
            RootsFrom::Flags => "--allowed-root flags".into(),
        }
    }

    /// What to do to allow another path.
    pub fn hint(&self) -> String {
        match self {
            RootsFrom::File(p) => format!("add it to allowed_roots in {}", p.display()),
            RootsFrom::Flags => "this agent takes its roots from its --allowed-root flags \
                                 (they override the config file): add --allowed-root for it \
                                 where the agent is started"
                .into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Flags that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub allowed_roots: Vec<PathBuf>,
}

impl AgentConfig {
    /// Reads the file (the default one may be missing; an explicit `--config` may not),
    /// then applies the flags.
    pub fn load(over: &Overrides) -> Result<Self, ConfigError> {
        let (path, required) = match &over.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                FileConfig::default()
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let (allowed_roots, roots_from) = if over.allowed_roots.is_empty() {
            (
                file.allowed_roots.unwrap_or_default(),
                RootsFrom::File(path.clone()),
            )
        } else {
            (over.allowed_roots.clone(), RootsFrom::Flags)
        };
        if allowed_roots.is_empty() {
            return Err(ConfigError::Invalid(
                "no allowed roots: set `allowed_roots` in the config or pass --allowed-root PATH"
                    .into(),
            ));
        }
        let mut roots = Vec::new();
        for r in allowed_roots {
            if !r.is_absolute() || r.components().any(|c| c == Component::ParentDir) {
                return Err(ConfigError::Invalid(format!(
                    "allowed root {} must be an absolute path without `..`",
                    r.display()
                )));
            }
            // Resolve symlinks once at start so a later check compares real paths.
            roots.push(std::fs::canonicalize(&r).unwrap_or(r));
        }
        let secs = |v: Option<u64>, key: &str, default: u64| match v {
            Some(0) => Err(ConfigError::Invalid(format!(
                "{key} must be at least 1 (seconds)"
            ))),
            Some(n) if n > 86_400 => Err(ConfigError::Invalid(format!(
                "{key} = {n} is over a day; pick at most 86400 (seconds)"
            ))),
            Some(n) => Ok(std::time::Duration::from_secs(n)),
            None => Ok(std::time::Duration::from_secs(default)),
        };
        let sessions = SessionLimits {
            handshake_timeout: secs(
                file.handshake_timeout_secs,
                "handshake_timeout_secs",
                SessionLimits::DEFAULT_HANDSHAKE_SECS,
            )?,
            idle_timeout: secs(
                file.idle_timeout_secs,
                "idle_timeout_secs",
                SessionLimits::DEFAULT_IDLE_SECS,
            )?,
            max_sessions: match file.max_sessions {
                Some(n) if !(2..=4096).contains(&n) => {
                    return Err(ConfigError::Invalid(format!(
                        "max_sessions = {n}: pick between 2 and 4096"
                    )));
                }
                Some(n) => n,
                None => SessionLimits::DEFAULT_MAX_SESSIONS,
            },
        };
        Ok(Self {
            sessions,
            socket: over
                .socket
                .clone()
                .or(file.socket)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            socket_group: over.socket_group.clone().or(file.socket_group),
            allowed_roots: roots,
            roots_from,
            max_unpacked_bytes: file.max_unpacked_bytes.unwrap_or(10 << 30),
        })
    }

    /// Whether `deploy_to` lies inside an allowed root. The path must be absolute, free
    /// of `..`, and, as far as it exists, must not leave the root through a symlink.
    pub fn is_allowed(&self, deploy_to: &Path) -> bool {
        self.real_path(deploy_to).is_some()
    }

    /// The real path of `deploy_to` (symlinks resolved as far as it exists), if it lies
    /// inside an allowed root. Locks and layouts are keyed by this path, so two spellings
    /// of one directory (a symlink inside the root) are one app.
    pub fn real_path(&self, deploy_to: &Path) -> Option<PathBuf> {
        if !deploy_to.is_absolute()
            || deploy_to
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return None;
        }
        let real = resolve_existing_prefix(deploy_to);
        self.allowed_roots
            .iter()
            .any(|root| real.starts_with(root) && real != *root)
            .then_some(real)
    }
}

/// The gid of `socket_group`: a number is taken as is, a name is looked up through NSS
/// (`getgrnam`), so groups from LDAP or sssd count as well as those in /etc/group.
pub fn group_id(name: &str) -> Result<u32, ConfigError> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(ConfigError::Invalid(format!("no group named {name:?}"))),
        Err(e) => Err(ConfigError::Invalid(format!(
            "cannot look up group {name:?}: {e}"
        ))),
    }
}

/// Canonicalizes the longest existing prefix of `path` and appends the rest.
fn resolve_existing_prefix(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            let mut out = real;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (
            existing.file_name().map(|f| f.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(root: &Path) -> AgentConfig {
        AgentConfig::load(&Overrides {
            config: None,
            socket: Some("/tmp/x.sock".into()),
            socket_group: None,
            allowed_roots: vec![root.to_path_buf()],
        })
        .unwrap()
    }

    #[test]
    fn groups_are_looked_up_by_name_or_number() {
        // gid 0 has a name on every system; getgrgid gives it, getgrnam must map it back.
        let root = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(0))
            .unwrap()
            .unwrap();
        assert_eq!(group_id(&root.name).unwrap(), 0);
        assert_eq!(group_id("4242").unwrap(), 4242);
        let e = group_id("no-such-group-agent-unit")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-such-group-agent-unit"), "{e}");
    }

    #[test]
    fn flags_alone_are_enough() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.allowed_roots.len(), 1);
    }

    #[test]
    fn no_roots_is_an_error() {
        let err = AgentConfig::load(&Overrides {
            config: Some("/nonexistent/agent.toml".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent.toml"), "{err}");
    }

    #[test]
    fn unknown_key_in_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(&f, "allowed_roots = [\"/srv\"]\nsockett = \"/x\"\n").unwrap();
        let err = AgentConfig::load(&Overrides {
            config: Some(f),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("sockett"), "{err}");
    }

    #[test]
    fn deploy_to_must_stay_inside_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("srv");
        std::fs::create_dir(&root).unwrap();
        let c = cfg(&root);
        assert!(c.is_allowed(&root.join("myapp")));
        assert!(c.is_allowed(&root.join("a/b/c")));
        assert!(!c.is_allowed(&root), "the root itself is not an app dir");
        assert!(!c.is_allowed(&root.join("../etc")));
        assert!(!c.is_allowed(Path::new("/etc/myapp")));
        assert!(!c.is_allowed(Path::new("relative/app")));
        // a symlink inside the root that points out of it
        std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
        assert!(!c.is_allowed(&root.join("escape/app")));
    }

    #[test]
    fn two_spellings_of_one_app_dir_have_one_real_path() {
        // See: #16
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("srv");
        std::fs::create_dir_all(root.join("myapp")).unwrap();
        std::os::unix::fs::symlink(root.join("myapp"), root.join("alias")).unwrap();
        let c = cfg(&root);
        let a = c.real_path(&root.join("myapp")).unwrap();
        assert_eq!(c.real_path(&root.join("alias")), Some(a.clone()));
        assert_eq!(c.real_path(&root.join("alias/../myapp")), None);
    }

    // See: #18
    #[test]
    fn messages_name_where_the_roots_were_set() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.toml");
        std::fs::write(&f, format!("allowed_roots = [{:?}]\n", dir.path())).unwrap();
        let from_file = AgentConfig::load(&Overrides {
            config: Some(f.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(from_file.roots_from, RootsFrom::File(f.clone()));
        assert!(
            from_file
                .roots_from
                .hint()
                .contains(&f.display().to_string())
        );
        // Flags override the file, and the message says so.
        let from_flags = AgentConfig::load(&Overrides {
            config: Some(f),
            allowed_roots: vec![dir.path().to_path_buf()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(from_flags.roots_from, RootsFrom::Flags);
        assert!(from_flags.roots_from.hint().contains("--allowed-root"));
        assert!(!from_flags.roots_from.hint().contains("agent.toml"));
    }

    #[test]
    fn session_limits_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| {
            let f = dir.path().join("agent.toml");
            std::fs::write(&f, text).unwrap();
            AgentConfig::load(&Overrides {
                config: Some(f),
                allowed_roots: vec![dir.path().to_path_buf()],
                ..Default::default()
            })
        };
        let c = load("idle_timeout_secs = 3\nmax_sessions = 10\n").unwrap();
        assert_eq!(c.sessions.idle_timeout, std::time::Duration::from_secs(3));
        assert_eq!(c.sessions.max_sessions, 10);
        assert_eq!(
            c.sessions.handshake_timeout,
            std::time::Duration::from_secs(SessionLimits::DEFAULT_HANDSHAKE_SECS)
        );
        let e = load("idle_timeout_secs = 0\n").unwrap_err().to_string();
        assert!(e.contains("idle_timeout_secs"), "{e}");
        let e = load("max_sessions = 1\n").unwrap_err().to_string();
        assert!(e.contains("max_sessions"), "{e}");
    }
}
