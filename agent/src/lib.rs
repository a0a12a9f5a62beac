//! deploy-agent: the daemon on each server that owns every change there.
//!
//! # Layout
//!
//! Top-level modules, top to bottom. **The dependency rule:** a module names (`crate::`)
//! only modules listed after it here, never one before it, so there is no import cycle
//! (`tests/tests/e2e/layers.rs` checks that). Roughly: context -> low-level helpers ->
//! `deploy` -> `instances` -> `session` -> `server`.
//!
//! 1. [`server`]: the Unix socket, accept loop, recovery at start, graceful shutdown,
//!    and the stdio `bridge`.
//! 2. [`session`]: one controller session: handshake, limits, and the one dispatch
//!    point for requests; receiving an upload.
//! 3. [`instances`]: review apps: listing, destroy, and expiry.
//! 4. [`deploy`]: the deploy as one state machine: [`deploy::machine`] (the transition
//!    and recovery tables: read this to know what happens when),
//!    [`deploy::run`] (each step's effects and the driver loop), [`deploy::journal`] (the
//!    phase on disk), [`deploy::recover`] (unfinished deploys at start),
//!    [`deploy::error`] (what a step fails with).
//! 5. Helpers for one app on disk and its commands:
//!    - [`command_env`]: the `DEPLOY_*` environment of every command run for an app;
//!    - [`ports`]: review-app names -> layouts, the port registry,
//!      `DEPLOY_INSTANCE`/`DEPLOY_PORT`;
//!    - [`history`]: the history log, and the agent's clock format;
//!    - [`fetch`]: sending a release back to the controller.
//! 6. Low-level pieces with no knowledge of a deploy:
//!    - [`release`]: release dirs and paths ([`release::layout`], also the one walker of
//!      app dirs), safe unpack, delta uploads, the `current` switch, prune;
//!    - [`compose`]: the compose strategy's argvs (v1 and v2) and its detection;
//!    - [`exec`]: running a command (process group, log file, timeout);
//!      [`health`]: polling a health URL;
//!    - [`context`]: what every part shares (config, locks, tasks in flight, open
//!      sessions, shutdown), over [`config`] (`agent.toml` and its flags) and [`lock`]
//!      (one deploy per app, freed when its holder goes away).

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
