//! Promotion: production takes only what staging has proved. Two environments, each a
//! real sshd and a real agent.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use deployctl_e2e::{Output, SshdOptions, TestEnv, bin, deployctl};

use crate::support::Site;

struct Pair {
    env: TestEnv,
    staging: Site,
    production: Site,
}

impl Pair {
    fn start(production_extra: &str) -> Pair {
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
        let section = |name: &str, s: &Site, extra: &str| {
            format!(
                r#"[environments.{name}]
hosts = ["{host}"]
deploy_to = "{deploy_to}"
ssh_key = "{key}"
agent_socket = "{socket}"
{extra}
"#,
                host = s.host(),
                deploy_to = s.deploy_to.display(),
                key = s.sshd().client_key.display(),
                socket = s.agent.socket.display(),
            )
        };
        let text = format!(
            r#"app = "app"
deploy_to = "/unused"

[defaults]
known_hosts = "{kh}"
agent_bin = "{agent}"
connect_timeout = "5s"
connect_retries = 1

[defaults.release]
migrate = "sh bin/migrate"
restart = "sh bin/restart"

{staging}
{production}
"#,
            kh = env.path("known_hosts").display(),
            agent = bin("deploy-agent").display(),
            staging = section("staging", &staging, ""),
            production = section("production", &production, production_extra),
        );
        env.write("deploy.toml", text);
        Pair {
            env,
            staging,
            production,
        }
    }

    /// An app release; `restart` fails for a version named `bad-*`. `level` changes how
    /// it is packed (not what it holds).
    fn artifact(&self, version: &str, level: u32, reversed: bool) -> PathBuf {
        let path = self
            .env
            .path(&format!("{version}-{level}-{reversed}.tar.gz"));
        let f = std::fs::File::create(&path).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::new(level));
        let mut tar = tar::Builder::new(gz);
        let mut files = vec![
            ("bin/migrate", "echo migrated\n".to_owned(), 0o755),
            (
                "bin/restart",
                "case \"$DEPLOY_VERSION\" in bad-*) echo 'will not start' >&2; exit 1;; esac\n"
                    .to_owned(),
                0o755,
            ),
            ("public/index.html", format!("<h1>{version}</h1>\n"), 0o644),
            ("VERSION", format!("{version}\n"), 0o600),
        ];
        if reversed {
            files.reverse();
        }
        for (name, body, mode) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(mode);
            h.set_mtime(if reversed { 1_000_000 } else { 0 });
            h.set_cksum();
            tar.append_data(&mut h, name, body.as_bytes()).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        tar.append_link(&mut h, "public/home.html", "index.html")
            .unwrap();
        tar.into_inner().unwrap().finish().unwrap();
        path
    }

    fn run(&self, args: &[&str]) -> Output {
        deployctl(self.env.root(), args, &[])
    }

    fn push(&self, env: &str, artifact: &Path, version: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "push",
            env,
            "--artifact",
            artifact.to_str().unwrap(),
            "--version",
            version,
            "--yes",
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }
}

/// Every file under `current` (not `.deploy/`): path → (mode, bytes or link target).
fn tree(deploy_to: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == ".deploy" {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(rel, (0, t.to_string_lossy().as_bytes().to_vec()));
            } else if m.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    rel,
                    (m.permissions().mode() & 0o777, std::fs::read(&p).unwrap()),
                );
            }
        }
    }
    let root = std::fs::canonicalize(deploy_to.join("current")).unwrap();
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

fn history(p: &Pair, env: &str) -> Vec<serde_json::Value> {
    let out = p.run(&["history", env, "--json"]);
    out.assert_exit(0);
    out.json()["hosts"][0]["history"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn promote_copies_the_release_byte_for_byte_and_records_where_it_came_from() {
    let p = Pair::start("");
    let v1 = p.artifact("v1", 6, false);
    p.push("staging", &v1, "v1", &[]).assert_exit(0);
    let out = p.run(&["promote", "staging", "production", "--yes"]);
    out.assert_exit(0);
    let staging_tree = tree(&p.staging.deploy_to);
    assert_eq!(staging_tree, tree(&p.production.deploy_to));
    assert!(
        staging_tree.contains_key("public/home.html"),
        "symlinks too"
    );
    assert_eq!(staging_tree["VERSION"].0, 0o600, "modes too");
    // the same content digest on both sides, and the version label carried over
    let rel = |s: &Site| {
        let out = deployctl(
            p.env.root(),
            &[
                "releases",
                if s.deploy_to == p.staging.deploy_to {
                    "staging"
                } else {
                    "production"
                },
                "--json",
            ],
            &[],
        );
        out.json()["hosts"][0]["releases"][0].clone()
    };
    let (s, d) = (rel(&p.staging), rel(&p.production));
    assert_eq!(s["content"], d["content"]);
    assert_eq!(d["version"], "v1");
    let h = history(&p, "production");
    let last = h.last().unwrap();
    assert_eq!(last["origin"]["environment"], "staging", "{last}");
    assert_eq!(last["origin"]["release"], s["id"], "{last}");
}

#[test]
fn a_rolled_back_release_is_not_promoted() {
    let p = Pair::start("");
    p.push("staging", &p.artifact("v1", 6, false), "v1", &[])
        .assert_exit(0);
    let bad = p.artifact("bad-2", 6, false);
    p.push("staging", &bad, "bad-2", &[]).assert_exit(1);
    let out = p.run(&[
        "promote",
        "staging",
        "production",
        "--version",
        "bad-2",
        "--yes",
    ]);
    out.assert_exit(2);
    assert!(out.stderr.contains("rolled_back"), "{out}");
    assert!(
        !p.production.deploy_to.join("current").exists(),
        "nothing changed"
    );
    // what staging runs (v1) is fine
    p.run(&["promote", "staging", "production", "--yes"])
        .assert_exit(0);
    assert_eq!(tree(&p.production.deploy_to)["VERSION"].1, b"v1\n");
}

#[test]
fn promote_from_refuses_unproven_content_and_accepts_the_same_content_repacked() {
    let p = Pair::start("promote_from = \"staging\"");
    let v1 = p.artifact("v1", 6, false);
    // never deployed to staging
    let out = p.push("production", &v1, "v1", &[]);
    out.assert_exit(2);
    assert!(
        out.stderr.contains("deployctl promote staging production"),
        "names the command to run instead: {out}"
    );
    assert!(!p.production.deploy_to.join("current").exists());
    // live on staging: the same content, packed differently, passes the gate
    p.push("staging", &v1, "v1", &[]).assert_exit(0);
    let repacked = p.artifact("v1", 1, true);
    assert_ne!(
        std::fs::read(&v1).unwrap(),
        std::fs::read(&repacked).unwrap()
    );
    let out = p.push("production", &repacked, "v1", &[]);
    out.assert_exit(0);
    let h = history(&p, "production");
    assert_eq!(h.last().unwrap()["origin"]["environment"], "staging");
    // a release that failed on staging does not prove anything
    let bad = p.artifact("bad-3", 6, false);
    p.push("staging", &bad, "bad-3", &[]).assert_exit(1);
    p.push("production", &bad, "bad-3", &[]).assert_exit(2);
}

#[test]
fn force_pushes_past_the_gate_loudly_and_the_history_says_so() {
    let p = Pair::start("promote_from = \"staging\"");
    let v9 = p.artifact("v9", 6, false);
    let summary = p.env.path("summary.md");
    let out = deployctl(
        p.env.root(),
        &[
            "push",
            "production",
            "--artifact",
            v9.to_str().unwrap(),
            "--version",
            "v9",
            "--yes",
            "--force",
        ],
        &[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_STEP_SUMMARY", summary.to_str().unwrap()),
        ],
    );
    out.assert_exit(0);
    assert!(out.stderr.contains("FORCED"), "{out}");
    assert!(out.stdout.contains("::warning"), "{out}");
    let summary = std::fs::read_to_string(&summary).unwrap();
    assert!(summary.contains("FORCED"), "{summary}");
    let h = history(&p, "production");
    assert_eq!(h.last().unwrap()["origin"]["forced"], true);
}

#[test]
fn a_release_changed_on_disk_is_not_promoted() {
    let p = Pair::start("");
    p.push("staging", &p.artifact("v1", 6, false), "v1", &[])
        .assert_exit(0);
    // someone edits a file in the live release on staging
    let current = std::fs::canonicalize(p.staging.deploy_to.join("current")).unwrap();
    std::fs::write(current.join("public/index.html"), "<h1>hotfix</h1>\n").unwrap();
    let out = p.run(&["promote", "staging", "production", "--yes"]);
    out.assert_exit(2);
    assert!(out.stderr.contains("public/index.html"), "{out}");
    assert!(!p.production.deploy_to.join("current").exists());
}
