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
//!    [`deploy::error`] (what a step fails with), [`deploy::watch`] (the watch after
//!    go-live: its task, its state on disk, its rollback by the agent alone).
//! 5. Helpers for one app on disk and its commands:
//!    - [`notify`]: the `[notify]` webhooks: the document posted per outcome, posting
//!      in the background with retries, and the 0600 store recovery reads them from;
//!    - [`command_env`]: the `DEPLOY_*` environment of every command run for an app;
//!    - [`ports`]: review-app names -> layouts, the port registry,
//!      `DEPLOY_INSTANCE`/`DEPLOY_PORT`;
//!    - [`history`]: the history log, and the agent's clock format;
//!    - [`fetch`]: sending a release back to the controller;
//!    - [`plan`]: read-only answers for `deployctl push --plan` (the delta a push would
//!      need), changing nothing on disk;
//!    - [`logs`] (`deployctl logs`: the journal, files confined to the release, compose
//!      logs) and [`oneoff`] (`deployctl exec`: a command in a release dir or a compose
//!      service), both streamed through [`pump`].
//! 6. Low-level pieces with no knowledge of a deploy:
//!    - [`release`]: release dirs and paths ([`release::layout`], also the one walker of
//!      app dirs), safe unpack, delta uploads, the `current` switch, prune;
//!    - [`compose`]: the compose strategy's argvs (v1 and v2) and its detection;
//!    - [`exec`]: running a command (process group, log file, timeout);
//!    - [`pump`]: streaming lines to the controller (bounded, masked, cut long lines;
//!      kills the child's group when the controller goes away);
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
pub mod logs;
pub mod notify;
pub mod oneoff;
pub mod plan;
pub mod ports;
pub mod pump;
pub mod release;
pub mod server;
pub mod session;
