//! `deployctl check` against a real sshd: host keys, client keys, transport fallback.

use deployctl_e2e::SshdOptions;

use crate::support::Site;

fn site() -> Site {
    let s = Site::ssh(SshdOptions::default());
    s.write_config("", "");
    s
}

#[test]
fn check_passes_against_a_real_sshd_and_agent() {
    let s = site();
    let out = s.run(&["check", "test"]);
    out.assert_exit(0);
    assert!(out.stdout.contains(" ok "), "{out}");
    assert!(out.stdout.contains(env!("CARGO_PKG_VERSION")), "{out}");
    assert!(out.stdout.contains("free"), "disk space is reported: {out}");
    // it really went through streamlocal, not the fallback
    assert!(!s.sshd().log().contains("refused streamlocal"));
}

#[test]
fn check_json_is_one_document() {
    let s = site();
    let out = s.run(&["check", "test", "--json"]);
    out.assert_exit(0);
    let doc = out.json();
    assert_eq!(doc["hosts"][0]["ok"], true, "{out}");
    assert_eq!(doc["hosts"][0]["protocol"], proto::PROTOCOL_VERSION);
}

#[test]
fn unknown_host_key_is_exit_3_with_the_fingerprint() {
    let s = site();
    s.env.write("known_hosts", "");
    let out = s.run(&["check", "test"]);
    out.assert_exit(3);
    assert!(out.stderr.contains("not known"), "{out}");
    assert!(out.stderr.contains("SHA256:"), "{out}");
    assert!(out.stderr.contains("127.0.0.1"), "{out}");
}

#[test]
fn changed_host_key_is_exit_3() {
    let s = site();
    let other = s.sshd().other_host_key_pub();
    s.env.write(
        "known_hosts",
        format!("[127.0.0.1]:{} {other}\n", s.sshd().port),
    );
    let out = s.run(&["check", "test"]);
    out.assert_exit(3);
    assert!(out.stderr.contains("HOST KEY CHANGED"), "{out}");
    assert!(out.stderr.contains("SHA256:"), "{out}");
    assert!(out.stderr.contains("known_hosts:1"), "{out}");
}

#[test]
fn revoked_host_key_is_exit_3_even_when_also_trusted() {
    let s = site();
    let line = s.sshd().known_hosts_line();
    s.env.write(
        "known_hosts",
        format!("{line}\n@revoked * {}\n", s.sshd().host_key_pub),
    );
    let out = s.run(&["check", "test"]);
    out.assert_exit(3);
    assert!(out.stderr.contains("REVOKED"), "{out}");
    assert!(out.stderr.contains("known_hosts:2"), "{out}");
}

#[test]
fn hashed_known_hosts_entry_is_accepted() {
    let s = site();
    let kh = s.env.path("known_hosts");
    let ok = std::process::Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&kh)
        .output()
        .unwrap();
    assert!(ok.status.success());
    let text = s.env.read("known_hosts");
    assert!(text.starts_with("|1|"), "ssh-keygen hashed it: {text}");
    s.run(&["check", "test"]).assert_exit(0);
}

#[test]
fn wrong_client_key_is_exit_3() {
    let s = site();
    let wrong = s.sshd().new_unauthorized_key();
    let out = s.run_env(
        &["check", "test"],
        &[("DEPLOYCTL_SSH_KEY_PATH", wrong.to_str().unwrap())],
    );
    out.assert_exit(3);
    assert!(out.stderr.contains("authentication"), "{out}");
}

#[test]
fn key_text_from_the_environment_works_and_is_never_printed() {
    let s = Site::ssh(SshdOptions::default());
    // no ssh_key in the config: the key arrives as text, like a CI secret
    s.write_config("", "");
    let cfg = s.env.read("deploy.toml");
    let cfg: String = cfg
        .lines()
        .filter(|l| !l.starts_with("ssh_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    s.env.write("deploy.toml", cfg);
    let key = std::fs::read_to_string(&s.sshd().client_key).unwrap();
    let out = s.run_env(&["check", "test", "--json"], &[("DEPLOYCTL_SSH_KEY", &key)]);
    out.assert_exit(0);
    let body: String = key.lines().nth(1).unwrap().to_owned();
    assert!(!out.stdout.contains(&body) && !out.stderr.contains(&body));
}

#[test]
fn bridge_fallback_when_streamlocal_is_forbidden() {
    let s = Site::ssh(SshdOptions {
        allow_streamlocal: false,
        ..Default::default()
    });
    s.write_config("", "");
    let out = s.run(&["check", "test"]);
    out.assert_exit(0);
    assert!(
        s.sshd().log().contains("refused streamlocal"),
        "the direct channel was tried and refused first"
    );
}

#[test]
fn missing_agent_socket_is_a_clear_error() {
    let s = site();
    s.write_config("", "");
    let cfg = s.env.read("deploy.toml").replace(
        s.agent.socket.to_str().unwrap(),
        "/run/nonexistent/agent.sock",
    );
    s.env.write("deploy.toml", cfg);
    let out = s.run(&["check", "test"]);
    out.assert_exit(3);
    assert!(
        out.stderr
            .contains("no deploy-agent socket at /run/nonexistent/agent.sock"),
        "{out}"
    );
}

#[test]
fn accept_new_records_the_key_and_then_it_is_trusted() {
    let s = site();
    s.env.write("known_hosts", "");
    let out = s.run(&["check", "test", "--accept-new-host-keys"]);
    out.assert_exit(0);
    let kh = s.env.read("known_hosts");
    assert!(
        kh.contains(&format!("[127.0.0.1]:{}", s.sshd().port)),
        "{kh}"
    );
    s.run(&["check", "test"]).assert_exit(0);
    // a changed key is still refused under accept-new
    let other = s.sshd().other_host_key_pub();
    s.env.write(
        "known_hosts",
        format!("[127.0.0.1]:{} {other}\n", s.sshd().port),
    );
    s.run(&["check", "test", "--accept-new-host-keys"])
        .assert_exit(3);
}

#[test]
fn unreachable_host_is_exit_3_after_retries() {
    let s = site();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = s
        .env
        .read("deploy.toml")
        .replace(
            &format!("127.0.0.1:{}", s.sshd().port),
            &format!("127.0.0.1:{port}"),
        )
        .replace("connect_retries = 1", "connect_retries = 2");
    s.env.write("deploy.toml", cfg);
    let out = s.run(&["check", "test"]);
    out.assert_exit(3);
    assert!(out.stderr.contains("after 2 attempt(s)"), "{out}");
}

#[test]
fn local_host_needs_no_ssh() {
    let s = Site::local();
    s.write_config("", "");
    s.run(&["check", "test"]).assert_exit(0);
}

#[test]
fn deploy_to_outside_allowed_roots_is_a_config_error() {
    let s = Site::local();
    s.write_config("", "");
    let cfg = s
        .env
        .read("deploy.toml")
        .replace(s.deploy_to.to_str().unwrap(), "/etc/not-allowed");
    s.env.write("deploy.toml", cfg);
    let out = s.run(&["check", "test"]);
    out.assert_exit(2);
    assert!(out.stdout.contains("allowed_roots"), "{out}");
}

#[test]
fn no_environment_named_is_a_usage_error() {
    let s = Site::local();
    s.write_config("", "");
    let out = s.run(&["check", "nope"]);
    out.assert_exit(2);
    assert!(
        out.stderr.contains("test"),
        "lists the known environments: {out}"
    );
}
