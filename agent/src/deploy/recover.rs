//! Recovery at start: a deploy the agent did not finish (it was killed, the machine
//! rebooted) is finished or undone before the app takes new work. What it does for each
//! phase is the table [`super::machine::RECOVERY`]:
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
//!
//! A journal that cannot be read (truncated, not JSON) is decided from what is on disk
//! alone ([`without_journal`]): partial uploads are removed; if `current` points at a
//! release never confirmed live, `current` goes back to the newest live release (which
//! is not restarted: its restart command was in the lost journal) and the history says
//! a human must look; the journal is kept aside as `journal.unreadable-<time>.json`.

use std::sync::Arc;
use std::time::Duration;

use proto::{Action, HistoryEntry, LockInfo, Outcome, ReleaseStatus};

use super::journal::{self, Journal};
use super::machine::{self, Recovery};
use super::{Events, Run};
use crate::context::Shared;
use crate::history;
use crate::lock::LockGuard;
use crate::release::layout::Layout;

/// How deep under an allowed root a `deploy_to` may be and still be recovered.
const MAX_DEPTH: usize = 4;

pub struct Job {
    layout: Layout,
    /// `None`: the journal exists but cannot be read.
    journal: Option<Journal>,
    lock: Arc<LockGuard>,
}

/// Why the app's journal cannot be used, when it exists and cannot be read. A journal
/// is written whole (temp file, rename), so a running deploy's always reads.
pub fn unreadable_journal(layout: &Layout) -> Option<String> {
    let path = layout.journal();
    if !path.is_file() || Journal::load(layout).is_some() {
        return None;
    }
    Some(format!(
        "the deploy journal {} is unreadable (truncated?); restart deploy-agent to recover \
         from what is on disk",
        path.display()
    ))
}

/// Finds unfinished deploys and takes their locks.
pub async fn lock_unfinished(shared: &Shared) -> Vec<Job> {
    let mut jobs = Vec::new();
    for root in journal::find_journals(&shared.config.allowed_roots, MAX_DEPTH) {
        let layout = Layout::new(&root);
        // A lock file left by the dead agent is stale by definition.
        let _ = std::fs::remove_file(layout.lock_file());
        let journal = Journal::load(&layout);
        if journal.is_none() {
            tracing::warn!(
                "unreadable journal in {}; deciding from what is on disk",
                root.display()
            );
        }
        let info = LockInfo {
            holder: "deploy-agent (recovering after restart)".into(),
            version: journal.as_ref().and_then(|j| j.version.clone()),
            since: history::now_rfc3339(),
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
        journal,
        lock,
    } = job;
    let Some(journal) = journal else {
        return without_journal(&layout, lock);
    };
    tracing::info!(
        app = %journal.app.name,
        release = %journal.release,
        phase = ?journal.phase,
        "recovering an unfinished {:?}",
        journal.action
    );
    let note = "the agent restarted mid-deploy";
    let moved = layout.current_release().as_deref() == Some(journal.release.as_str());
    let then = machine::recovery(journal.phase, moved);
    if then == Recovery::DiscardUpload {
        let _ = std::fs::remove_dir_all(layout.partial(&journal.release));
    }
    let why = journal.error.clone();
    let run = Run::new(layout, journal, Events::none(), lock);
    let report = match then {
        Recovery::DiscardUpload => run.abandon(Some(format!("{note}: upload discarded"))).await,
        Recovery::EndBeforeSwitch => run.abandon(Some(format!("{note} before the switch"))).await,
        Recovery::Resume(step) => run.drive(step).await,
        Recovery::FinishRollBack => {
            run.roll_back(why.unwrap_or_else(|| format!("{note} while rolling back")))
                .await
        }
    };
    tracing::info!(outcome = ?report.outcome, "recovery finished");
    report.outcome
}

/// Recovery when the journal cannot be read: decide from what is on disk (see the module
/// docs). The lock is held throughout and freed on return.
fn without_journal(layout: &Layout, lock: Arc<LockGuard>) -> Outcome {
    let started = history::now_rfc3339();
    for id in layout.partial_ids() {
        let _ = std::fs::remove_dir_all(layout.partial(&id));
    }
    let aside = layout.state().join(format!(
        "journal.unreadable-{}.json",
        started.replace(':', "")
    ));
    if let Err(e) = std::fs::rename(layout.journal(), &aside) {
        tracing::warn!("cannot set the unreadable journal aside: {e}");
        let _ = std::fs::remove_file(layout.journal());
    }
    let list = layout.list();
    let current = layout.current_release();
    let current_info = current
        .as_deref()
        .and_then(|c| list.iter().find(|r| r.id == c));
    let last_live = list
        .iter()
        .rev()
        .find(|r| r.status == ReleaseStatus::Live && Some(r.id.as_str()) != current.as_deref())
        .map(|r| r.id.clone());
    let why = format!(
        "the agent restarted and found the deploy journal unreadable (kept as {})",
        aside.display()
    );
    let (release, previous, outcome, error) = match current_info {
        Some(r) if r.status != ReleaseStatus::Live => match &last_live {
            Some(live) => match crate::release::switch::switch(layout, live) {
                Ok(()) => {
                    let _ = layout.set_status(&r.id, ReleaseStatus::RolledBack);
                    (
                        r.id.clone(),
                        Some(live.clone()),
                        Outcome::RollbackFailed,
                        format!(
                            "{why}: release {} was current but never confirmed live, so \
                             current was switched back to the live release {live}; it was \
                             not restarted (the restart command was in the lost journal): \
                             run `deployctl rollback ENV --to {live}` or push again",
                            r.id
                        ),
                    )
                }
                Err(e) => (
                    r.id.clone(),
                    Some(live.clone()),
                    Outcome::RollbackFailed,
                    format!(
                        "{why}: release {} is current but never confirmed live, and \
                         switching back to {live} failed: {e}",
                        r.id
                    ),
                ),
            },
            None => (
                r.id.clone(),
                None,
                Outcome::RollbackFailed,
                format!(
                    "{why}: release {} is current but never confirmed live, and there is \
                     no live release to go back to",
                    r.id
                ),
            ),
        },
        _ => {
            // `current` is live (or absent): whatever was being deployed never took.
            let abandoned = list
                .iter()
                .rev()
                .find(|r| r.status == ReleaseStatus::Prepared && !r.current)
                .map(|r| r.id.clone());
            if let Some(id) = &abandoned {
                let _ = layout.set_status(id, ReleaseStatus::Failed);
            }
            (
                abandoned.or(current.clone()).unwrap_or_default(),
                current.clone(),
                Outcome::Failed,
                format!("{why}: current is unchanged"),
            )
        }
    };
    tracing::warn!(root = %layout.root.display(), "{error}");
    let holder = lock.info.holder.clone();
    let _ = history::append_history(
        layout,
        &HistoryEntry {
            action: Action::Deploy,
            release,
            version: None,
            previous,
            outcome,
            holder,
            started,
            finished: history::now_rfc3339(),
            error: Some(error),
            origin: None,
            instance: None,
        },
    );
    drop(lock);
    outcome
}
