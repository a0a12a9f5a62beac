//! The watch after go-live (`health.watch`, issue #13 item 3), end to end: a real sshd,
//! the real agent and `deployctl`, the sample app served by `busybox httpd`. The watch
//! checks every 200 ms for a few seconds; "breaking the app" removes the live release's
//! status page, so its health check answers 404.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use deployctl_e2e::Agent;

use crate::release::{App, alive, assert_serves, current, spawn_deployctl, wait_until};

/// The sample app with a watch of `watch` after go-live, 3 failures in a row.
fn watched_app(watch: &str) -> App {
    let app = App::new();
    // `[defaults.health]` is the last table of the file: these keys land in it.
    let path = app.site.env.path("deploy.toml");
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str(&format!("watch = \"{watch}\"\nwatch_failures = 3\n"));
    fs::write(&path, text).unwrap();
    app
}

/// Changes `health.watch` for the next push.
fn set_watch(app: &App, watch: &str) {
    let path = app.site.env.path("deploy.toml");
    let text: String = fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("watch = ") {
                format!("watch = \"{watch}\"\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(&path, text).unwrap();
}

/// The live release answers 404 on its status page from now on.
fn break_release(deploy_to: &Path, id: &str) {
    let page = deploy_to.join(format!("releases/{id}/public/api/v1/status/index.html"));
    fs::remove_file(&page).unwrap_or_else(|e| panic!("remove {}: {e}", page.display()));
}

fn status_watch(app: &App) -> serde_json::Value {
    let out = app.site.run(&["status", "test", "--json"]);
    out.assert_success();
    out.json()["hosts"][0]["status"]["watch"].clone()
}

fn last_history(app: &App) -> serde_json::Value {
    app.history().last().cloned().expect("a history entry")
}

#[track_caller]
fn assert_rolled_back_by_watch(app: &App, bad: &str, good: &str) {
    let d = app.site.deploy_to.clone();
    wait_until(
        Duration::from_secs(30),
        "the watch rolled the broken release back",
        || current(&d).as_deref() == Some(good),
    );
    // The rollback has ended once the history says so.
    wait_until(Duration::from_secs(30), "the history records it", || {
        last_history(app)["outcome"] == "rolled_back"
    });
    let entry = last_history(app);
    assert_eq!(entry["release"], bad, "{entry}");
    assert_eq!(entry["previous"], good, "{entry}");
    let error = entry["error"].as_str().unwrap_or_default();
    assert!(error.contains("rolled back by watch"), "{entry}");
    assert!(
        error.contains("3 consecutive failed health checks"),
        "{entry}"
    );
    let holder = entry["holder"].as_str().unwrap_or_default();
    assert!(
        holder.contains("watch") && holder.contains("deployed by"),
        "{entry}"
    );
    assert!(!entry["finished"].as_str().unwrap_or_default().is_empty());
    let watch = status_watch(app);
    assert_eq!(watch["release"], bad, "{watch}");
    assert_eq!(watch["state"], "rolled_back", "{watch}");
    assert_eq!(watch["remaining_ms"], 0, "{watch}");
    assert_serves(app.port, good_version(app, good).as_str());
}

fn good_version(app: &App, id: &str) -> String {
    let p = app
        .site
        .deploy_to
        .join(format!("releases/{id}/.deploy/release.json"));
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap();
    v["version"].as_str().unwrap().to_owned()
}

#[test]
fn the_agent_alone_rolls_back_a_release_that_fails_its_watch() {
    let app = watched_app("20s");
    // v2's push ends v1's watch: only v2's is in play.
    let r1 = app.push_ok("v1");
    let art = app.artifact("v2", &crate::release::app_files("v2"));
    let out = app.push(&art, "v2");
    out.assert_success();
    assert!(
        out.stdout.contains("under watch for 20s"),
        "push says the release is under watch: {out}"
    );
    let r2 = current(&app.site.deploy_to).unwrap();
    assert_ne!(r1, r2);
    // No controller is connected from here on.
    let watch = status_watch(&app);
    assert_eq!(watch["release"], r2.as_str(), "{watch}");
    assert_eq!(watch["state"], "watching", "{watch}");
    let left = watch["remaining_ms"].as_u64().unwrap();
    assert!(
        left > 0 && left <= 20_000,
        "time left within the watch: {watch}"
    );
    let text = app.site.run(&["status", "test"]);
    text.assert_success();
    assert!(
        text.stdout.contains(&format!("watching {r2}")) && text.stdout.contains("left"),
        "status shows the watch and the time left: {text}"
    );

    break_release(&app.site.deploy_to, &r2);
    assert_rolled_back_by_watch(&app, &r2, &r1);
    let text = app.site.run(&["status", "test"]);
    assert!(text.stdout.contains("ROLLED BACK"), "{text}");
    let text = app.site.run(&["history", "test"]);
    assert!(text.stdout.contains("by watch"), "{text}");
}

#[test]
fn push_wait_exits_0_when_the_watch_passes_and_1_when_it_rolls_back() {
    let app = watched_app("2s");
    let r1 = app.push_ok("v1");
    let art = app.artifact("v2", &crate::release::app_files("v2"));
    let out = app.site.run(&[
        "push",
        "test",
        "--artifact",
        art.to_str().unwrap(),
        "--version",
        "v2",
        "--wait",
    ]);
    out.assert_exit(0);
    assert!(out.stdout.contains("passed"), "{out}");
    let r2 = current(&app.site.deploy_to).unwrap();
    assert_ne!(r1, r2);
    assert_eq!(status_watch(&app)["state"], "passed");

    // v3 is broken once live: push --wait sees its watch roll it back.
    set_watch(&app, "30s");
    let art = app.artifact("v3", &crate::release::app_files("v3"));
    let mut bg = spawn_deployctl(
        &app.site,
        "push-v3",
        &[
            "push",
            "test",
            "--artifact",
            art.to_str().unwrap(),
            "--version",
            "v3",
            "--wait",
        ],
    );
    let d = app.site.deploy_to.clone();
    let mut r3 = String::new();
    wait_until(Duration::from_secs(30), "v3 is live and watched", || {
        let w = status_watch(&app);
        if w["state"] == "watching" && w["release"] != r2.as_str() {
            r3 = w["release"].as_str().unwrap().to_owned();
            return true;
        }
        false
    });
    break_release(&d, &r3);
    let out = bg.wait(Duration::from_secs(60));
    out.assert_exit(1);
    assert!(out.stdout.contains("ROLLED BACK"), "{out}");
    assert_eq!(current(&d).as_deref(), Some(r2.as_str()));

    // --json: the host says how its watch ended; a passing watch exits 0.
    set_watch(&app, "1s");
    let art = app.artifact("v4", &crate::release::app_files("v4"));
    let out = app.site.run(&[
        "push",
        "test",
        "--artifact",
        art.to_str().unwrap(),
        "--version",
        "v4",
        "--wait",
        "--json",
    ]);
    out.assert_exit(0);
    let doc = out.json();
    assert_eq!(doc["hosts"][0]["watch"]["state"], "passed", "{doc}");
    assert_eq!(doc["exit_code"], 0, "{doc}");
}

#[test]
fn a_new_push_or_rollback_ends_the_watch_before_it() {
    let app = watched_app("60s");
    let r1 = app.push_ok("v1");
    assert_eq!(status_watch(&app)["release"], r1.as_str());
    let r2 = app.push_ok("v2");
    let watch = status_watch(&app);
    assert_eq!(watch["release"], r2.as_str(), "{watch}");
    assert_eq!(watch["state"], "watching", "{watch}");
    assert!(
        app.site.agent.log().contains("ended by a new push"),
        "{}",
        app.site.agent.log()
    );
    // A rollback ends v2's watch (and watches nothing itself).
    app.site.run(&["rollback", "test"]).assert_success();
    let watch = status_watch(&app);
    assert_eq!(watch["release"], r2.as_str(), "{watch}");
    assert_eq!(watch["state"], "ended", "{watch}");
    assert!(
        watch["note"]
            .as_str()
            .unwrap_or_default()
            .contains("ended by a rollback"),
        "{watch}"
    );
    // v1 serves again; breaking v2 now changes nothing: nobody watches it.
    assert_eq!(current(&app.site.deploy_to).as_deref(), Some(r1.as_str()));
    break_release(&app.site.deploy_to, &r2);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(current(&app.site.deploy_to).as_deref(), Some(r1.as_str()));
    assert_eq!(last_history(&app)["action"], "rollback");
}

#[test]
fn a_watch_resumes_after_the_agent_is_killed_and_still_rolls_back() {
    let mut app = watched_app("30s");
    let r1 = app.push_ok("v1");
    let r2 = app.push_ok("v2");
    assert_eq!(status_watch(&app)["state"], "watching");
    app.site.agent.kill9();
    break_release(&app.site.deploy_to, &r2);
    app.site.agent = Agent::start(&app.site.env.path("agent"));
    // Resumed with the time it had left, not a fresh 30s.
    let watch = status_watch(&app);
    assert_eq!(watch["release"], r2.as_str(), "{watch}");
    let left = watch["remaining_ms"].as_u64().unwrap();
    assert!(left < 30_000, "resumed, not restarted: {watch}");
    assert!(app.site.agent.log().contains("resuming the watch"));
    assert_rolled_back_by_watch(&app, &r2, &r1);
}

#[test]
fn a_watch_resumes_after_sigterm_and_passes() {
    let mut app = watched_app("15s");
    app.push_ok("v1");
    let r2 = app.push_ok("v2");
    // SIGTERM: the agent stops without waiting for the watch to end.
    let pid = app.site.agent.pid();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    wait_until(Duration::from_secs(5), "the agent stopped", || !alive(pid));
    app.site.agent = Agent::start(&app.site.env.path("agent"));
    let watch = status_watch(&app);
    assert_eq!(watch["state"], "watching", "{watch}");
    assert!(watch["remaining_ms"].as_u64().unwrap() < 15_000, "{watch}");
    wait_until(Duration::from_secs(60), "the resumed watch passed", || {
        status_watch(&app)["state"] == "passed"
    });
    assert_eq!(current(&app.site.deploy_to).as_deref(), Some(r2.as_str()));
    assert_eq!(last_history(&app)["outcome"], "live");
}
