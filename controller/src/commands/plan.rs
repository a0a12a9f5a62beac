//! `--plan` on `push`, `rollback` and `promote`: connect (host keys verified as always),
//! ask each agent read-only questions, and print per host what the real command would do:
//! current -> new release, bytes it would send after the delta, whether migrations run,
//! the lock, free disk, and the batches. Nothing changes on any host: no lock is taken,
//! no upload starts (the delta comes from [`proto::DeltaPlan`], asked outside any upload),
//! and no history or journal is written.
//!
//! A problem the real command would hit (a host unreachable, the lock held, a release
//! missing, a bad artifact, too little disk) is reported in the plan, and the plan exits
//! with the code the real command would have used; a clean plan exits 0.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::{LockInfo, ReleaseInfo, ReleaseStatus};
use serde::Serialize;

use super::promote::PromoteArgs;
use super::push::PushArgs;
use super::{connect_exit_code, find_keys, load_env};
use crate::cli::Cli;
use crate::client::{QUICK_REPLY, agent_failure};
use crate::config::{Environment, Strategy};
use crate::exit::{self, Failure};
use crate::output::mib;
use crate::spec::app_ref;
use crate::transport::{self, HostConn};

/// The plan of one command, as printed (text) or as the `--json` document.
#[derive(Debug, Serialize)]
struct Plan {
    command: &'static str,
    plan: bool,
    environment: String,
    /// `promote`: where the release comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    /// The release a push or promote would create.
    release: Option<String>,
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifact: Option<ArtifactPlan>,
    /// `rollback --to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    batches: Vec<BatchPlan>,
    /// Hosts deployed at once within a batch; `None` for a rollback, which switches
    /// every host at once.
    max_parallel: Option<u32>,
    on_failure: Option<&'static str>,
    hosts: Vec<HostPlan>,
    notes: Vec<String>,
    /// What the real command would exit with (0: it would go ahead).
    exit_code: u8,
    /// Why the real command would fail, when it would.
    error: Option<String>,
    /// Always false: a plan changes nothing.
    changed: bool,
}

#[derive(Debug, Serialize)]
struct ArtifactPlan {
    path: String,
    size: u64,
}

#[derive(Debug, Serialize)]
struct BatchPlan {
    batch: u32,
    canary: bool,
    hosts: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct HostPlan {
    host: String,
    /// What `current` points at now.
    current: Option<String>,
    /// What it would point at: the new release, or a rollback's target.
    new: Option<String>,
    /// Bytes the upload would carry (after the delta); 0 for a rollback.
    send_bytes: Option<u64>,
    /// The delta, when the host has earlier releases to copy files from.
    delta: Option<DeltaPlan>,
    migrations: bool,
    free_bytes: Option<u64>,
    /// Who holds the deploy lock now, if anyone.
    lock: Option<LockInfo>,
    exit_code: u8,
    error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct DeltaPlan {
    /// Files the upload would carry, of the artifact's files.
    files_sent: usize,
    files_total: usize,
    /// Their size before compression.
    file_bytes: u64,
}

impl Plan {
    fn new(command: &'static str, env: &Environment) -> Plan {
        Plan {
            command,
            plan: true,
            environment: env.name.clone(),
            from: None,
            release: None,
            version: None,
            artifact: None,
            to: None,
            batches: Vec::new(),
            max_parallel: None,
            on_failure: None,
            hosts: Vec::new(),
            notes: Vec::new(),
            exit_code: exit::OK,
            error: None,
            changed: false,
        }
    }

    /// The first failure the real command would stop at wins.
    fn fail(&mut self, f: Failure) {
        if self.error.is_none() {
            self.exit_code = f.code;
            self.error = Some(f.message);
        }
    }

    fn batches(&mut self, env: &Environment) {
        let names: Vec<String> = env.hosts.iter().map(|h| h.to_string()).collect();
        let plan = crate::rollout::plan(names.len(), env.rollout.batch, env.rollout.canary);
        self.batches = plan
            .into_iter()
            .enumerate()
            .map(|(b, hosts)| BatchPlan {
                batch: b as u32 + 1,
                canary: env.rollout.canary && b == 0 && names.len() > 1,
                hosts: hosts.into_iter().map(|i| names[i].clone()).collect(),
            })
            .collect();
        self.max_parallel = Some(env.max_parallel.max(1));
        self.on_failure = Some(match env.rollout.on_failure {
            crate::config::OnFailure::RollbackAll => "rollback-all",
            crate::config::OnFailure::Stop => "stop",
        });
    }

    /// Prints the plan and returns the exit code.
    fn print(self, json: bool) -> u8 {
        if json {
            let text = serde_json::to_string_pretty(&self).unwrap_or_default();
            crate::out!("{text}");
            return self.exit_code;
        }
        let mut head = format!("plan: {} {}", self.command, self.environment);
        if let Some(from) = &self.from {
            head = format!("plan: promote {from} -> {}", self.environment);
        }
        if let Some(r) = &self.release {
            head.push_str(&format!(": new release {r}"));
        }
        if let Some(v) = &self.version {
            head.push_str(&format!(" (version {v})"));
        }
        if let Some(to) = &self.to {
            head.push_str(&format!(" --to {to}"));
        }
        crate::out!("{head}");
        if let Some(a) = &self.artifact {
            crate::out!("  artifact: {}, {}", a.path, size(a.size));
        }
        match self.max_parallel {
            Some(p) => {
                for b in &self.batches {
                    crate::out!(
                        "  batch {}{}: {}",
                        b.batch,
                        if b.canary { " (canary)" } else { "" },
                        b.hosts.join(", ")
                    );
                }
                crate::out!(
                    "  at most {p} host(s) at once (max_parallel); on failure: {}",
                    self.on_failure.unwrap_or("-")
                );
            }
            None => crate::out!("  every host at once (a rollback does not batch)"),
        }
        for n in &self.notes {
            crate::out!("  note: {n}");
        }
        for h in &self.hosts {
            crate::out!(
                "{}: {} -> {}",
                h.host,
                h.current.as_deref().unwrap_or("(nothing)"),
                h.new.as_deref().unwrap_or("?")
            );
            if let Some(bytes) = h.send_bytes {
                let how = match &h.delta {
                    Some(d) => format!(
                        " (delta: {} of {} files, {} before compression)",
                        d.files_sent,
                        d.files_total,
                        size(d.file_bytes)
                    ),
                    None if self.command == "rollback" => String::new(),
                    None => " (the whole artifact)".into(),
                };
                crate::out!("  send: {}{how}", size(bytes));
            }
            if self.command != "rollback" {
                crate::out!(
                    "  migrations: {}",
                    if h.migrations { "would run" } else { "none" }
                );
            }
            if let Some(free) = h.free_bytes {
                crate::out!("  disk: {} free", mib(free));
            }
            match &h.lock {
                Some(l) => crate::out!("  lock: held by {} since {}", l.holder, l.since),
                None if h.error.is_none() => crate::out!("  lock: free"),
                None => {}
            }
            if let Some(e) = &h.error {
                crate::out!("  error (exit {}): {e}", h.exit_code);
            }
        }
        match &self.error {
            Some(e) => crate::out!(
                "plan: {} would fail with exit {}: {e}\nnothing was changed",
                self.command,
                self.exit_code
            ),
            None => crate::out!("plan: {} would go ahead; nothing was changed", self.command),
        }
        self.exit_code
    }
}

fn size(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes} bytes")
    } else {
        format!("{bytes} bytes = {}", mib(bytes))
    }
}

/// What each connected host said about itself.
struct Seen {
    conn: HostConn,
    releases: Vec<ReleaseInfo>,
    lock: Option<LockInfo>,
    free: Option<u64>,
}

/// Connects to every host (each on its own: one host's failure does not hide the
/// others') and asks it for its releases, lock and free disk. Hosts that failed get an
/// error row in `plan`; the first failure, in the order the real command meets them,
/// becomes the plan's.
async fn survey(env: &Environment, plan: &mut Plan) -> Vec<Seen> {
    let keys = match find_keys(env) {
        Ok(k) => k,
        Err(f) => {
            plan.fail(f);
            return Vec::new();
        }
    };
    let mut set = tokio::task::JoinSet::new();
    for (i, host) in env.hosts.iter().cloned().enumerate() {
        let env = env.clone();
        let keys = keys.clone();
        set.spawn(async move { (i, transport::connect(&host, &env, keys).await) });
    }
    let mut results: Vec<Option<Result<HostConn, Failure>>> =
        (0..env.hosts.len()).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        if let Ok((i, r)) = r {
            results[i] = Some(r.map_err(|e| Failure::new(connect_exit_code(&e), e.to_string())));
        }
    }
    let mut rows: Vec<HostPlan> = Vec::new();
    let mut seen = Vec::new();
    let mut unreachable = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let name = env.hosts[i].to_string();
        match r {
            Some(Ok(conn)) => seen.push(conn),
            Some(Err(f)) => {
                unreachable.push((f.code, f.message.clone()));
                rows.push(HostPlan {
                    host: name,
                    exit_code: f.code,
                    error: Some(f.message),
                    ..HostPlan::default()
                });
            }
            None => {
                let msg = format!("{name}: the connect task failed");
                unreachable.push((exit::CONNECT, msg.clone()));
                rows.push(HostPlan {
                    host: name,
                    exit_code: exit::CONNECT,
                    error: Some(msg),
                    ..HostPlan::default()
                });
            }
        }
    }
    if !unreachable.is_empty() {
        // As `connect_all`: the worst code, every host's error listed.
        let code = unreachable
            .iter()
            .map(|(c, _)| *c)
            .max()
            .unwrap_or(exit::CONNECT);
        let list: Vec<String> = unreachable.into_iter().map(|(_, m)| m).collect();
        plan.fail(Failure::new(
            code,
            format!(
                "{} of {} host(s) could not be reached:\n  {}",
                list.len(),
                env.hosts.len(),
                list.join("\n  ")
            ),
        ));
    }
    let app = app_ref(env);
    let mut out = Vec::new();
    for mut conn in seen {
        let asked = async {
            let status = conn
                .client
                .call_within(
                    proto::Status {
                        app: app.clone(),
                        health: None,
                    },
                    QUICK_REPLY,
                    |_| {},
                )
                .await?;
            let list = conn
                .client
                .call_within(proto::Releases { app: app.clone() }, QUICK_REPLY, |_| {})
                .await?;
            let check = conn
                .client
                .call_within(
                    proto::Check {
                        deploy_to: Some(env.deploy_to.clone()),
                    },
                    QUICK_REPLY,
                    |_| {},
                )
                .await?;
            Ok::<_, crate::client::ClientError>((status, list, check))
        }
        .await;
        match asked {
            Ok((status, list, check)) => out.push(Seen {
                conn,
                releases: list.releases,
                lock: status.lock,
                free: check.deploy_to.and_then(|d| d.free_bytes),
            }),
            Err(e) => {
                let f = agent_failure(&conn.name, e);
                rows.push(HostPlan {
                    host: conn.name.clone(),
                    exit_code: f.code,
                    error: Some(f.message.clone()),
                    ..HostPlan::default()
                });
                plan.fail(f);
                conn.close().await;
            }
        }
    }
    plan.hosts = rows;
    out
}

/// The lock check of the real command (`lock_all`, in host-name order): who holds it.
/// With `--lock-wait` the real command would wait for it rather than fail.
fn check_locks(env: &Environment, seen: &[Seen], wait: Option<Duration>, plan: &mut Plan) {
    let mut order: Vec<&Seen> = seen.iter().collect();
    order.sort_by(|a, b| a.conn.name.cmp(&b.conn.name));
    for s in order {
        if let Some(h) = &s.lock {
            if let Some(w) = wait {
                plan.notes.push(format!(
                    "{}: the lock is held by {} since {}; the real command would wait up to \
                     {} for it (--lock-wait)",
                    s.conn.name,
                    h.holder,
                    h.since,
                    humantime::format_duration(w)
                ));
                continue;
            }
            plan.fail(Failure::new(
                exit::LOCKED,
                format!("{}: {}", s.conn.name, locked_message(env, h)),
            ));
        }
    }
}

fn locked_message(env: &Environment, h: &LockInfo) -> String {
    format!(
        "{} is being deployed by {} since {}{}; retry later, or pass --lock-wait 5m to wait \
         for it",
        env.app,
        h.holder,
        h.since,
        h.version
            .as_deref()
            .map(|v| format!(" (version {v})"))
            .unwrap_or_default()
    )
}

/// What a new deploy on this host would go back to (the agent's `rollback_target`):
/// `current`, or the newest live release. The real push offers a delta only then.
fn previous(list: &[ReleaseInfo]) -> Option<String> {
    list.iter()
        .find(|r| r.current)
        .or_else(|| list.iter().rev().find(|r| r.status == ReleaseStatus::Live))
        .map(|r| r.id.clone())
}

async fn close(seen: Vec<Seen>) {
    for s in seen {
        s.conn.close().await;
    }
}

/// Bytes a `.tar.gz` of `paths` picked out of `artifact` takes: exactly what the real
/// delta upload would send (same encoder, same order).
fn subset_size(artifact: &Path, paths: &std::collections::HashSet<String>) -> Result<u64, String> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    crate::artifact::subset(artifact, paths, &mut n)?;
    Ok(n.0)
}

/// Plans a push of `artifact` to `env` (push and promote).
async fn plan_deploy(env: &Environment, args: &PushArgs, artifact: &Path, plan: &mut Plan) {
    plan.batches(env);
    plan.version = args.version.clone();
    let artifact_size = std::fs::metadata(artifact).map(|m| m.len()).unwrap_or(0);
    plan.artifact = Some(ArtifactPlan {
        path: artifact.display().to_string(),
        size: artifact_size,
    });
    if let Err(e) = crate::artifact::check_format(artifact) {
        plan.fail(Failure::usage(e));
    }
    let mut seen = survey(env, plan).await;
    check_locks(env, &seen, args.lock_wait, plan);
    let mut conns: Vec<HostConn> = Vec::new();
    let mut info = Vec::new();
    for s in seen.drain(..) {
        conns.push(s.conn);
        info.push((s.releases, s.lock, s.free));
    }
    let release = match super::push::next_release_id(&mut conns, env).await {
        Ok((id, _)) => Some(id),
        Err(f) => {
            plan.fail(f);
            None
        }
    };
    plan.release = release.clone();
    let any_releases = info.iter().any(|(l, _, _)| !l.is_empty());
    let scan = if any_releases && !args.no_delta && plan.error.is_none() {
        let path = artifact.to_path_buf();
        match tokio::task::spawn_blocking(move || crate::artifact::scan(&path)).await {
            Ok(Ok(s)) if s.entries.len() <= MAX_DELTA_ENTRIES => Some(Arc::new(s)),
            _ => None,
        }
    } else {
        None
    };
    if args.no_delta {
        plan.notes
            .push("--no-delta: every host gets the whole artifact".into());
    }
    let migrations =
        env.strategy == Strategy::Release && env.release.migrate.is_some() && !args.skip_migrations;
    // Hosts asking for the same files get the same upload: size it once.
    let mut sized: HashMap<Vec<u32>, Result<u64, String>> = HashMap::new();
    for (mut conn, (list, lock, free)) in conns.into_iter().zip(info) {
        let mut row = HostPlan {
            host: conn.name.clone(),
            current: list.iter().find(|r| r.current).map(|r| r.id.clone()),
            new: release.clone(),
            send_bytes: Some(artifact_size),
            migrations,
            free_bytes: free,
            lock: lock.clone(),
            ..HostPlan::default()
        };
        if let Some(l) = lock.as_ref().filter(|_| args.lock_wait.is_none()) {
            row.exit_code = exit::LOCKED;
            row.error = Some(locked_message(env, l));
        }
        if let Some(scan) = scan.as_ref().filter(|_| previous(&list).is_some()) {
            let asked = conn
                .client
                .call_within(
                    proto::DeltaPlan {
                        app: app_ref(env),
                        offer: scan.offer(),
                    },
                    QUICK_REPLY,
                    |_| {},
                )
                .await;
            match asked {
                Ok(need) => {
                    let files = scan
                        .entries
                        .iter()
                        .filter(|e| matches!(e, proto::manifest::Entry::File { .. }))
                        .count();
                    // As the real push: a delta only when the host has some of the files.
                    if need.files.len() < files {
                        let picked: Vec<&proto::manifest::Entry> = need
                            .files
                            .iter()
                            .filter_map(|&i| scan.entries.get(i as usize))
                            .collect();
                        let file_bytes = picked
                            .iter()
                            .map(|e| match e {
                                proto::manifest::Entry::File { size, .. } => *size,
                                _ => 0,
                            })
                            .sum();
                        let sent = match sized.get(&need.files) {
                            Some(r) => r.clone(),
                            None => {
                                let paths = picked.iter().map(|e| e.path().to_owned()).collect();
                                let path = artifact.to_path_buf();
                                let r =
                                    tokio::task::spawn_blocking(move || subset_size(&path, &paths))
                                        .await
                                        .unwrap_or_else(|e| Err(format!("delta task: {e}")));
                                sized.insert(need.files.clone(), r.clone());
                                r
                            }
                        };
                        match sent {
                            Ok(n) => row.send_bytes = Some(n),
                            Err(e) => plan.fail(Failure::usage(e)),
                        }
                        row.delta = Some(DeltaPlan {
                            files_sent: need.files.len(),
                            files_total: files,
                            file_bytes,
                        });
                    }
                }
                Err(e) => {
                    let f = agent_failure(&conn.name, e);
                    row.exit_code = f.code;
                    row.error = Some(f.message.clone());
                    plan.fail(f);
                }
            }
        }
        // The agent refuses a push it has no room for, before anything changes.
        if row.error.is_none()
            && let Some(free) = free
            && free < artifact_size
        {
            let msg = format!(
                "not enough disk space under {}: {free} free, the artifact alone is \
                 {artifact_size}",
                env.deploy_to
            );
            row.exit_code = exit::DEPLOY_FAILED;
            row.error = Some(msg.clone());
            plan.fail(Failure::new(
                exit::DEPLOY_FAILED,
                format!("{}: {msg}", conn.name),
            ));
        }
        plan.hosts.push(row);
        conn.close().await;
    }
    sort_rows(env, plan);
}

/// Rows in the order of `hosts` in the config.
fn sort_rows(env: &Environment, plan: &mut Plan) {
    let order: Vec<String> = env.hosts.iter().map(|h| h.to_string()).collect();
    plan.hosts.sort_by_key(|h| {
        order
            .iter()
            .position(|o| *o == h.host)
            .unwrap_or(usize::MAX)
    });
}

/// Manifests larger than this go as a full upload (as in the real push).
const MAX_DELTA_ENTRIES: usize = 20_000;

/// `deployctl push ENV --plan`.
pub async fn push(cli: &Cli, args: PushArgs) -> Result<u8, Failure> {
    let mut env = load_env(cli, &args.env)?;
    let mut plan = Plan::new("push", &env);
    // The artifact, as the real push finds it (a compose push bundles its files first).
    let mut bundle = None;
    let artifact: Result<PathBuf, Failure> = match env.strategy {
        Strategy::Compose if args.artifact.is_some() => Err(Failure::usage(format!(
            "environment {} uses strategy = \"compose\": pass --compose FILE... \
             (or nothing, for compose.files), not --artifact",
            env.name
        ))),
        Strategy::Compose => {
            if !args.compose.is_empty() {
                env.compose.files = args.compose.clone();
            }
            crate::compose::bundle(&env).map(|b| {
                let p = b.path().to_path_buf();
                bundle = Some(b);
                p
            })
        }
        Strategy::Release if !args.compose.is_empty() => Err(Failure::usage(format!(
            "--compose needs strategy = \"compose\"; environment {} uses \"release\"",
            env.name
        ))),
        Strategy::Release => args
            .artifact
            .clone()
            .or_else(|| env.release.artifact.clone())
            .ok_or_else(|| {
                Failure::usage(format!(
                    "no artifact: pass --artifact PATH or set release.artifact for {}",
                    env.name
                ))
            }),
    };
    let artifact = artifact.and_then(|a| match std::fs::metadata(&a) {
        Ok(m) if m.is_file() => Ok(a),
        Ok(_) => Err(Failure::usage(format!(
            "artifact {} is not a file",
            a.display()
        ))),
        Err(e) => Err(Failure::usage(format!("artifact {}: {e}", a.display()))),
    });
    let artifact = match artifact {
        Ok(a) => a,
        Err(f) => {
            plan.batches(&env);
            plan.fail(f);
            return Ok(plan.print(args.json));
        }
    };
    if let Some(from) = env.promote_from.clone() {
        match super::push::gate(cli, &env, &from, &artifact, false).await {
            Ok(_) => plan
                .notes
                .push(format!("promote_from: this content is live on {from}")),
            Err(f) if args.force => plan.notes.push(format!(
                "--force: would push past promote_from ({})",
                f.message
            )),
            Err(f) => plan.fail(f),
        }
    }
    if env.confirm && !args.yes {
        plan.notes
            .push("confirm = true: the real push asks first (or needs --yes)".into());
    }
    plan_deploy(&env, &args, &artifact, &mut plan).await;
    drop(bundle);
    Ok(plan.print(args.json))
}

/// `deployctl promote FROM TO --plan`: picks and fetches the release from FROM (reading
/// only), then plans its push to TO.
pub async fn promote(cli: &Cli, args: PromoteArgs) -> Result<u8, Failure> {
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
    let mut plan = Plan::new("promote", &to_env);
    plan.from = Some(from_env.name.clone());
    let quiet = crate::output::Progress::new(true);
    let picked = async {
        let keys = find_keys(&from_env)?;
        let mut conns = super::connect_all(&from_env, &keys, &quiet).await?;
        let picked = super::promote::pick(&mut conns, &from_env, args.version.as_deref()).await;
        let fetched = match picked {
            Ok(release) => super::promote::fetch(&mut conns, &from_env, &release, &quiet)
                .await
                .map(|file| (release, file)),
            Err(e) => Err(e),
        };
        super::close_all(conns).await;
        fetched
    }
    .await;
    let (release, file) = match picked {
        Ok(x) => x,
        Err(f) => {
            plan.batches(&to_env);
            plan.fail(f);
            return Ok(plan.print(args.json));
        }
    };
    plan.notes.push(format!(
        "{} release {} (content {}) would be shipped as it is",
        from_env.name,
        release.id,
        release.content.as_deref().unwrap_or("-")
    ));
    if to_env.strategy == Strategy::Compose {
        to_env.compose.files = from_env.compose.files.clone();
        to_env.compose.env_file = from_env.compose.env_file.clone();
    }
    if to_env.confirm && !args.yes {
        plan.notes
            .push("confirm = true: the real promote asks first (or needs --yes)".into());
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
        wait: false,
    };
    plan_deploy(&to_env, &push, file.path(), &mut plan).await;
    if let Some(a) = &mut plan.artifact {
        a.path = format!("{} release {}", from_env.name, release.id);
    }
    Ok(plan.print(args.json))
}

/// `deployctl rollback ENV [--to RELEASE] --plan`.
pub async fn rollback(
    cli: &Cli,
    env_name: &str,
    to: Option<String>,
    lock_wait: Option<Duration>,
    json: bool,
) -> Result<u8, Failure> {
    let env = load_env(cli, env_name)?;
    let mut plan = Plan::new("rollback", &env);
    plan.to = to.clone();
    plan.batches = vec![BatchPlan {
        batch: 1,
        canary: false,
        hosts: env.hosts.iter().map(|h| h.to_string()).collect(),
    }];
    if env.confirm {
        plan.notes
            .push("confirm = true: the real rollback asks first (or needs --yes)".into());
    }
    let seen = survey(&env, &mut plan).await;
    check_locks(&env, &seen, lock_wait, &mut plan);
    // With --to, the real rollback first checks every host has it.
    if let Some(to) = &to {
        let missing: Vec<&str> = seen
            .iter()
            .filter(|s| {
                !s.releases
                    .iter()
                    .any(|r| r.id == *to || r.version.as_deref() == Some(to))
            })
            .map(|s| s.conn.name.as_str())
            .collect();
        if !missing.is_empty() {
            plan.fail(Failure::usage(format!(
                "release {to:?} does not exist on {}; nothing was changed \
                 (see `deployctl releases {}`)",
                missing.join(", "),
                env.name
            )));
        }
    }
    for s in &seen {
        let current = s.releases.iter().find(|r| r.current).map(|r| r.id.clone());
        let mut row = HostPlan {
            host: s.conn.name.clone(),
            current: current.clone(),
            send_bytes: Some(0),
            free_bytes: s.free,
            lock: s.lock.clone(),
            ..HostPlan::default()
        };
        match rollback_target(&s.releases, current.as_deref(), to.as_deref()) {
            Ok(t) => row.new = Some(t.id),
            Err(why) => {
                let f = Failure::usage(format!("{}: {why}", s.conn.name));
                row.exit_code = f.code;
                row.error = Some(why);
                plan.fail(f);
            }
        }
        if row.error.is_none()
            && lock_wait.is_none()
            && let Some(l) = &s.lock
        {
            row.exit_code = exit::LOCKED;
            row.error = Some(locked_message(&env, l));
        }
        plan.hosts.push(row);
    }
    close(seen).await;
    sort_rows(&env, &mut plan);
    Ok(plan.print(json))
}

/// The release the agent's rollback would switch to, or why it would refuse (its own
/// words): `to` by id, else the newest with that version label; without `to`, the newest
/// live release older than `current`. A release that failed, or was rolled back, is
/// refused.
fn rollback_target(
    list: &[ReleaseInfo],
    current: Option<&str>,
    to: Option<&str>,
) -> Result<ReleaseInfo, String> {
    let target = match to {
        Some(to) => list
            .iter()
            .find(|r| r.id == to)
            .or_else(|| list.iter().rev().find(|r| r.version.as_deref() == Some(to)))
            .cloned()
            .ok_or_else(|| {
                format!("no release {to:?} on this host (neither an id nor a version label)")
            })?,
        None => current
            .and_then(|c| {
                list.iter()
                    .rev()
                    .find(|r| r.id.as_str() < c && r.status == ReleaseStatus::Live)
            })
            .cloned()
            .ok_or_else(|| {
                "no earlier live release to roll back to; name one with --to".to_owned()
            })?,
    };
    match target.status {
        ReleaseStatus::Failed => Err(format!(
            "release {} failed before it went live (its migration did not finish); refusing \
             to roll back to it",
            target.id
        )),
        ReleaseStatus::RolledBack => Err(format!(
            "release {} failed its health check and was rolled back; refusing to roll back to \
             it (push it again to retry it)",
            target.id
        )),
        ReleaseStatus::Prepared | ReleaseStatus::Live => Ok(target),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(id: &str, version: Option<&str>, status: ReleaseStatus, current: bool) -> ReleaseInfo {
        ReleaseInfo {
            id: id.into(),
            version: version.map(Into::into),
            sha256: None,
            created: String::new(),
            status,
            current,
            content: None,
        }
    }

    #[test]
    fn rollback_targets_match_the_agents_choice() {
        use ReleaseStatus::*;
        let list = vec![
            rel("20260101000000", Some("v1"), Live, false),
            rel("20260102000000", Some("v2"), RolledBack, false),
            rel("20260103000000", Some("v3"), Live, true),
        ];
        let cur = Some("20260103000000");
        assert_eq!(
            rollback_target(&list, cur, None).unwrap().id,
            "20260101000000"
        );
        assert_eq!(
            rollback_target(&list, cur, Some("v1")).unwrap().id,
            "20260101000000"
        );
        assert!(
            rollback_target(&list, cur, Some("v2"))
                .unwrap_err()
                .contains("rolled back")
        );
        assert!(
            rollback_target(&list, cur, Some("v9"))
                .unwrap_err()
                .contains("no release \"v9\"")
        );
        assert!(rollback_target(&list[..1], Some("20260101000000"), None).is_err());
    }

    #[test]
    fn a_push_goes_back_to_current_or_the_newest_live_release() {
        use ReleaseStatus::*;
        let list = vec![
            rel("20260101000000", None, Live, false),
            rel("20260102000000", None, Failed, false),
        ];
        assert_eq!(previous(&list).as_deref(), Some("20260101000000"));
        assert_eq!(previous(&[]), None);
    }
}
