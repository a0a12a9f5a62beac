//! `deployctl promote FROM TO [--version LABEL]`: ships to TO exactly the release that is
//! live on every host of FROM, fetched from a FROM host's agent (no CI workspace needed),
//! as a normal rollout (lock, batches, canary, rollback-all). The TO agents check that
//! what they unpacked has FROM's content digest before anything switches.

use std::time::Duration;

use proto::{Fetch, ReleaseInfo, ReleaseStatus, Releases, Status};

use super::push::{Delivery, PushArgs, confirm, deploy};
use super::{close_all, connect_all, find_keys, load_env};
use crate::cli::Cli;
use crate::client::agent_failure;
use crate::config::Strategy;
use crate::exit::Failure;
use crate::output::Progress;
use crate::spec::{app_ref, health_spec};

pub struct PromoteArgs {
    pub from: String,
    pub to: String,
    pub version: Option<String>,
    pub yes: bool,
    pub json: bool,
    pub lock_wait: Option<Duration>,
}

pub async fn run(cli: &Cli, args: PromoteArgs) -> Result<u8, Failure> {
    if args.from == args.to {
        return Err(Failure::usage("promote needs two different environments"));
    }
    let from_env = load_env(cli, &args.from)?;
    let mut to_env = load_env(cli, &args.to)?;
    if from_env.strategy != to_env.strategy {
        return Err(Failure::usage(format!(
            "{} and {} use different strategies; promote copies a release as it is",
            from_env.name, to_env.name
        )));
    }
    if from_env.app != to_env.app {
        return Err(Failure::usage(format!(
            "{} deploys app {:?} and {} deploys {:?}",
            from_env.name, from_env.app, to_env.name, to_env.app
        )));
    }
    confirm(&to_env, args.yes, "promote")?;
    let progress = Progress::new(false);
    let keys = find_keys(&from_env)?;
    let mut conns = connect_all(&from_env, &keys, &progress).await?;
    let picked = pick(&mut conns, &from_env, args.version.as_deref()).await;
    let fetched = match picked {
        Ok(release) => fetch(&mut conns, &from_env, &release, &progress)
            .await
            .map(|file| (release, file)),
        Err(e) => Err(e),
    };
    close_all(conns).await;
    let (release, file) = fetched?;
    let content = release.content.clone().unwrap_or_default();
    progress.info(&format!(
        "promoting {} release {}{} (content {content}) to {}",
        from_env.name,
        release.id,
        release
            .version
            .as_deref()
            .map(|v| format!(", version {v}"))
            .unwrap_or_default(),
        to_env.name
    ));
    if to_env.strategy == Strategy::Compose {
        // The release holds FROM's compose files and rendered env file, byte for byte.
        to_env.compose.files = from_env.compose.files.clone();
        to_env.compose.env_file = from_env.compose.env_file.clone();
    }
    let push = PushArgs {
        env: to_env.name.clone(),
        json: args.json,
        artifact: Some(file.path().to_path_buf()),
        compose: Vec::new(),
        version: release.version.clone(),
        skip_migrations: false,
        yes: true,
        lock_wait: args.lock_wait,
        force: false,
        no_delta: false,
    };
    let delivery = Delivery {
        expect_content: Some(content),
        origin: Some(proto::Origin {
            environment: Some(from_env.name.clone()),
            release: Some(release.id.clone()),
            live_since: Some(release.created.clone()),
            forced: false,
        }),
    };
    deploy(&to_env, &push, file.path(), delivery).await
}

/// The release to promote: the one with `label`, or the current one, and the same on
/// every host; live (healthy when it went live, and now, for the current one).
async fn pick(
    conns: &mut [crate::transport::HostConn],
    env: &crate::config::Environment,
    label: Option<&str>,
) -> Result<ReleaseInfo, Failure> {
    let mut chosen: Vec<(String, ReleaseInfo)> = Vec::new();
    for c in conns.iter_mut() {
        let list = c
            .client
            .call(Releases { app: app_ref(env) })
            .await
            .map_err(|e| agent_failure(&c.name, e))?;
        let found = match label {
            Some(l) => list
                .releases
                .into_iter()
                .rev()
                .find(|r| r.version.as_deref() == Some(l) || r.id == l),
            None => list.releases.into_iter().find(|r| r.current),
        };
        let Some(r) = found else {
            return Err(Failure::usage(match label {
                Some(l) => format!("{}: no release {l:?} on this host of {}", c.name, env.name),
                None => format!(
                    "{}: nothing is deployed on this host of {}",
                    c.name, env.name
                ),
            }));
        };
        if r.status != ReleaseStatus::Live {
            return Err(Failure::usage(format!(
                "{}: release {} ({}) is {} on {}, not live; refusing to promote it",
                c.name,
                r.id,
                r.version.as_deref().unwrap_or("no version"),
                serde_json::to_value(r.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                env.name
            )));
        }
        if r.content.is_none() {
            return Err(Failure::usage(format!(
                "{}: release {} has no content digest (deployed by an older deploy-agent); \
                 push it to {} again to promote it",
                c.name, r.id, env.name
            )));
        }
        if label.is_none()
            && let Some(spec) = health_spec(env)
        {
            let s = c
                .client
                .call(Status {
                    app: app_ref(env),
                    health: Some(spec),
                })
                .await
                .map_err(|e| agent_failure(&c.name, e))?;
            if let Some(h) = s.health.filter(|h| !h.healthy) {
                return Err(Failure::usage(format!(
                    "{}: release {} is current on {} but not healthy now ({}); refusing to promote it",
                    c.name,
                    r.id,
                    env.name,
                    h.last_error
                        .or(h.last_status.map(|s| format!("status {s}")))
                        .unwrap_or_default()
                )));
            }
        }
        chosen.push((c.name.clone(), r));
    }
    let first = chosen
        .first()
        .map(|(_, r)| r.clone())
        .ok_or_else(|| Failure::usage(format!("{} has no hosts", env.name)))?;
    let disagree: Vec<String> = chosen
        .iter()
        .filter(|(_, r)| r.content != first.content)
        .map(|(h, r)| {
            format!(
                "{h} runs {} ({})",
                r.id,
                r.version.as_deref().unwrap_or("-")
            )
        })
        .collect();
    if !disagree.is_empty() {
        return Err(Failure::usage(format!(
            "the hosts of {} disagree: {} runs {} but {}; fix {} first",
            env.name,
            chosen[0].0,
            first.id,
            disagree.join(", "),
            env.name
        )));
    }
    Ok(first)
}

/// Downloads the release from the first host into a temp file and checks that its
/// content digest is the one the agent recorded at deploy time.
async fn fetch(
    conns: &mut [crate::transport::HostConn],
    env: &crate::config::Environment,
    release: &ReleaseInfo,
    progress: &Progress,
) -> Result<tempfile::NamedTempFile, Failure> {
    let c = conns
        .first_mut()
        .ok_or_else(|| Failure::usage(format!("{} has no hosts", env.name)))?;
    let io = |e: std::io::Error| Failure::usage(format!("cannot keep the fetched release: {e}"));
    let mut file = tempfile::Builder::new()
        .prefix("deployctl-promote-")
        .suffix(".tar.gz")
        .tempfile()
        .map_err(io)?;
    c.client
        .call(Fetch {
            app: app_ref(env),
            release: release.id.clone(),
        })
        .await
        .map_err(|e| agent_failure(&c.name, e))?;
    let (_, size) = c
        .client
        .receive_fetch(file.as_file_mut())
        .await
        .map_err(|e| {
            // Nothing has changed anywhere yet: a refusal here is not a failed deploy.
            let f = agent_failure(&c.name, e);
            if f.code == crate::exit::DEPLOY_FAILED {
                Failure::usage(format!("{}; refusing to promote it", f.message))
            } else {
                f
            }
        })?;
    progress.line(
        &c.name,
        &format!(
            "fetched release {} ({})",
            release.id,
            crate::output::mib(size)
        ),
    );
    let digest = crate::artifact::content_digest(file.path()).map_err(Failure::usage)?;
    if Some(&digest) != release.content.as_ref() {
        return Err(Failure::usage(format!(
            "{}: release {} as fetched has content {digest}, not the {} recorded when it \
             was deployed; refusing to promote it",
            c.name,
            release.id,
            release.content.as_deref().unwrap_or("-")
        )));
    }
    Ok(file)
}
