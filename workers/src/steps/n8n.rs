//! `n8n`: the outbound half of the n8n bridge. Posts `{run_id, step_id, input}` to an n8n
//! Webhook trigger (`with: { url | webhook, input, headers, wait, timeout, callback_url }`), or
//! to the `$execution.resumeUrl` of an execution waiting in a Wait node (`with.resume_url`).
//!
//! Without `wait`, the step succeeds with the body n8n answers. With `wait: true` the body also
//! carries `callback: {url, token}`, and the step parks, its worker slot free, until n8n posts
//! `{event_id, callback: TOKEN, output}` (or `error`) to `/api/webhooks/n8n`, or until `timeout`
//! (default 1h) has passed. The step then succeeds with `output`, or fails, retryably, with the
//! error or the timeout; a retry calls n8n again under a new token.
//!
//! The token is stored before n8n is called (a first, instant park), so that an answer arriving
//! before the step has parked is kept (`Store::deliver_callback`). n8n is called at least once per
//! attempt: a worker that dies between the call and the park calls again on the next attempt.

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchyard_engine::callback::{self, N8N_CALLBACK_PATH};
use switchyard_engine::state::StepFailure;

use std::sync::Arc;

use super::{Http, StepCall, StepKind, StepOutcome, StepResult, parse_with, with_schema};
use crate::egress::EgressPolicy;

const DEFAULT_TIMEOUT: &str = "1h";

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct N8nWith {
    /// The URL of an n8n Webhook trigger.
    url: Option<String>,
    /// The path of an n8n Webhook trigger: calls `{--n8n-url}/webhook/{webhook}`.
    webhook: Option<String>,
    /// An n8n execution's `$execution.resumeUrl`: resumes it where it waits in a Wait node
    /// ("Resume: On Webhook Call"); n8n's answer is the output.
    resume_url: Option<String>,
    /// Sent as `input` in the body.
    #[schemars(with = "Option<serde_json::Value>")]
    input: Option<Value>,
    /// Headers to send; values may reference secrets.
    #[serde(default)]
    #[schemars(schema_with = "super::http::header_values")]
    headers: Option<Map<String, Value>>,
    /// Park until n8n calls back (or `timeout` passes) instead of taking its first answer.
    wait: Option<bool>,
    /// With `wait`, how long n8n may take to call back (default 1h).
    #[schemars(extend("format" = "duration"))]
    timeout: Option<String>,
    /// With `wait`, where n8n calls back instead of `--public-url`'s `/api/webhooks/n8n`: a URL,
    /// or a path under `--public-url`.
    callback_url: Option<String>,
}

/// The two addresses of the bridge: n8n's, and the API's as n8n reaches it.
#[derive(Debug, Clone, Default)]
pub struct N8nUrls {
    /// n8n's base URL (`--n8n-url`), for `with.webhook`.
    pub n8n: Option<String>,
    /// The API's address as n8n reaches it (`--public-url`), for the callback URL.
    pub public: Option<String>,
}

pub struct N8n {
    http: Http,
    urls: N8nUrls,
}

impl N8n {
    pub fn new(urls: N8nUrls) -> Self {
        N8n::with_policy(urls, Default::default())
    }

    /// Calls n8n under the egress policy `policy`, like the `http` kind.
    pub fn with_policy(urls: N8nUrls, policy: Arc<EgressPolicy>) -> Self {
        let base = |u: Option<String>| u.map(|u| u.trim_end_matches('/').to_owned());
        N8n {
            http: Http::with_policy(policy),
            urls: N8nUrls {
                n8n: base(urls.n8n),
                public: base(urls.public),
            },
        }
    }

    fn callback_url(&self, with: &N8nWith) -> Result<String, StepFailure> {
        let path = match &with.callback_url {
            Some(path) if path.starts_with('/') => path.as_str(),
            Some(url) => return Ok(url.clone()),
            None => N8N_CALLBACK_PATH,
        };
        match &self.urls.public {
            Some(base) => Ok(format!("{base}{path}")),
            None => Err(invalid(format!(
                "n8n step: `wait: true` needs the address n8n calls back ({path}): start the \
                 worker with --public-url (SWITCHYARD_PUBLIC_URL) or set `with.callback_url` to \
                 a full URL"
            ))),
        }
    }

    /// Where the call goes: exactly one of `url`, `webhook` and `resume_url`.
    fn target(&self, with: &N8nWith) -> Result<Target, StepFailure> {
        match (&with.url, &with.webhook, &with.resume_url) {
            (Some(url), None, None) => Ok(Target::Webhook(url.clone())),
            (None, Some(path), None) if !webhook_path(path) => Err(invalid(format!(
                "n8n step: `webhook: {path}` is not a Webhook trigger's path: `[A-Za-z0-9_-]` \
                 segments separated by `/`"
            ))),
            (None, Some(path), None) => match &self.urls.n8n {
                Some(base) => Ok(Target::Webhook(format!("{base}/webhook/{path}"))),
                None => Err(invalid(format!(
                    "n8n step: `webhook: {path}` is a path in n8n, and this worker does not know \
                     where n8n is: start it with --n8n-url (SWITCHYARD_N8N_URL), n8n's base URL"
                ))),
            },
            (None, None, Some(url)) => Ok(Target::Resume(url.clone())),
            _ => Err(invalid(
                "n8n step: give exactly one of `url`, `webhook` and `resume_url`",
            )),
        }
    }

    /// One POST through the `http` step kind; its failures (retryable or not) are this step's,
    /// but for what n8n's answers to a resume mean.
    async fn post(
        &self,
        call: &StepCall,
        given: &N8nWith,
        target: &Target,
        body: Value,
    ) -> Result<Value, StepFailure> {
        let url = match target {
            Target::Webhook(url) | Target::Resume(url) => url,
        };
        let mut with = json!({ "method": "POST", "url": url, "body": body, "timeout": "30s" });
        if let Some(headers) = &given.headers {
            with["headers"] = Value::Object(headers.clone());
        }
        // A URL a run's data chose is held to the egress rules for such URLs (no loopback,
        // secrets only to hosts allowed by name). `webhook` is only a path, checked above, on
        // the host the operator named with --n8n-url.
        let from_run_data = call.reads_run_data("url") || call.reads_run_data("resume_url");
        let request = StepCall {
            with,
            reads_run_data: if from_run_data {
                vec!["url".to_owned()]
            } else {
                Vec::new()
            },
            ..call.clone()
        };
        match self.http.run(request).await {
            Ok(StepOutcome::Output(mut answer)) => Ok(answer["body"].take()),
            Ok(other) => {
                unreachable!("the http step kind only answers with output, not {other:?}")
            }
            Err(failure) if matches!(target, Target::Resume(_)) => Err(resume_failure(failure)),
            Err(failure) => Err(failure),
        }
    }
}

/// A Webhook trigger's path: no empty or `..` segment can take the call elsewhere on n8n.
fn webhook_path(path: &str) -> bool {
    !path.is_empty()
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

enum Target {
    /// A Webhook trigger: starts an execution.
    Webhook(String),
    /// `$execution.resumeUrl`: resumes one that waits.
    Resume(String),
}

/// n8n answers a resume with 409 while its execution is not waiting (still running towards
/// the Wait node: worth another attempt) and 404 when nothing waits at that URL.
fn resume_failure(failure: StepFailure) -> StepFailure {
    let message = match failure.status {
        Some(409) => format!(
            "n8n's execution is not waiting in a Wait node (it is still running, or ended): \
             {}",
            failure.message
        ),
        Some(404) => format!(
            "nothing waits at this resume URL (the execution ended, or the Wait node takes \
             another method or suffix): {}",
            failure.message
        ),
        _ => return failure,
    };
    StepFailure {
        message,
        retryable: failure.status == Some(409),
        ..failure
    }
}

fn invalid(message: impl Into<String>) -> StepFailure {
    StepFailure::permanent("invalid_parameters", message)
}

#[async_trait]
impl StepKind for N8n {
    fn name(&self) -> &'static str {
        "n8n"
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["headers"]
    }

    fn with_schema(&self) -> Value {
        with_schema::<N8nWith>()
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let with: N8nWith = parse_with("n8n", &call.with)?;
        let target = self.target(&with)?;
        let mut body = json!({
            "run_id": call.run_id,
            "step_id": call.step_id,
            "input": with.input.clone().unwrap_or(Value::Null),
        });
        if !with.wait.unwrap_or(false) {
            return self
                .post(&call, &with, &target, body)
                .await
                .map(StepOutcome::Output);
        }
        // What this attempt stored so far. An earlier attempt's token is not this one's, and the
        // store drops the token when an attempt is given back (a worker shutting down): then
        // start over.
        let state = call.checkpoint.clone().filter(|c| {
            c["attempt"].as_u64() == Some(u64::from(call.attempt))
                && c["callback_token"].is_string()
        });
        let Some(mut state) = state else {
            let text = with.timeout.as_deref().unwrap_or(DEFAULT_TIMEOUT);
            let timeout = humantime::parse_duration(text)
                .map_err(|e| invalid(format!("n8n step: `with.timeout` {text:?}: {e}")))?;
            self.callback_url(&with)?;
            return Ok(StepOutcome::Park {
                until: Some(call.now),
                checkpoint: json!({
                    "callback_token": format!("{:032x}", rand::random::<u128>()),
                    "attempt": call.attempt,
                    "deadline": call.now.saturating_add(timeout.as_millis() as i64),
                    "timeout": text,
                }),
            });
        };
        if let Some(answer) = state.get("callback") {
            return match answer.get("error").filter(|e| !e.is_null()) {
                Some(error) => {
                    call.log.line("info", "n8n called back with an error");
                    Err(StepFailure::transient(
                        "n8n",
                        format!(
                            "n8n reported an error: {}",
                            error
                                .as_str()
                                .map_or_else(|| error.to_string(), str::to_owned)
                        ),
                    ))
                }
                None => {
                    call.log.line("info", "n8n called back");
                    Ok(StepOutcome::Output(
                        answer.get("output").cloned().unwrap_or(Value::Null),
                    ))
                }
            };
        }
        let deadline = state["deadline"].as_i64().unwrap_or(call.now);
        if state["called"] != Value::Bool(true) {
            let secret = state["callback_token"].as_str().unwrap_or_default();
            body["callback"] = json!({
                "url": self.callback_url(&with)?,
                "token": callback::token(&call.run_id, &call.step_id, secret),
            });
            self.post(&call, &with, &target, body).await?;
            call.log
                .line("info", "n8n took the call; waiting for it to call back");
            state["called"] = Value::Bool(true);
        } else if call.now >= deadline {
            return Err(StepFailure::transient(
                "timeout",
                format!(
                    "n8n did not call back within {}",
                    state["timeout"].as_str().unwrap_or(DEFAULT_TIMEOUT)
                ),
            ));
        }
        Ok(StepOutcome::Park {
            until: Some(deadline),
            checkpoint: state,
        })
    }
}
