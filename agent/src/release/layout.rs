//! The layout of one app on the server:
//!
//! ```text
//! <deploy_to>/
//!   releases/<id>/                       one dir per release, YYYYMMDDHHMMSS
//!   releases/<id>/.deploy/release.json   id, version, sha256, created, status
//!   releases/<id>.partial/               an upload in progress
//!   current -> releases/<id>
//!   shared/                              linked into every release
//!   .deploy/                             journal.json, lock, history.jsonl, logs/
//!   instances/<name>/                    a review-app instance: a layout of its own
//! ```

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use proto::{ReleaseInfo, ReleaseStatus};

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

/// A release id is exactly 14 ASCII digits: `YYYYMMDDHHMMSS`.
/// `<deploy_to>/instances`: review-app instances, each a whole layout of its own.
pub const INSTANCES_DIR: &str = "instances";

/// Why `id` is not a release id, in the words every request uses.
pub fn release_id_problem(id: &str) -> Option<String> {
    (!valid_release_id(id)).then(|| format!("release id {id:?} is not YYYYMMDDHHMMSS"))
}

pub fn valid_release_id(id: &str) -> bool {
    id.len() == 14 && id.bytes().all(|b| b.is_ascii_digit())
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }
    pub fn release(&self, id: &str) -> PathBuf {
        self.releases().join(id)
    }
    pub fn partial(&self, id: &str) -> PathBuf {
        self.releases().join(format!("{id}.partial"))
    }
    pub fn current(&self) -> PathBuf {
        self.root.join("current")
    }
    pub fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }
    pub fn state(&self) -> PathBuf {
        self.root.join(".deploy")
    }
    pub fn journal(&self) -> PathBuf {
        self.state().join("journal.json")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.state().join("lock")
    }
    pub fn history(&self) -> PathBuf {
        self.state().join("history.jsonl")
    }
    pub fn logs(&self) -> PathBuf {
        self.state().join("logs")
    }
    pub fn release_meta(&self, id: &str) -> PathBuf {
        self.release(id).join(".deploy").join("release.json")
    }

    /// Creates `releases/`, `shared/` and `.deploy/logs/` when missing. `.deploy/` and
    /// `.deploy/logs/` are the agent's own (journal, history, command output): 0700,
    /// whatever the umask, also when an older agent made them 0755.
    pub fn ensure(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(self.releases())?;
        std::fs::create_dir_all(self.shared())?;
        std::fs::create_dir_all(self.logs())?;
        for dir in [self.state(), self.logs()] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// The release `current` points at, if any.
    pub fn current_release(&self) -> Option<String> {
        let target = std::fs::read_link(self.current()).ok()?;
        let name = target.file_name()?.to_str()?.to_owned();
        valid_release_id(&name).then_some(name)
    }

    pub fn read_meta(&self, id: &str) -> Option<ReleaseInfo> {
        let text = std::fs::read_to_string(self.release_meta(id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn write_meta_in(dir: &Path, info: &ReleaseInfo) -> std::io::Result<()> {
        let meta_dir = dir.join(".deploy");
        std::fs::create_dir_all(&meta_dir)?;
        let mut stored = info.clone();
        stored.current = false;
        write_atomic(
            &meta_dir.join("release.json"),
            serde_json::to_vec_pretty(&stored)?.as_slice(),
        )
    }

    /// Writes `<dir>/.deploy/manifest.json`: what the release holds, file by file.
    pub fn write_manifest_in(
        dir: &Path,
        manifest: &[proto::manifest::Entry],
    ) -> std::io::Result<()> {
        let meta_dir = dir.join(".deploy");
        std::fs::create_dir_all(&meta_dir)?;
        write_atomic(
            &meta_dir.join("manifest.json"),
            serde_json::to_vec(manifest)?.as_slice(),
        )
    }

    pub fn read_manifest(&self, id: &str) -> Option<Vec<proto::manifest::Entry>> {
        let text = std::fs::read(self.release(id).join(".deploy/manifest.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn set_status(&self, id: &str, status: ReleaseStatus) -> std::io::Result<()> {
        if let Some(mut info) = self.read_meta(id) {
            info.status = status;
            Self::write_meta_in(&self.release(id), &info)?;
        }
        Ok(())
    }

    /// Complete releases, sorted by id (oldest first), with `current` flagged.
    pub fn list(&self) -> Vec<ReleaseInfo> {
        let current = self.current_release();
        let mut out: Vec<ReleaseInfo> = self
            .release_ids()
            .into_iter()
            .map(|id| {
                let mut info = self.read_meta(&id).unwrap_or_else(|| ReleaseInfo {
                    id: id.clone(),
                    version: None,
                    sha256: None,
                    created: String::new(),
                    status: ReleaseStatus::Prepared,
                    current: false,
                    content: None,
                });
                info.current = current.as_deref() == Some(id.as_str());
                info
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Ids of complete release dirs (not `.partial`), sorted.
    pub fn release_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.releases())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_release_id(n))
            .collect();
        ids.sort();
        ids
    }

    /// Leftover `<id>.partial` dirs.
    pub fn partial_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.releases())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".partial").map(str::to_owned))
            .collect();
        ids.sort();
        ids
    }

    /// Finds a release by id, or by version label (the newest with that label).
    pub fn resolve(&self, id_or_label: &str) -> Option<ReleaseInfo> {
        let list = self.list();
        if let Some(r) = list.iter().find(|r| r.id == id_or_label) {
            return Some(r.clone());
        }
        list.into_iter()
            .rev()
            .find(|r| r.version.as_deref() == Some(id_or_label))
    }
}

/// Writes a file so that a reader sees the old or the new content, never a mix:
/// temp file, fsync, rename, fsync the directory.
/// Every directory under `roots` that may be an app's `deploy_to`, at most `max_depth`
/// levels down, each before the ones below it. Does not follow symlinks and does not
/// descend into what the agent keeps in an app (`releases`, `shared`, `.deploy`,
/// `current`, `instances`). The one walker for recovery's journal scan and instance
/// expiry: callers keep the dirs that have what they look for.
pub fn app_dirs(roots: &[PathBuf], max_depth: usize) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, max: usize, out: &mut Vec<PathBuf>) {
        out.push(dir.to_path_buf());
        if depth >= max {
            return;
        }
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            if ["releases", "shared", ".deploy", "current", INSTANCES_DIR]
                .iter()
                .any(|n| name == *n)
            {
                continue;
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
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

pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let written = (|| {
        // 0600: state files are the agent's own (the unit's umask is 0022).
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // A full disk must not also keep the half-written temp file.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// An I/O error as a user reads it: a full disk (or quota) names the filesystem the
/// path is on and how much is free, so nobody blames the artifact.
pub fn describe_io(path: &Path, e: &std::io::Error) -> String {
    let full = matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull;
    if !full {
        return e.to_string();
    }
    match rustix::fs::statvfs(path) {
        Ok(st) => {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let size = st.f_blocks.saturating_mul(st.f_frsize);
            format!(
                "the disk is full: the filesystem holding {} has {} free of {} ({e})",
                path.display(),
                human_bytes(free),
                human_bytes(size)
            )
        }
        Err(_) => format!("the disk is full at {} ({e})", path.display()),
    }
}

/// `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fourteen_digits() {
        assert!(valid_release_id("20261122214450"));
        assert!(!valid_release_id("2026112221445"));
        assert!(!valid_release_id("2026112221445x"));
        assert!(!valid_release_id("../../etc/pass"));
    }

    #[test]
    fn list_and_resolve_by_label() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        l.ensure().unwrap();
        for (id, v) in [("20260101000000", "v1"), ("20260102000000", "v2")] {
            std::fs::create_dir(l.release(id)).unwrap();
            Layout::write_meta_in(
                &l.release(id),
                &ReleaseInfo {
                    id: id.into(),
                    version: Some(v.into()),
                    sha256: None,
                    created: "x".into(),
                    status: ReleaseStatus::Live,
                    current: false,
                    content: None,
                },
            )
            .unwrap();
        }
        std::fs::create_dir(l.partial("20260103000000")).unwrap();
        std::os::unix::fs::symlink("releases/20260102000000", l.current()).unwrap();
        let list = l.list();
        assert_eq!(list.len(), 2, "partial dirs are not releases");
        assert!(list[1].current && !list[0].current);
        assert_eq!(l.resolve("v1").unwrap().id, "20260101000000");
        assert_eq!(l.resolve("20260102000000").unwrap().version.unwrap(), "v2");
        assert!(l.resolve("v9").is_none());
        assert_eq!(l.partial_ids(), vec!["20260103000000".to_string()]);
    }
}
