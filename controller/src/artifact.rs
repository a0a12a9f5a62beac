//! What an artifact holds: its content digest ([`proto::manifest::content_digest`]),
//! computed the way the agent computes it from what it unpacks, so the two can be
//! compared without uploading anything.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path};

use proto::manifest::Entry;
use sha2::{Digest, Sha256};

/// The content digest of a `.tar.gz`. Errors name the entry; the agent would refuse the
/// same archive.
pub fn content_digest(path: &Path) -> Result<String, String> {
    Ok(proto::manifest::content_digest(&scan(path)?.entries))
}

/// What an artifact holds, and its sha256 as a file: one streaming pass.
pub struct Scan {
    pub entries: Vec<Entry>,
    pub dirs: Vec<proto::DirEntry>,
    pub sha256: String,
    pub size: u64,
}

impl Scan {
    pub fn offer(&self) -> proto::DeltaOffer {
        proto::DeltaOffer {
            entries: self.entries.clone(),
            dirs: self.dirs.clone(),
            artifact_sha256: self.sha256.clone(),
            artifact_size: self.size,
        }
    }
}

/// Hashes and counts what passes through.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

pub fn scan(path: &Path) -> Result<Scan, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut raw = Hashing {
        inner: f,
        hasher: Sha256::new(),
        size: 0,
    };
    let gz = flate2::read::GzDecoder::new(std::io::BufReader::with_capacity(1 << 20, &mut raw));
    let mut archive = tar::Archive::new(gz);
    let mut entries: Vec<Entry> = Vec::new();
    let mut dirs: Vec<proto::DirEntry> = Vec::new();
    let mut files: HashMap<String, usize> = HashMap::new();
    let mut buf = vec![0u8; 1 << 20];
    let bad = |e: std::io::Error| format!("{}: not a readable .tar.gz: {e}", path.display());
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let mut kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous)
            && raw.ends_with(b"/")
        {
            kind = tar::EntryType::Directory;
        }
        let rel = normalize(&name)?;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mode = entry.header().mode().map_err(bad)? & 0o777;
                let mut h = Sha256::new();
                let mut size = 0u64;
                loop {
                    let n = entry.read(&mut buf).map_err(bad)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    size += n as u64;
                }
                files.insert(rel.clone(), entries.len());
                entries.push(Entry::File {
                    path: rel,
                    mode,
                    size,
                    sha256: hex::encode(h.finalize()),
                });
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                entries.push(Entry::Symlink { path: rel, target });
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                let target = normalize(&target)?;
                let Some(&i) = files.get(&target) else {
                    return Err(format!(
                        "{}: hard link {name:?} points at {target:?}, which is not a file before it",
                        path.display()
                    ));
                };
                let Entry::File {
                    mode, size, sha256, ..
                } = entries[i].clone()
                else {
                    unreachable!("files only indexes file entries")
                };
                entries.push(Entry::File {
                    path: rel,
                    mode,
                    size,
                    sha256,
                });
            }
            tar::EntryType::Directory if !rel.is_empty() => {
                let mode = entry.header().mode().map_err(bad)? & 0o777;
                dirs.push(proto::DirEntry { path: rel, mode });
            }
            _ => {}
        }
    }
    // The rest of the file (tar padding, trailing bytes) counts toward its sha256.
    let mut gz = archive.into_inner();
    std::io::copy(&mut gz, &mut std::io::sink()).map_err(bad)?;
    drop(gz);
    std::io::copy(&mut raw, &mut std::io::sink()).map_err(bad)?;
    Ok(Scan {
        entries,
        dirs,
        sha256: hex::encode(raw.hasher.finalize()),
        size: raw.size,
    })
}

/// Writes a `.tar.gz` of only the files at `paths` (as they are in `artifact`) to `out`.
pub fn subset(
    artifact: &Path,
    paths: &std::collections::HashSet<String>,
    out: impl std::io::Write,
) -> Result<(), String> {
    let f = std::fs::File::open(artifact).map_err(|e| format!("{}: {e}", artifact.display()))?;
    let gz = flate2::read::GzDecoder::new(std::io::BufReader::with_capacity(1 << 20, f));
    let mut archive = tar::Archive::new(gz);
    let enc = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let mut b = tar::Builder::new(enc);
    let bad = |e: std::io::Error| format!("{}: {e}", artifact.display());
    let mut left = paths.len();
    for entry in archive.entries().map_err(bad)? {
        if left == 0 {
            break;
        }
        let mut entry = entry.map_err(bad)?;
        if !matches!(
            entry.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        ) {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = normalize(&name)?;
        if !paths.contains(&rel) {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(entry.size());
        h.set_mode(entry.header().mode().map_err(bad)? & 0o777);
        h.set_mtime(entry.header().mtime().unwrap_or(0));
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, &rel, &mut entry).map_err(bad)?;
        left -= 1;
    }
    let enc = b.into_inner().map_err(bad)?;
    let mut out = enc.finish().map_err(bad)?;
    out.flush().map_err(bad)
}

/// `./a//b` → `a/b`; absolute paths and `..` are refused.
fn normalize(name: &str) -> Result<String, String> {
    let mut parts = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "artifact entry {name:?} is not a plain relative path"
                ));
            }
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tgz(path: &Path, entries: &[(&str, &[u8], u32)], link: Option<(&str, &str)>) {
        let f = std::fs::File::create(path).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (name, data, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        if let Some((name, target)) = link {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, name, target).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn packing_does_not_matter_content_does() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.tgz");
        let b = dir.path().join("b.tgz");
        tgz(
            &a,
            &[("x/1", b"one", 0o644), ("./y", b"two", 0o755)],
            Some(("l", "x/1")),
        );
        tgz(
            &b,
            &[("y", b"two", 0o755), ("x/1", b"one", 0o644)],
            Some(("l", "x/1")),
        );
        assert_eq!(content_digest(&a).unwrap(), content_digest(&b).unwrap());
        tgz(
            &b,
            &[("y", b"two", 0o644), ("x/1", b"one", 0o644)],
            Some(("l", "x/1")),
        );
        assert_ne!(content_digest(&a).unwrap(), content_digest(&b).unwrap());
        std::fs::write(&b, b"not gzip").unwrap();
        assert!(content_digest(&b).is_err());
    }
}
