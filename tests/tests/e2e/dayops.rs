//! Day-two commands (#17 items 1, 2): `deployctl logs` and `deployctl exec`, over the
//! fleet rig (two real sshds, each with a real agent in its own mount namespace).

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deployctl_e2e::bin;

use crate::fleet::Fleet;

const SECRET: &str = "hunter2-dayops-secret";

/// A fleet of `n` hosts with release v1 live, logs read from `log/*.log`, and
/// `APP_TOKEN` declared secret.
fn fleet(n: usize) -> Fleet {
    let f = Fleet::start(n);
    f.config(
        "secrets = [\"APP_TOKEN\"]\nrelease.logs = { files = [\"log/*.log\"] }",
        "",
    );
    f.push("v1", &[]).assert_success();
    f
}

/// Where host `i`'s current release is, seen from outside its mount namespace.
fn current_dir(f: &Fleet, i: usize) -> std::path::PathBuf {
    let id = f.release_dirs(i).pop().expect("a release");
    f.hosts[i].dir.join("app/releases").join(id)
}

fn append(f: &Fleet, i: usize, file: &str, text: &str) {
    use std::io::Write;
    let path = current_dir(f, i).join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut w = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    w.write_all(text.as_bytes()).unwrap();
}

fn run(f: &Fleet, args: &[&str]) -> deployctl_e2e::Output {
    deployctl_e2e::deployctl(f.env.root(), args, &[("APP_TOKEN", SECRET)])
}

/// A deployctl left running (`logs -f`, a long `exec`), its output collected as it comes.
struct Running {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let t = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            t.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

impl Running {
    fn start(cwd: &Path, args: &[&str]) -> Running {
        let mut cmd = Command::new(bin("deployctl"));
        cmd.args(args)
            .current_dir(cwd)
            .env("APP_TOKEN", SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DEPLOYCTL_") || k == "SSH_AUTH_SOCK" {
                cmd.env_remove(&k);
            }
        }
        let mut child = cmd.spawn().unwrap();
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        Running { child, out, err }
    }

    fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits (at most 30 s) until `pred` holds for (stdout, stderr).
    fn wait_for(&self, what: &str, pred: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pred(&self.stdout(), &self.stderr()) {
            assert!(
                Instant::now() < deadline,
                "waited 30 s for {what}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGINT (what Ctrl-C sends) and returns the exit code (at most 30 s).
    fn interrupt(&mut self) -> i32 {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        self.wait()
    }

    fn wait(&mut self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
            }
            assert!(
                Instant::now() < deadline,
                "deployctl did not exit within 30 s\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{}", pid.trim())).exists()
}

#[test]
fn logs_from_files_on_two_hosts_are_prefixed_cut_to_n_and_masked() {
    let f = fleet(2);
    let names = f.host_names();
    for i in 0..2 {
        let lines: String = (1..=5).map(|n| format!("host{i} line {n}\n")).collect();
        append(&f, i, "log/app.log", &lines);
    }
    append(&f, 1, "log/app.log", &format!("token={SECRET} used\n"));
    let out = run(&f, &["logs", "prod", "-n", "2"]);
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", out.stdout);
    let width = names.iter().map(|n| n.len()).max().unwrap();
    for want in [
        format!("{:<width$} | host0 line 4", names[0]),
        format!("{:<width$} | host0 line 5", names[0]),
        format!("{:<width$} | host1 line 5", names[1]),
        format!("{:<width$} | token=*** used", names[1]),
    ] {
        assert!(
            lines.contains(&want.as_str()),
            "{want:?} missing:\n{}",
            out.stdout
        );
    }
    assert!(!out.stdout.contains(SECRET) && !out.stderr.contains(SECRET));
    // One host only.
    let out = run(&f, &["logs", "prod", "-n", "1", "--host", &names[0]]);
    out.assert_success();
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    assert!(out.stdout.contains("host0 line 5"), "{}", out.stdout);
    // A host that is not in the environment.
    let out = run(&f, &["logs", "prod", "--host", "nowhere.example"]);
    out.assert_exit(2);
    assert!(out.stderr.contains("nowhere.example"), "{}", out.stderr);
}

#[test]
fn logs_refuse_a_file_leading_out_of_the_release() {
    let f = fleet(1);
    append(&f, 0, "log/app.log", "fine\n");
    std::fs::write(f.env.path("outside.txt"), "not for you\n").unwrap();
    std::os::unix::fs::symlink(
        f.env.path("outside.txt"),
        current_dir(&f, 0).join("log/escape.log"),
    )
    .unwrap();
    let out = run(&f, &["logs", "prod"]);
    out.assert_exit(2);
    assert!(out.stderr.contains("escape.log"), "{}", out.stderr);
    assert!(out.stderr.contains("outside the release"), "{}", out.stderr);
    assert!(!out.stdout.contains("not for you"), "{}", out.stdout);
}

#[test]
fn logs_follow_prints_appended_lines_until_ctrl_c() {
    let f = fleet(1);
    append(&f, 0, "log/app.log", "before start\n");
    let mut logs = Running::start(f.env.root(), &["logs", "prod", "-n", "1", "-f"]);
    logs.wait_for("the first line", |o, _| o.contains("before start"));
    append(&f, 0, "log/app.log", "appended while following\n");
    logs.wait_for("the appended line", |o, _| {
        o.contains("appended while following")
    });
    let code = logs.interrupt();
    assert_eq!(code, 0, "stderr:\n{}", logs.stderr());
}

#[test]
fn logs_follow_reports_a_host_that_drops_out_and_keeps_the_other() {
    let f = fleet(2);
    let names = f.host_names();
    append(&f, 0, "log/app.log", "zero ready\n");
    append(&f, 1, "log/app.log", "one ready\n");
    let mut logs = Running::start(f.env.root(), &["logs", "prod", "-n", "1", "-f"]);
    logs.wait_for("both hosts", |o, _| {
        o.contains("zero ready") && o.contains("one ready")
    });
    // Host 1 goes away: its agent dies.
    let pid = std::fs::read_to_string(f.hosts[1].dir.join("agent.pid")).unwrap();
    let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
    logs.wait_for("host 1 reported lost", |_, e| {
        e.contains(&names[1]) && e.contains("lost the connection")
    });
    append(&f, 0, "log/app.log", "zero still streams\n");
    logs.wait_for("host 0's new line", |o, _| o.contains("zero still streams"));
    // A host was lost: the exit code says so (3), Ctrl-C or not.
    assert_eq!(logs.interrupt(), 3, "stderr:\n{}", logs.stderr());
}

#[test]
fn exec_runs_in_the_current_release_with_the_variables_and_passes_the_exit_code() {
    let f = fleet(2);
    let release = f.release_dirs(0).pop().unwrap();
    let out = run(
        &f,
        &[
            "exec",
            "prod",
            "--",
            "sh",
            "-c",
            "echo app=$DEPLOY_APP release=$DEPLOY_RELEASE version=$DEPLOY_VERSION; cat VERSION; \
             echo to-stderr >&2;",
        ],
    );
    out.assert_success();
    assert!(
        out.stdout
            .contains(&format!("app=app release={release} version=v1")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("v1\n"),
        "ran in the release dir: {}",
        out.stdout
    );
    assert!(out.stderr.contains("to-stderr"), "{}", out.stderr);
    assert!(
        !out.stdout.contains("to-stderr"),
        "stdout and stderr kept apart"
    );
    // Exit codes are passed on.
    run(&f, &["exec", "prod", "--", "sh", "-c", "exit 3"]).assert_exit(3);
    run(&f, &["exec", "prod", "--", "true"]).assert_exit(0);
    // A secret the command prints is masked.
    let out = run(&f, &["exec", "prod", "--", "echo", SECRET]);
    out.assert_success();
    assert!(
        out.stdout.contains("***") && !out.stdout.contains(SECRET),
        "{}",
        out.stdout
    );
    // A release that does not exist is refused, named, exit 2.
    let out = run(
        &f,
        &["exec", "prod", "--release", "20000101000000", "--", "true"],
    );
    out.assert_exit(2);
    assert!(out.stderr.contains("20000101000000"), "{}", out.stderr);
    // An older release by id.
    let out = run(
        &f,
        &[
            "exec",
            "prod",
            "--release",
            &release,
            "--",
            "cat",
            "VERSION",
        ],
    );
    out.assert_success();
    assert_eq!(out.stdout.trim(), "v1");
}

#[test]
fn exec_all_gives_per_host_codes_in_the_table_and_json_and_exits_with_the_first_failure() {
    let f = fleet(2);
    let names = f.host_names();
    f.mark(1, "fail");
    let script = "[ -e \"$DEPLOY_TO/shared/fail\" ] && { echo failing; exit 5; }; echo fine";
    let out = run(&f, &["exec", "prod", "--all", "--", "sh", "-c", script]);
    out.assert_exit(5);
    assert!(
        out.stdout.contains(&format!("{} | fine", names[0])),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("| failing"), "{}", out.stdout);
    let row = out
        .stderr
        .lines()
        .find(|l| l.starts_with(&names[1]))
        .unwrap_or_else(|| panic!("no table row for host 1:\n{}", out.stderr));
    assert!(row.split_whitespace().any(|c| c == "5"), "{row}");
    let out = run(
        &f,
        &["exec", "prod", "--all", "--json", "--", "sh", "-c", script],
    );
    out.assert_exit(5);
    let doc = out.json();
    assert_eq!(doc["exit_code"], 5);
    assert_eq!(doc["hosts"][0]["host"], names[0].as_str());
    assert_eq!(doc["hosts"][0]["exit_code"], 0);
    assert_eq!(doc["hosts"][1]["exit_code"], 5);
    assert!(
        out.stderr.contains("fine"),
        "with --json the output goes to stderr"
    );
}

#[test]
fn exec_lock_is_refused_while_held_and_an_interrupted_command_leaves_nothing_running() {
    let f = fleet(1);
    let pidfile = f.hosts[0].dir.join("app/shared/sleeper.pid");
    std::fs::create_dir_all(pidfile.parent().unwrap()).unwrap();
    let mut long = Running::start(
        f.env.root(),
        &[
            "exec",
            "prod",
            "--lock",
            "--",
            "sh",
            "-c",
            "sleep 120 & echo $! > \"$DEPLOY_TO/shared/sleeper.pid\"; echo started; wait",
        ],
    );
    long.wait_for("the command to start", |o, _| o.contains("started"));
    let out = run(&f, &["exec", "prod", "--lock", "--", "true"]);
    out.assert_exit(4);
    // Without --lock it runs.
    run(&f, &["exec", "prod", "--", "true"]).assert_success();
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    assert!(alive(&pid));
    assert_eq!(long.interrupt(), 130, "stderr:\n{}", long.stderr());
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(&pid) {
        assert!(
            Instant::now() < deadline,
            "the command's background child outlived the connection"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The lock went with it.
    run(&f, &["exec", "prod", "--lock", "--", "true"]).assert_success();
}

/// Compose: `exec --service` runs in the service's container with the deploy variables
/// and passes its exit code; `logs` shows the project's container logs.
fn compose_exec_and_logs(c: crate::compose::Compose) {
    use crate::compose::{Stack, docker, site};
    let stack = Stack::new(c);
    let s = site(&stack, "");
    stack.push(&s, "v1", &[]).assert_success();
    // Without --service: refused, saying what to pass.
    let out = s.run(&["exec", "test", "--", "true"]);
    out.assert_exit(2);
    assert!(out.stderr.contains("--service"), "{}", out.stderr);
    let out = s.run(&[
        "exec",
        "test",
        "--service",
        "web",
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        "echo app=$DEPLOY_APP release=$DEPLOY_RELEASE; echo dayops-log-marker > /proc/1/fd/1; \
         echo oops >&2; exit 3",
    ]);
    out.assert_exit(3);
    assert!(out.stdout.contains("app=app release=2"), "{}", out.stdout);
    assert!(out.stderr.contains("oops") && !out.stdout.contains("oops"));
    // The line went to the container's own output: its log.
    assert!(
        docker(&["logs", &stack.container_id("web")]).contains("dayops-log-marker"),
        "the exec did not run in the web container"
    );
    let out = s.run(&["logs", "test", "-n", "20"]);
    out.assert_success();
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("dayops-log-marker"))
        .unwrap_or_else(|| panic!("no marker in the logs:\n{}\n{}", out.stdout, out.stderr));
    assert!(line.starts_with(&s.host()), "{line}");
}

crate::compose::compose_matrix!(compose_exec_and_logs);

/// The journal source on the VM image (systemd as PID 1, the agent installed by
/// `bootstrap` under its hardened unit): the last lines of a unit, then `-f` follows a
/// line the unit logs after the start, until Ctrl-C.
#[test]
fn logs_from_the_systemd_journal_on_the_vm() {
    let Some(vm) = deployctl_e2e::vm::Vm::boot() else {
        return;
    };
    vm.write_config(
        "myapp",
        "root",
        "secrets = [\"APP_TOKEN\"]\n\n[defaults.release]\nlogs = { unit = \"dayops-logger\" }\n",
    );
    vm.deployctl(&["bootstrap", "vm"]).assert_success();
    vm.write(
        "/etc/systemd/system/dayops-logger.service",
        &format!(
            "[Service]\nExecStart=/bin/sh -c 'echo journal-marker-one; echo token={SECRET}; \
             while sleep 0.2; do if [ -f /run/dayops-go ]; then rm -f /run/dayops-go; \
             echo journal-followed; fi; done'\n"
        ),
        "0644",
    );
    vm.sh("systemctl daemon-reload && systemctl start dayops-logger");
    // The agent reads the journal as its own user: give it the journal's group.
    let user = vm.sh("systemctl show -p User --value deploy-agent.service");
    let user = user.trim();
    if !user.is_empty() && user != "root" {
        vm.sh(&format!(
            "usermod -aG systemd-journal {user} && systemctl restart deploy-agent"
        ));
    }
    vm.wait_for(
        "the unit's first lines in the journal",
        "journalctl -u dayops-logger --no-pager | grep -q journal-marker-one",
        Duration::from_secs(30),
    );
    let out = deployctl_e2e::deployctl(
        vm.env.root(),
        &["logs", "vm", "-n", "5"],
        &[("APP_TOKEN", SECRET)],
    );
    out.assert_success();
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("journal-marker-one"))
        .unwrap_or_else(|| panic!("no journal line:\n{out}"));
    assert!(
        line.starts_with(&format!("127.0.0.1:{} | ", vm.port)),
        "{line}"
    );
    assert!(
        out.stdout.contains("token=***") && !out.stdout.contains(SECRET),
        "{out}"
    );
    let mut logs = Running::start(vm.env.root(), &["logs", "vm", "-n", "1", "-f"]);
    logs.wait_for("the first line", |o, _| !o.is_empty());
    vm.sh("touch /run/dayops-go");
    logs.wait_for("the followed line", |o, _| o.contains("journal-followed"));
    assert_eq!(logs.interrupt(), 0, "stderr:\n{}", logs.stderr());
}

#[test]
fn exec_killed_with_its_controller_leaves_nothing_running_and_timeout_kills() {
    let f = fleet(1);
    let pidfile = f.hosts[0].dir.join("app/shared/orphan.pid");
    std::fs::create_dir_all(pidfile.parent().unwrap()).unwrap();
    let mut long = Running::start(
        f.env.root(),
        &[
            "exec",
            "prod",
            "--",
            "sh",
            "-c",
            "sleep 120 & echo $! > \"$DEPLOY_TO/shared/orphan.pid\"; echo started; wait",
        ],
    );
    long.wait_for("the command to start", |o, _| o.contains("started"));
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    assert!(alive(&pid));
    // deployctl dies without a word (SIGKILL): the SSH session closes under the agent.
    let _ = Command::new("kill")
        .args(["-KILL", &long.child.id().to_string()])
        .status();
    long.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(&pid) {
        assert!(
            Instant::now() < deadline,
            "the command outlived deployctl (killed) by 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // --timeout kills a command that runs too long: 128 + SIGKILL.
    let out = run(
        &f,
        &["exec", "prod", "--timeout", "1s", "--", "sleep", "60"],
    );
    out.assert_exit(137);
    assert!(out.stderr.contains("timed out"), "{}", out.stderr);
}

#[test]
fn logs_since_keeps_the_files_modified_since_then() {
    let f = fleet(1);
    append(&f, 0, "log/old.log", "from an old file\n");
    append(&f, 0, "log/new.log", "from a new file\n");
    let old = current_dir(&f, 0).join("log/old.log");
    let status = Command::new("touch")
        .args(["-d", "3 hours ago"])
        .arg(&old)
        .status()
        .unwrap();
    assert!(status.success());
    let out = run(&f, &["logs", "prod", "--since", "1h"]);
    out.assert_success();
    assert!(out.stdout.contains("from a new file"), "{}", out.stdout);
    assert!(!out.stdout.contains("from an old file"), "{}", out.stdout);
    let out = run(&f, &["logs", "prod", "--since", "1h", "-n", "0"]);
    out.assert_success();
    assert_eq!(out.stdout, "");
}

#[test]
fn logs_follow_ends_when_its_reader_goes_away() {
    // `deployctl logs ENV -f | head -1`: once head has its line, deployctl ends too.
    use std::io::BufRead;
    let f = fleet(1);
    append(&f, 0, "log/app.log", "first\n");
    let mut child = Command::new(bin("deployctl"))
        .args(["logs", "prod", "-n", "1", "-f"])
        .current_dir(f.env.root())
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("first"), "{line}");
    drop(out);
    append(&f, 0, "log/app.log", "second\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("deployctl logs -f kept running after its reader went away");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}
