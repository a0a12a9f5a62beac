//! The deploy's transitions, in one place and as data: which step follows which, what a
//! failure leads to, and how recovery resumes from a journal. Pure: no I/O, no clock.
//! The driver ([`super::run::Run::drive`]) persists [`Step::phase`] before each step acts,
//! runs the step, and asks [`next`] where to go; recovery ([`super::recover`]) asks
//! [`recovery`] where to start.
//!
//! ```text
//! Prepare -> Migrate -> BeforeSwitch -> Switch -> Restart -> [StartSlot] -> Check
//!   -> [Route -> Drain] -> Confirm -> Watch -> AfterLive -> live
//!    \          \            \            \         \          \             \
//!     +----------+------------+------------+-> failed  +----------+-------------+-> roll back
//!       (current never moved)                            (current moved, until Confirm/Watch)
//! ```
//!
//! The bracketed steps are `[cutover]`'s (blue/green slots); `Restart` is the plain
//! deploy's. A step that does not apply to a run ([`Step::cutover`]) is passed over as
//! succeeded, without writing its phase. `Drain` and `AfterLive` never fail the deploy.
//!
//! The `on_failure` hook runs at every end but live ([`runs_on_failure`]), before the
//! outcome is recorded; it never changes it.
//!
//! To add a step (a zero-downtime cutover's "start the idle slot", a post-go-live
//! "watch", a hook): add a [`Step`] variant, its [`Phase`] if recovery must know it, a
//! row in [`TABLE`] and, for a new phase, a row in [`RECOVERY`]. The tests fail until
//! every pair and every phase has one.

use proto::Outcome;

use super::journal::Phase;

/// One step of a deploy. Each acts in the phase [`Step::phase`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Review-app port, shared links, and (compose) everything that can fail before
    /// anything changes: Docker, the files, `config -q`, `pull`.
    Prepare,
    /// The `migrate` command (skipped without one, or with `--skip-migrations`).
    Migrate,
    /// The `before_switch` hook (skipped without one): failing stops the deploy like a
    /// failed migration.
    BeforeSwitch,
    /// `current` -> the release.
    Switch,
    /// The `restart` command, or compose `up`.
    Restart,
    /// The health check.
    Check,
    /// Marks the release live, prunes old releases, records the URL it passed.
    Confirm,
    /// `[cutover]`: `stop` the idle slot (clears leftovers), then `start` the new release
    /// on it. The check after it is on the new slot's port.
    StartSlot,
    /// `[cutover]`: `switch`, the proxy to the new slot; then the serving slot is saved.
    Route,
    /// `[cutover]`: wait `drain`, then `stop` the old slot. A failed stop does not undo
    /// the deploy (the proxy is on the new slot): it is reported and the deploy goes on.
    Drain,
    /// The `after_live` hook (skipped without one): reported, the release stays live
    /// whatever it does.
    AfterLive,
    /// Arms the watch after go-live (`health.watch`, see [`super::watch`]); without
    /// one, passes at once. The deploy is live when it is armed; the watch's verdict
    /// comes later from its own task: a failed watch rolls back like a failed check.
    Watch,
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
        ok: Next::Do(Step::BeforeSwitch),
        failed: Next::Fail,
    },
    Transition {
        step: Step::BeforeSwitch,
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
        ok: Next::Do(Step::StartSlot),
        failed: Next::RollBack,
    },
    Transition {
        step: Step::StartSlot,
        ok: Next::Do(Step::Check),
        failed: Next::RollBack,
    },
    Transition {
        step: Step::Check,
        ok: Next::Do(Step::Route),
        failed: Next::RollBack,
    },
    Transition {
        step: Step::Route,
        ok: Next::Do(Step::Drain),
        failed: Next::RollBack,
    },
    Transition {
        step: Step::Drain,
        ok: Next::Do(Step::Confirm),
        failed: Next::Do(Step::Confirm),
    },
    Transition {
        step: Step::Confirm,
        ok: Next::Do(Step::Watch),
        failed: Next::RollBack,
    },
    Transition {
        step: Step::Watch,
        ok: Next::Do(Step::AfterLive),
        failed: Next::RollBack,
    },
    Transition {
        step: Step::AfterLive,
        ok: Next::Live,
        failed: Next::Live,
    },
];

impl Step {
    /// In the order a run visits them.
    pub const ALL: [Step; 12] = [
        Step::Prepare,
        Step::Migrate,
        Step::BeforeSwitch,
        Step::Switch,
        Step::Restart,
        Step::StartSlot,
        Step::Check,
        Step::Route,
        Step::Drain,
        Step::Confirm,
        Step::Watch,
        Step::AfterLive,
    ];

    /// `Some(true)`: only with `[cutover]`; `Some(false)`: only without; `None`: always.
    pub fn cutover(self) -> Option<bool> {
        match self {
            Step::StartSlot | Step::Route | Step::Drain => Some(true),
            Step::Restart => Some(false),
            _ => None,
        }
    }

    /// Whether the step acts in a run with (`cutover`) or without `[cutover]`.
    pub fn applies(self, cutover: bool) -> bool {
        self.cutover().is_none_or(|c| c == cutover)
    }

    /// The phase written to the journal before the step acts; `None` keeps the phase
    /// before it (confirming is still `Checking`: recovery checks again, then confirms;
    /// `before_switch` is still `Migrating`: recovery ends before the switch; `after_live`
    /// is still `Checking`: recovery checks, confirms and runs it again).
    pub fn phase(self) -> Option<Phase> {
        match self {
            Step::Prepare => Some(Phase::Prepared),
            Step::Migrate => Some(Phase::Migrating),
            Step::BeforeSwitch => None,
            Step::Switch => Some(Phase::Switching),
            Step::Restart => Some(Phase::Restarting),
            Step::Check => Some(Phase::Checking),
            Step::Confirm => None,
            Step::AfterLive => None,
            // The watch keeps its own state (`.deploy/watch.json`): the deploy is over.
            Step::Watch => None,
            Step::StartSlot => Some(Phase::Starting),
            Step::Route => Some(Phase::Routing),
            Step::Drain => Some(Phase::Draining),
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

/// The ends after which the `on_failure` hook runs, with `DEPLOY_OUTCOME` set to the
/// outcome's name: every end but live.
pub const ON_FAILURE: &[Outcome] = &[
    Outcome::Failed,
    Outcome::RolledBack,
    Outcome::RollbackFailed,
];

/// Whether the `on_failure` hook runs after a deploy that ends with `outcome`.
pub fn runs_on_failure(outcome: Outcome) -> bool {
    ON_FAILURE.contains(&outcome)
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

#[cfg(test)]
impl Recovery {
    /// The step a `Resume` goes on from; panics on the others.
    pub(crate) fn step(self) -> Step {
        match self {
            Recovery::Resume(step) => step,
            other => panic!("{other:?} does not resume a step"),
        }
    }
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
    // `[cutover]`. Starting again stops the new slot first: whatever the dead agent's
    // `start` left there goes.
    RecoveryRow {
        phase: Phase::Starting,
        moved: Moved::Any,
        then: Recovery::Resume(Step::StartSlot),
    },
    // The proxy may or may not have moved: check the new slot again, then switch (again);
    // a failed check switches the proxy back to the old slot, which still runs.
    RecoveryRow {
        phase: Phase::Routing,
        moved: Moved::Any,
        then: Recovery::Resume(Step::Check),
    },
    // The proxy is on the new slot (saved): wait the drain again, stop the old slot.
    RecoveryRow {
        phase: Phase::Draining,
        moved: Moved::Any,
        then: Recovery::Resume(Step::Drain),
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

    const PHASES: [Phase; 10] = [
        Phase::Uploading,
        Phase::Prepared,
        Phase::Migrating,
        Phase::Switching,
        Phase::Restarting,
        Phase::Checking,
        Phase::RollingBack,
        Phase::Starting,
        Phase::Routing,
        Phase::Draining,
    ];

    #[test]
    fn every_step_and_result_leads_where_the_table_says() {
        use Next::*;
        use Step::*;
        // (step, succeeded) -> next: every pair, written out.
        let expected = [
            (Prepare, true, Do(Migrate)),
            (Prepare, false, Fail),
            (Migrate, true, Do(BeforeSwitch)),
            (Migrate, false, Fail),
            (BeforeSwitch, true, Do(Switch)),
            (BeforeSwitch, false, Fail),
            (Switch, true, Do(Restart)),
            (Switch, false, Fail),
            (Restart, true, Do(StartSlot)),
            (Restart, false, RollBack),
            (StartSlot, true, Do(Check)),
            (StartSlot, false, RollBack),
            (Check, true, Do(Route)),
            (Check, false, RollBack),
            (Route, true, Do(Drain)),
            (Route, false, RollBack),
            // The proxy is on the new slot: a failed stop of the old one does not undo it.
            (Drain, true, Do(Confirm)),
            (Drain, false, Do(Confirm)),
            (Confirm, true, Do(Watch)),
            (Confirm, false, RollBack),
            (Watch, true, Do(AfterLive)),
            (Watch, false, RollBack),
            (AfterLive, true, Live),
            (AfterLive, false, Live),
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
        // After the release is confirmed live, nothing fails it any more.
        for step in Step::ALL {
            if step == Step::Drain {
                continue; // never fails the deploy (see the table test)
            }
            let moved = matches!(
                step,
                Step::Restart
                    | Step::StartSlot
                    | Step::Check
                    | Step::Route
                    | Step::Confirm
                    | Step::Watch
            );
            let expect = if step == Step::AfterLive {
                Next::Live
            } else if moved {
                Next::RollBack
            } else {
                Next::Fail
            };
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
        // What each kind of run acts in, in order.
        let acts = |cutover: bool| -> Vec<Step> {
            seen.iter()
                .copied()
                .filter(|s| s.applies(cutover))
                .collect()
        };
        use Step::*;
        assert_eq!(
            acts(false),
            [
                Prepare,
                Migrate,
                BeforeSwitch,
                Switch,
                Restart,
                Check,
                Confirm,
                Watch,
                AfterLive
            ]
        );
        assert_eq!(
            acts(true),
            [
                Prepare,
                Migrate,
                BeforeSwitch,
                Switch,
                StartSlot,
                Check,
                Route,
                Drain,
                Confirm,
                Watch,
                AfterLive
            ]
        );
        // A rollback starts at the switch.
        assert_eq!(Step::start(Phase::Switching), Step::Switch);
    }

    #[test]
    fn the_watch_follows_confirm_and_keeps_no_journal_phase() {
        // A deploy is live once its watch is armed (then only the `after_live` hook,
        // which changes nothing, is left); the watch's task later asks the table what a
        // failed watch leads to, and rolls back like a failed check.
        assert_eq!(next(Step::Confirm, true), Next::Do(Step::Watch));
        assert_eq!(next(Step::Watch, true), Next::Do(Step::AfterLive));
        assert_eq!(next(Step::Watch, false), Next::RollBack);
        assert_eq!(
            Step::Watch.phase(),
            None,
            "its state is watch.json, not the journal"
        );
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
            (Phase::Starting, false, Resume(Step::StartSlot)),
            (Phase::Starting, true, Resume(Step::StartSlot)),
            (Phase::Routing, false, Resume(Step::Check)),
            (Phase::Routing, true, Resume(Step::Check)),
            (Phase::Draining, false, Resume(Step::Drain)),
            (Phase::Draining, true, Resume(Step::Drain)),
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
    fn hooks_sit_where_the_contract_says() {
        // before_switch: after migrate, before the switch, and its failure is a failure
        // before the switch (current untouched), as a migration's is.
        assert_eq!(next(Step::Migrate, true), Next::Do(Step::BeforeSwitch));
        assert_eq!(next(Step::BeforeSwitch, true), Next::Do(Step::Switch));
        assert_eq!(next(Step::BeforeSwitch, false), next(Step::Migrate, false));
        // Dying in it is recovered as dying in the migration.
        assert_eq!(Step::BeforeSwitch.phase(), None);
        assert_eq!(recovery(Phase::Migrating, false), Recovery::EndBeforeSwitch);
        // after_live: only after the confirmation (and the watch is armed), and it
        // never changes the outcome.
        assert_eq!(next(Step::Watch, true), Next::Do(Step::AfterLive));
        assert_eq!(next(Step::AfterLive, false), Next::Live);
        // on_failure: every end but live.
        for outcome in [
            Outcome::Live,
            Outcome::Failed,
            Outcome::RolledBack,
            Outcome::RollbackFailed,
            Outcome::Removed,
        ] {
            let expect = matches!(
                outcome,
                Outcome::Failed | Outcome::RolledBack | Outcome::RollbackFailed
            );
            assert_eq!(runs_on_failure(outcome), expect, "{outcome:?}");
        }
    }

    #[test]
    fn a_cutover_recovery_never_routes_the_proxy_to_an_unchecked_slot() {
        // From every cutover phase, the steps recovery runs reach `Route` only through
        // `Check`, and stop the old slot (`Drain`) only after `Route`.
        for phase in [Phase::Starting, Phase::Routing, Phase::Draining] {
            let Recovery::Resume(mut step) = recovery(phase, true) else {
                panic!("{phase:?} resumes");
            };
            let mut seen = vec![];
            loop {
                if step.applies(true) {
                    seen.push(step);
                }
                match next(step, true) {
                    Next::Do(s) => step = s,
                    _ => break,
                }
            }
            let pos = |s: Step| seen.iter().position(|x| *x == s);
            if let Some(r) = pos(Step::Route) {
                assert!(
                    pos(Step::Check).is_some_and(|c| c < r),
                    "{phase:?}: {seen:?}"
                );
            }
            assert!(pos(Step::Drain).is_some(), "{phase:?}: {seen:?}");
            assert!(
                pos(Step::Confirm).is_some_and(|c| pos(Step::Drain).is_some_and(|d| d < c)),
                "{phase:?}: {seen:?}"
            );
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
