//! Review apps end to end: `push --instance`, `destroy`, `instances`, expiry, over a real
//! sshd and the real agent, with the sample app (busybox httpd on `${DEPLOY_PORT}`) and,
//! for compose, the real Docker engine.
//!
//! Every app server a test starts is stopped by PID when the test ends ([`Servers`]):
//! any `httpd` serving a release under this test's own `<deploy_to>/instances/`.

use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use deployctl_e2e::{Agent, Output, SshdOptions};
use serde_json::Value;

use crate::compose::{Compose, compose_matrix, docker, docker_quiet, import_image};
use crate::release::{app_files, http_get, tar_gz};
use crate::support::Site;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `n` consecutive ports nothing listens on.
fn free_ports(n: u16) -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let seed = std::process::id() as u64 * 7919
        + nanos
        + UNIQUE.fetch_add(1, Ordering::Relaxed) as u64 * 104_729;
    let mut base = 20_000 + (seed % 30_000) as u16;
    loop {
        if (base..base + n).all(|p| TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).is_ok()) {
            return base;
        }
        base = 20_000 + (base - 20_000 + 97) % 30_000;
    }
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// Stops, by PID, every app server of this test's instances.
struct Servers {
    deploy_to: PathBuf,
}

impl Servers {
    fn pids(&self) -> Vec<u32> {
        let needle = format!("{}/instances/", self.deploy_to.display());
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.contains("httpd") && c.contains(&needle)
                })
            })
            .collect()
    }
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for Servers {
    fn drop(&mut self) {
        let pids = self.pids();
        for &p in &pids {
            kill(p, "TERM");
        }
        thread::sleep(Duration::from_millis(200));
        for p in self.pids() {
            kill(p, "KILL");
        }
    }
}

/// A site with the sample app configured as a review-app environment `test` (ports
/// `first..first+3`), plus an environment `plain` without instances on the same host.
struct Review {
    // Dropped first: the servers, then sshd, agent and the temp dir.
    _servers: Servers,
    site: Site,
    first: u16,
}

impl Review {
    fn new(instance_ttl: Option<&str>, agent_env: &[(&str, &str)]) -> Review {
        let site = Site::ssh_with_agent_env(SshdOptions::default(), agent_env);
        let first = free_ports(3);
        let r = Review {
            _servers: Servers {
                deploy_to: site.deploy_to.clone(),
            },
            site,
            first,
        };
        r.config(instance_ttl);
        r
    }

    fn config(&self, instance_ttl: Option<&str>) {
        let ttl = instance_ttl
            .map(|t| format!("instance_ttl = \"{t}\"\n"))
            .unwrap_or_default();
        let (first, last) = (self.first, self.first + 2);
        let host = self.site.host();
        self.site.write_config(
            "keep_releases = 3",
            &format!(
                r#"instances = true
instance_ports = "{first}-{last}"
url_template = "http://127.0.0.1:${{DEPLOY_PORT}}/?pr=${{DEPLOY_INSTANCE}}"
{ttl}
[environments.plain]
hosts = ["{host}"]

[defaults.release]
shared = ["log"]
migrate = "bin/migrate"
restart = "APP_PORT=${{DEPLOY_PORT}} APP_SERVER='busybox httpd -f' bin/restart"
stop = "bin/stop"
timeout = "30s"

[defaults.health]
url = "http://127.0.0.1:${{DEPLOY_PORT}}/api/v1/status/"
retries = 25
interval = "200ms"
request_timeout = "1s"
"#
            ),
        );
    }

    fn run(&self, args: &[&str]) -> Output {
        self.site.run(args)
    }

    /// `push test --instance NAME` of the sample app labelled `version`.
    fn push(&self, instance: &str, version: &str) -> Output {
        let art = self.site.env.write(
            &format!("dist/{version}.tar.gz"),
            tar_gz(&app_files(version)),
        );
        self.run(&[
            "push",
            "test",
            &format!("--instance={instance}"),
            "--artifact",
            art.to_str().unwrap(),
            "--version",
            version,
        ])
    }

    fn instance_dir(&self, name: &str) -> PathBuf {
        self.site.deploy_to.join("instances").join(name)
    }

    /// `instances test --json`: name -> the instance's document.
    fn instances(&self) -> serde_json::Map<String, Value> {
        let out = self.run(&["instances", "test", "--json"]);
        out.assert_success();
        out.json()["hosts"][0]["instances"]
            .as_array()
            .unwrap_or_else(|| panic!("no instances array: {out}"))
            .iter()
            .map(|i| (i["name"].as_str().unwrap().to_owned(), i.clone()))
            .collect()
    }

    fn port(&self, name: &str) -> u16 {
        let all = self.instances();
        all.get(name)
            .and_then(|i| i["port"].as_u64())
            .unwrap_or_else(|| panic!("{name} has no port: {all:?}")) as u16
    }

    /// The app's own history (destroy and expire land there).
    fn base_history(&self) -> Vec<Value> {
        let out = self.run(&["history", "test", "--json"]);
        out.assert_success();
        out.json()["hosts"][0]["history"]
            .as_array()
            .unwrap()
            .clone()
    }
}

#[track_caller]
fn assert_serves(port: u16, version: &str) {
    let (code, body) = http_get(port, "/");
    assert_eq!(code, 200, "GET :{port}/ -> {code}: {body}");
    assert!(
        body.contains(&format!("sample app, version {version}<")),
        "port {port} should serve {version}: {body}"
    );
}

#[track_caller]
fn assert_nothing_answers(port: u16) {
    let (code, body) = http_get(port, "/");
    assert_eq!(code, 0, "port {port} still answers: {body}");
}

#[track_caller]
fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn all_output(out: &Output) -> String {
    format!("{}\n{}", out.stdout, out.stderr)
}

// ---------------------------------------------------------------------------------------------
// Release strategy
// ---------------------------------------------------------------------------------------------

#[test]
fn two_instances_run_side_by_side_and_destroy_frees_the_port_for_the_next() {
    let r = Review::new(None, &[]);
    let out = r.push("pr-1", "one");
    out.assert_success();
    r.push("pr-2", "two").assert_success();
    let (p1, p2) = (r.port("pr-1"), r.port("pr-2"));
    assert_eq!(
        (p1, p2),
        (r.first, r.first + 1),
        "lowest free ports, in order"
    );
    // each instance is healthy on its own port, at the same time
    assert_serves(p1, "one");
    assert_serves(p2, "two");

    // an update keeps the port, and touches only its own instance
    let out = r.push("pr-1", "one-b");
    out.assert_success();
    assert!(
        out.stdout.contains("push test --instance pr-1: done"),
        "{out}"
    );
    assert_eq!(r.port("pr-1"), p1);
    assert_serves(p1, "one-b");
    assert_serves(p2, "two");

    // each has its own releases, current, history; the app's own dir has none
    let d1 = r.instance_dir("pr-1");
    assert!(d1.join("current").is_symlink());
    assert_eq!(fs::read_dir(d1.join("releases")).unwrap().count(), 2);
    assert!(!r.site.deploy_to.join("releases").exists());
    assert!(!r.site.deploy_to.join("current").exists());
    let h = r.run(&["history", "test", "--instance", "pr-1", "--json"]);
    h.assert_success();
    assert_eq!(
        h.json()["hosts"][0]["history"].as_array().unwrap().len(),
        2,
        "{h}"
    );
    let rel = r.run(&["releases", "test", "--instance", "pr-2", "--json"]);
    rel.assert_success();
    assert_eq!(
        rel.json()["hosts"][0]["releases"].as_array().unwrap().len(),
        1
    );
    // the restart ran with DEPLOY_PORT (each serves on its own port, above), and the
    // agent filled ${DEPLOY_PORT} into the health URL
    assert!(
        all_output(&out).contains(&format!("http://127.0.0.1:{p1}/api/v1/status/")),
        "{out}"
    );

    // `instances` lists both, with their ports, releases and URLs
    let list = r.instances();
    assert_eq!(list.keys().collect::<Vec<_>>(), ["pr-1", "pr-2"]);
    assert_eq!(
        list["pr-1"]["url"],
        format!("http://127.0.0.1:{p1}/?pr=pr-1"),
        "{list:?}"
    );
    assert_eq!(list["pr-2"]["port"], p2);
    assert_eq!(list["pr-2"]["current"]["version"], "two");
    assert!(list["pr-1"]["last_deploy"].is_string(), "{list:?}");
    assert!(
        list["pr-1"]["expires"].is_null(),
        "no instance_ttl: {list:?}"
    );
    let table = r.run(&["instances", "test"]);
    table.assert_success();
    assert!(table.stdout.contains("pr-2"), "{table}");
    assert!(
        table
            .stdout
            .contains(&format!("http://127.0.0.1:{p2}/?pr=pr-2")),
        "{table}"
    );

    // destroy: the server stops, the files go, the port is free; the other one serves on
    let out = r.run(&["destroy", "test", "--instance", "pr-1"]);
    out.assert_success();
    assert!(out.stdout.contains("destroyed"), "{out}");
    assert!(out.stdout.contains(&format!("{p1} (freed)")), "{out}");
    assert_nothing_answers(p1);
    assert!(!d1.exists(), "the instance dir is gone");
    assert_serves(p2, "two");
    assert_eq!(r.instances().keys().collect::<Vec<_>>(), ["pr-2"]);
    let entry = r.base_history().pop().expect("a destroy entry");
    assert_eq!(entry["action"], "destroy", "{entry}");
    assert_eq!(entry["instance"], "pr-1", "{entry}");
    assert_eq!(entry["outcome"], "removed", "{entry}");

    // again: it did not exist, and that is fine
    let out = r.run(&["destroy", "test", "--instance", "pr-1", "--json"]);
    out.assert_success();
    assert_eq!(out.json()["hosts"][0]["existed"], false, "{out}");
    let out = r.run(&["destroy", "test", "--instance", "pr-1"]);
    out.assert_success();
    assert!(out.stdout.contains("did not exist"), "{out}");
    assert!(!d1.exists(), "a second destroy leaves nothing behind");

    // the freed port goes to the next new instance
    r.push("pr-3", "three").assert_success();
    assert_eq!(r.port("pr-3"), p1);
    assert_serves(p1, "three");
    assert_serves(p2, "two");
}

#[test]
fn instance_rules_and_bad_names_are_usage_errors_and_change_nothing() {
    let r = Review::new(None, &[]);
    let long = "a".repeat(64);
    for bad in ["../x", "PR_1", "a.b", "a b", "-x", "x-", long.as_str()] {
        let out = r.push(bad, "v1");
        out.assert_exit(2);
        assert!(out.stderr.contains("not a DNS label"), "{bad}: {out}");
        let out = r.run(&["destroy", "test", &format!("--instance={bad}")]);
        out.assert_exit(2);
        assert!(out.stderr.contains("not a DNS label"), "{bad}: {out}");
    }
    // a review environment needs --instance to push, roll back or destroy
    let art = r.site.env.write("dist/x.tar.gz", tar_gz(&app_files("x")));
    let out = r.run(&["push", "test", "--artifact", art.to_str().unwrap()]);
    out.assert_exit(2);
    assert!(out.stderr.contains("--instance NAME"), "{out}");
    r.run(&["rollback", "test"]).assert_exit(2);
    r.run(&["destroy", "test"]).assert_exit(2);
    // ... and an environment without instances refuses one
    let out = r.run(&[
        "push",
        "plain",
        "--instance",
        "pr-1",
        "--artifact",
        art.to_str().unwrap(),
    ]);
    out.assert_exit(2);
    assert!(out.stderr.contains("has no review apps"), "{out}");
    r.run(&["instances", "plain"]).assert_exit(2);
    r.run(&["check", "test", "--instance", "pr-1"])
        .assert_exit(2);
    assert!(!r.site.deploy_to.exists(), "nothing reached the server");
    // the names are fine as long as they are DNS labels, even a release-like one
    r.push("20260101000000", "v1").assert_success();
    assert!(r.instance_dir("20260101000000/current").is_symlink());
    assert!(!r.site.deploy_to.join("current").exists());
    r.run(&["destroy", "test", "--instance", "20260101000000"])
        .assert_success();
}

#[test]
fn port_allocation_survives_an_agent_restart() {
    let mut r = Review::new(None, &[]);
    r.push("pr-1", "one").assert_success();
    r.push("pr-2", "two").assert_success();
    let (p1, p2) = (r.port("pr-1"), r.port("pr-2"));
    let registry = r.site.deploy_to.join(".deploy/instances.json");
    assert!(registry.is_file());

    r.site.agent.kill9();
    r.site.agent = Agent::start(&r.site.env.path("agent"));
    let out = r.push("pr-1", "one-b");
    out.assert_success();
    assert_eq!(r.port("pr-1"), p1, "{out}");
    assert_serves(p1, "one-b");
    assert_serves(p2, "two");
    // a new instance does not take a port that is held
    r.push("pr-3", "three").assert_success();
    assert_eq!(r.port("pr-3"), r.first + 2);
    // and the pool is full now: a fourth fails cleanly, before anything runs
    let out = r.push("pr-4", "four");
    assert_ne!(out.code, 0, "{out}");
    assert!(all_output(&out).contains("no free port"), "{out}");
    assert_serves(p1, "one-b");
    r.run(&["destroy", "test", "--instance", "pr-4"])
        .assert_success();
}

#[test]
fn idle_instances_expire_and_the_history_says_so() {
    let r = Review::new(Some("2s"), &[("DEPLOY_AGENT_EXPIRY_INTERVAL", "300ms")]);
    r.push("pr-1", "one").assert_success();
    let port = r.port("pr-1");
    assert_serves(port, "one");
    let list = r.instances();
    assert!(list["pr-1"]["expires"].is_string(), "{list:?}");
    let dir = r.instance_dir("pr-1");
    wait_until(Duration::from_secs(20), "pr-1 expired", || !dir.exists());
    assert_nothing_answers(port);
    assert!(r.instances().is_empty());
    let entry = r.base_history().pop().expect("an expire entry");
    assert_eq!(entry["action"], "expire", "{entry}");
    assert_eq!(entry["instance"], "pr-1", "{entry}");
    assert_eq!(entry["outcome"], "removed", "{entry}");
    assert!(
        entry["holder"].as_str().unwrap().contains("instance_ttl"),
        "{entry}"
    );
    let h = r.run(&["history", "test"]);
    assert!(h.stdout.contains("expire pr-1"), "{h}");
    // its port is free for the next one
    r.push("pr-2", "two").assert_success();
    assert_eq!(r.port("pr-2"), port);
}

// ---------------------------------------------------------------------------------------------
// Compose
// ---------------------------------------------------------------------------------------------

/// A web service on the instance's port, and a "database" with a named volume.
const COMPOSE_FILE: &str = r#"services:
  web:
    image: ${WEB_IMAGE}
    stop_signal: SIGKILL
    ports:
      - "127.0.0.1:${DEPLOY_PORT}:8080"
  db:
    image: ${WEB_IMAGE}
    stop_signal: SIGKILL
    volumes:
      - data:/data
volumes:
  data:
"#;

/// The image and both compose projects (the app's and its instance's) of one test;
/// removed on drop, by label.
struct ComposeGuard {
    image: String,
    projects: Vec<String>,
}

impl Drop for ComposeGuard {
    fn drop(&mut self) {
        for project in &self.projects {
            let label = format!("label=com.docker.compose.project={project}");
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
        }
        docker_quiet(&["image", "rm", "-f", &self.image]);
    }
}

fn labelled(what: &[&str], project: &str) -> Vec<String> {
    let label = format!("label=com.docker.compose.project={project}");
    let mut args = what.to_vec();
    args.extend(["-q", "--filter", &label]);
    docker(&args)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn a_compose_instance_is_its_own_project_and_destroy_removes_its_volume(c: Compose) {
    let id = format!(
        "{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    );
    let project = format!("e2e-ra-{id}");
    let instance_project = format!("{project}-pr-1");
    let guard = ComposeGuard {
        image: format!("deployctl-e2e/review-{id}:v1"),
        projects: vec![project.clone(), instance_project.clone()],
    };
    import_image(&guard.image, "v1", true);
    let s = Site::ssh(SshdOptions::default());
    let first = free_ports(2);
    s.env.write("docker-compose.yml", COMPOSE_FILE);
    s.env.write(".env.test", "WEB_IMAGE=${E2E_WEB_IMAGE}\n");
    s.write_config(
        "strategy = \"compose\"",
        &format!(
            r#"instances = true
instance_ports = "{first}-{last}"

[defaults.compose]
files = ["docker-compose.yml"]
env_file = ".env.test"
project = "{project}"
pull = false
{command}

[defaults.health]
url = "http://127.0.0.1:${{DEPLOY_PORT}}/api/v1/status/"
retries = 40
interval = "250ms"
request_timeout = "2s"
"#,
            last = first + 1,
            command = c.config_line(),
        ),
    );
    let env = [("E2E_WEB_IMAGE", guard.image.as_str())];
    let out = s.run_env(
        &["push", "test", "--instance", "pr-1", "--version", "v1"],
        &env,
    );
    out.assert_success();
    assert!(
        out.stderr.contains(&format!("-p {instance_project}")),
        "{out}"
    );
    let (code, body) = http_get(first, "/");
    assert_eq!((code, body.trim()), (200, "v1"), "{out}");
    // both services run under the instance's project; the app's own project has none
    assert_eq!(labelled(&["ps"], &instance_project).len(), 2, "{out}");
    assert!(labelled(&["ps", "-a"], &project).is_empty());
    assert_eq!(labelled(&["volume", "ls"], &instance_project).len(), 1);
    // the rendered env file carries the instance and its port
    let env_file =
        fs::read_to_string(s.deploy_to.join("instances/pr-1/current").join(".env.test")).unwrap();
    assert!(
        env_file.ends_with(&format!("DEPLOY_INSTANCE=pr-1\nDEPLOY_PORT={first}\n")),
        "{env_file}"
    );

    let out = s.run_env(&["destroy", "test", "--instance", "pr-1"], &env);
    out.assert_success();
    assert!(
        all_output(&out).contains("down -v --remove-orphans"),
        "{out}"
    );
    assert!(
        labelled(&["ps", "-a"], &instance_project).is_empty(),
        "{out}"
    );
    assert!(
        labelled(&["volume", "ls"], &instance_project).is_empty(),
        "its database volume is gone: {out}"
    );
    assert_eq!(http_get(first, "/").0, 0, "nothing answers on its port");
    assert!(!s.deploy_to.join("instances/pr-1").exists());
    drop(s);
    drop(guard);
}

// Under Compose v1 and v2: review_apps::v1::... and review_apps::v2::...
compose_matrix!(a_compose_instance_is_its_own_project_and_destroy_removes_its_volume);
