//! `deploy-agent serve` itself: its socket, its lifecycle, and what it does not open.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::{Duration, Instant};

use deployctl_e2e::{Agent, TestEnv, bin, run};

#[test]
fn version_names_the_protocol() {
    let env = TestEnv::new();
    let out = run(&bin("deploy-agent"), env.root(), &["--version"], &[]);
    out.assert_exit(0);
    assert!(out.stdout.contains(env!("CARGO_PKG_VERSION")), "{out}");
    let protocol = format!("protocol {}", proto::PROTOCOL_VERSION);
    assert!(out.stdout.contains(&protocol), "{out}");
}

#[test]
fn socket_is_0660_and_no_tcp_port_is_open() {
    let env = TestEnv::new();
    let agent = Agent::start(&env.path("a"));
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    // Every socket the agent holds, by inode...
    let mut inodes = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{}/fd", agent.pid())).unwrap() {
        if let Ok(target) = std::fs::read_link(fd.unwrap().path()) {
            let t = target.to_string_lossy().into_owned();
            if let Some(i) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.push(i.to_owned());
            }
        }
    }
    assert!(!inodes.is_empty(), "the agent holds its Unix socket");
    // ...is in none of the kernel's TCP or UDP tables.
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let inode = line.split_whitespace().nth(9).unwrap_or("");
            assert!(
                !inodes.iter().any(|i| i == inode),
                "deploy-agent has an {table} socket: {line}"
            );
        }
    }
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
    let env = TestEnv::new();
    let dir = env.path("a");
    let mut first = Agent::start(&dir);
    // A second agent on the same socket refuses while the first is alive.
    let out = run(
        &bin("deploy-agent"),
        env.root(),
        &[
            "serve",
            "--socket",
            first.socket.to_str().unwrap(),
            "--allowed-root",
            first.root.to_str().unwrap(),
        ],
        &[],
    );
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("already listening"), "{out}");
    // A crash leaves the socket file behind; the next start replaces it.
    first.kill9();
    assert!(first.socket.exists(), "SIGKILL leaves the socket file");
    let second = Agent::start(&dir);
    assert!(std::os::unix::net::UnixStream::connect(&second.socket).is_ok());
}

#[test]
fn sigterm_stops_it_cleanly_and_removes_the_socket() {
    let env = TestEnv::new();
    let agent = Agent::start(&env.path("a"));
    let ok = std::process::Command::new("kill")
        .arg(agent.pid().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("deploy-agent stopped") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        agent.log().contains("deploy-agent stopped"),
        "{}",
        agent.log()
    );
    assert!(!agent.socket.exists(), "socket removed on shutdown");
}

#[test]
fn no_allowed_root_is_a_clear_error() {
    let env = TestEnv::new();
    let out = run(
        &bin("deploy-agent"),
        env.root(),
        &[
            "serve",
            "--config",
            env.path("missing.toml").to_str().unwrap(),
        ],
        &[],
    );
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("missing.toml"), "{out}");
}
