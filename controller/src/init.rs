//! `deployctl init`: a commented deploy.toml to start from.

use std::path::Path;

use crate::config::Config;
use crate::exit::{self, Failure};

const TEMPLATE: &str = r#"# deploy.toml: how deployctl deploys APP. Reference: docs/configuration.md
app = "APP"
deploy_to = "/srv/APP"              # per-app root on each server (inside the agent's allowed_roots)

[defaults]                          # every environment inherits these, key by key
user = "deploy"                     # the SSH user (in the agent's socket group)
# ssh_key = "~/.ssh/id_ed25519"     # or DEPLOYCTL_SSH_KEY (the key text, from a CI secret), or ssh-agent
known_hosts = "~/.ssh/known_hosts"  # host keys are always verified; see --accept-new-host-keys
# proxy_jump = "bastion.example.com" # jump host(s); ~/.ssh/config's Host/ProxyJump/... apply too
keep_releases = 5
strategy = "release"                # "release" (a tarball) or "compose"

[defaults.release]
artifact = "dist/APP.tar.gz"        # built by CI; --artifact overrides
shared = ["log", "tmp", ".env"]     # linked from <deploy_to>/shared into each release
# migrate = "bin/migrate"           # runs in the new release dir before the switch
# The agent's default unit forbids sudo (NoNewPrivileges): let polkit allow this one
# restart instead (systemd/polkit-1/50-deploy-agent.rules, docs/agent-setup.md). For
# "sudo systemctl restart APP", install the allow-sudo.conf drop-in and a sudoers rule.
restart = "systemctl restart APP"
timeout = "5m"                      # per command
# hooks = { before_switch = "bin/smoke", after_live = "bin/announce", on_failure = "bin/page" }

# [defaults.notify]                 # the agent posts each outcome (JSON, Slack-compatible)
# webhook = "${SLACK_WEBHOOK_URL}"  # a secret: masked, kept 0600 on the server

[defaults.health]
url = "http://127.0.0.1:4000/api/v1/status/"   # fetched by the agent, on the server
expect_status = 200
retries = 12
interval = "5s"
# watch = "5m"                      # keep checking after go-live; the agent rolls back
# watch_failures = 3                # after this many failed checks in a row

# Zero-downtime deploys (docs/cutover.md): the new release starts on the idle slot beside
# the serving one, is checked there (put ${DEPLOY_PORT} in health.url), then `switch`
# points the proxy at it; the old slot drains, then stops. `restart` is then not used.
# [defaults.cutover]
# ports = [4001, 4002]
# start = "systemctl start APP@${DEPLOY_PORT}"
# stop = "systemctl stop APP@${DEPLOY_PORT}"
# switch = "printf 'server 127.0.0.1:%s;\n' ${DEPLOY_PORT} > /srv/APP/proxy/upstream.conf.new && mv /srv/APP/proxy/upstream.conf.new /srv/APP/proxy/upstream.conf && systemctl reload nginx"
# drain = "10s"

[environments.staging]
hosts = ["staging-1"]               # [user@]host[:port], or "local"

[environments.production]
hosts = ["prod-1", "prod-2"]
confirm = true                      # needs --yes, or a typed "yes" on a terminal
rollout = { batch = 1, canary = true, on_failure = "rollback-all" }
# [environments.production.verify]  # checked from outside after the rollout
# urls = ["https://APP.example.com/api/v1/status/"]
"#;

pub fn run(path: &Path, app: Option<&str>, force: bool) -> Result<u8, Failure> {
    if path.exists() && !force {
        return Err(Failure::usage(format!(
            "{} exists; pass --force to overwrite it",
            path.display()
        )));
    }
    let app = match app {
        Some(a) => a.to_owned(),
        None => std::env::current_dir()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .map(|n| safe_name(&n))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "myapp".into()),
    };
    let text = TEMPLATE.replace("APP", &app);
    // The template must load; a bad --app is reported by the config loader itself.
    Config::parse(&text, &path.display().to_string(), &|_| None)
        .map_err(|e| Failure::usage(format!("cannot write a config for app {app:?}: {e}")))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure::usage(format!("cannot create {}: {e}", dir.display())))?;
    }
    std::fs::write(path, text)
        .map_err(|e| Failure::usage(format!("cannot write {}: {e}", path.display())))?;
    crate::out!(
        "wrote {}; next: edit hosts and commands, then `deployctl check staging`",
        path.display()
    );
    Ok(exit::OK)
}

/// Lowercase, with anything outside [a-z0-9_-] dropped.
fn safe_name(s: &str) -> String {
    s.to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_loads_and_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("deploy.toml");
        assert_eq!(run(&p, Some("shop"), false).unwrap(), 0);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("app = \"shop\""));
        let env = |k: &str| (k == "HOME").then(|| "/home/u".to_owned());
        let cfg = Config::parse(&text, "deploy.toml", &env).unwrap();
        assert!(cfg.environment("production").unwrap().confirm);
        assert!(
            run(&p, Some("shop"), false).is_err(),
            "no overwrite without --force"
        );
        assert!(run(&p, Some("Bad Name!"), true).is_err());
    }

    #[test]
    // See: #18 (item 3). The template said `sudo systemctl restart`, which the default
    // hardened unit forbids (NoNewPrivileges).
    fn the_template_restart_works_under_the_default_unit() {
        let restart = TEMPLATE
            .lines()
            .find(|l| l.starts_with("restart = "))
            .expect("the template has a restart command");
        assert!(!restart.contains("sudo"), "{restart}");
        assert!(
            TEMPLATE.contains("50-deploy-agent.rules"),
            "names the polkit rule"
        );
    }

    #[test]
    fn names_from_dirs() {
        assert_eq!(safe_name("My.App"), "myapp");
        assert_eq!(safe_name("_x-1"), "x-1");
    }

    #[test]
    fn the_cutover_block_loads_once_uncommented() {
        let text = TEMPLATE.replace("APP", "myapp");
        let mut out = String::new();
        let mut inside = false;
        for line in text.lines() {
            if line == "# [defaults.cutover]" {
                inside = true;
            } else if !line.starts_with('#') {
                inside = false;
            }
            let line = match line.strip_prefix("# ") {
                Some(l) if inside => l,
                _ => line,
            };
            // The plain restart would be refused beside it at the same level.
            if !line.starts_with("restart =") {
                out.push_str(line);
                out.push('\n');
            }
        }
        let home = |k: &str| (k == "HOME").then(|| "/home/u".to_owned());
        let config = Config::parse(&out, "deploy.toml", &home).unwrap();
        let c = config.environment("staging").unwrap().cutover.unwrap();
        assert_eq!(c.ports, [4001, 4002]);
        assert!(c.switch.contains("${DEPLOY_PORT}"), "{}", c.switch);
    }
}
