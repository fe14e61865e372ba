//! The scheduler: turns cron schedules into fires. Any number of schedulers may run against one
//! database; each computes the same fire times and the store's unique (workflow, fire time) key
//! lets exactly one of them start each fire, so none is a leader and a dead one delays nothing.

use std::sync::Arc;
use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use tokio::sync::watch;

use crate::definition::{CatchUp, Overlap, Schedule, Workflow};
use crate::plan::{Trigger, plan_run};
use crate::service::Engine;
use crate::state::Millis;
use crate::store::{FireOutcome, FireParams, SkippedFire};

/// A fire this much behind its time still counts as on time; older ones were missed while no
/// scheduler ran, and the catch-up policy decides them.
pub const ON_TIME_GRACE_MS: Millis = 5_000;
/// At most this many missed fires are looked at in one catch-up.
const MAX_CATCH_UP: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("invalid cron expression {expr:?}: {message}")]
    Cron { expr: String, message: String },
    #[error("unknown time zone {0:?}")]
    TimeZone(String),
}

/// A parsed schedule: the cron pattern in its time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    tz: TimeZone,
}

impl CronSchedule {
    pub fn parse(schedule: &Schedule) -> Result<Self, ScheduleError> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(&schedule.cron)
            .map_err(|e| ScheduleError::Cron {
                expr: schedule.cron.clone(),
                message: e.to_string(),
            })?;
        let tz = TimeZone::get(&schedule.timezone)
            .map_err(|_| ScheduleError::TimeZone(schedule.timezone.clone()))?;
        Ok(CronSchedule { cron, tz })
    }

    /// The first fire strictly after `after`.
    pub fn next_after(&self, after: Millis) -> Option<Millis> {
        let at = Timestamp::from_millisecond(after)
            .ok()?
            .to_zoned(self.tz.clone());
        self.cron
            .find_next_occurrence(&at, false)
            .ok()
            .map(|z| z.timestamp().as_millisecond())
    }

    /// Fires in `(after, until]`, oldest first; with more than `cap`, the newest `cap`.
    pub fn fires_between(&self, after: Millis, until: Millis, cap: usize) -> Vec<Millis> {
        let mut fires = std::collections::VecDeque::new();
        let mut cursor = after;
        while let Some(next) = self.next_after(cursor) {
            if next > until {
                break;
            }
            if fires.len() == cap {
                fires.pop_front();
            }
            fires.push_back(next);
            cursor = next;
        }
        fires.into()
    }
}

/// What to do with the fires that came due since the last recorded one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FirePlan {
    pub run: Vec<Millis>,
    pub skip: Vec<(Millis, String)>,
}

/// Applies the catch-up policy to due fires (oldest first).
pub fn plan_fires(due: &[Millis], now: Millis, catch_up: CatchUp) -> FirePlan {
    let mut plan = FirePlan::default();
    let (missed, on_time): (Vec<Millis>, Vec<Millis>) =
        due.iter().partition(|&&f| now - f > ON_TIME_GRACE_MS);
    let skip_reason = |policy: &str| format!("missed while no scheduler ran (catch_up: {policy})");
    match catch_up {
        CatchUp::All => plan.run.extend(missed),
        CatchUp::None => plan
            .skip
            .extend(missed.into_iter().map(|f| (f, skip_reason("none")))),
        CatchUp::Latest => {
            let keep = if on_time.is_empty() {
                missed.last().copied()
            } else {
                None
            };
            for f in missed {
                if Some(f) == keep {
                    plan.run.push(f);
                } else {
                    plan.skip.push((f, skip_reason("latest")));
                }
            }
        }
    }
    plan.run.extend(on_time);
    plan
}

/// Runs the scheduler until `shutdown` turns true.
pub async fn run_scheduler(
    engine: Arc<Engine>,
    heartbeats: Arc<crate::health::Heartbeats>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let wait = match tick(&engine).await {
            Ok(next) => {
                heartbeats
                    .scheduler_tick_at
                    .store(engine.now(), std::sync::atomic::Ordering::Relaxed);
                next.map(|at| (at - engine.now()).clamp(10, 60_000))
                    .unwrap_or(60_000)
            }
            Err(e) => {
                tracing::warn!(error = %e, "scheduler tick failed; retrying");
                1_000
            }
        };
        // A dropped sender means no one can ask us to stop any more: stop now.
        let stopped = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => false,
            changed = shutdown.changed() => changed.is_err(),
        };
        if stopped || *shutdown.borrow() {
            return;
        }
    }
}

/// Records every due fire of every scheduled workflow; returns the next fire time.
pub async fn tick(engine: &Engine) -> Result<Option<Millis>, crate::service::EngineError> {
    let now = engine.now();
    let mut next: Option<Millis> = None;
    for state in engine.workflows().await? {
        let workflow = engine.version(&state.id, state.latest_version).await?;
        let Some(schedule) = &workflow.schedule else {
            continue;
        };
        let cron = match CronSchedule::parse(schedule) {
            Ok(cron) => cron,
            Err(e) => {
                tracing::error!(workflow = %state.id, error = %e, "schedule does not parse");
                continue;
            }
        };
        let last = state.last_fire_at.unwrap_or(state.created_at);
        let due = cron.fires_between(last, now, MAX_CATCH_UP);
        let plan = plan_fires(&due, now, schedule.catch_up);
        for (fire_at, reason) in &plan.skip {
            let skipped = SkippedFire {
                workflow_id: &state.id,
                fire_at: *fire_at,
                reason,
                refused: false,
            };
            engine.store().skip_fire(skipped, now).await?;
        }
        for fire_at in plan.run {
            fire_one(engine, &workflow, state.latest_version, schedule, fire_at).await?;
        }
        if let Some(at) = cron.next_after(now) {
            next = Some(next.map_or(at, |n: Millis| n.min(at)));
        }
    }
    Ok(next)
}

async fn fire_one(
    engine: &Engine,
    workflow: &Workflow,
    version: i64,
    schedule: &Schedule,
    fire_at: Millis,
) -> Result<(), crate::service::EngineError> {
    let trigger = Trigger {
        scheduled_at: Some(fire_at),
        ..Trigger::default()
    };
    let mut run = match plan_run(workflow, version, serde_json::Value::Null, trigger) {
        Ok(run) => run,
        Err(e) => {
            // A scheduled run that cannot start is a failure of its workflow, not a quiet skip.
            let reason = e.to_string();
            tracing::warn!(workflow = %workflow.id, fire_at, reason = %reason, "fire refused");
            let refused = SkippedFire {
                workflow_id: &workflow.id,
                fire_at,
                reason: &reason,
                refused: true,
            };
            engine.store().skip_fire(refused, engine.now()).await?;
            return Ok(());
        }
    };
    // `queue`: a fire waits behind the run still going, as if the workflow's limit were one.
    if schedule.overlap == Overlap::Queue && run.concurrency.is_none() {
        run.concurrency = Some(crate::store::ConcurrencyGate {
            key: workflow.id.clone(),
            limit: 1,
        });
    }
    let outcome = engine
        .fire(FireParams {
            workflow_id: workflow.id.clone(),
            fire_at,
            skip_if_active: schedule.overlap == Overlap::Skip,
            run,
        })
        .await?;
    match &outcome {
        FireOutcome::Started(run) => {
            tracing::info!(workflow = %workflow.id, fire_at, run = %run, "schedule fired")
        }
        FireOutcome::Skipped(reason) => {
            tracing::info!(workflow = %workflow.id, fire_at, reason = %reason, "fire skipped")
        }
        FireOutcome::AlreadyRecorded => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Millis {
        text.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn schedule(cron: &str, tz: &str) -> CronSchedule {
        CronSchedule::parse(&Schedule {
            cron: cron.into(),
            timezone: tz.into(),
            overlap: Overlap::Skip,
            catch_up: CatchUp::Latest,
        })
        .unwrap()
    }

    fn fires(cron: &str, tz: &str, from: &str, to: &str) -> Vec<String> {
        schedule(cron, tz)
            .fires_between(at(from), at(to), 100)
            .into_iter()
            .map(|f| Timestamp::from_millisecond(f).unwrap().to_string())
            .collect()
    }

    #[test]
    fn five_and_six_field_crons_both_parse() {
        assert_eq!(
            fires(
                "0 8,16 * * *",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-01-02T00:00:00Z"
            ),
            ["2026-01-01T08:00:00Z", "2026-01-01T16:00:00Z"]
        );
        assert_eq!(
            fires(
                "*/20 * * * * *",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-01-01T00:01:00Z"
            ),
            [
                "2026-01-01T00:00:20Z",
                "2026-01-01T00:00:40Z",
                "2026-01-01T00:01:00Z"
            ]
        );
    }

    #[test]
    fn berlin_spring_gap_fire_runs_once_at_the_first_instant_after_the_gap() {
        // 2026-03-29: Europe/Berlin jumps from 02:00 to 03:00 (01:00Z).
        assert_eq!(
            fires(
                "30 2 * * *",
                "Europe/Berlin",
                "2026-03-28T12:00:00Z",
                "2026-03-30T12:00:00Z"
            ),
            ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]
        );
    }

    #[test]
    fn berlin_autumn_overlap_fires_once() {
        // 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice.
        assert_eq!(
            fires(
                "30 2 * * *",
                "Europe/Berlin",
                "2026-10-24T12:00:00Z",
                "2026-10-26T12:00:00Z"
            ),
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
        );
    }

    #[test]
    fn new_york_spring_and_autumn_changes_neither_skip_nor_double() {
        // 2026-03-08 02:00 EST → 03:00 EDT; 2026-11-01 02:00 EDT → 01:00 EST.
        assert_eq!(
            fires(
                "30 2 * * *",
                "America/New_York",
                "2026-03-07T12:00:00Z",
                "2026-03-09T12:00:00Z"
            ),
            ["2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"]
        );
        assert_eq!(
            fires(
                "30 1 * * *",
                "America/New_York",
                "2026-10-31T12:00:00Z",
                "2026-11-02T12:00:00Z"
            ),
            ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]
        );
    }

    #[test]
    fn hourly_schedule_keeps_firing_every_real_hour_across_a_change() {
        let got = fires(
            "0 * * * *",
            "Europe/Berlin",
            "2026-10-24T23:30:00Z",
            "2026-10-25T03:30:00Z",
        );
        assert_eq!(
            got,
            [
                "2026-10-25T00:00:00Z",
                "2026-10-25T01:00:00Z",
                "2026-10-25T02:00:00Z",
                "2026-10-25T03:00:00Z"
            ]
        );
    }

    #[test]
    fn catch_up_latest_runs_only_the_newest_missed_fire() {
        let plan = plan_fires(&[1_000, 2_000, 3_000], 100_000, CatchUp::Latest);
        assert_eq!(plan.run, [3_000]);
        assert_eq!(plan.skip.len(), 2);
    }

    #[test]
    fn catch_up_latest_prefers_an_on_time_fire() {
        let plan = plan_fires(&[1_000, 99_000], 100_000, CatchUp::Latest);
        assert_eq!(plan.run, [99_000]);
        assert_eq!(plan.skip.iter().map(|s| s.0).collect::<Vec<_>>(), [1_000]);
    }

    #[test]
    fn catch_up_none_skips_every_missed_fire_with_a_reason() {
        let plan = plan_fires(&[1_000, 2_000, 99_000], 100_000, CatchUp::None);
        assert_eq!(plan.run, [99_000]);
        assert!(plan.skip.iter().all(|(_, r)| r.contains("catch_up: none")));
    }

    #[test]
    fn catch_up_all_runs_every_missed_fire() {
        let plan = plan_fires(&[1_000, 2_000], 100_000, CatchUp::All);
        assert_eq!(plan.run, [1_000, 2_000]);
        assert!(plan.skip.is_empty());
    }
}
