//! The deploy's transitions, in one place and as data: which step follows which, what a
//! failure leads to, and how recovery resumes from a journal. Pure: no I/O, no clock.
//! The driver ([`super::run::Run::drive`]) persists [`Step::phase`] before each step acts,
//! runs the step, and asks [`next`] where to go; recovery ([`super::recover`]) asks
//! [`recovery`] where to start.
//!
//! ```text
//! Prepare -> Migrate -> Switch -> Restart -> Check -> Confirm -> live
//!    \          \          \         \         \         \
//!     +----------+----------+-> failed  +---------+---------+-> roll back
//!       (current never moved)             (current moved)
//! ```
//!
//! To add a step (a zero-downtime cutover's "start the idle slot", a post-go-live
//! "watch", a hook): add a [`Step`] variant, its [`Phase`] if recovery must know it, a
//! row in [`TABLE`] and, for a new phase, a row in [`RECOVERY`]. The tests fail until
//! every pair and every phase has one.

use super::journal::Phase;

/// One step of a deploy. Each acts in the phase [`Step::phase`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Review-app port, shared links, and (compose) everything that can fail before
    /// anything changes: Docker, the files, `config -q`, `pull`.
    Prepare,
    /// The `migrate` command (skipped without one, or with `--skip-migrations`).
    Migrate,
    /// `current` -> the release.
    Switch,
    /// The `restart` command, or compose `up`.
    Restart,
    /// The health check.
    Check,
    /// Marks the release live, prunes old releases, records the URL it passed.
    Confirm,
}

/// Where a step's result leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Do(Step),
    /// The release is live.
    Live,
    /// Stop before `current` moved: the release is marked failed.
    Fail,
    /// `current` moved: switch back to the previous release (phase `RollingBack`).
    RollBack,
}

/// One row of the transition table: a step, where success leads, where failure leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub step: Step,
    pub ok: Next,
    pub failed: Next,
}

/// The transition table. A failure before the switch leaves `current` alone; from the
/// switch on (a failed switch did not move `current`), it rolls back.
pub const TABLE: &[Transition] = &[
    Transition {
        step: Step::Prepare,
        ok: Next::Do(Step::Migrate),
        failed: Next::Fail,
    },
    Transition {
        step: Step::Migrate,
        ok: Next::Do(Step::Switch),
        failed: Next::Fail,
    },
    Transition {
        step: Step::Switch,
        ok: Next::Do(Step::Restart),
        failed: Next::Fail,
    },
    Transition {
        step: Step::Restart,
        ok: Next::Do(Step::Check),
        failed: Next::RollBack,
    },
    Transition {
        step: Step::Check,
        ok: Next::Do(Step::Confirm),
        failed: Next::RollBack,
    },
    Transition {
        step: Step::Confirm,
        ok: Next::Live,
        failed: Next::RollBack,
    },
];

impl Step {
    pub const ALL: [Step; 6] = [
        Step::Prepare,
        Step::Migrate,
        Step::Switch,
        Step::Restart,
        Step::Check,
        Step::Confirm,
    ];

    /// The phase written to the journal before the step acts; `None` keeps the phase
    /// before it (confirming is still `Checking`: recovery checks again, then confirms).
    pub fn phase(self) -> Option<Phase> {
        match self {
            Step::Prepare => Some(Phase::Prepared),
            Step::Migrate => Some(Phase::Migrating),
            Step::Switch => Some(Phase::Switching),
            Step::Restart => Some(Phase::Restarting),
            Step::Check => Some(Phase::Checking),
            Step::Confirm => None,
        }
    }

    /// Where a run that starts in `phase` begins: a push starts `Prepared`, a rollback
    /// `Switching`.
    pub fn start(phase: Phase) -> Step {
        match phase {
            Phase::Switching => Step::Switch,
            _ => Step::Prepare,
        }
    }
}

/// Where `step` leads when it succeeded (`ok`) or failed.
pub fn next(step: Step, ok: bool) -> Next {
    let row = TABLE
        .iter()
        .find(|t| t.step == step)
        .expect("every step has a row in TABLE (see the tests)");
    if ok { row.ok } else { row.failed }
}

/// What recovery does with a deploy the agent did not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Removes the partial upload; ends as failed ("upload discarded").
    DiscardUpload,
    /// `current` never moved: ends as failed ("before the switch").
    EndBeforeSwitch,
    /// Goes on from this step, exactly as if the agent had never stopped.
    Resume(Step),
    /// Finishes going back to the previous release.
    FinishRollBack,
}

/// Whether `current` points at the journal's release, for the rows that care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    Any,
    Yes,
    No,
}

/// One row of the recovery table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryRow {
    pub phase: Phase,
    pub moved: Moved,
    pub then: Recovery,
}

/// The recovery table: phase when the agent died (and whether `current` had moved) ->
/// what recovery does. Whatever the health check then says decides.
pub const RECOVERY: &[RecoveryRow] = &[
    RecoveryRow {
        phase: Phase::Uploading,
        moved: Moved::Any,
        then: Recovery::DiscardUpload,
    },
    RecoveryRow {
        phase: Phase::Prepared,
        moved: Moved::Any,
        then: Recovery::EndBeforeSwitch,
    },
    RecoveryRow {
        phase: Phase::Migrating,
        moved: Moved::Any,
        then: Recovery::EndBeforeSwitch,
    },
    // The switch is one rename: it happened or it did not.
    RecoveryRow {
        phase: Phase::Switching,
        moved: Moved::Yes,
        then: Recovery::Resume(Step::Restart),
    },
    RecoveryRow {
        phase: Phase::Switching,
        moved: Moved::No,
        then: Recovery::EndBeforeSwitch,
    },
    RecoveryRow {
        phase: Phase::Restarting,
        moved: Moved::Any,
        then: Recovery::Resume(Step::Restart),
    },
    RecoveryRow {
        phase: Phase::Checking,
        moved: Moved::Any,
        then: Recovery::Resume(Step::Check),
    },
    RecoveryRow {
        phase: Phase::RollingBack,
        moved: Moved::Any,
        then: Recovery::FinishRollBack,
    },
];

/// What recovery does for a journal in `phase`, `moved` saying whether `current` points
/// at its release.
pub fn recovery(phase: Phase, moved: bool) -> Recovery {
    RECOVERY
        .iter()
        .find(|r| {
            r.phase == phase
                && match r.moved {
                    Moved::Any => true,
                    Moved::Yes => moved,
                    Moved::No => !moved,
                }
        })
        .map(|r| r.then)
        .expect("every phase has a row in RECOVERY (see the tests)")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHASES: [Phase; 7] = [
        Phase::Uploading,
        Phase::Prepared,
        Phase::Migrating,
        Phase::Switching,
        Phase::Restarting,
        Phase::Checking,
        Phase::RollingBack,
    ];

    #[test]
    fn every_step_and_result_leads_where_the_table_says() {
        use Next::*;
        use Step::*;
        // (step, succeeded) -> next: every pair, written out.
        let expected = [
            (Prepare, true, Do(Migrate)),
            (Prepare, false, Fail),
            (Migrate, true, Do(Switch)),
            (Migrate, false, Fail),
            (Switch, true, Do(Restart)),
            (Switch, false, Fail),
            (Restart, true, Do(Check)),
            (Restart, false, RollBack),
            (Check, true, Do(Confirm)),
            (Check, false, RollBack),
            (Confirm, true, Live),
            (Confirm, false, RollBack),
        ];
        assert_eq!(expected.len(), Step::ALL.len() * 2, "every pair is listed");
        for (step, ok, to) in expected {
            assert_eq!(next(step, ok), to, "{step:?} ok={ok}");
        }
        for step in Step::ALL {
            assert_eq!(
                TABLE.iter().filter(|t| t.step == step).count(),
                1,
                "{step:?}"
            );
        }
    }

    #[test]
    fn a_failure_rolls_back_exactly_when_current_may_have_moved() {
        // Before the switch (and a failed switch) nothing moved: failed, not rolled back.
        for step in Step::ALL {
            let moved = matches!(step, Step::Restart | Step::Check | Step::Confirm);
            let expect = if moved { Next::RollBack } else { Next::Fail };
            assert_eq!(next(step, false), expect, "{step:?}");
        }
    }

    #[test]
    fn a_run_from_the_start_visits_every_step_once_in_order() {
        let mut seen = vec![];
        let mut at = Next::Do(Step::start(Phase::Prepared));
        while let Next::Do(step) = at {
            seen.push(step);
            at = next(step, true);
        }
        assert_eq!(seen, Step::ALL);
        assert_eq!(at, Next::Live);
        // A rollback starts at the switch.
        assert_eq!(Step::start(Phase::Switching), Step::Switch);
    }

    #[test]
    fn every_recovery_row_does_what_the_table_says() {
        use Recovery::*;
        // (phase, current moved) -> recovery: every row, both ways.
        let expected = [
            (Phase::Uploading, false, DiscardUpload),
            (Phase::Uploading, true, DiscardUpload),
            (Phase::Prepared, false, EndBeforeSwitch),
            (Phase::Prepared, true, EndBeforeSwitch),
            (Phase::Migrating, false, EndBeforeSwitch),
            (Phase::Migrating, true, EndBeforeSwitch),
            (Phase::Switching, false, EndBeforeSwitch),
            (Phase::Switching, true, Resume(Step::Restart)),
            (Phase::Restarting, false, Resume(Step::Restart)),
            (Phase::Restarting, true, Resume(Step::Restart)),
            (Phase::Checking, false, Resume(Step::Check)),
            (Phase::Checking, true, Resume(Step::Check)),
            (Phase::RollingBack, false, FinishRollBack),
            (Phase::RollingBack, true, FinishRollBack),
        ];
        assert_eq!(expected.len(), PHASES.len() * 2);
        for (phase, moved, then) in expected {
            assert_eq!(recovery(phase, moved), then, "{phase:?} moved={moved}");
        }
        // No row is shadowed by another: each one is the answer for some case.
        for row in RECOVERY {
            let cases: &[bool] = match row.moved {
                Moved::Any => &[false, true],
                Moved::Yes => &[true],
                Moved::No => &[false],
            };
            for &m in cases {
                assert_eq!(recovery(row.phase, m), row.then, "{row:?}");
            }
        }
    }

    #[test]
    fn every_phase_a_step_persists_has_a_recovery() {
        for step in Step::ALL {
            if let Some(phase) = step.phase() {
                assert!(PHASES.contains(&phase));
                // Does not panic: a row answers both ways.
                let _ = (recovery(phase, true), recovery(phase, false));
            }
        }
    }
}
