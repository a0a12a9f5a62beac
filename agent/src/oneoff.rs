//! `deployctl exec`: a one-off command in a release dir (the current one, or a named
//! release) with the deploy variables, or for compose in a service's container
//! (`compose exec -T SERVICE ...`). Its stdout and stderr stream back apart, secrets
//! masked ([`crate::pump`]); the answer is its exit status.
//!
//! The command gets no stdin and no terminal. It runs for as long as the controller stays
//! connected (or `timeout_ms`): when the connection closes, or the controller stays
//! silent past the agent's `idle_timeout_secs` (it pings every few seconds while it
//! waits), the command's whole process group is killed. With `lock`, the app's lock is
//! held until the command ends.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use proto::codec::Connection;
use proto::{AppRef, ComposeSpec, ErrorCode, Exec, ExecEnd, ProtoError, Stage};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::compose::{Compose, Project};
use crate::pump::{self, Bounds, Ending, Masker};
use crate::release::layout::{Layout, valid_release_id};

/// The release a command runs in: `wanted`, or `current`. A release that is not there
/// is refused, naming it.
pub fn resolve_release(layout: &Layout, wanted: Option<&str>) -> Result<String, ProtoError> {
    match wanted {
        Some(id) => {
            if !valid_release_id(id) || !layout.release(id).is_dir() {
                let known = layout.release_ids();
                return Err(ProtoError::new(
                    ErrorCode::NotFound,
                    format!(
                        "release {id:?} does not exist on this host (releases here: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
                .with("release", id));
            }
            Ok(id.to_owned())
        }
        None => match layout.current_release() {
            Some(id) if layout.release(&id).is_dir() => Ok(id),
            Some(id) => Err(ProtoError::new(
                ErrorCode::NotFound,
                format!("current points at releases/{id}, which does not exist on this host"),
            )),
            None => Err(ProtoError::new(
                ErrorCode::NotFound,
                format!(
                    "{} has no current release on this host: push one first",
                    layout.root.display()
                ),
            )),
        },
    }
}

/// The `DEPLOY_*` variables of a command run for `app` in `release`.
pub fn env(app: &AppRef, layout: &Layout, release: &str) -> BTreeMap<String, String> {
    let version = layout.read_meta(release).and_then(|m| m.version);
    crate::command_env::command_env(app, layout, release, version, None)
}

/// The compose command (configured, or detected: v2 first) and the project of
/// `release`: its recorded files, the project name of the app (or instance).
pub async fn compose_of(
    app: &AppRef,
    layout: &Layout,
    release: &str,
    now: &ComposeSpec,
) -> Result<(Compose, ComposeSpec), ProtoError> {
    let mut spec = crate::compose::recorded(&layout.release(release)).unwrap_or(now.clone());
    spec.project = crate::ports::compose_project(app, &now.project);
    spec.command = now.command.clone();
    crate::compose::check_spec(&spec).map_err(|e| ProtoError::new(ErrorCode::BadRequest, e))?;
    let vars = env(app, layout, release);
    let dir = layout.release(release);
    let log = layout.logs().join("oneoff.compose-version.log");
    let compose = crate::compose::detect(spec.command.as_deref(), |argv| {
        let (vars, dir, log) = (vars.clone(), dir.clone(), log.clone());
        async move {
            let _ = std::fs::remove_file(&log);
            let shown = crate::compose::display(&argv);
            crate::exec::run(crate::exec::Command {
                stage: Stage::Validate,
                command: &shown,
                argv: Some(&argv),
                dir: &dir,
                env: &vars,
                timeout: crate::compose::PROBE_TIMEOUT,
                log,
            })
            .await
        }
    })
    .await
    .map_err(|(why, _)| ProtoError::new(ErrorCode::Internal, why))?;
    Ok((compose, spec))
}

/// `compose -p P -f F... [--env-file E]` followed by `args`.
pub fn compose_argv(compose: &Compose, spec: &ComposeSpec, args: &[String]) -> Vec<String> {
    // `ps` is the one argv builder that takes no extra flags: swap its subcommand.
    let mut argv = compose.ps(Project::of(spec));
    argv.truncate(argv.len() - 2);
    argv.extend(args.iter().cloned());
    argv
}

/// A command ready to stream: the child's setup, and the release it runs in.
pub struct Prepared {
    pub command: tokio::process::Command,
    pub release: String,
}

/// Checks the request and builds the command; changes nothing.
pub async fn prepare(layout: &Layout, x: &Exec) -> Result<Prepared, ProtoError> {
    let bad = |m: String| ProtoError::new(ErrorCode::BadRequest, m);
    if x.command.is_empty() || x.command[0].is_empty() {
        return Err(bad("exec needs a command (after `--`)".into()));
    }
    let release = resolve_release(layout, x.release.as_deref())?;
    let dir: PathBuf = layout.release(&release);
    let vars = env(&x.app, layout, &release);
    let argv = match (&x.spec.compose, &x.service) {
        (Some(now), Some(service)) => {
            if service.is_empty() || service.starts_with('-') {
                return Err(bad(format!("--service {service:?} is not a service name")));
            }
            let (compose, spec) = compose_of(&x.app, layout, &release, now).await?;
            let mut args = vec!["exec".to_owned(), "-T".to_owned()];
            for (k, v) in &vars {
                args.push("-e".into());
                args.push(format!("{k}={v}"));
            }
            args.push(service.clone());
            args.extend(x.command.iter().cloned());
            compose_argv(&compose, &spec, &args)
        }
        (Some(_), None) => {
            return Err(bad(
                "this is a compose app: name the service to exec into with --service NAME".into(),
            ));
        }
        (None, Some(s)) => {
            return Err(bad(format!(
                "--service {s}: only compose apps (strategy = \"compose\") have services"
            )));
        }
        (None, None) => x.command.clone(),
    };
    let mut command = tokio::process::Command::new(&argv[0]);
    command.args(&argv[1..]).current_dir(&dir).envs(&vars);
    Ok(Prepared { command, release })
}

/// Runs a prepared command and streams its output; `Err` is why it could not start.
pub async fn run<S>(
    conn: &mut Connection<S>,
    p: Prepared,
    x: &Exec,
    bounds: Bounds<'_>,
) -> Result<Result<ExecEnd, String>, ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use std::os::unix::process::ExitStatusExt;
    let masker = Masker::new(&x.spec.redact);
    let shown = masker.mask(&x.command.join(" "));
    let source = pump::spawn(p.command, &masker).map_err(|e| {
        ProtoError::new(
            ErrorCode::BadRequest,
            format!("cannot start `{shown}`: {e}"),
        )
    })?;
    tracing::info!(release = %p.release, "exec `{shown}`");
    let bounds = Bounds {
        timeout: x.timeout_ms.map(Duration::from_millis),
        ..bounds
    };
    Ok(match pump::drive(conn, source, bounds).await {
        Ending::Finished { status, timed_out } => Ok(ExecEnd {
            release: p.release,
            exit_code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            timed_out,
        }),
        Ending::Gone(why) => {
            tracing::info!("exec `{shown}` killed: {why}");
            Err(why)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_release_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.release("20260101000000")).unwrap();
        let e = resolve_release(&layout, Some("20991231000000")).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("20991231000000"), "{}", e.message);
        assert!(e.message.contains("20260101000000"), "{}", e.message);
        let e = resolve_release(&layout, Some("../../etc")).unwrap_err();
        assert!(e.message.contains("../../etc"), "{}", e.message);
        assert!(resolve_release(&layout, None).is_err());
        assert_eq!(
            resolve_release(&layout, Some("20260101000000")).unwrap(),
            "20260101000000"
        );
    }

    #[test]
    fn compose_exec_argv() {
        let spec = ComposeSpec {
            files: vec!["compose.yml".into()],
            env_file: Some(".env".into()),
            project: "shop".into(),
            pull: false,
            command: None,
            zero_downtime: Vec::new(),
            drain_ms: None,
        };
        let argv = compose_argv(
            &Compose::v2(),
            &spec,
            &["exec".into(), "-T".into(), "web".into(), "env".into()],
        );
        assert_eq!(
            argv.join(" "),
            "docker compose -p shop -f compose.yml --env-file .env exec -T web env"
        );
    }
}
