//! `deployctl bootstrap` against a real sshd, in `--no-systemd --prefix` mode so nothing
//! outside the test's temp dir is touched: install, `check` afterwards, a second run that
//! changes nothing, an upgrade that restarts the agent by its pid and keeps
//! `<deploy_to>/.deploy`, and refusals that change nothing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use deployctl_e2e::{Output, Sshd, SshdOptions, TestEnv, bin, deployctl};
use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

/// One "host" (a loopback sshd) and a deploy.toml whose agent lives under `prefix`.
struct Rig {
    env: TestEnv,
    sshd: Sshd,
    prefix: PathBuf,
    deploy_to: PathBuf,
    socket: PathBuf,
    group: String,
}

impl Rig {
    fn new() -> Rig {
        let env = TestEnv::new();
        let sshd = Sshd::start(SshdOptions::default());
        sshd.write_known_hosts(&env.path("known_hosts"));
        let prefix = env.path("p");
        let socket = prefix.join("run/deploy-agent/agent.sock");
        let deploy_to = env.path("srv/app");
        // The SSH user's own primary group: bootstrap then needs no groupadd, and the test
        // does not touch /etc/group.
        let group = String::from_utf8(Command::new("id").arg("-gn").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned();
        let rig = Rig {
            env,
            sshd,
            prefix,
            deploy_to,
            socket,
            group,
        };
        rig.write_config("");
        rig
    }

    fn write_config(&self, extra: &str) {
        let text = format!(
            r#"app = "app"
deploy_to = "{deploy_to}"

[defaults]
ssh_key = "{key}"
known_hosts = "{known_hosts}"
agent_socket = "{socket}"
connect_timeout = "5s"
connect_retries = 1
{extra}

[environments.test]
hosts = ["{user}@127.0.0.1:{port}"]
"#,
            deploy_to = self.deploy_to.display(),
            key = self.sshd.client_key.display(),
            known_hosts = self.env.path("known_hosts").display(),
            socket = self.socket.display(),
            user = self.sshd.user,
            port = self.sshd.port,
        );
        self.env.write("deploy.toml", text);
    }

    fn run(&self, args: &[&str]) -> Output {
        deployctl(self.env.root(), args, &[])
    }

    /// `bootstrap test --no-systemd --prefix <prefix> --socket-group <group>` + `extra`.
    fn bootstrap(&self, extra: &[&str]) -> Output {
        let prefix = self.prefix.to_str().unwrap();
        let mut args = vec![
            "bootstrap",
            "test",
            "--no-systemd",
            "--prefix",
            prefix,
            "--socket-group",
            &self.group,
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    fn installed_bin(&self) -> PathBuf {
        self.prefix.join("usr/local/bin/deploy-agent")
    }

    fn config_file(&self) -> PathBuf {
        self.prefix.join("etc/deploy-agent/agent.toml")
    }

    fn pid_file(&self) -> PathBuf {
        self.socket.with_file_name("agent.pid")
    }

    fn pid(&self) -> Option<u32> {
        fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Rig {
    /// Stops the agent bootstrap started, by the pid in its pid file (never by name).
    fn drop(&mut self) {
        if let Some(pid) = self.pid()
            && runs_from(pid, &self.prefix)
        {
            signal(pid, "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while runs_from(pid, &self.prefix) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if runs_from(pid, &self.prefix) {
                signal(pid, "KILL");
            }
        }
    }
}

/// The process `pid` is alive (not a zombie) and runs a binary under `dir`.
fn runs_from(pid: u32, dir: &Path) -> bool {
    fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(dir))
}

fn alive(pid: u32) -> bool {
    fs::read_link(format!("/proc/{pid}/exe")).is_ok()
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).unwrap()))
}

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// A deploy-agent that is byte-for-byte different but runs the same (a trailing byte is
/// ignored by the ELF loader).
fn modified_agent(env: &TestEnv) -> PathBuf {
    let mut bytes = fs::read(bin("deploy-agent")).unwrap();
    bytes.push(0);
    let p = env.write("new/deploy-agent", bytes);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn tarball(env: &TestEnv) -> PathBuf {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let data = b"hello\n";
    let mut h = tar::Header::new_gnu();
    h.set_path("index.html").unwrap();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &data[..]).unwrap();
    let gz = b.into_inner().unwrap().finish().unwrap();
    env.write("app.tar.gz", gz)
}

#[test]
fn installs_a_working_agent_and_check_passes() {
    let r = Rig::new();
    let out = r.bootstrap(&["--json"]);
    out.assert_success();
    let doc = out.json();
    let host = &doc["hosts"][0];
    assert_eq!(host["ok"], true, "{out}");
    assert_eq!(host["changed"], true, "{out}");
    assert_eq!(host["agent_version"], version(), "{out}");
    assert_eq!(doc["mode"], "no-systemd", "{out}");

    // the binary, sha256-identical to the one next to deployctl, mode 755
    let installed = r.installed_bin();
    assert_eq!(sha256_file(&installed), sha256_file(&bin("deploy-agent")));
    assert_eq!(
        fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // the config: our socket, group, and the parent of deploy_to as allowed root
    let conf: toml_like::Conf = toml_like::parse(&fs::read_to_string(r.config_file()).unwrap());
    assert_eq!(conf.socket, r.socket.to_str().unwrap());
    assert_eq!(conf.socket_group, r.group);
    assert_eq!(
        conf.allowed_roots,
        vec![r.deploy_to.parent().unwrap().to_str().unwrap().to_owned()]
    );
    // a running agent, its pid next to the socket
    let pid = r.pid().expect("pid file next to the socket");
    assert!(
        runs_from(pid, &r.prefix),
        "pid {pid} runs the installed agent"
    );
    assert_eq!(host["pid"], pid, "{out}");
    // nothing of the real system was used: no unit, nothing outside the prefix
    assert!(!r.prefix.join("etc/systemd").exists());

    let check = r.run(&["check", "test"]);
    check.assert_success();
    assert!(check.stdout.contains(version()), "{check}");
}

#[test]
fn second_run_changes_nothing_and_keeps_the_agent() {
    let r = Rig::new();
    r.bootstrap(&[]).assert_success();
    let pid = r.pid().unwrap();
    let conf_before = fs::read(r.config_file()).unwrap();
    let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
    let (bin_mtime, conf_mtime) = (mtime(&r.installed_bin()), mtime(&r.config_file()));

    let out = r.bootstrap(&[]);
    out.assert_success();
    assert!(
        out.stdout
            .contains(&format!("up to date: agent {}, config", version())),
        "{out}"
    );
    assert!(
        out.stdout.contains(&format!("running (pid {pid})")),
        "{out}"
    );
    assert!(!out.stderr.contains("uploading"), "{out}");
    assert_eq!(r.pid(), Some(pid), "not restarted");
    assert!(runs_from(pid, &r.prefix));
    assert_eq!(fs::read(r.config_file()).unwrap(), conf_before);
    assert_eq!(mtime(&r.installed_bin()), bin_mtime, "binary not rewritten");
    assert_eq!(mtime(&r.config_file()), conf_mtime, "config not rewritten");

    let doc = r.bootstrap(&["--json"]).json();
    assert_eq!(doc["hosts"][0]["changed"], false, "{doc}");
    assert_eq!(doc["hosts"][0]["changes"], serde_json::json!([]), "{doc}");
}

#[test]
fn upgrade_restarts_the_agent_by_pid_and_keeps_journal_and_history() {
    let r = Rig::new();
    r.bootstrap(&[]).assert_success();
    let old_pid = r.pid().unwrap();

    // a real deploy, so the agent has a journal and a history
    let art = tarball(&r.env);
    r.run(&[
        "push",
        "test",
        "--artifact",
        art.to_str().unwrap(),
        "--version",
        "v1",
    ])
    .assert_success();
    let state = r.deploy_to.join(".deploy");
    let history = fs::read(state.join("history.jsonl")).expect("history.jsonl after a push");
    assert!(!history.is_empty());
    let journal = fs::read(state.join("journal.json")).ok();

    let new_agent = modified_agent(&r.env);
    let out = r.bootstrap(&["--agent-binary", new_agent.to_str().unwrap()]);
    out.assert_success();
    assert!(out.stdout.contains("upgraded"), "{out}");
    assert!(
        out.stdout
            .contains(&format!("old agent (pid {old_pid}) stopped")),
        "{out}"
    );
    assert_eq!(sha256_file(&r.installed_bin()), sha256_file(&new_agent));
    let new_pid = r.pid().unwrap();
    assert_ne!(new_pid, old_pid, "a new agent runs");
    assert!(runs_from(new_pid, &r.prefix));
    assert!(!alive(old_pid), "the old agent is gone");

    assert_eq!(
        fs::read(state.join("history.jsonl")).unwrap(),
        history,
        "history untouched"
    );
    assert_eq!(
        fs::read(state.join("journal.json")).ok(),
        journal,
        "journal untouched"
    );
    r.run(&["check", "test"]).assert_success();
    let h = r.run(&["history", "test", "--json"]);
    h.assert_success();
    assert!(
        h.stdout.contains("v1"),
        "the new agent reads the old history: {h}"
    );

    // and the upgraded install is itself up to date now
    let again = r.bootstrap(&["--agent-binary", new_agent.to_str().unwrap()]);
    again.assert_success();
    assert!(again.stdout.contains("up to date"), "{again}");
    assert_eq!(r.pid(), Some(new_pid));
}

#[test]
fn a_binary_that_does_not_run_is_refused_and_the_old_agent_keeps_running() {
    let r = Rig::new();
    r.bootstrap(&[]).assert_success();
    let pid = r.pid().unwrap();
    let good = sha256_file(&r.installed_bin());
    let bad = r.env.write("bad/deploy-agent", "not a program\n");
    fs::set_permissions(&bad, fs::Permissions::from_mode(0o755)).unwrap();

    let out = r.bootstrap(&["--agent-binary", bad.to_str().unwrap()]);
    out.assert_exit(1);
    assert!(out.stderr.contains("does not run on this host"), "{out}");
    assert_eq!(sha256_file(&r.installed_bin()), good, "old binary kept");
    assert_eq!(r.pid(), Some(pid));
    assert!(runs_from(pid, &r.prefix));
    let leftovers: Vec<_> = fs::read_dir(r.installed_bin().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temp file left: {leftovers:?}");
    r.run(&["check", "test"]).assert_success();
}

#[test]
fn without_systemd_on_the_host_it_refuses_before_changing_anything() {
    // Skipped by design where systemd runs: there, systemd mode would really install into
    // /etc and /usr/local. CI's machine is a container without systemd, so there it must
    // run; `machine_kind` fails it under CI=true instead of letting it pass unrun.
    if Path::new("/run/systemd/system").exists()
        && !deployctl_e2e::require::machine_kind(
            "a host without systemd as init (as CI's container)",
            "systemd runs (/run/systemd/system exists), so systemd mode would really install",
        )
    {
        return;
    }
    let r = Rig::new();
    // an absolute agent_bin under the temp dir, so even a bug could not reach /usr/local
    r.write_config(&format!(
        "agent_bin = \"{}\"",
        r.env.path("sys/deploy-agent").display()
    ));
    let etc_existed = Path::new("/etc/deploy-agent/agent.toml").exists();
    let out = r.run(&["bootstrap", "test"]);
    out.assert_exit(2);
    assert!(out.stderr.contains("--no-systemd"), "{out}");
    assert!(out.stderr.contains("nothing was changed"), "{out}");
    assert!(!r.env.path("sys/deploy-agent").exists());
    assert_eq!(
        Path::new("/etc/deploy-agent/agent.toml").exists(),
        etc_existed
    );
}

#[test]
fn usage_errors_exit_2() {
    let r = Rig::new();
    let out = r.run(&["bootstrap", "test", "--no-systemd", "--prefix", "rel/dir"]);
    out.assert_exit(2);
    assert!(out.stderr.contains("absolute"), "{out}");
    let out = r.run(&["bootstrap", "test", "--prefix", r.prefix.to_str().unwrap()]);
    out.assert_exit(2);
    assert!(out.stderr.contains("--no-systemd"), "{out}");
    let missing = r.env.path("nope/deploy-agent");
    let out = r.bootstrap(&["--agent-binary", missing.to_str().unwrap()]);
    out.assert_exit(2);
    assert!(out.stderr.contains("--agent-binary"), "{out}");
    assert!(!r.prefix.exists(), "nothing was installed");
}

#[test]
fn unknown_host_key_is_exit_3_and_nothing_is_installed() {
    let r = Rig::new();
    r.env.write("known_hosts", "");
    let out = r.bootstrap(&[]);
    out.assert_exit(3);
    assert!(out.stderr.contains("not known"), "{out}");
    assert!(out.stderr.contains("SHA256:"), "{out}");
    assert!(!r.prefix.exists(), "nothing was installed");
}

/// The three keys of agent.toml bootstrap writes, read without a TOML dependency.
mod toml_like {
    pub struct Conf {
        pub socket: String,
        pub socket_group: String,
        pub allowed_roots: Vec<String>,
    }

    fn strings(v: &str) -> Vec<String> {
        v.split('"').skip(1).step_by(2).map(str::to_owned).collect()
    }

    pub fn parse(text: &str) -> Conf {
        let mut c = Conf {
            socket: String::new(),
            socket_group: String::new(),
            allowed_roots: Vec::new(),
        };
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k.trim() {
                "socket" => c.socket = strings(v).concat(),
                "socket_group" => c.socket_group = strings(v).concat(),
                "allowed_roots" => c.allowed_roots = strings(v),
                _ => {}
            }
        }
        c
    }
}
