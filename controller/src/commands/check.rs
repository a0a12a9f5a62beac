//! `deployctl check ENV`: per host, reachable, host key verified, authenticated, agent
//! version, and free disk under `deploy_to`.

use std::sync::Arc;

use proto::{Check, CheckReply, HelloReply};
use serde_json::json;

use super::{find_keys, load_env};
use crate::cli::Cli;
use crate::client::ClientError;
use crate::config::{Environment, Host};
use crate::exit::{self, Failure};
use crate::output::{Progress, mib};
use crate::report::table;
use crate::ssh::keys::KeySource;
use crate::transport;

/// Connects to one host and asks its agent the `check` questions. The outer error is
/// the connection's, the inner one the agent's answer.
pub async fn probe(
    host: &Host,
    env: &Environment,
    keys: Arc<Vec<KeySource>>,
) -> Result<Result<(HelloReply, CheckReply), ClientError>, transport::ConnectError> {
    let mut c = transport::connect(host, env, keys).await?;
    let r = c
        .client
        .call(Check {
            deploy_to: Some(env.deploy_to.clone()),
        })
        .await;
    let hello = c.client.hello.clone();
    c.close().await;
    Ok(r.map(|r| (hello, r)))
}

pub async fn run(cli: &Cli, env_name: &str, json: bool) -> Result<u8, Failure> {
    let env = load_env(cli, env_name)?;
    let keys = find_keys(&env)?;
    let progress = Progress::new(false);
    // At most max_parallel hosts at once, each connected only while it is checked.
    let turns = Arc::new(tokio::sync::Semaphore::new(env.max_parallel.max(1) as usize));
    let mut set = tokio::task::JoinSet::new();
    for (i, host) in env.hosts.iter().cloned().enumerate() {
        let env = env.clone();
        let keys = keys.clone();
        let turns = turns.clone();
        set.spawn(async move {
            let _turn = turns.acquire_owned().await;
            let name = host.to_string();
            let result = match probe(&host, &env, keys).await {
                Ok(r) => r.map_err(|e| (exit::CONNECT, e.to_string())),
                Err(e) => Err((exit::CONNECT, e.to_string())),
            };
            (i, name, result)
        });
    }
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            results.push(r);
        }
    }
    results.sort_by_key(|(i, _, _)| *i);
    let mut code = exit::OK;
    let mut rows = Vec::new();
    let mut docs = Vec::new();
    for (_, name, r) in results {
        match r {
            Ok((hello, reply)) => {
                let path = reply.deploy_to.clone();
                let roots = roots_cell(&reply);
                let (ok, note) = match &path {
                    Some(p) if !p.allowed => {
                        code = code.max(exit::USAGE);
                        (
                            false,
                            format!(
                                "deploy_to {} is outside the agent's allowed_roots ({roots})",
                                p.path
                            ),
                        )
                    }
                    Some(p) => (
                        true,
                        format!(
                            "{} {}",
                            p.free_bytes
                                .map(|b| format!("{} free", mib(b)))
                                .unwrap_or_default(),
                            if p.exists {
                                ""
                            } else {
                                "(deploy_to will be created)"
                            }
                        )
                        .trim()
                        .to_owned(),
                    ),
                    None => (true, String::new()),
                };
                progress.line(&name, if ok { "ok" } else { "problem" });
                rows.push(vec![
                    name.clone(),
                    if ok { "ok" } else { "FAIL" }.into(),
                    hello.hostname.clone(),
                    format!("{} (protocol {})", reply.agent_version, reply.protocol),
                    roots.clone(),
                    note.clone(),
                ]);
                docs.push(json!({
                    "host": name, "ok": ok, "hostname": hello.hostname,
                    "agent_version": reply.agent_version, "protocol": reply.protocol,
                    "deploy_to": path, "allowed_roots": reply.allowed_roots,
                    "roots_from": reply.roots_from, "note": note,
                }));
            }
            Err((c, message)) => {
                code = code.max(c);
                progress.error(Some(&name), &message);
                rows.push(vec![
                    name.clone(),
                    "FAIL".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    message.clone(),
                ]);
                docs.push(json!({"host": name, "ok": false, "error": message}));
            }
        }
    }
    if json {
        let doc = json!({"environment": env.name, "exit_code": code, "hosts": docs});
        crate::out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        crate::out!(
            "{}",
            table(
                &[
                    "HOST",
                    "CHECK",
                    "HOSTNAME",
                    "AGENT",
                    "ALLOWED ROOTS",
                    "NOTE"
                ],
                &rows
            )
        );
    }
    Ok(code)
}

/// The agent's allowed roots and where they were set (`/srv (from
/// /etc/deploy-agent/agent.toml)`); `-` from an agent that does not say.
fn roots_cell(reply: &proto::CheckReply) -> String {
    if reply.allowed_roots.is_empty() {
        return "-".into();
    }
    let roots = reply.allowed_roots.join(", ");
    match &reply.roots_from {
        Some(from) => format!("{roots} (from {from})"),
        None => roots,
    }
}
