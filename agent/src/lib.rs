//! deploy-agent: the daemon on each server that owns every change there.
//!
//! # Layout
//!
//! - [`server`]: the Unix socket, accept loop, graceful shutdown, and the stdio `bridge`.
//! - [`session`]: one controller session; the one dispatch point for requests.
//! - [`lock`]: one deploy per app, freed when its holder goes away.
//! - [`release`]: release dirs ([`release::layout`]), safe unpack, `current` switch, prune.
//! - [`deploy`]: the lifecycle after upload: shared links, migrate, switch, restart,
//!   health, confirm or roll back.
//! - [`journal`]: the state machine on disk, and the history log.
//! - [`recover`]: finishing or undoing a deploy the agent did not finish.
//! - [`compose`]: the compose strategy's argvs (v1 and v2), detection order, and what a
//!   release records about its compose project.
//! - [`exec`]: running the app's commands; [`health`]: polling its health URL.
//! - [`logs`] (`deployctl logs`) and [`oneoff`] (`deployctl exec`): day-two streams,
//!   over [`pump`] (bounded, masked line streams to the controller).
//! - [`config`]: `/etc/deploy-agent/agent.toml` and its flags.
//! - [`instances`]: review apps: `instances/<name>/` layouts, their ports, destroy and
//!   expiry.

pub mod compose;
pub mod config;
pub mod deploy;
pub mod exec;
pub mod fetch;
pub mod health;
pub mod instances;
pub mod journal;
pub mod lock;
pub mod logs;
pub mod oneoff;
pub mod pump;
pub mod recover;
pub mod release;
pub mod server;
pub mod session;
