//! deploy-agent: the daemon on each server that owns every change there.
//!
//! # Layout
//!
//! - [`server`]: the Unix socket, accept loop, graceful shutdown, and the stdio `bridge`.
//! - [`session`]: one controller session; the one dispatch point for requests.
//! - [`instances`]: review apps: listing, destroy and expiry.
//! - [`deploy`]: the lifecycle after upload: shared links, migrate, switch, restart,
//!   health, confirm or roll back; its journal on disk and recovery at start.
//! - [`ports`]: review-app names, ports and `DEPLOY_INSTANCE`/`DEPLOY_PORT`.
//! - [`history`]: the history log.
//! - [`command_env`]: the `DEPLOY_*` environment of every command run for an app.
//! - [`release`]: release dirs ([`release::layout`]), safe unpack, `current` switch, prune.
//! - [`fetch`]: sending a release back to the controller.
//! - [`compose`]: the compose strategy's argvs (v1 and v2), detection order, and what a
//!   release records about its compose project.
//! - [`exec`]: running the app's commands; [`health`]: polling its health URL.
//! - [`context`]: what every part shares: config, locks, tasks, sessions, shutdown.
//! - [`lock`]: one deploy per app, freed when its holder goes away.
//! - [`config`]: `/etc/deploy-agent/agent.toml` and its flags.

pub mod command_env;
pub mod compose;
pub mod config;
pub mod context;
pub mod deploy;
pub mod exec;
pub mod fetch;
pub mod health;
pub mod history;
pub mod instances;
pub mod lock;
pub mod ports;
pub mod release;
pub mod server;
pub mod session;
