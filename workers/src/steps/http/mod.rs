//! `http`: one request with reqwest. `with: { method, url, headers, auth, query, body, timeout }`.
//! A 2xx answer succeeds with `{status, headers, body}` (JSON when it parses, text otherwise);
//! anything else fails with the status and a short excerpt of the body. 5xx, 408, 425, 429 and
//! network errors are worth retrying; other 4xx are not. The run-and-step idempotency key goes out
//! as `Idempotency-Key`, so APIs that honour one (Stripe) do the work once across retries.
//!
//! Secrets go only into `headers` and `auth`. Redirects are followed here, not by reqwest, so
//! that every hop passes the egress policy and a redirect to another origin loses every header
//! that carried a secret, not only the few reqwest knows. Bodies are read in chunks up to a
//! limit: a huge answer is refused, never buffered whole.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{
    AUTHORIZATION, CONTENT_TYPE, COOKIE, HeaderMap, HeaderName, HeaderValue, LOCATION,
    PROXY_AUTHORIZATION, RETRY_AFTER,
};
use reqwest::{Method, StatusCode, Url};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchyard_engine::state::StepFailure;

use super::{StepCall, StepKind, StepOutcome, StepResult, parse_with, with_schema};
use crate::egress::{EgressPolicy, Refused, checked_client};

mod auth;
mod multipart;
use auth::{Auth, Outgoing};
use multipart::Multipart;

/// Characters of a failed answer's body quoted in the error: enough to tell what went wrong,
/// too little to carry an internal API's answer to whoever reads the run.
const EXCERPT: usize = 256;
/// How much of a failed answer is read for its excerpt: enough to reach an HTML page's title.
const ERROR_READ: usize = 16 * 1024;
/// The largest body read; a bigger one fails the attempt. Outputs are capped at 1 MiB anyway.
const MAX_BODY: usize = 1024 * 1024;
const MAX_REDIRECTS: usize = 10;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct HttpWith {
    /// `GET` (the default), `POST`, `PUT`, `PATCH`, `DELETE`, ... or any other method name
    /// (`PURGE`, `PROPFIND`).
    #[schemars(extend("pattern" = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"))]
    method: Option<String>,
    url: String,
    /// Header names and values; values may reference secrets.
    #[serde(default)]
    #[schemars(schema_with = "header_values")]
    headers: Option<Map<String, Value>>,
    /// How the request proves who sends it; values may reference secrets.
    auth: Option<Auth>,
    /// Query parameters, added to the URL: a map, or a list of `[name, value]` pairs to repeat a
    /// name.
    #[serde(default)]
    #[schemars(schema_with = "query_values")]
    query: Option<Value>,
    /// Sent as JSON; a string is sent as it is when `headers` give a `Content-Type` other than
    /// JSON (a form, XML, text).
    #[schemars(with = "Option<serde_json::Value>")]
    body: Option<Value>,
    /// A `multipart/form-data` body instead: `{fields: {NAME: VALUE}, files: [{name, artifact |
    /// text, filename, content_type}]}`.
    multipart: Option<Multipart>,
    /// How long the request may take, such as `10s`.
    #[schemars(extend("format" = "duration"))]
    timeout: Option<String>,
    /// Follow redirects (the default), or take a 3xx answer as a failure.
    follow_redirects: Option<bool>,
    /// The service this calls, such as `pinata`: its requests and failures are counted under
    /// this name in `api_usage` and the metrics.
    provider: Option<String>,
}

/// Header values: text, or numbers and booleans sent as text.
pub(super) fn header_values(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": ["object", "null"],
        "additionalProperties": { "type": ["string", "number", "boolean"] }
    })
}

fn query_values(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "anyOf": [
            {
                "type": ["object", "null"],
                "additionalProperties": { "type": ["string", "number", "boolean"] }
            },
            {
                "type": "array",
                "items": {
                    "type": "array",
                    "prefixItems": [
                        { "type": "string" },
                        { "type": ["string", "number", "boolean"] }
                    ],
                    "minItems": 2,
                    "maxItems": 2
                }
            }
        ]
    })
}

pub struct Http {
    policy: Arc<EgressPolicy>,
    /// For URLs written by the definition's author (and `vars`).
    client: reqwest::Client,
    /// For URLs rendered from a run's input or step outputs: internal addresses refused.
    from_input_client: reqwest::Client,
}

impl Http {
    pub fn new() -> Self {
        Http::with_policy(Arc::new(EgressPolicy::default()))
    }

    pub fn with_policy(policy: Arc<EgressPolicy>) -> Self {
        // Redirects are followed by `send`, each hop under the policy.
        let client = |from_input| {
            checked_client(&policy, from_input)
                .build()
                .expect("TLS backend initialises")
        };
        Http {
            client: client(false),
            from_input_client: client(true),
            policy,
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

fn invalid(message: impl Into<String>) -> StepFailure {
    StepFailure::permanent("invalid_parameters", message)
}

fn refused(why: Refused) -> StepFailure {
    StepFailure::permanent(
        "egress",
        format!("http step: refused by the egress policy: {why}"),
    )
}

/// The request's headers, and the names of those that carry a secret.
fn headers(call: &StepCall, with: &HttpWith) -> Result<(HeaderMap, Vec<HeaderName>), StepFailure> {
    let mut map = HeaderMap::new();
    let mut secret = Vec::new();
    let mut add = |name: HeaderName, text: &str| -> Result<(), StepFailure> {
        let revealed = call
            .secrets
            .reveal(text)
            .map_err(|e| invalid(format!("http step: header {name}: {e}")))?;
        // The value may hold a secret: name only the header.
        let value = HeaderValue::from_str(&revealed)
            .map_err(|_| invalid(format!("http step: bad value for header {name}")))?;
        if call.secrets.referenced_in(text) {
            secret.push(name.clone());
        }
        map.insert(name, value);
        Ok(())
    };
    if let Some(given) = &with.headers {
        for (name, value) in given {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("http step: bad header name {name:?}")))?;
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            add(name, &text)?;
        }
    }
    if !map.contains_key("idempotency-key") {
        map.insert(
            "idempotency-key",
            HeaderValue::from_str(&call.idempotency_key)
                .map_err(|_| invalid("bad idempotency key"))?,
        );
    }
    Ok((map, secret))
}

/// `with.body` as the bytes sent, with a `Content-Type` unless `headers` give one: JSON, or a
/// string as it is under a `Content-Type` of another kind (a form, XML, text).
fn body_bytes(
    body: Option<&Value>,
    headers: &mut HeaderMap,
) -> Result<Option<Vec<u8>>, StepFailure> {
    let Some(body) = body.filter(|b| !b.is_null()) else {
        return Ok(None);
    };
    let given = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    match (body, given) {
        (Value::String(text), Some(kind)) if !kind.contains("json") => {
            Ok(Some(text.clone().into_bytes()))
        }
        (body, given) => {
            if given.is_none() {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            serde_json::to_vec(body)
                .map(Some)
                .map_err(|e| invalid(format!("http step: `with.body`: {e}")))
        }
    }
}

/// `body` as it arrives, broken off at the first value of `sent` it holds (a service that
/// echoes the request): a kept file is served to every viewer whole, and cannot be redacted as
/// JSON is. Parts are searched with the end of the one before, so a value split across two is
/// found too.
fn refusing_echoes(
    body: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>>,
    sent: Vec<String>,
    echoed: Arc<std::sync::atomic::AtomicBool>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, String>> {
    use futures::StreamExt as _;
    let finders: Vec<memchr::memmem::Finder<'static>> = sent
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| memchr::memmem::Finder::new(s.as_bytes()).into_owned())
        .collect();
    let keep = sent
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .saturating_sub(1);
    let mut tail: Vec<u8> = Vec::new();
    body.map(move |chunk| {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if finders.is_empty() {
            return Ok(chunk);
        }
        let mut window = std::mem::take(&mut tail);
        window.extend_from_slice(&chunk);
        if finders.iter().any(|f| f.find(&window).is_some()) {
            echoed.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err("the answer echoes a secret".to_owned());
        }
        tail = window[window.len().saturating_sub(keep)..].to_vec();
        Ok(chunk)
    })
}

/// Whether an answer of `content_type` goes into the output (JSON, or text) rather than into an
/// artifact. An answer that names no type is read as before: JSON when it parses, else text.
fn textual(content_type: &str) -> bool {
    let kind = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    kind.is_empty()
        || kind.starts_with("text/")
        || [
            "json",
            "xml",
            "javascript",
            "yaml",
            "x-www-form-urlencoded",
            "graphql",
        ]
        .iter()
        .any(|t| kind.contains(t))
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap, now_ms: i64) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = jiff::fmt::rfc2822::parse(text).ok()?.timestamp();
    let wait = at.as_millisecond() - now_ms;
    (wait > 0).then(|| Duration::from_millis(wait as u64))
}

fn retryable(status: StatusCode) -> bool {
    status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429)
}

/// A failed answer's body in a line of at most [`EXCERPT`] characters: an HTML error page by
/// its title, whose markup would fill the excerpt and say nothing.
fn what_it_says(body: &str, html: bool) -> String {
    let text = if html { page_title(body) } else { None }.unwrap_or(body);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(EXCERPT) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

fn page_title(page: &str) -> Option<&str> {
    let lower = page.to_ascii_lowercase();
    let open = lower.find("<title")?;
    let start = open + lower[open..].find('>')? + 1;
    let end = start + lower[start..].find("</title")?;
    Some(&page[start..end]).filter(|t| !t.trim().is_empty())
}

/// What a failed send says; a refusal by the egress policy, found among the causes, is final.
fn send_error(target: &str, e: reqwest::Error) -> StepFailure {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(why) = c.downcast_ref::<Refused>() {
            return refused(why.clone());
        }
        cause = c.source();
    }
    let kind = if e.is_timeout() { "timeout" } else { "http" };
    StepFailure::transient(kind, format!("{target}: {}", e.without_url()))
}

/// Reads up to `limit` bytes of the body; `Ok(None)` when it is longer.
async fn read_body(
    response: &mut reqwest::Response,
    limit: usize,
    target: &str,
) -> Result<Option<Vec<u8>>, StepFailure> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Ok(None);
    }
    let body = read_start(response, limit + 1, target).await?;
    Ok((body.len() <= limit).then_some(body))
}

/// The first `limit` bytes of the body, or all of it when shorter.
async fn read_start(
    response: &mut reqwest::Response,
    limit: usize,
    target: &str,
) -> Result<Vec<u8>, StepFailure> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| StepFailure::transient("http", format!("{target}: reading body: {e}")))?
    {
        let room = limit - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == limit {
            break;
        }
    }
    Ok(body)
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

#[async_trait]
impl StepKind for Http {
    fn name(&self) -> &'static str {
        "http"
    }

    fn with_schema(&self) -> Value {
        with_schema::<HttpWith>()
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["headers", "auth"]
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let with: HttpWith = parse_with("http", &call.with)?;
        let provider = with.provider.clone();
        let result = self.send(&call, with).await;
        if let Some(provider) = provider {
            call.usage.record(&provider, result.is_err(), 0, 0.0);
        }
        result
    }
}

impl Http {
    async fn send(&self, call: &StepCall, with: HttpWith) -> StepResult {
        let follow_redirects = with.follow_redirects.unwrap_or(true);
        let text = with.url.as_str();
        let given = with.method.as_deref().unwrap_or("GET");
        let mut method = Method::from_bytes(given.to_ascii_uppercase().as_bytes())
            .map_err(|_| invalid(format!("http step: unknown method {given:?}")))?;
        let from_input = call.reads_run_data("url");
        let (mut headers, secret_headers) = headers(call, &with)?;
        let carries_secrets = !secret_headers.is_empty() || with.auth.is_some();
        let timeout = match with.timeout.as_deref() {
            Some(t) => Some(
                humantime::parse_duration(t)
                    .map_err(|e| invalid(format!("http step: `with.timeout` {t:?}: {e}")))?,
            ),
            None => None,
        };
        let mut body = body_bytes(with.body.as_ref(), &mut headers)?;
        let mut multipart = with.multipart.as_ref();
        if let Some(form) = multipart {
            if body.is_some() {
                return Err(invalid(
                    "http step: `with` takes one of `body` and `multipart`, not both",
                ));
            }
            form.check()?;
        }
        // Credentials go to the origin the author wrote, and to no other a redirect leads to.
        let mut send_credentials = true;
        // The query joins the URL once, as reqwest encodes it; a redirect's Location is whole.
        let mut request = self.client.request(method.clone(), text);
        if let Some(query) = &with.query {
            request = request.query(query);
        }
        let mut url = request
            .build()
            .map_err(|e| invalid(format!("http step: `with.url`: {}", e.without_url())))?
            .url()
            .clone();
        let mut hops = 0;
        let (target, mut response) = loop {
            // Named without its query or any user and password in it: it reaches logs.
            let mut shown = url.clone();
            let _ = shown.set_username("");
            let _ = shown.set_password(None);
            let target = format!(
                "{method} {}",
                shown.as_str().split('?').next().unwrap_or("")
            );
            // A redirect's target is chosen by the server, not the definition's author: every
            // hop after the first is treated as a URL from run data.
            let untrusted = from_input || hops > 0;
            let host = url.host_str().unwrap_or("");
            self.policy.check_host(host, untrusted).map_err(refused)?;
            // Whoever starts a run must not choose where the definition's secrets go: a URL
            // from run data gets them only on a host the operator allows by name.
            if from_input && hops == 0 && carries_secrets && !self.policy.allows(host) {
                return Err(refused(Refused::new(format!(
                    "{host} gets this step's secrets from a URL rendered from run data; \
                     an operator allows that with --egress-allow {host}"
                ))));
            }
            let client = if untrusted {
                &self.from_input_client
            } else {
                &self.client
            };
            let mut sent_headers = headers.clone();
            if let Some(auth) = with.auth.as_ref().filter(|_| send_credentials) {
                let outgoing = Outgoing {
                    method: method.as_str(),
                    url: &url,
                    headers: &headers,
                    // A streamed form has no bytes to sign ahead.
                    body: match multipart {
                        Some(_) => None,
                        None => Some(body.as_deref().unwrap_or_default()),
                    },
                    at: std::time::SystemTime::now(),
                };
                for (name, value) in auth.headers(&call.secrets, &outgoing)? {
                    sent_headers.insert(name, value);
                }
            }
            let mut request = client
                .request(method.clone(), url.clone())
                .headers(sent_headers);
            if let Some(body) = &body {
                request = request.body(body.clone());
            }
            if let Some(form) = multipart {
                request = request.multipart(form.form(&call.artifacts).await?);
            }
            if let Some(timeout) = timeout {
                request = request.timeout(timeout);
            }
            let sent = std::time::Instant::now();
            let response = request.send().await.map_err(|e| {
                let failure = send_error(&target, e);
                call.log.line("info", failure.message.clone());
                failure
            })?;
            call.log.line(
                "info",
                format!(
                    "{target}: HTTP {} in {} ms",
                    response.status(),
                    sent.elapsed().as_millis()
                ),
            );
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .filter(|_| response.status().is_redirection() && follow_redirects);
            let Some(location) = location else {
                break (target, response);
            };
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(StepFailure::permanent(
                    "http",
                    format!("{target}: more than {MAX_REDIRECTS} redirects"),
                ));
            }
            let next = url.join(location).map_err(|e| {
                StepFailure::permanent("http", format!("{target}: bad redirect: {e}"))
            })?;
            if !same_origin(&url, &next) {
                send_credentials = false;
                for name in
                    secret_headers
                        .iter()
                        .chain([&AUTHORIZATION, &COOKIE, &PROXY_AUTHORIZATION])
                {
                    headers.remove(name);
                }
            }
            // As browsers do: 303 always, and 301/302 after a POST, continue as a GET.
            let status = response.status().as_u16();
            if status == 303 || (matches!(status, 301 | 302) && method == Method::POST) {
                method = Method::GET;
                body = None;
                multipart = None;
            }
            url = next;
        };
        let status = response.status();
        let response_headers = response.headers().clone();
        if !status.is_success() {
            let start = read_start(&mut response, ERROR_READ, &target)
                .await
                .unwrap_or_default();
            let html = response_headers
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("html"));
            // Redacted before it is cut and its spaces folded: an echoed secret that holds line
            // breaks would not be found after.
            let mut said = Value::String(String::from_utf8_lossy(&start).into_owned());
            call.secrets.redact_sent(&mut said);
            return Err(StepFailure {
                kind: "http".into(),
                message: format!(
                    "{target}: HTTP {status}: {}",
                    what_it_says(said.as_str().unwrap_or_default(), html)
                ),
                status: Some(status.as_u16()),
                retryable: retryable(status),
                retry_after: retry_after(&response_headers, call.now),
            });
        }
        let headers: Map<String, Value> = response_headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), Value::String(v.to_str().ok()?.to_owned()))))
            .collect();
        let content_type = response_headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if !textual(&content_type) {
            // Audio, images, documents: kept as a file, read as it arrives.
            let limit = call.artifacts.max_size();
            if response.content_length().is_some_and(|n| n > limit) {
                return Err(StepFailure::permanent(
                    "artifact_too_large",
                    format!(
                        "{target}: the response body is over the artifact limit of {limit} bytes"
                    ),
                ));
            }
            if limit == 0 {
                return Err(StepFailure::permanent(
                    "artifacts",
                    format!(
                        "{target}: a {content_type} answer is kept as an artifact, and this worker keeps none: start it with --artifacts"
                    ),
                ));
            }
            let echoed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let body = refusing_echoes(
                response.bytes_stream(),
                call.secrets.sent_values(),
                echoed.clone(),
            );
            let saved = call
                .artifacts
                .save(&content_type, body)
                .await
                .map_err(|mut f| {
                    if echoed.load(std::sync::atomic::Ordering::Relaxed) {
                        return StepFailure::permanent(
                            "secret_echoed",
                            format!("{target}: the {content_type} answer holds a value this request sent with a secret in it; a file cannot be redacted, so it is not kept"),
                        );
                    }
                    f.message = format!("{target}: {}", f.message);
                    f
                })?;
            call.log.line(
                "info",
                format!(
                    "{target}: kept {} bytes of {content_type} as artifact {}",
                    saved.size, saved.id
                ),
            );
            return Ok(StepOutcome::Output(json!({
                "status": status.as_u16(),
                "headers": headers,
                "body": saved.to_output(),
            })));
        }
        let bytes = read_body(&mut response, MAX_BODY, &target)
            .await?
            .ok_or_else(|| {
                StepFailure::permanent(
                    "response_too_large",
                    format!("{target}: the response body is over {MAX_BODY} bytes"),
                )
            })?;
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(StepOutcome::Output(json!({
            "status": status.as_u16(),
            "headers": headers,
            "body": body,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_engine::definition::Secrets;

    fn call(with: Value) -> StepCall {
        StepCall::first_attempt(with, Secrets::default())
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h, 0), Some(Duration::from_secs(120)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        let at = 1_445_412_480_000;
        assert_eq!(retry_after(&h, at - 5_000), Some(Duration::from_secs(5)));
        assert_eq!(retry_after(&h, at + 1), None);
    }

    #[test]
    fn only_server_errors_and_throttling_are_retryable() {
        for code in [500, 502, 503, 408, 425, 429] {
            assert!(retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [400, 401, 403, 404, 422] {
            assert!(!retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    /// The headers a step with `with` sends.
    fn headers_of(with: Value) -> (HeaderMap, Vec<HeaderName>) {
        let mut with = with;
        with["url"] = json!("http://example.com/");
        let call = call(with);
        let parsed: HttpWith = parse_with("http", &call.with).unwrap();
        headers(&call, &parsed).unwrap()
    }

    #[test]
    fn idempotency_key_is_sent_unless_the_step_sets_one() {
        let (h, _) = headers_of(json!({}));
        assert_eq!(h["idempotency-key"], "run:step");
        let (h, _) = headers_of(json!({ "headers": { "Idempotency-Key": "mine" } }));
        assert_eq!(h["idempotency-key"], "mine");
    }
}
