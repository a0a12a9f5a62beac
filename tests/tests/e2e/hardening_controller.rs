//! Issue #16, items 1 and 9: deployctl never hangs when its agent, the sshd session under
//! it, or the network goes away in the middle of a push. Each case ends within [`BOUND`]
//! with a documented exit code (docs/exit-codes.md) and a message naming
//! `deployctl status ENV`.
//!
//! The faults are real: SIGKILL / SIGTERM to the real agent, SIGKILL to the real sshd's
//! per-connection processes, and SIGSTOP of those processes for a network that goes silent
//! without a reset (TCP stays open, nothing answers). Every process a test stops is
//! continued and killed by PID when the test ends, pass or fail.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use deployctl_e2e::{Output, SshdOptions, bin};
use flate2::Compression;
use flate2::write::GzEncoder;

use crate::support::Site;

/// How long deployctl may take to give up after the fault ("well under a minute" is the
/// goal: SSH keepalives find a silent peer in about 20 s).
const BOUND: Duration = Duration::from_secs(60);

/// Exit codes from docs/exit-codes.md.
const CONNECT: i32 = 3;
const NEEDS_HUMAN: i32 = 5;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Pseudo-random bytes (xorshift), so gzip cannot shrink them.
struct Noise {
    state: u64,
    left: u64,
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let max = (buf.len() as u64).min(self.left) as usize;
        let n = max - max % 8;
        let n = if n == 0 { max } else { n };
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

fn header(path: &str, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

/// A `.tar.gz` holding `public/index.html` and `public/blob.bin` of `mib` MiB of noise,
/// stored (not compressed), streamed to disk.
fn big_artifact(site: &Site, mib: u64) -> PathBuf {
    let path = site.env.path("dist/big.tar.gz");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = fs::File::create(&path).unwrap();
    let mut b = tar::Builder::new(GzEncoder::new(
        std::io::BufWriter::new(f),
        Compression::none(),
    ));
    let page = b"<h1>big</h1>\n";
    b.append(
        &header("public/index.html", page.len() as u64, 0o644),
        &page[..],
    )
    .unwrap();
    let len = mib * 1024 * 1024;
    b.append(
        &header("public/blob.bin", len, 0o644),
        Noise {
            state: 0x9E37_79B9_7F4A_7C15,
            left: len,
        },
    )
    .unwrap();
    b.into_inner().unwrap().finish().unwrap().flush().unwrap();
    path
}

/// A small `.tar.gz` with one page.
fn small_artifact(site: &Site) -> PathBuf {
    let path = site.env.path("dist/small.tar.gz");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let page = b"<h1>small</h1>\n";
    b.append(
        &header("public/index.html", page.len() as u64, 0o644),
        &page[..],
    )
    .unwrap();
    fs::write(&path, b.into_inner().unwrap().finish().unwrap()).unwrap();
    path
}

/// deployctl running in the background, output to files; killed (by PID) on drop.
struct Bg {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Bg {
    fn push(site: &Site, artifact: &Path) -> Bg {
        Bg::spawn(
            site,
            &[
                "push",
                "test",
                "--artifact",
                artifact.to_str().unwrap(),
                "--version",
                "v1",
            ],
        )
    }

    fn spawn(site: &Site, args: &[&str]) -> Bg {
        let stdout = site.env.path(&format!("{}.stdout", args[0]));
        let stderr = site.env.path(&format!("{}.stderr", args[0]));
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

    /// Waits up to `limit` for deployctl to exit; kills it (by PID) and fails the test
    /// when it does not. Returns its output and how long it took.
    fn wait(&mut self, limit: Duration, what: &str) -> (Output, Duration) {
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    let code = status.code().unwrap_or(-1);
                    return (self.output(code), start.elapsed());
                }
                Ok(None) if start.elapsed() < limit => thread::sleep(Duration::from_millis(50)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "deployctl did not exit within {limit:?} after {what} (killed it): {}",
                        self.output(-1)
                    );
                }
                Err(e) => panic!("waiting for deployctl: {e}"),
            }
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// The `.partial` release dir the agent unpacks into, if one exists.
fn partial(deploy_to: &Path) -> Option<PathBuf> {
    fs::read_dir(deploy_to.join("releases"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".partial"))
}

/// Bytes of `public/blob.bin` unpacked so far.
fn unpacked(deploy_to: &Path) -> u64 {
    partial(deploy_to)
        .and_then(|p| fs::metadata(p.join("public/blob.bin")).ok())
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Sends `sig` (`"KILL"`, `"STOP"`, ...) to `pid`, a process this test started or a child of
/// one it started, with kill(1).
fn signal(pid: u32, sig: &str) -> bool {
    assert!(pid > 0, "no process to signal");
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// PIDs of the live descendants of `root` (sshd's per-connection processes), from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or("");
        let ppid: u32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if state != "Z" {
            parents.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// sshd's processes for deployctl's session (children of the listener), once it is
/// connected.
fn session_processes(site: &Site) -> Vec<u32> {
    let listener = site.sshd().pid();
    let mut pids = Vec::new();
    wait_until(
        Duration::from_secs(20),
        "sshd has a process for the session",
        || {
            pids = descendants(listener);
            !pids.is_empty()
        },
    );
    pids
}

/// Processes stopped with SIGSTOP: continued and killed (by PID) on drop.
struct Stopped(Vec<u32>);

impl Stopped {
    fn stop(pids: Vec<u32>) -> Stopped {
        for &p in &pids {
            assert!(signal(p, "STOP"), "kill -STOP {p} failed");
        }
        Stopped(pids)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for &p in &self.0 {
            signal(p, "KILL");
            signal(p, "CONT");
        }
    }
}

/// A site with one sshd and one agent, and no app commands: a push only unpacks and
/// switches.
fn site() -> Site {
    let site = Site::ssh(SshdOptions::default());
    site.write_config("", "");
    site
}

/// Starts pushing a 300 MiB artifact and returns once the agent is unpacking it and at
/// least `min` bytes of it are on disk.
fn push_big(site: &Site, min: u64) -> Bg {
    let art = big_artifact(site, 300);
    let mut bg = Bg::push(site, &art);
    let deadline = Instant::now() + Duration::from_secs(60);
    while unpacked(&site.deploy_to) < min {
        assert!(
            bg.running(),
            "deployctl ended before the upload was under way: {}",
            bg.output(-1)
        );
        assert!(
            Instant::now() < deadline,
            "the upload did not start within 60 s: {}",
            bg.output(-1)
        );
        thread::sleep(Duration::from_millis(5));
    }
    bg
}

/// What every case checks: deployctl ended within the bound, with `code`, naming
/// `deployctl status test`.
fn assert_ended(out: &Output, took: Duration, code: i32) {
    eprintln!("deployctl exited {} {took:.1?} after the fault", out.code);
    assert!(took < BOUND, "took {took:?}: {out}");
    out.assert_exit(code);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("deployctl status test"),
        "the message names `deployctl status test`: {out}"
    );
}

/// The upload was still going when the fault hit: less than 300 MiB - 64 MiB (far more
/// than every buffer between deployctl and the disk) was on disk.
fn assert_mid_upload(on_disk: u64) {
    assert!(
        on_disk < (300 - 64) * 1024 * 1024,
        "the fault came too late to be mid-upload ({on_disk} bytes unpacked)"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn agent_sigkill_mid_upload_of_a_large_artifact_ends_with_exit_3() {
    // See: #16 (item 1)
    let mut s = site();
    let mut bg = push_big(&s, 1);
    thread::sleep(Duration::from_millis(600));
    let on_disk = unpacked(&s.deploy_to);
    s.agent.kill9();
    assert_mid_upload(on_disk);
    let (out, took) = bg.wait(BOUND, "the agent was killed mid-upload");
    assert_ended(&out, took, CONNECT);
    assert!(all_output(&out).contains("nothing was changed"), "{out}");
}

#[test]
fn agent_sigkill_during_unpack_ends_with_exit_3() {
    // See: #16 (item 9)
    let mut s = site();
    // the agent is writing the blob into the .partial release
    let mut bg = push_big(&s, 16 * 1024 * 1024);
    let on_disk = unpacked(&s.deploy_to);
    s.agent.kill9();
    assert_mid_upload(on_disk);
    let (out, took) = bg.wait(BOUND, "the agent was killed during unpack");
    assert_ended(&out, took, CONNECT);
    assert!(all_output(&out).contains("nothing was changed"), "{out}");
}

#[test]
fn agent_sigterm_during_upload_ends_with_exit_3() {
    // See: #16 (item 9)
    let s = site();
    let mut bg = push_big(&s, 8 * 1024 * 1024);
    let on_disk = unpacked(&s.deploy_to);
    assert!(signal(s.agent.pid(), "TERM"));
    assert_mid_upload(on_disk);
    let (out, took) = bg.wait(BOUND, "the agent got SIGTERM mid-upload");
    assert_ended(&out, took, CONNECT);
    assert!(all_output(&out).contains("nothing was changed"), "{out}");
    // See: #16 (item 14): the agent says why before it goes.
    assert!(all_output(&out).contains("shutting down"), "{out}");
}

#[test]
fn sshd_session_process_killed_mid_upload_ends_with_exit_3() {
    // See: #16 (item 9)
    let s = site();
    let mut bg = push_big(&s, 8 * 1024 * 1024);
    let pids = session_processes(&s);
    let on_disk = unpacked(&s.deploy_to);
    for &p in &pids {
        assert!(signal(p, "KILL"), "kill -KILL {p} failed");
    }
    assert_mid_upload(on_disk);
    let (out, took) = bg.wait(BOUND, "sshd's session processes were killed mid-upload");
    assert_ended(&out, took, CONNECT);
    assert!(all_output(&out).contains("nothing was changed"), "{out}");
}

#[test]
fn silent_network_mid_upload_ends_with_exit_3() {
    // See: #16 (item 9)
    let s = site();
    let mut bg = push_big(&s, 8 * 1024 * 1024);
    // sshd's session stops answering, and the TCP connection stays open: to deployctl
    // this is a network that drops every packet without a reset
    let pids = session_processes(&s);
    let on_disk = unpacked(&s.deploy_to);
    let _stopped = Stopped::stop(pids);
    assert_mid_upload(on_disk);
    let (out, took) = bg.wait(BOUND, "the network went silent mid-upload");
    assert_ended(&out, took, CONNECT);
    assert!(all_output(&out).contains("nothing was changed"), "{out}");
}

#[test]
fn silent_network_while_the_agent_deploys_ends_with_exit_5() {
    // See: #16 (item 9)
    let s = Site::ssh(SshdOptions::default());
    s.write_config(
        "",
        "[defaults.release]\nmigrate = \"sleep 45\"\ntimeout = \"2m\"\n",
    );
    let art = small_artifact(&s);
    let mut bg = Bg::push(&s, &art);
    // the agent owns the deploy: the journal says it is migrating
    let journal = s.deploy_to.join(".deploy/journal.json");
    wait_until(Duration::from_secs(30), "the agent is migrating", || {
        fs::read_to_string(&journal).is_ok_and(|j| j.contains("migrating"))
    });
    let _stopped = Stopped::stop(session_processes(&s));
    let (out, took) = bg.wait(BOUND, "the network went silent while the agent deployed");
    assert_ended(&out, took, NEEDS_HUMAN);
    assert!(
        all_output(&out).contains("finishes or rolls back on its own"),
        "{out}"
    );
}

#[test]
fn frozen_agent_mid_upload_ends_with_exit_3() {
    // See: #16 (item 9)
    let s = site();
    let mut bg = push_big(&s, 8 * 1024 * 1024);
    // the agent stops reading, sshd still answers keepalives: only deployctl's bound on a
    // send that makes no progress ends this
    let on_disk = unpacked(&s.deploy_to);
    let _stopped = Stopped::stop(vec![s.agent.pid()]);
    assert_mid_upload(on_disk);
    let (out, took) = bg.wait(BOUND, "the agent froze mid-upload");
    assert_ended(&out, took, CONNECT);
    assert!(all_output(&out).contains("nothing was changed"), "{out}");
}

#[test]
fn silent_network_during_a_rollback_ends_with_exit_5() {
    // See: #16 (item 9)
    let s = site();
    let art = small_artifact(&s);
    for v in ["v1", "v2"] {
        s.run(&[
            "push",
            "test",
            "--artifact",
            art.to_str().unwrap(),
            "--version",
            v,
        ])
        .assert_success();
    }
    // the rollback restarts the previous release with a slow command
    s.write_config(
        "",
        "[defaults.release]\nrestart = \"sleep 45\"\ntimeout = \"2m\"\n",
    );
    let mut bg = Bg::spawn(&s, &["rollback", "test"]);
    wait_until(
        Duration::from_secs(30),
        "the agent runs the restart command",
        || !descendants(s.agent.pid()).is_empty(),
    );
    let _stopped = Stopped::stop(session_processes(&s));
    let (out, took) = bg.wait(BOUND, "the network went silent during a rollback");
    assert_ended(&out, took, NEEDS_HUMAN);
    assert!(
        all_output(&out).contains("lost contact while the agent rolled back"),
        "{out}"
    );
}

/// What deployctl said, progress (stderr) and results (stdout): a host's error is said
/// once, in the results, and the lost-connection hints come with it.
fn all_output(out: &Output) -> String {
    format!("{}\n{}", out.stdout, out.stderr)
}
