//! `openai`: a chat completion or generated images, through `async-openai`, against OpenAI or any
//! server that speaks its API (`with.base_url`, else `vars.openai_base_url`, else OpenAI's).
//! The key is `with.api_key`, else the secret `openai_api_key`.
//!
//! The client does not retry: a failed call fails the attempt, and the step's retry policy
//! (durable, in the database) decides. What OpenAI says decides how: a 429 waits at least its
//! `Retry-After` (unless it is `insufficient_quota`, which waiting does not mend); a 5xx or a
//! network error is retried; a content-policy refusal or an invalid request is not, and carries
//! OpenAI's message. Images are kept as artifacts, never put in the output.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::ResponseFormat;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, CreateChatCompletionRequest, CreateChatCompletionResponse,
};
use async_openai::types::images::{CreateImageRequest, Image, ImageModel, ImageSize};
use async_trait::async_trait;
use base64::Engine as _;
use reqwest::header::RETRY_AFTER;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_engine::state::StepFailure;

use super::{StepCall, StepKind, StepOutcome, StepResult, parse_with, with_schema};
use crate::egress::{EgressPolicy, Refused, checked_client};

const OPENAI_BASE: &str = "https://api.openai.com/v1";
const DEFAULT_CHAT_MODEL: &str = "gpt-4o-mini";
const DEFAULT_IMAGE_MODEL: &str = "gpt-image-1";
/// The largest answer read: ten large images in base64.
const MAX_ANSWER: u64 = 128 * 1024 * 1024;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct OpenAiWith {
    /// A chat completion of this one user message.
    prompt: Option<String>,
    /// Or of this conversation: `[{role: system|developer|user|assistant, content}]`.
    messages: Option<Vec<Message>>,
    /// A system message put before `prompt`.
    system: Option<String>,
    /// The model; `gpt-4o-mini` for chat and `gpt-image-1` for images by default.
    model: Option<String>,
    temperature: Option<f32>,
    /// The most tokens the answer may take.
    max_tokens: Option<u32>,
    /// Ask for a JSON object (JSON mode): the output's `json` is the parsed answer, and an
    /// answer that does not parse fails the attempt (retryably).
    #[serde(default)]
    json: bool,
    /// Generate images instead of a chat completion; each is kept as an artifact.
    image: Option<ImageWith>,
    /// The API's base URL, such as `http://localhost:11434/v1`; else `vars.openai_base_url`,
    /// else OpenAI's.
    base_url: Option<String>,
    /// The API key; else the secret `openai_api_key`.
    api_key: Option<String>,
    /// Whose usage this is in `api_usage` and the metrics (`openai` by default).
    provider: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Message {
    role: Role,
    content: String,
}

#[derive(Deserialize, JsonSchema, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    Developer,
    User,
    Assistant,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ImageWith {
    prompt: String,
    /// Such as `1024x1024`.
    size: Option<String>,
    /// How many, 1 to 10.
    #[schemars(range(min = 1, max = 10))]
    n: Option<u8>,
}

pub struct OpenAi {
    policy: Arc<EgressPolicy>,
    http: reqwest::Client,
    /// For a base URL rendered from run data: internal addresses refused.
    from_input_http: reqwest::Client,
}

impl OpenAi {
    pub fn with_policy(policy: Arc<EgressPolicy>) -> Self {
        // No redirect is followed: it could lead the key anywhere.
        let client = |from_input| {
            checked_client(&policy, from_input)
                .build()
                .expect("TLS backend initialises")
        };
        OpenAi {
            http: client(false),
            from_input_http: client(true),
            policy,
        }
    }
}

impl Default for OpenAi {
    fn default() -> Self {
        OpenAi::with_policy(Arc::default())
    }
}

fn invalid(message: impl Into<String>) -> StepFailure {
    StepFailure::permanent("invalid_parameters", message)
}

/// What the last answer said to wait, when it was a 429 or a 503: `async-openai`'s errors keep
/// the status, not the headers.
#[derive(Clone, Default)]
struct RetryAfter(Arc<Mutex<Option<Duration>>>);

impl RetryAfter {
    fn get(&self) -> Option<Duration> {
        *self.0.lock().expect("retry-after poisoned")
    }
}

/// `status` and OpenAI's error as the attempt's failure: retried when waiting may help.
fn api_failure(
    status: reqwest::StatusCode,
    error: &async_openai::error::ApiError,
    retry_after: Option<Duration>,
) -> StepFailure {
    let code = error.code.as_deref().unwrap_or_default();
    let kind = error.r#type.as_deref().unwrap_or_default();
    let quota = code == "insufficient_quota" || kind == "insufficient_quota";
    let retryable = match status.as_u16() {
        429 => !quota,
        408 | 409 => true,
        s => s >= 500,
    };
    let what = match (status.as_u16(), code) {
        (_, "content_policy_violation") | (_, "content_filter") => "content_policy",
        (429, _) if quota => "insufficient_quota",
        (429, _) => "rate_limited",
        (400 | 404 | 422, _) => "invalid_request",
        (401 | 403, _) => "unauthorized",
        _ => "openai",
    };
    // OpenAI's message, on one line: it says what to change.
    let message = error
        .message
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    StepFailure {
        kind: what.into(),
        message: format!("openai: HTTP {status}: {message}"),
        status: Some(status.as_u16()),
        retryable,
        retry_after: if retryable { retry_after } else { None },
    }
}

fn failure(e: OpenAIError, retry_after: &RetryAfter) -> StepFailure {
    match e {
        OpenAIError::ApiError(answer) => {
            api_failure(answer.status_code, &answer.api_error, retry_after.get())
        }
        OpenAIError::Reqwest(e) => {
            let kind = if e.is_timeout() { "timeout" } else { "http" };
            StepFailure::transient(kind, format!("openai: {}", e.without_url()))
        }
        OpenAIError::JSONDeserialize(e, _) => StepFailure::transient(
            "openai",
            format!("openai: an answer that does not parse: {e}"),
        ),
        OpenAIError::InvalidArgument(message) => invalid(format!("openai step: {message}")),
        other => StepFailure::transient("openai", format!("openai: {other}")),
    }
}

/// The tokens `usage` counts, and what they cost at the model's price in `vars.prices`
/// (`{MODEL: {input, output}}`, US dollars per million tokens; none: 0).
fn spent(usage: &Value, model: &Value, vars: &Value) -> (u64, f64) {
    let count = |k: &str| usage[k].as_u64().unwrap_or(0);
    let (input, output) = (count("prompt_tokens"), count("completion_tokens"));
    let price = model
        .as_str()
        .and_then(|m| {
            let prices = &vars["prices"];
            // A dated model (`gpt-4o-mini-2024-07-18`) is priced as its family when unlisted:
            // the longest listed name it starts with (`gpt-4o-mini`, not `gpt-4o`).
            prices.get(m).or_else(|| {
                prices
                    .as_object()?
                    .iter()
                    .filter(|(name, _)| {
                        m.strip_prefix(name.as_str())
                            .is_some_and(|rest| rest.starts_with('-'))
                    })
                    .max_by_key(|(name, _)| name.len())
                    .map(|(_, p)| p)
            })
        })
        .cloned()
        .unwrap_or(Value::Null);
    let per_token = |k: &str| price[k].as_f64().unwrap_or(0.0) / 1e6;
    let cost = input as f64 * per_token("input") + output as f64 * per_token("output");
    (count("total_tokens").max(input + output), cost)
}

fn usage_of(usage: Option<&async_openai::types::chat::CompletionUsage>) -> Value {
    match usage {
        Some(u) => json!({
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
        }),
        None => Value::Null,
    }
}

impl OpenAi {
    /// A client for one call: no retries of its own, and `retry_after` noted from each answer.
    fn client(
        &self,
        base: &str,
        key: &str,
        from_input: bool,
        retry_after: RetryAfter,
    ) -> Client<OpenAIConfig> {
        let http = if from_input {
            self.from_input_http.clone()
        } else {
            self.http.clone()
        };
        let service = tower::service_fn(move |factory: HttpRequestFactory| {
            let http = http.clone();
            let noted = retry_after.clone();
            async move {
                let request = factory.build().await?;
                let response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
                // The client reads an answer whole: one that says it is huge is refused first.
                if response.content_length().is_some_and(|n| n > MAX_ANSWER) {
                    return Err(OpenAIError::InvalidArgument(format!(
                        "the answer is over {MAX_ANSWER} bytes"
                    )));
                }
                if matches!(response.status().as_u16(), 429 | 503) {
                    let wait = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(|s| Duration::from_secs_f64(s.min(86_400.0)));
                    *noted.0.lock().expect("retry-after poisoned") = wait;
                }
                Ok::<_, OpenAIError>(response)
            }
        });
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(base.trim_end_matches('/'))
                .with_api_key(key),
        )
        .with_http_service(service)
    }

    async fn chat(
        &self,
        client: &Client<OpenAIConfig>,
        with: &OpenAiWith,
        retry_after: &RetryAfter,
    ) -> StepResult {
        let mut messages = Vec::new();
        if let Some(system) = &with.system {
            messages.push(json!({ "role": "system", "content": system }));
        }
        match (&with.prompt, &with.messages) {
            (Some(prompt), None) => messages.push(json!({ "role": "user", "content": prompt })),
            (None, Some(given)) if !given.is_empty() => messages.extend(given.iter().map(|m| {
                let role = match m.role {
                    Role::System => "system",
                    Role::Developer => "developer",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                json!({ "role": role, "content": m.content })
            })),
            _ => {
                return Err(invalid(
                    "openai step: `with` takes one of `prompt`, `messages` (not empty) or `image`",
                ));
            }
        }
        let messages: Vec<ChatCompletionRequestMessage> =
            serde_json::from_value(Value::Array(messages))
                .map_err(|e| invalid(format!("openai step: `with.messages`: {e}")))?;
        let request = CreateChatCompletionRequest {
            messages,
            model: with
                .model
                .clone()
                .unwrap_or_else(|| DEFAULT_CHAT_MODEL.to_owned()),
            temperature: with.temperature,
            max_completion_tokens: with.max_tokens,
            response_format: with.json.then_some(ResponseFormat::JsonObject),
            ..Default::default()
        };
        let answer: CreateChatCompletionResponse = client
            .chat()
            .create(request)
            .await
            .map_err(|e| failure(e, retry_after))?;
        let choice = answer.choices.first().ok_or_else(|| {
            StepFailure::transient("openai", "openai: the answer holds no choice")
        })?;
        if let Some(refusal) = &choice.message.refusal {
            return Err(StepFailure::permanent(
                "content_policy",
                format!("openai: the model refused: {refusal}"),
            ));
        }
        let text = choice.message.content.clone().unwrap_or_default();
        let mut output = json!({
            "text": text,
            "model": answer.model,
            "finish_reason": choice.finish_reason.as_ref().map(|r| serde_json::to_value(r).unwrap_or(Value::Null)),
            "usage": usage_of(answer.usage.as_ref()),
        });
        if with.json {
            let parsed: Value = serde_json::from_str(&text).map_err(|e| {
                StepFailure::transient(
                    "invalid_json",
                    format!("openai: JSON mode answered with text that does not parse: {e}"),
                )
            })?;
            output["json"] = parsed;
        }
        Ok(StepOutcome::Output(output))
    }

    async fn images(
        &self,
        client: &Client<OpenAIConfig>,
        call: &StepCall,
        with: &OpenAiWith,
        image: &ImageWith,
        retry_after: &RetryAfter,
    ) -> StepResult {
        let model = with
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE_MODEL.to_owned());
        let request = CreateImageRequest {
            prompt: image.prompt.clone(),
            model: ImageModel::Other(model.clone()),
            n: image.n,
            size: image.size.clone().map(ImageSize::Other),
            ..Default::default()
        };
        let answer = client
            .images()
            .generate(request)
            .await
            .map_err(|e| failure(e, retry_after))?;
        let content_type = match answer.output_format {
            Some(format) => match serde_json::to_value(format) {
                Ok(Value::String(f)) => format!("image/{f}"),
                _ => "image/png".to_owned(),
            },
            None => "image/png".to_owned(),
        };
        let mut images = Vec::new();
        for image in &answer.data {
            match &**image {
                Image::B64Json {
                    b64_json,
                    revised_prompt,
                } => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64_json.as_bytes())
                        .map_err(|e| {
                            StepFailure::transient(
                                "openai",
                                format!("openai: an image that is not base64: {e}"),
                            )
                        })?;
                    let saved = call
                        .artifacts
                        .save_bytes(&content_type, bytes.into())
                        .await?;
                    images.push(json!({
                        "artifact": saved,
                        "revised_prompt": revised_prompt,
                    }));
                }
                // Older models may answer with a link that expires within the hour.
                Image::Url {
                    url,
                    revised_prompt,
                } => images.push(json!({ "url": url, "revised_prompt": revised_prompt })),
            }
        }
        let usage = answer.usage.as_ref().map_or(Value::Null, |u| {
            json!({
                "prompt_tokens": u.input_tokens,
                "completion_tokens": u.output_tokens,
                "total_tokens": u.total_tokens,
            })
        });
        Ok(StepOutcome::Output(json!({
            "images": images,
            "model": model,
            "usage": usage,
        })))
    }
}

#[async_trait]
impl StepKind for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn with_schema(&self) -> Value {
        with_schema::<OpenAiWith>()
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["api_key"]
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let with: OpenAiWith = parse_with("openai", &call.with)?;
        let base = with
            .base_url
            .clone()
            .or_else(|| call.vars["openai_base_url"].as_str().map(str::to_owned))
            .unwrap_or_else(|| OPENAI_BASE.to_owned());
        let key = match &with.api_key {
            Some(text) => call
                .secrets
                .reveal(text)
                .map_err(|e| invalid(format!("openai step: `with.api_key`: {e}")))?,
            None => call.secrets.named("openai_api_key").ok_or_else(|| {
                invalid("openai step: no key: set the secret openai_api_key, or `with.api_key`")
            })?,
        };
        // Whoever starts a run must not choose where the key goes.
        let from_input = call.reads_run_data("base_url");
        let host = reqwest::Url::parse(&base)
            .map_err(|e| invalid(format!("openai step: base URL {base:?}: {e}")))?
            .host_str()
            .unwrap_or_default()
            .to_owned();
        self.policy.check_host(&host, from_input).map_err(|why| {
            StepFailure::permanent(
                "egress",
                format!("openai step: refused by the egress policy: {why}"),
            )
        })?;
        if from_input && !self.policy.allows(&host) {
            return Err(StepFailure::permanent(
                "egress",
                format!(
                    "openai step: refused by the egress policy: {}",
                    Refused::new(format!(
                        "{host} gets the API key from a base URL rendered from run data; an \
                         operator allows that with --egress-allow {host}"
                    ))
                ),
            ));
        }
        let retry_after = RetryAfter::default();
        let client = self.client(&base, &key, from_input, retry_after.clone());
        let sent = std::time::Instant::now();
        let result = match &with.image {
            Some(image) => {
                if with.prompt.is_some() || with.messages.is_some() {
                    return Err(invalid(
                        "openai step: `with.image` takes its own prompt: no `prompt` or `messages` beside it",
                    ));
                }
                self.images(&client, &call, &with, image, &retry_after)
                    .await
            }
            None => self.chat(&client, &with, &retry_after).await,
        };
        let (tokens, cost) = match &result {
            Ok(StepOutcome::Output(out)) => spent(&out["usage"], &out["model"], &call.vars),
            _ => (0, 0.0),
        };
        call.usage.record(
            with.provider.as_deref().unwrap_or("openai"),
            result.is_err(),
            tokens,
            cost,
        );
        call.log.line(
            "info",
            format!(
                "openai {}: {} in {} ms",
                if with.image.is_some() {
                    "images"
                } else {
                    "chat"
                },
                match &result {
                    Ok(_) => "answered".to_owned(),
                    Err(f) => f.message.clone(),
                },
                sent.elapsed().as_millis()
            ),
        );
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dated_model_is_priced_as_the_longest_listed_name_it_starts_with() {
        let vars = json!({ "prices": {
            "gpt-4o": { "input": 2.5, "output": 10.0 },
            "gpt-4o-mini": { "input": 0.15, "output": 0.6 },
        } });
        let usage = json!({ "prompt_tokens": 1_000_000, "completion_tokens": 0, "total_tokens": 1_000_000 });
        let (tokens, cost) = spent(&usage, &json!("gpt-4o-mini-2024-07-18"), &vars);
        assert_eq!(tokens, 1_000_000);
        assert!((cost - 0.15).abs() < 1e-9, "{cost}");
        let (_, cost) = spent(&usage, &json!("gpt-4o-2024-08-06"), &vars);
        assert!((cost - 2.5).abs() < 1e-9, "{cost}");
        let (_, unpriced) = spent(&usage, &json!("o3"), &vars);
        assert_eq!(unpriced, 0.0);
    }
}
