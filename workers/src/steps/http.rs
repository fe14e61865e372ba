//! `http`: one request with reqwest. `with: { method, url, headers, query, body, timeout }`.
//! A 2xx answer succeeds with `{status, headers, body}` (JSON when it parses, text otherwise);
//! anything else fails with the status and an excerpt of the body. 5xx, 408, 425, 429 and
//! network errors are worth retrying; other 4xx are not. The run-and-step idempotency key goes out
//! as `Idempotency-Key`, so APIs that honour one (Stripe) do the work once across retries.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};
use switchyard_engine::state::StepFailure;

use super::{StepCall, StepKind, StepOutcome, StepResult, str_field};

/// Bytes of a failed answer's body quoted in the error.
const EXCERPT: usize = 512;

pub struct Http {
    client: reqwest::Client,
}

impl Http {
    pub fn new() -> Self {
        Http {
            client: reqwest::Client::builder()
                .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("TLS backend initialises"),
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

fn headers(with: &Value, idempotency_key: &str) -> Result<HeaderMap, StepFailure> {
    let mut map = HeaderMap::new();
    if let Some(given) = with.get("headers") {
        let given = given
            .as_object()
            .ok_or_else(|| invalid("http step: `with.headers` must be a map"))?;
        for (name, value) in given {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("http step: bad header name {name:?}")))?;
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            // The value may hold a secret: name only the header.
            let value = HeaderValue::from_str(&text)
                .map_err(|_| invalid(format!("http step: bad value for header {name}")))?;
            map.insert(name, value);
        }
    }
    if !map.contains_key("idempotency-key") {
        map.insert(
            "idempotency-key",
            HeaderValue::from_str(idempotency_key).map_err(|_| invalid("bad idempotency key"))?,
        );
    }
    Ok(map)
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

fn excerpt(body: &str) -> &str {
    match body.char_indices().nth(EXCERPT) {
        Some((cut, _)) => &body[..cut],
        None => body,
    }
}

#[async_trait]
impl StepKind for Http {
    fn name(&self) -> &'static str {
        "http"
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let with = &call.with;
        let url = str_field(with, "http", "url")?;
        let method = with.get("method").and_then(Value::as_str).unwrap_or("GET");
        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| invalid(format!("http step: unknown method {method:?}")))?;
        let mut request = self
            .client
            .request(method.clone(), url)
            .headers(headers(with, &call.idempotency_key)?);
        if let Some(query) = with.get("query") {
            request = request.query(query);
        }
        if let Some(body) = with.get("body").filter(|b| !b.is_null()) {
            request = request.json(body);
        }
        if let Some(timeout) = with.get("timeout").and_then(Value::as_str) {
            let timeout = humantime::parse_duration(timeout)
                .map_err(|e| invalid(format!("http step: `with.timeout` {timeout:?}: {e}")))?;
            request = request.timeout(timeout);
        }
        let target = format!("{method} {}", url.split('?').next().unwrap_or(url));
        let response = request.send().await.map_err(|e| {
            let kind = if e.is_timeout() { "timeout" } else { "http" };
            StepFailure::transient(kind, format!("{target}: {}", e.without_url()))
        })?;
        let status = response.status();
        let response_headers = response.headers().clone();
        let text = response
            .text()
            .await
            .map_err(|e| StepFailure::transient("http", format!("{target}: reading body: {e}")))?;
        if !status.is_success() {
            return Err(StepFailure {
                kind: "http".into(),
                message: format!("{target}: HTTP {status}: {}", excerpt(&text)),
                status: Some(status.as_u16()),
                retryable: retryable(status),
                retry_after: retry_after(&response_headers, call.now),
            });
        }
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        let headers: Map<String, Value> = response_headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), Value::String(v.to_str().ok()?.to_owned()))))
            .collect();
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

    #[test]
    fn idempotency_key_is_sent_unless_the_step_sets_one() {
        let h = headers(&json!({}), "run:step").unwrap();
        assert_eq!(h["idempotency-key"], "run:step");
        let h = headers(
            &json!({ "headers": { "Idempotency-Key": "mine" } }),
            "run:step",
        )
        .unwrap();
        assert_eq!(h["idempotency-key"], "mine");
    }
}
