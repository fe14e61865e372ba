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
/// `catch_up: all` starts at most this many missed fires, the newest; older ones are recorded as
/// skipped.
pub const MAX_CATCH_UP: usize = 1_000;
/// A tick records at most this many fires of a workflow, oldest first; a longer backlog goes on
/// at the next tick, which comes at once.
const FIRES_PER_TICK: usize = 1_000;

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

    /// The last fire strictly before `before`.
    pub fn previous_before(&self, before: Millis) -> Option<Millis> {
        // Fires fall on whole seconds: one strictly before `before` is at or before this second.
        let second = before.checked_sub(1)?.div_euclid(1_000) * 1_000;
        let at = Timestamp::from_millisecond(second)
            .ok()?
            .to_zoned(self.tz.clone());
        self.cron
            .find_previous_occurrence(&at, true)
            .ok()
            .map(|z| z.timestamp().as_millisecond())
    }

    /// The oldest `cap` fires in `(after, until]`, oldest first, and whether more follow.
    pub fn fires_between(&self, after: Millis, until: Millis, cap: usize) -> (Vec<Millis>, bool) {
        let mut fires = Vec::new();
        let mut cursor = after;
        while let Some(next) = self.next_after(cursor).filter(|&next| next <= until) {
            if fires.len() == cap {
                return (fires, true);
            }
            fires.push(next);
            cursor = next;
        }
        (fires, false)
    }

    /// The newest `cap` fires in `(after, until]`, newest first.
    pub fn newest_between(&self, after: Millis, until: Millis, cap: usize) -> Vec<Millis> {
        let mut fires = Vec::new();
        let mut cursor = until.saturating_add(1);
        while fires.len() < cap {
            match self.previous_before(cursor) {
                Some(fire) if fire > after => {
                    fires.push(fire);
                    cursor = fire;
                }
                _ => break,
            }
        }
        fires
    }
}

/// What becomes of a fire that came due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FireDecision {
    Run(Millis),
    /// Recorded as skipped, with the reason.
    Skip(Millis, String),
}

/// Where a backlog of due fires stands: what [`plan_fires`] needs beyond the fires of this tick.
#[derive(Debug, Clone, Default)]
pub struct Backlog {
    /// The newest missed fires not yet recorded, newest first, up to [`MAX_CATCH_UP`].
    pub newest_missed: Vec<Millis>,
    /// Whether a fire is due within [`ON_TIME_GRACE_MS`] of now.
    pub on_time: bool,
}

/// Applies the catch-up policy to due fires (oldest first, a page of a longer backlog maybe),
/// in their order: every fire is started or recorded as skipped with its reason.
pub fn plan_fires(
    due: &[Millis],
    now: Millis,
    catch_up: CatchUp,
    backlog: &Backlog,
) -> Vec<FireDecision> {
    let skip = |f: Millis, policy: &str| {
        FireDecision::Skip(
            f,
            format!("missed while no scheduler ran (catch_up: {policy})"),
        )
    };
    // `all` starts the newest MAX_CATCH_UP missed fires: those from the oldest of them on.
    let all_from = (backlog.newest_missed.len() == MAX_CATCH_UP)
        .then(|| backlog.newest_missed.last().copied())
        .flatten();
    // `latest` starts the newest missed fire, unless one is on time.
    let latest = (!backlog.on_time)
        .then(|| backlog.newest_missed.first().copied())
        .flatten();
    due.iter()
        .map(|&f| {
            if now - f <= ON_TIME_GRACE_MS {
                return FireDecision::Run(f);
            }
            match catch_up {
                CatchUp::All if all_from.is_none_or(|from| f >= from) => FireDecision::Run(f),
                CatchUp::All => FireDecision::Skip(
                    f,
                    format!(
                        "missed while no scheduler ran, with more than {MAX_CATCH_UP} fires \
                         missed: catch_up: all starts the newest {MAX_CATCH_UP}"
                    ),
                ),
                CatchUp::Latest if Some(f) == latest => FireDecision::Run(f),
                CatchUp::Latest => skip(f, "latest"),
                CatchUp::None => skip(f, "none"),
            }
        })
        .collect()
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
        let (due, more) = cron.fires_between(last, now, FIRES_PER_TICK);
        let missed_until = now - ON_TIME_GRACE_MS - 1;
        let backlog = Backlog {
            newest_missed: cron.newest_between(last, missed_until, MAX_CATCH_UP),
            on_time: !cron.newest_between(missed_until, now, 1).is_empty(),
        };
        // In time order: the newest recorded fire is where the next tick goes on from.
        for decision in plan_fires(&due, now, schedule.catch_up, &backlog) {
            match decision {
                FireDecision::Run(fire_at) => {
                    fire_one(engine, &workflow, state.latest_version, schedule, fire_at).await?
                }
                FireDecision::Skip(fire_at, reason) => {
                    let skipped = SkippedFire {
                        workflow_id: &state.id,
                        fire_at,
                        reason: &reason,
                        refused: false,
                    };
                    engine.store().skip_fire(skipped, now).await?;
                }
            }
        }
        let at = if more {
            Some(now)
        } else {
            cron.next_after(now)
        };
        if let Some(at) = at {
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
            .0
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

    /// The plan of `due` when they are the whole backlog.
    fn plan(due: &[Millis], now: Millis, catch_up: CatchUp) -> (Vec<Millis>, Vec<Millis>) {
        let missed: Vec<Millis> = due
            .iter()
            .rev()
            .copied()
            .filter(|&f| now - f > ON_TIME_GRACE_MS)
            .take(MAX_CATCH_UP)
            .collect();
        let backlog = Backlog {
            on_time: due.len() > missed.len(),
            newest_missed: missed,
        };
        let (mut run, mut skip) = (Vec::new(), Vec::new());
        for decision in plan_fires(due, now, catch_up, &backlog) {
            match decision {
                FireDecision::Run(f) => run.push(f),
                FireDecision::Skip(f, reason) => {
                    assert!(reason.contains("catch_up"), "{reason}");
                    skip.push(f)
                }
            }
        }
        (run, skip)
    }

    #[test]
    fn catch_up_latest_runs_only_the_newest_missed_fire() {
        let (run, skip) = plan(&[1_000, 2_000, 3_000], 100_000, CatchUp::Latest);
        assert_eq!(run, [3_000]);
        assert_eq!(skip, [1_000, 2_000]);
    }

    #[test]
    fn catch_up_latest_prefers_an_on_time_fire() {
        let (run, skip) = plan(&[1_000, 99_000], 100_000, CatchUp::Latest);
        assert_eq!(run, [99_000]);
        assert_eq!(skip, [1_000]);
    }

    #[test]
    fn catch_up_none_skips_every_missed_fire_with_a_reason() {
        let (run, skip) = plan(&[1_000, 2_000, 99_000], 100_000, CatchUp::None);
        assert_eq!(run, [99_000]);
        assert_eq!(skip, [1_000, 2_000]);
    }

    #[test]
    fn catch_up_all_runs_every_missed_fire() {
        let (run, skip) = plan(&[1_000, 2_000], 100_000, CatchUp::All);
        assert_eq!(run, [1_000, 2_000]);
        assert!(skip.is_empty());
    }

    #[test]
    fn catch_up_all_starts_the_newest_missed_fires_and_records_the_older_as_skipped() {
        let due: Vec<Millis> = (1..=MAX_CATCH_UP as Millis + 500)
            .map(|n| n * 1_000)
            .collect();
        let now = 10_000_000;
        let (run, skip) = plan(&due, now, CatchUp::All);
        assert_eq!(run, due[500..]);
        assert_eq!(skip, due[..500]);
    }

    #[test]
    fn a_backlog_is_read_in_pages_oldest_first_and_its_newest_fires_backwards_alike() {
        for (cron, tz, from, to) in [
            (
                "*/7 * * * *",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-01-03T00:00:00Z",
            ),
            (
                "30 * * * *",
                "Europe/Berlin",
                "2026-03-28T00:00:00Z",
                "2026-03-30T00:00:00Z",
            ),
            (
                "30 * * * *",
                "Europe/Berlin",
                "2026-10-24T00:00:00Z",
                "2026-10-26T00:00:00Z",
            ),
            (
                "0 */2 * * *",
                "America/New_York",
                "2026-11-01T00:00:00Z",
                "2026-11-02T12:00:00Z",
            ),
        ] {
            let s = schedule(cron, tz);
            let (from, to) = (at(from), at(to));
            let (all, more) = s.fires_between(from, to, 10_000);
            assert!(!more);
            let (page, more) = s.fires_between(from, to, 10);
            assert!(more, "{cron} {tz}");
            assert_eq!(page, all[..10], "{cron} {tz}");
            let (rest, _) = s.fires_between(page[9], to, 10_000);
            assert_eq!(rest, all[10..], "{cron} {tz}");
            let newest = s.newest_between(from, to, 10_000);
            let reversed: Vec<Millis> = all.iter().rev().copied().collect();
            assert_eq!(newest, reversed, "{cron} {tz}");
            assert_eq!(s.newest_between(from, to, 3), reversed[..3], "{cron} {tz}");
        }
    }
}
