//! What a new user sees when something is wrong (issue #18): the "agent not reachable"
//! message names what was tried and the likely cause; the progress display on a real
//! pseudo-terminal.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use deployctl_e2e::require::{in_ci, missing};
use deployctl_e2e::{Output, SshdOptions, bin};

use crate::support::Site;

fn site() -> Site {
    Site::ssh(SshdOptions::default())
}

/// Replaces `agent_socket` (and, when given, `agent_bin`) in the site's deploy.toml.
fn point_at(s: &Site, socket: &str, agent_bin: Option<&str>) {
    let mut cfg = s
        .env
        .read("deploy.toml")
        .replace(s.agent.socket.to_str().unwrap(), socket);
    if let Some(b) = agent_bin {
        cfg = cfg.replace(
            &format!("agent_bin = \"{}\"", bin("deploy-agent").display()),
            &format!("agent_bin = \"{b}\""),
        );
    }
    s.env.write("deploy.toml", cfg);
}

#[track_caller]
fn assert_names(out: &Output, socket: &str, cause: &str) {
    eprintln!("{}", out.stderr);
    out.assert_exit(3);
    assert!(out.stderr.contains(socket), "names the socket: {out}");
    assert!(
        out.stderr.contains("direct-streamlocal") && out.stderr.contains("bridge"),
        "says what was tried (streamlocal, then the bridge): {out}"
    );
    assert!(
        out.stderr.contains(cause),
        "names the cause {cause:?}: {out}"
    );
    assert!(
        !out.stderr.contains("not installed"),
        "the agent IS installed; the socket is the problem: {out}"
    );
}

// See: #18
#[test]
fn wrong_agent_socket_with_the_bridge_installed_names_the_socket() {
    let s = site();
    s.write_config("", "");
    let wrong = s.env.path("nowhere/agent.sock");
    point_at(&s, wrong.to_str().unwrap(), None);
    let out = s.run(&["check", "test"]);
    assert_names(&out, wrong.to_str().unwrap(), "socket missing");
    assert!(out.stderr.contains("agent_socket is wrong"), "{out}");
}

// See: #18
// The case: `deploy-agent` is not on the SSH PATH (it is used only by the bridge
// fallback); the socket path is wrong. This said "deploy-agent is not installed".
#[test]
fn wrong_agent_socket_without_the_bridge_on_path_is_not_called_not_installed() {
    let s = site();
    s.write_config("", "");
    let wrong = s.env.path("nowhere/agent.sock");
    point_at(&s, wrong.to_str().unwrap(), Some("deploy-agent"));
    let out = s.run(&["check", "test"]);
    assert_names(&out, wrong.to_str().unwrap(), "socket missing");
    assert!(out.stderr.contains("agent_socket is wrong"), "{out}");
}

// See: #18
#[test]
fn stopped_agent_is_reported_as_not_running() {
    let mut s = site();
    s.write_config("", "");
    // Point the bridge at a name not on the PATH, as on a host where the agent lives in
    // /usr/local/lib: the old message then said "not installed".
    point_at(
        &s,
        s.agent.socket.clone().to_str().unwrap(),
        Some("deploy-agent"),
    );
    s.agent.kill9(); // a crash: the socket file stays behind, nothing listens on it
    assert!(s.agent.socket.exists());
    let out = s.run(&["check", "test"]);
    assert_names(&out, s.agent.socket.to_str().unwrap(), "not running");
    assert!(out.stderr.contains("stale socket"), "{out}");
}

/// A throwaway system user (root only), removed on drop.
struct TempUser(String);

impl TempUser {
    fn create() -> Option<TempUser> {
        let name = format!("dctlux{}", std::process::id() % 100_000);
        let ok = Command::new("useradd")
            .args(["-M", "-d", "/", "-s", "/bin/sh", "-p", "*", &name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(TempUser(name))
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

// See: #18
// The socket is there and the agent listens, but the SSH user is not in the socket's group
// (mode 0660 root:root): sshd, acting as that user, gets "permission denied".
#[test]
fn socket_the_user_may_not_open_is_reported_as_permission_denied() {
    if !is_root() {
        if missing(
            "root",
            "creates a second SSH user who may not open the agent's socket",
        ) {
            unreachable!();
        }
        return;
    }
    let Some(user) = TempUser::create() else {
        if in_ci() {
            panic!("useradd failed: this test needs a throwaway user (apt-get install passwd)");
        }
        eprintln!("note: skipping: useradd failed");
        return;
    };
    let s = site();
    s.write_config("", "");
    // The socket's directories are searchable by everyone; only the socket (0660
    // root:root) keeps the other user out.
    let mut dir: Option<&Path> = s.agent.socket.parent();
    while let Some(d) = dir {
        if !d.starts_with(s.env.root()) {
            break;
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir = d.parent();
    }
    // sshd reads authorized_keys as the user logging in: let the other user read it.
    let sshd_dir = s.sshd().config_path().parent().unwrap().to_owned();
    std::fs::set_permissions(&sshd_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        sshd_dir.join("authorized_keys"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let cfg = s.env.read("deploy.toml").replace(
        &format!("{}@127.0.0.1", s.sshd().user),
        &format!("{}@127.0.0.1", user.0),
    );
    s.env.write("deploy.toml", cfg);
    let out = s.run(&["check", "test"]);
    assert_names(&out, s.agent.socket.to_str().unwrap(), "permission denied");
    assert!(out.stderr.contains(&user.0), "names the user: {out}");
    assert!(
        out.stderr.contains("root:root 660"),
        "shows owner and mode: {out}"
    );
}
