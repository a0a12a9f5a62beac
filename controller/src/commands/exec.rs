//! `deployctl exec ENV -- CMD...`: a one-off command in the live release of one host
//! (the first, or `--host`) or of every host (`--all`, in parallel), its output streamed,
//! its exit code passed on.

use std::sync::Arc;

use proto::{Exec, ExecEnd, Output};
use serde_json::json;

use super::logs::{prefixes, print, select_hosts};
use crate::cli::{Cli, ExecArgs};
use crate::config::{Environment, Host};
use crate::exit::{self, Failure};
use crate::ssh::keys::KeySource;

/// One host's result.
struct HostResult {
    host: String,
    /// The exit code this host contributes (the command's, or deployctl's own).
    code: u8,
    end: Option<ExecEnd>,
    error: Option<String>,
}

/// The exit code of a finished command, as a shell would give it.
pub fn command_code(end: &ExecEnd) -> u8 {
    match (end.exit_code, end.signal) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(s)) => (128 + (s & 0x7f)) as u8,
        (None, None) => exit::DEPLOY_FAILED,
    }
}

async fn one_host(
    host: Host,
    env: Arc<Environment>,
    keys: Arc<Vec<KeySource>>,
    request: Exec,
    prefix: Option<String>,
    to_stderr: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> HostResult {
    let name = host.to_string();
    let failed = |code: u8, error: String| HostResult {
        host: name.clone(),
        code,
        end: None,
        error: Some(error),
    };
    let connect = crate::transport::connect(&host, &env, keys);
    let mut conn = tokio::select! {
        c = connect => match c {
            Ok(c) => c,
            Err(e) => return failed(exit::CONNECT, format!("cannot connect: {e}")),
        },
        _ = stop.wait_for(|s| *s) => return failed(130, "interrupted".into()),
    };
    let show = |o: Output| {
        let mut o = o;
        if to_stderr {
            o.stream = proto::OutputStream::Stderr;
        }
        let _ = print(prefix.as_deref().unwrap_or(""), &o);
    };
    let r = tokio::select! {
        r = conn.client.stream(request, show) => match r {
            Ok(end) => HostResult {
                host: name.clone(),
                code: command_code(&end),
                error: end.timed_out.then(|| "timed out (--timeout): killed".to_owned()),
                end: Some(end),
            },
            Err(e @ crate::client::ClientError::Agent(_)) => {
                let f = super::agent_failure(&name, e);
                failed(f.code, crate::output::without_host(&name, &f.message).to_owned())
            }
            Err(e) => failed(
                exit::CONNECT,
                format!(
                    "lost the connection: {e}{}; the agent kills the command when it notices",
                    super::logs::old_agent_hint(&conn.client.hello.version)
                ),
            ),
        },
        _ = stop.wait_for(|s| *s) => failed(130, "interrupted: the agent kills the command".into()),
    };
    conn.close().await;
    r
}

pub async fn run(cli: &Cli, args: &ExecArgs) -> Result<u8, Failure> {
    let env = super::load_env(cli, &args.env)?;
    let mut hosts = select_hosts(&env, args.host.as_deref())?;
    if !args.all {
        hosts.truncate(1);
    }
    if let Some(r) = &args.release
        && (r.is_empty() || r.len() > 64 || !r.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(Failure::usage(format!(
            "--release {r:?} is not a release id (digits, as `deployctl releases {}` lists them)",
            env.name
        )));
    }
    let spec = crate::spec::release_spec(&env);
    if spec.compose.is_some() && args.service.is_none() {
        return Err(Failure::usage(format!(
            "environment {} is a compose app: name the service to run the command in with \
             --service NAME",
            env.name
        )));
    }
    if spec.compose.is_none() && args.service.is_some() {
        return Err(Failure::usage(format!(
            "--service: environment {} is not a compose app (strategy = \"compose\")",
            env.name
        )));
    }
    let keys = super::find_keys(&env)?;
    let request = Exec {
        app: super::app_ref(&env),
        release: args.release.clone(),
        command: args.command.clone(),
        service: args.service.clone(),
        lock: args.lock,
        holder: super::holder(),
        spec,
        timeout_ms: args.timeout.map(|d| d.as_millis() as u64),
    };
    let prefixes: Vec<Option<String>> = if args.all {
        prefixes(&hosts).into_iter().map(Some).collect()
    } else {
        vec![None; hosts.len()]
    };
    let env = Arc::new(env);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // At most max_parallel hosts at once, each connected only for its turn.
    let turns = Arc::new(tokio::sync::Semaphore::new(env.max_parallel.max(1) as usize));
    let mut set = tokio::task::JoinSet::new();
    for (i, (host, prefix)) in hosts.iter().cloned().zip(prefixes).enumerate() {
        let task = one_host(
            host,
            env.clone(),
            keys.clone(),
            request.clone(),
            prefix,
            args.json,
            stop_rx.clone(),
        );
        let turns = turns.clone();
        set.spawn(async move {
            // After Ctrl-C, a host still waiting for its turn ends at once, unconnected.
            let _turn = turns.acquire_owned().await;
            (i, task.await)
        });
    }
    let mut results: Vec<(usize, HostResult)> = Vec::new();
    let mut interrupted = false;
    loop {
        tokio::select! {
            r = set.join_next() => match r {
                None => break,
                Some(Ok(r)) => results.push(r),
                Some(Err(e)) => return Err(Failure::new(exit::CONNECT, format!("exec task: {e}"))),
            },
            r = tokio::signal::ctrl_c(), if !interrupted => {
                let _ = r;
                interrupted = true;
                let _ = stop_tx.send(true);
            }
        }
    }
    results.sort_by_key(|(i, _)| *i);
    let results: Vec<HostResult> = results.into_iter().map(|(_, r)| r).collect();
    let code = if interrupted {
        130
    } else {
        results
            .iter()
            .map(|r| r.code)
            .find(|c| *c != 0)
            .unwrap_or(exit::OK)
    };
    if args.json {
        let hosts: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                json!({
                    "host": r.host,
                    "release": r.end.as_ref().map(|e| e.release.clone()),
                    "exit_code": r.end.as_ref().and_then(|e| e.exit_code),
                    "signal": r.end.as_ref().and_then(|e| e.signal),
                    "code": r.code,
                    "error": r.error,
                })
            })
            .collect();
        let doc = json!({
            "environment": env.name,
            "command": args.command,
            "hosts": hosts,
            "exit_code": code,
        });
        crate::out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else if args.all {
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|r| {
                vec![
                    r.host.clone(),
                    r.end
                        .as_ref()
                        .map(|e| e.release.clone())
                        .unwrap_or("-".into()),
                    r.code.to_string(),
                    r.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        crate::err!(
            "{}",
            crate::report::table(&["HOST", "RELEASE", "EXIT", "ERROR"], &rows).trim_end()
        );
    } else {
        for r in &results {
            if let Some(e) = &r.error {
                crate::err!("deployctl: {}: {e}", r.host);
            }
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_like_a_shell() {
        let end = |exit_code, signal| ExecEnd {
            release: "1".into(),
            exit_code,
            signal,
            timed_out: false,
        };
        assert_eq!(command_code(&end(Some(0), None)), 0);
        assert_eq!(command_code(&end(Some(3), None)), 3);
        assert_eq!(command_code(&end(Some(256 + 7), None)), 7);
        assert_eq!(command_code(&end(None, Some(9))), 137);
    }
}
