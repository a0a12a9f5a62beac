//! Issue #16 (agent sessions, locks, shutdown, recovery) and #12.6 (lock release race):
//! the real agent, over a real sshd where the controller is involved, and a raw
//! WebSocket client on the agent's socket where a test needs a misbehaving controller.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use deployctl_e2e::{Agent, Output, SshdOptions, bin, run};
use proto::{AppRef, ErrorCode, Request, Response};

use crate::release::{app_files, tar_gz};
use crate::support::Site;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Polls `f` every 50 ms until it holds or `limit` passes; false on timeout.
fn poll(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status();
}

/// A `deployctl` running in the background, killed (by PID) on drop.
struct Bg {
    child: Option<Child>,
}

impl Bg {
    fn spawn(site: &Site, args: &[&str]) -> Bg {
        let mut cmd = Command::new(bin("deployctl"));
        cmd.args(args)
            .current_dir(site.env.root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DEPLOYCTL_") || k == "SSH_AUTH_SOCK" {
                cmd.env_remove(&k);
            }
        }
        Bg {
            child: Some(cmd.spawn().expect("spawn deployctl")),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            kill(c.id(), "-CONT");
            let _ = c.wait();
        }
    }
}

fn lock_file(deploy_to: &Path) -> PathBuf {
    deploy_to.join(".deploy/lock")
}

fn journal_phase(deploy_to: &Path) -> Option<String> {
    let text = fs::read_to_string(deploy_to.join(".deploy/journal.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["phase"].as_str().map(str::to_owned)
}

fn current(deploy_to: &Path) -> Option<String> {
    let t = fs::read_link(deploy_to.join("current")).ok()?;
    t.file_name()?.to_str().map(str::to_owned)
}

fn release_status(deploy_to: &Path, id: &str) -> String {
    let p = deploy_to.join(format!("releases/{id}/.deploy/release.json"));
    let v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&p).unwrap_or_default()).unwrap_or_default();
    v["status"].as_str().unwrap_or_default().to_owned()
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after the comm field: state is [0], utime is field 14 overall → [11], stime [12]
    f.get(11).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// An artifact of `files` in the site's test dir.
fn artifact(site: &Site, name: &str, files: &[(String, Vec<u8>, u32)]) -> PathBuf {
    site.env
        .write(&format!("dist/{name}.tar.gz"), tar_gz(files))
}

/// A release with no commands: just files.
fn plain_files(version: &str) -> Vec<(String, Vec<u8>, u32)> {
    vec![
        ("VERSION".into(), version.as_bytes().to_vec(), 0o644),
        (
            "public/index.html".into(),
            format!("hello {version}").into_bytes(),
            0o644,
        ),
    ]
}

fn push(site: &Site, art: &Path, version: &str) -> Output {
    site.run(&[
        "push",
        "test",
        "--artifact",
        art.to_str().unwrap(),
        "--version",
        version,
    ])
}

/// An agent config file in the site's test dir with `body` (the agent's flags give the
/// socket and the allowed root).
fn agent_config(env_dir: &Path, body: &str) -> PathBuf {
    let p = env_dir.join("agent-extra.toml");
    fs::write(&p, body).unwrap();
    p
}

/// A site whose agent reads `agent_toml` too.
fn site_with_agent_config(agent_toml: &str) -> Site {
    let mut site = Site::ssh(SshdOptions::default());
    let cfg = agent_config(site.env.root(), agent_toml);
    // Replace the default agent with one that reads the config.
    let dir = site.env.path("agent");
    site.agent.kill9();
    site.agent = Agent::start_with(&dir, &["--config", cfg.to_str().unwrap()]);
    site
}

/// A health endpoint on loopback: 200 when `<deploy_to>/current/HEALTHY` exists, else
/// 503. Stops when dropped.
struct HealthServer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl HealthServer {
    fn start(deploy_to: &Path) -> HealthServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let marker = deploy_to.join("current/HEALTHY");
        thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut r = BufReader::new(s.try_clone().unwrap());
                        let mut line = String::new();
                        while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                            line.clear();
                        }
                        let (code, body) = if marker.exists() {
                            ("200 OK", "ok")
                        } else {
                            ("503 Service Unavailable", "down")
                        };
                        let _ = write!(
                            s,
                            "HTTP/1.0 {code}\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        HealthServer { port, stop }
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn health_tail(port: u16, retries: u32, interval: &str) -> String {
    format!(
        r#"[defaults.health]
url = "http://127.0.0.1:{port}/"
retries = {retries}
interval = "{interval}"
request_timeout = "1s"
"#
    )
}

/// ~48 MiB that does not compress, so its upload lasts a while.
fn big_artifact(site: &Site) -> PathBuf {
    let mut big = plain_files("big");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let blob: Vec<u8> = (0..48 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    big.push(("blob".into(), blob, 0o644));
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::none(),
    ));
    for (p, data, mode) in &big {
        let mut h = tar::Header::new_gnu();
        h.set_path(p).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    site.env
        .write("dist/big.tar.gz", b.into_inner().unwrap().finish().unwrap())
}

// ---------------------------------------------------------------------------------------------
// A raw WebSocket client on the agent's socket (a controller that misbehaves on purpose)
// ---------------------------------------------------------------------------------------------

struct Raw {
    s: UnixStream,
}

impl Raw {
    /// Connects, upgrades to WebSocket and exchanges hello.
    fn connect(socket: &Path) -> Raw {
        let mut s = UnixStream::connect(socket).expect("connect to the agent");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET /v1 HTTP/1.1\r\nHost: deploy-agent\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).expect("upgrade answer");
            head.push(b[0]);
        }
        assert!(
            String::from_utf8_lossy(&head).contains(" 101 "),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut raw = Raw { s };
        raw.send(&Request::Hello(proto::Hello {
            protocol: proto::PROTOCOL_VERSION,
            version: "raw-test".into(),
        }));
        match raw.recv() {
            Some(Response::Hello(_)) => raw,
            other => panic!("expected hello, got {other:?}"),
        }
    }

    fn frame(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut f = vec![0x80 | opcode];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n < 65536 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        let mask = [1u8, 2, 3, 4];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f)
    }

    fn send(&mut self, r: &Request) {
        let text = serde_json::to_string(r).unwrap();
        self.frame(1, text.as_bytes()).expect("send a request");
    }

    fn send_data(&mut self, d: &[u8]) -> std::io::Result<()> {
        self.frame(2, d)
    }

    /// The next text message, or None when the connection ends.
    fn recv(&mut self) -> Option<Response> {
        loop {
            let mut h = [0u8; 2];
            self.s.read_exact(&mut h).ok()?;
            let op = h[0] & 0x0f;
            let mut n = (h[1] & 0x7f) as u64;
            if n == 126 {
                let mut b = [0u8; 2];
                self.s.read_exact(&mut b).ok()?;
                n = u16::from_be_bytes(b) as u64;
            } else if n == 127 {
                let mut b = [0u8; 8];
                self.s.read_exact(&mut b).ok()?;
                n = u64::from_be_bytes(b);
            }
            let mut p = vec![0u8; n as usize];
            self.s.read_exact(&mut p).ok()?;
            match op {
                1 => return Some(serde_json::from_slice(&p).expect("a response")),
                8 => return None,
                _ => continue,
            }
        }
    }
}

fn app_ref(deploy_to: &Path) -> AppRef {
    AppRef {
        name: "app".into(),
        deploy_to: deploy_to.display().to_string(),
        instance: None,
    }
}

fn spec() -> proto::ReleaseSpec {
    proto::ReleaseSpec {
        shared: Vec::new(),
        migrate: None,
        restart: None,
        stop: None,
        command_timeout_ms: 30_000,
        keep_releases: 5,
        health: None,
        max_unpacked_bytes: 1 << 30,
        compose: None,
        instance: None,
        redact: Vec::new(),
        hooks: None,
        notify: None,
        cutover: None,
    }
}

// ---------------------------------------------------------------------------------------------
// #16.2: a descriptor flood does not stop the agent
// ---------------------------------------------------------------------------------------------

#[test]
fn a_descriptor_flood_does_not_keep_status_out() {
    // See: #16
    let mut site = Site::ssh(SshdOptions::default());
    // The agent under the usual 1,024-descriptor limit.
    let wrapper = site.env.write(
        "agent-1024.sh",
        format!(
            "#!/bin/sh\nulimit -n 1024 || exit 99\nexec {} \"$@\"\n",
            bin("deploy-agent").display()
        ),
    );
    fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let dir = site.env.path("agent");
    site.agent.kill9();
    site.agent = Agent::start_program(&wrapper, &dir, &[]);
    let pid = site.agent.pid();
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 1024 ")),
        "{limits}"
    );
    site.write_config("", "");
    let cpu_before = cpu_ticks(pid);

    // 1,100 silent connections, opened from a thread (a connect may block while the
    // agent's backlog is full: the test must not hang on it).
    let conns = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    {
        let conns = conns.clone();
        let done = done.clone();
        let socket = site.agent.socket.clone();
        thread::spawn(move || {
            for _ in 0..1100 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                match UnixStream::connect(&socket) {
                    Ok(s) => conns.lock().unwrap().push(s),
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
            done.store(true, Ordering::SeqCst);
        });
    }
    poll(Duration::from_secs(30), || done.load(Ordering::SeqCst));
    done.store(true, Ordering::SeqCst);
    let opened = conns.lock().unwrap().len();

    // With all of them still open, status over sshd gets in.
    let started = Instant::now();
    let out = site.run_env(&["status", "test"], &[("DEPLOYCTL_E2E_TIMEOUT_SECS", "90")]);
    let took = started.elapsed();
    let log_len = fs::metadata(&site.agent.log_file).map(|m| m.len()).unwrap();
    let cpu = cpu_ticks(pid).saturating_sub(cpu_before);
    eprintln!(
        "flood: {opened} connections opened, status took {took:?}, agent log {log_len} bytes, \
         agent CPU {cpu} ticks"
    );
    out.assert_success();
    assert!(
        opened >= 1000,
        "only {opened} of 1100 connections got in\n{}",
        site.agent.log()
    );
    assert!(took < Duration::from_secs(60), "status took {took:?}");
    assert!(
        log_len < 64 * 1024,
        "the agent logged {log_len} bytes during the flood"
    );
    // A spinning accept loop burns a full core: 100 ticks per second of the test.
    assert!(
        cpu < 1500,
        "the agent used {cpu} ticks of CPU during the flood"
    );
    drop(conns);
}

// ---------------------------------------------------------------------------------------------
// #16.3: a silent lock holder loses the lock
// ---------------------------------------------------------------------------------------------

#[test]
fn a_silent_session_holding_the_lock_loses_it_after_the_idle_timeout() {
    // See: #16
    let site = site_with_agent_config("idle_timeout_secs = 3\n");
    site.write_config("", "");
    let d = site.deploy_to.clone();
    fs::create_dir_all(&d).unwrap();
    let mut raw = Raw::connect(&site.agent.socket);
    raw.send(&Request::Lock(proto::Lock {
        app: app_ref(&d),
        holder: "silent@test".into(),
        version: None,
        wait_ms: 0,
    }));
    match raw.recv() {
        Some(Response::Lock(info)) => assert_eq!(info.holder, "silent@test"),
        other => panic!("expected the lock, got {other:?}"),
    }
    assert!(lock_file(&d).exists());
    // The holder says nothing more (its socket stays open). Within the idle timeout
    // (3 s here) plus a generous margin, the lock is free and a push goes through.
    assert!(
        poll(Duration::from_secs(30), || !lock_file(&d).exists()),
        "the silent session still holds the lock\n{}",
        site.agent.log()
    );
    let art = artifact(&site, "v1", &plain_files("v1"));
    push(&site, &art, "v1").assert_success();
    assert!(
        site.agent.log().contains("freeing its lock"),
        "{}",
        site.agent.log()
    );
    drop(raw);
}

// ---------------------------------------------------------------------------------------------
// #16.10: the lock is freed when the deploy ends, whatever became of the session
// ---------------------------------------------------------------------------------------------

#[test]
fn the_lock_is_freed_when_the_deploy_ends_even_if_the_controller_went_silent() {
    // See: #16
    let site = Site::ssh(SshdOptions::default());
    let d = site.deploy_to.clone();
    site.write_config("", "");
    let v1 = artifact(&site, "v1", &plain_files("v1"));
    push(&site, &v1, "v1").assert_success();

    // v2 waits for a health check that never passes (~6 s), then rolls back.
    let health = HealthServer::start(&d);
    site.write_config("", &health_tail(health.port, 12, "500ms"));
    let v2 = artifact(&site, "v2", &plain_files("v2"));
    let bg = Bg::spawn(
        &site,
        &[
            "push",
            "test",
            "--artifact",
            v2.to_str().unwrap(),
            "--version",
            "v2",
        ],
    );
    assert!(
        poll(Duration::from_secs(30), || journal_phase(&d).as_deref()
            == Some("checking")),
        "v2 never reached the health check\n{}",
        site.agent.log()
    );
    // The controller goes silent (no FIN, no RST: its process is stopped).
    kill(bg.pid(), "-STOP");
    // The deploy ends on its own (rolled back)...
    assert!(
        poll(Duration::from_secs(60), || journal_phase(&d).is_none()),
        "the deploy did not end\n{}",
        site.agent.log()
    );
    // ...and with it the lock, though the silent session is still open.
    assert!(
        poll(Duration::from_secs(5), || !lock_file(&d).exists()),
        "the lock outlived the deploy\n{}",
        site.agent.log()
    );
    site.write_config("", "");
    let v3 = artifact(&site, "v3", &plain_files("v3"));
    push(&site, &v3, "v3").assert_success();
    drop(bg);
}

// ---------------------------------------------------------------------------------------------
// #12.6: the lock is released before the agent reports the deploy's end
// ---------------------------------------------------------------------------------------------

#[test]
fn back_to_back_pushes_each_find_the_lock_free() {
    // See: #12
    let site = Site::ssh(SshdOptions::default());
    let d = site.deploy_to.clone();
    site.write_config("", "");
    // A refused artifact (a character device) in between: its push frees the lock too.
    let mut hostile = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_path("dev-null").unwrap();
    h.set_entry_type(tar::EntryType::Char);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_cksum();
    hostile.append(&h, std::io::empty()).unwrap();
    let hostile = site.env.write(
        "dist/hostile.tar.gz",
        hostile.into_inner().unwrap().finish().unwrap(),
    );
    let mut leftovers = Vec::new();
    for i in 0..10 {
        let version = format!("v{i}");
        let out = if i % 3 == 2 {
            let out = push(&site, &hostile, &version);
            out.assert_exit(1);
            out
        } else {
            let art = artifact(&site, &version, &plain_files(&version));
            let out = push(&site, &art, &version);
            out.assert_success();
            out
        };
        // Right after deployctl exited: no lock, neither on disk nor in the agent.
        if lock_file(&d).exists() {
            leftovers.push(format!("after push {i}: {}", out.stderr));
        }
    }
    assert!(
        leftovers.is_empty(),
        "the lock outlived {} of 10 pushes: {leftovers:?}",
        leftovers.len()
    );
}

#[test]
fn a_controller_killed_mid_upload_frees_the_lock_within_seconds() {
    // See: #12
    let site = Site::ssh(SshdOptions::default());
    let d = site.deploy_to.clone();
    site.write_config("", "");
    let art = big_artifact(&site);
    let mut bg = Bg::spawn(
        &site,
        &[
            "push",
            "test",
            "--artifact",
            art.to_str().unwrap(),
            "--version",
            "big",
        ],
    );
    assert!(
        poll(Duration::from_secs(30), || lock_file(&d).exists()),
        "the push never took the lock\n{}",
        site.agent.log()
    );
    kill(bg.pid(), "-KILL");
    if let Some(mut c) = bg.child.take() {
        let _ = c.wait();
    }
    let killed = Instant::now();
    assert!(
        poll(Duration::from_secs(10), || !lock_file(&d).exists()),
        "the lock is still held 10 s after the controller was killed\n{}",
        site.agent.log()
    );
    eprintln!("lock free {:?} after kill -9", killed.elapsed());
    let v1 = artifact(&site, "v1", &plain_files("v1"));
    push(&site, &v1, "v1").assert_success();
}

// ---------------------------------------------------------------------------------------------
// #16.8: one app, one lock, whatever the spelling of deploy_to
// ---------------------------------------------------------------------------------------------

#[test]
fn a_symlink_to_the_app_dir_shares_its_lock() {
    // See: #16
    let site = Site::ssh(SshdOptions::default());
    let d = site.deploy_to.clone();
    fs::create_dir_all(&d).unwrap();
    let alias = site.agent.root.join("alias");
    std::os::unix::fs::symlink(&d, &alias).unwrap();
    let health = HealthServer::start(&d);
    site.write_config("", &health_tail(health.port, 12, "500ms"));
    let v1 = artifact(&site, "v1", &plain_files("v1"));
    let bg = Bg::spawn(
        &site,
        &[
            "push",
            "test",
            "--artifact",
            v1.to_str().unwrap(),
            "--version",
            "v1",
        ],
    );
    assert!(
        poll(Duration::from_secs(30), || journal_phase(&d).as_deref()
            == Some("checking")),
        "v1 never reached the health check\n{}",
        site.agent.log()
    );
    // The same app through the symlink, while v1 is in flight: locked (exit 4).
    let text = site.env.read("deploy.toml").replace(
        &format!("deploy_to = \"{}\"", d.display()),
        &format!("deploy_to = \"{}\"", alias.display()),
    );
    assert!(text.contains(alias.to_str().unwrap()));
    let other = site.env.path("alias-env");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("deploy.toml"), text).unwrap();
    fs::create_dir_all(other.join("dist")).unwrap();
    let v2 = other.join("dist/v2.tar.gz");
    fs::write(&v2, tar_gz(&plain_files("v2"))).unwrap();
    let out = deployctl_e2e::deployctl(
        &other,
        &[
            "push",
            "test",
            "--artifact",
            v2.to_str().unwrap(),
            "--version",
            "v2",
        ],
        &[],
    );
    out.assert_exit(4);
    drop(bg);
}

// ---------------------------------------------------------------------------------------------
// #16.14: SIGTERM during an upload
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_during_an_upload_cleans_up_and_tells_the_controller() {
    // See: #16
    let env = deployctl_e2e::TestEnv::new();
    let agent = Agent::start(&env.path("a"));
    let d = agent.root.join("app");
    let mut raw = Raw::connect(&agent.socket);
    let data = tar_gz(&app_files("v1"));
    raw.send(&Request::Push(proto::Push {
        app: app_ref(&d),
        release: "20260101000000".into(),
        version: Some("v1".into()),
        holder: "raw@test".into(),
        size: data.len() as u64 * 1000,
        skip_migrations: true,
        spec: spec(),
        expect_content: None,
        origin: None,
        check: proto::StreamCheck::Sha256,
    }));
    match raw.recv() {
        Some(Response::PushReady(_)) => {}
        other => panic!("expected push_ready, got {other:?}"),
    }
    // Part of the upload, then the agent is told to stop.
    raw.send_data(&data[..data.len() / 2]).unwrap();
    assert!(
        poll(Duration::from_secs(10), || d
            .join("releases/20260101000000.partial")
            .exists()),
        "no partial release"
    );
    kill(agent.pid(), "-TERM");
    match raw.recv() {
        Some(Response::Error(e)) => {
            assert_eq!(e.code, ErrorCode::ShuttingDown, "{e:?}");
            assert!(e.message.contains("shutting down"), "{}", e.message);
        }
        other => panic!(
            "expected a shutting_down error, got {other:?}\n{}",
            agent.log()
        ),
    }
    assert!(
        poll(Duration::from_secs(20), || agent
            .log()
            .contains("deploy-agent stopped")),
        "{}",
        agent.log()
    );
    assert!(
        !d.join("releases/20260101000000.partial").exists(),
        "partial release left behind"
    );
    assert!(
        !d.join(".deploy/journal.json").exists(),
        "journal left behind"
    );
}

// ---------------------------------------------------------------------------------------------
// #16.14: a deleted current release
// ---------------------------------------------------------------------------------------------

#[test]
fn a_deleted_current_release_is_named_and_never_a_rollback_target() {
    // See: #16
    let site = Site::ssh(SshdOptions::default());
    let d = site.deploy_to.clone();
    let health = HealthServer::start(&d);
    site.write_config("", &health_tail(health.port, 4, "200ms"));
    let mut healthy = plain_files("v1");
    healthy.push(("HEALTHY".into(), b"yes".to_vec(), 0o644));
    let v1 = artifact(&site, "v1", &healthy);
    push(&site, &v1, "v1").assert_success();
    let r1 = current(&d).unwrap();
    let mut healthy2 = plain_files("v2");
    healthy2.push(("HEALTHY".into(), b"yes".to_vec(), 0o644));
    let v2 = artifact(&site, "v2", &healthy2);
    push(&site, &v2, "v2").assert_success();
    let r2 = current(&d).unwrap();
    assert_ne!(r1, r2);
    fs::remove_dir_all(d.join("releases").join(&r2)).unwrap();

    let out = site.run(&["status", "test"]);
    assert!(
        out.stdout.contains("does not exist") || out.stderr.contains("does not exist"),
        "status does not say the current release is missing:\n{out}"
    );
    // A broken v3 rolls back to v1, which exists, and says so (exit 1, not 5).
    let v3 = artifact(&site, "v3", &plain_files("v3"));
    let out = push(&site, &v3, "v3");
    out.assert_exit(1);
    assert_eq!(current(&d).as_deref(), Some(r1.as_str()), "{out}");
}

// ---------------------------------------------------------------------------------------------
// #16.14: a truncated journal
// ---------------------------------------------------------------------------------------------

#[test]
fn recovery_decides_from_disk_when_the_journal_is_unreadable() {
    // See: #16
    let mut site = Site::ssh(SshdOptions::default());
    let d = site.deploy_to.clone();
    let health = HealthServer::start(&d);
    site.write_config("", &health_tail(health.port, 4, "200ms"));
    let mut healthy = plain_files("v1");
    healthy.push(("HEALTHY".into(), b"yes".to_vec(), 0o644));
    let v1 = artifact(&site, "v1", &healthy);
    push(&site, &v1, "v1").assert_success();
    let r1 = current(&d).unwrap();

    // v2 never turns healthy; the agent dies during its health wait.
    site.write_config("", &health_tail(health.port, 200, "500ms"));
    let v2 = artifact(&site, "v2", &plain_files("v2"));
    let bg = Bg::spawn(
        &site,
        &[
            "push",
            "test",
            "--artifact",
            v2.to_str().unwrap(),
            "--version",
            "v2",
        ],
    );
    assert!(
        poll(Duration::from_secs(30), || journal_phase(&d).as_deref()
            == Some("checking")),
        "v2 never reached the health check\n{}",
        site.agent.log()
    );
    let r2 = current(&d).unwrap();
    assert_ne!(r1, r2);
    site.agent.kill9();
    drop(bg);
    // The journal is torn.
    let j = d.join(".deploy/journal.json");
    let text = fs::read(&j).unwrap();
    fs::write(&j, &text[..text.len() / 2]).unwrap();

    site.agent = Agent::start(&site.env.path("agent"));
    assert!(
        poll(Duration::from_secs(20), || !j.exists()),
        "the torn journal was left as it was\n{}",
        site.agent.log()
    );
    assert_eq!(
        current(&d).as_deref(),
        Some(r1.as_str()),
        "current is not back on the live release\n{}",
        site.agent.log()
    );
    // Recovery moves the journal aside first, then marks the release: wait for the mark.
    assert!(
        poll(Duration::from_secs(20), || release_status(&d, &r2)
            == "rolled_back"),
        "v2 is {} after recovery\n{}",
        release_status(&d, &r2),
        site.agent.log()
    );
    let out = site.run(&["status", "test", "--json"]);
    out.assert_success();
    let doc = out.json();
    let last = &doc["hosts"][0]["status"]["last"];
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("journal unreadable")),
        "status does not show what recovery did: {doc}"
    );
    // and the app takes new work again
    site.write_config("", "");
    let v3 = artifact(&site, "v3", &plain_files("v3"));
    push(&site, &v3, "v3").assert_success();
}

// ---------------------------------------------------------------------------------------------
// #16.15: check outside the roots; an unknown socket group
// ---------------------------------------------------------------------------------------------

#[test]
fn check_says_nothing_about_paths_outside_the_allowed_roots() {
    // See: #16
    let env = deployctl_e2e::TestEnv::new();
    let agent = Agent::start(&env.path("a"));
    let mut raw = Raw::connect(&agent.socket);
    for outside in ["/etc", "/nonexistent-dir", "/"] {
        raw.send(&Request::Check(proto::Check {
            deploy_to: Some(outside.into()),
        }));
        match raw.recv() {
            Some(Response::Check(c)) => {
                let p = c.deploy_to.expect("a path check");
                assert!(!p.allowed, "{p:?}");
                assert!(!p.exists, "{outside}: existence leaked: {p:?}");
                assert_eq!(p.free_bytes, None, "{outside}: free space leaked: {p:?}");
            }
            other => panic!("expected a check reply, got {other:?}"),
        }
    }
    // Inside the root it still answers.
    fs::create_dir_all(agent.root.join("app")).unwrap();
    raw.send(&Request::Check(proto::Check {
        deploy_to: Some(agent.root.join("app").display().to_string()),
    }));
    match raw.recv() {
        Some(Response::Check(c)) => {
            let p = c.deploy_to.unwrap();
            assert!(p.allowed && p.exists && p.free_bytes.is_some(), "{p:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unknown_socket_group_is_named_and_leaves_no_socket() {
    // See: #16
    let env = deployctl_e2e::TestEnv::new();
    let root = env.mkdir("srv");
    let socket = env.path("agent.sock");
    let out = run(
        &bin("deploy-agent"),
        env.root(),
        &[
            "serve",
            "--socket",
            socket.to_str().unwrap(),
            "--allowed-root",
            root.to_str().unwrap(),
            "--socket-group",
            "no-such-group-e2e",
        ],
        &[],
    );
    assert_ne!(out.code, 0, "{out}");
    assert!(out.stderr.contains("no-such-group-e2e"), "{out}");
    assert!(
        fs::symlink_metadata(&socket).is_err(),
        "a dead socket file was left behind: {}",
        socket.display()
    );
}
