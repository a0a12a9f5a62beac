//! Delta upload over a real sshd: only missing files cross the wire, and the release
//! built from local copies is byte-identical to a full upload.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deployctl_e2e::{Output, SshdOptions, bin};

use crate::support::Site;

/// Deterministic bytes (xorshift), incompressible.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A release of `n` files (plus a symlink and an empty dir); file `changed` differs by
/// version. `extra` adds one big file.
fn artifact(site: &Site, version: &str, n: usize, changed: usize, extra: usize) -> PathBuf {
    let path = site.env.path(&format!("{version}.tar.gz"));
    let f = std::fs::File::create(&path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    let mut add = |name: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    };
    for i in 0..n {
        let seed = if i == changed {
            1_000 + version.len() as u64 * 7 + version.bytes().map(u64::from).sum::<u64>()
        } else {
            i as u64
        };
        let mode = if i % 3 == 0 { 0o755 } else { 0o644 };
        add(&format!("d{}/f{i}", i % 7), &noise(seed, 4096 + i), mode);
    }
    add("VERSION", format!("{version}\n").as_bytes(), 0o644);
    if extra > 0 {
        add("big.bin", &noise(77 + version.len() as u64, extra), 0o644);
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    tar.append_link(&mut h, "latest", "d1/f1").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o750);
    tar.append_data(&mut h, "empty/", std::io::empty()).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    path
}

fn site() -> Site {
    let s = Site::ssh(SshdOptions::default());
    s.write_config("keep_releases = 5", "");
    s
}

fn push(s: &Site, art: &Path, version: &str) -> Output {
    s.run(&[
        "push",
        "test",
        "--artifact",
        art.to_str().unwrap(),
        "--version",
        version,
    ])
}

/// path → (kind+mode, bytes or target) for the release `current` points at.
fn tree(deploy_to: &Path) -> BTreeMap<String, (String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == ".deploy" {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o777;
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(
                    rel,
                    ("link".into(), t.to_string_lossy().as_bytes().to_vec()),
                );
            } else if m.is_dir() {
                out.insert(rel.clone(), (format!("dir {mode:o}"), Vec::new()));
                walk(root, &p, out);
            } else {
                out.insert(rel, (format!("file {mode:o}"), std::fs::read(&p).unwrap()));
            }
        }
    }
    let root = std::fs::canonicalize(deploy_to.join("current")).unwrap();
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

fn content(s: &Site) -> String {
    let out = s.run(&["releases", "test", "--json"]);
    let rels = out.json()["hosts"][0]["releases"]
        .as_array()
        .unwrap()
        .clone();
    rels.iter().find(|r| r["current"] == true).unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn a_delta_release_is_byte_identical_to_a_full_upload() {
    let delta = site();
    let full = site();
    let v1 = artifact(&delta, "v1", 300, 5, 0);
    let v2 = artifact(&delta, "v2", 300, 5, 0);
    push(&delta, &v1, "v1").assert_exit(0);
    let out = push(&delta, &v2, "v2");
    out.assert_exit(0);
    assert!(
        out.stderr.contains("delta: sending 2 of 301 files"),
        "only the changed file and VERSION cross the wire: {out}"
    );
    // the same v2, uploaded whole to a host that has nothing
    let out = push(&full, &v2, "v2");
    out.assert_exit(0);
    assert!(!out.stderr.contains("delta:"), "{out}");
    let (a, b) = (tree(&delta.deploy_to), tree(&full.deploy_to));
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert_eq!(Some(v), b.get(k), "{k} differs");
    }
    assert_eq!(
        a["empty"].0, "dir 750",
        "empty dirs and their modes come along"
    );
    assert_eq!(content(&delta), content(&full));
}

#[test]
fn files_changed_in_an_old_release_are_not_trusted_and_copies_are_independent() {
    let s = site();
    let v1 = artifact(&s, "v1", 50, 0, 0);
    let v2 = artifact(&s, "v2", 50, 0, 0);
    push(&s, &v1, "v1").assert_exit(0);
    let old = std::fs::canonicalize(s.deploy_to.join("current")).unwrap();
    // the app writes into its own release dir after the deploy
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(old.join("d3/f3"), b"scribbled").unwrap();
    let out = push(&s, &v2, "v2");
    out.assert_exit(0);
    assert!(
        out.stderr.contains("delta: sending 3 of 51 files"),
        "the scribbled file is sent, not copied: {out}"
    );
    let new = std::fs::canonicalize(s.deploy_to.join("current")).unwrap();
    assert_eq!(
        std::fs::read(new.join("d3/f3")).unwrap(),
        noise(3, 4096 + 3)
    );
    // writing into the new release leaves the old one alone
    let before = std::fs::read(old.join("d2/f2")).unwrap();
    std::fs::write(new.join("d2/f2"), b"changed in v2").unwrap();
    assert_eq!(std::fs::read(old.join("d2/f2")).unwrap(), before);
}

#[test]
fn an_interrupted_delta_upload_leaves_nothing_behind() {
    let s = site();
    let v1 = artifact(&s, "v1", 20, 0, 0);
    push(&s, &v1, "v1").assert_exit(0);
    // v2 adds one big new file, so the delta still takes a while to send
    let v2 = artifact(&s, "v2", 20, 0, 150 << 20);
    let mut child = std::process::Command::new(bin("deployctl"))
        .current_dir(s.env.root())
        .args(["push", "test", "--version", "v2", "--artifact"])
        .arg(&v2)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let releases = s.deploy_to.join("releases");
    let deadline = Instant::now() + Duration::from_secs(30);
    let partial = loop {
        let p = std::fs::read_dir(&releases)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".partial"));
        if let Some(p) = p
            && p.join("big.bin").exists()
        {
            break p;
        }
        assert!(Instant::now() < deadline, "the delta upload never started");
        std::thread::sleep(Duration::from_millis(10));
    };
    child.kill().unwrap();
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (partial.exists() || s.deploy_to.join(".deploy/lock").exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!partial.exists(), "the partial release is gone");
    assert!(
        !s.deploy_to.join(".deploy/lock").exists(),
        "the lock is free"
    );
    assert!(!s.deploy_to.join(".deploy/journal.json").exists());
    assert_eq!(
        std::fs::read_to_string(s.deploy_to.join("current/VERSION")).unwrap(),
        "v1\n"
    );
    // and the next push goes through
    let v3 = artifact(&s, "v3", 20, 0, 0);
    push(&s, &v3, "v3").assert_exit(0);
}

// See: #14 (item 3). With one large file changed, the delta upload inflated the artifact,
// picked that file out and deflated it again: most bytes crossed anyway, and the default
// push took 2.5 times as long as --no-delta. Now the artifact goes as it is.
#[test]
fn when_most_bytes_must_cross_the_artifact_goes_whole() {
    let s = site();
    let v1 = artifact(&s, "v1", 20, 99, 1 << 20);
    // big.bin's seed depends on the version's length
    let v22 = artifact(&s, "v22", 20, 99, 1 << 20);
    push(&s, &v1, "v1").assert_exit(0);
    let out = push(&s, &v22, "v22");
    out.assert_exit(0);
    assert!(
        out.stderr.contains("delta: the host lacks") && out.stderr.contains("full upload"),
        "{out}"
    );
    assert!(!out.stderr.contains("delta: sending"), "{out}");
    let fresh = site();
    push(&fresh, &v22, "v22").assert_exit(0);
    assert_eq!(tree(&s.deploy_to), tree(&fresh.deploy_to));
    assert_eq!(content(&s), content(&fresh));
}
