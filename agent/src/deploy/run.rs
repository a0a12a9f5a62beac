//! The deploy's executor: the effects of each step (link shared paths, migrate, switch,
//! restart, check health, confirm) and of the ends (failed before the switch, rolled
//! back, live), and the one driver loop ([`Run::drive`]) that writes the phase to the
//! journal before a step acts and asks [`super::machine`] where to go next. Runs in its
//! own task, owned by the agent: a controller that goes away changes nothing about how
//! it ends.
//!
//! A compose release (`spec.compose`) goes the same way. Before the switch: Docker must
//! answer, the files must parse (`config -q`) and, with `pull`, the images must pull;
//! any failure there leaves `current` and the running containers untouched. "Restart"
//! is `up -d --force-recreate --remove-orphans` with the release's own files, so a
//! rollback (and recovery) runs the previous release's files. A failed release is
//! reported with `ps` and the last log lines of the services in trouble.

use std::collections::BTreeMap;
use std::path::{Component, Path};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{Action, DeployReport, Event, HistoryEntry, Outcome, ReleaseStatus, Stage, StepReport};
use tokio::sync::mpsc::UnboundedSender;

use super::error::StepError;
use super::journal::{Journal, Phase, Serving, Slots};
use super::machine::{self, Next, Step};
use crate::command_env::command_env;
use crate::compose::{self, Compose, PROBE_TIMEOUT, Project};
use crate::exec;
use crate::health;
use crate::history;
use crate::lock::LockGuard;
use crate::notify;
use crate::ports;
use crate::release::layout::Layout;
use crate::release::{prune, switch};

/// Where progress goes. Sending to a session that has gone is not an error.
#[derive(Clone, Default)]
pub struct Events {
    tx: Option<UnboundedSender<Event>>,
    redact: Arc<Vec<String>>,
}

impl Events {
    pub fn new(tx: UnboundedSender<Event>) -> Self {
        Self {
            tx: Some(tx),
            redact: Arc::default(),
        }
    }
    pub fn none() -> Self {
        Self::default()
    }
    /// Masks these values in everything sent or logged from now on.
    pub fn with_redact(mut self, values: &[String]) -> Self {
        let mut v: Vec<String> = values.iter().filter(|s| s.len() >= 4).cloned().collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.len()));
        self.redact = Arc::new(v);
        self
    }
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in self.redact.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
    pub fn send(&self, stage: Stage, message: impl Into<String>) {
        let message = self.redact(&message.into());
        tracing::info!(?stage, "{message}");
        if let Some(tx) = &self.tx {
            let _ = tx.send(Event { stage, message });
        }
    }
}

/// One deploy or rollback in flight.
pub struct Run {
    pub layout: Layout,
    pub journal: Journal,
    pub events: Events,
    pub steps: Vec<StepReport>,
    pub health: Option<proto::HealthReport>,
    started: Instant,
    /// The compose command, once detected.
    compose: Option<Compose>,
    /// `[cutover]`: the proxy may have been switched to the new slot without
    /// `slot.json` saying so (a `switch` ran, or the agent died in one): a rollback
    /// then points it at the old slot again.
    pub proxy_maybe_moved: bool,
    /// Compose `zero_downtime`: the listed services whose old container this run has not
    /// replaced (set once a rollout began): a rollback leaves them as they are.
    pub(super) compose_untouched: Option<super::compose_rollout::Untouched>,
    /// Held until the run ends.
    _lock: Arc<LockGuard>,
}

impl Run {
    pub fn new(layout: Layout, mut journal: Journal, events: Events, lock: Arc<LockGuard>) -> Self {
        let events = events.with_redact(&journal.spec.redact);
        let phase = journal.phase;
        // `[cutover]`: the new release goes on the slot that does not serve. Fixed here
        // and kept in the journal, so recovery acts on the same two ports.
        if let (Some(c), None) = (&journal.spec.cutover, journal.slots) {
            journal.slots = Some(Slots::choose(
                c.ports,
                Serving::load(&layout).map(|s| s.port),
            ));
        }
        Self {
            layout,
            journal,
            events,
            steps: Vec::new(),
            health: None,
            started: Instant::now(),
            compose: None,
            proxy_maybe_moved: matches!(phase, Phase::Routing | Phase::RollingBack),
            compose_untouched: None,
            _lock: lock,
        }
    }

    /// [`Run::env`] for a command about the slot `port`, the other being `other`.
    fn env_at(&self, release: &str, port: u16, other: Option<u16>) -> BTreeMap<String, String> {
        let mut env = self.env(release);
        env.insert("DEPLOY_PORT".into(), port.to_string());
        env.insert(
            "DEPLOY_PREVIOUS_PORT".into(),
            other.map(|p| p.to_string()).unwrap_or_default(),
        );
        env
    }

    /// The environment of a command of this run: with `[cutover]`, `DEPLOY_PORT` is the
    /// new slot and `DEPLOY_PREVIOUS_PORT` the old one (empty when none served) unless
    /// the command is about another slot ([`Run::env_at`]).
    fn env(&self, release: &str) -> BTreeMap<String, String> {
        let mut env = self.plain_env(release);
        if let Some(s) = self.journal.slots {
            env.insert("DEPLOY_PORT".into(), s.new.to_string());
            env.insert(
                "DEPLOY_PREVIOUS_PORT".into(),
                s.old.map(|p| p.to_string()).unwrap_or_default(),
            );
        }
        env
    }

    fn plain_env(&self, release: &str) -> BTreeMap<String, String> {
        let j = &self.journal;
        // The version of the release this command runs for (on a rollback, the old one).
        let version = if release == j.release {
            j.version.clone()
        } else {
            self.layout.read_meta(release).and_then(|m| m.version)
        };
        command_env(
            &j.app,
            &self.layout,
            release,
            version,
            j.previous.as_deref(),
        )
    }

    fn persist(&mut self, phase: Phase) -> Result<(), StepError> {
        self.journal
            .set(&self.layout, phase)
            .map_err(StepError::Journal)
    }

    async fn command(
        &mut self,
        stage: Stage,
        command: &str,
        release: &str,
    ) -> Result<(), StepError> {
        let env = self.env(release);
        self.command_with(stage, command, release, env).await
    }

    /// A `[cutover]` command about the slot `port` (`other` being the other one).
    async fn slot_command(
        &mut self,
        stage: Stage,
        command: &str,
        release: &str,
        port: u16,
        other: Option<u16>,
    ) -> Result<(), StepError> {
        let env = self.env_at(release, port, other);
        self.command_with(stage, command, release, env).await
    }

    async fn command_with(
        &mut self,
        stage: Stage,
        command: &str,
        release: &str,
        env: BTreeMap<String, String>,
    ) -> Result<(), StepError> {
        self.events.send(stage, format!("running `{command}`"));
        let dir = self.layout.release(release);
        let log = self.layout.logs().join(format!(
            "{}.{}.log",
            self.journal.release,
            stage_name(stage)
        ));
        // A release dir that is gone (a rollback target pruned meanwhile) fails to spawn.
        let timeout = Duration::from_millis(self.journal.spec.command_timeout_ms.max(1));
        let result = exec::run(exec::Command {
            stage,
            command,
            argv: None,
            dir: &dir,
            env: &env,
            timeout,
            log: log.clone(),
        })
        .await;
        exec::mask_log(&log, |t| self.events.redact(t));
        match result {
            Ok(step) => {
                self.events.send(
                    stage,
                    format!("`{command}` succeeded in {}ms", step.duration_ms),
                );
                self.steps.push(step);
                Ok(())
            }
            Err((step, e)) => {
                self.events.send(stage, e.to_string());
                self.steps.push(step);
                Err(StepError::Command(e))
            }
        }
    }

    /// Runs an agent command (compose, docker) in `release`'s dir; reports nothing.
    /// `name` keeps its log apart: `.deploy/logs/<deploy>.<name>.<release>.log`.
    pub(super) async fn exec_argv(
        &self,
        stage: Stage,
        name: &str,
        argv: &[String],
        release: &str,
        timeout: Option<Duration>,
    ) -> Result<StepReport, (StepReport, exec::ExecError)> {
        let env = self.env(release);
        let dir = self.layout.release(release);
        let log = self
            .layout
            .logs()
            .join(format!("{}.{name}.{release}.log", self.journal.release));
        // Each run of a step reports its own output, not the previous run's.
        let _ = std::fs::remove_file(&log);
        let spec_timeout = Duration::from_millis(self.journal.spec.command_timeout_ms.max(1));
        let shown = compose::display(argv);
        let result = exec::run(exec::Command {
            stage,
            command: &shown,
            argv: Some(argv),
            dir: &dir,
            env: &env,
            timeout: timeout.map_or(spec_timeout, |t| t.min(spec_timeout)),
            log: log.clone(),
        })
        .await;
        exec::mask_log(&log, |t| self.events.redact(t));
        result
    }

    /// Like [`Run::command`] for an agent command: shown, reported, and on failure an
    /// error that carries the end of its output.
    pub(super) async fn argv_command(
        &mut self,
        stage: Stage,
        name: &str,
        argv: &[String],
        release: &str,
    ) -> Result<(), StepError> {
        let shown = compose::display(argv);
        self.events.send(stage, format!("running `{shown}`"));
        match self.exec_argv(stage, name, argv, release, None).await {
            Ok(step) => {
                self.events.send(
                    stage,
                    format!("`{shown}` succeeded in {}ms", step.duration_ms),
                );
                self.steps.push(step);
                Ok(())
            }
            Err((step, e)) => {
                let err = StepError::Tool {
                    source: e,
                    output: step.output.clone(),
                };
                self.events.send(stage, err.to_string());
                self.steps.push(step);
                Err(err)
            }
        }
    }

    /// The compose project `release` runs with: its own recorded files, with the project
    /// name and command of this run. `None` for the release strategy.
    fn compose_spec(&self, release: &str) -> Option<proto::ComposeSpec> {
        let now = self.journal.spec.compose.clone()?;
        let mut spec = compose::recorded(&self.layout.release(release)).unwrap_or(now.clone());
        spec.project = ports::compose_project(&self.journal.app, &now.project);
        spec.command = now.command;
        spec.pull = now.pull;
        spec.zero_downtime = now.zero_downtime;
        spec.drain_ms = now.drain_ms;
        Some(spec)
    }

    /// The configured compose command, or the first of v2 and v1 that answers.
    async fn compose_bin(&mut self, release: &str) -> Result<Compose, StepError> {
        if let Some(c) = &self.compose {
            return Ok(c.clone());
        }
        let configured = self
            .journal
            .spec
            .compose
            .as_ref()
            .and_then(|c| c.command.clone());
        let this = &*self;
        let found = compose::detect(configured.as_deref(), |argv| async move {
            this.exec_argv(
                Stage::Validate,
                "compose-version",
                &argv,
                release,
                Some(PROBE_TIMEOUT),
            )
            .await
        })
        .await;
        match found {
            Ok(c) => {
                self.events
                    .send(Stage::Validate, format!("using `{}`", c.name()));
                self.compose = Some(c.clone());
                Ok(c)
            }
            Err((why, last)) => {
                if let Some(step) = last {
                    self.steps.push(step);
                }
                Err(StepError::Refused(why))
            }
        }
    }

    /// Everything that can fail before a compose release changes anything: the files,
    /// Docker, compose itself, `config -q`, and `pull` when asked.
    async fn compose_prepare(&mut self) -> Result<(), StepError> {
        let release = self.journal.release.clone();
        let Some(mut spec) = self.journal.spec.compose.clone() else {
            return Ok(());
        };
        spec.project = ports::compose_project(&self.journal.app, &spec.project);
        let t = Instant::now();
        let dir = self.layout.release(&release);
        let app = &self.journal.app;
        let files = compose::check_spec(&spec).and_then(|()| {
            for f in spec.files.iter().chain(spec.env_file.iter()) {
                let meta = std::fs::symlink_metadata(dir.join(f));
                if !meta.is_ok_and(|m| m.is_file()) {
                    return Err(format!("{f} is not a file in the release"));
                }
            }
            if let Some(f) = &spec.env_file {
                ports::append_env_file(&dir.join(f), app)
                    .map_err(|e| format!("cannot add DEPLOY_PORT to {f}: {e}"))?;
            }
            compose::record(&dir, &spec)
                .map_err(|e| format!("cannot record the compose files: {e}"))
        });
        if let Err(e) = files {
            self.step(Stage::Validate, t, Err(e.clone()));
            return Err(StepError::Refused(e));
        }

        self.events
            .send(Stage::Validate, "checking that Docker answers");
        if let Err((step, e)) = self
            .exec_argv(
                Stage::Validate,
                "docker-info",
                &compose::docker_info(),
                &release,
                Some(PROBE_TIMEOUT),
            )
            .await
        {
            let err = match e {
                exec::ExecError::Spawn { .. } => StepError::Command(e).context(
                    "Docker is not installed on this host (no `docker` command on the \
                     agent's PATH)",
                ),
                _ => StepError::Tool {
                    source: e,
                    output: step.output.clone(),
                }
                .context("Docker is not running or not reachable on this host"),
            };
            self.steps.push(step);
            return Err(err);
        }
        let bin = self.compose_bin(&release).await?;
        let p = Project::of(&spec);
        self.argv_command(Stage::Validate, "compose-config", &bin.config(p), &release)
            .await
            .map_err(|e| e.context("the compose files do not validate"))?;
        if spec.pull {
            self.argv_command(Stage::Pull, "compose-pull", &bin.pull(p), &release)
                .await
                .map_err(|e| e.context("pull failed, nothing was recreated"))?;
        } else {
            self.events.send(Stage::Pull, "skipped (pull = false)");
        }
        Ok(())
    }

    /// Restarts `release`: compose `up` with its files, or the `restart` command.
    async fn restart(&mut self, release: &str) -> Result<(), StepError> {
        if let Some(spec) = self.compose_spec(release) {
            let bin = self.compose_bin(release).await?;
            if !spec.zero_downtime.is_empty() {
                return self.compose_rollout(release, &spec, &bin).await;
            }
            let argv = bin.up(Project::of(&spec));
            return self
                .argv_command(Stage::Restart, "compose-up", &argv, release)
                .await;
        }
        match self.journal.spec.restart.clone() {
            Some(cmd) => self.command(Stage::Restart, &cmd, release).await,
            None => Ok(()),
        }
    }

    /// After a compose release failed: `ps`, and the last log lines of the services
    /// that are not running or not healthy (of every service when none stands out, as
    /// when only the health URL failed). Reported as failed steps so they are shown.
    async fn diagnose(&mut self, release: &str, stage: Stage) {
        let Some(spec) = self.compose_spec(release) else {
            return;
        };
        let Ok(bin) = self.compose_bin(release).await else {
            return;
        };
        let p = Project::of(&spec);
        let troubled = self.troubled_services(&spec.project, release).await;
        let why = if troubled.is_empty() {
            "the release failed; state of its services".to_owned()
        } else {
            format!("not running or not healthy: {}", troubled.join(", "))
        };
        let ps = match self
            .exec_argv(
                stage,
                "compose-ps",
                &bin.ps(p),
                release,
                Some(PROBE_TIMEOUT),
            )
            .await
        {
            Ok(s) | Err((s, _)) => s,
        };
        self.steps.push(StepReport {
            success: false,
            error: Some(why),
            ..ps
        });
        let logs = match self
            .exec_argv(
                stage,
                "compose-logs",
                &bin.logs(p, &troubled),
                release,
                Some(PROBE_TIMEOUT),
            )
            .await
        {
            Ok(s) | Err((s, _)) => s,
        };
        let whose = if troubled.is_empty() {
            "every service".to_owned()
        } else {
            troubled.join(", ")
        };
        let log = self.layout.logs().join(format!(
            "{}.compose-logs.{release}.log",
            self.journal.release
        ));
        self.steps.push(StepReport {
            success: false,
            error: Some(format!("last {} log lines of {whose}", compose::LOG_LINES)),
            output: compose::logs_output(exec::tail(&log, LOGS_TAIL_BYTES)),
            ..logs
        });
        self.events.send(
            stage,
            format!(
                "collected `ps` and the last {} log lines of {whose}",
                compose::LOG_LINES
            ),
        );
    }

    /// Services of `project` with a container that is not running or not healthy.
    async fn troubled_services(&self, project: &str, release: &str) -> Vec<String> {
        let ids = match self
            .exec_argv(
                Stage::Health,
                "docker-ps",
                &compose::project_containers(project),
                release,
                Some(PROBE_TIMEOUT),
            )
            .await
        {
            Ok(s) => s.output,
            Err(_) => return Vec::new(),
        };
        // The log holds stderr too: keep only what looks like a container id.
        let ids: Vec<String> = ids
            .split_whitespace()
            .filter(|w| w.len() >= 12 && w.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned)
            .collect();
        if ids.is_empty() {
            return Vec::new();
        }
        match self
            .exec_argv(
                Stage::Health,
                "docker-inspect",
                &compose::inspect(&ids),
                release,
                Some(PROBE_TIMEOUT),
            )
            .await
        {
            Ok(s) => compose::troubled_services(&s.output),
            Err(_) => Vec::new(),
        }
    }

    pub(super) fn step(&mut self, stage: Stage, started: Instant, result: Result<String, String>) {
        let (success, error, output) = match result {
            Ok(msg) => (true, None, msg),
            Err(e) => (false, Some(e), String::new()),
        };
        self.steps.push(StepReport {
            stage,
            command: None,
            success,
            exit_code: None,
            output,
            duration_ms: started.elapsed().as_millis() as u64,
            error,
        });
    }

    pub(super) async fn check_health(&mut self) -> Result<(), StepError> {
        let port = self.journal.slots.map(|s| s.new);
        self.check_health_on(port).await
    }

    /// The health check; with `[cutover]`, `${DEPLOY_PORT}` in its URL is `port`.
    async fn check_health_on(&mut self, port: Option<u16>) -> Result<(), StepError> {
        let Some(mut spec) = self.journal.spec.health.clone() else {
            return Ok(());
        };
        spec.url = ports::expand(&self.journal.app, &spec.url);
        if let Some(port) = port {
            spec.url = spec.url.replace("${DEPLOY_PORT}", &port.to_string());
        }
        let t = Instant::now();
        self.events.send(
            Stage::Health,
            format!(
                "checking {} (up to {} tries, {}ms apart)",
                spec.url, spec.retries, spec.interval_ms
            ),
        );
        let events = self.events.clone();
        let retries = spec.retries;
        let report = health::wait_healthy(&spec, |n, p| {
            let what = match p {
                health::Probe::Status { code, .. } => format!("status {code}"),
                health::Probe::Error(e) => e.clone(),
            };
            events.send(Stage::Health, format!("attempt {n}/{retries}: {what}"));
        })
        .await;
        let result = if report.healthy {
            Ok(format!("healthy after {} attempt(s)", report.attempts))
        } else {
            Err(health::describe(&report))
        };
        self.health = Some(report);
        self.step(Stage::Health, t, result.clone());
        result.map(|_| ()).map_err(StepError::Health)
    }

    /// Links `<deploy_to>/shared/<path>` into the release.
    pub fn link_shared(&mut self) -> Result<(), StepError> {
        let t = Instant::now();
        let release = self.journal.release.clone();
        let shared = self.journal.spec.shared.clone();
        let result = link_shared(&self.layout, &release, &shared);
        if !shared.is_empty() {
            self.step(
                Stage::LinkShared,
                t,
                result
                    .as_ref()
                    .map(|_| format!("linked {}", shared.join(", ")))
                    .map_err(ToString::to_string),
            );
        }
        result
    }

    /// Runs the deploy from where its journal's phase starts: a push from `Prepared`, a
    /// rollback from `Switching`.
    pub async fn start(self) -> DeployReport {
        let step = Step::start(self.journal.phase);
        self.drive(step).await
    }

    /// The one driver loop: writes the step's phase to the journal, acts, and goes where
    /// [`machine::next`] says, until the deploy is live, failed or rolled back.
    pub async fn drive(mut self, mut step: Step) -> DeployReport {
        let cutover = self.journal.slots.is_some();
        loop {
            if !step.applies(cutover) {
                match machine::next(step, true) {
                    Next::Do(s) => {
                        step = s;
                        continue;
                    }
                    _ => return self.finish(Outcome::Live, None),
                }
            }
            let result = match step.phase() {
                Some(phase) => self.persist(phase),
                None => Ok(()),
            };
            let result = match result {
                Ok(()) => self.act(step).await,
                Err(e) => Err(e),
            };
            let error = result.err().map(|e| e.to_string());
            match machine::next(step, error.is_none()) {
                Next::Do(s) => step = s,
                Next::Live => return self.finish(Outcome::Live, None),
                Next::Fail => return self.fail_before_switch(error.unwrap_or_default()).await,
                Next::RollBack => return self.roll_back(error.unwrap_or_default()).await,
            }
        }
    }

    /// One step's effects. A failed restart or check collects what the services say.
    async fn act(&mut self, step: Step) -> Result<(), StepError> {
        let release = self.journal.release.clone();
        match step {
            Step::Prepare => self.prepare().await,
            Step::Migrate => self.migrate(&release).await,
            Step::BeforeSwitch => self
                .hook(Hook::BeforeSwitch, &release, None)
                .await
                .map_err(|e| e.context("before_switch hook failed")),
            Step::Switch => self.switch(&release),
            Step::Restart => {
                let result = self.restart(&release).await;
                if result.is_err() {
                    self.diagnose(&release, Stage::Restart).await;
                }
                result.map_err(|e| e.context("restart failed"))
            }
            Step::Check => {
                let result = self.check_health().await;
                if result.is_err() {
                    self.diagnose(&release, Stage::Health).await;
                }
                result
            }
            Step::Confirm => self.confirm(),
            Step::StartSlot => {
                let result = self.start_slot(&release).await;
                result.map_err(|e| e.context("the new slot did not start"))
            }
            Step::Route => self
                .route(&release)
                .await
                .map_err(|e| e.context("switching the proxy failed")),
            Step::Drain => self.drain().await,
            Step::Watch => self.arm_watch(),
            Step::AfterLive => self
                .hook(Hook::AfterLive, &release, Some(Outcome::Live))
                .await
                .map_err(|e| e.context("after_live hook failed")),
        }
    }

    /// A deploy with `health.watch`: writes the watch's state before the deploy reports
    /// `live` (the task that checks is started by whoever ran the deploy, see
    /// [`super::watch::spawn`]). A watch that cannot be saved cannot protect the release:
    /// it fails like a confirm that cannot write.
    fn arm_watch(&mut self) -> Result<(), StepError> {
        if !super::watch::wanted(&self.journal) {
            return Ok(());
        }
        let t = Instant::now();
        let release = self.journal.release.clone();
        let h = self
            .journal
            .spec
            .health
            .clone()
            .unwrap_or_else(|| unreachable!());
        if let Err(e) = super::watch::arm(&self.layout, &self.journal) {
            let msg = format!(
                "could not save the watch of release {release}: {}",
                crate::release::layout::describe_io(&self.layout.root, &e)
            );
            self.step(Stage::Health, t, Err(msg.clone()));
            return Err(StepError::Io(msg));
        }
        let msg = format!(
            "release {release} is under watch for {}: {} failed checks in a row roll it back",
            super::watch::human_ms(h.watch_ms),
            h.watch_failures.max(1)
        );
        self.events.send(Stage::Health, msg.clone());
        self.step(Stage::Health, t, Ok(msg));
        Ok(())
    }

    /// Runs the `hooks` command `which` (if configured) in `release`'s dir with the deploy
    /// variables, plus `DEPLOY_OUTCOME` when `outcome` is given. Reported as a `hook`
    /// step; its log is `.deploy/logs/<deploy>.hook-<name>.log`, masked.
    async fn hook(
        &mut self,
        which: Hook,
        release: &str,
        outcome: Option<Outcome>,
    ) -> Result<(), StepError> {
        let Some(command) = self
            .journal
            .spec
            .hooks
            .as_ref()
            .and_then(|h| which.command(h))
        else {
            return Ok(());
        };
        let name = which.name();
        self.events
            .send(Stage::Hook, format!("{name}: running `{command}`"));
        let mut env = self.env(release);
        if let Some(o) = outcome {
            env.insert("DEPLOY_OUTCOME".into(), notify::outcome_name(o));
        }
        let dir = self.layout.release(release);
        let log = self
            .layout
            .logs()
            .join(format!("{}.hook-{name}.log", self.journal.release));
        let _ = std::fs::remove_file(&log);
        let timeout = Duration::from_millis(self.journal.spec.command_timeout_ms.max(1));
        let result = exec::run(exec::Command {
            stage: Stage::Hook,
            command: &command,
            argv: None,
            dir: &dir,
            env: &env,
            timeout,
            log: log.clone(),
        })
        .await;
        exec::mask_log(&log, |t| self.events.redact(t));
        match result {
            Ok(step) => {
                self.events.send(
                    Stage::Hook,
                    format!("{name}: `{command}` succeeded in {}ms", step.duration_ms),
                );
                self.steps.push(step);
                Ok(())
            }
            Err((step, e)) => {
                self.events.send(Stage::Hook, format!("{name}: {e}"));
                self.steps.push(step);
                Err(StepError::Command(e))
            }
        }
    }

    /// The `on_failure` hook, at an end that is not live ([`machine::runs_on_failure`]).
    /// What it does is reported; the outcome stays.
    async fn on_failure(&mut self, outcome: Outcome) {
        if !machine::runs_on_failure(outcome) {
            return;
        }
        let release = self.journal.release.clone();
        // A failed hook is in the steps and the events; nothing else changes.
        let _ = self.hook(Hook::OnFailure, &release, Some(outcome)).await;
    }

    /// `[cutover]`: `stop` on the new slot (whatever is left there), then `start` the
    /// release on it.
    async fn start_slot(&mut self, release: &str) -> Result<(), StepError> {
        let (Some(c), Some(s)) = (self.journal.spec.cutover.clone(), self.journal.slots) else {
            return Ok(());
        };
        self.events.send(
            Stage::Restart,
            format!("starting release {release} on the idle slot {}", s.new),
        );
        self.slot_command(Stage::Restart, &c.stop, release, s.new, s.old)
            .await
            .map_err(|e| e.context(format!("stopping the idle slot {}", s.new)))?;
        self.slot_command(Stage::Restart, &c.start, release, s.new, s.old)
            .await
    }

    /// `[cutover]`: points the proxy at the new slot and saves it as the serving one.
    async fn route(&mut self, release: &str) -> Result<(), StepError> {
        let (Some(c), Some(s)) = (self.journal.spec.cutover.clone(), self.journal.slots) else {
            return Ok(());
        };
        self.proxy_maybe_moved = true;
        self.slot_command(Stage::Switch, &c.switch, release, s.new, s.old)
            .await?;
        let t = Instant::now();
        let serving = Serving {
            port: s.new,
            release: release.to_owned(),
        };
        if let Err(e) = serving.save(&self.layout) {
            let msg = format!(
                "could not save the serving slot in {}: {e}",
                Serving::path(&self.layout).display()
            );
            self.step(Stage::Switch, t, Err(msg.clone()));
            return Err(StepError::Io(msg));
        }
        self.events
            .send(Stage::Switch, format!("the proxy is on slot {}", s.new));
        Ok(())
    }

    /// `[cutover]`: waits `drain`, then stops the old slot. A failed stop is reported;
    /// the deploy goes on (the table says so).
    async fn drain(&mut self) -> Result<(), StepError> {
        let (Some(c), Some(s)) = (self.journal.spec.cutover.clone(), self.journal.slots) else {
            return Ok(());
        };
        // Waited on the first cutover deploy too: the deploy ends once the proxy's
        // reload has had `drain` to take effect.
        let Some(old) = s.old else {
            self.events.send(
                Stage::Switch,
                format!(
                    "waiting {}ms for the proxy (no old slot to stop)",
                    c.drain_ms
                ),
            );
            tokio::time::sleep(Duration::from_millis(c.drain_ms)).await;
            return Ok(());
        };
        self.events.send(
            Stage::Switch,
            format!("slot {old} drains for {}ms, then stops", c.drain_ms),
        );
        tokio::time::sleep(Duration::from_millis(c.drain_ms)).await;
        let prev = self.journal.previous.clone();
        let release = prev.unwrap_or_else(|| self.journal.release.clone());
        let result = self
            .slot_command(Stage::Switch, &c.stop, &release, old, Some(s.new))
            .await;
        if let Err(e) = &result {
            self.events.send(
                Stage::Switch,
                format!(
                    "the old slot {old} did not stop ({e}); the proxy is on slot {} and \
                     the next deploy stops {old} before starting on it",
                    s.new
                ),
            );
        }
        result
    }

    /// A review-app instance gets (or keeps) its port before any command runs; then the
    /// shared links and, for compose, everything that can fail before anything changes.
    async fn prepare(&mut self) -> Result<(), StepError> {
        ports::register(&self.journal.app, &self.journal.spec).map_err(StepError::Refused)?;
        self.link_shared()?;
        self.compose_prepare().await
    }

    async fn migrate(&mut self, release: &str) -> Result<(), StepError> {
        match self.journal.spec.migrate.clone() {
            Some(cmd) if !self.journal.skip_migrations => self
                .command(Stage::Migrate, &cmd, release)
                .await
                .map_err(|e| e.context("migration failed")),
            Some(_) => {
                self.events
                    .send(Stage::Migrate, "skipped (--skip-migrations)");
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn switch(&mut self, release: &str) -> Result<(), StepError> {
        let t = Instant::now();
        self.events
            .send(Stage::Switch, format!("current -> releases/{release}"));
        if let Err(e) = switch::switch(&self.layout, release) {
            let msg = format!("could not switch current: {e}");
            self.step(Stage::Switch, t, Err(msg.clone()));
            return Err(StepError::Io(msg));
        }
        self.step(
            Stage::Switch,
            t,
            Ok(format!("current -> releases/{release}")),
        );
        Ok(())
    }

    /// Marks the release live, prunes, and records the URL it passed.
    fn confirm(&mut self) -> Result<(), StepError> {
        let release = self.journal.release.clone();
        // `current` may only rest on a release whose metadata says so: if the disk is
        // full (or anything else stops the write), the deploy fails and goes back.
        let t = Instant::now();
        if let Err(e) = self.layout.set_status(&release, ReleaseStatus::Live) {
            let msg = format!(
                "could not record release {release} as live in {}: {}",
                self.layout.release_meta(&release).display(),
                crate::release::layout::describe_io(&self.layout.root, &e)
            );
            self.step(Stage::Health, t, Err(msg.clone()));
            return Err(StepError::Io(msg));
        }
        if self.journal.action == Action::Deploy {
            let t = Instant::now();
            let keep = self.journal.spec.keep_releases.max(1) as usize;
            let mut protect = vec![release.as_str()];
            if let Some(p) = self.journal.previous.as_deref() {
                protect.push(p);
            }
            let protect: Vec<String> = protect.into_iter().map(str::to_owned).collect();
            let protect_refs: Vec<&str> = protect.iter().map(String::as_str).collect();
            match prune::prune(&self.layout, keep, &protect_refs) {
                Ok(removed) if !removed.is_empty() => {
                    self.events
                        .send(Stage::Prune, format!("removed {}", removed.join(", ")));
                    self.step(
                        Stage::Prune,
                        t,
                        Ok(format!("removed {}", removed.join(", "))),
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    // A failed prune does not undo a healthy deploy.
                    self.step(Stage::Prune, t, Err(format!("prune failed: {e}")));
                }
            }
        }
        self.record_check(&release);
        self.events
            .send(Stage::Health, format!("release {release} is live"));
        Ok(())
    }

    /// Ends a run that never switched `current` (used by recovery).
    pub async fn abandon(self, error: Option<String>) -> DeployReport {
        let error = error
            .or_else(|| self.journal.error.clone())
            .unwrap_or_else(|| "abandoned".into());
        self.fail_before_switch(error).await
    }

    /// The deploy stopped before `current` moved.
    async fn fail_before_switch(mut self, error: String) -> DeployReport {
        let release = self.journal.release.clone();
        // A rollback target is not a bad build because we could not switch to it.
        let mut error = error;
        if self.journal.action != Action::Rollback
            && let Err(e) = self.layout.set_status(&release, ReleaseStatus::Failed)
        {
            error = format!(
                "{error}; release {release} could not be marked failed: {}",
                crate::release::layout::describe_io(&self.layout.root, &e)
            );
        }
        self.events
            .send(Stage::Switch, format!("{error}; current is unchanged"));
        self.on_failure(Outcome::Failed).await;
        self.finish(Outcome::Failed, Some(error))
    }

    /// `current` points at the new release, which failed: go back to `previous`.
    pub async fn roll_back(mut self, error: String) -> DeployReport {
        self.journal.error = Some(error.clone());
        let _ = self.persist(Phase::RollingBack);
        let release = self.journal.release.clone();
        let t = Instant::now();
        // Set when the previous release failed the health check too: what that says
        // about the check itself (see `judge_the_check`).
        let mut check_note: Option<String> = None;
        let outcome = if let Some(slots) = self.journal.slots {
            self.slots_back(&error, slots).await
        } else {
            match self.journal.previous.clone() {
                Some(prev) => {
                    self.events.send(
                        Stage::Rollback,
                        format!("{error}; switching back to {prev}"),
                    );
                    match switch::switch(&self.layout, &prev) {
                        Err(e) => {
                            let msg = format!("could not switch back to {prev}: {e}");
                            self.step(Stage::Rollback, t, Err(msg));
                            Outcome::RollbackFailed
                        }
                        Ok(()) => {
                            self.step(
                                Stage::Rollback,
                                t,
                                Ok(format!("current -> releases/{prev}")),
                            );
                            let restart_ok = self.restart(&prev).await.is_ok();
                            if restart_ok && self.check_health().await.is_ok() {
                                Outcome::RolledBack
                            } else if restart_ok
                                && let Some((outcome, why)) = self.judge_the_check(&prev).await
                            {
                                check_note = Some(why);
                                if outcome == Outcome::RollbackFailed {
                                    self.diagnose(&prev, Stage::Health).await;
                                }
                                outcome
                            } else {
                                let stage = if restart_ok {
                                    Stage::Health
                                } else {
                                    Stage::Restart
                                };
                                self.diagnose(&prev, stage).await;
                                Outcome::RollbackFailed
                            }
                        }
                    }
                }
                None => {
                    // First deploy: going back means no `current` at all, as before.
                    self.events.send(
                        Stage::Rollback,
                        format!("{error}; no previous release, removing current"),
                    );
                    match std::fs::remove_file(self.layout.current()) {
                        Ok(()) => {
                            self.step(Stage::Rollback, t, Ok("removed current".into()));
                            // A compose project that did not run before does not run after.
                            match self.compose_down(&release).await {
                                Ok(()) => Outcome::RolledBack,
                                Err(_) => Outcome::RollbackFailed,
                            }
                        }
                        Err(e) => {
                            self.step(Stage::Rollback, t, Err(format!("remove current: {e}")));
                            Outcome::RollbackFailed
                        }
                    }
                }
            }
        };
        // Marked so that `rollback` without --to skips it.
        let mut error = error;
        if let Err(e) = self.layout.set_status(&release, ReleaseStatus::RolledBack) {
            error = format!(
                "{error}; release {release} could not be marked rolled back: {}",
                crate::release::layout::describe_io(&self.layout.root, &e)
            );
        }
        if let Some(note) = &check_note {
            error = format!("{error}; {note}");
        }
        match outcome {
            Outcome::RollbackFailed if check_note.is_some() => self.events.send(
                Stage::Rollback,
                format!(
                    "ROLLBACK FAILED: the previous release is not healthy either; {}",
                    check_note.as_deref().unwrap_or_default()
                ),
            ),
            Outcome::RollbackFailed => self.events.send(
                Stage::Rollback,
                "ROLLBACK FAILED: the previous release is not healthy either; a human must look",
            ),
            _ if check_note.is_some() => self.events.send(
                Stage::Rollback,
                format!(
                    "rolled back: the previous release serves again; {}",
                    check_note.as_deref().unwrap_or_default()
                ),
            ),
            _ if self.journal.previous.is_none() => self.events.send(
                Stage::Rollback,
                "rolled back: there was no previous release, so `current` was removed",
            ),
            _ => self.events.send(
                Stage::Rollback,
                "rolled back: the previous release serves again",
            ),
        }
        self.on_failure(outcome).await;
        self.finish(outcome, Some(error))
    }

    /// `[cutover]`: back to the previous release after the new one failed. `current`
    /// goes back; if the proxy was switched to the new slot, the previous release is
    /// started again on its slot, checked, and the proxy switched back to it; if the
    /// switch was under way ([`Run::proxy_maybe_moved`]: it ran or failed, or the agent
    /// died in it or while rolling back), the proxy is
    /// pointed at the old slot again; then the new slot is stopped. The old slot was
    /// never stopped before the switch, so until then nothing was refused.
    async fn slots_back(&mut self, error: &str, s: Slots) -> Outcome {
        let Some(c) = self.journal.spec.cutover.clone() else {
            return Outcome::RollbackFailed;
        };
        let release = self.journal.release.clone();
        let prev = self.journal.previous.clone();
        let t = Instant::now();
        let mut ok = true;
        match &prev {
            Some(p) => {
                self.events
                    .send(Stage::Rollback, format!("{error}; switching back to {p}"));
                match switch::switch(&self.layout, p) {
                    Ok(()) => self.step(Stage::Rollback, t, Ok(format!("current -> releases/{p}"))),
                    Err(e) => {
                        self.step(
                            Stage::Rollback,
                            t,
                            Err(format!("could not switch back to {p}: {e}")),
                        );
                        ok = false;
                    }
                }
            }
            None => {
                self.events.send(
                    Stage::Rollback,
                    format!("{error}; no previous release, removing current"),
                );
                match std::fs::remove_file(self.layout.current()) {
                    Ok(()) => self.step(Stage::Rollback, t, Ok("removed current".into())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        self.step(Stage::Rollback, t, Err(format!("remove current: {e}")));
                        ok = false;
                    }
                }
            }
        }
        let routed =
            Serving::load(&self.layout).is_some_and(|x| x.port == s.new && x.release == release);
        match (s.old, &prev) {
            (Some(old), Some(p)) if routed => {
                // The proxy is on the failed release: the previous one comes back on its
                // slot first (it may have been stopped after the drain).
                let back = async {
                    self.slot_command(Stage::Rollback, &c.stop, p, old, Some(s.new))
                        .await?;
                    self.slot_command(Stage::Rollback, &c.start, p, old, Some(s.new))
                        .await?;
                    self.check_health_on(Some(old)).await?;
                    self.slot_command(Stage::Rollback, &c.switch, p, old, Some(s.new))
                        .await
                };
                match back.await {
                    Ok(()) => {
                        let _ = Serving {
                            port: old,
                            release: p.clone(),
                        }
                        .save(&self.layout);
                    }
                    Err(e) => {
                        self.events.send(
                            Stage::Rollback,
                            format!("the old slot {old} did not come back: {e}"),
                        );
                        // The new slot keeps serving rather than nothing.
                        return Outcome::RollbackFailed;
                    }
                }
            }
            (Some(old), Some(p)) if self.proxy_maybe_moved => {
                // The switch may have half happened: point the proxy at the old slot.
                match self
                    .slot_command(Stage::Rollback, &c.switch, p, old, Some(s.new))
                    .await
                {
                    Ok(()) => {
                        let _ = Serving {
                            port: old,
                            release: p.clone(),
                        }
                        .save(&self.layout);
                    }
                    Err(_) => ok = false,
                }
            }
            _ => {}
        }
        // The new slot goes.
        if self
            .slot_command(Stage::Rollback, &c.stop, &release, s.new, s.old)
            .await
            .is_err()
        {
            ok = false;
        }
        if routed && s.old.is_none() {
            // The first cutover deploy: nothing serves any more, as `current` is gone.
            let _ = std::fs::remove_file(Serving::path(&self.layout));
        }
        if ok {
            Outcome::RolledBack
        } else {
            Outcome::RollbackFailed
        }
    }

    /// The previous release `prev` was switched back to and failed this deploy's health
    /// check: is the app broken, or the check? What `prev` passed when it went live
    /// (recorded by [`Self::record_check`]) tells:
    /// - it passed a *different* URL, and passes that one now: the app serves and the
    ///   new `health.url` is most likely wrong: rolled back (not a rollback failure);
    /// - it passed a different URL and fails both, or passed this very URL and fails it
    ///   now, or was never checked: the agent cannot tell; a rollback failure, with
    ///   the URL, its answer and what is likely wrong.
    ///
    /// `None` when there was no check to judge.
    async fn judge_the_check(&mut self, prev: &str) -> Option<(Outcome, String)> {
        let failed = self.health.clone().filter(|h| !h.healthy)?;
        let url = failed.url.clone();
        let answer = health::answer(&failed);
        let before = read_check(&self.layout, prev);
        Some(match before {
            Some(old) if old != self.events.redact(&url) => {
                let mut spec = self.journal.spec.health.clone()?;
                spec.url = old.clone();
                // A few tries: it answered before the switch, it is running now.
                spec.retries = spec.retries.clamp(1, 3);
                let t = Instant::now();
                self.events.send(
                    Stage::Health,
                    format!("checking {old}, the URL release {prev} passed when it went live"),
                );
                let report = health::wait_healthy(&spec, |_, _| {}).await;
                if report.healthy {
                    self.step(Stage::Health, t, Ok(format!("{old} is healthy")));
                    (
                        Outcome::RolledBack,
                        format!(
                            "the health check itself looks wrong: release {prev} fails \
                             {url} too (answer: {answer}), but passes {old}, the URL it \
                             passed when it went live; check health.url (path and port) \
                             in deploy.toml"
                        ),
                    )
                } else {
                    let was = health::answer(&report);
                    self.step(Stage::Health, t, Err(health::describe(&report)));
                    (
                        Outcome::RollbackFailed,
                        format!(
                            "release {prev} fails {url} (answer: {answer}) and also {old}, \
                             the URL it passed when it went live (answer: {was}); the app \
                             itself looks down; a human must look"
                        ),
                    )
                }
            }
            Some(_) => (
                Outcome::RollbackFailed,
                format!(
                    "release {prev} passed this very check when it went live and fails it \
                     now: {url} answered {answer}; either something the app needs changed, \
                     or health.url is wrong for this host; a human must look"
                ),
            ),
            None => (
                Outcome::RollbackFailed,
                format!(
                    "release {prev} was never checked against {url} (it went live without \
                     a health check, or before the agent recorded one), so the health check \
                     itself may be wrong (a typo in the path or port?): {url} answered \
                     {answer}; a human must look"
                ),
            ),
        })
    }

    /// Records the health URL a release passed when it went live, for
    /// [`Self::judge_the_check`]. Best effort: without it a later failure is only less
    /// well explained.
    fn record_check(&self, release: &str) {
        if let Some(h) = self.health.as_ref().filter(|h| h.healthy) {
            let path = check_file(&self.layout, release);
            // A secret in the URL (a token in the query) stays off the disk.
            let body = serde_json::json!({ "url": self.events.redact(&h.url) }).to_string();
            if let Err(e) = crate::release::layout::write_atomic(&path, body.as_bytes()) {
                tracing::warn!("{}: {e}", path.display());
            }
        }
    }

    /// For a compose release: stops and removes its containers (volumes are kept).
    async fn compose_down(&mut self, release: &str) -> Result<(), StepError> {
        let Some(spec) = self.compose_spec(release) else {
            return Ok(());
        };
        let bin = self.compose_bin(release).await?;
        let argv = bin.down(Project::of(&spec));
        self.argv_command(Stage::Rollback, "compose-down", &argv, release)
            .await
    }

    fn finish(mut self, outcome: Outcome, error: Option<String>) -> DeployReport {
        // Nothing the controller marked secret leaves this run: not in the report, not in
        // the history on disk.
        let error = error.map(|e| self.events.redact(&e));
        for step in &mut self.steps {
            step.command = step.command.as_deref().map(|c| self.events.redact(c));
            step.output = self.events.redact(&step.output);
            step.error = step.error.as_deref().map(|e| self.events.redact(e));
        }
        let j = &self.journal;
        let current = self.layout.current_release();
        ports::touch(&j.app);
        let entry = HistoryEntry {
            action: j.action,
            release: j.release.clone(),
            version: j.version.clone(),
            previous: j.previous.clone(),
            outcome,
            holder: j.holder.clone(),
            started: j.started.clone(),
            finished: history::now_rfc3339(),
            error: error.clone(),
            origin: j.origin.clone(),
            instance: j.app.instance.clone(),
        };
        let recorded = history::append_history(&self.layout, &entry);
        // In the background: the outcome is reported without waiting for any webhook.
        notify::send(
            &self.layout,
            &j.app.name,
            j.spec.notify.as_ref(),
            &entry,
            &|t| self.events.redact(t),
        );
        // The outcome stands (the switch already happened or did not), but the report
        // says that the history misses it.
        let error = match recorded {
            Ok(()) => error,
            Err(e) => {
                let why = format!(
                    "the history line for this deploy could not be written: {}",
                    crate::release::layout::describe_io(&self.layout.root, &e)
                );
                tracing::error!("{}: {why}", self.layout.root.display());
                Some(match error {
                    Some(err) => format!("{err}; {why}"),
                    None => why,
                })
            }
        };
        let _ = Journal::clear(&self.layout);
        DeployReport {
            release: j.release.clone(),
            version: j.version.clone(),
            outcome,
            previous: j.previous.clone(),
            current,
            steps: self.steps,
            health: self.health,
            error,
            duration_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

/// The `[release] hooks` commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    BeforeSwitch,
    AfterLive,
    OnFailure,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::BeforeSwitch => "before_switch",
            Hook::AfterLive => "after_live",
            Hook::OnFailure => "on_failure",
        }
    }

    fn command(self, hooks: &proto::HooksSpec) -> Option<String> {
        match self {
            Hook::BeforeSwitch => hooks.before_switch.clone(),
            Hook::AfterLive => hooks.after_live.clone(),
            Hook::OnFailure => hooks.on_failure.clone(),
        }
    }
}

/// `releases/<id>/.deploy/health.json`: the health URL the release passed when it
/// went live.
fn check_file(layout: &Layout, release: &str) -> std::path::PathBuf {
    layout.release(release).join(".deploy").join("health.json")
}

fn read_check(layout: &Layout, release: &str) -> Option<String> {
    let text = std::fs::read_to_string(check_file(layout, release)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["url"].as_str().map(str::to_owned)
}

/// The compose logs of a failure report: 50 lines of a few services.
const LOGS_TAIL_BYTES: u64 = 16 * 1024;

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Migrate => "migrate",
        Stage::Restart => "restart",
        Stage::Rollback => "rollback",
        _ => "step",
    }
}

/// Links each `shared` path into the release. A path the release ships itself is
/// replaced by the link. A shared path that does not exist yet is created: a file when
/// its name has a dot (`.env`, `config/database.yml`), a directory otherwise (`log`).
pub fn link_shared(layout: &Layout, release: &str, paths: &[String]) -> Result<(), StepError> {
    let dir = layout.release(release);
    for p in paths {
        let rel = Path::new(p);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(StepError::Refused(format!(
                "shared path {p:?} must be relative, without `..` or `.`"
            )));
        }
        let source = layout.shared().join(rel);
        if std::fs::symlink_metadata(&source).is_err() {
            if let Some(parent) = source.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| StepError::Io(format!("create {}: {e}", parent.display())))?;
            }
            let is_file = rel
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains('.'));
            let made = if is_file {
                std::fs::OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .open(&source)
                    .map(|_| ())
            } else {
                std::fs::create_dir_all(&source)
            };
            made.map_err(|e| StepError::Io(format!("create {}: {e}", source.display())))?;
        }
        let dest = dir.join(rel);
        if let Some(parent) = dest.parent() {
            // The parent must be a real directory inside the release.
            if std::fs::symlink_metadata(parent)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false)
            {
                return Err(StepError::Refused(format!(
                    "shared path {p:?}: a parent in the release is a symlink"
                )));
            }
            std::fs::create_dir_all(parent)
                .map_err(|e| StepError::Io(format!("create {}: {e}", parent.display())))?;
        }
        match std::fs::symlink_metadata(&dest) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&dest),
            Ok(_) => std::fs::remove_file(&dest),
            Err(_) => Ok(()),
        }
        .map_err(|e| StepError::Io(format!("replace {}: {e}", dest.display())))?;
        std::os::unix::fs::symlink(&source, &dest).map_err(|e| {
            StepError::Io(format!(
                "link {} -> {}: {e}",
                dest.display(),
                source.display()
            ))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::Locks;
    use proto::{AppRef, ReleaseInfo, ReleaseSpec};

    /// A prepared release `id` in a fresh app dir, and its run, with these commands.
    async fn prepared_run(dir: &Path, id: &str, migrate: &str, restart: &str) -> (Layout, Run) {
        let layout = Layout::new(dir);
        layout.ensure().unwrap();
        std::fs::create_dir_all(layout.release(id)).unwrap();
        let info = ReleaseInfo {
            id: id.into(),
            version: None,
            sha256: None,
            created: history::now_rfc3339(),
            status: ReleaseStatus::Prepared,
            current: false,
            content: None,
        };
        Layout::write_meta_in(&layout.release(id), &info).unwrap();
        let journal = Journal {
            action: Action::Deploy,
            app: AppRef {
                name: "app".into(),
                deploy_to: dir.display().to_string(),
                instance: None,
            },
            release: id.into(),
            version: None,
            previous: None,
            holder: "t".into(),
            started: history::now_rfc3339(),
            skip_migrations: false,
            spec: ReleaseSpec {
                shared: vec![],
                migrate: Some(migrate.into()),
                restart: Some(restart.into()),
                stop: None,
                command_timeout_ms: 10_000,
                keep_releases: 3,
                health: None,
                max_unpacked_bytes: 1 << 20,
                compose: None,
                instance: None,
                redact: Vec::new(),
                hooks: None,
                notify: None,
                cutover: None,
            },
            phase: Phase::Prepared,
            error: None,
            origin: None,
            slots: None,
        };
        let info = proto::LockInfo {
            holder: "t".into(),
            version: None,
            since: "now".into(),
        };
        let lock = Arc::new(Locks::default())
            .acquire(dir, layout.lock_file(), info, Duration::ZERO)
            .await
            .unwrap();
        let run = Run::new(layout.clone(), journal, Events::none(), Arc::new(lock));
        (layout, run)
    }

    /// A command that succeeds only if the journal already says `phase`.
    fn in_phase(phase: &str) -> String {
        format!("grep -q '\"phase\": \"{phase}\"' \"$DEPLOY_TO/.deploy/journal.json\"")
    }

    #[tokio::test]
    async fn the_driver_writes_each_phase_before_its_step_acts() {
        let dir = tempfile::tempdir().unwrap();
        let id = "20260101000000";
        let (layout, run) = prepared_run(
            dir.path(),
            id,
            &in_phase("migrating"),
            &in_phase("restarting"),
        )
        .await;
        let report = run.start().await;
        assert_eq!(report.outcome, Outcome::Live, "{:?}", report.error);
        assert_eq!(layout.current_release().as_deref(), Some(id));
        assert!(
            !layout.journal().exists(),
            "the journal goes when the run ends"
        );
        assert_eq!(history::read_history(&layout, 0).len(), 1);
    }

    #[tokio::test]
    async fn a_failed_restart_rolls_back_with_a_typed_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, run) = prepared_run(dir.path(), "20260101000000", "true", "exit 3").await;
        let report = run.start().await;
        // No previous release: rolling back removes `current`.
        assert_eq!(report.outcome, Outcome::RolledBack);
        assert_eq!(
            report.error.as_deref(),
            Some("restart failed: `exit 3` exited with status 3")
        );
        assert!(layout.current_release().is_none());
    }

    /// `prepared_run` with these hooks; each appends its name and `DEPLOY_OUTCOME` to
    /// `<deploy_to>/hooks.log`, and `fail` names the one that exits 3.
    async fn run_with_hooks(dir: &Path, fail: &str) -> (Layout, Run) {
        let (layout, mut run) = prepared_run(dir, "20260101000000", "true", "true").await;
        let hook = |name: &str| {
            let exit = if name == fail { "exit 3" } else { "true" };
            Some(format!(
                "echo \"{name} $DEPLOY_OUTCOME\" >> \"$DEPLOY_TO/hooks.log\"; {exit}"
            ))
        };
        run.journal.spec.hooks = Some(proto::HooksSpec {
            before_switch: hook("before_switch"),
            after_live: hook("after_live"),
            on_failure: hook("on_failure"),
        });
        (layout, run)
    }

    fn hooks_log(layout: &Layout) -> String {
        std::fs::read_to_string(layout.root.join("hooks.log")).unwrap_or_default()
    }

    #[tokio::test]
    async fn a_failing_before_switch_ends_before_the_switch_and_on_failure_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, run) = run_with_hooks(dir.path(), "before_switch").await;
        let report = run.start().await;
        assert_eq!(report.outcome, Outcome::Failed);
        assert!(
            report
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with("before_switch hook failed: ")),
            "{:?}",
            report.error
        );
        assert!(layout.current_release().is_none(), "current untouched");
        assert_eq!(hooks_log(&layout), "before_switch \non_failure failed\n");
        let hook_steps = report
            .steps
            .iter()
            .filter(|s| s.stage == Stage::Hook)
            .count();
        assert_eq!(hook_steps, 2, "{:?}", report.steps);
    }

    #[tokio::test]
    async fn a_failing_after_live_leaves_the_release_live() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, run) = run_with_hooks(dir.path(), "after_live").await;
        let report = run.start().await;
        assert_eq!(report.outcome, Outcome::Live, "{:?}", report.error);
        assert_eq!(report.error, None);
        assert_eq!(layout.current_release().as_deref(), Some("20260101000000"));
        assert_eq!(hooks_log(&layout), "before_switch \nafter_live live\n");
        let last = report.steps.last().unwrap();
        assert_eq!((last.stage, last.success), (Stage::Hook, false));
    }

    /// A cutover spec whose commands log `name DEPLOY_PORT DEPLOY_PREVIOUS_PORT release`
    /// to `<deploy_to>/slots.log`; `start` runs `start_tail` after logging.
    fn cutover(start_tail: &str) -> proto::CutoverSpec {
        let log = |name: &str| {
            format!(
                "echo {name} $DEPLOY_PORT \"$DEPLOY_PREVIOUS_PORT\" $DEPLOY_RELEASE >> \"$DEPLOY_TO/slots.log\""
            )
        };
        proto::CutoverSpec {
            ports: [4001, 4002],
            start: format!("{} && {start_tail}", log("start")),
            stop: log("stop"),
            switch: log("switch"),
            drain_ms: 10,
        }
    }

    async fn cutover_run(dir: &Path, id: &str, previous: Option<&str>, start_tail: &str) -> Run {
        let (_, mut run) = prepared_run(dir, id, "true", "exit 99").await;
        run.journal.spec.restart = None;
        run.journal.spec.cutover = Some(cutover(start_tail));
        run.journal.previous = previous.map(str::to_owned);
        // What `Run::new` does with the spec the session gives it.
        let layout = run.layout.clone();
        run.journal.slots = Some(Slots::choose(
            [4001, 4002],
            Serving::load(&layout).map(|s| s.port),
        ));
        run
    }

    fn slots_log(dir: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(dir.join("slots.log")).unwrap_or_default();
        let lines = text.lines().map(str::to_owned).collect();
        let _ = std::fs::remove_file(dir.join("slots.log"));
        lines
    }

    #[tokio::test]
    async fn a_cutover_starts_beside_switches_drains_and_stops_the_old_slot() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ("20260101000000", "20260102000000");
        let report = cutover_run(dir.path(), a, None, "true").await.start().await;
        assert_eq!(report.outcome, Outcome::Live, "{:?}", report.error);
        // The first cutover deploy: the first port, no previous port, no old slot.
        assert_eq!(
            slots_log(dir.path()),
            [
                format!("stop 4001  {a}"),
                format!("start 4001  {a}"),
                format!("switch 4001  {a}")
            ]
        );
        let layout = Layout::new(dir.path());
        assert_eq!(Serving::load(&layout).map(|s| s.port), Some(4001));

        std::fs::create_dir_all(layout.release(b)).unwrap();
        let report = cutover_run(dir.path(), b, Some(a), "true")
            .await
            .start()
            .await;
        assert_eq!(report.outcome, Outcome::Live, "{:?}", report.error);
        assert_eq!(
            slots_log(dir.path()),
            [
                format!("stop 4002 4001 {b}"),
                format!("start 4002 4001 {b}"),
                format!("switch 4002 4001 {b}"),
                // The old slot stops with its own port, in its own release.
                format!("stop 4001 4002 {a}"),
            ]
        );
        assert_eq!(
            Serving::load(&layout),
            Some(Serving {
                port: 4002,
                release: b.into()
            })
        );
        assert_eq!(layout.current_release().as_deref(), Some(b));
    }

    #[tokio::test]
    async fn a_new_slot_that_fails_never_gets_the_proxy() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ("20260101000000", "20260102000000");
        let report = cutover_run(dir.path(), a, None, "true").await.start().await;
        assert_eq!(report.outcome, Outcome::Live, "{:?}", report.error);
        slots_log(dir.path());
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.release(b)).unwrap();
        let report = cutover_run(dir.path(), b, Some(a), "exit 7")
            .await
            .start()
            .await;
        assert_eq!(report.outcome, Outcome::RolledBack, "{:?}", report.error);
        assert!(
            report
                .error
                .as_deref()
                .unwrap()
                .contains("the new slot did not start"),
            "{:?}",
            report.error
        );
        // No switch: the old slot served throughout; the new slot is stopped.
        assert_eq!(
            slots_log(dir.path()),
            [
                format!("stop 4002 4001 {b}"),
                format!("start 4002 4001 {b}"),
                format!("stop 4002 4001 {b}"),
            ]
        );
        assert_eq!(Serving::load(&layout).map(|s| s.port), Some(4001));
        assert_eq!(layout.current_release().as_deref(), Some(a));
    }

    #[tokio::test]
    async fn recovery_in_the_switch_with_a_failing_slot_puts_the_proxy_back() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ("20260101000000", "20260102000000");
        let report = cutover_run(dir.path(), a, None, "true").await.start().await;
        assert_eq!(report.outcome, Outcome::Live, "{:?}", report.error);
        slots_log(dir.path());
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.release(b)).unwrap();
        switch::switch(&layout, b).unwrap();
        // The agent died in `switch` (phase routing); the new slot no longer answers.
        let run = cutover_run(dir.path(), b, Some(a), "true").await;
        let mut journal = run.journal.clone();
        journal.phase = Phase::Routing;
        journal.spec.health = Some(proto::HealthSpec {
            url: "http://127.0.0.1:1/${DEPLOY_PORT}".into(),
            expect_status: 200,
            retries: 1,
            interval_ms: 0,
            request_timeout_ms: 200,
            watch_ms: 0,
            watch_failures: 0,
        });
        let run = Run::new(layout.clone(), journal, Events::none(), run._lock.clone());
        let report = run
            .drive(machine::recovery(Phase::Routing, true).step())
            .await;
        assert_eq!(report.outcome, Outcome::RolledBack, "{:?}", report.error);
        // The proxy may have moved: it is pointed at the old slot, then the new one stops.
        assert_eq!(
            slots_log(dir.path()),
            [
                format!("switch 4001 4002 {a}"),
                format!("stop 4002 4001 {b}")
            ]
        );
        assert_eq!(Serving::load(&layout).map(|s| s.port), Some(4001));
        assert_eq!(layout.current_release().as_deref(), Some(a));
    }

    #[test]
    fn shared_paths_are_linked_and_created() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        l.ensure().unwrap();
        let r = "20260101000000";
        std::fs::create_dir_all(l.release(r).join("log")).unwrap();
        std::fs::write(l.release(r).join("log/shipped.txt"), "x").unwrap();
        link_shared(
            &l,
            r,
            &["log".into(), ".env".into(), "config/db.yml".into()],
        )
        .unwrap();
        assert!(l.shared().join("log").is_dir());
        assert!(l.shared().join(".env").is_file());
        assert!(l.shared().join("config/db.yml").is_file());
        let log = l.release(r).join("log");
        assert!(
            std::fs::symlink_metadata(&log)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_link(&log).unwrap(), l.shared().join("log"));
        assert!(link_shared(&l, r, &["../escape".into()]).is_err());
        assert!(link_shared(&l, r, &["/etc".into()]).is_err());
    }
}
