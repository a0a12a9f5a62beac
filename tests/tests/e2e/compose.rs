//! The compose strategy on the real Docker engine, over a real sshd and the real agent.
//!
//! There is no registry, so each test imports its own images (`docker import` of a
//! rootfs tar: the static busybox running `httpd`), tagged uniquely per test, and its
//! [`Stack`] guard removes them, and every container, network and volume of its own
//! compose project, when the test ends. Nothing else on the engine is touched.
//!
//! - v1 and v2 serve `/api/v1/status/` (healthy); v3 does not (broken).
//! - `pull = false` (the images exist only here) except where a missing image must fail
//!   at `pull`.
//! - Every test runs twice, under Compose v1 (`docker-compose`, Debian 12's package) and
//!   v2 (the `docker compose` plugin, which scripts/install-compose-v2 takes from Debian
//!   13's package): [`compose_matrix!`] makes `compose::v1::NAME` and `compose::v2::NAME`,
//!   each passing its `compose_command` explicitly. A compose that is not installed
//!   fails the test under `CI=true` (see `deployctl_e2e::require`).
//! - Detection (no `compose_command`) has its own test: v2 first when both are there.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deployctl_e2e::require::require;
use deployctl_e2e::{Agent, Output, SshdOptions, bin};

use crate::support::Site;

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// The compose a test runs under; the agent gets it as `compose_command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Compose {
    pub(crate) command: &'static str,
}

/// Compose v1, the standalone Python tool (Debian 12's `docker-compose` 1.29).
pub(crate) const V1: Compose = Compose {
    command: "docker-compose",
};
/// Compose v2, the Docker CLI plugin.
pub(crate) const V2: Compose = Compose {
    command: "docker compose",
};

impl Compose {
    /// Whether it runs here; when it does not, the test fails under `CI=true` and is
    /// skipped with a note elsewhere.
    pub(crate) fn available(self) -> bool {
        require(
            self.command,
            "the compose end-to-end tests run under v1 and v2 (scripts/test installs both)",
        )
    }

    /// The `compose_command = "..."` line of a `[compose]` table.
    pub(crate) fn config_line(self) -> String {
        format!("compose_command = \"{}\"", self.command)
    }
}

/// `compose::v1::NAME` and `compose::v2::NAME` for each `fn NAME(c: Compose)` listed.
macro_rules! compose_matrix {
    ($($name:ident),* $(,)?) => {
        mod v1 {
            $(
                #[test]
                fn $name() {
                    if $crate::compose::V1.available() {
                        super::$name($crate::compose::V1);
                    }
                }
            )*
        }
        mod v2 {
            $(
                #[test]
                fn $name() {
                    if $crate::compose::V2.available() {
                        super::$name($crate::compose::V2);
                    }
                }
            )*
        }
    };
}
pub(crate) use compose_matrix;

/// The images and compose project of one test; removed on drop.
pub(crate) struct Stack {
    compose: Compose,
    project: String,
    /// `v1`, `v2`, `v3` (healthy, healthy, broken).
    images: Vec<String>,
    port: u16,
}

impl Stack {
    pub(crate) fn new(compose: Compose) -> Stack {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let repo = format!("deployctl-e2e/web-{id}");
        let mut stack = Stack {
            compose,
            project: format!("e2e-{id}"),
            images: Vec::new(),
            port: free_port(),
        };
        for (tag, healthy) in [("v1", true), ("v2", true), ("v3", false)] {
            let image = format!("{repo}:{tag}");
            import_image(&image, tag, healthy);
            stack.images.push(image);
        }
        stack
    }

    fn image(&self, tag: &str) -> &str {
        let i = match tag {
            "v1" => 0,
            "v2" => 1,
            "v3" => 2,
            other => panic!("no image {other}"),
        };
        &self.images[i]
    }

    /// Writes the compose file, the env file and deploy.toml (`compose` table extra
    /// lines in `compose_extra`).
    fn configure(&self, s: &Site, compose_extra: &str) {
        self.configure_with(s, compose_extra, 20);
    }

    /// Like [`Stack::configure`] with `retries` health checks, 250 ms apart.
    fn configure_with(&self, s: &Site, compose_extra: &str, retries: u32) {
        s.env.write("docker-compose.yml", COMPOSE_FILE);
        s.env.write(
            ".env.test",
            format!(
                "# the image is pinned by CI\nWEB_IMAGE=${{E2E_WEB_IMAGE}}\nWEB_PORT={}\n",
                self.port
            ),
        );
        s.write_config(
            "strategy = \"compose\"",
            &format!(
                r#"[defaults.compose]
files = ["docker-compose.yml"]
env_file = ".env.test"
project = "{project}"
pull = false
{command}
{compose_extra}

[defaults.health]
url = "http://127.0.0.1:{port}/api/v1/status/"
retries = {retries}
interval = "250ms"
request_timeout = "2s"
"#,
                project = self.project,
                port = self.port,
                command = self.compose.config_line(),
            ),
        );
    }

    /// `deployctl push test` with `E2E_WEB_IMAGE` set to image `tag`.
    pub(crate) fn push(&self, s: &Site, tag: &str, extra: &[&str]) -> Output {
        let mut args = vec!["push", "test", "--version", tag];
        args.extend_from_slice(extra);
        s.run_env(&args, &[("E2E_WEB_IMAGE", self.image(tag))])
    }

    /// `(service, state)` of every container of the project, sorted.
    fn containers(&self) -> Vec<(String, String)> {
        let out = docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--format",
            "{{.Label \"com.docker.compose.service\"}} {{.ID}}",
        ]);
        let mut list: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(service, id)| {
                let state = docker(&["inspect", "--format", "{{.State.Status}}", id]);
                (service.to_owned(), state.trim().to_owned())
            })
            .collect();
        list.sort();
        list
    }

    /// The container id serving `service`.
    pub(crate) fn container_id(&self, service: &str) -> String {
        docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ])
        .trim()
        .to_owned()
    }

    /// The body of `GET /` on the published port (which version serves).
    fn serving(&self) -> String {
        http_get(self.port, "/").1.trim().to_owned()
    }

    fn assert_one_running_container_per_service(&self) {
        assert_eq!(
            self.containers(),
            [
                ("web".to_owned(), "running".to_owned()),
                ("worker".to_owned(), "running".to_owned())
            ],
            "exactly one running container per service"
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Only what carries our own project label, then our own images.
        let label = format!("label=com.docker.compose.project={}", self.project);
        let ids = docker_quiet(&["ps", "-a", "-q", "--filter", &label]);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            docker_quiet(&[&["rm", "-f", "-v"], ids.as_slice()].concat());
        }
        for what in ["network", "volume"] {
            let ids = docker_quiet(&[what, "ls", "-q", "--filter", &label]);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                docker_quiet(&[&[what, "rm"], ids.as_slice()].concat());
            }
        }
        let images: Vec<&str> = self.images.iter().map(String::as_str).collect();
        docker_quiet(&[&["image", "rm", "-f"], images.as_slice()].concat());
    }
}

/// Two services from one image: `web` publishes the port, `worker` does not. Busybox
/// httpd ignores SIGTERM as PID 1, so stopping it would wait 10 s for nothing.
const COMPOSE_FILE: &str = r#"services:
  web:
    image: ${WEB_IMAGE}
    stop_signal: SIGKILL
    ports:
      - "127.0.0.1:${WEB_PORT}:8080"
  worker:
    image: ${WEB_IMAGE}
    stop_signal: SIGKILL
"#;

/// A rootfs of the static busybox and a `www/` tree, imported as `image`; `healthy`
/// decides whether `www/api/v1/status/index.html` exists.
pub(crate) fn import_image(image: &str, version: &str, healthy: bool) {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .expect("static busybox (busybox-static) is installed");
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, path, data).unwrap();
    };
    add(
        "bin/busybox",
        0o755,
        &std::fs::read(busybox).expect("read busybox"),
    );
    add("www/index.html", 0o644, format!("{version}\n").as_bytes());
    if healthy {
        add(
            "www/api/v1/status/index.html",
            0o644,
            format!("ok {version}\n").as_bytes(),
        );
    }
    let data = tar.into_inner().unwrap();
    let mut child = Command::new("docker")
        .args([
            "import",
            "--change",
            r#"CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]"#,
            "-",
            image,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run docker (is Docker installed?)");
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker import {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// For cleanup: never panics.
pub(crate) fn docker_quiet(args: &[&str]) -> String {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// `(status, body)`, or `(0, error)` when nothing answers.
fn http_get(port: u16, path: &str) -> (u16, String) {
    let attempt = || -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    };
    attempt().unwrap_or_else(|e| (0, e.to_string()))
}

pub(crate) fn site(stack: &Stack, compose_extra: &str) -> Site {
    let s = Site::ssh(SshdOptions::default());
    stack.configure(&s, compose_extra);
    s
}

fn current(s: &Site) -> Option<String> {
    std::fs::read_link(s.deploy_to.join("current"))
        .ok()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
}

fn release_ids(s: &Site) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(s.deploy_to.join("releases"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    ids
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn v1_then_v2_are_healthy_and_the_release_holds_exactly_what_was_deployed(c: Compose) {
    let stack = Stack::new(c);
    let s = site(&stack, "");

    let out = stack.push(&s, "v1", &[]);
    out.assert_success();
    assert_eq!(stack.serving(), "v1", "{out}");
    assert_eq!(http_get(stack.port, "/api/v1/status/").0, 200);
    // compose was detected and ran `up` with the project and the release's files
    assert!(
        out.stderr
            .contains("up -d --force-recreate --remove-orphans"),
        "{out}"
    );
    assert!(
        out.stderr.contains(&format!("-p {}", stack.project)),
        "{out}"
    );

    // The release dir holds the compose file and the rendered env file, nothing else
    // (besides the agent's own `.deploy/` metadata).
    let release: PathBuf = s.deploy_to.join("current");
    assert_eq!(
        dir_names(&release),
        [".deploy", ".env.test", "docker-compose.yml"]
    );
    assert_eq!(
        std::fs::read_to_string(release.join("docker-compose.yml")).unwrap(),
        COMPOSE_FILE
    );
    let env_file = std::fs::read_to_string(release.join(".env.test")).unwrap();
    assert_eq!(
        env_file,
        format!(
            "# the image is pinned by CI\nWEB_IMAGE={}\nWEB_PORT={}\n",
            stack.image("v1"),
            stack.port
        )
    );
    stack.assert_one_running_container_per_service();

    let out = stack.push(&s, "v2", &[]);
    out.assert_success();
    assert_eq!(stack.serving(), "v2", "{out}");
    stack.assert_one_running_container_per_service();
    let env_file = std::fs::read_to_string(s.deploy_to.join("current").join(".env.test")).unwrap();
    assert!(env_file.contains(stack.image("v2")), "{env_file}");

    let status = s.run(&["status", "test", "--json"]);
    status.assert_success();
    assert_eq!(
        status.json()["hosts"][0]["status"]["current"]["version"],
        "v2",
        "{status}"
    );
}

fn a_broken_v3_rolls_back_to_v2_and_rollback_to_v1_serves_v1(c: Compose) {
    let stack = Stack::new(c);
    let s = site(&stack, "");
    stack.push(&s, "v1", &[]).assert_success();
    stack.push(&s, "v2", &[]).assert_success();
    let v2_release = current(&s).unwrap();

    let out = stack.push(&s, "v3", &[]);
    out.assert_exit(1);
    assert!(out.stdout.contains("rolled_back"), "{out}");
    assert_eq!(current(&s).as_deref(), Some(v2_release.as_str()));
    assert_eq!(stack.serving(), "v2", "v2 serves again: {out}");
    stack.assert_one_running_container_per_service();
    // The report carries `ps` and the services' last log lines.
    assert!(out.stdout.contains("ps -a"), "{out}");
    // See: #12 (v2's `logs` prints nothing for services that logged nothing, and the
    // report left the step out)
    assert!(out.stdout.contains("logs --tail 50 --no-color"), "{out}");
    assert!(
        out.stdout.contains("web_1") || out.stdout.contains("web-1"),
        "{out}"
    );
    let json = stack.push(&s, "v3", &["--json"]);
    json.assert_exit(1);
    let doc = json.json();
    let steps = doc["hosts"][0]["report"]["steps"]
        .as_array()
        .unwrap()
        .clone();
    let logs = steps
        .iter()
        .find(|st| {
            st["command"]
                .as_str()
                .is_some_and(|c| c.contains(" logs --tail 50"))
        })
        .unwrap_or_else(|| panic!("no logs step: {json}"));
    // busybox httpd logs nothing, but the logs step ran against the failed release
    assert!(
        logs["error"].as_str().unwrap().contains("log lines"),
        "{json}"
    );
    assert_eq!(stack.serving(), "v2");

    let out = s.run(&["rollback", "test", "--to", "v1"]);
    out.assert_success();
    assert_eq!(stack.serving(), "v1", "{out}");
    stack.assert_one_running_container_per_service();
    let env_file = std::fs::read_to_string(s.deploy_to.join("current").join(".env.test")).unwrap();
    assert!(env_file.contains(stack.image("v1")), "{env_file}");
}

fn a_failed_first_deploy_leaves_no_containers_behind(c: Compose) {
    let stack = Stack::new(c);
    let s = site(&stack, "");
    let out = stack.push(&s, "v3", &[]);
    out.assert_exit(1);
    assert_eq!(current(&s), None, "{out}");
    assert!(stack.containers().is_empty(), "{:?}", stack.containers());
    // and the next good one goes live as usual
    stack.push(&s, "v1", &[]).assert_success();
    assert_eq!(stack.serving(), "v1");
}

fn a_compose_file_that_does_not_parse_fails_before_anything_changes(c: Compose) {
    let stack = Stack::new(c);
    let s = site(&stack, "");
    stack.push(&s, "v1", &[]).assert_success();
    let before = (current(&s), stack.container_id("web"));

    // See: #12 (v2 said only "yaml: line 2: ...": no file, and the wrong line)
    s.env.write(
        "broken.yml",
        "services:\n  web:\n\timage: x\n  worker: {}\n",
    );
    let out = stack.push(&s, "v2", &["--compose", "broken.yml"]);
    out.assert_exit(2);
    // found before anything is sent, naming the file and where in it
    assert!(out.stderr.contains("broken.yml"), "{out}");
    assert!(out.stderr.contains("not valid YAML"), "{out}");
    assert!(out.stderr.contains("line 3"), "{out}");
    assert!(out.stderr.contains("nothing was changed"), "{out}");
    assert_eq!((current(&s), stack.container_id("web")), before, "{out}");
    assert_eq!(
        release_ids(&s).len(),
        1,
        "nothing reached the server: {out}"
    );
    assert_eq!(stack.serving(), "v1");
    stack.assert_one_running_container_per_service();
}

fn a_compose_file_that_compose_refuses_fails_at_config_before_anything_changes(c: Compose) {
    let stack = Stack::new(c);
    let s = site(&stack, "");
    stack.push(&s, "v1", &[]).assert_success();
    let before = (current(&s), stack.container_id("web"));

    // valid YAML, but not a valid compose file: compose's `config -q` says why
    s.env.write(
        "unknown-key.yml",
        "services:\n  web:\n    image: ${WEB_IMAGE}\n    imagee: typo\n",
    );
    let out = stack.push(&s, "v2", &["--compose", "unknown-key.yml"]);
    out.assert_exit(1);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("the compose files do not validate"), "{out}");
    // compose's own words, naming the key (v1: "Unsupported config option for
    // services.web: 'imagee'", v2: "services.web Additional property imagee is not
    // allowed")
    assert!(all.contains("imagee"), "{out}");
    assert_eq!((current(&s), stack.container_id("web")), before, "{out}");
    assert_eq!(stack.serving(), "v1");
    stack.assert_one_running_container_per_service();
}

fn an_image_that_does_not_exist_fails_at_pull_before_anything_changes(c: Compose) {
    let stack = Stack::new(c);
    let s = site(&stack, "");
    stack.push(&s, "v1", &[]).assert_success();
    let before = (current(&s), stack.container_id("web"));

    // A registry on a port nothing listens on: fails at once, needs no network.
    s.env.write(
        "missing.yml",
        "services:\n  web:\n    image: 127.0.0.1:1/deployctl-e2e/missing:v1\n",
    );
    let out = s.run_env(
        &["push", "test", "--compose", "missing.yml"],
        &[
            ("E2E_WEB_IMAGE", stack.image("v2")),
            ("DEPLOYCTL_COMPOSE_PULL", "true"),
        ],
    );
    out.assert_exit(1);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("pull failed, nothing was recreated"), "{out}");
    assert!(all.contains("127.0.0.1:1"), "{out}");
    assert_eq!((current(&s), stack.container_id("web")), before, "{out}");
    assert_eq!(stack.serving(), "v1");
    stack.assert_one_running_container_per_service();
}

fn a_missing_env_var_is_exit_2_naming_it_and_nothing_changes(c: Compose) {
    let stack = Stack::new(c);
    let s = site(&stack, "");
    let out = s.run(&["push", "test"]);
    out.assert_exit(2);
    assert!(out.stderr.contains("E2E_WEB_IMAGE"), "{out}");
    assert!(out.stderr.contains(".env.test"), "{out}");
    assert!(out.stderr.contains("line 2"), "{out}");
    assert!(!s.deploy_to.exists(), "nothing reached the server");
    assert!(stack.containers().is_empty());
}

fn docker_not_reachable_is_a_clear_error_and_nothing_changes(c: Compose) {
    let stack = Stack::new(c);
    let s = Site::ssh_with_agent_env(
        SshdOptions::default(),
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    stack.configure(&s, "");
    let out = stack.push(&s, "v1", &[]);
    out.assert_exit(1);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("Docker is not running or not reachable"),
        "{out}"
    );
    assert!(all.contains("/nonexistent/docker.sock"), "{out}");
    assert_eq!(current(&s), None);
    assert!(stack.containers().is_empty());
}

fn compose_command_and_the_compose_flag_are_honoured(c: Compose) {
    let stack = Stack::new(c);
    let s = site(&stack, "");
    let other = if c == V1 { V2 } else { V1 };
    // --compose replaces compose.files; the file keeps its name in the release
    s.env.write("other.yml", COMPOSE_FILE);
    let out = stack.push(&s, "v1", &["--compose", "other.yml"]);
    out.assert_success();
    assert!(
        out.stderr
            .contains(&format!("{} -p {} -f other.yml", c.command, stack.project)),
        "{out}"
    );
    assert!(
        out.stderr.contains(&format!("using `{}`", c.command)),
        "{out}"
    );
    // no detection: the other compose is never tried
    assert!(
        !out.stderr.contains(&format!("{} -p", other.command)),
        "{out}"
    );
    assert!(
        !out.stderr.contains(&format!("{} version", other.command)),
        "{out}"
    );
    assert_eq!(
        dir_names(&s.deploy_to.join("current")),
        [".deploy", ".env.test", "other.yml"]
    );
    assert_eq!(stack.serving(), "v1");
    // A rollback runs each release with its own files: v2 uses docker-compose.yml.
    stack.push(&s, "v2", &[]).assert_success();
    let out = s.run(&["rollback", "test"]);
    out.assert_success();
    assert!(out.stderr.contains("-f other.yml"), "{out}");
    assert_eq!(stack.serving(), "v1");
    stack.assert_one_running_container_per_service();
    assert_eq!(release_ids(&s).len(), 2);
}

fn an_agent_killed_mid_deploy_recovers_with_compose_up(c: Compose) {
    let stack = Stack::new(c);
    let s = Site::ssh(SshdOptions::default());
    // A long health window, so the agent can be killed while it checks.
    stack.configure_with(&s, "", 60);
    stack.push(&s, "v1", &[]).assert_success();
    let v1_release = current(&s).unwrap();

    let mut cmd = Command::new(bin("deployctl"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DEPLOYCTL_") || k == "SSH_AUTH_SOCK" {
            cmd.env_remove(&k);
        }
    }
    let mut bg = cmd
        .args(["push", "test", "--version", "v3"])
        .current_dir(s.env.root())
        .env("E2E_WEB_IMAGE", stack.image("v3"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let journal = s.deploy_to.join(".deploy/journal.json");
    let read_journal = || -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(&journal).ok()?).ok()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let v3_release = loop {
        if let Some(j) = read_journal()
            && j["phase"] == "checking"
            && current(&s).as_deref() == j["release"].as_str()
        {
            break current(&s).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the v3 deploy never reached its health check\n{}",
            s.agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut s = s;
    s.agent.kill9();
    let _ = bg.wait();
    // `up` has returned, but httpd in the new container may not listen yet (v2 returns
    // sooner than v1): poll, with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let serving = stack.serving();
        if serving == "v3" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broken release is up, mid-check: {serving}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A new agent finds the journal: the check fails again, so it rolls back with the
    // previous release's compose files.
    s.agent = Agent::start(&s.env.path("agent"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while read_journal().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "recovery did not finish\n{}",
            s.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = s.agent.log();
    assert_eq!(current(&s), Some(v1_release), "{log}");
    assert_eq!(stack.serving(), "v1", "{log}");
    assert!(
        log.contains("up -d --force-recreate --remove-orphans"),
        "recovery ran compose up: {log}"
    );
    stack.assert_one_running_container_per_service();
    let history = s.run(&["history", "test", "--json"]);
    history.assert_success();
    let entries = history.json()["hosts"][0]["history"].clone();
    let entry = entries
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["release"] == v3_release.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no history entry for v3: {history}"));
    assert_eq!(entry["outcome"], "rolled_back", "{entry}");
}

fn a_dollar_in_an_env_value_reaches_the_container_as_it_is(c: Compose) {
    // See: #12 (v2 expands `$word` and `$$` in an unquoted env-file value; v1 does not)
    let stack = Stack::new(c);
    let s = site(&stack, "");
    s.env.write(
        "docker-compose.yml",
        format!("{COMPOSE_FILE}    environment:\n      SECRET: ${{SECRET}}\n"),
    );
    s.env.write(
        ".env.test",
        format!(
            "WEB_IMAGE=${{E2E_WEB_IMAGE}}\nWEB_PORT={}\nSECRET=${{E2E_SECRET}}\n",
            stack.port
        ),
    );
    let secret = "pa$word$$x";
    let out = s.run_env(
        &["push", "test", "--version", "v1"],
        &[("E2E_WEB_IMAGE", stack.image("v1")), ("E2E_SECRET", secret)],
    );
    out.assert_success();
    let env = docker(&[
        "inspect",
        "--format",
        "{{range .Config.Env}}{{println .}}{{end}}",
        &stack.container_id("worker"),
    ]);
    assert!(
        env.lines().any(|l| l == format!("SECRET={secret}")),
        "the worker's environment: {env}"
    );
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(!all.contains(secret), "the value is masked: {out}");
}

/// Without `compose_command` the agent detects compose: the v2 plugin first, as on a
/// server that has both (as this machine does: scripts/test installs both).
#[test]
fn detection_prefers_the_v2_plugin_when_both_are_installed() {
    if !(V1.available() && V2.available()) {
        return;
    }
    let stack = Stack::new(V2);
    let s = Site::ssh(SshdOptions::default());
    stack.configure(&s, "");
    // the same config without the compose_command line
    let config = std::fs::read_to_string(s.env.path("deploy.toml")).unwrap();
    s.env
        .write("deploy.toml", config.replace(&V2.config_line(), ""));
    let out = stack.push(&s, "v1", &[]);
    out.assert_success();
    assert!(out.stderr.contains("using `docker compose`"), "{out}");
    assert!(out.stderr.contains("docker compose -p"), "{out}");
    assert_eq!(stack.serving(), "v1");
    let out = stack.push(&s, "v3", &[]);
    out.assert_exit(1);
    assert_eq!(stack.serving(), "v1");
    stack.assert_one_running_container_per_service();
}

/// Promotion copies the rendered files: production runs the very image references
/// staging ran, whatever production's own environment says.
fn promote_ships_staging_s_pinned_images_to_production(c: Compose) {
    let stack = Stack::new(c);
    let staging = Site::ssh(SshdOptions::default());
    let production = Site::ssh(SshdOptions::default());
    let dir = &staging.env;
    dir.write("docker-compose.yml", COMPOSE_FILE);
    dir.write(
        ".env.test",
        format!("WEB_IMAGE=${{E2E_WEB_IMAGE}}\nWEB_PORT={}\n", stack.port),
    );
    dir.write(
        "known_hosts",
        format!(
            "{}\n{}\n",
            staging.sshd().known_hosts_line(),
            production.sshd().known_hosts_line()
        ),
    );
    let env_section = |name: &str, s: &Site, project: &str, extra: &str| {
        format!(
            r#"[environments.{name}]
{extra}
hosts = ["{host}"]
deploy_to = "{deploy_to}"
ssh_key = "{key}"
agent_socket = "{socket}"
[environments.{name}.compose]
project = "{project}"
"#,
            host = s.host(),
            deploy_to = s.deploy_to.display(),
            key = s.sshd().client_key.display(),
            socket = s.agent.socket.display(),
        )
    };
    let staging_project = format!("{}-stg", stack.project);
    dir.write(
        "deploy.toml",
        format!(
            r#"app = "app"
deploy_to = "/unused"

[defaults]
strategy = "compose"
known_hosts = "{kh}"
agent_bin = "{agent}"
connect_timeout = "5s"
connect_retries = 1

[defaults.compose]
files = ["docker-compose.yml"]
env_file = ".env.test"
pull = false
{command}

[defaults.health]
url = "http://127.0.0.1:{port}/api/v1/status/"
retries = 20
interval = "250ms"

{staging}
{production}
"#,
            kh = dir.path("known_hosts").display(),
            agent = bin("deploy-agent").display(),
            port = stack.port,
            command = c.config_line(),
            staging = env_section("staging", &staging, &staging_project, ""),
            production = env_section(
                "production",
                &production,
                &stack.project,
                "promote_from = \"staging\""
            ),
        ),
    );
    let out = staging.run_env(
        &["push", "staging", "--version", "v1"],
        &[("E2E_WEB_IMAGE", stack.image("v1"))],
    );
    out.assert_success();
    // Production's own environment would pin another image: the gate refuses it.
    let out = staging.run_env(
        &["push", "production", "--version", "v2", "--yes"],
        &[("E2E_WEB_IMAGE", stack.image("v2"))],
    );
    out.assert_exit(2);
    // Free the published port (both stacks publish it on this one machine), then promote
    // what staging ran.
    let ids = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={staging_project}"),
    ]);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    assert!(!ids.is_empty(), "staging ran containers");
    docker_quiet(&[&["rm", "-f", "-v"], ids.as_slice()].concat());
    let out = staging.run_env(
        &[
            "promote",
            "staging",
            "production",
            "--version",
            "v1",
            "--yes",
        ],
        &[("E2E_WEB_IMAGE", stack.image("v2"))],
    );
    out.assert_success();
    assert_eq!(stack.serving(), "v1", "{out}");
    let read = |s: &Site| std::fs::read(s.deploy_to.join("current/.env.test")).unwrap();
    assert_eq!(read(&staging), read(&production), "byte for byte");
    assert!(
        String::from_utf8(read(&production))
            .unwrap()
            .contains(stack.image("v1"))
    );
    assert!(!stack.container_id("web").is_empty());
    // staging's project is not the Stack's: remove its network here (both compose
    // versions name it `<project>_default`)
    docker_quiet(&["network", "rm", &format!("{staging_project}_default")]);
}

compose_matrix!(
    v1_then_v2_are_healthy_and_the_release_holds_exactly_what_was_deployed,
    a_broken_v3_rolls_back_to_v2_and_rollback_to_v1_serves_v1,
    a_failed_first_deploy_leaves_no_containers_behind,
    a_compose_file_that_does_not_parse_fails_before_anything_changes,
    a_compose_file_that_compose_refuses_fails_at_config_before_anything_changes,
    an_image_that_does_not_exist_fails_at_pull_before_anything_changes,
    a_missing_env_var_is_exit_2_naming_it_and_nothing_changes,
    docker_not_reachable_is_a_clear_error_and_nothing_changes,
    compose_command_and_the_compose_flag_are_honoured,
    an_agent_killed_mid_deploy_recovers_with_compose_up,
    a_dollar_in_an_env_value_reaches_the_container_as_it_is,
    promote_ships_staging_s_pinned_images_to_production,
);
