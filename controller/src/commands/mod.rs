//! One module per command; this one holds what they share: loading the environment,
//! finding keys, connecting to every host, and taking the fleet lock.

pub mod bootstrap;
pub mod check;
pub mod config;
pub mod destroy;
pub mod exec;
pub mod info;
pub mod instances;
pub mod logs;
pub mod plan;
pub mod promote;
pub mod push;
pub mod rollback;

use std::sync::Arc;
use std::time::Duration;

use crate::cli::Cli;
use crate::client::agent_failure;
use crate::config::{Config, Environment, Host};
use crate::exit::{self, Failure};
use crate::output::Progress;
use crate::spec::{app_ref, holder, secret_values};
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
        for (_, c) in ok {
            c.close().await;
        }
        return Err(unreachable(env, errors, progress));
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

/// The failure of a command some hosts of which could not be reached: every host's error,
/// in the hosts' order, and the worst exit code.
fn unreachable(
    env: &Environment,
    mut errors: Vec<(usize, ConnectError)>,
    progress: &Progress,
) -> Failure {
    errors.sort_by_key(|(i, _)| *i);
    // The failure lists every host's error; annotate them under GitHub only.
    for (_, e) in &errors {
        progress.annotate(None, &e.to_string());
    }
    let code = errors
        .iter()
        .map(|(_, e)| connect_exit_code(e))
        .max()
        .unwrap_or(exit::CONNECT);
    let list: Vec<String> = errors.iter().map(|(_, e)| e.to_string()).collect();
    Failure::new(
        code,
        format!(
            "{} of {} host(s) could not be reached; nothing was changed:\n  {}",
            errors.len(),
            env.hosts.len(),
            list.join("\n  ")
        ),
    )
}

/// For commands that change nothing and need no lock (`status`, `releases`, `history`):
/// connects to each host, runs `ask` on its connection and closes it, at most
/// `max_parallel` hosts at once, so only the hosts being asked are connected. A host that
/// cannot be reached fails the command as in [`connect_all`]. The answers come back in
/// the hosts' order, each with its host's name.
pub async fn ask_each<T, F, Fut>(
    env: &Environment,
    keys: &Arc<Vec<KeySource>>,
    progress: &Progress,
    ask: F,
) -> Result<Vec<(String, T)>, Failure>
where
    T: Send + 'static,
    F: Fn(HostConn) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (HostConn, T)> + Send + 'static,
{
    let limit = env.max_parallel.max(1) as usize;
    let shared = Arc::new(env.clone());
    let ask = Arc::new(ask);
    let hosts: Vec<Host> = env.hosts.clone();
    let answers = crate::window::map(hosts, limit, |host| {
        let (env, keys, ask, progress) =
            (shared.clone(), keys.clone(), ask.clone(), progress.clone());
        async move {
            let c = transport::connect(&host, &env, keys).await?;
            progress.line(
                &c.name,
                &format!(
                    "connected (deploy-agent {} on {})",
                    c.client.hello.version, c.client.hello.hostname
                ),
            );
            let (c, answer) = ask(c).await;
            let name = c.name.clone();
            c.close().await;
            Ok::<_, ConnectError>((name, answer))
        }
    })
    .await;
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for (i, a) in answers.into_iter().enumerate() {
        match a {
            Ok(a) => ok.push(a),
            Err(e) => errors.push((i, e)),
        }
    }
    if !errors.is_empty() {
        return Err(unreachable(env, errors, progress));
    }
    Ok(ok)
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

/// A host whose agent call failed, in a per-host listing (`status`, `releases`,
/// `history`, `instances`): an error row, an error entry for `--json`, and the worst exit
/// code so far.
pub fn host_error(
    host: &str,
    e: crate::client::ClientError,
    code: &mut u8,
    rows: &mut Vec<Vec<String>>,
    docs: &mut Vec<serde_json::Value>,
) {
    let f = agent_failure(host, e);
    *code = (*code).max(f.code);
    rows.push(vec![host.to_owned(), format!("error: {}", f.message)]);
    docs.push(serde_json::json!({"host": host, "error": f.message}));
}

pub async fn close_all(conns: Vec<HostConn>) {
    for c in conns {
        c.close().await;
    }
}
