//! A "VM-like" server for end-to-end tests: a container of the Debian 12 image that
//! `tests/vm/build-image` makes, booted with systemd as PID 1, OpenSSH, sudo and polkit, so
//! `bootstrap` (the systemd path), the hardened unit and the app's own unit run for real.
//!
//! * The image is built (or found) by `tests/vm/build-image`; `scripts/test` calls it first,
//!   and [`Vm::boot`] calls it again (a no-op when the image exists).
//! * Boot: `docker run -d --cap-add SYS_ADMIN -v /sys/fs/cgroup:/sys/fs/cgroup:rw
//!   --stop-signal SIGRTMIN+3 -p 127.0.0.1::22 IMAGE /sbin/init`, the minimum that works on a
//!   cgroup v1 host. Without SYS_ADMIN systemd silently skips the unit's namespace settings,
//!   so tests check the sandbox from outside ([`Vm::sandbox`]), never trust it.
//! * sshd is reached on a port published on 127.0.0.1 only; its host key (made at first
//!   boot, per container) is read with `docker exec` and pinned in a known_hosts file.
//! * The container is removed on drop, also when the test panics.
//! * When Docker or the image is missing, [`Vm::boot`] panics under `CI=true` (the test fails
//!   and says why); elsewhere it prints a note and returns `None` (the caller returns).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{Output, TestEnv, keygen, run_command, unique};

/// How long a boot may take until systemd has settled and sshd answers.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// The image build on a cold cache (about 2 minutes on 2 cores), with room for a loaded box.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The VM tests cannot run: fails under CI, a note elsewhere.
fn unavailable<T>(why: &str) -> Option<T> {
    if in_ci() {
        panic!("the VM tests cannot run (CI=true, so this fails rather than skips): {why}");
    }
    eprintln!("note: skipping a VM test: {why} (under CI=true this fails)");
    None
}

/// Builds (or finds) the image; its tag.
fn image() -> Result<String, String> {
    let docker = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdin(Stdio::null())
        .output();
    match docker {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(format!(
                "the Docker engine does not answer: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Err(e) => return Err(format!("docker is not installed: {e}")),
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/build-image");
    let mut cmd = Command::new(&script);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = run_command(cmd, BUILD_TIMEOUT);
    let tag = out.stdout.lines().last().unwrap_or("").trim().to_owned();
    if out.code != 0 || !tag.starts_with("deployctl-vm:") {
        return Err(format!(
            "{} could not build the image:\n{out}",
            script.display()
        ));
    }
    Ok(tag)
}

fn docker(args: &[&str]) -> Output {
    let mut cmd = Command::new("docker");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_command(cmd, Duration::from_secs(180))
}

/// What [`Vm::sandbox`] sees of a process from outside it.
#[derive(Debug)]
pub struct Sandbox {
    /// `/usr` is mounted read-only in its mount namespace.
    pub usr_read_only: bool,
    /// A file made in the host's `/tmp` is not visible in its `/tmp`.
    pub private_tmp: bool,
    /// `NoNewPrivs: 1` in /proc/PID/status.
    pub no_new_privs: bool,
    /// `Seccomp: 2` (a filter) in /proc/PID/status.
    pub seccomp_filter: bool,
    /// Its effective and bounding capabilities are empty.
    pub no_capabilities: bool,
    /// What the probes said, for a failure message.
    pub detail: String,
}

/// One booted server; removed on drop.
pub struct Vm {
    pub id: String,
    /// The host port (on 127.0.0.1) published for the container's sshd.
    pub port: u16,
    /// Keys and known_hosts for this server (and the test's deploy.toml, artifacts...).
    pub env: TestEnv,
    /// A client key authorized (by [`Vm::add_login`]) for the users the test logs in as.
    pub key: PathBuf,
    pub key_pub: String,
}

impl Vm {
    /// The image's tag (built when missing); `None` = skipped (not CI).
    pub fn image() -> Option<String> {
        match image() {
            Ok(tag) => Some(tag),
            Err(why) => unavailable(&why),
        }
    }

    /// Runs `script` with `sh -c` in a throwaway container of the image, without booting it.
    pub fn run_image(image: &str, script: &str) -> Output {
        docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            image,
            "sh",
            "-c",
            script,
        ])
    }

    /// Builds the image if needed, boots a container and waits until systemd has settled and
    /// sshd answers; writes `known_hosts` (the container's own host key, read with `docker
    /// exec`) into [`Vm::env`] and authorizes [`Vm::key`] for root. `None` = skipped (not CI).
    pub fn boot() -> Option<Vm> {
        let image = Vm::image()?;
        let name = format!("deployctl-e2e-vm-{}-{}", std::process::id(), unique());
        let out = docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            "deployctl-e2e=vm",
            "--cap-add",
            "SYS_ADMIN",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "--stop-signal",
            "SIGRTMIN+3",
            "-p",
            "127.0.0.1::22",
            &image,
            "/sbin/init",
        ]);
        if out.code != 0 {
            // Nothing to remove unless docker made it.
            let _ = docker(&["rm", "-f", "-v", &name]);
            return unavailable(&format!("docker run {image} failed:\n{out}"));
        }
        let env = TestEnv::new();
        let key = env.path("id_ed25519");
        let key_pub = keygen(&key, "e2e-vm");
        let mut vm = Vm {
            id: out.stdout.trim().to_owned(),
            port: 0,
            env,
            key,
            key_pub,
        };
        vm.port = vm.published_port();
        vm.wait_ready();
        let host_key = vm.sh("cat /etc/ssh/ssh_host_ed25519_key.pub");
        let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
        vm.env.write(
            "known_hosts",
            format!("[127.0.0.1]:{} {}\n", vm.port, host_key.join(" ")),
        );
        vm.add_login("root", false);
        Some(vm)
    }

    fn published_port(&self) -> u16 {
        let out = docker(&["port", &self.id, "22/tcp"]);
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("127.0.0.1:"))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port published on 127.0.0.1 for sshd:\n{out}"))
    }

    /// Polls until `systemctl is-system-running` is running (or degraded: then the failed
    /// units are shown and the boot fails) and sshd answers with its banner.
    fn wait_ready(&self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let state = self.exec("systemctl is-system-running");
            match state.stdout.trim() {
                "running" => break,
                "degraded" => panic!(
                    "the VM booted degraded:\n{}",
                    self.exec(
                        "systemctl --failed --no-pager; journalctl -b --no-pager | tail -n 40"
                    )
                ),
                _ => {}
            }
            if Instant::now() > deadline {
                panic!(
                    "the VM did not boot in {BOOT_TIMEOUT:?}: {state}\n{}",
                    docker(&["logs", "--tail", "50", &self.id])
                );
            }
            thread::sleep(Duration::from_millis(300));
        }
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::Read;
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 8];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"SSH-2.0") {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "sshd in the VM does not answer on 127.0.0.1:{}:\n{}",
                    self.port,
                    self.exec("systemctl status ssh --no-pager")
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `script` with `sh -c` as root inside the container (`docker exec`, not SSH).
    pub fn exec(&self, script: &str) -> Output {
        docker(&["exec", &self.id, "sh", "-c", script])
    }

    /// [`Vm::exec`] that must succeed; its stdout.
    #[track_caller]
    pub fn sh(&self, script: &str) -> String {
        let out = self.exec(script);
        if out.code != 0 {
            panic!("in the VM, `{script}` failed:\n{out}");
        }
        out.stdout
    }

    /// Copies a local file into the container (making its directory).
    #[track_caller]
    pub fn copy_in(&self, local: &Path, remote: &str) {
        self.sh(&format!("mkdir -p \"$(dirname '{remote}')\""));
        let dest = format!("{}:{remote}", self.id);
        let out = docker(&["cp", local.to_str().unwrap(), &dest]);
        out.assert_success();
    }

    /// Writes `text` to `remote` (mode `mode`, owner root) inside the container.
    #[track_caller]
    pub fn write(&self, remote: &str, text: &str, mode: &str) {
        let local = self.env.write(&format!("upload-{}", unique()), text);
        self.copy_in(&local, remote);
        self.sh(&format!(
            "chown root:root {remote} && chmod {mode} {remote}"
        ));
    }

    /// Lets [`Vm::key`] log in as `user` (created with its own group when missing; with
    /// `sudo`, passwordless sudo for everything).
    #[track_caller]
    pub fn add_login(&self, user: &str, sudo: bool) {
        let home = if user == "root" {
            "/root".to_owned()
        } else {
            self.sh(&format!(
                "id {user} >/dev/null 2>&1 || useradd --create-home --shell /bin/bash {user}; \
                 usermod -p '*' {user}"
            ));
            format!("/home/{user}")
        };
        self.sh(&format!(
            "install -d -m 0700 -o {user} {home}/.ssh && echo '{key}' >> {home}/.ssh/authorized_keys \
             && chown {user} {home}/.ssh/authorized_keys && chmod 0600 {home}/.ssh/authorized_keys",
            key = self.key_pub
        ));
        if sudo {
            self.write(
                &format!("/etc/sudoers.d/{user}"),
                &format!("{user} ALL=(ALL) NOPASSWD: ALL\n"),
                "0440",
            );
        }
    }

    /// A deploy.toml (in [`Vm::env`]) for app `app` at `/srv/<app>`, logging in as `user`;
    /// `extra` goes at the end of `[defaults]` (e.g. `[defaults.release]` tables follow it).
    pub fn write_config(&self, app: &str, user: &str, extra: &str) -> PathBuf {
        self.env.write(
            "deploy.toml",
            format!(
                r#"app = "{app}"
deploy_to = "/srv/{app}"

[defaults]
user = "{user}"
ssh_key = "{key}"
known_hosts = "{kh}"
connect_timeout = "10s"
connect_retries = 2

{extra}

[environments.vm]
hosts = ["127.0.0.1:{port}"]
"#,
                key = self.key.display(),
                kh = self.env.path("known_hosts").display(),
                port = self.port,
            ),
        )
    }

    /// Runs `deployctl` in [`Vm::env`].
    pub fn deployctl(&self, args: &[&str]) -> Output {
        crate::deployctl(self.env.root(), args, &[])
    }

    /// `MainPID` of a unit (0 when it does not run).
    pub fn main_pid(&self, unit: &str) -> u32 {
        self.sh(&format!("systemctl show -p MainPID --value {unit}"))
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Waits (up to `timeout`) until `script` succeeds in the container.
    #[track_caller]
    pub fn wait_for(&self, what: &str, script: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.exec(script);
            if out.code == 0 {
                return;
            }
            if Instant::now() > deadline {
                panic!("in the VM, waited {timeout:?} for {what}; `{script}` last said:\n{out}");
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// The host's PID of the container's process `pid`: the process in the container's PID
    /// namespace whose innermost `NSpid` is `pid`.
    pub fn host_pid(&self, pid: u32) -> u32 {
        let init = docker(&["inspect", "-f", "{{.State.Pid}}", &self.id]);
        let init = init.stdout.trim();
        let ns = std::fs::read_link(format!("/proc/{init}/ns/pid"))
            .unwrap_or_else(|e| panic!("cannot read the VM's pid namespace (not root?): {e}"));
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = entry.file_name();
            let Some(host) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{host}/ns/pid"))
                .ok()
                .as_ref()
                != Some(&ns)
            {
                continue;
            }
            let status =
                std::fs::read_to_string(format!("/proc/{host}/status")).unwrap_or_default();
            let inner = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().last())
                .and_then(|v| v.parse::<u32>().ok());
            if inner == Some(pid) {
                return host;
            }
        }
        panic!("no host process for pid {pid} in the VM {}", self.id);
    }

    /// Looks at the container's process `pid` from outside the container: its mounts
    /// (`nsenter -m` into its mount namespace, run on the host: inside the container root
    /// lacks CAP_SYS_PTRACE to open another user's namespaces) and /proc/PID/status.
    pub fn sandbox(&self, pid: u32) -> Sandbox {
        let host = self.host_pid(pid).to_string();
        let marker = format!("/tmp/deployctl-e2e-marker-{}", unique());
        self.sh(&format!("touch {marker}"));
        let nsenter = |args: &[&str]| {
            let mut cmd = Command::new("nsenter");
            cmd.args(["-t", &host, "-m", "--"])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            run_command(cmd, Duration::from_secs(30))
        };
        let usr = nsenter(&["sh", "-c", "touch /usr/.deployctl-e2e-probe 2>&1"]);
        // `test` says 1 for "no such file"; anything else is nsenter failing.
        let tmp = nsenter(&["test", "-e", &marker]);
        let seen = nsenter(&["test", "-e", "/etc/hostname"]);
        let status = std::fs::read_to_string(format!("/proc/{host}/status")).unwrap_or_default();
        self.sh(&format!("rm -f {marker}"));
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        Sandbox {
            usr_read_only: usr.code != 0 && usr.stdout.contains("Read-only file system"),
            private_tmp: seen.code == 0 && tmp.code == 1,
            no_new_privs: field("NoNewPrivs:") == "1",
            seccomp_filter: field("Seccomp:") == "2",
            no_capabilities: field("CapEff:").trim_start_matches('0').is_empty()
                && field("CapBnd:").trim_start_matches('0').is_empty(),
            detail: format!(
                "host pid {host}\ntouch /usr/...: {usr}\ntest -e /tmp/...: {tmp}\n{status}"
            ),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let out = docker(&["rm", "-f", "-v", &self.id]);
        if out.code != 0 {
            eprintln!("could not remove the VM container {}:\n{out}", self.id);
        }
    }
}
