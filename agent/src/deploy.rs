//! The release lifecycle after the upload: link shared paths, migrate, switch, restart,
//! check health, and confirm or roll back. Runs in its own task, owned by the agent: a
//! controller that goes away changes nothing about how it ends.

use std::collections::BTreeMap;
use std::path::{Component, Path};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{Action, DeployReport, Event, HistoryEntry, Outcome, ReleaseStatus, Stage, StepReport};
use tokio::sync::mpsc::UnboundedSender;

use crate::exec;
use crate::health;
use crate::journal::{self, Journal, Phase};
use crate::lock::LockGuard;
use crate::release::layout::Layout;
use crate::release::{prune, switch};

/// Where progress goes. Sending to a session that has gone is not an error.
#[derive(Clone, Default)]
pub struct Events(Option<UnboundedSender<Event>>);

impl Events {
    pub fn new(tx: UnboundedSender<Event>) -> Self {
        Self(Some(tx))
    }
    pub fn none() -> Self {
        Self(None)
    }
    pub fn send(&self, stage: Stage, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(?stage, "{message}");
        if let Some(tx) = &self.0 {
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
    /// Held until the run ends.
    _lock: Arc<LockGuard>,
}

impl Run {
    pub fn new(layout: Layout, journal: Journal, events: Events, lock: Arc<LockGuard>) -> Self {
        Self {
            layout,
            journal,
            events,
            steps: Vec::new(),
            health: None,
            started: Instant::now(),
            _lock: lock,
        }
    }

    fn env(&self, release: &str) -> BTreeMap<String, String> {
        let j = &self.journal;
        let mut env = BTreeMap::new();
        env.insert("DEPLOY_APP".into(), j.app.name.clone());
        env.insert("DEPLOY_RELEASE".into(), release.to_owned());
        env.insert(
            "DEPLOY_RELEASE_DIR".into(),
            self.layout.release(release).display().to_string(),
        );
        // The version of the release this command runs for (on a rollback, the old one).
        let version = if release == j.release {
            j.version.clone()
        } else {
            self.layout.read_meta(release).and_then(|m| m.version)
        };
        env.insert("DEPLOY_VERSION".into(), version.unwrap_or_default());
        env.insert(
            "DEPLOY_PREVIOUS_RELEASE".into(),
            j.previous.clone().unwrap_or_default(),
        );
        env.insert("DEPLOY_TO".into(), self.layout.root.display().to_string());
        env
    }

    fn persist(&mut self, phase: Phase) -> Result<(), String> {
        self.journal
            .set(&self.layout, phase)
            .map_err(|e| format!("cannot write the journal: {e}"))
    }

    async fn command(&mut self, stage: Stage, command: &str, release: &str) -> Result<(), String> {
        self.events.send(stage, format!("running `{command}`"));
        let env = self.env(release);
        let dir = self.layout.release(release);
        let log = self.layout.logs().join(format!(
            "{}.{}.log",
            self.journal.release,
            stage_name(stage)
        ));
        let timeout = Duration::from_millis(self.journal.spec.command_timeout_ms.max(1));
        let result = exec::run(exec::Command {
            stage,
            command,
            dir: &dir,
            env: &env,
            timeout,
            log,
        })
        .await;
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
                Err(e.to_string())
            }
        }
    }

    fn step(&mut self, stage: Stage, started: Instant, result: Result<String, String>) {
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

    async fn check_health(&mut self) -> Result<(), String> {
        let Some(spec) = self.journal.spec.health.clone() else {
            return Ok(());
        };
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
        result.map(|_| ())
    }

    /// Links `<deploy_to>/shared/<path>` into the release.
    pub fn link_shared(&mut self) -> Result<(), String> {
        let t = Instant::now();
        let release = self.journal.release.clone();
        let shared = self.journal.spec.shared.clone();
        let result = link_shared(&self.layout, &release, &shared);
        if !shared.is_empty() {
            self.step(
                Stage::LinkShared,
                t,
                result
                    .clone()
                    .map(|_| format!("linked {}", shared.join(", "))),
            );
        }
        result
    }

    /// The whole deploy of a prepared release (`releases/<id>` exists).
    pub async fn deploy(mut self) -> DeployReport {
        let release = self.journal.release.clone();
        if let Err(e) = self.persist(Phase::Prepared) {
            return self.fail_before_switch(e).await;
        }
        if let Err(e) = self.link_shared() {
            return self.fail_before_switch(e).await;
        }
        let migrate = self.journal.spec.migrate.clone();
        match migrate {
            Some(cmd) if !self.journal.skip_migrations => {
                if let Err(e) = self.persist(Phase::Migrating) {
                    return self.fail_before_switch(e).await;
                }
                if let Err(e) = self.command(Stage::Migrate, &cmd, &release).await {
                    return self
                        .fail_before_switch(format!("migration failed: {e}"))
                        .await;
                }
            }
            Some(_) => self
                .events
                .send(Stage::Migrate, "skipped (--skip-migrations)"),
            None => {}
        }
        self.activate().await
    }

    /// Switch, restart, check health; roll back on failure; confirm on success.
    pub async fn activate(mut self) -> DeployReport {
        let release = self.journal.release.clone();
        if let Err(e) = self.persist(Phase::Switching) {
            return self.fail_before_switch(e).await;
        }
        let t = Instant::now();
        self.events
            .send(Stage::Switch, format!("current -> releases/{release}"));
        if let Err(e) = switch::switch(&self.layout, &release) {
            let msg = format!("could not switch current: {e}");
            self.step(Stage::Switch, t, Err(msg.clone()));
            return self.fail_before_switch(msg).await;
        }
        self.step(
            Stage::Switch,
            t,
            Ok(format!("current -> releases/{release}")),
        );
        self.restart_and_check(Phase::Restarting).await
    }

    /// From `Restarting` (run restart, then check) or `Checking` (check only).
    pub async fn restart_and_check(mut self, from: Phase) -> DeployReport {
        let release = self.journal.release.clone();
        if from == Phase::Restarting {
            if let Err(e) = self.persist(Phase::Restarting) {
                return self.roll_back(e).await;
            }
            if let Some(cmd) = self.journal.spec.restart.clone()
                && let Err(e) = self.command(Stage::Restart, &cmd, &release).await
            {
                return self.roll_back(format!("restart failed: {e}")).await;
            }
        }
        if let Err(e) = self.persist(Phase::Checking) {
            return self.roll_back(e).await;
        }
        if let Err(e) = self.check_health().await {
            return self.roll_back(e).await;
        }
        self.confirm().await
    }

    async fn confirm(mut self) -> DeployReport {
        let release = self.journal.release.clone();
        let _ = self.layout.set_status(&release, ReleaseStatus::Live);
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
        self.events
            .send(Stage::Health, format!("release {release} is live"));
        self.finish(Outcome::Live, None)
    }

    /// Ends a run that never switched `current` (used by recovery).
    pub async fn abandon(self, error: Option<String>) -> DeployReport {
        let error = error
            .or_else(|| self.journal.error.clone())
            .unwrap_or_else(|| "abandoned".into());
        self.fail_before_switch(error).await
    }

    /// The deploy stopped before `current` moved.
    async fn fail_before_switch(self, error: String) -> DeployReport {
        let release = self.journal.release.clone();
        // A rollback target is not a bad build because we could not switch to it.
        if self.journal.action != Action::Rollback {
            let _ = self.layout.set_status(&release, ReleaseStatus::Failed);
        }
        self.events
            .send(Stage::Switch, format!("{error}; current is unchanged"));
        self.finish(Outcome::Failed, Some(error))
    }

    /// `current` points at the new release, which failed: go back to `previous`.
    pub async fn roll_back(mut self, error: String) -> DeployReport {
        self.journal.error = Some(error.clone());
        let _ = self.persist(Phase::RollingBack);
        let release = self.journal.release.clone();
        let t = Instant::now();
        let outcome = match self.journal.previous.clone() {
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
                        let restart_ok = match self.journal.spec.restart.clone() {
                            Some(cmd) => self.command(Stage::Restart, &cmd, &prev).await.is_ok(),
                            None => true,
                        };
                        if restart_ok && self.check_health().await.is_ok() {
                            Outcome::RolledBack
                        } else {
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
                        Outcome::RolledBack
                    }
                    Err(e) => {
                        self.step(Stage::Rollback, t, Err(format!("remove current: {e}")));
                        Outcome::RollbackFailed
                    }
                }
            }
        };
        // Marked so that `rollback` without --to skips it.
        let _ = self.layout.set_status(&release, ReleaseStatus::RolledBack);
        match outcome {
            Outcome::RollbackFailed => self.events.send(
                Stage::Rollback,
                "ROLLBACK FAILED: the previous release is not healthy either; a human must look",
            ),
            _ => self.events.send(
                Stage::Rollback,
                "rolled back: the previous release serves again",
            ),
        }
        self.finish(outcome, Some(error))
    }

    fn finish(self, outcome: Outcome, error: Option<String>) -> DeployReport {
        let j = &self.journal;
        let current = self.layout.current_release();
        let _ = journal::append_history(
            &self.layout,
            &HistoryEntry {
                action: j.action,
                release: j.release.clone(),
                version: j.version.clone(),
                previous: j.previous.clone(),
                outcome,
                holder: j.holder.clone(),
                started: j.started.clone(),
                finished: journal::now_rfc3339(),
                error: error.clone(),
            },
        );
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
pub fn link_shared(layout: &Layout, release: &str, paths: &[String]) -> Result<(), String> {
    let dir = layout.release(release);
    for p in paths {
        let rel = Path::new(p);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!(
                "shared path {p:?} must be relative, without `..` or `.`"
            ));
        }
        let source = layout.shared().join(rel);
        if std::fs::symlink_metadata(&source).is_err() {
            if let Some(parent) = source.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("create {}: {e}", parent.display()))?;
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
            made.map_err(|e| format!("create {}: {e}", source.display()))?;
        }
        let dest = dir.join(rel);
        if let Some(parent) = dest.parent() {
            // The parent must be a real directory inside the release.
            if std::fs::symlink_metadata(parent)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false)
            {
                return Err(format!(
                    "shared path {p:?}: a parent in the release is a symlink"
                ));
            }
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("create {}: {e}", parent.display()))?;
        }
        match std::fs::symlink_metadata(&dest) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&dest),
            Ok(_) => std::fs::remove_file(&dest),
            Err(_) => Ok(()),
        }
        .map_err(|e| format!("replace {}: {e}", dest.display()))?;
        std::os::unix::fs::symlink(&source, &dest)
            .map_err(|e| format!("link {} -> {}: {e}", dest.display(), source.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
