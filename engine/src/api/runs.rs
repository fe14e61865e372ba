//! Runs: list and filter with cursor pagination, show with steps and attempts, cancel, retry.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt, stream};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::{Operator, Viewer, caller_with_role};
use super::error::{ApiError, ErrorBody, ErrorCode, Json, Path, Query};
use super::types::{Alert, LogLine, RunDetail, RunStatus, RunSummary};
use crate::state::Millis;
use crate::store::RunFilter;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RunQuery {
    /// Only runs of this workflow.
    pub workflow: Option<String>,
    /// Only runs in this state.
    pub status: Option<RunStatus>,
    /// Only runs created at or after this time (ms since the epoch).
    pub created_after: Option<Millis>,
    /// Only runs created before this time (ms since the epoch).
    pub created_before: Option<Millis>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunPage {
    /// Newest first.
    pub runs: Vec<RunSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A cursor names the last run of a page, by its place in the order (creation time, id).
fn encode_cursor(run: &RunSummary) -> String {
    format!("{}.{}", run.created_at, run.id)
}

fn decode_cursor(cursor: &str) -> Result<(Millis, String), ApiError> {
    cursor
        .split_once('.')
        .and_then(|(at, id)| Some((at.parse().ok()?, id.to_owned())))
        .filter(|(_, id)| !id.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidQuery,
                "query string: `cursor` is not a cursor this API returned",
            )
        })
}

/// Lists runs, newest first, filtered by workflow, status and creation time.
#[utoipa::path(
    get,
    path = "/api/runs",
    tag = "runs",
    params(RunQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of runs", body = RunPage),
        (status = 400, description = "A bad filter or cursor", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
    )
)]
pub async fn list_runs(
    _: Viewer,
    State(state): State<AppState>,
    Query(query): Query<RunQuery>,
) -> Result<Json<RunPage>, ApiError> {
    let limit = super::page_limit(query.limit)?;
    let filter = RunFilter {
        workflow_id: query.workflow,
        status: query.status.map(Into::into),
        created_after: query.created_after,
        created_before: query.created_before,
        after_cursor: query.cursor.as_deref().map(decode_cursor).transpose()?,
        // One more than the page tells whether another page follows.
        limit: limit + 1,
    };
    let mut runs: Vec<RunSummary> = state
        .engine
        .runs(&filter)
        .await?
        .into_iter()
        .map(RunSummary::from)
        .collect();
    let next_cursor = if runs.len() > limit as usize {
        runs.truncate(limit as usize);
        runs.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Json(RunPage { runs, next_cursor }))
}

/// A run with its steps, their attempts, errors and timings.
#[utoipa::path(
    get,
    path = "/api/runs/{id}",
    tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The run", body = RunDetail),
        (status = 404, description = "No such run", body = ErrorBody),
    )
)]
pub async fn show_run(
    _: Viewer,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunDetail>, ApiError> {
    Ok(Json(state.engine.run(&id).await?.into()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// `next_after` of the previous page: only lines stored after it.
    pub after: Option<i64>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LogPage {
    /// In the order the steps printed them.
    pub lines: Vec<LogLine>,
    /// Pass as `after` for the lines stored since; the same as given when there are none yet.
    pub next_after: Option<i64>,
}

/// What the run's steps printed (a script's output, each request and its status), attempt by
/// attempt; poll with `after` to follow a run.
#[utoipa::path(
    get,
    path = "/api/runs/{id}/logs",
    tag = "runs",
    params(("id" = String, Path, description = "Run id"), LogQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Lines of the run's steps", body = LogPage),
        (status = 400, description = "A query parameter out of range", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
    )
)]
pub async fn run_logs(
    _: Viewer,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<Json<LogPage>, ApiError> {
    let limit = super::page_limit(query.limit)?;
    let lines = state.engine.step_logs(&id, query.after, limit).await?;
    if lines.is_empty() {
        // No lines (yet), or no such run: only the second is an error.
        state.engine.run_summary(&id).await?;
    }
    let next_after = lines.last().map(|l| l.id).or(query.after);
    Ok(Json(LogPage {
        lines: lines.into_iter().map(Into::into).collect(),
        next_after,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FollowQuery {
    /// Only lines stored after this one (`id` of a line, or `next_after`).
    pub after: Option<i64>,
}

/// How often a follower looks for new lines.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// How often a follow checks its caller's token again.
const FOLLOW_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// How long one stream lasts at most: a run may wait for days, and a token may be revoked
/// meanwhile. The client reconnects with `Last-Event-ID` and is authorised again.
const FOLLOW_AT_MOST: std::time::Duration = std::time::Duration::from_secs(600);

/// The run's log lines as they come, as server-sent events: each event's `data` is one line
/// (`LogLine`) and its `id` the line's, so a client that reconnects goes on after it
/// (`Last-Event-ID`, or `after`). The stream ends once the run has ended and its last lines are
/// sent.
#[utoipa::path(
    get,
    path = "/api/runs/{id}/logs/follow",
    tag = "runs",
    params(("id" = String, Path, description = "Run id"), FollowQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Server-sent events, one a line", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such run", body = ErrorBody),
    )
)]
pub async fn follow_run_logs(
    _: Viewer,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    Query(query): Query<FollowQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    state.engine.run_summary(&id).await?;
    let resumed = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let until = tokio::time::Instant::now() + FOLLOW_AT_MOST;
    let engine = state.engine.clone();
    let start = (engine, id, resumed.or(query.after), false);
    let checked = tokio::time::Instant::now();
    let lines = stream::unfold(
        (start, checked),
        move |((engine, id, after, ended), mut checked)| {
            let (state, headers) = (state.clone(), headers.clone());
            async move {
                if ended || tokio::time::Instant::now() >= until {
                    return None;
                }
                loop {
                    // A token revoked, or a login whose user changed, ends the stream as it would end
                    // any other request.
                    if checked.elapsed() >= FOLLOW_RECHECK {
                        if let Err(refused) =
                            caller_with_role(&state, &headers, crate::auth::Role::Viewer).await
                        {
                            let event = Event::default().event("error").data(refused.message);
                            return Some((vec![Ok(event)], ((engine, id, after, true), checked)));
                        }
                        checked = tokio::time::Instant::now();
                    }
                    // The status first: lines stored before the run ended are then all read below. A
                    // database that fails ends the stream with an `error` event, not as if the run had.
                    let read = async {
                        let finished = engine.run_summary(&id).await?.status.is_finished();
                        Ok::<_, crate::service::EngineError>((
                            finished,
                            engine.step_logs(&id, after, 500).await?,
                        ))
                    };
                    let (finished, lines) = match read.await {
                        Ok(read) => read,
                        Err(e) => {
                            let event = Event::default().event("error").data(e.to_string());
                            return Some((vec![Ok(event)], ((engine, id, after, true), checked)));
                        }
                    };
                    if let Some(last) = lines.last().map(|l| l.id) {
                        let events: Vec<Result<Event, Infallible>> = lines
                            .into_iter()
                            .map(|line| {
                                let id = line.id.to_string();
                                let line = LogLine::from(line);
                                Ok(Event::default()
                                    .id(id)
                                    .json_data(&line)
                                    .unwrap_or_else(|_| Event::default()))
                            })
                            .collect();
                        return Some((events, ((engine, id, Some(last), false), checked)));
                    }
                    if finished || tokio::time::Instant::now() >= until {
                        return None;
                    }
                    tokio::time::sleep(FOLLOW_EVERY).await;
                }
            }
        },
    );
    Ok(Sse::new(lines.flat_map(stream::iter)).keep_alive(KeepAlive::default()))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunState {
    pub run_id: String,
    pub status: RunStatus,
}

/// Cancels a run and its child runs; running steps stop within one heartbeat.
#[utoipa::path(
    post,
    path = "/api/runs/{id}/cancel",
    tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The run's status: cancelled, or how it had already ended", body = RunState),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
    )
)]
pub async fn cancel_run(
    Operator(caller): Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunState>, ApiError> {
    let status = state.engine.cancel(&id).await?;
    tracing::info!(run = %super::Logged(&id), by = %super::Logged(&caller.sub), "run cancelled over the API");
    Ok(Json(RunState {
        run_id: id,
        status: status.into(),
    }))
}

/// A signal's payload.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// Becomes the output of the `wait` step (default null).
    #[serde(default)]
    pub payload: serde_json::Value,
}

/// Sends a signal to the run's `wait` step that waits for it: a parked step wakes, one that has
/// not parked yet keeps it. A step takes one signal.
#[utoipa::path(
    post,
    path = "/api/runs/{id}/signals/{name}",
    tag = "runs",
    params(
        ("id" = String, Path, description = "Run id"),
        ("name" = String, Path, description = "The signal a `wait` step of the run waits for"),
    ),
    request_body = SignalBody,
    security(("bearer" = [])),
    responses(
        (status = 204, description = "The step has the signal"),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No such run, or no step of it waits for this signal", body = ErrorBody),
        (status = 409, description = "The step took a signal already (`conflict`), or waits no more: it finished, or timed out (`not_waiting`)", body = ErrorBody),
        (status = 422, description = "A payload that cannot be stored", body = ErrorBody),
    )
)]
pub async fn signal_run(
    Operator(caller): Operator,
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    Json(body): Json<SignalBody>,
) -> Result<axum::http::StatusCode, ApiError> {
    state.engine.signal(&id, &name, body.payload).await?;
    tracing::info!(run = %super::Logged(&id), signal = %super::Logged(&name), by = %super::Logged(&caller.sub), "signal sent over the API");
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Re-runs a failed, cancelled or timed-out run's unsuccessful steps; succeeded steps keep
/// their outputs.
#[utoipa::path(
    post,
    path = "/api/runs/{id}/retry",
    tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The run is running again", body = RunState),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run has not ended unsuccessfully", body = ErrorBody),
    )
)]
pub async fn retry_run(
    Operator(caller): Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunState>, ApiError> {
    state.engine.retry(&id).await?;
    tracing::info!(run = %super::Logged(&id), by = %super::Logged(&caller.sub), "run retried over the API");
    Ok(Json(RunState {
        run_id: id,
        status: RunStatus::Running,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AlertQuery {
    /// Only alerts of this workflow.
    pub workflow: Option<String>,
    /// At most this many, newest first, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// Runs that failed or timed out, newest first, kept for 30 days.
#[utoipa::path(
    get,
    path = "/api/alerts",
    tag = "runs",
    params(AlertQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Alerts", body = Vec<Alert>),
        (status = 400, description = "A bad filter", body = ErrorBody),
    )
)]
pub async fn list_alerts(
    _: Viewer,
    State(state): State<AppState>,
    Query(query): Query<AlertQuery>,
) -> Result<Json<Vec<Alert>>, ApiError> {
    let limit = super::page_limit(query.limit)?;
    let alerts = state
        .engine
        .alerts(query.workflow.as_deref(), limit)
        .await?;
    Ok(Json(alerts.into_iter().map(Alert::from).collect()))
}
