//! What a user meets before any server is involved: closed pipes, colours in logs, shell
//! completion through a real bash, and the man pages (#18).

use std::io::PipeWriter;
use std::process::{Command, Stdio};

use deployctl_e2e::{TestEnv, bin};

/// A pipe whose read end is already closed: every write to it fails with EPIPE.
fn closed_pipe() -> PipeWriter {
    let (read, write) = std::io::pipe().expect("pipe(2)");
    drop(read);
    write
}

// See: #18 (item 6). `deployctl ... 2>&1 >/dev/null | head -n 2` used to panic (exit 101).
#[test]
fn a_closed_stderr_or_stdout_is_not_a_panic() {
    let env = TestEnv::new();
    let missing = env.path("no-such-deploy.toml");
    let status = Command::new(bin("deployctl"))
        .args(["--config", missing.to_str().unwrap(), "status", "staging"])
        .stdout(Stdio::from(closed_pipe()))
        .stderr(Stdio::from(closed_pipe()))
        .status()
        .expect("run deployctl");
    // The documented code for a missing config, not Rust's 101 for a panic.
    assert_eq!(status.code(), Some(2), "{status:?}");

    let status = Command::new(bin("deployctl"))
        .arg("man")
        .stdout(Stdio::from(closed_pipe()))
        .stderr(Stdio::from(closed_pipe()))
        .status()
        .expect("run deployctl man");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

// See: #18 (item 7). DEPLOYCTL_LOG=debug wrote colour codes into a pipe.
#[test]
fn debug_logs_into_a_pipe_have_no_colour_codes() {
    let env = TestEnv::new();
    env.write(
        "deploy.toml",
        "app = \"x\"\ndeploy_to = \"/srv/x\"\n[environments.staging]\n\
         hosts = [\"127.0.0.1:1\"]\nknown_hosts = \"known_hosts\"\n",
    );
    // Nothing listens on port 1: the connect attempts are logged at debug level.
    let out = Command::new(bin("deployctl"))
        .current_dir(env.dir.path())
        .args(["check", "staging"])
        .env("DEPLOYCTL_LOG", "debug")
        .output()
        .expect("run deployctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DEBUG"), "debug logging is on:\n{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "no escape codes in a pipe:\n{stderr:?}"
    );
}

/// Asks the real bash completion function what it offers for `words` (the last one is the
/// word being completed), with the registration script `deployctl completions bash` prints.
fn bash_complete(env: &TestEnv, words: &[&str]) -> Vec<String> {
    let bin_dir = bin("deployctl").parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let script = format!(
        "source <(deployctl completions bash) || exit 9\n\
         COMP_WORDS=({words})\nCOMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))\n\
         _clap_complete_deployctl deployctl \"${{COMP_WORDS[COMP_CWORD]}}\" x\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        words = quoted.join(" ")
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(env.dir.path())
        .env("PATH", path)
        .env_remove("DEPLOYCTL_CONFIG")
        .output()
        .expect("run bash");
    assert!(out.status.success(), "bash: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

// See: #18 (item 10). Completions offered the hidden demo-app, did not know the
// environments, and completed file names after --to.
#[test]
fn bash_completion_knows_environments_and_hides_internals() {
    let env = TestEnv::new();
    env.write(
        "deploy.toml",
        "app = \"x\"\ndeploy_to = \"/srv/x\"\n[environments.staging]\nhosts = [\"a\"]\n\
         [environments.production]\nhosts = [\"b\"]\n",
    );
    env.write("a-file.tar.gz", "not really");

    let commands = bash_complete(&env, &["deployctl", ""]);
    assert!(commands.contains(&"push".to_owned()), "{commands:?}");
    assert!(commands.contains(&"rollback".to_owned()), "{commands:?}");
    assert!(!commands.iter().any(|c| c == "demo-app"), "{commands:?}");

    let envs = bash_complete(&env, &["deployctl", "push", ""]);
    assert!(envs.contains(&"staging".to_owned()), "{envs:?}");
    assert!(envs.contains(&"production".to_owned()), "{envs:?}");
    assert!(!envs.iter().any(|e| e.contains("a-file")), "{envs:?}");

    let envs = bash_complete(&env, &["deployctl", "promote", "staging", "p"]);
    assert_eq!(envs, ["production"]);

    let to = bash_complete(&env, &["deployctl", "rollback", "staging", "--to", ""]);
    assert!(to.is_empty(), "release ids are not file names: {to:?}");

    let artifacts = bash_complete(&env, &["deployctl", "push", "staging", "--artifact", "a-"]);
    assert_eq!(artifacts, ["a-file.tar.gz"]);
}

// See: #18 (item 9). `deployctl man` wrote one page that referred to deployctl-push(1) and
// others, which did not exist.
#[test]
fn man_dir_writes_a_page_per_command_and_every_reference_resolves() {
    let env = TestEnv::new();
    let dir = env.path("man1");
    let out = Command::new(bin("deployctl"))
        .args(["man", "--dir", dir.to_str().unwrap()])
        .output()
        .expect("run deployctl man --dir");
    assert!(out.status.success(), "{out:?}");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for want in [
        "deployctl.1",
        "deployctl-push.1",
        "deployctl-rollback.1",
        "deployctl-man.1",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("demo-app")), "{names:?}");
    let top = std::fs::read_to_string(dir.join("deployctl.1")).unwrap();
    let mut referenced = 0;
    for (i, _) in top.match_indices("deployctl\\-") {
        let rest = &top[i + "deployctl\\-".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if rest[name.len()..].starts_with("(1)") {
            referenced += 1;
            assert!(
                dir.join(format!("deployctl-{name}.1")).exists(),
                "deployctl-{name}(1)"
            );
        }
    }
    assert!(
        referenced >= 10,
        "the top page lists the commands: {referenced}"
    );
    let push = std::fs::read_to_string(dir.join("deployctl-push.1")).unwrap();
    assert!(push.contains(".SH \"EXIT STATUS\""), "{push}");
    assert!(push.contains("\\-\\-lock\\-wait"), "{push}");
}

// See: #18 (item 11). `deployctl push` without an environment did not say which exist.
#[test]
fn a_missing_environment_lists_the_known_ones() {
    let env = TestEnv::new();
    env.write(
        "deploy.toml",
        "app = \"x\"\ndeploy_to = \"/srv/x\"\n[environments.staging]\nhosts = [\"a\"]\n\
         [environments.production]\nhosts = [\"b\"]\n",
    );
    let out = Command::new(bin("deployctl"))
        .current_dir(env.dir.path())
        .arg("push")
        .env_remove("DEPLOYCTL_CONFIG")
        .output()
        .expect("run deployctl");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("<ENV>"), "{stderr}");
    assert!(
        stderr.contains("environments in deploy.toml: production, staging"),
        "{stderr}"
    );
}

// See: #18 (item 11). The sample app served the literal "version VERSION", and nothing
// said how to build its tarball.
#[test]
fn the_sample_app_build_script_stamps_the_version() {
    let env = TestEnv::new();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sample-app/build");
    let out = Command::new(&script)
        .arg("v7.1")
        .current_dir(env.dir.path())
        .output()
        .expect("run examples/sample-app/build");
    assert!(out.status.success(), "{out:?}");
    let tarball = env.path("dist/sample.tar.gz");
    let read = |member: &str| {
        let out = Command::new("tar")
            .args(["-xzOf", tarball.to_str().unwrap(), member])
            .output()
            .expect("tar");
        assert!(out.status.success(), "{member}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(read("public/index.html").contains("sample app, version v7.1"));
    assert!(read("public/api/v1/status/index.html").contains("\"version\": \"v7.1\""));
    assert!(!read("public/index.html").contains("VERSION"));
    assert!(read("bin/restart").starts_with("#!/bin/sh"));
    // A version that would break the substitution is refused.
    let out = Command::new(&script)
        .args(["v1/../x", "bad.tar.gz"])
        .current_dir(env.dir.path())
        .output()
        .expect("run build");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!env.path("bad.tar.gz").exists());
}

// See: #14 (item 4). A host whose sshd refuses connections took 7.5 s to report (five
// attempts with the backoff meant for DNS lag); a refusal is retried only briefly.
#[test]
fn a_refused_connection_is_reported_within_seconds() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again: connecting to it is refused
    let env = TestEnv::new();
    env.write(
        "deploy.toml",
        format!(
            "app = \"x\"\ndeploy_to = \"/srv/x\"\n[environments.staging]\n\
             hosts = [\"127.0.0.1:{port}\"]\nknown_hosts = \"known_hosts\"\n"
        ),
    );
    let started = std::time::Instant::now();
    let out = Command::new(bin("deployctl"))
        .current_dir(env.dir.path())
        .args(["check", "staging"])
        .output()
        .expect("run deployctl");
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Connection refused"),
        "{out:?}"
    );
    // The old backoff slept 0.5 + 1 + 2 + 4 s; the refusal budget is 1.5 s.
    assert!(took < std::time::Duration::from_secs(6), "took {took:?}");
}
