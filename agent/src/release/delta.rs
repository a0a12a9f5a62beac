//! Delta upload: the controller offers the artifact's manifest; we answer which files we
//! cannot source from releases already on this host; the upload then carries only
//! those, and [`materialize`] builds the rest of the new release locally.
//!
//! Releases stay independent: a sourced file is *copied* into the new release
//! (`std::fs::copy`, i.e. `copy_file_range(2)`, which shares extents on filesystems that
//! can, such as XFS and btrfs, and copies bytes elsewhere). Hard links would be faster
//! but would let a process writing into release N change release N-1.
//!
//! A file in an old release is a valid source only if it is still what that release's
//! manifest says: a regular file of the recorded size whose inode has not changed (ctime)
//! since the manifest was written. Anything touched after that (an app writing into
//! its release dir, a chmod) is not used, and the controller sends it instead.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use proto::manifest::Entry;
use proto::{DeltaOffer, ReleaseStatus};

use super::layout::Layout;

/// Files on this host that can be copied into a new release, by sha256.
#[derive(Debug, Default)]
pub struct Sources {
    by_sha: HashMap<String, PathBuf>,
}

impl Sources {
    /// Indexes every complete release's manifest (failed ones included: their files are
    /// as good as any).
    pub fn index(layout: &Layout) -> Sources {
        let mut by_sha = HashMap::new();
        for info in layout.list() {
            if info.status == ReleaseStatus::Prepared && !info.current {
                // possibly half-built by a deploy that died; skip
                continue;
            }
            let dir = layout.release(&info.id);
            let manifest_path = dir.join(".deploy/manifest.json");
            let Ok(meta) = std::fs::metadata(&manifest_path) else {
                continue;
            };
            let written = (meta.mtime(), meta.mtime_nsec());
            let Some(entries) = layout.read_manifest(&info.id) else {
                continue;
            };
            for e in entries {
                if let Entry::File {
                    path, size, sha256, ..
                } = e
                {
                    if by_sha.contains_key(&sha256) {
                        continue;
                    }
                    let full = dir.join(&path);
                    if untouched(&dir, &path, &full, size, written) {
                        by_sha.insert(sha256, full);
                    }
                }
            }
        }
        Sources { by_sha }
    }

    pub fn get(&self, sha256: &str) -> Option<&Path> {
        self.by_sha.get(sha256).map(PathBuf::as_path)
    }
}

/// A regular file (reached through real directories only) of `size` bytes, unchanged
/// since `written`.
fn untouched(dir: &Path, rel: &str, full: &Path, size: u64, written: (i64, i64)) -> bool {
    let mut p = dir.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        p.push(part);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    match std::fs::symlink_metadata(full) {
        Ok(m) => m.is_file() && m.len() == size && (m.ctime(), m.ctime_nsec()) <= written,
        Err(_) => false,
    }
}

/// The files the upload must carry: the first entry of each content we cannot source.
pub fn need(offer: &DeltaOffer, sources: &Sources) -> Vec<u32> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, e) in offer.entries.iter().enumerate() {
        if let Entry::File { sha256, .. } = e
            && sources.get(sha256).is_none()
            && seen.insert(sha256.clone())
        {
            out.push(i as u32);
        }
    }
    out
}

/// Builds in `dest` everything the offer lists that the upload did not bring, then
/// checks that what was uploaded is what was offered. `uploaded` is the manifest of
/// what was unpacked into `dest`.
pub fn materialize(
    dest: &Path,
    offer: &DeltaOffer,
    uploaded: &[Entry],
    sources: &Sources,
) -> Result<(), String> {
    let offered: HashMap<&str, &Entry> = offer.entries.iter().map(|e| (e.path(), e)).collect();
    // Whatever came over the wire must be exactly what was offered under that path.
    for u in uploaded {
        match offered.get(u.path()) {
            Some(o) if *o == u => {}
            Some(_) => {
                return Err(format!(
                    "{}: uploaded content differs from the offer",
                    u.path()
                ));
            }
            None => return Err(format!("{}: uploaded but not offered", u.path())),
        }
    }
    let have: HashSet<&str> = uploaded.iter().map(Entry::path).collect();
    for d in &offer.dirs {
        let rel = checked(&d.path)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let full = real_parent(dest, &rel)?.join(rel.file_name().unwrap_or_default());
        match std::fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{}: exists and is not a directory", d.path)),
            Err(_) => std::fs::create_dir(&full).map_err(|e| format!("{}: {e}", d.path))?,
        }
        std::fs::set_permissions(
            &full,
            std::fs::Permissions::from_mode((d.mode & 0o777) | 0o700),
        )
        .map_err(|e| format!("{}: {e}", d.path))?;
    }
    // Files with the same content inside this release serve each other.
    let mut local: HashMap<String, PathBuf> = HashMap::new();
    for u in uploaded {
        if let Entry::File { path, sha256, .. } = u {
            local
                .entry(sha256.clone())
                .or_insert_with(|| dest.join(path));
        }
    }
    for e in &offer.entries {
        if have.contains(e.path()) {
            continue;
        }
        let rel = checked(e.path())?;
        let full = real_parent(dest, &rel)?.join(rel.file_name().unwrap_or_default());
        if std::fs::symlink_metadata(&full).is_ok() {
            return Err(format!("{}: listed twice", e.path()));
        }
        match e {
            Entry::File {
                path,
                mode,
                size,
                sha256,
            } => {
                let src = local
                    .get(sha256)
                    .map(PathBuf::as_path)
                    .or_else(|| sources.get(sha256))
                    .ok_or_else(|| format!("{path}: neither uploaded nor on this host"))?;
                let copied = std::fs::copy(src, &full).map_err(|e| format!("{path}: {e}"))?;
                if copied != *size {
                    return Err(format!("{path}: copied {copied} bytes, expected {size}"));
                }
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode & 0o777))
                    .map_err(|e| format!("{path}: {e}"))?;
                local.entry(sha256.clone()).or_insert(full);
            }
            Entry::Symlink { path, target } => {
                if escapes(&rel, target) {
                    return Err(format!(
                        "symlink {path} -> {target} would point outside the release"
                    ));
                }
                std::os::unix::fs::symlink(target, &full).map_err(|e| format!("{path}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// A plain relative path: no `..`, not absolute.
fn checked(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("{path:?}: not a plain relative path"));
    }
    Ok(p.to_path_buf())
}

/// The parent of `rel` under `dest`, created as real directories (never through a
/// symlink).
fn real_parent(dest: &Path, rel: &Path) -> Result<PathBuf, String> {
    let mut p = dest.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            p.push(c);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("{}: a parent is not a directory", rel.display())),
                Err(_) => std::fs::create_dir(&p).map_err(|e| format!("{}: {e}", p.display()))?,
            }
        }
    }
    Ok(p)
}

/// Whether a symlink at `rel` with `target` could leave the release (the unpacker's
/// rule: relative, and `..` only at the start, never above the release root).
fn escapes(rel: &Path, target: &str) -> bool {
    let t = Path::new(target);
    let mut up = rel.components().count().saturating_sub(1);
    let mut seen_name = false;
    for c in t.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(_) => seen_name = true,
            Component::ParentDir if !seen_name && up > 0 => up -= 1,
            _ => return true,
        }
    }
    target.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, data: &[u8], mode: u32) -> Entry {
        use sha2::Digest;
        Entry::File {
            path: path.into(),
            mode,
            size: data.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(data)),
        }
    }

    #[test]
    fn sources_must_be_untouched_and_copies_are_independent() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        l.ensure().unwrap();
        let old = "20260101000000";
        std::fs::create_dir_all(l.release(old).join("a")).unwrap();
        std::fs::write(l.release(old).join("a/keep"), b"keep").unwrap();
        std::fs::write(l.release(old).join("a/edited"), b"orig").unwrap();
        let manifest = vec![
            file("a/keep", b"keep", 0o644),
            file("a/edited", b"orig", 0o644),
        ];
        std::thread::sleep(std::time::Duration::from_millis(20));
        Layout::write_manifest_in(&l.release(old), &manifest).unwrap();
        Layout::write_meta_in(
            &l.release(old),
            &proto::ReleaseInfo {
                id: old.into(),
                version: None,
                sha256: None,
                created: String::new(),
                status: ReleaseStatus::Live,
                current: false,
                content: None,
            },
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // the app rewrites a file in its release dir after the deploy
        std::fs::write(l.release(old).join("a/edited"), b"ORIG").unwrap();
        let sources = Sources::index(&l);
        let offer = DeltaOffer {
            entries: vec![
                file("a/keep", b"keep", 0o600),
                file("b/copy-of-keep", b"keep", 0o644),
                file("a/edited", b"orig", 0o644),
                file("new", b"new!", 0o755),
                Entry::Symlink {
                    path: "b/link".into(),
                    target: "../new".into(),
                },
            ],
            dirs: vec![proto::DirEntry {
                path: "empty".into(),
                mode: 0o750,
            }],
            artifact_sha256: String::new(),
            artifact_size: 0,
        };
        // "keep" is sourced; "orig" is not (touched); "new" is not on the host
        assert_eq!(need(&offer, &sources), vec![2, 3]);
        let dest = dir.path().join("releases/20260102000000.partial");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("new"), b"new!").unwrap();
        std::fs::create_dir(dest.join("a")).unwrap();
        std::fs::write(dest.join("a/edited"), b"orig").unwrap();
        let uploaded = vec![
            file("a/edited", b"orig", 0o644),
            file("new", b"new!", 0o755),
        ];
        materialize(&dest, &offer, &uploaded, &sources).unwrap();
        assert_eq!(std::fs::read(dest.join("a/keep")).unwrap(), b"keep");
        assert_eq!(std::fs::read(dest.join("b/copy-of-keep")).unwrap(), b"keep");
        let mode = std::fs::metadata(dest.join("a/keep"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_link(dest.join("b/link")).unwrap(),
            Path::new("../new")
        );
        assert!(dest.join("empty").is_dir());
        // a copy, not a link: writing the new release leaves the old one alone
        std::fs::write(dest.join("a/keep"), b"changed").unwrap();
        assert_eq!(
            std::fs::read(l.release(old).join("a/keep")).unwrap(),
            b"keep"
        );
    }

    #[test]
    fn uploads_must_match_the_offer_and_links_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let offer = DeltaOffer {
            entries: vec![file("x", b"1", 0o644)],
            dirs: vec![],
            artifact_sha256: String::new(),
            artifact_size: 0,
        };
        let err = materialize(
            dir.path(),
            &offer,
            &[file("x", b"2", 0o644)],
            &Sources::default(),
        )
        .unwrap_err();
        assert!(err.contains("differs"), "{err}");
        let err = materialize(
            dir.path(),
            &offer,
            &[file("y", b"1", 0o644)],
            &Sources::default(),
        )
        .unwrap_err();
        assert!(err.contains("not offered"), "{err}");
        assert!(escapes(Path::new("a/l"), "../../etc"));
        assert!(escapes(Path::new("l"), "/etc"));
        assert!(escapes(Path::new("a/l"), "x/../../y"));
        assert!(!escapes(Path::new("a/l"), "../b"));
        let evil = DeltaOffer {
            entries: vec![Entry::Symlink {
                path: "l".into(),
                target: "../outside".into(),
            }],
            dirs: vec![],
            artifact_sha256: String::new(),
            artifact_size: 0,
        };
        assert!(materialize(dir.path(), &evil, &[], &Sources::default()).is_err());
        let evil = DeltaOffer {
            entries: vec![file("../x", b"1", 0o644)],
            dirs: vec![],
            artifact_sha256: String::new(),
            artifact_size: 0,
        };
        assert!(materialize(dir.path(), &evil, &[], &Sources::default()).is_err());
    }
}
