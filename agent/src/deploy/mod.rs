//! The deploy: everything from a prepared release to live or rolled back, and the
//! recovery of a deploy the agent did not finish.
//!
//! The deploy is one explicit state machine, split as nextest splits its runner into a
//! dispatcher (state) and an executor (effects):
//!
//! - [`machine`]: the transitions, as data and pure functions: (step, result) -> next
//!   step, and the recovery table (phase at death -> what to do). Read this first.
//! - [`run`]: the executor: each step's effects (link shared, migrate, switch, restart,
//!   health, confirm, roll back), the one driver loop [`Run::drive`] that writes the
//!   phase before a step acts, and the progress [`Events`].
//! - [`journal`]: the phase on disk (write temp, fsync, rename), read by recovery.
//! - [`recover`]: at start, finishing or undoing what the journal says was in flight.
//! - [`error`]: [`StepError`], what a step fails with.
//! - [`watch`]: the watch after go-live (`health.watch`): its state on disk, its task,
//!   and its rollback by the agent alone.
//! - `compose_rollout`: compose `zero_downtime`'s restart (a new container beside the old
//!   one, healthy, then the old one retired), called by the restart step.

mod compose_rollout;
pub mod error;
pub mod journal;
pub mod machine;
pub mod recover;
pub mod run;
pub mod watch;

pub use error::StepError;
pub use run::{Events, Run, link_shared};
