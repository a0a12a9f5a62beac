//! What the controller sends the agent, built from a resolved [`Environment`]: the app
//! reference, the release spec (with its health check and compose settings), the lock
//! holder's name, and the secret values to mask. Pure builders, below the commands and the
//! rollout that both use them.

use proto::{AppRef, ComposeSpec, HealthSpec, ReleaseSpec};

use crate::config::{Environment, Strategy};

pub fn app_ref(env: &Environment) -> AppRef {
    AppRef {
        name: env.app.clone(),
        deploy_to: env.deploy_to.clone(),
        instance: env.instance.clone(),
    }
}

pub fn release_spec(env: &Environment) -> ReleaseSpec {
    let mut spec = ReleaseSpec {
        shared: env.release.shared.clone(),
        migrate: env.release.migrate.clone(),
        restart: env.release.restart.clone(),
        stop: env.release.stop.clone(),
        command_timeout_ms: env.release.timeout.as_millis() as u64,
        keep_releases: env.keep_releases,
        health: health_spec(env),
        max_unpacked_bytes: env.release.max_unpacked_bytes,
        compose: None,
        cutover: env.cutover.as_ref().map(|c| proto::CutoverSpec {
            ports: c.ports,
            start: c.start.clone(),
            stop: c.stop.clone(),
            switch: c.switch.clone(),
            drain_ms: c.drain.as_millis() as u64,
        }),
        // The agent gives a new instance a port from the pool, and expires idle ones.
        instance: env
            .instances
            .as_ref()
            .filter(|_| env.instance.is_some())
            .map(|i| proto::InstanceSpec {
                first_port: *i.ports.start(),
                last_port: *i.ports.end(),
                ttl_ms: i.ttl.map(|t| t.as_millis() as u64),
            }),
        // The agent masks these in its log and history too. The SSH key is not sent.
        redact: secret_values(env)
            .into_iter()
            .filter(|v| {
                std::env::var("DEPLOYCTL_SSH_KEY").map_or(true, |k| !k.contains(v.as_str()))
            })
            .collect(),
        hooks: hooks_spec(env),
        notify: env.notify.as_ref().map(|n| proto::NotifySpec {
            webhooks: n.webhooks.clone(),
            environment: env.name.clone(),
        }),
    };
    if env.strategy == Strategy::Compose {
        // The release holds only the compose files: the release strategy's shared
        // links and commands (perhaps inherited from [defaults.release]) do not apply.
        let (files, env_file) = crate::compose::release_names(env);
        spec.shared.clear();
        spec.migrate = None;
        spec.restart = None;
        spec.stop = None;
        spec.compose = Some(ComposeSpec {
            files,
            env_file,
            project: env.compose.project.clone(),
            pull: env.compose.pull,
            command: env.compose.compose_command.clone(),
            zero_downtime: env.compose.zero_downtime.clone(),
            // None: the agent's default (2 s).
            drain_ms: env.compose.drain.map(|d| d.as_millis() as u64),
        });
    }
    spec
}

/// `[release] hooks`, when any is set. They run for compose too (in the release dir,
/// which holds the compose files).
pub fn hooks_spec(env: &Environment) -> Option<proto::HooksSpec> {
    let h = &env.release.hooks;
    (h.before_switch.is_some() || h.after_live.is_some() || h.on_failure.is_some()).then(|| {
        proto::HooksSpec {
            before_switch: h.before_switch.clone(),
            after_live: h.after_live.clone(),
            on_failure: h.on_failure.clone(),
        }
    })
}

pub fn health_spec(env: &Environment) -> Option<HealthSpec> {
    env.health.as_ref().map(|h| HealthSpec {
        url: h.url.clone(),
        expect_status: h.expect_status,
        retries: h.retries,
        interval_ms: h.interval.as_millis() as u64,
        request_timeout_ms: h.request_timeout.as_millis() as u64,
        watch_ms: h.watch.as_millis() as u64,
        watch_failures: if h.watch.is_zero() {
            0
        } else {
            h.watch_failures
        },
    })
}

/// Who is deploying, as recorded in the lock and the history.
pub fn holder() -> String {
    if std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true") {
        let repo = std::env::var("GITHUB_REPOSITORY").unwrap_or_default();
        let run = std::env::var("GITHUB_RUN_ID").unwrap_or_default();
        let actor = std::env::var("GITHUB_ACTOR").unwrap_or_default();
        return format!("github:{repo}#{run} ({actor})");
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(current_user_name)
        .unwrap_or_else(|| "unknown".into());
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{user}@{host}")
}

/// The name of the current uid from /etc/passwd (USER is unset under some CI runners).
fn current_user_name() -> Option<String> {
    let uid = rustix::process::getuid().as_raw();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _ = f.next();
        (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// Everything that must never be printed: the CI key text, the values of variables
/// named in `secrets`, and the env-file values of keys named in `secrets`.
pub fn secret_values(env: &Environment) -> Vec<String> {
    let env_file = env
        .compose
        .env_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    secret_values_from(env, &|name| std::env::var(name).ok(), env_file.as_deref())
}

/// [`secret_values`] with the process environment and the env file passed in. Only what
/// is declared secret is masked: a value that merely looks like one (an image reference
/// with a digest, a long URL) stays readable, or `ps` output would be all `***`.
fn secret_values_from(
    env: &Environment,
    var: &dyn Fn(&str) -> Option<String>,
    env_file: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(key) = var("DEPLOYCTL_SSH_KEY") {
        // Line by line (how GitHub masks multi-line secrets); the armor lines are public.
        out.extend(
            key.lines()
                .map(str::trim)
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_owned),
        );
    }
    out.extend(env.secrets.iter().filter_map(|name| var(name)));
    // A webhook URL carries a token (Slack's do): never shown, wherever it turns up.
    out.extend(env.notify.iter().flat_map(|n| n.webhooks.iter().cloned()));
    for line in env_file.unwrap_or_default().lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim().trim_start_matches("export ").trim();
        if !env.secrets.iter().any(|s| s == key) {
            continue;
        }
        let value = value.trim().trim_matches('"').trim_matches('\'');
        // `${VAR}` in the file: its value comes from the environment.
        match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
            Some(name) => out.extend(var(name)),
            None => out.push(value.to_owned()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_watch_travels_only_when_set() {
        let toml = |extra: &str| {
            format!(
                "app = \"a\"\ndeploy_to = \"/srv/a\"\n[environments.e]\nhosts = [\"local\"]\n\
                 [environments.e.health]\nurl = \"http://127.0.0.1:1/up\"\n{extra}"
            )
        };
        let spec = |text: &str| {
            let cfg = Config::parse(text, "deploy.toml", &|_: &str| None).unwrap();
            let h = health_spec(&cfg.environment("e").unwrap()).unwrap();
            (h.watch_ms, h.watch_failures)
        };
        assert_eq!(
            spec(&toml("watch = \"5m\"\nwatch_failures = 2\n")),
            (300_000, 2)
        );
        assert_eq!(spec(&toml("watch = \"5m\"\n")), (300_000, 3));
        // No watch: neither key goes on the wire (the old format).
        assert_eq!(spec(&toml("watch_failures = 2\n")), (0, 0));
    }

    // See: #18 (item 11). Env-file values that merely looked like secrets (an image
    // reference) were masked, so `ps` output showed `***` for the image.
    #[test]
    fn only_declared_secrets_are_masked() {
        let toml = "app = \"shop\"\ndeploy_to = \"/srv/shop\"\n\
                    [environments.edge]\nhosts = [\"local\"]\nstrategy = \"compose\"\n\
                    secrets = [\"DB_PASSWORD\", \"API_TOKEN\", \"CI_TOKEN\"]\n";
        let cfg = Config::parse(toml, "deploy.toml", &|k: &str| {
            (k == "HOME").then(|| "/h".to_owned())
        })
        .unwrap();
        let env = cfg.environment("edge").unwrap();
        let vars = |name: &str| match name {
            "TOKEN_FROM_CI" => Some("tok-from-ci-123456".to_owned()),
            "CI_TOKEN" => Some("ci-token-value-987".to_owned()),
            "BACKEND_IMAGE" => Some("ghcr.io/org/backend:0a1b2c3d4e5f".to_owned()),
            _ => None,
        };
        let env_file = "# pinned images\n\
                        IMAGE=registry.example.com/org/web@sha256:0123456789abcdef\n\
                        BACKEND=${BACKEND_IMAGE}\n\
                        DB_PASSWORD='hunter2-but-longer'\n\
                        API_TOKEN=${TOKEN_FROM_CI}\n\
                        RAILS_ENV=production\n";
        let values = secret_values_from(&env, &vars, Some(env_file));
        assert!(
            values.contains(&"hunter2-but-longer".to_owned()),
            "{values:?}"
        );
        assert!(
            values.contains(&"tok-from-ci-123456".to_owned()),
            "{values:?}"
        );
        assert!(
            values.contains(&"ci-token-value-987".to_owned()),
            "{values:?}"
        );
        assert!(
            !values
                .iter()
                .any(|v| v.contains("sha256") || v.contains("ghcr.io")),
            "image references are not secrets: {values:?}"
        );
        assert_eq!(values.len(), 3, "{values:?}");
    }
}
