//! `deployctl instances ENV [--json]`: per host, every review-app instance with its port,
//! current release, URL (from `url_template`), last deploy and expiry.

use proto::Instances;
use serde_json::json;

use super::{close_all, connect_all, find_keys, host_error};
use crate::cli::Cli;
use crate::exit::{self, Failure};
use crate::output::Progress;
use crate::report::{outcome_name, table};
use crate::spec::app_ref;

/// `url_template` with `${DEPLOY_INSTANCE}` and `${DEPLOY_PORT}` filled in; `None` without
/// a template, or when the template needs a port the instance does not have.
pub fn url(template: Option<&str>, name: &str, port: Option<u16>) -> Option<String> {
    let t = template?.replace("${DEPLOY_INSTANCE}", name);
    if t.contains("${DEPLOY_PORT}") {
        return Some(t.replace("${DEPLOY_PORT}", &port?.to_string()));
    }
    Some(t)
}

pub async fn run(cli: &Cli, env_name: &str, json: bool) -> Result<u8, Failure> {
    let env = super::load_env(cli, env_name)?;
    let Some(config) = env.instances.clone() else {
        return Err(Failure::usage(format!(
            "environment {} has no review apps; set instances = true and instance_ports in \
             [environments.{}]",
            env.name, env.name
        )));
    };
    let template = config.url_template.as_deref();
    let keys = find_keys(&env)?;
    let progress = Progress::new(true);
    let mut conns = connect_all(&env, &keys, &progress).await?;
    let mut docs = Vec::new();
    let mut rows = Vec::new();
    let mut code = exit::OK;
    for c in conns.iter_mut() {
        match c.client.call(Instances { app: app_ref(&env) }).await {
            Ok(reply) => {
                let mut list = Vec::new();
                for i in &reply.instances {
                    let url = url(template, &i.name, i.port);
                    let last_deploy = i
                        .last
                        .as_ref()
                        .map(|l| l.finished.clone())
                        .or(i.touched.clone());
                    rows.push(vec![
                        c.name.clone(),
                        i.name.clone(),
                        i.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        i.current
                            .as_ref()
                            .map(|r| r.id.clone())
                            .unwrap_or_else(|| "-".into()),
                        i.current
                            .as_ref()
                            .and_then(|r| r.version.clone())
                            .unwrap_or_else(|| "-".into()),
                        match &i.last {
                            Some(l) => format!("{} ({})", l.finished, outcome_name(l.outcome)),
                            None => last_deploy.clone().unwrap_or_else(|| "-".into()),
                        },
                        url.clone().unwrap_or_else(|| "-".into()),
                        i.expires.clone().unwrap_or_else(|| "never".into()),
                    ]);
                    let mut doc = serde_json::to_value(i).unwrap_or_default();
                    doc["url"] = json!(url);
                    doc["last_deploy"] = json!(last_deploy);
                    list.push(doc);
                }
                docs.push(json!({"host": c.name, "instances": list}));
            }
            Err(e) => {
                host_error(&c.name, e, &mut code, &mut rows, &mut docs);
            }
        }
    }
    close_all(conns).await;
    if json {
        let doc = json!({"environment": env.name, "app": env.app, "hosts": docs});
        crate::out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else if rows.is_empty() {
        crate::out!("no review-app instances in {}", env.name);
    } else {
        crate::out!(
            "{}",
            table(
                &[
                    "HOST",
                    "INSTANCE",
                    "PORT",
                    "RELEASE",
                    "VERSION",
                    "LAST DEPLOY",
                    "URL",
                    "EXPIRES"
                ],
                &rows
            )
        );
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_fill_in_the_instance_and_its_port() {
        let t = Some("https://review.example.com:${DEPLOY_PORT}/?pr=${DEPLOY_INSTANCE}");
        assert_eq!(
            url(t, "pr-1", Some(4100)).as_deref(),
            Some("https://review.example.com:4100/?pr=pr-1")
        );
        assert_eq!(url(t, "pr-1", None), None);
        assert_eq!(
            url(
                Some("https://${DEPLOY_INSTANCE}.example.com/"),
                "pr-2",
                None
            )
            .as_deref(),
            Some("https://pr-2.example.com/")
        );
        assert_eq!(url(None, "pr-1", Some(4100)), None);
    }
}
