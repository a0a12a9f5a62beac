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
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let gz = flate2::read::GzDecoder::new(std::io::BufReader::with_capacity(1 << 20, f));
    let mut archive = tar::Archive::new(gz);
    let mut entries: Vec<Entry> = Vec::new();
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
            _ => {}
        }
    }
    Ok(proto::manifest::content_digest(&entries))
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
