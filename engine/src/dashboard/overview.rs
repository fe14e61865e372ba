//! The overview: counts, and charts of what a background sampler reads every few seconds (runs
//! started per second, success rate, queue depth, scheduler lag), and of spending per workflow
//! and day. The charts are drawn by uPlot in the browser from `/overview/series`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::Html;
use minijinja::context;
use serde::Serialize;

use super::error::DashboardError;
use super::render;
use super::session::Session;
use super::views::{AlertRow, RunRow};
use crate::api::AppState;
use crate::health::Heartbeats;
use crate::service::Engine;
use crate::state::{Millis, RunStatus};
use crate::store::{RunFilter, UsageFilter};

/// How often the sampler reads, and how many samples it keeps (half an hour).
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const KEPT: usize = 360;
/// Runs per second are those created in the last minute; the success rate is over runs created
/// in the last 15 minutes that ended.
const RATE_WINDOW: Millis = 60_000;
const SUCCESS_WINDOW: Millis = 15 * 60_000;
/// A scheduler that has not ticked for this long counts as lagging by as much.
const STUCK_AFTER: Millis = 120_000;

#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Sample {
    /// Seconds since the epoch, as uPlot's time axis takes them.
    at: f64,
    runs_per_second: f64,
    /// 0 to 100; `None` when no run ended in the window.
    success_rate: Option<f64>,
    queue_depth: i64,
    /// How late the newest schedule fire was recorded, in ms (or how long the scheduler has not
    /// ticked, past two minutes).
    scheduler_lag_ms: Option<i64>,
}

/// The samples of the last half hour, oldest first.
#[derive(Debug, Default)]
pub(super) struct Samples(Mutex<VecDeque<Sample>>);

impl Samples {
    fn push(&self, sample: Sample) {
        let mut samples = self.0.lock().expect("samples lock poisoned");
        if samples.len() == KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    fn all(&self) -> Vec<Sample> {
        self.0
            .lock()
            .expect("samples lock poisoned")
            .iter()
            .copied()
            .collect()
    }
}

async fn sample(engine: &Engine, heartbeats: &Heartbeats) -> Result<Sample, DashboardError> {
    let now = engine.now();
    let mut created = 0;
    for status in RunStatus::ALL {
        created += engine.count_runs(*status, Some(now - RATE_WINDOW)).await?;
    }
    let mut ended = 0;
    let mut succeeded = 0;
    for status in RunStatus::ALL.iter().filter(|s| s.is_finished()) {
        let n = engine
            .count_runs(*status, Some(now - SUCCESS_WINDOW))
            .await?;
        ended += n;
        if *status == RunStatus::Succeeded {
            succeeded += n;
        }
    }
    // How late the newest fire was recorded; while this process's scheduler has not ticked for
    // longer than that, how long it has not (a stuck scheduler records nothing to be late by).
    let fire_lag = engine
        .fires(None, 1)
        .await?
        .first()
        .map(|f| (f.recorded_at - f.fire_at).max(0));
    let lag = match (fire_lag, heartbeats.scheduler_tick()) {
        (Some(late), Some(tick)) if now - tick > STUCK_AFTER => Some(late.max(now - tick)),
        (None, Some(tick)) if now - tick > STUCK_AFTER => Some(now - tick),
        (late, _) => late,
    };
    Ok(Sample {
        at: now as f64 / 1000.0,
        runs_per_second: created as f64 / (RATE_WINDOW as f64 / 1000.0),
        success_rate: (ended > 0).then(|| succeeded as f64 * 100.0 / ended as f64),
        queue_depth: engine.queue_depth().await?,
        scheduler_lag_ms: lag,
    })
}

/// Samples into `samples` every few seconds until the dashboard holding them is dropped.
pub(super) fn spawn_sampler(
    engine: Arc<Engine>,
    heartbeats: Arc<Heartbeats>,
    samples: Weak<Samples>,
) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            let Some(samples) = samples.upgrade() else {
                return;
            };
            match sample(&engine, &heartbeats).await {
                Ok(s) => samples.push(s),
                Err(e) => tracing::debug!(error = %e, "dashboard sample skipped"),
            }
        }
    });
}

async fn counts(state: &AppState) -> Result<minijinja::Value, DashboardError> {
    let engine = &state.engine;
    let day_ago = engine.now() - 86_400_000;
    Ok(context! {
        running => engine.count_runs(RunStatus::Running, None).await?,
        pending => engine.count_runs(RunStatus::Pending, None).await?,
        succeeded_24h => engine.count_runs(RunStatus::Succeeded, Some(day_ago)).await?,
        failed_24h => engine.count_runs(RunStatus::Failed, Some(day_ago)).await?,
        queue_depth => engine.queue_depth().await?,
    })
}

/// `GET /`.
pub(super) async fn page(
    State(state): State<AppState>,
    session: Session,
) -> Result<Html<String>, DashboardError> {
    let engine = &state.engine;
    let now = engine.now();
    let recent: Vec<RunRow> = engine
        .runs(&RunFilter {
            limit: 10,
            ..RunFilter::default()
        })
        .await?
        .into_iter()
        .map(|r| RunRow::new(r, now))
        .collect();
    let alerts: Vec<AlertRow> = engine
        .alerts(None, 5)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    render::page(
        &session,
        "overview.html",
        "overview",
        context! {
            counts => counts(&state).await?,
            recent => render::ser(&recent),
            alerts => render::ser(&alerts),
            workflows => engine.workflows().await?.len(),
        },
    )
}

/// `GET /overview/cards`: the counts, refreshed by htmx.
pub(super) async fn cards(
    State(state): State<AppState>,
    session: Session,
) -> Result<Html<String>, DashboardError> {
    render::fragment(
        &session,
        "cards.html",
        context! { counts => counts(&state).await? },
    )
}

#[derive(Debug, Serialize)]
pub(super) struct Series {
    samples: Vec<Sample>,
    /// Days, oldest first, and per workflow its spending on each of them (US dollars).
    days: Vec<String>,
    spend: BTreeMap<String, Vec<f64>>,
}

/// `GET /overview/series`: what the charts draw.
pub(super) async fn series(
    State(state): State<AppState>,
    _: Session,
) -> Result<Json<Series>, DashboardError> {
    let today = jiff::Timestamp::from_millisecond(state.engine.now())
        .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).date())
        .unwrap_or_default();
    let from = today
        .checked_sub(jiff::Span::new().days(13))
        .unwrap_or(today);
    let usage = state
        .engine
        .usage(&UsageFilter {
            from: Some(from.to_string()),
            limit: 1000,
            ..UsageFilter::default()
        })
        .await?;
    let days: BTreeSet<String> = usage.iter().map(|u| u.day.clone()).collect();
    let days: Vec<String> = days.into_iter().collect();
    let mut spend: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for u in &usage {
        let at = days.iter().position(|d| *d == u.day).unwrap_or(0);
        spend
            .entry(u.workflow_id.clone())
            .or_insert_with(|| vec![0.0; days.len()])[at] += u.cost;
    }
    Ok(Json(Series {
        samples: state.dashboard.samples.all(),
        days,
        spend,
    }))
}
