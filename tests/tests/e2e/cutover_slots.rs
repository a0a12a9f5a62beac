//! `[cutover]` for the release strategy (#13 item 1), on the rig of `cutover.rs`: a real
//! sshd, the real agent, the sample app (one busybox httpd per slot, booting in 0.3 s)
//! and a real nginx whose upstream the `switch` command rewrites.
//!
//! - Under 150 requests/s through nginx: the plain-restart baseline first (it must fail
//!   requests), then ten cutover deploys, a broken one and a rollback: **no** request
//!   fails. Both counts are printed.
//! - The agent is killed (SIGKILL) at each cutover step (started, switched, draining)
//!   and started again: recovery leaves exactly one slot serving, nginx on it.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use deployctl_e2e::Agent;
use deployctl_e2e::nginx;

use crate::cutover::{BOOT_SECONDS, ReleaseRig, start_load};
use crate::release::{app_files, free_port, tar_gz};

/// deploy.toml for `[cutover]` on `ports`; `hold_dir`: each command first waits while
/// `<hold_dir>/hold-<command>` exists (writing its shell's pid to `.pid` beside it).
fn configure(rig: &ReleaseRig, ports: [u16; 2], drain: &str, hold_dir: &Path) {
    let hold = |name: &str| {
        let h = hold_dir.join(format!("hold-{name}"));
        let h = h.display();
        format!(
            "if [ -e {h} ]; then echo $$ > {h}.pid; while [ -e {h} ]; do sleep 0.05; done; fi; "
        )
    };
    let [p1, p2] = ports;
    rig.site.write_config(
        "keep_releases = 3",
        &format!(
            r#"[defaults.release]
shared = ["log"]
migrate = "bin/migrate"
timeout = "30s"

[defaults.health]
url = "http://127.0.0.1:${{DEPLOY_PORT}}/api/v1/status/"
retries = 30
interval = "100ms"
request_timeout = "1s"

[defaults.cutover]
ports = [{p1}, {p2}]
start = '''{}APP_PORT=${{DEPLOY_PORT}} APP_PIDFILE=log/app-${{DEPLOY_PORT}}.pid APP_BOOT_SECONDS={BOOT_SECONDS} APP_SERVER='busybox httpd -f' bin/restart'''
stop = '''APP_PIDFILE=log/app-${{DEPLOY_PORT}}.pid bin/stop'''
switch = '''{}{}'''
drain = "{drain}"
"#,
            hold("start"),
            hold("switch"),
            rig.nginx.switch_command(),
        ),
    );
}

/// The sample app without its status page: the health check on the new slot gets 404.
fn push_broken(rig: &ReleaseRig, version: &str) -> deployctl_e2e::Output {
    let files: Vec<_> = app_files(version)
        .into_iter()
        .filter(|(p, _, _)| !p.starts_with("public/api/"))
        .collect();
    let art = rig
        .site
        .env
        .write(&format!("dist/{version}.tar.gz"), tar_gz(&files));
    rig.site.run(&[
        "push",
        "test",
        "--artifact",
        art.to_str().unwrap(),
        "--version",
        version,
    ])
}

fn answers(port: u16) -> bool {
    nginx::http_get(port, "/", Duration::from_secs(1)).0 == 200
}

fn current(rig: &ReleaseRig) -> PathBuf {
    std::fs::read_link(rig.site.deploy_to.join("current")).expect("current")
}

/// Exactly one of `ports` answers, nginx's upstream is it, and nginx serves `version`.
#[track_caller]
fn assert_one_slot_serves(rig: &ReleaseRig, ports: [u16; 2], version: &str) -> u16 {
    let up: Vec<u16> = ports.into_iter().filter(|p| answers(*p)).collect();
    assert_eq!(
        up.len(),
        1,
        "exactly one slot of {ports:?} should answer, these do: {up:?}\n--- agent log ---\n{}",
        rig.site.agent.log()
    );
    assert_eq!(
        rig.nginx.upstream_port(),
        Some(up[0]),
        "nginx is on the slot"
    );
    rig.assert_proxy_serves(version);
    up[0]
}

#[test]
fn cutover_deploys_a_broken_one_and_a_rollback_fail_no_request_under_load() {
    let Some(rig) = ReleaseRig::new() else {
        return;
    };
    // The baseline, on the same rig and in the same run: plain `restart`.
    rig.configure_restart("");
    rig.push_ok("v1");
    let load = start_load(rig.nginx.port, "/api/v1/status/");
    let t = Instant::now();
    for v in ["v2", "v3"] {
        rig.push_ok(v);
    }
    let plain = t.elapsed() / 2;
    let baseline = load.stop();
    assert!(
        baseline.failed > 0,
        "the plain restart baseline fails requests: {baseline}"
    );

    let ports = [free_port(), free_port()];
    configure(&rig, ports, "1s", rig.site.env.root());
    let load = start_load(rig.nginx.port, "/api/v1/status/");
    // The first cutover deploy moves the app onto the first slot (the plain server keeps
    // running beside it until the test ends: an operator step, see docs/cutover.md).
    let t = Instant::now();
    for i in 1..=10 {
        rig.push_ok(&format!("c{i}"));
    }
    let each = t.elapsed() / 10;
    let serving = assert_one_slot_serves(&rig, ports, "c10");
    let before = current(&rig);

    // A broken release: exit 1, its slot is gone, `current` unchanged, nginx unchanged.
    let out = push_broken(&rig, "broken");
    out.assert_exit(1);
    assert!(
        out.stderr.contains("404") || out.stdout.contains("404"),
        "the health check's answer is shown: {}{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(current(&rig), before, "current is unchanged");
    assert_eq!(
        assert_one_slot_serves(&rig, ports, "c10"),
        serving,
        "the old slot serves on"
    );

    // A rollback is the same dance with the target release.
    rig.site.run(&["rollback", "test"]).assert_success();
    assert_one_slot_serves(&rig, ports, "c9");
    let report = load.stop();
    println!(
        "cutover: {} failed requests over 10 cutover deploys ({:.2} s each), a broken deploy \
         and a rollback, at 150 requests/s through nginx\n{report}\nanswers: {:?}\n\
         baseline (plain restart, 2 deploys, {:.2} s each): {} failed\n{baseline}",
        report.failed,
        each.as_secs_f64(),
        report.served,
        plain.as_secs_f64(),
        baseline.failed,
    );
    // One line for bench/cutover.
    println!(
        "BENCH cutover plain_deploys=2 plain_failed={} plain_deploy_s={:.2} \
         cutover_deploys=12 cutover_failed={} cutover_deploy_s={:.2} drain_s=1",
        baseline.failed,
        plain.as_secs_f64(),
        report.failed,
        each.as_secs_f64(),
    );
    assert_eq!(
        report.failed,
        0,
        "{report}\n--- nginx error.log ---\n{}",
        rig.nginx.log()
    );
    assert!(report.served.keys().any(|k| k.contains("c1")), "{report}");
}

/// Waits (30 s) until `cond` holds.
#[track_caller]
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn killing_the_agent_at_each_cutover_step_leaves_one_slot_serving() {
    let Some(mut rig) = ReleaseRig::new() else {
        return;
    };
    let holds = rig.site.env.mkdir("holds");
    let ports = [free_port(), free_port()];
    configure(&rig, ports, "2s", &holds);
    // The first cutover deploy has no old slot to drain: nginx's reload (its old worker
    // still sends to the empty upstream of the rig) is waited for here.
    rig.push("v1").assert_success();
    wait_for("nginx to serve v1", || {
        rig.nginx.get("/").1.contains("version v1<")
    });
    assert_one_slot_serves(&rig, ports, "v1");
    let journal = rig.site.deploy_to.join(".deploy/journal.json");

    for (n, step) in ["started", "switched", "draining"].into_iter().enumerate() {
        let version = format!("v{}", n + 2);
        let hold = match step {
            "started" => Some(holds.join("hold-start")),
            "switched" => Some(holds.join("hold-switch")),
            _ => None,
        };
        if let Some(h) = &hold {
            std::fs::write(h, "").unwrap();
        }
        thread::scope(|s| {
            let rig_ref = &rig;
            let pushed = s.spawn(move || rig_ref.push(&version));
            match &hold {
                Some(h) => {
                    let pid = h.with_extension("pid");
                    wait_for(&format!("{step}: the held command"), || pid.exists());
                }
                None => wait_for("the draining phase", || {
                    std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("\"draining\""))
                }),
            }
            // SAFETY of the test: this agent is ours (started by the rig).
            let pid = rig_ref.site.agent.pid();
            assert!(pid > 0);
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            let out = pushed.join().unwrap();
            assert_ne!(out.code, 0, "the push lost its agent: {}", out.stderr);
        });
        // The command the dead agent was running: killed too (by its pid), then released.
        if let Some(h) = &hold {
            let pid_file = h.with_extension("pid");
            let pid = std::fs::read_to_string(&pid_file).unwrap();
            let _ = std::process::Command::new("kill")
                .args(["-9", pid.trim()])
                .status();
            std::fs::remove_file(h).unwrap();
            std::fs::remove_file(&pid_file).unwrap();
        }
        rig.site.agent.kill9();
        rig.site.agent = Agent::start(&rig.site.env.path("agent"));
        wait_for(&format!("{step}: recovery to finish"), || !journal.exists());
        // Recovery finished the deploy: the new release serves, alone.
        assert_one_slot_serves(&rig, ports, &format!("v{}", n + 2));
        let hist = rig.site.run(&["history", "test"]);
        hist.assert_success();
    }
}
