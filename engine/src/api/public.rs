//! What anyone may ask: health and public statistics.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

use super::error::{ApiError, ErrorCode, Json};
use super::{AppState, Observability};
use crate::state::{Millis, RunStatus};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`, or `unavailable` when the database does not answer or cannot write.
    pub status: &'static str,
    /// `ok`, or what is wrong with the database: `does not answer: ...`, `cannot write: ...`.
    pub database: String,
    pub scheduler: SchedulerHealth,
    /// Jobs claimable now that no worker has taken; absent when the database did not answer.
    pub queue_depth: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SchedulerHealth {
    /// Whether this process runs a scheduler.
    pub running: bool,
    /// Milliseconds since its last tick.
    pub last_tick_ms_ago: Option<Millis>,
    /// False when it has not ticked for two minutes.
    pub alive: Option<bool>,
}

impl From<crate::health::Health> for Health {
    fn from(health: crate::health::Health) -> Self {
        let (status, database) = match health.database.problem() {
            None => ("ok", "ok".to_owned()),
            Some(problem) => ("unavailable", problem),
        };
        Health {
            status,
            database,
            scheduler: SchedulerHealth {
                running: health.scheduler_tick_ms_ago.is_some(),
                last_tick_ms_ago: health.scheduler_tick_ms_ago,
                alive: health.scheduler_alive(),
            },
            queue_depth: health.database.queue_depth(),
        }
    }
}

/// 200 when the database answers and takes writes, 503 with the cause otherwise (within about
/// a second, whatever the database does); with the scheduler's liveness and the queue depth.
#[utoipa::path(
    get,
    path = "/health",
    tag = "public",
    responses(
        (status = 200, description = "Healthy", body = Health),
        (status = 503, description = "The database does not answer or cannot write", body = Health),
    )
)]
pub async fn health(State(state): State<Observability>) -> (StatusCode, Json<Health>) {
    let health = state.engine.health(&state.heartbeats).await;
    let status = match health.database.problem() {
        None => StatusCode::OK,
        Some(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, Json(health.into()))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Stats {
    pub workflows: usize,
    pub scheduled_workflows: usize,
    /// Runs going now.
    pub runs_running: i64,
    pub runs_pending: i64,
    /// Runs created in the last 24 hours that ended, by how.
    pub runs_succeeded_24h: i64,
    pub runs_failed_24h: i64,
}

const DAY_MS: Millis = 86_400_000;

/// Public statistics: how many workflows there are and how runs went in the last day.
#[utoipa::path(
    get,
    path = "/api/stats",
    tag = "public",
    responses((status = 200, description = "Statistics", body = Stats))
)]
pub async fn stats(State(state): State<AppState>) -> Result<Json<Stats>, ApiError> {
    let engine = &state.engine;
    let day_ago = engine.now() - DAY_MS;
    let workflows = engine.workflows().await?;
    let mut scheduled = 0;
    for w in &workflows {
        if engine
            .version(&w.id, w.latest_version)
            .await?
            .schedule
            .is_some()
        {
            scheduled += 1;
        }
    }
    Ok(Json(Stats {
        workflows: workflows.len(),
        scheduled_workflows: scheduled,
        runs_running: engine.count_runs(RunStatus::Running, None).await?,
        runs_pending: engine.count_runs(RunStatus::Pending, None).await?,
        runs_succeeded_24h: engine
            .count_runs(RunStatus::Succeeded, Some(day_ago))
            .await?,
        runs_failed_24h: engine.count_runs(RunStatus::Failed, Some(day_ago)).await?,
    }))
}

/// Prometheus text format: runs started, finished and failed (`workflow_failures_total`), step
/// durations, queue depth, claim latency and scheduler lag, as this process saw them.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "public",
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"),
        (status = 404, description = "This process exports no metrics", body = super::error::ErrorBody),
    )
)]
pub async fn metrics(
    State(state): State<Observability>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let Some(handle) = &state.metrics else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "this process exports no metrics",
        ));
    };
    if let Ok(depth) = state.engine.queue_depth().await {
        crate::metrics::queue_depth(depth);
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response())
}
