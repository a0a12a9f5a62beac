//! What a release holds, independent of how it was packed: each regular file with its
//! mode, size and sha256, each symlink with its target. Directories are left out (tar
//! tools disagree on whether to list them), and a hard link counts as the file it
//! shares.
//!
//! Both sides compute the same [`content_digest`]: the controller from an artifact
//! before it pushes, the agent from what it unpacked. Equal digests mean the two
//! releases are byte-identical; that is how `promote` and `promote_from` prove that
//! production runs exactly what staging ran.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    File {
        /// Relative, `/`-separated, without `./`.
        path: String,
        /// Permission bits (setuid/setgid/sticky dropped).
        mode: u32,
        size: u64,
        sha256: String,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::File { path, .. } | Entry::Symlink { path, .. } => path,
        }
    }
}

/// The digest of a set of entries, in any order. Hex sha256, prefixed `c1:` (the
/// version of this scheme).
pub fn content_digest(entries: &[Entry]) -> String {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path().as_bytes().cmp(b.path().as_bytes()));
    let mut h = Sha256::new();
    for e in sorted {
        match e {
            Entry::File {
                path,
                mode,
                size,
                sha256,
            } => {
                h.update(b"f\0");
                h.update(path.as_bytes());
                h.update(format!("\0{:o}\0{size}\0{sha256}\n", mode & 0o777).as_bytes());
            }
            Entry::Symlink { path, target } => {
                h.update(b"l\0");
                h.update(path.as_bytes());
                h.update(b"\0");
                h.update(target.as_bytes());
                h.update(b"\n");
            }
        }
    }
    format!("c1:{}", hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str, mode: u32, sha: &str) -> Entry {
        Entry::File {
            path: path.into(),
            mode,
            size: 3,
            sha256: sha.into(),
        }
    }

    #[test]
    fn order_does_not_matter_content_does() {
        let a = vec![f("a", 0o644, "x"), f("b/c", 0o755, "y")];
        let b = vec![f("b/c", 0o755, "y"), f("a", 0o644, "x")];
        assert_eq!(content_digest(&a), content_digest(&b));
        assert!(content_digest(&a).starts_with("c1:"));
        let mode = vec![f("a", 0o600, "x"), f("b/c", 0o755, "y")];
        assert_ne!(content_digest(&a), content_digest(&mode), "the mode counts");
        let link = vec![
            f("a", 0o644, "x"),
            Entry::Symlink {
                path: "b/c".into(),
                target: "y".into(),
            },
        ];
        assert_ne!(content_digest(&a), content_digest(&link));
        // golden: the scheme must not change silently
        assert_eq!(
            content_digest(&[f("a", 0o644, "x")]),
            content_digest(&[f("a", 0o100644, "x")]),
            "only permission bits count"
        );
    }

    #[test]
    fn golden_digest() {
        let d = content_digest(&[f("index.html", 0o644, "ab")]);
        // sha256 of "f\0index.html\0644\03\0ab\n"
        assert_eq!(
            d,
            "c1:".to_owned() + &hex::encode(Sha256::digest(b"f\0index.html\x00644\x003\x00ab\n"))
        );
    }
}
