//! The deploy: everything from a prepared release to live or rolled back, and the
//! recovery of a deploy the agent did not finish.
//!
//! - [`journal`]: the phase on disk (write temp, fsync, rename), read by recovery.
//! - [`run`]: the steps (link shared, migrate, switch, restart, health, confirm, roll
//!   back) and the progress [`Events`].
//! - [`recover`]: at start, finishing or undoing what the journal says was in flight.

pub mod journal;
pub mod recover;
pub mod run;

pub use run::{Events, Run, link_shared};
