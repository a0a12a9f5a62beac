//! The compose strategy on the server: which compose binary to run, the argv of every
//! step, what a release records about its compose project, and which services need a
//! closer look after a failure.
//!
//! Everything here but [`detect`] is pure (argv in, argv out) so it is unit-tested
//! without Docker; [`crate::deploy`] and [`crate::instances`] run the argvs through
//! [`crate::exec`]. Commands run without a
//! shell, in the release dir, so `-f` and `--env-file` take plain file names.
//!
//! v1 (`docker-compose`) and v2 (`docker compose`) take the same global flags
//! (`-p`, `-f`, `--env-file`, before the subcommand) and the same subcommand flags for
//! what we use, so the two differ only in the program prefix. Detection tries v2 first.
//!
//! # Zero-downtime rollout (`zero_downtime = ["web"]`)
//!
//! The argvs and the on-disk record of a rollout are here; the driver that runs them is
//! [`crate::deploy`]'s `compose_rollout`. For each listed service, docker-rollout's way:
//!
//! 1. the unlisted services: [`Compose::up_services`] (`up -d --remove-orphans --no-deps
//!    S...`, no `--force-recreate`: compose recreates only what changed, so an unchanged
//!    proxy keeps serving);
//! 2. [`Compose::scale_up`] (`up -d --no-deps --no-recreate --scale web=N+1 web`) with the
//!    new release's files: a second container beside the old one (v1 names it
//!    `project_web_2`, v2 `project-web-2`: containers are found by their labels, never by
//!    name, [`service_containers`]);
//! 3. wait until Docker says the new one is healthy ([`health_status`]), and the health
//!    URL (through the proxy) answers;
//! 4. wait `drain` (`compose.drain`, default [`DEFAULT_DRAIN`]) with both containers
//!    serving: the proxy looks the name up again within its `valid` and learns the new
//!    address; then [`stop`] the old one (its stop signal and grace period: in-flight
//!    requests finish; it leaves Docker's DNS when its process exits) and [`remove`] it.
//!    It is not `docker network disconnect`ed first: that black-holes the connections in
//!    flight (no reset reaches the proxy), measured as failed requests on every rollout.
//!    After the stop the proxy may still hold the old address for up to its `valid`: a
//!    connect to it gets no answer, so the proxy needs a short connect timeout to move on
//!    to the new address (docs/cutover.md).
//!
//! A failure before step 4 removes the new container: the old one never stopped serving.
//! [`Rollout`] is written to `.deploy/compose-rollout.json` before step 2 and again before
//! step 4, so a rollout the agent did not finish is finished or undone by the next one
//! ([`Rollout::leftovers`]): at most one extra container is left, and it is removed.

use std::future::Future;
use std::path::Path;

use proto::{ComposeSpec, StepReport};

use crate::exec::{self, ExecError};

/// Limit for commands that only look (`docker info`, `version`, `ps`, `logs`).
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How many log lines per service a failure report carries.
pub const LOG_LINES: u32 = 50;

/// How compose is invoked: the program and any leading arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compose {
    program: Vec<String>,
}

/// The compose project of one release.
#[derive(Debug, Clone, Copy)]
pub struct Project<'a> {
    pub name: &'a str,
    pub files: &'a [String],
    pub env_file: Option<&'a str>,
}

impl<'a> Project<'a> {
    pub fn of(spec: &'a ComposeSpec) -> Self {
        Project {
            name: &spec.project,
            files: &spec.files,
            env_file: spec.env_file.as_deref(),
        }
    }
}

impl Compose {
    /// `docker compose` (the CLI plugin).
    pub fn v2() -> Self {
        Compose {
            program: vec!["docker".into(), "compose".into()],
        }
    }

    /// `docker-compose` (the standalone Python tool).
    pub fn v1() -> Self {
        Compose {
            program: vec!["docker-compose".into()],
        }
    }

    /// What to try, in order, when `compose_command` is not set.
    pub fn candidates() -> [Compose; 2] {
        [Compose::v2(), Compose::v1()]
    }

    /// `compose_command` from the config, split on whitespace (`"docker compose"`).
    pub fn from_command(command: &str) -> Result<Self, String> {
        let program: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
        if program.is_empty() {
            return Err("compose_command is empty".into());
        }
        Ok(Compose { program })
    }

    /// How it is shown: `docker compose` or `docker-compose`.
    pub fn name(&self) -> String {
        self.program.join(" ")
    }

    /// A probe that works only when this compose is installed.
    pub fn version(&self) -> Vec<String> {
        self.with(&["version"])
    }

    /// Parses and checks the files (with the env file) without touching anything.
    pub fn config(&self, p: Project<'_>) -> Vec<String> {
        self.project(p, &["config", "-q"])
    }

    pub fn pull(&self, p: Project<'_>) -> Vec<String> {
        self.project(p, &["pull"])
    }

    /// The deploy itself, and the rollback with the previous release's files.
    pub fn up(&self, p: Project<'_>) -> Vec<String> {
        self.project(p, &["up", "-d", "--force-recreate", "--remove-orphans"])
    }

    /// The unlisted services of a zero-downtime deploy: started or recreated only when
    /// their config changed, never their dependencies.
    pub fn up_services(&self, p: Project<'_>, services: &[String]) -> Vec<String> {
        let mut argv = self.project(p, &["up", "-d", "--remove-orphans", "--no-deps"]);
        argv.extend(services.iter().cloned());
        argv
    }

    /// A zero-downtime service: `count` containers of `service`, the existing ones kept
    /// as they are (the new one runs with these files).
    pub fn scale_up(&self, p: Project<'_>, service: &str, count: usize) -> Vec<String> {
        let scale = format!("{service}={count}");
        self.project(
            p,
            &[
                "up",
                "-d",
                "--no-deps",
                "--no-recreate",
                "--scale",
                &scale,
                service,
            ],
        )
    }

    /// The services the files define, one per line.
    pub fn services(&self, p: Project<'_>) -> Vec<String> {
        self.project(p, &["config", "--services"])
    }

    /// Every container of the project, stopped ones too (v2 hides them without `-a`).
    pub fn ps(&self, p: Project<'_>) -> Vec<String> {
        self.project(p, &["ps", "-a"])
    }

    /// The last [`LOG_LINES`] lines of `services` (all services when empty).
    pub fn logs(&self, p: Project<'_>, services: &[String]) -> Vec<String> {
        let tail = LOG_LINES.to_string();
        let mut argv = self.project(p, &["logs", "--tail", &tail, "--no-color"]);
        argv.extend(services.iter().cloned());
        argv
    }

    /// Stops and removes the project's containers; volumes are kept.
    pub fn down(&self, p: Project<'_>) -> Vec<String> {
        self.project(p, &["down", "--remove-orphans"])
    }

    /// Removes a review-app instance for good: its containers and its volumes (its
    /// database with them).
    pub fn down_volumes(&self, p: Project<'_>) -> Vec<String> {
        self.project(p, &["down", "-v", "--remove-orphans"])
    }

    fn with(&self, args: &[&str]) -> Vec<String> {
        let mut argv = self.program.clone();
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv
    }

    fn project(&self, p: Project<'_>, args: &[&str]) -> Vec<String> {
        let mut argv = self.program.clone();
        argv.extend(["-p".into(), p.name.to_owned()]);
        for f in p.files {
            argv.extend(["-f".into(), f.clone()]);
        }
        if let Some(e) = p.env_file {
            argv.extend(["--env-file".into(), e.to_owned()]);
        }
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv
    }
}

/// What a report shows of the `logs` step: its output, or a line saying the services
/// logged nothing. v1 always prints `Attaching to ...`; v2 prints nothing at all, and an
/// empty output would leave the step out of the report.
pub fn logs_output(output: String) -> String {
    if output.trim().is_empty() {
        "(no log lines: the services printed nothing)\n".to_owned()
    } else {
        output
    }
}

/// Fails when the daemon cannot be reached (or there is no `docker` at all).
pub fn docker_info() -> Vec<String> {
    ["docker", "info", "--format", "{{.ServerVersion}}"]
        .map(str::to_owned)
        .to_vec()
}

/// Ids of every container of `project`, as labelled by both compose versions.
pub fn project_containers(project: &str) -> Vec<String> {
    let mut argv: Vec<String> = ["docker", "ps", "-a", "-q", "--filter"]
        .map(str::to_owned)
        .to_vec();
    argv.push(format!("label=com.docker.compose.project={project}"));
    argv
}

/// Full ids of every container of `service` in `project` (not `run` one-offs), stopped
/// ones too.
pub fn service_containers(project: &str, service: &str) -> Vec<String> {
    let mut argv: Vec<String> = ["docker", "ps", "-a", "-q", "--no-trunc"]
        .map(str::to_owned)
        .to_vec();
    for label in [
        format!("com.docker.compose.project={project}"),
        format!("com.docker.compose.service={service}"),
        "com.docker.compose.oneoff=False".to_owned(),
    ] {
        argv.extend(["--filter".to_owned(), format!("label={label}")]);
    }
    argv
}

/// `<status> <health>` of one container; health is `none` without a healthcheck.
pub fn health_status(id: &str) -> Vec<String> {
    vec![
        "docker".into(),
        "inspect".into(),
        "--format".into(),
        "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}".into(),
        id.into(),
    ]
}

/// What [`health_status`] printed, judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Not yet: `starting`, or `created`.
    Waiting,
    /// Will not become healthy: why.
    Failed(String),
}

pub fn judge_health(output: &str) -> Health {
    let line = output
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let mut f = line.split_whitespace();
    let (status, health) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
    match (status, health) {
        ("running", "healthy") => Health::Healthy,
        ("running" | "created" | "restarting", "starting") | ("created", _) => Health::Waiting,
        ("running", "none") => {
            Health::Failed("it has no healthcheck (a zero_downtime service needs one)".into())
        }
        ("running", "unhealthy") => Health::Failed("Docker reports it unhealthy".into()),
        (s, _) if !s.is_empty() => Health::Failed(format!("it is {s}, not running")),
        _ => Health::Failed(format!("docker inspect said {line:?}")),
    }
}

/// Stops a container with its own stop signal and grace period.
pub fn stop(id: &str) -> Vec<String> {
    ["docker", "stop", id].map(str::to_owned).to_vec()
}

pub fn remove(ids: &[String]) -> Vec<String> {
    let mut argv: Vec<String> = ["docker", "rm", "-f"].map(str::to_owned).to_vec();
    argv.extend(ids.iter().cloned());
    argv
}

/// The last log lines of one container.
pub fn container_logs(id: &str) -> Vec<String> {
    let tail = LOG_LINES.to_string();
    ["docker", "logs", "--tail", &tail, id]
        .map(str::to_owned)
        .to_vec()
}

/// The container ids in a command's output (the log holds stderr too).
pub fn ids_in(output: &str) -> Vec<String> {
    output
        .split_whitespace()
        .filter(|w| w.len() >= 12 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .collect()
}

/// The drain when the spec sets none (`compose.drain`): over nginx's `resolver ...
/// valid=1s`, which caches an answer for up to two seconds (whole seconds).
pub const DEFAULT_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// A zero-downtime rollout of one service in flight, on disk while it runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rollout {
    pub service: String,
    /// The containers serving before the rollout.
    pub old: Vec<String>,
    /// Set once the new container is healthy, before the drain: from then on the new one
    /// serves, and finishing means removing the old ones.
    pub switched: bool,
}

impl Rollout {
    pub fn path(state_dir: &Path) -> std::path::PathBuf {
        state_dir.join("compose-rollout.json")
    }

    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        crate::release::layout::write_atomic(&Self::path(state_dir), &serde_json::to_vec(self)?)
    }

    pub fn load(state_dir: &Path) -> Option<Rollout> {
        let text = std::fs::read_to_string(Self::path(state_dir)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn clear(state_dir: &Path) {
        let _ = std::fs::remove_file(Self::path(state_dir));
    }

    /// The containers to remove when this rollout was interrupted and `now` are the
    /// service's containers: before the switch, whatever it started (the old ones still
    /// serve); after it, the old ones (the new one serves).
    pub fn leftovers(&self, now: &[String]) -> Vec<String> {
        now.iter()
            .filter(|id| self.old.contains(id) == self.switched)
            .cloned()
            .collect()
    }
}

/// One line per container: `<service> <status> [<health>]`.
pub fn inspect(ids: &[String]) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "docker".into(),
        "inspect".into(),
        "--format".into(),
        "{{index .Config.Labels \"com.docker.compose.service\"}} {{.State.Status}} \
         {{if .State.Health}}{{.State.Health.Status}}{{end}}"
            .into(),
    ];
    argv.extend(ids.iter().cloned());
    argv
}

/// The services, from [`inspect`]'s output, with a container that is not running or
/// whose healthcheck does not say healthy. Sorted, each once.
pub fn troubled_services(inspect_output: &str) -> Vec<String> {
    let mut out: Vec<String> = inspect_output
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let service = f.next()?;
            let status = f.next()?;
            let health = f.next();
            let bad = status != "running" || health.is_some_and(|h| h != "healthy");
            bad.then(|| service.to_owned())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Checks what the controller sent before any of it reaches a command line.
pub fn check_spec(spec: &ComposeSpec) -> Result<(), String> {
    if spec.files.is_empty() {
        return Err("no compose files".into());
    }
    for f in spec.files.iter().chain(spec.env_file.iter()) {
        if !plain_file_name(f) {
            return Err(format!(
                "compose file name {f:?} must be a plain file name in the release"
            ));
        }
    }
    let p = &spec.project;
    let mut chars = p.chars();
    let ok = p.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        return Err(format!(
            "compose project {p:?} must be lowercase letters, digits, `-` and `_`"
        ));
    }
    Ok(())
}

fn plain_file_name(f: &str) -> bool {
    !f.is_empty() && f != "." && f != ".." && !f.contains('/') && !f.starts_with('-')
}

/// Where a release records the compose files and env file it was deployed with, so a
/// rollback to it runs `up` with its own files.
pub fn record_path(release_dir: &Path) -> std::path::PathBuf {
    release_dir.join(".deploy").join("compose.json")
}

pub fn record(release_dir: &Path, spec: &ComposeSpec) -> std::io::Result<()> {
    let path = record_path(release_dir);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    crate::release::layout::write_atomic(&path, &serde_json::to_vec_pretty(spec)?)
}

pub fn recorded(release_dir: &Path) -> Option<ComposeSpec> {
    let text = std::fs::read_to_string(record_path(release_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// An argv as a shell would need it typed, for reports.
pub fn display(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+%".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Which compose to run: `configured` (`compose_command`), or the first of v2 and v1
/// whose `version` answers. `probe` runs an argv the way its caller runs commands (its
/// log, stage, timeout). On failure: why, naming each candidate's error, and the last
/// failed probe's report. The one detection for the deploy and for destroy.
pub async fn detect<F, Fut>(
    configured: Option<&str>,
    mut probe: F,
) -> Result<Compose, (String, Option<StepReport>)>
where
    F: FnMut(Vec<String>) -> Fut,
    Fut: Future<Output = Result<StepReport, (StepReport, ExecError)>>,
{
    let candidates = match configured {
        Some(cmd) => vec![Compose::from_command(cmd).map_err(|e| (e, None))?],
        None => Compose::candidates().to_vec(),
    };
    let mut tried = Vec::new();
    let mut last = None;
    for c in candidates {
        match probe(c.version()).await {
            Ok(_) => return Ok(c),
            Err((step, e)) => {
                tried.push(exec::with_output(&e.to_string(), &step.output));
                last = Some(step);
            }
        }
    }
    let why = match configured {
        Some(cmd) => format!(
            "compose_command `{cmd}` does not work on this host: {}",
            tried.join("; ")
        ),
        None => format!(
            "neither `docker compose` (v2) nor `docker-compose` (v1) works on this host \
             ({}); install one, or set compose_command",
            tried.join("; ")
        ),
    };
    Err((why, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ComposeSpec {
        ComposeSpec {
            files: vec!["docker-compose.yml".into(), "compose.production.yml".into()],
            env_file: Some(".env.production".into()),
            project: "myapp".into(),
            pull: true,
            command: None,
            zero_downtime: Vec::new(),
            drain_ms: None,
        }
    }

    fn words(argv: &[String]) -> String {
        argv.join(" ")
    }

    #[test]
    fn detection_tries_v2_then_v1() {
        let [first, second] = Compose::candidates();
        assert_eq!(words(&first.version()), "docker compose version");
        assert_eq!(words(&second.version()), "docker-compose version");
    }

    #[test]
    fn v2_argv() {
        let s = spec();
        let p = Project::of(&s);
        let c = Compose::v2();
        let base = "docker compose -p myapp -f docker-compose.yml -f compose.production.yml \
                    --env-file .env.production";
        assert_eq!(words(&c.config(p)), format!("{base} config -q"));
        assert_eq!(words(&c.pull(p)), format!("{base} pull"));
        assert_eq!(
            words(&c.up(p)),
            format!("{base} up -d --force-recreate --remove-orphans")
        );
        assert_eq!(words(&c.ps(p)), format!("{base} ps -a"));
        assert_eq!(
            words(&c.logs(p, &["web".into(), "proxy".into()])),
            format!("{base} logs --tail 50 --no-color web proxy")
        );
        assert_eq!(words(&c.down(p)), format!("{base} down --remove-orphans"));
        assert_eq!(
            words(&c.down_volumes(p)),
            format!("{base} down -v --remove-orphans")
        );
        // each value is its own argument: nothing goes through a shell
        let up = c.up(p);
        assert_eq!(up[..4], ["docker", "compose", "-p", "myapp"]);
    }

    #[test]
    fn v1_argv() {
        let mut s = spec();
        s.env_file = None;
        s.files = vec!["docker-compose.yml".into()];
        let p = Project::of(&s);
        let c = Compose::v1();
        assert_eq!(
            words(&c.up(p)),
            "docker-compose -p myapp -f docker-compose.yml up -d --force-recreate --remove-orphans"
        );
        assert_eq!(
            words(&c.logs(p, &[])),
            "docker-compose -p myapp -f docker-compose.yml logs --tail 50 --no-color"
        );
    }

    #[test]
    fn zero_downtime_argv() {
        let s = spec();
        let p = Project::of(&s);
        let base = "-p myapp -f docker-compose.yml -f compose.production.yml \
                    --env-file .env.production";
        for (c, bin) in [
            (Compose::v2(), "docker compose"),
            (Compose::v1(), "docker-compose"),
        ] {
            assert_eq!(
                words(&c.scale_up(p, "web", 2)),
                format!("{bin} {base} up -d --no-deps --no-recreate --scale web=2 web")
            );
            assert_eq!(
                words(&c.up_services(p, &["proxy".into(), "db".into()])),
                format!("{bin} {base} up -d --remove-orphans --no-deps proxy db")
            );
            assert_eq!(
                words(&c.services(p)),
                format!("{bin} {base} config --services")
            );
        }
        assert_eq!(
            words(&service_containers("myapp", "web")),
            "docker ps -a -q --no-trunc --filter label=com.docker.compose.project=myapp \
             --filter label=com.docker.compose.service=web \
             --filter label=com.docker.compose.oneoff=False"
        );
        assert_eq!(words(&stop("abc")), "docker stop abc");
        assert_eq!(
            words(&remove(&["a".into(), "b".into()])),
            "docker rm -f a b"
        );
    }

    #[test]
    fn health_status_is_judged() {
        assert_eq!(judge_health("running healthy\n"), Health::Healthy);
        assert_eq!(judge_health("running starting\n"), Health::Waiting);
        assert_eq!(judge_health("created none\n"), Health::Waiting);
        for bad in [
            "running unhealthy",
            "exited unhealthy",
            "exited none",
            "running none",
            "",
        ] {
            assert!(
                matches!(judge_health(bad), Health::Failed(_)),
                "{bad:?}: {:?}",
                judge_health(bad)
            );
        }
    }

    #[test]
    fn an_unfinished_rollout_leaves_one_side_and_removes_the_other() {
        let old = "aaaaaaaaaaaa".to_owned();
        let new = "bbbbbbbbbbbb".to_owned();
        let now = [old.clone(), new.clone()];
        let mut r = Rollout {
            service: "web".into(),
            old: vec![old.clone()],
            switched: false,
        };
        // Before the switch the old one serves: the new one goes.
        assert_eq!(r.leftovers(&now), vec![new.clone()]);
        assert!(r.leftovers(std::slice::from_ref(&old)).is_empty());
        // After it the new one serves: the old one goes.
        r.switched = true;
        assert_eq!(r.leftovers(&now), vec![old.clone()]);
        assert!(r.leftovers(std::slice::from_ref(&new)).is_empty());

        let dir = tempfile::tempdir().unwrap();
        assert!(Rollout::load(dir.path()).is_none());
        r.save(dir.path()).unwrap();
        assert_eq!(Rollout::load(dir.path()), Some(r));
        Rollout::clear(dir.path());
        assert!(Rollout::load(dir.path()).is_none());
        assert_eq!(ids_in("Error x\nabcdef0123456789\n"), ["abcdef0123456789"]);
    }

    #[test]
    fn compose_command_is_split_on_whitespace() {
        assert_eq!(
            Compose::from_command("docker compose").unwrap(),
            Compose::v2()
        );
        assert_eq!(
            Compose::from_command(" docker-compose ").unwrap(),
            Compose::v1()
        );
        let custom = Compose::from_command("/opt/bin/docker  compose").unwrap();
        assert_eq!(custom.name(), "/opt/bin/docker compose");
        assert!(Compose::from_command("  ").is_err());
    }

    #[test]
    fn project_and_file_names_are_checked() {
        assert!(check_spec(&spec()).is_ok());
        for bad in ["../x.yml", "/etc/x.yml", "sub/x.yml", "-f", "", ".."] {
            let mut s = spec();
            s.files = vec![bad.into()];
            assert!(check_spec(&s).is_err(), "{bad}");
            let mut s = spec();
            s.env_file = Some(bad.into());
            assert!(check_spec(&s).is_err(), "{bad}");
        }
        for bad in ["My App", "-p", "", "a/b"] {
            let mut s = spec();
            s.project = bad.into();
            assert!(check_spec(&s).is_err(), "{bad}");
        }
        let mut s = spec();
        s.files.clear();
        assert!(check_spec(&s).is_err());
    }

    #[test]
    fn troubled_services_are_the_ones_not_running_or_not_healthy() {
        let out = "web running healthy\n\
                   api exited \n\
                   proxy running unhealthy\n\
                   worker running\n\
                   db running starting\n\
                   api exited\n";
        assert_eq!(troubled_services(out), ["api", "db", "proxy"]);
        assert!(troubled_services("web running\n").is_empty());
        assert!(troubled_services("").is_empty());
    }

    #[test]
    fn inspect_and_ps_filters_name_the_project() {
        assert_eq!(
            project_containers("myapp").last().unwrap(),
            "label=com.docker.compose.project=myapp"
        );
        let i = inspect(&["abc".into(), "def".into()]);
        assert_eq!(i[..3], ["docker", "inspect", "--format"]);
        assert_eq!(i[4..], ["abc", "def"]);
    }

    #[test]
    fn empty_logs_say_so() {
        // See: #12
        assert_eq!(
            logs_output("\n".into()),
            "(no log lines: the services printed nothing)\n"
        );
        assert_eq!(logs_output("web-1 | hi\n".into()), "web-1 | hi\n");
    }

    #[test]
    fn the_record_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert!(recorded(dir.path()).is_none());
        record(dir.path(), &spec()).unwrap();
        assert_eq!(recorded(dir.path()), Some(spec()));
    }

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let argv: Vec<String> = ["docker", "inspect", "--format", "{{.State}} x", "it's"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(
            display(&argv),
            r"docker inspect --format '{{.State}} x' 'it'\''s'"
        );
    }
}
