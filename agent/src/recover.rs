//! Recovery at start: a deploy the agent did not finish (it was killed, the machine
//! rebooted) is finished or undone before the app takes new work.
//!
//! | phase when the agent died | what recovery does |
//! | --- | --- |
//! | uploading | removes the partial dir |
//! | prepared, migrating | marks the release failed; `current` was never touched |
//! | switching | if `current` moved: as restarting; else as migrating |
//! | restarting | runs `restart` again, then checks health |
//! | checking | checks health again |
//! | rolling back | switches back to the previous release, restarts, checks |
//!
//! Whatever the health check says decides: healthy is confirmed, anything else is
//! rolled back, exactly as if the agent had never stopped.

use std::sync::Arc;
use std::time::Duration;

use proto::{LockInfo, Outcome};

use crate::deploy::{Events, Run};
use crate::journal::{self, Journal, Phase};
use crate::lock::LockGuard;
use crate::release::layout::Layout;
use crate::server::Shared;

/// How deep under an allowed root a `deploy_to` may be and still be recovered.
const MAX_DEPTH: usize = 4;

pub struct Job {
    layout: Layout,
    journal: Journal,
    lock: Arc<LockGuard>,
}

/// Finds unfinished deploys and takes their locks.
pub async fn lock_unfinished(shared: &Shared) -> Vec<Job> {
    let mut jobs = Vec::new();
    for root in journal::find_journals(&shared.config.allowed_roots, MAX_DEPTH) {
        let layout = Layout::new(&root);
        // A lock file left by the dead agent is stale by definition.
        let _ = std::fs::remove_file(layout.lock_file());
        let Some(journal) = Journal::load(&layout) else {
            tracing::warn!("unreadable journal in {}; leaving it", root.display());
            continue;
        };
        let info = LockInfo {
            holder: "deploy-agent (recovering after restart)".into(),
            version: journal.version.clone(),
            since: journal::now_rfc3339(),
        };
        match shared
            .locks
            .acquire(&root, layout.lock_file(), info, Duration::ZERO)
            .await
        {
            Ok(g) => jobs.push(Job {
                layout,
                journal,
                lock: Arc::new(g),
            }),
            Err(_) => tracing::warn!("{} is locked twice in the journal scan", root.display()),
        }
    }
    jobs
}

pub async fn finish(_shared: &Shared, job: Job) -> Outcome {
    let Job {
        layout,
        mut journal,
        lock,
    } = job;
    tracing::info!(
        app = %journal.app.name,
        release = %journal.release,
        phase = ?journal.phase,
        "recovering an unfinished {:?}",
        journal.action
    );
    let note = "the agent restarted mid-deploy";
    let report = match journal.phase {
        Phase::Uploading => {
            let _ = std::fs::remove_dir_all(layout.partial(&journal.release));
            journal.error = Some(format!("{note}: upload discarded"));
            let run = Run::new(layout, journal, Events::none(), lock);
            run.abandon(None).await
        }
        Phase::Prepared | Phase::Migrating => {
            let run = Run::new(layout, journal, Events::none(), lock);
            run.abandon(Some(format!("{note} before the switch"))).await
        }
        Phase::Switching => {
            let moved = layout.current_release().as_deref() == Some(journal.release.as_str());
            let run = Run::new(layout, journal, Events::none(), lock);
            if moved {
                run.restart_and_check(Phase::Restarting).await
            } else {
                run.abandon(Some(format!("{note} before the switch"))).await
            }
        }
        Phase::Restarting | Phase::Checking => {
            let phase = journal.phase;
            Run::new(layout, journal, Events::none(), lock)
                .restart_and_check(phase)
                .await
        }
        Phase::RollingBack => {
            let why = journal
                .error
                .clone()
                .unwrap_or_else(|| format!("{note} while rolling back"));
            Run::new(layout, journal, Events::none(), lock)
                .roll_back(why)
                .await
        }
    };
    tracing::info!(outcome = ?report.outcome, "recovery finished");
    report.outcome
}
