//! `--plan` (push, rollback, promote) and `deployctl config ENV`, over a real sshd and the
//! real agent. A plan must change nothing on the server: the tests hash the agent's whole
//! tree (paths, modes, mtimes, contents) and its history before and after.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deployctl_e2e::{Output, SshdOptions, TestEnv, bin, deployctl};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::support::Site;

/// Deterministic, incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `n` files of 8 KiB; file 3 holds `changed_seed` (the one file that differs between
/// versions).
fn artifact(dir: &TestEnv, name: &str, n: usize, changed_seed: u64) -> PathBuf {
    let path = dir.path(&format!("{name}.tar.gz"));
    let f = std::fs::File::create(&path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for i in 0..n {
        let data = noise(if i == 3 { changed_seed } else { i as u64 }, 8192);
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("files/f{i}"), &data[..])
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    path
}

/// Every entry under `root`: path -> (kind, mode, mtime, content hash or link target).
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let head = format!(
                "mode {:o} mtime {}.{:09}",
                m.permissions().mode(),
                m.mtime(),
                m.mtime_nsec()
            );
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(rel, format!("link {head} -> {}", t.display()));
            } else if m.is_dir() {
                out.insert(rel, format!("dir {head}"));
                walk(root, &p, out);
            } else {
                let sum = hex::encode(Sha256::digest(std::fs::read(&p).unwrap()));
                out.insert(rel, format!("file {head} size {} {sum}", m.len()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The server's state as far as a plan could touch it: the agent's whole tree, and
/// the history the agent reports.
fn state(s: &Site) -> (BTreeMap<String, String>, serde_json::Value) {
    let history = s.run(&["history", "test", "--json"]);
    history.assert_exit(0);
    (snapshot(&s.agent.root), history.json()["hosts"].clone())
}

fn assert_unchanged(s: &Site, before: &(BTreeMap<String, String>, serde_json::Value)) {
    let after = state(s);
    for (k, v) in &before.0 {
        assert_eq!(Some(v), after.0.get(k), "{k} changed");
    }
    for k in after.0.keys() {
        assert!(before.0.contains_key(k), "{k} appeared");
    }
    assert_eq!(before.1, after.1, "history changed");
}

fn site() -> Site {
    let s = Site::ssh(SshdOptions::default());
    s.write_config(
        "keep_releases = 5",
        "[defaults.release]\nmigrate = \"true\"\n",
    );
    s
}

fn push(s: &Site, art: &Path, version: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "push",
        "test",
        "--artifact",
        art.to_str().unwrap(),
        "--version",
        version,
    ];
    args.extend_from_slice(extra);
    s.run(&args)
}

fn current(s: &Site) -> String {
    let out = s.run(&["status", "test", "--json"]);
    out.assert_exit(0);
    let doc = out.json();
    doc["hosts"][0]["status"]["current"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no current release in {doc}"))
        .to_owned()
}

#[test]
fn push_plan_changes_nothing_and_counts_only_the_delta() {
    let s = site();
    let v1 = artifact(&s.env, "v1", 40, 1_000);
    let v2 = artifact(&s.env, "v2", 40, 2_000);
    let v2_size = std::fs::metadata(&v2).unwrap().len();

    // Nothing deployed yet: the whole artifact would go.
    let before = state(&s);
    let out = push(&s, &v1, "v1", &["--plan", "--json"]);
    out.assert_exit(0);
    let doc = out.json();
    assert_eq!(doc["plan"], true, "{doc}");
    let h = &doc["hosts"][0];
    assert!(h["current"].is_null(), "{doc}");
    assert_eq!(
        h["send_bytes"].as_u64(),
        Some(std::fs::metadata(&v1).unwrap().len())
    );
    assert!(h["delta"].is_null(), "{doc}");
    assert_eq!(h["migrations"], true, "{doc}");
    assert!(h["free_bytes"].as_u64().unwrap() > 0, "{doc}");
    assert_unchanged(&s, &before);

    push(&s, &v1, "v1", &[]).assert_exit(0);
    let v1_id = current(&s);

    // One file changed: the plan counts that file, not the whole artifact.
    let before = state(&s);
    let out = push(&s, &v2, "v2", &["--plan", "--json", "--skip-migrations"]);
    out.assert_exit(0);
    let doc = out.json();
    let h = &doc["hosts"][0];
    assert_eq!(h["current"].as_str(), Some(v1_id.as_str()), "{doc}");
    let new = h["new"].as_str().unwrap().to_owned();
    assert!(new > v1_id, "{doc}");
    assert_eq!(doc["release"].as_str(), Some(new.as_str()));
    assert_eq!(h["delta"]["files_sent"], 1, "{doc}");
    assert_eq!(h["delta"]["files_total"], 40, "{doc}");
    assert_eq!(h["delta"]["file_bytes"], 8192, "{doc}");
    let send = h["send_bytes"].as_u64().unwrap();
    assert!(
        (8192..v2_size / 4).contains(&send),
        "one incompressible 8 KiB file, not the {v2_size}-byte artifact: {doc}"
    );
    assert_eq!(h["migrations"], false, "--skip-migrations: {doc}");
    assert!(h["lock"].is_null(), "{doc}");
    assert_eq!(doc["batches"][0]["hosts"][0], s.host(), "{doc}");
    assert_eq!(doc["exit_code"], 0);
    assert_eq!(doc["changed"], false);

    // The text form says the same.
    let out = push(&s, &v2, "v2", &["--plan"]);
    out.assert_exit(0);
    assert!(
        out.stdout.contains(&format!("{v1_id} -> ")),
        "current -> new: {out}"
    );
    assert!(
        out.stdout.contains("delta: 1 of 40 files"),
        "the delta: {out}"
    );
    assert!(out.stdout.contains("migrations: would run"), "{out}");
    assert!(out.stdout.contains("batch 1: "), "{out}");
    assert!(out.stdout.contains("nothing was changed"), "{out}");
    assert_unchanged(&s, &before);

    // And the real push sends what the plan said.
    let out = push(&s, &v2, "v2", &[]);
    out.assert_exit(0);
    assert!(
        out.stderr.contains("delta: sending 1 of 40 files"),
        "the plan matched the push: {out}"
    );
}

#[test]
fn a_plan_reports_the_held_lock_with_exit_4() {
    let s = Site::ssh(SshdOptions::default());
    s.write_config("", "[defaults.release]\nmigrate = \"sleep 10\"\n");
    let v1 = artifact(&s.env, "v1", 4, 1_001);
    let mut holder = Command::new(bin("deployctl"))
        .current_dir(s.env.root())
        .args([
            "push",
            "test",
            "--artifact",
            v1.to_str().unwrap(),
            "--version",
            "v1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = s.deploy_to.join(".deploy/lock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lock.exists() {
        assert!(
            Instant::now() < deadline,
            "the first push never took the lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = push(&s, &v1, "v1", &["--plan", "--json"]);
    let doc = out.json();
    let real_holder = doc["hosts"][0]["lock"]["holder"].as_str().unwrap_or("");
    assert!(!real_holder.is_empty(), "names the holder: {doc}");
    assert_eq!(doc["exit_code"], 4, "{doc}");
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains("is being deployed by"),
        "{doc}"
    );
    out.assert_exit(4);
    let out = s.run(&["rollback", "test", "--plan"]);
    out.assert_exit(4);
    assert!(out.stdout.contains("lock: held by"), "{out}");
    // With --lock-wait the real push would wait: the plan says so and goes ahead.
    let out = push(&s, &v1, "v1", &["--plan", "--lock-wait", "2m"]);
    out.assert_exit(0);
    assert!(out.stdout.contains("would wait up to 2m"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = holder.try_wait().unwrap() {
            assert!(st.success(), "the first push: {st}");
            break;
        }
        if Instant::now() > deadline {
            let _ = holder.kill();
            let _ = holder.wait();
            panic!("the first push did not finish");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rollback_plan_names_the_target_and_fails_like_the_real_one() {
    let s = site();
    let v1 = artifact(&s.env, "v1", 4, 1_001);
    let v2 = artifact(&s.env, "v2", 4, 1_002);
    push(&s, &v1, "v1", &[]).assert_exit(0);
    let v1_id = current(&s);
    push(&s, &v2, "v2", &[]).assert_exit(0);
    let v2_id = current(&s);

    let before = state(&s);
    let out = s.run(&["rollback", "test", "--plan", "--json"]);
    out.assert_exit(0);
    let doc = out.json();
    let h = &doc["hosts"][0];
    assert_eq!(h["current"].as_str(), Some(v2_id.as_str()), "{doc}");
    assert_eq!(h["new"].as_str(), Some(v1_id.as_str()), "{doc}");
    assert_eq!(h["send_bytes"], 0, "{doc}");
    let out = s.run(&["rollback", "test", "--to", "v1", "--plan"]);
    out.assert_exit(0);
    assert!(out.stdout.contains(&format!("{v2_id} -> {v1_id}")), "{out}");

    // A release that is not there: the plan fails as the rollback does.
    let plan = s.run(&["rollback", "test", "--to", "v9", "--plan", "--json"]);
    plan.assert_exit(2);
    let doc = plan.json();
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains("release \"v9\" does not exist on"),
        "{doc}"
    );
    assert_unchanged(&s, &before);
    let real = s.run(&["rollback", "test", "--to", "v9"]);
    real.assert_exit(2);
    assert!(real.stderr.contains("does not exist on"), "{real}");
    assert_eq!(current(&s), v2_id);
}

#[test]
fn promote_plan_changes_nothing_on_either_side() {
    let env = TestEnv::new();
    let staging = Site::ssh(SshdOptions::default());
    let production = Site::ssh(SshdOptions::default());
    env.write(
        "known_hosts",
        format!(
            "{}\n{}\n",
            staging.sshd().known_hosts_line(),
            production.sshd().known_hosts_line()
        ),
    );
    let section = |name: &str, s: &Site| {
        format!(
            "[environments.{name}]\nhosts = [\"{}\"]\ndeploy_to = \"{}\"\nssh_key = \"{}\"\n\
             agent_socket = \"{}\"\n",
            s.host(),
            s.deploy_to.display(),
            s.sshd().client_key.display(),
            s.agent.socket.display()
        )
    };
    env.write(
        "deploy.toml",
        format!(
            "app = \"app\"\ndeploy_to = \"/unused\"\n\n[defaults]\nknown_hosts = \"{}\"\n\
             agent_bin = \"{}\"\nconnect_timeout = \"5s\"\nconnect_retries = 1\n\n{}\n{}",
            env.path("known_hosts").display(),
            bin("deploy-agent").display(),
            section("staging", &staging),
            section("production", &production)
        ),
    );
    let run = |args: &[&str]| deployctl(env.root(), args, &[]);
    let v1 = artifact(&env, "v1", 6, 1_001);
    let v2 = artifact(&env, "v2", 6, 1_002);
    let a = v1.to_str().unwrap();
    run(&["push", "production", "--artifact", a, "--version", "v1"]).assert_exit(0);
    let b = v2.to_str().unwrap();
    run(&["push", "staging", "--artifact", b, "--version", "v2"]).assert_exit(0);

    let trees = || {
        (
            snapshot(&staging.agent.root),
            snapshot(&production.agent.root),
        )
    };
    let before = trees();
    let out = run(&["promote", "staging", "production", "--plan", "--json"]);
    out.assert_exit(0);
    let doc = out.json();
    assert_eq!(doc["from"], "staging", "{doc}");
    assert_eq!(doc["version"], "v2", "{doc}");
    let h = &doc["hosts"][0];
    assert_eq!(h["delta"]["files_sent"], 1, "only the changed file: {doc}");
    assert!(h["current"].is_string(), "{doc}");
    assert_eq!(trees(), before, "a promote plan changed a server");
}

#[test]
fn config_shows_the_resolved_environment_with_secrets_masked() {
    let env = TestEnv::new();
    env.write(
        "deploy.toml",
        r#"app = "shop"
deploy_to = "/srv/shop"

[defaults]
keep_releases = 7
max_parallel = 4
secrets = ["API_TOKEN"]

[defaults.release]
migrate = "bin/migrate"
hooks = { after_live = "bin/announce" }

[defaults.notify]
webhook = "https://hooks.example.com/services/T0/B0/xoxb-hook-token-77"

[environments.prod]
hosts = ["web-1.example.com", "deploy@web-2.example.com:2222"]
keep_releases = 9

[environments.prod.health]
url = "http://127.0.0.1:${APP_PORT}/health?token=${API_TOKEN}"
watch = "2m"

[environments.prod.cutover]
ports = [4001, 4002]
start = "sudo systemctl start shop@${DEPLOY_PORT}"
stop = "sudo systemctl stop shop@${DEPLOY_PORT}"
switch = "bin/route ${DEPLOY_PORT}"
"#,
    );
    let secret = "s3cr3t-token-value-4242";
    let vars = [
        ("APP_PORT", "8087"),
        ("API_TOKEN", secret),
        ("DEPLOYCTL_MAX_PARALLEL", "2"),
    ];
    let text = deployctl(env.root(), &["config", "prod"], &vars);
    text.assert_exit(0);
    let json = deployctl(env.root(), &["config", "prod", "--json"], &vars);
    json.assert_exit(0);
    for out in [&text, &json] {
        assert!(
            !out.stdout.contains(secret) && !out.stderr.contains(secret),
            "the secret leaked: {out}"
        );
        assert!(
            !out.stdout.contains("xoxb-hook-token-77") && !out.stderr.contains("xoxb"),
            "the webhook URL leaked: {out}"
        );
    }
    let t = &text.stdout;
    assert!(t.contains("keep_releases = 9"), "environment wins: {text}");
    assert!(
        t.contains("migrate = \"bin/migrate\""),
        "defaults merged: {text}"
    );
    assert!(t.contains("max_parallel = 2"), "override: {text}");
    assert!(t.contains("DEPLOYCTL_MAX_PARALLEL"), "says where: {text}");
    assert!(
        t.contains("url = \"http://127.0.0.1:8087/health?token=***\""),
        "${{VAR}} expanded, the secret masked: {text}"
    );
    assert!(t.contains("API_TOKEN = \"***\""), "{text}");
    assert!(t.contains("retries = 12"), "built-in defaults: {text}");
    let doc = json.json();
    assert_eq!(doc["keep_releases"], 9, "{doc}");
    assert_eq!(doc["max_parallel"], 2, "{doc}");
    assert_eq!(doc["release"]["migrate"], "bin/migrate", "{doc}");
    assert_eq!(
        doc["health"]["url"], "http://127.0.0.1:8087/health?token=***",
        "{doc}"
    );
    assert_eq!(doc["hosts"][1], "deploy@web-2.example.com:2222", "{doc}");
    assert_eq!(doc["secret_values"]["API_TOKEN"], "***", "{doc}");
    // The keys of the cutover, the watch, hooks and notifications are shown too.
    assert_eq!(doc["health"]["watch"], "2m", "{doc}");
    assert_eq!(
        doc["release"]["hooks"]["after_live"], "bin/announce",
        "{doc}"
    );
    assert_eq!(doc["cutover"]["ports"], json!([4001, 4002]), "{doc}");
    assert_eq!(doc["cutover"]["drain"], "10s", "{doc}");
    assert_eq!(doc["notify"]["webhooks"], json!(["***"]), "{doc}");
    assert!(t.contains("[cutover]"), "{text}");

    let out = deployctl(env.root(), &["config", "nope"], &vars);
    out.assert_exit(2);
    let man = deployctl(env.root(), &["man", "config"], &[]);
    man.assert_exit(0);
    assert!(man.stdout.contains("secrets"), "{man}");
}

#[test]
fn a_plan_fails_like_the_push_on_an_unknown_host_key_or_a_bad_artifact() {
    let s = site();
    let v1 = artifact(&s.env, "v1", 4, 1_001);
    let not_gzip = s.env.write("notes.txt", "not an artifact\n");
    let out = push(&s, &not_gzip, "v1", &["--plan", "--json"]);
    out.assert_exit(2);
    let doc = out.json();
    assert_eq!(doc["exit_code"], 2, "{doc}");
    assert!(
        doc["error"].as_str().unwrap().contains("notes.txt"),
        "{doc}"
    );
    let real = push(&s, &not_gzip, "v1", &[]);
    real.assert_exit(2);

    // A host whose key is not known: exit 3, as for every command.
    s.env.write("known_hosts", "");
    let before = snapshot(&s.agent.root);
    let out = push(&s, &v1, "v1", &["--plan", "--json"]);
    out.assert_exit(3);
    let doc = out.json();
    assert_eq!(doc["hosts"][0]["exit_code"], 3, "{doc}");
    assert!(doc["hosts"][0]["error"].is_string(), "{doc}");
    assert_eq!(snapshot(&s.agent.root), before);
    assert!(
        s.env.read("known_hosts").is_empty(),
        "a plan records no host key"
    );
}
