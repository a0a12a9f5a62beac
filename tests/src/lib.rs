//! End-to-end test harness for deployctl.
//!
//! Everything here is real: [`Sshd`] runs the system's OpenSSH `sshd` on loopback with throwaway
//! keys, [`Agent`] runs the workspace's `deploy-agent` binary, [`deployctl`] runs the workspace's
//! `deployctl` binary. Nothing is mocked.
//!
//! Notes on the sshd:
//! * It listens on `127.0.0.1:<port>` only and accepts public-key auth for the current user only
//!   (root in CI; `PermitRootLogin prohibit-password`).
//! * Exec channels run `<login shell> -c <command>` in the user's home directory with sshd's
//!   compiled-in default `PATH` (Debian: `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`
//!   for root), NOT the test's `PATH` — except that Debian's bash also sources `~/.bashrc` for
//!   commands run by sshd, so whatever that file adds (or prints!) leaks in. Callers must pass
//!   absolute paths (e.g. `bin("deploy-agent")`). `SshdOptions::extra_config` can add
//!   `SetEnv PATH=...` if really needed.
//! * A refused `direct-streamlocal@openssh.com` channel shows in [`Sshd::log`] as
//!   "refused streamlocal port forward".
//! * Processes spawned here are killed by PID on drop; nothing is killed by name.

pub mod load;
pub mod nginx;
pub mod vm;

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

pub mod require;

/// How long to wait for sshd / the agent to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a terminated process gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Default limit for one [`run`] / [`deployctl`] call; override with env `DEPLOYCTL_E2E_TIMEOUT_SECS`.
const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Linux `sun_path` is 108 bytes including the NUL.
const MAX_UNIX_SOCKET_PATH: usize = 107;

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

fn unique() -> usize {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------

/// Path to a workspace binary built by `cargo build` (`target/<profile>/NAME`), found relative to
/// the test executable (`target/<profile>/deps/xxx` → `target/<profile>/NAME`).
/// Overridable with env `DEPLOYCTL_BIN_DIR`. Panics with a clear message if missing.
pub fn bin(name: &str) -> PathBuf {
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let (dir, how) = match std::env::var_os("DEPLOYCTL_BIN_DIR") {
        Some(d) if !d.is_empty() => (PathBuf::from(d), "DEPLOYCTL_BIN_DIR"),
        _ => {
            let exe = std::env::current_exe().expect("std::env::current_exe()");
            let mut dir = exe
                .parent()
                .expect("test executable has a parent dir")
                .to_path_buf();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.pop();
            }
            (dir, "the test executable's target dir")
        }
    };
    let path = dir.join(&file);
    if !path.is_file() {
        panic!(
            "binary `{file}` not found at {} (located via {how}): run `cargo build --bins` first \
             (same profile and CARGO_TARGET_DIR as the tests), or set DEPLOYCTL_BIN_DIR",
            path.display()
        );
    }
    path
}

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

/// Result of running a program to completion.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit code; `128 + signal` if the process was killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics (showing stdout and stderr) unless the exit code is `code`.
    #[track_caller]
    pub fn assert_exit(&self, code: i32) -> &Self {
        if self.code != code {
            panic!("expected exit code {code}, got {}\n{self}", self.code);
        }
        self
    }

    /// Panics (showing the output) unless the exit code is 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        self.assert_exit(0)
    }

    /// Stdout parsed as one JSON document.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON: {e}\n{self}"))
    }

    /// Stdout parsed as newline-delimited JSON (blank lines skipped).
    #[track_caller]
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON: {e}: {l:?}\n{self}"))
            })
            .collect()
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "exit code: {}", self.code)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}\n--------------", self.stderr)
    }
}

/// Panics (showing stdout and stderr) unless `out` exited with `code`.
#[track_caller]
pub fn assert_exit(out: &Output, code: i32) {
    out.assert_exit(code);
}

/// Runs `bin("deployctl")` with `args` in `cwd`; see [`run`].
pub fn deployctl(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    run(&bin("deployctl"), cwd, args, env)
}

/// Runs `program` with `args` in `cwd` to completion, stdin closed.
///
/// The environment is inherited minus `DEPLOYCTL_*` and `SSH_AUTH_SOCK` (so a developer's
/// ssh-agent or settings cannot leak into a test), plus `env`. Panics (with the output so far)
/// if the program runs longer than `DEPLOYCTL_E2E_TIMEOUT_SECS` (default 120 s).
pub fn run(program: &Path, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DEPLOYCTL_") || k == "SSH_AUTH_SOCK" {
            cmd.env_remove(&k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let timeout = std::env::var("DEPLOYCTL_E2E_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_RUN_TIMEOUT);
    run_command(cmd, timeout)
}

fn run_command(mut cmd: Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {desc}: {e}"));
    let stdout = Collector::start(child.stdout.take().expect("piped stdout"));
    let stderr = Collector::start(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let until = Instant::now() + Duration::from_secs(2);
                let out = Output {
                    code: -1,
                    stdout: stdout.finish(until),
                    stderr: stderr.finish(until),
                };
                panic!("timed out after {timeout:?} (killed): {desc}\n{out}");
            }
            Err(e) => panic!("waiting for {desc}: {e}"),
        }
    };
    // A grandchild may hold the pipes open; do not wait for it forever.
    let until = Instant::now() + Duration::from_secs(3);
    Output {
        code: exit_code(status),
        stdout: stdout.finish(until),
        stderr: stderr.finish(until),
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Reads a pipe on a thread; the data read so far stays available even if EOF never comes.
struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Collector {
    fn start(mut r: impl Read + Send + 'static) -> Collector {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        let b = Arc::clone(&buf);
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match r.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => b.lock().unwrap().extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(());
        });
        Collector { buf, done }
    }

    /// The data read so far once EOF is reached or `until` passes, whichever comes first.
    fn finish(self, until: Instant) -> String {
        let _ = self
            .done
            .recv_timeout(until.saturating_duration_since(Instant::now()));
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
}

/// Sends `signal` (e.g. "TERM", "KILL") to `pid` with the `kill` command; false if that failed.
fn send_signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child.
fn terminate(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if send_signal(child.id(), "TERM") {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// PIDs of all live descendants of `root`, from `/proc/*/stat`.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..." — comm may contain spaces and parentheses.
        let Some(ppid) = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                out.push(k);
                stack.push(k);
            }
        }
    }
    out
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// Generates an ed25519 key pair without passphrase at `path` (+ `.pub`); returns the public
/// line "ssh-ed25519 AAAA..." without comment.
fn keygen(path: &Path, comment: &str) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run ssh-keygen (is openssh-client installed?): {e}"));
    if !out.status.success() {
        panic!(
            "ssh-keygen failed for {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pub_path = pub_path(path);
    let line = fs::read_to_string(&pub_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", pub_path.display()));
    let mut fields = line.split_whitespace();
    match (fields.next(), fields.next()) {
        (Some(kind), Some(blob)) => format!("{kind} {blob}"),
        _ => panic!(
            "unexpected public key file {}: {line:?}",
            pub_path.display()
        ),
    }
}

fn pub_path(private: &Path) -> PathBuf {
    let mut s = private.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

fn current_user() -> String {
    if let Ok(out) = Command::new("id").arg("-un").output()
        && out.status.success()
    {
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !name.is_empty() {
            return name;
        }
    }
    for var in ["USER", "LOGNAME"] {
        if let Ok(name) = std::env::var(var)
            && !name.is_empty()
        {
            return name;
        }
    }
    panic!("cannot determine the current user name (`id -un` failed and USER is unset)");
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the effective uid.
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn find_sshd() -> PathBuf {
    if let Some(p) = std::env::var_os("DEPLOYCTL_E2E_SSHD") {
        return PathBuf::from(p);
    }
    for p in ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("sshd");
            if p.is_file() && p.is_absolute() {
                return p;
            }
        }
    }
    panic!("sshd not found (install openssh-server, or set DEPLOYCTL_E2E_SSHD)");
}

// ---------------------------------------------------------------------------------------------
// Sshd
// ---------------------------------------------------------------------------------------------

/// Options for [`Sshd::start`].
#[derive(Debug, Clone)]
pub struct SshdOptions {
    /// `AllowStreamLocalForwarding yes` (default); `false` sets `AllowStreamLocalForwarding no`
    /// and `DisableForwarding yes`, so only exec channels work.
    pub allow_streamlocal: bool,
    /// Extra sshd_config lines. sshd keeps the FIRST value of a keyword, so these lines are put
    /// before the harness defaults and override them; lines from the first `Match` on go at the
    /// end. Cumulative keywords (`Port`, `ListenAddress`, `HostKey`, ...) add to the defaults.
    pub extra_config: Vec<String>,
    /// A command that starts sshd: `wrap[0] wrap[1..] SSHD -D -f CONFIG -E LOG`, e.g. a
    /// `unshare -m` wrapper that gives this "host" its own view of the filesystem. It
    /// must end by exec'ing its arguments, so the PID we hold is sshd's.
    pub wrap: Vec<String>,
    /// The IPv4 address sshd listens on (default `127.0.0.1`), e.g. a veth address in a
    /// network namespace the test made.
    pub listen: Option<String>,
    /// Readiness is normally sshd's "listening" log line plus its banner read from here;
    /// `false` skips the banner, for an sshd whose address this process cannot reach
    /// (inside another network namespace).
    pub reachable: bool,
}

impl Default for SshdOptions {
    fn default() -> Self {
        SshdOptions {
            allow_streamlocal: true,
            extra_config: Vec::new(),
            wrap: Vec::new(),
            listen: None,
            reachable: true,
        }
    }
}

/// A real OpenSSH sshd on `127.0.0.1:port` with throwaway keys, killed on drop.
pub struct Sshd {
    pub port: u16,
    /// Its temp dir (config, keys, log, authorized_keys).
    pub dir: PathBuf,
    /// The ed25519 host public key, "ssh-ed25519 AAAA...".
    pub host_key_pub: String,
    /// Private ed25519 client key (no passphrase) authorized for [`Sshd::user`].
    pub client_key: PathBuf,
    /// "ssh-ed25519 AAAA..." of `client_key`.
    pub client_key_pub: String,
    /// The current user's name; the only user that can log in.
    pub user: String,
    config: PathBuf,
    log_file: PathBuf,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

impl Sshd {
    /// Starts sshd and waits (10 s) until it listens and sends its "SSH-2.0" banner.
    /// Panics with sshd's log on failure.
    pub fn start(opts: SshdOptions) -> Sshd {
        let tmp = tempfile::Builder::new()
            .prefix("e2e-sshd-")
            .tempdir()
            .expect("create sshd temp dir");
        let dir = tmp.path().to_path_buf();
        let user = current_user();
        let sshd_bin = find_sshd();

        let host_key = dir.join("ssh_host_ed25519_key");
        let host_key_pub = keygen(&host_key, "e2e-host");
        let client_key = dir.join("id_ed25519");
        let client_key_pub = keygen(&client_key, "e2e-client");
        let authorized_keys = dir.join("authorized_keys");
        fs::write(&authorized_keys, format!("{client_key_pub} e2e-client\n"))
            .expect("write authorized_keys");
        let _ = fs::set_permissions(&authorized_keys, fs::Permissions::from_mode(0o600));

        if is_root() {
            // Privilege separation chroot dir; must exist, root-owned, not group/world-writable.
            let mut b = fs::DirBuilder::new();
            b.recursive(true).mode(0o755);
            if let Err(e) = b.create("/run/sshd") {
                panic!("cannot create sshd privilege-separation dir /run/sshd: {e}");
            }
        }

        let config = dir.join("sshd_config");
        let log_file = dir.join("sshd.log");
        let mut last_log = String::new();
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let port = free_port();
            write_sshd_config(&config, &dir, &host_key, &authorized_keys, port, &opts);
            let listen = opts.listen.as_deref().unwrap_or("127.0.0.1");
            if attempt == 1 {
                check_sshd_config(&sshd_bin, &config);
            }
            let _ = fs::remove_file(&log_file);
            let mut cmd = match opts.wrap.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(&sshd_bin);
                    c
                }
                None => Command::new(&sshd_bin),
            };
            let mut child = cmd
                .arg("-D")
                .arg("-f")
                .arg(&config)
                .arg("-E")
                .arg(&log_file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", sshd_bin.display()));
            match wait_sshd_ready(&mut child, listen, port, &log_file, opts.reachable) {
                Ok(()) => {
                    return Sshd {
                        port,
                        dir,
                        host_key_pub,
                        client_key,
                        client_key_pub,
                        user,
                        config,
                        log_file,
                        child: Some(child),
                        _tmp: tmp,
                    };
                }
                Err(reason) => {
                    terminate(&mut child, Duration::from_millis(500));
                    last_log = read_lossy(&log_file);
                    let port_taken = last_log.contains("Address already in use")
                        || last_log.contains("Cannot bind any address");
                    if !port_taken {
                        panic!(
                            "sshd failed to start on port {port}: {reason}\n--- sshd_config ---\n{}\n--- sshd log ---\n{last_log}",
                            read_lossy(&config)
                        );
                    }
                }
            }
        }
        panic!(
            "sshd could not bind a free port in {ATTEMPTS} attempts\n--- sshd log ---\n{last_log}"
        );
    }

    /// "[127.0.0.1]:PORT ssh-ed25519 AAAA..." — a known_hosts line for this server.
    pub fn known_hosts_line(&self) -> String {
        format!("[127.0.0.1]:{} {}", self.port, self.host_key_pub)
    }

    /// Writes a known_hosts file containing [`Sshd::known_hosts_line`] (creating parent dirs).
    pub fn write_known_hosts(&self, path: &Path) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create known_hosts parent dir");
        }
        fs::write(path, format!("{}\n", self.known_hosts_line()))
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// A fresh ed25519 client key (private key path; `.pub` beside it) that is NOT authorized.
    pub fn new_unauthorized_key(&self) -> PathBuf {
        let path = self.dir.join(format!("unauthorized_{}", unique()));
        keygen(&path, "e2e-unauthorized");
        path
    }

    /// The public line "ssh-ed25519 AAAA..." of a freshly generated ed25519 key that this server
    /// does not use (for "host key changed" tests).
    pub fn other_host_key_pub(&self) -> String {
        keygen(
            &self.dir.join(format!("other_host_key_{}", unique())),
            "e2e-other-host",
        )
    }

    /// sshd's log (`-E` file).
    pub fn log(&self) -> String {
        read_lossy(&self.log_file)
    }

    /// Path of the generated sshd_config.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// PID of the sshd listener.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// A `Command` for the system `ssh` client, set up to log in to this server with
    /// `client_key` and strict host key checking (known_hosts written into the temp dir);
    /// append the remote command yourself, e.g. `.arg("echo hi")`. `user@127.0.0.1` is already
    /// there, so pass options via [`Sshd::ssh_command_with`].
    pub fn ssh_command(&self) -> Command {
        self.ssh_command_with(&self.client_key, &[])
    }

    /// Like [`Sshd::ssh_command`] with another identity and extra `ssh` options (placed first, so
    /// they override the harness's `-o` defaults, e.g. `-o UserKnownHostsFile=...`).
    pub fn ssh_command_with(&self, identity: &Path, options: &[&str]) -> Command {
        let known_hosts = self.dir.join("client_known_hosts");
        if !known_hosts.exists() {
            self.write_known_hosts(&known_hosts);
        }
        let mut cmd = Command::new("ssh");
        // ssh keeps the first value of an option, so the caller's options go first.
        cmd.args(options)
            .arg("-F")
            .arg("/dev/null")
            .arg("-i")
            .arg(identity)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-o", "IdentitiesOnly=yes"])
            .args(["-o", "IdentityAgent=none"])
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", "ConnectTimeout=10"])
            .arg(format!("{}@127.0.0.1", self.user))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `remote_command` over the system `ssh` client (see [`Sshd::ssh_command`]).
    pub fn ssh(&self, remote_command: &str) -> Output {
        let mut cmd = self.ssh_command();
        cmd.arg("--")
            .arg(remote_command)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        run_command(cmd, Duration::from_secs(60))
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Per-connection sshd processes (and the sessions they run) outlive the listener;
            // they are ours, so end them too, by PID.
            let kids = descendants(child.id());
            terminate(&mut child, TERM_GRACE);
            for pid in kids {
                send_signal(pid, "TERM");
            }
        }
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

fn write_sshd_config(
    config: &Path,
    dir: &Path,
    host_key: &Path,
    authorized_keys: &Path,
    port: u16,
    opts: &SshdOptions,
) {
    let split = opts
        .extra_config
        .iter()
        .position(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case("match"))
        })
        .unwrap_or(opts.extra_config.len());
    let (extra_head, extra_match) = opts.extra_config.split_at(split);
    let mut c = String::new();
    c.push_str("# generated by the deployctl e2e harness\n");
    for l in extra_head {
        c.push_str(l);
        c.push('\n');
    }
    let mut line = |s: String| {
        c.push_str(&s);
        c.push('\n');
    };
    line(format!("Port {port}"));
    line("AddressFamily inet".into());
    line(format!(
        "ListenAddress {}",
        opts.listen.as_deref().unwrap_or("127.0.0.1")
    ));
    line(format!("HostKey {}", host_key.display()));
    line(format!("PidFile {}", dir.join("sshd.pid").display()));
    line("UsePAM no".into());
    line("StrictModes no".into());
    line(format!("AuthorizedKeysFile {}", authorized_keys.display()));
    line("PasswordAuthentication no".into());
    line("KbdInteractiveAuthentication no".into());
    line("PubkeyAuthentication yes".into());
    line("PermitRootLogin prohibit-password".into());
    if opts.allow_streamlocal {
        line("AllowStreamLocalForwarding yes".into());
    } else {
        line("AllowStreamLocalForwarding no".into());
        line("DisableForwarding yes".into());
    }
    line("LogLevel VERBOSE".into());
    line("MaxStartups 100:30:200".into());
    line("MaxSessions 50".into());
    line("PrintMotd no".into());
    line("PrintLastLog no".into());
    line("UseDNS no".into());
    for l in extra_match {
        line(l.clone());
    }
    fs::write(config, c).expect("write sshd_config");
}

/// `sshd -t`: fail fast with a clear message on a bad config (e.g. bad extra_config).
fn check_sshd_config(sshd_bin: &Path, config: &Path) {
    let out = Command::new(sshd_bin)
        .arg("-t")
        .arg("-f")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} -t: {e}", sshd_bin.display()));
    if !out.status.success() {
        panic!(
            "sshd -t rejected the config: {}{}\n--- sshd_config ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            read_lossy(config)
        );
    }
}

/// Waits until OUR sshd logged that it listens on `port` and the port serves an SSH banner.
/// (Checking the log and that the child is alive avoids mistaking another server that grabbed
/// the port for ours.)
fn wait_sshd_ready(
    child: &mut Child,
    listen: &str,
    port: u16,
    log_file: &Path,
    reachable: bool,
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let listening = format!("Server listening on {listen} port {port}");
    let mut last_err = String::from("not listening yet");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("sshd exited early with {status}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready after {READY_TIMEOUT:?}: {last_err}"));
        }
        if read_lossy(log_file).contains(&listening) {
            if !reachable {
                return Ok(());
            }
            match read_banner(listen, port) {
                Ok(banner) if banner.starts_with("SSH-2.0") => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("sshd exited early with {status}"));
                    }
                    return Ok(());
                }
                Ok(banner) => last_err = format!("unexpected banner {banner:?}"),
                Err(e) => last_err = format!("banner: {e}"),
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn read_banner(listen: &str, port: u16) -> io::Result<String> {
    let ip: Ipv4Addr = listen
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{listen}: {e}")))?;
    let addr = SocketAddr::from((ip, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while buf.len() < 255 {
        if s.read(&mut byte)? == 0 {
            break;
        }
        if byte[0] == b'\n' {
            break;
        }
        buf.push(byte[0]);
    }
    // Be polite: send our identification so sshd logs a clean close, not a protocol error.
    let _ = s.write_all(b"SSH-2.0-e2e-probe\r\n");
    Ok(String::from_utf8_lossy(&buf).trim_end().to_string())
}

// ---------------------------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------------------------

/// A running `deploy-agent serve`, killed (by PID) on drop.
pub struct Agent {
    /// `<dir>/agent.sock`
    pub socket: PathBuf,
    /// `<dir>/srv`, passed as `--allowed-root` (created).
    pub root: PathBuf,
    /// `<dir>/agent.log`: the agent's stdout and stderr.
    pub log_file: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Starts `bin("deploy-agent") serve --socket <dir>/agent.sock --allowed-root <dir>/srv`
    /// and waits (10 s) until the socket accepts a connection.
    pub fn start(dir: &Path) -> Agent {
        Agent::start_with(dir, &[])
    }

    /// Like [`Agent::start`] with `extra_args` appended.
    pub fn start_with(dir: &Path, extra_args: &[&str]) -> Agent {
        Agent::start_program(&bin("deploy-agent"), dir, extra_args)
    }

    /// Like [`Agent::start_with`] with an explicit agent binary.
    pub fn start_program(program: &Path, dir: &Path, extra_args: &[&str]) -> Agent {
        Agent::start_inner(program, dir, extra_args, &[])
    }

    /// Like [`Agent::start`] with extra environment variables for the agent (and so for
    /// every command it runs), e.g. `DOCKER_HOST`.
    pub fn start_env(dir: &Path, envs: &[(&str, &str)]) -> Agent {
        Agent::start_inner(&bin("deploy-agent"), dir, &[], envs)
    }

    fn start_inner(
        program: &Path,
        dir: &Path,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Agent {
        let socket = dir.join("agent.sock");
        let root = dir.join("srv");
        let log_file = dir.join("agent.log");
        let sock_len = socket.as_os_str().len();
        assert!(
            sock_len <= MAX_UNIX_SOCKET_PATH,
            "agent socket path is {sock_len} bytes, over the {MAX_UNIX_SOCKET_PATH}-byte Unix socket limit: {}",
            socket.display()
        );
        fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        let _ = fs::remove_file(&socket);
        let log = fs::File::create(&log_file)
            .unwrap_or_else(|e| panic!("create {}: {e}", log_file.display()));
        let log2 = log.try_clone().expect("dup log file");
        let mut cmd = Command::new(program);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--allowed-root")
            .arg(&root)
            .args(extra_args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let desc = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {desc}: {e}"));
        let mut agent = Agent {
            socket,
            root,
            log_file,
            child: Some(child),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = agent.child.as_mut().expect("child");
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "deploy-agent exited early with {status}: {desc}\n--- agent log ---\n{}",
                    agent.log()
                );
            }
            if agent.socket.exists() && UnixStream::connect(&agent.socket).is_ok() {
                return agent;
            }
            if Instant::now() >= deadline {
                let log = agent.log();
                drop(agent);
                panic!(
                    "deploy-agent did not accept connections on its socket within {READY_TIMEOUT:?}: {desc}\n--- agent log ---\n{log}"
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// PID of the agent process (0 after it was killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL the agent (simulated crash) and reap it. The socket file stays behind.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The agent's stdout+stderr so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_file)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, TERM_GRACE);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TestEnv
// ---------------------------------------------------------------------------------------------

/// A temp-dir workspace for one test, removed on drop.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

impl Default for TestEnv {
    fn default() -> Self {
        TestEnv::new()
    }
}

impl TestEnv {
    pub fn new() -> TestEnv {
        TestEnv {
            dir: tempfile::Builder::new()
                .prefix("e2e-")
                .tempdir()
                .expect("create test temp dir"),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `root/rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `root/rel` (creating parent dirs) and returns its path.
    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        }
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// Reads `root/rel` as UTF-8 (lossy).
    pub fn read(&self, rel: &str) -> String {
        read_lossy(&self.path(rel))
    }

    /// Creates `root/rel` (and parents) as a directory and returns its path.
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }
}
