//! `deployctl logs ENV`: every host's log lines, each prefixed by its host, merged as
//! they arrive. Each host streams on its own connection: a host that cannot be reached,
//! or drops out during `-f`, is reported on stderr while the others go on.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use clap_complete::ArgValueCandidates;
use proto::{LogSource, Logs, Output, OutputStream};

use crate::cli::{Cli, parse_duration};
use crate::cli::environment_names;
use crate::config::{Environment, Host, Strategy};
use crate::exit::{self, Failure};
use crate::ssh::keys::KeySource;

pub const LONG_ABOUT: &str = "\
Print the app's log lines from every host of ENV (or --host), each prefixed by its host, \
merged as they arrive.

Where the lines come from: `[release] logs = { unit = \"myapp\" }` reads the systemd \
journal of that unit (journalctl, run by the agent); `logs = { files = [\"log/*.log\"] }` \
reads files relative to the current release (globs with * and ?, confined to the release: \
a pattern with `..`, or a file that is a symlink leading out of the release, is refused); \
a compose app (strategy = \"compose\") shows its project's container logs (compose logs).

-n LINES: the last lines to start with (per unit, file or container; default 100). \
--since DUR: only newer lines (journal and compose v2; for files, the files modified since \
then). -f: keep printing new lines until interrupted. Secret values (the environment's \
`secrets`) are masked as ***. A line longer than 16 KiB is cut, marked [...cut].

A host that cannot be reached, or that drops out while following, is reported on stderr \
and the others keep streaming.

Exit codes: 0 every host's lines were printed (with -f: Ctrl-C ends it, and exits 0 \
when every host was still streaming); 2 usage or configuration (no [release] logs, a \
refused pattern, no matching file); 3 a host could not be reached or dropped out.";

#[derive(Args, Debug, Clone)]
pub struct LogsArgs {
    /// The environment, e.g. staging or production
    #[arg(add = ArgValueCandidates::new(environment_names))]
    pub env: String,
    /// Only this host (as written in hosts, or its name without user and port)
    #[arg(long, value_name = "H")]
    pub host: Option<String>,
    /// The last lines to show first (per unit, file or container)
    #[arg(short = 'n', long = "lines", value_name = "LINES", default_value_t = 100)]
    pub lines: u32,
    /// Only lines newer than this, e.g. 10m or 2h
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Keep printing new lines until interrupted (Ctrl-C)
    #[arg(short = 'f', long)]
    pub follow: bool,
}

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
/// mix within a line).
pub fn print(prefix: &str, o: &Output) {
    if o.lines.is_empty() {
        return;
    }
    let mut text = String::new();
    for l in &o.lines {
        text.push_str(prefix);
        text.push_str(&crate::output::redact(l));
        text.push('\n');
    }
    let _ = match o.stream {
        OutputStream::Stdout => {
            let mut w = std::io::stdout().lock();
            w.write_all(text.as_bytes()).and_then(|_| w.flush())
        }
        OutputStream::Stderr => {
            let mut w = std::io::stderr().lock();
            w.write_all(text.as_bytes()).and_then(|_| w.flush())
        }
    };
}

/// `host | ` prefixes, padded to the longest host name.
pub fn prefixes(hosts: &[Host]) -> Vec<String> {
    let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    names.iter().map(|n| format!("{n:<width$} | ")).collect()
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
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> HostEnd {
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
        r = conn.client.stream(request, |o| print(&prefix, &o)) => match r {
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
                crate::err!("{name}: lost the connection: {e}; the other hosts go on");
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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut set = tokio::task::JoinSet::new();
    for (host, prefix) in hosts.into_iter().zip(prefixes) {
        set.spawn(one_host(
            host,
            env.clone(),
            keys.clone(),
            request.clone(),
            prefix,
            stop_rx.clone(),
        ));
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
