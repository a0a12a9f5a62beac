//! `deployctl rollback ENV [--to RELEASE]`: every host back to one earlier release.

use std::time::{Duration, Instant};

use proto::Rollback;

use super::{close_all, connect_all, find_keys, lock_all};
use crate::cli::Cli;
use crate::client::ClientError;
use crate::client::agent_failure;
use crate::exit::{self, Failure};
use crate::outcome::HostResult;
use crate::output::Progress;
use crate::report;
use crate::spec::{app_ref, holder, release_spec};

pub async fn run(
    cli: &Cli,
    env_name: &str,
    to: Option<String>,
    yes: bool,
    lock_wait: Option<Duration>,
    json: bool,
) -> Result<u8, Failure> {
    let env = super::load_env(cli, env_name)?;
    super::push::confirm(&env, yes, "rollback")?;
    let keys = find_keys(&env)?;
    let progress = Progress::new(false);
    let started = Instant::now();
    let mut conns = connect_all(&env, &keys, &progress).await?;
    let result = async {
        lock_all(&mut conns, &env, None, lock_wait, &progress).await?;
        // With --to, every host must have the release before any host changes.
        if let Some(to) = &to {
            let mut missing = Vec::new();
            let lists = crate::window::call_all(
                &mut conns,
                env.max_parallel.max(1) as usize,
                Some(crate::client::QUICK_REPLY),
                |_| proto::Releases { app: app_ref(&env) },
            )
            .await;
            for (c, list) in conns.iter().zip(lists) {
                let list = list.map_err(|e| agent_failure(&c.name, e))?;
                let found = list
                    .releases
                    .iter()
                    .any(|r| &r.id == to || r.version.as_deref() == Some(to.as_str()));
                if !found {
                    missing.push(c.name.clone());
                }
            }
            if !missing.is_empty() {
                return Err(Failure::usage(format!(
                    "release {to:?} does not exist on {}; nothing was changed \
                     (see `deployctl releases {}`)",
                    missing.join(", "),
                    env.name
                )));
            }
        }
        let holder = holder();
        // At most max_parallel hosts at once, as a rollout.
        let mut results: Vec<Option<HostResult>> = vec![None; conns.len()];
        let all: Vec<usize> = (0..conns.len()).collect();
        // Each host's connection is closed as soon as it is done (the agent freed its lock
        // when its rollback ended); the hosts still to come hold theirs.
        let mut slots: Vec<Option<crate::transport::HostConn>> =
            conns.drain(..).map(Some).collect();
        crate::window::slot_hosts(
            &mut slots,
            &all,
            env.max_parallel.max(1) as usize,
            |_, mut c| {
                let req = Rollback {
                    app: app_ref(&env),
                    to: to.clone(),
                    holder: holder.clone(),
                    spec: release_spec(&env),
                };
                let progress = progress.clone();
                let env_name = env.name.clone();
                async move {
                    let t = Instant::now();
                    let host = c.name.clone();
                    let result = match c
                        .client
                        .call_with(req, |ev| progress.line(&host, &ev.message))
                        .await
                    {
                        Ok(r) => HostResult::from_report(&host, r),
                        Err(e) => {
                            let f = match e {
                                ClientError::Agent(_) => agent_failure(&host, e),
                                // The agent had the rollback: it goes on without us.
                                other => Failure::new(
                                    exit::NEEDS_HUMAN,
                                    format!(
                                        "{host}: lost contact while the agent rolled back \
                                         ({other}); the outcome is unknown here. The agent \
                                         finishes on its own: run `deployctl status \
                                         {env_name}` to see how it ended"
                                    ),
                                ),
                            };
                            progress.annotate(Some(&host), &f.message);
                            HostResult::from_failure(&host, f, t.elapsed())
                        }
                    };
                    report::announce(&progress, &result, "rollback");
                    c.close().await;
                    (None, result)
                }
            },
            |i, r| {
                results[i] = Some(r);
                true
            },
        )
        .await;
        conns.extend(slots.into_iter().flatten());
        let results: Vec<HostResult> = results.into_iter().flatten().collect();
        Ok::<_, Failure>(results)
    }
    .await;
    close_all(conns).await;
    let results = result?;
    let code = report::exit_code(&results);
    let target = results.iter().find_map(|r| r.release.clone());
    report::print_deploy(
        "rollback",
        &env,
        target.as_deref(),
        &results,
        code,
        started.elapsed(),
        json,
        None,
    );
    Ok(if results.is_empty() { exit::OK } else { code })
}
