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
pub fn prune(layout: &Layout, keep: usize, protect: &[&str]) -> std::io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for id in layout.partial_ids() {
        std::fs::remove_dir_all(layout.partial(&id))?;
        removed.push(format!("{id}.partial"));
    }
    for id in plan(&layout.list(), keep, protect) {
        std::fs::remove_dir_all(layout.release(&id))?;
        removed.push(id);
    }
    Ok(removed)
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
