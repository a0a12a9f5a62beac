//! `deployctl logs ENV`: every host's log lines, each prefixed by its host, merged as
//! they arrive. Each host streams on its own connection: a host that cannot be reached,
//! or drops out during `-f`, is reported on stderr while the others go on.

use std::io::Write;
use std::sync::Arc;

use proto::{LogSource, Logs, Output, OutputStream};

use crate::cli::{Cli, LogsArgs};
use crate::config::{Environment, Host, Strategy};
use crate::exit::{self, Failure};
use crate::ssh::keys::KeySource;

/// The hosts of `env` that `wanted` names (all of them without it). A name matches a
/// host as written (`user@host:port`), or its host name alone, or `host:port`.
pub fn select_hosts(env: &Environment, wanted: Option<&str>) -> Result<Vec<Host>, Failure> {
    let Some(w) = wanted else {
        return Ok(env.hosts.clone());
    };
    let picked: Vec<Host> = env
        .hosts
        .iter()
        .filter(|h| {
            h.to_string() == w
                || match h {
                    Host::Ssh { host, port, .. } => host == w || format!("{host}:{port}") == w,
                    Host::Local => false,
                }
        })
        .cloned()
        .collect();
    if picked.is_empty() {
        return Err(Failure::usage(format!(
            "--host {w}: environment {} has no such host (hosts: {})",
            env.name,
            env.hosts
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(picked)
}

/// Where the environment's logs are.
pub fn source(env: &Environment) -> Result<LogSource, Failure> {
    if env.strategy == Strategy::Compose {
        let spec = crate::spec::release_spec(env);
        if let Some(compose) = spec.compose {
            return Ok(LogSource::Compose { compose });
        }
    }
    match &env.release.logs {
        Some(crate::config::LogsConfig::Unit(unit)) => Ok(LogSource::Unit { unit: unit.clone() }),
        Some(crate::config::LogsConfig::Files(files)) => Ok(LogSource::Files {
            files: files.clone(),
        }),
        None => Err(Failure::usage(format!(
            "environment {} does not say where its logs are: set [release] logs = \
             {{ unit = \"{}\" }} (the systemd journal) or logs = {{ files = [\"log/*.log\"] }} \
             (files relative to the release)",
            env.name, env.app
        ))),
    }
}

/// Prints a batch of lines, each prefixed, masked, in one write (lines of two hosts never
/// mix within a line). False when the reader of that output has gone (`| head`).
pub fn print(prefix: &str, o: &Output) -> bool {
    if o.lines.is_empty() {
        return true;
    }
    let mut text = String::new();
    for l in &o.lines {
        text.push_str(prefix);
        text.push_str(&crate::output::redact(l));
        text.push('\n');
    }
    let written = match o.stream {
        OutputStream::Stdout => {
            let mut w = std::io::stdout().lock();
            w.write_all(text.as_bytes()).and_then(|_| w.flush())
        }
        OutputStream::Stderr => {
            let mut w = std::io::stderr().lock();
            w.write_all(text.as_bytes()).and_then(|_| w.flush())
        }
    };
    !matches!(written, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// `host | ` prefixes, padded to the longest host name.
pub fn prefixes(hosts: &[Host]) -> Vec<String> {
    let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    names.iter().map(|n| format!("{n:<width$} | ")).collect()
}

/// For a connection the agent closed: an agent older than deployctl may not know the
/// request (`logs` and `exec` are newer than some agents), and closes the session on it.
pub fn old_agent_hint(agent_version: &str) -> String {
    if agent_version == env!("CARGO_PKG_VERSION") {
        String::new()
    } else {
        format!(
            " (the agent is deploy-agent {agent_version}, this is deployctl {}: an older \
             agent does not know this command; `deployctl bootstrap ENV` upgrades it)",
            env!("CARGO_PKG_VERSION")
        )
    }
}

/// How one host's stream ended.
enum HostEnd {
    Done,
    Stopped,
    Failed(u8),
}

async fn one_host(
    host: Host,
    env: Arc<Environment>,
    keys: Arc<Vec<KeySource>>,
    request: Logs,
    prefix: String,
    stop_all: Arc<tokio::sync::watch::Sender<bool>>,
) -> HostEnd {
    let mut stop = stop_all.subscribe();
    let name = host.to_string();
    let connect = crate::transport::connect(&host, &env, keys);
    let mut conn = tokio::select! {
        c = connect => match c {
            Ok(c) => c,
            Err(e) => {
                crate::err!("{name}: cannot connect: {e}");
                return HostEnd::Failed(exit::CONNECT);
            }
        },
        _ = stop.wait_for(|s| *s) => return HostEnd::Stopped,
    };
    let end = tokio::select! {
        r = conn.client.stream(request, |o| {
            if !print(&prefix, &o) {
                // Nobody reads any more (`logs -f | head`): end every host's stream.
                let _ = stop_all.send(true);
            }
        }) => match r {
            Ok(end) => match end.error {
                None => HostEnd::Done,
                Some(e) => {
                    crate::err!("{name}: {e}");
                    HostEnd::Failed(exit::DEPLOY_FAILED)
                }
            },
            Err(e @ crate::client::ClientError::Agent(_)) => {
                let f = super::agent_failure(&name, e);
                crate::err!("{}", f.message);
                HostEnd::Failed(f.code)
            }
            Err(e) => {
                let hint = old_agent_hint(&conn.client.hello.version);
                crate::err!("{name}: lost the connection: {e}{hint}; the other hosts go on");
                HostEnd::Failed(exit::CONNECT)
            }
        },
        _ = stop.wait_for(|s| *s) => HostEnd::Stopped,
    };
    conn.close().await;
    end
}

pub async fn run(cli: &Cli, args: &LogsArgs) -> Result<u8, Failure> {
    let env = super::load_env(cli, &args.env)?;
    let hosts = select_hosts(&env, args.host.as_deref())?;
    let source = source(&env)?;
    let keys = super::find_keys(&env)?;
    let request = Logs {
        app: super::app_ref(&env),
        source,
        lines: args.lines,
        since_ms: args.since.map(|d| d.as_millis() as u64),
        follow: args.follow,
        redact: crate::spec::release_spec(&env).redact,
    };
    let prefixes = prefixes(&hosts);
    let env = Arc::new(env);
    let stop_tx = Arc::new(tokio::sync::watch::channel(false).0);
    // Without -f, at most max_parallel hosts at once, each connected only for its turn;
    // with -f every host's stream runs until interrupted, so all at once.
    let turns = if args.follow {
        hosts.len()
    } else {
        env.max_parallel.max(1) as usize
    };
    let turns = Arc::new(tokio::sync::Semaphore::new(turns.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for (host, prefix) in hosts.into_iter().zip(prefixes) {
        let task = one_host(
            host,
            env.clone(),
            keys.clone(),
            request.clone(),
            prefix,
            stop_tx.clone(),
        );
        let turns = turns.clone();
        set.spawn(async move {
            let _turn = turns.acquire_owned().await;
            task.await
        });
    }
    let mut code = exit::OK;
    let mut interrupted = false;
    loop {
        tokio::select! {
            r = set.join_next() => match r {
                None => break,
                Some(Ok(HostEnd::Failed(c))) => code = code.max(c),
                Some(Ok(HostEnd::Done | HostEnd::Stopped)) => {}
                Some(Err(e)) => {
                    crate::err!("deployctl: a host's stream failed: {e}");
                    code = code.max(exit::CONNECT);
                }
            },
            r = tokio::signal::ctrl_c(), if !interrupted => {
                // Ctrl-C ends `-f`: every connection closes, which stops the agents'
                // readers too.
                let _ = r;
                interrupted = true;
                let _ = stop_tx.send(true);
            }
        }
    }
    Ok(code)
}
