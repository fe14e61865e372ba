//! Control flow within one run, decided from its steps' states: which waiting steps run, which
//! are skipped and why, when a failure ends the run and when it starts the run's `on_failure`
//! steps. Pure: `store/machine.rs` reads a run's steps, asks [`advance`], and writes the answer.
//!
//! Runs of a workflow without `when`, `run_if` or `on_failure` never come here: their steps are
//! promoted by counting needs in one statement, and their first failure ends the run.
//!
//! The rules, in the order they apply:
//! - A waiting step whose rule (`run_if`) can no longer hold is skipped at once, even while
//!   other needs run: `all_succeeded` after a need was skipped, failed or cancelled,
//!   `none_failed` after one failed or was cancelled.
//! - Once every need has finished, the step runs if its rule holds, else it is skipped.
//! - A failed step fails the run at once (its other steps are cancelled) unless a step that has
//!   not finished may run after a failure (`all_done`, `any_failed`): then the run goes on until
//!   no step is left to run, and fails then.
//! - A run that fails with `on_failure` steps stays running while they run, and then fails with
//!   its first error; a run that succeeds skips them.

use crate::definition::RunIf;
use crate::state::JobState;

/// One step of a run, as the store read it.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowStep {
    pub job_id: i64,
    pub step_id: String,
    pub state: JobState,
    pub needs: Vec<String>,
    pub run_if: RunIf,
    /// One of the workflow's `on_failure` steps.
    pub on_failure: bool,
    pub error: Option<String>,
}

/// What happens to the run as a whole.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// Steps are still to finish.
    Continue,
    /// Every step succeeded or was skipped.
    Succeed,
    /// The run fails with this error, its open steps cancelled.
    Fail(String),
    /// The run failed with this error: its open steps are cancelled and its `on_failure` steps
    /// start; the run ends when they have.
    HandleFailure(String),
}

/// The decisions for one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Advance {
    /// Waiting steps that may run now.
    pub ready: Vec<i64>,
    /// Waiting steps that will not run, with the reason.
    pub skipped: Vec<(i64, String)>,
    /// Unfinished steps to cancel (the run's failure handling begins).
    pub cancelled: Vec<i64>,
    pub outcome: RunOutcome,
}

/// Decides what follows in a run whose steps are `steps`. `failing` is the error the run failed
/// with, once its `on_failure` steps have begun.
pub fn advance(steps: &[FlowStep], failing: Option<&str>) -> Advance {
    let mut states: Vec<JobState> = steps.iter().map(|s| s.state).collect();
    let mut decided = Advance {
        ready: Vec::new(),
        skipped: Vec::new(),
        cancelled: Vec::new(),
        outcome: RunOutcome::Continue,
    };
    let handlers = failing.is_some();
    settle_waiting(steps, &mut states, handlers, &mut decided);
    if let Some(error) = failing {
        let open = steps
            .iter()
            .zip(&states)
            .any(|(s, state)| s.on_failure && !state.is_finished());
        if !open {
            decided.outcome = RunOutcome::Fail(error.to_owned());
        }
        return decided;
    }
    let main = || steps.iter().zip(&states).filter(|(s, _)| !s.on_failure);
    let first_failure = main()
        .filter(|(_, state)| **state == JobState::Failed)
        .map(|(s, _)| s)
        .min_by_key(|s| s.job_id);
    let open = main().any(|(_, state)| !state.is_finished());
    let Some(failed) = first_failure else {
        if !open {
            // Nothing failed: the failure handlers are not needed.
            for (step, state) in steps.iter().zip(&mut states) {
                if step.on_failure && *state == JobState::Waiting {
                    *state = JobState::Skipped;
                    decided
                        .skipped
                        .push((step.job_id, "the run did not fail".to_owned()));
                }
            }
            decided.outcome = RunOutcome::Succeed;
        }
        return decided;
    };
    // A step that runs after failures and has not finished keeps the run going.
    let rescued = main().any(|(s, state)| !state.is_finished() && s.run_if.runs_after_failure());
    if rescued && open {
        return decided;
    }
    let error = format!(
        "step {} failed: {}",
        failed.step_id,
        failed.error.as_deref().unwrap_or_default()
    );
    if !steps.iter().any(|s| s.on_failure) {
        decided.outcome = RunOutcome::Fail(error);
        return decided;
    }
    // The run has failed: what is left of its own steps stops, and its handlers begin.
    for (step, state) in steps.iter().zip(&mut states) {
        if !step.on_failure && !state.is_finished() {
            *state = JobState::Cancelled;
            decided.ready.retain(|id| *id != step.job_id);
            decided.cancelled.push(step.job_id);
        }
    }
    settle_waiting(steps, &mut states, true, &mut decided);
    let handling = steps
        .iter()
        .zip(&states)
        .any(|(s, state)| s.on_failure && !state.is_finished());
    decided.outcome = if handling {
        RunOutcome::HandleFailure(error)
    } else {
        RunOutcome::Fail(error)
    };
    decided
}

/// The steps a retry of a run puts back to waiting: those that failed or were cancelled, those
/// skipped because of a need that did not succeed (decided again), and the failure handlers,
/// which wait again for the run to fail. A step its own `when` skipped after its needs succeeded
/// stays skipped: nothing it was decided on has changed.
pub fn retried(steps: &[FlowStep]) -> Vec<i64> {
    let state_of = |need: &str| {
        steps
            .iter()
            .find(|s| s.step_id == need && !s.on_failure)
            .map(|s| s.state)
    };
    steps
        .iter()
        .filter(|s| match s.state {
            JobState::Failed | JobState::Cancelled => true,
            _ if s.on_failure => s.state != JobState::Waiting,
            JobState::Skipped => s
                .needs
                .iter()
                .any(|need| state_of(need) != Some(JobState::Succeeded)),
            _ => false,
        })
        .map(|s| s.job_id)
        .collect()
}

/// Decides the waiting steps of one part of the run (its own steps, or its failure handlers)
/// until no decision follows from another.
fn settle_waiting(
    steps: &[FlowStep],
    states: &mut [JobState],
    handlers: bool,
    decided: &mut Advance,
) {
    loop {
        let mut changed = false;
        for (i, step) in steps.iter().enumerate() {
            if step.on_failure != handlers || states[i] != JobState::Waiting {
                continue;
            }
            let needs: Vec<(&str, JobState)> = step
                .needs
                .iter()
                .filter_map(|need| {
                    steps
                        .iter()
                        .position(|s| s.step_id == *need && s.on_failure == handlers)
                        .map(|at| (need.as_str(), states[at]))
                })
                .collect();
            match decide(step.run_if, &needs) {
                None => continue,
                Some(Ok(())) => {
                    // Ready steps count as running: their dependents wait for them.
                    states[i] = JobState::Available;
                    decided.ready.push(step.job_id);
                }
                Some(Err(reason)) => {
                    states[i] = JobState::Skipped;
                    decided.skipped.push((step.job_id, reason));
                }
            }
            changed = true;
        }
        if !changed {
            return;
        }
    }
}

/// Whether a waiting step with rule `run_if` runs (`Ok`), is skipped (`Err` with the reason), or
/// waits on (`None`), given the states of its needs.
fn decide(run_if: RunIf, needs: &[(&str, JobState)]) -> Option<Result<(), String>> {
    let find = |states: &[JobState]| needs.iter().find(|(_, s)| states.contains(s));
    let unsuccessful = find(&[JobState::Failed, JobState::Cancelled]);
    let skipped = find(&[JobState::Skipped]);
    let open = needs.iter().any(|(_, s)| !s.is_finished());
    let because = |(need, state): &(&str, JobState)| {
        let what = match state {
            JobState::Skipped => "was skipped",
            JobState::Failed => "failed",
            _ => "was cancelled",
        };
        Err(format!("it needs {need}, which {what}"))
    };
    match run_if {
        RunIf::AllSucceeded => match unsuccessful.or(skipped) {
            Some(need) => Some(because(need)),
            None => (!open).then_some(Ok(())),
        },
        RunIf::NoneFailed => match unsuccessful {
            Some(need) => Some(because(need)),
            None => (!open).then_some(Ok(())),
        },
        RunIf::AllDone => (!open).then_some(Ok(())),
        RunIf::AnyFailed => (!open).then(|| match unsuccessful {
            Some(_) => Ok(()),
            None => Err("run_if any_failed: no step it needs failed".to_owned()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState::*;

    fn step(id: i64, name: &str, state: JobState, needs: &[&str], run_if: RunIf) -> FlowStep {
        FlowStep {
            job_id: id,
            step_id: name.to_owned(),
            state,
            needs: needs.iter().map(|n| (*n).to_owned()).collect(),
            run_if,
            on_failure: false,
            error: (state == Failed).then(|| "boom".to_owned()),
        }
    }

    fn handler(id: i64, name: &str, state: JobState, needs: &[&str]) -> FlowStep {
        FlowStep {
            on_failure: true,
            ..step(id, name, state, needs, RunIf::AllSucceeded)
        }
    }

    #[test]
    fn a_skipped_step_skips_its_dependents_down_the_graph() {
        let steps = [
            step(1, "a", Skipped, &[], RunIf::AllSucceeded),
            step(2, "b", Waiting, &["a"], RunIf::AllSucceeded),
            step(3, "c", Waiting, &["b"], RunIf::AllSucceeded),
        ];
        let decided = advance(&steps, None);
        assert_eq!(
            decided.skipped,
            vec![
                (2, "it needs a, which was skipped".to_owned()),
                (3, "it needs b, which was skipped".to_owned())
            ]
        );
        assert_eq!(decided.outcome, RunOutcome::Succeed);
    }

    #[test]
    fn each_run_if_decides_from_the_states_of_the_needs() {
        use RunIf::*;
        let cases = [
            (AllSucceeded, [Succeeded, Succeeded], Some(true)),
            (AllSucceeded, [Succeeded, Skipped], Some(false)),
            (AllSucceeded, [Running, Skipped], Some(false)),
            (AllSucceeded, [Running, Succeeded], None),
            (NoneFailed, [Succeeded, Skipped], Some(true)),
            (NoneFailed, [Running, Failed], Some(false)),
            (NoneFailed, [Running, Skipped], None),
            (AllDone, [Failed, Skipped], Some(true)),
            (AllDone, [Failed, Running], None),
            (AnyFailed, [Failed, Succeeded], Some(true)),
            (AnyFailed, [Skipped, Succeeded], Some(false)),
            (AnyFailed, [Failed, Running], None),
        ];
        for (run_if, needs, expected) in cases {
            let needs = [("a", needs[0]), ("b", needs[1])];
            assert_eq!(
                decide(run_if, &needs).map(|d| d.is_ok()),
                expected,
                "{run_if} after {needs:?}"
            );
        }
    }

    #[test]
    fn a_failure_ends_the_run_at_once_unless_a_waiting_step_runs_after_failures() {
        let plain = [
            step(1, "a", Failed, &[], RunIf::AllSucceeded),
            step(2, "b", Running, &[], RunIf::AllSucceeded),
            step(3, "c", Waiting, &["a", "b"], RunIf::AllSucceeded),
        ];
        let decided = advance(&plain, None);
        assert_eq!(
            decided.outcome,
            RunOutcome::Fail("step a failed: boom".into())
        );

        let rescued = [
            step(1, "a", Failed, &[], RunIf::AllSucceeded),
            step(2, "b", Running, &[], RunIf::AllSucceeded),
            step(3, "report", Waiting, &["a", "b"], RunIf::AllDone),
        ];
        let decided = advance(&rescued, None);
        assert_eq!(decided.outcome, RunOutcome::Continue);
        assert!(decided.ready.is_empty());

        let done = [
            step(1, "a", Failed, &[], RunIf::AllSucceeded),
            step(2, "b", Succeeded, &[], RunIf::AllSucceeded),
            step(3, "report", Waiting, &["a", "b"], RunIf::AllDone),
        ];
        let decided = advance(&done, None);
        assert_eq!(decided.ready, vec![3]);
        assert_eq!(decided.outcome, RunOutcome::Continue);

        let reported = [
            step(1, "a", Failed, &[], RunIf::AllSucceeded),
            step(2, "b", Succeeded, &[], RunIf::AllSucceeded),
            step(3, "report", Succeeded, &["a", "b"], RunIf::AllDone),
        ];
        assert_eq!(
            advance(&reported, None).outcome,
            RunOutcome::Fail("step a failed: boom".into())
        );
    }

    #[test]
    fn a_failure_whose_handlers_are_all_skipped_ends_the_run() {
        let steps = [
            step(1, "a", Failed, &[], RunIf::AllSucceeded),
            handler(2, "first", Waiting, &[]),
            FlowStep {
                run_if: RunIf::AnyFailed,
                ..handler(3, "only_if_first_failed", Waiting, &["first"])
            },
        ];
        let decided = advance(&steps, None);
        assert_eq!(
            decided.outcome,
            RunOutcome::HandleFailure("step a failed: boom".into())
        );
        let handled = [
            step(1, "a", Failed, &[], RunIf::AllSucceeded),
            handler(2, "first", Succeeded, &[]),
            FlowStep {
                run_if: RunIf::AnyFailed,
                ..handler(3, "only_if_first_failed", Waiting, &["first"])
            },
        ];
        let decided = advance(&handled, Some("step a failed: boom"));
        assert_eq!(decided.skipped.len(), 1);
        assert_eq!(
            decided.outcome,
            RunOutcome::Fail("step a failed: boom".into())
        );
        let none_left = [
            step(1, "a", Failed, &[], RunIf::AllSucceeded),
            handler(2, "first", Skipped, &[]),
        ];
        assert_eq!(
            advance(&none_left, None).outcome,
            RunOutcome::Fail("step a failed: boom".into()),
            "no handler is left to run: the run ends"
        );
    }

    #[test]
    fn a_retry_decides_again_what_a_failure_skipped_and_keeps_what_when_skipped() {
        let steps = [
            step(1, "a", Succeeded, &[], RunIf::AllSucceeded),
            step(2, "gate", Skipped, &["a"], RunIf::AllSucceeded),
            step(3, "after_gate", Skipped, &["gate"], RunIf::AllSucceeded),
            step(4, "b", Failed, &["a"], RunIf::AllSucceeded),
            step(5, "after_b", Skipped, &["b"], RunIf::AllSucceeded),
            handler(6, "alert", Succeeded, &[]),
            handler(7, "idle", Waiting, &[]),
        ];
        assert_eq!(retried(&steps), vec![3, 4, 5, 6]);
    }

    #[test]
    fn failure_handlers_start_when_the_run_fails_and_are_skipped_when_it_succeeds() {
        let failed = [
            step(1, "a", Failed, &[], RunIf::AllSucceeded),
            step(2, "b", Running, &[], RunIf::AllSucceeded),
            handler(3, "alert", Waiting, &[]),
            handler(4, "cleanup", Waiting, &["alert"]),
        ];
        let decided = advance(&failed, None);
        assert_eq!(
            decided.outcome,
            RunOutcome::HandleFailure("step a failed: boom".into())
        );
        assert_eq!(decided.cancelled, vec![2]);
        assert_eq!(decided.ready, vec![3]);

        let handling = [
            step(1, "a", Failed, &[], RunIf::AllSucceeded),
            step(2, "b", Cancelled, &[], RunIf::AllSucceeded),
            handler(3, "alert", Succeeded, &[]),
            handler(4, "cleanup", Waiting, &["alert"]),
        ];
        let decided = advance(&handling, Some("step a failed: boom"));
        assert_eq!(decided.ready, vec![4]);
        assert_eq!(decided.outcome, RunOutcome::Continue);

        let handled = [
            step(1, "a", Failed, &[], RunIf::AllSucceeded),
            handler(3, "alert", Failed, &[]),
            handler(4, "cleanup", Waiting, &["alert"]),
        ];
        let decided = advance(&handled, Some("step a failed: boom"));
        assert_eq!(decided.skipped.len(), 1);
        assert_eq!(
            decided.outcome,
            RunOutcome::Fail("step a failed: boom".into())
        );

        let succeeded = [
            step(1, "a", Succeeded, &[], RunIf::AllSucceeded),
            handler(3, "alert", Waiting, &[]),
        ];
        let decided = advance(&succeeded, None);
        assert_eq!(
            decided.skipped,
            vec![(3, "the run did not fail".to_owned())]
        );
        assert_eq!(decided.outcome, RunOutcome::Succeed);
    }
}
