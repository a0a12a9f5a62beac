//! Issue #18 (items 2, 8, 11): what a new user reads after a health-URL typo, in
//! `releases`, and in `check`: the real `deployctl` and agent over a real sshd, the sample
//! app served by `busybox httpd`.

use deployctl_e2e::SshdOptions;

use crate::release::{App, all_output, app_files, assert_serves, current, free_port, tar_gz};
use crate::support::Site;

/// deploy.toml for the sample app with `url` as its health check.
fn config_with_health(app: &App, url: &str) {
    let port = app.port;
    app.site.write_config(
        "keep_releases = 5",
        &format!(
            r#"[defaults.release]
shared = ["log"]
migrate = "bin/migrate"
restart = "APP_PORT={port} APP_SERVER='busybox httpd -f' bin/restart"
stop = "bin/stop"
timeout = "30s"

[defaults.health]
url = "{url}"
retries = 3
interval = "200ms"
request_timeout = "1s"
"#
        ),
    );
}

// See: #18
#[test]
fn a_health_url_typo_is_named_as_the_likely_error_and_v1_keeps_serving() {
    let app = App::new();
    let r1 = app.push_ok("v1");

    // v2 with a typo in the health path: the app (v1 and v2) never serves it.
    let typo = format!("http://127.0.0.1:{}/api/v1/statsu/", app.port);
    config_with_health(&app, &typo);
    let art = app.artifact("v2", &app_files("v2"));
    let out = app.push(&art, "v2");
    let text = all_output(&out);

    // Rolled back (exit 1), not "a human must look" (exit 5): v1 still passes the URL it
    // passed when it went live, so the app serves and the check is what is wrong.
    assert_eq!(out.code, 1, "{out}");
    assert!(!text.contains("ROLLBACK FAILED"), "{out}");
    assert!(
        text.contains("the health check itself looks wrong"),
        "{out}"
    );
    assert!(text.contains(&typo), "names the URL: {out}");
    assert!(text.contains("status 404"), "names the answer: {out}");
    assert!(text.contains("health.url"), "names the setting: {out}");
    assert_eq!(current(&app.site.deploy_to).as_deref(), Some(r1.as_str()));
    assert_serves(app.port, "v1");
}

// See: #18
#[test]
fn a_health_port_typo_shows_the_connection_error_and_v1_keeps_serving() {
    let app = App::new();
    let r1 = app.push_ok("v1");
    let typo = format!("http://127.0.0.1:{}/api/v1/status/", free_port());
    config_with_health(&app, &typo);
    let art = app.artifact("v2", &app_files("v2"));
    let out = app.push(&art, "v2");
    let text = all_output(&out);
    assert_eq!(out.code, 1, "{out}");
    assert!(
        text.contains("the health check itself looks wrong"),
        "{out}"
    );
    assert!(text.contains(&typo), "names the URL: {out}");
    assert!(
        text.contains("refused"),
        "names the connection error: {out}"
    );
    assert_eq!(current(&app.site.deploy_to).as_deref(), Some(r1.as_str()));
    assert_serves(app.port, "v1");
}

// See: #18
#[test]
fn a_previous_release_never_checked_against_the_url_is_reported_as_undecidable() {
    // v1 went live with no health check, so nothing proves it serves: still exit 5, but
    // the message says the check may be what is wrong, with the URL and its answer.
    let app = App::new();
    let port = app.port;
    app.site.write_config(
        "keep_releases = 5",
        &format!(
            r#"[defaults.release]
shared = ["log"]
migrate = "bin/migrate"
restart = "APP_PORT={port} APP_SERVER='busybox httpd -f' bin/restart"
stop = "bin/stop"
timeout = "30s"
"#
        ),
    );
    let r1 = app.push_ok("v1");
    let typo = format!("http://127.0.0.1:{port}/api/v1/statsu/");
    config_with_health(&app, &typo);
    let art = app.artifact("v2", &app_files("v2"));
    let out = app.push(&art, "v2");
    let text = all_output(&out);
    assert_eq!(out.code, 5, "{out}");
    assert!(text.contains("was never checked against"), "{out}");
    assert!(
        text.contains("the health check itself may be wrong"),
        "{out}"
    );
    assert!(text.contains(&typo) && text.contains("status 404"), "{out}");
    assert_eq!(current(&app.site.deploy_to).as_deref(), Some(r1.as_str()));
    assert_serves(app.port, "v1");
}

// See: #18
#[test]
fn releases_show_only_the_current_one_as_live_with_readable_times_and_sizes() {
    let app = App::new();
    let r1 = app.push_ok("v1");
    let art = app.artifact("v2", &app_files("v2"));
    let out = app.site.run(&[
        "push",
        "test",
        "--artifact",
        art.to_str().unwrap(),
        "--version",
        "v2",
        "--json",
    ]);
    out.assert_success();
    let r2 = current(&app.site.deploy_to).unwrap();
    // The sample app is a few KiB: not "0.0 MiB".
    assert!(!all_output(&out).contains("0.0 MiB"), "{out}");
    // TIME (duration_ms) counts the whole push, upload included; the agent's own report
    // counts from the end of the upload.
    let doc = out.json();
    let host = &doc["hosts"][0];
    let total = host["duration_ms"].as_u64().unwrap();
    let agent = host["report"]["duration_ms"].as_u64().unwrap();
    assert!(
        total > agent,
        "TIME {total} ms leaves out the upload (agent: {agent} ms): {doc}"
    );

    let out = app.site.run(&["releases", "test"]);
    out.assert_success();
    let row = |id: &str| {
        out.stdout
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("no row for {id}: {out}"))
            .to_owned()
    };
    assert!(row(&r1).contains("was live"), "{out}");
    assert!(row(&r2).contains(" live"), "{out}");
    assert!(!row(&r2).contains("was live"), "{out}");
    // CREATED to the second, in UTC: `2026-11-28 04:39:49Z`, no fraction.
    let r2_row = row(&r2);
    let created = r2_row.split_whitespace().rev().take(2).collect::<Vec<_>>();
    assert!(created[0].ends_with('Z') && created[0].len() == 9, "{out}");
    assert!(!created[0].contains('.'), "{out}");
    assert_eq!(created[1].len(), 10, "{out}");

    // --json keeps the stored status (backward compatible) and adds `state`.
    let out = app.site.run(&["releases", "test", "--json"]);
    out.assert_success();
    let doc = out.json();
    let list = doc["hosts"][0]["releases"].as_array().unwrap();
    assert_eq!(list[0]["id"], r1.as_str());
    assert_eq!(list[0]["status"], "live", "{doc}");
    assert_eq!(list[0]["state"], "was live", "{doc}");
    assert_eq!(list[1]["state"], "live", "{doc}");
}

// See: #18
#[test]
fn check_shows_the_allowed_roots_and_push_names_the_flags_that_set_them() {
    // The harness starts the agent with `--allowed-root <dir>/srv` and no config file.
    let site = Site::ssh(SshdOptions::default());
    site.write_config("", "");
    let root = site.agent.root.display().to_string();

    let out = site.run(&["check", "test"]);
    out.assert_success();
    assert!(out.stdout.contains("ALLOWED ROOTS"), "{out}");
    assert!(
        out.stdout
            .contains(&format!("{root} (from --allowed-root flags)")),
        "{out}"
    );
    let out = site.run(&["check", "test", "--json"]);
    out.assert_success();
    let doc = out.json();
    assert_eq!(doc["hosts"][0]["allowed_roots"][0], root.as_str(), "{doc}");
    assert_eq!(
        doc["hosts"][0]["roots_from"], "--allowed-root flags",
        "{doc}"
    );

    // deploy_to outside the roots: push's hint names the flags, not a file the agent
    // never read.
    let outside = site.env.path("elsewhere/app");
    let cfg = site
        .env
        .read("deploy.toml")
        .replace(site.deploy_to.to_str().unwrap(), outside.to_str().unwrap());
    site.env.write("deploy.toml", cfg);
    let art = site.env.write("dist/v1.tar.gz", tar_gz(&app_files("v1")));
    let out = site.run(&[
        "push",
        "test",
        "--artifact",
        art.to_str().unwrap(),
        "--version",
        "v1",
    ]);
    out.assert_exit(2);
    let text = all_output(&out);
    assert!(text.contains(&root), "names the roots: {out}");
    assert!(text.contains("--allowed-root"), "names the flags: {out}");
    assert!(!text.contains("/etc/deploy-agent/agent.toml"), "{out}");

    let out = site.run(&["check", "test"]);
    out.assert_exit(2);
    assert!(
        out.stdout
            .contains(&format!("outside the agent's allowed_roots ({root}")),
        "{out}"
    );
}
