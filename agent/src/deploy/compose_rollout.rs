//! The compose strategy's zero-downtime "restart" (`zero_downtime = ["web"]`): the
//! driver of the steps [`crate::compose`] describes and builds the argvs for, run for a
//! release's own files (a deploy, a rollback, recovery). It takes the place of `up
//! --force-recreate` in [`Run::restart`]; the state machine around it is unchanged.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use proto::{ComposeSpec, Stage, StepReport};

use super::error::StepError;
use super::run::Run;
use crate::compose::{self, Compose, Health, PROBE_TIMEOUT, Project, Rollout};
use crate::exec;

/// How often Docker is asked whether the new container is healthy yet.
const POLL: Duration = Duration::from_millis(250);

impl Run {
    /// Brings `release`'s project up: the unlisted services with a plain `up`, then each
    /// listed one rolled out beside its old container. Services in `skip` are left
    /// running as they are (their old container never stopped serving: a rollback after
    /// this run's rollout of them failed).
    pub(super) async fn compose_rollout(
        &mut self,
        release: &str,
        spec: &ComposeSpec,
        bin: &Compose,
    ) -> Result<(), StepError> {
        let p = Project::of(spec);
        self.finish_unfinished_rollout(release, spec).await?;
        let services = self.compose_services(release, bin, p).await?;
        let listed: Vec<String> = spec
            .zero_downtime
            .iter()
            .filter(|s| services.contains(*s))
            .cloned()
            .collect();
        let skip = self.compose_untouched.take().unwrap_or_default();
        // From here on, what this run has not replaced yet.
        self.compose_untouched = Some(listed.iter().cloned().collect());
        let others: Vec<String> = services
            .iter()
            .filter(|s| !listed.contains(s))
            .cloned()
            .collect();
        if !others.is_empty() {
            self.argv_command(
                Stage::Restart,
                "compose-up",
                &bin.up_services(p, &others),
                release,
            )
            .await?;
        }
        for service in &listed {
            if skip.contains(service) {
                self.events.send(
                    Stage::Restart,
                    format!("{service}: its old container still serves; left as it is"),
                );
                continue;
            }
            self.roll_out_service(release, spec, bin, service).await?;
        }
        Ok(())
    }

    /// The services `release`'s files define.
    async fn compose_services(
        &mut self,
        release: &str,
        bin: &Compose,
        p: Project<'_>,
    ) -> Result<Vec<String>, StepError> {
        let argv = bin.services(p);
        match self
            .exec_argv(
                Stage::Restart,
                "compose-services",
                &argv,
                release,
                Some(PROBE_TIMEOUT),
            )
            .await
        {
            Ok(step) => Ok(step
                .output
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.contains(' '))
                .map(str::to_owned)
                .collect()),
            Err((step, e)) => {
                let err = StepError::Tool {
                    source: e,
                    output: step.output.clone(),
                };
                self.steps.push(step);
                Err(err.context("cannot list the compose services"))
            }
        }
    }

    /// Runs a docker argv that only looks or cleans; its output, or why it failed.
    async fn docker(&self, name: &str, argv: &[String], release: &str) -> Result<String, String> {
        match self
            .exec_argv(Stage::Restart, name, argv, release, Some(PROBE_TIMEOUT))
            .await
        {
            Ok(step) => Ok(step.output),
            Err((step, e)) => Err(exec::with_output(&e.to_string(), &step.output)),
        }
    }

    async fn containers_of(
        &self,
        spec: &ComposeSpec,
        service: &str,
        release: &str,
    ) -> Result<Vec<String>, StepError> {
        let argv = compose::service_containers(&spec.project, service);
        self.docker("docker-ps", &argv, release)
            .await
            .map(|out| compose::ids_in(&out))
            .map_err(|e| {
                StepError::Refused(format!("cannot list the containers of {service}: {e}"))
            })
    }

    /// A rollout the agent did not finish (it was killed mid-way): removes the side that
    /// does not serve, so at most the one serving container of the service is left.
    async fn finish_unfinished_rollout(
        &mut self,
        release: &str,
        spec: &ComposeSpec,
    ) -> Result<(), StepError> {
        let state = self.layout.state();
        let Some(r) = Rollout::load(&state) else {
            return Ok(());
        };
        let t = Instant::now();
        let now = self.containers_of(spec, &r.service, release).await?;
        let gone = r.leftovers(&now);
        if !gone.is_empty() {
            self.docker("docker-rm", &compose::remove(&gone), release)
                .await
                .map_err(StepError::Refused)?;
        }
        let msg = format!(
            "an unfinished rollout of {} ({}) was cleaned up: removed {}",
            r.service,
            if r.switched {
                "the new container served"
            } else {
                "the old container served"
            },
            if gone.is_empty() {
                "nothing".to_owned()
            } else {
                gone.iter().map(|i| short(i)).collect::<Vec<_>>().join(", ")
            }
        );
        self.events.send(Stage::Restart, msg.clone());
        self.step(Stage::Restart, t, Ok(msg));
        Rollout::clear(&state);
        Ok(())
    }

    /// One listed service: a new container beside the old one(s), healthy, then a drain
    /// with both serving, then the old ones stopped and removed.
    async fn roll_out_service(
        &mut self,
        release: &str,
        spec: &ComposeSpec,
        bin: &Compose,
        service: &str,
    ) -> Result<(), StepError> {
        let state = self.layout.state();
        let p = Project::of(spec);
        let old = self.containers_of(spec, service, release).await?;
        let mut record = Rollout {
            service: service.to_owned(),
            old: old.clone(),
            switched: false,
        };
        record
            .save(&state)
            .map_err(|e| StepError::Io(format!("cannot record the rollout of {service}: {e}")))?;
        self.events.send(
            Stage::Restart,
            format!(
                "{service}: starting a new container beside {}",
                if old.is_empty() {
                    "none (first start)".to_owned()
                } else {
                    old.iter().map(|i| short(i)).collect::<Vec<_>>().join(", ")
                }
            ),
        );
        let up = self
            .argv_command(
                Stage::Restart,
                "compose-scale",
                &bin.scale_up(p, service, old.len() + 1),
                release,
            )
            .await;
        let new: Vec<String> = match self.containers_of(spec, service, release).await {
            Ok(now) => now.into_iter().filter(|i| !old.contains(i)).collect(),
            Err(e) => {
                Rollout::clear(&state);
                return Err(up.err().unwrap_or(e));
            }
        };
        let ready = match up {
            Err(e) => Err(e),
            Ok(()) if new.is_empty() => Err(StepError::Refused(format!(
                "`{}` started no new container of {service}",
                bin.name()
            ))),
            Ok(()) => self.wait_healthy(release, service, &new).await,
        };
        let ready = match ready {
            Ok(()) => self.check_health().await,
            Err(e) => Err(e),
        };
        if let Err(e) = ready {
            // Every container of the service that is not an old one goes: the ones listed
            // after `up`, and any that showed up since (listed again now).
            let mut gone = new.clone();
            if let Ok(now) = self.containers_of(spec, service, release).await {
                gone.extend(
                    now.into_iter()
                        .filter(|i| !old.contains(i) && !new.contains(i)),
                );
            }
            self.abort_rollout(release, service, &gone).await;
            Rollout::clear(&state);
            return Err(e.context(format!(
                "zero-downtime rollout of {service} stopped (the new container was removed, \
                 the old one still serves)"
            )));
        }

        // The new container serves: from here on we only go forward.
        record.switched = true;
        record
            .save(&state)
            .map_err(|e| StepError::Io(format!("cannot record the rollout of {service}: {e}")))?;
        if let Some(untouched) = self.compose_untouched.as_mut() {
            untouched.remove(service);
        }
        if !old.is_empty() {
            self.retire(release, service, &old, spec.drain_ms).await?;
        }
        Rollout::clear(&state);
        let t = Instant::now();
        let msg = format!(
            "{service}: {} serves release {release}",
            new.iter().map(|i| short(i)).collect::<Vec<_>>().join(", ")
        );
        self.events.send(Stage::Restart, msg.clone());
        self.step(Stage::Restart, t, Ok(msg));
        Ok(())
    }

    /// Waits (up to the command timeout) until Docker reports each of `new` healthy.
    async fn wait_healthy(
        &mut self,
        release: &str,
        service: &str,
        new: &[String],
    ) -> Result<(), StepError> {
        let t = Instant::now();
        let limit = Duration::from_millis(self.journal.spec.command_timeout_ms.max(1));
        self.events.send(
            Stage::Restart,
            format!("{service}: waiting until Docker reports the new container healthy"),
        );
        for id in new {
            let why = loop {
                let said = self
                    .docker("docker-health", &compose::health_status(id), release)
                    .await;
                match said.as_deref().map(compose::judge_health) {
                    Ok(Health::Healthy) => break None,
                    Ok(Health::Waiting) => {}
                    Ok(Health::Failed(why)) => break Some(why),
                    Err(e) => break Some(e.to_owned()),
                }
                if t.elapsed() >= limit {
                    break Some(format!("not healthy after {}s", limit.as_secs()));
                }
                tokio::time::sleep(POLL).await;
            };
            if let Some(why) = why {
                let msg = format!("{service}: new container {}: {why}", short(id));
                self.step(Stage::Restart, t, Err(msg.clone()));
                self.container_logs(release, id).await;
                return Err(StepError::Refused(msg));
            }
        }
        let msg = format!(
            "{service}: the new container is healthy after {}ms",
            t.elapsed().as_millis()
        );
        self.events.send(Stage::Restart, msg.clone());
        self.step(Stage::Restart, t, Ok(msg));
        Ok(())
    }

    /// The last log lines of a container that failed, as a failed step (so it is shown).
    async fn container_logs(&mut self, release: &str, id: &str) {
        let argv = compose::container_logs(id);
        let step = match self
            .exec_argv(
                Stage::Restart,
                "docker-logs",
                &argv,
                release,
                Some(PROBE_TIMEOUT),
            )
            .await
        {
            Ok(s) | Err((s, _)) => s,
        };
        self.steps.push(StepReport {
            success: false,
            error: Some(format!(
                "last {} log lines of the new container {}",
                compose::LOG_LINES,
                short(id)
            )),
            output: compose::logs_output(step.output.clone()),
            ..step
        });
    }

    /// The rollout failed before the switch: the new containers go, the old ones serve.
    async fn abort_rollout(&mut self, release: &str, service: &str, new: &[String]) {
        if new.is_empty() {
            return;
        }
        let t = Instant::now();
        let result = self
            .docker("docker-rm", &compose::remove(new), release)
            .await
            .map(|_| {
                format!(
                    "{service}: removed the new container {}",
                    new.iter().map(|i| short(i)).collect::<Vec<_>>().join(", ")
                )
            });
        let (Ok(msg) | Err(msg)) = &result;
        self.events.send(Stage::Restart, msg.clone());
        self.step(Stage::Restart, t, result);
    }

    /// The old containers: a drain with both sides serving (the proxy, which looks the
    /// name up again every `valid`, learns the new address), then stopped (their stop
    /// signal and grace period: in-flight requests finish) and removed.
    ///
    /// They are NOT taken out of the network first: `docker network disconnect`
    /// black-holes the connections it cuts (no reset reaches the proxy, which waits its
    /// read timeout), measured as failed requests on every rollout; and a container's
    /// address stays in the proxy's cache up to `valid` either way. A stopped container
    /// leaves Docker's DNS when its process exits.
    async fn retire(
        &mut self,
        release: &str,
        service: &str,
        old: &[String],
        drain_ms: Option<u64>,
    ) -> Result<(), StepError> {
        let t = Instant::now();
        let drain = drain_ms.map_or(compose::DEFAULT_DRAIN, Duration::from_millis);
        self.events.send(
            Stage::Restart,
            format!(
                "{service}: old and new containers both serve; draining {}ms before the old \
                 one stops",
                drain.as_millis()
            ),
        );
        tokio::time::sleep(drain).await;
        for id in old {
            // `docker stop` honours the service's stop signal and grace period.
            let _ = self
                .docker("docker-stop", &compose::stop(id), release)
                .await;
        }
        let removed = self
            .docker("docker-rm", &compose::remove(old), release)
            .await;
        let ids = old.iter().map(|i| short(i)).collect::<Vec<_>>().join(", ");
        match removed {
            Ok(_) => {
                let msg = format!("{service}: stopped and removed the old container {ids}");
                self.events.send(Stage::Restart, msg.clone());
                self.step(Stage::Restart, t, Ok(msg));
                Ok(())
            }
            Err(e) => {
                let msg = format!("{service}: could not remove the old container {ids}: {e}");
                self.step(Stage::Restart, t, Err(msg.clone()));
                Err(StepError::Refused(msg))
            }
        }
    }
}

/// A container id as `docker ps` shows it.
fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The listed services a run has not replaced yet (see [`Run::compose_rollout`]).
pub(super) type Untouched = BTreeSet<String>;
