//! Rolling a release out across a fleet: batches (a canary first, if asked), at most
//! `max_parallel` hosts at once, a stop at the first failure, outside-in verification,
//! and `on_failure` handling so the fleet ends on one version.
//!
//! The per-host deploy itself is a closure, so this module knows nothing of uploads.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use proto::{Outcome, Rollback};

use crate::client::{ClientError, agent_failure};
use crate::config::{Batch, Environment, OnFailure, VerifyConfig};
use crate::outcome::{HostResult, RolloutReport, VerifyResult};
use crate::output::Progress;
use crate::spec::{app_ref, holder, release_spec};
use crate::ssh::keys::KeySource;
use crate::transport::{self, HostConn};

/// Host indices per batch, in order.
pub fn plan(hosts: usize, batch: Batch, canary: bool) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    if canary && hosts > 1 {
        out.push(vec![0]);
        start = 1;
    }
    let size = batch.size(hosts).max(1);
    let rest: Vec<usize> = (start..hosts).collect();
    for chunk in rest.chunks(size) {
        out.push(chunk.to_vec());
    }
    out
}

/// A per-host deploy, on its own task: takes the host's connection and hands it back with
/// the result.
pub type HostFuture = Pin<Box<dyn Future<Output = (HostConn, HostResult)> + Send + 'static>>;

/// Runs `deploy` on each host, batch by batch; within a batch at most `max_parallel` hosts
/// at once, a new one starting as soon as one ends. On the first failure (or failed
/// verification) starts no other host, lets those running finish, and applies
/// `on_failure`.
///
/// `conns` holds every host's connection, in `env.hosts`' order. A host's connection is
/// closed as soon as its deploy ends (the agent freed its lock then): what it held goes
/// with it, so the controller's memory follows the window, not the fleet. Only the hosts
/// still waiting for their turn stay connected, holding their locks on idle sessions. The
/// hosts rolled back after a failure are connected to again, under the same window.
pub async fn run<F>(
    env: &Environment,
    keys: &Arc<Vec<KeySource>>,
    conns: &mut [Option<HostConn>],
    progress: &Progress,
    deploy: F,
) -> RolloutReport
where
    F: Fn(HostConn) -> HostFuture,
{
    let names: Vec<String> = env.hosts.iter().map(|h| h.to_string()).collect();
    let batches = plan(conns.len(), env.rollout.batch, env.rollout.canary);
    let mut results: Vec<Option<HostResult>> = vec![None; conns.len()];
    let mut failure = None;
    let parallel = (env.max_parallel.max(1)) as usize;
    let total = batches.len();
    for (b, batch) in batches.iter().enumerate() {
        if total > 1 {
            let canary = if env.rollout.canary && b == 0 {
                " (canary)"
            } else {
                ""
            };
            let in_batch: Vec<&str> = batch.iter().map(|&i| names[i].as_str()).collect();
            progress.info(&format!(
                "batch {}/{total}{canary}: {}",
                b + 1,
                in_batch.join(", ")
            ));
        }
        crate::window::slot_hosts(
            conns,
            batch,
            parallel,
            |_, c| {
                let fut = deploy(c);
                async move {
                    let (c, r) = fut.await;
                    c.close().await;
                    (None, r)
                }
            },
            |i, mut r: HostResult| {
                r.batch = Some(b as u32 + 1);
                if r.outcome != Some(Outcome::Live) && failure.is_none() {
                    // The host's own error is in its result (and the report): not
                    // repeated here.
                    failure = Some(format!("{} failed in batch {}", r.host, b + 1));
                }
                results[i] = Some(r);
                failure.is_none()
            },
        )
        .await;
        if failure.is_some() {
            break;
        }
    }
    let mut report = RolloutReport::default();
    if failure.is_none()
        && let Some(v) = &env.verify
        && !v.urls.is_empty()
    {
        progress.info(&format!("verifying {} URL(s) from outside", v.urls.len()));
        report.verify = verify(v, progress).await;
        if let Some(bad) = report.verify.iter().find(|r| !r.ok) {
            failure = Some(format!(
                "verification of {} failed after {} attempt(s): {}",
                bad.url,
                bad.attempts,
                bad.last_error
                    .clone()
                    .or(bad.last_status.map(|s| format!("status {s}")))
                    .unwrap_or_default()
            ));
        }
    }
    // Hosts never reached stay as they were.
    let mut hosts: Vec<HostResult> = results
        .into_iter()
        .zip(names.iter())
        .map(|(r, name)| r.unwrap_or_else(|| HostResult::skipped(name)))
        .collect();
    if let Some(why) = &failure {
        if hosts.len() > 1 {
            progress.info(&format!("rollout stopped: {why}"));
        }
        match env.rollout.on_failure {
            OnFailure::RollbackAll => {
                report.on_failure = Some("rollback-all");
                let took: Vec<usize> = hosts
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| h.outcome == Some(Outcome::Live))
                    .map(|(i, _)| i)
                    .collect();
                if !took.is_empty() {
                    progress.info(&format!(
                        "rolling back {} host(s) that took the new release, so the fleet stays on one version",
                        took.len()
                    ));
                }
                // Under the same window as the rollout, each host connected to again
                // (its connection closed when its deploy ended).
                let env_owned = Arc::new(env.clone());
                let rolled = crate::window::map(took, parallel, |i| {
                    let previous = hosts[i].previous.clone();
                    let host = env.hosts[i].clone();
                    let (env, keys, progress) = (env_owned.clone(), keys.clone(), progress.clone());
                    async move {
                        let r = match transport::connect(&host, &env, keys).await {
                            Ok(mut c) => {
                                let r = roll_back_host(&mut c, &env, previous, &progress).await;
                                c.close().await;
                                r
                            }
                            Err(e) => Err(format!("could not connect again to roll back: {e}")),
                        };
                        (i, r)
                    }
                })
                .await;
                for (i, r) in rolled {
                    let h = &mut hosts[i];
                    match r {
                        Ok(rep) => {
                            h.fleet_rollback = Some(rep.outcome);
                            h.current = rep.current.clone();
                            if rep.outcome != Outcome::Live {
                                h.error = Some(format!(
                                    "took the release, then the rollback to {} failed: {}",
                                    h.previous.clone().unwrap_or_default(),
                                    rep.error.unwrap_or_default()
                                ));
                            }
                        }
                        Err(e) => {
                            h.fleet_rollback = Some(Outcome::RollbackFailed);
                            h.error = Some(format!("took the release; rollback failed: {e}"));
                        }
                    }
                }
            }
            OnFailure::Stop => {
                report.on_failure = Some("stop");
            }
        }
    }
    report.hosts = hosts;
    report.failure = failure;
    report
}

/// Polls each URL from here (outside in) until it answers `expect_status`.
pub async fn verify(v: &VerifyConfig, progress: &Progress) -> Vec<VerifyResult> {
    let client = match reqwest::Client::builder()
        .timeout(v.request_timeout)
        .user_agent(concat!("deployctl/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            return v
                .urls
                .iter()
                .map(|u| VerifyResult {
                    url: u.clone(),
                    ok: false,
                    attempts: 0,
                    last_status: None,
                    last_error: Some(format!("http client: {e}")),
                })
                .collect();
        }
    };
    let checks = v.urls.iter().map(|url| {
        let client = client.clone();
        async move {
            let mut r = VerifyResult {
                url: url.clone(),
                ok: false,
                attempts: 0,
                last_status: None,
                last_error: None,
            };
            let tries = v.retries.max(1);
            for attempt in 1..=tries {
                r.attempts = attempt;
                match client.get(url).send().await {
                    Ok(resp) => {
                        let code = resp.status().as_u16();
                        r.last_status = Some(code);
                        r.last_error = None;
                        if code == v.expect_status {
                            r.ok = true;
                            progress
                                .info(&format!("verify {url}: {code} after {attempt} attempt(s)"));
                            return r;
                        }
                    }
                    Err(e) => r.last_error = Some(error_chain(&e)),
                }
                if attempt < tries {
                    tokio::time::sleep(v.interval).await;
                }
            }
            progress.error(
                None,
                &format!(
                    "verify {url}: {} after {} attempt(s)",
                    r.last_error
                        .clone()
                        .or(r.last_status.map(|s| format!("status {s}")))
                        .unwrap_or_default(),
                    r.attempts
                ),
            );
            r
        }
    });
    futures_util::future::join_all(checks).await
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Switches `host` back to the release it ran before this rollout.
pub async fn roll_back_host(
    conn: &mut HostConn,
    env: &Environment,
    previous: Option<String>,
    progress: &Progress,
) -> Result<proto::DeployReport, String> {
    let Some(previous) = previous else {
        return Err(
            "it had no release before this rollout, so there is nothing to go back to".into(),
        );
    };
    let host = conn.name.clone();
    progress.line(&host, &format!("rolling back to {previous}"));
    let r = conn
        .client
        .call_with(
            Rollback {
                app: app_ref(env),
                to: Some(previous),
                holder: holder(),
                spec: release_spec(env),
            },
            |ev| progress.line(&host, &ev.message),
        )
        .await
        .map_err(|e| match e {
            ClientError::Agent(_) => agent_failure(&host, e).message,
            other => format!(
                "{host}: lost contact during the rollback ({other}); the agent finishes it on \
                 its own: run `deployctl status {}` to see how it ended",
                env.name
            ),
        });
    progress.finish_host(&host, "fleet rollback");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        assert_eq!(
            plan(3, Batch::Count(1), false),
            vec![vec![0], vec![1], vec![2]]
        );
        assert_eq!(plan(3, Batch::Percent(100), false), vec![vec![0, 1, 2]]);
        assert_eq!(
            plan(5, Batch::Count(2), true),
            vec![vec![0], vec![1, 2], vec![3, 4]]
        );
        assert_eq!(
            plan(4, Batch::Percent(50), true),
            vec![vec![0], vec![1, 2], vec![3]]
        );
        assert_eq!(plan(1, Batch::Count(5), true), vec![vec![0]]);
        assert!(plan(0, Batch::Count(1), false).is_empty());
    }
}
