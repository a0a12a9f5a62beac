//! What a command's hosts ended as: one [`HostResult`] per host and, for a fleet rollout,
//! the [`RolloutReport`] around them. Plain data, below both [`crate::rollout`] (which
//! produces it) and [`crate::report`] (which adds it up and shows it).

use std::time::Duration;

use proto::{DeployReport, Outcome};
use serde::Serialize;

use crate::exit::{self, Failure};

/// How one host ended.
#[derive(Debug, Clone, Serialize)]
pub struct HostResult {
    pub host: String,
    /// `None` when the host failed before the agent reported an outcome.
    pub outcome: Option<Outcome>,
    pub release: Option<String>,
    pub previous: Option<String>,
    pub current: Option<String>,
    pub error: Option<String>,
    pub exit_code: u8,
    pub duration_ms: u64,
    pub report: Option<DeployReport>,
    /// The rollout batch (1-based) this host was in.
    pub batch: Option<u32>,
    /// The host was not reached: the rollout stopped before its batch.
    pub skipped: bool,
    /// How the fleet-wide rollback (`on_failure = "rollback-all"`) ended on this host.
    pub fleet_rollback: Option<Outcome>,
}

impl HostResult {
    pub fn from_report(host: &str, r: DeployReport) -> Self {
        let exit_code = match r.outcome {
            Outcome::Live | Outcome::Removed => exit::OK,
            Outcome::Failed | Outcome::RolledBack => exit::DEPLOY_FAILED,
            Outcome::RollbackFailed => exit::NEEDS_HUMAN,
        };
        Self {
            host: host.to_owned(),
            outcome: Some(r.outcome),
            release: Some(r.release.clone()),
            previous: r.previous.clone(),
            current: r.current.clone(),
            error: r.error.clone(),
            exit_code,
            duration_ms: r.duration_ms,
            report: Some(r),
            batch: None,
            skipped: false,
            fleet_rollback: None,
        }
    }

    /// A host the agent never reported on: nothing known yet but its name.
    fn unreported(host: &str) -> Self {
        Self {
            host: host.to_owned(),
            outcome: None,
            release: None,
            previous: None,
            current: None,
            error: None,
            exit_code: exit::OK,
            duration_ms: 0,
            report: None,
            batch: None,
            skipped: false,
            fleet_rollback: None,
        }
    }

    pub fn skipped(host: &str) -> Self {
        Self {
            skipped: true,
            ..Self::unreported(host)
        }
    }

    /// Still on the new release when the command ends.
    /// (A fleet rollback that ends `Live` put the host back on its previous release;
    /// any other outcome left it on the new one.)
    pub fn on_new_release(&self) -> bool {
        self.outcome == Some(Outcome::Live) && self.fleet_rollback != Some(Outcome::Live)
    }

    pub fn from_failure(host: &str, f: Failure, took: Duration) -> Self {
        Self {
            error: Some(crate::output::without_host(host, &f.message).to_owned()),
            exit_code: f.code,
            duration_ms: took.as_millis() as u64,
            ..Self::unreported(host)
        }
    }
}

/// What verification from the outside found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyResult {
    pub url: String,
    pub ok: bool,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct RolloutReport {
    pub hosts: Vec<HostResult>,
    pub verify: Vec<VerifyResult>,
    /// Why the rollout stopped, if it did.
    pub failure: Option<String>,
    pub on_failure: Option<&'static str>,
}
