//! The deploy's state on disk: `<deploy_to>/.deploy/journal.json`.
//!
//! Before each step acts, the driver ([`super::run`]) writes the phase it is about to act
//! in (temp file, fsync, rename). If the agent dies, [`super::recover`] reads the journal
//! on the next start and finishes or undoes the deploy from that phase. The journal is
//! removed when the deploy has ended and its history line is written.

use std::path::{Path, PathBuf};

use proto::{Action, AppRef, ReleaseSpec};
use serde::{Deserialize, Serialize};

use crate::release::layout::{INSTANCES_DIR, Layout, app_dirs, write_atomic};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Receiving and unpacking into `releases/<id>.partial`.
    Uploading,
    /// `releases/<id>` is complete; shared paths being linked.
    Prepared,
    Migrating,
    /// About to move `current` (it may or may not have moved).
    Switching,
    Restarting,
    Checking,
    /// Going back to `previous`.
    RollingBack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub action: Action,
    pub app: AppRef,
    pub release: String,
    pub version: Option<String>,
    pub previous: Option<String>,
    pub holder: String,
    pub started: String,
    pub skip_migrations: bool,
    pub spec: ReleaseSpec,
    pub phase: Phase,
    /// Why we are rolling back, once we are.
    pub error: Option<String>,
    /// Where the release came from (`promote`, `--force`), for the history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<proto::Origin>,
}

impl Journal {
    /// Secret values to mask ([`proto::ReleaseSpec::redact`]) stay in memory only.
    pub fn save(&self, layout: &Layout) -> std::io::Result<()> {
        std::fs::create_dir_all(layout.state())?;
        let mut stored = self.clone();
        stored.spec.redact.clear();
        write_atomic(&layout.journal(), &serde_json::to_vec_pretty(&stored)?)
    }

    pub fn set(&mut self, layout: &Layout, phase: Phase) -> std::io::Result<()> {
        self.phase = phase;
        self.save(layout)
    }

    pub fn load(layout: &Layout) -> Option<Journal> {
        let text = std::fs::read_to_string(layout.journal()).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn clear(layout: &Layout) -> std::io::Result<()> {
        match std::fs::remove_file(layout.journal()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The app dirs under the allowed roots that hold a journal: an app's `deploy_to` (at
/// most `max_depth` levels down) or one of its review-app instances.
pub fn find_journals(roots: &[PathBuf], max_depth: usize) -> Vec<PathBuf> {
    let has_journal = |dir: &Path| Layout::new(dir).journal().is_file();
    let mut out = Vec::new();
    for dir in app_dirs(roots, max_depth) {
        if has_journal(&dir) {
            out.push(dir.clone());
        }
        // Review-app instances (`instances/<name>/`) count as the app's own level.
        for i in std::fs::read_dir(dir.join(INSTANCES_DIR))
            .into_iter()
            .flatten()
            .flatten()
        {
            if i.file_type().is_ok_and(|t| t.is_dir()) && has_journal(&i.path()) {
                out.push(i.path());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_are_found_under_roots_but_not_in_releases() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("myapp");
        std::fs::create_dir_all(app.join(".deploy")).unwrap();
        std::fs::write(app.join(".deploy/journal.json"), "{}").unwrap();
        let inner = app.join("releases/20260101000000");
        std::fs::create_dir_all(inner.join(".deploy")).unwrap();
        std::fs::write(inner.join(".deploy/journal.json"), "{}").unwrap();
        assert_eq!(find_journals(&[dir.path().to_path_buf()], 4), vec![app]);
    }

    #[test]
    fn instance_journals_are_found_at_any_allowed_depth() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("a/b/c/app");
        let inst = app.join("instances/pr-1");
        std::fs::create_dir_all(inst.join(".deploy")).unwrap();
        std::fs::write(inst.join(".deploy/journal.json"), "{}").unwrap();
        assert_eq!(find_journals(&[dir.path().to_path_buf()], 4), vec![inst]);
    }
}
