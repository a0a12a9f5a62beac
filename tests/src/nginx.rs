//! A real nginx (Debian's `nginx` package) in front of the app, for the cutover tests.
//!
//! [`Nginx::start`] runs the system's `nginx` binary as a child of the test, with its own
//! prefix dir and config: it listens on `127.0.0.1:<free port>`, runs in the foreground
//! (`daemon off;`), keeps its pid file, logs and temp dirs inside the prefix, and proxies
//! every request to the `upstream` group, whose servers come from the include file
//! `<prefix>/upstream.conf`. A deploy points it elsewhere by rewriting that file and running
//! [`Nginx::reload_command`] (`nginx -p PREFIX -c CONF -e ERRLOG -s reload`), exactly as
//! an operator's `[cutover] switch` would; [`Nginx::switch_command`] is such a command.
//!
//! * Each request reaches the upstream on a new connection (HTTP/1.0, no keepalive), so a
//!   stopped app shows as nginx's `502 Bad Gateway` at once.
//! * With one server in the group, nginx never marks it unavailable (max_fails does not
//!   apply), so the first request after the app is back succeeds.
//! * nginx is stopped by PID on drop (SIGTERM to the master, then its workers, by PID).
//! * [`available`] says whether nginx is installed; under `CI=true` a missing nginx fails
//!   the test (see [`crate::require`]); `scripts/test` installs it.
//!
//! For the compose tests, [`proxy_image`] builds (or finds) a Docker image of the same
//! Debian nginx (`tests/nginx/build-image`), which proxies to one compose service by name.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::require::missing;
use crate::{
    READY_TIMEOUT, TERM_GRACE, descendants, free_port, is_root, read_lossy, run_command,
    send_signal, terminate,
};

/// Where Debian's package puts the binary (not on a non-root user's PATH).
const NGINX_PATHS: [&str; 3] = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"];
/// How long a reload may take until only workers with the new config run.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The image build on a cold cache (about a minute), with room for a loaded box.
const IMAGE_BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// The nginx binary, if installed (`DEPLOYCTL_E2E_NGINX` overrides).
pub fn nginx_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DEPLOYCTL_E2E_NGINX") {
        return Some(PathBuf::from(p));
    }
    NGINX_PATHS
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Whether nginx is installed and runs (`nginx -v`). When it is not: fails under
/// `CI=true`, a note and `false` elsewhere (see [`missing`]).
#[must_use = "return from the test when this is false"]
pub fn available() -> bool {
    let why = "the cutover tests put a real nginx in front of the app \
               (apt-get install nginx)";
    let Some(nginx) = nginx_binary() else {
        return missing("nginx (/usr/sbin/nginx)", why);
    };
    let runs = Command::new(&nginx)
        .arg("-v")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    runs || missing(&format!("a working {}", nginx.display()), why)
}

/// A running nginx on `127.0.0.1:port`, stopped (by PID) on drop.
pub struct Nginx {
    /// The port it listens on (127.0.0.1 only).
    pub port: u16,
    /// Its prefix dir: config, `upstream.conf`, pid file, `logs/`, `tmp/`.
    pub prefix: PathBuf,
    /// `<prefix>/nginx.conf`.
    pub conf: PathBuf,
    /// `<prefix>/upstream.conf`, included inside `upstream app { ... }`.
    pub upstream_file: PathBuf,
    /// `<prefix>/logs/error.log` (level `notice`: reloads show there).
    pub error_log: PathBuf,
    /// `<prefix>/logs/access.log`: status, upstream address and upstream status per request.
    pub access_log: PathBuf,
    binary: PathBuf,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx proxying to `127.0.0.1:upstream_port` and waits (10 s) until it
    /// accepts connections. Panics with its error log if it cannot start; call
    /// [`available`] first.
    pub fn start(upstream_port: u16) -> Nginx {
        let binary = nginx_binary().expect("nginx is installed (check nginx::available() first)");
        let tmp = tempfile::Builder::new()
            .prefix("e2e-nginx-")
            .tempdir()
            .expect("create nginx prefix dir");
        let prefix = tmp.path().to_path_buf();
        // Workers may run as another user than the test (nginx drops root to `user`).
        let _ = fs::set_permissions(&prefix, fs::Permissions::from_mode(0o755));
        for d in ["logs", "tmp"] {
            fs::create_dir_all(prefix.join(d)).expect("create nginx prefix subdir");
        }
        let mut nginx = Nginx {
            port: 0,
            conf: prefix.join("nginx.conf"),
            upstream_file: prefix.join("upstream.conf"),
            error_log: prefix.join("logs/error.log"),
            access_log: prefix.join("logs/access.log"),
            prefix,
            binary,
            child: None,
            _tmp: tmp,
        };
        nginx.write_upstream(upstream_port);
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let port = free_port();
            nginx.port = port;
            fs::write(&nginx.conf, nginx.config_text()).expect("write nginx.conf");
            let _ = fs::remove_file(&nginx.error_log);
            nginx.check_config();
            let child = Command::new(&nginx.binary)
                .args(nginx.control_args())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", nginx.binary.display()));
            nginx.child = Some(child);
            match nginx.wait_ready() {
                Ok(()) => return nginx,
                Err(reason) => {
                    if let Some(mut child) = nginx.child.take() {
                        terminate(&mut child, Duration::from_millis(500));
                    }
                    let log = read_lossy(&nginx.error_log);
                    if !log.contains("Address already in use") {
                        panic!(
                            "nginx failed to start on 127.0.0.1:{port}: {reason}\n\
                             --- nginx.conf ---\n{}\n--- error.log ---\n{log}",
                            read_lossy(&nginx.conf)
                        );
                    }
                }
            }
        }
        panic!("nginx could not bind a free port in {ATTEMPTS} attempts");
    }

    /// `-p PREFIX -c CONF -e ERRLOG`: what every nginx command line for this instance
    /// starts with (`-e` so nginx never touches the system's /var/log/nginx).
    fn control_args(&self) -> Vec<String> {
        vec![
            "-p".into(),
            format!("{}/", self.prefix.display()),
            "-c".into(),
            self.conf.display().to_string(),
            "-e".into(),
            self.error_log.display().to_string(),
        ]
    }

    fn config_text(&self) -> String {
        let p = self.prefix.display();
        // nginx drops root to `user` for its workers; keep them the test's own user.
        let user = if is_root() { "user root;\n" } else { "" };
        format!(
            r#"# generated by the deployctl e2e harness (tests/src/nginx.rs)
{user}daemon off;
master_process on;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/logs/error.log notice;
events {{
    worker_connections 2048;
}}
http {{
    log_format upstream '$msec $status $upstream_addr $upstream_status "$request"';
    access_log {p}/logs/access.log upstream;
    client_body_temp_path {p}/tmp/client_body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    upstream app {{
        include {upstream};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_set_header Host $host;
            proxy_connect_timeout 2s;
            proxy_read_timeout 10s;
        }}
    }}
}}
"#,
            upstream = self.upstream_file.display(),
            port = self.port,
        )
    }

    /// `nginx -t` on the generated config: fail fast, with its words, on a bad one.
    fn check_config(&self) {
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.control_args())
            .arg("-t")
            .arg("-q")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = run_command(cmd, Duration::from_secs(30));
        if out.code != 0 {
            panic!(
                "nginx -t rejected the harness's config:\n{out}\n--- nginx.conf ---\n{}",
                read_lossy(&self.conf)
            );
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid_file = self.prefix.join("nginx.pid");
        loop {
            let child = self.child.as_mut().expect("child");
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("nginx exited early with {status}"));
            }
            let ours = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                == Some(child.id());
            if ours
                && TcpStream::connect_timeout(
                    &(Ipv4Addr::LOCALHOST, self.port).into(),
                    Duration::from_secs(1),
                )
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("not ready after {READY_TIMEOUT:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// PID of the nginx master (0 after it stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Writes `upstream.conf` = `server 127.0.0.1:PORT;` (no reload).
    pub fn write_upstream(&self, port: u16) {
        fs::write(&self.upstream_file, format!("server 127.0.0.1:{port};\n"))
            .unwrap_or_else(|e| panic!("write {}: {e}", self.upstream_file.display()));
    }

    /// The upstream port `upstream.conf` names now.
    pub fn upstream_port(&self) -> Option<u16> {
        let text = fs::read_to_string(&self.upstream_file).ok()?;
        text.split_once("127.0.0.1:")?
            .1
            .trim_end()
            .trim_end_matches(';')
            .parse()
            .ok()
    }

    /// The shell command that makes this nginx re-read its config (and `upstream.conf`):
    /// `/usr/sbin/nginx -p PREFIX/ -c CONF -e ERRLOG -s reload`. It parses the config first
    /// and exits 1 without signalling when it is invalid; on a reload the old workers
    /// finish the requests they hold.
    pub fn reload_command(&self) -> String {
        let mut words = vec![self.binary.display().to_string()];
        words.extend(self.control_args());
        words.extend(["-s".into(), "reload".into()]);
        words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A `[cutover] switch` command for this nginx: points `upstream.conf` at
    /// `127.0.0.1:${DEPLOY_PORT}` (written to a temp file and renamed, so nginx never reads
    /// half a file), then reloads.
    pub fn switch_command(&self) -> String {
        let file = shell_quote(&self.upstream_file.display().to_string());
        format!(
            "printf 'server 127.0.0.1:%s;\\n' \"${{DEPLOY_PORT}}\" > {file}.new && mv {file}.new {file} && {}",
            self.reload_command()
        )
    }

    /// Points nginx at `127.0.0.1:port` and waits (10 s) until the reload took effect (see
    /// [`Nginx::reload`]): from then on, every new connection goes to `port`.
    pub fn set_upstream(&self, port: u16) {
        self.write_upstream(port);
        self.reload();
    }

    /// Runs [`Nginx::reload_command`] and waits (10 s) until it took effect: a new worker
    /// runs and every worker from before the reload has exited. (Until the old workers
    /// close their listening sockets, they too accept new connections, with the old
    /// config; with short requests they exit within milliseconds.)
    pub fn reload(&self) {
        let master = self.pid();
        let old_workers = descendants(master);
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.control_args())
            .args(["-s", "reload"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = run_command(cmd, Duration::from_secs(30));
        if out.code != 0 {
            panic!(
                "nginx -s reload failed:\n{out}\n--- error.log ---\n{}",
                self.log()
            );
        }
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        loop {
            let workers = descendants(master);
            let old_left = workers.iter().any(|w| old_workers.contains(w));
            let new_runs = workers.iter().any(|w| !old_workers.contains(w));
            if new_runs && !old_left {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "nginx's reload did not take effect within {RELOAD_TIMEOUT:?} (workers before \
                     {old_workers:?}, now {workers:?})\n--- error.log ---\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// One `GET path` through nginx on a new connection: (status, body); (0, error) when
    /// there is no answer.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path, Duration::from_secs(5))
    }

    /// nginx's error log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.error_log)
    }

    /// nginx's access log so far (`$msec $status $upstream_addr $upstream_status "$request"`).
    pub fn access(&self) -> String {
        read_lossy(&self.access_log)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The workers are ours too; a master that dies hard would leave them behind.
            let workers = descendants(child.id());
            terminate(&mut child, TERM_GRACE);
            for pid in workers {
                send_signal(pid, "KILL");
            }
        }
    }
}

/// One plain HTTP/1.0 GET on a new connection to 127.0.0.1:`port`, everything bounded by
/// `timeout`: (status, body); (0, error) when there is no answer.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> (u16, String) {
    let attempt = || -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())?;
        let mut buf = Vec::new();
        s.take(1 << 20).read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    };
    attempt().unwrap_or_else(|e| (0, format!("GET 127.0.0.1:{port}{path}: {e}")))
}

/// `'word'` for sh, with embedded single quotes escaped.
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@%+,".contains(&b))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Builds (or finds) the nginx proxy image for compose tests with
/// `tests/nginx/build-image` (Debian 12 minbase + Debian's nginx, imported; no registry);
/// returns its tag. The image proxies every request to `$PROXY_UPSTREAM` (`web:8080`),
/// re-resolving the name through Docker's DNS every second. `Err` says why it could not
/// be built (Docker missing, no mirror, ...): the caller fails under CI via [`missing`].
pub fn proxy_image() -> Result<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx/build-image");
    let mut cmd = Command::new(&script);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = run_command(cmd, IMAGE_BUILD_TIMEOUT);
    let tag = out.stdout.lines().last().unwrap_or("").trim().to_owned();
    if out.code != 0 || !tag.starts_with("deployctl-nginx:") {
        return Err(format!(
            "{} could not build the nginx image:\n{out}",
            script.display()
        ));
    }
    Ok(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(
            shell_quote("/tmp/e2e-nginx-x/nginx.conf"),
            "/tmp/e2e-nginx-x/nginx.conf"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
