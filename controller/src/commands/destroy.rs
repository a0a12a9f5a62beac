//! `deployctl destroy ENV --instance NAME`: on every host, stop a review-app instance
//! (`stop`, or compose `down -v --remove-orphans`), remove its files and free its port.
//!
//! Every host's instance lock is taken first (in the fixed order `push` uses), so a
//! push of the same instance in flight is waited for (`--lock-wait`) or refused (exit 4)
//! before anything stops. An instance that does not exist is not an error: closing a
//! pull request twice, or after its instance expired, succeeds and says so.

use std::time::{Duration, Instant};

use proto::{Destroy, Destroyed};
use serde::Serialize;
use serde_json::json;

use super::{close_all, connect_all, find_keys, lock_all};
use crate::cli::Cli;
use crate::client::agent_failure;
use crate::exit::{self, Failure};
use crate::output::Progress;
use crate::report::table;
use crate::spec::{app_ref, holder, release_spec};

/// How one host ended.
#[derive(Debug, Serialize)]
struct HostDestroy {
    host: String,
    /// `None` when the host failed before the agent answered.
    existed: Option<bool>,
    port: Option<u16>,
    release: Option<String>,
    error: Option<String>,
    exit_code: u8,
    report: Option<Destroyed>,
}

pub async fn run(
    cli: &Cli,
    env_name: &str,
    yes: bool,
    lock_wait: Option<Duration>,
    json: bool,
) -> Result<u8, Failure> {
    let env = super::load_env(cli, env_name)?;
    let Some(name) = env.instance.clone() else {
        return Err(Failure::usage("destroy needs --instance NAME"));
    };
    super::push::confirm(&env, yes, &format!("destroy instance {name}"))?;
    let keys = find_keys(&env)?;
    let progress = Progress::new(false);
    let started = Instant::now();
    let mut conns = connect_all(&env, &keys, &progress).await?;
    let result = async {
        lock_all(&mut conns, &env, None, lock_wait, &progress).await?;
        let holder = holder();
        let spec = release_spec(&env);
        // At most max_parallel hosts at once, each on its own task (as a rollout); the
        // others keep their locks on idle sessions meanwhile.
        let limit = env.max_parallel.max(1) as usize;
        let all: Vec<usize> = (0..conns.len()).collect();
        let mut results: Vec<Option<HostDestroy>> = (0..conns.len()).map(|_| None).collect();
        let app = app_ref(&env);
        // Each host's connection is closed as soon as it is done (the agent freed its lock
        // when its destroy ended); the hosts still to come hold theirs.
        let mut slots: Vec<Option<crate::transport::HostConn>> =
            conns.drain(..).map(Some).collect();
        crate::window::slot_hosts(
            &mut slots,
            &all,
            limit,
            |_, mut c| {
                let req = Destroy {
                    app: app.clone(),
                    holder: holder.clone(),
                    spec: spec.clone(),
                };
                let progress = progress.clone();
                let name = name.clone();
                async move {
                    let r = destroy_one(&mut c, req, &name, &progress).await;
                    c.close().await;
                    (None, r)
                }
            },
            |i, r| {
                results[i] = Some(r);
                true
            },
        )
        .await;
        conns.extend(slots.into_iter().flatten());
        let results: Vec<HostDestroy> = results
            .into_iter()
            .map(|r| r.expect("every host was asked"))
            .collect();
        Ok::<_, Failure>(results)
    }
    .await;
    close_all(conns).await;
    let results = result?;
    let code = results
        .iter()
        .map(|r| r.exit_code)
        .max()
        .unwrap_or(exit::OK);
    let existed = results.iter().any(|r| r.existed == Some(true));
    let took = started.elapsed();
    let verdict = match (code, existed) {
        (exit::OK, true) => format!("instance {name} destroyed"),
        (exit::OK, false) => format!("instance {name} did not exist on any host; nothing to do"),
        _ => format!("FAILED (exit {code})"),
    };
    crate::output::step_summary(&format!(
        "### {} deployctl destroy {} --instance {name}\n\n{verdict}\n",
        if code == exit::OK { "✅" } else { "❌" },
        env.name
    ));
    if json {
        let doc = json!({
            "command": "destroy",
            "environment": env.name,
            "app": env.app,
            "instance": name,
            "exit_code": code,
            "duration_ms": took.as_millis() as u64,
            "hosts": results,
        });
        crate::out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return Ok(code);
    }
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let result = match (r.existed, &r.error) {
                (_, Some(e)) => format!("error: {e}"),
                (Some(true), None) => "destroyed".into(),
                _ => "did not exist".into(),
            };
            vec![
                r.host.clone(),
                result,
                r.release.clone().unwrap_or_else(|| "-".into()),
                r.port
                    .map(|p| format!("{p} (freed)"))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    crate::out!("{}", table(&["HOST", "RESULT", "RELEASE", "PORT"], &rows));
    for r in &results {
        for s in r.report.iter().flat_map(|d| &d.steps) {
            if !s.output.trim().is_empty() {
                crate::out!(
                    "{}: output of `{}`:",
                    r.host,
                    s.command.as_deref().unwrap_or("?")
                );
                crate::report::print_tail(&s.output, 10);
            }
        }
    }
    crate::out!(
        "destroy {} --instance {name}: {verdict} in {:.1}s",
        env.name,
        took.as_secs_f64()
    );
    Ok(code)
}

/// Destroys the instance on one host; the host's error, if any, is in the result.
async fn destroy_one(
    c: &mut crate::transport::HostConn,
    req: Destroy,
    name: &str,
    progress: &Progress,
) -> HostDestroy {
    let host = c.name.clone();
    progress.line(&host, &format!("destroying instance {name}"));
    let r = match c.client.call(req).await {
        Ok(d) => {
            let msg = match (d.existed, d.port) {
                (false, _) => format!("instance {name} did not exist; nothing to do"),
                (true, Some(p)) => format!("destroyed instance {name}; port {p} is free"),
                (true, None) => format!("destroyed instance {name}"),
            };
            progress.line(&host, &msg);
            HostDestroy {
                host: host.clone(),
                existed: Some(d.existed),
                port: d.port,
                release: d.release.clone(),
                error: None,
                exit_code: exit::OK,
                report: Some(d),
            }
        }
        Err(e) => {
            let f = agent_failure(&host, e);
            progress.annotate(Some(&host), &f.message);
            HostDestroy {
                host: host.clone(),
                existed: None,
                port: None,
                release: None,
                error: Some(crate::output::without_host(&host, &f.message).to_owned()),
                exit_code: f.code,
                report: None,
            }
        }
    };
    progress.finish_host(&host, &format!("destroy {name}"));
    r
}
