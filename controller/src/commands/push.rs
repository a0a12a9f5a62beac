//! `deployctl push ENV`: connect to every host, take every lock, stream the artifact to
//! each agent, and report how each deploy ended.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{DeployReport, ErrorCode, Push, UploadEnd};
use sha2::{Digest, Sha256};

use super::{close_all, connect_all, find_keys, lock_all};
use crate::artifact::Scan;
use crate::artifact::share::Feed;
use crate::cli::Cli;
use crate::client::agent_failure;
use crate::client::{ClientError, QUICK_REPLY};
use crate::config::{Environment, Strategy};
use crate::exit::{self, Failure};
use crate::outcome::HostResult;
use crate::outcome::RolloutReport;
use crate::output::{Progress, mib};
use crate::report;
use crate::rollout;
use crate::spec::{app_ref, holder, release_spec};
use crate::transport::HostConn;

pub struct PushArgs {
    pub env: String,
    pub json: bool,
    pub artifact: Option<PathBuf>,
    /// `--compose FILE...`: replaces `compose.files`.
    pub compose: Vec<PathBuf>,
    pub version: Option<String>,
    pub skip_migrations: bool,
    pub yes: bool,
    pub lock_wait: Option<Duration>,
    /// Push past a `promote_from` gate (recorded in history, loud in the output).
    pub force: bool,
    /// Always upload the whole artifact.
    pub no_delta: bool,
    /// `--wait`: wait for the watch after go-live (`health.watch`) to end.
    pub wait: bool,
}

/// What a push carries besides the artifact: the content the agent must find in it,
/// and where it came from (for the history).
#[derive(Debug, Default, Clone)]
pub struct Delivery {
    pub expect_content: Option<String>,
    pub origin: Option<proto::Origin>,
}

pub async fn run(cli: &Cli, args: PushArgs) -> Result<u8, Failure> {
    let mut env = super::load_env(cli, &args.env)?;
    // A compose push deploys a bundle of the compose files and the rendered env file,
    // built before anything connects; the temp file lives until the push ends.
    let bundle = match env.strategy {
        Strategy::Compose if args.artifact.is_some() => {
            return Err(Failure::usage(format!(
                "environment {} uses strategy = \"compose\": pass --compose FILE... \
                 (or nothing, for compose.files), not --artifact",
                env.name
            )));
        }
        Strategy::Compose => {
            if !args.compose.is_empty() {
                env.compose.files = args.compose.clone();
            }
            Some(crate::compose::bundle(&env)?)
        }
        Strategy::Release if !args.compose.is_empty() => {
            return Err(Failure::usage(format!(
                "--compose needs strategy = \"compose\"; environment {} uses \"release\"",
                env.name
            )));
        }
        Strategy::Release => None,
    };
    let artifact = match &bundle {
        Some(b) => b.path().to_path_buf(),
        None => args
            .artifact
            .clone()
            .or_else(|| env.release.artifact.clone())
            .ok_or_else(|| {
                Failure::usage(format!(
                    "no artifact: pass --artifact PATH or set release.artifact for {}",
                    env.name
                ))
            })?,
    };
    let meta = std::fs::metadata(&artifact)
        .map_err(|e| Failure::usage(format!("artifact {}: {e}", artifact.display())))?;
    if !meta.is_file() {
        return Err(Failure::usage(format!(
            "artifact {} is not a file",
            artifact.display()
        )));
    }
    confirm(&env, args.yes, "push")?;
    let delivery = match env.promote_from.clone() {
        Some(from) => gate(cli, &env, &from, &artifact, args.force).await?,
        None => Delivery::default(),
    };
    deploy(&env, &args, &artifact, delivery).await
}

/// `promote_from`: the artifact's content must have been live on every host of the
/// source environment. `--force` pushes anyway, loudly, and says so in the history.
pub(super) async fn gate(
    cli: &Cli,
    env: &Environment,
    from: &str,
    artifact: &Path,
    force: bool,
) -> Result<Delivery, Failure> {
    let digest = crate::artifact::content_digest(artifact).map_err(Failure::usage)?;
    let from_env = super::load_env(cli, from)?;
    let keys = find_keys(&from_env)?;
    let quiet = Progress::new(true);
    let mut conns = connect_all(&from_env, &keys, &quiet).await?;
    let mut proof: Option<proto::ReleaseInfo> = None;
    let mut missing = Vec::new();
    let limit = from_env.max_parallel.max(1) as usize;
    let lists =
        crate::window::call_all(&mut conns, limit, Some(QUICK_REPLY), |_| proto::Releases {
            app: app_ref(&from_env),
        })
        .await;
    for (c, list) in conns.iter().zip(lists) {
        let list = list.map_err(|e| agent_failure(&c.name, e))?;
        match list.releases.into_iter().rev().find(|r| {
            r.content.as_deref() == Some(digest.as_str()) && r.status == proto::ReleaseStatus::Live
        }) {
            Some(r) => {
                proof.get_or_insert(r);
            }
            None => missing.push(c.name.clone()),
        }
    }
    close_all(conns).await;
    if missing.is_empty()
        && let Some(r) = proof
    {
        crate::err!(
            "promote_from: this content ({digest}) is live on {from} as release {}",
            r.id
        );
        return Ok(Delivery {
            expect_content: Some(digest),
            origin: Some(proto::Origin {
                environment: Some(from.to_owned()),
                release: Some(r.id),
                live_since: Some(r.created),
                forced: false,
            }),
        });
    }
    let why = format!(
        "{} requires releases proven on {from}, and this artifact (content {digest}) has not          been live and healthy on {}",
        env.name,
        missing.join(", ")
    );
    if !force {
        return Err(Failure::usage(format!(
            "{why}. Deploy it to {from} first (deployctl push {from} ...), or ship what {from}              runs: deployctl promote {from} {}. --force overrides this check",
            env.name
        )));
    }
    let warning = format!("FORCED past promote_from: {why}; recorded in the history");
    crate::err!("WARNING: {warning}");
    if crate::output::github_actions() {
        crate::out!("::warning title=deployctl --force::{warning}");
    }
    crate::output::step_summary(&format!("> **⚠️ {warning}**\n"));
    Ok(Delivery {
        expect_content: Some(digest),
        origin: Some(proto::Origin {
            environment: None,
            release: None,
            live_since: None,
            forced: true,
        }),
    })
}

/// Pushes `artifact` to every host of `env` (used by `push` and `promote`).
pub async fn deploy(
    env: &Environment,
    args: &PushArgs,
    artifact: &Path,
    delivery: Delivery,
) -> Result<u8, Failure> {
    crate::artifact::check_format(artifact).map_err(Failure::usage)?;
    let meta = std::fs::metadata(artifact)
        .map_err(|e| Failure::usage(format!("artifact {}: {e}", artifact.display())))?;
    let env = env.clone();
    let artifact = artifact.to_path_buf();
    let keys = find_keys(&env)?;
    let progress = Progress::new(false);
    let started = Instant::now();
    // The delta scan reads the artifact while the hosts connect; it is used if one has
    // a release already, and stopped if none has.
    let scan = (!args.no_delta).then(|| EarlyScan::start(&artifact));
    let mut conns = connect_all(&env, &keys, &progress).await?;
    let result = push_all(
        &env,
        &keys,
        args,
        &artifact,
        meta.len(),
        &delivery,
        &mut conns,
        scan,
        &progress,
    )
    .await;
    let (release, mut rollout) = match result {
        Ok(r) => r,
        Err(e) => {
            close_all(conns).await;
            return Err(e);
        }
    };
    let mut code = report::rollout_exit_code(&rollout.hosts, rollout.failure.is_some());
    let watch = env.health.as_ref().map_or(Duration::ZERO, |h| h.watch);
    let live: Vec<String> = rollout
        .hosts
        .iter()
        .filter(|h| h.outcome == Some(proto::Outcome::Live))
        .map(|h| h.host.clone())
        .collect();
    let watched = if args.wait && !watch.is_zero() && !live.is_empty() {
        let w = wait_for_watch(&env, &keys, &release, &live, &progress).await;
        code = code.max(watch_exit_code(&w));
        for (host, end) in &w {
            if let Some(h) = rollout.hosts.iter_mut().find(|h| &h.host == host) {
                h.watch = Some(end.result());
            }
        }
        Some(w)
    } else {
        None
    };
    close_all(conns).await;
    report::print_deploy(
        "push",
        &env,
        Some(&release),
        &rollout.hosts,
        code,
        started.elapsed(),
        args.json,
        Some(&rollout),
    );
    if !args.json && !watch.is_zero() && !live.is_empty() {
        match &watched {
            None => crate::out!(
                "release {release} is under watch for {} on {} host(s): {} failed health \
                 checks in a row roll it back (`deployctl status {}` shows it; push --wait \
                 waits for it)",
                humantime::format_duration(watch),
                live.len(),
                env.health.as_ref().map_or(3, |h| h.watch_failures),
                env.name
            ),
            Some(w) => {
                for (host, end) in w {
                    crate::out!("{host}: watch of release {release}: {end}");
                }
            }
        }
    }
    Ok(code)
}

/// How the watch of the release ended on one host, as `push --wait` saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEnd {
    Passed,
    RolledBack(String),
    RollbackFailed(String),
    /// A newer push or rollback ended it.
    Ended(String),
    /// The host could not tell (lost connection, watch gone, out of time).
    Unknown(String),
}

impl WatchEnd {
    /// What `--json` shows under the host's `watch`.
    pub fn result(&self) -> crate::outcome::WatchResult {
        let (state, note) = match self {
            WatchEnd::Passed => ("passed", None),
            WatchEnd::RolledBack(n) => ("rolled_back", Some(n)),
            WatchEnd::RollbackFailed(n) => ("rollback_failed", Some(n)),
            WatchEnd::Ended(n) => ("ended", Some(n)),
            WatchEnd::Unknown(n) => ("unknown", Some(n)),
        };
        crate::outcome::WatchResult {
            state,
            note: note.filter(|n| !n.is_empty()).cloned(),
        }
    }
}

impl std::fmt::Display for WatchEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchEnd::Passed => write!(f, "passed"),
            WatchEnd::RolledBack(why) => write!(f, "ROLLED BACK: {why}"),
            WatchEnd::RollbackFailed(why) => write!(f, "ROLLBACK FAILED: {why}"),
            WatchEnd::Ended(why) => write!(f, "ended early: {why}"),
            WatchEnd::Unknown(why) => write!(f, "unknown: {why}"),
        }
    }
}

/// 1 if the watch rolled back on any host, 5 if a rollback failed or the end is
/// unknown, else 0.
pub fn watch_exit_code(ends: &[(String, WatchEnd)]) -> u8 {
    ends.iter()
        .map(|(_, e)| match e {
            WatchEnd::Passed | WatchEnd::Ended(_) => exit::OK,
            WatchEnd::RolledBack(_) => exit::DEPLOY_FAILED,
            WatchEnd::RollbackFailed(_) | WatchEnd::Unknown(_) => exit::NEEDS_HUMAN,
        })
        .max()
        .unwrap_or(exit::OK)
}

/// `push --wait`: asks each host that went live for its watch until it ended there, over a
/// new connection (the rollout closed each host's as soon as it was done). The wait is
/// bounded by the watch, plus the time a check and a rollback may take.
async fn wait_for_watch(
    env: &Environment,
    keys: &Arc<Vec<crate::ssh::keys::KeySource>>,
    release: &str,
    hosts: &[String],
    progress: &Progress,
) -> Vec<(String, WatchEnd)> {
    let Some(h) = env.health.as_ref() else {
        return Vec::new();
    };
    let bound = h.watch
        + h.request_timeout
        + (h.interval + h.request_timeout) * (h.retries + 1)
        + env.release.timeout * 2
        + Duration::from_secs(30);
    let deadline = Instant::now() + bound;
    let poll = h
        .interval
        .clamp(Duration::from_millis(100), Duration::from_secs(2));
    progress.info(&format!(
        "waiting for the watch of release {release} ({}) on {} host(s)",
        humantime::format_duration(h.watch),
        hosts.len()
    ));
    let mut ends = Vec::new();
    for host in env.hosts.iter().filter(|h| hosts.contains(&h.to_string())) {
        let mut c = match crate::transport::connect(host, env, keys.clone()).await {
            Ok(c) => c,
            Err(e) => {
                let end = WatchEnd::Unknown(format!("could not connect again: {e}"));
                progress.line(&host.to_string(), &format!("watch: {end}"));
                ends.push((host.to_string(), end));
                continue;
            }
        };
        let end = loop {
            let asked = c
                .client
                .call_within(
                    proto::Status {
                        app: app_ref(env),
                        health: None,
                    },
                    Duration::from_secs(30),
                    |_| {},
                )
                .await;
            let status = match asked {
                Ok(s) => s,
                Err(e) => break WatchEnd::Unknown(format!("status failed: {e}")),
            };
            let note = |w: &proto::WatchStatus| w.note.clone().unwrap_or_default();
            match status.watch {
                Some(w) if w.release != release => {
                    break WatchEnd::Ended(format!("release {} is watched now", w.release));
                }
                Some(w) => match w.state {
                    proto::WatchState::Watching => {}
                    proto::WatchState::Passed => break WatchEnd::Passed,
                    proto::WatchState::RolledBack => break WatchEnd::RolledBack(note(&w)),
                    proto::WatchState::RollbackFailed => {
                        break WatchEnd::RollbackFailed(note(&w));
                    }
                    proto::WatchState::Ended => break WatchEnd::Ended(note(&w)),
                },
                None => break WatchEnd::Unknown("the agent keeps no watch of it".into()),
            }
            if Instant::now() >= deadline {
                break WatchEnd::Unknown(format!(
                    "still under watch after {}",
                    humantime::format_duration(bound)
                ));
            }
            tokio::time::sleep(poll).await;
        };
        progress.line(&c.name, &format!("watch: {end}"));
        ends.push((c.name.clone(), end));
        c.close().await;
    }
    ends
}

#[allow(clippy::too_many_arguments)]
async fn push_all(
    env: &Environment,
    keys: &Arc<Vec<crate::ssh::keys::KeySource>>,
    args: &PushArgs,
    artifact: &Path,
    size: u64,
    delivery: &Delivery,
    conns: &mut Vec<HostConn>,
    early: Option<EarlyScan>,
    progress: &Progress,
) -> Result<(String, RolloutReport), Failure> {
    lock_all(conns, env, args.version.clone(), args.lock_wait, progress).await?;
    let (release, any_releases) = next_release_id(conns, env).await?;
    // Hosts that already run a release get a delta upload: the manifest first, then only
    // the files they lack. Reading the artifact once here serves every host.
    // Without any release to copy from, the scan stops (dropped).
    let scan = if let Some(mut early) = early.filter(|_| any_releases) {
        let counts = early.counts.clone();
        let bar = progress.read_bar("delta: reading the artifact for its manifest", size);
        let scanned = watch(&mut early.work, bar.is_some(), |t| {
            let read = counts.read.load(std::sync::atomic::Ordering::Relaxed);
            let files = counts.files.load(std::sync::atomic::Ordering::Relaxed);
            match &bar {
                Some(b) => {
                    b.set_position(read);
                    b.set_message(format!("files: {files}"));
                }
                None => progress.info(&format!(
                    "delta: reading the artifact for its manifest: {} of {} read, files: {files} \
                     ({t:.1}s)",
                    mib(read),
                    mib(size)
                )),
            }
        })
        .await;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        match scanned {
            Ok(Ok(s)) if s.entries.len() <= MAX_DELTA_ENTRIES => Some(Arc::new(s)),
            // A broken artifact is refused by the agent, with the entry named.
            _ => None,
        }
    } else {
        None
    };
    progress.info(&format!(
        "deploying {} ({}) as release {release}{} to {} host(s)",
        artifact.display(),
        mib(size),
        args.version
            .as_deref()
            .map(|v| format!(" (version {v})"))
            .unwrap_or_default(),
        conns.len()
    ));
    let holder = holder();
    let spec = release_spec(env);
    // One read of the artifact, shared by the hosts that upload it at once, and one hash
    // (the scan's, when there was one).
    let feed = Feed::new(artifact, scan.as_ref().map(|s| (s.sha256.clone(), s.size)));
    // From here each host's connection is closed as soon as it is done (see
    // `rollout::run`); those left (hosts never started) are handed back.
    let mut slots: Vec<Option<HostConn>> = conns.drain(..).map(Some).collect();
    let report = rollout::run(env, keys, &mut slots, progress, |mut c| {
        let req = Push {
            app: app_ref(env),
            release: release.clone(),
            version: args.version.clone(),
            holder: holder.clone(),
            size,
            skip_migrations: args.skip_migrations,
            spec: spec.clone(),
            expect_content: delivery.expect_content.clone(),
            origin: delivery.origin.clone(),
            // The SPEC's contract: the agent checks the SHA-256 of the bytes it received
            // against the artifact's, end to end. (`Crc32` would spare the agent that
            // second pass over the data, beside its per-file SHA-256; it is kept in the
            // protocol, not used: see bench/README.md, "Results: issue 14 wire".)
            check: proto::StreamCheck::Sha256,
        };
        let artifact = artifact.to_path_buf();
        let progress = progress.clone();
        let scan = scan.clone();
        let env_name = env.name.clone();
        let feed = feed.clone();
        Box::pin(async move {
            let r = push_one(
                &mut c, req, &artifact, &feed, size, scan, &progress, &env_name,
            )
            .await;
            (c, r)
        })
    })
    .await;
    conns.extend(slots.into_iter().flatten());
    Ok((release, report))
}

#[allow(clippy::too_many_arguments)]
async fn push_one(
    conn: &mut HostConn,
    req: Push,
    artifact: &Path,
    feed: &Feed,
    size: u64,
    scan: Option<Arc<Scan>>,
    progress: &Progress,
    env_name: &str,
) -> HostResult {
    let host = conn.name.clone();
    let started = Instant::now();
    let release = req.release.clone();
    let up = Upload {
        host: &host,
        env: env_name,
        progress,
    };
    let result = match upload_and_deploy(conn, req, artifact, feed, size, scan, &up).await {
        Ok(report) => {
            // TIME in the table is the host's whole push, upload included (the agent's
            // report counts from the end of the upload; it keeps that in `report`).
            let mut r = HostResult::from_report(&host, report);
            r.duration_ms = started.elapsed().as_millis() as u64;
            r
        }
        Err(e) => {
            progress.annotate(Some(&host), &e.message);
            HostResult::from_failure(&host, e, started.elapsed())
        }
    };
    report::announce(progress, &result, &format!("deploy {release}"));
    result
}

/// Who an upload goes to, for its messages.
struct Upload<'a> {
    host: &'a str,
    /// The environment's name, for `deployctl status ENV` in messages.
    env: &'a str,
    progress: &'a Progress,
}

impl Upload<'_> {
    /// The connection failed before the agent took the deploy over: nothing changed.
    fn lost(&self, when: &str, e: ClientError) -> Failure {
        let (host, env) = (self.host, self.env);
        match e {
            ClientError::Agent(p) if p.code == ErrorCode::ShuttingDown => Failure::new(
                exit::CONNECT,
                format!(
                    "{host}: {}; nothing was changed on this host. Run `deployctl status \
                     {env}` to see the host's state, and push again once the agent is back",
                    p.message
                ),
            ),
            ClientError::Agent(_) => agent_failure(host, e),
            other => Failure::new(
                exit::CONNECT,
                format!(
                    "{host}: connection lost {when}: {other}; the upload never finished, so \
                     nothing was changed on this host (the agent discards the partial \
                     release). Run `deployctl status {env}` to see the host's state"
                ),
            ),
        }
    }

    /// The connection failed after the agent took the deploy over: it goes on without us.
    fn lost_after_handoff(&self, e: ClientError) -> Failure {
        let (host, env) = (self.host, self.env);
        let why = match &e {
            ClientError::Timeout(limit) => format!(
                "no report from the agent within {}s (the deploy's own timeouts, with margin)",
                limit.as_secs()
            ),
            other => format!("lost contact while the agent deployed ({other})"),
        };
        Failure::new(
            exit::NEEDS_HUMAN,
            format!(
                "{host}: {why}; the outcome is unknown here. The agent finishes or rolls back \
                 on its own (if it stopped, when it starts again): run `deployctl status \
                 {env}` to see how the deploy ended on the host"
            ),
        )
    }
}

async fn upload_and_deploy(
    conn: &mut HostConn,
    req: Push,
    artifact: &Path,
    feed: &Feed,
    size: u64,
    scan: Option<Arc<Scan>>,
    up: &Upload<'_>,
) -> Result<DeployReport, Failure> {
    let host = conn.name.clone();
    let progress = up.progress;
    let ready = conn
        .client
        .call_within(req, QUICK_REPLY, |_| {})
        .await
        .map_err(|e| up.lost("asking for the upload", e))?;
    if let Some(prev) = &ready.previous {
        progress.line(&host, &format!("current release is {prev}"));
    }
    if let Some(scan) = scan.filter(|_| ready.previous.is_some()) {
        let need = conn
            .client
            .call(scan.offer())
            .await
            .map_err(|e| up.lost("offering a delta", e))?;
        let (files, bytes) = scan.entries.iter().fold((0, 0u64), |(n, b), e| match e {
            proto::manifest::Entry::File { size, .. } => (n + 1, b + size),
            _ => (n, b),
        });
        let need_bytes: u64 = need
            .files
            .iter()
            .filter_map(|&i| match scan.entries.get(i as usize) {
                Some(proto::manifest::Entry::File { size, .. }) => Some(*size),
                _ => None,
            })
            .sum();
        // Picking files out of the artifact inflates and deflates them again: worth it
        // only when it leaves most bytes behind. Otherwise the artifact goes as it is.
        if need.files.len() < files && need_bytes.saturating_mul(2) <= bytes {
            return upload_delta(conn, artifact, &scan, &need.files, files, up).await;
        }
        progress.line(
            &host,
            &if need.files.len() < files {
                format!(
                    "delta: the host lacks {} of {} ({} of {} files); full upload",
                    mib(need_bytes),
                    mib(bytes),
                    need.files.len(),
                    files
                )
            } else {
                "delta: the host has none of these files; full upload".to_owned()
            },
        );
    }
    // The chunks come from the push's one read of the artifact (read and hashed ahead,
    // off this task), or from this host's own read when it starts late.
    let mut source = feed.source();
    let read_failed = |e: String| Failure::usage(format!("{}: {e}", artifact.display()));
    let bar = progress.upload_bar(&host, size);
    let t = Instant::now();
    let mut sent: u64 = 0;
    while let Some(buf) = source.next().await.map_err(read_failed)? {
        sent += buf.len() as u64;
        conn.client
            .send_data(buf, &mut |ev| progress.line(&host, &ev.message))
            .await
            .map_err(|e| up.lost("during the upload", e))?;
        if let Some(b) = &bar {
            b.set_position(sent);
        }
    }
    let digest = source.finish().await.map_err(read_failed)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let secs = t.elapsed().as_secs_f64().max(0.001);
    progress.line(
        &host,
        &format!(
            "uploaded {} in {:.1}s ({}/s)",
            mib(sent),
            secs,
            mib((sent as f64 / secs) as u64)
        ),
    );
    finish_upload(conn, digest.sha256, sent, digest.crc32, up).await
}

/// Ends an upload and waits for the agent's report, showing its progress, for at most
/// the deploy's own timeouts ([`crate::transport::reply_budget`]).
async fn finish_upload(
    conn: &mut HostConn,
    sha256: String,
    sent: u64,
    crc32: u32,
    up: &Upload<'_>,
) -> Result<DeployReport, Failure> {
    let host = conn.name.clone();
    conn.client
        .send_request(UploadEnd {
            sha256,
            size: sent,
            crc32: Some(crc32),
        })
        .await
        .map_err(|e| up.lost("at the end of the upload", e))?;
    let limit = conn.client.reply_timeout();
    // On a terminal, a spinner with the agent's latest step while it unpacks, copies,
    // restarts and waits for the health check.
    let spinner = up.progress.wait_spinner(&host, "deploying");
    let report = conn
        .client
        .response_within::<UploadEnd>(limit, &mut |ev| {
            if let Some(s) = &spinner {
                s.set_message(crate::output::redact(&ev.message));
            }
            up.progress.line(&host, &ev.message)
        })
        .await;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let report = report.map_err(|e| match e {
        ClientError::Agent(_) => agent_failure(&host, e),
        other => up.lost_after_handoff(other),
    })?;
    Ok(report)
}

/// Awaits `work`, calling `show(seconds so far)` on each tick meanwhile: every 100 ms
/// when it updates a bar (`bar`), every [`crate::output::plain_progress_every`] when it
/// prints a line.
async fn watch<T>(
    work: impl std::future::Future<Output = T>,
    bar: bool,
    mut show: impl FnMut(f64),
) -> T {
    let every = if bar {
        std::time::Duration::from_millis(100)
    } else {
        crate::output::plain_progress_every()
    };
    let t = Instant::now();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = tick.tick() => show(t.elapsed().as_secs_f64()),
        }
    }
}

/// The delta scan of the artifact, started before the hosts connect.
struct EarlyScan {
    work: tokio::task::JoinHandle<Result<Scan, String>>,
    counts: Arc<crate::artifact::SubsetProgress>,
}

impl EarlyScan {
    fn start(artifact: &Path) -> Self {
        let path = artifact.to_path_buf();
        let counts = Arc::new(crate::artifact::SubsetProgress::default());
        let work = {
            let counts = counts.clone();
            tokio::task::spawn_blocking(move || crate::artifact::scan_counted(&path, &counts))
        };
        Self { work, counts }
    }
}

/// A scan no longer wanted (no host has a release to copy from, or the push failed before
/// the upload) ends at its next read.
impl Drop for EarlyScan {
    fn drop(&mut self) {
        self.counts
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Manifests larger than this go as a full upload (the offer is one WebSocket message).
const MAX_DELTA_ENTRIES: usize = 20_000;

/// Sends only the files the host asked for, as a `.tar.gz`; the agent copies the rest
/// from releases it has.
async fn upload_delta(
    conn: &mut HostConn,
    artifact: &Path,
    scan: &Scan,
    need: &[u32],
    files: usize,
    up: &Upload<'_>,
) -> Result<DeployReport, Failure> {
    let host = conn.name.clone();
    let progress = up.progress;
    let paths: HashSet<String> = need
        .iter()
        .filter_map(|&i| scan.entries.get(i as usize))
        .map(|e| e.path().to_owned())
        .collect();
    let need_bytes: u64 = need
        .iter()
        .filter_map(|&i| match scan.entries.get(i as usize) {
            Some(proto::manifest::Entry::File { size, .. }) => Some(*size),
            _ => None,
        })
        .sum();
    progress.line(
        &host,
        &format!(
            "delta: sending {} of {files} files ({}); the host copies the rest from its releases",
            paths.len(),
            mib(need_bytes)
        ),
    );
    let t = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let path = artifact.to_path_buf();
    let counts = Arc::new(crate::artifact::SubsetProgress::default());
    let worker = {
        let counts = counts.clone();
        tokio::task::spawn_blocking(move || {
            crate::artifact::subset_counted(
                &path,
                &paths,
                proto::codec::ChunkWriter::new(tx),
                &counts,
            )
        })
    };
    let artifact_len = std::fs::metadata(artifact).map(|m| m.len()).unwrap_or(0);
    let bar = progress.delta_bar(&host, artifact_len);
    let want = need.len();
    // Picking the files out of the artifact reads all of it, and little may be sent
    // meanwhile: progress is the artifact read, the files found and the bytes sent; a
    // bar on a terminal, a line about every second elsewhere.
    let show = |sent: u64| {
        let read = counts.read.load(std::sync::atomic::Ordering::Relaxed);
        let found = counts.files.load(std::sync::atomic::Ordering::Relaxed);
        match &bar {
            Some(b) => {
                b.set_position(read);
                b.set_message(format!("{found}/{want} files, {} sent", mib(sent)));
            }
            None => progress.line(
                &host,
                &format!(
                    "delta: {found} of {want} files, {} sent, {} of {} read ({:.1}s)",
                    mib(sent),
                    mib(read),
                    mib(artifact_len),
                    t.elapsed().as_secs_f64()
                ),
            ),
        }
    };
    let every = if bar.is_some() {
        std::time::Duration::from_millis(100)
    } else {
        crate::output::plain_progress_every()
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hasher = Sha256::new();
    let mut crc = crc32fast::Hasher::new();
    let mut sent = 0u64;
    loop {
        let chunk = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => c,
                None => break,
            },
            _ = tick.tick() => {
                show(sent);
                continue;
            }
        };
        hasher.update(&chunk);
        crc.update(&chunk);
        sent += chunk.len() as u64;
        conn.client
            .send_data(chunk, &mut |ev| progress.line(&host, &ev.message))
            .await
            .map_err(|e| up.lost("during the upload", e))?;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    worker
        .await
        .map_err(|e| Failure::usage(format!("delta task: {e}")))?
        .map_err(Failure::usage)?;
    progress.line(
        &host,
        &format!(
            "uploaded {} (delta) in {:.2}s",
            mib(sent),
            t.elapsed().as_secs_f64()
        ),
    );
    finish_upload(
        conn,
        hex::encode(hasher.finalize()),
        sent,
        crc.finalize(),
        up,
    )
    .await
}

/// The id for this rollout: now, or one second past the newest release on any host, so
/// ids stay unique and sort in deploy order even for pushes within the same second.
/// Also says whether any host already has a release (then a delta upload may pay).
pub(super) async fn next_release_id(
    conns: &mut Vec<HostConn>,
    env: &Environment,
) -> Result<(String, bool), Failure> {
    let mut newest: Option<String> = None;
    let limit = env.max_parallel.max(1) as usize;
    let lists = crate::window::call_all(conns, limit, Some(QUICK_REPLY), |_| proto::Releases {
        app: app_ref(env),
    })
    .await;
    for (c, list) in conns.iter().zip(lists) {
        let list = list.map_err(|e| agent_failure(&c.name, e))?;
        if let Some(last) = list.releases.last()
            && newest.as_deref().is_none_or(|n| last.id.as_str() > n)
        {
            newest = Some(last.id.clone());
        }
    }
    let any = newest.is_some();
    let now = time::OffsetDateTime::now_utc();
    let mut id = format_id(now);
    if let Some(n) = newest
        && id <= n
    {
        id = parse_id(&n)
            .map(|t| format_id(t + time::Duration::seconds(1)))
            .unwrap_or(id);
    }
    Ok((id, any))
}

const ID_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year][month][day][hour][minute][second]");

pub fn format_id(t: time::OffsetDateTime) -> String {
    t.format(ID_FORMAT).unwrap_or_default()
}

fn parse_id(id: &str) -> Option<time::OffsetDateTime> {
    time::PrimitiveDateTime::parse(id, &ID_FORMAT)
        .ok()
        .map(|p| p.assume_utc())
}

/// Environments with `confirm = true` need --yes, or a typed "yes" on a terminal.
pub fn confirm(env: &Environment, yes: bool, what: &str) -> Result<(), Failure> {
    if !env.confirm || yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::usage(format!(
            "{} requires confirmation: pass --yes (no terminal to ask on)",
            env.name
        )));
    }
    {
        use std::io::Write as _;
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "{what} to {} ({} host(s)). Type \"yes\" to continue: ",
            env.name,
            env.hosts.len()
        );
        let _ = e.flush();
    }
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    if line.trim() == "yes" {
        Ok(())
    } else {
        Err(Failure::usage("not confirmed; nothing was changed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_step_by_a_second() {
        let t = parse_id("20261122235959").unwrap();
        assert_eq!(format_id(t), "20261122235959");
        assert_eq!(format_id(t + time::Duration::seconds(1)), "20261123000000");
        assert!(parse_id("garbage").is_none());
    }
}
