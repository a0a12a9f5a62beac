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
