//! The deploy state machine on disk, and the history log.
//!
//! Before each step acts, the deploy writes its phase to `<deploy_to>/.deploy/journal.json`
//! (temp file, fsync, rename). If the agent dies, [`crate::recover`] reads the journal on
//! the next start and finishes or undoes the deploy. The journal is removed when the
//! deploy has ended and its history line is written.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use proto::{Action, AppRef, HistoryEntry, ReleaseSpec};
use serde::{Deserialize, Serialize};

use crate::release::layout::{Layout, write_atomic};

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

/// Appends one line to `history.jsonl`, whole or not at all: one `write` of the whole
/// line, then fsync; on any failure (a full disk tears a write part way) the file is cut
/// back to its old length, so no torn line is left to run into the next one. A file
/// that already ends in a torn line (from an older agent) gets a newline first, so the
/// damage stays on that one line.
pub fn append_history(layout: &Layout, entry: &HistoryEntry) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    std::fs::create_dir_all(layout.state())?;
    let mut line = serde_json::to_vec(entry)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(layout.history())?;
    let len = f.metadata()?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            line.insert(0, b'\n');
        }
    }
    let result = match f.write(&line) {
        Ok(n) if n == line.len() => f.sync_data(),
        Ok(n) => Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!("short write ({n} of {} bytes)", line.len()),
        )),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let _ = f.set_len(len).and_then(|()| f.sync_data());
        return Err(e);
    }
    Ok(())
}

/// The newest `limit` entries (all when 0), oldest first. Unreadable lines are skipped.
pub fn read_history(layout: &Layout, limit: usize) -> Vec<HistoryEntry> {
    read_history_counted(layout, limit).0
}

/// Like [`read_history`], and how many lines could not be read (a torn line, bytes that
/// are not UTF-8, not an entry): those are skipped, one by one, and the rest is shown.
pub fn read_history_counted(layout: &Layout, limit: usize) -> (Vec<HistoryEntry>, u64) {
    let bytes = std::fs::read(layout.history()).unwrap_or_default();
    let mut bad = 0u64;
    let all: Vec<HistoryEntry> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .filter_map(|l| match serde_json::from_slice(l) {
            Ok(e) => Some(e),
            Err(_) => {
                bad += 1;
                None
            }
        })
        .collect();
    if bad > 0 {
        tracing::warn!(
            "{}: skipped {bad} unreadable line(s)",
            layout.history().display()
        );
    }
    let skip = if limit == 0 {
        0
    } else {
        all.len().saturating_sub(limit)
    };
    (all.into_iter().skip(skip).collect(), bad)
}

/// Finds journals under the allowed roots (an app's `deploy_to` is at most a few levels
/// down). Does not follow symlinks and does not descend into release dirs.
pub fn find_journals(roots: &[PathBuf], max_depth: usize) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, max: usize, out: &mut Vec<PathBuf>) {
        if dir.join(".deploy").join("journal.json").is_file() {
            out.push(dir.to_path_buf());
        }
        // Review-app instances (`instances/<name>/`) count as the app's own level.
        let instances = dir.join(crate::instances::DIR);
        for i in std::fs::read_dir(instances).into_iter().flatten().flatten() {
            let journal = i.path().join(".deploy").join("journal.json");
            if i.file_type().is_ok_and(|t| t.is_dir()) && journal.is_file() {
                out.push(i.path());
            }
        }
        if depth >= max {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if name == "releases" || name == "shared" || name == ".deploy" || name == "current" {
                continue;
            }
            if name == crate::instances::DIR {
                continue;
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&e.path(), depth + 1, max, out);
            }
        }
    }
    let mut out = Vec::new();
    for r in roots {
        walk(r, 0, max_depth, &mut out);
    }
    out
}

/// Now, as RFC 3339 UTC with seconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Outcome;

    #[test]
    fn history_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        for i in 0..5 {
            append_history(&l, &entry(&format!("2026010100000{i}"))).unwrap();
        }
        let last2 = read_history(&l, 2);
        assert_eq!(last2.len(), 2);
        assert_eq!(last2[1].release, "20260101000004");
        assert_eq!(read_history(&l, 0).len(), 5);
    }

    fn entry(release: &str) -> HistoryEntry {
        HistoryEntry {
            action: Action::Deploy,
            release: release.into(),
            version: None,
            previous: None,
            outcome: Outcome::Live,
            holder: "t".into(),
            started: now_rfc3339(),
            finished: now_rfc3339(),
            error: None,
            origin: None,
            instance: None,
        }
    }

    // See: #16
    #[test]
    fn bad_lines_are_skipped_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        append_history(&l, &entry("20260101000001")).unwrap();
        // A line that is not UTF-8, and a torn line with no newline (a full disk).
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(l.history())
            .unwrap();
        f.write_all(b"{\"action\":\"deploy\xff\"}\n{\"action\":\"depl")
            .unwrap();
        drop(f);
        // The next line starts on a line of its own.
        append_history(&l, &entry("20260101000002")).unwrap();
        let (all, bad) = read_history_counted(&l, 0);
        let ids: Vec<&str> = all.iter().map(|e| e.release.as_str()).collect();
        assert_eq!(ids, ["20260101000001", "20260101000002"]);
        assert_eq!(bad, 2);
    }

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
