//! `deploy.toml`: reading, checking and resolving the controller's configuration.
//!
//! [`Config::load`] / [`Config::parse`] read the file and check every key and value of
//! every environment; [`Config::environment`] returns one fully resolved [`Environment`].
//! There is no default environment: every command names one.
//!
//! # Where a value comes from
//!
//! For the selected environment each key is taken from the first of:
//!
//! 1. a `DEPLOYCTL_*` environment variable (see [`ENV_OVERRIDES`]; empty values are ignored),
//! 2. `[environments.NAME]` and its sub-tables,
//! 3. `[defaults]` and its sub-tables,
//! 4. the top level (`deploy_to` only),
//! 5. the built-in default (documented on each [`Environment`] field).
//!
//! Tables (`release`, `health`, `rollout`, `verify`, `compose`, `cutover`) merge key by key, so
//! `[environments.x.health] url = "..."` keeps the default `retries`. Arrays replace,
//! they are not concatenated. Command-line flags are applied by the caller afterwards:
//! every field of [`Environment`] is public.
//!
//! # Strings
//!
//! `${VAR}` in any string value read from the file is replaced by the variable's value.
//! `$${` is a literal `${` (so `$${HOME}` reaches the server as `${HOME}`); a `$` not
//! followed by `{` is kept as is. Variables whose name starts with `DEPLOY_`
//! (`${DEPLOY_PORT}`, `${DEPLOY_INSTANCE}`, ...) are left untouched for the agent.
//! Expansion happens when an environment is resolved: a variable that is unset is an
//! error (naming the variable, key and line) only for the environments that use it, so a
//! staging job does not need production's variables. `DEPLOYCTL_*` values are taken
//! literally. `~` / `~/` at the start of `ssh_key`, `known_hosts` and `ssh_config`
//! becomes `$HOME`. Relative paths (`release.artifact`, `compose.files`,
//! `compose.env_file`) are kept as written, i.e. relative to the directory deployctl runs
//! in.
//!
//! # Errors
//!
//! Every [`ConfigError`] names the key and where its value came from: `deploy.toml:12`,
//! or the `DEPLOYCTL_*` variable that set it.
//!
//! # Reading
//!
//! serde reads the file into `Layer`s (`deny_unknown_fields`: an unknown key is an error
//! with a "did you mean"); each value keeps its dotted key and line. A key is declared
//! once, as a field in the `layers!` list, which also gives the key-by-key merge; its
//! default and checks are in `Config::resolve`, and a `DEPLOYCTL_*` override of it is a
//! row of [`ENV_OVERRIDES`] (read by serde too, as the type the field wants).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv6Addr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

pub use crate::ssh::config::{Jump, Source as SshConfigSource};

/// Environment variables that override one key of the selected environment for one run.
///
/// | variable | key |
/// | --- | --- |
/// | `DEPLOYCTL_DEPLOY_TO` | `deploy_to` |
/// | `DEPLOYCTL_HOSTS` | `hosts` (comma-separated) |
/// | `DEPLOYCTL_USER` | `user` |
/// | `DEPLOYCTL_SSH_KEY_PATH` | `ssh_key` |
/// | `DEPLOYCTL_KNOWN_HOSTS` | `known_hosts` |
/// | `DEPLOYCTL_ACCEPT_NEW_HOST_KEYS` | `accept_new_host_keys` (`true`/`false`/`1`/`0`/`yes`/`no`) |
/// | `DEPLOYCTL_AGENT_SOCKET` | `agent_socket` |
/// | `DEPLOYCTL_AGENT_BIN` | `agent_bin` |
/// | `DEPLOYCTL_CONNECT_TIMEOUT` | `connect_timeout` |
/// | `DEPLOYCTL_CONNECT_RETRIES` | `connect_retries` |
/// | `DEPLOYCTL_STRATEGY` | `strategy` |
/// | `DEPLOYCTL_KEEP_RELEASES` | `keep_releases` |
/// | `DEPLOYCTL_MAX_PARALLEL` | `max_parallel` |
/// | `DEPLOYCTL_CONFIRM` | `confirm` |
/// | `DEPLOYCTL_ARTIFACT` | `release.artifact` |
/// | `DEPLOYCTL_RELEASE_TIMEOUT` | `release.timeout` |
/// | `DEPLOYCTL_MAX_UNPACKED_SIZE` | `release.max_unpacked_size` |
/// | `DEPLOYCTL_HEALTH_URL` | `health.url` |
/// | `DEPLOYCTL_HEALTH_EXPECT_STATUS` | `health.expect_status` |
/// | `DEPLOYCTL_HEALTH_RETRIES` | `health.retries` |
/// | `DEPLOYCTL_HEALTH_INTERVAL` | `health.interval` |
/// | `DEPLOYCTL_HEALTH_REQUEST_TIMEOUT` | `health.request_timeout` |
/// | `DEPLOYCTL_BATCH` | `rollout.batch` (`3` or `25%`) |
/// | `DEPLOYCTL_CANARY` | `rollout.canary` |
/// | `DEPLOYCTL_ON_FAILURE` | `rollout.on_failure` |
/// | `DEPLOYCTL_VERIFY_URLS` | `verify.urls` (comma-separated) |
/// | `DEPLOYCTL_COMPOSE_FILES` | `compose.files` (comma-separated) |
/// | `DEPLOYCTL_COMPOSE_ENV_FILE` | `compose.env_file` |
/// | `DEPLOYCTL_COMPOSE_PROJECT` | `compose.project` |
/// | `DEPLOYCTL_COMPOSE_PULL` | `compose.pull` |
/// | `DEPLOYCTL_COMPOSE_COMMAND` | `compose.compose_command` |
///
/// `DEPLOYCTL_SSH_KEY` is deliberately absent: it holds private key *text* (a CI secret)
/// and is read by the SSH layer, not by the config.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("DEPLOYCTL_DEPLOY_TO", "deploy_to"),
    ("DEPLOYCTL_HOSTS", "hosts"),
    ("DEPLOYCTL_USER", "user"),
    ("DEPLOYCTL_SSH_KEY_PATH", "ssh_key"),
    ("DEPLOYCTL_KNOWN_HOSTS", "known_hosts"),
    ("DEPLOYCTL_ACCEPT_NEW_HOST_KEYS", "accept_new_host_keys"),
    ("DEPLOYCTL_AGENT_SOCKET", "agent_socket"),
    ("DEPLOYCTL_AGENT_BIN", "agent_bin"),
    ("DEPLOYCTL_CONNECT_TIMEOUT", "connect_timeout"),
    ("DEPLOYCTL_CONNECT_RETRIES", "connect_retries"),
    ("DEPLOYCTL_STRATEGY", "strategy"),
    ("DEPLOYCTL_KEEP_RELEASES", "keep_releases"),
    ("DEPLOYCTL_MAX_PARALLEL", "max_parallel"),
    ("DEPLOYCTL_CONFIRM", "confirm"),
    ("DEPLOYCTL_ARTIFACT", "release.artifact"),
    ("DEPLOYCTL_RELEASE_TIMEOUT", "release.timeout"),
    ("DEPLOYCTL_MAX_UNPACKED_SIZE", "release.max_unpacked_size"),
    ("DEPLOYCTL_HEALTH_URL", "health.url"),
    ("DEPLOYCTL_HEALTH_EXPECT_STATUS", "health.expect_status"),
    ("DEPLOYCTL_HEALTH_RETRIES", "health.retries"),
    ("DEPLOYCTL_HEALTH_INTERVAL", "health.interval"),
    ("DEPLOYCTL_HEALTH_REQUEST_TIMEOUT", "health.request_timeout"),
    ("DEPLOYCTL_BATCH", "rollout.batch"),
    ("DEPLOYCTL_CANARY", "rollout.canary"),
    ("DEPLOYCTL_ON_FAILURE", "rollout.on_failure"),
    ("DEPLOYCTL_VERIFY_URLS", "verify.urls"),
    ("DEPLOYCTL_COMPOSE_FILES", "compose.files"),
    ("DEPLOYCTL_COMPOSE_ENV_FILE", "compose.env_file"),
    ("DEPLOYCTL_COMPOSE_PROJECT", "compose.project"),
    ("DEPLOYCTL_COMPOSE_PULL", "compose.pull"),
    ("DEPLOYCTL_COMPOSE_COMMAND", "compose.compose_command"),
];

const DEFAULT_AGENT_SOCKET: &str = "/run/deploy-agent/agent.sock";
const DEFAULT_AGENT_BIN: &str = "deploy-agent";
const DEFAULT_MAX_UNPACKED_BYTES: u64 = 10 << 30;

// ---------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------

/// Where a value (or an error) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A line of the config file (1-based).
    Line { file: String, line: usize },
    /// The config file as a whole (e.g. a missing top-level key).
    File { file: String },
    /// A `DEPLOYCTL_*` override.
    EnvVar { var: String },
    /// A built-in default.
    BuiltIn,
}

impl Location {
    fn line(&self) -> Option<usize> {
        match self {
            Location::Line { line, .. } => Some(*line),
            _ => None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line { file, line } => write!(f, "{file}:{line}"),
            Location::File { file } => write!(f, "{file}"),
            Location::EnvVar { var } => write!(f, "environment variable {var}"),
            Location::BuiltIn => write!(f, "built-in default"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{at}: {message}")]
    Syntax { at: Location, message: String },
    #[error("{at}: unknown key `{key}` {}{hint}", table_words(table))]
    UnknownKey {
        at: Location,
        key: String,
        /// Dotted path of the table, e.g. `environments.staging.health`; empty for the
        /// top level.
        table: String,
        /// Empty, or ` (did you mean `hosts`?)` and the like.
        hint: String,
    },
    /// A key is present with a bad value, or a required key is missing.
    /// `key` is the full dotted path, e.g. `environments.staging.health.retries`.
    #[error("{at}: `{key}`: {message}")]
    Invalid {
        at: Location,
        key: String,
        message: String,
    },
    #[error("{at}: `{key}`: environment variable `{var}` is not set")]
    UnsetVar {
        at: Location,
        key: String,
        var: String,
    },
    #[error("no environment named `{name}` (known: {})", known.join(", "))]
    UnknownEnvironment { name: String, known: Vec<String> },
}

fn table_words(table: &str) -> String {
    if table.is_empty() {
        "at the top level".to_string()
    } else {
        format!("in [{table}]")
    }
}

impl ConfigError {
    /// The 1-based line in the config file the error points at, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Syntax { at, .. }
            | ConfigError::UnknownKey { at, .. }
            | ConfigError::Invalid { at, .. }
            | ConfigError::UnsetVar { at, .. } => at.line(),
            _ => None,
        }
    }
}

/// A deploy target: `local` (the agent socket on this machine, no SSH) or
/// `[user@]host[:port]`, with IPv6 addresses in brackets (`[::1]:2222`, `deploy@[::1]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Local,
    Ssh {
        /// From the host string; wins over [`Environment::user`].
        user: Option<String>,
        /// Host name or IP address; IPv6 without brackets.
        host: String,
        port: u16,
    },
}

impl Host {
    pub const DEFAULT_PORT: u16 = 22;

    /// The user to log in as: the one in the host string, else `default`.
    pub fn user_or<'a>(&'a self, default: &'a str) -> &'a str {
        match self {
            Host::Ssh {
                user: Some(user), ..
            } => user,
            _ => default,
        }
    }

    /// The machine, without the user: `local`, `prod-1`, `[::1]:2222`.
    pub fn address(&self) -> String {
        match self {
            Host::Local => "local".to_string(),
            Host::Ssh { host, port, .. } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                if *port == Host::DEFAULT_PORT {
                    host
                } else {
                    format!("{host}:{port}")
                }
            }
        }
    }
}

impl fmt::Display for Host {
    /// Canonical form: `local`, or `[user@]host[:port]` with the port left out when it is
    /// 22 and IPv6 addresses bracketed and in their shortest form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Host::Ssh {
            user: Some(user), ..
        } = self
        {
            write!(f, "{user}@")?;
        }
        f.write_str(&self.address())
    }
}

impl FromStr for Host {
    type Err = String;

    fn from_str(s: &str) -> Result<Host, String> {
        if s == "local" {
            return Ok(Host::Local);
        }
        if s.is_empty() {
            return Err("empty host".into());
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("contains whitespace".into());
        }
        let (user, rest) = match s.split_once('@') {
            Some((user, rest)) => {
                check_user(user)?;
                (Some(user.to_string()), rest)
            }
            None => (None, s),
        };
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (addr, after) = inner
                .split_once(']')
                .ok_or("missing `]` after the IPv6 address")?;
            let addr: Ipv6Addr = addr
                .parse()
                .map_err(|_| format!("`{addr}` is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or("expected `:PORT` after `]`")?,
                ),
            };
            (addr.to_string(), port)
        } else if rest.matches(':').count() > 1 {
            return Err("IPv6 addresses need brackets, e.g. `[::1]:2222` or `user@[::1]`".into());
        } else {
            let (host, port) = match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            };
            check_hostname(host)?;
            (host.to_string(), port)
        };
        if host == "local" {
            return Err("`local` means this machine without SSH; it takes no user or port".into());
        }
        let port = match port {
            None => Host::DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(format!("bad port `{p}` (expected 1-65535)")),
            },
        };
        Ok(Host::Ssh { user, host, port })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// A tarball unpacked into `releases/<id>` (`strategy = "release"`).
    Release,
    /// `docker compose` files and env file (`strategy = "compose"`).
    Compose,
}

/// `rollout.batch`: how many hosts take the release before the next wave starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// `batch = 2`: at least 1.
    Count(u32),
    /// `batch = "25%"`: 1 to 100.
    Percent(u8),
}

impl Batch {
    /// Hosts per wave for a fleet of `hosts` hosts: never 0, never more than `hosts`
    /// (percentages round up).
    pub fn size(self, hosts: usize) -> usize {
        let n = match self {
            Batch::Count(c) => c as usize,
            Batch::Percent(p) => (hosts * p as usize).div_ceil(100),
        };
        n.clamp(1, hosts.max(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// `"rollback-all"`: hosts that took the new release go back to their previous one.
    RollbackAll,
    /// `"stop"`: stop the rollout and leave hosts as they are.
    Stop,
}

/// `[release]`: the release strategy's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseConfig {
    /// Local tarball to upload; `--artifact` overrides. Default: none.
    pub artifact: Option<PathBuf>,
    /// Paths (relative, no `..`) linked from `<deploy_to>/shared`. Default: `[]`.
    pub shared: Vec<String>,
    /// Run in the new release dir before the switch. Default: none.
    pub migrate: Option<String>,
    /// Run after the switch. Default: none.
    pub restart: Option<String>,
    /// Run when a review-app instance is destroyed. Default: none.
    pub stop: Option<String>,
    /// Per command. Default `5m`.
    pub timeout: Duration,
    /// Cap on an archive's unpacked size. Key `max_unpacked_size`: bytes as an integer,
    /// or a string like `"10GiB"` / `"500MB"` (KiB/MiB/GiB/TiB are 1024-based,
    /// KB/MB/GB/TB 1000-based). Default `10GiB`.
    pub max_unpacked_bytes: u64,
    /// Where `deployctl logs` reads: `{ unit = "myapp" }` or `{ files = ["log/*.log"] }`.
    /// Default: none.
    pub logs: Option<LogsConfig>,
    /// `hooks = { before_switch, after_live, on_failure }`. Default: none.
    pub hooks: HooksConfig,
}

/// `[release] logs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogsConfig {
    /// The systemd journal of this unit.
    Unit(String),
    /// Globs relative to the current release.
    Files(Vec<String>),
}

/// `[release] hooks`: commands the agent runs in the release dir with the deploy
/// variables. `before_switch` failing stops the deploy before the switch; `after_live`
/// and `on_failure` (with `DEPLOY_OUTCOME`) never change the outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HooksConfig {
    pub before_switch: Option<String>,
    pub after_live: Option<String>,
    pub on_failure: Option<String>,
}

/// `[notify]`: the webhooks the agent posts each outcome to (`webhook`, then
/// `webhooks`). The URLs are secrets (Slack's carry a token): `Debug` hides them.
#[derive(Clone, PartialEq, Eq)]
pub struct NotifyConfig {
    pub webhooks: Vec<String>,
}

impl fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NotifyConfig {{ webhooks: [{} hidden] }}",
            self.webhooks.len()
        )
    }
}

/// `[health]`: checked by the agent, on the server. Present only when `url` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// May contain `${DEPLOY_PORT}` / `${DEPLOY_INSTANCE}`, left for the agent.
    pub url: String,
    /// Default 200.
    pub expect_status: u16,
    /// Default 12.
    pub retries: u32,
    /// Default `5s`.
    pub interval: Duration,
    /// Default `3s`.
    pub request_timeout: Duration,
    /// `watch`: after a deploy went live, the agent keeps checking `url` every
    /// `interval` for this long and rolls back on its own (see `watch_failures`).
    /// Default 0: no watch.
    pub watch: Duration,
    /// `watch_failures`: consecutive failed checks during the watch that roll back.
    /// Default 3, at least 1.
    pub watch_failures: u32,
}

/// `rollout`: waves across hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutConfig {
    /// Default `100%`: one wave of every host, `max_parallel` at a time.
    pub batch: Batch,
    /// Deploy to the first host alone before the rest. Default false.
    pub canary: bool,
    /// Default `rollback-all`.
    pub on_failure: OnFailure,
}

/// `[verify]`: URLs polled by the controller after the rollout. Present only when `urls`
/// is not empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyConfig {
    pub urls: Vec<String>,
    /// Default 9.
    pub retries: u32,
    /// Default `5s`.
    pub interval: Duration,
    /// Default 200.
    pub expect_status: u16,
    /// Default `10s`.
    pub request_timeout: Duration,
}

/// `[compose]`: the compose strategy's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeConfig {
    /// Default `["docker-compose.yml"]`.
    pub files: Vec<PathBuf>,
    /// Default: none.
    pub env_file: Option<PathBuf>,
    /// Default: the app name. Review-app instances use `<project>-<instance>`.
    pub project: String,
    /// Default true.
    pub pull: bool,
    /// `"docker compose"` or `"docker-compose"`; none = detect.
    pub compose_command: Option<String>,
    /// `zero_downtime = ["web"]`: services rolled out beside the old container instead
    /// of recreated. Default `[]`. Each must define a healthcheck and publish no fixed
    /// host port: checked against the compose files (`compose.rs`) before a push.
    pub zero_downtime: Vec<String>,
    /// `drain = "2s"`: how long the old and the new container of a `zero_downtime`
    /// service both serve before the old one is stopped (the proxy's DNS cache must
    /// expire within it). None: the agent's default, 2 s.
    pub drain: Option<Duration>,
}

/// Review apps: present when `instances = true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancesConfig {
    /// `instance_ports = "4100-4199"` (required).
    pub ports: RangeInclusive<u16>,
    /// `instance_ttl = "7d"`: idle instances expire. None: never.
    pub ttl: Option<Duration>,
    /// `url_template`, `${DEPLOY_*}` left literal.
    pub url_template: Option<String>,
}

/// `[cutover]`: blue/green slots for the release strategy. Present when any of its keys
/// is set; `ports`, `start`, `stop` and `switch` are then required. `strategy =
/// "compose"`, `instances = true`, and a `release.restart` written at the same level
/// (the same environment, or both in `[defaults]`) are refused beside it (exit 2); a
/// `restart` inherited from `[defaults.release]` is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutoverConfig {
    /// Exactly two distinct ports (1-65535).
    pub ports: [u16; 2],
    /// Starts the slot `${DEPLOY_PORT}`; returns once it is launched.
    pub start: String,
    /// Stops the slot `${DEPLOY_PORT}`; must succeed when nothing runs there.
    pub stop: String,
    /// Points the proxy at `${DEPLOY_PORT}`.
    pub switch: String,
    /// How long the old slot keeps running after the switch. Default `10s`.
    pub drain: Duration,
}

/// One environment, fully resolved. CLI flags may overwrite fields after resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub name: String,
    pub app: String,
    /// Absolute, no `..`, not `/`.
    pub deploy_to: String,
    /// At least one; no machine twice.
    pub hosts: Vec<Host>,
    /// Default: `$USER`, else `root`. A user in the host string wins.
    pub user: String,
    /// Default: none (then `DEPLOYCTL_SSH_KEY` / ssh-agent, decided by the SSH layer).
    pub ssh_key: Option<PathBuf>,
    /// Default `~/.ssh/known_hosts`.
    pub known_hosts: PathBuf,
    /// Default false.
    pub accept_new_host_keys: bool,
    /// `ssh_config`: the OpenSSH client config to read for `Host` settings. Default
    /// `~/.ssh/config` (when it exists); `ssh_config = false`: none.
    pub ssh_config: SshConfigSource,
    /// `proxy_jump = "[user@]host[:port][,more hops]"`: jump hosts, first to last
    /// (`"none"`: an empty list, whatever the ssh config says). Default: none set, the
    /// ssh config decides.
    pub proxy_jump: Option<Vec<Jump>>,
    /// `user` was set (file or `DEPLOYCTL_USER`), not defaulted: it then wins over the ssh
    /// config's `User`.
    pub user_set: bool,
    /// `known_hosts` was set (file or `DEPLOYCTL_KNOWN_HOSTS`), not defaulted: it then wins
    /// over the ssh config's `UserKnownHostsFile`.
    pub known_hosts_set: bool,
    /// Agent socket path on the server. Default `/run/deploy-agent/agent.sock`.
    pub agent_socket: String,
    /// Agent binary on the server, for the `deploy-agent bridge` fallback.
    /// Default `deploy-agent`.
    pub agent_bin: String,
    /// Default `10s`.
    pub connect_timeout: Duration,
    /// Retries after the first attempt on DNS/connect errors. Default 5.
    pub connect_retries: u32,
    /// Default `release`.
    pub strategy: Strategy,
    /// At least 1. Default 5.
    pub keep_releases: u32,
    /// At least 1. Default 10.
    pub max_parallel: u32,
    /// Ask before deploying. Default false.
    pub confirm: bool,
    pub release: ReleaseConfig,
    pub health: Option<HealthConfig>,
    pub rollout: RolloutConfig,
    pub verify: Option<VerifyConfig>,
    pub compose: ComposeConfig,
    pub instances: Option<InstancesConfig>,
    /// `[notify]`: present when at least one webhook is set.
    pub notify: Option<NotifyConfig>,
    /// `[cutover]`: blue/green slots. Default: none (a plain `restart`).
    pub cutover: Option<CutoverConfig>,
    /// The review-app instance this run is about (`--instance NAME`), checked against
    /// `instances`. Never set from the file.
    pub instance: Option<String>,
    /// Another environment's name.
    pub promote_from: Option<String>,
    /// Names of variables whose values are masked in output. Default `[]`.
    pub secrets: Vec<String>,
}

/// A parsed and checked `deploy.toml`. Resolve an environment with
/// [`Config::environment`].
#[derive(Clone)]
pub struct Config {
    pub app: String,
    /// The file it was read from (or the `origin` given to [`Config::parse`]).
    pub path: PathBuf,
    deploy_to: Opt<String>,
    defaults: Layer,
    environments: BTreeMap<String, RawEnv>,
    /// Every variable the file refers to, plus `USER`, `HOME` and [`ENV_OVERRIDES`],
    /// looked up once at parse time.
    vars: BTreeMap<String, Option<String>>,
}

impl fmt::Debug for Config {
    // `vars` may hold secrets: leave it out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("app", &self.app)
            .field("path", &self.path)
            .field("environments", &self.environment_names())
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads and checks `path`. `env` looks up environment variables; production passes
    /// `&|k| std::env::var(k).ok()`.
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string(), env)
    }

    /// Parses and checks `text`; `origin` names the file in messages.
    ///
    /// Every environment is resolved once (without `DEPLOYCTL_*` overrides) so a mistake
    /// anywhere in the file is reported now; only unset `${VAR}`s wait until that
    /// environment is selected.
    pub fn parse(
        text: &str,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut source = Source::new(origin, text);
        let doc = DeTable::parse(text).map_err(|e| match e.span() {
            Some(span) => ConfigError::Syntax {
                message: format!("{} (in `{}`)", e.message(), source.line_text(span.start)),
                at: source.at(span.start),
            },
            None => ConfigError::Syntax {
                at: source.whole_file(),
                message: e.message().to_string(),
            },
        })?;
        source.index(doc.get_ref(), "");
        let mut names = BTreeSet::new();
        collect_refs_table(doc.get_ref(), &mut names);
        names.extend(["USER", "HOME"].map(String::from));
        names.extend(ENV_OVERRIDES.iter().map(|(var, _)| var.to_string()));
        let vars = names
            .into_iter()
            .map(|name| {
                let value = env(&name);
                (name, value)
            })
            .collect();

        let source = Rc::new(source);
        let raw: RawFile = source.read(doc)?;
        // `[defaults]` is a layer like any environment, but these keys belong to one.
        let d = &raw.defaults;
        let per_env = "not allowed in [defaults]: set it per environment";
        let refused = [
            d.deploy_to.as_ref().map(|v| {
                v.invalid("not allowed in [defaults]: set it at the top level or per environment")
            }),
            d.hosts.as_ref().map(|v| v.invalid(per_env)),
            d.promote_from.as_ref().map(|v| v.invalid(per_env)),
        ];
        if let Some(e) = refused.into_iter().flatten().min_by_key(ConfigError::line) {
            return Err(e);
        }
        let mut environments = BTreeMap::new();
        for (name, layer) in raw.environments {
            let at = source.at(name.span().start);
            let name = name.into_inner();
            check_name(&name).map_err(|m| ConfigError::Invalid {
                at: at.clone(),
                key: format!("environments.{name}"),
                message: format!("bad environment name: {m}"),
            })?;
            environments.insert(name, RawEnv { layer, at });
        }

        let mut config = Config {
            app: String::new(),
            path: PathBuf::from(origin),
            deploy_to: raw.deploy_to,
            defaults: raw.defaults,
            environments,
            vars,
        };
        let app = raw.app.ok_or_else(|| ConfigError::Invalid {
            at: source.whole_file(),
            key: "app".into(),
            message: "missing: set `app = \"NAME\"` at the top level".into(),
        })?;
        config.app = config.resolver().expand(&app)?;
        check_name(&config.app).map_err(|m| app.invalid(m))?;
        if config.environments.is_empty() {
            return Err(ConfigError::Invalid {
                at: source.whole_file(),
                key: "environments".into(),
                message: "no environments: add an [environments.NAME] table".into(),
            });
        }
        for (name, raw) in &config.environments {
            match config.resolve(name, raw, Layer::default()) {
                Ok(_) | Err(ConfigError::UnsetVar { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(config)
    }

    /// The environment `name`, fully resolved, with `DEPLOYCTL_*` overrides applied.
    pub fn environment(&self, name: &str) -> Result<Environment, ConfigError> {
        let raw = self
            .environments
            .get(name)
            .ok_or_else(|| ConfigError::UnknownEnvironment {
                name: name.to_string(),
                known: self.environment_names(),
            })?;
        self.resolve(name, raw, self.overrides()?)
    }

    /// Names of the environments, sorted.
    pub fn environment_names(&self) -> Vec<String> {
        self.environments.keys().cloned().collect()
    }

    fn resolver(&self) -> Resolver<'_> {
        Resolver { vars: &self.vars }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).and_then(|v| v.as_deref())
    }

    fn overrides(&self) -> Result<Layer, ConfigError> {
        let mut layer = Layer::default();
        for (var, key) in ENV_OVERRIDES {
            match self.var(var) {
                Some(value) if !value.is_empty() => {
                    layer = layer.merge(override_layer(var, key, value)?);
                }
                _ => {}
            }
        }
        Ok(layer)
    }

    fn resolve(
        &self,
        name: &str,
        raw: &RawEnv,
        overrides: Layer,
    ) -> Result<Environment, ConfigError> {
        let l = self
            .defaults
            .clone()
            .merge(raw.layer.clone())
            .merge(overrides);
        let r = self.resolver();
        let missing = |key: &str, message: &str| ConfigError::Invalid {
            at: raw.at.clone(),
            key: format!("environments.{name}.{key}"),
            message: message.to_string(),
        };

        let deploy_to_val = l
            .deploy_to
            .as_ref()
            .or(self.deploy_to.as_ref())
            .ok_or_else(|| {
                missing(
                    "deploy_to",
                    "missing: set `deploy_to` at the top level or in this environment",
                )
            })?;
        let deploy_to = r.expand(deploy_to_val)?;
        check_deploy_to(&deploy_to).map_err(|m| deploy_to_val.invalid(m))?;

        let hosts_val = l
            .hosts
            .as_ref()
            .ok_or_else(|| missing("hosts", "missing: every environment needs `hosts = [...]`"))?;
        if hosts_val.v.is_empty() {
            return Err(hosts_val.invalid("an environment needs at least one host"));
        }
        let mut hosts = Vec::new();
        let mut seen = BTreeSet::new();
        for h in &hosts_val.v {
            let s = r.expand(h)?;
            let host: Host = s
                .parse()
                .map_err(|m| h.invalid(format!("bad host `{s}`: {m}")))?;
            if !seen.insert(host.address()) {
                return Err(h.invalid(format!("host `{}` is listed twice", host.address())));
            }
            hosts.push(host);
        }

        let user = match &l.user {
            Some(v) => {
                let user = r.expand(v)?;
                check_user(&user).map_err(|m| v.invalid(m))?;
                user
            }
            None => match self.var("USER") {
                Some(u) if !u.is_empty() => u.to_string(),
                _ => "root".to_string(),
            },
        };
        let ssh_key = l.ssh_key.as_ref().map(|v| r.path(v)).transpose()?;
        let known_hosts = match &l.known_hosts {
            Some(v) => r.path(v)?,
            None => match self.var("HOME") {
                Some(home) => Path::new(home).join(".ssh/known_hosts"),
                None if hosts.iter().all(|h| *h == Host::Local) => "~/.ssh/known_hosts".into(),
                None => {
                    return Err(ConfigError::UnsetVar {
                        at: Location::BuiltIn,
                        key: "known_hosts".into(),
                        var: "HOME".into(),
                    });
                }
            },
        };
        let accept_new_host_keys = r.boolean(&l.accept_new_host_keys, false);
        let ssh_config = match &l.ssh_config {
            Some(v) => match &v.v.0 {
                None => SshConfigSource::Off,
                Some(s) => SshConfigSource::Given(r.path(&v.with(s.clone()))?),
            },
            None => match self.var("HOME") {
                Some(home) => SshConfigSource::Default(Path::new(home).join(".ssh/config")),
                None => SshConfigSource::Off,
            },
        };
        let proxy_jump = match &l.proxy_jump {
            Some(v) => Some(crate::ssh::config::parse_jumps(&r.expand(v)?).map_err(|m| {
                v.invalid(format!(
                    "{m}; expected \"[user@]host[:port]\", several separated by \
                             commas, or \"none\""
                ))
            })?),
            None => None,
        };
        let agent_socket = match &l.agent_socket {
            Some(v) => {
                let s = r.expand(v)?;
                if !s.starts_with('/') {
                    return Err(v.invalid(format!("`{s}` is not an absolute path")));
                }
                s
            }
            None => DEFAULT_AGENT_SOCKET.to_string(),
        };
        let agent_bin = match &l.agent_bin {
            Some(v) => {
                let s = r.expand(v)?;
                let ok = !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "/._+-".contains(c));
                if !ok {
                    return Err(v.invalid(format!(
                        "`{s}` is not a usable program path (letters, digits, `/._+-`)"
                    )));
                }
                s
            }
            None => DEFAULT_AGENT_BIN.to_string(),
        };
        let connect_timeout = r.duration(&l.connect_timeout, Duration::from_secs(10), false)?;
        let connect_retries = r.uint(&l.connect_retries, 5, 0)?;
        let strategy = match &l.strategy {
            None => Strategy::Release,
            Some(v) => match r.expand(v)?.as_str() {
                "release" => Strategy::Release,
                "compose" => Strategy::Compose,
                other => {
                    return Err(v.invalid(format!(
                        "unknown strategy `{other}` (expected \"release\" or \"compose\")"
                    )));
                }
            },
        };
        let keep_releases = r.uint(&l.keep_releases, 5, 1)?;
        let max_parallel = r.uint(&l.max_parallel, 10, 1)?;
        let confirm = r.boolean(&l.confirm, false);

        let promote_from = match &l.promote_from {
            None => None,
            Some(v) => {
                let from = r.expand(v)?;
                if from == name {
                    return Err(v.invalid("an environment cannot promote from itself"));
                }
                if !self.environments.contains_key(&from) {
                    return Err(v.invalid(format!(
                        "no environment named `{from}` (known: {})",
                        self.environment_names().join(", ")
                    )));
                }
                Some(from)
            }
        };
        let secrets = r.list(&l.secrets, |s| {
            if is_var_name(s) {
                Ok(())
            } else {
                Err(format!("`{s}` is not a variable name"))
            }
        })?;

        let release = l.release.resolve(&r)?;
        let health = l.health.resolve(&r)?;
        let rollout = l.rollout.resolve(&r)?;
        let verify = l.verify.resolve(&r)?;
        let compose = l.compose.resolve(&r, &self.app)?;
        let instances = l.instances(&r)?;
        let notify = l.notify.resolve(&r)?;
        let cutover = l.cutover.resolve(&r)?;
        if let Some(key) = l.cutover.first_key() {
            // A `restart` written beside `[cutover]` (same environment, or both in
            // [defaults]) is a mistake; one inherited from [defaults.release] is not used.
            let level = |k: &str, table: &str| k.split_once(table).map(|(l, _)| l.to_owned());
            let clash = if let Some(v) = l
                .release
                .restart
                .as_ref()
                .filter(|v| level(&v.key, ".release.") == level(&key.key, ".cutover."))
            {
                Some(v.invalid(
                    "not used with [cutover] (the new slot is started with `cutover.start`); \
                     remove `restart` here",
                ))
            } else if strategy == Strategy::Compose {
                Some(key.invalid(
                    "[cutover] is for the release strategy; compose uses \
                     `compose.zero_downtime`",
                ))
            } else if instances.is_some() {
                Some(key.invalid(
                    "[cutover] cannot be combined with `instances = true`: review-app \
                     instances keep their own port from `instance_ports`",
                ))
            } else {
                None
            };
            if let Some(e) = clash {
                return Err(e);
            }
        }

        Ok(Environment {
            name: name.to_string(),
            app: self.app.clone(),
            deploy_to,
            hosts,
            user,
            ssh_key,
            known_hosts,
            accept_new_host_keys,
            ssh_config,
            proxy_jump,
            user_set: l.user.is_some(),
            known_hosts_set: l.known_hosts.is_some(),
            agent_socket,
            agent_bin,
            connect_timeout,
            connect_retries,
            strategy,
            keep_releases,
            max_parallel,
            confirm,
            release,
            health,
            rollout,
            verify,
            compose,
            instances,
            notify,
            cutover,
            instance: None,
            promote_from,
            secrets: secrets.unwrap_or_default(),
        })
    }
}

// Each table's defaults and checks, resolved from the merged layer.

impl ReleaseLayer {
    fn resolve(&self, r: &Resolver<'_>) -> Result<ReleaseConfig, ConfigError> {
        Ok(ReleaseConfig {
            artifact: r.opt_string(&self.artifact)?.map(PathBuf::from),
            shared: r.list(&self.shared, check_relative)?.unwrap_or_default(),
            migrate: r.opt_string(&self.migrate)?,
            restart: r.opt_string(&self.restart)?,
            stop: r.opt_string(&self.stop)?,
            timeout: r.duration(&self.timeout, Duration::from_secs(300), false)?,
            max_unpacked_bytes: match &self.max_unpacked_size {
                None => DEFAULT_MAX_UNPACKED_BYTES,
                Some(v) => {
                    let size = match &v.v {
                        Scalar::Int(n) => u64::try_from(*n).map_err(|_| "negative".to_string()),
                        Scalar::Str(s) => parse_size(&r.expand(&v.with(s.clone()))?),
                    };
                    match size {
                        Ok(0) => return Err(v.invalid("must be more than 0")),
                        Ok(n) => n,
                        Err(m) => return Err(v.invalid(m)),
                    }
                }
            },
            logs: match &self.logs {
                None => None,
                Some(v) => Some(match (&v.v.unit, &v.v.files) {
                    (Some(unit), None) => LogsConfig::Unit(r.expand(&v.with(unit.clone()))?),
                    (None, Some(files)) if !files.is_empty() => LogsConfig::Files(
                        files
                            .iter()
                            .map(|f| {
                                let f = r.expand(&v.with(f.clone()))?;
                                check_relative(&f).map_err(|m| v.invalid(m))?;
                                Ok(f)
                            })
                            .collect::<Result<_, ConfigError>>()?,
                    ),
                    _ => {
                        return Err(v.invalid(
                            "set exactly one of unit = \"NAME\" (the systemd journal) or \
                             files = [\"log/*.log\"] (files relative to the release)",
                        ));
                    }
                }),
            },
            hooks: HooksConfig {
                before_switch: r.opt_string(&self.hooks.before_switch)?,
                after_live: r.opt_string(&self.hooks.after_live)?,
                on_failure: r.opt_string(&self.hooks.on_failure)?,
            },
        })
    }
}

impl NotifyLayer {
    fn resolve(&self, r: &Resolver<'_>) -> Result<Option<NotifyConfig>, ConfigError> {
        let mut webhooks = Vec::new();
        if let Some(v) = &self.webhook {
            let url = r.expand(v)?;
            check_webhook(&url).map_err(|m| v.invalid(m))?;
            webhooks.push(url);
        }
        for url in r.list(&self.webhooks, check_webhook)?.unwrap_or_default() {
            if !webhooks.contains(&url) {
                webhooks.push(url);
            }
        }
        Ok((!webhooks.is_empty()).then_some(NotifyConfig { webhooks }))
    }
}

impl HealthLayer {
    fn resolve(&self, r: &Resolver<'_>) -> Result<Option<HealthConfig>, ConfigError> {
        let health_url = r.opt_string(&self.url)?;
        if let (Some(url), Some(v)) = (&health_url, &self.url) {
            check_url(url).map_err(|m| v.invalid(m))?;
        }
        let health = HealthConfig {
            url: health_url.clone().unwrap_or_default(),
            expect_status: r.status(&self.expect_status)?,
            retries: r.uint(&self.retries, 12, 1)?,
            interval: r.duration(&self.interval, Duration::from_secs(5), true)?,
            request_timeout: r.duration(&self.request_timeout, Duration::from_secs(3), false)?,
            watch: r.duration(&self.watch, Duration::ZERO, true)?,
            watch_failures: r.uint(&self.watch_failures, 3, 1)?,
        };
        Ok(health_url.map(|_| health))
    }
}

impl RolloutLayer {
    fn resolve(&self, r: &Resolver<'_>) -> Result<RolloutConfig, ConfigError> {
        Ok(RolloutConfig {
            batch: match &self.batch {
                None => Batch::Percent(100),
                Some(v) => {
                    let batch = match &v.v {
                        Scalar::Int(n) => parse_batch(&n.to_string()),
                        Scalar::Str(s) => parse_batch(&r.expand(&v.with(s.clone()))?),
                    };
                    batch.map_err(|m| v.invalid(m))?
                }
            },
            canary: r.boolean(&self.canary, false),
            on_failure: match &self.on_failure {
                None => OnFailure::RollbackAll,
                Some(v) => match r.expand(v)?.as_str() {
                    "rollback-all" => OnFailure::RollbackAll,
                    "stop" => OnFailure::Stop,
                    other => {
                        return Err(v.invalid(format!(
                            "unknown on_failure `{other}` (expected \"rollback-all\" or \"stop\")"
                        )));
                    }
                },
            },
        })
    }
}

impl VerifyLayer {
    fn resolve(&self, r: &Resolver<'_>) -> Result<Option<VerifyConfig>, ConfigError> {
        let urls = r.list(&self.urls, check_url)?.unwrap_or_default();
        let verify = VerifyConfig {
            retries: r.uint(&self.retries, 9, 1)?,
            interval: r.duration(&self.interval, Duration::from_secs(5), true)?,
            expect_status: r.status(&self.expect_status)?,
            request_timeout: r.duration(&self.request_timeout, Duration::from_secs(10), false)?,
            urls,
        };
        Ok((!verify.urls.is_empty()).then_some(verify))
    }
}

impl ComposeLayer {
    /// `app` is the project's default name.
    fn resolve(&self, r: &Resolver<'_>, app: &str) -> Result<ComposeConfig, ConfigError> {
        let files = match r.list(&self.files, |f| {
            if f.is_empty() {
                Err("empty file name".to_string())
            } else {
                Ok(())
            }
        })? {
            None => vec![PathBuf::from("docker-compose.yml")],
            Some(files) if files.is_empty() => {
                let v = self.files.as_ref().expect("list came from a value");
                return Err(v.invalid("needs at least one compose file"));
            }
            Some(files) => files.into_iter().map(PathBuf::from).collect(),
        };
        let project = match &self.project {
            None => app.to_string(),
            Some(v) => {
                let p = r.expand(v)?;
                check_name(&p).map_err(|m| v.invalid(m))?;
                p
            }
        };
        Ok(ComposeConfig {
            files,
            env_file: r.opt_string(&self.env_file)?.map(PathBuf::from),
            project,
            pull: r.boolean(&self.pull, true),
            compose_command: r.opt_string(&self.compose_command)?,
            zero_downtime: zero_downtime(r, &self.zero_downtime)?,
            drain: match &self.drain {
                None => None,
                Some(_) => Some(r.duration(&self.drain, Duration::ZERO, true)?),
            },
        })
    }
}

impl CutoverLayer {
    /// The first key set (by line), to name where `[cutover]` is; `None` when unset.
    fn first_key(&self) -> Option<Val<()>> {
        [
            self.ports.as_ref().map(|v| v.with(())),
            self.start.as_ref().map(|v| v.with(())),
            self.stop.as_ref().map(|v| v.with(())),
            self.switch.as_ref().map(|v| v.with(())),
            self.drain.as_ref().map(|v| v.with(())),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|v| v.at.line())
    }

    fn resolve(&self, r: &Resolver<'_>) -> Result<Option<CutoverConfig>, ConfigError> {
        let Some(first) = self.first_key() else {
            return Ok(None);
        };
        let required = |v: &Opt<String>, name: &str, example: &str| match v {
            Some(_) => Ok(r.opt_string(v)?.unwrap_or_default()),
            None => Err(ConfigError::Invalid {
                at: first.at.clone(),
                key: first
                    .key
                    .rsplit_once('.')
                    .map_or("cutover".into(), |(t, _)| format!("{t}.{name}")),
                message: format!("[cutover] needs `{name}`, e.g. {name} = {example:?}"),
            }),
        };
        let ports = match &self.ports {
            None => {
                return Err(ConfigError::Invalid {
                    at: first.at.clone(),
                    key: first
                        .key
                        .rsplit_once('.')
                        .map_or("cutover".into(), |(t, _)| format!("{t}.ports")),
                    message: "[cutover] needs `ports`, two ports, e.g. ports = [4001, 4002]".into(),
                });
            }
            Some(v) => {
                let ok = |n: i64| u16::try_from(n).ok().filter(|p| *p > 0);
                match v.v.as_slice() {
                    [a, b] => match (ok(*a), ok(*b)) {
                        (Some(a), Some(b)) if a != b => [a, b],
                        (Some(_), Some(_)) => {
                            return Err(
                                v.invalid(format!("the two ports must differ, got {a} twice"))
                            );
                        }
                        _ => return Err(v.invalid("ports must be between 1 and 65535")),
                    },
                    other => {
                        return Err(v.invalid(format!(
                            "needs exactly two ports (one per slot), got {}",
                            other.len()
                        )));
                    }
                }
            }
        };
        Ok(Some(CutoverConfig {
            ports,
            start: required(
                &self.start,
                "start",
                "sudo systemctl start myapp@${DEPLOY_PORT}",
            )?,
            stop: required(
                &self.stop,
                "stop",
                "sudo systemctl stop myapp@${DEPLOY_PORT}",
            )?,
            switch: required(&self.switch, "switch", "bin/point-proxy ${DEPLOY_PORT}")?,
            drain: r.duration(&self.drain, Duration::from_secs(10), true)?,
        }))
    }
}

impl Layer {
    /// Review apps: `instances`, `instance_ports`, `instance_ttl`, `url_template`.
    fn instances(&self, r: &Resolver<'_>) -> Result<Option<InstancesConfig>, ConfigError> {
        Ok(match &self.instances {
            Some(v) if v.v => {
                let ports_val = self.instance_ports.as_ref().ok_or_else(|| {
                    v.invalid("`instances = true` needs `instance_ports`, e.g. \"4100-4199\"")
                })?;
                let ports =
                    parse_port_range(&r.expand(ports_val)?).map_err(|m| ports_val.invalid(m))?;
                let ttl = match &self.instance_ttl {
                    None => None,
                    Some(_) => Some(r.duration(&self.instance_ttl, Duration::ZERO, false)?),
                };
                Some(InstancesConfig {
                    ports,
                    ttl,
                    url_template: r.opt_string(&self.url_template)?,
                })
            }
            _ => None,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Raw layers: what one table says, with where each value was written
// ---------------------------------------------------------------------------------------

/// A value with its full dotted key and where it was set.
#[derive(Debug, Clone)]
struct Val<T> {
    v: T,
    key: String,
    at: Location,
}

type Opt<T> = Option<Val<T>>;
type List = Opt<Vec<Val<String>>>;

impl<T> Val<T> {
    fn invalid(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            at: self.at.clone(),
            key: self.key.clone(),
            message: message.into(),
        }
    }

    fn with<U>(&self, v: U) -> Val<U> {
        Val {
            v,
            key: self.key.clone(),
            at: self.at.clone(),
        }
    }
}

/// A value read from the file learns its key and line from the [`Source`] being read.
impl<'de, T: Deserialize<'de>> Deserialize<'de> for Val<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<T>::deserialize(d)?;
        let (key, at) = Source::locate(spanned.span().start);
        Ok(Val {
            v: spanned.into_inner(),
            key,
            at,
        })
    }
}

/// A key that takes an integer or a string (`batch`, `max_unpacked_size`).
#[derive(Debug, Clone)]
enum Scalar {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or a string")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(n))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(s.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration as written (`"5s"`), parsed by humantime once `${VAR}`s are expanded. Its
/// own type so a wrong type is reported as "expected a duration string".
#[derive(Debug, Clone)]
struct Dur(String);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string like \"5s\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dur, E> {
                Ok(Dur(s.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Debug, Clone)]
struct RawEnv {
    layer: Layer,
    /// The `[environments.NAME]` header.
    at: Location,
}

/// The one place a table's keys are declared: the struct (read by serde, with
/// `deny_unknown_fields`, so an unknown key is an error with "did you mean") and its
/// key-by-key merge are generated from the same list. A field is a [`Val`] (`Opt<T>` or
/// [`List`]), or a nested layer, which merges key by key too.
macro_rules! layers {
    ($(
        $(#[$meta:meta])*
        struct $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }
    )*) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(default, deny_unknown_fields, expecting = "a table")]
        struct $name { $($(#[$fmeta])* $field: $ty,)* }

        impl Merge for $name {
            fn merge(self, over: Self) -> Self {
                $name { $($field: self.$field.merge(over.$field),)* }
            }
        }
    )*};
}

/// `base.merge(over)`: the later layer wins, key by key.
trait Merge {
    fn merge(self, over: Self) -> Self;
}

/// `[release] logs` as written: one of `unit` or `files`.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { unit = \"myapp\" } or { files = [\"log/*.log\"] }"
)]
struct LogsValue {
    unit: Option<String>,
    files: Option<Vec<String>>,
}

/// `ssh_config`: a path, or `false` for none (`None`).
#[derive(Debug, Clone)]
struct PathOrOff(Option<String>);

impl<'de> Deserialize<'de> for PathOrOff {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PathOrOff;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a path, or false to read no ssh config")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PathOrOff, E> {
                Ok(PathOrOff(Some(s.to_owned())))
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<PathOrOff, E> {
                match b {
                    false => Ok(PathOrOff(None)),
                    true => Err(E::invalid_value(serde::de::Unexpected::Bool(true), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl<T> Merge for Option<T> {
    fn merge(self, over: Self) -> Self {
        over.or(self)
    }
}

layers! {
    /// `[defaults]`, `[environments.NAME]` or the overrides: every key optional.
    struct Layer {
        deploy_to: Opt<String>,
        hosts: List,
        user: Opt<String>,
        ssh_key: Opt<String>,
        known_hosts: Opt<String>,
        accept_new_host_keys: Opt<bool>,
        ssh_config: Opt<PathOrOff>,
        proxy_jump: Opt<String>,
        agent_socket: Opt<String>,
        agent_bin: Opt<String>,
        connect_timeout: Opt<Dur>,
        connect_retries: Opt<i64>,
        strategy: Opt<String>,
        keep_releases: Opt<i64>,
        max_parallel: Opt<i64>,
        confirm: Opt<bool>,
        promote_from: Opt<String>,
        secrets: List,
        instances: Opt<bool>,
        instance_ports: Opt<String>,
        instance_ttl: Opt<Dur>,
        url_template: Opt<String>,
        release: ReleaseLayer,
        health: HealthLayer,
        rollout: RolloutLayer,
        verify: VerifyLayer,
        compose: ComposeLayer,
        notify: NotifyLayer,
        cutover: CutoverLayer,
    }

    struct ReleaseLayer {
        artifact: Opt<String>,
        shared: List,
        migrate: Opt<String>,
        restart: Opt<String>,
        stop: Opt<String>,
        timeout: Opt<Dur>,
        max_unpacked_size: Opt<Scalar>,
        logs: Opt<LogsValue>,
        hooks: HooksLayer,
    }

    struct HooksLayer {
        before_switch: Opt<String>,
        after_live: Opt<String>,
        on_failure: Opt<String>,
    }

    struct NotifyLayer {
        webhook: Opt<String>,
        webhooks: List,
    }

    struct HealthLayer {
        url: Opt<String>,
        expect_status: Opt<i64>,
        retries: Opt<i64>,
        interval: Opt<Dur>,
        request_timeout: Opt<Dur>,
        watch: Opt<Dur>,
        watch_failures: Opt<i64>,
    }

    struct RolloutLayer {
        batch: Opt<Scalar>,
        canary: Opt<bool>,
        on_failure: Opt<String>,
    }

    struct VerifyLayer {
        urls: List,
        retries: Opt<i64>,
        interval: Opt<Dur>,
        expect_status: Opt<i64>,
        request_timeout: Opt<Dur>,
    }

    struct ComposeLayer {
        files: List,
        env_file: Opt<String>,
        project: Opt<String>,
        pull: Opt<bool>,
        compose_command: Opt<String>,
        zero_downtime: List,
        drain: Opt<Dur>,
    }

    struct CutoverLayer {
        ports: Opt<Vec<i64>>,
        start: Opt<String>,
        stop: Opt<String>,
        switch: Opt<String>,
        drain: Opt<Dur>,
    }
}

/// The whole file. `[defaults]` is a [`Layer`] like each environment; the keys it may not
/// hold are refused after reading ([`Config::parse`]).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawFile {
    app: Opt<String>,
    deploy_to: Opt<String>,
    defaults: Layer,
    environments: BTreeMap<Spanned<String>, Layer>,
}

/// One `DEPLOYCTL_*` override, as a [`Layer`] that holds that key alone. The text is read
/// as whatever the key takes: a string, else an integer, else a boolean (`true`/`1`/`yes`,
/// `false`/`0`/`no`), else a comma-separated list. Overrides are taken literally.
fn override_layer(var: &str, key: &str, value: &str) -> Result<Layer, ConfigError> {
    use toml::Value;
    let boolean = match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    };
    let list = value
        .split(',')
        .map(|part| Value::String(part.trim().to_string()))
        .collect();
    let candidates = [
        Some(Value::String(value.to_string())),
        value.trim().parse::<i64>().ok().map(Value::Integer),
        boolean.map(Value::Boolean),
        Some(Value::Array(list)),
    ];
    let mut source = Source::new(var, "");
    source.env = Some((var.to_string(), key.to_string()));
    let source = Rc::new(source);
    let mut first_error = None;
    for candidate in candidates.into_iter().flatten() {
        SOURCE.with(|s| *s.borrow_mut() = Some(source.clone()));
        let read = toml::from_str::<Layer>(&format!("{key} = {candidate}"));
        SOURCE.with(|s| *s.borrow_mut() = None);
        match read {
            Ok(layer) => return Ok(layer),
            Err(e) => {
                first_error.get_or_insert_with(|| e.message().trim_end().to_string());
            }
        }
    }
    let message = first_error.unwrap_or_default();
    let message = if message.ends_with("expected i64") {
        format!("expected a number, got `{value}`")
    } else if message.ends_with("expected a boolean") {
        format!("expected true or false, got `{value}`")
    } else {
        plain_words(&message)
    };
    Err(ConfigError::Invalid {
        at: Location::EnvVar {
            var: var.to_string(),
        },
        key: key.to_string(),
        message,
    })
}

// ---------------------------------------------------------------------------------------
// Reading the file: from spans to keys and lines
// ---------------------------------------------------------------------------------------

/// The file being read: its name and text, and the dotted key of every value by the byte
/// where the value starts, so that a [`Val`] and a serde error can name their key and line.
struct Source {
    file: String,
    text: String,
    /// Start of a value (or of an item of an array) -> its full dotted key.
    values: BTreeMap<usize, String>,
    /// Start of a key -> the dotted path of the table holding it.
    tables: BTreeMap<usize, String>,
    /// Set when reading a `DEPLOYCTL_*` override: the variable and the key it sets.
    env: Option<(String, String)>,
}

thread_local! {
    /// The [`Source`] of the serde pass under way on this thread, read by `Val`'s
    /// `Deserialize`: serde's derive has no way to hand context down to a field.
    static SOURCE: RefCell<Option<Rc<Source>>> = const { RefCell::new(None) };
}

impl Source {
    fn new(file: &str, text: &str) -> Source {
        Source {
            file: file.to_string(),
            text: text.to_string(),
            values: BTreeMap::new(),
            tables: BTreeMap::new(),
            env: None,
        }
    }

    fn index(&mut self, table: &DeTable<'_>, path: &str) {
        for (k, v) in table.iter() {
            let key = if path.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{path}.{}", k.get_ref())
            };
            self.tables.insert(k.span().start, path.to_string());
            self.values.insert(v.span().start, key.clone());
            match v.get_ref() {
                DeValue::Array(items) => {
                    for item in items.iter() {
                        self.values.insert(item.span().start, key.clone());
                    }
                }
                DeValue::Table(t) => self.index(t, &key),
                _ => {}
            }
        }
    }

    fn at(&self, pos: usize) -> Location {
        let end = pos.min(self.text.len());
        let line = self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        Location::Line {
            file: self.file.clone(),
            line,
        }
    }

    /// The trimmed source line holding byte `pos`, shortened for messages.
    fn line_text(&self, pos: usize) -> String {
        let pos = pos.min(self.text.len());
        let start = self.text[..pos].rfind('\n').map_or(0, |i| i + 1);
        let end = self.text[pos..]
            .find('\n')
            .map_or(self.text.len(), |i| pos + i);
        let line = self.text[start..end].trim();
        match line.char_indices().nth(60) {
            Some((i, _)) => format!("{}...", &line[..i]),
            None => line.to_string(),
        }
    }

    fn whole_file(&self) -> Location {
        Location::File {
            file: self.file.clone(),
        }
    }

    /// The dotted key of the value starting at `pos` (or, failing that, of the closest
    /// value before it) and its line.
    fn key_at(&self, pos: usize) -> (String, Location) {
        if let Some((var, key)) = &self.env {
            return (key.clone(), Location::EnvVar { var: var.clone() });
        }
        let key = self
            .values
            .range(..=pos)
            .next_back()
            .map(|(_, k)| k.clone())
            .unwrap_or_default();
        (key, self.at(pos))
    }

    /// Where the value at `pos` of the pass under way comes from.
    fn locate(pos: usize) -> (String, Location) {
        SOURCE.with(|s| match &*s.borrow() {
            Some(src) => src.key_at(pos),
            None => (String::new(), Location::BuiltIn),
        })
    }

    /// Reads `doc` into `T`: serde checks the keys and types, each [`Val`] keeps its key
    /// and line.
    fn read<'i, T: Deserialize<'i>>(
        self: &Rc<Self>,
        doc: Spanned<DeTable<'i>>,
    ) -> Result<T, ConfigError> {
        SOURCE.with(|s| *s.borrow_mut() = Some(self.clone()));
        let read = T::deserialize(toml::de::Deserializer::from(doc));
        SOURCE.with(|s| *s.borrow_mut() = None);
        read.map_err(|e| self.error(&e))
    }

    /// A serde error as a [`ConfigError`] naming the key and line.
    fn error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim_end();
        let Some(span) = e.span() else {
            return ConfigError::Syntax {
                at: self.whole_file(),
                message: message.to_string(),
            };
        };
        if let Some(rest) = message.strip_prefix("unknown field `") {
            // serde: "unknown field `x`, expected one of `a`, `b`" (or "expected `a`").
            let mut names = rest.split('`').skip(2).step_by(2);
            let key = rest.split('`').next().unwrap_or_default().to_string();
            let known: Vec<&str> = names.by_ref().collect();
            let table = self.tables.get(&span.start).cloned().unwrap_or_default();
            let hint = if table.is_empty() && layer_keys().contains(&key) {
                " (put it under [defaults] or [environments.NAME])".to_string()
            } else {
                match suggest(&key, &known) {
                    Some(s) => format!(" (did you mean `{s}`?)"),
                    None => String::new(),
                }
            };
            return ConfigError::UnknownKey {
                at: self.at(span.start),
                key,
                table,
                hint,
            };
        }
        let (key, at) = self.key_at(span.start);
        ConfigError::Invalid {
            at,
            key,
            message: plain_words(message),
        }
    }
}

/// The keys of an environment (and of `[defaults]`), as serde knows them from [`Layer`].
fn layer_keys() -> Vec<String> {
    // Reading a key no layer has makes serde list the ones it has.
    match toml::from_str::<Layer>("\"?\" = 0") {
        Err(e) => e
            .message()
            .split('`')
            .skip(3)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
        Ok(_) => Vec::new(),
    }
}

/// serde's "invalid type: integer `5`, expected a sequence" in TOML's words:
/// "expected an array, found integer `5`".
fn plain_words(message: &str) -> String {
    let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|m| m.split_once(", expected "))
    else {
        return message.to_string();
    };
    let expected = match expected {
        "i64" => "an integer",
        "a sequence" => "an array",
        "a boolean" => "true or false",
        "a map" => "a table",
        other => other,
    };
    format!("expected {expected}, found {found}")
}

// ---------------------------------------------------------------------------------------
// Resolving values
// ---------------------------------------------------------------------------------------

struct Resolver<'a> {
    vars: &'a BTreeMap<String, Option<String>>,
}

impl Resolver<'_> {
    /// `${VAR}` expansion for values from the file; overrides are taken literally.
    fn expand(&self, v: &Val<String>) -> Result<String, ConfigError> {
        if matches!(v.at, Location::EnvVar { .. }) {
            return Ok(v.v.clone());
        }
        expand_vars(&v.v, &mut |name| self.vars.get(name).cloned().flatten()).map_err(|e| match e {
            ExpandError::Unset(var) => ConfigError::UnsetVar {
                at: v.at.clone(),
                key: v.key.clone(),
                var,
            },
            ExpandError::Bad(message) => v.invalid(message),
        })
    }

    /// A non-empty string, or none when the key is absent.
    fn opt_string(&self, v: &Opt<String>) -> Result<Option<String>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let s = self.expand(v)?;
        if s.trim().is_empty() {
            return Err(v.invalid("is empty (leave the key out instead)"));
        }
        Ok(Some(s))
    }

    /// Expanded, then `~` / `~/` at the start replaced by `$HOME`.
    fn path(&self, v: &Val<String>) -> Result<PathBuf, ConfigError> {
        let s = self.expand(v)?;
        if s.is_empty() {
            return Err(v.invalid("is empty"));
        }
        let Some(rest) = s.strip_prefix('~') else {
            return Ok(PathBuf::from(s));
        };
        if !(rest.is_empty() || rest.starts_with('/')) {
            return Err(v.invalid(format!("`{s}`: only `~/` is supported, not `~user/`")));
        }
        let home =
            self.vars
                .get("HOME")
                .cloned()
                .flatten()
                .ok_or_else(|| ConfigError::UnsetVar {
                    at: v.at.clone(),
                    key: v.key.clone(),
                    var: "HOME".into(),
                })?;
        Ok(PathBuf::from(format!("{home}{rest}")))
    }

    fn list(
        &self,
        v: &List,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        v.v.iter()
            .map(|item| {
                let s = self.expand(item)?;
                check(&s).map_err(|m| item.invalid(m))?;
                Ok(s)
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn boolean(&self, v: &Opt<bool>, default: bool) -> bool {
        v.as_ref().map_or(default, |v| v.v)
    }

    fn uint(&self, v: &Opt<i64>, default: u32, min: u32) -> Result<u32, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        match u32::try_from(v.v) {
            Ok(n) if n >= min => Ok(n),
            _ => Err(v.invalid(format!("must be at least {min}, got {}", v.v))),
        }
    }

    fn status(&self, v: &Opt<i64>) -> Result<u16, ConfigError> {
        let Some(v) = v else { return Ok(200) };
        match v.v {
            100..=599 => Ok(v.v as u16),
            n => Err(v.invalid(format!("{n} is not an HTTP status (100-599)"))),
        }
    }

    fn duration(
        &self,
        v: &Opt<Dur>,
        default: Duration,
        allow_zero: bool,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let v = v.with(v.v.0.clone());
        let s = self.expand(&v)?;
        match humantime::parse_duration(s.trim()) {
            Ok(d) if d.is_zero() && !allow_zero => Err(v.invalid("must be more than 0")),
            Ok(d) => Ok(d),
            Err(e) => Err(v.invalid(format!(
                "bad duration `{s}`: {e} (examples: \"500ms\", \"5s\", \"5m\", \"7d\")"
            ))),
        }
    }
}

enum ExpandError {
    Unset(String),
    Bad(String),
}

/// Replaces `${NAME}` using `lookup`; `$${` gives `${`; `${DEPLOY_*}` is kept.
fn expand_vars(
    s: &str,
    lookup: &mut dyn FnMut(&str) -> Option<String>,
) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let from = &rest[i..];
        if let Some(after) = from.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = from.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err(ExpandError::Bad(
                    "unterminated `${` (write `$${` for a literal `${`)".into(),
                ));
            };
            let name = &after[..end];
            if !is_var_name(name) {
                return Err(ExpandError::Bad(format!(
                    "`${{{name}}}` is not a variable reference (write `$${{` for a literal `${{`)"
                )));
            }
            if name.starts_with("DEPLOY_") {
                out.push_str(&from[..end + 3]);
            } else {
                match lookup(name) {
                    Some(value) => out.push_str(&value),
                    None => return Err(ExpandError::Unset(name.to_string())),
                }
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &from[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn collect_refs(v: &DeValue<'_>, names: &mut BTreeSet<String>) {
    match v {
        DeValue::String(s) => {
            let _ = expand_vars(s, &mut |name| {
                names.insert(name.to_string());
                Some(String::new())
            });
        }
        DeValue::Array(items) => items.iter().for_each(|i| collect_refs(i.get_ref(), names)),
        DeValue::Table(t) => collect_refs_table(t, names),
        _ => {}
    }
}

fn collect_refs_table(t: &DeTable<'_>, names: &mut BTreeSet<String>) {
    for (_, v) in t.iter() {
        collect_refs(v.get_ref(), names);
    }
}

// ---------------------------------------------------------------------------------------
// Small checks and parsers
// ---------------------------------------------------------------------------------------

/// App, environment and compose project names: `[a-z0-9][a-z0-9_-]*`, at most 63.
fn check_name(s: &str) -> Result<(), String> {
    let mut chars = s.chars();
    let ok = s.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a valid name (lowercase letters, digits, `-`, `_`; starting with a letter or digit; at most 63)"
        ))
    }
}

fn check_user(s: &str) -> Result<(), String> {
    let mut chars = s.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("`{s}` is not a valid user name"))
    }
}

fn check_hostname(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty host name".into());
    }
    let ok = s.len() <= 253
        && !s.starts_with(['-', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("`{s}` is not a valid host name"))
    }
}

fn check_deploy_to(s: &str) -> Result<(), String> {
    if !s.starts_with('/') {
        return Err(format!("`{s}` is not an absolute path"));
    }
    if s.split('/').any(|c| c == "..") {
        return Err(format!("`{s}` must not contain `..`"));
    }
    if s.trim_end_matches('/').is_empty() {
        return Err("refusing to deploy to `/`".into());
    }
    Ok(())
}

/// A path inside the release: relative, no `..`.
/// `compose.zero_downtime`: compose service names (`[a-zA-Z0-9._-]`), each once. Whether
/// the files define them, with a healthcheck and no fixed host port, is checked against
/// the files themselves before a push (`compose.rs`).
fn zero_downtime(r: &Resolver<'_>, v: &List) -> Result<Vec<String>, ConfigError> {
    let names = r.list(v, |s| {
        let ok = !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if ok {
            Ok(())
        } else {
            Err(format!(
                "`{s}` is not a compose service name (letters, digits, `.`, `_`, `-`)"
            ))
        }
    })?;
    let names = names.unwrap_or_default();
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            let v = v.as_ref().expect("names came from a value");
            return Err(v.invalid(format!("service `{n}` is listed twice")));
        }
    }
    Ok(names)
}

fn check_relative(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty path".into());
    }
    if s.starts_with('/') {
        return Err(format!("`{s}` must be relative to the release directory"));
    }
    if s.split('/').any(|c| c == "..") {
        return Err(format!("`{s}` must not contain `..`"));
    }
    Ok(())
}

fn check_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !s.contains(char::is_whitespace) => Ok(()),
        _ => Err(format!("`{s}` is not an http:// or https:// URL")),
    }
}

/// A webhook URL: http(s). The message does not repeat it (it may carry a token).
fn check_webhook(s: &str) -> Result<(), String> {
    check_url(s).map_err(|_| {
        "is not an http:// or https:// URL (the value is not shown: a webhook URL may \
         carry a token)"
            .to_string()
    })
}

fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_batch(s: &str) -> Result<Batch, String> {
    let s = s.trim();
    if let Some(p) = s.strip_suffix('%') {
        return match p.trim().parse::<u8>() {
            Ok(p @ 1..=100) => Ok(Batch::Percent(p)),
            _ => Err(format!("`{s}`: a percentage must be 1% to 100%")),
        };
    }
    match s.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(Batch::Count(n)),
        _ => Err(format!(
            "`{s}`: expected a host count of at least 1 or a percentage like \"25%\""
        )),
    }
}

fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("bad port range `{s}` (expected e.g. \"4100-4199\")");
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok(lo..=hi)
}

/// `123`, `500MB`, `10GiB`, `1 TiB`: KB/MB/GB/TB are 1000-based, KiB/MiB/GiB/TiB 1024-based.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad =
        || format!("bad size `{s}` (expected e.g. \"10GiB\", \"500MB\" or a number of bytes)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// The closest known key, for "did you mean".
fn suggest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The names under `[environments]` in the file at `path`, sorted; empty when the file is
/// missing or does not parse (the config loader reports those properly).
pub fn environments_in(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(doc) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut names: Vec<String> = doc
        .get("environments")
        .and_then(toml::Value::as_table)
        .map(|envs| envs.keys().cloned().collect())
        .unwrap_or_default();
    // The table keeps the file's order (toml's `preserve_order`).
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from SPEC.md, "Configuration: deploy.toml", verbatim.
    const SPEC_EXAMPLE: &str = r#"app = "myapp"
deploy_to = "/srv/myapp"            # per-app root on each server

[defaults]                          # every environment inherits these
user = "deploy"
ssh_key = "~/.ssh/id_ed25519"       # or DEPLOYCTL_SSH_KEY, or ssh-agent
known_hosts = "~/.ssh/known_hosts"
agent_socket = "/run/deploy-agent/agent.sock"
strategy = "release"                # "release" (tarball) or "compose"
keep_releases = 5

[defaults.release]
artifact = "dist/myapp.tar.gz"      # a .tar.gz built by CI; --artifact overrides
shared = ["log", "tmp", ".env"]     # linked from <deploy_to>/shared into each release
migrate = "bin/migrate"             # run in the new release dir before the switch
restart = "sudo systemctl restart myapp"
stop = "sudo systemctl stop myapp"  # used when a review-app instance is destroyed
timeout = "5m"                      # per command

[defaults.health]
url = "http://127.0.0.1:4000/api/v1/status/"   # fetched by the agent, on the server
expect_status = 200
retries = 12
interval = "5s"
request_timeout = "3s"

[environments.staging]
hosts = ["staging-1.tail1234.ts.net", "deploy@10.0.0.5:2222"]

[environments.production]
hosts = ["prod-1", "prod-2", "prod-3"]
confirm = true                      # needs --yes, or a typed "yes" on a terminal
max_parallel = 10
rollout = { batch = 1, canary = true, on_failure = "rollback-all" }
promote_from = "staging"            # push refuses content staging has not run healthy
[environments.production.verify]    # polled by the controller after the rollout
urls = ["https://app.example.com/api/v1/status/", "https://app.fly.dev/"]
retries = 9
interval = "5s"

[environments.edge]
strategy = "compose"
hosts = ["edge-1"]
[environments.edge.compose]
files = ["docker-compose.yml", "compose.production.yml"]
env_file = ".env.production"        # copied into the release; holds pinned image tags
project = "myapp"
pull = true
# compose_command = "docker compose"   # detected when absent; "docker-compose" for v1
"#;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    fn base_env() -> impl Fn(&str) -> Option<String> {
        env_of(&[("USER", "ci"), ("HOME", "/home/ci")])
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "deploy.toml", &base_env())
    }

    fn parse_err(text: &str) -> ConfigError {
        match parse(text) {
            Ok(c) => panic!("expected an error, parsed {c:?}"),
            Err(e) => e,
        }
    }

    /// 1-based line of the first line containing `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        text.lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("`{needle}` not in text"))
            + 1
    }

    fn assert_err(err: &ConfigError, line: usize, parts: &[&str]) {
        let msg = err.to_string();
        assert_eq!(err.line(), Some(line), "wrong line in: {msg}");
        assert!(
            msg.starts_with(&format!("deploy.toml:{line}: ")),
            "no location in: {msg}"
        );
        for part in parts {
            assert!(msg.contains(part), "`{part}` not in: {msg}");
        }
    }

    const MINI: &str = r#"
app = "myapp"
deploy_to = "/srv/myapp"

[environments.staging]
hosts = ["staging-1"]
"#;

    #[test]
    fn spec_example_parses_and_resolves() {
        let config = parse(SPEC_EXAMPLE).unwrap();
        assert_eq!(config.app, "myapp");
        assert_eq!(config.path, PathBuf::from("deploy.toml"));
        assert_eq!(
            config.environment_names(),
            ["edge", "production", "staging"]
        );

        let staging = config.environment("staging").unwrap();
        assert_eq!(staging.name, "staging");
        assert_eq!(staging.app, "myapp");
        assert_eq!(staging.deploy_to, "/srv/myapp");
        assert_eq!(
            staging.hosts,
            [
                Host::Ssh {
                    user: None,
                    host: "staging-1.tail1234.ts.net".into(),
                    port: 22
                },
                Host::Ssh {
                    user: Some("deploy".into()),
                    host: "10.0.0.5".into(),
                    port: 2222
                },
            ]
        );
        assert_eq!(staging.user, "deploy");
        assert_eq!(
            staging.ssh_key,
            Some(PathBuf::from("/home/ci/.ssh/id_ed25519"))
        );
        assert_eq!(
            staging.known_hosts,
            PathBuf::from("/home/ci/.ssh/known_hosts")
        );
        assert_eq!(staging.agent_socket, "/run/deploy-agent/agent.sock");
        assert_eq!(staging.agent_bin, "deploy-agent");
        assert!(!staging.accept_new_host_keys);
        assert_eq!(staging.connect_timeout, Duration::from_secs(10));
        assert_eq!(staging.connect_retries, 5);
        assert_eq!(staging.strategy, Strategy::Release);
        assert_eq!(staging.keep_releases, 5);
        assert_eq!(staging.max_parallel, 10);
        assert!(!staging.confirm);
        assert_eq!(
            staging.release,
            ReleaseConfig {
                artifact: Some("dist/myapp.tar.gz".into()),
                shared: vec!["log".into(), "tmp".into(), ".env".into()],
                migrate: Some("bin/migrate".into()),
                restart: Some("sudo systemctl restart myapp".into()),
                stop: Some("sudo systemctl stop myapp".into()),
                timeout: Duration::from_secs(300),
                max_unpacked_bytes: 10 << 30,
                logs: None,
                hooks: HooksConfig::default(),
            }
        );
        assert_eq!(
            staging.health,
            Some(HealthConfig {
                url: "http://127.0.0.1:4000/api/v1/status/".into(),
                expect_status: 200,
                retries: 12,
                interval: Duration::from_secs(5),
                request_timeout: Duration::from_secs(3),
                watch: Duration::ZERO,
                watch_failures: 3,
            })
        );
        assert_eq!(
            staging.rollout,
            RolloutConfig {
                batch: Batch::Percent(100),
                canary: false,
                on_failure: OnFailure::RollbackAll
            }
        );
        assert_eq!(staging.verify, None);
        assert_eq!(staging.instances, None);
        assert_eq!(staging.promote_from, None);
        assert_eq!(staging.compose.project, "myapp");
        assert_eq!(staging.compose.files, [PathBuf::from("docker-compose.yml")]);

        let prod = config.environment("production").unwrap();
        assert_eq!(prod.hosts.len(), 3);
        assert_eq!(prod.hosts[2].to_string(), "prod-3");
        assert!(prod.confirm);
        assert_eq!(prod.max_parallel, 10);
        assert_eq!(
            prod.rollout,
            RolloutConfig {
                batch: Batch::Count(1),
                canary: true,
                on_failure: OnFailure::RollbackAll
            }
        );
        assert_eq!(prod.promote_from.as_deref(), Some("staging"));
        assert_eq!(
            prod.verify,
            Some(VerifyConfig {
                urls: vec![
                    "https://app.example.com/api/v1/status/".into(),
                    "https://app.fly.dev/".into()
                ],
                retries: 9,
                interval: Duration::from_secs(5),
                expect_status: 200,
                request_timeout: Duration::from_secs(10),
            })
        );
        assert_eq!(prod.health, staging.health);

        let edge = config.environment("edge").unwrap();
        assert_eq!(edge.strategy, Strategy::Compose);
        assert_eq!(
            edge.compose,
            ComposeConfig {
                files: vec!["docker-compose.yml".into(), "compose.production.yml".into()],
                env_file: Some(".env.production".into()),
                project: "myapp".into(),
                pull: true,
                compose_command: None,
                zero_downtime: vec![],
                drain: None,
            }
        );
        assert_eq!(edge.user, "deploy");
    }

    #[test]
    fn hooks_and_webhooks_resolve_and_a_bad_webhook_is_not_echoed() {
        let text = format!(
            "{MINI}[defaults.release]\nhooks = {{ before_switch = \"bin/check\", on_failure = \"bin/page\" }}\n\
             [environments.staging.release]\nhooks = {{ after_live = \"bin/announce\" }}\n\
             [defaults.notify]\nwebhook = \"https://hooks.example.com/T/B/tok1\"\n\
             webhooks = [\"https://other.example.com/x\", \"https://hooks.example.com/T/B/tok1\"]\n"
        );
        let env = parse(&text).unwrap().environment("staging").unwrap();
        // Tables merge key by key: the environment adds after_live to the defaults' hooks.
        assert_eq!(
            env.release.hooks,
            HooksConfig {
                before_switch: Some("bin/check".into()),
                after_live: Some("bin/announce".into()),
                on_failure: Some("bin/page".into()),
            }
        );
        let notify = env.notify.clone().expect("notify");
        assert_eq!(
            notify.webhooks,
            vec![
                "https://hooks.example.com/T/B/tok1".to_string(),
                "https://other.example.com/x".to_string(),
            ]
        );
        assert!(!format!("{env:?}").contains("tok1"), "Debug hides the URLs");
        // None set: no notify, no hooks.
        let plain = parse(MINI).unwrap().environment("staging").unwrap();
        assert_eq!(plain.notify, None);
        assert_eq!(plain.release.hooks, HooksConfig::default());

        let bad = format!("{MINI}[defaults.notify]\nwebhook = \"hooks.example.com/T/B/tok2\"\n");
        let err = parse_err(&bad);
        assert_err(&err, line_of(&bad, "tok2"), &["notify.webhook", "http"]);
        assert!(!err.to_string().contains("tok2"), "{err}");
        let typo = format!("{MINI}[defaults.release]\nhooks = {{ before_swich = \"x\" }}\n");
        assert_err(
            &parse_err(&typo),
            line_of(&typo, "before_swich"),
            &["before_switch"],
        );
    }

    #[test]
    fn built_in_defaults() {
        let env = parse(MINI).unwrap().environment("staging").unwrap();
        assert_eq!(env.user, "ci");
        assert_eq!(env.ssh_key, None);
        assert_eq!(env.known_hosts, PathBuf::from("/home/ci/.ssh/known_hosts"));
        assert_eq!(env.health, None);
        assert_eq!(env.verify, None);
        assert_eq!(env.release.shared, Vec::<String>::new());
        assert_eq!(env.release.timeout, Duration::from_secs(300));
        assert!(env.compose.pull);
        assert_eq!(env.secrets, Vec::<String>::new());

        let no_user = Config::parse(MINI, "deploy.toml", &env_of(&[("HOME", "/root")]))
            .unwrap()
            .environment("staging")
            .unwrap();
        assert_eq!(no_user.user, "root");
    }

    #[test]
    fn health_watch_keys_merge_key_by_key_and_are_checked() {
        let text = r#"
app = "myapp"
deploy_to = "/srv/myapp"
[defaults.health]
url = "http://127.0.0.1:4000/up"
watch = "5m"
[environments.staging]
hosts = ["s1"]
[environments.staging.health]
watch_failures = 2
[environments.production]
hosts = ["p1"]
"#;
        let cfg = parse(text).unwrap();
        let staging = cfg.environment("staging").unwrap().health.unwrap();
        assert_eq!(staging.watch, Duration::from_secs(300));
        assert_eq!(staging.watch_failures, 2);
        let prod = cfg.environment("production").unwrap().health.unwrap();
        assert_eq!(prod.watch, Duration::from_secs(300));
        assert_eq!(prod.watch_failures, 3, "the default");
        let plain = parse(MINI_HEALTH).unwrap().environment("staging").unwrap();
        assert_eq!(
            plain.health.unwrap().watch,
            Duration::ZERO,
            "off by default"
        );
        for (bad, key) in [
            ("watch_failures = 0", "watch_failures"),
            ("watch = \"soon\"", "watch"),
        ] {
            let text = format!("{MINI}[environments.staging.health]\nurl = \"http://x/\"\n{bad}\n");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    const MINI_HEALTH: &str = "app = \"myapp\"\ndeploy_to = \"/srv/myapp\"\n\
        [environments.staging]\nhosts = [\"s1\"]\n\
        [environments.staging.health]\nurl = \"http://127.0.0.1:4000/up\"\n";

    #[test]
    fn tables_merge_key_by_key() {
        let text = r#"
app = "myapp"
deploy_to = "/srv/myapp"
[defaults]
user = "deploy"
keep_releases = 3
[defaults.health]
url = "http://127.0.0.1:4000/up"
retries = 3
interval = "1s"
[defaults.release]
restart = "systemctl restart myapp"
timeout = "1m"
[defaults.rollout]
canary = true
[defaults.compose]
files = ["a.yml"]
pull = false

[environments.staging]
hosts = ["s1"]
keep_releases = 7
deploy_to = "/srv/other"
[environments.staging.health]
url = "http://127.0.0.1:5000/up"
[environments.staging.release]
migrate = "bin/migrate"
[environments.staging.compose]
project = "proj"
[environments.staging.rollout]
batch = "50%"
"#;
        let env = parse(text).unwrap().environment("staging").unwrap();
        assert_eq!(env.deploy_to, "/srv/other");
        assert_eq!(env.user, "deploy");
        assert_eq!(env.keep_releases, 7);
        let health = env.health.unwrap();
        assert_eq!(health.url, "http://127.0.0.1:5000/up");
        assert_eq!(health.retries, 3);
        assert_eq!(health.interval, Duration::from_secs(1));
        assert_eq!(health.expect_status, 200);
        assert_eq!(env.release.migrate.as_deref(), Some("bin/migrate"));
        assert_eq!(
            env.release.restart.as_deref(),
            Some("systemctl restart myapp")
        );
        assert_eq!(env.release.timeout, Duration::from_secs(60));
        assert_eq!(env.compose.files, [PathBuf::from("a.yml")]);
        assert!(!env.compose.pull);
        assert_eq!(env.compose.project, "proj");
        assert_eq!(env.rollout.batch, Batch::Percent(50));
        assert!(env.rollout.canary);
    }

    #[test]
    fn unknown_key_at_top_level() {
        let text = format!("{MINI}\n");
        let text = text.replace("deploy_to =", "deploytoo = \"x\"\ndeploy_to =");
        let err = parse_err(&text);
        assert_err(
            &err,
            line_of(&text, "deploytoo"),
            &["unknown key `deploytoo` at the top level"],
        );
        assert!(matches!(err, ConfigError::UnknownKey { .. }));

        let text = MINI.replace("deploy_to =", "user = \"deploy\"\ndeploy_to =");
        let err = parse_err(&text);
        assert_err(&err, line_of(&text, "user ="), &["`user`", "[defaults]"]);
    }

    #[test]
    fn unknown_key_in_defaults() {
        let text = format!("{MINI}\n[defaults]\nuser = \"deploy\"\nhostz = [\"x\"]\n");
        let err = parse_err(&text);
        assert_err(
            &err,
            line_of(&text, "hostz"),
            &["unknown key `hostz` in [defaults]", "did you mean `hosts`"],
        );
    }

    #[test]
    fn unknown_key_in_environment_and_health() {
        let text = MINI.replace(
            "hosts = [\"staging-1\"]",
            "hosts = [\"staging-1\"]\nhostz = 1",
        );
        let err = parse_err(&text);
        assert_err(
            &err,
            line_of(&text, "hostz"),
            &["unknown key `hostz` in [environments.staging]"],
        );

        let text =
            format!("{MINI}\n[environments.staging.health]\nurl = \"http://x/\"\n\nretrys = 3\n");
        let err = parse_err(&text);
        assert_err(
            &err,
            line_of(&text, "retrys"),
            &[
                "unknown key `retrys` in [environments.staging.health]",
                "did you mean `retries`",
            ],
        );

        // Inline tables too.
        let text = format!("{MINI}rollout = {{ batch = 1, canery = true }}\n");
        let err = parse_err(&text);
        assert_err(
            &err,
            line_of(&text, "canery"),
            &["`canery`", "[environments.staging.rollout]"],
        );
    }

    #[test]
    fn first_error_in_file_order() {
        let text = format!("{MINI}zzz = 1\naaa = 2\n");
        let err = parse_err(&text);
        assert_err(&err, line_of(&text, "zzz"), &["`zzz`"]);
    }

    #[test]
    fn syntax_error_has_a_line() {
        let text = format!("{MINI}keep_releases = \n");
        let err = parse_err(&text);
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        assert_err(
            &err,
            line_of(&text, "keep_releases"),
            &["`keep_releases =`"],
        );
        let text = format!("{MINI}hosts = []\n");
        let err = parse_err(&text);
        assert_err(
            &err,
            line_of(&text, "hosts = []"),
            &["duplicate key", "`hosts = []`"],
        );
    }

    #[test]
    fn bad_duration() {
        let text = format!(
            "{MINI}[environments.staging.health]\nurl = \"http://x/\"\ninterval = \"5 parsecs\"\n"
        );
        let err = parse_err(&text);
        assert_err(
            &err,
            line_of(&text, "parsecs"),
            &["`environments.staging.health.interval`", "5 parsecs"],
        );

        let text = format!("{MINI}connect_timeout = 5\n");
        let err = parse_err(&text);
        assert_err(
            &err,
            line_of(&text, "connect_timeout"),
            &[
                "`environments.staging.connect_timeout`",
                "duration",
                "integer",
            ],
        );
    }

    #[test]
    fn bad_values_name_key_and_line() {
        let cases: &[(&str, &str)] = &[
            ("strategy = \"rsync\"", "strategy"),
            ("keep_releases = 0", "keep_releases"),
            ("keep_releases = \"5\"", "keep_releases"),
            ("max_parallel = -1", "max_parallel"),
            (
                "health = { url = \"http://x/\", retries = 0 }",
                "health.retries",
            ),
            (
                "health = { url = \"http://x/\", expect_status = 600 }",
                "health.expect_status",
            ),
            ("health = { url = \"ftp://x/\" }", "health.url"),
            (
                "verify = { urls = [\"http://x/\"], expect_status = 99 }",
                "verify.expect_status",
            ),
            ("rollout = { batch = \"150%\" }", "rollout.batch"),
            ("rollout = { batch = 0 }", "rollout.batch"),
            ("rollout = { batch = true }", "rollout.batch"),
            ("rollout = { on_failure = \"pray\" }", "rollout.on_failure"),
            (
                "instances = true\ninstance_ports = \"4199-4100\"",
                "instance_ports",
            ),
            (
                "instances = true\ninstance_ports = \"lots\"",
                "instance_ports",
            ),
            ("instances = true", "instances"),
            (
                "instances = true\ninstance_ports = \"4100-4199\"\ninstance_ttl = \"soon\"",
                "instance_ttl",
            ),
            ("deploy_to = \"srv/app\"", "deploy_to"),
            ("deploy_to = \"/srv/../etc\"", "deploy_to"),
            ("agent_socket = \"agent.sock\"", "agent_socket"),
            ("agent_bin = \"deploy agent; rm\"", "agent_bin"),
            ("secrets = [\"DB-PASSWORD\"]", "secrets"),
            ("release = { shared = [\"../etc\"] }", "release.shared"),
            (
                "release = { max_unpacked_size = \"10 parsecs\" }",
                "release.max_unpacked_size",
            ),
            (
                "release = { max_unpacked_size = 0 }",
                "release.max_unpacked_size",
            ),
            ("release = { restart = \"\" }", "release.restart"),
            ("compose = { files = [] }", "compose.files"),
            ("compose = { project = \"My App\" }", "compose.project"),
            ("user = \"bad user\"", "user"),
            ("ssh_key = \"~bob/.ssh/id\"", "ssh_key"),
            ("hosts = []", "hosts"),
            ("health = 5", "health"),
        ];
        for (snippet, key) in cases {
            // Replace the environment's hosts line when the case sets hosts.
            let text = if snippet.starts_with("hosts") {
                MINI.replace("hosts = [\"staging-1\"]", snippet)
            } else {
                format!("{MINI}{snippet}\n")
            };
            let err = parse_err(&text);
            let last = snippet.lines().last().unwrap();
            let key = format!("`environments.staging.{key}`");
            assert_err(&err, line_of(&text, last), &[&key]);
        }
    }

    #[test]
    fn environment_without_hosts() {
        let text = "app = \"a\"\ndeploy_to = \"/srv/a\"\n\n[environments.staging]\nuser = \"x\"\n";
        let err = parse_err(text);
        assert_err(&err, 4, &["`environments.staging.hosts`", "missing"]);
    }

    #[test]
    fn missing_app_and_deploy_to() {
        let err = parse_err("[environments.s]\nhosts = [\"h\"]\ndeploy_to = \"/srv/a\"\n");
        assert!(err.to_string().starts_with("deploy.toml: `app`"), "{err}");
        let err = parse_err("app = \"Bad\"\n[environments.s]\nhosts = [\"h\"]\n");
        assert_err(&err, 1, &["`app`"]);
        let err = parse_err("app = \"a\"\n[environments.s]\nhosts = [\"h\"]\n");
        assert_err(&err, 2, &["`environments.s.deploy_to`"]);
        let err = parse_err("app = \"a\"\ndeploy_to = \"/srv/a\"\n");
        assert!(err.to_string().contains("no environments"), "{err}");
        let err = parse_err("app = \"a\"\ndeploy_to = \"/srv/a\"\n[defaults]\nhosts = [\"h\"]\n");
        assert_err(&err, 4, &["`defaults.hosts`", "per environment"]);
    }

    #[test]
    fn compose_drain_is_optional_and_checked() {
        let text = format!(
            "{MINI}[defaults]\nstrategy = \"compose\"\n[defaults.compose]\n\
             zero_downtime = [\"web\"]\n[environments.staging.compose]\ndrain = \"3s\"\n\
             [environments.prod]\nhosts = [\"p\"]\n"
        );
        let config = parse(&text).unwrap();
        let staging = config.environment("staging").unwrap();
        assert_eq!(staging.compose.drain, Some(Duration::from_secs(3)));
        assert_eq!(config.environment("prod").unwrap().compose.drain, None);
        let bad = format!("{MINI}[defaults.compose]\ndrain = \"soon\"\n");
        let err = parse_err(&bad);
        assert!(err.to_string().contains("compose.drain"), "{err}");
    }

    #[test]
    fn cutover_merges_key_by_key_and_is_checked() {
        let text = format!(
            "{MINI}[defaults.cutover]\nports = [4001, 4002]\nstart = \"s ${{DEPLOY_PORT}}\"\n\
             stop = \"t ${{DEPLOY_PORT}}\"\nswitch = \"w ${{DEPLOY_PORT}}\"\n\
             [environments.staging.cutover]\ndrain = \"2s\"\n[environments.prod]\n\
             hosts = [\"p\"]\n"
        );
        let config = parse(&text).unwrap();
        let c = config.environment("staging").unwrap().cutover.unwrap();
        assert_eq!(c.ports, [4001, 4002]);
        assert_eq!(c.start, "s ${DEPLOY_PORT}");
        assert_eq!(c.drain, Duration::from_secs(2));
        let prod = config.environment("prod").unwrap().cutover.unwrap();
        assert_eq!(prod.drain, Duration::from_secs(10));
        // A `restart` inherited from [defaults.release] is not used: not refused.
        let inherited = format!(
            "{MINI}[environments.staging.cutover]\nports = [1, 2]\nstart = \"a\"\nstop = \"b\"\n\
             switch = \"c\"\n[defaults.release]\nrestart = \"r\"\n"
        );
        let env = parse(&inherited).unwrap().environment("staging").unwrap();
        assert!(env.cutover.is_some());
        // Both in [defaults]: refused.
        let both = format!(
            "{MINI}[defaults.cutover]\nports = [1, 2]\nstart = \"a\"\nstop = \"b\"\n\
             switch = \"c\"\n[defaults.release]\nrestart = \"r\"\n"
        );
        let err = parse(&both)
            .and_then(|c| c.environment("staging"))
            .unwrap_err();
        assert_err(
            &err,
            line_of(&both, "restart"),
            &["`defaults.release.restart`", "not used with [cutover]"],
        );
        // Without the table: none.
        assert_eq!(
            parse(MINI).unwrap().environment("staging").unwrap().cutover,
            None
        );

        let full = "[environments.staging.cutover]\nports = [4001, 4002]\nstart = \"a\"\n\
                    stop = \"b\"\nswitch = \"c\"\n";
        for (replace, with, key, needle, words) in [
            (
                "ports = [4001, 4002]",
                "ports = [4001]",
                "cutover.ports",
                "ports",
                "exactly two",
            ),
            (
                "ports = [4001, 4002]",
                "ports = [4001, 4001]",
                "cutover.ports",
                "ports",
                "differ",
            ),
            (
                "ports = [4001, 4002]",
                "ports = [0, 4002]",
                "cutover.ports",
                "ports",
                "65535",
            ),
            (
                "switch = \"c\"\n",
                "",
                "cutover.switch",
                "ports",
                "needs `switch`",
            ),
            (
                "start = \"a\"\n",
                "",
                "cutover.start",
                "ports",
                "needs `start`",
            ),
            (
                "stop = \"b\"\n",
                "",
                "cutover.stop",
                "ports",
                "needs `stop`",
            ),
            (
                "ports = [4001, 4002]\n",
                "",
                "cutover.ports",
                "start",
                "needs `ports`",
            ),
            (
                "switch = \"c\"",
                "switch = \"c\"\ndrain = \"x\"",
                "cutover.drain",
                "drain",
                "bad duration",
            ),
        ] {
            let text = format!("{MINI}{}", full.replace(replace, with));
            let err = parse(&text)
                .and_then(|c| c.environment("staging"))
                .expect_err(&text);
            assert_err(
                &err,
                line_of(&text, needle),
                &[&format!("`environments.staging.{key}`"), words],
            );
        }
        // What cannot go with it, named at its own line.
        for (extra, needle, words) in [
            (
                "[environments.staging.release]\nrestart = \"r\"\n",
                "restart",
                "not used with [cutover]",
            ),
            (
                "strategy = \"compose\"\n",
                "ports = [4001",
                "compose.zero_downtime",
            ),
            (
                "instances = true\ninstance_ports = \"4100-4199\"\n",
                "ports = [4001",
                "review-app",
            ),
        ] {
            let text = if extra.starts_with('[') {
                format!("{MINI}{full}{extra}")
            } else {
                format!(
                    "{}{full}",
                    MINI.replace(
                        "hosts = [\"staging-1\"]\n",
                        &format!("hosts = [\"staging-1\"]\n{extra}")
                    )
                )
            };
            let err = parse(&text)
                .and_then(|c| c.environment("staging"))
                .expect_err(&text);
            assert_err(&err, line_of(&text, needle), &[words]);
        }
    }

    #[test]
    fn bad_hosts() {
        for (host, why) in [
            ("", "empty host"),
            ("deploy@", "empty host name"),
            ("prod-1:99999", "bad port `99999`"),
            ("prod-1:0", "bad port `0`"),
            ("prod-1:", "bad port"),
            ("::1", "brackets"),
            ("[::1", "missing `]`"),
            ("[nope]:22", "not an IPv6"),
            ("pro d", "whitespace"),
            ("a@b@c", "host name"),
            ("deploy@local", "`local`"),
            ("-oProxyCommand=x", "host name"),
        ] {
            let text = MINI.replace(
                "hosts = [\"staging-1\"]",
                &format!("hosts = [\n  \"ok-1\",\n  \"{host}\",\n]"),
            );
            let err = parse_err(&text);
            assert_err(
                &err,
                line_of(&text, "ok-1") + 1,
                &[&format!("bad host `{host}`"), why],
            );
        }
        let text = MINI.replace("\"staging-1\"", "\"staging-1\", \"u@staging-1:22\"");
        let err = parse_err(&text);
        assert_err(&err, line_of(&text, "hosts"), &["listed twice"]);
    }

    #[test]
    fn host_forms() {
        let cases = [
            ("local", Host::Local, "local"),
            (
                "prod-1",
                Host::Ssh {
                    user: None,
                    host: "prod-1".into(),
                    port: 22,
                },
                "prod-1",
            ),
            (
                "deploy@10.0.0.5:2222",
                Host::Ssh {
                    user: Some("deploy".into()),
                    host: "10.0.0.5".into(),
                    port: 2222,
                },
                "deploy@10.0.0.5:2222",
            ),
            (
                "[::1]:2222",
                Host::Ssh {
                    user: None,
                    host: "::1".into(),
                    port: 2222,
                },
                "[::1]:2222",
            ),
            (
                "user@[::1]",
                Host::Ssh {
                    user: Some("user".into()),
                    host: "::1".into(),
                    port: 22,
                },
                "user@[::1]",
            ),
            (
                "[2001:db8:0:0::1]:22",
                Host::Ssh {
                    user: None,
                    host: "2001:db8::1".into(),
                    port: 22,
                },
                "[2001:db8::1]",
            ),
            (
                "host.example.com:22",
                Host::Ssh {
                    user: None,
                    host: "host.example.com".into(),
                    port: 22,
                },
                "host.example.com",
            ),
        ];
        for (input, host, canonical) in cases {
            let parsed: Host = input.parse().unwrap();
            assert_eq!(parsed, host, "{input}");
            assert_eq!(parsed.to_string(), canonical, "{input}");
            assert_eq!(
                canonical.parse::<Host>().unwrap(),
                host,
                "round trip {input}"
            );
        }
        let h: Host = "deploy@h".parse().unwrap();
        assert_eq!(h.user_or("other"), "deploy");
        let h: Host = "h".parse().unwrap();
        assert_eq!(h.user_or("other"), "other");
    }

    #[test]
    fn local_and_ipv6_hosts_in_config() {
        let text = MINI.replace(
            "\"staging-1\"",
            "\"local\", \"[::1]:2222\", \"me@[fe80::1]\"",
        );
        let env = parse(&text).unwrap().environment("staging").unwrap();
        assert_eq!(env.hosts[0], Host::Local);
        assert_eq!(env.hosts[1].to_string(), "[::1]:2222");
        assert_eq!(env.hosts[2].user_or(&env.user), "me");
        assert_eq!(env.hosts[2].address(), "[fe80::1]");

        // Only `local` hosts: no HOME needed for the default known_hosts.
        let text = MINI.replace("\"staging-1\"", "\"local\"");
        let config = Config::parse(&text, "deploy.toml", &env_of(&[])).unwrap();
        assert_eq!(config.environment("staging").unwrap().hosts, [Host::Local]);
        let config = Config::parse(MINI, "deploy.toml", &env_of(&[])).unwrap();
        let err = config.environment("staging").unwrap_err();
        assert!(err.to_string().contains("`HOME` is not set"), "{err}");
    }

    #[test]
    fn variable_expansion() {
        let text = r#"
app = "myapp"
deploy_to = "/srv/${APP_DIR}"
[defaults]
user = "${USER_NAME}"
ssh_key = "~/.ssh/${KEY_NAME}"
[defaults.release]
restart = "echo $${HOME} $$ ${DEPLOY_RELEASE_DIR} $PATH"
[environments.review]
hosts = ["${REVIEW_HOST}:2222"]
instances = true
instance_ports = "4100-4199"
instance_ttl = "7d"
url_template = "https://${DEPLOY_INSTANCE}.${DOMAIN}/"
health = { url = "http://127.0.0.1:${DEPLOY_PORT}/up" }
"#;
        let env = env_of(&[
            ("HOME", "/home/ci"),
            ("APP_DIR", "myapp"),
            ("USER_NAME", "deployer"),
            ("KEY_NAME", "id_ed25519"),
            ("REVIEW_HOST", "review-1"),
            ("DOMAIN", "example.com"),
            ("DEPLOY_PORT", "9999"),
        ]);
        let env = Config::parse(text, "deploy.toml", &env)
            .unwrap()
            .environment("review")
            .unwrap();
        assert_eq!(env.deploy_to, "/srv/myapp");
        assert_eq!(env.user, "deployer");
        assert_eq!(env.ssh_key, Some(PathBuf::from("/home/ci/.ssh/id_ed25519")));
        assert_eq!(
            env.release.restart.as_deref(),
            Some("echo ${HOME} $$ ${DEPLOY_RELEASE_DIR} $PATH")
        );
        assert_eq!(env.hosts[0].to_string(), "review-1:2222");
        let instances = env.instances.unwrap();
        assert_eq!(instances.ports, 4100..=4199);
        assert_eq!(instances.ttl, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(
            instances.url_template.as_deref(),
            Some("https://${DEPLOY_INSTANCE}.example.com/")
        );
        assert_eq!(
            env.health.unwrap().url,
            "http://127.0.0.1:${DEPLOY_PORT}/up"
        );
    }

    #[test]
    fn unset_variable_is_an_error_for_the_environment_that_uses_it() {
        let text = format!(
            "{MINI}\n[environments.production]\nhosts = [\"prod-1\"]\nuser = \"${{PROD_USER}}\"\n"
        );
        let config = parse(&text).unwrap();
        config.environment("staging").unwrap();
        let err = config.environment("production").unwrap_err();
        assert_err(
            &err,
            line_of(&text, "PROD_USER"),
            &["`environments.production.user`", "`PROD_USER` is not set"],
        );
        assert!(matches!(err, ConfigError::UnsetVar { ref var, .. } if var == "PROD_USER"));

        let text = format!("{MINI}user = \"${{oops\"\n");
        let err = parse_err(&text);
        assert_err(&err, line_of(&text, "oops"), &["unterminated"]);
        let text = format!("{MINI}user = \"${{a b}}\"\n");
        let err = parse_err(&text);
        assert_err(&err, line_of(&text, "a b"), &["not a variable reference"]);
    }

    #[test]
    fn env_var_overrides() {
        let config = Config::parse(
            SPEC_EXAMPLE,
            "deploy.toml",
            &env_of(&[
                ("HOME", "/home/ci"),
                ("DEPLOYCTL_USER", "ops"),
                ("DEPLOYCTL_HOSTS", "a, b:2200 ,local"),
                ("DEPLOYCTL_KEEP_RELEASES", "9"),
                ("DEPLOYCTL_ACCEPT_NEW_HOST_KEYS", "true"),
                ("DEPLOYCTL_SSH_KEY_PATH", "~/keys/ci"),
                ("DEPLOYCTL_SSH_KEY", "-----BEGIN OPENSSH PRIVATE KEY-----"),
                ("DEPLOYCTL_HEALTH_URL", "http://127.0.0.1:1/${NOT_EXPANDED}"),
                ("DEPLOYCTL_BATCH", "25%"),
                ("DEPLOYCTL_DEPLOY_TO", "/srv/x"),
                ("DEPLOYCTL_CONFIRM", ""),
            ]),
        )
        .unwrap();
        let env = config.environment("production").unwrap();
        assert_eq!(env.user, "ops");
        assert_eq!(
            env.hosts.iter().map(Host::to_string).collect::<Vec<_>>(),
            ["a", "b:2200", "local"]
        );
        assert_eq!(env.keep_releases, 9);
        assert!(env.accept_new_host_keys);
        assert_eq!(env.ssh_key, Some(PathBuf::from("/home/ci/keys/ci")));
        let health = env.health.unwrap();
        assert_eq!(health.url, "http://127.0.0.1:1/${NOT_EXPANDED}");
        assert_eq!(health.retries, 12);
        assert_eq!(env.rollout.batch, Batch::Percent(25));
        assert!(env.rollout.canary);
        assert_eq!(env.deploy_to, "/srv/x");
        assert!(env.confirm, "an empty override is ignored");

        // DEPLOYCTL_SSH_KEY is key text, never a path.
        let config = Config::parse(
            MINI,
            "deploy.toml",
            &env_of(&[("HOME", "/h"), ("DEPLOYCTL_SSH_KEY", "secret")]),
        )
        .unwrap();
        assert_eq!(config.environment("staging").unwrap().ssh_key, None);

        // CLI flags: plain field assignment after resolution.
        let mut env = config.environment("staging").unwrap();
        env.accept_new_host_keys = true;
        assert!(env.accept_new_host_keys);
    }

    #[test]
    fn bad_override_names_the_variable() {
        for (var, value, want) in [
            ("DEPLOYCTL_KEEP_RELEASES", "many", "expected a number"),
            ("DEPLOYCTL_KEEP_RELEASES", "0", "at least 1"),
            ("DEPLOYCTL_CONFIRM", "maybe", "true or false"),
            ("DEPLOYCTL_HOSTS", "a,,b", "empty host"),
            ("DEPLOYCTL_CONNECT_TIMEOUT", "5 parsecs", "bad duration"),
            ("DEPLOYCTL_BATCH", "150%", "percentage"),
            ("DEPLOYCTL_STRATEGY", "ftp", "unknown strategy"),
        ] {
            let config = Config::parse(
                MINI,
                "deploy.toml",
                &env_of(&[("HOME", "/h"), (var, value)]),
            )
            .unwrap();
            let msg = config.environment("staging").unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("environment variable {var}: ")),
                "{msg}"
            );
            assert!(msg.contains(want), "{msg}");
        }
    }

    // Overrides are read by serde as the type their key takes: a list, a duration, a
    // boolean, an integer or a size, each from the variable's text.
    #[test]
    fn overrides_take_the_type_of_their_key() {
        let config = Config::parse(
            MINI,
            "deploy.toml",
            &env_of(&[
                ("HOME", "/h"),
                ("DEPLOYCTL_COMPOSE_FILES", "a.yml, b.yml"),
                ("DEPLOYCTL_RELEASE_TIMEOUT", "90s"),
                ("DEPLOYCTL_COMPOSE_PULL", "no"),
                ("DEPLOYCTL_HEALTH_URL", "http://127.0.0.1:5000/up"),
                ("DEPLOYCTL_HEALTH_RETRIES", "4"),
                ("DEPLOYCTL_MAX_UNPACKED_SIZE", "2GiB"),
                (
                    "DEPLOYCTL_VERIFY_URLS",
                    "https://a.example/,https://b.example/",
                ),
            ]),
        )
        .unwrap();
        let env = config.environment("staging").unwrap();
        assert_eq!(
            env.compose.files,
            [PathBuf::from("a.yml"), PathBuf::from("b.yml")]
        );
        assert_eq!(env.release.timeout, Duration::from_secs(90));
        assert!(!env.compose.pull);
        assert_eq!(env.health.as_ref().map(|h| h.retries), Some(4));
        assert_eq!(env.release.max_unpacked_bytes, 2 << 30);
        assert_eq!(env.verify.map(|v| v.urls.len()), Some(2));
    }

    #[test]
    fn every_override_is_handled() {
        for (var, key) in ENV_OVERRIDES {
            assert!(var.starts_with("DEPLOYCTL_"));
            assert_ne!(*var, "DEPLOYCTL_SSH_KEY");
            override_layer(var, key, "1").unwrap();
        }
    }

    #[test]
    fn unknown_environment_lists_known_ones() {
        let err = parse(SPEC_EXAMPLE)
            .unwrap()
            .environment("prod")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no environment named `prod` (known: edge, production, staging)"
        );
    }

    #[test]
    fn promote_from_must_name_another_environment() {
        let text = format!("{MINI}promote_from = \"qa\"\n");
        let err = parse_err(&text);
        assert_err(
            &err,
            line_of(&text, "promote_from"),
            &[
                "`environments.staging.promote_from`",
                "`qa`",
                "known: staging",
            ],
        );
        let text = format!("{MINI}promote_from = \"staging\"\n");
        let err = parse_err(&text);
        assert_err(&err, line_of(&text, "promote_from"), &["itself"]);
    }

    #[test]
    fn review_apps_and_secrets() {
        let text = format!(
            "{MINI}instances = true\ninstance_ports = \"4100\"\nsecrets = [\"DB_PASSWORD\", \"API_KEY\"]\nstrategy = \"compose\"\n"
        );
        let env = parse(&text).unwrap().environment("staging").unwrap();
        let instances = env.instances.unwrap();
        assert_eq!(instances.ports, 4100..=4100);
        assert_eq!(instances.ttl, None);
        assert_eq!(env.secrets, ["DB_PASSWORD", "API_KEY"]);
        assert_eq!(env.strategy, Strategy::Compose);

        // instance_ports without instances = true is inert.
        let text = format!("{MINI}instance_ports = \"4100-4199\"\n");
        assert_eq!(
            parse(&text)
                .unwrap()
                .environment("staging")
                .unwrap()
                .instances,
            None
        );
    }

    #[test]
    fn sizes_batches_and_ranges() {
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("500 MB"), Ok(500_000_000));
        assert_eq!(parse_size("42"), Ok(42));
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        let text = format!("{MINI}release = {{ max_unpacked_size = 1024 }}\n");
        let env = parse(&text).unwrap().environment("staging").unwrap();
        assert_eq!(env.release.max_unpacked_bytes, 1024);

        assert_eq!(Batch::Count(1).size(5), 1);
        assert_eq!(Batch::Count(10).size(5), 5);
        assert_eq!(Batch::Percent(25).size(5), 2);
        assert_eq!(Batch::Percent(100).size(5), 5);
        assert_eq!(Batch::Percent(1).size(3), 1);
        assert_eq!(parse_port_range(" 4100 - 4199 "), Ok(4100..=4199));
        assert!(parse_port_range("0-10").is_err());
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deploy.toml");
        std::fs::write(&path, SPEC_EXAMPLE).unwrap();
        let config = Config::load(&path, &base_env()).unwrap();
        assert_eq!(config.path, path);
        config.environment("edge").unwrap();

        std::fs::write(&path, format!("{MINI}hostz = 1\n")).unwrap();
        let err = Config::load(&path, &base_env()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}:7: ", path.display())),
            "{err}"
        );

        let err = Config::load(&dir.path().join("nope.toml"), &base_env()).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn debug_hides_variables() {
        let config = Config::parse(
            MINI,
            "deploy.toml",
            &env_of(&[("HOME", "/h"), ("DEPLOYCTL_USER", "hunter2")]),
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn ssh_config_and_proxy_jump() {
        let base = "app = \"a\"\ndeploy_to = \"/srv/a\"\n[defaults]\n";
        let envs = "[environments.x]\nhosts = [\"web\"]\n\
                    [environments.y]\nhosts = [\"web\"]\nssh_config = false\nproxy_jump = \"none\"\n\
                    [environments.z]\nhosts = [\"web\"]\nuser = \"d\"\nknown_hosts = \"/kh\"\n";
        let c = parse(&format!(
            "{base}ssh_config = \"~/ssh/cfg\"\nproxy_jump = \"j@b1:2200,ssh://b2\"\n{envs}"
        ))
        .unwrap();
        let x = c.environment("x").unwrap();
        assert_eq!(
            x.ssh_config,
            SshConfigSource::Given("/home/ci/ssh/cfg".into())
        );
        let hops: Vec<String> = x
            .proxy_jump
            .unwrap()
            .iter()
            .map(|j| j.to_string())
            .collect();
        assert_eq!(hops, ["j@b1:2200", "b2"]);
        assert!(!x.user_set && !x.known_hosts_set);
        let y = c.environment("y").unwrap();
        assert_eq!(
            (y.ssh_config, y.proxy_jump),
            (SshConfigSource::Off, Some(vec![]))
        );
        let z = c.environment("z").unwrap();
        assert!(z.user_set && z.known_hosts_set);
        let d = parse(&format!("{base}{envs}"))
            .unwrap()
            .environment("x")
            .unwrap();
        assert_eq!(
            d.ssh_config,
            SshConfigSource::Default("/home/ci/.ssh/config".into())
        );
        assert_eq!(d.proxy_jump, None);
        let text = format!("{base}proxy_jump = \"b1,,b2\"\n{envs}");
        let e = parse_err(&text).to_string();
        assert!(
            e.starts_with(&format!(
                "deploy.toml:{}: `defaults.proxy_jump`",
                line_of(&text, "proxy_jump")
            )),
            "{e}"
        );
        let e = parse_err(&format!("{base}ssh_config = true\n{envs}")).to_string();
        assert!(e.contains("expected a path, or false"), "{e}");
    }
}
