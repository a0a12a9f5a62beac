//! `deployctl demo`: the whole story on this machine, with no server, no root and no
//! setup. A real `deploy-agent` runs on a temp socket; the sample app from
//! `examples/sample-app` is deployed as v1 and v2, then a broken v3 is rolled back by the
//! agent on its own, then `rollback --to v1`.
//!
//! The app is served by `deployctl demo-app` (a tiny static file server), so the demo
//! needs nothing but the two binaries.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{Cli, Command as Cmd};
use crate::exit::{self, Failure};

const MIGRATE: &str = include_str!("../../examples/sample-app/bin/migrate");
const RESTART: &str = include_str!("../../examples/sample-app/bin/restart");
const STOP: &str = include_str!("../../examples/sample-app/bin/stop");
const INDEX: &str = include_str!("../../examples/sample-app/public/index.html");
const STATUS: &str = include_str!("../../examples/sample-app/public/api/v1/status/index.html");

struct Agent {
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM by PID: the agent finishes what it is doing and exits.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        if poll_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        }) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks `done` every 50 ms until it holds (true) or `limit` has passed (false).
fn poll_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn find_agent() -> Result<PathBuf, Failure> {
    let here = std::env::current_exe().map_err(|e| Failure::usage(e.to_string()))?;
    let beside = here.with_file_name("deploy-agent");
    if beside.is_file() {
        return Ok(beside);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("deploy-agent");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(Failure::usage(
        "deploy-agent was not found next to deployctl or on PATH; build both with \
         `cargo build --release --bins`",
    ))
}

fn free_port() -> Result<u16, Failure> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Failure::usage(format!("no free port on 127.0.0.1: {e}")))
}

/// Builds the sample app's tarball for one version. `healthy = false` leaves out the
/// status page, so the health check fails.
fn build_artifact(path: &Path, version: &str, healthy: bool) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut add = |name: &str, mode: u32, body: &str| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, name, body.as_bytes())
    };
    add("bin/migrate", 0o755, MIGRATE)?;
    add("bin/restart", 0o755, RESTART)?;
    add("bin/stop", 0o755, STOP)?;
    add(
        "public/index.html",
        0o644,
        &INDEX.replace("VERSION", version),
    )?;
    if healthy {
        add(
            "public/api/v1/status/index.html",
            0o644,
            &STATUS.replace("VERSION", version),
        )?;
    }
    tar.into_inner()?.finish()?.sync_all()
}

fn fetch(port: u16, path: &str) -> String {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return "(nothing is listening)".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    );
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf.lines().next().unwrap_or("").to_owned();
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("");
    let h1 = body
        .lines()
        .find(|l| l.contains("<h1>"))
        .map(|l| l.replace("<h1>", "").replace("</h1>", ""))
        .unwrap_or_else(|| body.trim().to_owned());
    format!("{status} | {h1}")
}

fn step(n: u32, text: &str) {
    crate::out!("\n=== {n}. {text}");
}

pub async fn run(keep: bool) -> Result<u8, Failure> {
    let started = Instant::now();
    let agent_bin = find_agent()?;
    let me = std::env::current_exe().map_err(|e| Failure::usage(e.to_string()))?;
    let tmp = tempfile::Builder::new()
        .prefix("deployctl-demo-")
        .tempdir()
        .map_err(|e| Failure::usage(format!("cannot create a temp dir: {e}")))?;
    let dir = tmp.path().to_path_buf();
    let io = |e: std::io::Error| Failure::usage(format!("demo setup: {e}"));
    let srv = dir.join("srv");
    std::fs::create_dir_all(&srv).map_err(io)?;
    let socket = dir.join("agent.sock");
    let port = free_port()?;

    crate::out!("deployctl demo: a real deploy-agent and the sample app, all on this machine");
    crate::out!("  work dir : {}", dir.display());
    crate::out!(
        "  agent    : {} (socket {})",
        agent_bin.display(),
        socket.display()
    );
    crate::out!("  app      : http://127.0.0.1:{port}/");

    let log = std::fs::File::create(dir.join("agent.log")).map_err(io)?;
    let child = Command::new(&agent_bin)
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--allowed-root")
        .arg(&srv)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log)
        .spawn()
        .map_err(|e| Failure::usage(format!("cannot start {}: {e}", agent_bin.display())))?;
    let agent = Agent { child };
    if !poll_until(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }) {
        return Err(Failure::new(
            exit::CONNECT,
            format!(
                "deploy-agent did not start; its log:\n{}",
                std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
            ),
        ));
    }

    let deploy_to = srv.join("demo");
    let config = format!(
        r#"app = "demo"
deploy_to = "{deploy_to}"

[defaults]
agent_socket = "{socket}"
keep_releases = 3

[defaults.release]
shared = ["log"]
migrate = "bin/migrate"
restart = "APP_PORT={port} APP_SERVER='{me} demo-app -f' bin/restart"
stop = "bin/stop"
timeout = "30s"

[defaults.health]
url = "http://127.0.0.1:{port}/api/v1/status/"
retries = 5
interval = "300ms"
request_timeout = "1s"

[environments.demo]
hosts = ["local"]
"#,
        deploy_to = deploy_to.display(),
        socket = socket.display(),
        me = me.display(),
    );
    let config_path = dir.join("deploy.toml");
    std::fs::write(&config_path, config).map_err(io)?;
    for (v, healthy) in [("v1", true), ("v2", true), ("v3", false)] {
        build_artifact(&dir.join(format!("{v}.tar.gz")), v, healthy).map_err(io)?;
    }
    let cli = |command| Cli {
        config: config_path.clone(),
        accept_new_host_keys: false,
        command,
    };
    let push = |v: &str| crate::commands::push::PushArgs {
        env: "demo".into(),
        json: false,
        artifact: Some(dir.join(format!("{v}.tar.gz"))),
        compose: Vec::new(),
        version: Some(v.into()),
        skip_migrations: false,
        yes: true,
        lock_wait: None,
        force: false,
        no_delta: false,
    };
    let dummy = cli(Cmd::Demo { keep });

    let mut failures = Vec::new();
    let mut expect = |what: &str, got: u8, want: u8| {
        if got != want {
            failures.push(format!("{what}: exit {got}, expected {want}"));
        }
    };

    step(
        1,
        "push v1: upload, unpack, migrate, switch current, restart, health check",
    );
    let code = crate::commands::push::run(&dummy, push("v1")).await?;
    expect("push v1", code, exit::OK);
    crate::out!("  the app now serves: {}", fetch(port, "/"));

    step(2, "push v2: same again; v1 stays on disk for a rollback");
    let code = crate::commands::push::run(&dummy, push("v2")).await?;
    expect("push v2", code, exit::OK);
    crate::out!("  the app now serves: {}", fetch(port, "/"));

    step(
        3,
        "push v3, which is broken (no status page): the agent sees the failed health check and rolls back by itself",
    );
    let code = crate::commands::push::run(&dummy, push("v3")).await?;
    expect("push v3 (broken)", code, exit::DEPLOY_FAILED);
    crate::out!("  exit code {code}: the deploy failed and the host was rolled back");
    crate::out!("  the app still serves: {}", fetch(port, "/"));

    step(4, "rollback --to v1: by version label");
    let code = crate::commands::rollback::run(&dummy, "demo", Some("v1".into()), true, None, false)
        .await?;
    expect("rollback --to v1", code, exit::OK);
    crate::out!("  the app now serves: {}", fetch(port, "/"));

    step(5, "releases and history, as the agent keeps them");
    crate::commands::info::run(&dummy, "demo", crate::commands::info::What::Releases, false)
        .await?;
    crate::out!("");
    crate::commands::info::run(
        &dummy,
        "demo",
        crate::commands::info::What::History { limit: 10 },
        false,
    )
    .await?;

    // Stop the app server the demo started, then the agent.
    let current = deploy_to.join("current");
    let _ = Command::new("sh")
        .arg("-c")
        .arg("bin/stop")
        .current_dir(&current)
        .status();
    drop(agent);
    crate::out!(
        "\nOn the server: {}/releases/<id>, current -> releases/<id>, shared/, .deploy/history.jsonl",
        deploy_to.display()
    );
    if keep {
        let kept = tmp.keep();
        crate::out!("Kept {} for you to look at.", kept.display());
    }
    crate::out!("Demo finished in {:.1}s.", started.elapsed().as_secs_f64());
    if failures.is_empty() {
        Ok(exit::OK)
    } else {
        Err(Failure::new(
            exit::DEPLOY_FAILED,
            format!("the demo did not go as expected: {}", failures.join("; ")),
        ))
    }
}

/// `deployctl demo-app -p [ip:]port -h DIR`: a minimal static file server for the demo,
/// taking the same flags as `busybox httpd -f`.
pub async fn serve_static(addr: &str, dir: &Path) -> Result<u8, Failure> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = if addr.contains(':') {
        addr.to_owned()
    } else {
        format!("0.0.0.0:{addr}")
    };
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| Failure::usage(format!("cannot listen on {addr}: {e}")))?;
    let root = dir.to_path_buf();
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let root = root.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match resolve(&root, path) {
                Some(p) => match tokio::fs::read(&p).await {
                    Ok(b) => ("200 OK", b),
                    Err(_) => ("404 Not Found", b"not found\n".to_vec()),
                },
                None => ("404 Not Found", b"not found\n".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&body).await;
        });
    }
}

/// Maps a URL path to a file under `root`: no `..`, directories serve index.html.
fn resolve(root: &Path, url: &str) -> Option<PathBuf> {
    let path = url.split('?').next()?;
    let mut p = root.to_path_buf();
    for part in path.split('/').filter(|s| !s.is_empty()) {
        if part == ".." || part == "." {
            return None;
        }
        p.push(part);
    }
    if p.is_dir() {
        p.push("index.html");
    }
    p.is_file().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_paths_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("api/v1/status")).unwrap();
        std::fs::write(dir.path().join("api/v1/status/index.html"), "ok").unwrap();
        assert!(resolve(dir.path(), "/api/v1/status/").is_some());
        assert!(resolve(dir.path(), "/../etc/passwd").is_none());
        assert!(resolve(dir.path(), "/missing").is_none());
    }

    #[test]
    fn artifacts_have_the_app() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.tar.gz");
        build_artifact(&p, "v9", false).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(f));
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"bin/restart".to_string()));
        assert!(!names.iter().any(|n| n.contains("status")));
    }
}
