//! The metrics every part of the engine reports, by name, through the `metrics` facade. The
//! binary installs the Prometheus recorder; without one (tests, embedding) they cost nothing.
//! Each process counts what it did itself: scrape every process and sum.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

use crate::state::RunStatus;

pub const RUNS_STARTED: &str = "workflow_runs_started_total";
pub const RUNS_FINISHED: &str = "workflow_runs_finished_total";
/// The seed's alert rule reads this name: runs that failed or timed out, and scheduled fires
/// whose run could not start.
pub const FAILURES: &str = "workflow_failures_total";
pub const STEP_DURATION: &str = "workflow_step_duration_seconds";
pub const QUEUE_DEPTH: &str = "workflow_queue_depth";
pub const CLAIM_DURATION: &str = "workflow_claim_duration_seconds";
pub const SCHEDULER_LAG: &str = "workflow_scheduler_lag_seconds";
pub const NOTIFICATIONS_PENDING: &str = "workflow_notifications_pending";
pub const NOTIFICATIONS_FAILED: &str = "workflow_notifications_failed";

/// Histogram buckets, in seconds, for step and claim durations and scheduler lag.
pub const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Registers each metric's help text with the installed recorder.
pub fn describe() {
    describe_counter!(RUNS_STARTED, "Runs started, by workflow");
    describe_counter!(RUNS_FINISHED, "Runs that ended, by workflow and status");
    describe_counter!(
        FAILURES,
        "Runs that failed or timed out, and fires refused, by workflow"
    );
    describe_histogram!(
        STEP_DURATION,
        metrics::Unit::Seconds,
        "Step attempt durations, by workflow, step and outcome"
    );
    describe_gauge!(QUEUE_DEPTH, "Jobs claimable now that no worker has taken");
    describe_histogram!(
        CLAIM_DURATION,
        metrics::Unit::Seconds,
        "Time of one claim (with the completions it commits) from the database"
    );
    describe_histogram!(
        SCHEDULER_LAG,
        metrics::Unit::Seconds,
        "How late a schedule fire was recorded after its time"
    );
    describe_gauge!(
        NOTIFICATIONS_PENDING,
        "Run notifications not delivered yet, in the outbox"
    );
    describe_gauge!(
        NOTIFICATIONS_FAILED,
        "Run notifications given up after their last attempt"
    );
}

/// Publishes a workflow's run counters at zero, so that alert expressions over them (the
/// failure rate) see a series from the start, not only after the first failure.
pub fn workflow_known(workflow: &str) {
    counter!(RUNS_STARTED, "workflow" => workflow.to_owned()).increment(0);
    counter!(FAILURES, "workflow" => workflow.to_owned()).increment(0);
    for status in RunStatus::ALL.iter().filter(|s| s.is_finished()) {
        counter!(RUNS_FINISHED, "workflow" => workflow.to_owned(), "status" => status.as_str())
            .increment(0);
    }
}

pub fn run_started(workflow: &str) {
    counter!(RUNS_STARTED, "workflow" => workflow.to_owned()).increment(1);
}

pub fn run_finished(workflow: &str, status: RunStatus) {
    counter!(RUNS_FINISHED, "workflow" => workflow.to_owned(), "status" => status.as_str())
        .increment(1);
    if matches!(status, RunStatus::Failed | RunStatus::TimedOut) {
        counter!(FAILURES, "workflow" => workflow.to_owned()).increment(1);
    }
}

/// A scheduled fire whose run could not start counts as a failure of its workflow.
pub fn fire_refused(workflow: &str) {
    counter!(FAILURES, "workflow" => workflow.to_owned()).increment(1);
}

pub fn step_finished(workflow: &str, step: &str, outcome: &'static str, took: Duration) {
    histogram!(STEP_DURATION, "workflow" => workflow.to_owned(), "step" => step.to_owned(),
        "outcome" => outcome)
    .record(took.as_secs_f64());
}

pub fn queue_depth(depth: i64) {
    gauge!(QUEUE_DEPTH).set(depth as f64);
}

pub fn claimed(took: Duration) {
    histogram!(CLAIM_DURATION).record(took.as_secs_f64());
}

pub fn notifications(pending: i64, failed: i64) {
    gauge!(NOTIFICATIONS_PENDING).set(pending as f64);
    gauge!(NOTIFICATIONS_FAILED).set(failed as f64);
}

pub fn fire_recorded(lag: Duration) {
    histogram!(SCHEDULER_LAG).record(lag.as_secs_f64());
}
