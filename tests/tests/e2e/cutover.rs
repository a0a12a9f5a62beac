//! The cutover proof rig (#13 item 4): a real nginx in front of the app, a steady load of
//! 150 requests per second through it (each on a new connection), and deploys in between.
//!
//! Today's tests measure the baseline the cutover must beat: a plain `restart` (release
//! strategy) and `up --force-recreate` (compose) leave a gap in which requests through the
//! proxy fail, and these tests assert that they DO fail, and print how many. The
//! zero-failure tests for `[cutover]` / `compose.zero_downtime` go beside them, on the same
//! rig: [`ReleaseRig`] (sshd, agent, the sample app, nginx from `deployctl_e2e::nginx`) and
//! [`ComposeRig`] (the compose project with an nginx service routing to `web` by name).
//!
//! The app boots like a real one: the sample app's `bin/restart` with
//! `APP_BOOT_SECONDS=0.3` (release strategy), and a web image (nginx, built FROM the proxy
//! image) that sleeps 0.3 s before it listens (compose). No other sleeps are added.
//!
//! For `[cutover]` the sample app runs one server per slot, each with its own pid file,
//! and nginx's own switch command moves the proxy (pass this as `tail` to
//! [`ReleaseRig::configure_restart`], with the health URL on `${DEPLOY_PORT}`):
//!
//! ```text
//! [defaults.cutover]
//! ports = [P1, P2]
//! start = "APP_PORT=${DEPLOY_PORT} APP_PIDFILE=log/app-${DEPLOY_PORT}.pid APP_BOOT_SECONDS=0.3 APP_SERVER='busybox httpd -f' bin/restart"
//! stop = "APP_PIDFILE=log/app-${DEPLOY_PORT}.pid bin/stop"
//! switch = '''<rig.nginx.switch_command()>'''   # a TOML literal string: it holds " and \
//! drain = "1s"
//! ```
//!
//! [`ComposeRig::configure`] takes `zero_downtime = ["web"]` as its `compose_extra`; `web`
//! already has a Docker healthcheck and publishes no port. Note that `proxy` is a service
//! of the project too: recreating it (as `up --force-recreate` does today) is a gap of its
//! own: the compose baseline's connect errors come from it (its 502/504s from `web`).
//!
//! What the compose proxy needs (measured on this rig, see `cutover_compose.rs` and
//! `tests/nginx/build-image`): a stopped container's address stays in nginx's resolver
//! cache for up to 2 s and a connect to it gets no answer, hence the image's 250 ms
//! `proxy_connect_timeout` (nginx moves the request on to the new container); with 2 s,
//! requests waited past the load's 2 s bound.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use deployctl_e2e::load::{Load, LoadConfig, LoadReport};
use deployctl_e2e::nginx::{self, Nginx};
use deployctl_e2e::require::missing;
use deployctl_e2e::{Output, SshdOptions};

use crate::compose::{Compose, compose_matrix, docker, docker_quiet};
use crate::release::{AppGuard, app_files, free_port, tar_gz};
use crate::support::Site;

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// How long the app takes to boot before it listens (a real app loads its code and
/// connects to its database; busybox httpd would listen at once).
pub(crate) const BOOT_SECONDS: &str = "0.3";
/// Deploys per baseline run.
const BASELINE_DEPLOYS: usize = 3;

/// Starts the load at 150 requests/s of `GET path` on `port` and waits (30 s) until the
/// first second of it went through, so every deploy after this happens under load.
pub(crate) fn start_load(port: u16, path: &str) -> Load {
    let load = Load::start(
        port,
        LoadConfig {
            path: path.to_owned(),
            ..LoadConfig::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while load.sent() < 150 {
        assert!(
            Instant::now() < deadline,
            "the load did not get 150 answers within 30 s"
        );
        thread::sleep(Duration::from_millis(20));
    }
    load
}

// ---------------------------------------------------------------------------------------------
// Release strategy
// ---------------------------------------------------------------------------------------------

/// The sample app (busybox httpd) deployed over a real sshd and the real agent, and nginx
/// in front of it. Drops the app servers first, then nginx, then the site.
pub(crate) struct ReleaseRig {
    _guard: AppGuard,
    pub(crate) nginx: Nginx,
    pub(crate) site: Site,
    /// The port plain `restart` serves the app on (nginx's upstream).
    pub(crate) port: u16,
}

impl ReleaseRig {
    /// None (after a note, or a panic under CI) when nginx is not installed.
    pub(crate) fn new() -> Option<ReleaseRig> {
        if !nginx::available() {
            return None;
        }
        let site = Site::ssh(SshdOptions::default());
        let port = free_port();
        let nginx = Nginx::start(port);
        Some(ReleaseRig {
            _guard: AppGuard {
                deploy_to: site.deploy_to.clone(),
            },
            nginx,
            site,
            port,
        })
    }

    /// deploy.toml for a plain `restart` on [`ReleaseRig::port`]; `tail` is appended (e.g.
    /// a `[defaults.cutover]` table).
    pub(crate) fn configure_restart(&self, tail: &str) {
        let port = self.port;
        self.site.write_config(
            "keep_releases = 3",
            &format!(
                r#"[defaults.release]
shared = ["log"]
migrate = "bin/migrate"
restart = "APP_PORT={port} APP_BOOT_SECONDS={BOOT_SECONDS} APP_SERVER='busybox httpd -f' bin/restart"
stop = "bin/stop"
timeout = "30s"

[defaults.health]
url = "http://127.0.0.1:{port}/api/v1/status/"
retries = 50
interval = "100ms"
request_timeout = "1s"

{tail}
"#
            ),
        );
    }

    /// `deployctl push test` of the sample app labelled `version`.
    pub(crate) fn push(&self, version: &str) -> Output {
        let art = self.site.env.write(
            &format!("dist/{version}.tar.gz"),
            tar_gz(&app_files(version)),
        );
        self.site.run(&[
            "push",
            "test",
            "--artifact",
            art.to_str().unwrap(),
            "--version",
            version,
        ])
    }

    /// [`ReleaseRig::push`], which must succeed; then nginx serves `version`.
    #[track_caller]
    pub(crate) fn push_ok(&self, version: &str) {
        self.push(version).assert_success();
        self.assert_proxy_serves(version);
    }

    /// `GET /` through nginx answers 200 with `version`'s page.
    #[track_caller]
    pub(crate) fn assert_proxy_serves(&self, version: &str) {
        let (code, body) = self.nginx.get("/");
        assert_eq!(
            code,
            200,
            "GET / through nginx -> {code}: {body}\n--- nginx error.log ---\n{}",
            self.nginx.log()
        );
        assert!(
            body.contains(&format!("sample app, version {version}<")),
            "nginx should serve {version}: {body}"
        );
    }
}

/// The baseline: plain `restart` under load through nginx fails requests (the old server
/// stops before the new one listens), and nginx reports them as 502s.
#[test]
fn plain_restart_through_nginx_fails_requests_the_baseline() {
    let Some(rig) = ReleaseRig::new() else {
        return;
    };
    rig.configure_restart("");
    rig.push_ok("v1");

    // The status page's one line names the version: the report counts answers per version.
    let load = start_load(rig.nginx.port, "/api/v1/status/");
    for i in 0..BASELINE_DEPLOYS {
        rig.push_ok(&format!("v{}", i + 2));
    }
    let report = load.stop();
    print_baseline("release strategy, plain restart", &report);

    assert!(
        report.failed > 0,
        "a plain restart under load should fail some requests (the baseline the cutover \
         beats), but none failed: {report}"
    );
    assert!(
        report.bad_status.get(&502).copied().unwrap_or(0) > 0,
        "the gap shows as nginx's 502 Bad Gateway: {report}"
    );
    assert_eq!(
        report.connect_errors, 0,
        "nginx itself never stopped listening: {report}"
    );
    assert!(report.ok > 0, "{report}");
    rig.assert_proxy_serves(&format!("v{}", BASELINE_DEPLOYS + 1));
}

/// The rig can see zero: nginx moved from one server to another by its `switch` command
/// (rewrite `upstream.conf`, `nginx -s reload`) under the same load fails no request, while
/// both servers run. So a zero from the cutover tests means the cutover, not a blind rig.
#[test]
fn the_rig_s_switch_command_moves_nginx_under_load_without_a_failed_request() {
    if !nginx::available() {
        return;
    }
    let env = deployctl_e2e::TestEnv::new();
    let a = StaticServer::start(&env, "a");
    let b = StaticServer::start(&env, "b");
    let proxy = Nginx::start(a.port);
    assert_eq!(proxy.get("/"), (200, "a\n".to_owned()));

    let load = start_load(proxy.port, "/");
    let out = deployctl_e2e::run(
        std::path::Path::new("/bin/sh"),
        env.root(),
        &["-c", &proxy.switch_command()],
        &[("DEPLOY_PORT", &b.port.to_string())],
    );
    out.assert_success();
    assert_eq!(proxy.upstream_port(), Some(b.port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.get("/") != (200, "b\n".to_owned()) {
        assert!(
            Instant::now() < deadline,
            "nginx still does not serve b 10 s after the switch:\n{}",
            proxy.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    // A second of traffic on the new server; then back with the harness's own call,
    // which returns once a worker with the new config runs.
    let sent = load.sent();
    while load.sent() < sent + 150 {
        assert!(
            Instant::now() < deadline + Duration::from_secs(20),
            "the load stalled"
        );
        thread::sleep(Duration::from_millis(20));
    }
    proxy.set_upstream(a.port);
    assert_eq!(proxy.get("/"), (200, "a\n".to_owned()));
    let report = load.stop();
    println!("switch under load: {report}\nserved: {:?}", report.served);
    assert_eq!(
        report.failed,
        0,
        "{report}\n--- nginx error.log ---\n{}",
        proxy.log()
    );
    assert!(
        report.served.get("a").is_some_and(|&n| n > 0)
            && report.served.get("b").is_some_and(|&n| n > 0),
        "both servers served: {:?}",
        report.served
    );
}

/// `busybox httpd` serving `index.html` = `name`, killed by PID on drop.
struct StaticServer {
    port: u16,
    child: std::process::Child,
}

impl StaticServer {
    fn start(env: &deployctl_e2e::TestEnv, name: &str) -> StaticServer {
        let dir = env.mkdir(&format!("www-{name}"));
        std::fs::write(dir.join("index.html"), format!("{name}\n")).unwrap();
        let port = free_port();
        let child = Command::new("busybox")
            .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
            .arg(&dir)
            .stdin(Stdio::null())
            .spawn()
            .expect("run busybox httpd");
        let server = StaticServer { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while nginx::http_get(port, "/", Duration::from_secs(1)).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "busybox httpd on {port} did not answer"
            );
            thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn print_baseline(what: &str, report: &LoadReport) {
    println!(
        "baseline ({what}): {} failed requests over {BASELINE_DEPLOYS} deploys \
         (about {} per deploy) at 150 requests/s through nginx\n{report}\nanswers: {:?}",
        report.failed,
        report.failed / BASELINE_DEPLOYS as u64,
        report.served
    );
}

// ---------------------------------------------------------------------------------------------
// Compose strategy
// ---------------------------------------------------------------------------------------------

/// The compose project: `web` (nginx, booting in 0.3 s, with a Docker healthcheck,
/// no published port) and `proxy` (Debian's nginx, `tests/nginx/build-image`) publishing
/// `127.0.0.1:<port>` and routing to `web:8080` by name, re-resolved every second.
pub(crate) const COMPOSE_FILE: &str = r#"services:
  web:
    image: ${WEB_IMAGE}
    # nginx finishes the requests in flight on SIGQUIT, then exits.
    stop_signal: SIGQUIT
    healthcheck:
      test: ["CMD", "/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/api/v1/status/"]
      interval: 1s
      timeout: 1s
      retries: 3
  proxy:
    image: ${PROXY_IMAGE}
    environment:
      PROXY_UPSTREAM: "web:8080"
    ports:
      - "127.0.0.1:${PROXY_PORT}:80"
"#;

/// One compose project with the proxy in front of `web`, over a real sshd and the real
/// agent. Removes its containers, networks, volumes and web images on drop (the proxy
/// image is shared and cached: it stays).
pub(crate) struct ComposeRig {
    pub(crate) compose: Compose,
    pub(crate) project: String,
    /// The proxy's published port on 127.0.0.1.
    pub(crate) port: u16,
    pub(crate) proxy_image: String,
    repo: String,
    images: Vec<String>,
    pub(crate) site: Site,
}

impl ComposeRig {
    /// None (after a note, or a panic under CI) when the nginx image cannot be built.
    pub(crate) fn new(compose: Compose) -> Option<ComposeRig> {
        let proxy_image = match nginx::proxy_image() {
            Ok(tag) => tag,
            Err(why) => {
                let _ = missing(
                    "the nginx proxy image",
                    &format!("the compose cutover tests route through it: {why}"),
                );
                return None;
            }
        };
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        Some(ComposeRig {
            compose,
            project: format!("e2e-cutover-{id}"),
            port: free_port(),
            proxy_image,
            repo: format!("deployctl-e2e/cutover-web-{id}"),
            images: Vec::new(),
            site: Site::ssh(SshdOptions::default()),
        })
    }

    /// Writes the compose file, the env file and deploy.toml; `compose_extra` goes into
    /// `[defaults.compose]` (e.g. `zero_downtime = ["web"]`), `tail` at the end.
    pub(crate) fn configure(&self, compose_extra: &str, tail: &str) {
        let s = &self.site;
        s.env.write("docker-compose.yml", COMPOSE_FILE);
        s.env.write(
            ".env.test",
            format!(
                "# the image is pinned by CI\nWEB_IMAGE=${{E2E_WEB_IMAGE}}\nPROXY_IMAGE={}\nPROXY_PORT={}\n",
                self.proxy_image, self.port
            ),
        );
        s.write_config(
            "strategy = \"compose\"\nkeep_releases = 3",
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
retries = 80
interval = "250ms"
request_timeout = "2s"

{tail}
"#,
                project = self.project,
                port = self.port,
                command = self.compose.config_line(),
            ),
        );
    }

    /// Imports the web image for `version` (healthy: serves `/api/v1/status/`) and
    /// returns its tag.
    pub(crate) fn image(&mut self, version: &str, healthy: bool) -> String {
        let image = format!("{}:{version}", self.repo);
        if !self.images.contains(&image) {
            import_web_image(&image, version, healthy, &self.proxy_image);
            self.images.push(image.clone());
        }
        image
    }

    /// `deployctl push test --version VERSION` of a new healthy web image.
    pub(crate) fn push(&mut self, version: &str) -> Output {
        let image = self.image(version, true);
        self.site.run_env(
            &["push", "test", "--version", version],
            &[("E2E_WEB_IMAGE", &image)],
        )
    }

    /// [`ComposeRig::push`], which must succeed; then the proxy serves `version`.
    #[track_caller]
    pub(crate) fn push_ok(&mut self, version: &str) {
        self.push(version).assert_success();
        self.assert_proxy_serves(version);
    }

    /// `GET /` through the proxy answers 200 with `version`, within 5 s of the deploy's
    /// end: a plain `up --force-recreate` also recreates the proxy, whose resolver may
    /// still hold the old container's address for a moment (the load generator, not this
    /// check, counts what fails meanwhile).
    #[track_caller]
    pub(crate) fn assert_proxy_serves(&self, version: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let (code, body) = loop {
            let (code, body) = nginx::http_get(self.port, "/", Duration::from_secs(5));
            if (code, body.trim()) == (200, version) || std::time::Instant::now() >= deadline {
                break (code, body);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(
            (code, body.trim()),
            (200, version),
            "GET / through the proxy service\n{}",
            self.logs()
        );
    }

    /// `docker logs` of every container of the project, for failure messages.
    pub(crate) fn logs(&self) -> String {
        let label = format!("label=com.docker.compose.project={}", self.project);
        let ids = docker_quiet(&["ps", "-a", "-q", "--filter", &label]);
        let mut out = String::new();
        for id in ids.split_whitespace() {
            let o = Command::new("docker")
                .args(["logs", "--tail", "20", id])
                .stdin(Stdio::null())
                .output();
            if let Ok(o) = o {
                out.push_str(&format!(
                    "--- docker logs {id} ---\n{}{}\n",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
        }
        out
    }
}

impl Drop for ComposeRig {
    fn drop(&mut self) {
        // Only what carries our own project label, then our own web images.
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
        if !self.images.is_empty() {
            let images: Vec<&str> = self.images.iter().map(String::as_str).collect();
            docker_quiet(&[&["image", "rm", "-f"], images.as_slice()].concat());
        }
    }
}

/// The web image for `version`, built FROM the proxy image (`tests/nginx/build-image`,
/// whose entrypoint serves the app when `WEB_VERSION` is set: nginx on 8080, after
/// [`BOOT_SECONDS`]). `healthy` decides whether `/api/v1/status/` exists. Not busybox
/// httpd: its listen backlog of 9 overflows whenever a container start starves it for a
/// moment, and each dropped SYN shows as a 504 (see the script).
pub(crate) fn import_web_image(image: &str, version: &str, healthy: bool, base: &str) {
    let dockerfile = format!(
        "FROM {base}\nENV WEB_VERSION={version} WEB_HEALTHY={} WEB_BOOT_SECONDS={BOOT_SECONDS}\n",
        if healthy { "yes" } else { "no" }
    );
    let mut child = Command::new("docker")
        .args(["build", "-q", "-t", image, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run docker (is Docker installed?)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dockerfile.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker build {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

compose_matrix!(compose_force_recreate_through_an_nginx_service_fails_requests_the_baseline);

/// The baseline for compose: `up --force-recreate` under load through the nginx service
/// fails requests (web and proxy are both recreated).
fn compose_force_recreate_through_an_nginx_service_fails_requests_the_baseline(c: Compose) {
    let Some(mut rig) = ComposeRig::new(c) else {
        return;
    };
    rig.configure("", "");
    rig.push_ok("v1");
    assert_eq!(
        docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={}", rig.project),
        ])
        .lines()
        .count(),
        2,
        "web and proxy run"
    );

    let load = start_load(rig.port, "/");
    for i in 0..BASELINE_DEPLOYS {
        rig.push_ok(&format!("v{}", i + 2));
    }
    let report = load.stop();
    print_baseline(
        &format!("compose {}, up --force-recreate", c.command),
        &report,
    );

    assert!(
        report.failed > 0,
        "up --force-recreate under load should fail some requests (the baseline the \
         cutover beats), but none failed: {report}"
    );
    assert!(report.ok > 0, "{report}");
    rig.assert_proxy_serves(&format!("v{}", BASELINE_DEPLOYS + 1));
}
