//! `[release] hooks` and `[notify]` webhooks (#17 items 3 and 4), end to end: the real
//! deployctl over a real sshd to the real agent, and a small HTTP receiver on 127.0.0.1
//! that records what the agent posts.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use deployctl_e2e::{Agent, SshdOptions, bin};

use crate::release::{File, tar_gz};
use crate::support::Site;

/// The secret the tests declare in `secrets` and put into hook commands.
const SECRET: &str = "s3cr3t-hooks-value";
/// The webhook path's token: a Slack-like URL that must never be printed.
const TOKEN: &str = "T000HOOKS/B000/xoxb-webhook-token";

// ---------------------------------------------------------------------------------------------
// The receiver
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct State {
    /// Every request: path and JSON body.
    got: Vec<(String, serde_json::Value)>,
    /// The status answered to each request, in order; 200 once empty.
    statuses: VecDeque<u16>,
    /// Requests from this index on wait until `open`.
    hold_from: Option<usize>,
    open: bool,
}

/// A webhook receiver on 127.0.0.1: records each POST, answers as told.
struct Receiver {
    port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl Receiver {
    fn start(statuses: &[u16], hold_from: Option<usize>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new((
            Mutex::new(State {
                statuses: statuses.iter().copied().collect(),
                hold_from,
                ..State::default()
            }),
            Condvar::new(),
        ));
        let s = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                thread::spawn(move || serve(conn, &s));
            }
        });
        Receiver { port, state }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook/{TOKEN}", self.port)
    }

    fn requests(&self) -> Vec<(String, serde_json::Value)> {
        self.state.0.lock().unwrap().got.clone()
    }

    /// Waits (up to `timeout`) for `n` requests.
    fn wait_for(&self, n: usize, timeout: Duration) -> Vec<(String, serde_json::Value)> {
        let (m, cv) = &*self.state;
        let deadline = Instant::now() + timeout;
        let mut st = m.lock().unwrap();
        while st.got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{n} webhook request(s) expected within {timeout:?}, got {}: {:?}",
                st.got.len(),
                st.got
            );
            st = cv.wait_timeout(st, left).unwrap().0;
        }
        st.got.clone()
    }

    /// Lets held requests be answered.
    fn open(&self) {
        let (m, cv) = &*self.state;
        m.lock().unwrap().open = true;
        cv.notify_all();
    }
}

fn serve(conn: TcpStream, state: &(Mutex<State>, Condvar)) {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or(
        serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()),
    );
    let (m, cv) = state;
    let status = {
        let mut st = m.lock().unwrap();
        let index = st.got.len();
        st.got.push((path, doc));
        cv.notify_all();
        let status = st.statuses.pop_front().unwrap_or(200);
        while st.hold_from.is_some_and(|h| index >= h) && !st.open {
            st = cv.wait(st).unwrap();
        }
        status
    };
    let reason = if status == 200 { "OK" } else { "Error" };
    let _ = write!(
        &conn,
        "HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A site whose `[defaults]` declares `HOOK_SECRET` secret, with `release` as the body of
/// `[defaults.release]` and, when given, a webhook.
fn site(release: &str, webhook: Option<&str>, health: Option<&str>) -> Site {
    let site = Site::ssh(SshdOptions::default());
    let notify = webhook
        .map(|u| format!("[defaults.notify]\nwebhook = \"{u}\"\n"))
        .unwrap_or_default();
    let health = health
        .map(|u| format!("[defaults.health]\nurl = \"{u}\"\nretries = 2\ninterval = \"100ms\"\n"))
        .unwrap_or_default();
    site.write_config(
        "secrets = [\"HOOK_SECRET\"]",
        &format!("[defaults.release]\n{release}\n{notify}{health}"),
    );
    site
}

fn artifact(site: &Site, name: &str, files: &[File]) -> String {
    let path = site
        .env
        .write(&format!("dist/{name}.tar.gz"), tar_gz(files));
    path.to_str().unwrap().to_owned()
}

fn file(path: &str, data: &str) -> File {
    (path.into(), data.as_bytes().to_vec(), 0o644)
}

fn push(site: &Site, art: &str, version: &str) -> deployctl_e2e::Output {
    site.run_env(
        &["push", "test", "--artifact", art, "--version", version],
        &[("HOOK_SECRET", SECRET)],
    )
}

fn current(d: &Path) -> Option<String> {
    std::fs::read_link(d.join("current"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn hook_log(d: &Path) -> Vec<String> {
    std::fs::read_to_string(d.join("shared/hooks.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Every hook and the restart write a line to `shared/hooks.log`: what they are, where
/// `current` points, and `DEPLOY_OUTCOME`.
fn logging(name: &str) -> String {
    format!(
        "echo \\\"{name} current=$(basename \\\"$(readlink $DEPLOY_TO/current)\\\") outcome=$DEPLOY_OUTCOME dir=$(basename $PWD)\\\" >> $DEPLOY_TO/shared/hooks.log"
    )
}

fn no_secret_anywhere(site: &Site, out: &deployctl_e2e::Output) {
    let text = format!("{out}");
    let log = site.agent.log();
    for (what, s) in [("secret", SECRET), ("webhook token", TOKEN)] {
        assert!(
            !text.contains(s),
            "the {what} is in deployctl's output:\n{text}"
        );
        assert!(!log.contains(s), "the {what} is in the agent's log:\n{log}");
    }
    // On the server, the token is only in the 0600 store.
    let state = site.deploy_to.join(".deploy");
    for entry in walk(&state) {
        let text = std::fs::read_to_string(&entry).unwrap_or_default();
        assert!(
            !text.contains(SECRET),
            "{} holds the secret",
            entry.display()
        );
        if text.contains(TOKEN) {
            assert_eq!(
                entry,
                state.join("notify.json"),
                "the token is in {}",
                entry.display()
            );
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&entry).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", entry.display());
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Hooks
// ---------------------------------------------------------------------------------------------

#[test]
fn hooks_run_in_order_and_a_webhook_reports_the_live_release() {
    let rx = Receiver::start(&[], None);
    let release = format!(
        "shared = [\"hooks.log\"]\nrestart = \"{}\"\nhooks = {{ before_switch = \"{}\", after_live = \"{}\", on_failure = \"{}\" }}",
        logging("restart"),
        logging("before_switch"),
        logging("after_live"),
        logging("on_failure"),
    );
    let site = site(&release, Some(&rx.url()), None);
    let d = site.deploy_to.clone();
    let art = artifact(&site, "v1", &[file("VERSION", "v1")]);
    let out = push(&site, &art, "v1");
    out.assert_success();
    let r1 = current(&d).expect("current after the push");
    assert_eq!(
        hook_log(&d),
        vec![
            // before the switch: there is no current yet, and it runs in the new release
            format!("before_switch current= outcome= dir={r1}"),
            format!("restart current={r1} outcome= dir={r1}"),
            format!("after_live current={r1} outcome=live dir={r1}"),
        ],
        "{out}"
    );

    let got = rx.wait_for(1, Duration::from_secs(30));
    let (path, doc) = &got[0];
    assert_eq!(path, &format!("/hook/{TOKEN}"));
    assert_eq!(doc["app"], "app", "{doc}");
    assert_eq!(doc["environment"], "test", "{doc}");
    assert!(doc["host"].as_str().is_some_and(|h| !h.is_empty()), "{doc}");
    assert_eq!(doc["release"], r1.as_str(), "{doc}");
    assert_eq!(doc["version"], "v1", "{doc}");
    assert_eq!(doc["outcome"], "live", "{doc}");
    assert_eq!(doc["action"], "deploy", "{doc}");
    assert!(doc["error"].is_null(), "{doc}");
    assert!(
        doc["who"].as_str().is_some_and(|w| w.contains('@')),
        "{doc}"
    );
    assert!(
        doc["when"].as_str().is_some_and(|w| w.starts_with("20")),
        "{doc}"
    );
    let text = doc["text"].as_str().unwrap();
    assert!(text.contains(&r1) && text.contains("is live"), "{text}");
    no_secret_anywhere(&site, &out);
    // One document per outcome.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.requests().len(), 1, "{:?}", rx.requests());
}

#[test]
fn before_switch_failing_stops_the_deploy_and_the_webhook_says_failed_masked() {
    let rx = Receiver::start(&[], None);
    let release = format!(
        "shared = [\"hooks.log\"]\nhooks = {{ before_switch = \"test -f ok || {{ echo token ${{HOOK_SECRET}} >&2; exit 3; }}\", on_failure = \"{}\" }}",
        logging("on_failure"),
    );
    let site = site(&release, Some(&rx.url()), None);
    let d = site.deploy_to.clone();
    let v1 = artifact(&site, "v1", &[file("VERSION", "v1"), file("ok", "")]);
    push(&site, &v1, "v1").assert_success();
    let r1 = current(&d).unwrap();
    rx.wait_for(1, Duration::from_secs(30));

    let v2 = artifact(&site, "v2", &[file("VERSION", "v2")]);
    let out = push(&site, &v2, "v2");
    out.assert_exit(1);
    assert!(out.stderr.contains("before_switch"), "{out}");
    assert_eq!(
        current(&d).as_deref(),
        Some(r1.as_str()),
        "current untouched"
    );
    let history = site.run_env(&["history", "test", "--json"], &[("HOOK_SECRET", SECRET)]);
    let entries = history.json()["hosts"][0]["history"].clone();
    let failed = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["version"] == "v2")
        .unwrap_or_else(|| panic!("{entries}"))
        .clone();
    assert_eq!(failed["outcome"], "failed", "{failed}");
    let r2 = failed["release"].as_str().unwrap().to_owned();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("releases").join(&r2).join(".deploy/release.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(meta["status"], "failed", "{meta}");
    assert_eq!(
        hook_log(&d),
        vec![format!("on_failure current={r1} outcome=failed dir={r2}")]
    );

    let got = rx.wait_for(2, Duration::from_secs(30));
    let doc = &got[1].1;
    assert_eq!(doc["outcome"], "failed", "{doc}");
    assert_eq!(doc["version"], "v2", "{doc}");
    assert_eq!(doc["release"], r2.as_str(), "{doc}");
    let error = doc["error"].as_str().unwrap_or_default();
    assert!(error.contains("before_switch hook failed"), "{doc}");
    assert!(error.contains("***"), "the secret is masked: {doc}");
    assert!(!doc.to_string().contains(SECRET), "{doc}");
    no_secret_anywhere(&site, &out);
}

#[test]
fn on_failure_gets_the_outcome_of_a_failed_health_check() {
    // Nothing listens on this port: the health check fails, the deploy rolls back.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/up",
        closed.local_addr().unwrap().port()
    );
    drop(closed);
    let release = format!(
        "shared = [\"hooks.log\"]\nhooks = {{ after_live = \"{}\", on_failure = \"{}\" }}",
        logging("after_live"),
        logging("on_failure"),
    );
    let site = site(&release, None, Some(&url));
    let d = site.deploy_to.clone();
    let art = artifact(&site, "v1", &[file("VERSION", "v1")]);
    let out = push(&site, &art, "v1");
    assert_ne!(out.code, 0, "{out}");
    assert!(
        current(&d).is_none(),
        "rolled back: no current on a first deploy"
    );
    let log = hook_log(&d);
    assert_eq!(log.len(), 1, "only on_failure ran: {log:?}");
    assert!(
        log[0].starts_with("on_failure current= outcome=rolled_back dir="),
        "{log:?}"
    );
}

#[test]
fn after_live_failing_does_not_change_the_outcome() {
    let site = site(
        "hooks = { after_live = \"echo announcing; exit 4\", on_failure = \"touch $DEPLOY_TO/on_failure_ran\" }",
        None,
        None,
    );
    let d = site.deploy_to.clone();
    let art = artifact(&site, "v1", &[file("VERSION", "v1")]);
    let out = site.run_env(
        &[
            "push",
            "test",
            "--artifact",
            &art,
            "--version",
            "v1",
            "--json",
        ],
        &[("HOOK_SECRET", SECRET)],
    );
    out.assert_success();
    let r1 = current(&d).expect("live");
    let doc = out.json();
    let host = &doc["hosts"][0];
    assert_eq!(host["outcome"], "live", "{doc}");
    // Reported: the hook's step, failed, with its output.
    let steps = host["report"]["steps"].as_array();
    let hook = steps
        .into_iter()
        .flatten()
        .find(|s| s["stage"] == "hook")
        .unwrap_or_else(|| panic!("a hook step in {doc}"));
    assert_eq!(hook["success"], false, "{hook}");
    assert_eq!(hook["exit_code"], 4, "{hook}");
    assert!(
        hook["output"].as_str().unwrap().contains("announcing"),
        "{hook}"
    );
    assert!(
        !d.join("on_failure_ran").exists(),
        "on_failure is for failures only"
    );
    let status = site.run(&["status", "test", "--json"]);
    assert!(status.stdout.contains(&r1), "{status}");
}

// ---------------------------------------------------------------------------------------------
// Webhooks
// ---------------------------------------------------------------------------------------------

#[test]
fn a_rollback_by_recovery_with_no_controller_is_notified() {
    let rx = Receiver::start(&[], None);
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/up",
        closed.local_addr().unwrap().port()
    );
    drop(closed);
    // The restart waits, so the agent can be killed after the switch.
    let mut site = site("restart = \"sleep 2\"", Some(&rx.url()), Some(&url));
    let d = site.deploy_to.clone();
    let art = artifact(&site, "v1", &[file("VERSION", "v1")]);
    let mut child = Command::new(bin("deployctl"))
        .args(["push", "test", "--artifact", &art, "--version", "v1"])
        .current_dir(site.env.root())
        .env("HOOK_SECRET", SECRET)
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let journal = d.join(".deploy/journal.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&journal).unwrap_or_default();
        if text.contains("\"phase\": \"restarting\"") && current(&d).is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deploy did not reach the restart: {text}\n{}",
            site.agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !std::fs::read_to_string(&journal).unwrap().contains(TOKEN),
        "the journal does not hold the webhook"
    );
    site.agent.kill9();
    let _ = child.kill(); // by PID: the controller is gone too
    let _ = child.wait();
    assert!(
        rx.requests().is_empty(),
        "no outcome yet: {:?}",
        rx.requests()
    );

    // A new agent recovers alone: the check fails, it rolls back, and says so.
    site.agent = Agent::start(&site.env.path("agent"));
    let got = rx.wait_for(1, Duration::from_secs(60));
    let doc = &got[0].1;
    assert_eq!(doc["outcome"], "rolled_back", "{doc}");
    assert_eq!(doc["version"], "v1", "{doc}");
    assert_eq!(doc["environment"], "test", "{doc}");
    assert!(
        doc["error"].as_str().unwrap_or_default().contains("health"),
        "{doc}"
    );
    assert!(current(&d).is_none());
    assert!(!site.agent.log().contains(TOKEN), "{}", site.agent.log());
}

#[test]
fn a_webhook_answering_500_is_retried_without_holding_up_the_deploy() {
    // The first try gets a 500; the second is held until the deploy has returned.
    let rx = Receiver::start(&[500], Some(1));
    let site = site("restart = \"true\"", Some(&rx.url()), None);
    let d = site.deploy_to.clone();
    let art = artifact(&site, "v1", &[file("VERSION", "v1")]);
    let out = push(&site, &art, "v1");
    // deployctl has its outcome while the webhook is still unanswered.
    out.assert_success();
    assert!(current(&d).is_some());
    let got = rx.wait_for(2, Duration::from_secs(30));
    assert_eq!(got[0].1, got[1].1, "the same document, tried again");
    rx.open();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !site.agent.log().contains("delivered (try 2)") {
        assert!(
            Instant::now() < deadline,
            "the agent logs the delivery: {}",
            site.agent.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let log = site.agent.log();
    assert!(log.contains("answered 500"), "{log}");
    assert_eq!(rx.requests().len(), 2);
    no_secret_anywhere(&site, &out);
}

// See: merging the watch (#13) with the webhooks (#17): `.deploy/watch.json` keeps the
// deploy's spec for the watch's rollback, and held the webhook URL until the watch
// stopped saving it.
#[test]
fn a_release_under_watch_keeps_the_webhook_only_in_the_store() {
    let rx = Receiver::start(&[], None);
    // The receiver answers 200 to any path: it is the health URL too.
    // (`site` closes the url's quote itself: the `#` comments that one out.)
    let health = format!(
        "http://127.0.0.1:{}/up\"\nwatch = \"10m\"\nwatch_failures = 3\n#",
        rx.port
    );
    let site = site("shared = []", Some(&rx.url()), Some(&health));
    let d = site.deploy_to.clone();
    let v1 = artifact(&site, "v1", &[file("VERSION", "v1")]);
    let out = push(&site, &v1, "v1");
    out.assert_success();
    assert!(
        d.join(".deploy/watch.json").is_file(),
        "the release is not under watch:\n{out}"
    );
    no_secret_anywhere(&site, &out);
}
