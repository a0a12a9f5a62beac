//! The watch after go-live (`health.watch`, `health.watch_failures`): once a deploy is
//! live, the agent keeps checking its health URL every `interval` for `watch`, and
//! after `watch_failures` consecutive failures rolls it back on its own, through the
//! same [`Run::roll_back`] as a deploy that failed its check (step [`Step::Watch`] of
//! the transition table), with no controller connected.
//!
//! State: `<deploy_to>/.deploy/watch.json` (temp file, fsync, rename): the deploy's
//! journal (what a rollback needs; secret values are never written), the wall-clock
//! end of the watch, the consecutive failures so far, and the state. It is written when
//! the deploy goes live ([`arm`]), after each check that changes the count, and when
//! the watch ends; the file stays with its final state so `status` (and `push --wait`)
//! can tell how the last watch ended. An agent restart resumes a watch still
//! `watching` with the time it had left ([`resume_all`]).
//!
//! The lock: the watch does **not** hold the app's lock while it checks, so it never
//! blocks a new push or rollback, which end it ([`end`]) once they hold the lock. To
//! roll back, the watch takes the lock without waiting; if someone holds it, it tries
//! again at the next check (and ends with a note if the time is up first).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::{Action, LockInfo, Outcome, WatchState, WatchStatus};
use serde::{Deserialize, Serialize};

use super::journal::Journal;
use super::machine::{self, Next, Step};
use super::{Events, Run};
use crate::context::Shared;
use crate::history;
use crate::release::layout::{Layout, app_dirs, write_atomic};

/// How deep under an allowed root a `deploy_to` may be and still be resumed.
const MAX_DEPTH: usize = 4;

/// One read-modify-write of a watch file at a time (the task and a push ending it).
static FILE: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchFile {
    /// The deploy that went live: its release, previous release and spec.
    pub journal: Journal,
    /// When the watch ends, in milliseconds since the Unix epoch (wall clock, so a
    /// restarted agent resumes with the time that was left).
    pub until_ms: u64,
    pub failures: u32,
    pub max_failures: u32,
    pub state: WatchState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn path(layout: &Layout) -> std::path::PathBuf {
    layout.state().join("watch.json")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `300000` -> `300s`, `1500` -> `1500ms`: a duration as the messages show it.
pub fn human_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn rfc3339(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| ms.to_string())
}

impl WatchFile {
    pub fn load(layout: &Layout) -> Option<WatchFile> {
        let text = std::fs::read_to_string(path(layout)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn save(&self, layout: &Layout) -> std::io::Result<()> {
        let mut stored = self.clone();
        stored.journal.spec.redact.clear();
        // Webhook URLs are secrets, kept apart 0600 (`notify::store`); the watch's
        // rollback reads them from there.
        stored.journal.spec.notify = None;
        write_atomic(&path(layout), &serde_json::to_vec_pretty(&stored)?)
    }

    /// What `status` shows.
    pub fn status(&self) -> WatchStatus {
        let remaining_ms = match self.state {
            WatchState::Watching => self.until_ms.saturating_sub(now_ms()),
            _ => 0,
        };
        WatchStatus {
            release: self.journal.release.clone(),
            state: self.state,
            until: rfc3339(self.until_ms),
            remaining_ms,
            failures: self.failures,
            max_failures: self.max_failures,
            note: self.note.clone(),
        }
    }
}

/// Whether a deploy run with this journal is watched after it went live: a deploy (not
/// a rollback) whose health spec sets `watch`.
pub fn wanted(journal: &Journal) -> bool {
    journal.action == Action::Deploy
        && journal
            .spec
            .health
            .as_ref()
            .is_some_and(|h| h.watch_ms > 0 && !h.url.is_empty())
}

/// The watch of a release that just went live, written before the deploy reports
/// `live`. The task is started by whoever ran the deploy ([`spawn`]).
pub fn arm(layout: &Layout, journal: &Journal) -> std::io::Result<()> {
    let Some(h) = journal.spec.health.as_ref() else {
        return Ok(());
    };
    let _g = FILE.lock().unwrap_or_else(|e| e.into_inner());
    WatchFile {
        journal: journal.clone(),
        until_ms: now_ms() + h.watch_ms,
        failures: 0,
        max_failures: h.watch_failures.max(1),
        state: WatchState::Watching,
        note: None,
    }
    .save(layout)
}

/// The one place every end of a watch goes through, once it is saved: passed, rolled
/// back (with the rollback's report), rollback failed, or ended by a newer deploy.
/// Whatever reports a watch's end (the log here; notifications, hooks) belongs here;
/// it is called with no lock held and must not block (spawn slow work).
pub fn ended(layout: &Layout, w: &WatchFile, rollback: Option<&proto::DeployReport>) {
    let release = &w.journal.release;
    let note = w.note.as_deref().unwrap_or_default();
    let root = layout.root.display();
    match w.state {
        WatchState::Watching => {}
        WatchState::Passed => tracing::info!(%root, %release, "watch passed {note}"),
        WatchState::Ended => tracing::info!(%root, %release, "watch ended: {note}"),
        WatchState::RolledBack | WatchState::RollbackFailed => tracing::warn!(
            %root,
            %release,
            outcome = ?rollback.map(|r| r.outcome),
            "watch rolled back: {note}"
        ),
    }
}

/// What `status` shows for the app: the watch under way, or how the last one ended.
pub fn status(layout: &Layout) -> Option<WatchStatus> {
    WatchFile::load(layout).map(|w| w.status())
}

/// A new push or rollback (holding the lock) ends the watch of the release before it.
pub fn end(shared: &Shared, layout: &Layout, why: &str) {
    shared.watches.stop(&layout.root);
    let ending = {
        let _g = FILE.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = WatchFile::load(layout).filter(|w| w.state == WatchState::Watching);
        if let Some(w) = &mut w {
            w.state = WatchState::Ended;
            w.note = Some(why.to_owned());
            if let Err(e) = w.save(layout) {
                tracing::warn!("{}: cannot end the watch: {e}", layout.root.display());
            }
        }
        w
    };
    if let Some(w) = ending {
        ended(layout, &w, None);
    }
}

/// After recovery finished a deploy of `release` that did not end live: a watch of it
/// still `watching` (the agent died while the watch rolled it back) ends as that did.
pub fn settle(layout: &Layout, release: &str, outcome: Outcome, error: Option<&str>) {
    let state = match outcome {
        Outcome::RolledBack => WatchState::RolledBack,
        Outcome::RollbackFailed => WatchState::RollbackFailed,
        _ => WatchState::Ended,
    };
    if let Some(w) = update(layout, release, |w| {
        w.state = state;
        w.note = error.map(str::to_owned);
    }) {
        ended(layout, &w, None);
    }
}

/// Starts the watch task of `layout`'s app if its watch file says `watching`. `redact`:
/// the deploy's secret values, masked in what the watch logs and records (never on
/// disk, so a watch resumed after a restart has none, as recovery).
pub fn spawn(shared: &Arc<Shared>, layout: &Layout, redact: Vec<String>) {
    let watching = WatchFile::load(layout).is_some_and(|w| w.state == WatchState::Watching);
    if !watching || shared.shutting_down() {
        return;
    }
    let ticket = shared.watches.start(&layout.root);
    let s = shared.clone();
    let layout = layout.clone();
    // Counted as work in flight: shutdown tells it to stop and waits for it (a
    // rollback it began finishes first).
    shared.tasks.spawn(async move {
        let id = ticket.id;
        watch(&s, &layout, ticket.stopped, &redact).await;
        s.watches.done(&layout.root, id);
    });
}

/// At start, after recovery: resumes every watch still `watching`.
pub fn resume_all(shared: &Arc<Shared>) {
    for dir in app_dirs(&shared.config.allowed_roots, MAX_DEPTH) {
        let mut dirs = vec![dir.clone()];
        for i in std::fs::read_dir(dir.join(crate::release::layout::INSTANCES_DIR))
            .into_iter()
            .flatten()
            .flatten()
        {
            dirs.push(i.path());
        }
        for d in dirs {
            let layout = Layout::new(&d);
            // An app with a journal is being recovered: recovery decides its watch.
            if path(&layout).is_file()
                && !layout.journal().is_file()
                && !shared.watches.is_running(&layout.root)
            {
                if let Some(w) =
                    WatchFile::load(&layout).filter(|w| w.state == WatchState::Watching)
                {
                    tracing::info!(
                        release = %w.journal.release,
                        "resuming the watch, {}ms left",
                        w.until_ms.saturating_sub(now_ms())
                    );
                }
                spawn(shared, &layout, Vec::new());
            }
        }
    }
}

/// What one check did to the count, and whether that calls for a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep watching with this many consecutive failures.
    Keep(u32),
    /// `max` consecutive failures: roll back.
    RollBack,
}

/// The count after one check (pure, for the tests).
pub fn count(failures: u32, max: u32, healthy: bool) -> Verdict {
    if healthy {
        return Verdict::Keep(0);
    }
    let n = failures + 1;
    if n >= max.max(1) {
        Verdict::RollBack
    } else {
        Verdict::Keep(n)
    }
}

/// Updates the watch file under the file lock; `None` when the watch is no longer this
/// release's or no longer `watching` (a push ended it).
fn update(layout: &Layout, release: &str, f: impl FnOnce(&mut WatchFile)) -> Option<WatchFile> {
    let _g = FILE.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = WatchFile::load(layout)?;
    if w.state != WatchState::Watching || w.journal.release != release {
        return None;
    }
    f(&mut w);
    if let Err(e) = w.save(layout) {
        tracing::warn!("{}: cannot save the watch: {e}", layout.root.display());
    }
    Some(w)
}

/// The watch loop of one app. Every wait is bounded by the watch's end; `stopped`
/// (a push, a newer watch) and shutdown end it at once.
async fn watch(
    shared: &Arc<Shared>,
    layout: &Layout,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    redact: &[String],
) {
    let events = Events::none().with_redact(redact);
    let Some(first) = WatchFile::load(layout) else {
        return;
    };
    let release = first.journal.release.clone();
    let Some(mut spec) = first.journal.spec.health.clone() else {
        return;
    };
    spec.url = url(&first.journal, &spec.url);
    spec.retries = 1;
    let interval = Duration::from_millis(spec.interval_ms.max(50));
    loop {
        let Some(w) = WatchFile::load(layout)
            .filter(|w| w.state == WatchState::Watching && w.journal.release == release)
        else {
            return;
        };
        let left = w.until_ms.saturating_sub(now_ms());
        if left == 0 {
            let note = (w.failures > 0).then(|| {
                format!(
                    "passed with {} failed check(s) in a row at the end",
                    w.failures
                )
            });
            if let Some(w) = update(layout, &release, |w| {
                w.state = WatchState::Passed;
                w.note = note;
            }) {
                ended(layout, &w, None);
            }
            return;
        }
        let wait = interval.min(Duration::from_millis(left));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped.wait_for(|s| *s) => return,
            _ = shared.shutdown_signal() => return,
        }
        if now_ms() >= w.until_ms {
            continue;
        }
        let report = tokio::select! {
            r = crate::health::wait_healthy(&spec, |_, _| {}) => r,
            _ = stopped.wait_for(|s| *s) => return,
            _ = shared.shutdown_signal() => return,
        };
        let verdict = count(w.failures, w.max_failures, report.healthy);
        let failures = match verdict {
            Verdict::Keep(n) => n,
            Verdict::RollBack => w.max_failures,
        };
        if failures != w.failures {
            let Some(_) = update(layout, &release, |w| w.failures = failures) else {
                return;
            };
        }
        if !report.healthy {
            tracing::warn!(
                %release,
                "watch: check {failures}/{} failed: {}",
                w.max_failures,
                events.redact(&crate::health::describe(&report))
            );
        }
        if verdict == Verdict::RollBack
            && roll_back(shared, layout, &release, &report, redact).await
        {
            return;
        }
    }
}

/// Rolls the watched release back, holding the app's lock; `false` when the lock is
/// held by someone else (tried again at the next check).
async fn roll_back(
    shared: &Shared,
    layout: &Layout,
    release: &str,
    report: &proto::HealthReport,
    redact: &[String],
) -> bool {
    let Some(w) = WatchFile::load(layout) else {
        return true;
    };
    let info = LockInfo {
        holder: "deploy-agent (watch rolling back)".into(),
        version: w.journal.version.clone(),
        since: history::now_rfc3339(),
    };
    let lock = match shared
        .locks
        .acquire(&layout.root, layout.lock_file(), info, Duration::ZERO)
        .await
    {
        Ok(g) => Arc::new(g),
        Err(h) => {
            tracing::warn!(
                %release,
                "watch: cannot roll back now, the app is locked by {}; trying at the next check",
                h.holder
            );
            return false;
        }
    };
    // Under the lock: a push may have ended the watch since the check.
    let Some(w) = WatchFile::load(layout)
        .filter(|w| w.state == WatchState::Watching && w.journal.release == release)
    else {
        return true;
    };
    let watch_ms = w.journal.spec.health.as_ref().map_or(0, |h| h.watch_ms);
    let error = format!(
        "rolled back by watch: {} consecutive failed health checks during the {} watch \
         after release {release} went live ({})",
        w.max_failures,
        human_ms(watch_ms),
        crate::health::describe(report)
    );
    let mut journal = w.journal.clone();
    journal.holder = format!("deploy-agent watch (deployed by {})", w.journal.holder);
    journal.started = history::now_rfc3339();
    journal.spec.redact = redact.to_vec();
    let run = Run::new(layout.clone(), journal, Events::none(), lock);
    let out = match machine::next(Step::Watch, false) {
        Next::RollBack => run.roll_back(error.clone()).await,
        other => unreachable!("the table sends a failed watch to {other:?}"),
    };
    let state = if out.outcome == Outcome::RolledBack {
        WatchState::RolledBack
    } else {
        WatchState::RollbackFailed
    };
    let _g = FILE.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = w;
    w.state = state;
    w.failures = w.max_failures;
    w.note = out.error.clone().or(Some(error));
    if let Err(e) = w.save(layout) {
        tracing::warn!("{}: cannot save the watch: {e}", layout.root.display());
    }
    drop(_g);
    ended(layout, &w, Some(&out));
    true
}

/// The URL the watch polls: a review app's port, or with `[cutover]` the port of the
/// slot the watched release went live on (`${DEPLOY_PORT}` in the health URL).
fn url(journal: &Journal, url: &str) -> String {
    let url = crate::ports::expand(&journal.app, url);
    match journal.slots {
        Some(s) => url.replace("${DEPLOY_PORT}", &s.new.to_string()),
        None => url,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // See: merging the watch with the cutover (#13): the watch polled the literal
    // `${DEPLOY_PORT}` of a cutover health URL, failed, and rolled back a healthy release.
    #[test]
    fn a_cutover_release_is_watched_on_its_own_slot() {
        let mut journal: Journal = serde_json::from_value(serde_json::json!({
            "action": "deploy",
            "app": {"name": "a", "deploy_to": "/srv/a"},
            "release": "20260101000000",
            "version": null,
            "previous": null,
            "holder": "t",
            "started": "2026-01-01T00:00:00Z",
            "skip_migrations": false,
            "error": null,
            "spec": {"shared": [], "migrate": null, "restart": null, "stop": null,
                "command_timeout_ms": 1000, "keep_releases": 5, "health": null,
                "max_unpacked_bytes": 1024, "compose": null},
            "phase": "prepared",
        }))
        .unwrap();
        let template = "http://127.0.0.1:${DEPLOY_PORT}/up";
        journal.slots = Some(super::super::journal::Slots {
            new: 4002,
            old: Some(4001),
        });
        assert_eq!(url(&journal, template), "http://127.0.0.1:4002/up");
        journal.slots = None;
        assert_eq!(
            url(&journal, "http://127.0.0.1:4000/up"),
            "http://127.0.0.1:4000/up"
        );
    }

    #[test]
    fn consecutive_failures_roll_back_and_a_pass_resets_the_count() {
        assert_eq!(count(0, 3, false), Verdict::Keep(1));
        assert_eq!(count(1, 3, false), Verdict::Keep(2));
        assert_eq!(count(2, 3, false), Verdict::RollBack);
        assert_eq!(count(2, 3, true), Verdict::Keep(0));
        // watch_failures = 1: the first failure rolls back; 0 is taken as 1.
        assert_eq!(count(0, 1, false), Verdict::RollBack);
        assert_eq!(count(0, 0, false), Verdict::RollBack);
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000_000), "2027-01-15T08:00:00Z");
    }
}
