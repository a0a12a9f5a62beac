//! `deployctl bootstrap ENV`: install or upgrade `deploy-agent` on every host of an
//! environment, over the same SSH connection (and host-key checks) as every other command.
//!
//! Per host, in three phases:
//!
//! 1. **Look** (every host, in parallel, read-only): log in, find out whether we are root
//!    or may `sudo -n`, whether systemd runs, and the sha256 of what is installed. If any
//!    host fails here, nothing is changed anywhere.
//! 2. **Change** only what differs: the binary (uploaded over an exec channel to a temp
//!    file next to its target, sha256-checked and run once with `--version` on the host,
//!    then renamed over the old one), `agent.toml` (merged: other apps' `allowed_roots`
//!    and keys bootstrap does not manage are kept), the group and the SSH user's
//!    membership, the unit; then `systemctl daemon-reload` / `enable` / `restart` as
//!    needed. With `--no-systemd` the agent runs as a background process whose pid is
//!    kept in `agent.pid` next to its socket; an upgrade stops the old one by that pid.
//! 3. **Verify** like `check`: a new SSH connection (so a new group membership counts),
//!    the agent handshake through the normal transport, a `Check`, and the agent's
//!    version must equal the installed binary's.
//!
//! `<deploy_to>` (the agent's journal, lock and history) is never touched.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::{find_keys, load_env};
use crate::cli::Cli;
use crate::config::{Environment, Host};
use crate::exit::{self, Failure};
use crate::output::Progress;
use crate::report::table;
use crate::ssh::{self, keys::KeySource, shell_quote};
use crate::transport;

/// The unit we install, with its paths adjusted by [`render_unit`].
const UNIT: &str = include_str!("../../../systemd/deploy-agent.service");
const UNIT_NAME: &str = "deploy-agent.service";
const UNIT_PATH: &str = "/etc/systemd/system/deploy-agent.service";
const DEFAULT_BIN: &str = "/usr/local/bin/deploy-agent";
const DEFAULT_CONFIG: &str = "/etc/deploy-agent/agent.toml";
/// How long an old agent gets to exit (it finishes deploys in flight first).
const STOP_WAIT_SECS: u32 = 60;
/// How long a new background agent gets to say it is ready.
const START_WAIT_SECS: u32 = 15;
/// Verification retries (a restarted agent may need a moment).
const VERIFY_ATTEMPTS: u32 = 10;

pub struct BootstrapArgs {
    pub env: String,
    pub json: bool,
    pub agent_binary: Option<PathBuf>,
    pub no_systemd: bool,
    pub prefix: Option<PathBuf>,
    pub socket_group: String,
}

/// Where things go on every host; the same for the whole environment.
#[derive(Debug, Clone)]
struct Plan {
    local_bin: PathBuf,
    bin_sha: String,
    bin_len: u64,
    /// Installed binary.
    bin: String,
    config: String,
    unit_path: String,
    /// Who the unit runs the agent as, when not root.
    identity: Option<Identity>,
    deploy_to: String,
    socket: String,
    /// `--no-systemd`: next to the socket.
    pid_file: String,
    log_file: String,
    /// The parent of `deploy_to`, added to `allowed_roots`.
    root: String,
    group: String,
    systemd: bool,
}

/// A failure on one host, with the exit code it stands for.
#[derive(Debug)]
struct HostError {
    code: u8,
    message: String,
}

impl HostError {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    fn failed(message: impl Into<String>) -> Self {
        Self::new(exit::DEPLOY_FAILED, message)
    }
}

/// What phase 1 found on a host.
#[derive(Debug, Default, Clone)]
struct State {
    user: String,
    bin_sha: String,
    bin_version: String,
    config_sha: String,
    unit_sha: String,
    systemctl: bool,
    systemd_running: bool,
    group: bool,
    member: bool,
    have_sha256sum: bool,
    /// A running agent started by an earlier `--no-systemd` bootstrap.
    pid: Option<u32>,
    enabled: bool,
    active: bool,
    /// The groups of the unit's `User=`; `None` when that user does not exist.
    unit_user_groups: Option<Vec<String>>,
    /// The unit's `Group=` exists.
    unit_group: bool,
    /// Owner of `deploy_to`; `None` when it does not exist.
    deploy_to_owner: Option<String>,
}

/// An SSH session that runs scripts as root (directly, or with `sudo -n`).
struct Remote {
    name: String,
    session: ssh::Session,
    sudo: bool,
}

struct Run {
    status: Option<u32>,
    stdout: String,
    stderr: String,
}

impl Remote {
    fn wrap(&self, script: &str) -> String {
        let sh = format!("sh -c {}", shell_quote(script));
        if self.sudo {
            format!("sudo -n {sh}")
        } else {
            sh
        }
    }

    async fn run_as_user(&self, command: &str) -> Result<Run, HostError> {
        self.exec(command.to_owned(), tokio::io::empty()).await
    }

    async fn run(&self, script: &str) -> Result<Run, HostError> {
        self.exec(self.wrap(script), tokio::io::empty()).await
    }

    async fn exec(
        &self,
        command: String,
        input: impl tokio::io::AsyncRead + Unpin,
    ) -> Result<Run, HostError> {
        let (status, out, err) = self
            .session
            .exec_with_input(&command, input)
            .await
            .map_err(|e| HostError::new(exit::CONNECT, e.to_string()))?;
        Ok(Run {
            status,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
        })
    }

    /// Runs a script as root; a non-zero exit is an error that says what failed.
    async fn run_ok(&self, what: &str, script: &str) -> Result<String, HostError> {
        let r = self.run(script).await?;
        check_status(what, r)
    }

    /// Writes `input` to `path` atomically (temp file in the same dir, sha256 checked,
    /// chmod, rename). With `probe_version`, the new file is run with `--version` before
    /// the rename and its first line returned, so a binary that cannot run on the host
    /// never replaces a working one.
    async fn put(
        &self,
        path: &str,
        input: impl tokio::io::AsyncRead + Unpin,
        sha: &str,
        mode: &str,
        probe_version: bool,
        backup: bool,
    ) -> Result<String, HostError> {
        let dir = parent(path);
        let name = Path::new(path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let version = if probe_version {
            "ver=$(\"$tmp\" --version 2>&1) || { echo \"it does not run on this host \
             (wrong architecture?): $ver\" >&2; exit 66; }\necho \"$ver\" | head -n 1\n"
        } else {
            ""
        };
        let backup = if backup {
            format!(
                "if [ -f {p} ]; then cp -p {p} {b}; fi\n",
                p = shell_quote(path),
                b = shell_quote(&format!("{path}.bak"))
            )
        } else {
            String::new()
        };
        let script = format!(
            "set -e\n\
             mkdir -p {dir}\n\
             tmp=$(mktemp {tmpl})\n\
             trap 'rm -f \"$tmp\"' EXIT\n\
             cat > \"$tmp\"\n\
             sum=$(sha256sum \"$tmp\" | cut -d' ' -f1)\n\
             if [ \"$sum\" != {sha} ]; then echo \"sha256 mismatch after upload: got $sum, \
             expected {sha}\" >&2; exit 65; fi\n\
             chmod {mode} \"$tmp\"\n\
             {version}{backup}mv -f \"$tmp\" {path}\n",
            dir = shell_quote(&dir),
            tmpl = shell_quote(&format!("{dir}/.{name}.XXXXXX")),
            path = shell_quote(path),
        );
        let r = self.exec(self.wrap(&script), input).await?;
        check_status(&format!("installing {path}"), r)
    }
}

fn check_status(what: &str, r: Run) -> Result<String, HostError> {
    if r.status == Some(0) {
        return Ok(r.stdout);
    }
    let why = match r.status {
        Some(c) => format!("exit {c}"),
        None => "killed".into(),
    };
    let detail = r.stderr.trim();
    let detail = if detail.is_empty() {
        r.stdout.trim()
    } else {
        detail
    };
    Err(HostError::failed(format!(
        "{what} failed ({why}){}{}",
        if detail.is_empty() { "" } else { ": " },
        detail
    )))
}

/// The parent dir of a remote path (POSIX, as a string).
fn parent(path: &str) -> String {
    match Path::new(path).parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_string_lossy().into_owned(),
        _ => "/".into(),
    }
}

/// `prefix` + an absolute path.
fn under(prefix: Option<&Path>, path: &str) -> String {
    match prefix {
        Some(p) => p
            .join(path.trim_start_matches('/'))
            .to_string_lossy()
            .into_owned(),
        None => path.to_owned(),
    }
}

/// The binary's path on the host: `agent_bin` when absolute, else the default; under
/// `--prefix` unless it already lies there.
fn bin_path(agent_bin: &str, prefix: Option<&Path>) -> String {
    let base = if agent_bin.starts_with('/') {
        agent_bin
    } else {
        DEFAULT_BIN
    };
    match prefix {
        Some(p) if Path::new(base).starts_with(p) => base.to_owned(),
        _ => under(prefix, base),
    }
}

/// The packaged unit, pointed at the binary and config we install, the socket group
/// (`SupplementaryGroups=`, or `Group=` in a unit that runs as root) and the allowed roots
/// (`ReadWritePaths=`, each `-`-prefixed so a root that does not exist yet does not stop
/// the unit). A unit without those lines is left as it is.
fn render_unit(bin: &str, config: &str, group: &str, roots: &[String]) -> String {
    let mut text = String::new();
    for line in UNIT.lines() {
        let t = line.trim();
        let line = if t.starts_with("ExecStart=") {
            line.replace(DEFAULT_BIN, bin)
                .replace(DEFAULT_CONFIG, config)
        } else if t == "Group=deploy" {
            format!("Group={group}")
        } else if let Some(v) = t.strip_prefix("SupplementaryGroups=") {
            let groups: Vec<&str> = v
                .split_whitespace()
                .map(|g| if g == "deploy" { group } else { g })
                .collect();
            format!("SupplementaryGroups={}", groups.join(" "))
        } else if t.starts_with("ReadWritePaths=") && !roots.is_empty() {
            let paths: Vec<String> = roots
                .iter()
                .map(|r| format!("-{}", r.trim_end_matches('/')))
                .collect();
            format!("ReadWritePaths={}", paths.join(" "))
        } else {
            line.to_owned()
        };
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// Who the unit runs the agent as, when not root: `User=`, `Group=` (default: the user's
/// own group) and `SupplementaryGroups=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Identity {
    user: String,
    group: String,
    supplementary: Vec<String>,
}

fn unit_identity(unit: &str) -> Option<Identity> {
    let value = |key: &str| {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().to_owned())
            .next_back()
            .filter(|v| !v.is_empty())
    };
    let user = value("User=").filter(|u| u != "root" && u != "0")?;
    Some(Identity {
        group: value("Group=").unwrap_or_else(|| user.clone()),
        supplementary: value("SupplementaryGroups=")
            .map(|v| v.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
        user,
    })
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// What to do with `agent.toml`.
#[derive(Debug, PartialEq, Eq)]
enum ConfigChange {
    Keep,
    Write { text: String, note: Option<String> },
}

/// Decides `agent.toml`: kept when it already has our socket and group and allows our
/// root (whatever its formatting); else rewritten, keeping the other `allowed_roots`
/// (other apps on the same host) and any key bootstrap does not manage.
fn plan_config(
    existing: Option<&str>,
    socket: &str,
    group: &str,
    root: &str,
) -> (ConfigChange, Vec<String>) {
    let mut table = toml::Table::new();
    let mut roots: Vec<String> = Vec::new();
    let mut note = None;
    if let Some(text) = existing {
        match text.parse::<toml::Table>() {
            Ok(t) => {
                let s = t.get("socket").and_then(|v| v.as_str());
                let g = t.get("socket_group").and_then(|v| v.as_str());
                roots = t
                    .get("allowed_roots")
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let has_root = roots.iter().any(|r| r.trim_end_matches('/') == root);
                if s == Some(socket) && g == Some(group) && has_root {
                    return (ConfigChange::Keep, roots);
                }
                table = t;
            }
            Err(_) => {
                note = Some("the old file did not parse; it is kept as agent.toml.bak".into());
            }
        }
    }
    if !roots.iter().any(|r| r.trim_end_matches('/') == root) {
        roots.push(root.to_owned());
    }
    table.insert("socket".into(), socket.into());
    table.insert("socket_group".into(), group.into());
    table.insert(
        "allowed_roots".into(),
        toml::Value::Array(roots.iter().cloned().map(toml::Value::String).collect()),
    );
    let body = toml::to_string(&table).unwrap_or_default();
    let change = ConfigChange::Write {
        text: format!(
            "# deploy-agent config, written by `deployctl bootstrap`. A later bootstrap keeps\n\
             # the allowed_roots of other apps and any key it does not manage.\n{body}"
        ),
        note,
    };
    (change, roots)
}

/// `deploy-agent 0.1.0 (protocol 1)` → `0.1.0`.
fn parse_version(line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some(_), Some(v)) => Some(v.to_owned()),
        _ => None,
    }
}

fn valid_group(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 32
        && !g.starts_with('-')
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn default_agent_binary() -> Result<PathBuf, Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::usage(format!("cannot find deployctl's own path: {e}")))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    Ok(dir.join(format!("deploy-agent{}", std::env::consts::EXE_SUFFIX)))
}

fn make_plan(env: &Environment, args: &BootstrapArgs) -> Result<Plan, Failure> {
    if let Some(h) = env.hosts.iter().find(|h| matches!(h, Host::Local)) {
        return Err(Failure::usage(format!(
            "environment `{}` has host `{h}`: bootstrap installs over SSH; on this machine, \
             install deploy-agent by hand (see the README, \"Install\")",
            env.name
        )));
    }
    if !valid_group(&args.socket_group) {
        return Err(Failure::usage(format!(
            "--socket-group {:?} is not a valid group name",
            args.socket_group
        )));
    }
    let prefix = args.prefix.as_deref();
    if let Some(p) = prefix {
        if !p.is_absolute() {
            return Err(Failure::usage(format!(
                "--prefix {} must be an absolute path",
                p.display()
            )));
        }
        if !args.no_systemd {
            return Err(Failure::usage(
                "--prefix needs --no-systemd: systemd reads units only from its own \
                 directories, so a prefixed install cannot be run by it",
            ));
        }
    }
    if !env.agent_socket.starts_with('/') {
        return Err(Failure::usage(format!(
            "agent_socket {:?} must be an absolute path",
            env.agent_socket
        )));
    }
    let deploy_to = Path::new(&env.deploy_to);
    let root = match deploy_to.parent() {
        Some(p) if p != Path::new("/") && !p.as_os_str().is_empty() => {
            p.to_string_lossy().into_owned()
        }
        _ => {
            return Err(Failure::usage(format!(
                "deploy_to {} lies directly under /: the agent's allowed_roots would be / \
                 (everything); put the app one level deeper, e.g. /srv/{}",
                env.deploy_to, env.app
            )));
        }
    };
    let local_bin = match &args.agent_binary {
        Some(p) => p.clone(),
        None => default_agent_binary()?,
    };
    let bytes = std::fs::read(&local_bin).map_err(|e| {
        Failure::usage(format!(
            "cannot read the agent binary {}: {e}; build it (cargo build --release --bins) \
             or pass --agent-binary PATH (a Linux build for the servers' architecture)",
            local_bin.display()
        ))
    })?;
    let bin = bin_path(&env.agent_bin, prefix);
    let config = under(prefix, DEFAULT_CONFIG);
    let socket_dir = parent(&env.agent_socket);
    Ok(Plan {
        bin_sha: sha256_hex(&bytes),
        bin_len: bytes.len() as u64,
        local_bin,
        unit_path: UNIT_PATH.into(),
        identity: unit_identity(&render_unit(&bin, &config, &args.socket_group, &[])),
        deploy_to: env.deploy_to.clone(),
        bin,
        config,
        socket: env.agent_socket.clone(),
        pid_file: format!("{}/agent.pid", socket_dir.trim_end_matches('/')),
        log_file: format!("{}/agent.log", socket_dir.trim_end_matches('/')),
        root,
        group: args.socket_group.clone(),
        systemd: !args.no_systemd,
    })
}

/// A shell function `alive PID`: true when PID runs our binary (its old inode counts:
/// after an upgrade /proc/PID/exe reads "<path> (deleted)"). Never trusts a bare PID,
/// which may have been reused.
fn alive_fn(bin: &str) -> String {
    let dir = parent(bin);
    let name = Path::new(bin)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "realbin=\"$(cd {dir} 2>/dev/null && pwd -P)/\"{name}\n\
         alive() {{\n\
           [ -n \"$1\" ] || return 1\n\
           exe=$(readlink \"/proc/$1/exe\" 2>/dev/null) || return 1\n\
           [ \"$exe\" = \"$realbin\" ] || [ \"$exe\" = \"$realbin (deleted)\" ]\n\
         }}\n",
        dir = shell_quote(&dir),
        name = shell_quote(&name),
    )
}

// ---------------------------------------------------------------------------------------
// Phase 1: look
// ---------------------------------------------------------------------------------------

async fn look(
    host: &Host,
    env: &Environment,
    keys: Arc<Vec<KeySource>>,
    plan: &Plan,
) -> Result<(Remote, State), HostError> {
    let name = host.to_string();
    let target = match transport::ssh_target(host, env, keys) {
        Ok(Some(t)) => t,
        Ok(None) => return Err(HostError::new(exit::USAGE, "bootstrap needs SSH")),
        Err(e) => return Err(HostError::new(exit::USAGE, e.to_string())),
    };
    let session = ssh::connect(target, transport::ssh_options(env))
        .await
        .map_err(|e| HostError::new(exit::CONNECT, e.to_string()))?;
    let mut remote = Remote {
        name: name.clone(),
        session,
        sudo: false,
    };
    let id = remote.run_as_user("id -u").await?;
    let uid = id.stdout.trim();
    if id.status != Some(0) || uid.is_empty() {
        return Err(HostError::failed(format!(
            "{name}: `id -u` failed: {}",
            id.stderr.trim()
        )));
    }
    if uid != "0" {
        let s = remote.run_as_user("sudo -n true").await?;
        if s.status != Some(0) {
            let err = s.stderr.trim();
            let user = host.user_or(&env.user);
            let msg = if err.contains("not found") || s.status == Some(127) {
                format!(
                    "{name}: {user} is not root and sudo is not installed; bootstrap as root \
                     (user = \"root\" or DEPLOYCTL_USER=root) or install sudo"
                )
            } else {
                format!(
                    "{name}: {user} is not root and `sudo -n` refused ({err}); bootstrap needs \
                     root: allow passwordless sudo for {user} (e.g. \"{user} ALL=(ALL) \
                     NOPASSWD: ALL\" in /etc/sudoers.d/deployctl), or bootstrap as root"
                )
            };
            return Err(HostError::new(exit::CONNECT, msg));
        }
        remote.sudo = true;
    }
    let user = remote.run_as_user("id -un").await?.stdout.trim().to_owned();
    let ident = plan.identity.clone().unwrap_or_default();
    let script = format!(
        "bin={bin}; conf={conf}; unit={unit}; pidf={pidf}; grp={grp}; user={user}\n\
         uu={uu}; ug={ug}; dt={dt}\n\
         {alive}\
         sha() {{ if [ -f \"$1\" ]; then sha256sum \"$1\" | cut -d' ' -f1; fi; }}\n\
         command -v sha256sum >/dev/null 2>&1 && echo have_sha256sum=yes\n\
         echo \"bin_sha=$(sha \"$bin\")\"\n\
         if [ -x \"$bin\" ]; then echo \"bin_version=$(\"$bin\" --version 2>/dev/null | head -n 1)\"; fi\n\
         echo \"config_sha=$(sha \"$conf\")\"\n\
         echo \"unit_sha=$(sha \"$unit\")\"\n\
         command -v systemctl >/dev/null 2>&1 && echo systemctl=yes\n\
         [ -d /run/systemd/system ] && echo systemd_running=yes\n\
         if getent group \"$grp\" >/dev/null 2>&1 || grep -q \"^$grp:\" /etc/group 2>/dev/null; then echo group=yes; fi\n\
         case \" $(id -Gn \"$user\" 2>/dev/null) \" in *\" $grp \"*) echo member=yes;; esac\n\
         if [ -n \"$uu\" ]; then\n\
           id -u \"$uu\" >/dev/null 2>&1 && echo \"unit_user_groups=$(id -Gn \"$uu\")\"\n\
           if getent group \"$ug\" >/dev/null 2>&1 || grep -q \"^$ug:\" /etc/group 2>/dev/null; then echo unit_group=yes; fi\n\
         fi\n\
         if [ -e \"$dt\" ]; then echo \"deploy_to_owner=$(stat -c %U \"$dt\" 2>/dev/null || echo '?')\"; fi\n\
         pid=$(cat \"$pidf\" 2>/dev/null || true)\n\
         if alive \"$pid\"; then echo \"pid=$pid\"; fi\n\
         if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then\n\
           systemctl is-enabled --quiet {unit_name} 2>/dev/null && echo enabled=yes\n\
           systemctl is-active --quiet {unit_name} 2>/dev/null && echo active=yes\n\
         fi\n\
         exit 0\n",
        bin = shell_quote(&plan.bin),
        conf = shell_quote(&plan.config),
        unit = shell_quote(&plan.unit_path),
        pidf = shell_quote(&plan.pid_file),
        grp = shell_quote(&plan.group),
        user = shell_quote(&user),
        uu = shell_quote(&ident.user),
        ug = shell_quote(&ident.group),
        dt = shell_quote(&plan.deploy_to),
        alive = alive_fn(&plan.bin),
        unit_name = UNIT_NAME,
    );
    let out = remote.run_ok("inspecting the host", &script).await?;
    let mut st = State {
        user,
        ..Default::default()
    };
    for line in out.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let yes = v == "yes";
        match k {
            "have_sha256sum" => st.have_sha256sum = yes,
            "bin_sha" => st.bin_sha = v.to_owned(),
            "bin_version" => st.bin_version = v.to_owned(),
            "config_sha" => st.config_sha = v.to_owned(),
            "unit_sha" => st.unit_sha = v.to_owned(),
            "systemctl" => st.systemctl = yes,
            "systemd_running" => st.systemd_running = yes,
            "group" => st.group = yes,
            "member" => st.member = yes,
            "unit_user_groups" => {
                st.unit_user_groups = Some(v.split_whitespace().map(str::to_owned).collect())
            }
            "unit_group" => st.unit_group = yes,
            "deploy_to_owner" => st.deploy_to_owner = Some(v.to_owned()),
            "pid" => st.pid = v.parse().ok(),
            "enabled" => st.enabled = yes,
            "active" => st.active = yes,
            _ => {}
        }
    }
    if !st.have_sha256sum {
        return Err(HostError::new(
            exit::USAGE,
            format!(
                "{name}: sha256sum is not installed (coreutils or busybox); nothing was changed"
            ),
        ));
    }
    if plan.systemd && !(st.systemctl && st.systemd_running) {
        let why = if !st.systemctl {
            "systemctl is not installed"
        } else {
            "systemd is not running (no /run/systemd/system: a container?)"
        };
        return Err(HostError::new(
            exit::USAGE,
            format!(
                "{name}: {why}; nothing was changed. Rerun with --no-systemd to install the \
                 binary and config and run the agent as a background process (for test rigs \
                 and containers), or install the unit by hand"
            ),
        ));
    }
    Ok((remote, st))
}

// ---------------------------------------------------------------------------------------
// Phase 2: change
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Applied {
    /// Human-readable changes, in order.
    changes: Vec<String>,
    /// The installed binary's version (`deploy-agent --version`).
    version: String,
    previous_version: Option<String>,
    binary_changed: bool,
    config_changed: bool,
    unit_changed: bool,
    pid: Option<u32>,
    notes: Vec<String>,
}

async fn apply(
    remote: &Remote,
    st: &State,
    plan: &Plan,
    progress: &Progress,
) -> Result<Applied, HostError> {
    let name = &remote.name;
    let mut a = Applied::default();

    // The group, and the SSH user in it (takes effect on the next login: verify makes a
    // new connection).
    if !st.group {
        remote
            .run_ok(
                &format!("creating group {}", plan.group),
                &format!(
                    "g={g}\nif command -v groupadd >/dev/null 2>&1; then groupadd --system \"$g\"; \
                     else addgroup -S \"$g\"; fi",
                    g = shell_quote(&plan.group)
                ),
            )
            .await?;
        a.changes.push(format!("group {} created", plan.group));
        progress.line(name, &format!("created group {}", plan.group));
    }
    if !st.member {
        remote
            .run_ok(
                &format!("adding {} to group {}", st.user, plan.group),
                &format!(
                    "g={g}; u={u}\nif command -v usermod >/dev/null 2>&1; then usermod -aG \"$g\" \"$u\"; \
                     else addgroup \"$u\" \"$g\"; fi",
                    g = shell_quote(&plan.group),
                    u = shell_quote(&st.user)
                ),
            )
            .await?;
        a.changes
            .push(format!("{} added to group {}", st.user, plan.group));
        progress.line(name, &format!("added {} to group {}", st.user, plan.group));
    }

    // The binary.
    if st.bin_sha != plan.bin_sha {
        progress.line(
            name,
            &format!(
                "uploading {} ({}) to {}",
                plan.local_bin.display(),
                crate::output::mib(plan.bin_len),
                plan.bin
            ),
        );
        let file = tokio::fs::File::open(&plan.local_bin).await.map_err(|e| {
            HostError::failed(format!("cannot open {}: {e}", plan.local_bin.display()))
        })?;
        let line = remote
            .put(&plan.bin, file, &plan.bin_sha, "755", true, false)
            .await?;
        a.version = parse_version(line.trim()).ok_or_else(|| {
            HostError::failed(format!(
                "{name}: the uploaded binary printed {:?} for --version; is it deploy-agent?",
                line.trim()
            ))
        })?;
        a.binary_changed = true;
        a.previous_version = parse_version(&st.bin_version);
        let what = match &a.previous_version {
            Some(old) if *old != a.version => format!("agent upgraded {old} -> {}", a.version),
            Some(_) => format!("agent upgraded (a new build of {})", a.version),
            None if st.bin_sha.is_empty() => format!("agent {} installed", a.version),
            None => format!("agent {} installed over an unreadable binary", a.version),
        };
        progress.line(name, &format!("{what} at {}", plan.bin));
        a.changes.push(what);
    } else {
        a.version = parse_version(&st.bin_version).ok_or_else(|| {
            HostError::failed(format!(
                "{name}: {} has the right sha256 but `--version` printed {:?}",
                plan.bin, st.bin_version
            ))
        })?;
    }

    // The config.
    let existing = if st.config_sha.is_empty() {
        None
    } else {
        Some(
            remote
                .run_ok(
                    "reading the agent config",
                    &format!("cat {}", shell_quote(&plan.config)),
                )
                .await?,
        )
    };
    let (change, roots) = plan_config(existing.as_deref(), &plan.socket, &plan.group, &plan.root);
    match change {
        ConfigChange::Keep => {}
        ConfigChange::Write { text, note } => {
            let sha = sha256_hex(text.as_bytes());
            remote
                .put(
                    &plan.config,
                    text.as_bytes(),
                    &sha,
                    "644",
                    false,
                    existing.is_some(),
                )
                .await?;
            a.config_changed = true;
            let what = if existing.is_some() {
                format!("config {} updated (old one in agent.toml.bak)", plan.config)
            } else {
                format!("config {} written", plan.config)
            };
            progress.line(name, &what);
            a.changes.push(what);
            a.notes.extend(note);
        }
    }

    if plan.systemd {
        apply_systemd(remote, st, plan, &roots, progress, &mut a).await?;
    } else {
        apply_background(remote, st, plan, progress, &mut a).await?;
    }
    Ok(a)
}

async fn apply_systemd(
    remote: &Remote,
    st: &State,
    plan: &Plan,
    roots: &[String],
    progress: &Progress,
    a: &mut Applied,
) -> Result<(), HostError> {
    let name = &remote.name;
    if let Some(id) = &plan.identity {
        // The socket group exists by now (made above when it was missing): when it is also
        // the unit's group, the look phase's answer for it is stale.
        let st = State {
            unit_group: st.unit_group || id.group == plan.group,
            ..st.clone()
        };
        ensure_identity(remote, &st, plan, id, progress, a).await?;
    }
    let unit_text = render_unit(&plan.bin, &plan.config, &plan.group, roots);
    let unit_sha = sha256_hex(unit_text.as_bytes());
    if st.unit_sha != unit_sha {
        remote
            .put(
                &plan.unit_path,
                unit_text.as_bytes(),
                &unit_sha,
                "644",
                false,
                false,
            )
            .await?;
        remote
            .run_ok("systemctl daemon-reload", "systemctl daemon-reload")
            .await?;
        a.unit_changed = true;
        let what = if st.unit_sha.is_empty() {
            "unit installed"
        } else {
            "unit updated"
        };
        progress.line(name, &format!("{what}: {}", plan.unit_path));
        a.changes.push(what.into());
    }
    if !st.enabled {
        remote
            .run_ok(
                "systemctl enable",
                &format!("systemctl enable --quiet {UNIT_NAME}"),
            )
            .await?;
        a.changes.push("unit enabled".into());
    }
    let changed = a.binary_changed || a.config_changed || a.unit_changed;
    let action = if !st.active {
        Some("start")
    } else if changed {
        Some("restart")
    } else {
        None
    };
    if let Some(action) = action {
        progress.line(name, &format!("systemctl {action} {UNIT_NAME}"));
        let r = remote
            .run(&format!("systemctl {action} {UNIT_NAME}"))
            .await?;
        if r.status != Some(0) {
            let status = remote
                .run(&format!(
                    "systemctl status --no-pager --lines=20 {UNIT_NAME} 2>&1 | tail -n 30"
                ))
                .await
                .map(|r| r.stdout)
                .unwrap_or_default();
            return Err(HostError::failed(format!(
                "{name}: systemctl {action} {UNIT_NAME} failed: {}\n{}",
                r.stderr.trim(),
                status.trim_end()
            )));
        }
        a.changes.push(format!("agent {action}ed"));
    }
    Ok(())
}

/// The unit runs the agent as its own user: that user and its group exist, it is in the
/// socket group (so it may give the socket away), and `deploy_to` exists and is its own
/// (the agent cannot create directories in a root-owned /srv). An existing `deploy_to`
/// is never changed, only reported when the agent could not write it.
async fn ensure_identity(
    remote: &Remote,
    st: &State,
    plan: &Plan,
    id: &Identity,
    progress: &Progress,
    a: &mut Applied,
) -> Result<(), HostError> {
    let name = &remote.name;
    let (u, g) = (shell_quote(&id.user), shell_quote(&id.group));
    let groups = match &st.unit_user_groups {
        Some(groups) => groups.clone(),
        None => {
            let gid = if st.unit_group {
                format!("--gid {g}")
            } else if id.group == id.user {
                "--user-group".to_owned()
            } else {
                remote
                    .run_ok(
                        &format!("creating group {}", id.group),
                        &format!("getent group {g} >/dev/null || groupadd --system {g}"),
                    )
                    .await?;
                format!("--gid {g}")
            };
            remote
                .run_ok(
                    &format!("creating user {}", id.user),
                    &format!(
                        "useradd --system {gid} --home-dir /var/lib/deploy-agent \
                         --no-create-home --shell /usr/sbin/nologin \
                         --comment 'deployctl agent' {u}"
                    ),
                )
                .await?;
            let what = format!("user {} created", id.user);
            progress.line(name, &what);
            a.changes.push(what);
            vec![id.group.clone()]
        }
    };
    for sg in &id.supplementary {
        if !groups.contains(sg) {
            remote
                .run_ok(
                    &format!("adding {} to group {sg}", id.user),
                    &format!("usermod -aG {} {u}", shell_quote(sg)),
                )
                .await?;
            a.changes.push(format!("{} added to group {sg}", id.user));
        }
    }
    match &st.deploy_to_owner {
        // 0755, as in deploy-agent.tmpfiles: the app's own user (a unit with `User=myapp`,
        // `WorkingDirectory=<deploy_to>/current`) must be able to enter it.
        None => {
            remote
                .run_ok(
                    &format!("creating {}", plan.deploy_to),
                    &format!(
                        "d={d}\nmkdir -p \"$d\" && chown {u}:{g} \"$d\" && chmod 0755 \"$d\"",
                        d = shell_quote(&plan.deploy_to)
                    ),
                )
                .await?;
            let what = format!("{} created for {}", plan.deploy_to, id.user);
            progress.line(name, &what);
            a.changes.push(what);
        }
        Some(owner) if owner != &id.user => a.notes.push(format!(
            "warning: {} belongs to {owner}, but the agent runs as {}; it cannot deploy there \
             until you `chown -R {}:{} {}`",
            plan.deploy_to, id.user, id.user, id.group, plan.deploy_to
        )),
        Some(_) => {}
    }
    Ok(())
}

async fn apply_background(
    remote: &Remote,
    st: &State,
    plan: &Plan,
    progress: &Progress,
    a: &mut Applied,
) -> Result<(), HostError> {
    let name = &remote.name;
    let changed = a.binary_changed || a.config_changed;
    if let Some(pid) = st.pid {
        if !changed {
            a.pid = Some(pid);
            return Ok(());
        }
        progress.line(name, &format!("stopping the old agent (pid {pid})"));
        let script = format!(
            "{alive}pid={pid}\n\
             if alive \"$pid\"; then kill -TERM \"$pid\"; fi\n\
             i=0\n\
             while alive \"$pid\"; do\n\
               i=$((i+1))\n\
               if [ \"$i\" -ge {limit} ]; then echo \"the old agent (pid $pid) is still running after \
             {STOP_WAIT_SECS}s; a deploy may be in flight: retry later\" >&2; exit 70; fi\n\
               sleep 0.1\n\
             done\n\
             rm -f {pidf}\n",
            alive = alive_fn(&plan.bin),
            limit = STOP_WAIT_SECS * 10,
            pidf = shell_quote(&plan.pid_file),
        );
        remote.run_ok("stopping the old agent", &script).await?;
        a.changes.push(format!("old agent (pid {pid}) stopped"));
    }
    progress.line(name, "starting the agent in the background (--no-systemd)");
    // The agent is started by a shell that writes its own pid, then execs it, detached
    // from the SSH session (setsid, nohup, no inherited fds). Ready = alive, and its log
    // (from this start on) says "ready".
    let script = format!(
        "{alive}sock={sock}; pidf={pidf}; log={log}; bin={bin}; conf={conf}\n\
         mkdir -p {sockdir}\n\
         cd /\n\
         rm -f \"$pidf\"\n\
         touch \"$log\"\n\
         size=$(wc -c < \"$log\")\n\
         ss=; if command -v setsid >/dev/null 2>&1; then ss=setsid; fi\n\
         nohup sh -c 'echo $$ > \"$1\"; exec $2 \"$3\" serve --config \"$4\"' sh \"$pidf\" \"$ss\" \"$bin\" \"$conf\" \
         </dev/null >>\"$log\" 2>&1 &\n\
         i=0\n\
         while :; do\n\
           pid=$(cat \"$pidf\" 2>/dev/null || true)\n\
           if alive \"$pid\" && [ -S \"$sock\" ] && tail -c +$((size+1)) \"$log\" | grep -q ' ready'; then\n\
             echo \"pid=$pid\"; exit 0\n\
           fi\n\
           if [ -n \"$pid\" ] && ! kill -0 \"$pid\" 2>/dev/null; then\n\
             echo \"the agent exited at once; the end of $log:\" >&2; tail -n 20 \"$log\" >&2; exit 71\n\
           fi\n\
           i=$((i+1))\n\
           if [ \"$i\" -ge {limit} ]; then\n\
             echo \"the agent is not ready after {START_WAIT_SECS}s; the end of $log:\" >&2; tail -n 20 \"$log\" >&2; exit 72\n\
           fi\n\
           sleep 0.1\n\
         done\n",
        alive = alive_fn(&plan.bin),
        sock = shell_quote(&plan.socket),
        pidf = shell_quote(&plan.pid_file),
        log = shell_quote(&plan.log_file),
        bin = shell_quote(&plan.bin),
        conf = shell_quote(&plan.config),
        sockdir = shell_quote(&parent(&plan.socket)),
        limit = START_WAIT_SECS * 10,
    );
    let out = remote.run_ok("starting the agent", &script).await?;
    a.pid = out
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .and_then(|p| p.trim().parse().ok());
    let pid = a
        .pid
        .map(|p| format!(" (pid {p}, in {})", plan.pid_file))
        .unwrap_or_default();
    let what = if st.pid.is_some() {
        format!("agent restarted{pid}")
    } else {
        format!("agent started{pid}")
    };
    progress.line(name, &what);
    a.changes.push(what);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Phase 3: verify
// ---------------------------------------------------------------------------------------

struct Verified {
    hostname: String,
    agent_version: String,
    note: String,
}

async fn verify(
    host: &Host,
    env: &Environment,
    keys: Arc<Vec<KeySource>>,
    expected: &str,
) -> Result<Verified, HostError> {
    let mut last = String::new();
    for attempt in 1..=VERIFY_ATTEMPTS {
        match super::check::probe(host, env, keys.clone()).await {
            Ok(r) => {
                let (hello, reply) =
                    r.map_err(|e| HostError::failed(format!("{host}: check: {e}")))?;
                if reply.agent_version != expected {
                    return Err(HostError::failed(format!(
                        "{host}: the agent answering on {} is version {}, but {expected} was \
                         installed; is another agent listening there?",
                        env.agent_socket, reply.agent_version
                    )));
                }
                let note = match &reply.deploy_to {
                    Some(p) if !p.allowed => {
                        return Err(HostError::failed(format!(
                            "{host}: the agent refuses deploy_to {} (outside its allowed_roots)",
                            p.path
                        )));
                    }
                    Some(p) => p
                        .free_bytes
                        .map(|b| format!("{} free", crate::output::mib(b)))
                        .unwrap_or_default(),
                    None => String::new(),
                };
                return Ok(Verified {
                    hostname: hello.hostname,
                    agent_version: reply.agent_version,
                    note,
                });
            }
            Err(e) => {
                last = e.to_string();
                if attempt < VERIFY_ATTEMPTS {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        }
    }
    Err(HostError::failed(format!(
        "installed, but the agent does not answer: {last}"
    )))
}

// ---------------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------------

/// How one host ended.
#[derive(Debug, Default)]
struct HostReport {
    host: String,
    code: u8,
    error: Option<String>,
    hostname: String,
    version: String,
    previous_version: Option<String>,
    changes: Vec<String>,
    notes: Vec<String>,
    pid: Option<u32>,
    disk: String,
}

impl HostReport {
    fn failed(host: &str, e: HostError) -> Self {
        Self {
            host: host.to_owned(),
            code: e.code.max(1),
            error: Some(e.message),
            ..Default::default()
        }
    }

    fn summary(&self, systemd: bool) -> String {
        if let Some(e) = &self.error {
            return e.clone();
        }
        let mut s = if self.changes.is_empty() {
            let what = if systemd { "config, unit" } else { "config" };
            format!("up to date: agent {}, {what}", self.version)
        } else {
            self.changes.join("; ")
        };
        if let Some(pid) = self.pid
            && self.changes.is_empty()
        {
            s.push_str(&format!("; running (pid {pid})"));
        }
        for n in &self.notes {
            s.push_str(&format!("; {n}"));
        }
        s
    }
}

pub async fn run(cli: &Cli, args: BootstrapArgs) -> Result<u8, Failure> {
    let env = load_env(cli, &args.env)?;
    let plan = Arc::new(make_plan(&env, &args)?);
    let keys = find_keys(&env)?;
    let progress = Progress::new(false);
    let names: Vec<String> = env.hosts.iter().map(|h| h.to_string()).collect();

    // Phase 1, every host; any failure and nothing changes anywhere.
    let mut set = tokio::task::JoinSet::new();
    for (i, host) in env.hosts.iter().cloned().enumerate() {
        let (env, keys, plan) = (env.clone(), keys.clone(), plan.clone());
        set.spawn(async move { (i, look(&host, &env, keys, &plan).await) });
    }
    let mut looked: Vec<Option<Result<(Remote, State), HostError>>> =
        (0..env.hosts.len()).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        match r {
            Ok((i, r)) => looked[i] = Some(r),
            Err(e) => return Err(Failure::new(exit::CONNECT, format!("bootstrap task: {e}"))),
        }
    }
    let looked: Vec<Result<(Remote, State), HostError>> = looked
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(HostError::failed("no result"))))
        .collect();

    let mut reports: Vec<HostReport> = Vec::new();
    if looked.iter().any(|r| r.is_err()) {
        for (name, r) in names.iter().zip(looked) {
            match r {
                Ok((remote, _)) => {
                    remote.session.close().await;
                    reports.push(HostReport {
                        host: name.clone(),
                        code: exit::OK,
                        error: Some("not changed (another host failed)".into()),
                        ..Default::default()
                    });
                }
                Err(e) => {
                    progress.error(Some(name), &e.message);
                    progress.finish_host(name, "bootstrap refused");
                    reports.push(HostReport::failed(name, e));
                }
            }
        }
        let code = reports.iter().map(|r| r.code).max().unwrap_or(exit::OK);
        print(&env, &plan, &reports, code, args.json);
        return Ok(code);
    }

    // Phases 2 and 3, at most max_parallel hosts at once.
    let limit = Arc::new(tokio::sync::Semaphore::new(env.max_parallel.max(1) as usize));
    let mut set = tokio::task::JoinSet::new();
    for (i, (host, r)) in env.hosts.iter().cloned().zip(looked).enumerate() {
        let Ok((remote, st)) = r else { continue };
        let (env, keys, plan, progress, limit) = (
            env.clone(),
            keys.clone(),
            plan.clone(),
            progress.clone(),
            limit.clone(),
        );
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let name = host.to_string();
            let applied = apply(&remote, &st, &plan, &progress).await;
            remote.session.close().await;
            let report = match applied {
                Err(e) => HostReport::failed(&name, e),
                Ok(a) => match verify(&host, &env, keys, &a.version).await {
                    Err(e) => {
                        let mut r = HostReport::failed(&name, e);
                        r.changes = a.changes;
                        r
                    }
                    Ok(v) => {
                        progress.line(
                            &name,
                            &format!("ok: deploy-agent {} answers", v.agent_version),
                        );
                        HostReport {
                            host: name.clone(),
                            code: exit::OK,
                            error: None,
                            hostname: v.hostname,
                            version: v.agent_version,
                            previous_version: a.previous_version,
                            changes: a.changes,
                            notes: a.notes,
                            pid: a.pid,
                            disk: v.note,
                        }
                    }
                },
            };
            if let Some(e) = &report.error {
                progress.error(Some(&name), e);
            }
            progress.finish_host(
                &name,
                if report.error.is_some() {
                    "bootstrap failed"
                } else {
                    "bootstrapped"
                },
            );
            (i, report)
        });
    }
    let mut done: Vec<(usize, HostReport)> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(r) => done.push(r),
            Err(e) => {
                return Err(Failure::new(
                    exit::DEPLOY_FAILED,
                    format!("bootstrap task: {e}"),
                ));
            }
        }
    }
    done.sort_by_key(|(i, _)| *i);
    let reports: Vec<HostReport> = done.into_iter().map(|(_, r)| r).collect();
    let code = reports.iter().map(|r| r.code).max().unwrap_or(exit::OK);
    print(&env, &plan, &reports, code, args.json);
    Ok(code)
}

fn print(env: &Environment, plan: &Plan, reports: &[HostReport], code: u8, json: bool) {
    if json {
        let hosts: Vec<_> = reports
            .iter()
            .map(|r| {
                json!({
                    "host": r.host,
                    "ok": r.error.is_none(),
                    "changed": !r.changes.is_empty(),
                    "changes": r.changes,
                    "agent_version": (!r.version.is_empty()).then_some(&r.version),
                    "previous_version": r.previous_version,
                    "hostname": (!r.hostname.is_empty()).then_some(&r.hostname),
                    "pid": r.pid,
                    "notes": r.notes,
                    "disk": (!r.disk.is_empty()).then_some(&r.disk),
                    "error": r.error,
                    "exit_code": r.code,
                })
            })
            .collect();
        let doc = json!({
            "environment": env.name,
            "mode": if plan.systemd { "systemd" } else { "no-systemd" },
            "binary": plan.bin,
            "config": plan.config,
            "exit_code": code,
            "hosts": hosts,
        });
        crate::output::emit(&serde_json::to_string_pretty(&doc).unwrap_or_default());
        return;
    }
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.host.clone(),
                match (&r.error, r.changes.is_empty()) {
                    (Some(_), _) if r.code == exit::OK => "skipped".into(),
                    (Some(_), _) => "FAIL".into(),
                    (None, true) => "ok".into(),
                    (None, false) => "changed".into(),
                },
                if r.version.is_empty() {
                    "-".into()
                } else {
                    r.version.clone()
                },
                r.summary(plan.systemd),
            ]
        })
        .collect();
    crate::output::emit(&table(&["HOST", "RESULT", "AGENT", "WHAT"], &rows));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_path() {
        assert_eq!(bin_path("deploy-agent", None), DEFAULT_BIN);
        assert_eq!(
            bin_path("/opt/da/deploy-agent", None),
            "/opt/da/deploy-agent"
        );
        let p = Path::new("/tmp/x");
        assert_eq!(
            bin_path("deploy-agent", Some(p)),
            "/tmp/x/usr/local/bin/deploy-agent"
        );
        assert_eq!(bin_path("/opt/da", Some(p)), "/tmp/x/opt/da");
        assert_eq!(bin_path("/tmp/x/bin/da", Some(p)), "/tmp/x/bin/da");
    }

    #[test]
    fn unit_points_at_what_we_install() {
        let u = render_unit(DEFAULT_BIN, DEFAULT_CONFIG, "deploy", &[]);
        assert_eq!(
            u.trim_end(),
            UNIT.trim_end(),
            "defaults leave the unit as shipped"
        );
        let roots = vec!["/srv".to_owned(), "/opt/apps/".to_owned()];
        let u = render_unit("/opt/deploy-agent", DEFAULT_CONFIG, "ops", &roots);
        assert!(
            u.contains("ExecStart=/opt/deploy-agent serve --config /etc/deploy-agent/agent.toml"),
            "{u}"
        );
        assert!(!u.contains("Group=deploy\n"), "{u}");
        assert!(!u.contains("SupplementaryGroups=deploy\n"), "{u}");
        if UNIT.contains("ReadWritePaths=") {
            assert!(u.contains("ReadWritePaths=-/srv -/opt/apps\n"), "{u}");
        }
    }

    #[test]
    fn identity_from_the_unit() {
        let hardened =
            "[Service]\nUser=deploy-agent\nGroup=deploy-agent\nSupplementaryGroups=deploy docker\n";
        assert_eq!(
            unit_identity(hardened),
            Some(Identity {
                user: "deploy-agent".into(),
                group: "deploy-agent".into(),
                supplementary: vec!["deploy".into(), "docker".into()],
            })
        );
        assert_eq!(unit_identity("[Service]\nGroup=deploy\n"), None, "root");
        assert_eq!(unit_identity("User=root\n"), None);
        assert_eq!(unit_identity("User=a\n").unwrap().group, "a");
    }

    #[test]
    fn config_is_written_when_missing_and_kept_when_equivalent() {
        let sock = "/run/deploy-agent/agent.sock";
        let (ConfigChange::Write { text, note }, roots) = plan_config(None, sock, "deploy", "/srv")
        else {
            panic!("missing config must be written");
        };
        assert!(note.is_none());
        assert_eq!(roots, ["/srv"]);
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(t["socket"].as_str(), Some(sock));
        assert_eq!(t["socket_group"].as_str(), Some("deploy"));
        assert_eq!(t["allowed_roots"].as_array().unwrap().len(), 1);
        // our own output is kept as is, and so is a hand-written equivalent
        assert_eq!(
            plan_config(Some(&text), sock, "deploy", "/srv").0,
            ConfigChange::Keep
        );
        let hand = "socket = \"/run/deploy-agent/agent.sock\" # ours\nsocket_group = \"deploy\"\n\
                    allowed_roots = [\"/opt\", \"/srv/\"]\n";
        assert_eq!(
            plan_config(Some(hand), sock, "deploy", "/srv").0,
            ConfigChange::Keep
        );
    }

    #[test]
    fn config_merge_keeps_other_roots_and_keys() {
        let old =
            "socket = \"/old.sock\"\nallowed_roots = [\"/opt/other\"]\nmax_unpacked_bytes = 42\n";
        let (ConfigChange::Write { text, .. }, _) =
            plan_config(Some(old), "/run/a.sock", "deploy", "/srv")
        else {
            panic!("must change");
        };
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(t["socket"].as_str(), Some("/run/a.sock"));
        assert_eq!(t["max_unpacked_bytes"].as_integer(), Some(42));
        let roots: Vec<&str> = t["allowed_roots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(roots, ["/opt/other", "/srv"]);
        // a file that does not parse is replaced (and backed up by the caller)
        let (ConfigChange::Write { note, .. }, _) =
            plan_config(Some("not = = toml"), "/run/a.sock", "deploy", "/srv")
        else {
            panic!("must change");
        };
        assert!(note.is_some());
    }

    #[test]
    fn versions_and_groups() {
        assert_eq!(
            parse_version("deploy-agent 0.1.0 (protocol 1)").as_deref(),
            Some("0.1.0")
        );
        assert_eq!(parse_version(""), None);
        assert!(valid_group("deploy") && valid_group("www-data") && valid_group("1001"));
        assert!(
            !valid_group("") && !valid_group("a b") && !valid_group("-x") && !valid_group("a;b")
        );
    }
}
