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

use crate::steps::{Http, StepCall, StepKind, StepLog};

/// The secret notifications are signed with (`PUT /api/admin/secrets/notification_secret`).
pub const NOTIFICATION_SECRET: &str = "notification_secret";
/// How long a sender holds what it took: twice a delivery's 30 s timeout (a batch is sent all
/// at once, and a redirect is not followed, so no delivery takes longer).
const HOLD_MS: i64 = 60_000;
/// Notifications held and sent at once.
const BATCH: u32 = 16;
const IDLE: Duration = Duration::from_secs(1);
/// How often the pending and failed gauges are counted.
const COUNT_EVERY: Duration = Duration::from_secs(15);

/// What a receiver gets: `{event_id, workflow, run_id, status, started_at, finished_at, error?,
/// output?}`. An output over `NOTIFIED_OUTPUT_BYTES` (which the outbox does not keep) is left out,
/// with `output_omitted: true` and, under `--public-url`, `output_url`: the run in the API.
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
    match &notification.output {
        Some(output) if !notification.output_omitted => body["output"] = output.0.clone(),
        _ if notification.output_omitted => {
            body["output_omitted"] = true.into();
            if let Some(base) = public_url {
                let base = base.trim_end_matches('/');
                body["output_url"] = format!("{base}/api/runs/{}", notification.run_id).into();
            }
        }
        _ => {}
    }
    body
}

/// A signed POST: a run's notification, or a `notify` step's.
pub(crate) struct SignedPost<'a> {
    pub url: &'a str,
    /// The URL was rendered from a run's data: it is held to the egress rules for such URLs.
    pub url_from_run_data: bool,
    pub body: &'a Value,
    /// Sent as `X-Switchyard-Event-Id` and `Idempotency-Key`: the same on every delivery.
    pub event_id: &'a str,
    pub secret: Option<&'a str>,
    pub now_secs: i64,
    /// Where the request and its status are noted.
    pub log: StepLog,
}

/// POSTs `body` as JSON through the `http` kind (its egress rules, timeouts and error excerpts),
/// with `X-Switchyard-Signature` over the exact bytes sent when there is a secret. A redirect is
/// a failure: followed, it would turn the POST into a GET without its body.
pub(crate) async fn post_signed(http: &Http, post: SignedPost<'_>) -> Result<Value, StepFailure> {
    // reqwest serialises a JSON body with serde_json too: these are the bytes it sends.
    let bytes = serde_json::to_vec(post.body)
        .map_err(|e| StepFailure::permanent("invalid_parameters", e.to_string()))?;
    let mut headers = serde_json::Map::new();
    if let Some(secret) = post.secret {
        headers.insert(
            signature::HEADER.to_owned(),
            signature::sign(secret.as_bytes(), post.now_secs, &bytes).into(),
        );
    }
    headers.insert("x-switchyard-event-id".to_owned(), post.event_id.into());
    let with = json!({
        "method": "POST",
        "url": post.url,
        "headers": headers,
        "body": post.body,
        "timeout": "30s",
        "follow_redirects": false,
    });
    let call = StepCall {
        reads_run_data: if post.url_from_run_data {
            vec!["url".to_owned()]
        } else {
            Vec::new()
        },
        idempotency_key: post.event_id.to_owned(),
        log: post.log,
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
    let mut counted: Option<std::time::Instant> = None;
    while !*shutdown.borrow() {
        let sent = match send_due(&engine, &config).await {
            Ok(sent) => sent,
            Err(e) => {
                tracing::warn!(error = %e, "notifications could not be read");
                0
            }
        };
        if counted.is_none_or(|at| at.elapsed() >= COUNT_EVERY) {
            counted = Some(std::time::Instant::now());
            if let Ok((pending, failed)) = engine.store().notification_counts().await {
                switchyard_engine::metrics::notifications(pending, failed);
            }
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
        .for_each_concurrent(None, |notification| {
            let secret = secret.as_deref();
            let token = held.token.as_str();
            async move {
                let body = body(notification, public_url);
                let post = SignedPost {
                    url: &notification.url,
                    url_from_run_data: false,
                    body: &body,
                    event_id: &notification.event_id,
                    secret,
                    now_secs: engine.now() / 1_000,
                    log: StepLog::default(),
                };
                let result = post_signed(http, post)
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
