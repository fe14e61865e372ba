//! Inbound webhooks: through `POST /api/webhooks/n8n` n8n starts runs and answers
//! the `n8n` steps that wait for it, and every authenticated delivery is logged in
//! `webhook_events` before it takes effect.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use super::auth::{Viewer, caller_with_role};
use super::error::{ApiError, Bytes, ErrorBody, ErrorCode, Json, Query};
use super::types::{Notification, NotificationStatus, WebhookEvent};
use super::{AppState, Logged};
use crate::auth::Role;
use crate::callback;
use crate::service::WebhookDelivery;
use crate::settings;
use crate::store::NewWebhookEvent;

/// The secret, set with `PUT /api/admin/secrets/n8n_webhook_secret`, that signs n8n's requests.
pub const N8N_SECRET: &str = "n8n_webhook_secret";
/// `sha256=` and the hex HMAC-SHA256 of the raw body under [`N8N_SECRET`].
pub const SIGNATURE_HEADER: &str = "x-switchyard-signature";
const MAX_EVENT_ID: usize = 200;

/// A delivery from n8n's HTTP Request node: either `workflow` (start a run with `input`) or
/// `callback` (answer an `n8n` step that waits, with `output` or `error`).
/// Other fields (n8n adds `executionId` and such) are kept in the event log and ignored.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct N8nEvent {
    /// Unique per delivery. A repeated id is answered with what the first delivery did, and
    /// does nothing again.
    #[schema(min_length = 1, max_length = 200)]
    pub event_id: String,
    /// The workflow to start.
    #[schema(min_length = 1)]
    pub workflow: Option<String>,
    /// The run's input.
    #[serde(default)]
    pub input: Value,
    /// The token an `n8n` step sent as `callback.token`.
    #[schema(min_length = 1)]
    pub callback: Option<String>,
    /// With `callback`: what the step succeeds with.
    #[serde(default)]
    pub output: Value,
    /// With `callback`: the step fails with this error instead (and is retried if its policy
    /// allows, calling n8n again).
    pub error: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookReceipt {
    pub event_id: String,
    /// The run the event started, or whose step it answered.
    pub run_id: String,
    /// Whether an earlier delivery with this id did it.
    pub duplicate: bool,
}

/// Starts a run for n8n, or hands n8n's result to the `n8n` step that waits for it.
/// Authenticated by an `X-Switchyard-Signature: sha256=<hex>` header (the HMAC-SHA256 of the
/// body under the secret `n8n_webhook_secret`), or a webhook key (`token create --role webhook`)
/// or an operator's token as `Authorization: Bearer`.
#[utoipa::path(
    post,
    path = "/api/webhooks/n8n",
    tag = "webhooks",
    request_body = N8nEvent,
    params(("x-switchyard-signature" = Option<String>, Header,
        description = "`sha256=` and the hex HMAC-SHA256 of the body under the secret `n8n_webhook_secret`")),
    security((), ("bearer" = [])),
    responses(
        (status = 201, description = "The run it started", body = WebhookReceipt),
        (status = 200, description = "A result the waiting step took, or a repeated delivery: what the first one did", body = WebhookReceipt),
        (status = 400, description = "A body that is not an event", body = ErrorBody),
        (status = 401, description = "No valid signature or token", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 409, description = "No step waits under this callback token (it timed out, was cancelled, or has its result)", body = ErrorBody),
    )
)]
pub async fn n8n_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    Bytes(body): Bytes,
) -> Result<(StatusCode, Json<WebhookReceipt>), ApiError> {
    authenticate(&state, &headers, &body).await?;
    // Parsed once: the value is what the log keeps, the event what it says.
    let payload: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("request body: {e}")))?;
    let event = N8nEvent::deserialize(&payload).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidBody,
            format!(
                "request body: {e} (expected {{event_id, workflow, input}} or \
                 {{event_id, callback, output or error}})"
            ),
        )
    })?;
    if event.event_id.is_empty() || event.event_id.len() > MAX_EVENT_ID {
        return Err(ApiError::new(
            ErrorCode::InvalidBody,
            format!("request body: `event_id` must be 1 to {MAX_EVENT_ID} bytes"),
        ));
    }
    let workflow = match (&event.workflow, &event.callback) {
        (Some(workflow), None) => Some(workflow.clone()),
        (None, Some(_)) => None,
        _ => {
            return Err(ApiError::new(
                ErrorCode::InvalidBody,
                "request body: give either `workflow` (to start a run) or `callback` (to answer \
                 a waiting step)",
            ));
        }
    };
    let step = match &event.callback {
        Some(token) => Some(callback::parse_token(token).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidBody,
                "request body: `callback` is not a token an n8n step sent",
            )
        })?),
        None => None,
    };
    let delivery = match (step, workflow) {
        (Some((run_id, step_id, token)), _) => WebhookDelivery::Answer {
            run_id: run_id.to_owned(),
            step_id: step_id.to_owned(),
            token: token.to_owned(),
            result: match event.error {
                Some(error) => serde_json::json!({ "event_id": event.event_id, "error": error }),
                None => serde_json::json!({ "event_id": event.event_id, "output": event.output }),
            },
        },
        (None, workflow) => WebhookDelivery::Start {
            workflow: workflow.expect("an event without a callback names its workflow"),
            input: event.input,
            known: None,
        },
    };
    let answer = matches!(delivery, WebhookDelivery::Answer { .. });
    let logged = NewWebhookEvent {
        source: "n8n".into(),
        event_id: event.event_id.clone(),
        workflow_id: event.workflow.clone(),
        payload,
        ..NewWebhookEvent::default()
    };
    let (run_id, repeated) = state.engine.receive_webhook(logged, delivery).await?;
    if answer {
        tracing::info!(run = %Logged(&run_id), event = %Logged(&event.event_id), "n8n answered a step");
    } else if !repeated {
        tracing::info!(run = %run_id, event = %Logged(&event.event_id), "run started by n8n");
    }
    let status = if answer || repeated {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(WebhookReceipt {
            event_id: event.event_id,
            run_id,
            duplicate: repeated,
        }),
    ))
}

/// A signature checks the body itself; a token is the other way in, for callers that cannot sign.
async fn authenticate(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let Some(signature) = headers.get(SIGNATURE_HEADER) else {
        if headers.contains_key(axum::http::header::AUTHORIZATION) {
            return caller_with_role(state, headers, Role::Webhook)
                .await
                .map(|_| ());
        }
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            format!(
                "this endpoint needs an `X-Switchyard-Signature: sha256=<hex>` header \
             (HMAC-SHA256 of the body under the secret {N8N_SECRET}) or a bearer token"
            ),
        ));
    };
    let signature = signature
        .to_str()
        .ok()
        .and_then(|s| s.strip_prefix("sha256="))
        .and_then(|hex| hex::decode(hex).ok())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "header X-Switchyard-Signature: expected `sha256=<hex>`",
            )
        })?;
    let values = settings::template_values(&state.engine).await?;
    let secret = values.secrets.get(N8N_SECRET).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unauthorized,
            format!(
                "no signature can match: the secret {N8N_SECRET} is not set \
             (PUT /api/admin/secrets/{N8N_SECRET})"
            ),
        )
    })?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.verify_slice(&signature).map_err(|_| {
        ApiError::new(
            ErrorCode::Unauthorized,
            "header X-Switchyard-Signature: does not match the body",
        )
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct NotificationQuery {
    /// Only notifications in this state.
    pub status: Option<NotificationStatus>,
    /// At most this many, newest first, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// Run notifications (the outbox), newest first: where each goes, its deliveries so far and
/// the last error; kept 30 days once delivered or given up.
#[utoipa::path(
    get,
    path = "/api/notifications",
    tag = "webhooks",
    params(NotificationQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Notifications", body = Vec<Notification>),
        (status = 400, description = "A bad filter", body = ErrorBody),
    )
)]
pub async fn list_notifications(
    _: Viewer,
    State(state): State<AppState>,
    Query(query): Query<NotificationQuery>,
) -> Result<Json<Vec<Notification>>, ApiError> {
    let limit = super::page_limit(query.limit)?;
    let found = state
        .engine
        .notifications(query.status.map(Into::into), limit)
        .await?;
    Ok(Json(found.into_iter().map(Notification::from).collect()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WebhookEventQuery {
    /// Only events from this source, such as `n8n`.
    pub source: Option<String>,
    /// At most this many, newest first, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// Inbound webhook deliveries, newest first, with the run each started or why it was refused;
/// kept for 30 days.
#[utoipa::path(
    get,
    path = "/api/webhook-events",
    tag = "webhooks",
    params(WebhookEventQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Events", body = Vec<WebhookEvent>),
        (status = 400, description = "A bad filter", body = ErrorBody),
    )
)]
pub async fn list_webhook_events(
    _: Viewer,
    State(state): State<AppState>,
    Query(query): Query<WebhookEventQuery>,
) -> Result<Json<Vec<WebhookEvent>>, ApiError> {
    let limit = super::page_limit(query.limit)?;
    let events = state
        .engine
        .webhook_events(query.source.as_deref(), limit)
        .await?;
    Ok(Json(events.into_iter().map(WebhookEvent::from).collect()))
}
