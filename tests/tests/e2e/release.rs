//! The release strategy end to end: a real sshd, the real agent, the real `deployctl`, and
//! the sample app (examples/sample-app) served by `busybox httpd` on a free port.
//!
//! Every test that starts the app stops it again by PID (`shared/log/app.pid`), see
//! [`AppGuard`].

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use deployctl_e2e::{Agent, Output, SshdOptions, bin};
use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

use crate::support::Site;

// ---------------------------------------------------------------------------------------------
// Artifacts
// ---------------------------------------------------------------------------------------------

/// One file of a release tarball: path, content, mode.
pub(crate) type File = (String, Vec<u8>, u32);

fn sample_app_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sample-app")
}

fn sample(rel: &str) -> Vec<u8> {
    let p = sample_app_dir().join(rel);
    fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// The sample app with `VERSION` replaced by `version` in its pages.
pub(crate) fn app_files(version: &str) -> Vec<File> {
    let page = |rel: &str| {
        String::from_utf8(sample(rel))
            .unwrap()
            .replace("VERSION", version)
            .into_bytes()
    };
    vec![
        ("bin/migrate".into(), sample("bin/migrate"), 0o755),
        ("bin/restart".into(), sample("bin/restart"), 0o755),
        ("bin/stop".into(), sample("bin/stop"), 0o755),
        ("public/index.html".into(), page("public/index.html"), 0o644),
        (
            "public/api/v1/status/index.html".into(),
            page("public/api/v1/status/index.html"),
            0o644,
        ),
    ]
}

/// The sample app without its status page: the health check gets 404.
fn broken_files(version: &str) -> Vec<File> {
    app_files(version)
        .into_iter()
        .filter(|(p, _, _)| !p.starts_with("public/api/"))
        .collect()
}

/// Replaces one file's content.
fn with_file(mut files: Vec<File>, path: &str, content: &str) -> Vec<File> {
    let f = files
        .iter_mut()
        .find(|(p, _, _)| p == path)
        .unwrap_or_else(|| panic!("no {path} in the app"));
    f.1 = content.as_bytes().to_vec();
    files
}

/// A migration that fails, with recognisable output.
const FAILING_MIGRATE: &str = "#!/bin/sh\n\
echo \"migrating $DEPLOY_APP: relation users_v2 does not exist\"\n\
echo 'MIGRATION-BOOM' >&2\n\
exit 1\n";

fn tar_header(path: &str, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

pub(crate) fn tar_gz(files: &[File]) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    for (path, data, mode) in files {
        let h = tar_header(path, data.len() as u64, *mode);
        b.append(&h, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// xorshift64*: cheap incompressible bytes.
struct Noise {
    state: u64,
    left: u64,
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let max = (buf.len() as u64).min(self.left) as usize;
        let n = if max >= 8 { max - max % 8 } else { max };
        for chunk in buf[..n].chunks_mut(8) {
            let mut x = self.state;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.state = x;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn noise(len: u64, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize);
    Noise {
        state: seed | 1,
        left: len,
    }
    .read_to_end(&mut v)
    .unwrap();
    v
}

// Raw tar entries, for what `tar::Builder` refuses to write.

fn raw_entry(name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    {
        let old = h.as_old_mut();
        assert!(
            name.len() <= old.name.len(),
            "name too long for a raw header"
        );
        assert!(
            link.len() <= old.linkname.len(),
            "link too long for a raw header"
        );
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn raw_file(name: &str, data: &[u8]) -> Vec<u8> {
    raw_entry(name.as_bytes(), tar::EntryType::Regular, b"", data)
}

/// Raw entries, the end-of-archive blocks, gzip.
fn raw_tar_gz(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut tar: Vec<u8> = entries.concat();
    tar.extend_from_slice(&[0u8; 1024]);
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

// ---------------------------------------------------------------------------------------------
// The site with the app
// ---------------------------------------------------------------------------------------------

pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Stops the app server(s) this test started, by PID: the one in `shared/log/app.pid`, and,
/// as a safety net, any `busybox httpd` serving a release dir of this very `deploy_to` (a
/// unique temp path), e.g. one a restart started while the test was failing.
pub(crate) struct AppGuard {
    pub(crate) deploy_to: PathBuf,
}

impl AppGuard {
    fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        if let Ok(s) = fs::read_to_string(self.deploy_to.join("shared/log/app.pid"))
            && let Ok(pid) = s.trim().parse::<u32>()
            && is_our_server(pid, &self.deploy_to)
        {
            pids.push(pid);
        }
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && !pids.contains(&pid)
                && is_our_server(pid, &self.deploy_to)
            {
                pids.push(pid);
            }
        }
        pids
    }
}

/// Whether `pid` is an httpd serving a release under `deploy_to`.
fn is_our_server(pid: u32, deploy_to: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let releases = format!("{}/releases/", deploy_to.display());
    cmdline.contains("httpd") && cmdline.contains(&releases)
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    // A zombie (reaped by init later) counts as gone.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next())
                .is_some_and(|st| st != "Z")
        })
        .unwrap_or(false)
}

impl Drop for AppGuard {
    fn drop(&mut self) {
        let pids = self.pids();
        for &pid in &pids {
            kill(pid, "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        for &pid in &pids {
            if alive(pid) {
                kill(pid, "KILL");
            }
        }
    }
}

/// A [`Site`] plus the app's port; stops the app server on drop (before the site goes).
pub(crate) struct App {
    // Fields drop in declaration order: the app server first, then sshd/agent/temp dir.
    _guard: AppGuard,
    pub(crate) site: Site,
    pub(crate) port: u16,
}

impl App {
    pub(crate) fn new() -> App {
        App::with(SshdOptions::default())
    }

    fn with(opts: SshdOptions) -> App {
        let site = Site::ssh(opts);
        let port = free_port();
        let app = App {
            _guard: AppGuard {
                deploy_to: site.deploy_to.clone(),
            },
            site,
            port,
        };
        app.config(5, 5, "200ms");
        app
    }

    /// deploy.toml for the sample app.
    fn config(&self, keep: u32, retries: u32, interval: &str) {
        let port = self.port;
        self.site.write_config(
            &format!("keep_releases = {keep}"),
            &format!(
                r#"[defaults.release]
shared = ["log"]
migrate = "bin/migrate"
restart = "APP_PORT={port} APP_SERVER='busybox httpd -f' bin/restart"
stop = "bin/stop"
timeout = "30s"

[defaults.health]
url = "http://127.0.0.1:{port}/api/v1/status/"
retries = {retries}
interval = "{interval}"
request_timeout = "1s"
"#
            ),
        );
    }

    fn deploy_to(&self) -> &Path {
        &self.site.deploy_to
    }

    /// Writes a tarball of `files` into the test dir.
    pub(crate) fn artifact(&self, name: &str, files: &[File]) -> PathBuf {
        self.site
            .env
            .write(&format!("dist/{name}.tar.gz"), tar_gz(files))
    }

    pub(crate) fn push(&self, artifact: &Path, version: &str) -> Output {
        self.site.run(&[
            "push",
            "test",
            "--artifact",
            artifact.to_str().unwrap(),
            "--version",
            version,
        ])
    }

    /// Pushes `app_files(version)` and expects success; returns the new release id.
    pub(crate) fn push_ok(&self, version: &str) -> String {
        let art = self.artifact(version, &app_files(version));
        self.push(&art, version).assert_success();
        let id = current(self.deploy_to()).expect("current after a successful push");
        assert_serves(self.port, version);
        id
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path)
    }

    fn history(&self) -> Vec<serde_json::Value> {
        let out = self.site.run(&["history", "test", "--json"]);
        out.assert_success();
        out.json()["hosts"][0]["history"]
            .as_array()
            .unwrap_or_else(|| panic!("no history array: {out}"))
            .clone()
    }
}

/// The release `current` points at (`releases/<id>` → `<id>`).
pub(crate) fn current(deploy_to: &Path) -> Option<String> {
    let target = fs::read_link(deploy_to.join("current")).ok()?;
    let s = target.to_str()?.to_owned();
    Some(s.strip_prefix("releases/").unwrap_or(&s).to_owned())
}

fn meta(deploy_to: &Path, id: &str) -> serde_json::Value {
    let p = deploy_to.join(format!("releases/{id}/.deploy/release.json"));
    let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", p.display()))
}

/// Release dir names (complete and partial), sorted.
fn release_dirs(deploy_to: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(deploy_to.join("releases"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

fn partials(deploy_to: &Path) -> Vec<String> {
    release_dirs(deploy_to)
        .into_iter()
        .filter(|n| n.ends_with(".partial"))
        .collect()
}

fn journal(deploy_to: &Path) -> Option<serde_json::Value> {
    let text = fs::read_to_string(deploy_to.join(".deploy/journal.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// One plain HTTP/1.0 GET: (status, body); (0, error) when there is no answer.
pub(crate) fn http_get(port: u16, path: &str) -> (u16, String) {
    let attempt = || -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(
            &(Ipv4Addr::LOCALHOST, port).into(),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    };
    attempt().unwrap_or_else(|e| (0, format!("GET :{port}{path}: {e}")))
}

#[track_caller]
pub(crate) fn assert_serves(port: u16, version: &str) {
    let (code, body) = http_get(port, "/");
    assert_eq!(code, 200, "GET / -> {code}: {body}");
    assert!(
        body.contains(&format!("sample app, version {version}<")),
        "GET / should serve {version}: {body}"
    );
    let (code, body) = http_get(port, "/api/v1/status/");
    assert_eq!(code, 200, "status page -> {code}: {body}");
    assert!(
        body.contains(&format!("\"version\": \"{version}\"")),
        "{body}"
    );
}

#[track_caller]
fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn all_output(out: &Output) -> String {
    format!("{}\n{}", out.stdout, out.stderr)
}

// ---------------------------------------------------------------------------------------------
// deployctl in the background
// ---------------------------------------------------------------------------------------------

/// A `deployctl` child process, output to files; killed (by PID) on drop if still running.
struct Bg {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

fn spawn_deployctl(site: &Site, name: &str, args: &[&str]) -> Bg {
    let stdout = site.env.path(&format!("{name}.stdout"));
    let stderr = site.env.path(&format!("{name}.stderr"));
    let mut cmd = Command::new(bin("deployctl"));
    cmd.args(args)
        .current_dir(site.env.root())
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(fs::File::create(&stderr).unwrap());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DEPLOYCTL_") || k == "SSH_AUTH_SOCK" {
            cmd.env_remove(&k);
        }
    }
    Bg {
        child: cmd.spawn().expect("spawn deployctl"),
        stdout,
        stderr,
    }
}

impl Bg {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn output(&self, code: i32) -> Output {
        Output {
            code,
            stdout: fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }

    /// Waits for the exit; panics with the output so far after `timeout`.
    fn wait(&mut self, timeout: Duration) -> Output {
        use std::os::unix::process::ExitStatusExt;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let code = st
                    .code()
                    .or_else(|| st.signal().map(|s| 128 + s))
                    .unwrap_or(-1);
                return self.output(code);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "deployctl did not exit within {timeout:?}\n{}",
                    self.output(-1)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A deploy
// ---------------------------------------------------------------------------------------------

#[test]
fn push_deploys_serves_and_records_the_release() {
    let app = App::new();
    let d = app.deploy_to().to_path_buf();
    let mut files = app_files("v1");
    files.push(("bin/suid".into(), b"#!/bin/sh\n".to_vec(), 0o6755));
    let art = app.artifact("v1", &files);
    let out = app.site.run(&[
        "push",
        "test",
        "--artifact",
        art.to_str().unwrap(),
        "--version",
        "v1",
        "--json",
    ]);
    out.assert_success();
    let doc = out.json();

    assert_serves(app.port, "v1");
    let link = fs::read_link(d.join("current")).unwrap();
    let r1 = current(&d).unwrap();
    assert_eq!(link, Path::new("releases").join(&r1), "relative link");
    assert!(
        r1.len() == 14 && r1.bytes().all(|b| b.is_ascii_digit()),
        "release id is YYYYMMDDHHMMSS: {r1}"
    );
    assert!(d.join("releases").join(&r1).is_dir());
    let suid = fs::metadata(d.join("releases").join(&r1).join("bin/suid")).unwrap();
    assert_eq!(
        suid.mode() & 0o7777,
        0o755,
        "setuid/setgid bits are dropped"
    );

    let m = meta(&d, &r1);
    assert_eq!(m["id"], r1.as_str(), "{m}");
    assert_eq!(m["version"], "v1", "{m}");
    assert_eq!(m["status"], "live", "{m}");
    let sha = m["sha256"].as_str().unwrap_or_else(|| panic!("{m}"));
    assert!(
        sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
        "{sha}"
    );
    assert_eq!(
        sha,
        sha256_hex(&fs::read(&art).unwrap()),
        "sha256 of the tarball"
    );
    assert!(m["created"].as_str().is_some_and(|c| !c.is_empty()), "{m}");

    // migrate ran in the release dir, with DEPLOY_* set, writing through the shared log
    let migrations = fs::read_to_string(d.join("shared/log/migrations.log"))
        .expect("shared/log/migrations.log written by bin/migrate");
    assert_eq!(migrations.trim(), format!("{r1} v1"), "{migrations}");
    let log_link = fs::symlink_metadata(d.join("releases").join(&r1).join("log")).unwrap();
    assert!(
        log_link.file_type().is_symlink(),
        "log is linked from shared/"
    );
    assert_eq!(doc["exit_code"], 0, "{doc}");
    assert_eq!(doc["release"], r1.as_str(), "{doc}");
    let host = &doc["hosts"][0];
    assert_eq!(host["outcome"], "live", "{doc}");
    let migrate = host["report"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "migrate")
        .unwrap_or_else(|| panic!("a migrate step: {doc}"));
    assert!(
        migrate["output"]
            .as_str()
            .unwrap()
            .contains(&format!("migrating app to release {r1} (version v1)")),
        "the migrate output is kept for the report: {doc}"
    );
    let pid1 = fs::read_to_string(d.join("shared/log/app.pid")).unwrap();

    // v2 replaces it
    let art2 = app.artifact("v2", &app_files("v2"));
    app.push(&art2, "v2").assert_success();
    assert_serves(app.port, "v2");
    let r2 = current(&d).unwrap();
    assert!(r2 > r1, "{r2} sorts after {r1}");
    assert_eq!(meta(&d, &r2)["status"], "live");
    assert_eq!(meta(&d, &r1)["status"], "live", "v1 stays a live release");
    let pid2 = fs::read_to_string(d.join("shared/log/app.pid")).unwrap();
    assert_ne!(pid1, pid2, "restart started a new server");
    assert!(
        !alive(pid1.trim().parse().unwrap()),
        "the old server was stopped"
    );
    let migrations = fs::read_to_string(d.join("shared/log/migrations.log")).unwrap();
    assert_eq!(
        migrations.lines().collect::<Vec<_>>(),
        vec![format!("{r1} v1"), format!("{r2} v2")]
    );
    assert!(journal(&d).is_none(), "no journal after the deploy");
    assert!(partials(&d).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 2. A failed health check rolls back
// ---------------------------------------------------------------------------------------------

#[test]
fn failed_health_check_rolls_back_to_the_previous_release() {
    let app = App::new();
    let d = app.deploy_to().to_path_buf();
    let r1 = app.push_ok("v1");

    let art = app.artifact("v2-broken", &broken_files("v2"));
    let out = app.push(&art, "v2");
    out.assert_exit(1);
    let text = all_output(&out);
    assert!(text.contains("health check"), "{out}");
    assert!(
        text.contains("status 404"),
        "the last status is reported: {out}"
    );
    assert!(text.contains("rolled_back"), "{out}");

    assert_eq!(
        current(&d).as_deref(),
        Some(r1.as_str()),
        "current is back on v1"
    );
    assert_serves(app.port, "v1");
    let r2 = release_dirs(&d)
        .into_iter()
        .find(|r| r != &r1)
        .expect("v2's release dir is kept");
    assert_eq!(meta(&d, &r2)["status"], "rolled_back");
    assert_eq!(meta(&d, &r2)["version"], "v2");
    assert_eq!(meta(&d, &r1)["status"], "live");

    let history = app.history();
    let last = history.last().expect("history entries");
    assert_eq!(last["release"], r2.as_str(), "{history:?}");
    assert_eq!(last["version"], "v2");
    assert_eq!(last["outcome"], "rolled_back");
    assert_eq!(last["previous"], r1.as_str());
    assert!(
        last["error"].as_str().is_some_and(|e| e.contains("404")),
        "{last}"
    );
    assert!(journal(&d).is_none());

    // See: #18 (item 11). Rolling back to the release that was just rolled back was tried
    // (exit 1, seconds later) while a failed-migration release was refused: both are
    // refused now, at once, with exit 2 and the reason.
    let out = app.site.run(&["rollback", "test", "--to", "v2"]);
    out.assert_exit(2);
    assert!(
        all_output(&out).contains("failed its health check and was rolled back"),
        "{out}"
    );
    assert_eq!(current(&d).as_deref(), Some(r1.as_str()), "nothing changed");
    assert_eq!(app.history().len(), history.len(), "no new history entry");
}

// ---------------------------------------------------------------------------------------------
// 3. A failed migration stops before the switch
// ---------------------------------------------------------------------------------------------

#[test]
fn failed_migration_leaves_current_untouched() {
    let app = App::new();
    let d = app.deploy_to().to_path_buf();
    let r1 = app.push_ok("v1");
    let link_before = fs::read_link(d.join("current")).unwrap();
    let pid_before = fs::read_to_string(d.join("shared/log/app.pid")).unwrap();

    let files = with_file(app_files("v2"), "bin/migrate", FAILING_MIGRATE);
    let art = app.artifact("v2-badmigrate", &files);
    let out = app.push(&art, "v2");
    out.assert_exit(1);
    let text = all_output(&out);
    assert!(text.contains("migration failed"), "{out}");
    assert!(
        text.contains("relation users_v2 does not exist"),
        "the migrate stdout is in the report: {out}"
    );
    assert!(
        text.contains("MIGRATION-BOOM"),
        "the migrate stderr is in the report: {out}"
    );

    assert_eq!(fs::read_link(d.join("current")).unwrap(), link_before);
    assert_serves(app.port, "v1");
    assert_eq!(
        fs::read_to_string(d.join("shared/log/app.pid")).unwrap(),
        pid_before,
        "restart did not run"
    );
    let r2 = release_dirs(&d)
        .into_iter()
        .find(|r| r != &r1)
        .expect("the failed release dir is kept (for pruning later)");
    assert_eq!(meta(&d, &r2)["status"], "failed");
    let last = app.history().pop().unwrap();
    assert_eq!(last["outcome"], "failed");
    assert_eq!(last["release"], r2.as_str());
    assert!(journal(&d).is_none());
}

// ---------------------------------------------------------------------------------------------
// 4. Rollback
// ---------------------------------------------------------------------------------------------

#[test]
fn rollback_by_id_by_label_and_to_the_previous_release() {
    let app = App::new();
    let d = app.deploy_to().to_path_buf();
    let r1 = app.push_ok("v1");
    let r2 = app.push_ok("v2");

    // by label
    let out = app.site.run(&["rollback", "test", "--to", "v1"]);
    out.assert_success();
    assert_eq!(current(&d).as_deref(), Some(r1.as_str()), "{out}");
    assert_serves(app.port, "v1");

    // by id
    let out = app.site.run(&["rollback", "test", "--to", &r2]);
    out.assert_success();
    assert_eq!(current(&d).as_deref(), Some(r2.as_str()), "{out}");
    assert_serves(app.port, "v2");

    // no --to: the previous live release
    let out = app.site.run(&["rollback", "test"]);
    out.assert_success();
    assert_eq!(current(&d).as_deref(), Some(r1.as_str()), "{out}");
    assert_serves(app.port, "v1");
    // rolling back does not change a release's own status
    assert_eq!(meta(&d, &r1)["status"], "live");
    assert_eq!(meta(&d, &r2)["status"], "live");

    let history = app.history();
    let rollbacks: Vec<_> = history
        .iter()
        .filter(|h| h["action"] == "rollback")
        .map(|h| (h["release"].clone(), h["outcome"].clone()))
        .collect();
    assert_eq!(
        rollbacks,
        vec![
            (r1.as_str().into(), "live".into()),
            (r2.as_str().into(), "live".into()),
            (r1.as_str().into(), "live".into()),
        ],
        "{history:?}"
    );

    // a release that does not exist: usage error, nothing changes
    let releases_before = release_dirs(&d);
    let pid_before = fs::read_to_string(d.join("shared/log/app.pid")).unwrap();
    let out = app.site.run(&["rollback", "test", "--to", "nonexistent"]);
    out.assert_exit(2);
    assert!(all_output(&out).contains("nonexistent"), "{out}");
    assert!(all_output(&out).contains("nothing was changed"), "{out}");
    assert_eq!(current(&d).as_deref(), Some(r1.as_str()));
    assert_eq!(release_dirs(&d), releases_before);
    assert_eq!(app.history().len(), history.len(), "no history entry");
    assert_eq!(
        fs::read_to_string(d.join("shared/log/app.pid")).unwrap(),
        pid_before,
        "no restart"
    );
    assert_serves(app.port, "v1");
}

// ---------------------------------------------------------------------------------------------
// 5. Pruning
// ---------------------------------------------------------------------------------------------

#[test]
fn pruning_keeps_current_and_previous_and_drops_failed_first() {
    let app = App::new();
    let d = app.deploy_to().to_path_buf();
    app.config(2, 5, "200ms");
    let mut ids = Vec::new();
    for (i, v) in ["v1", "v2", "v3", "v4"].into_iter().enumerate() {
        ids.push(app.push_ok(v));
        assert_eq!(
            release_dirs(&d).len(),
            (i + 1).min(2),
            "after {v}: {:?}",
            release_dirs(&d)
        );
    }
    assert_eq!(
        release_dirs(&d),
        vec![ids[2].clone(), ids[3].clone()],
        "the current (v4) and the previous (v3) remain"
    );

    // keep 3: a failed release is pruned before an older live one
    app.config(3, 5, "200ms");
    let files = with_file(app_files("v5"), "bin/migrate", FAILING_MIGRATE);
    let art = app.artifact("v5-badmigrate", &files);
    app.push(&art, "v5").assert_exit(1);
    let failed = release_dirs(&d)
        .into_iter()
        .find(|r| !ids.contains(r))
        .expect("the failed release");
    assert_eq!(meta(&d, &failed)["status"], "failed");
    assert_eq!(
        release_dirs(&d),
        vec![ids[2].clone(), ids[3].clone(), failed.clone()],
        "a failed deploy prunes nothing"
    );
    let r6 = app.push_ok("v6");
    // 4 releases, keep 3: the failed one goes, not the oldest live one (v3)
    assert_eq!(
        release_dirs(&d),
        vec![ids[2].clone(), ids[3].clone(), r6.clone()],
        "failed {failed} pruned first"
    );
    // and then the oldest live one
    let r7 = app.push_ok("v7");
    assert_eq!(release_dirs(&d), vec![ids[3].clone(), r6, r7]);
}

// ---------------------------------------------------------------------------------------------
// 6. Hostile archives
// ---------------------------------------------------------------------------------------------

/// Every path under `root` (except the agent's log and socket) with what it is: file
/// content hash, symlink target, or "dir".
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new("agent/agent.log") || rel == Path::new("agent/agent.sock") {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(root, &p, out);
                "dir".into()
            } else if m.is_file() {
                format!(
                    "file {} nlink {} {}",
                    m.mode() & 0o7777,
                    m.nlink(),
                    sha256_hex(&fs::read(&p).unwrap())
                )
            } else {
                format!("special {:?}", m.file_type())
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A site with v1 deployed (no app server: no restart, no health) and a sentinel file next
/// to `deploy_to`.
struct Hostile {
    site: Site,
    sentinel: PathBuf,
}

impl Hostile {
    fn new() -> Hostile {
        let site = Site::ssh(SshdOptions::default());
        site.write_config(
            "",
            "[defaults.release]\nshared = [\"log\"]\nmigrate = \"bin/migrate\"\n",
        );
        let sentinel = site.agent.root.join("sentinel");
        fs::write(&sentinel, "do not touch\n").unwrap();
        let art = site.env.write("dist/v1.tar.gz", tar_gz(&app_files("v1")));
        site.run(&[
            "push",
            "test",
            "--artifact",
            art.to_str().unwrap(),
            "--version",
            "v1",
        ])
        .assert_success();
        Hostile { site, sentinel }
    }

    /// Pushes `bytes` as the artifact; expects it refused (exit 1) with nothing changed
    /// anywhere; returns the output.
    fn refused(&self, name: &str, bytes: Vec<u8>) -> Output {
        let art = self.site.env.write(&format!("dist/{name}.tar.gz"), bytes);
        let d = &self.site.deploy_to;
        let link = fs::read_link(d.join("current")).unwrap();
        let before = snapshot(self.site.env.root());
        let out = self.site.run(&[
            "push",
            "test",
            "--artifact",
            art.to_str().unwrap(),
            "--version",
            "evil",
        ]);
        out.assert_exit(1);
        assert!(
            all_output(&out).contains("artifact refused"),
            "refused as a bad artifact: {out}"
        );
        assert!(all_output(&out).contains("nothing was changed"), "{out}");
        assert_eq!(fs::read_link(d.join("current")).unwrap(), link, "current");
        assert!(partials(d).is_empty(), "{:?}", release_dirs(d));
        assert!(journal(d).is_none(), "no journal left");
        // the session ends (and frees the lock) when the agent sees the connection close
        wait_until(Duration::from_secs(5), "the lock is freed", || {
            !d.join(".deploy/lock").exists()
        });
        assert_eq!(
            fs::read_to_string(&self.sentinel).unwrap(),
            "do not touch\n"
        );
        assert_eq!(fs::metadata(&self.sentinel).unwrap().nlink(), 1);
        let after = snapshot(self.site.env.root());
        let changed: Vec<_> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .chain(before.iter().filter(|(k, _)| !after.contains_key(*k)))
            .collect();
        assert!(
            changed.is_empty(),
            "files changed by a refused push: {changed:#?}\n{out}"
        );
        // a refused upload is not a deploy: no history entry
        let history = self.site.run(&["history", "test", "--json"]);
        history.assert_success();
        assert_eq!(
            history.json()["hosts"][0]["history"]
                .as_array()
                .unwrap()
                .len(),
            1,
            "a refused upload is not a deploy: {history}"
        );
        out
    }
}

#[track_caller]
fn assert_names(out: &Output, entry: &str) {
    let quoted = format!("{entry:?}");
    assert!(
        all_output(out).contains(&quoted),
        "the bad entry {quoted} is named: {out}"
    );
}

#[test]
fn hostile_archive_parent_dir_entry_is_refused() {
    let h = Hostile::new();
    let tgz = raw_tar_gz(&[
        raw_file("public/index.html", b"ok"),
        raw_file("../evil", b"pwned"),
    ]);
    let out = h.refused("dotdot", tgz);
    assert_names(&out, "../evil");
    assert!(all_output(&out).contains("`..`"), "{out}");
    assert!(!h.site.deploy_to.join("releases/evil").exists());
}

#[test]
fn hostile_archive_absolute_path_is_refused() {
    let h = Hostile::new();
    let target = h.site.env.path("evil-abs");
    let name = target.to_str().unwrap();
    let tgz = raw_tar_gz(&[
        raw_file("public/index.html", b"ok"),
        raw_file(name, b"pwned"),
    ]);
    let out = h.refused("absolute", tgz);
    assert_names(&out, name);
    assert!(all_output(&out).contains("absolute"), "{out}");
    assert!(!target.exists());
}

#[test]
fn hostile_archive_symlink_outside_is_refused() {
    let h = Hostile::new();
    let tgz = raw_tar_gz(&[
        raw_file("public/index.html", b"ok"),
        raw_entry(b"link", tar::EntryType::Symlink, b"../../..", b""),
        // if the link were made, this would land next to deploy_to
        raw_file("link/evil", b"pwned"),
    ]);
    let out = h.refused("symlink", tgz);
    assert_names(&out, "link");
    assert!(all_output(&out).contains("../../.."), "{out}");
    assert!(!h.site.agent.root.join("evil").exists());
    // an absolute target too
    let tgz = raw_tar_gz(&[
        raw_entry(b"abs", tar::EntryType::Symlink, b"/etc", b""),
        raw_file("abs/evil", b"pwned"),
    ]);
    let out = h.refused("symlink-abs", tgz);
    assert_names(&out, "abs");
    assert!(!Path::new("/etc/evil").exists());
}

#[test]
fn hostile_archive_hardlink_outside_is_refused() {
    let h = Hostile::new();
    let target = h.sentinel.to_str().unwrap().to_owned();
    let tgz = raw_tar_gz(&[
        raw_file("public/index.html", b"ok"),
        raw_entry(b"hl", tar::EntryType::Link, target.as_bytes(), b""),
    ]);
    let out = h.refused("hardlink", tgz);
    assert_names(&out, "hl");
    assert!(all_output(&out).contains("hard link"), "{out}");
    // the relative spelling too
    let tgz = raw_tar_gz(&[raw_entry(
        b"hl2",
        tar::EntryType::Link,
        b"../../../sentinel",
        b"",
    )]);
    let out = h.refused("hardlink-rel", tgz);
    assert_names(&out, "hl2");
}

#[test]
fn hostile_archive_fifo_is_refused() {
    let h = Hostile::new();
    let tgz = raw_tar_gz(&[
        raw_file("public/index.html", b"ok"),
        raw_entry(b"pipe", tar::EntryType::Fifo, b"", b""),
    ]);
    let out = h.refused("fifo", tgz);
    assert_names(&out, "pipe");
}

#[test]
fn hostile_archive_char_device_is_refused() {
    let h = Hostile::new();
    let tgz = raw_tar_gz(&[
        raw_file("public/index.html", b"ok"),
        raw_entry(b"public/null", tar::EntryType::Char, b"", b""),
    ]);
    let out = h.refused("chardev", tgz);
    assert_names(&out, "public/null");
}

#[test]
fn hostile_archive_corrupt_gzip_is_refused() {
    let h = Hostile::new();
    // See: #18 (item 4). What is not a gzip'd tar at all is refused before connecting
    // (exit 2, naming the file), instead of by the server after the upload.
    let mut random = noise(64 * 1024, 7);
    random[0] = 0x00; // not even a gzip magic
    let mut badgzip = noise(64 * 1024, 11);
    badgzip[..3].copy_from_slice(&[0x1f, 0x8b, 0x08]); // gzip magic, then garbage
    let d = &h.site.deploy_to;
    let link = fs::read_link(d.join("current")).unwrap();
    let releases = release_dirs(d);
    for (name, bytes) in [("random", random), ("badgzip", badgzip)] {
        let art = h.site.env.write(&format!("dist/{name}.tar.gz"), bytes);
        let out = h
            .site
            .run(&["push", "test", "--artifact", art.to_str().unwrap()]);
        out.assert_exit(2);
        let text = all_output(&out);
        assert!(text.contains(&format!("{name}.tar.gz")), "{out}");
        assert!(text.contains("is not a .tar.gz"), "{out}");
        assert!(!d.join(".deploy/lock").exists(), "never locked");
        assert_eq!(fs::read_link(d.join("current")).unwrap(), link, "current");
        assert_eq!(release_dirs(d), releases, "nothing new on the server");
    }
    // A gzip stream that goes bad after its first block gets past that check; the agent
    // refuses it.
    let mut files = app_files("v2");
    files.push(("public/blob.bin".into(), noise(256 * 1024, 5), 0o644));
    let mut gz = tar_gz(&files);
    let mid = gz.len() / 2;
    for b in &mut gz[mid..mid + 64] {
        *b ^= 0xff;
    }
    let out = h.refused("corrupt-middle", gz);
    assert!(all_output(&out).contains("corrupt"), "{out}");
}

#[test]
fn hostile_archive_truncated_is_refused() {
    let h = Hostile::new();
    // big enough that the cut lands inside the data, not in the trailer
    let mut files = app_files("v2");
    files.push(("public/blob.bin".into(), noise(256 * 1024, 3), 0o644));
    let full = tar_gz(&files);
    let cut = full[..full.len() * 2 / 3].to_vec();
    let out = h.refused("truncated", cut);
    assert!(all_output(&out).contains("corrupt"), "{out}");
    // a complete gzip stream around a tar cut short (no end-of-archive blocks)
    let mut tar = raw_file("public/index.html", b"ok");
    tar.extend(raw_file("public/more.html", &[b'x'; 2048]));
    tar.truncate(512 + 512 + 512 + 1024); // inside the second file's data
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&tar).unwrap();
    let out = h.refused("truncated-tar", gz.finish().unwrap());
    assert!(all_output(&out).contains("corrupt"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// 7. The controller dies mid-upload
// ---------------------------------------------------------------------------------------------

#[test]
fn controller_killed_mid_upload_leaves_nothing_and_frees_the_lock() {
    let app = App::new();
    let d = app.deploy_to().to_path_buf();
    // 150 MiB of noise, stored (not compressed), streamed to disk
    let big = app.site.env.path("dist/big.tar.gz");
    fs::create_dir_all(big.parent().unwrap()).unwrap();
    {
        let f = fs::File::create(&big).unwrap();
        let mut b = tar::Builder::new(GzEncoder::new(
            std::io::BufWriter::new(f),
            Compression::none(),
        ));
        for (path, data, mode) in app_files("v1") {
            b.append(&tar_header(&path, data.len() as u64, mode), data.as_slice())
                .unwrap();
        }
        let len = 150 * 1024 * 1024;
        b.append(
            &tar_header("public/blob.bin", len, 0o644),
            Noise {
                state: 0x9E37_79B9_7F4A_7C15,
                left: len,
            },
        )
        .unwrap();
        b.into_inner().unwrap().finish().unwrap().flush().unwrap();
    }

    let mut bg = spawn_deployctl(
        &app.site,
        "big",
        &[
            "push",
            "test",
            "--artifact",
            big.to_str().unwrap(),
            "--version",
            "v1",
        ],
    );
    // wait until data is arriving in releases/<id>.partial
    let blob_size = || {
        partials(&d)
            .first()
            .and_then(|p| fs::metadata(d.join("releases").join(p).join("public/blob.bin")).ok())
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while blob_size() < 1024 * 1024 {
        assert!(
            bg.running(),
            "deployctl ended before the upload was under way: {}",
            bg.output(-1)
        );
        assert!(
            Instant::now() < deadline,
            "no upload data in a .partial dir after 30 s: {:?}",
            release_dirs(&d)
        );
        thread::sleep(Duration::from_millis(10));
    }
    bg.child.kill().unwrap(); // SIGKILL, by PID
    bg.child.wait().unwrap();

    wait_until(
        Duration::from_secs(10),
        "the .partial dir is removed",
        || partials(&d).is_empty(),
    );
    wait_until(Duration::from_secs(10), "the journal is cleared", || {
        journal(&d).is_none()
    });
    assert!(
        release_dirs(&d).is_empty(),
        "nothing left behind: {:?}",
        release_dirs(&d)
    );
    assert!(current(&d).is_none());

    // the lock is free: a new push goes through at once
    let art = app.artifact("v2", &app_files("v2"));
    let out = app.push(&art, "v2");
    out.assert_success();
    assert_serves(app.port, "v2");
    assert!(journal(&d).is_none(), "no journal after the push");
    assert_eq!(release_dirs(&d).len(), 1, "{:?}", release_dirs(&d));
}

// ---------------------------------------------------------------------------------------------
// 8. The agent dies while a broken release waits for health
// ---------------------------------------------------------------------------------------------

#[test]
fn agent_killed_during_health_check_recovers_by_rolling_back() {
    let mut app = App::new();
    let d = app.deploy_to().to_path_buf();
    app.config(5, 40, "250ms");
    let r1 = app.push_ok("v1");

    let art = app.artifact("v2-broken", &broken_files("v2"));
    let mut bg = spawn_deployctl(
        &app.site,
        "v2",
        &[
            "push",
            "test",
            "--artifact",
            art.to_str().unwrap(),
            "--version",
            "v2",
        ],
    );
    let mut r2 = String::new();
    wait_until(
        Duration::from_secs(20),
        "current points at v2 and the journal says checking",
        || {
            let Some(j) = journal(&d) else { return false };
            let cur = current(&d);
            if j["phase"] == "checking" && cur.as_deref() == j["release"].as_str() {
                r2 = cur.unwrap();
                true
            } else {
                false
            }
        },
    );
    assert_ne!(r2, r1);
    app.site.agent.kill9();
    let out = bg.wait(Duration::from_secs(15));
    assert_ne!(out.code, 0, "the controller lost its agent: {out}");
    // still mid-deploy on disk
    assert_eq!(current(&d).as_deref(), Some(r2.as_str()));
    assert_eq!(journal(&d).expect("journal survives")["phase"], "checking");

    // a new agent on the same socket finishes the deploy: health fails, so it rolls back
    app.site.agent = Agent::start(&app.site.env.path("agent"));
    wait_until(
        Duration::from_secs(25),
        "the restarted agent has finished recovering",
        || journal(&d).is_none(),
    );
    assert_eq!(
        current(&d).as_deref(),
        Some(r1.as_str()),
        "back on v1\n--- agent log ---\n{}",
        app.site.agent.log()
    );
    assert_serves(app.port, "v1");
    assert_eq!(meta(&d, &r2)["status"], "rolled_back");
    let history = app.history();
    let entry = history
        .iter()
        .rev()
        .find(|h| h["release"] == r2.as_str())
        .unwrap_or_else(|| panic!("a history entry for v2: {history:?}"));
    assert_eq!(entry["outcome"], "rolled_back", "{entry}");
    assert_eq!(entry["version"], "v2");
    // and the app takes new work again
    app.config(5, 5, "200ms");
    app.push_ok("v3");
}

// ---------------------------------------------------------------------------------------------
// 9. Concurrent pushes
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_push_is_locked_out_then_waits_with_lock_wait() {
    let app = App::new();
    let d = app.deploy_to().to_path_buf();
    let slow = format!(
        "#!/bin/sh\nsleep 5\n{}",
        String::from_utf8(sample("bin/migrate")).unwrap()
    );
    let art1 = app.artifact("v1-slow", &with_file(app_files("v1"), "bin/migrate", &slow));
    let art2 = app.artifact("v2", &app_files("v2"));

    let mut first = spawn_deployctl(
        &app.site,
        "first",
        &[
            "push",
            "test",
            "--artifact",
            art1.to_str().unwrap(),
            "--version",
            "v1",
        ],
    );
    wait_until(
        Duration::from_secs(15),
        "the first push is migrating",
        || journal(&d).is_some_and(|j| j["phase"] == "migrating"),
    );

    let out = app.push(&art2, "v2");
    out.assert_exit(4);
    assert!(out.stderr.contains("is being deployed by"), "{out}");
    assert!(
        out.stderr.contains("(version v1)"),
        "names the holder's version: {out}"
    );
    assert!(
        out.stderr.contains("--lock-wait"),
        "suggests --lock-wait: {out}"
    );

    let mut third = spawn_deployctl(
        &app.site,
        "third",
        &[
            "push",
            "test",
            "--artifact",
            art2.to_str().unwrap(),
            "--version",
            "v2",
            "--lock-wait",
            "30s",
        ],
    );
    thread::sleep(Duration::from_millis(500));
    assert!(
        first.running(),
        "the first push should still hold the lock here (migrate sleeps 5 s)"
    );
    assert!(
        third.running(),
        "the third push waits: {}",
        third.output(-1)
    );

    let out1 = first.wait(Duration::from_secs(30));
    out1.assert_success();
    let out3 = third.wait(Duration::from_secs(40));
    out3.assert_success();
    assert!(
        out3.stderr.contains("waiting for the deploy lock"),
        "{out3}"
    );
    assert_serves(app.port, "v2");

    let history = app.history();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[0]["version"], "v1");
    assert_eq!(history[0]["outcome"], "live");
    assert_eq!(history[1]["version"], "v2");
    assert_eq!(history[1]["outcome"], "live");
    assert!(
        history[1]["started"].as_str().unwrap() >= history[0]["finished"].as_str().unwrap(),
        "the third push started after the first finished: {history:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Over the exec bridge
// ---------------------------------------------------------------------------------------------

#[test]
fn push_works_over_the_exec_bridge_fallback() {
    let app = App::with(SshdOptions {
        allow_streamlocal: false,
        ..Default::default()
    });
    let r1 = app.push_ok("v1");
    assert!(
        app.site.sshd().log().contains("refused streamlocal"),
        "the direct channel was refused, so the bridge carried the deploy"
    );
    assert_eq!(meta(app.deploy_to(), &r1)["status"], "live");
    let (code, _) = app.get("/api/v1/status/");
    assert_eq!(code, 200);
}

// ---------------------------------------------------------------------------------------------
// 11. status and releases
// ---------------------------------------------------------------------------------------------

#[test]
fn status_and_releases_report_the_current_release() {
    let app = App::new();
    let r1 = app.push_ok("v1");
    let r2 = app.push_ok("v2");

    let out = app.site.run(&["status", "test", "--json"]);
    out.assert_success();
    let doc = out.json();
    let s = &doc["hosts"][0]["status"];
    assert_eq!(s["current"]["id"], r2.as_str(), "{doc}");
    assert_eq!(s["current"]["version"], "v2", "{doc}");
    assert_eq!(s["current"]["status"], "live", "{doc}");
    assert_eq!(s["health"]["healthy"], true, "{doc}");
    assert_eq!(s["last"]["outcome"], "live", "{doc}");
    assert_eq!(s["last"]["release"], r2.as_str(), "{doc}");
    assert!(s["lock"].is_null(), "{doc}");

    let out = app.site.run(&["status", "test"]);
    out.assert_success();
    assert!(out.stdout.contains("healthy"), "{out}");
    assert!(out.stdout.contains(&r2), "{out}");

    let out = app.site.run(&["releases", "test", "--json"]);
    out.assert_success();
    let doc = out.json();
    let list = doc["hosts"][0]["releases"].as_array().unwrap();
    let ids: Vec<&str> = list.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![r1.as_str(), r2.as_str()], "{doc}");
    let current: Vec<&str> = list
        .iter()
        .filter(|r| r["current"] == true)
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(current, vec![r2.as_str()], "exactly one current: {doc}");
    assert_eq!(list[0]["version"], "v1");
    assert_eq!(list[1]["version"], "v2");

    // when the app is down, status says so
    let pid = fs::read_to_string(app.deploy_to().join("shared/log/app.pid")).unwrap();
    let pid: u32 = pid.trim().parse().unwrap();
    kill(pid, "TERM");
    wait_until(Duration::from_secs(5), "the app server stopped", || {
        !alive(pid)
    });
    let out = app.site.run(&["status", "test", "--json"]);
    out.assert_success();
    assert_eq!(
        out.json()["hosts"][0]["status"]["health"]["healthy"],
        false,
        "{out}"
    );
}
