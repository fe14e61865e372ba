//! The run and job state machine: the states, which transitions are allowed, and the pure
//! decisions (`settle` an attempt, what a fire does, how many runs a gate lets through, what a
//! finished child run does to its parent's step). It does no IO. `store/machine.rs` applies these
//! decisions through a database transaction, once for every store; the drivers' SQL is guarded by
//! the state sets defined here (`store/sql.rs` writes them into the statements), so a decision
//! taken on stale information is rejected by the database rather than applied.
//!
//! Job (one step's series of attempts):
//! `waiting → available → running → succeeded | retrying | parked | failed | cancelled`,
//! `retrying → running`, `parked → running` (a durable sleep wakes) or `parked → succeeded | failed`
//! (child runs finished), and any unfinished state `→ cancelled` when its run ends. A step of a
//! run with control flow may end `skipped`: `running → skipped` (its `when` was false) or
//! `waiting → skipped` (its `run_if` cannot hold, or the run succeeded without needing its
//! `on_failure` step); `flow.rs` decides the latter.
//! Run: `pending → running → succeeded | failed | cancelled | timed_out`, and a run that did not
//! succeed `→ running` again when retried.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strum::{Display, EnumString, IntoStaticStr, VariantArray};

use crate::definition::{Backoff, NonRetryable, RetryPolicy};

/// Milliseconds since the Unix epoch: the only time the store sees.
pub type Millis = i64;

/// A state enum: its string forms (`timed_out`) come from strum, from one spelling.
macro_rules! state_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, Display, EnumString, IntoStaticStr,
            VariantArray,
        )]
        #[strum(serialize_all = "snake_case")]
        pub enum $name { $($variant),+ }
    };
}

state_enum!(
    /// The state of a run.
    RunStatus { Pending, Running, Succeeded, Failed, Cancelled, TimedOut }
);

state_enum!(
    /// The state of a job: one step of one run, across its attempts.
    JobState {
        Waiting, Available, Running, Retrying, Parked, Succeeded, Failed, Cancelled, Skipped
    }
);

state_enum!(
    /// Where a run's notification stands in the outbox.
    NotificationStatus { Pending, Delivered, Failed }
);

impl NotificationStatus {
    pub const ALL: &'static [NotificationStatus] = NotificationStatus::VARIANTS;

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl RunStatus {
    pub const ALL: &'static [RunStatus] = RunStatus::VARIANTS;
    /// A run still going: it may start jobs, and its jobs may be claimed.
    pub const ACTIVE: &'static [RunStatus] = &[RunStatus::Pending, RunStatus::Running];
    /// A run that ended unsuccessfully: `retry` puts it back to work.
    pub const RETRYABLE: &'static [RunStatus] =
        &[RunStatus::Failed, RunStatus::Cancelled, RunStatus::TimedOut];

    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn is_finished(self) -> bool {
        !RunStatus::ACTIVE.contains(&self)
    }

    /// Whether ending a run so records an alert for operators.
    pub fn raises_alert(self) -> bool {
        matches!(self, RunStatus::Failed | RunStatus::TimedOut)
    }

    /// Whether the machine allows `self → to`.
    pub fn can_become(self, to: RunStatus) -> bool {
        use RunStatus::*;
        match (self, to) {
            // a gate opens
            (Pending, Running) => true,
            // every job succeeded, or one failed, or the run was cancelled or ran out of time
            (Running, Succeeded | Failed | TimedOut) => true,
            (Pending | Running, Cancelled | Failed | TimedOut) => true,
            // retried
            (Failed | Cancelled | TimedOut, Running) => true,
            _ => false,
        }
    }
}

impl JobState {
    pub const ALL: &'static [JobState] = JobState::VARIANTS;
    /// States a worker may claim from (once `run_after` has passed).
    pub const CLAIMABLE: &'static [JobState] =
        &[JobState::Available, JobState::Retrying, JobState::Parked];
    /// States a job has not finished in: its run's end cancels it.
    pub const OPEN: &'static [JobState] = &[
        JobState::Waiting,
        JobState::Available,
        JobState::Running,
        JobState::Retrying,
        JobState::Parked,
    ];
    /// States a run's retry puts back in line.
    pub const UNSUCCESSFUL: &'static [JobState] = &[JobState::Failed, JobState::Cancelled];
    /// Finished states a run may have succeeded with.
    pub const SUCCESSFUL: &'static [JobState] = &[JobState::Succeeded, JobState::Skipped];
    /// States an attempt of the step is in while an outside answer to it may arrive (its
    /// callback token lives): parked, running, or given back by a worker shutting down.
    pub const AWAITING_ANSWER: &'static [JobState] =
        &[JobState::Parked, JobState::Running, JobState::Available];

    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn is_finished(self) -> bool {
        !JobState::OPEN.contains(&self)
    }

    /// Whether the machine allows `self → to`. Every SQL update that changes a job's state is
    /// guarded by the `from` side of one of these edges.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        match (self, to) {
            (Waiting, Available) => true,
            (Available | Retrying | Parked, Running) => true,
            (Running, Succeeded | Retrying | Parked | Failed) => true,
            // its `when` was false; or its `run_if` cannot hold
            (Running | Waiting, Skipped) => true,
            // a run's retry puts its failed and cancelled steps back in line, or a `workflow`
            // step back to waiting for its children
            (Failed | Cancelled, Waiting | Parked) => true,
            (Skipped, Waiting) => true,
            // children of a parked `workflow` step finished
            (Parked, Succeeded | Failed) => true,
            // the worker lost its lease or shut down: the attempt is given back
            (Running, Available) => true,
            (from, Cancelled) => !from.is_finished(),
            _ => false,
        }
    }
}

/// What one attempt of a step came to, as the worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    Succeeded {
        output: serde_json::Value,
    },
    Failed(StepFailure),
    /// The step waits without holding a worker: until a time (durable sleep) or, with `until:
    /// None`, until something else settles it (child runs finishing).
    Parked {
        until: Option<Millis>,
        checkpoint: serde_json::Value,
    },
    /// The step's `when` rendered false: it does not run.
    Skipped {
        reason: String,
    },
    /// A `for_each` step rendered its items: it waits, without a worker, while they run.
    Looped {
        items: Vec<serde_json::Value>,
        parallel: Option<u32>,
        checkpoint: serde_json::Value,
    },
}

/// A failed attempt. `kind` is matched against `retry.non_retryable`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepFailure {
    pub kind: String,
    pub message: String,
    pub status: Option<u16>,
    /// False when retrying cannot help (bad template, refused output, 4xx).
    pub retryable: bool,
    pub retry_after: Option<Duration>,
}

impl StepFailure {
    pub fn permanent(kind: &str, message: impl Into<String>) -> Self {
        StepFailure {
            kind: kind.to_owned(),
            message: message.into(),
            status: None,
            retryable: false,
            retry_after: None,
        }
    }

    pub fn transient(kind: &str, message: impl Into<String>) -> Self {
        StepFailure {
            retryable: true,
            ..StepFailure::permanent(kind, message)
        }
    }
}

impl fmt::Display for StepFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// The decision for a job after an attempt: what the store writes, fenced by the attempt's lease.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    Succeed {
        output: serde_json::Value,
    },
    Retry {
        at: Millis,
        error: String,
    },
    Fail {
        error: String,
    },
    /// The step failed for good and says `continue_on_error`: it ends succeeded, its output
    /// `{error}` and its error recorded, and its dependents run.
    Tolerate {
        error: String,
    },
    Park {
        until: Option<Millis>,
        checkpoint: serde_json::Value,
    },
    /// The attempt did not happen (graceful shutdown): give the job back, attempt uncounted.
    Release,
    /// The step's `when` was false: it ends `skipped`, the reason recorded.
    Skip {
        reason: String,
    },
    /// A `for_each` step parks while its items, created with it, run `parallel` at a time.
    Loop {
        items: Vec<serde_json::Value>,
        parallel: Option<u32>,
        checkpoint: serde_json::Value,
    },
}

impl Settlement {
    pub fn target(&self) -> JobState {
        match self {
            Settlement::Succeed { .. } => JobState::Succeeded,
            Settlement::Retry { .. } => JobState::Retrying,
            Settlement::Fail { .. } => JobState::Failed,
            Settlement::Tolerate { .. } => JobState::Succeeded,
            Settlement::Park { .. } => JobState::Parked,
            Settlement::Release => JobState::Available,
            Settlement::Skip { .. } => JobState::Skipped,
            Settlement::Loop { .. } => JobState::Parked,
        }
    }

    /// The same decision for a step with `continue_on_error`: a failure for good is tolerated.
    pub fn continuing_on_error(self, continue_on_error: bool) -> Settlement {
        match self {
            Settlement::Fail { error } if continue_on_error => Settlement::Tolerate { error },
            other => other,
        }
    }

    /// The output a tolerated failure leaves for the step's dependents.
    pub fn tolerated_output(error: &str) -> serde_json::Value {
        serde_json::json!({ "error": error })
    }
}

/// Decides what follows attempt number `attempt` (1-based) of a job. `jitter` is a uniform draw
/// from [0, 1), passed in so that the decision stays a pure function.
pub fn settle(
    attempt: u32,
    policy: &RetryPolicy,
    result: AttemptResult,
    now: Millis,
    jitter: f64,
) -> Settlement {
    match result {
        AttemptResult::Succeeded { output } => Settlement::Succeed { output },
        AttemptResult::Parked { until, checkpoint } => Settlement::Park { until, checkpoint },
        AttemptResult::Skipped { reason } => Settlement::Skip { reason },
        AttemptResult::Looped {
            items,
            parallel,
            checkpoint,
        } => Settlement::Loop {
            items,
            parallel,
            checkpoint,
        },
        AttemptResult::Failed(failure) => {
            let error = failure.to_string();
            let listed = policy.non_retryable.iter().any(|n| match n {
                NonRetryable::Status(code) => failure.status == Some(*code),
                NonRetryable::Kind(kind) => *kind == failure.kind,
            });
            if !failure.retryable || listed || attempt > policy.max_retries {
                return Settlement::Fail { error };
            }
            let backoff = backoff_delay(policy, attempt, jitter);
            let wait = failure.retry_after.map_or(backoff, |ra| ra.max(backoff));
            Settlement::Retry {
                at: now.saturating_add(wait.as_millis().min(i64::MAX as u128) as i64),
                error,
            }
        }
    }
}

/// A job whose lease ran out: its worker is gone. The lost attempt counts, so a step that kills
/// every worker it lands on still ends.
pub fn settle_lost_lease(attempt: u32, max_attempts: u32, now: Millis) -> Settlement {
    let error = "worker lost: lease expired before the attempt finished".to_owned();
    if attempt >= max_attempts {
        Settlement::Fail { error }
    } else {
        Settlement::Retry { at: now, error }
    }
}

/// Why a fire starts no run, if it starts one: its workflow was removed (`paused` is `None`) or
/// is paused, or (with `overlap: skip`) a run of it started by an earlier fire is still going.
pub fn fire_skip_reason(paused: Option<bool>, active_run: Option<&str>) -> Option<String> {
    match paused {
        None => return Some("removed".to_owned()),
        Some(true) => return Some("paused".to_owned()),
        Some(false) => {}
    }
    active_run.map(|run| format!("overlap: run {run} is still going"))
}

/// How many new runs a concurrency gate lets start now: none while one waits ahead of them (first
/// come, first served), else its limit less the runs it holds.
pub fn gate_room(limit: i64, running: i64, pending: i64) -> i64 {
    if pending > 0 { 0 } else { limit - running }
}

/// How many waiting runs a gate starts when runs of it finish: the limit the oldest waiting run
/// was started under, less the runs still holding a slot.
pub fn gate_opening(oldest_pending_limit: Option<i64>, running: i64) -> i64 {
    oldest_pending_limit.unwrap_or(0) - running
}

/// How many waiting items of a `for_each` step start now: when its items were created, its
/// `parallel` (every one without a limit); later, one for each item that succeeded, whose slot
/// it takes (without a limit, none waits).
pub fn loop_start(parallel: Option<i64>, created: bool, succeeded: i64) -> i64 {
    match (parallel, created) {
        (None, true) => crate::definition::MAX_ITEMS as i64,
        (None, false) => 0,
        (Some(limit), true) => limit,
        (Some(_), false) => succeeded,
    }
}

/// The error of a run that ran past its deadline.
pub fn timeout_error(timeout_ms: Option<i64>) -> String {
    let limit = Duration::from_millis(timeout_ms.unwrap_or(0).max(0) as u64);
    format!("run timed out after {}", humantime::format_duration(limit))
}

/// Delay before retry number `attempt` (the attempt that failed, 1-based). With jitter the delay
/// is drawn from [d/2, d) ("equal jitter"): spread out, yet never much shorter than the policy.
pub fn backoff_delay(policy: &RetryPolicy, attempt: u32, jitter: f64) -> Duration {
    let initial = policy.initial.0;
    let base = match policy.backoff {
        Backoff::Fixed => initial,
        Backoff::Exponential => {
            let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
            initial.saturating_mul(factor)
        }
    };
    let capped = base.min(policy.max.0);
    if policy.jitter {
        capped.div_f64(2.0) + capped.div_f64(2.0).mul_f64(jitter.clamp(0.0, 1.0))
    } else {
        capped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::DurationSpec;

    fn policy(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            jitter: false,
            initial: DurationSpec(Duration::from_secs(1)),
            max: DurationSpec(Duration::from_secs(60)),
            ..RetryPolicy::default()
        }
    }

    fn fail(retryable: bool) -> AttemptResult {
        AttemptResult::Failed(StepFailure {
            retryable,
            ..StepFailure::permanent("http", "boom")
        })
    }

    #[test]
    fn every_state_pair_is_decided_by_the_transition_table() {
        use JobState::*;
        let allowed = [
            (Waiting, Available),
            (Available, Running),
            (Retrying, Running),
            (Parked, Running),
            (Running, Succeeded),
            (Running, Retrying),
            (Running, Parked),
            (Running, Failed),
            (Running, Available),
            (Failed, Waiting),
            (Cancelled, Waiting),
            (Failed, Parked),
            (Cancelled, Parked),
            (Parked, Succeeded),
            (Parked, Failed),
            (Waiting, Cancelled),
            (Available, Cancelled),
            (Running, Cancelled),
            (Retrying, Cancelled),
            (Parked, Cancelled),
            (Running, Skipped),
            (Waiting, Skipped),
            (Skipped, Waiting),
        ];
        for &from in JobState::ALL {
            for &to in JobState::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from} → {to}"
                );
            }
        }
    }

    #[test]
    fn finished_jobs_cannot_be_cancelled_or_run_again() {
        for from in [
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
            JobState::Skipped,
        ] {
            assert!(!from.can_become(JobState::Cancelled));
            assert!(!from.can_become(JobState::Running));
        }
    }

    #[test]
    fn state_names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), *s);
        }
        for s in RunStatus::ALL {
            assert_eq!(s.as_str().parse::<RunStatus>().unwrap(), *s);
        }
        assert!("paused".parse::<RunStatus>().is_err());
        assert_eq!(RunStatus::TimedOut.to_string(), "timed_out");
    }

    #[test]
    fn every_run_status_pair_is_decided_by_the_transition_table() {
        use RunStatus::*;
        let allowed = [
            (Pending, Running),
            (Running, Succeeded),
            (Running, Failed),
            (Running, TimedOut),
            (Running, Cancelled),
            (Pending, Cancelled),
            (Pending, Failed),
            (Pending, TimedOut),
            (Failed, Running),
            (Cancelled, Running),
            (TimedOut, Running),
        ];
        for &from in RunStatus::ALL {
            for &to in RunStatus::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from} → {to}"
                );
            }
        }
    }

    #[test]
    fn state_sets_agree_with_the_transition_tables() {
        for &s in JobState::CLAIMABLE {
            assert!(s.can_become(JobState::Running), "{s}");
        }
        for &s in JobState::ALL {
            assert_eq!(
                s.can_become(JobState::Cancelled),
                JobState::OPEN.contains(&s),
                "{s}"
            );
        }
        for &s in JobState::UNSUCCESSFUL {
            assert!(s.can_become(JobState::Waiting), "{s}");
        }
        for &s in RunStatus::ALL {
            assert_eq!(
                s.can_become(RunStatus::Cancelled),
                RunStatus::ACTIVE.contains(&s),
                "{s}"
            );
            assert_eq!(
                s.can_become(RunStatus::Running) && s != RunStatus::Pending,
                RunStatus::RETRYABLE.contains(&s),
                "{s}"
            );
        }
    }

    #[test]
    fn success_settles_with_the_output() {
        let s = settle(
            1,
            &policy(3),
            AttemptResult::Succeeded { output: 1.into() },
            0,
            0.0,
        );
        assert_eq!(s, Settlement::Succeed { output: 1.into() });
    }

    #[test]
    fn retryable_failure_retries_until_retries_are_used_up() {
        let p = policy(2);
        assert!(matches!(
            settle(1, &p, fail(true), 0, 0.0),
            Settlement::Retry { at: 1000, .. }
        ));
        assert!(matches!(
            settle(2, &p, fail(true), 0, 0.0),
            Settlement::Retry { at: 2000, .. }
        ));
        assert!(matches!(
            settle(3, &p, fail(true), 0, 0.0),
            Settlement::Fail { .. }
        ));
    }

    #[test]
    fn permanent_failure_fails_at_once() {
        assert!(matches!(
            settle(1, &policy(5), fail(false), 0, 0.0),
            Settlement::Fail { .. }
        ));
    }

    #[test]
    fn non_retryable_status_fails_at_once() {
        let mut p = policy(5);
        p.non_retryable = vec![NonRetryable::Status(503)];
        let result = AttemptResult::Failed(StepFailure {
            status: Some(503),
            ..StepFailure::transient("http", "unavailable")
        });
        assert!(matches!(
            settle(1, &p, result, 0, 0.0),
            Settlement::Fail { .. }
        ));
    }

    #[test]
    fn non_retryable_kind_fails_at_once() {
        let mut p = policy(5);
        p.non_retryable = vec![NonRetryable::Kind("http".into())];
        assert!(matches!(
            settle(1, &p, fail(true), 0, 0.0),
            Settlement::Fail { .. }
        ));
    }

    #[test]
    fn retry_after_longer_than_backoff_is_honoured() {
        let result = AttemptResult::Failed(StepFailure {
            retry_after: Some(Duration::from_secs(30)),
            ..StepFailure::transient("http", "429")
        });
        assert!(matches!(
            settle(1, &policy(3), result, 0, 0.0),
            Settlement::Retry { at: 30_000, .. }
        ));
    }

    #[test]
    fn retry_after_shorter_than_backoff_keeps_the_backoff() {
        let result = AttemptResult::Failed(StepFailure {
            retry_after: Some(Duration::from_millis(10)),
            ..StepFailure::transient("http", "429")
        });
        assert!(matches!(
            settle(2, &policy(3), result, 0, 0.0),
            Settlement::Retry { at: 2_000, .. }
        ));
    }

    #[test]
    fn exponential_backoff_is_capped_by_max() {
        let p = policy(100);
        assert_eq!(backoff_delay(&p, 1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff_delay(&p, 3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff_delay(&p, 40, 0.0), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_between_half_and_the_full_delay() {
        let mut p = policy(100);
        p.jitter = true;
        assert_eq!(backoff_delay(&p, 3, 0.0), Duration::from_secs(2));
        let high = backoff_delay(&p, 3, 0.999);
        assert!(high < Duration::from_secs(4) && high > Duration::from_millis(3_990));
    }

    #[test]
    fn a_fire_is_skipped_while_paused_or_while_its_last_run_goes_on() {
        assert_eq!(fire_skip_reason(None, None).as_deref(), Some("removed"));
        assert_eq!(
            fire_skip_reason(Some(true), Some("r")).as_deref(),
            Some("paused")
        );
        assert_eq!(
            fire_skip_reason(Some(false), Some("r")).as_deref(),
            Some("overlap: run r is still going")
        );
        assert_eq!(fire_skip_reason(Some(false), None), None);
    }

    #[test]
    fn a_gate_lets_runs_through_up_to_its_limit_and_never_past_one_waiting() {
        assert_eq!(gate_room(2, 1, 0), 1);
        assert_eq!(gate_room(2, 0, 1), 0);
        assert_eq!(gate_opening(Some(3), 1), 2);
        assert_eq!(gate_opening(None, 0), 0);
    }

    #[test]
    fn lost_lease_retries_at_once_then_fails_when_attempts_are_used_up() {
        assert!(matches!(
            settle_lost_lease(1, 4, 7),
            Settlement::Retry { at: 7, .. }
        ));
        assert!(matches!(
            settle_lost_lease(4, 4, 7),
            Settlement::Fail { .. }
        ));
    }

    #[test]
    fn only_a_failure_for_good_of_a_step_that_continues_on_error_is_tolerated() {
        let p = policy(1);
        let last = settle(2, &p, fail(true), 0, 0.0);
        assert_eq!(
            last.clone().continuing_on_error(true),
            Settlement::Tolerate {
                error: "http: boom".into()
            }
        );
        assert_eq!(last.clone().continuing_on_error(false), last);
        let retry = settle(1, &p, fail(true), 0, 0.0);
        assert_eq!(retry.clone().continuing_on_error(true), retry);
        let lost = settle_lost_lease(2, 2, 7).continuing_on_error(true);
        assert_eq!(lost.target(), JobState::Succeeded);
    }

    #[test]
    fn a_loop_starts_parallel_items_then_one_for_each_that_succeeded() {
        assert_eq!(loop_start(Some(10), true, 0), 10);
        assert_eq!(loop_start(Some(10), false, 3), 3);
        assert_eq!(
            loop_start(None, true, 0),
            crate::definition::MAX_ITEMS as i64
        );
        assert_eq!(loop_start(None, false, 3), 0, "without a limit, none waits");
    }
}

/// What taking from a shared rate limit gives: when the taker may go, and the bucket's new
/// state (`None`: unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaTake {
    /// When the taker may go: now or earlier means at once.
    pub at: Millis,
    /// The bucket's theoretical arrival time after the take, in microseconds.
    pub tat_us: Option<i64>,
}

/// A rate limit of `limit` per `per`, as GCRA: `tat_us` is when the bucket would be empty again,
/// in microseconds (0 for a new bucket). Up to `limit` may go at once, then one every
/// `per / limit`. With `reserve`, a taker that must wait gets its place now (its time is
/// returned, and the next taker waits after it): workers park until then, and no crowd wakes
/// to race for one token. Without, a refused taker changes nothing (an API request that gets
/// 429). `redis_quota.lua` is this rule again, for buckets kept in Redis.
pub fn quota_take(tat_us: i64, now: Millis, limit: u32, per: Duration, reserve: bool) -> QuotaTake {
    let per_us = per.as_micros().clamp(1, i64::MAX as u128) as i64;
    let interval_us = (per_us / i64::from(limit.max(1))).max(1);
    let now_us = now.saturating_mul(1_000);
    let tat = tat_us.max(now_us);
    let at_us = tat.saturating_sub(per_us - interval_us);
    if at_us > now_us && !reserve {
        return QuotaTake {
            at: ceil_ms(at_us),
            tat_us: None,
        };
    }
    QuotaTake {
        at: ceil_ms(at_us.max(now_us)),
        tat_us: Some(tat.saturating_add(interval_us)),
    }
}

/// Microseconds as milliseconds, rounded up: a taker never goes early.
fn ceil_ms(us: i64) -> Millis {
    us.div_euclid(1_000) + i64::from(us.rem_euclid(1_000) != 0)
}

#[cfg(test)]
mod quota_tests {
    use super::*;

    #[test]
    fn a_quota_lets_its_limit_through_at_once_then_one_each_interval() {
        let per = Duration::from_secs(1);
        let mut tat = 0;
        let mut ats = Vec::new();
        for _ in 0..12 {
            let take = quota_take(tat, 1_000, 10, per, true);
            tat = take.tat_us.unwrap();
            ats.push(take.at);
        }
        assert_eq!(&ats[..10], &[1_000; 10]);
        assert_eq!(&ats[10..], &[1_100, 1_200]);
        // Without a reservation, a refusal names when to come back and changes nothing.
        let refused = quota_take(tat, 1_000, 10, per, false);
        assert_eq!(
            refused,
            QuotaTake {
                at: 1_300,
                tat_us: None
            }
        );
        // Idle for a whole period, the bucket is full again.
        let later = quota_take(tat, 3_000, 10, per, false);
        assert_eq!(later.at, 3_000);
    }
}
