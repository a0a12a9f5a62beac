//! Removing old releases beyond `keep_releases`: sorted by name, never the current or
//! the previous release, unfinished ones (failed, rolled back, leftover partials) first.

use proto::{ReleaseInfo, ReleaseStatus};

use super::layout::Layout;

/// Which releases to remove so that at most `keep` remain, sparing `protect`.
pub fn plan(releases: &[ReleaseInfo], keep: usize, protect: &[&str]) -> Vec<String> {
    let excess = releases.len().saturating_sub(keep);
    if excess == 0 {
        return Vec::new();
    }
    let candidates = releases
        .iter()
        .filter(|r| !protect.contains(&r.id.as_str()) && !r.current);
    let (unfinished, finished): (Vec<&ReleaseInfo>, Vec<&ReleaseInfo>) =
        candidates.partition(|r| {
            matches!(
                r.status,
                ReleaseStatus::Failed | ReleaseStatus::RolledBack | ReleaseStatus::Prepared
            )
        });
    // `releases` is sorted by id, so each half is oldest first.
    unfinished
        .into_iter()
        .chain(finished)
        .take(excess)
        .map(|r| r.id.clone())
        .collect()
}

/// Prunes on disk; returns what was removed. Leftover `.partial` dirs are always removed
/// (the caller holds the app lock, so none is in use).
///
/// A pruned dir is renamed into `.deploy/trash/` (instant, on the same filesystem) and
/// deleted there by a background thread, so a deploy does not wait for thousands of
/// unlinks; whatever a crash leaves in the trash is emptied by the next prune.
pub fn prune(layout: &Layout, keep: usize, protect: &[&str]) -> std::io::Result<Vec<String>> {
    let trash = layout.state().join("trash");
    std::fs::create_dir_all(&trash)?;
    let mut removed = Vec::new();
    let mut doomed = Vec::new();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for id in layout.partial_ids() {
        let to = trash.join(format!("{id}.partial-{stamp}"));
        std::fs::rename(layout.partial(&id), &to)?;
        doomed.push(to);
        removed.push(format!("{id}.partial"));
    }
    for id in plan(&layout.list(), keep, protect) {
        let to = trash.join(format!("{id}-{stamp}"));
        std::fs::rename(layout.release(&id), &to)?;
        doomed.push(to);
        removed.push(id);
    }
    prune_logs(layout);
    // Leftovers of a deletion a crash interrupted.
    for e in std::fs::read_dir(&trash)?.flatten() {
        if !doomed.contains(&e.path()) {
            doomed.push(e.path());
        }
    }
    if !doomed.is_empty() {
        std::thread::spawn(move || {
            for d in doomed {
                if let Err(e) = std::fs::remove_dir_all(&d) {
                    tracing::warn!("cannot delete pruned {}: {e}", d.display());
                }
            }
        });
    }
    Ok(removed)
}

/// Deletes the command logs (`.deploy/logs/<release>.*`) of releases that are gone, so
/// the logs stay as few as the releases. Logs not named after a release (`destroy.*`)
/// are left alone.
pub fn prune_logs(layout: &Layout) {
    let live: std::collections::HashSet<String> = layout
        .release_ids()
        .into_iter()
        .chain(layout.partial_ids())
        .collect();
    let Ok(dir) = std::fs::read_dir(layout.logs()) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((id, _)) = name.split_once('.') else {
            continue;
        };
        if super::layout::valid_release_id(id)
            && !live.contains(id)
            && let Err(err) = std::fs::remove_file(e.path())
        {
            tracing::warn!("cannot delete {}: {err}", e.path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, status: ReleaseStatus, current: bool) -> ReleaseInfo {
        ReleaseInfo {
            id: id.into(),
            version: None,
            sha256: None,
            created: String::new(),
            status,
            current,
            content: None,
        }
    }

    #[test]
    fn prune_moves_releases_out_at_once_and_deletes_them_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        l.ensure().unwrap();
        for id in ["20260101000001", "20260101000002", "20260101000003"] {
            std::fs::create_dir_all(l.release(id).join("sub")).unwrap();
            std::fs::write(l.release(id).join("sub/f"), id).unwrap();
        }
        std::fs::create_dir(l.partial("20260101000004")).unwrap();
        // See: #16 (command logs go with their release)
        for log in [
            "20260101000001.restart.log",
            "20260101000002.compose-up.20260101000002.log",
            "20260101000003.restart.log",
            "destroy.pr-1.log",
        ] {
            std::fs::write(l.logs().join(log), "x").unwrap();
        }
        let removed = prune(&l, 1, &["20260101000003"]).unwrap();
        let mut logs: Vec<String> = std::fs::read_dir(l.logs())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        logs.sort();
        assert_eq!(logs, ["20260101000003.restart.log", "destroy.pr-1.log"]);
        assert_eq!(
            removed,
            vec!["20260101000004.partial", "20260101000001", "20260101000002"]
        );
        assert_eq!(l.release_ids(), vec!["20260101000003".to_string()]);
        assert!(l.partial_ids().is_empty());
        let trash = l.state().join("trash");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_dir(&trash).unwrap().next().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the trash was not emptied"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn unfinished_go_first_then_oldest_never_current_or_previous() {
        use ReleaseStatus::*;
        let list = vec![
            r("01", Live, false),
            r("02", Live, false),
            r("03", Failed, false),
            r("04", Live, false),
            r("05", RolledBack, false),
            r("06", Live, true),
        ];
        // keep 3: remove 3 — the two unfinished, then the oldest live one
        assert_eq!(plan(&list, 3, &["04"]), vec!["03", "05", "01"]);
        // keep 1: the previous (04) and current (06) survive even past the limit
        assert_eq!(plan(&list, 1, &["04"]), vec!["03", "05", "01", "02"]);
        assert!(plan(&list, 6, &[]).is_empty());
    }
}
