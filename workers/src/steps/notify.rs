//! `notify`: the signed POST of run notifications, from inside a run
//! (`with: { url, body, secret }`). The body goes as JSON with an `event_id` (the step's
//! idempotency key, the same on every attempt, so a receiver drops repeats by it) and, with a
//! `secret`, `X-Switchyard-Signature: t=...,v1=<hex HMAC-SHA256 of "t.body">`. Succeeds with
//! `{status, headers, body}` on a 2xx; fails as `http` does otherwise.

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use switchyard_engine::state::StepFailure;

use super::{Http, StepCall, StepKind, StepOutcome, StepResult, parse_with, with_schema};
use crate::notifier::{SignedPost, post_signed};

pub struct Notify {
    http: Http,
}

impl Notify {
    pub fn new(http: Http) -> Self {
        Notify { http }
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NotifyWith {
    /// Where to POST.
    url: String,
    /// What to send: an object gets `event_id` added unless it has one.
    #[schemars(with = "Option<serde_json::Value>")]
    body: Option<Value>,
    /// Signs the body: `{{ secrets.notification_secret }}`, or another secret.
    secret: Option<String>,
}

#[async_trait]
impl StepKind for Notify {
    fn name(&self) -> &'static str {
        "notify"
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["secret"]
    }

    fn with_schema(&self) -> Value {
        with_schema::<NotifyWith>()
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let with: NotifyWith = parse_with("notify", &call.with)?;
        let mut body = with.body.unwrap_or(Value::Null);
        if body.is_null() {
            body = Value::Object(Default::default());
        }
        if let Value::Object(fields) = &mut body {
            fields
                .entry("event_id")
                .or_insert_with(|| call.idempotency_key.clone().into());
        }
        let url_from_run_data = call.reads_run_data("url");
        if url_from_run_data && with.secret.is_some() {
            // Else whoever chooses a run's input could have any body of theirs signed, sent to
            // them, and replayed to a real receiver within the signature's tolerance.
            return Err(StepFailure::permanent(
                "invalid_parameters",
                "notify step: a signed notification goes only to a `url` the definition names, \
                 not one rendered from the run's input or step outputs",
            ));
        }
        let secret = match &with.secret {
            Some(reference) => Some(call.secrets.reveal(reference).map_err(|e| {
                StepFailure::permanent("invalid_parameters", format!("notify step: secret: {e}"))
            })?),
            None => None,
        };
        let post = SignedPost {
            url: &with.url,
            url_from_run_data,
            body: &body,
            event_id: &call.idempotency_key,
            secret: secret.as_deref(),
            now_secs: jiff::Timestamp::now().as_second(),
            log: call.log.clone(),
        };
        post_signed(&self.http, post).await.map(StepOutcome::Output)
    }
}
