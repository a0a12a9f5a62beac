//! Issue #16, hostile input and faults on the input side: labels, history, state writes on
//! a full disk, secrets in command logs, log pruning, and archives built to burn the
//! agent's CPU or memory. Real sshd, real agent, real `deployctl`; the full-disk tests
//! run the app on a small tmpfs (needs root to mount; fails under `CI=true` without it).

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use deployctl_e2e::{Output, SshdOptions};
use flate2::Compression;
use flate2::write::GzEncoder;

use crate::support::Site;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn tgz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn push(site: &Site, artifact: &Path, version: &str, env: &[(&str, &str)]) -> Output {
    site.run_env(
        &[
            "push",
            "test",
            "--artifact",
            artifact.to_str().unwrap(),
            "--version",
            version,
        ],
        env,
    )
}

fn current(deploy_to: &Path) -> Option<String> {
    fs::read_link(deploy_to.join("current"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn meta(deploy_to: &Path, id: &str) -> serde_json::Value {
    let p = deploy_to
        .join("releases")
        .join(id)
        .join(".deploy/release.json");
    serde_json::from_slice(&fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn all_output(out: &Output) -> String {
    format!("{out}")
}

/// `VmHWM` (peak resident memory) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz: u64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100);
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// A tmpfs of `size` mounted at `path`, unmounted on drop. `None` (after a note) when it
/// cannot be mounted outside CI; a panic under `CI=true`.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(path.to_owned())),
            other => {
                let why = format!(
                    "cannot mount a tmpfs at {} (needs root): {other:?}",
                    path.display()
                );
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("{why}");
                }
                eprintln!("SKIPPED: {why}");
                None
            }
        }
    }

    fn path(&self) -> PathBuf {
        self.0.clone()
    }
}

/// Writes zeros into `dir/name` until the filesystem is full.
fn fill(dir: &Path, name: &str) {
    {
        let mut f = fs::File::create(dir.join(name)).unwrap();
        let block = vec![0u8; 64 * 1024];
        loop {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        // Also the last partial pages.
        while f.write(&[0u8; 512]).map(|n| n > 0).unwrap_or(false) {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An HTTP health endpoint on loopback answering 200; the first request after `arm` is
/// set runs `on_armed` first (e.g. fills the disk), so a fault lands exactly in the
/// health check, after the journal's last write and before the confirm step.
struct Health {
    port: u16,
    armed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Health {
    fn start(on_armed: impl Fn() + Send + 'static) -> Health {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (armed.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = [0u8; 1024];
                        let _ = c.read(&mut buf);
                        if a.swap(false, Ordering::SeqCst) {
                            on_armed();
                        }
                        let _ = c.write_all(
                            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Health { port, armed, stop }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn config(site: &Site, keep: u32, health_port: Option<u16>, restart: &str) {
    let health = health_port
        .map(|p| {
            format!(
                "[defaults.health]\nurl = \"http://127.0.0.1:{p}/\"\nretries = 3\ninterval = \"200ms\"\nrequest_timeout = \"2s\"\n"
            )
        })
        .unwrap_or_default();
    site.write_config(
        &format!("keep_releases = {keep}\nsecrets = [\"DB_PASSWORD\"]"),
        &format!("[defaults.release]\nrestart = \"{restart}\"\ntimeout = \"30s\"\n\n{health}"),
    );
}

// ---------------------------------------------------------------------------------------------
// #16.7 labels
// ---------------------------------------------------------------------------------------------

// See: #16 (item 7)
#[test]
fn long_or_control_labels_are_refused_and_tables_never_panic() {
    let site = Site::ssh(SshdOptions::default());
    config(&site, 5, None, "true");
    let art = site
        .env
        .write("dist/a.tar.gz", tgz(&[("index.html", b"v1")]));

    let long = "x".repeat(100_000);
    for bad in [long.as_str(), "v1\n\u{1b}[31mred"] {
        let out = push(&site, &art, bad, &[]);
        out.assert_exit(2);
        assert!(
            all_output(&out).contains("version label"),
            "the error names the label: {out}"
        );
        assert!(
            all_output(&out).len() < 5_000,
            "the label is not echoed back"
        );
    }
    assert!(current(&site.deploy_to).is_none(), "nothing was deployed");

    push(&site, &art, "v1", &[]).assert_success();
    let id = current(&site.deploy_to).unwrap();
    // Data written before labels were checked (an older agent, a hand edit): the tables
    // still render, cut to a sane width.
    let meta_path = site
        .deploy_to
        .join("releases")
        .join(&id)
        .join(".deploy/release.json");
    let mut m = meta(&site.deploy_to, &id);
    m["version"] = serde_json::json!(long);
    fs::write(&meta_path, serde_json::to_vec(&m).unwrap()).unwrap();
    let hist = site.deploy_to.join(".deploy/history.jsonl");
    let mut line: serde_json::Value =
        serde_json::from_str(fs::read_to_string(&hist).unwrap().lines().next().unwrap()).unwrap();
    line["version"] = serde_json::json!(long);
    let mut f = fs::OpenOptions::new().append(true).open(&hist).unwrap();
    writeln!(f, "{line}").unwrap();
    drop(f);
    for cmd in ["releases", "history", "status"] {
        let out = site.run(&[cmd, "test"]);
        out.assert_success();
        assert!(
            out.stdout.lines().all(|l| l.chars().count() < 2_000),
            "{cmd}: rows are cut"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// #16.12 bad history lines
// ---------------------------------------------------------------------------------------------

// See: #16 (item 12)
#[test]
fn bad_history_lines_are_skipped_and_reported_the_rest_is_shown() {
    let site = Site::ssh(SshdOptions::default());
    config(&site, 5, None, "true");
    let a = site
        .env
        .write("dist/a.tar.gz", tgz(&[("index.html", b"v1")]));
    push(&site, &a, "v1", &[]).assert_success();
    let hist = site.deploy_to.join(".deploy/history.jsonl");
    let mut f = fs::OpenOptions::new().append(true).open(&hist).unwrap();
    // A line with a byte that is not UTF-8, then a torn line without its newline.
    f.write_all(b"{\"action\":\"deploy\",\"release\":\"\xff\"}\n{\"action\":\"dep")
        .unwrap();
    drop(f);
    let b = site
        .env
        .write("dist/b.tar.gz", tgz(&[("index.html", b"v2")]));
    push(&site, &b, "v2", &[]).assert_success();

    let out = site.run(&["history", "test", "--json"]);
    out.assert_success();
    let doc = out.json();
    let versions: Vec<&str> = doc["hosts"][0]["history"]
        .as_array()
        .unwrap_or_else(|| panic!("no history: {out}"))
        .iter()
        .filter_map(|e| e["version"].as_str())
        .collect();
    assert_eq!(versions, ["v1", "v2"], "{out}");
    assert_eq!(doc["hosts"][0]["skipped_lines"], 2, "{out}");
    let text = site.run(&["history", "test"]);
    text.assert_success();
    assert!(text.stderr.contains("unreadable line"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// #16.11 a full disk during confirm
// ---------------------------------------------------------------------------------------------

// See: #16 (item 11)
#[test]
fn a_full_disk_at_confirm_fails_the_deploy_and_leaves_history_whole() {
    let site = Site::ssh(SshdOptions::default());
    // Declared after `site`: unmounted before the site's temp dir goes.
    let Some(tmpfs) = Tmpfs::mount(&site.deploy_to, "8m") else {
        return;
    };
    let mnt = tmpfs.path();
    let health = Health::start(move || fill(&mnt, "filler"));
    config(&site, 5, Some(health.port), "true");

    let a = site
        .env
        .write("dist/a.tar.gz", tgz(&[("index.html", b"v1")]));
    push(&site, &a, "v1", &[]).assert_success();
    let first = current(&site.deploy_to).unwrap();

    // End the history file 96 bytes short of a page boundary, so a full disk tears the
    // next line part way (tmpfs still has room in the file's last page).
    let hist = site.deploy_to.join(".deploy/history.jsonl");
    let line = fs::read_to_string(&hist).unwrap();
    let line = line.trim_end();
    let pad = 4000 - line.len() - 1;
    let padded = format!("{} {}}}\n", &line[..line.len() - 1], " ".repeat(pad - 1));
    assert_eq!(padded.len(), 4000);
    fs::write(&hist, &padded).unwrap();

    // The disk fills during the health check: confirm cannot write release.json.
    health.armed.store(true, Ordering::SeqCst);
    let b = site
        .env
        .write("dist/b.tar.gz", tgz(&[("index.html", b"v2")]));
    let out = push(&site, &b, "v2", &[]);
    out.assert_exit(1);
    assert!(
        all_output(&out).contains("disk is full"),
        "the report says why: {out}"
    );
    let now = current(&site.deploy_to).unwrap();
    assert_eq!(now, first, "back on the previous release");
    assert_eq!(meta(&site.deploy_to, &now)["status"], "live");

    // Space again: the next push works and every history line is readable.
    fs::remove_file(site.deploy_to.join("filler")).unwrap();
    let c = site
        .env
        .write("dist/c.tar.gz", tgz(&[("index.html", b"v3")]));
    push(&site, &c, "v3", &[]).assert_success();
    let text = fs::read(&hist).unwrap();
    for l in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        serde_json::from_slice::<serde_json::Value>(l).unwrap_or_else(|e| {
            panic!(
                "unreadable history line {:?}: {e}",
                String::from_utf8_lossy(l)
            )
        });
    }
    let out = site.run(&["history", "test", "--json"]);
    let versions: Vec<String> = out.json()["hosts"][0]["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["version"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(versions.first().map(String::as_str), Some("v1"));
    assert_eq!(versions.last().map(String::as_str), Some("v3"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// #16.15 a full disk while unpacking
// ---------------------------------------------------------------------------------------------

// See: #16 (item 15, the unpack part)
#[test]
fn a_full_disk_while_unpacking_is_not_called_a_refused_artifact() {
    let site = Site::ssh(SshdOptions::default());
    let Some(_tmpfs) = Tmpfs::mount(&site.deploy_to, "4m") else {
        return;
    };
    config(&site, 5, None, "true");
    // 16 MiB of zeros: a tiny artifact (passes the free-space check) that does not fit.
    let blob = vec![0u8; 16 * 1024 * 1024];
    let a = site.env.write("dist/a.tar.gz", tgz(&[("blob", &blob)]));
    let out = push(&site, &a, "v1", &[]);
    out.assert_exit(1);
    let text = all_output(&out);
    assert!(!text.contains("artifact refused"), "{out}");
    assert!(text.contains("the disk is full"), "{out}");
    assert!(
        text.contains(&site.deploy_to.display().to_string()) && text.contains("free of"),
        "names the filesystem and its free space: {out}"
    );
    assert!(current(&site.deploy_to).is_none());
    assert!(
        fs::read_dir(site.deploy_to.join("releases"))
            .unwrap()
            .next()
            .is_none(),
        "the partial release is gone"
    );
}

// ---------------------------------------------------------------------------------------------
// #16.6 secrets on disk, #16.13 logs pruned
// ---------------------------------------------------------------------------------------------

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

// See: #16 (items 6 and 13)
#[test]
fn command_logs_are_masked_private_and_pruned_with_their_releases() {
    let site = Site::ssh(SshdOptions::default());
    let secret = "hunter2-s3cr3t-value";
    config(&site, 2, None, "echo connecting with ${DB_PASSWORD}");
    let env = [("DB_PASSWORD", secret)];
    for i in 0..6 {
        let art = site.env.write(
            &format!("dist/{i}.tar.gz"),
            tgz(&[("index.html", format!("v{i}").as_bytes())]),
        );
        let out = push(&site, &art, &format!("v{i}"), &env);
        out.assert_success();
        assert!(!all_output(&out).contains(secret));
    }
    let state = site.deploy_to.join(".deploy");
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, ".deploy is private");
    assert_eq!(mode(&state.join("logs")), 0o700, ".deploy/logs is private");
    let mut files = Vec::new();
    files_under(&state, &mut files);
    let mut saw_log = false;
    for f in &files {
        let text = fs::read(f).unwrap();
        assert!(
            !String::from_utf8_lossy(&text).contains(secret),
            "{} holds the secret",
            f.display()
        );
        // (`lock` names who deploys; it is lock.rs's file and may still be there.)
        if f.file_name().is_some_and(|n| n != "lock") {
            assert_eq!(mode(f) & 0o077, 0, "{} is private", f.display());
        }
        if f.extension().is_some_and(|e| e == "log") {
            saw_log = true;
            assert!(String::from_utf8_lossy(&text).contains("connecting with ***"));
        }
    }
    assert!(saw_log, "the restart output is kept, masked");
    // Logs only for the releases still on disk.
    let releases: Vec<String> = fs::read_dir(site.deploy_to.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(releases.len() <= 3, "{releases:?}");
    for e in fs::read_dir(state.join("logs")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let id = name.split('.').next().unwrap();
        assert!(
            releases.iter().any(|r| r == id),
            "log {name} outlived its release ({releases:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// #16.4, #16.5 archives built to burn CPU or memory
// ---------------------------------------------------------------------------------------------

/// 300 repeats of one 2,000-deep directory (about 4 KB compressed).
pub(crate) fn deep_archive() -> Vec<u8> {
    let deep = "d/".repeat(2000);
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::best()));
    for _ in 0..300 {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, &deep, std::io::empty()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// Many small entries (which used to grow the unpacker's allowance), then a GNU long
/// name of 100 MiB (which used to be read whole, then echoed twice in the error).
pub(crate) fn long_name_bomb() -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_path("d/").unwrap();
    h.set_cksum();
    for _ in 0..20_000 {
        gz.write_all(h.as_bytes()).unwrap();
    }
    let len: usize = 100 * 1024 * 1024;
    let mut l = tar::Header::new_gnu();
    l.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    l.set_entry_type(tar::EntryType::GNULongName);
    l.set_mode(0o644);
    l.set_size(len as u64);
    l.set_cksum();
    gz.write_all(l.as_bytes()).unwrap();
    let chunk = vec![b'a'; 1024 * 1024];
    for _ in 0..len / chunk.len() {
        gz.write_all(&chunk).unwrap();
    }
    let mut f = tar::Header::new_gnu();
    f.set_size(0);
    f.set_mode(0o644);
    f.set_path("x").unwrap();
    f.set_cksum();
    gz.write_all(f.as_bytes()).unwrap();
    gz.write_all(&[0u8; 1024]).unwrap();
    gz.finish().unwrap()
}

// See: #16 (items 4 and 5)
#[test]
fn hostile_archives_are_refused_within_bounded_cpu_and_memory() {
    for (name, data, expect) in [
        ("deep", deep_archive(), "components"),
        ("long-name", long_name_bomb(), "GNU long name"),
    ] {
        let site = Site::ssh(SshdOptions::default());
        config(&site, 5, None, "true");
        let art = site.env.write(&format!("dist/{name}.tar.gz"), &data);
        let pid = site.agent.pid();
        let cpu0 = cpu_time(pid);
        let t = Instant::now();
        let out = push(&site, &art, "v1", &[]);
        let cpu = cpu_time(pid) - cpu0;
        let rss = peak_rss_kib(pid);
        eprintln!(
            "{name}: {} bytes compressed, agent CPU {cpu:?}, peak RSS {rss} KiB, wall {:?}",
            data.len(),
            t.elapsed()
        );
        // Refused, nothing switched: exit 1 (not 5), a short error naming the limit.
        out.assert_exit(1);
        let text = all_output(&out);
        assert!(
            text.contains("artifact refused") && text.contains(expect),
            "{name}: {out}"
        );
        assert!(
            text.len() < 20_000,
            "{name}: the error is cut ({} bytes)",
            text.len()
        );
        assert!(
            rss < 64 * 1024,
            "{name}: the agent's peak memory was {rss} KiB, over 64 MiB"
        );
        assert!(current(&site.deploy_to).is_none());
    }
}
