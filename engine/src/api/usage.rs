//! What steps spent at the services they call, per provider, workflow and day.

use axum::extract::State;
use serde::Deserialize;

use super::AppState;
use super::auth::Viewer;
use super::error::{ApiError, ErrorBody, ErrorCode, Json, Query};
use super::types::Usage;
use crate::store::UsageFilter;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Only this provider (`openai`, or what an `http` step names).
    pub provider: Option<String>,
    /// Only this workflow.
    pub workflow: Option<String>,
    /// From this day (`YYYY-MM-DD`, UTC), inclusive.
    pub from: Option<String>,
    /// Up to this day, inclusive.
    pub to: Option<String>,
    /// At most this many rows, 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

fn day(field: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        Some(text) if text.parse::<jiff::civil::Date>().is_err() || text.len() != 10 => {
            Err(ApiError::new(
                ErrorCode::InvalidQuery,
                format!("query `{field}`: {text:?} is not a day written YYYY-MM-DD"),
            ))
        }
        other => Ok(other),
    }
}

/// Requests, failures, tokens and cost (US dollars, at `vars.prices`), per provider, workflow
/// and UTC day, newest day first.
#[utoipa::path(
    get,
    path = "/api/usage",
    tag = "runs",
    params(UsageQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Usage, newest day first", body = Vec<Usage>),
        (status = 400, description = "A bad filter", body = ErrorBody),
    )
)]
pub async fn usage(
    _: Viewer,
    State(state): State<AppState>,
    Query(query): Query<UsageQuery>,
) -> Result<Json<Vec<Usage>>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::InvalidQuery,
            "query `limit`: from 1 to 1000",
        ));
    }
    let filter = UsageFilter {
        provider: query.provider,
        workflow_id: query.workflow,
        from: day("from", query.from)?,
        to: day("to", query.to)?,
        limit,
    };
    let rows = state.engine.usage(&filter).await?;
    Ok(Json(rows.into_iter().map(Usage::from).collect()))
}
