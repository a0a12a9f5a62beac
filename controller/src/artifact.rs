//! What an artifact holds: its content digest ([`proto::manifest::content_digest`]),
//! computed the way the agent computes it from what it unpacks, so the two can be
//! compared without uploading anything.

pub mod share;

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

/// Checks, before anything connects, that `path` is a gzip'd tar: the gzip magic, then a
/// valid tar header in the first block it inflates to. The error names the file and says
/// what it is instead (a zip, a plain tar, text...), so a wrong `--artifact` is exit 2 at
/// once, not a refusal from the server after the upload.
pub fn check_format(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("artifact {shown}: {e}"))?;
    if meta.is_dir() {
        return Err(format!(
            "artifact {shown} is a directory; pack it first: tar -czf app.tar.gz -C {shown} ."
        ));
    }
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .map_err(|e| format!("artifact {shown}: {e}"))?;
    if !head.starts_with(&[0x1f, 0x8b]) {
        return Err(format!(
            "artifact {shown} is not a .tar.gz: it is {}",
            sniff(&head)
        ));
    }
    let mut block = Vec::with_capacity(512);
    let inflated = std::fs::File::open(path)
        .map(|f| flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f)))
        .and_then(|gz| gz.take(512).read_to_end(&mut block));
    if let Err(e) = inflated {
        return Err(format!(
            "artifact {shown} is not a .tar.gz: its gzip data is broken ({e})"
        ));
    }
    if block.len() < 512 || !is_tar_header(&block) {
        return Err(format!(
            "artifact {shown} is gzip'd but not a tar inside: it holds {}",
            sniff(&block)
        ));
    }
    Ok(())
}

/// A ustar/GNU header, or an old-style one whose checksum adds up (an all-zero block is
/// the end of an empty archive, which is a tar too).
fn is_tar_header(block: &[u8]) -> bool {
    if block.iter().all(|&b| b == 0) || &block[257..262] == b"ustar" {
        return true;
    }
    let field = String::from_utf8_lossy(&block[148..156]);
    let Ok(stored) = u32::from_str_radix(field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
    else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    sum == stored
}

/// A few words on what `head` (the first bytes of a file) looks like.
fn sniff(head: &[u8]) -> &'static str {
    const MAGIC: [(&[u8], &str); 8] = [
        (b"PK\x03\x04", "a zip archive"),
        (b"BZh", "a bzip2 file (use gzip: tar -czf)"),
        (b"\xfd7zXZ\x00", "an xz file (use gzip: tar -czf)"),
        (b"\x28\xb5\x2f\xfd", "a zstd file (use gzip: tar -czf)"),
        (b"\x7fELF", "an executable (ELF)"),
        (b"%PDF", "a PDF document"),
        (b"\x89PNG", "a PNG image"),
        (b"<", "an HTML or XML document"),
    ];
    if head.is_empty() {
        return "an empty file";
    }
    if head.len() >= 512 && is_tar_header(&head[..512]) {
        return "a plain tar, not compressed (use tar -czf)";
    }
    for (magic, what) in MAGIC {
        if head.starts_with(magic) {
            return what;
        }
    }
    if std::str::from_utf8(head)
        .is_ok_and(|t| t.chars().all(|c| !c.is_control() || c.is_whitespace()))
    {
        "a text file"
    } else {
        "data of an unknown kind"
    }
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
    scan_counted(path, &SubsetProgress::default())
}

/// [`scan`], counting bytes read and files hashed into `progress` (for the progress
/// display).
pub fn scan_counted(path: &Path, progress: &SubsetProgress) -> Result<Scan, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f = CountingReader { inner: f, progress };
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
                progress
                    .files
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    subset_counted(artifact, paths, out, &SubsetProgress::default())
}

/// How far [`subset_counted`] is: bytes of the artifact read, files written.
#[derive(Debug, Default)]
pub struct SubsetProgress {
    pub read: std::sync::atomic::AtomicU64,
    pub files: std::sync::atomic::AtomicU64,
    /// Set to stop the read early (its result is no longer wanted).
    pub stop: std::sync::atomic::AtomicBool,
}

/// The artifact as read, counting bytes into a [`SubsetProgress`].
struct CountingReader<'a, R> {
    inner: R,
    progress: &'a SubsetProgress,
}

impl<R: std::io::Read> std::io::Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self
            .progress
            .stop
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(std::io::Error::other("stopped: no longer needed"));
        }
        let n = self.inner.read(buf)?;
        self.progress
            .read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// [`subset`], counting progress into `progress` as it goes (for the progress display).
pub fn subset_counted(
    artifact: &Path,
    paths: &std::collections::HashSet<String>,
    out: impl std::io::Write,
    progress: &SubsetProgress,
) -> Result<(), String> {
    let f = std::fs::File::open(artifact).map_err(|e| format!("{}: {e}", artifact.display()))?;
    let f = CountingReader { inner: f, progress };
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
        progress
            .files
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

    #[test]
    // See: #18 (item 4): a bad artifact was found only on the server, after the upload.
    fn check_format_names_what_the_file_is_instead() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let mut tar_bytes = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        tar_bytes.append_data(&mut h, "a.txt", &b"hi"[..]).unwrap();
        let tar_bytes = tar_bytes.into_inner().unwrap();
        let gz = |bytes: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, bytes).unwrap();
            e.finish().unwrap()
        };

        assert_eq!(check_format(&write("ok.tar.gz", &gz(&tar_bytes))), Ok(()));
        let empty_tar = gz(&[0u8; 1024]);
        assert_eq!(check_format(&write("empty.tar.gz", &empty_tar)), Ok(()));

        let cases: [(&str, Vec<u8>, &str); 6] = [
            ("plain.tar", tar_bytes.clone(), "a plain tar"),
            ("app.zip", b"PK\x03\x04rest".to_vec(), "a zip archive"),
            ("notes.tar.gz", b"hello world\n".to_vec(), "a text file"),
            ("none.tar.gz", Vec::new(), "an empty file"),
            (
                "text.gz",
                gz(b"just some text, not a tar at all\n"),
                "gzip'd but not a tar",
            ),
            ("cut.tar.gz", gz(&tar_bytes)[..20].to_vec(), "broken"),
        ];
        for (name, bytes, want) in cases {
            let err = check_format(&write(name, &bytes)).unwrap_err();
            assert!(err.contains(name), "{err}");
            assert!(err.contains(want), "{name}: {err}");
        }
        let err = check_format(dir.path()).unwrap_err();
        assert!(err.contains("is a directory"), "{err}");
        let err = check_format(&dir.path().join("missing.tar.gz")).unwrap_err();
        assert!(err.contains("missing.tar.gz"), "{err}");
    }

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
