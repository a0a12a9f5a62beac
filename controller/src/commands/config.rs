//! `deployctl config ENV [--json]`: the configuration of one environment as every other
//! command sees it: `[defaults]` merged, `DEPLOYCTL_*` overrides and `${VAR}` applied,
//! built-in defaults filled in. Secret values never appear: the `secrets` show as `***`,
//! and every value is masked like all other output (a secret expanded into a URL, say).
//! Connects to nothing.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::Cli;
use crate::config::{
    Batch, Config, Environment, Host, LogsConfig, OnFailure, SshConfigSource, Strategy,
};
use crate::exit::{self, Failure};

/// One `[section]` (or the top, `""`) and its keys, in the order they are documented.
type Section = (&'static str, Vec<(String, Value)>);

fn owned(keys: Vec<(&str, Value)>) -> Vec<(String, Value)> {
    keys.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

pub fn run(cli: &Cli, name: &str, json: bool) -> Result<u8, Failure> {
    let getenv = |k: &str| std::env::var(k).ok();
    let config = Config::load(&cli.config, &getenv).map_err(|e| Failure::usage(e.to_string()))?;
    let mut env = config
        .environment(name)
        .map_err(|e| Failure::usage(e.to_string()))?;
    if cli.accept_new_host_keys {
        env.accept_new_host_keys = true;
    }
    crate::output::set_secrets(crate::spec::secret_values(&env));
    let sections = sections(&env, &|k| std::env::var(k).ok());
    let overridden: Vec<String> = crate::config::ENV_OVERRIDES
        .iter()
        .filter(|(var, _)| std::env::var(var).is_ok_and(|v| !v.is_empty()))
        .map(|(var, key)| format!("{key} (from {var})"))
        .collect();
    if json {
        let mut doc = serde_json::Map::new();
        doc.insert("config".into(), json!(config.path.display().to_string()));
        for (section, keys) in &sections {
            let obj: serde_json::Map<String, Value> =
                keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            if section.is_empty() {
                doc.extend(obj);
            } else {
                doc.insert((*section).to_owned(), Value::Object(obj));
            }
        }
        doc.insert("overridden".into(), json!(overridden));
        let text = serde_json::to_string_pretty(&Value::Object(doc)).unwrap_or_default();
        crate::out!("{text}");
        return Ok(exit::OK);
    }
    let mut text = format!(
        "# environment {} of {}, resolved (defaults merged, DEPLOYCTL_* and ${{VAR}} \
         applied); secrets are masked\n",
        env.name,
        config.path.display()
    );
    for o in &overridden {
        text.push_str(&format!("# overridden: {o}\n"));
    }
    for (section, keys) in &sections {
        if !section.is_empty() {
            text.push_str(&format!("\n[{section}]\n"));
        }
        for (k, v) in keys {
            match v {
                Value::Null => text.push_str(&format!("# {k}: not set\n")),
                v => text.push_str(&format!("{k} = {}\n", toml_value(v))),
            }
        }
    }
    crate::out!("{}", text.trim_end());
    Ok(exit::OK)
}

/// A JSON value written the TOML way (`[..]` arrays, `{ k = v }` tables). JSON string
/// escapes are valid TOML basic-string escapes.
fn toml_value(v: &Value) -> String {
    match v {
        Value::Null => "\"\"".into(),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(toml_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(o) => format!(
            "{{ {} }}",
            o.iter()
                .map(|(k, v)| format!("{k} = {}", toml_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

fn dur(d: Duration) -> Value {
    json!(humantime::format_duration(d).to_string())
}

fn path(p: &std::path::Path) -> Value {
    json!(p.display().to_string())
}

/// The environment, section by section. `var` reads the process environment (only to
/// say whether a secret is set).
fn sections(env: &Environment, var: &dyn Fn(&str) -> Option<String>) -> Vec<Section> {
    let hosts: Vec<Value> = env.hosts.iter().map(|h| json!(h.to_string())).collect();
    let top = vec![
        ("environment", json!(env.name)),
        ("app", json!(env.app)),
        ("deploy_to", json!(env.deploy_to)),
        ("hosts", Value::Array(hosts)),
        (
            "user",
            if env.hosts.iter().all(|h| matches!(h, Host::Local)) {
                Value::Null
            } else {
                json!(env.user)
            },
        ),
        ("ssh_key", env.ssh_key.as_deref().map_or(Value::Null, path)),
        ("known_hosts", path(&env.known_hosts)),
        ("accept_new_host_keys", json!(env.accept_new_host_keys)),
        (
            "ssh_config",
            match &env.ssh_config {
                SshConfigSource::Default(p) | SshConfigSource::Given(p) => path(p),
                SshConfigSource::Off => json!(false),
            },
        ),
        (
            "proxy_jump",
            env.proxy_jump.as_ref().map_or(Value::Null, |hops| {
                if hops.is_empty() {
                    json!("none")
                } else {
                    json!(
                        hops.iter()
                            .map(|h| h.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                }
            }),
        ),
        ("agent_socket", json!(env.agent_socket)),
        ("agent_bin", json!(env.agent_bin)),
        ("connect_timeout", dur(env.connect_timeout)),
        ("connect_retries", json!(env.connect_retries)),
        (
            "strategy",
            json!(match env.strategy {
                Strategy::Release => "release",
                Strategy::Compose => "compose",
            }),
        ),
        ("keep_releases", json!(env.keep_releases)),
        ("max_parallel", json!(env.max_parallel)),
        ("confirm", json!(env.confirm)),
        ("promote_from", json!(env.promote_from)),
        ("instances", json!(env.instances.is_some())),
        ("secrets", json!(env.secrets)),
    ];
    let r = &env.release;
    let release = vec![
        ("artifact", r.artifact.as_deref().map_or(Value::Null, path)),
        ("shared", json!(r.shared)),
        ("migrate", json!(r.migrate)),
        ("restart", json!(r.restart)),
        ("stop", json!(r.stop)),
        ("timeout", dur(r.timeout)),
        ("max_unpacked_size", json!(r.max_unpacked_bytes)),
        (
            "logs",
            match &r.logs {
                None => Value::Null,
                Some(LogsConfig::Unit(u)) => json!({ "unit": u }),
                Some(LogsConfig::Files(f)) => json!({ "files": f }),
            },
        ),
        (
            "hooks",
            json!({
                "before_switch": r.hooks.before_switch,
                "after_live": r.hooks.after_live,
                "on_failure": r.hooks.on_failure,
            }),
        ),
    ];
    let health = match &env.health {
        Some(h) => vec![
            ("url", json!(h.url)),
            ("expect_status", json!(h.expect_status)),
            ("retries", json!(h.retries)),
            ("interval", dur(h.interval)),
            ("request_timeout", dur(h.request_timeout)),
            ("watch", dur(h.watch)),
            ("watch_failures", json!(h.watch_failures)),
        ],
        None => vec![("url", Value::Null)],
    };
    let rollout = vec![
        (
            "batch",
            match env.rollout.batch {
                Batch::Count(n) => json!(n),
                Batch::Percent(p) => json!(format!("{p}%")),
            },
        ),
        ("canary", json!(env.rollout.canary)),
        (
            "on_failure",
            json!(match env.rollout.on_failure {
                OnFailure::RollbackAll => "rollback-all",
                OnFailure::Stop => "stop",
            }),
        ),
    ];
    let verify = match &env.verify {
        Some(v) => vec![
            ("urls", json!(v.urls)),
            ("retries", json!(v.retries)),
            ("interval", dur(v.interval)),
            ("expect_status", json!(v.expect_status)),
            ("request_timeout", dur(v.request_timeout)),
        ],
        None => vec![("urls", json!([]))],
    };
    let mut out: Vec<Section> = vec![
        ("", owned(top)),
        ("release", owned(release)),
        ("health", owned(health)),
        ("rollout", owned(rollout)),
        ("verify", owned(verify)),
    ];
    if env.strategy == Strategy::Compose {
        let c = &env.compose;
        out.push((
            "compose",
            owned(vec![
                (
                    "files",
                    Value::Array(c.files.iter().map(|p| path(p)).collect()),
                ),
                ("env_file", c.env_file.as_deref().map_or(Value::Null, path)),
                ("project", json!(c.project)),
                ("pull", json!(c.pull)),
                ("compose_command", json!(c.compose_command)),
                ("zero_downtime", json!(c.zero_downtime)),
                // Unset: the agent's default (2 s).
                ("drain", c.drain.map_or(Value::Null, dur)),
            ]),
        ));
    }
    if let Some(c) = &env.cutover {
        out.push((
            "cutover",
            owned(vec![
                ("ports", json!(c.ports)),
                ("start", json!(c.start)),
                ("stop", json!(c.stop)),
                ("switch", json!(c.switch)),
                ("drain", dur(c.drain)),
            ]),
        ));
    }
    if let Some(n) = &env.notify {
        // Webhook URLs carry tokens (Slack's do): how many, never what.
        out.push((
            "notify",
            owned(vec![(
                "webhooks",
                Value::Array(n.webhooks.iter().map(|_| json!("***")).collect()),
            )]),
        ));
    }
    if let Some(i) = &env.instances {
        out.push((
            "instances",
            owned(vec![
                (
                    "instance_ports",
                    json!(format!("{}-{}", i.ports.start(), i.ports.end())),
                ),
                ("instance_ttl", i.ttl.map_or(Value::Null, dur)),
                ("url_template", json!(i.url_template)),
            ]),
        ));
    }
    // Whether each secret is set, never its value.
    let secrets: Vec<(String, Value)> = env
        .secrets
        .iter()
        .map(|name| {
            let shown = match var(name) {
                Some(_) => json!("***"),
                None => Value::Null,
            };
            (name.clone(), shown)
        })
        .collect();
    if !secrets.is_empty() {
        out.push(("secret_values", secrets));
    }
    out
}
