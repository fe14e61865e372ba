//! `POST /api/hooks/{path}`: a delivery to a workflow's webhook trigger (`crate::hooks`).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::auth::caller_with_role;
use super::error::{ApiError, Bytes, ErrorBody, ErrorCode, Json, Path, Query};
use super::{AppState, Logged};
use crate::auth::Role;
use crate::definition::{HookAuth, Respond};
use crate::hooks::{Delivery, HookError};

/// How soon a delivery that waits for its run first looks at it again; then twice as late
/// each time, up to [`WAIT_POLL_MAX`].
const WAIT_POLL: Duration = Duration::from_millis(25);
const WAIT_POLL_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HookReceipt {
    /// What names the delivery: Stripe's event id, `X-Event-Id`, the trigger's `dedupe_key`,
    /// or the SHA-256 of the body.
    pub event_id: String,
    pub run_id: String,
    /// Whether an earlier delivery of this event started the run.
    pub duplicate: bool,
    /// With `respond: {wait: ...}`, when the run ended in time: how.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<super::types::RunStatus>,
    /// With `respond: {wait: ...}`, when the run ended in time: its output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

/// Starts a run of the workflow whose webhook trigger has this path, with `{body, headers,
/// query}` as its input; one run per event, however often it is delivered.
#[utoipa::path(
    post,
    path = "/api/hooks/{path}",
    tag = "webhooks",
    params(("path" = String, Path, description = "The trigger's path (it may hold `/`)")),
    request_body(content = Value, description = "Any body; JSON becomes `input.body` as JSON"),
    security((), ("bearer" = [])),
    responses(
        (status = 202, description = "The run it started (or, waiting, one still going)", body = HookReceipt),
        (status = 200, description = "A repeated delivery, or the run ended while it waited", body = HookReceipt),
        (status = 400, description = "No event id where the trigger needs one", body = ErrorBody),
        (status = 401, description = "No valid signature or token", body = ErrorBody),
        (status = 404, description = "No trigger has this path", body = ErrorBody),
        (status = 409, description = "This event id came before with another body", body = ErrorBody),
    )
)]
pub async fn deliver_hook(
    State(state): State<AppState>,
    Path(path): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    Bytes(body): Bytes,
) -> Result<(StatusCode, Json<HookReceipt>), ApiError> {
    let hook = state.engine.hook(&path).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("no webhook trigger has the path {}", Logged(&path)),
        )
    })?;
    let delivery = Delivery {
        headers: headers
            .iter()
            .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
            .collect(),
        query: query
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
        body: &body,
        parsed: serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())),
    };
    match hook.trigger.auth {
        HookAuth::Bearer => {
            caller_with_role(&state, &headers, Role::Webhook).await?;
        }
        HookAuth::None => {}
        HookAuth::HmacSha256 | HookAuth::Stripe => {
            state
                .engine
                .check_hook_signature(&hook, &delivery)
                .await
                .map_err(hook_error)?;
        }
    }
    let (event_id, run_id, duplicate) = state
        .engine
        .receive_hook(&hook, &delivery)
        .await
        .map_err(hook_error)?;
    if !duplicate {
        tracing::info!(run = %run_id, hook = %Logged(&path), event = %Logged(&event_id),
            "run started by a webhook");
    }
    let mut receipt = HookReceipt {
        event_id,
        run_id,
        duplicate,
        status: None,
        output: None,
    };
    let mut status = if duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    if let Respond::Wait(limit) = hook.trigger.respond {
        let deadline = tokio::time::Instant::now() + limit.0;
        let mut poll = WAIT_POLL;
        loop {
            let run = state.engine.run(&receipt.run_id).await?;
            if run.summary.status.is_finished() {
                receipt.status = Some(run.summary.status.into());
                receipt.output = run.output;
                status = StatusCode::OK;
                break;
            }
            if tokio::time::Instant::now() + poll > deadline {
                break;
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(WAIT_POLL_MAX);
        }
    }
    Ok((status, Json(receipt)))
}

fn hook_error(e: HookError) -> ApiError {
    match e {
        HookError::Signature => ApiError::new(ErrorCode::Unauthorized, e.to_string()),
        HookError::NoStripeId | HookError::DedupeKey(_) => {
            ApiError::new(ErrorCode::InvalidBody, format!("request body: {e}"))
        }
        HookError::Engine(e) => e.into(),
    }
}
