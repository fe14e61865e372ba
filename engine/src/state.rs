//! The run and job state machine. It decides; it does no IO. Stores persist its
//! decisions with guarded updates (expected state, attempt, lease token), so a decision taken on
//! stale information is rejected by the database rather than applied.
//!
//! Job (one step's series of attempts):
//! `waiting → available → running → succeeded | retrying | parked | failed | cancelled`,
//! `retrying → running`, `parked → running` (a durable sleep wakes) or `parked → succeeded | failed`
//! (child runs finished), and any unfinished state `→ cancelled` when its run ends.
//! Run: `pending → running → succeeded | failed | cancelled | timed_out`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::definition::{Backoff, NonRetryable, RetryPolicy};

/// Milliseconds since the Unix epoch: the only time the store sees.
pub type Millis = i64;

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownState(s.to_owned())),
                }
            }
        }
    };
}

#[derive(Debug, thiserror::Error)]
#[error("unknown state {0:?}")]
pub struct UnknownState(pub String);

string_enum!(
    /// The state of a run.
    RunStatus {
        Pending = "pending",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
        TimedOut = "timed_out",
    }
);

string_enum!(
    /// The state of a job: one step of one run, across its attempts.
    JobState {
        Waiting = "waiting",
        Available = "available",
        Running = "running",
        Retrying = "retrying",
        Parked = "parked",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
);

impl RunStatus {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled | RunStatus::TimedOut
        )
    }
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// States a worker may claim from (once `run_after` has passed).
    pub const CLAIMABLE: &'static [JobState] =
        &[JobState::Available, JobState::Retrying, JobState::Parked];

    /// Whether the machine allows `self → to`. Every SQL update that changes a job's state is
    /// guarded by the `from` side of one of these edges.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        match (self, to) {
            (Waiting, Available) => true,
            (Available | Retrying | Parked, Running) => true,
            (Running, Succeeded | Retrying | Parked | Failed) => true,
            // a run's retry puts its failed and cancelled steps back in line
            (Failed | Cancelled, Waiting) => true,
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
    Park {
        until: Option<Millis>,
        checkpoint: serde_json::Value,
    },
    /// The attempt did not happen (graceful shutdown): give the job back, attempt uncounted.
    Release,
}

impl Settlement {
    pub fn target(&self) -> JobState {
        match self {
            Settlement::Succeed { .. } => JobState::Succeeded,
            Settlement::Retry { .. } => JobState::Retrying,
            Settlement::Fail { .. } => JobState::Failed,
            Settlement::Park { .. } => JobState::Parked,
            Settlement::Release => JobState::Available,
        }
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
            (Parked, Succeeded),
            (Parked, Failed),
            (Waiting, Cancelled),
            (Available, Cancelled),
            (Running, Cancelled),
            (Retrying, Cancelled),
            (Parked, Cancelled),
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
        for from in [JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
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
}
