//! Under GitHub Actions: groups, error annotations, the step summary; and secrets never
//! reach any output.

use deployctl_e2e::{Output, SshdOptions};

use crate::support::Site;

const SECRET: &str = "s3cr3t-Pa55word-0042";

/// A one-file release whose migration prints `$1` and then fails when asked to.
fn artifact(site: &Site, name: &str) -> String {
    let path = site.env.path(name);
    let f = std::fs::File::create(&path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let body = "echo \"migrating with $1\"\n[ \"${2:-}\" = fail ] && exit 3\nexit 0\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(0o755);
    h.set_cksum();
    tar.append_data(&mut h, "bin/migrate", body.as_bytes())
        .unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    path.display().to_string()
}

fn site(fail: bool) -> Site {
    let s = Site::ssh(SshdOptions::default());
    let migrate = if fail {
        "sh bin/migrate ${DB_PASSWORD} fail"
    } else {
        "sh bin/migrate ${DB_PASSWORD}"
    };
    s.write_config(
        "secrets = [\"DB_PASSWORD\"]",
        &format!("[defaults.release]\nmigrate = \"{migrate}\"\n"),
    );
    // The key arrives as text, as from a CI secret: drop ssh_key from the config.
    let cfg: String = s
        .env
        .read("deploy.toml")
        .lines()
        .filter(|l| !l.starts_with("ssh_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    s.env.write("deploy.toml", cfg);
    s
}

fn push(s: &Site, args: &[&str]) -> (Output, String) {
    let summary = s.env.path("summary.md");
    let key = std::fs::read_to_string(&s.sshd().client_key).unwrap();
    let art = artifact(s, "a.tar.gz");
    let mut full = vec!["push", "test", "--artifact", art.as_str()];
    full.extend_from_slice(args);
    let out = s.run_env(
        &full,
        &[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_STEP_SUMMARY", summary.to_str().unwrap()),
            ("GITHUB_REPOSITORY", "acme/shop"),
            ("GITHUB_RUN_ID", "42"),
            ("DEPLOYCTL_SSH_KEY", &key),
            ("DB_PASSWORD", SECRET),
        ],
    );
    let summary = std::fs::read_to_string(&summary).unwrap_or_default();
    (out, summary)
}

fn assert_no_secrets(s: &Site, texts: &[&str]) {
    let key = std::fs::read_to_string(&s.sshd().client_key).unwrap();
    let key_body: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    for t in texts {
        assert!(!t.contains(SECRET), "the secret leaked:\n{t}");
        for l in &key_body {
            assert!(!t.contains(l), "the key leaked:\n{t}");
        }
    }
}

#[test]
fn groups_summary_and_masked_secrets_on_success() {
    let s = site(false);
    let (out, summary) = push(&s, &["--version", "v1"]);
    out.assert_exit(0);
    assert!(out.stdout.contains("::group::"), "{out}");
    assert!(out.stdout.contains("::endgroup::"), "{out}");
    assert!(out.stdout.contains("::add-mask::"), "{out}");
    assert!(
        out.stdout.contains("running `sh bin/migrate ***`"),
        "the command line is masked: {out}"
    );
    assert!(!out.stdout.contains("::add-mask::-----"), "{out}");
    assert!(summary.contains("| host | outcome |"), "{summary}");
    assert!(summary.contains("live"), "{summary}");
    // the lock and history name the workflow run
    let key = std::fs::read_to_string(&s.sshd().client_key).unwrap();
    let h = s.run_env(
        &["history", "test", "--json"],
        &[("DB_PASSWORD", SECRET), ("DEPLOYCTL_SSH_KEY", &key)],
    );
    assert!(h.stdout.contains("github:acme/shop#42"), "{h}");
    assert_no_secrets(&s, &[&out.stderr, &summary, &h.stdout]);
    // ::add-mask:: lines are how GitHub learns the secrets; everything else is masked
    let rest: String = out
        .stdout
        .lines()
        .filter(|l| !l.starts_with("::add-mask::"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_no_secrets(&s, &[&rest]);
}

#[test]
fn a_failed_deploy_is_an_error_annotation_and_json_is_masked_too() {
    let s = site(true);
    let (out, summary) = push(&s, &["--json"]);
    out.assert_exit(1);
    assert!(out.stdout.contains("::error title=deployctl"), "{out}");
    assert!(summary.contains("failed"), "{summary}");
    assert!(summary.contains("exit code 1"), "{summary}");
    let rest: String = out
        .stdout
        .lines()
        .filter(|l| !l.starts_with("::add-mask::"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_no_secrets(&s, &[&rest, &out.stderr, &summary]);
    assert!(rest.contains("***"), "the secret was there to mask: {out}");
    // nor in the agent's own log, its journal or its history on disk
    assert!(
        !s.agent.log().contains(SECRET),
        "agent log: {}",
        s.agent.log()
    );
    let history = std::fs::read_to_string(s.deploy_to.join(".deploy/history.jsonl")).unwrap();
    assert!(!history.contains(SECRET), "{history}");
    assert!(history.contains("***"), "{history}");
}
