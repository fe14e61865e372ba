//! Webhook triggers: `POST /api/hooks/{path}` starts a run of the workflow whose `triggers`
//! name that path. This module finds the trigger, checks a delivery's signature, names the
//! delivery (its event id) and builds the run's input; `Engine::receive_webhook` then logs it
//! and starts the run in one transaction, once per event id.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::definition::{
    HookAuth, TemplateContext, WebhookTrigger, Workflow, WorkflowTrigger, render_str,
};
use crate::service::{Engine, EngineError, WebhookDelivery};
use crate::signature::{self, SignatureError};
use crate::store::{NewWebhookEvent, RunId};

/// How stale the index of hook paths may be: a workflow installed or removed is served, or no
/// longer, within this.
const INDEX_FOR: Duration = Duration::from_secs(1);
/// The longest event id kept as sent; a longer one is kept as its SHA-256.
const MAX_EVENT_ID: usize = 200;
/// Headers that authenticate a delivery: they stay out of the run's input.
const AUTH_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "stripe-signature",
    "x-signature",
    "x-switchyard-signature",
    "x-api-key",
    "x-hub-signature",
    "x-hub-signature-256",
    "x-gitlab-token",
];
/// The header a `hmac-sha256` delivery is signed in.
pub const HMAC_HEADER: &str = "x-signature";
pub const STRIPE_HEADER: &str = "stripe-signature";

/// A workflow's webhook trigger, as the latest version of the workflow defines it.
#[derive(Debug, Clone)]
pub struct Hook {
    pub workflow: Arc<Workflow>,
    /// The workflow's latest version when the index was read.
    pub version: i64,
    pub trigger: WebhookTrigger,
}

/// Paths to the workflows that serve them.
type HooksByPath = Arc<HashMap<String, Hook>>;

/// [`HooksByPath`], read again at most once per [`INDEX_FOR`].
#[derive(Default)]
pub(crate) struct HookIndex(Mutex<Option<(Instant, HooksByPath)>>);

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// Deliberately one message: a caller learns nothing about which check failed.
    #[error("signature: missing, malformed, stale, or not made with this endpoint's secret")]
    Signature,
    #[error("a Stripe event needs its `id` in the body")]
    NoStripeId,
    #[error("dedupe_key: {0}")]
    DedupeKey(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What came in, as the API read it.
pub struct Delivery<'a> {
    pub headers: Vec<(String, String)>,
    pub query: Map<String, Value>,
    pub body: &'a [u8],
    /// The body as JSON, or as text when it is not JSON.
    pub parsed: Value,
}

impl Delivery<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Engine {
    /// The webhook trigger served at `path`, if a workflow has one.
    pub async fn hook(&self, path: &str) -> Result<Option<Hook>, EngineError> {
        let index = {
            let cached = self.hooks().0.lock().expect("poisoned");
            cached
                .as_ref()
                .filter(|(at, _)| at.elapsed() < INDEX_FOR)
                .map(|(_, index)| index.clone())
        };
        let index = match index {
            Some(index) => index,
            None => {
                let fresh = Arc::new(self.read_hooks().await?);
                *self.hooks().0.lock().expect("poisoned") = Some((Instant::now(), fresh.clone()));
                fresh
            }
        };
        Ok(index.get(path).cloned())
    }

    /// Every webhook trigger, by path (the CLI's `hooks`).
    pub async fn hooks_by_path(&self) -> Result<BTreeMap<String, Hook>, EngineError> {
        Ok(self.read_hooks().await?.into_iter().collect())
    }

    async fn read_hooks(&self) -> Result<HashMap<String, Hook>, EngineError> {
        let mut index = HashMap::new();
        for overview in self.overviews(0).await? {
            for WorkflowTrigger::Webhook(trigger) in &overview.workflow.triggers {
                // Loading refuses a path two definitions claim; one installed through the API
                // over another's is served by the first in id order.
                index.entry(trigger.path.clone()).or_insert_with(|| Hook {
                    workflow: overview.workflow.clone(),
                    version: overview.state.latest_version,
                    trigger: trigger.clone(),
                });
            }
        }
        Ok(index)
    }

    /// Checks a signed delivery against its trigger's secret. `bearer` and `none` are the
    /// API's to check.
    pub async fn check_hook_signature(
        &self,
        hook: &Hook,
        delivery: &Delivery<'_>,
    ) -> Result<(), HookError> {
        let header = match hook.trigger.auth {
            HookAuth::HmacSha256 => HMAC_HEADER,
            HookAuth::Stripe => STRIPE_HEADER,
            HookAuth::Bearer | HookAuth::None => return Ok(()),
        };
        let name = hook.trigger.secret.as_deref().unwrap_or_default();
        let values = crate::settings::template_values(self)
            .await
            .map_err(EngineError::from)?;
        let Some(secret) = values.secrets.get(name) else {
            tracing::warn!(path = %hook.trigger.path, secret = name,
                "a delivery to a webhook trigger whose secret is not set was refused");
            return Err(HookError::Signature);
        };
        let signed = delivery.header(header).ok_or(HookError::Signature)?;
        let now = self.now() / 1_000;
        signature::verify(
            secret.as_bytes(),
            signed,
            delivery.body,
            now,
            signature::TOLERANCE_SECS,
        )
        .map_err(|e: SignatureError| {
            tracing::info!(path = %hook.trigger.path, reason = %e, "webhook delivery refused");
            HookError::Signature
        })
    }

    /// Starts the run an authenticated delivery asks for, once per event id; returns the run
    /// and whether an earlier delivery of the event started it.
    pub async fn receive_hook(
        &self,
        hook: &Hook,
        delivery: &Delivery<'_>,
    ) -> Result<(String, RunId, bool), HookError> {
        let input = hook_input(delivery);
        let event_id = event_id(hook, delivery, &input)?;
        let logged = NewWebhookEvent {
            source: format!("hook:{}", hook.trigger.path),
            event_id: event_id.clone(),
            workflow_id: Some(hook.workflow.id.clone()),
            payload: delivery.parsed.clone(),
            // Stripe signs its event ids, and sends one event again with fields that changed
            // (`pending_webhooks`): a signed id names the event whatever the body.
            id_names_event: hook.trigger.auth == HookAuth::Stripe,
            ..NewWebhookEvent::default()
        };
        let start = WebhookDelivery::Start {
            workflow: hook.workflow.id.clone(),
            input,
            known: Some((hook.version, hook.workflow.clone())),
        };
        let (run_id, repeated) = self.receive_webhook(logged, start).await?;
        Ok((event_id, run_id, repeated))
    }
}

/// The run's input: `{body, headers, query}`, without the headers that authenticate.
fn hook_input(delivery: &Delivery<'_>) -> Value {
    let headers: Map<String, Value> = delivery
        .headers
        .iter()
        .filter(|(name, _)| !AUTH_HEADERS.contains(&name.as_str()))
        .map(|(name, value)| (name.clone(), Value::String(value.clone())))
        .collect();
    serde_json::json!({
        "body": delivery.parsed,
        "headers": headers,
        "query": delivery.query,
    })
}

/// What names a delivery: Stripe's event `id`, the trigger's `dedupe_key`, an `X-Event-Id`
/// header where the body is not signed, or else the body itself (a replay is the same body).
/// A signed delivery is named only by what its signature covers: else whoever saw one could
/// replay it under new ids, each starting a run.
fn event_id(hook: &Hook, delivery: &Delivery<'_>, input: &Value) -> Result<String, HookError> {
    let signed = matches!(hook.trigger.auth, HookAuth::HmacSha256 | HookAuth::Stripe);
    let named = if hook.trigger.auth == HookAuth::Stripe {
        delivery.parsed["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or(HookError::NoStripeId)?
    } else if let Some(template) = &hook.trigger.dedupe_key {
        let ctx = TemplateContext {
            input: input.clone(),
            ..TemplateContext::default()
        };
        render_str(template, &ctx).map_err(|e| HookError::DedupeKey(e.to_string()))?
    } else if let Some(id) = delivery.header("x-event-id").filter(|_| !signed) {
        id.to_owned()
    } else {
        String::new()
    };
    Ok(if named.is_empty() {
        hex::encode(Sha256::digest(delivery.body))
    } else if named.len() > MAX_EVENT_ID {
        hex::encode(Sha256::digest(named.as_bytes()))
    } else {
        named
    })
}
