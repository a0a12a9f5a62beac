//! Read-only commands: `status`, `releases`, `history`.

use proto::{History, Releases, Status};
use serde_json::json;

use super::{ask_each, find_keys, host_error};
use crate::cli::Cli;
use crate::client::ClientError;
use crate::exit::{self, Failure};
use crate::output::Progress;
use crate::report::{outcome_name, release_state, short_time, table};
use crate::spec::{app_ref, health_spec};
use crate::transport::HostConn;

#[derive(Clone, Copy)]
pub enum What {
    Status,
    Releases,
    History { limit: u32 },
}

pub async fn run(cli: &Cli, env_name: &str, what: What, json: bool) -> Result<u8, Failure> {
    let env = super::load_env(cli, env_name)?;
    let keys = find_keys(&env)?;
    let progress = Progress::new(true);
    // Every host is asked, at most max_parallel at a time, each connected only while it is
    // asked; the answers are shown in the hosts' order.
    let (mut statuses, mut releases, mut histories) = (Vec::new(), Vec::new(), Vec::new());
    let app = app_ref(&env);
    let names: Vec<String> = match what {
        What::Status => {
            let health = health_spec(&env);
            let answers = ask_each(&env, &keys, &progress, move |c| {
                call(
                    c,
                    Status {
                        app: app.clone(),
                        health: health.clone(),
                    },
                )
            })
            .await?;
            answers
                .into_iter()
                .map(|(n, a)| {
                    statuses.push(a);
                    n
                })
                .collect()
        }
        What::Releases => {
            let answers = ask_each(&env, &keys, &progress, move |c| {
                call(c, Releases { app: app.clone() })
            })
            .await?;
            answers
                .into_iter()
                .map(|(n, a)| {
                    releases.push(a);
                    n
                })
                .collect()
        }
        What::History { limit: n } => {
            let answers = ask_each(&env, &keys, &progress, move |c| {
                call(
                    c,
                    History {
                        app: app.clone(),
                        limit: n,
                    },
                )
            })
            .await?;
            answers
                .into_iter()
                .map(|(n, a)| {
                    histories.push(a);
                    n
                })
                .collect()
        }
    };
    let (mut statuses, mut releases, mut histories) = (
        statuses.into_iter(),
        releases.into_iter(),
        histories.into_iter(),
    );
    let mut docs = Vec::new();
    let mut rows = Vec::new();
    let mut code = exit::OK;
    for name in &names {
        match &what {
            What::Status => match statuses.next().expect("one answer per host") {
                Ok(s) => {
                    let health = match &s.health {
                        Some(h) if h.healthy => "healthy".to_owned(),
                        Some(h) => format!(
                            "UNHEALTHY ({})",
                            h.last_status
                                .map(|c| format!("status {c}"))
                                .or(h.last_error.clone())
                                .unwrap_or_default()
                        ),
                        None => "-".into(),
                    };
                    let last = s
                        .last
                        .as_ref()
                        .map(|l| {
                            format!(
                                "{} {} {} by {}",
                                format!("{:?}", l.action).to_lowercase(),
                                l.release,
                                outcome_name(l.outcome),
                                l.holder
                            )
                        })
                        .unwrap_or_else(|| "-".into());
                    rows.push(vec![
                        name.clone(),
                        s.current
                            .as_ref()
                            .map(|r| r.id.clone())
                            .unwrap_or("-".into()),
                        s.current
                            .as_ref()
                            .and_then(|r| r.version.clone())
                            .unwrap_or("-".into()),
                        health,
                        last,
                        s.watch
                            .as_ref()
                            .map(watch_cell)
                            .unwrap_or_else(|| "-".into()),
                        s.lock
                            .as_ref()
                            .map(|l| format!("locked by {}", l.holder))
                            .unwrap_or_default(),
                    ]);
                    docs.push(json!({"host": name, "status": s}));
                }
                Err(e) => {
                    host_error(name, e, &mut code, &mut rows, &mut docs);
                }
            },
            What::Releases => match releases.next().expect("one answer per host") {
                Ok(r) => {
                    for rel in &r.releases {
                        rows.push(vec![
                            name.clone(),
                            rel.id.clone(),
                            rel.version.clone().unwrap_or("-".into()),
                            release_state(rel),
                            if rel.current {
                                "*".into()
                            } else {
                                String::new()
                            },
                            short_time(&rel.created),
                        ]);
                    }
                    // `status` stays the stored one (`live` for every release that ever
                    // was); `state` is what the table shows.
                    let releases: Vec<serde_json::Value> = r
                        .releases
                        .iter()
                        .map(|rel| {
                            let mut v = json!(rel);
                            v["state"] = json!(release_state(rel));
                            v
                        })
                        .collect();
                    docs.push(json!({"host": name, "releases": releases}));
                }
                Err(e) => {
                    host_error(name, e, &mut code, &mut rows, &mut docs);
                }
            },
            What::History { .. } => match histories.next().expect("one answer per host") {
                Ok(h) => {
                    for e in &h.entries {
                        rows.push(vec![
                            name.clone(),
                            short_time(&e.finished),
                            match &e.instance {
                                Some(i) => format!("{:?} {i}", e.action).to_lowercase(),
                                None => format!("{:?}", e.action).to_lowercase(),
                            },
                            e.release.clone(),
                            e.version.clone().unwrap_or("-".into()),
                            outcome_name(e.outcome).into(),
                            e.holder.clone(),
                            e.error.clone().unwrap_or_default(),
                        ]);
                    }
                    if h.skipped_lines > 0 {
                        let note = format!(
                            "{} unreadable line(s) of the history file were skipped (torn by a \
                             full disk or edited by hand); the other entries are shown",
                            h.skipped_lines
                        );
                        eprintln!("warning: [{}] {note}", name);
                        docs.push(json!({"host": name, "history": h.entries,
                            "skipped_lines": h.skipped_lines}));
                    } else {
                        docs.push(json!({"host": name, "history": h.entries}));
                    }
                }
                Err(e) => {
                    host_error(name, e, &mut code, &mut rows, &mut docs);
                }
            },
        }
    }
    if json {
        let doc = json!({"environment": env.name, "app": env.app, "hosts": docs});
        crate::out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        let header: &[&str] = match what {
            What::Status => &[
                "HOST",
                "CURRENT",
                "VERSION",
                "HEALTH",
                "LAST DEPLOY",
                "WATCH",
                "LOCK",
            ],
            What::Releases => &["HOST", "RELEASE", "VERSION", "STATUS", "CURRENT", "CREATED"],
            What::History { .. } => &[
                "HOST", "FINISHED", "ACTION", "RELEASE", "VERSION", "OUTCOME", "BY", "ERROR",
            ],
        };
        crate::out!("{}", table(header, &rows));
    }
    Ok(code)
}

/// The WATCH cell of `status`: the watch after go-live of the last deploy.
fn watch_cell(w: &proto::WatchStatus) -> String {
    use proto::WatchState::*;
    let r = &w.release;
    match w.state {
        Watching => format!(
            "watching {r}: {} left, {}/{} failed",
            humantime::format_duration(std::time::Duration::from_secs(
                w.remaining_ms.div_ceil(1000)
            )),
            w.failures,
            w.max_failures
        ),
        Passed => format!("passed ({r})"),
        RolledBack => format!("ROLLED BACK {r} by watch"),
        RollbackFailed => format!("ROLLBACK FAILED ({r}, by watch)"),
        Ended => format!("ended early ({r})"),
    }
}

/// Asks one host `request`, within the connection's own limit.
async fn call<Q>(mut c: HostConn, request: Q) -> (HostConn, Result<Q::Response, ClientError>)
where
    Q: proto::Rpc + Send + 'static,
    Q::Response: Send,
{
    let within = c.client.reply_timeout();
    let r = c.client.call_within(request, within, |_| {}).await;
    (c, r)
}
