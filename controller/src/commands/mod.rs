//! One module per command; this one holds what they share: loading the environment,
//! finding keys, connecting to every host, and taking the fleet lock.

pub mod bootstrap;
pub mod check;
pub mod destroy;
pub mod exec;
pub mod info;
pub mod instances;
pub mod logs;
pub mod promote;
pub mod push;
pub mod rollback;

use std::sync::Arc;
use std::time::Duration;

use proto::{AppRef, ComposeSpec, ErrorCode, HealthSpec, ReleaseSpec};

use crate::cli::Cli;
use crate::client::ClientError;
use crate::config::{Config, Environment, Host, Strategy};
use crate::exit::{self, Failure};
use crate::output::Progress;
use crate::ssh::keys::{self, KeySource};
use crate::transport::{self, ConnectError, HostConn};

pub fn load_env(cli: &Cli, name: &str) -> Result<Environment, Failure> {
    let getenv = |k: &str| std::env::var(k).ok();
    let config = Config::load(&cli.config, &getenv).map_err(|e| Failure::usage(e.to_string()))?;
    let mut env = config
        .environment(name)
        .map_err(|e| Failure::usage(e.to_string()))?;
    if cli.accept_new_host_keys {
        env.accept_new_host_keys = true;
    }
    crate::output::set_secrets(secret_values(&env));
    if let Some(h) = &env.health
        && h.url.starts_with("https://")
    {
        return Err(Failure::usage(format!(
            "{}: health.url {} is https, but the agent checks health on the server itself \
             over plain http; point it at the app's local port (http://127.0.0.1:PORT/...) \
             and check the public https URL with [environments.{}.verify]",
            env.name, h.url, env.name
        )));
    }
    select_instance(cli, &mut env)?;
    Ok(env)
}

/// Applies `--instance NAME` (review apps) to `env`: only for commands that act on one,
/// only in an environment with `instances = true`, and only a DNS label. Push, rollback
/// and destroy there require one: the app itself has no port, and a pull request must
/// never land on it by accident. Status, releases and history without one show the app
/// itself (whose history records every destroy and expiry).
fn select_instance(cli: &Cli, env: &mut Environment) -> Result<(), Failure> {
    use crate::cli::Command;
    let (given, command, required) = match &cli.command {
        Command::Push { env, .. } => (env.instance.as_deref(), "push", true),
        Command::Rollback { env, .. } => (env.instance.as_deref(), "rollback", true),
        Command::Destroy { env, .. } => (env.instance.as_deref(), "destroy", true),
        Command::Status { env } | Command::Releases { env } | Command::History { env, .. } => {
            (env.instance.as_deref(), "", false)
        }
        Command::Check { env } => (env.instance.as_deref(), "check", false),
        Command::Bootstrap { env, .. } => (env.instance.as_deref(), "bootstrap", false),
        _ => (None, "", false),
    };
    let Some(name) = given else {
        if required && env.instances.is_some() {
            return Err(Failure::usage(format!(
                "environment {} holds review apps (instances = true): pass --instance NAME \
                 to {command} one, e.g. `deployctl {command} {} --instance pr-42`",
                env.name, env.name
            )));
        }
        if command == "destroy" {
            return Err(Failure::usage(format!(
                "destroy needs --instance NAME, and environment {} has no review apps \
                 (instances = true)",
                env.name
            )));
        }
        return Ok(());
    };
    if matches!(command, "check" | "bootstrap") {
        return Err(Failure::usage(format!(
            "{command} works on hosts, not on one review app: drop --instance {name}"
        )));
    }
    if env.instances.is_none() {
        return Err(Failure::usage(format!(
            "--instance {name}: environment {} has no review apps; set instances = true and \
             instance_ports in [environments.{}]",
            env.name, env.name
        )));
    }
    if let Some(why) = proto::instance_name_problem(name) {
        return Err(Failure::usage(format!("--instance: {why}")));
    }
    env.instance = Some(name.to_owned());
    Ok(())
}

/// Everything that must never be printed: the CI key text, the values of variables
/// named in `secrets`, and the env-file values of keys named in `secrets`.
fn secret_values(env: &Environment) -> Vec<String> {
    let env_file = env
        .compose
        .env_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    secret_values_from(env, &|name| std::env::var(name).ok(), env_file.as_deref())
}

/// [`secret_values`] with the process environment and the env file passed in. Only what
/// is declared secret is masked: a value that merely looks like one (an image reference
/// with a digest, a long URL) stays readable, or `ps` output would be all `***`.
fn secret_values_from(
    env: &Environment,
    var: &dyn Fn(&str) -> Option<String>,
    env_file: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(key) = var("DEPLOYCTL_SSH_KEY") {
        // Line by line (how GitHub masks multi-line secrets); the armor lines are public.
        out.extend(
            key.lines()
                .map(str::trim)
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_owned),
        );
    }
    out.extend(env.secrets.iter().filter_map(|name| var(name)));
    for line in env_file.unwrap_or_default().lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim().trim_start_matches("export ").trim();
        if !env.secrets.iter().any(|s| s == key) {
            continue;
        }
        let value = value.trim().trim_matches('"').trim_matches('\'');
        // `${VAR}` in the file: its value comes from the environment.
        match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
            Some(name) => out.extend(var(name)),
            None => out.push(value.to_owned()),
        }
    }
    out
}

pub fn find_keys(env: &Environment) -> Result<Arc<Vec<KeySource>>, Failure> {
    if env.hosts.iter().all(|h| matches!(h, Host::Local)) {
        return Ok(Arc::new(Vec::new()));
    }
    let env_key = std::env::var("DEPLOYCTL_SSH_KEY").ok();
    let auth_sock = std::env::var_os("SSH_AUTH_SOCK").map(Into::into);
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let keys = keys::discover(
        env_key.as_deref(),
        env.ssh_key.as_deref(),
        auth_sock,
        home.as_deref(),
    )
    .map(Arc::new)
    .map_err(|e| Failure::usage(e.to_string()))?;
    // A bad ssh config (or a ProxyCommand) is a usage error, found before anything
    // connects.
    for host in &env.hosts {
        transport::ssh_target(host, env, keys.clone())
            .map_err(|e| Failure::usage(format!("{host}: {e}")))?;
    }
    Ok(keys)
}

pub fn app_ref(env: &Environment) -> AppRef {
    AppRef {
        name: env.app.clone(),
        deploy_to: env.deploy_to.clone(),
        instance: env.instance.clone(),
    }
}

pub fn release_spec(env: &Environment) -> ReleaseSpec {
    let mut spec = ReleaseSpec {
        shared: env.release.shared.clone(),
        migrate: env.release.migrate.clone(),
        restart: env.release.restart.clone(),
        stop: env.release.stop.clone(),
        command_timeout_ms: env.release.timeout.as_millis() as u64,
        keep_releases: env.keep_releases,
        health: health_spec(env),
        max_unpacked_bytes: env.release.max_unpacked_bytes,
        compose: None,
        // The agent gives a new instance a port from the pool, and expires idle ones.
        instance: env
            .instances
            .as_ref()
            .filter(|_| env.instance.is_some())
            .map(|i| proto::InstanceSpec {
                first_port: *i.ports.start(),
                last_port: *i.ports.end(),
                ttl_ms: i.ttl.map(|t| t.as_millis() as u64),
            }),
        // The agent masks these in its log and history too. The SSH key is not sent.
        redact: secret_values(env)
            .into_iter()
            .filter(|v| {
                std::env::var("DEPLOYCTL_SSH_KEY").map_or(true, |k| !k.contains(v.as_str()))
            })
            .collect(),
    };
    if env.strategy == Strategy::Compose {
        // The release holds only the compose files: the release strategy's shared
        // links and commands (perhaps inherited from [defaults.release]) do not apply.
        let (files, env_file) = crate::compose::release_names(env);
        spec.shared.clear();
        spec.migrate = None;
        spec.restart = None;
        spec.stop = None;
        spec.compose = Some(ComposeSpec {
            files,
            env_file,
            project: env.compose.project.clone(),
            pull: env.compose.pull,
            command: env.compose.compose_command.clone(),
        });
    }
    spec
}

pub fn health_spec(env: &Environment) -> Option<HealthSpec> {
    env.health.as_ref().map(|h| HealthSpec {
        url: h.url.clone(),
        expect_status: h.expect_status,
        retries: h.retries,
        interval_ms: h.interval.as_millis() as u64,
        request_timeout_ms: h.request_timeout.as_millis() as u64,
    })
}

/// Who is deploying, as recorded in the lock and the history.
pub fn holder() -> String {
    if std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true") {
        let repo = std::env::var("GITHUB_REPOSITORY").unwrap_or_default();
        let run = std::env::var("GITHUB_RUN_ID").unwrap_or_default();
        let actor = std::env::var("GITHUB_ACTOR").unwrap_or_default();
        return format!("github:{repo}#{run} ({actor})");
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(current_user_name)
        .unwrap_or_else(|| "unknown".into());
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{user}@{host}")
}

/// The name of the current uid from /etc/passwd (USER is unset under some CI runners).
fn current_user_name() -> Option<String> {
    let uid = rustix::process::getuid().as_raw();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _ = f.next();
        (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// Connects to every host at once. Any failure means the command does nothing.
pub async fn connect_all(
    env: &Environment,
    keys: &Arc<Vec<KeySource>>,
    progress: &Progress,
) -> Result<Vec<HostConn>, Failure> {
    let mut set = tokio::task::JoinSet::new();
    for (i, host) in env.hosts.iter().cloned().enumerate() {
        let env = env.clone();
        let keys = keys.clone();
        set.spawn(async move { (i, transport::connect(&host, &env, keys).await) });
    }
    let mut ok: Vec<(usize, HostConn)> = Vec::new();
    let mut errors: Vec<(usize, ConnectError)> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok((i, Ok(c))) => ok.push((i, c)),
            Ok((i, Err(e))) => errors.push((i, e)),
            Err(e) => return Err(Failure::new(exit::CONNECT, format!("connect task: {e}"))),
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|(i, _)| *i);
        // The failure below lists every host's error; annotate them under GitHub only.
        for (_, e) in &errors {
            progress.annotate(None, &e.to_string());
        }
        for (_, c) in ok {
            c.close().await;
        }
        let code = errors
            .iter()
            .map(|(_, e)| connect_exit_code(e))
            .max()
            .unwrap_or(exit::CONNECT);
        let list: Vec<String> = errors.iter().map(|(_, e)| e.to_string()).collect();
        return Err(Failure::new(
            code,
            format!(
                "{} of {} host(s) could not be reached; nothing was changed:\n  {}",
                errors.len(),
                env.hosts.len(),
                list.join("\n  ")
            ),
        ));
    }
    ok.sort_by_key(|(i, _)| *i);
    for (_, c) in &ok {
        progress.line(
            &c.name,
            &format!(
                "connected (deploy-agent {} on {})",
                c.client.hello.version, c.client.hello.hostname
            ),
        );
    }
    Ok(ok.into_iter().map(|(_, c)| c).collect())
}

fn connect_exit_code(e: &ConnectError) -> u8 {
    match e {
        ConnectError::Ssh(crate::ssh::SshError::Config(_)) => exit::USAGE,
        _ => exit::CONNECT,
    }
}

/// Takes the app lock on every host, in a fixed order (by host name) so two rollouts
/// cannot deadlock. On failure the locks taken so far are freed when the connections
/// close.
pub async fn lock_all(
    conns: &mut [HostConn],
    env: &Environment,
    version: Option<String>,
    wait: Option<Duration>,
    progress: &Progress,
) -> Result<(), Failure> {
    let mut order: Vec<usize> = (0..conns.len()).collect();
    order.sort_by(|a, b| conns[*a].name.cmp(&conns[*b].name));
    let holder = holder();
    for i in order {
        let c = &mut conns[i];
        let req = proto::Lock {
            app: app_ref(env),
            holder: holder.clone(),
            version: version.clone(),
            wait_ms: wait.map(|d| d.as_millis() as u64).unwrap_or(0),
        };
        if wait.is_some() {
            progress.line(&c.name, "waiting for the deploy lock");
        }
        // The agent answers at once, or after waiting up to `wait` for the lock.
        let limit = wait.unwrap_or_default() + crate::client::QUICK_REPLY;
        match c.client.call_within(req, limit, |_| {}).await {
            Ok(_) => {}
            Err(e) => return Err(agent_failure(&c.name, e)),
        }
    }
    Ok(())
}

/// Maps an agent error to an exit code and message.
pub fn agent_failure(host: &str, e: ClientError) -> Failure {
    let code = match &e {
        ClientError::Agent(p) => match p.code {
            ErrorCode::Locked => exit::LOCKED,
            ErrorCode::PathNotAllowed | ErrorCode::BadRequest | ErrorCode::NotFound => exit::USAGE,
            // The agent is stopping: it took nothing on (an upload is discarded).
            ErrorCode::VersionMismatch | ErrorCode::ShuttingDown => exit::CONNECT,
            ErrorCode::RollbackFailed => exit::NEEDS_HUMAN,
            _ => exit::DEPLOY_FAILED,
        },
        _ => exit::CONNECT,
    };
    let mut msg = format!("{host}: {e}");
    if code == exit::LOCKED {
        msg.push_str("; retry later, or pass --lock-wait 5m to wait for it");
    }
    Failure::new(code, msg)
}

pub async fn close_all(conns: Vec<HostConn>) {
    for c in conns {
        c.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    // See: #18 (item 11). Env-file values that merely looked like secrets (an image
    // reference) were masked, so `ps` output showed `***` for the image.
    #[test]
    fn only_declared_secrets_are_masked() {
        let toml = "app = \"shop\"\ndeploy_to = \"/srv/shop\"\n\
                    [environments.edge]\nhosts = [\"local\"]\nstrategy = \"compose\"\n\
                    secrets = [\"DB_PASSWORD\", \"API_TOKEN\", \"CI_TOKEN\"]\n";
        let cfg = Config::parse(toml, "deploy.toml", &|k: &str| {
            (k == "HOME").then(|| "/h".to_owned())
        })
        .unwrap();
        let env = cfg.environment("edge").unwrap();
        let vars = |name: &str| match name {
            "TOKEN_FROM_CI" => Some("tok-from-ci-123456".to_owned()),
            "CI_TOKEN" => Some("ci-token-value-987".to_owned()),
            "BACKEND_IMAGE" => Some("ghcr.io/org/backend:0a1b2c3d4e5f".to_owned()),
            _ => None,
        };
        let env_file = "# pinned images\n\
                        IMAGE=registry.example.com/org/web@sha256:0123456789abcdef\n\
                        BACKEND=${BACKEND_IMAGE}\n\
                        DB_PASSWORD='hunter2-but-longer'\n\
                        API_TOKEN=${TOKEN_FROM_CI}\n\
                        RAILS_ENV=production\n";
        let values = secret_values_from(&env, &vars, Some(env_file));
        assert!(
            values.contains(&"hunter2-but-longer".to_owned()),
            "{values:?}"
        );
        assert!(
            values.contains(&"tok-from-ci-123456".to_owned()),
            "{values:?}"
        );
        assert!(
            values.contains(&"ci-token-value-987".to_owned()),
            "{values:?}"
        );
        assert!(
            !values
                .iter()
                .any(|v| v.contains("sha256") || v.contains("ghcr.io")),
            "image references are not secrets: {values:?}"
        );
        assert_eq!(values.len(), 3, "{values:?}");
    }
}
