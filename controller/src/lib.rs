//! deployctl: deploys web apps to your own servers over SSH.
//!
//! # Layout
//!
//! - [`cli`]: the command line (clap); [`run`] dispatches it. [`completion`],
//!   [`manpages`]: what the shell and `man` get from it.
//! - [`config`]: `deploy.toml`, resolved per environment.
//! - [`io`]: the byte stream under an agent connection.
//! - [`ssh`]: TCP + SSH with verified host keys ([`ssh::known_hosts`]) and client keys
//!   ([`ssh::keys`]); [`client`]: typed calls to one agent over an [`io::Io`];
//!   [`transport`]: from a configured host to a talking agent (SSH or `local`).
//! - [`spec`]: what we send the agent, built from an environment (release spec, app
//!   reference, lock holder, secrets to mask).
//! - [`compose`], [`artifact`]: the artifact of a compose push; reading a release tarball.
//! - [`rollout`]: batches, canary, verification, fleet-wide rollback.
//! - [`outcome`]: per-host results and the rollout report (plain data); [`report`],
//!   [`output`]: what they add up to (exit codes), tables, `--json`, progress lines.
//! - [`commands`]: one module per command; [`demo`]: `deployctl demo`; [`init`].
//! - [`exit`]: the exit codes we promise.
//!
//! ## Dependency rule
//!
//! A module imports only from the layers below it (`lib.rs` and `main.rs` may use any);
//! no two top-level modules import each other, directly or around a loop
//! (`tests/tests/e2e/layers.rs` checks it):
//!
//! 1. leaves, importing nothing from the crate: [`exit`], [`output`], [`io`], [`config`],
//!    [`artifact`];
//! 2. built on those: [`compose`], [`ssh`], [`client`], [`outcome`], [`cli`], [`init`];
//! 3. [`spec`], [`transport`], [`report`], [`completion`], [`manpages`];
//! 4. [`rollout`];
//! 5. [`commands`], then [`demo`] (which runs commands).
//!
//! So the rollout's result types live in [`outcome`], not in [`report`]; the builders
//! both [`commands`] and [`rollout`] use live in [`spec`]; and [`io::Io`] sits below both
//! [`ssh`] and [`client`].

pub mod artifact;
pub mod cli;
pub mod client;
pub mod commands;
pub mod completion;
pub mod compose;
pub mod config;
pub mod demo;
pub mod exit;
pub mod init;
pub mod io;
pub mod manpages;
pub mod outcome;
pub mod output;
pub mod packets;
pub mod report;
pub mod rollout;
pub mod spec;
pub mod ssh;
pub mod transport;
pub mod window;

use cli::{Cli, Command};
use exit::Failure;

/// Runs a parsed command line and returns the exit code.
pub async fn run(cli: Cli) -> u8 {
    match dispatch(&cli).await {
        Ok(code) => code,
        Err(f) => {
            crate::err!("deployctl: {}", f.message);
            f.code
        }
    }
}

async fn dispatch(cli: &Cli) -> Result<u8, Failure> {
    use commands::*;
    match &cli.command {
        Command::Push {
            env,
            artifact,
            compose,
            version,
            skip_migrations,
            yes,
            lock_wait,
            force,
            no_delta,
            plan,
            wait,
        } => {
            cli::check_label(version.as_deref())?;
            let args = push::PushArgs {
                env: env.env.clone(),
                json: env.json,
                artifact: artifact.clone(),
                compose: compose.clone(),
                version: version.clone(),
                skip_migrations: *skip_migrations,
                yes: *yes,
                lock_wait: *lock_wait,
                force: *force,
                no_delta: *no_delta,
                wait: *wait,
            };
            if *plan {
                return plan::push(cli, args).await;
            }
            push::run(cli, args).await
        }
        Command::Promote {
            from,
            to,
            version,
            yes,
            json,
            lock_wait,
            plan,
        } => {
            let args = promote::PromoteArgs {
                from: from.clone(),
                to: to.clone(),
                version: version.clone(),
                yes: *yes,
                json: *json,
                lock_wait: *lock_wait,
            };
            if *plan {
                return plan::promote(cli, args).await;
            }
            promote::run(cli, args).await
        }
        Command::Rollback {
            env,
            to,
            lock_wait,
            plan: true,
            ..
        } => plan::rollback(cli, &env.env, to.clone(), *lock_wait, env.json).await,
        Command::Rollback {
            env,
            to,
            yes,
            lock_wait,
            plan: false,
        } => rollback::run(cli, &env.env, to.clone(), *yes, *lock_wait, env.json).await,
        Command::Config { env, json } => commands::config::run(cli, env, *json),
        Command::Status { env } => info::run(cli, &env.env, info::What::Status, env.json).await,
        Command::Releases { env } => info::run(cli, &env.env, info::What::Releases, env.json).await,
        Command::History { env, limit } => {
            info::run(
                cli,
                &env.env,
                info::What::History { limit: *limit },
                env.json,
            )
            .await
        }
        Command::Check { env } => check::run(cli, &env.env, env.json).await,
        Command::Destroy {
            env,
            yes,
            lock_wait,
        } => destroy::run(cli, &env.env, *yes, *lock_wait, env.json).await,
        Command::Instances { env, json } => instances::run(cli, env, *json).await,
        Command::Bootstrap {
            env,
            agent_binary,
            no_systemd,
            prefix,
            socket_group,
        } => {
            bootstrap::run(
                cli,
                bootstrap::BootstrapArgs {
                    env: env.env.clone(),
                    json: env.json,
                    agent_binary: agent_binary.clone(),
                    no_systemd: *no_systemd,
                    prefix: prefix.clone(),
                    socket_group: socket_group.clone(),
                },
            )
            .await
        }
        Command::Logs(args) => logs::run(cli, args).await,
        Command::Exec(args) => exec::run(cli, args).await,
        Command::Demo { keep } => demo::run(*keep).await,
        Command::Init { app, force } => init::run(&cli.config, app.as_deref(), *force),
        Command::Completions { shell } => {
            // A closed stdout is the reader's business, not an error.
            let _ = completion::write_script(*shell, &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Man { command, dir } => man(command.as_deref(), dir.as_deref()),
        Command::DemoApp { listen, dir, .. } => demo::serve_static(listen, dir).await,
    }
}

fn man(command: Option<&str>, dir: Option<&std::path::Path>) -> Result<u8, Failure> {
    use std::io::Write as _;
    if let Some(dir) = dir {
        let files = manpages::write_all(dir).map_err(|e| {
            Failure::usage(format!(
                "cannot write the man pages to {}: {e}",
                dir.display()
            ))
        })?;
        for f in files {
            out!("{}", f.display());
        }
        return Ok(exit::OK);
    }
    let roff = manpages::page(command).ok_or_else(|| {
        Failure::usage(format!(
            "no man page for {:?}: name a command from `deployctl --help`",
            command.unwrap_or_default()
        ))
    })?;
    let _ = std::io::stdout().write_all(&roff);
    Ok(exit::OK)
}
