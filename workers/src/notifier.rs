//! The sender of run notifications. A run's end writes its notification to the outbox in the
//! same transaction (`machine::runs_ended`); every process running workers also runs a sender,
//! which holds due notifications (no other sender gets them meanwhile), POSTs each, signed, and
//! records the result: a 2xx delivers it, anything else is tried again later
//! (`machine::notification_update` decides when, and when to give up). A sender that dies while
//! holding some lets its hold lapse, and another sends them: at least once, with a stable
//! `event_id` for the receiver to drop repeats by.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use switchyard_engine::definition::Secrets;
use switchyard_engine::service::Engine;
use switchyard_engine::settings;
use switchyard_engine::signature;
use switchyard_engine::state::StepFailure;
use switchyard_engine::store::Notification;
use tokio::sync::watch;

use crate::steps::{Http, StepCall, StepKind};

/// The secret notifications are signed with (`PUT /api/admin/secrets/notification_secret`).
pub const NOTIFICATION_SECRET: &str = "notification_secret";
/// Outputs larger than this are replaced by a link to the run.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;
/// How long a sender holds what it took: twice a delivery's 30 s timeout.
const HOLD_MS: i64 = 60_000;
const BATCH: u32 = 64;
const AT_ONCE: usize = 16;
const IDLE: Duration = Duration::from_millis(500);

/// What a receiver gets: `{event_id, workflow, run_id, status, started_at, finished_at, error?,
/// output?}`, the output replaced by `output_url` (the run in the API) when over
/// [`MAX_OUTPUT_BYTES`].
pub fn body(notification: &Notification, public_url: Option<&str>) -> Value {
    let mut body = json!({
        "event_id": notification.event_id,
        "workflow": notification.workflow_id,
        "run_id": notification.run_id,
        "status": notification.run_status.as_str(),
        "started_at": notification.started_at,
        "finished_at": notification.finished_at,
    });
    if let Some(error) = &notification.run_error {
        body["error"] = error.clone().into();
    }
    if let Some(output) = &notification.output {
        let size = serde_json::to_vec(&output.0).map_or(usize::MAX, |b| b.len());
        if size <= MAX_OUTPUT_BYTES {
            body["output"] = output.0.clone();
        } else {
            let base = public_url.unwrap_or_default().trim_end_matches('/');
            body["output_url"] = format!("{base}/api/runs/{}", notification.run_id).into();
        }
    }
    body
}

/// POSTs `body` to `url` as JSON through the `http` kind (its egress rules, timeouts and error
/// excerpts), with `X-Switchyard-Signature` over the exact bytes sent when `secret` is given.
/// `url_from_run_data`: the URL was rendered from a run's data, and is held to the egress rules
/// for such URLs.
pub(crate) async fn post_signed(
    http: &Http,
    url: &str,
    url_from_run_data: bool,
    body: &Value,
    secret: Option<&str>,
    now_secs: i64,
) -> Result<Value, StepFailure> {
    // reqwest serialises a JSON body with serde_json too: these are the bytes it sends.
    let bytes = serde_json::to_vec(body)
        .map_err(|e| StepFailure::permanent("invalid_parameters", e.to_string()))?;
    let mut headers = serde_json::Map::new();
    if let Some(secret) = secret {
        headers.insert(
            signature::HEADER.to_owned(),
            signature::sign(secret.as_bytes(), now_secs, &bytes).into(),
        );
    }
    if let Some(event_id) = body.get("event_id").and_then(Value::as_str) {
        headers.insert("x-switchyard-event-id".to_owned(), event_id.into());
    }
    let with = json!({
        "method": "POST",
        "url": url,
        "headers": headers,
        "body": body,
        "timeout": "30s",
    });
    let call = StepCall {
        reads_run_data: if url_from_run_data {
            vec!["url".to_owned()]
        } else {
            Vec::new()
        },
        ..StepCall::first_attempt(with, Secrets::default())
    };
    match http.run(call).await? {
        crate::StepOutcome::Output(answer) => Ok(answer),
        other => unreachable!("the http step kind only answers with output, not {other:?}"),
    }
}

/// Where a sender sends from.
pub struct NotifierConfig {
    pub http: Http,
    /// The API's address as receivers reach it (`--public-url`), for links to runs.
    pub public_url: Option<String>,
    /// [`NOTIFICATION_SECRET`] from the environment (`SWITCHYARD_SECRET_NOTIFICATION_SECRET`),
    /// where the stored secret is not set: as for steps, the stored one wins.
    pub env_secret: Option<String>,
}

/// Sends due notifications until `shutdown`; publishes how many are pending and failed.
pub async fn run_notifier(
    engine: Arc<Engine>,
    config: NotifierConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    while !*shutdown.borrow() {
        let sent = match send_due(&engine, &config).await {
            Ok(sent) => sent,
            Err(e) => {
                tracing::warn!(error = %e, "notifications could not be read");
                0
            }
        };
        if let Ok((pending, failed)) = engine.store().notification_counts().await {
            switchyard_engine::metrics::notifications(pending, failed);
        }
        if sent < BATCH as usize {
            tokio::select! {
                _ = shutdown.changed() => {}
                () = tokio::time::sleep(IDLE) => {}
            }
        }
    }
}

/// Holds one batch of due notifications and delivers them; returns how many it held.
async fn send_due(
    engine: &Engine,
    config: &NotifierConfig,
) -> Result<usize, switchyard_engine::store::StoreError> {
    let (http, public_url) = (&config.http, config.public_url.as_deref());
    let held = engine
        .store()
        .hold_notifications(engine.now(), HOLD_MS, BATCH)
        .await?;
    if held.notifications.is_empty() {
        return Ok(0);
    }
    let values = settings::template_values(engine).await?;
    let secret = values
        .secrets
        .get(NOTIFICATION_SECRET)
        .or(config.env_secret.as_ref())
        .cloned();
    let count = held.notifications.len();
    futures::stream::iter(held.notifications.iter())
        .for_each_concurrent(AT_ONCE, |notification| {
            let secret = secret.as_deref();
            let token = held.token.as_str();
            async move {
                let body = body(notification, public_url);
                let now_secs = engine.now() / 1_000;
                let result = post_signed(http, &notification.url, false, &body, secret, now_secs)
                    .await
                    .map(|_| ())
                    .map_err(|failure| failure.message);
                match &result {
                    Ok(()) => tracing::info!(run = %notification.run_id,
                        event = %notification.event_id, "notification delivered"),
                    Err(error) => tracing::warn!(run = %notification.run_id,
                        event = %notification.event_id, %error, "notification not delivered"),
                }
                if let Err(e) = engine
                    .store()
                    .settle_notification(notification, token, result, engine.now())
                    .await
                {
                    // Its hold lapses and it is sent again: at least once.
                    tracing::warn!(error = %e, "a notification's delivery could not be recorded");
                }
            }
        })
        .await;
    Ok(count)
}
